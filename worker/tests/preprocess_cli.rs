//! The real binary: `preprocess` (single and two ranks, resume, merge), `dataset inspect` on
//! both layouts, and `check encode-prompts`, on the tiny golden model.

mod numerics;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dancegrpo_worker::data;
use tch::{Kind, Tensor};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/text")
}

fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dancegrpo-worker"));
    c.args(args).env_remove("RANK").env_remove("WORLD_SIZE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "failed: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn expected(name: &str) -> Tensor {
    let all = Tensor::read_safetensors(golden().join("encoded.safetensors")).unwrap();
    all.into_iter().find(|(n, _)| n == name).unwrap().1
}

/// Golden prompts 0..3 (non-empty ones) as a prompts file, plus a CJK line that is dropped.
fn prompts_file(dir: &Path) -> (PathBuf, Vec<String>) {
    let ps: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("prompts.json")).unwrap())
            .unwrap();
    let keep: Vec<String> = ps[..2].to_vec();
    let text = format!("{}\n只有中文\n{}\n{}\n", keep[0], keep[1], keep[0]);
    let f = dir.join("prompts.txt");
    std::fs::write(&f, text).unwrap();
    (f, vec![keep[0].clone(), keep[1].clone(), keep[0].clone()])
}

fn pre_args<'a>(model: &'a str, prompts: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "preprocess",
        "--model-dir",
        model,
        "--prompts",
        prompts,
        "--out",
        out,
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--dtype",
        "f32",
        "--quiet",
    ]
}

/// Ours against transformers' encoders, both in f32, absolute (outputs are O(1)): the same bound
/// as `text_parity.rs`, whose comment gives the error model.
const F32_ABS: f64 = 1e-4;

