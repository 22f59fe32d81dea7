//! The `torch.save` reader against files that torch itself wrote (and read back), in every form
//! real checkpoints take: `model.state_dict()` (an OrderedDict with `_metadata`) in the zip and
//! the legacy format, at the top level and under `state_dict`, nn.Parameter values, fp32, fp16,
//! bf16, int64 and bool tensors, tied weights, views with strides and storage offsets; and the
//! one-line errors for files it cannot read. Goldens: tests/golden/pickle/make_goldens.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dancegrpo_worker::pt;
use tch::{Kind, Tensor};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pickle")
}

fn expected() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(golden().join("expected.safetensors")).unwrap().into_iter().collect()
}

fn keys(which: &str) -> Vec<String> {
    let text = std::fs::read_to_string(golden().join("expected_keys.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[which].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()).collect()
}

/// Every tensor of `file` equals the expected one in dtype, shape and value, in the order
/// `torch.save` wrote them.
fn check(file: &str, key: Option<&str>, order: &[String]) -> Vec<(String, Tensor)> {
    let sd = pt::read_state_dict(&golden().join(file), key).unwrap();
    let names: Vec<&str> = sd.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, order.iter().map(String::as_str).collect::<Vec<_>>(), "{file}");
    let want = expected();
    for (k, t) in &sd {
        let w = &want[k];
        assert_eq!(t.kind(), w.kind(), "{file} {k}");
        assert_eq!(t.size(), w.size(), "{file} {k}");
        assert!(t.equal(w), "{file} {k}: values differ");
    }
    sd
}

#[test]
fn a_state_dict_reads_in_both_formats_flat_and_nested() {
    let order = keys("state_dict");
    for (file, key) in [
        ("state_dict.pt", None),
        ("state_dict.pt", Some("state_dict")),
        ("nested.pt", Some("state_dict")),
        ("legacy.pt", None),
        ("legacy_nested.pt", Some("state_dict")),
    ] {
        let sd = check(file, key, &order);
        // The dtypes the module was built with, not a conversion of ours.
        let kind = |k: &str| sd.iter().find(|(n, _)| n == k).unwrap().1.kind();
        assert_eq!(kind("proj.weight"), Kind::Float, "{file}");
        assert_eq!(kind("norm.weight"), Kind::Half, "{file}");
        assert_eq!(kind("low.weight"), Kind::BFloat16, "{file}");
        assert_eq!(kind("position_ids"), Kind::Int64, "{file}");
        assert_eq!(kind("mask"), Kind::Bool, "{file}");
    }
}

#[test]
fn parameters_read_as_their_data() {
    check("parameters.pt", None, &keys("parameters"));
}

#[test]
fn tied_weights_still_share_one_storage() {
    for file in ["state_dict.pt", "legacy.pt"] {
        let sd: HashMap<String, Tensor> =
            pt::read_state_dict(&golden().join(file), None).unwrap().into_iter().collect();
        let text = std::fs::read_to_string(golden().join("expected_keys.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for pair in v["shared"].as_array().unwrap() {
            let (a, b) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
            assert_eq!(sd[a].data_ptr(), sd[b].data_ptr(), "{file}: {a} and {b}");
        }
        // Untied tensors do not alias.
        assert_ne!(sd["proj.weight"].data_ptr(), sd["embed.weight"].data_ptr(), "{file}");
    }
}

#[test]
fn a_state_dict_is_not_one_tensor_and_a_nested_one_needs_its_key() {
    let e = pt::load(&golden().join("state_dict.pt")).unwrap_err().to_string();
    assert!(e.contains("state_dict.pt") && e.contains("found a dict"), "{e}");
    let e = pt::read_state_dict(&golden().join("nested.pt"), None).unwrap_err().to_string();
    assert!(e.contains("nested.pt") && e.contains("entry 'state_dict' is a dict"), "{e}");
    let e = pt::read_state_dict(&golden().join("legacy_nested.pt"), Some("epoch"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("entry 'epoch' is a int, not a dict"), "{e}");
}

#[test]
fn unreadable_files_get_one_line_naming_the_file_and_what_is_in_it() {
    let bad = golden().join("bad");
    let cases = [
        ("truncated.pt", "truncated"),
        ("legacy_truncated.pt", "truncated"),
        ("list_root.pt", "root object is a list, not a dict"),
    ];
    for (file, says) in cases {
        let e = pt::read_state_dict(&bad.join(file), None).unwrap_err().to_string();
        assert!(e.contains(file) && e.contains(says), "{file}: {e}");
        assert_eq!(e.lines().count(), 1, "{file}: {e}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("model.bin");
    std::fs::write(&junk, b"<!DOCTYPE html><html>rate limited</html>").unwrap();
    let e = pt::read_state_dict(&junk, None).unwrap_err().to_string();
    assert!(e.contains("model.bin") && e.contains("3c 21 44 4f"), "{e}");
    let empty = tmp.path().join("empty.pt");
    std::fs::write(&empty, b"").unwrap();
    let e = pt::read_state_dict(&empty, None).unwrap_err().to_string();
    assert!(e.contains("empty.pt") && e.contains("empty"), "{e}");
    // A pickle that is not torch.save's: a bare pickled int (protocol 2).
    let int = tmp.path().join("int.pkl");
    std::fs::write(&int, [0x80, 0x02, b'K', 7, b'.']).unwrap();
    let e = pt::read_state_dict(&int, None).unwrap_err().to_string();
    assert!(e.contains("int.pkl") && e.contains("magic number"), "{e}");
}
