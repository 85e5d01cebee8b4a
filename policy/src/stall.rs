//! KubeVirt's stall detection (enhancement proposal 248, "migration
//! convergence"; see the project background).
//!
//! Remaining bytes oscillate from iteration to iteration, so KubeVirt does
//! not compare an iteration with the one before it (Nova's lesson: "we were
//! sampling a saw tooth wave") but with the *best* value seen at least a
//! stall window earlier. Time here is migration time as the history records
//! it: `t(i)` = the sum of the durations of iterations `0..=i`, so the
//! policy stays free of clocks and replays exactly. After every iteration
//! [`StallPolicy`] applies, in order:
//!
//! 1. **Downtime rule** (first): the [`qemu`](crate::qemu) rule with
//!    `--downtime-limit`; KubeVirt runs QEMU underneath, whose own rule still
//!    completes a converging guest.
//! 2. **Bandwidth.** An EWMA over the iterations that measure bandwidth:
//!    `b ← alpha × rate(i) + (1 − alpha) × b`, starting at the first sample,
//!    `alpha` = `ewma-alpha` (default 0.3). *Why 0.3:* it halves a one-off
//!    sample's weight within two iterations, smoothing a sawtooth, and still
//!    follows a link that changed for good within about five.
//! 3. **Stall.** With `best` = the smallest `remaining` of the iterations
//!    that ended at least `window` (default 40 s, KubeVirt's) before
//!    `t(i)`: iteration `i` is stalled when `remaining(i) ≥ (1 −
//!    threshold) × best` (`threshold` default 4%, KubeVirt's). Once
//!    stalled, the migration stays stalled (KubeVirt then only looks for
//!    the moment to switch over).
//! 4. **Switch-over at a local minimum.** Once stalled, stop at the first
//!    iteration whose `remaining` is within `threshold` of the smallest
//!    `remaining` of the last `window` (a trough of the oscillation, not a
//!    peak), or when the migration has been stalled for a whole `window`
//!    without reaching one (a steadily rising guest would otherwise wait
//!    for ever) — in both cases only if the predicted downtime `remaining ÷
//!    b` is at most `max-downtime` (default 1050 ms, the top of KubeVirt's
//!    downtime ramp) → [`StopReason::Other`] naming the stall. Above it the
//!    policy answers `Continue`, and the engine's `--timeout` (with
//!    `--timeout-action`) ends the migration, as KubeVirt's completion
//!    timeout does.

use std::time::Duration;

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, MigrationHistory, PolicyError, PolicyParams, QemuPolicy,
    SettingDoc, StopReason,
};

/// The settings of `stall`.
pub const SETTINGS: &[SettingDoc] = &[
    SettingDoc {
        key: "window",
        default: "40s",
        meaning: "compare remaining with the best value seen at least this long ago",
    },
    SettingDoc {
        key: "threshold",
        default: "4%",
        meaning: "stalled when remaining is not below the old best by at least this share",
    },
    SettingDoc {
        key: "max-downtime",
        default: "1050ms",
        meaning: "switch over only if remaining / EWMA bandwidth is at most this",
    },
    SettingDoc {
        key: "ewma-alpha",
        default: "0.3",
        meaning: "weight of the newest iteration in the bandwidth EWMA",
    },
];

/// KubeVirt's stall detection (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct StallPolicy {
    qemu: QemuPolicy,
    /// Rule 3: how far back the best value must lie.
    pub window: Duration,
    /// Rules 3 and 4: the share that counts as progress / as a trough.
    pub threshold: f64,
    /// Rule 4: the largest predicted downtime it switches over at.
    pub max_downtime: Duration,
    /// Rule 2: weight of the newest sample.
    pub ewma_alpha: f64,
}

/// What rules 2 and 3 make of a history.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Assessment {
    /// Migration time at which it was first stalled.
    stalled_since: Option<Duration>,
    /// EWMA bandwidth, bytes per second.
    bandwidth: Option<f64>,
    /// Smallest remaining of the iterations in the last window.
    window_min: u64,
}

impl StallPolicy {
    /// KubeVirt's defaults with this downtime limit for rule 1.
    pub fn new(downtime_limit: Duration) -> Self {
        Self {
            qemu: QemuPolicy::new(downtime_limit),
            window: Duration::from_secs(40),
            threshold: 0.04,
            max_downtime: Duration::from_millis(1050),
            ewma_alpha: 0.3,
        }
    }

