//! The job configuration.
//!
//! Keys are the DanceGRPO reference's flag names (`num_generations`, `sampling_steps`, `eta`,
//! ...), and the defaults are its launch values (`finetune_flux_grpo.sh`, ALGORITHM.md §1), so
//! a user can carry a launch script over line by line. Unknown keys are rejected: a typo must
//! not silently fall back to a default.
//!
//! [`JobConfig`] is the only definition of the keys: their names, defaults and documentation
//! (the doc comments, through its JSON schema) come from it, and so do the known-key lists of
//! the config layering ([`JobConfig::keys`]), the commented default file
//! ([`JobConfig::defaults_toml`], `dancegrpo-coordinator config --print-defaults`) and the wire
//! form (JSON, [`crate::convert::job_config_to_wire`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::rewards::{MODEL_REWARDS, REWARDS, RewardConfig};

/// LoRA adapter settings (PEFT names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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

/// What to do when a reward, a loss or a gradient norm is NaN or infinite. A non-finite
/// gradient never reaches the weights: that update is skipped under either policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Fail the job loudly, naming the trajectory or the rank.
    #[default]
    Fail,
    /// Drop the group and refill it with a fresh prompt (up to 3 times); go on after a skipped
    /// update.
    DropGroup,
}

/// The learning-rate schedule, as diffusers' `get_scheduler` names it: the factor on
/// `learning_rate` at each optimizer step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// `learning_rate` throughout (`lr_warmup_steps` must be 0).
    Constant,
    /// A linear ramp from 0 over `lr_warmup_steps`, then `learning_rate`.
    #[default]
    ConstantWithWarmup,
    /// The warmup ramp, then a half cosine from `learning_rate` to 0 at the job's last step.
    Cosine,
    /// The warmup ramp, then a straight line from `learning_rate` to 0 at the job's last step.
    Linear,
}

impl LrScheduler {
    /// The factor on the base learning rate at optimizer step `step` (0-based: the first
    /// update uses step 0's), with `warmup` warmup steps of `total` training steps: diffusers'
    /// `lr_lambda` of the same name, in its float operations and order (`num_cycles` 0.5 for
    /// `cosine`, as `get_scheduler` leaves it).
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        let s = step as f64;
        let ramp = || s / (warmup.max(1) as f64);
        match self {
            LrScheduler::Constant => 1.0,
            LrScheduler::ConstantWithWarmup if step < warmup => ramp(),
            LrScheduler::ConstantWithWarmup => 1.0,
            LrScheduler::Linear if step < warmup => ramp(),
            LrScheduler::Linear => {
                // `float(T - step) / float(max(1, T - W))` with Python's signed integers.
                let progress = (total as f64 - s) / (span(warmup, total) as f64);
                // `f_min + (f_max − f_min)·max(0.0, progress)` with f_min 0 and f_max 1.
                python_max0(progress)
            }
            LrScheduler::Cosine if step < warmup => ramp(),
            LrScheduler::Cosine => {
                let progress = (step - warmup) as f64 / (span(warmup, total) as f64);
                python_max0(0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos()))
            }
        }
    }
}

/// `max(1, total − warmup)` in Python's integers.
fn span(warmup: u64, total: u64) -> i128 {
    (i128::from(total) - i128::from(warmup)).max(1)
}

/// Python's `max(0.0, x)`: `x` only when it is greater (so never −0.0).
fn python_max0(x: f64) -> f64 {
    if x > 0.0 { x } else { 0.0 }
}

/// How the training state is spread over the ranks (the reference's and MindSpeed-MM's
/// `fsdp_sharding_strategy`; `../shared/docs/SHARDING.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShardingStrategy {
    /// Every rank holds the whole f32 model, its gradients and both AdamW moments (DDP).
    #[default]
    None,
    /// FSDP's FULL_SHARD: each rank owns 1/N of every transformer block's flat f32 master,
    /// gradient and moments; a block is all-gathered to run and its gradient reduce-scattered
    /// right after its backward.
    Full,
}

/// A dtype of stored weights, as MindSpeed-MM's `--master_weight_type` names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WeightType {
    /// bfloat16: half the bytes, what the released FLUX.1-dev files hold.
    #[default]
    #[serde(rename = "bf16")]
    Bf16,
    /// float32.
    #[serde(rename = "fp32")]
    Fp32,
}

