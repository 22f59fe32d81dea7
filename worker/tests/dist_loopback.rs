//! Multi-process tests of the c10d data plane on loopback (Gloo, CPU).
//!
//! Each test re-executes this test binary once per rank, filtered to itself, with the rank in
//! `DG_TEST_RANK`: the parent spawns and judges, the children (same function, rank set) form a
//! real group over a real TCPStore and assert their exact results.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dancegrpo_proto::{RankAssignment, StoreAddress};
use dancegrpo_worker::dist::{
    Backend, DistError, Generations, GroupOptions, ProcessGroup, ReduceOp, Store,
};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

/// What a child process knows about its place.
struct Rank {
    rank: u32,
    world: u32,
    port: u16,
}

/// `Some` in a child process: the test body runs as that rank.
fn child() -> Option<Rank> {
    let rank = std::env::var("DG_TEST_RANK").ok()?.parse().ok()?;
    let world = std::env::var("DG_TEST_WORLD").unwrap().parse().unwrap();
    let port = std::env::var("DG_TEST_PORT").unwrap().parse().unwrap();
    tch::set_num_threads(1);
    Some(Rank { rank, world, port })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Spawns `ranks` of a world of `world` running `test` (this file's test of that name).
fn spawn(test: &str, world: u32, ranks: &[u32], port: u16) -> Vec<Child> {
    ranks
        .iter()
        .map(|&r| {
            Command::new(std::env::current_exe().unwrap())
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env("DG_TEST_RANK", r.to_string())
                .env("DG_TEST_WORLD", world.to_string())
                .env("DG_TEST_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Waits for every child (killing all of them past `limit`, so a hang fails instead of
/// hanging the suite) and asserts they all passed.
fn join(children: Vec<Child>, limit: Duration) {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut failures = Vec::new();
    while children.iter().any(Option::is_some) {
        for (r, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            if c.try_wait().unwrap().is_some() || start.elapsed() > limit {
                let _ = c.kill();
                let out = slot.take().unwrap().wait_with_output().unwrap();
                if !out.status.success() {
                    failures.push(format!(
                        "rank {r} failed ({}, after {:?}):\n{}\n{}",
                        out.status,
                        start.elapsed(),
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn assignment(r: &Rank, prefix: &str) -> RankAssignment {
    RankAssignment {
        rank: r.rank,
        world_size: r.world,
        generation: 1,
        store: StoreAddress { host: "127.0.0.1".into(), port: r.port, prefix: prefix.into() },
    }
}

fn opts(timeout_s: u64) -> GroupOptions {
    GroupOptions::default().with_timeout(Duration::from_secs(timeout_s))
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

#[test]
fn three_ranks_collectives_are_exact() {
    let Some(me) = child() else {
        let port = free_port();
        join(
            spawn("three_ranks_collectives_are_exact", 3, &[0, 1, 2], port),
            Duration::from_secs(90),
        );
        return;
    };
    let r = me.rank as f32;
    let mut pg = ProcessGroup::from_assignment(
        &assignment(&me, "dancegrpo/t/gen1/"),
        Backend::Gloo,
        &opts(20),
    )
    .unwrap();
    assert_eq!((pg.rank(), pg.world_size()), (me.rank, 3));

    // Sum and average, each dtype. Values are small integers and halves, exact in bf16/f16.
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let base = Tensor::from_slice(&[1f32, 2., 4., 8., -0.5]);
        let mut t = (&base * f64::from(r + 1.0)).to_kind(kind);
        pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        assert_eq!(t.kind(), kind);
        assert_eq!(values(&t), vec![6., 12., 24., 48., -3.], "sum {kind:?}");

        let mut t = (&base * f64::from(r + 1.0)).to_kind(kind);
        pg.all_reduce(&mut t, ReduceOp::Average).unwrap();
        assert_eq!(values(&t), vec![2., 4., 8., 16., -1.], "average {kind:?}");
    }

    // all_gather: rank order, shape kept.
    let mine = Tensor::from_slice(&[r, 10. * r]).view([1, 2]);
    let all = pg.all_gather(&mine).unwrap();
    assert_eq!(all.len(), 3);
    for (i, t) in all.iter().enumerate() {
        assert_eq!(t.size(), vec![1, 2]);
        assert_eq!(values(t), vec![i as f32, 10. * i as f32]);
    }
    let mut flat = Tensor::zeros([6], (Kind::BFloat16, tch::Device::Cpu));
    pg.all_gather_into(&mut flat, &Tensor::from_slice(&[r, -r]).to_kind(Kind::BFloat16)).unwrap();
    assert_eq!(values(&flat), vec![0., 0., 1., -1., 2., -2.]);

    // broadcast from rank 1.
    let mut t = Tensor::from_slice(&[r; 4]);
    pg.broadcast(&mut t, 1).unwrap();
    assert_eq!(values(&t), vec![1.; 4]);

    // reduce_scatter: input[i] = i + 100 r; the sum is 3 i + 300; rank r keeps [2r, 2r+1].
    let input = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)) + 100. * f64::from(r);
    let mut out = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    pg.reduce_scatter(&mut out, &input, ReduceOp::Sum).unwrap();
    let i0 = 2. * r;
    assert_eq!(values(&out), vec![3. * i0 + 300., 3. * (i0 + 1.) + 300.]);
    pg.reduce_scatter(&mut out, &input, ReduceOp::Average).unwrap();
    assert_eq!(values(&out), vec![i0 + 100., i0 + 1. + 100.]);

    pg.barrier().unwrap();

    // Mismatched sizes: every rank gets an error naming the disagreement, and the group stays
    // usable because the check runs before the real collective.
    let n = if me.rank == 2 { 4 } else { 5 };
    let mut t = Tensor::ones([n], (Kind::Float, tch::Device::Cpu));
    let e = pg.all_reduce(&mut t, ReduceOp::Sum).unwrap_err().to_string();
    assert!(e.contains("all_reduce failed") && e.contains("ranks disagree"), "{e}");
    assert!(e.contains("4 elements") && e.contains("5 elements"), "{e}");
    let mut t = Tensor::from_slice(&[1f32]);
    pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(values(&t), vec![3.]);

    // Unsupported dtypes and bad roots are refused before any communication.
    let mut t = Tensor::from_slice(&[1i64]);
    let e = pg.all_reduce(&mut t, ReduceOp::Sum).unwrap_err().to_string();
    assert!(e.contains("Int64") && e.contains("Float, BFloat16 or Half"), "{e}");
    let e = pg.broadcast(&mut Tensor::from_slice(&[1f32]), 3).unwrap_err().to_string();
    assert!(e.contains("root 3 outside a world of size 3"), "{e}");

    // Re-rendezvous: the next generation, a new prefix on the same live store, after the first
    // group is gone.
    let store: Arc<Store> = pg.store().clone();
    drop(pg);
    let mut pg2 =
        ProcessGroup::with_store(store, "dancegrpo/t/gen2/", me.rank, 3, Backend::Gloo, &opts(20))
            .unwrap();
    let mut t = Tensor::from_slice(&[r]);
    pg2.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(values(&t), vec![3.]);
}

#[test]
fn a_killed_peer_is_an_error_within_the_timeout_and_survivors_regroup() {
    const TIMEOUT_S: u64 = 5;
    let Some(me) = child() else {
        let port = free_port();
        let mut children = spawn(
            "a_killed_peer_is_an_error_within_the_timeout_and_survivors_regroup",
            3,
            &[0, 1, 2],
            port,
        );
        // Rank 2 says when the group is up; then it dies without a word to its peers.
        let mut victim = children.pop().unwrap();
        // libtest writes its own text around ours, hence `contains`; the thread and the
        // deadline keep a rank 2 that never comes up from hanging the test.
        let stdout = victim.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ready =
                BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.contains("READY"));
            let _ = tx.send(ready);
        });
        let ready = rx.recv_timeout(Duration::from_secs(60)).unwrap_or(false);
        victim.kill().unwrap();
        victim.wait().unwrap();
        assert!(ready, "rank 2 did not come up");
        join(children, Duration::from_secs(60));
        return;
    };
    let mut pg = ProcessGroup::from_assignment(
        &assignment(&me, "dancegrpo/k/gen1/"),
        Backend::Gloo,
        &opts(TIMEOUT_S),
    )
    .unwrap();
    pg.barrier().unwrap();
    if me.rank == 2 {
        println!("READY");
        std::thread::sleep(Duration::from_secs(120));
        unreachable!("rank 2 is killed by the parent");
    }
    let start = Instant::now();
    let mut err = None;
    // Rank 2 may still be alive for the first calls; it never joins one, so one fails.
    for _ in 0..3 {
        let mut t = Tensor::ones([1024], (Kind::Float, tch::Device::Cpu));
        if let Err(e) = pg.all_reduce(&mut t, ReduceOp::Sum) {
            err = Some(e);
            break;
        }
    }
    let elapsed = start.elapsed();
    let e = err.expect("all_reduce with a dead peer succeeded").to_string();
    assert!(e.contains("all_reduce failed") && e.contains(&format!("timeout {TIMEOUT_S}s")), "{e}");
    // The timeout bounds it; 3 s of slack covers process teardown on a loaded machine.
    assert!(elapsed < Duration::from_secs(TIMEOUT_S + 3), "took {elapsed:?}: {e}");

    // The survivors form generation 2 on rank 0's live store, without restarting.
    let store = pg.store().clone();
    drop(pg);
    let mut pg2 = ProcessGroup::with_store(
        store,
        "dancegrpo/k/gen2/",
        me.rank,
        2,
        Backend::Gloo,
        &opts(TIMEOUT_S),
    )
    .unwrap();
    let mut t = Tensor::from_slice(&[me.rank as f32 + 1.]);
    pg2.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(values(&t), vec![3.]);
}

/// The local addresses (`ip:port`, IPv4 as the kernel lists them) of this host's listening
/// TCP sockets on `port`, from /proc/net/tcp and /proc/net/tcp6.
fn listening_on(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st; 0A is LISTEN.
            let (Some(local), Some("0A")) = (f.get(1), f.get(3).copied()) else { continue };
            let Some((ip, p)) = local.split_once(':') else { continue };
            if u16::from_str_radix(p, 16).ok() == Some(port) {
                found.push(format!("{ip}:{port}"));
            }
        }
    }
    found
}

#[test]
fn the_store_listens_only_on_the_address_the_ranks_dial() {
    let store = Store::connect("127.0.0.1", 0, true, Duration::from_secs(5)).unwrap();
    let port = store.port();
    assert_ne!(port, 0);
    // 0100007F is 127.0.0.1 in the kernel's byte order; 00000000 would be every interface.
    assert_eq!(listening_on(port), vec![format!("0100007F:{port}")]);
    // And it serves: a client on the same address reaches it.
    let client = Store::connect("127.0.0.1", port, false, Duration::from_secs(5)).unwrap();
    assert_eq!(client.port(), port);
    drop(client);
    drop(store);
    assert!(listening_on(port).is_empty(), "the socket is closed with the store");
}

#[test]
fn a_peer_that_never_arrives_fails_the_rendezvous_within_the_timeout() {
    const TIMEOUT_S: u64 = 2;
    let Some(me) = child() else {
        let port = free_port();
        // Rank 2 of 3 never starts.
        join(
            spawn(
                "a_peer_that_never_arrives_fails_the_rendezvous_within_the_timeout",
                3,
                &[0, 1],
                port,
            ),
            Duration::from_secs(60),
        );
        return;
    };
    let start = Instant::now();
    let e = ProcessGroup::from_assignment(
        &assignment(&me, "dancegrpo/m/gen1/"),
        Backend::Gloo,
        &opts(TIMEOUT_S),
    )
    .unwrap_err()
    .to_string();
    let elapsed = start.elapsed();
    assert!(
        e.contains("rendezvous at 127.0.0.1:") && e.contains(&format!("timeout {TIMEOUT_S}s")),
        "{e}"
    );
    assert!(elapsed < Duration::from_secs(TIMEOUT_S + 3), "took {elapsed:?}: {e}");
}

/// Both ways a rendezvous can hang on a dead peer, called off from another thread the moment a
/// newer generation is assigned, with a timeout (60 s) the test would notice: a master waiting
/// for a rank that never arrives, and a client dialing a store whose host is gone.
#[test]
fn a_rendezvous_is_abandoned_at_once_when_a_newer_generation_is_assigned() {
    let generations = Generations::default();
    generations.assigned(1);
    let options = opts(60).abandon_when_superseded(generations.clone(), 1);
    let ranks = [(0, free_port()), (1, free_port())].map(|(rank, port)| {
        let a = assignment(&Rank { rank, world: 2, port }, "dancegrpo/a/gen1/");
        let options = options.clone();
        std::thread::spawn(move || ProcessGroup::from_assignment(&a, Backend::Gloo, &options))
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ranks.iter().all(|t| !t.is_finished()), "both wait for their missing peer");
    generations.assigned(2);
    let called_off = Instant::now();
    for t in ranks {
        match t.join().unwrap() {
            Err(DistError::Abandoned { generation: 1, newer: 2 }) => {}
            other => panic!("expected the rendezvous abandoned, got {other:?}"),
        }
    }
    let took = called_off.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn model_parameters_and_gradients_are_bit_identical_after_all_reduce() {
    let Some(me) = child() else {
        let port = free_port();
        join(
            spawn(
                "model_parameters_and_gradients_are_bit_identical_after_all_reduce",
                2,
                &[0, 1],
                port,
            ),
            Duration::from_secs(60),
        );
        return;
    };
    let mut pg = ProcessGroup::from_assignment(
        &assignment(&me, "dancegrpo/p/gen1/"),
        Backend::Gloo,
        &opts(20),
    )
    .unwrap();
    // Different seeds: the ranks start with different weights.
    tch::manual_seed(17 + me.rank as i64);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "fc1", 6, 16, Default::default()))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(vs.root() / "fc2", 16, 3, Default::default()));
    let mut params = vs.trainable_variables();
    let flat = |ts: &[Tensor]| {
        Tensor::cat(&ts.iter().map(|t| t.detach().flatten(0, -1)).collect::<Vec<_>>(), 0)
    };

    // Expected: the elementwise mean of both ranks' initial weights, computed locally.
    let before = pg.all_gather(&flat(&params)).unwrap();
    assert!(!before[0].equal(&before[1]), "ranks should start different");
    let expected = (&before[0] + &before[1]) / 2.;
    pg.all_reduce_many(&mut params, ReduceOp::Average).unwrap();
    let after = pg.all_gather(&flat(&params)).unwrap();
    assert!(after[0].equal(&after[1]), "parameters differ across ranks");
    assert!(after[me.rank as usize].equal(&expected), "not the mean of the ranks' weights");

    // Gradients from different data, averaged, then one identical SGD step on both ranks.
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::randn([8, 6], (Kind::Float, tch::Device::Cpu));
    let loss = net.forward(&x).square().mean(Kind::Float);
    opt.zero_grad();
    loss.backward();
    let mut grads: Vec<Tensor> = vs.trainable_variables().iter().map(|p| p.grad()).collect();
    let gathered = pg.all_gather(&flat(&grads)).unwrap();
    assert!(!gathered[0].equal(&gathered[1]), "gradients should differ before the all-reduce");
    pg.all_reduce_many(&mut grads, ReduceOp::Average).unwrap();
    opt.step();
    let stepped = pg.all_gather(&flat(&vs.trainable_variables())).unwrap();
    assert!(stepped[0].equal(&stepped[1]), "weights differ after an averaged step");
    assert!(!stepped[0].equal(&after[0]), "the step changed nothing");
}

/// NCCL and the CUDA device layer: one rank per visible GPU (NCCL refuses two ranks on one GPU).
/// Built by deploy/cuda-check.sh in CI, run by deploy/gpu-tests.sh on GPU hosts.
#[cfg(feature = "cuda")]
#[test]
fn cuda_nccl_collectives_and_device_moves_are_exact() {
    use dancegrpo_worker::device::Device;
    let Some(me) = child() else {
        let n = tch::Cuda::device_count();
        assert!(
            n >= 1,
            "no CUDA device visible: the cuda tests run on GPU hosts (deploy/gpu-tests.sh)"
        );
        let world = n.min(4) as u32;
        let ranks: Vec<u32> = (0..world).collect();
        join(
            spawn("cuda_nccl_collectives_and_device_moves_are_exact", world, &ranks, free_port()),
            Duration::from_secs(180),
        );
        return;
    };
    let dev: Device = format!("cuda:{}", me.rank).parse().unwrap();
    dev.init().unwrap();
    let backend = Backend::resolve(dev, "").unwrap();
    assert_eq!(backend, Backend::Nccl);
    let mut pg =
        ProcessGroup::from_assignment(&assignment(&me, "dancegrpo/c/gen1/"), backend, &opts(60))
            .unwrap();
    let (r, w) = (f64::from(me.rank), f64::from(me.world));
    let base = [1f32, 2., 4., 8., -0.5];
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let mut t = dev.to(&(Tensor::from_slice(&base) * (r + 1.0)).to_kind(kind)).unwrap();
        assert_eq!(t.device(), tch::Device::Cuda(me.rank as usize));
        pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        let s = w * (w + 1.) / 2.;
        assert_eq!(values(&t), base.map(|b| (f64::from(b) * s) as f32).to_vec(), "sum {kind:?}");
        let mut t = dev.to(&(Tensor::from_slice(&base) * (r + 1.0)).to_kind(kind)).unwrap();
        pg.all_reduce(&mut t, ReduceOp::Average).unwrap();
        let a = (w + 1.) / 2.;
        assert_eq!(
            values(&t),
            base.map(|b| (f64::from(b) * a) as f32).to_vec(),
            "average {kind:?}"
        );
    }
    let all = pg.all_gather(&dev.to(&Tensor::from_slice(&[r as f32])).unwrap()).unwrap();
    assert_eq!(
        all.iter().flat_map(values).collect::<Vec<_>>(),
        (0..me.world).map(|i| i as f32).collect::<Vec<_>>()
    );
    let input = dev
        .to(&(Tensor::arange(2 * i64::from(me.world), (Kind::Float, tch::Device::Cpu)) + 100. * r))
        .unwrap();
    let mut out = dev.to(&Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))).unwrap();
    pg.reduce_scatter(&mut out, &input, ReduceOp::Sum).unwrap();
    let i0 = 2. * r as f32;
    let off = 100. * (w * (w - 1.) / 2.) as f32;
    assert_eq!(values(&out), vec![w as f32 * i0 + off, w as f32 * (i0 + 1.) + off]);
    let mut t = dev.to(&Tensor::from_slice(&[r as f32; 3])).unwrap();
    pg.broadcast(&mut t, me.world - 1).unwrap();
    assert_eq!(values(&t), vec![(w - 1.) as f32; 3]);
    pg.barrier().unwrap();

    // A parameter set moved to the GPU keeps its tensors; averaged, it is identical everywhere.
    tch::manual_seed(5 + me.rank as i64);
    let mut vs = nn::VarStore::new(tch::Device::Cpu);
    let _ = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    dev.move_vars(&mut vs).unwrap();
    let mut params = vs.trainable_variables();
    assert!(params.iter().all(|p| p.device() == tch::Device::Cuda(me.rank as usize)));
    pg.all_reduce_many(&mut params, ReduceOp::Average).unwrap();
    dev.synchronize().unwrap();
    let flat =
        Tensor::cat(&params.iter().map(|p| p.detach().flatten(0, -1)).collect::<Vec<_>>(), 0);
    let gathered = pg.all_gather(&flat).unwrap();
    assert!(gathered.iter().all(|g| g.equal(&gathered[0])), "parameters differ across GPUs");
}
