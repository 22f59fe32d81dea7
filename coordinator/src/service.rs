//! The gRPC services. Handlers convert the wire types at the edge, call into
//! [`CoordinatorState`], and end with `?`; errors map to `Status` in one place (`error.rs`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dancegrpo_proto::convert::{clean_text, job_config_to_wire};
use dancegrpo_proto::pb::coordinator_server::Coordinator;
use dancegrpo_proto::pb::job_service_server::JobService;
use dancegrpo_proto::{
    JobState, StepMetrics, TrajectoryRewards, WorkerId, WorkerInfo, WorkerState, pb,
};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::db::{JobRecord, WorkerRecord};
use crate::error::Error;
use crate::state::{Caller, CoordinatorState, JobSnapshot};

/// Implements both services over one shared state.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    state: Arc<CoordinatorState>,
    /// Whether calls are checked against a job token, without which nobody may stop or
    /// cancel the job (anyone who reaches the port could).
    authenticated: bool,
    statuses: Arc<Mutex<StatusCache>>,
    /// The job this coordinator runs, whose status is kept.
    job_id: String,
}

/// How long a converted status answer is reused while nothing else changes. Only heartbeat
/// times change without a new status version, so they are at most this much behind.
pub const STATUS_REUSE: Duration = Duration::from_millis(250);

/// At most this many history limits are kept per version: clients choose them.
const STATUS_ENTRIES: usize = 16;

/// This job's status, converted once per status version: the job and its workers, taken at
/// one moment and shared by every answer of the version (so no two answers disagree on a
/// heartbeat time), and the history per limit asked for.
#[derive(Debug, Default)]
struct StatusCache {
    version: u64,
    /// The status without its history, and when it was taken.
    base: Option<(Instant, pb::JobStatus)>,
    histories: HashMap<Option<u32>, Vec<pb::IterationRecord>>,
}

impl CoordinatorService {
    /// Wraps the state; `authenticated` says whether the server checks a job token.
    pub fn new(state: Arc<CoordinatorState>, authenticated: bool) -> Self {
        let job_id = state.job_id().to_string();
        Self { state, authenticated, statuses: Default::default(), job_id }
    }

    /// The status of `job` (`None`: this one) with its latest `history` iterations. This
    /// job's is converted once per status version and reused for up to [`STATUS_REUSE`];
    /// another job's, read from the database, each time.
    fn status(&self, job: Option<&str>, history: Option<u32>) -> Result<pb::JobStatus, Error> {
        if job.is_some_and(|id| id != self.job_id) {
            return Ok(status_to_pb(&self.state.snapshot_with(job, history)?));
        }
        // Read before the snapshot: a change after it makes the entry stale, never the
        // other way round.
        let version = self.state.version();
        {
            let cache = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
            if let (true, Some((at, base)), Some(h)) =
                (cache.version == version, &cache.base, cache.histories.get(&history))
            {
                if at.elapsed() < STATUS_REUSE {
                    return Ok(pb::JobStatus { history: h.clone(), ..base.clone() });
                }
            }
        }
        let fresh = status_to_pb(&self.state.snapshot_with(None, history)?);
        let mut cache = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let stale = |c: &StatusCache| {
            c.version != version
                || c.base.as_ref().is_none_or(|(at, _)| at.elapsed() >= STATUS_REUSE)
        };
        if stale(&cache) || cache.histories.len() >= STATUS_ENTRIES {
            cache.version = version;
            cache.histories.clear();
            cache.base = Some((Instant::now(), pb::JobStatus { history: vec![], ..fresh.clone() }));
        }
        cache.histories.insert(history, fresh.history.clone());
        let (_, base) = cache.base.as_ref().expect("set above");
        Ok(pb::JobStatus { history: fresh.history, ..base.clone() })
    }

    /// Operator actions need the token: refused outright when the server has none.
    fn operator(&self, action: &str) -> Result<(), Error> {
        if self.authenticated {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{action} needs the job token, and this coordinator runs without one: start it with \
             --auth-token-file FILE (or DANCEGRPO_AUTH_TOKEN) and pass the same to the CLI"
        )))
    }
}

