//! Rewards from a CLIP in the transformers `CLIPModel` layout, scored as the model's own
//! `logits_per_image` diagonal: `logit_scale.exp() · cos(image_embeds, text_embeds)`.
//!
//! - [`PICKSCORE`]: PickScore (`yuvalkirstain/PickScore_v1`, a ViT-H-14 fine-tuned on Pick-a-Pic),
//!   the model card's inference code without its softmax across images. Flow-GRPO's
//!   `PickScoreScorer` divides the same number by 26.
//! - [`CLIP_SCORE`]: CLIP score with OpenAI CLIP ViT-L/14 (`openai/clip-vit-large-patch14`,
//!   `logit_scale.exp()` = 100): `100 · cos`. Flow-GRPO's `ClipScorer` reports it divided by 30;
//!   torchmetrics' `CLIPScore` is `max(100 · cos, 0)`, equal wherever the cosine is positive.
//!   No clamp here: a clamp would tie every image with a negative cosine, and a constant
//!   factor changes nothing in the group-normalised advantages.
//!
//! Model directory: the Hugging Face folder ([`HfClipFiles`]): `config.json`,
//! `model.safetensors` or `pytorch_model.bin`, `preprocessor_config.json` (optional; the
//! `CLIPImageProcessor` defaults otherwise), and the tokenizer (`tokenizer.json`, or
//! `vocab.json` + `merges.txt`, with `special_tokens_map.json`).
//!
//! Preprocessing is transformers 5's `CLIPProcessor`: images through
//! [`ClipImageProcessor`] (uint8 bicubic resize on the CPU, crop, normalise), prompts through
//! `CLIPTokenizer` (NFC, whitespace runs to one space, lower case, CLIP BPE, BOS/EOS, truncated
//! to 77, no ftfy) padded to 77; under the causal mask the pooled EOS state does not depend on the
//! padding, so this equals PickScore's `padding=True` and Flow-GRPO's `padding="max_length"`.
//! An empty prompt is scored as transformers scores it (BOS, EOS).
//!
//! The model runs in f32 on the CPU (`on_cpu`) and in bf16 on accelerators; features are cast
//! to f32 before the cosine.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::hf_preprocess::ClipImageProcessor;
use super::{Reward, RewardError, check_batch};
use crate::clip::hf::load_hf_clip;
use crate::clip::{ClipError, ClipModel, l2_normalize};
use crate::text::tokenizer::{FixedLenTokenizer, load_clip};

pub use dancegrpo_proto::rewards::HfClipFiles;

/// Registered name of PickScore.
pub const PICKSCORE: &str = "pickscore";
/// Registered name of the CLIP score.
pub const CLIP_SCORE: &str = "clip_score";

/// Features and scores of a scored batch.
#[derive(Debug)]
pub struct HfClipOutput {
    /// The processor's pixels `[N, 3, h, w]` (f32, CPU).
    pub pixel_values: Tensor,
    /// Token ids `[N, 77]` (int64, CPU).
    pub input_ids: Tensor,
    /// Projected image features, not normalised, `[N, projection_dim]` (f32, CPU).
    pub image_embeds: Tensor,
    /// Projected text features, not normalised, `[N, projection_dim]` (f32, CPU).
    pub text_embeds: Tensor,
    /// `logit_scale.exp() · cos` per pair.
    pub scores: Vec<f64>,
}

/// A transformers-layout CLIP reward model with its processor.
#[derive(Debug)]
pub struct HfClipReward {
    name: &'static str,
    model: ClipModel,
    tokenizer: FixedLenTokenizer,
    processor: ClipImageProcessor,
    scale: f64,
}

impl HfClipReward {
    /// Loads the folder `dir` for the reward `name` onto `device`: f32 on the CPU, bf16 on an
    /// accelerator.
    pub fn from_dir(name: &'static str, dir: &Path, device: Device) -> Result<Self, RewardError> {
        let kind = if device == Device::Cpu { Kind::Float } else { Kind::BFloat16 };
        Self::from_files(name, &HfClipFiles::discover(dir)?, device, kind)
    }

    /// Loads resolved files onto `device` in `kind` (f32 or bf16).
    pub fn from_files(
        name: &'static str,
        files: &HfClipFiles,
        device: Device,
        kind: Kind,
    ) -> Result<Self, RewardError> {
        let (model, logit_scale) = load_hf_clip(&files.config, &files.weights, device, kind)?;
        let processor = ClipImageProcessor::from_file(files.preprocessor.as_deref())?;
        let side = model.config().vision_cfg.image_size;
        if processor.output_size().is_some_and(|s| s != (side, side)) {
            return Err(RewardError::Files(format!(
                "{}: the processor makes {:?} images, the model takes {side}x{side}",
                files
                    .preprocessor
                    .as_deref()
                    .unwrap_or(Path::new("preprocessor defaults"))
                    .display(),
                processor.output_size().unwrap_or_default()
            )));
        }
        let dir = files.config.parent().unwrap_or(Path::new("."));
        let ctx = model.config().text_cfg.context_length as usize;
        let tokenizer = load_clip(dir, ctx).map_err(|e| RewardError::Files(e.to_string()))?;
        let scale = logit_scale.exp();
        Ok(Self { name, model, tokenizer, processor, scale })
    }

    /// The model.
    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// `logit_scale.exp()`, the factor on the cosine.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Token ids `[N, 77]` of `prompts`, as the processor makes them.
    pub fn tokenize(&self, prompts: &[String]) -> Result<Tensor, RewardError> {
        let mut flat = Vec::with_capacity(prompts.len() * self.tokenizer.len());
        for (i, p) in prompts.iter().enumerate() {
            let ids = self
                .tokenizer
                .encode(p)
                .map_err(|e| RewardError::Input(format!("prompt {i}: {e}")))?;
            flat.extend(ids);
        }
        Ok(Tensor::f_from_slice(&flat)?
            .f_view([prompts.len() as i64, self.tokenizer.len() as i64])?)
    }

    /// Pixels, ids, features and scores of `images` (uint8 `[N, H, W, 3]`) against `prompts`.
    pub fn forward(
        &self,
        images: &Tensor,
        prompts: &[String],
    ) -> Result<HfClipOutput, RewardError> {
        check_batch(images, prompts)?;
        let input_ids = self.tokenize(prompts)?;
        let pixel_values = self.processor.preprocess(images)?;
        tch::no_grad(|| {
            let img = self.model.encode_image(&pixel_values)?.f_to_kind(Kind::Float)?;
            let txt = self.model.encode_text(&input_ids)?.f_to_kind(Kind::Float)?;
            let cos = l2_normalize(&img)?.f_mul(&l2_normalize(&txt)?)?.f_sum_dim_intlist(
                -1,
                false,
                Kind::Double,
            )?;
            let scores = cos.f_mul_scalar(self.scale)?.f_to_device(Device::Cpu)?;
            Ok::<_, ClipError>(HfClipOutput {
                pixel_values: pixel_values.shallow_clone(),
                input_ids: input_ids.shallow_clone(),
                image_embeds: img.f_to_device(Device::Cpu)?,
                text_embeds: txt.f_to_device(Device::Cpu)?,
                scores: Vec::<f64>::try_from(&scores).map_err(ClipError::Torch)?,
            })
        })
        .map_err(RewardError::from)
    }
}

impl Reward for HfClipReward {
    fn name(&self) -> &str {
        self.name
    }

    fn score(&mut self, images: &Tensor, prompts: &[String]) -> Result<Vec<f64>, RewardError> {
        Ok(self.forward(images, prompts)?.scores)
    }
}
