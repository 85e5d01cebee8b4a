//! Tier 3: `migrate-cancel` at each phase of a live migration of a running
//! `verify` guest: during the full copy, during a later iteration, and
//! during stop-and-copy with the guest paused. Each time `send` exits
//! non-zero with status `cancelled`, the source guest runs on (resumed if
//! it was paused) and passes its own check, and the destination, told
//! `Cancelled`, exits non-zero without having run the guest.

use std::path::Path;
use std::time::Duration;

use e2e::{
    finish_send, info, kvm_available, one_at_a_time, query_migrate, spawn_send, verb, wait_report,
    Scratch, VmProcess,
};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(120);

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn live_iterations(r: &Value) -> usize {
    r["iterations"].as_array().map_or(0, Vec::len)
}

/// Cancel once the source's report satisfies `ready`.
fn cancel_when(test: &str, send_args: &[&str], phase: &str, ready: impl Fn(&Value) -> bool) {
    let dir = Scratch::new(test);
    let mut src = VmProcess::source(bin(), &dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let send = spawn_send(bin(), &dir, &src.api, &uri, send_args);
    wait_report(bin(), &src.api, phase, T, ready);
    assert_eq!(info(bin(), &src.api)["state"], "migrating");
    let (ok, err) = verb(bin(), &src.api, "cancel", &[]);
    assert!(ok, "{phase}: {err}");

    let (ok, report) = finish_send(&dir, send, T);
    assert!(!ok, "send succeeded after a cancel: {report:#}");
    assert_eq!(report["status"], "cancelled", "{report:#}");
    assert_eq!(query_migrate(bin(), &src.api)["status"], "cancelled");
    let st = dst.wait_exit(T);
    assert!(!st.success(), "destination exited 0 after a cancel");
    assert!(
        dst.stderr_text().contains("Cancelled"),
        "{}",
        dst.stderr_text()
    );
    assert!(
        dst.serial_bytes().is_empty(),
        "the destination ran the guest"
    );

    assert_eq!(info(bin(), &src.api)["state"], "running");
    let marks = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, marks + 3, T);
    assert_eq!(src.count(MISMATCH_MARK), 0, "source saw a mismatch");
    let (ok, err) = verb(bin(), &src.api, "cancel", &[]);
    assert!(!ok && err.contains("no migration is running"), "{err}");
}

#[test]
fn cancel_during_the_full_copy() {
    if !kvm_available("cancel_during_the_full_copy") {
        return;
    }
    let _g = one_at_a_time();
    // 32 MiB rewritten several times a second over 4 MB/s: never converges,
    // and the full copy alone takes seconds.
    cancel_when(
        "cancel-it0",
        &["--policy", "qemu", "--max-bandwidth", "4M"],
        "bytes sent within iteration 0",
        |r| {
            r["status"] == "active"
                && live_iterations(r) == 0
                && r["ram"]["transferred"].as_u64() > Some(0)
        },
    );
}

#[test]
fn cancel_during_a_later_iteration() {
    if !kvm_available("cancel_during_a_later_iteration") {
        return;
    }
    let _g = one_at_a_time();
    cancel_when(
        "cancel-later",
        &["--policy", "qemu", "--max-bandwidth", "16M"],
        "two iterations done",
        |r| r["status"] == "active" && live_iterations(r) >= 2,
    );
}

#[test]
fn cancel_during_stop_and_copy_resumes_the_paused_source() {
    if !kvm_available("cancel_during_stop_and_copy_resumes_the_paused_source") {
        return;
    }
    let _g = one_at_a_time();
    // Forced into stop-and-copy after the full copy; the final 32 MiB at
    // 4 MB/s keep the guest paused for seconds.
    cancel_when(
        "cancel-final",
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
