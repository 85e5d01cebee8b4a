//! QEMU 8.1's dirty-limit: the `qemu` rule, plus a throttle on each vCPU
//! that dirties memory faster than a per-vCPU limit (QEMU's `dirty-limit`
//! capability with `vcpu-dirty-limit`, built on the KVM dirty ring).
//!
//! auto-converge slows every vCPU alike, so a vCPU that only computes pays
//! for one that writes. dirty-limit measures each vCPU's own dirty rate
//! (the dirty ring says which vCPU dirtied which page) and throttles only
//! the vCPUs above the limit. After every iteration, [`DirtyLimitPolicy`]
//! applies:
//!
//! 1. **Needs per-vCPU counts.** The iteration must carry
//!    [`IterationStats::vcpu_dirty_pages`] (the engine fills it from the
//!    dirty rings, `--dirty-track ring`); with the bitmap it is empty and
//!    the policy answers [`Decision::Abort`] after iteration 0, naming the
//!    fix. *Why:* without per-vCPU counts the policy cannot tell the vCPUs
//!    apart, and silently falling back to auto-converge or plain `qemu`
//!    would report a dirty-limit run that did not limit anything. The
//!    check is in the policy (not only the CLI) so the API, the study and
//!    replays refuse alike.
//! 2. **Downtime rule.** Exactly the [`qemu`](crate::qemu) rule, checked
//!    first (after rule 1): remaining ÷ bandwidth ≤ downtime limit →
//!    [`Decision::StopAndCopy`]. *Why:* dirty-limit only adds throttling to
//!    QEMU's rule.
//! 3. **Per-vCPU rate.** vCPU *i*'s rate is `r = vcpu_dirty_pages[i] ×
//!    page_size ÷ duration` bytes per second. Under `kvm_pvm` an entry is
//!    one emulated store, not a distinct page, so `r` is a store rate that
//!    is at least the distinct-page rate: limiting it bounds the page rate
//!    too. An iteration of zero length measures nothing and changes
//!    nothing.
//! 4. **Throttle the vCPUs over the limit.** With `t` the throttle vCPU *i*
//!    ran under in the iteration ([`IterationStats::vcpu_throttles`],
//!    0 when missing) and `L` the limit, a vCPU with `r > L` gets
//!    `t' = 1 − L·(1 − t)/r`, clamped to 0..=0.99, kept only if above `t`.
//!    *Why:* the vCPU ran `1 − t` of the time, so unthrottled it would dirty
//!    `r/(1 − t)`; running `1 − t'` of the time brings that to `L`. The
//!    throttle is only ever raised: a vCPU at or under the limit keeps its
//!    throttle (lowering it would put it back over, and the throttle would
//!    oscillate between iterations). vCPUs never over the limit stay at 0.
//!    QEMU's dirtylimit thread adjusts its throttle both ways once a
//!    second; here one step per iteration, upwards only.
//! 5. **Decision.** When any vCPU's throttle changed, answer
//!    [`Decision::ThrottleVcpus`] with every vCPU's throttle; otherwise
//!    [`Decision::Continue`]. There is no iteration cap, as in QEMU: a
//!    vCPU at 99% that still dirties faster than the link sends keeps the
//!    migration going.
//!
//! QEMU starts limiting only when auto-converge's trigger fires (dirty
//! bytes above 50% of sent bytes in two sync periods); here the limit is in
//! force from the first decision, as if the trigger had fired: a vCPU under
//! the limit is not touched either way, and the guests this policy is for
//! dirty far above it from the start.
//!
//! Setting ([`SETTINGS`]): `vcpu-dirty-limit`, in MB/s (1 MB = 2^20 bytes,
//! as QEMU's dirty-rate code counts), default
//! [`DirtyLimitPolicy::DEFAULT_LIMIT_MB`] = 32. QEMU's default is 1 MB/s;
//! on our emulated guests a full-speed vCPU dirties about 1 GiB/s, so
//! 1 MB/s asks for 99.9% and every writing vCPU lands on the 99% cap in
//! one step: the limit would mean nothing but "maximum throttle". 32 MB/s
//! is about 3% of such a vCPU (a throttle near 97%, under the cap, so the
//! rule's estimate is what sets it) and a quarter of the slowest emulated
//! link the study uses (1 Gbit/s ≈ 119 MB/s): each iteration then has at
//! most a quarter of the previous one's pages to send from each throttled
//! vCPU and the qemu rule can fire.

use std::time::Duration;

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, MigrationHistory, PolicyError, PolicyParams, QemuPolicy,
    SettingDoc,
};

