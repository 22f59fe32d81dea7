//! Distributed equivalence of the update (issue 7): two ranks, each accumulating its own
//! trajectories and averaging gradients over a real Gloo group, end with the same weights as
//! one process that accumulates all of them in the same windows — and both ranks hold
//! bit-identical weights after every optimizer step (the reference once shipped a script whose
//! ranks silently trained separate copies).
//!
//! The test re-executes itself once per rank (`DG_TEST_RANK`), like `dist_loopback.rs`.

mod flux_common;
mod numerics;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dancegrpo_proto::{JobConfig, RankAssignment, StoreAddress};
use dancegrpo_worker::device::Device;
use dancegrpo_worker::dist::{Backend, GroupOptions, ProcessGroup};
use dancegrpo_worker::flux::checkpoint::Resident;
use dancegrpo_worker::latents;
use dancegrpo_worker::reward::loss::MultiRewardClipLoss;
use dancegrpo_worker::sampler::{Conditioning, NoiseKey, Schedule, rollout};
use dancegrpo_worker::train::optim::{AdamW, AdamWConfig};
use dancegrpo_worker::train::policy::Policy;
use dancegrpo_worker::train::step::{
    LossSettings, UpdateStats, accumulate, apply_update, train_steps,
};
use flux_common::seeded_normal;
use tch::{Kind, Tensor};

const STEPS: usize = 4;
const TRAJ: usize = 8;
/// Trajectories per rank per optimizer step.
const GA: usize = 2;

fn cfg() -> JobConfig {
    JobConfig {
        pretrained_model_name_or_path: "tiny".into(),
        h: 32,
        w: 32,
        sampling_steps: STEPS as u32,
        clip_range: 0.2,
        ..JobConfig::default()
    }
}

struct Setup {
    policy: Policy,
    prompt: Tensor,
    pooled: Tensor,
    txt_ids: Tensor,
    img_ids: Tensor,
    sched: Schedule,
    /// (latents, log_probs) of each trajectory.
    rollouts: Vec<(Tensor, Tensor)>,
    advantages: Vec<f32>,
}

/// The same policy, prompt, trajectories and advantages in every process.
fn setup() -> Setup {
    tch::set_num_threads(1);
    let c = cfg();
    let policy = Policy::load(&c, Device::Cpu).unwrap();
    let prompt = seeded_normal(7, &[1, 8, 32], 1.0);
    let pooled = seeded_normal(8, &[1, 32], 1.0);
    let txt_ids = Tensor::zeros([8, 3], (Kind::Float, tch::Device::Cpu));
    let img_ids = latents::img_ids(32, 32).unwrap();
    let sched = Schedule::new(STEPS, 3.0).unwrap();
    let rollouts = (0..TRAJ)
        .map(|m| {
            let cond = Conditioning {
                encoder_hidden_states: &prompt,
                pooled_projections: &pooled,
                guidance: 3.5,
                img_ids: &img_ids,
                txt_ids: &txt_ids,
            };
            let key = NoiseKey { seed: 11, prompt: 0, member: m as u64 };
            let t = rollout(&policy.model, &cond, &[key], &sched, 0.3, false, None).unwrap();
            (t.latents, t.log_probs)
        })
        .collect();
    let advantages = vec![1.2, -0.4, 0.9, -1.5, 0.3, -0.8, 1.7, -1.4];
    Setup { policy, prompt, pooled, txt_ids, img_ids, sched, rollouts, advantages }
}

/// Accumulates trajectories `ids`, each loss divided by `divisor`.
fn accumulate_all(s: &Setup, ids: &[usize], divisor: f64, stats: &mut UpdateStats) {
    let c = cfg();
    let settings = LossSettings {
        eta: c.eta,
        clip: MultiRewardClipLoss {
            clip_range: c.clip_range,
            adv_clip_max: c.adv_clip_max,
            weights: vec![1.0],
        },
        divisor,
        checkpointing: false,
    };
    let cond = Conditioning {
        encoder_hidden_states: &s.prompt,
        pooled_projections: &s.pooled,
        guidance: 3.5,
        img_ids: &s.img_ids,
        txt_ids: &s.txt_ids,
    };
    let count = c.train_timesteps();
    for &i in ids {
        let (lat, lp) = &s.rollouts[i];
        let adv = Tensor::from_slice(&[s.advantages[i]]).unsqueeze(0);
        let steps = train_steps(11, 0, i as u32, STEPS - 1, count);
        accumulate(
            &s.policy.model,
            &mut Resident,
            &cond,
            lat,
            lp,
            &adv,
            &steps,
            &s.sched,
            &settings,
            stats,
        )
        .unwrap();
    }
}

