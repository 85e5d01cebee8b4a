//! Xen's legacy convergence rule, from before migration v2
//! (`tools/libxc/xc_domain_save.c`, `xc_domain_save`, Xen 3.x–4.5).
//!
//! After each live pass Xen decides whether the next pass is the last one
//! (sent with the domain suspended). The test is one `if` of four
//! conditions joined by `||`, in this order:
//!
//! ```c
//! if ( ((sent_this_iter > sent_last_iter) && RATE_IS_MAX()) ||
//!      (iter >= max_iters) ||
//!      (sent_this_iter+skip_this_iter < 50) ||
//!      (total_sent > p2m_size*max_factor) )
//! ```
//!
//! Any of them ends pre-copy; the order only decides which reason
//! [`XenLegacyPolicy`] reports. After every iteration it answers
//! [`Decision::StopAndCopy`] when, checked in Xen's order:
//!
//! 1. **Dirty count grew at maximum rate** → [`StopReason::NotConverging`].
//!    Xen: more pages were sent in this pass than in the previous one
//!    (`sent_last_iter` starts at the guest's page count, so the full pass
//!    never counts), while its adaptive rate limiter was at its maximum
//!    (`RATE_IS_MAX()`, 500 Mbit/s): sending as fast as allowed and still
//!    losing ground. Here: `dirty_pages` of this iteration > `dirty_pages`
//!    of the previous one (iteration 0 is never compared), and this
//!    iteration's transfer rate is at least `max-rate-fraction` (default
//!    90%) of the best transfer rate of any iteration so far, this one
//!    included. *Why the approximation:* this engine has no adaptive rate
//!    limiter, so "at maximum rate" becomes "the link ran about as fast as
//!    it ever did"; 90% leaves room for the usual jitter of one iteration's
//!    rate while excluding an iteration slowed by something else. Note that
//!    stock Xen builds never fire this rule: `RATE_IS_MAX()` is defined as
//!    `0` unless `ADAPTIVE_SAVE` is compiled in (it is not by default), and
//!    the ia64 port comments the condition out. `rate-rule=off` reproduces
//!    them.
//! 2. **Iteration cap** → [`StopReason::IterationLimit`]: completed
//!    iterations, iteration 0 included, ≥ `max-iterations` (default 29).
//!    Xen's `iter` is incremented before each pass, the full one included,
//!    and `DEF_MAX_ITERS` is 29, "limit us to 30 times round loop": 29 live
//!    passes, then the last one.
//! 3. **Few pages** → [`StopReason::FewDirtyPages`]: the iteration just sent
//!    had fewer than `target-dirty-pages` (default 50) pages (`dirty_pages`,
//!    Xen's `sent_this_iter + skip_this_iter`: sent plus skipped because
//!    already dirty again). Note the lag this keeps from Xen: it is the size
//!    of the pass just sent, not of what is left (`dirtied_during`, which the
//!    v2 rule in [`xen`](crate::xen) tests), so an idle guest gets one more
//!    short pass after the full copy before the last one.
//! 4. **Traffic cap** → [`StopReason::SentTooMuch`]: total bytes sent >
//!    `max-sent-factor` (default 3, Xen's `DEF_MAX_FACTOR`) × guest RAM.
//!    Xen counts pages sent against the page count; bytes (zero ranges are
//!    cheap here) measure the traffic the cap is meant to bound. Skipped
//!    when the RAM size is unknown (`ram_bytes` = 0).
//!
//! Otherwise [`Decision::Continue`]. Xen has no downtime limit, so
//! [`PolicyParams::downtime_limit`] is not used.

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, IterationStats, MigrationHistory, PolicyError, PolicyParams,
    SettingDoc, StopReason,
};

/// The settings of `xen-legacy`.
pub const SETTINGS: &[SettingDoc] = &[
    SettingDoc {
        key: "max-iterations",
        default: "29",
        meaning: "stop once this many iterations ran, the full copy included (DEF_MAX_ITERS)",
    },
    SettingDoc {
        key: "target-dirty-pages",
        default: "50",
        meaning: "stop when the iteration just sent had fewer pages than this",
    },
    SettingDoc {
        key: "max-sent-factor",
        default: "3",
        meaning: "stop once more than this many times the guest's RAM was sent (DEF_MAX_FACTOR)",
    },
    SettingDoc {
        key: "rate-rule",
        default: "on",
        meaning: "stop when the dirty count grew while sending at maximum rate (off: as stock Xen builds)",
    },
    SettingDoc {
        key: "max-rate-fraction",
        default: "90%",
        meaning: "an iteration sent at maximum rate if at least this share of the best rate so far",
    },
];

