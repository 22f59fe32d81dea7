//! Per-rank peak memory and time of a training micro-step, sharded (`fsdp_sharding_strategy =
//! full`) against unsharded, on N = 1, 2 and 4 local ranks over Gloo: the figures part 2's
//! memory planner is held against (BENCHMARKS.md, "Sharded training state").
//!
//! Run: `cargo bench -p dancegrpo-worker --bench shard_memory --profile dev` (the Makefile's
//! environment). Each rank is a process of its own, so VmHWM is that rank's peak alone. A rank
//! builds a mid-size FLUX-shaped transformer with seeded random weights (the trainer's path from
//! there on: `Sharded::cut` or the plain optimizer, the checkpointed forward and backward,
//! `apply_sharded_update` or `apply_update`), trains `DG_BENCH_STEPS` micro-steps (default 4),
//! each followed by an optimizer step, then gathers the rollout replica back as the trainer
//! does after an update. One intra-op thread per rank.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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

fn rank_main(rank: u32, world: u32, port: u16, full: bool, steps: usize) {
    tch::set_num_threads(1);
    let a = RankAssignment {
        rank,
        world_size: world,
        generation: 1,
        store: StoreAddress { host: "127.0.0.1".into(), port, prefix: "bench/".into() },
    };
    let opts = GroupOptions::default().with_timeout(Duration::from_secs(600));
    let mut group = ProcessGroup::from_assignment(&a, Backend::Gloo, &opts).unwrap();
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
        let (s, masters) = Sharded::cut(&trainable, rank, world).unwrap();
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
    }
    let mut stats = UpdateStats::default();
    let mut times = Vec::new();
    for _ in 0..steps {
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
        times.push(start.elapsed().as_secs_f64());
    }
    if let Some(s) = &mut shard {
        s.gather_all(&opt, Some(&mut group)).unwrap();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{rank} {params} {loaded:.1} {:.1} {:.3} {}",
        vm_hwm_mib(),
        times[times.len() / 2],
        stats.optimizer_steps
    );
}

fn main() {
    // `DG_BENCH_MMAP_THRESHOLD=default` leaves glibc's moving threshold (faster, but VmHWM
    // then counts freed blocks the heap keeps); a number fixes it (the default, 64 KiB).
    let threshold = std::env::var("DG_BENCH_MMAP_THRESHOLD").unwrap_or_else(|_| "65536".into());
    if let Ok(rank) = std::env::var("DG_BENCH_RANK") {
        let world = std::env::var("WORLD_SIZE").unwrap().parse().unwrap();
        let port = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
        let full = std::env::var("DG_BENCH_FULL").is_ok_and(|v| v == "true");
        let steps = std::env::var("DG_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
        rank_main(rank.parse().unwrap(), world, port, full, steps);
        return;
    }
    println!(
        "sharded vs unsharded training state, hidden 512, 2 + 8 blocks, Gloo, 1 thread/rank, \
         glibc mmap threshold {threshold}"
    );
    println!(
        "{:>8} {:>3} {:>10} {:>14} {:>14} {:>12} {:>16}",
        "strategy", "N", "params", "loaded MiB", "peak MiB", "step s", "state MiB (16P/N)"
    );
    for full in [false, true] {
        for world in WORLDS {
            let port = free_port();
            let children: Vec<_> = (0..world)
                .map(|r| {
                    Command::new(std::env::current_exe().unwrap())
                        .env("DG_BENCH_RANK", r.to_string())
                        .env("DG_BENCH_FULL", full.to_string())
                        .env("WORLD_SIZE", world.to_string())
                        .env("MASTER_PORT", port.to_string())
                        .env("GLOO_SOCKET_IFNAME", "lo")
                        .env("OMP_NUM_THREADS", "1")
                        // A fixed mmap threshold: glibc's moving one keeps freed blocks in the
                        // heap, and VmHWM would then count what the allocator holds, not uses.
                        .envs(
                            (threshold != "default")
                                .then_some(("MALLOC_MMAP_THRESHOLD_", threshold.as_str())),
                        )
                        .stdout(Stdio::piped())
                        .spawn()
                        .expect("spawn a rank")
                })
                .collect();
            let mut rows = Vec::new();
            for mut c in children {
                let out = BufReader::new(c.stdout.take().unwrap());
                let line = out.lines().next().expect("a rank's report").unwrap();
                assert!(c.wait().unwrap().success(), "a rank failed");
                rows.push(line.split_whitespace().map(str::to_string).collect::<Vec<_>>());
            }
            let num = |r: &Vec<String>, i: usize| r[i].parse::<f64>().unwrap();
            let params = num(&rows[0], 1);
            let loaded = rows.iter().map(|r| num(r, 2)).fold(0.0, f64::max);
            let peak = rows.iter().map(|r| num(r, 3)).fold(0.0, f64::max);
            let step = num(&rows[0], 4);
            let n = if full { f64::from(world) } else { 1.0 };
            let state = 16.0 * params / n / (1u64 << 20) as f64;
            let name = if full { "full" } else { "none" };
            println!(
                "{name:>8} {world:>3} {:>9.1}M {loaded:>14.1} {peak:>14.1} {step:>12.3} {state:>16.1}",
                params / 1e6
            );
        }
    }
}
