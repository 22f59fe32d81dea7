//! The data plane: c10d collectives (Gloo on CPU, NCCL on CUDA, HCCL on Ascend NPU) through the
//! C++ shim in `worker/csrc/`, and the rendezvous on the TCPStore the coordinator assigns.
//!
//! A C++ exception in c10d becomes a [`DistError`] carrying its message; it never aborts the
//! process.

mod backend;
mod check;
mod error;
pub(crate) mod ffi;
mod group;

pub use backend::Backend;
pub use error::{DistError, Result};
pub use group::{
    Generations, GroupOptions, Pending, ProcessGroup, ReduceOp, Store, check_socket_ifname,
};
