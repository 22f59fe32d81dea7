//! Nobody in without the key: the job token on every call but health, the session secret on
//! every call that names a worker, and what a caller holding the token still cannot do. Each
//! forged call here was accepted before the token and the secrets existed.

use std::time::Duration;

use dancegrpo_e2e::{
    Cluster, TEST_TOKEN, await_condition, coordinator_client, job_client, job_status_with,
};
use dancegrpo_proto::{PROTOCOL_VERSION, Reason, pb};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

const CONFIG: &str = "job_name = \"secure\"\nnum_generations = 2\n";
// No heartbeats from the hand-made workers: they must not be declared lost meanwhile.
const WORLD_OF_TWO: &[&str] = &["--world-size", "2", "--heartbeat-timeout-ms", "600000"];

fn info(local_rank: u32) -> pb::WorkerInfo {
    pb::WorkerInfo {
        host: "127.0.0.1".into(),
        node_rank: 0,
        local_rank,
        device: Some(pb::DeviceInfo { device: "cpu".into(), description: "by hand".into() }),
        pid: std::process::id(),
    }
}

fn register(local_rank: u32) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest { protocol_version: PROTOCOL_VERSION, worker: Some(info(local_rank)) }
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, reason: Reason) -> String {
    let s = r.expect_err("the call was accepted");
    assert_eq!((s.code(), Reason::of(&s)), (code, Some(reason)), "{s:?}");
    s.message().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_token_only_health_answers() {
    let c = Cluster::secured(CONFIG);
    let (_coord, addr) = c.coordinator(&["--world-size", "1"]);
    for token in [None, Some("not-the-job-token-0123456789")] {
        let mut w = coordinator_client(&addr, token).await.unwrap();
        let m = refused(
            w.register_worker(register(0)).await,
            Code::Unauthenticated,
            Reason::Unauthenticated,
        );
        assert!(m.contains("auth token"), "{m}");
        let mut j = job_client(&addr, token).await.unwrap();
        let r = j.get_job_status(pb::GetJobStatusRequest::default()).await;
        refused(r, Code::Unauthenticated, Reason::Unauthenticated);
        let r = j.list_jobs(pb::ListJobsRequest {}).await;
        refused(r, Code::Unauthenticated, Reason::Unauthenticated);
        let r = j.watch_job(pb::WatchJobRequest::default()).await;
        refused(r, Code::Unauthenticated, Reason::Unauthenticated);
    }
    // Reflection describes the API: it wants the token too.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let r = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await;
    match r {
        Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
        // The refusal may come as the stream's first message instead.
        Ok(resp) => {
            let first = resp.into_inner().next().await.expect("an answer");
            assert_eq!(first.expect_err("reflection answered").code(), Code::Unauthenticated);
        }
    }
    // Health stays open, for load balancers and probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "dancegrpo.v1.Coordinator".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    // And the token opens the rest.
    let s = job_status_with(&addr, Some(TEST_TOKEN)).await.unwrap();
    assert_eq!(s.job_name, "secure");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_with_the_token_cannot_act_as_another_worker() {
    let c = Cluster::secured(CONFIG);
    let (coord, addr) = c.coordinator(WORLD_OF_TWO);
    let mut client = coordinator_client(&addr, Some(TEST_TOKEN)).await.unwrap();
    let a = client.register_worker(register(0)).await.unwrap().into_inner();
    let b = client.register_worker(register(1)).await.unwrap().into_inner();
    assert!(a.assignment.is_none() && b.assignment.is_some(), "the world formed");
    assert_eq!(a.session_secret.len(), 64);
    assert_ne!(a.session_secret, b.session_secret);

    // The status shows the worker ids, never a secret.
    let mut jobs = job_client(&addr, Some(TEST_TOKEN)).await.unwrap();
    let status = jobs.get_job_status(pb::GetJobStatusRequest::default()).await.unwrap();
    let shown = format!("{:?}", status.into_inner());
    assert!(shown.contains(&a.worker_id), "{shown}");
    assert!(!shown.contains(&a.session_secret) && !shown.contains(&b.session_secret));

    // A forger knows a's id from the status, and holds b's secret, or none.
    let denied = Code::PermissionDenied;
    for secret in [b.session_secret.clone(), String::new()] {
        let id = a.worker_id.clone();
        let r = client
            .heartbeat(pb::HeartbeatRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: id.clone(),
                state: pb::WorkerState::Draining as i32,
                session_secret: secret.clone(),
            })
            .await;
        refused(r, denied, Reason::PermissionDenied);
        let r = client
            .goodbye(pb::GoodbyeRequest {
                worker_id: id.clone(),
                reason: "forged".into(),
                // A forged fatal goodbye would fail the job.
                error: "forged".into(),
                session_secret: secret.clone(),
            })
            .await;
        refused(r, denied, Reason::PermissionDenied);
        for _ in 0..3 {
            let r = client
                .reform_world(pb::ReformWorldRequest {
                    worker_id: id.clone(),
                    generation: 1,
                    reason: "forged".into(),
                    session_secret: secret.clone(),
                })
                .await;
            refused(r, denied, Reason::PermissionDenied);
        }
        let r = client
            .get_work(pb::GetWorkRequest {
                worker_id: id.clone(),
                iteration: Some(0),
                generation: 1,
                checkpointed_step: 0,
                session_secret: secret.clone(),
            })
            .await;
        refused(r, denied, Reason::PermissionDenied);
        let r = client
            .get_advantages(pb::GetAdvantagesRequest {
                worker_id: id.clone(),
                iteration: 0,
                generation: 1,
                session_secret: secret.clone(),
            })
            .await;
        refused(r, denied, Reason::PermissionDenied);
        let r = client
            .report_step_metrics(pb::ReportStepMetricsRequest {
                worker_id: id.clone(),
                metrics: Some(pb::StepMetrics {
                    timings: Some(pb::PhaseTimings::default()),
                    ..Default::default()
                }),
                generation: 1,
                session_secret: secret.clone(),
            })
            .await;
        refused(r, denied, Reason::PermissionDenied);
    }

    // Nothing changed: both still running, generation 1, no rewind.
    let s = job_status_with(&addr, Some(TEST_TOKEN)).await.unwrap();
    assert_eq!((s.generation, s.step), (1, 0), "{}", s.message);
    let running = s.workers.iter().filter(|w| w.state == pb::WorkerState::Running as i32);
    assert_eq!(running.count(), 2, "{:?}", s.workers);

    // b's rewards, forged as b by a caller holding a's secret.
    let work = client
        .get_work(pb::GetWorkRequest {
            worker_id: b.worker_id.clone(),
            iteration: Some(0),
            generation: 1,
            checkpointed_step: 0,
            session_secret: b.session_secret.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let scores = |v: f64| -> Vec<pb::TrajectoryReward> {
        work.items
            .iter()
            .map(|it| pb::TrajectoryReward {
                item: Some(*it),
                rewards: vec![v],
                error: String::new(),
            })
            .collect()
    };
    let forged = pb::ReportRewardsRequest {
        worker_id: b.worker_id.clone(),
        iteration: 0,
        rewards: scores(1.0),
        generation: 1,
        session_secret: a.session_secret.clone(),
    };
    refused(client.report_rewards(forged.clone()).await, denied, Reason::PermissionDenied);
    // From b itself, NaN is still refused at the edge, naming the item.
    let own = pb::ReportRewardsRequest {
        session_secret: b.session_secret.clone(),
        rewards: scores(f64::NAN),
        ..forged
    };
    let m =
        refused(client.report_rewards(own).await, Code::InvalidArgument, Reason::InvalidRequest);
    assert!(m.contains("is NaN") && m.contains("group"), "{m}");
    // The database took nothing unreadable: the status still answers.
    job_status_with(&addr, Some(TEST_TOKEN)).await.unwrap();

    // A reason with a newline and a terminal escape cannot forge a log line.
    let forged_line =
        "2026-12-02T00:00:00.000000Z  INFO dancegrpo_coordinator::state: job completed";
    client
        .goodbye(pb::GoodbyeRequest {
            worker_id: a.worker_id.clone(),
            reason: format!("leaving\n{forged_line}\x1b[2J"),
            error: String::new(),
            session_secret: a.session_secret.clone(),
        })
        .await
        .unwrap();
    let s = await_condition(Duration::from_secs(10), "rank 0 stopped", || async {
        let s = job_status_with(&addr, Some(TEST_TOKEN)).await.ok()?;
        s.message.contains("stopped").then_some(s)
    })
    .await;
    assert!(!s.message.contains('\n') && !s.message.contains('\x1b'), "{:?}", s.message);
    let log = coord.log();
    assert!(log.lines().all(|l| !l.starts_with(forged_line)), "{log}");
    // The reason is kept, escaped, on the one line that records the goodbye.
    let said: Vec<&str> = log.lines().filter(|l| l.contains("job completed")).collect();
    assert!(said.len() == 1 && said[0].contains("worker stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_public_address_needs_a_token_or_insecure() {
    let c = Cluster::new(CONFIG);
    let (status, log) = c.try_coordinator_on("0.0.0.0:0", &["--world-size", "1"]).unwrap_err();
    assert!(!status.success());
    assert!(log.contains("refusing to listen on 0.0.0.0:0 without an auth token"), "{log}");
    assert!(log.contains("--auth-token-file") && log.contains("--insecure"), "{log}");
    let (_open, _) = c.coordinator_on("0.0.0.0:0", &["--world-size", "1", "--insecure"]);
    drop(_open);
    let secured = Cluster::secured(CONFIG);
    let (_coord, addr) = secured.coordinator_on("0.0.0.0:0", &["--world-size", "1"]);
    let port = addr.rsplit(':').next().unwrap();
    job_status_with(&format!("127.0.0.1:{port}"), Some(TEST_TOKEN)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_and_the_cli_with_the_token_run_a_job_and_without_it_are_told_why() {
    let c = Cluster::secured("job_name = \"secure-run\"\nmax_train_steps = 2\n");
    let (_coord, addr) = c.coordinator(&["--world-size", "1", "--heartbeat-interval-ms", "100"]);
    let mut w = c.worker(&addr, 0, 0, &[]);
    let st = w.wait_timeout(Duration::from_secs(180)).expect("the job finishes");
    assert!(st.success(), "{}", c.logs());
    let s = job_status_with(&addr, Some(TEST_TOKEN)).await.unwrap();
    assert_eq!((s.state, s.step), (pb::JobState::Completed as i32, 2), "{}", s.message);

    // The CLI reads the token from the same variable; without it, it says what is missing.
    let out = c.run_to_end(
        "dancegrpo-coordinator",
        &["status", "--addr", &addr, "--json"],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bare = std::process::Command::new(dancegrpo_e2e::bin("dancegrpo-coordinator"))
        .args(["status", "--addr", &addr])
        .env_remove(dancegrpo_proto::auth::TOKEN_ENV)
        .env_remove(dancegrpo_proto::auth::TOKEN_FILE_ENV)
        .output()
        .unwrap();
    assert!(!bare.status.success());
    let err = String::from_utf8_lossy(&bare.stderr);
    assert!(err.contains("needs the job's auth token"), "{err}");

    // A worker with the wrong token exits at once, saying so.
    let wrong = c.path("wrong-token");
    std::fs::write(&wrong, "a-wrong-token-0123456789").unwrap();
    let wrong = wrong.display().to_string();
    let out = c.run_to_end(
        "dancegrpo-worker",
        &["run", "--coordinator", &format!("http://{addr}"), "--auth-token-file", &wrong],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong auth token"), "{err}");
}
