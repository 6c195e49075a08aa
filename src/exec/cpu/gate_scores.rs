//! Channel-gate scoring on the CPU: every output's `bias[o] + Σ_c W[o][c] · x[c]`, from
//! weights stored transposed (`[C][out]`), so that one pass over the inputs updates
//! sixteen outputs per vector and an input whose mean is zero (a channel a gate upstream
//! dropped) is skipped with its whole row of weights.
//!
//! Every score sums the same way, whatever the storage (f16 or f32) and the code path
//! (AVX-512 or portable): starting from the bias, `acc = acc + x[c] · w` (the product
//! rounded, not fused) over the inputs in order, skipping zero inputs. Storage and path
//! therefore never change a decision.

use crate::exec::gating;

/// A channel gate's weights as the engine reads them.
pub(super) enum GateWeights {
    /// `W`, transposed.
    Direct { wt: Stored, bias: Vec<f32> },
    /// Through the gate's factors ([`gating::LowRank`]): `t = V · x`, then `U · t`, both
    /// transposed.
    Factored {
        rank: usize,
        ut: Stored,
        vt: Stored,
        bias: Vec<f32>,
    },
}

/// Transposed gate weights (`[C][out]`): as f16 when every value is one exactly (the
/// training-free gates and their factors, rounded so in [`gating::channel_gates`]), so
/// that a pass reads half the bytes; as f32 otherwise (trained gates).
pub(super) enum Stored {
    Half(Vec<half::f16>),
    Full(Vec<f32>),
}

impl Stored {
    /// `w` (`[rows][cols]`, row-major) transposed.
    fn new(w: &[f32], rows: usize, cols: usize) -> Self {
        let half: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        if half.iter().zip(w).all(|(h, &v)| h.to_f32() == v) {
            Stored::Half(transpose(&half, rows, cols))
        } else {
            Stored::Full(transpose(w, rows, cols))
        }
    }

    fn scores(&self, bias: &[f32], x: &[f32]) -> Vec<f32> {
        match self {
            Stored::Half(wt) => scores_t(wt, bias, x),
            Stored::Full(wt) => scores_t(wt, bias, x),
        }
    }
}

/// `[rows][cols]` row-major to `[cols][rows]`.
fn transpose<T: Copy>(w: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols * rows)
        .map(|i| w[(i % rows) * cols + i / rows])
        .collect()
}

impl GateWeights {
    pub(super) fn new(g: &gating::ChannelGate) -> Self {
        let out = g.bias.len();
        let cin = g.weight.len() / out.max(1);
        match &g.factors {
            Some(f) => GateWeights::Factored {
                rank: f.rank,
                ut: Stored::new(&f.u, out, f.rank),
                vt: Stored::new(&f.v, f.rank, cin),
                bias: g.bias.clone(),
            },
            None => GateWeights::Direct {
                wt: Stored::new(&g.weight, out, cin),
                bias: g.bias.clone(),
            },
        }
    }

    /// Every output's score for input means `x` (see the module documentation).
    pub(super) fn scores(&self, x: &[f32]) -> Vec<f32> {
        match self {
            GateWeights::Direct { wt, bias } => wt.scores(bias, x),
            GateWeights::Factored {
                rank, ut, vt, bias, ..
            } => {
                let t = vt.scores(&vec![0.0; *rank], x);
                ut.scores(bias, &t)
            }
        }
    }

    /// The factors' rank, for a gate scored through them.
    pub(super) fn rank(&self) -> Option<usize> {
        match self {
            GateWeights::Factored { rank, .. } => Some(*rank),
            _ => None,
        }
    }
}

/// A weight type the scorer reads.
pub(super) trait Weight: Copy {
    fn f32(self) -> f32;
    /// Sixteen consecutive weights as f32.
    ///
    /// # Safety
    /// Sixteen values are readable from `p`, and AVX-512F is present.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Eight consecutive weights as f32.
    ///
    /// # Safety
    /// Eight values are readable from `p`, and AVX2 and F16C are present.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    fn f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Weight for half::f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// `bias[o] + Σ_c x[c] · wt[c][o]` for every output `o` (see the module documentation).
pub(super) fn scores_t<T: Weight>(wt: &[T], bias: &[f32], x: &[f32]) -> Vec<f32> {
    assert_eq!(
        wt.len(),
        bias.len() * x.len(),
        "gate weights do not fit the gate"
    );
    let mut out = bias.to_vec();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the sizes are checked above.
        unsafe { scores_avx512(wt, x, &mut out) };
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C are present; the sizes are checked above.
        unsafe { scores_avx2(wt, x, &mut out) };
        return out;
    }
    scores_portable(wt, x, &mut out, 0);
    out
}

