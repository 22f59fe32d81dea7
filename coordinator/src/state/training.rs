use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dancegrpo_proto::{JobConfig, layout};

use crate::db::{Db, IterationRecord, JobRecord};
use crate::error::{Error, Result};
use crate::iteration::Iteration;
use crate::lifecycle::{JobEvent, Lifecycle, job_next};
use crate::outputs::OutputTask;
use crate::schedule::{Cursor, PromptSampler};

/// Why a running world was re-formed, as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReformCause {
    /// A worker came back in the slot of a lost one.
    RankRejoined,
    /// A rank's weights fell behind a step that has no checkpoint.
    RankLostStep,
    /// A rank reported a failed collective or rendezvous.
    CollectiveFailed,
}

impl ReformCause {
    /// Every cause, for series that exist before the first re-formation.
    pub const ALL: [ReformCause; 3] =
        [ReformCause::RankRejoined, ReformCause::RankLostStep, ReformCause::CollectiveFailed];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ReformCause::RankRejoined => "rank_rejoined",
            ReformCause::RankLostStep => "rank_lost_step",
            ReformCause::CollectiveFailed => "collective_failed",
        }
    }
}

/// The training side of the job: the prompt stream, the iteration in flight and the outputs.
#[derive(Debug)]
pub(super) struct Training {
    pub(super) sampler: PromptSampler,
    pub(super) iteration: Option<Iteration>,
    pub(super) outputs: OutputTask,
    /// Mean rewards of completed iterations; `history.len() == job.step`.
    pub(super) history: Vec<Vec<f64>>,
    /// Ranks told the job is done.
    pub(super) done: BTreeSet<u32>,
    /// A checkpoint outside `output_dir` this job was resumed from, and its step.
    pub(super) resumed_from: Option<(u64, PathBuf)>,
    /// An operator's stop: the step the job ends at once it is checkpointed, and why. Kept
    /// through rewinds (the world redoes the steps up to it) and, in the database, through a
    /// coordinator restart.
    pub(super) stop: Option<(u64, String)>,
    /// The iteration records of this job as the database has them, read once for the status
    /// and kept up to date by each commit; `None` until read, and after a rewind.
    pub(super) records: Option<Arc<Vec<IterationRecord>>>,
    /// Re-formations of a running world since this coordinator started, by cause.
    pub(super) reforms: std::collections::BTreeMap<ReformCause, u64>,
    /// Checkpoints rank 0 has reported written since this coordinator started.
    pub(super) checkpoints: u64,
    /// Each rank's last ReportStepMetrics answer, by (generation, iteration): a report retried
    /// because its answer was lost gets the same answer, instead of an error and a rewind.
    pub(super) answered: std::collections::BTreeMap<u32, (u64, u64, (bool, String))>,
}

/// Whether `checkpoint-<step>` is written once `step` is trained (by rank 0; under
/// `fsdp_sharding_strategy = full` by every rank together): every `checkpointing_steps`, the
/// last step, and the step a stop ends at.
pub(super) fn checkpoint_due(cfg: &JobConfig, step: u64, stop_at: Option<u64>) -> bool {
    let every = u64::from(cfg.checkpointing_steps);
    stop_at == Some(step)
        || every > 0 && (step % every == 0 || step == u64::from(cfg.max_train_steps))
}

impl Training {
    /// The step the job ends at: `max_train_steps`, or earlier when stopping.
    pub(super) fn end(&self, cfg: &JobConfig) -> u64 {
        let max = u64::from(cfg.max_train_steps);
        self.stop.as_ref().map_or(max, |(at, _)| (*at).min(max))
    }

    pub(super) fn checkpoint_dir(&self, cfg: &JobConfig, step: u64) -> Option<PathBuf> {
        if step == 0 {
            return None;
        }
        match &self.resumed_from {
            Some((s, dir)) if *s == step => Some(dir.clone()),
            _ => Some(layout::checkpoint_dir(Path::new(&cfg.output_dir), step)),
        }
    }

    /// Goes back to the last checkpoint: the weights of the ranks no longer agree with any
    /// recorded step once a world is re-formed, so the iterations after it are redone.
    pub(super) fn rewind(&mut self, db: &Db, job: &mut JobRecord, dataset_len: u64) -> Result<()> {
        let step = job.checkpoint_step.min(job.step);
        let records = db.iterations(job.id.as_str())?;
        let cursor = if step == 0 {
            Cursor::default()
        } else {
            let rec = records.iter().find(|r| r.iteration == step).ok_or_else(|| {
                Error::InvalidRequest(format!("no record of iteration {step} to rewind to"))
            })?;
            serde_json::from_str(&rec.cursor_json).map_err(|e| {
                Error::InvalidRequest(format!("bad cursor of iteration {step}: {e}"))
            })?
        };
        if step != job.step {
            tracing::warn!(from = job.step, to = step, "rewinding to the last checkpoint");
        }
        db.truncate_iterations(&job.id, step)?;
        self.history.truncate(step as usize);
        job.step = step;
        self.sampler = PromptSampler::new(job.config.sampler_seed, dataset_len, cursor);
        self.iteration = None;
        self.done.clear();
        self.records = None;
        self.outputs.reopen(&job.config, &self.history)?;
        Ok(())
    }

    /// Re-forms the world: a new generation, rewound to the last checkpoint, with `why`
    /// (given the new generation and step) as the job's message. Returns the generation.
    pub(super) fn reform(
        &mut self,
        db: &Db,
        job: &mut JobRecord,
        dataset_len: u64,
        cause: ReformCause,
        why: impl FnOnce(u64, u64) -> String,
    ) -> Result<u64> {
        // Refused before anything is rewound: only a running world is re-formed.
        job_next(job.state, JobEvent::Reformed)?;
        self.rewind(db, job, dataset_len)?;
        let message = why(job.generation + 1, job.step);
        tracing::warn!("{message}");
        Lifecycle::new(db).job(job, JobEvent::Reformed, message)?;
        *self.reforms.entry(cause).or_default() += 1;
        Ok(job.generation)
    }
}
