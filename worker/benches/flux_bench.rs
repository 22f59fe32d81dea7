//! FLUX transformer benchmark, ours vs diffusers side by side in one run (CPU, f32).
//!
//! ```text
//! cargo bench -p dancegrpo-worker --bench flux_bench
//! BENCH_THREADS=2 BENCH_ITERS=3 cargo bench -p dancegrpo-worker --bench flux_bench
//! ```
//! Starts `flux_bench.py` (diffusers 0.42.1, the venv's python) first: it builds the small config
//! (hidden 256 = 4 heads × 64, 2 double + 4 single blocks, 256×256 px → 256 image tokens, 512
//! text tokens of width 4096) and a mid config (hidden 512, same depth, 512×512 px) and saves
//! their weights and inputs. This bench loads the same files, and the two sides take turns, one
//! step each (who goes first swapping every round, so drifting machine load hits both alike),
//! timing:
//! - one rollout step (no-grad forward + SDE step),
//! - one training micro-step (forward with grad + log-prob of a stored transition + backward),
//!   plain and with activation checkpointing (diffusers: `enable_gradient_checkpointing`),
//!
//! at the same thread count, and prints ours/diffusers. Then the peak memory of one training
//! micro-step, with and without checkpointing, for both, on a mid config (hidden 512, 512×512 px,
//! 1024 + 512 tokens) and a deeper one (2 + 12 blocks). Each of those eight figures comes from
//! a process of its own (this bench re-run with `DG_BENCH_MEM`, or `flux_bench.py --mem`) that
//! warms up with one step and reports the median of three; before each, free heap pages go back
//! to the OS, or the allocator's kept pages hide the step's growth.

#[path = "common/peer.rs"]
mod peer;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use dancegrpo_worker::flux::checkpoint::forward_backward_checkpointed;
use dancegrpo_worker::flux::weights::SafetensorsFile;
use dancegrpo_worker::flux::{FluxInputs, LoadedFlux, Result, WeightPolicy, load_flux};
use dancegrpo_worker::sampler::{Next, SamplerError, Schedule, sde_step};
use dancegrpo_worker::train::optim::clear_grad;
use peer::{Peer, python};
use tch::{Device, Kind, Tensor};

type Tensors = std::collections::BTreeMap<String, Tensor>;

fn inputs(t: &Tensors) -> FluxInputs<'_> {
    FluxInputs {
        hidden_states: &t["hidden_states"],
        encoder_hidden_states: &t["encoder_hidden_states"],
        pooled_projections: &t["pooled_projections"],
        timestep: &t["timestep"],
        guidance: Some(&t["guidance"]),
        img_ids: &t["img_ids"],
        txt_ids: &t["txt_ids"],
    }
}

/// A two-step schedule whose step 0 is σ 0.75 → 0.7, the step the Python peer uses.
fn sched() -> Schedule {
    Schedule::from_sigmas(vec![0.75, 0.7, 0.0]).unwrap()
}

fn rollout_step(m: &LoadedFlux, t: &Tensors) -> Tensor {
    tch::no_grad(|| {
        let v = m.model.forward(&inputs(t)).unwrap();
        let n = v.randn_like();
        sde_step(&v, &t["hidden_states"], &sched(), 0, 0.3, Next::Noise(&n)).unwrap().next
    })
}

fn loss_of(lp: &Tensor) -> Result<Tensor> {
    Ok(-((lp - lp.detach()).exp() * 0.5).mean(Kind::Float))
}

/// Timing: gradients dropped, as the trainer's (and torch's default) `zero_grad` does. Memory:
/// zeroed in place, as the peer does too, so the figure is what the step needs beyond them.
fn reset_grads(m: &LoadedFlux, keep: bool) {
    for mut v in m.vs.trainable_variables() {
        if keep {
            v.zero_grad();
        } else {
            clear_grad(&v).unwrap();
        }
    }
}

fn train_step(m: &LoadedFlux, t: &Tensors, checkpointed: bool, keep_grads: bool) {
    reset_grads(m, keep_grads);
    let (x, nxt) = (&t["hidden_states"], &t["next"]);
    if checkpointed {
        let loss = forward_backward_checkpointed(&m.model, &inputs(t), |v| {
            let step = sde_step(v, x, &sched(), 0, 0.3, Next::Given(nxt))?;
            Ok::<_, SamplerError>(loss_of(&step.log_prob)?)
        });
        drop(loss.unwrap());
    } else {
        let v = m.model.forward(&inputs(t)).unwrap();
        let lp = sde_step(&v, x, &sched(), 0, 0.3, Next::Given(nxt)).unwrap().log_prob;
        loss_of(&lp).unwrap().backward();
    }
}