/// Who a request claims to be, from its `worker_id` and `session_secret`.
fn caller(worker_id: String, session_secret: String) -> Caller {
    Caller { id: WorkerId::from(worker_id), secret: session_secret }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip().to_string());
        let req = req.into_inner();
        CoordinatorState::check_protocol(req.protocol_version)?;
        let info = WorkerInfo::try_from(
            req.worker.ok_or(Error::InvalidRequest("missing field `worker`".into()))?,
        )
        .map_err(Error::from)?;
        let reg = self.state.register(info, peer)?;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: reg.worker_id.into(),
            session_secret: reg.secret.expose().to_string(),
            job_id: reg.job_id.into(),
            config_json: job_config_to_wire(&reg.config),
            heartbeat_interval_ms: reg.heartbeat_interval.as_millis() as u64,
            assignment: reg.assignment.as_ref().map(Into::into),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        CoordinatorState::check_protocol(req.protocol_version)?;
        let state = WorkerState::try_from(req.state()).map_err(Error::from)?;
        let (assignment, job_state) =
            self.state.heartbeat(&caller(req.worker_id, req.session_secret), state)?;
        Ok(Response::new(pb::HeartbeatResponse {
            assignment: assignment.as_ref().map(Into::into),
            job_state: pb::JobState::from(job_state) as i32,
        }))
    }

    async fn goodbye(
        &self,
        req: Request<pb::GoodbyeRequest>,
    ) -> Result<Response<pb::GoodbyeResponse>, Status> {
        let req = req.into_inner();
        let who = caller(req.worker_id, req.session_secret);
        let error = (!req.error.is_empty()).then(|| clean_text(&req.error));
        self.state.goodbye(&who, &clean_text(&req.reason), error.as_deref())?;
        Ok(Response::new(pb::GoodbyeResponse {}))
    }

    async fn get_work(
        &self,
        req: Request<pb::GetWorkRequest>,
    ) -> Result<Response<pb::GetWorkResponse>, Status> {
        let r = req.into_inner();
        let work = self
            .state
            .get_work(
                &caller(r.worker_id, r.session_secret),
                r.iteration,
                r.generation,
                r.checkpointed_step,
            )
            .await?;
        Ok(Response::new((&work).into()))
    }

    async fn report_rewards(
        &self,
        req: Request<pb::ReportRewardsRequest>,
    ) -> Result<Response<pb::ReportRewardsResponse>, Status> {
        let r = req.into_inner();
        let rewards = r
            .rewards
            .into_iter()
            .map(TrajectoryRewards::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::from)?;
        self.state.report_rewards(
            &caller(r.worker_id, r.session_secret),
            r.iteration,
            r.generation,
            rewards,
        )?;
        Ok(Response::new(pb::ReportRewardsResponse {}))
    }

    async fn get_advantages(
        &self,
        req: Request<pb::GetAdvantagesRequest>,
    ) -> Result<Response<pb::GetAdvantagesResponse>, Status> {
        let r = req.into_inner();
        let advantages = self
            .state
            .get_advantages(&caller(r.worker_id, r.session_secret), r.iteration, r.generation)
            .await?;
        Ok(Response::new((&advantages).into()))
    }

    async fn report_step_metrics(
        &self,
        req: Request<pb::ReportStepMetricsRequest>,
    ) -> Result<Response<pb::ReportStepMetricsResponse>, Status> {
        let r = req.into_inner();
        let m = r.metrics.ok_or(Error::InvalidRequest("missing field `metrics`".into()))?;
        let m = StepMetrics::try_from(m).map_err(Error::from)?;
        let who = caller(r.worker_id, r.session_secret);
        let (checkpoint, trainer_state_json) =
            self.state.report_step_metrics(&who, r.generation, m).await?;
        Ok(Response::new(pb::ReportStepMetricsResponse { checkpoint, trainer_state_json }))
    }

    async fn reform_world(
        &self,
        req: Request<pb::ReformWorldRequest>,
    ) -> Result<Response<pb::ReformWorldResponse>, Status> {
        let r = req.into_inner();
        let who = caller(r.worker_id, r.session_secret);
        let generation = self.state.reform(&who, r.generation, &clean_text(&r.reason))?;
        Ok(Response::new(pb::ReformWorldResponse { generation }))
    }
}

fn worker_to_pb(w: &WorkerRecord) -> pb::WorkerStatus {
    pb::WorkerStatus {
        worker_id: w.id.to_string(),
        rank: w.rank,
        info: Some((&w.info).into()),
        state: pb::WorkerState::from(w.state) as i32,
        last_heartbeat_unix_ms: w.last_heartbeat_ms,
        registered_unix_ms: w.registered_ms,
    }
}

fn status_to_pb(s: &JobSnapshot) -> pb::JobStatus {
    let j = &s.job;
    pb::JobStatus {
        job_id: j.id.to_string(),
        job_name: j.name.clone(),
        state: pb::JobState::from(j.state) as i32,
        step: j.step,
        checkpoint_step: j.checkpoint_step,
        max_train_steps: j.config.max_train_steps.into(),
        world_size: j.world_size,
        generation: j.generation,
        workers: s.workers.iter().map(worker_to_pb).collect(),
        history: s
            .history
            .iter()
            .map(|h| pb::IterationRecord {
                iteration: h.iteration,
                mean_rewards: h.mean_rewards.clone(),
                metrics: crate::outputs::metrics_from_json(&h.metrics_json)
                    .as_ref()
                    .map(Into::into),
            })
            .collect(),
        created_unix_ms: j.created_ms,
        updated_unix_ms: j.updated_ms,
        message: j.message.clone(),
        config_json: job_config_to_wire(&j.config),
    }
}

