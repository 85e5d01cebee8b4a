//! The dirty rings of one VM, harvested into the engine's [`DirtyBitmap`].
//!
//! Three consumers share the rings: the engine's harvest, a reaper thread
//! (every [`REAP_INTERVAL`]) and a vCPU thread whose ring is full. Each ring
//! is consumed under its own mutex; pages the reaper or a vCPU thread took
//! wait in a pending bitmap (behind its own mutex, never held while taking
//! a ring's) until the engine's next harvest, which takes them with the
//! rings. Every page reaches the pending set or the engine only after the
//! reset of its entry returned (see [`super::dirty_ring`] on why no page is
//! lost). No `unsafe` here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VmFd;

use super::dirty_ring::{reset, DirtyRing, DirtyRingError};
use super::memory::Slot;
use crate::dirty::DirtyBitmap;
use crate::PAGE_SIZE;

/// Map a ring entry to a page index of guest RAM (None: not ours).
fn page_index(slots: &[Slot], slot: u32, offset: u64) -> Option<usize> {
    // The high 16 bits are the address space (always 0 here).
    if slot >> 16 != 0 {
        return None;
    }
    let s = slots.iter().find(|s| s.index == slot)?;
    (offset < s.pages()).then(|| usize::try_from(s.gpa / PAGE_SIZE + offset).ok())?
}

/// The rings of a VM, the pages harvested by vCPU threads (full-ring exits)
/// and the reaper but not yet taken by the engine, and counters.
///
/// **Overruns.** A kernel that keeps pushing entries while a ring is full
/// overwrites entries not yet consumed: those pages are lost from the ring.
/// kvm_pvm does this (it logs every emulated store, not only the first one
/// after write protection, and checks the full condition only between long
/// runs of emulated code, far beyond the 64 entries the kernel keeps in
/// reserve). An overwrite of an unconsumed entry needs the kernel to write a
/// whole lap past it, so the next in-order consumption finds the whole ring
/// filled: that is how an overrun is detected. Its answer: every page of RAM
/// is set pending (dirty and written), so the next iteration resends all of
/// RAM and nothing can be missed; and from then on each consumption also
/// sweeps the whole ring, since the kernel's index no longer matches ours.
/// The reaper ([`Reaper`]) exists so that overruns do not happen with a
/// ring of sensible size.
///
/// **Resynchronising.** After an overrun the kernel counts as used the
/// entries it wrote past the lap, which the reset already recycled: it
/// reports the ring full while nothing is in it, and never runs the vCPU
/// again. A full-ring exit with nothing to consume after an overrun is
/// answered by marking clean entries, from our index on, consumed (with a
/// slot no memslot has, so the reset re-protects nothing), at most half a
/// ring at a time: the exit means the kernel counts at least `entries − 64`
/// used, so the kernel's reset index cannot be pushed past its write index.
pub struct RingSet {
    rings: Vec<Mutex<DirtyRing>>,
    pending: Mutex<DirtyBitmap>,
    slots: Vec<Slot>,
    entries: u32,
    /// Pages consumed from the rings, per vCPU (for per-vCPU dirty rates).
    harvested: Vec<AtomicU64>,
    /// Overruns detected (see above).
    overruns: AtomicU64,
    /// An overrun happened: sweep whole rings from now on.
    desynced: AtomicBool,
    /// Clean entries marked consumed to resynchronise (see above).
    resynced: AtomicU64,
}

impl RingSet {
    /// The rings of every vCPU (index order), covering `pages` of RAM.
    pub fn new(rings: Vec<DirtyRing>, slots: Vec<Slot>, pages: usize) -> Self {
        let entries = rings.first().map_or(0, DirtyRing::entries);
        Self {
            harvested: rings.iter().map(|_| AtomicU64::new(0)).collect(),
            rings: rings.into_iter().map(Mutex::new).collect(),
            pending: Mutex::new(DirtyBitmap::new(pages)),
            slots,
            entries,
            overruns: AtomicU64::new(0),
            desynced: AtomicBool::new(false),
            resynced: AtomicU64::new(0),
        }
    }

