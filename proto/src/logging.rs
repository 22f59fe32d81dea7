//! The log output of both binaries: `--log-format text|json` (or `DANCEGRPO_LOG_FORMAT`), to
//! stderr, filtered by `RUST_LOG` (default `info`). JSON is one object per line, as log
//! shippers (Loki, Fluent Bit, Cloud Logging) read it.

/// The `--log-format` flag.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct LogArgs {
    /// Log format: `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "DANCEGRPO_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text, without colours.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogArgs {
    /// Installs the process's log subscriber.
    pub fn init(self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Text => b.with_ansi(false).init(),
            LogFormat::Json => b.json().init(),
        }
    }
}
