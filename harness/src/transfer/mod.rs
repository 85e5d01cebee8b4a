//! The transfer benchmark: how close the page path comes to the wire.
//!
//! One run, for each repetition in turn (interleaved, so every system sees
//! the same machine load): a plain TCP stream between two processes over
//! loopback (`tcp-baseline`), then vmigrate migrating a halted guest whose
//! RAM above 1 MiB holds pseudo-random bytes (`halt:fill=random`: the
//! vCPU is parked, so the engine has both cores as the TCP stream has, and
//! zstd gains nothing, so the path is measured, not the compressor; an
//! `idle` guest would spin one core away in its emulated loop), once per
//! channel count asked for,
//! then QEMU migrating a guest of the same size with the same amount of
//! pseudo-random content placed by `-device loader` (1 channel, and multifd
//! with the channel counts asked for), when QEMU is installed.
//!
//! Every rate is page bytes ÷ total migration time, the same formula for
//! both systems (QEMU's `ram.mbps` is a bandwidth estimate of the last
//! pass, vmigrate's `ram.page-mbps` counts only the time spent iterating);
//! vmigrate's own `page-mbps` is recorded beside it. Ratios are taken
//! against the TCP stream of the same repetition.

mod qemu;
pub mod vmigrate;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use qemu::qemu_version;

/// What the benchmark runs.
#[derive(Debug, Clone)]
pub struct TransferConfig {
    /// Guest RAM (e.g. `2G`); everything above 1 MiB is pseudo-random.
    pub mem: String,
    /// Repetitions of the whole set.
    pub reps: u32,
    /// vmigrate channel counts to run (1 is the plain stream).
    pub channels: Vec<u32>,
    /// vmigrate variants to run at each channel count.
    pub variants: Vec<Variant>,
    /// Also run the memory-to-memory TCP stream (`tcp-baseline --memory`).
    pub tcp_memory: bool,
    /// QEMU multifd channel counts (1 runs without multifd).
    pub qemu_channels: Vec<u32>,
    /// Seconds of the plain TCP stream.
    pub tcp_seconds: f64,
    /// Migrations not completed within this many seconds count as failed.
    pub time_cap_s: f64,
}

/// How vmigrate is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The defaults: raw pages straight from guest memory (`CheckedPages`),
    /// destination RAM allocated as pages arrive.
    Direct,
    /// `send --copy-pages`: every page copied out of guest memory first.
    CopyPages,
    /// Destination started with `--mem SIZE --prefault`: its RAM is
    /// allocated before it listens.
    Prefault,
}

impl Variant {
    /// The `system` column of its rows.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "vmigrate",
            Self::CopyPages => "vmigrate --copy-pages",
            Self::Prefault => "vmigrate, dest --prefault",
        }
    }

    /// From the command-line name (`direct`, `copy-pages`, `prefault`).
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "direct" => Some(Self::Direct),
            "copy-pages" => Some(Self::CopyPages),
            "prefault" => Some(Self::Prefault),
            _ => None,
        }
    }
}

/// Programs the benchmark starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `vmigrate`.
    pub vmigrate: PathBuf,
    /// `tcp-baseline`.
    pub tcp_baseline: PathBuf,
    /// `qemu-system-x86_64`, if installed.
    pub qemu: Option<String>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct TransferRun {
    /// Repetition (0-based).
    pub rep: u32,
    /// `tcp`, `vmigrate` or `qemu X.Y`.
    pub system: String,
    /// Channels (connections) used.
    pub channels: u32,
    /// `completed`, or what happened instead.
    pub status: String,
    /// Total time, ms.
    pub total_ms: Option<f64>,
    /// Downtime, ms.
    pub downtime_ms: Option<f64>,
    /// Page data sent (bytes, before any compression).
    pub page_bytes: Option<u64>,
    /// Bytes on the wire.
    pub wire_bytes: Option<u64>,
    /// Page bytes × 8 ÷ total time (for `tcp`: the stream's rate), Mbit/s.
    pub rate_mbps: Option<f64>,
    /// vmigrate's `ram.page-mbps` (time spent iterating only).
    pub engine_page_mbps: Option<f64>,
    /// `rate_mbps` ÷ the TCP stream of the same repetition.
    pub of_tcp: Option<f64>,
    /// `rate_mbps` ÷ the memory-to-memory TCP stream of the same repetition.
    pub of_tcp_memory: Option<f64>,
    /// Why it failed, or a caveat.
    pub note: Option<String>,
}

