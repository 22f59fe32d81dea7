//! One training iteration as the coordinator sees it (DESIGN.md "The step protocol", steps
//! 1-5): the per-rank work lists, the rewards as they arrive, the group advantages once a group
//! is complete, the refill of groups whose rewards were not finite, and the ranks' metrics.
//!
//! Pure bookkeeping without locks or I/O, so every rule is unit-tested here; `state.rs` holds
//! it under the job's mutex.

use std::collections::{BTreeMap, BTreeSet};

use dancegrpo_proto::advantage::Aggregation;
use dancegrpo_proto::{
    Advantages, JobConfig, NonFinitePolicy, PhaseTimings, StepMetrics, TrajectoryAdvantage,
    TrajectoryRewards, WorkItem,
};

use crate::schedule::{PromptSampler, plan_iteration, trajectory_seed};

/// How many times a group may be refilled before the iteration fails anyway: a reward that is
/// NaN for every prompt is a bug, not bad luck.
pub const MAX_REFILLS: u32 = 3;

/// Why an iteration cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IterationError {
    /// A worker reported something that does not fit the plan.
    #[error("{0}")]
    Invalid(String),
    /// The iteration (and the job) must stop: a non-finite reward under `fail`, a reward model
    /// error, or a group that kept failing after its refills.
    #[error("{0}")]
    Fatal(String),
}

#[derive(Debug, Clone)]
struct Slot {
    rank: u32,
    item: WorkItem,
    /// The reported rewards (or the reward model's failure); `None` until reported.
    outcome: Option<Result<Vec<f64>, String>>,
}

impl Slot {
    /// The reported values; empty for a failure or nothing reported.
    fn values(&self) -> &[f64] {
        match &self.outcome {
            Some(Ok(v)) => v,
            _ => &[],
        }
    }
}

#[derive(Debug, Clone)]
struct Group {
    refills: u32,
    advantages: Option<Vec<Vec<f64>>>,
}

/// The state of the iteration in flight.
#[derive(Debug, Clone)]
pub struct Iteration {
    /// 0-based iteration number (= completed iterations when it started).
    pub index: u64,
    /// The world generation it was planned for.
    pub generation: u64,
    plan: Vec<Vec<WorkItem>>,
    /// Keyed by (group, member).
    slots: BTreeMap<(u64, u32), Slot>,
    groups: BTreeMap<u64, Group>,
    refill: BTreeMap<u32, Vec<WorkItem>>,
    metrics: BTreeMap<u32, StepMetrics>,
    /// Ranks that were handed their advantages: only they can have trained on them.
    handed: BTreeSet<u32>,
    /// Whether its step is checkpointed, once decided: every rank told of it hears the same.
    checkpoint: Option<bool>,
    num_rewards: usize,
    num_generations: u32,
}

impl Iteration {
    /// Plans iteration `index`: `world_size · train_batch_size` prompts from the sampler, G
    /// members each, split evenly over the ranks.
    pub fn plan(
        index: u64,
        generation: u64,
        cfg: &JobConfig,
        world_size: u32,
        sampler: &mut PromptSampler,
    ) -> Result<Self, IterationError> {
        let prompts = sampler.take((world_size * cfg.train_batch_size) as usize);
        Self::with_prompts(index, generation, cfg, world_size, &prompts)
    }

    /// Plans iteration `index` over the given prompts; a group may span two ranks when
    /// `prompts · G` does not split into whole groups per rank.
    pub fn with_prompts(
        index: u64,
        generation: u64,
        cfg: &JobConfig,
        world_size: u32,
        prompts: &[u64],
    ) -> Result<Self, IterationError> {
        let plan = plan_iteration(index, prompts, cfg.num_generations, world_size, cfg.seed)
            .map_err(IterationError::Invalid)?;
        let mut slots = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for (rank, items) in plan.iter().enumerate() {
            for it in items {
                slots.insert(
                    (it.group_id, it.member_index),
                    Slot { rank: rank as u32, item: *it, outcome: None },
                );
                groups.insert(it.group_id, Group { refills: 0, advantages: None });
            }
        }
        Ok(Self {
            index,
            generation,
            plan,
            slots,
            groups,
            refill: BTreeMap::new(),
            metrics: BTreeMap::new(),
            handed: BTreeSet::new(),
            checkpoint: None,
            num_rewards: cfg.rewards.len(),
            num_generations: cfg.num_generations,
        })
    }

