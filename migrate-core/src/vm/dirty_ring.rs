//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): one ring of dirtied pages
//! per vCPU, shared with the kernel through an mmap of the vCPU fd.
//!
//! Why a ring: the bitmap is read whole (`KVM_GET_DIRTY_LOG`, one bit per
//! page of RAM) whatever the guest dirtied, so its harvest grows with RAM;
//! the ring holds one 16-byte entry per page dirtied since the last reset,
//! so its harvest grows with what the guest wrote.
//!
//! Protocol (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING"):
//! - The ring size is set on the VM (`KVM_ENABLE_CAP`) before any vCPU
//!   exists; each vCPU's ring is mapped from its fd at page
//!   `KVM_DIRTY_LOG_PAGE_OFFSET`. Slots still need `KVM_MEM_LOG_DIRTY_PAGES`
//!   (the kernel logs only slots with it); `KVM_GET_DIRTY_LOG` is refused.
//! - The kernel fills entry `i & (n - 1)` (slot, page offset), then sets its
//!   `DIRTY` flag with release ordering. We read entries in order from our
//!   own fetch index while `DIRTY` is set (acquire load), then mark each one
//!   `RESET` (release store). `KVM_RESET_DIRTY_RINGS` on the VM re-arms write
//!   protection for every entry marked `RESET` and frees it.
//! - When a ring has fewer free entries than the kernel keeps in reserve,
//!   the vCPU exits with `KVM_EXIT_DIRTY_RING_FULL` and re-exits until the
//!   ring is reset.
//!
//! Why no page is lost: a page is published (to the engine's bitmap or to
//! [`super::ring_set::RingSet`]'s pending bitmap) only after `KVM_RESET_DIRTY_RINGS` for its
//! entry has returned, so the page is write-protected again before anyone
//! reads its contents; a write after that read is logged anew. A write
//! between the kernel's push and the reset lands before the read, because
//! the read comes after the publication. Each ring is harvested under its
//! own mutex, so the engine and a vCPU thread on a full-ring exit never
//! consume the same entry twice or skip one.
//!
//! All the `unsafe` of the ring is in this module: the mmap, the atomic view
//! of the shared entries, the reset ioctl. [`super::ring_set`] builds the
//! VM-wide harvest on it (pending set, reaper, overruns) without `unsafe`.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Entry flag: the kernel filled this entry.
const GFN_F_DIRTY: u32 = 1;
/// Entry flag: userspace consumed it; `KVM_RESET_DIRTY_RINGS` may recycle it.
const GFN_F_RESET: u32 = 2;
/// Bytes per ring entry (`struct kvm_dirty_gfn`).
pub const ENTRY_BYTES: u32 = 16;
/// Ring size used when none is asked for (and the kernel allows it):
/// 1 MiB per vCPU = 65,536 pages (256 MiB of writes) between resets, so a
/// guest dirtying ~250,000 pages/s (the fastest here) fills it in ~0.25 s
/// and a ring-full exit is rare next to the engine's own harvests.
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
/// Smallest ring the kernel accepts: one page (it also needs more entries
/// than it keeps in reserve, 64 or more).
pub const MIN_RING_BYTES: u32 = 4096;

const _: () = assert!(std::mem::size_of::<kvm_dirty_gfn>() == ENTRY_BYTES as usize);

