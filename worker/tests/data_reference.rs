//! The DanceGRPO reference layout (`videos2caption.json` + `.pt` files written by
//! torch.save in tests/golden/text/make_goldens.py) and the prompts file reader.

mod numerics;

use std::path::{Path, PathBuf};

use dancegrpo_worker::data;
use dancegrpo_worker::data::prompts::{PromptFilter, read_prompts};
use tch::{Kind, Tensor};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/text")
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
fn reference_layout_loads_to_the_saved_tensors() {
    let ds = data::open(&golden().join("ref_layout")).unwrap();
    let want = Tensor::read_safetensors(golden().join("ref_layout_expected.safetensors")).unwrap();
    let get = |n: String| want.iter().find(|(k, _)| *k == n).unwrap().1.shallow_clone();
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("prompts.json")).unwrap())
            .unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.spec().prompt_embeds_shape, vec![512, 32]);
    assert_eq!(ds.spec().kind, Kind::BFloat16);
    assert!(ds.verify().is_empty());
    for (i, prompt) in prompts.iter().enumerate().take(3) {
        let it = ds.get(i).unwrap();
        assert_eq!(&it.caption, prompt);
        // Bit-exact: the same bf16 values, including item 1 saved as a view with an offset.
        assert!(it.prompt_embeds.equal(&get(format!("prompt_embed.{i}"))), "item {i}");
        assert!(it.pooled_prompt_embeds.equal(&get(format!("pooled_prompt_embeds.{i}"))));
        assert_eq!(it.text_ids.size(), vec![512, 3]);
        assert_eq!(it.text_ids.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}

#[test]
fn a_missing_pt_file_names_the_entry_and_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden().join("ref_layout"), dir.path());
    std::fs::remove_file(dir.path().join("pooled_prompt_embeds/2.pt")).unwrap();
    let err = data::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("entry 2") && err.contains("pooled_prompt_embeds/2.pt"), "{err}");
}

#[test]
fn a_truncated_pt_file_is_reported_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden().join("ref_layout"), dir.path());
    let f = dir.path().join("prompt_embed/1.pt");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let ds = data::open(dir.path()).unwrap();
    let errs = ds.verify();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].to_string().contains("prompt_embed/1.pt"), "{}", errs[0]);
    let err = ds.get(1).unwrap_err().to_string();
    assert!(err.contains("prompt_embed/1.pt"), "{err}");
}

#[test]
fn a_wrong_shape_is_reported_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden().join("ref_layout"), dir.path());
    std::fs::copy(
        dir.path().join("pooled_prompt_embeds/2.pt"),
        dir.path().join("prompt_embed/2.pt"),
    )
    .unwrap();
    let ds = data::open(dir.path()).unwrap();
    let errs = ds.verify();
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = errs[0].to_string();
    assert!(
        e.contains("prompt_embed/2.pt") && e.contains("[32]") && e.contains("[512, 32]"),
        "{e}"
    );
    assert!(ds.get(2).is_err());
}

#[test]
fn prompts_file_filters_cjk_and_caps_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.txt");
    std::fs::write(&f, "  a cat \n東京 tower\nb dog\nc bird\n").unwrap();
    let ps = read_prompts(&f, PromptFilter { drop_cjk: true, max: Some(2) }).unwrap();
    let got: Vec<(usize, &str)> = ps.iter().map(|p| (p.line, p.text.as_str())).collect();
    assert_eq!(got, vec![(1, "a cat"), (3, "b dog")]);
    let all = read_prompts(&f, PromptFilter::default()).unwrap();
    assert_eq!(all.len(), 4);
}

#[test]
fn prompts_file_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.txt");
    std::fs::write(&f, b"ok\nbad \xff byte\n").unwrap();
    let e = read_prompts(&f, PromptFilter::default()).unwrap_err().to_string();
    assert!(e.ends_with("p.txt:2: not UTF-8 (byte 5 of the line)"), "{e}");
    std::fs::write(&f, "ok\n\nmore\n").unwrap();
    let e = read_prompts(&f, PromptFilter::default()).unwrap_err().to_string();
    assert!(e.ends_with("p.txt:2: blank line"), "{e}");
}
