use std::sync::Arc;

use dancegrpo_proto::{
    Advantages, JobState, NonFinitePolicy, Restore, StepMetrics, TrajectoryRewards, Work,
};
use tokio::time::Instant;

use super::training::ReformCause;
use super::{Caller, CoordinatorState, Inner, LONG_POLL, Training, checkpoint_due};
use crate::db::IterationRecord;
use crate::error::{Error, Result};
use crate::iteration::{Iteration, IterationError};
use crate::lifecycle::{JobEvent, Lifecycle};
use crate::outputs::{self, TrainerState, Written};

/// An iteration every rank has reported, on its way to the files and the database.
#[derive(Debug)]
struct Finished {
    index: u64,
    record: IterationRecord,
    /// Its lines in the output files, sent to the output task under the lock.
    written: Written,
    /// The job's message once it is committed.
    message: String,
}

impl CoordinatorState {
    /// The rank of a live worker in the current generation of a complete world, or why it
    /// cannot work now.
    pub(super) fn working_rank(inner: &mut Inner, who: &Caller, generation: u64) -> Result<u32> {
        let rank = Self::rank_of(inner, who, generation)?;
        let Inner { job, workers, .. } = inner;
        // A lost rank stalls every collective: say so instead of letting callers wait.
        for r in 0..job.world_size {
            if !workers.iter().any(|w| w.rec.rank == Some(r) && w.rec.state.is_live()) {
                return Err(Error::NotReady(format!(
                    "rank {r} is gone; the job continues from step {} when it rejoins",
                    job.checkpoint_step
                )));
            }
        }
        Ok(rank)
    }

    /// The rank of a live worker in the current generation.
    pub(super) fn rank_of(inner: &mut Inner, who: &Caller, generation: u64) -> Result<u32> {
        let Inner { job, workers, .. } = inner;
        match job.state {
            JobState::Failed => return Err(Error::JobFailed(job.message.clone())),
            s @ (JobState::Stopped | JobState::Cancelled) => {
                return Err(Error::JobEnded { state: s, message: job.message.clone() });
            }
            _ => {}
        }
        let w = Self::find(workers, who)?;
        let rank = w
            .rec
            .rank
            .ok_or_else(|| Error::NotReady("no rank yet: the world is not complete".to_string()))?;
        if generation != job.generation {
            return Err(Error::Superseded { requested: generation, current: job.generation });
        }
        Ok(rank)
    }

    /// Step 1: `rank`'s work for the next iteration, planning it if it is the first ask.
    /// `ready_for` is the step the worker's weights are at (`None`: none). A rank that
    /// finished the iteration in flight waits (long poll) until the others have too.
    pub async fn get_work(
        &self,
        who: &Caller,
        ready_for: Option<u64>,
        generation: u64,
        checkpointed_step: u64,
    ) -> Result<Work> {
        let deadline = Instant::now() + LONG_POLL;
        loop {
            let mut changed = self.subscribe();
            if let Some(a) = self.try_get_work(who, ready_for, generation, checkpointed_step)? {
                return Ok(a);
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Err(Error::Timeout(
                    "the other ranks have not finished the iteration yet (ask again)".into(),
                ));
            }
        }
    }

