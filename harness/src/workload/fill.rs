//! Guest RAM content that the VMM writes before boot.
//!
//! At ~1 MIPS a guest cannot fill a large working set itself, so a workload
//! that needs bulk content (hotset's incompressible working set) describes it
//! as [`MemoryFill`]s and the VMM produces the bytes with
//! [`FillContent::generate`]. The generator is counter-based (SplitMix64 of
//! the seed and the 8-byte word index), so any chunk of a fill can be produced
//! independently, in any order or in parallel, and the result is identical.
//! Its output is statistically random, hence incompressible: a compressor
//! in the migration stream gains nothing on these pages.

/// A range of guest RAM and what the VMM must write into it before boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFill {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// What to write.
    pub content: FillContent,
}

/// The content of a [`MemoryFill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillContent {
    /// Deterministic pseudo-random bytes, see [`fill_pseudo_random`].
    PseudoRandom {
        /// Seed of the generator.
        seed: u64,
    },
}

impl FillContent {
    /// Writes the bytes at `offset..offset + buf.len()` of this content
    /// (offsets relative to the fill's start) into `buf`.
    pub fn generate(&self, offset: u64, buf: &mut [u8]) {
        match *self {
            FillContent::PseudoRandom { seed } => fill_pseudo_random(seed, offset, buf),
        }
    }
}

impl MemoryFill {
    /// Writes this fill's bytes at `offset..offset + buf.len()` (relative to
    /// [`MemoryFill::gpa`]) into `buf`; with `offset` 0 and a `buf` of `len`
    /// bytes, the whole fill.
    pub fn generate(&self, offset: u64, buf: &mut [u8]) {
        self.content.generate(offset, buf);
    }
}

/// SplitMix64's finalizer: a bijective, well-mixing 64-bit hash.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 8-byte word with index `index` of the pseudo-random stream `seed`.
fn word(seed: u64, index: u64) -> u64 {
    mix64(seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// Writes bytes `offset..offset + buf.len()` of the pseudo-random stream
/// `seed` into `buf`. The stream is a sequence of little-endian u64 words,
/// word `i` = SplitMix64(seed, i); runs at several GB/s.
pub fn fill_pseudo_random(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut rest = buf;
    // Unaligned head, byte by byte.
    while pos & 7 != 0 && !rest.is_empty() {
        let bytes = word(seed, pos / 8).to_le_bytes();
        let i = usize::try_from(pos % 8).unwrap_or(0);
        rest[0] = bytes[i];
        rest = &mut rest[1..];
        pos += 1;
    }
    let mut index = pos / 8;
    let mut chunks = rest.chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word(seed, index).to_le_bytes());
        index += 1;
    }
    let tail = chunks.into_remainder();
    let bytes = word(seed, index).to_le_bytes();
    let n = tail.len();
    tail.copy_from_slice(&bytes[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_pseudo_random(7, 0, &mut a);
        fill_pseudo_random(7, 0, &mut b);
        assert_eq!(a, b);
        fill_pseudo_random(8, 0, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn chunks_match_whole() {
        let mut whole = vec![0u8; 1000];
        fill_pseudo_random(42, 0, &mut whole);
        // Arbitrary, unaligned chunking gives the same bytes.
        let mut pieced = vec![0u8; 1000];
        let mut off = 0usize;
        for step in [1usize, 3, 8, 13, 64, 7, 200, 704] {
            let end = (off + step).min(pieced.len());
            fill_pseudo_random(42, off as u64, &mut pieced[off..end]);
            off = end;
        }
        assert_eq!(off, 1000);
        assert_eq!(whole, pieced);
        let fill = MemoryFill {
            gpa: 1 << 20,
            len: 1000,
            content: FillContent::PseudoRandom { seed: 42 },
        };
        let mut via_fill = vec![0u8; 1000];
        fill.generate(0, &mut via_fill);
        assert_eq!(whole, via_fill);
    }

    #[test]
    fn byte_histogram_is_flat() {
        // 1 MiB: a chi-square test on byte frequencies (255 degrees of
        // freedom: mean 255, sd ~22.6); compressible data fails by far.
        let mut buf = vec![0u8; 1 << 20];
        fill_pseudo_random(0x1234, 0, &mut buf);
        let mut hist = [0u64; 256];
        for &b in &buf {
            hist[usize::from(b)] += 1;
        }
        let expected = (buf.len() / 256) as f64;
        let chi2: f64 = hist
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 400.0, "chi2 = {chi2}");
        // No two pages alike (so no dedup either).
        let first = &buf[..4096];
        assert!(buf.chunks(4096).skip(1).all(|p| p != first));
    }

    #[test]
    fn zstd_cannot_shrink_it() {
        let mut buf = vec![0u8; 1 << 20];
        fill_pseudo_random(99, 0, &mut buf);
        let packed = zstd::bulk::compress(&buf, 3).expect("compress");
        assert!(
            packed.len() >= buf.len(),
            "{} < {}",
            packed.len(),
            buf.len()
        );
    }
}
