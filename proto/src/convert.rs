//! Wire <-> domain conversions. A missing required sub-message is a [`ConvertError`], never a
//! panic: a client that omits a field gets INVALID_ARGUMENT, not a crashed handler.

use crate::advantage::{MAX_ABS_REWARD, usable_reward};
use crate::config::JobConfig;
use crate::pb;
use crate::types::{
    Advantages, JobState, PhaseTimings, RankAssignment, Restore, StepMetrics, StoreAddress,
    TrajectoryAdvantage, TrajectoryRewards, Work, WorkItem, WorkerInfo, WorkerState,
};

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

/// The most characters of a client's free text (a reason, an error, a host name) that the
/// coordinator keeps: enough for any real message, too little to flood a log or the status.
pub const MAX_TEXT: usize = 2048;

/// A client's free text made safe to log and show: control characters (a newline that would
/// forge a log line, an ANSI escape) are written as escapes, and it is cut at [`MAX_TEXT`]
/// characters. Every string a client sends passes through here at the edge.
pub fn clean_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_TEXT));
    for (n, c) in s.chars().enumerate() {
        if n == MAX_TEXT {
            out.push_str("...(cut)");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
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
            host: clean_text(&w.host),
            node_rank: w.node_rank,
            local_rank: w.local_rank,
            device: clean_text(&device.device),
            device_description: clean_text(&device.description),
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
            JobState::Cancelled => pb::JobState::Cancelled,
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
            pb::JobState::Cancelled => JobState::Cancelled,
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

impl From<&Work> for pb::GetWorkResponse {
    fn from(w: &Work) -> Self {
        pb::GetWorkResponse {
            iteration: w.iteration,
            items: w.items.iter().map(Into::into).collect(),
            done: w.done,
            restore: w.restore.as_ref().map(|r| pb::Restore {
                step: r.step,
                checkpoint_dir: r
                    .checkpoint_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            }),
            sample_grid: w.sample_grid,
        }
    }
}

impl From<pb::GetWorkResponse> for Work {
    fn from(w: pb::GetWorkResponse) -> Self {
        Work {
            iteration: w.iteration,
            items: w.items.into_iter().map(Into::into).collect(),
            done: w.done,
            restore: w.restore.map(|r| Restore {
                step: r.step,
                checkpoint_dir: (!r.checkpoint_dir.is_empty()).then(|| r.checkpoint_dir.into()),
            }),
            sample_grid: w.sample_grid,
        }
    }
}

/// What goes on the wire for a reward model failure that came without a message: the empty
/// string there means "no error".
const UNNAMED_REWARD_ERROR: &str = "the reward model failed without a message";

impl From<&TrajectoryRewards> for pb::TrajectoryReward {
    fn from(t: &TrajectoryRewards) -> Self {
        let (rewards, error) = match &t.outcome {
            Ok(values) => (values.clone(), String::new()),
            Err(e) if e.is_empty() => (Vec::new(), UNNAMED_REWARD_ERROR.to_string()),
            Err(e) => (Vec::new(), e.clone()),
        };
        pb::TrajectoryReward { item: Some((&t.item).into()), rewards, error }
    }
}

impl TryFrom<pb::TrajectoryReward> for TrajectoryRewards {
    type Error = ConvertError;

    /// A set `error` wins over any values sent with it. A NaN or Inf value is refused, whoever
    /// sends it: a worker reports a non-finite score as an error naming the reward, so that
    /// `non_finite_policy` decides, and nothing unreadable reaches the logs or the database.
    fn try_from(t: pb::TrajectoryReward) -> Result<Self, ConvertError> {
        let item: WorkItem = t.item.ok_or(ConvertError::Missing("rewards.item"))?.into();
        if !t.error.is_empty() {
            return Ok(TrajectoryRewards { item, outcome: Err(clean_text(&t.error)) });
        }
        if let Some((k, v)) = t.rewards.iter().enumerate().find(|(_, v)| !usable_reward(**v)) {
            return Err(ConvertError::Invalid {
                field: "rewards.rewards",
                reason: format!(
                    "reward {k} of group {} member {} (iteration {}) is {v}; a score that is \
                     not finite or beyond ±{MAX_ABS_REWARD:e} is reported as an error",
                    item.group_id, item.member_index, item.iteration
                ),
            });
        }
        Ok(TrajectoryRewards { item, outcome: Ok(t.rewards) })
    }
}

impl From<&TrajectoryAdvantage> for pb::TrajectoryAdvantage {
    fn from(t: &TrajectoryAdvantage) -> Self {
        pb::TrajectoryAdvantage { item: Some((&t.item).into()), advantages: t.advantages.clone() }
    }
}

impl TryFrom<pb::TrajectoryAdvantage> for TrajectoryAdvantage {
    type Error = ConvertError;

    fn try_from(t: pb::TrajectoryAdvantage) -> Result<Self, ConvertError> {
        let item = t.item.ok_or(ConvertError::Missing("advantages.item"))?;
        Ok(TrajectoryAdvantage { item: item.into(), advantages: t.advantages })
    }
}

impl From<&Advantages> for pb::GetAdvantagesResponse {
    fn from(a: &Advantages) -> Self {
        pb::GetAdvantagesResponse {
            iteration: a.iteration,
            advantages: a.advantages.iter().map(Into::into).collect(),
            refill: a.refill.iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::GetAdvantagesResponse> for Advantages {
    type Error = ConvertError;

    fn try_from(a: pb::GetAdvantagesResponse) -> Result<Self, ConvertError> {
        if !a.refill.is_empty() && !a.advantages.is_empty() {
            return Err(ConvertError::Invalid {
                field: "refill",
                reason: format!(
                    "{} refill items sent with {} advantages: refill work comes alone",
                    a.refill.len(),
                    a.advantages.len()
                ),
            });
        }
        Ok(Advantages {
            iteration: a.iteration,
            advantages: a
                .advantages
                .into_iter()
                .map(TrajectoryAdvantage::try_from)
                .collect::<Result<_, _>>()?,
            refill: a.refill.into_iter().map(Into::into).collect(),
        })
    }
}

impl From<&PhaseTimings> for pb::PhaseTimings {
    fn from(t: &PhaseTimings) -> Self {
        pb::PhaseTimings {
            rollout_s: t.rollout_s,
            decode_s: t.decode_s,
            reward_s: t.reward_s,
            train_s: t.train_s,
            communication_s: t.communication_s,
        }
    }
}

impl From<pb::PhaseTimings> for PhaseTimings {
    fn from(t: pb::PhaseTimings) -> Self {
        PhaseTimings {
            rollout_s: t.rollout_s,
            decode_s: t.decode_s,
            reward_s: t.reward_s,
            train_s: t.train_s,
            communication_s: t.communication_s,
        }
    }
}

impl From<&StepMetrics> for pb::StepMetrics {
    fn from(m: &StepMetrics) -> Self {
        pb::StepMetrics {
            iteration: m.iteration,
            loss: m.loss,
            grad_norm: m.grad_norm,
            ratio_dev_mean: m.ratio_dev_mean,
            ratio_dev_max: m.ratio_dev_max,
            clip_fraction: m.clip_fraction,
            timings: Some((&m.timings).into()),
            rank: m.rank,
            weights_fingerprint: m.weights_fingerprint,
            optimizer_steps: m.optimizer_steps,
        }
    }
}

impl TryFrom<pb::StepMetrics> for StepMetrics {
    type Error = ConvertError;

    fn try_from(m: pb::StepMetrics) -> Result<Self, ConvertError> {
        let timings = m.timings.ok_or(ConvertError::Missing("metrics.timings"))?;
        Ok(StepMetrics {
            iteration: m.iteration,
            loss: m.loss,
            grad_norm: m.grad_norm,
            ratio_dev_mean: m.ratio_dev_mean,
            ratio_dev_max: m.ratio_dev_max,
            clip_fraction: m.clip_fraction,
            timings: timings.into(),
            rank: m.rank,
            weights_fingerprint: m.weights_fingerprint,
            optimizer_steps: m.optimizer_steps,
        })
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

    fn item(group_id: u64, member_index: u32) -> WorkItem {
        WorkItem { iteration: 3, prompt_index: 17, group_id, member_index, seed: 99 }
    }

    #[test]
    fn work_round_trips_and_an_empty_checkpoint_dir_is_none() {
        let w = Work {
            iteration: 3,
            items: vec![item(0, 0), item(0, 1)],
            done: false,
            restore: Some(Restore { step: 2, checkpoint_dir: Some("/out/checkpoint-2".into()) }),
            sample_grid: true,
        };
        assert_eq!(Work::from(pb::GetWorkResponse::from(&w)), w);
        let fresh = Work { restore: Some(Restore { step: 0, checkpoint_dir: None }), ..w };
        let wire = pb::GetWorkResponse::from(&fresh);
        assert_eq!(wire.restore.as_ref().unwrap().checkpoint_dir, "");
        assert_eq!(Work::from(wire), fresh);
    }

    #[test]
    fn rewards_round_trip_and_an_error_is_never_the_empty_string() {
        for outcome in [Ok(vec![0.5, -3.0]), Ok(vec![]), Err("HPS: out of memory".into())] {
            let t = TrajectoryRewards { item: item(1, 2), outcome };
            let back = TrajectoryRewards::try_from(pb::TrajectoryReward::from(&t)).unwrap();
            assert_eq!(back, t);
        }
        // A failure without a message still travels as a failure.
        let t = TrajectoryRewards { item: item(1, 2), outcome: Err(String::new()) };
        let wire = pb::TrajectoryReward::from(&t);
        assert_eq!(wire.error, UNNAMED_REWARD_ERROR);
        assert!(TrajectoryRewards::try_from(wire).unwrap().outcome.is_err());
        // The error wins over values sent with it.
        let wire = pb::TrajectoryReward {
            item: Some((&item(0, 0)).into()),
            rewards: vec![1.0],
            error: "boom".into(),
        };
        assert_eq!(TrajectoryRewards::try_from(wire).unwrap().outcome, Err("boom".to_string()));
        let e = TrajectoryRewards::try_from(pb::TrajectoryReward::default()).unwrap_err();
        assert_eq!(e, ConvertError::Missing("rewards.item"));
    }

    #[test]
    fn non_finite_and_overflowing_rewards_are_refused_at_the_edge() {
        // f64::MAX is finite, but a group's sum of it is not (found by the RPC property test).
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, -1.5e12] {
            let wire = pb::TrajectoryReward {
                item: Some((&item(1, 2)).into()),
                rewards: vec![0.5, v],
                error: String::new(),
            };
            let e = TrajectoryRewards::try_from(wire).unwrap_err().to_string();
            assert!(e.contains("reward 1 of group 1 member 2 (iteration 3) is"), "{e}");
        }
        let wire = |v| pb::TrajectoryReward {
            item: Some((&item(1, 2)).into()),
            rewards: vec![v],
            error: String::new(),
        };
        assert!(TrajectoryRewards::try_from(wire(-1e12)).is_ok(), "the bound itself is taken");
    }

    #[test]
    fn client_text_cannot_forge_log_lines_or_flood() {
        let forged = "ok\n2026-12-02T00:00:00Z  INFO job completed\x1b[2J";
        let clean = clean_text(forged);
        assert!(!clean.contains('\n') && !clean.contains('\x1b'), "{clean:?}");
        assert!(clean.contains("ok\\n2026"), "{clean:?}");
        let long = clean_text(&"x".repeat(10 * MAX_TEXT));
        assert!(long.len() < MAX_TEXT + 16, "{}", long.len());
        let w = pb::WorkerInfo {
            host: "evil\nhost".into(),
            device: Some(pb::DeviceInfo { device: "cpu".into(), description: "a\rb".into() }),
            ..Default::default()
        };
        let w = WorkerInfo::try_from(w).unwrap();
        assert!(!w.host.contains('\n') && !w.device_description.contains('\r'), "{w:?}");
    }

    #[test]
    fn advantages_round_trip_and_bad_answers_name_the_field() {
        let a = Advantages {
            iteration: 3,
            advantages: vec![TrajectoryAdvantage { item: item(0, 1), advantages: vec![-1.0, 0.5] }],
            refill: vec![],
        };
        assert_eq!(Advantages::try_from(pb::GetAdvantagesResponse::from(&a)).unwrap(), a);
        let refill = Advantages { iteration: 3, advantages: vec![], refill: vec![item(2, 0)] };
        assert_eq!(Advantages::try_from(pb::GetAdvantagesResponse::from(&refill)).unwrap(), refill);

        // An advantage without its trajectory is refused, not taken for group 0 member 0.
        let mut wire = pb::GetAdvantagesResponse::from(&a);
        wire.advantages[0].item = None;
        let e = Advantages::try_from(wire).unwrap_err();
        assert_eq!(e, ConvertError::Missing("advantages.item"));
        let both = Advantages { refill: vec![item(2, 0)], ..a };
        let e = Advantages::try_from(pb::GetAdvantagesResponse::from(&both)).unwrap_err();
        assert!(matches!(e, ConvertError::Invalid { field: "refill", .. }), "{e}");
        assert!(e.to_string().contains("1 refill items sent with 1 advantages"), "{e}");
    }

    #[test]
    fn step_metrics_round_trip_and_need_their_timings() {
        let m = StepMetrics {
            iteration: 4,
            loss: 0.25,
            grad_norm: 1.5,
            ratio_dev_mean: 1e-4,
            ratio_dev_max: 3e-3,
            clip_fraction: 0.125,
            timings: PhaseTimings {
                rollout_s: 1.0,
                decode_s: 2.0,
                reward_s: 3.0,
                train_s: 4.0,
                communication_s: 5.0,
            },
            rank: 1,
            weights_fingerprint: -12.75,
            optimizer_steps: 2,
        };
        assert_eq!(StepMetrics::try_from(pb::StepMetrics::from(&m)).unwrap(), m);
        let wire = pb::StepMetrics { timings: None, ..pb::StepMetrics::from(&m) };
        let e = StepMetrics::try_from(wire).unwrap_err();
        assert_eq!(e, ConvertError::Missing("metrics.timings"));
        assert_eq!(e.to_string(), "missing field `metrics.timings`");
    }
}
