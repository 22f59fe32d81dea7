//! The CLIP-L/14 text tower (FLUX.1-dev's `text_encoder/`, transformers' `CLIPTextModel`),
//! with the transformers weight names. FLUX uses only its `pooler_output`: the final norm's
//! output at the end-of-text token, with no projection.

use std::path::Path;

use tch::{Kind, Tensor};

use super::TextError;
use super::weights::Weights;

/// The fields of transformers' `CLIPTextConfig` the tower uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClipTextConfig {
    /// Rows of the token table.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Hidden width of the MLP.
    pub intermediate_size: i64,
    /// Encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Learned positions (77).
    pub max_position_embeddings: i64,
    /// `quick_gelu` (CLIP-L) or `gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id; 2 means the legacy configs, which pool at the largest id instead.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

impl ClipTextConfig {
    /// Reads `config.json` (a bare `CLIPTextConfig`, or a full `CLIPConfig` with `text_config`).
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let v: serde_json::Value = super::weights::read_config(path)?;
        let v = v.get("text_config").cloned().unwrap_or(v);
        let c: Self = serde_json::from_value(v)
            .map_err(|e| TextError::Config(format!("{}: {e}", path.display())))?;
        if !matches!(c.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(TextError::Config(format!(
                "{}: hidden_act {:?} is not supported (quick_gelu or gelu)",
                path.display(),
                c.hidden_act
            )));
        }
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(TextError::Config(format!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                path.display(),
                c.hidden_size,
                c.num_attention_heads
            )));
        }
        Ok(c)
    }
}

struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn new(w: &Weights, p: &str, out: i64, inp: i64) -> Result<Self, TextError> {
        Ok(Self {
            w: w.get(&format!("{p}.weight"), &[out, inp])?,
            b: w.get(&format!("{p}.bias"), &[out])?,
        })
    }
    fn fwd(&self, x: &Tensor) -> Result<Tensor, TextError> {
        Ok(x.f_linear(&self.w, Some(&self.b))?)
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn new(w: &Weights, p: &str, d: i64) -> Result<Self, TextError> {
        Ok(Self { w: w.get(&format!("{p}.weight"), &[d])?, b: w.get(&format!("{p}.bias"), &[d])? })
    }
    fn fwd(&self, x: &Tensor, eps: f64) -> Result<Tensor, TextError> {
        let d = self.w.size()[0];
        Ok(x.f_layer_norm([d], Some(&self.w), Some(&self.b), eps, true)?)
    }
}

struct Layer {
    ln1: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: Norm,
    fc1: Linear,
    fc2: Linear,
}

/// The text tower; `forward` gives `pooler_output`.
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    tok: Tensor,
    pos: Tensor,
    layers: Vec<Layer>,
    final_ln: Norm,
}

impl std::fmt::Debug for ClipTextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTextModel").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl ClipTextModel {
    /// Builds the tower from `w` (keys as in `CLIPTextModel.state_dict()`).
    pub fn new(cfg: ClipTextConfig, w: &Weights) -> Result<Self, TextError> {
        let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
        // FLUX.1-dev's file has the `text_model.` prefix; transformers 5 saves without it.
        let root = if w.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let e = format!("{root}embeddings");
        let tok = w.get(&format!("{e}.token_embedding.weight"), &[cfg.vocab_size, d])?;
        let pos =
            w.get(&format!("{e}.position_embedding.weight"), &[cfg.max_position_embeddings, d])?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("{root}encoder.layers.{i}");
            layers.push(Layer {
                ln1: Norm::new(w, &format!("{p}.layer_norm1"), d)?,
                q: Linear::new(w, &format!("{p}.self_attn.q_proj"), d, d)?,
                k: Linear::new(w, &format!("{p}.self_attn.k_proj"), d, d)?,
                v: Linear::new(w, &format!("{p}.self_attn.v_proj"), d, d)?,
                out: Linear::new(w, &format!("{p}.self_attn.out_proj"), d, d)?,
                ln2: Norm::new(w, &format!("{p}.layer_norm2"), d)?,
                fc1: Linear::new(w, &format!("{p}.mlp.fc1"), m, d)?,
                fc2: Linear::new(w, &format!("{p}.mlp.fc2"), d, m)?,
            });
        }
        let final_ln = Norm::new(w, &format!("{root}final_layer_norm"), d)?;
        Ok(Self { cfg, tok, pos, layers, final_ln })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// `pooler_output` `[B, hidden]` for token ids `[B, L]` (L ≤ 77), causal attention.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, TextError> {
        let (b, l) = ids.size2()?;
        if l > self.cfg.max_position_embeddings {
            return Err(TextError::Config(format!(
                "{l} CLIP tokens exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let (d, h) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let eps = self.cfg.layer_norm_eps;
        let mut x = Tensor::f_embedding(&self.tok, ids, -1, false, false)?
            .f_add(&self.pos.f_narrow(0, 0, l)?)?;
        let heads = |t: Tensor| -> Result<Tensor, TextError> {
            Ok(t.f_view([b, l, h, d / h])?.f_transpose(1, 2)?)
        };
        for layer in &self.layers {
            let y = layer.ln1.fwd(&x, eps)?;
            let (q, k, v) =
                (heads(layer.q.fwd(&y)?)?, heads(layer.k.fwd(&y)?)?, heads(layer.v.fwd(&y)?)?);
            let a = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<&Tensor>,
                0.0,
                true,
                None,
                false,
            )?;
            x = x.f_add(&layer.out.fwd(&a.f_transpose(1, 2)?.f_reshape([b, l, d])?)?)?;
            let y = layer.fc1.fwd(&layer.ln2.fwd(&x, eps)?)?;
            let y = if self.cfg.hidden_act == "quick_gelu" {
                y.f_mul(&y.f_mul_scalar(1.702)?.f_sigmoid()?)?
            } else {
                y.f_gelu("none")?
            };
            x = x.f_add(&layer.fc2.fwd(&y)?)?;
        }
        let x = self.final_ln.fwd(&x, eps)?;
        // transformers: legacy configs (eos id 2) pool at argmax(ids), i.e. the first of the
        // largest id, which is end-of-text in CLIP's vocab; newer ones at the first eos id.
        let at = if self.cfg.eos_token_id == 2 {
            ids.f_argmax(-1, false)?
        } else {
            ids.f_eq(self.cfg.eos_token_id)?.f_to_kind(Kind::Int)?.f_argmax(-1, false)?
        };
        let rows = Tensor::f_arange(b, (Kind::Int64, x.device()))?;
        Ok(x.f_index(&[Some(rows), Some(at)])?)
    }
}
