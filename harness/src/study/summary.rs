//! The per workload × link × policy summary: `summary.csv`, the terminal
//! table, and the table in `bench-data/README.md`.
//!
//! Times, downtime and bytes are medians over the *completed* runs only: a
//! run stopped by the time cap has no total time, and its bytes are only
//! "so far" (kept apart as `failed_sent_mib` so the plots can show them).
//! Guest speed is the median over every run that measured it, failed ones
//! included, since a policy that slows the guest and still fails is worse.
//! The README table is generated from these rows, never typed by hand.

use serde::Serialize;

use super::record::{Outcome, RunRecord};

/// One line of `summary.csv`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    /// Workload profile.
    pub workload: String,
    /// Link name.
    pub link: String,
    /// Policy label.
    pub policy: String,
    /// `vmigrate` or `qemu-<version>`.
    pub engine: String,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// Runs recorded.
    pub runs: usize,
    /// Runs completed within the cap.
    pub completed: usize,
    /// Runs that could not be carried out.
    pub errors: usize,
    /// `completed/runs`.
    pub success: String,
    /// Median total time of completed runs, seconds.
    pub total_time_s: Option<f64>,
    /// Median downtime of completed runs, ms.
    pub downtime_ms: Option<f64>,
    /// Median bytes sent (wire) by completed runs, MiB.
    pub sent_mib: Option<f64>,
    /// Median bytes sent ÷ RAM of completed runs.
    pub sent_per_ram: Option<f64>,
    /// Median bytes sent by failed runs up to the cap, MiB.
    pub failed_sent_mib: Option<f64>,
    /// Median time failed runs ran before they were stopped, seconds.
    pub failed_time_s: Option<f64>,
    /// Median iterations of completed runs.
    pub iterations: Option<f64>,
    /// Median page rate, Mbit/s.
    pub page_mbps: Option<f64>,
    /// Link throughput measured in the study, Mbit/s.
    pub link_mbps: Option<f64>,
    /// Median page rate ÷ link throughput.
    pub efficiency: Option<f64>,
    /// Median guest speed during ÷ before.
    pub degradation: Option<f64>,
    /// Highest throttle reached, percent.
    pub max_throttle_pct: Option<f64>,
    /// Distinct notes and errors of the runs.
    pub notes: String,
}

/// Median of the values (mean of the middle two for an even count).
#[must_use]
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Groups runs by workload × link × policy. Groups come in the order of
/// `order` (workload, link, policy names, each in study order), then any
/// group not in it (older results merged from a previous configuration).
#[must_use]
pub fn summarize(runs: &[RunRecord], order: &[(String, String, String)]) -> Vec<SummaryRow> {
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in runs {
        let k = (
            r.row.workload.clone(),
            r.row.link.clone(),
            r.row.policy.clone(),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let rank =
        |k: &(String, String, String)| order.iter().position(|o| o == k).unwrap_or(usize::MAX);
    keys.sort_by_key(|k| rank(k));
    keys.into_iter()
        .map(|k| {
            let group: Vec<&RunRecord> = runs
                .iter()
                .filter(|r| r.row.workload == k.0 && r.row.link == k.1 && r.row.policy == k.2)
                .collect();
            summarize_group(&k, &group)
        })
        .collect()
}

fn summarize_group(k: &(String, String, String), group: &[&RunRecord]) -> SummaryRow {
    let done: Vec<_> = group.iter().filter(|r| r.row.success).collect();
    let failed: Vec<_> = group
        .iter()
        .filter(|r| r.row.outcome == Some(Outcome::Failed))
        .collect();
    let med = |rows: &[&&RunRecord], f: &dyn Fn(&RunRecord) -> Option<f64>| {
        median(rows.iter().filter_map(|r| f(r)).collect())
    };
    let mib = |r: &RunRecord| r.row.wire_bytes.map(|b| b as f64 / 1_048_576.0);
    let all: Vec<_> = group.iter().collect();
    let mut notes: Vec<String> = Vec::new();
    for r in group {
        for n in [&r.row.note, &r.row.error].into_iter().flatten() {
            if !notes.contains(n) {
                notes.push(n.clone());
            }
        }
    }
    let first = group.first().map(|r| &r.row);
    SummaryRow {
        workload: k.0.clone(),
        link: k.1.clone(),
        policy: k.2.clone(),
        engine: first.map(|r| r.engine.clone()).unwrap_or_default(),
        mem: first.map_or(0, |r| r.mem),
        runs: group.len(),
        completed: done.len(),
        errors: group
            .iter()
            .filter(|r| r.row.outcome == Some(Outcome::Error))
            .count(),
        success: format!("{}/{}", done.len(), group.len()),
        total_time_s: med(&done, &|r| r.row.total_time_ms.map(|t| t / 1000.0)),
        downtime_ms: med(&done, &|r| r.row.downtime_ms),
        sent_mib: med(&done, &mib),
        sent_per_ram: med(&done, &|r| r.row.bytes_per_ram),
        failed_sent_mib: med(&failed, &mib),
        failed_time_s: med(&failed, &|r| r.row.total_time_ms.map(|t| t / 1000.0)),
        iterations: med(&done, &|r| r.row.iterations.map(|i| i as f64)),
        page_mbps: med(&all, &|r| {
            r.row
                .page_mbps
                .filter(|_| r.row.outcome != Some(Outcome::Error))
        }),
        link_mbps: med(&all, &|r| r.row.link_mbps),
        efficiency: med(&all, &|r| r.row.efficiency),
        degradation: med(&all, &|r| r.row.degradation),
        max_throttle_pct: all
            .iter()
            .filter_map(|r| r.row.throttle_pct)
            .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t)))),
        notes: notes.join("; "),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.digits$}"))
}

