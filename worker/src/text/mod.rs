//! Prompt text encoders for FLUX.1-dev, as diffusers' `FluxPipeline.encode_prompt` runs them:
//! the T5 v1.1 encoder (`text_encoder_2/`) gives `prompt_embeds` `[512, 4096]`, the CLIP-L
//! text tower (`text_encoder/`) gives `pooled_prompt_embeds` `[768]`. Both are needed only
//! once per prompt, by the `preprocess` command; training reads the stored embeddings.
//!
//! Layout: [`tokenizer`] (both tokenizers), [`t5`] and [`clip`] (the networks),
//! [`weights`] (checked loading), [`encode`] (the two together, `encode_prompt`).

/// CLIP-L/14 text tower.
pub mod clip;
/// Both encoders together: FLUX's `encode_prompt`.
pub mod encode;
/// T5 v1.1 encoder.
pub mod t5;
/// The T5 and CLIP tokenizers.
pub mod tokenizer;
/// Checkpoint tensors by name, shape-checked.
pub mod weights;

use std::path::Path;

pub use encode::{EncodedPrompts, EncoderOptions, FluxTextEncoders};

/// What can go wrong loading or running the text encoders.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        message: String,
    },
    /// A config.json is missing fields or asks for something unsupported.
    #[error("config: {0}")]
    Config(String),
    /// A weight is missing, has the wrong shape, or its file is unreadable.
    #[error("weights: {0}")]
    Weights(String),
    /// A tokenizer file is missing or malformed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl TextError {
    pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        TextError::Io { path: path.display().to_string(), message: e.to_string() }
    }
}
