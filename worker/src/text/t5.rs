//! The T5 v1.1 encoder (FLUX.1-dev's `text_encoder_2/`, `T5EncoderModel` in transformers),
//! with the transformers weight names.
//!
//! T5 differs from a textbook transformer in ways that matter for parity: RMS-style norms
//! with the variance in f32 and no bias, no 1/sqrt(d) scaling of the attention scores, and
//! one relative position bias (from block 0) added in every layer.

use std::path::Path;

use tch::{Kind, Tensor};

use super::TextError;
use super::weights::Weights;

/// The fields of transformers' `T5Config` the encoder uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct T5Config {
    /// Rows of the token table.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub d_model: i64,
    /// Width of one attention head.
    pub d_kv: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Hidden width of the feed-forward block.
    pub d_ff: i64,
    /// Encoder blocks.
    pub num_layers: i64,
    /// Relative position buckets (both directions together).
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: i64,
    /// Distance beyond which positions share the last bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: i64,
    /// Norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (v1.1, FLUX) or `relu` (the original T5).
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> i64 {
    32
}
fn default_max_distance() -> i64 {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl T5Config {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let c: Self = super::weights::read_config(path)?;
        if !matches!(c.feed_forward_proj.as_str(), "gated-gelu" | "relu") {
            return Err(TextError::Config(format!(
                "{}: feed_forward_proj {:?} is not supported (gated-gelu or relu)",
                path.display(),
                c.feed_forward_proj
            )));
        }
        Ok(c)
    }

    fn gated(&self) -> bool {
        self.feed_forward_proj == "gated-gelu"
    }
}

/// T5's norm: scale by the root mean square (computed in f32), no mean, no bias.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor, TextError> {
    let var = x.f_to_kind(Kind::Float)?.f_square()?.f_mean_dim(-1, true, None)?;
    let y = x.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?;
    // Like transformers: back to the weight's dtype (bf16 or f16 runs) before the scale.
    Ok(y.f_to_kind(w.kind())?.f_mul(w)?)
}

struct Block {
    ln0: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ln1: Tensor,
    wi_0: Tensor,
    wi_1: Option<Tensor>,
    wo: Tensor,
}

/// The encoder stack; `forward` gives `last_hidden_state`.
pub struct T5Encoder {
    cfg: T5Config,
    shared: Tensor,
    rel_bias: Tensor,
    blocks: Vec<Block>,
    final_ln: Tensor,
}

