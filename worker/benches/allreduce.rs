//! All-reduce bandwidth of our c10d shim against Python's `torch.distributed` (Gloo, CPU),
//! side by side in one run: 1, 16 and 64 MiB of f32 and bf16 over 2 and 4 local processes;
//! and the sharded trainer's two collectives, the all-gather into a flat buffer and the
//! reduce-scatter out of one (`all_gather_into_tensor` / `reduce_scatter_tensor` in torch), at
//! 16 and 64 MiB of the full buffer.
//!
//! Run: `cargo bench -p dancegrpo-worker --bench allreduce` with the project venv's python on
//! PATH (the Makefile's environment). Both sides use one intra-op thread, Gloo's default two
//! threads and loopback.
//!
//! The sides' process groups are all up at once and take turns: the driver asks one side for
//! one all-reduce (timed by its rank 0 between barriers), then the next side, rotating who
//! goes first. A side that is not asked sleeps on its stdin, so the turns do not disturb each
//! other, and every sample of ours has a sample of torch's taken a moment apart. On a shared
//! machine that pairs away the drift in load that timing one side after the other measures
//! instead. The figure per side is the median over `DG_BENCH_ITERS` turns (default 30).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use dancegrpo_proto::{RankAssignment, StoreAddress};
use dancegrpo_worker::dist::{Backend, GroupOptions, ProcessGroup, ReduceOp};
use tch::{Kind, Tensor};

const WORLDS: [u32; 2] = [2, 4];
/// (op, dtype, MiB of the full buffer): the cases, numbered in this order on both sides.
const CASES: [(&str, &str, i64); 11] = [
    ("all_reduce", "f32", 1),
    ("all_reduce", "f32", 16),
    ("all_reduce", "f32", 64),
    ("all_reduce", "bf16", 1),
    ("all_reduce", "bf16", 16),
    ("all_reduce", "bf16", 64),
    ("all_gather", "f32", 16),
    ("all_gather", "f32", 64),
    ("all_gather", "bf16", 64),
    ("reduce_scatter", "f32", 16),
    ("reduce_scatter", "f32", 64),
];
const WARMUP: usize = 2;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Which implementation a side runs.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// Our shim, with or without the per-op fingerprint check (`GroupOptions::verify`).
    Ours { verify: bool },
    /// torch.distributed from Python.
    Torch,
}

/// One rank of our side: the same protocol as allreduce_peer.py. Each stdin line is a case
/// number; rank 0 answers with the seconds one all-reduce of it took.
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
    // Per case: the full buffer, and the one rank's part of it for the gather and scatter.
    let mut tensors: Vec<(Tensor, Tensor)> = CASES
        .iter()
        .map(|&(_, dtype, mib)| {
            let kind = if dtype == "f32" { Kind::Float } else { Kind::BFloat16 };
            let n = mib * 1024 * 1024 / kind.elt_size_in_bytes() as i64;
            let part = n / i64::from(world);
            let full = Tensor::zeros([part * i64::from(world)], (kind, tch::Device::Cpu));
            (full, Tensor::zeros([part], (kind, tch::Device::Cpu)))
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let case: usize = line.unwrap().trim().parse().unwrap();
        let (full, part) = &mut tensors[case];
        pg.barrier().unwrap();
        let t0 = Instant::now();
        match CASES[case].0 {
            "all_reduce" => pg.all_reduce(full, ReduceOp::Sum).unwrap(),
            "all_gather" => pg.all_gather_into(full, part).unwrap(),
            _ => pg.reduce_scatter(part, full, ReduceOp::Sum).unwrap(),
        }
        let s = t0.elapsed().as_secs_f64();
        if rank == 0 {
            writeln!(out, "{s}").unwrap();
            out.flush().unwrap();
        }
    }
}

/// The running processes of one side.
struct Group {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rank0: BufReader<ChildStdout>,
}

