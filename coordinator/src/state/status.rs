use std::sync::Arc;

use dancegrpo_proto::JobId;

use super::{CoordinatorState, JobSnapshot, ReformCause};

/// Counts since this coordinator started, for the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Counters {
    /// Checkpoints rank 0 has reported written.
    pub checkpoints: u64,
    /// Re-formations of a running world, by cause.
    pub reforms: Vec<(ReformCause, u64)>,
}
use crate::db::{JobRecord, WorkerRecord};
use crate::error::{Error, Result};

impl CoordinatorState {
    /// The job this coordinator runs.
    pub fn job_id(&self) -> JobId {
        self.lock().job.id.clone()
    }

    /// A snapshot of a job: this one (`None` or its id) from memory, others from the database.
    pub fn snapshot(&self, job_id: Option<&str>) -> Result<JobSnapshot> {
        self.snapshot_with(job_id, None)
    }

    /// [`CoordinatorState::snapshot`] with only the latest `history` iterations (all with
    /// `None`). This job's history is read from the database once and kept, so a status call
    /// holds the lock for a few clones, not a read of the whole history.
    pub fn snapshot_with(&self, job_id: Option<&str>, history: Option<u32>) -> Result<JobSnapshot> {
        let mut g = self.lock();
        match job_id {
            None => {}
            Some(id) if id == g.job.id.as_str() => {}
            Some(id) => {
                let job = g.db.job(id)?.ok_or_else(|| Error::UnknownJob(id.to_string()))?;
                return Ok(JobSnapshot {
                    workers: g.db.workers(id)?,
                    history: g.db.latest_iterations(id, history)?,
                    job,
                });
            }
        }
        let records = match &g.training.records {
            Some(r) => r.clone(),
            None => {
                let r = Arc::new(g.db.iterations(g.job.id.as_str())?);
                g.training.records = Some(r.clone());
                r
            }
        };
        let mut workers: Vec<WorkerRecord> = g.workers.iter().map(|w| w.rec.clone()).collect();
        let job = g.job.clone();
        drop(g);
        workers.sort_by_key(|w| (w.info.node_rank, w.info.local_rank, w.registered_ms));
        let skip = history.map_or(0, |n| records.len().saturating_sub(n as usize));
        Ok(JobSnapshot { history: records[skip..].to_vec(), job, workers })
    }

    /// What the metrics count since this coordinator started: checkpoints written, and
    /// re-formations of a running world by cause (every cause, zeros included).
    pub fn counters(&self) -> Counters {
        let g = self.lock();
        Counters {
            checkpoints: g.training.checkpoints,
            reforms: ReformCause::ALL
                .iter()
                .map(|c| (*c, g.training.reforms.get(c).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Every job in the database, newest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let g = self.lock();
        let mut jobs = g.db.jobs()?;
        // The running job's in-memory record is the freshest.
        for j in jobs.iter_mut().filter(|j| j.id == g.job.id) {
            *j = g.job.clone();
        }
        Ok(jobs)
    }
}
