//! Dirty-page bitmaps over all of guest RAM.
//!
//! Pure data: one bit per 4 KiB page frame, indexed by guest frame number
//! (gpa / 4096), stored as `u64` words in KVM's own bit order (bit `n` of the
//! bitmap is page `n`, least significant bit first), so a slot's
//! `KVM_GET_DIRTY_LOG` result is spliced in without reshuffling bits.

use bitvec::prelude::*;

/// A set of dirty pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    bits: BitVec<u64, Lsb0>,
}

impl DirtyBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            bits: BitVec::repeat(false, pages),
        }
    }

    /// A bitmap with every one of `pages` pages set (iteration 0).
    pub fn all(pages: usize) -> Self {
        Self {
            bits: BitVec::repeat(true, pages),
        }
    }

    /// Number of pages the bitmap covers.
    pub fn len(&self) -> usize {
        self.bits.len()
    }

    /// True when the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// Mark one page dirty.
    pub fn set(&mut self, page: usize) {
        self.bits.set(page, true);
    }

    /// Mark one page clean.
    pub fn unset(&mut self, page: usize) {
        self.bits.set(page, false);
    }

    /// Whether a page is dirty.
    pub fn get(&self, page: usize) -> bool {
        self.bits.get(page).is_some_and(|b| *b)
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// OR KVM-layout words (one slot's log) into the pages starting at
    /// `first_page`. Bits beyond the bitmap's end are ignored.
    pub fn merge_words(&mut self, first_page: usize, words: &[u64]) {
        for (i, &word) in words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            let start = first_page + i * 64;
            let end = (start + 64).min(self.bits.len());
            if start >= end {
                break;
            }
            let src = word.view_bits::<Lsb0>();
            let dst = &mut self.bits[start..end];
            *dst |= &src[..end - start];
        }
    }

    /// Pages dirty in both `self` and `other` (the re-dirtied set).
    pub fn overlap_count(&self, other: &DirtyBitmap) -> u64 {
        self.bits
            .as_raw_slice()
            .iter()
            .zip(other.bits.as_raw_slice())
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum()
    }

    /// Add every page of `other` to `self`.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self
            .bits
            .as_raw_mut_slice()
            .iter_mut()
            .zip(other.bits.as_raw_slice())
        {
            *a |= *b;
        }
    }

    /// Keep only the pages also in `other`.
    pub fn intersect_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self
            .bits
            .as_raw_mut_slice()
            .iter_mut()
            .zip(other.bits.as_raw_slice())
        {
            *a &= *b;
        }
    }

    /// Remove the pages of `other`.
    pub fn subtract(&mut self, other: &DirtyBitmap) {
        for (a, b) in self
            .bits
            .as_raw_mut_slice()
            .iter_mut()
            .zip(other.bits.as_raw_slice())
        {
            *a &= !*b;
        }
    }

    /// Pages in `self` but not in `other`.
    pub fn count_not_in(&self, other: &DirtyBitmap) -> u64 {
        self.bits
            .as_raw_slice()
            .iter()
            .zip(other.bits.as_raw_slice())
            .map(|(a, b)| u64::from((a & !b).count_ones()))
            .sum()
    }

    /// Clear every page.
    pub fn clear(&mut self) {
        self.bits.fill(false);
    }

    /// Iterate over runs of consecutive dirty pages as `(first, count)`,
    /// scanning a word at a time.
    pub fn runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let start = pos + self.bits.get(pos..)?.first_one()?;
            let len = self.bits[start..]
                .first_zero()
                .unwrap_or(self.bits.len() - start);
            pos = start + len;
            Some((start, len))
        })
    }

    /// Iterate over dirty page numbers in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits.iter_ones()
    }

    /// Dirty page numbers within `[first, first + count)`, ascending,
    /// scanning a word at a time (a 16 GiB range with nothing set costs
    /// microseconds, not one test per page). Clipped to the bitmap's end.
    pub fn iter_ones_in(&self, first: usize, count: usize) -> impl Iterator<Item = usize> + '_ {
        let end = first.saturating_add(count).min(self.bits.len());
        let start = first.min(end);
        self.bits[start..end].iter_ones().map(move |i| start + i)
    }

    /// The words covering pages `[first_page, first_page + pages)`, in KVM
    /// layout; `first_page` must be a multiple of 64.
    pub fn words(&self, first_page: usize, pages: usize) -> Vec<u64> {
        debug_assert_eq!(first_page % 64, 0);
        let raw = self.bits.as_raw_slice();
        let first = first_page / 64;
        let last = (first_page + pages).div_ceil(64).min(raw.len());
        raw[first.min(last)..last].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iter_ones_in_a_range() {
        let mut b = DirtyBitmap::new(300);
        for p in [0, 63, 64, 65, 200, 299] {
            b.set(p);
        }
        assert_eq!(b.iter_ones_in(63, 3).collect::<Vec<_>>(), [63, 64, 65]);
        assert_eq!(b.iter_ones_in(66, 134).count(), 0);
        assert_eq!(b.iter_ones_in(100, 1000).collect::<Vec<_>>(), [200, 299]);
        assert_eq!(b.iter_ones_in(400, 10).count(), 0);
        assert_eq!(b.iter_ones_in(0, 300).count(), 6);
    }

    #[test]
    fn merge_words_places_bits_like_kvm() {
        let mut b = DirtyBitmap::new(256);
        // Slot starting at page 64: word 0 bit 0 = page 64, word 1 bit 3 = page 131.
        b.merge_words(64, &[1, 1 << 3]);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![64, 131]);
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn merge_words_ignores_bits_past_the_end() {
        let mut b = DirtyBitmap::new(70);
        b.merge_words(64, &[u64::MAX]);
        assert_eq!(b.count(), 6);
    }

    #[test]
    fn overlap_and_union() {
        let mut a = DirtyBitmap::new(200);
        let mut b = DirtyBitmap::new(200);
        for p in [1, 5, 70, 199] {
            a.set(p);
        }
        for p in [5, 70, 100] {
            b.set(p);
        }
        assert_eq!(a.overlap_count(&b), 2);
        assert_eq!(a.count_not_in(&b), 2);
        let mut i = a.clone();
        i.intersect_with(&b);
        assert_eq!(i.iter_ones().collect::<Vec<_>>(), vec![5, 70]);
        let mut d = a.clone();
        d.subtract(&b);
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), vec![1, 199]);
        a.union_with(&b);
        assert_eq!(a.iter_ones().collect::<Vec<_>>(), vec![1, 5, 70, 100, 199]);
        a.clear();
        assert_eq!(a.count(), 0);
        assert!(!a.get(5));
    }

    #[test]
    fn runs_cover_exactly_the_set_pages() {
        let mut b = DirtyBitmap::new(300);
        for p in [0, 1, 2, 63, 64, 65, 200, 299] {
            b.set(p);
        }
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(runs, vec![(0, 3), (63, 3), (200, 1), (299, 1)]);
        assert_eq!(
            DirtyBitmap::all(130).runs().collect::<Vec<_>>(),
            vec![(0, 130)]
        );
        assert_eq!(DirtyBitmap::new(130).runs().count(), 0);
    }

    #[test]
    fn all_and_words_round_trip() {
        let a = DirtyBitmap::all(130);
        assert_eq!(a.count(), 130);
        let w = a.words(64, 66);
        assert_eq!(w.len(), 2);
        let mut b = DirtyBitmap::new(130);
        b.merge_words(64, &w);
        assert_eq!(b.count(), 66);
    }
}
