//! The deploy scripts run as a user runs them: `bash deploy/<name>` from a folder of the test's,
//! with only the variables the test gives, and everything the script started killed with it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// A script's run: its exit status and everything it printed.
#[derive(Debug)]
pub struct Run {
    /// How it exited.
    pub status: ExitStatus,
    /// Its stdout and stderr, interleaved.
    pub output: String,
    /// How long it ran.
    pub took: Duration,
}

/// A script started in its own process group; dropping it kills the group, so a failing test
/// leaves none of the processes the script started behind.
#[derive(Debug)]
pub struct Script {
    name: String,
    cwd: PathBuf,
    out: PathBuf,
    child: Child,
    started: Instant,
}

/// `bash deploy/<name>` in `cwd` with only `vars` (and PATH, HOME, RUST_LOG=info) in its
/// environment, so nothing of this process's (DANCEGRPO_*, RANK, ...) leaks in.
pub fn command(name: &str, cwd: &Path, vars: &[(&str, &str)]) -> Command {
    command_under(&[], name, cwd, vars)
}

/// [`command`] run by `prefix` (e.g. `ip netns exec HOST`, which keeps the environment).
pub fn command_under(prefix: &[&str], name: &str, cwd: &Path, vars: &[(&str, &str)]) -> Command {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("bash");
            c
        }
        None => Command::new("bash"),
    };
    cmd.arg(workspace_root().join("deploy").join(name))
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("RUST_LOG", "info")
        .envs(vars.iter().copied());
    cmd
}

impl Script {
    /// Starts `cmd` (from [`command`], or any other) as `name`, its output going to
    /// `cwd/<name>.out`.
    pub fn spawn(name: &str, cwd: &Path, mut cmd: Command) -> Script {
        let out = cwd.join(format!("{}.out", name.replace('/', "_")));
        let file = std::fs::File::create(&out).expect("output file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Script { name: name.into(), cwd: cwd.into(), out, child, started: Instant::now() }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits for it to exit; after `limit`, kills it with all it started and panics with its
    /// output and the logs under `cwd/logs`.
    pub fn wait(mut self, limit: Duration) -> Run {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if self.started.elapsed() > limit {
                self.kill();
                panic!(
                    "{} did not finish within {limit:?}:\n{}\n{}",
                    self.name,
                    self.output(),
                    logs(&self.cwd)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run { status, output: self.output(), took: self.started.elapsed() }
    }

    fn kill(&mut self) {
        // SAFETY: kill(2) on our own child's process group; an exited group is ESRCH, harmless.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `deploy/<name>` (see [`command`]) to its end, at most `limit`.
pub fn run(name: &str, cwd: &Path, vars: &[(&str, &str)], limit: Duration) -> Run {
    Script::spawn(name, cwd, command(name, cwd, vars)).wait(limit)
}

/// The scripts' logs in `cwd/logs`, each under its name, for a failing assertion.
pub fn logs(cwd: &Path) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(cwd.join("logs"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|p| {
            format!("==== {}\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default())
        })
        .collect()
}
