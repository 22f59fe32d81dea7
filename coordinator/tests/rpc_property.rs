//! No client-reachable panic (issue 13): random sequences of RPCs, forged and out-of-order ones
//! among them, against the in-process service. After every call nothing has panicked or hung,
//! and the job's invariants hold. A well-behaved worker's next call is one of the ops, so the
//! sequences also get through iterations, checkpoints, re-formed worlds and the job's end
//! instead of only exploring refusals.
//!
//! Each case runs on a current-thread runtime with a paused clock: the coordinator's 20 s long
//! polls end at once in virtual time, and heartbeat timeouts pass only when an op says so.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dancegrpo_coordinator::config::{CoordinatorSettings, Topology};
use dancegrpo_coordinator::db::Db;
use dancegrpo_coordinator::service::CoordinatorService;
use dancegrpo_coordinator::state::CoordinatorState;
use dancegrpo_proto::pb::coordinator_server::Coordinator;
use dancegrpo_proto::pb::job_service_server::JobService;
use dancegrpo_proto::{
    JobConfig, JobState, NonFinitePolicy, PROTOCOL_VERSION, Reason, WorkerId, pb,
};
use proptest::prelude::*;
use proptest::sample::Index;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};

/// Enough iterations for a checkpoint (every 2) and a last step checkpointed only at the end.
const MAX_TRAIN_STEPS: u32 = 3;
const CHECKPOINTING_STEPS: u32 = 2;
/// The smallest group with a std; with one prompt per rank, two trajectories per rank.
const NUM_GENERATIONS: u32 = 2;
const ADV_CLIP_MAX: f64 = 5.0;
/// Longer than the coordinator's long poll (20 s): a call still pending then never returns.
const HANG: Duration = Duration::from_secs(60);
/// Longer than a long poll, so the polls alone never lose a worker; an expire op can.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
const RANK_REPLACE_TIMEOUT_S: u32 = 60;

/// Statuses compared as they print, so that a NaN loss (reported under `drop_group`) equals
/// itself.
fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn settings(dir: &Path, case: &Case) -> CoordinatorSettings {
    let data = dir.join("videos2caption.json");
    std::fs::write(&data, r#"[{"caption": "a"}, {"caption": "b"}, {"caption": "c"}]"#).unwrap();
    CoordinatorSettings {
        job: JobConfig {
            job_name: "property".into(),
            data_json_path: data.display().to_string(),
            output_dir: dir.join("out").display().to_string(),
            num_generations: NUM_GENERATIONS,
            train_batch_size: 1,
            max_train_steps: MAX_TRAIN_STEPS,
            checkpointing_steps: CHECKPOINTING_STEPS,
            adv_clip_max: ADV_CLIP_MAX,
            non_finite_policy: case.policy,
            rank_replace_timeout_s: RANK_REPLACE_TIMEOUT_S,
            ..JobConfig::default()
        },
        topology: case.topology,
        db_path: dir.join("db.sqlite"),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        store_port: 29500,
        listen: "127.0.0.1:0".parse().unwrap(),
        adopt_config: false,
    }
}

/// The credentials a call carries: the worker's own, or forged ones.
#[derive(Clone, Copy, Debug)]
enum Cred {
    Real,
    /// A secret of the right length that is not the worker's.
    Guess,
    Empty,
    /// The worker's secret with its last character changed.
    Flipped,
    /// Another registration's secret.
    Other,
    /// The worker's secret with a character appended.
    Longer,
    /// The worker's secret under an id nobody registered.
    UnknownId,
}

/// A generation, iteration or step a call quotes: the one the worker believes current, the
/// one after it, or any.
#[derive(Clone, Copy, Debug)]
enum Num {
    Current,
    Next,
    Value(u64),
}

#[derive(Clone, Copy, Debug)]
enum Pid {
    /// This process: from loopback, a worker whose process the coordinator watches, which runs.
    Own,
    /// A pid no process has (pids stay below 2^22 on Linux), so nothing depends on the machine.
    Absent(u32),
}

/// A registration as a worker sends it, or malformed.
#[derive(Clone, Copy, Debug)]
enum Form {
    Good,
    Protocol(u32),
    NoWorker,
    NoDevice,
    EmptyDevice,
}

#[derive(Clone, Debug)]
enum Rewards {
    /// Finite values for the worker's last known items: `base + member`.
    Mine(f64),
    /// One NaN or infinite value, which the wire refuses.
    NonFinite(f64),
    /// The reward model failed for the first item.
    Failed,
    /// Every item with this many values (the job has one reward).
    Count(usize),
    /// An item of a group that is not the worker's.
    Foreign(u64),
    /// A trajectory without its item.
    NoItem,
    Nothing,
}

/// The job an operator call names: ours by its id or by default (empty), or any other.
#[derive(Clone, Debug)]
enum JobRef {
    This,
    Default,
    Other(String),
}

/// One op of a sequence. The numbers a call quotes are resolved when it runs, against what
/// its worker was told (or the status), so a shrunk sequence still means the same.
#[derive(Clone, Debug)]
enum Op {
    Register {
        node_rank: u32,
        local_rank: u32,
        host: &'static str,
        pid: Pid,
        form: Form,
    },
    Heartbeat {
        who: Index,
        cred: Cred,
        state: i32,
        protocol: u32,
    },
    Goodbye {
        who: Index,
        cred: Cred,
        error: Option<String>,
    },
    GetWork {
        who: Index,
        cred: Cred,
        ready_for: Option<Num>,
        generation: Num,
        checkpointed: Num,
    },
    ReportRewards {
        who: Index,
        cred: Cred,
        iteration: Num,
        generation: Num,
        rewards: Rewards,
    },
    GetAdvantages {
        who: Index,
        cred: Cred,
        iteration: Num,
        generation: Num,
    },
    ReportStepMetrics {
        who: Index,
        cred: Cred,
        iteration: Num,
        generation: Num,
        loss: f64,
        fingerprint: Num,
        timings: bool,
    },
    Reform {
        who: Index,
        cred: Cred,
        generation: Num,
    },
    Stop(JobRef),
    Cancel(JobRef),
    Status(JobRef, u32),
    ListJobs,
    Watch(JobRef),
    /// Advance the clock by `ms`, then look for lost workers; `beating`: the well-behaved
    /// workers heartbeat first, as their heartbeat tasks would have meanwhile.
    Expire {
        ms: u64,
        beating: bool,
    },
    /// One well-behaved worker makes its next call.
    Step(Index),
    /// Every well-behaved worker makes its next call; free slots get a new worker.
    Round,
    /// The coordinator restarts on its database (its workers' sessions end with it).
    Restart,
}

fn cred() -> impl Strategy<Value = Cred> {
    prop_oneof![
        8 => Just(Cred::Real),
        1 => Just(Cred::Guess),
        1 => Just(Cred::Empty),
        1 => Just(Cred::Flipped),
        1 => Just(Cred::Other),
        1 => Just(Cred::Longer),
        1 => Just(Cred::UnknownId),
    ]
}

fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        6 => Just(Num::Current),
        1 => Just(Num::Next),
        1 => (0..4u64).prop_map(Num::Value),
        1 => any::<u64>().prop_map(Num::Value),
    ]
}

