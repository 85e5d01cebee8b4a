//! Convergence policies for pre-copy live migration.
//!
//! A policy is pure: after every pre-copy iteration the engine hands it the
//! [`IterationStats`] of that iteration (plus the history of the earlier
//! ones, kept in [`MigrationHistory`]) and the policy answers with a
//! [`Decision`]. No KVM, no I/O, no clocks: every input is in the record, so
//! policies are unit-tested on made-up traces and a study can replay them.
//!
//! Policies, by their [`by_name`] names: `qemu` ([`qemu`]), `auto-converge`
//! ([`auto_converge`]), `xen` ([`xen`], migration v2), `xen-legacy`
//! ([`xen_legacy`]), `mp` ([`mp`], the memory-pattern policy), and the newer
//! answers a reviewer compares MP with: `ch` ([`ch`], Cloud Hypervisor's
//! rule), `stall` ([`stall`], KubeVirt's stall detection) and `ramp`
//! ([`ramp`], the orchestrators' stepped downtime limit), and
//! `dirty-limit` ([`dirty_limit`], QEMU 8.1's per-vCPU throttle, which
//! needs the dirty ring). Each
//! module's docs number its rules and give their source; [`describe`] lists
//! each policy's settings.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auto_converge;
pub mod ch;
pub mod dirty_limit;
mod history;
pub mod mp;
pub mod qemu;
pub mod ramp;
mod settings;
pub mod stall;
pub mod xen;
pub mod xen_legacy;

pub use auto_converge::AutoConvergePolicy;
pub use ch::ChPolicy;
pub use dirty_limit::DirtyLimitPolicy;
pub use history::{IterationStats, MigrationHistory, DIRTY_WINDOW};
pub use mp::MpPolicy;
pub use qemu::QemuPolicy;
pub use ramp::RampPolicy;
pub use settings::SettingDoc;
pub use stall::StallPolicy;
pub use xen::XenPolicy;
pub use xen_legacy::XenLegacyPolicy;

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
        /// Predicted downtime of the final copy, in milliseconds, for
        /// policies that predict one (`None`: not predicted, or no bandwidth
        /// sample yet).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        predicted_downtime_ms: Option<f64>,
    },
    /// Too many bytes were sent compared to the guest's RAM.
    SentTooMuch {
        /// Bytes sent so far.
        bytes: u64,
        /// Predicted downtime of the final copy, in milliseconds, for
        /// policies that predict one (`None`: not predicted, or no bandwidth
        /// sample yet).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        predicted_downtime_ms: Option<f64>,
    },
    /// The dirty set stopped shrinking while sending at full rate.
    NotConverging,
    /// The guest is memory-intensive and more iterations would not shrink
    /// the final copy (the `mp` policy).
    MemoryIntensive {
        /// Consecutive iterations that were memory-intensive without
        /// progress when the policy stopped.
        iterations: u32,
        /// Bytes the final copy is predicted to send.
        remaining_bytes: u64,
        /// Predicted downtime of the final copy (remaining bytes ÷ the last
        /// measured bandwidth), in milliseconds; `None` without a bandwidth
        /// sample.
        predicted_downtime_ms: Option<f64>,
    },
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
            StopReason::IterationLimit {
                iterations,
                predicted_downtime_ms,
            } => {
                write!(f, "iteration limit reached after {iterations} iterations")?;
                write_prediction(f, *predicted_downtime_ms)
            }
            StopReason::SentTooMuch {
                bytes,
                predicted_downtime_ms,
            } => {
                write!(f, "{bytes} bytes sent, over the cap")?;
                write_prediction(f, *predicted_downtime_ms)
            }
            StopReason::NotConverging => write!(f, "dirty set no longer shrinking"),
            StopReason::MemoryIntensive {
                iterations,
                remaining_bytes,
                predicted_downtime_ms,
            } => {
                write!(
                    f,
                    "memory-intensive guest, no progress for {iterations} iterations: \
                     {remaining_bytes} bytes left"
                )?;
                match predicted_downtime_ms {
                    Some(ms) => write!(f, ", predicted downtime {ms:.1} ms"),
                    None => write!(f, ", predicted downtime unknown"),
                }
            }
            StopReason::Other(s) => f.write_str(s),
        }
    }
}