impl Group {
    fn start(side: Side, world: u32) -> Group {
        let port = free_port();
        let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/allreduce_peer.py");
        let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
        let cases = CASES.map(|(o, d, m)| format!("{o}:{d}:{m}")).join(",");
        let mut children: Vec<Child> = (0..world)
            .map(|r| {
                let mut c = if let Side::Ours { verify } = side {
                    let mut c = Command::new(std::env::current_exe().unwrap());
                    c.env("DG_BENCH_RANK", r.to_string())
                        .env("DG_BENCH_VERIFY", verify.to_string());
                    c
                } else {
                    let mut c = Command::new(&python);
                    c.arg(peer).arg(&cases).env("RANK", r.to_string());
                    c
                };
                c.env("WORLD_SIZE", world.to_string())
                    .env("MASTER_PORT", port.to_string())
                    // torch's Gloo would otherwise bind to the hostname's address; ours binds
                    // 127.0.0.1 for a loopback store. Same interface on both sides.
                    .env("GLOO_SOCKET_IFNAME", "lo")
                    .env("OMP_NUM_THREADS", "1")
                    .stdin(Stdio::piped())
                    .stdout(if r == 0 { Stdio::piped() } else { Stdio::null() })
                    .spawn()
                    .expect("spawn a rank (is the venv's python on PATH?)")
            })
            .collect();
        let stdins = children.iter_mut().map(|c| c.stdin.take().unwrap()).collect();
        let rank0 = BufReader::new(children[0].stdout.take().unwrap());
        Group { children, stdins, rank0 }
    }

    /// Seconds of one all-reduce of `case`, as rank 0 timed it.
    fn time(&mut self, case: usize) -> f64 {
        for s in &mut self.stdins {
            writeln!(s, "{case}").unwrap();
            s.flush().unwrap();
        }
        let mut line = String::new();
        self.rank0.read_line(&mut line).unwrap();
        line.trim().parse().unwrap_or_else(|_| panic!("a rank failed (it printed {line:?})"))
    }

    fn finish(self) {
        drop(self.stdins);
        for (r, mut c) in self.children.into_iter().enumerate() {
            assert!(c.wait().unwrap().success(), "rank {r} of a side failed");
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Ok(rank) = std::env::var("DG_BENCH_RANK") {
        let world = std::env::var("WORLD_SIZE").unwrap().parse().unwrap();
        let port = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
        let verify = std::env::var("DG_BENCH_VERIFY").is_ok_and(|v| v == "true");
        rank_main(rank.parse().unwrap(), world, port, verify);
        return;
    }
    let iters: usize =
        std::env::var("DG_BENCH_ITERS").ok().and_then(|r| r.parse().ok()).unwrap_or(30);
    println!(
        "all-reduce (Gloo, CPU, loopback), algbw = tensor bytes / median of {iters} interleaved turns"
    );
    println!(
        "ours = default GroupOptions (ranks agree on op/dtype/size first); unchecked = with_verify(false)"
    );
    println!(
        "{:>14} {:>5} {:>5} {:>4} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "op",
        "world",
        "dtype",
        "MiB",
        "ours GB/s",
        "torch GB/s",
        "ours/torch",
        "unchecked",
        "unch/torch"
    );
    for world in WORLDS {
        let sides = [Side::Ours { verify: true }, Side::Ours { verify: false }, Side::Torch];
        let mut groups: Vec<Group> = sides.iter().map(|&s| Group::start(s, world)).collect();
        for (case, (op, dtype, mib)) in CASES.iter().enumerate() {
            let mut samples = vec![Vec::new(); sides.len()];
            for turn in 0..WARMUP + iters {
                for k in 0..sides.len() {
                    let i = (turn + k) % sides.len();
                    let s = groups[i].time(case);
                    if turn >= WARMUP {
                        samples[i].push(s);
                    }
                }
            }
            let bytes = (mib * 1024 * 1024) as f64;
            let [o, c, t] = [0, 1, 2].map(|i| bytes / median(samples[i].clone()) / 1e9);
            println!(
                "{op:>14} {world:>5} {dtype:>5} {mib:>4} {o:>10.3} {t:>10.3} {:>10.3} {c:>10.3} {:>9.3}",
                o / t,
                c / t
            );
        }
        groups.into_iter().for_each(Group::finish);
    }
}