/// Xen's legacy rule (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct XenLegacyPolicy {
    /// Stop once this many iterations completed (iteration 0 included).
    pub max_iterations: u32,
    /// Stop when the iteration just sent had fewer pages than this.
    pub target_dirty_pages: u64,
    /// Stop once more than this many times the RAM size was sent.
    pub max_sent_factor: f64,
    /// Whether rule 1 (growth at maximum rate) is checked.
    pub rate_rule: bool,
    /// Share of the best transfer rate that counts as maximum rate.
    pub max_rate_fraction: f64,
}

impl XenLegacyPolicy {
    /// Xen's `DEF_MAX_ITERS`.
    pub const DEFAULT_MAX_ITERATIONS: u32 = 29;
    /// Xen's hard-coded 50 pages.
    pub const DEFAULT_TARGET_DIRTY_PAGES: u64 = 50;
    /// Xen's `DEF_MAX_FACTOR`.
    pub const DEFAULT_MAX_SENT_FACTOR: f64 = 3.0;
    /// Default share of the best rate that counts as maximum rate.
    pub const DEFAULT_MAX_RATE_FRACTION: f64 = 0.9;

    /// Build from `params.settings` (see [`SETTINGS`]).
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("xen-legacy", SETTINGS, params)?;
        Ok(Self {
            max_iterations: s.count_u32("max-iterations", Self::DEFAULT_MAX_ITERATIONS)?,
            target_dirty_pages: s
                .count_u64("target-dirty-pages", Self::DEFAULT_TARGET_DIRTY_PAGES)?,
            max_sent_factor: s.factor("max-sent-factor", Self::DEFAULT_MAX_SENT_FACTOR)?,
            rate_rule: s.switch("rate-rule", true)?,
            max_rate_fraction: s.fraction(
                "max-rate-fraction",
                Self::DEFAULT_MAX_RATE_FRACTION,
                0.0,
                1.0,
            )?,
        })
    }

    /// Rule 1: the dirty count grew while the link ran at its best rate.
    fn grew_at_max_rate(&self, iterations: &[IterationStats]) -> bool {
        let [.., previous, last] = iterations else {
            return false;
        };
        if !self.rate_rule || last.dirty_pages <= previous.dirty_pages {
            return false;
        }
        let best = iterations
            .iter()
            .filter(|i| i.measures_bandwidth())
            .map(IterationStats::transfer_rate)
            .fold(0.0, f64::max);
        last.measures_bandwidth() && last.transfer_rate() >= self.max_rate_fraction * best
    }
}

impl Default for XenLegacyPolicy {
    /// Xen's numbers: 29 iterations, 50 pages, 3 × RAM; rate rule on at 90%.
    fn default() -> Self {
        Self {
            max_iterations: Self::DEFAULT_MAX_ITERATIONS,
            target_dirty_pages: Self::DEFAULT_TARGET_DIRTY_PAGES,
            max_sent_factor: Self::DEFAULT_MAX_SENT_FACTOR,
            rate_rule: true,
            max_rate_fraction: Self::DEFAULT_MAX_RATE_FRACTION,
        }
    }
}

