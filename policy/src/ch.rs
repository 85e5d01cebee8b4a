//! Cloud Hypervisor's convergence rule (`vmm/src/lib.rs`, the pre-copy loop
//! as changed in 2026; see the project background, "Other answers to
//! non-convergence").
//!
//! Cloud Hypervisor sends every page of a dirty range with its bytes and
//! measures its bandwidth in *memory* bytes moved per second. It stops when
//! what is dirty now would take no longer than `downtime_ms` at the
//! bandwidth of the iteration before. After every iteration, [`ChPolicy`]
//! applies, in order:
//!
//! 1. **Nothing left.** `remaining = 0` → [`StopReason::DowntimeReached`]
//!    with an expected downtime of 0.
//! 2. **Bandwidth, in page bytes.** `bandwidth = dirty_pages × page_size ÷
//!    duration` of the iteration just finished (the page bytes it moved,
//!    data and zero pages alike, since Cloud Hypervisor sends both in
//!    full). *Why page bytes, not stream bytes as `qemu` does:* that is
//!    what Cloud Hypervisor measures (`MemoryRangeTable` sizes over the
//!    iteration's time), and it compares like with like: `remaining` is
//!    page bytes too. The difference from `qemu` shows with compression and
//!    zero pages, which make page bytes move faster than stream bytes. An
//!    iteration with no dirty page or no duration is not a sample; the most
//!    recent one that is stands in, and with none only rule 1 can stop.
//! 3. **Downtime rule.** `remaining ÷ bandwidth ≤ downtime_limit` →
//!    [`StopReason::DowntimeReached`] with that expected downtime.
//! 4. **Dirty-pass cap** (`max-passes`, default 0 = none). Until 2026 Cloud
//!    Hypervisor did one full copy and at most 5 dirty passes
//!    (`MAX_MIGRATE_ITERATIONS`); `max-passes=5` gives that rule back: once
//!    `max-passes` iterations after the full copy are done,
//!    [`StopReason::IterationLimit`].
//! 5. **Timeout.** Cloud Hypervisor's `timeout_s` (default 3600 s) then
//!    either cancels (its default: the VM stays on the source) or pauses and
//!    finishes (`ignore`). That is the engine's `--timeout` with
//!    `--timeout-action cancel|force`, which applies to every policy, so
//!    this policy answers `Continue` until then.

use std::time::Duration;

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, IterationStats, MigrationHistory, PolicyError, PolicyParams,
    SettingDoc, StopReason, DEFAULT_DOWNTIME_LIMIT,
};

/// The settings of `ch`.
pub const SETTINGS: &[SettingDoc] = &[SettingDoc {
    key: "max-passes",
    default: "0",
    meaning:
        "stop after this many dirty passes after the full copy (0: no cap; 5: the rule before 2026)",
}];

/// Cloud Hypervisor's rule (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChPolicy {
    downtime_limit: Duration,
    /// Rule 4: dirty passes after the full copy before stopping (0: none).
    pub max_passes: u32,
}

impl ChPolicy {
    /// The rule with this downtime limit and no pass cap.
    pub fn new(downtime_limit: Duration) -> Self {
        Self {
            downtime_limit,
            max_passes: 0,
        }
    }

    /// Build from `params` (downtime limit and [`SETTINGS`]).
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("ch", SETTINGS, params)?;
        Ok(Self {
            max_passes: s.count_u32("max-passes", 0)?,
            ..Self::new(params.downtime_limit)
        })
    }

    /// Rule 2: the newest iteration that moved page bytes in a measurable
    /// time, and its rate in page bytes per second.
    fn bandwidth(history: &MigrationHistory) -> Option<f64> {
        history
            .iterations()
            .iter()
            .rev()
            .find(|i| i.dirty_pages > 0 && !i.duration.is_zero())
            .map(page_rate)
    }
}

/// Page bytes moved per second by `it` (rule 2).
fn page_rate(it: &IterationStats) -> f64 {
    it.dirty_pages.saturating_mul(it.page_size) as f64 / it.duration.as_secs_f64()
}

impl Default for ChPolicy {
    /// Cloud Hypervisor's default, 300 ms ("same as QEMU"), no pass cap.
    fn default() -> Self {
        Self::new(DEFAULT_DOWNTIME_LIMIT)
    }
}

