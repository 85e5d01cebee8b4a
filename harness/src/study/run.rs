//! One vmigrate migration, from fresh processes to a result row.
//!
//! Every run starts a new destination (`vmigrate run --incoming`, inside
//! the link's namespace when the link is emulated) and a new source
//! (`vmigrate run --workload`), so no run inherits a warm page cache,
//! allocated guest memory or a half-finished migration from the one
//! before. Sequence: wait for the listening address, the API socket and the
//! guest's boot mark; let the guest run `warmup_s` (and at least two passes)
//! to measure its speed; `vmigrate send ... --timeout CAP --json`; watch the
//! marks until the migration ends and for a short tail after; stop both
//! processes. Whatever happens, both processes are gone when this returns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::config::{PolicyConfig, Profile};
use super::marks::{longest_gap, speeds, MarkWatch, Speeds, POLL_INTERVAL};
use super::procs::{Guard, SpawnError, Stop};
use super::record::{add_note, apply_report, Outcome, RunRecord, RunRow};

/// Where and how a run happens (shared by the runs on one link).
pub struct RunEnv<'a> {
    /// The `vmigrate` binary.
    pub vmigrate: &'a Path,
    /// Prefix that runs the destination (empty, or `ip netns exec NS`).
    pub dest_prefix: Vec<String>,
    /// Address the destination listens on.
    pub dest_ip: String,
    /// Seconds before a migration counts as failed.
    pub time_cap_s: f64,
    /// Seconds of guest running before the migration.
    pub warmup_s: f64,
    /// The stop flag.
    pub stop: &'a Stop,
}

/// Why a run produced no measurement.
#[derive(Debug, Error)]
pub enum RunError {
    /// A process could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// A VM did not get ready in time or exited early.
    #[error("{0}")]
    NotReady(String),
    /// `send` printed no report.
    #[error("send gave no report: {0}")]
    NoReport(String),
    /// A stop was requested.
    #[error("stopped by a signal")]
    Stopped,
}

/// Seconds to wait for both VMs to be ready and the guest to boot.
const READY_TIMEOUT_S: f64 = 60.0;
/// Longest wait for a mark after the migration (see `marks`).
const MAX_TAIL_S: f64 = 10.0;
/// Extra seconds granted to `send` past the cap before it is killed (the
/// cap is checked at iteration boundaries, and a final pass may be long).
const SEND_GRACE_S: f64 = 60.0;

/// Runs one migration of `profile` under `policy`. `row` arrives with the
/// identity fields filled; the measurement fields are filled here. Never
/// fails: a run that cannot be carried out is an `error` row.
#[must_use]
pub fn run_vmigrate(
    env: &RunEnv<'_>,
    work: &Path,
    profile: &Profile,
    policy: &PolicyConfig,
    mut row: RunRow,
) -> RunRecord {
    if let Some(e) = &profile.spec_error {
        row.outcome = Some(Outcome::Error);
        row.error = Some(e.clone());
        return RunRecord { row, report: None };
    }
    match migrate(env, work, profile, policy, &mut row) {
        Ok(report) => RunRecord { row, report },
        Err(e) => {
            row.outcome = Some(Outcome::Error);
            row.success = false;
            row.error = Some(e.to_string());
            RunRecord { row, report: None }
        }
    }
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// The last `n` characters of a log file, on one line.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let text = text.trim();
    let start = text.char_indices().rev().nth(n).map_or(0, |(i, _)| i);
    text[start..].replace('\n', " | ")
}

