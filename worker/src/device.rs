//! The device a worker computes on: `cpu`, `cuda:N` or `npu:N`. It moves tensors and parameter
//! sets there, and synchronizes.
//!
//! tch's `Device` has no NPU, so NPU tensors (c10's `PrivateUse1`, renamed "npu" by torch_npu)
//! go through the shim. CUDA and NPU exist only in builds with the `cuda` / `npu` features;
//! asking for them elsewhere is an error naming the feature.

use std::fmt;
use std::str::FromStr;

use tch::Tensor;
use tch::nn::VarStore;

use crate::dist::{Backend, DistError, Result};

/// Where a worker's tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// A CUDA GPU, by index among the visible ones (`CUDA_VISIBLE_DEVICES`).
    Cuda(usize),
    /// An Ascend NPU, by index among the visible ones (`ASCEND_RT_VISIBLE_DEVICES`).
    Npu(usize),
}

impl Device {
    /// The collective backend this device uses unless the config overrides it.
    pub fn backend(self) -> Backend {
        Backend::for_device(self)
    }

    /// The cargo feature this device needs, if any.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Device::Cpu => None,
            Device::Cuda(_) => Some("cuda"),
            Device::Npu(_) => Some("npu"),
        }
    }

    /// Whether this build was compiled with the device's feature.
    pub fn is_compiled(self) -> bool {
        match self {
            Device::Cpu => true,
            Device::Cuda(_) => cfg!(feature = "cuda"),
            Device::Npu(_) => cfg!(feature = "npu"),
        }
    }

    /// Checks that the build has the device and the machine has it, and initialises it (NPU:
    /// `torch_npu::init_npu`). Call once on the compute thread before the first move.
    pub fn init(self) -> Result<()> {
        self.ensure_compiled()?;
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => {
                let n = tch::Cuda::device_count();
                if (i as i64) < n {
                    Ok(())
                } else {
                    Err(self.error(format!(
                        "only {n} CUDA device(s) visible (CUDA_VISIBLE_DEVICES={:?})",
                        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
                    )))
                }
            }
            Device::Npu(i) => {
                let visible = std::env::var("ASCEND_RT_VISIBLE_DEVICES").ok();
                check_visible(self, i, visible.as_deref())?;
                npu::init(self, i)
            }
        }
    }

    /// The tch device, for CPU and CUDA. NPU has none: use [`Device::to`].
    pub fn tch(self) -> Result<tch::Device> {
        self.ensure_compiled()?;
        match self {
            Device::Cpu => Ok(tch::Device::Cpu),
            Device::Cuda(i) => Ok(tch::Device::Cuda(i)),
            Device::Npu(_) => Err(self.error(
                "tch has no NPU device; move tensors with Device::to and create new ones from \
                 existing tensors"
                    .into(),
            )),
        }
    }

    /// A copy of `t` on this device (or `t` itself, shallowly, when it is already there).
    pub fn to(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Device::Cpu | Device::Cuda(_) => Ok(t.f_to_device(self.tch()?)?),
            Device::Npu(i) => {
                self.ensure_compiled()?;
                npu::to(self, t, i)
            }
        }
    }

    /// Moves every variable of `vs` here, in place: the tensors the model holds keep their
    /// identity, so optimizers built on them stay valid.
    pub fn move_vars(self, vs: &mut VarStore) -> Result<()> {
        match self {
            Device::Cpu | Device::Cuda(_) => {
                vs.set_device(self.tch()?);
                Ok(())
            }
            Device::Npu(_) => {
                let _guard = tch::no_grad_guard();
                for (_, mut var) in vs.variables() {
                    let moved = self.to(&var)?;
                    var.f_set_data(&moved)?;
                }
                Ok(())
            }
        }
    }

    /// Moves a parameter set (any tensors, e.g. `VarStore::trainable_variables()`) in place.
    pub fn move_tensors(self, tensors: &mut [Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for t in tensors.iter_mut() {
            let moved = self.to(t)?;
            t.f_set_data(&moved)?;
        }
        Ok(())
    }

    /// Waits for all queued work on the device to finish. A no-op on CPU.
    pub fn synchronize(self) -> Result<()> {
        self.ensure_compiled()?;
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => {
                tch::Cuda::synchronize(i as i64);
                Ok(())
            }
            Device::Npu(i) => npu::synchronize(self, i),
        }
    }

    fn ensure_compiled(self) -> Result<()> {
        match self.feature() {
            Some(feature) if !self.is_compiled() => {
                Err(DistError::FeatureMissing { what: format!("device {self}"), feature })
            }
            _ => Ok(()),
        }
    }

    fn error(self, message: String) -> DistError {
        DistError::Device { device: self.to_string(), message }
    }
}

/// `ASCEND_RT_VISIBLE_DEVICES` renumbers the NPUs: `npu:N` counts the listed ones only.
fn check_visible(device: Device, index: usize, visible: Option<&str>) -> Result<()> {
    let Some(list) = visible.map(str::trim).filter(|l| !l.is_empty()) else {
        return Ok(());
    };
    let n = list.split(',').filter(|s| !s.trim().is_empty()).count();
    if index < n {
        Ok(())
    } else {
        Err(device.error(format!(
            "ASCEND_RT_VISIBLE_DEVICES={list} makes {n} device(s) visible, numbered 0..{n}; \
             the index counts visible devices, not physical ones"
        )))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Npu(i) => write!(f, "npu:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = DistError;

    /// Parses `cpu`, `cuda:N` or `npu:N`. A bare `cuda` / `npu` means index 0, as in torch.
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || DistError::UnknownDevice(s.to_string());
        let t = s.trim().to_ascii_lowercase();
        let (kind, index) = match t.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (t.as_str(), None),
        };
        let index = match index {
            None => 0,
            Some(i) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => {
                i.parse().map_err(|_| unknown())?
            }
            Some(_) => return Err(unknown()),
        };
        match kind {
            "cpu" if index == 0 && !t.contains(':') => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(index)),
            "npu" => Ok(Device::Npu(index)),
            _ => Err(unknown()),
        }
    }
}

