//! Prometheus `/metrics` (issue 18): a real coordinator serves it on its own port while two
//! workers train; the scrape is parsed by the Prometheus project's own Python parser
//! (`prometheus_client.openmetrics.parser`) and checked against metrics.jsonl and the status.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use dancegrpo_e2e::{Cluster, job_status};
use dancegrpo_proto::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const JOB: &str = "job_name = \"metrics\"\nmax_train_steps = 4\ncheckpointing_steps = 2\n";

/// A free loopback port (the coordinator binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET /metrics: the status line, the content type and the body.
async fn scrape(addr: &str) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics port");
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.lines().next().unwrap_or_default().to_string();
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// Every sample, as the Prometheus parser reads it: `name{k="v",...}` to value.
fn parse_with_prometheus_client(text: &str) -> BTreeMap<String, f64> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let out = Command::new("python").arg("-c").arg(script).arg(&path).output().expect("python");
    assert!(
        out.status.success(),
        "the parser refused it:\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_and_read_back_by_the_prometheus_parser() {
    let c = Cluster::new(JOB);
    let metrics = format!("127.0.0.1:{}", free_port());
    let (_coord, addr) = c.coordinator(&[
        "--world-size",
        "2",
        "--heartbeat-interval-ms",
        "200",
        "--metrics-listen",
        &metrics,
    ]);
    let (status, ctype, body) = scrape(&metrics).await;
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let before = parse_with_prometheus_client(&body);
    assert_eq!(before["dancegrpo_iteration"], 0.0);
    assert_eq!(before["dancegrpo_job_state{state=\"waiting_for_workers\"}"], 1.0);
    assert!(!before.contains_key("dancegrpo_loss"), "no iteration yet: {before:?}");

    let mut ws = [c.worker(&addr, 0, 0, &[]), c.worker(&addr, 0, 1, &[])];
    for w in &mut ws {
        let s = w.wait_timeout(Duration::from_secs(300));
        assert!(s.is_some_and(|s| s.success()), "{s:?}:\n{}", c.logs());
    }
    let s = job_status(&addr).await.unwrap();
    assert_eq!(s.state, pb::JobState::Completed as i32, "{}", s.message);
    let m = parse_with_prometheus_client(&scrape(&metrics).await.2);

    let jsonl = std::fs::read_to_string(c.path("out/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(jsonl.lines().last().unwrap()).unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let want = [
        ("dancegrpo_iteration", 4.0),
        ("dancegrpo_max_train_steps", 4.0),
        ("dancegrpo_checkpoint_step", 4.0),
        ("dancegrpo_generation", 1.0),
        ("dancegrpo_world_size", 2.0),
        ("dancegrpo_workers_live", 0.0),
        ("dancegrpo_job_state{state=\"completed\"}", 1.0),
        ("dancegrpo_job_state{state=\"running\"}", 0.0),
        ("dancegrpo_reward_mean{reward=\"jpeg_compressibility\"}", f(&last["mean_rewards"][0])),
        ("dancegrpo_reward_std{reward=\"jpeg_compressibility\"}", f(&last["std_rewards"][0])),
        ("dancegrpo_loss", f(&last["loss"])),
        ("dancegrpo_grad_norm", f(&last["grad_norm"])),
        ("dancegrpo_ratio_deviation_mean", f(&last["ratio_dev_mean"])),
        ("dancegrpo_ratio_deviation_max", f(&last["ratio_dev_max"])),
        ("dancegrpo_clip_fraction", f(&last["clip_fraction"])),
        ("dancegrpo_phase_seconds{phase=\"rollout\"}", f(&last["timings_s"]["rollout"])),
        ("dancegrpo_phase_seconds{phase=\"reward\"}", f(&last["timings_s"]["reward"])),
        ("dancegrpo_phase_seconds{phase=\"train\"}", f(&last["timings_s"]["train"])),
        ("dancegrpo_collective_seconds", f(&last["timings_s"]["communication"])),
        // Rank 0 wrote checkpoint-2 and checkpoint-4.
        ("dancegrpo_checkpoints_written_total", 2.0),
        ("dancegrpo_reformations_total{cause=\"collective_failed\"}", 0.0),
        ("dancegrpo_reformations_total{cause=\"rank_rejoined\"}", 0.0),
        ("dancegrpo_reformations_total{cause=\"rank_lost_step\"}", 0.0),
    ];
    for (k, v) in want {
        let got = m.get(k).unwrap_or_else(|| panic!("{k} missing from {m:?}"));
        assert!((got - v).abs() <= 1e-9 * v.abs().max(1.0), "{k}: {got} (want {v})");
    }
    assert!(f(&last["std_rewards"][0]) > 0.0, "the group's rewards differ: {last}");
}
