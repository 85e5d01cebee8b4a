//! QEMU's auto-converge: the `qemu` rule, plus vCPU throttling when the
//! guest dirties memory too fast (`migration/ram.c`: `migration_bitmap_sync`,
//! `migration_trigger_throttle`, `mig_throttle_guest_down`; defaults in
//! `migration/options.c`).
//!
//! QEMU does not give up on a guest that dirties faster than the link: it
//! slows the guest down until the `qemu` rule can fire. After every
//! iteration, [`AutoConvergePolicy`] applies:
//!
//! 1. **Downtime rule.** Exactly the [`qemu`](crate::qemu) rule, checked
//!    first: when the remaining bytes fit in `bandwidth × downtime_limit`,
//!    answer [`Decision::StopAndCopy`] with
//!    [`StopReason::DowntimeReached`](crate::StopReason::DowntimeReached).
//!    *Why:* auto-converge only adds throttling to QEMU's rule.
//! 2. **Sync periods.** QEMU looks at the dirty rate at a dirty-log sync only
//!    when more than one second has passed since the current period began
//!    (`end_time > rs->time_last_bitmap_sync + 1000`); shorter syncs add
//!    their counts to the running period. Here an iteration closes a period
//!    when the summed durations of the iterations since the period began
//!    exceed `period` (default 1000 ms, strictly, as QEMU); the first period
//!    begins with iteration 0 (QEMU's begins at the setup sync, so its bulk
//!    pass counts too). With `period=0` every iteration of non-zero length
//!    is a period.
//! 3. **Strike.** A closed period is a strike when the bytes dirtied in it
//!    (Σ `dirtied_during × page_size`) exceed `trigger` (default 50%) of the
//!    bytes sent in it (Σ `bytes_sent`); equality is no strike (QEMU:
//!    `bytes_dirty_period > bytes_xfer_period * threshold / 100`).
//!    *Why 50%:* QEMU's `throttle-trigger-threshold` default.
//! 4. **Step on every second strike.** QEMU tests
//!    `++rs->dirty_rate_high_cnt >= 2` and resets the counter to 0 when it
//!    throttles. So strikes are counted since the last step, a period that
//!    is not a strike neither adds nor resets, and strikes 2, 4, 6, …
//!    (consecutive or not) each take one step. (QEMU 2.x tested
//!    `dirty_rate_high_cnt++ >= 2`, stepping at the third strike; the
//!    current form is the one implemented.) The first step sets the throttle
//!    to `initial` (default 20%), each further step adds `increment`
//!    (default 10%), up to `max` (default 99%): 20, 30, …, 90, 99% at strikes
//!    2, 4, …, 18. *Why:* QEMU's `cpu-throttle-initial`,
//!    `cpu-throttle-increment` and `max-cpu-throttle` defaults. QEMU does
//!    not cap the first step at `max`; here it is (an `initial` above `max`
//!    would otherwise be lowered by the next step). QEMU's optional
//!    `cpu-throttle-tailslow` (off by default) is not implemented.
//! 5. **Decision.** When the step changed the throttle, answer
//!    [`Decision::Throttle`] with the new fraction (the engine keeps it until
//!    told otherwise); otherwise (no step, or already at `max`)
//!    [`Decision::Continue`]. There is no iteration cap, as in QEMU.
//!
//! The throttle is a pure function of the history (rules 2 to 4 are replayed
//! over it, see [`AutoConvergePolicy::throttle`]), so a decision never
//! depends on calls that came before it. Fractions are kept to four decimal
//! places, so the steps are exactly 0.2, 0.3, … and never 0.30000000000000004.
//!
//! Settings ([`SETTINGS`]): `trigger`, `initial`, `increment`, `max`
//! (fractions from 1% to 99%, `trigger` up to 100%, as QEMU accepts) and
//! `period` (ms). The downtime limit comes from
//! [`PolicyParams::downtime_limit`] and can be changed in flight.

use std::time::Duration;

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, IterationStats, MigrationHistory, PolicyError, PolicyParams,
    QemuPolicy, SettingDoc,
};

/// The settings of `auto-converge`.
pub const SETTINGS: &[SettingDoc] = &[
    SettingDoc {
        key: "trigger",
        default: "50%",
        meaning: "a sync period is a strike when it dirtied more than this share of the bytes it sent (throttle-trigger-threshold)",
    },
    SettingDoc {
        key: "initial",
        default: "20%",
        meaning: "throttle set by the first step (cpu-throttle-initial)",
    },
    SettingDoc {
        key: "increment",
        default: "10%",
        meaning: "throttle added by each further step (cpu-throttle-increment)",
    },
    SettingDoc {
        key: "max",
        default: "99%",
        meaning: "highest throttle (max-cpu-throttle)",
    },
    SettingDoc {
        key: "period",
        default: "1000",
        meaning: "ms: iterations are pooled into sync periods longer than this before the dirty rate is judged",
    },
];

