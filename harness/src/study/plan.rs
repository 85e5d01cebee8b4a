//! The plan of a study and the labels of its rows: which runs exist
//! (vmigrate policies on every workload, QEMU settings on `qemu.workloads`),
//! how QEMU rows are named (`qemu-<major.minor>:<label>`), rows for runs
//! that cannot happen, the summary order, and the progress line.
//!
//! Kept apart from the loop in `runner` so that what a row is called does
//! not depend on how it was run.

use super::config::{PolicyConfig, QemuPolicyConfig, StudyConfig};
use super::qemu::{qemu_version, short_version};
use super::record::{Outcome, RunRecord, RunRow};
use super::runner::Options;

/// One planned run.
pub(super) enum Job<'a> {
    Vmigrate(&'a PolicyConfig),
    Qemu(&'a QemuPolicyConfig),
}

/// Whether `workload` gets QEMU rows (`qemu.workloads`).
pub(super) fn qemu_runs(study: &StudyConfig, workload: &str) -> bool {
    study
        .qemu
        .as_ref()
        .and_then(|q| q.workloads.as_ref())
        .is_none_or(|w| w.iter().any(|x| x == workload))
}

/// QEMU to use: `None` when the study has no QEMU rows (or `--no-qemu`),
/// `Err(reason)` when it asks for them but QEMU cannot run, else the binary,
/// version and boot timeout.
pub(super) type QemuSetup = Option<Result<(String, String, f64), String>>;

pub(super) fn qemu_setup(study: &StudyConfig, opts: &Options) -> QemuSetup {
    let q = study.qemu.as_ref().filter(|q| q.enabled && opts.qemu)?;
    Some(match qemu_version(&q.binary) {
        Some(v) => Ok((q.binary.clone(), v, q.boot_timeout_s)),
        None => Err("qemu not installed".to_owned()),
    })
}

pub(super) fn label_qemu(row: &mut RunRow, p: &QemuPolicyConfig, version: &str) {
    row.engine = format!("qemu-{version}");
    row.policy = format!("qemu-{}:{}", short_version(version), p.label);
    row.policy_name = if p.auto_converge {
        "qemu+auto-converge"
    } else {
        "qemu"
    }
    .into();
    row.downtime_limit_ms = p.downtime_limit_ms;
}

pub(super) fn error_row(
    mut row: RunRow,
    job: &Job<'_>,
    link_error: &str,
    qemu: Option<&Result<(String, String, f64), String>>,
) -> RunRecord {
    match job {
        Job::Vmigrate(p) => {
            row.policy = p.label.clone();
            row.policy_name = p.policy.clone();
            row.downtime_limit_ms = p.downtime_limit_ms;
        }
        Job::Qemu(p) => match qemu {
            Some(Ok((_, v, _))) => label_qemu(&mut row, p, v),
            _ => {
                row.engine = "qemu".into();
                row.policy = format!("qemu:{}", p.label);
                row.policy_name = "qemu".into();
            }
        },
    }
    row.outcome = Some(Outcome::Error);
    row.error = Some(match qemu {
        Some(Err(e)) if link_error.is_empty() => e.clone(),
        _ => link_error.to_owned(),
    });
    RunRecord { row, report: None }
}

/// Summary order: workloads, links, then vmigrate policies and QEMU rows in
/// study order.
pub(super) fn order(study: &StudyConfig, qemu: &QemuSetup) -> Vec<(String, String, String)> {
    let mut labels: Vec<String> = study.policies.iter().map(|p| p.label.clone()).collect();
    if let (Some(q), Some(setup)) = (&study.qemu, qemu) {
        for p in &q.policies {
            labels.push(match setup {
                Ok((_, v, _)) => format!("qemu-{}:{}", short_version(v), p.label),
                Err(_) => format!("qemu:{}", p.label),
            });
        }
    }
    let mut order = Vec::new();
    for w in &study.workloads {
        for l in &study.links {
            for p in &labels {
                order.push((w.clone(), l.name.clone(), p.clone()));
            }
        }
    }
    order
}

/// `[ 3/12] sweep-256m  qemu-300  loopback #1  completed 2.41 s ...`
pub(super) fn progress_line(n: usize, total: usize, r: &RunRecord) -> String {
    let r = &r.row;
    let mut s = format!(
        "[{n:>3}/{total}] {:<18} {:<20} {:<9} #{}  {:<9}",
        r.workload,
        r.policy,
        r.link,
        r.rep,
        r.outcome.map_or("?", Outcome::as_str)
    );
    if let Some(t) = r.total_time_ms {
        s.push_str(&format!(" {:>7.2} s", t / 1000.0));
    }
    if let Some(d) = r.downtime_ms {
        s.push_str(&format!("  down {d:>6.0} ms"));
    }
    if let (Some(b), Some(x)) = (r.wire_bytes, r.bytes_per_ram) {
        s.push_str(&format!(
            "  sent {:>6.2} GiB ({x:.1}×RAM)",
            b as f64 / f64::from(1u32 << 30)
        ));
    }
    if let Some(d) = r.degradation {
        s.push_str(&format!("  speed {d:.2}"));
    }
    if let Some(t) = r.throttle_pct {
        s.push_str(&format!("  throttle {t:.0}%"));
    }
    if let Some(e) = r.error.as_ref().filter(|_| !r.success) {
        s.push_str(&format!("  [{}]", e.chars().take(160).collect::<String>()));
    } else if let Some(sr) = &r.stop_reason {
        s.push_str(&format!("  ({sr})"));
    }
    s
}
