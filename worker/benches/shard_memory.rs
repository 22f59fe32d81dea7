//! Per-rank peak memory and time of a training micro-step on N = 1, 2 and 4 local ranks over
//! Gloo, three sides in one run: ours sharded (`fsdp_sharding_strategy = full`), ours unsharded
//! (`none`), and PyTorch FSDP with the reference's settings (`shard_memory_peer.py`). The
//! figures part 2's memory planner is held against (BENCHMARKS.md, "Sharded training state").
//!
//! Run: `cargo bench -p dancegrpo-worker --bench shard_memory --profile dev` (the Makefile's
//! environment, with the venv's python on PATH). Each rank is a process of its own, so VmHWM is
//! that rank's peak alone. Our rank builds a mid-size FLUX-shaped transformer with seeded random
//! weights and takes the trainer's path from there (`Sharded::cut` or the plain optimizer, the
//! checkpointed forward and backward, `apply_sharded_update` or `apply_update`); the peer builds
//! diffusers' `FluxTransformer2DModel` of the same shapes under FSDP. One intra-op thread per
//! rank, loss `mean(v²)`, each micro-step followed by an optimizer step.
//!
//! The three sides are all up at once and take turns, as in the all-reduce bench: the driver
//! asks one side for one micro-step (every rank reads a line on stdin, rank 0 answers with its
//! seconds), then the next, rotating who goes first, so that every sample of one side has a
//! sample of the others taken a moment apart on the shared machine. At the end (stdin closed)
//! our sharded ranks gather the rollout replica when `DG_BENCH_REPLICA=1`, as the trainer does
//! after an update under `rollout_weights = replica` (the default gathers per forward and
//! keeps no replica), and every rank reports its VmHWM after set-up and at the end, and after the imports or the group alone
//! (the baseline). `DG_BENCH_STEPS` turns (default 4) after one warm-up.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use dancegrpo_proto::{RankAssignment, StoreAddress};
use dancegrpo_worker::dist::{Backend, GroupOptions, ProcessGroup};
use dancegrpo_worker::flux::checkpoint::{forward_backward_checkpointed, forward_backward_with};
use dancegrpo_worker::flux::{FluxConfig, FluxInputs, FluxTransformer};
use dancegrpo_worker::latents::img_ids;
use dancegrpo_worker::train::optim::{AdamW, AdamWConfig};
use dancegrpo_worker::train::shard::{Gathering, Sharded};
use dancegrpo_worker::train::step::{UpdateStats, apply_sharded_update, apply_update};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

const WORLDS: [u32; 3] = [1, 2, 4];

