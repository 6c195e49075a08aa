//! The GEMM every CPU convolution shares, dense or sparse:
//!
//! `C[rows × cols] = A[rows × K] · B[K × cols]`, then per row `+ bias`, optionally
//! `+ residual`, then the activation — all in the micro-kernel's epilogue.
//!
//! * **A** (weights) is packed once, at load, in blocks of [`PACK`] rows: block `b`
//!   holds rows `PACK·b ..` as `[K][PACK]`, so one step of K reads `PACK` consecutive
//!   floats ([`pack_a`]). A micro-tile names its A rows by index, so it runs on any
//!   subset of output channels (a sparse plan's kept channels) without repacking the
//!   weight tensor per input: a tile of consecutive rows inside one block reads one
//!   stream; any other subset reads each row at its own place, with the same K stride.
//!   A sparse plan with kept input channels copies their columns into a compact packed
//!   A ([`pack_a_channels`]), block by block, rather than mapping columns in the kernel.
//! * **B** is packed per call into panels of [`NR`] columns, `[panels][K][NR]`, zero-padded
//!   on the last panel. The packer is the convolution's im2col ([`pack_im2col`]): it
//!   reads only the output positions it is given, so a spatially sparse plan packs only
//!   its kept positions, and the kernel never sees the difference.
//! * **C** rows are written at `c + row_index · ldc + col`; the output column of panel
//!   column `j` is given by the caller's column map, so results scatter straight to
//!   their place in an NCHW output.
//!
//! Kernels are chosen at run time: AVX-512F (12 × 32 tile), AVX2+FMA (6 × 16, twice per
//! panel), or portable Rust.

use crate::model::Act;

/// Width of a packed B panel (output positions per micro-tile).
pub const NR: usize = 32;

/// Most runs of stored lanes the AVX-512 store takes as shifted masked stores (see
/// `Tile::runs`): a flat panel of 32 over rows of 30 lanes (28 wide, stride 1) crosses
/// two row ends.
#[cfg(target_arch = "x86_64")]
const MAX_RUNS: usize = 3;

/// Rows per packed block of A: the widest micro-tile's rows (AVX-512). Narrower kernels
/// take half a block (AVX2) or any rows of it.
pub const PACK: usize = 12;

/// What the epilogue adds and applies.
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    /// One bias per row of C.
    pub bias: &'a [f32],
    /// Added before the activation.
    pub residual: Residual<'a>,
    pub act: Act,
}

/// Where the epilogue's residual is read.
#[derive(Clone, Copy)]
pub enum Residual<'a> {
    /// Nothing is added.
    None,
    /// At the same index as C.
    Apart(&'a [f32]),
    /// In C itself: each cell adds what it held. A residual whose last reader is this
    /// convolution lends it its buffer as the output: no fresh output is brought into
    /// cache only to be overwritten, and a tile's epilogue touches half as many lines
    /// (ResNet-50's 56 × 56 bottleneck outputs took 0.72–0.75 of their time, one thread).
    InOut,
}

impl<'a> From<Option<&'a [f32]>> for Residual<'a> {
    fn from(r: Option<&'a [f32]>) -> Self {
        r.map_or(Residual::None, Residual::Apart)
    }
}

impl<'a> Residual<'a> {
    /// Sample `s`'s part, of `len` values per sample.
    pub fn sample(self, s: usize, len: usize) -> Residual<'a> {
        self.part(s * len, len)
    }

    /// The part for the `len` output cells from cell `at`.
    pub fn part(self, at: usize, len: usize) -> Residual<'a> {
        match self {
            Residual::Apart(r) => Residual::Apart(&r[at..at + len]),
            other => other,
        }
    }

    /// Fills `cells`, output cells `at..` that the convolution does not compute: the
    /// residual passes through (already there when it is in the output), or zero.
    pub fn pass_through(self, cells: &mut [f32], at: usize) {
        match self {
            Residual::None => cells.fill(0.0),
            Residual::Apart(r) => cells.copy_from_slice(&r[at..at + cells.len()]),
            Residual::InOut => {}
        }
    }

    /// Where the residual of an output that starts at `c` starts (indexed as C), if any.
    #[inline(always)]
    pub fn base(self, c: *const f32) -> Option<*const f32> {
        match self {
            Residual::None => None,
            Residual::Apart(r) => Some(r.as_ptr()),
            Residual::InOut => Some(c),
        }
    }
}

/// Output pointer shared by tasks that write disjoint cells.
#[derive(Clone, Copy)]
pub struct OutPtr(pub *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the `Send` wrapper, not the pointer.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// The micro-kernel implementation picked for this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// The CPU engine's executor name with this micro-kernel.
    pub fn engine_name(self) -> &'static str {
        match self {
            Isa::Avx512 => "cpu-engine-avx512",
            Isa::Avx2 => "cpu-engine-avx2",
            Isa::Portable => "cpu-engine-portable",
        }
    }

    /// Rows of A per micro-tile (a divisor of [`PACK`]).
    pub fn mr(self) -> usize {
        match self {
            Isa::Avx512 => 12,
            Isa::Avx2 => 6,
            Isa::Portable => 4,
        }
    }
}

/// Floats a packed A of `rows × k` takes: whole blocks of [`PACK`] rows.
pub fn packed_a_len(rows: usize, k: usize) -> usize {
    rows.div_ceil(PACK) * PACK * k
}

/// Where row `r`, column 0 of a packed A with `k` columns lies; column `c` is
/// `PACK · c` further.
#[inline]
pub fn a_offset(r: usize, k: usize) -> usize {
    (r / PACK) * PACK * k + r % PACK
}

/// Packs row-major `w` (`rows × k`) into blocks of [`PACK`] rows (see the module
/// documentation); the rows that pad the last block are zero.
pub fn pack_a(w: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; packed_a_len(rows, k)];
    for (r, row) in w.chunks_exact(k).take(rows).enumerate() {
        let at = a_offset(r, k);
        for (c, &v) in row.iter().enumerate() {
            out[at + c * PACK] = v;
        }
    }
    out
}

/// Copies the columns of input channels `chans` (each `taps` consecutive columns) of
/// packed `a` (`k` columns, whole blocks) into `out`, a packed A of the same rows with
/// `chans.len() · taps` columns: one contiguous run of `PACK · taps` floats per block and
/// channel. Rows keep their indices, so a plan's kept rows read it as they read `a`.
pub fn pack_a_channels(a: &[f32], k: usize, chans: &[usize], taps: usize, out: &mut [f32]) {
    let kc = chans.len() * taps;
    if kc == 0 {
        return;
    }
    let run = PACK * taps;
    for (src, dst) in a
        .chunks_exact(PACK * k)
        .zip(out.chunks_exact_mut(PACK * kc))
    {
        if taps == 1 {
            // Runs of one column: fixed-size copies, not a memmove call each.
            for (&c, d) in chans.iter().zip(dst.chunks_exact_mut(PACK)) {
                let from: &[f32; PACK] = src[c * PACK..(c + 1) * PACK].try_into().unwrap();
                let to: &mut [f32; PACK] = d.try_into().unwrap();
                *to = *from;
            }
        } else {
            for (&c, d) in chans.iter().zip(dst.chunks_exact_mut(run)) {
                d.copy_from_slice(&src[c * run..(c + 1) * run]);
            }
        }
    }
}

/// Floats [`gather_tile`] may write past its `PACK · k`: it stores whole vectors of 16.
pub const GATHER_SLACK: usize = 4;

/// Gathers rows `rows` (at most [`PACK`]) of packed `a` (`ka` columns, whole blocks), at
/// the columns of input channels `chans` (each `taps` consecutive columns), into `out`
/// as one packed block of `k = chans.len() · taps` columns: row `rows[i]`'s `kk`-th such
/// column goes to `out[kk · PACK + i]`, lanes past `rows.len()` are zero. `out` holds
/// at least `PACK · k + GATHER_SLACK` floats. A tile then reads its kept weights as
/// one stream from a buffer of its own size, where copying the kept columns of every
/// block its rows lie in ([`pack_a_channels`]) writes all twelve rows of each. AVX-512
/// only: each column is one masked load and lane permutation per block the rows lie
/// in; elsewhere it returns `false` and writes nothing.
///
/// # Panics
/// If a row lies past `a`'s blocks, a column past `ka`, there are more than [`PACK`]
/// rows, or `out` is short.
pub fn gather_tile(
    isa: Isa,
    a: &[f32],
    ka: usize,
    rows: &[usize],
    chans: &[usize],
    taps: usize,
    out: &mut [f32],
) -> bool {
    let k = chans.len() * taps;
    assert!(rows.len() <= PACK, "gather_tile: {} rows", rows.len());
    assert!(
        out.len() >= PACK * k + GATHER_SLACK,
        "gather_tile: output too short"
    );
    assert!(
        chans.iter().all(|&c| (c + 1) * taps <= ka),
        "gather_tile: a channel past {ka} columns"
    );
    let blocks = a.len() / (PACK * ka).max(1);
    assert!(
        rows.iter().all(|&r| r / PACK < blocks),
        "gather_tile: a row past A's {blocks} blocks"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: checked above: every row's block lies inside `a`, each gathered column
        // inside its `ka` columns, and `out` holds `PACK · k` values and the slack the
        // last vector's store reaches.
        Isa::Avx512 => unsafe {
            avx512::gather_tile(a, ka, rows, chans, taps, out);
            true
        },
        _ => false,
    }
}

/// One micro-tile: `rows.len() ≤ mr` rows of packed A (`arows`, by row index; `ka`
/// columns) times one B panel of `k` rows of [`NR`] values, `ldb` apart (`NR` when
/// packed; a 1×1 convolution reads its input in place with `ldb` = plane size), columns
/// `0..cols.len()` stored at `c[rows[i] * ldc + cols[j]]`; `cols` is strictly ascending.
/// Panel row `kk` multiplies A's column `kmap[kk]` (`kk` without a map): a plan that
/// keeps some input channels packs only those, and reads their weights in place. With
/// `boff`, panel row `kk` is read at `panel[boff[kk]..]` instead of `kk * ldb`: a
/// stride-1 convolution over one output row segment reads its input in place, each tap
/// a shifted window, with no im2col at all. With `lanes`, only the panel's lanes whose
/// bit is set are stored, in order, at `cols[0]`, `cols[1]`, …: a stride-1 convolution
/// swept over its padded input as one flat array leaves the lanes that fall between
/// two output rows unused.
///
/// # Safety contract (checked by the callers in this module)
/// `a` holds `packed_a_len(max(arows) + 1, ka)` floats, and the block of a tile whose
/// rows are consecutive inside one block holds `mr` rows from the first; every column
/// read (`kk < k`, or `kmap[kk]`) is `< ka`; `kmap.len() ≥ k`;
/// `panel.len() ≥ (k - 1) * ldb + r` (with `boff`: `boff.len() ≥ k` and every
/// `boff[kk] + r ≤ panel.len()`), `r` the tile's [`panel_reads`] (at most [`NR`]);
/// `arows.len() == rows.len()`, and every
/// `rows[i] * ldc + cols[j]` is inside `c` (and `residual`, when given).
pub struct Tile<'a> {
    pub a: &'a [f32],
    /// Columns of packed A.
    pub ka: usize,
    /// Rows of A each tile row reads.
    pub arows: &'a [usize],
    /// Panel rows of A's columns, when not `0..k`.
    pub kmap: Option<&'a [usize]>,
    /// Where each panel row starts in `panel`, when not at `kk * ldb`.
    pub boff: Option<&'a [usize]>,
    pub k: usize,
    /// Rows of C (and of the bias) each tile row stores.
    pub rows: &'a [usize],
    pub panel: &'a [f32],
    pub ldb: usize,
    pub ldc: usize,
    pub cols: &'a [usize],
    /// The lanes stored, when not the first `cols.len()`; as many bits set as `cols`
    /// has columns.
    pub lanes: Option<u32>,
}

impl Tile<'_> {
    /// Lanes of the panel the kernel computes: up to the last one stored.
    fn width(&self) -> usize {
        self.lanes.map_or(self.cols.len(), |m| {
            (u32::BITS - m.leading_zeros()) as usize
        })
    }

    /// Whether the tile's columns are consecutive (one run per row in C).
    fn contiguous(&self) -> bool {
        let n = self.cols.len();
        n > 0 && self.cols[n - 1] - self.cols[0] == n - 1
    }

    /// The tile's stored lanes as runs of consecutive lanes, lane `j` of run `(mask,
    /// base)` going to column `base + j`, where the columns are consecutive and the lanes
    /// form at most [`MAX_RUNS`] runs (a flat panel crossing row ends: its lanes skip the
    /// padding between two rows, its columns do not); else `None`.
    #[cfg(target_arch = "x86_64")]
    fn runs(&self) -> Option<([(u32, isize); MAX_RUNS], usize)> {
        let n = self.cols.len();
        let lanes = match self.lanes {
            Some(l) => l,
            None if n >= NR => u32::MAX,
            None => (1u32 << n) - 1,
        };
        if !self.contiguous() || lanes.count_ones() as usize != n {
            return None;
        }
        let (mut runs, mut count) = ([(0u32, 0isize); MAX_RUNS], 0);
        let (mut rest, mut col) = (lanes, self.cols[0] as isize);
        while rest != 0 {
            if count == MAX_RUNS {
                return None;
            }
            let first = rest.trailing_zeros();
            let len = (rest >> first).trailing_ones();
            let mask = u32::MAX.checked_shr(32 - len).unwrap_or(0) << first;
            runs[count] = (mask, col - first as isize);
            count += 1;
            col += len as isize;
            rest &= !mask;
        }
        Some((runs, count))
    }

    /// Whether the tile's A rows are consecutive inside one packed block, with room in
    /// the block for a kernel of `mr` rows from the first: one stream, every row at a
    /// fixed offset from the first.
    fn one_block(&self, mr: usize) -> bool {
        let (f, l) = (self.arows[0], self.arows[self.arows.len() - 1]);
        l - f == self.arows.len() - 1 && f % PACK + mr <= PACK
    }
}

