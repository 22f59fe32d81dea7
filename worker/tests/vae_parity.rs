//! Parity of the FLUX VAE decoder and image post-processing with diffusers 0.42.1
//! (`AutoencoderKL.decode` + `VaeImageProcessor.postprocess`) on a tiny config.

mod flux_common;
mod numerics;

use dancegrpo_worker::vae::{load_vae, to_uint8};
use flux_common::{F32_FORWARD_REL, golden, golden_dir, max_abs, rel_err};
use tch::{Device, Kind, Tensor};

/// Packed latents → unpack → scale/shift → decode, batch 2 at 48×80 px: f32 within
/// F32_FORWARD_REL of the output scale; the uint8 image differs by at most one level, and only
/// where the golden's value is within our f32 error of a rounding boundary (such a value may
/// round either way; how many there are depends on the kernels, so they are not counted).
#[test]
fn decode_matches_diffusers() {
    let vae = load_vae(&golden_dir().join("tiny/vae"), Device::Cpu, Kind::Float).unwrap();
    let g = golden("vae_decode.safetensors");
    let image = tch::no_grad(|| vae.decoder.decode_packed(&g["packed_latents"], 48, 80)).unwrap();
    assert_eq!(image.size(), [2, 3, 48, 80]);
    let e = rel_err(&image, &g["image"]);
    assert!(e <= F32_FORWARD_REL, "relative max error {e}");
    let u8 = to_uint8(&image).unwrap();
    assert_eq!(u8.kind(), Kind::Uint8);
    assert_eq!(u8.size(), [2, 48, 80, 3]);
    assert!(max_abs(&u8, &g["image_u8"]) <= 1.0);
    // to_uint8 rounds (x/2 + 0.5)·255: a level may differ only where the golden's scaled value
    // lies within our error (scaled alike) of a .5 boundary.
    let scaled = |t: &Tensor| (t.to_kind(Kind::Double) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
    let slack = 255.0 / 2.0 * max_abs(&image, &g["image"]) + 1e-9;
    let near_boundary =
        (scaled(&g["image"]).frac().abs() - 0.5).abs().le(slack).permute([0, 2, 3, 1]);
    let differing = u8.to_kind(Kind::Int).ne_tensor(&g["image_u8"].to_kind(Kind::Int));
    let unexplained =
        differing.logical_and(&near_boundary.logical_not()).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(unexplained, 0, "uint8 values differ away from a rounding boundary");
    // The golden is not degenerate: both clamp ends and the middle occur.
    let ref_u8 = &g["image_u8"];
    assert!(ref_u8.eq(0).any().int64_value(&[]) == 1 && ref_u8.eq(255).any().int64_value(&[]) == 1);
}

/// The bf16 decoder (DanceGRPO decodes in bf16) stays within 3e-2 of the f32 reference: each
/// conv rounds its output to bf16 (2^-9 relative), through ~15 convs and GroupNorms.
#[test]
fn decode_bf16_close_to_reference() {
    let vae = load_vae(&golden_dir().join("tiny/vae"), Device::Cpu, Kind::BFloat16).unwrap();
    let g = golden("vae_decode.safetensors");
    let image = tch::no_grad(|| vae.decoder.decode_packed(&g["packed_latents"], 48, 80)).unwrap();
    assert_eq!(image.kind(), Kind::BFloat16);
    let e = rel_err(&image, &g["image"]);
    assert!(e <= 3e-2, "relative max error {e}");
}
