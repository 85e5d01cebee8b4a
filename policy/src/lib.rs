//! Convergence policies for pre-copy live migration.
//!
//! A policy is pure: after every pre-copy iteration the engine hands it the
//! [`IterationStats`] of that iteration (plus the history of the earlier
//! ones, kept in [`MigrationHistory`]) and the policy answers with a
//! [`Decision`]. No KVM, no I/O, no clocks: every input is in the record, so
//! policies are unit-tested on made-up traces and a study can replay them.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod history;
pub mod qemu;
pub mod xen;

pub use history::{IterationStats, MigrationHistory};
pub use qemu::QemuPolicy;
pub use xen::XenPolicy;

use std::time::Duration;

/// Default downtime limit, the same as QEMU's `downtime-limit` (300 ms).
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(300);

/// Why a policy decided to enter stop-and-copy.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The remaining dirty bytes would be sent within the downtime limit.
    DowntimeReached {
        /// Predicted downtime of the final copy, in milliseconds.
        expected_downtime_ms: f64,
    },
    /// Fewer dirty pages than the policy's floor remain.
    FewDirtyPages {
        /// Dirty pages left after the last iteration.
        pages: u64,
    },
    /// The policy's iteration cap was reached.
    IterationLimit {
        /// Iterations completed so far (iteration 0 included).
        iterations: u32,
    },
    /// Too many bytes were sent compared to the guest's RAM.
    SentTooMuch {
        /// Bytes sent so far.
        bytes: u64,
    },
    /// The dirty set stopped shrinking while sending at full rate.
    NotConverging,
    /// Any other reason a policy wants to name.
    Other(String),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::DowntimeReached {
                expected_downtime_ms,
            } => write!(
                f,
                "expected downtime {expected_downtime_ms:.1} ms is within the limit"
            ),
            StopReason::FewDirtyPages { pages } => write!(f, "only {pages} dirty pages left"),
            StopReason::IterationLimit { iterations } => {
                write!(f, "iteration limit reached after {iterations} iterations")
            }
            StopReason::SentTooMuch { bytes } => write!(f, "{bytes} bytes sent, over the cap"),
            StopReason::NotConverging => write!(f, "dirty set no longer shrinking"),
            StopReason::Other(s) => f.write_str(s),
        }
    }
}

/// What the engine should do after an iteration.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run another pre-copy iteration.
    Continue,
    /// Pause the guest and send the rest.
    StopAndCopy(StopReason),
    /// Run another iteration with the vCPUs throttled to this fraction of
    /// their time (0.0 = unthrottled, 0.99 = run 1% of the time).
    Throttle(f64),
    /// Give up: the migration fails and the source keeps running.
    Abort(String),
}

/// A convergence policy.
///
/// `decide` is called once after every completed iteration (iteration 0, the
/// full copy, included). `history` holds every iteration so far, the one just
/// finished last.
pub trait ConvergencePolicy: Send {
    /// The policy's name as given on the command line (`qemu`, `xen`, ...).
    fn name(&self) -> &'static str;
    /// Decide what to do after the last iteration in `history`.
    fn decide(&mut self, history: &MigrationHistory) -> Decision;

    /// Whether the next pre-copy iteration should leave out the writable
    /// working set (pages dirty in both of the last two iterations): they
    /// will be dirty again, so the engine holds them for the final copy
    /// instead of sending them now. Asked after every `Continue`/`Throttle`.
    fn defer_writable_working_set(&self) -> bool {
        false
    }

    /// Change the downtime limit from the next decision on (orchestrators
    /// raise it in steps while a migration runs). Policies without one
    /// ignore it.
    fn set_downtime_limit(&mut self, _limit: Duration) {}
}

/// Parameters every policy may draw on.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyParams {
    /// Longest acceptable pause of the guest.
    pub downtime_limit: Duration,
    /// Policy-specific settings (`--param key=value` on the command line),
    /// checked by the policy: an unknown key is an error.
    pub settings: std::collections::BTreeMap<String, String>,
}

impl Default for PolicyParams {
    fn default() -> Self {
        Self {
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            settings: Default::default(),
        }
    }
}

/// Errors from building a policy by name.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    /// The name is not one of [`POLICY_NAMES`].
    #[error("unknown policy {name:?} (known: {known})")]
    Unknown {
        /// The name that was asked for.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
}

/// Names accepted by [`by_name`].
pub const POLICY_NAMES: &[&str] = &["qemu", "xen"];

/// Build a policy from its command-line name.
pub fn by_name(
    name: &str,
    params: &PolicyParams,
) -> Result<Box<dyn ConvergencePolicy>, PolicyError> {
    match name {
        "qemu" => Ok(Box::new(QemuPolicy::new(params.downtime_limit))),
        "xen" => Ok(Box::new(XenPolicy::default())),
        _ => Err(PolicyError::Unknown {
            name: name.to_string(),
            known: POLICY_NAMES.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_name_builds_every_known_policy() {
        let params = PolicyParams::default();
        for &name in POLICY_NAMES {
            let policy = by_name(name, &params).expect(name);
            assert_eq!(policy.name(), name);
        }
    }

    #[test]
    fn by_name_unknown_is_an_error() {
        for name in ["", "QEMU", "kvm", "xen "] {
            let err = by_name(name, &PolicyParams::default()).err();
            assert!(
                matches!(&err, Some(PolicyError::Unknown { name: n, known })
                    if n == name && known == "qemu, xen"),
                "{name:?}: {err:?}"
            );
        }
    }

    #[test]
    fn by_name_passes_the_downtime_limit() {
        let params = PolicyParams {
            downtime_limit: Duration::from_millis(1000),
            ..Default::default()
        };
        let mut qemu = by_name("qemu", &params).unwrap();
        // 1000 pages left at 4096 B/ms: needs 1000 ms, more than the default.
        let h: MigrationHistory = vec![IterationStats {
            bytes_sent: 4096 * 1000,
            duration: Duration::from_secs(1),
            dirtied_during: 1000,
            page_size: 4096,
            ..Default::default()
        }]
        .into();
        assert!(matches!(qemu.decide(&h), Decision::StopAndCopy(_)));
        let mut default = by_name("qemu", &PolicyParams::default()).unwrap();
        assert_eq!(default.decide(&h), Decision::Continue);
    }

    #[test]
    fn stop_reason_display_has_no_nan() {
        let r = StopReason::DowntimeReached {
            expected_downtime_ms: 12.34,
        };
        assert_eq!(
            r.to_string(),
            "expected downtime 12.3 ms is within the limit"
        );
    }
}
