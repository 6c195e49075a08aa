//! Direct depthwise convolution. With AVX2, 3×3 and 5×5 windows of stride 1 or 2 run
//! eight planes at a time (sixteen with AVX-512), a channel per vector lane
//! (`depthwise_lanes`; `Plan::with_lanes` and `lanes_width` have the numbers); the rest
//! run plane by plane, as follows. With
//! AVX-512, taps read the input in place through masked loads (`depthwise_avx512`);
//! with AVX2, small stride-1 3×3 planes and 5×5 planes of stride 1 or 2 go through a
//! copy with zero-padded rows a whole number of vectors long, others are read in place
//! or copied as below (`depthwise_avx2`).
//! Elsewhere (and for column strides above 2): one zero-padded copy of each input plane,
//! then per output row one multiply-add sweep per kernel tap over contiguous memory
//! (stride-2 planes split into even and odd columns first so that sweeps stay
//! contiguous), compiled for AVX2+FMA and for the baseline and picked at run time.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::depthwise_masks::{FlatMasks, RowMasks};
use super::gemm::Isa;
use super::ops::{self, Window};
#[cfg(target_arch = "x86_64")]
use super::{depthwise_avx2, depthwise_avx512, depthwise_lanes};
use crate::model::Act;

/// A depthwise layer's geometry and the kernel its planes run on, worked out once when
/// the model is loaded (the AVX-512 kernels' lane masks depend on the geometry alone).
pub struct Plan {
    win: Window,
    path: Path,
    #[cfg(target_arch = "x86_64")]
    flat: Option<FlatMasks>,
    #[cfg(target_arch = "x86_64")]
    rows: Option<RowMasks>,
    /// The row pitch of `depthwise_avx2::plane_pitched`'s copy, where AVX2 planes take it.
    #[cfg(target_arch = "x86_64")]
    pitch: Option<usize>,
    /// How many planes at a time [`Plan::run`] takes, a channel per lane
    /// (`depthwise_lanes`); `None`: plane by plane.
    #[cfg(target_arch = "x86_64")]
    lanes: Option<depthwise_lanes::Width>,
    /// What a strip of planes in lanes holds at most (see `depthwise_lanes::strip_rows`).
    #[cfg(target_arch = "x86_64")]
    strip_bytes: usize,
}

impl Plan {
    /// The plan for `win` on the fastest kernels this CPU runs; planes in lanes go in
    /// strips of at most `strip_bytes` (the tuning's `depthwise_strip_bytes`).
    pub fn new(win: Window, strip_bytes: usize) -> Plan {
        Plan::with_lanes(win, Path::best(), true, strip_bytes)
    }

    #[cfg(test)]
    fn with_path(win: Window, path: Path) -> Plan {
        Plan::with_lanes(
            win,
            path,
            false,
            super::Tuning::DEFAULT.depthwise_strip_bytes,
        )
    }