/// Values of each panel row that a tile `width` columns wide reads on `isa`, from the
/// row's start: what a panel read in place (its rows are the input's own) must have.
/// `one_block`: whether the tile's rows lie in one packed block of A with room for the
/// kernel's rows (a dense layer's tiles), where the kernels run up to four last columns
/// one at a time, reading exactly those; elsewhere they read whole vectors of columns,
/// except that on AVX-512 a tile of at most four columns runs them one at a time
/// wherever its rows lie.
/// Kept in step with the kernels' choices in `avx512::kernel` and `avx2::kernel`.
pub fn panel_reads(isa: Isa, width: usize, one_block: bool) -> usize {
    let exact = |cols: usize| one_block && cols <= 4;
    match isa {
        // Up to four columns in all, AVX-512 takes them one at a time wherever its rows
        // lie (gathering them when spread over blocks).
        Isa::Avx512 if width <= 16 => {
            if width <= 4 {
                width
            } else {
                16
            }
        }
        Isa::Avx512 => {
            if exact(width - 16) {
                width
            } else {
                NR
            }
        }
        Isa::Avx2 => {
            let half = |cols: usize| match cols {
                c if exact(c) => c,
                c if c <= 8 => 8,
                _ => 16,
            };
            if width <= 16 {
                half(width)
            } else {
                16 + half(width - 16)
            }
        }
        Isa::Portable => width,
    }
}

/// Accumulators of one micro-tile, kept between K blocks.
pub type Acc = [[f32; NR]; 12];

/// Rows of the packed panel (and of A) per K block: a block of the panel, `KC × NR`
/// floats (24 KiB), stays in L1 while every row block of a task streams over it.
pub const KC: usize = 192;

/// Multiplies rows `k0..k1` of the panel into `acc` (zeroed first when `k0 == 0`).
///
/// # Safety
/// The tile's indices are in bounds (see [`Tile`]) and `k0 ≤ k1 ≤ t.k`.
pub unsafe fn accumulate(isa: Isa, t: &Tile, k0: usize, k1: usize, acc: &mut Acc) {
    accumulate_prefetching(isa, t, k0, k1, acc, Prefetch::NONE);
}

/// Where the caller runs next, prefetched while a tile computes: `blocks` regions (at
/// most [`Prefetch::MAX`]) `stride` floats apart from `at`; per step of K the kernel
/// prefetches the next `step` floats of each (the caller's `at` is where the K block's
/// first step starts). Blocks of a packed A: `stride = PACK · ka`, `step = PACK`. A
/// region read at another rate (the packed blocks a later tile's weights are copied
/// from) takes a `step` that covers it over the steps of K the tile runs.
///
/// `panel`, where not null, is another panel read in place with this tile's row offsets
/// (`ldb` or `boff`): per step of K the AVX-512 kernel prefetches into L2 the two lines
/// of that panel's row, the panel a task runs next, whose rows lie in as many planes as
/// K and so are more streams than the hardware prefetcher follows.
#[derive(Clone, Copy)]
pub struct Prefetch {
    pub at: *const f32,
    pub blocks: usize,
    pub stride: usize,
    pub step: usize,
    pub panel: *const f32,
}

impl Prefetch {
    /// Nothing to prefetch.
    pub const NONE: Prefetch = Prefetch {
        at: std::ptr::null(),
        blocks: 0,
        stride: 0,
        step: 0,
        panel: std::ptr::null(),
    };
    /// Most blocks prefetched at once: a tile of kept rows spread over more blocks
    /// prefetches the first ones.
    pub const MAX: usize = 3;
}

/// [`accumulate`], and on AVX-512 also prefetches into L1 `next`: `(k1 - k0) · step`
/// floats from `next.at` (and the same in the blocks after it), the weights the caller
/// runs next, so that weights streaming from memory arrive before they are needed. A
/// prefetch never faults; `next.at` may point anywhere.
///
/// # Safety
/// As for [`accumulate`].
pub unsafe fn accumulate_prefetching(
    isa: Isa,
    t: &Tile,
    k0: usize,
    k1: usize,
    acc: &mut Acc,
    next: Prefetch,
) {
    accumulate_finishing(isa, t, k0, k1, acc, next, None);
}

/// Where a kernel that reaches the end of K may apply the epilogue and store the tile
/// itself, from its registers ([`store`]'s operands), instead of writing its
/// accumulators out for [`store`] to read back. Tiles of 96 rows over 4096 positions,
/// one thread, 380 alternating passes: K = 16 took 0.92 of the time, K = 64 0.97,
/// K = 160 0.99 (the small-K 1×1 layers of MobileNetV2 and EfficientNet-Lite0).
#[derive(Clone, Copy)]
pub struct Finish<'a> {
    pub ep: &'a Epilogue<'a>,
    pub c: *mut f32,
}

/// [`accumulate_prefetching`]; with `finish`, when `k1 == t.k`, the AVX-512 and AVX2
/// kernels of a tile whose columns are consecutive (and without a lane mask) also apply
/// the epilogue and store the tile, and return true: `acc` is then not written. Otherwise
/// it returns false and the caller stores `acc` ([`store`]).
///
/// # Safety
/// As for [`accumulate`], and with `finish`, as for [`store`].
pub unsafe fn accumulate_finishing(
    isa: Isa,
    t: &Tile,
    k0: usize,
    k1: usize,
    acc: &mut Acc,
    next: Prefetch,
    finish: Option<Finish>,
) -> bool {
    debug_assert!(!t.rows.is_empty() && t.rows.len() <= isa.mr());
    // The SIMD kernels start from zero registers on the first block instead of loading.
    if k0 == 0 && isa == Isa::Portable {
        for r in acc.iter_mut().take(t.rows.len()) {
            r.fill(0.0);
        }
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let finish = finish.filter(|_| k1 == t.k && t.lanes.is_none() && t.contiguous());
            return avx512::kernel(t, k0, k1, acc, next, finish);
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            let finish = finish.filter(|_| k1 == t.k && t.lanes.is_none() && t.contiguous());
            avx2::kernel(t, k0, k1, 0, acc, finish);
            // A panel's last columns may not fill its second half: skip it then.
            if t.width() > 16 {
                avx2::kernel(t, k0, k1, 16, acc, finish);
            }
            return finish.is_some();
        }
        _ => portable_kernel(t, k0, k1, acc),
    }
    false
}

/// [`accumulate`] over an A stored row by row: tile row `i` reads A's row `arows[i]`,
/// `t.ka` values long, at `t.a[arows[i] · ka ..]`, its column `kk` the `kk`-th value.
/// For a plan that keeps output rows spread over the packed blocks of a layer whose
/// weights stream from memory: the packed blocks interleave twelve rows, so a tile of
/// rows from many blocks reads every block's lines whole, where rows stored one after
/// another cost only their own. Without a column map or panel offsets; AVX-512 only
/// (`false` elsewhere, and nothing computed).
///
/// # Safety
/// As for [`accumulate`], with `t.a` holding `(max(arows) + 1) · ka` values, `k ≤ ka`;
/// `t.kmap` and `t.boff` are `None`.
pub unsafe fn accumulate_rows_major(
    isa: Isa,
    t: &Tile,
    k0: usize,
    k1: usize,
    acc: &mut Acc,
) -> bool {
    debug_assert!(t.kmap.is_none() && t.boff.is_none());
    debug_assert!(!t.rows.is_empty() && t.rows.len() <= 12);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            avx512::rows_major(t, k0, k1, acc);
            true
        }
        _ => false,
    }
}

/// Prefetches what `t`'s epilogue will touch: for each of its rows, the cache lines of
/// its columns' residual values (when there is a residual) and of its output cells (for
/// writing), so that a tile computed meanwhile hides their latency.
///
/// Safety: none needed; a prefetch never faults, and addresses are only computed.
pub fn prefetch_epilogue(t: &Tile, ep: &Epilogue, c: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        let n = t.cols.len();
        if n == 0 {
            return;
        }
        let span = t.cols[n - 1] - t.cols[0] + 1;
        for &row in t.rows {
            let at = row * t.ldc + t.cols[0];
            // Lines of 16 floats: the first and every 16 further, and the last.
            let mut off = 0;
            loop {
                let o = off.min(span - 1);
                // SAFETY: prefetching computes an address and never faults.
                unsafe {
                    // A residual in C is prefetched with C.
                    if let Residual::Apart(r) = ep.residual {
                        _mm_prefetch::<_MM_HINT_T0>(r.as_ptr().wrapping_add(at + o) as *const i8);
                    }
                    _mm_prefetch::<_MM_HINT_ET0>(c.wrapping_add(at + o) as *const i8);
                }
                if o == span - 1 {
                    break;
                }
                off += 16;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (t, ep, c);
}

/// Applies the epilogue to finished accumulators and stores them at
/// `c[rows[i] * ldc + cols[j]]`.
///
/// # Safety
/// Every `row * ldc + cols[j]` is inside the output `c` points to (and inside
/// `ep.residual`), and no other thread writes those cells concurrently.
pub unsafe fn store(t: &Tile, ep: &Epilogue, acc: &Acc, c: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return store_avx512(t, ep, acc, c);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return store_avx2(t, ep, acc, c);
    }
    store_body(t, ep, acc, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_avx2(t: &Tile, ep: &Epilogue, acc: &Acc, c: *mut f32) {
    match t.lanes {
        Some(lanes) if t.contiguous() => avx2::store_lanes(t, ep, acc, c, lanes),
        Some(_) => store_body(t, ep, acc, c),
        None => avx2::store_runs(t, ep, acc, c),
    }
}

/// The epilogue with 16-lane masked loads and stores: one pass per row, a segment of
/// consecutive columns at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_avx512(t: &Tile, ep: &Epilogue, acc: &Acc, c: *mut f32) {
    use std::arch::x86_64::*;
    if let Some(lanes) = t.lanes {
        return store_lanes_avx512(t, ep, acc, c, lanes);
    }
    let n = t.cols.len();
    let contiguous = n > 0 && t.cols[n - 1] - t.cols[0] == n - 1;
    if !contiguous {
        return store_body(t, ep, acc, c);
    }
    let masks = [
        (n.min(16) as u32, 0usize),
        (n.saturating_sub(16) as u32, 16usize),
    ];
    for (i, &row) in t.rows.iter().enumerate() {
        let b = _mm512_set1_ps(ep.bias[row]);
        let at = row * t.ldc + t.cols[0];
        for &(len, off) in &masks {
            if len == 0 {
                continue;
            }
            let m: __mmask16 = if len >= 16 { 0xffff } else { (1u16 << len) - 1 };
            let v = _mm512_loadu_ps(acc[i].as_ptr().add(off));
            store_run(v, b, ep, m, c, (at + off) as isize);
        }
    }
}

/// One vector's epilogue: `bias`, the residual's lanes `run` from `at`, the activation,
/// and those lanes stored at `c[at..]`; lane j goes to `c[at + j]`, and `at` may lie
/// before the cells stored (masked-off lanes are neither read nor written).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_run(
    v: std::arch::x86_64::__m512,
    bias: std::arch::x86_64::__m512,
    ep: &Epilogue,
    run: std::arch::x86_64::__mmask16,
    c: *mut f32,
    at: isize,
) {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_ps();
    let mut v = _mm512_add_ps(v, bias);
    if let Some(r) = ep.residual.base(c) {
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(run, r.wrapping_offset(at)));
    }
    v = match ep.act {
        Act::None => v,
        Act::Relu => _mm512_max_ps(v, zero),
        Act::Relu6 => _mm512_min_ps(_mm512_max_ps(v, zero), _mm512_set1_ps(6.0)),
    };
    _mm512_mask_storeu_ps(c.wrapping_offset(at), run, v);
}

