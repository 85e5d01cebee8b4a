//! QEMU's convergence rule (`migration/migration.c`: `migration_update_counters`
//! and `migration_iteration_run`).
//!
//! QEMU does not count iterations. It keeps pre-copying until what is left
//! can be sent within the downtime the user accepts, measured at the speed
//! the link has just shown. After every iteration, [`QemuPolicy`] applies:
//!
//! 1. **Bandwidth.** `bandwidth = bytes_sent / duration` of the iteration
//!    just finished, in bytes per second. *Why:* the most recent iteration
//!    is the best predictor of the speed the stop-and-copy will see (QEMU
//!    measures over its last 100 ms window for the same reason).
//! 2. **Threshold.** `threshold = bandwidth × downtime_limit` bytes: the
//!    most that can be sent while the guest is paused without exceeding the
//!    limit. It is computed exactly, in integers (`bytes_sent × limit_ns /
//!    duration_ns`, rounded down, saturating), so the comparison in rule 3
//!    has no floating-point edge.
//! 3. **Stop.** `remaining = dirtied_during × page_size`. If `remaining ≤
//!    threshold`, answer [`Decision::StopAndCopy`] with
//!    [`StopReason::DowntimeReached`] and `expected_downtime_ms = remaining /
//!    bandwidth` (0 when nothing remains); otherwise [`Decision::Continue`].
//!    *Why:* pausing now is predicted to cost no more than the limit.
//!    QEMU itself tests `!pending || pending < threshold_size`, strict; this
//!    policy stops on equality as well (the difference is one byte, and the
//!    predicted downtime then equals the limit exactly, which is still
//!    within it).
//! 4. **No iteration cap.** A guest that dirties memory faster than the link
//!    sends never converges and the policy keeps answering `Continue`.
//!    *Why:* that is QEMU's behaviour without auto-converge; capping is the
//!    job of other policies (or of raising the limit in flight with
//!    [`QemuPolicy::set_downtime_limit`]).
//! 5. **Degenerate samples.** An iteration that took zero time or sent
//!    nothing is not a bandwidth measurement; the most recent iteration of
//!    the history that is one is used instead. With no measurement at all the
//!    threshold is 0, so the policy stops only when nothing remains. *Why:*
//!    QEMU likewise keeps its previous threshold until a 100 ms window has
//!    elapsed, and starts from a threshold of 0. This never divides by
//!    zero and never puts NaN or infinity in a [`StopReason`].

use std::time::Duration;

use crate::{
    ConvergencePolicy, Decision, MigrationHistory, SettingDoc, StopReason, DEFAULT_DOWNTIME_LIMIT,
};

/// `qemu` has no settings: its only parameter, the downtime limit, comes
/// from [`PolicyParams::downtime_limit`](crate::PolicyParams::downtime_limit)
/// (`--downtime-limit`), and can be changed in flight with
/// [`ConvergencePolicy::set_downtime_limit`].
pub const SETTINGS: &[SettingDoc] = &[];

/// QEMU's rule: stop when the remaining dirty bytes fit in
/// `bandwidth × downtime_limit` (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPolicy {
    downtime_limit: Duration,
}

impl QemuPolicy {
    /// A policy that accepts pauses of up to `downtime_limit`.
    pub fn new(downtime_limit: Duration) -> Self {
        Self { downtime_limit }
    }

    /// The downtime limit currently in force.
    pub fn downtime_limit(&self) -> Duration {
        self.downtime_limit
    }

    /// Change the downtime limit; the next [`decide`](ConvergencePolicy::decide)
    /// uses the new value (QEMU's `migrate-set-parameters downtime-limit`
    /// during a migration).
    pub fn set_downtime_limit(&mut self, downtime_limit: Duration) {
        self.downtime_limit = downtime_limit;
    }

    /// Rules 1, 2 and 5: how many bytes could be sent within the downtime
    /// limit at the last measured bandwidth. 0 when no iteration of `history`
    /// measures the bandwidth.
    pub fn threshold_bytes(&self, history: &MigrationHistory) -> u64 {
        let Some(sample) = history.last_measured() else {
            return 0;
        };
        let duration_ns = sample.duration.as_nanos();
        let threshold = u128::from(sample.bytes_sent)
            .checked_mul(self.downtime_limit.as_nanos())
            .map_or(u128::MAX, |product| product / duration_ns);
        u64::try_from(threshold).unwrap_or(u64::MAX)
    }
}

