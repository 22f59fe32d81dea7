//! Parity of the HPS-v2.1 reward with HPSv2's own Python (hpsv2 1.2.0 on torch 2.11.0,
//! cross-checked with open-clip-torch 3.3.0), on the tiny ViT-H-14-shaped model and inputs
//! that `tests/golden/hps/make_goldens.py` wrote.
//!
//! Tolerances: features and pixels to 1e-4 absolute. Both sides run the same fp32 ops on
//! the CPU; what differs is kernel choice and summation order (SDPA vs PyTorch's MHA fast
//! path, conv vs unfold), worth ~1e-6 here, so 1e-4 leaves room without hiding a real bug
//! (a wrong mask, activation or pooling position moves features by > 1e-2). Token ids: exact.

mod numerics;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dancegrpo_worker::clip::{ClipConfig, ClipModel, l2_normalize, load_into, read_state_dict};
use dancegrpo_worker::reward::Reward;
use dancegrpo_worker::reward::hps::{HpsFiles, HpsReward};
use dancegrpo_worker::reward::preprocess::preprocess_one;
use dancegrpo_worker::reward::tokenizer::ClipTokenizer;
use tch::{Device, Kind, Tensor};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/hps")
}

fn goldens() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(golden_dir().join("goldens.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn tiny_model(weights: &str) -> ClipModel {
    let dir = golden_dir().join("tiny_hps");
    let cfg = ClipConfig::from_file(&dir.join("open_clip_config.json")).unwrap();
    let mut model = ClipModel::new(&cfg, Device::Cpu).unwrap();
    let path = dir.join(weights);
    load_into(&mut model, read_state_dict(&path).unwrap(), &path).unwrap();
    model
}

fn check_features(model: &ClipModel, g: &HashMap<String, Tensor>) {
    let img = tch::no_grad(|| l2_normalize(&model.encode_image(&g["pixels"]).unwrap()).unwrap());
    let txt = tch::no_grad(|| l2_normalize(&model.encode_text(&g["tokens"]).unwrap()).unwrap());
    let di = max_abs_diff(&img, &g["image_features"]);
    let dt = max_abs_diff(&txt, &g["text_features"]);
    assert!(di <= 1e-4, "image features differ by {di}");
    assert!(dt <= 1e-4, "text features differ by {dt}");
    let scores = (img * txt).sum_dim_intlist(-1, false, Kind::Float);
    let ds = max_abs_diff(&scores, &g["scores"]);
    assert!(ds <= 1e-4, "scores differ by {ds}");
}

#[test]
fn features_match_hpsv2_from_torch_pickle() {
    // The `.pt` is a real `torch.save({'state_dict': model.state_dict()})` file in fp16.
    check_features(&tiny_model("HPS_v2.1_compressed.pt"), &goldens());
}

#[test]
fn features_match_hpsv2_from_safetensors() {
    check_features(&tiny_model("HPS_v2.1_compressed.safetensors"), &goldens());
}

#[test]
fn pickle_and_safetensors_hold_the_same_tensors() {
    let dir = golden_dir().join("tiny_hps");
    let pt: HashMap<_, _> =
        read_state_dict(&dir.join("HPS_v2.1_compressed.pt")).unwrap().into_iter().collect();
    let st: HashMap<_, _> = read_state_dict(&dir.join("HPS_v2.1_compressed.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(pt.len(), st.len());
    assert!(pt.contains_key("visual.transformer.resblocks.1.attn.in_proj_weight"));
    for (k, t) in &pt {
        assert_eq!(t.kind(), Kind::Half, "{k}");
        assert!(t.equal(&st[k]), "{k} differs");
    }
}

#[test]
fn preprocessing_matches_hpsv2_resize_max_size() {
    let g = goldens();
    // Square at model size, landscape 37x23 (downscale + pad rows), portrait 20x33 (upscale + pad columns).
    for i in 0..3 {
        let img = &g[&format!("images_{i}")];
        let px = preprocess_one(img, 28).unwrap();
        let d = max_abs_diff(&px, &g["pixels"].get(i));
        assert!(d <= 1e-4, "image {i} ({:?}): pixels differ by {d}", img.size());
    }
}

#[test]
fn tokenizer_matches_open_clip_on_tricky_prompts() {
    let dir = golden_dir();
    let tok = ClipTokenizer::from_file(&dir.join("tiny_hps/bpe_simple_vocab_16e6.txt.gz")).unwrap();
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tricky_prompts.json")).unwrap())
            .unwrap();
    let want = &goldens()["tricky_tokens"];
    for (i, p) in prompts.iter().enumerate() {
        let ids = tok.tokenize(p).unwrap();
        let expect = Vec::<i64>::try_from(&want.get(i as i64)).unwrap();
        assert_eq!(ids, expect, "prompt {i}: {p:?}");
    }
}

#[test]
fn reward_end_to_end_matches_python_scores() {
    let dir = golden_dir().join("tiny_hps");
    let mut hps = HpsReward::from_dir(&dir, Device::Cpu).unwrap();
    let images = Tensor::read_safetensors(dir.join("images.safetensors")).unwrap().remove(0).1;
    let prompts: Vec<String> = std::fs::read_to_string(dir.join("prompts.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let scores = hps.score(&images, &prompts).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected_scores.json")).unwrap())
            .unwrap();
    let want: Vec<f64> = serde_json::from_value(want["scores"].clone()).unwrap();
    assert_eq!(scores.len(), want.len());
    for (s, w) in scores.iter().zip(&want) {
        assert!((s - w).abs() <= 1e-4, "{s} vs {w}");
    }
    // The safetensors file wins over the .pt when both are present.
    let files = HpsFiles::discover(&dir, None).unwrap();
    assert!(files.weights[0].extension().unwrap() == "safetensors");
}