    pub(super) fn try_get_work(
        &self,
        who: &Caller,
        ready_for: Option<u64>,
        generation: u64,
        checkpointed_step: u64,
    ) -> Result<Option<Work>> {
        let mut g = self.lock();
        // Ranks that are done may already have left: the end needs no complete world.
        let rank = Self::rank_of(&mut g, who, generation)?;
        let end = g.training.end(&g.job.config);
        if g.job.step < end {
            Self::working_rank(&mut g, who, generation)?;
        }
        let world = g.job.world_size;
        let Inner { db, job, training, dataset_len, .. } = &mut *g;
        // Rank 0 may write checkpoint N before the last rank has reported iteration N; a
        // rewind in between must not aim at a step the job has not recorded.
        if rank == 0 && checkpointed_step > job.checkpoint_step && checkpointed_step <= job.step {
            job.checkpoint_step = checkpointed_step;
            db.put_job(job)?;
            training.checkpoints += 1;
            // A status change like any other: a kept status answer is stale now.
            self.notify();
        }
        let cfg = job.config.clone();
        if job.step >= end {
            // Rank 0 asks only once the final checkpoint is written. Until then the others
            // stay: were rank 0 lost now, its replacement would redo the last iterations, and
            // it needs them for that.
            if rank != 0 && !training.done.contains(&0) {
                return Ok(None);
            }
            let first = training.done.insert(rank);
            let completed = training.done.len() as u32 == world && !job.state.is_terminal();
            if completed {
                let (early, message) = match &training.stop {
                    Some((_, why)) if job.step < u64::from(cfg.max_train_steps) => (
                        true,
                        format!(
                            "stopped at step {} with checkpoint-{} written ({why}); resume \
                             with resume_from_checkpoint = \"latest\"",
                            job.step, job.step
                        ),
                    ),
                    _ => (false, format!("completed {} iterations", job.step)),
                };
                Lifecycle::new(&*db).job(job, JobEvent::Finished { early }, message)?;
                tracing::info!(steps = job.step, state = %job.state, "job ended");
            }
            if completed || (rank == 0 && first) {
                drop(g);
                self.notify();
            }
            return Ok(Some(Work {
                iteration: end,
                items: vec![],
                done: true,
                restore: None,
                sample_grid: false,
            }));
        }
        if training.iteration.as_ref().is_some_and(|it| it.finished_by(rank)) {
            return Ok(None);
        }
        // Weights at another step than the job's (this rank's metrics report was lost, say)
        // can be brought back alone only to a checkpoint: otherwise the world goes back to
        // the last one together.
        if ready_for != Some(job.step) && job.step != 0 && job.step != job.checkpoint_step {
            let at = job.step;
            let cause = ReformCause::RankLostStep;
            let current = training.reform(db, job, *dataset_len, cause, |generation, step| {
                format!(
                    "rank {rank} lost step {at}, which has no checkpoint; world re-formed \
                     (generation {generation}), continuing from step {step}"
                )
            })?;
            drop(g);
            self.notify();
            return Err(Error::Superseded { requested: generation, current });
        }
        let restore = (ready_for != Some(job.step)).then(|| Restore {
            step: job.step,
            checkpoint_dir: training.checkpoint_dir(&cfg, job.step),
        });
        if training.iteration.is_none() {
            let it = Iteration::plan(job.step, job.generation, &cfg, world, &mut training.sampler)
                .map_err(|e| Error::InvalidRequest(e.to_string()))?;
            tracing::info!(iteration = it.index + 1, "iteration planned");
            training.iteration = Some(it);
        }
        let it = training.iteration.as_ref().expect("planned above");
        let every = u64::from(cfg.sample_grid_every);
        let last = it.index + 1 == u64::from(cfg.max_train_steps);
        Ok(Some(Work {
            iteration: it.index,
            items: it.work(rank).to_vec(),
            done: false,
            restore,
            sample_grid: every > 0 && (it.index % every == 0 || last),
        }))
    }

    pub(super) fn current(slot: &mut Option<Iteration>, iteration: u64) -> Result<&mut Iteration> {
        match slot.as_mut() {
            Some(it) if it.index == iteration => Ok(it),
            Some(it) => Err(Error::InvalidRequest(format!(
                "iteration {iteration} is not in flight (iteration {} is)",
                it.index
            ))),
            None => Err(Error::InvalidRequest(format!(
                "iteration {iteration} is not in flight; ask for work first"
            ))),
        }
    }

    /// Step 2: rewards of `rank`'s trajectories.
    pub fn report_rewards(
        &self,
        who: &Caller,
        iteration: u64,
        generation: u64,
        rewards: Vec<TrajectoryRewards>,
    ) -> Result<()> {
        let mut g = self.lock();
        let rank = Self::working_rank(&mut g, who, generation)?;
        let Inner { job, training, .. } = &mut *g;
        let Training { iteration: slot, sampler, .. } = training;
        let it = Self::current(slot, iteration)?;
        let outcome = it.report(rank, rewards, &job.config, sampler);
        let out = match outcome {
            Ok(()) => Ok(()),
            Err(IterationError::Invalid(m)) => Err(Error::InvalidRequest(m)),
            Err(IterationError::Fatal(m)) => Err(self.fail_job(&mut g, m)),
        };
        drop(g);
        self.notify();
        out
    }

