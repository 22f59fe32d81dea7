//! The job's and the workers' lifecycles as explicit state machines.
//!
//! Every change of a job's or a worker's state is an event applied here: [`job_next`] and
//! [`worker_next`] say which transitions exist, and [`Lifecycle`] applies one to a record and
//! persists it through one port, the [`Ledger`]. A transition that does not exist (a finished
//! job failing, a lost worker draining) is refused and changes nothing: no RPC sequence, however
//! forged or out of order, can take a job back from an end state.
//!
//! ```text
//!                      WorldFormed             Finished | StoppedNow
//!   WaitingForWorkers ─────────────> Running ─────────────────────> Completed | Stopped
//!          ^  │                       │  ^ │
//!          │  │              Restarted│  │ └─ Reformed (a new generation)
//!          └──┴───────────────────────┘  │
//!   Failed | Cancelled <── any state before an end
//! ```

use dancegrpo_proto::{JobId, JobState, WorkerState};

use crate::db::{Db, JobRecord, WorkerRecord};
use crate::error::Result;
use crate::state::now_ms;

/// What happens to a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// Every slot has a worker: ranks are handed out under a new generation.
    WorldFormed,
    /// The running world is re-formed under a new generation: a rank came back, a collective
    /// failed, or a rank lost a step. The iterations since the last checkpoint are redone.
    Reformed,
    /// The coordinator restarted: the workers of the previous process register again.
    Restarted,
    /// Every rank is done with the last step. `early`: the step an operator's stop ended at,
    /// before `max_train_steps`.
    Finished {
        /// Ended by a stop before `max_train_steps`.
        early: bool,
    },
    /// An operator's stop that has nothing left to train: the current step is checkpointed.
    StoppedNow,
    /// An error no restart can fix.
    Failed,
    /// An operator's cancel.
    Cancelled,
}

/// What happens to a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    /// The world formed with it: it has a rank.
    Assigned,
    /// It is finishing in-flight work after SIGTERM.
    Drain,
    /// It said goodbye.
    Left,
    /// Its heartbeats stopped, its process is gone, or the coordinator restarted.
    Lost,
}

/// A transition that does not exist; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {from} on {event}")]
pub struct Illegal {
    /// The state it was in.
    pub from: &'static str,
    /// The event refused, as `Debug` prints it.
    pub event: String,
}

/// The state a job in `from` goes to on `event`.
pub fn job_next(from: JobState, event: JobEvent) -> std::result::Result<JobState, Illegal> {
    use JobEvent as E;
    use JobState as S;
    let to = match (from, event) {
        (S::WaitingForWorkers, E::WorldFormed) => S::Running,
        (S::Running, E::Reformed) => S::Running,
        (S::WaitingForWorkers | S::Running, E::Restarted) => S::WaitingForWorkers,
        (S::Running, E::Finished { early: false }) => S::Completed,
        (S::Running, E::Finished { early: true }) => S::Stopped,
        (S::WaitingForWorkers | S::Running, E::StoppedNow) => S::Stopped,
        (S::WaitingForWorkers | S::Running, E::Failed) => S::Failed,
        (S::WaitingForWorkers | S::Running, E::Cancelled) => S::Cancelled,
        _ => return Err(Illegal { from: from.as_str(), event: format!("{event:?}") }),
    };
    Ok(to)
}

/// The state a worker in `from` goes to on `event`. A draining worker stays draining when the
/// world forms around it: it is still on its way out.
pub fn worker_next(
    from: WorkerState,
    event: WorkerEvent,
) -> std::result::Result<WorkerState, Illegal> {
    use WorkerEvent as E;
    use WorkerState as S;
    let to = match (from, event) {
        (S::Waiting | S::Running, E::Assigned) => S::Running,
        (S::Draining, E::Assigned) => S::Draining,
        (S::Waiting | S::Running | S::Draining, E::Drain) => S::Draining,
        (S::Waiting | S::Running | S::Draining, E::Left) => S::Stopped,
        (S::Waiting | S::Running | S::Draining, E::Lost) => S::Lost,
        _ => return Err(Illegal { from: from.as_str(), event: format!("{event:?}") }),
    };
    Ok(to)
}

/// The one port every lifecycle change is persisted through.
pub trait Ledger {
    /// Persists a job record.
    fn put_job(&self, job: &JobRecord) -> Result<()>;
    /// Persists a worker record of `job`.
    fn put_worker(&self, job: &JobId, worker: &WorkerRecord) -> Result<()>;
}

impl Ledger for Db {
    fn put_job(&self, job: &JobRecord) -> Result<()> {
        Db::put_job(self, job)
    }

    fn put_worker(&self, job: &JobId, worker: &WorkerRecord) -> Result<()> {
        Db::put_worker(self, job, worker)
    }
}

