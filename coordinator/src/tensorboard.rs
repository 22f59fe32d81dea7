//! TensorBoard event files in `output_dir/tensorboard/`: one scalar per number of each
//! `metrics.jsonl` line, and the sample grid as an image, at the iteration's step.
//!
//! No maintained crate writes plain scalar and image summaries without pulling in a protobuf
//! toolchain or libtorch, so this is the format by hand: TFRecord framing (a length, a masked
//! CRC-32C of it, the data, a masked CRC-32C of that) around `tensorflow.Event` messages
//! written with prost. The messages below carry only the fields we write, with the numbers of
//! TensorFlow's `tensorflow/core/util/event.proto` and `tensorflow/core/framework/summary.proto`
//! (the copies TensorBoard ships as `tensorboard/compat/proto/{event,summary}.proto`), checked
//! against the descriptors of the pinned `tensorboard` package's `event_pb2` and `summary_pb2`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The folder under `output_dir` that holds the event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";
/// The tag of the sample grid image.
pub const SAMPLES_TAG: &str = "samples";
/// The prefix every event file's name starts with (TensorBoard finds files by `tfevents`).
pub const FILE_PREFIX: &str = "events.out.tfevents.";
/// The `file_version` of the first event of a file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `tensorflow.Event` (event.proto): what happened at one step.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The global step: the iteration number.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The event's content (`oneof what`).
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// `Event.what`: the members we write.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first event of a file: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Values at this step.
    #[prost(message, tag = "5")]
    Summary(Summary),
    /// A session boundary (a START discards the later steps of an earlier run). Number 7: 6
    /// is the deprecated `log_message`.
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values, one per tag.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    /// The series' name.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The value (`oneof value`).
    #[prost(oneof = "Kind", tags = "2, 4")]
    pub value: Option<Kind>,
}

/// `Summary.Value.value`: the members we write.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// A scalar (a 32-bit float in the format).
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    /// An encoded image.
    #[prost(message, tag = "4")]
    Image(Image),
}

/// `tensorflow.Summary.Image`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    /// Pixels high.
    #[prost(int32, tag = "1")]
    pub height: i32,
    /// Pixels wide.
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1 grey, 2 grey and alpha, 3 RGB, 4 RGBA.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    /// The PNG file's bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `tensorflow.SessionLog` (event.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// A [`SessionStatus`].
    #[prost(enumeration = "SessionStatus", tag = "1")]
    pub status: i32,
    /// Unused here.
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    /// Why the session started.
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// `tensorflow.SessionLog.SessionStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SessionStatus {
    /// Not set.
    StatusUnspecified = 0,
    /// A (re)start: readers drop what an earlier run wrote at this step and after.
    Start = 1,
    /// A stop.
    Stop = 2,
    /// A checkpoint.
    Checkpoint = 3,
}

/// TFRecord's masked CRC-32C (Castagnoli): a CRC of data holding CRCs is still a good check.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // `((crc >> 15) | (crc << 17)) + 0xa282ead8`, TensorFlow's `crc32c::Mask`.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length (u64 LE), masked CRC of the length, data, masked CRC of the data.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Splits a TFRecord file into its records, checking both CRCs of each.
pub fn read_records(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        if bytes.len() < 12 {
            return Err(format!("a truncated header ({} bytes)", bytes.len()));
        }
        let len_bytes = &bytes[..8];
        if u32_at(bytes, 8) != masked_crc(len_bytes) {
            return Err(format!("record {}: bad length CRC", records.len()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let end = 12 + len + 4;
        if bytes.len() < end {
            return Err(format!("record {}: truncated data", records.len()));
        }
        let data = &bytes[12..12 + len];
        if u32_at(bytes, 12 + len) != masked_crc(data) {
            return Err(format!("record {}: bad data CRC", records.len()));
        }
        records.push(data.to_vec());
        bytes = &bytes[end..];
    }
    Ok(records)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let name = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let name: String =
        name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    if name.is_empty() { "localhost".into() } else { name }
}

/// Event files opened by this process, so that two in the same second get distinct names.
static OPENED: AtomicU64 = AtomicU64::new(0);

/// A new file's name: `events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`. TensorBoard reads
/// a folder's files in name order and only moves on to names after the one it reads, so a new
/// file must sort after every file there: its seconds are bumped past the newest file's when
/// that one is from this second or later (a reopen within a second, a clock gone back).
fn new_file_name(dir: &Path) -> String {
    let newest = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix(FILE_PREFIX)?.split('.').next()?.parse::<u64>().ok()
        })
        .max();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let secs = match newest {
        Some(n) if n >= now => n + 1,
        _ => now,
    };
    let n = OPENED.fetch_add(1, Ordering::Relaxed);
    format!("{FILE_PREFIX}{secs}.{}.{}.{n}", hostname(), std::process::id())
}

