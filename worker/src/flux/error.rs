//! The error type of the model code (FLUX transformer, VAE, sampler, check commands).

use std::path::PathBuf;

/// Result alias for the model code.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened, mapped or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A weight or tensor file that is not valid safetensors / JSON.
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A model configuration that cannot describe a valid network.
    #[error("bad model config: {0}")]
    Config(String),
    /// A weight whose shape differs from the one the model expects.
    #[error("weight {key}: the model expects shape {expected:?}, {} holds {found:?}", file.display())]
    Shape {
        /// The key in the file.
        key: String,
        /// The shape the model needs.
        expected: Vec<i64>,
        /// The shape found in the file.
        found: Vec<i64>,
        /// The file.
        file: PathBuf,
    },
    /// Model weights that no file provided.
    #[error("{} weight(s) missing from {source_desc}: {}", keys.len(), keys.join(", "))]
    Missing {
        /// The missing keys (sorted).
        keys: Vec<String>,
        /// The checkpoint that lacks them.
        source_desc: String,
    },
    /// A file entry that matches no model weight.
    #[error("unexpected weight {key} in {} (no such parameter in the model)", file.display())]
    Unexpected {
        /// The key in the file.
        key: String,
        /// The file.
        file: PathBuf,
    },
    /// A weight stored in a dtype we cannot convert.
    #[error("weight {key} in {}: unsupported dtype {dtype}", file.display())]
    Dtype {
        /// The key in the file.
        key: String,
        /// The stored dtype.
        dtype: String,
        /// The file.
        file: PathBuf,
    },
    /// Inputs of the wrong shape, dtype or value.
    #[error("bad input: {0}")]
    Input(String),
    /// A sharded block's weights could not be gathered, or its gradient not reduced (a peer
    /// died, a collective timed out).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        ModelError::Format { path: path.into(), message: message.to_string() }
    }
}
