//! The learning-rate schedule against diffusers' `get_scheduler` on a real torch optimizer
//! (`tests/golden/lr_schedule/make_goldens.py`): the learning rate of every optimizer step,
//! bit for bit, past the end of the curves, and the reference's own call (1e6 steps).

use std::path::PathBuf;

use dancegrpo_proto::JobConfig;
use dancegrpo_proto::config::LrScheduler;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    scheduler: LrScheduler,
    warmup: u64,
    total: u64,
    base_lr: f64,
    lr_bits: Vec<u64>,
}

fn cases() -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden/lr_schedule/lr_schedule.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    #[derive(Deserialize)]
    struct File {
        cases: Vec<Case>,
    }
    serde_json::from_str::<File>(&text).unwrap().cases
}

#[test]
fn every_step_has_diffusers_learning_rate_bit_for_bit() {
    let cases = cases();
    assert!(cases.len() > 40, "{} cases", cases.len());
    for c in &cases {
        for (step, want) in c.lr_bits.iter().enumerate() {
            let got = c.base_lr * c.scheduler.factor(step as u64, c.warmup, c.total);
            assert_eq!(
                got.to_bits(),
                *want,
                "{:?} warmup {} total {} lr {}: step {step}: {got:e} vs {:e}",
                c.scheduler,
                c.warmup,
                c.total,
                c.base_lr,
                f64::from_bits(*want)
            );
        }
    }
}

#[test]
fn the_goldens_have_the_curves_shapes() {
    // A check of the goldens themselves, so that the comparison above can fail: warmup
    // starts at 0, cosine and linear reach 0 at the end, constant never moves.
    for c in cases() {
        let lr: Vec<f64> = c.lr_bits.iter().map(|b| f64::from_bits(*b)).collect();
        if c.warmup > 0 {
            assert_eq!(lr[0], 0.0, "{:?}", c.scheduler);
        }
        match c.scheduler {
            LrScheduler::Constant => assert!(lr.iter().all(|x| *x == c.base_lr)),
            LrScheduler::Cosine | LrScheduler::Linear if c.total < 100 => {
                assert_eq!(lr[c.total as usize], 0.0, "{:?}", c.scheduler);
                let mid = lr[(c.warmup + (c.total - c.warmup) / 2) as usize];
                assert!(mid > 0.0 && mid < c.base_lr, "{:?}: {mid}", c.scheduler);
            }
            _ => {}
        }
    }
}

#[test]
fn a_job_schedules_over_its_optimizer_steps() {
    // The launch: 300 iterations x 12 trajectories / 4 = 900 optimizer steps, constant.
    let c = JobConfig::default();
    assert_eq!(c.total_optimizer_steps(), 900);
    assert_eq!((c.lr_scheduler, c.lr_warmup_steps), (LrScheduler::ConstantWithWarmup, 0));
    assert!((0..1000).all(|s| c.lr_at(s) == c.learning_rate));
    let c = JobConfig {
        lr_scheduler: LrScheduler::Cosine,
        lr_warmup_steps: 30,
        max_train_steps: 100,
        ..JobConfig::default()
    };
    assert_eq!(c.total_optimizer_steps(), 300);
    assert_eq!(c.lr_at(0), 0.0);
    assert_eq!(c.lr_at(15), c.learning_rate * 0.5);
    assert_eq!(c.lr_at(30), c.learning_rate);
    assert_eq!(c.lr_at(300), 0.0);
}
