//! The pre-copy iterations of the source: send, harvest, ask the policy.
//!
//! Bitmaps per iteration: `found` is what the dirty log reported for this
//! iteration (all RAM for iteration 0); `to_send` is `found` minus the
//! deferred set; `deferred` grows when the policy asks to leave the
//! writable working set (pages found dirty in two iterations running) out of
//! pre-copy, and is sent once, in the final copy.

use std::io::Write;
use std::time::{Duration, Instant};

use policy::{Decision, IterationStats, MigrationHistory};

use super::pages::PageSender;
use super::report::{mbps, ms, MigrationReport};
use super::send_options::{SendOptions, TimeoutAction};
use super::source::{send_iteration, vm_err};
use super::{MigratableVm, MigrationError};
use crate::dirty::DirtyBitmap;
use crate::vm::ram_pages;
use crate::wire::PAGE_SIZE_U64;

/// Where pre-copy ended: what the final copy must send.
pub(super) struct PrecopyEnd {
    /// Number of the last pre-copy iteration.
    pub iteration: u32,
    /// Pages dirtied during the last iteration, not yet sent.
    pub dirty: DirtyBitmap,
    /// Pages held back for the final copy.
    pub deferred: DirtyBitmap,
    /// What the dirty log reported for the last iteration.
    pub last_found: DirtyBitmap,
    /// Dirty-log syncs so far.
    pub syncs: u64,
}

