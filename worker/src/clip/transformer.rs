//! The pre-LN residual transformer both open_clip towers share (`transformer.resblocks.{i}`),
//! with `nn.MultiheadAttention`'s packed `in_proj` weight layout.

use tch::{Tensor, nn};

/// The MLP activation of a CLIP config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU, `nn.GELU()`: ViT-H-14.
    Gelu,
    /// `x·σ(1.702x)`, OpenAI's original CLIP weights.
    QuickGelu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            Activation::Gelu => x.f_gelu("none"),
            Activation::QuickGelu => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?),
        }
    }
}

/// Multi-head self-attention with PyTorch's `in_proj_weight` `[3w, w]` (rows q, k, v).
#[derive(Debug)]
struct Attention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path<'_>, width: i64, heads: i64) -> Self {
        Self {
            in_proj_weight: p.var("in_proj_weight", &[3 * width, width], nn::Init::Const(0.)),
            in_proj_bias: p.var("in_proj_bias", &[3 * width], nn::Init::Const(0.)),
            out_proj: nn::linear(&p / "out_proj", width, width, Default::default()),
            heads,
        }
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor, tch::TchError> {
        let (b, l, w) = x.size3()?;
        let qkv = x.f_linear(&self.in_proj_weight, Some(&self.in_proj_bias))?;
        // [B, L, 3, H, D] -> [3, B, H, L, D]: heads are consecutive slices of each projection.
        let qkv =
            qkv.f_reshape([b, l, 3, self.heads, w / self.heads])?.f_permute([2, 0, 3, 1, 4])?;
        let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
        // is_causal is the same additive −inf-above-the-diagonal mask open_clip builds.
        let o = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            causal,
            None,
            false,
        )?;
        let o = o.f_transpose(1, 2)?.f_reshape([b, l, w])?;
        o.f_linear(&self.out_proj.ws, self.out_proj.bs.as_ref())
    }
}

/// One `ResidualAttentionBlock`: `x + attn(ln_1(x))`, then `x + c_proj(act(c_fc(ln_2(x))))`.
#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    c_fc: nn::Linear,
    c_proj: nn::Linear,
}

/// open_clip's `LayerNorm` (eps 1e-5, affine `weight`/`bias`), applied with the fallible op
/// (tch's `Module` impl panics on bad input).
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    width: i64,
}

impl LayerNorm {
    pub(crate) fn new(p: nn::Path<'_>, width: i64) -> Self {
        Self {
            weight: p.var("weight", &[width], nn::Init::Const(1.)),
            bias: p.var("bias", &[width], nn::Init::Const(0.)),
            width,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        x.f_layer_norm([self.width], Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

fn layer_norm(p: nn::Path<'_>, width: i64) -> LayerNorm {
    LayerNorm::new(p, width)
}

fn apply_ln(ln: &LayerNorm, x: &Tensor) -> Result<Tensor, tch::TchError> {
    ln.forward(x)
}

fn apply_linear(l: &nn::Linear, x: &Tensor) -> Result<Tensor, tch::TchError> {
    x.f_linear(&l.ws, l.bs.as_ref())
}

/// A stack of residual attention blocks (`<prefix>.resblocks.{i}`).
#[derive(Debug)]
pub struct Transformer {
    blocks: Vec<Block>,
    act: Activation,
}

impl Transformer {
    /// Creates the vars under `p / "resblocks" / i`.
    pub fn new(
        p: nn::Path<'_>,
        width: i64,
        layers: i64,
        heads: i64,
        mlp_ratio: f64,
        act: Activation,
    ) -> Self {
        let hidden = (width as f64 * mlp_ratio) as i64;
        let blocks = (0..layers)
            .map(|i| {
                let b = &p / "resblocks" / i;
                Block {
                    ln_1: layer_norm(&b / "ln_1", width),
                    attn: Attention::new(&b / "attn", width, heads),
                    ln_2: layer_norm(&b / "ln_2", width),
                    c_fc: nn::linear(&b / "mlp" / "c_fc", width, hidden, Default::default()),
                    c_proj: nn::linear(&b / "mlp" / "c_proj", hidden, width, Default::default()),
                }
            })
            .collect();
        Self { blocks, act }
    }

    /// Runs `x` `[B, L, width]` through every block; `causal` masks future positions.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor, tch::TchError> {
        let mut x = x.shallow_clone();
        for b in &self.blocks {
            x = x.f_add(&b.attn.forward(&apply_ln(&b.ln_1, &x)?, causal)?)?;
            let h = apply_linear(&b.c_fc, &apply_ln(&b.ln_2, &x)?)?;
            x = x.f_add(&apply_linear(&b.c_proj, &self.act.apply(&h)?)?)?;
        }
        Ok(x)
    }
}
