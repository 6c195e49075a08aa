//! One sample's 3×3 convolution over a plane of at most [`TILES`] Winograd tiles
//! (14 × 14 and smaller), by F(2×2, 3×3) as in [`super::winograd`], with the transformed
//! filter held as one 64-byte cache line per (output channel, input channel) pair: the
//! pair's 16 values of the 4×4 grid ξ.
//!
//! At 7 × 7 each transformed weight serves only 16 tiles, so such a layer streams its
//! weights (16.8 MB at 512 → 512) more than it computes, and a gated plan saves time
//! only in the lines it does not read. Packed as A ([`super::winograd::WinogradWeights`]),
//! a line holds one column of 12 rows of one `U[ξ]`: spread kept rows read every line,
//! and kept input channels read lines that dropped ones share, at jumps the prefetchers
//! do not follow. Here a plan reads exactly its kept (row, channel) pairs' lines, and the
//! GEMMs run vectorized over ξ, `M[r][t][ξ] = Σ_c U[r][c][ξ] · V[c][t][ξ]`: one fused
//! multiply-add per (row, channel, tile), as many as the packed way does.
//!
//! The lines lie channel by channel (`[cin][row][ξ]`): a group of three rows over a
//! block of channels reads runs of three lines, and the next group the runs after them,
//! so a task streams each channel's lines in order. Row by row (`[row][cin][ξ]`), the
//! same plans took 1.12–1.25 of the packed way's time where they dropped only input
//! channels (ResNet-18's `conv2` layers at budget 0.5), 0.66–0.67 channel by channel.
//!
//! Dense, on the AMD EPYC the packed way is faster (this one takes 1.03–1.15 of its
//! time: the packed A streams in one run per task), so the engine keeps both and sends
//! here only plans that drop enough ([`takes`]); on the Intel Xeon this way is faster
//! dense too, and takes every plan ([`super::Tuning`]). AVX-512 only; elsewhere the
//! engine keeps the packed way.
//!
//! Over planes of more than 16 tiles (14 × 14: 49) each weight serves more tiles and the
//! packed way computes faster, dense 0.76–0.83 of this way's time (ResNet-50's `layer3`
//! `conv2` layers, Intel Xeon); but a gated plan that keeps few pairs copies its kept
//! columns of `U` first, from memory, and there this way pays: kept pairs at most
//! [`WIDE_MAX_KEPT`] of a layer of at least [`WIDE_MIN_PAIRS`].

use rayon::prelude::*;

use super::gemm::{self, Isa, OutPtr, Residual, PACK};
use super::pool::{line_aligned, BufferPool, Spare};
use super::winograd::{kept_or_all, tiles, Algorithm, Job, SamplesJob, WinogradWeights, XI};
use crate::model::Act;

/// Tiles of the largest plane served: 64, a 16 × 16 output (14 × 14: 49).
pub const TILES: usize = 64;

/// Rows of a kernel call: 3 rows × 8 tiles, 24 accumulators.
const ROWS: usize = 3;

/// Tiles of a kernel call.
const HALF: usize = 8;

/// Input channels per block over a plane of at most 16 tiles: their V (16 KiB) stays in
/// L1 while every group of rows of a task runs over it. ResNet-18's gated `layer4`
/// layers at budget 0.5 took about as long with 24, and 1.07–1.22× as long with 8 or 32.
const BLOCK: usize = 16;

/// Over larger planes, input channels per block, each call running one half (8 tiles):
/// the half's V of the block (32 KiB) stays in L1 while every group of rows of a task
/// runs over it. Every half per call instead, blocks of 16 KiB of V (4 channels at
/// 14 × 14) took 1.1–1.27× the packed way's time on 256 → 256 with 0.37 of the pairs
/// kept; blocks of 64–256 KiB about what this takes.
const BLOCK_WIDE: usize = 64;

/// Rows per task.
const TASK_ROWS: usize = 8 * ROWS;

/// Calls ahead whose weight lines a call prefetches. One call (48 lines, about 0.1 µs of
/// multiply-adds) ahead is about one trip to memory, which the lines make in a pass whose
/// weights outgrow the L3; two ahead, separate builds alternated (Zen 5, 2 threads,
/// budget 0.5, batch 1): ResNet-18 0.956 and 0.977 of the time (its gated `layer4`
/// layers 0.89–0.94 in process), ResNet-50 1.040 and 0.983 (16 pairs; p10–p90
/// 0.961–1.007). Three ahead gained no more.
const LINES_AHEAD: usize = 2;

