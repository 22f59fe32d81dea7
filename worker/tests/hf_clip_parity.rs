//! Parity of the transformers-layout CLIP rewards (`pickscore`, `clip_score`) with
//! transformers 5.24.0 itself (`CLIPProcessor` + `CLIPModel`, torch 2.11.0), on the tiny models
//! and inputs `tests/golden/hf_clip/make_goldens.py` wrote: `pickscore_tiny` (exact GELU, pooled
//! at the first `eos_token_id`) and `clip_tiny` (quick GELU, the legacy `eos_token_id` 2, pooled
//! at the largest id; a 36-pixel shortest edge cropped to 32).
//!
//! Every model is loaded through [`build_reward`], the worker's own path.
//!
//! Bounds. Token ids: exact. Pixels: 1e-5 absolute; the resize is the same uint8 libtorch
//! kernel on both sides, so only the f32 normalisation's rounding remains (≈ 1e-7; one uint8
//! step is 1/(255·0.27) ≈ 0.015, so an off-by-one pixel fails loudly). Features: 1e-5 relative
//! to their largest entry; scores: 1e-5 relative. Both sides run the same f32 ops on the CPU;
//! what could differ is kernel choice and summation order. Measured (torch 2.11.0, this CPU):
//! pixels and features bit-identical, scores 1.1e-7 relative (the reference's cosine is f32, ours
//! f64). A wrong mask, activation, pooling position or transposed projection moves them by
//! > 1e-2.

mod numerics;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dancegrpo_proto::RewardConfig;
use dancegrpo_worker::reward::hf_clip::{HfClipFiles, HfClipReward};
use dancegrpo_worker::reward::{Reward, build_reward};
use tch::{Device, Kind, Tensor};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/hf_clip")
}

