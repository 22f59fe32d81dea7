//! Checkpoint files: the transformer and the LoRA adapter are loaded back by diffusers / PEFT
//! (`tests/golden/train/check_diffusers_peft.py`, run with the reference venv's python) and
//! give the Rust model's output; the atomic writer never leaves a partial `checkpoint-<step>`.

mod flux_common;
mod numerics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dancegrpo_worker::flux::lora::LoraSpec;
use dancegrpo_worker::flux::{FluxInputs, LoadedFlux, ModelError, WeightPolicy, load_flux};
use dancegrpo_worker::train::checkpoint::{
    CheckpointError, latest_checkpoint, load_lora_adapter, restore_named, save_lora_adapter,
    save_transformer, write_checkpoint, write_safetensors,
};
use flux_common::{golden, golden_dir, seeded_normal};
use tch::{Device, Kind, Tensor};

const INPUTS: &str = "forward_f32_sq.safetensors";

fn tiny() -> LoadedFlux {
    load_flux(
        &golden_dir().join("tiny/transformer"),
        Device::Cpu,
        WeightPolicy::Frozen(Kind::Float),
    )
    .unwrap()
}

fn forward(m: &LoadedFlux) -> Tensor {
    let g = golden(INPUTS);
    tch::no_grad(|| {
        m.model.forward(&FluxInputs {
            hidden_states: &g["hidden_states"],
            encoder_hidden_states: &g["encoder_hidden_states"],
            pooled_projections: &g["pooled_projections"],
            timestep: &g["timestep"],
            guidance: Some(&g["guidance"]),
            img_ids: &g["img_ids"],
            txt_ids: &g["txt_ids"],
        })
    })
    .unwrap()
}

/// The reference venv's python, if it has diffusers and peft (`deploy/reference-venv.sh`
/// installs them); `None`, loudly, otherwise.
fn reference_python() -> Option<PathBuf> {
    let venv = std::env::var_os("DANCEGRPO_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/dancegrpo/torch-2.11.0")
    });
    let py = venv.join("bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import diffusers, peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED the Python round trip: {} cannot import diffusers and peft \
             (run deploy/reference-venv.sh)",
            py.display()
        );
    }
    ok.then_some(py)
}

/// Runs the checker script with `args`, failing the test with its output on error.
fn python_check(args: &[&Path]) {
    let Some(py) = reference_python() else { return };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden/train/check_diffusers_peft.py");
    let out = Command::new(py).arg(script).args(args).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python check failed:\n{text}");
    eprintln!("{text}");
}

fn save_output(dir: &Path, output: &Tensor) -> PathBuf {
    let path = dir.join("expected.safetensors");
    write_safetensors(&path, &[("output".to_string(), output.shallow_clone())]).unwrap();
    path
}

fn sorted_vars(m: &LoadedFlux) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = m.vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A perturbed transformer saved through `write_checkpoint` + `save_transformer` loads with
/// `FluxTransformer2DModel.from_pretrained(dir, subfolder="transformer")` and with our own
/// loader, and both give the Rust model's output.
#[test]
fn transformer_loads_in_diffusers() {
    let m = tiny();
    tch::no_grad(|| {
        for (i, (_, v)) in sorted_vars(&m).into_iter().enumerate() {
            v.shallow_clone().copy_(&(&v + seeded_normal(5 + i as u64, &v.size(), 0.01)));
        }
    });
    let want = forward(&m);
    let out = tempfile::tempdir().unwrap();
    let cfg = m.model.config().clone();
    let ckpt =
        write_checkpoint(out.path(), 40, |dir| save_transformer(dir, &sorted_vars(&m), &cfg))
            .unwrap();
    assert_eq!(ckpt, out.path().join("checkpoint-40"));

    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["_class_name"], "FluxTransformer2DModel");
    assert_eq!(config["num_layers"], 2);

    let reloaded = load_flux(&ckpt, Device::Cpu, WeightPolicy::Frozen(Kind::Float)).unwrap();
    assert_eq!(reloaded.model.config(), &cfg);
    assert!(forward(&reloaded).equal(&want));

    let expected = save_output(out.path(), &want);
    python_check(&[Path::new("transformer"), &ckpt, &golden_dir().join(INPUTS), &expected]);
}

/// An adapter with non-zero A and B loads with `PeftModel.from_pretrained` on the diffusers
/// base (same keys, same values, same output), and back into a fresh Rust model.
#[test]
fn lora_adapter_loads_in_peft() {
    let spec = LoraSpec { rank: 4, alpha: 8.0, ..LoraSpec::dance_grpo() };
    let mut m = tiny();
    let lora = m.model.attach_lora(&spec, 9).unwrap();
    tch::no_grad(|| {
        for (i, (_, t)) in lora.iter().enumerate() {
            t.shallow_clone().copy_(&seeded_normal(2 + i as u64, &t.size(), 0.2));
        }
    });
    let want = forward(&m);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("adapter");
    save_lora_adapter(&dir, &lora, &spec).unwrap();

    let loaded = load_lora_adapter(&dir).unwrap();
    assert_eq!(loaded.spec, spec);
    let mut fresh = tiny();
    let fresh_lora = fresh.model.attach_lora(&loaded.spec, 1234).unwrap();
    restore_named(&fresh_lora, &loaded.tensors, &dir).unwrap();
    assert!(forward(&fresh).equal(&want));

    let expected = save_output(out.path(), &want);
    python_check(&[
        Path::new("lora"),
        &golden_dir().join("tiny"),
        &dir,
        &golden_dir().join(INPUTS),
        &expected,
    ]);
}

