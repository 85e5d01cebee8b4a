//! Page batches (raw or zstd) and zero-page ranges.

use std::io::Read;

use super::codec::{invalid, len_u32, Decoder, Put};
use super::frame::PayloadReader;
use super::{MessageKind, WireError, MAX_BATCH_PAGES, MAX_ZERO_RANGES, PAGE_SIZE, PAGE_SIZE_U64};

/// Bytes of a `Pages` payload before the gpas: iteration, compression, count.
pub(super) const PAGES_FIXED_LEN: usize = 9;

const KIND: MessageKind = MessageKind::Pages;

/// How the data of a [`PageBatch`] is encoded (`u8` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Compression {
    /// Raw pages, `count × 4096` bytes in gpa order.
    None = 0,
    /// One zstd frame that decompresses to the raw pages.
    Zstd = 1,
}

impl Compression {
    /// Decodes a wire value; `None` for unknown values.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::None),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A batch of whole guest pages (`Pages` message), source → destination.
///
/// Page `i` of the (decompressed) data belongs at `gpas[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    /// Pre-copy iteration the pages belong to.
    pub iteration: u32,
    /// Encoding of [`PageBatch::data`].
    pub compression: Compression,
    /// Page-aligned guest-physical addresses, 1..=[`MAX_BATCH_PAGES`].
    pub gpas: Vec<u64>,
    /// Page contents, raw or one zstd frame.
    pub data: Vec<u8>,
}

impl PageBatch {
    /// A validated raw batch: `data` holds `gpas.len()` pages in order.
    pub fn raw(iteration: u32, gpas: Vec<u64>, data: Vec<u8>) -> Result<Self, WireError> {
        let batch = Self {
            iteration,
            compression: Compression::None,
            gpas,
            data,
        };
        batch.validate()?;
        Ok(batch)
    }

    /// Number of pages in the batch.
    pub fn page_count(&self) -> usize {
        self.gpas.len()
    }

    /// Size of the batch's pages once decompressed (`pages × 4096`).
    pub fn raw_len(&self) -> usize {
        self.gpas.len().saturating_mul(PAGE_SIZE)
    }

    /// Checks the `Pages` rules of the module docs (the zstd data is only
    /// inspected, not decompressed).
    pub fn validate(&self) -> Result<(), WireError> {
        validate_gpas(&self.gpas)?;
        let raw_len = self.raw_len();
        match self.compression {
            Compression::None if self.data.len() != raw_len => Err(invalid(
                KIND,
                "data",
                format!(
                    "{} bytes for {} raw pages (expected {raw_len})",
                    self.data.len(),
                    self.gpas.len()
                ),
            )),
            Compression::None => Ok(()),
            Compression::Zstd => validate_zstd(&self.data, raw_len),
        }
    }

    /// Compresses a raw batch with zstd at `level`. If the compressed data
    /// would not be strictly smaller than the raw pages the batch is
    /// returned unchanged (raw), as it is if already compressed.
    pub fn compress(self, level: i32) -> Result<Self, WireError> {
        if self.compression == Compression::Zstd {
            return Ok(self);
        }
        let mut c =
            zstd::bulk::Compressor::new(level).map_err(|source| WireError::Compress { source })?;
        self.compress_with(&mut c)
    }

    /// Like [`PageBatch::compress`], reusing a compressor (and its level).
    pub fn compress_with(
        self,
        compressor: &mut zstd::bulk::Compressor<'_>,
    ) -> Result<Self, WireError> {
        if self.compression == Compression::Zstd {
            return Ok(self);
        }
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(self.data.len()));
        compressor
            .compress_to_buffer(&self.data, &mut out)
            .map_err(|source| WireError::Compress { source })?;
        if out.len() >= self.data.len() {
            return Ok(self);
        }
        out.shrink_to_fit();
        Ok(Self {
            compression: Compression::Zstd,
            data: out,
            ..self
        })
    }

    /// Writes the raw pages to `out` (replacing its contents): a copy for a
    /// raw batch, a bounded decompression for a zstd one. On success `out`
    /// is exactly [`PageBatch::raw_len`] bytes long. zstd writes at most
    /// `max(out.capacity(), raw_len)` bytes whatever the frame claims, so a
    /// hostile frame cannot make this allocate; any other size is an error.
    pub fn decompress_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self.compression {
            Compression::None => {
                out.clear();
                out.extend_from_slice(&self.data);
                Ok(())
            }
            Compression::Zstd => {
                let mut d =
                    zstd::bulk::Decompressor::new().map_err(|source| WireError::Decompress {
                        expected: self.raw_len(),
                        source,
                    })?;
                self.decompress_into_with(&mut d, out)
            }
        }
    }

    /// Like [`PageBatch::decompress_into`], reusing a decompressor.
    pub fn decompress_into_with(
        &self,
        decompressor: &mut zstd::bulk::Decompressor<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let expected = self.raw_len();
        if self.compression == Compression::None {
            return self.decompress_into(out);
        }
        out.clear();
        // zstd writes at most `out.capacity()` bytes: the output is bounded
        // by memory already reserved, whatever the frame claims.
        out.reserve_exact(expected);
        let found = decompressor
            .decompress_to_buffer(&self.data, out)
            .map_err(|source| WireError::Decompress { expected, source })?;
        if found != expected || out.len() != expected {
            out.clear();
            return Err(WireError::DecompressedSize { expected, found });
        }
        Ok(())
    }

    /// Iterates `(gpa, page)` over the raw pages, decompressing into
    /// `scratch` first if the batch is compressed.
    pub fn pages<'a>(
        &'a self,
        scratch: &'a mut Vec<u8>,
    ) -> Result<impl Iterator<Item = (u64, &'a [u8])> + 'a, WireError> {
        let data: &'a [u8] = match self.compression {
            Compression::None => {
                self.validate()?;
                &self.data
            }
            Compression::Zstd => {
                self.decompress_into(scratch)?;
                scratch
            }
        };
        Ok(self.gpas.iter().copied().zip(data.chunks_exact(PAGE_SIZE)))
    }
}

