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
        Self::load_in(cfg, device, compute_kind(device))
    }

    /// [`Self::load`] with the forward in `kind`. A LoRA job's frozen base is stored in that
    /// kind (`WeightPolicy::FrozenBf16` on accelerators: 2 bytes per weight, 22 GiB for
    /// FLUX.1-dev instead of 44 in f32), the adapters in f32; a full fine-tune keeps f32
    /// masters, cast at use.
    pub fn load_in(cfg: &JobConfig, device: Device, kind: Kind) -> Result<Self, TrainError> {
        let frozen_base = cfg.lora.is_some() && kind != Kind::Float;
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
            // Loaded in its stored dtype as it is converted, never as f32 first.
            let policy =
                if frozen_base { WeightPolicy::Frozen(kind) } else { WeightPolicy::TrainableF32 };
            let flux = load_flux(root, tch::Device::Cpu, policy)?;
            let v = load_vae(root, tch::Device::Cpu, Kind::Float)?;
            (flux.vs, flux.model, v.vs, v.decoder)
        };
        model.set_compute_kind(kind);
        let lora = match &cfg.lora {
            None => Vec::new(),
            Some(l) => {
                // Only the adapters train: the base is frozen before they are added, and
                // stored in the forward's dtype.
                vs.freeze();
                if frozen_base {
                    vs.set_kind(kind);
                }
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

    /// With a bf16 forward (an accelerator's), a LoRA job's base is bf16 and frozen and its
    /// adapters f32; a backward reaches the adapters only.
    #[test]
    fn a_lora_base_is_frozen_in_the_forwards_dtype_and_only_the_adapters_train() {
        let cfg = JobConfig {
            pretrained_model_name_or_path: TINY.into(),
            lora: Some(dancegrpo_proto::LoraConfig {
                rank: 2,
                alpha: 2.0,
                target_modules: vec!["to_q".into(), "to_v".into()],
            }),
            ..JobConfig::default()
        };
        let p = Policy::load_in(&cfg, Device::Cpu, Kind::BFloat16).unwrap();
        let base = p.vs.variables();
        assert!(base.values().all(|t| t.kind() == Kind::BFloat16 && !t.requires_grad()));
        assert!(p.lora.iter().all(|(_, t)| t.kind() == Kind::Float && t.requires_grad()));
        // The same weights as the f32 base, rounded to bf16.
        let f32_base = Policy::load(&cfg, Device::Cpu).unwrap().vs.variables();
        for (name, t) in &base {
            assert!(t.equal(&f32_base[name].to_kind(Kind::BFloat16)), "{name}");
        }
        // A forward in bf16 and a backward to the adapters.
        let c = tiny_flux_config();
        let f = |shape: &[i64]| Tensor::ones(shape, (Kind::Float, tch::Device::Cpu)) * 0.1;
        let (h, e, pooled) = (f(&[1, 4, c.in_channels]), f(&[1, 3, 32]), f(&[1, 32]));
        let (t, g) = (Tensor::from_slice(&[0.5f32]), Tensor::from_slice(&[3.5f32]));
        let ids = crate::latents::img_ids(32, 32).unwrap();
        let txt = Tensor::zeros([3, 3], (Kind::Float, tch::Device::Cpu));
        let inputs = crate::flux::FluxInputs {
            hidden_states: &h,
            encoder_hidden_states: &e,
            pooled_projections: &pooled,
            timestep: &t,
            guidance: Some(&g),
            img_ids: &ids,
            txt_ids: &txt,
        };
        let v = p.model.forward(&inputs).unwrap();
        assert_eq!(v.kind(), Kind::BFloat16);
        v.to_kind(Kind::Float).square().sum(Kind::Float).backward();
        let a = p.lora.iter().find(|(n, _)| n.contains("lora_A")).unwrap();
        let b = p.lora.iter().find(|(n, _)| n.contains("lora_B")).unwrap();
        assert!(b.1.grad().defined() && b.1.grad().kind() == Kind::Float, "{}", a.0);
        assert!(base.values().all(|t| !t.grad().defined()), "the base got a gradient");
    }

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
