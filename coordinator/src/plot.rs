//! The reward-curve PNG: the mean of each configured reward per iteration, redrawn after every
//! iteration next to the reward log, so a person can watch a job train without any tooling.
//!
//! Text is rendered with a font compiled into the binary (no system font discovery), so the
//! plot comes out the same on a bare machine with no fonts installed.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use ab_glyph::{Font, FontRef, PxScaleFont, ScaleFont, point};
use plotters::chart::SeriesAnno;
use plotters::coord::types::{RangedCoordf64, RangedCoordusize};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
// BackendStyle stays unimported: its `stroke_width` would shadow the colour builder's.
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

/// Width of the PNG in pixels.
pub const WIDTH: u32 = 960;
/// Height of the PNG in pixels.
pub const HEIGHT: u32 = 540;

/// Line colours, one per reward in config order (matplotlib's tab10, so the plot reads like the
/// ones made with the reference's scripts).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Open Sans Regular, unmodified, from Debian's fonts-open-sans 1.11; Apache License 2.0
/// (Digitized data copyright (c) 2010-2011, Google Corporation).
static FONT_BYTES: &[u8] = include_bytes!("../assets/OpenSans-Regular.ttf");
const FAMILY: &str = "sans-serif";

static FONT: LazyLock<Option<FontRef<'static>>> =
    LazyLock::new(|| FontRef::try_from_slice(FONT_BYTES).ok());

/// plotters sizes the legend box with its own font table, so the font is registered there
/// too (once: the table is process-wide).
static FONT_REGISTERED: LazyLock<bool> =
    LazyLock::new(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_BYTES).is_ok());

/// Errors of [`write_reward_curve`].
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The embedded font could not be parsed (a broken build, not a runtime condition).
    #[error("the embedded plot font is invalid")]
    Font,
    /// plotters failed to draw.
    #[error("cannot draw the reward curve: {0}")]
    Draw(String),
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

fn draw_err(e: impl std::error::Error) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Draws the reward curves and writes them to `path` as a [`WIDTH`]×[`HEIGHT`] RGB PNG.
///
/// `series` holds one `(reward name, mean per iteration)` per reward; index `i` of the values is
/// iteration `i`. Non-finite values (and absurd ones beyond ±1e12) are left out; the line
/// breaks there. Long series get a moving average drawn over the faded raw line. The file is
/// replaced atomically, so a viewer polling it never sees a partial image.
pub fn write_reward_curve(
    path: &Path,
    title: &str,
    series: &[(String, Vec<f64>)],
) -> Result<(), PlotError> {
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut rgb, title, series)?;
    write_png_atomic(path, &rgb)
}

fn draw(rgb: &mut [u8], title: &str, series: &[(String, Vec<f64>)]) -> Result<(), PlotError> {
    let font = FONT.as_ref().filter(|_| *FONT_REGISTERED).ok_or(PlotError::Font)?;
    let canvas = Canvas { inner: BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)), font };
    let root = canvas.into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;

    let len = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    // An axis needs a non-empty range even before the second iteration.
    let x_max = len.saturating_sub(1).max(1);
    let (y_min, y_max) = y_range(series);

    let mut builder = ChartBuilder::on(&root);
    builder.margin(16).x_label_area_size(44).y_label_area_size(72);
    if !title.is_empty() {
        builder.caption(title, (FAMILY, 22));
    }
    let mut chart = builder.build_cartesian_2d(0..x_max, y_min..y_max).map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .y_desc("mean reward")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(245, 245, 245))
        .y_label_formatter(&|v| format_tick(*v, y_max - y_min))
        .draw()
        .map_err(draw_err)?;

    for (i, (name, values)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let raw: Vec<Option<f64>> = values.iter().map(|&v| plottable(v).then_some(v)).collect();
        let window = smoothing_window(values.len());
        let (main, label) = if window > 1 {
            draw_line(&mut chart, &raw, colour.mix(0.3).stroke_width(1))?;
            (moving_average(&raw, window), format!("{name} (mean of {window})"))
        } else {
            (raw, name.clone())
        };
        let style = colour.stroke_width(2);
        draw_line(&mut chart, &main, style)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)
}

type Chart<'a, 'b> = ChartContext<'a, Canvas<'b>, Cartesian2d<RangedCoordusize, RangedCoordf64>>;

/// Draws the finite runs of `values` as polylines and isolated points as dots (a polyline of
/// one point is invisible, which would hide the first iteration entirely). Returns the polyline
/// series so the caller can attach the legend entry to it.
fn draw_line<'a, 'b, 'c>(
    chart: &'c mut Chart<'a, 'b>,
    values: &[Option<f64>],
    style: ShapeStyle,
) -> Result<&'c mut SeriesAnno<'a, Canvas<'b>>, PlotError> {
    let mut runs: Vec<Vec<(usize, f64)>> = vec![Vec::new()];
    for (x, v) in values.iter().enumerate() {
        match v {
            Some(y) => runs.last_mut().expect("never empty").push((x, *y)),
            None if !runs.last().expect("never empty").is_empty() => runs.push(Vec::new()),
            None => {}
        }
    }
    let dots: Vec<(usize, f64)> = runs.iter().filter(|r| r.len() == 1).map(|r| r[0]).collect();
    chart
        .draw_series(dots.into_iter().map(|p| Circle::new(p, 3, style.filled())))
        .map_err(draw_err)?;
    chart
        .draw_series(runs.into_iter().filter(|r| r.len() > 1).map(|r| PathElement::new(r, style)))
        .map_err(draw_err)
}

