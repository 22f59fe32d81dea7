//! Strict state-dict loading into a [`ClipModel`], as PyTorch's `load_state_dict(strict=True)`:
//! every model key must be in the file with the same shape, and the file may hold nothing else.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::Tensor;

use super::{ClipError, ClipModel};

/// Reads a state dict from `path`: safetensors by extension, otherwise a `torch.save` file
/// (flat, or under `state_dict`). Tensors stay on the CPU in the file's dtype.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, ClipError> {
    if !path.is_file() {
        return Err(ClipError::Read {
            path: path.display().to_string(),
            message: "no such file".into(),
        });
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        Tensor::read_safetensors(path).map_err(|e| ClipError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    } else {
        Ok(crate::pt::read_state_dict(path, Some("state_dict"))?)
    }
}

/// Checks `tensors` against the expected `shapes` (see [`super::model::state_dict_shapes`])
/// like a strict `load_state_dict` would, without touching any model.
pub fn check_shapes(
    shapes: &BTreeMap<String, Vec<i64>>,
    tensors: &[(String, Tensor)],
    source: &Path,
) -> Result<(), ClipError> {
    let path = source.display().to_string();
    let file: HashMap<&str, Vec<i64>> =
        tensors.iter().map(|(k, t)| (k.as_str(), t.size())).collect();
    for (key, expected) in shapes {
        match file.get(key.as_str()) {
            None => {
                return Err(ClipError::MissingKey {
                    path,
                    key: key.clone(),
                    expected: expected.clone(),
                });
            }
            Some(found) if found != expected => {
                return Err(ClipError::ShapeMismatch {
                    path,
                    key: key.clone(),
                    expected: expected.clone(),
                    found: found.clone(),
                });
            }
            Some(_) => {}
        }
    }
    let mut extra: Vec<&(String, Tensor)> =
        tensors.iter().filter(|(k, _)| !shapes.contains_key(k)).collect();
    extra.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((k, t)) = extra.first() {
        return Err(ClipError::UnexpectedKey { path, key: k.clone(), found: t.size() });
    }
    Ok(())
}

/// Copies `tensors` (named as the state dict, from `source`) into `model`, converting dtype
/// and device to the model's. Fails before copying anything when a key is missing,
/// unexpected or mis-shaped; the error names the key (and both shapes).
pub fn load_into(
    model: &mut ClipModel,
    tensors: Vec<(String, Tensor)>,
    source: &Path,
) -> Result<(), ClipError> {
    let vars: HashMap<String, Tensor> = model.var_store().variables();
    let shapes: BTreeMap<String, Vec<i64>> =
        vars.iter().map(|(k, v)| (k.clone(), v.size())).collect();
    check_shapes(&shapes, &tensors, source)?;
    let file: HashMap<String, Tensor> = tensors.into_iter().collect();
    tch::no_grad(|| -> Result<(), ClipError> {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            var.f_copy_(&file[name])?;
        }
        Ok(())
    })
}
