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

use std::path::Path;

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
pub use dancegrpo_proto::files::{
    HPS_CONFIG_FILE as CONFIG_FILE, HPS_VOCAB_FILE as VOCAB_FILE, HPS_WEIGHT_STEMS as WEIGHT_STEMS,
    HpsFiles,
};

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
