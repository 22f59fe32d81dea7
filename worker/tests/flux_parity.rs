//! Parity of the FLUX transformer with diffusers 0.42.1 on a tiny config (goldens from
//! `tests/golden/flux/make_goldens.py`), in both weight layouts, f32 and bf16.

mod flux_common;
mod numerics;

use std::collections::BTreeMap;

use dancegrpo_worker::flux::load::{Layout, detect_layout};
use dancegrpo_worker::flux::{FluxInputs, LoadedFlux, WeightPolicy, load_flux};
use flux_common::{BF16_FORWARD_REL, F32_FORWARD_REL, golden, golden_dir, rel_err};
use tch::{Device, Kind, Tensor};

fn run(m: &LoadedFlux, g: &BTreeMap<String, Tensor>) -> Tensor {
    let inp = FluxInputs {
        hidden_states: &g["hidden_states"],
        encoder_hidden_states: &g["encoder_hidden_states"],
        pooled_projections: &g["pooled_projections"],
        timestep: &g["timestep"],
        guidance: Some(&g["guidance"]),
        img_ids: &g["img_ids"],
        txt_ids: &g["txt_ids"],
    };
    tch::no_grad(|| m.model.forward(&inp)).unwrap()
}

fn diffusers() -> LoadedFlux {
    load_flux(
        &golden_dir().join("tiny/transformer"),
        Device::Cpu,
        WeightPolicy::Frozen(Kind::Float),
    )
    .unwrap()
}

/// f32, batch 2, 48×80 px (non-square), diffusers sharded layout: ≤ 1e-4 of the output scale.
#[test]
fn forward_f32_matches_diffusers() {
    let m = diffusers();
    for name in ["forward_f32.safetensors", "forward_f32_sq.safetensors"] {
        let g = golden(name);
        let out = run(&m, &g);
        assert_eq!(out.kind(), Kind::Float);
        let e = rel_err(&out, &g["output"]);
        assert!(e <= F32_FORWARD_REL, "{name}: relative max error {e}");
    }
}

/// The BFL single file (fused qkv / linear1, swapped final modulation, prefixed keys) gives the
/// same numbers as the diffusers folder.
#[test]
fn bfl_layout_matches_diffusers() {
    let path = golden_dir().join("tiny/flux-bfl.safetensors");
    assert!(matches!(detect_layout(&path).unwrap(), Layout::Bfl(_)));
    // Without a config.json next to it a BFL file's config is inferred from its shapes, which
    // cannot give the tiny RoPE split: pass the tiny config explicitly.
    let cfg = dancegrpo_worker::flux::FluxConfig::from_file(
        &golden_dir().join("tiny/transformer/config.json"),
    )
    .unwrap();
    let m = dancegrpo_worker::flux::load::load_flux_with(
        &Layout::Bfl(path),
        &cfg,
        Device::Cpu,
        WeightPolicy::Frozen(Kind::Float),
    )
    .unwrap();
    let g = golden("forward_f32.safetensors");
    let e = rel_err(&run(&m, &g), &g["output"]);
    assert!(e <= F32_FORWARD_REL, "relative max error {e}");
    let d = diffusers();
    let same = run(&m, &g).equal(&run(&d, &g));
    assert!(same, "BFL and diffusers layouts must load identical numbers");
}

/// bf16 weights and activations against diffusers' `model.to(bfloat16)`.
///
/// Tolerance 2e-2 of the output scale: bf16 has an 8-bit mantissa (relative rounding 2^-9 ≈
/// 2e-3 per op); the same ops run in the same order, but libtorch's bf16 matmul and SDPA kernels
/// accumulate in f32 in blocks whose order can differ between call sites, so a few roundings per
/// layer can flip. Through 4 blocks plus embeddings that compounds to ~1e-2 worst case, while a
/// wrong formula (e.g. a missing bf16 rounding of the timestep, 750 → 752) or a swapped weight
/// gives errors of order 1 at this scale.
#[test]
fn forward_bf16_matches_diffusers() {
    let m =
        load_flux(&golden_dir().join("tiny/transformer"), Device::Cpu, WeightPolicy::FrozenBf16)
            .unwrap();
    let g = golden("forward_bf16.safetensors");
    let out = run(&m, &g);
    assert_eq!(out.kind(), Kind::BFloat16);
    let e = rel_err(&out, &g["output"]);
    assert!(e <= BF16_FORWARD_REL, "relative max error {e}");
    // bf16 compute on f32 master weights (cast at use) is what training does: same tolerance.
    let mut t = diffusers();
    t.model.set_compute_kind(Kind::BFloat16);
    let e2 = rel_err(&run(&t, &g), &g["output"]);
    assert!(e2 <= BF16_FORWARD_REL, "bf16 compute on f32 weights: relative max error {e2}");
}