    /// Build from `params` (downtime limit and [`SETTINGS`]).
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("stall", SETTINGS, params)?;
        let d = Self::new(params.downtime_limit);
        Ok(Self {
            window: s.seconds("window", d.window)?,
            threshold: s.fraction("threshold", d.threshold, 0.0, 1.0)?,
            max_downtime: s.millis("max-downtime", d.max_downtime)?,
            ewma_alpha: s.fraction("ewma-alpha", d.ewma_alpha, 0.01, 1.0)?,
            ..d
        })
    }

    /// Replay rules 2 and 3 over the history.
    fn assess(&self, history: &MigrationHistory) -> Assessment {
        let its = history.iterations();
        let mut ends = Vec::with_capacity(its.len());
        let mut t = Duration::ZERO;
        for it in its {
            t = t.saturating_add(it.duration);
            ends.push(t);
        }
        let mut bandwidth: Option<f64> = None;
        let mut stalled_since = None;
        for (i, it) in its.iter().enumerate() {
            if it.measures_bandwidth() {
                let r = it.transfer_rate();
                bandwidth = Some(match bandwidth {
                    None => r,
                    Some(b) => self.ewma_alpha * r + (1.0 - self.ewma_alpha) * b,
                });
            }
            if stalled_since.is_some() {
                continue;
            }
            let Some(cutoff) = ends[i].checked_sub(self.window) else {
                continue;
            };
            let best = its[..i]
                .iter()
                .zip(&ends)
                .filter(|(_, &end)| end <= cutoff)
                .map(|(old, _)| old.remaining_bytes())
                .min();
            if let Some(best) = best {
                if it.remaining_bytes() as f64 >= (1.0 - self.threshold) * best as f64 {
                    stalled_since = Some(ends[i]);
                }
            }
        }
        let now = t;
        let window_min = its
            .iter()
            .zip(&ends)
            .filter(|(_, &end)| end.saturating_add(self.window) >= now)
            .map(|(it, _)| it.remaining_bytes())
            .min()
            .unwrap_or(0);
        Assessment {
            stalled_since,
            bandwidth,
            window_min,
        }
    }
}

impl Default for StallPolicy {
    /// KubeVirt's defaults, with [`DEFAULT_DOWNTIME_LIMIT`](crate::DEFAULT_DOWNTIME_LIMIT).
    fn default() -> Self {
        Self::new(crate::DEFAULT_DOWNTIME_LIMIT)
    }
}

