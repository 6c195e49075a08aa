//! A gated 1×1 convolution computed transposed: output positions as the GEMM's rows,
//! output channels as its panels.
//!
//! The direct way ([`super::engine`]'s `conv_gemm_into`) runs output channels as rows of
//! A, the packed weights, and a plan that keeps some input channels first copies those
//! channels' columns of A into a compact A, per sample. Where the output plane is small
//! and the channels many, that copy is most of the layer: ResNet-50's `layer4` `conv3`
//! (512 → 2048 at 7 × 7) keeping half its inputs copies 2.2 MB of weights to compute 49
//! positions, and took longer than its dense pass (1.10× at budget 0.5, one thread).
//!
//! Transposed, nothing of the weights is copied. They are stored once, at load, as
//! panels of [`NR`] output channels, one row of `NR` values per input channel
//! ([`channel_panels`]); a tile reads the rows of its kept input channels where they lie,
//! through the kernels' row offsets (`boff`), each row two whole cache lines. What is
//! packed per sample is the input: the kept channels' values at every position, `n ×
//! kept` floats, which is small exactly where this way is taken ([`pays`]). The same
//! kernels sum the kept inputs in the same order as the direct way; logits of whole
//! gated passes moved by at most 1.2e-6 (of values up to 5.4) between the two ways.
//!
//! The epilogue here stores the tile transposed: its positions of each of its channels
//! are a run of one output plane.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{self, Acc, Isa, OutPtr, Residual, Tile, NR, PACK};
use super::pool::{line_offset, Spare, LINE};
use crate::model::Act;

/// Output positions up to which a layer may run transposed: two panels of the direct
/// way, a 7 × 7 plane. Over 14 × 14 the direct way's compact copy of the weights serves
/// seven panels and pays: ResNet-50's `layer3` `conv3` layers (256 → 1024) took 1.23–1.33×
/// the direct way's time transposed (in-process pairs, budget 0.5, batch 1, one thread
/// and two alike).
pub(super) const MAX_POSITIONS: usize = 2 * NR;

/// Output channels per output position from which a layer runs transposed. Fewer, and
/// the input packed per sample outgrows the weights the direct way copies.
/// Transposed against direct, in-process pairs at budget 0.5, batch 1, one thread:
/// ResNet-50's `layer4` `conv3` layers (42 channels a position) 0.74–0.88 of the time,
/// MobileNetV2's and EfficientNet-Lite0's 7 × 7 projections (3.3–6.5) 0.72–0.96; batch 8,
/// two threads: the projections 0.72–0.93, ResNet-50's `conv3` 0.94–0.96 (against the
/// batch run together).
pub(super) const MIN_CHANNELS_PER_POSITION: usize = 2;

/// Whether a 1×1 layer of `cout` output channels over `n` output positions runs
/// transposed when a plan keeps some of its input channels (and all its outputs).
pub(super) fn pays(cout: usize, n: usize) -> bool {
    n <= MAX_POSITIONS && cout >= MIN_CHANNELS_PER_POSITION * n
}

/// A layer's weights as panels of [`NR`] output channels, `[cout.div_ceil(NR)][cin][NR]`
/// (the last panel zero past `cout`), starting on a cache line so that each panel row
/// is two whole lines.
pub(super) struct ChannelPanels(Vec<f32>);

impl ChannelPanels {
    /// `w` (`[cout][cin]`, row-major) as panels.
    pub(super) fn new(w: &[f32], cout: usize, cin: usize) -> Self {
        let mut v = vec![0f32; cout.div_ceil(NR) * cin * NR + LINE];
        let off = line_offset(&v);
        for (o, row) in w.chunks_exact(cin).take(cout).enumerate() {
            let panel = &mut v[off + (o / NR) * cin * NR..][..cin * NR];
            for (c, &x) in row.iter().enumerate() {
                panel[c * NR + o % NR] = x;
            }
        }
        ChannelPanels(v)
    }

    /// The panels, from their first value.
    pub(super) fn get(&self) -> &[f32] {
        &self.0[line_offset(&self.0)..]
    }
}

