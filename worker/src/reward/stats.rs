//! Image statistics as rewards: no weights, cheap, deterministic; for the demo and tests.

use tch::{Kind, Tensor};

use super::{Reward, RewardError, check_batch};

/// Name of the mean-luma reward.
pub const BRIGHTNESS: &str = "brightness";
/// Name of the luma-standard-deviation reward.
pub const CONTRAST: &str = "contrast";

/// Which statistic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stat {
    Brightness,
    Contrast,
}

/// A per-image statistic of the BT.601 luma `0.299 R + 0.587 G + 0.114 B`, on a 0..1 scale:
/// its mean (`brightness`) or its population standard deviation (`contrast`).
#[derive(Debug)]
pub struct StatReward {
    stat: Stat,
}

impl StatReward {
    /// Mean luma in [0, 1].
    pub fn brightness() -> Self {
        Self { stat: Stat::Brightness }
    }

    /// Standard deviation of luma in [0, 0.5].
    pub fn contrast() -> Self {
        Self { stat: Stat::Contrast }
    }
}

impl Reward for StatReward {
    fn name(&self) -> &str {
        match self.stat {
            Stat::Brightness => BRIGHTNESS,
            Stat::Contrast => CONTRAST,
        }
    }

    fn score(&mut self, images: &Tensor, prompts: &[String]) -> Result<Vec<f64>, RewardError> {
        let n = check_batch(images, prompts)?;
        // f64 so the statistic of a large image does not depend on summation order much.
        let x = images.f_to_kind(Kind::Double)?.f_div_scalar(255.0)?;
        let w = Tensor::f_from_slice(&[0.299f64, 0.587, 0.114])?.f_to(x.device())?;
        let luma = x.f_matmul(&w)?.f_reshape([n as i64, -1])?;
        let s = match self.stat {
            Stat::Brightness => luma.f_mean_dim(-1, false, Kind::Double)?,
            Stat::Contrast => luma.f_std_correction(-1, 0, false)?,
        };
        Ok(Vec::<f64>::try_from(&s.f_to_device(tch::Device::Cpu)?)?)
    }
}
