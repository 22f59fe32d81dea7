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
