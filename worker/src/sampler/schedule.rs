//! The σ schedule: `linspace(1, 0, S+1)` with the SD3 time shift, and the integer timesteps the
//! model sees.

use tch::{Device, Kind, Tensor};

use super::{Result, SamplerError};

/// σ_0 … σ_S and the quantised model timesteps of one rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `σ_i` for i = 0..=S, f32 (σ_0 = 1, σ_S = 0).
    pub sigmas: Vec<f32>,
    /// `int(σ_i·1000)` (truncated, computed in f32) for i < S.
    pub timesteps: Vec<i64>,
}

impl Schedule {
    /// `σ' = shift·t / (1 + (shift−1)·t)` on `t = linspace(1, 0, steps+1)`, all in f32 with
    /// libtorch's own `linspace` (its halfway-symmetric formula decides the last bits).
    pub fn new(steps: usize, shift: f64) -> Result<Self> {
        if steps == 0 || shift.is_nan() || shift <= 0.0 {
            return Err(SamplerError::Input(format!(
                "schedule needs steps ≥ 1 and shift > 0 (got {steps}, {shift})"
            )));
        }
        let t = Tensor::f_linspace(1.0, 0.0, steps as i64 + 1, (Kind::Float, Device::Cpu))?;
        let s = t.f_mul_scalar(shift)?.f_div(&(t.f_mul_scalar(shift - 1.0)? + 1.0))?;
        let sigmas = Vec::<f32>::try_from(&s)?;
        let timesteps = sigmas[..steps].iter().map(|&x| (x * 1000f32) as i64).collect();
        Ok(Self { sigmas, timesteps })
    }

    /// A schedule from explicit σ values (e.g. the reference's own, for the check command);
    /// σ must be finite, start ≤ 1, decrease strictly and end ≥ 0.
    pub fn from_sigmas(sigmas: Vec<f32>) -> Result<Self> {
        let ok = sigmas.len() >= 2
            && sigmas.iter().all(|s| s.is_finite() && (0.0..=1.0).contains(s))
            && sigmas.windows(2).all(|w| w[1] < w[0]);
        if !ok {
            return Err(SamplerError::Input(format!(
                "sigmas must be at least 2 strictly decreasing values in [0, 1], got {sigmas:?}"
            )));
        }
        let timesteps = sigmas[..sigmas.len() - 1].iter().map(|&x| (x * 1000f32) as i64).collect();
        Ok(Self { sigmas, timesteps })
    }

    /// Number of transitions S.
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The σ the transformer is called with at step `i`: `int(σ_i·1000)/1000` in f32.
    pub fn model_sigma(&self, i: usize) -> f32 {
        self.timesteps[i] as f32 / 1000f32
    }

    /// Checks that step `i` exists.
    pub fn check_step(&self, i: usize) -> Result<()> {
        if i >= self.steps() {
            return Err(SamplerError::Input(format!(
                "step index {i} out of range (S = {})",
                self.steps()
            )));
        }
        Ok(())
    }
}
