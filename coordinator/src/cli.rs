//! The client side of the job API: `status`, `watch` and `list`, printed for humans or as JSON,
//! and the operator's `stop` and `cancel`.

use std::error::Error as _;
use std::fmt::Write as _;
use std::time::Duration;

use dancegrpo_proto::pb::job_service_client::JobServiceClient;
use dancegrpo_proto::tls::ClientTls;
use dancegrpo_proto::{AuthToken, ClientAuth, pb};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::state::now_ms;

/// The coordinator a command talks to, and the job token it shows.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port` or a URI.
    pub addr: String,
    /// The job's auth token, when the coordinator has one.
    pub token: Option<AuthToken>,
    /// TLS to the coordinator, when it serves TLS.
    pub tls: ClientTls,
}

/// A job API client that sends the job token with every call.
pub type Client = JobServiceClient<InterceptedService<Channel, ClientAuth>>;

/// `m` followed by each cause in the chain from `cause`, each text once: some causes print
/// their own source too.
fn with_causes(mut m: String, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cause {
        let text = c.to_string();
        if !m.contains(&text) {
            m += &format!(": {text}");
        }
        cause = c.source();
    }
    m
}

/// The message of a refused call; a missing or wrong token says how to give one.
fn refused(rpc: &str, e: &tonic::Status) -> anyhow::Error {
    // A failed handshake shows only in the causes (an untrusted certificate, a missing one).
    let mut m = with_causes(format!("{rpc} failed: {}", e.message()), std::error::Error::source(e));
    // No reason of ours: the connection failed, not the call.
    if dancegrpo_proto::Reason::of(e).is_none() {
        m += " (a coordinator serving TLS needs --tls-ca; under mutual TLS also \
              --tls-client-cert and --tls-client-key)";
    }
    anyhow::anyhow!(m)
}

/// Connects to a coordinator, failing with a message that names the address.
pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    let addr = &target.addr;
    let uri = target.tls.uri(addr);
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| anyhow::anyhow!("bad coordinator address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    let channel = target
        .tls
        .apply(endpoint)?
        .connect()
        .await
        // The causes say what went wrong: a refused connection, an untrusted certificate.
        .map_err(|e| {
            let m = with_causes(format!("cannot reach coordinator at {uri}: {e}"), e.source());
            anyhow::anyhow!(m)
        })?;
    Ok(JobServiceClient::with_interceptor(channel, ClientAuth::new(target.token.clone())))
}

fn state_name(s: i32) -> &'static str {
    pb::JobState::try_from(s).map(|s| s.as_str_name()).unwrap_or("UNKNOWN")
}

fn short_job_state(s: i32) -> String {
    state_name(s).trim_start_matches("JOB_STATE_").to_ascii_lowercase()
}

fn short_worker_state(s: i32) -> String {
    pb::WorkerState::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
        .trim_start_matches("WORKER_STATE_")
        .to_ascii_lowercase()
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let d = (now_ms() - ms).max(0) as f64 / 1000.0;
    if d < 120.0 { format!("{d:.1}s ago") } else { format!("{:.0}m ago", d / 60.0) }
}

/// The status as JSON, with enum names instead of numbers.
pub fn status_json(s: &pb::JobStatus) -> Value {
    json!({
        "job_id": s.job_id,
        "job_name": s.job_name,
        "state": short_job_state(s.state),
        "step": s.step,
        "checkpoint_step": s.checkpoint_step,
        "max_train_steps": s.max_train_steps,
        "world_size": s.world_size,
        "generation": s.generation,
        "message": s.message,
        "created_unix_ms": s.created_unix_ms,
        "updated_unix_ms": s.updated_unix_ms,
        "workers": s.workers.iter().map(|w| {
            let info = w.info.clone().unwrap_or_default();
            let dev = info.device.unwrap_or_default();
            json!({
                "worker_id": w.worker_id,
                "rank": w.rank,
                "state": short_worker_state(w.state),
                "host": info.host,
                "node_rank": info.node_rank,
                "local_rank": info.local_rank,
                "device": dev.device,
                "device_description": dev.description,
                "pid": info.pid,
                "last_heartbeat_unix_ms": w.last_heartbeat_unix_ms,
                "registered_unix_ms": w.registered_unix_ms,
            })
        }).collect::<Vec<_>>(),
        "history": s.history.iter().map(|h| {
            let m = h.metrics.unwrap_or_default();
            let t = m.timings.unwrap_or_default();
            json!({
                "iteration": h.iteration,
                "mean_rewards": h.mean_rewards,
                "loss": m.loss,
                "grad_norm": m.grad_norm,
                "ratio_dev_max": m.ratio_dev_max,
                "clip_fraction": m.clip_fraction,
                "timings_s": {
                    "rollout": t.rollout_s, "decode": t.decode_s, "reward": t.reward_s,
                    "train": t.train_s, "communication": t.communication_s,
                },
            })
        }).collect::<Vec<_>>(),
    })
}