fn job_ref() -> impl Strategy<Value = JobRef> {
    prop_oneof![
        Just(JobRef::This),
        Just(JobRef::Default),
        "[a-z0-9-]{0,12}".prop_map(JobRef::Other)
    ]
}

fn finite() -> impl Strategy<Value = f64> {
    // Huge values are finite too: their sums and squares are not.
    prop_oneof![4 => -10.0..10.0f64, 1 => Just(f64::MAX), 1 => Just(-f64::MAX), 1 => Just(1e300)]
}

fn rewards() -> impl Strategy<Value = Rewards> {
    prop_oneof![
        6 => finite().prop_map(Rewards::Mine),
        1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)]
            .prop_map(Rewards::NonFinite),
        1 => Just(Rewards::Failed),
        1 => prop_oneof![Just(0usize), Just(2), Just(3)].prop_map(Rewards::Count),
        1 => prop_oneof![0..4u64, any::<u64>()].prop_map(Rewards::Foreign),
        1 => Just(Rewards::NoItem),
        1 => Just(Rewards::Nothing),
    ]
}

fn register() -> impl Strategy<Value = Op> {
    let pid = prop_oneof![
        Just(Pid::Own),
        Just(Pid::Absent(0)),
        ((1u32 << 22)..=u32::MAX).prop_map(Pid::Absent)
    ];
    let form = prop_oneof![
        12 => Just(Form::Good),
        1 => prop_oneof![Just(0u32), Just(PROTOCOL_VERSION - 1), any::<u32>()]
            .prop_map(Form::Protocol),
        1 => Just(Form::NoWorker),
        1 => Just(Form::NoDevice),
        1 => Just(Form::EmptyDevice),
    ];
    (
        prop_oneof![6 => Just(0u32), 2 => Just(1u32), 1 => Just(2u32), 1 => Just(3u32)],
        0..5u32,
        prop_oneof![Just("host-a"), Just("127.0.0.1"), Just("evil\nhost\u{1b}[2J")],
        pid,
        form,
    )
        .prop_map(|(node_rank, local_rank, host, pid, form)| Op::Register {
            node_rank,
            local_rank,
            host,
            pid,
            form,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let who = any::<Index>;
    let state =
        prop_oneof![6 => Just(pb::WorkerState::Running as i32), 1 => 0..=6, 1 => any::<i32>()];
    let protocol = prop_oneof![6 => Just(PROTOCOL_VERSION), 1 => any::<u32>()];
    let error = prop_oneof![
        6 => Just(None),
        1 => ".{0,30}".prop_map(Some),
        1 => Just(Some("forged\nlog line\u{7}".to_string())),
        1 => Just(Some("x".repeat(5000))),
    ];
    let loss = prop_oneof![6 => -10.0..10.0f64, 1 => Just(f64::NAN), 1 => Just(f64::INFINITY)];
    let ms = prop_oneof![
        3 => Just(0u64),
        3 => 1..2_000u64,
        2 => Just(31_000),
        1 => Just(61_000),
        1 => Just(700_000),
    ];
    // Weighted so that most cases make progress: an operator's cancel or stop, or a fatal
    // report, ends the job early, which is worth exploring but not in every case.
    prop_oneof![
        36 => Just(Op::Round),
        18 => who().prop_map(Op::Step),
        12 => register(),
        9 => (who(), cred(), state, protocol).prop_map(|(who, cred, state, protocol)| {
            Op::Heartbeat { who, cred, state, protocol }
        }),
        3 => (who(), cred(), error)
            .prop_map(|(who, cred, error)| Op::Goodbye { who, cred, error }),
        9 => (who(), cred(), proptest::option::weighted(0.9, num()), num(), num()).prop_map(
            |(who, cred, ready_for, generation, checkpointed)| Op::GetWork {
                who,
                cred,
                ready_for,
                generation,
                checkpointed,
            }
        ),
        9 => (who(), cred(), num(), num(), rewards()).prop_map(
            |(who, cred, iteration, generation, rewards)| Op::ReportRewards {
                who,
                cred,
                iteration,
                generation,
                rewards,
            }
        ),
        6 => (who(), cred(), num(), num()).prop_map(|(who, cred, iteration, generation)| {
            Op::GetAdvantages { who, cred, iteration, generation }
        }),
        9 => (who(), cred(), num(), num(), loss, num(), prop::bool::weighted(0.9)).prop_map(
            |(who, cred, iteration, generation, loss, fingerprint, timings)| Op::ReportStepMetrics {
                who,
                cred,
                iteration,
                generation,
                loss,
                fingerprint,
                timings,
            }
        ),
        3 => (who(), cred(), num())
            .prop_map(|(who, cred, generation)| Op::Reform { who, cred, generation }),
        1 => job_ref().prop_map(Op::Stop),
        1 => job_ref().prop_map(Op::Cancel),
        3 => (job_ref(), prop_oneof![Just(0u32), 1..4u32]).prop_map(|(j, n)| Op::Status(j, n)),
        2 => Just(Op::ListJobs),
        3 => job_ref().prop_map(Op::Watch),
        5 => Just(Op::Restart),
        9 => (ms, prop::bool::weighted(0.75))
            .prop_map(|(ms, beating)| Op::Expire { ms, beating }),
    ]
}

/// Where a well-behaved worker is in the step protocol.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Waiting for an assignment (heartbeats).
    Join,
    /// Asking for work.
    Work,
    /// Reporting the rewards of its items for this iteration.
    Rewards(u64),
    Advantages(u64),
    /// Trained this iteration: reporting its metrics.
    Train(u64),
    /// Told the job is over: says goodbye.
    Done,
}

/// One worker process as the driver models it, across its registrations.
#[derive(Debug)]
struct Worker {
    slot: (u32, u32),
    id: String,
    secret: String,
    /// The coordinator said this registration is over: the next step registers again.
    gone: bool,
    /// The process has finished (told the job is over, or refused a new registration).
    exited: bool,
    /// Of its assignment.
    generation: Option<u64>,
    /// The step its weights are at (`ready_for` of GetWork).
    weights: Option<u64>,
    /// The newest checkpoint it wrote in this generation.
    checkpointed: u64,
    /// Its current trajectories: the work of the iteration, or its refill.
    items: Vec<pb::WorkItem>,
    phase: Phase,
}

impl Worker {
    /// What a real worker does on a refusal.
    fn react(&mut self, status: &Status) {
        match Reason::of(status) {
            Some(Reason::Timeout) => {}
            Some(Reason::WorkerGone | Reason::UnknownWorker) => self.gone = true,
            Some(Reason::JobFailed | Reason::JobEnded) => self.phase = Phase::Done,
            _ => self.phase = Phase::Join,
        }
    }

    /// The iteration it believes in flight.
    fn iteration(&self) -> Option<u64> {
        match self.phase {
            Phase::Rewards(i) | Phase::Advantages(i) | Phase::Train(i) => Some(i),
            _ => None,
        }
    }
}

fn resolve(n: Num, current: u64) -> u64 {
    match n {
        Num::Current => current,
        Num::Next => current.saturating_add(1),
        Num::Value(v) => v,
    }
}

fn job_state(s: &pb::JobStatus) -> JobState {
    JobState::try_from(s.state()).expect("the status carries a job state")
}

fn rewarded(
    items: &[pb::WorkItem],
    value: impl Fn(&pb::WorkItem) -> f64,
) -> Vec<pb::TrajectoryReward> {
    items
        .iter()
        .map(|i| pb::TrajectoryReward {
            item: Some(*i),
            rewards: vec![value(i)],
            error: String::new(),
        })
        .collect()
}

fn metrics(iteration: u64, loss: f64, fingerprint: f64, timings: bool) -> pb::StepMetrics {
    pb::StepMetrics {
        iteration,
        loss,
        grad_norm: 1.0,
        timings: timings.then(pb::PhaseTimings::default),
        weights_fingerprint: fingerprint,
        optimizer_steps: 1,
        ..Default::default()
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The reward log and the metrics log hold one line per recorded iteration.
fn check_logs(out: &Path, step: u64) -> Result<(), TestCaseError> {
    let log = lines(&out.join(JobConfig::default().reward_log));
    prop_assert_eq!(log.len() as u64, step, "reward log lines: {:?}", log);
    for l in &log {
        prop_assert!(l.parse::<f64>().is_ok_and(f64::is_finite), "reward log line {:?}", l);
    }
    let metrics = lines(&out.join(dancegrpo_coordinator::outputs::METRICS_LOG));
    prop_assert_eq!(metrics.len() as u64, step, "metrics log: {:?}", metrics);
    Ok(())
}

struct Harness {
    svc: CoordinatorService,
    state: Arc<CoordinatorState>,
    settings: CoordinatorSettings,
    authenticated: bool,
    /// A second connection, to see what the coordinator has persisted.
    db: Db,
    world: u32,
    out: PathBuf,
    workers: Vec<Worker>,
    /// Every session secret handed out.
    secrets: Vec<String>,
    /// The status after the last call.
    last: pb::JobStatus,
    /// The call being checked, for the failure message.
    at: String,
    /// (generation, iteration, rank) of every answer with advantages.
    advantaged: HashSet<(u64, u64, u32)>,
}

impl Harness {
    /// Awaits one call, bounded: a call that does not return within [`HANG`] hangs. Every
    /// refusal carries one of our reasons with its code, never INTERNAL or UNKNOWN, and only
    /// a long poll runs out of time.
    async fn call<T>(
        &mut self,
        what: String,
        long_poll: bool,
        fut: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Result<T, Status>, TestCaseError> {
        self.at = what;
        let Ok(r) = tokio::time::timeout(HANG, fut).await else {
            return Err(TestCaseError::fail(format!("{} hung for {HANG:?}", self.at)));
        };
        match r {
            Ok(r) => Ok(Ok(r.into_inner())),
            Err(s) => {
                let reason = Reason::of(&s);
                prop_assert!(
                    reason.is_some_and(|r| r.code() == s.code() && r != Reason::Internal),
                    "{}: refused with {:?} ({:?}): {}",
                    self.at,
                    s.code(),
                    reason,
                    s.message()
                );
                prop_assert!(!matches!(s.code(), Code::Internal | Code::Unknown), "{}", self.at);
                prop_assert!(
                    long_poll || reason != Some(Reason::Timeout),
                    "{} timed out: {}",
                    self.at,
                    s.message()
                );
                for secret in &self.secrets {
                    prop_assert!(
                        !s.message().contains(secret.as_str()),
                        "{} leaks a secret",
                        self.at
                    );
                }
                Ok(Err(s))
            }
        }
    }

    async fn status(&mut self) -> Result<pb::JobStatus, TestCaseError> {
        let req = pb::GetJobStatusRequest { job_id: String::new(), history_limit: 0 };
        let svc = self.svc.clone();
        let what = format!("GetJobStatus after {}", self.at);
        let s = self.call(what, false, svc.get_job_status(Request::new(req))).await?;
        match s {
            Ok(r) => Ok(r.status.expect("a status")),
            Err(e) => Err(TestCaseError::fail(format!("GetJobStatus failed: {e:?}"))),
        }
    }

    /// The invariants after a call, against the status before it; `unchanged` for calls that
    /// must change nothing (forged ones, refused registrations and operator calls, reads). The
    /// job's state, generation, step and checkpoint only move as the protocol moves them, its
    /// history and logs hold one finite record per step, the live workers fit the world, no
    /// secret shows, and the database holds what the status shows.
    async fn check(&mut self, unchanged: bool) -> Result<(), TestCaseError> {
        let at = self.at.clone();
        let after = self.status().await?;
        self.at = at;
        let before = &self.last;
        let at = &self.at;
        if unchanged {
            prop_assert!(same(&after, before), "{} changed the status", at);
        }
        prop_assert_eq!(&after.job_id, &before.job_id, "{}", at);
        let (was, is) = (job_state(before), job_state(&after));
        prop_assert!(!was.is_terminal() || is == was, "{}: job went from {} to {}", at, was, is);
        prop_assert!(after.generation >= before.generation, "{}: generation went back", at);
        prop_assert!(is != JobState::Running || after.generation >= 1, "{}", at);
        prop_assert!(after.step <= u64::from(MAX_TRAIN_STEPS), "{}: step {}", at, after.step);
        prop_assert!(
            after.step <= before.step + 1,
            "{}: {} steps at once",
            at,
            after.step - before.step
        );
        prop_assert!(after.checkpoint_step <= after.step, "{}: checkpoint past the step", at);
        prop_assert!(
            after.checkpoint_step >= before.checkpoint_step,
            "{}: checkpoint went back",
            at
        );
        // An iteration is recorded once every rank has trained it, which takes its advantages,
        // which take every reward of its groups.
        if after.step == before.step + 1 {
            for rank in 0..self.world {
                prop_assert!(
                    self.advantaged.contains(&(after.generation, before.step, rank)),
                    "{}: iteration {} recorded, but rank {} never got its advantages",
                    at,
                    before.step + 1,
                    rank
                );
            }
        }
        if after.step < before.step {
            prop_assert!(
                after.step == after.checkpoint_step && after.generation > before.generation,
                "{}: step {} -> {} is no rewind to the checkpoint ({}) of a new world",
                at,
                before.step,
                after.step,
                after.checkpoint_step
            );
        }
        // The status shows one record per step, and only finite numbers.
        prop_assert_eq!(after.history.len() as u64, after.step, "{}", at);
        for (i, h) in after.history.iter().enumerate() {
            prop_assert_eq!(h.iteration, i as u64 + 1, "{}", at);
            prop_assert!(
                h.mean_rewards.len() == 1 && h.mean_rewards.iter().all(|r| r.is_finite()),
                "{}: iteration {} has mean rewards {:?}",
                at,
                h.iteration,
                h.mean_rewards
            );
            if let Some(m) = &h.metrics {
                let t = m.timings.unwrap_or_default();
                let timings = [t.rollout_s, t.decode_s, t.reward_s, t.train_s, t.communication_s];
                prop_assert!(timings.into_iter().all(f64::is_finite), "{}: metrics {:?}", at, m);
                // Under `drop_group` a rank may report a NaN or Inf update (it skipped it), and
                // the status shows it as it was; under `fail` such a step is never recorded.
                let update =
                    [m.loss, m.grad_norm, m.ratio_dev_mean, m.ratio_dev_max, m.clip_fraction];
                let shown_as_reported = self.settings.job.non_finite_policy
                    == NonFinitePolicy::DropGroup
                    || update.into_iter().all(f64::is_finite);
                prop_assert!(shown_as_reported, "{}: metrics {:?}", at, m);
            }
        }
        // The world: at most `world` live workers, one per slot, one per rank.
        let live: Vec<&pb::WorkerStatus> =
            after.workers.iter().filter(|w| live_state(w.state())).collect();
        prop_assert!(live.len() as u32 <= self.world, "{}: {} live workers", at, live.len());
        let mut slots: Vec<(u32, u32)> = live
            .iter()
            .map(|w| w.info.as_ref().map_or((u32::MAX, u32::MAX), |i| (i.node_rank, i.local_rank)))
            .collect();
        slots.sort();
        slots.dedup();
        prop_assert_eq!(slots.len(), live.len(), "{}: two live workers share a slot", at);
        let mut ranks: Vec<u32> = live.iter().filter_map(|w| w.rank).collect();
        prop_assert!(ranks.iter().all(|r| *r < self.world), "{}: ranks {:?}", at, ranks);
        ranks.sort();
        ranks.dedup();
        let ranked = live.iter().filter(|w| w.rank.is_some()).count();
        prop_assert_eq!(ranks.len(), ranked, "{}: two live workers share a rank", at);
        // A registration that ended stays ended.
        for old in before.workers.iter().filter(|w| !live_state(w.state())) {
            let now = after.workers.iter().find(|w| w.worker_id == old.worker_id);
            prop_assert!(
                now.is_some_and(|w| !live_state(w.state())),
                "{}: {} came back",
                at,
                old.worker_id
            );
        }
        let shown = format!("{after:?}");
        for secret in &self.secrets {
            prop_assert!(
                !shown.contains(secret.as_str()),
                "{}: the status shows a session secret",
                at
            );
        }
        self.check_persisted(&after)?;
        check_logs(&self.out, after.step)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", self.at)))?;
        self.last = after;
        Ok(())
    }

    /// What the status shows is what the database holds (but the heartbeat times, which are
    /// kept in memory only).
    fn check_persisted(&self, s: &pb::JobStatus) -> Result<(), TestCaseError> {
        let at = &self.at;
        let job = self.db.job(&s.job_id).expect("the job reads back").expect("the job is stored");
        prop_assert_eq!(
            (job.state, job.step, job.checkpoint_step, job.generation, &job.message),
            (job_state(s), s.step, s.checkpoint_step, s.generation, &s.message),
            "{}: the database holds another job record",
            at
        );
        let mut stored: Vec<(String, i32, Option<u32>)> = self
            .db
            .workers(&s.job_id)
            .expect("the workers read back")
            .iter()
            .map(|w| (w.id.to_string(), pb::WorkerState::from(w.state) as i32, w.rank))
            .collect();
        let mut shown: Vec<(String, i32, Option<u32>)> =
            s.workers.iter().map(|w| (w.worker_id.clone(), w.state, w.rank)).collect();
        stored.sort();
        shown.sort();
        prop_assert_eq!(stored, shown, "{}: the database holds other workers", at);
        let iterations = self.db.iterations(&s.job_id).expect("the iterations read back");
        prop_assert_eq!(iterations.len() as u64, s.step, "{}", at);
        Ok(())
    }

    /// The worker `who` names and the credentials `cred` makes of its own; an id nobody
    /// registered while there is nobody.
    fn creds(&self, who: Index, cred: Cred) -> (Option<usize>, String, String) {
        if self.workers.is_empty() {
            return (None, WorkerId::new().to_string(), "x".repeat(64));
        }
        let i = who.index(self.workers.len());
        let w = &self.workers[i];
        let (id, secret) = (w.id.clone(), w.secret.clone());
        let flipped = || {
            let mut s = secret.clone();
            let last = if s.pop() == Some('0') { '1' } else { '0' };
            s.push(last);
            s
        };
        let (id, secret) = match cred {
            Cred::Real => (id, secret),
            Cred::Guess => (id, "0".repeat(secret.len())),
            Cred::Empty => (id, String::new()),
            Cred::Flipped => (id, flipped()),
            Cred::Other => {
                let other = self.secrets.iter().find(|s| **s != secret).cloned();
                (id, other.unwrap_or_else(flipped))
            }
            Cred::Longer => (id, format!("{secret}0")),
            Cred::UnknownId => (WorkerId::new().to_string(), secret),
        };
        (Some(i), id, secret)
    }

    fn generation_of(&self, w: Option<usize>) -> u64 {
        w.and_then(|i| self.workers[i].generation).unwrap_or(self.last.generation)
    }

    fn iteration_of(&self, w: Option<usize>) -> u64 {
        w.and_then(|i| self.workers[i].iteration()).unwrap_or(self.last.step)
    }

    /// A call naming a worker: forged credentials are refused and change nothing.
    async fn worker_call<T>(
        &mut self,
        what: String,
        cred: Cred,
        long_poll: bool,
        fut: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Result<T, Status>, TestCaseError> {
        let forged = !matches!(cred, Cred::Real) || self.workers.is_empty();
        let r = self.call(what, long_poll, fut).await?;
        prop_assert!(!forged || r.is_err(), "{} succeeded with forged credentials", self.at);
        self.check(forged).await?;
        Ok(r)
    }

    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let svc = self.svc.clone();
        match op.clone() {
            Op::Register { node_rank, local_rank, host, pid, form } => {
                let pid = match pid {
                    Pid::Own => std::process::id(),
                    Pid::Absent(p) => p,
                };
                let device = match form {
                    Form::NoDevice => None,
                    Form::EmptyDevice => Some(pb::DeviceInfo::default()),
                    _ => Some(pb::DeviceInfo { device: "cpu".into(), description: "test".into() }),
                };
                let worker =
                    pb::WorkerInfo { host: host.into(), node_rank, local_rank, device, pid };
                let req = pb::RegisterWorkerRequest {
                    protocol_version: match form {
                        Form::Protocol(v) => v,
                        _ => PROTOCOL_VERSION,
                    },
                    worker: (!matches!(form, Form::NoWorker)).then_some(worker),
                };
                self.register(req).await?;
            }
            Op::Heartbeat { who, cred, state, protocol } => {
                let (_, worker_id, session_secret) = self.creds(who, cred);
                let req = pb::HeartbeatRequest {
                    protocol_version: protocol,
                    worker_id,
                    state,
                    session_secret,
                };
                let r = self
                    .worker_call(format!("{op:?}"), cred, false, svc.heartbeat(Request::new(req)))
                    .await?;
                if let Ok(r) = r {
                    self.check_assignment(r.assignment.as_ref())?;
                }
            }
            Op::Goodbye { who, cred, error } => {
                let (_, worker_id, session_secret) = self.creds(who, cred);
                let req = pb::GoodbyeRequest {
                    worker_id,
                    reason: "property test".into(),
                    error: error.unwrap_or_default(),
                    session_secret,
                };
                // Refused or not: what the call leaves is checked.
                let _ = self
                    .worker_call(format!("{op:?}"), cred, false, svc.goodbye(Request::new(req)))
                    .await?;
            }
            Op::GetWork { who, cred, ready_for, generation, checkpointed } => {
                let (w, worker_id, session_secret) = self.creds(who, cred);
                let weights = w.and_then(|i| self.workers[i].weights).unwrap_or(self.last.step);
                let req = pb::GetWorkRequest {
                    worker_id,
                    iteration: ready_for.map(|n| resolve(n, weights)),
                    generation: resolve(generation, self.generation_of(w)),
                    checkpointed_step: resolve(
                        checkpointed,
                        w.map_or(0, |i| self.workers[i].checkpointed),
                    ),
                    session_secret,
                };
                let r = self
                    .worker_call(format!("{op:?}"), cred, true, svc.get_work(Request::new(req)))
                    .await?;
                if let (Ok(work), Some(i)) = (r, w) {
                    self.check_work(&work)?;
                    // The worker holds these items now; a later report may quote them.
                    self.workers[i].items = work.items;
                }
            }
            Op::ReportRewards { who, cred, iteration, generation, rewards } => {
                let (w, worker_id, session_secret) = self.creds(who, cred);
                let current = self.iteration_of(w);
                let items = w.map(|i| self.workers[i].items.clone()).unwrap_or_default();
                let rewards = match rewards {
                    Rewards::Mine(base) => rewarded(&items, |i| base + f64::from(i.member_index)),
                    Rewards::NonFinite(v) => rewarded(&items[..items.len().min(1)], |_| v),
                    Rewards::Failed => items
                        .first()
                        .map(|i| pb::TrajectoryReward {
                            item: Some(*i),
                            rewards: vec![],
                            error: "reward model failed".into(),
                        })
                        .into_iter()
                        .collect(),
                    Rewards::Count(n) => rewarded(&items, |_| 0.5)
                        .into_iter()
                        .map(|r| pb::TrajectoryReward { rewards: vec![0.5; n], ..r })
                        .collect(),
                    Rewards::Foreign(group) => {
                        let item = pb::WorkItem {
                            iteration: current,
                            group_id: group,
                            ..Default::default()
                        };
                        rewarded(&[item], |_| 1.0)
                    }
                    Rewards::NoItem => {
                        vec![pb::TrajectoryReward {
                            item: None,
                            rewards: vec![1.0],
                            error: String::new(),
                        }]
                    }
                    Rewards::Nothing => vec![],
                };
                let req = pb::ReportRewardsRequest {
                    worker_id,
                    iteration: resolve(iteration, current),
                    rewards,
                    generation: resolve(generation, self.generation_of(w)),
                    session_secret,
                };
                let _ = self
                    .worker_call(
                        format!("{op:?}"),
                        cred,
                        false,
                        svc.report_rewards(Request::new(req)),
                    )
                    .await?;
            }
            Op::GetAdvantages { who, cred, iteration, generation } => {
                let (w, worker_id, session_secret) = self.creds(who, cred);
                let req = pb::GetAdvantagesRequest {
                    worker_id: worker_id.clone(),
                    iteration: resolve(iteration, self.iteration_of(w)),
                    generation: resolve(generation, self.generation_of(w)),
                    session_secret,
                };
                let generation = req.generation;
                let r = self
                    .worker_call(
                        format!("{op:?}"),
                        cred,
                        true,
                        svc.get_advantages(Request::new(req)),
                    )
                    .await?;
                if let Ok(a) = r {
                    self.advantages_given(&worker_id, generation, &a)?;
                }
            }
            Op::ReportStepMetrics {
                who,
                cred,
                iteration,
                generation,
                loss,
                fingerprint,
                timings,
            } => {
                let (w, worker_id, session_secret) = self.creds(who, cred);
                let iteration = resolve(iteration, self.iteration_of(w));
                let fingerprint = resolve(fingerprint, iteration + 1) as f64;
                let req = pb::ReportStepMetricsRequest {
                    worker_id,
                    metrics: Some(metrics(iteration, loss, fingerprint, timings)),
                    generation: resolve(generation, self.generation_of(w)),
                    session_secret,
                };
                let r = self
                    .worker_call(
                        format!("{op:?}"),
                        cred,
                        false,
                        svc.report_step_metrics(Request::new(req)),
                    )
                    .await?;
                if let Ok(r) = r {
                    check_trainer_state(&self.at, &r)?;
                }
            }
            Op::Reform { who, cred, generation } => {
                let (w, worker_id, session_secret) = self.creds(who, cred);
                let req = pb::ReformWorldRequest {
                    worker_id,
                    generation: resolve(generation, self.generation_of(w)),
                    reason: "property test".into(),
                    session_secret,
                };
                let r = self
                    .worker_call(
                        format!("{op:?}"),
                        cred,
                        false,
                        svc.reform_world(Request::new(req)),
                    )
                    .await?;
                if let Ok(r) = r {
                    prop_assert_eq!(r.generation, self.last.generation, "{}", self.at);
                }
            }
            Op::Stop(job) => {
                let req = pb::StopJobRequest {
                    job_id: self.job_id(&job),
                    reason: "property test".into(),
                };
                let r =
                    self.call(format!("{op:?}"), false, svc.stop_job(Request::new(req))).await?;
                self.check(r.is_err()).await?;
                if let Ok(r) = r {
                    let (at, max) = (r.stop_step, u64::from(MAX_TRAIN_STEPS));
                    prop_assert!(at >= self.last.step && at <= max, "{}: {}", self.at, at);
                    prop_assert!(same(&r.status, &Some(self.last.clone())), "{}", self.at);
                }
            }
            Op::Cancel(job) => {
                let req = pb::CancelJobRequest {
                    job_id: self.job_id(&job),
                    reason: "property test".into(),
                };
                let r =
                    self.call(format!("{op:?}"), false, svc.cancel_job(Request::new(req))).await?;
                self.check(r.is_err()).await?;
                if let Ok(r) = r {
                    prop_assert_eq!(job_state(&self.last), JobState::Cancelled, "{}", self.at);
                    prop_assert!(same(&r.status, &Some(self.last.clone())), "{}", self.at);
                }
            }
            Op::Status(job, history_limit) => {
                let ours = !matches!(job, JobRef::Other(_));
                let req = pb::GetJobStatusRequest { job_id: self.job_id(&job), history_limit };
                let r = self
                    .call(format!("{op:?}"), false, svc.get_job_status(Request::new(req)))
                    .await?;
                self.check(true).await?;
                prop_assert!(r.is_ok() || !ours, "{}: {:?}", self.at, r);
                if let (Ok(r), true) = (r, ours) {
                    let s = r.status.expect("a status");
                    let shown = if history_limit == 0 {
                        self.last.step
                    } else {
                        self.last.step.min(history_limit.into())
                    };
                    prop_assert_eq!(s.history.len() as u64, shown, "{}", self.at);
                    prop_assert!(
                        same(
                            &pb::JobStatus { history: vec![], ..s },
                            &pb::JobStatus { history: vec![], ..self.last.clone() }
                        ),
                        "{}",
                        self.at
                    );
                }
            }
            Op::ListJobs => {
                let r = self
                    .call(
                        format!("{op:?}"),
                        false,
                        svc.list_jobs(Request::new(pb::ListJobsRequest {})),
                    )
                    .await?;
                self.check(true).await?;
                let jobs =
                    r.map_err(|e| TestCaseError::fail(format!("ListJobs failed: {e:?}")))?.jobs;
                // Ours, and those of coordinators before a restart, which have ended.
                let ours: Vec<_> = jobs.iter().filter(|j| j.job_id == self.last.job_id).collect();
                prop_assert_eq!(ours.len(), 1, "{}: {:?}", self.at, jobs);
                prop_assert_eq!((ours[0].state, ours[0].step), (self.last.state, self.last.step));
                let ended = |j: &pb::JobSummary| {
                    JobState::try_from(j.state()).is_ok_and(JobState::is_terminal)
                };
                prop_assert!(
                    jobs.iter().all(|j| j.job_id == self.last.job_id || ended(j)),
                    "{}: {:?}",
                    self.at,
                    jobs
                );
            }
            Op::Watch(job) => {
                let ours = !matches!(job, JobRef::Other(_));
                let req = pb::WatchJobRequest { job_id: self.job_id(&job), history_limit: 0 };
                let r =
                    self.call(format!("{op:?}"), false, svc.watch_job(Request::new(req))).await?;
                prop_assert!(r.is_ok() || !ours, "{}: {:?}", self.at, r.err());
                if let Ok(mut stream) = r {
                    // The first item is the status now; the stream ends with the job.
                    let Ok(first) = tokio::time::timeout(HANG, stream.next()).await else {
                        return Err(TestCaseError::fail(format!("{}: no first status", self.at)));
                    };
                    let first = first.map(|r| r.map(|r| r.status));
                    prop_assert!(
                        matches!(&first, Some(Ok(Some(s))) if same(s, &self.last)),
                        "{}: first {:?}",
                        self.at,
                        first
                    );
                }
                self.check(true).await?;
            }
            Op::Expire { ms, beating } => {
                tokio::time::advance(Duration::from_millis(ms)).await;
                for i in (0..self.workers.len()).filter(|_| beating) {
                    let w = &self.workers[i];
                    if !(w.gone || w.exited) {
                        if let Err(s) = self.heartbeat(i).await? {
                            self.workers[i].react(&s);
                        }
                    }
                }
                self.at = format!("{op:?}");
                let lost = self.state.expire(tokio::time::Instant::now());
                prop_assert!(lost.is_ok(), "{}: {:?}", self.at, lost);
                self.check(false).await?;
            }
            Op::Step(who) => match self.workers.len() {
                0 => self.round().await?,
                n => self.step(who.index(n)).await?,
            },
            Op::Round => self.round().await?,
            Op::Restart => self.restart().await?,
        }
        Ok(())
    }

    fn job_id(&self, job: &JobRef) -> String {
        match job {
            JobRef::This => self.last.job_id.clone(),
            JobRef::Default => String::new(),
            JobRef::Other(id) => id.clone(),
        }
    }

    /// Drops the coordinator and starts another on its database: the job goes on from its
    /// checkpoint, every worker to register again; an ended job stays as it ended, and a new
    /// one starts.
    async fn restart(&mut self) -> Result<(), TestCaseError> {
        self.at = "a restart".into();
        let before = self.last.clone();
        let state = CoordinatorState::open(self.settings.clone());
        prop_assert!(state.is_ok(), "the database does not open again: {:?}", state.err());
        self.state = state.unwrap();
        self.svc = CoordinatorService::new(self.state.clone(), self.authenticated);
        let after = self.status().await?;
        prop_assert_eq!(job_state(&after), JobState::WaitingForWorkers);
        prop_assert!(after.workers.iter().all(|w| !live_state(w.state())), "{:?}", after.workers);
        if job_state(&before).is_terminal() {
            prop_assert_ne!(&after.job_id, &before.job_id, "an ended job is not resumed");
            prop_assert_eq!((after.step, after.generation), (0, 0));
            let old = self.db.job(&before.job_id).expect("the old job reads back");
            let old = old.map(|j| (j.state, j.step, j.generation));
            prop_assert_eq!(old, Some((job_state(&before), before.step, before.generation)));
        } else {
            prop_assert_eq!(&after.job_id, &before.job_id, "the job goes on");
            prop_assert_eq!(
                (after.step, after.checkpoint_step, after.generation),
                (before.checkpoint_step, before.checkpoint_step, before.generation)
            );
        }
        // The sessions ended with the coordinator; what it knew of the iterations too.
        self.advantaged.clear();
        self.last = after;
        self.check(true).await
    }

    /// Registers a worker; a worker admitted is driven from then on. Returns whether it was.
    async fn register(&mut self, req: pb::RegisterWorkerRequest) -> Result<bool, TestCaseError> {
        let slot = req.worker.as_ref().map(|w| (w.node_rank, w.local_rank));
        let svc = self.svc.clone();
        let what =
            format!("RegisterWorker {slot:?} {:?}", req.worker.as_ref().map(|w| (&w.host, w.pid)));
        let r = self.call(what, false, svc.register_worker(Request::new(req))).await?;
        self.secrets.extend(r.as_ref().ok().map(|r| r.session_secret.clone()));
        // Refused, it changes nothing: no worker process here is ever gone, so no refusal
        // frees a slot on the way.
        self.check(r.is_err()).await?;
        let Ok(r) = r else { return Ok(false) };
        prop_assert_eq!(&r.job_id, &self.last.job_id, "{}", self.at);
        prop_assert!(!r.worker_id.is_empty() && r.session_secret.len() >= 32, "{}", self.at);
        prop_assert!(
            self.workers.iter().all(|w| w.id != r.worker_id && w.secret != r.session_secret),
            "{}: a worker id or session secret handed out twice",
            self.at
        );
        self.check_assignment(r.assignment.as_ref())?;
        let generation = r.assignment.map(|a| a.generation);
        self.workers.push(Worker {
            slot: slot.expect("admitted with a slot"),
            id: r.worker_id,
            secret: r.session_secret,
            gone: false,
            exited: false,
            generation,
            weights: Some(0),
            checkpointed: 0,
            items: vec![],
            phase: if generation.is_some() { Phase::Work } else { Phase::Join },
        });
        Ok(true)
    }

    /// Advantages are finite and clamped, and refill work comes alone. Notes which rank got
    /// the advantages of which iteration (of which generation): only such a rank can train it.
    fn advantages_given(
        &mut self,
        worker_id: &str,
        generation: u64,
        a: &pb::GetAdvantagesResponse,
    ) -> Result<(), TestCaseError> {
        let at = &self.at;
        prop_assert!(a.refill.is_empty() || a.advantages.is_empty(), "{}: {:?}", at, a);
        for t in &a.advantages {
            prop_assert!(
                t.advantages.iter().all(|v| v.is_finite() && v.abs() <= ADV_CLIP_MAX),
                "{}: advantages {:?} of {:?}",
                at,
                t.advantages,
                t.item
            );
        }
        let rank = self.last.workers.iter().find(|w| w.worker_id == worker_id).and_then(|w| w.rank);
        if let (Some(rank), true) = (rank, a.refill.is_empty()) {
            self.advantaged.insert((generation, a.iteration, rank));
        }
        Ok(())
    }

    fn check_assignment(&self, a: Option<&pb::RankAssignment>) -> Result<(), TestCaseError> {
        if let Some(a) = a {
            prop_assert_eq!(job_state(&self.last), JobState::Running, "{}: assigned", self.at);
            prop_assert_eq!(
                (a.world_size, a.generation),
                (self.world, self.last.generation),
                "{}",
                self.at
            );
            prop_assert!(a.rank < self.world, "{}: rank {}", self.at, a.rank);
        }
        Ok(())
    }

    fn check_work(&self, w: &pb::GetWorkResponse) -> Result<(), TestCaseError> {
        let at = &self.at;
        if w.done {
            prop_assert!(
                w.items.is_empty() && w.iteration <= u64::from(MAX_TRAIN_STEPS),
                "{}: {:?}",
                at,
                w
            );
        } else {
            prop_assert_eq!(w.iteration, self.last.step, "{}: work of another iteration", at);
            prop_assert_eq!(w.items.len() as u32, NUM_GENERATIONS, "{}", at);
            prop_assert!(w.items.iter().all(|i| i.iteration == w.iteration), "{}: {:?}", at, w);
            if let Some(r) = &w.restore {
                prop_assert_eq!(r.step, self.last.step, "{}", at);
                prop_assert_eq!(r.checkpoint_dir.is_empty(), r.step == 0, "{}: {:?}", at, r);
            }
        }
        Ok(())
    }

    /// The next call of well-behaved worker `i`, from what the coordinator told it.
    async fn step(&mut self, i: usize) -> Result<(), TestCaseError> {
        let svc = self.svc.clone();
        let w = &self.workers[i];
        if w.exited {
            return Ok(());
        }
        if w.gone {
            return self.rejoin(i).await;
        }
        let (worker_id, session_secret) = (w.id.clone(), w.secret.clone());
        let generation = w.generation.unwrap_or_default();
        let what = format!("worker {i} {:?} in {:?}", w.slot, w.phase);
        let outcome = match w.phase {
            Phase::Join => {
                let r = self.heartbeat(i).await?;
                r.map(|r| {
                    let w = &mut self.workers[i];
                    if JobState::try_from(r.job_state()).is_ok_and(JobState::is_terminal) {
                        w.phase = Phase::Done;
                    } else if let Some(a) = r.assignment {
                        // A new assignment starts the worker's loop over (as the real driver's
                        // `iterate`), with no checkpoint of its own yet.
                        w.generation = Some(a.generation);
                        w.checkpointed = 0;
                        w.phase = Phase::Work;
                    }
                })
            }
            Phase::Work => {
                let req = pb::GetWorkRequest {
                    worker_id,
                    iteration: w.weights,
                    generation,
                    checkpointed_step: w.checkpointed,
                    session_secret,
                };
                let r = self
                    .worker_call(what, Cred::Real, true, svc.get_work(Request::new(req)))
                    .await?;
                if let Ok(work) = &r {
                    self.check_work(work)?;
                }
                r.map(|work| {
                    let w = &mut self.workers[i];
                    if work.done {
                        w.phase = Phase::Done;
                        return;
                    }
                    if let Some(r) = work.restore {
                        w.weights = Some(r.step);
                    }
                    w.items = work.items;
                    w.phase = Phase::Rewards(work.iteration);
                })
            }
            Phase::Rewards(iteration) => {
                // Distinct rewards within a group, so its std is not zero.
                let rewards =
                    rewarded(&w.items, |i| f64::from(i.member_index) + 0.25 * i.group_id as f64);
                let req = pb::ReportRewardsRequest {
                    worker_id,
                    iteration,
                    rewards,
                    generation,
                    session_secret,
                };
                let r = self
                    .worker_call(what, Cred::Real, false, svc.report_rewards(Request::new(req)))
                    .await?;
                r.map(|_| self.workers[i].phase = Phase::Advantages(iteration))
            }
            Phase::Advantages(iteration) => {
                let req = pb::GetAdvantagesRequest {
                    worker_id: worker_id.clone(),
                    iteration,
                    generation,
                    session_secret,
                };
                let r = self
                    .worker_call(what, Cred::Real, true, svc.get_advantages(Request::new(req)))
                    .await?;
                if let Ok(a) = &r {
                    self.advantages_given(&worker_id, generation, a)?;
                }
                r.map(|a| {
                    let w = &mut self.workers[i];
                    if a.refill.is_empty() {
                        w.phase = Phase::Train(iteration);
                    } else {
                        w.items = a.refill;
                        w.phase = Phase::Rewards(iteration);
                    }
                })
            }
            Phase::Train(iteration) => {
                // Trained: the weights are those of the next step whatever the report meets.
                self.workers[i].weights = Some(iteration + 1);
                let m = metrics(iteration, 0.1, (iteration + 1) as f64, true);
                let req = pb::ReportStepMetricsRequest {
                    worker_id,
                    metrics: Some(m),
                    generation,
                    session_secret,
                };
                let r = self
                    .worker_call(
                        what,
                        Cred::Real,
                        false,
                        svc.report_step_metrics(Request::new(req)),
                    )
                    .await?;
                if let Ok(r) = &r {
                    check_trainer_state(&self.at, r)?;
                }
                r.map(|r| {
                    let w = &mut self.workers[i];
                    if r.checkpoint {
                        w.checkpointed = iteration + 1;
                    }
                    w.phase = Phase::Work;
                })
            }
            Phase::Done => {
                let req = pb::GoodbyeRequest {
                    worker_id,
                    reason: "job completed".into(),
                    error: String::new(),
                    session_secret,
                };
                // The process exits whatever the answer.
                let _ = self
                    .worker_call(what, Cred::Real, false, svc.goodbye(Request::new(req)))
                    .await?;
                self.workers[i].exited = true;
                Ok(())
            }
        };
        if let Err(s) = outcome {
            self.workers[i].react(&s);
        }
        Ok(())
    }

    /// Worker `i`'s heartbeat, with its own credentials.
    async fn heartbeat(
        &mut self,
        i: usize,
    ) -> Result<Result<pb::HeartbeatResponse, Status>, TestCaseError> {
        let w = &self.workers[i];
        let what = format!("worker {i} {:?} heartbeat in {:?}", w.slot, w.phase);
        let req = pb::HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: w.id.clone(),
            state: pb::WorkerState::Running as i32,
            session_secret: w.secret.clone(),
        };
        let svc = self.svc.clone();
        let r = self.worker_call(what, Cred::Real, false, svc.heartbeat(Request::new(req))).await?;
        if let Ok(r) = &r {
            self.check_assignment(r.assignment.as_ref())?;
        }
        Ok(r)
    }

    /// A worker whose registration ended registers again in its slot, keeping its weights;
    /// refused, it exits.
    async fn rejoin(&mut self, i: usize) -> Result<(), TestCaseError> {
        let (node_rank, local_rank) = self.workers[i].slot;
        if !self.register(good_registration(node_rank, local_rank)).await? {
            self.workers[i].exited = true;
            return Ok(());
        }
        // The same process: the new registration takes over its driver state.
        let fresh = self.workers.pop().expect("just admitted");
        let w = &mut self.workers[i];
        w.id = fresh.id;
        w.secret = fresh.secret;
        w.gone = false;
        w.generation = fresh.generation;
        w.checkpointed = 0;
        w.phase = fresh.phase;
        Ok(())
    }

    /// Every worker makes its next call; a slot without a worker gets one while the job runs.
    async fn round(&mut self) -> Result<(), TestCaseError> {
        for i in 0..self.workers.len() {
            self.step(i).await?;
        }
        for rank in 0..self.world {
            // The slot of the rank, where slots are ranks; otherwise one of the first slots.
            let per_node = self.settings.topology.npus_per_node.unwrap_or(self.world);
            let (node_rank, local_rank) = (rank / per_node, rank % per_node);
            let taken = self.workers.iter().any(|w| w.slot == (node_rank, local_rank) && !w.exited);
            if !taken && !job_state(&self.last).is_terminal() {
                self.register(good_registration(node_rank, local_rank)).await?;
            }
        }
        Ok(())
    }
}

fn live_state(s: pb::WorkerState) -> bool {
    matches!(s, pb::WorkerState::Waiting | pb::WorkerState::Running | pb::WorkerState::Draining)
}

fn good_registration(node_rank: u32, local_rank: u32) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        protocol_version: PROTOCOL_VERSION,
        worker: Some(pb::WorkerInfo {
            host: format!("node{node_rank}"),
            node_rank,
            local_rank,
            device: Some(pb::DeviceInfo { device: "cpu".into(), description: "test".into() }),
            pid: u32::MAX,
        }),
    }
}

/// The state rank 0 writes into a checkpoint reads back, with finite rewards.
fn check_trainer_state(at: &str, r: &pb::ReportStepMetricsResponse) -> Result<(), TestCaseError> {
    prop_assert!(
        !r.checkpoint || !r.trainer_state_json.is_empty(),
        "{}: a checkpoint without a state",
        at
    );
    if !r.trainer_state_json.is_empty() {
        let state: Result<dancegrpo_coordinator::outputs::TrainerState, _> =
            serde_json::from_str(&r.trainer_state_json);
        prop_assert!(
            state.as_ref().is_ok_and(|s| s.reward_history.iter().flatten().all(|v| v.is_finite())),
            "{}: trainer state {:?}: {}",
            at,
            state.err(),
            r.trainer_state_json
        );
    }
    Ok(())
}

struct Case {
    /// NNODES x NPUS_PER_NODE (one node or one worker per node), whose slots are the ranks; or
    /// a world size alone, where any slot may register and the ranks follow the slots' order.
    topology: Topology,
    policy: NonFinitePolicy,
    authenticated: bool,
    ops: Vec<Op>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:?} {:?} authenticated {}:", self.topology, self.policy, self.authenticated)?;
        for (n, op) in self.ops.iter().enumerate() {
            writeln!(f, "  {n:3} {op:?}")?;
        }
        Ok(())
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1..=3u32, 0..3).prop_map(|(world, layout)| match layout {
            0 => Topology::new(1, world, None).unwrap(),
            1 => Topology::new(world, 1, None).unwrap(),
            _ => Topology::new(1, 1, Some(world)).unwrap(),
        }),
        prop_oneof![Just(NonFinitePolicy::Fail), Just(NonFinitePolicy::DropGroup)],
        prop::bool::weighted(0.9),
        prop::collection::vec(op(), 1..100),
    )
        .prop_map(|(topology, policy, authenticated, ops)| Case {
            topology,
            policy,
            authenticated,
            ops,
        })
}

