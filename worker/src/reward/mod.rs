//! Rewards: one [`Reward`] trait (a batch of images and their prompts in, one score per
//! image out), the built-in rewards, the HPS-v2.1 reward model, PickScore and the CLIP score
//! (transformers-layout CLIPs), and the multi-reward loss.
//!
//! Rewards are chosen by name in the job config ([`dancegrpo_proto::RewardConfig`]); several
//! at once give one score vector per trajectory, in config order, and the coordinator turns
//! each into its own group-normalised advantage (`dancegrpo_proto::advantage`).
//!
//! Scores are reported as computed: a NaN or infinite score is never replaced or averaged
//! away here; the coordinator's guard (`non_finite_policy`) decides what happens.

/// PickScore and the CLIP score: transformers `CLIPModel` folders, `logit_scale · cos`.
pub mod hf_clip;
/// transformers' `CLIPImageProcessor`.
pub mod hf_preprocess;
/// The HPS-v2.1 reward (open_clip ViT-H-14 cosine similarity).
pub mod hps;
/// JPEG compressibility / incompressibility (DDPO).
pub mod jpeg;
/// The weighted multi-reward PPO-clip loss.
pub mod loss;
/// HPSv2's image preprocessing.
pub mod preprocess;
/// Simple image statistics as rewards.
pub mod stats;
/// ftfy / html clean-up of prompts, as open_clip's tokenizer does it.
pub mod text_clean;
/// open_clip's CLIP BPE tokenizer.
pub mod tokenizer;

use dancegrpo_proto::RewardConfig;
use tch::{Device, Kind, Tensor};

use crate::clip::ClipError;

