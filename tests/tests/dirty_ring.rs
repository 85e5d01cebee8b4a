//! Tier 3: migrations with each dirty-tracking mode (`--dirty-track`)
//! between real `vmigrate` processes on real KVM.
//!
//! The `verify` guest checks every page it wrote after each pass, so a page
//! the dirty ring failed to report shows on the destination as the
//! mismatch mark; both sides also digest their memory at the switch-over.

use std::path::Path;
use std::time::Duration;

use e2e::{info, kvm_available, one_at_a_time, send_json, vmigrate, Scratch, VmProcess};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(90);

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// What one migration showed.
struct Run {
    report: Value,
    src_info: Value,
    dst_info: Value,
}

/// Start `workload` with `src_args`, wait for `marks` pass marks, migrate
/// it (`send --verify` plus `send_args`) to a destination started with
/// `dst_args`, check the digests and that the destination guest runs on
/// for two more passes without a mismatch mark.
fn migrate(
    test: &str,
    workload: &str,
    mem: &str,
    marks: usize,
    src_args: &[&str],
    dst_args: &[&str],
    send_args: &[&str],
) -> Run {
    let dir = Scratch::new(test);
    let mut src = VmProcess::source_with(bin(), &dir, "src", workload, mem, src_args);
    src.wait_api();
    src.wait_marks(PASS_MARK, marks, T);
    let src_info = info(bin(), &src.api);
    let mut args = vec!["--insecure"];
    args.extend_from_slice(dst_args);
    let (mut dst, uri) =
        VmProcess::destination_with(bin(), &dir, "dst", "tcp:127.0.0.1:0", &args, &[]);

    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, send_args);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr} {}", src.stderr_text()));
    assert!(
        ok,
        "send failed: {report:#}\n{stderr}\n{}",
        dst.stderr_text()
    );
    assert_eq!(report["status"], "completed");
    let digest = &report["digest"];
    assert_eq!(digest["source"], digest["destination"], "{report:#}");
    assert_eq!(digest["equal"], true);

    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());
    assert_eq!(src.count(MISMATCH_MARK), 0, "source saw a mismatch");
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 2, T);
    assert_eq!(
        dst.count(MISMATCH_MARK),
        0,
        "destination found a lost page: {:?}",
        String::from_utf8_lossy(&dst.serial_bytes())
    );
    assert!(
        dst.is_running(),
        "destination stopped: {}",
        dst.stderr_text()
    );
    let dst_info = info(bin(), &dst.api);
    let out = vmigrate(
        bin(),
        &["shutdown", "--api-socket", dst.api.to_str().unwrap()],
    );
    assert!(out.status.success());
    assert!(dst.wait_exit(T).success());
    Run {
        report,
        src_info,
        dst_info,
    }
}