/// Adapters that are not plain LoRA, or whose tensors do not fit, are refused with the reason;
/// restoring into tensors of another shape names the key and both shapes.
#[test]
fn lora_adapter_errors() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path();
    let spec = LoraSpec { rank: 2, alpha: 4.0, target_modules: vec!["to_q".into()] };
    let key = "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight".to_string();
    let a = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
    save_lora_adapter(dir, &[(key.clone(), a)], &spec).unwrap();

    let cfg_path = dir.join("adapter_config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("\"use_dora\": false", "\"use_dora\": true")).unwrap();
    let msg = load_lora_adapter(dir).unwrap_err().to_string();
    assert!(msg.contains("use_dora"), "{msg}");
    std::fs::write(&cfg_path, cfg.replace("\"r\": 2", "\"r\": 3")).unwrap();
    let msg = load_lora_adapter(dir).unwrap_err().to_string();
    assert!(msg.contains(&key) && msg.contains("[2, 8]") && msg.contains("r = 3"), "{msg}");
    std::fs::write(&cfg_path, cfg).unwrap();

    let loaded = load_lora_adapter(dir).unwrap();
    let dst = vec![(key.clone(), Tensor::zeros([2, 16], (Kind::Float, Device::Cpu)))];
    let err = restore_named(&dst, &loaded.tensors, dir).unwrap_err();
    assert!(matches!(err, CheckpointError::Weights(ModelError::Shape { .. })));
    let msg = err.to_string();
    assert!(msg.contains(&key) && msg.contains("[2, 16]") && msg.contains("[2, 8]"), "{msg}");
    let other = vec![("x".to_string(), Tensor::zeros([1], (Kind::Float, Device::Cpu)))];
    let msg = restore_named(&other, &loaded.tensors, dir).unwrap_err().to_string();
    assert!(msg.contains("x"), "{msg}");
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A failing writer leaves nothing behind; a rewrite of the same step replaces the old folder
/// whole; `latest_checkpoint` sees only finished `checkpoint-<step>` folders.
#[test]
fn write_checkpoint_is_atomic() {
    let out = tempfile::tempdir().unwrap();
    let root = out.path();
    assert_eq!(latest_checkpoint(root), None);

    let err = write_checkpoint(root, 7, |dir| -> Result<(), CheckpointError> {
        std::fs::write(dir.join("partial"), b"x").unwrap();
        Err(ModelError::Input("disk full".into()).into())
    })
    .unwrap_err();
    assert!(err.to_string().contains("disk full"));
    assert!(entries(root).is_empty(), "{:?}", entries(root));

    let first = write_checkpoint(root, 7, |dir| -> Result<(), CheckpointError> {
        Ok(std::fs::write(dir.join("old"), b"1").map_err(|e| ModelError::Input(e.to_string()))?)
    })
    .unwrap();
    let again = write_checkpoint(root, 7, |dir| -> Result<(), CheckpointError> {
        std::fs::create_dir(dir.join("sub")).unwrap();
        Ok(std::fs::write(dir.join("sub/new"), b"2")
            .map_err(|e| ModelError::Input(e.to_string()))?)
    })
    .unwrap();
    assert_eq!(first, again);
    assert_eq!(entries(&again), ["sub"]);
    assert_eq!(entries(root), ["checkpoint-7"]);

    write_checkpoint::<CheckpointError, _>(root, 12, |_| Ok(())).unwrap();
    std::fs::create_dir(root.join(".checkpoint-40.tmp-99")).unwrap();
    std::fs::create_dir(root.join("checkpoint-30-0")).unwrap();
    std::fs::create_dir(root.join("checkpoint-+50")).unwrap();
    std::fs::write(root.join("checkpoint-60"), b"a file").unwrap();
    assert_eq!(latest_checkpoint(root), Some((12, root.join("checkpoint-12"))));
}

/// The safetensors writer keeps dtypes and values, and tags files as PyTorch's.
#[test]
fn safetensors_round_trip() {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("t.safetensors");
    let t: BTreeMap<String, Tensor> = [
        ("bf16".to_string(), Tensor::randn([3, 2], (Kind::BFloat16, Device::Cpu))),
        ("f32".to_string(), Tensor::randn([4], (Kind::Float, Device::Cpu)).transpose(0, 0)),
        ("i64".to_string(), Tensor::from_slice(&[7i64]).reshape([] as [i64; 0])),
    ]
    .into_iter()
    .collect();
    let list: Vec<_> = t.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    write_safetensors(&path, &list).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str),
        Some("pt")
    );
    let back =
        dancegrpo_worker::flux::weights::SafetensorsFile::open(&path).unwrap().read_all().unwrap();
    for (k, v) in &t {
        assert_eq!(back[k].kind(), v.kind(), "{k}");
        assert!(back[k].equal(v), "{k}");
    }
}
