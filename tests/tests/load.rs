//! The status API under load: pollers and watchers at a bounded rate while two workers train.
//! Every call is answered, no worker is marked lost, the world is never re-formed, and the
//! iteration time is compared with an unloaded run of the same job (printed; the figures are in
//! RELIABILITY.md, since a 2-core machine running the clients too is no place for a timing
//! assertion).
//!
//! `make test` runs 8 pollers at 20 calls/s each and 8 watchers over 16 iterations;
//! `LOAD_CLIENTS=32 LOAD_STEPS=300` for more of each.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dancegrpo_e2e::{Cluster, job_client, job_status};
use dancegrpo_proto::pb;

const COORD: &[&str] = &["--world-size", "2", "--heartbeat-interval-ms", "200"];
fn steps() -> u64 {
    std::env::var("LOAD_STEPS").map_or(16, |n| n.parse().expect("a count"))
}

fn job() -> String {
    format!("job_name = \"load\"\nmax_train_steps = {}\nnum_generations = 2\n", steps())
}

/// Seconds per iteration from step 2 to the end (the first ones load the model), and the run's
/// status at the end.
async fn run(clients: usize) -> (f64, pb::JobStatus, u64, u64) {
    let c = Cluster::new(&job());
    let (_coord, addr) = c.coordinator(COORD);
    let mut ws = [c.worker(&addr, 0, 0, &[]), c.worker(&addr, 0, 1, &[])];
    let calls = Arc::new(AtomicU64::new(0));
    let updates = Arc::new(AtomicU64::new(0));
    // A watch channel, not a Notify: a poller in the middle of a call must see it too.
    let (stop, done) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (a, calls, mut done) = (addr.clone(), calls.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut jobs = job_client(&a, None).await.expect("connect");
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = done.changed() => return,
                    _ = tick.tick() => {
                        let req = pb::GetJobStatusRequest { history_limit: 10, ..Default::default() };
                        jobs.get_job_status(req).await.expect("every poll is answered");
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        let (a, updates) = (addr.clone(), updates.clone());
        tasks.push(tokio::spawn(async move {
            let mut jobs = job_client(&a, None).await.expect("connect");
            let req = pb::WatchJobRequest { history_limit: 10, ..Default::default() };
            let mut stream = jobs.watch_job(req).await.expect("watch").into_inner();
            // The stream ends when the job does.
            while let Some(m) = stream.message().await.expect("the stream stays up") {
                assert!(m.status.is_some());
                updates.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut from = None;
    loop {
        let s = job_status(&addr).await.unwrap();
        if s.step >= 2 && from.is_none() {
            from = Some((Instant::now(), s.step));
        }
        if s.state == pb::JobState::Completed as i32 {
            break;
        }
        assert!(
            !s.workers.iter().any(|w| w.state == pb::WorkerState::Lost as i32),
            "a worker was marked lost under load:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (t0, s0) = from.expect("step 2 seen");
    let per_iteration = t0.elapsed().as_secs_f64() / (steps() - s0) as f64;
    stop.send(true).unwrap();
    for t in tasks {
        t.await.expect("a client failed");
    }
    for w in &mut ws {
        assert!(
            w.wait_timeout(Duration::from_secs(60)).is_some_and(|s| s.success()),
            "{}",
            c.logs()
        );
    }
    let s = job_status(&addr).await.unwrap();
    (per_iteration, s, calls.load(Ordering::Relaxed), updates.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_pollers_and_watchers_do_not_disturb_training() {
    let clients = std::env::var("LOAD_CLIENTS").map_or(8, |n| n.parse().expect("a count"));
    let (unloaded, _, _, _) = run(0).await;
    let (loaded, s, calls, updates) = run(clients).await;
    assert_eq!((s.step, s.generation), (steps(), 1), "no re-formed world: {}", s.message);
    assert!(s.workers.iter().all(|w| w.state == pb::WorkerState::Stopped as i32), "{s:?}");
    assert!(calls > 0 && updates >= clients as u64, "{calls} calls, {updates} updates");
    println!(
        "load: {clients} pollers at 20/s and {clients} watchers; {calls} polls and {updates} \
         stream updates answered; {:.3} s per iteration loaded vs {:.3} s unloaded ({:+.1} %)",
        loaded,
        unloaded,
        (loaded / unloaded - 1.0) * 100.0
    );
}
