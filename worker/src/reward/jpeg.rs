//! JPEG compressibility and incompressibility, the no-weights rewards of DDPO (Black et al.,
//! 2023): encode at quality 95 and score `∓ size in kB` (kB = 1000 bytes).
//!
//! The encoder is the pure-Rust `jpeg-encoder` crate (baseline, 4:2:0, fixed Huffman tables),
//! so a given image always gives the same size on every machine. Sizes differ from PIL/libjpeg
//! by a few percent; only differences between images matter for advantages.

use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
use tch::{Device, Kind, Tensor};

use super::{Reward, RewardError, check_batch};

/// Name of the reward `-size_kB` (smaller files score higher).
pub const COMPRESSIBILITY: &str = "jpeg_compressibility";
/// Name of the reward `+size_kB` (larger files score higher).
pub const INCOMPRESSIBILITY: &str = "jpeg_incompressibility";
/// DDPO's quality setting.
pub const QUALITY: u8 = 95;

/// The JPEG size reward, in either direction.
#[derive(Debug)]
pub struct JpegReward {
    sign: f64,
}

impl JpegReward {
    /// `-size_kB`.
    pub fn compressibility() -> Self {
        Self { sign: -1.0 }
    }

    /// `+size_kB`.
    pub fn incompressibility() -> Self {
        Self { sign: 1.0 }
    }
}

/// Size in bytes of `rgb` (`h·w·3` bytes, row-major) encoded as a quality-`quality` JPEG.
pub fn jpeg_size(rgb: &[u8], width: u16, height: u16, quality: u8) -> Result<usize, RewardError> {
    let mut buf = Vec::new();
    let mut enc = Encoder::new(&mut buf, quality);
    // 4:2:0 chroma subsampling, as PIL (libjpeg) does by default.
    enc.set_sampling_factor(SamplingFactor::R_4_2_0);
    enc.encode(rgb, width, height, ColorType::Rgb)
        .map_err(|e| RewardError::Input(format!("JPEG encode of {width}x{height}: {e}")))?;
    Ok(buf.len())
}

impl Reward for JpegReward {
    fn name(&self) -> &str {
        if self.sign < 0.0 { COMPRESSIBILITY } else { INCOMPRESSIBILITY }
    }

    fn score(&mut self, images: &Tensor, prompts: &[String]) -> Result<Vec<f64>, RewardError> {
        let n = check_batch(images, prompts)?;
        let (h, w) = (images.size()[1], images.size()[2]);
        let (hh, ww) = match (u16::try_from(h), u16::try_from(w)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(RewardError::Input(format!("{h}x{w} is too large for JPEG"))),
        };
        let cpu = images.f_to_device(Device::Cpu)?.f_to_kind(Kind::Uint8)?.f_contiguous()?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n as i64 {
            let img = cpu.f_get(i)?.f_flatten(0, -1)?;
            let bytes = Vec::<u8>::try_from(&img)?;
            out.push(self.sign * jpeg_size(&bytes, ww, hh, QUALITY)? as f64 / 1000.0);
        }
        Ok(out)
    }
}
