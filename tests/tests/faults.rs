//! Tier 3: faults during a live migration of a running `verify` guest
//! between real `vmigrate` processes. In every case: `send` fails with a
//! message saying what happened, the destination never runs the guest (its
//! serial output stays empty), the source guest runs on and passes its own
//! check (no `X`), and a second migration to a fresh destination succeeds.
//! The one exception is a destination that dies between `Accepted` and
//! `Commit`: the source cannot know whether the guest runs there, so it
//! stays paused in `outcome-unknown` until the operator resumes it.
//!
//! Phases are reached by watching the source's `query-migrate`; a moment no
//! outside signal can hit (inside the completion exchange) by a fault point
//! (`FAILPOINTS`, see `migrate_core::faults`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{
    finish_send, info, kvm_available, one_at_a_time, send_json, spawn_send, verb, wait_report,
    Scratch, VmProcess,
};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(120);

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A `verify` source on 64 MiB (32 MiB written and checked every pass) that
/// has passed twice.
fn source(dir: &Scratch) -> VmProcess {
    let mut src = VmProcess::source(bin(), dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    src
}

fn live_iterations(r: &Value) -> usize {
    r["iterations"].as_array().map_or(0, Vec::len)
}

fn signal(p: &VmProcess, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// The failed attempt's `send`: non-zero exit, a failed report whose error
/// contains `what`.
fn assert_failed(ok: bool, report: &Value, what: &str) {
    assert!(!ok, "send must fail: {report:#}");
    assert_eq!(report["status"], "failed", "{report:#}");
    let err = report["error"].as_str().unwrap_or_default();
    assert!(
        err.to_lowercase().contains(what),
        "error {err:?} should say {what:?}"
    );
}

/// The destination of a failed attempt exited non-zero and never ran the
/// guest (a running guest prints `B` at once).
fn assert_never_ran(dst: &mut VmProcess) {
    let st = dst.wait_exit(T);
    assert!(
        !st.success(),
        "destination must fail: {}",
        dst.stderr_text()
    );
    assert!(
        dst.serial_bytes().is_empty(),
        "the destination ran the guest: {:?}",
        String::from_utf8_lossy(&dst.serial_bytes())
    );
}

/// After a failed attempt: the source guest runs and checks clean, and a
/// migration to a fresh destination completes with equal digests and a
/// guest that goes on passing there.
fn assert_source_runs_and_migrates_again(dir: &Scratch, src: &mut VmProcess) {
    let n = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, n + 2, T);
    assert_eq!(
        src.count(MISMATCH_MARK),
        0,
        "the source guest saw a mismatch"
    );
    assert_eq!(info(bin(), &src.api)["state"], "running");
    let (dst, uri) = VmProcess::destination(bin(), dir, "retry", "tcp:127.0.0.1:0");
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &["--policy", "xen"]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "the retry must complete: {report:#}");
    assert_eq!(report["digest"]["equal"], true);
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0, "lost page after the retry");
}