    /// Entries per vCPU ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Pages consumed from each vCPU's ring so far.
    pub fn harvested_per_vcpu(&self) -> Vec<u64> {
        self.harvested
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect()
    }

    /// Clean entries marked consumed to resynchronise after overruns.
    pub fn resynced(&self) -> u64 {
        self.resynced.load(Ordering::Relaxed)
    }

    /// Overruns detected so far.
    pub fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::Relaxed)
    }

    /// Consume ring `vcpu` into `into` (a page-index sink). On an overrun,
    /// sets every page pending.
    fn consume_ring(
        &self,
        vcpu: usize,
        mut into: impl FnMut(usize),
    ) -> Result<u32, DirtyRingError> {
        let mut ring = self.rings[vcpu].lock().unwrap_or_else(|e| e.into_inner());
        let mut bad = None;
        let sweep = self.desynced.load(Ordering::Relaxed);
        let n = ring.consume(sweep, |slot, offset| {
            match page_index(&self.slots, slot, offset) {
                Some(p) => into(p),
                None => bad = bad.or(Some((slot, offset))),
            }
        });
        if n >= ring.entries() {
            self.overruns.fetch_add(1, Ordering::Relaxed);
            self.desynced.store(true, Ordering::Relaxed);
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            *pending = DirtyBitmap::all(pending.len());
            tracing::warn!("dirty ring of vCPU {vcpu} overran; all of RAM is treated as dirty");
        }
        self.harvested[vcpu].fetch_add(u64::from(n), Ordering::Relaxed);
        match bad {
            Some((slot, offset)) => Err(DirtyRingError::BadEntry {
                vcpu: u32::try_from(vcpu).unwrap_or(u32::MAX),
                slot,
                offset,
            }),
            None => Ok(n),
        }
    }

    /// The engine's harvest: OR every page dirtied since the last harvest
    /// into `into` (all rings, then what vCPU threads set aside on full-ring
    /// exits), with write protection re-armed before this returns.
    pub fn harvest(&self, vm: &VmFd, into: &mut DirtyBitmap) -> Result<(), DirtyRingError> {
        let mut any = false;
        for v in 0..self.rings.len() {
            any |= self.consume_ring(v, |p| into.set(p))? > 0;
        }
        if any {
            reset(vm)?;
        }
        // Every page in `pending` was re-protected before it was put there.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        into.union_with(&pending);
        pending.clear();
        Ok(())
    }

    /// Consume every ring, reset, publish into the pending set (the
    /// reaper's round). Returns the entries consumed.
    pub fn reap(&self, vm: &VmFd) -> Result<u32, DirtyRingError> {
        let mut pages = Vec::new();
        let mut n = 0;
        for v in 0..self.rings.len() {
            n += self.consume_ring(v, |p| pages.push(p))?;
        }
        if n > 0 {
            reset(vm)?;
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for p in pages {
                pending.set(p);
            }
        }
        Ok(n)
    }

    /// A vCPU thread's answer to `KVM_EXIT_DIRTY_RING_FULL`: consume its
    /// ring, reset, and only then set the pages aside for the engine's next
    /// harvest. Returns the entries consumed.
    pub fn on_ring_full(&self, vm: &VmFd, vcpu: u32) -> Result<u32, DirtyRingError> {
        let v = usize::try_from(vcpu).expect("vCPU index fits usize");
        let mut pages = Vec::with_capacity(self.entries as usize);
        let n = self.consume_ring(v, |p| pages.push(p))?;
        if n == 0 {
            if self.desynced.load(Ordering::Relaxed) {
                let mut ring = self.rings[v].lock().unwrap_or_else(|e| e.into_inner());
                let half = ring.entries() / 2;
                let k = ring.mark_clean_as_reset(half);
                drop(ring);
                self.resynced.fetch_add(u64::from(k), Ordering::Relaxed);
                reset(vm)?;
            }
            return Ok(0);
        }
        reset(vm)?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for p in pages {
            pending.set(p);
        }
        Ok(n)
    }
}

