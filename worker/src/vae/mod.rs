//! The FLUX VAE decoder (diffusers `AutoencoderKL`, decoder half only; MODELS.md §2) and the
//! image post-processing to uint8 RGB.
//!
//! FLUX's VAE has 16 latent channels and no `post_quant_conv`; the pipeline decodes
//! `latents / scaling_factor + shift_factor`. Variable names are the diffusers keys under
//! `decoder.`; the encoder's keys in the same file are skipped while loading.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Init, VarStore};
use tch::{Device, Kind, Tensor};

use crate::flux::error::{ModelError, Result};
use crate::flux::weights::{Piece, SafetensorsFile, load_mapped};
use crate::latents;

/// GroupNorm epsilon of every decoder norm.
const EPS: f64 = 1e-6;

/// The decoder-relevant part of the VAE's `config.json` (diffusers keys and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Channels of the output image.
    pub out_channels: i64,
    /// Encoder widths per level; the decoder runs them in reverse.
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder block (the decoder has one more per block).
    pub layers_per_block: usize,
    /// Latent channels (16 for FLUX).
    pub latent_channels: i64,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// Latent scaling factor (FLUX: 0.3611).
    pub scaling_factor: f64,
    /// Latent shift factor (FLUX: 0.1159).
    pub shift_factor: Option<f64>,
    /// Whether a 1×1 `post_quant_conv` precedes the decoder (false for FLUX).
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its attention layer.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ModelError::format(path, e))?;
        if cfg.block_out_channels.is_empty()
            || cfg.norm_num_groups <= 0
            || cfg.block_out_channels.iter().any(|c| c % cfg.norm_num_groups != 0)
        {
            return Err(ModelError::Config(format!(
                "VAE block_out_channels {:?} must be non-empty multiples of norm_num_groups {}",
                cfg.block_out_channels, cfg.norm_num_groups
            )));
        }
        Ok(cfg)
    }
}

#[derive(Debug)]
struct Conv {
    w: Tensor,
    b: Tensor,
    pad: i64,
}

impl Conv {
    fn new(p: nn::Path<'_>, i: i64, o: i64, k: i64) -> Self {
        Self {
            w: p.var("weight", &[o, i, k, k], Init::Const(0.)),
            b: p.var("bias", &[o], Init::Const(0.)),
            pad: k / 2,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_conv2d(&self.w, Some(&self.b), [1, 1], [self.pad, self.pad], [1, 1], 1)?)
    }
}

#[derive(Debug)]
struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: i64,
}

impl GroupNorm {
    fn new(p: nn::Path<'_>, c: i64, groups: i64) -> Self {
        Self {
            w: p.var("weight", &[c], Init::Const(1.)),
            b: p.var("bias", &[c], Init::Const(0.)),
            groups,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_group_norm(self.groups, Some(&self.w), Some(&self.b), EPS, true)?)
    }
}

/// `ResnetBlock2D` without a time embedding.
#[derive(Debug)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(p: nn::Path<'_>, i: i64, o: i64, g: i64) -> Self {
        Self {
            norm1: GroupNorm::new(&p / "norm1", i, g),
            conv1: Conv::new(&p / "conv1", i, o, 3),
            norm2: GroupNorm::new(&p / "norm2", o, g),
            conv2: Conv::new(&p / "conv2", o, o, 3),
            shortcut: (i != o).then(|| Conv::new(&p / "conv_shortcut", i, o, 1)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.f_silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.f_silu()?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.shallow_clone(),
        };
        Ok(skip.f_add(&h)?)
    }
}

/// The mid block's single-head spatial self-attention.
#[derive(Debug)]
struct Attention {
    norm: GroupNorm,
    q: crate::flux::model::Linear,
    k: crate::flux::model::Linear,
    v: crate::flux::model::Linear,
    out: crate::flux::model::Linear,
}

fn linear(p: nn::Path<'_>, c: i64) -> crate::flux::model::Linear {
    crate::flux::model::Linear::new(p, c, c)
}

