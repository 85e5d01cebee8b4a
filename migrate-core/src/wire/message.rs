//! Message structs and their (non-page) payload codecs.

use super::codec::{invalid, len_u32, put_opt64, Decoder, Put};
use super::pages::{self, PageBatch, ZeroPages};
use super::{
    ErrorCode, MessageKind, WireError, FEATURES_KNOWN, MAGIC, MAX_BLOB_LEN, MAX_CPU_MODEL_LEN,
    MAX_ERROR_MESSAGE_LEN, MAX_REGIONS, MAX_SERIAL_CHUNK, MAX_SUPPORTED_VERSION,
    MIN_SUPPORTED_VERSION, PAGE_SIZE_U64, PROTOCOL_VERSION,
};

/// One guest-physical memory region announced in [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryRegion {
    /// Guest-physical start address (page-aligned).
    pub gpa: u64,
    /// Size in bytes (non-zero multiple of 4096).
    pub size: u64,
}

/// First message, source → destination: who I am and what I will send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the source speaks. The magic is not stored: it is
    /// always written as [`MAGIC`] and checked when reading.
    pub version: u16,
    /// Features the source offers (unknown bits are allowed).
    pub features: u64,
    /// Guest page size in bytes (non-zero power of two).
    pub page_size: u32,
    /// Number of vCPUs (≥ 1).
    pub vcpu_count: u32,
    /// CPU model name (≤ 256 UTF-8 bytes).
    pub cpu_model: String,
    /// Guest memory layout (≤ 256 regions).
    pub regions: Vec<MemoryRegion>,
}

impl Hello {
    /// A Hello for [`PROTOCOL_VERSION`] and 4 KiB pages.
    pub fn new(
        features: u64,
        vcpu_count: u32,
        cpu_model: impl Into<String>,
        regions: Vec<MemoryRegion>,
    ) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            features,
            page_size: 4096,
            vcpu_count,
            cpu_model: cpu_model.into(),
            regions,
        }
    }

    /// Checks the field rules of the module docs.
    pub fn validate(&self) -> Result<(), WireError> {
        let kind = MessageKind::Hello;
        check_version(self.version)?;
        if !self.page_size.is_power_of_two() {
            return Err(invalid(
                kind,
                "page_size",
                format!("{} is not a power of two", self.page_size),
            ));
        }
        if self.vcpu_count == 0 {
            return Err(invalid(kind, "vcpu_count", "must be at least 1"));
        }
        if self.cpu_model.len() > MAX_CPU_MODEL_LEN {
            return Err(invalid(
                kind,
                "cpu_model",
                format!("{} bytes exceeds {MAX_CPU_MODEL_LEN}", self.cpu_model.len()),
            ));
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(invalid(
                kind,
                "regions",
                format!("{} regions exceeds {MAX_REGIONS}", self.regions.len()),
            ));
        }
        for r in &self.regions {
            if r.gpa % PAGE_SIZE_U64 != 0 || r.size % PAGE_SIZE_U64 != 0 || r.size == 0 {
                return Err(invalid(
                    kind,
                    "regions",
                    format!(
                        "region {:#x}+{:#x} is empty or not page-aligned",
                        r.gpa, r.size
                    ),
                ));
            }
            if r.gpa.checked_add(r.size).is_none() {
                return Err(invalid(
                    kind,
                    "regions",
                    format!("region {:#x}+{:#x} wraps", r.gpa, r.size),
                ));
            }
        }
        Ok(())
    }
}

fn check_version(found: u16) -> Result<(), WireError> {
    if (MIN_SUPPORTED_VERSION..=MAX_SUPPORTED_VERSION).contains(&found) {
        Ok(())
    } else {
        Err(WireError::UnsupportedVersion {
            found,
            min: MIN_SUPPORTED_VERSION,
            max: MAX_SUPPORTED_VERSION,
        })
    }
}

/// Destination → source: the Hello is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    /// Protocol version both sides will speak.
    pub version: u16,
    /// Features the destination accepts (⊆ [`FEATURES_KNOWN`]).
    pub features: u64,
}

impl HelloAck {
    /// The ack for `hello` from a destination willing to use `local`
    /// features: the highest common version and the offered features that
    /// are both known and locally enabled. `hello` must have been validated.
    pub fn negotiate(hello: &Hello, local: u64) -> Self {
        Self {
            version: hello.version.min(MAX_SUPPORTED_VERSION),
            features: hello.features & local & FEATURES_KNOWN,
        }
    }

    /// Checks the version range and that no unknown feature is acked.
    pub fn validate(&self) -> Result<(), WireError> {
        check_version(self.version)?;
        let unknown = self.features & !FEATURES_KNOWN;
        if unknown != 0 {
            return Err(invalid(
                MessageKind::HelloAck,
                "features",
                format!("unknown feature bits {unknown:#x}"),
            ));
        }
        Ok(())
    }
}

