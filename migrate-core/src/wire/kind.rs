//! Message kinds and error codes: the enums carried in frame headers and
//! `Error` payloads.

use std::fmt;

use super::pages;
use super::{
    WireError, MAX_BLOB_LEN, MAX_CPU_MODEL_LEN, MAX_ERROR_MESSAGE_LEN, MAX_REGIONS, PAGE_SIZE,
};

/// The `kind` field of a frame header. `0` is reserved and never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum MessageKind {
    /// [`Hello`](super::Hello): source opens the migration.
    Hello = 1,
    /// [`HelloAck`](super::HelloAck): destination accepts the Hello.
    HelloAck = 2,
    /// [`ErrorMessage`](super::ErrorMessage): refusal or abort, either direction.
    Error = 3,
    /// [`PageBatch`](super::PageBatch): whole pages of guest memory.
    Pages = 4,
    /// [`ZeroPages`](super::ZeroPages): runs of all-zero pages.
    ZeroPages = 5,
    /// [`IterationEnd`](super::IterationEnd): end of one pre-copy iteration.
    IterationEnd = 6,
    /// [`VcpuState`](super::VcpuState): one vCPU's saved state.
    VcpuState = 7,
    /// [`VmState`](super::VmState): VM-wide state.
    VmState = 8,
    /// [`Complete`](super::Complete): the source sent everything.
    Complete = 9,
    /// [`Accepted`](super::Accepted): the destination verified everything.
    Accepted = 10,
    /// Source gives up the guest; destination may resume.
    Commit = 11,
    /// Keep-alive, either direction.
    Heartbeat = 12,
    /// Destination: the guest runs here now (the answer to `Commit`).
    Resumed = 13,
    /// [`ChannelJoin`](super::ChannelJoin): the first frame on every
    /// channel of a multi-channel migration.
    ChannelJoin = 14,
    /// Standby (live clone): the verified copy is held here, paused (the
    /// answer to `Commit` in a clone).
    StandbyHeld = 15,
    /// [`SerialOutput`](super::SerialOutput): serial output the primary
    /// holds back for a checkpoint epoch (output commit), or how far it
    /// released its output.
    SerialOutput = 16,
    /// [`CheckedBatch`](super::CheckedBatch): whole pages sent straight
    /// from guest memory, each with its own CRC.
    CheckedPages = 17,
}

impl MessageKind {
    /// Every kind, in wire-value order.
    pub const ALL: [MessageKind; 17] = [
        Self::Hello,
        Self::HelloAck,
        Self::Error,
        Self::Pages,
        Self::ZeroPages,
        Self::IterationEnd,
        Self::VcpuState,
        Self::VmState,
        Self::Complete,
        Self::Accepted,
        Self::Commit,
        Self::Heartbeat,
        Self::Resumed,
        Self::ChannelJoin,
        Self::StandbyHeld,
        Self::SerialOutput,
        Self::CheckedPages,
    ];

