//! Pages the dirty-ring reaper and vCPU threads set aside for the engine's
//! next harvest.
//!
//! Why not just a bitmap: taking a full-RAM bitmap costs O(RAM) (OR it into
//! the engine's set, then clear it) however few pages it holds, and that
//! cost sits in the final harvest, inside the downtime. So the set also
//! keeps the list of its pages while it is sparse (at most one page per
//! bitmap word on average), and is taken in O(pages); a denser set drops the
//! list and is taken by whole-bitmap OR, which is then the cheaper way.

use crate::dirty::DirtyBitmap;

/// A set of pages, cheap to take while sparse.
pub struct Pending {
    bits: DirtyBitmap,
    /// The set's pages, while `!dense`.
    list: Vec<usize>,
    /// Too many pages for the list: take by whole-bitmap OR.
    dense: bool,
    /// Longest list kept.
    cap: usize,
}

impl Pending {
    /// An empty set over `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            bits: DirtyBitmap::new(pages),
            list: Vec::new(),
            dense: false,
            cap: pages.div_ceil(64),
        }
    }

    /// Add a page.
    pub fn add(&mut self, page: usize) {
        if self.bits.get(page) {
            return;
        }
        self.bits.set(page);
        if self.dense {
            return;
        }
        if self.list.len() < self.cap {
            self.list.push(page);
        } else {
            self.dense = true;
            self.list = Vec::new();
        }
    }

    /// Every page.
    pub fn set_all(&mut self) {
        self.bits = DirtyBitmap::all(self.bits.len());
        self.dense = true;
        self.list = Vec::new();
    }

    /// Pages in the set.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        if self.dense {
            self.bits.count()
        } else {
            self.list.len() as u64
        }
    }

    /// Move every page into both `a` and `b` (same size as the set) and
    /// empty the set.
    pub fn take_into(&mut self, a: &mut DirtyBitmap, b: &mut DirtyBitmap) {
        if self.dense {
            a.union_with(&self.bits);
            b.union_with(&self.bits);
            self.bits.clear();
            self.dense = false;
        } else {
            for p in self.list.drain(..) {
                a.set(p);
                b.set(p);
                self.bits.unset(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_set_is_taken_page_by_page_and_left_empty() {
        let mut p = Pending::new(64 * 4);
        for page in [3, 200, 3, 77] {
            p.add(page);
        }
        assert_eq!(p.count(), 3);
        let (mut a, mut b) = (DirtyBitmap::new(256), DirtyBitmap::new(256));
        a.set(5);
        p.take_into(&mut a, &mut b);
        assert_eq!(a.iter_ones().collect::<Vec<_>>(), vec![3, 5, 77, 200]);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![3, 77, 200]);
        assert_eq!(p.count(), 0);
        // The bits were cleared too: the same page can come back.
        p.add(3);
        assert_eq!(p.count(), 1);
    }

    #[test]
    fn dense_set_falls_back_to_the_bitmap_without_losing_a_page() {
        let mut p = Pending::new(64 * 4); // list holds at most 4
        for page in 0..10 {
            p.add(page * 7);
        }
        assert!(p.dense);
        assert_eq!(p.count(), 10);
        let (mut a, mut b) = (DirtyBitmap::new(256), DirtyBitmap::new(256));
        p.take_into(&mut a, &mut b);
        assert_eq!(
            a.iter_ones().collect::<Vec<_>>(),
            (0..10).map(|i| i * 7).collect::<Vec<_>>()
        );
        assert_eq!(a, b);
        assert_eq!(p.count(), 0);
        assert!(!p.dense);
        p.set_all();
        assert_eq!(p.count(), 256);
        p.take_into(&mut a, &mut b);
        assert_eq!(a.count(), 256);
    }
}
