//! AdamW and the grad-norm clip against `torch.optim.AdamW` + `clip_grad_norm_` (golden from
//! `tests/golden/train/make_goldens.py`), and save → load → continue.

mod numerics;

use numerics::max_ulp;

use std::collections::BTreeMap;
use std::path::PathBuf;

use dancegrpo_worker::flux::ModelError;
use dancegrpo_worker::flux::weights::SafetensorsFile;
use dancegrpo_worker::train::checkpoint::CheckpointError;
use dancegrpo_worker::train::optim::{AdamW, AdamWConfig, OptimError};
use tch::{Kind, Tensor};

const NAMES: [&str; 3] = ["a", "b", "c"];

fn golden() -> BTreeMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/train/adamw.safetensors");
    SafetensorsFile::open(path).unwrap().read_all().unwrap()
}

fn config(g: &BTreeMap<String, Tensor>) -> (AdamWConfig, f64) {
    let c: Vec<f64> = Vec::try_from(&g["cfg"]).unwrap();
    let cfg = AdamWConfig { lr: c[0], beta1: c[1], beta2: c[2], eps: c[3], weight_decay: c[4] };
    (cfg, c[5])
}

fn optimizer(g: &BTreeMap<String, Tensor>) -> AdamW {
    let params = NAMES
        .iter()
        .map(|n| (n.to_string(), g[&format!("init.{n}")].copy().set_requires_grad(true)))
        .collect();
    AdamW::new(params, config(g).0).unwrap()
}

/// Gives step `s`'s golden gradients through autograd, as training would: ∂Σ(p⊙g)/∂p = g
/// exactly, accumulated onto the zeroed gradient.
fn backward(opt: &AdamW, g: &BTreeMap<String, Tensor>, s: usize) {
    let terms: Vec<Tensor> = opt
        .params()
        .iter()
        .filter_map(|(n, p)| g.get(&format!("grad.{s}.{n}")).map(|gr| (p * gr).sum(Kind::Float)))
        .collect();
    Tensor::stack(&terms, 0).sum(Kind::Float).backward();
}

// Tolerances against torch's numbers in the golden, which were computed on another machine.
// The optimizer is the same sequence of single-tensor ATen ops as `torch.optim.AdamW(foreach=
// False)`, so on one machine with one kernel set the two agree bit for bit. Across kernel sets
// (AVX2, AVX-512, ATen's portable `default`) each elementwise op is still correctly rounded
// except where a kernel fuses a multiply and an add (an FMA skips one rounding), so each op can
// differ by 1 ulp of its result. What reaches a parameter in one step: its own update
// p·(1 − lr·wd) − lr·m̂/(√v̂ + ε) rounds twice at |p| (≤ 2 ulp of p), and the m̂/√v̂ term carries
// the moments' few-ulp relative error scaled by lr/|p| ≈ 1e-2 (far below an ulp of p).
// Earlier steps' differences persist, so after step s a parameter is within 2·s ulp.
// Seen on a Xeon with AVX-512: param c is 2 ulp from the golden at step 2 idle, with one thread,
// under every ATen kernel set, and within 1 ulp only with `MKL_CBWR=COMPATIBLE`; the difference
// comes from the code path MKL picks for the CPU, not from threads or load.
/// Parameter ulps from torch allowed per step taken.
const ULP_PER_STEP: i64 = 2;
/// The moments after STEPS steps, relative: lerp/addcmul round once per step (≤ 1 u each, with
/// u = 2^-24), plus the gradients' relative error after the norm clip (NORM_REL): ≤ 6·(u +
/// NORM_REL) ≈ 3e-6.
const MOMENT_REL: f64 = 1e-5;
/// The pre-clip global norm, relative: a sum of 29 squares, the per-tensor norms summed in
/// another order by another kernel: ≤ 29·u ≈ 1.7e-6 in the worst case.
const NORM_REL: f64 = 4e-6;

/// Runs golden steps `range` on `opt`, checking the norm and the parameters after each.
fn run_steps(
    opt: &mut AdamW,
    g: &BTreeMap<String, Tensor>,
    range: std::ops::RangeInclusive<usize>,
) {
    let max_norm = config(g).1;
    for s in range {
        opt.zero_grad().unwrap();
        backward(opt, g, s);
        let norm = opt.clip_grad_norm(max_norm).unwrap();
        let want = g[&format!("norm.{s}")].double_value(&[]);
        let e = (norm - want).abs() / want;
        assert!(e <= NORM_REL, "step {s}: total grad norm {norm} vs torch {want}: relative {e}");
        opt.step().unwrap();
        for (n, p) in opt.params() {
            let ulp = max_ulp(p, &g[&format!("param.{s}.{n}")]);
            eprintln!("step {s}, param {n}: {ulp} ulp from torch");
            assert!(ulp <= ULP_PER_STEP * s as i64, "step {s}, param {n}: {ulp} ulp from torch");
        }
    }
}

