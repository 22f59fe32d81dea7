//! `dancegrpo-coordinator`: serve a job, or query one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dancegrpo_coordinator::config::{
    CoordinatorSettings, MindSpeedFiles, Topology, load_job_config_with,
};
use dancegrpo_coordinator::{cli, metrics, preflight, server, state::CoordinatorState};
use dancegrpo_proto::AuthToken;
use tokio_util::sync::CancellationToken;

/// Coordinator of a dancegrpo job: admits workers, hands out ranks, serves the job status.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a job: listen on MASTER_ADDR:MASTER_PORT and wait for the workers.
    Serve(ServeArgs),
    /// Print a job's status once.
    Status(StatusArgs),
    /// Follow a job's status as it changes.
    Watch(WatchArgs),
    /// List the jobs in the coordinator's database.
    List(QueryArgs),
    /// Stop the job gracefully: the iteration in flight is trained and checkpointed, then the
    /// job ends `stopped` and the workers exit 0. Resume it with `resume_from_checkpoint =
    /// "latest"`. Needs the job token.
    Stop(OperatorArgs),
    /// Cancel the job at once, without another step or checkpoint; it ends `cancelled`. Needs
    /// the job token.
    Cancel(OperatorArgs),
    /// The job config's keys: `--print-defaults` writes every key at its default, documented.
    Config(ConfigArgs),
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// Write the default job config as TOML, each key with its documentation.
    #[arg(long, required = true)]
    print_defaults: bool,
}

/// The job's shared secret: every call but health must carry it.
#[derive(Args, Debug)]
struct AuthArgs {
    /// File holding the job's auth token (at least 16 printable characters, e.g. from `openssl
    /// rand -hex 32`). `DANCEGRPO_AUTH_TOKEN` may give the token itself instead.
    #[arg(long, env = dancegrpo_proto::auth::TOKEN_FILE_ENV)]
    auth_token_file: Option<PathBuf>,
}

