//! The reward log: one float per line per iteration, the mean reward, written the way the
//! reference writes `hps_reward.txt` (Python's `str(float)`), so existing plotting scripts read
//! it unchanged. A resumed job continues it without gaps or duplicates.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Appends one line per finished iteration.
#[derive(Debug)]
pub struct RewardLog {
    path: PathBuf,
    file: File,
    lines: u64,
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |source| Error::Io { context, source }
}

impl RewardLog {
    /// Opens the log of a job that has finished `completed` iterations. Lines beyond that
    /// (written by an iteration whose completion was never recorded, e.g. a crash between the
    /// two) are dropped, so the next append is line `completed + 1`. Fewer lines than
    /// `completed` means the file was tampered with or lost: an error, not silent gaps.
    pub fn open(path: &Path, completed: u64) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir, "cannot create"))?;
        }
        let mut keep = Vec::new();
        if path.exists() {
            let f = File::open(path).map_err(io(path, "cannot read"))?;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io(path, "cannot read"))?;
                if keep.len() as u64 == completed {
                    break;
                }
                keep.push(line);
            }
        }
        if (keep.len() as u64) < completed {
            return Err(Error::InvalidRequest(format!(
                "reward log {} has {} lines but the job finished {completed} iterations; \
                 restore it or point reward_log elsewhere",
                path.display(),
                keep.len()
            )));
        }
        let mut body = keep.join("\n");
        if !keep.is_empty() {
            body.push('\n');
        }
        // Rewrite through a temp file and rename: a crash mid-way leaves the old log intact.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body).map_err(io(&tmp, "cannot write"))?;
        std::fs::rename(&tmp, path).map_err(io(path, "cannot replace"))?;
        let file = OpenOptions::new().append(true).open(path).map_err(io(path, "cannot open"))?;
        Ok(Self { path: path.to_path_buf(), file, lines: completed })
    }

    /// Appends one iteration's mean reward and syncs it to disk.
    pub fn append(&mut self, mean: f64) -> Result<()> {
        writeln!(self.file, "{}", python_float_repr(mean))
            .and_then(|()| self.file.sync_data())
            .map_err(io(&self.path, "cannot append to"))?;
        self.lines += 1;
        Ok(())
    }

    /// Lines in the log.
    pub fn len(&self) -> u64 {
        self.lines
    }

    /// True when nothing was logged yet.
    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }
}

/// Formats like Python's `repr(float)`: the shortest round-trip digits, fixed notation for
/// decimal exponents in [-4, 16), otherwise `d.ddde±XX`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits Python uses.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        // Expected strings are Python 3.11's repr of the same values.
        let cases = [
            (0.3141, "0.3141"),
            (1e-05, "1e-05"),
            (0.0, "0.0"),
            (12.0, "12.0"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (0.0001, "0.0001"),
            (0.00012345, "0.00012345"),
            (-2.5e-7, "-2.5e-07"),
            (1.0 / 3.0, "0.3333333333333333"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e22, "1e+22"),
            (5e-324, "5e-324"),
            (-0.0, "-0.0"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x:?}");
        }
    }

    #[test]
    fn resume_truncates_unrecorded_lines_and_refuses_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out/hps_reward.txt");
        let mut log = RewardLog::open(&p, 0).unwrap();
        for r in [0.25, 0.5, 0.75] {
            log.append(r).unwrap();
        }
        drop(log);
        // The job recorded only 2 finished iterations: line 3 is dropped, then continued.
        let mut log = RewardLog::open(&p, 2).unwrap();
        log.append(1.0).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "0.25\n0.5\n1.0\n");
        assert_eq!(log.len(), 3);
        let e = RewardLog::open(&p, 5).unwrap_err().to_string();
        assert!(e.contains("has 3 lines but the job finished 5 iterations"), "{e}");
    }
}
