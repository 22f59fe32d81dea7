//! The job configuration.
//!
//! Keys are the DanceGRPO reference's flag names (`num_generations`, `sampling_steps`, `eta`,
//! ...), and the defaults are its launch values (`finetune_flux_grpo.sh`, ALGORITHM.md §1), so
//! a user can carry a launch script over line by line. Unknown keys are rejected: a typo must
//! not silently fall back to a default.

use serde::{Deserialize, Serialize};

/// One reward model, with the weight of its loss term.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Registered reward name, e.g. `hpsv2` or `jpeg_compressibility`.
    pub name: String,
    /// Weight of this reward's clipped loss in the total loss.
    #[serde(default = "one")]
    pub weight: f64,
    /// Directory with the reward model's weights, for rewards that have any.
    #[serde(default)]
    pub model_dir: String,
    /// Run the reward model on the CPU to save accelerator memory.
    #[serde(default)]
    pub on_cpu: bool,
}

/// LoRA adapter settings (PEFT names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Adapter rank r.
    pub rank: u32,
    /// Scale numerator: the update is `alpha / rank · B·A`.
    pub alpha: f64,
    /// PEFT target module names.
    #[serde(default = "default_lora_targets")]
    pub target_modules: Vec<String>,
}

/// What to do when a reward is NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Fail the iteration loudly, naming the trajectory.
    #[default]
    Fail,
    /// Drop the group and refill it with a fresh prompt.
    DropGroup,
}

/// The whole job configuration, as the coordinator loads it and hands it to workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// A name for the job; a coordinator restarted on the same database picks the job up by it.
    pub job_name: String,
    /// FLUX model: a diffusers folder, a BFL single file, or a built-in preset (`tiny`).
    pub pretrained_model_name_or_path: String,
    /// Prompt embeddings: a reference `videos2caption.json` or this project's manifest.
    pub data_json_path: String,
    /// Where checkpoints, the reward log and the PNGs go.
    pub output_dir: String,

    /// Group size G (images per prompt).
    pub num_generations: u32,
    /// SDE steps per rollout.
    pub sampling_steps: u32,
    /// SDE noise level.
    pub eta: f64,
    /// SD3 time shift of the sigma schedule.
    pub shift: f64,
    /// Fraction of the (steps − 1) transitions trained per trajectory.
    pub timestep_fraction: f64,
    /// PPO ratio clip ε.
    pub clip_range: f64,
    /// Advantage clamp.
    pub adv_clip_max: f64,
    /// Trajectories per optimizer step.
    pub gradient_accumulation_steps: u32,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Image height in pixels.
    pub h: u32,
    /// Image width in pixels.
    pub w: u32,
    /// FLUX.1-dev distilled guidance.
    pub guidance: f64,
    /// One initial noise shared by all members of a group.
    pub init_same_noise: bool,
    /// Per-group (instead of global) advantage normalisation.
    pub use_group: bool,
    /// Outer iterations.
    pub max_train_steps: u32,
    /// Checkpoint every this many iterations (0 = never).
    pub checkpointing_steps: u32,
    /// Base seed of the rollout noise.
    pub seed: u64,
    /// Seed of the prompt shuffle.
    pub sampler_seed: u64,
    /// Prompts per worker per iteration.
    pub train_batch_size: u32,
    /// Recompute each transformer block in backward to save memory.
    pub gradient_checkpointing: bool,
    /// Rewards and their loss weights. Several rewards get separate advantages.
    pub rewards: Vec<RewardConfig>,
    /// LoRA adapter; `None` means full fine-tune.
    pub lora: Option<LoraConfig>,
    /// NaN / Inf reward handling.
    pub non_finite_policy: NonFinitePolicy,
    /// Reward log file (one float per line), relative to `output_dir` unless absolute.
    pub reward_log: String,
    /// Collective backend override (`gloo`, `nccl`, `hccl`); empty = derived from the device.
    pub backend: String,
    /// Where a new job starts from: `latest` (newest `checkpoint-N` in `output_dir`), a
    /// checkpoint directory, or empty for the pretrained model.
    pub resume_from_checkpoint: String,
    /// A PNG grid of the samples every this many iterations (0 = never).
    pub sample_grid_every: u32,
}

