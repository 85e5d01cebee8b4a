//! Tier 3: live migration between two real `vmigrate` processes on real KVM.
//!
//! Correctness is shown by the guests themselves (the `verify` guest checks
//! every page it wrote, and its pass counter lives in a register), and by the
//! memory digests each side computes on its own memory at the switch-over.

use std::path::Path;
use std::time::Duration;

use e2e::{kvm_available, one_at_a_time, send_json, vmigrate, Scratch, VmProcess};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A source running `workload` that has printed `marks.1` of `marks.0`, and
/// a destination listening on `incoming`; returns both and the address.
fn running_pair(
    dir: &Scratch,
    workload: &str,
    mem: &str,
    marks: (u8, usize),
    incoming: &str,
) -> (VmProcess, VmProcess, String) {
    running_pair_with(dir, workload, mem, marks, incoming, &["--insecure"])
}

/// [`running_pair`] with the destination's `run` arguments `dst_args`.
fn running_pair_with(
    dir: &Scratch,
    workload: &str,
    mem: &str,
    marks: (u8, usize),
    incoming: &str,
    dst_args: &[&str],
) -> (VmProcess, VmProcess, String) {
    let mut src = VmProcess::source(bin(), dir, "src", workload, mem);
    src.wait_api();
    src.wait_marks(marks.0, marks.1, T);
    let (dst, uri) = VmProcess::destination_with(bin(), dir, "dst", incoming, dst_args, &[]);
    (src, dst, uri)
}

/// Migrate a running `verify` guest and check it goes on cleanly on the
/// destination. Returns the report.
fn migrate_verify(test: &str, incoming: &str, extra: &[&str]) -> Value {
    migrate_verify_to(test, incoming, &["--insecure"], extra).0
}

/// [`migrate_verify`] to a destination run with `dst_args`; returns the
/// report and the destination's stderr.
fn migrate_verify_to(
    test: &str,
    incoming: &str,
    dst_args: &[&str],
    extra: &[&str],
) -> (Value, String) {
    let dir = Scratch::new(test);
    let incoming = incoming.replace("DIR", dir.0.to_str().unwrap());
    let (mut src, mut dst, uri) = running_pair_with(
        &dir,
        "verify:end=32M",
        "64M",
        (PASS_MARK, 2),
        &incoming,
        dst_args,
    );

    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, extra);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr} {}", src.stderr_text()));
    assert!(
        ok,
        "send failed: {report:#}\n{stderr}\n{}",
        dst.stderr_text()
    );
    assert_eq!(report["status"], "completed");

    // Each side digested its own memory at the switch-over.
    let digest = &report["digest"];
    assert_eq!(digest["source"], digest["destination"], "{report:#}");
    assert_eq!(digest["equal"], true);

    // The source is done for good; the destination runs the guest on.
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());
    let src_passes = src.count(PASS_MARK);
    assert_eq!(src.count(MISMATCH_MARK), 0, "source saw a mismatch");
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(
        dst.count(MISMATCH_MARK),
        0,
        "destination found a lost page or register after {src_passes} source passes: {:?}",
        String::from_utf8_lossy(&dst.serial_bytes())
    );
    assert!(
        dst.is_running(),
        "destination stopped: {}",
        dst.stderr_text()
    );
    let st = vmigrate(
        bin(),
        &[
            "status",
            "--api-socket",
            dst.api.to_str().unwrap(),
            "--json",
        ],
    );
    let status: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["memory"], 64 << 20);
    let out = vmigrate(
        bin(),
        &["shutdown", "--api-socket", dst.api.to_str().unwrap()],
    );
    assert!(out.status.success());
    assert!(dst.wait_exit(T).success());
    (report, dst.stderr_text())
}

#[test]
fn verify_guest_over_tcp() {
    if !kvm_available("verify_guest_over_tcp") {
        return;
    }
    let _g = one_at_a_time();
    // The default policy (qemu) with room for a slow shared machine: this
    // test is about correctness, not convergence.
    let r = migrate_verify("tcp", "tcp:127.0.0.1:0", &["--downtime-limit", "2000"]);
    assert_eq!(r["compression"], "none");
    assert_eq!(r["page-path"], "guest-memory");
    assert!(r["ram"]["normal"].as_u64().unwrap() > 0);
}

