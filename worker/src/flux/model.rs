//! `FluxTransformer2DModel` in tch (MODELS.md §1.3), variable names equal to the diffusers
//! keys so that `transformer/` shards load by name.
//!
//! Dtypes are explicit (tch has no bf16 autocast): the activations run in
//! [`FluxTransformer::compute_kind`]; a weight stored in another dtype (f32 master weights under
//! a bf16 forward) is cast at use, so gradients still reach the f32 masters. RoPE tables, the
//! timestep sinusoid and the RoPE rotation are computed in f32, as in diffusers.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::checkpoint::{Block, BlockWeights, Resident, first_single};
use super::config::FluxConfig;
use super::error::{ModelError, Result};
use super::lora::{self, LoraAdapter, LoraSpec};

/// Norm epsilon of every LayerNorm and QK-RMSNorm in FLUX.
const EPS: f64 = 1e-6;
/// RoPE base.
const THETA: f64 = 10_000.0;
/// Width of the timestep / guidance sinusoid (hard-wired in diffusers and BFL).
const TIME_DIM: i64 = 256;

/// Casts `w` to `kind` only when it differs (a no-op view otherwise).
fn cast(w: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(if w.kind() == kind { w.shallow_clone() } else { w.f_to_kind(kind)? })
}

/// A `Linear` whose weight is `[out, in]`, as PyTorch stores it, with an optional LoRA adapter.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
    /// The module path (`transformer_blocks.0.attn.to_q`): the name PEFT targets and keys by.
    pub name: String,
    /// Added to the output when attached ([`FluxTransformer::attach_lora`]).
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Zero-initialised `in → out` variables under `p` (load weights afterwards).
    pub(crate) fn new(p: nn::Path<'_>, i: i64, o: i64) -> Self {
        Self {
            weight: p.var("weight", &[o, i], Init::Const(0.)),
            bias: p.var("bias", &[o], Init::Const(0.)),
            name: p.components().collect::<Vec<_>>().join("."),
            lora: None,
        }
    }

    /// `x·Wᵀ + b` (+ the LoRA update) in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        let y = x.f_linear(&cast(&self.weight, k)?, Some(&cast(&self.bias, k)?))?;
        match &self.lora {
            Some(lora) => Ok(y.f_add(&lora.forward(x)?)?),
            None => Ok(y),
        }
    }
}

/// `Linear → SiLU → Linear` (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`).
#[derive(Debug)]
struct Mlp2 {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp2 {
    fn new(p: nn::Path<'_>, i: i64, d: i64) -> Self {
        Self {
            linear_1: Linear::new(&p / "linear_1", i, d),
            linear_2: Linear::new(&p / "linear_2", d, d),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.f_silu()?)
    }
}

/// `Linear(d → 4d) → GELU(tanh) → Linear(4d → d)` (diffusers `FeedForward`, keys `net.0.proj`, `net.2`).
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(p: nn::Path<'_>, d: i64, h: i64) -> Self {
        Self {
            proj: Linear::new(&p / "net" / 0 / "proj", d, h),
            out: Linear::new(&p / "net" / 2, h, d),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward(x)?.f_gelu("tanh")?)
    }
}

/// Per-head RMSNorm over the last dim, with a learned scale.
fn rms(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let d = x.size().last().copied().unwrap_or(0);
    Ok(x.f_rms_norm([d], Some(&cast(w, x.kind())?), EPS)?)
}

/// LayerNorm without affine parameters over the last dim.
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let d = x.size().last().copied().unwrap_or(0);
    Ok(x.f_layer_norm([d], None::<Tensor>, None::<Tensor>, EPS, true)?)
}

/// `LN(x)·(1 + scale) + shift`, with per-sample `scale`/`shift` of shape `[B, d]`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let d = x.size().last().copied().unwrap_or(0);
    if x.size()[0] == 1 {
        // One sample (the rollout's and the update's batch): the modulation is a per-feature
        // affine, which layer_norm applies in its own pass, forward and backward, instead of
        // two more full-size kernels each way.
        let w = scale.f_reshape([d])? + 1.0;
        return Ok(x.f_layer_norm([d], Some(&w), Some(&shift.f_reshape([d])?), EPS, true)?);
    }
    Ok(shift.f_unsqueeze(1)?.f_addcmul(&layer_norm(x)?, &(scale.f_unsqueeze(1)? + 1.0))?)
}