/// Adds `Σ_c x[c] · wt[c][o]` to `out[o]` for outputs `from..`, one input at a time.
pub(super) fn scores_portable<T: Weight>(wt: &[T], x: &[f32], out: &mut [f32], from: usize) {
    let n = out.len();
    for (c, &xc) in x.iter().enumerate() {
        if xc == 0.0 {
            continue;
        }
        let row = &wt[c * n..(c + 1) * n];
        for (o, w) in out[from..].iter_mut().zip(&row[from..]) {
            *o += xc * w.f32();
        }
    }
}

/// How far ahead of its loads the AVX-512 scorer prefetches its weights, in bytes. The
/// weights stream from memory, and the hardware prefetcher alone fetched them at about
/// 5 GB/s. Timed inside the gates (MobileNetV2, budget 0.5, batch 1, the Intel Xeon):
/// 96 → 576 scored in 12.8–13.9 µs against 22.5–24.3 without, 64 → 384 in 6.2–6.5
/// against 10.1–12.4, the factored 160 → 960 in 10.7–11.2 against 16.3–19.0; ResNet-50's
/// gates scored in 364–397 µs per pass against 506–530. 2 and 8 KiB did about as well,
/// 16 KiB worse.
const PREFETCH_BYTES: usize = 4096;

/// One input's whole row of weights at a time, in storage order, the sums kept in `out`.
/// A gate's weights are read once per sample and layer, so they mostly come from
/// memory, and one sequential stream reads them fastest: from a cold cache, 112×672 f16
/// weights took 6.8–9.0 µs this way against 10.7–12.6 µs with eight vectors of outputs
/// held in registers over all inputs, which reads the rows in 256-byte pieces (the
/// registers win, 2.4 against 3.2 µs, only when the weights are already in cache). The
/// last `n % 16` outputs go the portable way (the same arithmetic).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512<T: Weight>(wt: &[T], x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    let whole = n - n % 16;
    for (c, &xc) in x.iter().enumerate() {
        if xc == 0.0 {
            continue;
        }
        let xv = _mm512_set1_ps(xc);
        let row = wt.as_ptr().add(c * n);
        for o in (0..whole).step_by(16) {
            let p = out.as_mut_ptr().add(o);
            // A prefetch never faults: past the last row it only reads a few lines more.
            _mm_prefetch::<_MM_HINT_T0>((row.add(o) as *const i8).wrapping_add(PREFETCH_BYTES));
            let product = _mm512_mul_ps(xv, T::load16(row.add(o)));
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), product));
        }
    }
    scores_portable(wt, x, out, whole);
}