/// Where a sharded job's rollout forwards find the weights (SHARDING.md, "Rollout").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutWeights {
    /// The memory planner's choice. Until it exists (issue 12): `gather`, the mode that always
    /// fits, except under `non_finite_policy = drop_group`, whose refills roll out on some
    /// ranks only and so need `replica`.
    #[default]
    Auto,
    /// Gather once per iteration into a replica in the forward's dtype, kept for the whole
    /// rollout (2P bytes: 22.2 GiB in bf16 for FLUX.1-dev); each rank rolls out alone.
    Replica,
    /// Gather each block for each rollout forward, as FSDP does: no replica, but one
    /// all-gather of the model per forward, which every rank joins in step.
    Gather,
}

/// How several rewards become advantages (MixGRPO's `multi_reward_mix`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MultiRewardMix {
    /// One group-normalised advantage per reward, each in its own clipped loss, the losses
    /// summed with the rewards' weights.
    #[default]
    AdvantageAggr,
    /// The rewards summed with their weights (normalised to sum 1) into one reward per
    /// trajectory, and one advantage of that.
    RewardAggr,
}

/// The whole job configuration, as the coordinator loads it and hands it to workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// AdamW learning rate (the peak of the schedule).
    pub learning_rate: f64,
    /// Learning-rate schedule over the job's optimizer steps (`max_train_steps` x
    /// `train_batch_size` x `num_generations` / `gradient_accumulation_steps`), as diffusers'
    /// `get_scheduler` names and shapes it.
    pub lr_scheduler: LrScheduler,
    /// Optimizer steps (not iterations) of the linear warmup from 0 to `learning_rate`.
    pub lr_warmup_steps: u32,
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
    /// `none` (every rank holds the whole training state) or `full` (FSDP's FULL_SHARD over
    /// the ranks; needs `gradient_checkpointing`; a LoRA job shards nothing either way). The
    /// reference's misspelling `fsdp_sharding_startegy` is accepted.
    #[serde(alias = "fsdp_sharding_startegy")]
    pub fsdp_sharding_strategy: ShardingStrategy,
    /// Under `fsdp_sharding_strategy = full`, how the rollout gets the weights: `auto`,
    /// `replica` (a copy gathered once per iteration) or `gather` (per forward). Both give the
    /// same trajectories.
    pub rollout_weights: RolloutWeights,
    /// The dtype of the transformer a sharded job's checkpoint exports (`bf16`, as FLUX.1-dev
    /// is released, or `fp32`). A resume reads the f32 masters saved beside it, so either is
    /// exact. An unsharded full fine-tune's exported transformer is its f32 master and stays
    /// f32.
    pub export_weight_type: WeightType,
    /// Rewards and their loss weights. Several rewards get separate advantages.
    pub rewards: Vec<RewardConfig>,
    /// How several rewards become advantages (MixGRPO's names): one advantage per reward and
    /// the clipped losses weighted, or one advantage of the rewards' weighted sum.
    pub multi_reward_mix: MultiRewardMix,
    /// Fraction of each group's lowest rewards left out of the group's mean and std (MixGRPO);
    /// every member still gets an advantage. 0 uses the whole group.
    pub trimmed_ratio: f64,
    /// LoRA adapter; absent means full fine-tune.
    pub lora: Option<LoraConfig>,
    /// NaN / Inf handling: for a reward, fail the job or refill the group; for a loss or
    /// gradient norm, fail the job or go on (the update is skipped either way).
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
    /// Seconds a running job waits for a lost rank to be replaced (a worker restarted in its
    /// slot) before it fails, with the lost rank named in the status.
    pub rank_replace_timeout_s: u32,
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
            lr_scheduler: LrScheduler::ConstantWithWarmup,
            lr_warmup_steps: 0,
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
            fsdp_sharding_strategy: ShardingStrategy::None,
            rollout_weights: RolloutWeights::Auto,
            export_weight_type: WeightType::Bf16,
            rewards: vec![RewardConfig {
                name: "hpsv2".into(),
                weight: 1.0,
                model_dir: "hps_ckpt".into(),
                on_cpu: false,
            }],
            multi_reward_mix: MultiRewardMix::AdvantageAggr,
            trimmed_ratio: 0.0,
            lora: None,
            non_finite_policy: NonFinitePolicy::Fail,
            reward_log: "hps_reward.txt".into(),
            backend: String::new(),
            resume_from_checkpoint: String::new(),
            sample_grid_every: 10,
            rank_replace_timeout_s: 600,
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
    /// Number of transitions trained per trajectory: `int((S − 1) · timestep_fraction)`, the
    /// last transition always dropped as in the reference.
    pub fn train_timesteps(&self) -> usize {
        ((self.sampling_steps.saturating_sub(1)) as f64 * self.timestep_fraction) as usize
    }

    /// Optimizer steps of the whole job, the `num_training_steps` of the LR schedule: each
    /// rank steps once per `gradient_accumulation_steps` of its `train_batch_size ·
    /// num_generations` trajectories, `max_train_steps` times.
    pub fn total_optimizer_steps(&self) -> u64 {
        let per_rank = u64::from(self.train_batch_size) * u64::from(self.num_generations);
        u64::from(self.max_train_steps)
            * (per_rank / u64::from(self.gradient_accumulation_steps.max(1)))
    }

    /// The learning rate of optimizer step `step` (0-based, counted over the whole job):
    /// `learning_rate` times the schedule's factor, as torch's `LambdaLR` multiplies them.
    pub fn lr_at(&self, step: u64) -> f64 {
        let f = self.lr_scheduler.factor(
            step,
            u64::from(self.lr_warmup_steps),
            self.total_optimizer_steps(),
        );
        self.learning_rate * f
    }

    /// The members of a group of `g` whose rewards make its mean and std under
    /// `trimmed_ratio`: MixGRPO leaves out the lowest `min(int(g · ratio), g − 1)`.
    pub fn trimmed_group_size(&self, g: usize) -> usize {
        g - crate::advantage::trim_count(g, self.trimmed_ratio)
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
            self.rank_replace_timeout_s >= 1,
            "rank_replace_timeout_s must be >= 1: a job without its rank cannot go on".into(),
        );
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
            self.lr_scheduler != LrScheduler::Constant || self.lr_warmup_steps == 0,
            format!(
                "lr_warmup_steps {} has no effect with lr_scheduler = constant (use \
                 constant_with_warmup)",
                self.lr_warmup_steps
            ),
        );
        let total = self.total_optimizer_steps();
        check(
            self.lr_warmup_steps == 0 || u64::from(self.lr_warmup_steps) < total,
            format!(
                "lr_warmup_steps {} must be below the job's {total} optimizer steps \
                 (max_train_steps x train_batch_size x num_generations / \
                 gradient_accumulation_steps): it counts optimizer steps, not iterations",
                self.lr_warmup_steps
            ),
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
            let known = REWARDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
            check(
                r.name.trim().is_empty() || r.canonical_name().is_some(),
                format!("rewards[{i}].name: unknown reward `{}` (known: {known})", r.name),
            );
            check(
                !r.canonical_name().is_some_and(|n| MODEL_REWARDS.contains(&n))
                    || !r.model_dir.trim().is_empty(),
                format!("rewards[{i}].model_dir must name the {} model directory", r.name),
            );
            check(
                r.weight.is_finite() && r.weight >= 0.0,
                format!("rewards[{i}].weight must be finite and >= 0 (got {})", r.weight),
            );
        }
        check(
            self.multi_reward_mix != MultiRewardMix::RewardAggr
                || self.rewards.iter().any(|r| r.weight > 0.0),
            "multi_reward_mix = reward_aggr needs a rewards[].weight above 0: the weights are \
             normalised to sum 1"
                .into(),
        );
        let ratio_ok = self.trimmed_ratio.is_finite() && (0.0..1.0).contains(&self.trimmed_ratio);
        check(ratio_ok, format!("trimmed_ratio must be in [0, 1) (got {})", self.trimmed_ratio));
        let g = self.num_generations as usize;
        check(
            !ratio_ok || g < 2 || self.trimmed_group_size(g) >= 2,
            format!(
                "trimmed_ratio {} leaves {} of the {g} members of a group for its std, which \
                 needs 2",
                self.trimmed_ratio,
                if ratio_ok && g >= 1 { self.trimmed_group_size(g) } else { 0 }
            ),
        );
        check(
            !ratio_ok || self.trimmed_ratio == 0.0 || self.use_group,
            "trimmed_ratio trims group statistics and needs use_group = true".into(),
        );
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
        let sharded = self.shards_state();
        check(
            !sharded || self.gradient_checkpointing,
            "fsdp_sharding_strategy = full needs gradient_checkpointing = true: the sharded \
             backward gathers one block at a time, which is the checkpointed backward"
                .into(),
        );
        check(
            self.rollout_weights != RolloutWeights::Gather
                || self.non_finite_policy != NonFinitePolicy::DropGroup,
            "rollout_weights = gather cannot serve non_finite_policy = drop_group: a refilled \
             group rolls out on its own ranks, while a per-forward gather needs every rank; use \
             rollout_weights = replica (or auto)"
                .into(),
        );
        if p.is_empty() { Ok(()) } else { Err(ConfigError { problems: p }) }
    }

    /// Whether the training state is sharded: `fsdp_sharding_strategy = full` on a full
    /// fine-tune. A LoRA job under `full` (the reference's LoRA launch sets it) has nothing
    /// worth sharding: its adapters are small and all-reduced, its base frozen in the
    /// forward's dtype on every rank (SHARDING.md, "LoRA").
    pub fn shards_state(&self) -> bool {
        self.fsdp_sharding_strategy == ShardingStrategy::Full && self.lora.is_none()
    }

    /// Whether a sharded job rolls out on a replica (see [`RolloutWeights`]).
    pub fn rollout_replica(&self) -> bool {
        match self.rollout_weights {
            RolloutWeights::Replica => true,
            RolloutWeights::Gather => false,
            RolloutWeights::Auto => self.non_finite_policy == NonFinitePolicy::DropGroup,
        }
    }
}

