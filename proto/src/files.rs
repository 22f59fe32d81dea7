//! The on-disk layouts a job reads, resolved and checked without libtorch: the FLUX model
//! folder, the HPS reward directory, and the integrity of safetensors and `torch.save` files.
//! The worker loads through these; the coordinator checks them before it admits workers, so a
//! missing or truncated file fails the job before it starts instead of on every worker.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;

/// A file or folder that is missing or not what it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct FileError {
    /// The file or folder.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl FileError {
    fn new(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self { path: path.into(), message: message.to_string() }
    }
}

/// Maps `path` read-only.
fn map(path: &Path) -> Result<Mmap, FileError> {
    let file = File::open(path).map_err(|e| FileError::new(path, e))?;
    // SAFETY: read-only, and only for the duration of a check; a file truncated underneath
    // would raise SIGBUS, the documented risk of every mmap reader (safetensors' own included).
    unsafe { Mmap::map(&file) }.map_err(|e| FileError::new(path, e))
}

/// Checks that `path` is a safetensors file whose header parses and whose tensors cover the
/// file exactly (a truncated download fails here, naming both sizes). Returns its tensor names,
/// sorted. Only the header pages are read.
pub fn check_safetensors(path: &Path) -> Result<Vec<String>, FileError> {
    let bytes = map(path)?;
    match SafeTensors::read_metadata(&bytes) {
        Ok((_, metadata)) => {
            let mut names: Vec<String> = metadata.tensors().into_keys().collect();
            names.sort();
            Ok(names)
        }
        Err(safetensors::SafeTensorError::MetadataIncompleteBuffer) => {
            let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            let header: serde_json::Value =
                serde_json::from_slice(&bytes[8..8 + n as usize]).unwrap_or_default();
            let data: u64 = header
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
                .max()
                .unwrap_or(0);
            Err(FileError::new(
                path,
                format!(
                    "truncated or padded safetensors file: its header describes {} bytes, the \
                     file has {}",
                    8 + n + data,
                    bytes.len()
                ),
            ))
        }
        Err(e) => Err(FileError::new(path, format!("not a readable safetensors file: {e}"))),
    }
}

/// Checks that `path` is a whole `torch.save` file: a zip archive (PyTorch ≥ 1.6) whose
/// central directory reads and whose entries lie inside the file, or a legacy pickle (its
/// magic number). Tensor contents are checked when a worker loads them.
pub fn check_torch_save(path: &Path) -> Result<(), FileError> {
    let bytes = map(path)?;
    if bytes.is_empty() {
        return Err(FileError::new(path, "empty file"));
    }
    if bytes.starts_with(b"PK") {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&bytes[..])).map_err(|e| {
            FileError::new(path, format!("not a readable torch.save archive (truncated?): {e}"))
        })?;
        for i in 0..zip.len() {
            let entry = zip.by_index_raw(i).map_err(|e| FileError::new(path, e))?;
            let end = entry.data_start().saturating_add(entry.compressed_size());
            if end > bytes.len() as u64 {
                return Err(FileError::new(
                    path,
                    format!(
                        "truncated torch.save archive: entry {} ends at byte {end}, the file \
                         has {}",
                        entry.name(),
                        bytes.len()
                    ),
                ));
            }
        }
        return Ok(());
    }
    // The legacy format opens with a pickled magic number: PROTO 2 (0x80 0x02), then a long.
    if bytes.starts_with(&[0x80, 0x02]) {
        return Ok(());
    }
    Err(FileError::new(path, "neither a torch.save zip archive nor a legacy torch.save pickle"))
}

/// Checks that `path` is a readable JSON file.
fn check_json(path: &Path) -> Option<FileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return Some(FileError::new(path, e)),
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .err()
        .map(|e| FileError::new(path, format!("not JSON: {e}")))
}

/// Checks a weight file by its kind: safetensors by extension, `torch.save` otherwise.
pub fn check_weights(path: &Path) -> Result<(), FileError> {
    if path.extension().is_some_and(|x| x == "safetensors") {
        check_safetensors(path).map(drop)
    } else {
        check_torch_save(path)
    }
}

/// Which on-disk layout a FLUX checkpoint uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// diffusers `transformer/` files (the listed shards, in index order).
    Diffusers(Vec<PathBuf>),
    /// One BFL file (`flux1-dev.safetensors`).
    Bfl(PathBuf),
}

impl Layout {
    /// The weight files.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Layout::Diffusers(f) => f.iter().map(PathBuf::as_path).collect(),
            Layout::Bfl(f) => vec![f.as_path()],
        }
    }
}

/// The diffusers index of a sharded transformer.
pub const DIFFUSERS_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";
/// The diffusers single-file transformer.
pub const DIFFUSERS_SINGLE: &str = "diffusion_pytorch_model.safetensors";