impl TransferRun {
    fn new(rep: u32, system: &str, channels: u32) -> Self {
        Self {
            rep,
            system: system.to_owned(),
            channels,
            status: String::new(),
            total_ms: None,
            downtime_ms: None,
            page_bytes: None,
            wire_bytes: None,
            rate_mbps: None,
            engine_page_mbps: None,
            of_tcp: None,
            of_tcp_memory: None,
            note: None,
        }
    }

    fn failed(mut self, why: impl ToString) -> Self {
        if self.status.is_empty() {
            self.status = "error".into();
        }
        self.note = Some(why.to_string());
        self
    }

    /// Fills the figures from a `query-migrate`-style report (vmigrate's
    /// JSON report and QEMU's answer share the field names).
    fn with_report(mut self, r: &serde_json::Value) -> Self {
        let f = |path: &[&str]| {
            path.iter()
                .try_fold(r, |v, k| v.get(*k))
                .and_then(serde_json::Value::as_f64)
        };
        let u = |path: &[&str]| {
            path.iter()
                .try_fold(r, |v, k| v.get(*k))
                .and_then(serde_json::Value::as_u64)
        };
        self.status = r
            .get("status")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_owned();
        self.total_ms = f(&["total-time"]);
        self.downtime_ms = f(&["downtime"]);
        self.page_bytes = u(&["ram", "normal-bytes"]);
        self.wire_bytes = u(&["ram", "transferred"]);
        self.engine_page_mbps = f(&["ram", "page-mbps"]);
        self.rate_mbps = match (self.page_bytes, self.total_ms) {
            (Some(b), Some(t)) if t > 0.0 => Some(b as f64 * 8.0 / (t * 1000.0)),
            _ => None,
        };
        self
    }
}

/// The benchmark could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The work directory could not be made.
    #[error("cannot create {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Ctrl-C.
    #[error("stopped")]
    Stopped,
}

/// Runs every repetition; a failed measurement is a row, not an error.
///
/// # Errors
/// [`TransferError`] when the work directory cannot be made or a stop was
/// requested.
pub fn run(
    cfg: &TransferConfig,
    bins: &Binaries,
    work: &Path,
    stop: &crate::study::procs::Stop,
    mut progress: impl FnMut(&TransferRun),
) -> Result<Vec<TransferRun>, TransferError> {
    let mut runs = Vec::new();
    let qemu_version = bins.qemu.as_deref().and_then(qemu_version);
    for rep in 0..cfg.reps {
        let dir = work.join(format!("rep{rep}"));
        std::fs::create_dir_all(&dir).map_err(|source| TransferError::WorkDir {
            path: dir.clone(),
            source,
        })?;
        let mut these = Vec::new();
        these.push(tcp_row(cfg, bins, &dir, stop, rep, "tcp", &[]));
        if cfg.tcp_memory {
            check(stop)?;
            let extra = ["--memory".to_owned(), cfg.mem.clone()];
            these.push(tcp_row(cfg, bins, &dir, stop, rep, TCP_MEMORY, &extra));
        }
        for &n in &cfg.channels {
            for &v in &cfg.variants {
                check(stop)?;
                these.push(vmigrate::migrate(cfg, bins, &dir, rep, n, v, stop));
            }
        }
        for &n in &cfg.qemu_channels {
            check(stop)?;
            let run = match (&bins.qemu, &qemu_version) {
                (Some(q), Some(v)) => qemu::migrate(cfg, bins, q, v, &dir, rep, n, stop),
                _ => TransferRun::new(rep, "qemu", n).failed("qemu-system-x86_64 not installed"),
            };
            these.push(run);
        }
        let tcp_rate = these[0].rate_mbps;
        let memory_rate = these
            .iter()
            .find(|r| r.system == TCP_MEMORY)
            .and_then(|r| r.rate_mbps);
        for r in &mut these {
            if let (Some(x), Some(t)) = (r.rate_mbps, tcp_rate) {
                r.of_tcp = Some(x / t);
            }
            if let (Some(x), Some(t)) = (r.rate_mbps, memory_rate) {
                r.of_tcp_memory = Some(x / t);
            }
            progress(r);
        }
        runs.extend(these);
    }
    Ok(runs)
}

/// One plain TCP stream over loopback (`tcp-baseline` with `extra`).
fn tcp_row(
    cfg: &TransferConfig,
    bins: &Binaries,
    dir: &Path,
    stop: &crate::study::procs::Stop,
    rep: u32,
    system: &str,
    extra: &[String],
) -> TransferRun {
    let row = TransferRun::new(rep, system, 1);
    match crate::study::baseline::measure_with(
        &bins.tcp_baseline,
        &[],
        "127.0.0.1",
        cfg.tcp_seconds,
        dir,
        stop,
        extra,
    ) {
        Ok(mbps) => TransferRun {
            status: "completed".into(),
            rate_mbps: Some(mbps),
            ..row
        },
        Err(e) => row.failed(e),
    }
}