#[test]
fn preprocess_then_inspect_resume_and_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let (prompts, captions) = prompts_file(tmp.path());
    let model = golden().join("model");
    let (m, p) = (model.to_str().unwrap(), prompts.to_str().unwrap());

    // Two ranks: rank 1 alone leaves no manifest; rank 0 then finds every shard and writes it.
    let out = tmp.path().join("ranks");
    let o = out.to_str().unwrap();
    let s = ok(&worker(&pre_args(m, p, o), &[("RANK", "1"), ("WORLD_SIZE", "2")]));
    assert!(s.contains("wrote 1") && s.contains("manifest not written"), "{s}");
    assert!(!out.join("manifest.json").exists());
    let s = ok(&worker(&pre_args(m, p, o), &[("RANK", "0"), ("WORLD_SIZE", "2")]));
    assert!(s.contains("wrote 1") && s.contains("manifest written"), "{s}");

    let ds = data::open(&out).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.spec().prompt_embeds_shape, vec![512, 32]);
    assert_eq!(ds.spec().kind, Kind::BFloat16);
    let (pe, pooled) = (expected("prompt_embeds"), expected("pooled_prompt_embeds"));
    for (i, golden_row) in [0i64, 1, 0].into_iter().enumerate() {
        let it = ds.get(i).unwrap();
        assert_eq!(it.caption, captions[i]);
        // Computed in f32 (within F32_ABS of the f32 golden, as `encode-prompts` below), then
        // rounded to bf16 once: |bf16(x) − x| ≤ 2^-8·|x| (8 significant bits, round to
        // nearest). So elementwise |got − want| ≤ 2^-8·(|want| + F32_ABS) + F32_ABS, against the
        // golden in f32. Rounding the golden to bf16 as well and comparing the two roundings
        // is not a bound: an f32 difference of one ulp across a bf16 rounding boundary moves
        // one side by a whole bf16 ulp (0.015625 in [2, 4), seen on an AVX-512 machine).
        for (got, want) in [
            (&it.prompt_embeds, pe.get(golden_row)),
            (&it.pooled_prompt_embeds, pooled.get(golden_row)),
        ] {
            let got = got.to_kind(Kind::Double);
            let want = want.to_kind(Kind::Double);
            let bound = (want.abs() + F32_ABS) * 2f64.powi(-8) + F32_ABS;
            let excess = ((&got - &want).abs() - &bound).max().double_value(&[]);
            let d = (&got - &want).abs().max().double_value(&[]);
            assert!(excess <= 0.0, "item {i}: max |Δ| {d}, {excess} beyond bf16 rounding");
        }
    }

    // inspect: counts, shapes, captions.
    let s = ok(&worker(&["dataset", "inspect", o], &[]));
    assert!(s.contains("prompts: 3") && s.contains("[512, 32]") && s.contains("ok"), "{s}");

    // Resume: a re-run skips both shards and leaves the manifest; a lost shard is redone.
    let s = ok(&worker(&pre_args(m, p, o), &[]));
    assert!(s.contains("wrote 0, skipped 2"), "{s}");
    std::fs::remove_file(out.join("shard-00001.safetensors")).unwrap();
    let s = ok(&worker(&pre_args(m, p, o), &[]));
    assert!(s.contains("wrote 1, skipped 1"), "{s}");

    // A truncated shard: inspect fails naming the file.
    let f = out.join("shard-00000.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let o2 = worker(&["dataset", "inspect", o], &[]);
    assert!(!o2.status.success());
    let err = String::from_utf8_lossy(&o2.stderr);
    assert!(err.contains("shard-00000.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn merge_refuses_while_shards_are_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let (prompts, _) = prompts_file(tmp.path());
    let model = golden().join("model");
    let out = tmp.path().join("out");
    let (m, p, o) = (model.to_str().unwrap(), prompts.to_str().unwrap(), out.to_str().unwrap());
    ok(&worker(&pre_args(m, p, o), &[("RANK", "1"), ("WORLD_SIZE", "2")]));
    let mut args = pre_args(m, p, o);
    args.push("--merge");
    let r = worker(&args, &[]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("1 of 2 shards not finished: shard-00000.safetensors"), "{err}");
    assert!(!out.join("manifest.json").exists());
}

#[test]
fn inspect_reads_the_reference_layout() {
    let d = golden().join("ref_layout");
    let s = ok(&worker(&["dataset", "inspect", d.to_str().unwrap()], &[]));
    assert!(s.contains("reference") && s.contains("prompts: 3") && s.contains("BFloat16"), "{s}");
    assert!(s.contains("caption[0]: A photo of an astronaut"), "{s}");
}

#[test]
fn check_encode_prompts_matches_the_goldens() {
    let tmp = tempfile::tempdir().unwrap();
    let ps: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("prompts.json")).unwrap())
            .unwrap();
    // The non-empty golden prompts (a prompts file cannot hold blank lines).
    let f = tmp.path().join("p.txt");
    std::fs::write(&f, format!("{}\n{}\n{}\n", ps[0], ps[1], ps[2])).unwrap();
    let out = tmp.path().join("out.safetensors");
    let model = golden().join("model");
    ok(&worker(
        &[
            "check",
            "encode-prompts",
            "--model-dir",
            model.to_str().unwrap(),
            "--prompts",
            f.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "f32",
        ],
        &[],
    ));
    let got = Tensor::read_safetensors(&out).unwrap();
    for name in ["prompt_embeds", "pooled_prompt_embeds"] {
        let g = &got.iter().find(|(n, _)| n == name).unwrap().1;
        let want = expected(name).narrow(0, 0, 3);
        assert_eq!(g.size(), want.size());
        let d = (g - &want).abs().max().double_value(&[]);
        assert!(d <= F32_ABS, "{name}: {d}");
    }
}

#[test]
fn a_prompts_file_with_a_blank_line_is_refused_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("p.txt");
    std::fs::write(&f, "one\n\nthree\n").unwrap();
    let model = golden().join("model");
    let out = tmp.path().join("out");
    let r =
        worker(&pre_args(model.to_str().unwrap(), f.to_str().unwrap(), out.to_str().unwrap()), &[]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("p.txt:2: blank line"), "{err}");
}
