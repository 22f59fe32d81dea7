//! What a job leaves in `output_dir` for people and for resuming: the reward log (one float
//! per line), `metrics.jsonl` (one JSON object per iteration), the reward-curve PNG, the
//! TensorBoard event files, and the `trainer_state.json` a checkpoint carries. Also where the
//! prompt count comes from.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dancegrpo_proto::layout::{self, LeftoverKind};
use dancegrpo_proto::{JobConfig, PhaseTimings, StepMetrics};
use serde::{Deserialize, Serialize};

use crate::db::{float_from_json, float_to_json};
use crate::error::{Error, Result};
use crate::reward_log::RewardLog;
use crate::schedule::Cursor;
use crate::tensorboard::{self, EventWriter};

/// The metrics log's file name, next to the reward log.
pub const METRICS_LOG: &str = "metrics.jsonl";
/// The reward curve's file name.
pub const REWARD_CURVE: &str = "reward_curve.png";
/// The coordinator's part of a checkpoint.
pub const TRAINER_STATE: &str = "trainer_state.json";

/// The coordinator's state after `step` iterations: enough to resume from a checkpoint alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Completed iterations.
    pub step: u64,
    /// The prompt sampler's position.
    pub cursor: Cursor,
    /// The sampler's seed, to refuse a resume under another shuffle.
    pub sampler_seed: u64,
    /// Mean rewards of every completed iteration, so the reward log can be rebuilt in a new
    /// output directory.
    pub reward_history: Vec<Vec<f64>>,
}

impl TrainerState {
    /// Reads `dir/trainer_state.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(TRAINER_STATE);
        let text = std::fs::read_to_string(&path).map_err(io(&path, "cannot read"))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::InvalidRequest(format!("{} is not a trainer state: {e}", path.display()))
        })
    }
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |source| Error::Io { context, source }
}

/// `path` relative to `output_dir` unless absolute.
pub fn in_output_dir(cfg: &JobConfig, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() { p.to_path_buf() } else { Path::new(&cfg.output_dir).join(p) }
}

/// Removes the checkpoint folders that interrupted writes left in `output_dir`, once no writer
/// can still be at work on them: with `upto` (a job going on, its checkpoints up to that step
/// recorded) only those of steps up to it, which nobody writes again; without (a new job, no
/// worker yet) every temporary one. A replaced copy whose checkpoint is missing is that step's
/// only complete copy, and stays. Best effort: what cannot be removed is logged and left.
pub fn sweep_leftovers(cfg: &JobConfig, upto: Option<u64>) {
    layout::remove_leftovers(Path::new(&cfg.output_dir), |l| {
        let done = upto.is_none_or(|at| l.step <= at);
        done && (l.kind == LeftoverKind::Tmp || l.published())
    });
}

/// Finds the checkpoint a new job starts from: `latest` is the newest complete
/// `checkpoint-N` in `output_dir` (none yet: start fresh), anything else a directory.
pub fn resolve_resume(cfg: &JobConfig) -> Result<Option<PathBuf>> {
    match cfg.resume_from_checkpoint.as_str() {
        "" => Ok(None),
        "latest" => Ok(layout::checkpoints(Path::new(&cfg.output_dir))
            .into_iter()
            .rev()
            .map(|(_, dir)| dir)
            .find(|dir| dir.join(TRAINER_STATE).is_file())),
        dir => {
            let p = PathBuf::from(dir);
            if !p.join(TRAINER_STATE).is_file() {
                return Err(Error::InvalidRequest(format!(
                    "resume_from_checkpoint {dir}: no {TRAINER_STATE} there (not a dancegrpo \
                     checkpoint, or not completely written)"
                )));
            }
            Ok(Some(p))
        }
    }
}

