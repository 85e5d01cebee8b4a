//! Cost against size: idle and `sweep` guests from 256 MiB to 8 GiB, each
//! migrated over loopback between two fresh vmigrate processes.
//!
//! What it shows: an idle guest's cost does not grow with its size (what
//! was never written is sent as ranges without being read; the final copy
//! holds only what was dirtied), a sweeping guest's grows with it (every
//! page is dirtied every pass); and what the engine itself keeps resident
//! beyond guest RAM on both sides (mappings of at most 64 MiB; guest RAM
//! is mapped in larger slots), as a share of guest RAM.
//! Sizes run interleaved in each repetition, so all see the same load.

mod plot;

use std::path::Path;

use serde::Serialize;

pub use plot::write_plot;

use crate::study::procs::Stop;
use crate::transfer::vmigrate::{run_migration, Migration, Resident};
use crate::transfer::Binaries;

/// One workload of the benchmark and the policy it is migrated with.
#[derive(Debug, Clone)]
pub struct ScaleWorkload {
    /// Workload spec.
    pub workload: String,
    /// Policy.
    pub policy: String,
}

/// What the benchmark runs.
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    /// Guest sizes (`256M`, `1G`, …).
    pub sizes: Vec<String>,
    /// Workloads.
    pub workloads: Vec<ScaleWorkload>,
    /// Repetitions.
    pub reps: u32,
    /// Seconds before a migration counts as failed.
    pub time_cap_s: f64,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRun {
    /// Repetition.
    pub rep: u32,
    /// Workload spec.
    pub workload: String,
    /// Policy.
    pub policy: String,
    /// Guest RAM as given.
    pub mem: String,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// `completed`, or what happened instead.
    pub status: String,
    /// Total time, ms.
    pub total_ms: Option<f64>,
    /// Downtime, ms.
    pub downtime_ms: Option<f64>,
    /// Bytes on the wire.
    pub wire_bytes: Option<u64>,
    /// Iterations (the final copy included).
    pub iterations: Option<u64>,
    /// Source before the migration.
    pub source: Option<Resident>,
    /// Destination after it.
    pub destination: Option<Resident>,
    /// The larger side's engine memory ÷ guest RAM.
    pub engine_share: Option<f64>,
    /// Why it failed.
    pub note: Option<String>,
}

/// Runs every size × workload, `reps` times; a failure is a row.
///
/// # Errors
/// Only when the work directory cannot be made.
pub fn run(
    cfg: &ScaleConfig,
    bins: &Binaries,
    work: &Path,
    stop: &Stop,
    mut progress: impl FnMut(&ScaleRun),
) -> std::io::Result<Vec<ScaleRun>> {
    std::fs::create_dir_all(work)?;
    let mut runs = Vec::new();
    for rep in 0..cfg.reps {
        for w in &cfg.workloads {
            for mem in &cfg.sizes {
                if stop.requested() {
                    return Ok(runs);
                }
                let r = one(cfg, bins, work, rep, w, mem, stop);
                progress(&r);
                runs.push(r);
            }
        }
    }
    Ok(runs)
}

fn one(
    cfg: &ScaleConfig,
    bins: &Binaries,
    work: &Path,
    rep: u32,
    w: &ScaleWorkload,
    mem: &str,
    stop: &Stop,
) -> ScaleRun {
    let mem_bytes = crate::parse_size(mem).unwrap_or(0);
    let mut row = ScaleRun {
        rep,
        workload: w.workload.clone(),
        policy: w.policy.clone(),
        mem: mem.to_owned(),
        mem_bytes,
        status: "error".into(),
        total_ms: None,
        downtime_ms: None,
        wire_bytes: None,
        iterations: None,
        source: None,
        destination: None,
        engine_share: None,
        note: None,
    };
    let m = Migration {
        tag: format!("r{rep}-{}-{mem}", w.workload.replace([':', '=', ','], "_")),
        workload: &w.workload,
        mem,
        policy: &w.policy,
        send_args: Vec::new(),
        dst_args: Vec::new(),
        time_cap_s: cfg.time_cap_s,
        // Every page written once before the migration starts (idle prints
        // no pass mark).
        warm_passes: usize::from(!w.workload.starts_with("idle")),
    };
    match run_migration(bins, work, &m, stop) {
        Ok(done) => {
            let r = &done.report;
            row.status = r
                .get("status")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?")
                .to_owned();
            row.total_ms = r.get("total-time").and_then(serde_json::Value::as_f64);
            row.downtime_ms = r.get("downtime").and_then(serde_json::Value::as_f64);
            row.wire_bytes = r
                .pointer("/ram/transferred")
                .and_then(serde_json::Value::as_u64);
            row.iterations = r
                .get("iterations")
                .and_then(serde_json::Value::as_array)
                .map(|a| a.len() as u64);
            row.source = done.source;
            row.destination = done.destination;
            let engine = [done.source, done.destination]
                .iter()
                .flatten()
                .map(|x| x.engine_kib)
                .max();
            row.engine_share = engine
                .filter(|_| mem_bytes > 0)
                .map(|k| k as f64 * 1024.0 / mem_bytes as f64);
            if row.status != "completed" {
                row.note = r
                    .get("error")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned);
            }
        }
        Err(e) => row.note = Some(e),
    }
    row
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

