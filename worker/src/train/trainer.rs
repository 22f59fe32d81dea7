//! The worker's half of an iteration, on the compute thread: roll out the assigned
//! trajectories, decode and score them, then train on them with the advantages the
//! coordinator sends back. Also restores and writes checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dancegrpo_proto::advantage::{MAX_ABS_REWARD, usable_reward};
use dancegrpo_proto::config::{MultiRewardMix, ShardingStrategy, WeightType};
use dancegrpo_proto::{
    JobConfig, PhaseTimings, RewardConfig, StepMetrics, TrajectoryRewards, WorkItem,
};
use tch::{Kind, Tensor};

use super::TrainError;
use super::optim::{AdamW, AdamWConfig, LrSchedule};
use super::policy::Policy;
use super::shard::{self, Gathering, Sharded};
use super::shard_files::{OPTIMIZER_DIR, SavedShards};
use super::step::{
    LossSettings, UpdateStats, accumulate, apply_sharded_update, apply_update, train_steps,
};
use super::{checkpoint, persist};
use crate::data::PromptDataset;
use crate::device::Device;
use crate::dist::ProcessGroup;
use crate::flux::checkpoint::{BlockWeights, Resident};
use crate::latents;
use crate::reward::RewardSet;
use crate::reward::loss::MultiRewardClipLoss;
use crate::sampler::rollout::FirstStepMemo;
use crate::sampler::{Conditioning, NoiseKey, Schedule, rollout, rollout_with};
use crate::vae::to_uint8;

/// A rolled-out trajectory, kept until the update.
#[derive(Debug)]
struct Rollout {
    item: WorkItem,
    prompt_embeds: Tensor,
    pooled: Tensor,
    txt_ids: Tensor,
    latents: Tensor,
    log_probs: Tensor,
}

/// Rewards of a batch of trajectories, as reported.
pub type Scored = Vec<TrajectoryRewards>;

/// The trainer of one rank.
#[derive(Debug)]
pub struct Trainer {
    cfg: JobConfig,
    device: Device,
    policy: Policy,
    opt: AdamW,
    /// This rank's share of the training state under `fsdp_sharding_strategy = full` (the
    /// optimizer then steps its slices); `None` when every rank holds it all.
    shard: Option<Sharded>,
    rewards: RewardSet,
    data: Box<dyn PromptDataset>,
    data_path: PathBuf,
    sched: Schedule,
    img_ids: Tensor,
    /// Completed iterations the weights correspond to; `None` after an interrupted update.
    step: Option<u64>,
    rollouts: BTreeMap<(u64, u32), Rollout>,
    /// A group's shared first forward (`init_same_noise`); cleared whenever the weights change.
    memo: FirstStepMemo,
    /// This iteration's images (uint8 `[H, W, 3]`) and first reward, for the sample grid.
    images: Vec<(Tensor, f64)>,
    timings: PhaseTimings,
}

/// The dataset directory of `data_json_path` (a manifest, an index or their folder).
pub fn data_dir(path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_file() { p.parent().map(Path::to_path_buf).unwrap_or_default() } else { p.into() }
}

fn adamw(cfg: &JobConfig) -> AdamWConfig {
    AdamWConfig {
        lr: cfg.learning_rate,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    }
}

/// A rank's place in the world: its rank and the world size.
pub type Place = (u32, u32);

/// The optimizer of `policy` under `cfg`, its learning rate following the job's schedule: over
/// the trainable weights, or over this rank's slices of them when the job is sharded.
fn optimizer(
    cfg: &JobConfig,
    policy: &Policy,
    (rank, world): Place,
) -> Result<(AdamW, Option<Sharded>), TrainError> {
    let schedule = LrSchedule::of(cfg);
    match cfg.fsdp_sharding_strategy {
        ShardingStrategy::Full if !cfg.shards_state() || !policy.lora.is_empty() => {
            tracing::info!(
                "fsdp_sharding_strategy = full with LoRA: the adapters are replicated and \
                 all-reduced, the frozen base is held in the forward's dtype on every rank"
            );
            Ok((AdamW::new(policy.trainable(), adamw(cfg))?.with_schedule(schedule), None))
        }
        ShardingStrategy::None => {
            Ok((AdamW::new(policy.trainable(), adamw(cfg))?.with_schedule(schedule), None))
        }
        ShardingStrategy::Full => {
            let kind = policy.model.compute_kind();
            let (shard, masters) = Sharded::cut(&policy.trainable(), rank, world, kind)?;
            let l = shard.layout();
            tracing::info!(
                rank,
                world,
                units = l.units.len(),
                "training state sharded (full): this rank owns {} of the {} weights' master, \
                 gradient and moments",
                l.shard_elements(),
                l.elements()
            );
            let mut shard = shard;
            if !cfg.rollout_replica() {
                // The rollout gathers per forward: no replica, from the start.
                shard.release_blocks()?;
            }
            tracing::info!(
                replica = cfg.rollout_replica(),
                "sharded rollout: {}",
                if cfg.rollout_replica() {
                    "on a replica gathered once per iteration"
                } else {
                    "each block gathered per forward"
                }
            );
            Ok((AdamW::over(masters, adamw(cfg))?.with_schedule(schedule), Some(shard)))
        }
    }
}