/// Finds the checkpoint under `path`: a BFL `.safetensors` file; a diffusers `transformer/`
/// folder (index + shards, or a single file); a pipeline root holding `transformer/`; or a
/// folder holding exactly one BFL file.
pub fn flux_layout(path: &Path) -> Result<Layout, FileError> {
    if path.is_file() {
        return Ok(Layout::Bfl(path.to_path_buf()));
    }
    if path.join("transformer").is_dir() {
        return flux_layout(&path.join("transformer"));
    }
    let index = path.join(DIFFUSERS_INDEX);
    if index.is_file() {
        let files = index_files(&index)?.into_iter().map(|(f, _)| f).collect();
        return Ok(Layout::Diffusers(files));
    }
    let single = path.join(DIFFUSERS_SINGLE);
    if single.is_file() {
        return Ok(Layout::Diffusers(vec![single]));
    }
    let entries = std::fs::read_dir(path).map_err(|e| FileError::new(path, e))?;
    let st: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    match st.as_slice() {
        [one] => Ok(Layout::Bfl(one.clone())),
        _ => Err(FileError::new(
            path,
            "no diffusers index, no diffusion_pytorch_model.safetensors and not exactly one BFL \
             .safetensors file",
        )),
    }
}

/// A diffusers index's shard files (beside it, sorted) with the tensor names each must hold.
pub fn index_files(index: &Path) -> Result<Vec<(PathBuf, Vec<String>)>, FileError> {
    let text = std::fs::read_to_string(index).map_err(|e| FileError::new(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| FileError::new(index, e))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| FileError::new(index, "no weight_map object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = std::collections::BTreeMap::<PathBuf, Vec<String>>::new();
    for (key, f) in map {
        let f =
            f.as_str().ok_or_else(|| FileError::new(index, "weight_map values must be strings"))?;
        files.entry(dir.join(f)).or_default().push(key.clone());
    }
    Ok(files.into_iter().collect())
}

/// Checks a FLUX model folder or file as a worker will load it: the layout resolves, a diffusers
/// folder has a `config.json` that parses, every shard the index names exists with a header that
/// covers it and holds the tensors the index puts there. Every problem is returned.
pub fn check_flux(path: &Path) -> Vec<FileError> {
    if !path.exists() {
        return vec![FileError::new(path, "does not exist")];
    }
    let layout = match flux_layout(path) {
        Ok(l) => l,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    if let Layout::Diffusers(files) = &layout {
        let dir = files[0].parent().unwrap_or(Path::new("."));
        problems.extend(check_json(&dir.join("config.json")));
        let index = dir.join(DIFFUSERS_INDEX);
        let wanted = if index.is_file() { index_files(&index).unwrap_or_default() } else { vec![] };
        for file in files {
            match check_safetensors(file) {
                Err(e) => problems.push(e),
                Ok(names) => {
                    let want = wanted.iter().find(|(f, _)| f == file).map(|(_, k)| k);
                    let missing: Vec<&String> = want
                        .into_iter()
                        .flatten()
                        .filter(|k| names.binary_search(k).is_err())
                        .collect();
                    if let Some(first) = missing.first() {
                        problems.push(FileError::new(
                            file,
                            format!(
                                "lacks {} tensor(s) that {DIFFUSERS_INDEX} puts there, e.g. {first}",
                                missing.len()
                            ),
                        ));
                    }
                }
            }
        }
    } else {
        problems.extend(layout.files().into_iter().filter_map(|f| check_safetensors(f).err()));
    }
    problems
}

/// A diffusers VAE's config and weights: in `vae/` under a pipeline root, or in `path` itself.
pub fn vae_files(path: &Path) -> (PathBuf, PathBuf) {
    let dir = if path.join("vae").is_dir() { path.join("vae") } else { path.to_path_buf() };
    (dir.join("config.json"), dir.join(DIFFUSERS_SINGLE))
}

/// Checks the VAE under `path` as a worker loads it: its config parses, its weights cover their
/// file. Every problem is returned.
pub fn check_vae(path: &Path) -> Vec<FileError> {
    let (config, weights) = vae_files(path);
    check_json(&config).into_iter().chain(check_safetensors(&weights).err()).collect()
}

/// File name of the HPS tokenizer vocabulary.
pub const HPS_VOCAB_FILE: &str = "bpe_simple_vocab_16e6.txt.gz";
/// File name of the optional open_clip model config.
pub const HPS_CONFIG_FILE: &str = "open_clip_config.json";
/// Stems of the HPS weight files, in load order, with the `torch.save` extension each has
/// where HPSv2 downloads it.
pub const HPS_WEIGHT_STEMS: [(&str, &str); 2] =
    [("open_clip_pytorch_model", "bin"), ("HPS_v2.1_compressed", "pt")];

/// The files an HPS model directory resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct HpsFiles {
    /// Model config; `None` means ViT-H-14.
    pub config: Option<PathBuf>,
    /// Weight files, in load order (each loaded strictly).
    pub weights: Vec<PathBuf>,
    /// The BPE vocabulary.
    pub vocab: PathBuf,
}

impl HpsFiles {
    /// Resolves the files in `dir`: each weight stem as `.safetensors` (what `dancegrpo-worker
    /// convert` writes, preferred) or as HPSv2 ships it; the HPS stem is required, the
    /// open_clip base optional. `vocab` overrides the vocabulary's path.
    pub fn discover(dir: &Path, vocab: Option<&Path>) -> Result<Self, FileError> {
        if !dir.is_dir() {
            return Err(FileError::new(dir, "HPS model dir does not exist"));
        }
        let config = Some(dir.join(HPS_CONFIG_FILE)).filter(|p| p.is_file());
        let mut weights = Vec::new();
        for (stem, ext) in HPS_WEIGHT_STEMS {
            let st = dir.join(format!("{stem}.safetensors"));
            let pt = dir.join(format!("{stem}.{ext}"));
            if st.is_file() {
                weights.push(st);
            } else if pt.is_file() {
                weights.push(pt);
            }
        }
        let hps = HPS_WEIGHT_STEMS[1].0;
        if !weights.iter().any(|p| p.file_stem().is_some_and(|s| s == hps)) {
            return Err(FileError::new(
                dir,
                format!("holds neither {hps}.pt nor {hps}.safetensors"),
            ));
        }
        let vocab = vocab.map(Path::to_path_buf).unwrap_or_else(|| dir.join(HPS_VOCAB_FILE));
        if !vocab.is_file() {
            return Err(FileError::new(
                &vocab,
                format!(
                    "BPE vocabulary not found (put {HPS_VOCAB_FILE} next to the weights or pass \
                     its path)"
                ),
            ));
        }
        Ok(Self { config, weights, vocab })
    }

    /// [`HpsFiles::discover`], then every weight file's integrity: every problem.
    pub fn check(dir: &Path) -> Vec<FileError> {
        match Self::discover(dir, None) {
            Err(e) => vec![e],
            Ok(f) => f.weights.iter().filter_map(|w| check_weights(w).err()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file as the `safetensors` package writes it.
    fn safetensors(path: &Path, names: &[&str]) {
        let data = vec![0u8; 8];
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
            .iter()
            .map(|n| {
                let v =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data)
                        .unwrap();
                (n.to_string(), v)
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn a_truncated_or_foreign_safetensors_file_is_named_with_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.safetensors");
        safetensors(&f, &["b", "a"]);
        assert_eq!(check_safetensors(&f).unwrap(), ["a", "b"]);
        let whole = std::fs::read(&f).unwrap();
        std::fs::write(&f, &whole[..whole.len() - 3]).unwrap();
        let e = check_safetensors(&f).unwrap_err();
        let want =
            format!("its header describes {} bytes, the file has {}", whole.len(), whole.len() - 3);
        assert!(e.message.contains(&want), "{e}");
        std::fs::write(&f, b"not at all").unwrap();
        let e = check_safetensors(&f).unwrap_err();
        assert!(e.message.contains("not a readable safetensors file"), "{e}");
    }

    #[test]
    fn torch_save_files_are_checked_whole_in_either_format() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.pt");
        // The zip layout torch.save writes: an archive of `archive/data.pkl` and its storages.
        {
            let mut z = zip::ZipWriter::new(File::create(&f).unwrap());
            let opts = zip::write::FileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            for (name, body) in [
                ("archive/data.pkl", &b"\x80\x02}q\x00."[..]),
                ("archive/data/0", &[0u8; 4096][..]),
            ] {
                z.start_file(name, opts).unwrap();
                std::io::Write::write_all(&mut z, body).unwrap();
            }
            z.finish().unwrap();
        }
        check_torch_save(&f).unwrap();
        let whole = std::fs::read(&f).unwrap();
        std::fs::write(&f, &whole[..whole.len() / 2]).unwrap();
        let e = check_torch_save(&f).unwrap_err();
        assert!(e.message.contains("truncated"), "{e}");
        std::fs::write(&f, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        check_torch_save(&f).unwrap();
        std::fs::write(&f, b"").unwrap();
        assert!(check_torch_save(&f).unwrap_err().message.contains("empty"));
        std::fs::write(&f, b"<html>404</html>").unwrap();
        assert!(check_torch_save(&f).unwrap_err().message.contains("neither"));
    }

    #[test]
    fn a_diffusers_folder_is_checked_against_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("transformer");
        std::fs::create_dir(&t).unwrap();
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "x_embedder.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "x_embedder.bias": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "proj_out.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
        }});
        std::fs::write(t.join(DIFFUSERS_INDEX), index.to_string()).unwrap();
        safetensors(
            &t.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
            &["x_embedder.weight"],
        );
        let problems = check_flux(dir.path());
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(shown[0].contains("config.json"), "{shown:#?}");
        assert!(
            shown[1].contains("00001-of-00002") && shown[1].contains("lacks 1 tensor(s)"),
            "{shown:#?}"
        );
        assert!(shown[2].contains("00002-of-00002"), "{shown:#?}");

        std::fs::write(t.join("config.json"), "{}").unwrap();
        safetensors(
            &t.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
            &["x_embedder.weight", "x_embedder.bias"],
        );
        safetensors(
            &t.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
            &["proj_out.weight"],
        );
        assert_eq!(check_flux(dir.path()), []);
        assert!(matches!(flux_layout(dir.path()).unwrap(), Layout::Diffusers(f) if f.len() == 2));
        assert_eq!(check_flux(&dir.path().join("nope"))[0].message, "does not exist");
    }
}
