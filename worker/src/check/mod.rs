//! `dancegrpo-worker check ...`: one-shot commands that run one component of the worker on
//! given files and write its outputs, for parity checks against the Python reference (with any
//! weights) and for debugging a deployment. Every subcommand's `--help` names its tensors.

/// FLUX transformer, VAE and SDE-step checks.
pub mod flux;
/// HPS reward checks (`hps-score`, `tokenize`) and the weight converter.
pub mod hps;
/// `check encode-prompts`.
pub mod text;

/// The `check` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CheckCommand {
    /// FLUX transformer, VAE decoder and SDE step checks.
    #[command(flatten)]
    Flux(flux::FluxCheck),
    /// Encode prompts with the T5 and CLIP text encoders, as FLUX's encode_prompt does.
    EncodePrompts(text::EncodePromptsArgs),
    /// Score images against prompts with the HPS-v2.1 model in a directory.
    HpsScore(hps::HpsScoreArgs),
    /// Print the open_clip token ids of each prompt (one JSON list of 77 per line).
    Tokenize(hps::TokenizeArgs),
}

impl CheckCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            CheckCommand::Flux(c) => flux::run(c),
            CheckCommand::EncodePrompts(a) => text::encode_prompts(&a),
            CheckCommand::HpsScore(a) => hps::run_hps_score(&a),
            CheckCommand::Tokenize(a) => hps::run_tokenize(&a),
        }
    }
}
