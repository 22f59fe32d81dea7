//! Loading transformers-layout CLIP folders (`pickscore`, `clip_score`) through the worker's
//! reward builder: a missing file, or a tensor that is missing, extra or of the wrong shape,
//! is one error naming the file (and the tensor with both shapes), before the model is built.

use std::path::{Path, PathBuf};

use dancegrpo_proto::RewardConfig;
use dancegrpo_worker::reward::{RewardError, build_reward};
use tch::{Device, Kind, Tensor};

fn golden(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/hf_clip").join(model)
}

/// A copy of a golden folder, to break.
fn copy(model: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(golden(model)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn build(name: &str, dir: &Path) -> Result<(), RewardError> {
    let cfg = RewardConfig {
        name: name.into(),
        weight: 1.0,
        model_dir: dir.display().to_string(),
        on_cpu: true,
    };
    build_reward(&cfg, Device::Cpu).map(drop)
}

/// Rewrites `model.safetensors` in `dir` with `edit` applied to its tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut t = Tensor::read_safetensors(&path).unwrap();
    edit(&mut t);
    Tensor::write_safetensors(&t, &path).unwrap();
}

#[test]
fn the_golden_folders_build_under_every_name() {
    for name in ["pickscore", "pick_score", "pickscore_v1"] {
        build(name, &golden("pickscore_tiny")).unwrap();
    }
    for name in ["clip_score", "clipscore", "clip"] {
        build(name, &golden("clip_tiny")).unwrap();
    }
}

#[test]
fn a_missing_file_is_named() {
    let e = build("pickscore", Path::new("/nonexistent/PickScore_v1")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/PickScore_v1") && e.contains("does not exist"), "{e}");
    for (gone, want) in [
        ("config.json", "config.json: missing (the CLIPConfig)"),
        ("merges.txt", "merges.txt: missing (the tokenizer's BPE merges)"),
        ("vocab.json", "vocab.json: missing (the tokenizer's BPE vocabulary)"),
    ] {
        let dir = copy("pickscore_tiny");
        std::fs::remove_file(dir.path().join(gone)).unwrap();
        let e = build("pickscore", dir.path()).unwrap_err().to_string();
        assert!(e.contains(want), "{gone}: {e}");
    }
    let dir = copy("clip_tiny");
    for f in ["model.safetensors", "pytorch_model.bin"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    let e = build("clip_score", dir.path()).unwrap_err().to_string();
    assert!(e.contains("holds neither model.safetensors nor pytorch_model.bin"), "{e}");
    // Without preprocessor_config.json the CLIPImageProcessor defaults (224² crop) apply, which
    // this 32-pixel model cannot take: said with both sizes.
    let dir = copy("clip_tiny");
    std::fs::remove_file(dir.path().join("preprocessor_config.json")).unwrap();
    let e = build("clip_score", dir.path()).unwrap_err().to_string();
    assert!(e.contains("makes (224, 224) images, the model takes 32x32"), "{e}");
}

#[test]
fn a_wrong_shape_names_the_file_the_tensor_and_both_shapes() {
    let dir = copy("pickscore_tiny");
    edit_weights(dir.path(), |t| {
        for (k, v) in t.iter_mut() {
            if k == "visual_projection.weight" {
                *v = Tensor::zeros([8, 12], (Kind::Half, Device::Cpu));
            }
        }
    });
    let e = build("pickscore", dir.path()).unwrap_err().to_string();
    let file = dir.path().join("model.safetensors").display().to_string();
    assert!(
        e.contains(&file)
            && e.contains("'visual_projection.weight' has shape [8, 12] in the file but [8, 16]"),
        "{e}"
    );
}

#[test]
fn a_missing_or_extra_tensor_is_named() {
    let dir = copy("clip_tiny");
    edit_weights(dir.path(), |t| {
        t.retain(|(k, _)| k != "text_model.encoder.layers.1.self_attn.v_proj.bias")
    });
    let e = build("clip_score", dir.path()).unwrap_err().to_string();
    assert!(
        e.contains(
            "missing key 'text_model.encoder.layers.1.self_attn.v_proj.bias' (expected shape [16])"
        ),
        "{e}"
    );
    let dir = copy("clip_tiny");
    edit_weights(dir.path(), |t| {
        t.push(("vision_model.head.weight".into(), Tensor::zeros([3], (Kind::Float, Device::Cpu))))
    });
    let e = build("clip_score", dir.path()).unwrap_err().to_string();
    assert!(e.contains("unexpected key 'vision_model.head.weight' (shape [3])"), "{e}");
}

#[test]
fn an_unsupported_config_says_what_is_unsupported() {
    let dir = copy("pickscore_tiny");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"gelu\"", "\"gelu_new\"");
    std::fs::write(&path, text).unwrap();
    let e = build("pickscore", dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("config.json")
            && e.contains("text_config.hidden_act \"gelu_new\" is not supported"),
        "{e}"
    );
}
