//! One run's results: the row written to `runs.csv` and `runs.json`, and
//! how it is read out of a migration report.
//!
//! vmigrate's `send --json` report and QEMU's `query-migrate` use the same
//! field names (`total-time`, `ram.transferred`, ...), so one reader serves
//! both; it reads the JSON loosely (fields the other side or an older
//! vmigrate lacks are simply absent) so that the runner keeps working while
//! the report grows (`cpu-throttle-percentage`, per-iteration `throttle` and
//! `deferred-pages`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The migration completed within the time cap.
    Completed,
    /// The migration ran but did not complete (cap reached, policy gave up,
    /// failure): a result, not a fault of the runner.
    Failed,
    /// The run could not be carried out (bad spec, unknown policy, a VM that
    /// did not start): no measurement.
    Error,
}

impl Outcome {
    /// The lower-case name used in files.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Error => "error",
        }
    }
}

/// The flat per-run record (one CSV line). Times in ms unless named `_s`,
/// rates in Mbit/s, guest speed in passes/s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    /// Study name.
    pub study: String,
    /// `vmigrate`, or `qemu-<version>` for QEMU rows.
    pub engine: String,
    /// Workload profile name.
    pub workload: String,
    /// Its workload spec.
    pub spec: String,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// Policy label.
    pub policy: String,
    /// `--policy` name (QEMU rows: `qemu`).
    pub policy_name: String,
    /// Downtime limit asked for, ms.
    pub downtime_limit_ms: u64,
    /// Link name.
    pub link: String,
    /// Repetition, from 1.
    pub rep: u32,
    /// `completed`, `failed` or `error`.
    pub outcome: Option<Outcome>,
    /// Completed within the cap.
    pub success: bool,
    /// The migration's own final status (`completed`, `failed`, `cancelled`).
    pub status: Option<String>,
    /// `total-time`: start of the migration to its end.
    pub total_time_ms: Option<f64>,
    /// `downtime`: how long the guest was paused.
    pub downtime_ms: Option<f64>,
    /// `setup-time`.
    pub setup_time_ms: Option<f64>,
    /// Iterations (vmigrate: records incl. the final pass; QEMU: dirty syncs).
    pub iterations: Option<u64>,
    /// `ram.normal-bytes`: page payload sent (raw page bytes).
    pub page_bytes: Option<u64>,
    /// `ram.transferred`: bytes on the wire.
    pub wire_bytes: Option<u64>,
    /// `wire_bytes ÷ mem`.
    pub bytes_per_ram: Option<f64>,
    /// `ram.page-mbps` (QEMU: `ram.mbps`).
    pub page_mbps: Option<f64>,
    /// Plain TCP throughput of the link, measured in the same study run.
    pub link_mbps: Option<f64>,
    /// `page_mbps ÷ link_mbps`.
    pub efficiency: Option<f64>,
    /// Guest passes/s before the migration.
    pub rate_before: Option<f64>,
    /// Guest passes/s during it.
    pub rate_during: Option<f64>,
    /// `rate_during ÷ rate_before`.
    pub degradation: Option<f64>,
    /// False when the speed is a lower bound (no mark after the window).
    pub speed_exact: Option<bool>,
    /// Highest throttle reached, percent (`cpu-throttle-percentage`, or the
    /// highest per-iteration `throttle`).
    pub throttle_pct: Option<f64>,
    /// Sum of per-iteration `deferred-pages`, when reported.
    pub deferred_pages: Option<u64>,
    /// Why the policy stopped iterating.
    pub stop_reason: Option<String>,
    /// What went wrong, for failed and error runs.
    pub error: Option<String>,
    /// Caveats (QEMU without VMM content, speed lower bound, ...).
    pub note: Option<String>,
    /// Unix time the run started, seconds.
    pub started_unix: u64,
}

/// A run as kept in `runs.json`: the row plus the full report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The flat figures.
    #[serde(flatten)]
    pub row: RunRow,
    /// The migration report as printed by `send --json`, or QEMU's last
    /// `query-migrate` answer.
    pub report: Option<Value>,
}

impl RunRecord {
    /// Identity of a run inside a study: later results replace earlier ones
    /// with the same key when a study is run in parts.
    #[must_use]
    pub fn key(&self) -> (String, String, String, String, u32) {
        let r = &self.row;
        (
            r.engine.clone(),
            r.workload.clone(),
            r.policy.clone(),
            r.link.clone(),
            r.rep,
        )
    }
}

fn f64_at(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

fn str_at(v: &Value, path: &[&str]) -> Option<String> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))?
        .as_str()
        .map(str::to_owned)
}

