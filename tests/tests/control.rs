//! Tier 3: the control socket's verbs on real KVM guests in real `vmigrate`
//! processes: pause/resume, memsave, migrating a paused guest,
//! set-parameters and the downtime ramp (cancel: `cancel.rs`).
//!
//! Guests are `verify` guests: they print a `.` per clean pass, so progress
//! (or its absence) is visible in the serial file, and an `X` on a lost or
//! wrong page. No test asserts a duration; every wait has a generous cap.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use e2e::{kvm_available, one_at_a_time, vmigrate, Scratch, VmProcess};
use harness::{MISMATCH_MARK, PASS_MARK};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(120);

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// One raw request line on the socket, the first answer line parsed.
fn api(socket: &Path, line: &str) -> Value {
    let mut c = UnixStream::connect(socket).expect("connect API socket");
    c.write_all(line.as_bytes()).unwrap();
    c.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
}

/// `vmigrate VERB --api-socket SOCKET ARGS...`: success and stderr.
fn verb(socket: &Path, verb: &str, args: &[&str]) -> (bool, String) {
    e2e::verb(bin(), socket, verb, args)
}

fn info(socket: &Path) -> Value {
    e2e::info(bin(), socket)
}

fn query_migrate(socket: &Path) -> Value {
    e2e::query_migrate(bin(), socket)
}

