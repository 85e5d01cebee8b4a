//! Responses on the API socket.

use serde::{Deserialize, Serialize};

use crate::engine::MigrationReport;

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
    /// Answer to `version`.
    Version(VersionInfo),
    /// Answer to `status`.
    Status(VmStatus),
    /// Answer to `info` (the same fields as `status`).
    Info(VmStatus),
    /// Answer to `query-migrate`.
    QueryMigrate(MigrationQuery),
    /// A migration finished an iteration.
    Progress(MigrationReport),
    /// A migration ended (see the report's status).
    Done(MigrationReport),
    /// One event on a connection that sent `events`.
    Event(super::Event),
    /// Answer to `digest`.
    Digest(StateDigest),
}

/// Answer to `digest`: what the VM holds, hashed by this process from its
/// own memory and vCPUs (the same functions as a live clone's report, so
/// a standby's answer can be compared with its clone's report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StateDigest {
    /// Run state when the digest was taken.
    pub state: RunState,
    /// Memory digest (hex xxh3-64 sum over non-zero pages, as `digest` in
    /// a migration report).
    pub memory: String,
    /// vCPU state digest (hex; as `vcpu-digest` in a clone report: every
    /// saved section but the TSC).
    pub vcpus: String,
}

/// Answer to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VersionInfo {
    /// Version of this JSON API ([`super::API_VERSION`]): raised when a
    /// command, field or answer changes incompatibly; additions keep it.
    pub api: u32,
    /// Version of the vmigrate build.
    pub vmigrate: String,
    /// Migration wire protocol version this process speaks.
    pub wire_protocol: u16,
    /// Every command name accepted (aliases included).
    pub commands: Vec<String>,
}

/// Answer to `query-migrate`: a report, or `{"status":"none"}` when this
/// process never started a migration (QEMU answers `{}` there; a status
/// field is easier to script against).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MigrationQuery {
    /// The running migration so far, or the last one.
    Report(Box<MigrationReport>),
    /// No migration ever ran here.
    None {
        /// Always `none`.
        status: NoMigration,
    },
}

/// The status of [`MigrationQuery::None`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoMigration {
    /// No migration.
    None,
}

/// Run state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// The guest runs.
    Running,
    /// The vCPUs are stopped by `pause` (or the guest arrived paused);
    /// `resume` starts them.
    Paused,
    /// The guest is being migrated (it runs, unless it was paused).
    Migrating,
    /// Migrated away: paused for good, the destination confirmed it runs it.
    Postmigrate,
    /// `Commit` was sent but the destination never confirmed it resumed the
    /// guest: it may or may not run it. Paused; the process stays up until
    /// the operator decides (`resume` with `force`, or `shutdown`).
    OutcomeUnknown,
    /// The guest stopped (halt, exit port, error).
    Stopped,
    /// A live clone's standby: a paused copy of a primary, held and never
    /// run (`resume` is refused; failover does not exist yet).
    Standby,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Migrating => "migrating",
            Self::Postmigrate => "postmigrate",
            Self::OutcomeUnknown => "outcome-unknown",
            Self::Stopped => "stopped",
            Self::Standby => "standby",
        })
    }
}

/// Answer to `status` and `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmStatus {
    /// Run state.
    pub state: RunState,
    /// API version ([`super::API_VERSION`]).
    #[serde(default)]
    pub api: u32,
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
    /// How the dirty log is read (`GetClears`, `ManualProtect`, `Ring`).
    pub dirty_log: String,
    /// Dirty tracking: `bitmap` or `ring`.
    #[serde(default)]
    pub dirty_track: String,
    /// Entries per vCPU dirty ring (16 bytes each; `None` with the bitmap).
    #[serde(default)]
    pub dirty_ring_entries: Option<u32>,
    /// Pages consumed from each vCPU's dirty ring so far (`None`: bitmap).
    #[serde(default)]
    pub dirty_ring_harvested: Option<Vec<u64>>,
    /// Ring overruns detected (all of RAM then counts as dirty once;
    /// `None`: bitmap).
    #[serde(default)]
    pub dirty_ring_overruns: Option<u64>,
    /// Phantom ring entries given back to the kernel after overruns
    /// (`None`: bitmap).
    #[serde(default)]
    pub dirty_ring_resynced: Option<u64>,
    /// Bytes the guest wrote to COM1.
    pub serial_bytes: u64,
    /// VM exits by kind, over all vCPUs.
    pub exits: ExitSummary,
    /// Accesses to ports no device claims, as "port:count".
    pub unhandled_ports: Vec<String>,
    /// The running migration so far, or the last one.
    pub migration: Option<MigrationReport>,
    /// On a primary: the address of the standby its live-clone session is
    /// open with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// Checkpoint epochs: on a primary, those sent and acknowledged (pause
    /// times, pages, bytes, why they ended); on a standby, `epochs` is the
    /// number applied (the last whole checkpoint it holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<crate::engine::EpochReport>,
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
    /// `KVM_EXIT_DIRTY_RING_FULL`: a vCPU filled its dirty ring and emptied
    /// it itself before running on.
    #[serde(default)]
    pub dirty_ring_full: u64,
}