/// `x + gate · y`, the blocks' gated residual, in one kernel.
fn gated(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(x.f_addcmul(&gate.f_unsqueeze(1)?, y)?)
}

/// The RoPE table: cos and sin, each `[L, head_dim]` f32, every angle repeated for its pair.
#[derive(Debug)]
pub struct Rope {
    /// `cos`, viewed as `[1, L, 1, D]`.
    pub cos: Tensor,
    /// `sin` with the rotation's sign folded in (−sin at even dims, +sin at odd), viewed as
    /// `[1, L, 1, D]`.
    pub sin: Tensor,
}

impl Rope {
    /// Builds the table for `ids` (`[L, n_axes]`, any float kind, any device). Angles are
    /// computed on the host in f64 (diffusers does the same on CPU/CUDA) and moved to `ids`'
    /// device as f32, so devices without f64 (Ascend) run the same code path.
    pub fn new(ids: &Tensor, axes: &[i64]) -> Result<Self> {
        let size = ids.size();
        if size.len() != 2 || size[1] != axes.len() as i64 {
            return Err(ModelError::Input(format!(
                "position ids must be [L, {}], got {size:?}",
                axes.len()
            )));
        }
        let pos =
            ids.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Double)?;
        let mut cos = Vec::with_capacity(axes.len());
        let mut sin = Vec::with_capacity(axes.len());
        for (a, &dim) in axes.iter().enumerate() {
            let j = Tensor::f_arange_start_step(0, dim, 2, (Kind::Double, tch::Device::Cpu))?;
            let freqs = Tensor::f_pow_scalar(THETA, &(j / dim as f64))?.f_reciprocal()?;
            let angles = pos.f_select(1, a as i64)?.f_outer(&freqs)?;
            cos.push(
                angles.f_cos()?.f_repeat_interleave_self_int(2, 1, None)?.f_to_kind(Kind::Float)?,
            );
            let signs = Tensor::from_slice(&[-1f64, 1.]).f_repeat([dim / 2])?;
            sin.push(
                (angles.f_sin()?.f_repeat_interleave_self_int(2, 1, None)? * signs)
                    .f_to_kind(Kind::Float)?,
            );
        }
        let anchor = f32_anchor(ids)?;
        let view = |parts: &[Tensor]| -> Result<Tensor> {
            let t = Tensor::f_cat(parts, 1)?.f_to_other(&anchor, false, false)?;
            Ok(t.f_unsqueeze(0)?.f_unsqueeze(2)?)
        };
        Ok(Self { cos: view(&cos)?, sin: view(&sin)? })
    }

    /// Rotates adjacent pairs (dims 2i, 2i+1) of `x` `[B, L, H, D]` in f32, casts back:
    /// `(re, im) → (re·cos − im·sin, im·cos + re·sin)`, as `x·cos + swap(x)·±sin` in three
    /// kernels (the negation lives in the table).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.size();
        let x32 = x.f_to_kind(Kind::Float)?;
        let swapped = x32
            .f_reshape([s[0], s[1], s[2], s[3] / 2, 2])?
            .f_flip([-1])?
            .f_reshape(s.as_slice())?;
        let out = x32.f_mul(&self.cos)? + swapped.f_mul(&self.sin)?;
        Ok(out.f_to_kind(x.kind())?)
    }
}

/// A one-element f32 tensor on `like`'s device: the target of `to_other`, so host-built tables
/// reach any device (including ones `tch::Device` cannot name, such as Ascend NPUs).
fn f32_anchor(like: &Tensor) -> Result<Tensor> {
    Ok(like.f_flatten(0, -1)?.f_narrow(0, 0, 1)?.f_to_kind(Kind::Float)?)
}

/// The 256-wide `[cos, sin]` sinusoid of `t` (already ×1000), computed in f32.
fn sinusoid(t: &Tensor) -> Result<Tensor> {
    let half = TIME_DIM / 2;
    let ex = (Tensor::f_arange(half, (Kind::Float, tch::Device::Cpu))? * (-(10_000f64).ln()))
        / half as f64;
    let freqs = ex.f_exp()?.f_to_other(&f32_anchor(t)?, false, false)?;
    let a = t.f_to_kind(Kind::Float)?.f_unsqueeze(1)?.f_mul(&freqs.f_unsqueeze(0)?)?;
    Ok(Tensor::f_cat(&[a.f_cos()?, a.f_sin()?], -1)?)
}

