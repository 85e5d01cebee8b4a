//! Little-endian field encoding and a strict slice decoder.

use super::{MessageKind, WireError};

/// Appends little-endian integers and length-prefixed strings to a buffer.
pub(super) trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

/// Builds an [`WireError::InvalidField`].
pub(super) fn invalid(
    kind: MessageKind,
    field: &'static str,
    reason: impl Into<String>,
) -> WireError {
    WireError::InvalidField {
        kind,
        field,
        reason: reason.into(),
    }
}

/// Converts a length that validation already bounded to a `u32`.
pub(super) fn len_u32(
    kind: MessageKind,
    field: &'static str,
    len: usize,
    max: usize,
) -> Result<u32, WireError> {
    if len > max {
        return Err(invalid(kind, field, format!("length {len} exceeds {max}")));
    }
    u32::try_from(len).map_err(|_| invalid(kind, field, format!("length {len} exceeds u32")))
}

/// Reads fields from a payload slice; every shortfall is an error naming the
/// field, and [`Decoder::finish`] refuses trailing bytes.
pub(super) struct Decoder<'a> {
    buf: &'a [u8],
    kind: MessageKind,
}

impl<'a> Decoder<'a> {
    pub(super) fn new(kind: MessageKind, buf: &'a [u8]) -> Self {
        Self { buf, kind }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next `n` bytes.
    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(invalid(
                self.kind,
                field,
                format!(
                    "payload ends early: need {n} bytes, {} left",
                    self.buf.len()
                ),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.array(field).map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A `u32` element count, refused if above `max` or if the remaining
    /// payload cannot hold `count × elem_size` bytes (so callers may
    /// allocate `count` elements safely).
    pub(super) fn count(
        &mut self,
        field: &'static str,
        max: usize,
        elem_size: usize,
    ) -> Result<usize, WireError> {
        let raw = self.u32(field)?;
        let count = usize::try_from(raw).unwrap_or(usize::MAX);
        if count > max {
            return Err(invalid(
                self.kind,
                field,
                format!("count {raw} exceeds {max}"),
            ));
        }
        if count.saturating_mul(elem_size) > self.buf.len() {
            return Err(invalid(
                self.kind,
                field,
                format!(
                    "count {raw} needs {} bytes, payload has {} left",
                    count.saturating_mul(elem_size),
                    self.buf.len()
                ),
            ));
        }
        Ok(count)
    }

    /// A `u32`-length-prefixed byte blob of at most `max` bytes.
    pub(super) fn blob32(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a [u8], WireError> {
        let len = self.count(field, max, 1)?;
        self.take(len, field)
    }

    /// A `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    pub(super) fn str16(&mut self, field: &'static str, max: usize) -> Result<String, WireError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(invalid(
                self.kind,
                field,
                format!("length {len} exceeds {max}"),
            ));
        }
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| invalid(self.kind, field, format!("not UTF-8: {e}")))
    }

    /// An `opt64`: `u8` flag (0/1) then a `u64` that must be 0 when absent.
    pub(super) fn opt64(&mut self, field: &'static str) -> Result<Option<u64>, WireError> {
        let flag = self.u8(field)?;
        let value = self.u64(field)?;
        match flag {
            0 if value == 0 => Ok(None),
            0 => Err(invalid(
                self.kind,
                field,
                "absent value must be encoded as 0",
            )),
            1 => Ok(Some(value)),
            other => Err(invalid(
                self.kind,
                field,
                format!("presence flag {other} is not 0 or 1"),
            )),
        }
    }

    /// Refuses leftover bytes.
    pub(super) fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                kind: self.kind,
                extra: self.buf.len(),
            })
        }
    }
}

/// Encodes an `opt64`.
pub(super) fn put_opt64(buf: &mut Vec<u8>, v: Option<u64>) {
    buf.put_u8(u8::from(v.is_some()));
    buf.put_u64(v.unwrap_or(0));
}