/// Applies events to records and persists them: the only code that changes a job's or a
/// worker's state.
#[derive(Clone, Copy, Debug)]
pub struct Lifecycle<'a, L: Ledger> {
    ledger: &'a L,
}

impl<'a, L: Ledger> Lifecycle<'a, L> {
    /// Applies through `ledger`.
    pub fn new(ledger: &'a L) -> Self {
        Self { ledger }
    }

    /// Moves `job` on `event`, with `message` as its message, and persists it. A world formed
    /// or re-formed gets the next generation. Returns the new state; an [`Illegal`] transition
    /// ([`crate::Error::Illegal`]) leaves the record as it was and writes nothing.
    pub fn job(&self, job: &mut JobRecord, event: JobEvent, message: String) -> Result<JobState> {
        let to = job_next(job.state, event)?;
        if matches!(event, JobEvent::WorldFormed | JobEvent::Reformed) {
            job.generation += 1;
        }
        job.state = to;
        job.message = message;
        job.updated_ms = now_ms();
        self.ledger.put_job(job)?;
        Ok(to)
    }

    /// Records progress that changes no state: the job's message, and whatever else the
    /// caller set on the record (its step, its checkpoint step).
    pub fn note(&self, job: &mut JobRecord, message: String) -> Result<()> {
        job.message = message;
        job.updated_ms = now_ms();
        self.ledger.put_job(job)
    }

