//! The worker's control-plane session: connect (with backoff), register, heartbeat, goodbye,
//! and the step RPCs. This is the worker's gRPC edge: the only place that builds requests and
//! reads replies, converting them to and from the domain types.
//!
//! Heartbeats run on their own task on the async runtime, independent of the compute thread.
//! If the coordinator forgets us (it restarted, or declared us lost), the session registers
//! again under the same (node rank, local rank) and the world is re-formed around it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dancegrpo_proto::convert::job_config_from_wire;
use dancegrpo_proto::pb::coordinator_client::CoordinatorClient;
use dancegrpo_proto::{
    Advantages, AuthToken, ClientAuth, JobConfig, JobState, PROTOCOL_VERSION, RankAssignment,
    Reason, SessionSecret, StepMetrics, TrajectoryRewards, Work, WorkerInfo, pb,
};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// How the worker reaches the coordinator.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// `http://host:port`.
    pub coordinator: String,
    /// Keep retrying the first connection for this long.
    pub connect_timeout: Duration,
    /// What we tell the coordinator about ourselves.
    pub info: WorkerInfo,
    /// The job's auth token, when the coordinator has one.
    pub token: Option<AuthToken>,
    /// TLS to the coordinator, when it serves TLS.
    pub tls: dancegrpo_proto::tls::ClientTls,
}

/// What the coordinator told us at registration.
#[derive(Clone, Debug)]
pub struct Joined {
    /// Our id.
    pub worker_id: String,
    /// The secret of this registration, which every later call carries.
    pub secret: SessionSecret,
    /// The job id.
    pub job_id: String,
    /// The job config.
    pub config: JobConfig,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
}

/// A registered worker's link to the coordinator.
#[derive(Debug)]
pub struct Session {
    settings: SessionSettings,
    client: CoordinatorClient<InterceptedService<Channel, ClientAuth>>,
    joined: Mutex<Joined>,
    assignment: watch::Sender<Option<RankAssignment>>,
    job_state: watch::Sender<JobState>,
}

/// A refusal that means the coordinator no longer knows this worker as registered (it
/// restarted, declared the worker lost, or lost the job): registering again is the answer.
pub(crate) fn forgotten(r: Reason) -> bool {
    matches!(r, Reason::UnknownWorker | Reason::UnknownJob | Reason::WorkerGone | Reason::BadData)
}

fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// Whether a refusal without a reason of the coordinator's is the transport failing: refused
/// or dropped connections (Unavailable), a coordinator restarting (Unknown) or dying during a
/// long poll (Cancelled). The call may or may not have arrived.
pub(crate) fn transport_failed(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// How long a report whose connection failed is sent again. The coordinator answers a repeated
/// report as it answered the first, so a lost answer costs a retry, not a rewind to the last
/// checkpoint (up to 40 FLUX iterations).
const REPORT_RETRY: Duration = Duration::from_secs(20);

/// Runs `call` until it gets an answer, or an error of the coordinator's own (one with a
/// reason), or `REPORT_RETRY` has passed; with backoff from 100 ms to 2 s.
async fn retried<T, F, Fut>(what: &str, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match call().await {
            Err(Error::Rejected { reason: None, code, message, .. })
                if transport_failed(code) && start.elapsed() + delay < REPORT_RETRY =>
            {
                tracing::warn!(cause = %message, "{what}: no answer; sending it again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

impl Session {
    /// Connects and registers, retrying transient failures and a slot still held (by this
    /// worker's previous process, not yet declared lost) with exponential backoff until
    /// `connect_timeout`; any other refusal (protocol mismatch, full world) fails at once.
    pub async fn connect(settings: SessionSettings) -> Result<Arc<Self>> {
        let endpoint = Endpoint::from_shared(settings.tls.uri(&settings.coordinator))
            .map_err(|e| Error::Settings(format!("bad coordinator address: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        let endpoint = settings.tls.apply(endpoint).map_err(|e| Error::Settings(e.to_string()))?;
        let client = CoordinatorClient::with_interceptor(
            endpoint.connect_lazy(),
            ClientAuth::new(settings.token.clone()),
        );
        let (assignment, _) = watch::channel(None);
        let (job_state, _) = watch::channel(JobState::WaitingForWorkers);
        let mut session = Self {
            joined: Mutex::new(Joined {
                worker_id: String::new(),
                secret: SessionSecret::from(String::new()),
                job_id: String::new(),
                config: JobConfig::default(),
                heartbeat_interval: Duration::from_secs(1),
            }),
            settings,
            client,
            assignment,
            job_state,
        };
        let joined = session.register_with_retry().await?;
        session.joined = Mutex::new(joined);
        Ok(Arc::new(session))
    }

    async fn register_with_retry(&self) -> Result<Joined> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.register_once().await {
                Ok(j) => return Ok(j),
                // The slot's previous worker (this one, before a restart) is declared lost
                // within the coordinator's heartbeat timeout, and the slot frees: wait for it,
                // and say so, instead of exiting. Given up on, it is the refusal itself.
                Err(e @ Error::Rejected { reason: Some(Reason::DuplicateSlot), .. }) => {
                    let waited = start.elapsed();
                    if waited >= self.settings.connect_timeout {
                        return Err(e);
                    }
                    tracing::warn!(cause = %e, "slot still held; retrying in {delay:?}");
                    let left = self.settings.connect_timeout.saturating_sub(waited);
                    tokio::time::sleep(delay.min(left)).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(Error::Rejected { code, message, .. }) if is_transient(code) => {
                    let waited = start.elapsed();
                    if waited >= self.settings.connect_timeout {
                        return Err(Error::Unreachable {
                            addr: self.settings.coordinator.clone(),
                            waited_s: waited.as_secs_f64(),
                            last: message,
                        });
                    }
                    tracing::info!(coordinator = %self.settings.coordinator, cause = %message,
                        "coordinator not reachable yet; retrying in {delay:?}");
                    let left = self.settings.connect_timeout.saturating_sub(waited);
                    tokio::time::sleep(delay.min(left)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn register_once(&self) -> Result<Joined> {
        let resp = self
            .client
            .clone()
            .register_worker(pb::RegisterWorkerRequest {
                protocol_version: PROTOCOL_VERSION,
                worker: Some((&self.settings.info).into()),
            })
            .await
            .map_err(|s| rejected("RegisterWorker", s))?
            .into_inner();
        let config = job_config_from_wire("config_json", &resp.config_json)?;
        if let Some(a) = resp.assignment {
            self.assignment.send_replace(Some(RankAssignment::try_from(a)?));
        } else {
            self.assignment.send_replace(None);
        }
        tracing::info!(worker_id = %resp.worker_id, job_id = %resp.job_id, "registered");
        Ok(Joined {
            worker_id: resp.worker_id,
            secret: SessionSecret::from(resp.session_secret),
            job_id: resp.job_id,
            config,
            heartbeat_interval: Duration::from_millis(resp.heartbeat_interval_ms.max(10)),
        })
    }

    /// What the coordinator told us at (the latest) registration.
    pub async fn joined(&self) -> Joined {
        self.joined.lock().await.clone()
    }

    /// Follows our rank assignment (`None` until the world is complete).
    pub fn assignment(&self) -> watch::Receiver<Option<RankAssignment>> {
        self.assignment.subscribe()
    }

    /// Follows the job state.
    pub fn job_state(&self) -> watch::Receiver<JobState> {
        self.job_state.subscribe()
    }

    /// Heartbeats until `stop` is cancelled. Re-registers when the coordinator has forgotten
    /// us, and gives up after `connect_timeout` without any answer.
    pub async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) -> Result<()> {
        let mut last_ok = Instant::now();
        loop {
            let interval = self.joined.lock().await.heartbeat_interval;
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(interval) => {}
            }
            // A heartbeat still unanswered at the stop is dropped: the worker is about to
            // say goodbye, and an answer after that could only mislead it.
            let r = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = self.heartbeat_once() => r,
            };
            match r {
                Ok(()) => last_ok = Instant::now(),
                Err(Error::Rejected { reason: Some(r), message, .. }) if forgotten(r) => {
                    // A worker on its way out does not come back in its own slot.
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    tracing::warn!(cause = %message, "coordinator forgot this worker; registering again");
                    let j = self.register_with_retry().await?;
                    *self.joined.lock().await = j;
                    last_ok = Instant::now();
                }
                Err(Error::Rejected { code, message, .. }) if is_transient(code) => {
                    if last_ok.elapsed() > self.settings.connect_timeout {
                        return Err(Error::Unreachable {
                            addr: self.settings.coordinator.clone(),
                            waited_s: last_ok.elapsed().as_secs_f64(),
                            last: message,
                        });
                    }
                    tracing::warn!(cause = %message, "heartbeat failed; retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn heartbeat_once(&self) -> Result<()> {
        let (worker_id, session_secret) = self.credentials().await;
        let resp = self
            .client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id,
                state: pb::WorkerState::Running as i32,
                session_secret,
            })
            .await
            .map_err(|s| rejected("Heartbeat", s))?
            .into_inner();
        let js = JobState::try_from(resp.job_state()).unwrap_or(JobState::Running);
        let assignment = resp.assignment.map(RankAssignment::try_from).transpose()?;
        self.assignment.send_if_modified(|a| {
            let changed = *a != assignment;
            *a = assignment;
            changed
        });
        self.job_state.send_if_modified(|s| std::mem::replace(s, js) != js);
        Ok(())
    }

    /// The current registration's worker id (it changes when the worker re-registers).
    pub async fn worker_id(&self) -> String {
        self.joined.lock().await.worker_id.clone()
    }

    /// The current registration's worker id and session secret, as every call names them.
    async fn credentials(&self) -> (String, String) {
        let j = self.joined.lock().await;
        (j.worker_id.clone(), j.secret.expose().to_string())
    }

    /// Step 1: the work of the next iteration for weights at step `ready_for` (`None`: an
    /// interrupted update left them at no step). One call: the coordinator's long poll may run
    /// out (DEADLINE_EXCEEDED) while other ranks finish, and the caller asks again.
    pub async fn get_work(
        &self,
        ready_for: Option<u64>,
        generation: u64,
        checkpointed_step: u64,
    ) -> Result<Work> {
        let (worker_id, session_secret) = self.credentials().await;
        let req = pb::GetWorkRequest {
            worker_id,
            session_secret,
            iteration: ready_for,
            generation,
            checkpointed_step,
        };
        let resp = self.client.clone().get_work(req).await.map_err(|s| rejected("GetWork", s))?;
        Ok(Work::from(resp.into_inner()))
    }

    /// Step 2: the rewards of this rank's trajectories of `iteration`.
    pub async fn report_rewards(
        &self,
        iteration: u64,
        generation: u64,
        rewards: &[TrajectoryRewards],
    ) -> Result<()> {
        let (worker_id, session_secret) = self.credentials().await;
        let req = pb::ReportRewardsRequest {
            worker_id,
            session_secret,
            iteration,
            rewards: rewards.iter().map(Into::into).collect(),
            generation,
        };
        retried("ReportRewards", || async {
            self.client
                .clone()
                .report_rewards(req.clone())
                .await
                .map_err(|s| rejected("ReportRewards", s))
        })
        .await?;
        Ok(())
    }

    /// Step 3: this rank's advantages of `iteration`, or refill work to do first. One call:
    /// the long poll may run out (DEADLINE_EXCEEDED) while other ranks still roll out.
    pub async fn get_advantages(&self, iteration: u64, generation: u64) -> Result<Advantages> {
        let (worker_id, session_secret) = self.credentials().await;
        let req = pb::GetAdvantagesRequest { worker_id, iteration, generation, session_secret };
        let resp = self
            .client
            .clone()
            .get_advantages(req)
            .await
            .map_err(|s| rejected("GetAdvantages", s))?;
        Ok(Advantages::try_from(resp.into_inner())?)
    }

    /// Step 5: this rank's metrics. Returns the trainer state to write into
    /// `checkpoint-<iteration + 1>` when the coordinator asks for that checkpoint now.
    pub async fn report_step_metrics(
        &self,
        generation: u64,
        metrics: &StepMetrics,
    ) -> Result<Option<String>> {
        let (worker_id, session_secret) = self.credentials().await;
        let req = pb::ReportStepMetricsRequest {
            worker_id,
            session_secret,
            metrics: Some(metrics.into()),
            generation,
        };
        let resp = retried("ReportStepMetrics", || async {
            self.client
                .clone()
                .report_step_metrics(req.clone())
                .await
                .map_err(|s| rejected("ReportStepMetrics", s))
        })
        .await?
        .into_inner();
        Ok(resp.checkpoint.then_some(resp.trainer_state_json))
    }

    /// Asks the coordinator to re-form the world after a failed collective or rendezvous of
    /// `generation`. Best effort: a lost peer re-forms it anyway when it comes back.
    pub async fn reform(&self, generation: u64, reason: &str) {
        let (worker_id, session_secret) = self.credentials().await;
        let req =
            pb::ReformWorldRequest { worker_id, session_secret, generation, reason: reason.into() };
        match self.client.clone().reform_world(req).await {
            Ok(r) => {
                tracing::info!(generation = r.into_inner().generation, "asked for a new world")
            }
            Err(s) => tracing::warn!(cause = %s.message(), "could not ask for a new world"),
        }
    }

    /// Tells the coordinator we are leaving: cleanly, or on an `error` that a restart would hit
    /// again (which fails the job). Best effort, bounded in time.
    pub async fn goodbye(&self, reason: &str, error: Option<&str>) {
        let (worker_id, session_secret) = self.credentials().await;
        let mut client = self.client.clone();
        let call = client.goodbye(pb::GoodbyeRequest {
            worker_id,
            reason: reason.into(),
            error: error.unwrap_or_default().into(),
            session_secret,
        });
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(_)) => tracing::info!("said goodbye to the coordinator"),
            Ok(Err(s)) => tracing::warn!(cause = %s.message(), "goodbye failed"),
            Err(_) => tracing::warn!("goodbye timed out after 5s"),
        }
    }
}

/// A refused call as an [`Error`].
pub fn rejected(rpc: &'static str, s: tonic::Status) -> Error {
    let reason = Reason::of(&s);
    Error::Rejected { rpc, message: s.message().to_string(), code: s.code(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: tonic::Code, reason: Option<Reason>) -> Error {
        Error::Rejected { rpc: "ReportStepMetrics", code, reason, message: "lost".into() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_is_sent_again_while_the_connection_fails_and_not_after_a_refusal() {
        let tries = std::sync::atomic::AtomicU32::new(0);
        let r = retried("test", || async {
            match tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 | 1 => Err(failure(tonic::Code::Unavailable, None)),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!((r.unwrap(), tries.load(std::sync::atomic::Ordering::SeqCst)), (7, 3));
        // A refusal with the coordinator's reason is its answer: not sent again.
        tries.store(0, std::sync::atomic::Ordering::SeqCst);
        let r: Result<()> = retried("test", || async {
            tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(failure(tonic::Code::Aborted, Some(Reason::Superseded)))
        })
        .await;
        assert!(r.is_err() && tries.load(std::sync::atomic::Ordering::SeqCst) == 1);
        // A connection that stays down gives up within the bound.
        let start = tokio::time::Instant::now();
        let r: Result<()> =
            retried("test", || async { Err(failure(tonic::Code::Unavailable, None)) }).await;
        assert!(r.is_err());
        assert!(start.elapsed() <= REPORT_RETRY, "{:?}", start.elapsed());
    }
}
