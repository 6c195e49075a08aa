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

use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::thread::LocalKey;

use super::gemm::Acc;

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
pub fn line_offset(v: &[f32]) -> usize {
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

std::thread_local! {
    /// Each thread's spare scratch vector (see [`Spare`]).
    static SPARE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Each thread's spare GEMM accumulators (see [`Spare`]).
    static SPARE_ACCS: Cell<Vec<Acc>> = const { Cell::new(Vec::new()) };
}

/// What a thread keeps a spare vector of: each kind has its own thread-local slot.
pub trait SpareKind: Sized + 'static {
    /// The calling thread's slot for this kind.
    fn slot() -> &'static LocalKey<Cell<Vec<Self>>>;
}

impl SpareKind for f32 {
    fn slot() -> &'static LocalKey<Cell<Vec<f32>>> {
        &SPARE
    }
}

impl SpareKind for Acc {
    fn slot() -> &'static LocalKey<Cell<Vec<Acc>>> {
        &SPARE_ACCS
    }
}

/// A scratch vector that lives with its thread across tasks, layers and passes. A
/// parallel loop's per-task scratch (a GEMM task's packed panel, a depthwise group's
/// interleaved strip) taken fresh for each of rayon's splits was allocated and
/// zero-filled again every time (up to 50 KB each, several times per layer). Whole
/// passes, 2 threads, in-process pairs (100, three runs each): MobileNetV2 at batch 1
/// took 0.990–0.995 of the time, EfficientNet-Lite0 0.991–0.997; at batch 8 (20 pairs)
/// they and ResNet-18 1.00.
///
/// A GEMM task's accumulators (one [`Acc`], 1.5 KB, per tile it runs, kept across its
/// K blocks) were still taken fresh per split: zero-filling them was 1.2% of
/// MobileNetV2's samples at batch 1 (`perf`, 2 threads) and freeing them 0.65%. Held
/// by the thread instead, whole passes took (2 threads, in-process pairs against a
/// fresh vector per split, 40 pairs): MobileNetV2 0.985–0.986 of the time at batch 1,
/// EfficientNet-Lite0 0.979–0.986, 0.973 and 0.995 for MobileNetV2 at batch 8 and at
/// budget 0.5; the ResNets 0.99–1.01 (noise as large; a first run of 10 pairs of
/// ResNet-18 at batch 8 read 1.04).
///
/// Taking it leaves the thread an empty vector, so a nested take (rayon runs another
/// task on a thread waiting inside one) gets its own; on drop the larger one stays. A
/// thread so holds the largest scratch it has needed, for as long as it lives: a packed
/// panel of a 3×3 layer over 512 channels is 590 KB.
pub struct Spare<T: SpareKind = f32>(Vec<T>);

impl<T: SpareKind> Spare<T> {
    /// The calling thread's spare vector.
    pub fn take() -> Self {
        // A thread tearing down its locals has no spare to give: a fresh vector then.
        Spare(T::slot().try_with(Cell::take).unwrap_or_default())
    }
}

impl<T: SpareKind> Drop for Spare<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        // Nothing to keep it in once the thread's locals are gone: it is freed.
        let _ = T::slot().try_with(|s| {
            let held = s.take();
            s.set(if held.capacity() >= v.capacity() {
                held
            } else {
                v
            });
        });
    }
}

impl<T: SpareKind> Deref for Spare<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: SpareKind> DerefMut for Spare<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::NR;
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

    /// The spare of one kind through a take, a nested take and the drops: `one` and
    /// `two` are distinct values of the kind.
    fn spare_comes_back<T: SpareKind + Copy + PartialEq + std::fmt::Debug>(one: T, two: T) {
        let mut a = Spare::<T>::take();
        assert!(a.is_empty());
        a.reserve(100);
        a.extend_from_slice(&[one, two, one]);
        let cap = a.capacity();
        {
            // Taken while `a` is out: empty, not `a`'s values.
            let mut b = Spare::<T>::take();
            assert!(b.is_empty());
            b.push(two);
        }
        drop(a);
        // The larger of the two (`a`, 100 values or more) stayed, with what it held.
        let c = Spare::<T>::take();
        assert_eq!(&c[..], &[one, two, one]);
        assert!(c.capacity() >= cap);
    }

    #[test]
    fn a_threads_spare_vector_comes_back_and_a_nested_take_gets_its_own() {
        // A thread of its own, so that no other test's spare is in the way.
        std::thread::spawn(|| {
            spare_comes_back(1.0f32, 9.0);
            // Accumulators have their own slot: the scratch held above stays apart.
            spare_comes_back([[1.0; NR]; 12], [[2.0; NR]; 12]);
            assert_eq!(&Spare::<f32>::take()[..], &[1.0, 9.0, 1.0]);
        })
        .join()
        .unwrap();
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
