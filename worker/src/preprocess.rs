//! `preprocess`: prompts file → text embeddings in the own layout ([`crate::data::shards`]).
//!
//! Like the reference's `torchrun ... preprocess_flux_embedding.py`, it can run as several
//! workers: rank R of W encodes the shards whose number is ≡ R (mod W). Each shard is written
//! under a temporary name and renamed when complete, so a re-run skips shards already there
//! (after checking they were made from the same prompts) and a crash leaves no half shard.
//! The manifest is written last, atomically, and only when every shard is complete: by the
//! single worker, by rank 0 if it finds them all, or by `--merge` once all ranks are done.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind};

use crate::data::DataError;
use crate::data::prompts::{Prompt, PromptFilter, read_prompts};
use crate::data::shards::{
    FORMAT, MANIFEST, Manifest, ManifestItem, dtype_name, read_shard_header, shard_name,
    write_shard,
};
use crate::text::{EncoderOptions, FluxTextEncoders, TextError};

/// What can stop preprocessing.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Reading prompts or writing the dataset.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Loading or running the encoders.
    #[error(transparent)]
    Text(#[from] TextError),
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A bad option or an inconsistent output directory.
    #[error("{0}")]
    Invalid(String),
}

/// Options of one preprocessing run.
#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    /// FLUX.1-dev-style folder with the encoders and tokenizers.
    pub model_dir: PathBuf,
    /// The prompts file.
    pub prompts: PathBuf,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Prompts per shard.
    pub shard_size: usize,
    /// Prompts per encoder call.
    pub batch_size: usize,
    /// Prompt filtering (CJK, cap).
    pub filter: PromptFilter,
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers.
    pub world_size: usize,
    /// Device for the encoders.
    pub device: Device,
    /// Compute dtype (outputs are stored as bf16 regardless, as the reference stores them).
    pub kind: Kind,
    /// T5 tokens per prompt.
    pub max_sequence_length: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreprocessReport {
    /// Prompts after filtering.
    pub prompts: usize,
    /// Shards in the dataset.
    pub shards: usize,
    /// Shards this run encoded.
    pub written: usize,
    /// Shards this run found complete and skipped.
    pub skipped: usize,
    /// Whether the manifest now exists.
    pub manifest_written: bool,
}

fn expected_shards(n: usize, shard_size: usize) -> usize {
    n.div_ceil(shard_size)
}

fn check_options(o: &PreprocessOptions) -> Result<(), PreprocessError> {
    if o.shard_size == 0 || o.batch_size == 0 {
        return Err(PreprocessError::Invalid("--shard-size and --batch-size must be > 0".into()));
    }
    if o.world_size == 0 || o.rank >= o.world_size {
        return Err(PreprocessError::Invalid(format!(
            "rank {} is not in a world of {}",
            o.rank, o.world_size
        )));
    }
    Ok(())
}

/// Is shard `k` already complete and made from these prompts? Errors if it exists but was
/// made from other prompts (the directory belongs to another run).
fn shard_done(path: &Path, first: usize, captions: &[String]) -> Result<bool, PreprocessError> {
    if !path.is_file() {
        return Ok(false);
    }
    let h = read_shard_header(path)?;
    if h.first_index != first || h.captions != captions {
        return Err(PreprocessError::Invalid(format!(
            "{} was made from different prompts; use another --out or delete it",
            path.display()
        )));
    }
    Ok(true)
}