impl Trainer {
    /// Loads the policy, the rewards and the prompts of `cfg` on `device`: the state of step 0.
    /// `place` is this rank's in the world, which a sharded job cuts its state for.
    pub fn new(cfg: &JobConfig, device: Device, place: Place) -> Result<Self, TrainError> {
        let policy = Policy::load(cfg, device)?;
        let (opt, shard) = optimizer(cfg, &policy, place)?;
        let rewards =
            RewardSet::from_config(&cfg.rewards, device.tch().unwrap_or(tch::Device::Cpu))?;
        let data_path = data_dir(&cfg.data_json_path);
        let data = crate::data::open(&data_path)?;
        let sched = Schedule::new(cfg.sampling_steps as usize, cfg.shift)?;
        let img_ids = device.to(&latents::img_ids(i64::from(cfg.h), i64::from(cfg.w))?)?;
        Ok(Self {
            cfg: cfg.clone(),
            device,
            policy,
            opt,
            shard,
            rewards,
            data,
            data_path,
            sched,
            img_ids,
            step: Some(0),
            rollouts: BTreeMap::new(),
            memo: FirstStepMemo::default(),
            images: Vec::new(),
            timings: PhaseTimings::default(),
        })
    }

    /// The learning rate the next optimizer step uses.
    pub fn learning_rate(&self) -> f64 {
        self.opt.lr()
    }

    /// The step the weights are at, as GetWork wants it (`None` after an interrupted update).
    pub fn ready_for(&self) -> Option<u64> {
        self.step
    }

    /// Drops what belongs to the current process group before it goes (a prefetch in flight).
    pub fn leave_group(&mut self) {
        if let Some(shard) = &mut self.shard {
            shard.forget_pending();
        }
    }

    /// The place a sharded trainer's state is cut for (`None` when not sharded).
    pub fn sharded_place(&self) -> Option<Place> {
        self.shard.as_ref().map(Sharded::place)
    }

    /// Goes back to the state after `step` iterations: the pretrained weights for 0, else the
    /// checkpoint in `dir` (weights or adapters, and the optimizer state), cut for `place`
    /// when sharded (any world size may have written the checkpoint).
    pub fn restore(
        &mut self,
        step: u64,
        dir: Option<&Path>,
        place: Place,
    ) -> Result<(), TrainError> {
        tracing::info!(step, dir = ?dir, "restoring the training state");
        // The old model, its optimizer state and the rollouts go before the next is loaded.
        self.rollouts.clear();
        self.memo.clear();
        self.shard = None;
        self.opt = AdamW::over(Vec::new(), adamw(&self.cfg))?;
        self.policy.release()?;
        self.policy = Policy::load(&self.cfg, self.device)?;
        if let Some(dir) = dir {
            persist::load_into(dir, &mut self.policy)?;
        }
        (self.opt, self.shard) = optimizer(&self.cfg, &self.policy, place)?;
        if let Some(dir) = dir.filter(|d| SavedShards::exists(d)) {
            // A sharded job's checkpoint: its f32 masters and moments, re-cut for this place.
            let saved = SavedShards::open(dir)?;
            match &mut self.shard {
                Some(shard) => {
                    shard.load_saved(&mut self.opt, &saved, self.cfg.rollout_replica())?
                }
                None => shard::load_unsharded(&mut self.opt, &saved)?,
            }
        } else if let Some(dir) = dir {
            let file = dir.join(persist::OPTIMIZER);
            match &self.shard {
                Some(shard) => shard.load(&mut self.opt, &file)?,
                None => self.opt.load(&file)?,
            }
        } else if step != 0 {
            return Err(TrainError::Invalid(format!("no checkpoint to restore step {step} from")));
        }
        self.rollouts.clear();
        self.memo.clear();
        self.step = Some(step);
        Ok(())
    }

