//! The project's own prompt-embedding layout, written by `preprocess`:
//!
//! - `shard-00000.safetensors`, ...: shard `k` holds prompts `k*N .. k*N+n` (n ≤ N) as
//!   `prompt_embeds [n, L, D]` and `pooled_prompt_embeds [n, D']` (bf16), and in its header
//!   metadata the `first_index` and the `captions` (a JSON list). A shard is self-describing,
//!   so ranks need not talk to each other and the manifest can be rebuilt from the shards.
//! - `manifest.json`: the shapes, the shard files, and per prompt `{index, caption, shard,
//!   offset}`. It is written last and atomically, and lists only complete shards.
//!
//! Shards are written to a temporary name, synced, then renamed, so a shard file that exists
//! under its final name is complete. Reading maps the files and copies out one prompt.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, View};
use tch::{Kind, Tensor};

use super::{DataError, DatasetSpec, PromptDataset, PromptItem};

/// The manifest's file name.
pub const MANIFEST: &str = dancegrpo_proto::layout::DATA_MANIFEST;
/// The format tag in manifests and shard metadata.
pub const FORMAT: &str = "dancegrpo-prompt-embeds/1";

/// Shard `k`'s file name.
pub fn shard_name(k: usize) -> String {
    format!("shard-{k:05}.safetensors")
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// `[L, D]`.
    pub prompt_embeds_shape: Vec<i64>,
    /// `[D']`.
    pub pooled_shape: Vec<i64>,
    /// `bf16`, `f16` or `f32`.
    pub dtype: String,
    /// Shard files, relative to the manifest.
    pub shards: Vec<String>,
    /// One entry per prompt, in index order.
    pub items: Vec<ManifestItem>,
}

/// One prompt in the manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestItem {
    /// Index of the prompt in the (filtered) prompts file.
    pub index: usize,
    /// The prompt.
    pub caption: String,
    /// Position in [`Manifest::shards`].
    pub shard: usize,
    /// Row inside the shard.
    pub offset: usize,
}

impl Manifest {
    /// Writes `dir/manifest.json` atomically (temporary file, sync, rename).
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::io(&path, e))?;
        write_atomic(&path, text.as_bytes())
    }

    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let m: Self = serde_json::from_str(&text)
            .map_err(|e| DataError::malformed(&path, format!("bad manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(DataError::malformed(
                &path,
                format!("format {:?}, expected {FORMAT:?}", m.format),
            ));
        }
        Ok(m)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = tmp_name(path);
    std::fs::write(&tmp, bytes).map_err(|e| DataError::io(&tmp, e))?;
    sync_and_rename(&tmp, path)
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn sync_and_rename(tmp: &Path, path: &Path) -> Result<(), DataError> {
    File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| DataError::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| DataError::io(path, e))
}

fn dtype_of(kind: Kind) -> Option<(Dtype, &'static str)> {
    Some(match kind {
        Kind::BFloat16 => (Dtype::BF16, "bf16"),
        Kind::Half => (Dtype::F16, "f16"),
        Kind::Float => (Dtype::F32, "f32"),
        _ => return None,
    })
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        _ => return None,
    })
}

/// The name `dtype` string of a kind, for manifests and messages.
pub fn dtype_name(kind: Kind) -> &'static str {
    dtype_of(kind).map(|d| d.1).unwrap_or("unsupported")
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw(t: &Tensor, path: &Path) -> Result<Raw, DataError> {
    let (dtype, _) = dtype_of(t.kind())
        .ok_or_else(|| DataError::malformed(path, format!("cannot store {:?}", t.kind())))?;
    let t = t.f_contiguous()?;
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(Raw { dtype, shape: t.size().iter().map(|&s| s as usize).collect(), bytes })
}

/// Writes one shard crash-safely. `prompt_embeds` `[n, L, D]`, `pooled` `[n, D']`, same dtype.
pub fn write_shard(
    path: &Path,
    first_index: usize,
    captions: &[String],
    prompt_embeds: &Tensor,
    pooled: &Tensor,
) -> Result<(), DataError> {
    let n = captions.len() as i64;
    if prompt_embeds.size().first() != Some(&n) || pooled.size().first() != Some(&n) {
        return Err(DataError::malformed(path, "embeddings and captions differ in count"));
    }
    let (a, b) = (raw(prompt_embeds, path)?, raw(pooled, path)?);
    let meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("first_index".to_string(), first_index.to_string()),
        ("captions".to_string(), serde_json::to_string(captions).expect("strings serialise")),
    ]);
    let tmp = tmp_name(path);
    safetensors::serialize_to_file(
        [("prompt_embeds", &a), ("pooled_prompt_embeds", &b)],
        Some(meta),
        &tmp,
    )
    .map_err(|e| DataError::io(&tmp, e))?;
    sync_and_rename(&tmp, path)
}

