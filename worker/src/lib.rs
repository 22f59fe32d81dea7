//! The dancegrpo worker: one process per accelerator. It registers with the coordinator,
//! heartbeats, joins the process group, and rolls out, scores and trains ([`train`]).
//!
//! Layout: [`session`] is the control-plane link, [`compute`] the thread that owns libtorch.

/// Shared unmasked scaled-dot-product attention.
mod attention;
/// `check` subcommands: run one component on files (parity checks, debugging).
pub mod check;
/// open_clip CLIP towers (the HPS-v2.1 reward model) and their checkpoint loaders.
pub mod clip;
/// The compute thread that owns the device and the model.
pub mod compute;
/// Prompt datasets (own and reference layouts).
pub mod data;
/// The device layer: `cpu`, `cuda:N`, `npu:N`.
pub mod device;
/// The data plane: c10d collectives and the rendezvous.
pub mod dist;
/// The error type.
pub mod error;
/// The FLUX transformer: config, network, weight loading, activation checkpointing.
pub mod flux;
/// FLUX latent packing and position ids.
pub mod latents;
/// The worker's side of the world's lifecycle: joining, training, paused.
pub mod lifecycle;
/// Prompts file to text embeddings (`preprocess`).
pub mod preprocess;
/// The one reader of `torch.save` files: one tensor, or a state dict.
pub mod pt;
/// Rewards: the `Reward` trait, built-in rewards, HPS-v2.1, the multi-reward loss.
pub mod reward;
/// The DanceGRPO SDE sampler: schedule, step, log-prob, rollout, recomputation.
pub mod sampler;
/// The control-plane session with the coordinator.
pub mod session;
/// T5 and CLIP text encoders.
pub mod text;
/// Deterministic CPU numerics: a fixed intra-op thread count.
pub mod threads;
/// The GRPO training loop on one worker.
pub mod train;
/// The FLUX VAE decoder and image post-processing.
pub mod vae;
/// The compute thread's state: device, store and process group of the current generation.
pub mod world;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use dancegrpo_proto::JobState;
pub use error::{Error, Result};
use session::{Session, SessionSettings};

use crate::compute::ComputeThread;
use crate::device::Device;
use crate::lifecycle::{Action, Event, Phase};
use crate::world::World;

/// A worker process's settings.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// How to reach the coordinator and what to tell it.
    pub session: SessionSettings,
    /// The device to compute on.
    pub device: Device,
    /// Bound on the rendezvous and every collective.
    pub collective_timeout: Duration,
    /// libtorch's intra-op thread count, pinned on the compute thread ([`threads::pin`]);
    /// `None` pins libtorch's default.
    pub threads: Option<usize>,
}

/// The work of the current [`Phase`]: the rendezvous of `Joining` or the driver of
/// `Training`. Dropping it voids it (a re-formed world restores from the checkpoint).
enum Work {
    Join(Pin<Box<dyn Future<Output = Result<String>> + Send>>),
    Train(Pin<Box<dyn Future<Output = Result<train::driver::Ended>> + Send>>),
}

/// How a [`Work`] ended: the backend of the formed group, or how training stopped.
enum Finished {
    Join(Result<String>),
    Train(Result<train::driver::Ended>),
}

impl Work {
    async fn finish(&mut self) -> Finished {
        match self {
            Work::Join(f) => Finished::Join(f.await),
            Work::Train(f) => Finished::Train(f.await),
        }
    }
}

/// How long a paused rank waits for a new world before it asks for work again.
const RETRY_PAUSED: Duration = Duration::from_secs(2);

/// Compute panics a worker survives (each discards its trainer and rejoins); the next one
/// fails the job, since a panic that keeps coming back is a bug no restart mends.
const MAX_PANICS: u32 = 3;
/// How long a signal during registration waits for an answer already on its way.
const REGISTER_GRACE: Duration = Duration::from_secs(2);

