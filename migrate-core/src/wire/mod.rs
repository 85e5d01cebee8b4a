//! The migration wire protocol: framing, message types and page batches.
//!
//! This module is pure byte shuffling: it never touches KVM or guest memory.
//! The engine hands it [`Message`]s to [`write_message`] and gets them back
//! from [`read_message`]; everything a peer can send is validated here, so
//! a corrupted or malicious stream is refused with a typed [`WireError`]
//! before anything reaches the engine (and before any large allocation).
//!
//! # Frames
//!
//! Every message travels in one frame: a 16-byte header followed by
//! `len` payload bytes. All integers, in the header and in payloads, are
//! little-endian.
//!
//! | offset | size | field         | meaning                                                        |
//! |-------:|-----:|---------------|----------------------------------------------------------------|
//! | 0      | 2    | `kind`        | [`MessageKind`] (`0` is reserved and never valid)              |
//! | 2      | 2    | `flags`       | reserved, must be `0`                                          |
//! | 4      | 4    | `len`         | payload length in bytes                                        |
//! | 8      | 4    | `payload_crc` | CRC-32 (IEEE, as computed by `crc32fast`) of the payload       |
//! | 12     | 4    | `header_crc`  | CRC-32 of header bytes `0..12`                                 |
//!
//! A receiver checks, in this order: `header_crc`, `kind` known, `flags`
//! zero, `len` within the per-kind cap ([`Limits::cap`], computed *before*
//! allocating), then reads the payload, checks `payload_crc` and finally
//! decodes the payload strictly: no trailing bytes, every enum value known,
//! every count and length bounded. Structural errors found while reading
//! a [`Pages`](MessageKind::Pages) payload are reported only after the rest
//! of the payload was read and its checksum verified, so line corruption
//! always shows up as [`WireError::PayloadChecksum`].
//!
//! # Payloads
//!
//! `str16` is a `u16` byte length followed by that many UTF-8 bytes;
//! `opt64` is a `u8` presence flag (`0` or `1`) followed by a `u64` that
//! is always present and must be `0` when the flag is `0`.
//!
//! | kind | message        | direction | payload layout                                                                                                           | max payload |
//! |-----:|----------------|-----------|--------------------------------------------------------------------------------------------------------------------------|------------:|
//! | 1    | `Hello`        | src → dst | `magic [u8;8]` = `VMIGRATE`, `version u16`, `features u64`, `page_size u32`, `vcpu_count u32`, `cpu_model str16` (≤ 256), `region_count u32` (≤ 256), `region_count × (gpa u64, size u64)` | 65 536 |
//! | 2    | `HelloAck`     | dst → src | `version u16`, `features u64`                                                                                            | 10          |
//! | 3    | `Error`        | both      | `code u16` ([`ErrorCode`]), `message str16` (≤ 4096)                                                                     | 4 100       |
//! | 4    | `Pages`        | src → dst | `iteration u32`, `compression u8` ([`Compression`]), `count u32` (1..=1024), `count × gpa u64`, `data` (rest of payload)    | 4 202 505   |
//! | 5    | `ZeroPages`    | src → dst | `iteration u32`, `range_count u32` (≤ 65 536), `range_count × (gpa u64, pages u64)`                                      | 1 048 584   |
//! | 6    | `IterationEnd` | src → dst | `iteration u32`, `pages u64`                                                                                             | 12          |
//! | 7    | `VcpuState`    | src → dst | `index u32`, `blob_len u32` (≤ 1 MiB), `blob`                                                                            | 1 048 584   |
//! | 8    | `VmState`      | src → dst | `blob_len u32` (≤ 1 MiB), `blob`                                                                                         | 1 048 580   |
//! | 9    | `Complete`     | src → dst | `digest opt64`, `total_pages u64`                                                                                        | 17          |
//! | 10   | `Accepted`     | dst → src | `digest opt64`                                                                                                           | 9           |
//! | 11   | `Commit`       | src → dst | empty                                                                                                                    | 0           |
//! | 12   | `Heartbeat`    | both      | empty                                                                                                                    | 0           |
//! | 13   | `Resumed`      | dst → src | empty (since version 2)                                                                                                  | 0           |
//! | 14   | `ChannelJoin`  | src → dst | `session u64`, `index u16`, `count u16` (2..=16, index < count); only after `HelloAck` with [`FEATURE_CHANNELS`]           | 12          |
//! | 15   | `StandbyHeld`  | dst → src | empty: the answer to `Commit` in a live clone (`FEATURE_CLONE`)                                                          | 0           |
//! | 16   | `SerialOutput` | src → dst | `released u64`, `start u64`, `len u32` (≤ 65 536), `data`: held serial output of an epoch, or (empty) how far the primary released its output; clone sessions only | 65 556 |
//! | 17   | `CheckedPages` | src → dst | `iteration u32`, `count u32` (1..=1024), `count × gpa u64`, `count × 4096` bytes of pages, `count × crc u32`, `trailer_crc u32`; `payload_crc` covers only the part before the pages (see [`CheckedBatch`]); only after `HelloAck` with [`FEATURE_PAGE_CHECKSUMS`] | 4 206 604 |
//!
//! Field rules beyond the layout (enforced when decoding *and* before
//! writing, see [`Message::validate`]):
//!
//! * `Hello`: magic and version are checked first; an unsupported version is
//!   refused before the rest is parsed (a future version may change the
//!   layout, which is also why the Hello cap is a generous 64 KiB).
//!   `page_size` is a non-zero power of two, `vcpu_count ≥ 1`, each region is
//!   page-aligned, non-empty and does not wrap. Unknown feature bits are
//!   allowed.
//! * `HelloAck`: version in the supported range, features ⊆ [`FEATURES_KNOWN`].
//! * `Pages`: every gpa is 4096-aligned. With [`Compression::None`] the data
//!   is exactly `count × 4096` bytes. With [`Compression::Zstd`] the data is
//!   exactly one zstd frame, strictly shorter than `count × 4096` bytes (a
//!   batch that does not shrink is sent raw), and if the frame declares its
//!   content size it must be `count × 4096`; the decompressed size is
//!   checked again by [`PageBatch::decompress_into`]. Duplicate gpas are not
//!   refused; pages apply in order.
//! * `CheckedPages`: gpas as for `Pages`; the payload is exactly as long as
//!   `count` says; `trailer_crc` is the CRC-32 of the `count` CRCs before it
//!   (a mismatch is a [`WireError::PayloadChecksum`]). A page that does not
//!   match its own CRC is *not* an error of the frame: the receiver drops
//!   that page and requires a newer copy of it before `Complete`.
//! * `ZeroPages`: each gpa is aligned, `pages ≥ 1`, `gpa + pages × 4096`
//!   does not overflow. An empty range list is legal.
//! * `Error`: code `0` and unknown codes are refused.
//!
//! # One migration
//!
//! ```text
//!  source                                              destination
//!    |--- Hello {version, features, page_size,          |
//!    |           vcpu_count, cpu_model, regions} ------>|  check layout
//!    |<-- HelloAck {version, features ∩ known} ---------|  (or Error {LayoutMismatch..})
//!    |                                                   |
//!    |--- Pages / CheckedPages / ZeroPages {0} ... ---->|  iteration 0: all memory
//!    |--- IterationEnd {0, pages} --------------------->|  cross-check page count
//!    |--- Pages / ZeroPages {iteration: 1..n} ... ----->|  dirty pages only
//!    |--- IterationEnd {i, pages} --------------------->|
//!    |   [pause guest]                                   |
//!    |--- Pages / ZeroPages {iteration: last} ... ----->|  stop-and-copy
//!    |--- IterationEnd {last, pages} ------------------>|
//!    |--- VcpuState {index} × vcpu_count -------------->|
//!    |--- VmState (optional) -------------------------->|
//!    |--- Complete {digest?, total_pages} ------------->|  compute own digest
//!    |<-- Accepted {digest?} ---------------------------|  (or Error → source resumes guest)
//!    |--- Commit -------------------------------------->|  resume guest here
//!    |<-- Resumed --------------------------------------|  the guest runs here
//!    |   [source never runs the guest again]             |
//! ```
//!
//! After `Commit` the source waits for `Resumed`: only then does it report
//! `completed` and leave for good. If the destination fails to resume it
//! answers `Error` instead and never runs the guest, so the source resumes
//! it. If nothing comes back (connection lost, timeout), the source cannot
//! know whether the destination runs the guest: it stays paused and says
//! the outcome is unknown, for the operator to decide (QEMU's source sits in
//! `postmigrate` the same way).
//!
//! A live clone (`FEATURE_CLONE`) runs the same exchange up to `Accepted`;
//! then the source resumes its guest, sends `Commit`, and the standby answers
//! `StandbyHeld` (kind 15) instead of `Resumed`, keeping the copy paused;
//! the connection stays open for the session that follows.
//!
//! In the clone session that follows, checkpoint epochs reuse the
//! migration's messages numbered by epoch, plus `SerialOutput` (kind 16,
//! output commit): no feature bit, because it came in the same release as
//! `FEATURE_CLONE`, so every standby that acks the clone knows it.
//!
//! `Error` may be sent by either side at any point; it ends the migration.
//! `Heartbeat` is reserved for keep-alives and may be ignored.
//!
//! # Performance
//!
//! [`write_message`] writes a `Pages` batch without copying its data: the
//! header and the small fields go out in one `write_all`, the page data in
//! another (wrap the socket in a `BufWriter`). [`write_raw_pages`] sends raw
//! pages straight from per-page slices, and [`write_checked_pages`] a
//! `CheckedPages` batch straight from runs of live guest memory, its CRCs
//! taken after the write copied them. [`read_message`] reads page data
//! directly into the batch's own buffer. Decompression is left to the caller
//! ([`PageBatch::decompress_into`]), so it can run off the socket thread.

