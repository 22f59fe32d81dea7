//! The sample grid PNG: a batch of decoded samples tiled near-square with a thin gap, each
//! optionally captioned (typically its reward), so a person can see what the policy draws.
//!
//! Captions are rendered with a font compiled into the binary (no system font discovery), so
//! the grid comes out the same on a bare machine with no fonts installed.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use ab_glyph::{Font, FontRef, ScaleFont, point};
use tch::{Device, Kind, Tensor};

/// Pixels between tiles and around the edge.
const GAP: usize = 2;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const TEXT: [u8; 3] = [20, 20, 20];

/// Open Sans Regular, unmodified, from Debian's fonts-open-sans 1.11; Apache License 2.0
/// (Digitized data copyright (c) 2010-2011, Google Corporation).
static FONT_BYTES: &[u8] = include_bytes!("../../assets/OpenSans-Regular.ttf");
static FONT: LazyLock<Option<FontRef<'static>>> =
    LazyLock::new(|| FontRef::try_from_slice(FONT_BYTES).ok());

/// Errors of [`write_grid`].
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    /// The images are not a non-empty uint8 `[N, H, W, 3]` batch.
    #[error("grid images must be uint8 [N, H, W, 3] with N, H, W > 0, got {kind:?} {shape:?}")]
    Images {
        /// The tensor's dtype.
        kind: Kind,
        /// The tensor's shape.
        shape: Vec<i64>,
    },
    /// Neither one label per image nor none.
    #[error("{labels} labels for {images} images (give one per image, or none)")]
    Labels {
        /// Labels given.
        labels: usize,
        /// Images given.
        images: usize,
    },
    /// The embedded font could not be parsed (a broken build, not a runtime condition).
    #[error("the embedded caption font is invalid")]
    Font,
    /// libtorch failed moving the images to the host.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// The PNG could not be encoded.
    #[error("cannot encode {path}: {source}")]
    Encode {
        /// The destination.
        path: PathBuf,
        /// The encoder's error.
        source: png::EncodingError,
    },
    /// The file could not be written or moved into place.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Writes `images` (uint8 `[N, H, W, 3]`, any device; the layout rewards score) to `path` as
/// one RGB PNG grid, row-major in batch order.
///
/// `labels` is empty (no captions) or holds one line per image, drawn centred under its tile,
/// e.g. the image's reward as `format!("{score:.3}")`. The file is replaced atomically, so a
/// viewer never sees a partial image.
pub fn write_grid(path: &Path, images: &Tensor, labels: &[String]) -> Result<(), GridError> {
    let shape = images.size();
    let bad_images = || GridError::Images { kind: images.kind(), shape: shape.clone() };
    let &[n, h, w, 3] = shape.as_slice() else { return Err(bad_images()) };
    if images.kind() != Kind::Uint8 || n <= 0 || h <= 0 || w <= 0 {
        return Err(bad_images());
    }
    let (n, h, w) = (n as usize, h as usize, w as usize);
    if !labels.is_empty() && labels.len() != n {
        return Err(GridError::Labels { labels: labels.len(), images: n });
    }
    let font = FONT.as_ref().ok_or(GridError::Font)?;

    let host = images.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = host.numel();
    let mut pixels = vec![0u8; numel];
    host.f_copy_data_u8(&mut pixels, numel)?;

    let layout = Layout::new(n, h, w, !labels.is_empty());
    let (width, height) = layout.size();
    let mut canvas = Canvas { rgb: BACKGROUND.repeat(width * height), width };
    let tile_bytes = h * w * 3;
    for (i, tile) in pixels.chunks_exact(tile_bytes).enumerate() {
        let (x0, y0) = layout.origin(i);
        for (row, src) in tile.chunks_exact(w * 3).enumerate() {
            let start = ((y0 + row) * width + x0) * 3;
            canvas.rgb[start..start + w * 3].copy_from_slice(src);
        }
        if let Some(label) = labels.get(i) {
            canvas.caption(font, layout.caption_px, label, (x0, y0 + h), w);
        }
    }
    write_png_atomic(path, &canvas.rgb, width, height)
}

/// Where the tiles go: `cols` × `rows` cells of the tile plus its caption strip, `GAP` apart.
#[derive(Debug)]
struct Layout {
    cols: usize,
    rows: usize,
    tile_w: usize,
    tile_h: usize,
    /// Caption font size in pixels; 0 without captions.
    caption_px: f32,
    /// Height of the caption strip under each tile.
    caption_h: usize,
}

impl Layout {
    fn new(n: usize, tile_h: usize, tile_w: usize, captions: bool) -> Self {
        let cols = n.isqrt() + usize::from(n.isqrt().pow(2) < n);
        let rows = n.div_ceil(cols);
        // Readable on 64-pixel tiles, not shouting on 1024-pixel ones.
        let caption_px = if captions { (tile_w as f32 / 6.0).clamp(10.0, 24.0) } else { 0.0 };
        let caption_h = if captions { caption_px.ceil() as usize + 2 } else { 0 };
        Self { cols, rows, tile_w, tile_h, caption_px, caption_h }
    }

