//! Rule 7 of `mp`: throttle only the vCPUs that write.
//!
//! When the dirty ring attributes pages to vCPUs
//! ([`IterationStats::vcpu_dirty_pages`]) and a stuck guest's dirtying
//! comes from some of its vCPUs only — one vCPU logged at most a tenth of
//! the busiest one's entries — `mp` throttles the writers the way
//! `dirty-limit` does (each vCPU over `vcpu-dirty-limit` to the duty cycle
//! that brings it there; the others untouched) instead of stopping with the
//! writers' whole working set in the final copy. It then gives the
//! throttle `throttle-patience` iterations to bring the guest within rule
//! 1's downtime limit; a guest still stuck after that (a link slower than
//! even a 99%-throttled writer, dirty-limit's weak case: 119 iterations at
//! 16 MB/s) is stopped by rule 4 as without the rule.
//!
//! *Why:* in the study's `hotset256m-w1-2vcpu-1g` (vCPU 0 rewrites 256 MiB,
//! vCPU 1 only computes), `dirty-limit` migrated in 5.6 s with 0.62 × RAM
//! and 226–317 ms of downtime, the computing vCPU at full speed, against
//! `mp`'s 6.8 s, 0.75 × RAM and 2.28 s of downtime. A guest whose vCPUs all
//! write is not singled out (throttling them all is auto-converge, which
//! `mp` exists to avoid), nor is a guest that converges (the rule needs a
//! stuck iteration), nor anything tracked by the bitmap (no counts).

use crate::dirty_limit::MAX_THROTTLE;
use crate::{Decision, DirtyLimitPolicy, IterationStats, MigrationHistory};

/// Default of `throttle-patience`: iterations a throttle gets to work.
pub const DEFAULT_PATIENCE: u32 = 2;

/// Rule 7's settings and state.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterThrottle {
    /// `writer-throttle`: the rule is on.
    pub enabled: bool,
    /// Computes the throttles (its `limit`, bytes/s, is `vcpu-dirty-limit`).
    pub limiter: DirtyLimitPolicy,
    /// `throttle-patience`.
    pub patience: u32,
    /// History length when the first throttle was asked for.
    started: Option<usize>,
}

impl WriterThrottle {
    /// The rule on (`enabled`) with a limit of `limit_mb` MB/s per vCPU and
    /// `patience` throttled iterations.
    pub fn configured(enabled: bool, limit_mb: f64, patience: u32) -> Self {
        let mut limiter = DirtyLimitPolicy::default();
        limiter.limit = limit_mb * DirtyLimitPolicy::MB;
        Self {
            enabled,
            limiter,
            patience,
            started: None,
        }
    }

    /// Whether a throttle is in force (rule 6 then holds nothing back).
    pub fn active(&self) -> bool {
        self.started.is_some()
    }

    /// The vCPUs' counts single out writers: two or more vCPUs, and one
    /// logged at most a tenth of the busiest one's entries.
    fn writers_stand_out(it: &IterationStats) -> bool {
        let counts = &it.vcpu_dirty_pages;
        let max = counts.iter().copied().max().unwrap_or(0);
        let min = counts.iter().copied().min().unwrap_or(0);
        counts.len() >= 2 && max > 0 && min.saturating_mul(10) <= max
    }

    /// Rule 7 after the last iteration of `history`, `stuck` as rule 4
    /// sees it. `Some` overrides rule 4 (a throttle, or waiting for one
    /// to work); `None` leaves the decision to rule 4.
    pub fn decide(&mut self, history: &MigrationHistory, stuck: bool) -> Option<Decision> {
        if !self.enabled {
            return None;
        }
        let last = history.last()?;
        if let Some(start) = self.started {
            let waited = history.len().saturating_sub(start);
            let capped = last
                .vcpu_throttles
                .iter()
                .all(|&t| t == 0.0 || t >= MAX_THROTTLE);
            if stuck && (waited >= self.patience as usize || capped && waited >= 1) {
                return None;
            }
            let (throttles, changed) = self.limiter.throttles(last)?;
            return Some(if changed {
                Decision::ThrottleVcpus(throttles)
            } else {
                Decision::Continue
            });
        }
        if !stuck || !Self::writers_stand_out(last) {
            return None;
        }
        let (throttles, changed) = self.limiter.throttles(last)?;
        if !changed {
            return None;
        }
        self.started = Some(history.len());
        Some(Decision::ThrottleVcpus(throttles))
    }
}
