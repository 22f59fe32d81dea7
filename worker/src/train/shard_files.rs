//! A sharded job's optimizer state on disk: each rank's own slices, as it holds them.
//!
//! ```text
//! checkpoint-N/optimizer/
//!   layout.json                           the units (names, weights and shapes, elements,
//!                                         elements per rank), the world size, each unit's
//!                                         AdamW step and the optimizer's steps_taken
//!   rank-00000-of-00008.safetensors       rank 0's f32 slices: master.<unit>,
//!   ...                                   exp_avg.<unit>, exp_avg_sq.<unit>, each [shard]
//! ```
//!
//! Every rank writes its own file at once, with no collective and nothing beyond what it holds
//! (16P/N bytes: 22 GiB per rank for FLUX.1-dev at N = 8, all ranks writing together). A
//! reader on any world size takes the elements it owns under its own layout from the files
//! whose ranges cover them ([`SavedShards::range`]), so a rank reads about 1/N of the state;
//! the unsharded trainer reads each unit whole, one unit at a time. The master slices are
//! what a resume continues from, bit for bit: the exported transformer may be bf16.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::TrainError;
use super::checkpoint::write_safetensors;
use super::shard::{Layout, Unit};
use crate::flux::ModelError;
use crate::flux::weights::SafetensorsFile;

/// The optimizer folder of a sharded checkpoint.
pub const OPTIMIZER_DIR: &str = "optimizer";
/// Its description of the layout.
pub const LAYOUT_JSON: &str = "layout.json";
/// The tag of the format in `layout.json`.
const FORMAT: &str = "dancegrpo-sharded-adamw/1";
/// The three flat f32 vectors each rank keeps per unit.
pub const KEYS: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// `rank-RRRRR-of-NNNNN.safetensors` (ranks from 0).
pub fn rank_file(rank: u32, world: u32) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

/// One unit as `layout.json` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedUnit {
    /// `root`, `transformer_blocks.{i}`, `single_transformer_blocks.{i}`.
    pub name: String,
    /// Its weights in flat order, with their shapes.
    pub params: Vec<(String, Vec<i64>)>,
    /// Elements before padding.
    pub numel: i64,
    /// Elements each rank holds.
    pub shard: i64,
    /// The unit's AdamW step (all its weights step together).
    pub step: u64,
}

/// `layout.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedLayout {
    /// [`FORMAT`].
    pub format: String,
    /// The world size that wrote the files.
    pub world: u32,
    /// The optimizer's own step count (the learning-rate schedule's position).
    pub steps_taken: u64,
    /// The units, in layout order.
    pub units: Vec<SavedUnit>,
}

impl SavedLayout {
    /// The description of `layout` with the units' steps.
    pub fn new(layout: &Layout, steps: &[u64], steps_taken: u64) -> Self {
        let units = layout
            .units
            .iter()
            .zip(steps)
            .map(|(u, &step)| SavedUnit {
                name: u.name.clone(),
                params: u.params.clone(),
                numel: u.numel,
                shard: u.shard,
                step,
            })
            .collect();
        Self { format: FORMAT.into(), world: layout.world, steps_taken, units }
    }

    /// Writes it as `dir/layout.json`.
    pub fn write(&self, dir: &Path) -> Result<(), TrainError> {
        let path = dir.join(LAYOUT_JSON);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        std::fs::write(&path, text).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
    }
}

/// Writes `rank`'s slices (per unit: master, both moments) as `dir/rank-…safetensors`.
pub fn write_rank(
    dir: &Path,
    rank: u32,
    world: u32,
    units: &[Unit],
    slices: &[[&Tensor; 3]],
) -> Result<PathBuf, TrainError> {
    let mut tensors = Vec::with_capacity(3 * units.len());
    for (unit, parts) in units.iter().zip(slices) {
        for (key, t) in KEYS.iter().zip(parts) {
            tensors.push((format!("{key}.{}", unit.name), t.shallow_clone()));
        }
    }
    let path = dir.join(rank_file(rank, world));
    write_safetensors(&path, &tensors)?;
    Ok(path)
}

/// A sharded checkpoint's optimizer folder, open for reading.
#[derive(Debug)]
pub struct SavedShards {
    dir: PathBuf,
    /// What `layout.json` says.
    pub layout: SavedLayout,
    files: Vec<SafetensorsFile>,
}

impl SavedShards {
    /// Whether `checkpoint` holds a sharded job's optimizer folder.
    pub fn exists(checkpoint: &Path) -> bool {
        checkpoint.join(OPTIMIZER_DIR).join(LAYOUT_JSON).is_file()
    }

