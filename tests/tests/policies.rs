//! Tier 3: the policies and the timeout action on real KVM guests migrated
//! between real `vmigrate` processes. Correctness is the `verify` guest's
//! own check on the destination plus the memory digests of both sides.

use std::path::Path;
use std::time::Duration;

use e2e::{kvm_available, one_at_a_time, send_json, Scratch, VmProcess};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Migrate a running `verify` guest with `args`; check the destination goes
/// on passing its self-check. Returns the report.
fn migrate_verify(test: &str, args: &[&str]) -> Value {
    let dir = Scratch::new(test);
    let mut src = VmProcess::source(bin(), &dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    // (send_json asks for --verify itself.)
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, args);
    let r = report.unwrap_or_else(|| panic!("no report: {stderr} {}", src.stderr_text()));
    assert!(ok, "send failed: {r:#}\n{stderr}\n{}", dst.stderr_text());
    assert_eq!(r["status"], "completed");
    assert_eq!(r["digest"]["equal"], true, "{r:#}");
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 2, T);
    assert_eq!(
        dst.count(MISMATCH_MARK),
        0,
        "destination found a lost page or register: {:?}",
        String::from_utf8_lossy(&dst.serial_bytes())
    );
    drop(dst.child.kill());
    r
}

/// `--timeout-action force` finishes a migration that would never converge
/// (the guest dirties its 32 MiB far faster than a 16 MB/s link sends),
/// pausing it at the timeout, with nothing lost.
#[test]
fn timeout_force_finishes_a_guest_that_never_converges() {
    if !kvm_available("timeout_force_finishes_a_guest_that_never_converges") {
        return;
    }
    let _g = one_at_a_time();
    let r = migrate_verify(
        "force",
        &[
            "--policy",
            "qemu",
            "--max-bandwidth",
            "16M",
            "--timeout",
            "3",
            "--timeout-action",
            "force",
        ],
    );
    let reason = r["stop-reason"].as_str().unwrap();
    assert!(reason.contains("stop-and-copy forced"), "{reason}");
    assert!(r["total-time"].as_f64().unwrap() >= 3000.0, "{r:#}");
}

/// The baselines added for the study (`ch`, `stall`, `ramp`) run a real
/// migration to completion on an uncapped loopback link, where the guest
/// converges under each one's downtime rule.
#[test]
fn newer_baselines_migrate_a_running_guest() {
    if !kvm_available("newer_baselines_migrate_a_running_guest") {
        return;
    }
    let _g = one_at_a_time();
    for policy in ["ch", "stall", "ramp"] {
        let r = migrate_verify(policy, &["--policy", policy, "--downtime-limit", "1000"]);
        assert_eq!(r["policy"], policy);
        let reason = r["stop-reason"].as_str().unwrap();
        assert!(reason.contains("within the limit"), "{policy}: {reason}");
    }
}