    /// The work items of `rank`.
    pub fn work(&self, rank: u32) -> &[WorkItem] {
        self.plan.get(rank as usize).map_or(&[], Vec::as_slice)
    }

    /// Records rewards of `rank`'s trajectories, then computes the advantages of every group
    /// that became complete. Under `drop_group`, a group with a non-finite reward or a reward
    /// error gets a fresh prompt from `sampler` and goes back to its ranks as refill work.
    pub fn report(
        &mut self,
        rank: u32,
        rewards: Vec<TrajectoryRewards>,
        cfg: &JobConfig,
        sampler: &mut PromptSampler,
    ) -> Result<(), IterationError> {
        for TrajectoryRewards { item, outcome } in rewards {
            let key = (item.group_id, item.member_index);
            let slot = self.slots.get_mut(&key).ok_or_else(|| {
                IterationError::Invalid(format!(
                    "iteration {}: no trajectory group {} member {}",
                    self.index, item.group_id, item.member_index
                ))
            })?;
            if slot.rank != rank || slot.item != item {
                return Err(IterationError::Invalid(format!(
                    "iteration {}: rank {rank} reported group {} member {} (prompt {}, seed {}), \
                     which is not its current work",
                    self.index, item.group_id, item.member_index, item.prompt_index, item.seed
                )));
            }
            // A failure carries no values to count.
            let reported = outcome.as_ref().map_or(self.num_rewards, Vec::len);
            if reported != self.num_rewards {
                return Err(IterationError::Invalid(format!(
                    "group {} member {}: {reported} rewards reported, the job has {}",
                    item.group_id, item.member_index, self.num_rewards
                )));
            }
            slot.outcome = Some(outcome);
        }
        self.settle(cfg, sampler)
    }

    fn members(&self, group: u64) -> impl Iterator<Item = &Slot> {
        self.slots.range((group, 0)..=(group, u32::MAX)).map(|(_, s)| s)
    }

    /// What is wrong with a complete group's rewards, if anything.
    fn problem(&self, group: u64, cfg: &JobConfig) -> Option<String> {
        for s in self.members(group) {
            let it = &s.item;
            let at = format!(
                "iteration {} group {} member {} (prompt {}, rank {})",
                self.index, it.group_id, it.member_index, it.prompt_index, s.rank
            );
            if let Some(Err(e)) = &s.outcome {
                return Some(format!("reward failed for {at}: {e}"));
            }
            if let Some((k, v)) = s.values().iter().enumerate().find(|(_, v)| !v.is_finite()) {
                let name = cfg.rewards.get(k).map_or("?", |r| r.name.as_str());
                return Some(format!("reward {name} is {v} for {at}"));
            }
        }
        None
    }

    fn settle(
        &mut self,
        cfg: &JobConfig,
        sampler: &mut PromptSampler,
    ) -> Result<(), IterationError> {
        let complete: Vec<u64> = self
            .groups
            .iter()
            .filter(|(g, st)| {
                st.advantages.is_none() && self.members(**g).all(|s| s.outcome.is_some())
            })
            .map(|(g, _)| *g)
            .collect();
        for g in complete {
            let Some(problem) = self.problem(g, cfg) else { continue };
            let refills = self.groups[&g].refills;
            if cfg.non_finite_policy == NonFinitePolicy::Fail || refills >= MAX_REFILLS {
                let why = if refills >= MAX_REFILLS {
                    format!(" (after {refills} refills)")
                } else {
                    " (non_finite_policy = fail)".to_string()
                };
                return Err(IterationError::Fatal(format!("{problem}{why}")));
            }
            tracing::warn!(iteration = self.index, group = g, "{problem}; refilling the group");
            let prompt = sampler.take(1)[0];
            let attempt = refills + 1;
            self.groups.get_mut(&g).expect("listed").refills = attempt;
            for slot in self.slots.range_mut((g, 0)..=(g, u32::MAX)).map(|(_, s)| s) {
                slot.item.prompt_index = prompt;
                // A new seed per attempt: the same noise could well fail again.
                slot.item.seed = trajectory_seed(cfg.seed, self.index, g, attempt);
                slot.outcome = None;
                self.refill.entry(slot.rank).or_default().push(slot.item);
                // The rank's work list follows, so a rank restarted mid-iteration redoes the
                // current trajectories.
                if let Some(w) = self.plan[slot.rank as usize]
                    .iter_mut()
                    .find(|w| w.group_id == g && w.member_index == slot.item.member_index)
                {
                    *w = slot.item;
                }
            }
        }
        self.compute_advantages(cfg)
    }

