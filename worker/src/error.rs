//! The worker's error type.

/// Crate-wide result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator could not be reached within the retry window.
    #[error("coordinator at {addr} unreachable after {waited_s:.0}s: {last}")]
    Unreachable {
        /// Its address.
        addr: String,
        /// How long we tried.
        waited_s: f64,
        /// The last error seen.
        last: String,
    },
    /// The coordinator refused us.
    #[error("coordinator rejected {rpc}: {message}")]
    Rejected {
        /// The call.
        rpc: &'static str,
        /// Its status message.
        message: String,
        /// Its status code.
        code: tonic::Code,
        /// The coordinator's machine-readable reason; `None` for a failure of the transport.
        reason: Option<dancegrpo_proto::Reason>,
    },
    /// A reply that does not make sense.
    #[error("bad reply from coordinator: {0}")]
    BadReply(String),
    /// A bad flag or environment value.
    #[error("invalid setting: {0}")]
    Settings(String),
    /// A collective or the rendezvous failed.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// libtorch failed on the compute thread.
    #[error("compute: {0}")]
    Compute(String),
    /// A compute job panicked (a bug): the thread lives on, the rank's state is discarded and
    /// restored from the last checkpoint, and the job fails only if it keeps happening.
    #[error("compute job panicked: {0}")]
    Panicked(String),
    /// The job this worker belongs to has failed (the coordinator's status says why).
    #[error("the job failed; `dancegrpo-coordinator status` says why")]
    JobFailed,
}

impl Error {
    /// Whether a worker restarted in the same place would fail the same way: a bad setting, or
    /// an error of the compute (a config or data error, a missing or corrupt file, an unknown
    /// reward). Such an error fails the job at once; a control-plane or collective failure
    /// does not, since a new world or a returning coordinator mends it.
    pub fn fails_the_job(&self) -> bool {
        // A panic reaching this far happened again after rejoins (the worker's loop counts).
        matches!(self, Error::Settings(_) | Error::Compute(_) | Error::Panicked(_))
    }
}

impl From<dancegrpo_proto::convert::ConvertError> for Error {
    fn from(e: dancegrpo_proto::convert::ConvertError) -> Self {
        Error::BadReply(e.to_string())
    }
}
