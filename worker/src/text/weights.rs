//! A checkpoint folder's tensors by name, with every lookup checked against the shape the
//! network expects, so a wrong file fails with the key and both shapes rather than a libtorch
//! shape error deep inside a matmul.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::TextError;

/// The tensors of one model folder (one file or sharded), in the compute dtype and device.
#[derive(Debug)]
pub struct Weights {
    dir: PathBuf,
    tensors: HashMap<String, (Tensor, PathBuf)>,
}

impl Weights {
    /// Loads every `*.safetensors` file of `dir` (the shards of a sharded checkpoint, or the
    /// single `model.safetensors`), converting floating tensors to `kind` on `device`.
    pub fn load_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self, TextError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| TextError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(TextError::Weights(format!("{}: no *.safetensors files", dir.display())));
        }
        let mut tensors = HashMap::new();
        for f in files {
            let list = Tensor::read_safetensors(&f).map_err(|e| {
                TextError::Weights(format!("{}: unreadable safetensors: {e}", f.display()))
            })?;
            for (name, t) in list {
                let t = if t.is_floating_point() { t.to_kind(kind) } else { t };
                tensors.insert(name, (t.to_device(device), f.clone()));
            }
        }
        Ok(Self { dir: dir.to_owned(), tensors })
    }

    /// The tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, TextError> {
        let (t, file) = self.tensors.get(name).ok_or_else(|| {
            TextError::Weights(format!("{}: missing weight {name}", self.dir.display()))
        })?;
        if t.size() != shape {
            return Err(TextError::Weights(format!(
                "{}: weight {name} has shape {:?}, expected {shape:?}",
                file.display(),
                t.size()
            )));
        }
        Ok(t.shallow_clone())
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The first of `names` present (for tied or renamed keys), with `shape`.
    pub fn get_any(&self, names: &[&str], shape: &[i64]) -> Result<Tensor, TextError> {
        let found = names.iter().find(|n| self.tensors.contains_key(**n));
        self.get(found.copied().unwrap_or(names[0]), shape)
    }
}

/// Reads and parses a `config.json`.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TextError> {
    let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TextError::Config(format!("{}: {e}", path.display())))
}
