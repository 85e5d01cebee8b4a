//! Per-iteration statistics and the history a policy decides from.
//!
//! Every derived quantity here is total: zero durations, zero page sizes and
//! huge counters give a defined, non-NaN answer and never panic, because the
//! values end up in reports and in policies that must not crash a migration.

use std::time::Duration;

/// What happened in one pre-copy iteration. Iteration 0 is the full copy.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IterationStats {
    /// Iteration number, 0 for the full copy.
    pub iteration: u32,
    /// Pages found dirty at the sync that started this iteration (for
    /// iteration 0: every page of guest RAM).
    pub dirty_pages: u64,
    /// Pages sent with their data (not zero ranges).
    pub pages_sent: u64,
    /// Pages sent as zero ranges, without data.
    pub zero_pages: u64,
    /// Bytes written to the stream in this iteration (headers included).
    pub bytes_sent: u64,
    /// Wall time of the iteration, from the dirty-log sync to the end marker.
    pub duration: Duration,
    /// Pages the guest dirtied while this iteration was sent: the dirty
    /// count found at the next sync (what the next iteration must send).
    pub dirtied_during: u64,
    /// Of `dirty_pages`, how many were also dirty in the previous iteration
    /// (the writable working set); 0 for iteration 0.
    pub redirtied_pages: u64,
    /// Pages held back for the final copy (the writable working set left
    /// out of pre-copy, see [`ConvergencePolicy::defer_writable_working_set`](crate::ConvergencePolicy::defer_writable_working_set))
    /// that are not already counted in `dirtied_during`.
    pub deferred_pages: u64,
    /// Fraction of time the vCPUs were held off during this iteration
    /// (0.0 = unthrottled, 0.99 = ran 1% of the time).
    pub throttle: f64,
    /// Total guest RAM in bytes.
    pub ram_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// The engine samples the dirty log every [`DIRTY_WINDOW`] while an
    /// iteration is sent: the distinct pages dirtied within each whole
    /// window, in order. They show a guest whose dirty rate changes inside
    /// an iteration (a quiet phase and a storm) where the iteration's total
    /// cannot. Empty when the iteration was shorter than one window or the
    /// engine did not sample.
    pub dirty_windows: Vec<u64>,
    /// Dirty-ring entries harvested from each vCPU's ring during this
    /// iteration, in vCPU index order: which vCPU dirtied how much, the
    /// input of the `dirty-limit` policy. Empty when the VM tracks with the
    /// bitmap, which cannot attribute a page to a vCPU. Under `kvm_pvm`
    /// (our hosts) every emulated store is logged as an entry, so this
    /// counts stores, not distinct pages: a vCPU rewriting one page 1000
    /// times counts 1000 (real KVM logs a page once per write-protection
    /// cycle).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_dirty_pages: Vec<u64>,
    /// The throttle each vCPU ran under during this iteration (index
    /// order), when the engine set them one by one (`dirty-limit`); empty
    /// when all vCPUs shared [`throttle`](Self::throttle).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_throttles: Vec<f64>,
    /// Dirty pages not sent because their content was the same as the copy
    /// the destination already holds (`send --skip-unchanged`): a guest
    /// that rewrites what a page holds dirties it without changing it.
    /// Neither in `pages_sent` nor in `zero_pages`; 0 without the option.
    #[serde(default)]
    pub unchanged_pages: u64,
}

/// Length of the windows behind [`IterationStats::window_dirty_min`]: long
/// enough that a guest rewriting a small set touches all of it in one
/// window, short enough for several windows per iteration on a slow link.
pub const DIRTY_WINDOW: Duration = Duration::from_millis(100);

impl IterationStats {
    /// Bytes sent per second during this iteration.
    ///
    /// A zero-length iteration gives `0.0` if nothing was sent and
    /// `f64::INFINITY` otherwise (never NaN); see
    /// [`measures_bandwidth`](Self::measures_bandwidth) to tell whether the
    /// value is a real measurement.
    pub fn transfer_rate(&self) -> f64 {
        rate(self.bytes_sent as f64, self.duration)
    }

    /// Bytes the guest dirtied per second during this iteration.
    ///
    /// Same zero-duration convention as [`transfer_rate`](Self::transfer_rate).
    pub fn dirty_rate(&self) -> f64 {
        rate(
            self.dirtied_during.saturating_mul(self.page_size) as f64,
            self.duration,
        )
    }