/// QEMU's auto-converge (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoConvergePolicy {
    qemu: QemuPolicy,
    /// Strike when a period dirtied more than this fraction of what it sent.
    pub trigger: f64,
    /// Throttle fraction of the first step.
    pub initial: f64,
    /// Throttle fraction added by each further step.
    pub increment: f64,
    /// Highest throttle fraction.
    pub max: f64,
    /// Minimum length of a sync period.
    pub period: Duration,
}

impl AutoConvergePolicy {
    /// QEMU's `throttle-trigger-threshold` (50%).
    pub const DEFAULT_TRIGGER: f64 = 0.5;
    /// QEMU's `cpu-throttle-initial` (20%).
    pub const DEFAULT_INITIAL: f64 = 0.2;
    /// QEMU's `cpu-throttle-increment` (10%).
    pub const DEFAULT_INCREMENT: f64 = 0.1;
    /// QEMU's `max-cpu-throttle` (99%).
    pub const DEFAULT_MAX: f64 = 0.99;
    /// QEMU's one-second sync period.
    pub const DEFAULT_PERIOD: Duration = Duration::from_millis(1000);
    /// Strikes per throttle step (QEMU's `dirty_rate_high_cnt >= 2`).
    pub const STRIKES_PER_STEP: u32 = 2;

    /// QEMU's defaults with this downtime limit.
    pub fn new(downtime_limit: Duration) -> Self {
        Self {
            qemu: QemuPolicy::new(downtime_limit),
            trigger: Self::DEFAULT_TRIGGER,
            initial: Self::DEFAULT_INITIAL,
            increment: Self::DEFAULT_INCREMENT,
            max: Self::DEFAULT_MAX,
            period: Self::DEFAULT_PERIOD,
        }
    }

    /// Build from `params` (downtime limit and [`SETTINGS`]).
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("auto-converge", SETTINGS, params)?;
        Ok(Self {
            qemu: QemuPolicy::new(params.downtime_limit),
            trigger: s.fraction("trigger", Self::DEFAULT_TRIGGER, 0.01, 1.0)?,
            initial: s.fraction("initial", Self::DEFAULT_INITIAL, 0.01, 0.99)?,
            increment: s.fraction("increment", Self::DEFAULT_INCREMENT, 0.01, 0.99)?,
            max: s.fraction("max", Self::DEFAULT_MAX, 0.01, 0.99)?,
            period: s.millis("period", Self::DEFAULT_PERIOD)?,
        })
    }

    /// The downtime limit currently in force.
    pub fn downtime_limit(&self) -> Duration {
        self.qemu.downtime_limit()
    }

    /// The throttle rules 2 to 4 reach after every iteration of `history`
    /// (0.0 = none).
    pub fn throttle(&self, history: &MigrationHistory) -> f64 {
        self.replay(history.iterations())
    }

    fn replay(&self, iterations: &[IterationStats]) -> f64 {
        let mut level = 0.0;
        let mut strikes = 0;
        let (mut time, mut dirtied, mut sent) = (Duration::ZERO, 0u64, 0u64);
        for it in iterations {
            time = time.saturating_add(it.duration);
            dirtied = dirtied.saturating_add(it.dirtied_during.saturating_mul(it.page_size));
            sent = sent.saturating_add(it.bytes_sent);
            if time <= self.period {
                continue;
            }
            if dirtied as f64 > self.trigger * sent as f64 {
                strikes += 1;
                if strikes >= Self::STRIKES_PER_STEP {
                    strikes = 0;
                    level = self.step(level);
                }
            }
            (time, dirtied, sent) = (Duration::ZERO, 0, 0);
        }
        level
    }

    /// One throttle step from `level` (QEMU's `mig_throttle_guest_down`).
    fn step(&self, level: f64) -> f64 {
        let next = if level == 0.0 {
            self.initial
        } else {
            level + self.increment
        };
        quantize(next.min(self.max))
    }
}

/// Round to four decimal places (the nearest double to k / 10000).
fn quantize(f: f64) -> f64 {
    (f * 1e4).round() / 1e4
}

impl Default for AutoConvergePolicy {
    /// QEMU's defaults, with [`DEFAULT_DOWNTIME_LIMIT`](crate::DEFAULT_DOWNTIME_LIMIT).
    fn default() -> Self {
        Self::new(crate::DEFAULT_DOWNTIME_LIMIT)
    }
}