/// Hidden 512 (8 × 64), 2 double + 8 single blocks: 50 M weights, 200 MB in f32, so the
/// training state (16 bytes per weight) dwarfs libtorch's own resident memory.
fn config() -> FluxConfig {
    FluxConfig {
        num_layers: 2,
        num_single_layers: 8,
        attention_head_dim: 64,
        num_attention_heads: 8,
        joint_attention_dim: 32,
        pooled_projection_dim: 32,
        guidance_embeds: true,
        axes_dims_rope: vec![8, 28, 28],
        ..FluxConfig::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// This process's peak resident memory, in MiB (`VmHWM` of /proc/self/status).
fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

fn rank_main(rank: u32, world: u32, port: u16, full: bool, prefetch: bool) {
    tch::set_num_threads(1);
    let a = RankAssignment {
        rank,
        world_size: world,
        generation: 1,
        store: StoreAddress { host: "127.0.0.1".into(), port, prefix: "bench/".into() },
    };
    let opts = GroupOptions::default().with_timeout(Duration::from_secs(600));
    let mut group = ProcessGroup::from_assignment(&a, Backend::Gloo, &opts).unwrap();
    let baseline = vm_hwm_mib();
    let cfg = config();
    let vs = VarStore::new(tch::Device::Cpu);
    let model = FluxTransformer::new(&vs.root(), &cfg, Kind::Float).unwrap();
    tch::manual_seed(7);
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let r = v.randn_like() * 0.02;
            v.copy_(&r);
        }
    });
    let mut trainable: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    trainable.sort_by(|x, y| x.0.cmp(&y.0));
    let params: i64 = trainable.iter().map(|(_, t)| t.numel() as i64).sum();
    let adamw = AdamWConfig::default();
    let (mut opt, mut shard) = if full {
        let (s, masters) = Sharded::cut(&trainable, rank, world, Kind::Float).unwrap();
        (AdamW::over(masters, adamw).unwrap(), Some(s))
    } else {
        (AdamW::new(trainable, adamw).unwrap(), None)
    };
    drop(vs);
    let loaded = vm_hwm_mib();
    let f = |s: &[i64]| Tensor::randn(s, (Kind::Float, tch::Device::Cpu));
    let (hidden, text, pooled) = (f(&[1, 64, 64]), f(&[1, 16, 32]), f(&[1, 32]));
    let (t, g) = (Tensor::from_slice(&[0.5f32]), Tensor::from_slice(&[3.5f32]));
    let ids = img_ids(128, 128).unwrap();
    let txt_ids = Tensor::zeros([16, 3], (Kind::Float, tch::Device::Cpu));
    let inputs = FluxInputs {
        hidden_states: &hidden,
        encoder_hidden_states: &text,
        pooled_projections: &pooled,
        timestep: &t,
        guidance: Some(&g),
        img_ids: &ids,
        txt_ids: &txt_ids,
    };
    let loss = |v: &Tensor| -> Result<Tensor, dancegrpo_worker::flux::ModelError> {
        Ok(v.square().mean(Kind::Float))
    };
    if let Some(s) = &mut shard {
        s.release_blocks().unwrap();
        s.set_prefetch(prefetch);
    }
    let mut stats = UpdateStats::default();
    let (mut waited, mut steps) = (0.0, 0);
    for line in std::io::stdin().lock().lines() {
        line.unwrap();
        let start = Instant::now();
        match &mut shard {
            Some(s) => {
                let mut w = Gathering { shard: s, opt: &opt, group: Some(&mut group) };
                let _ = forward_backward_with(&model, &inputs, &mut w, loss).unwrap();
                apply_sharded_update(s, &mut opt, Some(&mut group), 1.0, &mut stats).unwrap();
            }
            None => {
                let _ = forward_backward_checkpointed(&model, &inputs, loss).unwrap();
                apply_update(&mut opt, Some(&mut group), 1.0, &mut stats).unwrap();
            }
        }
        if rank == 0 {
            println!("{}", start.elapsed().as_secs_f64());
        }
        // Seconds this rank spent waiting in collectives in the step (the all-reduce for
        // the unsharded side): what the prefetch did not hide.
        waited += match &mut shard {
            Some(s) => s.take_communication_s(),
            None => std::mem::take(&mut stats.communication_s),
        };
        steps += 1;
    }
    // `rollout_weights = replica` gathers the rollout's replica after the update; the default
    // (`gather`, per forward) keeps only the root unit.
    if let Some(s) =
        shard.as_mut().filter(|_| std::env::var("DG_BENCH_REPLICA").is_ok_and(|v| v == "1"))
    {
        s.gather_all(&opt, Some(&mut group)).unwrap();
    }
    println!(
        "{rank} {params} {baseline:.1} {loaded:.1} {:.1} {} {:.4}",
        vm_hwm_mib(),
        stats.optimizer_steps,
        waited / f64::from(steps.max(1))
    );
}

/// Which trainer a side runs.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// Ours, sharded (with the prefetch or without) or not.
    Ours { full: bool, prefetch: bool },
    /// PyTorch FSDP (FULL_SHARD).
    Fsdp,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ours { full: false, .. } => "ours none",
            Side::Ours { full: true, prefetch: false } => "full, no pf",
            Side::Ours { full: true, prefetch: true } => "ours full",
            Side::Fsdp => "torch FSDP",
        }
    }
}

/// One side's ranks, driven over their stdin.
struct Group {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    outs: Vec<BufReader<ChildStdout>>,
}

