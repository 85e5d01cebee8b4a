//! Xen's convergence rule: `simple_precopy_policy` of migration v2
//! (`tools/libs/guest/xg_sr_save.c`, formerly `tools/libxc/xc_sr_save.c`).
//!
//! Xen ignores bandwidth and downtime and uses two fixed numbers. After every
//! iteration, [`XenPolicy`] applies, in this order:
//!
//! 1. **Iteration cap.** If the number of completed iterations, counting the
//!    full copy (iteration 0) as one, has reached
//!    [`max_iterations`](XenPolicy::max_iterations) (default 5), answer
//!    [`Decision::StopAndCopy`] with [`StopReason::IterationLimit`].
//!    With the default, the live phase is the full copy plus 4 dirty passes
//!    (iterations 0 to 4), and the decision after iteration 4 is to stop.
//!    *Why:* it bounds the time and traffic of a guest that never converges.
//!    This counting matches Xen's: in `send_memory_live` the counter `x` is
//!    incremented before each live pass, the first full pass included, and
//!    `stats.iteration = x` is checked against `SPP_MAX_ITERATIONS` right
//!    after the pass and before the next log-dirty sync. So
//!    `SPP_MAX_ITERATIONS = 5` does *not* count only the dirty passes after
//!    the full one: Xen also sends 5 live passes in total (1 full + 4 dirty)
//!    before suspending the domain.
//! 2. **Dirty floor.** Otherwise, if fewer than
//!    [`target_dirty_pages`](XenPolicy::target_dirty_pages) pages (default
//!    50) were dirtied during the iteration (`dirtied_during`, the count the
//!    next sync finds), answer `StopAndCopy` with
//!    [`StopReason::FewDirtyPages`]. Exactly 50 pages continues (Xen tests
//!    `dirty_count < SPP_TARGET_DIRTY_COUNT`). *Why:* so few pages are sent in
//!    negligible time, and another live pass would not reduce the downtime.
//! 3. Otherwise answer [`Decision::Continue`].
//!
//! The cap is checked first because Xen does so: it asks the policy once
//! after the pass with an unknown dirty count (only the cap can fire), and
//! only then syncs the dirty log and asks again with the count.
//!
//! Settings ([`SETTINGS`]): `max-iterations` (count, default 5) and
//! `target-dirty-pages` (count, default 50). Xen has no downtime limit, so
//! [`PolicyParams::downtime_limit`] is not used.

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, MigrationHistory, PolicyError, PolicyParams, SettingDoc,
    StopReason,
};

/// The settings of `xen`.
pub const SETTINGS: &[SettingDoc] = &[
    SettingDoc {
        key: "max-iterations",
        default: "5",
        meaning: "stop once this many iterations ran, the full copy included (SPP_MAX_ITERATIONS)",
    },
    SettingDoc {
        key: "target-dirty-pages",
        default: "50",
        meaning: "stop when fewer pages than this were dirtied during an iteration (SPP_TARGET_DIRTY_COUNT)",
    },
];

/// Xen's rule: stop after a fixed number of iterations or when few pages
/// are dirty (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenPolicy {
    /// Stop once this many iterations have completed, the full copy
    /// (iteration 0) included. Xen's `SPP_MAX_ITERATIONS`, default 5.
    /// 0 or 1 both stop right after the full copy.
    pub max_iterations: u32,
    /// Stop when fewer than this many pages were dirtied during the last
    /// iteration. Xen's `SPP_TARGET_DIRTY_COUNT`, default 50.
    pub target_dirty_pages: u64,
}

impl XenPolicy {
    /// Xen's default iteration cap.
    pub const DEFAULT_MAX_ITERATIONS: u32 = 5;
    /// Xen's default dirty-page floor.
    pub const DEFAULT_TARGET_DIRTY_PAGES: u64 = 50;

    /// A policy with the given cap and floor.
    pub fn new(max_iterations: u32, target_dirty_pages: u64) -> Self {
        Self {
            max_iterations,
            target_dirty_pages,
        }
    }
}

impl XenPolicy {
    /// Build from `params.settings` (see [`SETTINGS`]).
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("xen", SETTINGS, params)?;
        Ok(Self::new(
            s.count_u32("max-iterations", Self::DEFAULT_MAX_ITERATIONS)?,
            s.count_u64("target-dirty-pages", Self::DEFAULT_TARGET_DIRTY_PAGES)?,
        ))
    }
}

impl Default for XenPolicy {
    /// Xen's numbers: 5 iterations, 50 pages.
    fn default() -> Self {
        Self::new(
            Self::DEFAULT_MAX_ITERATIONS,
            Self::DEFAULT_TARGET_DIRTY_PAGES,
        )
    }
}

