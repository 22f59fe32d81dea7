//! transformers' `CLIPImageProcessor` (5.x, the torchvision backend `CLIPProcessor` loads), as
//! `preprocessor_config.json` configures it: resize the shortest edge to `size.shortest_edge`
//! (the long edge to `int(shortest · long / short)`), bicubic with antialiasing **on the uint8
//! image** (torchvision's native uint8 kernel on the CPU, Pillow's fixed-point filter), center
//! crop (`int((h − crop_h) / 2.0)` from the top, zero padding first when the crop is larger),
//! then `(x − 255·mean) / (255·std)` in f32 (rescale fused into the normalisation).
//!
//! It runs on the CPU whatever device the reward model is on: the uint8 kernel, which is what the
//! reference runs (its processor works on CPU tensors), exists only there. Images of 720² are a
//! few hundred microseconds each; the 3×224² result is what moves to the accelerator.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::RewardError;
use super::preprocess::{OPENAI_MEAN, OPENAI_STD};

/// A `size` / `crop_size` entry: `{"shortest_edge": n}`, `{"height": h, "width": w}`, or `n`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum Size {
    Int(i64),
    Edge { shortest_edge: i64 },
    Hw { height: i64, width: i64 },
}

/// The resampling filters transformers maps from PIL's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// PIL 2.
    Bilinear,
    /// PIL 3, what every CLIP processor uses.
    Bicubic,
}

/// The fields of `preprocessor_config.json` a `CLIPImageProcessor` reads, with its defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct Raw {
    do_resize: bool,
    size: Size,
    resample: i64,
    do_center_crop: bool,
    crop_size: Size,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: Vec<f64>,
    image_std: Vec<f64>,
}

impl Default for Raw {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: Size::Edge { shortest_edge: 224 },
            resample: 3,
            do_center_crop: true,
            crop_size: Size::Hw { height: 224, width: 224 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_MEAN.to_vec(),
            image_std: OPENAI_STD.to_vec(),
        }
    }
}

/// How the resize step sizes its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResizeTo {
    ShortestEdge(i64),
    Exact(i64, i64),
}

/// A configured `CLIPImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipImageProcessor {
    resize: Option<(ResizeTo, Resample)>,
    crop: Option<(i64, i64)>,
    rescale: Option<f64>,
    normalize: Option<([f64; 3], [f64; 3])>,
}

impl Default for ClipImageProcessor {
    /// `CLIPImageProcessor()`: 224 shortest edge, bicubic, 224² crop, OpenAI mean and std.
    fn default() -> Self {
        Self::from_raw(Raw::default()).expect("the defaults are valid")
    }
}

impl ClipImageProcessor {
    /// Parses `preprocessor_config.json`'s text.
    pub fn from_json(text: &str) -> Result<Self, RewardError> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| RewardError::Files(format!("preprocessor config: {e}")))?;
        Self::from_raw(raw)
    }

    /// Reads `path`; `None`: the class defaults (a folder without the file, as
    /// `yuvalkirstain/PickScore_v1`, whose processor is laion's ViT-H-14 one, the defaults).
    pub fn from_file(path: Option<&Path>) -> Result<Self, RewardError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| RewardError::Files(format!("{}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| RewardError::Files(format!("{}: {e}", path.display())))
    }

    fn from_raw(r: Raw) -> Result<Self, RewardError> {
        let bad = |m: String| Err(RewardError::Files(format!("preprocessor config: {m}")));
        let resample = match r.resample {
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            other => {
                return bad(format!("resample {other} is not supported (2 bilinear, 3 bicubic)"));
            }
        };
        let resize = match r.size {
            Size::Edge { shortest_edge } | Size::Int(shortest_edge) => {
                ResizeTo::ShortestEdge(shortest_edge)
            }
            Size::Hw { height, width } => ResizeTo::Exact(height, width),
        };
        let crop = match r.crop_size {
            Size::Hw { height, width } => (height, width),
            Size::Int(n) | Size::Edge { shortest_edge: n } => (n, n),
        };
        if [crop.0, crop.1].iter().any(|n| *n <= 0)
            || matches!(resize, ResizeTo::ShortestEdge(n) if n <= 0)
            || matches!(resize, ResizeTo::Exact(h, w) if h <= 0 || w <= 0)
        {
            return bad("sizes must be positive".into());
        }
        let three = |v: &[f64], name: &str| -> Result<[f64; 3], RewardError> {
            v.try_into().map_err(|_| {
                RewardError::Files(format!("preprocessor config: {name} needs 3 values, got {v:?}"))
            })
        };
        let normalize = if r.do_normalize {
            Some((three(&r.image_mean, "image_mean")?, three(&r.image_std, "image_std")?))
        } else {
            None
        };
        Ok(Self {
            resize: r.do_resize.then_some((resize, resample)),
            crop: r.do_center_crop.then_some(crop),
            rescale: r.do_rescale.then_some(r.rescale_factor),
            normalize,
        })
    }

    /// The side the model sees, when the processor fixes it (after the crop).
    pub fn output_size(&self) -> Option<(i64, i64)> {
        self.crop.or(match self.resize {
            Some((ResizeTo::Exact(h, w), _)) => Some((h, w)),
            _ => None,
        })
    }

    /// Pixels `[N, 3, h, w]` (f32, CPU) of uint8 images `[N, H, W, 3]` on any device.
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor, RewardError> {
        let dims = images.size();
        if dims.len() != 4 || dims[3] != 3 || images.kind() != Kind::Uint8 {
            return Err(RewardError::Input(format!(
                "images must be uint8 [N, H, W, 3], got {:?} {dims:?}",
                images.kind()
            )));
        }
        let (h, w) = (dims[1], dims[2]);
        let x = images.f_to_device(Device::Cpu)?.f_permute([0, 3, 1, 2])?.f_contiguous()?;
        let x = match self.resize {
            None => x,
            Some((to, filter)) => {
                let (nh, nw) = match to {
                    ResizeTo::Exact(nh, nw) => (nh, nw),
                    ResizeTo::ShortestEdge(s) => {
                        let (short, long) = if w <= h { (w, h) } else { (h, w) };
                        let new_long = ((s * long) as f64 / short as f64) as i64;
                        if w <= h { (new_long, s) } else { (s, new_long) }
                    }
                };
                if (nh, nw) == (h, w) {
                    x
                } else {
                    match filter {
                        Resample::Bicubic => {
                            x.f_internal_upsample_bicubic2d_aa([nh, nw], false, None, None)?
                        }
                        Resample::Bilinear => {
                            x.f_internal_upsample_bilinear2d_aa([nh, nw], false, None, None)?
                        }
                    }
                }
            }
        };
        let x = match self.crop {
            None => x,
            Some((ch, cw)) => center_crop(&x, ch, cw)?,
        };
        let x = x.f_to_kind(Kind::Float)?;
        Ok(match (self.normalize, self.rescale) {
            (Some((mean, std)), rescale) => {
                // The fused form transformers computes: mean and std scaled by 1/rescale_factor in
                // f32, then (x − mean) / std.
                let f = rescale.map_or(1.0, |r| 1.0 / r);
                let t = |v: [f64; 3]| -> Result<Tensor, tch::TchError> {
                    let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
                    Tensor::f_from_slice(&v32)?.f_mul_scalar(f)?.f_view([1, 3, 1, 1])
                };
                x.f_sub(&t(mean)?)?.f_div(&t(std)?)?
            }
            (None, Some(r)) => x.f_mul_scalar(r)?,
            (None, None) => x,
        })
    }
}

