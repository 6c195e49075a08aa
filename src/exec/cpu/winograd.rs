//! 3×3, stride-1, pad-1 convolutions by Winograd's minimal filtering, F(2×2, 3×3), or
//! F(4×4, 3×3) where the engine's tuning picks it ([`Algorithm`]; its transforms are in
//! [`super::winograd_f4`], and everything below holds for both with 36 GEMMs over
//! 4×4 tiles for 16 over 2×2 ones).
//!
//! Each 2×2 block of outputs ("tile") is computed from the 4×4 input patch under it:
//! the patch is transformed (`V = Bᵀ d B`), multiplied element-wise by the transformed
//! filter (`U = G g Gᵀ`, made once at load) and summed over input channels, and the
//! 4×4 sum is transformed back (`Y = Aᵀ M A`). Summed over channels, the element-wise
//! products are 16 GEMMs, one per element ξ of the 4×4 grid:
//! `M[ξ] (cout × tiles) = U[ξ] (cout × cin) · V[ξ] (cin × tiles)`, which run on the
//! engine's micro-kernels with `U[ξ]` packed like any weight matrix and `V[ξ]` written
//! straight into packed panels by the input transform. 16 multiply-adds per tile and
//! channel pair instead of 36: 2.25× fewer FLOPs in the GEMMs, paid for with the two
//! transforms (a few adds per value, linear in channels, not in their product) and
//! with 16/9 the weight bytes.
//!
//! FLOPs are still counted as the direct convolution's everywhere in dynsparse (dense,
//! executed, budgets), so a Winograd layer's GFLOP/s are effective ones.
//!
//! A sparse plan runs the same way on its subset: only kept input channels are
//! transformed (their columns of each `U[ξ]` copied into a compact A, as for direct
//! convolutions), only kept output channels are rows of the GEMMs and transformed back.
//! Or ([`Job::zero_dropped`]) every input channel is transformed, a dropped one from a
//! plane of zeros, and the GEMMs read every column of `U[ξ]` in place: more
//! multiply-adds, no copy.
//! A plan over enough tiles that `V` and `M` outweigh `U` runs band by band
//! ([`conv_bands`]): each thread transforms, multiplies and transforms back its own
//! fixed share of the tiles, so that no transformed value is read on another core than
//! the one that wrote it. Otherwise each phase is shared out on its own (input
//! transforms by channel, GEMMs by ξ and panels, output transforms by output channel),
//! which reads the weights once between the threads.
//!
//! A batch whose samples each keep their own channels runs through [`conv_samples`]:
//! each sample's tiles read its kept columns of `U[ξ]` in place, so that the samples
//! share the weights' stream. Spatial plans are not served here.

use std::borrow::Cow;

use rayon::prelude::*;

use super::gemm::{self, Epilogue, Isa, OutPtr, Residual, Tile, NR, PACK};
#[cfg(target_arch = "x86_64")]
use super::lanes::{Lanes, Ymm, Zmm};
use super::pool::{line_aligned, Buf, BufferPool, Spare, LINE};
use crate::model::Act;

/// Elements of the transformed 4×4 grid of F(2×2, 3×3): GEMMs per convolution.
pub const XI: usize = 16;

/// Which of Winograd's algorithms a layer's filters are transformed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// F(2×2, 3×3): 2×2 output tiles from 4×4 patches, [`XI`] GEMMs.
    F2,
    /// F(4×4, 3×3): 4×4 output tiles from 6×6 patches, 36 GEMMs (see
    /// [`super::winograd_f4`]).
    F4,
}

impl Algorithm {
    /// Outputs along each side of a tile.
    pub fn size(self) -> usize {
        match self {
            Algorithm::F2 => 2,
            Algorithm::F4 => 4,
        }
    }

    /// Elements of the transformed grid: GEMMs per convolution.
    pub fn xi(self) -> usize {
        (self.size() + 2).pow(2)
    }

    /// Tiles of an `h × w` output: `(tile rows, tile columns)`.
    pub fn tiles(self, h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(self.size()), w.div_ceil(self.size()))
    }
}

/// A 3×3 filter bank transformed for F(2×2, 3×3) or F(4×4, 3×3): `U[ξ]` for each ξ,
/// packed as A.
pub struct WinogradWeights {
    pub algo: Algorithm,
    /// `algo.xi()` packed A matrices of `rows × cin`, one after another.
    pub u: Vec<f32>,
    pub rows: usize,
    pub cin: usize,
    /// The same filters as one line per (row, channel) pair, for gated one-sample plans
    /// over planes of few tiles (see [`super::winograd_lines`]): `Some` where the engine
    /// lets such plans run on them, made by the first plan that does. A dense-only
    /// user never holds them (16.8 MB for a 512 → 512 layer).
    #[cfg(target_arch = "x86_64")]
    pub lines: Option<std::sync::OnceLock<super::winograd_lines::LineWeights>>,
    /// The largest share of (row, channel) pairs a plan keeps and still runs on the
    /// lines ([`super::Tuning::lines_max_kept`]).
    #[cfg(target_arch = "x86_64")]
    pub lines_max_kept: f64,
    /// The least share of (row, channel) pairs a plan keeps to run by Winograd over
    /// rows wider than the engine's narrow limit
    /// ([`super::Tuning::winograd_wide_min_kept`]).
    pub wide_min_kept: f64,
}

/// `U = G g Gᵀ` of one 3×3 filter `g` (row-major), `[ξ]` with ξ = 4 · i + j.
pub fn filter_transform(g: &[f32]) -> [f32; XI] {
    // G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]; first G·g (4 × 3).
    let mut gg = [[0f32; 3]; 4];
    for c in 0..3 {
        let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
        gg[0][c] = a;
        gg[1][c] = 0.5 * (a + b + d);
        gg[2][c] = 0.5 * (a - b + d);
        gg[3][c] = d;
    }
    let mut out = [0f32; XI];
    for (i, r) in gg.iter().enumerate() {
        let u = [
            r[0],
            0.5 * (r[0] + r[1] + r[2]),
            0.5 * (r[0] - r[1] + r[2]),
            r[2],
        ];
        out[i * 4..i * 4 + 4].copy_from_slice(&u);
    }
    out
}

impl WinogradWeights {
    /// Transforms `w` (`rows × cin × 3 × 3`, row-major) into `U[ξ] = G g Gᵀ` for
    /// `algo`.
    pub fn new(w: &[f32], rows: usize, cin: usize, algo: Algorithm) -> Self {
        assert_eq!(w.len(), rows * cin * 9);
        let xis = algo.xi();
        let mut by_xi = vec![0f32; xis * rows * cin];
        let plane = rows * cin;
        for (rc, g) in w.chunks_exact(9).enumerate() {
            let mut put = |xi: usize, v: f32| by_xi[xi * plane + rc] = v;
            match algo {
                Algorithm::F2 => filter_transform(g)
                    .into_iter()
                    .enumerate()
                    .for_each(|(x, v)| put(x, v)),
                Algorithm::F4 => super::winograd_f4::filter_transform(g)
                    .into_iter()
                    .enumerate()
                    .for_each(|(x, v)| put(x, v)),
            }
        }
        let one = gemm::packed_a_len(rows, cin);
        let mut u = Vec::with_capacity(xis * one);
        for m in by_xi.chunks_exact(plane) {
            u.extend_from_slice(&gemm::pack_a(m, rows, cin));
        }
        WinogradWeights {
            algo,
            u,
            rows,
            cin,
            #[cfg(target_arch = "x86_64")]
            lines: None,
            #[cfg(target_arch = "x86_64")]
            lines_max_kept: super::Tuning::DEFAULT.lines_max_kept,
            wide_min_kept: super::Tuning::DEFAULT.winograd_wide_min_kept,
        }
    }

    /// The weights as lines where a plan of `batch` samples over `hw` outputs that keeps
    /// `rows` and `chans` (`None`: all) runs on them ([`winograd_lines::takes`]), made
    /// now if no plan has needed them before (one read of `U`: 5.9 ms for a 512 → 512
    /// layer on one thread, 11 ms with fresh pages; a dense pass of the layer takes
    /// about 1 ms).
    ///
    /// [`winograd_lines::takes`]: super::winograd_lines::takes
    #[cfg(target_arch = "x86_64")]
    pub fn lines_for(
        &self,
        isa: Isa,
        batch: usize,
        hw: [usize; 2],
        rows: Option<&[usize]>,
        chans: Option<&[usize]>,
    ) -> Option<&super::winograd_lines::LineWeights> {
        use super::winograd_lines::{takes, LineWeights};
        let cell = self.lines.as_ref().filter(|_| self.algo == Algorithm::F2)?;
        takes(
            isa,
            batch,
            hw,
            [self.rows, self.cin],
            rows,
            chans,
            self.lines_max_kept,
        )
        .then(|| cell.get_or_init(|| LineWeights::from_packed(self)))
    }

    /// The weights as lines for a batch whose samples each keep their own channels over
    /// `hw` outputs ([`winograd_lines::conv_samples`]): on AVX-512, over planes of at
    /// most 16 tiles, for a layer that holds lines; made now if no plan has needed them.
    ///
    /// [`winograd_lines::conv_samples`]: super::winograd_lines::conv_samples
    #[cfg(target_arch = "x86_64")]
    pub fn lines_for_samples(
        &self,
        isa: Isa,
        hw: [usize; 2],
    ) -> Option<&super::winograd_lines::LineWeights> {
        use super::winograd_lines::{serves_samples, LineWeights};
        let cell = self.lines.as_ref().filter(|_| self.algo == Algorithm::F2)?;
        serves_samples(isa, hw).then(|| cell.get_or_init(|| LineWeights::from_packed(self)))
    }

    /// Floats of one packed `U[ξ]`.
    fn one(&self) -> usize {
        gemm::packed_a_len(self.rows, self.cin)
    }
}

/// The kept indices given, or all of `0..n`.
pub fn kept_or_all(given: Option<&[usize]>, n: usize) -> Cow<'_, [usize]> {
    given.map_or_else(|| (0..n).collect::<Vec<_>>().into(), Cow::Borrowed)
}

/// Tiles of an `h × w` output: `(tile rows, tile columns)`.
pub fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// What one convolution computes.
pub struct Job<'a> {
    pub isa: Isa,
    /// Samples, whose tiles run through the GEMMs together.
    pub batch: usize,
    /// The input, per sample `cin` planes of `h × w` (all of them, kept or not).
    pub x: &'a [f32],
    pub hw: [usize; 2],
    pub weights: &'a WinogradWeights,
    /// Kept input channels (strictly ascending), or all.
    pub chans: Option<&'a [usize]>,
    /// Kept output channels (strictly ascending), or all.
    pub rows: Option<&'a [usize]>,
    pub bias: &'a [f32],
    /// Added before the activation; the output's layout (or already in it).
    pub residual: Residual<'a>,
    pub act: Act,
    /// Whether to run on this thread only (a batch's samples already run in parallel).
    pub serial: bool,
    /// Input channels outside `chans` enter the GEMMs as zeros instead of being left
    /// out: every column of `U[ξ]` is read in place and none is copied. The result is
    /// the same; the engine's `winograd_way` says where it is faster.
    pub zero_dropped: bool,
    /// Whether the plan may run band by band, where [`in_bands`] says so
    /// ([`conv_bands`]).
    pub bands: bool,
}