impl ConvergencePolicy for StallPolicy {
    fn name(&self) -> &'static str {
        "stall"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        // Rule 1.
        let stop = self.qemu.decide(history);
        if stop != Decision::Continue {
            return stop;
        }
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let a = self.assess(history);
        let Some(since) = a.stalled_since else {
            return Decision::Continue;
        };
        // Rule 4.
        let remaining = last.remaining_bytes();
        let now: Duration = history.iterations().iter().map(|i| i.duration).sum();
        let at_trough = remaining as f64 <= (1.0 + self.threshold) * a.window_min as f64;
        let waited = now.saturating_sub(since) >= self.window;
        let predicted_ms = a
            .bandwidth
            .filter(|b| b.is_finite() && *b > 0.0)
            .map(|b| remaining as f64 / b * 1000.0);
        match predicted_ms {
            Some(ms) if (at_trough || waited) && ms <= self.max_downtime.as_secs_f64() * 1000.0 => {
                Decision::StopAndCopy(StopReason::Other(format!(
                    "stalled for {:.1} s ({}), predicted downtime {ms:.1} ms",
                    now.saturating_sub(since).as_secs_f64(),
                    if at_trough {
                        "switching over at a trough"
                    } else {
                        "no trough within the window"
                    }
                )))
            }
            _ => Decision::Continue,
        }
    }

    fn set_downtime_limit(&mut self, limit: Duration) {
        self.qemu.set_downtime_limit(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IterationStats;

    const PAGE: u64 = 4096;
    const MB: u64 = 1_000_000;

    /// A 1 s iteration at 100 MB/s leaving `left` MB.
    fn it(left: u64) -> IterationStats {
        IterationStats {
            bytes_sent: 100 * MB,
            pages_sent: 100 * MB / PAGE,
            duration: Duration::from_secs(1),
            dirtied_during: left * MB / PAGE,
            page_size: PAGE,
            ram_bytes: 1 << 30,
            ..Default::default()
        }
    }

    /// Decisions after each prefix of `left` (MB remaining per 1 s iteration).
    fn decisions(p: &mut StallPolicy, left: &[u64]) -> Vec<Decision> {
        let trace: Vec<_> = left.iter().map(|&l| it(l)).collect();
        (1..=trace.len())
            .map(|n| p.decide(&trace[..n].to_vec().into()))
            .collect()
    }

    fn first_stop(d: &[Decision]) -> Option<usize> {
        d.iter().position(|d| matches!(d, Decision::StopAndCopy(_)))
    }

    fn short(window_s: u64) -> StallPolicy {
        StallPolicy {
            window: Duration::from_secs(window_s),
            ..StallPolicy::default()
        }
    }

    #[test]
    fn a_converging_guest_gets_the_qemu_rule() {
        // 100 MB/s, 300 ms limit: stops once 30 MB or less remain.
        let mut p = short(5);
        let d = decisions(&mut p, &[90, 70, 50, 40, 30]);
        assert_eq!(first_stop(&d), Some(4));
        assert!(matches!(
            d[4],
            Decision::StopAndCopy(StopReason::DowntimeReached { .. })
        ));
    }

    #[test]
    fn flat_remaining_stalls_after_the_window() {
        // 80 MB left forever: at 100 MB/s that is 800 ms, under 1050 ms.
        let mut p = short(5);
        let d = decisions(&mut p, &[80; 12]);
        // Iteration 5 ends at t = 6 s; iteration 0 ended at 1 s ≤ 6 − 5.
        assert_eq!(first_stop(&d), Some(5));
        assert!(
            matches!(&d[5], Decision::StopAndCopy(StopReason::Other(s)) if s.contains("trough")),
            "{:?}",
            d[5]
        );
    }

    #[test]
    fn slow_progress_is_not_a_stall() {
        // 5% better than 5 s ago, every time: never stalled; still going.
        let left: Vec<u64> = (0..15).map(|i| 1000 - 12 * i).collect();
        let mut p = short(5);
        assert_eq!(first_stop(&decisions(&mut p, &left)), None);
    }

    #[test]
    fn a_sawtooth_switches_over_at_a_trough_not_a_peak() {
        // Period 4: 60, 80, 100, 80, 60, ... — no progress on the troughs.
        let left: Vec<u64> = (0..20).map(|i| [60, 80, 100, 80][i % 4]).collect();
        let mut p = short(5);
        let d = decisions(&mut p, &left);
        let stop = first_stop(&d).expect("stalls");
        assert_eq!(left[stop], 60, "stopped at {stop}: {:?}", d[stop]);
    }

    #[test]
    fn too_long_a_downtime_never_switches_over() {
        // 200 MB left at 100 MB/s: 2 s, over 1050 ms. Stalled, but waits.
        let mut p = short(5);
        assert_eq!(first_stop(&decisions(&mut p, &[200; 20])), None);
        // Raised bound: it switches over.
        let params = PolicyParams {
            settings: [
                ("max-downtime".to_string(), "2500".to_string()),
                ("window".to_string(), "5s".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let mut p = StallPolicy::from_params(&params).unwrap();
        assert_eq!(first_stop(&decisions(&mut p, &[200; 20])), Some(5));
    }

    #[test]
    fn a_rising_guest_switches_after_a_whole_window() {
        // Stalled at iteration 5 (t = 6 s); never again at its window low.
        let left: Vec<u64> = (0..20).map(|i| 40 + 3 * i).collect();
        let mut p = short(5);
        let d = decisions(&mut p, &left);
        let stop = first_stop(&d).expect("switches");
        assert!(
            matches!(&d[stop], Decision::StopAndCopy(StopReason::Other(s)) if s.contains("no trough")),
            "{:?}",
            d[stop]
        );
        assert_eq!(stop, 10, "stalled at 5, window 5 s");
    }

    #[test]
    fn ewma_smooths_one_fast_iteration() {
        let p = short(5);
        let mut fast = it(80);
        fast.bytes_sent = 1000 * MB;
        let h: MigrationHistory = vec![it(80), fast].into();
        let b = p.assess(&h).bandwidth.unwrap();
        assert!(
            (b - (0.3 * 1000.0 + 0.7 * 100.0) * MB as f64).abs() < 1.0,
            "{b}"
        );
    }
}
