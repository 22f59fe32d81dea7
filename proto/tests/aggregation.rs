//! The reward aggregation (`multi_reward_mix`) and MixGRPO's trimmed group statistics against
//! a re-implementation of MixGRPO's formulas in torch (`tests/golden/aggregation/
//! make_goldens.py`): float64 to 1e-12, and within the float32 rounding of the reference's
//! tensors (1e-5; 5e-4 where the trim leaves two members, whose std is a single difference).

use std::path::PathBuf;

use dancegrpo_proto::advantage::{AdvantageError, Aggregation, trim_count};
use dancegrpo_proto::config::MultiRewardMix;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    mix: MultiRewardMix,
    trimmed_ratio: f64,
    use_group: bool,
    num_generations: usize,
    adv_clip_max: f64,
    weights: Vec<f64>,
    rewards: Vec<Vec<f64>>,
    f64: Vec<Vec<f64>>,
    f32: Vec<Vec<f64>>,
}

fn cases() -> Vec<Case> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/aggregation/goldens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    #[derive(Deserialize)]
    struct File {
        cases: Vec<Case>,
    }
    serde_json::from_str::<File>(&text).unwrap().cases
}

fn ours(c: &Case) -> Vec<Vec<f64>> {
    let agg = Aggregation {
        mix: c.mix,
        weights: c.weights.clone(),
        trimmed_ratio: c.trimmed_ratio,
        adv_clip_max: c.adv_clip_max,
    };
    if !c.use_group {
        return agg.global(&c.rewards).unwrap();
    }
    c.rewards.chunks(c.num_generations).flat_map(|g| agg.group(g).unwrap()).collect()
}

fn describe(c: &Case) -> String {
    format!(
        "{:?} trimmed_ratio {} use_group {} G {} clip {}",
        c.mix, c.trimmed_ratio, c.use_group, c.num_generations, c.adv_clip_max
    )
}

#[test]
fn aggregation_matches_mixgrpo_formulas() {
    let cases = cases();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    for c in &cases {
        let got = ours(c);
        let what = describe(c);
        assert_eq!(got.len(), c.f64.len(), "{what}");
        let kept = c.num_generations - trim_count(c.num_generations, c.trimmed_ratio);
        let tol32 = if kept <= 2 { 5e-4 } else { 1e-5 };
        for (m, (g, (w64, w32))) in got.iter().zip(c.f64.iter().zip(&c.f32)).enumerate() {
            assert_eq!(g.len(), w64.len(), "{what}: member {m}");
            for ((x, y), z) in g.iter().zip(w64).zip(w32) {
                assert!(
                    (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                    "{what}: member {m}: {x} vs {y}"
                );
                // The reference's float32: rounding of the rewards and of its sums.
                assert!(
                    (x - z).abs() <= tol32 * z.abs().max(1.0),
                    "{what}: member {m}: {x} vs {z}"
                );
            }
        }
    }
}

#[test]
fn the_goldens_tell_the_settings_apart() {
    // Each setting changes the advantages, so the comparison above checks each of them.
    let cases = cases();
    let find = |mix: MultiRewardMix, ratio: f64, clip: f64| {
        cases
            .iter()
            .find(|c| {
                c.mix == mix
                    && c.trimmed_ratio == ratio
                    && c.adv_clip_max == clip
                    && c.use_group
                    && c.num_generations == 12
            })
            .unwrap()
    };
    let adv = find(MultiRewardMix::AdvantageAggr, 0.0, 5.0);
    let rew = find(MultiRewardMix::RewardAggr, 0.0, 5.0);
    let trimmed = find(MultiRewardMix::RewardAggr, 0.25, 5.0);
    let clamped = find(MultiRewardMix::RewardAggr, 0.25, 1.2);
    assert_eq!((adv.f64[0].len(), rew.f64[0].len()), (2, 1), "K advantages vs one");
    let differs =
        |a: &Case, b: &Case| a.f64.iter().zip(&b.f64).any(|(x, y)| (x[0] - y[0]).abs() > 1e-3);
    assert!(differs(adv, rew), "reward_aggr is not the first reward's advantage");
    assert!(differs(rew, trimmed), "trimming changes the statistics");
    assert!(differs(trimmed, clamped), "the clamp is active");
    assert!(clamped.f64.iter().any(|a| a[0] == -1.2), "the low outlier is clamped");
}

#[test]
fn untrimmed_advantage_aggr_is_the_per_reward_advantage_of_before() {
    // Bit for bit: the default path must leave existing runs unchanged.
    let r: Vec<Vec<f64>> =
        [0.31, 0.29, 0.35, 0.30, 0.27, 0.33].iter().map(|&x| vec![x, 20.0 + 10.0 * x]).collect();
    let agg = Aggregation {
        mix: MultiRewardMix::AdvantageAggr,
        weights: vec![0.7, 1.4],
        trimmed_ratio: 0.0,
        adv_clip_max: 5.0,
    };
    let want = dancegrpo_proto::advantage::group_advantages(&r, 5.0).unwrap();
    assert_eq!(agg.group(&r).unwrap(), want);
    assert_eq!(agg.global(&r).unwrap(), want);
}

#[test]
fn a_trim_that_leaves_one_member_is_an_error() {
    let agg = Aggregation {
        mix: MultiRewardMix::RewardAggr,
        weights: vec![1.0],
        trimmed_ratio: 0.75,
        adv_clip_max: 5.0,
    };
    let r = vec![vec![0.1], vec![0.2], vec![0.3], vec![0.4]];
    let e = agg.group(&r).unwrap_err();
    assert_eq!(e, AdvantageError::TrimmedTooFar { ratio: 0.75, members: 4, left: 1 });
    assert!(e.to_string().contains("trimmed_ratio 0.75 leaves 1 of a group of 4"), "{e}");
    let bad = Aggregation { weights: vec![0.0], trimmed_ratio: 0.0, ..agg };
    assert!(matches!(bad.group(&r), Err(AdvantageError::Weights(_))));
}
