//! The orchestrators' answer to non-convergence: QEMU's rule with the
//! downtime limit raised in steps while the migration runs (OpenStack Nova's
//! `live_migration_downtime{,_steps,_delay}`; KubeVirt's proposal ramps from
//! 150 ms to 1050 ms).
//!
//! Time is migration time as the history records it: `t` = the sum of the
//! durations of the iterations so far (no clock in the policy). After every
//! iteration [`RampPolicy`] applies:
//!
//! 1. **Step delay.** `delay = max(min-delay, delay-per-gib × RAM in GiB)`
//!    (defaults 3 s and 75 s/GiB: Nova scales the wait between steps by the
//!    guest's size, never below 3 s).
//! 2. **Schedule.** At `t`, step `k = min(steps, ⌊t ÷ delay⌋)` is in force,
//!    and the limit is `start + (end − start) × k ÷ steps` (defaults 150 ms,
//!    1050 ms, 10 steps: KubeVirt's ramp; Nova's is 50 → 500 ms). After the
//!    last step the limit stays at `end`.
//! 3. **Operator floor.** [`set_downtime_limit`](ConvergencePolicy::set_downtime_limit)
//!    (`migrate-set-parameters`) sets a floor: the limit is the larger of
//!    the schedule's and the floor (none at first; `--downtime-limit` is not
//!    used, the schedule replaces it).
//! 4. **Stop.** The [`qemu`](crate::qemu) rule with that limit. Like QEMU,
//!    no iteration cap: a guest that needs more than `end` never finishes,
//!    and the engine's `--timeout` ends it.

use std::time::Duration;

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, MigrationHistory, PolicyError, PolicyParams, QemuPolicy,
    SettingDoc,
};

/// The settings of `ramp`.
pub const SETTINGS: &[SettingDoc] = &[
    SettingDoc {
        key: "start",
        default: "150ms",
        meaning: "downtime limit at the start of the migration",
    },
    SettingDoc {
        key: "end",
        default: "1050ms",
        meaning: "downtime limit after the last step",
    },
    SettingDoc {
        key: "steps",
        default: "10",
        meaning: "number of equal steps from start to end",
    },
    SettingDoc {
        key: "delay-per-gib",
        default: "75s",
        meaning: "time between steps per GiB of guest RAM (Nova's live_migration_downtime_delay)",
    },
    SettingDoc {
        key: "min-delay",
        default: "3s",
        meaning: "shortest time between steps, whatever the RAM size",
    },
];

/// QEMU's rule with a stepped downtime limit (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct RampPolicy {
    /// Rule 2: limit at step 0.
    pub start: Duration,
    /// Rule 2: limit at the last step.
    pub end: Duration,
    /// Rule 2: number of steps (at least 1).
    pub steps: u32,
    /// Rule 1: wait between steps per GiB of RAM.
    pub delay_per_gib: Duration,
    /// Rule 1: shortest wait between steps.
    pub min_delay: Duration,
    floor: Duration,
}

impl RampPolicy {
    /// The defaults (KubeVirt's 150 → 1050 ms in 10 steps, Nova's delays).
    pub fn new() -> Self {
        Self {
            start: Duration::from_millis(150),
            end: Duration::from_millis(1050),
            steps: 10,
            delay_per_gib: Duration::from_secs(75),
            min_delay: Duration::from_secs(3),
            floor: Duration::ZERO,
        }
    }

    /// Build from `params` ([`SETTINGS`]; the downtime limit is not used).
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("ramp", SETTINGS, params)?;
        let d = Self::new();
        Ok(Self {
            start: s.millis("start", d.start)?,
            end: s.millis("end", d.end)?,
            steps: s.count_at_least("steps", d.steps, 1)?,
            delay_per_gib: s.seconds("delay-per-gib", d.delay_per_gib)?,
            min_delay: s.seconds("min-delay", d.min_delay)?,
            ..d
        })
    }

    /// Rule 1 for a guest of `ram_bytes`.
    pub fn step_delay(&self, ram_bytes: u64) -> Duration {
        let gib = ram_bytes as f64 / f64::from(1u32 << 30);
        let scaled = Duration::try_from_secs_f64(self.delay_per_gib.as_secs_f64() * gib)
            .unwrap_or(Duration::MAX);
        scaled.max(self.min_delay)
    }

    /// Rules 2 and 3: the limit in force at migration time `t`.
    pub fn limit_at(&self, t: Duration, ram_bytes: u64) -> Duration {
        let delay = self.step_delay(ram_bytes);
        let k = if delay.is_zero() {
            self.steps
        } else {
            let k = t.as_secs_f64() / delay.as_secs_f64();
            // Truncation is the rule (a step is in force once reached).
            #[allow(clippy::cast_possible_truncation)]
            let k = k.floor().min(f64::from(self.steps)) as u32;
            k
        };
        let start = self.start.as_secs_f64();
        let span = self.end.as_secs_f64() - start;
        let limit = start + span * f64::from(k) / f64::from(self.steps);
        Duration::try_from_secs_f64(limit.max(0.0))
            .unwrap_or(self.end)
            .max(self.floor)
    }
}

