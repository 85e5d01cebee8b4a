//! Refusals of malformed payloads: pages, zstd, other messages.

use super::*;

#[test]
fn page_batches_are_checked() {
    let good = raw_batch(0, 2);
    let unaligned = PageBatch {
        gpas: vec![0x1000, 0x1001],
        ..good.clone()
    };
    assert!(matches!(
        unaligned.validate(),
        Err(WireError::InvalidField { field: "gpas", .. })
    ));
    assert!(matches!(
        write_message(&mut Vec::new(), &Message::Pages(unaligned)),
        Err(WireError::InvalidField { .. })
    ));
    let mut p = payload_of(&Message::Pages(good.clone()));
    p[9] = 1; // first gpa becomes 0x10_0001
    assert!(matches!(
        read(&frame(4, 0, &p)),
        Err(WireError::InvalidField { field: "gpas", .. })
    ));

    let p = payload_of(&Message::Pages(good.clone()));
    let mut q = p.clone();
    q[4] = 2;
    assert!(matches!(
        read(&frame(4, 0, &q)),
        Err(WireError::InvalidField {
            field: "compression",
            ..
        })
    ));
    let mut q = p.clone();
    q.push(0);
    assert!(matches!(
        read(&frame(4, 0, &q)),
        Err(WireError::InvalidField { field: "data", .. })
    ));
    assert!(matches!(
        read(&frame(4, 0, &p[..p.len() - 1])),
        Err(WireError::InvalidField { field: "data", .. })
    ));
    for count in [0u32, 3000, u32::MAX] {
        let mut q = p.clone();
        q[5..9].copy_from_slice(&count.to_le_bytes());
        assert!(
            matches!(
                read(&frame(4, 0, &q)),
                Err(WireError::InvalidField { field: "gpas", .. })
            ),
            "{count}"
        );
        // With a bad checksum the checksum error wins.
        let mut f = frame(4, 0, &q);
        f[8] ^= 1;
        let crc = crc32fast::hash(&f[..12]);
        f[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(read(&f), Err(WireError::PayloadChecksum { .. })));
    }
    assert!(matches!(
        read(&frame(4, 0, &p[..4])),
        Err(WireError::InvalidField {
            field: "compression",
            ..
        })
    ));
    assert!(matches!(
        read(&frame(4, 0, &[])),
        Err(WireError::InvalidField {
            field: "iteration",
            ..
        })
    ));
    assert!(PageBatch::raw(
        0,
        vec![0; MAX_BATCH_PAGES + 1],
        vec![0; (MAX_BATCH_PAGES + 1) * PAGE_SIZE]
    )
    .is_err());
}

#[test]
fn zstd_batches_are_checked() {
    let three = raw_batch(0, 3);
    let z = three.clone().compress(3).unwrap();

    // Declared content size disagrees with the gpa count.
    let wrong = PageBatch {
        gpas: vec![0, 4096, 8192, 12288],
        ..z.clone()
    };
    assert!(matches!(
        wrong.validate(),
        Err(WireError::InvalidField { field: "data", .. })
    ));
    let mut p = payload_of(&Message::Pages(z.clone()));
    p[5] = 2; // count 3 -> 2, drop a gpa: data now runs into the gpa slot
    p.drain(9..17);
    assert!(matches!(
        read(&frame(4, 0, &p)),
        Err(WireError::InvalidField { field: "data", .. })
    ));

    // Without a declared size, decompression catches both directions.
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.include_contentsize(false).unwrap();
    let data = c.compress(&three.data).unwrap();
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&data).unwrap(),
        None
    );
    let too_few = PageBatch {
        iteration: 0,
        compression: Compression::Zstd,
        gpas: vec![0, 4096, 8192, 12288],
        data: data.clone(),
    };
    too_few.validate().unwrap();
    let back = roundtrip(&Message::Pages(too_few.clone()));
    assert_eq!(back, Message::Pages(too_few.clone()));
    let mut out = Vec::new();
    assert!(matches!(
        too_few.decompress_into(&mut out),
        Err(WireError::DecompressedSize {
            expected: 16384,
            found: 12288
        })
    ));
    let too_many = PageBatch {
        gpas: vec![0, 4096],
        ..too_few.clone()
    };
    assert!(matches!(
        too_many.decompress_into(&mut Vec::new()),
        Err(WireError::Decompress { expected: 8192, .. })
    ));
    let mut big = vec![0u8; 1 << 20];
    let exact = PageBatch {
        gpas: vec![0, 4096, 8192],
        ..too_few
    };
    exact.decompress_into(&mut big).unwrap();
    assert_eq!(big, three.data);

    // Garbage.
    let garbage = PageBatch {
        data: b"definitely not zstd".to_vec(),
        ..z.clone()
    };
    assert!(matches!(
        garbage.validate(),
        Err(WireError::InvalidField { field: "data", .. })
    ));
    assert!(matches!(
        garbage.decompress_into(&mut out),
        Err(WireError::Decompress { .. })
    ));
    let mut corrupt = z.clone();
    let mid = corrupt.data.len() / 2;
    for b in &mut corrupt.data[mid..] {
        *b = !*b;
    }
    assert!(corrupt.decompress_into(&mut out).is_err() || out.len() == 3 * PAGE_SIZE);
    // Trailing bytes after the frame, or data no smaller than raw.
    let mut trailing = z.clone();
    trailing.data.push(0);
    assert!(matches!(
        trailing.validate(),
        Err(WireError::InvalidField { field: "data", .. })
    ));
    let fat = PageBatch {
        compression: Compression::Zstd,
        ..three
    };
    assert!(matches!(
        fat.validate(),
        Err(WireError::InvalidField { field: "data", .. })
    ));
}

