//! Writing received pages into guest memory: raw, zstd and checked
//! batches and zero ranges, with the record of written and torn pages.

use std::sync::Arc;

use std::os::unix::fs::FileExt;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, GuestMemoryRegion};

use super::written::WrittenPages;
use super::MigrationError;
use crate::wire::{
    CheckedBatch, PageBatch, PlacedBatch, WireError, ZeroPages, ZeroRange, PAGE_SIZE,
};

fn wire_err(phase: &str) -> impl Fn(WireError) -> MigrationError + '_ {
    move |source| MigrationError::Wire {
        phase: phase.to_string(),
        source,
    }
}

/// Writes received pages into guest memory.
pub struct PageApplier {
    /// Pages written so far (by every channel); a zero page for a page
    /// never written needs no write (fresh guest memory is zero), which
    /// keeps it unallocated.
    written: Arc<WrittenPages>,
    scratch: Vec<u8>,
    /// The data buffer of the last batch applied, for the next batch to be
    /// read into (see [`crate::wire::read_message_into`]).
    spare: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
    zero_page: Vec<u8>,
    /// Copy pages in through the mapping rather than `pwrite` them into
    /// the memfd: right when every page is allocated and mapped already
    /// (`--prefault`), where it is about twice as fast.
    via_mapping: bool,
}

impl PageApplier {
    /// An applier for a guest of `pages` pages.
    pub fn new(pages: usize) -> Result<Self, MigrationError> {
        Self::sharing(Arc::new(WrittenPages::new(pages)))
    }

    /// An applier that records into (and reads) `written`, shared with the
    /// appliers of the other channels.
    pub fn sharing(written: Arc<WrittenPages>) -> Result<Self, MigrationError> {
        Ok(Self {
            written,
            scratch: Vec::new(),
            spare: Vec::new(),
            decompressor: zstd::bulk::Decompressor::new().map_err(|e| {
                MigrationError::InvalidData(format!("cannot set up zstd decompression: {e}"))
            })?,
            zero_page: vec![0; PAGE_SIZE],
            via_mapping: false,
        })
    }

    /// Write through the mapping (`yes`, for prefaulted RAM) or with
    /// `pwrite` into the memfd (the default).
    pub fn via_mapping(mut self, yes: bool) -> Self {
        self.via_mapping = yes;
        self
    }

    fn page_index(&self, gpa: u64) -> Result<usize, MigrationError> {
        usize::try_from(gpa / PAGE_SIZE as u64)
            .ok()
            .filter(|&p| p < self.written.len())
            .ok_or_else(|| {
                MigrationError::InvalidData(format!("page {gpa:#x} is outside guest memory"))
            })
    }

    /// Check a batch without writing it (every gpa inside guest memory,
    /// the data decompressing to exactly its pages) and return it raw, to
    /// be applied later by [`PageApplier::apply_batch`] (a checkpoint epoch
    /// is staged whole before any of it is applied).
    pub fn stage_batch(&mut self, batch: PageBatch) -> Result<PageBatch, MigrationError> {
        for gpa in &batch.gpas {
            self.page_index(*gpa)?;
        }
        let mut raw = Vec::new();
        batch
            .decompress_into_with(&mut self.decompressor, &mut raw)
            .map_err(wire_err("decompressing pages"))?;
        PageBatch::raw(batch.iteration, batch.gpas, raw).map_err(wire_err("staging pages"))
    }

    /// Check zero ranges without applying them: each inside guest memory.
    pub fn check_zeros(&self, zeros: &ZeroPages) -> Result<(), MigrationError> {
        for r in &zeros.ranges {
            self.zero_range(r)?;
        }
        Ok(())
    }

    /// A zero range's first page index and page count, both ends inside
    /// guest memory.
    fn zero_range(&self, r: &ZeroRange) -> Result<(usize, usize), MigrationError> {
        let first = self.page_index(r.gpa)?;
        let last = r
            .pages
            .checked_sub(1)
            .and_then(|n| n.checked_mul(PAGE_SIZE as u64))
            .and_then(|len| r.gpa.checked_add(len))
            .ok_or_else(|| {
                MigrationError::InvalidData(format!("bad zero range at {:#x}", r.gpa))
            })?;
        self.page_index(last)?;
        Ok((
            first,
            usize::try_from(r.pages).expect("checked against guest size"),
        ))
    }

    /// Pages written so far (by every channel).
    pub fn written(&self) -> &Arc<WrittenPages> {
        &self.written
    }

