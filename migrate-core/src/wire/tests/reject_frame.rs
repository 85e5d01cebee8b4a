//! Refusals at the frame level: header checks, limits, Hello, I/O.

use std::io::{self, Cursor, Read, Write};

use super::*;

#[test]
fn hello_is_checked() {
    let good = payload_of(&Message::Hello(hello()));
    let mut p = good.clone();
    p[0] = b'X';
    let found = *b"XMIGRATE";
    assert!(matches!(read(&frame(1, 0, &p)), Err(WireError::BadMagic { found: f }) if f == found));
    // Version 1 (no `Resumed`) and a future version 3 are both refused.
    for v in [1u16, 3] {
        let mut p = good.clone();
        p[8..10].copy_from_slice(&v.to_le_bytes());
        assert!(matches!(
            read(&frame(1, 0, &p)),
            Err(WireError::UnsupportedVersion {
                found,
                min: 2,
                max: 2
            }) if found == v
        ));
        // An unsupported version is reported even if the rest is unparseable.
        assert!(matches!(
            read(&frame(1, 0, &p[..10])),
            Err(WireError::UnsupportedVersion { found, .. }) if found == v
        ));
    }
    let mut p = good.clone();
    p[8..10].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(
        read(&frame(1, 0, &p)),
        Err(WireError::UnsupportedVersion { found: 0, .. })
    ));
    let mut p = good.clone();
    p.push(0);
    assert!(matches!(
        read(&frame(1, 0, &p)),
        Err(WireError::TrailingBytes {
            kind: MessageKind::Hello,
            extra: 1
        })
    ));
    assert!(matches!(
        read(&frame(1, 0, &good[..good.len() - 1])),
        Err(WireError::InvalidField {
            field: "regions",
            ..
        })
    ));

    for (h, field) in [
        (
            Hello {
                page_size: 3000,
                ..hello()
            },
            "page_size",
        ),
        (
            Hello {
                page_size: 0,
                ..hello()
            },
            "page_size",
        ),
        (
            Hello {
                vcpu_count: 0,
                ..hello()
            },
            "vcpu_count",
        ),
        (
            Hello {
                cpu_model: "x".repeat(257),
                ..hello()
            },
            "cpu_model",
        ),
        (
            Hello {
                regions: vec![MemoryRegion { gpa: 1, size: 4096 }],
                ..hello()
            },
            "regions",
        ),
        (
            Hello {
                regions: vec![MemoryRegion { gpa: 0, size: 0 }],
                ..hello()
            },
            "regions",
        ),
        (
            Hello {
                regions: vec![MemoryRegion {
                    gpa: u64::MAX - 4095,
                    size: 8192,
                }],
                ..hello()
            },
            "regions",
        ),
        (
            Hello {
                regions: vec![MemoryRegion { gpa: 0, size: 4096 }; 257],
                ..hello()
            },
            "regions",
        ),
    ] {
        let msg = Message::Hello(h);
        assert!(
            matches!(write_message(&mut Vec::new(), &msg), Err(WireError::InvalidField { field: f, .. }) if f == field),
            "{field}"
        );
    }
    // Bad UTF-8 in cpu_model.
    let mut p = good.clone();
    p[28] = 0xff;
    assert!(matches!(
        read(&frame(1, 0, &p)),
        Err(WireError::InvalidField {
            field: "cpu_model",
            ..
        })
    ));
    // Region count larger than the payload holds.
    let at = 28 + hello().cpu_model.len();
    let mut p = good;
    p[at..at + 4].copy_from_slice(&200u32.to_le_bytes());
    assert!(matches!(
        read(&frame(1, 0, &p)),
        Err(WireError::InvalidField {
            field: "regions",
            ..
        })
    ));
}

#[test]
fn hello_ack_negotiates_known_features() {
    let ack = HelloAck::negotiate(&hello(), FEATURE_ZSTD);
    assert_eq!(
        ack,
        HelloAck {
            version: PROTOCOL_VERSION,
            features: FEATURE_ZSTD
        }
    );
    let bad = HelloAck {
        version: PROTOCOL_VERSION,
        features: 1 << 6,
    };
    assert!(matches!(
        write_message(&mut Vec::new(), &Message::HelloAck(bad)),
        Err(WireError::InvalidField { .. })
    ));
    let mut p = PROTOCOL_VERSION.to_le_bytes().to_vec();
    p.extend_from_slice(&(1u64 << 6).to_le_bytes());
    assert!(matches!(
        read(&frame(2, 0, &p)),
        Err(WireError::InvalidField {
            kind: MessageKind::HelloAck,
            field: "features",
            ..
        })
    ));
    p[0] = 9;
    assert!(matches!(
        read(&frame(2, 0, &p)),
        Err(WireError::UnsupportedVersion { found: 9, .. })
    ));
}

