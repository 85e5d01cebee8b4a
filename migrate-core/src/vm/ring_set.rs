//! The dirty rings of one VM, harvested into the engine's [`DirtyBitmap`].
//!
//! Three consumers share the rings: the engine's harvest, a reaper thread
//! (every [`REAP_INTERVAL`]) and a vCPU thread whose ring is full. The rings
//! are consumed under one mutex, each consume followed by its reset; pages
//! the reaper or a vCPU thread took wait in a pending bitmap (behind its own
//! mutex, never held while taking the rings') until the engine's next
//! harvest, which takes them with the rings. Every page reaches the pending set or the engine only after the
//! reset of its entry returned (see [`super::dirty_ring`] on why no page is
//! lost). No `unsafe` here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_ioctls::VmFd;

use super::dirty_ring::{reset, DirtyRing, DirtyRingError};
use super::memory::Slot;
use super::pending::Pending;
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
/// kvm_pvm does this: it logs every emulated store (not only the first one
/// after write protection) and checks the full condition only between long
/// runs of emulated code, far beyond the 64 entries the kernel keeps in
/// reserve. An overwrite of an unconsumed entry needs the kernel to write a
/// whole lap past it, so the next in-order consumption finds the whole ring
/// filled: that is how an overrun is detected. Its answer: every page of RAM
/// is set pending (dirty and written), so the next iteration resends all of
/// RAM; this covers the lost pages on a kernel that logs every store (as
/// kvm_pvm does), and a kernel that honours its reserve never overruns.
/// From then on each consumption also sweeps the whole ring, since the
/// kernel's write index no longer follows ours. The reaper ([`Reaper`])
/// exists so that overruns do not happen with a ring of sensible size.
///
/// **Resynchronising.** After an overrun the kernel still counts as used
/// the entries it wrote past the lap, which the reset already recycled:
/// it reports the ring full with nothing in it and never runs the vCPU
/// again. We track the kernel's reset index (it advances by what
/// `KVM_RESET_DIRTY_RINGS` returns when that is exactly what we marked),
/// find it by probing when unknown (mark one clean entry, reset, see if
/// the kernel took it), and on a full-ring exit with nothing to consume
/// mark the clean entries from the kernel's reset index on as consumed
/// (with a slot no memslot has, so nothing is re-protected): these are
/// exactly the phantom entries, up to the first real one, and at most half
/// a ring at a time, since the exit means at least `entries − 64` are
/// counted used; so the kernel's reset index never passes its write index.
/// A full-ring exit can be stale (the reaper may have emptied the ring
/// since the kernel decided to exit), so this is done only after an
/// overrun and on the second full-ring exit in a row with no entry of that
/// ring consumed by anyone in between: the kernel was full when it checked
/// before that exit, and nothing has been pushed or reset on that ring
/// since (the vCPU is on our thread, every reset happens under our lock).
pub struct RingSet {
    /// One lock for all rings: every consume is followed by its reset
    /// under it, so the accounting of reset counts is exact.
    rings: Mutex<Vec<DirtyRing>>,
    pending: Mutex<Pending>,
    slots: Vec<Slot>,
    entries: u32,
    /// Pages consumed from the rings, per vCPU (for per-vCPU dirty rates).
    harvested: Vec<AtomicU64>,
    /// Overruns detected (see above).
    overruns: AtomicU64,
    /// An overrun happened: sweep whole rings from now on.
    desynced: AtomicBool,
    /// Phantom entries marked consumed to resynchronise (see above).
    resynced: AtomicU64,
    /// Per vCPU: its ring's `harvested` count at its last full-ring exit
    /// with nothing to consume (`u64::MAX`: none pending).
    stuck_at: Vec<AtomicU64>,
    /// Reaper rounds and their total time in ns (the ring's background
    /// cost, for the harvest benchmark).
    reap_rounds: AtomicU64,
    reap_ns: AtomicU64,
}