/// Runs the worker until the job ends or `shutdown` is cancelled (SIGTERM / Ctrl-C), then
/// drains and says goodbye.
pub async fn run(settings: WorkerSettings, shutdown: CancellationToken) -> Result<()> {
    let WorkerSettings { session: mut session_settings, device, collective_timeout, threads } =
        settings;
    let compute = std::sync::Arc::new(ComputeThread::spawn("dancegrpo-compute", move || {
        World::new(device, threads)
    })?);
    session_settings.info.device_description = compute.run(World::init_device).await??;
    let connect = Session::connect(session_settings);
    tokio::pin!(connect);
    let session = tokio::select! {
        s = &mut connect => s?,
        _ = shutdown.cancelled() => {
            // The coordinator may already have registered us with its answer in flight: let
            // that finish briefly and say goodbye, or it counts a running rank that is gone.
            match tokio::time::timeout(REGISTER_GRACE, &mut connect).await {
                Ok(Ok(session)) => session.goodbye("signal while joining", None).await,
                _ => tracing::info!("stopped before registering"),
            }
            return Ok(());
        }
    };
    let joined = session.joined().await;
    tracing::info!(job = %joined.config.job_name, job_id = %joined.job_id,
        "joined; waiting for the rest of the world");
    let backend_override = joined.config.backend.clone();
    let job_config = joined.config.clone();

    let hb_stop = CancellationToken::new();
    let mut heartbeats = tokio::spawn(session.clone().heartbeat_loop(hb_stop.clone()));
    let mut assignment = session.assignment();
    let mut job_state = session.job_state();
    // The newest generation assigned, which a rendezvous in progress on the compute thread
    // watches: a newer one calls it off at once.
    let generations = dist::Generations::default();
    let mut phase = Phase::default();
    let mut work: Option<Work> = None;
    let mut panics = 0;
    // What a transition starts; a join or a training started replaces the work before it.
    let start = |action: Action, work: &mut Option<Work>| match action {
        Action::None | Action::ReportFailedJoin { .. } => {}
        Action::Join(a) => {
            tracing::info!(rank = a.rank, world_size = a.world_size, generation = a.generation,
                store = %format!("{}:{}", a.store.host, a.store.port), "rank assigned; forming the process group");
            let (compute, backend, generations) =
                (compute.clone(), backend_override.clone(), generations.clone());
            *work = Some(Work::Join(Box::pin(async move {
                compute
                    .run(move |w: &mut World| {
                        w.join(&a, &backend, collective_timeout, &generations)
                    })
                    .await
                    .and_then(|r| r.map(|b| b.to_string()))
            })));
        }
        Action::Train(a) => {
            let run = train::driver::run(session.clone(), compute.clone(), a, job_config.clone());
            *work = Some(Work::Train(Box::pin(run)));
        }
    };
    let outcome = loop {
        if let Some(a) = assignment.borrow_and_update().clone() {
            generations.assigned(a.generation);
            start(phase.on(Event::Assigned(a)), &mut work);
        }
        let js = *job_state.borrow_and_update();
        if js == JobState::Failed {
            break Err(Error::JobFailed);
        }
        if js.is_terminal() {
            tracing::info!(state = %js, "job ended");
            break Ok(format!("job {js}"));
        }
        let retry_at = match &phase {
            Phase::Paused { until, .. } => Some(*until),
            _ => None,
        };
        let event = tokio::select! {
            _ = shutdown.cancelled() => break Ok("signal".to_string()),
            r = &mut heartbeats => {
                break match r {
                    Ok(Ok(())) => Ok("heartbeats stopped".into()),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(Error::Compute(format!("heartbeat task: {e}"))),
                };
            }
            f = async { work.as_mut().expect("guarded").finish().await }, if work.is_some() => {
                work = None;
                let generation = phase.generation().unwrap_or_default();
                let retry = tokio::time::Instant::now() + RETRY_PAUSED;
                match f {
                    Finished::Join(Ok(backend)) => {
                        tracing::info!(generation, %backend, "process group ready");
                        Event::Joined
                    }
                    // The coordinator has moved on: the new assignment is already here.
                    Finished::Join(Err(Error::Dist(e @ dist::DistError::Abandoned { .. }))) => {
                        tracing::info!(cause = %e, "process group not formed; joining the newer world");
                        Event::Abandoned
                    }
                    // A peer that is slow, gone or not yet back: this generation cannot
                    // form. Wait for the next one instead of exiting.
                    Finished::Join(Err(Error::Dist(e))) => {
                        tracing::warn!(generation, cause = %e,
                            "process group not formed; waiting for a new world");
                        Event::JoinFailed(e.to_string())
                    }
                    Finished::Train(Ok(train::driver::Ended::Done)) => break Ok("job done".into()),
                    Finished::Train(Ok(train::driver::Ended::Paused(why))) => {
                        tracing::warn!(cause = %why, "training paused until the world re-forms");
                        Event::Paused(retry)
                    }
                    Finished::Train(Ok(train::driver::Ended::Panicked(m))) => {
                        panics += 1;
                        if panics >= MAX_PANICS {
                            break Err(Error::Panicked(format!("{m} ({panics} times)")));
                        }
                        tracing::error!(cause = %m, panics,
                            "compute job panicked; rejoining from the last checkpoint");
                        Event::Paused(retry)
                    }
                    Finished::Join(Err(e)) | Finished::Train(Err(e)) => break Err(e),
                }
            }
            // Nothing re-formed the world (a transient error, a coordinator that came back
            // with the same world): ask for work again; a stale world is told so and waits.
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() => Event::RetryDue,
            _ = assignment.changed() => continue,
            _ = job_state.changed() => continue,
        };
        match phase.on(event) {
            Action::ReportFailedJoin { generation, why } => session.reform(generation, &why).await,
            action => start(action, &mut work),
        }
    };
    let reason = match &outcome {
        Ok(r) => r.clone(),
        Err(e) => e.to_string(),
    };
    // Heartbeats end before the goodbye. One answered after it would find this worker
    // stopped and register it again: a new worker in its old slot, which re-forms the world
    // (and rewinds the job to its last checkpoint) around a process that is leaving.
    hb_stop.cancel();
    // Unless the loop above already took its result (polling it again would panic).
    if !heartbeats.is_finished() {
        let _ = (&mut heartbeats).await;
    }
    let fatal = outcome.as_ref().err().filter(|e| e.fails_the_job()).map(|_| reason.as_str());
    session.goodbye(&reason, fatal).await;
    outcome.map(|_| ())
}
