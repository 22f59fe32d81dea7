//! The state machine driven through its public calls, as the service drives it.

use dancegrpo_proto::{
    NonFinitePolicy, ShardingStrategy, StepMetrics, TrajectoryRewards, WorkerInfo, WorkerState,
};

use super::*;
use crate::config::Topology;
use crate::testing::{info, settings};

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
    let watched =
        s.register(WorkerInfo { pid: child.id(), ..info(0) }, Some("127.0.0.1".into())).unwrap();
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
        denied(s.report_step_metrics(&forged, 1, metrics()).await.unwrap_err());
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
    roll_out_and_score_at(s, ids, 0).await;
}

/// [`roll_out_and_score`] of iteration `iteration` (0-based) of generation 1.
async fn roll_out_and_score_at(s: &CoordinatorState, ids: &[&Caller], iteration: u64) {
    let mut items = Vec::new();
    for id in ids {
        let work = s.get_work(id, Some(iteration), 1, 0).await.unwrap();
        assert_eq!(work.iteration, iteration);
        items.push(work.items);
    }
    for (id, items) in ids.iter().zip(items) {
        let rewards = items
            .iter()
            .map(|it| TrajectoryRewards { item: *it, outcome: Ok(vec![it.member_index as f64]) });
        s.report_rewards(id, iteration, 1, rewards.collect()).unwrap();
    }
    for id in ids {
        s.get_advantages(id, iteration, 1).await.unwrap();
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
    assert!(s.report_step_metrics(&a, 1, metrics()).await.unwrap().0, "rank 0 checkpoints");
    let (s0, a0) = (s.clone(), a.clone());
    let rank0 = tokio::spawn(async move { s0.get_work(&a0, Some(1), 1, 1).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.snapshot(None).unwrap().job.checkpoint_step, 0, "step 1 is not recorded yet");
    // Once it is, the same ask records the checkpoint.
    s.report_step_metrics(&b, 1, metrics()).await.unwrap();
    assert!(rank0.await.unwrap().unwrap().done);
    assert_eq!(s.snapshot(None).unwrap().job.checkpoint_step, 1);
}

#[tokio::test]
async fn outputs_that_cannot_be_written_fail_the_job_and_nothing_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (s, a, b) = last_iteration_world(dir.path());
    roll_out_and_score(&s, &[&a, &b]).await;
    // The output folder is gone, and a file is in its place.
    let out = dir.path().join("out");
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::write(&out, "not a folder").unwrap();
    s.report_step_metrics(&a, 1, metrics()).await.unwrap();
    let e = s.report_step_metrics(&b, 1, metrics()).await.unwrap_err();
    assert!(matches!(e, Error::JobFailed(_)), "{e}");
    let snap = s.snapshot(None).unwrap();
    assert_eq!(snap.job.state, JobState::Failed);
    assert!(
        snap.job.message.contains("the outputs of iteration 1 cannot be written"),
        "{}",
        snap.job.message
    );
    assert_eq!((snap.job.step, snap.history.len()), (0, 0), "not recorded without its files");
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
        let r = s.report_step_metrics(&a, 1, bad).await;
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
                let e = s.report_step_metrics(&b, 1, metrics()).await.unwrap_err();
                assert!(matches!(e, Error::JobFailed(_)), "{e}");
            }
            NonFinitePolicy::DropGroup => {
                r.unwrap();
                s.report_step_metrics(&b, 1, metrics()).await.unwrap();
                let job = s.snapshot(None).unwrap().job;
                assert_eq!((job.state, job.step), (JobState::Running, 1), "{}", job.message);
                // What the database and metrics.jsonl hold reads back: NaN, not 0 or null.
                let history = s.snapshot(None).unwrap().history;
                assert_eq!(history.len(), 1);
                let m = crate::outputs::metrics_from_json(&history[0].metrics_json).unwrap();
                assert!(m.loss.is_nan() && m.grad_norm == f64::INFINITY, "{m:?}");
                let jsonl = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
                assert!(jsonl.contains(r#""loss":"NaN""#) && !jsonl.contains("null"), "{jsonl}");
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
        s.report_step_metrics(id, 1, metrics()).await.unwrap();
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
        s.report_step_metrics(id, 1, metrics()).await.unwrap();
    }
    // Both trained iteration 1 (step 1, not checkpointed); rank 1's weights went since
    // (its driver restarted with none): it cannot be handed step 1 alone.
    assert!(!s.get_work(&a, Some(1), 1, 0).await.unwrap().done);
    let e = s.get_work(&b, None, 1, 0).await.unwrap_err();
    assert!(matches!(e, Error::Superseded { requested: 1, current: 2 }), "{e}");
    let job = s.snapshot(None).unwrap().job;
    assert_eq!((job.generation, job.step), (2, 0), "{}", job.message);
    assert!(job.message.contains("rank 1 lost step 1, which has no checkpoint"), "{}", job.message);
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
        s.report_step_metrics(id, 1, metrics()).await.unwrap();
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
async fn the_kept_status_history_follows_each_commit_and_rewind_as_the_database_does() {
    let dir = tempfile::tempdir().unwrap();
    let (s, a, b) = three_step_world(dir.path());
    let from_db = || {
        let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
        db.iterations(s.job_id().as_str()).unwrap()
    };
    assert!(s.snapshot(None).unwrap().history.is_empty(), "read once, and kept");
    roll_out_and_score(&s, &[&a, &b]).await;
    s.report_step_metrics(&a, 1, metrics()).await.unwrap();
    s.report_step_metrics(&b, 1, metrics()).await.unwrap();
    let snap = s.snapshot(None).unwrap();
    assert_eq!(snap.history.len(), 1);
    assert_eq!(snap.history, from_db());
    assert_eq!(s.snapshot_with(None, Some(5)).unwrap().history, from_db());
    assert!(
        s.snapshot_with(None, Some(1)).unwrap().history[0].metrics_json.contains("\"iteration\":1")
    );
    // A failed collective: the world goes back to step 0, and so does the history.
    assert_eq!(s.reform(&a, 1, "collective failed").unwrap(), 2);
    let snap = s.snapshot(None).unwrap();
    assert_eq!((snap.job.step, snap.history.len()), (0, 0));
    assert!(from_db().is_empty());
}

#[tokio::test]
async fn a_repeated_step_report_gets_the_same_answer_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (s, a, b) = last_iteration_world(dir.path());
    roll_out_and_score(&s, &[&a, &b]).await;
    let first = s.report_step_metrics(&a, 1, metrics()).await.unwrap();
    assert!(first.0 && !first.1.is_empty(), "rank 0 checkpoints step 1");
    s.report_step_metrics(&b, 1, metrics()).await.unwrap();
    let before = s.snapshot(None).unwrap();
    assert_eq!(before.job.step, 1, "the iteration is recorded");
    // Rank 0's answer was lost; it asks again after the iteration has completed.
    assert_eq!(s.report_step_metrics(&a, 1, metrics()).await.unwrap(), first);
    assert_eq!(s.report_step_metrics(&b, 1, metrics()).await.unwrap(), (false, String::new()));
    let after = s.snapshot(None).unwrap();
    assert_eq!((after.job.step, after.job.generation), (1, 1), "no rewind, no new world");
    assert_eq!(after.history, before.history, "recorded once");
    let rewards = std::fs::read_to_string(dir.path().join("out/hps_reward.txt")).unwrap();
    assert_eq!(rewards.lines().count(), 1, "{rewards}");
    // Another iteration is not answered from the cache.
    let e = s.report_step_metrics(&a, 1, StepMetrics { iteration: 1, ..metrics() }).await;
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
    assert!(s.report_step_metrics(&a, 1, metrics()).await.unwrap().0, "rank 0 checkpoints");
    assert!(!s.report_step_metrics(&b, 1, metrics()).await.unwrap().0);
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

/// Found by the RPC property test's author: a pending stop was kept in memory only.
#[tokio::test]
async fn a_pending_stop_survives_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (s, a, b) = three_step_world(dir.path());
    roll_out_and_score(&s, &[&a, &b]).await;
    assert_eq!(s.stop(None, "maintenance").unwrap(), 1);
    let st = s.settings().clone();
    drop((s, a, b));
    // The coordinator restarts before step 1 is recorded; the world re-forms from step 0.
    let s = CoordinatorState::open(st).unwrap();
    let a = s.register(info(0), None).unwrap().caller();
    let b = s.register(info(1), None).unwrap().caller();
    let g = s.snapshot(None).unwrap().job.generation;
    for id in [&a, &b] {
        let items = s.get_work(id, None, g, 0).await.unwrap().items;
        let rewards = items
            .iter()
            .map(|it| TrajectoryRewards { item: *it, outcome: Ok(vec![it.member_index as f64]) });
        s.report_rewards(id, 0, g, rewards.collect()).unwrap();
    }
    for id in [&a, &b] {
        s.get_advantages(id, 0, g).await.unwrap();
    }
    assert!(s.report_step_metrics(&a, g, metrics()).await.unwrap().0, "the stop's checkpoint");
    s.report_step_metrics(&b, g, metrics()).await.unwrap();
    assert!(s.get_work(&a, Some(1), g, 1).await.unwrap().done);
    assert!(s.get_work(&b, Some(1), g, 0).await.unwrap().done);
    let job = s.snapshot(None).unwrap().job;
    assert_eq!((job.state, job.step), (JobState::Stopped, 1), "{}", job.message);
    assert!(job.message.contains("operator: maintenance"), "{}", job.message);
}

#[tokio::test]
async fn a_stop_after_rank_0_reported_trains_one_more_iteration_and_never_moves_later() {
    let dir = tempfile::tempdir().unwrap();
    let (s, a, b) = three_step_world(dir.path());
    roll_out_and_score(&s, &[&a, &b]).await;
    // Rank 0 has trained step 1 and written no checkpoint of it: it cannot go back.
    assert!(!s.report_step_metrics(&a, 1, metrics()).await.unwrap().0);
    assert_eq!(s.stop(None, "first").unwrap(), 2);
    s.report_step_metrics(&b, 1, metrics()).await.unwrap();
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

/// A world of two under `fsdp_sharding_strategy = full` with three iterations to do, a
/// checkpoint every `checkpointing_steps`.
fn sharded_world(
    dir: &std::path::Path,
    checkpointing_steps: u32,
) -> (Arc<CoordinatorState>, Caller, Caller) {
    let mut st = settings(dir, 2);
    st.job.max_train_steps = 3;
    st.job.num_generations = 2;
    st.job.checkpointing_steps = checkpointing_steps;
    st.job.fsdp_sharding_strategy = ShardingStrategy::Full;
    let s = CoordinatorState::open(st).unwrap();
    let a = s.register(info(0), None).unwrap().caller();
    let b = s.register(info(1), None).unwrap().caller();
    (s, a, b)
}

#[tokio::test]
async fn under_full_sharding_every_rank_is_told_of_a_due_checkpoint_and_none_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let (s, a, b) = sharded_world(dir.path(), 2);
    let at = |iteration| StepMetrics { iteration, ..metrics() };
    roll_out_and_score(&s, &[&a, &b]).await;
    // Step 1 is not due: neither rank is told, whichever reports first.
    assert_eq!(s.report_step_metrics(&b, 1, at(0)).await.unwrap(), (false, String::new()));
    let (checkpoint, state) = s.report_step_metrics(&a, 1, at(0)).await.unwrap();
    assert!(!checkpoint && !state.is_empty(), "rank 0 still gets the trainer state");
    // Step 2 is: both ranks write it together, rank 0 with the trainer state.
    roll_out_and_score_at(&s, &[&a, &b], 1).await;
    let (checkpoint, state) = s.report_step_metrics(&a, 1, at(1)).await.unwrap();
    assert!(checkpoint && state.contains("\"step\": 2"), "{state}");
    assert_eq!(s.report_step_metrics(&b, 1, at(1)).await.unwrap(), (true, String::new()));
    // Only rank 0's report of the written checkpoint counts.
    assert_eq!(s.get_work(&b, Some(2), 1, 2).await.unwrap().iteration, 2);
    assert_eq!(s.snapshot(None).unwrap().job.checkpoint_step, 0);
    s.get_work(&a, Some(2), 1, 2).await.unwrap();
    assert_eq!(s.snapshot(None).unwrap().job.checkpoint_step, 2);
}

/// Under `full` the checkpoint's write is a collective of every rank: a stop arriving between
/// two ranks' reports of an iteration must not tell one of them to write it and not the other.
#[tokio::test]
async fn under_full_sharding_a_stop_between_two_ranks_reports_changes_neither_answer() {
    for rank_0_first in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, b) = sharded_world(dir.path(), 10);
        let at = |iteration| StepMetrics { iteration, ..metrics() };
        roll_out_and_score(&s, &[&a, &b]).await;
        let (first, second) = if rank_0_first { (&a, &b) } else { (&b, &a) };
        let answer = s.report_step_metrics(first, 1, at(0)).await.unwrap().0;
        assert!(!answer, "step 1 is not due (rank 0 first: {rank_0_first})");
        // Step 1 is answered already: the stop's checkpoint is of the step after it.
        assert_eq!(s.stop(None, "maintenance").unwrap(), 2, "rank 0 first: {rank_0_first}");
        let answer = s.report_step_metrics(second, 1, at(0)).await.unwrap().0;
        assert!(!answer, "the first report's answer (rank 0 first: {rank_0_first})");
        roll_out_and_score_at(&s, &[&a, &b], 1).await;
        for id in [first, second] {
            assert!(s.report_step_metrics(id, 1, at(1)).await.unwrap().0, "the stop's checkpoint");
        }
        assert!(s.get_work(&a, Some(2), 1, 2).await.unwrap().done);
        assert!(s.get_work(&b, Some(2), 1, 0).await.unwrap().done);
        let job = s.snapshot(None).unwrap().job;
        assert_eq!((job.state, job.step, job.checkpoint_step), (JobState::Stopped, 2, 2));
    }
    // Unsharded only rank 0 is told, so rank 1's report decides nothing: a stop after it
    // still checkpoints the iteration in flight, as before.
    let dir = tempfile::tempdir().unwrap();
    let (s, a, b) = three_step_world(dir.path());
    roll_out_and_score(&s, &[&a, &b]).await;
    assert!(!s.report_step_metrics(&b, 1, metrics()).await.unwrap().0);
    assert_eq!(s.stop(None, "maintenance").unwrap(), 1);
    assert!(s.report_step_metrics(&a, 1, metrics()).await.unwrap().0, "rank 0 checkpoints");
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
    let e = s.report_step_metrics(&a, 1, metrics()).await.unwrap_err();
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
    assert_eq!(s.snapshot(None).unwrap().job.message, "coordinator restarted; waiting for workers");
    drop(s);

    let s = CoordinatorState::open(CoordinatorSettings { adopt_config: true, ..changed }).unwrap();
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

/// Found by the RPC property test: a restart may re-form the world with other slots, and a
/// slot's old rank may then be another live worker's.
#[tokio::test]
async fn a_slot_whose_old_rank_is_held_by_a_live_worker_is_not_admitted_to_the_running_world() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = settings(dir.path(), 2);
    // `--world-size` alone: any local rank may join.
    st.topology = Topology::new(1, 1, Some(2)).unwrap();
    {
        let s = CoordinatorState::open(st.clone()).unwrap();
        s.register(info(0), None).unwrap();
        assert_eq!(s.register(info(1), None).unwrap().assignment.unwrap().rank, 1);
    }
    let s = CoordinatorState::open(st).unwrap();
    let a = s.register(info(0), None).unwrap();
    let c = s.register(info(2), None).unwrap();
    assert_eq!(c.assignment.unwrap().rank, 1, "slot 2 holds rank 1 now");
    s.goodbye(&a.caller(), "leaving", None).unwrap();
    // Slot 1 held rank 1 before the restart; rank 1 is slot 2's now, and rank 0 is missing.
    let e = s.register(info(1), None).unwrap_err();
    assert!(e.to_string().contains("its rank 1 is held by a live worker"), "{e}");
    let again = s.register(info(0), None).unwrap();
    assert_eq!(again.assignment.unwrap().rank, 0, "rank 0's own slot takes it back");
    let mut ranks: Vec<u32> = s
        .snapshot(None)
        .unwrap()
        .workers
        .iter()
        .filter(|w| w.state.is_live())
        .filter_map(|w| w.rank)
        .collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1], "one process per rank");
}

/// Found by the RPC property test: metrics before the advantages were recorded as a step with
/// a made-up mean reward.
#[tokio::test]
async fn an_update_reported_before_its_advantages_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = settings(dir.path(), 1);
    st.job.num_generations = 2;
    st.job.non_finite_policy = NonFinitePolicy::Fail;
    let s = CoordinatorState::open(st).unwrap();
    let a = s.register(info(0), None).unwrap().caller();
    let work = s.get_work(&a, Some(0), 1, 0).await.unwrap();
    assert!(!work.items.is_empty());
    // Not even a NaN loss, which fails the job under `fail`, is looked at out of order.
    let bad = StepMetrics { loss: f64::NAN, ..metrics() };
    let e = s.report_step_metrics(&a, 1, bad).await.unwrap_err();
    assert!(e.to_string().contains("before it was given its advantages"), "{e}");
    let snap = s.snapshot(None).unwrap();
    assert_eq!((snap.job.state, snap.job.step, snap.history.len()), (JobState::Running, 0, 0));
    let log = dir.path().join("out/hps_reward.txt");
    assert_eq!(std::fs::read_to_string(log).unwrap_or_default(), "");
}
