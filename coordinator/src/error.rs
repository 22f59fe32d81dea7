//! The coordinator's error type and its single mapping to `tonic::Status`.

use dancegrpo_proto::Reason;
use dancegrpo_proto::convert::ConvertError;
use dancegrpo_proto::{ConfigError, JobState};

/// Crate-wide result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job configuration is invalid; every problem is listed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration could not be read or parsed.
    #[error("cannot load config: {0}")]
    ConfigLoad(String),
    /// A peer speaks another protocol version.
    #[error(
        "protocol version mismatch: worker speaks v{worker}, coordinator speaks v{coordinator}; \
         run the same dancegrpo release on both"
    )]
    ProtocolVersion {
        /// What the worker sent.
        worker: u32,
        /// What this coordinator speaks.
        coordinator: u32,
    },
    /// A malformed request.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A wire message that does not convert into a domain value.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The world already has all its workers.
    #[error("world is full: {registered} of {world_size} workers already registered")]
    WorldFull {
        /// Live workers.
        registered: u32,
        /// Expected workers.
        world_size: u32,
    },
    /// Two workers claim the same (node rank, local rank).
    #[error(
        "duplicate worker: node_rank {node_rank} local_rank {local_rank} is already taken by \
         worker {existing} on {host}"
    )]
    DuplicateSlot {
        /// Node rank.
        node_rank: u32,
        /// Local rank.
        local_rank: u32,
        /// Worker id holding the slot.
        existing: String,
        /// Its host.
        host: String,
    },
    /// Unknown worker id (e.g. after a coordinator restart, or after being declared lost).
    #[error("unknown worker {0}: register again")]
    UnknownWorker(String),
    /// The worker was declared lost or stopped and must register again.
    #[error("worker {id} is {state}: register again")]
    WorkerGone {
        /// Worker id.
        id: String,
        /// Its state.
        state: dancegrpo_proto::WorkerState,
    },
    /// A call naming a worker without that worker's session secret.
    #[error("permission denied: this call does not hold the session of worker {0}")]
    PermissionDenied(String),
    /// Unknown job id.
    #[error("unknown job {0}")]
    UnknownJob(String),
    /// The embedded database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// I/O, e.g. binding the listener.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A request for a world generation that has been re-formed since.
    #[error(
        "generation {requested} was superseded by generation {current} (the world was \
         re-formed); wait for the new assignment and ask for work again"
    )]
    Superseded {
        /// What the worker quoted.
        requested: u64,
        /// The coordinator's.
        current: u64,
    },
    /// The job has failed; the message says why.
    #[error("job failed: {0}")]
    JobFailed(String),
    /// An operator stopped or cancelled the job: no more work.
    #[error("job {state}: {message}")]
    JobEnded {
        /// `stopped` or `cancelled`.
        state: JobState,
        /// Who ended it, and why.
        message: String,
    },
    /// A coordinator restarted on a job whose config has changed since, without being told
    /// to adopt the new values.
    #[error(
        "job {job} in the database was started with another config, and a restarted \
         coordinator does not change a job's config silently; what differs (stored -> \
         given): {}. Start with --adopt-config to go on with the new values, or give the job \
         another job_name to start a new one",
        changes.join("; ")
    )]
    ConfigChanged {
        /// The job's name and id.
        job: String,
        /// `key: old -> new`, one per key that differs.
        changes: Vec<String>,
    },
    /// Files the job needs are missing or damaged; every problem is listed.
    #[error(
        "pre-start checks failed, nothing has started: {}. (A coordinator that cannot see the \
         workers' files can skip these checks with --skip-file-checks.)",
        .0.join("; ")
    )]
    Preflight(Vec<String>),
    /// A job or worker state change that its lifecycle does not have.
    #[error(transparent)]
    Illegal(#[from] crate::lifecycle::Illegal),
    /// Not possible yet (e.g. no rank assigned).
    #[error("{0}")]
    NotReady(String),
    /// A long poll ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The job's prompt data cannot be used.
    #[error("prompt data {path}: {message}")]
    Data {
        /// The configured `data_json_path`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Error {
    /// The machine-readable reason a worker sees; the gRPC code follows from it
    /// ([`Reason::code`]).
    pub fn reason(&self) -> Reason {
        match self {
            Error::ProtocolVersion { .. } => Reason::ProtocolVersion,
            Error::WorkerGone { .. } => Reason::WorkerGone,
            Error::InvalidRequest(_)
            | Error::Convert(_)
            | Error::Config(_)
            | Error::ConfigChanged { .. }
            | Error::Preflight(_)
            | Error::Illegal(_) => Reason::InvalidRequest,
            Error::WorldFull { .. } => Reason::WorldFull,
            Error::Superseded { .. } => Reason::Superseded,
            Error::JobFailed(_) => Reason::JobFailed,
            Error::JobEnded { .. } => Reason::JobEnded,
            Error::NotReady(_) => Reason::NotReady,
            Error::Timeout(_) => Reason::Timeout,
            Error::Data { .. } => Reason::BadData,
            Error::DuplicateSlot { .. } => Reason::DuplicateSlot,
            Error::UnknownWorker(_) => Reason::UnknownWorker,
            Error::UnknownJob(_) => Reason::UnknownJob,
            Error::PermissionDenied(_) => Reason::PermissionDenied,
            Error::ConfigLoad(_) | Error::Db(_) | Error::Io { .. } | Error::Transport(_) => {
                Reason::Internal
            }
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let reason = e.reason();
        if reason == Reason::Internal {
            tracing::error!(cause = %e, "internal error");
        }
        reason.status(e.to_string())
    }
}
