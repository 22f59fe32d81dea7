//! Loading HPS checkpoints: strict key/shape checks with errors that name the key, malformed
//! PyTorch pickles, the `convert` command, and model-directory discovery.

mod numerics;

use std::path::{Path, PathBuf};

use dancegrpo_worker::check::hps::{ConvertArgs, run_convert};
use dancegrpo_worker::clip::{ClipConfig, ClipError, ClipModel, load_into, read_state_dict};
use dancegrpo_worker::reward::RewardError;
use dancegrpo_worker::reward::hps::{HpsFiles, HpsReward};
use tch::{Device, Kind, Tensor};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/hps")
}

fn tiny() -> (ClipModel, Vec<(String, Tensor)>) {
    let dir = golden_dir().join("tiny_hps");
    let cfg = ClipConfig::from_file(&dir.join("open_clip_config.json")).unwrap();
    let model = ClipModel::new(&cfg, Device::Cpu).unwrap();
    let sd = read_state_dict(&dir.join("HPS_v2.1_compressed.safetensors")).unwrap();
    (model, sd)
}

#[test]
fn missing_key_is_named() {
    let (mut model, mut sd) = tiny();
    sd.retain(|(k, _)| k != "visual.ln_post.bias");
    let e = load_into(&mut model, sd, Path::new("x.pt")).unwrap_err();
    assert!(matches!(&e, ClipError::MissingKey { key, .. } if key == "visual.ln_post.bias"), "{e}");
    assert!(e.to_string().contains("visual.ln_post.bias"));
}

#[test]
fn unexpected_key_is_named() {
    let (mut model, mut sd) = tiny();
    sd.push(("visual.extra_thing".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    let e = load_into(&mut model, sd, Path::new("x.pt")).unwrap_err();
    assert!(e.to_string().contains("unexpected key 'visual.extra_thing'"), "{e}");
}

#[test]
fn shape_mismatch_names_key_and_both_shapes() {
    let (mut model, mut sd) = tiny();
    for (k, t) in sd.iter_mut() {
        if k == "text_projection" {
            *t = Tensor::zeros([4, 17], (Kind::Half, Device::Cpu));
        }
    }
    let e = load_into(&mut model, sd, Path::new("x.pt")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("'text_projection'") && msg.contains("[4, 17]") && msg.contains("[4, 16]"),
        "{msg}"
    );
}

#[test]
fn malformed_pickles_are_clear_errors() {
    let bad = golden_dir().join("bad");
    let e = read_state_dict(&bad.join("list_root.pt")).unwrap_err().to_string();
    assert!(e.contains("list_root.pt") && e.contains("not a dict"), "{e}");
    let e = read_state_dict(&bad.join("int_entry.pt")).unwrap_err().to_string();
    assert!(e.contains("'epoch'") && e.contains("not a tensor"), "{e}");
    // Not a zip archive at all (e.g. a truncated download).
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.pt");
    std::fs::write(&junk, b"definitely not a zip").unwrap();
    let e = read_state_dict(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.pt"), "{e}");
    let e = read_state_dict(&tmp.path().join("absent.pt")).unwrap_err().to_string();
    assert!(e.contains("no such file"), "{e}");
}

#[test]
fn convert_writes_safetensors_that_load_identically() {
    let src = golden_dir().join("tiny_hps/HPS_v2.1_compressed.pt");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("HPS_v2.1_compressed.safetensors");
    run_convert(&ConvertArgs { input: src.clone(), output: Some(out.clone()) }).unwrap();
    let a = read_state_dict(&src).unwrap();
    let b: std::collections::HashMap<_, _> = read_state_dict(&out).unwrap().into_iter().collect();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(t.kind(), b[k].kind(), "{k}");
        assert!(t.equal(&b[k]), "{k}");
    }
}

#[test]
fn model_dir_discovery_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = HpsFiles::discover(&tmp.path().join("nope"), None).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = HpsFiles::discover(tmp.path(), None).unwrap_err();
    assert!(e.to_string().contains("HPS_v2.1_compressed.pt"), "{e}");
    // Weights but no vocabulary.
    std::fs::copy(
        golden_dir().join("tiny_hps/HPS_v2.1_compressed.pt"),
        tmp.path().join("HPS_v2.1_compressed.pt"),
    )
    .unwrap();
    let e = HpsFiles::discover(tmp.path(), None).unwrap_err();
    assert!(e.to_string().contains("bpe_simple_vocab_16e6.txt.gz"), "{e}");
    // With the vocabulary given by path, but no config: ViT-H-14 is assumed, so the tiny
    // weights do not fit and the error names a key with both shapes.
    let vocab = golden_dir().join("tiny_hps/bpe_simple_vocab_16e6.txt.gz");
    let files = HpsFiles::discover(tmp.path(), Some(&vocab)).unwrap();
    assert!(files.config.is_none());
    let e = HpsReward::from_files(&files, Device::Cpu).unwrap_err();
    assert!(matches!(e, RewardError::Model(ClipError::ShapeMismatch { .. })), "{e}");
}

#[test]
fn config_rejects_unsupported_options() {
    let e = ClipConfig::from_json(
        r#"{"embed_dim": 16, "vision_cfg": {"image_size": 28, "layers": 1, "width": 32,
            "head_width": 16, "patch_size": 14, "ls_init_value": 0.1},
            "text_cfg": {"width": 8, "heads": 2, "layers": 1}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("vision_cfg.ls_init_value"), "{e}");
    let e = ClipConfig::from_json(
        r#"{"embed_dim": 16, "vision_cfg": {"image_size": 30, "layers": 1, "width": 32,
            "patch_size": 14}, "text_cfg": {"width": 8, "heads": 3, "layers": 1}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("patch_size") && e.contains("heads 3"), "{e}");
    // The open_clip wrapper form is accepted, and ViT-H-14's numbers are the real ones.
    let h = ClipConfig::vit_h_14();
    assert_eq!((h.vision_heads(), h.grid(), h.embed_dim), (16, 16, 1024));
}

