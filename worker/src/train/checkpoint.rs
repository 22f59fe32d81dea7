//! Checkpoint files: the transformer in the diffusers layout, a LoRA adapter in the PEFT
//! layout, and the atomic `checkpoint-<step>` folder that holds them.
//!
//! Both layouts are what the Python libraries read (`FluxTransformer2DModel.from_pretrained`,
//! `PeftModel.from_pretrained`); `tests/train_checkpoint.rs` proves it by loading them there.
//! Tensors are written one at a time, copied to the host as the file is written, so saving
//! the 12 B transformer needs one tensor of host memory beyond the model.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use dancegrpo_proto::layout::{self, LeftoverKind};
use safetensors::{Dtype, View};
use serde_json::{Value, json};
use tch::{Kind, TchError, Tensor};

use crate::flux::FluxConfig;
use crate::flux::error::ModelError;
use crate::flux::lora::LoraSpec;
use crate::flux::weights::SafetensorsFile;

/// What can go wrong writing or reading a checkpoint's files.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or folder could not be written, read or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file whose content is wrong (an adapter config, a safetensors header).
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor whose dtype safetensors cannot store.
    #[error("weight {key} in {}: unsupported dtype {dtype}", file.display())]
    Dtype {
        /// The tensor's name.
        key: String,
        /// Its dtype.
        dtype: String,
        /// The file being written.
        file: PathBuf,
    },
    /// Stored weights that do not match the model's (missing, unexpected or mis-shaped keys,
    /// named by the weights layer), or a weights file that cannot be read.
    #[error(transparent)]
    Weights(#[from] ModelError),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] TchError),
}

impl CheckpointError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Format { path: path.into(), message: message.to_string() }
    }
}

/// The checkpoint layer's result.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// The diffusers release whose layout [`save_transformer`] writes (the pinned reference).
pub const DIFFUSERS_VERSION: &str = "0.42.1";
/// `<dir>/transformer/` holds the transformer.
pub const TRANSFORMER_DIR: &str = "transformer";
/// The transformer's weights file (one shard).
pub const TRANSFORMER_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// A tensor copied to the host only when the writer asks for its bytes. `View::data` cannot
/// fail, so a copy error is parked in `error` (the bytes become zeros of the right length,
/// keeping the file well-formed) and [`write_safetensors`] reports it afterwards.
struct HostView<'a> {
    tensor: &'a Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
    error: &'a RefCell<Option<TchError>>,
}

impl HostView<'_> {
    fn bytes(&self) -> std::result::Result<Vec<u8>, TchError> {
        let t = self.tensor.f_detach()?.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
        let mut buf = vec![0u8; self.data_len()];
        t.f_copy_data_u8(&mut buf, t.numel())?;
        Ok(buf)
    }
}

impl View for HostView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.bytes() {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes `tensors` (any device) to a safetensors file with PyTorch's `format: pt` metadata.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let error = RefCell::new(None);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| CheckpointError::Dtype {
            key: name.clone(),
            dtype: format!("{:?}", t.kind()),
            file: path.to_path_buf(),
        })?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.push((name.as_str(), HostView { tensor: t, dtype, shape, error: &error }));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| CheckpointError::format(path, e))?;
    match error.into_inner() {
        Some(e) => {
            let _ = fs::remove_file(path);
            Err(e.into())
        }
        None => Ok(()),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::format(path, e))?;
    fs::write(path, text + "\n").map_err(|e| CheckpointError::io(path, e))
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))
}

/// Saves the transformer as diffusers does: `dir/transformer/config.json` and one
/// `dir/transformer/diffusion_pytorch_model.safetensors` holding `tensors` under their
/// diffusers keys (the `FluxTransformer` VarStore names), in their own dtype.
pub fn save_transformer(dir: &Path, tensors: &[(String, Tensor)], cfg: &FluxConfig) -> Result<()> {
    let out = write_transformer_config(dir, cfg)?;
    write_safetensors(&out.join(TRANSFORMER_WEIGHTS), tensors)
}

/// Creates `dir/transformer/` with diffusers' `config.json` for `cfg`; returns the folder.
pub fn write_transformer_config(dir: &Path, cfg: &FluxConfig) -> Result<PathBuf> {
    let out = dir.join(TRANSFORMER_DIR);
    create_dir(&out)?;
    let mut config = serde_json::to_value(cfg).map_err(|e| CheckpointError::format(&out, e))?;
    if let Value::Object(map) = &mut config {
        map.insert("_class_name".into(), json!("FluxTransformer2DModel"));
        map.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    }
    write_json(&out.join("config.json"), &config)?;
    Ok(out)
}

/// The name of shard `i` (from 0) of `n` of a file set, as diffusers and transformers name
/// them: `<stem>-00001-of-00058.safetensors`.
pub fn shard_file(stem: &str, i: usize, n: usize) -> String {
    format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1)
}

