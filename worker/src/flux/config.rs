//! The transformer's hyperparameters, read from diffusers' `transformer/config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{ModelError, Result};

/// `FluxTransformer2DModel`'s config (the diffusers keys; unknown keys such as `_class_name`
/// are ignored, missing ones take diffusers' defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FluxConfig {
    /// Patch size; FLUX packs 2×2 latent patches outside the model, so this is 1.
    pub patch_size: i64,
    /// Channels of a packed latent token (16 latent channels × 2×2 = 64).
    pub in_channels: i64,
    /// Output channels; `None` means `in_channels`.
    pub out_channels: Option<i64>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Width of the text encoder states (T5: 4096).
    pub joint_attention_dim: i64,
    /// Width of the pooled text vector (CLIP-L: 768).
    pub pooled_projection_dim: i64,
    /// Whether the guidance-distillation embedding exists (FLUX.1-dev: yes).
    pub guidance_embeds: bool,
    /// Head-dim split of the 3-axis RoPE; sums to `attention_head_dim`, all even.
    pub axes_dims_rope: Vec<i64>,
}

impl Default for FluxConfig {
    fn default() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: false,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

impl FluxConfig {
    /// FLUX.1-dev (11.9 B parameters).
    pub fn flux_dev() -> Self {
        Self { guidance_embeds: true, ..Self::default() }
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ModelError::format(path, e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Model width (heads × head dim).
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Hidden width of the MLPs (ratio 4, fixed in diffusers and BFL).
    pub fn mlp_hidden(&self) -> i64 {
        4 * self.inner_dim()
    }

    /// Output channels per token.
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Every weight of the transformer this config builds, by diffusers name (sorted), with
    /// its shape, without building it: what the sharded layout and a memory plan of the real
    /// size need (FLUX.1-dev's 11.9 B parameters would take 44 GiB to allocate). A test checks
    /// it against the variables [`super::FluxTransformer::new`] creates.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (d, hd, h) = (self.inner_dim(), self.attention_head_dim, self.mlp_hidden());
        let mut out: Vec<(String, Vec<i64>)> = Vec::new();
        let mut linear = |name: String, i: i64, o: i64| {
            out.push((format!("{name}.weight"), vec![o, i]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        linear("x_embedder".into(), self.in_channels, d);
        linear("context_embedder".into(), self.joint_attention_dim, d);
        let mut mlps =
            vec![("timestep_embedder", 256), ("text_embedder", self.pooled_projection_dim)];
        if self.guidance_embeds {
            mlps.push(("guidance_embedder", 256));
        }
        for (m, i) in mlps {
            linear(format!("time_text_embed.{m}.linear_1"), i, d);
            linear(format!("time_text_embed.{m}.linear_2"), d, d);
        }
        linear("norm_out.linear".into(), d, 2 * d);
        linear("proj_out".into(), d, self.out_channels());
        let mut scales = Vec::new();
        for b in 0..self.num_layers {
            let p = format!("transformer_blocks.{b}");
            linear(format!("{p}.norm1.linear"), d, 6 * d);
            linear(format!("{p}.norm1_context.linear"), d, 6 * d);
            for l in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"] {
                linear(format!("{p}.attn.{l}"), d, d);
            }
            linear(format!("{p}.attn.to_out.0"), d, d);
            linear(format!("{p}.attn.to_add_out"), d, d);
            for ff in ["ff", "ff_context"] {
                linear(format!("{p}.{ff}.net.0.proj"), d, h);
                linear(format!("{p}.{ff}.net.2"), h, d);
            }
            for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                scales.push(format!("{p}.attn.{n}.weight"));
            }
        }
        for b in 0..self.num_single_layers {
            let p = format!("single_transformer_blocks.{b}");
            linear(format!("{p}.norm.linear"), d, 3 * d);
            for l in ["to_q", "to_k", "to_v"] {
                linear(format!("{p}.attn.{l}"), d, d);
            }
            linear(format!("{p}.proj_mlp"), d, h);
            linear(format!("{p}.proj_out"), d + h, d);
            for n in ["norm_q", "norm_k"] {
                scales.push(format!("{p}.attn.{n}.weight"));
            }
        }
        out.extend(scales.into_iter().map(|n| (n, vec![hd])));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Checks the combinations the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.patch_size != 1 {
            return bad(format!(
                "patch_size {} (only 1 is supported, as in FLUX)",
                self.patch_size
            ));
        }
        if self.num_attention_heads <= 0 || self.attention_head_dim <= 0 || self.in_channels <= 0 {
            return bad("heads, head dim and in_channels must be positive".into());
        }
        if self.joint_attention_dim <= 0 || self.pooled_projection_dim <= 0 {
            return bad("joint_attention_dim and pooled_projection_dim must be positive".into());
        }
        let sum: i64 = self.axes_dims_rope.iter().sum();
        if sum != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0 || *d <= 0)
        {
            return bad(format!(
                "axes_dims_rope {:?} must be positive, even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }
}
