//! What the receiving side is told (limits, expectations) and what it
//! gives back, and the checks of a `Hello` against them.

use std::time::Duration;

use super::clone::StandbySession;
use super::MigrationError;
use crate::vm::memory::slot_layout;
use crate::wire::{Hello, FEATURE_CLONE, FEATURE_MEMORY_DIGEST};

/// Limits and expectations of the receiving side.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Read/write timeout on the stream.
    pub io_timeout: Duration,
    /// Refuse a guest whose RAM differs from this size.
    pub expect_mem: Option<u64>,
    /// Refuse a guest whose vCPU count differs.
    pub expect_vcpus: Option<u32>,
    /// Refuse a guest larger than this.
    pub max_mem: u64,
    /// Take only a live clone (`run --incoming --standby`): keep the copy
    /// paused after `Commit` and hand back the open session. A standby
    /// refuses a migration, and any other destination refuses a clone.
    pub standby: bool,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(60),
            expect_mem: None,
            expect_vcpus: None,
            max_mem: crate::vm::memory::MAX_MEM_SIZE,
            standby: false,
        }
    }
}

/// A received, running guest.
pub struct ReceiveOutcome<V> {
    /// The VM, resumed (unless `paused`).
    pub vm: V,
    /// Iterations received (the final pass included).
    pub iterations: u32,
    /// Pages received (data and zero).
    pub pages: u64,
    /// The destination's memory digest before resuming, if asked for.
    pub digest: Option<u64>,
    /// This process's resident memory just before the guest resumed, bytes.
    pub rss_before_resume: Option<u64>,
    /// `CheckedPages` pages that failed their CRC and were dropped (each was
    /// sent again later, or the migration would have failed): pages the
    /// guest changed while they were being sent.
    pub torn_pages: u64,
    /// Pages received straight into guest memory and checked there
    /// (`engine/in_place.rs`; RAM allocated ahead).
    pub pages_in_place: u64,
    /// The guest arrived paused (it was paused on the source) and was not
    /// resumed: `resume` on the API starts it.
    pub paused: bool,
    /// A live clone: the copy is held paused as a standby (never resumed
    /// here) and this is the session with the primary, still open.
    pub standby: Option<StandbySession>,
}

/// Refuses a Hello this destination cannot or must not take.
pub(super) fn check_hello(hello: &Hello, opts: &ReceiveOptions) -> Result<(), MigrationError> {
    let total: u64 = hello.regions.iter().map(|r| r.size).sum();
    let bad = |s: String| Err(MigrationError::Incompatible(s));
    if total > opts.max_mem {
        return bad(format!(
            "guest of {total} bytes is larger than this destination allows ({})",
            opts.max_mem
        ));
    }
    let expected = slot_layout(total).map_err(|e| MigrationError::Incompatible(e.to_string()))?;
    let same = expected.len() == hello.regions.len()
        && expected
            .iter()
            .zip(&hello.regions)
            .all(|(s, r)| s.gpa == r.gpa && s.size == r.size);
    if !same {
        return bad(format!(
            "memory layout {:?} is not one this VMM builds",
            hello.regions
        ));
    }
    if let Some(m) = opts.expect_mem.filter(|&m| m != total) {
        return bad(format!(
            "guest has {total} bytes of RAM, this destination expects {m}"
        ));
    }
    if let Some(n) = opts.expect_vcpus.filter(|&n| n != hello.vcpu_count) {
        return bad(format!(
            "guest has {} vCPUs, this destination expects {n}",
            hello.vcpu_count
        ));
    }
    if hello.page_size != 4096 {
        return bad(format!("page size {} is not 4096", hello.page_size));
    }
    let clone = hello.features & FEATURE_CLONE != 0;
    let wrong = |s: &str| Err(MigrationError::WrongMode(s.to_string()));
    match (clone, opts.standby) {
        (true, false) => wrong(
            "the source sends a live clone (vmigrate clone) but this destination takes \
             migrations; start it with run --incoming --standby",
        ),
        (false, true) => wrong(
            "this destination is a standby (run --standby) and takes only a live clone \
             (vmigrate clone), not a migration",
        ),
        (true, true) if hello.features & FEATURE_MEMORY_DIGEST == 0 => {
            wrong("a live clone must be verified with memory digests")
        }
        _ => Ok(()),
    }
}