fn summary_to_pb(j: &JobRecord) -> pb::JobSummary {
    pb::JobSummary {
        job_id: j.id.to_string(),
        job_name: j.name.clone(),
        state: pb::JobState::from(j.state) as i32,
        step: j.step,
        created_unix_ms: j.created_ms,
        updated_unix_ms: j.updated_ms,
    }
}

fn job_filter(id: &str) -> Option<&str> {
    (!id.is_empty()).then_some(id)
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::GetJobStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for CoordinatorService {
    async fn get_job_status(
        &self,
        req: Request<pb::GetJobStatusRequest>,
    ) -> Result<Response<pb::GetJobStatusResponse>, Status> {
        let req = req.into_inner();
        let status = self.status(job_filter(&req.job_id), history(req.history_limit))?;
        Ok(Response::new(pb::GetJobStatusResponse { status: Some(status) }))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job = job_filter(&req.get_ref().job_id).map(str::to_string);
        let limit = history(req.get_ref().history_limit);
        // Fail fast on an unknown job instead of opening a stream that errors later.
        self.state.snapshot(job.as_deref())?;
        let svc = self.clone();
        let mut changes = self.state.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let item = svc.status(job.as_deref(), limit).map_err(Status::from);
                let terminal = matches!(&item,
                    Ok(s) if JobState::try_from(s.state()).is_ok_and(JobState::is_terminal));
                let item = item.map(|s| pb::GetJobStatusResponse { status: Some(s) });
                // A send error means the client went away: stop following.
                if tx.send(item).await.is_err() || terminal {
                    break;
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.state.jobs()?;
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.iter().map(summary_to_pb).collect() }))
    }

    async fn stop_job(
        &self,
        req: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::StopJobResponse>, Status> {
        self.operator("StopJob")?;
        let req = req.into_inner();
        let reason = operator_reason(&req.reason);
        let stop_step = self.state.stop(job_filter(&req.job_id), &reason)?;
        let status = status_to_pb(&self.state.snapshot(None)?);
        Ok(Response::new(pb::StopJobResponse { stop_step, status: Some(status) }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.operator("CancelJob")?;
        let req = req.into_inner();
        let reason = operator_reason(&req.reason);
        self.state.cancel(job_filter(&req.job_id), &reason)?;
        let status = status_to_pb(&self.state.snapshot(None)?);
        Ok(Response::new(pb::CancelJobResponse { status: Some(status) }))
    }
}

/// A request's `history_limit`: 0 is the whole history.
fn history(limit: u32) -> Option<u32> {
    (limit > 0).then_some(limit)
}

/// An operator's reason, cleaned for the log and the status; empty says so.
fn operator_reason(reason: &str) -> String {
    let r = clean_text(reason);
    if r.is_empty() { "no reason given".into() } else { r }
}

#[cfg(test)]
mod tests {
    use dancegrpo_proto::WorkerState;

    use super::*;
    use crate::testing::{info, settings};

    #[tokio::test(start_paused = true)]
    async fn a_status_is_converted_once_per_change_and_heartbeat_times_lag_by_at_most_the_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let state = CoordinatorState::open(settings(dir.path(), 2)).unwrap();
        let svc = CoordinatorService::new(state.clone(), true);
        let a = state.register(info(0), None).unwrap().caller();
        let first = svc.status(None, None).unwrap();
        assert_eq!(first.workers.len(), 1);
        // A heartbeat changes only its time: the answer is reused for a while.
        std::thread::sleep(Duration::from_millis(5));
        state.heartbeat(&a, WorkerState::Waiting).unwrap();
        assert_eq!(svc.status(None, None).unwrap(), first, "reused");
        let beat = |s: &pb::JobStatus| s.workers[0].last_heartbeat_unix_ms;
        tokio::time::advance(STATUS_REUSE).await;
        assert!(beat(&svc.status(None, None).unwrap()) > beat(&first), "then converted again");
        // Any other change is seen at once, by every (job, limit).
        state.register(info(1), None).unwrap();
        assert_eq!(svc.status(None, None).unwrap().workers.len(), 2);
        let id = state.job_id().to_string();
        assert_eq!(svc.status(Some(&id), Some(1)).unwrap().workers.len(), 2);
        assert!(svc.status(Some("no-such-job"), None).is_err(), "errors are not kept");
        // Clients choose the keys: the kept answers stay few.
        for limit in 1..100 {
            svc.status(None, Some(limit)).unwrap();
        }
        assert!(svc.statuses.lock().unwrap().histories.len() <= STATUS_ENTRIES);
        // Whatever the limit or the way the job is named, one version shows one moment.
        let beats: Vec<i64> = [(None, None), (Some(id.as_str()), Some(3)), (None, Some(7))]
            .into_iter()
            .map(|(j, h)| beat(&svc.status(j, h).unwrap()))
            .collect();
        assert!(beats.windows(2).all(|w| w[0] == w[1]), "{beats:?}");
    }
}
