//! The pre-copy migration engine: the source and destination sides.
//!
//! The engine sees a VM only through [`MigratableVm`] (memory, dirty log,
//! pause/resume, opaque vCPU-state blobs), so it runs the same against a KVM
//! [`crate::vm::Vm`] and against the memory-only fake of its unit tests.
//!
//! One migration, as the source sees it:
//! ```text
//!  source                                  destination
//!  Hello(layout, vCPUs, CPU model) ----->  checks, creates the VM
//!                                  <-----  HelloAck(features)   (or Error)
//!  iteration 0: every page (zero pages as ranges), IterationEnd
//!  iteration n: pages dirtied during n-1, IterationEnd
//!   ... policy says stop ...
//!  pause vCPUs; last dirty pages, IterationEnd; VcpuState x N
//!  Complete(digest)                ----->  restores vCPUs, digests memory
//!                                  <-----  Accepted(digest)     (or Error)
//!  digests equal? Commit           ----->  resumes the guest
//!  (source stays paused for good: "postmigrate")
//! ```
//! Anything that fails before `Commit` is sent resumes the source guest; the
//! destination resumes only on `Commit`, so the guest never runs twice.

mod apply;
mod channels;
mod clone;
mod control;
mod dest;
mod direct;
mod epoch;
mod failover;
mod in_place;
#[cfg(feature = "memory-vm")]
mod memory_vm;
mod pages;
mod precopy;
mod receive_options;
mod report;
mod send_options;
mod source;
mod unchanged;
mod windows;
mod written;

pub use channels::{ChannelAcceptor, ChannelConnector};
pub use clone::{live_clone, CloneOutcome, CloneSession, SessionEnd, StandbySession};
pub use control::{DowntimeRamp, MigrationControl, RampError};
pub use dest::{receive_migration, receive_migration_with_channels};
pub use epoch::{EpochRecord, EpochReport, EpochStats, PauseSummary, SentEpoch, StagedEpoch};
#[cfg(feature = "memory-vm")]
pub use memory_vm::MemoryVm;
pub use pages::is_zero as is_zero_page;
pub use receive_options::{ReceiveOptions, ReceiveOutcome};
pub use report::{
    DowntimeBreakdown, IterationRecord, MigrationReport, MigrationStatus, RamReport, ReportMode,
};
pub use send_options::{CompressMode, ProgressFn, SendOptions, TimeoutAction};
pub use source::{error_chain, send_migration};
pub use unchanged::SentDigests;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::dirty::DirtyBitmap;
use crate::wire::{ErrorCode, MessageKind, WireError};

/// A boxed error from the VM behind [`MigratableVm`].
pub type VmOpError = Box<dyn std::error::Error + Send + Sync>;