fn optimizer(s: &Setup) -> AdamW {
    let c = cfg();
    AdamW::new(
        s.policy.trainable(),
        AdamWConfig {
            lr: 1e-3,
            beta1: c.adam_beta1,
            beta2: c.adam_beta2,
            eps: c.adam_epsilon,
            weight_decay: c.weight_decay,
        },
    )
    .unwrap()
}

fn flat(s: &Setup) -> Tensor {
    let ts: Vec<Tensor> =
        s.policy.trainable().iter().map(|(_, t)| t.detach().flatten(0, -1)).collect();
    Tensor::cat(&ts, 0)
}

/// The trajectories of `rank` (2 ranks × 4) in work order.
fn work(rank: usize) -> Vec<usize> {
    (rank * TRAJ / 2..(rank + 1) * TRAJ / 2).collect()
}

fn reference_file() -> PathBuf {
    std::env::temp_dir().join(format!("dancegrpo-train-dist-{}.safetensors", std::process::id()))
}

#[test]
fn two_ranks_match_one_process_and_stay_identical() {
    let t = cfg().train_timesteps() as f64;
    let Ok(rank) = std::env::var("DG_TEST_RANK").map(|r| r.parse::<usize>().unwrap()) else {
        // One process, the same windows: step k accumulates rank 0's and rank 1's k-th pair,
        // each loss divided by (2 ranks · GA · T), which is what the rank average yields.
        let s = setup();
        let mut opt = optimizer(&s);
        let mut stats = UpdateStats::default();
        for k in 0..(TRAJ / 2 / GA) {
            let ids: Vec<usize> =
                (0..2).flat_map(|r| work(r)[k * GA..(k + 1) * GA].to_vec()).collect();
            accumulate_all(&s, &ids, 2.0 * GA as f64 * t, &mut stats);
            apply_update(&mut opt, None, 1.0, &mut stats).unwrap();
        }
        let file = reference_file();
        flat(&s).save(&file).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let children = (0..2).map(|r| spawn(r, port, &file)).collect();
        join(children, Duration::from_secs(120));
        let _ = std::fs::remove_file(file);
        return;
    };
    let port: u16 = std::env::var("DG_TEST_PORT").unwrap().parse().unwrap();
    let a = RankAssignment {
        rank: rank as u32,
        world_size: 2,
        generation: 1,
        store: StoreAddress { host: "127.0.0.1".into(), port, prefix: "dancegrpo/eq/gen1/".into() },
    };
    let mut pg = ProcessGroup::from_assignment(
        &a,
        Backend::Gloo,
        &GroupOptions::default().with_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    let s = setup();
    let mut opt = optimizer(&s);
    let mut stats = UpdateStats::default();
    let mine = work(rank);
    for k in 0..(mine.len() / GA) {
        accumulate_all(&s, &mine[k * GA..(k + 1) * GA], GA as f64 * t, &mut stats);
        apply_update(&mut opt, Some(&mut pg), 1.0, &mut stats).unwrap();
        let all = pg.all_gather(&flat(&s)).unwrap();
        assert!(all[0].equal(&all[1]), "ranks hold different weights after optimizer step {k}");
    }
    assert_eq!(stats.optimizer_steps, 2);
    let reference = Tensor::load(Path::new(&std::env::var("DG_TEST_REF").unwrap())).unwrap();
    let ours = flat(&s);
    let initial = {
        let fresh = Policy::load(&cfg(), Device::Cpu).unwrap();
        let ts: Vec<Tensor> =
            fresh.trainable().iter().map(|(_, t)| t.detach().flatten(0, -1)).collect();
        Tensor::cat(&ts, 0)
    };
    let moved = (&reference - &initial).abs().max().double_value(&[]);
    assert!(moved > 1e-4, "the update changed nothing ({moved})");
    // f32 round-off of a different summation order (2 partial sums averaged vs one sum),
    // amplified by AdamW's normalisation for tiny second moments: far below the update size.
    let diff = (&ours - &reference).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "two ranks differ from one process by {diff} (update size {moved})");
}

fn spawn(rank: usize, port: u16, reference: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["two_ranks_match_one_process_and_stay_identical", "--exact", "--nocapture"])
        .env("DG_TEST_RANK", rank.to_string())
        .env("DG_TEST_PORT", port.to_string())
        .env("DG_TEST_REF", reference)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the ranks (killing them past `limit`: a hang fails instead of hanging the suite).
fn join(children: Vec<Child>, limit: Duration) {
    let start = Instant::now();
    let mut failures = Vec::new();
    for (r, mut c) in children.into_iter().enumerate() {
        while c.try_wait().unwrap().is_none() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let out = c.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "rank {r} failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
