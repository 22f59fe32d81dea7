//! The dancegrpo worker: one process per accelerator. It registers with the coordinator,
//! heartbeats, and (as the training loop lands) rolls out, scores and trains.
//!
//! Layout: [`session`] is the control-plane link, [`compute`] the thread that owns libtorch.

/// `dancegrpo-worker check …`: model parity checks on tensors from files.
pub mod check;
/// The compute thread that owns the device and the model.
pub mod compute;
/// The error type.
pub mod error;
/// The FLUX transformer: config, network, weight loading, activation checkpointing.
pub mod flux;
/// FLUX latent packing and position ids.
pub mod latents;
/// The DanceGRPO SDE sampler: schedule, step, log-prob, rollout, recomputation.
pub mod sampler;
/// The control-plane session with the coordinator.
pub mod session;
/// The FLUX VAE decoder and image post-processing.
pub mod vae;

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use error::{Error, Result};
use session::{Session, SessionSettings};

/// Runs the worker until the job ends or `shutdown` is cancelled (SIGTERM / Ctrl-C), then
/// drains and says goodbye.
pub async fn run(mut settings: SessionSettings, shutdown: CancellationToken) -> Result<()> {
    let compute = compute::ComputeThread::spawn("dancegrpo-compute")?;
    if settings.info.device_description.is_empty() {
        settings.info.device_description = compute.run(compute::describe_cpu).await?;
    }
    let session = tokio::select! {
        s = Session::connect(settings) => s?,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped before registering");
            return Ok(());
        }
    };
    let joined = session.joined().await;
    tracing::info!(job = %joined.config.job_name, job_id = %joined.job_id,
        "joined; waiting for the rest of the world");

    let (draining_tx, draining) = watch::channel(false);
    let hb_stop = CancellationToken::new();
    let mut heartbeats = tokio::spawn(session.clone().heartbeat_loop(hb_stop.clone(), draining));
    let mut assignment = session.assignment();
    let mut job_state = session.job_state();
    let mut announced = None;
    let outcome = loop {
        if let Some(a) = assignment.borrow_and_update().clone() {
            if announced.as_ref() != Some(&a) {
                tracing::info!(rank = a.rank, world_size = a.world_size, generation = a.generation,
                    store = %format!("{}:{}", a.store.host, a.store.port), "rank assigned");
                announced = Some(a);
            }
        }
        let js = *job_state.borrow_and_update();
        if js.is_terminal() {
            tracing::info!(state = %js, "job ended");
            break Ok(format!("job {js}"));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break Ok("signal".to_string()),
            r = &mut heartbeats => {
                break match r {
                    Ok(Ok(())) => Ok("heartbeats stopped".into()),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(Error::Compute(format!("heartbeat task: {e}"))),
                };
            }
            _ = assignment.changed() => {}
            _ = job_state.changed() => {}
        }
    };
    // Drain: tell the coordinator first, so no new work comes our way, then leave.
    draining_tx.send_replace(true);
    let reason = match &outcome {
        Ok(r) => r.clone(),
        Err(e) => e.to_string(),
    };
    if !heartbeats.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    session.goodbye(&reason).await;
    hb_stop.cancel();
    let _ = heartbeats.await;
    drop(compute);
    outcome.map(|_| ())
}
