//! The job's live state: admission of workers, rank assignment, heartbeats and loss detection.
//!
//! One mutex guards the in-memory view and the database together, so every state change is
//! persisted before anyone can observe it. Nothing awaits while holding it. Every change bumps
//! a `watch` counter that `WatchJob` streams follow.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dancegrpo_proto::{
    Advantages, JobConfig, JobId, JobState, NonFinitePolicy, PROTOCOL_VERSION, RankAssignment,
    Restore, SessionSecret, StepMetrics, StoreAddress, TrajectoryRewards, Work, WorkerId,
    WorkerInfo, WorkerState,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CoordinatorSettings;
use crate::db::{Db, IterationRecord, JobRecord, WorkerRecord};
use crate::error::{Error, Result};
use crate::iteration::{Iteration, IterationError};
use crate::outputs::{self, Outputs, TrainerState};
use crate::schedule::{Cursor, PromptSampler};
use dancegrpo_proto::layout;

/// How long one GetAdvantages call waits for the other ranks' rewards. It then answers
/// DEADLINE_EXCEEDED and the worker asks again: shorter than any client's request timeout.
const LONG_POLL: Duration = Duration::from_secs(20);

/// The training side of the job: the prompt stream, the iteration in flight and the outputs.
#[derive(Debug)]
struct Training {
    sampler: PromptSampler,
    iteration: Option<Iteration>,
    outputs: Outputs,
    /// Mean rewards of completed iterations; `history.len() == job.step`.
    history: Vec<Vec<f64>>,
    /// Ranks told the job is done.
    done: BTreeSet<u32>,
    /// A checkpoint outside `output_dir` this job was resumed from, and its step.
    resumed_from: Option<(u64, PathBuf)>,
    /// An operator's stop: the step the job ends at once it is checkpointed, and why. Kept
    /// through rewinds (the world redoes the steps up to it).
    stop: Option<(u64, String)>,
    /// Each rank's last ReportStepMetrics answer, by (generation, iteration): a report retried
    /// because its answer was lost gets the same answer, instead of an error and a rewind.
    answered: std::collections::BTreeMap<u32, (u64, u64, (bool, String))>,
}

/// Whether rank 0 writes `checkpoint-<step>` once `step` is trained: every
/// `checkpointing_steps`, the last step, and the step a stop ends at.
fn checkpoint_due(cfg: &JobConfig, step: u64, stop_at: Option<u64>) -> bool {
    let every = u64::from(cfg.checkpointing_steps);
    stop_at == Some(step)
        || every > 0 && (step % every == 0 || step == u64::from(cfg.max_train_steps))
}

impl Training {
    /// The step the job ends at: `max_train_steps`, or earlier when stopping.
    fn end(&self, cfg: &JobConfig) -> u64 {
        let max = u64::from(cfg.max_train_steps);
        self.stop.as_ref().map_or(max, |(at, _)| (*at).min(max))
    }

    fn checkpoint_dir(&self, cfg: &JobConfig, step: u64) -> Option<PathBuf> {
        if step == 0 {
            return None;
        }
        match &self.resumed_from {
            Some((s, dir)) if *s == step => Some(dir.clone()),
            _ => Some(layout::checkpoint_dir(Path::new(&cfg.output_dir), step)),
        }
    }

    /// Goes back to the last checkpoint: the weights of the ranks no longer agree with any
    /// recorded step once a world is re-formed, so the iterations after it are redone.
    fn rewind(&mut self, db: &Db, job: &mut JobRecord, dataset_len: u64) -> Result<()> {
        let step = job.checkpoint_step.min(job.step);
        let records = db.iterations(job.id.as_str())?;
        let cursor = if step == 0 {
            Cursor::default()
        } else {
            let rec = records.iter().find(|r| r.iteration == step).ok_or_else(|| {
                Error::InvalidRequest(format!("no record of iteration {step} to rewind to"))
            })?;
            serde_json::from_str(&rec.cursor_json).map_err(|e| {
                Error::InvalidRequest(format!("bad cursor of iteration {step}: {e}"))
            })?
        };
        if step != job.step {
            tracing::warn!(from = job.step, to = step, "rewinding to the last checkpoint");
        }
        db.truncate_iterations(&job.id, step)?;
        self.history.truncate(step as usize);
        job.step = step;
        self.sampler = PromptSampler::new(job.config.sampler_seed, dataset_len, cursor);
        self.iteration = None;
        self.done.clear();
        self.outputs = Outputs::open(&job.config, &self.history)?;
        Ok(())
    }

    /// Re-forms the world: a new generation, rewound to the last checkpoint, with `why`
    /// (given the new generation and step) as the job's message. Returns the generation.
    fn reform(
        &mut self,
        db: &Db,
        job: &mut JobRecord,
        dataset_len: u64,
        why: impl FnOnce(u64, u64) -> String,
    ) -> Result<u64> {
        job.generation += 1;
        self.rewind(db, job, dataset_len)?;
        job.message = why(job.generation, job.step);
        tracing::warn!("{}", job.message);
        job.updated_ms = now_ms();
        db.put_job(job)?;
        Ok(job.generation)
    }
}

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
struct Worker {
    rec: WorkerRecord,
    /// The session secret of this registration; `None` for a record of a previous
    /// coordinator process, whose sessions ended with it.
    secret: Option<SessionSecret>,
    last_seen: Instant,
    /// The address rank 0 is reachable at, from the peer address of its registration.
    reachable_host: String,
    /// Whether this coordinator can see the worker's process: it registered over loopback and
    /// its pid ran at that moment. A worker in another pid namespace (a container beside ours
    /// on one network) is not, and waits out the heartbeat timeout like a remote one.
    pid_visible: bool,
}

impl Worker {
    /// Whether its process is known to be gone (it exited, or was killed and not yet reaped),
    /// which is sooner than the heartbeat timeout tells.
    fn process_gone(&self) -> bool {
        self.pid_visible && !process_runs(self.rec.info.pid)
    }
}

/// Whether a worker registering from `host` with `pid` is one whose process we can watch.
fn pid_visible(host: &str, pid: u32) -> bool {
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) && process_runs(pid)
}

