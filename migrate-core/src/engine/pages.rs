//! Moving pages: the sender reads dirty pages from guest memory into batches
//! (zero pages become ranges without data), the receiver writes them back.

use std::io::Write;
use std::sync::Arc;

use std::os::unix::fs::FileExt;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::control::MigrationControl;
use super::written::WrittenPages;
use super::MigrationError;
use crate::dirty::DirtyBitmap;
use crate::wire::{
    write_message, CheckedBatch, Message, PageBatch, WireError, ZeroPages, ZeroRange,
    MAX_BATCH_PAGES, MAX_ZERO_RANGES, PAGE_SIZE,
};

/// Pages per `Pages` frame: 1 MiB of data, large enough that per-frame costs
/// vanish, small enough to keep zstd's working set in cache.
pub const BATCH_PAGES: usize = 256;
const _: () = assert!(BATCH_PAGES <= MAX_BATCH_PAGES);
/// Pages per `CheckedPages` frame: 128 KiB, so that the pages the kernel
/// has just copied into the socket are still in the L2 cache (2 MiB per
/// core here) when their CRCs are taken. Measured interleaved, 2 GiB into
/// a prefaulted destination (Gbit/s, 3–4 runs each): 8 pages 25–26, 16
/// pages 24–25, 32 pages 33–36, 64 pages 27–32, 256 pages 21–27; fewer
/// pages cost more system calls, more let the CRC miss the cache.
const DIRECT_BATCH_PAGES: usize = 32;

/// Counts of one `send` call.
#[derive(Debug, Default, Clone, Copy)]
pub struct SentCounts {
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages sent as zero ranges.
    pub zero_pages: u64,
    /// Bytes written, frame headers included.
    pub bytes: u64,
    /// Page bytes before compression.
    pub raw_bytes: u64,
    /// Of `zero_pages`, those sent without being read: never written since
    /// the VM was created.
    pub skipped_pages: u64,
}

/// Reads dirty pages and writes them as `Pages`/`ZeroPages` frames.
pub struct PageSender {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    data: Vec<u8>,
    gpas: Vec<u64>,
    /// Checked before each batch goes out, so a cancel does not wait for
    /// the end of a long iteration on a slow link; also told the bytes
    /// sent, so `query-migrate` moves during such an iteration.
    cancel: Option<Arc<MigrationControl>>,
    /// The further channels of a multi-channel migration (see
    /// [`super::channels`]); empty for one connection.
    pub(super) lanes: Vec<super::channels::Lane>,
    /// Raw pages go out straight from guest memory as `CheckedPages`
    /// ([`super::direct`]); else they are copied into `data` first.
    direct: bool,
}

fn wire_err(phase: &str) -> impl Fn(WireError) -> MigrationError + '_ {
    move |source| MigrationError::Wire {
        phase: phase.to_string(),
        source,
    }
}

impl PageSender {
    /// A sender; `zstd_level` turns on compression of page batches.
    pub fn new(zstd_level: Option<i32>) -> Result<Self, MigrationError> {
        let compressor = zstd_level
            .map(zstd::bulk::Compressor::new)
            .transpose()
            .map_err(|source| MigrationError::Wire {
                phase: "setting up zstd".into(),
                source: WireError::Compress { source },
            })?;
        Ok(Self {
            compressor,
            data: Vec::with_capacity(BATCH_PAGES * PAGE_SIZE),
            gpas: Vec::with_capacity(BATCH_PAGES),
            cancel: None,
            lanes: Vec::new(),
            direct: false,
        })
    }

    /// Send raw pages straight from guest memory (`yes`: the destination
    /// acked `FEATURE_PAGE_CHECKSUMS`); this sender's lanes alike. A
    /// compressing sender copies anyway (zstd needs the bytes to hold
    /// still) and ignores this.
    pub fn send_direct(&mut self, yes: bool) {
        self.direct = yes && self.compressor.is_none();
        for lane in &mut self.lanes {
            lane.sender.send_direct(yes);
        }
    }