/// A 3×3 filter bank transformed for F(2×2, 3×3): `[cin][row][ξ]`, each pair's 16
/// values one cache line.
pub struct LineWeights {
    u: Vec<f32>,
    /// Where the first line starts in `u`.
    at: usize,
    rows: usize,
    cin: usize,
}

impl LineWeights {
    /// The same filters as `packed` (`U[ξ]` packed as A), laid out as lines: block of 12
    /// rows by block, so that each `U[ξ]` is read once and in order (a 512 → 512 layer
    /// in 5.9 ms on one thread, 11 ms the first time, its pages fresh; channel by
    /// channel over every row, 6.7–6.9 ms). Serial on purpose: it runs inside the
    /// `OnceLock` that holds the lines, where a rayon task waiting on other tasks could
    /// run another plan of the same layer and wait on the lock it holds.
    pub fn from_packed(packed: &WinogradWeights) -> Self {
        assert_eq!(packed.algo, Algorithm::F2, "lines hold F(2×2, 3×3) filters");
        let (rows, cin) = (packed.rows, packed.cin);
        let one = gemm::packed_a_len(rows, cin);
        let mut u = vec![0f32; rows * cin * XI + XI];
        let at = super::pool::line_offset(&u);
        let dst = &mut u[at..at + rows * cin * XI];
        for r0 in (0..rows).step_by(PACK) {
            let block = gemm::a_offset(r0, cin);
            for c in 0..cin {
                for r in r0..(r0 + PACK).min(rows) {
                    let from = block + c * PACK + r - r0;
                    let line = &mut dst[(c * rows + r) * XI..][..XI];
                    for (xi, v) in line.iter_mut().enumerate() {
                        *v = packed.u[xi * one + from];
                    }
                }
            }
        }
        LineWeights { u, at, rows, cin }
    }

    fn lines(&self) -> &[f32] {
        &self.u[self.at..self.at + self.rows * self.cin * XI]
    }
}

/// Whether [`conv`] runs a plan of `batch` samples over `hw` outputs that keeps `rows`
/// and `chans` (`None`: all) of a layer's `[rows, cin]`: one sample, a plane of at most
/// [`TILES`] tiles, on AVX-512, and at most `max_kept` of the (row, channel) pairs (the
/// CPU's [`Tuning::lines_max_kept`]) over at most 16 tiles, at most [`WIDE_MAX_KEPT`]
/// over more. On the AMD EPYC, with 0.56–0.75 of the pairs kept
/// (ResNet-50's and ResNet-18's `layer4` at budgets 0.75 and 0.85) this way took
/// 0.64–0.94 of the packed way's time, and dense plans 1.03–1.15×.
///
/// [`Tuning::lines_max_kept`]: super::Tuning::lines_max_kept
pub fn takes(
    isa: Isa,
    batch: usize,
    hw: [usize; 2],
    [n_rows, cin]: [usize; 2],
    rows: Option<&[usize]>,
    chans: Option<&[usize]>,
    max_kept: f64,
) -> bool {
    let kept = |k: Option<&[usize]>, n: usize| k.map_or(1.0, |k| k.len() as f64 / n as f64);
    let pairs = kept(rows, n_rows) * kept(chans, cin);
    let (th, tw) = tiles(hw[0], hw[1]);
    let wide = th * tw > NARROW_TILES;
    serves(isa, batch, hw)
        && if wide {
            pairs <= WIDE_MAX_KEPT && n_rows * cin >= WIDE_MIN_PAIRS
        } else {
            pairs <= max_kept
        }
}

/// Tiles of the planes that run on the lines whatever they keep, up to the CPU's
/// [`Tuning::lines_max_kept`](super::Tuning::lines_max_kept): 7 × 7 and 8 × 8.
const NARROW_TILES: usize = 16;