/// What the engine needs of a VM.
pub trait MigratableVm: Sync {
    /// Guest RAM.
    fn memory(&self) -> &GuestMemoryMmap;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> u32;
    /// CPU model name; both ends must agree.
    fn cpu_model(&self) -> String;
    /// OR the pages dirtied since the last call into `into` and reset the log.
    fn harvest_dirty_log(&self, into: &mut DirtyBitmap) -> Result<(), VmOpError>;
    /// Stop the vCPUs.
    fn pause(&self) -> Result<(), VmOpError>;
    /// Start the vCPUs.
    fn resume(&self) -> Result<(), VmOpError>;
    /// Hold the vCPUs off `fraction` of the time (0.0 lifts it).
    fn set_throttle(&self, fraction: f64) -> Result<(), VmOpError>;
    /// The throttle in force (the highest, when vCPUs have their own).
    fn throttle(&self) -> f64;
    /// Hold vCPU *i* off `fractions[i]` of the time (dirty-limit). A VM
    /// without per-vCPU throttles throttles every vCPU to the highest
    /// fraction: never less than asked of any vCPU.
    fn set_vcpu_throttles(&self, fractions: &[f64]) -> Result<(), VmOpError> {
        self.set_throttle(fractions.iter().copied().fold(0.0, f64::max))
    }
    /// Each vCPU's throttle in index order (by default the shared one).
    fn vcpu_throttles(&self) -> Vec<f64> {
        let n = usize::try_from(self.vcpu_count()).unwrap_or(0);
        vec![self.throttle(); n]
    }
    /// Dirty-ring entries consumed from each vCPU's ring so far (index
    /// order, cumulative); `None` when the VM cannot attribute dirty pages
    /// to vCPUs (the bitmap, the memory VM).
    fn vcpu_dirty_entries(&self) -> Option<Vec<u64>> {
        None
    }
    /// Pages ever written since the VM was created, complete as of the last
    /// `harvest_dirty_log`; every other page is known to be zero. `None`
    /// when the VM cannot tell (every page is then read and scanned).
    fn written_pages(&self) -> Option<DirtyBitmap> {
        None
    }
    /// Record pages written by the migration itself (destination side), so
    /// the next migration of this VM knows them.
    fn note_written(&self, _pages: &DirtyBitmap) {}
    /// How the VM tracks dirty pages, for the report (`bitmap`, `ring`).
    fn dirty_track(&self) -> &'static str {
        "memory"
    }
    /// Every page of RAM is allocated and mapped already (`--prefault`):
    /// the destination then copies pages in through the mapping, which is
    /// faster than `pwrite` into the memfd only when no page fault follows.
    fn ram_prefaulted(&self) -> bool {
        false
    }
    /// Save every vCPU's state as an opaque blob, in index order (paused).
    fn save_vcpus(&self) -> Result<Vec<Vec<u8>>, VmOpError>;
    /// Restore every vCPU from blobs, in index order (paused).
    fn restore_vcpus(&self, blobs: Vec<Vec<u8>>) -> Result<(), VmOpError>;
    /// A digest of saved vCPU states that both ends of a live clone can
    /// compute on their own and compare (the KVM VM leaves out what changes
    /// while a vCPU is paused, the TSC). By default the blobs themselves.
    fn vcpu_state_digest(&self, blobs: &[Vec<u8>]) -> Result<u64, VmOpError> {
        Ok(blobs.iter().fold(0u64, |acc, b| {
            acc.rotate_left(1) ^ xxhash_rust::xxh3::xxh3_64(b)
        }))
    }
    /// The serial port whose output checkpoint epochs commit (hold back
    /// until acknowledged); `None`: the VM has none, nothing is held.
    fn serial_ports(&self) -> Option<&crate::vm::ports::PortBus> {
        None
    }
}

