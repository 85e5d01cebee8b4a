//! Round trips of every message kind, edge sizes and helpers.

use super::*;

#[test]
fn every_kind_round_trips() {
    let samples = samples();
    for msg in &samples {
        roundtrip(msg);
    }
    for kind in MessageKind::ALL {
        assert!(
            samples.iter().any(|m| m.kind() == kind),
            "no sample of {kind}"
        );
        assert_eq!(MessageKind::from_u16(kind.as_u16()), Some(kind));
        assert!(kind.max_payload_len() <= Limits::default().max_payload);
    }
    // A whole stream reads back in order.
    let mut buf = Vec::new();
    for msg in &samples {
        write_message(&mut buf, msg).unwrap();
    }
    let mut cur = Cursor::new(&buf);
    for msg in &samples {
        assert_eq!(&read_message(&mut cur, &Limits::default()).unwrap(), msg);
    }
    assert!(matches!(
        read_message(&mut cur, &Limits::default()),
        Err(WireError::ConnectionClosed)
    ));
}

#[test]
fn edge_sizes_round_trip() {
    roundtrip(&Message::Pages(raw_batch(0, 1)));
    let full = raw_batch(9, MAX_BATCH_PAGES);
    let mut buf = Vec::new();
    let n = write_message(&mut buf, &Message::Pages(full.clone())).unwrap();
    assert_eq!(
        n,
        HEADER_LEN as u64 + u64::from(MessageKind::Pages.max_payload_len())
    );
    roundtrip(&Message::Pages(full.clone()));
    let z = full.compress(1).unwrap();
    assert_eq!(z.compression, Compression::Zstd);
    roundtrip(&Message::Pages(z));

    let full = raw_batch(9, MAX_BATCH_PAGES);
    let checked = CheckedBatch::new(9, full.gpas, full.data).unwrap();
    let mut buf = Vec::new();
    let n = write_message(&mut buf, &Message::CheckedPages(checked.clone())).unwrap();
    assert_eq!(
        n,
        HEADER_LEN as u64 + u64::from(MessageKind::CheckedPages.max_payload_len())
    );
    roundtrip(&Message::CheckedPages(checked));

    roundtrip(&Message::ZeroPages(ZeroPages::new(4)));
    let ranges = (0..MAX_ZERO_RANGES as u64)
        .map(|i| ZeroRange {
            gpa: i * 2 * PAGE_SIZE_U64,
            pages: 1,
        })
        .collect();
    roundtrip(&Message::ZeroPages(ZeroPages {
        iteration: 1,
        ranges,
    }));
    let last = ZeroRange {
        gpa: u64::MAX - 3 * PAGE_SIZE_U64 + 1,
        pages: 2,
    }; // ends at 2^64 - 4096
    roundtrip(&Message::ZeroPages(ZeroPages {
        iteration: 1,
        ranges: vec![last],
    }));

    roundtrip(&Message::VcpuState(VcpuState {
        index: u32::MAX,
        blob: vec![],
    }));
    roundtrip(&Message::VcpuState(VcpuState {
        index: 0,
        blob: vec![7; MAX_BLOB_LEN],
    }));
    roundtrip(&Message::VmState(VmState { blob: vec![] }));
    roundtrip(&Message::VmState(VmState {
        blob: vec![1; MAX_BLOB_LEN],
    }));

    let mut h = hello();
    h.cpu_model = "é".repeat(MAX_CPU_MODEL_LEN / 2);
    h.regions = (0..MAX_REGIONS as u64)
        .map(|i| MemoryRegion {
            gpa: i << 32,
            size: PAGE_SIZE_U64,
        })
        .collect();
    h.features = u64::MAX;
    roundtrip(&Message::Hello(h));
    let mut h = hello();
    h.cpu_model.clear();
    h.regions.clear();
    roundtrip(&Message::Hello(h));

    let e = ErrorMessage::new(ErrorCode::Timeout, "ü".repeat(MAX_ERROR_MESSAGE_LEN));
    assert_eq!(e.message.len(), MAX_ERROR_MESSAGE_LEN);
    roundtrip(&Message::Error(e));
    let e = ErrorMessage::new(
        ErrorCode::Internal,
        "x".repeat(MAX_ERROR_MESSAGE_LEN - 1) + "ü",
    );
    assert_eq!(e.message.len(), MAX_ERROR_MESSAGE_LEN - 1);
    for code in ErrorCode::ALL {
        roundtrip(&Message::Error(ErrorMessage::new(code, code.to_string())));
    }
    roundtrip(&Message::Complete(Complete {
        digest: None,
        total_pages: 0,
    }));
    roundtrip(&Message::Accepted(Accepted { digest: Some(0) }));
}

