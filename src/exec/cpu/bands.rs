//! A 1×1 expansion and the depthwise convolution that reads it, run together band by
//! band of output rows. In an inverted-residual block the expanded value is the largest
//! of the network (MobileNetV2's second block: 96 × 112 × 112 floats, 4.8 MB): written
//! whole, then read back whole, it goes to L3 and back, and the 1×1 layer's stores land
//! in 96 planes at once. Band by band, each band's expanded rows are written into a
//! buffer that stays in the core's L2, and the depthwise kernel reads them there.
//!
//! Each task takes a run of consecutive bands of one sample. Neighbouring bands share
//! input rows (one for a stride-2 3×3 window, two for stride 1): a task keeps the rows
//! the next band shares instead of computing them again, so only the first band of a
//! task computes rows another task computes too.

use std::ops::Range;

use rayon::prelude::*;

use super::depthwise::{Plan, PlaneIo};
use super::gemm::{self, Acc, Epilogue, Isa, OutPtr, Prefetch, Tile, KC, NR};
use super::ops::Window;
use super::pool::{Buf, BufferPool};
use crate::model::Act;

/// Expanded rows a band holds at most, in bytes: half of a core's 1 MiB L2, which also
/// holds the band's input rows and the depthwise output. Measured in one process,
/// alternating pass by pass with the layers run one after the other (150 pairs), the
/// banded pairs of MobileNetV2 took 0.70 of their time at 256 KiB and 512 KiB, 0.79 at
/// 384 KiB (a louder minute), 0.86 at 768 KiB; EfficientNet-Lite0's 0.79 at 256 KiB,
/// 0.72 at 512 KiB, 0.81 at 1 MiB.
pub const BAND_BYTES: usize = 512 << 10;

/// Expanded values per sample (bytes) from which a pair whose depthwise layer has the
/// window `win` runs in bands: the 112 × 112 stage (MobileNetV2 and EfficientNet-Lite0:
/// 96 channels, 4.8 MB; 0.47 of the time for MobileNetV2's second block), and from the
/// 56 × 56 stage (144 channels, 1.8 MB, which L3 holds between the layers) a 3×3 window.
/// There, on the Zen 5 EPYC (one engine each way, in-process pairs, 2 threads; 200 at
/// batch 1, 30–40 at batch 8), MobileNetV2's stride-1 `features.3` pair took 0.65 and
/// 0.87 of its time in two runs and EfficientNet-Lite0's `_blocks.2` 0.66 and 0.84;
/// passes 0.982 (MobileNetV2) and 0.973 (Lite0) at batch 1, 0.991 and 0.989 at batch 8,
/// 0.983 and 0.991 at budget 0.5. MobileNetV2's stride-2 `features.4` pair, once its
/// depthwise strips were 128 KiB and its nine groups split over both threads: 0.93 of
/// its time, passes 0.992 and 0.999 at batch 1, 0.986 and 0.990 at batch 8, 0.987 at
/// budget 0.5 and 0.988 at batch 8 (before those, 0.988 and 1.014 at batch 1 and 8). Not
/// a 5×5 window of stride 2 (Lite0, 1.34 on an earlier machine), nor at 28 × 28
/// (MobileNetV2's 192 channels, 0.60 MB: the pairs unchanged, 0.052 against 0.052 ms).
pub fn min_expanded_bytes(win: &Window) -> usize {
    if win.kernel == [3, 3] {
        1 << 20
    } else {
        2 << 20
    }
}

/// The bands of one expansion–depthwise pair, worked out when the model is loaded.
pub struct Bands {
    /// Expanded channels.
    chans: usize,
    /// The expansion's input channels.
    k: usize,
    /// The depthwise layer's window over the whole plane.
    win: Window,
    bands: Vec<Band>,
    /// Most input rows a band reads.
    cap: usize,
}

/// Output rows of the depthwise layer, the input rows they read, and the depthwise plan
/// for that part of the plane.
struct Band {
    out: Range<usize>,
    rows: Range<usize>,
    plan: Plan,
}

