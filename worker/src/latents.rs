//! FLUX latent layout helpers (ALGORITHM.md §7, MODELS.md §2.4): 2×2 patch packing, position
//! ids, and the checks on image sizes.

use tch::{Kind, Tensor};

use crate::flux::error::{ModelError, Result};

/// Latent channels of the FLUX VAE.
pub const LATENT_CHANNELS: i64 = 16;

/// Latent height and width for an image of `height` × `width` pixels (both multiples of 16).
pub fn latent_size(height: i64, width: i64) -> Result<(i64, i64)> {
    if height <= 0 || width <= 0 || height % 16 != 0 || width % 16 != 0 {
        return Err(ModelError::Input(format!(
            "image size {height}x{width}: height and width must be positive multiples of 16"
        )));
    }
    Ok((height / 8, width / 8))
}

/// `[B, C, h, w]` → `[B, (h/2)(w/2), 4C]`; token `r·(w/2)+c`, channel `ch·4 + dy·2 + dx`.
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let s = latents.size();
    if s.len() != 4 || s[2] % 2 != 0 || s[3] % 2 != 0 {
        return Err(ModelError::Input(format!(
            "pack needs [B, C, h, w] with even h, w; got {s:?}"
        )));
    }
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    Ok(latents.f_view([b, c, h / 2, 2, w / 2, 2])?.f_permute([0, 2, 4, 1, 3, 5])?.f_reshape([
        b,
        (h / 2) * (w / 2),
        c * 4,
    ])?)
}

/// The inverse of [`pack`] for an image of `height` × `width` pixels.
pub fn unpack(packed: &Tensor, height: i64, width: i64) -> Result<Tensor> {
    let (h, w) = latent_size(height, width)?;
    let s = packed.size();
    if s.len() != 3 || s[1] != (h / 2) * (w / 2) || s[2] % 4 != 0 {
        return Err(ModelError::Input(format!(
            "unpack to {height}x{width} px needs [B, {}, 4C]; got {s:?}",
            (h / 2) * (w / 2)
        )));
    }
    let (b, c) = (s[0], s[2] / 4);
    Ok(packed
        .f_view([b, h / 2, w / 2, c, 2, 2])?
        .f_permute([0, 3, 1, 4, 2, 5])?
        .f_reshape([b, c, h, w])?)
}

/// Image position ids `[N, 3]` (f32, CPU): row `r`, column `c` of the packed grid → `(0, r, c)`,
/// row-major.
pub fn img_ids(height: i64, width: i64) -> Result<Tensor> {
    let (h, w) = latent_size(height, width)?;
    let (gh, gw) = (h / 2, w / 2);
    let mut v = Vec::with_capacity((gh * gw * 3) as usize);
    for r in 0..gh {
        for c in 0..gw {
            v.extend_from_slice(&[0f32, r as f32, c as f32]);
        }
    }
    Ok(Tensor::from_slice(&v).f_view([gh * gw, 3])?)
}

/// Text position ids: zeros `[len, 3]` (f32, CPU).
pub fn txt_ids(len: i64) -> Result<Tensor> {
    Ok(Tensor::f_zeros([len, 3], (Kind::Float, tch::Device::Cpu))?)
}