impl std::fmt::Debug for T5Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Encoder").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl T5Encoder {
    /// Builds the encoder from `w` (keys as in `T5EncoderModel.state_dict()`).
    pub fn new(cfg: T5Config, w: &Weights) -> Result<Self, TextError> {
        let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let shared =
            w.get_any(&["shared.weight", "encoder.embed_tokens.weight"], &[cfg.vocab_size, d])?;
        let rel_bias = w.get(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[cfg.relative_attention_num_buckets, cfg.num_heads],
        )?;
        let mut blocks = Vec::new();
        for i in 0..cfg.num_layers {
            let a = format!("encoder.block.{i}.layer.0");
            let f = format!("encoder.block.{i}.layer.1");
            let (wi_0, wi_1) = if cfg.gated() {
                (
                    w.get(&format!("{f}.DenseReluDense.wi_0.weight"), &[ff, d])?,
                    Some(w.get(&format!("{f}.DenseReluDense.wi_1.weight"), &[ff, d])?),
                )
            } else {
                (w.get(&format!("{f}.DenseReluDense.wi.weight"), &[ff, d])?, None)
            };
            blocks.push(Block {
                ln0: w.get(&format!("{a}.layer_norm.weight"), &[d])?,
                q: w.get(&format!("{a}.SelfAttention.q.weight"), &[inner, d])?,
                k: w.get(&format!("{a}.SelfAttention.k.weight"), &[inner, d])?,
                v: w.get(&format!("{a}.SelfAttention.v.weight"), &[inner, d])?,
                o: w.get(&format!("{a}.SelfAttention.o.weight"), &[d, inner])?,
                ln1: w.get(&format!("{f}.layer_norm.weight"), &[d])?,
                wi_0,
                wi_1,
                wo: w.get(&format!("{f}.DenseReluDense.wo.weight"), &[d, ff])?,
            });
        }
        let final_ln = w.get("encoder.final_layer_norm.weight", &[d])?;
        Ok(Self { cfg, shared, rel_bias, blocks, final_ln })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// Bidirectional relative position buckets `[q, k]`: exact up to half the buckets of one
    /// direction, log-spaced up to `max_distance`, as transformers' `_relative_position_bucket`.
    fn buckets(&self, len: i64, device: tch::Device) -> Result<Tensor, TextError> {
        let pos = Tensor::f_arange(len, (Kind::Int64, device))?;
        let rel = pos.f_unsqueeze(0)?.f_sub(&pos.f_unsqueeze(1)?)?; // key - query
        let nb = self.cfg.relative_attention_num_buckets / 2;
        let base = rel.f_gt(0)?.f_to_kind(Kind::Int64)?.f_mul_scalar(nb)?;
        let rel = rel.f_abs()?;
        let max_exact = nb / 2;
        let is_small = rel.f_lt(max_exact)?;
        let large = rel
            .f_to_kind(Kind::Float)?
            .f_div_scalar(max_exact as f64)?
            .f_log()?
            .f_div_scalar(
                (self.cfg.relative_attention_max_distance as f64 / max_exact as f64).ln(),
            )?
            .f_mul_scalar((nb - max_exact) as f64)?
            .f_to_kind(Kind::Int64)?
            .f_add_scalar(max_exact)?
            .f_clamp_max(nb - 1)?;
        Ok(base.f_add(&rel.f_where_self(&is_small, &large)?)?)
    }

    /// `last_hidden_state` `[B, L, d_model]` for token ids `[B, L]`, with no attention mask
    /// (as FLUX's `encode_prompt` calls it: padding is encoded like any token).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, TextError> {
        let (b, l) = ids.size2()?;
        let (h, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let mut x = Tensor::f_embedding(&self.shared, ids, -1, false, false)?;
        let buckets = self.buckets(l, ids.device())?;
        // [q, k, H] -> [1, H, q, k], in the compute dtype, added to the raw scores.
        let bias = Tensor::f_embedding(&self.rel_bias, &buckets, -1, false, false)?
            .f_permute([2, 0, 1])?
            .f_unsqueeze(0)?;
        let heads = |t: Tensor| -> Result<Tensor, TextError> {
            Ok(t.f_view([b, l, h, dk])?.f_transpose(1, 2)?)
        };
        for blk in &self.blocks {
            let y = rms_norm(&x, &blk.ln0, self.cfg.layer_norm_epsilon)?;
            let q = heads(y.f_linear::<Tensor>(&blk.q, None)?)?;
            let k = heads(y.f_linear::<Tensor>(&blk.k, None)?)?;
            let v = heads(y.f_linear::<Tensor>(&blk.v, None)?)?;
            // T5 folds the 1/sqrt(d) into its init, so the scale is exactly 1.
            let a = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&bias),
                0.0,
                false,
                Some(1.0),
                false,
            )?;
            let a = a.f_transpose(1, 2)?.f_reshape([b, l, h * dk])?;
            x = x.f_add(&a.f_linear::<Tensor>(&blk.o, None)?)?;
            let y = rms_norm(&x, &blk.ln1, self.cfg.layer_norm_epsilon)?;
            let hidden = match &blk.wi_1 {
                Some(wi_1) => y
                    .f_linear::<Tensor>(&blk.wi_0, None)?
                    .f_gelu("tanh")?
                    .f_mul(&y.f_linear::<Tensor>(wi_1, None)?)?,
                None => y.f_linear::<Tensor>(&blk.wi_0, None)?.f_relu()?,
            };
            x = x.f_add(&hidden.f_linear::<Tensor>(&blk.wo, None)?)?;
        }
        rms_norm(&x, &self.final_ln, self.cfg.layer_norm_epsilon)
    }
}
