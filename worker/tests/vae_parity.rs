//! Parity of the FLUX VAE decoder and image post-processing with diffusers 0.42.1
//! (`AutoencoderKL.decode` + `VaeImageProcessor.postprocess`) on a tiny config.

mod flux_common;

use dancegrpo_worker::vae::{load_vae, to_uint8};
use flux_common::{golden, golden_dir, max_abs, rel_err};
use tch::{Device, Kind};

/// Packed latents → unpack → scale/shift → decode, batch 2 at 48×80 px: f32 within 1e-4 of the
/// output scale; the uint8 image differs by at most one level (a value within f32 rounding of a
/// .5 boundary may round either way), and on almost no pixels.
#[test]
fn decode_matches_diffusers() {
    let vae = load_vae(&golden_dir().join("tiny/vae"), Device::Cpu, Kind::Float).unwrap();
    let g = golden("vae_decode.safetensors");
    let image = tch::no_grad(|| vae.decoder.decode_packed(&g["packed_latents"], 48, 80)).unwrap();
    assert_eq!(image.size(), [2, 3, 48, 80]);
    let e = rel_err(&image, &g["image"]);
    assert!(e <= 1e-4, "relative max error {e}");
    let u8 = to_uint8(&image).unwrap();
    assert_eq!(u8.kind(), Kind::Uint8);
    assert_eq!(u8.size(), [2, 48, 80, 3]);
    assert!(max_abs(&u8, &g["image_u8"]) <= 1.0);
    let differing = u8
        .to_kind(Kind::Int)
        .ne_tensor(&g["image_u8"].to_kind(Kind::Int))
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(differing <= 2, "{differing} uint8 values differ");
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
