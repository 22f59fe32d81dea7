//! All-reduce bandwidth of our c10d shim against Python's `torch.distributed` (Gloo, CPU),
//! side by side in one run: 1, 16 and 64 MiB of f32 and bf16 over 2 and 4 local processes.
//!
//! Run: `cargo bench -p dancegrpo-worker --bench allreduce` with the project venv's python on
//! PATH (the Makefile's environment). Both sides use one intra-op thread, Gloo's default two
//! threads, loopback, and time one all-reduce between barriers; the figure is the median, best
//! of `DG_BENCH_ROUNDS` (default 2) alternating rounds, which damps noise from a shared machine.
//! Bandwidth is algorithm bandwidth: bytes of the tensor per second.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dancegrpo_proto::{RankAssignment, StoreAddress};
use dancegrpo_worker::dist::{Backend, GroupOptions, ProcessGroup, ReduceOp};
use serde_json::{Value, json};
use tch::{Kind, Tensor};

const WORLDS: [u32; 2] = [2, 4];
const DTYPES: [&str; 2] = ["f32", "bf16"];

/// (MiB, warmup, timed iterations).
const SIZES: [(u64, u32, u32); 3] = [(1, 3, 15), (16, 2, 7), (64, 1, 5)];

fn spec() -> Value {
    let mut cases = Vec::new();
    for dtype in DTYPES {
        for (mib, warmup, iters) in SIZES {
            cases.push(json!({"dtype": dtype, "mib": mib, "warmup": warmup, "iters": iters}));
        }
    }
    Value::Array(cases)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Which implementation a run measures.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// Our shim, with or without the per-op fingerprint check (`GroupOptions::verify`).
    Ours { verify: bool },
    /// torch.distributed from Python.
    Torch,
}

/// One rank of our side: the same loop as allreduce_peer.py.
fn rank_main(rank: u32, world: u32, port: u16, verify: bool) {
    tch::set_num_threads(1);
    let a = RankAssignment {
        rank,
        world_size: world,
        generation: 1,
        store: StoreAddress { host: "127.0.0.1".into(), port, prefix: "bench/".into() },
    };
    let opts = GroupOptions::default().with_timeout(Duration::from_secs(120)).with_verify(verify);
    let mut pg = ProcessGroup::from_assignment(&a, Backend::Gloo, &opts).unwrap();
    for case in spec().as_array().unwrap() {
        let kind = if case["dtype"] == "f32" { Kind::Float } else { Kind::BFloat16 };
        let bytes = case["mib"].as_i64().unwrap() * 1024 * 1024;
        let n = bytes / kind.elt_size_in_bytes() as i64;
        let mut t = Tensor::zeros([n], (kind, tch::Device::Cpu));
        for _ in 0..case["warmup"].as_u64().unwrap() {
            pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        }
        let mut times = Vec::new();
        for _ in 0..case["iters"].as_u64().unwrap() {
            pg.barrier().unwrap();
            let t0 = Instant::now();
            pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        if rank == 0 {
            let mut out = case.clone();
            out["median_s"] = json!(times[times.len() / 2]);
            println!("{out}");
        }
    }
}

/// Runs `world` processes of one side and returns rank 0's JSON lines.
fn run_side(side: Side, world: u32) -> Vec<Value> {
    let port = free_port();
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/allreduce_peer.py");
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
    let children: Vec<_> = (0..world)
        .map(|r| {
            let mut c = if let Side::Ours { verify } = side {
                let mut c = Command::new(std::env::current_exe().unwrap());
                c.env("DG_BENCH_RANK", r.to_string()).env("DG_BENCH_VERIFY", verify.to_string());
                c
            } else {
                let mut c = Command::new(&python);
                c.arg(peer).arg(spec().to_string()).env("RANK", r.to_string());
                c
            };
            c.env("WORLD_SIZE", world.to_string())
                .env("MASTER_PORT", port.to_string())
                // torch's Gloo would otherwise bind to the hostname's address; ours binds
                // 127.0.0.1 for a loopback store. Same interface on both sides.
                .env("GLOO_SOCKET_IFNAME", "lo")
                .env("OMP_NUM_THREADS", "1")
                .stdout(if r == 0 { Stdio::piped() } else { Stdio::null() })
                .spawn()
                .expect("spawn a rank (is the venv's python on PATH?)")
        })
        .collect();
    let mut lines = Vec::new();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r} of a side failed");
        if r == 0 {
            lines = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        }
    }
    lines
}

fn main() {
    if let Ok(rank) = std::env::var("DG_BENCH_RANK") {
        let world = std::env::var("WORLD_SIZE").unwrap().parse().unwrap();
        let port = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
        let verify = std::env::var("DG_BENCH_VERIFY").map(|v| v == "true").unwrap_or(true);
        rank_main(rank.parse().unwrap(), world, port, verify);
        return;
    }
    let rounds: usize =
        std::env::var("DG_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(2);
    println!(
        "all-reduce (Gloo, CPU, loopback), algbw = tensor bytes / median time, best of {rounds} rounds"
    );
    println!(
        "ours = default GroupOptions (verify on); raw = verify off (no fingerprint all-gather)"
    );
    println!(
        "{:>5} {:>5} {:>4} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "world", "dtype", "MiB", "ours GB/s", "raw GB/s", "torch GB/s", "ours/torch", "raw/torch"
    );
    for world in WORLDS {
        let n = spec().as_array().unwrap().len();
        let mut ours = vec![f64::INFINITY; n];
        let mut raw = vec![f64::INFINITY; n];
        let mut theirs = vec![f64::INFINITY; n];
        for _ in 0..rounds {
            let sides = [
                (Side::Ours { verify: true }, &mut ours),
                (Side::Ours { verify: false }, &mut raw),
                (Side::Torch, &mut theirs),
            ];
            for (side, best) in sides {
                let lines = run_side(side, world);
                assert_eq!(lines.len(), n, "a side printed {} of {n} results", lines.len());
                for (b, l) in best.iter_mut().zip(&lines) {
                    *b = b.min(l["median_s"].as_f64().unwrap());
                }
            }
        }
        for (i, case) in spec().as_array().unwrap().iter().enumerate() {
            let bytes = (case["mib"].as_u64().unwrap() * 1024 * 1024) as f64;
            let gbs = |s: f64| bytes / s / 1e9;
            let (o, w, t) = (gbs(ours[i]), gbs(raw[i]), gbs(theirs[i]));
            println!(
                "{world:>5} {:>5} {:>4} {o:>10.3} {w:>10.3} {t:>10.3} {:>10.3} {:>9.3}",
                case["dtype"].as_str().unwrap(),
                case["mib"].as_u64().unwrap(),
                o / t,
                w / t
            );
        }
    }
}