/// Over larger planes, the largest share of (row, channel) pairs a plan keeps and still
/// runs on the lines. One 3×3 layer at 14 × 14 after a gated 1×1 one (Intel Xeon, 2
/// threads, batch 1, in-process pairs), the packed way's time against this way's: 256 →
/// 256 with 0.71 of the pairs kept 0.88, 0.50 0.99, 0.37 0.96–1.07, 0.18 1.24; 512 → 512
/// with 0.67 1.00, 0.34 1.26–1.38; 128 → 128 with 0.43 0.97 (its `U`, 1 MB, stays in
/// L2). In ResNet-50 at budget 0.5 (0.37 of the pairs) its `layer3` `conv2` layers took
/// 0.67–0.79 of the packed way's time at batch 1, and where a batch's samples run in
/// parallel, one sample each on a thread, 0.64–0.69 at batch 2 and 0.69–0.74 at batch 8
/// (passes 0.979 and 0.983).
const WIDE_MAX_KEPT: f64 = 0.45;

/// Over larger planes, the fewest (row, channel) pairs of a layer that runs on the lines:
/// a smaller `U` stays in L2, and the packed way copies its kept columns from there.
const WIDE_MIN_PAIRS: usize = 256 * 256;

/// Whether [`conv_samples`] serves a batch over `hw` outputs on `isa`.
pub fn serves_samples(isa: Isa, hw: [usize; 2]) -> bool {
    let (th, tw) = tiles(hw[0], hw[1]);
    isa == Isa::Avx512 && th * tw <= NARROW_TILES
}

/// Whether [`conv`] serves a job of `batch` samples over `hw` outputs on `isa`.
pub fn serves(isa: Isa, batch: usize, hw: [usize; 2]) -> bool {
    let (th, tw) = tiles(hw[0], hw[1]);
    isa == Isa::Avx512 && batch == 1 && th * tw <= TILES
}

/// Runs `job` (one sample, see [`serves`]) into `out` (`rows × h × w`) with the weights
/// as `lines`. Only kept output channels are written.
pub fn conv(job: &Job, lines: &LineWeights, pool: &BufferPool, out: &mut [f32]) {
    assert!(
        serves(job.isa, job.batch, job.hw),
        "one sample over at most {TILES} tiles, on AVX-512"
    );
    assert!(lines.rows == job.weights.rows && lines.cin == job.weights.cin);
    let [h, w] = job.hw;
    let (th, tw) = tiles(h, w);
    let halves = (th * tw).div_ceil(HALF);
    // Tiles per channel of V and per row of M: whole calls of the kernel.
    let tp = halves * HALF;
    let chans = kept_or_all(job.chans, lines.cin);
    let rows = kept_or_all(job.rows, lines.rows);
    let (chans, rows) = (&chans[..], &rows[..]);
    if rows.is_empty() {
        return;
    }
    assert!(out.len() >= lines.rows * h * w && job.x.len() >= lines.cin * h * w);
    // Both lists ascend: the last of each bounds the lines the kernels read.
    assert!(rows[rows.len() - 1] < lines.rows && chans.last().is_none_or(|&c| c < lines.cin));
    // V: [kept channel][tile][ξ], tiles past the plane's zero.
    let per_chan = tp * XI;
    let mut v_buf = pool.take_dirty(chans.len() * per_chan);
    let v = &mut v_buf[..];
    // SAFETY: AVX-512F is present (`serves`).
    let transform = |(vc, &c): (&mut [f32], &usize)| unsafe {
        input_transform(&job.x[c * h * w..(c + 1) * h * w], [h, w], tp, vc);
    };
    if job.serial {
        v.chunks_exact_mut(per_chan).zip(chans).for_each(transform);
    } else {
        v.par_chunks_mut(per_chan).zip(chans).for_each(transform);
    }
    let plane = PlaneRows {
        lines,
        chans,
        v: &*v,
        hw: [h, w],
        bias: job.bias,
        residual: job.residual,
        act: job.act,
        out: OutPtr(out.as_mut_ptr()),
        at: 0,
    };
    // SAFETY (both): AVX-512F is present (`serves`); the chunks of `rows` are disjoint,
    // each row's plane of `out` (checked above) written by the one task holding it.
    if job.serial {
        rows.chunks(TASK_ROWS).for_each(|r| unsafe { plane.run(r) });
    } else {
        rows.par_chunks(TASK_ROWS)
            .for_each(|r| unsafe { plane.run(r) });
    }
    pool.give(v_buf);
}

