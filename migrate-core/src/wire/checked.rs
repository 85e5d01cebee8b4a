//! `CheckedPages` (kind 17): raw pages sent straight from guest memory,
//! each with its own CRC.
//!
//! Why a second page message: a `Pages` frame carries one CRC of its whole
//! payload in the header, so the source must hold the exact bytes before
//! it writes the header, which for a running guest means copying every
//! page out of guest memory first (the guest may change it at any time).
//! That copy was 43% of the source's time at loopback speed. Here the
//! source hands its writer the guest pages themselves (a vectored write),
//! then takes each page's CRC from guest memory, now in the cache since
//! the write just copied it, and sends the CRCs after the pages. If the
//! guest writes a page between that copy and the CRC, the copy no longer
//! matches its CRC: the destination drops that page alone (it never
//! reaches guest memory, or, received in place by a [`PagePlacement`], is
//! marked torn there before the guest can run) and waits for it to be
//! sent again. It will be:
//! the write came after the dirty log was harvested, so the page is in the
//! next iteration's set, and the final pass reads pages with the guest
//! paused. A page dropped and never sent again fails the migration at
//! `Complete`.
//!
//! Layout: `iteration u32`, `count u32` (1..=1024), `count × gpa u64`,
//! then `count × 4096` bytes of pages, then the trailer: `count × crc u32`
//! (CRC-32 of each page) and `trailer_crc u32` (CRC-32 of those CRC
//! bytes). The frame's `payload_crc` covers the part before the pages, the
//! trailer its own CRC, and each page its CRC in the trailer; a damaged
//! prefix or trailer fails the frame (`PayloadChecksum`).

use std::io::{self, Read};

use super::codec::{invalid, len_u32, Decoder, Put};
use super::frame::PayloadReader;
use super::pages::validate_gpas_of;
use super::{Message, MessageKind, WireError, MAX_BATCH_PAGES, PAGE_SIZE};

/// Bytes of a `CheckedPages` payload before the gpas: iteration, count.
pub(super) const CHECKED_FIXED_LEN: usize = 8;

const KIND: MessageKind = MessageKind::CheckedPages;

/// A batch of raw pages, each with its CRC-32 (`CheckedPages`), source →
/// destination. Page `i` of `data` belongs at `gpas[i]` if its CRC is
/// `crcs[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedBatch {
    /// Pre-copy iteration the pages belong to.
    pub iteration: u32,
    /// Page-aligned guest-physical addresses, 1..=[`MAX_BATCH_PAGES`].
    pub gpas: Vec<u64>,
    /// CRC-32 of each page as the source read it.
    pub crcs: Vec<u32>,
    /// `gpas.len()` pages in order.
    pub data: Vec<u8>,
}

impl CheckedBatch {
    /// A batch of `data` (one page per gpa) with the pages' CRCs taken now.
    pub fn new(iteration: u32, gpas: Vec<u64>, data: Vec<u8>) -> Result<Self, WireError> {
        let crcs = data.chunks(PAGE_SIZE).map(crc32fast::hash).collect();
        let batch = Self {
            iteration,
            gpas,
            crcs,
            data,
        };
        batch.validate()?;
        Ok(batch)
    }

    /// Checks the layout rules: gpas as for `Pages`, one CRC per gpa and
    /// exactly one page of data per gpa. (Whether a page matches its CRC
    /// is the receiver's business: see [`CheckedBatch::page_intact`].)
    pub fn validate(&self) -> Result<(), WireError> {
        validate_gpas_of(KIND, &self.gpas)?;
        if self.crcs.len() != self.gpas.len() {
            return Err(invalid(
                KIND,
                "crcs",
                format!("{} CRCs for {} pages", self.crcs.len(), self.gpas.len()),
            ));
        }
        let want = self.gpas.len() * PAGE_SIZE;
        if self.data.len() != want {
            return Err(invalid(
                KIND,
                "data",
                format!(
                    "{} bytes for {} pages (expected {want})",
                    self.data.len(),
                    self.gpas.len()
                ),
            ));
        }
        Ok(())
    }

    /// Page `i` (its data) matches the CRC the source took.
    pub fn page_intact(&self, i: usize) -> bool {
        crc32fast::hash(&self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]) == self.crcs[i]
    }
}

/// Receives the pages of `CheckedPages` frames where they belong (guest
/// memory) rather than into a buffer: see
/// [`read_message_placing`](super::read_message_placing). What the pages
/// are worth is decided afterwards, against their CRCs
/// ([`PlacedBatch::crcs`]), so a placement may only be used where bytes
/// that fail their CRC can do no harm until they are replaced: guest
/// memory of a destination whose guest cannot run yet.
pub trait PagePlacement<R> {
    /// Reads exactly `gpas.len()` whole pages from `r` into their places
    /// and returns `Ok(true)`, or reads nothing and returns `Ok(false)`:
    /// the pages are then read into a buffer as usual. `gpas` passed the
    /// frame CRC and nothing else yet. After an error the stream position
    /// is unspecified.
    fn receive(&mut self, gpas: &[u64], r: &mut R) -> io::Result<bool>;
}