/// One sample's expansion: the expanded channels it computes (ascending; the depthwise
/// layer computes the same ones and leaves the other output planes unwritten), and the
/// expansion's operands for them.
#[derive(Clone, Copy)]
pub struct Sample<'a> {
    /// Expanded channels computed.
    pub rows: &'a [usize],
    /// Expansion weights packed ([`gemm::pack_a`]) over the input channels read, rows
    /// at their own indices.
    pub weight: &'a [f32],
    /// The input channels read, when not all: panel row `kk` is channel `chans[kk]`.
    pub chans: Option<&'a [usize]>,
    /// One per expanded channel.
    pub bias: &'a [f32],
    /// Per channel, subtracted from the depthwise output (see
    /// [`crate::exec::gating::DroppedConstants`]).
    pub shift: Option<&'a [f32]>,
}

/// The depthwise layer's operands: `chans` kernels of kh × kw, bias, activation.
#[derive(Clone, Copy)]
pub struct Depthwise<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub act: Act,
}

impl Bands {
    /// Bands for an expansion of `k` input channels to `chans` channels read by a
    /// depthwise layer of window `win`, each holding at most `bytes` of expanded rows (at
    /// least one output row; [`BAND_BYTES`] in the engine), its depthwise planes in
    /// strips of `strip_bytes` (`Tuning::depthwise_strip_bytes`).
    pub fn holding(chans: usize, k: usize, win: Window, bytes: usize, strip_bytes: usize) -> Bands {
        let [h, w] = win.in_hw;
        let [oh, _] = win.out_hw;
        let (kh, sy, pad) = (win.kernel[0], win.stride[0], win.pad_tl[0]);
        let row_bytes = chans * w * std::mem::size_of::<f32>();
        let fits = |n: usize| ((n - 1) * sy + kh) * row_bytes <= bytes;
        let height = (1..=oh.max(1)).take_while(|&n| fits(n)).last().unwrap_or(1);
        // Bands of equal heights (within a row), so that runs of them are equal too: at
        // most `height` rows, 56 rows as 12 bands of 4 or 5 rows rather than 11 of 5 and
        // one of 1, whose run of three bands (11 rows against 15) left a thread idle for
        // a fifteenth of MobileNetV2's banded layer.
        let nb = oh.div_ceil(height);
        let bands: Vec<Band> = (0..nb)
            .map(|i| {
                let (y0, y1) = (i * oh / nb, (i + 1) * oh / nb);
                let first = (y0 * sy).saturating_sub(pad).min(h);
                let last = ((y1 - 1) * sy + kh).saturating_sub(pad).min(h);
                // Input row `first` is the band's row 0: output row y0 reads rows from
                // y0 · sy − pad, which lies `pad + first − y0 · sy` rows above it.
                let plan = Plan::new(
                    Window {
                        in_hw: [last - first, w],
                        out_hw: [y1 - y0, win.out_hw[1]],
                        pad_tl: [pad + first - y0 * sy, win.pad_tl[1]],
                        ..win
                    },
                    strip_bytes,
                );
                Band {
                    out: y0..y1,
                    rows: first..last,
                    plan,
                }
            })
            .collect();
        let cap = bands.iter().map(|b| b.rows.len()).max().unwrap_or(0);
        Bands {
            chans,
            k,
            win,
            bands,
            cap,
        }
    }

