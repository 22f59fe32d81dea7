//! The job's live state: admission of workers, rank assignment, heartbeats and loss detection,
//! the step protocol, operator actions and the status.
//!
//! One mutex guards the in-memory view and the database together, so every state change is
//! persisted before anyone can observe it. Nothing awaits while holding it; the output files
//! are written by the [`crate::outputs::OutputTask`] off it. Every change bumps a `watch`
//! counter that `WatchJob` streams follow. Job and worker states change only through
//! [`crate::lifecycle`].
//!
//! By concern: [`workers`] admits workers and notices the lost ones, [`steps`] serves the step
//! protocol, [`operator`] stops and cancels, [`status`] answers the status API, and
//! [`training`] holds the prompt stream and the iteration in flight.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dancegrpo_proto::{
    JobConfig, JobId, JobState, PROTOCOL_VERSION, RankAssignment, SessionSecret, WorkerId,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CoordinatorSettings;
use crate::db::{Db, IterationRecord, JobRecord, WorkerRecord};
use crate::error::{Error, Result};
use crate::lifecycle::{JobEvent, Lifecycle, WorkerEvent};
use crate::outputs::{self, OutputTask, Outputs, TrainerState};
use crate::schedule::{Cursor, PromptSampler};

mod operator;
mod status;
mod steps;
#[cfg(test)]
mod tests;
mod training;
mod workers;

pub use status::Counters;
pub use training::ReformCause;
use training::{Training, checkpoint_due};
use workers::Worker;

/// How long one GetAdvantages call waits for the other ranks' rewards. It then answers
/// DEADLINE_EXCEEDED and the worker asks again: shorter than any client's request timeout.
const LONG_POLL: Duration = Duration::from_secs(20);

/// What a worker gets back when it registers.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Its id, to quote in heartbeats.
    pub worker_id: WorkerId,
    /// The secret its later calls carry.
    pub secret: SessionSecret,
    /// The job it joined.
    pub job_id: JobId,
    /// The job config.
    pub config: JobConfig,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// Present if this registration completed the world.
    pub assignment: Option<RankAssignment>,
}

impl Registration {
    /// The credentials this registration's later calls carry.
    pub fn caller(&self) -> Caller {
        Caller { id: self.worker_id.clone(), secret: self.secret.expose().to_string() }
    }
}

/// A consistent view of one job, for the status API.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    /// The job.
    pub job: JobRecord,
    /// Its workers.
    pub workers: Vec<WorkerRecord>,
    /// Finished iterations.
    pub history: Vec<IterationRecord>,
}

/// Who a worker's call claims to be: a worker id and the session secret of its registration.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The id it names.
    pub id: WorkerId,
    /// The secret it holds (checked in constant time, never logged).
    pub secret: String,
}

#[derive(Debug)]
struct Inner {
    db: Db,
    job: JobRecord,
    workers: Vec<Worker>,
    training: Training,
    dataset_len: u64,
    /// Since when the world that once formed has lacked a worker (a rank lost and not yet
    /// replaced, or workers not all back after a coordinator restart).
    incomplete_since: Option<Instant>,
}