#[test]
fn other_payloads_are_checked() {
    assert!(matches!(
        read(&frame(3, 0, &[99, 0, 0, 0])),
        Err(WireError::InvalidField {
            kind: MessageKind::Error,
            field: "code",
            ..
        })
    ));
    assert!(matches!(
        read(&frame(3, 0, &[0, 0, 0, 0])),
        Err(WireError::InvalidField { field: "code", .. })
    ));
    assert!(matches!(
        read(&frame(3, 0, &[1, 0, 1, 0, b'x', b'y'])),
        Err(WireError::TrailingBytes {
            kind: MessageKind::Error,
            extra: 1
        })
    ));
    assert!(matches!(
        read(&frame(3, 0, &[1, 0, 5, 0, b'x'])),
        Err(WireError::InvalidField {
            field: "message",
            ..
        })
    ));
    let long = ErrorMessage {
        code: ErrorCode::Internal,
        message: "x".repeat(MAX_ERROR_MESSAGE_LEN + 1),
    };
    assert!(matches!(
        write_message(&mut Vec::new(), &Message::Error(long)),
        Err(WireError::InvalidField { .. })
    ));

    let mut p = vec![2];
    p.extend_from_slice(&[0; 8]);
    assert!(matches!(
        read(&frame(10, 0, &p)),
        Err(WireError::InvalidField {
            field: "digest",
            ..
        })
    ));
    p[0] = 0;
    p[1] = 1;
    assert!(matches!(
        read(&frame(10, 0, &p)),
        Err(WireError::InvalidField {
            field: "digest",
            ..
        })
    ));
    assert!(matches!(
        read(&frame(10, 0, &p[..8])),
        Err(WireError::InvalidField {
            field: "digest",
            ..
        })
    ));

    for r in [
        ZeroRange { gpa: 5, pages: 1 },
        ZeroRange { gpa: 0, pages: 0 },
        ZeroRange {
            gpa: u64::MAX - 4095,
            pages: 2,
        },
        ZeroRange {
            gpa: 0,
            pages: u64::MAX,
        },
    ] {
        let z = ZeroPages {
            iteration: 0,
            ranges: vec![r],
        };
        assert!(
            matches!(
                z.validate(),
                Err(WireError::InvalidField {
                    kind: MessageKind::ZeroPages,
                    ..
                })
            ),
            "{r:?}"
        );
        let mut p = payload_of(&Message::ZeroPages(ZeroPages::new(0)));
        p[4] = 1;
        p.extend_from_slice(&r.gpa.to_le_bytes());
        p.extend_from_slice(&r.pages.to_le_bytes());
        assert!(matches!(
            read(&frame(5, 0, &p)),
            Err(WireError::InvalidField { .. })
        ));
    }
    let mut p = vec![0; 8];
    p[4..8].copy_from_slice(&70_000u32.to_le_bytes());
    assert!(matches!(
        read(&frame(5, 0, &p)),
        Err(WireError::InvalidField {
            field: "ranges",
            ..
        })
    ));

    let too_big = VcpuState {
        index: 0,
        blob: vec![0; MAX_BLOB_LEN + 1],
    };
    assert!(matches!(
        write_message(&mut Vec::new(), &Message::VcpuState(too_big)),
        Err(WireError::InvalidField { .. })
    ));
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(&(u32::try_from(MAX_BLOB_LEN).unwrap() + 1).to_le_bytes());
    assert!(matches!(
        read(&frame(7, 0, &p)),
        Err(WireError::InvalidField { field: "blob", .. })
    ));
    assert!(matches!(
        read(&frame(8, 0, &[1, 0, 0, 0])),
        Err(WireError::InvalidField { field: "blob", .. })
    ));
    assert!(matches!(
        read(&frame(8, 0, &[0, 0, 0, 0, 9])),
        Err(WireError::TrailingBytes {
            kind: MessageKind::VmState,
            extra: 1
        })
    ));
}
