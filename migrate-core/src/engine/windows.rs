//! Sampling the dirty log inside an iteration, window by window.
//!
//! An iteration's totals hide what happens inside it: a guest that storms
//! over 256 MiB for three seconds and then rewrites 16 MiB for three
//! seconds shows the same dirty count at the end of a 2 s iteration as a
//! guest that storms all the time. While an iteration is sent, a sampler
//! thread harvests the log every [`DIRTY_WINDOW`] into a bitmap of its own,
//! counts the pages dirtied in that window, and ORs them into the next
//! iteration's set, so nothing is lost and the next iteration is the same
//! as without sampling (a page harvested early is write-protected again
//! early, which costs at most one more fault if the guest writes it again).
//! The policy sees every whole window's count
//! ([`IterationStats::dirty_windows`](policy::IterationStats)).
//! Cost: one harvest per 100 ms (about 0.1 ms per GiB with the bitmap).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use policy::DIRTY_WINDOW;

use super::source::vm_err;
use super::{MigratableVm, MigrationError};
use crate::dirty::DirtyBitmap;

/// Runs `send` while sampling `vm`'s dirty log into `next` every window;
/// returns `send`'s result and each whole window's page count.
pub(super) fn sampled<V: MigratableVm, T>(
    vm: &V,
    next: &mut DirtyBitmap,
    send: impl FnOnce() -> T,
) -> Result<(T, Vec<u64>), MigrationError> {
    let pages = next.len();
    let shared = Mutex::new(std::mem::replace(next, DirtyBitmap::new(0)));
    let done = AtomicBool::new(false);
    let (out, counts) = std::thread::scope(|s| {
        let sampler = s.spawn(|| -> Result<Vec<u64>, MigrationError> {
            let mut counts = Vec::new();
            let mut window = DirtyBitmap::new(pages);
            loop {
                let end = Instant::now() + DIRTY_WINDOW;
                while !done.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    std::thread::park_timeout(end - now);
                }
                if done.load(Ordering::Acquire) {
                    // A partial window says nothing about a rate.
                    return Ok(counts);
                }
                vm.harvest_dirty_log(&mut window)
                    .map_err(vm_err("dirty log sync"))?;
                counts.push(window.count());
                shared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .union_with(&window);
                window.clear();
            }
        });
        let out = send();
        done.store(true, Ordering::Release);
        sampler.thread().unpark();
        let counts = sampler.join().unwrap_or_else(|_| {
            Err(MigrationError::InvalidData(
                "the dirty-log sampler panicked".into(),
            ))
        });
        (out, counts)
    });
    *next = shared.into_inner().unwrap_or_else(PoisonError::into_inner);
    Ok((out, counts?))
}