/// The bitmap backend with our own text rendering: plotters 0.3.7's ab_glyph path drops each
/// glyph's side bearing and truncates its vertical offset, so letters visibly wobble.
struct Canvas<'a> {
    inner: BitMapBackend<'a>,
    font: &'static FontRef<'static>,
}

type CanvasResult =
    Result<(), DrawingErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

impl DrawingBackend for Canvas<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> CanvasResult {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> CanvasResult {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> CanvasResult {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> CanvasResult {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> CanvasResult {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> CanvasResult {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let font = self.font.as_scaled(style.size() as f32);
        Ok((text_width(&font, text).ceil() as u32, font.height().ceil() as u32))
    }

    /// Lays the text out in a box one font height tall (ascent above the baseline, descent
    /// below), anchored as plotters asks, then rotates it with the style's transform.
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> CanvasResult {
        let colour = style.color();
        if colour.alpha == 0.0 {
            return Ok(());
        }
        let font = self.font.as_scaled(style.size() as f32);
        let width = text_width(&font, text);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0.0,
            HPos::Center => -width / 2.0,
            HPos::Right => -width,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0.0,
            VPos::Center => -font.height() / 2.0,
            VPos::Bottom => -font.height(),
        };
        let transform = style.transform();
        let mut caret = dx;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(prev) = prev {
                caret += font.kern(prev, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(font.scale(), point(caret, dy + font.ascent()));
            caret += font.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else { continue };
            let min = outline.px_bounds().min;
            let mut result = Ok(());
            outline.draw(|x, y, coverage| {
                let (x, y) = transform.transform(min.x as i32 + x as i32, min.y as i32 + y as i32);
                let colour = BackendColor {
                    alpha: colour.alpha * f64::from(coverage.min(1.0)),
                    rgb: colour.rgb,
                };
                if result.is_ok() {
                    result = self.inner.draw_pixel((pos.0 + x, pos.1 + y), colour);
                }
            });
            result?;
        }
        Ok(())
    }
}

fn text_width(font: &PxScaleFont<&FontRef<'static>>, text: &str) -> f32 {
    let mut width = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(prev) = prev {
            width += font.kern(prev, id);
        }
        width += font.h_advance(id);
        prev = Some(id);
    }
    width
}

/// Whether a value goes on the plot. NaN and infinities are left out, and so are magnitudes
/// no mean reward reaches: plotters 0.3.7 overflows or loops computing ticks for such ranges.
fn plottable(v: f64) -> bool {
    v.abs() <= 1e12
}

/// The y axis spans all finite values with a little headroom; a flat or empty plot still gets
/// a non-empty range.
fn y_range(series: &[(String, Vec<f64>)]) -> (f64, f64) {
    let finite = series.iter().flat_map(|(_, v)| v).copied().filter(|&v| plottable(v));
    let (lo, hi) =
        finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { (lo.abs() * 0.05).max(0.05) };
    (lo - pad, hi + pad)
}

/// Enough decimals to tell ticks about a tenth of the span apart (HPS moves in the third
/// decimal, JPEG rewards in the tens).
fn format_tick(v: f64, span: f64) -> String {
    let decimals = (1.0 - span.log10().floor()).clamp(0.0, 8.0) as usize;
    format!("{v:.decimals$}")
}

/// About a tenth of the run, capped, and none for short runs where the raw line is readable.
fn smoothing_window(len: usize) -> usize {
    let w = (len / 10).min(50);
    if w < 3 { 1 } else { w }
}

/// Trailing mean of the finite values among the last `window`; a missing value stays missing
/// so the smoothed line breaks where the raw one does.
fn moving_average(values: &[Option<f64>], window: usize) -> Vec<Option<f64>> {
    (0..values.len())
        .map(|i| {
            values[i]?;
            let recent = values[(i + 1).saturating_sub(window)..=i].iter().flatten();
            let (sum, n) = recent.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
            Some(sum / n as f64)
        })
        .collect()
}

fn write_png_atomic(path: &Path, rgb: &[u8]) -> Result<(), PlotError> {
    let tmp = tmp_path(path);
    let result = write_png(&tmp, path, rgb)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|source| io_err(path, source)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_png(tmp: &Path, path: &Path, rgb: &[u8]) -> Result<(), PlotError> {
    let file = std::fs::File::create(tmp).map_err(|source| io_err(tmp, source))?;
    let mut out = BufWriter::new(file);
    let encode = |source| PlotError::Encode { path: path.to_path_buf(), source };
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(encode)?;
    writer.write_image_data(rgb).map_err(encode)?;
    writer.finish().map_err(encode)?;
    let file = out.into_inner().map_err(|e| io_err(tmp, e.into_error()))?;
    file.sync_all().map_err(|source| io_err(tmp, source))
}

fn io_err(path: &Path, source: std::io::Error) -> PlotError {
    PlotError::Io { path: path.to_path_buf(), source }
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

    fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    fn count_colour(rgb: &[u8], c: RGBColor) -> usize {
        rgb.chunks_exact(3).filter(|p| p == &[c.0, c.1, c.2]).count()
    }

    fn only_file(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn writes_a_png_with_one_coloured_line_per_reward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reward.png");
        let hps: Vec<f64> =
            (0..200).map(|i| 0.2 + 0.001 * i as f64 + 0.01 * (i as f64).sin()).collect();
        let jpeg: Vec<f64> = (0..200).map(|i| -1.0 + 0.002 * i as f64).collect();
        let series = vec![("hps".to_string(), hps), ("jpeg".to_string(), jpeg)];
        write_reward_curve(&path, "job-1", &series).unwrap();

        let (info, rgb) = decode(&path);
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        // Far more pixels than the legend swatch alone: the lines are drawn across the plot.
        assert!(count_colour(&rgb, PALETTE[0]) > 500, "no hps line");
        assert!(count_colour(&rgb, PALETTE[1]) > 500, "no jpeg line");
        assert_eq!(count_colour(&rgb, PALETTE[2]), 0);
        // Text was rendered: dark pixels left of the plot area (the y tick labels).
        let dark_left = (0..HEIGHT as usize)
            .flat_map(|y| (0..60).map(move |x| (y * WIDTH as usize + x) * 3))
            .filter(|&i| rgb[i] < 100 && rgb[i + 1] < 100 && rgb[i + 2] < 100)
            .count();
        assert!(dark_left > 50, "no tick labels");
        assert_eq!(only_file(dir.path()), ["reward.png"], "temp file left behind");
    }

    #[test]
    fn edge_cases_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reward.png");
        let cases: Vec<Vec<(String, Vec<f64>)>> = vec![
            vec![],
            vec![("hps".into(), vec![])],
            vec![("hps".into(), vec![0.25])],
            vec![("hps".into(), vec![f64::NAN, f64::NAN])],
            vec![("hps".into(), vec![0.3; 100])],
            vec![("hps".into(), vec![0.0; 7])],
            vec![("hps".into(), vec![1.0, f64::NAN, 2.0, f64::INFINITY, 3.0, 4.0])],
            vec![("a".into(), vec![1e-9, 2e-9]), ("b".into(), vec![f64::NEG_INFINITY])],
            vec![("big".into(), (0..5000).map(|i| i as f64 * 1e6).collect())],
            vec![("huge".into(), vec![-1e308, 1e308])],
            vec![("large".into(), vec![-1e12, 1e12, 0.0])],
            vec![("flat-ish".into(), vec![1.0, 1.0 + 1e-15, 1.0 - 1e-15])],
        ];
        for (i, series) in cases.iter().enumerate() {
            write_reward_curve(&path, "", series).unwrap_or_else(|e| panic!("case {i}: {e}"));
            let (info, _) = decode(&path);
            assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        }
        assert_eq!(only_file(dir.path()), ["reward.png"]);
    }

    #[test]
    fn a_single_point_is_visible() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reward.png");
        write_reward_curve(&path, "first", &[("hps".into(), vec![0.25])]).unwrap();
        let (_, rgb) = decode(&path);
        // The legend swatch is a 20 px line; the dot adds to it.
        assert!(count_colour(&rgb, PALETTE[0]) > 40);
    }

    #[test]
    fn failed_write_leaves_no_temp_file_and_keeps_the_old_plot() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the way makes the rename fail after the temp file was written.
        let path = dir.path().join("reward.png");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), b"x").unwrap();
        let err = write_reward_curve(&path, "", &[("hps".into(), vec![1.0, 2.0])]).unwrap_err();
        assert!(matches!(err, PlotError::Io { .. }), "{err}");
        assert_eq!(only_file(dir.path()), ["reward.png"]);
        assert!(path.join("keep").exists());
    }

    #[test]
    fn moving_average_breaks_where_the_data_does() {
        let v = [Some(1.0), Some(3.0), None, Some(5.0), Some(7.0)];
        assert_eq!(moving_average(&v, 2), [Some(1.0), Some(2.0), None, Some(5.0), Some(6.0)]);
        assert_eq!(smoothing_window(10), 1);
        assert_eq!(smoothing_window(300), 30);
        assert_eq!(smoothing_window(100_000), 50);
    }

    #[test]
    fn tick_labels_resolve_the_range() {
        assert_eq!(format_tick(0.2512, 0.01), "0.251");
        assert_eq!(format_tick(12.0, 50.0), "12");
    }
}