/// Medians of the completed runs of one workload and size.
#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    /// Workload spec.
    pub workload: String,
    /// Policy.
    pub policy: String,
    /// Guest RAM as given.
    pub mem: String,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// Completed runs / runs.
    pub completed: usize,
    /// Runs.
    pub runs: usize,
    /// Total time, s.
    pub total_s: Option<f64>,
    /// Downtime, ms.
    pub downtime_ms: Option<f64>,
    /// Wire bytes, GiB.
    pub wire_gib: Option<f64>,
    /// Engine memory beyond guest RAM (larger side), MiB.
    pub engine_mib: Option<f64>,
    /// Of guest RAM.
    pub engine_share: Option<f64>,
}

/// Groups runs by workload and size, in the order first seen.
#[must_use]
pub fn points(runs: &[ScaleRun]) -> Vec<ScalePoint> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in runs {
        let k = (r.workload.clone(), r.mem.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(workload, mem)| {
            let group: Vec<&ScaleRun> = runs
                .iter()
                .filter(|r| r.workload == workload && r.mem == mem)
                .collect();
            let done: Vec<&&ScaleRun> = group.iter().filter(|r| r.status == "completed").collect();
            let med = |f: &dyn Fn(&ScaleRun) -> Option<f64>| {
                median(done.iter().filter_map(|r| f(r)).collect())
            };
            let engine = |r: &ScaleRun| {
                [r.source, r.destination]
                    .iter()
                    .flatten()
                    .map(|x| x.engine_kib as f64 / 1024.0)
                    .reduce(f64::max)
            };
            ScalePoint {
                policy: group[0].policy.clone(),
                mem_bytes: group[0].mem_bytes,
                completed: done.len(),
                runs: group.len(),
                total_s: med(&|r| r.total_ms.map(|t| t / 1000.0)),
                downtime_ms: med(&|r| r.downtime_ms),
                wire_gib: med(&|r| r.wire_bytes.map(|b| b as f64 / f64::from(1u32 << 30))),
                engine_mib: med(&engine),
                engine_share: med(&|r| r.engine_share),
                workload,
                mem,
            }
        })
        .collect()
}

/// The table of [`points`].
#[must_use]
pub fn markdown_table(cfg: &ScaleConfig, points: &[ScalePoint]) -> String {
    let mut s = format!(
        "Loopback TCP, medians of {} repetition(s); engine memory = resident memory outside \
         guest-RAM mappings, the larger of source (before) and destination (after).\n\n\
         | workload | policy | guest | completed | total (s) | downtime (ms) | sent (GiB) | engine memory (MiB) | of guest RAM |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        cfg.reps
    );
    let fmt = |x: Option<f64>, d: usize| x.map_or_else(|| "—".to_owned(), |v| format!("{v:.d$}"));
    for p in points {
        s.push_str(&format!(
            "| {} | {} | {} | {}/{} | {} | {} | {} | {} | {} |\n",
            p.workload,
            p.policy,
            p.mem,
            p.completed,
            p.runs,
            fmt(p.total_s, 3),
            fmt(p.downtime_ms, 2),
            fmt(p.wire_gib, 3),
            fmt(p.engine_mib, 1),
            p.engine_share
                .map_or_else(|| "—".into(), |v| format!("{:.2}%", v * 100.0)),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_take_medians_per_workload_and_size() {
        let mk = |rep, mem: &str, t| ScaleRun {
            rep,
            workload: "idle".into(),
            policy: "qemu".into(),
            mem: mem.into(),
            mem_bytes: crate::parse_size(mem).unwrap(),
            status: "completed".into(),
            total_ms: Some(t),
            downtime_ms: Some(1.0),
            wire_bytes: Some(1 << 30),
            iterations: Some(2),
            source: Some(Resident {
                total_kib: 10_000,
                engine_kib: 4096,
            }),
            destination: None,
            engine_share: Some(0.01),
            note: None,
        };
        let runs = vec![mk(0, "1G", 10.0), mk(1, "1G", 30.0), mk(0, "2G", 5.0)];
        let p = points(&runs);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].total_s, Some(0.02));
        assert_eq!(p[0].engine_mib, Some(4.0));
        assert_eq!((p[0].completed, p[0].runs), (2, 2));
        assert!(markdown_table(
            &ScaleConfig {
                sizes: vec![],
                workloads: vec![],
                reps: 2,
                time_cap_s: 1.0
            },
            &p
        )
        .contains("| idle | qemu | 2G | 1/1 | 0.005 |"));
    }
}