/// Runs `job` into `out` (per sample `rows × h × w`). Only kept output channels are
/// written.
///
/// `V` and `M` come from `pool` (fresh pages cost more than the transforms that fill
/// them: a first version that allocated them per call took 2.4× the direct
/// convolution's time at 56 × 56).
pub fn conv<'a>(job: &Job<'a>, pool: &BufferPool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(lines) = job
        .weights
        .lines_for(job.isa, job.batch, job.hw, job.rows, job.chans)
    {
        return super::winograd_lines::conv(job, lines, pool, out);
    }
    let [h, w] = job.hw;
    let algo = job.weights.algo;
    let xis = algo.xi();
    let (th, tw) = algo.tiles(h, w);
    let t_one = th * tw;
    let t = job.batch * t_one;
    let panels = t.div_ceil(NR);
    let (in_len, out_len) = (job.weights.cin * h * w, job.weights.rows * h * w);
    assert!(job.x.len() >= job.batch * in_len && out.len() >= job.batch * out_len);
    // Dropped channels entered as zeros: every channel is transformed, a dropped one
    // from a plane of zeros.
    let kept: Option<Vec<bool>> = job.zero_dropped.then_some(job.chans).flatten().map(|c| {
        let mut kept = vec![false; job.weights.cin];
        c.iter().for_each(|&c| kept[c] = true);
        kept
    });
    let transformed = if kept.is_some() { None } else { job.chans };
    let (chans, rows) = (
        kept_or_all(transformed, job.weights.cin),
        kept_or_all(job.rows, job.weights.rows),
    );
    let (chans, rows) = (&chans[..], &rows[..]);
    let zeros = vec![0f32; if kept.is_some() { h * w } else { 0 }];
    let kc = chans.len();
    let nr = rows.len();
    if nr == 0 {
        return;
    }
    if job.bands && in_bands(job.hw, job.batch, kc, nr) {
        let kept = kept.as_deref();
        return conv_bands(job, pool, out, [chans, rows], kept, &zeros);
    }
    // V: per ξ, packed panels [panel][kc][NR].
    let v_xi = v_stride(panels, kc);
    let mut v_buf = pool.take_dirty(xis * v_xi);
    let v = &mut v_buf[..];
    {
        let vp = OutPtr(v.as_mut_ptr());
        let one = |scratch: &mut Scratch, sc: usize| {
            let (s, ci) = (sc / kc, sc % kc);
            let plane = match &kept {
                Some(k) if !k[chans[ci]] => &zeros[..],
                _ => &job.x[s * in_len + chans[ci] * h * w..][..h * w],
            };
            let to = Dest {
                algo,
                v: vp,
                first_tile: s * t_one,
                range: [0, t_one],
                last: s + 1 == job.batch,
                ci,
                kc,
                panels,
            };
            // SAFETY: (sample, channel) writes only its own tiles' lanes of row ci.
            unsafe { input_transform(job.isa, scratch, plane, [h, w], to) };
        };
        if job.serial {
            let mut scratch = Scratch::default();
            (0..job.batch * kc).for_each(|sc| one(&mut scratch, sc));
        } else {
            (0..job.batch * kc)
                .into_par_iter()
                .for_each_init(Scratch::default, one);
        }
    }
    let v = &*v;
    // A task is one ξ and a block of panels; each panel stays in L1 while every row
    // tile of A runs over it (a step of K reads 6 values of A and 16 or 32 of the panel).
    // Blocks of panels rather than single panels: at 56 × 56 there are 25 per sample.
    let per_block = (PANELS_BYTES / (kc * NR * std::mem::size_of::<f32>())).clamp(1, panels);
    let blocks = panels.div_ceil(per_block);
    // A: U[ξ], with only the kept input channels' columns when some are dropped; of
    // those, only the packed blocks that kept rows lie in.
    let dst_len = PACK * kc;
    let dropped = kc < job.weights.cin;
    // A dense plan reads U in place and needs no list.
    let a_blocks = if dropped {
        kept_blocks(rows)
    } else {
        Vec::new()
    };
    // With one task per ξ, each copies its ξ's kept columns just before its GEMMs, so
    // that they stay in the cache of the core that reads them, rather than every (ξ,
    // block) copied up front into a compact A that goes to memory (2.4 MB for 144 of
    // 256 channels kept on each side at 14 × 14) and comes back to both cores.
    // In-process pairs at budget 0.5: every gated Winograd layer took 0.88–0.96 of its
    // time at batch 8 (ResNet-18 and ResNet-50), whole passes 0.96–1.00 at batch 8
    // (four runs each) and 0.985–1.004 at batch 1.
    let local = dropped && blocks == 1;
    let mut a_buf = None;
    let (a_all, ka) = if !dropped {
        (&job.weights.u[..], job.weights.cin)
    } else if local {
        (&[][..], kc)
    } else {
        let a = a_buf.insert(compact_u(job.weights, chans, &a_blocks, job.serial, pool));
        (&a[..], kc)
    };
    let a_one = gemm::packed_a_len(job.weights.rows, ka);
    // M: per ξ, [kept row][panels · NR].
    let ldc = panels * NR;
    let m_xi = nr * ldc;
    // 8 more: a tile row's vector reads run up to 7 values past it (see
    // `output_transform_avx2`).
    let mut m_buf = pool.take_dirty(xis * m_xi + 8);
    let m = &mut m_buf[..];
    let zeros = vec![0f32; nr.max(PACK)];
    let mr = job.isa.mr();
    let out_rows: Vec<usize> = (0..nr).collect();
    let cols: Vec<usize> = (0..ldc).collect();
    {
        let mp = OutPtr(m.as_mut_ptr());
        let ep = Epilogue {
            bias: &zeros,
            residual: Residual::None,
            act: Act::None,
        };
        let task = |(xi, q): (usize, usize)| {
            let mut spare = local.then(Spare::take);
            let a = match spare.as_mut() {
                Some(sp) => {
                    let a = line_aligned(sp, a_one);
                    for &b in &a_blocks {
                        let to = &mut a[b * dst_len..(b + 1) * dst_len];
                        copy_u_block(job.weights, chans, xi, b, to);
                    }
                    &*a
                }
                None => &a_all[xi * a_one..(xi + 1) * a_one],
            };
            let (p0, p1) = (q * panels / blocks, (q + 1) * panels / blocks);
            // Each tile prefetches the block of A the task's next tile reads, a whole
            // tile ahead. Read in place, U streams from memory in a pass whose weights
            // outgrow the L3 (ResNet-18's 7 × 7 layers read 16.8 MB of U each), and the
            // hardware prefetcher alone left the multiply-adds waiting on it: one such
            // layer with the L3 flushed before each run took 0.78–0.83 ms with the
            // prefetch against 1.18–1.48 without (0.37–0.39 either way with U in L3;
            // both flushed figures also include a second worker that slept through the
            // flush, see `workers`). Whole passes back to back, separate builds
            // alternated (Zen 5, 2 threads, batch 1): ResNet-18 dense
            // 0.858 of the time, ResNet-50 0.931, ResNet-18 at budget 0.5 0.982 and at
            // batch 8 0.979. A task's copy of kept columns (`local`) is in its cache
            // already and prefetches nothing.
            let prefetch = !local;
            let first_rows = rows.chunks(mr).next().unwrap_or(&[]);
            for p in p0..p1 {
                let mut tiles = rows.chunks(mr).zip(out_rows.chunks(mr)).peekable();
                while let Some((arows, crow)) = tiles.next() {
                    let next_rows = match tiles.peek() {
                        Some((n, _)) => Some(*n),
                        None if p + 1 < p1 => Some(first_rows),
                        None => None,
                    };
                    let next = match next_rows.filter(|_| prefetch) {
                        Some(n) => block_of(a, n[0], ka),
                        None => gemm::Prefetch::NONE,
                    };
                    let c0 = p * NR;
                    let tile = Tile {
                        a,
                        ka,
                        arows,
                        kmap: None,
                        boff: None,
                        k: kc,
                        rows: crow,
                        panel: &v[xi * v_xi + p * kc * NR..][..kc * NR],
                        ldb: NR,
                        ldc,
                        cols: &cols[c0..c0 + NR.min(t - c0)],
                        lanes: None,
                    };
                    // SAFETY: A holds every kept row (packed_a_len of all rows), the
                    // panel kc × NR floats; rows < nr and cols < ldc index inside this
                    // ξ's M, whose panels p0..p1 only this task writes. (A prefetch
                    // never faults.)
                    unsafe {
                        let c = mp.get().add(xi * m_xi);
                        gemm::run_tile_prefetching(job.isa, &tile, &ep, c, next);
                    }
                }
            }
        };
        let work: Vec<(usize, usize)> = (0..xis)
            .flat_map(|xi| (0..blocks).map(move |q| (xi, q)))
            .collect();
        if job.serial {
            work.into_iter().for_each(task);
        } else {
            work.into_par_iter().for_each(task);
        }
    }
    let op = OutPtr(out.as_mut_ptr());
    let back = |si: usize| {
        let (s, i) = (si / nr, si % nr);
        let r = rows[i];
        let at = s * out_len + r * h * w;
        let b = Back {
            algo,
            m,
            m_xi,
            row_at: i * ldc + s * t_one,
            range: [0, t_one],
            hw: [h, w],
            bias: job.bias[r],
            residual: job.residual.part(at, h * w),
            act: job.act,
        };
        // SAFETY: (sample, row) writes its own plane only, inside `out`.
        unsafe { output_transform(job.isa, b, OutPtr(op.get().add(at))) };
    };
    if job.serial {
        (0..job.batch * nr).for_each(back);
    } else {
        (0..job.batch * nr).into_par_iter().for_each(back);
    }
    pool.give(v_buf);
    pool.give(m_buf);
    if let Some(a) = a_buf {
        pool.give(a);
    }
}

/// What a GEMM tile prefetches for the tile after it, whose first row is `row` of a
/// packed `a` of `ka` columns: that row's block, a block's width of values per step of K
/// (the whole block over K steps).
fn block_of(a: &[f32], row: usize, ka: usize) -> gemm::Prefetch {
    gemm::Prefetch {
        at: a.as_ptr().wrapping_add(gemm::a_offset(row, ka)),
        blocks: 1,
        stride: 0,
        step: PACK,
        panel: std::ptr::null(),
    }
}

/// The packed blocks of A that kept rows `rows` (strictly ascending) lie in.
fn kept_blocks(rows: &[usize]) -> Vec<usize> {
    let mut blocks: Vec<usize> = rows.iter().map(|r| r / PACK).collect();
    blocks.dedup();
    blocks
}

/// Block `b` of `U[ξ]`, its columns `chans` only, into `to` (`PACK · chans.len()`
/// floats).
fn copy_u_block(w: &WinogradWeights, chans: &[usize], xi: usize, b: usize, to: &mut [f32]) {
    let src_len = PACK * w.cin;
    let src = &w.u[xi * w.one() + b * src_len..][..src_len];
    gemm::pack_a_channels(src, w.cin, chans, 1, to);
}

/// Every `U[ξ]` with its columns `chans` only: a compact A of `packed_a_len(rows,
/// chans.len())` floats per ξ, of which only `blocks` (those kept rows lie in) are
/// written; copied over the pool's threads unless `serial`.
fn compact_u(
    w: &WinogradWeights,
    chans: &[usize],
    blocks: &[usize],
    serial: bool,
    pool: &BufferPool,
) -> Buf {
    let per = gemm::packed_a_len(w.rows, chans.len());
    let dst_len = PACK * chans.len();
    let mut a = pool.take_dirty(w.algo.xi() * per);
    let ap = OutPtr(a.as_mut_ptr());
    let copy = |(xi, b): (usize, usize)| {
        // SAFETY: each (ξ, block) pair writes its own block of the compact A.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(ap.get().add(xi * per + b * dst_len), dst_len)
        };
        copy_u_block(w, chans, xi, b, dst);
    };
    let work = (0..w.algo.xi()).flat_map(|xi| blocks.iter().map(move |&b| (xi, b)));
    if serial {
        work.for_each(copy);
    } else {
        work.collect::<Vec<_>>().into_par_iter().for_each(copy);
    }
    a
}

/// Whether every tile of `mr` of `rows` (strictly ascending) is consecutive rows of one
/// packed block of A, which a micro-tile reads as one stream.
fn in_blocks(rows: &[usize], mr: usize) -> bool {
    rows.chunks(mr)
        .all(|t| t[t.len() - 1] - t[0] == t.len() - 1 && t[0] / PACK == t[t.len() - 1] / PACK)
}

/// Every `U[ξ]` with its rows `rows` only, packed as rows `0..rows.len()`, and its
/// columns `chans` only.
fn compact_rows_u(
    isa: Isa,
    w: &WinogradWeights,
    chans: &[usize],
    rows: &[usize],
    serial: bool,
    pool: &BufferPool,
) -> Buf {
    let kc = chans.len();
    let per = gemm::packed_a_len(rows.len(), kc);
    let mut a = pool.take_dirty(w.algo.xi() * per);
    let copy = |(xi, dst): (usize, &mut [f32])| copy_rows_u(isa, w, chans, rows, xi, dst);
    if serial {
        a[..w.algo.xi() * per]
            .chunks_exact_mut(per)
            .enumerate()
            .for_each(copy);
    } else {
        a[..w.algo.xi() * per]
            .par_chunks_exact_mut(per)
            .enumerate()
            .for_each(copy);
    }
    a
}

/// `U[ξ]`'s rows `rows` (strictly ascending) and columns `chans` into `dst`, packed as
/// rows `0..rows.len()` of `chans.len()` columns; the rows that pad the last block are
/// zero.
fn copy_rows_u(
    isa: Isa,
    w: &WinogradWeights,
    chans: &[usize],
    rows: &[usize],
    xi: usize,
    dst: &mut [f32],
) {
    let kc = chans.len();
    let src = &w.u[xi * w.one()..][..w.one()];
    let dst = &mut dst[..gemm::packed_a_len(rows.len(), kc)];
    for (bi, block) in dst.chunks_exact_mut(PACK * kc).enumerate() {
        let rs = &rows[bi * PACK..rows.len().min((bi + 1) * PACK)];
        if rs.len() < PACK {
            block.fill(0.0);
        }
        // Runs of the block's rows that lie in one source block: (source block, their
        // lanes there, the first of them here).
        let mut runs = [(0usize, 0u16, 0usize); PACK];
        let mut n = 0;
        for (j, &r) in rs.iter().enumerate() {
            let (sb, lane) = (r / PACK, r % PACK);
            if n > 0 && runs[n - 1].0 == sb {
                runs[n - 1].1 |= 1 << lane;
            } else {
                runs[n] = (sb, 1 << lane, j);
                n += 1;
            }
        }
        let runs = &runs[..n];
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            // SAFETY: AVX-512F is present; each run reads inside its source block's
            // column and writes its rows' lanes of this block's column.
            unsafe { copy_runs_avx512(src, w.cin, chans, runs, block) };
            continue;
        }
        let _ = isa;
        for &(sb, lanes, j0) in runs {
            let from = &src[sb * PACK * w.cin..][..PACK * w.cin];
            for (ci, &c) in chans.iter().enumerate() {
                let col = &from[c * PACK..(c + 1) * PACK];
                let kept = (0..PACK).filter(|l| lanes >> l & 1 == 1);
                for (j, l) in (j0..).zip(kept) {
                    block[ci * PACK + j] = col[l];
                }
            }
        }
    }
}

