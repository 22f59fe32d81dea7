//! `deploy/slurm/dancegrpo.sbatch` on a real Slurm: a two-node cluster on this machine (one
//! `slurmctld`, two `slurmd -N`, and a `munged` of its own), everything in a temp dir, with a
//! `slurm.conf` the client tools find through `SLURM_CONF`: nothing of the system's Slurm or
//! munge is read or touched. The job is the tiny model on CPU, one worker per node. It runs to the
//! end once; then again, requeued half-way as the time limit's signal requeues it, and must go
//! on from its checkpoint to the very rewards of the uninterrupted run.
//!
//! Slurm (`slurm-wlm`) and munge must be installed, and the test run as root (slurmd runs jobs as
//! their users): `make test` installs them (deploy/bootstrap.sh --test). Without them the test
//! fails, saying so. A second test runs the per-node step under a recorded Slurm environment of a
//! GPU node, which this CPU-only cluster cannot give.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dancegrpo_e2e::scripts;
use dancegrpo_e2e::{bin_dir, free_port, with_test_defaults, workspace_root};

/// Set on every process this test's cluster starts (daemons and jobs), so that all of them can
/// be found and killed at the end.
const MARKER: &str = "E2E_SLURM_CLUSTER";

/// A binary of Slurm's or munge's: on PATH, or in the sbin folders a non-login PATH may lack.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').map(PathBuf::from);
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin"].map(PathBuf::from);
    dirs.chain(extra).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} not found: this test needs Slurm and munge (Debian's slurm-wlm and munge); \
             run the set-up: `make test`, or `./deploy/bootstrap.sh --test`"
        )
    })
}

/// This machine's short host name, which slurmctld and slurmd check their config against.
fn hostname() -> String {
    let out = Command::new("hostname").arg("-s").output().expect("run hostname");
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success() && !name.is_empty(), "hostname -s: {out:?}");
    name
}

/// Runs `cmd` to its end, at most `limit`: whether it succeeded and its stdout and stderr as
/// text; `None` (and killed) when it did not end in time.
fn try_run_bounded(mut cmd: Command, limit: Duration) -> Option<(bool, String)> {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().ok()?;
    let start = Instant::now();
    while child.try_wait().ok()?.is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output { status, stdout, stderr } = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&stdout).into_owned() + &String::from_utf8_lossy(&stderr);
    Some((status.success(), text))
}

/// [`try_run_bounded`], panicking when `cmd` cannot start or does not end within `limit`.
fn run_bounded(cmd: Command, limit: Duration) -> (bool, String) {
    let what = format!("{cmd:?}");
    try_run_bounded(cmd, limit)
        .unwrap_or_else(|| panic!("{what} did not start, or not finish within {limit:?}"))
}

/// A daemon in the foreground, in its own process group, its output in `<dir>/<name>.out`.
struct Daemon {
    name: String,
    child: Child,
}

/// Sends `sig` to process group `pgid`; an exited group is ESRCH, harmless.
fn kill_group(pgid: u32, sig: i32) {
    // SAFETY: kill(2) on a process group this test started.
    unsafe { libc::kill(-(pgid as i32), sig) };
}

/// The processes (not this one) whose environment holds `MARKER=<value>`.
fn marked_processes(value: &str) -> Vec<i32> {
    let needle = format!("{MARKER}={value}");
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

/// A one-machine Slurm cluster of two nodes, `n1` and `n2`, in a temp dir. Dropping it cancels
/// its jobs, stops its daemons and kills whatever they started, then removes the dir.
struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    daemons: Vec<Daemon>,
}

