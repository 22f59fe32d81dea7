//! Every bad input gets a clear one-line error and a non-zero exit: no panic, no hang.

use std::time::Duration;

use dancegrpo_e2e::{Cluster, await_condition, job_status};
use dancegrpo_proto::pb;

const CONFIG: &str = "job_name = \"bad\"\n";

fn one_line_error(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(needle), "expected {needle:?} in the last line of:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
}

#[test]
fn unknown_and_malformed_config_keys() {
    let c = Cluster::new("num_generation = 4\neta = \"high\"\n");
    let out = c.run_to_end(
        "dancegrpo-coordinator",
        &["serve", "--config", "job.toml", "--listen", "127.0.0.1:0"],
        Duration::from_secs(20),
    );
    one_line_error(&out, "unknown key `num_generation`");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("eta"), "the bad value is reported with the unknown key: {err}");

    std::fs::write(c.path("job.toml"), "num_generations = 1\nh = 100\n").unwrap();
    let out = c.run_to_end(
        "dancegrpo-coordinator",
        &["serve", "--config", "job.toml", "--listen", "127.0.0.1:0"],
        Duration::from_secs(20),
    );
    one_line_error(&out, "num_generations must be >= 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("h must be a positive multiple of 16 (got 100)"),
        "all fields at once: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_a_changed_config_is_refused_naming_the_keys_unless_adopted() {
    let c = Cluster::new(CONFIG);
    let (mut first, addr) = c.coordinator(&["--world-size", "1"]);
    let id = job_status(&addr).await.unwrap().job_id;
    first.signal("KILL");
    first.wait_timeout(Duration::from_secs(10)).expect("killed");
    let changed = ["--set", "clip_range=0.2", "--set", "eta=0.5"];
    let mut args = vec!["serve", "--config", "job.toml", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(&["--db", "state.sqlite", "--world-size", "1"]);
    args.extend_from_slice(&changed);
    let out = c.run_to_end("dancegrpo-coordinator", &args, Duration::from_secs(20));
    one_line_error(&out, "was started with another config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clip_range: 0.0001 -> 0.2; eta: 0.3 -> 0.5")
            && err.contains(&id)
            && err.contains("--adopt-config"),
        "{err}"
    );
    let mut adopt = vec!["--world-size", "1", "--adopt-config"];
    adopt.extend_from_slice(&changed);
    let (_adopted, addr) = c.coordinator(&adopt);
    let s = job_status(&addr).await.unwrap();
    assert_eq!(s.job_id, id, "the same job goes on");
    assert!(s.message.contains("2 config change(s) adopted"), "{}", s.message);
    assert!(s.config_json.contains("\"eta\":0.5"), "{}", s.config_json);
}

#[test]
fn missing_and_damaged_files_and_unknown_rewards_stop_the_coordinator_before_it_starts() {
    let c = Cluster::new(&format!(
        "{CONFIG}pretrained_model_name_or_path = \"no_such_flux\"\n\
         resume_from_checkpoint = \"no_such_checkpoint\"\n\
         [[rewards]]\nname = \"hpsv2\"\nmodel_dir = \"no_such_hps_ckpt\"\n\
         [[rewards]]\nname = \"no_such_reward\"\n"
    ));
    let serve = ["serve", "--config", "job.toml", "--listen", "127.0.0.1:0", "--db", "s.sqlite"];
    let out = c.run_to_end("dancegrpo-coordinator", &serve, Duration::from_secs(20));
    // The unknown reward is a config error: reported on its own line, before any file is read.
    one_line_error(&out, "rewards[1].name: unknown reward `no_such_reward` (known: hpsv2");
    std::fs::write(
        c.path("job.toml"),
        std::fs::read_to_string(c.path("job.toml")).unwrap().replace("no_such_reward", "contrast"),
    )
    .unwrap();
    let out = c.run_to_end("dancegrpo-coordinator", &serve, Duration::from_secs(20));
    one_line_error(&out, "pre-start checks failed, nothing has started");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "rewards[0] (hpsv2) model_dir: no_such_hps_ckpt: HPS model dir does not exist",
        "pretrained_model_name_or_path: no_such_flux: does not exist",
        "resume_from_checkpoint no_such_checkpoint: no trainer_state.json there",
        "--skip-file-checks",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    assert!(!c.path("s.sqlite").exists(), "nothing was started");
}