/// Refusal or abort, either direction. Ends the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail (≤ 4096 UTF-8 bytes).
    pub message: String,
}

impl ErrorMessage {
    /// Builds an error message, cutting `message` at a character boundary
    /// so it fits in [`MAX_ERROR_MESSAGE_LEN`] bytes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut cut = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { code, message }
    }
}

/// End of one pre-copy iteration, source → destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationEnd {
    /// The iteration that ended (0 = full copy).
    pub iteration: u32,
    /// Data pages plus zero pages sent in it, for the receiver's cross-check.
    pub pages: u64,
}

/// Joins a connection to a multi-channel migration (source → destination).
///
/// Sent first on the main connection (index 0) right after `HelloAck`, to
/// announce the channels, then as the first frame of every further
/// connection. `session` ties them together: a connection that names another
/// session, an index out of range or twice, or another count is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelJoin {
    /// Random per migration.
    pub session: u64,
    /// This channel (0 = the main connection).
    pub index: u16,
    /// Channels in all, 2..=[`MAX_CHANNELS`].
    pub count: u16,
}

/// Most channels one migration may use.
pub const MAX_CHANNELS: u16 = 16;

/// One vCPU's state, opaque to the wire layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u32,
    /// Serialized state (≤ 1 MiB).
    pub blob: Vec<u8>,
}

/// VM-wide state (clock, irqchip, ...), opaque to the wire layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    /// Serialized state (≤ 1 MiB, may be empty).
    pub blob: Vec<u8>,
}

/// Source → destination: everything was sent; the guest is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// The source's digest of all guest memory at the pause, if negotiated.
    pub digest: Option<u64>,
    /// Pages of guest RAM (the destination checks it has as many).
    pub total_pages: u64,
}

/// Destination → source: state received and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The destination's own digest of guest memory, if negotiated.
    pub digest: Option<u64>,
}

/// Primary → standby (live clone with checkpoint epochs): serial output
/// and how far the primary let it out (output commit). Inside an epoch,
/// after its `VcpuState`s, it carries bytes `[start, start + data.len())`
/// of the guest's serial stream that the primary holds back until the
/// epoch is acknowledged; between epochs (`data` empty) it only tells how
/// far the primary released. A standby that takes over writes the bytes
/// it holds from `released` on, so nothing is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialOutput {
    /// Offset in the serial stream up to which the primary has written
    /// its output out (everything before it is released).
    pub released: u64,
    /// Offset of `data[0]` in the serial stream.
    pub start: u64,
    /// The held bytes (at most [`MAX_SERIAL_CHUNK`](super::MAX_SERIAL_CHUNK)).
    pub data: Vec<u8>,
}

/// A protocol message: one per frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`ErrorMessage`].
    Error(ErrorMessage),
    /// See [`PageBatch`].
    Pages(PageBatch),
    /// See [`ZeroPages`].
    ZeroPages(ZeroPages),
    /// See [`IterationEnd`].
    IterationEnd(IterationEnd),
    /// See [`VcpuState`].
    VcpuState(VcpuState),
    /// See [`VmState`].
    VmState(VmState),
    /// See [`Complete`].
    Complete(Complete),
    /// See [`Accepted`].
    Accepted(Accepted),
    /// The source will never run the guest again; the destination resumes
    /// only after receiving this.
    Commit,
    /// Destination: the guest was resumed here after `Commit`; only now
    /// does the source know the migration completed.
    Resumed,
    /// Standby (live clone): the verified copy is held here, paused; the
    /// answer to `Commit` when the Hello carried `FEATURE_CLONE`.
    StandbyHeld,
    /// Keep-alive (reserved).
    Heartbeat,
    /// See [`ChannelJoin`].
    ChannelJoin(ChannelJoin),
    /// See [`SerialOutput`].
    SerialOutput(SerialOutput),
    /// See [`CheckedBatch`](super::CheckedBatch).
    CheckedPages(super::CheckedBatch),
}