    /// The plan on `path`, its planes eight or sixteen at a time when `grouped`, the CPU
    /// runs them ([`lanes_width`]) and [`depthwise_lanes`] supports the window.
    ///
    /// One-layer models, in-process pairs (100–150), the layer's time in lanes against
    /// plane by plane, one thread, whole planes in one buffer: 3×3 at 7×7 0.63 (960
    /// channels), 14×14 0.61 (576), 28×28 0.62 (192); stride 2, 14 → 7 0.58, 28 → 14
    /// 0.46, 56 → 28 0.63; 5×5 at 7×7 0.55, 14×14 0.60, 28×28 0.60, stride 2 14 → 7
    /// 0.58, 56 → 28 0.60 (larger planes: `Tuning::depthwise_strip_bytes`). Whole passes
    /// (2 threads, in-process pairs, every such layer in lanes against none):
    /// MobileNetV2 0.957 of the time at batch 1, 0.958 at batch 8; EfficientNet-Lite0
    /// 0.947 and 0.947.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn with_lanes(win: Window, path: Path, grouped: bool, strip_bytes: usize) -> Plan {
        // The masked kernels' vector width.
        #[cfg(target_arch = "x86_64")]
        let lanes = match path {
            Path::Avx512 => Some(16),
            Path::Avx2 => Some(depthwise_avx2::LANES),
            Path::Generic => None,
        };
        #[cfg(target_arch = "x86_64")]
        let pitch = Some(path)
            .filter(|&p| {
                p == Path::Avx2
                    && (win.kernel != [3, 3]
                        || (win.stride == [1, 1] && win.out_hw[1] < PITCHED_3X3_BELOW))
            })
            .and_then(|_| depthwise_avx2::pitch(&win));
        Plan {
            win,
            path,
            #[cfg(target_arch = "x86_64")]
            flat: lanes
                .filter(|&l| l == 16 || (win.out_hw[1] < FLAT_AVX2_BELOW && pitch.is_none()))
                .and_then(|l| FlatMasks::new(&win, l)),
            #[cfg(target_arch = "x86_64")]
            rows: lanes
                .filter(|&l| l == 16 || win.stride[1] == 2)
                .and_then(|l| RowMasks::new(&win, l)),
            #[cfg(target_arch = "x86_64")]
            pitch,
            #[cfg(target_arch = "x86_64")]
            lanes: lanes_width(path).filter(|_| grouped && depthwise_lanes::supports(&win)),
            #[cfg(target_arch = "x86_64")]
            strip_bytes,
        }
    }

    /// The layer's window.
    pub fn win(&self) -> Window {
        self.win
    }

    /// Planes of this window on the calling thread, with `act`: eight or sixteen at a
    /// time where the plan runs planes in lanes, else one by one ([`Plan::run_plane`]).
    /// `bands` runs a band's depthwise planes this way: MobileNetV2's banded expansion and
    /// stride-2 depthwise pair over 112×112 took 0.86–0.91 of the time it took with the
    /// planes one by one (one and two threads, batch 1 and 8, budget 0.5; in-process
    /// pairs), EfficientNet-Lite0's 0.84–0.91; whole passes 0.98–0.99.
    pub(super) fn run_planes(&self, planes: &mut [PlaneIo], act: Act, scratch: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if let Some(width) = self.lanes {
            let win = self.win;
            let (in_plane, out_plane) =
                (win.in_hw[0] * win.in_hw[1], win.out_hw[0] * win.out_hw[1]);
            let taps = win.kernel[0] * win.kernel[1];
            for chunk in planes.chunks_mut(width.lanes()) {
                assert!(
                    chunk.iter().all(|p| p.x.len() >= in_plane
                        && p.out.len() >= out_plane
                        && p.k.len() >= taps),
                    "plane sizes"
                );
                // Lanes past the chunk repeat its last plane and are not stored.
                let last = chunk.len() - 1;
                let at = move |l: usize| l.min(last);
                let out = std::array::from_fn(|l| chunk[at(l)].out.as_mut_ptr());
                let g = depthwise_lanes::Group {
                    n: chunk.len(),
                    x: std::array::from_fn(|l| chunk[at(l)].x.as_ptr()),
                    k: std::array::from_fn(|l| chunk[at(l)].k.as_ptr()),
                    bias: std::array::from_fn(|l| chunk[at(l)].bias),
                    shift: std::array::from_fn(|l| chunk[at(l)].shift),
                    residual: None,
                    out,
                };
                // SAFETY: the plan is in lanes only where the CPU has AVX2 and FMA, and
                // AVX-512F for sixteen lanes (`lanes_width`), for a window
                // `depthwise_lanes` supports; every plane's slices hold a whole plane
                // (asserted above), the stored lanes' outputs are distinct `&mut` slices,
                // and the rows are the window's.
                let rows = 0..win.out_hw[0];
                let strip = depthwise_lanes::strip_rows(&win, width.lanes(), self.strip_bytes);
                unsafe { depthwise_lanes::group(width, &win, &g, act, rows, strip, scratch) };
            }
            return;
        }
        for p in planes {
            self.run_plane(p.out, p.x, p.k, p.bias, act, p.shift, scratch);
        }
    }

    /// One plane on the calling thread: `x` an input plane of this window, `out` its
    /// output plane; `k` the channel's kernel, `shift` subtracted after the activation.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_plane(
        &self,
        out: &mut [f32],
        x: &[f32],
        k: &[f32],
        bias: f32,
        act: Act,
        shift: f32,
        scratch: &mut Vec<f32>,
    ) {
        let plane = Plane {
            x,
            k,
            bias,
            residual: None,
            act,
            shift,
            win: self.win,
        };
        plane_on(self, &plane, scratch, out);
    }

    /// Depthwise convolution of N×C×H×W `input` into a caller's buffer of N×C×OH×OW
    /// values, with bias, optional residual and activation (same contract as
    /// [`super::ops::depthwise`], which is its reference); with `keep`, only the
    /// (sample, channel) planes it marks (`keep[sample * channels + channel]`), the
    /// other output planes left unwritten (their readers skip them); with `shift`, each
    /// plane's value (same indexing) is subtracted after the activation.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        out: &mut [f32],
        input: &[f32],
        weight: &[f32],
        bias: &[f32],
        residual: Option<&[f32]>,
        act: Act,
        channels: usize,
        keep: Option<&[bool]>,
        shift: Option<&[f32]>,
    ) {
        let job = Job {
            input,
            weight,
            bias,
            residual,
            act,
            channels,
            keep,
            shift,
        };
        planes(self, &job, out);
    }
}

/// On AVX2, the masked kernels run stride-1 planes narrower than this (flat) and every
/// plane of column stride 2 (row by row); wider stride-1 planes take the padded copy,
/// swept by `depthwise_avx2::padded_plane` (3×3 and 5×5), which needs a row of at least
/// one vector. One thread, passes of a one-layer `conv_chain` model per shape, both ways
/// in one process, alternating (200 pairs): the padded sweep against the masked flat
/// kernel at 14×14, 3×3 0.75–0.79 of the time, 5×5 0.66. The sweep before it (portable
/// code, one block of 8 at a time) lost to the masked kernels below 20 columns (14×14
/// 0.80 / 0.94 flat / rows) and beat them above (56×56 1.11 / 1.11, 112×112 1.36 / 1.39);
/// against that sweep, `padded_plane` took 0.66 of the time at 112×112 (32 channels),
/// 0.57–0.58 at 56×56 and 28×28, 0.37–0.38 for 5×5 at 28×28, 0.53–0.56 for 5×5 at 14×14.
/// Stride 2 (masked rows against the padded copy): 3×3 56→28 0.54, 14→7 0.33; 5×5 14→7
/// 0.31.
const FLAT_AVX2_BELOW: usize = depthwise_avx2::LANES;

/// On AVX2, stride-1 3×3 planes narrower than this, and 5×5 planes of stride 1 or 2 at
/// any width (output rows at least 7 wide, as for both), take the pitched copy
/// (`depthwise_avx2::plane_pitched`) rather than the masked flat kernel (7×7), the
/// masked rows (stride 2 to rows narrower than a vector) or the padded copy with
/// `depthwise_avx2::padded_plane`. One thread, one-layer models,
/// in-process pairs (300): the pitched copy took, of the other's time, 3×3 at 7×7 0.81
/// (960 channels), 14×14 0.71 (576), 20×20 0.86, 28×28 1.03, 56×56 1.04, 112×112 1.15;
/// 5×5 at 7×7 0.49 (1152), 14×14 0.69, 28×28 0.82, 56×56 0.94, 112×112 0.99–1.01.
/// Stride 2: 5×5 14 → 7 0.88 (672; 0.69–0.79 in EfficientNet-Lite0's pass, 2 threads),
/// 56 → 28 0.98–1.01; 3×3 28 → 14 0.90, 14 → 7 1.08 (1.10 in MobileNetV2's pass), 56 →
/// 28 1.02, 112 → 56 1.03 — so 3×3 planes of stride 2 keep the other kernels.
const PITCHED_3X3_BELOW: usize = 28;

