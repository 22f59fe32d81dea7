//! The open_clip `CLIP` model (plain ViT image tower + text tower at the top level), with
//! variables named exactly like open_clip's state-dict keys, so checkpoints load without
//! renaming.

use tch::{Device, Kind, Tensor, nn};

use super::ClipError;
use super::config::ClipConfig;
use super::transformer::{Activation, LayerNorm, Transformer};

/// The image tower (`visual.*`): patchify, class token, `ln_pre`, blocks, CLS, `ln_post`, `proj`.
#[derive(Debug)]
struct Vision {
    conv1: nn::Conv2D,
    patch: i64,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Tensor,
}

/// The text tower (top-level keys): tokens + positions, causal blocks, `ln_final`, EOT, projection.
#[derive(Debug)]
struct Text {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
}

/// Where the text tower takes each row's pooled (end-of-text) state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextPool {
    /// At the row's largest id (open_clip's `argmax`; transformers for the legacy
    /// `eos_token_id` 2): the EOT token, the largest id of the CLIP vocabulary.
    Argmax,
    /// At the row's first occurrence of this id (transformers' `eos_token_id`); position 0 when
    /// the row has none, as `(ids == eos).argmax()` gives.
    FirstId(i64),
}

/// An open_clip CLIP model in a [`nn::VarStore`] whose variable names are the state-dict keys.
#[derive(Debug)]
pub struct ClipModel {
    cfg: ClipConfig,
    vs: nn::VarStore,
    visual: Vision,
    text: Text,
    logit_scale: Tensor,
    pool: TextPool,
}

fn ln(p: nn::Path<'_>, width: i64) -> LayerNorm {
    LayerNorm::new(p, width)
}

impl ClipModel {
    /// Builds the model with zero weights on `device` (load real ones with
    /// [`super::load_into`]). The variables are frozen: the reward is never back-propagated.
    pub fn new(cfg: &ClipConfig, device: Device) -> Result<Self, ClipError> {
        cfg.validate()?;
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let act = if cfg.quick_gelu { Activation::QuickGelu } else { Activation::Gelu };
        let v = &cfg.vision_cfg;
        let vp = &root / "visual";
        let grid = cfg.grid();
        let zero = nn::Init::Const(0.);
        let visual = Vision {
            conv1: nn::conv2d(
                &vp / "conv1",
                3,
                v.width,
                v.patch_size,
                nn::ConvConfig { stride: v.patch_size, bias: false, ..Default::default() },
            ),
            patch: v.patch_size,
            class_embedding: vp.var("class_embedding", &[v.width], zero),
            positional_embedding: vp.var("positional_embedding", &[grid * grid + 1, v.width], zero),
            ln_pre: ln(&vp / "ln_pre", v.width),
            transformer: Transformer::new(
                &vp / "transformer",
                v.width,
                v.layers,
                cfg.vision_heads(),
                v.mlp_ratio,
                act,
            ),
            ln_post: ln(&vp / "ln_post", v.width),
            proj: vp.var("proj", &[v.width, cfg.embed_dim], zero),
        };
        let t = &cfg.text_cfg;
        let text = Text {
            token_embedding: (&root / "token_embedding").var(
                "weight",
                &[t.vocab_size, t.width],
                zero,
            ),
            positional_embedding: root.var(
                "positional_embedding",
                &[t.context_length, t.width],
                zero,
            ),
            transformer: Transformer::new(
                &root / "transformer",
                t.width,
                t.layers,
                t.heads,
                t.mlp_ratio,
                act,
            ),
            ln_final: ln(&root / "ln_final", t.width),
            text_projection: root.var("text_projection", &[t.width, cfg.embed_dim], zero),
        };
        // Present in every checkpoint; the HPS score does not use it, but a strict load needs it.
        let logit_scale = root.var("logit_scale", &[], zero);
        vs.freeze();
        Ok(Self { cfg: cfg.clone(), vs, visual, text, logit_scale, pool: TextPool::Argmax })
    }

    /// The same model pooling its text tower at `pool` (default [`TextPool::Argmax`]).
    pub fn with_text_pool(mut self, pool: TextPool) -> Self {
        self.pool = pool;
        self
    }

    /// The text pooling rule.
    pub fn text_pool(&self) -> TextPool {
        self.pool
    }

    /// The learnt temperature `logit_scale` (its log; CLIP's logits are `exp() · cos`).
    pub fn logit_scale(&self) -> Result<f64, ClipError> {
        Ok(self.logit_scale.f_to_kind(Kind::Double)?.f_double_value(&[])?)
    }