/// Run iterations until the policy says stop (or fails, times out, is
/// cancelled). The vCPUs are still running when this returns.
pub(super) fn run<V: MigratableVm, W: Write>(
    vm: &V,
    w: &mut W,
    sender: &mut PageSender,
    opts: &mut SendOptions,
    report: &mut MigrationReport,
    start: Instant,
) -> Result<PrecopyEnd, MigrationError> {
    let pages = usize::try_from(ram_pages(vm.memory())).expect("page count fits usize");
    // Dirty tracking starts now: drop what the log held so far, since
    // iteration 0 sends everything anyway.
    let mut next = DirtyBitmap::new(pages);
    vm.harvest_dirty_log(&mut next)
        .map_err(vm_err("dirty log sync"))?;
    next.clear();
    // After that harvest the VM knows every page ever written; the rest are
    // zero and iteration 0 sends them as ranges without reading them.
    let written = vm.written_pages();
    let mut found = DirtyBitmap::all(pages);
    let mut previous: Option<DirtyBitmap> = None;
    let mut deferred = DirtyBitmap::new(pages);
    let mut history = MigrationHistory::new();
    let mut iteration = 0u32;
    let mut syncs = 1u64;
    let mut precopy_bytes = 0u64;
    let mut precopy_raw = 0u64;
    let mut precopy_time = Duration::ZERO;
    let mut throttle = 0.0f64;
    // Set when the policy throttles vCPUs one by one (dirty-limit).
    let mut vcpu_throttles: Vec<f64> = Vec::new();
    // Cumulative ring entries per vCPU at the start of the iteration.
    let mut entries_before = vm.vcpu_dirty_entries();
    // For the report only: the policy keeps its own copy.
    let mut downtime_limit = opts.downtime_limit;

    loop {
        let phase = format!("iteration {iteration}");
        let mut to_send = found.clone();
        to_send.subtract(&deferred);
        let t0 = Instant::now();
        let known = if iteration == 0 {
            written.as_ref()
        } else {
            None
        };
        let (sent, windows) = super::windows::sampled(vm, &mut next, || {
            send_iteration(sender, w, vm, iteration, &to_send, known, &phase)
        })?;
        let sent = sent?;
        report.ram.skipped += sent.skipped_pages;
        vm.harvest_dirty_log(&mut next)
            .map_err(vm_err("dirty log sync"))?;
        syncs += 1;
        let duration = t0.elapsed();
        let vcpu_dirty_pages = per_iteration(&mut entries_before, vm.vcpu_dirty_entries());
        precopy_bytes += sent.bytes;
        precopy_raw += sent.raw_bytes;
        precopy_time += duration;
        let stats = IterationStats {
            iteration,
            dirty_pages: found.count(),
            pages_sent: sent.data_pages,
            zero_pages: sent.zero_pages,
            bytes_sent: sent.bytes,
            duration,
            dirtied_during: next.count(),
            redirtied_pages: previous.as_ref().map_or(0, |p| found.overlap_count(p)),
            deferred_pages: deferred.count_not_in(&next),
            throttle,
            ram_bytes: report.ram.total,
            page_size: PAGE_SIZE_U64,
            dirty_windows: windows,
            vcpu_dirty_pages,
            vcpu_throttles: vcpu_throttles.clone(),
            unchanged_pages: sent.unchanged_pages,
        };
        report.record_iteration(&stats, false);
        report.ram.dirty_sync_count = syncs;
        report.ram.mbps = mbps(precopy_bytes, precopy_time);
        report.ram.page_mbps = mbps(precopy_raw, precopy_time);
        history.push(stats);
        // A limit set through the API wins over the ramp, for good.
        if let Some(limit) = opts.control.take_downtime_limit() {
            opts.downtime_ramp = None;
            downtime_limit = limit;
            opts.policy.set_downtime_limit(limit);
        } else if let Some(ramp) = &opts.downtime_ramp {
            downtime_limit = ramp.limit_at(iteration);
            opts.policy.set_downtime_limit(downtime_limit);
        }
        report.downtime_limit = Some(ms(downtime_limit));
        report.max_bandwidth = opts.control.rate().get();
        let decision = opts.policy.decide(&history);
        // Predicted downtime from the last iteration that sent page data: a
        // fully deferred iteration's few bytes say nothing about the link.
        report.expected_downtime = history
            .last_page_sample()
            .and_then(|s| s.millis_to_send(report.ram.remaining));
        // Live reports carry the time so far; the final one is set at the end.
        report.total_time = ms(start.elapsed());
        if let Some(p) = opts.progress.as_mut() {
            p(report);
        }
        if opts.control.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let stop = match decision {
            Decision::StopAndCopy(reason) => Some(reason.to_string()),
            Decision::Abort(why) => return Err(MigrationError::PolicyAbort(why)),
            Decision::Throttle(f) => {
                vm.set_throttle(f).map_err(vm_err("throttle vCPUs"))?;
                throttle = f.clamp(0.0, 0.99);
                vcpu_throttles.clear();
                None
            }
            Decision::ThrottleVcpus(fs) => {
                vm.set_vcpu_throttles(&fs)
                    .map_err(vm_err("throttle vCPUs"))?;
                // What the VM applied (clamped, and one entry per vCPU).
                vcpu_throttles = vm.vcpu_throttles();
                throttle = vm.throttle();
                report.note_vcpu_throttles(&vcpu_throttles);
                None
            }
            Decision::Continue => None,
        };
        let stop = match (stop, opts.timeout) {
            (None, Some(limit)) if start.elapsed() >= limit => {
                let secs = start.elapsed().as_secs_f64();
                if opts.timeout_action == TimeoutAction::Cancel {
                    return Err(MigrationError::Timeout { secs });
                }
                let predicted = report
                    .expected_downtime
                    .map_or_else(|| "unknown".to_string(), |ms| format!("{ms:.1} ms"));
                Some(format!(
                    "timeout after {secs:.1} s: stop-and-copy forced \
                     (predicted downtime {predicted})"
                ))
            }
            (stop, _) => stop,
        };
        if let Some(reason) = stop {
            report.stop_reason = Some(reason);
            return Ok(PrecopyEnd {
                iteration,
                dirty: next,
                deferred,
                last_found: found,
                syncs,
            });
        }
        if opts.policy.defer_writable_working_set() {
            // Found dirty now and in the iteration just sent: it will be
            // dirty again; send it once, in the final copy.
            let mut wws = next.clone();
            wws.intersect_with(&found);
            deferred.union_with(&wws);
        } else if deferred.count() > 0 {
            // The policy no longer wants the set held (mp waiting for a
            // quiet phase): what was held is still unsent, so the next
            // iteration sends it.
            next.union_with(&deferred);
            deferred.clear();
        }
        previous = Some(std::mem::replace(&mut found, next.clone()));
        next.clear();
        iteration += 1;
    }
}

/// Entries each vCPU's ring gave since `before` (which becomes `now`):
/// empty when the VM cannot count per vCPU. The counters only grow; a
/// shorter or smaller reading (none is expected) counts as 0.
pub(super) fn per_iteration(before: &mut Option<Vec<u64>>, now: Option<Vec<u64>>) -> Vec<u64> {
    let diff = match (before.as_ref(), now.as_ref()) {
        (Some(b), Some(n)) => n
            .iter()
            .enumerate()
            .map(|(i, &c)| c.saturating_sub(b.get(i).copied().unwrap_or(0)))
            .collect(),
        _ => Vec::new(),
    };
    *before = now;
    diff
}