impl Slurm {
    fn start() -> Slurm {
        // SAFETY: geteuid(2) has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(uid, 0, "this test starts slurmctld and slurmd, which must run as root");
        let (munged, slurmctld, slurmd) = (tool("munged"), tool("slurmctld"), tool("slurmd"));
        for t in ["sbatch", "srun", "scontrol", "scancel", "sinfo"] {
            tool(t);
        }
        let dir = tempfile::Builder::new().prefix("dancegrpo-slurm-").tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        for sub in ["state", "spool/n1", "spool/n2", "jobs"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let mut key = vec![0u8; 1024];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key)
            .expect("read /dev/urandom");
        std::fs::write(d.join("munge.key"), key).expect("write munge.key");
        let mut perms = std::fs::metadata(d.join("munge.key")).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
        std::fs::set_permissions(d.join("munge.key"), perms).expect("chmod munge.key");

        let host = hostname();
        let (ctld_port, n1_port, n2_port) = (free_port(), free_port(), free_port());
        let p = |s: &str| d.join(s).display().to_string();
        // cred_expire=5: a requeued job waits cred_expire + 1 s (120 s by default) to start
        // again. sched_interval=1: it is then scheduled at once, not on the next minute.
        let conf = format!(
            "ClusterName=dancegrpo-test\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={sock},cred_expire=5\n\
             StateSaveLocation={state}\n\
             SlurmdSpoolDir={spool}/%n\n\
             SlurmctldPidFile={ctld_pid}\n\
             SlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={ctld_log}\n\
             SlurmdLogFile={d}/slurmd-%n.log\n\
             ProctrackType=proctrack/pgid\n\
             TaskPlugin=task/none\n\
             SelectType=select/linear\n\
             SchedulerType=sched/builtin\n\
             SchedulerParameters=sched_interval=1\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             MpiDefault=none\n\
             ReturnToService=2\n\
             SlurmdParameters=config_overrides\n\
             InactiveLimit=0\n\
             KillWait=10\n\
             MinJobAge=600\n\
             NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1\n\
             NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1\n\
             PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP\n",
            sock = p("munge.sock"),
            state = p("state"),
            spool = p("spool"),
            ctld_pid = p("slurmctld.pid"),
            ctld_log = p("slurmctld.log"),
            d = d.display(),
        );
        let conf_path = d.join("slurm.conf");
        std::fs::write(&conf_path, conf).expect("write slurm.conf");
        let mut slurm = Slurm { dir, conf: conf_path, daemons: Vec::new() };

        let mut munge = Command::new(munged);
        munge.args(["--foreground", "--force"]).args([
            format!("--key-file={}", p("munge.key")),
            format!("--socket={}", p("munge.sock")),
            format!("--pid-file={}", p("munged.pid")),
            format!("--log-file={}", p("munged.log")),
            format!("--seed-file={}", p("munged.seed")),
        ]);
        slurm.daemon("munged", munge);
        slurm.wait_for("munged's socket", Duration::from_secs(10), |s| {
            s.dir.path().join("munge.sock").exists()
        });
        let mut ctld = Command::new(slurmctld);
        ctld.args(["-D", "-i", "-f"]).arg(&slurm.conf);
        slurm.daemon("slurmctld", ctld);
        slurm.wait_for("slurmctld", Duration::from_secs(30), |s| {
            s.tool_output("scontrol", &["ping"]).1.contains("is UP")
        });
        for node in ["n1", "n2"] {
            let mut d = Command::new(&slurmd);
            d.args(["-D", "-N", node, "-f"]).arg(&slurm.conf);
            slurm.daemon(&format!("slurmd-{node}"), d);
        }
        slurm.wait_for("both nodes idle", Duration::from_secs(30), |s| {
            let (_, out) = s.tool_output("sinfo", &["-h", "-N", "-o", "%N %T"]);
            out.lines().filter(|l| l.ends_with(" idle")).count() == 2
        });
        slurm
    }

