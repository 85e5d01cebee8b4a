//! Driving a migration from a test: `send` in the background, polling the
//! source's `query-migrate`, control verbs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{vmigrate, Scratch};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `vmigrate VERB --api-socket SOCKET ARGS...`: success and stderr.
pub fn verb(bin: &Path, socket: &Path, verb: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec![verb, "--api-socket", s(socket)];
    all.extend_from_slice(args);
    let out = vmigrate(bin, &all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vmigrate query-migrate --json` on `socket`.
pub fn query_migrate(bin: &Path, socket: &Path) -> Value {
    json_verb(bin, socket, "query-migrate")
}

/// `vmigrate info --json` on `socket`.
pub fn info(bin: &Path, socket: &Path) -> Value {
    json_verb(bin, socket, "info")
}

/// Poll `info` on `socket` every 20 ms until `ok` holds; panics after
/// `timeout`, naming `what` and the last answer.
pub fn wait_info(
    bin: &Path,
    socket: &Path,
    timeout: std::time::Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let st = info(bin, socket);
        if ok(&st) {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited for {what}: {st:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Checkpoint epochs an `info` answer counts (0 without checkpoints).
pub fn epochs(st: &Value) -> u64 {
    st["checkpoints"]["epochs"].as_u64().unwrap_or(0)
}

/// `vmigrate digest --json` on `socket`: memory and vCPU digests the VM
/// process computes from what it holds.
pub fn digest(bin: &Path, socket: &Path) -> Value {
    json_verb(bin, socket, "digest")
}

fn json_verb(bin: &Path, socket: &Path, verb: &str) -> Value {
    let out = vmigrate(bin, &[verb, "--api-socket", s(socket), "--json"]);
    assert!(
        out.status.success(),
        "{verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

/// `vmigrate send --json` running in the background; its stdout and stderr
/// go to `send.json` and `send.stderr` in `dir`.
pub fn spawn_send(bin: &Path, dir: &Scratch, api: &Path, to: &str, extra: &[&str]) -> Child {
    let out = std::fs::File::create(dir.path("send.json")).expect("send.json");
    Command::new(bin)
        .args(["send", "--api-socket", s(api), "--to", to, "--json"])
        // Plaintext unless `extra` chooses the channel (as `send_json`).
        .args(
            if extra
                .iter()
                .any(|a| ["--psk-file", "--tls-cert", "--insecure"].contains(a))
            {
                &[][..]
            } else {
                &["--insecure"][..]
            },
        )
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(std::fs::File::create(dir.path("send.stderr")).expect("send.stderr"))
        .spawn()
        .expect("spawn send")
}

/// Wait (up to `timeout`) for a background `send`; its success and report.
pub fn finish_send(dir: &Scratch, mut send: Child, timeout: Duration) -> (bool, Value) {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = send.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = send.kill();
            panic!("send did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(dir.path("send.json")).unwrap_or_default();
    let report = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {text:?} {}",
            std::fs::read_to_string(dir.path("send.stderr")).unwrap_or_default()
        )
    });
    (status.success(), report)
}

/// Poll `query-migrate` on `socket` until `ok` holds for the report.
pub fn wait_report(
    bin: &Path,
    socket: &Path,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = query_migrate(bin, socket);
        if ok(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "waited for {what}: {r:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