fn one() -> f64 {
    1.0
}

fn default_lora_targets() -> Vec<String> {
    ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec()
}

impl Default for JobConfig {
    /// The reference's launch values (`finetune_flux_grpo.sh`).
    fn default() -> Self {
        Self {
            job_name: "dancegrpo".into(),
            pretrained_model_name_or_path: "data/flux".into(),
            data_json_path: "data/rl_embeddings/videos2caption.json".into(),
            output_dir: "data/outputs/grpo".into(),
            num_generations: 12,
            sampling_steps: 16,
            eta: 0.3,
            shift: 3.0,
            timestep_fraction: 0.6,
            clip_range: 1e-4,
            adv_clip_max: 5.0,
            gradient_accumulation_steps: 4,
            max_grad_norm: 1.0,
            learning_rate: 1e-5,
            weight_decay: 1e-4,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            h: 720,
            w: 720,
            guidance: 3.5,
            init_same_noise: true,
            use_group: true,
            max_train_steps: 300,
            checkpointing_steps: 40,
            seed: 42,
            sampler_seed: 1223627,
            train_batch_size: 1,
            gradient_checkpointing: true,
            rewards: vec![RewardConfig {
                name: "hpsv2".into(),
                weight: 1.0,
                model_dir: "hps_ckpt".into(),
                on_cpu: false,
            }],
            lora: None,
            non_finite_policy: NonFinitePolicy::Fail,
            reward_log: "hps_reward.txt".into(),
            backend: String::new(),
            resume_from_checkpoint: String::new(),
            sample_grid_every: 10,
        }
    }
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid job config: {}", .problems.join("; "))]
pub struct ConfigError {
    /// One entry per bad field.
    pub problems: Vec<String>,
}

impl JobConfig {
    /// The top-level keys a config file may contain.
    pub const KEYS: &'static [&'static str] = &[
        "job_name",
        "pretrained_model_name_or_path",
        "data_json_path",
        "output_dir",
        "num_generations",
        "sampling_steps",
        "eta",
        "shift",
        "timestep_fraction",
        "clip_range",
        "adv_clip_max",
        "gradient_accumulation_steps",
        "max_grad_norm",
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "h",
        "w",
        "guidance",
        "init_same_noise",
        "use_group",
        "max_train_steps",
        "checkpointing_steps",
        "seed",
        "sampler_seed",
        "train_batch_size",
        "gradient_checkpointing",
        "rewards",
        "lora",
        "non_finite_policy",
        "reward_log",
        "backend",
        "resume_from_checkpoint",
        "sample_grid_every",
    ];

    /// Number of transitions trained per trajectory: `int((S − 1) · timestep_fraction)`, the
    /// last transition always dropped as in the reference.
    pub fn train_timesteps(&self) -> usize {
        ((self.sampling_steps.saturating_sub(1)) as f64 * self.timestep_fraction) as usize
    }