/// Errors of the rewards.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// Bad images or prompts.
    #[error("bad reward input: {0}")]
    Input(String),
    /// No reward of that name.
    #[error("unknown reward '{name}' (known: {known})")]
    UnknownReward {
        /// The configured name.
        name: String,
        /// The registered names.
        known: String,
    },
    /// A bad tokenizer vocabulary.
    #[error("BPE vocabulary {0}")]
    Vocab(String),
    /// The reward model could not be loaded or run.
    #[error(transparent)]
    Model(#[from] ClipError),
    /// A missing file or directory.
    #[error("{0}")]
    Files(String),
    /// A missing or damaged model file.
    #[error(transparent)]
    File(#[from] dancegrpo_proto::files::FileError),
    /// libtorch failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// A reward: scores a batch of images against their prompts.
pub trait Reward: Send + std::fmt::Debug {
    /// The registered name.
    fn name(&self) -> &str;

    /// Scores `images` (uint8 `[N, H, W, 3]`, any device) against `prompts` (N of them).
    /// Non-finite scores are returned as they are.
    fn score(&mut self, images: &Tensor, prompts: &[String]) -> Result<Vec<f64>, RewardError>;
}

/// Checks the common shape contract of [`Reward::score`] and returns N.
pub fn check_batch(images: &Tensor, prompts: &[String]) -> Result<usize, RewardError> {
    let dims = images.size();
    if dims.len() != 4 || dims[3] != 3 || images.kind() != Kind::Uint8 {
        return Err(RewardError::Input(format!(
            "images must be uint8 [N, H, W, 3], got {:?} {dims:?}",
            images.kind()
        )));
    }
    if dims[1] == 0 || dims[2] == 0 {
        return Err(RewardError::Input(format!("images have no pixels ({}x{})", dims[1], dims[2])));
    }
    if dims[0] as usize != prompts.len() {
        return Err(RewardError::Input(format!(
            "{} images but {} prompts",
            dims[0],
            prompts.len()
        )));
    }
    Ok(prompts.len())
}

/// Builds the reward `cfg.name` names. Reward models run on `device`, or on the CPU when
/// `cfg.on_cpu` is set (saves accelerator memory; images are moved to the model's device).
/// PickScore and the CLIP score run in bf16 on an accelerator, f32 on the CPU.
pub fn build_reward(cfg: &RewardConfig, device: Device) -> Result<Box<dyn Reward>, RewardError> {
    let device = if cfg.on_cpu { Device::Cpu } else { device };
    Ok(match cfg.canonical_name().unwrap_or(cfg.name.as_str()) {
        hps::NAME => {
            Box::new(hps::HpsReward::from_dir(std::path::Path::new(&cfg.model_dir), device)?)
        }
        name @ (hf_clip::PICKSCORE | hf_clip::CLIP_SCORE) => {
            let name =
                if name == hf_clip::PICKSCORE { hf_clip::PICKSCORE } else { hf_clip::CLIP_SCORE };
            let dir = std::path::Path::new(&cfg.model_dir);
            Box::new(hf_clip::HfClipReward::from_dir(name, dir, device)?)
        }
        jpeg::COMPRESSIBILITY => Box::new(jpeg::JpegReward::compressibility()),
        jpeg::INCOMPRESSIBILITY => Box::new(jpeg::JpegReward::incompressibility()),
        stats::BRIGHTNESS => Box::new(stats::StatReward::brightness()),
        stats::CONTRAST => Box::new(stats::StatReward::contrast()),
        other => {
            return Err(RewardError::UnknownReward {
                name: other.to_string(),
                known: dancegrpo_proto::config::REWARDS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    })
}

/// Several rewards scored together, in config order, with their loss weights.
pub struct RewardSet {
    rewards: Vec<Box<dyn Reward>>,
    weights: Vec<f64>,
}

impl std::fmt::Debug for RewardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.rewards.iter().map(|r| r.name()).collect();
        f.debug_struct("RewardSet")
            .field("rewards", &names)
            .field("weights", &self.weights)
            .finish()
    }
}

impl RewardSet {
    /// Builds every configured reward (at least one).
    pub fn from_config(cfgs: &[RewardConfig], device: Device) -> Result<Self, RewardError> {
        if cfgs.is_empty() {
            return Err(RewardError::Input("no reward configured".into()));
        }
        let rewards = cfgs.iter().map(|c| build_reward(c, device)).collect::<Result<_, _>>()?;
        Ok(Self { rewards, weights: cfgs.iter().map(|c| c.weight).collect() })
    }

    /// Builds a set from rewards already made, with their weights.
    pub fn new(rewards: Vec<Box<dyn Reward>>, weights: Vec<f64>) -> Result<Self, RewardError> {
        if rewards.is_empty() || rewards.len() != weights.len() {
            return Err(RewardError::Input(format!(
                "{} rewards but {} weights",
                rewards.len(),
                weights.len()
            )));
        }
        Ok(Self { rewards, weights })
    }

    /// The loss weights, in order.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Scores the batch with every reward: `out[i][k]` is reward k of image i, the layout of
    /// `TrajectoryReward.rewards` on the wire.
    pub fn score(
        &mut self,
        images: &Tensor,
        prompts: &[String],
    ) -> Result<Vec<Vec<f64>>, RewardError> {
        let n = check_batch(images, prompts)?;
        let mut out = vec![Vec::with_capacity(self.rewards.len()); n];
        for r in &mut self.rewards {
            let scores = r.score(images, prompts)?;
            if scores.len() != n {
                return Err(RewardError::Input(format!(
                    "reward {} returned {} scores for {n} images",
                    r.name(),
                    scores.len()
                )));
            }
            for (row, s) in out.iter_mut().zip(scores) {
                row.push(s);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coordinator admits exactly the names of `dancegrpo_proto::config::REWARDS`: each
    /// one, and each alias, must build here (a model reward fails only on its files).
    #[test]
    fn every_reward_the_config_accepts_builds() {
        for (name, aliases) in dancegrpo_proto::config::REWARDS {
            for n in std::iter::once(name).chain(aliases.iter()) {
                let cfg = RewardConfig {
                    name: n.to_string(),
                    weight: 1.0,
                    model_dir: "/nonexistent".into(),
                    on_cpu: false,
                };
                match build_reward(&cfg, Device::Cpu) {
                    Ok(_) => {}
                    Err(RewardError::File(e)) => assert!(e.message.contains("does not exist")),
                    Err(e) => panic!("{n}: {e}"),
                }
            }
        }
        let cfg = RewardConfig {
            name: "hpsv3".into(),
            weight: 1.0,
            model_dir: String::new(),
            on_cpu: false,
        };
        let e = build_reward(&cfg, Device::Cpu).unwrap_err();
        assert!(
            e.to_string().contains("unknown reward 'hpsv3' (known: hpsv2, jpeg_compressibility"),
            "{e}"
        );
    }
}
