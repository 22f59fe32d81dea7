//! Streaming weight loading from safetensors files.
//!
//! Files are memory-mapped and copied into the model one tensor at a time, so loading a
//! 24 GB checkpoint needs the mapping (page cache, evictable) plus one tensor of host memory,
//! never twice the file. `VarStore::load` is not used: it reads the whole file into a `Vec`
//! and changes each variable's dtype to the file's (MODELS.md §0.6, §7); here the copy goes
//! into the existing variable, which keeps its dtype and device.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use super::error::{ModelError, Result};

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SafetensorsFile {
    /// Maps `path` and parses its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the mapping is read-only and lives as long as `self`. Checkpoint files are
        // not modified while a worker loads them; if one were truncated underneath us the
        // process would get SIGBUS, which is the documented risk of every mmap loader
        // (safetensors' own `safe_open` does the same).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::format(&path, e))?;
        Ok(Self { path, mmap, data_start: 8 + header_len, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.metadata.tensors().into_keys().collect();
        k.sort();
        k
    }

    fn info(&self, key: &str) -> Result<&TensorInfo> {
        self.metadata
            .info(key)
            .ok_or_else(|| ModelError::format(&self.path, format!("no tensor named {key}")))
    }

    /// The stored shape of `key`, if present.
    pub fn shape(&self, key: &str) -> Option<Vec<i64>> {
        self.metadata.info(key).map(|i| i.shape.iter().map(|&d| d as i64).collect())
    }

    /// Reads `key` into a new CPU tensor of the stored dtype (one copy of that tensor only).
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        let info = self.info(key)?;
        let kind = match info.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::U8 => Kind::Uint8,
            Dtype::I8 => Kind::Int8,
            Dtype::BOOL => Kind::Bool,
            other => {
                return Err(ModelError::Dtype {
                    key: key.into(),
                    dtype: format!("{other:?}"),
                    file: self.path.clone(),
                });
            }
        };
        let (a, b) = info.data_offsets;
        let data = self
            .mmap
            .get(self.data_start + a..self.data_start + b)
            .ok_or_else(|| ModelError::format(&self.path, format!("{key}: data out of range")))?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_data_size(data, &shape, kind)?)
    }

    /// Reads every tensor (for small input files such as the check commands' inputs).
    pub fn read_all(&self) -> Result<BTreeMap<String, Tensor>> {
        self.keys().into_iter().map(|k| self.tensor(&k).map(|t| (k, t))).collect()
    }
}

/// The tensors of one safetensors file, or of the shards its index lists
/// (`<file>.index.json`, with `weight_map` as diffusers and transformers write it), read by
/// name without knowing which: what a checkpoint written unit by unit
/// (`crate::train::shard`) looks like.
#[derive(Debug)]
pub struct TensorSet {
    path: PathBuf,
    files: Vec<SafetensorsFile>,
    owner: BTreeMap<String, usize>,
}

impl TensorSet {
    /// Opens `path` if it exists, else the shards of `<path>.index.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let index = PathBuf::from(format!("{}.index.json", path.display()));
        if path.exists() || !index.is_file() {
            let file = SafetensorsFile::open(&path)?;
            let owner = file.keys().into_iter().map(|k| (k, 0)).collect();
            return Ok(Self { path, files: vec![file], owner });
        }
        let shards = dancegrpo_proto::files::index_files(&index)
            .map_err(|e| ModelError::format(e.path, e.message))?;
        let mut files = Vec::with_capacity(shards.len());
        let mut owner = BTreeMap::new();
        for (i, (file, keys)) in shards.into_iter().enumerate() {
            let f = SafetensorsFile::open(&file)?;
            for key in keys {
                if f.shape(&key).is_none() {
                    return Err(ModelError::format(
                        &index,
                        format!("{key} is listed in {}, which does not hold it", file.display()),
                    ));
                }
                owner.insert(key, i);
            }
            files.push(f);
        }
        Ok(Self { path: index, files, owner })
    }

    /// The file, or the index.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.owner.keys().cloned().collect()
    }

    /// The stored shape of `key`, if present.
    pub fn shape(&self, key: &str) -> Option<Vec<i64>> {
        self.owner.get(key).and_then(|&i| self.files[i].shape(key))
    }

    /// The file that holds `key` (the set's path when none does).
    pub fn file_of(&self, key: &str) -> &Path {
        self.owner.get(key).map_or(&self.path, |&i| self.files[i].path())
    }

    /// Reads `key` (see [`SafetensorsFile::tensor`]).
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        match self.owner.get(key) {
            Some(&i) => self.files[i].tensor(key),
            None => Err(ModelError::format(&self.path, format!("no tensor named {key}"))),
        }
    }
}