#[cfg(feature = "npu")]
mod npu {
    //! The shim calls behind `Device::Npu`.
    use super::*;
    use crate::dist::ffi;

    pub(super) fn init(device: Device, index: usize) -> Result<()> {
        // SAFETY: plain call; exceptions are caught in C++.
        ffi::check(unsafe { ffi::dg_npu_init(index as i32) }).map_err(|m| device.error(m))?;
        let mut n = 0;
        // SAFETY: valid out-pointer.
        ffi::check(unsafe { ffi::dg_npu_device_count(&mut n) }).map_err(|m| device.error(m))?;
        if index < n as usize {
            Ok(())
        } else {
            Err(device.error(format!("only {n} NPU(s) visible")))
        }
    }

    pub(super) fn to(device: Device, t: &Tensor, index: usize) -> Result<Tensor> {
        let mut out = std::ptr::null_mut();
        // SAFETY: a live tensor; the shim returns a new heap at::Tensor that we then own.
        ffi::check(unsafe { ffi::dg_npu_to(t.as_ptr().cast_mut().cast(), index as i32, &mut out) })
            .map_err(|m| device.error(m))?;
        // SAFETY: `out` is a fresh `new at::Tensor`, freed by tch's Drop.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    pub(super) fn synchronize(device: Device, index: usize) -> Result<()> {
        // SAFETY: plain call; exceptions are caught in C++.
        ffi::check(unsafe { ffi::dg_npu_synchronize(index as i32) }).map_err(|m| device.error(m))
    }
}

#[cfg(not(feature = "npu"))]
mod npu {
    //! Without the `npu` feature, `Device::ensure_compiled` refuses NPUs before these run.
    use super::*;

    fn missing(device: Device) -> DistError {
        DistError::FeatureMissing { what: format!("device {device}"), feature: "npu" }
    }

    pub(super) fn init(device: Device, _index: usize) -> Result<()> {
        Err(missing(device))
    }

    pub(super) fn to(device: Device, _t: &Tensor, _index: usize) -> Result<Tensor> {
        Err(missing(device))
    }

    pub(super) fn synchronize(device: Device, _index: usize) -> Result<()> {
        Err(missing(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_prints_them_back() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("cuda:0", Device::Cuda(0)),
            ("npu:3", Device::Npu(3)),
            (" CUDA:12 ", Device::Cuda(12)),
            ("cuda", Device::Cuda(0)),
        ] {
            assert_eq!(s.parse::<Device>().unwrap(), d, "{s}");
        }
        assert_eq!(Device::Npu(3).to_string(), "npu:3");
        assert_eq!(Device::Cuda(0).to_string().parse::<Device>().unwrap(), Device::Cuda(0));
    }

    #[test]
    fn unknown_strings_list_the_valid_forms() {
        for s in ["gpu:0", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "", "npu:1:2", "tpu"] {
            let e = s.parse::<Device>().unwrap_err().to_string();
            assert!(
                e.contains("`cpu`, `cuda:N` or `npu:N`") && e.contains(&format!("{s:?}")),
                "{e}"
            );
        }
    }

    #[test]
    fn the_backend_follows_the_device() {
        assert_eq!(Device::Cpu.backend(), Backend::Gloo);
        assert_eq!(Device::Cuda(1).backend(), Backend::Nccl);
        assert_eq!(Device::Npu(0).backend(), Backend::Hccl);
    }

    #[test]
    fn devices_of_missing_features_name_the_feature() {
        let t = Tensor::from_slice(&[1f32]);
        if !cfg!(feature = "cuda") {
            for e in [Device::Cuda(0).init().unwrap_err(), Device::Cuda(0).to(&t).unwrap_err()] {
                assert!(
                    e.to_string().contains("device cuda:0 needs a build with `--features cuda`"),
                    "{e}"
                );
            }
        }
        if !cfg!(feature = "npu") {
            for e in [Device::Npu(2).init().unwrap_err(), Device::Npu(2).to(&t).unwrap_err()] {
                assert!(
                    e.to_string().contains("device npu:2 needs a build with `--features npu`"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn ascend_visible_devices_renumber_the_npus() {
        assert!(check_visible(Device::Npu(5), 5, None).is_ok());
        assert!(check_visible(Device::Npu(1), 1, Some("4,6")).is_ok());
        let e = check_visible(Device::Npu(2), 2, Some("4,6")).unwrap_err().to_string();
        assert!(e.contains("ASCEND_RT_VISIBLE_DEVICES=4,6 makes 2 device(s) visible"), "{e}");
    }

    #[test]
    fn cpu_moves_tensors_and_var_stores() {
        let d = Device::Cpu;
        d.init().unwrap();
        let vs = VarStore::new(tch::Device::Cpu);
        let w = vs.root().randn_standard("w", &[2, 3]);
        let mut vs = vs;
        d.move_vars(&mut vs).unwrap();
        assert_eq!(vs.variables()["w"].device(), tch::Device::Cpu);
        assert!(vs.variables()["w"].equal(&w));
        let moved = d.to(&w).unwrap();
        assert!(moved.equal(&w));
        d.synchronize().unwrap();
    }
}