/// Fills the report-derived fields of `row` from a report (vmigrate's or
/// QEMU's). `mem` is the guest RAM used when the report lacks `ram.total`.
pub fn apply_report(row: &mut RunRow, report: &Value) {
    row.status = str_at(report, &["status"]);
    row.total_time_ms = f64_at(report, &["total-time"]);
    row.downtime_ms = f64_at(report, &["downtime"]);
    row.setup_time_ms = f64_at(report, &["setup-time"]);
    let iterations = report.get("iterations").and_then(Value::as_array);
    row.iterations = iterations
        .map(|a| a.len() as u64)
        .or_else(|| u64_at(report, &["ram", "dirty-sync-count"]));
    row.page_bytes = u64_at(report, &["ram", "normal-bytes"]);
    row.wire_bytes = u64_at(report, &["ram", "transferred"]);
    let total = u64_at(report, &["ram", "total"])
        .filter(|&t| t > 0)
        .unwrap_or(row.mem);
    row.bytes_per_ram = row
        .wire_bytes
        .filter(|_| total > 0)
        .map(|b| b as f64 / total as f64);
    row.page_mbps =
        f64_at(report, &["ram", "page-mbps"]).or_else(|| f64_at(report, &["ram", "mbps"]));
    let per_iter_throttle = iterations
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("throttle").and_then(Value::as_f64))
        // A fraction (0.2) or a percentage (20): report percent.
        .map(|t| if t <= 1.0 { t * 100.0 } else { t })
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    row.throttle_pct = f64_at(report, &["cpu-throttle-percentage"]).or(per_iter_throttle);
    let deferred: Vec<u64> = iterations
        .into_iter()
        .flatten()
        .filter_map(|i| u64_at(i, &["deferred-pages"]))
        .collect();
    row.deferred_pages = (!deferred.is_empty()).then(|| deferred.iter().sum());
    row.stop_reason = str_at(report, &["stop-reason"]);
    if let Some(e) = str_at(report, &["error"]).or_else(|| str_at(report, &["error-desc"])) {
        row.error = Some(e);
    }
    update_efficiency(row);
}

/// Recomputes `efficiency` from `page_mbps` and `link_mbps`.
pub fn update_efficiency(row: &mut RunRow) {
    row.efficiency = match (row.page_mbps, row.link_mbps) {
        (Some(p), Some(l)) if l > 0.0 => Some(p / l),
        _ => None,
    };
}

/// Adds a caveat to `row.note`.
pub fn add_note(row: &mut RunRow, note: &str) {
    row.note = Some(match row.note.take() {
        Some(n) => format!("{n}; {note}"),
        None => note.to_owned(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_vmigrate_report() {
        let report = serde_json::json!({
            "status": "completed", "total-time": 6635.7, "downtime": 10.2, "setup-time": 9.5,
            "ram": {"transferred": 2_147_483_648_u64, "total": 1_073_741_824_u64,
                    "normal-bytes": 2_000_000_000_u64, "mbps": 3393.0, "page-mbps": 3386.3},
            "policy": "xen", "stop-reason": "iteration limit", "error": null,
            "cpu-throttle-percentage": 30,
            "iterations": [{"iteration": 0, "deferred-pages": 5}, {"iteration": 1, "throttle": 0.2, "deferred-pages": 7}]
        });
        let mut row = RunRow {
            mem: 1 << 30,
            link_mbps: Some(10_000.0),
            ..RunRow::default()
        };
        apply_report(&mut row, &report);
        assert_eq!(row.status.as_deref(), Some("completed"));
        assert_eq!(row.iterations, Some(2));
        assert_eq!(row.bytes_per_ram, Some(2.0));
        assert_eq!(row.page_bytes, Some(2_000_000_000));
        assert_eq!(row.throttle_pct, Some(30.0));
        assert_eq!(row.deferred_pages, Some(12));
        assert!((row.efficiency.unwrap() - 0.33863).abs() < 1e-6);
        assert_eq!(row.error, None);
    }

    #[test]
    fn reads_a_qemu_answer() {
        let report = serde_json::json!({
            "status": "completed", "total-time": 5930, "downtime": 773, "setup-time": 3,
            "ram": {"transferred": 2_276_000_000_u64, "total": 1_074_000_000_u64, "normal-bytes": 2_270_000_000_u64,
                    "mbps": 3000.5, "dirty-sync-count": 4}
        });
        let mut row = RunRow::default();
        apply_report(&mut row, &report);
        assert_eq!(row.iterations, Some(4));
        assert_eq!(row.page_mbps, Some(3000.5));
        assert_eq!(row.total_time_ms, Some(5930.0));
        assert_eq!(row.throttle_pct, None);
    }

    #[test]
    fn record_round_trips_through_json() {
        let rec = RunRecord {
            row: RunRow {
                workload: "w".into(),
                outcome: Some(Outcome::Failed),
                total_time_ms: Some(1.5),
                ..RunRow::default()
            },
            report: Some(serde_json::json!({"a": 1})),
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert_eq!(serde_json::from_str::<RunRecord>(&text).unwrap(), rec);
    }
}
