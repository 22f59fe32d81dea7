//! Helpers for the end-to-end tests: start real coordinator and worker processes on loopback,
//! talk to them over gRPC, and wait (with deadlines, never forever) for conditions.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod scripts;

use dancegrpo_proto::pb::coordinator_client::CoordinatorClient;
use dancegrpo_proto::pb::job_service_client::JobServiceClient;
use dancegrpo_proto::{AuthToken, ClientAuth, pb};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Directory holding the workspace's binaries (`target/<profile>`), found from the test binary.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("DANCEGRPO_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// Path of one of the workspace's binaries.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not built; run `cargo build --workspace --bins`", p.display());
    p
}

/// A child process that is killed when dropped, so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A job directory with a config file, and the processes started for it.
#[derive(Debug)]
pub struct Cluster {
    /// Scratch directory (config, database, logs).
    pub dir: tempfile::TempDir,
    /// The job's auth token, which every process started here is given (as the file
    /// `token` in `dir`); `None`: the coordinator has none.
    pub token: Option<String>,
}

/// The token of [`Cluster::secured`] jobs.
pub const TEST_TOKEN: &str = "e2e-token-0123456789abcdef";

/// Keys every test job gets unless its config sets them: the `tiny` preset on the shared tiny
/// dataset, small images and few steps, so an iteration takes well under a second.
const TEST_DEFAULTS: &[(&str, &str)] = &[
    ("pretrained_model_name_or_path", "\"tiny\""),
    ("output_dir", "\"out\""),
    ("num_generations", "4"),
    ("sampling_steps", "4"),
    ("h", "32"),
    ("w", "32"),
    ("gradient_accumulation_steps", "2"),
    ("max_train_steps", "100000"),
    ("checkpointing_steps", "0"),
    ("sample_grid_every", "0"),
    ("gradient_checkpointing", "false"),
    ("reward_log", "\"reward.txt\""),
];

/// The test jobs' reward, unless a config lists its own.
const TEST_REWARD: &str = "\n[[rewards]]\nname = \"jpeg_compressibility\"\n";

static TINY_DATASET: OnceLock<PathBuf> = OnceLock::new();