/// [`copy_rows_u`]'s runs into one block: per column and run, the run's lanes loaded,
/// compressed to its first lanes and stored where its rows go.
///
/// # Safety
/// AVX-512F is available; every run's source block lies in `src` (`PACK · cin` floats a
/// block) and its rows inside `block` (`PACK · chans.len()` floats).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_runs_avx512(
    src: &[f32],
    cin: usize,
    chans: &[usize],
    runs: &[(usize, u16, usize)],
    block: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(block.len() >= PACK * chans.len());
    for &(sb, lanes, j0) in runs {
        debug_assert!((sb + 1) * PACK * cin <= src.len());
        let from = src.as_ptr().add(sb * PACK * cin);
        let stored = ((1u32 << lanes.count_ones()) - 1) as __mmask16;
        for (ci, &c) in chans.iter().enumerate() {
            let v = _mm512_maskz_loadu_ps(lanes, from.add(c * PACK));
            let packed = _mm512_maskz_compress_ps(lanes, v);
            _mm512_mask_storeu_ps(block.as_mut_ptr().add(ci * PACK + j0), stored, packed);
        }
    }
}

/// Whether a plan of `batch` samples over planes of `hw` outputs that transforms `kc`
/// input channels into `nr` output channels runs band by band ([`conv_bands`]): where
/// `V` and `M` together (`tiles · (kc + nr)` per ξ) are at least as big as `U[ξ]`
/// (`kc · nr`). Each band reads all of `U` (and each thread at least once), where the
/// shared GEMMs read it once between the threads; with few tiles, as ResNet's 14 × 14
/// layers of 256 channels at batch 1 (49 tiles), the weights are the bigger stream:
/// by bands those layers took 1.07–1.26 of their time.
///
/// F(4×4, 3×3) runs by bands wherever F(2×2, 3×3) would over the same plane (its
/// F(2×2, 3×3) tiles counted), though its `U[ξ]` weigh more against its fewer tiles:
/// ResNet-50's 128-channel layers at 28 × 28, batch 1 (49 such tiles), shared out, left
/// their output where the next 1×1 layer read it from the other core (those took
/// 1.16× their time); by bands the 3×3 layers themselves took 0.77–0.79 of F(2×2,
/// 3×3)'s time against 0.75–0.90 shared out.
fn in_bands(hw: [usize; 2], batch: usize, kc: usize, nr: usize) -> bool {
    let (th, tw) = Algorithm::F2.tiles(hw[0], hw[1]);
    batch * th * tw * (kc + nr) >= kc * nr
}

/// [`conv`] band by band: `chans` are the input channels transformed (their columns of
/// each `U[ξ]` read in place, or copied up front into a compact A where some are left
/// out), `rows` the output channels computed. A band is at most one panel of tiles ([`NR`],
/// the batch's tiles cut into as few bands as that allows, as even as can be). Each
/// thread takes a fixed share of the (band, rows) units in order, transforms its bands'
/// inputs, runs the GEMMs (one per ξ) on them and transforms its rows' results back, with `V` and
/// `M` in buffers the size of one band: no value of `V` or `M` is read on another core
/// than the one that wrote it, and with two threads each writes the same rows of the
/// output planes layer after layer. When the host placed the two vCPUs of the machine
/// this was measured on apart (a value written by one core took about 3× as long to
/// read on the other), ResNet-18's 28 × 28 Winograd layers took 0.79–0.83 of their time
/// this way at batch 1, 0.83–0.89 at batch 8; in its other state 0.96–1.06. Gated, its
/// 28 × 28 `conv2` layers at budget 0.5 (kept inputs through a column map, where they
/// had copied their kept columns of `U` per task) 0.93–0.99 in the other state, whole
/// passes 0.964 in a slow stretch and 0.97–1.00 otherwise. The kept columns copied once
/// up front for all bands, against the column map (Zen 5, in-process pairs at budget
/// 0.5, batch 1, a throwaway switch): ResNet-18's and ResNet-50's gated 28 × 28 `conv2`
/// layers 0.83–0.94 of their time, passes 0.977 and 0.983.
fn conv_bands(
    job: &Job,
    pool: &BufferPool,
    out: &mut [f32],
    [chans, rows]: [&[usize]; 2],
    kept: Option<&[bool]>,
    zeros: &[f32],
) {
    let [h, w] = job.hw;
    let algo = job.weights.algo;
    let xis = algo.xi();
    let (th, tw) = algo.tiles(h, w);
    let t_one = th * tw;
    let t = job.batch * t_one;
    let bands = t.div_ceil(NR);
    // Band g: tiles [edge(g), edge(g + 1)), as even as can be.
    let edge = |g: usize| g * t / bands;
    let (kc, nr) = (chans.len(), rows.len());
    let (in_len, out_len) = (job.weights.cin * h * w, job.weights.rows * h * w);
    let mr = job.isa.mr();
    let row_blocks = nr.div_ceil(mr);
    let ep_zeros = vec![0f32; nr.max(PACK)];
    let ep = Epilogue {
        bias: &ep_zeros,
        residual: Residual::None,
        act: Act::None,
    };
    let every: Vec<usize> = (0..nr.max(NR)).collect();
    let op = OutPtr(out.as_mut_ptr());
    // With input channels left out, their columns of U copied once, up front, into a
    // compact A that the GEMMs read without a column map (a map in the micro-kernel's
    // inner loop costs it about 1.6× its time, see `engine`'s compact A).
    //
    // With every input channel and kept rows that some tile does not find in one block
    // (a channel gate's choice), the kept rows copied up front into a compact A of those
    // rows alone, in order: every band reads all of its A, which is then the kept rows'
    // share of U instead of nearly every line of it, and each tile one stream. Separate
    // builds alternated (Zen 5, 2 threads, budget 0.5): ResNet-18 at batch 1 0.991,
    // 0.996 and 0.993 of the time (its gated 56 × 56 and 28 × 28 `conv1` layers 0.87–0.97
    // in process), ResNet-50 1.003 (its 3×3 layers read kept columns, copied already).
    // Not where a batch's samples run one per thread (`serial`): ResNet-18 at batch 8
    // took 1.013 with a copy per sample, 0.994 without.
    let by_rows =
        !job.serial && kc == job.weights.cin && nr < job.weights.rows && !in_blocks(rows, mr);
    let compact = if by_rows {
        Some(compact_rows_u(
            job.isa,
            job.weights,
            chans,
            rows,
            job.serial,
            pool,
        ))
    } else {
        (kc < job.weights.cin)
            .then(|| compact_u(job.weights, chans, &kept_blocks(rows), job.serial, pool))
    };
    let (u_all, ka) = match &compact {
        Some(a) => (&a[..], kc),
        None => (&job.weights.u[..], job.weights.cin),
    };
    let a_one = gemm::packed_a_len(if by_rows { nr } else { job.weights.rows }, ka);
    // Thread i of n: each band's rows in `parts` parts (blocks of mr rows), so that the
    // threads get equal shares of the (band, part) units; thread i takes units
    // [i · units / n, (i + 1) · units / n), in order.
    let share = |i: usize, n: usize| {
        let parts = (n / gcd(bands, n)).min(row_blocks);
        let units = bands * parts;
        let part_rows = |j: usize| {
            let (a, b) = (
                j * row_blocks / parts * mr,
                (j + 1) * row_blocks / parts * mr,
            );
            a..b.min(nr)
        };
        let mine = i * units / n..(i + 1) * units / n;
        if mine.is_empty() {
            return;
        }
        let v_xi = v_stride(1, kc);
        let mut v = pool.take_dirty(xis * v_xi);
        // The lanes past a band's tiles are zeroed once here, past the shortest band's,
        // rather than by every plane's transform of every band: those of a longer band
        // hold its values after it, finite too. In process, the way switched pass by
        // pass: ResNet-18's 56 × 56 and 28 × 28 layers 0.97–0.98 of their time, its passes
        // 0.987–0.997 (batch 1 and 8, dense and at budget 0.5), ResNet-50's 0.992–1.005.
        let least = t / bands;
        if least < NR {
            for xi in 0..xis {
                for ci in 0..kc {
                    v[xi * v_xi + ci * NR + least..][..NR - least].fill(0.0);
                }
            }
        }
        let m_xi = row_blocks.div_ceil(parts) * mr * NR;
        let mut m = pool.take_dirty(xis * m_xi + 8);
        let mut scratch = Scratch::default();
        let mut have = None;
        for u in mine {
            let (band, part) = (u / parts, u % parts);
            let (b0, b1) = (edge(band), edge(band + 1));
            // The band's samples: tiles [lo, hi) of sample s go to lanes from
            // s · t_one + lo - b0.
            let pieces = (b0 / t_one..b1.div_ceil(t_one)).map(|s| {
                let (lo, hi) = (
                    b0.max(s * t_one) - s * t_one,
                    b1.min((s + 1) * t_one) - s * t_one,
                );
                (s, [lo, hi], s * t_one + lo - b0)
            });
            if have != Some(band) {
                let vp = OutPtr(v.as_mut_ptr());
                for (s, range, lane) in pieces.clone() {
                    for (ci, &c) in chans.iter().enumerate() {
                        let plane = match kept {
                            Some(k) if !k[c] => zeros,
                            _ => &job.x[s * in_len + c * h * w..][..h * w],
                        };
                        let to = Dest {
                            algo,
                            v: vp,
                            first_tile: lane,
                            range,
                            last: false,
                            ci,
                            kc,
                            panels: 1,
                        };
                        // SAFETY: V holds xis panels of kc × NR, this thread's own.
                        unsafe { input_transform(job.isa, &mut scratch, plane, [h, w], to) };
                    }
                }
                have = Some(band);
            }
            let prows = part_rows(part);
            assert!(prows.len() * NR <= m_xi);
            let (orows, crows) = (&rows[prows.clone()], &every[..prows.len()]);
            let arows = if by_rows {
                &every[prows.clone()]
            } else {
                orows
            };
            let mp = OutPtr(m.as_mut_ptr());
            // Each tile prefetches the block of U the next one reads (the next row
            // tile's, or the first of the next ξ), as `conv`'s GEMMs do: every band
            // reads all of U, which streams from memory in a pass.
            let first_row = arows.first().copied().unwrap_or(0);
            for xi in 0..xis {
                let a = &u_all[xi * a_one..(xi + 1) * a_one];
                let mut tiles = arows.chunks(mr).zip(crows.chunks(mr)).peekable();
                while let Some((arows, crow)) = tiles.next() {
                    let next = match tiles.peek() {
                        Some((n, _)) => block_of(a, n[0], ka),
                        None if xi + 1 < xis => block_of(&u_all[(xi + 1) * a_one..], first_row, ka),
                        None => gemm::Prefetch::NONE,
                    };
                    let tile = Tile {
                        a,
                        ka,
                        arows,
                        kmap: None,
                        boff: None,
                        k: kc,
                        rows: crow,
                        panel: &v[xi * v_xi..][..kc * NR],
                        ldb: NR,
                        ldc: NR,
                        cols: &every[..b1 - b0],
                        lanes: None,
                    };
                    // SAFETY: A holds every row of U[ξ]; the panel kc × NR floats; the
                    // tile's rows < m_xi / NR and its columns < NR index inside this
                    // thread's M of ξ. (A prefetch never faults.)
                    unsafe {
                        let c = mp.get().add(xi * m_xi);
                        gemm::run_tile_prefetching(job.isa, &tile, &ep, c, next);
                    }
                }
            }
            for (i, &r) in orows.iter().enumerate() {
                for (s, range, lane) in pieces.clone() {
                    let at = s * out_len + r * h * w;
                    let b = Back {
                        algo,
                        m: &m,
                        m_xi,
                        row_at: i * NR + lane,
                        range,
                        hw: [h, w],
                        bias: job.bias[r],
                        residual: job.residual.part(at, h * w),
                        act: job.act,
                    };
                    // SAFETY: the plane lies inside `out` (checked by `conv`); this unit
                    // alone writes the cells of its band's tiles in plane r.
                    unsafe { output_transform(job.isa, b, OutPtr(op.get().add(at))) };
                }
            }
        }
        pool.give(v);
        pool.give(m);
    };
    if job.serial {
        share(0, 1);
    } else {
        super::workers::for_each_share(share);
    }
    if let Some(a) = compact {
        pool.give(a);
    }
}

/// The greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One sample of a [`SamplesJob`]: the input and output channels it keeps (strictly
/// ascending; `None`: all), and the bias of its outputs.
pub struct SampleKeep<'a> {
    pub chans: Option<&'a [usize]>,
    pub rows: Option<&'a [usize]>,
    pub bias: &'a [f32],
}