/// The epilogue of a tile with a lane mask (a flat stride-1 panel: the lanes past one
/// output row's end are followed by the next row's first column; or its kept pixels).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_lanes_avx512(t: &Tile, ep: &Epilogue, acc: &Acc, c: *mut f32, lanes: u32) {
    use std::arch::x86_64::*;
    // A flat panel of every position: its columns are consecutive, and each run of
    // lanes is stored where lane j lands at column j, by a masked store from an address
    // shifted back by the run's first lane (masked-off lanes are neither read nor
    // written, whatever their address). Compressing the lanes instead (below), at budget
    // 0.25 (one engine, the way switched pass by pass, 80 pairs, batch 1, 2 threads):
    // ResNet-18's gated `layer1` `conv2` layers (flat panels over rows of 58 lanes) took
    // 1.14 of this way's time, ResNet-50's 1.05–1.07; passes 1.007 and 0.984 (within
    // the noise).
    if let Some((runs, count)) = t.runs() {
        for (i, &row) in t.rows.iter().enumerate() {
            let b = _mm512_set1_ps(ep.bias[row]);
            let at0 = (row * t.ldc) as isize;
            for &(m, base) in &runs[..count] {
                for h in 0..2 {
                    let mh = (m >> (16 * h)) as u16;
                    if mh != 0 {
                        let v = _mm512_loadu_ps(acc[i].as_ptr().add(16 * h));
                        let at = at0 + base + 16 * h as isize;
                        store_run(v, b, ep, mh, c, at);
                    }
                }
            }
        }
        return;
    }
    // The stored lanes split into runs that go to consecutive columns: one run for a
    // flat panel of every position, one per stretch of kept pixels for a spatial plan's
    // (a kept tile's row of pixels, or several side by side). Each run's lanes are
    // compressed together, per half of the panel, and stored as one piece.
    let mut runs = [(0u32, 0usize); NR];
    let mut n = 0;
    let (mut rest, mut k) = (lanes, 0);
    while rest != 0 {
        let lane = 1u32 << rest.trailing_zeros();
        rest &= rest - 1;
        let col = t.cols[k];
        k += 1;
        if n > 0 && runs[n - 1].1 + runs[n - 1].0.count_ones() as usize == col {
            runs[n - 1].0 |= lane;
        } else {
            runs[n] = (lane, col);
            n += 1;
        }
    }
    for (i, &row) in t.rows.iter().enumerate() {
        let b = _mm512_set1_ps(ep.bias[row]);
        let (lo, hi) = (
            _mm512_loadu_ps(acc[i].as_ptr()),
            _mm512_loadu_ps(acc[i].as_ptr().add(16)),
        );
        for &(m, col) in &runs[..n] {
            let at = row * t.ldc + col;
            let (mlo, mhi) = ((m & 0xffff) as u16, (m >> 16) as u16);
            let skip = mlo.count_ones() as usize;
            if mlo != 0 {
                let run = ((1u32 << skip) - 1) as u16;
                store_run(
                    _mm512_maskz_compress_ps(mlo, lo),
                    b,
                    ep,
                    run,
                    c,
                    at as isize,
                );
            }
            if mhi != 0 {
                let run = ((1u32 << mhi.count_ones()) - 1) as u16;
                let at = (at + skip) as isize;
                store_run(_mm512_maskz_compress_ps(mhi, hi), b, ep, run, c, at);
            }
        }
    }
}

/// The epilogue's body, inlined into a copy compiled for each instruction set.
#[inline(always)]
unsafe fn store_body(t: &Tile, ep: &Epilogue, acc: &Acc, c: *mut f32) {
    // Read through a pointer: with the residual in C, it is the cell being stored.
    let res = ep.residual.base(c);
    if let Some(lanes) = t.lanes {
        // Stored lanes in order, each to the next column.
        for (i, &row) in t.rows.iter().enumerate() {
            let stored = (0..NR).filter(|&j| lanes >> j & 1 == 1);
            for (j, &col) in stored.zip(t.cols) {
                let idx = row * t.ldc + col;
                let r = res.map_or(0.0, |r| *r.add(idx));
                *c.add(idx) = ep.act.apply(acc[i][j] + ep.bias[row] + r);
            }
        }
        return;
    }
    let n = t.cols.len();
    // Dense plans give consecutive columns: store whole row segments.
    let contiguous = n > 0 && t.cols[n - 1] - t.cols[0] == n - 1;
    for (i, &row) in t.rows.iter().enumerate() {
        let b = ep.bias[row];
        let a = &acc[i][..n];
        if contiguous {
            let at = row * t.ldc + t.cols[0];
            for (j, &v) in a.iter().enumerate() {
                let r = res.map_or(0.0, |r| *r.add(at + j));
                *c.add(at + j) = v + b + r;
            }
            ep.act
                .apply_slice(std::slice::from_raw_parts_mut(c.add(at), n));
        } else {
            for (j, &col) in t.cols.iter().enumerate() {
                let idx = row * t.ldc + col;
                let r = res.map_or(0.0, |r| *r.add(idx));
                *c.add(idx) = ep.act.apply(a[j] + b + r);
            }
        }
    }
}

/// Computes one whole micro-tile: all of K, then the epilogue.
///
/// # Safety
/// As for [`accumulate`] and [`store`].
pub unsafe fn run_tile(isa: Isa, t: &Tile, ep: &Epilogue, c: *mut f32) {
    run_tile_prefetching(isa, t, ep, c, Prefetch::NONE);
}

/// [`run_tile`], prefetching `next` over its steps of K as [`accumulate_prefetching`]
/// does (AVX-512 only).
///
/// # Safety
/// As for [`accumulate`] and [`store`].
pub unsafe fn run_tile_prefetching(isa: Isa, t: &Tile, ep: &Epilogue, c: *mut f32, next: Prefetch) {
    let mut acc = [[0f32; NR]; 12];
    let finish = Finish { ep, c };
    if !accumulate_finishing(isa, t, 0, t.k, &mut acc, next, Some(finish)) {
        store(t, ep, &acc, c);
    }
}

fn portable_kernel(t: &Tile, k0: usize, k1: usize, acc: &mut Acc) {
    for (i, &row) in t.arows.iter().enumerate() {
        let a = &t.a[a_offset(row, t.ka)..];
        let out = &mut acc[i];
        for kk in k0..k1 {
            let av = a[t.kmap.map_or(kk, |m| m[kk]) * PACK];
            let at = t.boff.map_or(kk * t.ldb, |o| o[kk]);
            for (o, &b) in out.iter_mut().zip(&t.panel[at..at + t.width()]) {
                *o += av * b;
            }
        }
    }
}

