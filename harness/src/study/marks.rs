//! Guest speed from the COM1 progress marks.
//!
//! The workloads print one mark byte per pass (`.`), so the mark rate is
//! how fast the guest gets work done. A migration slows a guest down (dirty
//! tracking faults, a throttle, the pause itself); the study reports that as
//! `degradation = rate during the migration ÷ rate before it` (1.0: no
//! slowdown, 0.5: half speed).
//!
//! **Method.** [`MarkWatch`] reads the source's and the destination's serial
//! files every ~20 ms and timestamps each new mark when it is seen. The
//! source prints until it is paused for good, then the destination carries
//! on, so the marks of both files, in time order, are one progress count
//! `P(t)`: `P = 0` at the boot mark, `P = k` at the k-th pass mark, linear in
//! between. The rate over a window `[a, b]` is `(P(b) − P(a)) / (b − a)`.
//! Interpolating inside a pass assumes the guest runs at an even speed
//! within that pass, so long passes (a 1 GiB sweep pass takes about a
//! second here) are not rounded to whole passes. `P(b)` needs a mark after
//! `b`: the runner keeps watching after the migration ends, up to three
//! times the longest gap between marks seen during the warm-up (at most
//! 10 s); if none comes, the count stops at the last mark (a lower bound,
//! flagged).
//!
//! **Resolution.** Each timestamp is late by up to one poll interval
//! (20 ms) plus the file write; over a window of `w` seconds the rate is
//! thus good to about `±0.02 / w` passes/s at each end, plus the error of
//! the even-speed assumption within the first and last pass.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Instant;

use crate::workload::BOOT_MARK;

/// How often the serial files are read.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Timestamps (seconds since the watch began) of the marks seen so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MarkTimes {
    /// When the boot mark appeared on the source, if it did.
    pub boot: Option<f64>,
    /// Pass marks, both sides merged, in time order.
    pub passes: Vec<f64>,
}

/// Reads growing serial files and timestamps the marks in them.
pub struct MarkWatch {
    start: Instant,
    mark: u8,
    sides: Vec<Side>,
    times: MarkTimes,
}

struct Side {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
}

impl MarkWatch {
    /// Watches the given serial files (source first) for `mark`.
    #[must_use]
    pub fn new(start: Instant, mark: u8, paths: &[PathBuf]) -> Self {
        let sides = paths
            .iter()
            .map(|p| Side {
                path: p.clone(),
                file: None,
                offset: 0,
            })
            .collect();
        Self {
            start,
            mark,
            sides,
            times: MarkTimes::default(),
        }
    }

    /// Seconds since the watch's start instant.
    #[must_use]
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Reads whatever was appended since the last poll and timestamps it.
    /// A file that does not exist yet is simply skipped.
    pub fn poll(&mut self) {
        let t = self.now();
        let mut buf = [0u8; 8192];
        for side in &mut self.sides {
            if side.file.is_none() {
                side.file = File::open(&side.path).ok();
            }
            let Some(f) = side.file.as_mut() else {
                continue;
            };
            if f.seek(SeekFrom::Start(side.offset)).is_err() {
                continue;
            }
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                side.offset += n as u64;
                for &b in &buf[..n] {
                    if b == self.mark {
                        self.times.passes.push(t);
                    } else if b == BOOT_MARK && self.times.boot.is_none() {
                        self.times.boot = Some(t);
                    }
                }
            }
        }
    }

    /// The marks seen so far.
    #[must_use]
    pub fn times(&self) -> &MarkTimes {
        &self.times
    }

    /// Pass marks seen after time `t`.
    #[must_use]
    pub fn passes_after(&self, t: f64) -> usize {
        self.times.passes.iter().filter(|&&p| p > t).count()
    }
}

/// `P(t)`: passes done at time `t`, interpolated (see the module docs).
/// `None` before the boot mark. The second value is false when `t` is past
/// the last mark (the count is then a lower bound).
#[must_use]
pub fn progress_at(times: &MarkTimes, t: f64) -> Option<(f64, bool)> {
    let boot = times.boot?;
    if t < boot {
        return None;
    }
    // Points (time, count): the boot mark at 0, then each pass mark.
    let mut prev = (boot, 0.0_f64);
    for (k, &pt) in times.passes.iter().enumerate() {
        let pt = pt.max(prev.0);
        let point = (pt, (k + 1) as f64);
        if t <= pt {
            let span = pt - prev.0;
            let frac = if span > 0.0 { (t - prev.0) / span } else { 1.0 };
            return Some((prev.1 + frac, true));
        }
        prev = point;
    }
    Some((prev.1, false))
}

/// Pass rate over `[a, b]` (passes per second) and whether it is exact in
/// the sense of [`progress_at`] (false: a lower bound).
#[must_use]
pub fn rate_between(times: &MarkTimes, a: f64, b: f64) -> Option<(f64, bool)> {
    if b <= a {
        return None;
    }
    let (pa, _) = progress_at(times, a)?;
    let (pb, exact) = progress_at(times, b)?;
    Some(((pb - pa) / (b - a), exact))
}