/// Whether an AVX2 plane of column stride 2 takes the padded copy (its columns split
/// into even and odd ones with shuffles) and `depthwise_avx2::padded_plane` rather than
/// the masked rows: 3×3 and 5×5 with rows of at least one vector. One thread, one-layer
/// models, in-process pairs (150–200): 3×3 112→56 0.74–0.79 of the time, 56→28
/// 0.55–0.58, 28→14 0.78–0.81; 5×5 56→28 0.40–0.44, 28→14 0.57–0.60. (With the split's
/// last values copied one by one, 28→14 had lost: 1.30–1.43.)
#[cfg(target_arch = "x86_64")]
fn padded_sweep(win: &Window) -> bool {
    win.out_hw[1] >= depthwise_avx2::LANES && matches!(win.kernel, [3, 3] | [5, 5])
}

/// How many planes in lanes run at a time on `path`'s CPU, if any: eight on AVX2, and
/// on AVX-512 too, where the masked plane-by-plane kernels leave most of a 16-lane
/// vector idle on small planes, sixteen there where the CPU has AVX-512F. AVX-512, one
/// thread, in-process pairs (40), the depthwise layers in eight lanes against plane by
/// plane: MobileNetV2's 0.68–0.93 of their time (7×7 planes 0.78–0.79, stride 2
/// 0.68–0.77), EfficientNet-Lite0's 0.52–0.95 (5×5 at 14×14 0.52–0.60); whole passes on
/// 2 threads 0.986 / 0.988 (batch 1 / 8) for MobileNetV2, 0.935 / 0.917 for Lite0; at
/// budget 0.5 0.984 / 0.989 and 0.969 / 0.969. Sixteen lanes against eight (Intel
/// Xeon, in-process pairs, one engine switched pass by pass): depthwise layers at one
/// thread 0.62–0.87 of their time (7×7 0.62–0.63, 14×14 0.68–0.70, 28×28 0.64–0.66,
/// stride 2 0.74–0.95); whole passes at batch 1 on one thread 0.944 (MobileNetV2) and
/// 0.940 (Lite0), on two 0.973 and 0.954; batch 8 0.949 and 0.944; budget 0.5 0.969
/// and 0.958.
#[cfg(target_arch = "x86_64")]
fn lanes_width(path: Path) -> Option<depthwise_lanes::Width> {
    use depthwise_lanes::Width;
    let avx2 = || {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    };
    match path {
        Path::Avx2 => Some(Width::Eight),
        Path::Avx512 if avx2() && std::arch::is_x86_feature_detected!("avx512f") => {
            Some(Width::Sixteen)
        }
        Path::Avx512 => avx2().then_some(Width::Eight),
        Path::Generic => None,
    }
}

/// The kernels a plane can run on, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
enum Path {
    /// Masked loads straight from the input (`depthwise_avx512`); planes of a column
    /// stride above 2 take the padded copy, swept with AVX2.
    Avx512,
    /// Masked loads straight from the input, 8 lanes at a time (`depthwise_avx2`);
    /// stride-1 planes at least `FLAT_AVX2_BELOW` wide and planes of a column stride
    /// above 2 take the padded copy, swept with AVX2 and FMA.
    Avx2,
    /// The padded copy, swept by portable code.
    Generic,
}

impl Path {
    /// The path of the GEMM kernels this CPU runs.
    fn best() -> Path {
        match Isa::detect() {
            Isa::Avx512 => Path::Avx512,
            Isa::Avx2 => Path::Avx2,
            Isa::Portable => Path::Generic,
        }
    }
}

/// A depthwise layer's operands (see [`Plan::run`]).
/// One plane's operands for [`Plan::run_planes`].
pub(super) struct PlaneIo<'a> {
    /// Its output plane.
    pub out: &'a mut [f32],
    /// Its input plane.
    pub x: &'a [f32],
    /// Its channel's kernel.
    pub k: &'a [f32],
    pub bias: f32,
    /// Subtracted after the activation.
    pub shift: f32,
}

struct Job<'a> {
    input: &'a [f32],
    weight: &'a [f32],
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    act: Act,
    channels: usize,
    keep: Option<&'a [bool]>,
    shift: Option<&'a [f32]>,
}

