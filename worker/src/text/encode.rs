//! FLUX's `encode_prompt(prompt, prompt_2=prompt)` over a model folder laid out like
//! FLUX.1-dev (`text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::TextError;
use super::clip::{ClipTextConfig, ClipTextModel};
use super::t5::{T5Config, T5Encoder};
use super::tokenizer::{FixedLenTokenizer, load_clip, load_t5};
use super::weights::Weights;

/// How to run the encoders.
#[derive(Debug, Clone, Copy)]
pub struct EncoderOptions {
    /// Where the weights live and the work happens.
    pub device: Device,
    /// Compute (and output) dtype: bf16 as FLUX runs them; f32 for parity checks.
    pub kind: Kind,
    /// T5 tokens per prompt (FLUX.1-dev: 512).
    pub max_sequence_length: usize,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, kind: Kind::BFloat16, max_sequence_length: 512 }
    }
}

/// A batch of encoded prompts, on the CPU.
#[derive(Debug)]
pub struct EncodedPrompts {
    /// T5 `last_hidden_state`, `[N, max_sequence_length, d_model]`.
    pub prompt_embeds: Tensor,
    /// CLIP `pooler_output`, `[N, hidden]`.
    pub pooled_prompt_embeds: Tensor,
}

/// Both tokenizers and both encoders.
#[derive(Debug)]
pub struct FluxTextEncoders {
    t5_tok: FixedLenTokenizer,
    clip_tok: FixedLenTokenizer,
    t5: T5Encoder,
    clip: ClipTextModel,
    opts: EncoderOptions,
}

impl FluxTextEncoders {
    /// Loads everything from a FLUX.1-dev-style folder.
    pub fn load(dir: &Path, opts: EncoderOptions) -> Result<Self, TextError> {
        let t5_cfg = T5Config::from_file(&dir.join("text_encoder_2/config.json"))?;
        let clip_cfg = ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?;
        let clip_len = clip_cfg.max_position_embeddings as usize;
        let t5_tok = load_t5(&dir.join("tokenizer_2"), opts.max_sequence_length)?;
        let clip_tok = load_clip(&dir.join("tokenizer"), clip_len)?;
        let t5 = {
            let w = Weights::load_dir(&dir.join("text_encoder_2"), opts.kind, opts.device)?;
            T5Encoder::new(t5_cfg, &w)?
        };
        let clip = {
            let w = Weights::load_dir(&dir.join("text_encoder"), opts.kind, opts.device)?;
            ClipTextModel::new(clip_cfg, &w)?
        };
        Ok(Self { t5_tok, clip_tok, t5, clip, opts })
    }

    /// Width of `prompt_embeds` (T5 `d_model`).
    pub fn t5_dim(&self) -> i64 {
        self.t5.config().d_model
    }

    /// Width of `pooled_prompt_embeds` (CLIP hidden size).
    pub fn pooled_dim(&self) -> i64 {
        self.clip.config().hidden_size
    }

    /// T5 tokens per prompt.
    pub fn max_sequence_length(&self) -> usize {
        self.opts.max_sequence_length
    }

    /// Token ids `([N, 512], [N, 77])` as FLUX's tokenizer calls give them.
    pub fn tokenize(&self, prompts: &[String]) -> Result<(Tensor, Tensor), TextError> {
        let ids = |tok: &FixedLenTokenizer| -> Result<Tensor, TextError> {
            let mut all = Vec::with_capacity(prompts.len() * tok.len());
            for p in prompts {
                all.extend(tok.encode(p)?);
            }
            Ok(Tensor::f_from_slice(&all)?.f_view([prompts.len() as i64, tok.len() as i64])?)
        };
        Ok((ids(&self.t5_tok)?, ids(&self.clip_tok)?))
    }

    /// `encode_prompt` for a batch: embeddings in the compute dtype, on the CPU.
    pub fn encode(&self, prompts: &[String]) -> Result<EncodedPrompts, TextError> {
        let (t5_ids, clip_ids) = self.tokenize(prompts)?;
        tch::no_grad(|| {
            let d = self.opts.device;
            let prompt_embeds =
                self.t5.forward(&t5_ids.f_to_device(d)?)?.f_to_device(Device::Cpu)?;
            let pooled = self.clip.forward(&clip_ids.f_to_device(d)?)?.f_to_device(Device::Cpu)?;
            Ok(EncodedPrompts { prompt_embeds, pooled_prompt_embeds: pooled })
        })
    }
}