/// Pages go out straight from guest memory by default, and a copy when
/// asked; a destination that allocated its RAM ahead takes them too. The
/// verify guest checks every page either way.
#[test]
fn verify_guest_from_guest_memory_into_a_prefaulted_destination_and_by_copy() {
    if !kvm_available("verify_guest_from_guest_memory_into_a_prefaulted_destination_and_by_copy") {
        return;
    }
    let _g = one_at_a_time();
    let (r, dst_err) = migrate_verify_to(
        "prefault",
        "tcp:127.0.0.1:0",
        &["--insecure", "--mem", "64M", "--prefault"],
        &["--downtime-limit", "2000"],
    );
    assert_eq!(r["page-path"], "guest-memory", "{r:#}");
    assert!(
        dst_err.contains("64 MiB of guest RAM allocated ahead"),
        "{dst_err}"
    );
    assert!(
        dst_err.contains("pages received straight into guest memory"),
        "{dst_err}"
    );
    let r = migrate_verify(
        "copy_pages",
        "tcp:127.0.0.1:0",
        &["--downtime-limit", "2000", "--copy-pages"],
    );
    assert_eq!(r["page-path"], "copy", "{r:#}");
}

#[test]
fn verify_guest_over_unix_with_zstd() {
    if !kvm_available("verify_guest_over_unix_with_zstd") {
        return;
    }
    let _g = one_at_a_time();
    // xen ends after at most 5 iterations whatever zstd's speed on a busy
    // machine; the qemu rule is covered over TCP.
    let r = migrate_verify(
        "unix",
        "unix:DIR/mig.sock",
        &["--compress", "zstd", "--policy", "xen"],
    );
    assert_eq!(r["compression"], "zstd:1");
    // The verify guest's pages are mostly zeros plus a few words: zstd must
    // shrink them well below their raw size.
    let raw = r["ram"]["normal-bytes"].as_u64().unwrap();
    let sent = r["ram"]["transferred"].as_u64().unwrap();
    assert!(sent < raw / 4, "zstd sent {sent} bytes for {raw} raw");
}

#[test]
fn idle_guest_sends_zero_pages_as_ranges() {
    if !kvm_available("idle_guest_sends_zero_pages_as_ranges") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("idle");
    let (mut src, mut dst, uri) = running_pair(
        &dir,
        "idle",
        "256M",
        (harness::BOOT_MARK, 1),
        "tcp:127.0.0.1:0",
    );
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &[]);
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    assert_eq!(r["digest"]["equal"], true);
    let pages = (256u64 << 20) / 4096;
    let normal = r["ram"]["normal"].as_u64().unwrap();
    let zero = r["ram"]["duplicate"].as_u64().unwrap();
    assert!(normal < 64, "idle guest sent {normal} data pages");
    assert!(zero >= pages - 64, "only {zero} zero pages");
    // An idle guest converges at once: full copy, then the final pass.
    assert_eq!(r["iterations"].as_array().unwrap().len(), 2, "{r:#}");
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 1, T);
    assert!(src.wait_exit(T).success());
    drop(dst.child.kill());
}

#[test]
fn random_filled_idle_guest_sends_its_whole_ram_even_with_zstd() {
    if !kvm_available("random_filled_idle_guest_sends_its_whole_ram_even_with_zstd") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("idle-random");
    let (mut src, mut dst, uri) = running_pair(
        &dir,
        "idle:fill=random,fill-seed=0x1234",
        "128M",
        (harness::BOOT_MARK, 1),
        "tcp:127.0.0.1:0",
    );
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &["--compress", "zstd"]);
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    assert_eq!(r["digest"]["equal"], true, "{r:#}");
    assert_eq!(r["compression"], "zstd:1");
    // Everything above 1 MiB was filled with incompressible bytes: zstd
    // cannot shrink it, and none of it is a zero page.
    let filled = (128u64 - 1) << 20;
    let wire = r["ram"]["transferred"].as_u64().unwrap();
    assert!(
        wire as f64 >= 0.95 * filled as f64,
        "{wire} bytes on the wire for {filled} filled bytes: {r:#}"
    );
    let normal = r["ram"]["normal"].as_u64().unwrap();
    assert!(normal >= filled / 4096, "{normal} data pages");
    // The guest goes on idling on the destination.
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 1, T);
    assert!(src.wait_exit(T).success());
    drop(dst.child.kill());
}

#[test]
fn sweep_guest_with_xen_policy_stops_at_the_iteration_cap() {
    if !kvm_available("sweep_guest_with_xen_policy_stops_at_the_iteration_cap") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("sweep-xen");
    let (mut src, mut dst, uri) =
        running_pair(&dir, "sweep", "256M", (PASS_MARK, 1), "tcp:127.0.0.1:0");
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &["--policy", "xen"]);
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    assert_eq!(r["policy"], "xen");
    assert_eq!(r["digest"]["equal"], true);
    let iters = r["iterations"].as_array().unwrap();
    let live = iters.iter().filter(|i| i["final-pass"] == false).count();
    let reason = r["stop-reason"].as_str().unwrap();
    assert!(
        live == 5 && reason.contains("iteration limit") || reason.contains("dirty pages"),
        "{live} live iterations, stop reason {reason}"
    );
    // The guest keeps sweeping on the destination.
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 2, T);
    assert!(src.wait_exit(T).success());
    drop(dst.child.kill());
}