impl RingSet {
    /// The rings of every vCPU (index order), covering `pages` of RAM.
    pub fn new(rings: Vec<DirtyRing>, slots: Vec<Slot>, pages: usize) -> Self {
        let entries = rings.first().map_or(0, DirtyRing::entries);
        Self {
            harvested: rings.iter().map(|_| AtomicU64::new(0)).collect(),
            stuck_at: rings.iter().map(|_| AtomicU64::new(u64::MAX)).collect(),
            rings: Mutex::new(rings),
            pending: Mutex::new(Pending::new(pages)),
            slots,
            entries,
            overruns: AtomicU64::new(0),
            desynced: AtomicBool::new(false),
            resynced: AtomicU64::new(0),
            reap_rounds: AtomicU64::new(0),
            reap_ns: AtomicU64::new(0),
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

    /// Phantom entries marked consumed to resynchronise after overruns.
    pub fn resynced(&self) -> u64 {
        self.resynced.load(Ordering::Relaxed)
    }

    /// Overruns detected so far.
    pub fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::Relaxed)
    }

    fn lock_rings(&self) -> MutexGuard<'_, Vec<DirtyRing>> {
        self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Consume ring `vcpu` into `into` (a page-index sink). On an overrun,
    /// sets every page pending.
    fn consume_ring(
        &self,
        rings: &mut [DirtyRing],
        vcpu: usize,
        mut into: impl FnMut(usize),
    ) -> Result<u32, DirtyRingError> {
        let ring = &mut rings[vcpu];
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
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_all();
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

    /// `KVM_RESET_DIRTY_RINGS` for what the rings marked, keeping track of
    /// the kernel's reset index (skipped when nothing is marked).
    fn reset_marked(vm: &VmFd, rings: &mut [DirtyRing]) -> Result<(), DirtyRingError> {
        let marked: u32 = rings.iter().map(DirtyRing::outstanding).sum();
        if marked == 0 {
            return Ok(());
        }
        let done = reset(vm)?;
        // Each ring's walk stops at its first unmarked entry, so if the
        // total is what was marked, each ring took exactly its own marks.
        let exact = done == marked;
        for r in rings.iter_mut() {
            r.reset_done(exact);
        }
        Ok(())
    }

    /// The engine's harvest: OR every page dirtied since the last harvest
    /// into `into` and `written` (all rings, then what the reaper and vCPU
    /// threads set aside), with write protection re-armed before this
    /// returns (the caller reads no page before).
    pub fn harvest(
        &self,
        vm: &VmFd,
        into: &mut DirtyBitmap,
        written: &mut DirtyBitmap,
    ) -> Result<(), DirtyRingError> {
        let mut rings = self.lock_rings();
        for v in 0..rings.len() {
            self.consume_ring(&mut rings, v, |p| {
                into.set(p);
                written.set(p);
            })?;
        }
        Self::reset_marked(vm, &mut rings)?;
        drop(rings);
        // Every page in `pending` was re-protected before it was put there.
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_into(into, written);
        Ok(())
    }

    /// Consume every ring, reset, publish into the pending set (the
    /// reaper's round). Returns the entries consumed.
    pub fn reap(&self, vm: &VmFd) -> Result<u32, DirtyRingError> {
        let start = std::time::Instant::now();
        let mut pages = Vec::new();
        let mut n = 0;
        let mut rings = self.lock_rings();
        for v in 0..rings.len() {
            n += self.consume_ring(&mut rings, v, |p| pages.push(p))?;
        }
        Self::reset_marked(vm, &mut rings)?;
        drop(rings);
        self.publish(pages);
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.reap_ns.fetch_add(ns, Ordering::Relaxed);
        self.reap_rounds.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }

    /// Reaper rounds so far and their total time in nanoseconds.
    pub fn reap_stats(&self) -> (u64, u64) {
        (
            self.reap_rounds.load(Ordering::Relaxed),
            self.reap_ns.load(Ordering::Relaxed),
        )
    }

    fn publish(&self, pages: Vec<usize>) {
        if pages.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for p in pages {
            pending.add(p);
        }
    }

    /// A vCPU thread's answer to `KVM_EXIT_DIRTY_RING_FULL`: consume its
    /// ring, reset, and only then set the pages aside for the engine's next
    /// harvest; with nothing to consume, resynchronise (see above).
    /// Returns the entries consumed.
    pub fn on_ring_full(&self, vm: &VmFd, vcpu: u32) -> Result<u32, DirtyRingError> {
        let v = usize::try_from(vcpu).expect("vCPU index fits usize");
        let mut pages = Vec::with_capacity(self.entries as usize);
        let mut rings = self.lock_rings();
        let n = self.consume_ring(&mut rings, v, |p| pages.push(p))?;
        Self::reset_marked(vm, &mut rings)?;
        let seen = self.harvested[v].load(Ordering::Relaxed);
        if n > 0 || !self.desynced.load(Ordering::Relaxed) {
            self.stuck_at[v].store(u64::MAX, Ordering::Relaxed);
        } else if self.stuck_at[v].swap(seen, Ordering::Relaxed) == seen {
            self.resync(vm, &mut rings[v])?;
            self.stuck_at[v].store(u64::MAX, Ordering::Relaxed);
        }
        drop(rings);
        self.publish(pages);
        Ok(n)
    }

    /// Give the kernel back the phantom entries of a ring it reports full
    /// with nothing in it (the caller holds the rings' lock, so no entry
    /// of any ring is marked and not yet reset).
    fn resync(&self, vm: &VmFd, ring: &mut DirtyRing) -> Result<(), DirtyRingError> {
        // The kernel counts at least `entries - RESERVED` used (it reported
        // the ring full); whatever a probe's reset took comes off that.
        let mut used_at_least = ring.entries().saturating_sub(RESERVED_ENTRIES);
        if ring.kernel_reset_pos().is_none() {
            for pos in 0..ring.entries() {
                if !ring.mark_probe(pos) {
                    continue;
                }
                let took = reset(vm)?;
                ring.probe_done(pos, took);
                if took > 0 {
                    used_at_least = used_at_least.saturating_sub(took);
                    break;
                }
            }
        }
        let k = ring.mark_phantoms(used_at_least.min(ring.entries() / 2));
        if k > 0 {
            let took = reset(vm)?;
            ring.phantoms_done(took);
            self.resynced.fetch_add(u64::from(k), Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Entries the kernel keeps free before it reports a ring full
/// (`KVM_DIRTY_RING_RSVD_ENTRIES`; x86 adds the PML buffer's 512 only with
/// VMX's page-modification logging, which kvm_pvm does not use).
const RESERVED_ENTRIES: u32 = 64;

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
            let r0 = &set.rings.lock().unwrap()[0];
            r0.test_push(0, 0, 7);
            r0.test_push(1, 1, 3); // slot 1 starts at page 262144
        }
        {
            let r1 = &set.rings.lock().unwrap()[1];
            r1.test_push(0, 0, 7);
            r1.test_push(1, 0, 100);
        }
        // What a vCPU thread set aside earlier.
        set.pending.lock().unwrap().add(42);
        let mut into = DirtyBitmap::new(262_400);
        for v in 0..2 {
            set.consume_ring(&mut set.lock_rings(), v, |p| into.set(p))
                .unwrap();
        }
        let mut written = DirtyBitmap::new(262_400);
        set.pending
            .lock()
            .unwrap()
            .take_into(&mut into, &mut written);
        assert_eq!(written.iter_ones().collect::<Vec<_>>(), vec![42]);
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
            let r0 = &set.rings.lock().unwrap()[0];
            r0.test_push(0, 1, 256); // slot 1 has 256 pages: 0..=255
            r0.test_push(1, 1 << 16, 0); // address space 1
        }
        let err = set
            .consume_ring(&mut set.lock_rings(), 0, |_| {})
            .unwrap_err();
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
            let r0 = &set.rings.lock().unwrap()[0];
            for i in 0..256u32 {
                r0.test_push(i, 0, u64::from(i));
            }
        }
        assert_eq!(
            set.consume_ring(&mut set.lock_rings(), 0, |_| {}).unwrap(),
            256
        );
        assert_eq!(set.overruns(), 1);
        assert_eq!(set.pending.lock().unwrap().count(), 262_400);
        // From now on the whole ring is swept: an entry the kernel wrote
        // ahead of our index is found.
        set.rings.lock().unwrap()[0].test_kernel_reset();
        set.rings.lock().unwrap()[0].test_push(256 + 10, 0, 77);
        let mut seen = Vec::new();
        assert_eq!(
            set.consume_ring(&mut set.lock_rings(), 0, |p| seen.push(p))
                .unwrap(),
            1
        );
        assert_eq!(seen, vec![77]);
    }
}