/// A batch whose samples each keep their own channels.
pub struct SamplesJob<'a> {
    pub isa: Isa,
    /// The input, per sample `cin` planes of `h × w` (all of them, kept or not).
    pub x: &'a [f32],
    pub hw: [usize; 2],
    pub weights: &'a WinogradWeights,
    pub samples: &'a [SampleKeep<'a>],
    /// Added before the activation; the output's layout (or already in it).
    pub residual: Residual<'a>,
    pub act: Act,
}

/// Bytes of `U[ξ]` (its rows' blocks over every input channel) that one task of
/// [`conv_samples`] runs every sample's tiles on, from L2.
const SAMPLES_A_BYTES: usize = 256 << 10;

/// Runs `job` into `out` (per sample `rows × h × w`): each sample's kept output channels
/// from its kept input channels, every sample's tiles of a block of `U[ξ]` rows run one
/// after another while that block is in L2. Each tile reads its sample's kept columns of
/// `U[ξ]` in place through a column map, so no sample copies them out; the batch shares
/// one stream of `U` from memory instead of each sample streaming its own copy. For
/// planes of few tiles (7 × 7: 16), where a sample's own GEMMs are short next to the
/// weights they read. Cells of dropped outputs are left as they are.
pub fn conv_samples(job: &SamplesJob, pool: &BufferPool, out: &mut [f32]) {
    let [h, w] = job.hw;
    let algo = job.weights.algo;
    let xis = algo.xi();
    let (th, tw) = algo.tiles(h, w);
    let t_one = th * tw;
    let panels = t_one.div_ceil(NR);
    let ldc = panels * NR;
    let (cin, cout) = (job.weights.cin, job.weights.rows);
    let (in_len, out_len) = (cin * h * w, cout * h * w);
    assert_eq!(job.x.len(), job.samples.len() * in_len, "input size");
    assert_eq!(out.len(), job.samples.len() * out_len, "output buffer size");
    let every: Vec<usize> = (0..cin.max(cout)).collect();
    // Per sample: its channels, and where its V and M start. An M ends in 8 floats a
    // tile row's vector reads run into (see `output_transform_avx2`), rounded up to a
    // cache line so that every sample's M starts on one.
    struct Sample<'s> {
        chans: &'s [usize],
        rows: &'s [usize],
        v_at: usize,
        m_at: usize,
    }
    let (mut v_len, mut m_len) = (0, 0);
    let samples: Vec<Sample> = job
        .samples
        .iter()
        .map(|keep| {
            let chans = keep.chans.unwrap_or(&every[..cin]);
            let rows = keep.rows.unwrap_or(&every[..cout]);
            let s = Sample {
                chans,
                rows,
                v_at: v_len,
                m_at: m_len,
            };
            v_len += xis * v_stride(panels, chans.len());
            m_len += (xis * rows.len() * ldc + 8).next_multiple_of(16);
            s
        })
        .collect();
    let mut v_buf = pool.take_dirty(v_len);
    {
        let vp = OutPtr(v_buf.as_mut_ptr());
        let planes: Vec<(usize, usize)> = samples
            .iter()
            .enumerate()
            .flat_map(|(s, d)| (0..d.chans.len()).map(move |ci| (s, ci)))
            .collect();
        planes
            .into_par_iter()
            .for_each_init(Scratch::default, |scratch, (s, ci)| {
                let d = &samples[s];
                let plane = &job.x[s * in_len + d.chans[ci] * h * w..][..h * w];
                let to = Dest {
                    algo,
                    v: OutPtr(vp.get().wrapping_add(d.v_at)),
                    first_tile: 0,
                    range: [0, t_one],
                    last: true,
                    ci,
                    kc: d.chans.len(),
                    panels,
                };
                // SAFETY: (sample, channel) writes row ci of its sample's own V, which
                // holds xis · v_stride(panels, kc) floats from v_at.
                unsafe { input_transform(job.isa, scratch, plane, [h, w], to) };
            });
    }
    let v = &v_buf[..];
    let mut m_buf = pool.take_dirty(m_len);
    let one = job.weights.one();
    let blocks = cout.div_ceil(PACK);
    let per_task = (SAMPLES_A_BYTES / (PACK * cin.max(1) * std::mem::size_of::<f32>()))
        .clamp(1, blocks.max(1));
    let ranges = blocks.div_ceil(per_task);
    let zeros = vec![0f32; cout.max(PACK)];
    let ep = Epilogue {
        bias: &zeros,
        residual: Residual::None,
        act: Act::None,
    };
    let cols: Vec<usize> = (0..ldc).collect();
    let mr = job.isa.mr();
    {
        let mp = OutPtr(m_buf.as_mut_ptr());
        let task = |(xi, q): (usize, usize)| {
            let (r0, r1) = (
                q * blocks / ranges * PACK,
                ((q + 1) * blocks / ranges * PACK).min(cout),
            );
            let a = &job.weights.u[xi * one..(xi + 1) * one];
            for d in &samples {
                let (kc, nr) = (d.chans.len(), d.rows.len());
                let (lo, hi) = (
                    d.rows.partition_point(|&r| r < r0),
                    d.rows.partition_point(|&r| r < r1),
                );
                let v_xi = v_stride(panels, kc);
                for p in 0..panels {
                    let c0 = p * NR;
                    let panel = &v[d.v_at + xi * v_xi + p * kc * NR..][..kc * NR];
                    for i in (lo..hi).step_by(mr) {
                        let e = (i + mr).min(hi);
                        let tile = Tile {
                            a,
                            ka: cin,
                            arows: &d.rows[i..e],
                            kmap: (kc < cin).then_some(d.chans),
                            boff: None,
                            k: kc,
                            rows: &every[i..e],
                            panel,
                            ldb: NR,
                            ldc,
                            cols: &cols[c0..c0 + NR.min(t_one - c0)],
                            lanes: None,
                        };
                        // SAFETY: A holds every row of U[ξ] (cin columns, every kept
                        // channel < cin); the panel kc × NR floats; the tile's rows < nr
                        // and columns < ldc index inside the sample's M of ξ, whose rows
                        // r0..r1 only this task writes.
                        unsafe {
                            gemm::run_tile(
                                job.isa,
                                &tile,
                                &ep,
                                mp.get().add(d.m_at + xi * nr * ldc),
                            )
                        };
                    }
                }
            }
        };
        let work: Vec<(usize, usize)> = (0..xis)
            .flat_map(|xi| (0..ranges).map(move |q| (xi, q)))
            .collect();
        work.into_par_iter().for_each(task);
    }
    let m = &m_buf[..];
    let op = OutPtr(out.as_mut_ptr());
    let back: Vec<(usize, usize)> = samples
        .iter()
        .enumerate()
        .flat_map(|(s, d)| (0..d.rows.len()).map(move |i| (s, i)))
        .collect();
    back.into_par_iter().for_each(|(s, i)| {
        let d = &samples[s];
        let r = d.rows[i];
        let at = s * out_len + r * h * w;
        let b = Back {
            algo,
            m: &m[d.m_at..d.m_at + xis * d.rows.len() * ldc + 8],
            m_xi: d.rows.len() * ldc,
            row_at: i * ldc,
            range: [0, t_one],
            hw: [h, w],
            bias: job.samples[s].bias[r],
            residual: job.residual.part(at, h * w),
            act: job.act,
        };
        // SAFETY: (sample, row) writes its own plane only, inside `out` (checked above).
        unsafe { output_transform(job.isa, b, OutPtr(op.get().add(at))) };
    });
    pool.give(v_buf);
    pool.give(m_buf);
}

/// Where an input plane's transform goes: row `ci` of the panels of every `V[ξ]`, the
/// plane's tiles `range` to consecutive lanes from lane `first_tile` on (counted over
/// every panel).
#[derive(Clone, Copy)]
pub(super) struct Dest {
    pub(super) algo: Algorithm,
    pub(super) v: OutPtr,
    pub(super) first_tile: usize,
    /// The plane's tiles transformed, in order over tile rows then tile columns.
    pub(super) range: [usize; 2],
    /// Whether these are the last tiles: the lanes of their last panel past them are
    /// computed by the GEMM and never stored, and are zeroed to keep them finite.
    pub(super) last: bool,
    pub(super) ci: usize,
    pub(super) kc: usize,
    pub(super) panels: usize,
}

impl Dest {
    /// Floats of one `V[ξ]`.
    pub(super) fn v_xi(&self) -> usize {
        v_stride(self.panels, self.kc)
    }

    /// Where the vector of tile columns `x .. x + n` of tile row `ty` (`n ≤ NR`, the
    /// plane `tw` tiles wide) goes: up to two runs, one per panel, each the offset from
    /// `V[0]` of where the vector's lane 0 would lie and the vector's lanes `[lo, hi)`
    /// of the range's tiles that lie there. The offset may be before `V` (wrapping).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn lane_runs(&self, tw: usize, ty: usize, x: usize, n: usize) -> LaneRuns {
        let [from, to_x] = row_span(self.range, tw, ty);
        let (lo, hi) = (from.max(x), to_x.min(x + n));
        // Tile column 0's lane (wrapping: the range may start past it).
        let base = (self.first_tile + ty * tw).wrapping_sub(self.range[0]);
        let mut runs = LaneRuns::default();
        let mut a = lo;
        while a < hi {
            let (p, lane) = (base.wrapping_add(a) / NR, base.wrapping_add(a) % NR);
            let b = hi.min(a + NR - lane);
            let at = ((p * self.kc + self.ci) * NR + lane).wrapping_sub(a - x);
            runs.runs[runs.len] = (at, a - x, b - x);
            runs.len += 1;
            a = b;
        }
        runs
    }

    /// The panel and first lane after the range's tiles, where these are the last tiles
    /// and end inside a panel: the lanes from there on are zeroed.
    pub(super) fn tail(&self) -> Option<(usize, usize)> {
        let end = self.first_tile + self.range[1] - self.range[0];
        (self.last && !end.is_multiple_of(NR)).then_some((end / NR, end % NR))
    }
}

/// See [`Dest::lane_runs`].
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
pub(super) struct LaneRuns {
    runs: [(usize, usize, usize); 2],
    len: usize,
}

#[cfg(target_arch = "x86_64")]
impl LaneRuns {
    /// Stores `v`'s lanes of each run into `V[ξ]` at `v_xi`.
    ///
    /// # Safety
    /// The CPU has `V`'s features; the runs lie in the [`Dest`] they came from, whose
    /// `V[ξ]` starts at `v_xi`.
    #[inline(always)]
    pub(super) unsafe fn store<V: Lanes>(&self, v_xi: *mut f32, v: V) {
        for &(at, lo, hi) in &self.runs[..self.len] {
            V::store_lanes(v_xi.wrapping_add(at), v, lo, hi);
        }
    }
}

/// Floats from one `V[ξ]` to the next: `panels` packed panels of `kc` rows, and a cache
/// line more. A transform writes each value of a tile to another `V[ξ]`; a multiple of
/// 4 KiB apart (64 or 128 channels in one panel), all of them fall in one set of the L1
/// cache, and each store aliases the loads the transform makes after it. With the
/// AVX-512 transforms storing straight into the panels, a dense 64 → 64 layer at 56 × 56
/// took 0.65 ms without the line against 0.43 with it (one thread); through the copy
/// of `store_tiles`, ResNet-50's 14 × 14 layers took 1.04–1.06 of their time without it
/// (in process, the way switched pass by pass, two threads, batch 1).
pub(super) fn v_stride(panels: usize, kc: usize) -> usize {
    panels * kc * NR + LINE
}

/// The tile rows `[first, end)` that hold tiles `range` of a plane `tw` tiles wide.
pub(super) fn tile_rows(range: [usize; 2], tw: usize) -> [usize; 2] {
    [range[0] / tw, range[1].div_ceil(tw)]
}

/// The tile columns `[from, to)` of tile row `ty` that lie in `range` (a plane `tw` tiles
/// wide; `ty` among [`tile_rows`]).
pub(super) fn row_span(range: [usize; 2], tw: usize, ty: usize) -> [usize; 2] {
    let first = ty * tw;
    [range[0].saturating_sub(first), (range[1] - first).min(tw)]
}

/// A plane's tile columns and the tile rows that hold tiles `range`, with `cols` grown
/// to hold the column transform of every padded row they read. Each row is written up
/// to the tile columns before it is read: grown, never cleared (clearing 64 columns per
/// row cost more than a 14 × 14 plane's transform).
fn grid(cols: &mut Vec<ColRow>, [h, w]: [usize; 2], range: [usize; 2]) -> (usize, [usize; 2]) {
    let (th, tw) = tiles(h, w);
    assert!(tw <= MAX_TW && range[0] < range[1] && range[1] <= th * tw);
    let trows = tile_rows(range, tw);
    let prows = 2 * (trows[1] - trows[0]) + 2;
    if cols.len() < prows {
        cols.resize(prows, [[0f32; COLS]; 4]);
    }
    (tw, trows)
}