impl Attention {
    fn new(p: nn::Path<'_>, c: i64, g: i64) -> Self {
        Self {
            norm: GroupNorm::new(&p / "group_norm", c, g),
            q: linear(&p / "to_q", c),
            k: linear(&p / "to_k", c),
            v: linear(&p / "to_v", c),
            out: linear(&p / "to_out" / 0, c),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.size();
        let (b, c) = (s[0], s[1]);
        let h = self.norm.forward(&x.f_view([b, c, -1])?)?.f_transpose(1, 2)?;
        let heads = |t: Tensor| t.f_unsqueeze(1);
        let q = heads(self.q.forward(&h)?)?;
        let k = heads(self.k.forward(&h)?)?;
        let v = heads(self.v.forward(&h)?)?;
        let o = crate::attention::attention(&q, &k, &v)?;
        let o = self.out.forward(&o.f_squeeze_dim(1)?)?;
        Ok(o.f_transpose(1, 2)?.f_reshape(s.as_slice())?.f_add(x)?)
    }
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv>,
}

/// The decoder (`decoder.*`), optionally preceded by `post_quant_conv`.
#[derive(Debug)]
pub struct VaeDecoder {
    cfg: VaeConfig,
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid_resnets: [Resnet; 2],
    mid_attn: Option<Attention>,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// Creates the variables under `p` (load weights afterwards).
    pub fn new(p: &nn::Path<'_>, cfg: &VaeConfig) -> Self {
        let g = cfg.norm_num_groups;
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let d = p / "decoder";
        let mid = &d / "mid_block";
        let mut up = Vec::with_capacity(rev.len());
        let mut prev = top;
        for (i, &out) in rev.iter().enumerate() {
            let bp = &d / "up_blocks" / i;
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| Resnet::new(&bp / "resnets" / j, if j == 0 { prev } else { out }, out, g))
                .collect();
            let upsample = (i + 1 < rev.len())
                .then(|| Conv::new(&bp / "upsamplers" / 0 / "conv", out, out, 3));
            up.push(UpBlock { resnets, upsample });
            prev = out;
        }
        let c0 = cfg.block_out_channels[0];
        Self {
            cfg: cfg.clone(),
            post_quant_conv: cfg.use_post_quant_conv.then(|| {
                Conv::new(p / "post_quant_conv", cfg.latent_channels, cfg.latent_channels, 1)
            }),
            conv_in: Conv::new(&d / "conv_in", cfg.latent_channels, top, 3),
            mid_resnets: [
                Resnet::new(&mid / "resnets" / 0, top, top, g),
                Resnet::new(&mid / "resnets" / 1, top, top, g),
            ],
            mid_attn: cfg
                .mid_block_add_attention
                .then(|| Attention::new(&mid / "attentions" / 0, top, g)),
            up,
            norm_out: GroupNorm::new(&d / "conv_norm_out", c0, g),
            conv_out: Conv::new(&d / "conv_out", c0, cfg.out_channels, 3),
        }
    }

    /// The config.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Decodes VAE-space latents `[B, C, h, w]` (already scaled and shifted) to an image
    /// `[B, 3, 8h, 8w]` in about [-1, 1], in the weights' dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let s = z.size();
        if s.len() != 4 || s[1] != self.cfg.latent_channels {
            return Err(ModelError::Input(format!(
                "VAE latents must be [B, {}, h, w], got {s:?}",
                self.cfg.latent_channels
            )));
        }
        let mut x = z.f_to_kind(self.conv_in.w.kind())?;
        if let Some(c) = &self.post_quant_conv {
            x = c.forward(&x)?;
        }
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnets[0].forward(&x)?;
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x)?;
        for blk in &self.up {
            for r in &blk.resnets {
                x = r.forward(&x)?;
            }
            if let Some(c) = &blk.upsample {
                let s = x.size();
                x = c.forward(&x.f_upsample_nearest2d([s[2] * 2, s[3] * 2], None, None)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?.f_silu()?)
    }

    /// Decodes packed transformer latents `[B, N, 64]` of a `height`×`width` image: unpack,
    /// `latents / scaling_factor + shift_factor`, decode.
    pub fn decode_packed(&self, packed: &Tensor, height: i64, width: i64) -> Result<Tensor> {
        let z = latents::unpack(packed, height, width)?;
        let z = z
            .f_div_scalar(self.cfg.scaling_factor)?
            .f_add_scalar(self.cfg.shift_factor.unwrap_or(0.0))?;
        self.decode(&z)
    }
}

/// Image `[B, 3, H, W]` in [-1, 1] → uint8 RGB `[B, H, W, 3]`: `clamp(x/2 + 0.5, 0, 1)`, ×255,
/// rounded half to even (diffusers' `VaeImageProcessor.postprocess` + `numpy_to_pil`), in f32.
pub fn to_uint8(image: &Tensor) -> Result<Tensor> {
    let x = image.f_to_kind(Kind::Float)?;
    let x = (x / 2.0 + 0.5).f_clamp(0.0, 1.0)?;
    Ok((x.f_permute([0, 2, 3, 1])? * 255.0).f_round()?.f_to_kind(Kind::Uint8)?)
}

/// A loaded decoder and the VarStore owning its weights.
#[derive(Debug)]
pub struct LoadedVae {
    /// Owns the variables.
    pub vs: VarStore,
    /// The decoder.
    pub decoder: VaeDecoder,
}

/// Loads the decoder from a diffusers `vae/` folder (or a pipeline root holding `vae/`), frozen,
/// with weights (and compute) in `kind`.
pub fn load_vae(path: &Path, device: Device, kind: Kind) -> Result<LoadedVae> {
    let (config, weights) = dancegrpo_proto::files::vae_files(path);
    let cfg = VaeConfig::from_file(&config)?;
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    let decoder = VaeDecoder::new(&vs.root(), &cfg);
    let file = SafetensorsFile::open(weights)?;
    let use_pqc = cfg.use_post_quant_conv;
    let map = move |k: &str| -> std::result::Result<Vec<Piece>, ()> {
        if k.starts_with("encoder.")
            || k.starts_with("quant_conv.")
            || (!use_pqc && k.starts_with("post_quant_conv."))
        {
            Ok(vec![])
        } else {
            Ok(vec![Piece::whole(k)])
        }
    };
    load_mapped(
        &vs.variables(),
        &[file],
        &map,
        &format!("the VAE at {}", config.parent().unwrap_or(path).display()),
    )?;
    vs.freeze();
    Ok(LoadedVae { vs, decoder })
}
