//! Group-relative advantages (ALGORITHM.md §4; DESIGN.md step 3):
//! `A = (r − mean(r)) / (std(r) + 1e-8)` over the G members of a prompt group, with the
//! unbiased std (divides by G − 1) and the epsilon outside the square root, then clamped to
//! `±adv_clip_max`.
//!
//! Several rewards are combined as MixGRPO's `multi_reward_mix` says ([`Aggregation`]):
//! - `advantage_aggr`: each reward gets its own normalisation (the HPS + CLIP pattern of the
//!   reference), and the loss weights the per-reward clipped losses later. (MixGRPO instead
//!   sums the weighted advantages before one clipped loss; the two agree for one reward.)
//! - `reward_aggr`: the rewards are summed with their weights normalised to sum 1,
//!   `r = Σ_k (w_k / Σ_j w_j)·r_k`, and that one reward is normalised.
//!
//! MixGRPO's `trimmed_ratio` takes the mean and std of a group without its lowest
//! `min(int(G·ratio), G − 1)` rewards; every member's advantage is still computed from them.
//!
//! Non-finite rewards are checked before anything else: one NaN would otherwise turn every
//! advantage of its group into NaN and silently poison the update.
//!
//! Arithmetic is f64 (the reference uses f32 tensors); the difference is below f32 rounding.

use crate::config::{JobConfig, MultiRewardMix};

/// Added to the std, outside the square root, as the reference does.
pub const STD_EPS: f64 = 1e-8;

/// The largest reward magnitude taken. No reward model scores near it, and beyond it the sums
/// and squares of a group's statistics would overflow to an infinite mean or a NaN advantage.
pub const MAX_ABS_REWARD: f64 = 1e12;

/// How many of a group of `g` MixGRPO's `trimmed_ratio` leaves out of the statistics:
/// `min(int(g · ratio), g − 1)`, the lowest rewards.
pub fn trim_count(g: usize, ratio: f64) -> usize {
    // NaN and ratios ≤ 0 trim nothing.
    if ratio.is_nan() || ratio <= 0.0 {
        return 0;
    }
    ((g as f64 * ratio) as usize).min(g.saturating_sub(1))
}

/// Whether a reward can be used: finite and within [`MAX_ABS_REWARD`].
pub fn usable_reward(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_ABS_REWARD
}

/// Why a group's advantages cannot be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdvantageError {
    /// A reward is NaN or infinite.
    #[error("reward {reward} of group member {member} is not finite ({value})")]
    NonFinite {
        /// Index of the trajectory within the group.
        member: usize,
        /// Index of the reward (config order).
        reward: usize,
        /// The value.
        value: f64,
    },
    /// Members report different numbers of rewards.
    #[error("group member {member} has {found} rewards, expected {expected}")]
    RewardCount {
        /// Index of the trajectory within the group.
        member: usize,
        /// How many it has.
        found: usize,
        /// How many the first member has.
        expected: usize,
    },
    /// The unbiased std needs at least two members.
    #[error("a group needs at least 2 members for an unbiased std, got {0}")]
    GroupTooSmall(usize),
    /// A bad clamp.
    #[error("adv_clip_max must be finite and > 0, got {0}")]
    BadClip(f64),
    /// Trimming leaves fewer than two members for the std.
    #[error(
        "trimmed_ratio {ratio} leaves {left} of a group of {members} for its std, which needs 2"
    )]
    TrimmedTooFar {
        /// The ratio.
        ratio: f64,
        /// Members of the group.
        members: usize,
        /// Members left after trimming.
        left: usize,
    },
    /// `reward_aggr` weights that do not fit the rewards.
    #[error("reward_aggr: {0}")]
    Weights(String),
}

/// How a job's rewards become the advantages its loss takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregation {
    /// `advantage_aggr` or `reward_aggr`.
    pub mix: MultiRewardMix,
    /// The rewards' weights, in config order.
    pub weights: Vec<f64>,
    /// Fraction of a group's lowest rewards left out of its statistics.
    pub trimmed_ratio: f64,
    /// The advantage clamp.
    pub adv_clip_max: f64,
}

impl Aggregation {
    /// The aggregation `cfg` asks for.
    pub fn from_config(cfg: &JobConfig) -> Self {
        Self {
            mix: cfg.multi_reward_mix,
            weights: cfg.rewards.iter().map(|r| r.weight).collect(),
            trimmed_ratio: cfg.trimmed_ratio,
            adv_clip_max: cfg.adv_clip_max,
        }
    }