/// Errors of the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    /// The kernel does not offer the ring.
    #[error("this kernel does not offer KVM_CAP_DIRTY_LOG_RING")]
    NotOffered,
    /// The ring size is not usable.
    #[error("dirty ring of {bytes} bytes refused: {reason} (the kernel allows up to {max})")]
    BadSize {
        /// Requested size in bytes.
        bytes: u64,
        /// Largest size the kernel offers.
        max: u32,
        /// Why.
        reason: &'static str,
    },
    /// `KVM_ENABLE_CAP` for the ring failed.
    #[error("enabling the dirty ring ({bytes} bytes per vCPU) failed")]
    Enable {
        /// Ring size.
        bytes: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU's ring could not be mapped.
    #[error("cannot map the dirty ring of vCPU {vcpu}")]
    Map {
        /// The vCPU.
        vcpu: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    Reset(#[source] std::io::Error),
    /// The kernel reported a page outside our slots.
    #[error("dirty ring of vCPU {vcpu} names slot {slot:#x} offset {offset:#x}, not guest RAM")]
    BadEntry {
        /// The vCPU.
        vcpu: u32,
        /// `slot` field (address space << 16 | slot id).
        slot: u32,
        /// Page offset in the slot.
        offset: u64,
    },
}

/// Which dirty ring capability the kernel offers, and up to what size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingOffer {
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (else the plain ring, which on
    /// x86 has the same ordering).
    pub acq_rel: bool,
    /// Largest ring in bytes per vCPU.
    pub max_bytes: u32,
}

/// What the kernel offers, `None` without a ring.
pub fn offered(vm: &VmFd) -> Option<RingOffer> {
    let probe = |cap: u32| {
        u32::try_from(vm.check_extension_raw(libc::c_ulong::from(cap)))
            .ok()
            .filter(|&n| n > 0)
    };
    if let Some(max_bytes) = probe(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) {
        return Some(RingOffer {
            acq_rel: true,
            max_bytes,
        });
    }
    probe(KVM_CAP_DIRTY_LOG_RING).map(|max_bytes| RingOffer {
        acq_rel: false,
        max_bytes,
    })
}

/// Check a requested ring size against the kernel's offer.
pub fn check_size(bytes: u64, offer: RingOffer) -> Result<u32, DirtyRingError> {
    let bad = |reason| DirtyRingError::BadSize {
        bytes,
        max: offer.max_bytes,
        reason,
    };
    if !bytes.is_power_of_two() {
        return Err(bad("not a power of two"));
    }
    if bytes < u64::from(MIN_RING_BYTES) {
        return Err(bad("smaller than 4 KiB"));
    }
    if bytes > u64::from(offer.max_bytes) {
        return Err(bad("larger than the kernel allows"));
    }
    u32::try_from(bytes).map_err(|_| bad("too large"))
}

/// Enable the ring on a VM that has no vCPU yet (`bytes` from
/// [`check_size`]).
pub fn enable(vm: &VmFd, offer: RingOffer, bytes: u32) -> Result<(), DirtyRingError> {
    let mut cap = kvm_enable_cap {
        cap: if offer.acq_rel {
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        } else {
            KVM_CAP_DIRTY_LOG_RING
        },
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    vm.enable_cap(&cap)
        .map_err(|source| DirtyRingError::Enable { bytes, source })
}

/// Where a ring's entries live.
enum Backing {
    /// The kernel's ring, mapped from a vCPU fd.
    Mmap,
    /// A heap ring for unit tests (no KVM).
    #[cfg(test)]
    Heap(#[allow(dead_code)] Box<[kvm_dirty_gfn]>),
}

/// One vCPU's ring and our position in it.
pub struct DirtyRing {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Index of the next entry to read (free-running, wraps as the kernel's).
    fetch: u32,
    /// Entries marked consumed since the last reset.
    outstanding: u32,
    /// The kernel's reset index (free-running), while we know it.
    kreset: Option<u32>,
    backing: Backing,
}

// SAFETY: the ring is plain shared memory; all access goes through
// `&mut self` (one thread at a time, under `RingSet`'s mutex) with atomic
// flag accesses against the kernel. The pointer stays valid until Drop.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Map the ring of one vCPU (`bytes` as enabled on its VM).
    pub fn map(vcpu: &VcpuFd, index: u32, bytes: u32) -> Result<Self, DirtyRingError> {
        let len = usize::try_from(bytes).expect("ring size fits usize");
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page_size();
        // SAFETY: a fresh shared mapping chosen by the kernel (no address
        // hint), of a vCPU fd we hold; nothing else is touched. The result
        // is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyRingError::Map {
                vcpu: index,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            base: NonNull::new(p.cast()).expect("mmap succeeded"),
            entries: bytes / ENTRY_BYTES,
            fetch: 0,
            outstanding: 0,
            kreset: Some(0),
            backing: Backing::Mmap,
        })
    }

    /// A ring in ordinary memory, filled by the test as the kernel would.
    #[cfg(test)]
    pub(super) fn heap(entries: u32) -> Self {
        let mut mem = vec![kvm_dirty_gfn::default(); entries as usize].into_boxed_slice();
        let base = NonNull::new(mem.as_mut_ptr()).expect("boxed slice");
        Self {
            base,
            entries,
            fetch: 0,
            outstanding: 0,
            kreset: Some(0),
            backing: Backing::Heap(mem),
        }
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Position of free-running index `i` in the ring (`entries` is a
    /// power of two, so this is `i mod entries` across u32 wrap-around).
    fn slot_of(&self, i: u32) -> usize {
        (i & (self.entries - 1)) as usize
    }

    fn entry(&self, i: u32) -> *mut kvm_dirty_gfn {
        // SAFETY: slot_of(i) < entries, and `base` points to `entries`
        // contiguous entries (the mapping or the heap ring).
        unsafe { self.base.as_ptr().add(self.slot_of(i)) }
    }

    fn flags(&self, i: u32) -> &AtomicU32 {
        // SAFETY: `flags` is the first u32 of an entry inside the live ring,
        // 4-byte aligned (entries are 16 bytes, the mapping page-aligned);
        // the kernel accesses it only atomically (smp_load_acquire /
        // smp_store_release), so an AtomicU32 view of it is sound.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.entry(i)).flags)) }
    }

    /// Consume every entry the kernel has filled, in order from our fetch
    /// index, passing each (slot, offset) to `page`, and mark it for reset.
    /// With `sweep`, then also every other filled entry anywhere in the
    /// ring (after an overrun the kernel's index is no longer ours, see
    /// [`super::ring_set::RingSet`]). Returns how many. The caller must call [`reset`]
    /// before publishing the pages.
    pub(super) fn consume(&mut self, sweep: bool, mut page: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        while n < self.entries && self.take(self.fetch, &mut page) {
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        if sweep {
            for i in 0..self.entries {
                if self.take(i, &mut page) {
                    n += 1;
                }
            }
        }
        self.outstanding += n;
        n
    }

    /// Push as the kernel does: fill, then release DIRTY; `at` is the
    /// kernel's free-running dirty index.
    #[cfg(test)]
    pub(super) fn test_push(&self, at: u32, slot: u32, offset: u64) {
        let e = self.entry(at);
        // SAFETY: test ring on the heap, entry in range, one thread.
        unsafe {
            (*e).slot = slot;
            (*e).offset = offset;
        }
        self.flags(at).store(GFN_F_DIRTY, Ordering::Release);
    }

    /// Recycle as KVM_RESET_DIRTY_RINGS does: RESET → clean.
    #[cfg(test)]
    pub(super) fn test_kernel_reset(&self) {
        for i in 0..self.entries {
            let f = self.flags(i);
            if f.load(Ordering::Acquire) == GFN_F_RESET {
                f.store(0, Ordering::Release);
            }
        }
    }

    /// Entries marked consumed since the last reset.
    pub(super) fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// The kernel's reset index, when known.
    pub(super) fn kernel_reset_pos(&self) -> Option<u32> {
        self.kreset
    }

    /// After `KVM_RESET_DIRTY_RINGS`: `exact` when the kernel took exactly
    /// what all rings had marked (then this ring's reset index moved past
    /// its marks); otherwise the index is unknown if we had marked any.
    pub(super) fn reset_done(&mut self, exact: bool) {
        if exact {
            self.kreset = self.kreset.map(|k| k.wrapping_add(self.outstanding));
        } else if self.outstanding > 0 {
            self.kreset = None;
        }
        self.outstanding = 0;
    }

    /// Mark a fake consumed entry at `i` (a slot no memslot has, so the
    /// kernel re-protects nothing for it).
    fn mark_fake(&self, i: u32) {
        let e = self.entry(i);
        // SAFETY: the entry is inside the live ring and clean, and the
        // vCPU of this ring is not running (we are on its thread after a
        // full-ring exit), so the kernel does not write it meanwhile.
        unsafe { std::ptr::addr_of_mut!((*e).slot).write_volatile(u32::MAX) };
        self.flags(i).store(GFN_F_RESET, Ordering::Release);
    }

    /// Probe for the kernel's reset index: mark clean entry `pos` consumed
    /// (false if it is not clean). Follow with a reset and [`Self::probe_done`].
    pub(super) fn mark_probe(&mut self, pos: u32) -> bool {
        if self.flags(pos).load(Ordering::Acquire) != 0 {
            return false;
        }
        self.mark_fake(pos);
        true
    }

    /// The reset after a probe at `pos` took `took` entries: the kernel's
    /// reset index was `pos` (and is now past what it took); if it took
    /// none, the probe is withdrawn.
    pub(super) fn probe_done(&mut self, pos: u32, took: u32) {
        if took > 0 {
            self.kreset = Some(pos.wrapping_add(took));
        } else {
            self.flags(pos).store(0, Ordering::Release);
        }
    }

    /// Mark up to `max` clean entries from the kernel's reset index on as
    /// consumed: the phantoms of an overrun (see
    /// [`super::ring_set::RingSet`]). Follow with a reset and
    /// [`Self::phantoms_done`]. Returns how many.
    pub(super) fn mark_phantoms(&mut self, max: u32) -> u32 {
        let Some(k) = self.kreset else { return 0 };
        let mut n = 0;
        while n < max && self.flags(k.wrapping_add(n)).load(Ordering::Acquire) == 0 {
            self.mark_fake(k.wrapping_add(n));
            n += 1;
        }
        n
    }

    /// The reset after [`Self::mark_phantoms`] took `took` entries.
    pub(super) fn phantoms_done(&mut self, took: u32) {
        self.kreset = self.kreset.map(|k| k.wrapping_add(took));
    }

    /// Consume entry `i` if the kernel filled it.
    fn take(&self, i: u32, page: &mut impl FnMut(u32, u64)) -> bool {
        let flags = self.flags(i);
        if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
            return false;
        }
        let e = self.entry(i);
        // SAFETY: the acquire load above saw DIRTY, so the kernel's writes
        // of slot and offset (made before its release of the flag) are
        // visible; the entry is inside the live ring.
        let (slot, offset) = unsafe {
            (
                std::ptr::addr_of!((*e).slot).read_volatile(),
                std::ptr::addr_of!((*e).offset).read_volatile(),
            )
        };
        page(slot, offset);
        flags.store(GFN_F_RESET, Ordering::Release);
        true
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // Irrefutable outside unit tests, where heap rings also exist.
        #[allow(irrefutable_let_patterns)]
        if let Backing::Mmap = self.backing {
            let len = self.entries as usize * ENTRY_BYTES as usize;
            // SAFETY: `base`/`len` are exactly the mapping made in `map`,
            // unmapped once, here; no reference into it outlives `self`.
            unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
        }
    }
}

fn page_size() -> libc::off_t {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n
    } else {
        4096
    }
}

/// `KVM_RESET_DIRTY_RINGS`: recycle every entry marked `RESET` on every ring
/// of the VM and write-protect its page again. Returns entries reset.
pub fn reset(vm: &VmFd) -> Result<u32, DirtyRingError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only the
    // VM's own rings.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    u32::try_from(ret).map_err(|_| DirtyRingError::Reset(std::io::Error::last_os_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_wraps_with_mask() {
        let ring = DirtyRing::heap(256);
        assert_eq!(ring.slot_of(0), 0);
        assert_eq!(ring.slot_of(255), 255);
        assert_eq!(ring.slot_of(256), 0);
        assert_eq!(ring.slot_of(u32::MAX), 255);
        assert_eq!(ring.slot_of(u32::MAX.wrapping_add(1)), 0);
    }

    #[test]
    fn consume_reads_in_order_and_stops_at_clean_entry() {
        let mut ring = DirtyRing::heap(256);
        for (i, off) in [5u64, 9, 5].iter().enumerate() {
            ring.test_push(u32::try_from(i).unwrap(), 0, *off);
        }
        let mut seen = Vec::new();
        assert_eq!(ring.consume(false, |s, o| seen.push((s, o))), 3);
        assert_eq!(seen, vec![(0, 5), (0, 9), (0, 5)]);
        // Marked for reset, not consumed twice.
        assert_eq!(ring.flags(0).load(Ordering::Relaxed), GFN_F_RESET);
        assert_eq!(ring.consume(false, |_, _| panic!("nothing new")), 0);
        assert_eq!(ring.fetch, 3);
    }

    #[test]
    fn consume_across_wrap_around() {
        let mut ring = DirtyRing::heap(256);
        // Start near the u32 limit, as after a long life.
        ring.fetch = u32::MAX - 2;
        for k in 0..6u32 {
            ring.test_push((u32::MAX - 2).wrapping_add(k), 0, u64::from(k));
        }
        let mut seen = Vec::new();
        assert_eq!(ring.consume(false, |_, o| seen.push(o)), 6);
        assert_eq!(seen, (0..6).collect::<Vec<u64>>());
        assert_eq!(ring.fetch, 3);
    }

    #[test]
    fn full_ring_is_consumed_once_and_refilled() {
        let mut ring = DirtyRing::heap(256);
        for i in 0..256u32 {
            ring.test_push(i, 0, u64::from(i));
        }
        assert_eq!(ring.consume(false, |_, _| {}), 256);
        ring.test_kernel_reset();
        // The kernel reuses the entries after the reset.
        for i in 256..300u32 {
            ring.test_push(i, 0, u64::from(i));
        }
        let mut seen = Vec::new();
        assert_eq!(ring.consume(false, |_, o| seen.push(o)), 44);
        assert_eq!(seen, (256..300).collect::<Vec<u64>>());
    }

    #[test]
    fn kernel_reset_index_is_tracked_and_phantoms_stop_at_real_entries() {
        let mut ring = DirtyRing::heap(256);
        for i in 0..3u32 {
            ring.test_push(i, 0, u64::from(i));
        }
        assert_eq!(ring.consume(false, |_, _| {}), 3);
        assert_eq!(ring.outstanding(), 3);
        ring.test_kernel_reset();
        ring.reset_done(true);
        assert_eq!(ring.kernel_reset_pos(), Some(3));
        // A reset that did not take exactly our marks: index unknown.
        ring.test_push(3, 0, 9);
        ring.consume(false, |_, _| {});
        ring.reset_done(false);
        assert_eq!(ring.kernel_reset_pos(), None);
        assert_eq!(ring.mark_phantoms(128), 0, "unknown index: nothing marked");
        // Probing: a dirty or consumed entry is not a candidate.
        assert!(!ring.mark_probe(3));
        ring.test_kernel_reset();
        assert!(ring.mark_probe(4));
        ring.probe_done(4, 0);
        assert_eq!(ring.flags(4).load(Ordering::Relaxed), 0, "withdrawn");
        assert!(ring.mark_probe(5));
        ring.probe_done(5, 1);
        assert_eq!(ring.kernel_reset_pos(), Some(6));
        // Phantoms: clean entries from the kernel's index up to the first
        // real (consumed) one, at most `max`.
        ring.test_push(10, 0, 1);
        ring.flags(10).store(GFN_F_RESET, Ordering::Release);
        assert_eq!(ring.mark_phantoms(128), 4); // 6, 7, 8, 9
                                                // SAFETY: test ring, entry in range.
        assert_eq!(unsafe { (*ring.entry(6)).slot }, u32::MAX);
        ring.phantoms_done(5);
        assert_eq!(ring.kernel_reset_pos(), Some(11));
        ring.test_kernel_reset();
        assert_eq!(ring.mark_phantoms(3), 3);
    }

    #[test]
    fn sizes_checked_against_offer() {
        let offer = RingOffer {
            acq_rel: true,
            max_bytes: 1 << 20,
        };
        assert_eq!(check_size(4096, offer).unwrap(), 4096);
        assert_eq!(check_size(1 << 20, offer).unwrap(), 1 << 20);
        assert!(matches!(
            check_size(3 << 12, offer),
            Err(DirtyRingError::BadSize { .. })
        ));
        assert!(check_size(2048, offer).is_err());
        assert!(check_size(2 << 20, offer).is_err());
    }
}