impl ConvergencePolicy for AutoConvergePolicy {
    fn name(&self) -> &'static str {
        "auto-converge"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        let stop = self.qemu.decide(history);
        if stop != Decision::Continue {
            return stop;
        }
        let all = history.iterations();
        let before = self.replay(&all[..all.len().saturating_sub(1)]);
        let after = self.replay(all);
        if after == before {
            Decision::Continue
        } else {
            Decision::Throttle(after)
        }
    }

    fn set_downtime_limit(&mut self, limit: Duration) {
        self.qemu.set_downtime_limit(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StopReason;

    const PAGE: u64 = 4096;

    /// One iteration of `millis` ms that sent 100 MB and left `dirtied`
    /// pages: far above the 300 ms threshold (50 MB/s × 0.3 s = 15 MB) at
    /// 2 s, so the downtime rule never fires. A strike at the default
    /// trigger needs more than 50 MB = 12,207 pages.
    fn it(millis: u64, dirtied: u64) -> IterationStats {
        IterationStats {
            bytes_sent: 100_000_000,
            duration: Duration::from_millis(millis),
            dirtied_during: dirtied,
            page_size: PAGE,
            ram_bytes: 1 << 30,
            ..Default::default()
        }
    }

    const STRIKE: u64 = 20_000;
    const CALM: u64 = 10_000;

    /// Feed `trace` one iteration at a time and collect the decisions.
    fn run(p: &mut AutoConvergePolicy, trace: &[IterationStats]) -> Vec<Decision> {
        let mut h = MigrationHistory::new();
        trace
            .iter()
            .map(|s| {
                h.push(s.clone());
                p.decide(&h)
            })
            .collect()
    }

    #[test]
    fn throttle_steps_up_to_the_cap() {
        use Decision::{Continue, Throttle};
        let mut p = AutoConvergePolicy::default();
        let trace = vec![it(2000, STRIKE); 22];
        let got = run(&mut p, &trace);
        // Every period is a strike; every second strike takes a step.
        let steps = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99];
        let mut want = Vec::new();
        for &s in &steps {
            want.extend([Continue, Throttle(s)]);
        }
        want.extend(vec![Continue; 4]); // at 99%: further steps change nothing
        assert_eq!(got, want);
        assert_eq!(p.throttle(&trace.into()), 0.99);
    }

    #[test]
    fn strike_counting() {
        use Decision::{Continue, Throttle};
        let (s, c) = (it(2000, STRIKE), it(2000, CALM));
        let edge = it(2000, 50_000_000 / PAGE); // not a whole page count
        let exact = IterationStats {
            dirtied_during: 12_500,
            bytes_sent: 12_500 * PAGE * 2, // dirtied == 50% of sent exactly
            ..it(2000, 0)
        };
        // (periods, decisions)
        let cases: Vec<(Vec<IterationStats>, Vec<Decision>)> = vec![
            (vec![s.clone()], vec![Continue]),
            (vec![s.clone(), s.clone()], vec![Continue, Throttle(0.2)]),
            // A calm period neither counts nor resets.
            (
                vec![s.clone(), c.clone(), s.clone()],
                vec![Continue, Continue, Throttle(0.2)],
            ),
            (
                vec![c.clone(), s.clone(), c.clone(), c.clone(), s.clone()],
                vec![Continue, Continue, Continue, Continue, Throttle(0.2)],
            ),
            // The count restarts after each step.
            (
                vec![s.clone(), s.clone(), s.clone(), c.clone(), s.clone()],
                vec![Continue, Throttle(0.2), Continue, Continue, Throttle(0.3)],
            ),
            (vec![c.clone(); 6], vec![Continue; 6]),
            // 12,207 pages = 49,999,872 B: not above 50 MB.
            (vec![edge.clone(), edge], vec![Continue, Continue]),
            // Exactly 50%: not a strike (QEMU's test is strict).
            (vec![exact.clone(), exact], vec![Continue, Continue]),
        ];
        for (trace, want) in cases {
            let got = run(&mut AutoConvergePolicy::default(), &trace);
            assert_eq!(got, want, "{trace:?}");
        }
    }

    #[test]
    fn short_iterations_pool_into_one_second_periods() {
        // 400 ms iterations: a period closes at 1200 ms, every third
        // iteration (indices 2, 5, 8, 11); steps at the 2nd and 4th.
        let trace = vec![it(400, STRIKE); 12];
        let got = run(&mut AutoConvergePolicy::default(), &trace);
        for (i, d) in got.iter().enumerate() {
            let want = match i {
                5 => Decision::Throttle(0.2),
                11 => Decision::Throttle(0.3),
                _ => Decision::Continue,
            };
            assert_eq!(*d, want, "iteration {i}");
        }
        // 500 + 500 ms is not more than 1000 ms: the third closes it.
        let trace = vec![it(500, STRIKE); 6];
        let got = run(&mut AutoConvergePolicy::default(), &trace);
        assert_eq!(got[5], Decision::Throttle(0.2));
        assert!(got[..5].iter().all(|d| *d == Decision::Continue));
        // A period pools its iterations: a calm iteration alone is no
        // strike, but 20,000 + 10,000 + 10,000 pages (163.8 MB) against
        // 300 MB sent is more than 50%: a strike. (A 10 ms limit keeps the
        // calm iterations from fitting.)
        let pooled = [it(400, STRIKE), it(400, CALM), it(400, CALM)];
        let trace: Vec<_> = pooled.iter().chain(&pooled).cloned().collect();
        let mut p = AutoConvergePolicy::new(Duration::from_millis(10));
        assert_eq!(run(&mut p, &trace)[5], Decision::Throttle(0.2));
        // period = 0: every iteration is a period.
        let params = PolicyParams {
            settings: [("period".to_string(), "0".to_string())].into(),
            ..Default::default()
        };
        let mut p = AutoConvergePolicy::from_params(&params).unwrap();
        let got = run(&mut p, &[it(400, STRIKE), it(400, STRIKE)]);
        assert_eq!(got, [Decision::Continue, Decision::Throttle(0.2)]);
    }

    #[test]
    fn custom_steps_and_cap() {
        let mut p = AutoConvergePolicy {
            initial: 0.5,
            increment: 0.3,
            max: 0.9,
            ..Default::default()
        };
        let got = run(&mut p, &vec![it(2000, STRIKE); 8]);
        let throttles: Vec<f64> = got
            .iter()
            .filter_map(|d| match d {
                Decision::Throttle(f) => Some(*f),
                _ => None,
            })
            .collect();
        assert_eq!(throttles, [0.5, 0.8, 0.9]);
        // An initial step above the cap is capped.
        let mut p = AutoConvergePolicy {
            initial: 0.95,
            max: 0.6,
            ..Default::default()
        };
        let got = run(&mut p, &vec![it(2000, STRIKE); 4]);
        assert_eq!(got[1], Decision::Throttle(0.6));
        assert_eq!(got[3], Decision::Continue);
    }

    #[test]
    fn downtime_rule_comes_first() {
        // 250 pages left at 4,096,000 B per 1001 ms fit in 300 ms
        // (1,024,000 B ≤ 1,227,572 B). With a 1% trigger the iteration is
        // also a second strike, so a step is due: the stop wins.
        let fits = IterationStats {
            bytes_sent: 4096 * 1000,
            duration: Duration::from_millis(1001),
            dirtied_during: 250,
            ..it(0, 0)
        };
        let mut p = AutoConvergePolicy {
            trigger: 0.01,
            ..Default::default()
        };
        let got = run(&mut p, &[it(2000, STRIKE), fits.clone()]);
        assert_eq!(p.throttle(&vec![it(2000, STRIKE), fits].into()), 0.2);
        assert!(
            matches!(
                got[1],
                Decision::StopAndCopy(StopReason::DowntimeReached { .. })
            ),
            "{got:?}"
        );
        // Raising the limit in flight reaches the rule.
        let mut p = AutoConvergePolicy::default();
        let h: MigrationHistory = vec![it(2000, STRIKE)].into();
        assert_eq!(p.decide(&h), Decision::Continue);
        ConvergencePolicy::set_downtime_limit(&mut p, Duration::from_secs(60));
        assert_eq!(p.downtime_limit(), Duration::from_secs(60));
        assert!(matches!(p.decide(&h), Decision::StopAndCopy(_)));
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
        let default = AutoConvergePolicy::default();
        assert_eq!(
            AutoConvergePolicy::from_params(&params(&defaults)),
            Ok(default.clone())
        );
        assert_eq!(
            AutoConvergePolicy::from_params(&params(&[])),
            Ok(default.clone())
        );
        let p = AutoConvergePolicy::from_params(&params(&[
            ("trigger", "0.25"),
            ("initial", "30%"),
            ("increment", "5%"),
            ("max", "0.8"),
            ("period", "250ms"),
        ]))
        .unwrap();
        assert_eq!(
            (p.trigger, p.initial, p.increment, p.max, p.period),
            (0.25, 0.3, 0.05, 0.8, Duration::from_millis(250))
        );
        for (key, value) in [
            ("max", "100%"),
            ("initial", "0"),
            ("increment", "1.5"),
            ("trigger", "50"),
            ("period", "1s"),
        ] {
            let err = AutoConvergePolicy::from_params(&params(&[(key, value)])).err();
            assert!(
                matches!(&err, Some(PolicyError::BadSetting { policy, key: k, value: v, .. })
                    if policy == "auto-converge" && k == key && v == value),
                "{key}={value}: {err:?}"
            );
        }
        let err = AutoConvergePolicy::from_params(&params(&[("threshold", "50%")])).err();
        assert!(
            matches!(&err, Some(PolicyError::UnknownSetting { key, known, .. })
                if key == "threshold" && known == "trigger, initial, increment, max, period"),
            "{err:?}"
        );
    }
}
