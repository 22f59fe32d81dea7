//! Parity of the text encoders and tokenizers with transformers/diffusers, from the goldens
//! made by tests/golden/text/make_goldens.py (FluxPipeline.encode_prompt in f32).

mod numerics;

use std::path::{Path, PathBuf};

use dancegrpo_worker::text::tokenizer::{load_clip, load_t5};
use dancegrpo_worker::text::{EncoderOptions, FluxTextEncoders};
use tch::{Device, Kind, Tensor};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/text")
}

fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(golden().join("prompts.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expected(name: &str) -> Tensor {
    let all = Tensor::read_safetensors(golden().join("encoded.safetensors")).unwrap();
    all.into_iter().find(|(n, _)| n == name).unwrap().1
}

fn ids_of(tok: &dancegrpo_worker::text::tokenizer::FixedLenTokenizer, ps: &[String]) -> Tensor {
    let rows: Vec<Tensor> =
        ps.iter().map(|p| Tensor::from_slice(&tok.encode(p).unwrap())).collect();
    Tensor::stack(&rows, 0)
}

#[test]
fn t5_tokenizer_json_matches_transformers_exactly() {
    let tok = load_t5(&golden().join("model/tokenizer_2"), 512).unwrap();
    assert_eq!(ids_of(&tok, &prompts()), expected("t5_ids"));
}

#[test]
fn t5_spiece_model_alone_matches_transformers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(golden().join("model/tokenizer_2/spiece.model"), dir.path().join("spiece.model"))
        .unwrap();
    let tok = load_t5(dir.path(), 512).unwrap();
    assert_eq!(ids_of(&tok, &prompts()), expected("t5_ids"));
}

#[test]
fn clip_tokenizer_from_vocab_and_merges_matches_transformers_exactly() {
    let tok = load_clip(&golden().join("model/tokenizer"), 77).unwrap();
    assert_eq!(ids_of(&tok, &prompts()), expected("clip_ids"));
}

#[test]
fn encoders_match_encode_prompt_in_f32() {
    let opts = EncoderOptions { device: Device::Cpu, kind: Kind::Float, max_sequence_length: 512 };
    let enc = FluxTextEncoders::load(&golden().join("model"), opts).unwrap();
    let out = enc.encode(&prompts()).unwrap();
    // f32 on both sides, through other op sequences and, on other CPUs or kernel sets, other
    // kernels. The tiny encoders (CLIP-L-shaped: 2 layers, width 32, MLP 128; T5-shaped: 2
    // layers, d_model 32, d_ff 64, 512 tokens of attention) run L ≈ 20 rounding stages whose
    // longest dot product is K ≤ 512 (T5's attention over the padded sequence): independent
    // roundings give √(L·K)·u ≈ 6e-6 of the O(1) outputs, the worst case L·K·u ≈ 6e-4. The bound
    // is ~15× the first (observed ~1e-6) and far below a wrong mask or norm (> 1e-2).
    for (got, name) in
        [(&out.prompt_embeds, "prompt_embeds"), (&out.pooled_prompt_embeds, "pooled_prompt_embeds")]
    {
        let want = expected(name);
        assert_eq!(got.size(), want.size(), "{name}");
        let diff = (got - &want).abs().max().double_value(&[]);
        assert!(diff <= 1e-4, "{name}: max |diff| {diff}");
        assert!(want.abs().max().double_value(&[]) > 0.1, "{name}: golden is degenerate");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn a_wrong_weight_shape_names_the_key_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden().join("model"), dir.path());
    let file = dir.path().join("text_encoder/model.safetensors");
    let mut ts = Tensor::read_safetensors(&file).unwrap();
    for (n, t) in ts.iter_mut() {
        if n == "text_model.final_layer_norm.weight" {
            *t = Tensor::zeros([31], (Kind::Float, Device::Cpu));
        }
    }
    Tensor::write_safetensors(&ts, &file).unwrap();
    let err =
        FluxTextEncoders::load(dir.path(), EncoderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("text_model.final_layer_norm.weight"), "{err}");
    assert!(err.contains("[31]") && err.contains("[32]"), "{err}");
}

#[test]
fn a_missing_tokenizer_is_reported_with_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_t5(dir.path(), 512).unwrap_err().to_string();
    assert!(err.contains("neither tokenizer.json nor spiece.model"), "{err}");
}
