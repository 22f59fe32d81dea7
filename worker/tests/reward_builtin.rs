//! The weight-free rewards, the registry, several rewards at once, and bad input.

mod numerics;

use dancegrpo_proto::RewardConfig;
use dancegrpo_proto::advantage::{AdvantageError, group_advantages};
use dancegrpo_worker::reward::jpeg::{JpegReward, jpeg_size};
use dancegrpo_worker::reward::stats::StatReward;
use dancegrpo_worker::reward::{Reward, RewardError, RewardSet, build_reward};
use tch::{Device, Kind, Tensor};

fn prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("prompt {i}")).collect()
}

/// Image 0: flat grey; image 1: uniform noise (seeded), both 64x48.
fn flat_and_noise() -> Tensor {
    tch::manual_seed(7);
    let flat = Tensor::full([64, 48, 3], 128, (Kind::Uint8, Device::Cpu));
    let noise = Tensor::randint(256, [64, 48, 3], (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8);
    Tensor::stack(&[flat, noise], 0)
}

#[test]
fn jpeg_compressibility_prefers_flat_images_and_is_deterministic() {
    let imgs = flat_and_noise();
    let mut c = JpegReward::compressibility();
    let mut inc = JpegReward::incompressibility();
    let a = c.score(&imgs, &prompts(2)).unwrap();
    // Noise does not compress: several kB; a flat image is a few hundred bytes.
    assert!(a[0] > a[1], "{a:?}");
    assert!(a[0] > -1.0 && a[1] < -3.0, "{a:?}");
    assert_eq!(a, c.score(&imgs, &prompts(2)).unwrap(), "same image, same size");
    let b = inc.score(&imgs, &prompts(2)).unwrap();
    assert_eq!(b, vec![-a[0], -a[1]]);
    // The score is -bytes/1000 of a quality-95 encoding.
    let bytes = Vec::<u8>::try_from(&imgs.get(1).flatten(0, -1)).unwrap();
    assert_eq!(a[1], -(jpeg_size(&bytes, 48, 64, 95).unwrap() as f64) / 1000.0);
    // The encoder's output is a JPEG at all (SOI marker) and stays the same across releases
    // of the crate only if pinned: the flat image's exact size guards against silent drift.
    assert_eq!(jpeg_size(&[128u8; 48 * 64 * 3], 48, 64, 95).unwrap() as f64 / -1000.0, a[0]);
}

#[test]
fn brightness_and_contrast_statistics() {
    let black = Tensor::zeros([4, 4, 3], (Kind::Uint8, Device::Cpu));
    let white = Tensor::full([4, 4, 3], 255, (Kind::Uint8, Device::Cpu));
    let half = Tensor::cat(&[black.narrow(0, 0, 2), white.narrow(0, 0, 2)], 0);
    let red = Tensor::zeros([4, 4, 3], (Kind::Uint8, Device::Cpu));
    let _ = red.narrow(2, 0, 1).fill_(255);
    let imgs = Tensor::stack(&[black, white, half, red], 0);
    let b = StatReward::brightness().score(&imgs, &prompts(4)).unwrap();
    let want = [0.0, 1.0, 0.5, 0.299];
    for (x, w) in b.iter().zip(want) {
        assert!((x - w).abs() < 1e-12, "{b:?}");
    }
    let c = StatReward::contrast().score(&imgs, &prompts(4)).unwrap();
    let want = [0.0, 0.0, 0.5, 0.0];
    for (x, w) in c.iter().zip(want) {
        assert!((x - w).abs() < 1e-12, "{c:?}");
    }
}

#[test]
fn registry_builds_by_name_and_rejects_unknown_names() {
    let cfg = |name: &str| RewardConfig {
        name: name.into(),
        weight: 1.0,
        model_dir: String::new(),
        on_cpu: false,
    };
    for n in ["jpeg_compressibility", "jpeg_incompressibility", "brightness", "contrast"] {
        assert_eq!(build_reward(&cfg(n), Device::Cpu).unwrap().name(), n);
    }
    let e = build_reward(&cfg("aesthetic"), Device::Cpu).unwrap_err();
    assert!(matches!(&e, RewardError::UnknownReward { name, .. } if name == "aesthetic"));
    assert!(e.to_string().contains("jpeg_compressibility"), "{e}");
    // HPS with a directory that does not exist: a clear error, not a panic.
    let mut h = cfg("hpsv2");
    h.model_dir = "/nonexistent/hps_ckpt".into();
    let e = build_reward(&h, Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/hps_ckpt"), "{e}");
}

#[test]
fn several_rewards_give_one_vector_per_trajectory_in_config_order() {
    let cfgs: Vec<RewardConfig> = [("brightness", 0.7), ("jpeg_compressibility", 1.4)]
        .iter()
        .map(|(n, w)| RewardConfig {
            name: (*n).into(),
            weight: *w,
            model_dir: String::new(),
            on_cpu: true,
        })
        .collect();
    let mut set = RewardSet::from_config(&cfgs, Device::Cpu).unwrap();
    assert_eq!(set.weights(), &[0.7, 1.4]);
    let imgs = flat_and_noise();
    let out = set.score(&imgs, &prompts(2)).unwrap();
    let b = StatReward::brightness().score(&imgs, &prompts(2)).unwrap();
    let j = JpegReward::compressibility().score(&imgs, &prompts(2)).unwrap();
    assert_eq!(out, vec![vec![b[0], j[0]], vec![b[1], j[1]]]);
}

/// A reward that returns NaN for its second image, like a model that overflowed.
#[derive(Debug)]
struct NanReward;
impl Reward for NanReward {
    fn name(&self) -> &str {
        "nan"
    }
    fn score(&mut self, _: &Tensor, p: &[String]) -> Result<Vec<f64>, RewardError> {
        Ok((0..p.len()).map(|i| if i == 1 { f64::NAN } else { i as f64 }).collect())
    }
}

#[test]
fn nan_scores_are_reported_as_such_and_stopped_by_the_advantage_guard() {
    let mut set = RewardSet::new(
        vec![Box::new(StatReward::brightness()), Box::new(NanReward)],
        vec![1.0, 1.0],
    )
    .unwrap();
    let imgs = Tensor::cat(&[flat_and_noise(), flat_and_noise()], 0);
    let out = set.score(&imgs, &prompts(4)).unwrap();
    assert!(out[1][1].is_nan(), "NaN passes through untouched: {out:?}");
    let e = group_advantages(&out, 5.0).unwrap_err();
    assert!(matches!(e, AdvantageError::NonFinite { member: 1, reward: 1, .. }), "{e}");
}

#[test]
fn bad_input_is_an_error() {
    let mut r = StatReward::brightness();
    let empty = Tensor::zeros([1, 0, 5, 3], (Kind::Uint8, Device::Cpu));
    assert!(r.score(&empty, &prompts(1)).unwrap_err().to_string().contains("no pixels"));
    let imgs = flat_and_noise();
    assert!(
        r.score(&imgs, &prompts(3)).unwrap_err().to_string().contains("2 images but 3 prompts")
    );
    let float = Tensor::zeros([1, 4, 4, 3], (Kind::Float, Device::Cpu));
    assert!(r.score(&float, &prompts(1)).unwrap_err().to_string().contains("uint8"));
    let mut j = JpegReward::compressibility();
    assert!(j.score(&empty, &prompts(1)).is_err());
}