fn seconds(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

unsafe extern "C" {
    /// glibc: hands free heap pages back to the OS.
    fn malloc_trim(pad: usize) -> i32;
}

fn status_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

/// Peak resident-memory growth of `f` in MiB. Free heap pages go back to the OS first, so what
/// `f` allocates shows as growth instead of reusing pages that loading freed; then VmHWM is
/// reset through /proc/self/clear_refs. Both sides measure the same way.
fn rss_peak_delta(f: impl FnOnce()) -> f64 {
    // SAFETY: malloc_trim only releases memory that no allocation holds.
    unsafe { malloc_trim(0) };
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = status_mib("VmRSS:");
    f();
    status_mib("VmHWM:") - base
}

fn load(dir: &Path) -> (LoadedFlux, Tensors) {
    let m = load_flux(dir, Device::Cpu, WeightPolicy::TrainableF32).unwrap();
    let t = SafetensorsFile::open(dir.join("inputs.safetensors")).unwrap().read_all().unwrap();
    (m, t)
}

fn main() {
    let threads: i32 =
        std::env::var("BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1)
        });
    let iters: usize = std::env::var("BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    tch::set_num_threads(threads);
    if let Ok(spec) = std::env::var("DG_BENCH_MEM") {
        measure_memory(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/flux_bench.py");
    let (mut peer, hello) = Peer::start("flux_bench.py", dir.path(), threads);

    let (m, t) = load(&dir.path().join("small"));
    // Same weights, same inputs: the velocities agree (sanity: we time the same computation).
    let v = tch::no_grad(|| m.model.forward(&inputs(&t))).unwrap();
    let diff = (&v - &t["v"]).abs().max().double_value(&[]) / t["v"].abs().max().double_value(&[]);
    assert!(diff < 1e-4, "ours and diffusers disagree: {diff}");
    let step = |what: &str| match what {
        "rollout" => drop(rollout_step(&m, &t)),
        "train" => train_step(&m, &t, false, false),
        _ => train_step(&m, &t, true, false),
    };
    let kinds = ["rollout", "train", "ckpt"];
    // Warm-up, as the peer did.
    kinds.iter().for_each(|k| step(k));
    let (mut ours, mut theirs) = (vec![vec![]; 3], vec![vec![]; 3]);
    for round in 0..iters {
        for (k, what) in kinds.iter().enumerate() {
            if round % 2 == 0 {
                theirs[k].push(peer.request(what)["seconds"].as_f64().unwrap());
                ours[k].push(seconds(|| step(what)));
            } else {
                ours[k].push(seconds(|| step(what)));
                theirs[k].push(peer.request(what)["seconds"].as_f64().unwrap());
            }
        }
    }
    drop(peer);
    drop(m);

    println!(
        "FLUX transformer, CPU f32, {threads} threads, median of {iters} alternating rounds \
         (torch {})",
        hello["torch"]
    );
    println!(
        "small config: hidden 256 (4x64), 2 double + 4 single, 256x256 px (256 img + 512 txt tokens)"
    );
    println!("{:<34} {:>10} {:>10} {:>8}   per-round ratios", "", "ours [s]", "diffusers", "ratio");
    let names = [
        "rollout step (fwd + SDE)",
        "train micro-step (fwd+bwd)",
        "train micro-step, checkpointed",
    ];
    for (k, name) in names.iter().enumerate() {
        let (a, b) = (median(ours[k].clone()), median(theirs[k].clone()));
        let rounds: Vec<String> =
            ours[k].iter().zip(&theirs[k]).map(|(a, b)| format!("{:.2}", a / b)).collect();
        println!("{name:<34} {a:>10.4} {b:>10.4} {:>8.3}   {}", a / b, rounds.join(" "));
    }

    println!();
    println!(
        "peak memory growth of one training micro-step beyond the weights and their gradients [MiB]"
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "config", "grads", "ours", "ours ckpt", "diffusers", "diff. ckpt"
    );
    for (name, label) in
        [("mid", "mid: 2+4 blocks, hidden 512"), ("deep", "deep: 2+12 blocks, hidden 512")]
    {
        let d = dir.path().join(name);
        let ours = |mode: &str| {
            json_of(
                Command::new(std::env::current_exe().unwrap())
                    .env("DG_BENCH_MEM", format!("{mode}:{}", d.display()))
                    .env("BENCH_THREADS", threads.to_string()),
            )
        };
        let theirs = |mode: &str| {
            json_of(
                Command::new(python())
                    .arg(&script)
                    .args(["--mem", d.to_str().unwrap(), "--mode", mode])
                    .args(["--threads", &threads.to_string()]),
            )
        };
        let (o, oc, p, pc) = (ours("plain"), ours("ckpt"), theirs("plain"), theirs("ckpt"));
        let mib = |v: &serde_json::Value| v["peak_mib"].as_f64().unwrap();
        println!(
            "{label:<30} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
            p["grads_mib"].as_f64().unwrap(),
            mib(&o),
            mib(&oc),
            mib(&p),
            mib(&pc)
        );
    }
}

/// Runs a measuring process and parses the JSON line it ends with.
fn json_of(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(s.lines().last().expect("no output")).unwrap()
}

/// The child side of the memory measurement: one micro-step on a saved config.
fn measure_memory(spec: &str) {
    let (mode, dir) = spec.split_once(':').expect("DG_BENCH_MEM=plain|ckpt:DIR");
    let (m, t) = load(Path::new(dir));
    // As the peer: a warm-up step (it allocates the gradients), then the median of three.
    let ck = mode == "ckpt";
    train_step(&m, &t, ck, true);
    let mut peaks: Vec<f64> =
        (0..3).map(|_| rss_peak_delta(|| train_step(&m, &t, ck, true))).collect();
    peaks.sort_by(f64::total_cmp);
    let peak = peaks[1];
    println!("{}", serde_json::json!({ "peak_mib": peak }));
}