/// The other spellings of a key that [`JobConfig`] accepts (its `#[serde(alias)]`es), as
/// `(alias, key)`: the config layering takes them as that key. A test checks this list against
/// serde's.
const KEY_ALIASES: &[(&str, &str)] = &[("fsdp_sharding_startegy", "fsdp_sharding_strategy")];

/// One key of the config file, as [`JobConfig`] defines it.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    /// The key's name, e.g. `num_generations` or, inside `[lora]`, `rank`.
    pub name: String,
    /// Its documentation: the field's doc comment, and the accepted values of an enum.
    pub doc: String,
    /// The keys of a table (`[lora]`) or of an array of tables (`[[rewards]]`); empty for a value.
    pub sub: Vec<Key>,
    /// The sub-keys that have no default.
    pub required_sub: Vec<String>,
    /// The default the schema states (a field with its own `#[serde(default = ...)]`).
    pub default: Option<Value>,
    /// Other spellings accepted for it, e.g. the reference's `fsdp_sharding_startegy`.
    pub aliases: Vec<String>,
    /// The values an enum key accepts (empty for other keys).
    pub values: Vec<String>,
}

impl Key {
    /// The sub-key named `name`.
    pub fn get<'a>(keys: &'a [Key], name: &str) -> Option<&'a Key> {
        keys.iter().find(|k| k.name == name)
    }

    /// The key named or spelled `name` (one of its [`Key::aliases`]).
    pub fn find<'a>(keys: &'a [Key], name: &str) -> Option<&'a Key> {
        keys.iter().find(|k| k.name == name || k.aliases.iter().any(|a| a == name))
    }
}