    /// Bytes a stop-and-copy would send now: the pages dirtied during this
    /// iteration plus the deferred ones (`(dirtied_during + deferred_pages)
    /// * page_size`, saturating), of which as large a share as this
    /// iteration had to send of the pages it dealt with
    /// ([`pages_handled`](Self::pages_handled)), rounded up: with
    /// `unchanged_pages` 0, all of them.
    ///
    /// Why scaled: a guest rewriting the values its pages hold dirties every
    /// page and changes none, so the count alone would never shrink and no
    /// downtime rule would ever stop; the share of this iteration is the
    /// best guess at the next one's. Divided by this iteration's
    /// `bytes_sent ÷ duration`, the result is the time to handle the
    /// remaining pages at this iteration's pace, hashing included.
    pub fn remaining_bytes(&self) -> u64 {
        let pages = self.dirtied_during.saturating_add(self.deferred_pages);
        let pages = if self.unchanged_pages == 0 {
            pages
        } else {
            let changed = u128::from(self.pages_sent) + u128::from(self.zero_pages);
            let handled = changed + u128::from(self.unchanged_pages);
            // Rounded up; at most `pages`, so it fits.
            u64::try_from((u128::from(pages) * changed).div_ceil(handled)).unwrap_or(pages)
        };
        pages.saturating_mul(self.page_size)
    }

    /// Pages this iteration dealt with: sent with data, as zero ranges, or
    /// found unchanged and not sent (saturating).
    pub fn pages_handled(&self) -> u64 {
        self.pages_sent
            .saturating_add(self.zero_pages)
            .saturating_add(self.unchanged_pages)
    }

    /// Whether this iteration is a usable bandwidth sample: it took a
    /// non-zero time and sent a non-zero number of bytes, so
    /// [`transfer_rate`](Self::transfer_rate) is finite and positive.
    pub fn measures_bandwidth(&self) -> bool {
        self.bytes_sent > 0 && !self.duration.is_zero()
    }

    /// Time to send [`remaining_bytes`](Self::remaining_bytes) at
    /// `bandwidth` bytes per second: the downtime a stop-and-copy started
    /// now would cost.
    ///
    /// `Some(Duration::ZERO)` when nothing remains (whatever the bandwidth);
    /// `None` when something remains but `bandwidth` is zero, negative, NaN
    /// or the time would not fit a [`Duration`].
    pub fn expected_downtime(&self, bandwidth: f64) -> Option<Duration> {
        let remaining = self.remaining_bytes();
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        if bandwidth.is_nan() || bandwidth <= 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(remaining as f64 / bandwidth).ok()
    }

    /// Milliseconds needed to send `bytes` at the rate this iteration
    /// measured (`bytes × duration ÷ bytes_sent`): the downtime predicted for
    /// a final copy of `bytes`. `Some(0.0)` when `bytes` is 0; `None` when
    /// this iteration is not a bandwidth sample (see
    /// [`measures_bandwidth`](Self::measures_bandwidth)). Always finite.
    pub fn millis_to_send(&self, bytes: u64) -> Option<f64> {
        if bytes == 0 {
            Some(0.0)
        } else if self.measures_bandwidth() {
            Some(bytes as f64 * self.duration.as_secs_f64() * 1000.0 / self.bytes_sent as f64)
        } else {
            None
        }
    }

    /// Fraction of this iteration's `dirty_pages` that were already dirty in
    /// the previous iteration (0.0 to 1.0): how much of what is sent is the
    /// hot, rewritten working set. `0.0` when `dirty_pages` is 0.
    pub fn redirty_ratio(&self) -> f64 {
        if self.dirty_pages == 0 {
            0.0
        } else {
            (self.redirtied_pages as f64 / self.dirty_pages as f64).min(1.0)
        }
    }
}

fn rate(amount: f64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        amount / s
    } else if amount > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// Every iteration of a migration so far, oldest first.
#[derive(Debug, Clone, Default)]
pub struct MigrationHistory {
    iterations: Vec<IterationStats>,
}

impl MigrationHistory {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append the record of a finished iteration.
    pub fn push(&mut self, stats: IterationStats) {
        self.iterations.push(stats);
    }

