//! Raw pages sent straight from guest memory (`CheckedPages`,
//! `wire/checked.rs`): what the source hands its writer is guest memory
//! itself, with no batch buffer of its own in between. (The connection's
//! 1 MiB `BufWriter` gathers frames smaller than its free room, which is
//! then the one copy out of guest memory; larger frames go to `writev` as
//! they are. `engine/pages.rs` says why the frames are the small kind.)
//!
//! The guest keeps running while its pages are read here, so a page can
//! change between being copied out (into the `BufWriter`, or by the
//! kernel) and its CRC being taken right after (`wire::write_checked_pages`,
//! from the cache). Nothing here relies on the bytes staying put: they are
//! copied, or go into a CRC or a zero test, and the destination
//! checks every page against its CRC before the guest there can see it.
//! A page torn that way is dropped there and sent again, because the write
//! that tore it came after the dirty log was harvested.

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::MigrationError;
use crate::wire::PAGE_SIZE;

/// The host address of `pages` whole pages from `gpa` in `region`, if
/// all of them lie inside it.
pub(super) fn host_run(region: &GuestRegionMmap, gpa: u64, pages: usize) -> Option<*mut u8> {
    let offset = gpa.checked_sub(region.start_addr().raw_value())?;
    if offset + (pages * PAGE_SIZE) as u64 > region.len() {
        return None;
    }
    region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .ok()
}

/// `pages` whole pages of guest memory from `gpa`, all inside one region.
fn guest_bytes(memory: &GuestMemoryMmap, gpa: u64, pages: usize) -> Result<&[u8], MigrationError> {
    let len = pages * PAGE_SIZE;
    let bad = || MigrationError::InvalidData(format!("page {gpa:#x} is outside guest memory"));
    let region = memory.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
    let host = host_run(region, gpa, pages).ok_or_else(bad)?;
    // SAFETY: `host..host + len` lies inside one live mapping of `region`
    // (checked against its length above), and `memory`, which owns the
    // mapping, is borrowed for the slice's lifetime. The guest may write
    // these bytes at any time: every use of the slice (a copy,
    // a CRC, a zero test) tolerates torn contents, and the destination
    // re-checks each page against its CRC (module docs). This is the
    // contract VMMs sending live guest RAM rely on (vm-memory's
    // `as_slice`, QEMU's RAM save).
    Ok(unsafe { std::slice::from_raw_parts(host.cast_const(), len) })
}

/// One page of guest memory.
pub(super) fn guest_page(memory: &GuestMemoryMmap, gpa: u64) -> Result<&[u8], MigrationError> {
    guest_bytes(memory, gpa, 1)
}

/// Splits `gpas` into runs of consecutive pages inside one region:
/// (index of the run's first gpa, its page count, the region). Shared by
/// the sender (slices for `writev`) and the applier (one `pwrite` per run).
pub(super) fn region_runs<'m>(
    memory: &'m GuestMemoryMmap,
    gpas: &[u64],
) -> Result<Vec<(usize, usize, &'m GuestRegionMmap)>, MigrationError> {
    let page = PAGE_SIZE as u64;
    let mut runs = Vec::new();
    let mut i = 0;
    while i < gpas.len() {
        let first = gpas[i];
        let region = memory.find_region(GuestAddress(first)).ok_or_else(|| {
            MigrationError::InvalidData(format!("page {first:#x} is outside guest memory"))
        })?;
        let region_end = region.start_addr().raw_value() + region.len();
        let mut n = 1;
        while i + n < gpas.len()
            && gpas[i + n] == first + n as u64 * page
            && gpas[i + n] + page <= region_end
        {
            n += 1;
        }
        runs.push((i, n, region));
        i += n;
    }
    Ok(runs)
}

/// The runs of guest memory holding `gpas`: consecutive pages of one
/// region make one run, so a batch is a few slices for `writev`.
pub(super) fn runs<'m>(
    memory: &'m GuestMemoryMmap,
    gpas: &[u64],
) -> Result<Vec<&'m [u8]>, MigrationError> {
    region_runs(memory, gpas)?
        .into_iter()
        .map(|(i, n, _)| guest_bytes(memory, gpas[i], n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::memory::{map_memory, slot_layout};
    use vm_memory::Bytes;

    #[test]
    fn runs_split_at_gaps_and_slot_edges() {
        const GIB: u64 = 1 << 30;
        let page = PAGE_SIZE as u64;
        let memory = map_memory(&slot_layout(GIB + 4 * page).unwrap()).unwrap();
        for (i, gpa) in [5 * page, 6 * page, GIB - page, GIB, GIB + page]
            .into_iter()
            .enumerate()
        {
            memory
                .write_slice(
                    &[u8::try_from(i + 1).unwrap(); PAGE_SIZE],
                    GuestAddress(gpa),
                )
                .unwrap();
        }
        let gpas = [5 * page, 6 * page, 9 * page, GIB - page, GIB, GIB + page];
        let runs = super::runs(&memory, &gpas).unwrap();
        let lens: Vec<usize> = runs.iter().map(|r| r.len() / PAGE_SIZE).collect();
        assert_eq!(lens, [2, 1, 1, 2]);
        let pages: Vec<u8> = runs.concat().chunks(PAGE_SIZE).map(|p| p[0]).collect();
        assert_eq!(pages, [1, 2, 0, 3, 4, 5]);
        assert!(guest_page(&memory, GIB + 4 * page).is_err());
        assert!(guest_bytes(&memory, GIB - page, 2).is_err());
    }
}