#[test]
fn compression_and_page_access() {
    let raw = raw_batch(2, 16);
    let z = raw.clone().compress(3).unwrap();
    assert_eq!(z.compression, Compression::Zstd);
    assert!(z.data.len() < raw.data.len());
    let mut out = vec![1, 2, 3];
    z.decompress_into(&mut out).unwrap();
    assert_eq!(out, raw.data);
    let mut scratch = Vec::new();
    let pages: Vec<_> = z
        .pages(&mut scratch)
        .unwrap()
        .map(|(g, p)| (g, p.to_vec()))
        .collect();
    assert_eq!(pages.len(), 16);
    for (i, (gpa, page)) in pages.iter().enumerate() {
        assert_eq!(*gpa, raw.gpas[i]);
        assert_eq!(
            page.as_slice(),
            &raw.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
        );
    }
    // Compressing twice is a no-op; raw access works without scratch use.
    assert_eq!(z.clone().compress(3).unwrap(), z);
    assert_eq!(raw.pages(&mut Vec::new()).unwrap().count(), 16);

    // Incompressible data stays raw.
    let mut x = 0x1234_5678_9abc_def0_u64;
    let noise: Vec<u8> = (0..2 * PAGE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let b = PageBatch::raw(0, vec![0, 4096], noise).unwrap();
    assert_eq!(b.clone().compress(19).unwrap(), b);
}

#[test]
fn raw_pages_from_slices_match_write_message() {
    let batch = raw_batch(5, 3);
    let slices: Vec<&[u8]> = batch.data.chunks(PAGE_SIZE).collect();
    let mut a = Vec::new();
    let n = write_raw_pages(&mut a, 5, &batch.gpas, &slices).unwrap();
    assert_eq!(n, a.len() as u64);
    assert_eq!(a, {
        let mut b = Vec::new();
        write_message(&mut b, &Message::Pages(batch.clone())).unwrap();
        b
    });
    let bad = [&batch.data[..100]];
    assert!(matches!(
        write_raw_pages(&mut a, 0, &[0], &bad),
        Err(WireError::InvalidField { .. })
    ));
    assert!(matches!(
        write_raw_pages(&mut a, 0, &[0, 4096], &slices[..1]),
        Err(WireError::InvalidField { .. })
    ));
    assert!(matches!(
        write_raw_pages(&mut a, 0, &[], &[]),
        Err(WireError::InvalidField { .. })
    ));
    assert!(matches!(
        write_raw_pages(&mut a, 0, &[1], &slices[..1]),
        Err(WireError::InvalidField { .. })
    ));
}

#[test]
fn zero_pages_coalesce() {
    let mut z = ZeroPages::new(0);
    for gpa in [0, 4096, 8192, 20480, 24576, 0] {
        z.push_page(gpa);
    }
    assert_eq!(
        z.ranges,
        vec![
            ZeroRange { gpa: 0, pages: 3 },
            ZeroRange {
                gpa: 20480,
                pages: 2
            },
            ZeroRange { gpa: 0, pages: 1 }
        ]
    );
    assert_eq!(z.page_count(), 6);
}

#[test]
fn types_cross_threads() {
    fn check<T: Send + Sync + 'static>() {}
    check::<WireError>();
    check::<Message>();
    check::<Limits>();
}

/// A writer that takes at most 7 bytes per call, vectored or not: frames
/// must still arrive whole, in order.
struct Trickle(Vec<u8>);

impl std::io::Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(7);
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let mut left = 7;
        for b in bufs {
            let n = b.len().min(left);
            self.0.extend_from_slice(&b[..n]);
            left -= n;
            if left == 0 {
                break;
            }
        }
        Ok(7 - left)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn short_vectored_writes_still_frame_whole_messages() {
    let batch = raw_batch(2, 4);
    let slices: Vec<&[u8]> = batch.data.chunks(PAGE_SIZE).collect();
    let mut t = Trickle(Vec::new());
    write_raw_pages(&mut t, 2, &batch.gpas, &slices).unwrap();
    write_message(&mut t, &Message::Pages(batch.clone())).unwrap();
    let mut r = t.0.as_slice();
    for _ in 0..2 {
        assert_eq!(
            read_message(&mut r, &Limits::default()).unwrap(),
            Message::Pages(batch.clone())
        );
    }
    assert!(r.is_empty());
}

#[test]
fn read_into_reuses_the_spare_buffer_and_still_checks() {
    let batch = raw_batch(1, 8);
    let mut stream = Vec::new();
    for _ in 0..3 {
        write_message(&mut stream, &Message::Pages(batch.clone())).unwrap();
    }
    let mut r = stream.as_slice();
    let mut spare = Vec::new();
    let mut last_ptr = None;
    for _ in 0..3 {
        let Message::Pages(got) =
            read_message_into(&mut r, &Limits::default(), &mut spare).unwrap()
        else {
            panic!("not a batch");
        };
        assert_eq!(got, batch);
        if let Some(p) = last_ptr {
            assert_eq!(got.data.as_ptr(), p, "the buffer handed back was reused");
        }
        last_ptr = Some(got.data.as_ptr());
        spare = got.data;
    }
    // A reused buffer does not weaken the checksum: flip one page byte.
    let mut bad = Vec::new();
    write_message(&mut bad, &Message::Pages(batch.clone())).unwrap();
    let at = bad.len() - 10;
    bad[at] ^= 1;
    assert!(matches!(
        read_message_into(&mut bad.as_slice(), &Limits::default(), &mut spare),
        Err(WireError::PayloadChecksum { .. })
    ));
}