/// `max |a − b| / max |b|`.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(f64::MIN_POSITIVE)
}

/// Six steps with clipping on and off, weight decay, a parameter without gradients for two
/// steps (skipped; its bias correction lags) and an all-zero gradient: the total norm and every
/// parameter and moment stay within the error model's bounds of torch (on the golden's own
/// machine: identical).
#[test]
fn adamw_and_clip_match_torch() {
    let g = golden();
    let mut opt = optimizer(&g);
    run_steps(&mut opt, &g, 1..=6);
    assert_eq!(opt.steps_taken(), 6);
    for ((n, _), s) in opt.params().iter().zip(opt.state()) {
        let e = rel(&s.exp_avg, &g[&format!("exp_avg.{n}")]);
        assert!(e <= MOMENT_REL, "exp_avg.{n}: relative {e}");
        let e = rel(&s.exp_avg_sq, &g[&format!("exp_avg_sq.{n}")]);
        assert!(e <= MOMENT_REL, "exp_avg_sq.{n}: relative {e}");
    }
    let steps: Vec<u64> = opt.state().iter().map(|s| s.step).collect();
    assert_eq!(steps, [6, 4, 6]);
}

/// Save after 3 steps, load into a fresh optimizer over the saved parameters, continue: the
/// result is bit-identical to the uninterrupted run (which itself matches torch).
#[test]
fn save_load_continue_equals_uninterrupted() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");

    let mut first = optimizer(&g);
    run_steps(&mut first, &g, 1..=3);
    first.save(&path).unwrap();

    let params: Vec<(String, Tensor)> = first
        .params()
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true)))
        .collect();
    let mut resumed = AdamW::new(params, config(&g).0).unwrap();
    resumed.load(&path).unwrap();
    assert_eq!(resumed.steps_taken(), 3);
    run_steps(&mut resumed, &g, 4..=6);

    let mut straight = optimizer(&g);
    run_steps(&mut straight, &g, 1..=6);
    for ((n, a), (_, b)) in resumed.params().iter().zip(straight.params()) {
        assert!(a.equal(b), "param {n} differs after resume");
    }
    for (a, b) in resumed.state().iter().zip(straight.state()) {
        assert!(a.exp_avg.equal(&b.exp_avg) && a.exp_avg_sq.equal(&b.exp_avg_sq));
        assert_eq!(a.step, b.step);
    }
}

/// A state file for other parameters is refused, naming the key and both shapes.
#[test]
fn load_rejects_mismatched_state() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    optimizer(&g).save(&path).unwrap();

    let p = |n: &str, shape: &[i64]| {
        (
            n.to_string(),
            Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
        )
    };
    let mut other =
        AdamW::new(vec![p("a", &[4, 3]), p("b", &[6]), p("c", &[2, 3, 2])], AdamWConfig::default())
            .unwrap();
    let err = other.load(&path).unwrap_err();
    assert!(
        matches!(err, OptimError::State(CheckpointError::Weights(ModelError::Shape { .. }))),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("exp_avg.b") && msg.contains("[6]") && msg.contains("[5]"), "{msg}");

    let mut missing =
        AdamW::new(vec![p("a", &[4, 3]), p("d", &[1])], AdamWConfig::default()).unwrap();
    let msg = missing.load(&path).unwrap_err().to_string();
    assert!(msg.contains("exp_avg.d"), "{msg}");
}

/// Only trainable f32 master weights are accepted.
#[test]
fn rejects_non_f32_params() {
    let bf16 = Tensor::zeros([2], (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true);
    let msg = AdamW::new(vec![("w".into(), bf16)], AdamWConfig::default()).unwrap_err().to_string();
    assert!(msg.contains('w') && msg.contains("BFloat16"), "{msg}");
}

/// `grads()` hands out the gradients themselves (allocating zeros where none exist), so an
/// in-place all-reduce on them is what clip and step see.
#[test]
fn grads_alias_the_parameter_gradients() {
    let p = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let opt = AdamW::new(vec![("p".into(), p.shallow_clone())], AdamWConfig::default()).unwrap();
    let mut grads = opt.grads().unwrap();
    assert!(grads[0].equal(&Tensor::zeros([3], (Kind::Float, tch::Device::Cpu))));
    let _ = tch::no_grad(|| grads[0].fill_(2.0));
    assert!(p.grad().equal(&Tensor::full([3], 2.0, (Kind::Float, tch::Device::Cpu))));
}