    /// `guest-memory` or `copy`, for the report.
    pub fn page_path(&self) -> &'static str {
        if self.direct {
            "guest-memory"
        } else {
            "copy"
        }
    }

    /// Fail with [`MigrationError::Cancelled`] before the next batch once
    /// `control` is cancelled (`None`: never).
    pub fn cancel_with(&mut self, control: Option<Arc<MigrationControl>>) {
        self.cancel = control;
    }

    /// Send every page set in `dirty`, reading it from `memory` now. Pages
    /// outside `written` (when given) are known to be zero and go out as
    /// zero ranges without being read, which also keeps them unallocated.
    pub fn send<W: Write>(
        &mut self,
        w: &mut W,
        memory: &GuestMemoryMmap,
        iteration: u32,
        dirty: &DirtyBitmap,
        written: Option<&DirtyBitmap>,
        phase: &str,
    ) -> Result<SentCounts, MigrationError> {
        let mut counts = SentCounts::default();
        let mut zeros = ZeroPages::new(iteration);
        let mut to_read = dirty.clone();
        if let Some(written) = written {
            let mut never = dirty.clone();
            never.subtract(written);
            for (first, count) in never.runs() {
                zeros.ranges.push(ZeroRange {
                    gpa: first as u64 * PAGE_SIZE as u64,
                    pages: count as u64,
                });
                counts.zero_pages += count as u64;
                counts.skipped_pages += count as u64;
                if zeros.ranges.len() >= MAX_ZERO_RANGES {
                    counts.bytes += self.flush_zeros(w, &mut zeros, phase)?;
                }
            }
            to_read.intersect_with(written);
        }
        for page in to_read.iter_ones() {
            let gpa = page as u64 * PAGE_SIZE as u64;
            if self.direct {
                if is_zero(super::direct::guest_page(memory, gpa)?) {
                    zeros.push_page(gpa);
                    counts.zero_pages += 1;
                    if zeros.ranges.len() >= MAX_ZERO_RANGES {
                        counts.bytes += self.flush_zeros(w, &mut zeros, phase)?;
                    }
                } else {
                    self.gpas.push(gpa);
                    counts.data_pages += 1;
                    if self.gpas.len() == DIRECT_BATCH_PAGES {
                        counts.bytes += self.flush_direct(w, memory, iteration, phase)?;
                    }
                }
                continue;
            }
            let at = self.data.len();
            self.data.resize(at + PAGE_SIZE, 0);
            memory
                .read_slice(&mut self.data[at..], GuestAddress(gpa))
                .map_err(|e| MigrationError::InvalidData(format!("reading page {gpa:#x}: {e}")))?;
            if is_zero(&self.data[at..]) {
                self.data.truncate(at);
                zeros.push_page(gpa);
                counts.zero_pages += 1;
                if zeros.ranges.len() >= MAX_ZERO_RANGES {
                    counts.bytes += self.flush_zeros(w, &mut zeros, phase)?;
                }
                continue;
            }
            self.gpas.push(gpa);
            counts.data_pages += 1;
            if self.gpas.len() == BATCH_PAGES {
                counts.bytes += self.flush_batch(w, iteration, phase)?;
            }
        }
        counts.bytes += if self.direct {
            self.flush_direct(w, memory, iteration, phase)?
        } else {
            self.flush_batch(w, iteration, phase)?
        };
        counts.bytes += self.flush_zeros(w, &mut zeros, phase)?;
        counts.raw_bytes = counts.data_pages * PAGE_SIZE as u64;
        Ok(counts)
    }

    fn flush_batch<W: Write>(
        &mut self,
        w: &mut W,
        iteration: u32,
        phase: &str,
    ) -> Result<u64, MigrationError> {
        if self.gpas.is_empty() {
            return Ok(0);
        }
        if self.cancel.as_ref().is_some_and(|c| c.cancelled()) {
            return Err(MigrationError::Cancelled);
        }
        let data = std::mem::take(&mut self.data);
        let gpas = std::mem::take(&mut self.gpas);
        let mut batch = PageBatch::raw(iteration, gpas, data).map_err(wire_err(phase))?;
        if let Some(c) = &mut self.compressor {
            batch = batch.compress_with(c).map_err(wire_err(phase))?;
        }
        let msg = Message::Pages(batch);
        let n = write_message(w, &msg).map_err(wire_err(phase))?;
        if let Some(c) = &self.cancel {
            c.note_sent(n);
        }
        // Take the buffers back to reuse their capacity.
        if let Message::Pages(b) = msg {
            self.gpas = b.gpas;
            self.gpas.clear();
            if b.compression == crate::wire::Compression::None {
                self.data = b.data;
            }
            self.data.clear();
            self.data.reserve(BATCH_PAGES * PAGE_SIZE);
        }
        Ok(n)
    }

    /// Writes the gathered gpas as one `CheckedPages` frame from guest
    /// memory.
    fn flush_direct<W: Write>(
        &mut self,
        w: &mut W,
        memory: &GuestMemoryMmap,
        iteration: u32,
        phase: &str,
    ) -> Result<u64, MigrationError> {
        if self.gpas.is_empty() {
            return Ok(0);
        }
        if self.cancel.as_ref().is_some_and(|c| c.cancelled()) {
            return Err(MigrationError::Cancelled);
        }
        let runs = super::direct::runs(memory, &self.gpas)?;
        let n = crate::wire::write_checked_pages(w, iteration, &self.gpas, &runs)
            .map_err(wire_err(phase))?;
        if let Some(c) = &self.cancel {
            c.note_sent(n);
        }
        self.gpas.clear();
        Ok(n)
    }

    fn flush_zeros<W: Write>(
        &mut self,
        w: &mut W,
        zeros: &mut ZeroPages,
        phase: &str,
    ) -> Result<u64, MigrationError> {
        if zeros.ranges.is_empty() {
            return Ok(0);
        }
        let iteration = zeros.iteration;
        let msg = Message::ZeroPages(std::mem::replace(zeros, ZeroPages::new(iteration)));
        let n = write_message(w, &msg).map_err(wire_err(phase))?;
        if let Some(c) = &self.cancel {
            c.note_sent(n);
        }
        Ok(n)
    }
}

