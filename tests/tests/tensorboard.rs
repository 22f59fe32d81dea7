//! TensorBoard end to end: a tiny job's `out/tensorboard/` read back with the `tensorboard`
//! package's own reader (`EventAccumulator`, installed by `deploy/reference-venv.sh`) holds
//! every number of every `metrics.jsonl` line at its iteration, and the sample grids as images.
//! (Rewinds and restarts are covered by the coordinator's
//! `tensorboard_shows_each_step_once_with_its_last_values_after_a_rewind_and_restart`.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dancegrpo_e2e::Cluster;

const JOB: &str = "job_name = \"tb\"\nmax_train_steps = 3\nsample_grid_every = 2\n";

/// `{"scalars": {tag: [[step, value]]}, "images": {tag: [[step, width, height]]}}`; a NaN
/// value reads as `null`.
fn read_tensorboard(dir: &Path) -> serde_json::Value {
    let script = r#"
import json, math, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
ea.Reload()
t = ea.Tags()
num = lambda x: None if math.isnan(x) else x
print(json.dumps({
    "scalars": {k: [[e.step, num(e.value)] for e in ea.Scalars(k)] for k in t["scalars"]},
    "images": {k: [[e.step, e.width, e.height] for e in ea.Images(k)] for k in t["images"]},
}))
"#;
    let out = Command::new("python").args(["-c", script]).arg(dir).output().expect("python");
    assert!(
        out.status.success(),
        "the tensorboard reader failed (run deploy/reference-venv.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every number of a metrics line but `iteration`, by the coordinator's tag: its JSON path,
/// a per-reward list by reward name. `None` for a NaN (written as a string).
fn leaves(tag: &str, v: &serde_json::Value, names: &[&str], out: &mut Vec<(String, Option<f64>)>) {
    use serde_json::Value as J;
    let join = |k: &str| if tag.is_empty() { k.to_string() } else { format!("{tag}/{k}") };
    match v {
        J::Object(o) => o
            .iter()
            .filter(|(k, _)| !(tag.is_empty() && k.as_str() == "iteration"))
            .for_each(|(k, v)| leaves(&join(k), v, names, out)),
        J::Array(a) => {
            assert_eq!(a.len(), names.len(), "{tag}: one per reward");
            a.iter().zip(names).for_each(|(v, n)| leaves(&join(n), v, names, out));
        }
        J::Number(n) => out.push((tag.to_string(), n.as_f64())),
        J::String(s) => {
            assert_eq!(s.to_lowercase(), "nan", "{tag}: {s}");
            out.push((tag.to_string(), None));
        }
        other => panic!("{tag}: unexpected {other}"),
    }
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(bytes: &[u8]) -> (u64, u64) {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR");
    let be = |at: usize| u64::from(u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()));
    (be(16), be(20))
}

#[test]
fn event_files_hold_every_metric_at_its_iteration_and_the_sample_grids() {
    let c = Cluster::new(JOB);
    let (_coord, addr) = c.coordinator(&["--world-size", "2", "--heartbeat-interval-ms", "200"]);
    let mut w0 = c.worker(&addr, 0, 0, &[]);
    let mut w1 = c.worker(&addr, 0, 1, &[]);
    for (w, what) in [(&mut w0, "rank 0"), (&mut w1, "rank 1")] {
        let s = w.wait_timeout(Duration::from_secs(300));
        assert!(s.is_some_and(|s| s.success()), "{what} failed ({s:?}):\n{}", c.logs());
    }
    let out = c.path("out");
    let tb = read_tensorboard(&out.join("tensorboard"));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> =
        metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{metrics}");

    // Every scalar of every line, at its iteration, to f32 (a `simple_value` is a float).
    let mut want: std::collections::BTreeMap<String, Vec<(u64, Option<f64>)>> = Default::default();
    for line in &lines {
        let step = line["iteration"].as_u64().unwrap();
        let mut l = Vec::new();
        leaves("", line, &["jpeg_compressibility"], &mut l);
        for (tag, v) in l {
            want.entry(tag).or_default().push((step, v.map(|x| f64::from(x as f32))));
        }
    }
    assert!(want.contains_key("mean_rewards/jpeg_compressibility"), "{want:?}");
    assert!(want.contains_key("std_rewards/jpeg_compressibility"), "{want:?}");
    assert!(want.contains_key("timings_s/communication"), "{want:?}");
    let scalars = tb["scalars"].as_object().expect("scalars");
    let got: std::collections::BTreeMap<String, Vec<(u64, Option<f64>)>> = scalars
        .iter()
        .map(|(tag, points)| {
            let points = points.as_array().unwrap();
            (tag.clone(), points.iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64())).collect())
        })
        .collect();
    assert_eq!(got, want, "TensorBoard and metrics.jsonl differ");

    // The grids rank 0 wrote (1 and 3: every 2nd iteration and the last), at their iteration,
    // named as metrics.jsonl counts.
    let mut grids = Vec::new();
    for step in 1..=3u64 {
        let p = out.join(format!("samples/iteration-{step:06}.png"));
        if let Ok(bytes) = std::fs::read(&p) {
            let (w, h) = png_size(&bytes);
            grids.push(serde_json::json!([step, w, h]));
        }
    }
    assert_eq!(grids.len(), 2, "grids of iterations 1 and 3");
    assert_eq!(tb["images"]["samples"], serde_json::Value::Array(grids), "{}", tb["images"]);
}
