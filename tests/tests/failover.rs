//! Tier 3: fault tolerance between two real `vmigrate` processes on real
//! KVM: a primary checkpointed every 50 ms with its output committed, a
//! standby that takes over when the primary dies.
//!
//! The guest is `verify:seq=1`, which checks its own memory and registers
//! (`X` on a mismatch) and numbers its pass marks (`.0001.0002…`). The
//! world's view of the guest's output is the primary's serial file (only
//! released output reaches it) followed by the standby's: that
//! concatenation must number every pass exactly once.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{clone_json, epochs, info, kvm_available, one_at_a_time, verb, Scratch, VmProcess};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(60);
/// A small, fast verify range: many marks per second, small epochs.
const GUEST: &str = "verify:end=4M,seq=1";
const MEM: &str = "16M";

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A standby with the given extra `run` arguments (plaintext unless they
/// name `--psk-file`); it and its address.
fn standby(dir: &Scratch, name: &str, extra: &[&str]) -> (VmProcess, String) {
    let channel: &[&str] = if extra.contains(&"--psk-file") {
        &[]
    } else {
        &["--insecure"]
    };
    let args = [channel, &["--standby"], extra].concat();
    VmProcess::destination_with(bin(), dir, name, "tcp:127.0.0.1:0", &args, &[])
}

/// The `--psk-file KEY` pair of `args`, if any (the clone uses the same).
fn psk_of<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.iter()
        .position(|a| *a == "--psk-file")
        .map_or_else(Vec::new, |i| args[i..i + 2].to_vec())
}

/// A primary running `GUEST`, cloned into a fresh standby with epochs
/// every 50 ms, and the first epochs seen.
fn protected_pair(dir: &Scratch, tag: &str, standby_args: &[&str]) -> (VmProcess, VmProcess) {
    let mut src = VmProcess::source(bin(), dir, &format!("{tag}-src"), GUEST, MEM);
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    let (mut held, uri) = standby(dir, &format!("{tag}-standby"), standby_args);
    let mut clone_args = vec!["--downtime-limit", "2000", "--epochs", "--epoch-ms", "50"];
    clone_args.extend(psk_of(standby_args));
    let (ok, report, stderr) = clone_json(bin(), &src.api, &uri, &clone_args);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "{report:#} {}", held.stderr_text());
    held.wait_api();
    wait_info(&src.api, "two epochs", |st| epochs(st) >= 2);
    (src, held)
}

/// Poll `info` on `socket` until `ok` holds.
fn wait_info(socket: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    e2e::wait_info(bin(), socket, T, what, ok)
}

/// The pass numbers in a `verify:seq=1` stream, checked to count up by one
/// with nothing torn, repeated or missing (the last, possibly partial,
/// mark is left out). Panics with `what` and the place otherwise.
fn pass_numbers(stream: &[u8], what: &str) -> Vec<u32> {
    let text = String::from_utf8_lossy(stream);
    assert!(
        !text.contains(char::from(MISMATCH_MARK)),
        "{what}: X in {text}"
    );
    let body = text.strip_prefix('B').unwrap_or(&text);
    let mut marks: Vec<&str> = body.split('.').collect();
    assert_eq!(marks.first(), Some(&""), "{what}: starts with {body:.20}");
    marks.remove(0);
    marks.pop();
    let mut nums = Vec::new();
    for (i, m) in marks.iter().enumerate() {
        let n = (m.len() == 4)
            .then(|| u32::from_str_radix(m, 16).ok())
            .flatten()
            .unwrap_or_else(|| panic!("{what}: mark {i} is {m:?}"));
        if let Some(&prev) = nums.last() {
            assert_eq!(
                n,
                (prev + 1) % 0x1_0000,
                "{what}: pass {n:#x} follows {prev:#x} (a gap or a repeat) at mark {i}"
            );
        }
        nums.push(n);
    }
    nums
}

