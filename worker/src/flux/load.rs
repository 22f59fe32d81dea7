//! Loading FLUX transformer weights: the diffusers folder (sharded through
//! `diffusion_pytorch_model.safetensors.index.json`, or one file) and the BFL single file
//! (MODELS.md §1.5-1.6: fused `qkv` and `linear1` split by rows, the final modulation's two
//! halves swapped, an optional `model.diffusion_model.` prefix).

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind};

use super::config::FluxConfig;
use super::error::{ModelError, Result};
use super::model::FluxTransformer;
use super::weights::{KeyMap, Piece, SafetensorsFile, load_mapped};

/// The prefix some community BFL files put in front of every key.
const BFL_PREFIX: &str = "model.diffusion_model.";

pub use dancegrpo_proto::files::Layout;

/// How the weights are stored in memory (DESIGN/ALGORITHM: frozen weights bf16, trainable
/// master weights f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPolicy {
    /// bf16, no gradients (rollout-only or a frozen LoRA base).
    FrozenBf16,
    /// f32 master weights that require gradients.
    TrainableF32,
    /// Any dtype, frozen (e.g. f32 for parity checks).
    Frozen(Kind),
}

impl WeightPolicy {
    fn kind(self) -> Kind {
        match self {
            WeightPolicy::FrozenBf16 => Kind::BFloat16,
            WeightPolicy::TrainableF32 => Kind::Float,
            WeightPolicy::Frozen(k) => k,
        }
    }
}

/// A loaded transformer and the VarStore that owns its weights.
#[derive(Debug)]
pub struct LoadedFlux {
    /// Owns the variables (its names are the diffusers keys).
    pub vs: VarStore,
    /// The model.
    pub model: FluxTransformer,
}

/// Finds the checkpoint under `path` ([`dancegrpo_proto::files::flux_layout`]).
pub fn detect_layout(path: &Path) -> Result<Layout> {
    dancegrpo_proto::files::flux_layout(path).map_err(|e| ModelError::format(e.path, e.message))
}

/// Reads the config for `path`: `config.json` next to the weights (or in `transformer/`), else,
/// for a BFL file, infers it from the tensor shapes (the RoPE split is then FLUX's
/// `[16, 56, 56]`, which needs a head dim of 128).
pub fn read_config(path: &Path, layout: &Layout) -> Result<FluxConfig> {
    let dir = if path.is_file() { path.parent().unwrap_or(Path::new(".")) } else { path };
    for c in [dir.join("config.json"), dir.join("transformer").join("config.json")] {
        if c.is_file() {
            return FluxConfig::from_file(&c);
        }
    }
    match layout {
        Layout::Bfl(f) => infer_bfl_config(&SafetensorsFile::open(f)?),
        Layout::Diffusers(_) => {
            Err(ModelError::format(dir, "no config.json next to the diffusers weights"))
        }
    }
}

