//! The service surface an operator relies on: reflection (what `grpcurl list` uses), health,
//! the status CLI, and the linkage of the two binaries.

use std::process::Command;
use std::time::Duration;

use dancegrpo_e2e::{Cluster, await_condition, bin, job_status};
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services() {
    let c = Cluster::new("job_name = \"surface\"\n");
    let (_coord, addr) = c.coordinator(&["--world-size", "1"]);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for want in ["dancegrpo.v1.Coordinator", "dancegrpo.v1.JobService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_cli_prints_workers_as_text_and_json() {
    let c = Cluster::new("job_name = \"cli\"\n");
    let (_coord, addr) = c.coordinator(&["--world-size", "1", "--heartbeat-interval-ms", "100"]);
    let _w = c.worker(&addr, 0, 0, &[]);
    await_condition(Duration::from_secs(30), "world formed", || async {
        job_status(&addr).await.ok().filter(|s| s.generation == 1)
    })
    .await;
    let out = Command::new(bin("dancegrpo-coordinator"))
        .args(["status", "--addr", &addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("job cli") && text.contains("state running"), "{text}");
    assert!(text.contains("workers: 1 live of 1 expected"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("0 ") && l.contains("running")),
        "{text}"
    );

    let out = Command::new(bin("dancegrpo-coordinator"))
        .args(["status", "--addr", &addr, "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["workers"][0]["rank"], 0);
    assert_eq!(v["workers"][0]["device"], "cpu");

    // watch: the first update arrives at once.
    let mut child = Command::new(bin("dancegrpo-coordinator"))
        .args(["watch", "--addr", &addr, "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["job_name"], "cli");

    let out = Command::new(bin("dancegrpo-coordinator"))
        .args(["status", "--addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot reach coordinator at http://127.0.0.1:1")
    );
}

fn ldd(exe: &str) -> String {
    let out = Command::new("ldd").arg(bin(exe)).output().expect("ldd");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn coordinator_does_not_link_libtorch_and_worker_finds_it_without_ld_library_path() {
    let coord = ldd("dancegrpo-coordinator");
    assert!(
        !coord.contains("torch") && !coord.contains("libc10"),
        "coordinator links libtorch:\n{coord}"
    );
    // The worker's rpath points into the venv: every library resolves with no LD_LIBRARY_PATH.
    let out = Command::new("ldd")
        .arg(bin("dancegrpo-worker"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let worker = String::from_utf8(out.stdout).unwrap();
    assert!(worker.contains("libtorch_cpu.so"), "worker does not link libtorch:\n{worker}");
    assert!(!worker.contains("not found"), "unresolved libraries:\n{worker}");
}
