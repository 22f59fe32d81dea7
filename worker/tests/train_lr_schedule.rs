//! The optimizer under a learning-rate schedule: each step runs at diffusers'
//! `get_scheduler` learning rate as torch's AdamW does (golden from
//! `tests/golden/lr_schedule/make_goldens.py`), and a save → load → continue runs at the same
//! learning rates, bit for bit, as an uninterrupted run.

mod numerics;

use numerics::max_ulp;

use std::collections::BTreeMap;
use std::path::PathBuf;

use dancegrpo_proto::JobConfig;
use dancegrpo_proto::config::LrScheduler;
use dancegrpo_worker::flux::weights::SafetensorsFile;
use dancegrpo_worker::train::optim::{AdamW, AdamWConfig, LrSchedule};
use tch::{Kind, Tensor};

fn golden() -> BTreeMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden/lr_schedule/adamw_schedule.safetensors");
    SafetensorsFile::open(path).unwrap().read_all().unwrap()
}

/// Gives `grad` to the parameter through autograd (∂Σ(p⊙g)/∂p = g exactly).
fn backward(opt: &AdamW, grad: &Tensor) {
    let (_, p) = &opt.params()[0];
    (p * grad).sum(Kind::Float).backward();
}

/// Eight steps of cosine with two warmup steps: the first runs at lr 0 (the weights only keep
/// their value), and every parameter stays within the optimizer's per-step error model of
/// torch (`train_optim.rs`: 2 ulp per step; identical on the golden's machine). A wrong
/// learning rate moves a parameter by ~lr·1 = 1e-2, about 1e5 ulp.
#[test]
fn each_step_runs_at_the_schedules_learning_rate_as_in_torch() {
    let g = golden();
    let c: Vec<f64> = Vec::try_from(&g["cfg"]).unwrap();
    let cfg = AdamWConfig { lr: c[0], beta1: c[1], beta2: c[2], eps: c[3], weight_decay: c[4] };
    let schedule = LrSchedule {
        base_lr: c[0],
        scheduler: LrScheduler::Cosine,
        warmup_steps: c[5] as u64,
        training_steps: c[6] as u64,
    };
    let p = g["init"].copy().set_requires_grad(true);
    let mut opt = AdamW::new(vec![("p".into(), p)], cfg).unwrap().with_schedule(schedule);
    assert_eq!(opt.lr(), 0.0, "warmup starts at 0");
    for s in 1..=schedule.training_steps as usize {
        opt.zero_grad().unwrap();
        backward(&opt, &g[&format!("grad.{s}")]);
        let lr = opt.lr();
        assert_eq!(lr, schedule.lr(s as u64 - 1));
        opt.step().unwrap();
        assert_eq!(opt.config().lr, lr, "the step ran at the learning rate it announced");
        let ulp = max_ulp(&opt.params()[0].1, &g[&format!("param.{s}")]);
        assert!(ulp <= 2 * s as i64, "step {s} (lr {lr:e}): {ulp} ulp from torch");
        if s == 1 {
            assert!(opt.params()[0].1.equal(&g["init"]), "lr 0 leaves the weights");
        }
    }
    assert_eq!(opt.lr(), 0.0, "cosine ends at 0");
}

/// Two parameters made from `seed` without libtorch's global generator, which the tests of
/// this binary, running in parallel, would otherwise draw from in an order of the scheduler's.
fn params(seed: i64) -> Vec<(String, Tensor)> {
    ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), wave(seed * 2 + i as i64)))
        .map(|(n, t)| (n, t.set_requires_grad(true)))
        .collect()
}

/// A [3, 4] tensor of values in [-1, 1], a function of `k` only.
fn wave(k: i64) -> Tensor {
    (Tensor::arange(12, (Kind::Float, tch::Device::Cpu)) * (0.37 + 0.11 * k as f64) + k as f64)
        .sin()
        .reshape([3, 4])
}

/// Runs optimizer steps `from..to` (0-based) with gradients keyed by the step; returns the
/// learning rate of each.
fn run(opt: &mut AdamW, from: u64, to: u64) -> Vec<f64> {
    let mut lrs = Vec::new();
    for s in from..to {
        opt.zero_grad().unwrap();
        let terms: Vec<Tensor> = opt
            .params()
            .iter()
            .enumerate()
            .map(|(i, (_, p))| (p * wave(1000 + 2 * s as i64 + i as i64)).sum(Kind::Float))
            .collect();
        Tensor::stack(&terms, 0).sum(Kind::Float).backward();
        lrs.push(opt.lr());
        opt.step().unwrap();
    }
    lrs
}

/// A job of 4 iterations x 12 trajectories / 4 = 12 optimizer steps, cosine after 3 warmup
/// steps: stopped after 5 steps, saved and loaded into a fresh optimizer, it continues at step
/// 5's learning rate, and its learning rates and weights equal the uninterrupted run's.
#[test]
fn a_resumed_optimizer_continues_the_schedule_exactly() {
    let job = JobConfig {
        lr_scheduler: LrScheduler::Cosine,
        lr_warmup_steps: 3,
        max_train_steps: 4,
        learning_rate: 1e-3,
        ..JobConfig::default()
    };
    job.validate().unwrap();
    let schedule = LrSchedule::of(&job);
    assert_eq!(schedule.training_steps, 12);
    let cfg = AdamWConfig { lr: job.learning_rate, ..AdamWConfig::default() };
    let optimizer = |p| AdamW::new(p, cfg).unwrap().with_schedule(schedule);

    let mut straight = optimizer(params(7));
    let lrs = run(&mut straight, 0, 12);
    let want: Vec<f64> = (0..12).map(|s| job.lr_at(s)).collect();
    assert_eq!(lrs, want, "the optimizer runs at the job's schedule");
    assert!(lrs[0] == 0.0 && lrs[3] == 1e-3 && lrs[11] < 1e-4, "{lrs:?}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let mut first = optimizer(params(7));
    let mut resumed_lrs = run(&mut first, 0, 5);
    first.save(&path).unwrap();
    // The weights as a checkpoint would restore them.
    let weights: Vec<(String, Tensor)> = first
        .params()
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true)))
        .collect();
    let mut second = optimizer(weights);
    assert_eq!(second.lr(), 0.0, "a fresh optimizer would start the warmup again");
    second.load(&path).unwrap();
    assert_eq!(second.steps_taken(), 5);
    assert_eq!(second.lr().to_bits(), lrs[5].to_bits());
    resumed_lrs.extend(run(&mut second, 5, 12));
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed_lrs), bits(&lrs), "the resumed run's learning rates");
    for ((n, a), (_, b)) in straight.params().iter().zip(second.params()) {
        assert!(a.equal(b), "{n} differs after the resume");
    }
}

/// Without a schedule the optimizer keeps the learning rate it was given (and `set_lr`).
#[test]
fn without_a_schedule_the_learning_rate_is_the_configured_one() {
    let mut opt = AdamW::new(params(3), AdamWConfig::default()).unwrap();
    assert_eq!(run(&mut opt, 0, 2), [1e-5, 1e-5]);
    opt.set_lr(2e-5);
    assert_eq!(run(&mut opt, 2, 3), [2e-5]);
}