impl Message {
    /// The kind written in this message's frame header.
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::Hello(_) => MessageKind::Hello,
            Self::HelloAck(_) => MessageKind::HelloAck,
            Self::Error(_) => MessageKind::Error,
            Self::Pages(_) => MessageKind::Pages,
            Self::ZeroPages(_) => MessageKind::ZeroPages,
            Self::IterationEnd(_) => MessageKind::IterationEnd,
            Self::VcpuState(_) => MessageKind::VcpuState,
            Self::VmState(_) => MessageKind::VmState,
            Self::Complete(_) => MessageKind::Complete,
            Self::Accepted(_) => MessageKind::Accepted,
            Self::Commit => MessageKind::Commit,
            Self::Resumed => MessageKind::Resumed,
            Self::ChannelJoin(_) => MessageKind::ChannelJoin,
            Self::StandbyHeld => MessageKind::StandbyHeld,
            Self::Heartbeat => MessageKind::Heartbeat,
            Self::SerialOutput(_) => MessageKind::SerialOutput,
            Self::CheckedPages(_) => MessageKind::CheckedPages,
        }
    }

    /// Checks every field rule a receiver checks; [`write_message`]
    /// calls this so an invalid message is never put on the wire.
    ///
    /// [`write_message`]: super::write_message
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Self::Hello(h) => h.validate(),
            Self::HelloAck(a) => a.validate(),
            Self::Error(e) => {
                if e.message.len() > MAX_ERROR_MESSAGE_LEN {
                    return Err(invalid(
                        MessageKind::Error,
                        "message",
                        format!("{} bytes exceeds {MAX_ERROR_MESSAGE_LEN}", e.message.len()),
                    ));
                }
                Ok(())
            }
            Self::Pages(b) => b.validate(),
            Self::CheckedPages(b) => b.validate(),
            Self::ZeroPages(z) => z.validate(),
            Self::VcpuState(VcpuState { blob, .. }) | Self::VmState(VmState { blob }) => {
                if blob.len() > MAX_BLOB_LEN {
                    return Err(invalid(
                        self.kind(),
                        "blob",
                        format!("{} bytes exceeds {MAX_BLOB_LEN}", blob.len()),
                    ));
                }
                Ok(())
            }
            Self::ChannelJoin(j) => {
                if j.count < 2 || j.count > MAX_CHANNELS || j.index >= j.count {
                    return Err(invalid(
                        self.kind(),
                        "count",
                        format!(
                            "channel {} of {} (2..={MAX_CHANNELS} channels)",
                            j.index, j.count
                        ),
                    ));
                }
                Ok(())
            }
            Self::SerialOutput(o) => {
                if o.data.len() > MAX_SERIAL_CHUNK {
                    return Err(invalid(
                        self.kind(),
                        "data",
                        format!("{} bytes exceeds {MAX_SERIAL_CHUNK}", o.data.len()),
                    ));
                }
                if o.start.checked_add(o.data.len() as u64).is_none() {
                    return Err(invalid(self.kind(), "start", "the range overflows u64"));
                }
                Ok(())
            }
            Self::IterationEnd(_)
            | Self::Complete(_)
            | Self::Accepted(_)
            | Self::Commit
            | Self::Resumed
            | Self::StandbyHeld
            | Self::Heartbeat => Ok(()),
        }
    }
}

/// Appends the payload of `msg` to `out`, except for a large trailing byte
/// slice (page data, state blobs) that is returned instead so the caller can
/// write it without copying. `msg` must have been validated.
pub(super) fn encode_payload<'m>(
    msg: &'m Message,
    out: &mut Vec<u8>,
) -> Result<&'m [u8], WireError> {
    let kind = msg.kind();
    match msg {
        Message::Hello(h) => {
            out.extend_from_slice(&MAGIC);
            out.put_u16(h.version);
            out.put_u64(h.features);
            out.put_u32(h.page_size);
            out.put_u32(h.vcpu_count);
            let len = u16::try_from(h.cpu_model.len())
                .map_err(|_| invalid(kind, "cpu_model", "longer than u16"))?;
            out.put_u16(len);
            out.extend_from_slice(h.cpu_model.as_bytes());
            out.put_u32(len_u32(kind, "regions", h.regions.len(), MAX_REGIONS)?);
            for r in &h.regions {
                out.put_u64(r.gpa);
                out.put_u64(r.size);
            }
        }
        Message::HelloAck(a) => {
            out.put_u16(a.version);
            out.put_u64(a.features);
        }
        Message::Error(e) => {
            out.put_u16(e.code.as_u16());
            let len = u16::try_from(e.message.len())
                .map_err(|_| invalid(kind, "message", "longer than u16"))?;
            out.put_u16(len);
            out.extend_from_slice(e.message.as_bytes());
        }
        Message::Pages(b) => {
            pages::encode_batch_prefix(b.iteration, b.compression, &b.gpas, out)?;
            return Ok(&b.data);
        }
        Message::CheckedPages(_) => {
            // Its CRCs follow the pages: `write_message` writes it itself.
            return Err(invalid(kind, "frame", "written by write_message"));
        }
        Message::ZeroPages(z) => pages::encode_zero_pages(z, out)?,
        Message::IterationEnd(e) => {
            out.put_u32(e.iteration);
            out.put_u64(e.pages);
        }
        Message::VcpuState(v) => {
            out.put_u32(v.index);
            out.put_u32(len_u32(kind, "blob", v.blob.len(), MAX_BLOB_LEN)?);
            return Ok(&v.blob);
        }
        Message::VmState(v) => {
            out.put_u32(len_u32(kind, "blob", v.blob.len(), MAX_BLOB_LEN)?);
            return Ok(&v.blob);
        }
        Message::Complete(c) => {
            put_opt64(out, c.digest);
            out.put_u64(c.total_pages);
        }
        Message::Accepted(a) => put_opt64(out, a.digest),
        Message::ChannelJoin(j) => {
            out.put_u64(j.session);
            out.put_u16(j.index);
            out.put_u16(j.count);
        }
        Message::SerialOutput(o) => {
            out.put_u64(o.released);
            out.put_u64(o.start);
            out.put_u32(len_u32(kind, "data", o.data.len(), MAX_SERIAL_CHUNK)?);
            return Ok(&o.data);
        }
        Message::Commit | Message::Resumed | Message::StandbyHeld | Message::Heartbeat => {}
    }
    Ok(&[])
}

