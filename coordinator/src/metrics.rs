//! Prometheus `/metrics`, on a port of its own (`--metrics-listen`): what the job is at, the
//! last iteration's rewards, loss and timings, and what the control plane did. The exposition
//! is the Prometheus project's own client (`prometheus-client`, OpenMetrics text), built from
//! a status snapshot at each scrape: nothing on the training path updates a metric.
//!
//! Read-only and unauthenticated, as scrape targets are: it changes nothing, and says nothing
//! a status call would not (no secret, no config). Bind it where the scraper can reach it.
//! At FLUX size it costs one status snapshot per scrape (every 15 s by default).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::outputs::metrics_from_json;
use crate::state::CoordinatorState;

/// OpenMetrics text, as `prometheus-client` encodes it.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// Serves `/metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: Arc<CoordinatorState>,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Io { context: "metrics listener".into(), source })?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| Error::Io { context: format!("metrics server on {addr}"), source })
}

async fn scrape(State(state): State<Arc<CoordinatorState>>) -> Response {
    match render(&state) {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn labelled(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (String, f64)>,
) {
    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (l, v) in values {
        family.get_or_create(&vec![(label.to_string(), l)]).set(v);
    }
    registry.register(name, help, family);
}

/// The metrics of this coordinator's job, as OpenMetrics text.
pub fn render(state: &CoordinatorState) -> Result<String> {
    let snap = state.snapshot_with(None, Some(1))?;
    let counters = state.counters();
    let job = &snap.job;
    let mut r = Registry::with_prefix("dancegrpo");
    gauge(&mut r, "iteration", "Iterations completed", job.step as f64);
    gauge(&mut r, "max_train_steps", "Iterations the job runs", job.config.max_train_steps.into());
    gauge(&mut r, "checkpoint_step", "Step of the last checkpoint", job.checkpoint_step as f64);
    gauge(
        &mut r,
        "generation",
        "World generation (each re-formation adds one)",
        job.generation as f64,
    );
    gauge(&mut r, "world_size", "Ranks in the world", job.world_size.into());
    let live = snap.workers.iter().filter(|w| w.state.is_live()).count();
    gauge(&mut r, "workers_live", "Workers registered and not lost or stopped", live as f64);
    let states = [
        dancegrpo_proto::JobState::WaitingForWorkers,
        dancegrpo_proto::JobState::Running,
        dancegrpo_proto::JobState::Completed,
        dancegrpo_proto::JobState::Failed,
        dancegrpo_proto::JobState::Stopped,
        dancegrpo_proto::JobState::Cancelled,
    ];
    let is = |s| if job.state == s { 1.0 } else { 0.0 };
    labelled(
        &mut r,
        "job_state",
        "1 for the state the job is in",
        "state",
        states.map(|s| (s.as_str().to_string(), is(s))),
    );

    if let Some(last) = snap.history.last() {
        let names: Vec<String> = job.config.rewards.iter().map(|x| x.name.clone()).collect();
        let per_reward = |v: &[f64]| -> Vec<(String, f64)> {
            names.iter().cloned().zip(v.iter().copied()).collect()
        };
        labelled(
            &mut r,
            "reward_mean",
            "Last iteration's mean reward",
            "reward",
            per_reward(&last.mean_rewards),
        );
        let line: serde_json::Value = serde_json::from_str(&last.metrics_json).unwrap_or_default();
        let stds: Vec<f64> = line
            .get("std_rewards")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        labelled(
            &mut r,
            "reward_std",
            "Last iteration's reward standard deviation",
            "reward",
            per_reward(&stds),
        );
        if let Some(m) = metrics_from_json(&last.metrics_json) {
            gauge(&mut r, "loss", "Last iteration's loss (mean over ranks)", m.loss);
            gauge(&mut r, "grad_norm", "Last iteration's pre-clip gradient norm", m.grad_norm);
            gauge(
                &mut r,
                "ratio_deviation_mean",
                "Last iteration's mean |ratio - 1|",
                m.ratio_dev_mean,
            );
            gauge(
                &mut r,
                "ratio_deviation_max",
                "Last iteration's largest |ratio - 1|",
                m.ratio_dev_max,
            );
            gauge(
                &mut r,
                "clip_fraction",
                "Last iteration's fraction of clipped ratios",
                m.clip_fraction,
            );
            let t = &m.timings;
            labelled(
                &mut r,
                "phase_seconds",
                "Last iteration's seconds per phase, slowest rank",
                "phase",
                [
                    ("rollout".to_string(), t.rollout_s),
                    ("decode".to_string(), t.decode_s),
                    ("reward".to_string(), t.reward_s),
                    ("train".to_string(), t.train_s),
                ],
            );
            gauge(
                &mut r,
                "collective_seconds",
                "Last iteration's seconds in gradient collectives, slowest rank",
                t.communication_s,
            );
        }
    }

    let checkpoints = Counter::<u64>::default();
    checkpoints.inc_by(counters.checkpoints);
    r.register(
        "checkpoints_written",
        "Checkpoints written since the coordinator started",
        checkpoints,
    );
    let reforms = Family::<Labels, Counter<u64>>::default();
    for (cause, n) in counters.reforms {
        reforms.get_or_create(&vec![("cause".to_string(), cause.as_str().to_string())]).inc_by(n);
    }
    r.register(
        "reformations",
        "Re-formations of the running world since the coordinator \
        started, by cause",
        reforms,
    );

    let mut out = String::new();
    encode(&mut out, &r).map_err(|e| Error::InvalidRequest(format!("metrics encoding: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{info, settings};

    #[tokio::test(start_paused = true)]
    async fn re_formations_are_counted_by_cause() {
        let dir = tempfile::tempdir().unwrap();
        let s = CoordinatorState::open(settings(dir.path(), 2)).unwrap();
        let a = s.register(info(0), None).unwrap().caller();
        let b = s.register(info(1), None).unwrap().caller();
        s.reform(&a, 1, "collective failed").unwrap();
        // Rank 1 goes silent, is lost, and comes back.
        tokio::time::advance(Duration::from_millis(600)).await;
        s.heartbeat(&a, dancegrpo_proto::WorkerState::Running).unwrap();
        tokio::time::advance(Duration::from_millis(600)).await;
        s.expire(tokio::time::Instant::now()).unwrap();
        drop(b);
        s.register(info(1), None).unwrap();
        let text = render(&s).unwrap();
        for line in [
            "dancegrpo_reformations_total{cause=\"collective_failed\"} 1",
            "dancegrpo_reformations_total{cause=\"rank_rejoined\"} 1",
            "dancegrpo_reformations_total{cause=\"rank_lost_step\"} 0",
            "dancegrpo_generation 3.0",
            "dancegrpo_workers_live 2.0",
            "dancegrpo_job_state{state=\"running\"} 1.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with EOF");
    }
}