/// A guest storing the byte every page already holds dirties every page and
/// changes none. With `--skip-unchanged` the passes after the full copy
/// leave those pages out, both ends' memory digests agree, and the guest
/// sweeps on at the destination.
#[test]
fn same_value_sweep_is_left_out_with_skip_unchanged() {
    if !kvm_available("same_value_sweep_is_left_out_with_skip_unchanged") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("sweep-same");
    // Two passes: every page holds the guest's byte before the migration.
    let (mut src, mut dst, uri) = running_pair(
        &dir,
        "sweep:mode=same",
        "64M",
        (PASS_MARK, 2),
        "tcp:127.0.0.1:0",
    );
    let (ok, report, stderr) = send_json(
        bin(),
        &src.api,
        &uri,
        &["--skip-unchanged", "--policy", "xen"],
    );
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    assert_eq!(r["digest"]["equal"], true, "{r:#}");
    assert_eq!(r["page-path"], "copy", "{r:#}");
    let iters = r["iterations"].as_array().unwrap();
    let later = |key: &str| -> u64 { iters[1..].iter().map(|i| i[key].as_u64().unwrap()).sum() };
    let (unchanged, sent) = (later("unchanged-pages"), later("pages-sent"));
    assert!(unchanged > 0, "{r:#}");
    assert_eq!(r["ram"]["unchanged"].as_u64().unwrap(), unchanged);
    // What the guest changes besides its sweep (its own code page, the
    // page tables) is a handful of pages; the sweep itself changes none.
    assert!(
        sent * 20 <= unchanged,
        "{sent} pages sent against {unchanged} left out: {r:#}"
    );
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 2, T);
    assert!(src.wait_exit(T).success());
    drop(dst.child.kill());
}

#[test]
fn vanished_destination_leaves_the_source_running() {
    if !kvm_available("vanished_destination_leaves_the_source_running") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("vanish");
    let (mut src, mut dst, uri) = running_pair(
        &dir,
        "verify:end=32M",
        "256M",
        (PASS_MARK, 1),
        "tcp:127.0.0.1:0",
    );
    // A capped link makes the pre-copy last seconds; kill the destination in
    // the middle of it.
    let api = src.api.clone();
    let uri2 = uri.clone();
    let sender = std::thread::spawn(move || {
        send_json(Path::new(BIN), &api, &uri2, &["--max-bandwidth", "32M"])
    });
    std::thread::sleep(Duration::from_millis(1500));
    dst.child.kill().unwrap();
    let (ok, report, stderr) = sender.join().unwrap();
    assert!(!ok, "send must fail when the destination dies");
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(r["status"], "failed");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("during iteration")
            && (err.contains("reset") || err.contains("Broken pipe") || err.contains("closed")),
        "unclear error: {err}"
    );
    // The source guest runs on, and a second migration succeeds.
    assert!(src.is_running());
    let before = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, before + 1, T);
    let (mut dst2, uri) = VmProcess::destination(bin(), &dir, "dst2", "tcp:127.0.0.1:0");
    let (ok, report, _) = send_json(bin(), &src.api, &uri, &[]);
    assert!(ok, "{report:#?}");
    let before = dst2.count(PASS_MARK);
    dst2.wait_marks(PASS_MARK, before + 1, T);
    assert_eq!(dst2.count(MISMATCH_MARK), 0);
    assert!(src.wait_exit(T).success());
    drop(dst2.child.kill());
}

