//! Guest RAM: a `vm-memory` mapping split into KVM memory slots with dirty
//! logging enabled on every slot.
//!
//! RAM is contiguous from guest-physical 0 (no PCI hole: the guests we run
//! have no devices behind one). It is registered with KVM in slots of at most
//! [`MAX_SLOT_SIZE`], so each slot's dirty bitmap stays small enough to harvest
//! in one ioctl and later work can harvest slots in parallel.
//!
//! RAM is one memfd mapped shared (as QEMU's `memory-backend-memfd`), not
//! anonymous memory, for the destination's sake: a page written whole
//! into the memfd with `pwrite` is never zeroed first (shmem marks a fully
//! written page up to date), while the first touch of an anonymous page
//! zeroes it before the copy. That zeroing was 85% of a receiving
//! destination's time (bench-data/README.md, "transfer"). The guest and
//! KVM see the same pages through the mapping.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::PAGE_SIZE;

/// Largest KVM memory slot we create.
pub const MAX_SLOT_SIZE: u64 = 1 << 30;
/// Smallest guest: the workloads keep page tables below 1 MiB and touch
/// memory from 1 MiB on.
pub const MIN_MEM_SIZE: u64 = 2 << 20;
/// Largest guest we accept. RAM is mapped with `MAP_NORESERVE`, so the limit
/// is the guest-physical address space we are willing to describe, not the
/// host's free memory.
pub const MAX_MEM_SIZE: u64 = 1 << 40;

/// Errors from creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is not usable.
    #[error("guest memory size {size:#x} is invalid: {reason}")]
    BadSize {
        /// Requested size in bytes.
        size: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The host could not map the memory.
    #[error("cannot map {size:#x} bytes of guest memory")]
    Map {
        /// Requested size in bytes.
        size: u64,
        /// The mapping error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The memfd behind guest memory could not be created or sized.
    #[error("cannot create the {size:#x}-byte memfd behind guest memory")]
    Memfd {
        /// Requested size in bytes.
        size: u64,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not be allocated ahead of use (`--prefault`).
    #[error("cannot allocate the {size:#x} bytes of guest memory ahead of use")]
    Prefault {
        /// Requested size in bytes.
        size: u64,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} at {gpa:#x} ({size:#x} bytes)")]
    RegisterSlot {
        /// Slot number.
        slot: u32,
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An access fell outside guest memory.
    #[error("guest memory access at {gpa:#x} ({len} bytes) is out of range")]
    OutOfRange {
        /// Guest-physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },
}

/// One KVM memory slot: a contiguous piece of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// KVM slot number.
    pub index: u32,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes (a multiple of the page size).
    pub size: u64,
}

impl Slot {
    /// Number of pages in the slot.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Split `mem_size` bytes starting at 0 into the slot layout we register.
pub fn slot_layout(mem_size: u64) -> Result<Vec<Slot>, MemoryError> {
    let bad = |reason| {
        Err(MemoryError::BadSize {
            size: mem_size,
            reason,
        })
    };
    if mem_size < MIN_MEM_SIZE {
        return bad("smaller than the 2 MiB minimum");
    }
    if mem_size > MAX_MEM_SIZE {
        return bad("larger than the 1 TiB maximum");
    }
    if !mem_size.is_multiple_of(PAGE_SIZE) {
        return bad("not a multiple of the 4 KiB page size");
    }
    let mut slots = Vec::new();
    let mut gpa = 0;
    while gpa < mem_size {
        let size = (mem_size - gpa).min(MAX_SLOT_SIZE);
        let index = u32::try_from(slots.len()).expect("at most 1024 slots");
        slots.push(Slot { index, gpa, size });
        gpa += size;
    }
    Ok(slots)
}

/// Map guest memory for `slots`: one memfd of their total size, each slot
/// a shared mapping (`MAP_NORESERVE`) of its range of the file, so pages
/// are allocated only when first written.
pub fn map_memory(slots: &[Slot]) -> Result<GuestMemoryMmap, MemoryError> {
    let size: u64 = slots.iter().map(|s| s.size).sum();
    let memfd_err = |source| MemoryError::Memfd { size, source };
    let file = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create("vmigrate-guest-ram")
        .map_err(|e| {
            memfd_err(match e {
                memfd::Error::Create(e) => e,
                other => std::io::Error::other(other.to_string()),
            })
        })?
        .into_file();
    file.set_len(size).map_err(memfd_err)?;
    let file = std::sync::Arc::new(file);
    let ranges: Result<Vec<_>, _> = slots
        .iter()
        .map(|s| {
            usize::try_from(s.size).map(|len| {
                (
                    GuestAddress(s.gpa),
                    len,
                    Some(FileOffset::from_arc(file.clone(), s.gpa)),
                )
            })
        })
        .collect();
    let ranges = ranges.map_err(|_| MemoryError::BadSize {
        size,
        reason: "does not fit the host address space",
    })?;
    GuestMemoryMmap::from_ranges_with_files(&ranges)
        .map_err(|source| MemoryError::Map { size, source })
}

/// Bytes of guest RAM allocated in the memfd behind `memory` (pages ever
/// written, by the guest or by `pwrite`); `None` for anonymous memory.
pub fn allocated_bytes(memory: &GuestMemoryMmap) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let region = memory.iter().next()?;
    let meta = region.file_offset()?.file().metadata().ok()?;
    Some(meta.blocks() * 512)
}

/// Register every region of `memory` with KVM as a slot with dirty logging on.
pub fn register_slots(
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    slots: &[Slot],
) -> Result<(), MemoryError> {
    for (slot, region) in slots.iter().zip(memory.iter()) {
        debug_assert_eq!(region.start_addr().raw_value(), slot.gpa);
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::OutOfRange {
                gpa: slot.gpa,
                len: 0,
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot.index,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points at the start of a live mapping of exactly
        // `slot.size` bytes owned by `memory`, which the caller keeps alive
        // (in `Vm`) for as long as the VM fd that references it.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::RegisterSlot {
            slot: slot.index,
            gpa: slot.gpa,
            size: slot.size,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_into_gib_slots() {
        let slots = slot_layout(2 * MAX_SLOT_SIZE + (4 << 20)).unwrap();
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[2].gpa, 2 * MAX_SLOT_SIZE);
        assert_eq!(slots[2].size, 4 << 20);
        assert_eq!(slots.iter().map(Slot::pages).sum::<u64>(), (2 << 18) + 1024);
    }

    #[test]
    fn layout_refuses_bad_sizes() {
        for size in [0, 4096, MIN_MEM_SIZE + 1, MAX_MEM_SIZE + PAGE_SIZE] {
            assert!(
                matches!(slot_layout(size), Err(MemoryError::BadSize { .. })),
                "{size:#x}"
            );
        }
    }
}
