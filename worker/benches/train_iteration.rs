//! One GRPO iteration, ours vs a Python re-implementation on diffusers, side by side in one run
//! (CPU, f32, same config, weights, inputs and thread count).
//!
//! ```text
//! BENCH_THREADS=2 cargo bench -p dancegrpo-worker --bench train_iteration --profile dev
//! BENCH_THREADS=1 BENCH_ITERS=5 cargo bench -p dancegrpo-worker --bench train_iteration
//! ```
//! Starts `train_iteration_peer.py` (diffusers 0.42.1, the venv's python) first: for a `tiny`
//! config (2 + 2 blocks, hidden 32, 64×64 px → 16 image tokens, 8 text tokens of width 32) and a
//! `small` one (hidden 256 = 4 heads × 64, 2 + 4 blocks, 256×256 px → 256 image tokens, 64 text
//! tokens of width 4096) it saves the weights and inputs and times ALGORITHM.md §12's iteration:
//! G = 4 trajectories of S = 8 steps rolled out one at a time (no grad), then the update (4 of
//! the 7 usable transitions per trajectory with grad, backward per transition, clip_grad_norm_ +
//! AdamW every GA = 2 trajectories). The VAE decode and the reward are left out on both sides.
//! This bench loads the same files and times the same iteration with the worker's code
//! (`rollout_with_noise`, `accumulate`, `apply_update`), as `Trainer` assembles it, checks that
//! its first iteration gives the peer's grad norms and loss, and prints ours/python.
//!
//! Ours skips the transformer's backward for transitions whose loss has a zero gradient (the
//! ratio clipped on the side its advantage favours; same gradients bit for bit, see
//! `train::step::accumulate`); the bench prints how many. Python back-propagates them all, as
//! the reference does.
//!
//! The peer stays running and does one iteration per request, so the two sides alternate
//! (`BENCH_ITERS` rounds, default 3, who goes first swapping every round): on a shared machine
//! the load changes within seconds, and running one side after the other measured the load.

#[path = "common/peer.rs"]
mod peer;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use dancegrpo_proto::advantage::group_advantages;
use dancegrpo_worker::flux::checkpoint::Resident;
use dancegrpo_worker::flux::weights::SafetensorsFile;
use dancegrpo_worker::flux::{LoadedFlux, WeightPolicy, load_flux};
use dancegrpo_worker::reward::loss::MultiRewardClipLoss;
use dancegrpo_worker::sampler::rollout::{FirstStepMemo, rollout_with_noise};
use dancegrpo_worker::sampler::{Conditioning, Schedule, Trajectory, recompute_log_prob};
use dancegrpo_worker::train::optim::{AdamW, AdamWConfig};
use dancegrpo_worker::train::step::{LossSettings, UpdateStats, accumulate, apply_update};
use peer::Peer;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

type Tensors = BTreeMap<String, Tensor>;

/// The iteration's settings, as the peer reports them.
struct Params {
    steps: usize,
    shift: f64,
    eta: f64,
    ga: usize,
    lr: f64,
    clip_range: f64,
    adv_clip_max: f64,
    max_grad_norm: f64,
    guidance: f64,
}

impl Params {
    fn from_json(p: &Value) -> Self {
        let f = |k: &str| p[k].as_f64().unwrap();
        Self {
            steps: f("S") as usize,
            shift: f("shift"),
            eta: f("eta"),
            ga: f("GA") as usize,
            lr: f("lr"),
            clip_range: f("clip_range"),
            adv_clip_max: f("adv_clip_max"),
            max_grad_norm: f("max_grad_norm"),
            guidance: f("guidance"),
        }
    }
}

struct Case {
    m: LoadedFlux,
    t: Tensors,
    sched: Schedule,
    opt: AdamW,
    advantages: Vec<f64>,
    settings: LossSettings,
    ga: usize,
    max_grad_norm: f64,
    guidance: f64,
    /// Over all rounds: transitions trained, and those whose flat loss skipped the backward.
    transitions: u64,
    skipped: u64,
}

impl Case {
    fn load(dir: &Path, p: &Params) -> Self {
        let m = load_flux(dir, Device::Cpu, WeightPolicy::TrainableF32).unwrap();
        let t = SafetensorsFile::open(dir.join("inputs.safetensors")).unwrap().read_all().unwrap();
        let mut params: Vec<(String, Tensor)> = m.vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let opt = AdamW::new(params, AdamWConfig { lr: p.lr, ..AdamWConfig::default() }).unwrap();
        let rewards: Vec<Vec<f64>> =
            Vec::<f64>::try_from(&t["rewards"]).unwrap().into_iter().map(|r| vec![r]).collect();
        let advantages =
            group_advantages(&rewards, p.adv_clip_max).unwrap().into_iter().map(|a| a[0]).collect();
        let count = t["steps"].size()[1] as usize;
        let settings = LossSettings {
            eta: p.eta,
            clip: MultiRewardClipLoss {
                clip_range: p.clip_range,
                adv_clip_max: p.adv_clip_max,
                weights: vec![1.0],
            },
            divisor: (p.ga * count) as f64,
            checkpointing: false,
        };
        let sched = Schedule::new(p.steps, p.shift).unwrap();
        Self {
            m,
            t,
            sched,
            opt,
            advantages,
            settings,
            ga: p.ga,
            max_grad_norm: p.max_grad_norm,
            guidance: p.guidance,
            transitions: 0,
            skipped: 0,
        }
    }

