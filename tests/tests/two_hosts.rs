//! Two hosts with their own addresses and interfaces: two network namespaces joined by a veth
//! pair, `deploy/launch.sh` with `NNODES=2` in each, the coordinator and two CPU workers on
//! host A, two on host B. Host B's link goes down in the middle of the job and comes back; the
//! world re-forms and the job finishes with the reward log of an uninterrupted run, which is the
//! same job on one host over loopback.
//!
//! Host A names its interface in `GLOO_SOCKET_IFNAME`; host B sets nothing, so Gloo binds to
//! the address of its route to the store's host. Both ways must reach the other host: Gloo
//! bound to a loopback or unreachable address makes the first rendezvous hang and the test fail.
//!
//! Needs root (to make namespaces), as CI has; anywhere else it says why and does nothing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dancegrpo_e2e::scripts::{self, Script, command_under, logs};
use dancegrpo_e2e::{TEST_TOKEN, bin_dir, free_port, with_test_defaults};

const HOST_A: &str = "10.77.0.1";
const HOST_B: &str = "10.77.0.2";
const STEPS: usize = 8;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two network namespaces, `a` and `b`, joined by a veth pair `va` (in a, `HOST_A`) and `vb`
/// (in b, `HOST_B`); both deleted, with the pair, when dropped.
struct Hosts {
    a: String,
    b: String,
    va: String,
    vb: String,
}

impl Hosts {
    fn new() -> Result<Hosts, String> {
        let id = std::process::id();
        remove_stale();
        let h = Hosts {
            a: format!("dg2h-{id}-a"),
            b: format!("dg2h-{id}-b"),
            va: format!("dg{id}a"),
            vb: format!("dg{id}b"),
        };
        ip(&["netns", "add", &h.a])?;
        let h = h; // from here on, Drop cleans up whatever was made
        ip(&["netns", "add", &h.b])?;
        ip(&["link", "add", &h.va, "type", "veth", "peer", "name", &h.vb])?;
        ip(&["link", "set", &h.va, "netns", &h.a])?;
        ip(&["link", "set", &h.vb, "netns", &h.b])?;
        for (ns, dev, addr) in [(&h.a, &h.va, HOST_A), (&h.b, &h.vb, HOST_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(h)
    }

    /// Host B's link down or up.
    fn link_b(&self, up: bool) {
        ip(&["-n", &self.b, "link", "set", &self.vb, if up { "up" } else { "down" }])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the pair, and with it the other end.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Namespaces left by an earlier run of this test that was killed before its Drop ran.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("dg2h-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Why namespaces cannot be made here, if they cannot.
fn cannot_make_namespaces() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no `ip` (iproute2) on PATH".into()),
    }
}

fn reward_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .lines()
        .map(String::from)
        .collect()
}

/// The variables both hosts' `launch.sh` get.
fn job_vars<'a>(dir: &'a Path, bins: &'a str) -> Vec<(&'a str, String)> {
    vec![
        ("DEVICE", "cpu".into()),
        ("BIN_DIR", bins.into()),
        ("CONFIG", dir.join("job.toml").display().to_string()),
        ("DANCEGRPO_AUTH_TOKEN_FILE", dir.join("token").display().to_string()),
        ("DANCEGRPO_THREADS", "1".into()),
        // A silent host is lost after 2 s; a collective stuck on it fails after 10 s.
        ("DANCEGRPO_HEARTBEAT_INTERVAL_MS", "250".into()),
        ("DANCEGRPO_HEARTBEAT_TIMEOUT_MS", "2000".into()),
        ("DANCEGRPO_COLLECTIVE_TIMEOUT_S", "10".into()),
    ]
}

fn borrowed<'a>(v: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Seconds since midnight UTC, now.
fn now_of_day() -> f64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    t.as_secs_f64() % 86_400.0
}

/// Seconds since midnight UTC of a log line's leading RFC 3339 time (`...T13:59:14.056844Z`).
fn log_time(line: &str) -> Option<f64> {
    let clock = line.split_whitespace().next()?.split('T').nth(1)?.strip_suffix('Z')?;
    let mut parts = clock.split(':').map(|p| p.parse::<f64>().ok());
    Some(parts.next()?? * 3600.0 + parts.next()?? * 60.0 + parts.next()??)
}

