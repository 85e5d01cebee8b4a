//! Tier 3: faults during a live migration of a running `verify` guest
//! between real `vmigrate` processes. In every case: `send` fails with a
//! message saying what happened, the destination never runs the guest (its
//! serial output stays empty), the source guest runs on and passes its own
//! check (no `X`), and a second migration to a fresh destination succeeds.
//! The one exception is a destination that dies between `Accepted` and
//! `Commit`: the source cannot know whether the guest runs there, so it
//! stays paused in `outcome-unknown` until the operator resumes it.
//!
//! Every fault (SIGKILL, SIGSTOP beyond the io timeout, a cut connection, a
//! link that fills up and stays full) is tried at every live phase (the full
//! copy, a later iteration, stop-and-copy with the guest paused) and at the
//! handshake (in place before `send` starts). Phases are
//! reached by watching the source's `query-migrate`; a moment no outside
//! signal can hit (inside the completion exchange) by a fault point
//! (`FAILPOINTS`, see `migrate_core::faults`).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// How the destination, or the link to it, fails.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL the destination process.
    Kill,
    /// SIGSTOP it (beyond the source's 3 s io timeout), SIGCONT it after.
    Stall,
    /// Cut both TCP connections in the middle of the stream.
    Cut,
    /// Stop carrying bytes to the destination, keeping both connections
    /// open: a link that fills up and stays full.
    Fill,
}

/// When it fails, and the `send` arguments that make that phase last.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Before the source's `Hello` is answered: the fault is in place
    /// before `send` starts.
    Handshake,
    /// 32 MiB at 4 MB/s: seconds of full copy.
    FullCopy,
    /// The guest outruns 16 MB/s: qemu's rule iterates for ever.
    LaterIteration,
    /// Forced into stop-and-copy after 1 s; the final 32 MiB at 4 MB/s keep
    /// the guest paused for seconds.
    StopAndCopy,
}

impl Phase {
    fn send_args(self) -> &'static [&'static str] {
        match self {
            Phase::Handshake => &["--io-timeout", "3"],
            Phase::FullCopy => &["--max-bandwidth", "4M", "--io-timeout", "3"],
            Phase::LaterIteration => &[
                "--max-bandwidth",
                "16M",
                "--policy",
                "qemu",
                "--io-timeout",
                "3",
            ],
            Phase::StopAndCopy => &[
                "--max-bandwidth",
                "4M",
                "--timeout",
                "1",
                "--timeout-action",
                "force",
                "--io-timeout",
                "3",
            ],
        }
    }

    fn reached(self, r: &Value) -> bool {
        match self {
            Phase::Handshake => true,
            Phase::FullCopy => {
                r["status"] == "active"
                    && live_iterations(r) == 0
                    && r["ram"]["transferred"].as_u64() > Some(0)
            }
            Phase::LaterIteration => r["status"] == "active" && live_iterations(r) >= 2,
            Phase::StopAndCopy => r["status"] == "device",
        }
    }
}

const FORWARD: u8 = 0;
const CUT: u8 = 1;
const FILL: u8 = 2;
const RELEASE: u8 = 3;

/// A TCP proxy between source and destination that forwards both ways
/// until the test sets its mode: `CUT` shuts both connections down, `FILL`
/// stops carrying bytes to the destination while both stay open, until
/// `RELEASE` drops them.
fn proxy(to: &str) -> (String, Arc<AtomicU8>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let target = to.strip_prefix("tcp:").unwrap().to_string();
    let mode = Arc::new(AtomicU8::new(FORWARD));
    let mode2 = mode.clone();
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        // A destination killed before the handshake refuses: drop the
        // source's connection as a dead peer's network would.
        let Ok(mut to_dst) = TcpStream::connect(target) else {
            return;
        };
        let mut back_src = from_src.try_clone().unwrap();
        let mut back_dst = to_dst.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
        });
        from_src
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match mode2.load(Ordering::SeqCst) {
                CUT => {
                    let _ = from_src.shutdown(Shutdown::Both);
                    let _ = to_dst.shutdown(Shutdown::Both);
                    return;
                }
                FILL => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                RELEASE => return,
                _ => {}
            }
            match from_src.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if to_dst.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
    });
    (addr, mode)
}

