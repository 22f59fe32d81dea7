//! transformers `CLIPModel` checkpoints (a `config.json` holding a `CLIPConfig` and its state
//! dict, e.g. `yuvalkirstain/PickScore_v1`, `openai/clip-vit-large-patch14`) loaded into the
//! open_clip towers of [`super::ClipModel`]: the two layouts compute the same network, and only
//! the names and a few packings differ.
//!
//! | transformers | open_clip |
//! |---|---|
//! | `vision_model.embeddings.patch_embedding.weight` | `visual.conv1.weight` |
//! | `vision_model.embeddings.class_embedding` | `visual.class_embedding` |
//! | `vision_model.embeddings.position_embedding.weight` | `visual.positional_embedding` |
//! | `vision_model.pre_layrnorm` / `post_layernorm` | `visual.ln_pre` / `visual.ln_post` |
//! | `visual_projection.weight` `[e, w]` (Linear, no bias) | `visual.proj` `[w, e]` (transposed) |
//! | `text_model.embeddings.token_embedding.weight` | `token_embedding.weight` |
//! | `text_model.embeddings.position_embedding.weight` | `positional_embedding` |
//! | `text_model.final_layer_norm` | `ln_final` |
//! | `text_projection.weight` `[e, w]` | `text_projection` `[w, e]` (transposed) |
//! | `<tower>.encoder.layers.{i}.self_attn.{q,k,v}_proj` | `<tower>.transformer.resblocks.{i}.attn.in_proj_{weight,bias}` (rows q, k, v) |
//! | `….self_attn.out_proj`, `layer_norm1`, `layer_norm2`, `mlp.fc1`, `mlp.fc2` | `….attn.out_proj`, `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj` |
//! | `logit_scale` | `logit_scale` |
//!
//! The `*.embeddings.position_ids` buffers older transformers versions kept in the state dict
//! are ignored; any other key the model does not have is an error, as is a missing one.
//!
//! The one behavioural difference is the text tower's pooled position: transformers takes the
//! first position of `text_config.eos_token_id`, except for configs that still carry the legacy
//! id 2 (written before transformers PR #24773, e.g. OpenAI's), where it takes the largest id,
//! as open_clip does ([`TextPool`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::config::{TextConfig, VisionConfig};
use super::model::TextPool;
use super::{ClipConfig, ClipError, ClipModel, check_shapes, load_into, read_state_dict};

/// `CLIPTextConfig`'s fields this implementation reads, with transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct HfText {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    max_position_embeddings: i64,
    hidden_act: String,
    layer_norm_eps: f64,
    eos_token_id: serde_json::Value,
}

impl Default for HfText {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407.into(),
        }
    }
}

