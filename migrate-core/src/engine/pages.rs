//! Sending pages: the sender reads dirty pages from guest memory (straight
//! from it, or into batches), zero pages become ranges without data. The
//! receiving side is `apply.rs`.

use std::io::Write;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::control::MigrationControl;
use super::unchanged::SentDigests;
use super::MigrationError;
use crate::dirty::DirtyBitmap;
use crate::wire::{
    write_message, Message, PageBatch, WireError, ZeroPages, ZeroRange, MAX_BATCH_PAGES,
    MAX_ZERO_RANGES, PAGE_SIZE,
};

/// Pages per `Pages` frame: 1 MiB of data, large enough that per-frame costs
/// vanish, small enough to keep zstd's working set in cache.
pub const BATCH_PAGES: usize = 256;
const _: () = assert!(BATCH_PAGES <= MAX_BATCH_PAGES);
/// Pages per `CheckedPages` frame: 128 KiB. Frames this small fit the
/// connection's 1 MiB `BufWriter`, which gathers them (one copy out of
/// guest memory) and writes 1 MiB at a time, and the pages are still in
/// the L2 cache (2 MiB per core here) when their CRCs are taken. A 256-page
/// frame is larger than the buffer and goes to `writev` straight from
/// guest memory, no copy in user space at all, and was slower. Measured
/// interleaved, 2 GiB into a prefaulted destination (Gbit/s, 3–4 runs
/// each): 8 pages 25–26, 16 pages 24–25, 32 pages 33–36, 64 pages 27–32,
/// 256 pages 21–27.
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
    /// Dirty pages not sent: their content was the copy the destination
    /// holds ([`super::unchanged`]).
    pub unchanged_pages: u64,
}

impl SentCounts {
    /// Add another channel's counts to these.
    pub fn add(&mut self, other: &SentCounts) {
        self.data_pages += other.data_pages;
        self.zero_pages += other.zero_pages;
        self.bytes += other.bytes;
        self.raw_bytes += other.raw_bytes;
        self.skipped_pages += other.skipped_pages;
        self.unchanged_pages += other.unchanged_pages;
    }
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
    /// Skip dirty pages whose copy matches the one last sent (shared with
    /// the lanes); forces the copy path.
    unchanged: Option<Arc<SentDigests>>,
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
            unchanged: None,
        })
    }

    /// Send raw pages straight from guest memory (`yes`: the destination
    /// acked `FEATURE_PAGE_CHECKSUMS`); this sender's lanes alike. A
    /// compressing sender copies anyway (zstd needs the bytes to hold
    /// still) and ignores this.
    pub fn send_direct(&mut self, yes: bool) {
        self.direct = yes && self.compressor.is_none() && self.unchanged.is_none();
        for lane in &mut self.lanes {
            lane.sender.send_direct(yes);
        }
    }

    /// Leave out dirty pages whose content is the copy last sent
    /// ([`super::unchanged`]), on this sender and its lanes alike. The
    /// pages then take the copy path: the digest must be of the bytes sent.
    pub fn skip_unchanged(&mut self, digests: Arc<SentDigests>) {
        self.direct = false;
        for lane in &mut self.lanes {
            lane.sender.skip_unchanged(digests.clone());
        }
        self.unchanged = Some(digests);
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.as_ref().is_some_and(|c| c.cancelled()) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    fn note_sent(&self, bytes: u64) {
        if let Some(c) = &self.cancel {
            c.note_sent(bytes);
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
                if let Some(d) = &self.unchanged {
                    d.forget(first, count);
                }
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
            // A plain `memcpy` (vm-memory's `read_slice` copies in
            // volatile words, into a slot zero-filled first); the guest may
            // be writing the page, which `direct::guest_page` allows for.
            self.data
                .extend_from_slice(super::direct::guest_page(memory, gpa)?);
            if is_zero(&self.data[at..]) {
                self.data.truncate(at);
                if let Some(d) = &self.unchanged {
                    d.forget(page, 1);
                }
                zeros.push_page(gpa);
                counts.zero_pages += 1;
                if zeros.ranges.len() >= MAX_ZERO_RANGES {
                    counts.bytes += self.flush_zeros(w, &mut zeros, phase)?;
                }
                continue;
            }
            if let Some(d) = &self.unchanged {
                if d.unchanged_or_record(page, &self.data[at..]) {
                    self.data.truncate(at);
                    counts.unchanged_pages += 1;
                    continue;
                }
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
        self.check_cancel()?;
        let data = std::mem::take(&mut self.data);
        let gpas = std::mem::take(&mut self.gpas);
        let mut batch = PageBatch::raw(iteration, gpas, data).map_err(wire_err(phase))?;
        if let Some(c) = &mut self.compressor {
            batch = batch.compress_with(c).map_err(wire_err(phase))?;
        }
        let msg = Message::Pages(batch);
        let n = write_message(w, &msg).map_err(wire_err(phase))?;
        self.note_sent(n);
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
        self.check_cancel()?;
        let runs = super::direct::runs(memory, &self.gpas)?;
        let n = crate::wire::write_checked_pages(w, iteration, &self.gpas, &runs)
            .map_err(wire_err(phase))?;
        self.note_sent(n);
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
        self.note_sent(n);
        Ok(n)
    }
}

/// True when a page holds only zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")) == 0)
}