/// The coordinator's state for the job it runs.
#[derive(Debug)]
pub struct CoordinatorState {
    inner: Mutex<Inner>,
    settings: CoordinatorSettings,
    changed: watch::Sender<u64>,
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl CoordinatorState {
    /// Opens the database and creates the job, or picks up the unfinished job of the same name.
    pub fn open(settings: CoordinatorSettings) -> Result<Arc<Self>> {
        // Fail at start-up, not at the first iteration, when the prompts are missing.
        let dataset_len = outputs::dataset_len(&settings.job)?;
        let db = Db::open(&settings.db_path)?;
        let now = now_ms();
        let (mut job, workers) = match db.find_active_job(&settings.job.job_name)? {
            Some(mut job) => {
                let changes = settings.job.changes_from(&job.config);
                if !changes.is_empty() && !settings.adopt_config {
                    return Err(Error::ConfigChanged {
                        job: format!("{} ({})", job.name, job.id),
                        changes,
                    });
                }
                for change in &changes {
                    tracing::warn!(job_id = %job.id, "config changed on restart, adopted: {change}");
                }
                tracing::info!(job_id = %job.id, step = job.step, "resuming job record");
                // Workers of the job may still be writing a later checkpoint.
                outputs::sweep_leftovers(&settings.job, Some(job.checkpoint_step));
                // Workers of the previous coordinator process must register again: their
                // heartbeats find them here as lost and are told so.
                let life = Lifecycle::new(&db);
                let mut workers = Vec::new();
                for mut rec in db.workers(job.id.as_str())? {
                    if rec.state.is_live() {
                        life.worker(&job.id, &mut rec, WorkerEvent::Lost)?;
                    }
                    let reachable_host = rec.info.host.clone();
                    workers.push(Worker {
                        rec,
                        secret: None,
                        last_seen: Instant::now(),
                        reachable_host,
                        pid_visible: false,
                    });
                }
                job.config = settings.job.clone();
                job.world_size = settings.topology.world_size;
                let message = if changes.is_empty() {
                    "coordinator restarted; waiting for workers".into()
                } else {
                    format!(
                        "coordinator restarted with {} config change(s) adopted ({}); waiting \
                         for workers",
                        changes.len(),
                        changes.join("; ")
                    )
                };
                life.job(&mut job, JobEvent::Restarted, message)?;
                (job, workers)
            }
            None => {
                outputs::sweep_leftovers(&settings.job, None);
                let job = JobRecord {
                    id: JobId::new(),
                    name: settings.job.job_name.clone(),
                    state: JobState::WaitingForWorkers,
                    step: 0,
                    world_size: settings.topology.world_size,
                    generation: 0,
                    checkpoint_step: 0,
                    config: settings.job.clone(),
                    message: "waiting for workers".into(),
                    created_ms: now,
                    updated_ms: now,
                };
                db.put_job(&job)?;
                tracing::info!(job_id = %job.id, "created job");
                (job, Vec::new())
            }
        };
        let mut resumed_from = None;
        let mut history: Vec<Vec<f64>> =
            db.iterations(job.id.as_str())?.into_iter().map(|r| r.mean_rewards).collect();
        if job.step == 0 && history.is_empty() {
            if let Some(dir) = outputs::resolve_resume(&job.config)? {
                let ts = TrainerState::read(&dir)?;
                if ts.sampler_seed != job.config.sampler_seed {
                    return Err(Error::InvalidRequest(format!(
                        "checkpoint {} was made with sampler_seed {}, this job has {}",
                        dir.display(),
                        ts.sampler_seed,
                        job.config.sampler_seed
                    )));
                }
                tracing::info!(checkpoint = %dir.display(), step = ts.step, "resuming from checkpoint");
                let cursor = serde_json::to_string(&ts.cursor).expect("cursor serializes");
                for (i, r) in ts.reward_history.iter().enumerate() {
                    let last = i as u64 + 1 == ts.step;
                    db.put_iteration(
                        &job.id,
                        &IterationRecord {
                            iteration: i as u64 + 1,
                            mean_rewards: r.clone(),
                            metrics_json: "{}".into(),
                            cursor_json: if last { cursor.clone() } else { String::new() },
                        },
                    )?;
                }
                history = ts.reward_history.clone();
                job.step = ts.step;
                job.checkpoint_step = ts.step;
                let message = format!("resumed from {} (step {})", dir.display(), ts.step);
                Lifecycle::new(&db).note(&mut job, message)?;
                resumed_from = Some((ts.step, dir));
            }
        }
        let mut training = Training {
            sampler: PromptSampler::new(job.config.sampler_seed, dataset_len, Cursor::default()),
            iteration: None,
            outputs: OutputTask::start(Outputs::open(&job.config, &history)?)?,
            history,
            done: BTreeSet::new(),
            resumed_from,
            stop: db.stop(job.id.as_str())?,
            records: None,
            reforms: Default::default(),
            checkpoints: 0,
            answered: Default::default(),
        };
        training.rewind(&db, &mut job, dataset_len)?;
        db.put_job(&job)?;
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                db,
                job,
                workers,
                training,
                dataset_len,
                incomplete_since: None,
            }),
            settings,
            changed: watch::Sender::new(0),
        }))
    }

    /// The settings this state was opened with.
    pub fn settings(&self) -> &CoordinatorSettings {
        &self.settings
    }

    /// A receiver that changes whenever the status does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A counter that grows with every change of the status but heartbeat times.
    pub fn version(&self) -> u64 {
        *self.changed.borrow()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; the state is still the last
        // persisted one, so keep serving rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Rejects peers that speak another protocol version.
    pub fn check_protocol(version: u32) -> Result<()> {
        if version == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(Error::ProtocolVersion { worker: version, coordinator: PROTOCOL_VERSION })
        }
    }

    /// Fails the job with `message`, and returns the error that tells the caller. A job that
    /// has already ended keeps its end: the error then says how it ended.
    fn fail_job(&self, inner: &mut Inner, message: String) -> Error {
        match Lifecycle::new(&inner.db).job(&mut inner.job, JobEvent::Failed, message.clone()) {
            Ok(_) => tracing::error!("job failed: {message}"),
            Err(Error::Illegal(_)) => {
                tracing::warn!(state = %inner.job.state, "job already ended; not failed by: {message}");
                let (state, message) = (inner.job.state, inner.job.message.clone());
                return match state {
                    JobState::Failed => Error::JobFailed(message),
                    state => Error::JobEnded { state, message },
                };
            }
            Err(e) => tracing::error!("job failed: {message}; cannot record the failure: {e}"),
        }
        inner.training.iteration = None;
        self.notify();
        Error::JobFailed(message)
    }
}
