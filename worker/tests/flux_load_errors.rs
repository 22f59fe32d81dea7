//! Bad checkpoints give errors that name the key and both shapes, never a panic.

mod flux_common;

use std::path::Path;

use dancegrpo_worker::flux::load::{Layout, load_flux_with};
use dancegrpo_worker::flux::weights::SafetensorsFile;
use dancegrpo_worker::flux::{FluxConfig, WeightPolicy, load_flux};
use flux_common::golden_dir;
use tch::{Device, Kind, Tensor};

fn tiny_cfg() -> FluxConfig {
    FluxConfig::from_file(&golden_dir().join("tiny/transformer/config.json")).unwrap()
}

/// The BFL file rewritten through `edit` into a temp file.
fn bfl_variant(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> std::path::PathBuf {
    let f = SafetensorsFile::open(golden_dir().join("tiny/flux-bfl.safetensors")).unwrap();
    let mut t: Vec<(String, Tensor)> = f.read_all().unwrap().into_iter().collect();
    edit(&mut t);
    let p = dir.join("flux.safetensors");
    Tensor::write_safetensors(&t, &p).unwrap();
    p
}

fn load_err(path: std::path::PathBuf) -> String {
    load_flux_with(&Layout::Bfl(path), &tiny_cfg(), Device::Cpu, WeightPolicy::Frozen(Kind::Float))
        .unwrap_err()
        .to_string()
}

#[test]
fn bfl_without_prefix_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = bfl_variant(dir.path(), |t| {
        for (k, _) in t.iter_mut() {
            *k = k.strip_prefix("model.diffusion_model.").unwrap().to_string();
        }
    });
    let a = load_flux_with(
        &Layout::Bfl(p),
        &tiny_cfg(),
        Device::Cpu,
        WeightPolicy::Frozen(Kind::Float),
    )
    .unwrap();
    let b = load_flux(
        &golden_dir().join("tiny/transformer"),
        Device::Cpu,
        WeightPolicy::Frozen(Kind::Float),
    )
    .unwrap();
    let (va, vb) = (a.vs.variables(), b.vs.variables());
    for (k, v) in &vb {
        assert!(v.equal(&va[k]), "{k} differs");
    }
}

#[test]
fn missing_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = bfl_variant(dir.path(), |t| {
        t.retain(|(k, _)| !k.ends_with("single_blocks.1.linear2.weight"))
    });
    let e = load_err(p);
    assert!(
        e.contains("single_transformer_blocks.1.proj_out.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn unexpected_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = bfl_variant(dir.path(), |t| {
        t.push((
            "model.diffusion_model.double_blocks.7.img_mod.lin.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ))
    });
    let e = load_err(p);
    assert!(
        e.contains("unexpected weight model.diffusion_model.double_blocks.7.img_mod.lin.weight"),
        "{e}"
    );
}

/// A fused tensor of the wrong size: the message names the BFL key, the shape the model needs
/// (3 × 32 rows for q, k, v) and the one in the file.
#[test]
fn misshaped_key_names_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let p = bfl_variant(dir.path(), |t| {
        for (k, v) in t.iter_mut() {
            if k.ends_with("double_blocks.0.img_attn.qkv.weight") {
                *v = v.narrow(0, 0, 64);
            }
        }
    });
    let e = load_err(p);
    assert!(
        e.contains("double_blocks.0.img_attn.qkv.weight")
            && e.contains("[96, 32]")
            && e.contains("[64, 32]"),
        "{e}"
    );
}

/// The same checks apply to the diffusers folder; a shard listed in the index must exist.
#[test]
fn diffusers_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden_dir().join("tiny/transformer");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let shard = dir.path().join("diffusion_pytorch_model-00003-of-00003.safetensors");
    let f = SafetensorsFile::open(&shard).unwrap();
    let mut t: Vec<(String, Tensor)> = f.read_all().unwrap().into_iter().collect();
    for (k, v) in t.iter_mut() {
        if k == "proj_out.weight" {
            *v = v.transpose(0, 1).contiguous();
        }
    }
    drop(f);
    Tensor::write_safetensors(&t, &shard).unwrap();
    let e = load_flux(dir.path(), Device::Cpu, WeightPolicy::FrozenBf16).unwrap_err().to_string();
    assert!(
        e.contains("proj_out.weight") && e.contains("[64, 32]") && e.contains("[32, 64]"),
        "{e}"
    );
    std::fs::remove_file(&shard).unwrap();
    let e = load_flux(dir.path(), Device::Cpu, WeightPolicy::FrozenBf16).unwrap_err().to_string();
    assert!(e.contains("00003-of-00003"), "{e}");
}

/// Without a config.json the BFL config is inferred from shapes; the tiny head dim (16) cannot
/// use FLUX's RoPE split, and the error says so instead of building a wrong model.
#[test]
fn bfl_config_inference() {
    let f = SafetensorsFile::open(golden_dir().join("tiny/flux-bfl.safetensors")).unwrap();
    let e = dancegrpo_worker::flux::load::infer_bfl_config(&f).unwrap_err().to_string();
    assert!(e.contains("axes_dims_rope") && e.contains("config.json"), "{e}");
}