    /// Expands `x` (`batch × k × H × W`) with activation `act`, each sample as
    /// `samples` says, and runs the depthwise layer on it into `out` (`batch × chans × OH
    /// × OW`; every computed channel's plane written). `index` holds 0, 1, … up to at
    /// least the channel count and `H × W` (row and column indices for the tiles); band
    /// buffers come from `pool`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        isa: Isa,
        x: &[f32],
        samples: &[Sample],
        act: Act,
        dw: Depthwise,
        out: &mut [f32],
        index: &[usize],
        pool: &BufferPool,
    ) {
        let batch = samples.len();
        let [h, w] = self.win.in_hw;
        let [oh, ow] = self.win.out_hw;
        let (plane, out_plane) = (h * w, oh * ow);
        assert_eq!(x.len(), batch * self.k * plane, "input size");
        assert_eq!(out.len(), batch * self.chans * out_plane, "output size");
        assert!(index.len() >= self.chans.max(plane), "index too short");
        for s in samples {
            let k = s.chans.map_or(self.k, <[usize]>::len);
            assert!(s.rows.iter().all(|&r| r < self.chans), "expanded channel");
            assert!(
                s.chans.is_none_or(|c| c.iter().all(|&c| c < self.k)),
                "input channel"
            );
            assert!(
                s.weight.len() >= gemm::packed_a_len(self.chans, k),
                "weights"
            );
            assert_eq!(s.bias.len(), self.chans, "bias");
        }
        // Runs of bands per sample: enough tasks to keep every thread busy, their band
        // counts differing by at most one.
        let threads = rayon::current_num_threads();
        let runs = (2 * threads)
            .div_ceil(batch)
            .clamp(1, self.bands.len().max(1));
        let ptr = OutPtr(out.as_mut_ptr());
        (0..batch * runs).into_par_iter().for_each_init(
            || Scratch::new(pool, self.chans * self.cap * w, self.k * NR),
            |scratch, t| {
                let (s, run) = (t / runs, t % runs);
                let nb = self.bands.len();
                let bands = &self.bands[run * nb / runs..(run + 1) * nb / runs];
                let xs = &x[s * self.k * plane..];
                // Sample s's output planes (`out` holds them: checked above).
                let os = OutPtr(ptr.get().wrapping_add(s * self.chans * out_plane));
                let job = Job {
                    isa,
                    xs,
                    sample: samples[s],
                    act,
                    index,
                };
                self.run_bands(&job, bands, dw, os, scratch);
            },
        );
    }

    /// One run of consecutive bands of one sample, whose `chans` output planes start at
    /// `os`; the task writes only its bands' rows of them.
    fn run_bands(
        &self,
        job: &Job,
        bands: &[Band],
        dw: Depthwise,
        os: OutPtr,
        scratch: &mut Scratch,
    ) {
        let [_, w] = self.win.in_hw;
        let [oh, ow] = self.win.out_hw;
        let stride = self.cap * w;
        let taps = self.win.kernel[0] * self.win.kernel[1];
        // Input rows whose expansion the buffer holds, from its row 0.
        let mut held = 0..0;
        for band in bands {
            let need = band.rows.clone();
            if held.start < need.start && need.start < held.end {
                // Rows shared with the band before move to the top of each plane.
                let (from, n) = ((need.start - held.start) * w, (held.end - need.start) * w);
                for &c in job.sample.rows {
                    scratch.band[c * stride..(c + 1) * stride].copy_within(from..from + n, 0);
                }
                held = need.start..held.end;
            } else if held.start != need.start || held.end > need.end {
                held = need.start..need.start;
            }
            let at = (held.end - need.start) * w;
            self.expand(job, held.end..need.end, at, scratch);
            held = need.clone();
            let mut planes: Vec<PlaneIo> = job
                .sample
                .rows
                .iter()
                .map(|&c| PlaneIo {
                    x: &scratch.band[c * stride..c * stride + need.len() * w],
                    // SAFETY: rows `band.out` of plane c < chans, inside the sample's
                    // planes; no other task writes this band's rows, and the sample's
                    // channels are distinct.
                    out: unsafe {
                        std::slice::from_raw_parts_mut(
                            os.get().add(c * oh * ow + band.out.start * ow),
                            band.out.len() * ow,
                        )
                    },
                    k: &dw.weight[c * taps..(c + 1) * taps],
                    bias: dw.bias[c],
                    shift: job.sample.shift.map_or(0.0, |v| v[c]),
                })
                .collect();
            band.plan
                .run_planes(&mut planes, dw.act, &mut scratch.planes);
        }
    }

    /// Expands input rows `rows` into the band buffer at offset `at` of every plane.
    fn expand(&self, job: &Job, rows: Range<usize>, at: usize, scratch: &mut Scratch) {
        let [h, w] = self.win.in_hw;
        let plane = h * w;
        let Job {
            isa,
            xs,
            sample,
            act,
            index,
        } = *job;
        let k = sample.chans.map_or(self.k, <[usize]>::len);
        // Where panel row kk starts, from the panel's first position.
        let boff: Option<&[usize]> = sample.chans.map(|c| {
            scratch.offsets.clear();
            scratch.offsets.extend(c.iter().map(|&c| c * plane));
            &scratch.offsets[..]
        });
        let last = sample
            .chans
            .map_or(self.k, |c| c.last().map_or(0, |&c| c + 1));
        let ldc = self.cap * w;
        let (first, n) = (rows.start * w, rows.len() * w);
        let mr = isa.mr();
        let ep = Epilogue {
            bias: sample.bias,
            residual: gemm::Residual::None,
            act,
        };
        let c = scratch.band.as_mut_ptr();
        for p0 in (0..n).step_by(NR) {
            let lanes = NR.min(n - p0);
            let start = first + p0;
            // The panel's rows are the input channels' planes, read in place, unless
            // the last channel's NR values would run past the input.
            let in_place = last == 0 || (last - 1) * plane + start + NR <= xs.len();
            let (panel, ldb, offs) = if in_place {
                (&xs[start.min(xs.len())..], plane, boff)
            } else {
                let buf = &mut scratch.panel;
                for (kk, row) in buf.chunks_exact_mut(NR).enumerate().take(k) {
                    let ch = sample.chans.map_or(kk, |c| c[kk]);
                    row[..lanes].copy_from_slice(&xs[ch * plane + start..][..lanes]);
                    row[lanes..].fill(0.0);
                }
                (&buf[..], NR, None)
            };
            for r in sample.rows.chunks(mr) {
                let tile = Tile {
                    a: sample.weight,
                    ka: k,
                    arows: r,
                    kmap: None,
                    boff: offs,
                    k,
                    rows: r,
                    panel,
                    ldb,
                    ldc,
                    cols: &index[at + p0..at + p0 + lanes],
                    lanes: None,
                };
                if k == 0 {
                    scratch.acc = [[0f32; NR]; 12];
                }
                let mut done = false;
                for k0 in (0..k).step_by(KC) {
                    let k1 = (k0 + KC).min(k);
                    let fin = (k1 == k).then_some(gemm::Finish { ep: &ep, c });
                    // SAFETY: rows < chans index the packed weights (k columns, checked
                    // in `run`); the panel holds NR values from every row's start
                    // (checked above, or packed); with `fin`, as for the store below.
                    done = unsafe {
                        gemm::accumulate_finishing(
                            isa,
                            &tile,
                            k0,
                            k1,
                            &mut scratch.acc,
                            Prefetch::NONE,
                            fin,
                        )
                    };
                }
                if !done {
                    // SAFETY: rows < chans and columns < at + n ≤ cap · W index one
                    // plane each of the band buffer (chans × cap · W floats).
                    unsafe { gemm::store(&tile, &ep, &scratch.acc, c) };
                }
            }
        }
    }
}

