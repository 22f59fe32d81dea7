//! What a checkpoint holds of the policy and how it comes back:
//!
//! ```text
//! checkpoint-N/
//!   transformer/diffusion_pytorch_model.safetensors + config.json   (full fine-tune; diffusers)
//!   adapter_model.safetensors + adapter_config.json                  (LoRA; PEFT)
//!   optimizer.safetensors                                            (AdamW moments + step)
//!   (sharded jobs: transformer/ as diffusers shards, one per unit, bf16 by default, with
//!    its index; optimizer/ with each rank's f32 slices and layout.json instead of
//!    optimizer.safetensors; see `crate::train::shard_files`)
//!   trainer_state.json                                               (coordinator: cursor, step,
//!                                                                     reward history)
//!   rng_state.json                                                   (how the noise is keyed)
//! ```
//!
//! There is no RNG state to save beyond the seeds: every random draw (rollout noise, the
//! transitions trained) is keyed by (seed, prompt, member, step), so an iteration redone after
//! a resume draws exactly what it drew the first time.

use std::path::Path;

use dancegrpo_proto::JobConfig;
use tch::Tensor;

use super::TrainError;
use super::checkpoint;
use super::policy::Policy;
use crate::flux::Layout;
use crate::flux::load::{detect_layout, load_weights};
use crate::flux::lora::LoraSpec;

/// The optimizer state's file name.
pub const OPTIMIZER: &str = "optimizer.safetensors";

/// Writes the policy's trained weights into `dir` (the temporary checkpoint directory); a
/// sharded trainer writes its own (`crate::train::shard::Sharded::save`).
pub fn save_policy(dir: &Path, policy: &Policy, cfg: &JobConfig) -> Result<(), TrainError> {
    match &cfg.lora {
        Some(l) => {
            let spec = LoraSpec {
                rank: i64::from(l.rank),
                alpha: l.alpha,
                target_modules: l.target_modules.clone(),
            };
            checkpoint::save_lora_adapter(dir, &policy.lora, &spec)?
        }
        None => {
            let named: Vec<(String, Tensor)> = policy.trainable();
            checkpoint::save_transformer(dir, &named, policy.model.config())?;
        }
    }
    Ok(())
}

/// Writes `rng_state.json`: how the noise is keyed (there is no generator state to save).
pub fn save_rng(dir: &Path, cfg: &JobConfig) -> Result<(), TrainError> {
    let rng = serde_json::json!({
        "seed": cfg.seed,
        "sampler_seed": cfg.sampler_seed,
        "scheme": "ChaCha8 streams keyed by (seed, prompt, member, step); nothing else to restore",
    });
    std::fs::write(dir.join("rng_state.json"), rng.to_string())
        .map_err(|e| TrainError::Io(format!("rng_state.json: {e}")))
}

/// Loads a checkpoint's weights (or adapters) into a freshly built `policy`.
pub fn load_into(dir: &Path, policy: &mut Policy) -> Result<(), TrainError> {
    if policy.lora.is_empty() {
        // One file, or the shards of a sharded job's checkpoint with their index.
        let folder = dir.join("transformer");
        let layout = match detect_layout(&folder)? {
            l @ Layout::Diffusers(_) => l,
            Layout::Bfl(_) => {
                return Err(TrainError::Io(format!(
                    "{}: no diffusers transformer weights in this checkpoint",
                    folder.display()
                )));
            }
        };
        let cfg = policy.model.config().clone();
        load_weights(&policy.vs, &layout, &cfg)?;
    } else {
        let file = checkpoint::load_lora_adapter(dir)?;
        checkpoint::restore_named(
            &policy.lora,
            &file.tensors,
            &dir.join(checkpoint::ADAPTER_WEIGHTS),
        )?;
    }
    Ok(())
}
