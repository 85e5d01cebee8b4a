//! Guest RAM allocated and mapped before it is needed (`run --prefault`,
//! QEMU's `-mem-prealloc`, Cloud Hypervisor's `prefault=on`).
//!
//! Why: on these hosts the first write to a page the kernel has not
//! allocated yet is the destination's largest cost. Written whole with
//! `pwrite`, a fresh memfd page takes 3.6–3.9 GB/s and varies a lot from run
//! to run (the pages the kernel hands out may not be backed by the outer
//! hypervisor yet); a copy into pages already allocated and mapped takes
//! about 10 GB/s. A destination started with `--incoming --mem SIZE
//! --prefault` pays for the allocation (`MADV_POPULATE_WRITE`, about
//! 3.4 GB/s, on every core) before it listens, so the migration's own
//! time holds only the copies. The price is plain: all of guest RAM is
//! resident from the start, even pages the source never sends (an idle
//! guest's zero pages).

use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::memory::{map_memory, slot_layout, MemoryError};

/// Populated in pieces of this size, so the work splits across threads.
const CHUNK: usize = 64 << 20;

/// Guest RAM mapped and populated ahead of the VM that will own it
/// ([`super::VmConfig::ram`]).
pub struct PreparedRam {
    pub(super) memory: GuestMemoryMmap,
    pub(super) size: u64,
    took: Duration,
}

impl std::fmt::Debug for PreparedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedRam")
            .field("size", &self.size)
            .field("took", &self.took)
            .finish()
    }
}

impl PreparedRam {
    /// Map `mem_size` bytes of guest RAM (the layout [`super::Vm::new`]
    /// uses) and allocate every page now, on as many threads as the host
    /// has cores.
    pub fn prefaulted(mem_size: u64) -> Result<Self, MemoryError> {
        let memory = map_memory(&slot_layout(mem_size)?)?;
        let start = Instant::now();
        let mut pieces = Vec::new();
        for region in memory.iter() {
            let len = usize::try_from(region.len()).expect("mapped, so it fits");
            let base = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| MemoryError::OutOfRange { gpa: 0, len })?
                as usize;
            pieces.extend(
                (0..len)
                    .step_by(CHUNK)
                    .map(|off| (base + off, CHUNK.min(len - off))),
            );
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let &(addr, len) = pieces.get(i)?;
                        if let Err(e) = populate(addr, len) {
                            return Some(e);
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .find_map(|w| w.join().expect("populate thread panicked"))
        });
        if let Some(source) = failed {
            return Err(MemoryError::Prefault {
                size: mem_size,
                source,
            });
        }
        Ok(Self {
            memory,
            size: mem_size,
            took: start.elapsed(),
        })
    }

    /// Guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How long allocating every page took.
    pub fn took(&self) -> Duration {
        self.took
    }
}

/// Allocate and map the pages of `[addr, addr + len)` for writing.
fn populate(addr: usize, len: usize) -> std::io::Result<()> {
    loop {
        // SAFETY: `[addr, addr + len)` lies inside a shared mapping of
        // guest RAM that `PreparedRam::prefaulted` owns for the whole call;
        // MADV_POPULATE_WRITE only faults its pages in (allocating zeroed
        // ones where none exist), it never changes their contents.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EINVAL) => {
                return Err(std::io::Error::other(
                    "the kernel lacks MADV_POPULATE_WRITE (Linux 5.14 or later is needed)",
                ))
            }
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Every page is allocated up front, reads as zero, and takes writes.
    #[test]
    fn prefaulted_ram_is_allocated_zeroed_and_writable() {
        let size = (1 << 30) + (8 << 20);
        let ram = PreparedRam::prefaulted(size).unwrap();
        assert_eq!(ram.size(), size);
        assert_eq!(ram.memory.num_regions(), 2);
        assert_eq!(
            super::super::memory::allocated_bytes(&ram.memory),
            Some(size)
        );
        let mut page = [1u8; 4096];
        ram.memory
            .read_slice(&mut page, GuestAddress(size - 4096))
            .unwrap();
        assert!(page.iter().all(|&b| b == 0));
        ram.memory
            .write_slice(&[7; 4096], GuestAddress(1 << 30))
            .unwrap();
        ram.memory
            .read_slice(&mut page, GuestAddress(1 << 30))
            .unwrap();
        assert!(page.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_bad_size_is_refused_before_mapping() {
        assert!(matches!(
            PreparedRam::prefaulted(4096),
            Err(MemoryError::BadSize { .. })
        ));
    }
}