/// A small deterministic generator (the test prints its seed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn wait_stderr(p: &VmProcess, text: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let e = p.stderr_text();
        if e.contains(text) {
            return e;
        }
        assert!(Instant::now() < deadline, "waited for {text:?}: {e}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sigkilled_primaries_fail_over_without_losing_or_repeating_output() {
    if !kvm_available("sigkilled_primaries_fail_over_without_losing_or_repeating_output") {
        return;
    }
    let _g = one_at_a_time();
    let seed = std::env::var("FAILOVER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    eprintln!("failover kills: seed {seed} (FAILOVER_SEED={seed} repeats the kill times)");
    let mut rng = Lcg(seed);
    let budget = Instant::now();
    let mut times = Vec::new();
    let mut detect = Vec::new();
    let iterations = 20;
    for i in 0..iterations {
        if i >= 4 && budget.elapsed() > Duration::from_secs(100) {
            eprintln!("failover kills: time budget spent after {i} kills");
            break;
        }
        let dir = Scratch::new(&format!("failover-kill-{i}"));
        // The default failover timeout: a SIGKILL shows as a closed socket
        // at once, and a short timeout would only risk a false takeover of
        // a primary starved of CPU on a loaded host.
        let (mut src, mut held) = protected_pair(&dir, "ft", &[]);
        // A kill at any moment of an epoch: paused, sending, awaiting the
        // ack, releasing, between epochs.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        src.child.kill().expect("SIGKILL the primary");
        let killed = Instant::now();
        let _ = src.child.wait();
        let e = wait_stderr(&held, "FAILOVER");
        let detect_ms = killed.elapsed().as_secs_f64() * 1000.0;
        detect.push(detect_ms);
        // The bytes written before the guest runs are the primary's held
        // ones: new guest output comes after them.
        let replayed: usize = e
            .split("epoch ")
            .last()
            .and_then(|t| t.split(" (").nth(1))
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no replayed count in {e}"));
        let deadline = killed + T;
        while held.serial_bytes().len() <= replayed {
            assert!(
                Instant::now() < deadline,
                "no new output: {}",
                held.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let failover_ms = killed.elapsed().as_secs_f64() * 1000.0;
        times.push(failover_ms);
        // The standby runs on: more marks, state running, no mismatch.
        let have = held.count(PASS_MARK);
        held.wait_marks(PASS_MARK, have + 5, T);
        let st = info(bin(), &held.api);
        assert_eq!(st["state"], "running", "{st:#}");
        let released = src.serial_bytes();
        let standby_out = held.serial_bytes();
        let mut world = released.clone();
        world.extend_from_slice(&standby_out);
        let nums = pass_numbers(&world, &format!("kill {i}"));
        let primary_marks = released.iter().filter(|&&b| b == PASS_MARK).count();
        eprintln!(
            "failover kill {i}: {detect_ms:.1} ms from SIGKILL to the takeover line, \
             {failover_ms:.1} ms to new guest output; \
             {primary_marks} marks released by the primary, {replayed} held bytes written by \
             the standby, passes {:#x}..{:#x} whole",
            nums.first().copied().unwrap_or(0),
            nums.last().copied().unwrap_or(0),
        );
        assert!(verb(bin(), &held.api, "shutdown", &[]).0);
        held.wait_exit(T);
    }
    for (what, t) in [
        ("SIGKILL to the takeover line", &mut detect),
        ("SIGKILL to new guest output", &mut times),
    ] {
        t.sort_by(f64::total_cmp);
        eprintln!(
            "failover time ({what}) over {} kills: min {:.1} ms, median {:.1} ms, max {:.1} ms",
            t.len(),
            t[0],
            t[t.len() / 2],
            t[t.len() - 1]
        );
    }
}

#[test]
fn a_silent_primary_is_taken_over_after_the_failover_timeout() {
    if !kvm_available("a_silent_primary_is_taken_over_after_the_failover_timeout") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("failover-silent");
    // Over the pre-shared-key channel: its record layer must see the
    // silence as such too.
    let key = dir.path("k.key");
    std::fs::write(&key, [0x5a_u8; 32]).expect("key file");
    let key = key.to_str().expect("utf-8 path");
    let (mut src, held) =
        protected_pair(&dir, "d", &["--failover-timeout", "500", "--psk-file", key]);
    // SIGSTOP: the connection stays open but nothing comes (a hung host).
    let pid = src.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP")
        .success());
    let stopped = Instant::now();
    let e = wait_stderr(&held, "FAILOVER");
    let waited = stopped.elapsed();
    assert!(e.contains("nothing from the primary for 500 ms"), "{e}");
    assert!(
        waited >= Duration::from_millis(450),
        "took over after {waited:?}"
    );
    eprintln!(
        "silent primary: taken over {:.0} ms after SIGSTOP (timeout 500 ms)",
        waited.as_secs_f64() * 1000.0
    );
    let have = held.count(PASS_MARK);
    held.wait_marks(PASS_MARK, have + 5, T);
    assert_eq!(info(bin(), &held.api)["state"], "running");
    // The stopped primary released nothing more; kill it for good.
    src.child.kill().expect("SIGKILL the stopped primary");
    let _ = src.child.wait();
    let mut world = src.serial_bytes();
    world.extend_from_slice(&held.serial_bytes());
    pass_numbers(&world, "stopped primary + standby");
}

#[test]
fn planned_stops_of_the_primary_do_not_fail_over() {
    if !kvm_available("planned_stops_of_the_primary_do_not_fail_over") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("failover-planned");

    // shutdown: the standby is told, stays paused; the primary's held
    // output went out whole before it left.
    let (mut src, mut held) = protected_pair(&dir, "a", &[]);
    let st = info(bin(), &src.api);
    assert_eq!(st["checkpoints"]["output-commit"], true, "{st:#}");
    assert!(verb(bin(), &src.api, "shutdown", &[]).0);
    assert!(src.wait_exit(T).success());
    wait_stderr(&held, "ended the clone session");
    std::thread::sleep(Duration::from_millis(800));
    let sb = info(bin(), &held.api);
    assert_eq!(sb["state"], "standby", "{sb:#}");
    assert!(held.serial_bytes().is_empty(), "the standby ran");
    assert!(!held.stderr_text().contains("FAILOVER"));
    pass_numbers(&src.serial_bytes(), "primary after shutdown");
    assert!(verb(bin(), &held.api, "shutdown", &[]).0);
    assert!(held.wait_exit(T).success());

    // send: the primary migrates away; the standby is told and stays
    // paused; source + destination output is whole.
    let (src, held) = protected_pair(&dir, "b", &[]);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "b-dst", "tcp:127.0.0.1:0");
    let (ok, _, stderr) = e2e::send_json(bin(), &src.api, &uri, &["--downtime-limit", "2000"]);
    assert!(ok, "send: {stderr}");
    dst.wait_api();
    wait_stderr(&held, "ended the clone session");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(info(bin(), &held.api)["state"], "standby");
    assert!(held.serial_bytes().is_empty(), "the standby ran");
    let have = dst.count(PASS_MARK);
    dst.wait_marks(PASS_MARK, have + 3, T);
    let mut world = src.serial_bytes();
    world.extend_from_slice(&dst.serial_bytes());
    pass_numbers(&world, "source + destination");
    drop(held);
}

#[test]
fn a_failed_standby_leaves_the_primary_running_unprotected() {
    if !kvm_available("a_failed_standby_leaves_the_primary_running_unprotected") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("failover-standby-dies");
    let (src, mut held) = protected_pair(&dir, "c", &[]);
    held.child.kill().expect("SIGKILL the standby");
    let _ = held.child.wait();
    let st = wait_info(&src.api, "the epochs to end", |st| {
        !st["checkpoints"]["ended"].is_null()
    });
    let c = &st["checkpoints"];
    assert_eq!(c["output-commit"], false, "{c:#}");
    assert!(
        c["ended"].as_str().unwrap().contains("unprotected"),
        "{c:#}"
    );
    assert!(st["standby"].is_null(), "{st:#}");
    // Output goes out directly again, whole.
    let have = src.count(PASS_MARK);
    src.wait_marks(PASS_MARK, have + 5, T);
    pass_numbers(&src.serial_bytes(), "unprotected primary");
    assert_eq!(info(bin(), &src.api)["state"], "running");
}