fn migrate(
    env: &RunEnv<'_>,
    work: &Path,
    profile: &Profile,
    policy: &PolicyConfig,
    row: &mut RunRow,
) -> Result<Option<serde_json::Value>, RunError> {
    std::fs::create_dir_all(work)
        .map_err(|e| RunError::NotReady(format!("cannot create {}: {e}", work.display())))?;
    let f = |name: &str| -> PathBuf { work.join(name) };
    let vm = env.vmigrate.display().to_string();
    let mut dst_argv = env.dest_prefix.clone();
    dst_argv.extend([
        vm.clone(),
        s("run"),
        s("--incoming"),
        format!("tcp:{}:0", env.dest_ip),
        // Plaintext on purpose: the study compares policies with each
        // other, with earlier studies and with QEMU, all plaintext, over a
        // private loopback or netns link (bench-data/channel measures what
        // the PSK channel costs).
        s("--insecure"),
        s("--serial"),
        f("dst.serial").display().to_string(),
        s("--api-socket"),
        f("dst.api").display().to_string(),
        s("--incoming-timeout"),
        s(120),
    ]);
    let mut src_argv = vec![
        vm.clone(),
        s("run"),
        s("--workload"),
        profile.workload.clone(),
        s("--mem"),
        profile.mem.clone(),
        s("--serial"),
        f("src.serial").display().to_string(),
        s("--api-socket"),
        f("src.api").display().to_string(),
    ];
    if profile.vcpus > 1 {
        src_argv.extend([s("--vcpus"), profile.vcpus.to_string()]);
    }
    if let Some(t) = &profile.dirty_track {
        src_argv.extend([s("--dirty-track"), t.clone()]);
    }
    let start = Instant::now();
    let mut watch = MarkWatch::new(start, profile.mark, &[f("src.serial"), f("dst.serial")]);
    let mut dst = Guard::spawn(
        "destination VM",
        &dst_argv,
        &f("dst.out"),
        &f("dst.err"),
        Some(&f("dst.api")),
    )?;
    let mut src = Guard::spawn(
        "source VM",
        &src_argv,
        &f("src.out"),
        &f("src.err"),
        Some(&f("src.api")),
    )?;

    // 1. Ready: listening address, API socket, boot mark.
    let uri = loop {
        watch.poll();
        let out = std::fs::read_to_string(f("dst.out")).unwrap_or_default();
        let uri = out
            .lines()
            .find_map(|l| l.strip_prefix("vmigrate: listening on "));
        if let (Some(uri), true, Some(_)) = (uri, f("src.api").exists(), watch.times().boot) {
            break uri.trim().to_owned();
        }
        for (g, err) in [(&mut dst, "dst.err"), (&mut src, "src.err")] {
            if let Some(status) = g.try_wait() {
                return Err(RunError::NotReady(format!(
                    "{} exited ({status}): {}",
                    g.what(),
                    log_tail(&f(err), 400)
                )));
            }
        }
        check(
            env,
            watch.now() > READY_TIMEOUT_S,
            "VMs not ready (listening address, API socket, boot mark)",
        )?;
    };
    // 2. Warm-up: `warmup_s` after boot and two passes, or 30 s more.
    let boot = watch.times().boot.unwrap_or(0.0);
    while watch.now() < boot + env.warmup_s
        || (watch.times().passes.len() < 2 && watch.now() < boot + env.warmup_s + 30.0)
    {
        if let Some(status) = src.try_wait() {
            return Err(RunError::NotReady(format!(
                "source exited during warm-up ({status}): {}",
                log_tail(&f("src.err"), 400)
            )));
        }
        check(env, false, "")?;
        watch.poll();
    }
    // 3. Migrate.
    let mut send_argv = vec![
        vm,
        s("send"),
        s("--api-socket"),
        f("src.api").display().to_string(),
        s("--to"),
        uri,
        s("--insecure"),
        s("--policy"),
        policy.policy.clone(),
        s("--downtime-limit"),
        s(policy.downtime_limit_ms),
        s("--timeout"),
        format!("{}", env.time_cap_s),
        s("--json"),
    ];
    for p in policy.param_args() {
        send_argv.extend([s("--param"), p]);
    }
    if let Some(bw) = &policy.max_bandwidth {
        send_argv.extend([s("--max-bandwidth"), bw.clone()]);
    }
    if policy.skip_unchanged {
        send_argv.push(s("--skip-unchanged"));
    }
    watch.poll();
    let t_send = watch.now();
    let mut send = Guard::spawn(
        "vmigrate send",
        &send_argv,
        &f("send.json"),
        &f("send.err"),
        None,
    )?;
    let send_status = loop {
        watch.poll();
        if let Some(st) = send.try_wait() {
            break Some(st);
        }
        if watch.now() - t_send > env.time_cap_s + SEND_GRACE_S {
            send.kill();
            add_note(row, &format!("send killed {SEND_GRACE_S} s after the cap"));
            break None;
        }
        check(env, false, "")?;
    };
    let t_end = watch.now();
    // 4. Tail: wait for a mark after the end, so P(end) is interpolated.
    let gap = longest_gap(watch.times(), t_send);
    let tail = gap.map_or(2.0, |g| (3.0 * g + 0.5).min(MAX_TAIL_S));
    while watch.passes_after(t_end) == 0 && watch.now() < t_end + tail {
        check(env, false, "")?;
        watch.poll();
    }
    // 5. Stop both; a destination that died after taking the guest is noted.
    let dst_exit = dst.try_wait();
    src.stop(Duration::from_secs(5));
    dst.stop(Duration::from_secs(5));

    let text = std::fs::read_to_string(f("send.json")).unwrap_or_default();
    let report: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => {
            let why = log_tail(&f("send.err"), 500);
            let why = if why.is_empty() {
                format!("exit {send_status:?}")
            } else {
                why
            };
            return Err(RunError::NoReport(why));
        }
    };
    apply_report(row, &report);
    let sp: Speeds = speeds(watch.times(), t_send, t_end);
    row.rate_before = sp.before;
    row.rate_during = sp.during;
    row.degradation = sp.degradation;
    row.speed_exact = Some(sp.exact);
    if !sp.exact {
        add_note(
            row,
            "guest speed is a lower bound (no mark after the window)",
        );
    }
    let completed =
        row.status.as_deref() == Some("completed") && send_status.is_some_and(|s| s.success());
    let in_cap = row
        .total_time_ms
        .is_some_and(|t| t <= env.time_cap_s * 1000.0);
    row.success = completed && in_cap;
    row.outcome = Some(if row.success {
        Outcome::Completed
    } else {
        Outcome::Failed
    });
    if completed && !in_cap {
        add_note(row, "completed after the time cap (counted as failed)");
    }
    if !completed && row.error.is_none() {
        row.error = Some(format!("status {}", row.status.as_deref().unwrap_or("?")));
    }
    if let Some(st) = dst_exit.filter(|_| completed) {
        add_note(
            row,
            &format!(
                "destination exited by itself ({st}): {}",
                log_tail(&f("dst.err"), 200)
            ),
        );
    }
    Ok(Some(report))
}

/// Sleeps one poll interval; fails on a stop request or when `timed_out`.
pub(super) fn check(env: &RunEnv<'_>, timed_out: bool, what: &str) -> Result<(), RunError> {
    if env.stop.requested() {
        return Err(RunError::Stopped);
    }
    if timed_out {
        return Err(RunError::NotReady(format!("{what}: timed out")));
    }
    std::thread::sleep(POLL_INTERVAL);
    Ok(())
}