/// `CLIPVisionConfig`'s fields this implementation reads, with transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct HfVision {
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_channels: i64,
    image_size: serde_json::Value,
    patch_size: serde_json::Value,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for HfVision {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224.into(),
            patch_size: 32.into(),
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// A transformers `CLIPConfig`, as the open_clip config of the same network plus the text
/// tower's pooling rule.
#[derive(Clone, Debug, PartialEq)]
pub struct HfClipConfig {
    /// The same network in open_clip's terms.
    pub clip: ClipConfig,
    /// Where the text tower takes its pooled state.
    pub pool: TextPool,
}

impl HfClipConfig {
    /// Parses `config.json`'s text. `text_config_dict` / `vision_config_dict` (old configs)
    /// replace `text_config` / `vision_config`, filled with defaults, as transformers does.
    pub fn from_json(text: &str) -> Result<Self, ClipError> {
        let bad = |m: String| ClipError::Config(m);
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let sub = |dict: &str, plain: &str| {
            v.get(dict).filter(|d| d.is_object()).or_else(|| v.get(plain)).cloned()
        };
        let t: HfText = match sub("text_config_dict", "text_config") {
            Some(x) if !x.is_null() => {
                serde_json::from_value(x).map_err(|e| bad(format!("text_config: {e}")))?
            }
            _ => HfText::default(),
        };
        let vis: HfVision = match sub("vision_config_dict", "vision_config") {
            Some(x) if !x.is_null() => {
                serde_json::from_value(x).map_err(|e| bad(format!("vision_config: {e}")))?
            }
            _ => HfVision::default(),
        };
        let projection_dim = match v.get("projection_dim") {
            None | Some(serde_json::Value::Null) => 512,
            Some(p) => {
                p.as_i64().ok_or_else(|| bad(format!("projection_dim: {p} is not an integer")))?
            }
        };
        let mut problems = Vec::new();
        let int = |name: &str, x: &serde_json::Value, problems: &mut Vec<String>| {
            x.as_i64().unwrap_or_else(|| {
                problems.push(format!("vision_config.{name} must be one integer (got {x})"));
                1
            })
        };
        let image_size = int("image_size", &vis.image_size, &mut problems);
        let patch_size = int("patch_size", &vis.patch_size, &mut problems);
        let act = |tower: &str, a: &str, problems: &mut Vec<String>| match a {
            "gelu" => false,
            "quick_gelu" => true,
            other => {
                problems.push(format!(
                    "{tower}.hidden_act {other:?} is not supported (gelu or quick_gelu)"
                ));
                false
            }
        };
        let quick_text = act("text_config", &t.hidden_act, &mut problems);
        let quick_vision = act("vision_config", &vis.hidden_act, &mut problems);
        if quick_text != quick_vision {
            problems.push(format!(
                "text_config.hidden_act {:?} and vision_config.hidden_act {:?} differ",
                t.hidden_act, vis.hidden_act
            ));
        }
        for (tower, eps) in
            [("text_config", t.layer_norm_eps), ("vision_config", vis.layer_norm_eps)]
        {
            if eps != 1e-5 {
                problems.push(format!("{tower}.layer_norm_eps must be 1e-5 (got {eps})"));
            }
        }
        if vis.num_channels != 3 {
            problems
                .push(format!("vision_config.num_channels must be 3 (got {})", vis.num_channels));
        }
        let ratio = |tower: &str, hidden: i64, inter: i64, problems: &mut Vec<String>| {
            let r = inter as f64 / hidden.max(1) as f64;
            if hidden <= 0 || (hidden as f64 * r) as i64 != inter {
                problems.push(format!(
                    "{tower}.intermediate_size {inter} is not a usable multiple of hidden_size {hidden}"
                ));
            }
            r
        };
        let text_ratio = ratio("text_config", t.hidden_size, t.intermediate_size, &mut problems);
        let vision_ratio =
            ratio("vision_config", vis.hidden_size, vis.intermediate_size, &mut problems);
        if vis.num_attention_heads <= 0 || vis.hidden_size % vis.num_attention_heads != 0 {
            problems.push(format!(
                "vision_config.hidden_size {} must be a multiple of num_attention_heads {}",
                vis.hidden_size, vis.num_attention_heads
            ));
        }
        let pool = match t.eos_token_id.as_i64() {
            Some(2) => TextPool::Argmax,
            Some(id) => TextPool::FirstId(id),
            None => {
                problems.push(format!(
                    "text_config.eos_token_id must be one integer (got {})",
                    t.eos_token_id
                ));
                TextPool::Argmax
            }
        };
        if !problems.is_empty() {
            return Err(bad(problems.join("; ")));
        }
        let clip = ClipConfig {
            embed_dim: projection_dim,
            quick_gelu: quick_text,
            vision_cfg: VisionConfig {
                image_size,
                patch_size,
                width: vis.hidden_size,
                layers: vis.num_hidden_layers,
                head_width: vis.hidden_size / vis.num_attention_heads,
                mlp_ratio: vision_ratio,
                other: BTreeMap::new(),
            },
            text_cfg: TextConfig {
                context_length: t.max_position_embeddings,
                vocab_size: t.vocab_size,
                width: t.hidden_size,
                heads: t.num_attention_heads,
                layers: t.num_hidden_layers,
                mlp_ratio: text_ratio,
                other: BTreeMap::new(),
            },
            other: BTreeMap::new(),
        };
        clip.validate()?;
        Ok(Self { clip, pool })
    }

    /// Reads `path` with [`HfClipConfig::from_json`]; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, ClipError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClipError::Config(format!("{}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| match e {
            ClipError::Config(m) => ClipError::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }
}

