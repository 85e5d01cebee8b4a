//! Truncation at every offset and deterministic garbage fuzzing.

use std::io::Cursor;

use super::*;
use super::{frame, samples};

/// Deterministic xorshift64 generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// Encodes `msgs` as one stream; returns it and each frame's end offset.
fn stream(msgs: &[Message]) -> (Vec<u8>, Vec<usize>) {
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    for m in msgs {
        write_message(&mut buf, m).unwrap();
        ends.push(buf.len());
    }
    (buf, ends)
}

/// Reads messages until the first error (at most 64).
fn read_all(bytes: &[u8], limits: &Limits) -> (Vec<Message>, WireError) {
    let mut cur = Cursor::new(bytes);
    let mut out = Vec::new();
    for _ in 0..64 {
        match read_message(&mut cur, limits) {
            Ok(m) => out.push(m),
            Err(e) => return (out, e),
        }
    }
    panic!("64 messages from {} bytes", bytes.len());
}

#[test]
fn truncation_at_every_offset() {
    let msgs = samples();
    let (buf, ends) = stream(&msgs);
    let limits = Limits::default();
    for cut in 0..=buf.len() {
        let (got, err) = read_all(&buf[..cut], &limits);
        let complete = ends.iter().filter(|&&e| e <= cut).count();
        assert_eq!(got.len(), complete, "cut at {cut}");
        assert_eq!(got.as_slice(), &msgs[..complete]);
        if cut == 0 || ends.contains(&cut) {
            assert!(
                matches!(err, WireError::ConnectionClosed),
                "cut at {cut}: {err}"
            );
        } else {
            let start = if complete == 0 { 0 } else { ends[complete - 1] };
            let inside = (cut - start) as u64;
            match err {
                WireError::Truncated {
                    kind: None,
                    expected: 16,
                    received,
                } => {
                    assert!(inside < 16, "cut at {cut}");
                    assert_eq!(received, inside);
                }
                WireError::Truncated {
                    kind: Some(kind),
                    expected,
                    received,
                } => {
                    assert_eq!(kind, msgs[complete].kind(), "cut at {cut}");
                    assert_eq!(received + 16, inside);
                    assert_eq!(expected + 16, (ends[complete] - start) as u64);
                }
                other => panic!("cut at {cut}: unexpected {other}"),
            }
        }
    }
}

#[test]
fn single_bit_flips_are_always_caught() {
    let (buf, ends) = stream(&samples());
    let limits = Limits::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut start = 0;
    for &end in &ends {
        let frame_bytes = &buf[start..end];
        for _ in 0..300 {
            let mut f = frame_bytes.to_vec();
            let bit = rng.below(f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            let res = read_message(&mut Cursor::new(&f), &limits);
            if bit / 8 < HEADER_LEN {
                assert!(
                    matches!(res, Err(WireError::HeaderChecksum { .. })),
                    "bit {bit}: {res:?}"
                );
            } else if let Ok(Message::CheckedPages(b)) = &res {
                // A flip in a page's data: the frame (its prefix) is sound
                // and exactly that page fails its own CRC.
                let torn: Vec<usize> = (0..b.gpas.len()).filter(|&i| !b.page_intact(i)).collect();
                assert_eq!(torn.len(), 1, "bit {bit}: {torn:?}");
            } else {
                assert!(
                    matches!(res, Err(WireError::PayloadChecksum { .. })),
                    "bit {bit}: {}",
                    format!("{res:?}").chars().take(300).collect::<String>()
                );
            }
        }
        start = end;
    }
}

#[test]
fn random_garbage_never_panics() {
    let limits = Limits::default();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for _ in 0..3000 {
        let len = rng.below(300);
        let bytes = rng.bytes(len);
        let _ = read_all(&bytes, &limits);
    }
    // Multi-bit corruption of a valid stream.
    let (buf, _) = stream(&samples());
    for _ in 0..500 {
        let mut b = buf.clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(b.len());
            b[at] = rng.byte();
        }
        let _ = read_all(&b, &limits);
    }
}

/// Payloads that pass the checksums reach the decoders: random and mutated
/// payloads must never panic, and whatever decodes must re-encode to the
/// very same bytes (the encoding is canonical).
#[test]
fn checksummed_garbage_decodes_canonically_or_fails() {
    let limits = Limits::default();
    let mut rng = Rng(0xfeed_face_cafe_beef);
    let seeds: Vec<(u16, Vec<u8>)> = samples()
        .iter()
        .map(|m| {
            let mut b = Vec::new();
            write_message(&mut b, m).unwrap();
            (m.kind().as_u16(), b.split_off(HEADER_LEN))
        })
        .collect();
    let mut accepted = 0;
    for round in 0..6000 {
        let (kind, payload) = if round % 3 == 0 {
            let kind = u16::try_from(rng.below(14)).unwrap();
            let len = rng.below(64);
            (kind, rng.bytes(len))
        } else {
            let (kind, seed) = &seeds[rng.below(seeds.len())];
            let mut p = seed.clone();
            for _ in 0..1 + rng.below(3) {
                match rng.below(4) {
                    _ if p.is_empty() => p.push(rng.byte()),
                    0 => p.truncate(rng.below(p.len())),
                    1 => p.push(rng.byte()),
                    _ => {
                        let at = rng.below(p.len());
                        p[at] = rng.byte();
                    }
                }
            }
            (*kind, p)
        };
        let f = frame(kind, 0, &payload);
        if let Ok(msg) = read_message(&mut Cursor::new(&f), &limits) {
            accepted += 1;
            let mut again = Vec::new();
            write_message(&mut again, &msg).expect("a decoded message re-encodes");
            assert_eq!(again, f, "{msg:?}");
        }
    }
    assert!(accepted > 100, "only {accepted} mutants decoded");
}
