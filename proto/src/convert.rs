//! Wire <-> domain conversions. A missing required sub-message is a [`ConvertError`], never a
//! panic: a client that omits a field gets INVALID_ARGUMENT, not a crashed handler.

use crate::config::JobConfig;
use crate::pb;
use crate::types::{JobState, RankAssignment, StoreAddress, WorkItem, WorkerInfo, WorkerState};

/// A wire message that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field was absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A field had a value out of range.
    #[error("invalid field `{field}`: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        crate::Reason::InvalidRequest.status(e.to_string())
    }
}

/// The job config as it travels: JSON with the config file's keys, so [`JobConfig`] stays its
/// only definition. [`crate::PROTOCOL_VERSION`] guards the key set.
pub fn job_config_to_wire(c: &JobConfig) -> String {
    serde_json::to_string(c).expect("a JobConfig always serialises")
}

/// The inverse of [`job_config_to_wire`]: unknown keys and bad values are a [`ConvertError`].
pub fn job_config_from_wire(field: &'static str, json: &str) -> Result<JobConfig, ConvertError> {
    if json.is_empty() {
        return Err(ConvertError::Missing(field));
    }
    serde_json::from_str(json).map_err(|e| ConvertError::Invalid { field, reason: e.to_string() })
}

impl From<&WorkerInfo> for pb::WorkerInfo {
    fn from(w: &WorkerInfo) -> Self {
        pb::WorkerInfo {
            host: w.host.clone(),
            node_rank: w.node_rank,
            local_rank: w.local_rank,
            device: Some(pb::DeviceInfo {
                device: w.device.clone(),
                description: w.device_description.clone(),
            }),
            pid: w.pid,
        }
    }
}

impl TryFrom<pb::WorkerInfo> for WorkerInfo {
    type Error = ConvertError;

    fn try_from(w: pb::WorkerInfo) -> Result<Self, ConvertError> {
        let device = w.device.ok_or(ConvertError::Missing("worker.device"))?;
        if device.device.is_empty() {
            return Err(ConvertError::Missing("worker.device.device"));
        }
        Ok(WorkerInfo {
            host: w.host,
            node_rank: w.node_rank,
            local_rank: w.local_rank,
            device: device.device,
            device_description: device.description,
            pid: w.pid,
        })
    }
}

impl From<&RankAssignment> for pb::RankAssignment {
    fn from(a: &RankAssignment) -> Self {
        pb::RankAssignment {
            rank: a.rank,
            world_size: a.world_size,
            generation: a.generation,
            store: Some(pb::StoreAddress {
                host: a.store.host.clone(),
                port: a.store.port.into(),
                prefix: a.store.prefix.clone(),
            }),
        }
    }
}

impl TryFrom<pb::RankAssignment> for RankAssignment {
    type Error = ConvertError;

    fn try_from(a: pb::RankAssignment) -> Result<Self, ConvertError> {
        let store = a.store.ok_or(ConvertError::Missing("assignment.store"))?;
        let port = u16::try_from(store.port).map_err(|_| ConvertError::Invalid {
            field: "assignment.store.port",
            reason: format!("{} is not a TCP port", store.port),
        })?;
        if a.rank >= a.world_size {
            return Err(ConvertError::Invalid {
                field: "assignment.rank",
                reason: format!("rank {} outside world size {}", a.rank, a.world_size),
            });
        }
        Ok(RankAssignment {
            rank: a.rank,
            world_size: a.world_size,
            generation: a.generation,
            store: StoreAddress { host: store.host, port, prefix: store.prefix },
        })
    }
}

impl From<WorkerState> for pb::WorkerState {
    fn from(s: WorkerState) -> Self {
        match s {
            WorkerState::Waiting => pb::WorkerState::Waiting,
            WorkerState::Running => pb::WorkerState::Running,
            WorkerState::Draining => pb::WorkerState::Draining,
            WorkerState::Stopped => pb::WorkerState::Stopped,
            WorkerState::Lost => pb::WorkerState::Lost,
        }
    }
}

impl TryFrom<pb::WorkerState> for WorkerState {
    type Error = ConvertError;

    fn try_from(s: pb::WorkerState) -> Result<Self, ConvertError> {
        Ok(match s {
            pb::WorkerState::Waiting => WorkerState::Waiting,
            pb::WorkerState::Running => WorkerState::Running,
            pb::WorkerState::Draining => WorkerState::Draining,
            pb::WorkerState::Stopped => WorkerState::Stopped,
            pb::WorkerState::Lost => WorkerState::Lost,
            pb::WorkerState::Unspecified => return Err(ConvertError::Missing("state")),
        })
    }
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::WaitingForWorkers => pb::JobState::WaitingForWorkers,
            JobState::Running => pb::JobState::Running,
            JobState::Completed => pb::JobState::Completed,
            JobState::Failed => pb::JobState::Failed,
            JobState::Stopped => pb::JobState::Stopped,
        }
    }
}

impl TryFrom<pb::JobState> for JobState {
    type Error = ConvertError;

    fn try_from(s: pb::JobState) -> Result<Self, ConvertError> {
        Ok(match s {
            pb::JobState::WaitingForWorkers => JobState::WaitingForWorkers,
            pb::JobState::Running => JobState::Running,
            pb::JobState::Completed => JobState::Completed,
            pb::JobState::Failed => JobState::Failed,
            pb::JobState::Stopped => JobState::Stopped,
            pb::JobState::Unspecified => return Err(ConvertError::Missing("job_state")),
        })
    }
}

impl From<&WorkItem> for pb::WorkItem {
    fn from(w: &WorkItem) -> Self {
        pb::WorkItem {
            iteration: w.iteration,
            prompt_index: w.prompt_index,
            group_id: w.group_id,
            member_index: w.member_index,
            seed: w.seed,
        }
    }
}

impl From<pb::WorkItem> for WorkItem {
    fn from(w: pb::WorkItem) -> Self {
        WorkItem {
            iteration: w.iteration,
            prompt_index: w.prompt_index,
            group_id: w.group_id,
            member_index: w.member_index,
            seed: w.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::{LoraConfig, NonFinitePolicy};

    #[test]
    fn job_config_round_trips_through_the_wire() {
        let c = JobConfig {
            lora: Some(LoraConfig { rank: 8, alpha: 16.0, target_modules: vec!["to_q".into()] }),
            non_finite_policy: NonFinitePolicy::DropGroup,
            ..JobConfig::default()
        };
        let back = job_config_from_wire("config_json", &job_config_to_wire(&c)).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            job_config_from_wire("config_json", ""),
            Err(ConvertError::Missing("config_json"))
        );
        let e = job_config_from_wire("config_json", r#"{"use_ema": true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `use_ema`"), "{e}");
    }

    #[test]
    fn missing_sub_messages_are_errors_not_panics() {
        let e = WorkerInfo::try_from(pb::WorkerInfo::default()).unwrap_err();
        assert_eq!(e, ConvertError::Missing("worker.device"));
        let e = RankAssignment::try_from(pb::RankAssignment {
            rank: 3,
            world_size: 2,
            generation: 0,
            store: Some(pb::StoreAddress::default()),
        })
        .unwrap_err();
        assert!(e.to_string().contains("rank 3 outside world size 2"), "{e}");
    }
}