/// [`scores_avx512`] in vectors of eight. Without it an AVX2 machine scored every gate
/// the portable way, converting each f16 weight on its own: MobileNetV2's and
/// EfficientNet-Lite0's gates took 10–12% of a dense pass there (`dynsparse bench
/// --budget 0.5`, batch 1 and 8); MobileNetV2's went from 1.37–1.44 ms to 0.27–0.30 at
/// batch 1 (three alternating runs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn scores_avx2<T: Weight>(wt: &[T], x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    let whole = n - n % 8;
    for (c, &xc) in x.iter().enumerate() {
        if xc == 0.0 {
            continue;
        }
        let xv = _mm256_set1_ps(xc);
        let row = wt.as_ptr().add(c * n);
        for o in (0..whole).step_by(8) {
            let p = out.as_mut_ptr().add(o);
            let product = _mm256_mul_ps(xv, T::load8(row.add(o)));
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), product));
        }
    }
    scores_portable(wt, x, out, whole);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cpu::fresh_rng;
    use rand::Rng;

    /// The scores summed one input at a time, in order, skipping zero inputs.
    fn naive(w: &[f32], bias: &[f32], x: &[f32]) -> Vec<f32> {
        let cin = x.len();
        bias.iter()
            .enumerate()
            .map(|(o, &b)| {
                let mut acc = b;
                for (c, &xc) in x.iter().enumerate() {
                    if xc != 0.0 {
                        acc += xc * w[o * cin + c];
                    }
                }
                acc
            })
            .collect()
    }

    /// Gates score exactly as the naive sum, from f16 or f32 storage, on every path,
    /// with dropped (zero) inputs and output counts that leave every kind of tail;
    /// weights f16 cannot hold stay f32.
    #[test]
    fn gates_score_exactly_as_a_naive_sum_whatever_the_storage() {
        let mut rng = fresh_rng();
        for _ in 0..60 {
            let (cout, cin) = (rng.random_range(1..300), rng.random_range(1..200));
            let weight: Vec<f32> = (0..cout * cin)
                .map(|_| half::f16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
                .collect();
            let bias: Vec<f32> = (0..cout).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..cin)
                .map(|_| {
                    if rng.random_bool(0.3) {
                        0.0
                    } else {
                        rng.random_range(-2.0..2.0)
                    }
                })
                .collect();
            let want = naive(&weight, &bias, &x);
            let g = gating::ChannelGate {
                weight: weight.clone(),
                bias: bias.clone(),
                factors: None,
            };
            let h = GateWeights::new(&g);
            let GateWeights::Direct {
                wt: Stored::Half(wt),
                ..
            } = &h
            else {
                panic!("f16-representable weights were not stored as f16");
            };
            let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&h.scores(&x)), bits(&want));
            let mut portable = bias.clone();
            scores_portable(wt, &x, &mut portable, 0);
            assert_eq!(bits(&portable), bits(&want));
            let full = transpose(&weight, cout, cin);
            assert_eq!(bits(&scores_t(&full, &bias, &x)), bits(&want));
            // The AVX2 path too where the machine runs AVX-512 (scores_t takes that).
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                let (mut h16, mut h32) = (bias.clone(), bias.clone());
                // SAFETY: AVX2 and F16C are present; the sizes fit the gate.
                unsafe {
                    scores_avx2(wt, &x, &mut h16);
                    scores_avx2(&full, &x, &mut h32);
                }
                assert_eq!(bits(&h16), bits(&want));
                assert_eq!(bits(&h32), bits(&want));
            }
        }
        let g = gating::ChannelGate {
            weight: vec![0.1, 0.2],
            bias: vec![0.0],
            factors: None,
        };
        assert!(matches!(
            GateWeights::new(&g),
            GateWeights::Direct {
                wt: Stored::Full(_),
                ..
            }
        ));
    }

    /// A factored gate scores `U · (V · x)`: its weight (their product) up to rounding.
    #[test]
    fn factored_gates_score_as_their_product() {
        let mut rng = fresh_rng();
        for i in 0..20 {
            // Half of the cases with factors rounded to f16, as the training-free gates'.
            let f16 = |v: f32| {
                if i % 2 == 0 {
                    half::f16::from_f32(v).to_f32()
                } else {
                    v
                }
            };
            let (cout, cin, rank) = (
                rng.random_range(1..200),
                rng.random_range(1..80),
                rng.random_range(1..40),
            );
            let u: Vec<f32> = (0..cout * rank)
                .map(|_| f16(rng.random_range(-1.0..1.0)))
                .collect();
            let v: Vec<f32> = (0..rank * cin)
                .map(|_| f16(rng.random_range(-1.0..1.0)))
                .collect();
            let weight: Vec<f32> = (0..cout * cin)
                .map(|i| {
                    (0..rank)
                        .map(|j| u[i / cin * rank + j] * v[j * cin + i % cin])
                        .sum()
                })
                .collect();
            let bias: Vec<f32> = (0..cout).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..cin).map(|_| rng.random_range(-2.0..2.0)).collect();
            let want = naive(&weight, &bias, &x);
            let g = gating::ChannelGate {
                weight,
                bias,
                factors: Some(gating::LowRank { rank, u, v }),
            };
            let h = GateWeights::new(&g);
            assert_eq!(h.rank(), Some(rank));
            let GateWeights::Factored { ut, vt, .. } = &h else {
                panic!("factors were not used");
            };
            // f16-exact factors are stored as f16 (the bytes a pass reads), others not.
            let half = |s: &Stored| matches!(s, Stored::Half(_));
            assert_eq!((half(ut), half(vt)), (i % 2 == 0, i % 2 == 0));
            for (got, want) in h.scores(&x).into_iter().zip(want) {
                let tol = 1e-4 * (1.0 + want.abs()) * (rank as f32).sqrt();
                assert!((got - want).abs() <= tol, "{got} vs {want}");
            }
        }
    }
}