/// True when a page holds only zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")) == 0)
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
            self.page_index(r.gpa)?;
            let last = r
                .pages
                .checked_sub(1)
                .and_then(|n| n.checked_mul(PAGE_SIZE as u64))
                .and_then(|len| r.gpa.checked_add(len))
                .ok_or_else(|| {
                    MigrationError::InvalidData(format!("bad zero range at {:#x}", r.gpa))
                })?;
            self.page_index(last)?;
        }
        Ok(())
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
        for gpa in &batch.gpas {
            let page = usize::try_from(*gpa / PAGE_SIZE as u64).expect("checked above");
            self.written.set(page);
            self.written.mend(page, 1);
        }
        Ok(batch.gpas.len() as u64)
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
                for gpa in &batch.gpas[start..i] {
                    let page = usize::try_from(*gpa / PAGE_SIZE as u64).expect("checked above");
                    self.written.set(page);
                    self.written.mend(page, 1);
                }
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

    /// Apply zero ranges; returns their page count.
    pub fn apply_zeros(
        &mut self,
        memory: &GuestMemoryMmap,
        zeros: &ZeroPages,
    ) -> Result<u64, MigrationError> {
        let mut total = 0u64;
        for r in &zeros.ranges {
            let first = self.page_index(r.gpa)?;
            let last_gpa = r
                .pages
                .checked_sub(1)
                .and_then(|n| n.checked_mul(PAGE_SIZE as u64))
                .and_then(|len| r.gpa.checked_add(len))
                .ok_or_else(|| {
                    MigrationError::InvalidData(format!("bad zero range at {:#x}", r.gpa))
                })?;
            self.page_index(last_gpa)?;
            let count = usize::try_from(r.pages).expect("checked against guest size");
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
    let page = PAGE_SIZE as u64;
    let mut i = 0;
    while i < gpas.len() {
        let first = gpas[i];
        let region = memory
            .find_region(GuestAddress(first))
            .ok_or_else(|| failed(first, &"outside guest memory"))?;
        let region_end = region.start_addr().raw_value() + region.len();
        let mut n = 1;
        while i + n < gpas.len()
            && gpas[i + n] == first + n as u64 * page
            && gpas[i + n] + page <= region_end
        {
            n += 1;
        }
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
        i += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::memory::{map_memory, slot_layout};

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
