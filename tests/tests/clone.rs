//! Tier 3: live clone between two real `vmigrate` processes on real KVM.
//!
//! What is compared is what each process computes on its own: the primary
//! digests its memory and vCPU state while it is paused at the clone point
//! (the clone's report), the standby digests the memory and vCPUs it holds
//! when asked (`digest` on its API socket), long after the clone. The
//! primary's guests check themselves (`verify` prints `X` on a lost page or
//! register); the standby's serial output shows whether it ever ran.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{
    clone_json, digest, epochs, info, kvm_available, one_at_a_time, query_migrate, send_json, verb,
    Scratch, VmProcess,
};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A standby (`run --incoming --standby`) on loopback; it and its address.
fn standby(dir: &Scratch) -> (VmProcess, String) {
    VmProcess::destination_with(
        bin(),
        dir,
        "standby",
        "tcp:127.0.0.1:0",
        &["--insecure", "--standby"],
        &[],
    )
}

/// Clone a running `workload` guest into a standby and check both sides:
/// the standby's own digests equal the primary's at the clone point, the
/// primary runs on cleanly, the standby never runs. Returns the report.
fn clone_and_check(test: &str, workload: &str, mem: &str, extra: &[&str]) -> Value {
    let dir = Scratch::new(test);
    let mut src = VmProcess::source(bin(), &dir, "src", workload, mem);
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    let (mut held, uri) = standby(&dir);

    let started = Instant::now();
    let (ok, report, stderr) = clone_json(bin(), &src.api, &uri, extra);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr} {}", src.stderr_text()));
    assert!(ok, "clone failed: {report:#}\n{}", held.stderr_text());
    eprintln!(
        "{test}: clone of a {mem} {workload} guest: {:.0} ms total ({:.0} ms from the \
         command line), downtime {:.1} ms, {} bytes in {} iterations",
        report["total-time"].as_f64().unwrap(),
        started.elapsed().as_secs_f64() * 1000.0,
        report["downtime"].as_f64().unwrap(),
        report["ram"]["transferred"],
        report["iterations"].as_array().unwrap().len()
    );
    assert_eq!(report["status"], "completed");
    assert_eq!(report["mode"], "clone");
    assert_eq!(report["digest"]["equal"], true, "{report:#}");
    assert!(report["ram"]["transferred"].as_u64().unwrap() > 0);

    // What the standby holds, digested by the standby process itself, is
    // the primary's memory and vCPU state at the clone point.
    held.wait_api();
    let d = digest(bin(), &held.api);
    assert_eq!(d["state"], "standby", "{d:#}");
    assert_eq!(d["memory"], report["digest"]["source"], "{d:#} {report:#}");
    assert_eq!(d["vcpus"], report["vcpu-digest"], "{d:#} {report:#}");

    // The primary runs on: new pass marks, no mismatch, state running,
    // the standby's session open.
    let at_clone = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, at_clone + 2, T);
    assert_eq!(src.count(MISMATCH_MARK), 0, "the primary saw a mismatch");
    let st = info(bin(), &src.api);
    assert_eq!(st["state"], "running", "{st:#}");
    assert_eq!(st["standby"], uri.as_str(), "{st:#}");
    assert_eq!(st["migration"]["mode"], "clone");

    // One standby per primary; a running guest has no meaningful digest;
    // checkpoints are for clones only.
    let (ok, _, why) = clone_json(bin(), &src.api, &uri, &[]);
    assert!(!ok);
    assert!(why.contains("a standby is attached already"), "{why}");
    let (ok, why) = verb(bin(), &src.api, "digest", &[]);
    assert!(!ok);
    assert!(why.contains("cannot digest: the VM is running"), "{why}");
    let (ok, _, why) = send_json(bin(), &src.api, &uri, &["--epochs"]);
    assert!(!ok);
    assert!(why.contains("--epochs is for vmigrate clone"), "{why}");

    // The standby does not run: no serial output ever, the same digests a
    // second later, and it refuses to be resumed.
    std::thread::sleep(Duration::from_secs(1));
    assert!(held.serial_bytes().is_empty(), "the standby ran");
    assert_eq!(digest(bin(), &held.api), d, "the standby's copy changed");
    let st = info(bin(), &held.api);
    assert_eq!(st["state"], "standby");
    assert_eq!(st["serial-bytes"], 0);
    let (resumed, why) = verb(bin(), &held.api, "resume", &[]);
    assert!(!resumed, "a standby was resumed");
    assert!(why.contains("standby"), "{why}");

    // The primary shuts down (a planned stop: it tells the standby why):
    // the standby still holds its copy, paused.
    assert!(verb(bin(), &src.api, "shutdown", &[]).0);
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());
    let deadline = Instant::now() + T;
    while !held.stderr_text().contains("ended the clone session") {
        assert!(Instant::now() < deadline, "{}", held.stderr_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(digest(bin(), &held.api), d);
    assert!(held.serial_bytes().is_empty(), "the standby ran");
    assert!(verb(bin(), &held.api, "shutdown", &[]).0);
    assert!(held.wait_exit(T).success(), "{}", held.stderr_text());
    report
}

#[test]
fn verify_guest_clones_into_a_paused_identical_standby() {
    if !kvm_available("verify_guest_clones_into_a_paused_identical_standby") {
        return;
    }
    let _g = one_at_a_time();
    // Room for a slow shared machine: this is about correctness.
    clone_and_check(
        "clone-verify",
        "verify:end=32M",
        "64M",
        &["--downtime-limit", "2000"],
    );
}

#[test]
fn sweep_and_hotset_guests_clone_with_xen_and_zstd() {
    if !kvm_available("sweep_and_hotset_guests_clone_with_xen_and_zstd") {
        return;
    }
    let _g = one_at_a_time();
    // Both dirty pages as fast as they can: xen's iteration cap ends the
    // pre-copy whatever the link does.
    let r = clone_and_check("clone-sweep", "sweep", "64M", &["--policy", "xen"]);
    assert!(r["iterations"].as_array().unwrap().len() >= 2);
    clone_and_check(
        "clone-hotset",
        "hotset:wss=16M",
        "64M",
        &["--policy", "xen", "--compress", "zstd"],
    );
}

#[test]
fn each_side_refuses_the_other_kind_of_stream() {
    if !kvm_available("each_side_refuses_the_other_kind_of_stream") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("clone-refusals");
    let mut src = VmProcess::source(bin(), &dir, "src", "verify:end=16M", "32M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 1, T);

    // A clone to a destination that takes migrations.
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");
    let (ok, report, stderr) = clone_json(bin(), &src.api, &uri, &[]);
    assert!(!ok, "a migration destination took a clone: {report:?}");
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_eq!(report["status"], "failed");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("run --incoming --standby"), "{error}");
    assert!(!dst.wait_exit(T).success());
    assert!(
        dst.stderr_text().contains("takes migrations"),
        "{}",
        dst.stderr_text()
    );
    assert!(dst.serial_bytes().is_empty(), "the destination ran");

    // A migration to a standby.
    let (mut held, uri) = standby(&dir);
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &[]);
    assert!(!ok, "a standby took a migration: {report:?}");
    let error = report.unwrap_or_else(|| panic!("no report: {stderr}"))["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("takes only a live clone"), "{error}");
    assert!(!held.wait_exit(T).success());
    assert!(held.serial_bytes().is_empty(), "the standby ran");

    // The source ran throughout and still does.
    let passes = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, passes + 1, T);
    assert_eq!(src.count(MISMATCH_MARK), 0);
    assert_eq!(info(bin(), &src.api)["state"], "running");
}

