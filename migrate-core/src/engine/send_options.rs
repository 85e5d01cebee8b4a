//! What `send_migration` is told: the policy, compression, limits,
//! channels and callbacks of one outgoing migration.

use std::sync::Arc;
use std::time::Duration;

use policy::ConvergencePolicy;

use super::channels::ChannelConnector;
use super::control::{DowntimeRamp, MigrationControl};
use super::report::MigrationReport;

/// Page compression on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressMode {
    /// Raw pages.
    None,
    /// zstd at this level.
    Zstd(i32),
}

/// What a migration does when its `timeout` passes (Cloud Hypervisor's
/// `timeout_strategy`: cancel, or `ignore` and finish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutAction {
    /// Fail the migration; the source keeps running (the default, as in
    /// Cloud Hypervisor: the VM stays where it is).
    #[default]
    Cancel,
    /// Stop iterating and go to stop-and-copy whatever the downtime: the
    /// migration completes, paying the downtime of what is left.
    Force,
}

/// Called with the report after every iteration.
pub type ProgressFn = Box<dyn FnMut(&MigrationReport) + Send>;

/// How to run one outgoing migration.
pub struct SendOptions {
    /// Convergence policy.
    pub policy: Box<dyn ConvergencePolicy>,
    /// Page compression.
    pub compress: CompressMode,
    /// After this long, do `timeout_action` (checked at iteration ends).
    pub timeout: Option<Duration>,
    /// What the timeout does: fail (source runs on) or force the stop.
    pub timeout_action: TimeoutAction,
    /// Compare memory digests of both ends before committing.
    pub verify_digest: bool,
    /// Read/write timeout on the stream.
    pub io_timeout: Duration,
    /// The downtime limit the policy was built with, as reported until a
    /// ramp step or `control` changes it.
    pub downtime_limit: Duration,
    /// Cancel flag, bandwidth cap and downtime-limit changes, shared with
    /// whoever steers the migration (the API).
    pub control: Arc<MigrationControl>,
    /// Raise the downtime limit step by step (overrides the policy's own
    /// limit; ended by a `set_downtime_limit` on `control`).
    pub downtime_ramp: Option<DowntimeRamp>,
    /// The guest was paused before the migration (`pause`): it travels
    /// paused, the destination keeps it paused after `Commit`, and a failed
    /// migration leaves it paused here.
    pub guest_paused: bool,
    /// Called with the report after every iteration.
    pub progress: Option<ProgressFn>,
    /// Destination address, for the report.
    pub destination: String,
    /// Further channels (`None`: one connection).
    pub channels: Option<ChannelConnector>,
    /// Send raw pages from a copy (`Pages`) even where the destination
    /// takes them straight from guest memory (`CheckedPages`); for
    /// measurement.
    pub copy_pages: bool,
    /// Leave out dirty pages whose content is the copy last sent
    /// (`engine/unchanged.rs`); the pages then take the copy path.
    pub skip_unchanged: bool,
}