#[test]
fn empty_prompt_and_empty_image_are_errors() {
    let dir = golden_dir().join("tiny_hps");
    let mut hps = HpsReward::from_dir(&dir, Device::Cpu).unwrap();
    use dancegrpo_worker::reward::Reward;
    let img = Tensor::zeros([1, 28, 28, 3], (Kind::Uint8, Device::Cpu));
    let e = hps.score(&img, &["   ".to_string()]).unwrap_err().to_string();
    assert!(e.contains("empty prompt"), "{e}");
    let none = Tensor::zeros([1, 0, 28, 3], (Kind::Uint8, Device::Cpu));
    let e = hps.score(&none, &["a cat".to_string()]).unwrap_err().to_string();
    assert!(e.contains("no pixels"), "{e}");
}

#[test]
fn shapes_without_allocating_match_the_model() {
    let dir = golden_dir().join("tiny_hps");
    let mut cfg = ClipConfig::from_file(&dir.join("open_clip_config.json")).unwrap();
    for _ in 0..2 {
        let model = ClipModel::new(&cfg, Device::Cpu).unwrap();
        let vars: std::collections::BTreeMap<String, Vec<i64>> =
            model.var_store().variables().iter().map(|(k, v)| (k.clone(), v.size())).collect();
        assert_eq!(vars, dancegrpo_worker::clip::state_dict_shapes(&cfg));
        // And once more with other widths, depths and a non-default MLP ratio.
        cfg.vision_cfg.layers = 3;
        cfg.text_cfg.width = 12;
        cfg.text_cfg.heads = 3;
        cfg.text_cfg.mlp_ratio = 2.0;
        cfg.text_cfg.vocab_size = 100;
    }
}