    /// The weights of the clipped losses, one per advantage of a trajectory: the rewards'
    /// under `advantage_aggr`, a single 1 under `reward_aggr` (the weights are in the reward).
    pub fn loss_weights(&self) -> Vec<f64> {
        match self.mix {
            MultiRewardMix::AdvantageAggr => self.weights.clone(),
            MultiRewardMix::RewardAggr => vec![1.0],
        }
    }

    /// Advantages of one prompt group, with the trimmed statistics. `rewards[m][k]` is reward
    /// k of member m; the result has one row per member, of [`Self::loss_weights`]' length.
    pub fn group(&self, rewards: &[Vec<f64>]) -> Result<Vec<Vec<f64>>, AdvantageError> {
        check_clip(self.adv_clip_max)?;
        let r = self.combined(rewards)?;
        normalise(&r, self.adv_clip_max, self.trimmed_ratio)
    }

    /// Advantages over every trajectory of an iteration (`use_group = false`): one
    /// normalisation of all of them, untrimmed.
    pub fn global(&self, rewards: &[Vec<f64>]) -> Result<Vec<Vec<f64>>, AdvantageError> {
        check_clip(self.adv_clip_max)?;
        let r = self.combined(rewards)?;
        normalise(&r, self.adv_clip_max, 0.0)
    }

    /// The rewards as the advantages see them: as given, or their weighted sum.
    fn combined<'a>(
        &self,
        rewards: &'a [Vec<f64>],
    ) -> Result<std::borrow::Cow<'a, [Vec<f64>]>, AdvantageError> {
        check_rewards(rewards)?;
        if self.mix == MultiRewardMix::AdvantageAggr {
            return Ok(rewards.into());
        }
        let k = rewards.first().map_or(0, Vec::len);
        if self.weights.len() != k {
            return Err(AdvantageError::Weights(format!(
                "{} weights for {k} rewards",
                self.weights.len()
            )));
        }
        let total: f64 = self.weights.iter().sum();
        if !(total.is_finite() && total > 0.0) || self.weights.iter().any(|w| *w < 0.0) {
            return Err(AdvantageError::Weights(format!(
                "weights {:?} must be >= 0 with a positive sum",
                self.weights
            )));
        }
        // MixGRPO's order: the weights divided by their sum first, then `0.0 + r_1·w_1 + …`.
        let w: Vec<f64> = self.weights.iter().map(|w| w / total).collect();
        Ok(rewards
            .iter()
            .map(|row| vec![row.iter().zip(&w).fold(0.0, |acc, (r, w)| acc + r * w)])
            .collect::<Vec<_>>()
            .into())
    }
}

/// Advantages of one prompt group.
///
/// `rewards[m][k]` is reward k of member m (the layout of `TrajectoryReward.rewards`); the
/// result has the same layout (`TrajectoryAdvantage.advantages`).
///
/// One advantage per reward, the whole group's statistics: [`Aggregation::group`] under
/// `advantage_aggr` with `trimmed_ratio` 0.
pub fn group_advantages(
    rewards: &[Vec<f64>],
    adv_clip_max: f64,
) -> Result<Vec<Vec<f64>>, AdvantageError> {
    check_clip(adv_clip_max)?;
    check_rewards(rewards)?;
    normalise(rewards, adv_clip_max, 0.0)
}

fn check_clip(adv_clip_max: f64) -> Result<(), AdvantageError> {
    if adv_clip_max.is_finite() && adv_clip_max > 0.0 {
        Ok(())
    } else {
        Err(AdvantageError::BadClip(adv_clip_max))
    }
}