/// Number of prompts in the job's dataset: `data_json_path` is the own layout's
/// `manifest.json`, the reference's `videos2caption.json`, or a directory holding either.
pub fn dataset_len(cfg: &JobConfig) -> Result<u64> {
    let raw = &cfg.data_json_path;
    let bad = |message: String| Error::Data { path: raw.clone(), message };
    let p = Path::new(raw);
    let file = if p.is_dir() {
        [layout::DATA_MANIFEST, layout::REFERENCE_INDEX]
            .iter()
            .map(|n| p.join(n))
            .find(|f| f.is_file())
            .ok_or_else(|| {
                bad("neither manifest.json nor videos2caption.json in this directory; run \
                     `dancegrpo-worker preprocess` first"
                    .into())
            })?
    } else if p.is_file() {
        p.to_path_buf()
    } else {
        return Err(bad("not found; run `dancegrpo-worker preprocess` first".into()));
    };
    let text = std::fs::read_to_string(&file).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let n = match &v {
        serde_json::Value::Array(items) => items.len(),
        serde_json::Value::Object(o) => o
            .get("items")
            .and_then(|i| i.as_array())
            .map(Vec::len)
            .ok_or_else(|| bad("a manifest without an `items` list".into()))?,
        _ => return Err(bad("expected a list of prompts or a manifest".into())),
    };
    if n == 0 {
        return Err(bad("the dataset has no prompts".into()));
    }
    Ok(n as u64)
}

/// One iteration's line of `metrics.jsonl` (and the record the status API shows).
pub fn metrics_json(
    step: u64,
    mean_rewards: &[f64],
    std_rewards: &[f64],
    m: &StepMetrics,
) -> serde_json::Value {
    let t = &m.timings;
    serde_json::json!({
        "iteration": step,
        "mean_rewards": mean_rewards,
        "std_rewards": std_rewards,
        // NaN under `drop_group` (the update was skipped): written so that it reads back.
        "loss": float_to_json(m.loss),
        "grad_norm": float_to_json(m.grad_norm),
        "ratio_dev_mean": float_to_json(m.ratio_dev_mean),
        "ratio_dev_max": float_to_json(m.ratio_dev_max),
        "clip_fraction": float_to_json(m.clip_fraction),
        "optimizer_steps": m.optimizer_steps,
        "timings_s": {
            "rollout": t.rollout_s,
            "decode": t.decode_s,
            "reward": t.reward_s,
            "train": t.train_s,
            "communication": t.communication_s,
        },
    })
}

/// Reads back [`metrics_json`]; `None` for iterations without metrics (resumed history).
pub fn metrics_from_json(text: &str) -> Option<StepMetrics> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let f = |k: &str| v.get(k).and_then(float_from_json).unwrap_or(0.0);
    let t = v.get("timings_s")?;
    let tf = |k: &str| t.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    Some(StepMetrics {
        iteration: v.get("iteration")?.as_u64()?,
        loss: f("loss"),
        grad_norm: f("grad_norm"),
        ratio_dev_mean: f("ratio_dev_mean"),
        ratio_dev_max: f("ratio_dev_max"),
        clip_fraction: f("clip_fraction"),
        optimizer_steps: f("optimizer_steps") as u32,
        timings: PhaseTimings {
            rollout_s: tf("rollout"),
            decode_s: tf("decode"),
            reward_s: tf("reward"),
            train_s: tf("train"),
            communication_s: tf("communication"),
        },
        ..Default::default()
    })
}

/// The files a running job appends to.
#[derive(Debug)]
pub struct Outputs {
    reward_log: RewardLog,
    metrics: PathBuf,
    curve: PathBuf,
    title: String,
    reward_names: Vec<String>,
    /// `None` when the event file could not be opened: TensorBoard is a view, like the curve.
    tensorboard: Option<EventWriter>,
    /// Where rank 0 writes the sample grids.
    samples: PathBuf,
}