/// Start of each tile row's A row (column 0), for the kernels' row-by-row path; unused
/// rows repeat the first (read, never stored).
#[inline(always)]
unsafe fn row_starts<const MR: usize>(t: &Tile) -> [*const f32; MR] {
    let base = t.a.as_ptr();
    let mut rows = [base.add(a_offset(t.arows[0], t.ka)); MR];
    for (i, &r) in t.arows.iter().enumerate() {
        rows[i] = base.add(a_offset(r, t.ka));
    }
    rows
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{row_starts, Acc, Finish, Prefetch, Tile, PACK};
    use crate::model::Act;
    use std::arch::x86_64::*;

    /// [`super::gather_tile`]: the rows of one block share its column's load, each
    /// block's rows taking their lanes of the output vector by a permutation.
    ///
    /// # Safety
    /// Every row's block lies inside `a` (`PACK · ka` values each), every channel's
    /// columns inside `ka`, and `out` holds `PACK · chans.len() · taps + 4` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gather_tile(
        a: &[f32],
        ka: usize,
        rows: &[usize],
        chans: &[usize],
        taps: usize,
        out: &mut [f32],
    ) {
        // Per block the rows lie in: its first value, the lanes it fills, and which of
        // its twelve values each lane takes.
        let mut at = [std::ptr::null::<f32>(); PACK];
        let mut lanes = [0u16; PACK];
        let mut picks = [[0i32; 16]; PACK];
        let mut n = 0;
        let mut last = usize::MAX;
        for (i, &r) in rows.iter().enumerate() {
            if r / PACK != last {
                last = r / PACK;
                at[n] = a.as_ptr().add(last * PACK * ka);
                n += 1;
            }
            lanes[n - 1] |= 1 << i;
            picks[n - 1][i] = (r % PACK) as i32;
        }
        let mut index = [_mm512_setzero_si512(); PACK];
        for (v, p) in index.iter_mut().zip(&picks[..n]) {
            *v = _mm512_loadu_si512(p.as_ptr().cast());
        }
        let mut dst = out.as_mut_ptr();
        for &c in chans {
            for col in c * taps..(c + 1) * taps {
                let mut v = _mm512_setzero_ps();
                for b in 0..n {
                    // Only the block's twelve values of the column: the last column's
                    // load ends where the block does.
                    let x = _mm512_maskz_loadu_ps(0x0fff, at[b].add(col * PACK));
                    v = _mm512_mask_permutexvar_ps(v, lanes[b], index[b], x);
                }
                _mm512_storeu_ps(dst, v);
                dst = dst.add(PACK);
            }
        }
    }

    /// 12 rows × 32 columns: 24 zmm accumulators; per k, two panel loads and one
    /// broadcast per row. A tile of at most 16 columns (the last panel of a small plane:
    /// 14×14 leaves 4) runs on half of each, and a tile of at most 8 or 4 rows (the last
    /// row tile of 64 or 128 channels) on that many rows: the rest would only multiply
    /// padding.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel(
        t: &Tile,
        k0: usize,
        k1: usize,
        out: &mut Acc,
        next: Prefetch,
        finish: Option<Finish>,
    ) -> bool {
        // A few columns past the last whole vector (a 7×7 plane's 49 = 32 + 16 + 1, a
        // 14×14 plane's last 4) run on the column kernel: a vector of the tile's rows per
        // column costs 1/12 of a vector of columns per row, which would leave 15 of its
        // 16 lanes idle. With rows spread over blocks of A (a gated layer's kept rows),
        // the kernel gathers the rows' values, which pays for a tile of at most four
        // columns but not for the one past a vector of 16 (7×7 layers' gated 1×1
        // expansions took 1.06–1.08 of their time; those of 14×14 planes 0.95–0.97).
        let n = t.width();
        let tail = if n > 16 { n - 16 } else { n };
        if tail <= COLUMNS && (t.one_block(t.rows.len()) || n <= COLUMNS) {
            if n > 16 {
                match t.rows.len() {
                    0..=4 => dispatch::<1, 4>(t, k0, k1, out, next, None),
                    5..=8 => dispatch::<1, 8>(t, k0, k1, out, next, None),
                    _ => dispatch::<1, 12>(t, k0, k1, out, next, None),
                };
            }
            let c0 = n - tail;
            match tail {
                1 => columns_of::<1>(t, k0, k1, c0, out),
                2 => columns_of::<2>(t, k0, k1, c0, out),
                3 => columns_of::<3>(t, k0, k1, c0, out),
                _ => columns_of::<4>(t, k0, k1, c0, out),
            };
            return false;
        }
        if n > 16 && t.rows.len() > HALF && t.kmap.is_some() && !t.one_block(t.rows.len()) {
            return halves(t, k0, k1, out, next, finish);
        }
        match (n <= 16, t.rows.len()) {
            (true, ..=4) => dispatch::<1, 4>(t, k0, k1, out, next, finish),
            (true, ..=8) => dispatch::<1, 8>(t, k0, k1, out, next, finish),
            (true, _) => dispatch::<1, 12>(t, k0, k1, out, next, finish),
            (false, ..=4) => dispatch::<2, 4>(t, k0, k1, out, next, finish),
            (false, ..=8) => dispatch::<2, 8>(t, k0, k1, out, next, finish),
            (false, _) => dispatch::<2, 12>(t, k0, k1, out, next, finish),
        }
    }

    /// [`super::accumulate_rows_major`]: the tile's rows and columns in the widths the
    /// packed kernel would use.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_major(t: &Tile, k0: usize, k1: usize, out: &mut Acc) {
        match (t.width() <= 16, t.rows.len()) {
            (true, ..=4) => rows_major_body::<1, 4>(t, k0, k1, out),
            (true, ..=8) => rows_major_body::<1, 8>(t, k0, k1, out),
            (true, _) => rows_major_body::<1, 12>(t, k0, k1, out),
            (false, ..=4) => rows_major_body::<2, 4>(t, k0, k1, out),
            (false, ..=8) => rows_major_body::<2, 8>(t, k0, k1, out),
            (false, _) => rows_major_body::<2, 12>(t, k0, k1, out),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn rows_major_body<const W: usize, const MR: usize>(
        t: &Tile,
        k0: usize,
        k1: usize,
        out: &mut Acc,
    ) {
        // Rows past the tile's repeat its first (read, never stored).
        let base = t.a.as_ptr();
        let mut rows = [base.add(t.arows[0] * t.ka); MR];
        for (i, &r) in t.arows.iter().enumerate() {
            rows[i] = base.add(r * t.ka);
        }
        let mut acc = [[_mm512_setzero_ps(); W]; MR];
        if k0 > 0 {
            for i in 0..t.rows.len() {
                for (w, v) in acc[i].iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(out[i].as_ptr().add(16 * w));
                }
            }
        }
        // Only the tile's columns are read (masked), so a panel read in place may end at
        // its last column, as the packed kernel's narrowest tiles allow (`panel_reads`).
        let mut masks = [0u16; W];
        for (w, m) in masks.iter_mut().enumerate() {
            let len = t.width().saturating_sub(16 * w).min(16);
            *m = if len == 16 {
                u16::MAX
            } else {
                (1u16 << len) - 1
            };
        }
        let mut b = t.panel.as_ptr().add(k0 * t.ldb);
        for kk in k0..k1 {
            let mut bv = [_mm512_setzero_ps(); W];
            for (w, v) in bv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[w], b.add(16 * w));
            }
            for i in 0..MR {
                let a = _mm512_set1_ps(*rows[i].add(kk));
                for w in 0..W {
                    acc[i][w] = _mm512_fmadd_ps(a, bv[w], acc[i][w]);
                }
            }
            b = b.add(t.ldb);
        }
        for i in 0..t.rows.len() {
            for (w, v) in acc[i].iter().enumerate() {
                _mm512_storeu_ps(out[i].as_mut_ptr().add(16 * w), *v);
            }
        }
    }

    /// Rows of each half of a tile run in two (see [`halves`]).
    const HALF: usize = 6;

    /// A tile of two vectors of columns whose rows lie anywhere in A and whose columns
    /// of A come through a map, as two tiles of at most [`HALF`] rows over the same
    /// panel. Compiled whole, that variant kept its accumulators on the stack (`perf
    /// annotate`: a spill and a reload around the multiply-adds of every step of K), and
    /// ran at 48–83 GFLOP/s where the others run at 112–113 (one thread, hot: 256 kept
    /// rows of 512, every other column of 512, K = 256); in halves at 104 (115 with
    /// K = 1152). At batch 8 and budget 0.5, ResNet-50's stride-2 3×3 layer of layer 4
    /// (a gated batch, every sample's kept columns mapped) then took 0.83 of its time.
    #[target_feature(enable = "avx512f")]
    unsafe fn halves(
        t: &Tile,
        k0: usize,
        k1: usize,
        out: &mut Acc,
        next: Prefetch,
        finish: Option<Finish>,
    ) -> bool {
        let part = |r: std::ops::Range<usize>| Tile {
            arows: &t.arows[r.clone()],
            rows: &t.rows[r],
            ..*t
        };
        let (first, second) = (part(0..HALF), part(HALF..t.rows.len()));
        let done = dispatch::<2, HALF>(&first, k0, k1, out, next, finish);
        // The second half's accumulators are rows HALF.. of the tile's.
        let mut rest: Acc = [[0f32; super::NR]; 12];
        let n = second.rows.len();
        rest[..n].copy_from_slice(&out[HALF..HALF + n]);
        let done_too = dispatch::<2, HALF>(&second, k0, k1, &mut rest, Prefetch::NONE, finish);
        out[HALF..HALF + n].copy_from_slice(&rest[..n]);
        // Whether a kernel stores depends on the columns, which the halves share.
        debug_assert_eq!(done, done_too);
        done && done_too
    }

    /// Most columns the column kernel takes: at 4 it does 4 multiply-adds per step of K
    /// where a vector of columns does 12, and with more the broadcasts would bound it.
    const COLUMNS: usize = 4;

    /// [`columns`] for this tile's column map and panel offsets.
    #[target_feature(enable = "avx512f")]
    unsafe fn columns_of<const NC: usize>(
        t: &Tile,
        k0: usize,
        k1: usize,
        c0: usize,
        out: &mut Acc,
    ) {
        match (
            t.one_block(t.rows.len()),
            t.kmap.is_some(),
            t.boff.is_some(),
        ) {
            (true, false, false) => columns::<NC, false, false, false>(t, k0, k1, c0, out),
            (true, true, false) => columns::<NC, true, false, false>(t, k0, k1, c0, out),
            (true, false, true) => columns::<NC, false, true, false>(t, k0, k1, c0, out),
            (true, true, true) => columns::<NC, true, true, false>(t, k0, k1, c0, out),
            (false, false, false) => columns::<NC, false, false, true>(t, k0, k1, c0, out),
            (false, true, false) => columns::<NC, true, false, true>(t, k0, k1, c0, out),
            (false, false, true) => columns::<NC, false, true, true>(t, k0, k1, c0, out),
            (false, true, true) => columns::<NC, true, true, true>(t, k0, k1, c0, out),
        }
    }

    /// Columns `c0..c0 + NC` of a tile whose rows lie consecutively in one packed block:
    /// per step of K, one masked load of the rows' A values and one broadcast per column.
    /// With `GATHER` the rows lie anywhere in A, and a gather at their offsets from the
    /// first row replaces the load.
    /// Four steps of K run on separate accumulators, so that a lone column is not bound
    /// by the latency of one chain of multiply-adds.
    #[target_feature(enable = "avx512f")]
    unsafe fn columns<const NC: usize, const MAPPED: bool, const OFFS: bool, const GATHER: bool>(
        t: &Tile,
        k0: usize,
        k1: usize,
        c0: usize,
        out: &mut Acc,
    ) {
        const U: usize = 4;
        let nr = t.rows.len();
        let m = ((1u32 << nr) - 1) as __mmask16;
        let a0 = t.a.as_ptr().add(super::a_offset(t.arows[0], t.ka));
        // Rows spread over blocks: each row's A value at its own offset from the first's.
        let mut offs_rows = [0i32; 16];
        if GATHER {
            let first = super::a_offset(t.arows[0], t.ka) as isize;
            for (o, &r) in offs_rows.iter_mut().zip(t.arows) {
                *o = (super::a_offset(r, t.ka) as isize - first) as i32;
            }
        }
        let vrows = _mm512_loadu_si512(offs_rows.as_ptr().cast());
        let map = t.kmap.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let offs = t.boff.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let mut acc = [[_mm512_setzero_ps(); NC]; U];
        let mut lanes = [0f32; 16];
        if k0 > 0 {
            for (j, v) in acc[0].iter_mut().enumerate() {
                for (i, l) in lanes.iter_mut().enumerate().take(nr) {
                    *l = out[i][c0 + j];
                }
                *v = _mm512_loadu_ps(lanes.as_ptr());
            }
        }
        let step = |acc: &mut [__m512; NC], kk: usize| {
            let ka = PACK * if MAPPED { *map.add(kk) } else { kk };
            let bp = if OFFS {
                t.panel.as_ptr().add(*offs.add(kk) + c0)
            } else {
                t.panel.as_ptr().add(kk * t.ldb + c0)
            };
            let av = if GATHER {
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, vrows, a0.add(ka))
            } else {
                _mm512_maskz_loadu_ps(m, a0.add(ka))
            };
            for (j, v) in acc.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(av, _mm512_set1_ps(*bp.add(j)), *v);
            }
        };
        let mut kk = k0;
        while kk + U <= k1 {
            for (u, a) in acc.iter_mut().enumerate() {
                step(a, kk + u);
            }
            kk += U;
        }
        for kk in kk..k1 {
            step(&mut acc[0], kk);
        }
        for j in 0..NC {
            let v = _mm512_add_ps(
                _mm512_add_ps(acc[0][j], acc[1][j]),
                _mm512_add_ps(acc[2][j], acc[3][j]),
            );
            _mm512_storeu_ps(lanes.as_mut_ptr(), v);
            for (i, &l) in lanes.iter().enumerate().take(nr) {
                out[i][c0 + j] = l;
            }
        }
    }

    /// The variant for this tile: one stream of A or a row each, a column map, panel rows
    /// in place, prefetching; `W` vectors of 16 columns.
    #[target_feature(enable = "avx512f")]
    unsafe fn dispatch<const W: usize, const MR: usize>(
        t: &Tile,
        k0: usize,
        k1: usize,
        out: &mut Acc,
        next: Prefetch,
        fin: Option<Finish>,
    ) -> bool {
        let pf = (!next.at.is_null() && next.blocks > 0) || !next.panel.is_null();
        match (t.one_block(MR), t.kmap.is_some(), t.boff.is_some(), pf) {
            (true, false, false, false) => {
                body::<W, MR, true, false, false, false>(t, k0, k1, out, next, fin)
            }
            (true, false, false, true) => {
                body::<W, MR, true, false, false, true>(t, k0, k1, out, next, fin)
            }
            (true, true, false, _) => {
                body::<W, MR, true, true, false, false>(t, k0, k1, out, next, fin)
            }
            (true, false, true, false) => {
                body::<W, MR, true, false, true, false>(t, k0, k1, out, next, fin)
            }
            (true, false, true, true) => {
                body::<W, MR, true, false, true, true>(t, k0, k1, out, next, fin)
            }
            (true, true, true, _) => {
                body::<W, MR, true, true, true, false>(t, k0, k1, out, next, fin)
            }
            (false, false, false, false) => {
                body::<W, MR, false, false, false, false>(t, k0, k1, out, next, fin)
            }
            (false, false, false, true) => {
                body::<W, MR, false, false, false, true>(t, k0, k1, out, next, fin)
            }
            (false, true, false, _) => {
                body::<W, MR, false, true, false, false>(t, k0, k1, out, next, fin)
            }
            (false, false, true, false) => {
                body::<W, MR, false, false, true, false>(t, k0, k1, out, next, fin)
            }
            (false, false, true, true) => {
                body::<W, MR, false, false, true, true>(t, k0, k1, out, next, fin)
            }
            (false, true, true, _) => {
                body::<W, MR, false, true, true, false>(t, k0, k1, out, next, fin)
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn body<
        const W: usize,
        const MR: usize,
        const BLOCK: bool,
        const MAPPED: bool,
        const OFFS: bool,
        const PF: bool,
    >(
        t: &Tile,
        k0: usize,
        k1: usize,
        out: &mut Acc,
        next: Prefetch,
        fin: Option<Finish>,
    ) -> bool {
        let map = t.kmap.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let offs = t.boff.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let rows = row_starts::<MR>(t);
        let a0 = rows[0];
        let mut acc = [[_mm512_setzero_ps(); W]; MR];
        if k0 > 0 {
            for i in 0..t.rows.len() {
                for (w, v) in acc[i].iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(out[i].as_ptr().add(16 * w));
                }
            }
        }
        let mut b = t.panel.as_ptr().add(k0 * t.ldb);
        for kk in k0..k1 {
            let ka = PACK * if MAPPED { *map.add(kk) } else { kk };
            let bp = if OFFS {
                t.panel.as_ptr().add(*offs.add(kk))
            } else {
                b
            };
            let mut bv = [_mm512_setzero_ps(); W];
            for (w, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bp.add(16 * w));
            }
            if PF && !next.panel.is_null() {
                let row = if OFFS { *offs.add(kk) } else { kk * t.ldb };
                let at = next.panel.wrapping_add(row);
                _mm_prefetch::<_MM_HINT_T1>(at as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(16) as *const i8);
            }
            if PF {
                let at = next.at.wrapping_add((kk - k0) * next.step);
                for b in 0..next.blocks.min(Prefetch::MAX) {
                    let from = at.wrapping_add(b * next.stride);
                    let mut off = 0;
                    while off < next.step {
                        _mm_prefetch::<_MM_HINT_T0>(from.wrapping_add(off) as *const i8);
                        off += 16;
                    }
                }
            }
            for i in 0..MR {
                let src = if BLOCK {
                    a0.add(ka + i)
                } else {
                    rows[i].add(ka)
                };
                let a = _mm512_set1_ps(*src);
                for w in 0..W {
                    acc[i][w] = _mm512_fmadd_ps(a, bv[w], acc[i][w]);
                }
            }
            b = b.add(t.ldb);
        }
        if let Some(f) = fin {
            // The epilogue straight from the registers (the caller checked that the
            // columns are consecutive): no round trip through `out`.
            // Literal row indices only: iterating over the accumulators with a run-time
            // index here (a loop too big to unroll) made the compiler keep them on the
            // stack, storing each after every multiply-add of the K loop, which more than
            // doubled whole passes (f033c4c). The rows past `MR` are compiled out.
            // What is the same for every vector is decided once per tile: the lane masks,
            // the activation as a clamp (`lo`, `hi`; none without one, so that a NaN
            // stays one), and whether a residual is added: four copies of the rows.
            // Decided per vector, with a store between each and the next, the epilogue
            // took about 10% of the kernel's samples at K = 64.
            let (n, nr) = (t.cols.len(), t.rows.len());
            let mut masks = [0u16; W];
            for (w, m) in masks.iter_mut().enumerate() {
                let len = n.saturating_sub(16 * w).min(16);
                *m = if len == 16 {
                    u16::MAX
                } else {
                    (1u16 << len) - 1
                };
            }
            let (lo, hi) = match f.ep.act {
                Act::None => (f32::NEG_INFINITY, f32::INFINITY),
                Act::Relu => (0.0, f32::INFINITY),
                Act::Relu6 => (0.0, 6.0),
            };
            let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
            let residual = f.ep.residual.base(f.c);
            let (c, c0) = (f.c, t.cols[0]);
            macro_rules! rows {
                ($add:expr, $clamp:expr; $($i:literal)*) => {$(
                    if $i < MR && $i < nr {
                        let row = t.rows[$i];
                        let bias = _mm512_set1_ps(f.ep.bias[row]);
                        let at = row * t.ldc + c0;
                        for (w, &m) in masks.iter().enumerate() {
                            let mut v = _mm512_add_ps(acc[$i][w], bias);
                            if let Some(r) = $add {
                                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r.add(at + 16 * w)));
                            }
                            if $clamp {
                                v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                            }
                            _mm512_mask_storeu_ps(c.add(at + 16 * w), m, v);
                        }
                    }
                )*};
            }
            match (residual, f.ep.act != Act::None) {
                (Some(r), true) => {
                    rows!(Some(r), true; 0 1 2 3 4 5 6 7 8 9 10 11);
                }
                (Some(r), false) => {
                    rows!(Some(r), false; 0 1 2 3 4 5 6 7 8 9 10 11);
                }
                (None, true) => {
                    rows!(None::<*const f32>, true; 0 1 2 3 4 5 6 7 8 9 10 11);
                }
                (None, false) => {
                    rows!(None::<*const f32>, false; 0 1 2 3 4 5 6 7 8 9 10 11);
                }
            }
            return true;
        }
        for i in 0..t.rows.len() {
            for (w, v) in acc[i].iter().enumerate() {
                _mm512_storeu_ps(out[i].as_mut_ptr().add(16 * w), *v);
            }
        }
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{a_offset, row_starts, Acc, Epilogue, Finish, Tile, PACK};
    use crate::model::Act;
    use std::arch::x86_64::*;

    const MR: usize = 6;
    // `tail` loads a tile's MR values of A as 4 + 2.
    const _: () = assert!(MR == 6);

    /// 6 rows × 16 columns (`half` = 0 or 16 of the panel): 12 ymm accumulators; a half
    /// with at most 8 of the tile's columns (a 56-wide row's last 24, a 7×7 plane's last
    /// 17) runs 6 × 8, since the other 8 would only multiply padding. In-process pairs of
    /// dense passes (60, one machine, 2 threads, batch 1) with and without: ResNet-18
    /// 0.956, ResNet-50 1.01, MobileNetV2 1.00 — less than the padding's share, as the
    /// 6 × 8 kernel does 7 loads per 6 multiply-adds. A half with at most [`TAIL`]
    /// columns of rows in one block runs [`tail`] instead. With `fin`, the tile's columns
    /// in this half get the epilogue from the registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(
        t: &Tile,
        k0: usize,
        k1: usize,
        half: usize,
        out: &mut Acc,
        fin: Option<Finish>,
    ) {
        let cols = t.width() - half;
        if cols <= TAIL && t.one_block(MR) {
            match cols {
                1 => tail_variant::<1, 4>(t, k0, k1, half, out, fin),
                2 => tail_variant::<2, 2>(t, k0, k1, half, out, fin),
                3 => tail_variant::<3, 2>(t, k0, k1, half, out, fin),
                _ => tail_variant::<4, 2>(t, k0, k1, half, out, fin),
            }
        } else if cols <= 8 {
            variant::<1>(t, k0, k1, half, out, fin)
        } else {
            variant::<2>(t, k0, k1, half, out, fin)
        }
    }

    /// Most columns a half runs with [`tail`].
    const TAIL: usize = 4;

    /// [`tail`] for this tile's column map and panel rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tail_variant<const C: usize, const U: usize>(
        t: &Tile,
        k0: usize,
        k1: usize,
        half: usize,
        out: &mut Acc,
        fin: Option<Finish>,
    ) {
        match (t.kmap.is_some(), t.boff.is_some()) {
            (false, false) => tail::<C, U, false, false>(t, k0, k1, half, out, fin),
            (true, false) => tail::<C, U, true, false>(t, k0, k1, half, out, fin),
            (false, true) => tail::<C, U, false, true>(t, k0, k1, half, out, fin),
            (true, true) => tail::<C, U, true, true>(t, k0, k1, half, out, fin),
        }
    }

    /// A half with at most [`TAIL`] columns, of a tile whose rows lie in one packed block:
    /// the rows are the lanes (one masked load of A's 6 values per step of K, one
    /// broadcast and one multiply-add per column), where the 6 × 8 kernel would spend 6
    /// broadcasts and 6 multiply-adds per step on 8 lanes of which this few are stored.
    /// A 7×7 plane leaves one such column per row tile (49 = 3 · 16 + 1), a 14×14 plane
    /// four (196 = 12 · 16 + 4). Each column sums `U` interleaved steps of K apart, so
    /// that `C · U` chains of multiply-adds hide their latency. In-process pairs (150,
    /// one thread, one-layer models, AVX2) against the 6 × 8 kernel: 7×7 layers 0.90–0.92
    /// of the time (1×1 320 → 1280, 3×3 512 → 512), 14×14 layers 0.99–1.00; whole
    /// passes (60 pairs, 2 threads, batch 1) ResNet-50 0.99, ResNet-18 0.98–0.99,
    /// EfficientNet-Lite0 0.98, MobileNetV2 1.00 (0.94–0.96 at budget 0.5).
    ///
    /// A's 6 values per step come in two plain loads rather than one masked load: one
    /// layer, one thread, in-process pairs (60–80 each, two to four runs), 3×3 512 → 512
    /// at 7×7 0.975–0.986 of the time, 1×1 2048 → 512 at 7×7 0.96–0.99, 512 → 2048 0.98,
    /// 160 → 960 0.986–0.994, 1024 → 256 at 14×14 0.99 (AVX2 machine of 2026-12-03).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tail<const C: usize, const U: usize, const MAPPED: bool, const OFFS: bool>(
        t: &Tile,
        k0: usize,
        k1: usize,
        half: usize,
        out: &mut Acc,
        fin: Option<Finish>,
    ) {
        let map = t.kmap.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let offs = t.boff.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let a0 = t.a.as_ptr().add(a_offset(t.arows[0], t.ka));
        let panel = t.panel.as_ptr().add(half);
        let nr = t.rows.len();
        let mut acc = [[_mm256_setzero_ps(); C]; U];
        if k0 > 0 {
            for (j, v) in acc[0].iter_mut().enumerate() {
                let mut lanes = [0f32; 8];
                for (i, l) in lanes.iter_mut().enumerate().take(nr) {
                    *l = out[i][half + j];
                }
                *v = _mm256_loadu_ps(lanes.as_ptr());
            }
        }
        let step = |kk: usize, acc: &mut [__m256; C]| {
            let ka = PACK * if MAPPED { *map.add(kk) } else { kk };
            let b = panel.add(if OFFS { *offs.add(kk) } else { kk * t.ldb });
            // The block holds MR = 6 values per step from the tile's first row
            // (`one_block`): a load of 4 and a load of 2; lanes 6 and 7 are zero.
            let p = a0.add(ka);
            let lo = _mm_loadu_ps(p);
            let hi = _mm_castpd_ps(_mm_set_sd(std::ptr::read_unaligned(p.add(4) as *const f64)));
            let a = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi);
            for (j, v) in acc.iter_mut().enumerate() {
                *v = _mm256_fmadd_ps(a, _mm256_set1_ps(*b.add(j)), *v);
            }
        };
        let mut kk = k0;
        while kk + U <= k1 {
            for (u, a) in acc.iter_mut().enumerate() {
                step(kk + u, a);
            }
            kk += U;
        }
        for k in kk..k1 {
            step(k, &mut acc[0]);
        }
        let mut sums = [[0f32; 8]; C];
        for (j, s) in sums.iter_mut().enumerate() {
            let mut v = acc[0][j];
            for a in &acc[1..] {
                v = _mm256_add_ps(v, a[j]);
            }
            _mm256_storeu_ps(s.as_mut_ptr(), v);
        }
        if let Some(f) = fin {
            let n = t.cols.len().saturating_sub(half).min(C);
            for (i, &row) in t.rows.iter().enumerate() {
                let at = row * t.ldc + t.cols[0] + half;
                for (j, s) in sums.iter().enumerate().take(n) {
                    // As `store_run`: bias, then the residual, then the activation.
                    let mut v = s[i] + f.ep.bias[row];
                    if let Some(r) = f.ep.residual.base(f.c) {
                        v += *r.add(at + j);
                    }
                    let v = match f.ep.act {
                        Act::None => v,
                        Act::Relu => relu(v),
                        Act::Relu6 => {
                            let v = relu(v);
                            if v < 6.0 {
                                v
                            } else {
                                6.0
                            }
                        }
                    };
                    *f.c.add(at + j) = v;
                }
            }
            return;
        }
        for (i, o) in out.iter_mut().enumerate().take(nr) {
            for (j, s) in sums.iter().enumerate() {
                o[half + j] = s[i];
            }
        }
    }

    /// `max(v, 0)` as `vmaxps` computes it: a NaN gives 0.
    #[inline]
    fn relu(v: f32) -> f32 {
        if v > 0.0 {
            v
        } else {
            0.0
        }
    }

    /// The variant for this tile: one stream of A or a row each, a column map, panel rows
    /// in place; `W` vectors of 8 columns, and (in [`body`]) `R` rows multiplied.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn variant<const W: usize>(
        t: &Tile,
        k0: usize,
        k1: usize,
        half: usize,
        out: &mut Acc,
        fin: Option<Finish>,
    ) {
        let one = t.one_block(MR);
        // A tile of at most 4 (or 2) rows, the last of a layer whose rows are not a
        // multiple of 6 (32 channels: 2; 16, 64, 112: 4), multiplies only those rows
        // instead of padding them to 6. One layer, one thread, in-process pairs: the
        // 3×3 stride-2 stem 3 → 32 at 224×224 0.965 of the time, 1×1 32 → 16 at 112×112
        // 0.937, 144 → 32 at 28×28 0.946, 256 → 64 at 56×56 0.995; whole passes 0.99–1.01
        // (MobileNetV2 0.990 at batch 1 and 8, EfficientNet-Lite0 0.994–1.010,
        // ResNet-50 0.999).
        if one && t.kmap.is_none() && t.rows.len() <= 4 {
            match (t.rows.len() <= 2, t.boff.is_some()) {
                (true, false) => body::<W, 2, true, false, false>(t, k0, k1, half, out, fin),
                (true, true) => body::<W, 2, true, false, true>(t, k0, k1, half, out, fin),
                (false, false) => body::<W, 4, true, false, false>(t, k0, k1, half, out, fin),
                (false, true) => body::<W, 4, true, false, true>(t, k0, k1, half, out, fin),
            }
            return;
        }
        match (one, t.kmap.is_some(), t.boff.is_some()) {
            (true, false, false) => body::<W, MR, true, false, false>(t, k0, k1, half, out, fin),
            (true, true, false) => body::<W, MR, true, true, false>(t, k0, k1, half, out, fin),
            (true, false, true) => body::<W, MR, true, false, true>(t, k0, k1, half, out, fin),
            (true, true, true) => body::<W, MR, true, true, true>(t, k0, k1, half, out, fin),
            (false, false, false) => body::<W, MR, false, false, false>(t, k0, k1, half, out, fin),
            (false, true, false) => body::<W, MR, false, true, false>(t, k0, k1, half, out, fin),
            (false, false, true) => body::<W, MR, false, false, true>(t, k0, k1, half, out, fin),
            (false, true, true) => body::<W, MR, false, true, true>(t, k0, k1, half, out, fin),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn body<
        const W: usize,
        const R: usize,
        const BLOCK: bool,
        const MAPPED: bool,
        const OFFS: bool,
    >(
        t: &Tile,
        k0: usize,
        k1: usize,
        half: usize,
        out: &mut Acc,
        fin: Option<Finish>,
    ) {
        let map = t.kmap.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let offs = t.boff.map_or(std::ptr::null(), <[usize]>::as_ptr);
        let rows = row_starts::<MR>(t);
        let a0 = rows[0];
        let mut acc = [[_mm256_setzero_ps(); W]; MR];
        if k0 > 0 {
            for i in 0..t.rows.len() {
                for (w, v) in acc[i].iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(out[i].as_ptr().add(half + 8 * w));
                }
            }
        }
        let mut b = t.panel.as_ptr().add(k0 * t.ldb + half);
        for kk in k0..k1 {
            let ka = PACK * if MAPPED { *map.add(kk) } else { kk };
            let bp = if OFFS {
                t.panel.as_ptr().add(*offs.add(kk) + half)
            } else {
                b
            };
            let mut bv = [_mm256_setzero_ps(); W];
            for (w, v) in bv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(bp.add(8 * w));
            }
            for i in 0..R {
                let src = if BLOCK {
                    a0.add(ka + i)
                } else {
                    rows[i].add(ka)
                };
                let a = _mm256_set1_ps(*src);
                for w in 0..W {
                    acc[i][w] = _mm256_fmadd_ps(a, bv[w], acc[i][w]);
                }
            }
            b = b.add(t.ldb);
        }
        if let Some(f) = fin {
            // Literal row indices, as in the AVX-512 kernel: a run-time index over the
            // accumulators would keep them on the stack through the K loop.
            let (n, nr) = (t.cols.len(), t.rows.len());
            let lens = [
                n.saturating_sub(half).min(8),
                n.saturating_sub(half + 8).min(8),
            ];
            // A whole tile (every row, every lane of the half) takes an epilogue chosen
            // once for the layer's residual and activation: no masks, no per-vector
            // tests. With small K the epilogue is a large share of a tile's time: one
            // tile of 6 × 32 in L1, repeated, took 99 ns against 116 with K = 16,
            // 152–160 against 196–212 with K = 32, 767–774 against 802–821 with K = 192
            // (two runs each). In-process pairs (60, 2 threads, batch 1): MobileNetV2
            // 0.94–0.96 of the time (0.95 at budget 0.5, 0.92–0.96 at batch 8),
            // EfficientNet-Lite0 0.97, ResNet-50 0.99–1.00, ResNet-18 1.00–1.02.
            if nr == MR && lens[W - 1] == 8 {
                let (c, bias, ldc) = (f.c, f.ep.bias.as_ptr(), t.ldc);
                let first = t.cols[0] + half;
                let zero = _mm256_setzero_ps();
                let six = _mm256_set1_ps(6.0);
                macro_rules! whole {
                    ($op:expr) => {{
                        let op = $op;
                        macro_rules! row {
                            ($i:literal) => {
                                let row = *t.rows.get_unchecked($i);
                                let b = _mm256_set1_ps(*bias.add(row));
                                let at = row * ldc + first;
                                for w in 0..W {
                                    let v = _mm256_add_ps(acc[$i][w], b);
                                    _mm256_storeu_ps(c.add(at + 8 * w), op(v, at + 8 * w));
                                }
                            };
                        }
                        row!(0);
                        row!(1);
                        row!(2);
                        row!(3);
                        row!(4);
                        row!(5);
                    }};
                }
                match (f.ep.residual.base(f.c), f.ep.act) {
                    (None, Act::None) => whole!(|v: __m256, _: usize| v),
                    (None, Act::Relu) => whole!(|v: __m256, _: usize| _mm256_max_ps(v, zero)),
                    (None, Act::Relu6) => {
                        whole!(|v: __m256, _: usize| _mm256_min_ps(_mm256_max_ps(v, zero), six))
                    }
                    (Some(r), act) => {
                        let add =
                            |v: __m256, at: usize| _mm256_add_ps(v, _mm256_loadu_ps(r.add(at)));
                        match act {
                            Act::None => whole!(add),
                            Act::Relu => {
                                whole!(|v: __m256, at: usize| _mm256_max_ps(add(v, at), zero))
                            }
                            Act::Relu6 => whole!(|v: __m256, at: usize| {
                                _mm256_min_ps(_mm256_max_ps(add(v, at), zero), six)
                            }),
                        }
                    }
                }
                return;
            }
            macro_rules! rows {
                ($($i:literal)*) => {$(
                    if $i < nr {
                        let row = t.rows[$i];
                        let bias = _mm256_set1_ps(f.ep.bias[row]);
                        let at = row * t.ldc + t.cols[0] + half;
                        for (w, &len) in lens.iter().enumerate().take(W) {
                            if len > 0 {
                                store_run(acc[$i][w], bias, f.ep, len, f.c, at + 8 * w);
                            }
                        }
                    }
                )*};
            }
            rows!(0 1 2 3 4 5);
            return;
        }
        for i in 0..t.rows.len() {
            for (w, v) in acc[i].iter().enumerate() {
                _mm256_storeu_ps(out[i].as_mut_ptr().add(half + 8 * w), *v);
            }
        }
    }

    /// Per 8-bit lane mask: the indices of its set lanes first, in order (AVX2 has no
    /// compress instruction; a permutation through this table does its work).
    static PACK_LEFT: [[i32; 8]; 256] = {
        let mut t = [[0i32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut j, mut n) = (0, 0);
            while j < 8 {
                if m >> j & 1 == 1 {
                    t[m][n] = j;
                    n += 1;
                }
                j += 1;
            }
            m += 1;
        }
        t
    };

    /// The epilogue of a tile with a lane mask whose stored lanes go to consecutive
    /// columns (a flat stride-1 panel; see `store_lanes_avx512`): each vector of 8 lanes
    /// has its stored lanes moved to the front, then they get the epilogue and are
    /// stored as one run after the ones before.
    ///
    /// # Safety
    /// As for [`super::store`], with `t.cols` consecutive and `lanes` holding as many set
    /// bits as `t.cols` has columns.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn store_lanes(t: &Tile, ep: &Epilogue, acc: &Acc, c: *mut f32, lanes: u32) {
        for (i, &row) in t.rows.iter().enumerate() {
            let b = _mm256_set1_ps(ep.bias[row]);
            let at = row * t.ldc + t.cols[0];
            let mut done = 0;
            for q in 0..4 {
                let m = (lanes >> (8 * q)) & 0xff;
                if m == 0 {
                    continue;
                }
                let v = _mm256_loadu_ps(acc[i].as_ptr().add(8 * q));
                let p = _mm256_loadu_si256(PACK_LEFT[m as usize].as_ptr().cast());
                let len = m.count_ones() as usize;
                store_run(_mm256_permutevar8x32_ps(v, p), b, ep, len, c, at + done);
                done += len;
            }
        }
    }

    /// The epilogue of a tile without a lane mask, run by run: columns that are
    /// consecutive output cells are stored as vectors of 8, the rest of each run in
    /// pieces ([`store_first`]). A spatial plan's kept tiles leave runs of 2, 4 or more
    /// cells, which the scalar epilogue stored one by one, each with its own residual
    /// and activation tests. ResNet-50 at budget 0.5 with spatial gates (2 threads,
    /// batch 1, `perf` samples): the epilogue of such tiles fell from 3.0% to 2.3% of
    /// the pass. In-process pairs (40) of whole passes with spatial gates against the
    /// scalar epilogue and masked stores: ResNet-50 0.978 of the time, ResNet-18 0.994,
    /// MobileNetV2 0.989, EfficientNet-Lite0 1.014 (dense 0.99–1.01) — about what the
    /// pieces alone gave, so the runs' own share is within the noise.
    ///
    /// # Safety
    /// As for [`super::store`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn store_runs(t: &Tile, ep: &Epilogue, acc: &Acc, c: *mut f32) {
        let cols = t.cols;
        let mut start = 0;
        while start < cols.len() {
            let mut end = start + 1;
            while end < cols.len() && cols[end] == cols[end - 1] + 1 {
                end += 1;
            }
            for (i, &row) in t.rows.iter().enumerate() {
                let bias = _mm256_set1_ps(ep.bias[row]);
                let at = row * t.ldc + cols[start];
                let src = acc[i].as_ptr().add(start);
                for o in (0..end - start).step_by(8) {
                    let len = (end - start - o).min(8);
                    // A row of `acc` holds NR values: a short last piece is loaded
                    // masked, never past the row.
                    let v = if len == 8 {
                        _mm256_loadu_ps(src.add(o))
                    } else {
                        _mm256_maskload_ps(src.add(o), first_lanes(len))
                    };
                    store_run(v, bias, ep, len, c, at + o);
                }
            }
            start = end;
        }
    }

    /// A mask of the first `len` of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn first_lanes(len: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(len as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// One vector's epilogue: `bias`, the residual's first `len` lanes from `at`, the
    /// activation, and those lanes stored at `c[at..]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_run(
        v: __m256,
        bias: __m256,
        ep: &Epilogue,
        len: usize,
        c: *mut f32,
        at: usize,
    ) {
        let zero = _mm256_setzero_ps();
        let mut v = _mm256_add_ps(v, bias);
        let m = first_lanes(len);
        if let Some(r) = ep.residual.base(c) {
            let rv = if len == 8 {
                _mm256_loadu_ps(r.add(at))
            } else {
                _mm256_maskload_ps(r.add(at), m)
            };
            v = _mm256_add_ps(v, rv);
        }
        v = match ep.act {
            Act::None => v,
            Act::Relu => _mm256_max_ps(v, zero),
            Act::Relu6 => _mm256_min_ps(_mm256_max_ps(v, zero), _mm256_set1_ps(6.0)),
        };
        if len == 8 {
            _mm256_storeu_ps(c.add(at), v);
        } else {
            store_first(v, len, c.add(at));
        }
    }

    /// Stores the first `len` (< 8) lanes of `v` at `dst` as pieces of 4, 2 and 1,
    /// rather than one masked store (`vmaskmovps`), which AMD's cores run as microcode:
    /// in-process pairs (40, 2 threads, batch 1) of ResNet-50 at budget 0.5 with
    /// spatial gates, pieces against the masked store in every partial vector of the
    /// epilogue, 0.978 of the time (ResNet-18 0.995; dense passes 0.99–1.01).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_first(v: __m256, len: usize, dst: *mut f32) {
        let (mut part, mut at) = (_mm256_castps256_ps128(v), 0);
        if len >= 4 {
            _mm_storeu_ps(dst, part);
            (part, at) = (_mm256_extractf128_ps::<1>(v), 4);
        }
        if len - at >= 2 {
            _mm_store_sd(dst.add(at) as *mut f64, _mm_castps_pd(part));
            (part, at) = (_mm_movehl_ps(part, part), at + 2);
        }
        if len > at {
            _mm_store_ss(dst.add(at), part);
        }
    }
}

