//! The weighted multi-reward PPO-clip loss against the reference formula, worked by hand.

use dancegrpo_worker::reward::loss::MultiRewardClipLoss;
use tch::{Device, Kind, Tensor};

fn t(v: &[f64]) -> Tensor {
    Tensor::from_slice(v).to_kind(Kind::Double)
}

fn loss(weights: &[f64]) -> MultiRewardClipLoss {
    MultiRewardClipLoss { clip_range: 0.2, adv_clip_max: 5.0, weights: weights.to_vec() }
}

/// The reference formula for one reward, in plain f64.
fn reference(ratio: &[f64], adv: &[f64], eps: f64, amax: f64) -> f64 {
    let n = ratio.len() as f64;
    ratio
        .iter()
        .zip(adv)
        .map(|(r, a)| {
            let a = a.clamp(-amax, amax);
            (-a * r).max(-a * r.clamp(1.0 - eps, 1.0 + eps))
        })
        .sum::<f64>()
        / n
}

#[test]
fn weighted_sum_of_per_reward_clipped_losses() {
    let old = t(&[0.0, 0.0, 0.0, 0.0]);
    // Ratios e^x: 1.5 (clipped above), 0.5 (clipped below), 1.1 and 1.0 (inside).
    let ratios = [1.5f64, 0.5, 1.1, 1.0];
    let new = t(&ratios.map(f64::ln));
    let a1 = [1.0, -2.0, 0.5, 7.0]; // 7 is clamped to 5
    let a2 = [-1.0, 1.0, -0.3, 0.0];
    let adv = Tensor::stack(&[t(&a1), t(&a2)], 1);
    let out = loss(&[0.7, 1.4]).compute(&new, &old, &adv).unwrap();
    let l1 = reference(&ratios, &a1, 0.2, 5.0);
    let l2 = reference(&ratios, &a2, 0.2, 5.0);
    assert!((out.per_reward[0] - l1).abs() < 1e-12 && (out.per_reward[1] - l2).abs() < 1e-12);
    assert!((out.total.double_value(&[]) - (0.7 * l1 + 1.4 * l2)).abs() < 1e-12);
    // Worked by hand for reward 1: max(-1.5, -1.2) = -1.2; max(1.0, 1.6) = 1.6;
    // max(-0.55, -0.55) = -0.55; max(-5, -5) = -5  → mean = -5.15 / 4.
    assert!((l1 - (-5.15 / 4.0)).abs() < 1e-12);
}

#[test]
fn on_policy_ratio_is_one_and_gradient_is_minus_weighted_advantage() {
    let old = t(&[-1.3, 0.2, 4.0]);
    let new = old.detach().copy().set_requires_grad(true);
    let adv = Tensor::stack(&[t(&[1.0, -1.0, 0.5]), t(&[0.0, 2.0, -2.0])], 1);
    let out = loss(&[0.5, 2.0]).compute(&new, &old, &adv).unwrap();
    assert_eq!(out.mean_ratio, 1.0);
    out.total.backward();
    // d/dlogp of -A·r at r = 1 is -A (the unclipped branch is active), averaged over 3.
    let g = Vec::<f64>::try_from(&new.grad()).unwrap();
    let (a1, a2) = ([1.0, -1.0, 0.5], [0.0, 2.0, -2.0]);
    let want: Vec<f64> = (0..3).map(|i| -(0.5 * a1[i] + 2.0 * a2[i]) / 3.0).collect();
    for (x, w) in g.iter().zip(want) {
        assert!((x - w).abs() < 1e-12, "{g:?}");
    }
}

#[test]
fn clipped_branch_has_no_gradient() {
    // Ratio 2 with a positive advantage: the clipped branch wins, so no gradient flows.
    let old = t(&[0.0]);
    let new = t(&[2f64.ln()]).set_requires_grad(true);
    let adv = t(&[1.0]).view([1, 1]);
    let out = loss(&[1.0]).compute(&new, &old, &adv).unwrap();
    out.total.backward();
    assert_eq!(new.grad().double_value(&[0]), 0.0);
}

#[test]
fn shape_errors() {
    let x = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let adv = Tensor::zeros([3, 1], (Kind::Float, Device::Cpu));
    let e = loss(&[1.0, 1.0]).compute(&x, &x, &adv).unwrap_err().to_string();
    assert!(e.contains("2 rewards"), "{e}");
    let y = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    assert!(loss(&[1.0]).compute(&x, &y, &adv).is_err());
}