/// Migrate a running `verify` guest, inject `fault` once `phase` is
/// reached, and check what every fault must leave: `send` failed, the
/// destination never ran the guest, the source guest runs on clean, and a
/// second migration to a fresh destination completes.
fn fault_at(fault: Fault, phase: Phase) {
    let dir = Scratch::new(&format!("{fault:?}-{phase:?}").to_lowercase());
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination_with(
        bin(),
        &dir,
        "dst",
        "tcp:127.0.0.1:0",
        &["--insecure", "--incoming-timeout", "5"],
        &[],
    );
    let (via, link) = proxy(&uri);
    let inject = |dst: &mut VmProcess| match fault {
        Fault::Kill => dst.child.kill().expect("SIGKILL the destination"),
        Fault::Stall => signal(dst, "-STOP"),
        Fault::Cut => link.store(CUT, Ordering::SeqCst),
        Fault::Fill => link.store(FILL, Ordering::SeqCst),
    };
    if matches!(phase, Phase::Handshake) {
        inject(&mut dst);
    }
    let send = spawn_send(bin(), &dir, &src.api, &via, phase.send_args());
    if !matches!(phase, Phase::Handshake) {
        wait_report(bin(), &src.api, &format!("{phase:?}"), T, |r| {
            phase.reached(r)
        });
        inject(&mut dst);
    }
    let (ok, report) = finish_send(&dir, send, T);
    assert_failed(ok, &report, "");
    assert!(
        report["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{fault:?} at {phase:?}: the error must say what happened: {report:#}"
    );
    match fault {
        Fault::Stall => signal(&dst, "-CONT"),
        Fault::Fill => link.store(RELEASE, Ordering::SeqCst),
        _ => {}
    }
    assert_never_ran(&mut dst);
    assert_source_runs_and_migrates_again(&dir, &mut src);
}

macro_rules! fault_tests {
    ($($name:ident: $fault:ident at $phase:ident;)*) => {$(
        #[test]
        fn $name() {
            if !kvm_available(stringify!($name)) {
                return;
            }
            let _g = one_at_a_time();
            fault_at(Fault::$fault, Phase::$phase);
        }
    )*};
}

fault_tests! {
    kill_before_the_handshake: Kill at Handshake;
    stall_in_the_handshake: Stall at Handshake;
    cut_in_the_handshake: Cut at Handshake;
    fill_in_the_handshake: Fill at Handshake;
    kill_in_the_full_copy: Kill at FullCopy;
    kill_in_a_later_iteration: Kill at LaterIteration;
    kill_in_stop_and_copy: Kill at StopAndCopy;
    stall_in_the_full_copy: Stall at FullCopy;
    stall_in_a_later_iteration: Stall at LaterIteration;
    stall_in_stop_and_copy: Stall at StopAndCopy;
    cut_in_the_full_copy: Cut at FullCopy;
    cut_in_a_later_iteration: Cut at LaterIteration;
    cut_in_stop_and_copy: Cut at StopAndCopy;
    fill_in_the_full_copy: Fill at FullCopy;
    fill_in_a_later_iteration: Fill at LaterIteration;
    fill_in_stop_and_copy: Fill at StopAndCopy;
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

/// Why the source must not resume on its own after `Commit`: a destination
/// that stalls between `Accepted` and `Commit` longer than the source's io
/// timeout still takes the guest when it wakes (the `Commit` is in its
/// socket). The source, which heard nothing, stays paused in
/// `outcome-unknown`: the guest runs exactly once, on the destination.
#[test]
fn destination_stalls_between_accepted_and_commit() {
    if !kvm_available("destination_stalls_between_accepted_and_commit") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("late-commit");
    let src = source(&dir);
    let (dst, uri) = VmProcess::destination_with(
        bin(),
        &dir,
        "dst",
        "tcp:127.0.0.1:0",
        &["--insecure"],
        &[("FAILPOINTS", "dest-after-accepted=sleep(5000)")],
    );
    let (ok, report, stderr) = send_json(
        bin(),
        &src.api,
        &uri,
        &["--policy", "xen", "--io-timeout", "2"],
    );
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_failed(ok, &report, "outcome unknown");
    assert_eq!(info(bin(), &src.api)["state"], "outcome-unknown");
    // The destination wakes, finds Commit, and runs the guest.
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0, "lost a page");
    // The source never ran it again.
    let n = src.count(PASS_MARK);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(src.count(PASS_MARK), n, "the guest ran on both sides");
}