/// Runs a batch whose samples each keep their own channels ([`SamplesJob`]) into `out`
/// (per sample `rows × h × w`), on planes of at most 16 tiles (7 × 7) on AVX-512: each
/// task takes a block of [`TASK_ROWS`] of the layer's rows and runs every sample's kept
/// rows among them, on the sample's kept channels, so that the block's lines (786 KB
/// for 512 input channels) are read from memory once and from L2 by every sample after
/// the first. Cells of dropped outputs are left as they are.
///
/// Against [`super::winograd::conv_samples`] (a packed `U` read through a column map,
/// the 16 tiles of a sample in one 16-lane tile per row tile, twelve broadcasts per
/// twelve multiply-adds), the kernel here does 24 multiply-adds per 11 loads. Intel
/// Xeon, 2 threads, budget 0.5, in-process pairs, the packed way's time against this
/// one's: ResNet-18's `layer4` `conv2` layers 0.55–0.59 at batch 2, 0.66–0.71 at batch
/// 4, 0.76–0.90 at batch 8, passes 0.956, 0.964 and 0.966–0.979; ResNet-50's at batch 8
/// 0.82–0.84, passes 0.987–1.015. The engine sends here only batches whose every sample
/// keeps some of the input channels: plans over all of them (ResNet-18's `layer4.1`
/// `conv1`, which reads the residual stream) read `U` in place in the packed way without
/// a map, and on the lines took 1.38× its time.
pub fn conv_samples(job: &SamplesJob, lines: &LineWeights, pool: &BufferPool, out: &mut [f32]) {
    let [h, w] = job.hw;
    let (th, tw) = tiles(h, w);
    assert!(
        job.isa == Isa::Avx512 && th * tw <= NARROW_TILES,
        "planes of at most {NARROW_TILES} tiles, on AVX-512"
    );
    let (cin, cout) = (lines.cin, lines.rows);
    assert!(cin == job.weights.cin && cout == job.weights.rows);
    let (in_len, out_len) = (cin * h * w, cout * h * w);
    assert_eq!(job.x.len(), job.samples.len() * in_len, "input size");
    assert_eq!(out.len(), job.samples.len() * out_len, "output buffer size");
    let tp = (th * tw).div_ceil(HALF) * HALF;
    let per_chan = tp * XI;
    let every: Vec<usize> = (0..cin.max(cout)).collect();
    // Per sample: its channels and rows, and where its V starts.
    let mut v_len = 0;
    let kept: Vec<(&[usize], &[usize], usize)> = job
        .samples
        .iter()
        .map(|k| {
            let chans = k.chans.unwrap_or(&every[..cin]);
            let rows = k.rows.unwrap_or(&every[..cout]);
            // Both lists ascend: the last of each bounds the lines the kernels read.
            assert!(chans.last().is_none_or(|&c| c < cin));
            assert!(rows.last().is_none_or(|&r| r < cout));
            let at = v_len;
            v_len += chans.len() * per_chan;
            (chans, rows, at)
        })
        .collect();
    let mut v_buf = pool.take_dirty(v_len);
    {
        let vp = OutPtr(v_buf.as_mut_ptr());
        let planes: Vec<(usize, usize)> = kept
            .iter()
            .enumerate()
            .flat_map(|(s, k)| (0..k.0.len()).map(move |ci| (s, ci)))
            .collect();
        planes.into_par_iter().for_each(|(s, ci)| {
            let (chans, _, at) = kept[s];
            let x = &job.x[s * in_len + chans[ci] * h * w..][..h * w];
            // SAFETY: (sample, channel) writes its own per_chan floats of V, inside the
            // buffer; AVX-512F is present (asserted above).
            unsafe {
                let vc = std::slice::from_raw_parts_mut(vp.get().add(at + ci * per_chan), per_chan);
                input_transform(x, [h, w], tp, vc);
            }
        });
    }
    let v = &v_buf[..];
    let op = OutPtr(out.as_mut_ptr());
    (0..cout.div_ceil(TASK_ROWS)).into_par_iter().for_each(|q| {
        let (r0, r1) = (q * TASK_ROWS, ((q + 1) * TASK_ROWS).min(cout));
        for (s, &(chans, rows, at)) in kept.iter().enumerate() {
            let task_rows =
                &rows[rows.partition_point(|&r| r < r0)..rows.partition_point(|&r| r < r1)];
            if task_rows.is_empty() {
                continue;
            }
            let plane = PlaneRows {
                lines,
                chans,
                v: &v[at..at + chans.len() * per_chan],
                hw: [h, w],
                bias: job.samples[s].bias,
                residual: job.residual,
                act: job.act,
                out: op,
                at: s * out_len,
            };
            // SAFETY: AVX-512F is present; rows r0..r1 of every sample belong to this
            // task alone.
            unsafe { plane.run(task_rows) };
        }
    });
    pool.give(v_buf);
}