/// `dirty-limit`'s settings (key, default, meaning).
pub const SETTINGS: &[SettingDoc] = &[SettingDoc {
    key: "vcpu-dirty-limit",
    default: "32",
    meaning: "MB/s (2^20 B): throttle each vCPU that dirties faster than this, down to it (QEMU's vcpu-dirty-limit, default 1 there)",
}];

/// Highest throttle a vCPU gets (QEMU's `max-cpu-throttle` default).
pub const MAX_THROTTLE: f64 = 0.99;

/// QEMU's dirty-limit (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct DirtyLimitPolicy {
    qemu: QemuPolicy,
    /// The per-vCPU limit in bytes per second.
    pub limit: f64,
}

impl DirtyLimitPolicy {
    /// Default `vcpu-dirty-limit` in MB/s (see the module docs for why not
    /// QEMU's 1).
    pub const DEFAULT_LIMIT_MB: f64 = 32.0;
    /// Bytes in the limit's MB.
    pub const MB: f64 = 1_048_576.0;

    /// The default limit with this downtime limit.
    pub fn new(downtime_limit: Duration) -> Self {
        Self {
            qemu: QemuPolicy::new(downtime_limit),
            limit: Self::DEFAULT_LIMIT_MB * Self::MB,
        }
    }

    /// Build from `params` (downtime limit and [`SETTINGS`]); the limit
    /// must be positive.
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("dirty-limit", SETTINGS, params)?;
        let mb = s.factor("vcpu-dirty-limit", Self::DEFAULT_LIMIT_MB)?;
        if mb <= 0.0 {
            return Err(PolicyError::BadSetting {
                policy: "dirty-limit".to_string(),
                key: "vcpu-dirty-limit".to_string(),
                value: params.settings["vcpu-dirty-limit"].clone(),
                reason: "must be above 0".to_string(),
            });
        }
        Ok(Self {
            qemu: QemuPolicy::new(params.downtime_limit),
            limit: mb * Self::MB,
        })
    }

    /// The downtime limit currently in force.
    pub fn downtime_limit(&self) -> Duration {
        self.qemu.downtime_limit()
    }

    /// Rules 3 and 4: the throttle of each vCPU after `stats` (index
    /// order), and whether any changed. `None` without per-vCPU counts.
    pub fn throttles(&self, stats: &crate::IterationStats) -> Option<(Vec<f64>, bool)> {
        if stats.vcpu_dirty_pages.is_empty() {
            return None;
        }
        let secs = stats.duration.as_secs_f64();
        let mut changed = false;
        let out = stats
            .vcpu_dirty_pages
            .iter()
            .enumerate()
            .map(|(i, &count)| {
                let t = stats.vcpu_throttles.get(i).copied().unwrap_or(0.0);
                if secs <= 0.0 {
                    return t;
                }
                let rate = count.saturating_mul(stats.page_size) as f64 / secs;
                if rate <= self.limit {
                    return t;
                }
                let wanted =
                    quantize((1.0 - self.limit * (1.0 - t) / rate).clamp(0.0, MAX_THROTTLE));
                if wanted > t {
                    changed = true;
                    wanted
                } else {
                    t
                }
            })
            .collect();
        Some((out, changed))
    }
}

/// Round to four decimal places, as auto-converge does: reports show 0.9688,
/// not 0.96875000000001.
fn quantize(f: f64) -> f64 {
    (f * 1e4).round() / 1e4
}

impl Default for DirtyLimitPolicy {
    /// The default limit with [`DEFAULT_DOWNTIME_LIMIT`](crate::DEFAULT_DOWNTIME_LIMIT).
    fn default() -> Self {
        Self::new(crate::DEFAULT_DOWNTIME_LIMIT)
    }
}

impl ConvergencePolicy for DirtyLimitPolicy {
    fn name(&self) -> &'static str {
        "dirty-limit"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let Some((throttles, changed)) = self.throttles(last) else {
            return Decision::Abort(
                "dirty-limit needs per-vCPU dirty counts: run the source VM with \
                 --dirty-track ring (the bitmap cannot tell which vCPU dirtied a page)"
                    .to_string(),
            );
        };
        let stop = self.qemu.decide(history);
        if stop != Decision::Continue {
            return stop;
        }
        if changed {
            Decision::ThrottleVcpus(throttles)
        } else {
            Decision::Continue
        }
    }

    fn set_downtime_limit(&mut self, limit: Duration) {
        self.qemu.set_downtime_limit(limit);
    }
}

#[cfg(test)]
mod tests;