    /// All iterations, oldest first.
    pub fn iterations(&self) -> &[IterationStats] {
        &self.iterations
    }

    /// The iteration that just finished.
    pub fn last(&self) -> Option<&IterationStats> {
        self.iterations.last()
    }

    /// Number of completed iterations, the full copy (iteration 0) included.
    pub fn len(&self) -> usize {
        self.iterations.len()
    }

    /// Whether no iteration has completed yet.
    pub fn is_empty(&self) -> bool {
        self.iterations.is_empty()
    }

    /// [`len`](Self::len) as a `u32` (saturating), the unit of
    /// [`StopReason::IterationLimit`](crate::StopReason::IterationLimit).
    pub fn completed(&self) -> u32 {
        u32::try_from(self.iterations.len()).unwrap_or(u32::MAX)
    }

    /// Total bytes sent so far.
    pub fn total_bytes_sent(&self) -> u64 {
        self.iterations.iter().map(|i| i.bytes_sent).sum()
    }

    /// The most recent iteration that is a usable bandwidth sample (see
    /// [`IterationStats::measures_bandwidth`]), if any.
    pub fn last_measured(&self) -> Option<&IterationStats> {
        self.iterations
            .iter()
            .rev()
            .find(|i| i.measures_bandwidth())
    }

    /// The most recent iteration that is a bandwidth sample and sent at
    /// least one page with its data: unlike [`last_measured`](Self::last_measured),
    /// it skips an iteration that sent only zero ranges and end markers
    /// (e.g. one whose whole dirty set was deferred), whose few bytes in a
    /// short time say little about the link.
    pub fn last_page_sample(&self) -> Option<&IterationStats> {
        self.iterations
            .iter()
            .rev()
            .find(|i| i.measures_bandwidth() && i.pages_sent > 0)
    }
}

impl From<Vec<IterationStats>> for MigrationHistory {
    fn from(iterations: Vec<IterationStats>) -> Self {
        Self { iterations }
    }
}

