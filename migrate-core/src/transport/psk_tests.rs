//! The handshake over real Unix socket pairs, no KVM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use super::*;
use crate::wire::{read_message, Hello, Limits};

fn key(b: u8) -> Psk {
    Psk::from_bytes(vec![b; 32]).unwrap()
}

fn pair() -> (Stream, Stream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (Stream::Unix(a), Stream::Unix(b))
}

#[test]
fn same_key_authenticates_both_ends_and_carries_data() {
    let (a, b) = pair();
    let dest = thread::spawn(move || {
        let mut s = accept(b, &key(1)).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"world").unwrap();
        buf
    });
    let mut s = connect(a, &key(1)).unwrap();
    s.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    assert_eq!(&dest.join().unwrap(), b"hello");
}

#[test]
fn a_different_key_is_refused_on_both_ends() {
    let (a, b) = pair();
    let dest = thread::spawn(move || accept(b, &key(1)).unwrap_err());
    let src = connect(a, &key(2)).unwrap_err();
    assert!(matches!(src, ChannelError::RefusedByDestination), "{src}");
    let dst = dest.join().unwrap();
    assert!(matches!(dst, ChannelError::SourceProofWrong), "{dst}");
}

#[test]
fn a_plaintext_source_is_refused_and_told_why() {
    let (mut a, b) = pair();
    let dest = thread::spawn(move || accept(b, &key(1)).unwrap_err());
    let hello = Hello::new(0, 1, "cpu", vec![]);
    crate::wire::write_message(&mut a, &Message::Hello(hello)).unwrap();
    // The plaintext source reads an Error frame in its own protocol.
    match read_message(&mut a, &Limits::default()).unwrap() {
        Message::Error(e) => assert!(e.message.contains("--psk-file"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    drop(a);
    let e = dest.join().unwrap();
    assert!(
        matches!(&e, ChannelError::NotSecurePeer { peer: "source", seen, .. } if seen.contains("Hello")),
        "{e}"
    );
}

#[test]
fn a_plaintext_destination_is_detected() {
    let (a, mut b) = pair();
    let dest = thread::spawn(move || {
        // What a plaintext destination answers to garbage: an Error frame.
        let mut buf = [0u8; MAGIC.len() + NONCE_LEN];
        b.read_exact(&mut buf).unwrap();
        let msg = ErrorMessage::new(ErrorCode::ProtocolViolation, "bad header");
        write_message(&mut b, &Message::Error(msg)).unwrap();
    });
    let e = connect(a, &key(1)).unwrap_err();
    assert!(
        matches!(
            &e,
            ChannelError::NotSecurePeer {
                peer: "destination",
                ..
            }
        ),
        "{e}"
    );
    dest.join().unwrap();
}

/// A fake destination that knows no key: it replays a proof captured from
/// another session, or reflects the source's own proof back to it.
#[test]
fn replayed_and_reflected_proofs_fail() {
    // Capture a genuine destination proof from session 1.
    let (a, mut b) = pair();
    let genuine = thread::spawn(move || accept(a, &key(1)).map(|_| ()));
    let nc = [5u8; NONCE_LEN];
    b.write_all(&MAGIC).unwrap();
    b.write_all(&nc).unwrap();
    let mut ns = [0u8; MAGIC.len() + NONCE_LEN];
    b.read_exact(&mut ns).unwrap();
    let keys = derive(&key(1), &nc, ns[MAGIC.len()..].try_into().unwrap());
    let proof = proof_mac(&keys.auth, b"source", &nc, &ns[MAGIC.len()..])
        .finalize()
        .into_bytes();
    b.write_all(&proof).unwrap();
    let mut old = [0u8; 1 + PROOF_LEN];
    b.read_exact(&mut old).unwrap();
    assert_eq!(old[0], ACCEPTED);
    genuine.join().unwrap().unwrap();

    for reflect in [false, true] {
        let (a, mut b) = pair();
        let impostor = thread::spawn(move || {
            let mut hello = [0u8; MAGIC.len() + NONCE_LEN];
            b.read_exact(&mut hello).unwrap();
            // Reuse session 1's nonce so the replayed proof would fit it.
            b.write_all(&ns).unwrap();
            let mut their_proof = [0u8; PROOF_LEN];
            b.read_exact(&mut their_proof).unwrap();
            let mut answer = vec![ACCEPTED];
            if reflect {
                answer.extend_from_slice(&their_proof);
            } else {
                answer.extend_from_slice(&old[1..]);
            }
            b.write_all(&answer).unwrap();
        });
        let e = connect(a, &key(1)).unwrap_err();
        assert!(
            matches!(e, ChannelError::DestinationProofWrong),
            "reflect={reflect}: {e}"
        );
        impostor.join().unwrap();
    }
}

#[test]
fn key_files_strip_one_newline_and_refuse_short_keys() {
    let dir = std::env::temp_dir().join(format!("vmigrate-psk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = Psk::generate_text().unwrap();
    assert_eq!(text.len(), 65);
    let f = dir.join("k");
    std::fs::write(&f, &text).unwrap();
    let k = Psk::from_file(&f).unwrap();
    assert_eq!(k.0, text.trim_end().as_bytes());
    assert!(
        !format!("{k:?}").contains(&text[..8]),
        "Debug leaks the key"
    );
    std::fs::write(&f, b"short\n").unwrap();
    assert!(matches!(
        Psk::from_file(&f),
        Err(ChannelError::KeyTooShort { len: 5, .. })
    ));
    assert!(matches!(
        Psk::from_file(&dir.join("missing")),
        Err(ChannelError::KeyFile { .. })
    ));
    let _ = std::fs::remove_dir_all(dir);
}