    /// Opens `checkpoint/optimizer`: its layout and every rank's file, each checked to hold
    /// exactly the keys of its units with `[shard]` f32 elements.
    pub fn open(checkpoint: &Path) -> Result<Self, TrainError> {
        let dir = checkpoint.join(OPTIMIZER_DIR);
        let path = dir.join(LAYOUT_JSON);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        let layout: SavedLayout = serde_json::from_str(&text)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        if layout.format != FORMAT || layout.world == 0 {
            return Err(TrainError::Io(format!(
                "{}: format {:?} of {} ranks, expected {FORMAT:?}",
                path.display(),
                layout.format,
                layout.world
            )));
        }
        let mut files = Vec::with_capacity(layout.world as usize);
        for rank in 0..layout.world {
            let file = SafetensorsFile::open(dir.join(rank_file(rank, layout.world)))?;
            for unit in &layout.units {
                for key in KEYS {
                    let key = format!("{key}.{}", unit.name);
                    match file.shape(&key) {
                        None => {
                            return Err(ModelError::Missing {
                                keys: vec![key],
                                source_desc: file.path().display().to_string(),
                            }
                            .into());
                        }
                        Some(found) if found != [unit.shard] => {
                            return Err(ModelError::Shape {
                                key,
                                expected: vec![unit.shard],
                                found,
                                file: file.path().to_path_buf(),
                            }
                            .into());
                        }
                        Some(_) => {}
                    }
                }
            }
            let expected = 3 * layout.units.len();
            if file.keys().len() != expected {
                let known: Vec<String> = layout
                    .units
                    .iter()
                    .flat_map(|u| KEYS.iter().map(move |k| format!("{k}.{}", u.name)))
                    .collect();
                let key = file.keys().into_iter().find(|k| !known.contains(k)).unwrap_or_default();
                return Err(ModelError::Unexpected { key, file: file.path().to_path_buf() }.into());
            }
            files.push(file);
        }
        Ok(Self { dir, layout, files })
    }

    /// Checks that the saved units hold the weights of `layout` (any world size): the same
    /// units, the same weights in the same order, the same shapes. A difference names the
    /// weight, `layout.json` and both shapes.
    pub fn check(&self, layout: &Layout) -> Result<(), TrainError> {
        let path = self.dir.join(LAYOUT_JSON);
        let names = |u: &[SavedUnit]| u.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        let want: Vec<String> = layout.units.iter().map(|u| u.name.clone()).collect();
        if names(&self.layout.units) != want {
            return Err(TrainError::Invalid(format!(
                "{}: the units {:?} are not this model's {:?}",
                path.display(),
                names(&self.layout.units),
                want
            )));
        }
        for (saved, unit) in self.layout.units.iter().zip(&layout.units) {
            for (i, (name, shape)) in unit.params.iter().enumerate() {
                match saved.params.get(i) {
                    Some((n, s)) if n == name && s == shape => {}
                    Some((n, s)) if n == name => {
                        return Err(ModelError::Shape {
                            key: name.clone(),
                            expected: shape.clone(),
                            found: s.clone(),
                            file: path,
                        }
                        .into());
                    }
                    _ => {
                        return Err(ModelError::Missing {
                            keys: vec![name.clone()],
                            source_desc: format!("{} (unit {})", path.display(), unit.name),
                        }
                        .into());
                    }
                }
            }
            if let Some((name, _)) = saved.params.get(unit.params.len()) {
                return Err(ModelError::Unexpected { key: name.clone(), file: path }.into());
            }
        }
        Ok(())
    }

    /// Elements `[start, start + len)` of unit `u`'s flat `key` vector (one of [`KEYS`]),
    /// f32 on the CPU: read from the files whose slices cover them, zeros past the unit's
    /// elements (the padding of a layout over another world size).
    pub fn range(&self, u: usize, key: &str, start: i64, len: i64) -> Result<Tensor, TrainError> {
        let unit = &self.layout.units[u];
        let name = format!("{key}.{}", unit.name);
        let end = (start + len).min(unit.numel);
        let mut parts = Vec::new();
        let mut at = start;
        while at < end {
            let rank = at / unit.shard;
            let offset = at - rank * unit.shard;
            let take = (unit.shard - offset).min(end - at);
            let t = self.files[rank as usize].tensor(&name)?;
            parts.push(t.f_narrow(0, offset, take)?.f_to_kind(Kind::Float)?);
            at += take;
        }
        if at < start + len {
            parts.push(Tensor::f_zeros(
                [start + len - at.max(start)],
                (Kind::Float, tch::Device::Cpu),
            )?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }
}
