//! The step protocol from the worker's side (DESIGN.md "The step protocol"): get work, roll
//! out and score, report rewards, get advantages (rolling out refills first), train with the
//! all-reduce, report metrics, write the checkpoint the coordinator asks for. The compute runs
//! on the compute thread; this task only talks and waits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dancegrpo_proto::{Advantages, JobConfig, RankAssignment, Reason, WorkItem};

use crate::compute::ComputeThread;
use crate::error::{Error, Result};
use crate::flux::ModelError;
use crate::sampler::SamplerError;
use crate::session::{Session, forgotten};
use crate::world::World;

/// How long a worker keeps asking for advantages while other ranks are still rolling out.
const ADVANTAGES_PATIENCE: Duration = Duration::from_secs(3600);

/// Why training stopped without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The job has no more iterations.
    Done,
    /// This generation's world is gone (a rank was lost, or the world re-formed): wait for
    /// the next assignment.
    Paused(String),
    /// A compute job panicked. This rank's trainer is discarded: it rejoins with no weights,
    /// and the world restores the last checkpoint.
    Panicked(String),
}

/// A refusal that means "this world is over", not "this worker is broken".
fn paused(e: &Error) -> Option<String> {
    match e {
        // The world was re-formed, or a rank is gone.
        Error::Rejected {
            reason: Some(Reason::Superseded | Reason::NotReady), message, ..
        } => Some(message.clone()),
        // The coordinator restarted or forgot this worker: the heartbeat loop registers again
        // and a new world forms.
        Error::Rejected { reason: Some(r), message, .. } if forgotten(*r) => Some(message.clone()),
        // No reason: the transport failed.
        Error::Rejected { reason: None, code, message, .. }
            if crate::session::transport_failed(*code) =>
        {
            Some(message.clone())
        }
        Error::Dist(d) => Some(format!("a collective failed: {d}")),
        _ => None,
    }
}

/// Trains under assignment `a` until the job is done, the world is re-formed, or an error.
pub async fn run(
    session: Arc<Session>,
    compute: Arc<ComputeThread<World>>,
    a: RankAssignment,
    cfg: JobConfig,
) -> Result<Ended> {
    match iterate(&session, &compute, &a, &cfg).await {
        Ok(()) => Ok(Ended::Done),
        // An operator stopped or cancelled the job: nothing more to do.
        Err(Error::Rejected { reason: Some(Reason::JobEnded), .. }) => Ok(Ended::Done),
        Err(Error::Panicked(m)) => {
            // Whatever the job left half-done goes with the trainer.
            compute.run(|w: &mut World| w.discard_after_panic()).await?;
            // The others wait in a collective this rank will not join: re-form the world.
            session.reform(a.generation, &format!("rank {} panicked", a.rank)).await;
            Ok(Ended::Panicked(m))
        }
        Err(e) => match paused(&e) {
            Some(why) => {
                if matches!(e, Error::Dist(_)) {
                    // Every worker may still be alive (a slow peer, a dropped connection):
                    // nobody would re-form the world, so ask for it.
                    session.reform(a.generation, &why).await;
                }
                Ok(Ended::Paused(why))
            }
            None => Err(e),
        },
    }
}

fn compute_err(e: super::TrainError) -> Error {
    match e {
        // Kept apart: a peer that died mid-collective pauses this rank, it does not end it.
        super::TrainError::Dist(d)
        | super::TrainError::Model(ModelError::Dist(d))
        | super::TrainError::Sampler(SamplerError::Model(ModelError::Dist(d))) => Error::Dist(d),
        other => Error::Compute(other.to_string()),
    }
}

