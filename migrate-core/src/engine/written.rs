//! The destination's record of the pages it has written, shared by every
//! channel of a migration.
//!
//! A zero range must zero a page that an earlier iteration wrote (fresh
//! memory is zero already, so an untouched page is skipped and stays
//! unallocated). With several channels the earlier write may have come in
//! on another channel, so the record is one bitmap of atomic words that all
//! channels' appliers set and read. Ordering between iterations comes from
//! the iteration barrier (a mutex), which every channel passes between its
//! `IterationEnd` and the next iteration's first frame: relaxed bit
//! operations are enough.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dirty::DirtyBitmap;

/// Pages written so far, one bit per page.
#[derive(Debug)]
pub struct WrittenPages {
    words: Vec<AtomicU64>,
    pages: usize,
}

impl WrittenPages {
    /// No page written, for a guest of `pages` pages.
    #[must_use]
    pub fn new(pages: usize) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
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