/// The object schema behind `s`, following `$ref`, `anyOf` (an `Option`) and `items` (a `Vec`).
fn resolve<'a>(root: &'a Value, s: &'a Value) -> &'a Value {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        return resolve(root, &root["$defs"][name]);
    }
    if let Some(v) = s.get("anyOf").and_then(Value::as_array) {
        if let Some(inner) = v.iter().find(|v| v.get("type") != Some(&Value::from("null"))) {
            return resolve(root, inner);
        }
    }
    if let Some(items) = s.get("items") {
        return resolve(root, items);
    }
    s
}

/// The accepted values of an enum schema, e.g. `fail, drop_group`.
fn enum_values(s: &Value) -> Vec<String> {
    let from = |v: &Value| v.as_str().map(str::to_string);
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.iter().filter_map(from).collect();
    }
    s.get("oneOf")
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter_map(|o| {
                    o.get("const").and_then(from).or_else(|| {
                        o.get("enum")
                            .and_then(Value::as_array)
                            .and_then(|e| e.first())
                            .and_then(from)
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn keys_of(root: &Value, object: &Value) -> Vec<Key> {
    let Some(props) = object.get("properties").and_then(Value::as_object) else { return vec![] };
    props
        .iter()
        .map(|(name, prop)| {
            let target = resolve(root, prop);
            let mut doc = prop
                .get("description")
                .or_else(|| target.get("description"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let values: Vec<String> = enum_values(target);
            if !values.is_empty() {
                doc.push_str(&format!(" One of: {}.", values.join(", ")));
            }
            let required_sub = target
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let default = prop.get("default").cloned();
            let sub = keys_of(root, target);
            Key { name: name.clone(), doc, sub, required_sub, default, aliases: vec![], values }
        })
        .collect()
}

/// `# `-prefixed lines of `text`, wrapped at 96 columns.
fn comment(out: &mut String, indent: &str, text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent.len() + 2 + line.len() + 1 + word.len() > 96 {
            out.push_str(&format!("{indent}# {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{indent}# {line}\n"));
    }
}

/// `key = value` in TOML.
fn toml_line(key: &str, v: &Value) -> String {
    let v = toml::Value::try_from(v).expect("config values are TOML values");
    format!("{key} = {v}\n")
}

/// `v`'s leaves by their key as a config file writes it (`lora.rank`, `rewards[1].weight`),
/// each with its value as JSON.
fn leaves(prefix: &str, v: &Value, out: &mut std::collections::BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaves(&key, v, out);
            }
        }
        Value::Array(a) if a.iter().any(Value::is_object) => {
            for (i, v) in a.iter().enumerate() {
                leaves(&format!("{prefix}[{i}]"), v, out);
            }
        }
        // An absent table (`lora` unset) is no leaf: its keys show as unset.
        Value::Null => {}
        leaf => {
            out.insert(prefix.to_string(), leaf.to_string());
        }
    }
}

impl JobConfig {
    /// Every key a config file may contain, with its documentation, from the type's schema,
    /// and its other spellings.
    pub fn keys() -> Vec<Key> {
        let schema = schemars::schema_for!(JobConfig);
        let root = schema.as_value();
        let mut keys = keys_of(root, root);
        for k in &mut keys {
            k.aliases = KEY_ALIASES
                .iter()
                .filter(|(_, key)| *key == k.name)
                .map(|(alias, _)| alias.to_string())
                .collect();
        }
        keys
    }

    /// Every key whose value differs from `before`'s, as `key: old -> new` (`(unset)` for an
    /// entry only one side has), in key order: what a coordinator restarted on a job with
    /// another config reports.
    pub fn changes_from(&self, before: &JobConfig) -> Vec<String> {
        let flat = |c: &JobConfig| {
            let mut m = std::collections::BTreeMap::new();
            leaves("", &serde_json::to_value(c).expect("a JobConfig serialises"), &mut m);
            m
        };
        let (old, new) = (flat(before), flat(self));
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        let shown = |v: Option<&String>| v.map_or("(unset)".to_string(), Clone::clone);
        keys.into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            .map(|k| format!("{k}: {} -> {}", shown(old.get(k)), shown(new.get(k))))
            .collect()
    }

    /// The default configuration as a TOML file, every key with its documentation
    /// (`dancegrpo-coordinator config --print-defaults`).
    pub fn defaults_toml() -> String {
        let keys = Self::keys();
        let defaults = serde_json::to_value(Self::default()).expect("defaults serialise");
        let mut out = String::new();
        comment(
            &mut out,
            "",
            "The dancegrpo job configuration with every key at its default: the DanceGRPO \
             reference's launch values (finetune_flux_grpo.sh). Written by \
             `dancegrpo-coordinator config --print-defaults`; keys can also be set with \
             DANCEGRPO_<KEY> environment variables (nested keys with __) and with \
             `--set key=value`.",
        );
        // Plain values first: TOML puts every table after them.
        for k in keys.iter().filter(|k| k.sub.is_empty()) {
            out.push('\n');
            comment(&mut out, "", &k.doc);
            match &defaults[&k.name] {
                Value::Null => out.push_str(&format!("# {} =\n", k.name)),
                v => out.push_str(&toml_line(&k.name, v)),
            }
        }
        for k in keys.iter().filter(|k| !k.sub.is_empty()) {
            out.push('\n');
            comment(&mut out, "", &k.doc);
            let tables: Vec<&Value> = match &defaults[&k.name] {
                Value::Array(a) => a.iter().collect(),
                Value::Null => vec![],
                v => vec![v],
            };
            let header = |out: &mut String, commented: bool| {
                let array = matches!(defaults[&k.name], Value::Array(_));
                let h = if array { format!("[[{}]]", k.name) } else { format!("[{}]", k.name) };
                out.push_str(&format!("{}{h}\n", if commented { "# " } else { "" }));
            };
            if tables.is_empty() {
                // Absent by default (`lora`): the table commented out, its keys documented.
                header(&mut out, true);
                for s in &k.sub {
                    comment(&mut out, "# ", &s.doc);
                    match &s.default {
                        Some(v) => out.push_str(&format!("# {}", toml_line(&s.name, v))),
                        None if k.required_sub.contains(&s.name) => {
                            out.push_str(&format!("# {} = (required)\n", s.name))
                        }
                        None => out.push_str(&format!("# {} =\n", s.name)),
                    }
                }
                continue;
            }
            for t in tables {
                header(&mut out, false);
                for s in &k.sub {
                    comment(&mut out, "", &s.doc);
                    out.push_str(&toml_line(&s.name, &t[&s.name]));
                }
            }
        }
        out
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
        // The reference's `--lr_scheduler` default and the launch's `--lr_warmup_steps 0`;
        // MixGRPO's `--multi_reward_mix` and `--trimmed_ratio` defaults.
        assert_eq!((c.lr_scheduler, c.lr_warmup_steps), (LrScheduler::ConstantWithWarmup, 0));
        assert_eq!((c.multi_reward_mix, c.trimmed_ratio), (MultiRewardMix::AdvantageAggr, 0.0));
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
    fn the_schedule_and_aggregation_keys_are_checked_each_by_name() {
        let problems = |c: JobConfig| c.validate().unwrap_err().problems;
        let d = JobConfig::default;
        JobConfig {
            lr_scheduler: LrScheduler::Cosine,
            lr_warmup_steps: 899,
            multi_reward_mix: MultiRewardMix::RewardAggr,
            trimmed_ratio: 0.9,
            ..d()
        }
        .validate()
        .unwrap();
        assert_eq!(
            problems(JobConfig { lr_scheduler: LrScheduler::Constant, lr_warmup_steps: 5, ..d() }),
            ["lr_warmup_steps 5 has no effect with lr_scheduler = constant (use \
              constant_with_warmup)"]
        );
        assert_eq!(
            problems(JobConfig { lr_warmup_steps: 900, ..d() }),
            ["lr_warmup_steps 900 must be below the job's 900 optimizer steps (max_train_steps \
              x train_batch_size x num_generations / gradient_accumulation_steps): it counts \
              optimizer steps, not iterations"]
        );
        for bad in [1.0, -0.1, f64::NAN] {
            assert_eq!(
                problems(JobConfig { trimmed_ratio: bad, ..d() }),
                [format!("trimmed_ratio must be in [0, 1) (got {bad})")]
            );
        }
        // G = 12: int(12 · 0.95) = 11 of 12 trimmed.
        assert_eq!(
            problems(JobConfig { trimmed_ratio: 0.95, ..d() }),
            ["trimmed_ratio 0.95 leaves 1 of the 12 members of a group for its std, which needs 2"]
        );
        assert_eq!(
            problems(JobConfig { trimmed_ratio: 0.1, use_group: false, ..d() }),
            ["trimmed_ratio trims group statistics and needs use_group = true"]
        );
        let mut zero = d();
        zero.rewards[0].weight = 0.0;
        zero.validate().unwrap();
        assert_eq!(
            problems(JobConfig { multi_reward_mix: MultiRewardMix::RewardAggr, ..zero }),
            ["multi_reward_mix = reward_aggr needs a rewards[].weight above 0: the weights are \
              normalised to sum 1"]
        );
        assert_eq!(d().trimmed_group_size(12), 12);
        assert_eq!(JobConfig { trimmed_ratio: 0.25, ..d() }.trimmed_group_size(12), 9);
    }

    #[test]
    fn full_sharding_needs_the_checkpointed_backward_and_leaves_lora_unsharded() {
        let problems = |c: JobConfig| c.validate().unwrap_err().problems;
        let full =
            || JobConfig { fsdp_sharding_strategy: ShardingStrategy::Full, ..JobConfig::default() };
        full().validate().unwrap();
        assert_eq!(
            problems(JobConfig { gradient_checkpointing: false, ..full() }),
            ["fsdp_sharding_strategy = full needs gradient_checkpointing = true: the sharded \
              backward gathers one block at a time, which is the checkpointed backward"]
        );
        let lora = Some(LoraConfig { rank: 4, alpha: 8.0, target_modules: default_lora_targets() });
        // LoRA under full shards nothing, and so needs no checkpointed backward either.
        let lora_full = JobConfig { lora: lora.clone(), gradient_checkpointing: false, ..full() };
        lora_full.validate().unwrap();
        assert!(full().shards_state() && !lora_full.shards_state());
        // Unsharded, either is fine.
        JobConfig { gradient_checkpointing: false, lora, ..JobConfig::default() }
            .validate()
            .unwrap();
    }

    #[test]
    fn the_rollout_gathers_per_forward_unless_refills_need_a_replica() {
        let with = |w, p| JobConfig {
            rollout_weights: w,
            non_finite_policy: p,
            fsdp_sharding_strategy: ShardingStrategy::Full,
            ..JobConfig::default()
        };
        use {NonFinitePolicy as P, RolloutWeights as W};
        assert!(!with(W::Auto, P::Fail).rollout_replica());
        assert!(with(W::Auto, P::DropGroup).rollout_replica());
        assert!(with(W::Replica, P::Fail).rollout_replica());
        assert!(!with(W::Gather, P::Fail).rollout_replica());
        assert_eq!(
            with(W::Gather, P::DropGroup).validate().unwrap_err().problems,
            ["rollout_weights = gather cannot serve non_finite_policy = drop_group: a refilled \
              group rolls out on its own ranks, while a per-forward gather needs every rank; use \
              rollout_weights = replica (or auto)"]
        );
        with(W::Replica, P::DropGroup).validate().unwrap();
    }

    /// The names serde's derived `Deserialize` of `T` accepts for its fields (its `FIELDS`):
    /// each field's own and its aliases.
    fn serde_field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        struct Probe<'a>(&'a mut &'static [&'static str]);
        impl<'de> serde::Deserializer<'de> for Probe<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(serde::de::Error::custom("probed"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Probe(&mut fields));
        fields
    }

    #[test]
    fn the_key_aliases_are_serdes_each_of_its_key() {
        let keys = JobConfig::keys();
        let fields = serde_field_names::<JobConfig>();
        assert!(fields.contains(&"num_generations"), "{fields:?}");
        let aliases: std::collections::BTreeSet<&str> =
            fields.iter().copied().filter(|f| Key::get(&keys, f).is_none()).collect();
        let listed = KEY_ALIASES.iter().map(|(alias, _)| *alias).collect();
        assert_eq!(aliases, listed, "KEY_ALIASES and the #[serde(alias)]es differ");
        let defaults = serde_json::to_value(JobConfig::default()).unwrap();
        for (alias, key) in KEY_ALIASES {
            assert_eq!(Key::find(&keys, alias).map(|k| k.name.as_str()), Some(*key));
            assert_eq!(Key::get(&keys, key).unwrap().aliases, [*alias]);
            // Both spellings at once: serde calls the second one the key again.
            let v = &defaults[key];
            let both = serde_json::json!({ *alias: v, *key: v });
            let e = serde_json::from_value::<JobConfig>(both).unwrap_err();
            assert!(e.to_string().contains(&format!("duplicate field `{key}`")), "{alias}: {e}");
        }
        let c: JobConfig = serde_json::from_str(r#"{"fsdp_sharding_startegy": "full"}"#).unwrap();
        assert_eq!(c.fsdp_sharding_strategy, ShardingStrategy::Full);
    }

    #[test]
    fn rewards_are_known_by_name_or_alias_and_model_rewards_need_their_directory() {
        let with = |rewards: Vec<RewardConfig>| JobConfig { rewards, ..JobConfig::default() };
        let r = |name: &str, model_dir: &str| RewardConfig {
            name: name.into(),
            weight: 1.0,
            model_dir: model_dir.into(),
            on_cpu: false,
        };
        with(vec![r("hps_v2.1", "hps_ckpt"), r("brightness", "")]).validate().unwrap();
        assert_eq!(r("hps", "").canonical_name(), Some("hpsv2"));
        let e = with(vec![r("hpsv3", ""), r("hpsv2", " ")]).validate().unwrap_err();
        // The registry grows (proto/src/rewards.rs); the message lists whatever it holds.
        let known = REWARDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        assert!(
            known.starts_with(
                "hpsv2, jpeg_compressibility, jpeg_incompressibility, brightness, contrast"
            ),
            "{known}"
        );
        assert_eq!(
            e.problems,
            [
                format!("rewards[0].name: unknown reward `hpsv3` (known: {known})"),
                "rewards[1].model_dir must name the hpsv2 model directory".to_string(),
            ]
        );
    }

    #[test]
    fn changes_name_every_key_that_differs_nested_and_listed_ones_included() {
        let before = JobConfig { learning_rate: 1e-5, ..JobConfig::default() };
        assert!(before.changes_from(&before).is_empty());
        let mut after = before.clone();
        after.learning_rate = 2e-5;
        after.lora =
            Some(LoraConfig { rank: 64, alpha: 128.0, target_modules: vec!["to_q".into()] });
        after.rewards[0].weight = 0.5;
        after.rewards.push(RewardConfig {
            name: "jpeg_compressibility".into(),
            weight: 1.0,
            model_dir: String::new(),
            on_cpu: false,
        });
        assert_eq!(
            after.changes_from(&before),
            [
                "learning_rate: 0.00001 -> 0.00002",
                "lora.alpha: (unset) -> 128.0",
                "lora.rank: (unset) -> 64",
                "lora.target_modules: (unset) -> [\"to_q\"]",
                "rewards[0].weight: 1.0 -> 0.5",
                "rewards[1].model_dir: (unset) -> \"\"",
                "rewards[1].name: (unset) -> \"jpeg_compressibility\"",
                "rewards[1].on_cpu: (unset) -> false",
                "rewards[1].weight: (unset) -> 1.0",
            ]
        );
    }

    #[test]
    fn keys_come_from_the_type_and_are_all_documented() {
        let v = serde_json::to_value(JobConfig::default()).unwrap();
        let mut fields: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        fields.sort();
        let keys = JobConfig::keys();
        let mut names: Vec<_> = keys.iter().map(|k| k.name.clone()).collect();
        names.sort();
        assert_eq!(fields, names);
        let sub = |n: &str| -> Vec<String> {
            Key::get(&keys, n).unwrap().sub.iter().map(|k| k.name.clone()).collect()
        };
        assert_eq!(sub("lora"), ["alpha", "rank", "target_modules"]);
        assert_eq!(sub("rewards"), ["model_dir", "name", "on_cpu", "weight"]);
        for k in &keys {
            assert!(!k.doc.trim().is_empty(), "`{}` has no doc comment", k.name);
            for s in &k.sub {
                assert!(!s.doc.trim().is_empty(), "`{}.{}` has no doc comment", k.name, s.name);
            }
        }
        let policy = &Key::get(&keys, "non_finite_policy").unwrap().doc;
        assert!(policy.ends_with("One of: fail, drop_group."), "{policy}");
    }

    #[test]
    fn the_default_file_reads_back_as_the_defaults_and_documents_every_key() {
        let text = JobConfig::defaults_toml();
        let back: JobConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, JobConfig::default());
        // Each key right after its documentation.
        for k in JobConfig::keys() {
            let first_line = k.doc.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
            let at = text
                .find(&format!("\n{} =", k.name))
                .or_else(|| text.find(&format!("[{}]", k.name)));
            let at = at.unwrap_or_else(|| panic!("`{}` missing from:\n{text}", k.name));
            let before = &text[..at];
            let para = &before[before.rfind("\n\n").unwrap_or(0)..];
            assert!(para.contains(&first_line), "`{}` not documented before it:\n{para}", k.name);
        }
        assert!(text.contains("# [lora]\n") && text.contains("# rank = (required)\n"), "{text}");
        assert!(text.contains("[[rewards]]\n"), "{text}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = serde_json::from_str::<JobConfig>(r#"{"num_generation": 4}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `num_generation`"), "{e}");
    }
}
