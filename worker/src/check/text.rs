//! `check encode-prompts --model-dir DIR --prompts prompts.txt --out out.safetensors`: the
//! T5 and CLIP encoders over a prompts file (one per line, no filtering), written as
//! `prompt_embeds [N, 512, D]` and `pooled_prompt_embeds [N, D']`, plus the token ids.

use std::path::PathBuf;

use anyhow::Context;

use crate::data::prompts::{PromptFilter, read_prompts};
use crate::text::{EncoderOptions, FluxTextEncoders};

/// Arguments of `check encode-prompts`.
#[derive(Debug, clap::Args)]
pub struct EncodePromptsArgs {
    /// Folder laid out like FLUX.1-dev (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// Prompts, one per line (UTF-8).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Compute and output dtype.
    #[arg(long, value_enum, default_value_t = DType::Bf16)]
    pub dtype: DType,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// T5 tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
}

/// A compute dtype on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DType {
    /// bfloat16, as FLUX runs the encoders.
    Bf16,
    /// float32, for parity checks.
    F32,
}

impl DType {
    /// The tch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            DType::Bf16 => tch::Kind::BFloat16,
            DType::F32 => tch::Kind::Float,
        }
    }
}

/// Parses `cpu` / `cuda` / `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| anyhow::anyhow!("device {s:?}: expected cpu or cuda:N")),
    }
}

/// Runs `check encode-prompts`.
pub fn encode_prompts(a: &EncodePromptsArgs) -> anyhow::Result<()> {
    let prompts: Vec<String> =
        read_prompts(&a.prompts, PromptFilter::default())?.into_iter().map(|p| p.text).collect();
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompts", a.prompts.display());
    let enc = FluxTextEncoders::load(
        &a.model_dir,
        EncoderOptions {
            device: parse_device(&a.device)?,
            kind: a.dtype.kind(),
            max_sequence_length: a.max_sequence_length,
        },
    )?;
    let (t5_ids, clip_ids) = enc.tokenize(&prompts)?;
    let out = enc.encode(&prompts)?;
    tch::Tensor::write_safetensors(
        &[
            ("prompt_embeds", out.prompt_embeds.contiguous()),
            ("pooled_prompt_embeds", out.pooled_prompt_embeds.contiguous()),
            ("t5_ids", t5_ids),
            ("clip_ids", clip_ids),
        ],
        &a.out,
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {}: prompt_embeds {:?}, pooled_prompt_embeds {:?}",
        a.out.display(),
        out.prompt_embeds.size(),
        out.pooled_prompt_embeds.size()
    );
    Ok(())
}