pub(super) fn validate_gpas(gpas: &[u64]) -> Result<(), WireError> {
    validate_gpas_of(KIND, gpas)
}

/// The gpa rules of a page batch of `kind` (`Pages`, `CheckedPages`).
pub(super) fn validate_gpas_of(kind: MessageKind, gpas: &[u64]) -> Result<(), WireError> {
    if gpas.is_empty() || gpas.len() > MAX_BATCH_PAGES {
        return Err(invalid(
            kind,
            "gpas",
            format!("{} pages outside 1..={MAX_BATCH_PAGES}", gpas.len()),
        ));
    }
    if let Some(gpa) = gpas.iter().find(|&&gpa| gpa % PAGE_SIZE_U64 != 0) {
        return Err(invalid(
            kind,
            "gpas",
            format!("gpa {gpa:#x} is not page-aligned"),
        ));
    }
    Ok(())
}

fn validate_zstd(data: &[u8], raw_len: usize) -> Result<(), WireError> {
    if data.len() >= raw_len {
        return Err(invalid(
            KIND,
            "data",
            format!(
                "{} zstd bytes do not shrink {raw_len} raw bytes; send raw",
                data.len()
            ),
        ));
    }
    match zstd::zstd_safe::find_frame_compressed_size(data) {
        Ok(n) if n == data.len() => {}
        Ok(n) => {
            return Err(invalid(
                KIND,
                "data",
                format!("zstd frame is {n} bytes, data is {}", data.len()),
            ));
        }
        Err(_) => return Err(invalid(KIND, "data", "not a zstd frame")),
    }
    match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(size)) if size != raw_len as u64 => Err(invalid(
            KIND,
            "data",
            format!("zstd frame declares {size} bytes, expected {raw_len}"),
        )),
        Ok(_) => Ok(()),
        Err(_) => Err(invalid(KIND, "data", "unreadable zstd frame header")),
    }
}

/// Appends iteration, compression, count and gpas.
pub(super) fn encode_batch_prefix(
    iteration: u32,
    compression: Compression,
    gpas: &[u64],
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    out.reserve(PAGES_FIXED_LEN + 8 * gpas.len());
    out.put_u32(iteration);
    out.put_u8(compression as u8);
    out.put_u32(len_u32(KIND, "gpas", gpas.len(), MAX_BATCH_PAGES)?);
    for &gpa in gpas {
        out.put_u64(gpa);
    }
    Ok(())
}

fn build_batch(
    iteration: u32,
    compression: u8,
    gpas: &[u8],
    data: Vec<u8>,
) -> Result<PageBatch, WireError> {
    let compression = Compression::from_u8(compression).ok_or_else(|| {
        invalid(
            KIND,
            "compression",
            format!("unknown compression {compression}"),
        )
    })?;
    let gpas = gpas
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let batch = PageBatch {
        iteration,
        compression,
        gpas,
        data,
    };
    batch.validate()?;
    Ok(batch)
}

/// Decodes a `Pages` payload held in memory.
pub(super) fn decode_batch(d: &mut Decoder<'_>) -> Result<PageBatch, WireError> {
    let (iteration, compression, count) = parse_fixed(d, 0)?;
    let gpas = d.take(count * 8, "gpas")?;
    let data = d.take(d.remaining(), "data")?.to_vec();
    build_batch(iteration, compression, gpas, data)
}