/// One sample's plan on the lines: its kept channels and their V, and where its output
/// planes go (`out` from `at`, as the residual's).
struct PlaneRows<'a> {
    lines: &'a LineWeights,
    chans: &'a [usize],
    /// `[kept channel][tile][ξ]`, the plane's tiles rounded up to whole halves.
    v: &'a [f32],
    hw: [usize; 2],
    bias: &'a [f32],
    residual: Residual<'a>,
    act: Act,
    out: OutPtr,
    at: usize,
}

impl PlaneRows<'_> {
    /// Computes `task_rows` (ascending, at most [`TASK_ROWS`]) into their output planes.
    ///
    /// # Safety
    /// AVX-512F is present; every row's plane `out[at + r · h · w..][..h · w]` is inside
    /// the output and written by no one else meanwhile.
    unsafe fn run(&self, task_rows: &[usize]) {
        let [h, w] = self.hw;
        let (th, tw) = tiles(h, w);
        let halves = (th * tw).div_ceil(HALF);
        let tp = halves * HALF;
        let per_chan = tp * XI;
        let chans = self.chans;
        let u = self.lines.lines();
        let bases = |rows: &[usize]| -> Lines {
            let mut at = [std::ptr::null(); ROWS];
            for (a, &r) in at.iter_mut().zip(rows) {
                *a = u[r * XI..].as_ptr();
            }
            Lines { at, n: rows.len() }
        };
        // Halves per call: all of them over at most 16 tiles, else one (see BLOCK_WIDE).
        let (per_block, per_call) = if tp <= NARROW_TILES {
            (BLOCK, halves)
        } else {
            (BLOCK_WIDE, 1)
        };
        let block = |b: usize| &chans[b * per_block..((b + 1) * per_block).min(chans.len())];
        let blocks = chans.len().div_ceil(per_block);
        let mut spare = Spare::take();
        let m = line_aligned(&mut spare, TASK_ROWS * per_chan);
        if blocks == 0 {
            // No input channel kept: the sums are zero.
            m.fill(0.0);
        }
        let groups: Vec<Lines> = task_rows.chunks(ROWS).map(bases).collect();
        // Every group of rows over one block of channels (their V stays in L1), block
        // after block, and over larger planes half after half within a block; each call
        // prefetches the weight lines of the call [`LINES_AHEAD`] after it.
        // Call `i`: block, first half and group of rows (groups fastest, then halves).
        let n_groups = groups.len();
        let steps = halves.div_ceil(per_call);
        let call_at = |i: usize| {
            (
                i / (steps * n_groups),
                i / n_groups % steps * per_call,
                i % n_groups,
            )
        };
        let n_calls = blocks * steps * n_groups;
        for i in 0..n_calls {
            let (b, h0, g) = call_at(i);
            let next = (i + LINES_AHEAD < n_calls).then(|| {
                let (nb, _, ng) = call_at(i + LINES_AHEAD);
                (groups[ng], block(nb))
            });
            let chans = block(b);
            let c0 = b * per_block;
            let call = Call {
                chan_stride: self.lines.rows * XI,
                rows: groups[g],
                chans,
                v: &self.v[c0 * per_chan..(c0 + chans.len()) * per_chan],
                halves: h0..(h0 + per_call).min(halves),
                tp,
                first: b == 0,
                next,
            };
            let ms = &mut m[g * ROWS * per_chan..][..groups[g].n * per_chan];
            // SAFETY: AVX-512F is present (the caller's contract); the rows and channels
            // are the weights', `v` holds a [tp × XI] block per channel of the call, and
            // `ms` one per row.
            unsafe {
                match groups[g].n {
                    3 => gemm_rows::<3>(&call, ms),
                    2 => gemm_rows::<2>(&call, ms),
                    _ => gemm_rows::<1>(&call, ms),
                }
            }
        }
        for (&r, mr) in task_rows.iter().zip(m.chunks_exact(per_chan)) {
            let at = self.at + r * h * w;
            // SAFETY: the row's plane is this call's alone (the caller's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(self.out.get().add(at), h * w) };
            let res = self.residual.part(at, h * w);
            output_transform(mr, [h, w], self.bias[r], res, self.act, dst);
        }
    }
}

