//! The migration report, with QEMU `query-migrate` field names where the
//! meaning is the same, so scripts written for QEMU read it unchanged.
//!
//! Times are milliseconds. Instants, all on the source:
//! - `setup-time`: from the connection being established to the
//!   destination's `HelloAck`.
//! - `total-time`: from the start of `send` to `Commit` written (or failure).
//! - `downtime`: from the moment the vCPUs are paused to `Commit` written;
//!   the destination resumes as soon as it reads `Commit`, so on loopback
//!   the gap after that is the one-way latency of one small frame.

use std::time::Duration;

use policy::IterationStats;
use serde::{Deserialize, Serialize};

/// Final or current state of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    /// Connecting and handshaking.
    Setup,
    /// Pre-copy iterations.
    Active,
    /// Paused, sending the rest.
    Device,
    /// Migration: the destination runs the guest; the source is paused for
    /// good. Live clone: the standby holds the verified copy, paused, and
    /// the source runs on.
    Completed,
    /// Failed; the source guest runs on.
    Failed,
    /// Cancelled; the source guest runs on.
    Cancelled,
}

/// What the outgoing stream did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportMode {
    /// A migration: on completion the destination runs the guest.
    #[default]
    Migration,
    /// A live clone: on completion the source runs on as the primary and
    /// the destination holds a paused copy (a standby).
    Clone,
}

/// One pre-copy iteration (the final stop-and-copy pass included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct IterationRecord {
    /// 0 for the full copy.
    pub iteration: u32,
    /// Pages this iteration had to send.
    pub dirty_pages: u64,
    /// Pages sent with data.
    pub pages_sent: u64,
    /// Pages sent as zero ranges.
    pub zero_pages: u64,
    /// Bytes written (frame headers included).
    pub bytes_sent: u64,
    /// Milliseconds from the dirty-log sync to the end marker.
    pub duration_ms: f64,
    /// Pages the guest dirtied while this iteration was sent.
    pub dirtied_during: u64,
    /// Of `dirty-pages`, how many were dirty in the previous iteration too.
    pub redirtied_pages: u64,
    /// Pages per second the guest dirtied during this iteration.
    pub dirty_rate_pps: f64,
    /// Megabits per second sent during this iteration.
    pub mbps: f64,
    /// Pages held back for the final copy (writable working set), beyond
    /// those in `dirtied-during`.
    pub deferred_pages: u64,
    /// Fraction of vCPU time held off during this iteration.
    pub throttle: f64,
    /// True for the stop-and-copy pass (sent with the guest paused).
    pub final_pass: bool,
    /// Fewest pages dirtied in one 100 ms window while this iteration was
    /// sent (0: no whole window).
    #[serde(default)]
    pub window_dirty_min: u64,
    /// Most pages dirtied in one 100 ms window.
    #[serde(default)]
    pub window_dirty_max: u64,
    /// Dirty-ring entries harvested from each vCPU's ring during this
    /// iteration (empty with the bitmap). Under `kvm_pvm` an entry is one
    /// emulated store, not a distinct page.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_dirty_pages: Vec<u64>,
    /// Each vCPU's throttle during this iteration, when set one by one
    /// (`dirty-limit`; empty otherwise: see `throttle`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_throttle: Vec<f64>,
    /// Dirty pages left out because their content was the copy the
    /// destination holds (`send --skip-unchanged`).
    #[serde(default)]
    pub unchanged_pages: u64,
}

/// RAM figures, as QEMU's `ram` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamReport {
    /// Bytes written to the stream for memory (headers included).
    pub transferred: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Bytes still dirty (0 once completed).
    pub remaining: u64,
    /// Pages sent as zero ranges (QEMU: "duplicate").
    pub duplicate: u64,
    /// Of `duplicate`, pages sent as zero without being read: never written
    /// since the VM was created.
    pub skipped: u64,
    /// Pages sent with data.
    pub normal: u64,
    /// Bytes of page data sent (before compression).
    pub normal_bytes: u64,
    /// Dirty pages not sent: their content was the copy the destination
    /// holds (`send --skip-unchanged`; QEMU's XBZRLE skips such pages too).
    #[serde(default)]
    pub unchanged: u64,
    /// Dirty-log syncs.
    pub dirty_sync_count: u64,
    /// Pages per second dirtied in the last iteration.
    pub dirty_pages_rate: f64,
    /// Megabits per second of stream bytes while iterating (pre-copy only).
    pub mbps: f64,
    /// Megabits per second of page data (before compression) while iterating.
    pub page_mbps: f64,
}

