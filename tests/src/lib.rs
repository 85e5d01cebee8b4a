//! Helpers shared by the end-to-end tests: KVM gating, process spawning,
//! serial capture.
//!
//! Tests that need `/dev/kvm` call [`kvm_available`] first. Without KVM they
//! print a loud SKIP line and return; with `VMIGRATE_REQUIRE_KVM=1` (set by
//! CI whenever `/dev/kvm` exists) a missing KVM is a failure instead.

/// True when `/dev/kvm` can be opened read-write. Otherwise prints why the
/// calling test is skipped, or panics if `VMIGRATE_REQUIRE_KVM=1`.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        let required = std::env::var("VMIGRATE_REQUIRE_KVM").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{test}: /dev/kvm cannot be opened but VMIGRATE_REQUIRE_KVM=1"
        );
        eprintln!("!!!!!!!! SKIPPED {test}: /dev/kvm is not available !!!!!!!!");
    }
    ok
}

mod migration;

pub use migration::{
    digest, epochs, finish_send, info, query_migrate, spawn_send, verb, wait_info, wait_report,
};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Guests are emulated at about a million instructions per second and each
/// vCPU thread keeps a core busy: tests that run guests take turns.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory removed on drop (kept if the test panics).
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory named after the test.
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmigrate-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A `vmigrate run` child process, killed on drop.
pub struct VmProcess {
    /// The child.
    pub child: Child,
    /// Its API socket.
    pub api: PathBuf,
    /// Its serial output file.
    pub serial: PathBuf,
    /// Its stderr file.
    pub stderr: PathBuf,
}

impl VmProcess {
    /// Start a source: `vmigrate run --workload SPEC --mem MEM`.
    pub fn source(bin: &Path, dir: &Scratch, name: &str, workload: &str, mem: &str) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--workload", workload, "--mem", mem]);
        Self::spawn(cmd, dir, name)
    }

    /// Start a source with more `run` arguments (e.g. `--dirty-track ring`).
    pub fn source_with(
        bin: &Path,
        dir: &Scratch,
        name: &str,
        workload: &str,
        mem: &str,
        args: &[&str],
    ) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--workload", workload, "--mem", mem])
            .args(args);
        Self::spawn(cmd, dir, name)
    }

    /// Start `vmigrate run --boot IMAGE --mem MEM`.
    pub fn boot(bin: &Path, dir: &Scratch, name: &str, image: &Path, mem: &str) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--mem", mem, "--boot"]).arg(image);
        Self::spawn(cmd, dir, name)
    }

    /// Start a plaintext destination (`--insecure`) on `incoming`; returns
    /// it and the bound address.
    pub fn destination(bin: &Path, dir: &Scratch, name: &str, incoming: &str) -> (Self, String) {
        Self::destination_with(bin, dir, name, incoming, &["--insecure"], &[])
    }

    /// Start a destination on `incoming` with more `run` arguments `args`
    /// (which must choose the channel: `--insecure`, or `--psk-file PATH`,
    /// …) and environment variables `env` (e.g. `FAILPOINTS`); returns it
    /// and the bound address.
    pub fn destination_with(
        bin: &Path,
        dir: &Scratch,
        name: &str,
        incoming: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, String) {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--incoming", incoming]).args(args);
        cmd.envs(env.iter().copied());
        cmd.stdout(Stdio::piped());
        let mut p = Self::spawn(cmd, dir, name);
        let mut line = String::new();
        let out = p.child.stdout.take().expect("piped stdout");
        BufReader::new(out)
            .read_line(&mut line)
            .expect("read address");
        let uri = line
            .trim()
            .strip_prefix("vmigrate: listening on ")
            .unwrap_or_else(|| panic!("destination printed {line:?}: {}", p.stderr_text()))
            .to_string();
        (p, uri)
    }

    fn spawn(mut cmd: Command, dir: &Scratch, name: &str) -> Self {
        let api = dir.path(&format!("{name}.api"));
        let serial = dir.path(&format!("{name}.serial"));
        let stderr = dir.path(&format!("{name}.stderr"));
        cmd.arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&api)
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let child = cmd.spawn().expect("spawn vmigrate");
        Self {
            child,
            api,
            serial,
            stderr,
        }
    }

    /// Wait until the API socket exists.
    pub fn wait_api(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.api.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("vmigrate exited early ({st}): {}", self.stderr_text());
            }
            assert!(
                Instant::now() < deadline,
                "no API socket: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The serial output so far.
    pub fn serial_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.serial).unwrap_or_default()
    }

    /// Count of `mark` bytes in the serial output.
    pub fn count(&self, mark: u8) -> usize {
        self.serial_bytes().iter().filter(|&&b| b == mark).count()
    }

    /// Wait until the serial output holds `n` of `mark`; panics after
    /// `timeout`.
    pub fn wait_marks(&self, mark: u8, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(mark) < n {
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {n} x {:?} in {}; have {:?}; stderr: {}",
                char::from(mark),
                self.serial.display(),
                String::from_utf8_lossy(&self.serial_bytes()),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the process wrote to stderr.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a `vmigrate` subcommand to completion.
pub fn vmigrate(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmigrate")
}

/// `vmigrate send --json --verify`: the exit success, the parsed report
/// (`None` when no JSON was printed) and stderr. Plaintext (`--insecure`)
/// unless `extra` names `--psk-file`, `--tls-cert` or `--insecure`.
pub fn send_json(
    bin: &Path,
    api: &Path,
    to: &str,
    extra: &[&str],
) -> (bool, Option<serde_json::Value>, String) {
    outgoing_json(bin, "send", api, to, &[&["--verify"], extra].concat())
}

/// `vmigrate clone --json` (a live clone to a standby; always verified):
/// the exit success, the parsed report and stderr. Plaintext unless
/// `extra` chooses the channel, as [`send_json`].
pub fn clone_json(
    bin: &Path,
    api: &Path,
    to: &str,
    extra: &[&str],
) -> (bool, Option<serde_json::Value>, String) {
    outgoing_json(bin, "clone", api, to, extra)
}

fn outgoing_json(
    bin: &Path,
    verb: &str,
    api: &Path,
    to: &str,
    extra: &[&str],
) -> (bool, Option<serde_json::Value>, String) {
    let api = api.to_str().expect("utf-8 path");
    let mut args = vec![verb, "--api-socket", api, "--to", to, "--json"];
    if !["--psk-file", "--tls-cert", "--insecure"]
        .iter()
        .any(|c| extra.contains(c))
    {
        args.push("--insecure");
    }
    args.extend_from_slice(extra);
    let out = vmigrate(bin, &args);
    let report = serde_json::from_slice(&out.stdout).ok();
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
