//! Wire protocol v1 of dancegrpo and the domain types both process roles share.
//!
//! Prost types stay at the edge: every inbound message is converted into a domain type in
//! [`convert`], and the coordinator and worker logic only sees those.

/// Generated protobuf and gRPC code for `dancegrpo.v1`.
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("dancegrpo.v1");

    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("dancegrpo_v1_descriptor");
}
pub use v1 as pb;

/// Group-relative advantages per reward, with the NaN/Inf guard.
pub mod advantage;
/// The job token and the workers' session secrets.
pub mod auth;
/// The job configuration: reference flag names, launch defaults and validation.
pub mod config;
/// Conversions between wire messages and domain types.
pub mod convert;
/// The on-disk layouts a job reads, checked without libtorch.
pub mod files;
/// Typed ids.
pub mod ids;
/// Checkpoint folder names in a job's `output_dir`.
pub mod layout;
/// The log output of both binaries (`--log-format`).
pub mod logging;
/// Machine-readable reasons of refusals (`google.rpc.ErrorInfo`).
pub mod reason;
/// The reward registry and one reward's config.
pub mod rewards;
/// TLS and mutual TLS of the gRPC connections.
pub mod tls;
/// Domain types of the control plane.
pub mod types;

pub use auth::{AuthToken, ClientAuth, ServerAuth, SessionSecret};
pub use config::{
    ConfigError, JobConfig, LoraConfig, NonFinitePolicy, RewardConfig, RolloutWeights,
    ShardingStrategy, WeightType,
};
pub use ids::{JobId, WorkerId};
pub use reason::Reason;
pub use types::{
    Advantages, JobState, PhaseTimings, RankAssignment, Restore, StepMetrics, StoreAddress,
    TrajectoryAdvantage, TrajectoryRewards, Work, WorkItem, WorkerInfo, WorkerState,
};

/// Version of the worker <-> coordinator protocol. 2: the job config travels as JSON. 3:
/// `GetWorkRequest.iteration` is absent for weights that match no step (it was `u64::MAX`). 4:
/// every call naming a worker carries its registration's `session_secret`, and rewards are
/// finite. 5: a job can end `cancelled`, and step calls of a stopped or cancelled job are
/// refused with `JOB_ENDED`.
///
/// Bump it on any change a peer of the other version would misread. Zero means "unset" and is
/// always rejected, so a client that forgot the field cannot slip through.
pub const PROTOCOL_VERSION: u32 = 5;