    fn prompt(&self, index: u64) -> Result<crate::data::PromptItem, TrainError> {
        let len = self.data.len();
        if index as usize >= len {
            return Err(TrainError::Invalid(format!(
                "prompt index {index} is outside the dataset of {len} prompts at {}: the \
                 coordinator and this worker see different datasets",
                self.data_path.display()
            )));
        }
        Ok(self.data.get(index as usize)?)
    }

    /// Rolls out, decodes and scores `items` one at a time (rollout batch 1, which keeps the
    /// rollout's and the update's log-probs identical). A reward model error is reported per
    /// trajectory, for the coordinator's `non_finite_policy`; anything else is an error.
    /// Sharded with `rollout_weights = gather`, each forward gathers the blocks over `group`,
    /// which every rank joins in step (each rolls out as many trajectories).
    pub fn rollout(
        &mut self,
        items: &[WorkItem],
        mut group: Option<&mut ProcessGroup>,
    ) -> Result<Scored, TrainError> {
        let (h, w) = (i64::from(self.cfg.h), i64::from(self.cfg.w));
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let t0 = Instant::now();
            let p = self.prompt(item.prompt_index)?;
            let prompt_embeds = self.device.to(&p.prompt_embeds.f_unsqueeze(0)?)?;
            let pooled = self.device.to(&p.pooled_prompt_embeds.f_unsqueeze(0)?)?;
            let txt_ids = self.device.to(&p.text_ids)?;
            let cond = Conditioning {
                encoder_hidden_states: &prompt_embeds,
                pooled_projections: &pooled,
                guidance: self.cfg.guidance,
                img_ids: &self.img_ids,
                txt_ids: &txt_ids,
            };
            let key = NoiseKey {
                seed: item.seed,
                prompt: item.prompt_index,
                member: u64::from(item.member_index),
            };
            let (model, sched, eta, same) =
                (&self.policy.model, &self.sched, self.cfg.eta, self.cfg.init_same_noise);
            let traj = match self.shard.as_mut().filter(|_| !self.cfg.rollout_replica()) {
                // No memo: a hit would skip a forward, and its gathers, on this rank only.
                Some(shard) => {
                    let mut g = Gathering { shard, opt: &self.opt, group: group.as_deref_mut() };
                    rollout_with(model, &mut g, &cond, &[key], sched, eta, same, None)?
                }
                None => rollout(model, &cond, &[key], sched, eta, same, Some(&mut self.memo))?,
            };
            self.device.synchronize()?;
            let t1 = Instant::now();
            let image = {
                let _g = tch::no_grad_guard();
                to_uint8(&self.policy.vae.decode_packed(&traj.x0, h, w)?)?
            };
            self.device.synchronize()?;
            let t2 = Instant::now();
            let scored = self.rewards.score(&image, std::slice::from_ref(&p.caption));
            let t3 = Instant::now();
            self.timings.rollout_s += (t1 - t0).as_secs_f64();
            self.timings.decode_s += (t2 - t1).as_secs_f64();
            self.timings.reward_s += (t3 - t2).as_secs_f64();
            let outcome = match scored {
                Ok(mut v) => finite_scores(v.pop().unwrap_or_default(), &self.cfg.rewards),
                Err(e) => Err(e.to_string()),
            };
            let first = outcome.as_ref().ok().and_then(|v| v.first()).copied().unwrap_or(f64::NAN);
            self.images.push((image.f_squeeze_dim(0)?.f_to_device(tch::Device::Cpu)?, first));
            self.rollouts.insert(
                (item.group_id, item.member_index),
                Rollout {
                    item: *item,
                    prompt_embeds,
                    pooled,
                    txt_ids,
                    latents: traj.latents,
                    log_probs: traj.log_probs,
                },
            );
            out.push(TrajectoryRewards { item: *item, outcome });
        }
        if let Some(shard) = self.shard.as_mut().filter(|_| !self.cfg.rollout_replica()) {
            self.timings.communication_s += shard.take_communication_s();
            let (gathers, prefetched) = shard.take_gathers();
            tracing::info!(
                gathers,
                prefetched,
                "sharded rollout: {prefetched} of {gathers} gathers prefetched"
            );
        }
        Ok(out)
    }

    /// Trains on this rank's trajectories in work order with their advantages `[K]` each,
    /// stepping the optimizer every `gradient_accumulation_steps` trajectories.
    pub fn train(
        &mut self,
        iteration: u64,
        work: &[WorkItem],
        advantages: &BTreeMap<(u64, u32), Vec<f64>>,
        mut group: Option<&mut ProcessGroup>,
    ) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        let transitions = self.sched.steps() - 1;
        let count = self.cfg.train_timesteps();
        let ga = self.cfg.gradient_accumulation_steps as usize;
        let settings = LossSettings {
            eta: self.cfg.eta,
            clip: MultiRewardClipLoss {
                clip_range: self.cfg.clip_range,
                adv_clip_max: self.cfg.adv_clip_max,
                // Under reward_aggr the weights are in the one reward its advantage is of.
                weights: match self.cfg.multi_reward_mix {
                    MultiRewardMix::AdvantageAggr => self.rewards.weights().to_vec(),
                    MultiRewardMix::RewardAggr => vec![1.0],
                },
            },
            divisor: (ga * count) as f64,
            checkpointing: self.cfg.gradient_checkpointing,
        };
        // Every trajectory is there before the first collective: a rank that stopped in the
        // middle of the update would leave its peers waiting in one until the timeout.
        for item in work {
            let key = (item.group_id, item.member_index);
            if !self.rollouts.get(&key).is_some_and(|r| r.item == *item) {
                return Err(TrainError::Invalid(format!(
                    "no rollout of group {} member {} to train on",
                    item.group_id, item.member_index
                )));
            }
            if !advantages.contains_key(&key) {
                return Err(TrainError::Invalid(format!(
                    "no advantages for group {} member {}",
                    item.group_id, item.member_index
                )));
            }
        }
        // From here until the last step, the weights match no recorded step.
        self.step = None;
        self.memo.clear();
        match &mut self.shard {
            // The rollout replica goes: a block is gathered only while it runs.
            Some(shard) => {
                shard.release_blocks()?;
                shard.zero_grad()?;
            }
            None => self.opt.zero_grad()?,
        }
        let mut stats = UpdateStats::default();
        for (i, item) in work.iter().enumerate() {
            let key = (item.group_id, item.member_index);
            let r = self.rollouts.get(&key).filter(|r| r.item == *item).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "no rollout of group {} member {} to train on",
                    item.group_id, item.member_index
                ))
            })?;
            let adv = advantages.get(&key).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "no advantages for group {} member {}",
                    item.group_id, item.member_index
                ))
            })?;
            let adv = self
                .device
                .to(&Tensor::from_slice(adv).f_to_kind(Kind::Float)?.f_unsqueeze(0)?)?;
            let cond = Conditioning {
                encoder_hidden_states: &r.prompt_embeds,
                pooled_projections: &r.pooled,
                guidance: self.cfg.guidance,
                img_ids: &self.img_ids,
                txt_ids: &r.txt_ids,
            };
            let steps =
                train_steps(item.seed, item.group_id, item.member_index, transitions, count);
            let mut resident = Resident;
            let mut gathering;
            let weights: &mut dyn BlockWeights = match &mut self.shard {
                Some(shard) => {
                    gathering = Gathering { shard, opt: &self.opt, group: group.as_deref_mut() };
                    &mut gathering
                }
                None => &mut resident,
            };
            accumulate(
                &self.policy.model,
                weights,
                &cond,
                &r.latents,
                &r.log_probs,
                &adv,
                &steps,
                &self.sched,
                &settings,
                &mut stats,
            )?;
            if (i + 1) % ga == 0 {
                let (opt, max_norm) = (&mut self.opt, self.cfg.max_grad_norm);
                match &mut self.shard {
                    Some(shard) => apply_sharded_update(
                        shard,
                        opt,
                        group.as_deref_mut(),
                        max_norm,
                        &mut stats,
                    )?,
                    None => apply_update(opt, group.as_deref_mut(), max_norm, &mut stats)?,
                }
            }
        }
        // Trajectories beyond the last whole accumulation window are dropped, as in the
        // reference (config validation makes the window divide the work).
        match &mut self.shard {
            Some(shard) => {
                shard.zero_grad()?;
                if self.cfg.rollout_replica() {
                    // The replica the next rollout reads.
                    shard.gather_all(&self.opt, group.as_deref_mut())?;
                }
                stats.communication_s += shard.take_communication_s();
                let (gathers, prefetched) = shard.take_gathers();
                tracing::info!(
                    iteration,
                    gathers,
                    prefetched,
                    waited_s = stats.communication_s,
                    "sharded update: {prefetched} of {gathers} gathers prefetched"
                );
            }
            None => self.opt.zero_grad()?,
        }
        self.rollouts.clear();
        self.step = Some(iteration + 1);
        let weights_fingerprint = self.fingerprint(group)?;
        self.timings.train_s = start.elapsed().as_secs_f64() - stats.communication_s;
        self.timings.communication_s += stats.communication_s;
        tracing::debug!(
            iteration,
            transitions = stats.transitions,
            skipped_backward = stats.skipped_backward,
            memo_hits = self.memo.hits(),
            "update done"
        );
        let n = stats.transitions.max(1) as f64;
        let metrics = StepMetrics {
            iteration,
            loss: stats.loss,
            grad_norm: stats.grad_norm_sum / f64::from(stats.optimizer_steps.max(1)),
            ratio_dev_mean: stats.ratio_dev_sum / n,
            ratio_dev_max: stats.ratio_dev_max,
            clip_fraction: stats.clipped as f64 / n,
            timings: std::mem::take(&mut self.timings),
            rank: 0,
            weights_fingerprint,
            optimizer_steps: stats.optimizer_steps,
        };
        Ok(metrics)
    }

    /// Σ of every trainable weight in f64: equal across ranks iff (in practice) the replicas
    /// are. Sharded, of the gathered weights (the replica, or each unit gathered in turn when
    /// there is none), so it equals the unsharded trainer's.
    fn fingerprint(&mut self, group: Option<&mut ProcessGroup>) -> Result<f64, TrainError> {
        let sums = match self.shard.as_mut().filter(|_| !self.cfg.rollout_replica()) {
            Some(shard) => Some(shard.sums(&self.opt, group)?),
            None => None,
        };
        let mut s = 0.0;
        for (name, t) in self.policy.trainable() {
            s += match &sums {
                Some(sums) => sums.get(&name).copied().ok_or_else(|| {
                    TrainError::Invalid(format!("{name}: not in the sharded layout"))
                })?,
                None => t.f_sum(Kind::Double)?.f_double_value(&[])?,
            };
        }
        Ok(s)
    }

    /// Writes `checkpoint-<step>` under `output_dir` (atomically) with the trainer state the
    /// coordinator sent. Sharded, every rank calls it and writes its own part into rank 0's
    /// temporary folder, which rank 0 names to the others first; `None` on the others.
    pub fn save_checkpoint(
        &self,
        step: u64,
        trainer_state_json: &str,
        mut group: Option<&mut ProcessGroup>,
    ) -> Result<Option<PathBuf>, TrainError> {
        let out = Path::new(&self.cfg.output_dir);
        let export = match self.cfg.export_weight_type {
            WeightType::Bf16 => Kind::BFloat16,
            WeightType::Fp32 => Kind::Float,
        };
        let config = self.policy.model.config();
        if let Some(shard) = self.shard.as_ref().filter(|s| s.place().0 != 0) {
            let pid = announce(group.as_deref_mut(), self.device, 0.0)?;
            if pid < 0.0 {
                return Err(TrainError::Io(format!(
                    "rank 0 could not start checkpoint-{step} in {}",
                    out.display()
                )));
            }
            let tmp = checkpoint::tmp_dir(out, step, pid as u32);
            shard.save(&self.opt, group, &tmp, config, export)?;
            return Ok(None);
        }
        let mut announced = false;
        let written = checkpoint::write_checkpoint(out, step, |tmp| -> Result<(), TrainError> {
            match &self.shard {
                Some(shard) => {
                    let dir = tmp.join(OPTIMIZER_DIR);
                    std::fs::create_dir(&dir)
                        .map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
                    // Told once, even when the collective fails (the group is broken then).
                    announced = true;
                    announce(group.as_deref_mut(), self.device, f64::from(std::process::id()))?;
                    shard.save(&self.opt, group.as_deref_mut(), tmp, config, export)?
                }
                None => {
                    persist::save_policy(tmp, &self.policy, &self.cfg)?;
                    self.opt.save(&tmp.join(persist::OPTIMIZER))?;
                }
            }
            persist::save_rng(tmp, &self.cfg)?;
            std::fs::write(tmp.join("trainer_state.json"), trainer_state_json)
                .map_err(|e| TrainError::Io(format!("trainer_state.json: {e}")))
        });
        if self.shard.is_some() && !announced {
            // The other ranks wait for the folder's name: they learn that there is none.
            announce(group, self.device, -1.0)?;
        }
        let dir = written?;
        tracing::info!(dir = %dir.display(), "checkpoint written");
        Ok(Some(dir))
    }

    /// Writes this iteration's samples as a PNG grid and forgets them.
    pub fn write_samples(&mut self, iteration: u64) -> Result<PathBuf, TrainError> {
        let path = Path::new(&self.cfg.output_dir)
            .join("samples")
            .join(format!("iteration-{:06}.png", iteration + 1));
        let images: Vec<Tensor> = self.images.iter().map(|(t, _)| t.shallow_clone()).collect();
        let labels: Vec<String> = self.images.iter().map(|(_, r)| format!("{r:.4}")).collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
        }
        super::grid::write_grid(&path, &Tensor::f_stack(&images, 0)?, &labels)?;
        self.images.clear();
        Ok(path)
    }

    /// Forgets this iteration's images without writing them.
    pub fn drop_samples(&mut self) {
        self.images.clear();
    }
}

