//! Group-relative advantages, one per reward (ALGORITHM.md §4; DESIGN.md step 3):
//! `A = (r − mean(r)) / (std(r) + 1e-8)` over the G members of a prompt group, with the
//! unbiased std (divides by G − 1) and the epsilon outside the square root, then clamped to
//! `±adv_clip_max`. With several rewards each gets its own normalisation (the HPS + CLIP
//! pattern of the reference), and the loss weights them later.
//!
//! Non-finite rewards are checked before anything else: one NaN would otherwise turn every
//! advantage of its group into NaN and silently poison the update.
//!
//! Arithmetic is f64 (the reference uses f32 tensors); the difference is below f32 rounding.

/// Added to the std, outside the square root, as the reference does.
pub const STD_EPS: f64 = 1e-8;

/// The largest reward magnitude taken. No reward model scores near it, and beyond it the sums
/// and squares of a group's statistics would overflow to an infinite mean or a NaN advantage.
pub const MAX_ABS_REWARD: f64 = 1e12;

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
}

/// Advantages of one prompt group.
///
/// `rewards[m][k]` is reward k of member m (the layout of `TrajectoryReward.rewards`); the
/// result has the same layout (`TrajectoryAdvantage.advantages`).
pub fn group_advantages(
    rewards: &[Vec<f64>],
    adv_clip_max: f64,
) -> Result<Vec<Vec<f64>>, AdvantageError> {
    if !(adv_clip_max.is_finite() && adv_clip_max > 0.0) {
        return Err(AdvantageError::BadClip(adv_clip_max));
    }
    let g = rewards.len();
    let k = rewards.first().map_or(0, Vec::len);
    for (member, row) in rewards.iter().enumerate() {
        if row.len() != k {
            return Err(AdvantageError::RewardCount { member, found: row.len(), expected: k });
        }
        if let Some((reward, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(AdvantageError::NonFinite { member, reward, value });
        }
    }
    if g < 2 {
        return Err(AdvantageError::GroupTooSmall(g));
    }
    let mut out = vec![vec![0.0; k]; g];
    for j in 0..k {
        let mean = rewards.iter().map(|r| r[j]).sum::<f64>() / g as f64;
        let var = rewards.iter().map(|r| (r[j] - mean).powi(2)).sum::<f64>() / (g - 1) as f64;
        let denom = var.sqrt() + STD_EPS;
        for (o, r) in out.iter_mut().zip(rewards) {
            o[j] = ((r[j] - mean) / denom).clamp(-adv_clip_max, adv_clip_max);
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