/// Where the weight lines of up to [`ROWS`] rows start (channel 0).
#[derive(Clone, Copy)]
struct Lines {
    at: [*const f32; ROWS],
    n: usize,
}

/// One kernel call: rows over a block of channels.
struct Call<'a> {
    /// Floats from one channel's line of a row to the next channel's.
    chan_stride: usize,
    rows: Lines,
    chans: &'a [usize],
    /// `[channel of the block][tile][ξ]`, `tp` tiles per channel.
    v: &'a [f32],
    /// The halves (8 tiles each) this call runs.
    halves: std::ops::Range<usize>,
    /// Tiles per channel of `v` and per row of `m`: 8 per half of the plane.
    tp: usize,
    /// Whether this is the first block: the sums start from zero, not from `m`.
    first: bool,
    /// The next call's rows and channels, whose lines are prefetched.
    next: Option<(Lines, &'a [usize])>,
}

/// Adds the block's products to `m[(i · tp + t) · XI + ξ]` for the call's row `i` and
/// the tiles `t` of its halves.
///
/// # Safety
/// AVX-512F is present; `R == call.rows.n`, `m.len() == R · tp · XI`, every row's lines
/// hold every channel of `call.chans` (and of the next call's), and `v` holds
/// `chans.len() · tp · XI` floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // t picks one tile's accumulator in each row's
unsafe fn gemm_rows<const R: usize>(call: &Call, m: &mut [f32]) {
    use std::arch::x86_64::*;
    let per_row = call.tp * XI;
    debug_assert!(call.rows.n == R && m.len() == R * per_row);
    debug_assert!(call.v.len() >= call.chans.len() * per_row);
    let bases = &call.rows.at;
    let vp = call.v.as_ptr();
    for half in call.halves.clone() {
        let mut acc = [[_mm512_setzero_ps(); HALF]; R];
        if !call.first {
            for i in 0..R {
                for t in 0..HALF {
                    acc[i][t] = _mm512_loadu_ps(m[i * per_row + (half * HALF + t) * XI..].as_ptr());
                }
            }
        }
        let vh = vp.add(half * HALF * XI);
        for (ci, &c) in call.chans.iter().enumerate() {
            if half == call.halves.start {
                if let Some((next, &nc)) = call.next.and_then(|(l, cs)| Some((l, cs.get(ci)?))) {
                    // Into L2: into L1, ResNet-18's gated `layer4` layers took as long or up
                    // to 1.28× as long (budget 0.5).
                    for &b in &next.at[..next.n] {
                        _mm_prefetch::<_MM_HINT_T1>(b.add(nc * call.chan_stride).cast());
                    }
                }
            }
            let ur: [__m512; R] =
                std::array::from_fn(|i| _mm512_loadu_ps(bases[i].add(c * call.chan_stride)));
            let vc = vh.add(ci * per_row);
            for t in 0..HALF {
                let vt = _mm512_loadu_ps(vc.add(t * XI));
                for i in 0..R {
                    acc[i][t] = _mm512_fmadd_ps(ur[i], vt, acc[i][t]);
                }
            }
        }
        for i in 0..R {
            for t in 0..HALF {
                let at = i * per_row + (half * HALF + t) * XI;
                _mm512_storeu_ps(m[at..at + XI].as_mut_ptr(), acc[i][t]);
            }
        }
    }
}

