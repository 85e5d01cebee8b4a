//! Frame header, checksums, and reading/writing whole messages.

use std::io::{self, IoSlice, Read, Write};

use super::checked::{self, PagePlacement, Received};
use super::codec::invalid;
use super::message::{decode_payload, encode_payload};
use super::pages::{self, Compression};
use super::{Limits, Message, MessageKind, WireError, HEADER_LEN, PAGE_SIZE};

/// A decoded, validated frame header (`flags` is always zero and
/// `header_crc` is computed, so neither is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message kind.
    pub kind: MessageKind,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

impl FrameHeader {
    /// The 16 header bytes, `header_crc` included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&self.kind.as_u16().to_le_bytes());
        // out[2..4]: flags, reserved, zero.
        out[4..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..12].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[..12]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Validates 16 received header bytes in protocol order: header
    /// checksum, kind, flags, then `len` against `limits`.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: &Limits) -> Result<Self, WireError> {
        let field = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let expected = field(12);
        let found = crc32fast::hash(&bytes[..12]);
        if expected != found {
            return Err(WireError::HeaderChecksum { expected, found });
        }
        let kind = MessageKind::try_from(u16::from_le_bytes([bytes[0], bytes[1]]))?;
        let flags = u16::from_le_bytes([bytes[2], bytes[3]]);
        if flags != 0 {
            return Err(WireError::NonZeroFlags { kind, flags });
        }
        let len = field(4);
        let max = limits.cap(kind);
        if len > max {
            return Err(WireError::PayloadTooLarge {
                kind,
                len: u64::from(len),
                max: u64::from(max),
            });
        }
        Ok(Self {
            kind,
            len,
            payload_crc: field(8),
        })
    }
}

/// Reads into `buf` until it is full or the stream ends; returns the bytes
/// read. Retries on `Interrupted`.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads one payload from the stream, checksumming as it goes.
pub(super) struct PayloadReader<'r, R> {
    r: &'r mut R,
    header: FrameHeader,
    remaining: usize,
    hasher: crc32fast::Hasher,
}

impl<'r, R: Read> PayloadReader<'r, R> {
    fn new(r: &'r mut R, header: FrameHeader) -> Self {
        Self {
            r,
            header,
            remaining: usize::try_from(header.len).unwrap_or(usize::MAX),
            hasher: crc32fast::Hasher::new(),
        }
    }

    /// Payload bytes not yet read.
    pub(super) fn remaining(&self) -> usize {
        self.remaining
    }

    fn truncated(&self) -> WireError {
        let expected = u64::from(self.header.len);
        WireError::Truncated {
            kind: Some(self.header.kind),
            expected,
            received: expected - self.remaining as u64,
        }
    }