/// `", predicted downtime 12.3 ms"`, or nothing without a prediction.
fn write_prediction(f: &mut std::fmt::Formatter<'_>, ms: Option<f64>) -> std::fmt::Result {
    match ms {
        Some(ms) => write!(f, ", predicted downtime {ms:.1} ms"),
        None => Ok(()),
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
    /// Run another iteration with each vCPU throttled to its own fraction
    /// (index order; a vCPU missing from the list is unthrottled), as
    /// QEMU's dirty-limit does: only the vCPUs that dirty memory slow down.
    ThrottleVcpus(Vec<f64>),
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
    /// instead of sending them now. Asked after every `Continue`/`Throttle`;
    /// a `false` while pages are held makes the engine send them in the
    /// next iteration.
    fn defer_writable_working_set(&self) -> bool {
        false
    }

    /// Change the downtime limit from the next decision on (orchestrators
    /// raise it in steps while a migration runs). `qemu`, `auto-converge`,
    /// `mp`, `ch` and `stall` use it; `ramp` takes it as a floor under its
    /// schedule; `xen` and `xen-legacy`, which have no downtime limit,
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
    /// A setting key the policy does not have.
    #[error("policy {policy}: unknown setting {key:?} (known: {known})")]
    UnknownSetting {
        /// The policy's name.
        policy: String,
        /// The key that was given.
        key: String,
        /// The policy's keys, comma separated (`none` if it has none).
        known: String,
    },
    /// A setting whose value does not parse or is out of range.
    #[error("policy {policy}: bad value {value:?} for {key}: {reason}")]
    BadSetting {
        /// The policy's name.
        policy: String,
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Names accepted by [`by_name`].
pub const POLICY_NAMES: &[&str] = &[
    "qemu",
    "auto-converge",
    "xen",
    "xen-legacy",
    "mp",
    "ch",
    "stall",
    "ramp",
    "dirty-limit",
];

/// Build a policy from its command-line name, with `params.downtime_limit`
/// (for the policies that have one) and its `params.settings` (see
/// [`describe`]); an unknown key or a bad value is an error.
pub fn by_name(
    name: &str,
    params: &PolicyParams,
) -> Result<Box<dyn ConvergencePolicy>, PolicyError> {
    Ok(match name {
        "qemu" => {
            settings::Settings::new("qemu", qemu::SETTINGS, params)?;
            Box::new(QemuPolicy::new(params.downtime_limit))
        }
        "auto-converge" => Box::new(AutoConvergePolicy::from_params(params)?),
        "xen" => Box::new(XenPolicy::from_params(params)?),
        "xen-legacy" => Box::new(XenLegacyPolicy::from_params(params)?),
        "mp" => Box::new(MpPolicy::from_params(params)?),
        "ch" => Box::new(ChPolicy::from_params(params)?),
        "stall" => Box::new(StallPolicy::from_params(params)?),
        "ramp" => Box::new(RampPolicy::from_params(params)?),
        "dirty-limit" => Box::new(DirtyLimitPolicy::from_params(params)?),
        _ => {
            return Err(PolicyError::Unknown {
                name: name.to_string(),
                known: POLICY_NAMES.join(", "),
            })
        }
    })
}

/// The settings a policy accepts (key, default, meaning), for `--help`
/// texts and listings; `None` for a name not in [`POLICY_NAMES`]. The
/// downtime limit is not among them: it comes from
/// [`PolicyParams::downtime_limit`].
pub fn describe(name: &str) -> Option<&'static [SettingDoc]> {
    Some(match name {
        "qemu" => qemu::SETTINGS,
        "auto-converge" => auto_converge::SETTINGS,
        "xen" => xen::SETTINGS,
        "xen-legacy" => xen_legacy::SETTINGS,
        "mp" => mp::SETTINGS,
        "ch" => ch::SETTINGS,
        "stall" => stall::SETTINGS,
        "ramp" => ramp::SETTINGS,
        "dirty-limit" => dirty_limit::SETTINGS,
        _ => return None,
    })
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
                    if n == name
                        && known == "qemu, auto-converge, xen, xen-legacy, mp, ch, stall, ramp, dirty-limit"),
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

    fn with_settings(pairs: &[(&str, &str)]) -> PolicyParams {
        PolicyParams {
            settings: pairs
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn every_policy_describes_and_accepts_its_settings() {
        assert!(describe("nope").is_none());
        for &name in POLICY_NAMES {
            let docs = describe(name).expect(name);
            // All keys at once, each with its documented default.
            let all: Vec<_> = docs.iter().map(|d| (d.key, d.default)).collect();
            let policy = by_name(name, &with_settings(&all));
            assert!(policy.is_ok(), "{name}: {:?}", policy.err());
            for d in docs {
                assert!(!d.meaning.is_empty() && !d.default.is_empty(), "{name}");
            }
            // An unknown key names the policy and its keys.
            let err = by_name(name, &with_settings(&[("bogus", "1")])).err();
            let keys: Vec<_> = docs.iter().map(|d| d.key).collect();
            let want_known = if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            };
            assert!(
                matches!(&err, Some(PolicyError::UnknownSetting { policy, key, known })
                    if policy == name && key == "bogus" && *known == want_known),
                "{name}: {err:?}"
            );
        }
        // qemu has no settings: its limit is `downtime_limit`.
        let err = by_name("qemu", &with_settings(&[("downtime-limit", "300")])).err();
        assert!(matches!(err, Some(PolicyError::UnknownSetting { .. })));
        let err = by_name("mp", &with_settings(&[("confirm", "x")])).err();
        assert_eq!(
            err.map(|e| e.to_string()),
            Some(
                "policy mp: bad value \"x\" for confirm: expected a non-negative integer"
                    .to_string()
            )
        );
    }

    #[test]
    fn set_downtime_limit_reaches_every_policy_with_a_limit() {
        // 1000 pages left at 4096 B/ms: needs a 1000 ms limit.
        let h: MigrationHistory = vec![IterationStats {
            bytes_sent: 4096 * 1000,
            pages_sent: 1000,
            dirty_pages: 1000,
            duration: Duration::from_secs(1),
            dirtied_during: 1000,
            page_size: 4096,
            ram_bytes: 1 << 30,
            // One idle vCPU on the ring (dirty-limit refuses without).
            vcpu_dirty_pages: vec![0],
            ..Default::default()
        }]
        .into();
        for name in [
            "qemu",
            "auto-converge",
            "mp",
            "ch",
            "stall",
            "ramp",
            "dirty-limit",
        ] {
            let mut p = by_name(name, &PolicyParams::default()).unwrap();
            assert_eq!(p.decide(&h), Decision::Continue, "{name}");
            p.set_downtime_limit(Duration::from_millis(1000));
            assert_eq!(
                p.decide(&h),
                Decision::StopAndCopy(StopReason::DowntimeReached {
                    expected_downtime_ms: 1000.0
                }),
                "{name}"
            );
            if name == "ramp" {
                // Its schedule replaces `--downtime-limit` (see `ramp`).
                continue;
            }
            let mut p = by_name(
                name,
                &PolicyParams {
                    downtime_limit: Duration::from_millis(1000),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(matches!(p.decide(&h), Decision::StopAndCopy(_)), "{name}");
        }
    }

    #[test]
    fn stop_reason_display() {
        let cases = [
            (
                StopReason::IterationLimit {
                    iterations: 5,
                    predicted_downtime_ms: None,
                },
                "iteration limit reached after 5 iterations",
            ),
            (
                StopReason::IterationLimit {
                    iterations: 29,
                    predicted_downtime_ms: Some(812.34),
                },
                "iteration limit reached after 29 iterations, predicted downtime 812.3 ms",
            ),
            (
                StopReason::SentTooMuch {
                    bytes: 10,
                    predicted_downtime_ms: Some(1.0),
                },
                "10 bytes sent, over the cap, predicted downtime 1.0 ms",
            ),
            (
                StopReason::MemoryIntensive {
                    iterations: 2,
                    remaining_bytes: 4096,
                    predicted_downtime_ms: Some(400.54),
                },
                "memory-intensive guest, no progress for 2 iterations: 4096 bytes left, \
                 predicted downtime 400.5 ms",
            ),
        ];
        for (reason, want) in cases {
            assert_eq!(reason.to_string(), want);
        }
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
