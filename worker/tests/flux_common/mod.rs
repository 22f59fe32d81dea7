//! Helpers shared by the FLUX/VAE/sampler golden tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use dancegrpo_worker::flux::weights::SafetensorsFile;
use tch::{Kind, Tensor};

// Tolerances of ours against diffusers (or the reference formulas) on the tiny goldens, from an
// error model, so they hold on any CPU and kernel set, not only on the machine that made the
// goldens. u = 2^-24 ≈ 6e-8 is f32's unit roundoff, 2^-8 ≈ 3.9e-3 bf16's. Our code and
// diffusers reach the same values through different op sequences and, on another machine or
// kernel set (`ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS`), through other BLAS and vector
// kernels, so the roundings differ; `make test` reruns these tests under other kernel sets and
// under load (deploy/numeric-passes.sh) to hold the bounds to that.

/// One f32 forward of the tiny transformer or VAE, `max |Δ| / max |ref|`. The tiny FLUX (2
/// heads × 16, 2 double + 2 single blocks) runs L ≈ 40 rounding stages in sequence whose longest
/// dot product is K = 128 (the MLP): independent roundings give √(L·K)·u ≈ 4.3e-6, the worst case
/// L·K·u ≈ 3e-4. The bound is ~20× the first (observed ≤ 1e-6).
pub const F32_FORWARD_REL: f64 = 1e-4;
/// The same in bf16 compute: every stage's output is stored in bf16 (matmuls accumulate in f32),
/// and the norms at every block rescale away what came before, so the last few blocks' ≈ 5
/// roundings dominate: √5·2^-8 ≈ 9e-3 (observed ≈ 5e-3).
pub const BF16_FORWARD_REL: f64 = 2e-2;
/// One SDE step (mean, next latent, x0, log-prob) from given v and x: about ten elementwise f32
/// ops, each within 1 ulp of its result whatever the kernel (an FMA skips a rounding), so
/// ≤ 10·u ≈ 6e-7 relative to the largest element.
pub const SDE_STEP_REL: f64 = 1e-6;

/// `tests/golden/flux` at the repository root.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/flux")
}

/// Every tensor of a golden file.
pub fn golden(name: &str) -> BTreeMap<String, Tensor> {
    SafetensorsFile::open(golden_dir().join(name)).unwrap().read_all().unwrap()
}

/// `max |a − b| / max |b|`, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - &b).abs().max().double_value(&[]) / scale
}

/// `max |a − b|`, in f64.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// `N(0, std²)` values of `shape` from a ChaCha stream of the caller's own seed.
///
/// Tests use this instead of libtorch's global generator (`tch::manual_seed` + `randn`): the
/// tests of a binary run on parallel threads, so another test reseeding or drawing from the
/// global generator in between would change the instance with the scheduling, i.e. with the
/// machine's load.
pub fn seeded_normal(seed: u64, shape: &[i64], std: f32) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0f32, std).expect("a finite std");
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_slice(&v).view(shape)
}