#[test]
fn header_is_checked_in_order() {
    assert!(matches!(
        read(&frame(99, 0, &[])),
        Err(WireError::UnknownKind(99))
    ));
    assert!(matches!(
        read(&frame(0, 0, &[])),
        Err(WireError::UnknownKind(0))
    ));
    assert!(matches!(
        read(&frame(11, 1, &[])),
        Err(WireError::NonZeroFlags {
            kind: MessageKind::Commit,
            flags: 1
        })
    ));
    assert!(matches!(
        read(&frame(11, 0, &[0])),
        Err(WireError::PayloadTooLarge {
            kind: MessageKind::Commit,
            len: 1,
            max: 0
        })
    ));
    let mut f = frame(99, 1, &[]);
    f[12] ^= 1;
    assert!(matches!(read(&f), Err(WireError::HeaderChecksum { .. })));
    let mut f = frame(11, 0, &[]);
    f[0] ^= 0x80;
    assert!(matches!(read(&f), Err(WireError::HeaderChecksum { .. })));

    let p = payload_of(&Message::IterationEnd(IterationEnd {
        iteration: 1,
        pages: 2,
    }));
    let mut f = frame(6, 0, &p);
    f[HEADER_LEN + 5] ^= 1;
    assert!(matches!(
        read(&f),
        Err(WireError::PayloadChecksum {
            kind: MessageKind::IterationEnd,
            ..
        })
    ));
}

/// Counts the bytes a reader hands out.
struct Counting<R> {
    inner: R,
    read: usize,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

#[test]
fn oversized_len_is_refused_before_reading() {
    let mut f = frame(4, 0, &[]);
    f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32fast::hash(&f[..12]);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(&[0; 64]);
    let mut r = Counting {
        inner: Cursor::new(&f),
        read: 0,
    };
    let e = read_message(&mut r, &Limits::default());
    assert!(
        matches!(e, Err(WireError::PayloadTooLarge { kind: MessageKind::Pages, len, max: 4_202_505 }) if len == u64::from(u32::MAX))
    );
    assert_eq!(r.read, HEADER_LEN);

    // A stricter limit applies to every kind.
    let limits = Limits { max_payload: 1000 };
    let mut buf = Vec::new();
    write_message(&mut buf, &Message::Pages(raw_batch(0, 1))).unwrap();
    assert!(matches!(
        read_message(&mut Cursor::new(&buf), &limits),
        Err(WireError::PayloadTooLarge { max: 1000, .. })
    ));
    assert_eq!(limits.cap(MessageKind::HelloAck), 10);
}

/// Fails or interrupts on demand.
struct Flaky {
    data: Cursor<Vec<u8>>,
    interrupt: bool,
    fail_after: u64,
}

impl Read for Flaky {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if self.data.position() >= self.fail_after {
            return Err(io::Error::other("boom"));
        }
        let n = buf.len().min(3);
        self.data.read(&mut buf[..n])
    }
}

impl Write for Flaky {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn io_errors_are_reported() {
    let mut buf = Vec::new();
    let msg = Message::Pages(raw_batch(0, 2));
    write_message(&mut buf, &msg).unwrap();
    let mut r = Flaky {
        data: Cursor::new(buf.clone()),
        interrupt: false,
        fail_after: u64::MAX,
    };
    assert_eq!(read_message(&mut r, &Limits::default()).unwrap(), msg);
    assert!(matches!(
        read_message(&mut r, &Limits::default()),
        Err(WireError::ConnectionClosed)
    ));
    let mut r = Flaky {
        data: Cursor::new(buf),
        interrupt: false,
        fail_after: 100,
    };
    let e = read_message(&mut r, &Limits::default()).unwrap_err();
    assert!(matches!(e, WireError::Io { .. }));
    assert_eq!(std::error::Error::source(&e).unwrap().to_string(), "boom");
    let mut w = Flaky {
        data: Cursor::new(vec![]),
        interrupt: false,
        fail_after: 0,
    };
    assert!(matches!(
        write_message(&mut w, &Message::Commit),
        Err(WireError::Io { .. })
    ));
}

#[test]
fn errors_display_context() {
    let e = WireError::PayloadTooLarge {
        kind: MessageKind::Pages,
        len: 9,
        max: 8,
    };
    assert_eq!(
        e.to_string(),
        "Pages payload of 9 bytes exceeds the limit of 8 bytes"
    );
    let e = WireError::Truncated {
        kind: None,
        expected: 16,
        received: 3,
    };
    assert_eq!(
        e.to_string(),
        "stream ended inside a frame header: got 3 of 16 bytes"
    );
    let e = WireError::Truncated {
        kind: Some(MessageKind::VmState),
        expected: 16,
        received: 3,
    };
    assert!(e.to_string().contains("VmState payload"));
    assert_eq!(MessageKind::IterationEnd.to_string(), "IterationEnd");
}
