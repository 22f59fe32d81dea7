//! `dancegrpo-worker dataset inspect DIR` and `dancegrpo-worker preprocess ...`, the command
//! lines over [`crate::data`] and [`crate::preprocess`].

use std::path::PathBuf;

use crate::check::text::{DType, parse_device};
use crate::data::prompts::PromptFilter;
use crate::preprocess::{PreprocessOptions, merge, run};

/// `dataset` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DatasetCommand {
    /// Print count, shapes, dtypes and a few captions; flag missing or malformed files.
    Inspect {
        /// Dataset directory (manifest.json or videos2caption.json).
        dir: PathBuf,
        /// Captions to show.
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
}

impl DatasetCommand {
    /// Runs it; an error when any file is missing or malformed.
    pub fn run(self) -> anyhow::Result<()> {
        let DatasetCommand::Inspect { dir, show } = self;
        let ds = super::open(&dir)?;
        let spec = ds.spec().clone();
        println!("layout: {}", ds.layout());
        println!("prompts: {}", ds.len());
        println!("prompt_embeds: {:?} {:?}", spec.prompt_embeds_shape, spec.kind);
        println!("pooled_prompt_embeds: {:?} {:?}", spec.pooled_shape, spec.kind);
        for i in 0..ds.len().min(show) {
            println!("caption[{i}]: {}", ds.caption(i)?);
        }
        let errs = ds.verify();
        for e in &errs {
            println!("problem: {e}");
        }
        anyhow::ensure!(errs.is_empty(), "{} problem(s) in {}", errs.len(), dir.display());
        println!("ok");
        Ok(())
    }
}

/// Arguments of `preprocess`.
#[derive(Debug, clap::Args)]
pub struct PreprocessArgs {
    /// Folder laid out like FLUX.1-dev (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// Prompts file, one per line (UTF-8).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompts per shard.
    #[arg(long, default_value_t = 256)]
    pub shard_size: usize,
    /// Prompts per encoder call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Keep prompts with CJK ideographs (the reference drops them).
    #[arg(long)]
    pub keep_cjk: bool,
    /// Keep at most this many prompts (the reference keeps 50000).
    #[arg(long)]
    pub max_prompts: Option<usize>,
    /// This worker's rank.
    #[arg(long, env = "RANK", default_value_t = 0)]
    pub rank: usize,
    /// Number of workers.
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    pub world_size: usize,
    /// Only write the manifest from the finished shards of all ranks.
    #[arg(long)]
    pub merge: bool,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype (stored embeddings are bf16).
    #[arg(long, value_enum, default_value_t = DType::Bf16)]
    pub dtype: DType,
    /// T5 tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl PreprocessArgs {
    /// Runs `preprocess`.
    pub fn run(self) -> anyhow::Result<()> {
        let o = PreprocessOptions {
            model_dir: self.model_dir,
            prompts: self.prompts,
            out_dir: self.out,
            shard_size: self.shard_size,
            batch_size: self.batch_size,
            filter: PromptFilter { drop_cjk: !self.keep_cjk, max: self.max_prompts },
            rank: self.rank,
            world_size: self.world_size,
            device: parse_device(&self.device)?,
            kind: self.dtype.kind(),
            max_sequence_length: self.max_sequence_length,
            progress: !self.quiet,
        };
        if self.merge {
            merge(&o)?;
            println!("manifest written to {}", o.out_dir.display());
            return Ok(());
        }
        let r = run(&o)?;
        println!(
            "rank {}/{}: {} prompts in {} shards; wrote {}, skipped {} finished; manifest {}",
            o.rank,
            o.world_size,
            r.prompts,
            r.shards,
            r.written,
            r.skipped,
            if r.manifest_written { "written" } else { "not written yet (run --merge)" }
        );
        Ok(())
    }
}