/// A `CheckedPages` frame whose pages a [`PagePlacement`] received in
/// place. Prefix and trailer passed their CRCs; each page is still to be
/// checked against its own, where it now lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedBatch {
    /// Pre-copy iteration the pages belong to.
    pub iteration: u32,
    /// Page-aligned guest-physical addresses, 1..=[`MAX_BATCH_PAGES`].
    pub gpas: Vec<u64>,
    /// CRC-32 of each page as the source read it.
    pub crcs: Vec<u32>,
}

/// A frame read by [`read_message_placing`](super::read_message_placing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Any message, read as [`read_message_into`](super::read_message_into)
    /// reads it.
    Message(Message),
    /// `CheckedPages` whose pages went straight to their places.
    Placed(PlacedBatch),
}

/// Appends iteration, count and gpas (what the frame CRC covers).
pub(super) fn encode_prefix(
    iteration: u32,
    gpas: &[u64],
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    out.reserve(CHECKED_FIXED_LEN + 8 * gpas.len());
    out.put_u32(iteration);
    out.put_u32(len_u32(KIND, "gpas", gpas.len(), MAX_BATCH_PAGES)?);
    for &gpa in gpas {
        out.put_u64(gpa);
    }
    Ok(())
}

/// Bytes of the trailer of a batch of `count` pages.
pub(super) fn trailer_len(count: usize) -> usize {
    4 * count + 4
}

/// The trailer: the pages' CRCs, then the CRC of those bytes.
pub(super) fn encode_trailer(crcs: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(trailer_len(crcs.len()));
    for &crc in crcs {
        out.put_u32(crc);
    }
    let own = crc32fast::hash(&out);
    out.put_u32(own);
    out
}