#[test]
fn port_in_use() {
    let c = Cluster::new(CONFIG);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = c.run_to_end(
        "dancegrpo-coordinator",
        &["serve", "--config", "job.toml", "--listen", &addr, "--db", "s.sqlite"],
        Duration::from_secs(20),
    );
    one_line_error(&out, &format!("cannot listen on {addr}"));
}

#[test]
fn unreachable_coordinator_after_the_retry_window() {
    let c = Cluster::new(CONFIG);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let coord = format!("http://127.0.0.1:{port}");
    let start = std::time::Instant::now();
    let out = c.run_to_end(
        "dancegrpo-worker",
        &["run", "--coordinator", &coord, "--connect-timeout-s", "2"],
        Duration::from_secs(30),
    );
    one_line_error(&out, &format!("coordinator at {coord} unreachable after 2s"));
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_workers_and_duplicate_slots() {
    let c = Cluster::new(CONFIG);
    let (_coord, addr) = c.coordinator(&["--world-size", "2", "--heartbeat-interval-ms", "100"]);
    let coord = format!("http://{addr}");
    let _w0 = c.worker(&addr, 0, 0, &[]);
    // Wait until it is registered, so the duplicate is really a duplicate.
    await_condition(Duration::from_secs(30), "worker registered", || async {
        job_status(&addr).await.ok().filter(|s| s.workers.len() == 1)
    })
    .await;
    let out = c.run_to_end(
        "dancegrpo-worker",
        // A slot still held is waited for (its holder may be this worker's previous process,
        // about to be declared lost), up to the connect timeout; a live holder keeps it.
        &[
            "run",
            "--coordinator",
            &coord,
            "--node-rank",
            "0",
            "--local-rank",
            "0",
            "--connect-timeout-s",
            "2",
        ],
        Duration::from_secs(30),
    );
    one_line_error(&out, "duplicate worker: node_rank 0 local_rank 0 is already taken");
    assert!(String::from_utf8_lossy(&out.stderr).contains("slot still held; retrying"));

    let _w1 = c.worker(&addr, 0, 1, &[]);
    await_condition(Duration::from_secs(30), "world formed", || async {
        job_status(&addr).await.ok().filter(|s| s.state == pb::JobState::Running as i32)
    })
    .await;
    let out = c.run_to_end(
        "dancegrpo-worker",
        &["run", "--coordinator", &coord, "--node-rank", "1", "--local-rank", "0"],
        Duration::from_secs(30),
    );
    one_line_error(&out, "world is full: 2 of 2 workers already registered");
}

#[tokio::test(flavor = "multi_thread")]
async fn another_protocol_version_is_failed_precondition() {
    let c = Cluster::new(CONFIG);
    let (_coord, addr) = c.coordinator(&["--world-size", "1"]);
    let mut client =
        pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await.unwrap();
    let err = client
        .register_worker(pb::RegisterWorkerRequest {
            protocol_version: dancegrpo_proto::PROTOCOL_VERSION + 1,
            worker: Some(pb::WorkerInfo {
                host: "h".into(),
                device: Some(pb::DeviceInfo { device: "cpu".into(), description: String::new() }),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let want = format!(
        "protocol version mismatch: worker speaks v{}",
        dancegrpo_proto::PROTOCOL_VERSION + 1
    );
    assert!(err.message().contains(&want), "{}", err.message());
    // A missing sub-message is INVALID_ARGUMENT, not a crashed handler.
    let err = client
        .register_worker(pb::RegisterWorkerRequest {
            protocol_version: dancegrpo_proto::PROTOCOL_VERSION,
            worker: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
}

#[test]
fn bad_devices_name_the_valid_forms_and_the_missing_feature() {
    let c = Cluster::new(CONFIG);
    let out =
        c.run_to_end("dancegrpo-worker", &["run", "--device", "gpu0"], Duration::from_secs(20));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cpu") && err.contains("cuda:N") && err.contains("npu:N"), "{err}");
    let out = c.run_to_end(
        "dancegrpo-worker",
        &["run", "--device", "npu:0", "--coordinator", "http://127.0.0.1:1"],
        Duration::from_secs(20),
    );
    one_line_error(&out, "needs a build with `--features npu`");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_lost_mid_run_is_a_clean_error_after_the_retry_window() {
    let c = Cluster::new(CONFIG);
    let (mut coord, addr) = c.coordinator(&["--world-size", "2", "--heartbeat-interval-ms", "100"]);
    let mut w = c.worker(&addr, 0, 0, &["--connect-timeout-s", "2"]);
    await_condition(Duration::from_secs(30), "worker registered", || async {
        job_status(&addr).await.ok().filter(|s| s.workers.len() == 1)
    })
    .await;
    coord.child.kill().unwrap();
    let _ = coord.child.wait();
    // The heartbeats give up: the worker ends with the error, not a panic.
    let status = w.wait_timeout(Duration::from_secs(60)).expect("the worker exits");
    let log = w.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("unreachable after 2"), "{log}");
    assert!(!log.contains("panicked") && status.code() != Some(101), "{status}:\n{log}");
}

/// Waits for the job to be `failed` and returns its message.
async fn failed_with(addr: &str, limit: Duration) -> String {
    await_condition(limit, "the job failed", || async {
        let s = job_status(addr).await.ok()?;
        (s.state == pb::JobState::Failed as i32).then_some(s.message)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_every_restart_would_repeat_fails_the_job_with_the_workers_message() {
    // A coordinator that cannot see the workers' files skips its own checks; the workers
    // find the reward model missing when they load it.
    let c = Cluster::new(&format!(
        "{CONFIG}\n[[rewards]]\nname = \"hpsv2\"\nmodel_dir = \"no_such_hps_ckpt\"\n"
    ));
    let flags = ["--world-size", "2", "--heartbeat-interval-ms", "100", "--skip-file-checks"];
    let (_coord, addr) = c.coordinator(&flags);
    let mut w0 = c.worker(&addr, 0, 0, &[]);
    let mut w1 = c.worker(&addr, 0, 1, &[]);
    let message = failed_with(&addr, Duration::from_secs(60)).await;
    assert!(message.contains("failed, and would again on a restart"), "{message}");
    assert!(message.contains("no_such_hps_ckpt"), "{message}");
    for w in [&mut w0, &mut w1] {
        let st = w.wait_timeout(Duration::from_secs(30)).expect("every worker exits");
        assert!(!st.success(), "{}", c.logs());
    }
    // The failure stays in the status: a worker leaving after it does not overwrite it.
    let s = job_status(&addr).await.unwrap();
    assert_eq!(s.message, message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_finite_loss_fails_the_job_under_the_fail_policy() {
    // The recipe for NaN: a huge learning rate with the clips opened wide.
    let c = Cluster::new(&format!(
        "{CONFIG}learning_rate = 1000.0\nclip_range = 1000.0\nadv_clip_max = 1000.0\n\
         max_train_steps = 20\n"
    ));
    let (_coord, addr) = c.coordinator(&["--world-size", "1", "--heartbeat-interval-ms", "100"]);
    let mut w = c.worker(&addr, 0, 0, &[]);
    let message = failed_with(&addr, Duration::from_secs(180)).await;
    assert!(message.contains("update skipped (non_finite_policy = fail)"), "{message}");
    w.wait_timeout(Duration::from_secs(30)).expect("the worker exits");
    let s = job_status(&addr).await.unwrap();
    assert!(s.step < 20, "the job stopped where it went bad, at step {}", s.step);
}
