//! The control plane end to end: real coordinator and worker processes on loopback.

use std::time::Duration;

use dancegrpo_e2e::{Cluster, await_condition, job_status, workers_in};
use dancegrpo_proto::pb;

const CONFIG: &str = "job_name = \"e2e\"\nnum_generations = 4\nsampling_steps = 4\n";
// Fast heartbeats keep the tests short; the loss timeout is still many intervals long.
const FAST: &[&str] =
    &["--world-size", "2", "--heartbeat-interval-ms", "100", "--heartbeat-timeout-ms", "1500"];

async fn running_ranks(addr: &str) -> Option<Vec<u32>> {
    let s = job_status(addr).await.ok()?;
    let mut ranks: Vec<u32> =
        workers_in(&s, pb::WorkerState::Running).iter().filter_map(|w| w.rank).collect();
    ranks.sort();
    (ranks.len() == 2 && s.state == pb::JobState::Running as i32).then_some(ranks)
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_register_get_ranks_and_a_killed_one_is_lost() {
    let c = Cluster::new(CONFIG);
    let (_coord, addr) = c.coordinator(FAST);
    // Local rank 1 starts first; ranks still follow (node rank, local rank).
    let w1 = c.worker(&addr, 0, 1, &[]);
    let mut w0 = c.worker(&addr, 0, 0, &[]);
    let ranks =
        await_condition(Duration::from_secs(30), "2 running workers", || running_ranks(&addr))
            .await;
    assert_eq!(ranks, vec![0, 1]);
    let s = job_status(&addr).await.unwrap();
    assert_eq!(s.world_size, 2);
    assert_eq!(s.job_name, "e2e");
    for w in &s.workers {
        let info = w.info.as_ref().unwrap();
        assert_eq!(w.rank, Some(info.local_rank), "rank follows the slot");
        let dev = info.device.as_ref().unwrap();
        assert_eq!(dev.device, "cpu");
        assert!(dev.description.contains("libtorch"), "{dev:?}");
        assert!(w.last_heartbeat_unix_ms > 0);
    }

    // Let both finish forming the c10d group first: a rank dying mid-rendezvous is a
    // different failure (the survivor's rendezvous errors out) than the one tested here.
    for w in [&w0, &w1] {
        wait_for_log(w, "generation=1 backend=gloo", Duration::from_secs(60));
    }
    // SIGSTOP: a hung process, still there (so its pid tells nothing) but silent: only the
    // missed heartbeats reveal it. (A killed one on this machine is seen at once: its pid.)
    w0.signal("STOP");
    let started = std::time::Instant::now();
    let lost = await_condition(Duration::from_secs(10), "rank 0 marked lost", || async {
        let s = job_status(&addr).await.ok()?;
        workers_in(&s, pb::WorkerState::Lost).first().map(|w| (w.rank, s.message.clone()))
    })
    .await;
    assert_eq!(lost.0, Some(0));
    assert!(lost.1.contains("lost: no heartbeat"), "{}", lost.1);
    // Heartbeat timeout 1.5 s, checked every 100 ms: well inside 1.5 s + slack.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1200) && took < Duration::from_secs(5), "took {took:?}");
    w0.signal("KILL");
    w0.wait_timeout(Duration::from_secs(5)).expect("killed");
    let s = job_status(&addr).await.unwrap();
    assert_eq!(workers_in(&s, pb::WorkerState::Running).len(), 1, "the survivor keeps running");
    drop(w1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_says_goodbye_and_exits_zero() {
    let c = Cluster::new(CONFIG);
    let (_coord, addr) = c.coordinator(FAST);
    let mut w0 = c.worker(&addr, 0, 0, &[]);
    let _w1 = c.worker(&addr, 0, 1, &[]);
    await_condition(Duration::from_secs(30), "2 running workers", || running_ranks(&addr)).await;
    w0.signal("TERM");
    let status = w0.wait_timeout(Duration::from_secs(10)).expect("worker exits after SIGTERM");
    assert!(status.success(), "exit {status}:\n{}", w0.log());
    let s = job_status(&addr).await.unwrap();
    let stopped = workers_in(&s, pb::WorkerState::Stopped);
    assert_eq!(stopped.len(), 1, "{s:?}\n{}", w0.log());
    assert_eq!(stopped[0].rank, Some(0));
    assert!(workers_in(&s, pb::WorkerState::Lost).is_empty(), "stopped is not lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn job_record_survives_a_coordinator_restart() {
    let c = Cluster::new(CONFIG);
    let (mut coord, addr) = c.coordinator(FAST);
    let _w0 = c.worker(&addr, 0, 0, &[]);
    let _w1 = c.worker(&addr, 0, 1, &[]);
    await_condition(Duration::from_secs(30), "2 running workers", || running_ranks(&addr)).await;
    // Generation 1 is fully formed first; a generation superseded mid-rendezvous only ends at
    // the collective timeout (see the worker's join).
    wait_for_logs(&[&_w0, &_w1], "generation=1 backend=gloo", Duration::from_secs(60));
    let before = job_status(&addr).await.unwrap();
    coord.signal("KILL");
    coord.wait_timeout(Duration::from_secs(5)).expect("coordinator killed");

    let (_coord, addr2) = c.coordinator_on(&addr, FAST);
    let after = job_status(&addr2).await.unwrap();
    assert_eq!(after.job_id, before.job_id, "same job record after restart");
    assert_eq!(after.created_unix_ms, before.created_unix_ms);
    // The previous workers are on record (re-registrations may already have added more).
    let ids: Vec<&str> = after.workers.iter().map(|w| w.worker_id.as_str()).collect();
    for w in &before.workers {
        assert!(ids.contains(&w.worker_id.as_str()), "{} missing from {ids:?}", w.worker_id);
    }
    let mut list = dancegrpo_proto::pb::job_service_client::JobServiceClient::connect(format!(
        "http://{addr2}"
    ))
    .await
    .unwrap();
    let jobs = list.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].job_id, before.job_id);
    // The workers were never restarted: they find themselves forgotten, register again, and
    // the world re-forms under the next generation.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let back = match job_status(&addr2).await {
            Ok(s) if s.generation >= 2 => running_ranks(&addr2).await.is_some(),
            _ => false,
        };
        if back {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "workers not back after the restart:\n{:?}\n{}\n-----\n{}\n-----\n{}",
            job_status(&addr2).await.map(|s| (s.generation, s.message, s.workers.len())),
            std::fs::read_to_string(c.path("coordinator.log")).unwrap_or_default(),
            _w0.log(),
            _w1.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_logs(&[&_w0, &_w1], "generation=2 backend=gloo", Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_started_before_the_coordinator_wait_for_it() {
    let c = Cluster::new(CONFIG);
    // Reserve a port, release it, start workers against it, then the coordinator on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let _w0 = c.worker(&addr, 0, 0, &[]);
    let _w1 = c.worker(&addr, 0, 1, &[]);
    std::thread::sleep(Duration::from_millis(700));
    let (_coord, addr) = c.coordinator_on(&addr, FAST);
    await_condition(Duration::from_secs(30), "2 running workers", || running_ranks(&addr)).await;
}

fn wait_for_logs(ps: &[&dancegrpo_e2e::Proc], needle: &str, limit: Duration) {
    let end = std::time::Instant::now() + limit;
    while !ps.iter().all(|p| p.log().contains(needle)) {
        if std::time::Instant::now() > end {
            let logs: Vec<String> = ps.iter().map(|p| p.log()).collect();
            panic!("no {needle:?} within {limit:?} in every log:\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_log(p: &dancegrpo_e2e::Proc, needle: &str, limit: Duration) {
    let end = std::time::Instant::now() + limit;
    while !p.log().contains(needle) {
        assert!(std::time::Instant::now() < end, "no {needle:?} within {limit:?} in:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Training runs meanwhile: the survivor's all-reduce with the dead rank fails within this.
const FAST_COLLECTIVES: [&str; 2] = ["--collective-timeout-s", "10"];

/// Starts ranks 0 and 1, waits until both formed the generation-1 group, then kill -9s rank 1
/// and reaps it. Returns both processes.
fn two_ranks_then_kill_rank_1(
    c: &Cluster,
    addr: &str,
    worker_args: &[&str],
) -> (dancegrpo_e2e::Proc, dancegrpo_e2e::Proc) {
    two_ranks_then_kill(c, addr, worker_args, 1)
}

/// Two ranks form their group, then rank `victim` is killed (-9) and reaped. Returns the
/// survivor and the dead one.
fn two_ranks_then_kill(
    c: &Cluster,
    addr: &str,
    worker_args: &[&str],
    victim: u32,
) -> (dancegrpo_e2e::Proc, dancegrpo_e2e::Proc) {
    let mut ws = [c.worker(addr, 0, 0, worker_args), c.worker(addr, 0, 1, worker_args)];
    for w in &ws {
        wait_for_log(w, "generation=1 backend=gloo", Duration::from_secs(60));
    }
    let dead = &mut ws[victim as usize];
    dead.signal("KILL");
    dead.wait_timeout(Duration::from_secs(5)).expect("killed and reaped");
    let [w0, w1] = ws;
    if victim == 1 { (w0, w1) } else { (w1, w0) }
}

/// A worker dies; a replacement takes its slot and rank; the survivor re-forms the c10d group
/// with it under a new generation (fresh store prefix) without being restarted.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_rank_is_replaced_and_the_group_re_forms_without_restarting_survivors() {
    let c = Cluster::new(CONFIG);
    let (_coord, addr) = c.coordinator(FAST);
    let (w0, w1) = two_ranks_then_kill_rank_1(&c, &addr, &FAST_COLLECTIVES);
    await_condition(Duration::from_secs(10), "rank 1 lost", || async {
        let s = job_status(&addr).await.ok()?;
        (!workers_in(&s, pb::WorkerState::Lost).is_empty()).then_some(())
    })
    .await;
    drop(w1);
    let w1b = c.worker(&addr, 0, 1, &FAST_COLLECTIVES);
    wait_for_log(&w1b, "process group ready", Duration::from_secs(60));
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while w0.log().matches("process group ready").count() < 2 {
        assert!(std::time::Instant::now() < end, "the survivor did not re-form:\n{}", w0.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = job_status(&addr).await.unwrap();
    // 2, or 3 when the survivor's failed all-reduce asked for a new world first.
    assert!(s.generation >= 2, "generation {}", s.generation);
    let running = workers_in(&s, pb::WorkerState::Running);
    let mut ranks: Vec<_> = running.iter().filter_map(|w| w.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1], "the replacement inherits rank 1");
    assert_eq!(
        w0.child.id(),
        s.workers
            .iter()
            .find(|w| w.rank == Some(0) && w.state == pb::WorkerState::Running as i32)
            .and_then(|w| w.info.as_ref())
            .map_or(0, |i| i.pid),
        "the survivor was not restarted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rank_never_replaced_fails_the_job_after_rank_replace_timeout_s() {
    let c = Cluster::new(&format!("{CONFIG}rank_replace_timeout_s = 3\n"));
    let (_coord, addr) = c.coordinator(FAST);
    let mut w0 = c.worker(&addr, 0, 0, &[]);
    let mut w1 = c.worker(&addr, 0, 1, &[]);
    await_condition(Duration::from_secs(30), "2 running workers", || running_ranks(&addr)).await;
    w1.signal("KILL");
    w1.wait_timeout(Duration::from_secs(5)).expect("killed");
    let killed = std::time::Instant::now();
    let message = await_condition(Duration::from_secs(30), "the job failed", || async {
        let s = job_status(&addr).await.ok()?;
        (s.state == pb::JobState::Failed as i32).then_some(s.message)
    })
    .await;
    let took = killed.elapsed();
    eprintln!("kill -9 to job failed: {:.2} s", took.as_secs_f64());
    assert!(
        message.contains("rank 1 (last on ") && message.contains("not replaced within 3s"),
        "{message}"
    );
    // Heartbeat timeout 1.5 s, then 3 s: the bound holds, with slack for a loaded machine.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let st = w0.wait_timeout(Duration::from_secs(30)).expect("the survivor exits");
    assert!(!st.success(), "a survivor of a failed job exits non-zero:\n{}", c.logs());
}

/// At the default settings (a 300 s collective timeout, a 10 s heartbeat timeout), a kill -9
/// and an immediate restart cost well under the heartbeat timeout: the coordinator frees the
/// slot of a local process that is gone, and the survivor abandons the rendezvous it had begun
/// around the dead rank as soon as the newer world is assigned, instead of waiting out its
/// collective timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_restarted_at_once_takes_its_slot_and_the_survivor_rejoins_within_seconds() {
    restart_at_once(1).await;
}

/// The same for rank 0, which hosts the TCPStore: the survivor gives up dialing the dead store.
#[tokio::test(flavor = "multi_thread")]
async fn rank_0_restarted_at_once_hosts_a_new_store_and_the_survivor_rejoins_within_seconds() {
    restart_at_once(0).await;
}

async fn restart_at_once(victim: u32) {
    let c = Cluster::new(CONFIG);
    let (_coord, addr) = c.coordinator(&["--world-size", "2"]);
    let (w0, w1) = two_ranks_then_kill(&c, &addr, &[], victim);
    drop(w1);
    let restarted = std::time::Instant::now();
    let w1b = c.worker(&addr, 0, victim, &[]);
    wait_for_log(&w1b, "process group ready", Duration::from_secs(60));
    let took = restarted.elapsed();
    // The figure RELIABILITY.md records (`--nocapture`).
    eprintln!("rank {victim}: restart to process group ready: {:.2} s", took.as_secs_f64());
    assert!(took < Duration::from_secs(10), "took {took:?}: {}", c.logs());
    assert!(!w1b.log().contains("slot still held"), "{}", w1b.log());
    // Seen when the replacement registers, or by the coordinator's tick before that.
    assert!(c.logs().contains("worker lost: its process"), "{}", c.logs());
    let s = job_status(&addr).await.unwrap();
    assert!(s.generation >= 2, "generation {}", s.generation);
    let mut ranks: Vec<_> =
        workers_in(&s, pb::WorkerState::Running).iter().filter_map(|w| w.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1], "{}", s.message);
    // The job trains on, the survivor never restarted.
    await_condition(Duration::from_secs(60), "a step after the restart", || async {
        let s = job_status(&addr).await.ok()?;
        (s.step >= 1).then_some(())
    })
    .await;
    assert!(w0.log().matches("process group ready").count() >= 2, "{}", w0.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compute_panic_discards_the_rank_state_rejoins_and_the_job_completes() {
    let c = Cluster::new("job_name = \"panic\"\nmax_train_steps = 3\nnum_generations = 2\n");
    let (_coord, addr) = c.coordinator(&["--world-size", "2", "--heartbeat-interval-ms", "200"]);
    let mut w0 = c.worker(&addr, 0, 0, &[]);
    // Rank 1 panics in its second update, after step 1 (not checkpointed) was trained.
    let fault = [("FAILPOINTS", "train=1*off->1*panic(injected fault)")];
    let mut w1 = c.worker_with_env(&addr, 0, 1, &[], &fault);
    let started = std::time::Instant::now();
    for (rank, w) in [&mut w0, &mut w1].into_iter().enumerate() {
        let st = w.wait_timeout(Duration::from_secs(180));
        assert!(st.is_some_and(|s| s.success()), "rank {rank} ({st:?}):\n{}", c.logs());
    }
    let log = w1.log();
    assert!(
        log.contains("compute job panicked; rejoining from the last checkpoint")
            && log.contains("injected fault"),
        "{log}"
    );
    let s = job_status(&addr).await.unwrap();
    assert_eq!((s.state, s.step), (pb::JobState::Completed as i32, 3), "{}", s.message);
    assert!(s.generation >= 2, "the world re-formed around the panicked rank");
    let rewards = std::fs::read_to_string(c.path("out/reward.txt")).unwrap();
    assert_eq!(rewards.lines().count(), 3, "one line per step, none twice:\n{rewards}");
    // The survivor's collective failed at once, not at the collective timeout (300 s).
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
}