/// Where (part of) a file tensor goes: a model variable, or a block of its leading rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    /// The model variable's name.
    pub(crate) target: String,
    /// Rows `[start, end)` of the target along dim 0; `None` for the whole variable.
    pub(crate) rows: Option<(i64, i64)>,
}

impl Piece {
    pub(crate) fn whole(target: impl Into<String>) -> Self {
        Piece { target: target.into(), rows: None }
    }
}

/// How a checkpoint's keys map onto the model: `Ok(pieces)` (the file tensor is the
/// concatenation of the pieces along dim 0, in order), `Ok(empty)` to skip the key (e.g. the
/// VAE encoder), `Err(())` when the key is unknown.
pub(crate) type KeyMap<'a> = dyn Fn(&str) -> std::result::Result<Vec<Piece>, ()> + 'a;

/// Copies every tensor of `files` into `vars` (name → variable) according to `map`, then checks
/// that every variable was filled exactly once. Errors name the key and both shapes.
pub(crate) fn load_mapped(
    vars: &HashMap<String, Tensor>,
    files: &[SafetensorsFile],
    map: &KeyMap<'_>,
    source_desc: &str,
) -> Result<()> {
    let mut filled: HashMap<&str, i64> = HashMap::new();
    for file in files {
        for key in file.keys() {
            let pieces = map(&key).map_err(|()| ModelError::Unexpected {
                key: key.clone(),
                file: file.path.clone(),
            })?;
            if pieces.is_empty() {
                continue;
            }
            // The expected stored shape: the pieces' rows stacked, the targets' trailing dims.
            let mut expected: Option<Vec<i64>> = None;
            let mut plan = Vec::with_capacity(pieces.len());
            for p in &pieces {
                let (name, var) = vars.get_key_value(p.target.as_str()).ok_or_else(|| {
                    ModelError::Unexpected { key: key.clone(), file: file.path.clone() }
                })?;
                let size = var.size();
                let (a, b) = p.rows.unwrap_or((0, size.first().copied().unwrap_or(1)));
                let mut shape = size.clone();
                if shape.is_empty() {
                    shape.push(1);
                }
                shape[0] = b - a;
                match &mut expected {
                    None => expected = Some(shape),
                    Some(e) => {
                        if e[1..] != shape[1..] {
                            return Err(ModelError::Config(format!(
                                "{key}: fused targets have different trailing shapes"
                            )));
                        }
                        e[0] += shape[0];
                    }
                }
                plan.push((name.as_str(), var, a, b, size.is_empty()));
            }
            let mut expected = expected.unwrap_or_default();
            if pieces.len() == 1 && plan[0].4 {
                expected = vec![];
            }
            let found = file.shape(&key).unwrap_or_default();
            if found != expected {
                return Err(ModelError::Shape { key, expected, found, file: file.path.clone() });
            }
            let src = file.tensor(&key)?;
            let mut offset = 0;
            for (name, var, a, b, scalar) in plan {
                let n = b - a;
                tch::no_grad(|| -> Result<()> {
                    if scalar {
                        var.shallow_clone().f_copy_(&src)?;
                    } else {
                        let mut dst = var.f_narrow(0, a, n)?;
                        dst.f_copy_(&src.f_narrow(0, offset, n)?)?;
                    }
                    Ok(())
                })?;
                offset += n;
                let total = if scalar { 1 } else { var.size()[0] };
                let e = filled.entry(name).or_insert(0);
                *e += n;
                if *e > total {
                    return Err(ModelError::format(
                        &file.path,
                        format!("{key}: weight {name} is provided more than once"),
                    ));
                }
            }
        }
    }
    let mut missing: Vec<String> = vars
        .iter()
        .filter(|(name, var)| {
            let total = var.size().first().copied().unwrap_or(1);
            filled.get(name.as_str()).copied().unwrap_or(0) != total
        })
        .map(|(name, _)| name.clone())
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(ModelError::Missing { keys: missing, source_desc: source_desc.into() });
    }
    Ok(())
}
