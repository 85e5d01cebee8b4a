//! Byte sizes as people type them: `512M`, `4G`, `0x10000`, `4096`.
//!
//! Workload specs (`sweep:end=512M`) and the CLI's `--mem` share this one
//! parser so that a size means the same thing everywhere. Suffixes are binary
//! (powers of 1024): `K` = KiB, `M` = MiB, `G` = GiB, `T` = TiB, upper or lower
//! case, optionally followed by `iB` or `B` (`64MiB`, `64MB` and `64M` are all
//! 64 × 2^20 bytes). Numbers are decimal, or hexadecimal with a `0x` prefix.

use thiserror::Error;

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// One tebibyte.
pub const TIB: u64 = 1 << 40;

/// Why a size string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseSizeError {
    /// The string was empty (or only whitespace).
    #[error("empty size")]
    Empty,
    /// The number part is not a decimal or `0x` hexadecimal integer.
    #[error("invalid size `{0}`: expected an integer with an optional K/M/G/T suffix")]
    InvalidNumber(String),
    /// The suffix is not one of K, M, G, T (optionally with `iB`/`B`).
    #[error("invalid size suffix in `{0}`: expected K, M, G or T (binary units)")]
    InvalidSuffix(String),
    /// The value does not fit in 64 bits.
    #[error("size `{0}` is too large")]
    Overflow(String),
}

/// Parses a byte size: `4096`, `0x1000`, `4K`, `64M`, `2G`, `1T`, `64MiB`.
///
/// Suffixes are powers of 1024 and case-insensitive.
///
/// # Errors
/// [`ParseSizeError`] when the string is empty, the number or suffix is
/// malformed, or the result overflows `u64`.
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(ParseSizeError::Empty);
    }
    let (digits, radix) = match s.get(..2) {
        Some(p) if p.eq_ignore_ascii_case("0x") => (&s[2..], 16),
        _ => (s, 10),
    };
    let split = digits
        .find(|c: char| !c.is_digit(radix) && c != '_')
        .unwrap_or(digits.len());
    let (number, suffix) = digits.split_at(split);
    let number: String = number.chars().filter(|&c| c != '_').collect();
    if number.is_empty() {
        return Err(ParseSizeError::InvalidNumber(s.to_owned()));
    }
    let value = u64::from_str_radix(&number, radix).map_err(|e| {
        if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) {
            ParseSizeError::Overflow(s.to_owned())
        } else {
            ParseSizeError::InvalidNumber(s.to_owned())
        }
    })?;
    let multiplier = suffix_multiplier(suffix.trim())
        .ok_or_else(|| ParseSizeError::InvalidSuffix(s.to_owned()))?;
    value
        .checked_mul(multiplier)
        .ok_or_else(|| ParseSizeError::Overflow(s.to_owned()))
}

/// The multiplier for a suffix (already trimmed), or `None` if unknown.
fn suffix_multiplier(suffix: &str) -> Option<u64> {
    match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => Some(1),
        "k" | "kb" | "kib" => Some(KIB),
        "m" | "mb" | "mib" => Some(MIB),
        "g" | "gb" | "gib" => Some(GIB),
        "t" | "tb" | "tib" => Some(TIB),
        _ => None,
    }
}

/// Formats a size with the largest binary suffix that divides it exactly
/// (`64M`, `1G`, `4K`), or as plain bytes; [`parse_size`] reads it back.
#[must_use]
pub fn format_size(bytes: u64) -> String {
    for (unit, name) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
        if bytes != 0 && bytes & (unit - 1) == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_hex_and_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 0x1000 "), Ok(4096));
        assert_eq!(parse_size("0X10"), Ok(16));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(MIB));
        assert_eq!(parse_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_size("64MB"), Ok(64 * MIB));
        assert_eq!(parse_size("2G"), Ok(2 * GIB));
        assert_eq!(parse_size("64g"), Ok(64 * GIB));
        assert_eq!(parse_size("1T"), Ok(TIB));
        assert_eq!(parse_size("0x10M"), Ok(16 * MIB));
        assert_eq!(parse_size("1_024"), Ok(1024));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(ParseSizeError::Empty));
        assert_eq!(parse_size("   "), Err(ParseSizeError::Empty));
        assert!(matches!(
            parse_size("M"),
            Err(ParseSizeError::InvalidNumber(_))
        ));
        assert!(matches!(
            parse_size("0x"),
            Err(ParseSizeError::InvalidNumber(_))
        ));
        assert!(matches!(
            parse_size("-1"),
            Err(ParseSizeError::InvalidNumber(_))
        ));
        assert!(matches!(
            parse_size("12Q"),
            Err(ParseSizeError::InvalidSuffix(_))
        ));
        assert!(matches!(
            parse_size("1.5G"),
            Err(ParseSizeError::InvalidSuffix(_))
        ));
        assert!(matches!(
            parse_size("4KK"),
            Err(ParseSizeError::InvalidSuffix(_))
        ));
        assert!(matches!(
            parse_size("iB"),
            Err(ParseSizeError::InvalidNumber(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(ParseSizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("16777216T"),
            Err(ParseSizeError::Overflow(_))
        ));
    }

    #[test]
    fn format_round_trips() {
        for v in [
            0,
            1,
            4095,
            4096,
            MIB,
            3 * MIB + 4096,
            64 * MIB,
            GIB,
            64 * GIB,
            TIB,
        ] {
            assert_eq!(parse_size(&format_size(v)), Ok(v), "{v}");
        }
        assert_eq!(format_size(64 * MIB), "64M");
        assert_eq!(format_size(1536 * MIB), "1536M");
        assert_eq!(format_size(GIB), "1G");
        assert_eq!(format_size(4097), "4097");
    }
}
