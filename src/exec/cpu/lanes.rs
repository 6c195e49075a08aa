//! Vectors of 8 (AVX2) and 16 (AVX-512) floats behind one trait, so that a kernel is
//! written once and compiled for each width: the depthwise planes in lanes
//! (`depthwise_lanes`) and Winograd's transforms (`winograd`).

use std::arch::x86_64::*;

use super::partial_avx2;

/// Lanes of the widest vector.
pub(super) const MAX_LANES: usize = 16;

/// The mask of the first `n` lanes of an AVX-512 vector (all 16 from `n = 16` up).
#[inline(always)]
pub(super) fn first_lanes(n: usize) -> __mmask16 {
    if n >= MAX_LANES {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// A vector of `N` floats and what the kernels written over it do with it. Every method
/// is inlined into a function compiled with the vector's target features.
pub(super) trait Lanes: Copy {
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// The first `n` values from `p`, zero in the other lanes, reading nothing past them.
    unsafe fn load_first(p: *const f32, n: usize) -> Self;
    unsafe fn store(p: *mut f32, v: Self);
    /// Stores the first `n` lanes, touching nothing past them.
    unsafe fn store_first(p: *mut f32, v: Self, n: usize);
    /// Stores lanes `lo..hi` (`lo < hi ≤ N`) to `p + lo ..`, touching nothing else: `p`
    /// itself need not point into the buffer.
    unsafe fn store_lanes(p: *mut f32, v: Self, lo: usize, hi: usize);
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    unsafe fn min(a: Self, b: Self) -> Self;
    /// Rows `0..N` of an `N × N` block become its columns (entries past `N` untouched).
    unsafe fn transpose(r: &mut [Self; MAX_LANES]);
    /// The first `n` values from `p` (all from `N` up), the other lanes unspecified: a
    /// vector of 8 reads all 8 (the caller keeps 7 readable values past the first `n`,
    /// where a plain load is cheaper than a partial one), AVX-512 masks its load and
    /// reads nothing past them.
    unsafe fn load_upto(p: *const f32, n: usize) -> Self;
    /// `a` and `b` interleaved (`a0 b0 a1 b1 …`): its first `N` values, then the rest.
    unsafe fn interleave(a: Self, b: Self) -> [Self; 2];
    /// Values `p .. p + N` of a row of `w` values from `row` with a zero before it and
    /// zeros after it (value `q` is `row[q - 1]` for `1 ≤ q ≤ w`, else zero), reading
    /// nothing outside the row: a padded row loaded straight from its plane, with no
    /// copy through memory that the next loads would wait on.
    unsafe fn load_padded(row: *const f32, w: usize, p: usize) -> Self;
    /// The even and the odd values of the `2N` of `a` then `b`, each in order.
    unsafe fn split_pair(a: Self, b: Self) -> (Self, Self);
    /// `a`'s lanes from the second on, then lane `K` of `b`: a row of values one further.
    unsafe fn shift_in<const K: usize>(a: Self, b: Self) -> Self;
}

/// The lanes `l < n` with `1 ≤ p + l ≤ w`: where [`Lanes::load_padded`] reads the row.
#[inline(always)]
fn padded_lanes(w: usize, p: usize, n: usize) -> std::ops::Range<usize> {
    let lo = usize::from(p == 0);
    let hi = (w + 1).saturating_sub(p).min(n);
    lo..hi.max(lo)
}

#[derive(Clone, Copy)]
pub(super) struct Ymm(__m256);

impl Lanes for Ymm {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Ymm(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Ymm(_mm256_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Ymm(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self {
        Ymm(partial_avx2::load_first(p, n))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        _mm256_storeu_ps(p, v.0)
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: Self, n: usize) {
        partial_avx2::store_first(p, v.0, n)
    }
    #[inline(always)]
    unsafe fn store_lanes(p: *mut f32, v: Self, lo: usize, hi: usize) {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // All bits set in lanes lo ≤ lane < hi.
        let mask = _mm256_and_si256(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), lane),
            _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo as i32 - 1)),
        );
        // Masked-off lanes are neither written nor checked for faults.
        _mm256_maskstore_ps(p, mask, v.0)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        Ymm(_mm256_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Ymm(_mm256_add_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Ymm(_mm256_sub_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Ymm(_mm256_max_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        Ymm(_mm256_min_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn transpose(r: &mut [Self; MAX_LANES]) {
        let t0 = _mm256_unpacklo_ps(r[0].0, r[1].0);
        let t1 = _mm256_unpackhi_ps(r[0].0, r[1].0);
        let t2 = _mm256_unpacklo_ps(r[2].0, r[3].0);
        let t3 = _mm256_unpackhi_ps(r[2].0, r[3].0);
        let t4 = _mm256_unpacklo_ps(r[4].0, r[5].0);
        let t5 = _mm256_unpackhi_ps(r[4].0, r[5].0);
        let t6 = _mm256_unpacklo_ps(r[6].0, r[7].0);
        let t7 = _mm256_unpackhi_ps(r[6].0, r[7].0);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        r[0] = Ymm(_mm256_permute2f128_ps::<0x20>(u0, u4));
        r[1] = Ymm(_mm256_permute2f128_ps::<0x20>(u1, u5));
        r[2] = Ymm(_mm256_permute2f128_ps::<0x20>(u2, u6));
        r[3] = Ymm(_mm256_permute2f128_ps::<0x20>(u3, u7));
        r[4] = Ymm(_mm256_permute2f128_ps::<0x31>(u0, u4));
        r[5] = Ymm(_mm256_permute2f128_ps::<0x31>(u1, u5));
        r[6] = Ymm(_mm256_permute2f128_ps::<0x31>(u2, u6));
        r[7] = Ymm(_mm256_permute2f128_ps::<0x31>(u3, u7));
    }
    #[inline(always)]
    unsafe fn load_upto(p: *const f32, _n: usize) -> Self {
        Ymm(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn interleave(a: Self, b: Self) -> [Self; 2] {
        let (lo, hi) = (_mm256_unpacklo_ps(a.0, b.0), _mm256_unpackhi_ps(a.0, b.0));
        [
            Ymm(_mm256_permute2f128_ps::<0x20>(lo, hi)),
            Ymm(_mm256_permute2f128_ps::<0x31>(lo, hi)),
        ]
    }
    #[inline(always)]
    unsafe fn load_padded(row: *const f32, w: usize, p: usize) -> Self {
        let on = padded_lanes(w, p, 8);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // All bits set in the lanes `on` (lo ≤ lane < hi), whose values the load reads.
        let mask = _mm256_and_si256(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(on.end as i32), lane),
            _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(on.start as i32 - 1)),
        );
        // Masked-off lanes are not read and do not fault.
        Ymm(_mm256_maskload_ps(
            row.wrapping_add(p).wrapping_sub(1),
            mask,
        ))
    }
    #[inline(always)]
    unsafe fn split_pair(a: Self, b: Self) -> (Self, Self) {
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(a.0, b.0);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a.0, b.0);
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (Ymm(order(even)), Ymm(order(odd)))
    }
    #[inline(always)]
    unsafe fn shift_in<const K: usize>(a: Self, b: Self) -> Self {
        let down = _mm256_permutevar8x32_ps(a.0, _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 7));
        let from_b = _mm256_permutevar8x32_ps(b.0, _mm256_set1_epi32(K as i32));
        Ymm(_mm256_blend_ps::<0b1000_0000>(down, from_b))
    }
}

#[derive(Clone, Copy)]
pub(super) struct Zmm(__m512);

impl Lanes for Zmm {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Zmm(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Zmm(_mm512_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Zmm(_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self {
        // Masked-off lanes are not read (no fault past them).
        Zmm(_mm512_maskz_loadu_ps(first_lanes(n), p))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        _mm512_storeu_ps(p, v.0)
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: Self, n: usize) {
        _mm512_mask_storeu_ps(p, first_lanes(n), v.0)
    }
    #[inline(always)]
    unsafe fn store_lanes(p: *mut f32, v: Self, lo: usize, hi: usize) {
        // Masked-off lanes are neither written nor checked for faults.
        _mm512_mask_storeu_ps(p, first_lanes(hi) & !first_lanes(lo), v.0)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        Zmm(_mm512_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Zmm(_mm512_add_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Zmm(_mm512_sub_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Zmm(_mm512_max_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        Zmm(_mm512_min_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn transpose(r: &mut [Self; MAX_LANES]) {
        // Within each 128-bit quarter, as the 8 × 8 transpose does: u[4i + m]'s quarter
        // j then holds column 4j + m of rows 4i..4i + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let t0 = _mm512_unpacklo_ps(r[4 * i].0, r[4 * i + 1].0);
            let t1 = _mm512_unpackhi_ps(r[4 * i].0, r[4 * i + 1].0);
            let t2 = _mm512_unpacklo_ps(r[4 * i + 2].0, r[4 * i + 3].0);
            let t3 = _mm512_unpackhi_ps(r[4 * i + 2].0, r[4 * i + 3].0);
            u[4 * i] = _mm512_shuffle_ps::<0x44>(t0, t2);
            u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t0, t2);
            u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
            u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t1, t3);
        }
        // Then the 4 × 4 quarters: column 4j + m takes quarter j of u[4i + m], i = 0..4.
        for m in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x44>(u[m], u[4 + m]);
            let v1 = _mm512_shuffle_f32x4::<0xEE>(u[m], u[4 + m]);
            let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + m], u[12 + m]);
            let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + m], u[12 + m]);
            r[m] = Zmm(_mm512_shuffle_f32x4::<0x88>(v0, v2));
            r[4 + m] = Zmm(_mm512_shuffle_f32x4::<0xDD>(v0, v2));
            r[8 + m] = Zmm(_mm512_shuffle_f32x4::<0x88>(v1, v3));
            r[12 + m] = Zmm(_mm512_shuffle_f32x4::<0xDD>(v1, v3));
        }
    }
    #[inline(always)]
    unsafe fn load_upto(p: *const f32, n: usize) -> Self {
        Zmm::load_first(p, n)
    }
    #[inline(always)]
    unsafe fn interleave(a: Self, b: Self) -> [Self; 2] {
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        [
            Zmm(_mm512_permutex2var_ps(a.0, lo, b.0)),
            Zmm(_mm512_permutex2var_ps(a.0, hi, b.0)),
        ]
    }
    #[inline(always)]
    unsafe fn load_padded(row: *const f32, w: usize, p: usize) -> Self {
        let on = padded_lanes(w, p, 16);
        let mask = first_lanes(on.end) & !first_lanes(on.start);
        // Masked-off lanes are not read and do not fault.
        Zmm(_mm512_maskz_loadu_ps(
            mask,
            row.wrapping_add(p).wrapping_sub(1),
        ))
    }
    #[inline(always)]
    unsafe fn split_pair(a: Self, b: Self) -> (Self, Self) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (
            Zmm(_mm512_permutex2var_ps(a.0, even, b.0)),
            Zmm(_mm512_permutex2var_ps(a.0, odd, b.0)),
        )
    }
    #[inline(always)]
    unsafe fn shift_in<const K: usize>(a: Self, b: Self) -> Self {
        let k = 16 + K as i32;
        let idx = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, k);
        Zmm(_mm512_permutex2var_ps(a.0, idx, b.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cpu::gemm::Isa;
    use rand::Rng;

    /// A vector's lanes as floats.
    unsafe fn lanes<V: Lanes>(v: V) -> Vec<f32> {
        let mut out = [0f32; MAX_LANES];
        V::store(out.as_mut_ptr(), v);
        out[..V::N].to_vec()
    }

    /// Padded loads, even/odd splits and shifts against their definitions, over rows of
    /// every length up to four vectors and every start. The values around each row are
    /// NaN, so a lane that read outside the row fails the comparison.
    unsafe fn padded_rows_split_and_shift<V: Lanes>() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let n = V::N;
        for w in 1..=4 * n {
            let mut buf = vec![f32::NAN; w + 2 * n];
            for v in &mut buf[n..n + w] {
                *v = rng.random_range(-1.0..1.0);
            }
            let row = buf[n..].as_ptr();
            let padded = |q: usize| {
                if (1..=w).contains(&q) {
                    buf[n + q - 1]
                } else {
                    0.0
                }
            };
            for p in 0..w + 2 {
                let a = V::load_padded(row, w, p);
                let want: Vec<f32> = (p..p + n).map(padded).collect();
                assert_eq!(lanes(a), want, "w {w}, p {p}");
                let b = V::load_padded(row, w, p + n);
                let (even, odd) = V::split_pair(a, b);
                let all: Vec<f32> = (p..p + 2 * n).map(padded).collect();
                let pick = |r: usize| all.iter().skip(r).step_by(2).copied().collect::<Vec<_>>();
                assert_eq!(lanes(even), pick(0), "w {w}, p {p}");
                assert_eq!(lanes(odd), pick(1), "w {w}, p {p}");
                let shifted = |k: usize| {
                    let mut v = lanes(a)[1..].to_vec();
                    v.push(lanes(b)[k]);
                    v
                };
                assert_eq!(lanes(V::shift_in::<0>(a, b)), shifted(0), "w {w}, p {p}");
                assert_eq!(lanes(V::shift_in::<1>(a, b)), shifted(1), "w {w}, p {p}");
            }
        }
    }

    /// Stores of lanes `lo..hi` through a pointer placed `lo` before the buffer's
    /// first written value, over every range: those lanes land, nothing else changes.
    unsafe fn stores_of_some_lanes<V: Lanes>() {
        let n = V::N;
        let vals: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
        let v = V::load(vals.as_ptr());
        for lo in 0..n {
            for hi in lo + 1..=n {
                let mut buf = vec![f32::NAN; n];
                // The vector's lane lo goes to buf[0]: lane 0 would lie before it.
                V::store_lanes(buf.as_mut_ptr().wrapping_sub(lo), v, lo, hi);
                for (i, b) in buf.iter().enumerate() {
                    if i < hi - lo {
                        assert_eq!(*b, vals[lo + i], "lo {lo}, hi {hi}, at {i}");
                    } else {
                        assert!(b.is_nan(), "lo {lo}, hi {hi}: wrote at {i}");
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn on_avx2() {
        padded_rows_split_and_shift::<Ymm>();
        stores_of_some_lanes::<Ymm>()
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn on_avx512() {
        padded_rows_split_and_shift::<Zmm>();
        stores_of_some_lanes::<Zmm>()
    }

    #[test]
    fn padded_loads_splits_shifts_and_partial_stores_match_their_definitions() {
        for isa in crate::exec::cpu::test_isas() {
            // SAFETY: the ISA is one this CPU runs.
            match isa {
                Isa::Avx512 => unsafe { on_avx512() },
                Isa::Avx2 => unsafe { on_avx2() },
                Isa::Portable => {}
            }
        }
    }
}
