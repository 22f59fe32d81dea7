//! The training loop end to end: a real coordinator and real workers on loopback train the
//! tiny preset, write the reward log, metrics, PNGs and checkpoints, resume exactly, and
//! survive a killed worker.

use std::path::Path;
use std::time::Duration;

use dancegrpo_e2e::{
    Cluster, job_status, read_bytes as read, train_two as train, wait_ok, workers_in,
};
use dancegrpo_proto::pb;

const JOB: &str = "job_name = \"train\"\nmax_train_steps = 4\ncheckpointing_steps = 2\n\
                   sample_grid_every = 2\n";

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_train_log_checkpoint_and_finish() {
    let c = Cluster::new(JOB);
    // Frequent heartbeats: one answered after a worker's goodbye used to register the leaving
    // worker again and re-form the finished world around it.
    let (_coord, addr) = c.coordinator(&["--world-size", "2", "--heartbeat-interval-ms", "10"]);
    let mut w0 = c.worker(&addr, 0, 0, &[]);
    let mut w1 = c.worker(&addr, 0, 1, &[]);
    wait_ok(&c, &mut w0, "rank 0");
    wait_ok(&c, &mut w1, "rank 1");

    let s = job_status(&addr).await.unwrap();
    assert_eq!(s.state, pb::JobState::Completed as i32, "{}", s.message);
    assert_eq!(s.step, 4);
    assert_eq!(s.history.len(), 4);
    // A poller asks for what it shows; the CLI's text shows the last 10.
    let mut jobs = dancegrpo_e2e::job_client(&addr, None).await.unwrap();
    let req = pb::GetJobStatusRequest { history_limit: 2, ..Default::default() };
    let short = jobs.get_job_status(req).await.unwrap().into_inner().status.unwrap();
    let its: Vec<u64> = short.history.iter().map(|h| h.iteration).collect();
    assert_eq!(its, [3, 4], "the latest two");
    let out = c.cli(&["status", "--addr", &addr, "--json", "--history", "1"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["history"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(s.generation, 1, "the world was never re-formed:\n{}", c.logs());
    let logs = c.logs();
    assert!(!logs.contains("registering again"), "a leaving worker registered again:\n{logs}");
    assert_eq!(s.workers.len(), 2, "nobody registered twice:\n{logs}");
    assert!(workers_in(&s, pb::WorkerState::Stopped).len() == 2, "both said goodbye: {s:?}");
    for h in &s.history {
        let m = h.metrics.expect("metrics recorded");
        let t = m.timings.expect("timings");
        assert!(t.rollout_s > 0.0 && t.train_s > 0.0 && t.decode_s > 0.0, "{t:?}");
        assert!(m.grad_norm > 0.0 && m.grad_norm.is_finite(), "{m:?}");
        assert_eq!(m.optimizer_steps, 2, "4 trajectories per rank / gradient_accumulation_steps 2");
    }
    // The ratio is 1 on-policy: before the first optimizer step of each iteration no weight
    // has moved, so only later windows can deviate (and the tiny model moves little).
    let out = c.path("out");
    let log = String::from_utf8(read(&out.join("reward.txt"))).unwrap();
    let rewards: Vec<f64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(rewards.len(), 4, "one line per iteration:\n{log}");
    for (h, r) in s.history.iter().zip(&rewards) {
        assert_eq!(h.mean_rewards[0], *r, "the log and the status agree");
    }
    let metrics = String::from_utf8(read(&out.join("metrics.jsonl"))).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    for png in ["reward_curve.png", "samples/iteration-000001.png", "samples/iteration-000004.png"]
    {
        assert!(read(&out.join(png)).starts_with(b"\x89PNG"), "{png} is not a PNG");
    }
    for step in [2, 4] {
        let ck = out.join(format!("checkpoint-{step}"));
        for f in [
            "transformer/diffusion_pytorch_model.safetensors",
            "transformer/config.json",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(ck.join(f).is_file(), "{} missing", ck.join(f).display());
        }
        let state: serde_json::Value =
            serde_json::from_slice(&read(&ck.join("trainer_state.json"))).unwrap();
        assert_eq!(state["step"], step);
        assert_eq!(state["reward_history"].as_array().unwrap().len(), step as usize);
    }
    assert!(!out.join("checkpoint-3").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn resuming_from_a_checkpoint_is_bit_identical() {
    let straight = train(JOB);
    let a = straight.path("out");
    let resumed = train(&format!(
        "{JOB}resume_from_checkpoint = {:?}\n",
        a.join("checkpoint-2").display().to_string()
    ));
    let b = resumed.path("out");
    assert_eq!(read(&a.join("reward.txt")), read(&b.join("reward.txt")), "reward logs differ");
    for f in [
        "checkpoint-4/transformer/diffusion_pytorch_model.safetensors",
        "checkpoint-4/optimizer.safetensors",
    ] {
        assert!(read(&a.join(f)) == read(&b.join(f)), "{f} differs after the resume");
    }
    assert!(!b.join("checkpoint-2").exists(), "the resumed job started after step 2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_rejoins_and_the_result_equals_an_uninterrupted_run() {
    killed_worker_rejoins("").await;
}

/// The same under sharding: the restarted rank cuts its slices from the checkpoint, and the
/// survivor goes back to it too.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_sharded_worker_rejoins_and_the_result_equals_an_uninterrupted_run() {
    killed_worker_rejoins("gradient_checkpointing = true\nfsdp_sharding_strategy = \"full\"\n")
        .await;
}

async fn killed_worker_rejoins(extra: &str) {
    let long =
        format!("job_name = \"survive\"\nmax_train_steps = 6\ncheckpointing_steps = 2\n{extra}");
    let straight = train(&long);

    let c = Cluster::new(&long);
    let (_coord, addr) = c.coordinator(&[
        "--world-size",
        "2",
        "--heartbeat-interval-ms",
        "200",
        "--heartbeat-timeout-ms",
        "1500",
    ]);
    let fast = ["--collective-timeout-s", "5"];
    let mut w0 = c.worker(&addr, 0, 0, &fast);
    let mut w1 = c.worker(&addr, 0, 1, &fast);
    let mut reached = false;
    for _ in 0..1200 {
        if job_status(&addr).await.is_ok_and(|s| s.step >= 3) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reached, "step 3 not reached in 120 s:\n{}", c.logs());
    w1.child.kill().unwrap();
    let _ = w1.child.wait();
    dancegrpo_e2e::await_condition(Duration::from_secs(30), "rank 1 lost", || async {
        let s = job_status(&addr).await.ok()?;
        s.workers.iter().any(|w| w.state == pb::WorkerState::Lost as i32).then_some(())
    })
    .await;
    let mut w1b = c.worker(&addr, 0, 1, &fast);
    wait_ok(&c, &mut w0, "the surviving rank 0");
    wait_ok(&c, &mut w1b, "the restarted rank 1");
    let s = job_status(&addr).await.unwrap();
    assert_eq!(s.state, pb::JobState::Completed as i32, "{}", s.message);
    assert!(s.generation >= 2, "the world was re-formed");

    let (a, b) = (straight.path("out"), c.path("out"));
    assert_eq!(read(&a.join("reward.txt")), read(&b.join("reward.txt")), "reward logs differ");
    // One file, or a sharded job's shards and index: every one equal.
    let folder = "checkpoint-6/transformer";
    let mut names: Vec<_> =
        std::fs::read_dir(a.join(folder)).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    for n in names {
        let f = Path::new(folder).join(n);
        assert!(read(&a.join(&f)) == read(&b.join(&f)), "final weights differ: {}", f.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lora_trains_only_the_adapters_and_saves_them_as_peft() {
    let c = train(
        "job_name = \"lora\"\nmax_train_steps = 2\ncheckpointing_steps = 2\n\
         [lora]\nrank = 4\nalpha = 8.0\n",
    );
    let ck = c.path("out/checkpoint-2");
    assert!(ck.join("adapter_model.safetensors").is_file());
    assert!(!ck.join("transformer").exists(), "LoRA checkpoints hold the adapters only");
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(&ck.join("adapter_config.json"))).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"], serde_json::json!(["to_q", "to_k", "to_v", "to_out.0"]));
}