    fn size(&self) -> (usize, usize) {
        (
            self.cols * (self.tile_w + GAP) + GAP,
            self.rows * (self.tile_h + self.caption_h + GAP) + GAP,
        )
    }

    /// Top-left pixel of tile `i`.
    fn origin(&self, i: usize) -> (usize, usize) {
        let (row, col) = (i / self.cols, i % self.cols);
        (GAP + col * (self.tile_w + GAP), GAP + row * (self.tile_h + self.caption_h + GAP))
    }
}

struct Canvas {
    rgb: Vec<u8>,
    width: usize,
}

impl Canvas {
    /// Draws one line of `text` in the `width`-wide strip whose top-left is `at`: centred when
    /// it fits, otherwise left-aligned and cut at the strip's edge so it never spills into the
    /// next tile.
    fn caption(
        &mut self,
        font: &FontRef<'static>,
        px: f32,
        text: &str,
        at: (usize, usize),
        width: usize,
    ) {
        let font = font.as_scaled(px);
        let glyphs: Vec<_> = text.chars().map(|c| font.glyph_id(c)).collect();
        let advance = |i: usize| {
            let kern = if i > 0 { font.kern(glyphs[i - 1], glyphs[i]) } else { 0.0 };
            kern + font.h_advance(glyphs[i])
        };
        let text_w: f32 = (0..glyphs.len()).map(advance).sum();
        let mut caret = ((width as f32 - text_w) / 2.0).max(0.0);
        let (x_end, y_end) = (at.0 + width, at.1 + font.height().ceil() as usize + 2);
        for (i, &id) in glyphs.iter().enumerate() {
            if i > 0 {
                caret += font.kern(glyphs[i - 1], id);
            }
            let glyph = id.with_scale_and_position(px, point(caret, 1.0 + font.ascent()));
            caret += font.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else { continue };
            let min = outline.px_bounds().min;
            outline.draw(|gx, gy, coverage| {
                let x = at.0 as i64 + min.x as i64 + i64::from(gx);
                let y = at.1 as i64 + min.y as i64 + i64::from(gy);
                if x < at.0 as i64 || x >= x_end as i64 || y < 0 || y >= y_end as i64 {
                    return;
                }
                let start = (y as usize * self.width + x as usize) * 3;
                let alpha = coverage.clamp(0.0, 1.0);
                for (dst, ink) in self.rgb[start..start + 3].iter_mut().zip(TEXT) {
                    *dst = (f32::from(*dst) * (1.0 - alpha) + f32::from(ink) * alpha).round() as u8;
                }
            });
        }
    }
}

