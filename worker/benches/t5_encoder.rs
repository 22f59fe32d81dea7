//! T5 encoder speed against transformers' `T5EncoderModel`, same config (d_model 512, 4
//! layers, 8 heads × 64, d_ff 1024, gated-gelu, vocab 32128), same input (2 × 512 tokens),
//! same thread count, f32 on the CPU, in one run. Prints both medians and the ratio.
//!
//! `BENCH_THREADS=2 BENCH_ITERS=10 cargo bench -p dancegrpo-worker --bench t5_encoder`
//! (needs the reference venv's python on PATH: deploy/reference-venv.sh).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use dancegrpo_worker::text::t5::{T5Config, T5Encoder};
use dancegrpo_worker::text::weights::Weights;
use tch::{Device, Kind, Tensor};

fn main() {
    let threads: i32 =
        std::env::var("BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let iters: usize = std::env::var("BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/t5_peer.py");
    let out = Command::new("python")
        .arg(&peer)
        .arg(dir.path())
        .arg(threads.to_string())
        .arg(iters.to_string())
        .output()
        .expect("run python (the reference venv must be on PATH)");
    assert!(out.status.success(), "python peer failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    let py: serde_json::Value =
        serde_json::from_str(line.trim().lines().last().unwrap_or("")).expect("peer JSON");
    let py_ms = py["ms"].as_f64().expect("ms");

    tch::set_num_threads(threads);
    let cfg = T5Config::from_file(&dir.path().join("config.json")).expect("config");
    let w = Weights::load_dir(dir.path(), Kind::Float, Device::Cpu).expect("weights");
    let io = Tensor::read_safetensors(dir.path().join("io.safetensors")).expect("io");
    let get = |n: &str| io.iter().find(|(k, _)| k == n).expect(n).1.shallow_clone();
    // load_dir saw io.safetensors too; the encoder only asks for its own keys.
    let enc = T5Encoder::new(cfg, &w).expect("encoder");
    let ids = get("ids");
    let got = tch::no_grad(|| enc.forward(&ids)).expect("forward");
    let diff = (&got - get("out")).abs().max().double_value(&[]);
    assert!(diff < 1e-3, "outputs differ by {diff}");
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let _ = tch::no_grad(|| enc.forward(&ids)).expect("forward");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let rs_ms = times[times.len() / 2];
    println!(
        "T5 encoder (d512, 4 layers, 2x512 tokens, f32, {threads} threads, median of {iters}):"
    );
    println!(
        "  dancegrpo (tch): {rs_ms:.1} ms   transformers: {py_ms:.1} ms   ratio ours/theirs: {:.2}",
        rs_ms / py_ms
    );
    println!("  max |diff| of outputs: {diff:.2e}");
}