/// An open event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Starts a new event file in `dir` for a job whose next iteration is `next_step`.
    ///
    /// On a rewind or a restart, iterations an earlier file already holds are written again.
    /// Rather than rewrite old files (which a live TensorBoard has read already), every file
    /// starts with a `SessionLog` START at `next_step`: the standard restart marker, on which
    /// TensorBoard's reader purges the earlier points at that step and after ("orphaned
    /// data"), so each step shows once, with its last values.
    pub fn create(dir: &Path, next_step: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(new_file_name(dir));
        let file = File::options().write(true).create_new(true).open(&path)?;
        let mut w = Self { path, file: BufWriter::new(file) };
        w.write(0, What::FileVersion(FILE_VERSION.into()))?;
        let log = SessionLog {
            status: SessionStatus::Start as i32,
            checkpoint_path: String::new(),
            msg: format!("dancegrpo: iterations from {next_step} on"),
        };
        w.write(next_step, What::SessionLog(log))?;
        w.file.flush()?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: u64, what: What) -> io::Result<()> {
        let event = Event {
            wall_time: now(),
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(what),
        };
        self.file.write_all(&frame(&prost::Message::encode_to_vec(&event)))
    }

    /// Writes one iteration's scalars and image (if any) at `step`, and flushes it, for a live
    /// TensorBoard to see.
    pub fn write_step(
        &mut self,
        step: u64,
        scalars: &[(String, f32)],
        image: Option<Image>,
    ) -> io::Result<()> {
        let mut value: Vec<Value> = scalars
            .iter()
            .map(|(tag, v)| Value { tag: tag.clone(), value: Some(Kind::SimpleValue(*v)) })
            .collect();
        if let Some(img) = image {
            value.push(Value { tag: SAMPLES_TAG.into(), value: Some(Kind::Image(img)) });
        }
        self.write(step, What::Summary(Summary { value }))?;
        self.file.flush()
    }
}

/// The scalars of one `metrics.jsonl` line: every number in it but `iteration`, tagged by its
/// path (`loss`, `timings_s/train`); a list of per-reward values is tagged by reward name
/// (`mean_rewards/<name>`). NaN, written as a string, stays NaN.
pub fn scalars(line: &serde_json::Value, reward_names: &[String]) -> Vec<(String, f32)> {
    fn walk(tag: String, v: &serde_json::Value, names: &[String], out: &mut Vec<(String, f32)>) {
        use serde_json::Value as J;
        match v {
            J::Object(o) => {
                for (k, v) in o {
                    let t = if tag.is_empty() { k.clone() } else { format!("{tag}/{k}") };
                    walk(t, v, names, out);
                }
            }
            J::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    let name =
                        if a.len() == names.len() { names[i].clone() } else { i.to_string() };
                    walk(format!("{tag}/{name}"), v, names, out);
                }
            }
            J::Bool(_) => {}
            _ => {
                if let Some(x) = crate::db::float_from_json(v) {
                    out.push((tag, x as f32));
                }
            }
        }
    }
    let mut out = Vec::new();
    if let serde_json::Value::Object(o) = line {
        for (k, v) in o.iter().filter(|(k, _)| k.as_str() != "iteration") {
            walk(k.clone(), v, reward_names, &mut out);
        }
    }
    out
}