/// SIGKILL the destination once the source's report satisfies `ready`.
fn kill_destination(test: &str, send_args: &[&str], phase: &str, ready: impl Fn(&Value) -> bool) {
    let dir = Scratch::new(test);
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let send = spawn_send(bin(), &dir, &src.api, &uri, send_args);
    wait_report(bin(), &src.api, phase, T, ready);
    dst.child.kill().expect("SIGKILL the destination");
    let (ok, report) = finish_send(&dir, send, T);
    assert_failed(ok, &report, "");
    assert!(report["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_never_ran(&mut dst);
    assert_source_runs_and_migrates_again(&dir, &mut src);
}

#[test]
fn destination_killed_during_the_full_copy() {
    if !kvm_available("destination_killed_during_the_full_copy") {
        return;
    }
    let _g = one_at_a_time();
    // 32 MiB of data at 4 MB/s: the full copy takes about 8 s.
    kill_destination(
        "kill-it0",
        &["--max-bandwidth", "4M"],
        "the full copy under way",
        |r| r["status"] == "active" && live_iterations(r) == 0,
    );
}

#[test]
fn destination_killed_during_a_later_iteration() {
    if !kvm_available("destination_killed_during_a_later_iteration") {
        return;
    }
    let _g = one_at_a_time();
    // The guest rewrites its 32 MiB far faster than 16 MB/s: qemu's rule
    // never stops, iterations follow one another.
    kill_destination(
        "kill-later",
        &["--max-bandwidth", "16M", "--policy", "qemu"],
        "two iterations done",
        |r| r["status"] == "active" && live_iterations(r) >= 2,
    );
}

#[test]
fn destination_killed_during_stop_and_copy() {
    if !kvm_available("destination_killed_during_stop_and_copy") {
        return;
    }
    let _g = one_at_a_time();
    // Forced to stop after the full copy; the final 32 MiB at 4 MB/s keep
    // the guest paused for about 8 s.
    kill_destination(
        "kill-final",
        &[
            "--max-bandwidth",
            "4M",
            "--timeout",
            "1",
            "--timeout-action",
            "force",
        ],
        "stop-and-copy",
        |r| r["status"] == "device",
    );
}

#[test]
fn destination_stalled_beyond_the_io_timeout() {
    if !kvm_available("destination_stalled_beyond_the_io_timeout") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("stall");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let send = spawn_send(
        bin(),
        &dir,
        &src.api,
        &uri,
        &[
            "--max-bandwidth",
            "16M",
            "--policy",
            "qemu",
            "--io-timeout",
            "3",
        ],
    );
    wait_report(bin(), &src.api, "an iteration done", T, |r| {
        live_iterations(r) >= 1
    });
    signal(&dst, "-STOP");
    let (ok, report) = finish_send(&dir, send, T);
    assert_failed(ok, &report, "");
    signal(&dst, "-CONT");
    // It wakes to a closed connection and gives up without running.
    assert_never_ran(&mut dst);
    assert_source_runs_and_migrates_again(&dir, &mut src);
}

/// A TCP proxy between source and destination that forwards `limit` bytes
/// from the source, then either cuts both connections (`cut`) or stops
/// forwarding while keeping them open (a link that fills up and stays full).
fn proxy(to: &str, limit: usize, cut: bool) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let target = to.strip_prefix("tcp:").unwrap().to_string();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = TcpStream::connect(target).unwrap();
        let mut back_src = from_src.try_clone().unwrap();
        let mut back_dst = to_dst.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut forwarded = 0;
        while forwarded < limit {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n.min(limit - forwarded),
            };
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
            forwarded += n;
        }
        if cut {
            let _ = from_src.shutdown(Shutdown::Both);
            let _ = to_dst.shutdown(Shutdown::Both);
            return;
        }
        // Full link: hold both ends open, read nothing, until told.
        while !done2.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (addr, done)
}

