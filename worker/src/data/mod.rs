//! Prompt datasets: precomputed text embeddings, served to the training loop by index.
//!
//! Two layouts, one trait ([`PromptDataset`]):
//! - [`reference`]: DanceGRPO / MindSpeed-MM's `videos2caption.json` with one `.pt` file per
//!   prompt in `prompt_embed/`, `pooled_prompt_embeds/` and `text_ids/`.
//! - [`shards`]: this project's own, written by `preprocess`: safetensors shards of N
//!   prompts plus `manifest.json`.
//!
//! [`prompts`] reads the prompt text files both start from.

/// The `dataset` and `preprocess` command lines.
pub mod cli;
/// The prompts text file.
pub mod prompts;
/// The DanceGRPO reference layout.
pub mod reference;
/// The project's own sharded layout.
pub mod shards;

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

/// What can be wrong with a dataset or a prompts file; every variant names the place.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// A prompts file problem at a line (1-based).
    #[error("{path}:{line}: {message}")]
    Prompt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A manifest or index entry problem.
    #[error("{path}: entry {index}: {message}")]
    Entry {
        /// The manifest.
        path: PathBuf,
        /// Entry (item) index.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A malformed file (shard, `.pt`, manifest).
    #[error("{path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An index past the end.
    #[error("index {index} out of range for a dataset of {len}")]
    OutOfRange {
        /// Asked for.
        index: usize,
        /// Items.
        len: usize,
    },
    /// A `.pt` file problem.
    #[error(transparent)]
    Pt(#[from] crate::pt::PtError),
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl DataError {
    pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        DataError::Io { path: path.to_owned(), message: e.to_string() }
    }
    pub(crate) fn malformed(path: &Path, message: impl Into<String>) -> Self {
        DataError::Malformed { path: path.to_owned(), message: message.into() }
    }
}

/// One prompt's conditioning, as the training loop consumes it.
#[derive(Debug)]
pub struct PromptItem {
    /// The prompt text.
    pub caption: String,
    /// T5 embeddings `[L, D]` (FLUX.1-dev: `[512, 4096]` bf16).
    pub prompt_embeds: Tensor,
    /// CLIP pooled embedding `[D']` (`[768]`).
    pub pooled_prompt_embeds: Tensor,
    /// Text position ids `[L, 3]`; zeros in FLUX.
    pub text_ids: Tensor,
}

/// Shapes and dtypes every item of a dataset shares.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// `prompt_embeds` shape, `[L, D]`.
    pub prompt_embeds_shape: Vec<i64>,
    /// `pooled_prompt_embeds` shape, `[D']`.
    pub pooled_shape: Vec<i64>,
    /// dtype of both.
    pub kind: Kind,
}

/// A prompt dataset with random access; both layouts implement it.
pub trait PromptDataset: Send + Sync + std::fmt::Debug {
    /// Number of prompts.
    fn len(&self) -> usize;
    /// True when there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The caption of item `index`, without loading tensors.
    fn caption(&self, index: usize) -> Result<&str, DataError>;
    /// Item `index`, tensors on the CPU.
    fn get(&self, index: usize) -> Result<PromptItem, DataError>;
    /// Shapes and dtype shared by all items.
    fn spec(&self) -> &DatasetSpec;
    /// Checks every item's files without loading all the data; one message per problem.
    fn verify(&self) -> Vec<DataError>;
    /// The layout's name, for messages.
    fn layout(&self) -> &'static str;
}

/// Opens `dir` in whichever layout it holds: `manifest.json` (own) or `videos2caption.json`
/// (reference).
pub fn open(dir: &Path) -> Result<Box<dyn PromptDataset>, DataError> {
    if dir.join(shards::MANIFEST).is_file() {
        Ok(Box::new(shards::ShardDataset::open(dir)?))
    } else if dir.join(reference::INDEX).is_file() {
        Ok(Box::new(reference::ReferenceDataset::open(dir)?))
    } else {
        Err(DataError::malformed(
            dir,
            format!("neither {} nor {} found", shards::MANIFEST, reference::INDEX),
        ))
    }
}

/// Zeros `[L, 3]` in `kind`: FLUX's text ids.
pub(crate) fn text_ids(len: i64, kind: Kind) -> Tensor {
    Tensor::zeros([len, 3], (kind, tch::Device::Cpu))
}