    /// The buffer the next batch's data should be read into.
    pub fn spare_buffer(&mut self) -> &mut Vec<u8> {
        &mut self.spare
    }

    /// Keep an applied batch's data buffer for the next batch.
    pub fn recycle(&mut self, data: Vec<u8>) {
        if data.capacity() > self.spare.capacity() {
            self.spare = data;
        }
    }

    /// Write one batch; returns its page count. Raw pages are copied from
    /// the batch's own buffer straight into guest memory (the frame's
    /// checksum was verified when it was read); compressed ones go through
    /// `scratch`.
    pub fn apply_batch(
        &mut self,
        memory: &GuestMemoryMmap,
        batch: &PageBatch,
    ) -> Result<u64, MigrationError> {
        for gpa in &batch.gpas {
            self.page_index(*gpa)?;
        }
        let data: &[u8] = match batch.compression {
            crate::wire::Compression::None => {
                batch.validate().map_err(wire_err("checking pages"))?;
                &batch.data
            }
            crate::wire::Compression::Zstd => {
                batch
                    .decompress_into_with(&mut self.decompressor, &mut self.scratch)
                    .map_err(wire_err("decompressing pages"))?;
                &self.scratch
            }
        };
        write_pages(memory, &batch.gpas, data, self.via_mapping)?;
        self.note_written(&batch.gpas);
        Ok(batch.gpas.len() as u64)
    }

    /// Record `gpas` (checked to be inside guest memory) as written, and
    /// as no longer torn.
    fn note_written(&self, gpas: &[u64]) {
        for gpa in gpas {
            let page = usize::try_from(*gpa / PAGE_SIZE as u64).expect("checked by the caller");
            self.written.set(page);
            self.written.mend(page, 1);
        }
    }

    /// Write the pages of a `CheckedPages` batch that match their CRCs;
    /// the others are left out of guest memory and marked torn until a
    /// newer copy comes (`wire/checked.rs`). Returns (pages in the batch,
    /// pages torn).
    pub fn apply_checked(
        &mut self,
        memory: &GuestMemoryMmap,
        batch: &CheckedBatch,
    ) -> Result<(u64, u64), MigrationError> {
        for gpa in &batch.gpas {
            self.page_index(*gpa)?;
        }
        batch.validate().map_err(wire_err("checking pages"))?;
        let mut torn = 0u64;
        let mut start = 0;
        let n = batch.gpas.len();
        for i in 0..=n {
            if i < n && batch.page_intact(i) {
                continue;
            }
            // Pages start..i are intact: write them as runs.
            if start < i {
                let data = &batch.data[start * PAGE_SIZE..i * PAGE_SIZE];
                write_pages(memory, &batch.gpas[start..i], data, self.via_mapping)?;
                self.note_written(&batch.gpas[start..i]);
            }
            if i < n {
                let page = usize::try_from(batch.gpas[i] / PAGE_SIZE as u64).expect("checked");
                self.written.mark_torn(page);
                torn += 1;
            }
            start = i + 1;
        }
        Ok((n as u64, torn))
    }

    /// Whether pages may be received straight into guest memory
    /// (`engine/in_place.rs`): where RAM was allocated ahead.
    pub fn in_place(&self) -> bool {
        self.via_mapping
    }

    /// Check the pages of a batch received in place against their CRCs:
    /// each is now written (a later zero range must clear it), and one
    /// that fails is marked torn until a newer copy comes, as in
    /// [`PageApplier::apply_checked`]. Returns (pages in the batch, pages
    /// torn).
    pub fn apply_placed(
        &mut self,
        memory: &GuestMemoryMmap,
        batch: &PlacedBatch,
    ) -> Result<(u64, u64), MigrationError> {
        let mut torn = 0u64;
        let pages = super::direct::runs(memory, &batch.gpas)?;
        let pages = pages.iter().flat_map(|run| run.chunks_exact(PAGE_SIZE));
        for ((gpa, crc), bytes) in batch.gpas.iter().zip(&batch.crcs).zip(pages) {
            let page = self.page_index(*gpa)?;
            self.written.set(page);
            if crc32fast::hash(bytes) == *crc {
                self.written.mend(page, 1);
            } else {
                self.written.mark_torn(page);
                torn += 1;
            }
        }
        self.written.note_placed(batch.gpas.len() as u64);
        Ok((batch.gpas.len() as u64, torn))
    }

