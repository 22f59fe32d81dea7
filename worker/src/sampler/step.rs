//! One SDE transition (ALGORITHM.md §2.4), in f32, with the reference's operation order.

use tch::{Kind, Tensor};

use super::schedule::Schedule;
use super::{Result, SamplerError};

/// How the next latent is obtained.
#[derive(Debug, Clone, Copy)]
pub enum Next<'a> {
    /// Sample it: `μ + s·noise` (rollout).
    Noise(&'a Tensor),
    /// A stored transition's next latent (training recomputation).
    Given(&'a Tensor),
}

/// The result of one transition.
#[derive(Debug)]
pub struct StepOut {
    /// The next latent `z'`.
    pub next: Tensor,
    /// The SDE mean μ.
    pub mean: Tensor,
    /// The x0 prediction `x − σ·v`.
    pub x0: Tensor,
    /// Per-sample log-prob `[B]`: mean over elements of `−(z' − μ)² / (2 s²)`.
    pub log_prob: Tensor,
    /// The SDE std `s = η·sqrt(σ − σ')`.
    pub std: f64,
}

/// One transition from `x` with velocity `v` at step `i`:
/// `μ = x + dσ·v − ½η²·score·dσ`, `score = −(x − (1−σ)·x̂0)/σ²`, `x̂0 = x − σ·v`, `dσ = σ' − σ`.
///
/// The log-prob is the per-element **mean** of `−(z' − μ)²/(2s²)` without the constant
/// `−log s − log √(2π)` (the reference commit drops it; it cancels in the PPO ratio). `z'` is
/// detached, so gradients flow only through μ, as in the reference. `v` and `x` are promoted
/// to f32.
pub fn sde_step(
    v: &Tensor,
    x: &Tensor,
    sched: &Schedule,
    i: usize,
    eta: f64,
    next: Next<'_>,
) -> Result<StepOut> {
    sched.check_step(i)?;
    if v.size() != x.size() || x.dim() < 2 {
        return Err(SamplerError::Input(format!(
            "v {:?} and x {:?} must have the same [B, ...] shape",
            v.size(),
            x.size()
        )));
    }
    let v = v.f_to_kind(Kind::Float)?;
    let x = x.f_to_kind(Kind::Float)?;
    let sigma = sched.sigmas[i];
    let sigma_next = sched.sigmas[i + 1];
    let dsigma = sigma_next - sigma;
    let std = eta * ((sigma - sigma_next) as f64).sqrt();

    let mean = x.f_add(&v.f_mul_scalar(dsigma as f64)?)?;
    let x0 = x.f_sub(&v.f_mul_scalar(sigma as f64)?)?;
    let score = x
        .f_sub(&x0.f_mul_scalar((1f32 - sigma) as f64)?)?
        .f_neg()?
        .f_div_scalar((sigma * sigma) as f64)?;
    let log_term = score.f_mul_scalar(-0.5 * eta * eta)?;
    let mean = mean.f_add(&log_term.f_mul_scalar(dsigma as f64)?)?;
    let next = match next {
        Next::Noise(n) => {
            if n.size() != mean.size() {
                return Err(SamplerError::Input(format!(
                    "noise {:?} must match latents {:?}",
                    n.size(),
                    mean.size()
                )));
            }
            mean.f_detach()?.f_add(&n.f_to_kind(Kind::Float)?.f_mul_scalar(std)?)?
        }
        Next::Given(z) => {
            if z.size() != mean.size() {
                return Err(SamplerError::Input(format!(
                    "next latent {:?} must match {:?}",
                    z.size(),
                    mean.size()
                )));
            }
            z.f_to_kind(Kind::Float)?
        }
    };
    let dims: Vec<i64> = (1..mean.dim() as i64).collect();
    let log_prob = next
        .f_detach()?
        .f_sub(&mean)?
        .f_square()?
        .f_neg()?
        .f_div_scalar(2.0 * std * std)?
        .f_mean_dim(dims.as_slice(), false, Kind::Float)?;
    Ok(StepOut { next, mean, x0, log_prob, std })
}