/// Removes the tiny dataset when the test process exits: a static is never dropped.
extern "C" fn remove_tiny_dataset() {
    if let Some(p) = TINY_DATASET.get() {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// A prompt dataset made once per test process: the demo's prompts encoded by the tiny text
/// encoders of `tests/golden/text/model` with `dancegrpo-worker preprocess`.
pub fn tiny_dataset() -> &'static Path {
    TINY_DATASET.get_or_init(|| {
        let root = workspace_root();
        let out = std::env::temp_dir().join(format!("dancegrpo-e2e-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let st = Command::new(bin("dancegrpo-worker"))
            .args(["preprocess", "--model-dir"])
            .arg(root.join("tests/golden/text/model"))
            .arg("--prompts")
            .arg(root.join("deploy/demo/prompts.txt"))
            .arg("--out")
            .arg(&out)
            .args(["--max-sequence-length", "8", "--quiet"])
            .stdout(Stdio::null())
            .status()
            .expect("run preprocess");
        assert!(st.success(), "preprocessing the tiny dataset failed");
        // SAFETY: registers a plain function with no arguments; it runs once, at exit.
        unsafe { libc::atexit(remove_tiny_dataset) };
        out
    })
}

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// `config` with the test defaults for every key it does not set.
pub fn with_test_defaults(config: &str) -> String {
    let sets = |k: &str| config.lines().any(|l| l.trim_start().starts_with(&format!("{k} =")));
    let mut out = String::new();
    if !sets("data_json_path") {
        out += &format!("data_json_path = {:?}\n", tiny_dataset().display().to_string());
    }
    for (k, v) in TEST_DEFAULTS {
        if !sets(k) {
            out += &format!("{k} = {v}\n");
        }
    }
    out += config;
    if !config.contains("[[rewards]]") {
        out += TEST_REWARD;
    }
    out
}

impl Cluster {
    /// A scratch directory with `config` (plus [`with_test_defaults`]) written as `job.toml`.
    pub fn new(config: &str) -> Self {
        Self::exact(&with_test_defaults(config))
    }

    /// A scratch directory with exactly `config` as `job.toml`.
    pub fn exact(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("job.toml"), config).expect("write config");
        Self { dir, token: None }
    }

    /// [`Cluster::new`] with an auth token ([`TEST_TOKEN`]) that every process started here
    /// gets through `--auth-token-file`'s variable.
    pub fn secured(config: &str) -> Self {
        let c = Self::new(config);
        std::fs::write(c.path("token"), format!("{TEST_TOKEN}\n")).expect("write token");
        Self { token: Some(TEST_TOKEN.into()), ..c }
    }

    /// Path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every process log in the scratch directory, each under its name: what a failing test
    /// prints, since a fault on one rank often shows only in another's log or the coordinator's.
    pub fn logs(&self) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "log"));
        names.sort();
        names
            .iter()
            .map(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                format!("==== {name}\n{}", std::fs::read_to_string(p).unwrap_or_default())
            })
            .collect()
    }

    fn spawn(&self, exe: &str, args: &[&str], envs: &[(&str, &str)], log_name: &str) -> Proc {
        let log = self.path(log_name);
        let err = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin(exe));
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .env_remove("MASTER_ADDR")
            .env_remove("MASTER_PORT")
            .env_remove("NNODES")
            .env_remove("NPUS_PER_NODE")
            .env_remove("WORLD_SIZE")
            .env_remove("NODE_RANK")
            .env_remove("LOCAL_RANK")
            .env_remove(dancegrpo_proto::auth::TOKEN_ENV)
            .env_remove(dancegrpo_proto::auth::TOKEN_FILE_ENV)
            .env("RUST_LOG", "info")
            // One libtorch thread per process: tests run several workers at once on few cores.
            .env("OMP_NUM_THREADS", "1");
        if self.token.is_some() {
            cmd.env(dancegrpo_proto::auth::TOKEN_FILE_ENV, self.path("token"));
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc { child: cmd.spawn().expect("spawn"), log }
    }

    /// Starts a coordinator on `127.0.0.1:0` with the given extra flags; returns it and its
    /// address once it listens.
    pub fn coordinator(&self, extra: &[&str]) -> (Proc, String) {
        self.coordinator_on("127.0.0.1:0", extra)
    }

    /// Starts a coordinator listening on `listen`.
    pub fn coordinator_on(&self, listen: &str, extra: &[&str]) -> (Proc, String) {
        self.try_coordinator_on(listen, extra).unwrap_or_else(|(s, log)| {
            panic!("coordinator exited early ({s}):\n{log}");
        })
    }

    /// [`Cluster::coordinator_on`], or how it exited and its log, if it did not start.
    pub fn try_coordinator_on(
        &self,
        listen: &str,
        extra: &[&str],
    ) -> Result<(Proc, String), (ExitStatus, String)> {
        let addr_file = self.path("coordinator.addr");
        let _ = std::fs::remove_file(&addr_file);
        // Each test gets its own c10d store port, so tests running at once never share one.
        let store_port = free_port().to_string();
        let mut args = vec![
            "serve",
            "--store-port",
            &store_port,
            "--config",
            "job.toml",
            "--listen",
            listen,
            "--db",
            "state.sqlite",
            "--addr-file",
            "coordinator.addr",
        ];
        args.extend_from_slice(extra);
        let mut p = self.spawn("dancegrpo-coordinator", &args, &[], "coordinator.log");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                return Ok((p, a));
            }
            if let Some(s) = p.child.try_wait().expect("try_wait") {
                return Err((s, p.log()));
            }
            assert!(Instant::now() < end, "coordinator did not listen within 30s:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a worker for the coordinator at `addr`.
    pub fn worker(&self, addr: &str, node_rank: u32, local_rank: u32, extra: &[&str]) -> Proc {
        self.worker_with_env(addr, node_rank, local_rank, extra, &[])
    }

    /// [`Cluster::worker`] with extra environment variables (e.g. `FAILPOINTS`).
    pub fn worker_with_env(
        &self,
        addr: &str,
        node_rank: u32,
        local_rank: u32,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        let coord = format!("http://{addr}");
        let nr = node_rank.to_string();
        let lr = local_rank.to_string();
        let mut args =
            vec!["run", "--coordinator", &coord, "--node-rank", &nr, "--local-rank", &lr];
        args.extend_from_slice(extra);
        self.spawn("dancegrpo-worker", &args, envs, &format!("worker-{node_rank}-{local_rank}.log"))
    }

    /// The coordinator's CLI (`status`, `stop`, ...) with the cluster's token, if any, its
    /// stdout and stderr kept.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("dancegrpo-coordinator"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove(dancegrpo_proto::auth::TOKEN_ENV)
            .env_remove(dancegrpo_proto::auth::TOKEN_FILE_ENV);
        if self.path("token").exists() {
            cmd.env(dancegrpo_proto::auth::TOKEN_FILE_ENV, self.path("token"));
        }
        cmd.output().expect("run the CLI")
    }

    /// Runs a binary to completion with a time limit.
    pub fn run_to_end(&self, exe: &str, args: &[&str], limit: Duration) -> Output {
        let mut p = self.spawn(exe, args, &[], "oneshot.log");
        let status = p
            .wait_timeout(limit)
            .unwrap_or_else(|| panic!("{exe} {args:?} did not finish within {limit:?}"));
        Output { status, stdout: Vec::new(), stderr: p.log().into_bytes() }
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Fetches the status of the coordinator's job.
pub async fn job_status(addr: &str) -> anyhow::Result<pb::JobStatus> {
    job_status_with(addr, None).await
}

fn auth(token: Option<&str>) -> ClientAuth {
    ClientAuth::new(token.map(|t| AuthToken::new(t, "test").expect("a valid test token")))
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?)
}