/// The report of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationReport {
    /// Outcome.
    pub status: MigrationStatus,
    /// Migration or live clone (`completed` means something else for each:
    /// see [`MigrationStatus::Completed`]).
    #[serde(default)]
    pub mode: ReportMode,
    /// Milliseconds, start of `send` to `Commit` written (or failure); in a
    /// progress report or `query-migrate` of a running migration, so far.
    pub total_time: f64,
    /// Milliseconds the guest was paused (`None` if it never was).
    pub downtime: Option<f64>,
    /// Milliseconds of the handshake (connection established to `HelloAck`).
    pub setup_time: f64,
    /// Milliseconds the source spent digesting guest memory while paused
    /// (part of `downtime`; 0 without `verify`).
    pub digest_time: f64,
    /// Predicted downtime at the last decision, in milliseconds.
    pub expected_downtime: Option<f64>,
    /// Where the downtime went (`None` until the guest was paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_breakdown: Option<DowntimeBreakdown>,
    /// Memory figures.
    pub ram: RamReport,
    /// Highest vCPU throttle applied, in percent (QEMU's name; 0 when the
    /// policy never throttled).
    pub cpu_throttle_percentage: f64,
    /// Highest throttle applied to each vCPU (fractions, index order) when
    /// a policy throttled vCPUs one by one (`dirty-limit`); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_throttle: Vec<f64>,
    /// Convergence policy name.
    pub policy: String,
    /// Downtime limit in force at the last policy decision, ms (changes with
    /// `send --downtime-ramp` and `set-parameters`; `None` before the first).
    #[serde(default)]
    pub downtime_limit: Option<f64>,
    /// Bandwidth cap in force at the last decision, bytes/s (`None`: none).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Why the policy stopped iterating (or why the migration failed).
    pub stop_reason: Option<String>,
    /// Destination address.
    pub destination: String,
    /// Page compression used.
    pub compression: String,
    /// Where raw pages were sent from: `guest-memory` (`CheckedPages`,
    /// straight from guest memory with a CRC per page) or `copy` (copied
    /// out first, `Pages`; zstd batches always are).
    #[serde(default)]
    pub page_path: String,
    /// Dirty tracking of the source VM (`bitmap`, `ring`; `memory` for a
    /// VM without KVM).
    #[serde(default)]
    pub dirty_track: String,
    /// Memory digests (source, destination) when checked.
    pub digest: Option<DigestReport>,
    /// Live clone only: digest of the vCPU state at the clone point, taken
    /// by the source while paused (the standby's `digest` command computes
    /// the same from the vCPUs it holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_digest: Option<String>,
    /// Error text when failed.
    pub error: Option<String>,
    /// One record per iteration, the final pass last.
    pub iterations: Vec<IterationRecord>,
}

/// The parts of `downtime`, in milliseconds, in the order they happen on
/// the source; they add up to `downtime`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DowntimeBreakdown {
    /// Stopping every vCPU (kick out of `KVM_RUN`, finish pending I/O).
    pub pause: f64,
    /// The final dirty-log harvest (grows with RAM size with the bitmap).
    pub harvest: f64,
    /// Reading and encoding the final pass into the stream buffer.
    pub final_pass: f64,
    /// Saving every vCPU's state.
    pub vcpu_save: f64,
    /// The source's memory digest (`verify` only; = `digest-time`).
    pub digest: f64,
    /// Flushing the stream: the link carrying what is still buffered.
    pub flush: f64,
    /// Waiting for `Accepted`: the destination applying what it has not
    /// yet applied, restoring the vCPUs, its digest, and the round trip.
    pub accept: f64,
    /// Writing and flushing `Commit`.
    pub commit: f64,
}

/// Both ends' memory digests at the pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DigestReport {
    /// xxh3-64 of the source's memory after the pause.
    pub source: String,
    /// xxh3-64 of the destination's memory before it resumes.
    pub destination: String,
    /// Whether they are equal.
    pub equal: bool,
}

