//! The GRPO training loop on one worker: the policy and its optimizer, rollout → decode →
//! reward → PPO-clip update with the gradient all-reduce, checkpoints and sample grids.
//!
//! Layout: [`policy`] (what is trained), [`step`] (the update math), [`trainer`] (one rank's
//! half of an iteration, on the compute thread), [`driver`] (the step protocol with the
//! coordinator), [`optim`], [`checkpoint`] and [`persist`] (saving and restoring), [`grid`].

/// Checkpoints: the transformer in the diffusers layout, LoRA as a PEFT adapter, optimizer
/// state; written atomically.
pub mod checkpoint;
/// The step protocol with the coordinator, driving the compute thread.
pub mod driver;
/// PNG grid of the current samples.
pub mod grid;
/// AdamW with f32 master weights, the learning-rate schedule and the global grad-norm clip.
pub mod optim;
/// What a checkpoint of the policy holds, and restoring it.
pub mod persist;
/// The trained transformer (a diffusers folder or the `tiny` preset) and the frozen decoder.
pub mod policy;
/// FSDP's FULL_SHARD: the training state cut into per-block slices over the ranks.
pub mod shard;
/// A sharded checkpoint's optimizer folder: each rank's slices and their layout.
pub mod shard_files;
/// The PPO-clip update: transition subsets, accumulation, all-reduce, clip, AdamW.
pub mod step;
/// One rank's rollout, scoring and update.
pub mod trainer;

pub use trainer::Trainer;

/// Everything that can stop training on a worker.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model (transformer, VAE).
    #[error(transparent)]
    Model(#[from] crate::flux::ModelError),
    /// The sampler.
    #[error(transparent)]
    Sampler(#[from] crate::sampler::SamplerError),
    /// The optimizer.
    #[error(transparent)]
    Optim(#[from] optim::OptimError),
    /// A checkpoint's files.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// A reward could not be built.
    #[error(transparent)]
    Reward(#[from] crate::reward::RewardError),
    /// The prompt dataset.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A collective failed (a dead peer, a timeout).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// The device layer.
    #[error("{0}")]
    Device(String),
    /// Files of a checkpoint or an output.
    #[error("{0}")]
    Io(String),
    /// Inconsistent state or input.
    #[error("{0}")]
    Invalid(String),
    /// The sample grid.
    #[error(transparent)]
    Grid(#[from] grid::GridError),
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl From<crate::error::Error> for TrainError {
    fn from(e: crate::error::Error) -> Self {
        TrainError::Device(e.to_string())
    }
}
