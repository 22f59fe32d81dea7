//! The policy being trained and the frozen decoder next to it: built from a diffusers folder
//! (`transformer/` + `vae/`), or from the built-in `tiny` preset (a FLUX-shaped model small
//! enough for 2 CPU cores, seeded random weights, for the demo and the tests).
//!
//! Trainable weights are f32 masters; the forward runs in bf16 on accelerators and in f32 on
//! the CPU (where bf16 matmuls are slow and the tests want exact arithmetic).

use std::path::Path;

use dancegrpo_proto::JobConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::TrainError;
use crate::device::Device;
use crate::flux::lora::LoraSpec;
use crate::flux::{FluxConfig, FluxTransformer, WeightPolicy, load_flux};
use crate::vae::{VaeConfig, VaeDecoder, load_vae};

/// Name of the built-in preset.
pub const TINY: &str = "tiny";

/// Seed of the `tiny` preset's weights; fixed, so every rank and every run starts equal.
const TINY_SEED: u64 = 0x7D15_C0DE;

/// The transformer of the `tiny` preset: 2 + 2 blocks, width 32, text width 32 (the tiny text
/// encoders of `tests/golden/text/model`).
pub fn tiny_flux_config() -> FluxConfig {
    FluxConfig {
        num_layers: 2,
        num_single_layers: 2,
        attention_head_dim: 16,
        num_attention_heads: 2,
        joint_attention_dim: 32,
        pooled_projection_dim: 32,
        guidance_embeds: true,
        axes_dims_rope: vec![4, 6, 6],
        ..FluxConfig::default()
    }
}

/// The VAE decoder of the `tiny` preset (×8 upsampling like FLUX's, 16 latent channels).
pub fn tiny_vae_config() -> VaeConfig {
    VaeConfig {
        block_out_channels: vec![8, 16, 16, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        ..VaeConfig::default()
    }
}

/// The trained transformer, its optional LoRA adapters, and the frozen VAE decoder.
#[derive(Debug)]
pub struct Policy {
    /// Owns the transformer's base weights (diffusers names).
    pub vs: VarStore,
    /// The transformer.
    pub model: FluxTransformer,
    /// LoRA adapters with their PEFT keys; empty for a full fine-tune.
    pub lora: Vec<(String, Tensor)>,
    /// Owns the decoder's weights.
    pub vae_vs: VarStore,
    /// The decoder.
    pub vae: VaeDecoder,
}

/// Activation dtype on `device`.
pub fn compute_kind(device: Device) -> Kind {
    if matches!(device, Device::Cpu) { Kind::Float } else { Kind::BFloat16 }
}

impl Policy {
    /// Builds the policy of `cfg` on `device`.
    pub fn load(cfg: &JobConfig, device: Device) -> Result<Self, TrainError> {
        let kind = compute_kind(device);
        let (mut vs, mut model, mut vae_vs, vae) = if cfg.pretrained_model_name_or_path == TINY {
            let mut vs = VarStore::new(tch::Device::Cpu);
            let model = FluxTransformer::new(&vs.root(), &tiny_flux_config(), Kind::Float)?;
            seeded_init(&mut vs, TINY_SEED);
            let mut vae_vs = VarStore::new(tch::Device::Cpu);
            let vae = VaeDecoder::new(&vae_vs.root(), &tiny_vae_config());
            seeded_init(&mut vae_vs, TINY_SEED ^ 1);
            vae_vs.freeze();
            (vs, model, vae_vs, vae)
        } else {
            let root = Path::new(&cfg.pretrained_model_name_or_path);
            let flux = load_flux(root, tch::Device::Cpu, WeightPolicy::TrainableF32)?;
            let v = load_vae(root, tch::Device::Cpu, Kind::Float)?;
            (flux.vs, flux.model, v.vs, v.decoder)
        };
        model.set_compute_kind(kind);
        let lora = match &cfg.lora {
            None => Vec::new(),
            Some(l) => {
                // Only the adapters train: the base is frozen before they are added.
                vs.freeze();
                let spec = LoraSpec {
                    rank: i64::from(l.rank),
                    alpha: l.alpha,
                    target_modules: l.target_modules.clone(),
                };
                model.attach_lora(&spec, cfg.seed)?
            }
        };
        // The decoder computes in its weights' dtype.
        vae_vs.set_kind(kind);
        device.move_vars(&mut vs)?;
        device.move_vars(&mut vae_vs)?;
        let mut lora = lora;
        let mut tensors: Vec<Tensor> = lora.iter().map(|(_, t)| t.shallow_clone()).collect();
        device.move_tensors(&mut tensors)?;
        for ((_, t), moved) in lora.iter_mut().zip(tensors) {
            *t = moved;
        }
        Ok(Self { vs, model, lora, vae_vs, vae })
    }

    /// Frees every weight (transformer, adapters, decoder) in place: each variable, and every
    /// handle on it, becomes empty. A restore calls it before it loads the next policy, so
    /// that no process ever holds two models at once (FLUX.1-dev: 44 GiB each in f32).
    pub fn release(&mut self) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let vars = self.vs.variables().into_values().chain(self.vae_vs.variables().into_values());
        for mut t in vars.chain(self.lora.iter().map(|(_, t)| t.shallow_clone())) {
            let empty = t.f_new_empty([0], (t.kind(), t.device()))?;
            t.f_set_data(&empty)?;
        }
        Ok(())
    }

    /// The weights the optimizer updates, by name, in a fixed order (the all-reduce and the
    /// optimizer state depend on it): the adapters for LoRA, else every transformer weight.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        if !self.lora.is_empty() {
            return self.lora.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        }
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// FNV-1a of a variable name: a stable per-variable stream id.
fn name_hash(name: &str) -> u64 {
    name.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// PyTorch's default `Linear`/`Conv` init bound, U(±1/√fan_in), from a host stream per
/// variable name (so the weights never depend on the device or on creation order); norm
/// scales 1, biases 0.
fn seeded_init(vs: &mut VarStore, seed: u64) {
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vs.variables() {
        let size = var.size();
        let value = if size.len() == 1 {
            let fill = if name.ends_with("bias") { 0.0 } else { 1.0 };
            Tensor::full(size.as_slice(), fill, (Kind::Float, tch::Device::Cpu))
        } else {
            let fan_in: i64 = size[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(&name));
            let n: i64 = size.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
            Tensor::from_slice(&v).view(size.as_slice())
        };
        var.copy_(&value.to_kind(var.kind()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_policy_holds_no_weights_through_any_handle() {
        let cfg = JobConfig {
            pretrained_model_name_or_path: TINY.into(),
            lora: Some(dancegrpo_proto::LoraConfig {
                rank: 2,
                alpha: 2.0,
                target_modules: vec!["to_q".into()],
            }),
            ..JobConfig::default()
        };
        let mut p = Policy::load(&cfg, Device::Cpu).unwrap();
        let handles: Vec<Tensor> =
            p.vs.variables()
                .into_values()
                .chain(p.vae_vs.variables().into_values())
                .chain(p.lora.iter().map(|(_, t)| t.shallow_clone()))
                .collect();
        assert!(handles.iter().all(|t| t.numel() > 0));
        let adapters = p.lora.len();
        p.release().unwrap();
        assert!(adapters > 0 && handles.iter().all(|t| t.numel() == 0), "a weight survived");
    }
}