impl MigrationReport {
    /// An empty report for a migration about to start.
    pub fn new(policy: &str, destination: &str, compression: &str, ram_total: u64) -> Self {
        Self {
            status: MigrationStatus::Setup,
            mode: ReportMode::Migration,
            total_time: 0.0,
            downtime: None,
            setup_time: 0.0,
            digest_time: 0.0,
            expected_downtime: None,
            downtime_breakdown: None,
            ram: RamReport {
                total: ram_total,
                ..Default::default()
            },
            cpu_throttle_percentage: 0.0,
            vcpu_throttle: Vec::new(),
            policy: policy.to_string(),
            downtime_limit: None,
            max_bandwidth: None,
            stop_reason: None,
            destination: destination.to_string(),
            compression: compression.to_string(),
            page_path: "copy".to_string(),
            dirty_track: String::new(),
            digest: None,
            vcpu_digest: None,
            error: None,
            iterations: Vec::new(),
        }
    }
}

impl MigrationReport {
    /// Whether the migration ended with `Commit` sent but unconfirmed: the
    /// destination may or may not run the guest.
    pub fn outcome_unknown(&self) -> bool {
        self.status == MigrationStatus::Failed
            && self
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("outcome unknown"))
    }

    /// Add one iteration's figures.
    /// Fold per-vCPU throttles into `vcpu-throttle` (each vCPU's highest)
    /// when they are applied, so the report has them even if no iteration
    /// ran under them (a stop right after; `query-migrate` sees them at the
    /// next progress report, the end of the iteration).
    pub(crate) fn note_vcpu_throttles(&mut self, throttles: &[f64]) {
        if self.vcpu_throttle.len() < throttles.len() {
            self.vcpu_throttle.resize(throttles.len(), 0.0);
        }
        for (max, &t) in self.vcpu_throttle.iter_mut().zip(throttles) {
            *max = max.max(t);
        }
        let highest = throttles.iter().copied().fold(0.0, f64::max);
        self.cpu_throttle_percentage = self.cpu_throttle_percentage.max(highest * 100.0);
    }

    pub(crate) fn record_iteration(&mut self, s: &IterationStats, final_pass: bool) {
        self.ram.transferred += s.bytes_sent;
        self.ram.normal += s.pages_sent;
        self.ram.normal_bytes += s.pages_sent * s.page_size;
        self.ram.duplicate += s.zero_pages;
        self.ram.unchanged += s.unchanged_pages;
        self.ram.remaining = s.remaining_bytes();
        let secs = s.duration.as_secs_f64();
        let dirty_rate = if secs > 0.0 {
            s.dirtied_during as f64 / secs
        } else {
            0.0
        };
        if !final_pass {
            self.ram.dirty_pages_rate = dirty_rate;
        }
        self.cpu_throttle_percentage = self.cpu_throttle_percentage.max(s.throttle * 100.0);
        self.note_vcpu_throttles(&s.vcpu_throttles);
        self.iterations.push(IterationRecord {
            iteration: s.iteration,
            dirty_pages: s.dirty_pages,
            pages_sent: s.pages_sent,
            zero_pages: s.zero_pages,
            bytes_sent: s.bytes_sent,
            duration_ms: ms(s.duration),
            dirtied_during: s.dirtied_during,
            redirtied_pages: s.redirtied_pages,
            dirty_rate_pps: dirty_rate,
            mbps: mbps(s.bytes_sent, s.duration),
            deferred_pages: s.deferred_pages,
            throttle: s.throttle,
            final_pass,
            window_dirty_min: s.dirty_windows.iter().copied().min().unwrap_or(0),
            window_dirty_max: s.dirty_windows.iter().copied().max().unwrap_or(0),
            vcpu_dirty_pages: s.vcpu_dirty_pages.clone(),
            vcpu_throttle: s.vcpu_throttles.clone(),
            unchanged_pages: s.unchanged_pages,
        });
    }
}

/// Milliseconds of a duration.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Megabits per second of `bytes` over `d` (0 for an empty interval).
pub(crate) fn mbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 * 8.0 / s / 1e6
    } else {
        0.0
    }
}