impl ConvergencePolicy for ChPolicy {
    fn name(&self) -> &'static str {
        "ch"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let remaining = last.remaining_bytes();
        // Rule 1.
        if remaining == 0 {
            return Decision::StopAndCopy(StopReason::DowntimeReached {
                expected_downtime_ms: 0.0,
            });
        }
        // Rules 2 and 3.
        let expected_ms = Self::bandwidth(history)
            .filter(|b| b.is_finite() && *b > 0.0)
            .map(|b| remaining as f64 / b * 1000.0);
        if let Some(ms) = expected_ms {
            if ms <= self.downtime_limit.as_secs_f64() * 1000.0 {
                return Decision::StopAndCopy(StopReason::DowntimeReached {
                    expected_downtime_ms: ms,
                });
            }
        }
        // Rule 4.
        let passes = history.completed().saturating_sub(1);
        if self.max_passes > 0 && passes >= self.max_passes {
            return Decision::StopAndCopy(StopReason::IterationLimit {
                iterations: history.completed(),
                predicted_downtime_ms: expected_ms,
            });
        }
        Decision::Continue
    }

    fn set_downtime_limit(&mut self, limit: Duration) {
        self.downtime_limit = limit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    /// An iteration that moved `pages` pages (`wire` stream bytes) in `ms`
    /// and left `dirtied` pages.
    fn it(pages: u64, wire: u64, ms: u64, dirtied: u64) -> IterationStats {
        IterationStats {
            dirty_pages: pages,
            pages_sent: pages,
            bytes_sent: wire,
            duration: Duration::from_millis(ms),
            dirtied_during: dirtied,
            page_size: PAGE,
            ram_bytes: 1 << 30,
            ..Default::default()
        }
    }

    fn decide(p: &mut ChPolicy, trace: Vec<IterationStats>) -> Decision {
        p.decide(&trace.into())
    }

    #[test]
    fn empty_history_continues_and_nothing_left_stops() {
        let mut p = ChPolicy::default();
        assert_eq!(p.decide(&MigrationHistory::new()), Decision::Continue);
        assert_eq!(
            decide(&mut p, vec![it(1000, 4_096_000, 100, 0)]),
            Decision::StopAndCopy(StopReason::DowntimeReached {
                expected_downtime_ms: 0.0
            })
        );
    }

    #[test]
    fn downtime_rule_in_page_bytes() {
        // 10 000 pages in 1 s: 40.96 MB/s of page bytes. 3000 pages left
        // take 300 ms: within 300 ms; 3001 do not.
        let mut p = ChPolicy::default();
        assert_eq!(
            decide(&mut p, vec![it(10_000, 40_960_000, 1000, 3000)]),
            Decision::StopAndCopy(StopReason::DowntimeReached {
                expected_downtime_ms: 300.0
            })
        );
        assert_eq!(
            decide(&mut p, vec![it(10_000, 40_960_000, 1000, 3001)]),
            Decision::Continue
        );
    }

    #[test]
    fn compression_counts_as_bandwidth_unlike_qemu() {
        // Pages shrank 10× on the wire: qemu measures 4.096 MB/s of stream
        // bytes and goes on; ch measures 40.96 MB/s of pages and stops.
        let trace = vec![it(10_000, 4_096_000, 1000, 3000)];
        let mut ch = ChPolicy::default();
        assert!(matches!(
            decide(&mut ch, trace.clone()),
            Decision::StopAndCopy(_)
        ));
        let mut qemu = crate::QemuPolicy::default();
        assert_eq!(qemu.decide(&trace.into()), Decision::Continue);
    }

    #[test]
    fn an_empty_iteration_is_not_a_bandwidth_sample() {
        // The last iteration moved nothing in 0 ms; the one before stands in.
        let mut p = ChPolicy::default();
        let mut idle = it(0, 28, 0, 3000);
        idle.dirty_pages = 0;
        assert_eq!(
            decide(&mut p, vec![it(10_000, 40_960_000, 1000, 5000), idle]),
            Decision::StopAndCopy(StopReason::DowntimeReached {
                expected_downtime_ms: 300.0
            })
        );
        // With no sample at all only an empty remainder stops.
        let mut zero = it(0, 0, 0, 10);
        zero.dirty_pages = 0;
        assert_eq!(decide(&mut p, vec![zero]), Decision::Continue);
    }

    #[test]
    fn no_cap_by_default_and_five_passes_as_before_2026() {
        // A guest that never converges: 5000 pages dirtied per 100 ms pass
        // of 1000 pages, i.e. 500 ms of work left each time.
        let stuck: Vec<_> = (0..40).map(|_| it(1000, 4_096_000, 100, 5000)).collect();
        let mut p = ChPolicy::default();
        for n in 1..=stuck.len() {
            assert_eq!(decide(&mut p, stuck[..n].to_vec()), Decision::Continue);
        }
        let params = PolicyParams {
            settings: [("max-passes".to_string(), "5".to_string())].into(),
            ..Default::default()
        };
        let mut p = ChPolicy::from_params(&params).unwrap();
        for n in 1..=5 {
            assert_eq!(decide(&mut p, stuck[..n].to_vec()), Decision::Continue);
        }
        // The full copy and 5 dirty passes are done.
        assert_eq!(
            decide(&mut p, stuck[..6].to_vec()),
            Decision::StopAndCopy(StopReason::IterationLimit {
                iterations: 6,
                predicted_downtime_ms: Some(500.0),
            })
        );
    }

    #[test]
    fn set_downtime_limit_applies_next_decision() {
        let trace = vec![it(10_000, 40_960_000, 1000, 6000)];
        let mut p = ChPolicy::default();
        assert_eq!(decide(&mut p, trace.clone()), Decision::Continue);
        p.set_downtime_limit(Duration::from_millis(600));
        assert!(matches!(decide(&mut p, trace), Decision::StopAndCopy(_)));
    }
}
