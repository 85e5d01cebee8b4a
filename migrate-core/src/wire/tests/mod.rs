//! Wire tests: shared helpers here, the cases in the submodules.

use std::io::Cursor;

use super::*;

mod fuzz;
mod reject_frame;
mod reject_payload;
mod roundtrip;

/// Writes `msg`, reads it back, checks it is identical and that the stream
/// then reports a clean close.
pub(super) fn roundtrip(msg: &Message) -> Message {
    let mut buf = Vec::new();
    let n = write_message(&mut buf, msg).expect("write");
    assert_eq!(n, buf.len() as u64);
    let mut cur = Cursor::new(&buf);
    let back = read_message(&mut cur, &Limits::default()).expect("read");
    assert_eq!(&back, msg);
    assert!(matches!(
        read_message(&mut cur, &Limits::default()),
        Err(WireError::ConnectionClosed)
    ));
    back
}

/// A frame with correct checksums around an arbitrary payload.
pub(super) fn frame(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hcrc = crc32fast::hash(&out);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a frame produced by [`write_message`].
pub(super) fn payload_of(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    write_message(&mut buf, msg).unwrap();
    buf.split_off(HEADER_LEN)
}

pub(super) fn read(bytes: &[u8]) -> Result<Message, WireError> {
    read_message(&mut Cursor::new(bytes), &Limits::default())
}

pub(super) fn hello() -> Hello {
    Hello::new(
        FEATURE_ZSTD | FEATURE_MEMORY_DIGEST | 1 << 40,
        4,
        "vmigrate-x86_64",
        vec![
            MemoryRegion {
                gpa: 0,
                size: 0xa_0000,
            },
            MemoryRegion {
                gpa: 0x10_0000,
                size: 0x3ff0_0000,
            },
        ],
    )
}

/// `n` pages of compressible, page-distinct content.
pub(super) fn page_data(n: usize) -> Vec<u8> {
    (0..n * PAGE_SIZE)
        .map(|i| (i / PAGE_SIZE).to_le_bytes()[0] ^ (i % 64).to_le_bytes()[0])
        .collect()
}

pub(super) fn raw_batch(iteration: u32, n: usize) -> PageBatch {
    let gpas = (0..n as u64)
        .map(|i| 0x10_0000 + i * 2 * PAGE_SIZE_U64)
        .collect();
    PageBatch::raw(iteration, gpas, page_data(n)).unwrap()
}

/// One message of every kind.
pub(super) fn samples() -> Vec<Message> {
    vec![
        Message::Hello(hello()),
        Message::HelloAck(HelloAck::negotiate(&hello(), FEATURES_KNOWN)),
        Message::Error(ErrorMessage::new(
            ErrorCode::LayoutMismatch,
            "region 1 differs",
        )),
        Message::Pages(raw_batch(0, 2)),
        Message::Pages(raw_batch(1, 3).compress(3).unwrap()),
        Message::CheckedPages({
            let b = raw_batch(2, 2);
            CheckedBatch::new(b.iteration, b.gpas, b.data).unwrap()
        }),
        Message::ZeroPages(ZeroPages {
            iteration: 0,
            ranges: vec![
                ZeroRange {
                    gpa: 0x2000,
                    pages: 3,
                },
                ZeroRange {
                    gpa: 0x10_0000,
                    pages: 1,
                },
            ],
        }),
        Message::IterationEnd(IterationEnd {
            iteration: 7,
            pages: 123_456,
        }),
        Message::VcpuState(VcpuState {
            index: 3,
            blob: vec![0xab; 777],
        }),
        Message::VmState(VmState {
            blob: b"clock".to_vec(),
        }),
        Message::Complete(Complete {
            digest: Some(0xdead_beef_f00d),
            total_pages: 262_144,
        }),
        Message::Accepted(Accepted { digest: None }),
        Message::Commit,
        Message::Resumed,
        Message::StandbyHeld,
        Message::Heartbeat,
        Message::ChannelJoin(ChannelJoin {
            session: 0x0123_4567_89ab_cdef,
            index: 2,
            count: 4,
        }),
        Message::SerialOutput(SerialOutput {
            released: 100,
            start: 120,
            data: b"..0a1b".to_vec(),
        }),
        Message::SerialOutput(SerialOutput {
            released: 126,
            start: 126,
            data: Vec::new(),
        }),
    ]
}