/// Where an open_clip tensor comes from in a transformers state dict.
enum Source {
    /// The same tensor under another name.
    Copy(String),
    /// `q`, `k`, `v` stacked along dim 0 (`in_proj_weight` / `in_proj_bias`).
    Stack([String; 3]),
    /// A Linear weight `[out, in]` used as a right-multiplied matrix `[in, out]`.
    Transpose(String),
}

/// The open_clip tensors of `cfg`, each with its transformers source.
fn sources(cfg: &ClipConfig) -> Vec<(String, Source)> {
    let mut out = Vec::new();
    let copy = |a: &str, b: &str| (a.to_string(), Source::Copy(b.to_string()));
    for (oc, hf, layers) in [
        ("visual.transformer", "vision_model.encoder", cfg.vision_cfg.layers),
        ("transformer", "text_model.encoder", cfg.text_cfg.layers),
    ] {
        for i in 0..layers {
            let (o, h) = (format!("{oc}.resblocks.{i}"), format!("{hf}.layers.{i}"));
            for p in ["weight", "bias"] {
                let qkv = ["q", "k", "v"].map(|x| format!("{h}.self_attn.{x}_proj.{p}"));
                out.push((format!("{o}.attn.in_proj_{p}"), Source::Stack(qkv)));
                for (a, b) in [
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ] {
                    out.push(copy(&format!("{o}.{a}.{p}"), &format!("{h}.{b}.{p}")));
                }
            }
        }
    }
    for (a, b) in [
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
        ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
        ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
        ("logit_scale", "logit_scale"),
    ] {
        out.push(copy(a, b));
    }
    out.push(("visual.proj".into(), Source::Transpose("visual_projection.weight".into())));
    out.push(("text_projection".into(), Source::Transpose("text_projection.weight".into())));
    out
}

/// The transformers state-dict keys and shapes of a `CLIPModel` with config `cfg`, computed
/// without allocating it (ViT-H-14 is 3.9 GB in fp32), so a checkpoint of another size is
/// reported before the model is built, under the names the file uses.
pub fn hf_state_dict_shapes(cfg: &ClipConfig) -> BTreeMap<String, Vec<i64>> {
    let oc = super::state_dict_shapes(cfg);
    let mut m = BTreeMap::new();
    for (name, src) in sources(cfg) {
        let shape = &oc[&name];
        match src {
            Source::Copy(k) => {
                m.insert(k, shape.clone());
            }
            Source::Stack(ks) => {
                let mut s = shape.clone();
                s[0] /= 3;
                for k in ks {
                    m.insert(k, s.clone());
                }
            }
            Source::Transpose(k) => {
                m.insert(k, vec![shape[1], shape[0]]);
            }
        }
    }
    m
}

/// Buffers some transformers versions saved in the state dict; not weights.
fn is_ignored_buffer(key: &str) -> bool {
    key == "text_model.embeddings.position_ids" || key == "vision_model.embeddings.position_ids"
}