/// Runs (this rank's part of) preprocessing, then writes the manifest if every shard exists
/// and this is rank 0.
pub fn run(o: &PreprocessOptions) -> Result<PreprocessReport, PreprocessError> {
    check_options(o)?;
    let prompts = read_prompts(&o.prompts, o.filter)?;
    if prompts.is_empty() {
        return Err(PreprocessError::Invalid(format!("{}: no prompts left", o.prompts.display())));
    }
    std::fs::create_dir_all(&o.out_dir).map_err(|e| DataError::io(&o.out_dir, e))?;
    let n_shards = expected_shards(prompts.len(), o.shard_size);
    let mine: Vec<usize> = (0..n_shards).filter(|k| k % o.world_size == o.rank).collect();
    let captions_of = |k: usize| -> Vec<String> {
        let end = ((k + 1) * o.shard_size).min(prompts.len());
        prompts[k * o.shard_size..end].iter().map(|p| p.text.clone()).collect()
    };
    let mut todo = Vec::new();
    let mut skipped = 0;
    for &k in &mine {
        if shard_done(&o.out_dir.join(shard_name(k)), k * o.shard_size, &captions_of(k))? {
            skipped += 1;
        } else {
            todo.push(k);
        }
    }
    if !todo.is_empty() {
        let encoders = FluxTextEncoders::load(
            &o.model_dir,
            EncoderOptions {
                device: o.device,
                kind: o.kind,
                max_sequence_length: o.max_sequence_length,
            },
        )?;
        let total: usize = todo.iter().map(|&k| captions_of(k).len()).sum();
        let bar = if o.progress { ProgressBar::new(total as u64) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} prompts, {per_sec}, eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("rank {}/{}", o.rank, o.world_size));
        for &k in &todo {
            let captions = captions_of(k);
            let (mut pe, mut pooled) = (Vec::new(), Vec::new());
            for chunk in captions.chunks(o.batch_size) {
                let enc = encoders.encode(chunk)?;
                pe.push(enc.prompt_embeds.f_to_kind(Kind::BFloat16)?);
                pooled.push(enc.pooled_prompt_embeds.f_to_kind(Kind::BFloat16)?);
                bar.inc(chunk.len() as u64);
            }
            let pe = tch::Tensor::f_cat(&pe, 0)?;
            let pooled = tch::Tensor::f_cat(&pooled, 0)?;
            write_shard(&o.out_dir.join(shard_name(k)), k * o.shard_size, &captions, &pe, &pooled)?;
        }
        bar.finish();
    }
    let manifest_written = if o.rank == 0 {
        match merge_prompts(&o.out_dir, &prompts, o.shard_size) {
            Ok(()) => true,
            Err(PreprocessError::Invalid(m)) if o.world_size > 1 => {
                tracing::info!(reason = %m, "manifest not written yet; run `preprocess --merge` when all ranks are done");
                false
            }
            Err(e) => return Err(e),
        }
    } else {
        false
    };
    Ok(PreprocessReport {
        prompts: prompts.len(),
        shards: n_shards,
        written: todo.len(),
        skipped,
        manifest_written,
    })
}

/// `preprocess --merge`: writes the manifest from the shards of a (multi-rank) run; fails,
/// naming the missing shards, unless every shard is complete.
pub fn merge(o: &PreprocessOptions) -> Result<(), PreprocessError> {
    check_options(o)?;
    let prompts = read_prompts(&o.prompts, o.filter)?;
    merge_prompts(&o.out_dir, &prompts, o.shard_size)
}

fn merge_prompts(out: &Path, prompts: &[Prompt], shard_size: usize) -> Result<(), PreprocessError> {
    let n_shards = expected_shards(prompts.len(), shard_size);
    let missing: Vec<String> =
        (0..n_shards).map(shard_name).filter(|n| !out.join(n).is_file()).collect();
    if !missing.is_empty() {
        return Err(PreprocessError::Invalid(format!(
            "{}: {} of {n_shards} shards not finished: {}",
            out.display(),
            missing.len(),
            missing.join(", ")
        )));
    }
    let mut items = Vec::with_capacity(prompts.len());
    let mut shape = None;
    for k in 0..n_shards {
        let path = out.join(shard_name(k));
        let h = read_shard_header(&path)?;
        let first = k * shard_size;
        let want: Vec<&str> = prompts[first..(first + shard_size).min(prompts.len())]
            .iter()
            .map(|p| p.text.as_str())
            .collect();
        if h.first_index != first || h.captions.iter().map(String::as_str).ne(want.iter().copied())
        {
            return Err(PreprocessError::Invalid(format!(
                "{} was made from different prompts",
                path.display()
            )));
        }
        let s = (h.prompt_embeds_shape.clone(), h.pooled_shape.clone(), h.kind);
        if shape.get_or_insert_with(|| s.clone()) != &s {
            return Err(PreprocessError::Invalid(format!(
                "{}: shapes differ from shard 0",
                path.display()
            )));
        }
        for (off, c) in h.captions.into_iter().enumerate() {
            items.push(ManifestItem { index: first + off, caption: c, shard: k, offset: off });
        }
    }
    let (pe, pooled, kind) = shape.expect("at least one shard");
    Manifest {
        format: FORMAT.into(),
        prompt_embeds_shape: pe,
        pooled_shape: pooled,
        dtype: dtype_name(kind).into(),
        shards: (0..n_shards).map(shard_name).collect(),
        items,
    }
    .write(out)?;
    tracing::info!(path = %out.join(MANIFEST).display(), "manifest written");
    Ok(())
}
