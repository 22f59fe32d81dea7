//! The GRPO training loop on one worker: the policy and its optimizer, rollout → decode →
//! reward → PPO-clip update with the gradient all-reduce, checkpoints and sample grids.

/// Checkpoints: the transformer in the diffusers layout, LoRA as a PEFT adapter, optimizer
/// state; written atomically.
pub mod checkpoint;
/// PNG grid of the current samples.
pub mod grid;
/// AdamW with f32 master weights and the global grad-norm clip.
pub mod optim;
