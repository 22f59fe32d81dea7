//! Domain types of the control plane. The wire messages in [`crate::pb`] convert into these at
//! the edge ([`crate::convert`]).

use std::fmt;
use std::path::PathBuf;

/// A worker process as it describes itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Hostname.
    pub host: String,
    /// `NODE_RANK` of its node.
    pub node_rank: u32,
    /// Index of its accelerator on the node.
    pub local_rank: u32,
    /// Device string, e.g. `cpu`, `cuda:0`, `npu:3`.
    pub device: String,
    /// Human-readable device detail.
    pub device_description: String,
    /// Process id, for operators.
    pub pid: u32,
}

/// The c10d TCPStore of a group generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreAddress {
    /// Host of rank 0.
    pub host: String,
    /// Port the store listens on.
    pub port: u16,
    /// Key prefix, unique per generation, so a re-formed world never reads stale keys.
    pub prefix: String,
}

/// A worker's place in the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankAssignment {
    /// Global rank.
    pub rank: u32,
    /// Number of workers.
    pub world_size: u32,
    /// Bumped every time the world is re-formed.
    pub generation: u64,
    /// Rendezvous store for the collectives.
    pub store: StoreAddress,
}

/// Lifecycle of a worker as the coordinator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Registered, waiting for the rest of the world.
    Waiting,
    /// Has a rank and works.
    Running,
    /// Finishing in-flight work after SIGTERM.
    Draining,
    /// Left cleanly.
    Stopped,
    /// Missed its heartbeats.
    Lost,
}

impl WorkerState {
    /// Stable lower-case name, used in the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
            Self::Lost => "lost",
        }
    }

    /// Parses [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => Self::Waiting,
            "running" => Self::Running,
            "draining" => Self::Draining,
            "stopped" => Self::Stopped,
            "lost" => Self::Lost,
            _ => return None,
        })
    }

    /// Still holds its slot in the world.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Waiting | Self::Running | Self::Draining)
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Fewer workers than the world size have registered.
    WaitingForWorkers,
    /// The world is complete.
    Running,
    /// All iterations done.
    Completed,
    /// Stopped by an error.
    Failed,
    /// Stopped by an operator (`stop`): the iteration in flight finished and was
    /// checkpointed.
    Stopped,
    /// Cancelled by an operator (`cancel`): ended at once, without another checkpoint.
    Cancelled,
}

impl JobState {
    /// Stable lower-case name, used in the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForWorkers => "waiting_for_workers",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting_for_workers" => Self::WaitingForWorkers,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "stopped" => Self::Stopped,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// No more work will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Stopped | Self::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One trajectory to roll out: step 1 of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkItem {
    /// Outer iteration.
    pub iteration: u64,
    /// Index into the prompt dataset.
    pub prompt_index: u64,
    /// Group (prompt slot) within the iteration.
    pub group_id: u64,
    /// Member of the group, `0..num_generations`.
    pub member_index: u32,
    /// Seed of this trajectory's SDE noise.
    pub seed: u64,
}

/// Where a worker restores its weights and optimizer state from before it works: the job
/// continues from `step` (after a resume, or a world re-formed around a lost worker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    /// The step the job continues from.
    pub step: u64,
    /// The checkpoint of `step`; `None` for the pretrained model (step 0).
    pub checkpoint_dir: Option<PathBuf>,
}

/// The answer to GetWork: step 1 of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    /// The iteration to run (0-based).
    pub iteration: u64,
    /// This rank's trajectories.
    pub items: Vec<WorkItem>,
    /// The job has no more iterations.
    pub done: bool,
    /// Load this state first (the worker's weights are not at `iteration`).
    pub restore: Option<Restore>,
    /// Write a grid of this iteration's samples.
    pub sample_grid: bool,
}

/// One scored trajectory: step 2 of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct TrajectoryRewards {
    /// The trajectory.
    pub item: WorkItem,
    /// One value per configured reward, in config order (NaN/Inf as they came), or why the
    /// reward model failed for this trajectory.
    pub outcome: Result<Vec<f64>, String>,
}

/// One trajectory's advantages: step 3 of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct TrajectoryAdvantage {
    /// The trajectory.
    pub item: WorkItem,
    /// One clamped, group-normalised advantage per reward.
    pub advantages: Vec<f64>,
}

/// The answer to GetAdvantages: this rank's advantages, or refill work to do first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advantages {
    /// The iteration they belong to.
    pub iteration: u64,
    /// One per trajectory of the rank; empty while `refill` is not.
    pub advantages: Vec<TrajectoryAdvantage>,
    /// Replacement trajectories (a fresh prompt for a group whose rewards were not finite)
    /// to roll out and report before asking again.
    pub refill: Vec<WorkItem>,
}

/// Seconds spent per phase of an iteration.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimings {
    /// Denoising rollouts.
    pub rollout_s: f64,
    /// VAE decoding.
    pub decode_s: f64,
    /// Reward models.
    pub reward_s: f64,
    /// The update, less its communication.
    pub train_s: f64,
    /// Gradient all-reduces.
    pub communication_s: f64,
}

/// One rank's account of an iteration's update: step 5 of the protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    /// The iteration (0-based).
    pub iteration: u64,
    /// Sum of the transition losses, each divided by its accumulation window's size.
    pub loss: f64,
    /// Mean pre-clip global gradient norm over the optimizer steps.
    pub grad_norm: f64,
    /// Mean |ratio - 1| over the transitions.
    pub ratio_dev_mean: f64,
    /// Largest |ratio - 1|.
    pub ratio_dev_max: f64,
    /// Fraction of transitions whose ratio left `[1 - clip_range, 1 + clip_range]`.
    pub clip_fraction: f64,
    /// Where the time went.
    pub timings: PhaseTimings,
    /// The reporting rank.
    pub rank: u32,
    /// Sum of every trainable weight (f64): equal on all ranks when they hold identical
    /// weights.
    pub weights_fingerprint: f64,
    /// Optimizer steps taken this iteration.
    pub optimizer_steps: u32,
}
