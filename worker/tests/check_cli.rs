//! The real `dancegrpo-worker check …` binary on the tiny golden models, in both transformer
//! layouts, compared with the diffusers goldens.

mod flux_common;
mod numerics;

use std::path::Path;
use std::process::Command;

use dancegrpo_worker::flux::weights::SafetensorsFile;
use flux_common::{
    BF16_FORWARD_REL, F32_FORWARD_REL, SDE_STEP_REL, golden, golden_dir, max_abs, rel_err,
};
use tch::Tensor;

fn check(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo-worker")).arg("check").args(args).output().unwrap()
}

fn ok(args: &[&str]) {
    let o = check(args);
    assert!(o.status.success(), "check {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn read(p: &Path) -> std::collections::BTreeMap<String, Tensor> {
    SafetensorsFile::open(p).unwrap().read_all().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `flux-forward` on the diffusers folder and on a folder holding the BFL file + config.json:
/// both match the diffusers output within 1e-4 of its scale.
#[test]
fn flux_forward_both_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let bfl_dir = tmp.path().join("bfl");
    std::fs::create_dir(&bfl_dir).unwrap();
    std::fs::copy(
        golden_dir().join("tiny/flux-bfl.safetensors"),
        bfl_dir.join("flux1-tiny.safetensors"),
    )
    .unwrap();
    std::fs::copy(golden_dir().join("tiny/transformer/config.json"), bfl_dir.join("config.json"))
        .unwrap();
    let inputs = golden_dir().join("forward_f32.safetensors");
    let want = &golden("forward_f32.safetensors")["output"];
    for (name, dir) in [("diffusers", golden_dir().join("tiny/transformer")), ("bfl", bfl_dir)] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        ok(&["flux-forward", "--model-dir", s(&dir), "--inputs", s(&inputs), "--out", s(&out)]);
        let e = rel_err(&read(&out)["output"], want);
        assert!(e <= F32_FORWARD_REL, "{name}: relative error {e}");
    }
    // bf16 runs too (tolerance as in flux_parity.rs).
    let out = tmp.path().join("bf16.safetensors");
    let bf_inputs = golden_dir().join("forward_bf16.safetensors");
    ok(&[
        "flux-forward",
        "--model-dir",
        s(&golden_dir().join("tiny")),
        "--inputs",
        s(&bf_inputs),
        "--out",
        s(&out),
        "--dtype",
        "bf16",
    ]);
    let e = rel_err(&read(&out)["output"], &golden("forward_bf16.safetensors")["output"]);
    assert!(e <= BF16_FORWARD_REL, "bf16: relative error {e}");
}

#[test]
fn vae_decode_and_sde_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vae.safetensors");
    let inputs = golden_dir().join("vae_decode.safetensors");
    let vae = golden_dir().join("tiny/vae");
    ok(&[
        "vae-decode",
        "--model-dir",
        s(&vae),
        "--inputs",
        s(&inputs),
        "--out",
        s(&out),
        "--height",
        "48",
        "--width",
        "80",
    ]);
    let got = read(&out);
    let g = golden("vae_decode.safetensors");
    assert!(rel_err(&got["image"], &g["image"]) <= F32_FORWARD_REL);
    assert!(max_abs(&got["image_u8"], &g["image_u8"]) <= 1.0);

    // sde-step on step 7 of the 16-step golden.
    let g = golden("sde_step.safetensors");
    let inp = tmp.path().join("sde_in.safetensors");
    let t: Vec<(String, Tensor)> = ["v_7", "x_7", "noise_7", "sigmas"]
        .iter()
        .map(|k| (k.trim_end_matches("_7").to_string(), g[*k].shallow_clone()))
        .collect();
    Tensor::write_safetensors(&t, &inp).unwrap();
    let out = tmp.path().join("sde_out.safetensors");
    ok(&["sde-step", "--inputs", s(&inp), "--out", s(&out), "--step", "7", "--eta", "0.3"]);
    let got = read(&out);
    for k in ["mean", "next", "x0"] {
        assert!(rel_err(&got[k], &g[&format!("{k}_7")]) <= SDE_STEP_REL, "{k}");
    }
    assert!(rel_err(&got["log_prob"], &g["logp_7"]) <= SDE_STEP_REL);
}

/// Bad input: a clear message naming the missing tensor and a failing exit status.
#[test]
fn missing_input_tensor_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in.safetensors");
    let g = golden("forward_f32.safetensors");
    let t: Vec<(String, Tensor)> = g
        .iter()
        .filter(|(k, _)| *k != "img_ids")
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&t, &inp).unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = check(&[
        "flux-forward",
        "--model-dir",
        s(&golden_dir().join("tiny/transformer")),
        "--inputs",
        s(&inp),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no tensor \"img_ids\""), "{err}");
    // --help documents the tensor names.
    let help = check(&["flux-forward", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    for name in [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "guidance",
        "img_ids",
        "txt_ids",
    ] {
        assert!(help.contains(name), "--help lacks {name}");
    }
}