/// Infers a FLUX config from a BFL file's shapes.
pub fn infer_bfl_config(file: &SafetensorsFile) -> Result<FluxConfig> {
    let keys = file.keys();
    let prefix = if keys.iter().all(|k| k.starts_with(BFL_PREFIX)) { BFL_PREFIX } else { "" };
    let shape = |k: &str| {
        file.shape(&format!("{prefix}{k}")).ok_or_else(|| {
            ModelError::format(file.path(), format!("cannot infer the config: no {prefix}{k}"))
        })
    };
    let count = |p: &str| {
        keys.iter()
            .filter_map(|k| {
                k.strip_prefix(prefix)?.strip_prefix(p)?.split('.').next()?.parse::<usize>().ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    };
    let img_in = shape("img_in.weight")?;
    let head_dim = shape("single_blocks.0.norm.query_norm.scale")
        .or_else(|_| shape("double_blocks.0.img_attn.norm.query_norm.scale"))?[0];
    let cfg = FluxConfig {
        in_channels: img_in[1],
        out_channels: Some(shape("final_layer.linear.weight")?[0]),
        num_layers: count("double_blocks."),
        num_single_layers: count("single_blocks."),
        attention_head_dim: head_dim,
        num_attention_heads: img_in[0] / head_dim,
        joint_attention_dim: shape("txt_in.weight")?[1],
        pooled_projection_dim: shape("vector_in.in_layer.weight")?[1],
        guidance_embeds: keys.iter().any(|k| k.contains("guidance_in.")),
        ..FluxConfig::default()
    };
    cfg.validate().map_err(|e| {
        ModelError::format(file.path(), format!("{e}; pass a config.json for non-FLUX head sizes"))
    })?;
    Ok(cfg)
}

/// The BFL → diffusers key map for `cfg`.
fn bfl_map(
    cfg: &FluxConfig,
    prefix: &'static str,
) -> impl Fn(&str) -> std::result::Result<Vec<Piece>, ()> {
    let d = cfg.inner_dim();
    let (nd, ns) = (cfg.num_layers, cfg.num_single_layers);
    move |key: &str| {
        let k = key.strip_prefix(prefix).ok_or(())?;
        let (stem, suffix) = k.rsplit_once('.').ok_or(())?;
        let w = |t: &str| Ok(vec![Piece::whole(format!("{t}.{suffix}"))]);
        let rows = |parts: &[(&str, (i64, i64))]| {
            Ok(parts
                .iter()
                .map(|(t, r)| Piece { target: format!("{t}.{suffix}"), rows: Some(*r) })
                .collect::<Vec<_>>())
        };
        let whole_split =
            |ts: &[String]| Ok(ts.iter().map(|t| Piece::whole(format!("{t}.{suffix}"))).collect());
        match stem {
            "img_in" => return w("x_embedder"),
            "txt_in" => return w("context_embedder"),
            "time_in.in_layer" => return w("time_text_embed.timestep_embedder.linear_1"),
            "time_in.out_layer" => return w("time_text_embed.timestep_embedder.linear_2"),
            "guidance_in.in_layer" => return w("time_text_embed.guidance_embedder.linear_1"),
            "guidance_in.out_layer" => return w("time_text_embed.guidance_embedder.linear_2"),
            "vector_in.in_layer" => return w("time_text_embed.text_embedder.linear_1"),
            "vector_in.out_layer" => return w("time_text_embed.text_embedder.linear_2"),
            "final_layer.linear" => return w("proj_out"),
            // BFL stores [shift; scale], diffusers [scale; shift].
            "final_layer.adaLN_modulation.1" => {
                return rows(&[("norm_out.linear", (d, 2 * d)), ("norm_out.linear", (0, d))]);
            }
            _ => {}
        }
        let (group, rest) = stem.split_once('.').ok_or(())?;
        let (idx, inner) = rest.split_once('.').ok_or(())?;
        let i: usize = idx.parse().map_err(|_| ())?;
        match group {
            "double_blocks" if i < nd => {
                let p = format!("transformer_blocks.{i}");
                let t = |n: &str| format!("{p}.{n}");
                match inner {
                    "img_mod.lin" => w(&t("norm1.linear")),
                    "txt_mod.lin" => w(&t("norm1_context.linear")),
                    "img_attn.qkv" => {
                        whole_split(&[t("attn.to_q"), t("attn.to_k"), t("attn.to_v")])
                    }
                    "txt_attn.qkv" => whole_split(&[
                        t("attn.add_q_proj"),
                        t("attn.add_k_proj"),
                        t("attn.add_v_proj"),
                    ]),
                    "img_attn.norm.query_norm" if suffix == "scale" => {
                        Ok(vec![Piece::whole(t("attn.norm_q.weight"))])
                    }
                    "img_attn.norm.key_norm" if suffix == "scale" => {
                        Ok(vec![Piece::whole(t("attn.norm_k.weight"))])
                    }
                    "txt_attn.norm.query_norm" if suffix == "scale" => {
                        Ok(vec![Piece::whole(t("attn.norm_added_q.weight"))])
                    }
                    "txt_attn.norm.key_norm" if suffix == "scale" => {
                        Ok(vec![Piece::whole(t("attn.norm_added_k.weight"))])
                    }
                    "img_attn.proj" => w(&t("attn.to_out.0")),
                    "txt_attn.proj" => w(&t("attn.to_add_out")),
                    "img_mlp.0" => w(&t("ff.net.0.proj")),
                    "img_mlp.2" => w(&t("ff.net.2")),
                    "txt_mlp.0" => w(&t("ff_context.net.0.proj")),
                    "txt_mlp.2" => w(&t("ff_context.net.2")),
                    _ => Err(()),
                }
            }
            "single_blocks" if i < ns => {
                let p = format!("single_transformer_blocks.{i}");
                let t = |n: &str| format!("{p}.{n}");
                match inner {
                    // linear1 = [q; k; v; mlp] rows: d, d, d, 4d.
                    "linear1" => whole_split(&[
                        t("attn.to_q"),
                        t("attn.to_k"),
                        t("attn.to_v"),
                        t("proj_mlp"),
                    ]),
                    "linear2" => w(&t("proj_out")),
                    "modulation.lin" => w(&t("norm.linear")),
                    "norm.query_norm" if suffix == "scale" => {
                        Ok(vec![Piece::whole(t("attn.norm_q.weight"))])
                    }
                    "norm.key_norm" if suffix == "scale" => {
                        Ok(vec![Piece::whole(t("attn.norm_k.weight"))])
                    }
                    _ => Err(()),
                }
            }
            _ => Err(()),
        }
    }
}

/// Copies a checkpoint in either layout into an existing model's VarStore (dtype kept).
pub fn load_weights(vs: &VarStore, layout: &Layout, cfg: &FluxConfig) -> Result<()> {
    let vars = vs.variables();
    match layout {
        Layout::Diffusers(files) => {
            let files = files.iter().map(SafetensorsFile::open).collect::<Result<Vec<_>>>()?;
            let map: &KeyMap<'_> = &|k: &str| Ok(vec![Piece::whole(k)]);
            let desc = files.first().map(|f| f.path().display().to_string()).unwrap_or_default();
            load_mapped(&vars, &files, map, &format!("the diffusers checkpoint ({desc} ...)"))
        }
        Layout::Bfl(path) => {
            let file = SafetensorsFile::open(path)?;
            let keys = file.keys();
            let prefix = if !keys.is_empty() && keys.iter().all(|k| k.starts_with(BFL_PREFIX)) {
                BFL_PREFIX
            } else {
                ""
            };
            let map = bfl_map(cfg, prefix);
            load_mapped(&vars, &[file], &map, &format!("the BFL file {}", path.display()))
        }
    }
}

/// Builds the model on `device` with the dtype `policy` and loads `path` (see
/// [`detect_layout`]). The forward runs in the weight dtype; change it with
/// [`FluxTransformer::set_compute_kind`] (e.g. bf16 compute on f32 masters).
pub fn load_flux(path: &Path, device: Device, policy: WeightPolicy) -> Result<LoadedFlux> {
    let layout = detect_layout(path)?;
    let cfg = read_config(path, &layout)?;
    load_flux_with(&layout, &cfg, device, policy)
}

/// [`load_flux`] with an explicit layout and config.
pub fn load_flux_with(
    layout: &Layout,
    cfg: &FluxConfig,
    device: Device,
    policy: WeightPolicy,
) -> Result<LoadedFlux> {
    let mut vs = VarStore::new(device);
    vs.set_kind(policy.kind());
    let model = FluxTransformer::new(&vs.root(), cfg, policy.kind())?;
    load_weights(&vs, layout, cfg)?;
    if policy != WeightPolicy::TrainableF32 {
        vs.freeze();
    }
    Ok(LoadedFlux { vs, model })
}
