//! The classifier: each output row of weights times each sample's features.
//!
//! At batch 1 a classifier is a matrix–vector product that reads every weight once (a
//! 1280 → 1000 classifier's are 5 MB, from L3 each pass), so what counts is keeping
//! loads in flight and not the multiply-adds. Four rows go together: each load of the
//! features serves four rows, and the four rows' weights are four streams the hardware
//! prefetcher follows at once. A sample's outputs do not depend on the batch it is in,
//! nor on which rows a thread is given.

use std::ops::Range;

use super::gemm::Isa;
use super::ops::dot;

/// Rows of weights that go together.
const ROWS: usize = 4;

/// For each row `m` of `rows` and each of the `batch` samples of `x` (`fin` features
/// each), `out[(m - rows.start) · batch + s] = w[m] · x[s]`; `weight` is row-major with
/// `fin` columns and `out` holds `rows.len() · batch` values.
pub(super) fn products(
    isa: Isa,
    weight: &[f32],
    fin: usize,
    x: &[f32],
    batch: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    assert!(weight.len() >= rows.end * fin && x.len() >= batch * fin);
    assert_eq!(out.len(), rows.len() * batch, "output size");
    let mut m = rows.start;
    for o in out.chunks_mut(ROWS * batch) {
        let n = o.len() / batch;
        let w = &weight[m * fin..(m + n) * fin];
        for s in 0..batch {
            let xs = &x[s * fin..(s + 1) * fin];
            let mut sums = [0f32; ROWS];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detect` found AVX-512F; `w` holds `n` rows of `fin` values.
                Isa::Avx512 if n == ROWS => unsafe { avx512::four(w, xs, &mut sums) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detect` found AVX2 and FMA; as above.
                Isa::Avx2 if n == ROWS => unsafe { avx2::four(w, xs, &mut sums) },
                _ => {
                    for (r, v) in sums.iter_mut().take(n).enumerate() {
                        *v = dot(&w[r * fin..(r + 1) * fin], xs);
                    }
                }
            }
            for (r, &v) in sums.iter().take(n).enumerate() {
                o[r * batch + s] = v;
            }
        }
        m += n;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::ROWS;

    /// The dot products of four rows of `w` (`x.len()` values each) with `x`, in sixteen
    /// lanes and two accumulators per row.
    ///
    /// # Safety
    /// AVX-512F is available and `w.len() ≥ 4 · x.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn four(w: &[f32], x: &[f32], sums: &mut [f32; ROWS]) {
        let fin = x.len();
        debug_assert!(w.len() >= ROWS * fin);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        let mut i = 0;
        while i + 32 <= fin {
            let (x0, x1) = (_mm512_loadu_ps(xp.add(i)), _mm512_loadu_ps(xp.add(i + 16)));
            for (r, a) in acc.iter_mut().enumerate() {
                let row = wp.add(r * fin + i);
                a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(row), x0, a[0]);
                a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(row.add(16)), x1, a[1]);
            }
            i += 32;
        }
        while i < fin {
            // The last values, sixteen or fewer at a time, masked.
            let mask: __mmask16 = (((1u32 << (fin - i).min(16)) - 1) & 0xffff) as u16;
            let xv = _mm512_maskz_loadu_ps(mask, xp.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_ps(mask, wp.add(r * fin + i));
                a[0] = _mm512_fmadd_ps(wv, xv, a[0]);
            }
            i += 16;
        }
        for (s, a) in sums.iter_mut().zip(acc) {
            *s = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::ROWS;

    /// As `avx512::four`, in eight lanes; the last `fin % 8` values one at a time.
    ///
    /// # Safety
    /// AVX2 and FMA are available and `w.len() ≥ 4 · x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn four(w: &[f32], x: &[f32], sums: &mut [f32; ROWS]) {
        let fin = x.len();
        debug_assert!(w.len() >= ROWS * fin);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
        let mut i = 0;
        while i + 16 <= fin {
            let (x0, x1) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
            for (r, a) in acc.iter_mut().enumerate() {
                let row = wp.add(r * fin + i);
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(row), x0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8)), x1, a[1]);
            }
            i += 16;
        }
        if i + 8 <= fin {
            let xv = _mm256_loadu_ps(xp.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(r * fin + i)), xv, a[0]);
            }
            i += 8;
        }
        for (r, (s, a)) in sums.iter_mut().zip(acc).enumerate() {
            let v = _mm256_add_ps(a[0], a[1]);
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            let mut total = _mm_cvtss_f32(h);
            for j in i..fin {
                total += *wp.add(r * fin + j) * *xp.add(j);
            }
            *s = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cpu::{fresh_rng, test_isas};
    use rand::Rng;

    #[test]
    fn products_match_a_naive_sum_on_every_isa_and_odd_shape() {
        let mut rng = fresh_rng();
        for _ in 0..40 {
            let fin = rng.random_range(1..=300);
            let fout = rng.random_range(1..=23);
            let batch = rng.random_range(1..=3);
            let w: Vec<f32> = (0..fout * fin)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let x: Vec<f32> = (0..batch * fin)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let start = rng.random_range(0..fout);
            let end = rng.random_range(start..=fout);
            for isa in test_isas() {
                let mut out = vec![f32::NAN; (end - start) * batch];
                products(isa, &w, fin, &x, batch, start..end, &mut out);
                for m in start..end {
                    for s in 0..batch {
                        let want: f64 = (0..fin)
                            .map(|c| w[m * fin + c] as f64 * x[s * fin + c] as f64)
                            .sum();
                        let got = out[(m - start) * batch + s];
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (fin as f64).sqrt() + 1e-6,
                            "{isa:?} fin {fin} row {m} sample {s}: {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}