/// Geometry of a convolution on one sample, for packing.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub in_c: usize,
    pub in_hw: [usize; 2],
    pub out_hw: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Top and left padding.
    pub pad_tl: [usize; 2],
}

impl ConvGeom {
    /// Rows of B: input channels × kernel taps, in the weight tensor's (ci, ky, kx) order.
    pub fn k(&self) -> usize {
        self.in_c * self.kernel[0] * self.kernel[1]
    }
}

/// Packs B for one sample: column `j` is output position `positions[j]` (y·OW + x);
/// row `(ci, ky, kx)` holds the input pixel that tap reads (0 in the padding), for the
/// `g.in_c` input channels `chans` lists (`0..g.in_c` without a list).
/// Writes `ceil(positions.len() / NR)` panels of `k × NR` into `out`.
pub fn pack_im2col(
    x: &[f32],
    g: &ConvGeom,
    chans: Option<&[usize]>,
    positions: &[usize],
    out: &mut [f32],
) {
    let k = g.k();
    for (p, cols) in positions.chunks(NR).enumerate() {
        pack_panel(x, g, chans, cols, &mut out[p * k * NR..(p + 1) * k * NR]);
    }
}

/// Packs one panel of up to [`NR`] output positions (see [`pack_im2col`]).
pub fn pack_panel(
    x: &[f32],
    g: &ConvGeom,
    chans: Option<&[usize]>,
    cols: &[usize],
    panel: &mut [f32],
) {
    let [h, w] = g.in_hw;
    let ow = g.out_hw[1];
    let plane = h * w;
    let [kh, kw] = g.kernel;
    // A 1×1, stride-1, unpadded layer's panel of consecutive positions: each row is a
    // run of its channel's plane. Through the general path below each row was a
    // `memcpy` call, which took as long as the copy.
    let n = cols.len();
    if g.kernel == [1, 1]
        && g.stride == [1, 1]
        && g.pad_tl == [0, 0]
        && n > 0
        && cols[n - 1] - cols[0] == n - 1
    {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present.
            unsafe { pack_runs_avx512(x, plane, chans, g.in_c, cols[0], n, panel) };
            return;
        }
        pack_runs(x, plane, chans, g.in_c, cols[0], n, panel);
        return;
    }
    // Top-left input pixel (before padding) each column's window starts at.
    let mut oy = [0usize; NR];
    let mut ox = [0usize; NR];
    for (j, &pos) in cols.iter().enumerate() {
        oy[j] = (pos / ow) * g.stride[0];
        ox[j] = (pos % ow) * g.stride[1];
    }
    let n = cols.len();
    let (ymin, ymax) = (
        oy[..n].iter().min().copied().unwrap_or(0),
        oy[..n].iter().max().copied().unwrap_or(0),
    );
    let (xmin, xmax) = (
        ox[..n].iter().min().copied().unwrap_or(0),
        ox[..n].iter().max().copied().unwrap_or(0),
    );
    // When no window of this panel touches the padding, taps need no bounds checks.
    let interior = ymin >= g.pad_tl[0]
        && ymax + kh <= h + g.pad_tl[0]
        && xmin >= g.pad_tl[1]
        && xmax + kw <= w + g.pad_tl[1];
    let mut base = [0usize; NR];
    if interior {
        for j in 0..n {
            base[j] = (oy[j] - g.pad_tl[0]) * w + (ox[j] - g.pad_tl[1]);
        }
    }
    // With horizontal stride 1, columns whose source pixels are consecutive form runs
    // that are copied as slices; with stride 2 (and AVX-512), runs of every other pixel
    // are copied by loading both and keeping the even lanes (`pack_even_runs_avx512`).
    let sx = g.stride[1];
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    let strided_runs = sx == 2 && avx512;
    let runs = (interior && (sx == 1 || strided_runs)).then(|| {
        let mut runs: Vec<(usize, usize)> = Vec::with_capacity(4);
        for j in 0..n {
            match runs.last_mut() {
                Some((_, end)) if *end == j && base[j] == base[j - 1] + sx => *end = j + 1,
                _ => runs.push((j, j + 1)),
            }
        }
        runs
    });
    #[cfg(target_arch = "x86_64")]
    if strided_runs {
        if let Some(runs) = &runs {
            // SAFETY: AVX-512F is present (`strided_runs`); the bounds are checked inside.
            unsafe { pack_even_runs_avx512(x, g, chans, runs, &base[..n], panel) };
            return;
        }
    }
    let mut row = 0;
    for ci in 0..g.in_c {
        let c = chans.map_or(ci, |m| m[ci]);
        let src = &x[c * plane..(c + 1) * plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = &mut panel[row * NR..(row + 1) * NR];
                if interior {
                    let off = &src[ky * w + kx..];
                    if let Some(runs) = &runs {
                        for &(j0, j1) in runs {
                            let len = j1 - j0;
                            let from = &off[base[j0]..base[j0] + sx * (len - 1) + 1];
                            // A spatial plan's kept pixels come in short runs (a 4×4
                            // tile's row: 4 values), each a `memcpy` call as a slice
                            // copy; the demo model's 64×64 layers then spent more time
                            // packing their kept pixels than multiplying. One masked
                            // load and store each instead: its passes at ratio 0.75 (kept
                            // channels and tiles) took 0.946–0.953 of their time at
                            // batch 1, 8 and 100, 0.906 at ratio 0.5 (in-process pairs).
                            if sx == 1 && avx512 && len <= 16 {
                                // SAFETY: AVX-512F is present.
                                #[cfg(target_arch = "x86_64")]
                                unsafe {
                                    copy_short(from, &mut dst[j0..j1])
                                };
                            } else {
                                // (Strided runs went to `pack_even_runs_avx512` above.)
                                debug_assert_eq!(sx, 1);
                                dst[j0..j1].copy_from_slice(from);
                            }
                        }
                    } else {
                        for j in 0..n {
                            dst[j] = off[base[j]];
                        }
                    }
                } else {
                    for j in 0..n {
                        let iy = (oy[j] + ky).wrapping_sub(g.pad_tl[0]);
                        let ix = (ox[j] + kx).wrapping_sub(g.pad_tl[1]);
                        dst[j] = if iy < h && ix < w {
                            src[iy * w + ix]
                        } else {
                            0.0
                        };
                    }
                }
                dst[n..].fill(0.0);
                row += 1;
            }
        }
    }
}