/// The CRCs of a trailer, checked against its own CRC.
fn decode_trailer(trailer: &[u8]) -> Result<Vec<u32>, WireError> {
    let (crcs, own) = trailer.split_at(trailer.len() - 4);
    let expected = u32::from_le_bytes(own.try_into().expect("4 bytes"));
    let found = crc32fast::hash(crcs);
    if found != expected {
        return Err(WireError::PayloadChecksum {
            kind: KIND,
            expected,
            found,
        });
    }
    Ok(crcs
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// Parses the count and checks the payload is exactly as long as it says
/// (`more` bytes are still in the stream).
fn parse_fixed(d: &mut Decoder<'_>, more: usize) -> Result<(u32, usize), WireError> {
    let iteration = d.u32("iteration")?;
    let raw = d.u32("gpas")?;
    let count = usize::try_from(raw).unwrap_or(usize::MAX);
    let left = d.remaining().saturating_add(more);
    if count == 0 || count > MAX_BATCH_PAGES || left != count * (8 + PAGE_SIZE) + trailer_len(count)
    {
        return Err(invalid(
            KIND,
            "gpas",
            format!(
                "count {raw} outside 1..={MAX_BATCH_PAGES} or not matching the {left} payload bytes left"
            ),
        ));
    }
    Ok((iteration, count))
}

/// Decodes a `CheckedPages` payload held in memory.
pub(super) fn decode(d: &mut Decoder<'_>) -> Result<CheckedBatch, WireError> {
    let (iteration, count) = parse_fixed(d, 0)?;
    let gpas = d.take(8 * count, "gpas")?;
    let data = d.take(count * PAGE_SIZE, "data")?.to_vec();
    let trailer = d.take(d.remaining(), "crcs")?;
    let batch = CheckedBatch {
        iteration,
        gpas: gpas
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        crcs: decode_trailer(trailer)?,
        data,
    };
    batch.validate()?;
    Ok(batch)
}

/// Reads a `CheckedPages` payload from the stream: the prefix is checked
/// against the frame CRC before the pages are read, and the pages land
/// unhashed (each has its own CRC) where `placement` puts them, or else in
/// `buffer` (reused).
pub(super) fn read<R: Read>(
    pr: &mut PayloadReader<'_, R>,
    buffer: Vec<u8>,
    placement: Option<&mut dyn PagePlacement<R>>,
) -> Result<Received, WireError> {
    let mut fixed = [0u8; CHECKED_FIXED_LEN];
    let fixed_len = CHECKED_FIXED_LEN.min(pr.remaining());
    pr.read_exact(&mut fixed[..fixed_len])?;
    let mut d = Decoder::new(KIND, &fixed[..fixed_len]);
    let (iteration, count) = match parse_fixed(&mut d, pr.remaining()) {
        Ok(v) => v,
        Err(e) => return Err(pr.abandon(e)),
    };
    let mut gpa_bytes = [0u8; 8 * MAX_BATCH_PAGES];
    let gpa_bytes = &mut gpa_bytes[..8 * count];
    pr.read_exact(gpa_bytes)?;
    pr.check_prefix()?;
    let gpas: Vec<u64> = gpa_bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let placed = match placement {
        Some(p) if validate_gpas_of(KIND, &gpas).is_ok() => {
            pr.place_unhashed(count * PAGE_SIZE, &gpas, p)?
        }
        _ => false,
    };
    let data = if placed {
        Vec::new()
    } else {
        pr.read_into_unhashed(count * PAGE_SIZE, buffer)?
    };
    let mut trailer = [0u8; 4 * MAX_BATCH_PAGES + 4];
    let trailer = &mut trailer[..trailer_len(count)];
    pr.read_exact_unhashed(trailer)?;
    let crcs = decode_trailer(trailer)?;
    if placed {
        return Ok(Received::Placed(PlacedBatch {
            iteration,
            gpas,
            crcs,
        }));
    }
    let batch = CheckedBatch {
        iteration,
        gpas,
        crcs,
        data,
    };
    batch.validate()?;
    Ok(Received::Message(Message::CheckedPages(batch)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{read_message, write_checked_pages, write_message, Limits, Message};

    fn batch() -> CheckedBatch {
        let data: Vec<u8> = (0..3u8).flat_map(|i| vec![i + 1; PAGE_SIZE]).collect();
        CheckedBatch::new(7, vec![0, 8192, 4096], data).unwrap()
    }

    #[test]
    fn round_trips_through_a_frame() {
        let b = batch();
        let mut wire = Vec::new();
        write_message(&mut wire, &Message::CheckedPages(b.clone())).unwrap();
        let got = read_message(&mut wire.as_slice(), &Limits::default()).unwrap();
        assert_eq!(got, Message::CheckedPages(b.clone()));
        assert!((0..3).all(|i| b.page_intact(i)));
    }

    /// Pages given as slices (guest memory) make the same frame.
    #[test]
    fn slices_make_the_same_frame() {
        let b = batch();
        let mut whole = Vec::new();
        write_message(&mut whole, &Message::CheckedPages(b.clone())).unwrap();
        let mut sliced = Vec::new();
        let (first, rest) = b.data.split_at(PAGE_SIZE);
        let n = write_checked_pages(&mut sliced, 7, &b.gpas, &[first, rest]).unwrap();
        assert_eq!(sliced, whole);
        assert_eq!(n, whole.len() as u64);
    }

    /// A page changed after its CRC was taken still reads (the frame is
    /// sound) but shows as not intact; a changed CRC fails the frame.
    #[test]
    fn a_torn_page_is_found_and_a_damaged_prefix_fails_the_frame() {
        let b = batch();
        let mut wire = Vec::new();
        write_message(&mut wire, &Message::CheckedPages(b)).unwrap();
        let mut torn = wire.clone();
        let last = torn.len() - trailer_len(3) - 1; // last byte of page 2
        torn[last] ^= 1;
        let Message::CheckedPages(got) =
            read_message(&mut torn.as_slice(), &Limits::default()).unwrap()
        else {
            panic!("not CheckedPages");
        };
        assert!(got.page_intact(0) && got.page_intact(1) && !got.page_intact(2));
        let mut bad = wire.clone();
        bad[16 + CHECKED_FIXED_LEN] ^= 1; // first gpa
        assert!(matches!(
            read_message(&mut bad.as_slice(), &Limits::default()),
            Err(WireError::PayloadChecksum { .. })
        ));
        let mut bad = wire.clone();
        let first_crc = wire.len() - trailer_len(3);
        bad[first_crc] ^= 1;
        assert!(matches!(
            read_message(&mut bad.as_slice(), &Limits::default()),
            Err(WireError::PayloadChecksum { .. })
        ));
    }

    #[test]
    fn layout_rules_are_enforced() {
        let mut b = batch();
        b.crcs.pop();
        assert!(b.validate().is_err());
        assert!(CheckedBatch::new(0, vec![0], vec![0; 100]).is_err());
        assert!(CheckedBatch::new(0, vec![1], vec![0; PAGE_SIZE]).is_err());
        assert!(CheckedBatch::new(0, vec![], vec![]).is_err());
        let mut a = Vec::new();
        assert!(write_checked_pages(&mut a, 0, &[0], &[&[0; 10]]).is_err());
        assert!(a.is_empty());
    }

    /// A count that does not match the payload length is refused, after the
    /// payload was drained.
    #[test]
    fn a_wrong_count_is_refused() {
        let mut wire = Vec::new();
        write_message(&mut wire, &Message::CheckedPages(batch())).unwrap();
        wire[16 + 4] = 2; // count 3 → 2
        assert!(matches!(
            read_message(&mut wire.as_slice(), &Limits::default()),
            Err(WireError::InvalidField { .. }) | Err(WireError::PayloadChecksum { .. })
        ));
    }
}