impl Outputs {
    /// Opens the outputs of a job that has completed `history.len()` iterations: the reward
    /// log and the metrics log are cut back to that many entries (an iteration that was
    /// written but never recorded as complete is redone), and a missing reward log (a resume
    /// into a new output directory) is rebuilt from `history`.
    pub fn open(cfg: &JobConfig, history: &[Vec<f64>]) -> Result<Self> {
        let log_path = in_output_dir(cfg, &cfg.reward_log);
        let completed = history.len() as u64;
        if !log_path.exists() && completed > 0 {
            let mut fresh = RewardLog::open(&log_path, 0)?;
            for h in history {
                fresh.append(h.first().copied().unwrap_or(f64::NAN))?;
            }
        }
        let reward_log = RewardLog::open(&log_path, completed)?;
        let dir = log_path.parent().map(Path::to_path_buf).unwrap_or_default();
        let metrics = dir.join(METRICS_LOG);
        truncate_jsonl(&metrics, completed)?;
        let tb_dir = Path::new(&cfg.output_dir).join(tensorboard::TENSORBOARD_DIR);
        let tensorboard = EventWriter::create(&tb_dir, completed + 1)
            .inspect_err(|e| {
                tracing::warn!(dir = %tb_dir.display(), "no TensorBoard event file: {e}");
            })
            .ok();
        Ok(Self {
            reward_log,
            metrics,
            curve: dir.join(REWARD_CURVE),
            title: cfg.job_name.clone(),
            reward_names: cfg.rewards.iter().map(|r| r.name.clone()).collect(),
            tensorboard,
            samples: Path::new(&cfg.output_dir).join("samples"),
        })
    }

    /// Appends the last iteration of `history` to the reward log and `line` to the metrics.
    fn append(&mut self, line: &serde_json::Value, history: &[Vec<f64>]) -> Result<()> {
        let mean = history.last().and_then(|h| h.first()).copied().unwrap_or(f64::NAN);
        self.reward_log.append(mean)?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.metrics)
            .map_err(io(&self.metrics, "cannot open"))?;
        writeln!(f, "{line}").map_err(io(&self.metrics, "cannot append to"))?;
        self.write_tensorboard(line);
        Ok(())
    }

    /// Writes `line`'s scalars to the event file at its iteration, with the sample grid if
    /// rank 0 wrote one this iteration where this process can see it (same node or a shared
    /// file system): the worker names it by the 1-based iteration, as `line` counts.
    fn write_tensorboard(&mut self, line: &serde_json::Value) {
        let (Some(tb), Some(step)) =
            (&mut self.tensorboard, line.get("iteration").and_then(|i| i.as_u64()))
        else {
            return;
        };
        let scalars = tensorboard::scalars(line, &self.reward_names);
        let image = tensorboard::png_image(&self.samples.join(format!("iteration-{step:06}.png")));
        // Like the curve: a view that fails to write must not stop training.
        if let Err(e) = tb.write_step(step, &scalars, image) {
            tracing::warn!(path = %tb.path().display(), "TensorBoard not written: {e}");
        }
    }

    /// Redraws the reward curve from `history`.
    fn redraw(&self, history: &[Vec<f64>]) {
        let series: Vec<(String, Vec<f64>)> = self
            .reward_names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                (
                    name.clone(),
                    history.iter().map(|h| h.get(k).copied().unwrap_or(f64::NAN)).collect(),
                )
            })
            .collect();
        // A plot that fails to draw must not stop training; say so and go on.
        if let Err(e) = crate::plot::write_reward_curve(&self.curve, &self.title, &series) {
            tracing::warn!(path = %self.curve.display(), "reward curve not written: {e}");
        }
    }
}

/// The output files, written in order by a thread of their own, so that the reward log's
/// fsync and the PNG redraw never hold the state lock: training goes on while they are
/// written. Commands run in the order they are sent; a cut-back after a rewind therefore lands
/// after the record of an iteration the rewind discards.
#[derive(Debug, Clone)]
pub struct OutputTask {
    tx: mpsc::Sender<Command>,
}

#[derive(Debug)]
enum Command {
    /// Appends one finished iteration; `history` holds it and all before it.
    Record { line: serde_json::Value, history: Vec<Vec<f64>>, done: mpsc::Sender<Result<()>> },
    /// Cuts the files back to `history` (a rewind).
    Reopen { cfg: Box<JobConfig>, history: Vec<Vec<f64>>, done: mpsc::Sender<Result<()>> },
}

fn writer_stopped() -> Error {
    Error::Io {
        context: "output files".into(),
        source: std::io::Error::other("the output writer thread has stopped"),
    }
}

