//! The real `dancegrpo-worker` binary's HPS commands on the tiny golden HPS model:
//! `check hps-score`, `check tokenize` and `convert`.

mod numerics;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dancegrpo_worker::flux::weights::SafetensorsFile;

fn worker(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_dancegrpo-worker")).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn tiny_hps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/hps/tiny_hps")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn hps_score_matches_open_clip() {
    let dir = tiny_hps();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("scores.json");
    worker(&[
        "check",
        "hps-score",
        "--model-dir",
        s(&dir),
        "--images",
        s(&dir.join("images.safetensors")),
        "--prompts",
        s(&dir.join("prompts.txt")),
        "--out",
        s(&out),
    ]);
    let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected_scores.json")).unwrap()).unwrap();
    let (got, want) = (got["scores"].as_array().unwrap(), want["scores"].as_array().unwrap());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
        // f32 CLIP towers vs open_clip's f32, the bound of hps_parity.rs's scores (whose comment
        // gives the model): the features are unit vectors within 1e-4 elementwise, observed
        // ~1e-6, and a score is their dot product.
        assert!((g - w).abs() <= 1e-4, "score {g} vs open_clip {w}");
    }
}

#[test]
fn tokenize_prints_77_ids_per_prompt() {
    let dir = tiny_hps();
    let o = worker(&[
        "check",
        "tokenize",
        "--vocab",
        s(&dir.join("bpe_simple_vocab_16e6.txt.gz")),
        "--prompts",
        s(&dir.join("prompts.txt")),
    ]);
    let prompts = std::fs::read_to_string(dir.join("prompts.txt")).unwrap();
    let lines: Vec<Vec<i64>> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), prompts.lines().count());
    for ids in &lines {
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], 49406, "starts with <start_of_text>");
        assert!(ids.contains(&49407), "holds <end_of_text>");
    }
}

#[test]
fn convert_writes_the_same_tensors_as_safetensors() {
    let dir = tiny_hps();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hps.safetensors");
    worker(&["convert", "--input", s(&dir.join("HPS_v2.1_compressed.pt")), "--output", s(&out)]);
    let ours = SafetensorsFile::open(&out).unwrap().read_all().unwrap();
    let golden = SafetensorsFile::open(dir.join("HPS_v2.1_compressed.safetensors"))
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), golden.keys().collect::<Vec<_>>());
    for (k, t) in &ours {
        assert!(t.equal(&golden[k]), "{k} differs");
    }
}