mod checked;
mod codec;
mod frame;
mod kind;
mod message;
mod pages;
#[cfg(test)]
mod tests;

pub use checked::{CheckedBatch, PagePlacement, PlacedBatch, Received};
pub use frame::{
    read_message, read_message_into, read_message_placing, write_checked_pages, write_message,
    write_raw_pages, FrameHeader,
};
pub use kind::{ErrorCode, MessageKind};
pub use message::{
    Accepted, ChannelJoin, Complete, ErrorMessage, Hello, HelloAck, IterationEnd, MemoryRegion,
    Message, SerialOutput, VcpuState, VmState, MAX_CHANNELS,
};
pub use pages::{Compression, PageBatch, ZeroPages, ZeroRange};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Guest page size assumed by `Pages` and `ZeroPages` (bytes).
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a `u64`, for guest-physical address arithmetic.
pub const PAGE_SIZE_U64: u64 = 4096;
/// Most pages one `Pages` batch may carry.
pub const MAX_BATCH_PAGES: usize = 1024;
/// Most ranges one `ZeroPages` message may carry.
pub const MAX_ZERO_RANGES: usize = 65_536;
/// Most bytes in a `VcpuState` or `VmState` blob (1 MiB).
pub const MAX_BLOB_LEN: usize = 1 << 20;
/// Most bytes in `Hello::cpu_model`.
pub const MAX_CPU_MODEL_LEN: usize = 256;
/// Most memory regions in a `Hello`.
pub const MAX_REGIONS: usize = 256;
/// Most serial bytes in one `SerialOutput` (64 KiB; an epoch's held
/// output goes in as many as it needs).
pub const MAX_SERIAL_CHUNK: usize = 1 << 16;
/// Most bytes in `ErrorMessage::message`.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;