    /// The configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// The variables, named like the state dict.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variables (to change dtype or device).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Image features (not normalised) of `pixels` `[B, 3, S, S]`, already preprocessed.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor, ClipError> {
        let s = self.cfg.vision_cfg.image_size;
        let size = pixels.size();
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s {
            return Err(ClipError::Input(format!("pixels must be [B, 3, {s}, {s}], got {size:?}")));
        }
        let v = &self.visual;
        let kind = v.class_embedding.kind();
        let x = pixels.f_to_kind(kind)?.f_to_device(self.device())?;
        let x = x.f_conv2d(&v.conv1.ws, None::<Tensor>, [v.patch, v.patch], 0, 1, 1)?;
        let (b, w, _, _) = x.size4()?;
        // [B, w, g, g] -> [B, g², w], row-major over the grid like open_clip's reshape+permute.
        let x = x.f_reshape([b, w, -1])?.f_permute([0, 2, 1])?;
        let cls = v.class_embedding.f_reshape([1, 1, w])?.f_expand([b, 1, w], false)?;
        let x = Tensor::f_cat(&[cls, x], 1)?.f_add(&v.positional_embedding)?;
        let x = v.ln_pre.forward(&x)?;
        let x = v.transformer.forward(&x, false)?;
        let pooled = v.ln_post.forward(&x.f_select(1, 0)?)?;
        Ok(pooled.f_matmul(&v.proj)?)
    }

    /// Text features (not normalised) of `tokens` `[B, context_length]` (int64 ids), taken at
    /// each row's EOT token as [`Self::text_pool`] finds it (open_clip's `argmax` by default).
    pub fn encode_text(&self, tokens: &Tensor) -> Result<Tensor, ClipError> {
        let ctx = self.cfg.text_cfg.context_length;
        let size = tokens.size();
        if size.len() != 2 || size[1] != ctx {
            return Err(ClipError::Input(format!("tokens must be [B, {ctx}], got {size:?}")));
        }
        let t = &self.text;
        let tokens = tokens.f_to_kind(Kind::Int64)?.f_to_device(self.device())?;
        let x = Tensor::f_embedding(&t.token_embedding, &tokens, -1, false, false)?;
        let x = x.f_add(&t.positional_embedding)?;
        let x = t.transformer.forward(&x, true)?;
        let x = t.ln_final.forward(&x)?;
        let eot = match self.pool {
            TextPool::Argmax => tokens.f_argmax(-1, false)?,
            TextPool::FirstId(id) => tokens.f_eq(id)?.f_to_kind(Kind::Int)?.f_argmax(-1, false)?,
        };
        let rows = Tensor::f_arange(size[0], (Kind::Int64, x.device()))?;
        let pooled = x.f_index(&[Some(rows), Some(eot)])?;
        Ok(pooled.f_matmul(&t.text_projection)?)
    }
}

/// The state-dict keys and shapes of a model with config `cfg`, computed without allocating
/// it (ViT-H-14 is 3.9 GB in fp32): lets a loader reject a checkpoint of the wrong
/// architecture before building the model. Equal to the model's variables (tested).
pub fn state_dict_shapes(cfg: &ClipConfig) -> std::collections::BTreeMap<String, Vec<i64>> {
    let mut m = std::collections::BTreeMap::new();
    let mut blocks = |prefix: &str, w: i64, layers: i64, mlp_ratio: f64| {
        let hidden = (w as f64 * mlp_ratio) as i64;
        for i in 0..layers {
            let b = format!("{prefix}.resblocks.{i}");
            for ln in ["ln_1", "ln_2"] {
                m.insert(format!("{b}.{ln}.weight"), vec![w]);
                m.insert(format!("{b}.{ln}.bias"), vec![w]);
            }
            m.insert(format!("{b}.attn.in_proj_weight"), vec![3 * w, w]);
            m.insert(format!("{b}.attn.in_proj_bias"), vec![3 * w]);
            m.insert(format!("{b}.attn.out_proj.weight"), vec![w, w]);
            m.insert(format!("{b}.attn.out_proj.bias"), vec![w]);
            m.insert(format!("{b}.mlp.c_fc.weight"), vec![hidden, w]);
            m.insert(format!("{b}.mlp.c_fc.bias"), vec![hidden]);
            m.insert(format!("{b}.mlp.c_proj.weight"), vec![w, hidden]);
            m.insert(format!("{b}.mlp.c_proj.bias"), vec![w]);
        }
    };
    let v = &cfg.vision_cfg;
    let t = &cfg.text_cfg;
    blocks("visual.transformer", v.width, v.layers, v.mlp_ratio);
    blocks("transformer", t.width, t.layers, t.mlp_ratio);
    let g = cfg.grid();
    for (k, s) in [
        ("visual.conv1.weight", vec![v.width, 3, v.patch_size, v.patch_size]),
        ("visual.class_embedding", vec![v.width]),
        ("visual.positional_embedding", vec![g * g + 1, v.width]),
        ("visual.ln_pre.weight", vec![v.width]),
        ("visual.ln_pre.bias", vec![v.width]),
        ("visual.ln_post.weight", vec![v.width]),
        ("visual.ln_post.bias", vec![v.width]),
        ("visual.proj", vec![v.width, cfg.embed_dim]),
        ("token_embedding.weight", vec![t.vocab_size, t.width]),
        ("positional_embedding", vec![t.context_length, t.width]),
        ("ln_final.weight", vec![t.width]),
        ("ln_final.bias", vec![t.width]),
        ("text_projection", vec![t.width, cfg.embed_dim]),
        ("logit_scale", vec![]),
    ] {
        m.insert(k.to_string(), s);
    }
    m
}

/// `F.normalize(x, dim=-1)`: L2 normalisation with the same 1e-12 floor on the norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor, tch::TchError> {
    let norm = x.f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)?;
    x.f_div(&norm.f_clamp_min(1e-12)?.f_to_kind(x.kind())?)
}