impl ConvergencePolicy for XenLegacyPolicy {
    fn name(&self) -> &'static str {
        "xen-legacy"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let iterations = history.completed();
        let sent = history.total_bytes_sent();
        let reason = if self.grew_at_max_rate(history.iterations()) {
            StopReason::NotConverging
        } else if iterations >= self.max_iterations {
            StopReason::IterationLimit {
                iterations,
                predicted_downtime_ms: None,
            }
        } else if last.dirty_pages < self.target_dirty_pages {
            StopReason::FewDirtyPages {
                pages: last.dirty_pages,
            }
        } else if last.ram_bytes > 0 && sent as f64 > self.max_sent_factor * last.ram_bytes as f64 {
            StopReason::SentTooMuch {
                bytes: sent,
                predicted_downtime_ms: None,
            }
        } else {
            return Decision::Continue;
        };
        Decision::StopAndCopy(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const RAM: u64 = 1 << 30; // 262,144 pages

    /// An iteration that had `pages` pages to send and sent them, `mb` MB in
    /// `ms` milliseconds.
    fn it(pages: u64, mb: u64, ms: u64) -> IterationStats {
        IterationStats {
            dirty_pages: pages,
            pages_sent: pages,
            dirtied_during: pages,
            bytes_sent: mb * 1_000_000,
            duration: Duration::from_millis(ms),
            page_size: 4096,
            ram_bytes: RAM,
            ..Default::default()
        }
    }

    fn decide(p: XenLegacyPolicy, trace: &[IterationStats]) -> Decision {
        let mut p = p;
        p.decide(&trace.iter().cloned().collect())
    }

    /// The full copy: all of RAM at 1 GB/s.
    fn full() -> IterationStats {
        it(262_144, 1000, 1000)
    }

    #[test]
    fn each_condition() {
        use Decision::{Continue, StopAndCopy};
        use StopReason::*;
        let d = XenLegacyPolicy::default;
        // (what, trace, decision)
        let cases: Vec<(&str, Vec<IterationStats>, Decision)> = vec![
            ("nothing holds", vec![full(), it(10_000, 40, 40)], Continue),
            // 1. Growth at maximum rate: 10,000 → 12,000 pages, both at
            // 1 GB/s (the best rate).
            (
                "grew at max rate",
                vec![full(), it(10_000, 40, 40), it(12_000, 48, 48)],
                StopAndCopy(NotConverging),
            ),
            // Growth, but at 60% of the best rate: not at maximum rate.
            (
                "grew, link slow",
                vec![full(), it(10_000, 40, 40), it(12_000, 48, 80)],
                Continue,
            ),
            // 91% of the best rate counts as maximum, 89% does not.
            (
                "grew at 91%",
                vec![full(), it(10_000, 40, 40), it(12_000, 91, 100)],
                StopAndCopy(NotConverging),
            ),
            (
                "grew at 89%",
                vec![full(), it(10_000, 40, 40), it(12_000, 89, 100)],
                Continue,
            ),
            (
                "equal is no growth",
                vec![full(), it(10_000, 40, 40), it(10_000, 40, 40)],
                Continue,
            ),
            // 2. Iteration cap: 29 completed iterations.
            (
                "28 iterations",
                std::iter::once(full())
                    .chain(vec![it(1000, 4, 4); 27])
                    .collect(),
                Continue,
            ),
            (
                "29 iterations",
                std::iter::once(full())
                    .chain(vec![it(1000, 4, 4); 28])
                    .collect(),
                StopAndCopy(IterationLimit {
                    iterations: 29,
                    predicted_downtime_ms: None,
                }),
            ),
            // 3. Few pages in the iteration just sent (49 < 50; 50 goes on).
            (
                "49 pages",
                vec![full(), it(49, 1, 1)],
                StopAndCopy(FewDirtyPages { pages: 49 }),
            ),
            ("50 pages", vec![full(), it(50, 1, 1)], Continue),
            // Xen's lag: the pass just sent was small, though many pages
            // were dirtied during it.
            (
                "lag",
                vec![
                    full(),
                    IterationStats {
                        dirtied_during: 100_000,
                        ..it(10, 1, 1)
                    },
                ],
                StopAndCopy(FewDirtyPages { pages: 10 }),
            ),
            // 4. Traffic: exactly 3 × RAM goes on (Xen's test is strict),
            // one byte more stops.
            (
                "3 × RAM exactly",
                vec![
                    IterationStats {
                        bytes_sent: RAM,
                        ..full()
                    },
                    IterationStats {
                        bytes_sent: 2 * RAM,
                        ..it(200_000, 0, 2000)
                    },
                ],
                Continue,
            ),
            (
                "over 3 × RAM",
                vec![
                    IterationStats {
                        bytes_sent: RAM,
                        ..full()
                    },
                    IterationStats {
                        bytes_sent: 2 * RAM + 1,
                        ..it(200_000, 0, 2000)
                    },
                ],
                StopAndCopy(SentTooMuch {
                    bytes: 3 * RAM + 1,
                    predicted_downtime_ms: None,
                }),
            ),
        ];
        for (what, trace, want) in cases {
            assert_eq!(decide(d(), &trace), want, "{what}");
        }
    }

    #[test]
    fn xens_order_picks_the_reason() {
        // Growth at max rate (49 → 60 pages at 1 GB/s, the best rate), 29
        // iterations and > 3 × RAM all hold: Xen's first condition names it.
        let mut trace = vec![IterationStats {
            bytes_sent: 4 * RAM,
            duration: Duration::from_secs(5),
            ..full()
        }];
        trace.extend(vec![it(49, 1, 1); 27]);
        trace.push(it(60, 1, 1));
        let got = decide(XenLegacyPolicy::default(), &trace);
        assert_eq!(got, Decision::StopAndCopy(StopReason::NotConverging));
        // Without rule 1: the cap.
        let no_rate = XenLegacyPolicy {
            rate_rule: false,
            ..Default::default()
        };
        assert!(matches!(
            decide(no_rate.clone(), &trace),
            Decision::StopAndCopy(StopReason::IterationLimit { iterations: 29, .. })
        ));
        // Without the cap either, and a last pass of 49 pages: few pages.
        trace.pop();
        trace.push(it(49, 1, 1));
        let loose = XenLegacyPolicy {
            max_iterations: 100,
            ..no_rate
        };
        assert_eq!(
            decide(loose.clone(), &trace),
            Decision::StopAndCopy(StopReason::FewDirtyPages { pages: 49 })
        );
        // Then the traffic cap.
        let loose = XenLegacyPolicy {
            target_dirty_pages: 0,
            ..loose
        };
        assert!(matches!(
            decide(loose, &trace),
            Decision::StopAndCopy(StopReason::SentTooMuch { .. })
        ));
    }

    #[test]
    fn degenerate_inputs() {
        // Unknown RAM size: no traffic cap.
        let trace = vec![IterationStats {
            ram_bytes: 0,
            bytes_sent: u64::MAX,
            ..full()
        }];
        assert_eq!(
            decide(XenLegacyPolicy::default(), &trace),
            Decision::Continue
        );
        assert_eq!(decide(XenLegacyPolicy::default(), &[]), Decision::Continue);
        // A zero-time iteration is no rate sample: growth alone does not stop.
        let trace = vec![full(), it(10, 0, 0), it(1000, 1, 0)];
        assert_eq!(
            decide(XenLegacyPolicy::default(), &trace),
            Decision::Continue
        );
    }

    #[test]
    fn settings() {
        let params = |pairs: &[(&str, &str)]| PolicyParams {
            settings: pairs
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let defaults: Vec<_> = SETTINGS.iter().map(|d| (d.key, d.default)).collect();
        assert_eq!(
            XenLegacyPolicy::from_params(&params(&defaults)),
            Ok(XenLegacyPolicy::default())
        );
        let p = XenLegacyPolicy::from_params(&params(&[
            ("max-iterations", "10"),
            ("target-dirty-pages", "0"),
            ("max-sent-factor", "2.5"),
            ("rate-rule", "off"),
            ("max-rate-fraction", "0.75"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            XenLegacyPolicy {
                max_iterations: 10,
                target_dirty_pages: 0,
                max_sent_factor: 2.5,
                rate_rule: false,
                max_rate_fraction: 0.75,
            }
        );
        for (key, value) in [
            ("max-iterations", "-1"),
            ("max-sent-factor", "three"),
            ("rate-rule", "sometimes"),
            ("max-rate-fraction", "90"),
        ] {
            let err = XenLegacyPolicy::from_params(&params(&[(key, value)])).err();
            assert!(
                matches!(&err, Some(PolicyError::BadSetting { policy, key: k, .. })
                    if policy == "xen-legacy" && k == key),
                "{key}={value}: {err:?}"
            );
        }
        let err = XenLegacyPolicy::from_params(&params(&[("downtime-limit", "300")])).err();
        assert!(
            matches!(&err, Some(PolicyError::UnknownSetting { key, .. }) if key == "downtime-limit"),
            "{err:?}"
        );
    }
}
