//! Dirty pages whose content did not change (`send --skip-unchanged`).
//!
//! A dirty log says a page was written, not that it changed: a guest that
//! rewrites the values its pages hold (a memset of what is there, a lock
//! word set back, the study's `sweep-same`) dirties pages the destination
//! already holds byte for byte. The source keeps a 128-bit xxh3 digest of
//! the last copy of each page it sent and skips a dirty page whose digest
//! matches; nothing changes on the wire or at the destination.
//!
//! Why it is sound:
//! - The digest is taken of the bytes that go on the wire: the page is
//!   copied out of guest memory first (the copy path, never the
//!   straight-from-guest-memory one, where the guest can change a page
//!   between the kernel's read and the CRC), and the copy is hashed.
//! - A page sent as zero forgets its digest, so a page that goes from A to
//!   zero and back to A is sent again.
//! - Within one pass a page is handled by one channel, and passes are
//!   separated by the channels' sync point, so the channels' threads never
//!   touch one entry at once (relaxed atomics suffice).
//! - The table lives for one outgoing migration: a new one starts empty.
//!
//! What a false match would cost is a stale page, so the digest is 128
//! bits (a collision among the pages of one migration is about as likely
//! as 2^-100), not the CRC-32 each frame carries. Memory: 16 bytes a page,
//! 0.4% of guest RAM.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_128;

/// The digest of the last copy of each page sent; 0 for none.
pub struct SentDigests {
    /// Two words a page: high then low half of the digest.
    words: Box<[AtomicU64]>,
}

impl SentDigests {
    /// A table for `pages` pages, all unknown.
    pub fn new(pages: usize) -> Self {
        Self {
            words: (0..pages * 2).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether `bytes`, the copy of `page` about to be sent, is the copy
    /// the destination already holds. If not, it is recorded as the copy
    /// sent. A page outside the table is never unchanged.
    pub fn unchanged_or_record(&self, page: usize, bytes: &[u8]) -> bool {
        let Some(slot) = self.words.get(page * 2..page * 2 + 2) else {
            return false;
        };
        let digest = xxh3_128(bytes);
        let [hi, lo] = [digest >> 64, digest & u128::from(u64::MAX)]
            .map(|half| u64::try_from(half).expect("64 bits"));
        // 0 means "none": a page whose digest is 0 is always sent.
        if digest != 0
            && slot[0].load(Ordering::Relaxed) == hi
            && slot[1].load(Ordering::Relaxed) == lo
        {
            return true;
        }
        slot[0].store(hi, Ordering::Relaxed);
        slot[1].store(lo, Ordering::Relaxed);
        false
    }

    /// Forget `count` pages from `first`: they were sent without data (as
    /// zero), so the destination no longer holds the copy recorded.
    pub fn forget(&self, first: usize, count: usize) {
        let end = first.saturating_add(count).saturating_mul(2);
        let range = first.saturating_mul(2)..end.min(self.words.len());
        for w in self.words.get(range).unwrap_or(&[]) {
            w.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_unchanged_only_against_the_copy_last_sent() {
        let t = SentDigests::new(4);
        let (a, b) = ([7u8; 4096], [8u8; 4096]);
        assert!(!t.unchanged_or_record(1, &a), "nothing sent yet");
        assert!(t.unchanged_or_record(1, &a));
        assert!(!t.unchanged_or_record(2, &a), "another page");
        assert!(!t.unchanged_or_record(1, &b));
        assert!(!t.unchanged_or_record(1, &a), "b was the last copy sent");
        assert!(t.unchanged_or_record(1, &a));
        assert!(!t.unchanged_or_record(9, &a), "outside the table");
        assert!(!t.unchanged_or_record(9, &a));
    }

    #[test]
    fn a_page_sent_as_zero_is_sent_again() {
        let t = SentDigests::new(4);
        let a = [7u8; 4096];
        for page in 0..4 {
            t.unchanged_or_record(page, &a);
        }
        t.forget(1, 2);
        t.forget(3, 100); // clipped at the end
        t.forget(50, 1); // outside: nothing
        assert!(t.unchanged_or_record(0, &a));
        for page in 1..4 {
            assert!(!t.unchanged_or_record(page, &a), "page {page}");
        }
    }
}
