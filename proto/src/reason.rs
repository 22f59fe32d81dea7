//! Why the coordinator refused a call, machine-readable.
//!
//! Every refusal carries a [`Reason`] as the `reason` of a standard `google.rpc.ErrorInfo` in
//! the status details (domain [`DOMAIN`]), so a worker matches on it instead of on the wording
//! of the message. The gRPC code of each reason is said here, once.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of dancegrpo's refusals.
pub const DOMAIN: &str = "dancegrpo.v1";

/// What a refusal means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The peer speaks another protocol version.
    ProtocolVersion,
    /// The worker was declared lost or stopped: register again.
    WorkerGone,
    /// The coordinator does not know the worker (it restarted, or forgot it): register again.
    UnknownWorker,
    /// No such job.
    UnknownJob,
    /// A malformed request or config.
    InvalidRequest,
    /// The world already has all its workers.
    WorldFull,
    /// Two workers claim the same slot.
    DuplicateSlot,
    /// The world was re-formed since the request's generation: wait for the new assignment.
    Superseded,
    /// The job has failed; the message says why.
    JobFailed,
    /// Not possible yet (a rank is gone, no rank assigned).
    NotReady,
    /// A long poll ran out of time.
    Timeout,
    /// The job's prompt data cannot be used.
    BadData,
    /// The coordinator itself failed.
    Internal,
    /// The call lacks the job's auth token, or carries a wrong one.
    Unauthenticated,
    /// The call names a worker whose session secret it does not hold, or asks for an
    /// operator action of a coordinator that has no token to check it against.
    PermissionDenied,
    /// The job was stopped or cancelled by an operator: no more work.
    JobEnded,
}

impl Reason {
    const ALL: [Reason; 16] = [
        Reason::ProtocolVersion,
        Reason::WorkerGone,
        Reason::UnknownWorker,
        Reason::UnknownJob,
        Reason::InvalidRequest,
        Reason::WorldFull,
        Reason::DuplicateSlot,
        Reason::Superseded,
        Reason::JobFailed,
        Reason::NotReady,
        Reason::Timeout,
        Reason::BadData,
        Reason::Internal,
        Reason::Unauthenticated,
        Reason::PermissionDenied,
        Reason::JobEnded,
    ];

    /// The `ErrorInfo.reason` string (UPPER_SNAKE_CASE, as `google.rpc.ErrorInfo` asks).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ProtocolVersion => "PROTOCOL_VERSION",
            Reason::WorkerGone => "WORKER_GONE",
            Reason::UnknownWorker => "UNKNOWN_WORKER",
            Reason::UnknownJob => "UNKNOWN_JOB",
            Reason::InvalidRequest => "INVALID_REQUEST",
            Reason::WorldFull => "WORLD_FULL",
            Reason::DuplicateSlot => "DUPLICATE_SLOT",
            Reason::Superseded => "SUPERSEDED",
            Reason::JobFailed => "JOB_FAILED",
            Reason::NotReady => "NOT_READY",
            Reason::Timeout => "TIMEOUT",
            Reason::BadData => "BAD_DATA",
            Reason::Internal => "INTERNAL",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::PermissionDenied => "PERMISSION_DENIED",
            Reason::JobEnded => "JOB_ENDED",
        }
    }

    /// The gRPC code a refusal for this reason carries.
    pub fn code(self) -> Code {
        match self {
            Reason::ProtocolVersion | Reason::WorkerGone | Reason::BadData | Reason::JobEnded => {
                Code::FailedPrecondition
            }
            Reason::UnknownWorker | Reason::UnknownJob => Code::NotFound,
            Reason::InvalidRequest => Code::InvalidArgument,
            Reason::WorldFull => Code::ResourceExhausted,
            Reason::DuplicateSlot => Code::AlreadyExists,
            Reason::Superseded | Reason::JobFailed => Code::Aborted,
            Reason::NotReady => Code::Unavailable,
            Reason::Timeout => Code::DeadlineExceeded,
            Reason::Internal => Code::Internal,
            Reason::Unauthenticated => Code::Unauthenticated,
            Reason::PermissionDenied => Code::PermissionDenied,
        }
    }

    /// A refusal with this reason in its details.
    pub fn status(self, message: impl Into<String>) -> Status {
        Status::with_error_details(
            self.code(),
            message,
            ErrorDetails::with_error_info(self.as_str(), DOMAIN, []),
        )
    }

    /// The reason a status carries, if it is one of ours (transport failures carry none).
    pub fn of(status: &Status) -> Option<Reason> {
        let info = status.get_details_error_info()?;
        if info.domain != DOMAIN {
            return None;
        }
        Reason::ALL.into_iter().find(|r| r.as_str() == info.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_survives_the_wire_and_keeps_its_code() {
        for r in Reason::ALL {
            let s = r.status(format!("because {r:?}"));
            // Through the wire form of the details, as a client decodes them.
            let back = Status::with_details(s.code(), s.message(), s.details().to_vec().into());
            assert_eq!(Reason::of(&back), Some(r));
            assert_eq!(back.code(), r.code());
        }
        let names: std::collections::HashSet<_> = Reason::ALL.map(Reason::as_str).into();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    #[test]
    fn statuses_without_our_details_have_no_reason() {
        assert_eq!(Reason::of(&Status::aborted("job failed: x")), None);
        let foreign = Status::with_error_details(
            Code::Aborted,
            "x",
            ErrorDetails::with_error_info("SUPERSEDED", "example.com", []),
        );
        assert_eq!(Reason::of(&foreign), None);
    }
}
