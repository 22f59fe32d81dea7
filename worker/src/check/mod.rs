//! `dancegrpo-worker check ...`: small commands that run one component on files, for parity
//! checks against the Python reference and for debugging a deployment.

/// HPS reward checks (`hps-score`, `tokenize`) and the weight converter.
pub mod hps;

use clap::Subcommand;

/// The check subcommands.
#[derive(Subcommand, Debug)]
pub enum CheckCommand {
    /// Score images against prompts with the HPS-v2.1 model in a directory.
    HpsScore(hps::HpsScoreArgs),
    /// Print the open_clip token ids of each prompt (one JSON list of 77 per line).
    Tokenize(hps::TokenizeArgs),
}

/// Runs a check command.
pub fn run(cmd: CheckCommand) -> anyhow::Result<()> {
    match cmd {
        CheckCommand::HpsScore(a) => hps::run_hps_score(&a),
        CheckCommand::Tokenize(a) => hps::run_tokenize(&a),
    }
}