/// Renames (and packs) a transformers state dict already checked against
/// [`hf_state_dict_shapes`] into open_clip's keys.
fn to_open_clip(
    cfg: &ClipConfig,
    tensors: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>, ClipError> {
    let mut file: HashMap<String, Tensor> = tensors.into_iter().collect();
    let mut take = |k: &str| {
        file.remove(k).ok_or_else(|| ClipError::Input(format!("state dict has no '{k}'")))
    };
    sources(cfg)
        .into_iter()
        .map(|(name, src)| {
            let t = match src {
                Source::Copy(k) => take(&k)?,
                Source::Stack(ks) => {
                    let parts = ks.iter().map(|k| take(k)).collect::<Result<Vec<_>, _>>()?;
                    Tensor::f_cat(&parts, 0)?
                }
                Source::Transpose(k) => take(&k)?.f_transpose(0, 1)?.f_contiguous()?,
            };
            Ok((name, t))
        })
        .collect()
}

/// Loads a transformers `CLIPModel` from `config` + `weights` (`model.safetensors` or a
/// `torch.save` state dict such as `pytorch_model.bin`) onto `device` in `kind` (f32, or bf16
/// on accelerators). Strict: a missing, unexpected or mis-shaped tensor is an error naming the
/// file, the transformers key and both shapes, raised before the model is allocated.
///
/// Returns the model and its `logit_scale` as the file holds it (f64): in a bf16 model the
/// variable keeps 8 bits, and `exp(4.6052)` would become `exp(4.59375)` ≈ 98.9, a 1 % shift.
pub fn load_hf_clip(
    config: &Path,
    weights: &Path,
    device: Device,
    kind: Kind,
) -> Result<(ClipModel, f64), ClipError> {
    let cfg = HfClipConfig::from_file(config)?;
    let mut tensors = read_state_dict(weights)?;
    tensors.retain(|(k, _)| !is_ignored_buffer(k));
    check_shapes(&hf_state_dict_shapes(&cfg.clip), &tensors, weights)?;
    let tensors = to_open_clip(&cfg.clip, tensors)?;
    let logit_scale = tensors
        .iter()
        .find(|(k, _)| k == "logit_scale")
        .map(|(_, t)| t.f_to_kind(Kind::Double)?.f_double_value(&[]))
        .transpose()?
        .unwrap_or_default();
    let mut model = ClipModel::new(&cfg.clip, device)?.with_text_pool(cfg.pool);
    if kind != Kind::Float {
        model.var_store_mut().set_kind(kind);
    }
    load_into(&mut model, tensors, weights)?;
    Ok((model, logit_scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_legacy_keys_follow_transformers() {
        let c = HfClipConfig::from_json("{}").unwrap();
        // CLIPConfig() is ViT-B/32 with quick GELU; eos 49407 is pooled at its first position.
        assert_eq!(c.clip.vision_cfg.patch_size, 32);
        assert_eq!(c.clip.vision_cfg.head_width, 64);
        assert!(c.clip.quick_gelu);
        assert_eq!(c.pool, TextPool::FirstId(49407));
        let c = HfClipConfig::from_json(
            r#"{"text_config": {"hidden_size": 768, "eos_token_id": 2},
                "text_config_dict": {"num_attention_heads": 16, "eos_token_id": 2}}"#,
        )
        .unwrap();
        // The _dict wins whole, defaults included (hidden_size back to 512).
        assert_eq!((c.clip.text_cfg.width, c.clip.text_cfg.heads), (512, 16));
        assert_eq!(c.pool, TextPool::Argmax);
        let e = HfClipConfig::from_json(
            r#"{"text_config": {"hidden_act": "gelu", "layer_norm_eps": 1e-6},
                "vision_config": {"hidden_act": "silu", "image_size": [224, 224]}}"#,
        )
        .unwrap_err()
        .to_string();
        for want in ["image_size must be one integer", "\"silu\" is not supported", "1e-5"] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn the_mapping_covers_every_open_clip_tensor_once() {
        let cfg = HfClipConfig::from_json(
            r#"{"projection_dim": 8, "text_config": {"hidden_size": 16, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 40},
                "vision_config": {"hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}"#,
        )
        .unwrap()
        .clip;
        let hf = hf_state_dict_shapes(&cfg);
        let tensors: Vec<(String, Tensor)> = hf
            .iter()
            .map(|(k, s)| (k.clone(), Tensor::zeros(s.as_slice(), tch::kind::FLOAT_CPU)))
            .collect();
        let oc = to_open_clip(&cfg, tensors).unwrap();
        let got: BTreeMap<String, Vec<i64>> =
            oc.iter().map(|(k, t)| (k.clone(), t.size())).collect();
        assert_eq!(got, super::super::state_dict_shapes(&cfg));
        assert_eq!(hf["visual_projection.weight"], [8, 16]);
        assert_eq!(hf["text_model.encoder.layers.1.self_attn.k_proj.weight"], [16, 16]);
    }
}
