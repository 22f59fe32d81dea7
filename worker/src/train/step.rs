//! The update of DanceGRPO (ALGORITHM.md §5 step 6-7, §12): per trajectory, a random subset of
//! its transitions is re-evaluated under the current weights, the PPO-clip loss of each is
//! back-propagated at once (one graph alive at a time), and every `gradient_accumulation_steps`
//! trajectories the gradients are averaged over the ranks, clipped by their global norm and
//! applied by AdamW.

use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::TrainError;
use super::optim::AdamW;
use super::shard::Sharded;
use crate::dist::{ProcessGroup, ReduceOp};
use crate::flux::FluxTransformer;
use crate::flux::checkpoint::{BlockWeights, is_zero};
use crate::reward::loss::MultiRewardClipLoss;
use crate::sampler::rollout::backward_log_prob_with;
use crate::sampler::{Conditioning, Schedule, recompute_log_prob};

/// What the loss of one transition needs besides the model.
#[derive(Clone, Debug)]
pub struct LossSettings {
    /// SDE noise level η.
    pub eta: f64,
    /// The clipped loss (ε, advantage clamp, per-reward weights).
    pub clip: MultiRewardClipLoss,
    /// `gradient_accumulation_steps · train_timesteps`: the reference divides every
    /// transition's loss by it, so one optimizer step sees the mean.
    pub divisor: f64,
    /// Recompute blocks in backward instead of keeping their activations.
    pub checkpointing: bool,
}

/// Running statistics of an iteration's update.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpdateStats {
    /// Σ of the (divided) transition losses.
    pub loss: f64,
    /// Σ |ratio − 1| over transitions.
    pub ratio_dev_sum: f64,
    /// max |ratio − 1|.
    pub ratio_dev_max: f64,
    /// Transitions whose ratio left [1 − ε, 1 + ε].
    pub clipped: u64,
    /// Transitions trained.
    pub transitions: u64,
    /// Σ of the pre-clip global gradient norms.
    pub grad_norm_sum: f64,
    /// Optimizer steps taken.
    pub optimizer_steps: u32,
    /// Updates skipped for a non-finite gradient norm (weights and moments kept).
    pub skipped_updates: u32,
    /// Seconds in the gradient all-reduce.
    pub communication_s: f64,
    /// Transitions whose loss had a zero gradient (clipped on the side PPO does not push),
    /// so their backward through the transformer was skipped (counted without activation
    /// checkpointing; the checkpointed backward skips them too, see `flux::checkpoint`).
    pub skipped_backward: u64,
}

/// The transitions one trajectory trains on: the first `count` entries of a permutation of
/// `0..transitions` (the reference's per-sample `randperm(S − 1)`; the last transition is never
/// among them). Keyed by the trajectory, so a redone iteration picks the same ones.
pub fn train_steps(
    seed: u64,
    group: u64,
    member: u32,
    transitions: usize,
    count: usize,
) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&group.to_le_bytes());
    key[16..20].copy_from_slice(&member.to_le_bytes());
    key[24..].copy_from_slice(b"timestep");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut perm: Vec<usize> = (0..transitions).collect();
    perm.shuffle(&mut rng);
    perm.truncate(count);
    perm
}

/// Back-propagates the loss of each transition `k ∈ steps` of one trajectory:
/// `latents` `[1, S+1, N, C]` and `log_probs` `[1, S]` from its rollout, `advantages` `[1, K]`.
/// The checkpointed backward takes the blocks' weights from `weights` (sharded training).
#[allow(clippy::too_many_arguments)]
pub fn accumulate(
    model: &FluxTransformer,
    weights: &mut dyn BlockWeights,
    cond: &Conditioning<'_>,
    latents: &Tensor,
    log_probs: &Tensor,
    advantages: &Tensor,
    steps: &[usize],
    sched: &Schedule,
    s: &LossSettings,
    stats: &mut UpdateStats,
) -> Result<(), TrainError> {
    for &k in steps {
        let z = latents.f_select(1, k as i64)?;
        let z_next = latents.f_select(1, k as i64 + 1)?;
        let old = log_probs.f_narrow(1, k as i64, 1)?.f_reshape([-1])?;
        let mut ratio_dev = Vec::new();
        let mut loss_of = |new: &Tensor| -> Result<Tensor, TrainError> {
            let out = s.clip.compute(new, &old, advantages)?;
            let r = new.f_sub(&old)?.f_exp()?.f_to_kind(Kind::Double)?;
            ratio_dev = Vec::<f64>::try_from((r - 1.0).f_abs()?.f_reshape([-1])?)?;
            Ok(out.total.f_div_scalar(s.divisor)?)
        };
        let loss = if s.checkpointing {
            backward_log_prob_with(model, cond, &z, &z_next, sched, k, s.eta, weights, loss_of)?
        } else {
            let lp = recompute_log_prob(model, cond, &z, &z_next, sched, k, s.eta)?;
            // The loss is back-propagated to the log-prob first, and from there through the
            // transformer only when that gradient is not zero. It is zero when the ratio left
            // the clip range on the side the advantage favours (the clamp is flat there),
            // which after the first optimizer step of an iteration is most of the time with
            // the reference's ε = 1e-4. Seeding the second backward with exactly that gradient
            // gives the same weight gradients, bit for bit, as one `loss.backward()`.
            let lp_leaf = lp.f_detach()?.f_set_requires_grad(true)?;
            let l = loss_of(&lp_leaf)?;
            l.f_backward()?;
            let g = lp_leaf.grad();
            if is_zero(&g)? {
                stats.skipped_backward += 1;
            } else {
                lp.f_mul(&g)?.f_sum(lp.kind())?.f_backward()?;
            }
            l.f_detach()?
        };
        stats.loss += loss.f_double_value(&[])?;
        for d in ratio_dev {
            stats.ratio_dev_sum += d;
            stats.ratio_dev_max = stats.ratio_dev_max.max(d);
            stats.clipped += u64::from(d > s.clip.clip_range);
            stats.transitions += 1;
        }
    }
    Ok(())
}

