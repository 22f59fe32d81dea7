use super::{CoordinatorState, Inner, checkpoint_due};
use crate::db::JobRecord;
use crate::error::{Error, Result};
use crate::lifecycle::{JobEvent, Lifecycle};

impl CoordinatorState {
    /// An operator's stop: the iteration in flight finishes, rank 0 checkpoints it, and the
    /// job ends `stopped`. Returns the step it ends at. Where a rank has already been told the
    /// iteration in flight has no checkpoint (rank 0; under `fsdp_sharding_strategy = full`
    /// any rank), one more iteration is trained and checkpointed; where the current step is
    /// checkpointed and nothing is in flight, the job ends at once.
    pub fn stop(&self, job_id: Option<&str>, reason: &str) -> Result<u64> {
        let mut g = self.lock();
        Self::operable(&g.job, job_id)?;
        let Inner { db, job, training, .. } = &mut *g;
        let due = |s: u64| checkpoint_due(&job.config, s, None);
        let at = match &training.iteration {
            Some(it) if it.checkpoint_decided() != Some(false) => it.index + 1,
            Some(it) => it.index + 2,
            None if job.step == job.checkpoint_step || due(job.step) => job.step,
            None => job.step + 1,
        };
        let at = at.min(u64::from(job.config.max_train_steps));
        // A second stop does not push the first one's step back.
        let at = training.stop.as_ref().map_or(at, |(first, _)| at.min(*first));
        let why = format!("operator: {reason}");
        training.stop = Some((at, why.clone()));
        db.put_stop(&job.id, at, &why)?;
        let life = Lifecycle::new(&*db);
        if job.step >= at && job.step == job.checkpoint_step && training.iteration.is_none() {
            let message = format!(
                "stopped at step {at} ({why}); resume with resume_from_checkpoint = \"latest\""
            );
            life.job(job, JobEvent::StoppedNow, message)?;
        } else {
            life.note(job, format!("stopping at step {at}, once checkpointed ({why})"))?;
        }
        tracing::warn!("{}", job.message);
        drop(g);
        self.notify();
        Ok(at)
    }

    /// An operator's cancel: the job ends `cancelled` at once, without another step or
    /// checkpoint. Workers see it at their next heartbeat or call, and leave.
    pub fn cancel(&self, job_id: Option<&str>, reason: &str) -> Result<()> {
        let mut g = self.lock();
        Self::operable(&g.job, job_id)?;
        let Inner { db, job, training, .. } = &mut *g;
        let message = format!(
            "cancelled at step {} (operator: {reason}); the last checkpoint is of step {}",
            job.step, job.checkpoint_step
        );
        Lifecycle::new(&*db).job(job, JobEvent::Cancelled, message)?;
        tracing::warn!("{}", job.message);
        training.iteration = None;
        drop(g);
        self.notify();
        Ok(())
    }

    /// Whether an operator action may act on `job_id` (`None`: this job): only this
    /// coordinator's job, and only before it has ended.
    pub(super) fn operable(job: &JobRecord, job_id: Option<&str>) -> Result<()> {
        if let Some(id) = job_id.filter(|id| *id != job.id.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "job {id} is not the job this coordinator runs ({}); only that one can be \
                 stopped or cancelled here",
                job.id
            )));
        }
        if job.state.is_terminal() {
            return Err(Error::InvalidRequest(format!(
                "job {} has already ended ({}): {}",
                job.id, job.state, job.message
            )));
        }
        Ok(())
    }
}
