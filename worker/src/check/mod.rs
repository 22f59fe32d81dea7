//! `dancegrpo-worker check ...`: one-shot commands that run a piece of the worker on given
//! inputs and write its outputs, for comparison with the Python reference.

/// `check encode-prompts`.
pub mod text;

/// The `check` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CheckCommand {
    /// Encode prompts with the T5 and CLIP text encoders, as FLUX's encode_prompt does.
    EncodePrompts(text::EncodePromptsArgs),
}

impl CheckCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            CheckCommand::EncodePrompts(a) => text::encode_prompts(&a),
        }
    }
}
