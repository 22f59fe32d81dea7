//! HPSv2's image preprocessing (`preprocess_val` with `light_augmentation=True`):
//! `ToTensor` → `ResizeMaxSize(image_size)` → OpenAI normalisation.
//!
//! `ResizeMaxSize` scales the longest side to `image_size` (bicubic with antialiasing, on the
//! float tensor, no clamping) and zero-pads the short side, centred, before normalisation.
//! HPSv2 skips resize *and* pad when the longest side already equals `image_size`, which
//! would leave a non-square image unpadded (and crash its model); we always pad, which is
//! the identity in every case HPSv2 itself can run.

use tch::{Kind, Tensor};

use super::RewardError;

/// OpenAI CLIP normalisation mean (`OPENAI_DATASET_MEAN`).
pub const OPENAI_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP normalisation std (`OPENAI_DATASET_STD`).
pub const OPENAI_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Python's `round` (ties to even) of `dim * scale`, as `ResizeMaxSize` sizes its output.
fn scaled(dim: i64, scale: f64) -> i64 {
    (dim as f64 * scale).round_ties_even() as i64
}

/// Preprocesses one uint8 image `[H, W, 3]` into normalised pixels `[3, size, size]` (f32,
/// on the image's device).
pub fn preprocess_one(image: &Tensor, size: i64) -> Result<Tensor, RewardError> {
    let dims = image.size();
    if dims.len() != 3 || dims[2] != 3 {
        return Err(RewardError::Input(format!("image must be [H, W, 3], got {dims:?}")));
    }
    let (h, w) = (dims[0], dims[1]);
    if h == 0 || w == 0 {
        return Err(RewardError::Input(format!("image has no pixels ({h}x{w})")));
    }
    if image.kind() != Kind::Uint8 {
        return Err(RewardError::Input(format!("image must be uint8, got {:?}", image.kind())));
    }
    let x = image.f_permute([2, 0, 1])?.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?;
    let scale = size as f64 / h.max(w) as f64;
    let x = if scale != 1.0 {
        let (nh, nw) = (scaled(h, scale).max(1), scaled(w, scale).max(1));
        let r = x.f_unsqueeze(0)?.f_internal_upsample_bicubic2d_aa([nh, nw], false, None, None)?;
        r.f_squeeze_dim(0)?
    } else {
        x
    };
    let (nh, nw) = (x.size()[1], x.size()[2]);
    let (pad_h, pad_w) = (size - nh, size - nw);
    // torchvision's pad order [left, top, right, bottom] = constant_pad_nd's [l, r, t, b].
    let x = x.f_constant_pad_nd([pad_w / 2, pad_w - pad_w / 2, pad_h / 2, pad_h - pad_h / 2])?;
    let opts = (Kind::Float, x.device());
    let mean = Tensor::f_from_slice(&OPENAI_MEAN)?
        .f_to_kind(Kind::Float)?
        .f_to(opts.1)?
        .f_view([3, 1, 1])?;
    let std = Tensor::f_from_slice(&OPENAI_STD)?
        .f_to_kind(Kind::Float)?
        .f_to(opts.1)?
        .f_view([3, 1, 1])?;
    Ok(x.f_sub(&mean)?.f_div(&std)?)
}

/// Preprocesses a batch of uint8 images `[N, H, W, 3]` into `[N, 3, size, size]`.
pub fn preprocess_batch(images: &Tensor, size: i64) -> Result<Tensor, RewardError> {
    let dims = images.size();
    if dims.len() != 4 || dims[3] != 3 {
        return Err(RewardError::Input(format!("images must be [N, H, W, 3] uint8, got {dims:?}")));
    }
    if dims[0] == 0 {
        return Err(RewardError::Input("empty image batch".into()));
    }
    let rows = (0..dims[0])
        .map(|i| preprocess_one(&images.f_get(i)?, size))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_stack(&rows, 0)?)
}