/// A `verify` source on 64 MiB that has passed twice.
fn source(dir: &Scratch) -> VmProcess {
    let mut src = VmProcess::source(bin(), dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    src
}

/// `vmigrate send --json` running in the background; stdout to a file.
fn spawn_send(dir: &Scratch, api: &Path, to: &str, extra: &[&str]) -> Child {
    e2e::spawn_send(bin(), dir, api, to, extra)
}

/// Wait for a background `send` and parse its report.
fn finish_send(dir: &Scratch, send: Child) -> (bool, Value) {
    e2e::finish_send(dir, send, T)
}

/// Poll `query-migrate` until `ok` holds for the report.
fn wait_report(socket: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    e2e::wait_report(bin(), socket, what, T, ok)
}

fn live_iterations(r: &Value) -> usize {
    r["iterations"].as_array().map_or(0, Vec::len)
}

#[test]
fn pause_stops_the_guest_and_resume_restarts_it() {
    if !kvm_available("pause_stops_the_guest_and_resume_restarts_it") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("pause");
    let src = source(&dir);

    let (ok, err) = verb(&src.api, "pause", &[]);
    assert!(ok, "{err}");
    assert_eq!(info(&src.api)["state"], "paused");
    let marks = src.count(PASS_MARK);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(src.count(PASS_MARK), marks, "a paused guest made progress");

    let (ok, err) = verb(&src.api, "pause", &[]);
    assert!(!ok && err.contains("already paused"), "{err}");
    // QMP's name works on the socket too, with the same refusal.
    let r = api(&src.api, r#"{"command":"stop"}"#);
    assert_eq!(r["response"], "error");

    // memsave refuses what it cannot do, naming the problem.
    let (ok, err) = verb(
        &src.api,
        "memsave",
        &["--addr", "0", "--size", "0", "--out", "/tmp/x"],
    );
    assert!(!ok && err.contains("size is 0"), "{err}");
    let (ok, err) = verb(
        &src.api,
        "memsave",
        &["--addr", "0x3fff000", "--size", "8K", "--out", "/tmp/x"],
    );
    assert!(!ok && err.contains("past the end of guest memory"), "{err}");
    let r = api(
        &src.api,
        r#"{"command":"memsave","addr":0,"size":4096,"file":"rel.bin"}"#,
    );
    assert!(
        r["message"].as_str().unwrap().contains("not absolute"),
        "{r}"
    );
    let r = api(&src.api, r#"{"command":"pasue"}"#);
    assert!(r["message"].as_str().unwrap().contains("\"pasue\""), "{r}");
    let r = api(
        &src.api,
        r#"{"command":"send","to":"tcp:127.0.0.1:1","policy":"ramp","downtime-ramp":{"start-ms":1,"end-ms":2,"steps":1}}"#,
    );
    assert!(
        r["message"].as_str().unwrap().contains("ramp policy"),
        "{r}"
    );

    let (ok, err) = verb(&src.api, "resume", &[]);
    assert!(ok, "{err}");
    assert_eq!(info(&src.api)["state"], "running");
    src.wait_marks(PASS_MARK, marks + 2, T);
    let (ok, err) = verb(&src.api, "resume", &[]);
    assert!(!ok && err.contains("not paused"), "{err}");
    assert_eq!(src.count(MISMATCH_MARK), 0);

    // Nothing to steer without a migration.
    assert_eq!(query_migrate(&src.api)["status"], "none");
    let (ok, err) = verb(&src.api, "cancel", &[]);
    assert!(!ok && err.contains("no migration is running"), "{err}");
    let (ok, err) = verb(&src.api, "set-parameters", &["--downtime-limit", "500"]);
    assert!(!ok && err.contains("no migration is running"), "{err}");
}

#[test]
fn a_paused_guest_arrives_paused_with_the_same_memory() {
    if !kvm_available("a_paused_guest_arrives_paused_with_the_same_memory") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("paused-send");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");

    assert!(verb(&src.api, "pause", &[]).0);
    // A relative --out is resolved in the client's directory, not the VM's.
    let out = Command::new(bin())
        .current_dir(&dir.0)
        .args([
            "memsave",
            "--api-socket",
            s(&src.api),
            "--addr",
            "0",
            "--size",
            "64M",
        ])
        .args(["--out", "src.mem"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (ok, report, stderr) = e2e::send_json(bin(), &src.api, &uri, &[]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "{report:#} {stderr} {}", dst.stderr_text());
    assert_eq!(report["status"], "completed");
    assert_eq!(report["digest"]["equal"], true);
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());

    // Arrived paused: no pass marks until resumed.
    dst.wait_api();
    assert_eq!(info(&dst.api)["state"], "paused");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        dst.count(PASS_MARK),
        0,
        "the destination ran a paused guest"
    );
    assert!(
        verb(
            &dst.api,
            "memsave",
            &[
                "--addr",
                "0",
                "--size",
                "64M",
                "--out",
                s(&dir.path("dst.mem"))
            ]
        )
        .0
    );
    let a = std::fs::read(dir.path("src.mem")).unwrap();
    let b = std::fs::read(dir.path("dst.mem")).unwrap();
    assert_eq!(a.len(), 64 << 20);
    assert!(
        a == b,
        "memory differs between the paused source and destination"
    );

    assert!(verb(&dst.api, "resume", &[]).0);
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0);
    assert!(verb(&dst.api, "shutdown", &[]).0);
    assert!(dst.wait_exit(T).success());
}

#[test]
fn raising_the_downtime_limit_makes_a_stuck_migration_converge() {
    if !kvm_available("raising_the_downtime_limit_makes_a_stuck_migration_converge") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("setparams");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");

    // At 16 MB/s and 300 ms, qemu waits for < 4.8 MB dirty: the guest
    // rewrites 32 MiB faster than that.
    let send = spawn_send(
        &dir,
        &src.api,
        &uri,
        &["--policy", "qemu", "--max-bandwidth", "16M", "--verify"],
    );
    let r = wait_report(&src.api, "two iterations", |r| live_iterations(r) >= 2);
    assert_eq!(
        r["status"], "active",
        "converged under 300 ms after all: {r:#}"
    );
    assert_eq!(r["downtime-limit"], 300.0);
    let (ok, err) = verb(&src.api, "set-parameters", &["--downtime-limit", "30000"]);
    assert!(ok, "{err}");

    let (ok, report) = finish_send(&dir, send);
    assert!(ok, "{report:#} {}", dst.stderr_text());
    assert_eq!(report["status"], "completed");
    assert_eq!(report["downtime-limit"], 30000.0);
    assert_eq!(report["digest"]["equal"], true);
    assert!(src.wait_exit(T).success());
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0);
    assert!(verb(&dst.api, "shutdown", &[]).0);
    assert!(dst.wait_exit(T).success());
}

#[test]
fn a_downtime_ramp_raises_the_limit_until_it_converges() {
    if !kvm_available("a_downtime_ramp_raises_the_limit_until_it_converges") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("ramp");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");

    // Iteration 0 decides at 100 ms (no), iteration 1 at 30 s (yes).
    let send = spawn_send(
        &dir,
        &src.api,
        &uri,
        &[
            "--policy",
            "qemu",
            "--max-bandwidth",
            "16M",
            "--downtime-ramp",
            "100:59900:2",
            "--verify",
        ],
    );
    let (ok, report) = finish_send(&dir, send);
    assert!(ok, "{report:#} {}", dst.stderr_text());
    assert_eq!(report["status"], "completed");
    let live = report["iterations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["final-pass"] == false)
        .count();
    assert!(live >= 2, "the 100 ms step should not converge: {report:#}");
    assert!(
        report["downtime-limit"].as_f64().unwrap() > 100.0,
        "{report:#}"
    );
    assert!(src.wait_exit(T).success());
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0);
    assert!(verb(&dst.api, "shutdown", &[]).0);
    assert!(dst.wait_exit(T).success());
}

/// Bad arguments are refused by the CLI before any VM is asked (no KVM).
#[test]
fn bad_control_arguments_are_refused() {
    let dir = Scratch::new("badctl");
    let sock = dir.path("none.api");
    for (args, want) in [
        (vec!["--downtime-ramp", "100:50:2"], "END must be"),
        (vec!["--downtime-ramp", "0:50:2"], "0 ms"),
        (vec!["--downtime-ramp", "100:500"], "START:END:STEPS"),
        (vec!["--downtime-ramp", "100:500:0"], "at least 1 step"),
    ] {
        let mut all = vec![
            "send",
            "--api-socket",
            s(&sock),
            "--to",
            "tcp:127.0.0.1:1",
            "--insecure",
        ];
        all.extend(args.iter().copied());
        let out = vmigrate(bin(), &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = vmigrate(bin(), &["set-parameters", "--api-socket", s(&sock)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to set"));
    let out = vmigrate(
        bin(),
        &[
            "memsave",
            "--api-socket",
            s(&sock),
            "--addr",
            "zz",
            "--size",
            "1",
            "--out",
            "f",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--addr"));
    // A ramp and an explicit limit together are a command-line error.
    let out = vmigrate(
        bin(),
        &[
            "send",
            "--api-socket",
            s(&sock),
            "--to",
            "tcp:127.0.0.1:1",
            "--insecure",
            "--downtime-ramp",
            "1:2:1",
            "--downtime-limit",
            "5",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn events_follow_a_detached_send_that_status_watch_sees_to_the_end() {
    if !kvm_available("events_follow_a_detached_send_that_status_watch_sees_to_the_end") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("events");
    let mut src = source(&dir);
    let (mut dst, uri) = VmProcess::destination(bin(), &dir, "dst", "tcp:127.0.0.1:0");

    // Subscribed once `ok` is read: no event after this can be missed.
    let mut sub = UnixStream::connect(&src.api).unwrap();
    sub.write_all(b"{\"command\":\"events\"}\n").unwrap();
    let mut lines = BufReader::new(sub).lines();
    let ok: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(ok["response"], "ok");
    let reader = std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .map(|l| serde_json::from_str::<Value>(&l).unwrap())
            .collect::<Vec<_>>()
    });

    assert!(verb(&src.api, "pause", &[]).0);
    assert!(verb(&src.api, "resume", &[]).0);
    let out = vmigrate(
        bin(),
        &[
            "send",
            "--api-socket",
            s(&src.api),
            "--to",
            &uri,
            "--insecure",
            "--detach",
            "--policy",
            "qemu",
            "--max-bandwidth",
            "16M",
            "--downtime-ramp",
            "100:30000:2",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("started"),
        "{text} {:?}",
        out.stderr
    );
    let watch = vmigrate(bin(), &["status", "--watch", "--api-socket", s(&src.api)]);
    let text = String::from_utf8_lossy(&watch.stdout);
    assert!(
        watch.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&watch.stderr)
    );
    assert!(text.contains("migration completed"), "{text}");
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());

    // The stream ends with the source process.
    let events = reader.join().unwrap();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            assert_eq!(e["response"], "event");
            match e["event"].as_str().unwrap() {
                "state-changed" => format!("state:{}", e["to"].as_str().unwrap()),
                "migration-ended" => format!("ended:{}", e["status"].as_str().unwrap()),
                k => k.to_string(),
            }
        })
        .collect();
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("{k} in {kinds:?}"))
    };
    assert!(pos("state:paused") < pos("state:running"));
    assert!(pos("state:running") < pos("state:migrating"));
    assert!(pos("state:migrating") < pos("migration-progress"));
    assert!(pos("migration-progress") < pos("ended:completed"));
    assert!(pos("ended:completed") < pos("state:postmigrate"));
    assert!(
        kinds.iter().filter(|k| *k == "migration-progress").count() >= 3,
        "{kinds:?}"
    );
    let times: Vec<f64> = events
        .iter()
        .map(|e| e["timestamp"].as_f64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(times[0] > 1.6e9, "timestamps are Unix seconds: {times:?}");

    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0);
    assert!(verb(&dst.api, "shutdown", &[]).0);
    assert!(dst.wait_exit(T).success());
}