    fn cond(&self) -> Conditioning<'_> {
        Conditioning {
            encoder_hidden_states: &self.t["encoder_hidden_states"],
            pooled_projections: &self.t["pooled_projections"],
            guidance: self.guidance,
            img_ids: &self.t["img_ids"],
            txt_ids: &self.t["txt_ids"],
        }
    }

    /// One forward and backward, leaving the weights and gradients as they were.
    fn warm_up(&mut self) {
        let z = &self.t["init_noise"];
        let lp = recompute_log_prob(
            &self.m.model,
            &self.cond(),
            z,
            z,
            &self.sched,
            0,
            self.settings.eta,
        );
        lp.unwrap().sum(Kind::Float).backward();
        self.opt.zero_grad().unwrap();
    }

    fn rollout(&self) -> Vec<Trajectory> {
        let members = self.t["step_noise"].size()[0];
        // As the trainer: the members share the first forward (init_same_noise).
        let mut memo = FirstStepMemo::default();
        (0..members)
            .map(|g| {
                let noise = self.t["step_noise"].get(g);
                let eta = self.settings.eta;
                rollout_with_noise(
                    &self.m.model,
                    &mut Resident,
                    &self.cond(),
                    &self.t["init_noise"],
                    &self.sched,
                    eta,
                    Some(&mut memo),
                    |i| Ok(noise.get(i as i64)),
                )
                .unwrap()
            })
            .collect()
    }

    /// The update; returns each optimizer step's pre-clip norm and the summed loss.
    fn update(&mut self, trajectories: &[Trajectory]) -> (Vec<f64>, f64) {
        let mut stats = UpdateStats::default();
        let mut norms = vec![];
        self.opt.zero_grad().unwrap();
        for (g, tr) in trajectories.iter().enumerate() {
            let steps: Vec<usize> = Vec::<i64>::try_from(&self.t["steps"].get(g as i64))
                .unwrap()
                .into_iter()
                .map(|k| k as usize)
                .collect();
            let adv = Tensor::from_slice(&[self.advantages[g] as f32]).reshape([1, 1]);
            accumulate(
                &self.m.model,
                &mut Resident,
                &self.cond(),
                &tr.latents,
                &tr.log_probs,
                &adv,
                &steps,
                &self.sched,
                &self.settings,
                &mut stats,
            )
            .unwrap();
            if (g + 1) % self.ga == 0 {
                let before = stats.grad_norm_sum;
                apply_update(&mut self.opt, None, self.max_grad_norm, &mut stats).unwrap();
                norms.push(stats.grad_norm_sum - before);
            }
        }
        self.skipped += stats.skipped_backward;
        self.transitions += stats.transitions;
        (norms, stats.loss)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let threads: i32 =
        std::env::var("BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1)
        });
    let iters: usize = std::env::var("BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    tch::set_num_threads(threads);
    let dir = tempfile::tempdir().unwrap();
    let (mut peer, hello) = Peer::start("train_iteration_peer.py", dir.path(), threads);
    let params = Params::from_json(&hello["params"]);

    println!(
        "One GRPO iteration (G 4, S {}, GA {}, no decode/reward), CPU f32, {threads} threads, \
         median of {iters} alternating rounds (torch {})",
        params.steps, params.ga, hello["torch"]
    );
    println!(
        "{:<8} {:<10} {:>10} {:>10} {:>8}   per-round ratios",
        "config", "phase", "ours [s]", "python", "ratio"
    );
    for name in ["tiny", "small"] {
        let mut c = Case::load(&dir.path().join(name), &params);
        c.warm_up();
        // [phase][round] for ours and python.
        let mut ours = [vec![], vec![], vec![]];
        let mut theirs = [vec![], vec![], vec![]];
        for round in 0..iters {
            let mut run_ours = || {
                let t0 = Instant::now();
                let traj = c.rollout();
                let t1 = Instant::now();
                let (norms, loss) = c.update(&traj);
                let t2 = Instant::now();
                (
                    [(t2 - t0).as_secs_f64(), (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()],
                    norms,
                    loss,
                )
            };
            // Alternate who goes first, so a change of machine load hits both alike.
            let (mine, py) = if round % 2 == 0 {
                let py = peer.request(name);
                (run_ours(), py)
            } else {
                let mine = run_ours();
                (mine, peer.request(name))
            };
            let (times, norms, loss) = mine;
            if round == 0 {
                // The same computation on both sides: same norms and loss from the same start.
                let want: Vec<f64> = py["grad_norms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(norms.len(), want.len());
                for (a, b) in norms.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-3 * b, "{name}: grad norm {a} vs python {b}");
                }
                let pl = py["loss"].as_f64().unwrap();
                assert!((loss - pl).abs() <= 1e-5, "{name}: loss {loss} vs python {pl}");
            }
            for (k, key) in ["iteration_s", "rollout_s", "update_s"].iter().enumerate() {
                ours[k].push(times[k]);
                theirs[k].push(py[key].as_f64().unwrap());
            }
        }
        for (k, phase) in ["iteration", "rollout", "update"].iter().enumerate() {
            let (a, b) = (median(ours[k].clone()), median(theirs[k].clone()));
            let rounds: Vec<String> =
                ours[k].iter().zip(&theirs[k]).map(|(a, b)| format!("{:.2}", a / b)).collect();
            println!(
                "{name:<8} {phase:<10} {a:>10.3} {b:>10.3} {:>8.3}   {}",
                a / b,
                rounds.join(" ")
            );
        }
        println!(
            "{name:<8} ours skipped {} of {} transformer backwards (clipped ratio, zero gradient)",
            c.skipped, c.transitions
        );
    }
}