    /// Fills `buf` (at most [`PayloadReader::remaining`] bytes).
    pub(super) fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        debug_assert!(buf.len() <= self.remaining);
        let n = read_full(self.r, buf)?;
        self.hasher.update(&buf[..n]);
        self.remaining -= n;
        if n < buf.len() {
            return Err(self.truncated());
        }
        Ok(())
    }

    /// Reads the next `n` bytes (at most [`PayloadReader::remaining`]) into
    /// a new vector without zero-filling it first.
    pub(super) fn read_vec(&mut self, n: usize) -> Result<Vec<u8>, WireError> {
        debug_assert!(n <= self.remaining);
        let mut out = Vec::with_capacity(n);
        let got = self.r.by_ref().take(n as u64).read_to_end(&mut out);
        self.hasher.update(&out);
        self.remaining -= out.len();
        got?;
        if out.len() < n {
            return Err(self.truncated());
        }
        Ok(out)
    }

    /// Reads the next `n` bytes into `buffer`, reusing its allocation: a
    /// buffer that already held `n` bytes is neither reallocated nor
    /// zero-filled, so page batches of the usual size cost one read each.
    pub(super) fn read_into(
        &mut self,
        n: usize,
        mut buffer: Vec<u8>,
    ) -> Result<Vec<u8>, WireError> {
        debug_assert!(n <= self.remaining);
        if buffer.len() >= n {
            buffer.truncate(n);
        } else if buffer.capacity() >= n {
            buffer.resize(n, 0);
        } else {
            // Too small to reuse: read without zero-filling.
            return self.read_vec(n);
        }
        self.read_exact(&mut buffer)?;
        Ok(buffer)
    }

    /// Checks the payload checksum against what was read so far: for a
    /// kind whose frame CRC covers only the start of the payload
    /// (`CheckedPages`); the rest is then read with
    /// [`PayloadReader::read_into_unhashed`].
    pub(super) fn check_prefix(&mut self) -> Result<(), WireError> {
        let found = self.hasher.clone().finalize();
        if found != self.header.payload_crc {
            let err = WireError::PayloadChecksum {
                kind: self.header.kind,
                expected: self.header.payload_crc,
                found,
            };
            // Drain unhashed so the error stays a checksum error.
            let mut scratch = [0u8; 8192];
            while self.remaining > 0 {
                let n = self.remaining.min(scratch.len());
                let got = read_full(self.r, &mut scratch[..n])?;
                self.remaining -= got;
                if got < n {
                    return Err(self.truncated());
                }
            }
            return Err(err);
        }
        Ok(())
    }

    /// Fills `buf` without adding it to the frame checksum (after
    /// [`PayloadReader::check_prefix`]).
    pub(super) fn read_exact_unhashed(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        debug_assert!(buf.len() <= self.remaining);
        let n = read_full(self.r, buf)?;
        self.remaining -= n;
        if n < buf.len() {
            return Err(self.truncated());
        }
        Ok(())
    }

    /// Like [`PayloadReader::read_into`], leaving the bytes out of the
    /// frame checksum (after [`PayloadReader::check_prefix`]).
    pub(super) fn read_into_unhashed(
        &mut self,
        n: usize,
        mut buffer: Vec<u8>,
    ) -> Result<Vec<u8>, WireError> {
        debug_assert!(n <= self.remaining);
        if buffer.capacity() < n {
            buffer = Vec::with_capacity(n);
        }
        // Reusing the allocation: a buffer that held `n` bytes before is
        // neither reallocated nor zero-filled.
        buffer.resize(n, 0);
        let got = read_full(self.r, &mut buffer)?;
        self.remaining -= got;
        if got < n {
            return Err(self.truncated());
        }
        Ok(buffer)
    }

    /// Lets `placement` receive the next `len` bytes (the pages of
    /// `gpas`) straight from the stream, unhashed (after
    /// [`PayloadReader::check_prefix`]); false if it read nothing.
    pub(super) fn place_unhashed(
        &mut self,
        len: usize,
        gpas: &[u64],
        placement: &mut dyn PagePlacement<R>,
    ) -> Result<bool, WireError> {
        debug_assert!(len <= self.remaining);
        match placement.receive(gpas, self.r) {
            Ok(true) => {
                self.remaining -= len;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.truncated()),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks the payload checksum once everything was read.
    pub(super) fn finish(&mut self) -> Result<(), WireError> {
        debug_assert_eq!(self.remaining, 0);
        let found = self.hasher.clone().finalize();
        if found != self.header.payload_crc {
            return Err(WireError::PayloadChecksum {
                kind: self.header.kind,
                expected: self.header.payload_crc,
                found,
            });
        }
        Ok(())
    }

    /// Turns a structural error found mid-payload into the error to report:
    /// drains the rest of the payload (without allocating) and reports a
    /// stream or checksum failure in preference to `err`.
    pub(super) fn abandon(&mut self, err: WireError) -> WireError {
        let mut scratch = [0u8; 8192];
        while self.remaining > 0 {
            let n = self.remaining.min(scratch.len());
            if let Err(e) = self.read_exact(&mut scratch[..n]) {
                return e;
            }
        }
        match self.finish() {
            Ok(()) => err,
            Err(e) => e,
        }
    }
}

/// Reads one frame and decodes its message.
///
/// Validation follows the order in the [module docs](super); the payload
/// buffer is allocated only after `len` passed [`Limits::cap`]. A clean end
/// of stream before the first header byte gives
/// [`WireError::ConnectionClosed`]; one inside a frame gives
/// [`WireError::Truncated`]. Zstd page batches are checked but not
/// decompressed (see [`PageBatch::decompress_into`](super::PageBatch::decompress_into)).
///
/// # Errors
///
/// Any [`WireError`] refusal of the frame, [`WireError::ConnectionClosed`],
/// [`WireError::Truncated`], or [`WireError::Io`] from the reader. After an
/// error the stream position is unspecified: drop the connection.
pub fn read_message<R: Read>(r: &mut R, limits: &Limits) -> Result<Message, WireError> {
    read_message_into(r, limits, &mut Vec::new())
}

/// Like [`read_message`], but the data of a `Pages` batch lands in `spare`
/// (taken from it, its allocation reused) instead of a new vector. A
/// receiver hands each applied batch's buffer back
/// ([`PageBatch::data`](super::PageBatch)), so the page path allocates
/// nothing per batch: a fresh 1 MiB allocation per batch was a page fault
/// per 4 KiB of it.
///
/// # Errors
///
/// As [`read_message`].
pub fn read_message_into<R: Read>(
    r: &mut R,
    limits: &Limits,
    spare: &mut Vec<u8>,
) -> Result<Message, WireError> {
    match read_frame(r, limits, spare, None)? {
        Received::Message(m) => Ok(m),
        Received::Placed(_) => unreachable!("no placement given"),
    }
}

/// Like [`read_message_into`], but the pages of a `CheckedPages` frame go
/// where `placement` puts them (a destination's guest memory), read
/// straight from the stream with no buffer in between, and come back as
/// [`Received::Placed`]: prefix and trailer checked, each page still to be
/// checked against its CRC in place. A placement that declines a frame
/// leaves it to be read as [`read_message_into`] reads it.
///
/// # Errors
///
/// As [`read_message`]; an error from the placement as
/// [`WireError::Io`] (or [`WireError::Truncated`] for an early end).
pub fn read_message_placing<R: Read>(
    r: &mut R,
    limits: &Limits,
    spare: &mut Vec<u8>,
    placement: &mut dyn PagePlacement<R>,
) -> Result<Received, WireError> {
    read_frame(r, limits, spare, Some(placement))
}

fn read_frame<R: Read>(
    r: &mut R,
    limits: &Limits,
    spare: &mut Vec<u8>,
    placement: Option<&mut dyn PagePlacement<R>>,
) -> Result<Received, WireError> {
    let mut bytes = [0u8; HEADER_LEN];
    let n = read_full(r, &mut bytes)?;
    if n == 0 {
        return Err(WireError::ConnectionClosed);
    }
    if n < HEADER_LEN {
        return Err(WireError::Truncated {
            kind: None,
            expected: HEADER_LEN as u64,
            received: n as u64,
        });
    }
    let header = FrameHeader::decode(&bytes, limits)?;
    let mut pr = PayloadReader::new(r, header);
    if header.kind == MessageKind::Pages {
        return pages::read_batch(&mut pr, std::mem::take(spare))
            .map(|b| Received::Message(Message::Pages(b)));
    }
    if header.kind == MessageKind::CheckedPages {
        return checked::read(&mut pr, std::mem::take(spare), placement);
    }
    let payload = pr.read_vec(pr.remaining())?;
    pr.finish()?;
    decode_payload(header.kind, &payload).map(Received::Message)
}

/// Validates `msg` and writes it as one frame; returns the bytes written,
/// header included.
///
/// Large data (page data, state blobs) is written straight from the message,
/// not copied: the header and small fields go out in one `write_all`, the
/// data in a second. Wrap unbuffered sockets in a `BufWriter` and flush it
/// when the peer must see the message.
///
/// # Errors
///
/// [`WireError::InvalidField`] (and the like) if `msg` breaks a protocol
/// rule, in which case nothing was written; [`WireError::Io`] if the writer
/// fails, in which case part of the frame may have been written.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> Result<u64, WireError> {
    msg.validate()?;
    if let Message::CheckedPages(b) = msg {
        // The CRCs travel behind the pages.
        return write_checked(w, b.iteration, &b.gpas, &[&b.data], Some(&b.crcs));
    }
    let mut buf = Vec::with_capacity(HEADER_LEN + 64);
    buf.resize(HEADER_LEN, 0);
    let tail = encode_payload(msg, &mut buf)?;
    write_frame(w, msg.kind(), buf, &[tail])
}