/// How often the reaper empties the rings: at the fastest store rate here
/// (~1M guest instructions/s) 10 ms is at most ~10,000 entries, far below a
/// default ring's 65,536.
pub const REAP_INTERVAL: Duration = Duration::from_millis(10);

/// A thread that empties the rings every [`REAP_INTERVAL`] while the VM
/// lives, as QEMU's dirty-ring reaper does, so that a ring is drained long
/// before it is full however rarely the engine harvests.
pub struct Reaper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reaper {
    /// Start reaping `set` of `vm`.
    pub fn spawn(set: Arc<RingSet>, vm: Arc<VmFd>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-ring-reaper".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    if let Err(e) = set.reap(&vm) {
                        tracing::error!("dirty ring reaper: {e}");
                    }
                    std::thread::sleep(REAP_INTERVAL);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<Slot> {
        vec![
            Slot {
                index: 0,
                gpa: 0,
                size: 1 << 30,
            },
            Slot {
                index: 1,
                gpa: 1 << 30,
                size: 1 << 20,
            },
        ]
    }

    #[test]
    fn harvest_maps_slots_into_bitmap_and_drains_pending() {
        let set = RingSet::new(
            vec![DirtyRing::heap(256), DirtyRing::heap(256)],
            slots(),
            262_400,
        );
        {
            let r0 = set.rings[0].lock().unwrap();
            r0.test_push(0, 0, 7);
            r0.test_push(1, 1, 3); // slot 1 starts at page 262144
        }
        {
            let r1 = set.rings[1].lock().unwrap();
            r1.test_push(0, 0, 7);
            r1.test_push(1, 0, 100);
        }
        // What a vCPU thread set aside earlier.
        set.pending.lock().unwrap().set(42);
        let mut into = DirtyBitmap::new(262_400);
        for v in 0..2 {
            set.consume_ring(v, |p| into.set(p)).unwrap();
        }
        into.union_with(&set.pending.lock().unwrap());
        set.pending.lock().unwrap().clear();
        assert_eq!(
            into.iter_ones().collect::<Vec<_>>(),
            vec![7, 42, 100, 262_147]
        );
        assert_eq!(set.harvested_per_vcpu(), vec![2, 2]);
        assert_eq!(set.pending.lock().unwrap().count(), 0);
    }

    #[test]
    fn entry_outside_ram_is_an_error() {
        let set = RingSet::new(vec![DirtyRing::heap(256)], slots(), 262_400);
        {
            let r0 = set.rings[0].lock().unwrap();
            r0.test_push(0, 1, 256); // slot 1 has 256 pages: 0..=255
            r0.test_push(1, 1 << 16, 0); // address space 1
        }
        let err = set.consume_ring(0, |_| {}).unwrap_err();
        assert!(matches!(
            err,
            DirtyRingError::BadEntry {
                slot: 1,
                offset: 256,
                ..
            }
        ));
        assert_eq!(page_index(&slots(), 1 << 16, 0), None);
        assert_eq!(page_index(&slots(), 1, 255), Some(262_399));
    }

    #[test]
    fn a_whole_ring_filled_is_an_overrun_and_sets_all_pending() {
        let set = RingSet::new(vec![DirtyRing::heap(256)], slots(), 262_400);
        {
            let r0 = set.rings[0].lock().unwrap();
            for i in 0..256u32 {
                r0.test_push(i, 0, u64::from(i));
            }
        }
        assert_eq!(set.consume_ring(0, |_| {}).unwrap(), 256);
        assert_eq!(set.overruns(), 1);
        assert_eq!(set.pending.lock().unwrap().count(), 262_400);
        // From now on the whole ring is swept: an entry the kernel wrote
        // ahead of our index is found.
        set.rings[0].lock().unwrap().test_kernel_reset();
        set.rings[0].lock().unwrap().test_push(256 + 10, 0, 77);
        let mut seen = Vec::new();
        assert_eq!(set.consume_ring(0, |p| seen.push(p)).unwrap(), 1);
        assert_eq!(seen, vec![77]);
    }
}
