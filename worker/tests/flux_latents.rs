//! Pack / unpack / position ids against the reference layout (ALGORITHM.md §7).

mod flux_common;
mod numerics;

use dancegrpo_worker::latents::{img_ids, latent_size, pack, txt_ids, unpack};
use flux_common::golden;

#[test]
fn pack_unpack_and_ids_match_reference() {
    let g = golden("latents.safetensors");
    let packed = pack(&g["latents"]).unwrap();
    assert!(packed.equal(&g["packed"]), "pack differs");
    assert!(unpack(&packed, 48, 80).unwrap().equal(&g["latents"]), "unpack differs");
    assert!(img_ids(48, 80).unwrap().equal(&g["img_ids"]), "img_ids differ");
    assert_eq!(txt_ids(512).unwrap().size(), [512, 3]);
    assert_eq!(txt_ids(512).unwrap().abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
}

/// 720 px (DanceGRPO) gives the 90×90 latent and 2025 tokens; sizes off the 16-px grid and
/// mismatched token counts are errors, not panics.
#[test]
fn sizes_are_checked() {
    assert_eq!(latent_size(720, 720).unwrap(), (90, 90));
    assert_eq!(img_ids(720, 720).unwrap().size(), [2025, 3]);
    let e = latent_size(50, 64).unwrap_err().to_string();
    assert!(e.contains("50x64"), "{e}");
    let packed = tch::Tensor::zeros([1, 16, 64], (tch::Kind::Float, tch::Device::Cpu));
    let e = unpack(&packed, 48, 80).unwrap_err().to_string();
    assert!(e.contains("[B, 15, 4C]"), "{e}");
    assert!(
        pack(&tch::Tensor::zeros([1, 16, 5, 4], (tch::Kind::Float, tch::Device::Cpu))).is_err()
    );
}
