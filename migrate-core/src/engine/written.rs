//! The destination's record of the pages it has written, and of those
//! whose last copy arrived torn, shared by every channel of a migration.
//!
//! A zero range must zero a page that an earlier iteration wrote (fresh
//! memory is zero already, so an untouched page is skipped and stays
//! unallocated). With several channels the earlier write may have come in
//! on another channel, so the record is one bitmap of atomic words that all
//! channels' appliers set and read. Ordering between iterations comes from
//! the iteration barrier (a mutex), which every channel passes between its
//! `IterationEnd` and the next iteration's first frame: relaxed bit
//! operations are enough.
//!
//! *Torn* pages: a `CheckedPages` page that failed its own CRC is not
//! written; it is marked here until a newer copy (data or a zero range)
//! arrives, on any channel. One still marked at `Complete` fails the
//! migration (`wire/checked.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dirty::DirtyBitmap;

/// Pages written so far, one bit per page.
#[derive(Debug)]
pub struct WrittenPages {
    words: Vec<AtomicU64>,
    torn: Vec<AtomicU64>,
    /// Pages ever marked torn (a page torn twice counts twice).
    torn_total: AtomicU64,
    /// Pages received straight into guest memory (`engine/in_place.rs`).
    placed_total: AtomicU64,
    pages: usize,
}

impl WrittenPages {
    /// No page written, for a guest of `pages` pages.
    #[must_use]
    pub fn new(pages: usize) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            torn: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            torn_total: AtomicU64::new(0),
            placed_total: AtomicU64::new(0),
            pages,
        }
    }

    /// Pages covered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Mark `page` written (`page < len()`).
    pub fn set(&self, page: usize) {
        self.words[page / 64].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// Mark `page` torn: its last copy failed its CRC and was dropped.
    pub fn mark_torn(&self, page: usize) {
        self.torn[page / 64].fetch_or(1 << (page % 64), Ordering::Relaxed);
        self.torn_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Pages marked torn so far, mended or not.
    #[must_use]
    pub fn torn_total(&self) -> u64 {
        self.torn_total.load(Ordering::Relaxed)
    }

    /// Count `pages` more pages received in place.
    pub fn note_placed(&self, pages: u64) {
        self.placed_total.fetch_add(pages, Ordering::Relaxed);
    }

    /// Pages received in place so far.
    #[must_use]
    pub fn placed_total(&self) -> u64 {
        self.placed_total.load(Ordering::Relaxed)
    }

    /// A newer copy of `first..first + count` arrived: none of it is torn.
    pub fn mend(&self, first: usize, count: usize) {
        let end = (first + count).min(self.pages);
        let mut p = first.min(end);
        while p < end {
            let (w, bit) = (p / 64, p % 64);
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if self.torn[w].load(Ordering::Relaxed) & mask != 0 {
                self.torn[w].fetch_and(!mask, Ordering::Relaxed);
            }
            p += n;
        }
    }

    /// How many pages are torn now, and the first of them.
    #[must_use]
    pub fn torn(&self) -> (u64, Option<usize>) {
        let mut first = None;
        let mut count = 0u64;
        for (i, w) in self.torn.iter().enumerate() {
            let bits = w.load(Ordering::Relaxed);
            if bits != 0 {
                first.get_or_insert(i * 64 + bits.trailing_zeros() as usize);
                count += u64::from(bits.count_ones());
            }
        }
        (count, first)
    }

    /// The written pages among `first..first + count`, a word at a time (a
    /// huge untouched range costs next to nothing).
    pub fn iter_ones_in(&self, first: usize, count: usize) -> impl Iterator<Item = usize> + '_ {
        let end = (first + count).min(self.pages);
        let first = first.min(end);
        (first / 64..end.div_ceil(64)).flat_map(move |w| {
            let mut bits = self.words[w].load(Ordering::Relaxed);
            let base = w * 64;
            std::iter::from_fn(move || {
                while bits != 0 {
                    let bit = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let page = base + bit;
                    if page >= first && page < end {
                        return Some(page);
                    }
                }
                None
            })
        })
    }

    /// A plain copy, for the digest and for the VM's own record.
    #[must_use]
    pub fn snapshot(&self) -> DirtyBitmap {
        let words: Vec<u64> = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        let mut out = DirtyBitmap::new(self.pages);
        out.merge_words(0, &words);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_pages_are_counted_until_mended() {
        let w = WrittenPages::new(300);
        assert_eq!(w.torn(), (0, None));
        for p in [3, 64, 65, 200, 299] {
            w.mark_torn(p);
        }
        assert_eq!(w.torn(), (5, Some(3)));
        w.mend(60, 6); // 64 and 65
        assert_eq!(w.torn(), (3, Some(3)));
        w.mend(0, 300);
        assert_eq!(w.torn(), (0, None));
        w.mark_torn(299);
        w.mend(299, 5); // clipped at the end
        assert_eq!(w.torn(), (0, None));
    }

    #[test]
    fn set_scan_and_snapshot_agree() {
        let w = WrittenPages::new(200);
        for p in [0, 63, 64, 65, 130, 199] {
            w.set(p);
        }
        assert_eq!(
            w.iter_ones_in(0, 200).collect::<Vec<_>>(),
            [0, 63, 64, 65, 130, 199]
        );
        assert_eq!(w.iter_ones_in(64, 2).collect::<Vec<_>>(), [64, 65]);
        assert_eq!(w.iter_ones_in(1, 62).count(), 0);
        assert_eq!(w.iter_ones_in(190, 100).collect::<Vec<_>>(), [199]);
        let s = w.snapshot();
        assert_eq!(s.count(), 6);
        assert!(s.get(130) && !s.get(131));
    }

    #[test]
    fn threads_share_one_record() {
        let w = std::sync::Arc::new(WrittenPages::new(4096));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || (t..4096).step_by(4).for_each(|p| w.set(p)))
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(w.snapshot().count(), 4096);
    }
}