    /// Moves worker `w` of `job` on `event` and persists it; an [`Illegal`] transition
    /// ([`crate::Error::Illegal`]) leaves it as it was.
    pub fn worker(
        &self,
        job: &JobId,
        w: &mut WorkerRecord,
        event: WorkerEvent,
    ) -> Result<WorkerState> {
        let to = worker_next(w.state, event)?;
        w.state = to;
        self.ledger.put_worker(job, w)?;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use dancegrpo_proto::{JobConfig, WorkerId, WorkerInfo};

    use super::*;

    const JOB_STATES: [JobState; 6] = [
        JobState::WaitingForWorkers,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Stopped,
        JobState::Cancelled,
    ];
    const JOB_EVENTS: [JobEvent; 8] = [
        JobEvent::WorldFormed,
        JobEvent::Reformed,
        JobEvent::Restarted,
        JobEvent::Finished { early: false },
        JobEvent::Finished { early: true },
        JobEvent::StoppedNow,
        JobEvent::Failed,
        JobEvent::Cancelled,
    ];
    const WORKER_STATES: [WorkerState; 5] = [
        WorkerState::Waiting,
        WorkerState::Running,
        WorkerState::Draining,
        WorkerState::Stopped,
        WorkerState::Lost,
    ];
    const WORKER_EVENTS: [WorkerEvent; 4] =
        [WorkerEvent::Assigned, WorkerEvent::Drain, WorkerEvent::Left, WorkerEvent::Lost];

    /// A ledger that keeps what it was given, in order.
    #[derive(Default)]
    struct Recorder {
        jobs: RefCell<Vec<JobRecord>>,
        workers: RefCell<Vec<WorkerRecord>>,
    }

    impl Ledger for Recorder {
        fn put_job(&self, job: &JobRecord) -> Result<()> {
            self.jobs.borrow_mut().push(job.clone());
            Ok(())
        }

        fn put_worker(&self, _: &JobId, w: &WorkerRecord) -> Result<()> {
            self.workers.borrow_mut().push(w.clone());
            Ok(())
        }
    }

    fn job(state: JobState) -> JobRecord {
        JobRecord {
            id: JobId::new(),
            name: "j".into(),
            state,
            step: 3,
            world_size: 2,
            generation: 4,
            checkpoint_step: 2,
            config: JobConfig::default(),
            message: "before".into(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn worker(state: WorkerState) -> WorkerRecord {
        WorkerRecord {
            id: WorkerId::new(),
            info: WorkerInfo {
                host: "h".into(),
                node_rank: 0,
                local_rank: 0,
                device: "cpu".into(),
                device_description: "cpu".into(),
                pid: 1,
            },
            rank: Some(0),
            state,
            last_heartbeat_ms: 0,
            registered_ms: 0,
        }
    }

    /// Every (state, event) pair of the job's machine: the legal ones, written out once more
    /// by hand, go where they should; every other one is refused.
    #[test]
    fn each_job_transition_and_every_missing_one() {
        use JobEvent as E;
        use JobState as S;
        let legal = [
            (S::WaitingForWorkers, E::WorldFormed, S::Running),
            (S::WaitingForWorkers, E::Restarted, S::WaitingForWorkers),
            (S::WaitingForWorkers, E::StoppedNow, S::Stopped),
            (S::WaitingForWorkers, E::Failed, S::Failed),
            (S::WaitingForWorkers, E::Cancelled, S::Cancelled),
            (S::Running, E::Reformed, S::Running),
            (S::Running, E::Restarted, S::WaitingForWorkers),
            (S::Running, E::Finished { early: false }, S::Completed),
            (S::Running, E::Finished { early: true }, S::Stopped),
            (S::Running, E::StoppedNow, S::Stopped),
            (S::Running, E::Failed, S::Failed),
            (S::Running, E::Cancelled, S::Cancelled),
        ];
        for from in JOB_STATES {
            for event in JOB_EVENTS {
                let want = legal.iter().find(|(f, e, _)| (*f, *e) == (from, event)).map(|l| l.2);
                match (job_next(from, event), want) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from} on {event:?}"),
                    (Err(e), None) => {
                        assert_eq!(e.from, from.as_str());
                        assert!(e.to_string().contains(&format!("{event:?}")), "{e}");
                    }
                    (got, want) => panic!("{from} on {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        // No way out of an end state, whatever comes.
        for from in JOB_STATES.into_iter().filter(|s| s.is_terminal()) {
            assert!(JOB_EVENTS.iter().all(|e| job_next(from, *e).is_err()), "{from}");
        }
    }

    #[test]
    fn each_worker_transition_and_every_missing_one() {
        use WorkerEvent as E;
        use WorkerState as S;
        let legal = [
            (S::Waiting, E::Assigned, S::Running),
            (S::Running, E::Assigned, S::Running),
            (S::Draining, E::Assigned, S::Draining),
            (S::Waiting, E::Drain, S::Draining),
            (S::Running, E::Drain, S::Draining),
            (S::Draining, E::Drain, S::Draining),
            (S::Waiting, E::Left, S::Stopped),
            (S::Running, E::Left, S::Stopped),
            (S::Draining, E::Left, S::Stopped),
            (S::Waiting, E::Lost, S::Lost),
            (S::Running, E::Lost, S::Lost),
            (S::Draining, E::Lost, S::Lost),
        ];
        for from in WORKER_STATES {
            for event in WORKER_EVENTS {
                let want = legal.iter().find(|(f, e, _)| (*f, *e) == (from, event)).map(|l| l.2);
                match (worker_next(from, event), want) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from} on {event:?}"),
                    (Err(_), None) => {}
                    (got, want) => panic!("{from} on {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        // A worker that left or was lost registers again as a new worker; its record stays.
        for from in [S::Stopped, S::Lost] {
            assert!(WORKER_EVENTS.iter().all(|e| worker_next(from, *e).is_err()), "{from}");
        }
    }

    #[test]
    fn a_transition_is_persisted_once_with_its_generation_and_an_illegal_one_not_at_all() {
        let ledger = Recorder::default();
        let life = Lifecycle::new(&ledger);
        for from in JOB_STATES {
            for event in JOB_EVENTS {
                ledger.jobs.borrow_mut().clear();
                let mut j = job(from);
                let before = j.clone();
                match life.job(&mut j, event, "after".into()) {
                    Ok(to) => {
                        let bumps = matches!(event, JobEvent::WorldFormed | JobEvent::Reformed);
                        assert_eq!(j.state, to);
                        assert_eq!(j.generation, before.generation + u64::from(bumps));
                        assert_eq!(j.message, "after");
                        assert!(j.updated_ms > 0);
                        assert_eq!((j.step, j.checkpoint_step), (3, 2), "steps are the caller's");
                        let written = ledger.jobs.borrow();
                        assert_eq!(written.len(), 1, "{from} on {event:?}");
                        assert_eq!(written[0].state, to);
                        assert_eq!(written[0].generation, j.generation);
                    }
                    Err(e) => {
                        assert!(matches!(e, crate::Error::Illegal(_)), "{e}");
                        assert_eq!(j.state, before.state);
                        assert_eq!((j.generation, j.message.as_str()), (4, "before"));
                        assert!(ledger.jobs.borrow().is_empty(), "{from} on {event:?}");
                    }
                }
            }
        }
        for from in WORKER_STATES {
            for event in WORKER_EVENTS {
                ledger.workers.borrow_mut().clear();
                let mut w = worker(from);
                let r = life.worker(&JobId::new(), &mut w, event);
                let written = ledger.workers.borrow();
                match r {
                    Ok(to) => {
                        assert_eq!((w.state, written.len(), written[0].state), (to, 1, to));
                    }
                    Err(_) => assert_eq!((w.state, written.len()), (from, 0)),
                }
            }
        }
        let mut j = job(JobState::Running);
        life.note(&mut j, "iteration 3/5".into()).unwrap();
        assert_eq!(
            (j.state, j.generation, j.message.as_str()),
            (JobState::Running, 4, "iteration 3/5")
        );
        assert_eq!(ledger.jobs.borrow().last().unwrap().message, "iteration 3/5");
    }
}