    fn compute_advantages(&mut self, cfg: &JobConfig) -> Result<(), IterationError> {
        let rewards_of = |slots: Vec<&Slot>| -> Vec<Vec<f64>> {
            slots.iter().map(|s| s.values().to_vec()).collect()
        };
        let fatal = |e: dancegrpo_proto::advantage::AdvantageError| {
            IterationError::Fatal(format!("advantages: {e}"))
        };
        let aggregation = Aggregation::from_config(cfg);
        if cfg.use_group {
            let ready: Vec<u64> = self
                .groups
                .iter()
                .filter(|(g, st)| {
                    st.advantages.is_none()
                        && self.members(**g).all(|s| s.outcome.is_some())
                        && self.problem(**g, cfg).is_none()
                })
                .map(|(g, _)| *g)
                .collect();
            for g in ready {
                let adv =
                    aggregation.group(&rewards_of(self.members(g).collect())).map_err(fatal)?;
                self.groups.get_mut(&g).expect("listed").advantages = Some(adv);
            }
        } else if self.slots.values().all(|s| s.outcome.is_some())
            && self.groups.values().any(|g| g.advantages.is_none())
        {
            // Global normalisation over every trajectory of the iteration (the reference's
            // path without --use_group, which all-gathers the rewards of all ranks).
            let all: Vec<&Slot> = self.slots.values().collect();
            let adv = aggregation.global(&rewards_of(all)).map_err(fatal)?;
            let mut adv = adv.into_iter();
            let keys: Vec<u64> = self.groups.keys().copied().collect();
            for g in keys {
                let n = self.members(g).count();
                self.groups.get_mut(&g).expect("listed").advantages =
                    Some(adv.by_ref().take(n).collect());
            }
        }
        Ok(())
    }

    /// `rank`'s answer to GetAdvantages, if it can be given now: refill work first (roll out,
    /// report, ask again), else the advantages once every group it holds members of is done.
    pub fn advantages(&mut self, rank: u32) -> Option<Advantages> {
        if let Some(refill) = self.refill.remove(&rank) {
            return Some(Advantages { iteration: self.index, advantages: vec![], refill });
        }
        let mine: Vec<&Slot> = self.slots.values().filter(|s| s.rank == rank).collect();
        let mut out = Vec::with_capacity(mine.len());
        for s in mine {
            let g = self.groups.get(&s.item.group_id)?;
            let adv = g.advantages.as_ref()?;
            let pos = self.members(s.item.group_id).position(|m| m.item == s.item)?;
            out.push(TrajectoryAdvantage { item: s.item, advantages: adv[pos].clone() });
        }
        self.handed.insert(rank);
        Some(Advantages { iteration: self.index, advantages: out, refill: vec![] })
    }

    /// Whether its step is checkpointed: `due()` the first time it is asked, the same answer
    /// after that.
    pub fn checkpoint(&mut self, due: impl FnOnce() -> bool) -> bool {
        *self.checkpoint.get_or_insert_with(due)
    }

    /// Whether its step is checkpointed, `None` until [`Self::checkpoint`] has decided.
    pub fn checkpoint_decided(&self) -> Option<bool> {
        self.checkpoint
    }

    /// Whether `rank` has finished this iteration (reported its metrics).
    pub fn finished_by(&self, rank: u32) -> bool {
        self.metrics.contains_key(&rank)
    }

    /// Records `rank`'s step metrics; true once every rank has reported. A rank that was
    /// never handed its advantages cannot have trained on them: its report is refused.
    pub fn record_metrics(&mut self, rank: u32, m: StepMetrics) -> Result<bool, IterationError> {
        self.check_handed(rank)?;
        self.metrics.insert(rank, m);
        Ok(self.metrics.len() == self.plan.len())
    }

    /// Refuses a report of `rank`'s update before it was handed the advantages of it.
    pub fn check_handed(&self, rank: u32) -> Result<(), IterationError> {
        if self.handed.contains(&rank) {
            return Ok(());
        }
        Err(IterationError::Invalid(format!(
            "rank {rank} reports its update of iteration {} before it was given its advantages",
            self.index + 1
        )))
    }