impl AuthArgs {
    fn token(&self) -> anyhow::Result<Option<AuthToken>> {
        Ok(AuthToken::from_env(self.auth_token_file.as_deref())?)
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    tls: dancegrpo_proto::tls::ServerTls,
    /// Serve a non-loopback address without an auth token: anyone who reaches the port can
    /// then act as any worker.
    #[arg(long)]
    insecure: bool,
    /// On a restart of an unfinished job whose config has changed, go on with the new values
    /// (each changed key is logged); without it such a restart is refused, listing the keys.
    #[arg(long)]
    adopt_config: bool,
    /// Skip the checks of the job's files (model, reward models, data, resume checkpoint)
    /// before start-up, for a coordinator on a machine that does not see the workers' files.
    #[arg(long)]
    skip_file_checks: bool,
    /// Job config file (TOML, JSON or YAML); `DANCEGRPO_<KEY>` variables and `--set` override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override one job config key, e.g. `--set num_generations=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_kv)]
    set: Vec<(String, String)>,
    /// MindSpeed-MM model config (`model_dancegrpo.json`): takes the HPS reward paths from it.
    #[arg(long = "mm-model")]
    mm_model: Option<PathBuf>,
    /// MindSpeed-MM data config (`data_dancegrpo.json`): takes `data_path` from it.
    #[arg(long = "mm-data")]
    mm_data: Option<PathBuf>,
    /// Address of this node, as the workers reach it.
    #[arg(long, env = "MASTER_ADDR", default_value = "127.0.0.1")]
    master_addr: String,
    /// Port the coordinator listens on.
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    master_port: u16,
    /// Listen address; defaults to MASTER_ADDR:MASTER_PORT.
    #[arg(long)]
    listen: Option<String>,
    /// Number of nodes.
    #[arg(long, env = "NNODES", default_value_t = 1)]
    nnodes: u32,
    /// Workers (accelerators) per node.
    #[arg(long, env = "NPUS_PER_NODE", default_value_t = 8)]
    npus_per_node: u32,
    /// Total workers; overrides NNODES × NPUS_PER_NODE.
    #[arg(long, env = "WORLD_SIZE")]
    world_size: Option<u32>,
    /// Port of the c10d TCPStore hosted by rank 0; defaults to MASTER_PORT + 1.
    #[arg(long)]
    store_port: Option<u16>,
    /// The embedded database; defaults to `<output_dir>/dancegrpo.sqlite`.
    #[arg(long)]
    db: Option<PathBuf>,
    /// How often workers heartbeat, in milliseconds.
    #[arg(long, env = "DANCEGRPO_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// A worker silent for this many milliseconds is marked lost.
    #[arg(long, env = "DANCEGRPO_HEARTBEAT_TIMEOUT_MS", default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// Write the bound address (host:port) to this file once listening; for scripts and tests
    /// that listen on port 0.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    #[command(flatten)]
    log: dancegrpo_proto::logging::LogArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9400); off by default.
    /// Read-only and without the token, as scrape targets are.
    #[arg(long, env = "DANCEGRPO_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
struct QueryArgs {
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    tls: dancegrpo_proto::tls::ClientTls,
    /// Coordinator address, host:port.
    #[arg(long, env = "DANCEGRPO_COORDINATOR", default_value = "127.0.0.1:29500")]
    addr: String,
    /// Job id; defaults to the job the coordinator runs.
    #[arg(long, default_value = "")]
    job: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl QueryArgs {
    fn target(&self) -> anyhow::Result<cli::Target> {
        Ok(cli::Target {
            addr: self.addr.clone(),
            token: self.auth.token()?,
            tls: self.tls.clone(),
        })
    }
}

#[derive(Args, Debug)]
struct OperatorArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// Why, for the job's status and the coordinator's log.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// How many of the latest iterations to fetch; 0 for all. Default: all with --json,
    /// else 10.
    #[arg(long)]
    history: Option<u32>,
}

#[derive(Args, Debug)]
struct WatchArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// How many of the latest iterations each update carries; 0 for all. Default: all with
    /// --json, else 10.
    #[arg(long)]
    history: Option<u32>,
    /// One table row per finished iteration instead of the whole status on every change.
    #[arg(long, conflicts_with = "json")]
    table: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    a.log.init();
    let mindspeed = MindSpeedFiles { model: a.mm_model.clone(), data: a.mm_data.clone() };
    let job = load_job_config_with(a.config.as_deref(), &mindspeed, std::env::vars(), &a.set)?;
    if a.skip_file_checks {
        tracing::warn!("--skip-file-checks: the job's files are checked by the workers only");
    } else {
        preflight::check(&job)?;
    }
    let topology = Topology::new(a.nnodes, a.npus_per_node, a.world_size)?;
    let listen = a.listen.unwrap_or_else(|| join_host_port(&a.master_addr, a.master_port));
    let listen = tokio::net::lookup_host(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot resolve listen address {listen}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("listen address {listen} resolves to nothing"))?;
    let token = a.auth.token()?;
    server::check_exposure(listen, token.as_ref(), a.insecure)?;
    let tls = a.tls.config()?;
    let db_path = a.db.unwrap_or_else(|| PathBuf::from(&job.output_dir).join("dancegrpo.sqlite"));
    let settings = CoordinatorSettings {
        job,
        topology,
        db_path,
        heartbeat_interval: Duration::from_millis(a.heartbeat_interval_ms.max(1)),
        heartbeat_timeout: Duration::from_millis(a.heartbeat_timeout_ms.max(1)),
        store_port: a.store_port.unwrap_or(a.master_port.wrapping_add(1)),
        listen,
        adopt_config: a.adopt_config,
    };
    let listener = server::bind(&settings).await?;
    if let Some(path) = &a.addr_file {
        let addr = listener.local_addr()?;
        // Write-then-rename, so a reader never sees a half-written address.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    let metrics = match a.metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen for metrics on {addr} (--metrics-listen): {e}")
        })?),
        None => None,
    };
    let state = CoordinatorState::open(settings)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    if let Some(listener) = metrics {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, state, shutdown).await {
                tracing::error!(cause = %e, "metrics endpoint stopped");
            }
        });
    }
    server::run(listener, state, token, tls, shutdown).await?;
    Ok(())
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(cause = %e, "cannot install SIGTERM handler");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Status(s) => match s.query.target() {
            Ok(t) => cli::status(&t, &s.query.job, s.query.json, s.history).await,
            Err(e) => Err(e),
        },
        Command::Watch(w) => match w.query.target() {
            Ok(t) => cli::watch(&t, &w.query.job, w.query.json, w.table, w.history).await,
            Err(e) => Err(e),
        },
        Command::List(q) => match q.target() {
            Ok(t) => cli::list(&t, q.json).await,
            Err(e) => Err(e),
        },
        Command::Stop(o) => match o.query.target() {
            Ok(t) => cli::stop(&t, &o.query.job, &o.reason, o.query.json).await,
            Err(e) => Err(e),
        },
        Command::Cancel(o) => match o.query.target() {
            Ok(t) => cli::cancel(&t, &o.query.job, &o.reason, o.query.json).await,
            Err(e) => Err(e),
        },
        Command::Config(_) => {
            print!("{}", dancegrpo_proto::JobConfig::defaults_toml());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dancegrpo-coordinator: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
