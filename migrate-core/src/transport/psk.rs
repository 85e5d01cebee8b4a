//! Pre-shared-key mode: mutual challenge-response, then a [`SecureStream`].
//!
//! ```text
//!  source (connects)                         destination (accepts)
//!   "VMIGPSK1" | Nc (32 random bytes)  -->
//!                                      <--  "VMIGPSK1" | Ns (32 random bytes)
//!   proof_s = HMAC(A, "source" | Nc | Ns) -->   checked (constant time)
//!                                      <--  0x01 | HMAC(A, "destination" | Nc | Ns)
//!                                           (0x00 and close: proof refused)
//!   checked
//!   ... AES-256-GCM records (secure.rs): source -> destination with key S, back with D
//! ```
//! Keys: HKDF-SHA256 with salt `Nc | Ns` and the PSK as input key material;
//! `A`, `S`, `D` are its outputs for the infos `vmigrate psk v1 auth`,
//! `… source-to-destination`, `… destination-to-source`. Both nonces are in
//! every proof and key, so a proof from another session (replay) or sent
//! back to its author (reflection, the role label differs) fails. The
//! source proves first: a stranger who connects to a destination learns
//! nothing that depends on the key before it has proven it holds the key.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::secure::{DirectionKeys, SecureStream};
use super::Stream;
use crate::wire::{write_message, ErrorCode, ErrorMessage, Message};

/// First bytes of each side's handshake.
pub const MAGIC: [u8; 8] = *b"VMIGPSK1";
/// Length of each side's random nonce.
pub const NONCE_LEN: usize = 32;
/// Shortest key accepted (the demo and the docs use 32 random bytes).
pub const MIN_KEY_LEN: usize = 16;
const PROOF_LEN: usize = 32;
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 0;

/// Why a secure channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The key file could not be read.
    #[error("cannot read the pre-shared key file {path}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The key is too short to resist guessing.
    #[error("the pre-shared key in {path} has {len} bytes; at least {min} are needed (e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE`)")]
    KeyTooShort {
        /// The file.
        path: PathBuf,
        /// Bytes found (after a trailing newline was removed).
        len: usize,
        /// [`MIN_KEY_LEN`].
        min: usize,
    },
    /// No randomness from the OS.
    #[error("cannot get random bytes from the OS: {0}")]
    Random(String),
    /// A socket error during the handshake.
    #[error("secure channel handshake failed while {step}")]
    Io {
        /// What the handshake was doing.
        step: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection in the middle of the handshake.
    #[error("the {peer} closed the connection while we were {step} (a plaintext peer started with --insecure, or one that refused us)")]
    PeerClosed {
        /// `source` or `destination`.
        peer: &'static str,
        /// What the handshake was doing.
        step: &'static str,
    },
    /// The peer does not speak this channel (a plaintext vmigrate, or
    /// something else).
    #[error("the {peer} did not open a pre-shared-key channel (it sent {seen}): {hint}")]
    NotSecurePeer {
        /// `source` or `destination`.
        peer: &'static str,
        /// What it sent instead, described.
        seen: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The source's proof does not match this key.
    #[error("the source failed to prove it holds the pre-shared key (its key differs from ours); connection refused")]
    SourceProofWrong,
    /// The destination refused our proof.
    #[error("the destination refused our proof: the two ends hold different pre-shared keys")]
    RefusedByDestination,
    /// The destination's proof does not match this key.
    #[error("the destination failed to prove it holds the pre-shared key (an impostor, or a different key)")]
    DestinationProofWrong,
    /// The TLS mode failed.
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    /// The peer answered with a verdict byte that means nothing.
    #[error("the destination sent verdict byte {0:#04x} (expected 0 or 1)")]
    BadVerdict(u8),
}

/// A pre-shared key (its bytes are never printed).
#[derive(Clone)]
pub struct Psk(Vec<u8>);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk(<{} bytes, redacted>)", self.0.len())
    }
}

