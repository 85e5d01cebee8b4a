//! Steering a running migration from outside: cancel, new parameters, and
//! the downtime ramp.
//!
//! The API holds an `Arc<MigrationControl>` while the engine runs on
//! another thread. The engine looks at it only where a change is safe: the
//! cancel flag between page batches of a live iteration and at iteration
//! boundaries (never during stop-and-copy, when the guest is paused and the
//! destination is about to take over); a new downtime limit before the next
//! policy decision; the bandwidth cap on every write (the transport's
//! [`SharedRate`]).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::report::{ms, MigrationReport, MigrationStatus};
use crate::transport::SharedRate;

/// Shared between the engine and whoever steers the migration.
#[derive(Debug, Default)]
pub struct MigrationControl {
    gate: Mutex<Gate>,
    rate: SharedRate,
    downtime_limit: Mutex<Option<Duration>>,
    /// When `send_migration` started its clock.
    started: OnceLock<Instant>,
    /// Page-frame bytes written so far (live iterations), for live reports.
    sent: AtomicU64,
}

impl MigrationControl {
    /// Controls for a migration starting with this bandwidth cap.
    pub fn new(max_bandwidth: Option<u64>) -> Self {
        Self {
            gate: Mutex::new(Gate::default()),
            rate: SharedRate::new(max_bandwidth),
            downtime_limit: Mutex::new(None),
            started: OnceLock::new(),
            sent: AtomicU64::new(0),
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask the migration to stop at the next safe point (status
    /// `cancelled`): between page batches, at an iteration boundary, and
    /// during the switch-over up to the moment `Commit` is sent — until
    /// then the destination cannot have run the guest, so the source
    /// resumes it, as QEMU's `migrate_cancel` does in its `device` phase.
    /// Refused (`false`) from then on: `Commit` may have reached the
    /// destination, which may be running the guest.
    pub fn cancel(&self) -> bool {
        let mut g = self.gate();
        if g.committing {
            return false;
        }
        g.cancelled = true;
        true
    }

    /// Whether a cancel was asked for.
    pub fn cancelled(&self) -> bool {
        self.gate().cancelled
    }

    /// The engine is about to pause the guest for the final copy (live
    /// reports say `device` from now on). `false` if a cancel came first.
    pub(crate) fn begin_switchover(&self) -> bool {
        let mut g = self.gate();
        if g.cancelled {
            return false;
        }
        g.switching = true;
        true
    }

    /// The engine is about to send `Commit`: from now on `cancel` is
    /// refused. `false` if a cancel came first (the engine then tells the
    /// destination and resumes the source instead).
    pub(crate) fn begin_commit(&self) -> bool {
        let mut g = self.gate();
        if g.cancelled {
            return false;
        }
        g.committing = true;
        true
    }

    /// The bandwidth cap the stream writer obeys.
    pub fn rate(&self) -> &SharedRate {
        &self.rate
    }

    /// Change the bandwidth cap (`None`: unlimited), from the next write on.
    pub fn set_max_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.rate.set(bytes_per_sec);
    }

    /// Change the downtime limit, from the next policy decision on. This
    /// also ends a downtime ramp: the operator has taken over.
    pub fn set_downtime_limit(&self, limit: Duration) {
        *self
            .downtime_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(limit);
    }

    /// The engine's clock started now (the first call counts).
    pub(crate) fn start_clock(&self, at: Instant) {
        let _ = self.started.set(at);
    }

    /// Bytes of page frames just written.
    pub(crate) fn note_sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bring the latest per-iteration report of a migration still running
    /// up to now: `total-time` from the clock, `ram.transferred` from the
    /// bytes written so far, and `status` `device` (QEMU's name) once the
    /// switch-over has begun. Reports only change at iteration boundaries,
    /// which on a slow link can be minutes apart.
    pub fn refresh(&self, r: &mut MigrationReport) {
        if !matches!(
            r.status,
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Device
        ) {
            return;
        }
        if r.status == MigrationStatus::Active && self.gate().switching {
            r.status = MigrationStatus::Device;
        }
        if let Some(t) = self.started.get() {
            r.total_time = r.total_time.max(ms(t.elapsed()));
        }
        r.ram.transferred = r.ram.transferred.max(self.sent.load(Ordering::Relaxed));
    }

    /// The downtime limit set since the last call, if any.
    pub(crate) fn take_downtime_limit(&self) -> Option<Duration> {
        self.downtime_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Cancel and switch-over, decided under one lock so that a cancel is
/// either honoured or refused, never silently ignored.
#[derive(Debug, Default)]
struct Gate {
    cancelled: bool,
    switching: bool,
    committing: bool,
}

/// A downtime limit raised linearly from `start_ms` to `end_ms` in `steps`
/// steps, one step per iteration (as OpenStack Nova and KubeVirt raise
/// theirs over time): the decision after iteration *i* uses `start + (end −
/// start) × min(i, steps) / steps`. A guest that converges under a tight
/// limit pays only that; one that does not gets a looser limit each round
/// instead of iterating forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DowntimeRamp {
    /// Limit for the decision after iteration 0, ms (> 0).
    pub start_ms: u64,
    /// Limit from iteration `steps` on, ms (≥ `start_ms`).
    pub end_ms: u64,
    /// Iterations from `start_ms` to `end_ms` (≥ 1).
    pub steps: u32,
}

/// Why a downtime ramp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RampError {
    /// Not `START:END:STEPS`.
    #[error("downtime ramp {text:?} is not START:END:STEPS (milliseconds, milliseconds, count)")]
    Syntax {
        /// The text given.
        text: String,
    },
    /// A limit of 0 ms.
    #[error("downtime ramp starts at 0 ms: the guest could never be paused")]
    ZeroStart,
    /// The ramp goes down.
    #[error("downtime ramp goes down ({start_ms} ms to {end_ms} ms); END must be ≥ START")]
    Descending {
        /// Start limit.
        start_ms: u64,
        /// End limit.
        end_ms: u64,
    },
    /// No steps.
    #[error("downtime ramp needs at least 1 step")]
    NoSteps,
}

impl DowntimeRamp {
    /// Check the ramp's numbers.
    pub fn validate(&self) -> Result<(), RampError> {
        if self.start_ms == 0 {
            return Err(RampError::ZeroStart);
        }
        if self.end_ms < self.start_ms {
            return Err(RampError::Descending {
                start_ms: self.start_ms,
                end_ms: self.end_ms,
            });
        }
        if self.steps == 0 {
            return Err(RampError::NoSteps);
        }
        Ok(())
    }

    /// The limit for the decision after iteration `iteration`.
    pub fn limit_at(&self, iteration: u32) -> Duration {
        let k = u64::from(iteration.min(self.steps));
        let span = self.end_ms.saturating_sub(self.start_ms);
        let ms = self.start_ms + span * k / u64::from(self.steps.max(1));
        Duration::from_millis(ms)
    }
}

impl FromStr for DowntimeRamp {
    type Err = RampError;

    fn from_str(text: &str) -> Result<Self, RampError> {
        let syntax = || RampError::Syntax { text: text.into() };
        let parts: Vec<&str> = text.split(':').map(str::trim).collect();
        let [start, end, steps] = parts[..] else {
            return Err(syntax());
        };
        let ramp = Self {
            start_ms: start.parse().map_err(|_| syntax())?,
            end_ms: end.parse().map_err(|_| syntax())?,
            steps: steps.parse().map_err(|_| syntax())?,
        };
        ramp.validate()?;
        Ok(ramp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_parses_validates_and_steps_linearly() {
        let r: DowntimeRamp = "150:1050:3".parse().unwrap();
        assert_eq!(r.limit_at(0), Duration::from_millis(150));
        assert_eq!(r.limit_at(1), Duration::from_millis(450));
        assert_eq!(r.limit_at(2), Duration::from_millis(750));
        assert_eq!(r.limit_at(3), Duration::from_millis(1050));
        assert_eq!(r.limit_at(100), Duration::from_millis(1050));
        let flat: DowntimeRamp = "300:300:1".parse().unwrap();
        assert_eq!(flat.limit_at(5), Duration::from_millis(300));

        for bad in ["", "1:2", "1:2:3:4", "a:2:3", "1:2:-1", "1.5:2:3"] {
            assert!(
                matches!(bad.parse::<DowntimeRamp>(), Err(RampError::Syntax { .. })),
                "{bad}"
            );
        }
        assert_eq!("0:10:2".parse::<DowntimeRamp>(), Err(RampError::ZeroStart));
        assert!(matches!(
            "500:100:2".parse::<DowntimeRamp>(),
            Err(RampError::Descending { .. })
        ));
        assert_eq!("100:500:0".parse::<DowntimeRamp>(), Err(RampError::NoSteps));
    }

    #[test]
    fn control_hands_over_a_new_limit_once() {
        let c = MigrationControl::new(Some(1000));
        assert!(!c.cancelled());
        assert_eq!(c.take_downtime_limit(), None);
        c.set_downtime_limit(Duration::from_secs(2));
        assert_eq!(c.take_downtime_limit(), Some(Duration::from_secs(2)));
        assert_eq!(c.take_downtime_limit(), None);
        c.set_max_bandwidth(None);
        assert_eq!(c.rate().get(), None);
        assert!(c.cancel());
        assert!(c.cancelled());
        assert!(!c.begin_switchover(), "a cancel came first");

        let mut r = MigrationReport::new("qemu", "x", "none", 1 << 20);
        r.status = MigrationStatus::Active;
        c.start_clock(Instant::now() - Duration::from_secs(2));
        c.note_sent(5000);
        c.refresh(&mut r);
        assert!(r.total_time >= 2000.0 && r.ram.transferred == 5000, "{r:?}");
        r.status = MigrationStatus::Completed;
        r.total_time = 1.0;
        c.refresh(&mut r);
        assert_eq!(r.total_time, 1.0, "a final report is left alone");

        let paused = MigrationControl::new(None);
        assert!(paused.begin_switchover());
        assert!(
            paused.cancel(),
            "honoured while switching over, before Commit"
        );
        assert!(!paused.begin_commit(), "a cancel came first");

        let late = MigrationControl::new(None);
        assert!(late.begin_switchover());
        assert!(late.begin_commit());
        assert!(!late.cancel(), "refused once Commit is being sent");
        assert!(!late.cancelled());
    }
}