/// The summary as a Markdown table (also printed on the terminal).
#[must_use]
pub fn markdown_table(rows: &[SummaryRow]) -> String {
    let mut s = String::from(
        "| workload | link | policy | completed | total s | downtime ms | sent ×RAM | iterations | page rate ÷ link | guest speed | max throttle % | notes |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let sent = match (r.sent_per_ram, r.failed_sent_mib) {
            (Some(x), _) => format!("{x:.2}"),
            (None, Some(f)) if r.mem > 0 => {
                format!("({:.1} at cap)", f * 1_048_576.0 / r.mem as f64)
            }
            _ => "–".into(),
        };
        let notes: String = r
            .notes
            .chars()
            .take(90)
            .collect::<String>()
            .replace('|', "/");
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.workload,
            r.link,
            r.policy,
            r.success,
            opt(r.total_time_s, 2),
            opt(r.downtime_ms, 0),
            sent,
            opt(r.iterations, 0),
            opt(r.efficiency, 2),
            opt(r.degradation, 2),
            opt(r.max_throttle_pct, 0),
            if notes.len() < r.notes.len() {
                format!("{notes}…")
            } else {
                notes
            },
        ));
    }
    s
}

/// Replaces the block between `<!-- study:NAME:begin -->` and
/// `<!-- study:NAME:end -->` in `doc` with `body`, or appends a new block
/// (under a `### NAME` heading) if the markers are missing.
#[must_use]
pub fn replace_block(doc: &str, name: &str, body: &str) -> String {
    replace_block_by(doc, name, body, "vmigrate-study")
}

/// [`replace_block`] for a block that `generator` (a program name, said in
/// the begin marker) writes.
#[must_use]
pub fn replace_block_by(doc: &str, name: &str, body: &str, generator: &str) -> String {
    let begin = format!("<!-- study:{name}:begin (generated by {generator}; do not edit) -->");
    let begin_prefix = format!("<!-- study:{name}:begin");
    let end = format!("<!-- study:{name}:end -->");
    let block = format!("{begin}\n{body}{end}");
    if let (Some(b), Some(e)) = (doc.find(&begin_prefix), doc.find(&end)) {
        if b < e {
            return format!("{}{block}{}", &doc[..b], &doc[e + end.len()..]);
        }
    }
    let mut out = doc.trim_end().to_owned();
    out.push_str(&format!("\n\n### Study `{name}`\n\n{block}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::record::RunRow;

    fn rec(policy: &str, success: bool, t: f64) -> RunRecord {
        RunRecord {
            row: RunRow {
                workload: "w".into(),
                link: "l".into(),
                policy: policy.into(),
                mem: 1 << 30,
                success,
                outcome: Some(if success {
                    Outcome::Completed
                } else {
                    Outcome::Failed
                }),
                total_time_ms: Some(t),
                wire_bytes: Some(1 << 30),
                bytes_per_ram: Some(1.0),
                degradation: Some(0.5),
                ..RunRow::default()
            },
            report: None,
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn groups_in_study_order_and_counts_success() {
        let runs = vec![
            rec("b", true, 1000.0),
            rec("a", true, 2000.0),
            rec("a", false, 60_000.0),
            rec("a", true, 4000.0),
        ];
        let order = vec![
            ("w".into(), "l".into(), "a".into()),
            ("w".into(), "l".into(), "b".into()),
        ];
        let s = summarize(&runs, &order);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].policy.as_str(), s[0].success.as_str()), ("a", "2/3"));
        assert_eq!(s[0].total_time_s, Some(3.0));
        assert_eq!(s[0].failed_sent_mib, Some(1024.0));
        assert_eq!(s[0].degradation, Some(0.5));
        let md = markdown_table(&s);
        assert!(md.contains("| w | l | a | 2/3 | 3.00 |"), "{md}");
    }

    #[test]
    fn block_is_replaced_or_appended() {
        let doc = "# T\n\ntext\n";
        let once = replace_block(doc, "q", "table 1\n");
        assert!(once.contains("### Study `q`") && once.contains("table 1"));
        let twice = replace_block(&once, "q", "table 2\n");
        assert!(twice.contains("table 2") && !twice.contains("table 1"));
        assert_eq!(twice.matches("study:q:begin").count(), 1);
        assert!(twice.starts_with("# T\n\ntext\n"));
    }
}