impl OutputTask {
    /// Starts the writer thread over files already opened.
    pub fn start(outputs: Outputs) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("outputs".into())
            .spawn(move || write_in_order(outputs, rx))
            .map_err(|source| Error::Io {
                context: "cannot start the output writer".into(),
                source,
            })?;
        Ok(Self { tx })
    }

    /// Sends one finished iteration to be recorded, at once: sent under the state lock, it is
    /// ordered before any rewind's cut-back. Await [`Written::wait`] for its lines on disk.
    pub fn record(&self, line: serde_json::Value, history: Vec<Vec<f64>>) -> Written {
        let (done, rx) = mpsc::channel();
        let sent = self.tx.send(Command::Record { line, history, done }).is_ok();
        Written { rx: sent.then_some(rx) }
    }

    /// Cuts the files back to `history`, after every record sent before, and returns once
    /// they are. A rewind waits for it under the state lock: it is rare, and no file may be
    /// longer than the job a status shows. A failure also fails every later record until a
    /// cut-back succeeds: lines appended to files that were not cut back would not match the
    /// job.
    pub fn reopen(&self, cfg: &JobConfig, history: &[Vec<f64>]) -> Result<()> {
        let (done, rx) = mpsc::channel();
        let cmd = Command::Reopen { cfg: Box::new(cfg.clone()), history: history.to_vec(), done };
        self.tx.send(cmd).map_err(|_| writer_stopped())?;
        answer(&rx)
    }
}

/// How long a caller waits for the writer thread: a disk (or network filesystem) that does not
/// take a few lines in this time is not coming back, and the job fails with this reason
/// instead of waiting for good.
pub const OUTPUT_TIMEOUT: Duration = Duration::from_secs(120);

/// The writer's answer to one command, within [`OUTPUT_TIMEOUT`].
fn answer(rx: &mpsc::Receiver<Result<()>>) -> Result<()> {
    match rx.recv_timeout(OUTPUT_TIMEOUT) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(writer_stopped()),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Io {
            context: "output files".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "not written within {}s: the output folder's disk is stuck",
                    OUTPUT_TIMEOUT.as_secs()
                ),
            ),
        }),
    }
}

/// A record on its way to disk.
#[derive(Debug)]
pub struct Written {
    /// `None`: the writer was gone before it was sent.
    rx: Option<mpsc::Receiver<Result<()>>>,
}

impl Written {
    /// Returns once the record's lines are on disk, or why they are not.
    pub async fn wait(self) -> Result<()> {
        let rx = self.rx.ok_or_else(writer_stopped)?;
        // Waited for on the blocking pool, which also holds a paused test clock still.
        tokio::task::spawn_blocking(move || answer(&rx)).await.map_err(|_| writer_stopped())?
    }
}

/// The shortest time between two redraws of the reward curve. A redraw costs about 15 ms of
/// CPU: nothing beside a FLUX iteration of minutes, but most of a tiny job's coordinator time,
/// taken from the workers on a small machine. A curve drawn less often is at most this far
/// behind the reward log.
pub const REDRAW_EVERY: Duration = Duration::from_secs(1);

