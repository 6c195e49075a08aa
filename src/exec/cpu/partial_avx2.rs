//! Loads and stores of the first `n` lanes of an AVX2 vector, as plain loads and stores
//! of 4, 2 and 1 values. `vmaskmovps` does the same in one instruction, but on AMD's
//! cores a masked store is far slower (one per 7×7 depthwise plane took 9% of that
//! kernel's samples).

use std::arch::x86_64::*;

/// Lanes of a vector.
const LANES: usize = 8;

/// The first `n` of the 8 floats from `p` (all 8 from `n = 8` up), zero in the other
/// lanes, read without touching memory past them.
///
/// # Safety
/// The CPU supports AVX; `p` is valid for reading `min(n, 8)` floats.
#[inline(always)]
pub unsafe fn load_first(p: *const f32, n: usize) -> __m256 {
    #[inline(always)]
    unsafe fn part(p: *const f32, n: usize) -> __m128 {
        let two = || _mm_castpd_ps(_mm_set_sd(p.cast::<f64>().read_unaligned()));
        match n {
            0 => _mm_setzero_ps(),
            1 => _mm_load_ss(p),
            2 => two(),
            3 => _mm_movelh_ps(two(), _mm_load_ss(p.add(2))),
            _ => _mm_loadu_ps(p),
        }
    }
    match n {
        0..=4 => _mm256_set_m128(_mm_setzero_ps(), part(p, n)),
        5..LANES => _mm256_set_m128(part(p.add(4), n - 4), _mm_loadu_ps(p)),
        _ => _mm256_loadu_ps(p),
    }
}

/// Stores the first `n` lanes of `v` at `p` (all 8 from `n = 8` up), touching nothing
/// past them.
///
/// # Safety
/// The CPU supports AVX; `p` is valid for writing `min(n, 8)` floats.
#[inline(always)]
pub unsafe fn store_first(p: *mut f32, v: __m256, n: usize) {
    if n >= LANES {
        return _mm256_storeu_ps(p, v);
    }
    let (mut at, mut n, mut part) = (p, n, _mm256_castps256_ps128(v));
    if n >= 4 {
        _mm_storeu_ps(at, part);
        (at, n, part) = (at.add(4), n - 4, _mm256_extractf128_ps::<1>(v));
    }
    if n >= 2 {
        at.cast::<f64>()
            .write_unaligned(_mm_cvtsd_f64(_mm_castps_pd(part)));
        (at, n, part) = (at.add(2), n - 2, _mm_movehl_ps(part, part));
    }
    if n == 1 {
        _mm_store_ss(at, part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every count from 0 to 9 reads and writes exactly the first lanes, inside a buffer
    /// whose neighbours must keep their values.
    #[test]
    fn partial_loads_and_stores_touch_exactly_the_first_lanes() {
        if !std::arch::is_x86_feature_detected!("avx") {
            return;
        }
        let src: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        for n in 0..=9 {
            // SAFETY: AVX is present; the loads read at most 8 of the 12 values, and the
            // stores write at most 8 floats from index 2 of a 12-float buffer.
            let (got, mut dst) = unsafe {
                let v = load_first(src.as_ptr(), n);
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                let mut dst = [-1f32; 12];
                store_first(dst.as_mut_ptr().add(2), _mm256_set1_ps(7.0), n);
                (lanes, dst)
            };
            let want: Vec<f32> = (0..8).map(|l| if l < n { src[l] } else { 0.0 }).collect();
            assert_eq!(got.to_vec(), want, "load of {n}");
            let stored = dst.iter().filter(|&&v| v == 7.0).count();
            assert_eq!(stored, n.min(8), "store of {n}: {dst:?}");
            assert!(
                dst[2..2 + n.min(8)].iter().all(|&v| v == 7.0),
                "store of {n}"
            );
            dst[2..2 + n.min(8)].fill(-1.0);
            assert!(
                dst.iter().all(|&v| v == -1.0),
                "store of {n} wrote past its lanes"
            );
        }
    }
}