/// The padded rows from padded row `first` on that hold an input row, with that row's
/// index; the rows of padding above and below the plane are zeroed up to the `tw` tile
/// columns on the way.
fn plane_rows(
    cols: &mut [ColRow],
    h: usize,
    tw: usize,
    first: usize,
) -> impl Iterator<Item = (usize, &mut ColRow)> {
    cols.iter_mut().enumerate().filter_map(move |(r, c)| {
        let y = (first + r).wrapping_sub(1);
        if y < h {
            return Some((y, c));
        }
        for cj in c.iter_mut() {
            cj[..tw].fill(0.0);
        }
        None
    })
}

/// Transforms one input plane into its [`Dest`], by the `Dest`'s algo.
///
/// # Safety
/// `v` holds `xi · panels · kc · NR` floats (`xi` of the algo), and no other thread
/// writes the lanes of row `ci` that this plane's tiles take, nor (when `last`) the
/// lanes after them in their last panel (another sample's plane of the same channel may
/// write the other lanes of the same panels at the same time).
unsafe fn input_transform(
    isa: Isa,
    scratch: &mut Scratch,
    plane: &[f32],
    hw: [usize; 2],
    to: Dest,
) {
    if to.algo == Algorithm::F4 {
        return super::winograd_f4::input_transform(isa, scratch, plane, hw, to);
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return input_transform_avx512(scratch, plane, hw, to),
        Isa::Portable => {}
        _ => return input_transform_avx2(scratch, plane, hw, to),
    }
    let _ = isa;
    input_transform_body(&mut scratch.cols, plane, hw, to)
}

/// [`input_transform_body`] in vectors of tile columns (8 with AVX2, 16 with AVX-512).
/// The generic body, compiled for AVX2, ran a 14 × 14 plane's 7 tile columns in the
/// scalar remainder of every loop: ResNet-50's 14 × 14 layers spent a quarter of their
/// time (dense, 2 threads) transforming their inputs. Here a padded row is split into
/// its even and odd columns by shuffles, and the plane's transformed tiles are written
/// whole, tile row after tile row, into a buffer of their own (a row's vector running
/// into the next row's tiles is overwritten by it), then copied into the panels in runs,
/// rather than stored a tile row's few lanes at a time (AVX2, one thread, planes in a
/// loop: a 14 × 14 plane 0.41 µs against 0.56, 28 × 28 1.24 against 1.76, 7 × 7 0.20
/// against 0.26; the generic body 0.94, 2.5 and 0.41). The results are the same,
/// operation for operation.
///
/// Sixteen lanes halve the instructions over rows of more than 8 tiles (28 × 28 planes
/// and wider). With the output transform in sixteen lanes too, against both in eight
/// (Intel Xeon, one thread, in-process pairs, one engine switched pass by pass): 3×3
/// layers at 56 × 56 0.90–0.95 of their time, at 28 × 28 0.94–0.97; dense passes at
/// batch 1 0.979–0.991 (ResNet-18) and 0.986–0.996 (ResNet-50), on two threads 0.992
/// and 0.999; at budget 0.5 0.990 and 1.003, at batch 8 0.994 and 1.010 (10 pairs):
/// about 1% on ResNet-18, within the noise on ResNet-50.
///
/// With AVX-512 over rows of more than 8 tiles (28 × 28 planes and wider; for
/// F(4×4, 3×3) 56 × 56), where a vector holds at most one tile row's tiles, each vector
/// instead goes straight into its lanes of the panels by masked stores, one or two per
/// value ([`Dest::lane_runs`]), and the copy is saved. Against the copy into `V` laid
/// out without [`v_stride`]'s extra line, with a throwaway switch pass by pass (Zen 5,
/// two threads, batch 1, 60 pairs), ResNet-18's and ResNet-50's 3×3 layers at 56 × 56
/// took 1.05–1.16× as long the old way, at 28 × 28 1.04–1.07×; passes 1.027–1.040
/// (ResNet-18 dense), 1.001–1.014 (ResNet-50 dense), 1.014 at budget 0.5 (ResNet-18),
/// 1.02–1.04 at batch 8 (ResNet-18). Over narrower rows the copy's vectors hold two tile
/// rows or more, and stored straight the 14 × 14 and 7 × 7 layers took up to 1.08× as
/// long as through the copy.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // j picks the same column of four rows
unsafe fn input_transform_vec<V: Lanes>(
    scratch: &mut Scratch,
    plane: &[f32],
    [h, w]: [usize; 2],
    to: Dest,
) {
    let lanes = V::N;
    let Scratch {
        cols, tiles: buf, ..
    } = scratch;
    let (tw, [ty0, ty1]) = grid(cols, [h, w], to.range);
    let (th, prows) = (ty1 - ty0, 2 * (ty1 - ty0) + 2);
    // The padded row (column p is input column p - 1, zero outside the row) is loaded
    // from the plane with masks and split in registers, rather than copied into a
    // zeroed array whose loads then straddle the copy's stores. In process, the way
    // switched pass by pass (30 pairs, 2 threads, batch 1): ResNet-18's 3×3 layers over
    // 28 × 28 and 14 × 14 took 0.93–0.95 of their time, ResNet-50's 0.94–0.97 (dense and
    // at budget 0.5).
    for (y, c) in plane_rows(&mut cols[..prows], h, tw, 2 * ty0) {
        let row = plane[y * w..(y + 1) * w].as_ptr();
        let [c0, c1, c2, c3] = c;
        // Writes up to tile column MAX_TW - 1 < COLS.
        for x in (0..tw).step_by(lanes) {
            // d0, d1: padded columns 2·tx and 2·tx + 1; d2, d3: 2·tx + 2 and 2·tx + 3
            // (the next tile's d0 and d1, the last from the vector after).
            let p = 2 * x;
            let (a, b) = (V::load_padded(row, w, p), V::load_padded(row, w, p + lanes));
            let (d0, d1) = V::split_pair(a, b);
            let next = V::load_padded(row, w, p + 2 * lanes);
            let (d2, d3) = (V::shift_in::<0>(d0, next), V::shift_in::<1>(d1, next));
            V::store(c0.as_mut_ptr().add(x), V::sub(d0, d2));
            V::store(c1.as_mut_ptr().add(x), V::add(d1, d2));
            V::store(c2.as_mut_ptr().add(x), V::sub(d2, d1));
            V::store(c3.as_mut_ptr().add(x), V::sub(d1, d3));
        }
    }
    if V::N == 16 && 2 * tw > V::N {
        // Bᵀ's rows applied to a column of four padded rows: [a - c, b + c, c - b, b - d].
        let b_t = |[a, b, c, d]: [V; 4]| [V::sub(a, c), V::add(b, c), V::sub(c, b), V::sub(b, d)];
        return store_straight(&cols[..prows], th, tw, ty0, &to, b_t);
    }
    // [ξ][tile of tile rows ty0..ty1], a vector's room past the last tile.
    let t_one = th * tw;
    let stride = t_one + lanes;
    if buf.len() < XI * stride {
        buf.resize(XI * stride, 0.0);
    }
    let bp = buf.as_mut_ptr();
    for ty in 0..th {
        let rows = &cols[2 * ty..2 * ty + 4];
        for j in 0..4 {
            let [a, b, c, d] = [0, 1, 2, 3].map(|k| rows[k][j].as_ptr());
            let at = |i: usize| bp.add((i * 4 + j) * stride + ty * tw);
            let (v0, v1, v2, v3) = (at(0), at(1), at(2), at(3));
            // Reads up to tile column MAX_TW - 1 < COLS; writes up to
            // t_one + lanes - 1 < stride.
            for x in (0..tw).step_by(lanes) {
                let (va, vb) = (V::load(a.add(x)), V::load(b.add(x)));
                let (vc, vd) = (V::load(c.add(x)), V::load(d.add(x)));
                V::store(v0.add(x), V::sub(va, vc));
                V::store(v1.add(x), V::add(vb, vc));
                V::store(v2.add(x), V::sub(vc, vb));
                V::store(v3.add(x), V::sub(vb, vd));
            }
        }
    }
    store_tiles::<V>(bp, stride, to.range[0] - ty0 * tw, XI, to);
}

/// Copies a plane's transformed tiles (`xis` rows of `stride` floats at `bp`, the range's
/// tiles from `skip` on in each) into the [`Dest`]'s panels: to consecutive lanes of row
/// `ci` from `first_tile` on, across panel ends, and zeroes the last panel's lanes past
/// them where these are the last tiles.
///
/// # Safety
/// The CPU has `V`'s features; `bp` holds `xis` rows of `stride` floats, each with a
/// vector's room past `skip` plus the range's tiles; as for [`input_transform`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn store_tiles<V: Lanes>(
    bp: *const f32,
    stride: usize,
    skip: usize,
    xis: usize,
    to: Dest,
) {
    let lanes = V::N;
    let (v, first_tile, ci, kc, v_xi) = (to.v, to.first_tile, to.ci, to.kc, to.v_xi());
    let count = to.range[1] - to.range[0];
    for xi in 0..xis {
        let src = bp.add(xi * stride + skip);
        let mut t = 0;
        while t < count {
            let (p, lane) = ((first_tile + t) / NR, (first_tile + t) % NR);
            let n = (NR - lane).min(count - t);
            let dst = v.get().add(xi * v_xi + (p * kc + ci) * NR + lane);
            for k in (0..n).step_by(lanes) {
                V::store_first(dst.add(k), V::load(src.add(t + k)), n - k);
            }
            t += n;
        }
    }
    zero_tail::<V>(xis, to);
}

/// The tile rows of a transform whose padded rows' column transforms are in `cols`
/// (`P` = 4 or 6 values per tile side; tile row `ty` reads rows `(P - 2) · ty ..` of it,
/// `cols[0]` being the padded row of tile row `ty0`'s first), each vector of tile columns
/// transformed by `b_t` down its `P` rows and stored straight into its lanes of the
/// panels (`V[P · i + j]` for row `i` of column `j`), then the tail zeroed.
///
/// # Safety
/// The CPU has `V`'s features; as for [`input_transform`]; `cols` holds the tile rows'
/// padded rows, each readable a vector past `tw` columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // j picks the same column of P rows
pub(super) unsafe fn store_straight<V: Lanes, const P: usize>(
    cols: &[[[f32; COLS]; P]],
    th: usize,
    tw: usize,
    ty0: usize,
    to: &Dest,
    b_t: impl Fn([V; P]) -> [V; P],
) {
    let (v, v_xi) = (to.v, to.v_xi());
    for ty in 0..th {
        let rows = &cols[(P - 2) * ty..][..P];
        for x in (0..tw).step_by(V::N) {
            let runs = to.lane_runs(tw, ty0 + ty, x, V::N);
            for j in 0..P {
                let col = b_t(std::array::from_fn(|k| V::load(rows[k][j].as_ptr().add(x))));
                for (i, val) in col.into_iter().enumerate() {
                    runs.store(v.get().wrapping_add((P * i + j) * v_xi), val);
                }
            }
        }
    }
    zero_tail::<V>(P * P, *to);
}

/// Zeroes the lanes of row `ci` past the range's tiles in their last panel, where these
/// are the last tiles ([`Dest::tail`]), in each of `xis` `V[ξ]`. Here, with vector
/// stores, rather than one fill per (ξ, channel) up front, each a memset call for 60
/// bytes: memset went from 2.6% to 0.9% of a dense ResNet-50 pass's samples (in-process
/// pairs: ResNet-18 0.994, ResNet-50 0.999).
///
/// # Safety
/// As for [`store_tiles`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn zero_tail<V: Lanes>(xis: usize, to: Dest) {
    let Some((p, lane)) = to.tail() else {
        return;
    };
    for xi in 0..xis {
        let dst =
            to.v.get()
                .add(xi * to.v_xi() + (p * to.kc + to.ci) * NR + lane);
        for k in (0..NR - lane).step_by(V::N) {
            V::store_first(dst.add(k), V::zero(), NR - lane - k);
        }
    }
}

/// [`input_transform_vec`] in AVX2 vectors of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform_avx2(scratch: &mut Scratch, plane: &[f32], hw: [usize; 2], to: Dest) {
    input_transform_vec::<Ymm>(scratch, plane, hw, to)
}

/// [`input_transform_vec`] in AVX-512 vectors of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_transform_avx512(scratch: &mut Scratch, plane: &[f32], hw: [usize; 2], to: Dest) {
    input_transform_vec::<Zmm>(scratch, plane, hw, to)
}

/// A thread's buffers for input transforms, grown as needed and kept across planes.
#[derive(Default)]
pub(super) struct Scratch {
    /// Every padded row's column transform.
    cols: Vec<ColRow>,
    /// The same for F(4×4, 3×3).
    pub(super) cols6: Vec<super::winograd_f4::ColRow6>,
    /// The vector path's transformed plane, `[ξ][tile]` (see `input_transform_avx2`).
    pub(super) tiles: Vec<f32>,
}

/// One padded input row's column transform: `[j][tile column]`, with room for a vector
/// of 8 read from any tile column.
type ColRow = [[f32; COLS]; 4];