/// A shard's header, validated against the file's length.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    /// Index of its first prompt.
    pub first_index: usize,
    /// Its prompts.
    pub captions: Vec<String>,
    /// `[L, D]`.
    pub prompt_embeds_shape: Vec<i64>,
    /// `[D']`.
    pub pooled_shape: Vec<i64>,
    /// dtype of both.
    pub kind: Kind,
    data_start: usize,
    pe_range: (usize, usize),
    pooled_range: (usize, usize),
}

/// Reads and checks a shard's header from its bytes (a map of the file).
fn parse_header(path: &Path, bytes: &[u8]) -> Result<ShardHeader, DataError> {
    let bad = |m: String| DataError::malformed(path, m);
    let (n, meta): (usize, Metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            bad(format!("not a readable safetensors shard (truncated or corrupt): {e}"))
        })?;
    let data_start = 8 + n;
    let info = |name: &str| meta.info(name).ok_or_else(|| bad(format!("no tensor {name}")));
    let (pe, pooled) = (info("prompt_embeds")?, info("pooled_prompt_embeds")?);
    let end = pe.data_offsets.1.max(pooled.data_offsets.1);
    if data_start + end != bytes.len() {
        return Err(bad(format!(
            "truncated or padded: header promises {} bytes, file has {}",
            data_start + end,
            bytes.len()
        )));
    }
    let kind = kind_of(pe.dtype).ok_or_else(|| bad(format!("unsupported dtype {:?}", pe.dtype)))?;
    if pooled.dtype != pe.dtype {
        return Err(bad(format!("dtypes differ: {:?} vs {:?}", pe.dtype, pooled.dtype)));
    }
    let md = meta.metadata().clone().unwrap_or_default();
    if md.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("metadata format is not {FORMAT}")));
    }
    let first_index = md
        .get("first_index")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("metadata first_index missing".into()))?;
    let captions: Vec<String> = md
        .get("captions")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("metadata captions missing".into()))?;
    let count = captions.len();
    if pe.shape.len() != 3
        || pe.shape[0] != count
        || pooled.shape.len() != 2
        || pooled.shape[0] != count
    {
        return Err(bad(format!(
            "shapes {:?} and {:?} do not hold {count} prompts",
            pe.shape, pooled.shape
        )));
    }
    Ok(ShardHeader {
        first_index,
        captions,
        prompt_embeds_shape: pe.shape[1..].iter().map(|&s| s as i64).collect(),
        pooled_shape: pooled.shape[1..].iter().map(|&s| s as i64).collect(),
        kind,
        data_start,
        pe_range: pe.data_offsets,
        pooled_range: pooled.data_offsets,
    })
}

fn map(path: &Path) -> Result<Mmap, DataError> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    // SAFETY: shards are never modified in place (written under a temporary name, then
    // renamed), so the mapped bytes do not change under us.
    unsafe { Mmap::map(&f) }.map_err(|e| DataError::io(path, e))
}

/// Reads and checks a shard's header (used to skip finished shards and to merge).
pub fn read_shard_header(path: &Path) -> Result<ShardHeader, DataError> {
    parse_header(path, &map(path)?)
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    header: ShardHeader,
}

/// A directory in the own layout.
pub struct ShardDataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    spec: DatasetSpec,
}

impl std::fmt::Debug for ShardDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardDataset")
            .field("dir", &self.dir)
            .field("len", &self.manifest.items.len())
            .finish()
    }
}