/// The planes of `job`, a group of `width` at a time, a channel per lane.
#[cfg(target_arch = "x86_64")]
fn planes_in_lanes(plan: &Plan, width: depthwise_lanes::Width, job: &Job, out: &mut [f32]) {
    use depthwise_lanes::Group;
    let lanes = width.lanes();
    let win = plan.win;
    let in_plane = win.in_hw[0] * win.in_hw[1];
    let out_plane = win.out_hw[0] * win.out_hw[1];
    let taps = win.kernel[0] * win.kernel[1];
    let total = out.len() / out_plane.max(1);
    // A gated layer's kept planes, listed; a dense layer's are all of them, in order.
    let kept: Option<Vec<usize>> = job.keep.map(|k| (0..total).filter(|&nc| k[nc]).collect());
    let count = kept.as_ref().map_or(total, Vec::len);
    let plane = |i: usize| kept.as_ref().map_or(i, |k| k[i]);
    let o = super::gemm::OutPtr(out.as_mut_ptr());
    // Few groups of large planes that do not share out evenly over the threads (a gated
    // layer of 32 channels over 112×112 keeping 18: three groups on two threads) go in
    // parts of their strips, so that every thread gets a like share; a part is whole
    // strips. MobileNetV2's and EfficientNet-Lite0's first depthwise layers at budget
    // 0.5, 2 threads, batch 1: 0.67–0.69 of their time (in-process pairs, 150); split
    // when the groups already shared out evenly (dense: four), 1.02.
    let groups = count.div_ceil(lanes);
    let [oh, _] = win.out_hw;
    let strip = depthwise_lanes::strip_rows(&win, lanes, plan.strip_bytes);
    let strips = oh.div_ceil(strip);
    let threads = rayon::current_num_threads();
    let even = groups >= threads && groups.is_multiple_of(threads);
    let wanted = 4 * threads;
    // Enough groups that do not share out evenly (MobileNetV2's 144 channels at 56 × 56
    // as nine groups, EfficientNet-Lite0's 240 as fifteen) go in one part per thread:
    // with whole groups one thread ran a group more than the other. One engine, the way
    // switched pass by pass (200 pairs, 2 threads, batch 1): MobileNetV2's
    // `features.4.conv.1.0` took 0.93 of its time, Lite0's `_blocks.3` 0.95; passes
    // 0.995 and 0.995, at budget 0.5 0.997 and 0.989 (batch 8, 30 pairs: 0.992 and
    // 1.004).
    let parts = if even {
        1
    } else if groups >= wanted {
        threads.min(strips)
    } else {
        wanted.div_ceil(groups.max(1)).min(strips)
    };
    (0..groups * parts)
        .into_par_iter()
        .with_min_len(if parts == 1 {
            (1024 / (lanes * out_plane).max(1)).max(1)
        } else {
            1
        })
        .for_each_init(super::pool::Spare::take, |scratch, t| {
            let (first, part) = (t / parts * lanes, t % parts);
            let n = (count - first).min(lanes);
            let rows = (part * strips / parts * strip).min(oh)
                ..((part + 1) * strips / parts * strip).min(oh);
            // Lanes past the group's planes repeat its last one (see `Group`).
            let at = |l: usize| plane(first + l.min(n - 1));
            let g = Group {
                n,
                x: std::array::from_fn(|l| job.input[at(l) * in_plane..].as_ptr()),
                k: std::array::from_fn(|l| job.weight[at(l) % job.channels * taps..].as_ptr()),
                bias: std::array::from_fn(|l| job.bias[at(l) % job.channels]),
                shift: std::array::from_fn(|l| job.shift.map_or(0.0, |v| v[at(l)])),
                residual: job
                    .residual
                    .map(|r| std::array::from_fn(|l| r[at(l) * out_plane..].as_ptr())),
                out: std::array::from_fn(|l| o.get().wrapping_add(at(l) * out_plane)),
            };
            // SAFETY: the plan is in lanes of `width`, so the CPU has AVX2 and FMA, and
            // AVX-512F for sixteen lanes (`lanes_width`), and the window is one
            // `depthwise_lanes` supports (`Plan::with_lanes`); every plane index is below
            // `total`, so each pointer starts a whole plane of its buffer; the groups
            // share out distinct indices, so no two lanes write the same plane, and the
            // parts of one group distinct rows inside `0..oh`.
            unsafe { depthwise_lanes::group(width, &win, &g, job.act, rows, strip, scratch) };
        });
}

/// The planes of `job` on the plan's path.
fn planes(plan: &Plan, job: &Job, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(width) = plan.lanes {
        return planes_in_lanes(plan, width, job, out);
    }
    let win = plan.win;
    let in_plane = win.in_hw[0] * win.in_hw[1];
    let out_plane = win.out_hw[0] * win.out_hw[1];
    let taps = win.kernel[0] * win.kernel[1];
    // Small planes (late layers: hundreds of 7×7 or 14×14 planes) go several to a task.
    out.par_chunks_mut(out_plane)
        .enumerate()
        .with_min_len((1024 / out_plane.max(1)).max(1))
        .for_each_init(super::pool::Spare::take, |scratch, (nc, o)| {
            if job.keep.is_some_and(|k| !k[nc]) {
                return;
            }
            let c = nc % job.channels;
            let plane = Plane {
                x: &job.input[nc * in_plane..(nc + 1) * in_plane],
                k: &job.weight[c * taps..(c + 1) * taps],
                bias: job.bias[c],
                residual: job
                    .residual
                    .map(|r| &r[nc * out_plane..(nc + 1) * out_plane]),
                act: job.act,
                shift: job.shift.map_or(0.0, |v| v[nc]),
                win,
            };
            plane_on(plan, &plane, scratch, o);
        });
}