/// Magic bytes opening every `Hello` payload.
pub const MAGIC: [u8; 8] = *b"VMIGRATE";
/// Protocol version this implementation speaks.
///
/// Version 2 added `Resumed`, the destination's answer to `Commit`; a
/// version-1 peer never sends it, so its source could not tell a completed
/// migration from a destination that died after `Accepted`: version 1 is no
/// longer spoken.
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest protocol version a receiver accepts.
pub const MIN_SUPPORTED_VERSION: u16 = 2;
/// Newest protocol version a receiver accepts.
pub const MAX_SUPPORTED_VERSION: u16 = 2;

/// Feature bit: `Pages` batches may be zstd-compressed.
pub const FEATURE_ZSTD: u64 = 1 << 0;
/// Feature bit: `Complete`/`Accepted` carry whole-memory digests.
pub const FEATURE_MEMORY_DIGEST: u64 = 1 << 1;
/// Feature bit: the guest was paused on the source (`pause` before `send`)
/// and must stay paused on the destination after `Commit`, as QEMU
/// migrates a stopped guest. A source sending a paused guest requires the
/// ack to carry it, so a destination that would run the guest is refused.
pub const FEATURE_GUEST_PAUSED: u64 = 1 << 2;
/// Feature bit: several channels. The source may send `ChannelJoin` after
/// `HelloAck` and open more connections, each carrying a share of every
/// iteration's pages (see [`ChannelJoin`]).
pub const FEATURE_CHANNELS: u64 = 1 << 3;
/// Feature bit: a live clone, not a migration. After `Commit` the
/// destination keeps the copy paused as a standby and answers
/// `StandbyHeld` instead of `Resumed`, and the source resumes the guest.
/// A standby destination (`run --standby`) refuses a Hello without it and
/// any other destination refuses a Hello with it, so neither side can
/// mistake one for the other; a destination that does not know the bit
/// does not ack it and the source stops before sending memory.
pub const FEATURE_CLONE: u64 = 1 << 4;
/// Feature bit: the source may send raw pages as `CheckedPages`, straight
/// from guest memory with a CRC per page (see [`CheckedBatch`]); the
/// destination drops a page that fails its CRC and requires it to be sent
/// again before `Complete`.
pub const FEATURE_PAGE_CHECKSUMS: u64 = 1 << 5;
/// Every feature bit this implementation knows.
pub const FEATURES_KNOWN: u64 = FEATURE_ZSTD
    | FEATURE_MEMORY_DIGEST
    | FEATURE_GUEST_PAUSED
    | FEATURE_CHANNELS
    | FEATURE_CLONE
    | FEATURE_PAGE_CHECKSUMS;

