//! Recycles f32 buffers across layers and forward passes. A fresh large allocation costs
//! page faults and the kernel's zeroing on every layer (measured: about a quarter of
//! MobileNetV2's time at batch 8). A recycled `Vec` cut to a shorter length and grown
//! again would be zeroed again past the cut (measured: 7 million values per dense
//! ResNet-50 pass, 11 million at budget 0.5), so a buffer is a [`Buf`]: its `Vec` keeps
//! every value ever written, and only a length says how many the current user sees.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Free buffers, shared by concurrent forward passes.
#[derive(Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

/// Buffers kept at most; beyond this, returned buffers are dropped.
const KEEP: usize = 64;

/// A buffer of `len` values: the first `len` of its `Vec`, which may hold more (values
/// a previous user wrote).
#[derive(Debug, Default)]
pub struct Buf {
    v: Vec<f32>,
    len: usize,
}

impl Buf {
    /// The values as a `Vec` of exactly `len`.
    pub fn into_vec(mut self) -> Vec<f32> {
        self.v.truncate(self.len);
        self.v
    }
}

impl From<Vec<f32>> for Buf {
    fn from(v: Vec<f32>) -> Buf {
        Buf { len: v.len(), v }
    }
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[..self.len]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[..self.len]
    }
}

impl BufferPool {
    /// A buffer of `len` values with whatever a previous user left in it, for callers that
    /// overwrite every value: the free buffer of the fewest values that holds `len`, else
    /// the biggest, grown (zeros past what it held), else a new one.
    pub fn take_dirty(&self, len: usize) -> Buf {
        let mut v = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let fit = (0..free.len())
                .filter(|&i| free[i].len() >= len)
                .min_by_key(|&i| free[i].len());
            let pick = fit.or_else(|| (0..free.len()).max_by_key(|&i| free[i].len()));
            pick.map(|i| free.swap_remove(i)).unwrap_or_default()
        };
        if v.len() < len {
            v.resize(len, 0.0);
        }
        Buf { v, len }
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
        // Longer than any free buffer: grown with zeros.
        let mut a = pool.take_dirty(2);
        a.copy_from_slice(&[7.0, 7.0]);
        pool.give(a);
        let grown = pool.take_dirty(10);
        assert_eq!(grown.len(), 10);
        assert_eq!(&grown[8..], &[0.0, 0.0]);
    }
}
