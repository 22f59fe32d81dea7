//! The chaos soak: kill -9 of a worker or of the coordinator at random moments, each restarted
//! at once or after a short outage, over a whole job. The reward log, the metrics (all but the
//! timings) and the final weights and optimizer state must be bit-identical to an
//! uninterrupted run of the same job.
//!
//! `make test` runs the short setting (12 iterations, 4 faults). The long one:
//! `CHAOS_SOAK=100,20 cargo test -p dancegrpo-e2e --test soak -- --nocapture`
//! (iterations, faults); `CHAOS_SOAK_SEED` picks the fault schedule.

use std::path::Path;
use std::time::{Duration, Instant};

use dancegrpo_e2e::{Cluster, Proc, job_status};
use dancegrpo_proto::pb;
use rand::{Rng, SeedableRng};

const COORD: &[&str] = &["--world-size", "2", "--heartbeat-interval-ms", "200"];
// Workers outlive a coordinator outage, and a collective with a dead peer fails fast.
const WORKER: &[&str] = &["--connect-timeout-s", "120", "--collective-timeout-s", "10"];

fn job(iterations: u64) -> String {
    format!(
        "job_name = \"soak\"\nmax_train_steps = {iterations}\ncheckpointing_steps = 2\n\
         num_generations = 2\n"
    )
}

fn wait_ok(c: &Cluster, p: &mut Proc, what: &str) {
    let s = p.wait_timeout(Duration::from_secs(600));
    assert!(s.is_some_and(|s| s.success()), "{what} did not finish cleanly ({s:?}):\n{}", c.logs());
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `metrics.jsonl` without the timings, which differ from run to run.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    String::from_utf8(read(&out.join("metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("timings_s");
            v
        })
        .collect()
}

fn kill(p: &mut Proc) {
    p.child.kill().unwrap();
    let _ = p.child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn random_kills_of_workers_and_the_coordinator_lose_nothing() {
    let setting = std::env::var("CHAOS_SOAK").unwrap_or_else(|_| "12,4".into());
    let (iterations, faults): (u64, u32) = setting
        .split_once(',')
        .and_then(|(i, f)| Some((i.parse().ok()?, f.parse().ok()?)))
        .expect("CHAOS_SOAK=ITERATIONS,FAULTS");
    let seed = std::env::var("CHAOS_SOAK_SEED").map_or(7, |s| s.parse().expect("a seed"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    let straight = Cluster::new(&job(iterations));
    {
        let (_coord, addr) = straight.coordinator(COORD);
        let mut ws = [straight.worker(&addr, 0, 0, WORKER), straight.worker(&addr, 0, 1, WORKER)];
        for (r, w) in ws.iter_mut().enumerate() {
            wait_ok(&straight, w, &format!("uninterrupted rank {r}"));
        }
    }

    let c = Cluster::new(&job(iterations));
    let (mut coord, addr) = c.coordinator(COORD);
    let mut ws = [c.worker(&addr, 0, 0, WORKER), c.worker(&addr, 0, 1, WORKER)];
    // Faults fall over the first 80 % of the steps, one at a time.
    let mut recoveries = Vec::new();
    let mut victims = Vec::new();
    for fault in 0..faults {
        let at = (fault as u64 + 1) * iterations * 4 / 5 / (faults as u64 + 1);
        let reached = Instant::now();
        loop {
            if job_status(&addr).await.is_ok_and(|s| s.step >= at) {
                break;
            }
            assert!(reached.elapsed() < Duration::from_secs(300), "step {at}:\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A random moment within the iteration (the tiny model's take about 0.1 s), then a
        // random victim.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
        let victim = rng.random_range(0..3u32);
        let s = job_status(&addr).await.unwrap();
        // A job that has already ended has nothing left to survive.
        assert!(s.step < iterations, "fault {fault} came after the end (step {})", s.step);
        let step = s.step;
        let killed = Instant::now();
        match victim {
            2 => {
                kill(&mut coord);
                let outage = Duration::from_millis(rng.random_range(0..1500));
                tokio::time::sleep(outage).await;
                coord = c.coordinator_on(&addr, COORD).0;
                victims.push(format!("coordinator at step {step} ({outage:?} down)"));
            }
            r => {
                kill(&mut ws[r as usize]);
                ws[r as usize] = c.worker(&addr, 0, r, WORKER);
                victims.push(format!("rank {r} at step {step}"));
            }
        }
        // Recovered once the job trains a step past the one it was at.
        loop {
            if let Ok(s) = job_status(&addr).await
                && (s.step > step || s.state == pb::JobState::Completed as i32)
            {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(300), "{victims:?}:\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        recoveries.push(killed.elapsed());
        let last = victims.last_mut().unwrap();
        *last = format!("{last}: {:.2?}", killed.elapsed());
    }
    for (r, w) in ws.iter_mut().enumerate() {
        wait_ok(&c, w, &format!("rank {r}"));
    }
    let s = job_status(&addr).await.unwrap();
    assert_eq!((s.state, s.step), (pb::JobState::Completed as i32, iterations), "{}", s.message);

    let (a, b) = (straight.path("out"), c.path("out"));
    assert_eq!(read(&a.join("reward.txt")), read(&b.join("reward.txt")), "reward logs differ");
    assert_eq!(metrics(&a), metrics(&b), "metrics differ");
    for f in ["transformer/diffusion_pytorch_model.safetensors", "optimizer.safetensors"] {
        let f = format!("checkpoint-{iterations}/{f}");
        assert!(read(&a.join(&f)) == read(&b.join(&f)), "{f} differs");
    }
    recoveries.sort();
    println!(
        "soak: {iterations} iterations, {faults} faults survived, seed {seed}; recovery (kill to \
         the next step) p50 {:?}, max {:?}; faults: {victims:?}",
        recoveries.get(recoveries.len() / 2).copied().unwrap_or_default(),
        recoveries.last().copied().unwrap_or_default()
    );
}