/// Reads a `Pages` payload straight from the stream, so the page data lands
/// in its final buffer (`buffer`, reused) without an extra copy.
pub(super) fn read_batch<R: Read>(
    pr: &mut PayloadReader<'_, R>,
    buffer: Vec<u8>,
) -> Result<PageBatch, WireError> {
    let mut prefix = [0u8; PAGES_FIXED_LEN + 8 * MAX_BATCH_PAGES];
    let fixed_len = PAGES_FIXED_LEN.min(pr.remaining());
    pr.read_exact(&mut prefix[..fixed_len])?;
    let mut d = Decoder::new(KIND, &prefix[..fixed_len]);
    let (iteration, compression, count) = match parse_fixed(&mut d, pr.remaining()) {
        Ok(v) => v,
        Err(e) => return Err(pr.abandon(e)),
    };
    let gpa_end = PAGES_FIXED_LEN + 8 * count;
    pr.read_exact(&mut prefix[PAGES_FIXED_LEN..gpa_end])?;
    let data = pr.read_into(pr.remaining(), buffer)?;
    pr.finish()?;
    build_batch(
        iteration,
        compression,
        &prefix[PAGES_FIXED_LEN..gpa_end],
        data,
    )
}

/// Parses iteration, compression and gpa count; the count must fit in what
/// is left in the decoder plus `more` bytes still in the stream.
fn parse_fixed(d: &mut Decoder<'_>, more: usize) -> Result<(u32, u8, usize), WireError> {
    let iteration = d.u32("iteration")?;
    let compression = d.u8("compression")?;
    let raw = d.u32("gpas")?;
    let count = usize::try_from(raw).unwrap_or(usize::MAX);
    let room = d.remaining().saturating_add(more);
    if count > MAX_BATCH_PAGES || count.saturating_mul(8) > room {
        return Err(invalid(
            KIND,
            "gpas",
            format!("count {raw} exceeds {MAX_BATCH_PAGES} or the {room} payload bytes left"),
        ));
    }
    Ok((iteration, compression, count))
}

/// A run of all-zero guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ZeroRange {
    /// First page (page-aligned guest-physical address).
    pub gpa: u64,
    /// Number of pages (≥ 1).
    pub pages: u64,
}

/// Runs of all-zero pages (`ZeroPages` message), source → destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroPages {
    /// Pre-copy iteration the pages belong to.
    pub iteration: u32,
    /// The runs (≤ [`MAX_ZERO_RANGES`]; may be empty).
    pub ranges: Vec<ZeroRange>,
}

impl ZeroPages {
    /// An empty message for `iteration`.
    pub fn new(iteration: u32) -> Self {
        Self {
            iteration,
            ranges: Vec::new(),
        }
    }

    /// Adds one zero page, extending the last range when `gpa` directly
    /// follows it. Does not check alignment or the range count.
    pub fn push_page(&mut self, gpa: u64) {
        if let Some(last) = self.ranges.last_mut() {
            if last
                .pages
                .checked_mul(PAGE_SIZE_U64)
                .and_then(|len| last.gpa.checked_add(len))
                == Some(gpa)
            {
                last.pages += 1;
                return;
            }
        }
        self.ranges.push(ZeroRange { gpa, pages: 1 });
    }

    /// Total pages over all ranges (saturating).
    pub fn page_count(&self) -> u64 {
        self.ranges
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.pages))
    }

    /// Checks the `ZeroPages` rules of the module docs.
    pub fn validate(&self) -> Result<(), WireError> {
        let kind = MessageKind::ZeroPages;
        if self.ranges.len() > MAX_ZERO_RANGES {
            return Err(invalid(
                kind,
                "ranges",
                format!("{} ranges exceeds {MAX_ZERO_RANGES}", self.ranges.len()),
            ));
        }
        for r in &self.ranges {
            if r.gpa % PAGE_SIZE_U64 != 0 {
                return Err(invalid(
                    kind,
                    "ranges",
                    format!("gpa {:#x} is not page-aligned", r.gpa),
                ));
            }
            if r.pages == 0 {
                return Err(invalid(
                    kind,
                    "ranges",
                    format!("empty range at {:#x}", r.gpa),
                ));
            }
            if r.pages
                .checked_mul(PAGE_SIZE_U64)
                .and_then(|len| r.gpa.checked_add(len))
                .is_none()
            {
                return Err(invalid(
                    kind,
                    "ranges",
                    format!("range {:#x} + {} pages overflows", r.gpa, r.pages),
                ));
            }
        }
        Ok(())
    }
}

pub(super) fn encode_zero_pages(z: &ZeroPages, out: &mut Vec<u8>) -> Result<(), WireError> {
    out.reserve(8 + 16 * z.ranges.len());
    out.put_u32(z.iteration);
    out.put_u32(len_u32(
        MessageKind::ZeroPages,
        "ranges",
        z.ranges.len(),
        MAX_ZERO_RANGES,
    )?);
    for r in &z.ranges {
        out.put_u64(r.gpa);
        out.put_u64(r.pages);
    }
    Ok(())
}

pub(super) fn decode_zero_pages(d: &mut Decoder<'_>) -> Result<ZeroPages, WireError> {
    let iteration = d.u32("iteration")?;
    let count = d.count("ranges", MAX_ZERO_RANGES, 16)?;
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        ranges.push(ZeroRange {
            gpa: d.u64("ranges")?,
            pages: d.u64("ranges")?,
        });
    }
    Ok(ZeroPages { iteration, ranges })
}