impl Default for RampPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl ConvergencePolicy for RampPolicy {
    fn name(&self) -> &'static str {
        "ramp"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let t: Duration = history.iterations().iter().map(|i| i.duration).sum();
        QemuPolicy::new(self.limit_at(t, last.ram_bytes)).decide(history)
    }

    fn set_downtime_limit(&mut self, limit: Duration) {
        self.floor = limit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IterationStats, StopReason};

    const GIB: u64 = 1 << 30;
    const MB: u64 = 1_000_000;

    /// A 1 s iteration at 100 MB/s of a 1 GiB guest leaving `left` MB.
    fn it(left: u64) -> IterationStats {
        IterationStats {
            bytes_sent: 100 * MB,
            duration: Duration::from_secs(1),
            dirtied_during: left * MB / 4096,
            page_size: 4096,
            ram_bytes: GIB,
            ..Default::default()
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn schedule_steps_from_start_to_end() {
        let p = RampPolicy::new();
        // 1 GiB: 75 s between steps; 90 ms per step.
        assert_eq!(p.step_delay(GIB), Duration::from_secs(75));
        assert_eq!(p.limit_at(Duration::ZERO, GIB), ms(150));
        assert_eq!(p.limit_at(Duration::from_secs(74), GIB), ms(150));
        assert_eq!(p.limit_at(Duration::from_secs(75), GIB), ms(240));
        assert_eq!(p.limit_at(Duration::from_secs(750), GIB), ms(1050));
        assert_eq!(p.limit_at(Duration::from_secs(10_000), GIB), ms(1050));
        // Small guests wait the minimum: 256 MiB × 75 s/GiB = 18.75 s; 1 MiB → 3 s.
        assert_eq!(p.step_delay(GIB / 4), Duration::from_millis(18_750));
        assert_eq!(p.step_delay(1 << 20), Duration::from_secs(3));
    }

    #[test]
    fn stops_once_the_ramp_reaches_what_the_guest_needs() {
        // 50 MB left at 100 MB/s needs 500 ms: with 1 s steps of 90 ms that
        // is step 4 (510 ms), reached at t = 4 s, the end of iteration 3.
        let params = PolicyParams {
            settings: [
                ("delay-per-gib".to_string(), "1".to_string()),
                ("min-delay".to_string(), "0".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let mut p = RampPolicy::from_params(&params).unwrap();
        let trace: Vec<_> = (0..8).map(|_| it(50)).collect();
        let d: Vec<_> = (1..=trace.len())
            .map(|n| p.decide(&trace[..n].to_vec().into()))
            .collect();
        let stop = d
            .iter()
            .position(|d| matches!(d, Decision::StopAndCopy(StopReason::DowntimeReached { .. })));
        assert_eq!(stop, Some(3), "{d:?}");
    }

    #[test]
    fn a_guest_that_needs_more_than_end_never_stops() {
        let params = PolicyParams {
            settings: [("delay-per-gib".to_string(), "0.1".to_string())].into(),
            ..Default::default()
        };
        let mut p = RampPolicy::from_params(&params).unwrap();
        // 3 s worth left; the ramp tops out at 1.05 s.
        let trace: Vec<_> = (0..40).map(|_| it(300)).collect();
        assert_eq!(p.decide(&trace.into()), Decision::Continue);
    }

    #[test]
    fn operator_floor_and_bad_settings() {
        let mut p = RampPolicy::new();
        p.set_downtime_limit(ms(2000));
        assert_eq!(p.limit_at(Duration::ZERO, GIB), ms(2000));
        assert!(matches!(
            p.decide(&vec![it(150)].into()),
            Decision::StopAndCopy(_)
        ));
        let params = PolicyParams {
            settings: [("steps".to_string(), "0".to_string())].into(),
            ..Default::default()
        };
        assert!(matches!(
            RampPolicy::from_params(&params),
            Err(PolicyError::BadSetting { .. })
        ));
    }
}