/// Where the "before" window starts: the first pass mark, so that the
/// first pass (which also pays for the host allocating guest memory) is
/// left out, unless that leaves no window before `send_start`.
#[must_use]
pub fn before_window_start(times: &MarkTimes, send_start: f64) -> Option<f64> {
    let boot = times.boot?;
    match times.passes.first() {
        Some(&first)
            if first < send_start && times.passes.get(1).is_some_and(|&s| s < send_start) =>
        {
            Some(first)
        }
        _ => Some(boot),
    }
}

/// The longest time between consecutive marks (boot mark included) seen
/// before `until`: how long one may have to wait for the next mark.
#[must_use]
pub fn longest_gap(times: &MarkTimes, until: f64) -> Option<f64> {
    let mut prev = times.boot?;
    let mut gap: Option<f64> = None;
    for &t in times.passes.iter().take_while(|&&t| t <= until) {
        gap = Some(gap.map_or(t - prev, |g| g.max(t - prev)));
        prev = t;
    }
    gap
}

/// Speeds before and during a migration that ran over `[send_start, end]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speeds {
    /// Passes per second in the warm-up window.
    pub before: Option<f64>,
    /// Passes per second from `send` start to the migration's end.
    pub during: Option<f64>,
    /// `during / before`.
    pub degradation: Option<f64>,
    /// False when a window's end lay past the last mark (lower bound).
    pub exact: bool,
}

/// Computes [`Speeds`] from the marks.
#[must_use]
pub fn speeds(times: &MarkTimes, send_start: f64, end: f64) -> Speeds {
    let before =
        before_window_start(times, send_start).and_then(|a| rate_between(times, a, send_start));
    let during = rate_between(times, send_start, end);
    let degradation = match (before, during) {
        (Some((b, _)), Some((d, _))) if b > 0.0 => Some(d / b),
        _ => None,
    };
    Speeds {
        before: before.map(|r| r.0),
        during: during.map(|r| r.0),
        degradation,
        exact: before.is_none_or(|r| r.1) && during.is_none_or(|r| r.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(boot: f64, passes: &[f64]) -> MarkTimes {
        MarkTimes {
            boot: Some(boot),
            passes: passes.to_vec(),
        }
    }

    #[test]
    fn interpolates_within_passes() {
        let t = times(1.0, &[2.0, 3.0, 4.0]);
        assert_eq!(progress_at(&t, 0.5), None);
        assert_eq!(progress_at(&t, 1.0), Some((0.0, true)));
        assert_eq!(progress_at(&t, 2.5), Some((1.5, true)));
        assert_eq!(progress_at(&t, 4.0), Some((3.0, true)));
        assert_eq!(progress_at(&t, 9.0), Some((3.0, false)));
        assert_eq!(rate_between(&t, 2.0, 4.0), Some((1.0, true)));
        assert_eq!(longest_gap(&times(0.0, &[0.5, 2.5, 3.0]), 9.0), Some(2.0));
        assert_eq!(longest_gap(&times(0.0, &[0.5, 2.5, 3.0]), 1.0), Some(0.5));
    }

    #[test]
    fn degradation_of_a_guest_at_half_speed() {
        // 10 passes/s for 2 s, then 5 passes/s.
        let mut p: Vec<f64> = (1..=20).map(|k| f64::from(k) * 0.1).collect();
        p.extend((1..=20).map(|k| 2.0 + f64::from(k) * 0.2));
        let t = times(0.0, &p);
        let s = speeds(&t, 2.0, 5.0);
        assert!((s.before.unwrap() - 10.0).abs() < 1e-9, "{s:?}");
        assert!((s.during.unwrap() - 5.0).abs() < 1e-9, "{s:?}");
        assert!((s.degradation.unwrap() - 0.5).abs() < 1e-9);
        assert!(s.exact);
    }

    #[test]
    fn a_stalled_guest_gives_a_flagged_lower_bound() {
        let t = times(0.0, &[1.0, 2.0, 3.0]);
        let s = speeds(&t, 3.0, 6.0);
        assert_eq!(s.during, Some(0.0));
        assert!(!s.exact);
    }

    #[test]
    fn watch_reads_appended_bytes() {
        let dir = std::env::temp_dir().join(format!("marks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let mut w = MarkWatch::new(Instant::now(), b'.', &[a.clone(), b.clone()]);
        w.poll();
        std::fs::write(&a, b"B..").unwrap();
        w.poll();
        std::fs::write(&b, b".").unwrap();
        std::fs::write(&a, b"B...").unwrap();
        w.poll();
        assert!(w.times().boot.is_some());
        assert_eq!(w.times().passes.len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
