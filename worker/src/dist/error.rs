//! Errors of the data plane: collectives, rendezvous and devices.

use std::time::Duration;

/// Result of a data-plane call.
pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// Everything that can go wrong in a collective, a rendezvous or a device move.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A collective failed: a peer died, timed out, or the ranks disagreed on the call.
    #[error("{op} failed (rank {rank} of {world_size}, timeout {timeout:?}): {message}")]
    Collective {
        /// The operation, e.g. `all_reduce`.
        op: &'static str,
        /// This rank.
        rank: u32,
        /// The group's size.
        world_size: u32,
        /// The configured timeout, within which a dead or missing peer is reported.
        timeout: Duration,
        /// The backend's message.
        message: String,
    },
    /// The TCPStore or the group rendezvous failed (a rank never arrived, the store is down).
    #[error("rendezvous at {addr} (prefix {prefix:?}) failed, timeout {timeout:?}: {message}")]
    Rendezvous {
        /// `host:port` of the TCPStore.
        addr: String,
        /// The generation's key prefix.
        prefix: String,
        /// The configured timeout.
        timeout: Duration,
        /// The backend's message.
        message: String,
    },
    /// A rendezvous called off because the coordinator assigned a newer generation: its peers
    /// have moved on (or one is dead), so it could never complete.
    #[error("rendezvous of generation {generation} abandoned: generation {newer} is assigned")]
    Abandoned {
        /// The generation whose group was being formed.
        generation: u64,
        /// The newer generation.
        newer: u64,
    },
    /// A tensor the collective cannot take (dtype, shape, device), caught before calling c10d.
    #[error("{op}: {message}")]
    BadTensor {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A device string that is none of the valid forms.
    #[error(
        "unknown device {0:?}: expected `cpu`, `cuda:N` or `npu:N` (N a device index, e.g. `cuda:0`)"
    )]
    UnknownDevice(String),
    /// A backend name that is none of the valid ones.
    #[error(
        "unknown collective backend {0:?}: expected `gloo`, `nccl`, `hccl` or empty (follow the device)"
    )]
    UnknownBackend(String),
    /// The device or backend needs a cargo feature this build lacks.
    #[error(
        "{what} needs a build with `--features {feature}` (this build has no {feature} support)"
    )]
    FeatureMissing {
        /// What was asked for, e.g. `device cuda:0`.
        what: String,
        /// The cargo feature to build with.
        feature: &'static str,
    },
    /// A device and a backend that do not go together.
    #[error("backend {backend} cannot run on device {device}: {hint}")]
    Incompatible {
        /// The backend.
        backend: String,
        /// The device.
        device: String,
        /// What would work.
        hint: &'static str,
    },
    /// The device exists in this build but not on this machine, or failed to initialise.
    #[error("device {device}: {message}")]
    Device {
        /// The device.
        device: String,
        /// What went wrong.
        message: String,
    },
    /// libtorch refused a tensor operation of the device layer.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}