/// The status as a human-readable block.
pub fn status_text(s: &pb::JobStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "job {} ({})  state {}  step {}/{}  checkpoint {}  world {}  generation {}",
        s.job_name,
        s.job_id,
        short_job_state(s.state),
        s.step,
        s.max_train_steps,
        s.checkpoint_step,
        s.world_size,
        s.generation
    );
    if !s.message.is_empty() {
        let _ = writeln!(o, "  {}", s.message);
    }
    let live = s
        .workers
        .iter()
        .filter(|w| {
            matches!(
                pb::WorkerState::try_from(w.state),
                Ok(pb::WorkerState::Waiting | pb::WorkerState::Running | pb::WorkerState::Draining)
            )
        })
        .count();
    let _ = writeln!(o, "workers: {live} live of {} expected", s.world_size);
    let _ = writeln!(
        o,
        "  {:<5} {:<9} {:<20} {:>4} {:>5} {:<24} {:>8} {:<14}",
        "RANK", "STATE", "HOST", "NODE", "LOCAL", "DEVICE", "PID", "LAST HEARTBEAT"
    );
    for w in &s.workers {
        let info = w.info.clone().unwrap_or_default();
        let dev = info.device.unwrap_or_default();
        let device = if dev.description.is_empty() || dev.description == dev.device {
            dev.device
        } else {
            format!("{} ({})", dev.device, dev.description)
        };
        let _ = writeln!(
            o,
            "  {:<5} {:<9} {:<20} {:>4} {:>5} {:<24} {:>8} {:<14}",
            w.rank.map_or("-".to_string(), |r| r.to_string()),
            short_worker_state(w.state),
            info.host,
            info.node_rank,
            info.local_rank,
            device,
            info.pid,
            ago(w.last_heartbeat_unix_ms)
        );
    }
    if !s.history.is_empty() {
        let _ = writeln!(o, "iterations (last 10; times in seconds, slowest rank):");
        let _ = writeln!(o, "{}", iteration_header());
        for h in s.history.iter().rev().take(10).rev() {
            let _ = writeln!(o, "{}", iteration_row(h));
        }
    }
    o
}

/// Header of the per-iteration table.
pub fn iteration_header() -> String {
    format!(
        "  {:>6}  {:>10}  {:>10}  {:>9}  {:>9}  {:>8} {:>8} {:>8} {:>8} {:>8}",
        "ITER",
        "REWARD",
        "LOSS",
        "GRADNORM",
        "|R-1|MAX",
        "ROLLOUT",
        "DECODE",
        "REWARD",
        "TRAIN",
        "COMM"
    )
}

/// One iteration as a table row: mean reward(s), loss, grad norm, ratio deviation, timings.
pub fn iteration_row(h: &pb::IterationRecord) -> String {
    let r: Vec<String> = h.mean_rewards.iter().map(|r| format!("{r:.5}")).collect();
    match &h.metrics {
        Some(m) => {
            let t = m.timings.unwrap_or_default();
            format!(
                "  {:>6}  {:>10}  {:>10.3e}  {:>9.3e}  {:>9.2e}  {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                h.iteration,
                r.join(" "),
                m.loss,
                m.grad_norm,
                m.ratio_dev_max,
                t.rollout_s,
                t.decode_s,
                t.reward_s,
                t.train_s,
                t.communication_s
            )
        }
        None => format!("  {:>6}  {:>10}  (resumed; no metrics)", h.iteration, r.join(" ")),
    }
}

/// `status`: one snapshot.
pub async fn status(
    target: &Target,
    job_id: &str,
    as_json: bool,
    history: Option<u32>,
) -> anyhow::Result<()> {
    let mut c = connect(target).await?;
    // The text shows the last 10 iterations; JSON is for machines, and gets all unless told.
    let history_limit = history.unwrap_or(if as_json { 0 } else { 10 });
    let s = c
        .get_job_status(pb::GetJobStatusRequest { job_id: job_id.into(), history_limit })
        .await
        .map_err(|e| refused("GetJobStatus", &e))?
        .into_inner()
        .status
        .ok_or_else(|| anyhow::anyhow!("coordinator sent an empty status"))?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
    } else {
        print!("{}", status_text(&s));
    }
    Ok(())
}

