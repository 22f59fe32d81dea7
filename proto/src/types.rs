//! Domain types of the control plane. The wire messages in [`crate::pb`] convert into these at
//! the edge ([`crate::convert`]).

use std::fmt;

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
    /// Stopped by an operator.
    Stopped,
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
            _ => return None,
        })
    }

    /// No more work will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Stopped)
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