/// Joint attention over `[q; k; v]` of shape `[B, L, H, D]`: RoPE, SDPA, back to `[B, L, H·D]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let q = rope.apply(q)?.f_transpose(1, 2)?;
    let k = rope.apply(k)?.f_transpose(1, 2)?;
    let v = v.f_transpose(1, 2)?;
    let o = crate::attention::attention(&q, &k, &v)?;
    Ok(o.f_transpose(1, 2)?.f_flatten(2, 3)?)
}

/// The q/k/v projections of one stream plus their QK-RMSNorm scales.
#[derive(Debug)]
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
}

impl Qkv {
    fn project(&self, x: &Tensor, head_dim: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let split = |t: Tensor| t.f_unflatten(-1, [-1, head_dim]);
        let q = rms(&split(self.q.forward(x)?)?, &self.norm_q)?;
        let k = rms(&split(self.k.forward(x)?)?, &self.norm_k)?;
        let v = split(self.v.forward(x)?)?;
        Ok((q, k, v))
    }
}

/// A double-stream block (`transformer_blocks.{i}`).
#[derive(Debug)]
pub struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    head_dim: i64,
}

impl DoubleBlock {
    fn new(p: nn::Path<'_>, cfg: &FluxConfig) -> Self {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let a = &p / "attn";
        let l = |n: &str| Linear::new(&a / n, d, d);
        Self {
            norm1: Linear::new(&p / "norm1" / "linear", d, 6 * d),
            norm1_context: Linear::new(&p / "norm1_context" / "linear", d, 6 * d),
            img: Qkv {
                q: l("to_q"),
                k: l("to_k"),
                v: l("to_v"),
                norm_q: (&a / "norm_q").var("weight", &[hd], Init::Const(1.)),
                norm_k: (&a / "norm_k").var("weight", &[hd], Init::Const(1.)),
            },
            txt: Qkv {
                q: l("add_q_proj"),
                k: l("add_k_proj"),
                v: l("add_v_proj"),
                norm_q: (&a / "norm_added_q").var("weight", &[hd], Init::Const(1.)),
                norm_k: (&a / "norm_added_k").var("weight", &[hd], Init::Const(1.)),
            },
            to_out: Linear::new(&a / "to_out" / 0, d, d),
            to_add_out: l("to_add_out"),
            ff: FeedForward::new(&p / "ff", d, cfg.mlp_hidden()),
            ff_context: FeedForward::new(&p / "ff_context", d, cfg.mlp_hidden()),
            head_dim: hd,
        }
    }

    /// `(x, c) → (x', c')` for image tokens `x` `[B, N, d]` and text tokens `c` `[B, T, d]`.
    pub fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let silu = temb.f_silu()?;
        let m = self.norm1.forward(&silu)?.f_chunk(6, 1)?;
        let mc = self.norm1_context.forward(&silu)?.f_chunk(6, 1)?;
        // Chunk order: shift1, scale1, gate1, shift2, scale2, gate2.
        let xn = modulate(x, &m[0], &m[1])?;
        let cn = modulate(c, &mc[0], &mc[1])?;
        let (q, k, v) = self.img.project(&xn, self.head_dim)?;
        let (cq, ck, cv) = self.txt.project(&cn, self.head_dim)?;
        let q = Tensor::f_cat(&[cq, q], 1)?;
        let k = Tensor::f_cat(&[ck, k], 1)?;
        let v = Tensor::f_cat(&[cv, v], 1)?;
        let o = attention(&q, &k, &v, rope)?;
        let t = c.size()[1];
        let ctx_attn = o.f_narrow(1, 0, t)?;
        let img_attn = o.f_narrow(1, t, o.size()[1] - t)?;
        let img_attn = self.to_out.forward(&img_attn.f_contiguous()?)?;
        let ctx_attn = self.to_add_out.forward(&ctx_attn.f_contiguous()?)?;

        let x = gated(x, &m[2], &img_attn)?;
        let ff = self.ff.forward(&modulate(&x, &m[3], &m[4])?)?;
        let x = gated(&x, &m[5], &ff)?;