/// Tile columns a transform's buffers hold: [`MAX_TW`] and the 7 lanes a vector read
/// at the last tile column runs past it.
pub(super) const COLS: usize = MAX_TW + 8;

/// Bytes of packed panels a GEMM task keeps in L2 (of 512 KiB on Zen 3) while the row
/// tiles of A run over them.
const PANELS_BYTES: usize = 192 << 10;

/// Widest tile row served.
const MAX_TW: usize = 64;

/// Widest output row served.
pub const MAX_WIDTH: usize = 2 * MAX_TW;

#[inline(always)]
#[allow(clippy::needless_range_loop)] // j picks the same column of four rows
unsafe fn input_transform_body(
    cols: &mut Vec<ColRow>,
    plane: &[f32],
    [h, w]: [usize; 2],
    to: Dest,
) {
    let (v, first_tile, ci, kc, v_xi) = (to.v, to.first_tile, to.ci, to.kc, to.v_xi());
    // Every padded row's column transform, once (each row serves two tile rows):
    // cols[r][j][tx] = (d Bᵀ)_j of tile column tx, from padded columns 2·tx .. 2·tx + 4
    // split into even and odd ones so that every operand is contiguous over tx.
    let (tw, [ty0, ty1]) = grid(cols, [h, w], to.range);
    let prows = 2 * (ty1 - ty0) + 2;
    let (mut ev, mut od) = ([0f32; MAX_TW + 1], [0f32; MAX_TW + 1]);
    for (y, c) in plane_rows(&mut cols[..prows], h, tw, 2 * ty0) {
        let row = &plane[y * w..(y + 1) * w];
        // Padded column p is input column p - 1: even p = odd input columns.
        ev[0] = 0.0;
        for (i, e) in ev[1..=tw].iter_mut().enumerate() {
            *e = row.get(2 * i + 1).copied().unwrap_or(0.0);
        }
        for (i, o) in od[..=tw].iter_mut().enumerate() {
            *o = row.get(2 * i).copied().unwrap_or(0.0);
        }
        let (d0, d1) = (&ev[..tw], &od[..tw]);
        let (d2, d3) = (&ev[1..=tw], &od[1..=tw]);
        let [c0, c1, c2, c3] = c;
        for tx in 0..tw {
            c0[tx] = d0[tx] - d2[tx];
            c1[tx] = d1[tx] + d2[tx];
            c2[tx] = d2[tx] - d1[tx];
            c3[tx] = d1[tx] - d3[tx];
        }
    }
    for ty in ty0..ty1 {
        // Tile column x goes to lane base + x.
        let base = (first_tile + ty * tw).wrapping_sub(to.range[0]);
        let rows = &cols[2 * (ty - ty0)..2 * (ty - ty0) + 4];
        let [from, to_x] = row_span(to.range, tw, ty);
        // Tiles go to consecutive lanes, across panel ends: runs [x0, x1) of tile
        // columns that share a panel.
        let mut x0 = from;
        while x0 < to_x {
            let t = base.wrapping_add(x0);
            let (p, lane) = (t / NR, t % NR);
            let x1 = x0 + (NR - lane).min(to_x - x0);
            let n = x1 - x0;
            for j in 0..4 {
                let a = &rows[0][j][x0..x1];
                let b = &rows[1][j][x0..x1];
                let c = &rows[2][j][x0..x1];
                let d = &rows[3][j][x0..x1];
                let at = |i: usize| {
                    let xi = i * 4 + j;
                    // SAFETY: lanes lane..lane + n of row ci of panel p of V[ξ].
                    std::slice::from_raw_parts_mut(
                        v.get().add(xi * v_xi + (p * kc + ci) * NR + lane),
                        n,
                    )
                };
                let (v0, v1, v2, v3) = (at(0), at(1), at(2), at(3));
                for x in 0..n {
                    v0[x] = a[x] - c[x];
                    v1[x] = b[x] + c[x];
                    v2[x] = c[x] - b[x];
                    v3[x] = b[x] - d[x];
                }
            }
            x0 = x1;
        }
    }
    if let Some((p, lane)) = to.tail() {
        for xi in 0..XI {
            let at = v.get().add(xi * v_xi + (p * kc + ci) * NR + lane);
            std::slice::from_raw_parts_mut(at, NR - lane).fill(0.0);
        }
    }
}

/// Transforms one output row's `M` back into its plane at `dst` (the outputs of tiles
/// `b.range`), with bias, residual and activation: `Y = Aᵀ M A`,
/// `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`. Only the range's cells are read or written,
/// so that the tiles of one plane can go back on several threads.
///
/// # Safety
/// `dst` is a plane of `b.hw` values, whose cells under the range's tiles no other
/// thread reads or writes meanwhile.
unsafe fn output_transform(isa: Isa, b: Back, dst: OutPtr) {
    if b.algo == Algorithm::F4 {
        return super::winograd_f4::output_transform(isa, b, dst);
    }
    let (th, tw) = tiles(b.hw[0], b.hw[1]);
    assert!(b.range[0] < b.range[1] && b.range[1] <= th * tw);
    if let Residual::Apart(res) = b.residual {
        assert!(res.len() >= b.hw[0] * b.hw[1]);
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        let count = b.range[1] - b.range[0];
        assert!(tw <= MAX_TW && b.m.len() >= (XI - 1) * b.m_xi + b.row_at + count + 7);
        if isa == Isa::Avx512 {
            // SAFETY: AVX-512F is present; the reads are masked to the range's tiles,
            // the writes are the caller's.
            return output_transform_avx512(b, dst);
        }
        // SAFETY: AVX2 and FMA are present (every ISA but the portable one has them);
        // the reads are checked above, the writes are the caller's.
        return output_transform_avx2(b, dst);
    }
    let _ = isa;
    output_transform_body(b, dst)
}

/// What one output plane's transform reads: `M` (`m_xi` floats per ξ), the plane's
/// tiles `range` from `row_at` on, for a plane of `hw`, with the plane's bias, residual
/// and activation.
#[derive(Clone, Copy)]
pub(super) struct Back<'a> {
    pub(super) algo: Algorithm,
    pub(super) m: &'a [f32],
    pub(super) m_xi: usize,
    pub(super) row_at: usize,
    pub(super) range: [usize; 2],
    pub(super) hw: [usize; 2],
    pub(super) bias: f32,
    pub(super) residual: Residual<'a>,
    pub(super) act: Act,
}

/// [`output_transform_body`] in vectors of tile columns (8 with AVX2, 16 with AVX-512),
/// with the same operations in the same order (see [`input_transform_vec`]); each
/// output row's residual is added and the row stored straight from the vectors (AVX2,
/// one thread, planes in a loop: a 14 × 14 plane 0.29 µs, against 0.36 through a row
/// buffer and 0.62 for the generic body).
///
/// # Safety
/// The CPU has `V`'s features; `m` holds 7 values past the last tile of the last row
/// of the last ξ read (`(XI - 1) · m_xi + row_at + tiles + 7`, `tiles` those of
/// `b.range`), which vectors of 8 read ([`Lanes::load_upto`]); as for
/// [`output_transform`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // j picks ξ = j, 4 + j, 8 + j and 12 + j
unsafe fn output_transform_vec<V: Lanes>(b: Back, dst: OutPtr) {
    let lanes = V::N;
    let (m, m_xi, row_at, [h, w]) = (b.m, b.m_xi, b.row_at, b.hw);
    let (residual, act) = (b.residual, b.act);
    let tw = tiles(h, w).1;
    let (mp, bv) = (m.as_ptr(), V::splat(b.bias));
    let dp = dst.get();
    let [ty0, ty1] = tile_rows(b.range, tw);
    for ty in ty0..ty1 {
        // Tile column x of this row is at base + x in each M[ξ].
        let base = (row_at + ty * tw).wrapping_sub(b.range[0]);
        let [from, to] = row_span(b.range, tw, ty);
        // Output columns [2·from, end) of the row's two output rows.
        let end = (2 * to).min(w);
        for x in (from..to).step_by(lanes) {
            let ld = |xi: usize| V::load_upto(mp.add(xi * m_xi + base.wrapping_add(x)), to - x);
            // Rows of Aᵀ over i, for each column j: r[a][j].
            let mut r = [[V::zero(); 4]; 2];
            for j in 0..4 {
                let (a, b, c, d) = (ld(j), ld(4 + j), ld(8 + j), ld(12 + j));
                r[0][j] = V::add(V::add(a, b), c);
                r[1][j] = V::sub(V::sub(b, c), d);
            }
            for (a, ra) in r.iter().enumerate() {
                let oy = 2 * ty + a;
                if oy >= h {
                    break;
                }
                let y0 = V::add(V::add(V::add(ra[0], ra[1]), ra[2]), bv);
                let y1 = V::add(V::sub(V::sub(ra[1], ra[2]), ra[3]), bv);
                // Output columns 2·x .. 2·x + 2·lanes: 2·tx from y0, 2·tx + 1 from y1.
                for (k, v) in V::interleave(y0, y1).into_iter().enumerate() {
                    let ox = 2 * x + lanes * k;
                    if ox >= end {
                        break;
                    }
                    store_row_part(dp, oy * w + ox, end - ox, v, residual, act);
                }
            }
        }
    }
}

/// `n` values of an output row from `at` (all of `v` from `n = N` up): `v`, plus the
/// residual's values there, activated, stored. Activated in the registers rather than
/// by a pass over the stored row, which read back what the masked stores had just
/// written, in vectors of 8 with a scalar tail. In process, the way switched pass by
/// pass (30–40 pairs, 2 threads, batch 1): ResNet-18's Winograd layers took 0.91–0.96
/// of their time, its passes 0.968–0.972 dense and 0.980 at budget 0.5; ResNet-50's
/// passes 0.979–1.006 dense (three runs), 1.008 at budget 0.5, 0.998 at batch 8.
///
/// # Safety
/// The CPU has `V`'s features; the plane at `dp` (and an apart residual) holds `at + n`
/// values, and no other thread touches these.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn store_row_part<V: Lanes>(
    dp: *mut f32,
    at: usize,
    n: usize,
    mut v: V,
    residual: Residual,
    act: Act,
) {
    match residual {
        Residual::InOut => v = V::add(V::load_first(dp.add(at), n), v),
        Residual::Apart(res) => v = V::add(v, V::load_first(res.as_ptr().add(at), n)),
        Residual::None => {}
    }
    v = match act {
        Act::None => v,
        Act::Relu => V::max(v, V::zero()),
        Act::Relu6 => V::min(V::max(v, V::zero()), V::splat(6.0)),
    };
    V::store_first(dp.add(at), v, n);
}

/// [`output_transform_vec`] in AVX2 vectors of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_transform_avx2(b: Back, dst: OutPtr) {
    output_transform_vec::<Ymm>(b, dst)
}

/// [`output_transform_vec`] in AVX-512 vectors of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_transform_avx512(b: Back, dst: OutPtr) {
    output_transform_vec::<Zmm>(b, dst)
}