/// [`pack_panel`]'s rows for a stride-2 panel whose windows all lie inside the input:
/// each run of columns (`runs`, `(first, end)`; column `j` starts at input pixel
/// `base[j]`, every other pixel along a run) is every other value of its input row,
/// taken by two masked loads, one permute and a masked store per 16 columns, all in
/// one function. Called once per run and row, [`copy_even`] cost more than its copy:
/// ResNet-50's `layer3.0.conv2` (256 → 256 from 28 × 28, seven panels of K = 2304) spent
/// 325 µs before its tasks (padding and packing) against 1118 in them, one thread; now
/// 197. In-process pairs against the call per run, batch 1, two threads: the stride-2
/// layers (3×3 and 1×1) 0.79–0.97 of their time, passes 0.978–0.994 (ResNet-50) and
/// 0.991 (ResNet-18) dense, 0.990–0.996 at budget 0.5; 0.991–0.997 at batch 8 and on
/// one thread.
///
/// # Safety
/// AVX-512F is available. (Every read and write is checked to lie inside `x` and
/// `panel` before any is made.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_even_runs_avx512(
    x: &[f32],
    g: &ConvGeom,
    chans: Option<&[usize]>,
    runs: &[(usize, usize)],
    base: &[usize],
    panel: &mut [f32],
) {
    use super::lanes::first_lanes;
    use std::arch::x86_64::*;
    let [h, w] = g.in_hw;
    let plane = h * w;
    let [kh, kw] = g.kernel;
    let n = base.len();
    // Each run in pieces of at most 16 columns: where it goes, where it reads from (in
    // the channel's plane, before the tap's shift), and its masks.
    let mut pieces = [(0usize, 0usize, [0u16; 3]); NR];
    let mut np = 0;
    let mut last_read = 0;
    for &(j0, j1) in runs {
        for c in (j0..j1).step_by(16) {
            let m = (j1 - c).min(16);
            let at = base[j0] + 2 * (c - j0);
            pieces[np] = (c, at, evens_masks(m));
            np += 1;
            last_read = last_read.max(at + 2 * m - 1);
        }
    }
    // The last pixel any tap reads, and every row of the panel.
    assert!(last_read + (kh - 1) * w + kw - 1 <= plane);
    assert!(chans.map_or(g.in_c * plane <= x.len(), |m| m
        .iter()
        .all(|&c| (c + 1) * plane <= x.len())));
    assert!(panel.len() >= g.in_c * kh * kw * NR && n <= NR);
    let (tail_lo, tail_hi) = (!first_lanes(n), !first_lanes(n.saturating_sub(16)));
    let zero = _mm512_setzero_ps();
    let mut dst = panel.as_mut_ptr();
    for ci in 0..g.in_c {
        let c = chans.map_or(ci, |m| m[ci]);
        let src = x.as_ptr().add(c * plane);
        for ky in 0..kh {
            for kx in 0..kw {
                let off = src.add(ky * w + kx);
                // The columns past the panel's own are zero.
                _mm512_mask_storeu_ps(dst, tail_lo, zero);
                _mm512_mask_storeu_ps(dst.add(16), tail_hi, zero);
                for &(j, at, masks) in &pieces[..np] {
                    store_evens(off.add(at), masks, dst.add(j));
                }
                dst = dst.add(NR);
            }
        }
    }
}