/// Writes a `CheckedPages` batch whose pages are given as slices, for
/// example runs of guest memory: `runs` together hold exactly one page per
/// gpa, in order. The slices go to the writer as they are, in one vectored
/// write (this function copies nothing; a buffering writer may); each
/// page's CRC is taken after that, from the slices, and sent behind them
/// (`wire/checked.rs`). Returns the bytes written.
///
/// # Errors
///
/// [`WireError::InvalidField`] for a bad gpa list or data length, before
/// anything is written; [`WireError::Io`] from the writer.
pub fn write_checked_pages<W: Write>(
    w: &mut W,
    iteration: u32,
    gpas: &[u64],
    runs: &[&[u8]],
) -> Result<u64, WireError> {
    write_checked(w, iteration, gpas, runs, None)
}

/// [`write_checked_pages`] with the CRCs given (`Some`, a
/// [`Message::CheckedPages`] as it is) or taken after the data went out.
fn write_checked<W: Write>(
    w: &mut W,
    iteration: u32,
    gpas: &[u64],
    runs: &[&[u8]],
    crcs: Option<&[u32]>,
) -> Result<u64, WireError> {
    let kind = MessageKind::CheckedPages;
    pages::validate_gpas_of(kind, gpas)?;
    let data: usize = runs.iter().map(|r| r.len()).sum();
    if data != gpas.len() * PAGE_SIZE || crcs.is_some_and(|c| c.len() != gpas.len()) {
        return Err(invalid(
            kind,
            "data",
            format!("{data} bytes (and CRCs) for {} pages", gpas.len()),
        ));
    }
    let mut buf = Vec::with_capacity(HEADER_LEN + checked::CHECKED_FIXED_LEN + 8 * gpas.len());
    buf.resize(HEADER_LEN, 0);
    checked::encode_prefix(iteration, gpas, &mut buf)?;
    let payload_len = buf.len() - HEADER_LEN + data + checked::trailer_len(gpas.len());
    let header = FrameHeader {
        kind,
        len: u32::try_from(payload_len).expect("bounded by the page count"),
        payload_crc: crc32fast::hash(&buf[HEADER_LEN..]),
    };
    buf[..HEADER_LEN].copy_from_slice(&header.encode());
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(buf.as_slice())
        .chain(runs.iter().copied())
        .filter(|p| !p.is_empty())
        .map(IoSlice::new)
        .collect();
    write_all_vectored(w, &mut slices)?;
    let taken: Vec<u32>;
    let crcs = match crcs {
        Some(c) => c,
        None => {
            taken = runs
                .iter()
                .flat_map(|r| r.chunks_exact(PAGE_SIZE))
                .map(crc32fast::hash)
                .collect();
            &taken
        }
    };
    w.write_all(&checked::encode_trailer(crcs))?;
    Ok((HEADER_LEN + payload_len) as u64)
}

