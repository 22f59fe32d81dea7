//! Wire <-> domain conversions. A missing required sub-message is a [`ConvertError`], never a
//! panic: a client that omits a field gets INVALID_ARGUMENT, not a crashed handler.

use crate::config::{JobConfig, LoraConfig, NonFinitePolicy, RewardConfig};
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
        tonic::Status::invalid_argument(e.to_string())
    }
}

impl From<&JobConfig> for pb::JobConfig {
    fn from(c: &JobConfig) -> Self {
        pb::JobConfig {
            job_name: c.job_name.clone(),
            pretrained_model_name_or_path: c.pretrained_model_name_or_path.clone(),
            data_json_path: c.data_json_path.clone(),
            output_dir: c.output_dir.clone(),
            num_generations: c.num_generations,
            sampling_steps: c.sampling_steps,
            eta: c.eta,
            shift: c.shift,
            timestep_fraction: c.timestep_fraction,
            clip_range: c.clip_range,
            adv_clip_max: c.adv_clip_max,
            gradient_accumulation_steps: c.gradient_accumulation_steps,
            max_grad_norm: c.max_grad_norm,
            learning_rate: c.learning_rate,
            weight_decay: c.weight_decay,
            adam_beta1: c.adam_beta1,
            adam_beta2: c.adam_beta2,
            adam_epsilon: c.adam_epsilon,
            h: c.h,
            w: c.w,
            guidance: c.guidance,
            init_same_noise: c.init_same_noise,
            use_group: c.use_group,
            max_train_steps: c.max_train_steps,
            checkpointing_steps: c.checkpointing_steps,
            seed: c.seed,
            sampler_seed: c.sampler_seed,
            train_batch_size: c.train_batch_size,
            gradient_checkpointing: c.gradient_checkpointing,
            rewards: c
                .rewards
                .iter()
                .map(|r| pb::RewardSpec {
                    name: r.name.clone(),
                    weight: r.weight,
                    model_dir: r.model_dir.clone(),
                    on_cpu: r.on_cpu,
                })
                .collect(),
            lora: c.lora.as_ref().map(|l| pb::LoraSpec {
                rank: l.rank,
                alpha: l.alpha,
                target_modules: l.target_modules.clone(),
            }),
            non_finite_policy: match c.non_finite_policy {
                NonFinitePolicy::Fail => pb::NonFinitePolicy::Fail,
                NonFinitePolicy::DropGroup => pb::NonFinitePolicy::DropGroup,
            } as i32,
            reward_log: c.reward_log.clone(),
            backend: c.backend.clone(),
            resume_from_checkpoint: c.resume_from_checkpoint.clone(),
            sample_grid_every: c.sample_grid_every,
        }
    }
}

impl TryFrom<pb::JobConfig> for JobConfig {
    type Error = ConvertError;

    fn try_from(c: pb::JobConfig) -> Result<Self, ConvertError> {
        let non_finite_policy = match c.non_finite_policy() {
            pb::NonFinitePolicy::Fail => NonFinitePolicy::Fail,
            pb::NonFinitePolicy::DropGroup => NonFinitePolicy::DropGroup,
            pb::NonFinitePolicy::Unspecified => {
                return Err(ConvertError::Missing("non_finite_policy"));
            }
        };
        Ok(JobConfig {
            job_name: c.job_name,
            pretrained_model_name_or_path: c.pretrained_model_name_or_path,
            data_json_path: c.data_json_path,
            output_dir: c.output_dir,
            num_generations: c.num_generations,
            sampling_steps: c.sampling_steps,
            eta: c.eta,
            shift: c.shift,
            timestep_fraction: c.timestep_fraction,
            clip_range: c.clip_range,
            adv_clip_max: c.adv_clip_max,
            gradient_accumulation_steps: c.gradient_accumulation_steps,
            max_grad_norm: c.max_grad_norm,
            learning_rate: c.learning_rate,
            weight_decay: c.weight_decay,
            adam_beta1: c.adam_beta1,
            adam_beta2: c.adam_beta2,
            adam_epsilon: c.adam_epsilon,
            h: c.h,
            w: c.w,
            guidance: c.guidance,
            init_same_noise: c.init_same_noise,
            use_group: c.use_group,
            max_train_steps: c.max_train_steps,
            checkpointing_steps: c.checkpointing_steps,
            seed: c.seed,
            sampler_seed: c.sampler_seed,
            train_batch_size: c.train_batch_size,
            gradient_checkpointing: c.gradient_checkpointing,
            rewards: c
                .rewards
                .into_iter()
                .map(|r| RewardConfig {
                    name: r.name,
                    weight: r.weight,
                    model_dir: r.model_dir,
                    on_cpu: r.on_cpu,
                })
                .collect(),
            lora: c.lora.map(|l| LoraConfig {
                rank: l.rank,
                alpha: l.alpha,
                target_modules: l.target_modules,
            }),
            non_finite_policy,
            reward_log: c.reward_log,
            backend: c.backend,
            resume_from_checkpoint: c.resume_from_checkpoint,
            sample_grid_every: c.sample_grid_every,
        })
    }
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

    #[test]
    fn job_config_round_trips_through_the_wire() {
        let c = JobConfig {
            lora: Some(LoraConfig { rank: 8, alpha: 16.0, target_modules: vec!["to_q".into()] }),
            non_finite_policy: NonFinitePolicy::DropGroup,
            ..JobConfig::default()
        };
        let back = JobConfig::try_from(pb::JobConfig::from(&c)).unwrap();
        assert_eq!(back, c);
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