    /// Checks that every rank ended the iteration with the same weights.
    pub fn check_replicas(&self) -> Result<(), IterationError> {
        let prints: BTreeSet<u64> =
            self.metrics.values().map(|m| m.weights_fingerprint.to_bits()).collect();
        if prints.len() > 1 {
            let detail: Vec<String> = self
                .metrics
                .iter()
                .map(|(r, m)| format!("rank {r}: {:e}", m.weights_fingerprint))
                .collect();
            return Err(IterationError::Fatal(format!(
                "ranks hold different weights after iteration {} ({}): the replicas diverged",
                self.index,
                detail.join(", ")
            )));
        }
        Ok(())
    }

    /// Mean of each reward over all trajectories (the reward log's value is the first).
    pub fn mean_rewards(&self) -> Vec<f64> {
        let n = self.slots.len().max(1) as f64;
        (0..self.num_rewards).map(|k| self.reported(k).sum::<f64>() / n).collect()
    }

    /// Reward `k` of every trajectory whose rewards were reported.
    fn reported(&self, k: usize) -> impl Iterator<Item = f64> + '_ {
        self.slots.values().filter_map(move |s| Some(s.outcome.as_ref()?.as_ref().ok()?[k]))
    }

    /// Per reward, the standard deviation (population) of the trajectories' rewards that were
    /// reported: how far apart the group members are, which is what the advantages divide by.
    pub fn std_rewards(&self) -> Vec<f64> {
        (0..self.num_rewards)
            .map(|k| {
                let v: Vec<f64> = self.reported(k).collect();
                let n = v.len().max(1) as f64;
                let mean = v.iter().sum::<f64>() / n;
                (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
            })
            .collect()
    }

    /// The ranks' metrics folded into one record: mean loss and ratios, the max ratio
    /// deviation and the slowest rank's timings (the one everybody waited for).
    pub fn summary(&self) -> StepMetrics {
        let n = self.metrics.len().max(1) as f64;
        let ms: Vec<&StepMetrics> = self.metrics.values().collect();
        let mean = |f: fn(&StepMetrics) -> f64| ms.iter().map(|m| f(m)).sum::<f64>() / n;
        let max = |f: fn(&StepMetrics) -> f64| ms.iter().map(|m| f(m)).fold(0.0, f64::max);
        let t = |f: fn(&PhaseTimings) -> f64| ms.iter().map(|m| f(&m.timings)).fold(0.0, f64::max);
        StepMetrics {
            iteration: self.index,
            loss: mean(|m| m.loss),
            grad_norm: mean(|m| m.grad_norm),
            ratio_dev_mean: mean(|m| m.ratio_dev_mean),
            ratio_dev_max: max(|m| m.ratio_dev_max),
            clip_fraction: mean(|m| m.clip_fraction),
            timings: PhaseTimings {
                rollout_s: t(|p| p.rollout_s),
                decode_s: t(|p| p.decode_s),
                reward_s: t(|p| p.reward_s),
                train_s: t(|p| p.train_s),
                communication_s: t(|p| p.communication_s),
            },
            rank: 0,
            weights_fingerprint: ms.first().map_or(0.0, |m| m.weights_fingerprint),
            optimizer_steps: ms.first().map_or(0, |m| m.optimizer_steps),
        }
    }

    /// Group size G.
    pub fn num_generations(&self) -> u32 {
        self.num_generations
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Cursor;

    fn cfg(policy: NonFinitePolicy) -> JobConfig {
        JobConfig {
            num_generations: 4,
            train_batch_size: 1,
            non_finite_policy: policy,
            ..JobConfig::default()
        }
    }

    fn rewards_for(
        it: &Iteration,
        rank: u32,
        f: impl Fn(&WorkItem) -> f64,
    ) -> Vec<TrajectoryRewards> {
        it.work(rank)
            .iter()
            .map(|w| TrajectoryRewards { item: *w, outcome: Ok(vec![f(w)]) })
            .collect()
    }

    #[test]
    fn a_group_spanning_two_ranks_gets_its_advantages_when_both_halves_are_in() {
        let c = cfg(NonFinitePolicy::Fail);
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        // 2 ranks x 1 prompt x G=4: group 0 on rank 0, group 1 on rank 1.
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        assert_eq!(it.work(0).len(), 4);
        it.report(0, rewards_for(&it, 0, |w| w.member_index as f64), &c, &mut s).unwrap();
        assert!(it.advantages(1).is_none(), "rank 1's group has no rewards yet");
        let a0 = it.advantages(0).unwrap();
        let got: Vec<f64> = a0.advantages.iter().map(|a| a.advantages[0]).collect();
        // r = 0,1,2,3: mean 1.5, unbiased std sqrt(5/3).
        let sd = (5.0f64 / 3.0).sqrt() + 1e-8;
        let want: Vec<f64> = [0.0, 1.0, 2.0, 3.0].iter().map(|r| (r - 1.5) / sd).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn spanning_groups_wait_for_every_member() {
        let c = JobConfig { num_generations: 4, ..cfg(NonFinitePolicy::Fail) };
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        // 3 prompts x G=4 = 12 trajectories over 2 ranks, 6 each: group 1 spans both ranks.
        let mut it = Iteration::with_prompts(0, 1, &c, 2, &[7, 8, 9]).unwrap();
        it.report(0, rewards_for(&it, 0, |w| f64::from(w.member_index)), &c, &mut s).unwrap();
        assert!(it.advantages(0).is_none(), "group 1 is half on rank 1");
        it.report(1, rewards_for(&it, 1, |w| f64::from(w.member_index)), &c, &mut s).unwrap();
        assert_eq!(it.advantages(0).unwrap().advantages.len(), 6);
        assert_eq!(it.advantages(1).unwrap().advantages.len(), 6);
        assert_eq!(it.mean_rewards(), vec![1.5]);
    }

    #[test]
    fn a_nan_reward_fails_loudly_or_refills_the_group_per_policy() {
        let c = cfg(NonFinitePolicy::Fail);
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        let e = it
            .report(
                0,
                rewards_for(&it, 0, |w| if w.member_index == 2 { f64::NAN } else { 1.0 }),
                &c,
                &mut s,
            )
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, IterationError::Fatal(_)));
        assert!(msg.contains("reward hpsv2 is NaN for iteration 0 group 0 member 2"), "{msg}");

        let c = cfg(NonFinitePolicy::DropGroup);
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        let before = it.work(0).to_vec();
        it.report(0, rewards_for(&it, 0, |_| f64::INFINITY), &c, &mut s).unwrap();
        let refill = it.advantages(0).unwrap();
        assert!(refill.advantages.is_empty());
        assert_eq!(refill.refill.len(), 4);
        assert_ne!(refill.refill[0].prompt_index, before[0].prompt_index, "a fresh prompt");
        assert_ne!(refill.refill[0].seed, before[0].seed);
        assert_eq!(it.work(0)[0].prompt_index, refill.refill[0].prompt_index);
        // The stale trajectories are refused; the refilled ones are accepted.
        let stale: Vec<_> =
            before.iter().map(|w| TrajectoryRewards { item: *w, outcome: Ok(vec![1.0]) }).collect();
        assert!(matches!(it.report(0, stale, &c, &mut s), Err(IterationError::Invalid(_))));
        it.report(0, rewards_for(&it, 0, |w| f64::from(w.member_index)), &c, &mut s).unwrap();
        assert_eq!(it.advantages(0).unwrap().advantages.len(), 4);
        // A group that keeps failing ends the iteration after MAX_REFILLS.
        let mut it = Iteration::plan(1, 1, &c, 2, &mut s).unwrap();
        for _ in 0..MAX_REFILLS {
            it.report(1, rewards_for(&it, 1, |_| f64::NAN), &c, &mut s).unwrap();
            assert!(!it.advantages(1).unwrap().refill.is_empty());
        }
        let e = it.report(1, rewards_for(&it, 1, |_| f64::NAN), &c, &mut s).unwrap_err();
        assert!(e.to_string().contains("after 3 refills"), "{e}");
    }

    #[test]
    fn a_reward_error_is_named_and_foreign_items_are_refused() {
        let c = cfg(NonFinitePolicy::Fail);
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        let theirs = rewards_for(&it, 1, |_| 1.0);
        let e = it.report(0, theirs, &c, &mut s).unwrap_err();
        assert!(e.to_string().contains("not its current work"), "{e}");
        let mut mine = rewards_for(&it, 0, |_| 1.0);
        mine[1].outcome = Err("HPS model: out of memory".into());
        let e = it.report(0, mine, &c, &mut s).unwrap_err();
        assert!(e.to_string().contains("reward failed for iteration 0 group 0 member 1"), "{e}");
        assert!(e.to_string().contains("out of memory"), "{e}");
    }

    #[test]
    fn global_normalisation_without_use_group() {
        let c = JobConfig { use_group: false, ..cfg(NonFinitePolicy::Fail) };
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        it.report(0, rewards_for(&it, 0, |_| 0.0), &c, &mut s).unwrap();
        assert!(it.advantages(0).is_none(), "global needs every rank");
        it.report(1, rewards_for(&it, 1, |_| 1.0), &c, &mut s).unwrap();
        // Rewards 0 (rank 0's) and 1 (rank 1's), half each: mean 0.5, std 0.5.
        assert_eq!((it.mean_rewards(), it.std_rewards()), (vec![0.5], vec![0.5]));
        let a0 = it.advantages(0).unwrap().advantages[0].advantages[0];
        let a1 = it.advantages(1).unwrap().advantages[0].advantages[0];
        assert!(a0 < 0.0 && a1 > 0.0 && (a0 + a1).abs() < 1e-12, "{a0} {a1}");
    }

    #[test]
    fn reward_aggr_hands_one_advantage_of_the_weighted_sum_with_trimmed_statistics() {
        use dancegrpo_proto::RewardConfig;
        use dancegrpo_proto::config::MultiRewardMix;
        let mut c = cfg(NonFinitePolicy::Fail);
        c.rewards[0].weight = 1.0;
        c.rewards.push(RewardConfig {
            name: "brightness".into(),
            weight: 3.0,
            model_dir: String::new(),
            on_cpu: false,
        });
        c.multi_reward_mix = MultiRewardMix::RewardAggr;
        // G = 4: int(4 · 0.25) = 1, the lowest reward, is left out of the statistics.
        c.trimmed_ratio = 0.25;
        c.validate().unwrap();
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        for rank in [0, 1] {
            let r: Vec<TrajectoryRewards> = it
                .work(rank)
                .iter()
                .map(|w| TrajectoryRewards {
                    item: *w,
                    outcome: Ok(vec![f64::from(w.member_index), 0.0]),
                })
                .collect();
            it.report(rank, r, &c, &mut s).unwrap();
        }
        // Weights 1/4 and 3/4: rewards 0, .25, .5, .75; kept .25, .5, .75: mean .5, std .25.
        let got: Vec<Vec<f64>> =
            it.advantages(0).unwrap().advantages.into_iter().map(|a| a.advantages).collect();
        let want: Vec<Vec<f64>> =
            [0.0, 0.25, 0.5, 0.75].iter().map(|r| vec![(r - 0.5) / (0.25 + 1e-8)]).collect();
        assert_eq!(got, want);
        // The same rewards per reward (advantage_aggr, untrimmed): two advantages each.
        let c =
            JobConfig { multi_reward_mix: MultiRewardMix::AdvantageAggr, trimmed_ratio: 0.0, ..c };
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        for rank in [0, 1] {
            let r = it
                .work(rank)
                .iter()
                .map(|w| TrajectoryRewards { item: *w, outcome: Ok(vec![1.0, 2.0]) })
                .collect();
            it.report(rank, r, &c, &mut s).unwrap();
        }
        assert!(it.advantages(1).unwrap().advantages.iter().all(|a| a.advantages == [0.0, 0.0]));
    }

    #[test]
    fn diverged_replicas_are_caught() {
        let c = cfg(NonFinitePolicy::Fail);
        let mut s = PromptSampler::new(1, 10, Cursor::default());
        let mut it = Iteration::plan(0, 1, &c, 2, &mut s).unwrap();
        let m = |f: f64| StepMetrics { weights_fingerprint: f, ..Default::default() };
        let e = it.record_metrics(0, m(1.5)).unwrap_err();
        assert!(e.to_string().contains("before it was given its advantages"), "{e}");
        for rank in [0, 1] {
            it.report(rank, rewards_for(&it, rank, |_| 0.5), &c, &mut s).unwrap();
        }
        for rank in [0, 1] {
            it.advantages(rank).unwrap();
        }
        assert!(!it.record_metrics(0, m(1.5)).unwrap());
        assert!(it.record_metrics(1, m(1.5)).unwrap());
        it.check_replicas().unwrap();
        it.record_metrics(1, m(1.5000001)).unwrap();
        let e = it.check_replicas().unwrap_err();
        assert!(e.to_string().contains("replicas diverged"), "{e}");
    }
}