/// Decodes a complete, checksum-verified payload of `kind`.
pub(super) fn decode_payload(kind: MessageKind, payload: &[u8]) -> Result<Message, WireError> {
    let mut d = Decoder::new(kind, payload);
    let msg = match kind {
        MessageKind::Hello => Message::Hello(decode_hello(&mut d)?),
        MessageKind::HelloAck => Message::HelloAck(HelloAck {
            version: d.u16("version")?,
            features: d.u64("features")?,
        }),
        MessageKind::Error => {
            let raw = d.u16("code")?;
            let code = ErrorCode::from_u16(raw)
                .ok_or_else(|| invalid(kind, "code", format!("unknown error code {raw}")))?;
            let message = d.str16("message", MAX_ERROR_MESSAGE_LEN)?;
            Message::Error(ErrorMessage { code, message })
        }
        MessageKind::Pages => Message::Pages(pages::decode_batch(&mut d)?),
        MessageKind::CheckedPages => Message::CheckedPages(super::checked::decode(&mut d)?),
        MessageKind::ZeroPages => Message::ZeroPages(pages::decode_zero_pages(&mut d)?),
        MessageKind::IterationEnd => Message::IterationEnd(IterationEnd {
            iteration: d.u32("iteration")?,
            pages: d.u64("pages")?,
        }),
        MessageKind::VcpuState => Message::VcpuState(VcpuState {
            index: d.u32("index")?,
            blob: d.blob32("blob", MAX_BLOB_LEN)?.to_vec(),
        }),
        MessageKind::VmState => Message::VmState(VmState {
            blob: d.blob32("blob", MAX_BLOB_LEN)?.to_vec(),
        }),
        MessageKind::Complete => Message::Complete(Complete {
            digest: d.opt64("digest")?,
            total_pages: d.u64("total_pages")?,
        }),
        MessageKind::Accepted => Message::Accepted(Accepted {
            digest: d.opt64("digest")?,
        }),
        MessageKind::Commit => Message::Commit,
        MessageKind::Resumed => Message::Resumed,
        MessageKind::ChannelJoin => Message::ChannelJoin(ChannelJoin {
            session: d.u64("session")?,
            index: d.u16("index")?,
            count: d.u16("count")?,
        }),
        MessageKind::StandbyHeld => Message::StandbyHeld,
        MessageKind::Heartbeat => Message::Heartbeat,
        MessageKind::SerialOutput => Message::SerialOutput(SerialOutput {
            released: d.u64("released")?,
            start: d.u64("start")?,
            data: d.blob32("data", MAX_SERIAL_CHUNK)?.to_vec(),
        }),
    };
    d.finish()?;
    msg.validate()?;
    Ok(msg)
}

fn decode_hello(d: &mut Decoder<'_>) -> Result<Hello, WireError> {
    let magic: [u8; 8] = d.array("magic")?;
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let version = d.u16("version")?;
    check_version(version)?;
    let features = d.u64("features")?;
    let page_size = d.u32("page_size")?;
    let vcpu_count = d.u32("vcpu_count")?;
    let cpu_model = d.str16("cpu_model", MAX_CPU_MODEL_LEN)?;
    let count = d.count("regions", MAX_REGIONS, 16)?;
    let mut regions = Vec::with_capacity(count);
    for _ in 0..count {
        regions.push(MemoryRegion {
            gpa: d.u64("regions")?,
            size: d.u64("regions")?,
        });
    }
    Ok(Hello {
        version,
        features,
        page_size,
        vcpu_count,
        cpu_model,
        regions,
    })
}
