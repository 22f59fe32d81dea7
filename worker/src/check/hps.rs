//! The HPS checks: `check hps-score`, `check tokenize`, and `convert` (PyTorch pickle →
//! safetensors).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use tch::{Device, Kind, Tensor};

use crate::clip::read_state_dict;
use crate::reward::hps::{HpsFiles, HpsReward};
use crate::reward::tokenizer::ClipTokenizer;

/// `check hps-score`.
#[derive(Args, Debug)]
pub struct HpsScoreArgs {
    /// Directory with the HPS weights (`.bin`/`.pt` or `.safetensors`), the BPE vocabulary and
    /// optionally `open_clip_config.json`.
    #[arg(long)]
    pub model_dir: PathBuf,
    /// safetensors file holding a uint8 `[N, H, W, 3]` tensor named `images`.
    #[arg(long)]
    pub images: PathBuf,
    /// Text file with one prompt per line (N lines).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Where to write the JSON result (scores and both feature sets).
    #[arg(long)]
    pub out: PathBuf,
    /// BPE vocabulary, if not in the model directory.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `check tokenize`.
#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// `bpe_simple_vocab_16e6.txt.gz`.
    #[arg(long)]
    pub vocab: PathBuf,
    /// Text file with one prompt per line.
    #[arg(long)]
    pub prompts: PathBuf,
}

/// `convert`: rewrite a PyTorch checkpoint as safetensors.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A `torch.save` file (zip or legacy format): a state dict, flat or `{'state_dict': ...}`
    /// (`open_clip_pytorch_model.bin`, `HPS_v2.1_compressed.pt`).
    #[arg(long)]
    pub input: PathBuf,
    /// Output file; defaults to the input with a `.safetensors` extension.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => bail!("unknown device '{s}' (use cpu or cuda:N)"),
        },
    }
}

fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // One prompt per line; a trailing newline does not make an extra (empty) prompt.
    Ok(text
        .strip_suffix('\n')
        .unwrap_or(&text)
        .split('\n')
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect())
}

fn rows(t: &Tensor) -> anyhow::Result<Vec<Vec<f64>>> {
    let (n, _) = t.size2()?;
    (0..n).map(|i| Ok(Vec::<f64>::try_from(&t.f_get(i)?.f_to_kind(Kind::Double)?)?)).collect()
}

/// Runs `check hps-score`.
pub fn run_hps_score(a: &HpsScoreArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    let files = HpsFiles::discover(&a.model_dir, a.vocab.as_deref())?;
    let hps = HpsReward::from_files(&files, device)?;
    let tensors = Tensor::read_safetensors(&a.images)
        .with_context(|| format!("reading {}", a.images.display()))?;
    let Some((_, images)) = tensors.into_iter().find(|(k, _)| k == "images") else {
        bail!("{} has no tensor named 'images'", a.images.display());
    };
    let prompts = read_prompts(&a.prompts)?;
    let out = hps.forward(&images, &prompts)?;
    let non_finite = out.scores.iter().filter(|s| !s.is_finite()).count();
    let json = serde_json::json!({
        // serde_json writes NaN/Inf as null; the count says so explicitly.
        "scores": out.scores,
        "non_finite_scores": non_finite,
        "image_features": rows(&out.image_features)?,
        "text_features": rows(&out.text_features)?,
        "weights": files.weights,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if non_finite > 0 {
        bail!("{non_finite} of {} scores are NaN or infinite", out.scores.len());
    }
    Ok(())
}

/// Runs `check tokenize`.
pub fn run_tokenize(a: &TokenizeArgs) -> anyhow::Result<()> {
    let tok = ClipTokenizer::from_file(&a.vocab)?;
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for (i, p) in read_prompts(&a.prompts)?.iter().enumerate() {
        let ids = tok.tokenize(p).with_context(|| format!("prompt {}", i + 1))?;
        writeln!(w, "{}", serde_json::to_string(&ids)?)?;
    }
    Ok(())
}

/// Runs `convert`.
pub fn run_convert(a: &ConvertArgs) -> anyhow::Result<()> {
    let out = a.output.clone().unwrap_or_else(|| a.input.with_extension("safetensors"));
    if out == a.input {
        bail!("output {} would overwrite the input", out.display());
    }
    let tensors = read_state_dict(&a.input)?;
    // safetensors wants dense, contiguous tensors that own their data (views of a shared
    // storage, as torch.save keeps them, are copied out).
    let owned: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| {
            let mut own = t.f_zeros_like()?;
            own.f_copy_(&t)?;
            Ok((k, own))
        })
        .collect::<Result<_, tch::TchError>>()?;
    Tensor::write_safetensors(&owned, &out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} tensors to {}", owned.len(), out.display());
    Ok(())
}