impl Psk {
    /// Read a key file: its bytes are the key (text or binary), less one
    /// trailing `\n` or `\r\n`; at least [`MIN_KEY_LEN`] bytes.
    pub fn from_file(path: &Path) -> Result<Self, ChannelError> {
        let mut key = std::fs::read(path).map_err(|source| ChannelError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?;
        if key.ends_with(b"\n") {
            key.pop();
            if key.ends_with(b"\r") {
                key.pop();
            }
        }
        Self::from_bytes(key).map_err(|len| ChannelError::KeyTooShort {
            path: path.to_path_buf(),
            len,
            min: MIN_KEY_LEN,
        })
    }

    /// A key from bytes; `Err(len)` when shorter than [`MIN_KEY_LEN`].
    pub fn from_bytes(key: Vec<u8>) -> Result<Self, usize> {
        if key.len() < MIN_KEY_LEN {
            return Err(key.len());
        }
        Ok(Self(key))
    }

    /// A fresh key file's content: 32 random bytes as 64 hex digits and a
    /// newline (what `vmigrate demo` writes).
    pub fn generate_text() -> Result<String, ChannelError> {
        let bytes = random::<32>()?;
        let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        Ok(s)
    }
}

fn random<const N: usize>() -> Result<[u8; N], ChannelError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ChannelError::Random(e.to_string()))?;
    Ok(b)
}

/// The keys of one session.
struct SessionKeys {
    auth: [u8; 32],
    source_to_dest: [u8; 32],
    dest_to_source: [u8; 32],
}

fn derive(psk: &Psk, nc: &[u8; NONCE_LEN], ns: &[u8; NONCE_LEN]) -> SessionKeys {
    let mut salt = [0u8; 2 * NONCE_LEN];
    salt[..NONCE_LEN].copy_from_slice(nc);
    salt[NONCE_LEN..].copy_from_slice(ns);
    let hk = Hkdf::<Sha256>::new(Some(&salt), &psk.0);
    let out = |info: &[u8]| {
        let mut k = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
        hk.expand(info, &mut k).expect("HKDF output length");
        k
    };
    SessionKeys {
        auth: out(b"vmigrate psk v1 auth"),
        source_to_dest: out(b"vmigrate psk v1 source-to-destination"),
        dest_to_source: out(b"vmigrate psk v1 destination-to-source"),
    }
}

fn proof_mac(auth: &[u8; 32], role: &[u8], nc: &[u8], ns: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(auth).expect("HMAC accepts any key length");
    m.update(b"vmigrate psk v1 proof ");
    m.update(role);
    m.update(nc);
    m.update(ns);
    m
}

fn io_step(step: &'static str) -> impl FnOnce(io::Error) -> ChannelError {
    move |source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            let peer = if step.contains("destination's") {
                "destination"
            } else {
                "source"
            };
            return ChannelError::PeerClosed { peer, step };
        }
        ChannelError::Io { step, source }
    }
}

