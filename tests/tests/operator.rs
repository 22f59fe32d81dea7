//! The operator's `stop` and `cancel`, through the CLI against real workers: a stopped job
//! ends with its iteration in flight checkpointed and resumes from it; a cancelled one ends at
//! once; neither works without the job token, on another job, or on a job that has ended.

use std::process::Output;
use std::time::Duration;

use dancegrpo_e2e::{Cluster, Proc, TEST_TOKEN, await_condition, job_status_with};
use dancegrpo_proto::pb;

const COORD: &[&str] = &["--world-size", "2", "--heartbeat-interval-ms", "200"];

fn failed_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(needle), "wanted {needle:?}, got: {err}");
}

fn exits_zero(c: &Cluster, ws: &mut [Proc], limit: Duration) {
    for (rank, w) in ws.iter_mut().enumerate() {
        let s = w.wait_timeout(limit);
        assert!(s.is_some_and(|s| s.success()), "rank {rank} ({s:?}):\n{}", c.logs());
    }
}

async fn status(addr: &str) -> pb::JobStatus {
    job_status_with(addr, Some(TEST_TOKEN)).await.unwrap()
}

/// Waits until the job has trained at least one step.
async fn trained_a_step(addr: &str) {
    await_condition(Duration::from_secs(120), "a trained step", || async {
        (status(addr).await.step >= 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_checkpoints_the_iteration_in_flight_ends_stopped_and_resumes_from_it() {
    let c = Cluster::secured("job_name = \"operator-stop\"\n");
    let (coord, addr) = c.coordinator(COORD);
    let mut ws = vec![c.worker(&addr, 0, 0, &[]), c.worker(&addr, 0, 1, &[])];
    trained_a_step(&addr).await;

    let out = c.cli(&["stop", "--addr", &addr, "--reason", "node maintenance", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = answer["stop_step"].as_u64().expect("stop_step");
    assert!(at >= 1, "{answer}");
    exits_zero(&c, &mut ws, Duration::from_secs(120));

    let s = status(&addr).await;
    assert_eq!(s.state, pb::JobState::Stopped as i32, "{}", s.message);
    assert_eq!((s.step, s.checkpoint_step), (at, at), "{}", s.message);
    assert!(s.message.contains("operator: node maintenance"), "{}", s.message);
    let ck = c.path("out").join(format!("checkpoint-{at}"));
    assert!(ck.join("trainer_state.json").is_file(), "{} is not written", ck.display());
    let log = std::fs::read_to_string(c.path("out").join("reward.txt")).unwrap();
    assert_eq!(log.lines().count() as u64, at, "one reward line per trained step:\n{log}");

    // The message's promise: a job resumed from "latest" goes on from the stop.
    drop(coord);
    // Top-level keys go first: the file ends in a `[[rewards]]` table.
    let resumed = format!(
        "resume_from_checkpoint = \"latest\"\nmax_train_steps = {}\n{}",
        at + 1,
        std::fs::read_to_string(c.path("job.toml"))
            .unwrap()
            .replace("max_train_steps = 100000\n", "")
    );
    std::fs::write(c.path("job.toml"), resumed).unwrap();
    let (_coord, addr) = c.coordinator(COORD);
    let mut ws = vec![c.worker(&addr, 0, 0, &[]), c.worker(&addr, 0, 1, &[])];
    exits_zero(&c, &mut ws, Duration::from_secs(120));
    let s = status(&addr).await;
    assert_eq!((s.state, s.step), (pb::JobState::Completed as i32, at + 1), "{}", s.message);
    // The history up to the stop comes from the checkpoint; one step was trained after it.
    let its: Vec<u64> = s.history.iter().map(|h| h.iteration).collect();
    assert_eq!(its, (1..=at + 1).collect::<Vec<_>>());
    let trained = s.history.iter().filter(|h| h.metrics.is_some()).count();
    assert_eq!(trained, 1, "{:?}", s.history);
    let log = std::fs::read_to_string(c.path("out").join("reward.txt")).unwrap();
    assert_eq!(log.lines().count() as u64, at + 1, "the reward log goes on:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_ends_the_job_at_once_the_workers_leave_and_it_cannot_be_stopped_after() {
    let c = Cluster::secured("job_name = \"operator-cancel\"\n");
    let (_coord, addr) = c.coordinator(COORD);
    let mut ws = vec![c.worker(&addr, 0, 0, &[]), c.worker(&addr, 0, 1, &[])];
    trained_a_step(&addr).await;

    // Another job's id is refused, and nothing changes.
    let out = c.cli(&["cancel", "--addr", &addr, "--job", "not-this-job"]);
    failed_with(&out, "job not-this-job is not the job this coordinator runs");
    assert_eq!(status(&addr).await.state, pb::JobState::Running as i32);

    let out = c.cli(&["cancel", "--addr", &addr, "--reason", "bad learning rate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&addr).await;
    assert_eq!(s.state, pb::JobState::Cancelled as i32, "at once: {}", s.message);
    assert!(s.message.contains("operator: bad learning rate"), "{}", s.message);
    exits_zero(&c, &mut ws, Duration::from_secs(60));

    for op in ["stop", "cancel"] {
        let out = c.cli(&[op, "--addr", &addr]);
        failed_with(&out, "has already ended (cancelled)");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_job_token_nobody_can_stop_or_cancel() {
    let c = Cluster::new("job_name = \"operator-open\"\n");
    let (_coord, addr) = c.coordinator(&["--world-size", "1"]);
    for op in ["stop", "cancel"] {
        let out = c.cli(&[op, "--addr", &addr]);
        failed_with(&out, "needs the job token, and this coordinator runs without one");
    }
    let s = dancegrpo_e2e::job_status(&addr).await.unwrap();
    assert_eq!(s.state, pb::JobState::WaitingForWorkers as i32, "{}", s.message);

    // A secured coordinator refuses a wrong token before anything else.
    let c = Cluster::secured("job_name = \"operator-wrong-token\"\n");
    let (_coord, addr) = c.coordinator(&["--world-size", "1"]);
    std::fs::write(c.path("token"), "a-wrong-token-0123456789\n").unwrap();
    let out = c.cli(&["stop", "--addr", &addr]);
    failed_with(&out, "wrong auth token");
}
