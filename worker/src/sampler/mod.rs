//! The DanceGRPO flow-matching SDE sampler (ALGORITHM.md §2), exactly as the reference:
//! the shifted σ schedule, timesteps quantised to 1/1000 for the model while the SDE uses the
//! exact σ, the SDE mean / std / x0 prediction, the per-element-mean Gaussian log-prob, the
//! rollout that stores what training needs, and the log-prob recomputation with gradient.
//!
//! Layout: [`schedule`] (σ and timesteps), [`step`] (one transition), [`noise`] (seeded host
//! noise), [`rollout`] (trajectories and recomputation).

/// Seeded noise, reproducible from (seed, prompt, member).
pub mod noise;
/// Trajectories for training and the log-prob recomputation.
pub mod rollout;
/// The σ schedule.
pub mod schedule;
/// One SDE transition and its log-probability.
pub mod step;

pub use noise::NoiseKey;

/// What can go wrong in the sampler.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// Inputs of the wrong shape, length or value.
    #[error("bad input: {0}")]
    Input(String),
    /// The transformer's forward failed.
    #[error(transparent)]
    Model(#[from] crate::flux::ModelError),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The sampler's result.
pub type Result<T, E = SamplerError> = std::result::Result<T, E>;
pub use rollout::{Conditioning, Trajectory, recompute_log_prob, rollout, rollout_with};
pub use schedule::Schedule;
pub use step::{Next, StepOut, sde_step};