impl ShardDataset {
    /// Opens `dir`: reads the manifest, maps every shard and checks its header against it.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let manifest = Manifest::read(dir)?;
        let mpath = dir.join(MANIFEST);
        let kind = match manifest.dtype.as_str() {
            "bf16" => Kind::BFloat16,
            "f16" => Kind::Half,
            "f32" => Kind::Float,
            d => return Err(DataError::malformed(&mpath, format!("unknown dtype {d:?}"))),
        };
        let spec = DatasetSpec {
            prompt_embeds_shape: manifest.prompt_embeds_shape.clone(),
            pooled_shape: manifest.pooled_shape.clone(),
            kind,
        };
        let mut shards = Vec::with_capacity(manifest.shards.len());
        for (k, name) in manifest.shards.iter().enumerate() {
            let path = dir.join(name);
            let first = manifest.items.iter().position(|it| it.shard == k).unwrap_or(0);
            if !path.is_file() {
                return Err(DataError::Entry {
                    path: mpath.clone(),
                    index: first,
                    message: format!("missing file {}", path.display()),
                });
            }
            let map = map(&path)?;
            let header = parse_header(&path, &map)?;
            if header.prompt_embeds_shape != spec.prompt_embeds_shape
                || header.pooled_shape != spec.pooled_shape
                || header.kind != kind
            {
                return Err(DataError::malformed(
                    &path,
                    format!(
                        "holds {:?} {:?} / {:?}, the manifest says {:?} {:?} / {:?}",
                        header.kind,
                        header.prompt_embeds_shape,
                        header.pooled_shape,
                        kind,
                        spec.prompt_embeds_shape,
                        spec.pooled_shape
                    ),
                ));
            }
            shards.push(Shard { path, map, header });
        }
        for (i, it) in manifest.items.iter().enumerate() {
            let ok = shards.get(it.shard).is_some_and(|s| it.offset < s.header.captions.len());
            if !ok {
                return Err(DataError::Entry {
                    path: mpath.clone(),
                    index: i,
                    message: format!(
                        "points at shard {} row {}, which does not exist",
                        it.shard, it.offset
                    ),
                });
            }
        }
        Ok(Self { dir: dir.to_owned(), manifest, shards, spec })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

fn row(
    map: &[u8],
    start: usize,
    range: (usize, usize),
    n: usize,
    i: usize,
    shape: &[i64],
    kind: Kind,
) -> Result<Tensor, DataError> {
    let per = (range.1 - range.0) / n.max(1);
    let from = start + range.0 + i * per;
    Ok(Tensor::f_from_data_size(&map[from..from + per], shape, kind)?)
}

impl PromptDataset for ShardDataset {
    fn len(&self) -> usize {
        self.manifest.items.len()
    }

    fn caption(&self, index: usize) -> Result<&str, DataError> {
        self.manifest
            .items
            .get(index)
            .map(|it| it.caption.as_str())
            .ok_or(DataError::OutOfRange { index, len: self.len() })
    }

    fn get(&self, index: usize) -> Result<PromptItem, DataError> {
        let it = self
            .manifest
            .items
            .get(index)
            .ok_or(DataError::OutOfRange { index, len: self.len() })?;
        let s = &self.shards[it.shard];
        let h = &s.header;
        let n = h.captions.len();
        let pe = row(
            &s.map,
            h.data_start,
            h.pe_range,
            n,
            it.offset,
            &self.spec.prompt_embeds_shape,
            h.kind,
        )?;
        let pooled = row(
            &s.map,
            h.data_start,
            h.pooled_range,
            n,
            it.offset,
            &self.spec.pooled_shape,
            h.kind,
        )?;
        Ok(PromptItem {
            caption: it.caption.clone(),
            prompt_embeds: pe,
            pooled_prompt_embeds: pooled,
            text_ids: super::text_ids(self.spec.prompt_embeds_shape[0], h.kind),
        })
    }

    fn spec(&self) -> &DatasetSpec {
        &self.spec
    }

    fn verify(&self) -> Vec<DataError> {
        let mpath = self.dir.join(MANIFEST);
        let mut errs = Vec::new();
        for (i, it) in self.manifest.items.iter().enumerate() {
            let s = &self.shards[it.shard];
            if s.header.captions.get(it.offset) != Some(&it.caption) {
                errs.push(DataError::Entry {
                    path: mpath.clone(),
                    index: i,
                    message: format!(
                        "caption differs from row {} of {}",
                        it.offset,
                        s.path.display()
                    ),
                });
            }
        }
        errs
    }

    fn layout(&self) -> &'static str {
        "own (manifest.json + safetensors shards)"
    }
}