/// The portable [`output_transform`].
///
/// # Safety
/// As for [`output_transform`].
unsafe fn output_transform_body(b: Back, dst: OutPtr) {
    let (m, m_xi, row_at, [h, w]) = (b.m, b.m_xi, b.row_at, b.hw);
    let (bias, residual, act) = (b.bias, b.residual, b.act);
    let tw = tiles(h, w).1;
    // y[a][b][tx]: output (2·ty + a, 2·(from + tx) + b).
    let mut y = [[[0f32; MAX_TW]; 2]; 2];
    let mut r = [[[0f32; MAX_TW]; 4]; 2];
    let [ty0, ty1] = tile_rows(b.range, tw);
    for ty in ty0..ty1 {
        let [from, to] = row_span(b.range, tw, ty);
        let (n, end) = (to - from, (2 * to).min(w));
        let base = row_at + ty * tw + from - b.range[0];
        let mx: [&[f32]; XI] = std::array::from_fn(|xi| &m[xi * m_xi + base..][..n]);
        // Rows of Aᵀ over i, for each column j; then columns over j.
        for j in 0..4 {
            let (a, b, c, d) = (mx[j], mx[4 + j], mx[8 + j], mx[12 + j]);
            let [r0, r1] = &mut r;
            for x in 0..n {
                r0[j][x] = a[x] + b[x] + c[x];
                r1[j][x] = b[x] - c[x] - d[x];
            }
        }
        for (ya, ra) in y.iter_mut().zip(&r) {
            let [y0, y1] = ya;
            for x in 0..n {
                y0[x] = ra[0][x] + ra[1][x] + ra[2][x] + bias;
                y1[x] = ra[1][x] - ra[2][x] - ra[3][x] + bias;
            }
        }
        for (a, ya) in y.iter().enumerate() {
            let oy = 2 * ty + a;
            if oy >= h {
                break;
            }
            let o =
                std::slice::from_raw_parts_mut(dst.get().add(oy * w + 2 * from), end - 2 * from);
            match residual {
                Residual::InOut => {
                    for (ox, o) in o.iter_mut().enumerate() {
                        *o += ya[ox % 2][ox / 2];
                    }
                }
                _ => {
                    for (ox, o) in o.iter_mut().enumerate() {
                        *o = ya[ox % 2][ox / 2];
                    }
                }
            }
            if let Residual::Apart(res) = residual {
                for (o, &q) in o.iter_mut().zip(&res[oy * w + 2 * from..oy * w + end]) {
                    *o += q;
                }
            }
            act.apply_slice(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// The 3×3, pad-1 convolution of one sample over input channels `chans`, in f64.
    fn naive(
        x: &[f32],
        w: &[f32],
        [h, wd]: [usize; 2],
        cin: usize,
        chans: &[usize],
        o: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; h * wd];
        for y in 0..h {
            for xx in 0..wd {
                let mut s = 0f64;
                for &c in chans {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = (y as isize + ky - 1, xx as isize + kx - 1);
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            let wv = w[((o * cin + c) * 3 + ky as usize) * 3 + kx as usize];
                            s += (x[(c * h + iy as usize) * wd + ix as usize] * wv) as f64;
                        }
                    }
                }
                out[y * wd + xx] = s;
            }
        }
        out
    }

    /// A layer's input, weights and epilogue, for checking a Winograd output.
    struct Layer<'a> {
        x: &'a [f32],
        w: &'a [f32],
        hw: [usize; 2],
        cin: usize,
        cout: usize,
        /// The residual, added (when `in_out`, the output started as it).
        res: Option<&'a [f32]>,
        in_out: bool,
        act: Act,
    }

    impl<'a> Layer<'a> {
        /// A job of this layer over `batch` samples on this CPU's widest kernels, each
        /// phase shared out on its own (not serial, dropped inputs left out, not by
        /// bands); a test sets what it varies on top.
        fn job<'b>(
            &self,
            weights: &'b WinogradWeights,
            batch: usize,
            [chans, rows]: [Option<&'b [usize]>; 2],
            bias: &'b [f32],
            residual: Residual<'b>,
        ) -> Job<'b>
        where
            'a: 'b,
        {
            Job {
                isa: Isa::detect(),
                batch,
                x: self.x,
                hw: self.hw,
                weights,
                chans,
                rows,
                bias,
                residual,
                act: self.act,
                serial: false,
                zero_dropped: false,
                bands: false,
            }
        }

        /// A fresh output for `batch` samples (cells never written are NaN, or the
        /// residual's when the output starts as it), and the residual to pass.
        fn output(&self, batch: usize) -> (Vec<f32>, Residual<'_>) {
            let len = batch * self.cout * self.hw[0] * self.hw[1];
            match self.res {
                Some(r) if self.in_out => (r.to_vec(), Residual::InOut),
                Some(r) => (vec![f32::NAN; len], Residual::Apart(r)),
                None => (vec![f32::NAN; len], Residual::None),
            }
        }

        /// Sample `s` of `out` against a naive convolution of its kept input channels:
        /// kept rows within a rounding bound, dropped rows unwritten.
        fn assert_sample(
            &self,
            out: &[f32],
            s: usize,
            kept_c: &[usize],
            kept_r: &[usize],
            bias: &[f32],
            at: &str,
        ) {
            let (cin, cout, hw) = (self.cin, self.cout, self.hw);
            let plane = hw[0] * hw[1];
            let xs = &self.x[s * cin * plane..][..cin * plane];
            for (o, &b) in bias.iter().enumerate().take(cout) {
                let from = (s * cout + o) * plane;
                let got = &out[from..][..plane];
                if kept_r.binary_search(&o).is_err() {
                    // Dropped rows are not written.
                    let written = match self.res.filter(|_| self.in_out) {
                        Some(r) => got != &r[from..][..plane],
                        None => !got.iter().all(|g| g.is_nan()),
                    };
                    assert!(!written, "{at}: sample {s} row {o} written");
                    continue;
                }
                let sums = naive(xs, self.w, hw, cin, kept_c, o);
                let scale = sums.iter().fold(1f64, |m, v| m.max(v.abs())) as f32;
                for (i, (&g, &z)) in got.iter().zip(&sums).enumerate() {
                    let r = self.res.map_or(0.0, |r| r[from + i]);
                    let want = self.act.apply(z as f32 + b + r);
                    assert!(
                        (g - want).abs() <= 1e-5 * scale * (cin as f32).sqrt(),
                        "{at}: {cin}->{cout} {hw:?}, sample {s} row {o} cell {i}: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// A layer's random values for `batch` samples: input, weights, bias and residual in
    /// [-1, 1), the residual left out, added apart or already in the output, and an
    /// activation.
    struct Drawn {
        x: Vec<f32>,
        w: Vec<f32>,
        bias: Vec<f32>,
        res: Vec<f32>,
        with_res: bool,
        in_out: bool,
        act: Act,
    }

    impl Drawn {
        fn new(rng: &mut impl Rng, batch: usize, cin: usize, cout: usize, hw: [usize; 2]) -> Self {
            let plane = hw[0] * hw[1];
            let mut uniform =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let (x, w) = (uniform(batch * cin * plane), uniform(cout * cin * 9));
            let (bias, res) = (uniform(cout), uniform(batch * cout * plane));
            let (with_res, in_out) = match rng.random_range(0..3) {
                0 => (false, false),
                1 => (true, false),
                _ => (true, true),
            };
            let act = [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)];
            Drawn {
                x,
                w,
                bias,
                res,
                with_res,
                in_out,
                act,
            }
        }

        fn layer(&self, hw: [usize; 2], cin: usize, cout: usize) -> Layer<'_> {
            Layer {
                x: &self.x,
                w: &self.w,
                hw,
                cin,
                cout,
                res: self.with_res.then_some(&self.res[..]),
                in_out: self.in_out,
                act: self.act,
            }
        }
    }

    fn subset(rng: &mut impl Rng, n: usize) -> Option<Vec<usize>> {
        let keep = rng.random_range(0.1..1.0);
        let mut v: Vec<usize> = (0..n).filter(|_| rng.random_bool(keep)).collect();
        if v.is_empty() {
            v.push(rng.random_range(0..n));
        }
        (rng.random_bool(0.5) && v.len() < n).then_some(v)
    }

    #[test]
    fn kept_rows_of_u_copy_to_consecutive_rows_with_zero_padding() {
        let mut rng = crate::exec::cpu::fresh_rng();
        for case in 0..60 {
            let (nrows, cin) = (rng.random_range(1..70), rng.random_range(1..30));
            let w: Vec<f32> = (0..nrows * cin * 9)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let algo = [Algorithm::F2, Algorithm::F4][case % 2];
            let ww = WinogradWeights::new(&w, nrows, cin, algo);
            let rows = subset(&mut rng, nrows).unwrap_or_else(|| (0..nrows).collect());
            let chans = subset(&mut rng, cin).unwrap_or_else(|| (0..cin).collect());
            let (nr, kc) = (rows.len(), chans.len());
            let xi = rng.random_range(0..algo.xi());
            for isa in [Isa::detect(), Isa::Portable] {
                let mut dst = vec![f32::NAN; gemm::packed_a_len(nr, kc)];
                copy_rows_u(isa, &ww, &chans, &rows, xi, &mut dst);
                for i in 0..nr.next_multiple_of(PACK) {
                    for (ci, &c) in chans.iter().enumerate() {
                        let got = dst[gemm::a_offset(i, kc) + PACK * ci];
                        let want = rows.get(i).map_or(0.0, |&r| {
                            ww.u[xi * ww.one() + gemm::a_offset(r, cin) + PACK * c]
                        });
                        assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} row {i} col {ci}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_part_of_a_plane_transforms_as_it_does_in_the_whole_plane() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for case in 0..80 {
            let hw = [rng.random_range(1..12), rng.random_range(1..=MAX_WIDTH)];
            let [h, w] = hw;
            let algo = [Algorithm::F2, Algorithm::F4][case / 2 % 2];
            let (xis, size) = (algo.xi(), algo.size());
            let (th, tw) = algo.tiles(h, w);
            let t_one = th * tw;
            let a = rng.random_range(0..t_one);
            let range = [a, rng.random_range(a + 1..=t_one)];
            let count = range[1] - range[0];
            let first_tile = rng.random_range(0..40);
            let plane: Vec<f32> = (0..h * w).map(|_| rng.random_range(-1.0..1.0)).collect();
            let isa = [Isa::detect(), Isa::Portable][case % 2];
            let mut scratch = Scratch::default();
            // The whole plane's V, then the part's, each one channel of one.
            let transform = |scratch: &mut Scratch, range: [usize; 2], first_tile: usize| {
                let panels = (first_tile + range[1] - range[0]).div_ceil(NR);
                let mut v = vec![f32::NAN; xis * v_stride(panels, 1)];
                let to = Dest {
                    algo,
                    v: OutPtr(v.as_mut_ptr()),
                    first_tile,
                    range,
                    last: false,
                    ci: 0,
                    kc: 1,
                    panels,
                };
                // SAFETY: V holds every panel the tiles fall in; one plane writes.
                unsafe { input_transform(isa, scratch, &plane, hw, to) };
                (v, v_stride(panels, 1))
            };
            let (whole, whole_xi) = transform(&mut scratch, [0, t_one], 0);
            let (part, part_xi) = transform(&mut scratch, range, first_tile);
            for xi in 0..xis {
                let want = &whole[xi * whole_xi + range[0]..][..count];
                let got = &part[xi * part_xi + first_tile..][..count];
                assert_eq!(
                    bits(got),
                    bits(want),
                    "case {case}: input transform {hw:?} {range:?}"
                );
                // Nothing written outside the part's lanes.
                let lanes = &part[xi * part_xi..(xi + 1) * part_xi];
                let outside = lanes[..first_tile]
                    .iter()
                    .chain(&lanes[first_tile + count..]);
                assert!(
                    outside.into_iter().all(|v| v.is_nan()),
                    "case {case}: wrote outside"
                );
            }

            // M of the whole plane; the part's M is its tiles' values from row_at on.
            let m_whole: Vec<f32> = (0..xis * t_one + 8)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let row_at = rng.random_range(0..5);
            let m_xi = row_at + count + rng.random_range(0..9);
            let mut m_part = vec![0f32; xis * m_xi + 8];
            for xi in 0..xis {
                m_part[xi * m_xi + row_at..][..count]
                    .copy_from_slice(&m_whole[xi * t_one + range[0]..][..count]);
            }
            let res: Vec<f32> = (0..h * w).map(|_| rng.random_range(-1.0..1.0)).collect();
            let act = [Act::None, Act::Relu, Act::Relu6][case % 3];
            for residual in [Residual::None, Residual::Apart(&res), Residual::InOut] {
                let mut want = res.clone();
                let b = Back {
                    algo,
                    m: &m_whole,
                    m_xi: t_one,
                    row_at: 0,
                    range: [0, t_one],
                    hw,
                    bias: 0.25,
                    residual,
                    act,
                };
                // SAFETY: one plane of hw, on this thread.
                unsafe { output_transform(isa, b, OutPtr(want.as_mut_ptr())) };
                let mut got = res.clone();
                let b = Back {
                    m: &m_part,
                    m_xi,
                    row_at,
                    range,
                    ..b
                };
                // SAFETY: as above.
                unsafe { output_transform(isa, b, OutPtr(got.as_mut_ptr())) };
                for (i, (g, (wv, r))) in got.iter().zip(want.iter().zip(&res)).enumerate() {
                    let (y, x) = (i / w, i % w);
                    let tile = (y / size) * tw + x / size;
                    let expect = if (range[0]..range[1]).contains(&tile) {
                        wv
                    } else {
                        r
                    };
                    assert_eq!(
                        g.to_bits(),
                        expect.to_bits(),
                        "case {case}: output transform {hw:?} {range:?} at ({y}, {x})"
                    );
                }
            }
        }
    }

    #[test]
    fn vector_transforms_equal_the_portable_ones_bit_for_bit() {
        // Every vector path this CPU runs (AVX-512 and AVX2 on an AVX-512 CPU).
        for isa in crate::exec::cpu::test_isas() {
            if isa != Isa::Portable {
                vector_transforms_equal_the_portable_ones_on(isa);
            }
        }
    }

    fn vector_transforms_equal_the_portable_ones_on(vector: Isa) {
        let mut rng = crate::exec::cpu::fresh_rng();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for case in 0..120 {
            // Every width up to the widest served, tile rows across panel ends; every
            // other case a part of the plane's tiles, from and to anywhere in a row.
            let hw = [rng.random_range(1..20), rng.random_range(1..=MAX_WIDTH)];
            let algo = [Algorithm::F2, Algorithm::F4][case / 4 % 2];
            let xis = algo.xi();
            let (th, tw) = algo.tiles(hw[0], hw[1]);
            let range = if case % 4 < 2 {
                [0, th * tw]
            } else {
                let a = rng.random_range(0..th * tw);
                [a, rng.random_range(a + 1..=th * tw)]
            };
            let count = range[1] - range[0];
            let (kc, ci) = (3, rng.random_range(0..3));
            let first_tile = rng.random_range(0..40);
            let panels = (first_tile + count).div_ceil(NR);
            let plane: Vec<f32> = (0..hw[0] * hw[1])
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut got = vec![f32::NAN; xis * v_stride(panels, kc)];
            let mut want = got.clone();
            let mut scratch = Scratch::default();
            for (v, isa) in [(&mut got, vector), (&mut want, Isa::Portable)] {
                let to = Dest {
                    algo,
                    v: OutPtr(v.as_mut_ptr()),
                    first_tile,
                    range,
                    last: case % 2 == 0,
                    ci,
                    kc,
                    panels,
                };
                // SAFETY: V holds every panel the tiles fall in; one plane writes.
                unsafe { input_transform(isa, &mut scratch, &plane, hw, to) };
            }
            assert_eq!(
                bits(&got),
                bits(&want),
                "case {case}: input transform {hw:?} {algo:?}"
            );

            let m_xi = rng.random_range(count..count + 40);
            let m: Vec<f32> = (0..xis * m_xi + 8)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let row_at = m_xi - count;
            let res: Vec<f32> = (0..hw[0] * hw[1])
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let act = [Act::None, Act::Relu, Act::Relu6][case % 3];
            for residual in [Residual::None, Residual::Apart(&res), Residual::InOut] {
                let mut outs = [res.clone(), res.clone()];
                for (out, isa) in outs.iter_mut().zip([vector, Isa::Portable]) {
                    let b = Back {
                        algo,
                        m: &m,
                        m_xi,
                        row_at,
                        range,
                        hw,
                        bias: 0.25,
                        residual,
                        act,
                    };
                    // SAFETY: one plane of hw, on this thread.
                    unsafe { output_transform(isa, b, OutPtr(out.as_mut_ptr())) };
                }
                assert_eq!(
                    bits(&outs[0]),
                    bits(&outs[1]),
                    "case {case}: output transform {hw:?} {algo:?} on {vector:?}"
                );
            }
        }
    }

    #[test]
    fn winograd_matches_a_naive_convolution() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let pool = BufferPool::default();
        for case in 0..40 {
            let (cin, cout) = (rng.random_range(1..40), rng.random_range(1..30));
            let mut hw = [
                rng.random_range(1..20),
                rng.random_range(1..=MAX_WIDTH.min(40)),
            ];
            let mut batch = rng.random_range(1..4);
            // Some cases with enough channels and tiles for several blocks of panels
            // per ξ, where a plan's kept columns of U are copied up front rather than
            // by each task.
            let cin = if case % 8 == 0 {
                (hw, batch) = ([rng.random_range(20..30), rng.random_range(30..=40)], 3);
                rng.random_range(150..250)
            } else {
                cin
            };
            let d = Drawn::new(&mut rng, batch, cin, cout, hw);
            let (w, bias) = (&d.w, &d.bias);
            let (chans, rows) = (subset(&mut rng, cin), subset(&mut rng, cout));
            let algo = [Algorithm::F2, Algorithm::F4][case % 2];
            let ww = WinogradWeights::new(w, cout, cin, algo);
            let kept_c: Vec<usize> = chans.clone().unwrap_or_else(|| (0..cin).collect());
            let kept_r: Vec<usize> = rows.clone().unwrap_or_else(|| (0..cout).collect());
            let layer = d.layer(hw, cin, cout);
            for (isa, serial, zero_dropped, bands) in [
                (Isa::detect(), false, false, false),
                (Isa::detect(), true, false, false),
                (Isa::Portable, false, false, false),
                (Isa::detect(), false, true, false),
                (Isa::Portable, true, true, false),
                (Isa::detect(), false, false, true),
                (Isa::Portable, true, true, true),
            ] {
                let (mut out, residual) = layer.output(batch);
                let job = Job {
                    isa,
                    serial,
                    zero_dropped,
                    bands,
                    ..layer.job(
                        &ww,
                        batch,
                        [chans.as_deref(), rows.as_deref()],
                        bias,
                        residual,
                    )
                };
                conv(&job, &pool, &mut out);
                for s in 0..batch {
                    let at = format!(
                        "case {case} {isa:?} {algo:?}, batch {batch}, zero {zero_dropped}, bands {bands}"
                    );
                    layer.assert_sample(&out, s, &kept_c, &kept_r, bias, &at);
                }
            }
        }
    }

    #[test]
    fn bands_on_any_number_of_threads_match_a_naive_convolution() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let pool = BufferPool::default();
        let pools: Vec<rayon::ThreadPool> = (1..=4)
            .map(|n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            })
            .collect();
        for case in 0..24 {
            // Few channels and many tiles, so that the plan runs by bands: one band or
            // several, odd counts, bands across samples, rows in uneven parts.
            // F(4×4, 3×3) over planes twice as tall and wide, for as many tiles.
            let algo = [Algorithm::F2, Algorithm::F4][case / 3 % 2];
            let grow = algo.size() / 2;
            let (cin, cout) = (rng.random_range(1..24), rng.random_range(1..40));
            let hw = [
                rng.random_range(6 * grow..30 * grow),
                rng.random_range(9 * grow..=MAX_WIDTH.min(48 * grow)),
            ];
            let batch = rng.random_range(1..4);
            let d = Drawn::new(&mut rng, batch, cin, cout, hw);
            let (w, bias) = (&d.w, &d.bias);
            let ww = WinogradWeights::new(w, cout, cin, algo);
            let rows = subset(&mut rng, cout);
            // Input channels all kept, some kept (read through a column map of U), or
            // the dropped ones entered as zeros.
            let chans = if case % 3 == 0 {
                None
            } else {
                subset(&mut rng, cin)
            };
            let zero_dropped = case % 3 == 1;
            let kept_c: Vec<usize> = chans.clone().unwrap_or_else(|| (0..cin).collect());
            let kept_r: Vec<usize> = rows.clone().unwrap_or_else(|| (0..cout).collect());
            let kc = if zero_dropped { cin } else { kept_c.len() };
            assert!(
                in_bands(hw, batch, kc, kept_r.len()),
                "case {case}: not by bands"
            );
            let layer = d.layer(hw, cin, cout);
            // Every kernel path in turn: their row tiles (12, 6, 4) cut the rows into
            // parts differently.
            let isas = crate::exec::cpu::test_isas();
            let isa = isas[case % isas.len()];
            let run = |on: &rayon::ThreadPool| {
                // Each thread's tiles and rows, edges of bands and of samples, and the
                // cells outside kept rows: as a naive convolution has them.
                let (mut out, residual) = layer.output(batch);
                let job = Job {
                    isa,
                    zero_dropped,
                    bands: true,
                    ..layer.job(
                        &ww,
                        batch,
                        [chans.as_deref(), rows.as_deref()],
                        bias,
                        residual,
                    )
                };
                on.install(|| conv(&job, &pool, &mut out));
                out
            };
            for (n, on) in pools.iter().enumerate() {
                let banded = run(on);
                for s in 0..batch {
                    let at = format!(
                        "case {case}: {isa:?} {algo:?}, {} threads, batch {batch}",
                        n + 1
                    );
                    layer.assert_sample(&banded, s, &kept_c, &kept_r, bias, &at);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn weights_as_lines_match_a_naive_convolution() {
        use super::super::winograd_lines::{self, LineWeights};
        let isa = Isa::detect();
        if !winograd_lines::serves(isa, 1, [7, 7]) {
            eprintln!("no AVX-512: the line layout is not served here");
            return;
        }
        let mut rng = crate::exec::cpu::fresh_rng();
        let pool = BufferPool::default();
        for case in 0..60 {
            // Planes of at most 64 tiles (7 × 7 and 14 × 14 among them), square or long;
            // channels over several blocks, rows over several tasks and every remainder
            // of three.
            let hw = match case % 6 {
                0 => [7, 7],
                1 => [14, 14],
                2 => [rng.random_range(1..9), rng.random_range(1..9)],
                3 => [rng.random_range(1..17), rng.random_range(1..17)],
                4 => [rng.random_range(1..3), rng.random_range(1..129)],
                _ => [rng.random_range(1..129), rng.random_range(1..3)],
            };
            assert!(winograd_lines::serves(isa, 1, hw), "{hw:?}");
            // Over more than 16 tiles a block holds 64 channels: up to three of them.
            let wide = hw[0].div_ceil(2) * hw[1].div_ceil(2) > 16;
            let cin = rng.random_range(1..if wide { 150 } else { 60 });
            let cout = rng.random_range(1..60);
            let d = Drawn::new(&mut rng, 1, cin, cout, hw);
            let (w, bias) = (&d.w, &d.bias);
            // Now and then no input channel at all: bias and residual only.
            let chans = if case % 10 == 9 {
                Some(Vec::new())
            } else {
                subset(&mut rng, cin)
            };
            let rows = subset(&mut rng, cout);
            let ww = WinogradWeights::new(w, cout, cin, Algorithm::F2);
            let lines = LineWeights::from_packed(&ww);
            let kept_c: Vec<usize> = chans.clone().unwrap_or_else(|| (0..cin).collect());
            let kept_r: Vec<usize> = rows.clone().unwrap_or_else(|| (0..cout).collect());
            let layer = d.layer(hw, cin, cout);
            for serial in [false, true] {
                let (mut out, residual) = layer.output(1);
                let job = Job {
                    isa,
                    serial,
                    ..layer.job(&ww, 1, [chans.as_deref(), rows.as_deref()], bias, residual)
                };
                winograd_lines::conv(&job, &lines, &pool, &mut out);
                let at = format!("case {case}, lines, serial {serial}");
                layer.assert_sample(&out, 0, &kept_c, &kept_r, bias, &at);
            }
        }
    }

    #[test]
    fn samples_with_their_own_channels_match_a_naive_convolution() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let pool = BufferPool::default();
        for case in 0..40 {
            // Up to 150 input channels: a task's block of U then holds fewer rows than
            // the layer has.
            let (cin, cout) = (rng.random_range(1..150), rng.random_range(1..50));
            let hw = [rng.random_range(1..12), rng.random_range(1..12)];
            let batch = rng.random_range(1..5);
            let plane = hw[0] * hw[1];
            let mut uniform =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let x = uniform(batch * cin * plane);
            let w = uniform(cout * cin * 9);
            let biases: Vec<Vec<f32>> = (0..batch).map(|_| uniform(cout)).collect();
            let res = uniform(batch * cout * plane);
            let (with_res, in_out) = match rng.random_range(0..3) {
                0 => (false, false),
                1 => (true, false),
                _ => (true, true),
            };
            let act = [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)];
            // Each sample its own channels: all, some, or (inputs) none.
            // Per sample: its kept input channels and kept output channels.
            type Kept = Option<Vec<usize>>;
            let plans: Vec<(Kept, Kept)> = (0..batch)
                .map(|_| {
                    let chans = if rng.random_bool(0.1) {
                        Some(Vec::new())
                    } else {
                        subset(&mut rng, cin)
                    };
                    (chans, subset(&mut rng, cout))
                })
                .collect();
            let algo = [Algorithm::F2, Algorithm::F4, Algorithm::F2][case % 3];
            let ww = WinogradWeights::new(&w, cout, cin, algo);
            let keeps: Vec<SampleKeep> = plans
                .iter()
                .zip(&biases)
                .map(|((c, r), bias)| SampleKeep {
                    chans: c.as_deref(),
                    rows: r.as_deref(),
                    bias,
                })
                .collect();
            let layer = Layer {
                x: &x,
                w: &w,
                hw,
                cin,
                cout,
                res: with_res.then_some(&res[..]),
                in_out,
                act,
            };
            // Runs the batch with `conv` and checks every sample against the reference.
            let check = |isa: Isa, way: &str, conv: &dyn Fn(&SamplesJob, &mut [f32])| {
                let (mut out, residual) = layer.output(batch);
                let job = SamplesJob {
                    isa,
                    x: &x,
                    hw,
                    weights: &ww,
                    samples: &keeps,
                    residual,
                    act,
                };
                conv(&job, &mut out);
                for (s, ((chans, rows), bias)) in plans.iter().zip(&biases).enumerate() {
                    let kept_c: Vec<usize> = chans.clone().unwrap_or_else(|| (0..cin).collect());
                    let kept_r: Vec<usize> = rows.clone().unwrap_or_else(|| (0..cout).collect());
                    let at = format!("case {case} {way} {algo:?}, {} of {cin} kept", kept_c.len());
                    layer.assert_sample(&out, s, &kept_c, &kept_r, bias, &at);
                }
            };
            for isa in [Isa::detect(), Isa::Portable] {
                check(isa, &format!("{isa:?}"), &|job, out| {
                    conv_samples(job, &pool, out)
                });
            }
            // The same batch on F(2×2, 3×3)'s filters as lines, where this CPU serves it
            // (AVX-512, at most 16 tiles: about two cases in five).
            #[cfg(target_arch = "x86_64")]
            if algo == Algorithm::F2
                && super::super::winograd_lines::serves_samples(Isa::detect(), hw)
            {
                use super::super::winograd_lines::{self, LineWeights};
                let lines = LineWeights::from_packed(&ww);
                check(Isa::detect(), "lines", &|job, out| {
                    winograd_lines::conv_samples(job, &lines, &pool, out)
                });
            }
        }
    }
}