/// `dst[j] = src[2j]` for every `j < dst.len()`; `src` holds exactly `2·dst.len() − 1`
/// values (nothing past the last one read is touched).
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn copy_even(src: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), 2 * dst.len() - 1);
    for c in (0..dst.len()).step_by(16) {
        let m = (dst.len() - c).min(16);
        store_evens(
            src.as_ptr().add(2 * c),
            evens_masks(m),
            dst.as_mut_ptr().add(c),
        );
    }
}

/// The masks of a piece of `m` (1 to 16) values taken from every other one of `2m − 1`:
/// the first and second 16 values read, and the lanes stored ([`store_evens`]).
#[cfg(target_arch = "x86_64")]
fn evens_masks(m: usize) -> [std::arch::x86_64::__mmask16; 3] {
    use super::lanes::first_lanes;
    let need = 2 * m - 1;
    [
        first_lanes(need),
        first_lanes(need.saturating_sub(16)),
        first_lanes(m),
    ]
}

/// One piece of [`copy_even`]: the values at even offsets from `s`, read under the first
/// two `masks` (nothing outside them is touched), stored at `dst` under the third.
///
/// # Safety
/// AVX-512F is available; the masked lanes lie inside what `s` and `dst` point into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_evens(
    s: *const f32,
    [lo, hi, st]: [std::arch::x86_64::__mmask16; 3],
    dst: *mut f32,
) {
    use std::arch::x86_64::*;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let a = _mm512_maskz_loadu_ps(lo, s);
    let b = _mm512_maskz_loadu_ps(hi, s.wrapping_add(16));
    _mm512_mask_storeu_ps(dst, st, _mm512_permutex2var_ps(a, even, b));
}

/// `dst.copy_from_slice(src)` for at most 16 values, as one masked load and store.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_short(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(src.len() == dst.len() && dst.len() <= 16);
    let m = ((1u32 << dst.len()) - 1) as __mmask16;
    _mm512_mask_storeu_ps(dst.as_mut_ptr(), m, _mm512_maskz_loadu_ps(m, src.as_ptr()));
}

/// [`pack_panel`] for a 1×1, stride-1, unpadded layer and `n` (at most [`NR`])
/// consecutive positions from `col0`: row `ci` is `n` values of input channel `c` (the
/// `ci`-th of `chans`, or `ci`) from `col0`, then zeros.
fn pack_runs(
    x: &[f32],
    plane: usize,
    chans: Option<&[usize]>,
    in_c: usize,
    col0: usize,
    n: usize,
    panel: &mut [f32],
) {
    for ci in 0..in_c {
        let c = chans.map_or(ci, |m| m[ci]);
        let dst = &mut panel[ci * NR..(ci + 1) * NR];
        dst[..n].copy_from_slice(&x[c * plane + col0..][..n]);
        dst[n..].fill(0.0);
    }
}

/// [`pack_runs`] by two masked loads and two stores per row, which read nothing past
/// the row's `n` values.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_runs_avx512(
    x: &[f32],
    plane: usize,
    chans: Option<&[usize]>,
    in_c: usize,
    col0: usize,
    n: usize,
    panel: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(n <= NR && col0 + n <= plane && panel.len() >= in_c * NR);
    let first_lanes = super::lanes::first_lanes;
    let (lo, hi) = (first_lanes(n), first_lanes(n.saturating_sub(16)));
    for ci in 0..in_c {
        let c = chans.map_or(ci, |m| m[ci]);
        assert!((c + 1) * plane <= x.len());
        let src = x.as_ptr().add(c * plane + col0);
        let dst = panel.as_mut_ptr().add(ci * NR);
        _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(lo, src));
        // (`wrapping_add`: with n ≤ 16 that address may lie past `x`; nothing is read.)
        _mm512_storeu_ps(dst.add(16), _mm512_maskz_loadu_ps(hi, src.wrapping_add(16)));
    }
}