#[test]
fn incoming_side_exits_cleanly_on_garbage() {
    if !kvm_available("incoming_side_exits_cleanly_on_garbage") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("garbage");
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let addr = uri.strip_prefix("tcp:").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::Write;
    s.write_all(b"GET / HTTP/1.0\r\n\r\nthis is not a migration stream")
        .unwrap();
    let st = dst.wait_exit(T);
    assert_eq!(st.code(), Some(1));
    let err = dst.stderr_text();
    assert!(
        err.contains("incoming migration failed") && err.contains("checksum"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        dst.serial_bytes().is_empty(),
        "the guest must never have run"
    );
}

/// A 16 GiB guest that has written only [1 MiB, 64 MiB): the untouched
/// pages go out as zero ranges without being read, the destination stays
/// small, and the guest's own check stays clean.
#[test]
fn big_mostly_untouched_guest_costs_what_it_used() {
    if !kvm_available("big_mostly_untouched_guest_costs_what_it_used") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("untouched");
    let (mut src, mut dst, uri) = running_pair(
        &dir,
        "verify:start=1M,end=64M",
        "16G",
        (PASS_MARK, 1),
        "tcp:127.0.0.1:0",
    );
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &[]);
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    assert_eq!(r["digest"]["equal"], true);
    let total_pages = (16u64 << 30) / 4096;
    let skipped = r["ram"]["skipped"].as_u64().unwrap();
    // The full copy: the 63 MiB the guest wrote, plus its page tables and
    // boot sector. (Later iterations re-send what it rewrites meanwhile.)
    let used = (63u64 << 20) / 4096;
    let first = r["iterations"][0]["pages-sent"].as_u64().unwrap();
    assert!(
        (used..used + 64).contains(&first),
        "{first} data pages for {used} used"
    );
    let normal = r["ram"]["normal"].as_u64().unwrap();
    assert!(normal < 8 * used, "{normal} data pages in all");
    assert!(skipped >= total_pages - used - 64, "only {skipped} skipped");
    dst.wait_marks(PASS_MARK, 1, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0);
    assert!(src.wait_exit(T).success());
    // The destination's resident memory before resuming: about what the
    // guest used, not 16 GiB.
    let err = dst.stderr_text();
    let rss_mib: u64 = err
        .split("resident memory ")
        .nth(1)
        .and_then(|s| s.split(" MiB").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resident memory in {err}"));
    assert!(rss_mib < 400, "destination resident {rss_mib} MiB");
    drop(dst.child.kill());
}

/// auto-converge really throttles the vCPUs: a sweep guest that outruns a
/// capped link converges once throttled, and runs on at full speed on the
/// destination.
#[test]
fn auto_converge_throttles_a_sweep_guest_until_it_converges() {
    if !kvm_available("auto_converge_throttles_a_sweep_guest_until_it_converges") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("autoconv");
    let (mut src, mut dst, uri) =
        running_pair(&dir, "sweep", "128M", (PASS_MARK, 2), "tcp:127.0.0.1:0");
    let args = [
        "--policy",
        "auto-converge",
        "--max-bandwidth",
        "64M",
        "--param",
        "initial=99%",
        "--param",
        "period=0",
        "--timeout",
        "60",
    ];
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &args);
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    assert_eq!(r["policy"], "auto-converge");
    assert_eq!(r["cpu-throttle-percentage"], 99.0, "{r:#}");
    assert_eq!(r["digest"]["equal"], true);
    // Throttled, the guest dirties far less than the link carries.
    let iters = r["iterations"].as_array().unwrap();
    let throttled: Vec<_> = iters
        .iter()
        .filter(|i| i["throttle"].as_f64().unwrap() > 0.9 && i["final-pass"] == false)
        .collect();
    assert!(!throttled.is_empty(), "{r:#}");
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 2, T);
    assert!(src.wait_exit(T).success());
    drop(dst.child.kill());
}

/// mp recognises a sweep guest that outruns the link and switches to
/// stop-and-copy early instead of iterating until the timeout.
#[test]
fn mp_stops_early_on_a_guest_that_never_converges() {
    if !kvm_available("mp_stops_early_on_a_guest_that_never_converges") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("mp");
    let (mut src, mut dst, uri) =
        running_pair(&dir, "sweep", "128M", (PASS_MARK, 2), "tcp:127.0.0.1:0");
    let args = [
        "--policy",
        "mp",
        "--max-bandwidth",
        "64M",
        "--timeout",
        "60",
    ];
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &args);
    let r = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(ok, "{r:#}");
    let reason = r["stop-reason"].as_str().unwrap();
    assert!(reason.contains("memory-intensive"), "{reason}");
    assert_eq!(r["cpu-throttle-percentage"], 0.0, "mp never throttles");
    assert!(r["iterations"].as_array().unwrap().len() <= 8, "{r:#}");
    assert_eq!(r["digest"]["equal"], true);
    let before = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, before + 2, T);
    assert!(src.wait_exit(T).success());
    drop(dst.child.kill());
}

#[test]
fn verify_guest_over_three_channels() {
    if !kvm_available("verify_guest_over_three_channels") {
        return;
    }
    let _g = one_at_a_time();
    // Every pass split across three TCP connections by 2 MiB block, applied
    // in parallel on the destination; the self-checking guest and the
    // digests show no page was lost or overwritten by an older copy.
    let r = migrate_verify(
        "channels-tcp",
        "tcp:127.0.0.1:0",
        &["--channels", "3", "--policy", "xen"],
    );
    assert!(r["iterations"].as_array().unwrap().len() >= 2, "{r:#}");
}

#[test]
fn verify_guest_over_two_unix_channels_with_zstd() {
    if !kvm_available("verify_guest_over_two_unix_channels_with_zstd") {
        return;
    }
    let _g = one_at_a_time();
    let r = migrate_verify(
        "channels-unix",
        "unix:DIR/mig.sock",
        &["--channels", "2", "--compress", "zstd", "--policy", "xen"],
    );
    assert_eq!(r["compression"], "zstd:1");
}