fn write_png_atomic(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<(), GridError> {
    let tmp = tmp_path(path);
    let result = write_png(&tmp, path, rgb, width, height)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|source| io_err(path, source)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_png(
    tmp: &Path,
    path: &Path,
    rgb: &[u8],
    width: usize,
    height: usize,
) -> Result<(), GridError> {
    let encode = |source| GridError::Encode { path: path.to_path_buf(), source };
    let too_large = || encode(png::EncodingError::LimitsExceeded);
    let (w, h) = (
        u32::try_from(width).map_err(|_| too_large())?,
        u32::try_from(height).map_err(|_| too_large())?,
    );
    let file = std::fs::File::create(tmp).map_err(|source| io_err(tmp, source))?;
    let mut out = BufWriter::new(file);
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(encode)?;
    writer.write_image_data(rgb).map_err(encode)?;
    writer.finish().map_err(encode)?;
    let file = out.into_inner().map_err(|e| io_err(tmp, e.into_error()))?;
    file.sync_all().map_err(|source| io_err(tmp, source))
}

fn io_err(path: &Path, source: std::io::Error) -> GridError {
    GridError::Io { path: path.to_path_buf(), source }
}

/// A hidden sibling of `path`, unique per process and call, so the rename stays on one
/// filesystem and two writers never share a temp file.
fn tmp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn pixel(rgb: &[u8], width: u32, x: usize, y: usize) -> [u8; 3] {
        let i = (y * width as usize + x) * 3;
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    }

    const COLOURS: [[u8; 3]; 4] = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50]];

    /// Four solid 8×6 (h×w) tiles in batch order red, green, blue, brown.
    fn solid_batch() -> Tensor {
        let data: Vec<u8> = COLOURS.iter().flat_map(|c| c.repeat(8 * 6)).collect();
        Tensor::from_slice(&data).view([4, 8, 6, 3])
    }

    fn files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn solid_tiles_land_in_a_two_by_two_grid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        write_grid(&path, &solid_batch(), &[]).unwrap();

        let (width, height, rgb) = decode(&path);
        assert_eq!((width, height), (2 * (6 + 2) + 2, 2 * (8 + 2) + 2));
        for (i, colour) in COLOURS.iter().enumerate() {
            let (x0, y0) = (2 + (i % 2) * 8, 2 + (i / 2) * 10);
            for (x, y) in [(x0, y0), (x0 + 5, y0), (x0, y0 + 7), (x0 + 5, y0 + 7)] {
                assert_eq!(pixel(&rgb, width, x, y), *colour, "tile {i} at ({x}, {y})");
            }
        }
        // The gaps between and around the tiles are background.
        for (x, y) in [(0, 0), (1, 5), (8, 5), (9, 5), (4, 10), (4, 11), (17, 21)] {
            assert_eq!(pixel(&rgb, width, x, y), BACKGROUND, "gap at ({x}, {y})");
        }
        assert_eq!(files(dir.path()), ["grid.png"], "temp file left behind");
    }

    #[test]
    fn layout_is_near_square() {
        let dims = |n| {
            let l = Layout::new(n, 1, 1, false);
            (l.cols, l.rows)
        };
        assert_eq!(dims(1), (1, 1));
        assert_eq!(dims(2), (2, 1));
        assert_eq!(dims(3), (2, 2));
        assert_eq!(dims(4), (2, 2));
        assert_eq!(dims(5), (3, 2));
        assert_eq!(dims(9), (3, 3));
        assert_eq!(dims(12), (4, 3));
    }

    #[test]
    fn captions_are_drawn_under_their_tiles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let images =
            Tensor::zeros([3, 64, 64, 3], (Kind::Uint8, Device::Cpu)).f_add_scalar(255).unwrap();
        let labels = ["0.731".to_string(), String::new(), "-1.250".to_string()];
        write_grid(&path, &images, &labels).unwrap();

        let (width, height, rgb) = decode(&path);
        let layout = Layout::new(3, 64, 64, true);
        assert_eq!((width as usize, height as usize), layout.size());
        let ink_under = |i: usize| {
            let (x0, y0) = layout.origin(i);
            let strip = (y0 + 64..y0 + 64 + layout.caption_h)
                .flat_map(|y| (x0..x0 + 64).map(move |x| (x, y)));
            strip.filter(|&(x, y)| pixel(&rgb, width, x, y)[0] < 128).count()
        };
        assert!(ink_under(0) > 10, "no caption under tile 0");
        assert_eq!(ink_under(1), 0, "empty label drew something");
        assert!(ink_under(2) > 10, "no caption under tile 2");
        // The tiles themselves stay untouched.
        let (x0, y0) = layout.origin(0);
        assert!((y0..y0 + 64).all(|y| (x0..x0 + 64).all(|x| pixel(&rgb, width, x, y) == [255; 3])));
    }

    #[test]
    fn a_long_caption_stays_inside_its_tile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let images = Tensor::zeros([2, 16, 16, 3], (Kind::Uint8, Device::Cpu));
        let labels = ["a very long caption indeed".to_string(), String::new()];
        write_grid(&path, &images, &labels).unwrap();
        let (width, _, rgb) = decode(&path);
        let layout = Layout::new(2, 16, 16, true);
        let (x1, y1) = layout.origin(1);
        let strip = (y1 + 16..y1 + 16 + layout.caption_h)
            .flat_map(|y| (x1 - GAP..x1 + 16).map(move |x| (x, y)));
        assert!(strip.into_iter().all(|(x, y)| pixel(&rgb, width, x, y) == BACKGROUND));
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let cases = [
            Tensor::zeros([2, 8, 8, 3], (Kind::Float, Device::Cpu)),
            Tensor::zeros([2, 3, 8, 8], (Kind::Uint8, Device::Cpu)),
            Tensor::zeros([8, 8, 3], (Kind::Uint8, Device::Cpu)),
            Tensor::zeros([0, 8, 8, 3], (Kind::Uint8, Device::Cpu)),
            Tensor::zeros([2, 0, 8, 3], (Kind::Uint8, Device::Cpu)),
        ];
        for images in &cases {
            let err = write_grid(&path, images, &[]).unwrap_err();
            assert!(matches!(err, GridError::Images { .. }), "{err}");
            assert!(err.to_string().contains("uint8 [N, H, W, 3]"), "{err}");
        }
        let err = write_grid(&path, &solid_batch(), &["only one".into()]).unwrap_err();
        assert_eq!(err.to_string(), "1 labels for 4 images (give one per image, or none)");
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn a_strided_view_is_read_in_logical_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        // Channels-first storage permuted to [N, H, W, 3]: not contiguous.
        let chw = solid_batch().permute([0, 3, 1, 2]).contiguous();
        write_grid(&path, &chw.permute([0, 2, 3, 1]), &[]).unwrap();
        let (width, _, rgb) = decode(&path);
        assert_eq!(pixel(&rgb, width, 2 + 8 + 3, 2 + 10 + 4), COLOURS[3]);
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory in the way makes the final rename fail.
        let path = dir.path().join("grid.png");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), b"x").unwrap();
        let err = write_grid(&path, &solid_batch(), &[]).unwrap_err();
        assert!(matches!(err, GridError::Io { .. }), "{err}");
        assert_eq!(files(dir.path()), ["grid.png"]);
    }
}