impl Group {
    fn start(side: Side, world: u32, threshold: &str) -> Self {
        let port = free_port();
        let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/shard_memory_peer.py");
        let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
        let mut children: Vec<Child> = (0..world)
            .map(|r| {
                let mut c = match side {
                    Side::Ours { full, prefetch } => {
                        let mut c = Command::new(std::env::current_exe().unwrap());
                        c.env("DG_BENCH_PREFETCH", prefetch.to_string());
                        c.env("DG_BENCH_RANK", r.to_string())
                            .env("DG_BENCH_FULL", full.to_string());
                        c
                    }
                    Side::Fsdp => {
                        let mut c = Command::new(&python);
                        c.arg(peer).env("RANK", r.to_string());
                        c
                    }
                };
                c.env("WORLD_SIZE", world.to_string())
                    .env("MASTER_PORT", port.to_string())
                    .env("GLOO_SOCKET_IFNAME", "lo")
                    .env("OMP_NUM_THREADS", "1")
                    // A fixed mmap threshold: glibc's moving one keeps freed blocks in the
                    // heap, and VmHWM would then count what the allocator holds, not uses.
                    .envs((threshold != "default").then_some(("MALLOC_MMAP_THRESHOLD_", threshold)))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawn a rank (is the venv's python on PATH?)")
            })
            .collect();
        let stdins = children.iter_mut().map(|c| c.stdin.take().unwrap()).collect();
        let outs = children.iter_mut().map(|c| BufReader::new(c.stdout.take().unwrap())).collect();
        Group { children, stdins, outs }
    }

    /// Seconds of one micro-step, as rank 0 timed it.
    fn step(&mut self) -> f64 {
        for s in &mut self.stdins {
            writeln!(s, "step").unwrap();
            s.flush().unwrap();
        }
        let mut line = String::new();
        self.outs[0].read_line(&mut line).unwrap();
        line.trim().parse().unwrap_or_else(|_| panic!("a rank failed (it printed {line:?})"))
    }

    /// Each rank's final report: parameters, baseline, loaded and peak VmHWM (MiB).
    fn finish(mut self) -> Vec<[f64; 5]> {
        drop(std::mem::take(&mut self.stdins));
        let mut rows = Vec::new();
        for (r, (mut c, out)) in self.children.into_iter().zip(self.outs).enumerate() {
            let line = out.lines().next().expect("a rank's report").unwrap();
            assert!(c.wait().unwrap().success(), "rank {r} failed");
            let v: Vec<f64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
            rows.push([v[1], v[2], v[3], v[4], v.get(6).copied().unwrap_or(f64::NAN)]);
        }
        rows
    }
}

fn main() {
    // `DG_BENCH_MMAP_THRESHOLD=default` leaves glibc's moving threshold (VmHWM then counts
    // freed blocks the heap keeps); a number fixes it (the default, 64 KiB).
    let threshold = std::env::var("DG_BENCH_MMAP_THRESHOLD").unwrap_or_else(|_| "65536".into());
    if let Ok(rank) = std::env::var("DG_BENCH_RANK") {
        let world = std::env::var("WORLD_SIZE").unwrap().parse().unwrap();
        let port = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
        let full = std::env::var("DG_BENCH_FULL").is_ok_and(|v| v == "true");
        let prefetch = std::env::var("DG_BENCH_PREFETCH").is_ok_and(|v| v == "true");
        rank_main(rank.parse().unwrap(), world, port, full, prefetch);
        return;
    }
    let steps: usize =
        std::env::var("DG_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    println!(
        "training state per rank, hidden 512, 2 + 8 blocks, Gloo, 1 thread/rank, glibc mmap \
         threshold {threshold}, median of {steps} interleaved micro-steps"
    );
    println!(
        "{:>11} {:>3} {:>8} {:>9} {:>9} {:>9} {:>11} {:>8} {:>10} {:>12}",
        "side",
        "N",
        "params",
        "base MiB",
        "load MiB",
        "peak MiB",
        "peak-base",
        "step s",
        "vs FSDP",
        "waited s"
    );
    let sides = [
        Side::Ours { full: false, prefetch: false },
        Side::Ours { full: true, prefetch: false },
        Side::Ours { full: true, prefetch: true },
        Side::Fsdp,
    ];
    for world in WORLDS {
        let mut groups: Vec<Group> =
            sides.iter().map(|&s| Group::start(s, world, &threshold)).collect();
        let mut samples = vec![Vec::new(); sides.len()];
        for turn in 0..=steps {
            for k in 0..groups.len() {
                let i = (turn + k) % groups.len();
                let t = groups[i].step();
                if turn > 0 {
                    samples[i].push(t);
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let times: Vec<f64> = samples.iter_mut().map(median).collect();
        for ((side, group), time) in sides.iter().zip(groups).zip(&times) {
            let rows = group.finish();
            let worst = |i: usize| rows.iter().map(|r| r[i]).fold(0.0, f64::max);
            let (params, base, loaded, peak) = (rows[0][0], worst(1), worst(2), worst(3));
            let waited = rows[0][4];
            let peak_base = rows.iter().map(|r| r[3] - r[1]).fold(0.0, f64::max);
            println!(
                "{:>11} {world:>3} {:>7.1}M {base:>9.1} {loaded:>9.1} {peak:>9.1} {peak_base:>11.1} \
                 {time:>8.3} {:>10.2} {}",
                side.name(),
                params / 1e6,
                time / times[3],
                if *side == Side::Fsdp { "-".to_string() } else { format!("{waited:>12.4}") },
            );
        }
    }
}
