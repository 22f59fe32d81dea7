//! The collective backend: Gloo, NCCL or HCCL, and how it follows from the device.

use std::fmt;
use std::str::FromStr;

use super::error::{DistError, Result};
use super::ffi;
use crate::device::Device;

/// A c10d backend. The discriminants are the shim's `DG_BACKEND_*` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Gloo, for CPU tensors. Always built.
    Gloo = 0,
    /// NCCL, for CUDA tensors. Needs the `cuda` feature.
    Nccl = 1,
    /// HCCL, for Ascend NPU tensors. Needs the `npu` feature.
    Hccl = 2,
}

impl Backend {
    /// The backend a device uses unless the job config overrides it.
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cpu => Backend::Gloo,
            Device::Cuda(_) => Backend::Nccl,
            Device::Npu(_) => Backend::Hccl,
        }
    }

    /// The backend for `device`, with the job config's `backend` override (empty = follow the
    /// device). Checks that this build has it and that it can move the device's tensors.
    pub fn resolve(device: Device, config_override: &str) -> Result<Backend> {
        let backend = if config_override.trim().is_empty() {
            Backend::for_device(device)
        } else {
            config_override.parse()?
        };
        backend.ensure_compiled()?;
        let fits = match backend {
            // c10d's Gloo also reduces CUDA tensors (staging through host memory).
            Backend::Gloo => !matches!(device, Device::Npu(_)),
            Backend::Nccl => matches!(device, Device::Cuda(_)),
            Backend::Hccl => matches!(device, Device::Npu(_)),
        };
        if !fits {
            return Err(DistError::Incompatible {
                backend: backend.to_string(),
                device: device.to_string(),
                hint: "use gloo for cpu, nccl for cuda:N, hccl for npu:N, or leave backend empty",
            });
        }
        Ok(backend)
    }

    /// The cargo feature that builds this backend in, if any.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Backend::Gloo => None,
            Backend::Nccl => Some("cuda"),
            Backend::Hccl => Some("npu"),
        }
    }

    /// Whether the shim in this build has the backend.
    pub fn is_compiled(self) -> bool {
        // SAFETY: a pure function of how the shim was compiled.
        let bits = unsafe { ffi::dg_backends_compiled() };
        bits & (1 << self as u32) != 0
    }

    /// An error naming the feature to build with, when this build lacks the backend.
    pub fn ensure_compiled(self) -> Result<()> {
        match self.feature() {
            Some(feature) if !self.is_compiled() => {
                Err(DistError::FeatureMissing { what: format!("backend {self}"), feature })
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
            Backend::Hccl => "hccl",
        })
    }
}

impl FromStr for Backend {
    type Err = DistError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            "hccl" => Ok(Backend::Hccl),
            _ => Err(DistError::UnknownBackend(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_device_and_honours_the_override() {
        assert_eq!(Backend::resolve(Device::Cpu, "").unwrap(), Backend::Gloo);
        assert_eq!(Backend::resolve(Device::Cpu, " GLOO ").unwrap(), Backend::Gloo);
        let e = Backend::resolve(Device::Cpu, "mpi").unwrap_err().to_string();
        assert!(e.contains("\"mpi\"") && e.contains("`gloo`, `nccl`, `hccl`"), "{e}");
    }

    #[test]
    fn missing_features_name_the_feature() {
        if !cfg!(feature = "cuda") {
            let e = Backend::resolve(Device::Cuda(0), "").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "npu") {
            let e = Backend::resolve(Device::Npu(1), "").unwrap_err().to_string();
            assert!(e.contains("--features npu"), "{e}");
        }
    }

    #[test]
    fn mismatched_device_and_backend_are_refused() {
        let e = Backend::resolve(Device::Npu(0), "gloo").unwrap_err().to_string();
        assert!(e.contains("gloo cannot run on device npu:0"), "{e}");
        if cfg!(feature = "cuda") {
            let e = Backend::resolve(Device::Cpu, "nccl").unwrap_err().to_string();
            assert!(e.contains("nccl cannot run on device cpu"), "{e}");
        }
    }
}
