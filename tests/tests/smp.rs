//! Tier 3: guests on two vCPUs migrated and cloned between real `vmigrate`
//! processes on real KVM.
//!
//! With `--vcpus 2` the boot processor starts the AP by INIT + SIPI and each
//! vCPU works on its own half of the range, printing its index as its pass
//! mark (`0`, `1`). A migration must carry both vCPUs (and their LAPICs, and
//! the irqchip in vCPU 0's state): afterwards both marks continue on the
//! destination, and `verify` finds no lost page or register on either vCPU.

use std::path::Path;
use std::time::Duration;

use e2e::{
    clone_json, digest, info, kvm_available, one_at_a_time, send_json, verb, Scratch, VmProcess,
};
use harness::{BOOT_MARK, MISMATCH_MARK, VCPU_MARK_BASE};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(60);
const VCPU0: u8 = VCPU_MARK_BASE;
const VCPU1: u8 = VCPU_MARK_BASE + 1;

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A source running `workload` on two vCPUs, both of which have printed
/// `marks` pass marks.
fn two_vcpu_source(
    dir: &Scratch,
    workload: &str,
    mem: &str,
    marks: usize,
    args: &[&str],
) -> VmProcess {
    let args = [&["--vcpus", "2"], args].concat();
    let mut src = VmProcess::source_with(bin(), dir, "src", workload, mem, &args);
    src.wait_api();
    src.wait_marks(VCPU0, marks, T);
    src.wait_marks(VCPU1, marks, T);
    assert_eq!(src.count(BOOT_MARK), 2, "both vCPUs reached long mode");
    src
}

/// Migrate (source started with `run` arguments `src_args`, `send` with
/// `extra`), check the report, and that both vCPUs run on at the
/// destination without a mismatch; returns the report.
fn migrate_and_check(
    test: &str,
    workload: &str,
    mem: &str,
    src_args: &[&str],
    extra: &[&str],
) -> Value {
    let dir = Scratch::new(test);
    let mut src = two_vcpu_source(&dir, workload, mem, 2, src_args);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, extra);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr} {}", src.stderr_text()));
    assert!(
        ok,
        "send failed: {report:#}\n{stderr}\n{}",
        dst.stderr_text()
    );
    assert_eq!(report["status"], "completed");
    assert_eq!(report["digest"]["equal"], true, "{report:#}");
    assert_eq!(report["digest"]["source"], report["digest"]["destination"]);
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());
    assert_eq!(src.count(MISMATCH_MARK), 0, "the source saw a mismatch");

    // Both vCPUs go on at the destination (whose serial shows only what
    // ran there), neither finds a mismatch.
    dst.wait_marks(VCPU0, 2, T);
    dst.wait_marks(VCPU1, 2, T);
    assert_eq!(
        dst.count(MISMATCH_MARK),
        0,
        "destination: {:?}",
        String::from_utf8_lossy(&dst.serial_bytes())
    );
    assert_eq!(
        dst.count(BOOT_MARK),
        0,
        "the destination rebooted the guest"
    );
    assert!(dst.is_running(), "{}", dst.stderr_text());
    let st = info(bin(), &dst.api);
    assert_eq!(st["state"], "running", "{st:#}");
    assert_eq!(st["vcpus"], 2, "{st:#}");
    assert!(verb(bin(), &dst.api, "shutdown", &[]).0);
    assert!(dst.wait_exit(T).success());
    report
}

#[test]
fn two_vcpu_verify_guest_migrates_cleanly() {
    if !kvm_available("two_vcpu_verify_guest_migrates_cleanly") {
        return;
    }
    let _g = one_at_a_time();
    migrate_and_check(
        "smp-verify",
        "verify:end=32M",
        "64M",
        &[],
        &["--downtime-limit", "2000"],
    );
}

#[test]
fn two_vcpu_verify_guest_migrates_with_dirty_rings() {
    if !kvm_available("two_vcpu_verify_guest_migrates_with_dirty_rings") {
        return;
    }
    let _g = one_at_a_time();
    let r = migrate_and_check(
        "smp-ring",
        "verify:end=32M",
        "64M",
        &["--dirty-track", "ring"],
        &["--policy", "xen"],
    );
    assert_eq!(r["dirty-track"], "ring", "{r:#}");
}

#[test]
fn two_vcpu_hotset_guest_migrates_with_zstd() {
    if !kvm_available("two_vcpu_hotset_guest_migrates_with_zstd") {
        return;
    }
    let _g = one_at_a_time();
    migrate_and_check(
        "smp-hotset",
        "hotset:wss=16M",
        "64M",
        &[],
        &["--policy", "xen", "--compress", "zstd"],
    );
}

#[test]
fn two_vcpu_sweep_guest_migrates() {
    if !kvm_available("two_vcpu_sweep_guest_migrates") {
        return;
    }
    let _g = one_at_a_time();
    let r = migrate_and_check("smp-sweep", "sweep", "128M", &[], &["--policy", "xen"]);
    assert_eq!(r["policy"], "xen");
}

#[test]
fn two_vcpu_verify_guest_clones_into_a_standby() {
    if !kvm_available("two_vcpu_verify_guest_clones_into_a_standby") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("smp-clone");
    let mut src = two_vcpu_source(&dir, "verify:end=32M", "64M", 2, &[]);
    let (mut held, uri) = VmProcess::destination_with(
        bin(),
        &dir,
        "standby",
        "tcp:127.0.0.1:0",
        &["--insecure", "--standby"],
        &[],
    );
    let (ok, report, stderr) = clone_json(bin(), &src.api, &uri, &[]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr} {}", src.stderr_text()));
    assert!(ok, "clone failed: {report:#}\n{}", held.stderr_text());
    assert_eq!(report["digest"]["equal"], true, "{report:#}");
    // The standby's own digest of both vCPUs (LAPICs and irqchip included)
    // equals the primary's at the clone point.
    held.wait_api();
    let d = digest(bin(), &held.api);
    assert_eq!(d["memory"], report["digest"]["source"], "{d:#} {report:#}");
    assert_eq!(d["vcpus"], report["vcpu-digest"], "{d:#} {report:#}");
    // The primary runs on, both vCPUs, cleanly.
    let (a, b) = (src.count(VCPU0), src.count(VCPU1));
    src.wait_marks(VCPU0, a + 2, T);
    src.wait_marks(VCPU1, b + 2, T);
    assert_eq!(src.count(MISMATCH_MARK), 0);
    assert!(held.serial_bytes().is_empty(), "the standby ran");
    assert!(verb(bin(), &src.api, "shutdown", &[]).0);
    assert!(src.wait_exit(T).success());
    drop(held.child.kill());
}
