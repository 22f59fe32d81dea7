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

/// CPU seconds (user and system) process `pid` has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process runs");
    // `pid (comm) S ...`: utime and stime are fields 14 and 15, the 12th and 13th after ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').expect("a stat line").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// What one run measured.
struct Run {
    /// Seconds per iteration from step 2 to the end (the first ones load the model).
    per_iteration: f64,
    /// The status at the end.
    status: pb::JobStatus,
    calls: u64,
    updates: u64,
    /// CPU seconds the coordinator used over the run.
    coordinator_cpu: f64,
}

async fn run(clients: usize) -> Run {
    let c = Cluster::new(&job());
    let (coord, addr) = c.coordinator(COORD);
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
    let status = job_status(&addr).await.unwrap();
    Run {
        per_iteration,
        status,
        calls: calls.load(Ordering::Relaxed),
        updates: updates.load(Ordering::Relaxed),
        coordinator_cpu: cpu_seconds(coord.child.id()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_pollers_and_watchers_do_not_disturb_training() {
    let clients = std::env::var("LOAD_CLIENTS").map_or(8, |n| n.parse().expect("a count"));
    let idle = run(0).await;
    let Run { per_iteration: loaded, status: s, calls, updates, coordinator_cpu } =
        run(clients).await;
    let unloaded = idle.per_iteration;
    assert_eq!((s.step, s.generation), (steps(), 1), "no re-formed world: {}", s.message);
    assert!(s.workers.iter().all(|w| w.state == pb::WorkerState::Stopped as i32), "{s:?}");
    assert!(calls > 0 && updates >= clients as u64, "{calls} calls, {updates} updates");
    println!(
        "load: {clients} pollers at 20/s and {clients} watchers; {calls} polls and {updates} \
         stream updates answered; {:.3} s per iteration loaded vs {:.3} s unloaded ({:+.1} %); \
         coordinator CPU {:.2} s loaded vs {:.2} s unloaded, {:.0} µs per poll or update",
        loaded,
        unloaded,
        (loaded / unloaded - 1.0) * 100.0,
        coordinator_cpu,
        idle.coordinator_cpu,
        (coordinator_cpu - idle.coordinator_cpu) * 1e6 / (calls + updates) as f64
    );
}
