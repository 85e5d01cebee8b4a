//! The same workloads migrated by QEMU, side by side with vmigrate.
//!
//! The claim is measured against QEMU itself, not only against vmigrate's
//! re-implementation of QEMU's rule. Each workload's boot sector is
//! exported (`vmigrate workload export`) and booted by SeaBIOS as a raw
//! disk; a destination QEMU waits with `-incoming`; the settings of one
//! [`QemuPolicyConfig`] are applied over QMP (`downtime-limit`,
//! `max-bandwidth`, `auto-converge`), `migrate` starts, and `query-migrate`
//! is polled until `completed`/`failed` or the cap (then `migrate_cancel`).
//! The last `query-migrate` answer is the report: its field names are the
//! ones vmigrate copies, so the same reader fills the row.
//!
//! Caveat recorded on the rows: QEMU cannot write a profile's VMM content
//! (hotset's incompressible working set), so those guests run on zero-filled
//! memory and are not the same guest.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::config::{Profile, QemuPolicyConfig};
use super::marks::{longest_gap, speeds, MarkWatch};
use super::procs::Guard;
use super::qmp::Qmp;
use super::record::{add_note, apply_report, Outcome, RunRecord, RunRow};
use super::run::{check, log_tail, RunEnv, RunError};

/// `max-bandwidth` used for "unlimited" (QEMU has no unlimited value).
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// The QEMU version (`7.2.22`), or `None` if the binary does not run.
#[must_use]
pub fn qemu_version(binary: &str) -> Option<String> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    Some(v.to_owned())
}

/// Major.minor of a version string: `7.2.22` → `7.2`.
#[must_use]
pub fn short_version(v: &str) -> String {
    v.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// What a QEMU run needs beyond [`RunEnv`].
pub struct QemuEnv<'a> {
    /// The QEMU binary.
    pub binary: &'a str,
    /// Seconds to wait for the boot mark.
    pub boot_timeout_s: f64,
    /// A TCP port free where the destination listens.
    pub port: u16,
}

/// Runs one QEMU migration; like `run_vmigrate`, never fails.
#[must_use]
pub fn run_qemu(
    env: &RunEnv<'_>,
    q: &QemuEnv<'_>,
    work: &Path,
    profile: &Profile,
    policy: &QemuPolicyConfig,
    mut row: RunRow,
) -> RunRecord {
    if profile.needs_vmm_content {
        add_note(
            &mut row,
            "QEMU cannot write the VMM-filled content: guest differs (zero-filled working set)",
        );
    }
    if let Some(e) = &profile.spec_error {
        row.outcome = Some(Outcome::Error);
        row.error = Some(e.clone());
        return RunRecord { row, report: None };
    }
    if profile.vcpus > 1 || profile.dirty_track.is_some() {
        // The QEMU runner boots one vCPU with QEMU's default dirty
        // tracking: it would not be the same guest.
        row.outcome = Some(Outcome::Error);
        row.error = Some(format!(
            "not run: the QEMU rows boot one vCPU with the bitmap, this profile has {} vCPUs{}",
            profile.vcpus,
            profile
                .dirty_track
                .as_deref()
                .map_or_else(String::new, |t| format!(" and dirty tracking {t}"))
        ));
        return RunRecord { row, report: None };
    }
    match migrate(env, q, work, profile, policy, &mut row) {
        Ok(report) => RunRecord {
            row,
            report: Some(report),
        },
        Err(e) => {
            row.outcome = Some(Outcome::Error);
            row.error = Some(e.to_string());
            RunRecord { row, report: None }
        }
    }
}