/// The writer thread: runs the commands in order until every sender is gone. The lines of a
/// record are written at once; the curve is redrawn at once too, unless it was drawn less than
/// [`REDRAW_EVERY`] ago: then it is drawn once that has passed, from the latest history.
fn write_in_order(mut outputs: Outputs, rx: mpsc::Receiver<Command>) {
    let mut broken: Option<String> = None;
    let mut drawn: Option<Instant> = None;
    let mut due: Option<Vec<Vec<f64>>> = None;
    loop {
        let wait = drawn.map_or(Duration::ZERO, |t| REDRAW_EVERY.saturating_sub(t.elapsed()));
        let cmd = match &due {
            Some(_) if wait.is_zero() => Err(mpsc::RecvTimeoutError::Timeout),
            Some(_) => rx.recv_timeout(wait),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let cmd = match cmd {
            Ok(cmd) => cmd,
            Err(gone) => {
                if let Some(history) = due.take() {
                    outputs.redraw(&history);
                    drawn = Some(Instant::now());
                }
                match gone {
                    mpsc::RecvTimeoutError::Timeout => continue,
                    mpsc::RecvTimeoutError::Disconnected => return,
                }
            }
        };
        match cmd {
            Command::Reopen { cfg, history, done } => {
                let r = match Outputs::open(&cfg, &history) {
                    Ok(o) => {
                        (outputs, broken) = (o, None);
                        due = Some(history);
                        Ok(())
                    }
                    Err(e) => {
                        tracing::error!("output files not cut back to step {}: {e}", history.len());
                        broken = Some(e.to_string());
                        Err(e)
                    }
                };
                let _ = done.send(r);
            }
            Command::Record { line, history, done } => {
                let r = match &broken {
                    Some(why) => Err(Error::Io {
                        context: "output files".into(),
                        source: std::io::Error::other(format!(
                            "not cut back after a rewind: {why}"
                        )),
                    }),
                    None => outputs.append(&line, &history),
                };
                if r.is_ok() {
                    due = Some(history);
                }
                // The caller may have gone (its RPC was cancelled); the lines are written.
                let _ = done.send(r);
            }
        }
    }
}

/// Keeps the lines of iterations `1..=keep` of a JSONL file (rewritten through a temp file
/// and a rename).
fn truncate_jsonl(path: &Path, keep: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("iteration").and_then(|i| i.as_u64()))
                .is_some_and(|i| i <= keep)
        })
        .collect();
    let mut body = kept.join("\n");
    if !kept.is_empty() {
        body.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, body).map_err(io(&tmp, "cannot write"))?;
    std::fs::rename(&tmp, path).map_err(io(path, "cannot replace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_swept_only_where_no_writer_can_be_at_work() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let cfg = JobConfig { output_dir: out.display().to_string(), ..Default::default() };
        let make = |p: PathBuf| std::fs::create_dir_all(p.join("transformer")).unwrap();
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        make(layout::checkpoint_dir(out, 2));
        make(layout::tmp_dir(out, 2, 41));
        make(layout::old_dir(out, 2, 41));
        make(layout::tmp_dir(out, 4, 42));
        make(layout::old_dir(out, 3, 43));
        // A job going on with checkpoint 2 recorded: step 4 may be in the writing.
        sweep_leftovers(&cfg, Some(2));
        assert_eq!(names(), [".checkpoint-3.old-43", ".checkpoint-4.tmp-42", "checkpoint-2"]);
        // A new job has no writer yet; step 3's only copy stays.
        sweep_leftovers(&cfg, None);
        assert_eq!(names(), [".checkpoint-3.old-43", "checkpoint-2"]);
    }

    #[test]
    fn dataset_length_from_either_layout_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            |p: &Path| JobConfig { data_json_path: p.display().to_string(), ..Default::default() };
        std::fs::write(dir.path().join("videos2caption.json"), r#"[{"a":1},{"a":2},{"a":3}]"#)
            .unwrap();
        assert_eq!(dataset_len(&cfg(dir.path())).unwrap(), 3);
        std::fs::write(dir.path().join("manifest.json"), r#"{"items":[{}, {}]}"#).unwrap();
        assert_eq!(dataset_len(&cfg(dir.path())).unwrap(), 2, "own layout first");
        assert_eq!(dataset_len(&cfg(&dir.path().join("videos2caption.json"))).unwrap(), 3);
        let e = dataset_len(&cfg(&dir.path().join("nope"))).unwrap_err().to_string();
        assert!(e.contains("nope: not found; run `dancegrpo-worker preprocess`"), "{e}");
        std::fs::write(dir.path().join("bad.json"), "[").unwrap();
        let e = dataset_len(&cfg(&dir.path().join("bad.json"))).unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn outputs_rebuild_a_missing_log_and_cut_back_an_unrecorded_iteration() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JobConfig {
            output_dir: dir.path().display().to_string(),
            reward_log: "reward.txt".into(),
            ..Default::default()
        };
        let history = vec![vec![0.25], vec![0.5]];
        let mut o = Outputs::open(&cfg, &history).unwrap();
        let log = dir.path().join("reward.txt");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "0.25\n0.5\n");
        let mut h3 = history.clone();
        h3.push(vec![0.1]);
        o.append(&serde_json::json!({"iteration": 3}), &h3).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "0.25\n0.5\n0.1\n");
        drop(o);
        // Iteration 3 was logged but the job only recorded 2: it is redone, not duplicated.
        Outputs::open(&cfg, &history).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "0.25\n0.5\n");
        assert_eq!(std::fs::read_to_string(dir.path().join(METRICS_LOG)).unwrap(), "");
    }

    #[tokio::test]
    async fn the_output_task_writes_in_order_and_a_failed_cut_back_fails_later_records() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JobConfig {
            output_dir: dir.path().display().to_string(),
            reward_log: "reward.txt".into(),
            ..Default::default()
        };
        let log = dir.path().join("reward.txt");
        let task = OutputTask::start(Outputs::open(&cfg, &[]).unwrap()).unwrap();
        task.record(serde_json::json!({"iteration": 1}), vec![vec![0.25]]).wait().await.unwrap();
        let h2 = vec![vec![0.25], vec![0.5]];
        // A record sent, then a rewind to step 1 before it is awaited: the cut-back lands
        // after it, so the file ends at step 1 either way.
        let pending = task.record(serde_json::json!({"iteration": 2}), h2.clone());
        task.reopen(&cfg, &h2[..1]).unwrap();
        pending.wait().await.unwrap();
        task.record(serde_json::json!({"iteration": 2}), vec![vec![0.25], vec![0.75]])
            .wait()
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "0.25\n0.75\n");
        let metrics = std::fs::read_to_string(dir.path().join(METRICS_LOG)).unwrap();
        assert_eq!(metrics.lines().count(), 2, "{metrics}");

        // A cut-back that fails poisons the records after it, until one succeeds.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, "a file where a folder should be").unwrap();
        let bad = JobConfig { output_dir: blocked.display().to_string(), ..cfg.clone() };
        task.reopen(&bad, &h2[..1]).unwrap_err();
        let e = task.record(serde_json::json!({"iteration": 2}), h2.clone()).wait().await;
        let e = e.unwrap_err();
        assert!(e.to_string().contains("not cut back after a rewind"), "{e}");
        task.reopen(&cfg, &h2[..1]).unwrap();
        task.record(serde_json::json!({"iteration": 2}), h2.clone()).wait().await.unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "0.25\n0.5\n");
    }

    /// TensorBoard's own reader (`EventAccumulator`, from `deploy/reference-venv.sh`) over
    /// `dir`: `{"scalars": {tag: [[step, value]]}, "images": {tag: [[step, width, height]]}}`.
    fn read_tensorboard(dir: &Path) -> serde_json::Value {
        let script = r#"
import json, math, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
ea.Reload()
t = ea.Tags()
num = lambda x: None if math.isnan(x) else x
print(json.dumps({
    "scalars": {k: [[e.step, num(e.value)] for e in ea.Scalars(k)] for k in t["scalars"]},
    "images": {k: [[e.step, e.width, e.height] for e in ea.Images(k)] for k in t["images"]},
}))
"#;
        let out = std::process::Command::new("python")
            .args(["-c", script])
            .arg(dir)
            .output()
            .expect("python on PATH: the venv of deploy/reference-venv.sh");
        assert!(
            out.status.success(),
            "the tensorboard reader failed (run deploy/reference-venv.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    #[tokio::test]
    async fn tensorboard_shows_each_step_once_with_its_last_values_after_a_rewind_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JobConfig {
            output_dir: dir.path().display().to_string(),
            reward_log: "reward.txt".into(),
            ..Default::default()
        };
        let name = cfg.rewards[0].name.clone();
        // A line per iteration, its loss telling the run apart.
        let line = |step: u64, run: f64| {
            let m = StepMetrics { loss: run + step as f64 / 8.0, ..Default::default() };
            metrics_json(step, &[run], &[0.5], &m)
        };
        let grid = dir.path().join("samples").join("iteration-000002.png");
        std::fs::create_dir_all(grid.parent().unwrap()).unwrap();
        let png = |w: u32, h: u32| {
            let mut bytes = Vec::new();
            let mut enc = png::Encoder::new(&mut bytes, w, h);
            enc.set_color(png::ColorType::Rgb);
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(&vec![128; (w * h * 3) as usize]).unwrap();
            wr.finish().unwrap();
            bytes
        };
        std::fs::write(&grid, png(6, 4)).unwrap();
        let task = OutputTask::start(Outputs::open(&cfg, &[]).unwrap()).unwrap();
        let mut history = Vec::new();
        for step in 1..=3 {
            history.push(vec![1.0]);
            task.record(line(step, 1.0), history.clone()).wait().await.unwrap();
        }
        // A rewind to step 1; steps 2 and 3 are redone with other values and another grid.
        history.truncate(1);
        task.reopen(&cfg, &history).unwrap();
        std::fs::write(&grid, png(5, 3)).unwrap();
        for step in 2..=4 {
            history.push(vec![2.0]);
            task.record(line(step, 2.0), history.clone()).wait().await.unwrap();
        }
        drop(task);
        // A coordinator restart from step 3 (its record of step 4 lost): step 4 is redone.
        history.truncate(3);
        let task = OutputTask::start(Outputs::open(&cfg, &history).unwrap()).unwrap();
        for step in 4..=5 {
            history.push(vec![3.0]);
            task.record(line(step, 3.0), history.clone()).wait().await.unwrap();
        }
        drop(task);

        let files = std::fs::read_dir(dir.path().join("tensorboard")).unwrap().count();
        assert_eq!(files, 3, "a new event file per open");
        let tb = read_tensorboard(&dir.path().join("tensorboard"));
        let want = [(1, 1.0), (2, 2.0), (3, 2.0), (4, 3.0), (5, 3.0)];
        let want_loss: Vec<(u64, f64)> =
            want.iter().map(|&(s, run)| (s, run + s as f64 / 8.0)).collect();
        let series = |tag: &str| -> Vec<(u64, f64)> {
            tb["scalars"][tag]
                .as_array()
                .unwrap_or_else(|| panic!("no {tag}: {tb}"))
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
                .collect()
        };
        assert_eq!(series(&format!("mean_rewards/{name}")), want, "{tb}");
        let loss = series("loss");
        assert_eq!(loss.len(), want_loss.len(), "{tb}");
        for ((s, v), (ws, wv)) in loss.iter().zip(&want_loss) {
            assert_eq!((*s, *v), (*ws, f64::from(*wv as f32)), "{tb}");
        }
        assert_eq!(tb["images"]["samples"], serde_json::json!([[2, 5, 3]]), "{tb}");
    }

    #[tokio::test]
    async fn the_curve_is_redrawn_at_most_once_a_second_and_catches_up_with_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JobConfig { output_dir: dir.path().display().to_string(), ..Default::default() };
        let task = OutputTask::start(Outputs::open(&cfg, &[]).unwrap()).unwrap();
        let curve = dir.path().join(REWARD_CURVE);
        // What the curve of `history` looks like, drawn directly.
        let expected = |history: &[Vec<f64>]| {
            let want = dir.path().join("want.png");
            let name = cfg.rewards[0].name.clone();
            let series = vec![(name, history.iter().map(|h| h[0]).collect())];
            crate::plot::write_reward_curve(&want, &cfg.job_name, &series).unwrap();
            std::fs::read(want).unwrap()
        };
        let mut history = Vec::new();
        let start = Instant::now();
        for i in 1..=5u32 {
            history.push(vec![f64::from(i) / 10.0]);
            task.record(serde_json::json!({"iteration": i}), history.clone()).wait().await.unwrap();
        }
        let written = start.elapsed();
        let last = expected(&history);
        let deadline = Instant::now() + REDRAW_EVERY * 3;
        while std::fs::read(&curve).ok().as_deref() != Some(last.as_slice()) {
            assert!(Instant::now() < deadline, "the curve never caught up with iteration 5");
            std::thread::sleep(Duration::from_millis(50));
        }
        if written < REDRAW_EVERY / 2 {
            // Five records well inside a second: the first is drawn at once, the rest once.
            assert!(start.elapsed() >= REDRAW_EVERY, "redrawn too soon: {:?}", start.elapsed());
        }
    }
}
