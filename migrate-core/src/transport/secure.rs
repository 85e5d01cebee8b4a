//! The authenticated record layer of a secure channel: every byte after the
//! handshake travels in an AES-256-GCM record whose tag is checked before a
//! single byte of it is handed to the reader (and which is encrypted, so the
//! guest's memory is not readable on the path either).
//!
//! ```text
//!  record = len u32 LE (1..=MAX_RECORD) | ciphertext[len] | tag[16]
//!  (ciphertext, tag) = AES-256-GCM(key of this direction,
//!                                  nonce = 0u32 | seq u64 LE, aad = len u32 LE, data)
//! ```
//! `seq` counts the records of one direction from 0 and is never sent: a
//! replayed, dropped or reordered record is checked against the wrong
//! nonce and fails, as does one reflected back to its sender (each
//! direction has its own key). A (key, nonce) pair is never reused: keys
//! are fresh per session and per direction, and `seq` only grows. A stream
//! cut inside a record is `Truncated`; a stream cut between records ends
//! cleanly here and is caught by the migration protocol, which knows where
//! it must end (`Commit`).
//!
//! The engine splits a stream into a reader and a writer with
//! [`SecureStream::try_clone`]: the clones share one receiving half and one
//! sending half, each behind its own mutex, so reading and writing never
//! wait on each other and each direction keeps its own sequence number.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::Stream;

/// Length of a record's tag (GCM).
pub const TAG_LEN: usize = 16;
/// Largest record payload. The engine writes through a 1 MiB buffer, so a
/// full buffer goes out as 4 records.
pub const MAX_RECORD: usize = 256 * 1024;
/// Length of a record's header.
pub const RECORD_HEADER_LEN: usize = 4;

/// Why the record layer refused what it read. Carried inside an
/// [`io::Error`] of kind `InvalidData` (or `UnexpectedEof`), so that it
/// reaches the engine through the same paths as any other stream error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The tag does not match: the record was changed, replayed,
    /// reordered, reflected or sealed with another key.
    #[error(
        "secure channel: record {seq} ({len} bytes) failed its integrity check \
         (tampered with, replayed, reordered or from another key); nothing of it was used"
    )]
    BadTag {
        /// Expected sequence number.
        seq: u64,
        /// Its declared length.
        len: usize,
    },
    /// The declared length is 0 or above [`MAX_RECORD`] (checked before
    /// allocating).
    #[error("secure channel: record {seq} declares {len} bytes (1..={max} allowed)")]
    BadLength {
        /// Expected sequence number.
        seq: u64,
        /// Declared length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The stream ended inside a record.
    #[error("secure channel: the stream ended inside record {seq} (truncated)")]
    Truncated {
        /// Sequence number of the cut record.
        seq: u64,
    },
    /// An earlier record failed; nothing more is read from this channel.
    #[error("secure channel: refused after an earlier failure: {0}")]
    Poisoned(Box<RecordError>),
}

impl RecordError {
    fn into_io(self) -> io::Error {
        let kind = match self {
            RecordError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// The two 32-byte record keys of one end of a channel.
#[derive(Clone)]
pub struct DirectionKeys {
    /// Seals what this end writes.
    pub send: [u8; 32],
    /// Checks what this end reads.
    pub recv: [u8; 32],
}

impl std::fmt::Debug for DirectionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectionKeys(<redacted>)")
    }
}

/// The AEAD of one direction (ring's AES-256-GCM: AES-NI and CLMUL code
/// where the CPU has them).
type Cipher = LessSafeKey;

fn keyed(key: &[u8; 32]) -> Cipher {
    // A 32-byte key is what AES-256-GCM takes: this cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 key length"))
}

/// The nonce of record `seq`: unique per key because `seq` only grows and
/// each key serves one direction of one session.
fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seal `data` (1..=[`MAX_RECORD`] bytes) as record number `seq` into
/// `out` (cleared first). Public for tests that build records by hand.
pub fn seal_record(key: &[u8; 32], seq: u64, data: &[u8], out: &mut Vec<u8>) {
    seal_with(&keyed(key), seq, data, out);
}

fn seal_with(cipher: &Cipher, seq: u64, data: &[u8], out: &mut Vec<u8>) {
    assert!(!data.is_empty() && data.len() <= MAX_RECORD, "record size");
    let len = u32::try_from(data.len()).expect("MAX_RECORD fits u32");
    out.clear();
    out.reserve(RECORD_HEADER_LEN + data.len() + TAG_LEN);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(data);
    let tag = cipher
        .seal_in_place_separate_tag(
            nonce(seq),
            Aad::from(len.to_le_bytes()),
            &mut out[RECORD_HEADER_LEN..],
        )
        // Only fails for inputs longer than GCM's 64 GiB limit.
        .expect("record within GCM's length limit");
    out.extend_from_slice(tag.as_ref());
}

struct TxHalf {
    sock: Stream,
    cipher: Cipher,
    seq: u64,
    buf: Vec<u8>,
    broken: bool,
}

impl TxHalf {
    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "secure channel: an earlier write failed part-way",
            ));
        }
        let mut buf = std::mem::take(&mut self.buf);
        seal_with(&self.cipher, self.seq, data, &mut buf);
        let r = self.sock.write_all(&buf);
        self.buf = buf;
        match r {
            Ok(()) => {
                self.seq += 1;
                Ok(())
            }
            Err(e) => {
                // A record half written cannot be continued.
                self.broken = true;
                Err(e)
            }
        }
    }
}