/// One input plane's tiles into `dst` (`[tile][ξ]`, `tp` tiles; those past the plane's
/// are zero): `V = Bᵀ d B` over each tile's 4×4 patch `d` of the plane padded
/// by 1, `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`, a tile in
/// one vector: the patch's rows are its four 128-bit lanes, combined by lane shuffles,
/// then its columns by shuffles inside the lanes.
///
/// # Safety
/// AVX-512F is present.
#[target_feature(enable = "avx512f")]
unsafe fn input_transform(plane: &[f32], [h, w]: [usize; 2], tp: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let (th, tw) = tiles(h, w);
    let (ph, pw) = (2 * th + 2, 2 * tw + 2);
    // 2·th + 2 rows of 2·tw + 2 with th · tw ≤ TILES: 4 · (th · tw + th + tw + 1) ≤
    // 4 · (2 · TILES + 2) values. Only those are zeroed, not the whole array.
    let mut storage = std::mem::MaybeUninit::<[f32; 4 * (2 * TILES + 2)]>::uninit();
    let first = storage.as_mut_ptr().cast::<f32>();
    assert!(ph * pw <= 4 * (2 * TILES + 2));
    std::ptr::write_bytes(first, 0, ph * pw);
    // SAFETY: the first ph · pw floats are inside the array and now initialized.
    let padded = std::slice::from_raw_parts_mut(first, ph * pw);
    for (y, row) in plane.chunks_exact(w).enumerate() {
        padded[(y + 1) * pw + 1..][..w].copy_from_slice(row);
    }
    assert!(dst.len() >= tp * XI && th * tw <= tp);
    // Row i of Bᵀ d is a + s·b with a, b rows (0, 1, 2, 1), (2, 2, 1, 3) of d and
    // s = (-1, 1, -1, -1); the columns likewise. Multiplying by ±1 is exact.
    let s_rows = _mm512_setr_ps(
        -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0,
    );
    let s_cols = _mm512_setr_ps(
        -1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, -1.0,
    );
    const A: i32 = 0b01_10_01_00;
    const B: i32 = 0b11_01_10_10;
    let pp = padded.as_ptr();
    for ty in 0..th {
        for tx in 0..tw {
            let p = pp.add(2 * ty * pw + 2 * tx);
            let d = _mm512_castps128_ps512(_mm_loadu_ps(p));
            let d = _mm512_insertf32x4::<1>(d, _mm_loadu_ps(p.add(pw)));
            let d = _mm512_insertf32x4::<2>(d, _mm_loadu_ps(p.add(2 * pw)));
            let d = _mm512_insertf32x4::<3>(d, _mm_loadu_ps(p.add(3 * pw)));
            let r = _mm512_fmadd_ps(
                _mm512_shuffle_f32x4::<B>(d, d),
                s_rows,
                _mm512_shuffle_f32x4::<A>(d, d),
            );
            let v = _mm512_fmadd_ps(_mm512_permute_ps::<B>(r), s_cols, _mm512_permute_ps::<A>(r));
            _mm512_storeu_ps(dst.as_mut_ptr().add((ty * tw + tx) * XI), v);
        }
    }
    dst[th * tw * XI..tp * XI].fill(0.0);
}

/// One output row's `m` (`[tile][ξ]`) back into its plane, with bias, residual and
/// activation: `Y = Aᵀ M A`, `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
fn output_transform(
    m: &[f32],
    [h, w]: [usize; 2],
    bias: f32,
    residual: Residual,
    act: Act,
    dst: &mut [f32],
) {
    let (th, tw) = tiles(h, w);
    for ty in 0..th {
        for tx in 0..tw {
            let t = &m[(ty * tw + tx) * XI..][..XI];
            let mut r = [[0f32; 4]; 2];
            for j in 0..4 {
                let (a, b, c, d) = (t[j], t[4 + j], t[8 + j], t[12 + j]);
                r[0][j] = a + b + c;
                r[1][j] = b - c - d;
            }
            for (a, ra) in r.iter().enumerate() {
                let oy = 2 * ty + a;
                if oy >= h {
                    break;
                }
                let y = [ra[0] + ra[1] + ra[2] + bias, ra[1] - ra[2] - ra[3] + bias];
                for (b, &yb) in y.iter().enumerate() {
                    let ox = 2 * tx + b;
                    if ox >= w {
                        break;
                    }
                    let at = oy * w + ox;
                    let v = match residual {
                        Residual::None => yb,
                        Residual::InOut => dst[at] + yb,
                        Residual::Apart(res) => yb + res[at],
                    };
                    dst[at] = act.apply(v);
                }
            }
        }
    }
}