/// `watch`: follows the status until the job ends or the user interrupts.
pub async fn watch(
    target: &Target,
    job_id: &str,
    as_json: bool,
    table: bool,
    history: Option<u32>,
) -> anyhow::Result<()> {
    let mut c = connect(target).await?;
    // Each update carries only the latest iterations: the table prints the new ones, the
    // text its last 10.
    let history_limit = history.unwrap_or(if as_json { 0 } else { 10 });
    let mut stream = c
        .watch_job(pb::WatchJobRequest { job_id: job_id.into(), history_limit })
        .await
        .map_err(|e| refused("WatchJob", &e))?
        .into_inner();
    let mut shown = 0u64;
    let mut last_state = i32::MIN;
    // On a terminal, a bar under the table shows how far the job is and when it should end;
    // indicatif hides it elsewhere (logs, pipes), and the rows print either way.
    let bar = table.then(job_bar);
    while let Some(msg) = stream.message().await.map_err(|e| anyhow::anyhow!("{}", e.message()))? {
        let Some(s) = msg.status else { continue };
        if let Some(b) = &bar {
            let say = |line: String| b.suspend(|| println!("{line}"));
            if shown == 0 && last_state == i32::MIN {
                say(iteration_header());
            }
            let from = shown;
            for h in s.history.iter().filter(|h| h.iteration > from) {
                say(iteration_row(h));
                shown = h.iteration;
            }
            // A rewind (a lost worker, a restart) replays iterations: show them again.
            shown = shown.min(s.step);
            if s.state != last_state {
                say(format!("  [{}] {}", short_job_state(s.state), s.message));
                last_state = s.state;
            }
            b.set_length(s.max_train_steps);
            b.set_position(s.step);
            continue;
        }
        if as_json {
            println!("{}", serde_json::to_string(&status_json(&s))?);
        } else {
            println!("---");
            print!("{}", status_text(&s));
        }
    }
    Ok(())
}

fn job_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "  {bar:40} {pos}/{len} iterations, {elapsed} elapsed, about {eta} to go",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// `list`: every job in the coordinator's database.
pub async fn list(target: &Target, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(target).await?;
    let jobs = c
        .list_jobs(pb::ListJobsRequest {})
        .await
        .map_err(|e| refused("ListJobs", &e))?
        .into_inner()
        .jobs;
    if as_json {
        let v: Vec<Value> = jobs
            .iter()
            .map(|j| {
                json!({"job_id": j.job_id, "job_name": j.job_name, "state": short_job_state(j.state),
                       "step": j.step, "created_unix_ms": j.created_unix_ms,
                       "updated_unix_ms": j.updated_unix_ms})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:<38} {:<20} {:<20} {:>6}", "JOB ID", "NAME", "STATE", "STEP");
        for j in jobs {
            println!(
                "{:<38} {:<20} {:<20} {:>6}",
                j.job_id,
                j.job_name,
                short_job_state(j.state),
                j.step
            );
        }
    }
    Ok(())
}

/// `stop`: the job ends `stopped` once the iteration in flight is trained and checkpointed.
pub async fn stop(
    target: &Target,
    job_id: &str,
    reason: &str,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = connect(target).await?;
    let r = c
        .stop_job(pb::StopJobRequest { job_id: job_id.into(), reason: reason.into() })
        .await
        .map_err(|e| refused("StopJob", &e))?
        .into_inner();
    operator_answer(r.status, Some(r.stop_step), as_json)
}

/// `cancel`: the job ends `cancelled` at once; its last checkpoint stays.
pub async fn cancel(
    target: &Target,
    job_id: &str,
    reason: &str,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = connect(target).await?;
    let r = c
        .cancel_job(pb::CancelJobRequest { job_id: job_id.into(), reason: reason.into() })
        .await
        .map_err(|e| refused("CancelJob", &e))?
        .into_inner();
    operator_answer(r.status, None, as_json)
}

/// Prints the status an operator action answered with (and a stop's step).
fn operator_answer(
    status: Option<pb::JobStatus>,
    stop_step: Option<u64>,
    as_json: bool,
) -> anyhow::Result<()> {
    let s = status.ok_or_else(|| anyhow::anyhow!("coordinator sent an empty status"))?;
    if as_json {
        let mut v = status_json(&s);
        if let Some(at) = stop_step {
            v["stop_step"] = json!(at);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("job {}: {}", s.job_id, s.message);
    }
    Ok(())
}
