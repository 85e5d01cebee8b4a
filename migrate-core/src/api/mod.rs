//! The control socket: one JSON object per line each way, in the spirit of
//! QEMU's QMP and Cloud Hypervisor's `--api-socket`.
//!
//! ```text
//! -> {"command":"status"}
//! <- {"response":"status", ...VmStatus...}
//! -> {"command":"send","to":"tcp:127.0.0.1:4444","policy":"qemu"}
//! <- {"response":"progress", ...MigrationReport...}     (one per iteration)
//! <- {"response":"done", ...MigrationReport...}
//! -> {"command":"shutdown"}
//! <- {"response":"ok"}
//! <- {"response":"error","message":"..."}               (any refusal)
//! ```
//! Unknown commands and unknown fields are refused, not ignored: a typo in a
//! script must not silently fall back to a default.

mod server;

pub use server::{ApiError, ApiServer, ProcessEvent, VmController};

use serde::{Deserialize, Serialize};

use crate::engine::{MigrationReport, TimeoutAction};

/// A request on the API socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ApiRequest {
    /// State of the VM (and of a running migration). (Empty struct
    /// variants, not unit ones, so that unknown fields are refused.)
    Status {},
    /// Migrate the VM to another vmigrate process.
    Send(SendRequest),
    /// Stop the VM and end the process (exit status 0).
    Shutdown {},
}

/// Parameters of a migration (`vmigrate send`). Defaults as QEMU's where
/// QEMU has the knob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SendRequest {
    /// Destination, `tcp:HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// Convergence policy name (default `qemu`).
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Policy-specific settings, `key -> value` (default none).
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    /// Downtime limit in milliseconds (default 300, as QEMU).
    #[serde(default = "default_downtime")]
    pub downtime_limit: u64,
    /// Bytes per second cap (default: none).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// `none` or `zstd` (default `none`).
    #[serde(default = "default_compress")]
    pub compress: String,
    /// Give up after this many seconds (default: never).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// What the timeout does: `cancel` (default; the source runs on) or
    /// `force` (stop-and-copy whatever the downtime).
    #[serde(default)]
    pub timeout_action: TimeoutAction,
    /// Digest all guest memory on both ends at the switch-over and commit
    /// only if they agree (default false: hashing all RAM lengthens the
    /// downtime by the time it takes, reported as `digest-time`).
    #[serde(default)]
    pub verify: bool,
}

fn default_policy() -> String {
    "qemu".into()
}
fn default_downtime() -> u64 {
    300
}
fn default_compress() -> String {
    "none".into()
}

impl SendRequest {
    /// A request with every default, to `to`.
    pub fn new(to: impl Into<String>) -> Self {
        Self {
            to: to.into(),
            policy: default_policy(),
            params: Default::default(),
            downtime_limit: default_downtime(),
            max_bandwidth: None,
            compress: default_compress(),
            timeout: None,
            timeout_action: TimeoutAction::Cancel,
            verify: false,
        }
    }
}

/// A response line on the API socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum ApiResponse {
    /// The request was carried out.
    Ok,
    /// The request was refused or failed.
    Error {
        /// Why.
        message: String,
    },
    /// Answer to `status`.
    Status(VmStatus),
    /// A migration finished an iteration.
    Progress(MigrationReport),
    /// A migration ended (see the report's status).
    Done(MigrationReport),
}

/// Run state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// The guest runs.
    Running,
    /// The guest runs while being migrated.
    Migrating,
    /// Migrated away: paused for good, the destination runs it.
    Postmigrate,
    /// The guest stopped (halt, exit port, error).
    Stopped,
}

/// Answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmStatus {
    /// Run state.
    pub state: RunState,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// KVM memory slots.
    pub slots: usize,
    /// vCPUs.
    pub vcpus: u32,
    /// Seconds since the VM started (or arrived).
    pub uptime: f64,
    /// CPU model name.
    pub cpu_model: String,
    /// How the dirty log is read.
    pub dirty_log: String,
    /// Bytes the guest wrote to COM1.
    pub serial_bytes: u64,
    /// VM exits by kind, over all vCPUs.
    pub exits: ExitSummary,
    /// Accesses to ports no device claims, as "port:count".
    pub unhandled_ports: Vec<String>,
    /// The running or last migration.
    pub migration: Option<MigrationReport>,
}

/// VM exits by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExitSummary {
    /// Port writes.
    pub io_out: u64,
    /// Port reads.
    pub io_in: u64,
    /// MMIO accesses.
    pub mmio: u64,
    /// HLT.
    pub hlt: u64,
    /// Kicks out of KVM_RUN.
    pub interrupted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_defaults_and_refuse_unknown_fields() {
        let r: ApiRequest = serde_json::from_str(r#"{"command":"send","to":"unix:/x"}"#).unwrap();
        assert_eq!(r, ApiRequest::Send(SendRequest::new("unix:/x")));
        assert!(serde_json::from_str::<ApiRequest>(r#"{"command":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<ApiRequest>(r#"{"command":"sned"}"#).is_err());
        assert!(
            serde_json::from_str::<ApiRequest>(r#"{"command":"send","to":"x","downtime":5}"#)
                .is_err()
        );
    }

    #[test]
    fn responses_round_trip() {
        let r = ApiResponse::Error {
            message: "no".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"response":"error","message":"no"}"#);
        assert_eq!(serde_json::from_str::<ApiResponse>(&s).unwrap(), r);
    }
}