/// Number of f32 a packed B for `n` columns and `k` rows needs.
pub fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(NR) * k * NR
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::index::sample;
    use rand::Rng;

    use super::super::test_isas as isas;

    #[test]
    fn a_gathered_tile_is_its_rows_kept_columns_in_one_block() {
        // Rows from one block, two, or spread over many, fewer than a block; every
        // channel, a few, none; one tap and nine; lanes past the rows are zero.
        let mut rng = super::super::fresh_rng();
        for _ in 0..60 {
            let rows_total = rng.random_range(1..80);
            let cin = rng.random_range(1..40);
            let taps = [1, 9][rng.random_range(0..2)];
            let ka = cin * taps;
            let w: Vec<f32> = (0..rows_total * ka).map(|_| rng.random()).collect();
            let a = pack_a(&w, rows_total, ka);
            let count = rng.random_range(1..=rows_total.min(PACK));
            let mut rows: Vec<usize> = sample(&mut rng, rows_total, count).into_vec();
            rows.sort_unstable();
            let kept = rng.random_range(0..=cin);
            let mut chans: Vec<usize> = sample(&mut rng, cin, kept).into_vec();
            chans.sort_unstable();
            let k = kept * taps;
            let mut out = vec![f32::NAN; PACK * k + GATHER_SLACK];
            if !gather_tile(Isa::detect(), &a, ka, &rows, &chans, taps, &mut out) {
                assert!(
                    out.iter().all(|v| v.is_nan()),
                    "nothing written without AVX-512"
                );
                continue;
            }
            for (kk, col) in chans
                .iter()
                .flat_map(|&c| c * taps..(c + 1) * taps)
                .enumerate()
            {
                for i in 0..PACK {
                    let want = rows.get(i).map_or(0.0, |&r| w[r * ka + col]);
                    assert_eq!(
                        out[kk * PACK + i],
                        want,
                        "rows {rows:?} of {rows_total}, channels {chans:?} × {taps}, column {kk}, lane {i}"
                    );
                }
            }
        }
    }

    /// Tiles of rows spread anywhere in an A stored row by row, over panels of every
    /// width (the last column of a panel read in place at the end of its buffer: only
    /// the tile's columns may be read), with K split in two blocks at a random step;
    /// against a naive sum. Where the CPU has no AVX-512 the call must say so.
    #[test]
    fn tiles_over_weights_stored_row_by_row_match_a_naive_sum() {
        let mut rng = super::super::fresh_rng();
        if Isa::detect() != Isa::Avx512 {
            let t = Tile {
                a: &[0.0],
                ka: 1,
                arows: &[0],
                kmap: None,
                boff: None,
                k: 1,
                rows: &[0],
                panel: &[0.0; NR],
                ldb: NR,
                ldc: 1,
                cols: &[0],
                lanes: None,
            };
            let mut acc = [[0f32; NR]; 12];
            assert!(!unsafe { accumulate_rows_major(Isa::detect(), &t, 0, 1, &mut acc) });
            return;
        }
        for case in 0..300 {
            let (m, ka) = (rng.random_range(1..60), rng.random_range(1..300));
            let k = rng.random_range(1..=ka);
            let width = rng.random_range(1..=NR);
            let nrows = rng.random_range(1..=12.min(m));
            let mut arows = sample(&mut rng, m, nrows).into_vec();
            arows.sort_unstable();
            let a: Vec<f32> = (0..m * ka).map(|_| rng.random_range(-1.0..1.0)).collect();
            // Panel rows `ldb` apart, the last one ending with the buffer.
            let ldb = rng.random_range(width..=width + 40);
            let panel: Vec<f32> = (0..(k - 1) * ldb + width)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let cols: Vec<usize> = (0..width).collect();
            let t = Tile {
                a: &a,
                ka,
                arows: &arows,
                kmap: None,
                boff: None,
                k,
                rows: &arows,
                panel: &panel,
                ldb,
                ldc: 1,
                cols: &cols,
                lanes: None,
            };
            let split = rng.random_range(0..=k);
            let mut acc = [[f32::NAN; NR]; 12];
            // SAFETY: `a` holds m rows of ka values, arows < m, k ≤ ka; the panel holds
            // (k - 1) · ldb + width values and the kernel reads only the tile's columns.
            unsafe {
                assert!(accumulate_rows_major(Isa::Avx512, &t, 0, split, &mut acc));
                assert!(accumulate_rows_major(Isa::Avx512, &t, split, k, &mut acc));
            }
            for (i, &r) in arows.iter().enumerate() {
                for j in 0..width {
                    let want: f32 = (0..k).map(|kk| a[r * ka + kk] * panel[kk * ldb + j]).sum();
                    let got = acc[i][j];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "case {case}: row {r} column {j}: {got} vs {want} (K {k} of {ka}, split {split})"
                    );
                }
            }
        }
    }

    #[test]
    fn stride_2_panels_pack_as_their_windows_values() {
        // Planes wide enough that most panels' windows lie inside the input (packed as
        // runs of every other pixel on AVX-512), the edges' panels through the bounds
        // checks; every position or a spatial plan's spread ones; all channels or some.
        let mut rng = super::super::fresh_rng();
        for _ in 0..120 {
            let k = [1, 3, 5, 7][rng.random_range(0..4)];
            let pad = rng.random_range(0..=k / 2);
            let in_hw = [rng.random_range(k..k + 40), rng.random_range(k..k + 70)];
            let out_hw = [
                (in_hw[0] + 2 * pad - k) / 2 + 1,
                (in_hw[1] + 2 * pad - k) / 2 + 1,
            ];
            let g = ConvGeom {
                in_c: rng.random_range(1..6),
                in_hw,
                out_hw,
                kernel: [k, k],
                stride: [2, 2],
                pad_tl: [pad, pad],
            };
            let plane = in_hw[0] * in_hw[1];
            let x: Vec<f32> = (0..g.in_c * plane)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let chans: Option<Vec<usize>> = rng
                .random_bool(0.5)
                .then(|| (0..g.in_c).filter(|_| rng.random_bool(0.6)).collect());
            let kept = chans.as_ref().map_or(g.in_c, Vec::len);
            let gk = ConvGeom { in_c: kept, ..g };
            let n = out_hw[0] * out_hw[1];
            let cols: Vec<usize> = if rng.random_bool(0.7) {
                let p = rng.random_range(0..n.div_ceil(NR));
                (p * NR..(p * NR + NR).min(n)).collect()
            } else {
                let mut c: Vec<usize> = (0..n).filter(|_| rng.random_bool(0.3)).collect();
                c.truncate(NR);
                c
            };
            let mut got = vec![f32::NAN; kept * k * k * NR];
            pack_panel(&x, &gk, chans.as_deref(), &cols, &mut got);
            let mut row = 0;
            for ci in 0..kept {
                let c = chans.as_ref().map_or(ci, |m| m[ci]);
                for ky in 0..k {
                    for kx in 0..k {
                        for j in 0..NR {
                            let want = cols.get(j).map_or(0.0, |&pos| {
                                let iy = (pos / out_hw[1] * 2 + ky).wrapping_sub(pad);
                                let ix = (pos % out_hw[1] * 2 + kx).wrapping_sub(pad);
                                if iy < in_hw[0] && ix < in_hw[1] {
                                    x[c * plane + iy * in_hw[1] + ix]
                                } else {
                                    0.0
                                }
                            });
                            assert_eq!(
                                got[row * NR + j],
                                want,
                                "{g:?} chans {chans:?} cols {cols:?}: row {row} column {j}"
                            );
                        }
                        row += 1;
                    }
                }
            }
        }
    }

    /// A 1×1 panel of consecutive positions, packed by each way this CPU has: row `ci`
    /// holds its channel's values from the first position, then zeros, up to the plane's
    /// last value (a run that ends with the input), with and without a channel list.
    #[test]
    fn runs_of_a_1x1_panel_pack_as_their_channels_values() {
        let mut rng = super::super::fresh_rng();
        for case in 0..200 {
            let plane = rng.random_range(1..80);
            let cin = rng.random_range(1..12);
            let n = rng.random_range(1..=NR.min(plane));
            let col0 = if rng.random_bool(0.3) {
                plane - n
            } else {
                rng.random_range(0..=plane - n)
            };
            let x: Vec<f32> = (0..cin * plane).map(|i| i as f32 + 1.0).collect();
            let kept = rng.random_range(1..=cin);
            let list: Vec<usize> = sample(&mut rng, cin, kept).into_vec();
            let chans = rng.random_bool(0.5).then_some(&list[..]);
            let rows = chans.map_or(cin, <[usize]>::len);
            let mut want = vec![0f32; rows * NR];
            for ci in 0..rows {
                let c = chans.map_or(ci, |m| m[ci]);
                for j in 0..n {
                    want[ci * NR + j] = x[c * plane + col0 + j];
                }
            }
            let mut got = vec![f32::NAN; rows * NR];
            pack_runs(&x, plane, chans, rows, col0, n, &mut got);
            assert_eq!(got, want, "case {case}: portable");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut got = vec![f32::NAN; rows * NR];
                // SAFETY: AVX-512F is present.
                unsafe { pack_runs_avx512(&x, plane, chans, rows, col0, n, &mut got) };
                assert_eq!(got, want, "case {case}: AVX-512");
            }
        }
    }

    /// Tiles with random lane masks: the j-th stored lane's value, with the epilogue,
    /// lands at the j-th column, and no other cell is written; every kernel and store
    /// this CPU runs.
    #[test]
    fn masked_lanes_store_each_stored_lane_at_its_column() {
        let mut rng = super::super::fresh_rng();
        for _ in 0..200 {
            let m = rng.random_range(1..=30);
            let k = rng.random_range(1..100);
            let a: Vec<f32> = (0..packed_a_len(m, k))
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let panel: Vec<f32> = (0..k * NR).map(|_| rng.random_range(-1.0..1.0)).collect();
            // Any mask, or one to four runs of lanes (a flat panel crossing row ends;
            // up to `MAX_RUNS` the AVX-512 store writes each with one shifted mask).
            let lanes: u32 = if rng.random_bool(0.5) {
                rng.random_range(1..=u32::MAX)
            } else {
                let runs = rng.random_range(1..=4);
                let mut ends = sample(&mut rng, NR + 1, 2 * runs).into_vec();
                ends.sort_unstable();
                ends.chunks_exact(2)
                    .map(|e| (e[0]..e[1]).fold(0u32, |m, j| m | 1 << j))
                    .fold(0, |m, r| m | r)
            };
            if lanes == 0 {
                continue;
            }
            let stored = lanes.count_ones() as usize;
            let ldc = rng.random_range(stored..stored + 40);
            // Consecutive columns (a flat panel of every position), or ascending ones
            // with gaps (a spatial plan's kept pixels).
            let cols: Vec<usize> = if rng.random_bool(0.5) {
                let start = rng.random_range(0..=ldc - stored);
                (start..start + stored).collect()
            } else {
                let mut cols = sample(&mut rng, ldc, stored).into_vec();
                cols.sort_unstable();
                cols
            };
            let bias: Vec<f32> = (0..m).map(|_| rng.random_range(-1.0..1.0)).collect();
            let res: Vec<f32> = (0..m * ldc).map(|_| rng.random_range(-1.0..1.0)).collect();
            let residual = rng.random_bool(0.5).then_some(res.as_slice());
            let act = [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)];
            let ep = Epilogue {
                bias: &bias,
                residual: residual.into(),
                act,
            };
            for isa in isas() {
                let kept = rng.random_range(1..=m.min(isa.mr()));
                let mut rows = sample(&mut rng, m, kept).into_vec();
                rows.sort_unstable();
                let tile = Tile {
                    a: &a,
                    ka: k,
                    arows: &rows,
                    kmap: None,
                    boff: None,
                    k,
                    rows: &rows,
                    panel: &panel,
                    ldb: NR,
                    ldc,
                    cols: &cols,
                    lanes: Some(lanes),
                };
                let mut want = [[0f32; NR]; 12];
                portable_kernel(&tile, 0, k, &mut want);
                let mut c = vec![f32::NAN; m * ldc];
                unsafe { run_tile(isa, &tile, &ep, c.as_mut_ptr()) };
                for (i, &row) in rows.iter().enumerate() {
                    let stored = (0..NR).filter(|&j| lanes >> j & 1 == 1);
                    for (lane, &col) in stored.zip(&cols) {
                        let idx = row * ldc + col;
                        let r = residual.map_or(0.0, |r| r[idx]);
                        let w = act.apply(want[i][lane] + bias[row] + r);
                        let g = c[idx];
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{isa:?} lanes {lanes:#x} row {row} lane {lane}: {g} vs {w}"
                        );
                        c[idx] = f32::NAN;
                    }
                }
                assert!(c.iter().all(|v| v.is_nan()), "{isa:?}: wrote outside");
            }
        }
    }

    /// Every tile width 1..=NR, rows consecutive in a block or spread, A columns mapped
    /// or not, panel rows packed or at offsets, K run in two blocks: every kernel's
    /// accumulators equal the portable kernel's (the column kernel takes the widths just
    /// past a whole vector).
    #[test]
    fn every_tile_width_matches_the_portable_kernel() {
        let mut rng = super::super::fresh_rng();
        for _ in 0..40 {
            let m = rng.random_range(1..=30);
            let k = rng.random_range(1..300);
            let mapped = rng.random_bool(0.5);
            let ka = if mapped {
                k + rng.random_range(0..20)
            } else {
                k
            };
            let a: Vec<f32> = (0..packed_a_len(m, ka))
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let kmap: Vec<usize> = sample(&mut rng, ka, k).into_vec();
            let offsets = rng.random_bool(0.5);
            let boff: Vec<usize> = (0..k).map(|_| rng.random_range(0..5 * NR)).collect();
            let panel: Vec<f32> = (0..k * NR + 5 * NR)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            for n in 1..=NR {
                let rows: Vec<usize> = if rng.random_bool(0.6) {
                    let f = rng.random_range(0..m);
                    let len = rng.random_range(1..=(PACK - f % PACK).min(m - f));
                    (f..f + len).collect()
                } else {
                    let kept = rng.random_range(1..=m.min(12));
                    let mut r = sample(&mut rng, m, kept).into_vec();
                    r.sort_unstable();
                    r
                };
                let cols: Vec<usize> = (0..n).collect();
                let mid = rng.random_range(0..=k);
                for isa in isas() {
                    if rows.len() > isa.mr() {
                        continue;
                    }
                    let tile = Tile {
                        a: &a,
                        ka,
                        arows: &rows,
                        kmap: mapped.then_some(&kmap[..]),
                        boff: offsets.then_some(&boff[..]),
                        k,
                        rows: &rows,
                        panel: &panel,
                        ldb: NR,
                        ldc: NR,
                        cols: &cols,
                        lanes: None,
                    };
                    let mut want = [[0f32; NR]; 12];
                    portable_kernel(&tile, 0, k, &mut want);
                    let mut got = [[f32::NAN; NR]; 12];
                    unsafe {
                        accumulate(isa, &tile, 0, mid, &mut got);
                        accumulate(isa, &tile, mid, k, &mut got);
                    }
                    for i in 0..rows.len() {
                        for j in 0..n {
                            let (g, w) = (got[i][j], want[i][j]);
                            assert!(
                                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "{isa:?} m {m} k {k} n {n} rows {rows:?} cell ({i}, {j}): {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Direct convolution of one output cell over the input channels `chans`, the
    /// reference.
    fn naive(x: &[f32], w: &[f32], g: &ConvGeom, chans: &[usize], co: usize, pos: usize) -> f32 {
        let [h, wd] = g.in_hw;
        let (oy, ox) = (pos / g.out_hw[1], pos % g.out_hw[1]);
        let mut acc = 0.0;
        for &ci in chans {
            for ky in 0..g.kernel[0] {
                for kx in 0..g.kernel[1] {
                    let iy = (oy * g.stride[0] + ky) as isize - g.pad_tl[0] as isize;
                    let ix = (ox * g.stride[1] + kx) as isize - g.pad_tl[1] as isize;
                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                        let wi = ((co * g.in_c + ci) * g.kernel[0] + ky) * g.kernel[1] + kx;
                        acc += w[wi] * x[(ci * h + iy as usize) * wd + ix as usize];
                    }
                }
            }
        }
        acc
    }

    /// Random convolutions, random subsets of output channels, input channels and
    /// positions (as a sparse plan would give), every kernel this CPU runs: kept cells
    /// equal the direct convolution over the kept inputs with the epilogue applied, and no
    /// other cell is written.
    #[test]
    fn tiles_match_direct_convolution_on_random_subsets() {
        let mut rng = super::super::fresh_rng();
        for _ in 0..60 {
            let kernel = [[1, 1], [3, 3], [5, 5], [7, 7], [1, 3]][rng.random_range(0..5)];
            let stride = [rng.random_range(1..=2); 2];
            let pad_tl = [
                rng.random_range(0..=kernel[0] / 2),
                rng.random_range(0..=kernel[1] / 2),
            ];
            let in_hw = [
                rng.random_range(kernel[0]..kernel[0] + 12),
                rng.random_range(kernel[1]..kernel[1] + 12),
            ];
            let out_hw = [
                (in_hw[0] + 2 * pad_tl[0] - kernel[0]) / stride[0] + 1,
                (in_hw[1] + 2 * pad_tl[1] - kernel[1]) / stride[1] + 1,
            ];
            let g = ConvGeom {
                in_c: rng.random_range(1..20),
                in_hw,
                out_hw,
                kernel,
                stride,
                pad_tl,
            };
            let m = rng.random_range(1..40);
            let n = out_hw[0] * out_hw[1];
            let lda = g.k();
            let x: Vec<f32> = (0..g.in_c * in_hw[0] * in_hw[1])
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let w: Vec<f32> = (0..m * lda).map(|_| rng.random_range(-1.0..1.0)).collect();
            // Input channels: all (A's columns in order), or a subset read through a map.
            let chans: Vec<usize> = if rng.random_bool(0.5) {
                (0..g.in_c).collect()
            } else {
                let kept = rng.random_range(1..=g.in_c);
                let mut c = sample(&mut rng, g.in_c, kept).into_vec();
                c.sort_unstable();
                c
            };
            let mapped = chans.len() < g.in_c;
            let taps = g.kernel[0] * g.kernel[1];
            let kmap: Vec<usize> = chans
                .iter()
                .flat_map(|&c| (0..taps).map(move |t| c * taps + t))
                .collect();
            let gk = ConvGeom {
                in_c: chans.len(),
                ..g
            };
            let k = gk.k();
            let bias: Vec<f32> = (0..m).map(|_| rng.random_range(-1.0..1.0)).collect();
            let res: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            // All rows (whole packed blocks), or a plan's kept rows.
            let kept = if rng.random_bool(0.3) {
                m
            } else {
                rng.random_range(1..=m)
            };
            let mut rows = sample(&mut rng, m, kept).into_vec();
            rows.sort_unstable();
            let kept = rng.random_range(1..=n);
            let mut cols = sample(&mut rng, n, kept).into_vec();
            cols.sort_unstable();
            let act = [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)];
            // No residual, one apart, or one already in C (every cell starts as it).
            let (residual, in_out) = match rng.random_range(0..3) {
                0 => (Residual::None, None),
                1 => (Residual::Apart(&res), Some(&res[..])),
                _ => (Residual::InOut, Some(&res[..])),
            };
            let mut packed = vec![f32::NAN; packed_len(cols.len(), k)];
            pack_im2col(&x, &gk, mapped.then_some(&chans[..]), &cols, &mut packed);
            // A packed whole (tiles map kept columns), or the kept input channels'
            // columns copied into a compact A (tiles read it in order).
            let whole = pack_a(&w, m, lda);
            let (a, ka, kmap) = if mapped && rng.random_bool(0.5) {
                let mut a = vec![f32::NAN; packed_a_len(m, k)];
                pack_a_channels(&whole, lda, &chans, taps, &mut a);
                (a, k, None)
            } else {
                (whole, lda, mapped.then_some(kmap))
            };
            for isa in isas() {
                let mut c = match residual {
                    Residual::InOut => res.clone(),
                    _ => vec![0f32; m * n],
                };
                let ep = Epilogue {
                    bias: &bias,
                    residual,
                    act,
                };
                for (p, pc) in cols.chunks(NR).enumerate() {
                    for rb in rows.chunks(isa.mr()) {
                        let tile = Tile {
                            a: &a,
                            ka,
                            arows: rb,
                            kmap: kmap.as_deref(),
                            boff: None,
                            k,
                            rows: rb,
                            panel: &packed[p * k * NR..(p + 1) * k * NR],
                            ldb: NR,
                            ldc: n,
                            cols: pc,
                            lanes: None,
                        };
                        unsafe { run_tile(isa, &tile, &ep, c.as_mut_ptr()) };
                    }
                }
                for co in 0..m {
                    for pos in 0..n {
                        let got = c[co * n + pos];
                        if rows.binary_search(&co).is_ok() && cols.binary_search(&pos).is_ok() {
                            let r = in_out.map_or(0.0, |r| r[co * n + pos]);
                            let want = act.apply(naive(&x, &w, &g, &chans, co, pos) + bias[co] + r);
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{isa:?} {g:?}: {got} vs {want}"
                            );
                        } else {
                            // Untouched: zero, or the residual C held.
                            let was = match residual {
                                Residual::InOut => res[co * n + pos],
                                _ => 0.0,
                            };
                            assert_eq!(got, was, "{isa:?}: wrote a cell outside the plan");
                        }
                    }
                }
            }
        }
    }
}
