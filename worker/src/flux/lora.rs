//! LoRA adapters on the transformer's `Linear` layers, with PEFT's semantics and names, so an
//! adapter trained here loads with `PeftModel.from_pretrained` and vice versa.
//!
//! A targeted layer computes `y = x·Wᵀ + b + (alpha/r)·(x·Aᵀ)·Bᵀ` with `A` `[r, in]` and `B`
//! `[out, r]`, both f32 and trainable, cast at use to the activation dtype like the base
//! weights. `B` starts at zero, so attaching an adapter does not change the output.
//!
//! `A` is drawn on the host from a ChaCha stream keyed by (seed, module path): every rank gets
//! the same initial adapter without a broadcast, whatever the device, and adding or removing
//! a target does not change the other modules' draws.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::error::{ModelError, Result};
use super::model::Linear;

/// What to adapt and how strongly (PEFT's `r`, `lora_alpha`, `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The rank `r`.
    pub rank: i64,
    /// `lora_alpha`; the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// PEFT target names: a module is adapted when its path equals one of them or ends with
    /// `.` + one of them (`to_out.0` matches `transformer_blocks.3.attn.to_out.0`).
    pub target_modules: Vec<String>,
}

impl LoraSpec {
    /// DanceGRPO's `train_grpo_flux_lora.py`: r = 128, alpha = 256 on the attention
    /// projections (MODELS.md §1.7).
    pub fn dance_grpo() -> Self {
        Self {
            rank: 128,
            alpha: 256.0,
            target_modules: ["to_k", "to_q", "to_v", "to_out.0"].map(String::from).to_vec(),
        }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether `module` (a diffusers module path) is adapted.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| target_matches(module, t))
    }

    fn validate(&self) -> Result<()> {
        if self.rank <= 0 || !self.alpha.is_finite() || self.target_modules.is_empty() {
            return Err(ModelError::Config(format!(
                "LoRA needs rank > 0, a finite alpha and at least one target module, got \
                 rank {}, alpha {}, targets {:?}",
                self.rank, self.alpha, self.target_modules
            )));
        }
        Ok(())
    }
}

/// PEFT's rule for a list of target names: the whole path, or its last dotted components.
fn target_matches(module: &str, target: &str) -> bool {
    module.strip_suffix(target).is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// The PEFT state-dict key of `module`'s `lora_A` (`which = "lora_A"`) or `lora_B` weight.
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// One layer's adapter.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `lora_A` `[r, in]`, f32.
    pub a: Tensor,
    /// `lora_B` `[out, r]`, f32.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
}

impl LoraAdapter {
    /// The update `(alpha/r)·(x·Aᵀ)·Bᵀ` in `x`'s dtype (PEFT's order: scale last).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        let cast = |w: &Tensor| -> Result<Tensor> {
            Ok(if w.kind() == k { w.shallow_clone() } else { w.f_to_kind(k)? })
        };
        Ok(x.f_linear(&cast(&self.a)?, None::<Tensor>)?
            .f_linear(&cast(&self.b)?, None::<Tensor>)?
            .f_mul_scalar(self.scale)?)
    }
}

/// FNV-1a: a hash of the module path that is the same in every build and on every host.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// PEFT's default `lora_A` init, `kaiming_uniform_(a=√5)`: U(−1/√in, 1/√in).
fn init_a(module: &str, rank: i64, fan_in: i64, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(module));
    let bound = (1.0 / (fan_in as f64).sqrt()) as f32;
    let v: Vec<f32> = (0..rank * fan_in).map(|_| rng.gen_range(-bound..bound)).collect();
    Ok(Tensor::f_from_slice(&v)?.f_view([rank, fan_in])?)
}

/// Attaches an adapter to every layer of `layers` that `spec` targets. Returns the new
/// trainable tensors under their PEFT keys, in `layers` order.
pub(crate) fn attach(
    layers: Vec<&mut Linear>,
    spec: &LoraSpec,
    seed: u64,
) -> Result<Vec<(String, Tensor)>> {
    spec.validate()?;
    for t in &spec.target_modules {
        if !layers.iter().any(|l| target_matches(&l.name, t)) {
            return Err(ModelError::Config(format!(
                "LoRA target module {t:?} matches no Linear layer of the transformer"
            )));
        }
    }
    let mut out = Vec::new();
    for layer in layers.into_iter().filter(|l| spec.targets(&l.name)) {
        if layer.lora.is_some() {
            return Err(ModelError::Config(format!("{} already has a LoRA adapter", layer.name)));
        }
        let size = layer.weight.size();
        let (fan_out, fan_in) = (size[0], size[1]);
        // A one-element f32 copy of the weight is the target of `to_other`: it reaches the
        // weight's device even where `tch::Device` cannot name it (Ascend).
        let anchor = layer.weight.f_flatten(0, -1)?.f_narrow(0, 0, 1)?.f_to_kind(Kind::Float)?;
        let on_device = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_to_other(&anchor, false, false)?.f_set_requires_grad(true)?)
        };
        let a = on_device(init_a(&layer.name, spec.rank, fan_in, seed)?)?;
        let b = on_device(Tensor::f_zeros([fan_out, spec.rank], (Kind::Float, tch::Device::Cpu))?)?;
        out.push((peft_key(&layer.name, "lora_A"), a.shallow_clone()));
        out.push((peft_key(&layer.name, "lora_B"), b.shallow_clone()));
        layer.lora = Some(LoraAdapter { a, b, scale: spec.scale() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_matching_follows_peft() {
        let m = "transformer_blocks.0.attn.to_out.0";
        assert!(target_matches(m, "to_out.0"));
        assert!(target_matches(m, m));
        assert!(!target_matches(m, "out.0"));
        assert!(!target_matches("transformer_blocks.0.attn.to_add_out", "to_out.0"));
        assert!(target_matches("single_transformer_blocks.1.attn.to_k", "to_k"));
        assert!(!target_matches("transformer_blocks.0.attn.add_k_proj", "to_k"));
    }

    #[test]
    fn init_is_seeded_per_module_and_bounded() {
        let a = init_a("x.to_q", 4, 16, 7).unwrap();
        assert!(a.equal(&init_a("x.to_q", 4, 16, 7).unwrap()));
        assert!(!a.equal(&init_a("x.to_k", 4, 16, 7).unwrap()));
        assert!(!a.equal(&init_a("x.to_q", 4, 16, 8).unwrap()));
        assert!(a.abs().max().double_value(&[]) <= 0.25);
    }
}