/// Writes the index of a sharded file set (`<stem>.safetensors.index.json`): each tensor's
/// file, and the bytes of them all.
pub fn write_index(
    path: &Path,
    weight_map: &BTreeMap<String, String>,
    total_size: u64,
) -> Result<()> {
    write_json(path, &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}))
}

/// Saves a LoRA adapter as PEFT's `save_pretrained` does: `dir/adapter_model.safetensors`
/// (keys `base_model.model.<module>.lora_{A,B}.weight`, as
/// [`FluxTransformer::attach_lora`](crate::flux::FluxTransformer::attach_lora) names them) and
/// `dir/adapter_config.json`.
pub fn save_lora_adapter(dir: &Path, tensors: &[(String, Tensor)], spec: &LoraSpec) -> Result<()> {
    create_dir(dir)?;
    // PEFT writes an integer alpha; keep that form when it is one.
    let alpha = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 1e15 {
        json!(spec.alpha as i64)
    } else {
        json!(spec.alpha)
    };
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": {
            "base_model_class": "FluxTransformer2DModel",
            "parent_library": "diffusers.models.transformers.transformer_flux"
        },
        "base_model_name_or_path": null,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": spec.target_modules,
        "task_type": null,
        "use_dora": false,
        "use_rslora": false
    });
    write_json(&dir.join(ADAPTER_CONFIG), &config)?;
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), tensors)
}

/// A LoRA adapter read from disk.
#[derive(Debug)]
pub struct LoraAdapterFile {
    /// Rank, alpha and targets from `adapter_config.json`.
    pub spec: LoraSpec,
    /// The tensors by PEFT key, as stored (CPU).
    pub tensors: BTreeMap<String, Tensor>,
}

/// Reads a PEFT LoRA adapter folder. Refuses the PEFT options whose update is not
/// `(alpha/r)·B·A` on plain `Linear` layers (DoRA, rsLoRA, per-module rank or alpha, regex
/// targets, `fan_in_fan_out`) and checks every tensor's shape against `r`.
pub fn load_lora_adapter(dir: &Path) -> Result<LoraAdapterFile> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = fs::read_to_string(&cfg_path).map_err(|e| CheckpointError::io(&cfg_path, e))?;
    let cfg: Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::format(&cfg_path, e))?;
    let bad = |m: String| CheckpointError::format(&cfg_path, m);
    let peft_type = cfg.get("peft_type").and_then(Value::as_str);
    if peft_type != Some("LORA") {
        return Err(bad(format!("peft_type is {peft_type:?}, expected \"LORA\"")));
    }
    let rank = cfg.get("r").and_then(Value::as_i64).ok_or_else(|| bad("no integer r".into()))?;
    let alpha = cfg
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("no numeric lora_alpha".into()))?;
    let target_modules = match cfg.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("target_modules must be strings".into()))?,
        other => {
            return Err(bad(format!(
                "target_modules must be a list of names (a regex string is not supported), \
                 got {other:?}"
            )));
        }
    };
    for flag in ["use_dora", "use_rslora", "fan_in_fan_out"] {
        if cfg.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!("{flag} = true is not supported")));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if cfg.get(pattern).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(bad(format!("a non-empty {pattern} is not supported")));
        }
    }
    let spec = LoraSpec { rank, alpha, target_modules };

    let file = SafetensorsFile::open(dir.join(ADAPTER_WEIGHTS))?;
    let tensors = file.read_all()?;
    for (key, t) in &tensors {
        let module = key
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".weight"))
            .ok_or_else(|| ModelError::Unexpected { key: key.clone(), file: file.path().into() })?;
        let size = t.size();
        let rank_ok = if module.ends_with(".lora_A") {
            size.len() == 2 && size[0] == rank
        } else if module.ends_with(".lora_B") {
            size.len() == 2 && size[1] == rank
        } else {
            return Err(
                ModelError::Unexpected { key: key.clone(), file: file.path().into() }.into()
            );
        };
        if !rank_ok {
            return Err(CheckpointError::format(
                file.path(),
                format!("{key} has shape {size:?}, which does not fit rank r = {rank}"),
            ));
        }
    }
    Ok(LoraAdapterFile { spec, tensors })
}

/// Copies `src` into the existing tensors `dst` (e.g. adapters from
/// [`load_lora_adapter`] into those of `attach_lora`). Both must hold the same keys with the
/// same shapes; `file` names the source in errors.
pub fn restore_named(
    dst: &[(String, Tensor)],
    src: &BTreeMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    let missing: Vec<String> =
        dst.iter().map(|(k, _)| k).filter(|k| !src.contains_key(*k)).cloned().collect();
    if !missing.is_empty() {
        return Err(
            ModelError::Missing { keys: missing, source_desc: file.display().to_string() }.into()
        );
    }
    if let Some(key) = src.keys().find(|k| !dst.iter().any(|(d, _)| d == *k)) {
        return Err(ModelError::Unexpected { key: key.clone(), file: file.into() }.into());
    }
    let _guard = tch::no_grad_guard();
    for (key, t) in dst {
        let s = &src[key];
        if s.size() != t.size() {
            return Err(ModelError::Shape {
                key: key.clone(),
                expected: t.size(),
                found: s.size(),
                file: file.into(),
            }
            .into());
        }
        t.shallow_clone().f_copy_(s)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| CheckpointError::io(dir, e))
}