fn qemu_argv(
    q: &QemuEnv<'_>,
    profile: &Profile,
    image: &Path,
    serial: &Path,
    qmp: &Path,
) -> Vec<String> {
    [
        q.binary,
        "-accel",
        "kvm",
        "-m",
        &profile.mem,
        "-smp",
        "1",
        "-display",
        "none",
        "-no-reboot",
        "-drive",
        &format!("format=raw,file={}", image.display()),
        "-serial",
        &format!("file:{}", serial.display()),
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn not_ready(what: impl std::fmt::Display) -> RunError {
    RunError::NotReady(what.to_string())
}

fn migrate(
    env: &RunEnv<'_>,
    q: &QemuEnv<'_>,
    work: &Path,
    profile: &Profile,
    policy: &QemuPolicyConfig,
    row: &mut RunRow,
) -> Result<Value, RunError> {
    std::fs::create_dir_all(work).map_err(not_ready)?;
    let f = |name: &str| work.join(name);
    // Export the image (one copy per side: QEMU locks its disk images).
    let out = Command::new(env.vmigrate)
        .args([
            "workload",
            "export",
            &profile.workload,
            "--mem",
            &profile.mem,
            "--out",
        ])
        .arg(f("src.img"))
        .output()
        .map_err(not_ready)?;
    if !out.status.success() {
        return Err(not_ready(format!(
            "workload export: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::copy(f("src.img"), f("dst.img")).map_err(not_ready)?;

    let start = Instant::now();
    let mut watch = MarkWatch::new(start, profile.mark, &[f("src.serial"), f("dst.serial")]);
    let mut dst_argv = env.dest_prefix.clone();
    dst_argv.extend(qemu_argv(
        q,
        profile,
        &f("dst.img"),
        &f("dst.serial"),
        &f("dst.qmp"),
    ));
    let uri = format!("tcp:{}:{}", env.dest_ip, q.port);
    dst_argv.extend(["-incoming".to_owned(), uri.clone()]);
    let mut dst = Guard::spawn(
        "destination QEMU",
        &dst_argv,
        &f("dst.out"),
        &f("dst.err"),
        None,
    )?;
    let src_argv = qemu_argv(q, profile, &f("src.img"), &f("src.serial"), &f("src.qmp"));
    let mut src = Guard::spawn("source QEMU", &src_argv, &f("src.out"), &f("src.err"), None)?;
    let mut src_qmp = Qmp::connect(&f("src.qmp"), Duration::from_secs(10)).map_err(not_ready)?;
    let mut dst_qmp = Qmp::connect(&f("dst.qmp"), Duration::from_secs(10)).map_err(not_ready)?;

    // Boot (SeaBIOS takes seconds here), then warm up as vmigrate runs do.
    while watch.times().boot.is_none() {
        for (g, err) in [(&mut dst, "dst.err"), (&mut src, "src.err")] {
            if let Some(st) = g.try_wait() {
                return Err(not_ready(format!(
                    "{} exited ({st}): {}",
                    g.what(),
                    log_tail(&f(err), 400)
                )));
            }
        }
        check(
            env,
            watch.now() > q.boot_timeout_s,
            "no boot mark from the QEMU guest",
        )?;
        watch.poll();
    }
    let boot = watch.times().boot.unwrap_or(0.0);
    while watch.now() < boot + env.warmup_s
        || (watch.times().passes.len() < 2 && watch.now() < boot + env.warmup_s + 30.0)
    {
        check(env, false, "")?;
        watch.poll();
    }

    let bw = match &policy.max_bandwidth {
        Some(s) => crate::size::parse_size(s).map_err(not_ready)?,
        None => UNLIMITED_BANDWIDTH,
    };
    let caps =
        json!({"capabilities": [{"capability": "auto-converge", "state": policy.auto_converge}]});
    src_qmp
        .execute("migrate-set-capabilities", Some(caps))
        .map_err(not_ready)?;
    let params = json!({"downtime-limit": policy.downtime_limit_ms, "max-bandwidth": bw});
    src_qmp
        .execute("migrate-set-parameters", Some(params))
        .map_err(not_ready)?;

    watch.poll();
    let t_send = watch.now();
    src_qmp
        .execute("migrate", Some(json!({ "uri": uri })))
        .map_err(not_ready)?;
    let mut last;
    let mut cancelled = false;
    let mut next_query = Instant::now();
    loop {
        watch.poll();
        if Instant::now() >= next_query {
            next_query = Instant::now() + Duration::from_millis(100);
            last = src_qmp.execute("query-migrate", None).map_err(not_ready)?;
            if let Some("completed" | "failed" | "cancelled") =
                last.get("status").and_then(Value::as_str)
            {
                break;
            }
            if watch.now() - t_send > env.time_cap_s && !cancelled {
                let _ = src_qmp.execute("migrate_cancel", None);
                cancelled = true;
            }
            if watch.now() - t_send > env.time_cap_s + 60.0 {
                add_note(row, "QEMU did not cancel within 60 s");
                break;
            }
        }
        check(env, false, "")?;
    }
    let t_end = watch.now();
    let gap = longest_gap(watch.times(), t_send);
    let tail_until = t_end + gap.map_or(2.0, |g| (3.0 * g + 0.5).min(10.0));
    while watch.passes_after(t_end) == 0 && watch.now() < tail_until {
        check(env, false, "")?;
        watch.poll();
    }
    for qmp in [&mut src_qmp, &mut dst_qmp] {
        let _ = qmp.execute("quit", None);
    }
    src.stop(Duration::from_secs(5));
    dst.stop(Duration::from_secs(5));

    apply_report(row, &last);
    if cancelled {
        row.error = Some(format!(
            "not completed within the {} s cap (migrate_cancel)",
            env.time_cap_s
        ));
    }
    let sp = speeds(watch.times(), t_send, t_end);
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
    let completed = row.status.as_deref() == Some("completed");
    row.success = completed
        && row
            .total_time_ms
            .is_some_and(|t| t <= env.time_cap_s * 1000.0);
    row.outcome = Some(if row.success {
        Outcome::Completed
    } else {
        Outcome::Failed
    });
    if !completed && row.error.is_none() {
        row.error = Some(format!("status {}", row.status.as_deref().unwrap_or("?")));
    }
    Ok(last)
}

/// A TCP port nobody listens on at `ip` in this namespace (for loopback; a
/// private namespace has every port free).
#[must_use]
pub fn free_port(ip: &str) -> Option<u16> {
    std::net::TcpListener::bind((ip, 0))
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}