#[test]
fn connection_cut_mid_stream() {
    if !kvm_available("connection_cut_mid_stream") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("cut");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let (via, _) = proxy(&uri, 8 << 20, true);
    let (ok, report, stderr) = send_json(bin(), &src.api, &via, &["--max-bandwidth", "16M"]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_failed(ok, &report, "");
    assert_never_ran(&mut dst);
    assert_source_runs_and_migrates_again(&dir, &mut src);
}

#[test]
fn link_that_fills_up_and_stays_full() {
    if !kvm_available("link_that_fills_up_and_stays_full") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("full");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination_with(
        bin(),
        &dir,
        "dst",
        "tcp:127.0.0.1:0",
        &["--insecure", "--incoming-timeout", "5"],
        &[],
    );
    let (via, release) = proxy(&uri, 4 << 20, false);
    let started = Instant::now();
    let (ok, report, stderr) = send_json(bin(), &src.api, &via, &["--io-timeout", "3"]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_failed(ok, &report, "");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the io timeout must end a blocked send"
    );
    // The destination, starved, gives up on its own timeout.
    assert_never_ran(&mut dst);
    release.store(true, Ordering::SeqCst);
    assert_source_runs_and_migrates_again(&dir, &mut src);
}

#[test]
fn destination_dies_between_accepted_and_commit() {
    if !kvm_available("destination_dies_between_accepted_and_commit") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("unknown");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination_with(
        bin(),
        &dir,
        "dst",
        "tcp:127.0.0.1:0",
        &["--insecure"],
        &[("FAILPOINTS", "dest-after-accepted=return")],
    );
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &["--policy", "xen"]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_failed(ok, &report, "outcome unknown");
    let st = dst.wait_exit(T);
    assert_eq!(
        st.code(),
        Some(migrate_core::faults::CRASH_EXIT_CODE),
        "{}",
        dst.stderr_text()
    );
    assert!(
        dst.serial_bytes().is_empty(),
        "the destination never resumed"
    );

    // The source cannot know: it stays paused, and says so.
    assert_eq!(info(bin(), &src.api)["state"], "outcome-unknown");
    let n = src.count(PASS_MARK);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(src.count(PASS_MARK), n, "the source must not run the guest");
    let (ok, err) = verb(bin(), &src.api, "resume", &[]);
    assert!(!ok && err.contains("outcome is unknown"), "{err}");
    // The operator knows the destination is gone: resume the source.
    let (ok, err) = verb(bin(), &src.api, "resume", &["--force"]);
    assert!(ok, "{err}");
    assert_source_runs_and_migrates_again(&dir, &mut src);
}

/// The completion exchange done right: 50 live migrations of one running
/// `verify` guest in a row, each to a fresh process, each with equal
/// memory digests, the guest checking every page on every side, while a
/// busy thread competes for the CPU.
#[test]
fn soak_fifty_migrations_in_a_row() {
    if !kvm_available("soak_fifty_migrations_in_a_row") {
        return;
    }
    let _g = one_at_a_time();
    let rounds: usize = std::env::var("VMIGRATE_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = Scratch::new("soak");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let hog = std::thread::spawn(move || {
        let mut x = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        x
    });
    let mut src = source(&dir);
    for round in 0..rounds {
        let name = format!("p{round}");
        let (dst, uri) = VmProcess::destination(bin(), &dir, &name, "tcp:127.0.0.1:0");
        let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &["--policy", "xen"]);
        let report = report.unwrap_or_else(|| panic!("round {round}: no report: {stderr}"));
        assert!(ok, "round {round}: {report:#}");
        assert_eq!(report["digest"]["equal"], true, "round {round}");
        assert!(src.wait_exit(T).success(), "round {round}");
        assert_eq!(
            src.count(MISMATCH_MARK),
            0,
            "round {round}: source mismatch"
        );
        // The guest goes on checking all of its pages here before it moves
        // on again.
        dst.wait_marks(PASS_MARK, 1, T);
        assert_eq!(dst.count(MISMATCH_MARK), 0, "round {round}: lost a page");
        src = dst;
    }
    let n = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, n + 2, T);
    assert_eq!(src.count(MISMATCH_MARK), 0);
    stop.store(true, Ordering::Relaxed);
    hog.join().unwrap();
}

/// Resource bounds: a destination allowed 32 MiB refuses a 64 MiB guest at
/// the handshake, before mapping any memory; nothing else changes.
#[test]
fn destination_refuses_a_guest_larger_than_it_allows() {
    if !kvm_available("destination_refuses_a_guest_larger_than_it_allows") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("max-mem");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination_with(
        bin(),
        &dir,
        "dst",
        "tcp:127.0.0.1:0",
        &["--insecure", "--max-mem", "32M"],
        &[],
    );
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &[]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_failed(ok, &report, "handshake");
    assert_never_ran(&mut dst);
    assert!(
        dst.stderr_text().contains("larger than"),
        "{}",
        dst.stderr_text()
    );
    assert_source_runs_and_migrates_again(&dir, &mut src);
}