/// Receiver-side caps on payload sizes, checked against the header's `len`
/// before any payload buffer is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted for any kind, on top of the protocol's
    /// per-kind maximum ([`MessageKind::max_payload_len`]).
    pub max_payload: u32,
}

impl Limits {
    /// The cap applied to the payload length of a `kind` frame: the smaller
    /// of the protocol maximum for that kind and [`Limits::max_payload`].
    pub fn cap(&self, kind: MessageKind) -> u32 {
        kind.max_payload_len().min(self.max_payload)
    }
}

impl Default for Limits {
    /// Accepts every legal frame: the cap is the largest legal payload,
    /// a full `CheckedPages` batch (4 206 604 bytes).
    fn default() -> Self {
        Self {
            max_payload: MessageKind::CheckedPages.max_payload_len(),
        }
    }
}

/// Everything that can go wrong reading or writing the migration stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The header's own checksum does not match its first 12 bytes.
    #[error(
        "frame header checksum mismatch: header says {expected:#010x}, computed {found:#010x}"
    )]
    HeaderChecksum {
        /// `header_crc` as received.
        expected: u32,
        /// CRC-32 computed over the received header bytes `0..12`.
        found: u32,
    },
    /// The payload checksum does not match the payload.
    #[error(
        "{kind} payload checksum mismatch: header says {expected:#010x}, computed {found:#010x}"
    )]
    PayloadChecksum {
        /// Kind of the frame.
        kind: MessageKind,
        /// `payload_crc` from the header.
        expected: u32,
        /// CRC-32 computed over the received payload.
        found: u32,
    },
    /// The header names a message kind this implementation does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// The header's reserved flags are not zero.
    #[error("{kind} frame has reserved flags set ({flags:#06x})")]
    NonZeroFlags {
        /// Kind of the frame.
        kind: MessageKind,
        /// The flags as received.
        flags: u16,
    },
    /// The announced payload length exceeds the cap for its kind.
    #[error("{kind} payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Kind of the frame.
        kind: MessageKind,
        /// Announced (or, when writing, encoded) payload length.
        len: u64,
        /// The cap that applies.
        max: u64,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside {}: got {received} of {expected} bytes", truncated_part(.kind))]
    Truncated {
        /// Kind of the frame, or `None` if the header itself was cut short.
        kind: Option<MessageKind>,
        /// Bytes the header or payload should have had.
        expected: u64,
        /// Bytes actually received of it.
        received: u64,
    },
    /// The payload decoded completely but bytes were left over.
    #[error("{kind} payload has {extra} trailing bytes")]
    TrailingBytes {
        /// Kind of the frame.
        kind: MessageKind,
        /// Bytes left after the last field.
        extra: usize,
    },
    /// A `Hello` did not start with [`MAGIC`].
    #[error("bad Hello magic {found:02x?}, expected \"VMIGRATE\"")]
    BadMagic {
        /// The eight bytes received instead.
        found: [u8; 8],
    },
    /// The peer speaks a protocol version outside the supported range.
    #[error("unsupported protocol version {found} (supported: {min}..={max})")]
    UnsupportedVersion {
        /// Version the peer announced.
        found: u16,
        /// Oldest supported version.
        min: u16,
        /// Newest supported version.
        max: u16,
    },
    /// A payload field is out of range, malformed, or missing.
    #[error("invalid {kind} field `{field}`: {reason}")]
    InvalidField {
        /// Kind of the message.
        kind: MessageKind,
        /// Name of the offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// zstd refused to decompress a page batch (corrupt data, or output
    /// larger than the batch).
    #[error("zstd decompression of a {expected}-byte page batch failed")]
    Decompress {
        /// Size the batch should decompress to.
        expected: usize,
        /// The zstd error.
        #[source]
        source: std::io::Error,
    },
    /// A zstd page batch decompressed to the wrong number of bytes.
    #[error("zstd page batch decompressed to {found} bytes, expected {expected}")]
    DecompressedSize {
        /// `pages × 4096`.
        expected: usize,
        /// Bytes actually produced.
        found: usize,
    },
    /// zstd failed to compress a page batch.
    #[error("zstd compression of a page batch failed")]
    Compress {
        /// The zstd error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection cleanly between two frames.
    #[error("connection closed by peer")]
    ConnectionClosed,
    /// Reading from or writing to the stream failed.
    #[error("I/O error on the migration stream")]
    Io {
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn truncated_part(kind: &Option<MessageKind>) -> String {
    match kind {
        Some(kind) => format!("a {kind} payload"),
        None => "a frame header".to_owned(),
    }
}

impl From<std::io::Error> for WireError {
    fn from(source: std::io::Error) -> Self {
        WireError::Io { source }
    }
}
