//! `--log-format json` (issue 18, item 6): both binaries write one JSON object per line, as
//! log shippers read it, through a whole job.

use std::time::Duration;

use dancegrpo_e2e::{Cluster, job_status};
use dancegrpo_proto::pb;

/// Every line of `log` is a JSON object with a level and a message; returns the messages.
fn json_lines(who: &str, log: &str) -> Vec<String> {
    assert!(!log.trim().is_empty(), "{who} logged nothing");
    log.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who}: not a JSON line ({e}): {l:?}\n{log}"));
            assert!(v["level"].is_string(), "{who}: no level: {l}");
            v["fields"]["message"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn both_binaries_log_one_json_object_per_line() {
    let c = Cluster::new("job_name = \"logs\"\nmax_train_steps = 2\n");
    let json = ["--log-format", "json"];
    let (coord, addr) = c.coordinator(&["--world-size", "1", "--log-format", "json"]);
    let mut w = c.worker(&addr, 0, 0, &json);
    let s = w.wait_timeout(Duration::from_secs(300));
    assert!(s.is_some_and(|s| s.success()), "{s:?}:\n{}", c.logs());
    assert_eq!(job_status(&addr).await.unwrap().state, pb::JobState::Completed as i32);
    let said = json_lines("coordinator", &coord.log());
    assert!(said.iter().any(|m| m == "coordinator listening"), "{said:?}");
    assert!(said.iter().any(|m| m == "world formed"), "{said:?}");
    let said = json_lines("worker", &w.log());
    assert!(said.iter().any(|m| m == "process group ready"), "{said:?}");
}