/// What one sample's tasks share.
struct Job<'a> {
    isa: Isa,
    /// The sample's input (and the batch's after it).
    xs: &'a [f32],
    sample: Sample<'a>,
    act: Act,
    index: &'a [usize],
}

/// One task's buffers; the band buffer goes back to the pool.
struct Scratch<'p> {
    pool: &'p BufferPool,
    /// The band's expanded rows: `chans` planes of `cap × W`.
    band: Buf,
    /// A packed panel where the input would run out.
    panel: Vec<f32>,
    /// The depthwise kernels' padded planes.
    planes: Vec<f32>,
    /// Panel row offsets of kept input channels.
    offsets: Vec<usize>,
    acc: Acc,
}

impl Scratch<'_> {
    fn new(pool: &BufferPool, band: usize, panel: usize) -> Scratch<'_> {
        Scratch {
            pool,
            band: pool.take_dirty(band),
            panel: vec![0.0; panel],
            planes: Vec::new(),
            offsets: Vec::new(),
            acc: [[0f32; NR]; 12],
        }
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.band));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cpu::{fresh_rng, ops};
    use rand::seq::index::sample;
    use rand::Rng;

    /// Random values in [-1, 1).
    fn values(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// A random ascending subset of 0..n (at least one), or all of it.
    fn subset(rng: &mut impl Rng, n: usize) -> Vec<usize> {
        if rng.random_bool(0.3) {
            return (0..n).collect();
        }
        let m = rng.random_range(1..=n);
        let mut v = sample(rng, n, m).into_vec();
        v.sort_unstable();
        v
    }

    #[test]
    fn bands_equal_the_expansion_then_the_depthwise_layer_on_whole_planes() {
        let mut rng = fresh_rng();
        let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|&i| i == Isa::Portable || i == Isa::detect() || Isa::detect() == Isa::Avx512)
            .collect();
        for case in 0..60 {
            let isa = isas[case % isas.len()];
            let (k, chans) = (rng.random_range(1..12), rng.random_range(1..30));
            let (h, w) = (rng.random_range(1..24), rng.random_range(1..40));
            let ks = [1, 3, 5][rng.random_range(0..3)];
            let stride = rng.random_range(1..=2);
            // Symmetric padding, or less at the top and left (TensorFlow's SAME).
            let pad = ks / 2 - rng.random_range(0..=(ks / 2).min(1));
            let out_hw = [
                (h + 2 * (ks / 2) - ks) / stride + 1,
                (w + 2 * (ks / 2) - ks) / stride + 1,
            ];
            if out_hw.contains(&0) || (out_hw[0] - 1) * stride + ks < pad + 1 {
                continue;
            }
            let win = Window {
                in_hw: [h, w],
                out_hw,
                kernel: [ks, ks],
                stride: [stride, stride],
                pad_tl: [pad, pad],
            };
            // From one output row per band to all of them in one.
            let row_bytes = chans * w * 4;
            let bytes = row_bytes * rng.random_range(1..2 * h + 2);
            // Depthwise strips of one output row up to whole bands.
            let strip = [1 << 10, 16 << 10, 128 << 10][rng.random_range(0..3)];
            let bands = Bands::holding(chans, k, win, bytes, strip);
            let batch = rng.random_range(1..=3);
            let x = values(&mut rng, batch * k * h * w);
            let weight = values(&mut rng, chans * k);
            let bias = values(&mut rng, chans);
            let dw_w = values(&mut rng, chans * ks * ks);
            let dw_b = values(&mut rng, chans);
            let shift = values(&mut rng, chans);
            let act = [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)];
            let plans: Vec<(Vec<usize>, Vec<usize>, bool)> = (0..batch)
                .map(|_| {
                    (
                        subset(&mut rng, chans),
                        subset(&mut rng, k),
                        rng.random_bool(0.5),
                    )
                })
                .collect();
            let packed: Vec<Vec<f32>> = plans
                .iter()
                .map(|(_, ic, _)| {
                    let full = gemm::pack_a(&weight, chans, k);
                    let mut a = vec![0.0; gemm::packed_a_len(chans, ic.len())];
                    gemm::pack_a_channels(&full, k, ic, 1, &mut a);
                    a
                })
                .collect();
            let samples: Vec<Sample> = plans
                .iter()
                .zip(&packed)
                .map(|((rows, ic, shifted), a)| Sample {
                    rows,
                    weight: a,
                    chans: (ic.len() < k).then_some(&ic[..]),
                    bias: &bias,
                    shift: shifted.then_some(&shift[..]),
                })
                .collect();
            let plane = out_hw[0] * out_hw[1];
            let mut out = vec![f32::NAN; batch * chans * plane];
            let index: Vec<usize> = (0..chans.max(h * w)).collect();
            let dw = Depthwise {
                weight: &dw_w,
                bias: &dw_b,
                act,
            };
            let pool = BufferPool::default();
            bands.run(isa, &x, &samples, act, dw, &mut out, &index, &pool);
            for (s, (rows, ic, shifted)) in plans.iter().enumerate() {
                // The expansion over the kept input channels, on whole planes.
                let mut e = vec![0.0; chans * h * w];
                for c in 0..chans {
                    for p in 0..h * w {
                        let v: f32 = ic
                            .iter()
                            .map(|&i| weight[c * k + i] * x[(s * k + i) * h * w + p])
                            .sum();
                        e[c * h * w + p] = act.apply(v + bias[c]);
                    }
                }
                let want = ops::depthwise(&e, &dw_w, &dw_b, None, act, chans, win);
                for &c in rows {
                    let sh = if *shifted { shift[c] } else { 0.0 };
                    for p in 0..plane {
                        let (got, want) =
                            (out[(s * chans + c) * plane + p], want[c * plane + p] - sh);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{isa:?} case {case}: sample {s} channel {c} pixel {p}: {got} vs {want} \
                             (k {k} chans {chans} {h}×{w} kernel {ks} stride {stride} pad {pad}, \
                             {} bands)",
                            bands.bands.len()
                        );
                    }
                }
            }
        }
    }
}