    /// Checks every field and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                p.push(msg);
            }
        };
        check(!self.job_name.trim().is_empty(), "job_name must not be empty".into());
        check(
            self.num_generations >= 2,
            format!("num_generations must be >= 2 for a group std (got {})", self.num_generations),
        );
        check(
            self.sampling_steps >= 2,
            format!("sampling_steps must be >= 2 (got {})", self.sampling_steps),
        );
        check(
            self.eta.is_finite() && self.eta > 0.0,
            format!("eta must be > 0 (got {})", self.eta),
        );
        check(
            self.shift.is_finite() && self.shift > 0.0,
            format!("shift must be > 0 (got {})", self.shift),
        );
        check(
            self.timestep_fraction > 0.0 && self.timestep_fraction <= 1.0,
            format!("timestep_fraction must be in (0, 1] (got {})", self.timestep_fraction),
        );
        check(
            self.sampling_steps < 2 || self.train_timesteps() >= 1,
            format!(
                "timestep_fraction {} of {} transitions trains none",
                self.timestep_fraction,
                self.sampling_steps.saturating_sub(1)
            ),
        );
        check(
            self.clip_range.is_finite() && self.clip_range > 0.0,
            format!("clip_range must be > 0 (got {})", self.clip_range),
        );
        check(
            self.adv_clip_max.is_finite() && self.adv_clip_max > 0.0,
            format!("adv_clip_max must be > 0 (got {})", self.adv_clip_max),
        );
        check(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps must be >= 1".into(),
        );
        check(
            self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0,
            format!("max_grad_norm must be > 0 (got {})", self.max_grad_norm),
        );
        check(
            self.learning_rate.is_finite() && self.learning_rate > 0.0,
            format!("learning_rate must be > 0 (got {})", self.learning_rate),
        );
        check(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            format!("weight_decay must be >= 0 (got {})", self.weight_decay),
        );
        for (name, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            check((0.0..1.0).contains(&b), format!("{name} must be in [0, 1) (got {b})"));
        }
        check(
            self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0,
            format!("adam_epsilon must be > 0 (got {})", self.adam_epsilon),
        );
        for (name, v) in [("h", self.h), ("w", self.w)] {
            check(
                v > 0 && v % 16 == 0,
                format!("{name} must be a positive multiple of 16 (got {v})"),
            );
        }
        check(
            self.guidance.is_finite(),
            format!("guidance must be finite (got {})", self.guidance),
        );
        check(self.max_train_steps >= 1, "max_train_steps must be >= 1".into());
        check(self.train_batch_size >= 1, "train_batch_size must be >= 1".into());
        let per_rank = self.train_batch_size * self.num_generations;
        check(
            self.gradient_accumulation_steps == 0
                || per_rank % self.gradient_accumulation_steps == 0,
            format!(
                "gradient_accumulation_steps {} must divide the {per_rank} trajectories each \
                 worker trains per iteration (train_batch_size x num_generations)",
                self.gradient_accumulation_steps
            ),
        );
        check(!self.rewards.is_empty(), "rewards must list at least one reward".into());
        for (i, r) in self.rewards.iter().enumerate() {
            check(!r.name.trim().is_empty(), format!("rewards[{i}].name must not be empty"));
            check(
                r.weight.is_finite() && r.weight >= 0.0,
                format!("rewards[{i}].weight must be finite and >= 0 (got {})", r.weight),
            );
        }
        if let Some(l) = &self.lora {
            check(l.rank >= 1, "lora.rank must be >= 1".into());
            check(
                l.alpha.is_finite() && l.alpha > 0.0,
                format!("lora.alpha must be > 0 (got {})", l.alpha),
            );
            check(!l.target_modules.is_empty(), "lora.target_modules must not be empty".into());
        }
        check(
            matches!(self.backend.as_str(), "" | "gloo" | "nccl" | "hccl"),
            format!("backend must be one of gloo, nccl, hccl or empty (got {:?})", self.backend),
        );
        check(!self.reward_log.trim().is_empty(), "reward_log must not be empty".into());
        if p.is_empty() { Ok(()) } else { Err(ConfigError { problems: p }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reference_launch_values_and_valid() {
        let c = JobConfig::default();
        c.validate().unwrap();
        assert_eq!((c.num_generations, c.sampling_steps), (12, 16));
        assert_eq!((c.eta, c.shift, c.timestep_fraction), (0.3, 3.0, 0.6));
        // int(15 · 0.6) = 9 trained transitions, as in the reference.
        assert_eq!(c.train_timesteps(), 9);
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let c = JobConfig {
            num_generations: 1,
            gradient_accumulation_steps: 1,
            eta: -1.0,
            h: 100,
            ..JobConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("num_generations"), "{msg}");
        assert!(msg.contains("eta"), "{msg}");
        assert!(msg.contains("h must be a positive multiple of 16 (got 100)"), "{msg}");
    }

    #[test]
    fn keys_list_matches_the_struct() {
        let v = serde_json::to_value(JobConfig::default()).unwrap();
        let mut fields: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        fields.sort();
        let mut keys: Vec<_> = JobConfig::KEYS.iter().map(|s| s.to_string()).collect();
        keys.sort();
        assert_eq!(fields, keys);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = serde_json::from_str::<JobConfig>(r#"{"num_generation": 4}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `num_generation`"), "{e}");
    }
}