impl Default for QemuPolicy {
    /// A policy with QEMU's default limit, [`DEFAULT_DOWNTIME_LIMIT`].
    fn default() -> Self {
        Self::new(DEFAULT_DOWNTIME_LIMIT)
    }
}

impl ConvergencePolicy for QemuPolicy {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let remaining = last.remaining_bytes();
        if remaining > self.threshold_bytes(history) {
            return Decision::Continue;
        }
        // remaining ≤ threshold: either nothing remains, or there is a
        // bandwidth sample (the threshold is 0 without one), whose
        // `bytes_sent` is non-zero, so this is finite and never NaN.
        let expected_downtime_ms = history
            .last_measured()
            .and_then(|sample| sample.millis_to_send(remaining))
            .unwrap_or(0.0);
        Decision::StopAndCopy(StopReason::DowntimeReached {
            expected_downtime_ms,
        })
    }

    fn set_downtime_limit(&mut self, limit: Duration) {
        QemuPolicy::set_downtime_limit(self, limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IterationStats;

    const PAGE: u64 = 4096;

    /// One iteration: `bytes_sent` in `millis` ms, leaving `dirtied` pages.
    fn it(iteration: u32, bytes_sent: u64, millis: u64, dirtied: u64) -> IterationStats {
        IterationStats {
            iteration,
            bytes_sent,
            duration: Duration::from_millis(millis),
            dirtied_during: dirtied,
            page_size: PAGE,
            ram_bytes: 1 << 30,
            ..Default::default()
        }
    }

    fn decide(limit_ms: u64, trace: Vec<IterationStats>) -> Decision {
        QemuPolicy::new(Duration::from_millis(limit_ms)).decide(&trace.into())
    }

    fn expected_ms(d: &Decision) -> Option<f64> {
        match d {
            Decision::StopAndCopy(StopReason::DowntimeReached {
                expected_downtime_ms,
            }) => Some(*expected_downtime_ms),
            _ => None,
        }
    }

    #[test]
    fn stops_exactly_when_remaining_fits() {
        // 4096 B/ms = 4,096,000 B/s; 300 ms limit → threshold 1,228,800 B
        // = exactly 300 pages.
        let bw_bytes = 4096 * 1000;
        // (limit ms, dirtied pages, expected downtime ms if it stops)
        let cases: &[(u64, u64, Option<f64>)] = &[
            (300, 0, Some(0.0)),
            (300, 1, Some(1.0)),
            (300, 299, Some(299.0)),
            (300, 300, Some(300.0)), // edge: remaining == threshold stops
            (300, 301, None),
            (300, 1_000_000, None),
            (1000, 1000, Some(1000.0)),
            (1000, 1001, None),
            (0, 0, Some(0.0)), // zero limit: only an empty dirty set stops
            (0, 1, None),
        ];
        for &(limit, dirtied, want) in cases {
            let trace = vec![
                it(0, 1 << 30, 262_144, 10_000),
                it(1, bw_bytes, 1000, dirtied),
            ];
            let got = expected_ms(&decide(limit, trace));
            assert_eq!(got, want, "limit {limit} ms, {dirtied} pages left");
        }
    }

    #[test]
    fn threshold_uses_last_iteration_bandwidth() {
        let mut p = QemuPolicy::default();
        // 1 MB in 1 s, then 2 MB in 1 s: 2 MB/s × 300 ms = 600,000 B.
        let h: MigrationHistory = vec![it(0, 1_000_000, 1000, 9), it(1, 2_000_000, 1000, 9)].into();
        assert_eq!(p.threshold_bytes(&h), 600_000);
        // 146 pages = 598,016 B ≤ 600,000; 147 pages = 602,112 B > 600,000.
        let stop = vec![it(0, 1_000_000, 1000, 9), it(1, 2_000_000, 1000, 146)];
        assert!(matches!(p.decide(&stop.into()), Decision::StopAndCopy(_)));
        let go = vec![it(0, 1_000_000, 1000, 9), it(1, 2_000_000, 1000, 147)];
        assert_eq!(p.decide(&go.into()), Decision::Continue);
    }

    #[test]
    fn never_stops_on_non_converging_trace() {
        // 100 MB/s link, guest dirties 200 MB/s: each iteration leaves twice
        // what it sent (capped at RAM), far above 30 MB per 300 ms.
        let mut p = QemuPolicy::default();
        let mut h = MigrationHistory::new();
        let ram_pages = (1u64 << 30) / PAGE;
        let mut to_send = ram_pages;
        for i in 0..1000u32 {
            let bytes = to_send * PAGE;
            let millis = bytes / 100_000; // 100 MB/s = 100,000 B/ms
            let dirtied = (to_send * 2).min(ram_pages);
            h.push(it(i, bytes, millis, dirtied));
            assert_eq!(p.decide(&h), Decision::Continue, "iteration {i}");
            to_send = dirtied;
        }
        assert_eq!(h.len(), 1000);
    }

    #[test]
    fn degenerate_samples_do_not_panic_or_nan() {
        // (trace as (bytes, ms, dirtied), stops?, expected downtime if so)
        type Trace = &'static [(u64, u64, u64)];
        let cases: &[(Trace, Option<f64>)] = &[
            // No bandwidth sample at all: stop only with nothing left.
            (&[(0, 0, 0)], Some(0.0)),
            (&[(0, 0, 1)], None),
            (&[(1 << 20, 0, 0)], Some(0.0)),
            (&[(1 << 20, 0, 1)], None),
            (&[(0, 1000, 1)], None),
            // Zero-time last iteration: fall back to the previous sample
            // (4096 B/ms, 300-page threshold).
            (&[(4096 * 1000, 1000, 5), (8192, 0, 300)], Some(300.0)),
            (&[(4096 * 1000, 1000, 5), (8192, 0, 301)], None),
            (&[(4096 * 1000, 1000, 5), (0, 10, 150)], Some(150.0)),
        ];
        for &(trace, want) in cases {
            let h: MigrationHistory = trace
                .iter()
                .zip(0..)
                .map(|(&(b, ms, d), i)| it(i, b, ms, d))
                .collect();
            let d = QemuPolicy::default().decide(&h);
            let got = expected_ms(&d);
            assert_eq!(got, want, "trace {trace:?}: {d:?}");
            match got {
                Some(ms) => assert!(ms.is_finite()),
                None => assert_eq!(d, Decision::Continue),
            }
        }
        assert_eq!(
            QemuPolicy::default().decide(&MigrationHistory::new()),
            Decision::Continue
        );
    }

    #[test]
    fn extreme_values_saturate() {
        let h: MigrationHistory = vec![it(0, u64::MAX, 1, u64::MAX)].into();
        let mut p = QemuPolicy::new(Duration::MAX);
        assert_eq!(p.threshold_bytes(&h), u64::MAX);
        let d = p.decide(&h);
        assert!(expected_ms(&d).is_some_and(f64::is_finite), "{d:?}");
    }

    /// A guest rewriting its pages' values: the dirty count never shrinks,
    /// but what must be sent does, and the rule sees that.
    #[test]
    fn unchanged_pages_count_only_by_their_changed_share() {
        // 1000 B/ms; 60,000 pages dirtied each pass = 245 MB, far above the
        // 300 ms threshold (300 KB) while every dirty page is sent...
        let full = it(0, 1000 * 1000, 1000, 60_000);
        let mut resent = it(1, 1000 * 1000, 1000, 60_000);
        resent.pages_sent = 60_000;
        assert_eq!(
            decide(300, vec![full.clone(), resent.clone()]),
            Decision::Continue
        );
        // ... and within it once they are found unchanged: one changed page
        // in 1000 leaves 60 pages, 245,760 B at this pass's 1000 B/ms.
        let mut same = resent;
        same.pages_sent = 60;
        same.unchanged_pages = 59_940;
        let d = decide(300, vec![full, same]);
        assert_eq!(expected_ms(&d), Some(245.76), "{d:?}");
    }

    #[test]
    fn raising_the_limit_in_flight() {
        let mut p = QemuPolicy::default();
        assert_eq!(p.downtime_limit(), DEFAULT_DOWNTIME_LIMIT);
        assert_eq!(p.name(), "qemu");
        // 4096 B/ms, 600 pages left: needs a 600 ms limit.
        let h: MigrationHistory = vec![it(0, 4096 * 1000, 1000, 600)].into();
        assert_eq!(p.decide(&h), Decision::Continue);
        p.set_downtime_limit(Duration::from_millis(600));
        assert_eq!(p.downtime_limit(), Duration::from_millis(600));
        assert_eq!(expected_ms(&p.decide(&h)), Some(600.0));
    }
}