/// fsyncs every file under `dir`, then `dir`, so a rename that publishes it cannot expose
/// files whose data is not yet on disk.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| CheckpointError::io(dir, e))? {
        let path = entry.map_err(|e| CheckpointError::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| CheckpointError::io(&path, e))?;
        }
    }
    sync_dir(dir)
}

/// Writes `output_dir/checkpoint-<step>` atomically: `write` fills a temporary
/// `output_dir/.checkpoint-<step>.tmp-<pid>`, which is then renamed into place. If `write`
/// fails, the temporary folder is removed and no `checkpoint-<step>` appears; an existing one
/// is replaced only once the new one is complete. Returns the checkpoint's path.
///
/// Replacing takes two renames (Linux cannot rename a folder over a non-empty one): a crash
/// between them leaves the old copy as `.checkpoint-<step>.old-<pid>` and no
/// `checkpoint-<step>`, so [`latest_checkpoint`] falls back to the one before.
/// `write`'s error comes back as it is, so the caller's own error type passes through.
pub fn write_checkpoint<E, F>(output_dir: &Path, step: u64, write: F) -> Result<PathBuf, E>
where
    E: From<CheckpointError>,
    F: FnOnce(&Path) -> Result<(), E>,
{
    create_dir(output_dir)?;
    let pid = std::process::id();
    remove_stale(output_dir, pid);
    let tmp = layout::tmp_dir(output_dir, step, pid);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    if let Err(e) = write(&tmp).and_then(|()| Ok(sync_tree(&tmp)?)) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = layout::checkpoint_dir(output_dir, step);
    let old = layout::old_dir(output_dir, step, pid);
    let replaced = dest.exists();
    if replaced {
        fs::rename(&dest, &old).map_err(|e| CheckpointError::io(&dest, e))?;
    }
    fs::rename(&tmp, &dest).map_err(|e| CheckpointError::io(&tmp, e))?;
    sync_dir(output_dir)?;
    if replaced {
        fs::remove_dir_all(&old).map_err(|e| CheckpointError::io(&old, e))?;
    }
    Ok(dest)
}

/// The temporary folder [`write_checkpoint`] of process `pid` fills for `step`: a sharded
/// job's other ranks write their parts into rank 0's.
pub fn tmp_dir(output_dir: &Path, step: u64, pid: u32) -> PathBuf {
    layout::tmp_dir(output_dir, step, pid)
}

/// Removes what writers killed mid-write left in `output_dir`: every `.checkpoint-<N>.tmp-<pid>`
/// of another process (only rank 0 writes checkpoints, one at a time), and every
/// `.checkpoint-<N>.old-<pid>` whose `checkpoint-<N>` exists. An `.old` folder without its
/// `checkpoint-<N>` is the only complete copy of that step, and stays. Best effort: what
/// cannot be removed is logged and left.
fn remove_stale(output_dir: &Path, own_pid: u32) {
    layout::remove_leftovers(output_dir, |l| match l.kind {
        LeftoverKind::Tmp => l.pid != own_pid,
        LeftoverKind::Old => l.published(),
    });
}

/// The `checkpoint-<step>` folder in `output_dir` with the highest step, ignoring temporary
/// and replaced folders and anything else.
pub fn latest_checkpoint(output_dir: &Path) -> Option<(u64, PathBuf)> {
    layout::checkpoints(output_dir).pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_write_leaves_nothing_behind_after_the_next_one() {
        let out = tempfile::tempdir().unwrap();
        let dir = |n: &str| out.path().join(n);
        for n in [".checkpoint-3.tmp-4000001", "checkpoint-2", ".checkpoint-2.old-4000001"] {
            fs::create_dir_all(dir(n)).unwrap();
            fs::write(dir(n).join("f"), b"x").unwrap();
        }
        // A crash between the two renames of a replacement: this is step 5's only copy.
        fs::create_dir_all(dir(".checkpoint-5.old-4000002")).unwrap();
        let written = write_checkpoint::<CheckpointError, _>(out.path(), 4, |d| {
            fs::write(d.join("f"), b"y").map_err(|e| CheckpointError::io(d, e))
        })
        .unwrap();
        assert_eq!(written, dir("checkpoint-4"));
        let mut left: Vec<String> = fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".checkpoint-5.old-4000002", "checkpoint-2", "checkpoint-4"]);
    }
}