/// One plane on the plan's path.
fn plane_on(plan: &Plan, plane: &Plane, scratch: &mut Vec<f32>, o: &mut [f32]) {
    let path = plan.path;
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx512 {
        // SAFETY: the CPU supports AVX-512F (the path says so); the slices hold
        // one plane of this window each, and the masks were made for it with 16 lanes.
        unsafe {
            match (&plan.flat, &plan.rows, plane.win.stride[1]) {
                (Some(m), _, _) => return depthwise_avx512::plane_flat(plane, m, o),
                (None, Some(m), 1) => return depthwise_avx512::plane_rows::<1>(plane, m, o),
                (None, Some(m), 2) => return depthwise_avx512::plane_rows::<2>(plane, m, o),
                _ => {}
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 {
        // SAFETY: the CPU supports AVX2 and FMA (the path says so); the slices hold one
        // plane of this window each, the masks were made for it with 8 lanes, and the
        // pitch by `depthwise_avx2::pitch` for it (3×3 or 5×5).
        unsafe {
            if let Some(pitch) = plan.pitch {
                let pitched = match (plane.win.kernel, plane.win.stride) {
                    ([3, 3], [1, 1]) => depthwise_avx2::plane_pitched::<3, 1>,
                    ([3, 3], _) => depthwise_avx2::plane_pitched::<3, 2>,
                    (_, [1, 1]) => depthwise_avx2::plane_pitched::<5, 1>,
                    _ => depthwise_avx2::plane_pitched::<5, 2>,
                };
                return pitched(plane, pitch, scratch, o);
            }
            match (&plan.flat, &plan.rows, plane.win.stride[1]) {
                (Some(m), _, _) => return depthwise_avx2::plane_flat(plane, m, o),
                // Row masks are made for column stride 2 only (see FLAT_AVX2_BELOW).
                (None, Some(m), 2) if !padded_sweep(&plane.win) => {
                    return depthwise_avx2::plane_rows::<2>(plane, m, o)
                }
                _ => {}
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if path != Path::Generic {
        // SAFETY: the CPU supports AVX2 and FMA (every path but Generic does).
        unsafe { plane_avx2(plane, scratch, o) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = path;
    plane_generic::<false>(plane, scratch, o);
}

/// One plane's operands (the AVX-512 kernels read them too).
pub(super) struct Plane<'a> {
    /// The input plane (H × W).
    pub(super) x: &'a [f32],
    /// The channel's kernel, kh × kw.
    pub(super) k: &'a [f32],
    pub(super) bias: f32,
    /// The residual plane added before the activation.
    pub(super) residual: Option<&'a [f32]>,
    pub(super) act: Act,
    /// Subtracted after the activation.
    pub(super) shift: f32,
    pub(super) win: Window,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn plane_avx2(job: &Plane, scratch: &mut Vec<f32>, out: &mut [f32]) {
    plane_generic::<true>(job, scratch, out)
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn plane_generic<const FMA: bool>(job: &Plane, scratch: &mut Vec<f32>, out: &mut [f32]) {
    let w = job.win;
    let [h, wd] = w.in_hw;
    let [oh, ow] = w.out_hw;
    let [kh, kw] = w.kernel;
    let [sy, sx] = w.stride;
    // Padded extent: exactly what the output windows reach.
    let ph = (oh - 1) * sy + kh;
    let pw = (ow - 1) * sx + kw;
    // Columns are stored phase by phase: phase q holds padded columns q, q+sx, q+2sx, …
    let phase_w = pw.div_ceil(sx);
    let row_len = phase_w * sx;
    // Column stride 1 writes every cell below (the padding's zeros too), so the buffer
    // is not zeroed first. In-process pairs (200, one thread, one-layer models, AVX2):
    // 3×3 depthwise layers 0.92–0.95 of the time (144 × 56², 192 × 28², 384 × 14²), 5×5
    // 0.96 (240 × 28²).
    if sx != 1 {
        scratch.clear();
    }
    scratch.resize(ph * row_len, 0.0);
    for py in 0..ph {
        let Some(iy) = (py).checked_sub(w.pad_tl[0]).filter(|&iy| iy < h) else {
            if sx == 1 {
                scratch[py * row_len..(py + 1) * row_len].fill(0.0);
            }
            continue;
        };
        let src = &job.x[iy * wd..(iy + 1) * wd];
        let dst = &mut scratch[py * row_len..(py + 1) * row_len];
        if sx == 1 {
            let n = wd.min(pw.saturating_sub(w.pad_tl[1]));
            let (left, rest) = dst.split_at_mut(w.pad_tl[1].min(row_len));
            left.fill(0.0);
            rest[..n].copy_from_slice(&src[..n]);
            rest[n..].fill(0.0);
        } else {
            // Phase q holds padded columns q, q + sx, …; padded column px is input px - pad.
            // Input column ix lands in phase (ix + pad) % sx at index (ix + pad) / sx.
            let last = wd.min(pw.saturating_sub(w.pad_tl[1]));
            // The even and odd input columns split by vector: even ones land in phase
            // pad % 2 from index pad / 2, odd ones in the other phase from ⌈pad / 2⌉.
            if sx == 2 {
                let pad = w.pad_tl[1];
                let (ne, no) = (last.div_ceil(2), last / 2);
                let (ph0, ph1) = dst.split_at_mut(phase_w);
                let (pe, po) = if pad.is_multiple_of(2) {
                    (ph0, ph1)
                } else {
                    (ph1, ph0)
                };
                let (pe, po) = (
                    &mut pe[pad / 2..pad / 2 + ne],
                    &mut po[pad.div_ceil(2)..][..no],
                );
                ops::split_even_odd(&src[..last], pe, po);
                continue;
            }
            for q in 0..sx {
                // First input column of this phase.
                let first = (q + sx - w.pad_tl[1] % sx) % sx;
                if first >= last {
                    continue;
                }
                let phase = &mut dst[q * phase_w..(q + 1) * phase_w];
                let at = (first + w.pad_tl[1]) / sx;
                for (d, &v) in phase[at..]
                    .iter_mut()
                    .zip(src[first..last].iter().step_by(sx))
                {
                    *d = v;
                }
            }
        }
    }
    // Start of each tap's source run within a padded row: output x reads padded column
    // x·sx + kx, which is index x + kx / sx of phase kx % sx.
    let starts: Vec<usize> = (0..kw).map(|kx| (kx % sx) * phase_w + kx / sx).collect();
    // Planes narrower than a vector (7×7 and smaller): one flat sweep per tap over every
    // output row at once, with the rows `sy · row_len` apart as in the padded input; the
    // columns past `ow` are computed and dropped.
    let pitch = sy * row_len;
    let flat_len = (oh - 1) * pitch + ow;
    if ow < LANES && flat_len >= LANES {
        // The sweep's results go after the padded plane in the scratch buffer.
        let base = scratch.len();
        scratch.resize(base + flat_len, 0.0);
        let (padded, flat) = scratch.split_at_mut(base);
        sweep::<FMA>(job, padded, row_len, &starts, flat);
        for (oy, o) in out.chunks_exact_mut(ow).enumerate() {
            o.copy_from_slice(&flat[oy * pitch..oy * pitch + ow]);
            finish(job, oy, o);
        }
        return;
    }
    // With AVX2 (FMA is only true on `plane_avx2`'s path), 3×3 and 5×5 planes of column
    // stride 1 or 2 take explicit kernels that overlap several blocks' multiply-add chains
    // and apply the epilogue in registers (see FLAT_AVX2_BELOW for what they measured).
    #[cfg(target_arch = "x86_64")]
    if FMA && sx <= 2 && ow >= LANES {
        // SAFETY: `plane_avx2` runs only where the CPU has AVX2 and FMA; the padded copy
        // holds ph = (oh - 1) · sy + kh rows of row_len = sx · ⌈pw / sx⌉ values (phase by
        // phase for stride 2), as `padded_plane` asks; `out` and the residual hold
        // OH × OW values.
        match [kh, kw] {
            [3, 3] => {
                return unsafe {
                    super::depthwise_avx2::padded_plane::<3>(job, scratch, row_len, out)
                }
            }
            [5, 5] => {
                return unsafe {
                    super::depthwise_avx2::padded_plane::<5>(job, scratch, row_len, out)
                }
            }
            _ => {}
        }
    }
    for oy in 0..oh {
        let o = &mut out[oy * ow..(oy + 1) * ow];
        let rows = &scratch[oy * sy * row_len..];
        if ow >= LANES && kh == 3 && kw == 3 {
            square_row::<FMA, 3>(job.k, job.bias, rows, row_len, &starts, o);
        } else if ow >= LANES && kh == 5 && kw == 5 {
            square_row::<FMA, 5>(job.k, job.bias, rows, row_len, &starts, o);
        } else if ow >= LANES {
            sweep::<FMA>(job, rows, row_len, &starts, o);
        } else {
            for (x, a) in o.iter_mut().enumerate() {
                let mut v = job.bias;
                for ky in 0..kh {
                    let row = &rows[ky * row_len..(ky + 1) * row_len];
                    for (kx, &st) in starts.iter().enumerate() {
                        v = madd::<FMA>(job.k[ky * kw + kx], row[st + x], v);
                    }
                }
                *a = v;
            }
        }
        finish(job, oy, o);
    }
}

/// Adds the residual (if any) to output row `oy`, applies the activation and subtracts
/// the shift.
#[inline(always)]
fn finish(job: &Plane, oy: usize, o: &mut [f32]) {
    let ow = o.len();
    if let Some(r) = job.residual {
        for (a, &b) in o.iter_mut().zip(&r[oy * ow..(oy + 1) * ow]) {
            *a += b;
        }
    }
    job.act.apply_slice(o);
    if job.shift != 0.0 {
        o.iter_mut().for_each(|v| *v -= job.shift);
    }
}

/// `out[x] = bias + Σ k[ky][kx] · rows[ky · row_len + starts[kx] + x]` for every `x`
/// (`out.len() ≥ LANES`): blocks of LANES outputs accumulate every tap in registers and
/// are stored once; the last block overlaps the previous one instead of leaving a scalar
/// tail. One output row reads its input rows; a flat sweep reads every row at once.
#[inline(always)]
fn sweep<const FMA: bool>(
    job: &Plane,
    rows: &[f32],
    row_len: usize,
    starts: &[usize],
    out: &mut [f32],
) {
    let (n, kw) = (out.len(), starts.len());
    let kh = job.k.len() / kw;
    let mut x0 = 0;
    loop {
        let x = x0.min(n - LANES);
        let mut acc = [job.bias; LANES];
        for ky in 0..kh {
            for (kx, &st) in starts.iter().enumerate() {
                let kv = job.k[ky * kw + kx];
                let at = ky * row_len + st + x;
                let src: &[f32; LANES] = rows[at..at + LANES].try_into().unwrap_or(&[0.0; LANES]);
                for l in 0..LANES {
                    acc[l] = madd::<FMA>(kv, src[l], acc[l]);
                }
            }
        }
        out[x..x + LANES].copy_from_slice(&acc);
        if x + LANES >= n {
            break;
        }
        x0 += LANES;
    }
}

/// Outputs computed together in registers (one AVX2 vector).
const LANES: usize = 8;

/// One output row of a K×K depthwise kernel, K known at compile time so the taps unroll
/// and the weights stay in registers. `rows` starts at the row's first padded input row.
#[inline(always)]
fn square_row<const FMA: bool, const K: usize>(
    k: &[f32],
    bias: f32,
    rows: &[f32],
    row_len: usize,
    starts: &[usize],
    o: &mut [f32],
) {
    let ow = o.len();
    let w: [[f32; K]; K] = std::array::from_fn(|ky| std::array::from_fn(|kx| k[ky * K + kx]));
    let st: [usize; K] = std::array::from_fn(|kx| starts[kx]);
    let span = st.iter().max().copied().unwrap_or(0) + ow;
    let src: [&[f32]; K] = std::array::from_fn(|ky| &rows[ky * row_len..ky * row_len + span]);
    let mut x0 = 0;
    loop {
        let x = x0.min(ow - LANES);
        let mut acc = [bias; LANES];
        for ky in 0..K {
            for kx in 0..K {
                let v = &src[ky][st[kx] + x..st[kx] + x + LANES];
                for l in 0..LANES {
                    acc[l] = madd::<FMA>(w[ky][kx], v[l], acc[l]);
                }
            }
        }
        o[x..x + LANES].copy_from_slice(&acc);
        if x + LANES >= ow {
            break;
        }
        x0 += LANES;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Every path this CPU can run, each checked on every case.
    fn paths() -> Vec<Path> {
        [Path::Avx512, Path::Avx2, Path::Generic]
            .into_iter()
            .filter(|&p| p >= Path::best())
            .collect()
    }

    /// The pitched copy's edges: every width it takes from 7 columns (stride 1; stride 2
    /// from 7 output columns, odd and even inputs), short planes, each split of the
    /// padding, a residual; the middle plane of three is skipped, and must stay unwritten
    /// (a store past a plane's end would land there).
    #[test]
    fn pitched_planes_match_the_reference_and_stay_in_their_plane() {
        let mut rng = super::super::fresh_rng();
        let mut pitched = 0;
        for (k, s) in [(3, 1), (5, 1), (5, 2), (3, 2)] {
            for w in 7..=30 {
                let h = rng.random_range(1..=9);
                let pad_tl = [rng.random_range(0..k), rng.random_range(0..k)];
                let (in_hw, out_hw) = if s == 1 {
                    ([h, w], [h, w])
                } else {
                    // Padded extents the outputs' windows fill, or one more; each side's
                    // padding 0..k.
                    let oh = rng.random_range(1..=9);
                    let mut input = |o: usize, pad: usize| {
                        let reach = 2 * (o - 1) + k + rng.random_range(0..2);
                        reach.saturating_sub(pad + rng.random_range(0..k)).max(1)
                    };
                    ([input(oh, pad_tl[0]), input(w, pad_tl[1])], [oh, w])
                };
                let win = Window {
                    in_hw,
                    out_hw,
                    kernel: [k, k],
                    stride: [s, s],
                    pad_tl,
                };
                let c = 3;
                let (inp, outp) = (in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]);
                let mut r = |len: usize| {
                    (0..len)
                        .map(|_| rng.random_range(-1.0f32..1.0))
                        .collect::<Vec<_>>()
                };
                let (x, wt, b, res) = (r(c * inp), r(c * k * k), r(c), r(c * outp));
                let want = super::super::ops::depthwise(&x, &wt, &b, Some(&res), Act::Relu, c, win);
                for path in paths() {
                    let plan = Plan::with_path(win, path);
                    #[cfg(target_arch = "x86_64")]
                    if plan.pitch.is_some() {
                        pitched += 1;
                    }
                    let mut got = vec![f32::NAN; want.len()];
                    let keep = [true, false, true];
                    plan.run(
                        &mut got,
                        &x,
                        &wt,
                        &b,
                        Some(&res),
                        Act::Relu,
                        c,
                        Some(&keep),
                        None,
                    );
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        if i / outp == 1 {
                            assert!(g.is_nan(), "{path:?} {win:?}: skipped plane written at {i}");
                        } else {
                            assert!(
                                (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                                "{path:?} {win:?}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
        if Path::best() == Path::Avx2 {
            // Stride 1: 3×3 below 28 columns (21 widths), 5×5 at every width (24); stride
            // 2: 5×5 at every width (24).
            assert_eq!(pitched, 69);
        }
    }

    /// A plan on every path, and on AVX2 one with planes in lanes where the window
    /// allows it.
    fn plans(win: Window) -> Vec<Plan> {
        let mut plans: Vec<Plan> = paths()
            .into_iter()
            .map(|p| Plan::with_path(win, p))
            .collect();
        if paths().contains(&Path::Avx2) {
            let plan = Plan::with_lanes(win, Path::Avx2, true, 64 << 10);
            if grouped(&plan) {
                plans.push(plan);
            }
        }
        plans
    }

    fn grouped(plan: &Plan) -> bool {
        #[cfg(target_arch = "x86_64")]
        return plan.lanes.is_some();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    /// Planes in lanes, eight and sixteen at a time where the CPU runs them: 3×3 and
    /// 5×5, stride 1 and 2, planes from 1×1 to wider than two vectors and up to 130×130
    /// (several strips, the last one short), up to 37 channels over 1–3 samples (so
    /// groups end mid-sample and the last is partial), a random subset of planes kept;
    /// skipped planes stay unwritten.
    #[test]
    fn planes_in_lanes_match_the_reference() {
        for path in lane_paths() {
            planes_in_lanes_match_the_reference_on(path);
        }
    }

    /// The paths this CPU runs planes in lanes on (eight lanes on AVX2, sixteen on
    /// AVX-512), each with its width.
    fn lane_paths() -> Vec<Path> {
        let p: Vec<Path> = paths()
            .into_iter()
            .filter(|&p| lanes_width(p).is_some())
            .collect();
        eprintln!(
            "lanes on {:?}",
            p.iter().map(|&q| (q, lanes_width(q))).collect::<Vec<_>>()
        );
        p
    }

    fn planes_in_lanes_match_the_reference_on(path: Path) {
        // A top or left padding of a whole kernel or more stays plane by plane.
        for pad_tl in [[3, 0], [0, 3]] {
            let win = Window {
                in_hw: [9, 9],
                out_hw: [7 + pad_tl[0], 7 + pad_tl[1]],
                kernel: [3, 3],
                stride: [1, 1],
                pad_tl,
            };
            assert!(!grouped(&Plan::with_lanes(win, path, true, 64 << 10)));
        }
        let mut rng = super::super::fresh_rng();
        for case in 0..300 {
            let k = [3, 5][case % 2];
            let s = 1 + case / 2 % 2;
            let pad_tl = [rng.random_range(0..k), rng.random_range(0..k)];
            // One case in four over planes large enough to go in several strips.
            let side = if case % 4 == 3 { 40..=130 } else { 1..=30 };
            let in_hw = [rng.random_range(side.clone()), rng.random_range(side)];
            let pad_br = [rng.random_range(0..k), rng.random_range(0..k)];
            let (ph, pw) = (
                in_hw[0] + pad_tl[0] + pad_br[0],
                in_hw[1] + pad_tl[1] + pad_br[1],
            );
            if ph < k || pw < k {
                continue;
            }
            let win = Window {
                in_hw,
                out_hw: [(ph - k) / s + 1, (pw - k) / s + 1],
                kernel: [k, k],
                stride: [s, s],
                pad_tl,
            };
            // Strips of one output row up to whole planes.
            let strip = [1 << 10, 64 << 10, 128 << 10, 1 << 20][rng.random_range(0..4)];
            let plan = Plan::with_lanes(win, path, true, strip);
            assert!(grouped(&plan), "{win:?}");
            // Up to 37 channels: groups of 16 end mid-sample and the last is partial too;
            // one case in eight more than eight groups, which go in parts of their strips
            // where their count is odd.
            let c = if case % 8 == 5 {
                rng.random_range(129..=150)
            } else {
                rng.random_range(1..=37)
            };
            let n = rng.random_range(1..=3);
            let (inp, outp) = (in_hw[0] * in_hw[1], win.out_hw[0] * win.out_hw[1]);
            let mut r = |len: usize| {
                (0..len)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            let (x, wt, b, res, shift) = (
                r(n * c * inp),
                r(c * k * k),
                r(c),
                r(n * c * outp),
                r(n * c),
            );
            let keep: Vec<bool> = (0..n * c).map(|_| rng.random_bool(0.7)).collect();
            let act = [Act::None, Act::Relu, Act::Relu6][case % 3];
            let residual = (case % 4 < 2).then_some(res.as_slice());
            let mut want = super::super::ops::depthwise(&x, &wt, &b, residual, act, c, win);
            for (p, &v) in want.chunks_mut(outp).zip(&shift) {
                p.iter_mut().for_each(|w| *w -= v);
            }
            let mut got = vec![f32::NAN; want.len()];
            plan.run(
                &mut got,
                &x,
                &wt,
                &b,
                residual,
                act,
                c,
                Some(&keep),
                Some(&shift),
            );
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                if keep[i / outp] {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{win:?} at {i}: {g} vs {e}"
                    );
                } else {
                    assert!(g.is_nan(), "{win:?}: skipped plane written at {i}");
                }
            }
        }
    }

    /// Planes in lanes through `run_planes` (as bands call it), with a scratch buffer
    /// left full of NaN by an earlier user: every cell a group reads must be written
    /// or cleared first.
    #[test]
    fn planes_in_lanes_ignore_what_the_scratch_held() {
        for path in lane_paths() {
            planes_in_lanes_ignore_what_the_scratch_held_on(path);
        }
    }

    fn planes_in_lanes_ignore_what_the_scratch_held_on(path: Path) {
        let mut rng = super::super::fresh_rng();
        for case in 0..100 {
            let (k, s) = ([3, 5][case % 2], 1 + case / 2 % 2);
            // Padding on every side, so that each row has cells left and right of the
            // plane and the strip rows above and below it.
            let pad = [0; 4].map(|_| rng.random_range(1..k));
            let in_hw = [rng.random_range(k..=60), rng.random_range(k..=60)];
            let (ph, pw) = (in_hw[0] + pad[0] + pad[2], in_hw[1] + pad[1] + pad[3]);
            let win = Window {
                in_hw,
                out_hw: [(ph - k) / s + 1, (pw - k) / s + 1],
                kernel: [k, k],
                stride: [s, s],
                pad_tl: [pad[0], pad[1]],
            };
            // Strips of one output row up to whole planes.
            let strip = [1 << 10, 64 << 10, 128 << 10, 1 << 20][rng.random_range(0..4)];
            let plan = Plan::with_lanes(win, path, true, strip);
            let c = rng.random_range(1..=19);
            let (inp, outp) = (in_hw[0] * in_hw[1], win.out_hw[0] * win.out_hw[1]);
            let mut r = |len: usize| {
                (0..len)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            let (x, wt, b) = (r(c * inp), r(c * k * k), r(c));
            let want = super::super::ops::depthwise(&x, &wt, &b, None, Act::None, c, win);
            let mut got = vec![f32::NAN; want.len()];
            let mut planes: Vec<PlaneIo> = got
                .chunks_mut(outp)
                .enumerate()
                .map(|(i, out)| PlaneIo {
                    out,
                    x: &x[i * inp..(i + 1) * inp],
                    k: &wt[i * k * k..(i + 1) * k * k],
                    bias: b[i],
                    shift: 0.0,
                })
                .collect();
            let mut scratch = vec![f32::NAN; 1 << 18];
            plan.run_planes(&mut planes, Act::None, &mut scratch);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{win:?} at {i}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn matches_reference_on_random_shapes() {
        let mut rng = super::super::fresh_rng();
        eprintln!("paths {:?}", paths());
        for _ in 0..200 {
            // Half the cases use the specialised 3×3 and 5×5 paths.
            let kernel = match rng.random_range(0..4) {
                0 => [3, 3],
                1 => [5, 5],
                _ => [rng.random_range(1..=7), rng.random_range(1..=7)],
            };
            let stride = [rng.random_range(1..=3), rng.random_range(1..=3)];
            let in_hw = [rng.random_range(1..40), rng.random_range(1..72)];
            let pad_tl = [
                rng.random_range(0..kernel[0]),
                rng.random_range(0..kernel[1]),
            ];
            // Half the cases pad to "same" size, which stride 1 runs as flat planes.
            let pad_br = if rng.random_bool(0.5) {
                [kernel[0] - 1 - pad_tl[0], kernel[1] - 1 - pad_tl[1]]
            } else {
                [
                    rng.random_range(0..kernel[0]),
                    rng.random_range(0..kernel[1]),
                ]
            };
            let (ph, pw) = (
                in_hw[0] + pad_tl[0] + pad_br[0],
                in_hw[1] + pad_tl[1] + pad_br[1],
            );
            if ph < kernel[0] || pw < kernel[1] {
                continue;
            }
            let out_hw = [
                (ph - kernel[0]) / stride[0] + 1,
                (pw - kernel[1]) / stride[1] + 1,
            ];
            let win = Window {
                in_hw,
                out_hw,
                kernel,
                stride,
                pad_tl,
            };
            let (n, c) = (rng.random_range(1..=2), rng.random_range(1..=5));
            let taps = kernel[0] * kernel[1];
            let mut r = |len: usize| {
                (0..len)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            let x = r(n * c * in_hw[0] * in_hw[1]);
            let k = r(c * taps);
            let b = r(c);
            let res = r(n * c * out_hw[0] * out_hw[1]);
            let shift = r(n * c);
            let plane = out_hw[0] * out_hw[1];
            for (act, residual, shifted) in [
                (Act::Relu6, None, false),
                (Act::None, Some(res.as_slice()), false),
                (Act::Relu, Some(&res), false),
                (Act::Relu6, None, true),
                (Act::Relu, Some(&res), true),
            ] {
                let mut want = super::super::ops::depthwise(&x, &k, &b, residual, act, c, win);
                if shifted {
                    for (p, &v) in want.chunks_mut(plane).zip(&shift) {
                        p.iter_mut().for_each(|w| *w -= v);
                    }
                }
                let shift = shifted.then_some(shift.as_slice());
                for plan in plans(win) {
                    let path = (plan.path, grouped(&plan));
                    let mut got = vec![f32::NAN; want.len()];
                    plan.run(&mut got, &x, &k, &b, residual, act, c, None, shift);
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{path:?} {win:?}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}
