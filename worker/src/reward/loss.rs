//! The GRPO PPO-clip loss with several rewards: one clipped loss per reward, all with the same
//! importance ratio, summed with the configured weights (the pattern of DanceGRPO's
//! `train_grpo_hunyuan.py` for HPS + CLIP; ALGORITHM.md §3.3 and §5).
//!
//! Per reward k: `L_k = mean(max(−A_k·r, −A_k·clip(r, 1−ε, 1+ε)))` with `A_k` clamped to
//! `±adv_clip_max`; total `Σ_k w_k·L_k`. The caller divides by
//! `gradient_accumulation_steps · train_timesteps` as the reference does.

use tch::{Kind, Tensor};

use super::RewardError;

/// The loss settings.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiRewardClipLoss {
    /// PPO clip range ε (reference: 1e-4).
    pub clip_range: f64,
    /// Advantage clamp (reference: 5).
    pub adv_clip_max: f64,
    /// One weight per reward, in config order.
    pub weights: Vec<f64>,
}

/// The loss and its parts.
#[derive(Debug)]
pub struct LossOutput {
    /// `Σ_k w_k·L_k` (a scalar with grad when the log-probs have it).
    pub total: Tensor,
    /// Each reward's unweighted `L_k`, for logging.
    pub per_reward: Vec<f64>,
    /// Mean importance ratio, for the "ratio is exactly 1 on-policy" check.
    pub mean_ratio: f64,
}

impl MultiRewardClipLoss {
    /// Computes the loss for `log_prob_new` (grad), `log_prob_old` (no grad), both of shape
    /// `[B]` (or any shape S), and `advantages` `[B, K]` (or S × K), K = number of rewards.
    pub fn compute(
        &self,
        log_prob_new: &Tensor,
        log_prob_old: &Tensor,
        advantages: &Tensor,
    ) -> Result<LossOutput, RewardError> {
        let k = self.weights.len() as i64;
        let shape = log_prob_new.size();
        if log_prob_old.size() != shape {
            return Err(RewardError::Input(format!(
                "log-prob shapes differ: new {shape:?}, old {:?}",
                log_prob_old.size()
            )));
        }
        let mut want = shape.clone();
        want.push(k);
        if advantages.size() != want {
            return Err(RewardError::Input(format!(
                "advantages must be {want:?} ({k} rewards), got {:?}",
                advantages.size()
            )));
        }
        let ratio = log_prob_new.f_sub(&log_prob_old.f_to_kind(log_prob_new.kind())?)?.f_exp()?;
        let clipped = ratio.f_clamp(1.0 - self.clip_range, 1.0 + self.clip_range)?;
        let adv = advantages
            .f_to_kind(log_prob_new.kind())?
            .f_to_device(log_prob_new.device())?
            .f_clamp(-self.adv_clip_max, self.adv_clip_max)?;
        let mut total: Option<Tensor> = None;
        let mut per_reward = Vec::with_capacity(self.weights.len());
        for (i, w) in self.weights.iter().enumerate() {
            let a = adv.f_select(-1, i as i64)?;
            let unclipped = a.f_neg()?.f_mul(&ratio)?;
            let clip = a.f_neg()?.f_mul(&clipped)?;
            let l = unclipped.f_maximum(&clip)?.f_mean(log_prob_new.kind())?;
            per_reward.push(l.f_double_value(&[])?);
            let term = l.f_mul_scalar(*w)?;
            total = Some(match total {
                None => term,
                Some(t) => t.f_add(&term)?,
            });
        }
        let total = total.ok_or_else(|| RewardError::Input("no reward weights".into()))?;
        let mean_ratio = ratio.f_mean(Kind::Double)?.f_double_value(&[])?;
        Ok(LossOutput { total, per_reward, mean_ratio })
    }
}
