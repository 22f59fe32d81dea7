//! The HPS-v2.1 reward: open_clip ViT-H-14 fine-tuned by HPSv2; the score is the cosine
//! similarity of the L2-normalised image and text features (no logit scale), as HPSv2's
//! `img_score.py` and DanceGRPO compute it.
//!
//! Model directory layout (what HPSv2 / DanceGRPO download into `hps_ckpt/`):
//! - `open_clip_pytorch_model.bin` (laion2B base) then `HPS_v2.1_compressed.pt` on top,
//!   both `torch.save` files, loaded in that order, each strictly; or `.safetensors` files
//!   of the same stems (what `dancegrpo-worker convert` writes), preferred when present;
//! - `bpe_simple_vocab_16e6.txt.gz`, the tokenizer's BPE merges;
//! - optionally `open_clip_config.json` (open_clip format); ViT-H-14 otherwise.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::preprocess::preprocess_batch;
use super::tokenizer::ClipTokenizer;
use super::{Reward, RewardError, check_batch};
use crate::clip::{
    ClipConfig, ClipModel, check_shapes, l2_normalize, load_into, read_state_dict,
    state_dict_shapes,
};

/// Registered name of this reward.
pub const NAME: &str = "hpsv2";
/// File name of the tokenizer vocabulary.
pub const VOCAB_FILE: &str = "bpe_simple_vocab_16e6.txt.gz";
/// File name of the optional model config.
pub const CONFIG_FILE: &str = "open_clip_config.json";
/// Stems of the weight files, in load order.
pub const WEIGHT_STEMS: [(&str, &str); 2] =
    [("open_clip_pytorch_model", "bin"), ("HPS_v2.1_compressed", "pt")];

/// The files an HPS model directory resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct HpsFiles {
    /// Model config; `None` means ViT-H-14.
    pub config: Option<PathBuf>,
    /// Weight files, in load order (each loaded strictly).
    pub weights: Vec<PathBuf>,
    /// The BPE vocabulary.
    pub vocab: PathBuf,
}

impl HpsFiles {
    /// Resolves the files in `dir` (see the module docs). `vocab` overrides the vocabulary.
    pub fn discover(dir: &Path, vocab: Option<&Path>) -> Result<Self, RewardError> {
        if !dir.is_dir() {
            return Err(RewardError::Files(format!(
                "HPS model dir {} does not exist",
                dir.display()
            )));
        }
        let config = Some(dir.join(CONFIG_FILE)).filter(|p| p.is_file());
        let mut weights = Vec::new();
        for (stem, ext) in WEIGHT_STEMS {
            let st = dir.join(format!("{stem}.safetensors"));
            let pt = dir.join(format!("{stem}.{ext}"));
            if st.is_file() {
                weights.push(st);
            } else if pt.is_file() {
                weights.push(pt);
            }
        }
        if !weights.iter().any(|p| p.file_stem().is_some_and(|s| s == WEIGHT_STEMS[1].0)) {
            return Err(RewardError::Files(format!(
                "{} holds neither {}.pt nor {}.safetensors",
                dir.display(),
                WEIGHT_STEMS[1].0,
                WEIGHT_STEMS[1].0
            )));
        }
        let vocab = vocab.map(Path::to_path_buf).unwrap_or_else(|| dir.join(VOCAB_FILE));
        if !vocab.is_file() {
            return Err(RewardError::Files(format!(
                "BPE vocabulary {} not found (put {VOCAB_FILE} next to the weights or pass its path)",
                vocab.display()
            )));
        }
        Ok(Self { config, weights, vocab })
    }
}

/// Image and text features of a scored batch.
#[derive(Debug)]
pub struct HpsOutput {
    /// L2-normalised image features `[N, embed_dim]` (f32, CPU).
    pub image_features: Tensor,
    /// L2-normalised text features `[N, embed_dim]` (f32, CPU).
    pub text_features: Tensor,
    /// Per-pair cosine similarity.
    pub scores: Vec<f64>,
}

/// The HPS-v2.1 reward model with its tokenizer.
#[derive(Debug)]
pub struct HpsReward {
    model: ClipModel,
    tokenizer: ClipTokenizer,
}

impl HpsReward {
    /// Loads the model in `dir` onto `device` (fp32, as HPSv2 keeps its weights).
    pub fn from_dir(dir: &Path, device: Device) -> Result<Self, RewardError> {
        Self::from_files(&HpsFiles::discover(dir, None)?, device)
    }

    /// Loads from resolved files.
    pub fn from_files(files: &HpsFiles, device: Device) -> Result<Self, RewardError> {
        let cfg = match &files.config {
            Some(p) => ClipConfig::from_file(p)?,
            None => ClipConfig::vit_h_14(),
        };
        // The first file is read and checked before the model is allocated, so a checkpoint
        // of another architecture is reported without first building 3.9 GB of ViT-H-14.
        // Files are then loaded one at a time to keep the peak host memory at model + file.
        let shapes = state_dict_shapes(&cfg);
        let mut model: Option<ClipModel> = None;
        for w in &files.weights {
            let tensors = read_state_dict(w)?;
            check_shapes(&shapes, &tensors, w)?;
            let m = match model.as_mut() {
                Some(m) => m,
                None => model.insert(ClipModel::new(&cfg, device)?),
            };
            load_into(m, tensors, w)?;
        }
        let model = model.ok_or_else(|| RewardError::Files("no weight files".into()))?;
        let tokenizer = ClipTokenizer::from_file(&files.vocab)?;
        Ok(Self { model, tokenizer })
    }

    /// Wraps an already-built model and tokenizer.
    pub fn new(model: ClipModel, tokenizer: ClipTokenizer) -> Self {
        Self { model, tokenizer }
    }

    /// The model.
    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Features and scores of `images` (uint8 `[N, H, W, 3]`) against `prompts`.
    pub fn forward(&self, images: &Tensor, prompts: &[String]) -> Result<HpsOutput, RewardError> {
        check_batch(images, prompts)?;
        let tokens = self.tokenizer.tokenize_batch(prompts)?;
        let size = self.model.config().vision_cfg.image_size;
        tch::no_grad(|| {
            let pixels = preprocess_batch(&images.f_to_device(self.model.device())?, size)?;
            let img = l2_normalize(&self.model.encode_image(&pixels)?)?;
            let txt = l2_normalize(&self.model.encode_text(&tokens)?)?;
            let scores = img.f_mul(&txt)?.f_sum_dim_intlist(-1, false, Kind::Double)?;
            Ok(HpsOutput {
                image_features: img.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?,
                text_features: txt.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?,
                scores: Vec::<f64>::try_from(&scores.f_to_device(Device::Cpu)?)?,
            })
        })
    }
}

impl Reward for HpsReward {
    fn name(&self) -> &str {
        NAME
    }

    fn score(&mut self, images: &Tensor, prompts: &[String]) -> Result<Vec<f64>, RewardError> {
        Ok(self.forward(images, prompts)?.scores)
    }
}