    /// Decodes a wire value; `None` for `0` and unknown values.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.as_u16() == value)
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The name used in logs and errors, e.g. `"IterationEnd"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "Hello",
            Self::HelloAck => "HelloAck",
            Self::Error => "Error",
            Self::Pages => "Pages",
            Self::ZeroPages => "ZeroPages",
            Self::IterationEnd => "IterationEnd",
            Self::VcpuState => "VcpuState",
            Self::VmState => "VmState",
            Self::Complete => "Complete",
            Self::Accepted => "Accepted",
            Self::Commit => "Commit",
            Self::Heartbeat => "Heartbeat",
            Self::Resumed => "Resumed",
            Self::ChannelJoin => "ChannelJoin",
            Self::StandbyHeld => "StandbyHeld",
            Self::SerialOutput => "SerialOutput",
            Self::CheckedPages => "CheckedPages",
        }
    }

    /// The protocol's largest legal payload for this kind (see the table in
    /// the [module docs](super)).
    pub fn max_payload_len(self) -> u32 {
        match self {
            Self::Hello => 65_536,
            Self::HelloAck => 10,
            Self::Error => 4_100,
            Self::Pages => 4_202_505,
            Self::ZeroPages => 1_048_584,
            Self::IterationEnd => 12,
            Self::ChannelJoin => 12,
            Self::VcpuState => 1_048_584,
            Self::VmState => 1_048_580,
            Self::Complete => 17,
            Self::Accepted => 9,
            Self::SerialOutput => 65_556,
            Self::CheckedPages => 4_206_604,
            Self::Commit | Self::Heartbeat | Self::Resumed | Self::StandbyHeld => 0,
        }
    }
}

// The caps above follow from the field bounds.
const _: () = {
    assert!(2 + 2 + MAX_ERROR_MESSAGE_LEN == 4_100);
    assert!(pages::PAGES_FIXED_LEN + super::MAX_BATCH_PAGES * (8 + PAGE_SIZE) == 4_202_505);
    assert!(
        super::checked::CHECKED_FIXED_LEN + super::MAX_BATCH_PAGES * (12 + PAGE_SIZE) + 4
            == 4_206_604
    );
    assert!(8 + 16 * super::MAX_ZERO_RANGES == 1_048_584);
    assert!(20 + super::MAX_SERIAL_CHUNK == 65_556);
    assert!(8 + MAX_BLOB_LEN == 1_048_584 && 4 + MAX_BLOB_LEN == 1_048_580);
    assert!(8 + 2 + 8 + 4 + 4 + 2 + MAX_CPU_MODEL_LEN + 4 + 16 * MAX_REGIONS <= 65_536);
};

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<u16> for MessageKind {
    type Error = WireError;

    fn try_from(value: u16) -> Result<Self, WireError> {
        Self::from_u16(value).ok_or(WireError::UnknownKind(value))
    }
}

/// Why a peer refuses or aborts, carried by [`ErrorMessage`](super::ErrorMessage). `0` is
/// reserved and never valid on the wire; unknown values are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Memory regions differ from the destination's.
    LayoutMismatch = 1,
    /// vCPU count differs.
    VcpuMismatch = 2,
    /// CPU model differs.
    CpuModelMismatch = 3,
    /// No common protocol version.
    UnsupportedVersion = 4,
    /// The peer broke the protocol (bad frame, unexpected message, ...).
    ProtocolViolation = 5,
    /// The operator cancelled the migration.
    Cancelled = 6,
    /// An internal failure on the sending side.
    Internal = 7,
    /// A resource limit (memory, time budget, ...) was hit.
    ResourceLimit = 8,
    /// Guest page size differs.
    PageSizeMismatch = 9,
    /// Memory digests or page counts did not match.
    DigestMismatch = 10,
    /// The peer took too long.
    Timeout = 11,
}

impl ErrorCode {
    /// Every code, in wire-value order.
    pub const ALL: [ErrorCode; 11] = [
        Self::LayoutMismatch,
        Self::VcpuMismatch,
        Self::CpuModelMismatch,
        Self::UnsupportedVersion,
        Self::ProtocolViolation,
        Self::Cancelled,
        Self::Internal,
        Self::ResourceLimit,
        Self::PageSizeMismatch,
        Self::DigestMismatch,
        Self::Timeout,
    ];

    /// Decodes a wire value; `None` for `0` and unknown values.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_u16() == value)
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LayoutMismatch => "memory layout mismatch",
            Self::VcpuMismatch => "vCPU count mismatch",
            Self::CpuModelMismatch => "CPU model mismatch",
            Self::UnsupportedVersion => "unsupported protocol version",
            Self::ProtocolViolation => "protocol violation",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal error",
            Self::ResourceLimit => "resource limit",
            Self::PageSizeMismatch => "page size mismatch",
            Self::DigestMismatch => "digest mismatch",
            Self::Timeout => "timeout",
        })
    }
}
