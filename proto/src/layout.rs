//! The names of checkpoint folders in a job's `output_dir`, said once: rank 0 writes them, the
//! coordinator resumes from them and sweeps what interrupted writes left behind. Also the
//! names of the prompt dataset's index files, which the coordinator counts and the workers
//! read.
//!
//! A checkpoint is written as `.checkpoint-<step>.tmp-<pid>` and renamed to
//! `checkpoint-<step>` once complete; replacing one parks the old copy as
//! `.checkpoint-<step>.old-<pid>` between two renames.

use std::path::{Path, PathBuf};

const PREFIX: &str = "checkpoint-";

/// The prompt dataset's manifest in this project's layout (`dancegrpo-worker preprocess`).
pub const DATA_MANIFEST: &str = "manifest.json";
/// The prompt dataset's index in the reference's layout (DanceGRPO, MindSpeed-MM).
pub const REFERENCE_INDEX: &str = "videos2caption.json";

/// The finished checkpoint of `step`.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{PREFIX}{step}"))
}

/// Where process `pid` writes the checkpoint of `step` before publishing it.
pub fn tmp_dir(output_dir: &Path, step: u64, pid: u32) -> PathBuf {
    output_dir.join(format!(".{PREFIX}{step}.tmp-{pid}"))
}

/// Where process `pid` parks the previous checkpoint of `step` while replacing it.
pub fn old_dir(output_dir: &Path, step: u64, pid: u32) -> PathBuf {
    output_dir.join(format!(".{PREFIX}{step}.old-{pid}"))
}

/// Every finished `checkpoint-<step>` folder in `output_dir`, by step; nothing when the folder
/// cannot be read.
pub fn checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else { return vec![] };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let step = step_of(e.file_name().to_str()?.strip_prefix(PREFIX)?)?;
            e.file_type().ok()?.is_dir().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// What an interrupted write can leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftoverKind {
    /// `.checkpoint-<step>.tmp-<pid>`: a write in progress, or one killed before it finished.
    Tmp,
    /// `.checkpoint-<step>.old-<pid>`: a replaced copy. Without its `checkpoint-<step>` it is
    /// that step's only complete copy, and must stay.
    Old,
}

/// A folder an in-progress or interrupted checkpoint write left in `output_dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    /// Which kind.
    pub kind: LeftoverKind,
    /// The step it was written for.
    pub step: u64,
    /// The writer's process id.
    pub pid: u32,
    /// The folder.
    pub path: PathBuf,
}

impl Leftover {
    /// Whether the finished checkpoint of its step exists (for an `.old` copy: whether it is
    /// redundant).
    pub fn published(&self) -> bool {
        self.path.parent().is_some_and(|out| checkpoint_dir(out, self.step).is_dir())
    }
}

/// Every temporary and replaced checkpoint folder in `output_dir`, by step.
pub fn leftovers(output_dir: &Path) -> Vec<Leftover> {
    let Ok(entries) = std::fs::read_dir(output_dir) else { return vec![] };
    let mut found: Vec<Leftover> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name();
            let rest = name.to_str()?.strip_prefix('.')?.strip_prefix(PREFIX)?;
            let (kind, (step, pid)) = [(LeftoverKind::Tmp, ".tmp-"), (LeftoverKind::Old, ".old-")]
                .into_iter()
                .find_map(|(kind, sep)| Some((kind, rest.split_once(sep)?)))?;
            let pid = pid.parse().ok().filter(|_| pid.bytes().all(|b| b.is_ascii_digit()))?;
            Some(Leftover { kind, step: step_of(step)?, pid, path: e.path() })
        })
        .collect();
    found.sort_by_key(|l| (l.step, l.pid));
    found
}

/// Removes the leftovers of `output_dir` that `stale` picks, with a log line for each: the
/// coordinator at start and rank 0 before each checkpoint write, each with its own rule for
/// which may still have a writer at work.
pub fn remove_leftovers(output_dir: &Path, stale: impl Fn(&Leftover) -> bool) {
    for l in leftovers(output_dir).into_iter().filter(|l| stale(l)) {
        match std::fs::remove_dir_all(&l.path) {
            Ok(()) => tracing::info!(path = %l.path.display(),
                "removed a checkpoint folder that an interrupted write left behind"),
            Err(e) => tracing::warn!(path = %l.path.display(), cause = %e,
                "cannot remove a stale checkpoint folder"),
        }
    }
}

/// A step as written in a folder name: digits only (`u64::from_str` would take a `+`).
fn step_of(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_anything_else_is_ignored() {
        let out = tempfile::tempdir().unwrap();
        let o = out.path();
        for d in [
            checkpoint_dir(o, 12),
            checkpoint_dir(o, 3),
            tmp_dir(o, 40, 99),
            old_dir(o, 3, 7),
            old_dir(o, 5, 8),
            o.join("checkpoint-30-0"),
            o.join("checkpoint-+50"),
            o.join(".checkpoint-6.tmp-x1"),
            o.join(".checkpoint-+6.tmp-1"),
            o.join("samples"),
        ] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(o.join("checkpoint-60"), b"a file, not a checkpoint").unwrap();
        assert_eq!(checkpoints(o), [(3, checkpoint_dir(o, 3)), (12, checkpoint_dir(o, 12))]);
        let left = leftovers(o);
        let seen: Vec<_> = left.iter().map(|l| (l.kind, l.step, l.pid, l.published())).collect();
        assert_eq!(
            seen,
            [
                (LeftoverKind::Old, 3, 7, true),
                (LeftoverKind::Old, 5, 8, false),
                (LeftoverKind::Tmp, 40, 99, false),
            ]
        );
        assert_eq!(left[2].path, tmp_dir(o, 40, 99));
        assert!(checkpoints(&o.join("missing")).is_empty() && leftovers(&o.join("x")).is_empty());
    }
}
