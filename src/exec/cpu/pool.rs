//! Recycles f32 buffers across layers and forward passes. A fresh large allocation costs
//! page faults and the kernel's zeroing on every layer (measured: about a quarter of
//! MobileNetV2's time at batch 8). A recycled `Vec` cut to a shorter length and grown
//! again would be zeroed again past the cut (measured: 7 million values per dense
//! ResNet-50 pass, 11 million at budget 0.5), so a buffer is a [`Buf`]: its `Vec` keeps
//! every value ever written, and only a length says how many the current user sees.
//!
//! A buffer starts on a 64-byte cache line ([`line_aligned`]). The allocator aligns a
//! large `Vec<f32>` to 16 bytes only (glibc's mapped blocks start 16 bytes into a page),
//! so every row the micro-kernels load as vectors of 16 floats, a panel of 32 positions
//! read in place from a plane among them, spanned two lines, and so did every vector
//! store of an output row.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Free buffers, shared by concurrent forward passes.
#[derive(Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

/// Buffers kept at most; beyond this, returned buffers are dropped.
const KEEP: usize = 64;

/// Floats in a 64-byte cache line: the most a buffer's start moves to begin on one.
pub const LINE: usize = 16;

/// Where in `v` the first value that starts a cache line is (below [`LINE`]).
fn line_offset(v: &[f32]) -> usize {
    // An f32's address is a multiple of 4, so this is a whole number of floats.
    (v.as_ptr() as usize).wrapping_neg() % 64 / std::mem::size_of::<f32>()
}

/// `len` values of `v` that start on a cache line, `v` grown (with zeros) to hold them.
pub fn line_aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + LINE {
        v.resize(len + LINE, 0.0);
    }
    let off = line_offset(v);
    &mut v[off..off + len]
}

/// A buffer of `len` values: `len` of its `Vec` from `off`, the first value on a cache
/// line; the `Vec` may hold more (values a previous user wrote).
#[derive(Debug, Default)]
pub struct Buf {
    v: Vec<f32>,
    off: usize,
    len: usize,
}

impl Buf {
    /// The values as a `Vec` of exactly `len`.
    pub fn into_vec(mut self) -> Vec<f32> {
        self.v.copy_within(self.off..self.off + self.len, 0);
        self.v.truncate(self.len);
        self.v
    }
}

impl From<Vec<f32>> for Buf {
    /// The `Vec` as it is (not moved to a cache line).
    fn from(v: Vec<f32>) -> Buf {
        Buf {
            len: v.len(),
            off: 0,
            v,
        }
    }
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.off..self.off + self.len]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.off..self.off + self.len]
    }
}

impl BufferPool {
    /// A buffer of `len` values with whatever a previous user left in it, for callers that
    /// overwrite every value, starting on a cache line: the free buffer of the fewest
    /// values that holds `len` from its first line, else the biggest, grown, else a new
    /// one.
    pub fn take_dirty(&self, len: usize) -> Buf {
        let mut v = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let fit = (0..free.len())
                .filter(|&i| free[i].len() >= len + LINE)
                .min_by_key(|&i| free[i].len());
            let pick = fit.or_else(|| (0..free.len()).max_by_key(|&i| free[i].len()));
            pick.map(|i| free.swap_remove(i)).unwrap_or_default()
        };
        line_aligned(&mut v, len);
        let off = line_offset(&v);
        Buf { v, off, len }
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, b: Buf) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if !b.v.is_empty() && free.len() < KEEP {
            free.push(b.v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_shows_its_length_and_keeps_what_lies_beyond() {
        let pool = BufferPool::default();
        let mut b = pool.take_dirty(8);
        assert_eq!(b.len(), 8);
        b.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        pool.give(b);
        // Shorter: the same allocation, cut.
        let short = pool.take_dirty(3);
        assert_eq!(&short[..], &[0.0, 1.0, 2.0]);
        pool.give(short);
        // Back to the longer length: the values past the cut were not zeroed again.
        let long = pool.take_dirty(6);
        assert_eq!(&long[..], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(long.into_vec(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // Longer than any free buffer: grown, and on a cache line again.
        let mut a = pool.take_dirty(2);
        a.copy_from_slice(&[7.0, 7.0]);
        pool.give(a);
        let grown = pool.take_dirty(100_000);
        assert_eq!(grown.len(), 100_000);
        assert_eq!(grown.as_ptr() as usize % 64, 0);
    }

    #[test]
    fn buffers_start_on_a_cache_line_whatever_the_allocation() {
        let pool = BufferPool::default();
        for len in [1, 15, 16, 17, 1000, 40_000, 300_000] {
            let b = pool.take_dirty(len);
            assert_eq!(b.as_ptr() as usize % 64, 0, "len {len}");
            assert_eq!(b.len(), len);
            pool.give(b);
        }
        // A task's own Vec, empty or already long enough.
        let mut v = Vec::new();
        for len in [20, 7, 5000] {
            let a = line_aligned(&mut v, len);
            assert_eq!((a.as_ptr() as usize % 64, a.len()), (0, len));
        }
    }
}