/// One sample's transposed 1×1 convolution.
pub(super) struct Job<'a> {
    pub isa: Isa,
    /// K per block of the GEMM (`usize::MAX`: whole; `Tuning::gemm_kc`).
    pub kc: usize,
    /// The sample's input: `cin` planes of `n` values.
    pub x: &'a [f32],
    /// Output positions (the plane's size, input and output alike).
    pub n: usize,
    /// Kept input channels, ascending; the others are not read.
    pub chans: &'a [usize],
    /// The layer's weights, [`ChannelPanels::get`].
    pub panels: &'a [f32],
    pub cin: usize,
    /// One per output channel; every output channel is computed.
    pub bias: &'a [f32],
    /// Indexed as the output.
    pub residual: Residual<'a>,
    pub act: Act,
    /// `0, 1, …` at least `n` long: tile rows by index.
    pub index: &'a [usize],
    /// Called by the task that stored output channels `channels` (every position), with
    /// the output's start, while those cells are in its core's cache: a channel gate
    /// reading the output sums them there ([`super::engine`]'s `PanelSums`).
    #[allow(clippy::type_complexity)]
    pub sums: Option<&'a (dyn Fn(*const f32, Range<usize>) + Sync)>,
}

/// Floats of the packed input [`run`] needs for `n` positions and `kept` channels.
pub(super) fn packed_len(n: usize, kept: usize) -> usize {
    gemm::packed_a_len(n, kept)
}

/// Computes `job` into `out` (`cout × n`, every cell written), with `packed`
/// ([`packed_len`] floats) as scratch for the input; on the calling thread when
/// `serial`, else on the current pool.
pub(super) fn run(job: &Job, packed: &mut [f32], out: &mut [f32], serial: bool) {
    let (n, k, cout) = (job.n, job.chans.len(), job.bias.len());
    assert_eq!(out.len(), cout * n, "output size");
    assert_eq!(job.x.len(), job.cin * n, "input size");
    assert!(
        job.panels.len() >= cout.div_ceil(NR) * job.cin * NR,
        "weight panels"
    );
    assert!(job.index.len() >= n, "index");
    assert!(job.chans.iter().all(|&c| c < job.cin), "kept channel");
    if let Residual::Apart(r) = job.residual {
        assert!(r.len() >= out.len(), "residual size");
    }
    if k == 0 {
        // Nothing kept: the bias and the residual alone.
        for (ch, plane) in out.chunks_exact_mut(n).enumerate() {
            for (i, v) in plane.iter_mut().enumerate() {
                let r = match job.residual {
                    Residual::None => 0.0,
                    Residual::Apart(r) => r[ch * n + i],
                    Residual::InOut => *v,
                };
                *v = job.act.apply(job.bias[ch] + r);
            }
        }
        if let Some(sum) = job.sums {
            sum(out.as_ptr(), 0..cout);
        }
        return;
    }
    let packed = &mut packed[..packed_len(n, k)];
    pack_positions(job.x, n, job.chans, packed, serial);
    let offsets: Vec<usize> = job.chans.iter().map(|&c| c * NR).collect();
    let mr = job.isa.mr();
    let tiles = n.div_ceil(mr);
    let panels = cout.div_ceil(NR);
    let packed = &*packed;
    let ptr = OutPtr(out.as_mut_ptr());
    let cols: [usize; NR] = std::array::from_fn(|j| j);
    // One task per panel of output channels, every position: a panel's kept weight rows
    // are read from memory once and serve its row tiles from L1 and L2. (Splitting the
    // panels' positions between tasks when there were fewer panels than four a thread
    // read each panel's rows twice, and left no task holding a whole channel to sum.)
    let task = |accs: &mut Spare<Acc>, p: usize| {
        let panel = &job.panels[p * job.cin * NR..(p + 1) * job.cin * NR];
        // The next panel, prefetched into L2 while the first tile of each K block runs.
        let next = job
            .panels
            .get((p + 1) * job.cin * NR..)
            .filter(|_| p + 1 < panels)
            .map_or(std::ptr::null(), <[f32]>::as_ptr);
        if accs.len() < tiles {
            accs.resize(tiles, [[0f32; NR]; 12]);
        }
        let tile = |i: usize| {
            let rows = &job.index[i * mr..((i + 1) * mr).min(n)];
            Tile {
                a: packed,
                ka: k,
                arows: rows,
                kmap: None,
                boff: Some(&offsets),
                k,
                rows,
                panel,
                ldb: NR,
                ldc: 1,
                cols: &cols,
                lanes: None,
            }
        };
        let kc = job.kc.max(1);
        for k0 in (0..k).step_by(kc) {
            let k1 = k0.saturating_add(kc).min(k);
            for (i, acc) in accs[..tiles].iter_mut().enumerate() {
                let prefetch = gemm::Prefetch {
                    panel: if i == 0 { next } else { std::ptr::null() },
                    ..gemm::Prefetch::NONE
                };
                // SAFETY: `packed` holds `packed_len(n, k)` floats, every tile row
                // `< n`; every offset `c · NR` with `c < cin` leaves a whole row of NR
                // inside the panel (`cin · NR` floats); `k0 ≤ k1 ≤ k`.
                unsafe { gemm::accumulate_prefetching(job.isa, &tile(i), k0, k1, acc, prefetch) };
            }
        }
        let channels = p * NR..(p * NR + NR).min(cout);
        for (i, acc) in accs[..tiles].iter().enumerate() {
            let r0 = i * mr;
            // SAFETY: the cells of channels `channels` at positions `r0 .. r0 + rows`
            // lie inside `out` (`cout × n`, checked above) and belong to this task's
            // panel alone; an apart residual is as long as `out` (checked above).
            unsafe {
                store(
                    job,
                    acc,
                    (r0 + mr).min(n) - r0,
                    r0,
                    channels.clone(),
                    ptr.get(),
                )
            };
        }
        if let Some(sum) = job.sums {
            sum(ptr.get(), channels);
        }
    };
    if serial {
        let mut accs = Spare::take();
        (0..panels).for_each(|p| task(&mut accs, p));
    } else {
        (0..panels).into_par_iter().for_each_init(Spare::take, task);
    }
}