fn describe(bytes: &[u8]) -> String {
    if bytes.len() >= 2 && u16::from_le_bytes([bytes[0], bytes[1]]) == 1 {
        return "a plaintext migration Hello".into();
    }
    if bytes.len() >= 2 && u16::from_le_bytes([bytes[0], bytes[1]]) == 3 {
        return "a plaintext migration Error frame".into();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("bytes {hex}")
}

/// Source side: prove the key, check the destination's proof, and return
/// the authenticated stream.
pub fn connect(mut sock: Stream, psk: &Psk) -> Result<SecureStream, ChannelError> {
    let nc = random::<NONCE_LEN>()?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&nc);
    sock.write_all(&hello)
        .and_then(|()| sock.flush())
        .map_err(io_step("sending the source's nonce"))?;
    let mut magic = [0u8; MAGIC.len()];
    sock.read_exact(&mut magic)
        .map_err(io_step("reading the destination's nonce"))?;
    if magic != MAGIC {
        return Err(ChannelError::NotSecurePeer {
            peer: "destination",
            seen: describe(&magic),
            hint: "it runs without --psk-file (--insecure?); give both ends the same --psk-file",
        });
    }
    let mut ns = [0u8; NONCE_LEN];
    sock.read_exact(&mut ns)
        .map_err(io_step("reading the destination's nonce"))?;
    let keys = derive(psk, &nc, &ns);
    let proof = proof_mac(&keys.auth, b"source", &nc, &ns)
        .finalize()
        .into_bytes();
    sock.write_all(&proof)
        .and_then(|()| sock.flush())
        .map_err(io_step("sending the source's proof"))?;
    let mut verdict = [0u8; 1];
    sock.read_exact(&mut verdict)
        .map_err(io_step("reading the destination's verdict"))?;
    match verdict[0] {
        ACCEPTED => {}
        REFUSED => return Err(ChannelError::RefusedByDestination),
        other => return Err(ChannelError::BadVerdict(other)),
    }
    let mut theirs = [0u8; PROOF_LEN];
    sock.read_exact(&mut theirs)
        .map_err(io_step("reading the destination's proof"))?;
    proof_mac(&keys.auth, b"destination", &nc, &ns)
        .verify_slice(&theirs)
        .map_err(|_| ChannelError::DestinationProofWrong)?;
    SecureStream::new(
        sock,
        &DirectionKeys {
            send: keys.source_to_dest,
            recv: keys.dest_to_source,
        },
    )
    .map_err(io_step("splitting the stream"))
}

/// Destination side: check the source's proof (refusing it if wrong),
/// prove the key in turn, and return the authenticated stream.
pub fn accept(mut sock: Stream, psk: &Psk) -> Result<SecureStream, ChannelError> {
    let mut magic = [0u8; MAGIC.len()];
    sock.read_exact(&mut magic)
        .map_err(io_step("reading the source's nonce"))?;
    if magic != MAGIC {
        refuse_plaintext(&mut sock);
        return Err(ChannelError::NotSecurePeer {
            peer: "source",
            seen: describe(&magic),
            hint: "this destination needs `send --psk-file` with its key; refused before reading any guest data",
        });
    }
    let mut nc = [0u8; NONCE_LEN];
    sock.read_exact(&mut nc)
        .map_err(io_step("reading the source's nonce"))?;
    let ns = random::<NONCE_LEN>()?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&ns);
    sock.write_all(&hello)
        .and_then(|()| sock.flush())
        .map_err(io_step("sending the destination's nonce"))?;
    let keys = derive(psk, &nc, &ns);
    let mut theirs = [0u8; PROOF_LEN];
    sock.read_exact(&mut theirs)
        .map_err(io_step("reading the source's proof"))?;
    if proof_mac(&keys.auth, b"source", &nc, &ns)
        .verify_slice(&theirs)
        .is_err()
    {
        let _ = sock.write_all(&[REFUSED]).and_then(|()| sock.flush());
        return Err(ChannelError::SourceProofWrong);
    }
    let mut answer = vec![ACCEPTED];
    answer.extend_from_slice(
        &proof_mac(&keys.auth, b"destination", &nc, &ns)
            .finalize()
            .into_bytes(),
    );
    sock.write_all(&answer)
        .and_then(|()| sock.flush())
        .map_err(io_step("sending the destination's proof"))?;
    SecureStream::new(
        sock,
        &DirectionKeys {
            send: keys.dest_to_source,
            recv: keys.source_to_dest,
        },
    )
    .map_err(io_step("splitting the stream"))
}

/// Tell a plaintext vmigrate source, in its own protocol, why it is
/// refused, then drain what it sent so that closing does not reset the
/// connection before it read the answer.
fn refuse_plaintext(sock: &mut Stream) {
    let msg = ErrorMessage::new(
        ErrorCode::ProtocolViolation,
        "this destination requires an authenticated channel: run send with --psk-file (the destination's key)",
    );
    if write_message(sock, &Message::Error(msg)).is_err() || sock.flush().is_err() {
        return;
    }
    let _ = sock.set_timeouts(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 64 * 1024];
    let mut total = 0usize;
    while total < (1 << 20) {
        match sock.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

#[cfg(test)]
#[path = "psk_tests.rs"]
mod tests;