/// transformers' torchvision `center_crop`: zero padding to the crop size first when the image
/// is smaller (left/top get the floor of half the difference), then the crop from
/// `int((h − ch) / 2.0)`, `int((w − cw) / 2.0)`.
fn center_crop(x: &Tensor, ch: i64, cw: i64) -> Result<Tensor, tch::TchError> {
    let (_, _, h, w) = x.size4()?;
    let mut x = x.shallow_clone();
    let (mut h, mut w) = (h, w);
    if cw > w || ch > h {
        let (pw, ph) = ((cw - w).max(0), (ch - h).max(0));
        x = x.f_constant_pad_nd([pw / 2, (pw + 1) / 2, ph / 2, (ph + 1) / 2])?;
        (h, w) = (h + ph, w + pw);
        if (h, w) == (ch, cw) {
            return Ok(x);
        }
    }
    let top = ((h - ch) as f64 / 2.0) as i64;
    let left = ((w - cw) as f64 / 2.0) as i64;
    x.f_narrow(2, top, ch)?.f_narrow(3, left, cw)?.f_contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers() {
        let p = ClipImageProcessor::default();
        assert_eq!(p.output_size(), Some((224, 224)));
        let img = Tensor::zeros([1, 300, 500, 3], (Kind::Uint8, Device::Cpu));
        assert_eq!(p.preprocess(&img).unwrap().size(), [1, 3, 224, 224]);
        // No crop: 224 × int(224·500/300) = 224 × 373.
        let p = ClipImageProcessor::from_json(r#"{"do_center_crop": false}"#).unwrap();
        assert_eq!(p.preprocess(&img).unwrap().size(), [1, 3, 224, 373]);
        // A crop larger than the image pads with zeros (normalised: −mean/std).
        let p = ClipImageProcessor::from_json(
            r#"{"do_resize": false, "crop_size": {"height": 4, "width": 5}}"#,
        )
        .unwrap();
        let img = Tensor::full([1, 2, 3, 3], 255, (Kind::Uint8, Device::Cpu));
        let out = p.preprocess(&img).unwrap();
        assert_eq!(out.size(), [1, 3, 4, 5]);
        let corner = out.double_value(&[0, 0, 0, 0]);
        assert!((corner + OPENAI_MEAN[0] / OPENAI_STD[0]).abs() < 1e-5, "{corner}");
        let inside = out.double_value(&[0, 0, 1, 1]);
        assert!((inside - (1.0 - OPENAI_MEAN[0]) / OPENAI_STD[0]).abs() < 1e-5, "{inside}");
        let e = ClipImageProcessor::from_json(r#"{"resample": 1}"#).unwrap_err();
        assert!(e.to_string().contains("resample 1 is not supported"), "{e}");
    }
}