/// The epilogue of one tile, stored transposed: its `rows` positions from `r0` of each
/// channel of `chs` (the tile's columns from 0) are a run of that channel's plane.
///
/// # Safety
/// Cells `ch · n + r0 .. ch · n + r0 + rows` of every channel `ch` of `chs` lie inside
/// `out`, and inside the residual where it lies apart; `rows ≤ 12`, `chs.len() ≤ NR`.
unsafe fn store(job: &Job, acc: &Acc, rows: usize, r0: usize, chs: Range<usize>, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if job.isa == Isa::Avx512 {
        return store_avx512(job, acc, rows, r0, chs, out);
    }
    for (j, ch) in chs.enumerate() {
        let at = ch * job.n + r0;
        let b = job.bias[ch];
        for (q, row) in acc.iter().take(rows).enumerate() {
            let r = match job.residual {
                Residual::None => 0.0,
                Residual::Apart(r) => r[at + q],
                Residual::InOut => *out.add(at + q),
            };
            *out.add(at + q) = job.act.apply(row[j] + b + r);
        }
    }
}

/// [`store`] with AVX-512F: each channel's positions gathered from the tile's column in
/// one masked gather, and stored as one masked run. Against storing one element at a
/// time, ResNet-50's `layer4` `conv3` layers took 0.84–0.85 of their time at budget 0.5
/// on one thread and 0.88 on two (in-process pairs, batch 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_avx512(
    job: &Job,
    acc: &Acc,
    rows: usize,
    r0: usize,
    chs: Range<usize>,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    const W: i32 = NR as i32;
    let column = _mm512_setr_epi32(
        0,
        W,
        2 * W,
        3 * W,
        4 * W,
        5 * W,
        6 * W,
        7 * W,
        8 * W,
        9 * W,
        10 * W,
        11 * W,
        0,
        0,
        0,
        0,
    );
    let m: __mmask16 = (1u16 << rows) - 1;
    let zero = _mm512_setzero_ps();
    for (j, ch) in chs.enumerate() {
        let at = ch * job.n + r0;
        let v = _mm512_mask_i32gather_ps::<4>(zero, m, column, acc[0].as_ptr().add(j));
        let mut v = _mm512_add_ps(v, _mm512_set1_ps(job.bias[ch]));
        match job.residual {
            Residual::None => {}
            Residual::Apart(r) => {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r.as_ptr().add(at)))
            }
            Residual::InOut => v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, out.add(at))),
        }
        v = match job.act {
            Act::None => v,
            Act::Relu => _mm512_max_ps(v, zero),
            Act::Relu6 => _mm512_min_ps(_mm512_max_ps(v, zero), _mm512_set1_ps(6.0)),
        };
        _mm512_mask_storeu_ps(out.add(at), m, v);
    }
}