impl MigratableVm for crate::vm::Vm {
    fn memory(&self) -> &GuestMemoryMmap {
        crate::vm::Vm::memory(self)
    }
    fn vcpu_count(&self) -> u32 {
        crate::vm::Vm::vcpu_count(self)
    }
    fn cpu_model(&self) -> String {
        crate::vm::Vm::cpu_model(self).to_string()
    }
    fn harvest_dirty_log(&self, into: &mut DirtyBitmap) -> Result<(), VmOpError> {
        Ok(crate::vm::Vm::harvest_dirty_log(self, into)?)
    }
    fn pause(&self) -> Result<(), VmOpError> {
        Ok(crate::vm::Vm::pause(self)?)
    }
    fn resume(&self) -> Result<(), VmOpError> {
        Ok(crate::vm::Vm::resume(self)?)
    }
    fn set_throttle(&self, fraction: f64) -> Result<(), VmOpError> {
        Ok(crate::vm::Vm::set_throttle(self, fraction)?)
    }
    fn throttle(&self) -> f64 {
        crate::vm::Vm::throttle(self)
    }
    fn set_vcpu_throttles(&self, fractions: &[f64]) -> Result<(), VmOpError> {
        Ok(crate::vm::Vm::set_vcpu_throttles(self, fractions)?)
    }
    fn vcpu_throttles(&self) -> Vec<f64> {
        crate::vm::Vm::vcpu_throttles(self)
    }
    fn vcpu_dirty_entries(&self) -> Option<Vec<u64>> {
        crate::vm::Vm::dirty_ring_harvested(self)
    }
    fn written_pages(&self) -> Option<DirtyBitmap> {
        Some(crate::vm::Vm::written_pages(self))
    }
    fn note_written(&self, pages: &DirtyBitmap) {
        crate::vm::Vm::note_written(self, pages)
    }
    fn ram_prefaulted(&self) -> bool {
        crate::vm::Vm::ram_prefaulted(self)
    }
    fn dirty_track(&self) -> &'static str {
        crate::vm::Vm::dirty_track(self)
    }
    fn serial_ports(&self) -> Option<&crate::vm::ports::PortBus> {
        Some(self.ports())
    }
    fn save_vcpus(&self) -> Result<Vec<Vec<u8>>, VmOpError> {
        Ok(crate::vm::Vm::save_vcpus(self)?
            .iter()
            .map(|s| s.encode())
            .collect())
    }
    fn restore_vcpus(&self, blobs: Vec<Vec<u8>>) -> Result<(), VmOpError> {
        let states = blobs
            .iter()
            .map(|b| crate::vm::state::VcpuState::decode(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::vm::Vm::restore_vcpus(self, states)?)
    }
    fn vcpu_state_digest(&self, blobs: &[Vec<u8>]) -> Result<u64, VmOpError> {
        let mut acc = 0u64;
        for blob in blobs {
            let state = crate::vm::state::VcpuState::decode(blob)?;
            acc = acc.rotate_left(1) ^ state.clone_point_digest();
        }
        Ok(acc)
    }
}

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream broke or carried something malformed.
    #[error("migration stream failed during {phase}")]
    Wire {
        /// What the engine was doing.
        phase: String,
        /// The protocol or I/O error.
        #[source]
        source: WireError,
    },
    /// The peer refused or aborted with an error message.
    #[error("peer refused during {phase}: {code:?}: {message}")]
    PeerError {
        /// What the engine was doing.
        phase: String,
        /// The peer's error code.
        code: ErrorCode,
        /// The peer's explanation.
        message: String,
    },
    /// A live clone met a destination that takes migrations, or a
    /// migration met a standby (`run --standby`).
    #[error("wrong kind of stream: {0}")]
    WrongMode(String),
    /// The peer sent a message that is not valid at this point.
    #[error("unexpected {got} during {phase}")]
    Unexpected {
        /// What the engine was doing.
        phase: String,
        /// What arrived.
        got: MessageKind,
    },
    /// The two ends cannot migrate this VM (layout, vCPUs, CPU model).
    #[error("incompatible peers: {0}")]
    Incompatible(String),
    /// The stream is well formed but its content is wrong (a page outside
    /// guest memory, a page count that does not add up, a bad state blob).
    #[error("invalid migration data: {0}")]
    InvalidData(String),
    /// An operation on the VM failed.
    #[error("VM operation {op} failed")]
    Vm {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: VmOpError,
    },
    /// The memory digests of the two ends differ.
    #[error("memory digest mismatch: source {source_digest:016x}, destination {dest_digest:016x}")]
    DigestMismatch {
        /// Source digest.
        source_digest: u64,
        /// Destination digest.
        dest_digest: u64,
    },
    /// The migration ran past its time limit.
    #[error("migration timed out after {secs:.1} s without converging")]
    Timeout {
        /// Seconds elapsed.
        secs: f64,
    },
    /// The policy gave up.
    #[error("policy aborted the migration: {0}")]
    PolicyAbort(String),
    /// The migration was cancelled.
    #[error("migration cancelled")]
    Cancelled,
    /// `Commit` may have reached the destination but it never confirmed
    /// that it resumed the guest: it may or may not run it. The source stays
    /// paused; the operator decides (`vmigrate resume --force` on the
    /// source once sure the destination does not run the guest).
    #[error(
        "outcome unknown: {0}; the source stays paused (resume it with --force only if \
         the destination does not run the guest)"
    )]
    OutcomeUnknown(String),
}

/// Digest of all guest memory: the wrapping sum, over every page that is
/// not all zero, of xxh3-64 of the page seeded with its address.
///
/// Zero pages add nothing, so pages known never to have been written
/// (outside `written`, when given) are skipped without being read: the
/// digest costs what the guest used, not what it was given, and both ends
/// get the same value whichever pages each of them knows to be untouched. A
/// wrong byte anywhere changes its page's hash and so the sum (this is a
/// check against lost or misplaced pages, not against an adversary).
pub fn memory_digest(
    memory: &GuestMemoryMmap,
    written: Option<&DirtyBitmap>,
) -> Result<u64, MigrationError> {
    const CHUNK: usize = 1 << 20;
    const PAGE: usize = crate::wire::PAGE_SIZE;
    let mut sum = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in memory.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = usize::try_from((len - off).min(CHUNK as u64)).expect("chunk fits usize");
            let gpa = start + off;
            off += n as u64;
            let first = usize::try_from(gpa / PAGE as u64).expect("page index fits usize");
            if let Some(w) = written {
                if (first..first + n / PAGE).all(|p| !w.get(p)) {
                    continue;
                }
            }
            memory
                .read_slice(&mut buf[..n], GuestAddress(gpa))
                .map_err(|e| MigrationError::InvalidData(format!("digest read: {e}")))?;
            for (i, page) in buf[..n].chunks_exact(PAGE).enumerate() {
                if !pages::is_zero(page) {
                    let at = gpa + (i * PAGE) as u64;
                    sum = sum.wrapping_add(xxhash_rust::xxh3::xxh3_64_with_seed(page, at));
                }
            }
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests;
