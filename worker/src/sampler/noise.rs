//! Sampler noise drawn on the host from counter-keyed ChaCha streams, so a trajectory is the
//! same on CPU, CUDA and NPU and can be reproduced from (seed, prompt, member) alone — the
//! device's own RNG would tie it to the device and to the order of earlier draws.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tch::{Kind, Tensor};

use super::Result;

/// Identifies one trajectory's noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseKey {
    /// The job's sampler seed.
    pub seed: u64,
    /// The prompt's index (its group).
    pub prompt: u64,
    /// The member of the group.
    pub member: u64,
}

/// Stream purpose: the initial latent, shared by a group under `init_same_noise`.
const GROUP_INIT: u64 = u64::MAX;

fn rng(seed: u64, a: u64, b: u64, purpose: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (i, w) in [seed, a, b, purpose].into_iter().enumerate() {
        key[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

fn normal(mut r: ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect()
}

impl NoiseKey {
    /// The initial packed latent `[tokens, channels]`: one draw per group when `same_for_group`
    /// (the reference's `--init_same_noise`), else per member. Values are rounded through bf16,
    /// as the reference draws this noise in bf16.
    pub fn initial(&self, tokens: i64, channels: i64, same_for_group: bool) -> Result<Tensor> {
        let member = if same_for_group { GROUP_INIT } else { self.member };
        let v =
            normal(rng(self.seed, self.prompt, member, GROUP_INIT), (tokens * channels) as usize);
        Ok(Tensor::from_slice(&v)
            .f_view([tokens, channels])?
            .f_to_kind(Kind::BFloat16)?
            .f_to_kind(Kind::Float)?)
    }

    /// The standard normal noise of transition `step`, `[tokens, channels]` f32.
    pub fn step(&self, step: usize, tokens: i64, channels: i64) -> Result<Tensor> {
        let v = normal(
            rng(self.seed, self.prompt, self.member, step as u64),
            (tokens * channels) as usize,
        );
        Ok(Tensor::from_slice(&v).f_view([tokens, channels])?)
    }
}
