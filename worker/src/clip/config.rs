//! The open_clip model configuration, in open_clip's own `model_config` JSON format
//! (`embed_dim`, `vision_cfg`, `text_cfg`), with the ViT-H-14 preset HPS-v2.1 uses.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ClipError;

/// The vision tower's shape (open_clip `CLIPVisionCfg`, the fields a plain ViT uses).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VisionConfig {
    /// Input side in pixels (square).
    pub image_size: i64,
    /// Patch side in pixels; the patch grid is `image_size / patch_size` on a side.
    pub patch_size: i64,
    /// Residual width.
    pub width: i64,
    /// Number of residual blocks.
    pub layers: i64,
    /// Width of one attention head; heads = `width / head_width`.
    #[serde(default = "default_head_width")]
    pub head_width: i64,
    /// MLP hidden width as a multiple of `width`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Options this implementation does not have; rejected when set (see [`ClipConfig::validate`]).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// The text tower's shape (open_clip `CLIPTextCfg`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TextConfig {
    /// Token positions (77 for every CLIP).
    #[serde(default = "default_context_length")]
    pub context_length: i64,
    /// Token-table rows (49408 for the CLIP BPE).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// Residual width.
    pub width: i64,
    /// Attention heads.
    pub heads: i64,
    /// Number of residual blocks.
    pub layers: i64,
    /// MLP hidden width as a multiple of `width`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Options this implementation does not have; rejected when set.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A CLIP model configuration as open_clip writes it in `open_clip_config.json`
/// (either the bare model config or wrapped in `{"model_cfg": ...}`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ClipConfig {
    /// Width of the joint image/text feature space.
    pub embed_dim: i64,
    /// `x·σ(1.702x)` instead of exact GELU (OpenAI's original weights; false for ViT-H-14).
    #[serde(default)]
    pub quick_gelu: bool,
    /// The image tower.
    pub vision_cfg: VisionConfig,
    /// The text tower.
    pub text_cfg: TextConfig,
    /// Options this implementation does not have; rejected when set.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_head_width() -> i64 {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_context_length() -> i64 {
    77
}
fn default_vocab_size() -> i64 {
    49408
}

/// Keys open_clip configs carry that do not change the eval-time forward of a plain ViT CLIP
/// (training-only knobs, tokenizer hints, defaults of this architecture).
const INERT_KEYS: &[&str] = &[
    "patch_dropout",
    "timm_model_name",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
    "hf_tokenizer_name",
    "tokenizer_kwargs",
    "custom_text",
    "cast_dtype",
    "init_logit_scale",
    "init_logit_bias",
    "preprocess_cfg",
];

/// Values that mean "the default of this architecture" for the keys we do not implement.
fn is_default_value(key: &str, v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (key, v) {
        (_, Value::Null) | (_, Value::Bool(false)) => true,
        ("pool_type", Value::String(s)) => s == "tok" || s == "argmax",
        ("output_tokens", Value::Bool(b)) => !b,
        ("proj_type", Value::String(s)) => s == "linear",
        ("act_kind", Value::String(s)) => s == "gelu",
        ("norm_kind", Value::String(s)) => s == "layernorm",
        ("pad_id", Value::Number(n)) => n.as_i64() == Some(0),
        ("embed_cls", Value::Bool(b)) => !b,
        ("no_causal_mask", Value::Bool(b)) => !b,
        ("final_ln_after_pool", Value::Bool(b)) => !b,
        ("pos_embed_type", Value::String(s)) => s == "learnable",
        ("hf_model_name", Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

impl ClipConfig {
    /// open_clip's `ViT-H-14.json`, the tower HPS-v2.1 fine-tunes.
    pub fn vit_h_14() -> Self {
        Self {
            embed_dim: 1024,
            quick_gelu: false,
            vision_cfg: VisionConfig {
                image_size: 224,
                patch_size: 14,
                width: 1280,
                layers: 32,
                head_width: 80,
                mlp_ratio: 4.0,
                other: BTreeMap::new(),
            },
            text_cfg: TextConfig {
                context_length: 77,
                vocab_size: 49408,
                width: 1024,
                heads: 16,
                layers: 24,
                mlp_ratio: 4.0,
                other: BTreeMap::new(),
            },
            other: BTreeMap::new(),
        }
    }

    /// Parses open_clip's JSON (bare, or with the model under `model_cfg`) and validates it.
    pub fn from_json(text: &str) -> Result<Self, ClipError> {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ClipError::Config(e.to_string()))?;
        if let Some(inner) = value.get_mut("model_cfg") {
            value = inner.take();
        }
        let cfg: Self =
            serde_json::from_value(value).map_err(|e| ClipError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `path` with [`ClipConfig::from_json`].
    pub fn from_file(path: &Path) -> Result<Self, ClipError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClipError::Config(format!("{}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| ClipError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks the shapes fit together and that no unimplemented option is switched on, so a
    /// config for a different architecture fails loudly instead of computing something else.
    pub fn validate(&self) -> Result<(), ClipError> {
        let mut problems = Vec::new();
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        if self.embed_dim <= 0 {
            problems.push(format!("embed_dim must be > 0 (got {})", self.embed_dim));
        }
        if v.patch_size <= 0 || v.image_size <= 0 || v.image_size % v.patch_size != 0 {
            problems.push(format!(
                "vision image_size {} must be a positive multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.head_width <= 0 || v.width <= 0 || v.width % v.head_width != 0 {
            problems.push(format!(
                "vision width {} must be a positive multiple of head_width {}",
                v.width, v.head_width
            ));
        }
        if t.heads <= 0 || t.width <= 0 || t.width % t.heads != 0 {
            problems.push(format!(
                "text width {} must be a positive multiple of heads {}",
                t.width, t.heads
            ));
        }
        if t.context_length <= 1 || t.vocab_size <= 1 {
            problems.push("text context_length and vocab_size must be > 1".to_string());
        }
        for (scope, other) in
            [("", &self.other), ("vision_cfg.", &v.other), ("text_cfg.", &t.other)]
        {
            for (k, val) in other {
                if !INERT_KEYS.contains(&k.as_str()) && !is_default_value(k, val) {
                    problems.push(format!("unsupported option {scope}{k} = {val}"));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(ClipError::Config(problems.join("; "))) }
    }

    /// Vision heads.
    pub fn vision_heads(&self) -> i64 {
        self.vision_cfg.width / self.vision_cfg.head_width
    }

    /// Patch-grid side of the vision tower.
    pub fn grid(&self) -> i64 {
        self.vision_cfg.image_size / self.vision_cfg.patch_size
    }
}