/// Every member has as many rewards as the first, all finite.
fn check_rewards(rewards: &[Vec<f64>]) -> Result<(), AdvantageError> {
    let k = rewards.first().map_or(0, Vec::len);
    for (member, row) in rewards.iter().enumerate() {
        if row.len() != k {
            return Err(AdvantageError::RewardCount { member, found: row.len(), expected: k });
        }
        if let Some((reward, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(AdvantageError::NonFinite { member, reward, value });
        }
    }
    Ok(())
}

/// Normalises each column of `rewards` (checked) over its members, the statistics without the
/// lowest [`trim_count`] values, and clamps.
fn normalise(
    rewards: &[Vec<f64>],
    adv_clip_max: f64,
    trimmed_ratio: f64,
) -> Result<Vec<Vec<f64>>, AdvantageError> {
    check_clip(adv_clip_max)?;
    let g = rewards.len();
    let k = rewards.first().map_or(0, Vec::len);
    if g < 2 {
        return Err(AdvantageError::GroupTooSmall(g));
    }
    let trim = trim_count(g, trimmed_ratio);
    if g - trim < 2 {
        let left = g - trim;
        return Err(AdvantageError::TrimmedTooFar { ratio: trimmed_ratio, members: g, left });
    }
    let mut out = vec![vec![0.0; k]; g];
    for j in 0..k {
        let column: Vec<f64> = rewards.iter().map(|r| r[j]).collect();
        // Untrimmed, the members' own order (the sums' rounding is that of before trimming
        // existed); trimmed, the ascending order MixGRPO sums in.
        let kept = if trim == 0 {
            column.clone()
        } else {
            let mut sorted = column.clone();
            sorted.sort_by(f64::total_cmp);
            sorted.split_off(trim)
        };
        let n = kept.len();
        let mean = kept.iter().sum::<f64>() / n as f64;
        let var = kept.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let denom = var.sqrt() + STD_EPS;
        for (o, r) in out.iter_mut().zip(&column) {
            o[j] = ((r - mean) / denom).clamp(-adv_clip_max, adv_clip_max);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(a: &[Vec<f64>], j: usize) -> Vec<f64> {
        a.iter().map(|r| r[j]).collect()
    }

    #[test]
    fn matches_torch_unbiased_std() {
        // torch: r = tensor([1., 2., 3., 6.]); (r - r.mean()) / (r.std() + 1e-8)
        //   = [-0.9258201, -0.46291006, 0.0, 1.3887302]  (std = 2.1602469)
        let a = group_advantages(&[vec![1.0], vec![2.0], vec![3.0], vec![6.0]], 5.0).unwrap();
        let want = [-0.9258201, -0.46291006, 0.0, 1.3887302];
        for (x, w) in col(&a, 0).iter().zip(want) {
            assert!((x - w).abs() < 1e-6, "{x} vs {w}");
        }
    }

    #[test]
    fn each_reward_is_normalised_separately() {
        // Reward 1 is reward 0 scaled by 1000 and shifted: same advantages.
        let r: Vec<Vec<f64>> =
            [0.3, 0.1, 0.2, 0.5].iter().map(|&x| vec![x, 1000.0 * x - 7.0]).collect();
        let a = group_advantages(&r, 5.0).unwrap();
        // Equal up to the 1e-8 epsilon, whose weight differs with the std's scale.
        for (x, y) in col(&a, 0).iter().zip(col(&a, 1)) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        let sum: f64 = col(&a, 0).iter().sum();
        assert!(sum.abs() < 1e-12);
    }

    #[test]
    fn clamps_and_handles_constant_groups() {
        // 50 zeros and one 1: torch gives the outlier ≈ 7.0014, clamped to 5.
        let mut r = vec![vec![0.0]; 50];
        r.push(vec![1.0]);
        let a = group_advantages(&r, 5.0).unwrap();
        assert_eq!(a[50][0], 5.0);
        // Equal rewards: the mean's rounding leaves ~1e-16 over a std of ~1e-16 + 1e-8.
        let a = group_advantages(&[vec![0.7], vec![0.7], vec![0.7]], 5.0).unwrap();
        assert!(a.iter().all(|r| r[0].abs() < 1e-6), "{a:?}");
    }

    #[test]
    fn non_finite_is_an_error_naming_member_and_reward() {
        let e = group_advantages(&[vec![0.1, 0.2], vec![0.3, f64::NAN], vec![0.0, 0.0]], 5.0)
            .unwrap_err();
        assert!(matches!(e, AdvantageError::NonFinite { member: 1, reward: 1, .. }));
        assert!(e.to_string().contains("reward 1 of group member 1"));
        let e = group_advantages(&[vec![f64::INFINITY], vec![0.0]], 5.0).unwrap_err();
        assert!(matches!(e, AdvantageError::NonFinite { member: 0, reward: 0, .. }));
    }

    #[test]
    fn shape_errors() {
        assert_eq!(group_advantages(&[vec![1.0]], 5.0), Err(AdvantageError::GroupTooSmall(1)));
        assert!(matches!(
            group_advantages(&[vec![1.0, 2.0], vec![1.0]], 5.0),
            Err(AdvantageError::RewardCount { member: 1, found: 1, expected: 2 })
        ));
        assert!(matches!(
            group_advantages(&[vec![1.0], vec![2.0]], 0.0),
            Err(AdvantageError::BadClip(_))
        ));
    }
}