/// A client of the job API that sends `token`.
pub async fn job_client(
    addr: &str,
    token: Option<&str>,
) -> anyhow::Result<JobServiceClient<InterceptedService<Channel, ClientAuth>>> {
    Ok(JobServiceClient::with_interceptor(channel(addr).await?, auth(token)))
}

/// A client of the worker-facing service that sends `token`: to act as a worker by hand.
pub async fn coordinator_client(
    addr: &str,
    token: Option<&str>,
) -> anyhow::Result<CoordinatorClient<InterceptedService<Channel, ClientAuth>>> {
    Ok(CoordinatorClient::with_interceptor(channel(addr).await?, auth(token)))
}

/// [`job_status`] from a coordinator that wants `token`.
pub async fn job_status_with(addr: &str, token: Option<&str>) -> anyhow::Result<pb::JobStatus> {
    let mut c = job_client(addr, token).await?;
    let s = c.get_job_status(pb::GetJobStatusRequest::default()).await?.into_inner();
    s.status.ok_or_else(|| anyhow::anyhow!("empty status"))
}

/// Polls `f` until it returns `Some`, or panics with `what` after `limit`.
pub async fn await_condition<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Workers in the status with the given state name (`running`, `lost`, ...).
pub fn workers_in(s: &pb::JobStatus, state: pb::WorkerState) -> Vec<&pb::WorkerStatus> {
    s.workers.iter().filter(|w| w.state == state as i32).collect()
}

/// PEM files of a test PKI, made fresh: a CA, the coordinator's certificate for `127.0.0.1`
/// and `localhost`, a client certificate for mutual TLS, and a second CA that signed neither.
#[derive(Debug)]
pub struct TestPki {
    /// The CA that signed both certificates.
    pub ca: PathBuf,
    /// The coordinator's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// A client's certificate and key.
    pub client: (PathBuf, PathBuf),
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

impl TestPki {
    /// Writes the files into `dir`.
    pub fn new(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write PEM");
            p
        };
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA")
        };
        let issuer = ca("dancegrpo test CA");
        let leaf = |name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut p = CertificateParams::new(sans).expect("params");
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).expect("sign");
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}.key"), key.serialize_pem()),
            )
        };
        let server =
            leaf("coordinator", &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        let client = leaf("worker", &[], ExtendedKeyUsagePurpose::ClientAuth);
        Self {
            ca: write("ca.pem", issuer.pem()),
            server,
            client,
            other_ca: write("other-ca.pem", ca("another CA").pem()),
        }
    }
}

/// Waits, at most 300 s, for `p` to exit 0; otherwise panics with every log of `c`.
pub fn wait_ok(c: &Cluster, p: &mut Proc, what: &str) {
    let s = p.wait_timeout(Duration::from_secs(300));
    assert!(s.is_some_and(|s| s.success()), "{what} did not finish cleanly ({s:?}):\n{}", c.logs());
}

/// Runs `config` (plus [`with_test_defaults`]) to completion with a coordinator and 2 workers
/// on one node; returns the cluster, whose `out/` holds the job's outputs.
pub fn train_two(config: &str) -> Cluster {
    train_n(config, 2)
}

/// [`train_two`] with `n` workers on one node.
pub fn train_n(config: &str, n: u32) -> Cluster {
    let c = Cluster::new(config);
    let world = n.to_string();
    let (_coord, addr) = c.coordinator(&["--world-size", &world, "--heartbeat-interval-ms", "200"]);
    let mut workers: Vec<Proc> = (0..n).map(|r| c.worker(&addr, 0, r, &[])).collect();
    for (r, w) in workers.iter_mut().enumerate() {
        wait_ok(&c, w, &format!("rank {r}"));
    }
    c
}

/// A file's bytes; panics naming the file.
pub fn read_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