fn goldens() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(golden_dir().join("goldens.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(golden_dir().join("prompts.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / b.to_kind(Kind::Double).abs().max().double_value(&[])
}

/// The three golden images, each scored alone (they differ in size) against its prompt.
fn images(g: &HashMap<String, Tensor>) -> Vec<Tensor> {
    (0..3).map(|i| g[&format!("images.{i}")].unsqueeze(0)).collect()
}

fn built(name: &str, dir: &Path) -> Box<dyn Reward> {
    let cfg = RewardConfig {
        name: name.into(),
        weight: 1.0,
        model_dir: dir.display().to_string(),
        on_cpu: true,
    };
    build_reward(&cfg, Device::Cpu).unwrap()
}

/// Checks every stage of `model` (a folder under the golden dir) against the goldens, loading
/// from `dir` (the folder itself or a copy of it).
fn check(model: &str, dir: &Path, reward_name: &'static str) {
    let g = goldens();
    let prompts = prompts();
    let files = HfClipFiles::discover(dir).unwrap();
    let r = HfClipReward::from_files(reward_name, &files, Device::Cpu, Kind::Float).unwrap();
    let ids = r.tokenize(&prompts).unwrap();
    assert_eq!(
        Vec::<i64>::try_from(ids.flatten(0, -1)).unwrap(),
        Vec::<i64>::try_from(g[&format!("{model}.input_ids")].flatten(0, -1)).unwrap(),
        "{model}: token ids"
    );
    let mut boxed = built(reward_name, dir);
    assert_eq!(boxed.name(), reward_name);
    let mut worst = [0f64; 4];
    for (i, img) in images(&g).iter().enumerate() {
        let p = &prompts[i..=i];
        let out = r.forward(img, p).unwrap();
        let px = max_abs_diff(
            &out.pixel_values,
            &g[&format!("{model}.pixel_values")].narrow(0, i as i64, 1),
        );
        let di = rel_diff(
            &out.image_embeds,
            &g[&format!("{model}.image_embeds")].narrow(0, i as i64, 1),
        );
        let dt =
            rel_diff(&out.text_embeds, &g[&format!("{model}.text_embeds")].narrow(0, i as i64, 1));
        let want = g[&format!("{model}.scores")].double_value(&[i as i64]);
        let ds = (out.scores[0] - want).abs() / want.abs();
        assert!(px <= 1e-5, "{model} image {i}: pixels differ by {px}");
        assert!(di <= 1e-5, "{model} image {i}: image features differ by {di} (relative)");
        assert!(dt <= 1e-5, "{model} image {i}: text features differ by {dt} (relative)");
        assert!(ds <= 1e-5, "{model} image {i}: score {} vs {want} ({ds} relative)", out.scores[0]);
        // The built reward scores the same.
        assert_eq!(boxed.score(img, p).unwrap(), out.scores);
        for (w, d) in worst.iter_mut().zip([px, di, dt, ds]) {
            *w = w.max(d);
        }
    }
    // All five prompts' text features (two of them longer than the context, one with
    // accents, ligatures, full-width letters and a final sigma).
    let txt = tch::no_grad(|| r.model().encode_text(&ids).unwrap());
    let dt = rel_diff(&txt, &g[&format!("{model}.text_embeds")]);
    assert!(dt <= 1e-5, "{model}: text features of all prompts differ by {dt}");
    eprintln!(
        "{model} from {}: pixels {:.1e} abs, image {:.1e}, text {:.1e} (all prompts {dt:.1e}), \
         scores {:.1e} rel",
        files.weights.file_name().unwrap().to_string_lossy(),
        worst[0],
        worst[1],
        worst[2],
        worst[3]
    );
}

#[test]
fn pickscore_matches_transformers_from_safetensors() {
    check("pickscore_tiny", &golden_dir().join("pickscore_tiny"), "pickscore");
}

#[test]
fn clip_score_matches_transformers_from_safetensors() {
    check("clip_tiny", &golden_dir().join("clip_tiny"), "clip_score");
}

/// The folder without `model.safetensors`: `pytorch_model.bin`, a `torch.save` of the state
/// dict (an `OrderedDict`, with the `position_ids` buffers older transformers saved).
fn without_safetensors(model: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(golden_dir().join(model)).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    tmp
}

#[test]
fn pickscore_matches_transformers_from_torch_pickle() {
    let dir = without_safetensors("pickscore_tiny");
    assert!(HfClipFiles::discover(dir.path()).unwrap().weights.ends_with("pytorch_model.bin"));
    check("pickscore_tiny", dir.path(), "pickscore");
}

#[test]
fn clip_score_matches_transformers_from_torch_pickle() {
    let dir = without_safetensors("clip_tiny");
    check("clip_tiny", dir.path(), "clip_score");
}

/// A batch of equal-sized images scores as the images one by one (the batch dimension is not
/// mixed anywhere), and in bf16 within bf16's precision of the f32 scores.
#[test]
fn batches_and_bf16_agree_with_single_f32_images() {
    let g = goldens();
    let img = g["images.2"].unsqueeze(0);
    let batch = Tensor::cat(&[&img, &img.flip([2]), &img.flip([1])], 0);
    let prompts: Vec<String> = prompts()[..3].to_vec();
    let files = HfClipFiles::discover(&golden_dir().join("pickscore_tiny")).unwrap();
    let f32r = HfClipReward::from_files("pickscore", &files, Device::Cpu, Kind::Float).unwrap();
    let all = f32r.forward(&batch, &prompts).unwrap().scores;
    for i in 0..3 {
        let one = f32r.forward(&batch.narrow(0, i, 1), &prompts[i as usize..=i as usize]).unwrap();
        let d = (one.scores[0] - all[i as usize]).abs() / all[i as usize].abs();
        assert!(d <= 1e-6, "image {i}: batched {} vs alone {}", all[i as usize], one.scores[0]);
    }
    let bf16 = HfClipReward::from_files("pickscore", &files, Device::Cpu, Kind::BFloat16).unwrap();
    let low = bf16.forward(&batch, &prompts).unwrap().scores;
    let worst = low.iter().zip(&all).map(|(a, b)| (a - b).abs() / b.abs()).fold(0f64, f64::max);
    eprintln!("bf16 vs f32 scores: {worst:.1e} relative");
    for (a, b) in low.iter().zip(&all) {
        // bf16 keeps 8 bits of mantissa (≈ 4e-3 relative per rounding); through 2+2 layers
        // the scores moved by 2.7e-3 relative. 5e-2 still catches a wrong dtype path (garbage
        // or NaN) and leaves room for other kernel sets.
        assert!((a - b).abs() / b.abs() <= 5e-2, "bf16 {a} vs f32 {b}");
    }
    assert_eq!(bf16.model().var_store().variables()["visual.proj"].kind(), Kind::BFloat16);
    // The scale is the file's, not its bf16 rounding: exp(4.6052) = 100.0, not exp(4.59375).
    assert_eq!(bf16.scale(), f32r.scale());
    assert!((f32r.scale() - 100.0).abs() < 0.05, "{}", f32r.scale());
}