    fn marker(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn daemon(&mut self, name: &str, mut cmd: Command) {
        let out = std::fs::File::create(self.dir.path().join(format!("{name}.out"))).unwrap();
        cmd.env("SLURM_CONF", &self.conf)
            .env(MARKER, self.marker())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.daemons.push(Daemon { name: name.into(), child });
    }

    /// Waits for `cond`, at most `limit`; then panics with the daemons' logs.
    fn wait_for(&mut self, what: &str, limit: Duration, cond: impl Fn(&Slurm) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            let exited = self.daemons.iter_mut().find_map(|d| {
                d.child.try_wait().expect("try_wait").map(|s| format!("{} exited ({s})", d.name))
            });
            if let Some(exited) = exited {
                panic!("{exited} while waiting for {what}:\n{}", self.logs());
            }
            assert!(start.elapsed() < limit, "no {what} within {limit:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A Slurm client command of this cluster's.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(tool(name));
        cmd.env("SLURM_CONF", &self.conf).env(MARKER, self.marker());
        cmd
    }

    fn tool_output(&self, name: &str, args: &[&str]) -> (bool, String) {
        let mut cmd = self.command(name);
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(30))
    }

    /// `scontrol show job <id>`'s fields, one `Key=Value` each.
    fn job(&self, id: &str) -> Vec<(String, String)> {
        let (_, out) = self.tool_output("scontrol", &["show", "job", "-o", id]);
        out.split_whitespace()
            .filter_map(|f| f.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    fn job_field(&self, id: &str, key: &str) -> String {
        self.job(id).into_iter().find(|(k, _)| k == key).map(|(_, v)| v).unwrap_or_default()
    }

    /// The daemons' logs, for a failing assertion.
    fn logs(&self) -> String {
        let d = self.dir.path();
        let mut names = vec!["munged.out".to_string(), "munged.log".into()];
        names.extend(["slurmctld.out", "slurmctld.log"].map(String::from));
        for n in ["n1", "n2"] {
            names.extend([format!("slurmd-{n}.out"), format!("slurmd-{n}.log")]);
        }
        names
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(d.join(n)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("==== {n}\n{}\n", tail.join("\n"))
            })
            .collect()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        if self.daemons.iter_mut().any(|d| d.child.try_wait().ok().flatten().is_none()) {
            let mut cancel = self.command("scancel");
            cancel.args(["--user", "root", "--quiet"]);
            let _ = try_run_bounded(cancel, Duration::from_secs(15));
        }
        for d in self.daemons.iter().rev() {
            kill_group(d.child.id(), libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(5);
        for d in self.daemons.iter_mut().rev() {
            while d.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            kill_group(d.child.id(), libc::SIGKILL);
            let _ = d.child.wait();
        }
        // slurmstepd and the jobs' processes are no daemon's group: they carry the marker.
        for _ in 0..50 {
            let left = marked_processes(&self.marker());
            if left.is_empty() {
                break;
            }
            for pid in left {
                // SAFETY: kill(2) on a process this test's cluster started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A port free now whose successor is too: MASTER_PORT, and the c10d store on MASTER_PORT + 1.
fn two_free_ports() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// The tiny job, 12 iterations (enough for the requeue to land mid-run) with a checkpoint every 2.
const JOB: &str = "job_name = \"slurm\"\nmax_train_steps = 12\ncheckpointing_steps = 2\n";
const STEPS: usize = 12;

/// `sbatch --nodes=2 deploy/slurm/dancegrpo.sbatch` from `dir` (its submit directory, with
/// its own job.toml), as a user submits it: launch.sh's variables in the environment. Its id.
fn submit(slurm: &Slurm, dir: &Path, port: u16) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("job.toml"), with_test_defaults(JOB)).unwrap();
    let mut cmd = slurm.command("sbatch");
    cmd.args(["--parsable", "--nodes=2"])
        .arg(workspace_root().join("deploy/slurm/dancegrpo.sbatch"))
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("SLURM_CONF", &slurm.conf)
        .env(MARKER, slurm.marker())
        .env("RUST_LOG", "info")
        .env("OMP_NUM_THREADS", "1")
        .env("DEVICE", "cpu")
        .env("BIN_DIR", bin_dir())
        .env("CONFIG", "job.toml")
        .env("MASTER_PORT", port.to_string());
    let (ok, out) = run_bounded(cmd, Duration::from_secs(30));
    assert!(ok, "sbatch failed:\n{out}\n{}", slurm.logs());
    let id = out.trim().split(';').next().unwrap_or_default().to_string();
    assert!(id.parse::<u64>().is_ok(), "sbatch --parsable printed {out:?}");
    id
}

/// The reward log's values (none while it does not exist).
fn rewards(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("out/reward.txt"))
        .map(|s| s.lines().map(String::from).collect())
        .unwrap_or_default()
}

/// Everything a failing job leaves to read: its output file and the launch.sh logs.
fn job_logs(slurm: &Slurm, dir: &Path, id: &str) -> String {
    let out = std::fs::read_to_string(dir.join(format!("dancegrpo-{id}.out"))).unwrap_or_default();
    let mut each = String::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("logs").join(format!("dancegrpo-{id}"))) {
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            each += &format!(
                "==== {}\n{}",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
    }
    format!(
        "scontrol show job: {:?}\n==== dancegrpo-{id}.out\n{out}\n{each}\n{}",
        slurm.job(id),
        slurm.logs()
    )
}

/// Waits for job `id` to end, at most `limit`; its final state.
fn wait_job(slurm: &Slurm, dir: &Path, id: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let state = slurm.job_field(id, "JobState");
        if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"]
            .contains(&state.as_str())
        {
            return state;
        }
        assert!(
            start.elapsed() < limit,
            "job {id} not done within {limit:?} ({state}):\n{}",
            job_logs(slurm, dir, id)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn assert_completed(slurm: &Slurm, dir: &Path, id: &str, state: &str, restarts: &str) {
    let why = || job_logs(slurm, dir, id);
    assert_eq!(state, "COMPLETED", "job {id}:\n{}", why());
    assert_eq!(slurm.job_field(id, "ExitCode"), "0:0", "job {id}:\n{}", why());
    assert_eq!(slurm.job_field(id, "Restarts"), restarts, "job {id}:\n{}", why());
    assert_eq!(rewards(dir).len(), STEPS, "one reward line per iteration:\n{}", why());
    assert!(
        !dir.join(format!(".dancegrpo-{id}.token")).exists(),
        "the job's token was not removed"
    );
}

#[test]
fn sbatch_runs_the_job_on_two_nodes_and_a_requeued_job_resumes_exactly() {
    let slurm = Slurm::start();
    let jobs = slurm.dir.path().join("jobs");
    let started = Instant::now();

    // The whole job, on both nodes.
    let (a, port) = (jobs.join("a"), two_free_ports());
    let id = submit(&slurm, &a, port);
    let state = wait_job(&slurm, &a, &id, Duration::from_secs(240));
    assert_completed(&slurm, &a, &id, &state, "0");
    let out = std::fs::read_to_string(a.join(format!("dancegrpo-{id}.out"))).unwrap();
    for needle in [
        format!(
            "job {id} (restart 0) on n[1-2]: NNODES=2 MASTER_ADDR=127.0.0.1 (node n1) \
             MASTER_PORT={port} DEVICE=cpu LOG_DIR=logs/dancegrpo-{id}"
        ),
        format!(
            "0: node n1: NNODES=2 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT={port} \
             NPUS_PER_NODE=1"
        ),
        format!(
            "1: node n2: NNODES=2 NODE_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT={port} \
             NPUS_PER_NODE=1"
        ),
        "0: coordinator on 127.0.0.1:".to_string(),
        "(world size 2)".to_string(),
        format!("job {id}: the nodes' steps ended with status 0"),
    ] {
        assert!(out.contains(&needle), "{needle:?} not in the job's output:\n{out}");
    }
    let logs = a.join(format!("logs/dancegrpo-{id}"));
    for w in ["worker_0_0_", "worker_1_0_", "coordinator_"] {
        let found = std::fs::read_dir(&logs)
            .unwrap_or_else(|e| panic!("{}: {e}", logs.display()))
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(w));
        assert!(found, "no {w}* in {}", logs.display());
    }
    let uninterrupted = rewards(&a);
    let one_run = started.elapsed();

    // The same job, requeued after its first checkpoint as the time limit's USR1 requeues it
    // (--signal=B:USR1@300): it starts again on the nodes and goes on from checkpoint-2.
    let (b, port) = (jobs.join("b"), two_free_ports());
    let id = submit(&slurm, &b, port);
    let start = Instant::now();
    while rewards(&b).len() < 3 {
        let state = slurm.job_field(&id, "JobState");
        assert!(
            state == "PENDING" || state == "RUNNING",
            "job {id} {state} before it was requeued:\n{}",
            job_logs(&slurm, &b, &id)
        );
        assert!(start.elapsed() < Duration::from_secs(180), "{}", job_logs(&slurm, &b, &id));
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = b.join(format!(".dancegrpo-{id}.token"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token).expect("the job's token, in the submit directory").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the token is readable by others");
    let (ok, out) = slurm.tool_output("scancel", &["--batch", "--signal=USR1", &id]);
    assert!(ok, "scancel --signal=USR1: {out}");
    let state = wait_job(&slurm, &b, &id, Duration::from_secs(240));
    assert_completed(&slurm, &b, &id, &state, "1");
    let out = std::fs::read_to_string(b.join(format!("dancegrpo-{id}.out"))).unwrap();
    for needle in [
        format!("requeueing job {id}; it goes on from its last checkpoint"),
        format!("job {id} (restart 1) on n[1-2]: NNODES=2"),
        format!("job {id}: the nodes' steps ended with status 0"),
    ] {
        assert!(out.contains(&needle), "{needle:?} not in the job's output:\n{out}");
    }
    assert_eq!(rewards(&b), uninterrupted, "the requeued job's rewards:\n{out}");
    eprintln!("one job: {one_run:?}; both, with the requeue: {:?}", started.elapsed());
}

/// The per-node step on node 1 of a 2-node job with 8 GPUs a node, its Slurm variables as
/// srun sets them there (recorded from `srun --gpus-per-node=8`); the binaries are stand-ins
/// that print what they were given.
#[test]
fn the_node_step_takes_its_rank_and_gpu_count_from_slurm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bins = d.join("bin");
    std::fs::create_dir_all(&bins).unwrap();
    for b in ["dancegrpo-coordinator", "dancegrpo-worker"] {
        let p = bins.join(b);
        let say = "RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE";
        std::fs::write(&p, format!("#!/bin/sh\necho \"{b} $* {say}\"\n")).unwrap();
        let mut perms = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&p, perms).unwrap();
    }
    let (root, bin_dir) = (workspace_root().display().to_string(), bins.display().to_string());
    let node1: Vec<(&str, &str)> = vec![
        ("SLURM_JOB_ID", "4242"),
        ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ("SLURM_JOB_NUM_NODES", "2"),
        ("SLURM_NNODES", "2"),
        ("SLURM_STEP_ID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_PROCID", "1"),
        ("SLURM_LOCALID", "0"),
        ("SLURMD_NODENAME", "gpu08"),
        ("SLURM_GPUS_ON_NODE", "8"),
        ("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7"),
        // What dancegrpo.sbatch exports to the step.
        ("REPO_DIR", &root),
        ("NNODES", "2"),
        ("MASTER_ADDR", "10.1.0.7"),
        ("MASTER_PORT", "6000"),
        ("DEVICE", "cuda"),
        ("LOG_DIR", "logs/dancegrpo-4242"),
        ("DANCEGRPO_AUTH_TOKEN", "0123456789abcdef0123456789abcdef"),
        ("BIN_DIR", &bin_dir),
    ];
    let run = scripts::run("slurm/node.sh", d, &node1, Duration::from_secs(30));
    assert!(run.status.success(), "{}\n{}", run.output, scripts::logs(d));
    let want =
        "node gpu08: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.0.7 MASTER_PORT=6000 NPUS_PER_NODE=8";
    assert!(run.output.contains(want), "{want:?} not in:\n{}", run.output);
    assert!(run.output.contains("node 1: started 8 workers (cuda)"), "{}", run.output);
    let logs = d.join("logs/dancegrpo-4242");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&logs).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("worker_1_"), "node 1 started {name}");
        seen.push(std::fs::read_to_string(&p).unwrap().trim().to_string());
    }
    seen.sort();
    let mut want: Vec<String> = (0..8)
        .map(|l| {
            format!(
                "dancegrpo-worker run --device cuda:{l} RANK={} LOCAL_RANK={l} WORLD_SIZE=16",
                8 + l
            )
        })
        .collect();
    want.sort();
    assert_eq!(seen, want);

    // NPUS_PER_NODE given, and not what Slurm gave the node: stop, saying so.
    let mut wrong = node1.clone();
    wrong.push(("NPUS_PER_NODE", "4"));
    let run = scripts::run("slurm/node.sh", d, &wrong, Duration::from_secs(30));
    assert!(!run.status.success(), "{}", run.output);
    let want = "Slurm gave this node 8 GPUs (SLURM_GPUS_ON_NODE), NPUS_PER_NODE=4";
    assert!(run.output.contains(want), "{want:?} not in:\n{}", run.output);

    // Two tasks on one node (no --ntasks-per-node=1): stop, saying so.
    let mut two = node1.clone();
    two.retain(|(k, _)| *k != "SLURM_LOCALID");
    two.push(("SLURM_LOCALID", "1"));
    let run = scripts::run("slurm/node.sh", d, &two, Duration::from_secs(30));
    assert!(!run.status.success(), "{}", run.output);
    assert!(run.output.contains("run one task per node (--ntasks-per-node=1)"), "{}", run.output);
}