/// Whether process `pid` of this machine still runs (a zombie, killed and not yet reaped, does
/// not).
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last ')' (comm may hold one).
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        }
        Err(_) => false,
    }
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
                let mut workers = Vec::new();
                for mut rec in db.workers(job.id.as_str())? {
                    if rec.state.is_live() {
                        rec.state = WorkerState::Lost;
                        db.put_worker(&job.id, &rec)?;
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
                job.state = JobState::WaitingForWorkers;
                job.message = if changes.is_empty() {
                    "coordinator restarted; waiting for workers".into()
                } else {
                    format!(
                        "coordinator restarted with {} config change(s) adopted ({}); waiting \
                         for workers",
                        changes.len(),
                        changes.join("; ")
                    )
                };
                job.updated_ms = now;
                db.put_job(&job)?;
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
                job.message = format!("resumed from {} (step {})", dir.display(), ts.step);
                db.put_job(&job)?;
                resumed_from = Some((ts.step, dir));
            }
        }
        let mut training = Training {
            sampler: PromptSampler::new(job.config.sampler_seed, dataset_len, Cursor::default()),
            iteration: None,
            outputs: Outputs::open(&job.config, &history)?,
            history,
            done: BTreeSet::new(),
            resumed_from,
            stop: None,
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

    /// Admits a worker. `peer_host` is the address its connection came from.
    pub fn register(&self, info: WorkerInfo, peer_host: Option<String>) -> Result<Registration> {
        let topo = self.settings.topology;
        if let Some(n) = topo.npus_per_node {
            if info.local_rank >= n || info.node_rank >= topo.nnodes {
                return Err(Error::InvalidRequest(format!(
                    "node_rank {} local_rank {} outside NNODES={} x NPUS_PER_NODE={n}",
                    info.node_rank, info.local_rank, topo.nnodes
                )));
            }
        }
        let mut g = self.lock();
        let Inner { db, job, workers, training, dataset_len, .. } = &mut *g;
        if job.state.is_terminal() {
            return Err(Error::InvalidRequest(format!("job {} has ended ({})", job.id, job.state)));
        }
        let same_slot = |w: &Worker| {
            w.rec.info.node_rank == info.node_rank && w.rec.info.local_rank == info.local_rank
        };
        // A worker restarted in its slot before the old process was declared lost: when the
        // old one ran on this machine and its process is gone, the slot is free at once.
        if let Some(w) =
            workers.iter_mut().find(|w| same_slot(w) && w.rec.state.is_live() && w.process_gone())
        {
            w.rec.state = WorkerState::Lost;
            db.put_worker(&job.id, &w.rec)?;
            tracing::warn!(worker_id = %w.rec.id, pid = w.rec.info.pid, rank = ?w.rec.rank,
                "worker lost: its process is gone and a new one takes its slot");
        }
        if let Some(w) = workers.iter().find(|w| same_slot(w) && w.rec.state.is_live()) {
            return Err(Error::DuplicateSlot {
                node_rank: info.node_rank,
                local_rank: info.local_rank,
                existing: w.rec.id.to_string(),
                host: w.rec.info.host.clone(),
            });
        }
        let live = workers.iter().filter(|w| w.rec.state.is_live()).count() as u32;
        if live >= job.world_size {
            return Err(Error::WorldFull { registered: live, world_size: job.world_size });
        }
        // A worker taking over the slot of a lost one inherits its rank (and the world is
        // re-formed under a new generation); otherwise it waits for the world to fill.
        let formed = job.state == JobState::Running;
        let inherited = if formed {
            workers.iter().filter(|w| same_slot(w)).filter_map(|w| w.rec.rank).next()
        } else {
            None
        };
        if formed && inherited.is_none() {
            return Err(Error::InvalidRequest(format!(
                "node_rank {} local_rank {} is not a slot of the running world",
                info.node_rank, info.local_rank
            )));
        }
        // A rank told the job is done has nothing left to do; re-forming the world around its
        // slot would rewind the finished job to its last checkpoint and redo the rest.
        if let Some(r) = inherited.filter(|r| training.done.contains(r)) {
            return Err(Error::InvalidRequest(format!(
                "rank {r} (node_rank {} local_rank {}) has already finished job {}; the job \
                 completes when the other ranks do",
                info.node_rank, info.local_rank, job.id
            )));
        }
        let now = now_ms();
        let rec = WorkerRecord {
            id: WorkerId::new(),
            info: info.clone(),
            rank: inherited,
            state: if formed { WorkerState::Running } else { WorkerState::Waiting },
            last_heartbeat_ms: now,
            registered_ms: now,
        };
        db.put_worker(&job.id, &rec)?;
        let worker_id = rec.id.clone();
        tracing::info!(worker_id = %worker_id, host = %info.host, node_rank = info.node_rank,
            local_rank = info.local_rank, device = %info.device, "worker registered");
        let reachable_host = peer_host.unwrap_or_else(|| info.host.clone());
        let secret = SessionSecret::new();
        workers.push(Worker {
            pid_visible: pid_visible(&reachable_host, info.pid),
            rec,
            secret: Some(secret.clone()),
            last_seen: Instant::now(),
            reachable_host,
        });
        if formed {
            let rank = inherited.unwrap_or_default();
            training.reform(db, job, *dataset_len, |generation, _| {
                format!(
                    "worker {worker_id} rejoined as rank {rank}; world re-formed (generation \
                     {generation})"
                )
            })?;
        } else if live + 1 == job.world_size {
            Self::form_world(db, job, workers)?;
            training.rewind(db, job, *dataset_len)?;
        } else {
            job.message = format!("waiting for workers: {} of {}", live + 1, job.world_size);
            job.updated_ms = now;
            db.put_job(job)?;
        }
        let assignment = Self::assignment_of(&self.settings, job, workers, &worker_id);
        let reg = Registration {
            worker_id,
            secret,
            job_id: job.id.clone(),
            config: job.config.clone(),
            heartbeat_interval: self.settings.heartbeat_interval,
            assignment,
        };
        drop(g);
        self.notify();
        Ok(reg)
    }

    /// Hands out ranks by (node rank, local rank) once every worker has arrived.
    fn form_world(db: &Db, job: &mut JobRecord, workers: &mut [Worker]) -> Result<()> {
        let mut live: Vec<&mut Worker> =
            workers.iter_mut().filter(|w| w.rec.state.is_live()).collect();
        live.sort_by_key(|w| (w.rec.info.node_rank, w.rec.info.local_rank));
        for (rank, w) in live.into_iter().enumerate() {
            w.rec.rank = Some(rank as u32);
            w.rec.state = WorkerState::Running;
            db.put_worker(&job.id, &w.rec)?;
        }
        job.generation += 1;
        job.state = JobState::Running;
        job.message =
            format!("world formed: {} workers (generation {})", job.world_size, job.generation);
        job.updated_ms = now_ms();
        db.put_job(job)?;
        tracing::info!(world_size = job.world_size, generation = job.generation, "world formed");
        Ok(())
    }

    fn assignment_of(
        settings: &CoordinatorSettings,
        job: &JobRecord,
        workers: &[Worker],
        id: &WorkerId,
    ) -> Option<RankAssignment> {
        if job.state != JobState::Running {
            return None;
        }
        let me = workers.iter().find(|w| &w.rec.id == id && w.rec.state.is_live())?;
        let rank0 = workers.iter().find(|w| w.rec.rank == Some(0) && w.rec.state.is_live())?;
        Some(RankAssignment {
            rank: me.rec.rank?,
            world_size: job.world_size,
            generation: job.generation,
            store: StoreAddress {
                host: rank0.reachable_host.clone(),
                port: settings.store_port,
                // A fresh prefix per generation: a re-formed world never reads the keys of the
                // one before, so survivors can re-rendezvous without restarting.
                prefix: format!("dancegrpo/{}/gen{}/", job.id, job.generation),
            },
        })
    }

    /// The live worker `who` claims to be. Its session secret is checked before anything else
    /// is said about it: a caller without the secret learns only that it is refused.
    fn find<'a>(workers: &'a mut [Worker], who: &Caller) -> Result<&'a mut Worker> {
        let id = &who.id;
        let w = workers
            .iter_mut()
            .find(|w| &w.rec.id == id)
            .ok_or_else(|| Error::UnknownWorker(id.to_string()))?;
        match &w.secret {
            Some(s) if s.matches(&who.secret) => {}
            // Registered with a previous coordinator process: that session ended with it.
            None => return Err(Error::WorkerGone { id: id.to_string(), state: w.rec.state }),
            Some(_) => return Err(Error::PermissionDenied(id.to_string())),
        }
        if !w.rec.state.is_live() {
            return Err(Error::WorkerGone { id: id.to_string(), state: w.rec.state });
        }
        Ok(w)
    }

    /// Records a heartbeat. Returns the worker's assignment (once the world is formed) and
    /// the job state.
    pub fn heartbeat(
        &self,
        who: &Caller,
        reported: WorkerState,
    ) -> Result<(Option<RankAssignment>, JobState)> {
        let mut g = self.lock();
        let Inner { db, job, workers, .. } = &mut *g;
        let w = Self::find(workers, who)?;
        w.last_seen = Instant::now();
        w.rec.last_heartbeat_ms = now_ms();
        let mut changed = false;
        if reported == WorkerState::Draining && w.rec.state != WorkerState::Draining {
            w.rec.state = WorkerState::Draining;
            db.put_worker(&job.id, &w.rec)?;
            changed = true;
        }
        let out = (Self::assignment_of(&self.settings, job, workers, &who.id), job.state);
        drop(g);
        if changed {
            self.notify();
        }
        Ok(out)
    }

    /// A worker leaves: cleanly, or (`error`) on a failure that a restart in its place would hit
    /// again, which fails the job at once with the worker's message.
    pub fn goodbye(&self, who: &Caller, reason: &str, error: Option<&str>) -> Result<()> {
        let mut g = self.lock();
        let Inner { db, job, workers, .. } = &mut *g;
        let w = Self::find(workers, who)?;
        w.rec.state = WorkerState::Stopped;
        w.rec.last_heartbeat_ms = now_ms();
        db.put_worker(&job.id, &w.rec)?;
        let id = &who.id;
        let who_is = match w.rec.rank {
            Some(r) => format!("rank {r}"),
            None => format!("worker {id}"),
        };
        let host = w.rec.info.host.clone();
        tracing::info!(worker_id = %id, reason, error, "worker stopped");
        if job.state.is_terminal() {
            // The job's message says how it ended; a worker leaving after that keeps it.
        } else if let Some(e) = error {
            let message = format!("{who_is} on {host} failed, and would again on a restart: {e}");
            let _ = self.fail_job(&mut g, message);
        } else {
            job.message = format!("{who_is} stopped: {reason}");
            job.updated_ms = now_ms();
            db.put_job(job)?;
        }
        drop(g);
        self.notify();
        Ok(())
    }

    /// Marks as lost the workers silent for longer than the heartbeat timeout, and those on
    /// this machine whose process is gone (at once: no need to wait for the timeout). Returns
    /// their ids.
    pub fn expire(&self, now: Instant) -> Result<Vec<WorkerId>> {
        let timeout = self.settings.heartbeat_timeout;
        let mut g = self.lock();
        let Inner { db, job, workers, .. } = &mut *g;
        let mut lost = Vec::new();
        for w in workers.iter_mut().filter(|w| w.rec.state.is_live()) {
            let why = if now.saturating_duration_since(w.last_seen) > timeout {
                format!("no heartbeat for {timeout:?}")
            } else if w.process_gone() {
                format!("its process (pid {}) is gone", w.rec.info.pid)
            } else {
                continue;
            };
            w.rec.state = WorkerState::Lost;
            db.put_worker(&job.id, &w.rec)?;
            tracing::warn!(worker_id = %w.rec.id, rank = ?w.rec.rank, host = %w.rec.info.host,
                "worker lost: {why}");
            job.message = format!(
                "worker {} (rank {}) on {} lost: {why}",
                w.rec.id,
                w.rec.rank.map_or("-".to_string(), |r| r.to_string()),
                w.rec.info.host,
            );
            lost.push(w.rec.id.clone());
        }
        if !lost.is_empty() {
            job.updated_ms = now_ms();
            db.put_job(job)?;
        }
        let failed = Self::check_replacement(&mut g, now).map(|m| self.fail_job(&mut g, m));
        drop(g);
        if !lost.is_empty() || failed.is_some() {
            self.notify();
        }
        Ok(lost)
    }

    /// Why the job fails now, if a world that formed once has lacked a worker for longer than
    /// `rank_replace_timeout_s`. The first formation waits for its workers without a bound: it
    /// is the operator who starts them.
    fn check_replacement(inner: &mut Inner, now: Instant) -> Option<String> {
        let Inner { job, workers, training, incomplete_since, .. } = inner;
        let live = |r: u32| workers.iter().any(|w| w.rec.rank == Some(r) && w.rec.state.is_live());
        let missing: Vec<u32> = match job.state {
            // A rank told the job is done may leave.
            JobState::Running => {
                (0..job.world_size).filter(|r| !live(*r) && !training.done.contains(r)).collect()
            }
            JobState::WaitingForWorkers if job.generation > 0 => {
                let back = workers.iter().filter(|w| w.rec.state.is_live()).count() as u32;
                (back..job.world_size).collect()
            }
            _ => Vec::new(),
        };
        if missing.is_empty() {
            *incomplete_since = None;
            return None;
        }
        let since = *incomplete_since.get_or_insert(now);
        let limit = Duration::from_secs(job.config.rank_replace_timeout_s.into());
        if now.saturating_duration_since(since) < limit {
            return None;
        }
        Some(match job.state {
            JobState::Running => {
                let r = missing[0];
                let host = workers
                    .iter()
                    .filter(|w| w.rec.rank == Some(r))
                    .max_by_key(|w| w.rec.registered_ms)
                    .map_or("?".to_string(), |w| w.rec.info.host.clone());
                format!(
                    "rank {r} (last on {host}) was lost and not replaced within {}s \
                     (rank_replace_timeout_s); start a worker in its slot and resume from the \
                     last checkpoint (step {})",
                    limit.as_secs(),
                    job.checkpoint_step
                )
            }
            _ => format!(
                "only {} of {} workers came back within {}s of the coordinator's restart \
                 (rank_replace_timeout_s)",
                job.world_size as usize - missing.len(),
                job.world_size,
                limit.as_secs()
            ),
        })
    }

    /// The rank of a live worker in the current generation of a complete world, or why it
    /// cannot work now.
    fn working_rank(inner: &mut Inner, who: &Caller, generation: u64) -> Result<u32> {
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
    fn rank_of(inner: &mut Inner, who: &Caller, generation: u64) -> Result<u32> {
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

    fn fail_job(&self, inner: &mut Inner, message: String) -> Error {
        tracing::error!("job failed: {message}");
        inner.job.state = JobState::Failed;
        inner.job.message = message.clone();
        inner.job.updated_ms = now_ms();
        inner.training.iteration = None;
        if let Err(e) = inner.db.put_job(&inner.job) {
            tracing::error!("cannot record the failure: {e}");
        }
        Error::JobFailed(message)
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

    fn try_get_work(
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
            let completed = training.done.len() as u32 == world && job.state != JobState::Completed;
            if completed {
                match &training.stop {
                    Some((_, why)) if job.step < u64::from(cfg.max_train_steps) => {
                        job.state = JobState::Stopped;
                        job.message = format!(
                            "stopped at step {} with checkpoint-{} written ({why}); resume \
                             with resume_from_checkpoint = \"latest\"",
                            job.step, job.step
                        );
                    }
                    _ => {
                        job.state = JobState::Completed;
                        job.message = format!("completed {} iterations", job.step);
                    }
                }
                job.updated_ms = now_ms();
                db.put_job(job)?;
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
            let current = training.reform(db, job, *dataset_len, |generation, step| {
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

    fn current(slot: &mut Option<Iteration>, iteration: u64) -> Result<&mut Iteration> {
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
    /// answers whether rank 0 writes a checkpoint now, with the state that goes in it.
    pub fn report_step_metrics(
        &self,
        who: &Caller,
        generation: u64,
        metrics: StepMetrics,
    ) -> Result<(bool, String)> {
        let mut g = self.lock();
        let rank = Self::working_rank(&mut g, who, generation)?;
        let Inner { db, job, training, .. } = &mut *g;
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
            return Ok(answer.clone());
        }
        let cfg = job.config.clone();
        let it = Self::current(&mut training.iteration, metrics.iteration)?;
        let index = it.index;
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
        let complete = it.record_metrics(rank, StepMetrics { rank, ..metrics });
        let means = it.mean_rewards();
        let step = index + 1;
        let checkpoint = checkpoint_due(&cfg, step, training.stop.as_ref().map(|(at, _)| *at));
        let mut reward_history = training.history.clone();
        reward_history.push(means.clone());
        let state = TrainerState {
            step,
            cursor: training.sampler.cursor(),
            sampler_seed: cfg.sampler_seed,
            reward_history,
        };
        let state_json = serde_json::to_string_pretty(&state).expect("trainer state serializes");
        let answer = (checkpoint && rank == 0, if rank == 0 { state_json } else { String::new() });
        training.answered.insert(rank, (generation, index, answer.clone()));
        if complete {
            if let Err(IterationError::Fatal(m) | IterationError::Invalid(m)) = it.check_replicas()
            {
                return Err(self.fail_job(&mut g, m));
            }
            let summary = it.summary();
            let metrics_json = outputs::metrics_json(step, &means, &summary);
            training.history.push(means.clone());
            // The files first, then the record: a crash between the two leaves a line more
            // than the database knows of, which a restart trims; the other way round it would
            // leave a line missing, which no restart can make up.
            training.outputs.record(&metrics_json, &training.history)?;
            db.put_iteration(
                &job.id,
                &IterationRecord {
                    iteration: step,
                    mean_rewards: means.clone(),
                    metrics_json: metrics_json.to_string(),
                    cursor_json: serde_json::to_string(&state.cursor).expect("cursor serializes"),
                },
            )?;
            training.iteration = None;
            job.step = step;
            job.message = format!(
                "iteration {step}/{}: reward {:.6}, loss {:.3e}",
                cfg.max_train_steps,
                means.first().copied().unwrap_or(f64::NAN),
                summary.loss
            );
            job.updated_ms = now_ms();
            db.put_job(job)?;
            drop(g);
            self.notify();
        }
        Ok(answer)
    }

    /// An operator's stop: the iteration in flight finishes, rank 0 checkpoints it, and the
    /// job ends `stopped`. Returns the step it ends at. Where rank 0 has already reported the
    /// iteration in flight without a checkpoint, one more iteration is trained and
    /// checkpointed; where the current step is checkpointed and nothing is in flight, the job
    /// ends at once.
    pub fn stop(&self, job_id: Option<&str>, reason: &str) -> Result<u64> {
        let mut g = self.lock();
        Self::operable(&g.job, job_id)?;
        let Inner { db, job, training, .. } = &mut *g;
        let due = |s: u64| checkpoint_due(&job.config, s, None);
        let at = match &training.iteration {
            Some(it) if !it.finished_by(0) || due(it.index + 1) => it.index + 1,
            Some(it) => it.index + 2,
            None if job.step == job.checkpoint_step || due(job.step) => job.step,
            None => job.step + 1,
        };
        let at = at.min(u64::from(job.config.max_train_steps));
        // A second stop does not push the first one's step back.
        let at = training.stop.as_ref().map_or(at, |(first, _)| at.min(*first));
        let why = format!("operator: {reason}");
        training.stop = Some((at, why.clone()));
        if job.step >= at && job.step == job.checkpoint_step && training.iteration.is_none() {
            job.state = JobState::Stopped;
            job.message = format!(
                "stopped at step {at} ({why}); resume with resume_from_checkpoint = \"latest\""
            );
        } else {
            job.message = format!("stopping at step {at}, once checkpointed ({why})");
        }
        tracing::warn!("{}", job.message);
        job.updated_ms = now_ms();
        db.put_job(job)?;
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
        job.state = JobState::Cancelled;
        job.message = format!(
            "cancelled at step {} (operator: {reason}); the last checkpoint is of step {}",
            job.step, job.checkpoint_step
        );
        tracing::warn!("{}", job.message);
        training.iteration = None;
        job.updated_ms = now_ms();
        db.put_job(job)?;
        drop(g);
        self.notify();
        Ok(())
    }

    /// Whether an operator action may act on `job_id` (`None`: this job): only this
    /// coordinator's job, and only before it has ended.
    fn operable(job: &JobRecord, job_id: Option<&str>) -> Result<()> {
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
        let current = training.reform(db, job, *dataset_len, |generation, step| {
            format!(
                "rank {rank} reported a failed collective ({reason}); world re-formed \
                 (generation {generation}), continuing from step {step}"
            )
        })?;
        drop(g);
        self.notify();
        Ok(current)
    }

    /// The job this coordinator runs.
    pub fn job_id(&self) -> JobId {
        self.lock().job.id.clone()
    }

    /// A snapshot of a job: this one (`None` or its id) from memory, others from the database.
    pub fn snapshot(&self, job_id: Option<&str>) -> Result<JobSnapshot> {
        self.snapshot_with(job_id, None)
    }

    /// [`CoordinatorState::snapshot`] with only the latest `history` iterations (all with
    /// `None`).
    pub fn snapshot_with(&self, job_id: Option<&str>, history: Option<u32>) -> Result<JobSnapshot> {
        let g = self.lock();
        match job_id {
            None => {}
            Some(id) if id == g.job.id.as_str() => {}
            Some(id) => {
                let job = g.db.job(id)?.ok_or_else(|| Error::UnknownJob(id.to_string()))?;
                return Ok(JobSnapshot {
                    workers: g.db.workers(id)?,
                    history: g.db.latest_iterations(id, history)?,
                    job,
                });
            }
        }
        let mut workers: Vec<WorkerRecord> = g.workers.iter().map(|w| w.rec.clone()).collect();
        workers.sort_by_key(|w| (w.info.node_rank, w.info.local_rank, w.registered_ms));
        Ok(JobSnapshot {
            history: g.db.latest_iterations(g.job.id.as_str(), history)?,
            job: g.job.clone(),
            workers,
        })
    }

    /// Every job in the database, newest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let g = self.lock();
        let mut jobs = g.db.jobs()?;
        // The running job's in-memory record is the freshest.
        for j in jobs.iter_mut().filter(|j| j.id == g.job.id) {
            *j = g.job.clone();
        }
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Topology;

    fn settings(dir: &std::path::Path, world: u32) -> CoordinatorSettings {
        let data = dir.join("videos2caption.json");
        std::fs::write(&data, r#"[{"caption": "a"}, {"caption": "b"}]"#).unwrap();
        CoordinatorSettings {
            job: JobConfig {
                data_json_path: data.display().to_string(),
                output_dir: dir.join("out").display().to_string(),
                ..JobConfig::default()
            },
            topology: Topology::new(1, world, None).unwrap(),
            db_path: dir.join("db.sqlite"),
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_secs(1),
            store_port: 29501,
            listen: "127.0.0.1:0".parse().unwrap(),
            adopt_config: false,
        }
    }

    fn info(local_rank: u32) -> WorkerInfo {
        WorkerInfo {
            host: format!("host{local_rank}"),
            node_rank: 0,
            local_rank,
            device: "cpu".into(),
            device_description: "cpu".into(),
            pid: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ranks_follow_slots_and_lost_workers_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = CoordinatorState::open(settings(dir.path(), 2)).unwrap();
        // Local rank 1 arrives first but still gets rank 1.
        let b = s.register(info(1), Some("10.0.0.2".into())).unwrap();
        assert!(b.assignment.is_none());
        let e = s.register(info(1), None).unwrap_err();
        assert!(matches!(e, Error::DuplicateSlot { .. }), "{e}");
        let a = s.register(info(0), Some("10.0.0.1".into())).unwrap();
        let aa = a.assignment.clone().unwrap();
        assert_eq!((aa.rank, aa.world_size, aa.generation), (0, 2, 1));
        assert_eq!(aa.store.host, "10.0.0.1", "rank 0's address hosts the store");
        let (ba, state) = s.heartbeat(&b.caller(), WorkerState::Running).unwrap();
        assert_eq!(ba.unwrap().rank, 1);
        assert_eq!(state, JobState::Running);
        let e = s.register(info(2), None).unwrap_err();
        assert!(e.to_string().contains("outside NNODES=1 x NPUS_PER_NODE=2"), "{e}");

        tokio::time::advance(Duration::from_millis(600)).await;
        s.heartbeat(&a.caller(), WorkerState::Running).unwrap();
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(s.expire(Instant::now()).unwrap(), vec![b.worker_id.clone()]);
        let e = s.heartbeat(&b.caller(), WorkerState::Running).unwrap_err();
        assert!(matches!(e, Error::WorkerGone { state: WorkerState::Lost, .. }), "{e}");

        let b2 = s.register(info(1), None).unwrap();
        let b2a = b2.assignment.unwrap();
        assert_eq!((b2a.rank, b2a.generation), (1, 2), "inherits the rank, new generation");
        assert_ne!(b2a.store.prefix, aa.store.prefix);
    }

    #[tokio::test]
    async fn a_local_worker_whose_process_is_gone_is_lost_at_once_and_an_unseen_pid_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = CoordinatorState::open(settings(dir.path(), 2)).unwrap();
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let watched = s
            .register(WorkerInfo { pid: child.id(), ..info(0) }, Some("127.0.0.1".into()))
            .unwrap();
        // Over loopback, but a pid this coordinator cannot see (another pid namespace).
        let unseen =
            s.register(WorkerInfo { pid: u32::MAX, ..info(1) }, Some("127.0.0.1".into())).unwrap();
        assert!(s.expire(Instant::now()).unwrap().is_empty(), "both heartbeat in time");
        child.kill().unwrap();
        child.wait().unwrap();
        // No time passes: the heartbeat timeout has nothing to do with it.
        assert_eq!(s.expire(Instant::now()).unwrap(), vec![watched.worker_id.clone()]);
        let job = s.snapshot(None).unwrap().job;
        assert!(
            job.message.contains(&format!("lost: its process (pid {}) is gone", child.id())),
            "{}",
            job.message
        );
        assert!(s.expire(Instant::now()).unwrap().is_empty());
        s.heartbeat(&unseen.caller(), WorkerState::Running).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rank_not_replaced_in_time_fails_the_job_and_one_replaced_in_time_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = settings(dir.path(), 2);
        st.job.rank_replace_timeout_s = 5;
        let s = CoordinatorState::open(st).unwrap();
        let a = s.register(info(0), None).unwrap().caller();
        let _b = s.register(info(1), None).unwrap().caller();
        let beat = |s: &CoordinatorState| s.heartbeat(&a, WorkerState::Running).unwrap();
        // Rank 1 goes silent: lost after the heartbeat timeout (1 s), then 5 s to come back.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(500)).await;
            beat(&s);
            s.expire(Instant::now()).unwrap();
        }
        // It comes back at 4 s: the clock stops.
        tokio::time::advance(Duration::from_secs(3)).await;
        beat(&s);
        s.expire(Instant::now()).unwrap();
        let b2 = s.register(info(1), None).unwrap().caller();
        for _ in 0..8 {
            tokio::time::advance(Duration::from_millis(500)).await;
            beat(&s);
            s.heartbeat(&b2, WorkerState::Running).unwrap();
            s.expire(Instant::now()).unwrap();
        }
        assert_eq!(s.snapshot(None).unwrap().job.state, JobState::Running);
        // Now it goes for good.
        for _ in 0..14 {
            tokio::time::advance(Duration::from_millis(500)).await;
            beat(&s);
            s.expire(Instant::now()).unwrap();
        }
        let job = s.snapshot(None).unwrap().job;
        assert_eq!(job.state, JobState::Failed, "{}", job.message);
        assert!(
            job.message.contains("rank 1 (last on host1) was lost and not replaced within 5s"),
            "{}",
            job.message
        );
    }

    #[test]
    fn a_worker_leaving_on_an_error_a_restart_would_repeat_fails_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let s = CoordinatorState::open(settings(dir.path(), 2)).unwrap();
        let a = s.register(info(0), None).unwrap().caller();
        let b = s.register(info(1), None).unwrap().caller();
        s.goodbye(&b, "error", Some("unknown reward `hpsv3`")).unwrap();
        let job = s.snapshot(None).unwrap().job;
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(
            job.message,
            "rank 1 on host1 failed, and would again on a restart: unknown reward `hpsv3`"
        );
        // The others learn it on their next call, and a later error does not overwrite it.
        let e = s.report_rewards(&a, 0, 1, vec![]).unwrap_err();
        assert!(matches!(e, Error::JobFailed(_)), "{e}");
        s.goodbye(&a, "error", Some("something else")).unwrap();
        assert!(s.snapshot(None).unwrap().job.message.contains("hpsv3"));
    }

    #[tokio::test]
    async fn a_caller_without_the_session_secret_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = CoordinatorState::open(settings(dir.path(), 2)).unwrap();
        let a = s.register(info(0), None).unwrap();
        let b = s.register(info(1), None).unwrap();
        assert_ne!(a.secret, b.secret);
        let before = s.snapshot(None).unwrap();
        // The right id with another worker's secret, with none, and with a guess.
        for secret in [b.secret.expose().to_string(), String::new(), "x".repeat(64)] {
            let forged = Caller { id: a.worker_id.clone(), secret };
            let denied = |e: Error| assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
            denied(s.heartbeat(&forged, WorkerState::Draining).unwrap_err());
            denied(s.goodbye(&forged, "forged", None).unwrap_err());
            denied(s.reform(&forged, 1, "forged").unwrap_err());
            denied(s.get_work(&forged, Some(0), 1, 0).await.unwrap_err());
            denied(s.report_rewards(&forged, 0, 1, vec![]).unwrap_err());
            denied(s.get_advantages(&forged, 0, 1).await.unwrap_err());
            denied(s.report_step_metrics(&forged, 1, metrics()).unwrap_err());
        }
        let after = s.snapshot(None).unwrap();
        assert_eq!((after.job.generation, after.job.state), (1, JobState::Running));
        assert_eq!(after.job.generation, before.job.generation);
        assert!(after.workers.iter().all(|w| w.state == WorkerState::Running), "{after:?}");
        // The holder of the secret is served.
        s.heartbeat(&a.caller(), WorkerState::Running).unwrap();
    }

    /// Takes a world of two through its one iteration (`max_train_steps = 1`) up to the
    /// metrics: rewards and advantages of both ranks.
    async fn roll_out_and_score(s: &CoordinatorState, ids: &[&Caller]) {
        let mut items = Vec::new();
        for id in ids {
            items.push(s.get_work(id, Some(0), 1, 0).await.unwrap().items);
        }
        for (id, items) in ids.iter().zip(items) {
            let rewards = items.iter().map(|it| TrajectoryRewards {
                item: *it,
                outcome: Ok(vec![it.member_index as f64]),
            });
            s.report_rewards(id, 0, 1, rewards.collect()).unwrap();
        }
        for id in ids {
            s.get_advantages(id, 0, 1).await.unwrap();
        }
    }

    fn metrics() -> StepMetrics {
        StepMetrics { iteration: 0, ..Default::default() }
    }

    /// A world of two with one iteration to do, checkpointed at its end.
    fn last_iteration_world(dir: &std::path::Path) -> (Arc<CoordinatorState>, Caller, Caller) {
        let mut st = settings(dir, 2);
        st.job.max_train_steps = 1;
        st.job.num_generations = 2;
        st.job.checkpointing_steps = 1;
        let s = CoordinatorState::open(st).unwrap();
        let a = s.register(info(0), None).unwrap().caller();
        let b = s.register(info(1), None).unwrap().caller();
        (s, a, b)
    }

    #[tokio::test]
    async fn a_checkpoint_is_taken_only_of_a_recorded_step() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, b) = last_iteration_world(dir.path());
        roll_out_and_score(&s, &[&a, &b]).await;
        // Rank 0 reports first and writes checkpoint 1 while rank 1 still trains.
        assert!(s.report_step_metrics(&a, 1, metrics()).unwrap().0, "rank 0 checkpoints");
        let (s0, a0) = (s.clone(), a.clone());
        let rank0 = tokio::spawn(async move { s0.get_work(&a0, Some(1), 1, 1).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.snapshot(None).unwrap().job.checkpoint_step, 0, "step 1 is not recorded yet");
        // Once it is, the same ask records the checkpoint.
        s.report_step_metrics(&b, 1, metrics()).unwrap();
        assert!(rank0.await.unwrap().unwrap().done);
        assert_eq!(s.snapshot(None).unwrap().job.checkpoint_step, 1);
    }

    #[tokio::test]
    async fn a_non_finite_loss_fails_the_job_or_goes_on_by_policy() {
        for policy in [NonFinitePolicy::Fail, NonFinitePolicy::DropGroup] {
            let dir = tempfile::tempdir().unwrap();
            let mut st = settings(dir.path(), 2);
            st.job.max_train_steps = 2;
            st.job.num_generations = 2;
            st.job.non_finite_policy = policy;
            let s = CoordinatorState::open(st).unwrap();
            let a = s.register(info(0), None).unwrap().caller();
            let b = s.register(info(1), None).unwrap().caller();
            roll_out_and_score(&s, &[&a, &b]).await;
            let bad = StepMetrics { loss: f64::NAN, grad_norm: f64::INFINITY, ..metrics() };
            let r = s.report_step_metrics(&a, 1, bad);
            let job = s.snapshot(None).unwrap().job;
            match policy {
                NonFinitePolicy::Fail => {
                    let e = r.unwrap_err();
                    assert!(matches!(e, Error::JobFailed(_)), "{e}");
                    assert_eq!(job.state, JobState::Failed);
                    assert!(
                        job.message.contains("rank 0: loss NaN and grad norm inf at iteration 1")
                            && job.message.contains("non_finite_policy = fail"),
                        "{}",
                        job.message
                    );
                    let e = s.report_step_metrics(&b, 1, metrics()).unwrap_err();
                    assert!(matches!(e, Error::JobFailed(_)), "{e}");
                }
                NonFinitePolicy::DropGroup => {
                    r.unwrap();
                    s.report_step_metrics(&b, 1, metrics()).unwrap();
                    let job = s.snapshot(None).unwrap().job;
                    assert_eq!((job.state, job.step), (JobState::Running, 1), "{}", job.message);
                    // What the database holds reads back.
                    assert_eq!(s.snapshot(None).unwrap().history.len(), 1);
                }
            }
        }
    }

    #[tokio::test]
    async fn the_other_ranks_are_done_only_after_rank_0() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, b) = last_iteration_world(dir.path());
        roll_out_and_score(&s, &[&a, &b]).await;
        for id in [&b, &a] {
            s.report_step_metrics(id, 1, metrics()).unwrap();
        }
        // Rank 0 still writes the final checkpoint: rank 1 waits for it.
        let (s1, b1) = (s.clone(), b.clone());
        let rank1 = tokio::spawn(async move { s1.get_work(&b1, Some(1), 1, 0).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!rank1.is_finished(), "rank 1 was let go before rank 0's checkpoint");
        assert!(s.get_work(&a, Some(1), 1, 1).await.unwrap().done);
        assert!(rank1.await.unwrap().unwrap().done);
        let job = s.snapshot(None).unwrap().job;
        assert_eq!((job.step, job.checkpoint_step, job.state), (1, 1, JobState::Completed));
    }

    #[tokio::test]
    async fn a_rank_behind_an_uncheckpointed_step_takes_the_world_back_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = settings(dir.path(), 2);
        st.job.max_train_steps = 3;
        st.job.num_generations = 2;
        let s = CoordinatorState::open(st).unwrap();
        let a = s.register(info(0), None).unwrap().caller();
        let b = s.register(info(1), None).unwrap().caller();
        roll_out_and_score(&s, &[&a, &b]).await;
        for id in [&a, &b] {
            s.report_step_metrics(id, 1, metrics()).unwrap();
        }
        // Both trained iteration 1 (step 1, not checkpointed); rank 1's weights went since
        // (its driver restarted with none): it cannot be handed step 1 alone.
        assert!(!s.get_work(&a, Some(1), 1, 0).await.unwrap().done);
        let e = s.get_work(&b, None, 1, 0).await.unwrap_err();
        assert!(matches!(e, Error::Superseded { requested: 1, current: 2 }), "{e}");
        let job = s.snapshot(None).unwrap().job;
        assert_eq!((job.generation, job.step), (2, 0), "{}", job.message);
        assert!(
            job.message.contains("rank 1 lost step 1, which has no checkpoint"),
            "{}",
            job.message
        );
        // The new world starts over from step 0: both ranks restore (fresh weights).
        for id in [&a, &b] {
            let w = s.get_work(id, Some(1), 2, 0).await.unwrap();
            assert_eq!((w.iteration, w.restore.map(|r| r.step)), (0, Some(0)));
        }
    }

    #[tokio::test]
    async fn a_finished_rank_that_registers_again_does_not_reform_the_world() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = settings(dir.path(), 2);
        st.job.max_train_steps = 1;
        st.job.num_generations = 2;
        let s = CoordinatorState::open(st).unwrap();
        let a = s.register(info(0), None).unwrap();
        let b = s.register(info(1), None).unwrap();
        roll_out_and_score(&s, &[&a.caller(), &b.caller()]).await;
        for id in [&a.caller(), &b.caller()] {
            s.report_step_metrics(id, 1, metrics()).unwrap();
        }

        // Rank 0 is told the job is done and leaves before rank 1 has asked; a late
        // registration from the leaving process (or anyone in its slot) is refused.
        assert!(s.get_work(&a.caller(), Some(1), 1, 0).await.unwrap().done);
        s.goodbye(&a.caller(), "job completed", None).unwrap();
        let e = s.register(info(0), None).unwrap_err();
        assert!(
            e.to_string().contains("rank 0 (node_rank 0 local_rank 0) has already finished"),
            "{e}"
        );
        let snap = s.snapshot(None).unwrap();
        assert_eq!((snap.job.generation, snap.job.step), (1, 1), "no re-formed world, no rewind");

        // Rank 1 finishes under the same generation and the job completes.
        assert!(s.get_work(&b.caller(), Some(1), 1, 0).await.unwrap().done);
        assert_eq!(s.snapshot(None).unwrap().job.state, JobState::Completed);
    }

    /// A world of two with three iterations to do and no checkpoint due before the last.
    fn three_step_world(dir: &std::path::Path) -> (Arc<CoordinatorState>, Caller, Caller) {
        let mut st = settings(dir, 2);
        st.job.max_train_steps = 3;
        st.job.num_generations = 2;
        st.job.checkpointing_steps = 10;
        let s = CoordinatorState::open(st).unwrap();
        let a = s.register(info(0), None).unwrap().caller();
        let b = s.register(info(1), None).unwrap().caller();
        (s, a, b)
    }

    #[tokio::test]
    async fn a_repeated_step_report_gets_the_same_answer_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, b) = last_iteration_world(dir.path());
        roll_out_and_score(&s, &[&a, &b]).await;
        let first = s.report_step_metrics(&a, 1, metrics()).unwrap();
        assert!(first.0 && !first.1.is_empty(), "rank 0 checkpoints step 1");
        s.report_step_metrics(&b, 1, metrics()).unwrap();
        let before = s.snapshot(None).unwrap();
        assert_eq!(before.job.step, 1, "the iteration is recorded");
        // Rank 0's answer was lost; it asks again after the iteration has completed.
        assert_eq!(s.report_step_metrics(&a, 1, metrics()).unwrap(), first);
        assert_eq!(s.report_step_metrics(&b, 1, metrics()).unwrap(), (false, String::new()));
        let after = s.snapshot(None).unwrap();
        assert_eq!((after.job.step, after.job.generation), (1, 1), "no rewind, no new world");
        assert_eq!(after.history, before.history, "recorded once");
        let rewards = std::fs::read_to_string(dir.path().join("out/hps_reward.txt")).unwrap();
        assert_eq!(rewards.lines().count(), 1, "{rewards}");
        // Another iteration is not answered from the cache.
        let e = s.report_step_metrics(&a, 1, StepMetrics { iteration: 1, ..metrics() });
        assert!(matches!(e, Err(Error::InvalidRequest(_))), "{e:?}");
    }

    #[tokio::test]
    async fn a_stop_finishes_the_iteration_in_flight_checkpoints_it_and_ends_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, b) = three_step_world(dir.path());
        roll_out_and_score(&s, &[&a, &b]).await;
        assert_eq!(s.stop(None, "maintenance").unwrap(), 1, "the iteration in flight");
        let job = s.snapshot(None).unwrap().job;
        assert_eq!(job.state, JobState::Running);
        assert!(job.message.contains("stopping at step 1"), "{}", job.message);
        // Step 1 was not due (checkpointing_steps = 10): the stop makes it so.
        assert!(s.report_step_metrics(&a, 1, metrics()).unwrap().0, "rank 0 checkpoints");
        assert!(!s.report_step_metrics(&b, 1, metrics()).unwrap().0);
        assert!(s.get_work(&a, Some(1), 1, 1).await.unwrap().done);
        assert!(s.get_work(&b, Some(1), 1, 0).await.unwrap().done);
        let job = s.snapshot(None).unwrap().job;
        assert_eq!((job.state, job.step, job.checkpoint_step), (JobState::Stopped, 1, 1));
        assert!(
            job.message.contains(
                "stopped at step 1 with checkpoint-1 written (operator: \
                                  maintenance)"
            ) && job.message.contains("resume_from_checkpoint = \"latest\""),
            "{}",
            job.message
        );
        // Ended: no second stop, no cancel.
        for e in [s.stop(None, "again").unwrap_err(), s.cancel(None, "late").unwrap_err()] {
            assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
            assert!(e.to_string().contains("has already ended (stopped)"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_stop_after_rank_0_reported_trains_one_more_iteration_and_never_moves_later() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, b) = three_step_world(dir.path());
        roll_out_and_score(&s, &[&a, &b]).await;
        // Rank 0 has trained step 1 and written no checkpoint of it: it cannot go back.
        assert!(!s.report_step_metrics(&a, 1, metrics()).unwrap().0);
        assert_eq!(s.stop(None, "first").unwrap(), 2);
        s.report_step_metrics(&b, 1, metrics()).unwrap();
        // Now nothing is in flight at step 1: a second stop would say 2 again, never 3.
        assert_eq!(s.stop(None, "second").unwrap(), 2);
        for id in [&a, &b] {
            let w = s.get_work(id, Some(1), 1, 0).await.unwrap();
            assert_eq!((w.iteration, w.done), (1, false), "iteration 2 is trained");
        }
        let job = s.snapshot(None).unwrap().job;
        assert_eq!((job.state, job.step), (JobState::Running, 1));
        assert!(job.message.contains("stopping at step 2"), "{}", job.message);
    }

    #[tokio::test]
    async fn a_stop_with_the_step_checkpointed_and_nothing_in_flight_ends_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, _b) = three_step_world(dir.path());
        assert_eq!(s.stop(Some(s.job_id().as_str()), "drain").unwrap(), 0);
        let job = s.snapshot(None).unwrap().job;
        assert_eq!(job.state, JobState::Stopped, "{}", job.message);
        assert!(job.message.contains("stopped at step 0 (operator: drain)"), "{}", job.message);
        // Workers learn it at their next heartbeat or call.
        assert_eq!(s.heartbeat(&a, WorkerState::Running).unwrap().1, JobState::Stopped);
        let e = s.get_work(&a, None, 1, 0).await.unwrap_err();
        assert!(matches!(e, Error::JobEnded { state: JobState::Stopped, .. }), "{e}");
    }

    #[tokio::test]
    async fn a_cancel_ends_the_job_at_once_and_a_restart_does_not_resume_it() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, b) = three_step_world(dir.path());
        roll_out_and_score(&s, &[&a, &b]).await;
        let e = s.cancel(Some("job-that-is-not-here"), "x").unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
        assert!(e.to_string().contains("job job-that-is-not-here is not the job"), "{e}");
        assert_eq!(s.snapshot(None).unwrap().job.state, JobState::Running, "nothing changed");

        s.cancel(None, "wrong learning rate").unwrap();
        let job = s.snapshot(None).unwrap().job;
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(
            job.message,
            "cancelled at step 0 (operator: wrong learning rate); the last checkpoint is of step 0"
        );
        // The iteration in flight is not recorded.
        let e = s.report_step_metrics(&a, 1, metrics()).unwrap_err();
        assert!(matches!(e, Error::JobEnded { state: JobState::Cancelled, .. }), "{e}");
        let id = s.job_id();
        drop(s);
        // A coordinator started again on the database starts a new job.
        let mut st = settings(dir.path(), 2);
        st.job.max_train_steps = 3;
        st.job.num_generations = 2;
        st.job.checkpointing_steps = 10;
        let s = CoordinatorState::open(st).unwrap();
        assert_ne!(s.job_id(), id);
        let jobs = s.jobs().unwrap();
        let old = jobs.iter().find(|j| j.id == id).unwrap();
        assert_eq!(old.state, JobState::Cancelled, "it reads back");
    }

    #[test]
    fn a_restart_with_another_config_is_refused_listing_the_keys_unless_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let st = settings(dir.path(), 1);
        let id = CoordinatorState::open(st.clone()).unwrap().job_id();
        let mut changed = st.clone();
        changed.job.learning_rate = 2e-5;
        changed.job.num_generations = 8;
        let e = CoordinatorState::open(changed.clone()).unwrap_err();
        assert!(matches!(e, Error::ConfigChanged { .. }), "{e}");
        let m = e.to_string();
        let lr = serde_json::to_string(&st.job.learning_rate).unwrap();
        let ng = st.job.num_generations;
        assert!(
            m.contains(&format!(
                "what differs (stored -> given): learning_rate: {lr} -> 0.00002; \
                 num_generations: {ng} -> 8."
            )) && m.contains(&id.to_string())
                && m.contains("--adopt-config"),
            "{m}"
        );
        // Refused before anything changed: the same config still resumes the job.
        let s = CoordinatorState::open(st.clone()).unwrap();
        assert_eq!(s.job_id(), id);
        assert_eq!(
            s.snapshot(None).unwrap().job.message,
            "coordinator restarted; waiting for workers"
        );
        drop(s);

        let s =
            CoordinatorState::open(CoordinatorSettings { adopt_config: true, ..changed }).unwrap();
        let job = s.snapshot(None).unwrap().job;
        assert_eq!(job.id, id, "the same job goes on");
        assert_eq!((job.config.learning_rate, job.config.num_generations), (2e-5, 8));
        assert!(job.message.contains("2 config change(s) adopted"), "{}", job.message);
        drop(s);
        // What was adopted is the job's config from then on.
        let mut again = st;
        again.job.learning_rate = 2e-5;
        again.job.num_generations = 8;
        assert_eq!(CoordinatorState::open(again).unwrap().job_id(), id);
    }

    #[test]
    fn world_full_and_restart_keeps_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = settings(dir.path(), 1);
        st.topology = Topology::new(1, 1, Some(1)).unwrap();
        let job_id = {
            let s = CoordinatorState::open(st.clone()).unwrap();
            s.register(info(0), None).unwrap();
            let e = s.register(info(5), None).unwrap_err();
            assert!(e.to_string().contains("world is full: 1 of 1"), "{e}");
            s.job_id()
        };
        let s = CoordinatorState::open(st).unwrap();
        let snap = s.snapshot(None).unwrap();
        assert_eq!(snap.job.id, job_id);
        assert_eq!(snap.workers.len(), 1);
        assert_eq!(snap.workers[0].state, WorkerState::Lost);
    }
}