#[test]
fn two_hosts_lose_and_regain_a_link_and_finish_as_an_uninterrupted_run() {
    if let Some(why) = cannot_make_namespaces() {
        eprintln!("two_hosts: not run: {why}");
        return;
    }
    let config = with_test_defaults(&format!(
        "max_train_steps = {STEPS}\ncheckpointing_steps = 2\nreward_log = \"reward.txt\"\n"
    ));
    let bins = bin_dir().display().to_string();

    // The uninterrupted run: the same four ranks on one host, over loopback.
    let one = tempfile::tempdir().expect("tempdir");
    std::fs::write(one.path().join("job.toml"), &config).expect("config");
    std::fs::write(one.path().join("token"), TEST_TOKEN).expect("token");
    let mut vars = job_vars(one.path(), &bins);
    vars.extend([("NNODES", "1".into()), ("NPUS_PER_NODE", "4".into())]);
    vars.extend([("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", free_port().to_string())]);
    let run = scripts::run("launch.sh", one.path(), &borrowed(&vars), Duration::from_secs(240));
    assert!(
        run.status.success(),
        "the one-host run: {}\n{}\n{}",
        run.status,
        run.output,
        logs(one.path())
    );
    let expected = reward_lines(&one.path().join("out/reward.txt"));
    assert_eq!(expected.len(), STEPS, "the one-host run's reward log");
    eprintln!("one host: {STEPS} steps in {:.1} s", run.took.as_secs_f64());

    // Two hosts.
    let hosts = Hosts::new().unwrap_or_else(|e| panic!("making the two hosts: {e}"));
    let two = tempfile::tempdir().expect("tempdir");
    let d = two.path();
    std::fs::write(d.join("job.toml"), &config).expect("config");
    std::fs::write(d.join("token"), TEST_TOKEN).expect("token");
    let node = |rank: &str, ifname: Option<&str>| {
        let mut v = job_vars(d, &bins);
        v.extend([
            ("NNODES", "2".into()),
            ("NODE_RANK", rank.into()),
            ("NPUS_PER_NODE", "2".into()),
        ]);
        v.extend([("MASTER_ADDR", HOST_A.into()), ("MASTER_PORT", "29500".into())]);
        v.extend(ifname.map(|i| ("GLOO_SOCKET_IFNAME", i.to_string())));
        v
    };
    let (va, vb) = (node("0", Some(&hosts.va)), node("1", None));
    let a = Script::spawn(
        "host-a",
        d,
        command_under(&["ip", "netns", "exec", &hosts.a], "launch.sh", d, &borrowed(&va)),
    );
    let b = Script::spawn(
        "host-b",
        d,
        command_under(&["ip", "netns", "exec", &hosts.b], "launch.sh", d, &borrowed(&vb)),
    );

    // Mid-job: just after step 3 is recorded, the ranks are in step 4. Host B goes dark for
    // longer than the heartbeat timeout, so the coordinator loses both of its workers.
    let reward = d.join("out/reward.txt");
    let start = Instant::now();
    while std::fs::read_to_string(&reward).map(|s| s.lines().count()).unwrap_or(0) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no 3 steps in 180 s:\n{}\n{}\n{}",
            a.output(),
            b.output(),
            logs(d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let steps_before = reward_lines(&reward).len();
    hosts.link_b(false);
    let down = Instant::now();
    let down_at = now_of_day();
    std::thread::sleep(Duration::from_secs(5));
    hosts.link_b(true);
    let up_at = now_of_day();
    eprintln!(
        "host B's link down for {:.1} s after step {steps_before}",
        down.elapsed().as_secs_f64()
    );

    let rb = b.wait(Duration::from_secs(240));
    let ra = a.wait(Duration::from_secs(30));
    let all = format!("host A:\n{}\nhost B:\n{}\n{}", ra.output, rb.output, logs(d));
    assert!(ra.status.success() && rb.status.success(), "A {} B {}:\n{all}", ra.status, rb.status);
    let recovered = down.elapsed();
    eprintln!("two hosts: the job ended {:.1} s after the link went down", recovered.as_secs_f64());

    // The fault was seen: both of B's workers lost, a newer world formed.
    let coordinator = logs(d);
    for line in coordinator.lines() {
        if ["lost", "world formed", "rewind", "re-form"].iter().any(|w| line.contains(w)) {
            eprintln!("  {line}");
        }
    }
    // The figures of RELIABILITY.md, from the coordinator's log times.
    let at = |needle: &str| coordinator.lines().filter(|l| l.contains(needle)).find_map(log_time);
    if let (Some(lost), Some(reformed)) =
        (at("no heartbeat for"), at("world re-formed (generation 2)"))
    {
        eprintln!(
            "lost {:.1} s after the link went down; re-formed {:.1} s after it came back",
            lost - down_at,
            reformed - up_at
        );
    }
    let lost = coordinator.matches("no heartbeat for").count();
    assert!(lost >= 2, "B's two workers were not both lost ({lost}):\n{all}");
    assert!(
        coordinator.contains("world re-formed (generation 2)"),
        "no second world formed:\n{all}"
    );
    assert_eq!(
        reward_lines(&reward),
        expected,
        "the reward log differs from the uninterrupted run's:\n{all}"
    );
}

#[test]
fn a_gloo_interface_that_is_not_there_stops_the_worker_at_once_naming_it() {
    let out = Command::new(dancegrpo_e2e::bin("dancegrpo-worker"))
        .args(["run", "--connect-timeout-s", "1"])
        .env("GLOO_SOCKET_IFNAME", "lo,nosuch9")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .expect("run the worker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("GLOO_SOCKET_IFNAME=lo,nosuch9: no interface nosuch9 on this host (it has: ")
            && err.contains("lo"),
        "{err}"
    );
}