/// The PNG at `path` as an image summary, its size read from its header; `None` if there is
/// no such file (the grid is on another node, or not due at this step) or it is not a PNG.
pub fn png_image(path: &Path) -> Option<Image> {
    let bytes = std::fs::read(path).ok()?;
    let info = match png::Decoder::new(io::Cursor::new(&bytes)).read_info() {
        Ok(reader) => reader.info().clone(),
        Err(e) => {
            tracing::warn!(path = %path.display(), "sample grid not shown in TensorBoard: {e}");
            return None;
        }
    };
    let colorspace = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb | png::ColorType::Indexed => 3,
        png::ColorType::Rgba => 4,
    };
    Some(Image {
        height: i32::try_from(info.height).ok()?,
        width: i32::try_from(info.width).ok()?,
        colorspace,
        encoded_image_string: bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn events(path: &Path) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        read_records(&bytes).unwrap().iter().map(|r| Event::decode(r.as_slice()).unwrap()).collect()
    }

    #[test]
    fn the_masked_crc_is_tfrecords() {
        // CRC-32C's check value, and TensorFlow's mask of it (crc32c.h `Mask`).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // ((0xe3069283 >> 15) | (0xe3069283 << 17)) + 0xa282ead8, mod 2^32.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        let rec = frame(b"abc");
        assert_eq!(rec.len(), 8 + 4 + 3 + 4);
        assert_eq!(&rec[..8], &3u64.to_le_bytes());
        assert_eq!(read_records(&rec).unwrap(), [b"abc".to_vec()]);
        let mut bad = rec.clone();
        bad[13] ^= 1;
        assert!(read_records(&bad).unwrap_err().contains("bad data CRC"));
    }

    #[test]
    fn a_file_starts_with_its_version_and_a_start_and_names_sort_in_opening_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = EventWriter::create(dir.path(), 1).unwrap();
        a.write_step(1, &[("loss".into(), 0.5)], None).unwrap();
        let b = EventWriter::create(dir.path(), 1).unwrap();
        assert!(b.path() > a.path(), "{:?} sorts before {:?}", b.path(), a.path());
        let name = b.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with(FILE_PREFIX) && name.contains(&std::process::id().to_string()));
        let ev = events(a.path());
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].what, Some(What::FileVersion("brain.Event:2".into())));
        let Some(What::SessionLog(log)) = &ev[1].what else { panic!("{ev:?}") };
        assert_eq!((log.status, ev[1].step), (SessionStatus::Start as i32, 1));
        let Some(What::Summary(s)) = &ev[2].what else { panic!("{ev:?}") };
        assert_eq!(s.value[0].value, Some(Kind::SimpleValue(0.5)));
    }

    #[test]
    fn scalars_are_every_number_of_a_metrics_line() {
        let m =
            dancegrpo_proto::StepMetrics { loss: f64::NAN, grad_norm: 2.0, ..Default::default() };
        let line = crate::outputs::metrics_json(3, &[0.25, 0.5], &[0.1, 0.2], &m);
        let s = scalars(&line, &["hps".into(), "clip".into()]);
        let get =
            |t: &str| s.iter().find(|(k, _)| k == t).unwrap_or_else(|| panic!("{t}: {s:?}")).1;
        assert_eq!(get("mean_rewards/clip"), 0.5);
        assert_eq!(get("std_rewards/hps"), 0.1);
        assert!(get("loss").is_nan());
        assert_eq!(get("grad_norm"), 2.0);
        assert_eq!(get("timings_s/communication"), 0.0);
        assert!(s.iter().all(|(k, _)| k != "iteration"));
        assert_eq!(s.len(), 4 + 5 + 5 + 1, "{s:?}");
    }
}