/// Writes a raw `Pages` batch whose pages are separate slices (for example
/// straight from guest memory), without gathering them first. Each of
/// `pages` must be exactly 4096 bytes and `gpas` must pass the usual batch
/// rules. Returns the bytes written, header included. The receiver reads it
/// back as an ordinary [`Message::Pages`] with [`Compression::None`].
pub fn write_raw_pages<W: Write>(
    w: &mut W,
    iteration: u32,
    gpas: &[u64],
    pages: &[&[u8]],
) -> Result<u64, WireError> {
    let kind = MessageKind::Pages;
    if pages.len() != gpas.len() {
        return Err(invalid(
            kind,
            "data",
            format!("{} pages for {} gpas", pages.len(), gpas.len()),
        ));
    }
    if let Some(p) = pages.iter().find(|p| p.len() != PAGE_SIZE) {
        return Err(invalid(
            kind,
            "data",
            format!("page slice of {} bytes", p.len()),
        ));
    }
    pages::validate_gpas(gpas)?;
    let mut buf = Vec::with_capacity(HEADER_LEN + pages::PAGES_FIXED_LEN + 8 * gpas.len());
    buf.resize(HEADER_LEN, 0);
    pages::encode_batch_prefix(iteration, Compression::None, gpas, &mut buf)?;
    write_frame(w, kind, buf, pages)
}

/// Fills in the header at the front of `buf` (whose tail is the start of
/// the payload), then writes `buf` and every part of `rest`.
fn write_frame<W: Write>(
    w: &mut W,
    kind: MessageKind,
    mut buf: Vec<u8>,
    rest: &[&[u8]],
) -> Result<u64, WireError> {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[HEADER_LEN..]);
    let mut payload_len = buf.len() - HEADER_LEN;
    for part in rest {
        hasher.update(part);
        payload_len += part.len();
    }
    let max = kind.max_payload_len();
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|&len| len <= max)
        .ok_or(WireError::PayloadTooLarge {
            kind,
            len: payload_len as u64,
            max: u64::from(max),
        })?;
    let header = FrameHeader {
        kind,
        len,
        payload_crc: hasher.finalize(),
    };
    buf[..HEADER_LEN].copy_from_slice(&header.encode());
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(buf.as_slice())
        .chain(rest.iter().copied())
        .filter(|p| !p.is_empty())
        .map(IoSlice::new)
        .collect();
    write_all_vectored(w, &mut slices)?;
    Ok((HEADER_LEN + payload_len) as u64)
}

/// Writes every slice, as few system calls as the writer allows: one
/// `writev` for the header and a whole batch of pages when the writer (a
/// `BufWriter` with less room than the frame) passes it through, instead of
/// one write, and one copy into the buffer, per 4 KiB page.
fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