#[test]
fn verify_guest_migrates_with_the_dirty_ring() {
    if !kvm_available("verify_guest_migrates_with_the_dirty_ring") {
        return;
    }
    let _g = one_at_a_time();
    // The destination asks for `auto`: this host offers the ring, so it
    // must pick it (and a later migration from there would use it).
    let r = migrate(
        "ring-verify",
        "verify:end=32M",
        "64M",
        2,
        &["--dirty-track", "ring"],
        &["--dirty-track", "auto"],
        &["--downtime-limit", "2000"],
    );
    assert_eq!(r.src_info["dirty-track"], "ring", "{:#}", r.src_info);
    assert_eq!(r.src_info["dirty-log"], "Ring");
    let entries = r.src_info["dirty-ring-entries"].as_u64().unwrap();
    assert!(
        entries.is_power_of_two() && (256..=65_536).contains(&entries),
        "{entries}"
    );
    // The guest's writes reached the engine through the rings.
    let harvested: u64 = r.src_info["dirty-ring-harvested"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(harvested > 0, "{:#}", r.src_info);
    assert_eq!(r.report["dirty-track"], "ring");
    assert!(r.report["ram"]["normal"].as_u64().unwrap() > 0);
    assert_eq!(r.dst_info["dirty-track"], "ring", "{:#}", r.dst_info);
    eprintln!(
        "ring: {} entries, {} full-ring exits, {} overruns",
        entries, r.src_info["exits"]["dirty-ring-full"], r.src_info["dirty-ring-overruns"]
    );
}

#[test]
fn verify_guest_migrates_with_the_bitmap() {
    if !kvm_available("verify_guest_migrates_with_the_bitmap") {
        return;
    }
    let _g = one_at_a_time();
    let r = migrate(
        "bitmap-verify",
        "verify:end=32M",
        "64M",
        2,
        &["--dirty-track", "bitmap"],
        &[],
        &["--downtime-limit", "2000"],
    );
    assert_eq!(r.src_info["dirty-track"], "bitmap");
    assert!(r.src_info["dirty-ring-entries"].is_null());
    assert_eq!(r.src_info["exits"]["dirty-ring-full"], 0);
    assert_eq!(r.report["dirty-track"], "bitmap");
    // The default is the bitmap.
    assert_eq!(r.dst_info["dirty-track"], "bitmap");
}

#[test]
fn tiny_ring_fills_up_and_verify_still_migrates() {
    if !kvm_available("tiny_ring_fills_up_and_verify_still_migrates") {
        return;
    }
    let _g = one_at_a_time();
    // 4 KiB = 256 entries: the guest fills it within a millisecond, so the
    // vCPU exits with KVM_EXIT_DIRTY_RING_FULL over and over, and its own
    // thread empties the ring. xen caps the iterations whatever the rate.
    let r = migrate(
        "ring-tiny",
        "verify:end=4M",
        "64M",
        3,
        &["--dirty-track", "ring", "--dirty-ring-size", "4K"],
        &["--dirty-track", "ring", "--dirty-ring-size", "4K"],
        &["--policy", "xen"],
    );
    assert_eq!(r.src_info["dirty-ring-entries"], 256, "{:#}", r.src_info);
    let full = r.src_info["exits"]["dirty-ring-full"].as_u64().unwrap();
    assert!(full > 0, "the ring never filled: {:#}", r.src_info);
    assert!(r.dst_info["exits"]["dirty-ring-full"].as_u64().unwrap() > 0);
    assert_eq!(r.report["dirty-track"], "ring");
    eprintln!(
        "tiny ring: {full} full-ring exits, {} overruns, {} phantom entries resynced",
        r.src_info["dirty-ring-overruns"], r.src_info["dirty-ring-resynced"]
    );
}

#[test]
fn sweep_guest_in_ring_mode_arrives_intact() {
    if !kvm_available("sweep_guest_in_ring_mode_arrives_intact") {
        return;
    }
    let _g = one_at_a_time();
    let r = migrate(
        "ring-sweep",
        "sweep",
        "256M",
        1,
        &["--dirty-track", "ring"],
        &["--dirty-track", "ring"],
        &["--policy", "xen"],
    );
    assert_eq!(r.report["dirty-track"], "ring");
    // Live iterations found pages through the ring.
    let iters = r.report["iterations"].as_array().unwrap();
    assert!(iters.len() >= 2, "{:#}", r.report);
    assert!(
        iters[1..]
            .iter()
            .any(|i| i["dirty-pages"].as_u64().unwrap() > 0),
        "{:#}",
        r.report
    );
}

#[test]
fn idle_guest_in_ring_mode_still_skips_untouched_memory() {
    if !kvm_available("idle_guest_in_ring_mode_still_skips_untouched_memory") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("ring-idle");
    let mut src = VmProcess::source_with(
        bin(),
        &dir,
        "src",
        "idle",
        "256M",
        &["--dirty-track", "ring"],
    );
    src.wait_api();
    src.wait_marks(harness::BOOT_MARK, 1, T);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &[]);
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    assert_eq!(r["dirty-track"], "ring");
    assert_eq!(r["digest"]["equal"], true);
    // The pages ever written came from the rings (and the boot image): the
    // rest is still known to be zero and is not even read.
    let pages = (256u64 << 20) / 4096;
    let skipped = r["ram"]["skipped"].as_u64().unwrap();
    let normal = r["ram"]["normal"].as_u64().unwrap();
    assert!(skipped >= pages - 64, "only {skipped} pages skipped: {r:#}");
    assert!(normal < 64, "idle guest sent {normal} data pages");
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 1, T);
    assert!(src.wait_exit(T).success());
    drop(dst.child.kill());
}