async fn run(case: &Case, st: &CoordinatorSettings) -> Result<(), TestCaseError> {
    let state = CoordinatorState::open(st.clone()).expect("a new job opens");
    let mut h = Harness {
        svc: CoordinatorService::new(state.clone(), case.authenticated),
        state,
        settings: st.clone(),
        authenticated: case.authenticated,
        db: Db::open(&st.db_path).expect("a second connection"),
        world: case.topology.world_size,
        out: PathBuf::from(&st.job.output_dir),
        workers: vec![],
        secrets: vec![],
        last: pb::JobStatus::default(),
        at: "the start".into(),
        advantaged: HashSet::new(),
    };
    h.last = h.status().await?;
    for (n, op) in case.ops.iter().enumerate() {
        h.apply(op).await.map_err(|e| TestCaseError::fail(format!("op {n}: {e}")))?;
    }
    // Whatever the calls left, a coordinator started on it reads it back.
    h.apply(&Op::Restart).await.map_err(|e| TestCaseError::fail(format!("at the end: {e}")))
}

proptest! {
    // PROPTEST_CASES=5000 searches longer.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(128),
        max_shrink_iters: 1024,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_rpc_sequences_keep_the_invariants(case in case()) {
        let dir = tempfile::tempdir().unwrap();
        let st = settings(dir.path(), &case);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(&case, &st))?;
    }
}
