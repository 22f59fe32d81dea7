//! The whole GRPO iteration on 2 ranks, sharded against unsharded: real coordinator and worker
//! processes over Gloo, the same job under three settings, in turns (BENCHMARKS.md, "Sharded
//! training state"):
//! - `none`: every rank holds the whole state; the gradient is all-reduced;
//! - `full, gather`: `fsdp_sharding_strategy = full`, the rollout gathering each block for
//!   each forward (the default);
//! - `full, replica`: the same with `rollout_weights = replica`.
//!
//! Run: `cargo bench -p dancegrpo-e2e --bench sharded_iteration --profile dev` after `cargo build --workspace
//! --bins` (the Makefile's environment). `DG_BENCH_ROUNDS` rounds (default 3); each runs every
//! setting once, the first setting rotating. The figure per setting is the median over rounds
//! of the per-iteration phase times, from `metrics.jsonl`, of iterations 2 and later (the first
//! pays the start-up); "job s" is the whole run, start-up included.

use std::time::Instant;

use dancegrpo_e2e::{read_bytes, train_n};

const JOB: &str = "job_name = \"bench\"\nmax_train_steps = 4\ngradient_checkpointing = true\n\
                   sampling_steps = 8\nh = 64\nw = 64\n";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize =
        std::env::var("DG_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let sides = [
        ("none", "fsdp_sharding_strategy = \"none\"\n"),
        ("full, gather", "fsdp_sharding_strategy = \"full\"\nrollout_weights = \"gather\"\n"),
        ("full, replica", "fsdp_sharding_strategy = \"full\"\nrollout_weights = \"replica\"\n"),
    ];
    // Per side: per round, [rollout, train, communication, iteration, job] seconds.
    let mut figures: Vec<Vec<[f64; 5]>> = vec![Vec::new(); sides.len()];
    for round in 0..rounds {
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            let start = Instant::now();
            let c = train_n(&format!("{JOB}{}", sides[i].1), 2);
            let job = start.elapsed().as_secs_f64();
            let text = String::from_utf8(read_bytes(&c.path("out/metrics.jsonl"))).unwrap();
            let mut per = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for line in text.lines().skip(1) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let t = |k: &str| v["timings_s"][k].as_f64().unwrap();
                let all =
                    t("rollout") + t("decode") + t("reward") + t("train") + t("communication");
                for (p, x) in
                    per.iter_mut().zip([t("rollout"), t("train"), t("communication"), all])
                {
                    p.push(x);
                }
            }
            let [r, tr, cm, all] = per.map(median);
            figures[i].push([r, tr, cm, all, job]);
        }
    }
    println!(
        "{:>14} {:>10} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "side", "rollout s", "train s", "comm s", "iteration s", "vs none", "job s"
    );
    let med = |i: usize, j: usize| median(figures[i].iter().map(|f| f[j]).collect());
    for (i, (name, _)) in sides.iter().enumerate() {
        println!(
            "{:>14} {:>10.3} {:>10.3} {:>10.3} {:>12.3} {:>10.2} {:>8.1}",
            name,
            med(i, 0),
            med(i, 1),
            med(i, 2),
            med(i, 3),
            med(i, 3) / med(0, 3),
            med(i, 4)
        );
    }
}