    /// Apply zero ranges; returns their page count.
    pub fn apply_zeros(
        &mut self,
        memory: &GuestMemoryMmap,
        zeros: &ZeroPages,
    ) -> Result<u64, MigrationError> {
        let mut total = 0u64;
        for r in &zeros.ranges {
            let (first, count) = self.zero_range(r)?;
            self.written.mend(first, count);
            // Only pages written here before need zeroing; the scan goes a
            // word at a time, so a huge untouched range costs next to nothing
            // (it is on the downtime path when the destination lags behind).
            for index in self.written.iter_ones_in(first, count) {
                let gpa = index as u64 * PAGE_SIZE as u64;
                memory
                    .write_slice(&self.zero_page, GuestAddress(gpa))
                    .map_err(|e| {
                        MigrationError::InvalidData(format!("zeroing page {gpa:#x}: {e}"))
                    })?;
            }
            total += r.pages;
        }
        Ok(total)
    }
}

/// Write whole pages (`data` holds one page per gpa, gpas inside guest
/// memory) into guest memory. Runs of consecutive gpas within one region
/// go into the region's memfd with one `pwrite` each: a page written whole
/// that way is not zeroed by the kernel first, which a copy through the
/// mapping into a never-touched page would cost (see `vm::memory`).
/// Regions without a file (anonymous memory), and every region when
/// `via_mapping` (RAM allocated ahead), are written through the mapping.
fn write_pages(
    memory: &GuestMemoryMmap,
    gpas: &[u64],
    data: &[u8],
    via_mapping: bool,
) -> Result<(), MigrationError> {
    let failed = |gpa: u64, e: &dyn std::fmt::Display| {
        MigrationError::InvalidData(format!("writing page {gpa:#x}: {e}"))
    };
    for (i, n, region) in super::direct::region_runs(memory, gpas)? {
        let first = gpas[i];
        let bytes = &data[i * PAGE_SIZE..(i + n) * PAGE_SIZE];
        match region.file_offset().filter(|_| !via_mapping) {
            Some(f) => {
                let at = f.start() + (first - region.start_addr().raw_value());
                f.file()
                    .write_all_at(bytes, at)
                    .map_err(|e| failed(first, &e))?;
            }
            None => memory
                .write_slice(bytes, GuestAddress(first))
                .map_err(|e| failed(first, &e))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::memory::{map_memory, slot_layout};
    use vm_memory::GuestMemoryBackend;

    /// Pages across a slot boundary, out of order and in runs arrive where
    /// they belong, through the memfd (by `pwrite` or the mapping) and
    /// through an anonymous mapping.
    #[test]
    fn whole_pages_land_in_their_slots_in_runs_and_singly() {
        const GIB: u64 = 1 << 30;
        let page = PAGE_SIZE as u64;
        let gpas = [
            GIB - 2 * page,
            GIB - page,
            GIB,
            GIB + page,
            5 * page,
            GIB - 2 * page,
        ];
        let data: Vec<u8> = (0..gpas.len())
            .flat_map(|i| vec![u8::try_from(i + 1).unwrap(); PAGE_SIZE])
            .collect();
        for (memory, via_mapping) in [false, true].into_iter().flat_map(|via| {
            let file_backed = map_memory(&slot_layout(GIB + 4 * page).unwrap()).unwrap();
            assert_eq!(file_backed.num_regions(), 2);
            let anonymous = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), usize::try_from(GIB).unwrap()),
                (GuestAddress(GIB), usize::try_from(4 * page).unwrap()),
            ])
            .unwrap();
            [(file_backed, via), (anonymous, via)]
        }) {
            let memory = &memory;
            write_pages(memory, &gpas, &data, via_mapping).unwrap();
            // The last write of a gpa wins (the duplicate at the end).
            for (gpa, want) in [
                (GIB - 2 * page, 6u8),
                (GIB - page, 2),
                (GIB, 3),
                (GIB + page, 4),
                (5 * page, 5),
            ] {
                let mut got = vec![0u8; PAGE_SIZE];
                memory.read_slice(&mut got, GuestAddress(gpa)).unwrap();
                assert!(got.iter().all(|&b| b == want), "page {gpa:#x}");
            }
            let mut untouched = vec![1u8; PAGE_SIZE];
            memory
                .read_slice(&mut untouched, GuestAddress(GIB + 2 * page))
                .unwrap();
            assert!(untouched.iter().all(|&b| b == 0));
        }
    }
}