/// A primary running a `verify` guest with incompressible-enough content,
/// cloned under a bandwidth cap so that the full copy takes seconds, and a
/// standby; returns once the clone is sending pages.
fn slow_clone(dir: &Scratch) -> (VmProcess, VmProcess, std::process::Child) {
    let mut src = VmProcess::source(bin(), dir, "src", "verify:end=48M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    let (held, uri) = standby(dir);
    let api = src.api.to_str().unwrap().to_string();
    let clone = std::process::Command::new(bin())
        .args(["clone", "--api-socket", &api, "--to", &uri, "--insecure"])
        .args(["--json", "--max-bandwidth", "8M"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(dir.path("clone.json")).unwrap())
        .stderr(std::fs::File::create(dir.path("clone.stderr")).unwrap())
        .spawn()
        .expect("spawn clone");
    let deadline = Instant::now() + T;
    loop {
        let r = query_migrate(bin(), &src.api);
        if r["status"] == "active" && r["ram"]["transferred"].as_u64().unwrap_or(0) > 2 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the clone never got going: {r:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (src, held, clone)
}

#[test]
fn a_standby_whose_primary_dies_mid_clone_never_runs() {
    if !kvm_available("a_standby_whose_primary_dies_mid_clone_never_runs") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("clone-primary-dies");
    let (mut src, mut held, mut clone) = slow_clone(&dir);
    src.child.kill().expect("SIGKILL the primary");
    let _ = src.child.wait();
    let st = held.wait_exit(T);
    assert_eq!(st.code(), Some(1), "{}", held.stderr_text());
    let text = held.stderr_text();
    assert!(
        text.contains("incoming live clone failed; no standby copy is held"),
        "{text}"
    );
    assert!(held.serial_bytes().is_empty(), "the standby ran");
    assert!(
        !held.api.exists(),
        "the standby's API socket was left behind"
    );
    let _ = clone.wait();
}

#[test]
fn the_primary_of_a_failed_clone_keeps_running() {
    if !kvm_available("the_primary_of_a_failed_clone_keeps_running") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("clone-standby-dies");
    let (mut src, mut held, mut clone) = slow_clone(&dir);
    held.child.kill().expect("SIGKILL the standby");
    let _ = held.child.wait();
    let st = clone.wait().expect("clone ends");
    assert!(!st.success(), "a clone to a killed standby succeeded");
    let text = std::fs::read_to_string(dir.path("clone.json")).unwrap();
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_eq!(report["mode"], "clone");
    assert!(report["error"].as_str().is_some());

    // The primary was never paused and runs on, checking itself.
    let st = info(bin(), &src.api);
    assert_eq!(st["state"], "running", "{st:#}");
    assert!(st.get("standby").is_none(), "{st:#}");
    let passes = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, passes + 2, T);
    assert_eq!(src.count(MISMATCH_MARK), 0, "the primary saw a mismatch");
    assert!(held.serial_bytes().is_empty(), "the standby ran");
    assert!(src.is_running());
}

/// Poll `info` on `socket` until `ok` holds.
fn wait_info(socket: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    e2e::wait_info(bin(), socket, T, what, ok)
}

#[test]
fn checkpoint_epochs_keep_the_standby_in_step_and_it_takes_over() {
    if !kvm_available("checkpoint_epochs_keep_the_standby_in_step_and_it_takes_over") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("clone-epochs");
    let mut src = VmProcess::source(bin(), &dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    let (mut held, uri) = standby(&dir);
    let (ok, report, stderr) = clone_json(
        bin(),
        &src.api,
        &uri,
        &["--downtime-limit", "2000", "--epochs", "--epoch-ms", "50"],
    );
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "{report:#} {}", held.stderr_text());
    held.wait_api();

    // Epochs run while the primary's guest runs on and checks itself.
    let passes = src.count(PASS_MARK);
    let st = wait_info(&src.api, "10 epochs", |st| epochs(st) >= 10);
    let c = &st["checkpoints"];
    assert_eq!(c["epoch-ms"], 50);
    assert!(c["ended"].is_null(), "{c:#}");
    assert!(c["pages"].as_u64().unwrap() > 0, "the guest writes: {c:#}");
    eprintln!(
        "epochs of a 64M verify guest every 50 ms: pause p50 {} ms, p99 {} ms, max {} ms; \
         last {:#}",
        c["pause"]["p50"], c["pause"]["p99"], c["pause"]["max"], c["last"]
    );
    src.wait_marks(PASS_MARK, passes + 2, T);
    assert_eq!(src.count(MISMATCH_MARK), 0, "the primary saw a mismatch");
    let sb = info(bin(), &held.api);
    assert_eq!(sb["state"], "standby");
    assert!(epochs(&sb) >= 9, "the standby applies epochs: {sb:#}");
    assert!(held.serial_bytes().is_empty(), "the standby ran");

    // Pause the primary: the next checkpoint brings the standby to exactly
    // its state, as both digest on their own.
    assert!(verb(bin(), &src.api, "pause", &[]).0);
    let after = epochs(&info(bin(), &src.api));
    wait_info(&src.api, "two epochs after the pause", |st| {
        epochs(st) >= after + 2
    });
    let ours = digest(bin(), &src.api);
    let theirs = digest(bin(), &held.api);
    assert_eq!(ours["memory"], theirs["memory"], "{ours:#} {theirs:#}");
    assert_eq!(ours["vcpus"], theirs["vcpus"], "{ours:#} {theirs:#}");

    // Resumed, the primary goes on being checkpointed, then dies: the
    // standby takes over from the last checkpoint (tests/tests/failover.rs
    // checks the output across it) and its guest passes its self-check.
    assert!(verb(bin(), &src.api, "resume", &[]).0);
    let after = epochs(&info(bin(), &src.api));
    wait_info(&src.api, "epochs after the resume", |st| {
        epochs(st) >= after + 3
    });
    src.child.kill().expect("SIGKILL the primary");
    let _ = src.child.wait();
    let deadline = Instant::now() + T;
    while !held.stderr_text().contains("FAILOVER") {
        assert!(Instant::now() < deadline, "{}", held.stderr_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(info(bin(), &held.api)["state"], "running");
    let have = held.count(PASS_MARK);
    held.wait_marks(PASS_MARK, have + 2, T);
    assert_eq!(held.count(MISMATCH_MARK), 0, "the standby saw a mismatch");
    assert!(verb(bin(), &held.api, "shutdown", &[]).0);
    assert!(held.wait_exit(T).success());
}