    /// Step 3: `rank`'s advantages (or refill work), waiting until every group it holds
    /// members of is complete.
    pub async fn get_advantages(
        &self,
        who: &Caller,
        iteration: u64,
        generation: u64,
    ) -> Result<Advantages> {
        let deadline = Instant::now() + LONG_POLL;
        loop {
            // Subscribe before looking, so a change between the look and the wait is not lost.
            let mut changed = self.subscribe();
            {
                let mut g = self.lock();
                let rank = Self::working_rank(&mut g, who, generation)?;
                let it = Self::current(&mut g.training.iteration, iteration)?;
                if let Some(resp) = it.advantages(rank) {
                    return Ok(resp);
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Err(Error::Timeout(format!(
                    "no advantages for iteration {iteration} yet: other ranks are still rolling \
                     out (ask again)"
                )));
            }
        }
    }

    /// Step 5: `rank`'s metrics. Completes the iteration once every rank has reported, and
    /// answers whether rank 0 writes a checkpoint now, with the state that goes in it. Under
    /// `fsdp_sharding_strategy = full` every rank is told: each holds a shard of the
    /// optimizer state, and the write is a collective of them all.
    ///
    /// The files first, then the record: the last report's answer waits until the output
    /// task has the iteration's lines on disk, and only then is the iteration committed to the
    /// database and seen by anyone. A crash between the two leaves a line more than the
    /// database knows of, which a restart trims; the other way round it would leave a line
    /// missing, which no restart can make up.
    pub async fn report_step_metrics(
        &self,
        who: &Caller,
        generation: u64,
        metrics: StepMetrics,
    ) -> Result<(bool, String)> {
        let (answer, finished) = self.take_step_metrics(who, generation, metrics)?;
        if let Some(Finished { index, record, written, message }) = finished {
            if let Err(e) = written.wait().await {
                let mut g = self.lock();
                let why = format!("the outputs of iteration {} cannot be written: {e}", index + 1);
                return Err(self.fail_job(&mut g, why));
            }
            self.commit_iteration(who, generation, index, record, message)?;
        }
        Ok(answer)
    }

    /// The part of [`Self::report_step_metrics`] under the lock: records the metrics, and
    /// says what to write once every rank has reported.
    fn take_step_metrics(
        &self,
        who: &Caller,
        generation: u64,
        metrics: StepMetrics,
    ) -> Result<((bool, String), Option<Finished>)> {
        let mut g = self.lock();
        let rank = Self::working_rank(&mut g, who, generation)?;
        let Inner { job, training, .. } = &mut *g;
        if let Some((_, _, answer)) = training
            .answered
            .get(&rank)
            .filter(|(g, i, _)| (*g, *i) == (generation, metrics.iteration))
        {
            tracing::info!(
                rank,
                iteration = metrics.iteration,
                "repeated step metrics answered again"
            );
            return Ok((answer.clone(), None));
        }
        let cfg = job.config.clone();
        let it = Self::current(&mut training.iteration, metrics.iteration)?;
        let index = it.index;
        // Before its content is looked at: a report out of order must not fail the job.
        it.check_handed(rank).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        // A NaN or Inf loss or gradient norm: the worker has skipped the update (its weights
        // are those of the step before); `fail` ends the job here, `drop_group` goes on.
        if !(metrics.loss.is_finite() && metrics.grad_norm.is_finite()) {
            let what = format!(
                "rank {rank}: loss {} and grad norm {} at iteration {}, update skipped",
                metrics.loss,
                metrics.grad_norm,
                index + 1
            );
            if cfg.non_finite_policy == NonFinitePolicy::Fail {
                return Err(self.fail_job(&mut g, format!("{what} (non_finite_policy = fail)")));
            }
            tracing::warn!("{what} (non_finite_policy = drop_group: the job goes on)");
        }
        let complete = it
            .record_metrics(rank, StepMetrics { rank, ..metrics })
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let means = it.mean_rewards();
        let step = index + 1;
        // Decided at the first report it concerns and kept with the iteration, so a stop
        // between two ranks' reports cannot leave one of them alone in the checkpoint's
        // collectives. Unsharded, it concerns rank 0 only.
        let sharded = cfg.shards_state();
        let stop_at = training.stop.as_ref().map(|(at, _)| *at);
        let checkpoint =
            (sharded || rank == 0) && it.checkpoint(|| checkpoint_due(&cfg, step, stop_at));
        let mut reward_history = training.history.clone();
        reward_history.push(means.clone());
        let state = TrainerState {
            step,
            cursor: training.sampler.cursor(),
            sampler_seed: cfg.sampler_seed,
            reward_history,
        };
        let state_json = serde_json::to_string_pretty(&state).expect("trainer state serializes");
        let answer = (checkpoint, if rank == 0 { state_json } else { String::new() });
        training.answered.insert(rank, (generation, index, answer.clone()));
        if !complete {
            return Ok((answer, None));
        }
        if let Err(IterationError::Fatal(m) | IterationError::Invalid(m)) = it.check_replicas() {
            return Err(self.fail_job(&mut g, m));
        }
        let summary = it.summary();
        let line = outputs::metrics_json(step, &means, &it.std_rewards(), &summary);
        let message = format!(
            "iteration {step}/{}: reward {:.6}, loss {:.3e}",
            cfg.max_train_steps,
            means.first().copied().unwrap_or(f64::NAN),
            summary.loss
        );
        let finished = Finished {
            index,
            record: IterationRecord {
                iteration: step,
                mean_rewards: means,
                metrics_json: line.to_string(),
                cursor_json: serde_json::to_string(&state.cursor).expect("cursor serializes"),
            },
            written: training.outputs.record(line, state.reward_history),
            message,
        };
        Ok((answer, Some(finished)))
    }

    /// Commits a finished iteration once its outputs are written, unless the world moved on
    /// meanwhile (a rewind, a cancel): then the outputs are cut back by the rewind, and the
    /// caller learns why.
    fn commit_iteration(
        &self,
        who: &Caller,
        generation: u64,
        index: u64,
        record: IterationRecord,
        message: String,
    ) -> Result<()> {
        let mut g = self.lock();
        Self::rank_of(&mut g, who, generation)?;
        let Inner { db, job, training, .. } = &mut *g;
        let step = index + 1;
        if job.step != index || training.iteration.as_ref().is_none_or(|it| it.index != index) {
            return Err(Error::NotReady(format!(
                "iteration {step} was discarded while its outputs were written; the job is at \
                 step {}",
                job.step
            )));
        }
        db.put_iteration(&job.id, &record)?;
        training.history.push(record.mean_rewards.clone());
        if let Some(r) = &mut training.records {
            Arc::make_mut(r).push(record);
        }
        training.iteration = None;
        job.step = step;
        Lifecycle::new(&*db).note(job, message)?;
        drop(g);
        self.notify();
        Ok(())
    }

    /// Re-forms the world under a new generation after a failed collective of `generation`
    /// (once: later reports of the same failure find the generation already bumped).
    pub fn reform(&self, who: &Caller, generation: u64, reason: &str) -> Result<u64> {
        let mut g = self.lock();
        let rank = Self::rank_of(&mut g, who, generation).or_else(|e| match e {
            Error::Superseded { .. } => Ok(u32::MAX),
            e => Err(e),
        })?;
        let Inner { db, job, training, dataset_len, workers, .. } = &mut *g;
        // With a rank gone, its return re-forms the world; re-forming before that would only
        // fail the rendezvous again.
        let intact = (0..job.world_size)
            .all(|r| workers.iter().any(|w| w.rec.rank == Some(r) && w.rec.state.is_live()));
        if rank == u32::MAX || job.state != JobState::Running || !intact {
            return Ok(job.generation);
        }
        let cause = ReformCause::CollectiveFailed;
        let current = training.reform(db, job, *dataset_len, cause, |generation, step| {
            format!(
                "rank {rank} reported a failed collective ({reason}); world re-formed \
                 (generation {generation}), continuing from step {step}"
            )
        })?;
        drop(g);
        self.notify();
        Ok(current)
    }
}
