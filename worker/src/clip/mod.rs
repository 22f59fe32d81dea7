//! open_clip CLIP towers in tch (the HPS-v2.1 reward model is open_clip ViT-H-14), their
//! configuration, and strict loading of open_clip checkpoints: `torch.save` files
//! (`open_clip_pytorch_model.bin`, `HPS_v2.1_compressed.pt`, read by [`crate::pt`]) or
//! safetensors; and of transformers `CLIPModel` folders (PickScore, OpenAI CLIP) through a
//! key mapping onto the same towers ([`hf`]).

/// The model configuration (open_clip's JSON format; ViT-H-14 preset).
pub mod config;
/// transformers `CLIPModel` checkpoints mapped onto the same towers.
pub mod hf;
/// Strict state-dict loading: missing, unexpected and mis-shaped keys are errors.
pub mod load;
/// The CLIP model: image and text towers.
pub mod model;
/// The shared residual transformer.
pub mod transformer;

pub use config::ClipConfig;
pub use load::{check_shapes, load_into, read_state_dict};
pub use model::{ClipModel, TextPool, l2_normalize, state_dict_shapes};

/// Errors of the CLIP model and its loaders.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    /// A bad model configuration (open_clip's JSON or a transformers `config.json`).
    #[error("CLIP config: {0}")]
    Config(String),
    /// A `torch.save` file could not be read (the error names the file).
    #[error(transparent)]
    Pt(#[from] crate::pt::PtError),
    /// A weight file could not be read.
    #[error("reading {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The checkpoint lacks a key the model has.
    #[error("{path}: missing key '{key}' (expected shape {expected:?})")]
    MissingKey {
        /// The file.
        path: String,
        /// The state-dict key.
        key: String,
        /// The model's shape for it.
        expected: Vec<i64>,
    },
    /// The checkpoint has a key the model does not.
    #[error("{path}: unexpected key '{key}' (shape {found:?}) not in the model")]
    UnexpectedKey {
        /// The file.
        path: String,
        /// The state-dict key.
        key: String,
        /// Its shape in the file.
        found: Vec<i64>,
    },
    /// A key whose shape differs between model and checkpoint.
    #[error("{path}: key '{key}' has shape {found:?} in the file but {expected:?} in the model")]
    ShapeMismatch {
        /// The file.
        path: String,
        /// The state-dict key.
        key: String,
        /// The model's shape.
        expected: Vec<i64>,
        /// The file's shape.
        found: Vec<i64>,
    },
    /// Bad input to a forward pass.
    #[error("bad input: {0}")]
    Input(String),
    /// libtorch failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