/// The kept channels' values at every position, as a packed A of `n` rows (positions)
/// and `chans.len()` columns: block `b` holds positions `PACK · b ..` as `[kept][PACK]`,
/// zero past `n`.
fn pack_positions(x: &[f32], n: usize, chans: &[usize], packed: &mut [f32], serial: bool) {
    let k = chans.len();
    let block = |(b, dst): (usize, &mut [f32])| {
        let p0 = b * PACK;
        let w = PACK.min(n - p0);
        for (&c, d) in chans.iter().zip(dst.chunks_exact_mut(PACK)) {
            let src = &x[c * n + p0..c * n + p0 + w];
            if w == PACK {
                // Fixed-size copies, not a memmove call each.
                let from: &[f32; PACK] = src.try_into().unwrap();
                let to: &mut [f32; PACK] = d.try_into().unwrap();
                *to = *from;
            } else {
                d[..w].copy_from_slice(src);
                d[w..].fill(0.0);
            }
        }
    };
    if serial {
        packed
            .chunks_exact_mut(PACK * k)
            .enumerate()
            .for_each(block);
    } else {
        packed
            .par_chunks_exact_mut(PACK * k)
            .enumerate()
            .for_each(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use std::sync::Mutex;

    #[test]
    fn channel_panels_hold_each_output_channel_as_a_lane() {
        // 3 outputs × 2 inputs: w[o][c] = 10·o + c.
        let w = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
        let panels = ChannelPanels::new(&w, 3, 2);
        let p = panels.get();
        assert_eq!(p.as_ptr() as usize % 64, 0, "on a cache line");
        assert!(p.len() >= 2 * NR);
        let p = &p[..2 * NR];
        assert_eq!(&p[..4], &[0.0, 10.0, 20.0, 0.0]);
        assert_eq!(&p[NR..NR + 4], &[1.0, 11.0, 21.0, 0.0]);
        assert!(p[3..NR].iter().chain(&p[NR + 3..]).all(|&v| v == 0.0));
    }

    #[test]
    fn only_small_planes_with_many_channels_run_transposed() {
        assert!(pays(2048, 49));
        assert!(pays(160, 49));
        assert!(!pays(96, 49));
        assert!(!pays(1024, 196));
    }

    /// Random layers: planes up to the largest that runs transposed (edge tiles of every
    /// width), output channels that leave the last panel part-filled, any kept subset of
    /// the inputs (none included), each residual and activation; on every kernel path,
    /// on the calling thread and on a pool. Each task's sums callback must find its
    /// channels' cells already final.
    #[test]
    fn transposed_convolutions_match_a_naive_reference() {
        let mut rng = super::super::fresh_rng();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let index: Vec<usize> = (0..MAX_POSITIONS).collect();
        for case in 0..30 {
            let n = rng.random_range(1..=MAX_POSITIONS);
            let cin = rng.random_range(1..=70);
            let cout = rng.random_range(1..=100);
            let chans: Vec<usize> = (0..cin).filter(|_| rng.random_bool(0.6)).collect();
            let mut uniform = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let (x, w, bias) = (uniform(cin * n), uniform(cout * cin), uniform(cout));
            let res = uniform(cout * n);
            let panels = ChannelPanels::new(&w, cout, cin);
            let panels = panels.get();
            let act = [Act::None, Act::Relu, Act::Relu6][case % 3];
            let kind = (case / 3) % 3;
            let want: Vec<f32> = (0..cout * n)
                .map(|i| {
                    let (o, p) = (i / n, i % n);
                    let sum: f32 = chans.iter().map(|&c| w[o * cin + c] * x[c * n + p]).sum();
                    act.apply(bias[o] + sum + if kind == 0 { 0.0 } else { res[i] })
                })
                .collect();
            for isa in super::super::test_isas() {
                for serial in [true, false] {
                    // Apart reads `res`; InOut finds it in the output.
                    let mut out = if kind == 2 {
                        res.clone()
                    } else {
                        vec![f32::NAN; cout * n]
                    };
                    let residual = match kind {
                        0 => Residual::None,
                        1 => Residual::Apart(&res),
                        _ => Residual::InOut,
                    };
                    let summed = Mutex::new(vec![0u32; cout]);
                    let check = |out: *const f32, chs: std::ops::Range<usize>| {
                        for ch in chs {
                            summed.lock().unwrap()[ch] += 1;
                            for p in 0..n {
                                // SAFETY: the cells of stored channels, not written again.
                                let got = unsafe { *out.add(ch * n + p) };
                                let w = want[ch * n + p];
                                assert!(
                                    (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                    "case {case}: channel {ch} summed before its cells were final"
                                );
                            }
                        }
                    };
                    let job = Job {
                        isa,
                        kc: [gemm::KC, usize::MAX, 13][case / 9 % 3],
                        x: &x,
                        n,
                        chans: &chans,
                        panels,
                        cin,
                        bias: &bias,
                        residual,
                        act,
                        index: &index,
                        sums: Some(&check),
                    };
                    let mut packed = vec![f32::NAN; packed_len(n, chans.len())];
                    pool.install(|| run(&job, &mut packed, &mut out, serial));
                    for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "case {case} ({isa:?}, serial {serial}, n {n}, {cin} → {cout}, \
                             {} kept): cell {i} {g} vs {w}",
                            chans.len()
                        );
                    }
                    let summed = summed.into_inner().unwrap();
                    assert!(
                        summed.iter().all(|&s| s == 1),
                        "case {case}: sums {summed:?}"
                    );
                }
            }
        }
    }
}
