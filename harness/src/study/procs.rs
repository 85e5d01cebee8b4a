//! Child processes that cannot outlive the runner, and the stop flag.
//!
//! A study starts hundreds of VM processes. One left behind keeps a vCPU
//! busy and skews every later measurement on a 2-core machine, so each
//! child lives in a [`Guard`] that asks it to shut down (API socket) and
//! kills it if it does not, when the run ends, on an error, or when the
//! guard is dropped during unwinding. Children get their own process group,
//! so a Ctrl-C in the terminal reaches only the runner, which then stops
//! them in order ([`Stop`]) instead of leaving half-dead processes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

/// A child could not be started.
#[derive(Debug, Error)]
#[error("cannot start {what} (`{command}`)")]
pub struct SpawnError {
    /// What the process is (`source VM`).
    pub what: String,
    /// The program.
    pub command: String,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// Set by SIGINT/SIGTERM; every wait loop checks it.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// A flag raised by SIGINT and SIGTERM.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed.
    pub fn on_signals() -> std::io::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
        }
        Ok(Self(flag))
    }

    /// Whether a stop was requested.
    #[must_use]
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Requests a stop (tests, fatal errors).
    pub fn request(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A child process stopped (and reaped) when dropped.
pub struct Guard {
    what: String,
    child: Option<Child>,
    api_socket: Option<PathBuf>,
    status: Option<ExitStatus>,
}

impl Guard {
    /// Starts `argv` in its own process group with stdout and stderr sent to
    /// files. `api_socket`, if given, is used for a polite shutdown.
    ///
    /// # Errors
    /// [`SpawnError`] when the program cannot be started or a file created.
    pub fn spawn(
        what: &str,
        argv: &[String],
        stdout: &Path,
        stderr: &Path,
        api_socket: Option<&Path>,
    ) -> Result<Self, SpawnError> {
        let err = |source| SpawnError {
            what: what.to_owned(),
            command: argv.join(" "),
            source,
        };
        let out = std::fs::File::create(stdout).map_err(err)?;
        let errf = std::fs::File::create(stderr).map_err(err)?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(errf)
            .process_group(0)
            .spawn()
            .map_err(err)?;
        Ok(Self {
            what: what.to_owned(),
            child: Some(child),
            api_socket: api_socket.map(Path::to_owned),
            status: None,
        })
    }

    /// What this process is.
    #[must_use]
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The process id, while it runs.
    #[must_use]
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has ended (reaped once).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                self.status = c.try_wait().ok().flatten();
            }
        }
        self.status
    }

    /// Stops the process: `shutdown` on its API socket, up to `grace` to
    /// exit, then SIGKILL. Returns its exit status if it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_wait().is_some() {
            return self.status;
        }
        if let Some(sock) = &self.api_socket {
            let _ = api_shutdown(sock);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                return self.status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        None
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.status.is_none() {
                let _ = c.kill();
                self.status = c.wait().ok();
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.child.is_some() && self.try_wait().is_none() {
            self.stop(Duration::from_secs(2));
        }
    }
}

/// Sends `{"command":"shutdown"}` on a VM's API socket and waits (1 s) for
/// the answer.
///
/// # Errors
/// Any I/O error (no socket, no answer).
pub fn api_shutdown(socket: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"{\"command\":\"shutdown\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_kills_on_drop_and_reports_exit() {
        let dir = std::env::temp_dir();
        let out = dir.join(format!("procs-test-{}.out", std::process::id()));
        let argv: Vec<String> = ["sleep", "30"].iter().map(|s| (*s).to_string()).collect();
        let g = Guard::spawn("sleeper", &argv, &out, &out, None).unwrap();
        let pid = g.child.as_ref().unwrap().id();
        drop(g);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                // A zombie would still have a /proc entry; it must be reaped.
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_err()
            }
        );
        let argv: Vec<String> = ["true"].iter().map(|s| (*s).to_string()).collect();
        let mut g = Guard::spawn("true", &argv, &out, &out, None).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(g.try_wait().unwrap().success());
        let _ = std::fs::remove_file(out);
    }
}