/// Rank 0's `value` (its pid, or −1 when it cannot write), told to every rank of a sharded
/// job's checkpoint: the others add 0.
fn announce(
    group: Option<&mut ProcessGroup>,
    device: Device,
    value: f64,
) -> Result<f64, TrainError> {
    match group.filter(|g| g.world_size() > 1) {
        None => Ok(value),
        Some(g) => {
            // f32, which collectives take: a pid (at most 2^22 on Linux) is exact in it.
            let mut t = device.to(&Tensor::from_slice(&[value as f32]))?;
            g.all_reduce(&mut t, crate::dist::ReduceOp::Sum)?;
            Ok(t.f_double_value(&[0])?)
        }
    }
}

/// A trajectory's scores, or the error that names the first unusable one (not finite, or
/// beyond `MAX_ABS_REWARD`): the coordinator refuses those on the wire, and applies
/// `non_finite_policy` to the error.
fn finite_scores(scores: Vec<f64>, rewards: &[RewardConfig]) -> Result<Vec<f64>, String> {
    match scores.iter().enumerate().find(|(_, v)| !usable_reward(**v)) {
        None => Ok(scores),
        Some((k, v)) if v.is_finite() => {
            let name = rewards.get(k).map_or("?", |r| r.name.as_str());
            Err(format!("reward {name} is {v}, beyond ±{MAX_ABS_REWARD:e}"))
        }
        Some((k, v)) => {
            let name = rewards.get(k).map_or("?", |r| r.name.as_str());
            Err(format!("reward {name} is {v}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_score_becomes_an_error_naming_its_reward() {
        let rewards: Vec<RewardConfig> = ["hpsv2", "jpeg_compressibility"]
            .iter()
            .map(|n| RewardConfig {
                name: n.to_string(),
                weight: 1.0,
                model_dir: String::new(),
                on_cpu: false,
            })
            .collect();
        assert_eq!(finite_scores(vec![0.25, -1.0], &rewards), Ok(vec![0.25, -1.0]));
        assert_eq!(
            finite_scores(vec![0.25, f64::NAN], &rewards),
            Err("reward jpeg_compressibility is NaN".into())
        );
        assert_eq!(finite_scores(vec![f64::INFINITY], &rewards), Err("reward hpsv2 is inf".into()));
        // Finite, but its group's statistics would overflow.
        assert_eq!(
            finite_scores(vec![0.5, -f64::MAX], &rewards),
            Err(format!("reward jpeg_compressibility is {}, beyond ±1e12", -f64::MAX))
        );
        assert_eq!(finite_scores(vec![1e12, -1e12], &rewards), Ok(vec![1e12, -1e12]));
    }
}