impl FromIterator<IterationStats> for MigrationHistory {
    fn from_iter<I: IntoIterator<Item = IterationStats>>(iter: I) -> Self {
        Self {
            iterations: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(bytes_sent: u64, millis: u64, dirtied_during: u64) -> IterationStats {
        IterationStats {
            bytes_sent,
            duration: Duration::from_millis(millis),
            dirtied_during,
            page_size: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn rates() {
        // (bytes_sent, ms, dirtied_during, transfer B/s, dirty B/s)
        let cases: &[(u64, u64, u64, f64, f64)] = &[
            (1_000_000, 1000, 0, 1e6, 0.0),
            (1_000_000, 500, 10, 2e6, 81_920.0),
            (0, 1000, 1, 0.0, 4096.0),
            (4096, 1, 1, 4_096_000.0, 4_096_000.0),
            // Zero duration: infinite if something happened, else 0, never NaN.
            (0, 0, 0, 0.0, 0.0),
            (1, 0, 0, f64::INFINITY, 0.0),
            (0, 0, 1, 0.0, f64::INFINITY),
        ];
        for &(bytes, ms, dirtied, transfer, dirty) in cases {
            let s = stats(bytes, ms, dirtied);
            assert_eq!(s.transfer_rate(), transfer, "transfer rate of {s:?}");
            assert_eq!(s.dirty_rate(), dirty, "dirty rate of {s:?}");
            assert!(!s.transfer_rate().is_nan() && !s.dirty_rate().is_nan());
        }
    }

    #[test]
    fn measures_bandwidth_needs_bytes_and_time() {
        let cases = [
            ((1, 1), true),
            ((0, 1), false),
            ((1, 0), false),
            ((0, 0), false),
        ];
        for ((bytes, ms), want) in cases {
            assert_eq!(stats(bytes, ms, 0).measures_bandwidth(), want);
        }
    }

    #[test]
    fn remaining_bytes_saturates() {
        assert_eq!(stats(0, 0, 3).remaining_bytes(), 3 * 4096);
        assert_eq!(stats(0, 0, u64::MAX).remaining_bytes(), u64::MAX);
    }

    #[test]
    fn remaining_bytes_counts_the_changed_share() {
        let with = |sent, zero, unchanged, dirtied| IterationStats {
            pages_sent: sent,
            zero_pages: zero,
            unchanged_pages: unchanged,
            ..stats(0, 0, dirtied)
        };
        // (sent, zero, unchanged, dirtied during) -> remaining pages
        let cases = [
            ((10, 0, 0, 7), 7),
            ((0, 0, 100, 50), 0),
            ((30, 10, 60, 100), 40),
            // Rounded up: one changed page in three, of 10 dirtied.
            ((1, 0, 2, 10), 4),
            ((u64::MAX, 0, u64::MAX, u64::MAX), u64::MAX / 2 + 1),
        ];
        for ((sent, zero, unchanged, dirtied), pages) in cases {
            let s = with(sent, zero, unchanged, dirtied);
            assert_eq!(s.remaining_bytes(), pages.saturating_mul(4096), "{s:?}");
        }
        assert_eq!(with(3, 1, 4, 0).pages_handled(), 8);
    }

    #[test]
    fn expected_downtime() {
        // (dirtied_during pages, bandwidth B/s, expected)
        let cases: &[(u64, f64, Option<Duration>)] = &[
            (0, 0.0, Some(Duration::ZERO)),
            (0, f64::NAN, Some(Duration::ZERO)),
            (250, 4096.0 * 1000.0, Some(Duration::from_millis(250))),
            (1, f64::INFINITY, Some(Duration::ZERO)),
            (1, 0.0, None),
            (1, -1.0, None),
            (1, f64::NAN, None),
            (u64::MAX, f64::MIN_POSITIVE, None),
        ];
        for &(dirtied, bw, want) in cases {
            assert_eq!(
                stats(0, 0, dirtied).expected_downtime(bw),
                want,
                "{dirtied} pages at {bw} B/s"
            );
        }
    }

    #[test]
    fn millis_to_send() {
        // 4096 B/ms sample.
        let s = stats(4096 * 1000, 1000, 0);
        assert_eq!(s.millis_to_send(0), Some(0.0));
        assert_eq!(s.millis_to_send(4096 * 250), Some(250.0));
        assert_eq!(stats(0, 1000, 0).millis_to_send(1), None);
        assert_eq!(stats(1, 0, 0).millis_to_send(1), None);
        assert_eq!(stats(0, 0, 0).millis_to_send(0), Some(0.0));
        assert!(stats(1, 1, 0)
            .millis_to_send(u64::MAX)
            .is_some_and(f64::is_finite));
    }

    #[test]
    fn last_page_sample_skips_empty_iterations() {
        let with_pages = |pages_sent, bytes, ms| IterationStats {
            pages_sent,
            ..stats(bytes, ms, 0)
        };
        let h: MigrationHistory = vec![
            with_pages(10, 40_960, 10),
            with_pages(0, 64, 1),
            with_pages(5, 0, 0),
        ]
        .into();
        assert_eq!(h.last_page_sample(), Some(&h.iterations()[0]));
        assert_eq!(h.last_measured(), Some(&h.iterations()[1]));
        assert!(MigrationHistory::new().last_page_sample().is_none());
    }

    #[test]
    fn redirty_ratio() {
        let cases = [
            ((0, 0), 0.0),
            ((100, 0), 0.0),
            ((100, 25), 0.25),
            ((100, 100), 1.0),
        ];
        for ((dirty, redirtied), want) in cases {
            let s = IterationStats {
                dirty_pages: dirty,
                redirtied_pages: redirtied,
                ..Default::default()
            };
            assert_eq!(s.redirty_ratio(), want);
        }
    }

    #[test]
    fn history_accessors() {
        let mut h = MigrationHistory::new();
        assert!(h.is_empty());
        assert_eq!(h.completed(), 0);
        assert!(h.last().is_none() && h.last_measured().is_none());
        h.push(stats(100, 10, 5));
        h.push(stats(0, 0, 5));
        assert_eq!((h.len(), h.completed()), (2, 2));
        assert_eq!(h.total_bytes_sent(), 100);
        assert_eq!(h.last_measured(), Some(&h.iterations()[0]));
        let collected: MigrationHistory = h.iterations().iter().cloned().collect();
        assert_eq!(collected.iterations(), h.iterations());
        assert_eq!(MigrationHistory::from(vec![stats(1, 1, 1)]).len(), 1);
    }
}