/// Averages the accumulated gradients over the ranks, clips their global norm and steps the
/// optimizer; the gradients are dropped after.
pub fn apply_update(
    opt: &mut AdamW,
    group: Option<&mut ProcessGroup>,
    max_grad_norm: f64,
    stats: &mut UpdateStats,
) -> Result<(), TrainError> {
    // Every weight steps, with a zero gradient where this window left none: a window whose
    // backwards were all skipped (flat losses) must still decay the weights and moments, as
    // the reference's zero-valued backward does.
    let mut grads = opt.grads()?;
    if let Some(g) = group.filter(|g| g.world_size() > 1) {
        let start = Instant::now();
        g.all_reduce_many(&mut grads, ReduceOp::Average)?;
        stats.communication_s += start.elapsed().as_secs_f64();
    }
    drop(grads);
    let norm = opt.clip_grad_norm(max_grad_norm)?;
    // A NaN or Inf gradient would make every weight NaN (torch's clip scales by it): the
    // update is skipped and the weights and moments stay as they were. The norm is of the
    // averaged gradients, so every rank skips the same update; the coordinator sees the
    // non-finite norm and applies `non_finite_policy` (fail the job, or go on).
    if norm.is_finite() {
        opt.step()?;
    }
    count_update(stats, norm);
    opt.zero_grad()?;
    Ok(())
}

/// [`apply_update`] for sharded training: the same clip and AdamW on this rank's slices
/// ([`Sharded::step`]); a non-finite global norm skips the update on every rank.
pub fn apply_sharded_update(
    shard: &mut Sharded,
    opt: &mut AdamW,
    group: Option<&mut ProcessGroup>,
    max_grad_norm: f64,
    stats: &mut UpdateStats,
) -> Result<(), TrainError> {
    let norm = shard.step(opt, group, max_grad_norm)?;
    count_update(stats, norm);
    Ok(())
}

/// Counts an update whose pre-clip global norm was `norm` (skipped when not finite).
fn count_update(stats: &mut UpdateStats, norm: f64) {
    stats.grad_norm_sum += norm;
    if norm.is_finite() {
        stats.optimizer_steps += 1;
    } else {
        tracing::warn!(grad_norm = norm, "non-finite gradient norm: update skipped");
        stats.skipped_updates += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamWConfig;

    /// A window without any backward (all its losses flat) steps as torch does after a
    /// zero-valued backward: weight decay only, and the moments' step count advances.
    #[test]
    fn a_window_without_gradients_still_decays_every_weight() {
        let p = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..AdamWConfig::default() };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg).unwrap();
        let mut stats = UpdateStats::default();
        apply_update(&mut opt, None, 1.0, &mut stats).unwrap();
        let want = Tensor::full([3], 1.0 - 0.1 * 0.5, (Kind::Float, tch::Device::Cpu));
        assert!(p.detach().equal(&want), "{p}");
        assert_eq!(opt.state()[0].step, 1);
        assert!(!p.grad().defined(), "gradients are dropped after the step");
    }

    #[test]
    fn a_non_finite_gradient_skips_the_update_and_keeps_weights_and_moments() {
        let p = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..AdamWConfig::default() };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg).unwrap();
        let mut stats = UpdateStats::default();
        for bad in [f32::NAN, f32::INFINITY] {
            p.f_mul_scalar(f64::from(bad)).unwrap().sum(Kind::Float).backward();
            apply_update(&mut opt, None, 1.0, &mut stats).unwrap();
            assert!(p.detach().equal(&Tensor::ones([3], (Kind::Float, tch::Device::Cpu))), "{p}");
            assert_eq!(opt.state()[0].step, 0, "the moments did not step");
            assert!(!p.grad().defined(), "the bad gradient is dropped");
        }
        assert_eq!((stats.optimizer_steps, stats.skipped_updates), (0, 2));
        assert!(stats.grad_norm_sum.is_nan(), "the norm is reported as it was");
        // The next good gradient steps as usual.
        p.sum(Kind::Float).backward();
        apply_update(&mut opt, None, 1.0, &mut stats).unwrap();
        assert_eq!((opt.state()[0].step, stats.optimizer_steps), (1, 1));
    }

    #[test]
    fn train_steps_are_a_keyed_subset_without_the_last_transition() {
        let a = train_steps(42, 3, 1, 15, 9);
        assert_eq!(a.len(), 9);
        assert!(a.iter().all(|&k| k < 15));
        let mut u = a.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 9, "no repeats");
        assert_eq!(a, train_steps(42, 3, 1, 15, 9), "reproducible");
        assert_ne!(a, train_steps(42, 3, 2, 15, 9), "per trajectory");
    }
}