struct RxHalf {
    sock: Stream,
    cipher: Cipher,
    seq: u64,
    /// The current verified record; `pos` bytes of it were handed out.
    buf: Vec<u8>,
    pos: usize,
    failed: Option<RecordError>,
}

impl RxHalf {
    /// Read and verify the next record. `Ok(false)`: clean end of stream
    /// at a record boundary.
    fn next_record(&mut self) -> io::Result<bool> {
        if let Some(e) = &self.failed {
            return Err(RecordError::Poisoned(Box::new(e.clone())).into_io());
        }
        match self.read_verified() {
            Ok(more) => Ok(more),
            Err(e) => {
                if let Some(re) = e.get_ref().and_then(|r| r.downcast_ref::<RecordError>()) {
                    self.failed = Some(re.clone());
                } else {
                    // A socket error (timeout, reset) part-way through a
                    // record: the position in the stream is lost.
                    self.failed = Some(RecordError::Truncated { seq: self.seq });
                }
                Err(e)
            }
        }
    }

    fn read_verified(&mut self) -> io::Result<bool> {
        let seq = self.seq;
        let mut header = [0u8; RECORD_HEADER_LEN];
        let mut got = 0;
        while got < header.len() {
            match self.sock.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(RecordError::Truncated { seq }.into_io()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len32 = u32::from_le_bytes(header);
        let len = usize::try_from(len32).unwrap_or(usize::MAX);
        if len == 0 || len > MAX_RECORD {
            return Err(RecordError::BadLength {
                seq,
                len,
                max: MAX_RECORD,
            }
            .into_io());
        }
        self.buf.clear();
        self.buf.resize(len + TAG_LEN, 0);
        self.pos = 0;
        if let Err(e) = self.sock.read_exact(&mut self.buf) {
            self.buf.clear();
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                RecordError::Truncated { seq }.into_io()
            } else {
                e
            });
        }
        // `buf` is ciphertext | tag; decrypted in place only if the tag fits.
        if self
            .cipher
            .open_in_place(nonce(seq), Aad::from(len32.to_le_bytes()), &mut self.buf)
            .is_err()
        {
            self.buf.clear();
            return Err(RecordError::BadTag { seq, len }.into_io());
        }
        self.buf.truncate(len);
        self.seq += 1;
        Ok(true)
    }
}

/// A stream whose records are authenticated in both directions. Reads
/// return only bytes of records whose tag matched.
pub struct SecureStream {
    sock: Box<Stream>,
    rx: Arc<Mutex<RxHalf>>,
    tx: Arc<Mutex<TxHalf>>,
}

impl std::fmt::Debug for SecureStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SecureStream {
    /// Wrap a connected socket whose handshake produced `keys`; the first
    /// record each way has sequence number 0.
    pub fn new(sock: Stream, keys: &DirectionKeys) -> io::Result<Self> {
        let rx = RxHalf {
            sock: sock.try_clone()?,
            cipher: keyed(&keys.recv),
            seq: 0,
            buf: Vec::new(),
            pos: 0,
            failed: None,
        };
        let tx = TxHalf {
            sock: sock.try_clone()?,
            cipher: keyed(&keys.send),
            seq: 0,
            buf: Vec::new(),
            broken: false,
        };
        Ok(Self {
            sock: Box::new(sock),
            rx: Arc::new(Mutex::new(rx)),
            tx: Arc::new(Mutex::new(tx)),
        })
    }

    /// The socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// A second handle sharing both halves (and their sequence numbers).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            sock: Box::new(self.sock.try_clone()?),
            rx: self.rx.clone(),
            tx: self.tx.clone(),
        })
    }
}

impl Read for SecureStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        if rx.pos == rx.buf.len() && !rx.next_record()? {
            return Ok(0);
        }
        let n = out.len().min(rx.buf.len() - rx.pos);
        out[..n].copy_from_slice(&rx.buf[rx.pos..rx.pos + n]);
        rx.pos += n;
        Ok(n)
    }
}

impl Write for SecureStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let n = data.len().min(MAX_RECORD);
        lock(&self.tx).write_record(&data[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.tx).sock.flush()
    }
}

#[cfg(test)]
#[path = "secure_tests.rs"]
mod tests;