        let c = gated(c, &mc[2], &ctx_attn)?;
        let ff = self.ff_context.forward(&modulate(&c, &mc[3], &mc[4])?)?;
        let c = gated(&c, &mc[5], &ff)?;
        Ok((x, c))
    }
}

/// A single-stream block (`single_transformer_blocks.{i}`) on `h = [text; image]`.
#[derive(Debug)]
pub struct SingleBlock {
    norm: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    head_dim: i64,
}

impl SingleBlock {
    fn new(p: nn::Path<'_>, cfg: &FluxConfig) -> Self {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let a = &p / "attn";
        Self {
            norm: Linear::new(&p / "norm" / "linear", d, 3 * d),
            qkv: Qkv {
                q: Linear::new(&a / "to_q", d, d),
                k: Linear::new(&a / "to_k", d, d),
                v: Linear::new(&a / "to_v", d, d),
                norm_q: (&a / "norm_q").var("weight", &[hd], Init::Const(1.)),
                norm_k: (&a / "norm_k").var("weight", &[hd], Init::Const(1.)),
            },
            proj_mlp: Linear::new(&p / "proj_mlp", d, cfg.mlp_hidden()),
            proj_out: Linear::new(&p / "proj_out", d + cfg.mlp_hidden(), d),
            head_dim: hd,
        }
    }

    /// `h → h'` for the joint sequence `h` `[B, T + N, d]`.
    pub fn forward(&self, h: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        // Chunk order: shift, scale, gate.
        let m = self.norm.forward(&temb.f_silu()?)?.f_chunk(3, 1)?;
        let hn = modulate(h, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&hn)?.f_gelu("tanh")?;
        let (q, k, v) = self.qkv.project(&hn, self.head_dim)?;
        let o = attention(&q, &k, &v, rope)?;
        let out = self.proj_out.forward(&Tensor::f_cat(&[o, mlp], 2)?)?;
        gated(h, &m[2], &out)
    }
}

/// The transformer's inputs (diffusers' `forward` argument names).
#[derive(Debug)]
pub struct FluxInputs<'a> {
    /// Packed latents `[B, N, in_channels]`.
    pub hidden_states: &'a Tensor,
    /// Text encoder states `[B, T, joint_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// Pooled text vector `[B, pooled_projection_dim]`.
    pub pooled_projections: &'a Tensor,
    /// σ in [0, 1], `[B]` (the model multiplies by 1000).
    pub timestep: &'a Tensor,
    /// Distilled guidance scale `[B]` or `[1]`; required iff `guidance_embeds`.
    pub guidance: Option<&'a Tensor>,
    /// Image position ids `[N, 3]`.
    pub img_ids: &'a Tensor,
    /// Text position ids `[T, 3]` (zeros).
    pub txt_ids: &'a Tensor,
}

/// What the blocks consume: embedded streams, the conditioning vector and the RoPE table.
#[derive(Debug)]
pub struct Stem {
    /// Image tokens `[B, N, d]`.
    pub x: Tensor,
    /// Text tokens `[B, T, d]`.
    pub c: Tensor,
    /// Conditioning vector `[B, d]`.
    pub temb: Tensor,
    /// RoPE over `[text; image]`.
    pub rope: Rope,
}

/// `FluxTransformer2DModel`.
#[derive(Debug)]
pub struct FluxTransformer {
    cfg: FluxConfig,
    kind: Kind,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp2,
    guidance_embedder: Option<Mlp2>,
    text_embedder: Mlp2,
    /// Double-stream blocks, in order.
    pub double_blocks: Vec<DoubleBlock>,
    /// Single-stream blocks, in order.
    pub single_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    /// Creates the variables under `p` (zeros; load weights afterwards) in the path's
    /// VarStore kind. `compute_kind` is the activation dtype of the forward pass.
    pub fn new(p: &nn::Path<'_>, cfg: &FluxConfig, compute_kind: Kind) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.inner_dim();
        let tte = p / "time_text_embed";
        Ok(Self {
            cfg: cfg.clone(),
            kind: compute_kind,
            x_embedder: Linear::new(p / "x_embedder", cfg.in_channels, d),
            context_embedder: Linear::new(p / "context_embedder", cfg.joint_attention_dim, d),
            timestep_embedder: Mlp2::new(&tte / "timestep_embedder", TIME_DIM, d),
            guidance_embedder: cfg
                .guidance_embeds
                .then(|| Mlp2::new(&tte / "guidance_embedder", TIME_DIM, d)),
            text_embedder: Mlp2::new(&tte / "text_embedder", cfg.pooled_projection_dim, d),
            double_blocks: (0..cfg.num_layers)
                .map(|i| DoubleBlock::new(p / "transformer_blocks" / i, cfg))
                .collect(),
            single_blocks: (0..cfg.num_single_layers)
                .map(|i| SingleBlock::new(p / "single_transformer_blocks" / i, cfg))
                .collect(),
            norm_out: Linear::new(p / "norm_out" / "linear", d, 2 * d),
            proj_out: Linear::new(p / "proj_out", d, cfg.out_channels()),
        })
    }

