use std::time::Duration;

use dancegrpo_proto::{
    JobState, RankAssignment, SessionSecret, StoreAddress, WorkerId, WorkerInfo, WorkerState,
};
use tokio::time::Instant;

use super::training::ReformCause;
use super::{Caller, CoordinatorState, Inner, Registration, now_ms};
use crate::config::CoordinatorSettings;
use crate::db::{Db, JobRecord, WorkerRecord};
use crate::error::{Error, Result};
use crate::lifecycle::{JobEvent, Lifecycle, WorkerEvent};

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) rec: WorkerRecord,
    /// The session secret of this registration; `None` for a record of a previous
    /// coordinator process, whose sessions ended with it.
    pub(super) secret: Option<SessionSecret>,
    pub(super) last_seen: Instant,
    /// The address rank 0 is reachable at, from the peer address of its registration.
    pub(super) reachable_host: String,
    /// Whether this coordinator can see the worker's process: it registered over loopback and
    /// its pid ran at that moment. A worker in another pid namespace (a container beside ours
    /// on one network) is not, and waits out the heartbeat timeout like a remote one.
    pub(super) pid_visible: bool,
}

impl Worker {
    /// Whether its process is known to be gone (it exited, or was killed and not yet reaped),
    /// which is sooner than the heartbeat timeout tells.
    pub(super) fn process_gone(&self) -> bool {
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

impl CoordinatorState {
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
            Lifecycle::new(db).worker(&job.id, &mut w.rec, WorkerEvent::Lost)?;
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
        // The slot's rank is that of its latest record (a slot may have held another rank
        // before a coordinator restart re-formed the world), and only while no live worker
        // holds it: one rank, one process.
        let held = |r: u32| workers.iter().any(|w| w.rec.rank == Some(r) && w.rec.state.is_live());
        let inherited = if formed {
            workers.iter().rev().filter(|w| same_slot(w)).find_map(|w| w.rec.rank)
        } else {
            None
        };
        if formed && inherited.is_none_or(held) {
            return Err(Error::InvalidRequest(format!(
                "node_rank {} local_rank {} is not a slot of the running world{}",
                info.node_rank,
                info.local_rank,
                inherited.map_or(String::new(), |r| format!(
                    " (its rank {r} is held by a live worker of a later world)"
                ))
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
            training.reform(
                db,
                job,
                *dataset_len,
                ReformCause::RankRejoined,
                |generation, _| {
                    format!(
                        "worker {worker_id} rejoined as rank {rank}; world re-formed (generation \
                     {generation})"
                    )
                },
            )?;
        } else if live + 1 == job.world_size {
            Self::form_world(db, job, workers)?;
            training.rewind(db, job, *dataset_len)?;
        } else {
            let message = format!("waiting for workers: {} of {}", live + 1, job.world_size);
            Lifecycle::new(db).note(job, message)?;
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
    pub(super) fn form_world(db: &Db, job: &mut JobRecord, workers: &mut [Worker]) -> Result<()> {
        let life = Lifecycle::new(db);
        let mut live: Vec<&mut Worker> =
            workers.iter_mut().filter(|w| w.rec.state.is_live()).collect();
        live.sort_by_key(|w| (w.rec.info.node_rank, w.rec.info.local_rank));
        for (rank, w) in live.into_iter().enumerate() {
            w.rec.rank = Some(rank as u32);
            life.worker(&job.id, &mut w.rec, WorkerEvent::Assigned)?;
        }
        let message =
            format!("world formed: {} workers (generation {})", job.world_size, job.generation + 1);
        life.job(job, JobEvent::WorldFormed, message)?;
        tracing::info!(world_size = job.world_size, generation = job.generation, "world formed");
        Ok(())
    }

    pub(super) fn assignment_of(
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
    pub(super) fn find<'a>(workers: &'a mut [Worker], who: &Caller) -> Result<&'a mut Worker> {
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
        let changed = reported == WorkerState::Draining && w.rec.state != WorkerState::Draining;
        if changed {
            Lifecycle::new(db).worker(&job.id, &mut w.rec, WorkerEvent::Drain)?;
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
        w.rec.last_heartbeat_ms = now_ms();
        Lifecycle::new(db).worker(&job.id, &mut w.rec, WorkerEvent::Left)?;
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
            Lifecycle::new(db).note(job, format!("{who_is} stopped: {reason}"))?;
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
        let life = Lifecycle::new(&*db);
        let mut lost = Vec::new();
        let mut message = None;
        for w in workers.iter_mut().filter(|w| w.rec.state.is_live()) {
            let why = if now.saturating_duration_since(w.last_seen) > timeout {
                format!("no heartbeat for {timeout:?}")
            } else if w.process_gone() {
                format!("its process (pid {}) is gone", w.rec.info.pid)
            } else {
                continue;
            };
            life.worker(&job.id, &mut w.rec, WorkerEvent::Lost)?;
            tracing::warn!(worker_id = %w.rec.id, rank = ?w.rec.rank, host = %w.rec.info.host,
                "worker lost: {why}");
            message = Some(format!(
                "worker {} (rank {}) on {} lost: {why}",
                w.rec.id,
                w.rec.rank.map_or("-".to_string(), |r| r.to_string()),
                w.rec.info.host,
            ));
            lost.push(w.rec.id.clone());
        }
        // An ended job's message says how it ended; a worker lost after that keeps it.
        if let Some(m) = message.filter(|_| !job.state.is_terminal()) {
            life.note(job, m)?;
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
    pub(super) fn check_replacement(inner: &mut Inner, now: Instant) -> Option<String> {
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
}
