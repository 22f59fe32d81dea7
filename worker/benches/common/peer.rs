//! The Python side of a side-by-side bench, kept running so that its steps alternate with
//! ours and both see the same machine load: it answers each request line on stdin with one
//! JSON line on stdout, after a first JSON line with its settings.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::Value;

/// The project venv's python (`DANCEGRPO_VENV`, else the Makefile's default).
pub(crate) fn python() -> String {
    let venv = std::env::var("DANCEGRPO_VENV").unwrap_or_else(|_| {
        format!("{}/.cache/dancegrpo/torch-2.11.0", std::env::var("HOME").unwrap_or_default())
    });
    format!("{venv}/bin/python")
}

/// A running peer script.
pub(crate) struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts `benches/<script>` with `--dir DIR --threads N` and reads its settings line.
    pub(crate) fn start(script: &str, dir: &Path, threads: i32) -> (Self, Value) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches").join(script);
        let mut child = Command::new(python())
            .arg(&script)
            .args(["--dir", dir.to_str().unwrap(), "--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the python peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut peer = Peer { child, stdin, stdout };
        let hello = peer.read();
        (peer, hello)
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the python peer exited (its stderr is above)");
        serde_json::from_str(&line).unwrap()
    }

    /// Sends one request line and returns the answer.
    pub(crate) fn request(&mut self, what: &str) -> Value {
        writeln!(self.stdin, "{what}").unwrap();
        self.stdin.flush().unwrap();
        self.read()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