async fn iterate(
    session: &Session,
    compute: &ComputeThread<World>,
    a: &RankAssignment,
    cfg: &JobConfig,
) -> Result<()> {
    let generation = a.generation;
    let mut checkpointed: u64 = 0;
    {
        let cfg = cfg.clone();
        compute
            .run(move |w: &mut World| w.trainer(&cfg).map(|_| ()))
            .await?
            .map_err(compute_err)?;
    }
    loop {
        let ready_for = compute.run(|w: &mut World| w.ready_for()).await?.map_err(compute_err)?;
        let work = loop {
            match session.get_work(ready_for, generation, checkpointed).await {
                Ok(w) => break w,
                // The coordinator's long poll ran out while other ranks finish: ask again.
                Err(Error::Rejected { code: tonic::Code::DeadlineExceeded, .. }) => {}
                Err(e) => return Err(e),
            }
        };
        if work.done {
            tracing::info!("job done");
            return Ok(());
        }
        let iteration = work.iteration;
        if let Some(r) = work.restore {
            compute
                .run(move |w: &mut World| w.restore(r.step, r.checkpoint_dir.as_deref()))
                .await?
                .map_err(compute_err)?;
        }
        let items = work.items;
        let mut order = items.clone();
        let started = Instant::now();
        let mut scored = rollout(compute, items).await?;
        let mut advantages = BTreeMap::new();
        loop {
            session.report_rewards(iteration, generation, &scored).await?;
            let resp = get_advantages(session, iteration, generation).await?;
            if resp.refill.is_empty() {
                for t in resp.advantages {
                    advantages.insert((t.item.group_id, t.item.member_index), t.advantages);
                }
                break;
            }
            let refill = resp.refill;
            tracing::warn!(n = refill.len(), "rolling out a refilled group");
            for r in &refill {
                if let Some(o) = order
                    .iter_mut()
                    .find(|o| o.group_id == r.group_id && o.member_index == r.member_index)
                {
                    *o = *r;
                }
            }
            scored = rollout(compute, refill).await?;
        }
        let mut metrics = compute
            .run(move |w: &mut World| w.train(iteration, &order, &advantages))
            .await?
            .map_err(compute_err)?;
        metrics.rank = a.rank;
        if work.sample_grid && a.rank == 0 {
            match compute
                .run(move |w: &mut World| w.loaded_trainer()?.write_samples(iteration))
                .await?
            {
                Ok(p) => tracing::info!(path = %p.display(), "sample grid written"),
                Err(e) => tracing::warn!("sample grid not written: {e}"),
            }
        } else {
            compute
                .run(|w: &mut World| w.loaded_trainer().map(|t| t.drop_samples()))
                .await?
                .map_err(compute_err)?;
        }
        let t = metrics.timings;
        tracing::info!(
            iteration = iteration + 1,
            loss = metrics.loss,
            grad_norm = metrics.grad_norm,
            ratio_dev_max = metrics.ratio_dev_max,
            rollout_s = t.rollout_s,
            decode_s = t.decode_s,
            reward_s = t.reward_s,
            train_s = t.train_s,
            comm_s = t.communication_s,
            total_s = started.elapsed().as_secs_f64(),
            "iteration done"
        );
        if let Some(state) = session.report_step_metrics(generation, &metrics).await? {
            let step = iteration + 1;
            // Sharded, every rank is told: each takes part in gathering the optimizer state.
            compute
                .run(move |w: &mut World| w.save_checkpoint(step, &state))
                .await?
                .map_err(compute_err)?;
            checkpointed = step;
        }
    }
}

async fn rollout(
    compute: &ComputeThread<World>,
    items: Vec<WorkItem>,
) -> Result<super::trainer::Scored> {
    compute.run(move |w: &mut World| w.rollout(&items)).await?.map_err(compute_err)
}

/// GetAdvantages, asked again while the coordinator's long poll runs out (other ranks are
/// still rolling out), up to [`ADVANTAGES_PATIENCE`].
async fn get_advantages(session: &Session, iteration: u64, generation: u64) -> Result<Advantages> {
    let start = Instant::now();
    loop {
        match session.get_advantages(iteration, generation).await {
            Ok(a) => return Ok(a),
            Err(Error::Rejected { code: tonic::Code::DeadlineExceeded, .. })
                if start.elapsed() < ADVANTAGES_PATIENCE => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::rejected;

    #[test]
    fn paused_is_told_by_the_reason_not_by_the_message() {
        let e = |s: tonic::Status| rejected("GetWork", s);
        let superseded = e(Reason::Superseded.status("generation 1 was superseded"));
        assert!(paused(&superseded).is_some());
        // Same code (ABORTED), and a message that reads like the other: the reason decides.
        assert!(paused(&e(Reason::JobFailed.status("generation superseded"))).is_none());
        assert!(paused(&e(Reason::ProtocolVersion.status("unknown worker"))).is_none());
        assert!(paused(&e(Reason::UnknownWorker.status("x"))).is_some());
        assert!(paused(&e(Reason::NotReady.status("x"))).is_some());
        // A transport failure carries no reason.
        assert!(paused(&e(tonic::Status::unavailable("connection refused"))).is_some());
        // The coordinator killed during a long poll.
        assert!(paused(&e(tonic::Status::cancelled("operation was canceled"))).is_some());
        assert!(paused(&e(tonic::Status::aborted("superseded"))).is_none());
    }
}