impl ConvergencePolicy for XenPolicy {
    fn name(&self) -> &'static str {
        "xen"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let iterations = history.completed();
        if iterations >= self.max_iterations {
            Decision::StopAndCopy(StopReason::IterationLimit {
                iterations,
                predicted_downtime_ms: None,
            })
        } else if last.dirtied_during < self.target_dirty_pages {
            Decision::StopAndCopy(StopReason::FewDirtyPages {
                pages: last.dirtied_during,
            })
        } else {
            Decision::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IterationStats;
    use std::time::Duration;

    /// A history whose iterations left these dirty page counts.
    fn trace(dirtied: &[u64]) -> MigrationHistory {
        dirtied
            .iter()
            .zip(0..)
            .map(|(&d, i)| IterationStats {
                iteration: i,
                dirtied_during: d,
                bytes_sent: 1 << 20,
                duration: Duration::from_millis(10),
                page_size: 4096,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn defaults_are_xens() {
        let p = XenPolicy::default();
        assert_eq!((p.max_iterations, p.target_dirty_pages), (5, 50));
        assert_eq!(p.name(), "xen");
    }

    #[test]
    fn table() {
        use Decision::{Continue, StopAndCopy};
        use StopReason::{FewDirtyPages, IterationLimit};
        let limit = |iterations| {
            StopAndCopy(IterationLimit {
                iterations,
                predicted_downtime_ms: None,
            })
        };
        let few = |pages| StopAndCopy(FewDirtyPages { pages });
        // (dirtied_during of each iteration so far, decision after the last)
        let cases: Vec<(&[u64], Decision)> = vec![
            (&[], Continue),
            (&[1000], Continue),
            (&[50], Continue), // exactly 50: not fewer than 50
            (&[49], few(49)),
            (&[0], few(0)),
            (&[1000, 500, 51], Continue),
            (&[1000, 500, 50], Continue),
            (&[1000, 500, 49], few(49)),
            (&[1000; 4], Continue),                    // iterations 0..=3 done
            (&[1000; 5], limit(5)),                    // iteration 4 done: cap
            (&[1000, 1000, 1000, 1000, 10], limit(5)), // cap wins, as in Xen
            (&[1000; 6], limit(6)),
        ];
        for (dirtied, want) in cases {
            let got = XenPolicy::default().decide(&trace(dirtied));
            assert_eq!(got, want, "trace {dirtied:?}");
        }
    }

    #[test]
    fn stops_at_cap_when_replayed_step_by_step() {
        let mut p = XenPolicy::default();
        let mut h = MigrationHistory::new();
        let mut decisions = Vec::new();
        for i in 0..5 {
            h.push(trace(&[10_000]).iterations()[0].clone());
            decisions.push(p.decide(&h));
            assert_eq!(h.len(), i + 1);
        }
        assert!(decisions[..4].iter().all(|d| *d == Decision::Continue));
        assert!(matches!(
            decisions[4],
            Decision::StopAndCopy(StopReason::IterationLimit { iterations: 5, .. })
        ));
    }

    #[test]
    fn custom_numbers() {
        // (max_iterations, target_dirty_pages, trace, stops?)
        let cases: &[(u32, u64, &[u64], bool)] = &[
            (0, 50, &[1000], true),
            (1, 50, &[1000], true),
            (2, 50, &[1000], false),
            (30, 0, &[0; 29], false), // floor 0: never "fewer than 0"
            (30, 0, &[0; 30], true),
            (5, 1000, &[999], true),
            (5, 1000, &[1000], false),
        ];
        for &(max, target, dirtied, stops) in cases {
            let got = XenPolicy::new(max, target).decide(&trace(dirtied));
            assert_eq!(
                matches!(got, Decision::StopAndCopy(_)),
                stops,
                "max {max}, target {target}, trace {dirtied:?}: {got:?}"
            );
        }
    }

    #[test]
    fn settings() {
        let params = |pairs: &[(&str, &str)]| crate::PolicyParams {
            settings: pairs
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            XenPolicy::from_params(&params(&[])),
            Ok(XenPolicy::default())
        );
        let defaults: Vec<_> = SETTINGS.iter().map(|d| (d.key, d.default)).collect();
        assert_eq!(
            XenPolicy::from_params(&params(&defaults)),
            Ok(XenPolicy::default())
        );
        assert_eq!(
            XenPolicy::from_params(&params(&[
                ("max-iterations", "30"),
                ("target-dirty-pages", "0")
            ])),
            Ok(XenPolicy::new(30, 0))
        );
        let err = XenPolicy::from_params(&params(&[("max-iterations", "five")])).err();
        assert!(
            matches!(&err, Some(PolicyError::BadSetting { policy, key, value, .. })
                if policy == "xen" && key == "max-iterations" && value == "five"),
            "{err:?}"
        );
        let err = XenPolicy::from_params(&params(&[("max-sent-factor", "3")])).err();
        assert!(
            matches!(&err, Some(PolicyError::UnknownSetting { policy, key, known })
                if policy == "xen" && key == "max-sent-factor"
                    && known == "max-iterations, target-dirty-pages"),
            "{err:?}"
        );
    }
}