/// The `system` of the memory-to-memory TCP rows.
pub const TCP_MEMORY: &str = "tcp, memory to memory";

fn check(stop: &crate::study::procs::Stop) -> Result<(), TransferError> {
    if stop.requested() {
        Err(TransferError::Stopped)
    } else {
        Ok(())
    }
}

/// Median of the present values.
fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.retain(|x| x.is_finite());
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

/// The table of medians over repetitions, one row per system and channel
/// count, in the order first seen.
#[must_use]
pub fn markdown_table(cfg: &TransferConfig, runs: &[TransferRun]) -> String {
    let mut keys: Vec<(String, u32)> = Vec::new();
    for r in runs {
        if !keys.contains(&(r.system.clone(), r.channels)) {
            keys.push((r.system.clone(), r.channels));
        }
    }
    let mut s = format!(
        "Guest {} (all RAM above 1 MiB pseudo-random), loopback TCP, medians of {} \
         interleaved repetitions; rate = page bytes ÷ total time.\n\n\
         | system | channels | completed | rate (Mbit/s) | of TCP | of TCP memory to memory | total (ms) | downtime (ms) | page data | engine page-mbps |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        cfg.mem, cfg.reps
    );
    let fmt = |x: Option<f64>, d: usize| x.map_or_else(|| "—".to_owned(), |v| format!("{v:.d$}"));
    for (system, ch) in keys {
        let group: Vec<&TransferRun> = runs
            .iter()
            .filter(|r| r.system == system && r.channels == ch)
            .collect();
        let done = group.iter().filter(|r| r.status == "completed").count();
        let med = |f: fn(&TransferRun) -> Option<f64>| {
            median(
                group
                    .iter()
                    .filter(|r| r.status == "completed")
                    .filter_map(|r| f(r))
                    .collect(),
            )
        };
        let bytes = med(|r| r.page_bytes.map(|b| b as f64));
        let note = group
            .iter()
            .find_map(|r| r.note.clone())
            .filter(|_| done < group.len())
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        s.push_str(&format!(
            "| {system}{note} | {ch} | {done}/{} | {} | {} | {} | {} | {} | {} | {} |\n",
            group.len(),
            fmt(med(|r| r.rate_mbps), 0),
            med(|r| r.of_tcp).map_or_else(|| "—".into(), |v| format!("{:.0}%", v * 100.0)),
            med(|r| r.of_tcp_memory).map_or_else(|| "—".into(), |v| format!("{:.0}%", v * 100.0)),
            fmt(med(|r| r.total_ms), 0),
            fmt(med(|r| r.downtime_ms), 1),
            bytes.map_or_else(|| "—".into(), |b| format!("{:.0} MiB", b / 1_048_576.0)),
            fmt(med(|r| r.engine_page_mbps), 0),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_page_bytes_over_total_time() {
        let r = TransferRun::new(0, "qemu 7.2", 1).with_report(&serde_json::json!({
            "status": "completed", "total-time": 1000.0, "downtime": 6.0,
            "ram": {"normal-bytes": 125_000_000u64, "transferred": 126_000_000u64}
        }));
        assert_eq!(r.status, "completed");
        assert!((r.rate_mbps.unwrap() - 1000.0).abs() < 1e-9);
        assert_eq!(r.engine_page_mbps, None);
    }

    #[test]
    fn table_takes_medians_of_completed_runs_only() {
        let cfg = TransferConfig {
            mem: "2G".into(),
            reps: 3,
            channels: vec![1],
            variants: vec![Variant::Direct],
            tcp_memory: false,
            qemu_channels: vec![],
            tcp_seconds: 1.0,
            time_cap_s: 60.0,
        };
        let mut runs = Vec::new();
        for (rep, rate) in [(0, 10.0), (1, 30.0), (2, 20.0)] {
            let mut r = TransferRun::new(rep, "vmigrate", 1);
            r.status = "completed".into();
            r.rate_mbps = Some(rate);
            r.of_tcp = Some(rate / 40.0);
            runs.push(r);
        }
        runs.push(TransferRun::new(3, "vmigrate", 1).failed("boom"));
        let t = markdown_table(&cfg, &runs);
        let row = t.lines().find(|l| l.starts_with("| vmigrate")).unwrap();
        assert!(row.contains("| 3/4 | 20 | 50% | — |"), "{row}");
        assert!(row.contains("(boom)"), "{row}");
    }
}
