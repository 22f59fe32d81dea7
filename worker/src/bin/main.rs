//! `dancegrpo-worker`: join a job as one rank.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dancegrpo_proto::WorkerInfo;
use dancegrpo_worker::WorkerSettings;
use dancegrpo_worker::device::Device;
use dancegrpo_worker::session::SessionSettings;
use tokio_util::sync::CancellationToken;

/// A dancegrpo worker: one process per accelerator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the job the coordinator at MASTER_ADDR:MASTER_PORT runs.
    Run(RunArgs),
    /// Encode a prompts file into text embeddings (own layout), optionally across ranks.
    Preprocess(dancegrpo_worker::data::cli::PreprocessArgs),
    /// Look at a prompt dataset (own or reference layout).
    #[command(subcommand)]
    Dataset(dancegrpo_worker::data::cli::DatasetCommand),
    /// One-shot checks against the Python reference.
    #[command(subcommand)]
    Check(dancegrpo_worker::check::CheckCommand),
    /// Convert a PyTorch checkpoint (a .pt/.bin `torch.save` file) to safetensors.
    Convert(dancegrpo_worker::check::hps::ConvertArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Coordinator address; defaults to MASTER_ADDR:MASTER_PORT.
    #[arg(long, env = "DANCEGRPO_COORDINATOR")]
    coordinator: Option<String>,
    /// Address of the coordinator's node.
    #[arg(long, env = "MASTER_ADDR", default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of the coordinator.
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    master_port: u16,
    /// Rank of this node.
    #[arg(long, env = "NODE_RANK", default_value_t = 0)]
    node_rank: u32,
    /// Index of this worker on its node.
    #[arg(long, env = "LOCAL_RANK", default_value_t = 0)]
    local_rank: u32,
    /// Device: `cpu`, `cuda:N` or `npu:N`.
    #[arg(long, env = "DANCEGRPO_DEVICE", default_value = "cpu")]
    device: Device,
    /// Bound, in seconds, on the rendezvous and every collective: a dead or missing peer is an
    /// error after this long.
    #[arg(long, env = "DANCEGRPO_COLLECTIVE_TIMEOUT_S", default_value_t = 300)]
    collective_timeout_s: u64,
    /// Keep retrying an unreachable coordinator for this many seconds.
    #[arg(long, env = "DANCEGRPO_CONNECT_TIMEOUT_S", default_value_t = 300)]
    connect_timeout_s: u64,
    /// File holding the job's auth token (the coordinator's); `DANCEGRPO_AUTH_TOKEN` may give
    /// the token itself instead.
    #[arg(long, env = dancegrpo_proto::auth::TOKEN_FILE_ENV)]
    auth_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: dancegrpo_proto::tls::ClientTls,
    #[command(flatten)]
    log: dancegrpo_proto::logging::LogArgs,
    /// libtorch's intra-op threads, fixed for the whole run so that a resume rounds as the run
    /// it resumes; default `OMP_NUM_THREADS`, else one per core.
    #[arg(long, env = "DANCEGRPO_THREADS")]
    threads: Option<usize>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    a.log.init();
    dancegrpo_worker::dist::check_socket_ifname().map_err(anyhow::Error::msg)?;
    let coordinator = a.coordinator.unwrap_or_else(|| {
        if a.master_addr.contains(':') && !a.master_addr.starts_with('[') {
            format!("[{}]:{}", a.master_addr, a.master_port)
        } else {
            format!("{}:{}", a.master_addr, a.master_port)
        }
    });
    let coordinator =
        if coordinator.contains("://") { coordinator } else { format!("http://{coordinator}") };
    let session = SessionSettings {
        coordinator,
        connect_timeout: Duration::from_secs(a.connect_timeout_s),
        info: WorkerInfo {
            host: hostname(),
            node_rank: a.node_rank,
            local_rank: a.local_rank,
            device: a.device.to_string(),
            device_description: String::new(),
            pid: std::process::id(),
        },
        token: dancegrpo_proto::AuthToken::from_env(a.auth_token_file.as_deref())?,
        tls: a.tls.clone(),
    };
    let settings = WorkerSettings {
        session,
        device: a.device,
        collective_timeout: Duration::from_secs(a.collective_timeout_s),
        threads: a.threads,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    dancegrpo_worker::run(settings, shutdown).await?;
    Ok(())
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
    tracing::info!("signal received; draining");
    token.cancel();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => {
            // Fault injection for the tests: the `FAILPOINTS` variable, unset in production.
            let failpoints = fail::FailScenario::setup();
            let code = exit_code(run(a).await);
            failpoints.teardown();
            // The compute thread may still be inside libtorch: a job cancelled or failed
            // mid-iteration ends this process with a forward pass or a collective in flight.
            // exit(3) would run libtorch's static destructors under it (a SIGSEGV, seen when
            // cancelling); _exit skips them. Everything of ours has been dropped or flushed.
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            // SAFETY: _exit ends the process at once; nothing runs after it.
            unsafe { libc::_exit(code) }
        }
        Command::Preprocess(a) => {
            dancegrpo_proto::logging::LogArgs {
                log_format: dancegrpo_proto::logging::LogFormat::Text,
            }
            .init();
            tokio::task::block_in_place(|| {
                dancegrpo_worker::threads::pin_default();
                a.run()
            })
        }
        Command::Dataset(c) => tokio::task::block_in_place(|| c.run()),
        Command::Check(c) => tokio::task::block_in_place(|| {
            dancegrpo_worker::threads::pin_default();
            c.run()
        }),
        Command::Convert(a) => {
            tokio::task::block_in_place(|| dancegrpo_worker::check::hps::run_convert(&a))
        }
    };
    ExitCode::from(exit_code(result) as u8)
}

/// The exit status of a command's result, its error printed.
fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("dancegrpo-worker: error: {e:#}");
            1
        }
    }
}