    /// The config.
    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// The activation dtype.
    pub fn compute_kind(&self) -> Kind {
        self.kind
    }

    /// Changes the activation dtype (weights are cast at use when they differ).
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.kind = kind;
    }

    /// Attaches LoRA adapters (PEFT semantics, see [`lora`]) to every `Linear` whose module
    /// path `spec` targets, with `lora_A` drawn from `seed` and `lora_B` zero, on the device of
    /// the base weights. Returns the trainable f32 tensors under their PEFT state-dict keys
    /// (`base_model.model.<module>.lora_A.weight`, `….lora_B.weight`); errors if a target
    /// matches no layer.
    ///
    /// The base weights keep their `requires_grad`: freeze them (`VarStore::freeze`, or load
    /// with a frozen [`WeightPolicy`](super::WeightPolicy)) so only the adapters train.
    pub fn attach_lora(&mut self, spec: &LoraSpec, seed: u64) -> Result<Vec<(String, Tensor)>> {
        let mut layers = vec![&mut self.x_embedder, &mut self.context_embedder];
        let embedders = [&mut self.timestep_embedder, &mut self.text_embedder];
        for m in embedders.into_iter().chain(self.guidance_embedder.as_mut()) {
            layers.extend([&mut m.linear_1, &mut m.linear_2]);
        }
        for b in &mut self.double_blocks {
            layers.extend([&mut b.norm1, &mut b.norm1_context]);
            layers.extend([&mut b.img.q, &mut b.img.k, &mut b.img.v]);
            layers.extend([&mut b.txt.q, &mut b.txt.k, &mut b.txt.v]);
            layers.extend([&mut b.to_out, &mut b.to_add_out]);
            layers.extend([
                &mut b.ff.proj,
                &mut b.ff.out,
                &mut b.ff_context.proj,
                &mut b.ff_context.out,
            ]);
        }
        for b in &mut self.single_blocks {
            layers.extend([&mut b.norm, &mut b.qkv.q, &mut b.qkv.k, &mut b.qkv.v]);
            layers.extend([&mut b.proj_mlp, &mut b.proj_out]);
        }
        layers.extend([&mut self.norm_out, &mut self.proj_out]);
        lora::attach(layers, spec, seed)
    }

    fn check_inputs(&self, i: &FluxInputs<'_>) -> Result<(i64, i64, i64)> {
        let bad = |m: String| Err(ModelError::Input(m));
        let hs = i.hidden_states.size();
        let es = i.encoder_hidden_states.size();
        let ps = i.pooled_projections.size();
        if hs.len() != 3 || hs[2] != self.cfg.in_channels {
            return bad(format!(
                "hidden_states must be [B, N, {}], got {hs:?}",
                self.cfg.in_channels
            ));
        }
        let (b, n) = (hs[0], hs[1]);
        if es.len() != 3 || es[0] != b || es[2] != self.cfg.joint_attention_dim {
            return bad(format!(
                "encoder_hidden_states must be [{b}, T, {}], got {es:?}",
                self.cfg.joint_attention_dim
            ));
        }
        if ps != [b, self.cfg.pooled_projection_dim] {
            return bad(format!(
                "pooled_projections must be [{b}, {}], got {ps:?}",
                self.cfg.pooled_projection_dim
            ));
        }
        let ts = i.timestep.size();
        if ts != [b] && ts != [1] {
            return bad(format!("timestep must be [{b}] or [1], got {ts:?}"));
        }
        match (i.guidance, self.guidance_embedder.is_some()) {
            (None, true) => return bad("this model has guidance_embeds: pass guidance".into()),
            (Some(g), _) if g.size() != [b] && g.size() != [1] => {
                return bad(format!("guidance must be [{b}] or [1], got {:?}", g.size()));
            }
            _ => {}
        }
        let axes = self.cfg.axes_dims_rope.len() as i64;
        if i.img_ids.size() != [n, axes] {
            return bad(format!("img_ids must be [{n}, {axes}], got {:?}", i.img_ids.size()));
        }
        if i.txt_ids.size() != [es[1], axes] {
            return bad(format!("txt_ids must be [{}, {axes}], got {:?}", es[1], i.txt_ids.size()));
        }
        Ok((b, n, es[1]))
    }

    /// Embeddings, conditioning vector and RoPE table (MODELS.md §1.3 steps 1-4).
    pub fn stem(&self, i: &FluxInputs<'_>) -> Result<Stem> {
        let (b, _, _) = self.check_inputs(i)?;
        let k = self.kind;
        let x = self.x_embedder.forward(&i.hidden_states.f_to_kind(k)?)?;
        let pooled = i.pooled_projections.f_to_kind(k)?;
        // diffusers rounds σ to the hidden dtype *before* ×1000 (bf16: 0.75 → 752/1000).
        let embed = |t: &Tensor, mlp: &Mlp2| -> Result<Tensor> {
            let t = (t.f_to_kind(k)? * 1000.0).f_expand([b], false)?;
            mlp.forward(&sinusoid(&t)?.f_to_kind(k)?)
        };
        let mut temb = embed(i.timestep, &self.timestep_embedder)?;
        if let (Some(g), Some(mlp)) = (i.guidance, &self.guidance_embedder) {
            temb = temb.f_add(&embed(g, mlp)?)?;
        }
        let temb = temb.f_add(&self.text_embedder.forward(&pooled)?)?;
        let c = self.context_embedder.forward(&i.encoder_hidden_states.f_to_kind(k)?)?;
        let ids = Tensor::f_cat(
            &[i.txt_ids.f_to_kind(Kind::Float)?, i.img_ids.f_to_kind(Kind::Float)?],
            0,
        )?;
        let rope = Rope::new(&ids, &self.cfg.axes_dims_rope)?;
        Ok(Stem { x, c, temb, rope })
    }

    /// The final AdaLN and projection on the image tokens (chunk order: scale, shift).
    pub fn head(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = self.norm_out.forward(&temb.f_silu()?.f_to_kind(x.kind())?)?.f_chunk(2, 1)?;
        self.proj_out.forward(&modulate(x, &m[1], &m[0])?)
    }

    /// The full forward pass → velocity `[B, N, out_channels]` in the compute dtype.
    pub fn forward(&self, i: &FluxInputs<'_>) -> Result<Tensor> {
        self.forward_with(i, &mut Resident)
    }

    /// [`Self::forward`] with each block's weights made present by `weights` just before it
    /// runs (the next block's may start coming then) and released after it: a sharded
    /// rollout's gather per forward. The stem's and the head's weights must be present.
    pub fn forward_with(
        &self,
        i: &FluxInputs<'_>,
        weights: &mut dyn BlockWeights,
    ) -> Result<Tensor> {
        let Stem { mut x, mut c, temb, rope } = self.stem(i)?;
        let (nd, ns) = (self.double_blocks.len(), self.single_blocks.len());
        for (k, blk) in self.double_blocks.iter().enumerate() {
            let next = if k + 1 < nd { Some(Block::Double(k + 1)) } else { first_single(ns) };
            weights.gather(Block::Double(k), next)?;
            (x, c) = blk.forward(&x, &c, &temb, &rope)?;
            weights.release(Block::Double(k))?;
        }
        let t = c.size()[1];
        let mut h = Tensor::f_cat(&[c, x], 1)?;
        for (k, blk) in self.single_blocks.iter().enumerate() {
            weights.gather(Block::Single(k), (k + 1 < ns).then_some(Block::Single(k + 1)))?;
            h = blk.forward(&h, &temb, &rope)?;
            weights.release(Block::Single(k))?;
        }
        let x = h.f_narrow(1, t, h.size()[1] - t)?;
        self.head(&x, &temb)
    }
}
