//! Helpers shared by the FLUX/VAE/sampler golden tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use dancegrpo_worker::flux::weights::SafetensorsFile;
use tch::{Kind, Tensor};

/// `tests/golden/flux` at the repository root.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/flux")
}

/// Every tensor of a golden file.
pub fn golden(name: &str) -> BTreeMap<String, Tensor> {
    SafetensorsFile::open(golden_dir().join(name)).unwrap().read_all().unwrap()
}

/// `max |a − b| / max |b|`, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - &b).abs().max().double_value(&[]) / scale
}

/// `max |a − b|`, in f64.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}
