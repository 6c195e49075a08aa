//! The fast CPU executor: convolutions as packed GEMM on the shared micro-kernels of
//! [`super::gemm`] (bias, residual and activation fused in the epilogue), a direct
//! depthwise kernel, and vectorized dot products for the classifier. Layout is NCHW.
//!
//! Weights are packed once, at load, in blocks of [`gemm::PACK`] rows. Work is split into
//! tasks of one B panel (up to [`NR`] output positions of one sample) times a chunk of
//! output channels. With many panels a task packs its own panel and runs every row block
//! on it while it is hot in cache; with few panels (late layers, batch 1) panels are
//! packed once and tasks split the output channels. Where the weights are too big for L2,
//! a task takes a group of panels and runs each block of A on all of them while it is in
//! L1, prefetching the next block: A then streams from memory once. Layer buffers come
//! from a pool and go back to it. Tasks run on the current rayon pool.
//!
//! A 3×3, stride-1, pad-1 convolution at most [`WINOGRAD_MAX_WIDTH`] wide runs by
//! Winograd's F(2×2, 3×3) ([`winograd`]): 16 GEMMs on the same micro-kernels, with
//! 2.25× fewer multiply-adds than the direct convolution, dense or on a plan's kept
//! channels ([`winograd_pays`]); a plan with kept pixels runs directly. Where the CPU's
//! [`Tuning`] says so, dense plans (and gated ones that keep most channel pairs) run by
//! Winograd over wider rows too, and layers from some width on by F(4×4, 3×3): 36 GEMMs
//! over 4×4 tiles, 4× fewer multiply-adds than the direct convolution.
//!
//! A 1×1 expansion whose output only a depthwise layer reads, and which is too big for
//! L2 (MobileNetV2's and EfficientNet-Lite0's 112 × 112 stage), runs together with that
//! layer band by band of rows ([`bands`]), on the same micro-kernels, gated or not.
//!
//! Dynamic passes run the same GEMM on a [`Subset`] per sample: kept output channels are
//! A's rows read in place by index, kept input channels are packed alone and their
//! columns of A copied into a compact A, kept pixels are the panel's columns; the output
//! is written in place. In a batch, the samples of a gated layer with few positions each
//! (7×7) and big weights run together instead, their tiles reading each sample's kept
//! columns of A through a column map ([`EngineExecutor::conv_gated_batch`]). Channel
//! gates score in [`super::gate_scores`]. Behind a gated
//! depthwise layer, kept planes are written less the constant a dropped plane would
//! become, and the next layer reads them with a bias that adds every constant back
//! ([`gating::DroppedConstants`]).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::bands::{self, Bands};
use super::depthwise;
use super::gate_scores::GateWeights;
use super::gemm::{self, ConvGeom, Epilogue, Isa, OutPtr, Residual, Tile, KC, NR};
use super::linear;
use super::ops::{self, Window};
use super::pool::{Buf, BufferPool, Spare};
use super::thread_choice::{ThreadChoice, Way};
use super::transposed;
use super::tuning::Tuning;
use super::winograd::{self, Algorithm, WinogradWeights};
#[cfg(target_arch = "x86_64")]
use super::winograd_lines;
use crate::error::{Error, Result};
use crate::exec::gating;
use crate::exec::{Budget, Cut, Executor, Forward, Gates, LayerTrace, Policy};
use crate::format::Model;
use crate::model::{Act, Op};

/// Output rows of the classifier per parallel task: 63 tasks for 1000 classes, enough
/// for rayon to even out two threads that run at different speeds.
const LINEAR_CHUNK_ROWS: usize = 16;

enum Layer {
    /// Convolution through the GEMM, one GEMM per group.
    Gemm {
        /// Each group's weights packed for the micro-kernels ([`gemm::pack_a`]), one
        /// after the other.
        weight: Vec<f32>,
        bias: Vec<f32>,
        groups: usize,
        geom: ConvGeom,
        residual: Option<usize>,
        act: Act,
        /// How input channels dropped upstream are accounted for.
        dropped: Option<gating::DroppedConstants>,
        /// The same weights transformed for Winograd's F(2×2, 3×3) or F(4×4, 3×3)
        /// ([`Tuning::winograd_f4_min_width`]), where the layer is a 3×3, stride-1,
        /// pad-1 convolution ([`winograd_fits`]).
        winograd: Option<WinogradWeights>,
        /// The same weights as panels of output channels ([`transposed::ChannelPanels`]),
        /// where the layer is a 1×1 one whose input a gate may thin and whose plane is
        /// small against its channels ([`transposed::pays`]).
        channel_panels: Option<transposed::ChannelPanels>,
        /// The same weights row by row, where the layer has a channel gate, its input
        /// no gate thins, and its geometry [`rows_major_fits`] (a 1×1 one over at most
        /// 14 × 14, a stride-2 one over at most 7 × 7), on AVX-512.
        rows_major: Option<Vec<f32>>,
    },
    Depthwise {
        weight: Vec<f32>,
        bias: Vec<f32>,
        plan: depthwise::Plan,
        residual: Option<usize>,
        act: Act,
        /// Subtracted from kept planes of samples that dropped channels: the
        /// [`gating::DroppedConstants::constants`] of its readers.
        shift: Option<Vec<f32>>,
    },
    Linear {
        weight: Vec<f32>,
        bias: Vec<f32>,
        act: Act,
    },
    MaxPool(Window),
    GlobalAvgPool,
    AdaptiveAvgPool {
        in_hw: [usize; 2],
        output: [usize; 2],
    },
}

/// A banded expansion's operands for one pass ([`EngineExecutor::run_bands`]).
#[derive(Clone, Copy)]
struct BandPass<'a> {
    bands: &'a Bands,
    /// The expansion's packed weights, bias and activation.
    weight: &'a [f32],
    bias: &'a [f32],
    act: Act,
    inputs: Inputs<'a>,
    /// The expansion's channel gate, when it runs.
    gate: Option<(&'a GateWeights, Cut)>,
    dw: bands::Depthwise<'a>,
    /// The depthwise layer's constants of dropped channels (its `shift`).
    shift: Option<&'a [f32]>,
}

/// The input channels a gated convolution reads, per sample.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    /// Each sample's kept input channels, ascending; `None` when all are.
    kept: Option<&'a Vec<Vec<usize>>>,
    /// How dropped input channels are accounted for.
    dropped: Option<&'a gating::DroppedConstants>,
    /// Each sample's input channel means (`[sample][channel]`), where they were taken
    /// as the input was copied ([`copy_pooled`]); a channel gate then reads them
    /// instead of summing the planes again.
    means: Option<&'a [f32]>,
}

/// Dense execution with the dynsparse CPU engine.
pub struct EngineExecutor {
    layers: Vec<(usize, Layer)>,
    /// Per value: elements per sample.
    sizes: Vec<usize>,
    last_use: Vec<usize>,
    classes: usize,
    isa: Isa,
    /// 0, 1, …, max output channels: row indices for dense tiles.
    all_rows: Vec<usize>,
    /// 0, 1, …, max output positions: column indices for dense tiles.
    all_cols: Vec<usize>,
    pool: BufferPool,
    /// Per node: the channel gate of a gated convolution.
    gates: Vec<Option<GateWeights>>,
    /// Per node: the spatial gate of a gated convolution.
    spatial: Vec<Option<gating::SpatialGate>>,
    /// Kept channel counts are rounded up to a multiple of this.
    round: usize,
    /// Kept channels are chosen in aligned groups of this many (1: one by one).
    group: usize,
    /// Per node: dense FLOPs for one sample.
    flops: Vec<u64>,
    /// Size of A (bytes) above which panels run in groups ([`A_RESIDENT_BYTES`]).
    a_resident: usize,
    /// Kept weights (bytes) above which tasks copy their own blocks ([`LOCAL_A_BYTES`]).
    local_a: usize,
    /// Rows and K from which an AVX2 1×1 layer over 7×7 planes packs its panels
    /// ([`PACK_MISALIGNED_FROM`]).
    pack_misaligned: usize,
    /// K from which an AVX-512 one over 14×14 planes does
    /// (`Tuning::pack_misaligned_avx512`).
    pack_misaligned_avx512: usize,
    /// K per block of the packed GEMM's tiles (`Tuning::gemm_kc`).
    kc: usize,
    /// Samples run through the network together at most ([`SUB_BATCH_FLOATS`]).
    sub_batch: usize,
    /// Floats a value may hold over a whole batch where the rest of the network runs on
    /// the whole batch rather than in parts ([`WHOLE_BATCH_FLOATS`]).
    whole_batch: usize,
    /// Per node: a 1×1 expansion that runs in bands together with the depthwise layer
    /// after it, where neither is gated ([`bands`]).
    bands: Vec<Option<Bands>>,
    /// Per node: a convolution whose only reader is a depthwise layer, which shares out
    /// its work by channel ([`Subset`]'s `by_rows`).
    depthwise_next: Vec<bool>,
    /// Output panels per sample up to which a gated batch runs its samples together
    /// ([`BATCH_GATED_PANELS`]; 0: sample by sample).
    batch_gated_panels: usize,
    /// What packing a panel costs, in output rows' worth of multiply-adds, when a
    /// spatial plan weighs reading its kept pixels in place against packing them
    /// ([`KEPT_IN_PLACE_PACK_ROWS`]); `None`: always packed.
    kept_in_place: Option<usize>,
    /// Whether 1×1 layers prefetch the panels they read in place next (see
    /// [`EngineExecutor::without_panel_prefetch`]).
    panel_prefetch: bool,
    /// Whether Winograd layers may run band by band, each thread on its own share of the
    /// tiles ([`winograd::Job::bands`]).
    winograd_bands: bool,
    /// The cuts of FLOP budgets planned before ([`BudgetPlans`]).
    budget_plans: BudgetPlans,
    /// Nodes with a channel gate that read the network's input, whose means are then
    /// taken as the input is copied ([`copy_pooled`]).
    input_gates: Vec<usize>,
    /// Per node: the convolutions with a channel gate that read its output, for which it
    /// sums its output planes as it writes them ([`PanelSums`]).
    sum_readers: Vec<Vec<usize>>,
    /// How long the pool's other workers spin after a pass, waiting for the next
    /// ([`EngineExecutor::with_linger`]).
    linger: std::time::Duration,
    /// Whether convolutions sum their output for the gates reading it (see
    /// [`EngineExecutor::without_summed_means`]).
    summed_means: bool,
    /// Values per channel of the network's input.
    input_plane: usize,
    /// Buffers of a gated batch run together: each sample's padded input and panels.
    /// Taken from `pool`, the layers after ran slower (ResNet-18 at batch 8, budget 0.5:
    /// its layer 4's first convolutions 1.06–1.07 of their time in in-process pairs;
    /// ResNet-50 1.03–1.04) — presumably as those buffers, two per sample and all of one
    /// size, took the ones the layers' values had fitted best.
    gated_pool: BufferPool,
    /// Whether a pass runs on the calling pool or on one thread, by recent times (`None`:
    /// always the pool; see [`EngineExecutor::without_thread_choice`]).
    thread_choice: Option<ThreadChoice>,
    /// The one thread passes run on when [`Way::One`] is chosen, started at first use.
    one_thread: OnceLock<Option<rayon::ThreadPool>>,
}

/// Per value, per sample: the channels that hold computed data (`None`: all). Channels
/// outside it are not written (they hold whatever the buffer held): every reader of a
/// gated value is a convolution that skips them ([`gating::gateable`] guarantees it), so
/// the memset of channels nobody reads is saved.
type Kept = Option<Vec<Vec<usize>>>;

/// What a run of consecutive nodes leaves ([`EngineExecutor::run_nodes`]).
struct Segment {
    /// The value after the last node, every sample's.
    out: Buf,
    /// Its kept sets.
    kept: Kept,
    /// Per node of the network (`None` outside the run), per sample: the output
    /// channels computed.
    node_kept: Vec<Kept>,
    /// Per node of the network, per sample: the output tiles computed.
    node_tiles: Vec<Kept>,
    /// Per node of the run.
    traces: Vec<LayerTrace>,
    /// Per sample: FLOPs the gates spent deciding.
    gate_flops: Vec<u64>,
}

/// The cuts one node's gates apply in a pass (`Cut::All`: that gate does not run).
#[derive(Clone, Copy, Debug, PartialEq)]
struct NodeCut {
    channels: Cut,
    tiles: Cut,
}

/// The per-node cuts planned for FLOP budgets, by budget, whether tiles are cut too, and
/// the channel rounding and grouping they were planned with. A budget's cuts depend on
/// nothing else (not on the input), and planning them (a bisection and then steps of one
/// tile, each counting the whole network's FLOPs) took 41–58 µs of every MobileNetV2
/// pass at budget 0.5 and 63–109 µs of every ResNet-50 pass (batch 1, 2026-12-05, in a
/// slow hour: 1.6% and 0.3% of their gated passes' time then).
#[derive(Default)]
struct BudgetPlans(std::sync::Mutex<Vec<(BudgetKey, Option<Vec<NodeCut>>)>>);

/// A budget's bits, whether it cuts tiles, the rounding and the grouping.
type BudgetKey = (u64, bool, usize, usize);

/// Budgets remembered at most; the oldest is forgotten first.
const BUDGET_PLANS: usize = 16;

impl BudgetPlans {
    fn get(&self, key: BudgetKey) -> Option<Option<Vec<NodeCut>>> {
        // A poisoned lock still holds whole entries: each is pushed complete.
        let plans = self.0.lock().unwrap_or_else(|e| e.into_inner());
        plans
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, c)| c.clone())
    }

    fn put(&self, key: BudgetKey, cuts: Option<Vec<NodeCut>>) {
        let mut plans = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if plans.iter().all(|(k, _)| *k != key) {
            if plans.len() == BUDGET_PLANS {
                plans.remove(0);
            }
            plans.push((key, cuts));
        }
    }
}

/// A gated convolution's gates for one pass.
#[derive(Clone, Copy)]
struct ConvGates<'a> {
    /// The channel gate and its cut.
    channels: Option<(&'a GateWeights, Cut)>,
    /// The spatial gate and its cut.
    tiles: Option<(&'a gating::SpatialGate, Cut)>,
}

impl ConvGates<'_> {
    /// Neither gate cuts.
    fn is_open(&self) -> bool {
        self.channels.is_none() && self.tiles.is_none()
    }
}

/// Part of a convolution to compute (`None`: all): output channels (`rows`), output
/// positions (`cols`, strictly ascending) and input channels (`chans`), each sorted —
/// one sample's plan in a gated pass.
#[derive(Clone, Copy, Default)]
struct Subset<'a> {
    rows: Option<&'a [usize]>,
    cols: Option<&'a [usize]>,
    chans: Option<&'a [usize]>,
    /// Rows outside `rows` are never read: leave them unwritten.
    dropped_unread: bool,
    /// Run on the calling thread: the caller already splits work across samples.
    serial: bool,
    /// Share out output rows before output positions: the output's reader splits its
    /// work by channel (see `conv_gemm_into`).
    by_rows: bool,
    /// Where to leave the sums of the output's panels, for a channel gate reading it.
    sums: Option<PanelSums<'a>>,
    /// The layer's weights row by row, for a plan of kept rows and every input channel
    /// ([`gemm::accumulate_rows_major`]).
    rows_major: Option<&'a [f32]>,
}

/// Where a convolution leaves, for each sample, panel of [`NR`] output positions and
/// output row, the sum of that row's cells in the panel ([`block_sum`]), at
/// `at[(sample · panels + panel) · rows + row]`; a plane's mean is then its panels' sums
/// added in order, over the plane's size: the bits [`sum`] gives, so a gate decides as on
/// means it took itself. The task that stores a panel sums it while its cells are in
/// that core's cache, where a gate pooling the plane afterwards read all of it again,
/// half of it from the other core (ResNet-50 at budget 0.5: its gates pooled for 1.1
/// of their 1.6 ms per pass at batch 1). A convolution that sums adds its batch to
/// `filled`; one that runs another way (Winograd, a spatial plan, row segments) leaves
/// it, and the gate pools.
#[derive(Clone, Copy)]
struct PanelSums<'a> {
    at: OutPtr,
    panels: usize,
    filled: &'a std::sync::atomic::AtomicUsize,
}

/// One sample's plan in a batch of gated samples ([`EngineExecutor::conv_gated_batch`]):
/// kept output rows and input channels (`None`: all), its bias, and whether rows it
/// drops are never read.
struct SamplePlan<'a> {
    rows: Option<&'a [usize]>,
    chans: Option<&'a [usize]>,
    bias: &'a [f32],
    dropped_unread: bool,
}

/// What one sample's gates decided for a gated convolution.
struct Decided {
    /// Kept input channels (all of them when none were dropped upstream).
    ic: Vec<usize>,
    /// Kept output channels.
    oc: Vec<usize>,
    /// Kept output tiles (empty without a spatial gate), and their pixels when some are
    /// dropped.
    tiles: Vec<usize>,
    cols: Option<Vec<usize>>,
    /// Whether the sample's bias is the one that adds dropped inputs' constants back.
    shifted: bool,
    gate_flops: u64,
    gate_ms: f64,
}

/// One sample's result of a gated convolution: kept output channels, kept tiles,
/// FLOPs (gates included), the gates' FLOPs and the gates' time in milliseconds.
type SampleOut = (Vec<usize>, Vec<usize>, u64, u64, f64);

/// What a compact convolution computed, per sample.
struct Compact {
    out: Buf,
    /// Kept output channels.
    oc: Vec<Vec<usize>>,
    /// Kept output tiles (empty without a spatial gate).
    tiles: Vec<Vec<usize>>,
    /// FLOPs, gates included.
    flops: Vec<u64>,
    /// Of which the gates'.
    gate_flops: Vec<u64>,
    /// Time the gates took, summed over samples (which run in parallel).
    gate_ms: f64,
}

/// Size of A (bytes) above which panels run in groups on each block of A (a part of
/// the 1 MiB L2 of a Zen core, which also holds the panels and output).
const A_RESIDENT_BYTES: usize = 384 << 10;

/// Activation values (of the network's biggest value, summed over samples) up to which
/// a batch runs through the network together; bigger batches run in parts of that many
/// samples, one part after the other (up to where the rest runs on the whole batch,
/// [`WHOLE_BATCH_FLOATS`]). Layer after layer over a whole batch, the early
/// layers' values (MobileNetV2: 4.8 MB per sample) fall out of the 32 MiB L3 between a
/// layer and the next; in parts they stay in it. In-process pairs at batch 8 (whole
/// batch against one or two samples at a time): MobileNetV2 0.63, EfficientNet-Lite0
/// 0.74, ResNet-50 0.88 (two at a time; 0.94 one), ResNet-18 0.96–1.00.
const SUB_BATCH_FLOATS: usize = 2 << 20;

/// Samples per part at least, however big the activations ([`SUB_BATCH_FLOATS`]). One
/// sample at a time runs every layer's parallel loops for one sample, with little to
/// share between two threads. On the AVX2 machine of 2026-12-03, in-process pairs at
/// batch 8 (10–16, 2 threads), parts of two against parts of one: MobileNetV2 dense
/// 0.855–0.859 (two runs) and 0.91 at budget 0.5, EfficientNet-Lite0 dense 0.91–0.98 (two
/// runs) and 0.89; parts of three: 0.86 and 0.90 dense. The ResNets already ran in parts
/// of two; parts of four changed nothing (1.01–1.02).
const MIN_SUB_BATCH: usize = 2;

/// A batch that runs in parts ([`SUB_BATCH_FLOATS`]) runs the rest of the network on the
/// whole batch from the first node where every value to come, over the whole batch,
/// holds at most this many floats (4 MiB): the values then stay in the caches anyway,
/// and each later layer reads its weights once per batch rather than once per part,
/// with one set of parallel loops instead of one per part. At batch 8 that is from
/// MobileNetV2's 14×14 stage, EfficientNet-Lite0's 7×7 stage, the second block of
/// ResNet-18's layer 2 and of ResNet-50's layer 4. In-process pairs (10–16, 2 threads,
/// batch 8), against the whole network in parts of two: MobileNetV2 0.94–0.95 of the
/// time dense (0.92–1.02 with a bound of half this) and 0.94–0.96 at budget 0.5;
/// EfficientNet-Lite0 0.95 and 0.95–0.96; ResNet-18 0.98–0.99 dense; ResNet-50 0.99
/// dense, 0.97–1.05 at budget 0.5 (its layer 4 0.83–0.92 of the time per layer, the
/// classifier 0.62).
const WHOLE_BATCH_FLOATS: usize = 1 << 20;

/// Kept input values from which a channel gate's input means are summed by all of the
/// pool's threads rather than by the calling one alone. Small inputs (ResNet-50's 3×3
/// layers' gates at budget 0.5, 20–30 thousand values) stay on one thread: an earlier
/// measurement with every gate's sums shared found ResNet-50's gates slower (1.56–1.78
/// ms per pass against 1.17–1.19, batch 1, a 2-core VM). With this bound, on the AVX2
/// machine of 2026-12-03 (2 threads, batch 1, budget 0.5, in-process pairs, five runs of
/// 20–30): ResNet-50 0.965–0.999 of the time (median 0.985), its first blocks' 1×1 gates
/// taking 0.54–0.60 of their time; MobileNetV2 0.985–1.008, ResNet-18 0.994,
/// EfficientNet-Lite0 0.999; ResNet-50 at batch 8 1.000.
const PAR_POOL_FLOATS: usize = 64 << 10;

/// Panels per group where A is big: their K blocks (24 KiB each) stay in L2.
const GROUP_PANELS: usize = 8;

/// Tasks per thread at least when a stride-2 layer's padded input is split into its
/// column phases ([`EngineExecutor::pad_split_planes`]): planes fewer than that are split
/// in bands of rows too. A stem's three planes went to the threads whole, two to one and
/// one to the other; in bands (six a plane on two threads), in-process pairs (100–150, 2
/// threads, batch 1): MobileNetV2's stem 0.80 of its time and EfficientNet-Lite0's 0.72,
/// passes 0.984–0.986 and 0.984–0.985 (0.986 and 0.970 at budget 0.5); ResNet's 7×7
/// stem 0.88–0.96, ResNet-18's passes 0.994–1.011 and ResNet-50's 1.004–1.012 (a
/// control of two engines alike read 1.002).
const SPLIT_TASKS_PER_THREAD: usize = 8;

/// Values per task of the network input's copy (see `copy_of`).
const COPY_CHUNK: usize = 16 << 10;

/// Fewest values of a packed panel per part when panels are packed in parts of their
/// input channels (see `conv_gemm_into`).
const PACK_PART_FLOATS: usize = 16 << 10;

/// Kept weights (bytes) above which a task copies the kept columns of its own rows'
/// blocks of A, rather than the layer copying every block's once: a core's L2 (1 MiB
/// on the machine it was measured on; below it, no gain was measured).
const LOCAL_A_BYTES: usize = 1 << 20;

/// Kept weights (bytes) above which a layer of at most two panels copies them per task
/// (see `LOCAL_A_BYTES`). MobileNetV2 at budget 0.5, five alternating processes: its
/// last 7×7 projection (960 → 320) took 0.70 (one thread) and 0.75 (two) of its time,
/// the two before it 0.83–0.84 (two threads); with every layer above 128 KiB copying
/// per task, ResNet-50's 1×1 layers at 14×14 (seven panels) took 1.13×.
const LOCAL_A_FEW_PANELS_BYTES: usize = 128 << 10;

/// Weights (bytes) up to which a plan's compact copy of its kept columns runs on the
/// calling thread: a parallel loop over two or three blocks of A costs more than the
/// copy. MobileNetV2's and EfficientNet-Lite0's gated layers at budget 0.5, batch 1
/// (in-process pairs, 2 threads, three runs): passes 0.983–1.002 and 0.980–0.993 of their
/// time, the ResNets 0.993–0.995; batch 8 0.996–1.000. Up to 128 KiB: 1.003 and 1.008.
const SERIAL_COPY_BYTES: usize = 32 << 10;

/// Rows and K (both) from which an AVX2 1×1 stride-1 layer over small planes that are
/// not a whole number of 64-byte lines (7×7) packs its panels instead of reading them in
/// place, and K from which an AVX-512 one over 14×14 planes does where the tuning packs
/// them (see `conv_gemm_into` and `Tuning::pack_misaligned_avx512`).
pub(super) const PACK_MISALIGNED_FROM: usize = 128;

/// Output bytes per sample from which tiles prefetch their successor's output and
/// residual lines (see `conv_gemm_into`). ResNet-50 at batch 1, one thread, six
/// alternating processes each way: layer 1's 1×1 `conv3` and downsample layers (256
/// planes of 56×56, 3.2 MB) took 0.66–0.78 and 0.71–0.83 of their time without it; at
/// 1.6 MB (layer 2's `conv3`) 0.91–1.0; MobileNetV2's 1×1 layers (at most 1.8 MB
/// outside the bands) got slower, up to 1.2×, by the prefetch instructions alone.
const PREFETCH_OUT_BYTES: usize = 2 << 20;

/// Packed weights (bytes) up to which a plan's kept rows are gathered into consecutive
/// rows (see `conv_gemm_into`). One thread, K = 27 to 96, tiles of 12 rows spread over
/// two blocks and read through panel offsets ran 10–25% slower than rows in one block
/// (micro-benchmark, median of 35). MobileNetV2 at budget 0.5 (its stem keeps 24 of 32
/// channels), five alternating processes on one thread: the stem took 0.87 of its time,
/// the pass 0.96–0.98 (noise as large). Bigger A would pay more for the gather.
const SMALL_A_BYTES: usize = 16 << 10;

/// Narrowest output row a k×k stride-1 convolution reads in place (see `conv_gemm_into`).
const IMPLICIT_WIDTH: usize = 28;

/// Longest K up to which a convolution read in place runs whole output rows per task
/// (their row segments as one panel group) rather than one segment. A 3×3 stem over three
/// channels (K = 27) does about 0.5 µs of multiply-adds per segment of 32 positions, and
/// the task around it (its tiles, the loop's split) cost about a third as much again.
/// MobileNetV2's and EfficientNet-Lite0's stems (3×3 stride 2, 112 wide) took 0.79 of
/// their time with one row per task; whole passes, 2 threads, in-process pairs:
/// 0.985–0.997 at batch 1, 0.993–1.004 at batch 8, 0.990–0.996 at budget 0.5. Up to 256,
/// taking in ResNet's 7×7 stem (K = 147): ResNet-18 1.005 at batch 1 and 1.017 at batch 8.
/// Then as many rows as leave eight tasks a thread (7 of the stems' 112 on two threads)
/// rather than one: alone, 2 threads, 0.95–0.96 of the time with 4 rows, 0.95 with 7–8;
/// in passes (one engine, the way switched pass by pass, 200 pairs) the stems 0.86–0.89,
/// MobileNetV2 0.987–0.988 and Lite0 0.983–0.998 at batch 1, 0.993 and 0.997 at batch 8
/// (30 pairs), 0.993 and 0.997 at budget 0.5. With those rows, up to 256 as well: ResNet's
/// stem alone 0.91 of its time on two threads, 0.98 on one; in passes (60 pairs, two
/// runs) 0.83–0.94, ResNet-18 0.985 and 0.992 at batch 1, ResNet-50 0.981 and 0.982;
/// ResNet-18 0.979 at batch 8 (10 pairs), ResNet-50 0.989 (8); at budget 0.5 0.980 and
/// 0.980 in one run, ResNet-18 0.997 in another (100 pairs) and 1.003 at budget 0.25:
/// the stem 0.94–0.95 of its time, the max pool after it 1.09–1.13 (its input now
/// written in longer runs of rows by one core or the other).
const IMPLICIT_ROW_TASK_K: usize = 256;

/// Output widths at which an AVX2 k×k stride-1 convolution sweeps its padded input flat
/// (see `conv_gemm_into`). A 28-wide row as a row segment computes 32 lanes, flat 30; a
/// 14-wide layer has no row segments and packed its panels (im2col), flat it reads them
/// in place with the same number of panels. The stored lanes are moved together by
/// `gemm::avx2::store_lanes`. One layer, in-process pairs (40), 3×3: 256 → 256 at 14×14
/// 0.91 of the time on one thread, 0.96–0.97 on two; 128 → 128 at 28×28 0.97; with its
/// input and output channels gated (keep 0.55) 256 → 256 at 14×14 0.83; 64 → 64 at
/// 56×56 (rows of 32 + 24 lanes, nothing to save) 1.00–1.01, so not from 56. Whole
/// passes (40 pairs, 2 threads, batch 1; once with every width from 14, once with
/// these): ResNet-18 0.99 dense and 0.97–0.98 at budget 0.5, ResNet-50 0.97–0.98 and
/// 0.98; batch 8 (10 pairs, from 14) 1.00 and 0.98.
const FLAT_AVX2_WIDTHS: std::ops::Range<usize> = 14..56;

impl EngineExecutor {
    /// Prepares the model for the engine with the best kernels for this CPU.
    pub fn new(model: &Model) -> Result<Self> {
        Self::with_isa(model, Isa::detect())
    }

    /// Prepares the model with a specific micro-kernel (for tests and benchmarks).
    pub fn with_isa(model: &Model, isa: Isa) -> Result<Self> {
        Self::with_tuning(model, isa, Tuning::detect())
    }

    /// Prepares the model with a specific micro-kernel and the choices made for one
    /// microarchitecture ([`Tuning`]), whatever this CPU is: to compare the choices on
    /// one machine, or to test both.
    ///
    /// ```
    /// use dynsparse::exec::cpu::{gemm::Isa, EngineExecutor, Tuning};
    /// use dynsparse::exec::Executor;
    /// use dynsparse::synthetic::{conv_chain, pseudo_random, ConvSpec};
    /// // A 3×3 layer 56 wide: by Winograd with the Intel choices, directly by default.
    /// let conv = ConvSpec { cout: 8, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(8, 56, &[conv])?;
    /// let input = pseudo_random(8 * 56 * 56, 1);
    /// let isa = Isa::detect();
    /// let intel = EngineExecutor::with_tuning(&model, isa, Tuning::INTEL)?.forward(&input, 1)?;
    /// let amd = EngineExecutor::with_tuning(&model, isa, Tuning::DEFAULT)?.forward(&input, 1)?;
    /// assert!((intel[0] - amd[0]).abs() <= 1e-4 * amd[0].abs().max(1.0));
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn with_tuning(model: &Model, isa: Isa, tuning: Tuning) -> Result<Self> {
        Self::build(
            model,
            isa,
            tuning,
            bands::min_expanded_bytes,
            bands::BAND_BYTES,
        )
    }

    /// [`Self::with_tuning`], expansions of at least `band_min(window)` bytes per sample
    /// (the depthwise layer's window) running in bands of at most `band_bytes`
    /// ([`bands`]).
    fn build(
        model: &Model,
        isa: Isa,
        tuning: Tuning,
        band_min: fn(&Window) -> usize,
        band_bytes: usize,
    ) -> Result<Self> {
        let nodes = &model.desc.nodes;
        let gates: Vec<Option<GateWeights>> = gating::channel_gates(model)?
            .iter()
            .map(|g| g.as_ref().map(GateWeights::new))
            .collect();
        // Whether node `j`'s output may lack channels in a gated pass: a gated
        // convolution's, or a depthwise layer's over such an output.
        let thinned = |j: usize| {
            gates[j].is_some()
                || matches!(&nodes[j].op, Op::Conv(c) if c.groups > 1 && c.groups == c.in_channels)
                    && nodes[j]
                        .input
                        .checked_sub(1)
                        .is_some_and(|s| gates[s].is_some())
        };
        let mut layers = Vec::with_capacity(nodes.len());
        let mut last_use = vec![usize::MAX; nodes.len() + 1];
        let mut readers = vec![0usize; nodes.len() + 1];
        let mut sizes = vec![model.layers[0].input.iter().product()];
        let (mut max_rows, mut max_cols) = (0, 0);
        for (i, (node, info)) in nodes.iter().zip(&model.layers).enumerate() {
            last_use[node.input] = i;
            readers[node.input] += 1;
            sizes.push(info.output.iter().product());
            let w = || Ok::<_, Error>(model.weight(&format!("{}.weight", node.name))?.data.clone());
            let b = || Ok::<_, Error>(model.weight(&format!("{}.bias", node.name))?.data.clone());
            let [_, ih, iw] = info.input;
            let [_, oh, ow] = info.output;
            let layer = match &node.op {
                Op::Conv(cv) => {
                    if let Some(r) = cv.residual {
                        last_use[r] = i;
                        readers[r] += 1;
                    }
                    let [t, _, l, _] = cv.padding.resolve([ih, iw], cv.kernel, cv.stride);
                    if cv.groups > 1 && cv.groups == cv.in_channels && cv.groups == cv.out_channels
                    {
                        Layer::Depthwise {
                            weight: w()?,
                            bias: b()?,
                            plan: depthwise::Plan::new(
                                Window {
                                    in_hw: [ih, iw],
                                    out_hw: [oh, ow],
                                    kernel: cv.kernel,
                                    stride: cv.stride,
                                    pad_tl: [t, l],
                                },
                                tuning.depthwise_strip_bytes,
                            ),
                            residual: cv.residual,
                            act: cv.act,
                            shift: None,
                        }
                    } else {
                        max_rows = max_rows.max(cv.out_channels);
                        max_cols = max_cols.max(oh * ow);
                        let (rows, k) = (cv.out_channels / cv.groups, cv.in_channels / cv.groups);
                        let k = k * cv.kernel[0] * cv.kernel[1];
                        let raw = w()?;
                        let mut weight =
                            Vec::with_capacity(cv.groups * gemm::packed_a_len(rows, k));
                        for g in raw.chunks_exact(rows * k) {
                            weight.extend_from_slice(&gemm::pack_a(g, rows, k));
                        }
                        let winograd = winograd_fits(
                            cv.groups,
                            cv.kernel,
                            cv.stride,
                            [t, l],
                            [ih, iw],
                            [oh, ow],
                            tuning.winograd_wide_width.max(WINOGRAD_MAX_WIDTH),
                        )
                        .then(|| {
                            let algo = if ow >= tuning.winograd_f4_min_width {
                                Algorithm::F4
                            } else {
                                Algorithm::F2
                            };
                            let mut wg = WinogradWeights::new(&raw, rows, cv.in_channels, algo);
                            wg.wide_min_kept = tuning.winograd_wide_min_kept;
                            #[cfg(target_arch = "x86_64")]
                            if winograd_lines::serves(isa, 1, [oh, ow]) {
                                wg.lines = Some(Default::default());
                                wg.lines_max_kept = tuning.lines_max_kept;
                            }
                            wg
                        });
                        let channel_panels = (cv.groups == 1
                            && cv.kernel == [1, 1]
                            && cv.stride == [1, 1]
                            && [t, l] == [0, 0]
                            && [oh, ow] == [ih, iw]
                            && node.input.checked_sub(1).is_some_and(thinned)
                            && transposed::pays(cv.out_channels, oh * ow))
                        .then(|| {
                            transposed::ChannelPanels::new(&raw, cv.out_channels, cv.in_channels)
                        });
                        let geom = ConvGeom {
                            in_c: cv.in_channels / cv.groups,
                            in_hw: [ih, iw],
                            out_hw: [oh, ow],
                            kernel: cv.kernel,
                            stride: cv.stride,
                            pad_tl: [t, l],
                        };
                        // (Only plans that keep every input channel read them.)
                        let rows_major = (isa == Isa::Avx512
                            && tuning.rows_major
                            && cv.groups == 1
                            && gates[i].is_some()
                            && !node.input.checked_sub(1).is_some_and(thinned)
                            && rows_major_fits(&geom))
                        .then(|| raw.clone());
                        Layer::Gemm {
                            weight,
                            bias: b()?,
                            groups: cv.groups,
                            geom,
                            residual: cv.residual,
                            act: cv.act,
                            dropped: gating::DroppedConstants::for_node(model, i)?,
                            winograd,
                            channel_panels,
                            rows_major,
                        }
                    }
                }
                Op::Linear(l) => Layer::Linear {
                    weight: w()?,
                    bias: b()?,
                    act: l.act,
                },
                Op::MaxPool(p) => Layer::MaxPool(Window {
                    in_hw: [ih, iw],
                    out_hw: [oh, ow],
                    kernel: p.kernel,
                    stride: p.stride,
                    pad_tl: p.padding,
                }),
                Op::GlobalAvgPool => Layer::GlobalAvgPool,
                Op::AdaptiveAvgPool { output } => Layer::AdaptiveAvgPool {
                    in_hw: [ih, iw],
                    output: *output,
                },
            };
            layers.push((node.input, layer));
        }
        // A depthwise layer whose readers account for dropped channels through
        // their shifted bias writes its kept planes less their constant.
        let shifts: Vec<(usize, Vec<f32>)> = layers
            .iter()
            .filter_map(|(src, l)| match l {
                Layer::Gemm {
                    dropped: Some(d), ..
                } => Some((src - 1, d.constants.clone())),
                _ => None,
            })
            .collect();
        for (j, constants) in shifts {
            if let Layer::Depthwise { shift, .. } = &mut layers[j].1 {
                *shift = Some(constants);
            }
        }
        let bands = (0..layers.len())
            .map(|i| {
                let strip = tuning.depthwise_strip_bytes;
                band_pair(&layers, &readers, i, band_min, band_bytes, strip)
            })
            .collect();
        let depthwise_next = (0..layers.len())
            .map(|i| {
                matches!(layers[i].1, Layer::Gemm { groups: 1, .. })
                    && matches!(layers.get(i + 1), Some(&(src, Layer::Depthwise { .. })) if src == i + 1)
                    && readers[i + 1] == 1
            })
            .collect();
        let spatial = gating::spatial_gates(model)?;
        let input_gates = (0..layers.len())
            .filter(|&i| {
                layers[i].0 == 0
                    && gates[i].is_some()
                    && matches!(layers[i].1, Layer::Gemm { groups: 1, .. })
            })
            .collect();
        let sum_readers = (0..layers.len())
            .map(|i| {
                if !matches!(layers[i].1, Layer::Gemm { groups: 1, .. }) {
                    return Vec::new();
                }
                (0..layers.len())
                    .filter(|&j| {
                        layers[j].0 == i + 1
                            && gates[j].is_some()
                            && matches!(layers[j].1, Layer::Gemm { groups: 1, .. })
                    })
                    .collect()
            })
            .collect();
        Ok(EngineExecutor {
            gates,
            spatial,
            round: isa.mr(),
            group: 1,
            flops: model.layers.iter().map(|l| l.flops).collect(),
            a_resident: A_RESIDENT_BYTES,
            local_a: LOCAL_A_BYTES,
            pack_misaligned: PACK_MISALIGNED_FROM,
            pack_misaligned_avx512: tuning.pack_misaligned_avx512,
            kc: tuning.gemm_kc.max(1),
            sub_batch: (SUB_BATCH_FLOATS / sizes.iter().copied().max().unwrap_or(1).max(1))
                .max(MIN_SUB_BATCH),
            whole_batch: WHOLE_BATCH_FLOATS,
            layers,
            sizes,
            last_use,
            classes: model.desc.classes.len(),
            isa,
            all_rows: (0..max_rows).collect(),
            all_cols: (0..max_cols).collect(),
            pool: BufferPool::default(),
            bands,
            depthwise_next,
            batch_gated_panels: BATCH_GATED_PANELS,
            kept_in_place: Some(KEPT_IN_PLACE_PACK_ROWS),
            panel_prefetch: true,
            winograd_bands: true,
            gated_pool: BufferPool::default(),
            budget_plans: BudgetPlans::default(),
            input_gates,
            input_plane: model.desc.input.height * model.desc.input.width,
            sum_readers,
            linger: std::time::Duration::ZERO,
            summed_means: true,
            thread_choice: Some(ThreadChoice::default()),
            one_thread: OnceLock::new(),
        })
    }

    /// Runs every layer on its own: no 1×1 expansion and depthwise layer together in bands
    /// (see the module documentation), to measure what the bands buy.
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::Executor;
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // MobileNetV2's second block's expansion (16 → 96 channels at 112 × 112, 4.8 MB)
    /// // and the stride-2 depthwise layer reading it: banded unless told otherwise.
    /// let conv = |cout, k, stride, depthwise| ConvSpec { cout, k, stride, depthwise };
    /// let model = conv_chain(16, 112, &[conv(96, 1, 1, false), conv(96, 3, 2, true)])?;
    /// let input: Vec<f32> = (0..16 * 112 * 112).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let banded = EngineExecutor::new(&model)?.forward(&input, 1)?;
    /// let layered = EngineExecutor::new(&model)?.without_bands().forward(&input, 1)?;
    /// // The same arithmetic in the same order: the same logits.
    /// assert_eq!(banded, layered);
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_bands(mut self) -> Self {
        self.bands.iter_mut().for_each(|b| *b = None);
        self
    }

    /// Runs the samples of a gated batch one by one in every layer, to measure what
    /// running them together buys. By default, in a gated layer with few output positions
    /// per sample (7×7) and at least 2 MiB of weights, samples that each keep some of the
    /// input channels run together: their tiles read each sample's kept columns of the
    /// weights in place, through a column map, a range of the weights serving every sample
    /// while it is in cache, instead of each sample copying its kept columns out first.
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Executor, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // 3×3 layers at 7 × 7 as in ResNet's last stage (2.4 MB of weights each), half
    /// // the channels kept, batch 4: the second layer runs its samples together.
    /// let conv = ConvSpec { cout: 256, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(256, 7, &[conv, conv])?;
    /// let input: Vec<f32> = (0..4 * 256 * 7 * 7).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let half = Policy::Keep(0.5);
    /// let together = EngineExecutor::new(&model)?.forward_with(&input, 4, half)?;
    /// let one_by_one = EngineExecutor::new(&model)?
    ///     .without_batched_gates()
    ///     .forward_with(&input, 4, half)?;
    /// // The same channels kept, the same products: equal up to the order of the sums.
    /// assert_eq!(together.kept, one_by_one.kept);
    /// let scale = one_by_one.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    /// for (a, b) in together.logits.iter().zip(&one_by_one.logits) {
    ///     assert!((a - b).abs() <= 1e-5 * scale);
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_batched_gates(mut self) -> Self {
        self.batch_gated_panels = 0;
        self
    }

    /// Packs every spatial plan's kept pixels into panels, to measure what reading them
    /// in place buys. By default a stride-1 k×k layer swept flat over its padded input
    /// computes whole the flat panels that hold kept pixels, reading them in place, and
    /// stores only the kept lanes, where those panels are full enough that this costs
    /// less than packing (for 16 output rows: kept pixels in at least 0.4 of their
    /// lanes).
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Cut, Executor, Gates, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// let conv = ConvSpec { cout: 16, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(16, 64, &[conv, conv])?;
    /// let input: Vec<f32> = (0..16 * 64 * 64).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let tiles = Policy::Gates(Gates { channels: Cut::All, tiles: Cut::Ratio(0.5) });
    /// let in_place = EngineExecutor::new(&model)?.forward_with(&input, 1, tiles)?;
    /// let packed = EngineExecutor::new(&model)?
    ///     .without_kept_in_place()
    ///     .forward_with(&input, 1, tiles)?;
    /// assert_eq!(in_place.tiles, packed.tiles);
    /// let scale = packed.logits.iter().fold(1f32, |m, v| m.max(v.abs()));
    /// for (a, b) in in_place.logits.iter().zip(&packed.logits) {
    ///     assert!((a - b).abs() <= 1e-5 * scale);
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_kept_in_place(mut self) -> Self {
        self.kept_in_place = None;
        self
    }

    /// Turns off the prefetch by which a 1×1 layer's first row tile of each panel read
    /// in place brings the next panel's rows into L2, to measure what it buys. It
    /// changes no value.
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::Executor;
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // A 1×1 layer over 56 × 56 planes: 98 panels, each read in place.
    /// let conv = ConvSpec { cout: 64, k: 1, stride: 1, depthwise: false };
    /// let model = conv_chain(64, 56, &[conv])?;
    /// let input: Vec<f32> = (0..64 * 56 * 56).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let with = EngineExecutor::new(&model)?.forward(&input, 1)?;
    /// let without = EngineExecutor::new(&model)?
    ///     .without_panel_prefetch()
    ///     .forward(&input, 1)?;
    /// assert_eq!(with, without);
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_panel_prefetch(mut self) -> Self {
        self.panel_prefetch = false;
        self
    }

    /// Runs every pass on the pool it is called from, to measure what choosing between
    /// the pool and one thread by their recent times buys ([`super::thread_choice`]). By
    /// default each kind of pass tries one thread once, after 32 passes, and again
    /// whenever its time on the pool has grown well past its best, and stays there while
    /// that is faster. The values are the same either way (up to rounding in some gated
    /// batches).
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Executor, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// let conv = ConvSpec { cout: 16, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(8, 16, &[conv, conv])?;
    /// let input: Vec<f32> = (0..8 * 16 * 16).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
    /// let chosen = EngineExecutor::new(&model)?;
    /// let pool = EngineExecutor::new(&model)?.without_thread_choice();
    /// let want = pool.forward_with(&input, 1, Policy::Dense)?.logits;
    /// // Past the 33rd pass, where (on more than one thread) one pass tries one thread.
    /// for _ in 0..40 {
    ///     assert_eq!(chosen.forward_with(&input, 1, Policy::Dense)?.logits, want);
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_thread_choice(mut self) -> Self {
        self.thread_choice = None;
        self
    }

    /// Has every channel gate pool its input itself, to measure what convolutions summing
    /// their output for the gates that read it buy. By default a 1×1 convolution (or
    /// one packed by im2col) whose output a channel gate of the pass reads sums each
    /// panel of it as it stores it, and the gate adds those sums instead of reading the
    /// planes again; the means are the same bits either way, so the decisions are too.
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Budget, Executor, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // 1×1 layers over 28 × 28 planes, each read by the next one's gate.
    /// let conv = |cout| ConvSpec { cout, k: 1, stride: 1, depthwise: false };
    /// let model = conv_chain(32, 28, &[conv(64), conv(96), conv(64), conv(32)])?;
    /// let input: Vec<f32> = (0..2 * 32 * 28 * 28).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
    /// let policy = Policy::Budget(Budget::Flops(0.5));
    /// let summed = EngineExecutor::new(&model)?.forward_with(&input, 2, policy)?;
    /// let pooled = EngineExecutor::new(&model)?
    ///     .without_summed_means()
    ///     .forward_with(&input, 2, policy)?;
    /// assert_eq!(summed.logits, pooled.logits);
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_summed_means(mut self) -> Self {
        self.summed_means = false;
        self
    }

    /// Runs every 3×3 convolution directly (im2col or shifted panels) instead of by
    /// Winograd's F(2×2, 3×3), to measure what Winograd buys. By default a dense 3×3,
    /// stride-1, pad-1 convolution with outputs at most 28 wide runs by Winograd, and a
    /// gated one too where its tiles fill more than one panel of the micro-kernel.
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::Executor;
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // ResNet's 3×3 layers at 14 × 14, one after the other.
    /// let conv = ConvSpec { cout: 64, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(64, 14, &[conv, conv])?;
    /// let input: Vec<f32> = (0..64 * 14 * 14).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let winograd = EngineExecutor::new(&model)?.forward(&input, 1)?;
    /// let direct = EngineExecutor::new(&model)?.without_winograd().forward(&input, 1)?;
    /// // Other arithmetic, the same convolutions: equal up to rounding (the logit is a
    /// // small sum of large terms here, so to about four digits).
    /// for (a, b) in winograd.iter().zip(&direct) {
    ///     assert!((a - b).abs() <= 1e-4 * b.abs());
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_winograd(mut self) -> Self {
        for (_, l) in &mut self.layers {
            if let Layer::Gemm { winograd, .. } = l {
                *winograd = None;
            }
        }
        self
    }

    /// Runs gated 3×3 convolutions over 7 × 7 planes (at most 16 Winograd tiles) on the
    /// packed filters only, to measure what the filters as lines buy. By default, on
    /// AVX-512, a sample's plan over such a plane that keeps at most 0.85 of a layer's
    /// (output, input) channel pairs reads one cache line per kept pair and nothing
    /// else; the first such plan of a layer lays its filters out as lines (as much
    /// memory again as its packed transformed filters).
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Executor, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // 3×3 layers at 7 × 7 as in ResNet's last stage, half the channels kept.
    /// let conv = ConvSpec { cout: 128, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(128, 7, &[conv, conv])?;
    /// let input: Vec<f32> = (0..128 * 7 * 7).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let half = Policy::Keep(0.5);
    /// let lines = EngineExecutor::new(&model)?.forward_with(&input, 1, half)?;
    /// let packed = EngineExecutor::new(&model)?
    ///     .without_winograd_lines()
    ///     .forward_with(&input, 1, half)?;
    /// // The same channels kept, other arithmetic: equal up to rounding.
    /// assert_eq!(lines.kept, packed.kept);
    /// let scale = packed.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    /// for (a, b) in lines.logits.iter().zip(&packed.logits) {
    ///     assert!((a - b).abs() <= 1e-4 * scale);
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_winograd_lines(mut self) -> Self {
        #[cfg(target_arch = "x86_64")]
        for (_, l) in &mut self.layers {
            if let Layer::Gemm {
                winograd: Some(w), ..
            } = l
            {
                w.lines = None;
            }
        }
        self
    }

    /// Runs every gated 1×1 convolution the direct way, output channels as the GEMM's
    /// rows, to measure what running some transposed buys. By default a 1×1 layer over a
    /// 7 × 7 plane with at least twice as many output channels as positions, whose input
    /// a gate thins and which computes all its outputs, runs transposed when a plan
    /// keeps some of its inputs: positions as rows, its weights read in place as panels
    /// of output channels, instead of each sample copying the kept inputs' columns of
    /// every weight row (the engine's `transposed` module; the panels hold the layer's
    /// weights a second time).
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Executor, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // A gated 1×1 layer, then one widening to 512 channels at 7 × 7, as in
    /// // ResNet-50's last stage.
    /// let conv = |cout| ConvSpec { cout, k: 1, stride: 1, depthwise: false };
    /// let model = conv_chain(64, 7, &[conv(128), conv(512)])?;
    /// let input: Vec<f32> = (0..64 * 7 * 7).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let half = Policy::Keep(0.5);
    /// let transposed = EngineExecutor::new(&model)?.forward_with(&input, 1, half)?;
    /// let direct = EngineExecutor::new(&model)?
    ///     .without_transposed()
    ///     .forward_with(&input, 1, half)?;
    /// // The same channels kept, the same sums in the same order: equal up to rounding.
    /// assert_eq!(transposed.kept, direct.kept);
    /// let scale = direct.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    /// for (a, b) in transposed.logits.iter().zip(&direct.logits) {
    ///     assert!((a - b).abs() <= 1e-5 * scale);
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_transposed(mut self) -> Self {
        for (_, l) in &mut self.layers {
            if let Layer::Gemm { channel_panels, .. } = l {
                *channel_panels = None;
            }
        }
        self
    }

    /// Reads the kept rows of gated 1×1 layers from the packed weights only, to measure
    /// what the weights stored row by row buy. By default, on AVX-512 where the CPU's
    /// tuning says so ([`Tuning::rows_major`]: not on Zen 4), a 1×1 layer with a channel
    /// gate over a plane of at most 14 × 14 and with at least 512 input channels holds
    /// its weights row by row as well (as much memory again), and a plan that keeps some
    /// of its rows and every input channel reads each kept row as its own stream.
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Executor, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // A gated 1×1 layer narrowing 512 channels at 7 × 7, as in ResNet-50's last stage.
    /// let conv = |cout| ConvSpec { cout, k: 1, stride: 1, depthwise: false };
    /// let model = conv_chain(512, 7, &[conv(256), conv(64)])?;
    /// let input: Vec<f32> = (0..512 * 7 * 7).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let half = Policy::Keep(0.5);
    /// let rows = EngineExecutor::new(&model)?.forward_with(&input, 1, half)?;
    /// let packed = EngineExecutor::new(&model)?
    ///     .without_rows_major()
    ///     .forward_with(&input, 1, half)?;
    /// // The same channels kept, the same sums in the same order: equal up to rounding.
    /// assert_eq!(rows.kept, packed.kept);
    /// let scale = packed.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    /// for (a, b) in rows.logits.iter().zip(&packed.logits) {
    ///     assert!((a - b).abs() <= 1e-5 * scale);
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_rows_major(mut self) -> Self {
        for (_, l) in &mut self.layers {
            if let Layer::Gemm { rows_major, .. } = l {
                *rows_major = None;
            }
        }
        self
    }

    /// Runs every Winograd layer with its phases shared out across threads separately
    /// (input transforms by channel, GEMMs by ξ and panels, output transforms by output
    /// channel), to measure what running by bands buys. By default a layer whose
    /// transformed inputs and outputs outweigh its transformed filters runs band by band:
    /// each thread transforms, multiplies and transforms back its own share of the tiles,
    /// so no transformed value moves between cores, and each thread writes the same rows
    /// of the output planes from one layer to the next.
    ///
    /// ```
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::Executor;
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// // Two 3×3 layers at 28 × 28 as in ResNet's second stage.
    /// let conv = ConvSpec { cout: 64, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(64, 28, &[conv, conv])?;
    /// let input: Vec<f32> = (0..64 * 28 * 28).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let bands = EngineExecutor::new(&model)?.forward(&input, 1)?;
    /// let shared = EngineExecutor::new(&model)?
    ///     .without_winograd_bands()
    ///     .forward(&input, 1)?;
    /// // The same arithmetic, on micro-tiles of other widths: equal up to rounding.
    /// for (a, b) in bands.iter().zip(&shared) {
    ///     assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0));
    /// }
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_winograd_bands(mut self) -> Self {
        self.winograd_bands = false;
        self
    }

    /// Keeps the pool's other workers spinning for `linger` after each pass that ran on
    /// the pool (or until the next pass begins), so that a pass coming within it finds
    /// them running. By default they sleep as soon as a pass ends. On a VM the host soon
    /// lends an idle vCPU elsewhere, and the next pass then runs as if on one thread or
    /// slower: on the 2-vCPU Zen 5 VM, MobileNetV2 at batch 1 with one pass every 30 ms
    /// took 7.6–8.0 ms a pass on the pool (1.9 back to back; ONNX Runtime, whose workers
    /// spin after a run, 2.0–3.0), 3.5–4.5 where the thread choice moved it to one
    /// thread, and 1.9–2.6 lingering 50 ms. The price is a core kept busy for `linger`
    /// after a pass.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dynsparse::exec::cpu::EngineExecutor;
    /// use dynsparse::exec::{Executor, Policy};
    /// use dynsparse::synthetic::{conv_chain, ConvSpec};
    ///
    /// let conv = ConvSpec { cout: 16, k: 3, stride: 1, depthwise: false };
    /// let model = conv_chain(3, 16, &[conv])?;
    /// let engine = EngineExecutor::new(&model)?.with_linger(Duration::from_millis(50));
    /// let input = vec![0.5f32; 3 * 16 * 16];
    /// let first = engine.forward_with(&input, 1, Policy::Dense)?;
    /// // Another pass 10 ms later finds the workers spinning (and stops them).
    /// std::thread::sleep(Duration::from_millis(10));
    /// let second = engine.forward_with(&input, 1, Policy::Dense)?;
    /// assert_eq!(first.logits, second.logits);
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn with_linger(mut self, linger: std::time::Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Rounds kept channel counts up to multiples of `round` instead of the micro-kernel's
    /// row count (1: no rounding), to measure what the rounding buys.
    pub fn with_channel_round(mut self, round: usize) -> Self {
        self.round = round.max(1);
        self
    }

    /// The multiple kept channel counts are rounded up to.
    pub fn channel_round(&self) -> usize {
        self.round
    }

    /// Chooses each gate's kept channels in aligned groups of `group` (1: one by one, the
    /// default), ranked by their mean score ([`gating::select_groups`]); as many
    /// channels are kept either way. With groups of [`gemm::PACK`] (12) the kept output
    /// channels fill whole packed blocks of weights, so a micro-tile reads one stream of
    /// them and the next layer's copy of its kept input columns moves whole runs. The
    /// choice is coarser: a group is kept or dropped as one.
    pub fn with_channel_groups(mut self, group: usize) -> Self {
        self.group = group.max(1);
        self
    }

    /// [`Self::conv_gemm_into`] a new buffer.
    #[allow(clippy::too_many_arguments)]
    fn conv_gemm(
        &self,
        x: &[f32],
        batch: usize,
        weight: &[f32],
        wino: Option<&WinogradWeights>,
        bias: &[f32],
        groups: usize,
        g: &ConvGeom,
        residual: Option<&[f32]>,
        act: Act,
        by_rows: bool,
        sums: Option<PanelSums>,
    ) -> Buf {
        let mut out = self
            .pool
            .take_dirty(batch * bias.len() * g.out_hw[0] * g.out_hw[1]);
        let all = Subset {
            by_rows,
            sums,
            ..Subset::default()
        };
        self.conv_gemm_into(
            x,
            batch,
            weight,
            wino,
            bias,
            groups,
            g,
            residual.into(),
            act,
            all,
            &mut out,
        );
        out
    }

    /// The convolution of `batch` samples into `out` (`batch × rows × positions`): all of
    /// it, or for one group a [`Subset`], whose other cells then hold the residual, or
    /// zero.
    #[allow(clippy::too_many_arguments)]
    fn conv_gemm_into(
        &self,
        x: &[f32],
        batch: usize,
        weight: &[f32],
        wino: Option<&WinogradWeights>,
        bias: &[f32],
        groups: usize,
        g: &ConvGeom,
        residual: Residual,
        act: Act,
        sub: Subset,
        out: &mut [f32],
    ) {
        // Over rows wider than WINOGRAD_MAX_WIDTH (where this CPU's tuning builds
        // Winograd weights for them), only a plan that keeps at least the tuning's
        // `winograd_wide_min_kept` of the multiply-adds runs by Winograd.
        if let Some((wg, zero_dropped)) = wino
            .filter(|_| sub.cols.is_none() && groups == 1)
            .filter(|w| {
                let kept = |s: Option<&[usize]>, all: usize| s.map_or(all, <[usize]>::len);
                let pairs = kept(sub.rows, w.rows) * kept(sub.chans, w.cin);
                g.out_hw[1] <= WINOGRAD_MAX_WIDTH
                    || pairs as f64 >= w.wide_min_kept * (w.rows * w.cin) as f64
            })
            .and_then(|w| {
                #[cfg(target_arch = "x86_64")]
                let lines = w
                    .lines_for(self.isa, batch, g.out_hw, sub.rows, sub.chans)
                    .is_some();
                #[cfg(not(target_arch = "x86_64"))]
                let lines = false;
                winograd_way(w, &sub, g.out_hw, lines).map(|z| (w, z))
            })
        {
            return self.conv_winograd(
                x,
                batch,
                wg,
                bias,
                g,
                residual,
                act,
                sub,
                zero_dropped,
                out,
            );
        }
        let Subset {
            rows: only_rows,
            cols: only_cols,
            chans,
            dropped_unread,
            serial,
            by_rows,
            sums,
            rows_major,
        } = sub;
        // Kept rows of every input channel read their weights row by row (the panels of
        // a layer that holds them are read in place or packed, never through offsets).
        let rows_major = rows_major.filter(|_| {
            only_rows.is_some()
                && chans.is_none()
                && only_cols.is_none()
                && groups == 1
                && rows_major_fits(g)
                && self.isa == Isa::Avx512
        });
        let lda = g.k();
        let taps = g.kernel[0] * g.kernel[1];
        // Zero-pad the input once so every tap of every window is in bounds: packing then
        // needs no per-pixel checks and copies contiguous runs.
        let ph = (g.out_hw[0] - 1) * g.stride[0] + g.kernel[0];
        let pw = (g.out_hw[1] - 1) * g.stride[1] + g.kernel[1];
        let needs_pad = g.pad_tl != [0, 0] || ph > g.in_hw[0] || pw > g.in_hw[1];
        // A k×k convolution of stride 1 or 2 over whole rows at least IMPLICIT_WIDTH wide
        // reads B in place: a panel is a segment of one output row, and its row
        // (ci, ky, kx) is the padded input shifted by (ky, kx) — no im2col. Narrower rows
        // would leave too many of a panel's lanes idle.
        let [oh, ow] = g.out_hw;
        // A stride-1 one whose output width is in `flat_widths` reads B in place too, its
        // padded input swept as one flat array (how: where the panels are counted below).
        let flat_widths = match self.isa {
            Isa::Avx512 => IMPLICIT_WIDTH..usize::MAX,
            Isa::Avx2 => FLAT_AVX2_WIDTHS,
            Isa::Portable => 0..0,
        };
        // What both ways of reading B in place need: every output position, one group,
        // and a padded input whose shifts are the taps of a window larger than 1×1.
        let shifts = needs_pad && groups == 1 && g.kernel != [1, 1];
        let shifted = only_cols.is_none() && shifts;
        // A spatial plan over such a layer reads in place too where its kept pixels fill
        // enough of the flat panels that hold them: it computes those panels whole and
        // stores their kept lanes, rather than packing the kept pixels into panels
        // (see KEPT_IN_PLACE_PACK_ROWS). AVX-512 only: measured there, where kept lanes
        // are stored in runs; AVX2 stores lanes that skip columns one by one.
        let kept_flat: Option<Vec<(usize, u32, usize)>> = only_cols
            .zip(self.kept_in_place)
            .filter(|_| self.isa == Isa::Avx512)
            .filter(|_| shifts && g.stride == [1, 1] && flat_widths.contains(&ow))
            .map(|(cols, pack_rows)| (kept_flat_panels(cols, ow, pw), cols.len(), pack_rows))
            .filter(|(panels, kept, pack_rows)| {
                let m = only_rows.map_or(bias.len() / groups, <[usize]>::len);
                (panels.len() * NR).saturating_mul(m) <= kept.saturating_mul(m + pack_rows)
            })
            .map(|(panels, ..)| panels);
        let flat =
            (shifted && g.stride == [1, 1] && flat_widths.contains(&ow)) || kept_flat.is_some();
        let implicit =
            flat || (shifted && g.stride[0] <= 2 && g.stride[1] <= 2 && ow >= IMPLICIT_WIDTH);
        // With a column stride of 2, each padded plane is stored as its even and odd
        // columns (two planes of half width): tap (ky, kx) of a row segment is then a
        // contiguous run of phase kx % 2, from column kx / 2.
        let split = implicit && g.stride[1] == 2;
        let phased =
            split.then(|| self.pad_split_planes(x, g.in_hw, g.pad_tl, [ph, pw], chans, serial));
        let padded = (needs_pad && phased.is_none())
            .then(|| pad_planes(&self.pool, x, g.in_hw, g.pad_tl, [ph, pw], chans));
        // Without padding the input is read as it is; with it, in its padded geometry
        // (from `padded`, or from `phased` alone).
        let x = padded.as_deref().unwrap_or(x);
        let g = &if needs_pad {
            ConvGeom {
                in_hw: [ph, pw],
                pad_tl: [0, 0],
                ..*g
            }
        } else {
            *g
        };
        let rows_total = bias.len();
        let rows_per_group = rows_total / groups;
        // The output rows computed: all of a group's, or (one group) a sparse plan's kept
        // channels, whose tiles read A's rows in place and store at their own rows.
        let row_list: &[usize] = match only_rows {
            Some(r) => r,
            None => &self.all_rows[..rows_per_group],
        };
        let gk = ConvGeom {
            in_c: chans.map_or(g.in_c, <[usize]>::len),
            ..*g
        };
        let k = gk.k();
        let n = g.out_hw[0] * g.out_hw[1];
        // The output positions computed: all, or a spatial plan's kept pixels (strictly
        // ascending, as the store's contiguous-run test requires).
        let col_list: &[usize] = only_cols.unwrap_or(&self.all_cols[..n]);
        debug_assert!(col_list.windows(2).all(|w| w[0] < w[1]) && col_list.last() < Some(&n));
        let ncols = col_list.len();
        let in_plane = g.in_hw[0] * g.in_hw[1];
        // Where implicit panels read: the padded input, or its column phases; per
        // channel, per phase, per row.
        let (src_plane, src_phase, src_row) = match &phased {
            Some(_) => {
                let half = g.in_hw[1].div_ceil(2);
                (2 * g.in_hw[0] * half, g.in_hw[0] * half, half)
            }
            None => (in_plane, 0, g.in_hw[1]),
        };
        let segs = ow.div_ceil(NR);
        // A 1×1, stride-1, unpadded convolution reads full panels straight from its input
        // (row k of B is input channel k, or with kept input channels the k-th kept one,
        // through `boff`); only a partial last panel is packed.
        //
        // Except on AVX2 over 7×7 planes (49 values, not a whole number of 64-byte lines):
        // a panel row read in place then starts anywhere in a line and most of its loads
        // span two, where a packed panel's rows are contiguous and aligned. With many rows
        // and a long K the copy pays. One layer, 2 threads, in-process pairs (40):
        // 2048 → 512 and 512 → 2048 0.90 of the time, 960 → 160 0.91, 160 → 960 0.94,
        // 320 → 1280 0.95–0.97 at batch 1; at batch 8 2048 → 512 0.89–0.91, 960 → 160
        // 0.93, 160 → 960 0.86. Not at 14×14 (196 values): 1024 → 256 and 256 → 1024 took
        // 0.97 at batch 1 but 1.03–1.05 at batch 8; nor with few rows or a short K
        // (384 → 64 at 14×14: 1.15).
        //
        // On AVX-512 over planes of 64 to 255 values that are not whole lines (14×14):
        // there a K block of a panel read in place spans 3 lines per row instead of 2,
        // as much of L1 as the block of A beside it leaves, and the row tiles after the
        // first miss on it. Packed (two masked loads and stores per row), one layer
        // alone on the Intel Xeon, in-process pairs (60) against in place: 384 → 64
        // 0.89 of the time on one thread and 0.77 on two, 576 → 96 0.89 / 0.80,
        // 1024 → 256 and 256 → 1024 0.85–0.90 (batch 1 and 8, one or two threads),
        // 64 → 384 0.93–1.00. Not over 7×7 planes: 960 → 160 1.08 on two threads,
        // 2048 → 512 0.95–0.99. Nor with a short K: in whole passes MobileNetV2's
        // expansions at 14×14 (64 → 384, 96 → 576) took 1.03–1.08, its projections
        // 0.83–0.89. From K = 128 (PACK_MISALIGNED_FROM), whole passes took 0.988–0.990
        // of their time at batch 1 (MobileNetV2, EfficientNet-Lite0; ResNet-50 0.991
        // before the K bound), 0.975 at batch 8 (ResNet-50), 0.973–0.989 at budget 0.5.
        // Not on Zen 5, whose tuning reads them in place (`Tuning::ZEN5`).
        let misaligned = in_plane % 16 != 0
            && match self.isa {
                Isa::Avx2 => in_plane < 64 && k.min(row_list.len()) >= self.pack_misaligned,
                Isa::Avx512 => (64..256).contains(&in_plane) && k >= self.pack_misaligned_avx512,
                Isa::Portable => false,
            };
        let direct = !misaligned
            && only_cols.is_none()
            && g.kernel == [1, 1]
            && g.stride == [1, 1]
            && g.pad_tl == [0, 0];
        let boff: Option<Vec<usize>> = if implicit {
            let ([kh, kw], sx) = (g.kernel, g.stride[1]);
            let taps = move |c: usize| {
                (0..kh).flat_map(move |ky| {
                    (0..kw).map(move |kx| {
                        c * src_plane + (kx % sx) * src_phase + ky * src_row + kx / sx
                    })
                })
            };
            Some(match chans {
                Some(c) => c.iter().flat_map(|&c| taps(c)).collect(),
                None => (0..g.in_c).flat_map(taps).collect(),
            })
        } else if direct {
            chans.map(|c| c.iter().map(|&c| c * in_plane).collect())
        } else {
            None
        };
        // A flat stride-1 convolution sweeps its padded input as one array instead of row
        // by row: grid position y · pw + x (pw the padded width) is output (y, x) for
        // x < ow, and every tap is still one shift. A panel spans row ends; the kw - 1
        // lanes between two rows are computed and not stored, and the stored lanes go to
        // consecutive outputs. On AVX-512 a 56-wide row costs 58 lanes instead of 64, a
        // 28-wide one 30 instead of 32. On AVX2 see FLAT_AVX2_WIDTHS.
        let pitch = g.in_hw[1];
        let flat_end = (oh - 1) * pitch + ow;
        let panels = if let Some(kept) = &kept_flat {
            kept.len()
        } else if flat {
            flat_end.div_ceil(NR)
        } else if implicit {
            oh * segs
        } else {
            ncols.div_ceil(NR)
        };
        // Panels of NR consecutive positions of one group's output: sums by panel.
        let sums = sums.filter(|_| groups == 1 && !flat && !implicit && only_cols.is_none());
        // Per flat panel: the lanes stored, and the output its first stored lane is (one
        // division per panel; the lanes walk the row from there). With kept pixels, its
        // first kept pixel's index in `col_list` (its kept pixels follow it there, in
        // lane order).
        let flat_lanes: Vec<(u32, usize)> = if let Some(kept) = &kept_flat {
            kept.iter().map(|&(_, lanes, at)| (lanes, at)).collect()
        } else if flat {
            (0..panels)
                .map(|p| {
                    let q0 = p * NR;
                    let (mut y, mut x) = (q0 / pitch, q0 % pitch);
                    let (mut lanes, mut first) = (0u32, None);
                    for j in 0..NR.min(flat_end - q0) {
                        if x < ow {
                            lanes |= 1 << j;
                            first.get_or_insert(y * ow + x);
                        }
                        x += 1;
                        if x == pitch {
                            (y, x) = (y + 1, 0);
                        }
                    }
                    (lanes, first.unwrap_or(0))
                })
                .collect()
        } else {
            Vec::new()
        };
        // A gated layer with kept input channels and big kept weights: each task copies
        // the kept columns of the packed blocks its own rows lie in, just before it
        // computes, instead of one compact copy of every block for all tasks. The copy
        // then stays in the task's core's cache instead of going to memory and back.
        // Timed inside the layer, ResNet-50 at budget 0.5: layer 4's 3×3 convolutions'
        // copy and GEMM from 0.51–0.68 ms (copy 0.26–0.35, GEMM 0.24–0.33) to 0.44–0.66.
        // The copy goes row tile by row tile, its source prefetched while the tile
        // before computes (see the task): alternating binaries at budget 0.5, layer 4
        // took 0.94 (batch 1) and 0.87 (batch 8) of the time it took with one copy up
        // front per task.
        let a_bytes = row_list.len() * k * std::mem::size_of::<f32>();
        // With at most two panels (a 7×7 plane) the tiles' copy, prefetched row tile by
        // row tile, pays from far smaller weights: the kernel then waits on weights, not
        // on the panels it re-reads per row tile.
        let local_copy = chans.is_some()
            && (a_bytes > self.local_a || (panels <= 2 && a_bytes > LOCAL_A_FEW_PANELS_BYTES));
        // A plan's kept input channels: their columns of A are copied into a compact A
        // (contiguous runs, block by block; rows keep their indices), so tiles read A
        // without a map. Mapping columns inside the micro-kernel instead cost about 1.6×
        // its time on AVX-512 (staircase example, 16×16); the copy, 3–7% less in total
        // time than mapping wherever a layer has fewer than 4 panels (ResNet-18/50 at
        // budget 0.5 and keep 0.85). Kept output rows read A in place by index.
        let compact_a = chans.filter(|_| !local_copy).map(|c| {
            debug_assert_eq!(groups, 1);
            let blocks = rows_per_group.div_ceil(gemm::PACK);
            let mut a = self.pool.take_dirty(blocks * gemm::PACK * k);
            let (src, dst) = (gemm::PACK * lda, gemm::PACK * k);
            // Both threads share the copy whatever its size: copied on one thread, a
            // 7×7 stage's 1×1 projection (160 kept rows, 480 of 960 columns) took longer
            // than its dense pass, because the weights come from memory at one core's
            // rate while the other core waits. Over the projections of MobileNetV2 and
            // EfficientNet-Lite0 at budget 0.5, gated time against dense went from 0.80
            // to 0.66 and 0.94 to 0.74 (medians of six in-process pairs); the ResNets'
            // passes did not change (0.64 → 0.62, 0.67 → 0.67).
            if serial || std::mem::size_of_val(weight) <= SERIAL_COPY_BYTES {
                gemm::pack_a_channels(weight, lda, c, taps, &mut a);
            } else {
                // (`max(1)`: without K the blocks are empty.)
                weight
                    .par_chunks_exact(src)
                    .zip(a.par_chunks_exact_mut(dst.max(1)))
                    .for_each(|(w, out)| gemm::pack_a_channels(w, lda, c, taps, out));
            }
            a
        });
        // A small A with kept rows (a gated stem: 32 rows × 27 columns): the kept rows
        // are gathered into consecutive rows, so that a tile reads one stream of A rather
        // than a row each, which at so small a K costs the kernel 10–25% (see
        // SMALL_A_BYTES).
        let rows_a = only_rows
            .filter(|_| groups == 1 && !local_copy && rows_major.is_none())
            .filter(|_| {
                gemm::packed_a_len(rows_per_group, k) * std::mem::size_of::<f32>() <= SMALL_A_BYTES
            })
            .map(|r| {
                let (src, ska) = match &compact_a {
                    Some(a) => (&a[..], k),
                    None => (weight, lda),
                };
                // Zero rows pad the last block, which the kernel reads and never stores.
                let mut out = self.pool.take_dirty(gemm::packed_a_len(r.len(), k));
                out.fill(0.0);
                for (i, &row) in r.iter().enumerate() {
                    let (from, to) = (gemm::a_offset(row, ska), gemm::a_offset(i, k));
                    for col in 0..k {
                        out[to + col * gemm::PACK] = src[from + col * gemm::PACK];
                    }
                }
                out
            });
        let mr = self.isa.mr();
        let row_blocks = row_list.len().div_ceil(mr);
        // Where A is too big to stay in L2 while panels stream past it (late layers: many
        // weights, few positions), a task runs a group of panels on each K block of each
        // row tile while that block of A is in L1, so A streams from memory once per
        // group rather than once per panel.
        // What the tiles read of A: a kept row's values are interleaved with the other
        // rows of its packed block, so it brings in the block's cache lines. Deciding the
        // panel groups on the kept rows alone left a 7×7 stage's gated 1×1 expansion (480
        // of 960 rows, spread over every block) ungrouped and unprefetched, slower than
        // its dense pass; on the blocks they span, MobileNetV2's expansions of the last
        // two stages at budget 0.5 went from 1.03 to 0.74 of dense (batch 1; 1.01 to 0.73
        // at batch 8) and all of EfficientNet-Lite0's expansions from 0.89 to 0.77
        // (medians of in-process pairs); the ResNets' layers did not change (0.63 → 0.63).
        let spanned = row_list
            .iter()
            .map(|r| r / gemm::PACK)
            .fold((0, usize::MAX), |(n, last), b| {
                (n + usize::from(b != last), b)
            })
            .0;
        let read_bytes = spanned * gemm::PACK * k * std::mem::size_of::<f32>();
        // A task that copies its own kept weights (`local_copy`) runs both panels of a
        // 7×7 plane, so that its rows' weights are copied once rather than once per
        // panel. MobileNetV2's and EfficientNet-Lite0's 7×7 projections whose weights fit
        // `a_resident` had run one panel per task (MobileNetV2's keep 154–261 KB); in
        // both panels they took 0.68–0.75 of their time at budget 0.5, passes
        // 0.977–0.981 and 0.972 at batch 1, 0.992 and 0.985 at batch 8 (in-process pairs,
        // 2 threads).
        let per_group = if read_bytes > self.a_resident || (local_copy && panels <= 2) {
            panels.min(GROUP_PANELS)
        } else if implicit && k <= IMPLICIT_ROW_TASK_K {
            // Whole output rows per task, as many as leave about eight tasks a thread
            // (see IMPLICIT_ROW_TASK_K).
            let rows = (oh / (8 * rayon::current_num_threads())).max(1);
            (rows * segs).min(panels).max(1)
        } else {
            1
        };
        // At most `per_group` panels per group, shared out evenly: group `q` starts at
        // panel `q · panels / ngroups`. Groups of `per_group` left the last one short (a
        // 28×28 3×3 layer's 28 row panels as 8, 8, 8 and 4), and with two chunks of rows
        // one thread ran 32 panels' work while the other ran 24 and waited. One layer,
        // 2 threads, in-process pairs (60): 3×3 128 → 128 at 28×28 0.89 of the time, 3×3
        // stride 2 256 → 128 from 56×56 0.90, 1×1 512 → 128 at 28×28 (one panel per
        // group) 1.00; whole passes (40 pairs, batch 1): ResNet-18 0.97, ResNet-50 0.98,
        // at budget 0.5 0.99–1.00; batch 8 (10–20 pairs) 0.99–1.03.
        // Enough tasks to keep every thread busy, in whole row blocks (one thread: one
        // task per panel group, so each panel is packed once).
        let wanted = if serial {
            1
        } else {
            4 * rayon::current_num_threads()
        };
        // A dense layer of few panels whose last is narrow (a 14×14 plane's 196 = 6 · 32
        // + 4) at a batch too small to give every thread several tasks: the narrow panel
        // joins the group before it. On its own its tasks took a fraction of the others'
        // time, the thread given them ran out of work first and waited (traced per task:
        // 384 → 64 at 14×14, one thread 7 tasks of 8.5 µs, the other 5 and two of 2.5).
        // Whole passes, 2 threads, batch 1, in-process pairs (100): MobileNetV2 0.982–0.989
        // of the time, EfficientNet-Lite0 0.986–0.994; ResNets 0.997–1.001. Not with
        // many panels (a 28×28 plane's 25: its 1×1 layers took up to 1.4× the time, its
        // depthwise layers reading what the other core had written up to 1.6×), nor at
        // batch 8, nor for gated layers (budget 0.5: 1.00–1.01).
        let last_width = ncols - (panels.max(1) - 1) * NR;
        let merged = per_group == 1
            && only_rows.is_none()
            && chans.is_none()
            && !implicit
            && !flat
            && (2..=8).contains(&panels)
            && batch * groups * panels < wanted
            && last_width <= 16;
        let ngroups = if merged {
            panels - 1
        } else {
            panels.div_ceil(per_group)
        };
        let chunks = (wanted.div_ceil(batch * groups * ngroups)).clamp(1, row_blocks);
        // Chunk `c` takes row blocks `c · row_blocks / chunks ..`: sizes differ by at most
        // one block. Chunks of `row_blocks.div_ceil(chunks)` blocks left the last one
        // short (256 rows: 43 blocks of 6 as 7 × 6 + 1), so the thread given the first
        // half of the tasks ran 24 blocks while the other ran 19 and waited. One layer,
        // 2 threads, in-process pairs (60): 3×3 256 → 256 at 14×14 0.93 of the time, 1×1
        // 1024 → 256 at 14×14 0.93–0.95, 3×3 512 → 512 at 7×7 0.98–0.99; 128 → 128 at
        // 28×28 and 64 → 64 at 56×56 (chunks already even) 1.00.
        let panel_len = k * NR;
        // With enough panels to share out, each task packs its own panels (one, or its
        // group) into a buffer of its thread and computes all rows on them while they are
        // hot (`chunks` is 1). With fewer, panels are packed once up front instead, for
        // the tasks to share. Packed up front, a group's panels were written by both
        // threads and read by whichever took the task: in stretches of this machine where
        // reading what the other core wrote is slow, a 3×3 stride-2 layer (128 → 256
        // from 28 × 28, batch 8, after a 3×3 layer) took 8.0–8.3 ms against 5.4–5.6 with
        // each task packing its own group, and 5.1–5.4 either way in other stretches
        // (ten alternating processes each). Whole passes in a quiet stretch, in-process
        // pairs: at batch 8 ResNet-18 0.99, ResNet-50 0.99, MobileNetV2 0.98,
        // EfficientNet-Lite0 1.01 of the time (1.00–1.01 at budget 0.5); at batch 1
        // 0.99–1.01.
        let fused = chunks == 1 && !merged;
        // A 1×1 layer's panel is read in place where the kernel reads no value past the
        // plane: every whole panel, and a last, narrow one whose few columns the kernel
        // takes one at a time (a 14×14 plane's last 4, a 7×7 plane's 16 + 1), or that
        // fills a vector (28×28: 16). Packing that panel instead (a copy of 4 values and
        // a fill of 28 per row of K) took 14 of 64 µs in 384 → 64 at 14×14, and all
        // panels read in place leave nothing to share out before the tasks.
        let one_block = only_rows.is_none() || rows_a.is_some();
        let read_in_place = |p: usize| {
            implicit
                || (direct
                    && ((p + 1) * NR <= n
                        || p * NR + gemm::panel_reads(self.isa, n - p * NR, one_block) <= n))
        };
        let pack_ahead = !fused && (0..panels).any(|p| !read_in_place(p));
        let mut packed = self.pool.take_dirty(if pack_ahead {
            batch * groups * panels * panel_len
        } else {
            0
        });
        // Packs input channels `cs` (of the kept ones) of panel `t` (of all samples and
        // groups) into `rows`, their rows of the packed panel.
        let pack = |t: usize, cs: std::ops::Range<usize>, rows: &mut [f32]| {
            let (p, sg) = (t % panels, t / panels);
            if !read_in_place(p) {
                let cols = &col_list[p * NR..(p * NR + NR).min(ncols)];
                let xs = &x[sg * g.in_c * in_plane..][..g.in_c * in_plane];
                let (xs, part) = match chans {
                    Some(c) => (xs, Some(&c[cs.clone()])),
                    None => (&xs[cs.start * in_plane..cs.end * in_plane], None),
                };
                let gp = ConvGeom {
                    in_c: cs.len(),
                    ..gk
                };
                gemm::pack_panel(xs, &gp, part, cols, rows);
            }
        };
        // (`max(1)`: with no input channel kept, K and the panels are empty.)
        if pack_ahead && serial {
            packed
                .chunks_mut(panel_len.max(1))
                .enumerate()
                .for_each(|(t, panel)| pack(t, 0..gk.in_c, panel));
        } else if pack_ahead {
            // Fewer panels than tasks wanted (a 14 × 14 plane's 7, a 7 × 7 plane's 2):
            // each panel in parts of its input channels, so that the threads share the
            // packing evenly. Whole panels, the thread given more of them had packed up to
            // twice as long as the other while the other waited (traced per task:
            // ResNet-50's `layer4.0.conv2`, two panels of 32 and 17 positions, 71% of the
            // loop's two threads busy; 14 × 14 1×1 layers' seven panels, 69–93%).
            // One layer alone, 2 threads, in-process pairs (300) against whole panels:
            // 1024 → 256 at 14 × 14 0.95 of the time, 3×3 stride 2 256 → 256 from 28 × 28
            // 0.94–0.96 and 512 → 512 from 14 × 14 0.97, 1×1 stride 2 1024 → 2048 from
            // 14 × 14 0.95–0.97. Parts of less than PACK_PART_FLOATS did not pay (384 →
            // 64 at 14 × 14 in two parts: 1.04).
            let units = batch * groups * panels;
            let parts = wanted
                .div_ceil(units)
                .min(panel_len / PACK_PART_FLOATS)
                .clamp(1, gk.in_c.max(1));
            let pk = OutPtr(packed.as_mut_ptr());
            (0..parts * units).into_par_iter().for_each(|t| {
                // Parts outermost: each thread takes a run of channels of every panel.
                let (part, u) = (t / units, t % units);
                let cs = part * gk.in_c / parts..(part + 1) * gk.in_c / parts;
                let len = cs.len() * taps * NR;
                // SAFETY: `packed` holds `units` panels of `panel_len` = K · NR values, K
                // = kept channels · taps; part `cs` of panel `u` is its rows
                // `cs.start · taps ..` and no other (part, panel) writes them.
                let rows = unsafe {
                    std::slice::from_raw_parts_mut(
                        pk.get().add(u * panel_len + cs.start * taps * NR),
                        len,
                    )
                };
                pack(u, cs, rows);
            });
        }
        // The stores below write through a raw pointer: the size is checked here.
        assert_eq!(out.len(), batch * rows_total * n, "output buffer size");
        match (only_rows, only_cols.is_some()) {
            (None, false) => {}
            // Dropped rows nobody reads stay unwritten; kept rows' skipped pixels get the
            // residual, or zero.
            (Some(rows), cols) if dropped_unread => {
                if cols {
                    for s in 0..batch {
                        for &r in rows {
                            let at = (s * rows_total + r) * n;
                            residual.pass_through(&mut out[at..at + n], at);
                        }
                    }
                }
            }
            // Cells outside the lists: the residual passes through, or zero.
            _ => residual.pass_through(out, 0),
        }
        let ptr = OutPtr(out.as_mut_ptr());
        let tasks = batch * groups * ngroups * chunks;
        // A sample's output too big for L2 is written to many planes at once (a tile's
        // rows are 12 planes; a panel's tiles every plane), more streams than the
        // hardware prefetcher follows: each tile then prefetches the next one's output
        // and residual lines while it computes.
        let prefetch_io = rows_total * n * std::mem::size_of::<f32>() >= PREFETCH_OUT_BYTES;
        let task = |(own, accs): &mut (Spare, Spare<gemm::Acc>), t: usize| {
            // Tasks in order of rows first where the reader shares out channels: rayon
            // gives each thread a contiguous half of the tasks, so each thread then writes
            // the planes its share of the depthwise layer reads. Traced per task, a
            // depthwise group of 14×14 planes the other core had written took 1.2–1.4 µs
            // against 0.8. Whole passes, 2 threads, batch 1, in-process pairs (100): MobileNetV2
            // 0.975–0.983 of the time and EfficientNet-Lite0 0.971–0.979 in stretches
            // where two threads ran no faster than one (the machine's two vCPUs then
            // sharing a core, it seems), 0.995–1.000 in the others. Gated plans too, their
            // kept rows in order (a sample with the pool to itself): at budget 0.5 the
            // 14 × 14 expansions took 0.83–0.88 of their time and the depthwise layers
            // after them 0.78–0.88; passes 0.965–0.981 (MobileNetV2) and 0.960 (Lite0) at
            // batch 1, 0.988–1.009 at batch 8 (150 and 30 pairs).
            let (chunk, sgq) = if by_rows {
                (t / (tasks / chunks), t % (tasks / chunks))
            } else {
                (t % chunks, t / chunks)
            };
            let (q, sg) = (sgq % ngroups, sgq / ngroups);
            let grp = sg % groups;
            // The sample's input, for panels packed or read in place from it (never for
            // a split one, whose `x` is the unpadded input).
            let xs = || &x[sg * g.in_c * in_plane..(sg + 1) * g.in_c * in_plane];
            // (sample, group) blocks of the output are contiguous: sg · rows_per_group · n.
            let out_off = sg * rows_per_group * n;
            let group_len = gemm::packed_a_len(rows_per_group, lda);
            let (a, ka) = match (&rows_a, &compact_a, rows_major) {
                (Some(a), ..) | (None, Some(a), _) => (&a[..], k),
                (None, None, Some(rm)) => (rm, lda),
                (None, None, None) => (&weight[grp * group_len..(grp + 1) * group_len], lda),
            };
            let ep = Epilogue {
                bias: &bias[grp * rows_per_group..(grp + 1) * rows_per_group],
                residual: residual.sample(sg, rows_per_group * n),
                act,
            };
            let first = chunk * row_blocks / chunks * mr;
            let last = ((chunk + 1) * row_blocks / chunks * mr).min(row_list.len());
            let group = q * panels / ngroups..(q + 1) * panels / ngroups;
            let np = group.len();
            // The task's own packed panels, on a cache line like the pool's buffers.
            let own: &[f32] = if fused && group.clone().any(|p| !read_in_place(p)) {
                let panels = super::pool::line_aligned(own, np * panel_len);
                // (`max(1)`: without K the panels are empty.)
                for (p, panel) in group.clone().zip(panels.chunks_exact_mut(panel_len.max(1))) {
                    if !read_in_place(p) {
                        let cols = &col_list[p * NR..(p * NR + NR).min(ncols)];
                        gemm::pack_panel(xs(), &gk, chans, cols, panel);
                    }
                }
                panels
            } else {
                &[]
            };
            // Whether this task's thread runs the next panel group next (tasks in order
            // of chunks first: only after the panel group's last chunk).
            let runs_next_group = by_rows || chunk + 1 == chunks;
            // One tile: rows `r0..` of the task (A rows `arows` of `a`) on panel `p`.
            macro_rules! tile {
                ($a:expr, $ka:expr, $arows:expr, $r0:expr, $p:expr) => {{
                    let (r0, p) = ($r0, $p);
                    let (y, x0) = (p / segs, (p % segs) * NR);
                    let lanes = flat.then(|| flat_lanes[p]);
                    let cols = if let Some((l, start)) = lanes {
                        let stored = start..start + l.count_ones() as usize;
                        match kept_flat {
                            Some(_) => &col_list[stored],
                            None => &self.all_cols[stored],
                        }
                    } else if implicit {
                        &self.all_cols[y * ow + x0..y * ow + (x0 + NR).min(ow)]
                    } else {
                        &col_list[p * NR..(p * NR + NR).min(ncols)]
                    };
                    let in_place = read_in_place(p);
                    let (panel, ldb) = if flat {
                        let fp = kept_flat.as_ref().map_or(p, |k| k[p].0);
                        let at = sg * g.in_c * src_plane + fp * NR;
                        (&x[at..], 0)
                    } else if implicit {
                        // Through the slack at the end of the padded input (or phases).
                        let src = phased.as_deref().unwrap_or(x);
                        let at = sg * g.in_c * src_plane + y * g.stride[0] * src_row + x0;
                        (&src[at..], 0)
                    } else if in_place {
                        (&xs()[p * NR..], in_plane)
                    } else if fused {
                        (&own[(p - group.start) * panel_len..][..panel_len], NR)
                    } else {
                        let at = (sg * panels + p) * panel_len;
                        (&packed[at..at + panel_len], NR)
                    };
                    Tile {
                        a: $a,
                        ka: $ka,
                        arows: $arows,
                        kmap: None,
                        // Packed panels are read row after row.
                        boff: boff.as_deref().filter(|_| in_place),
                        k,
                        rows: &row_list[r0..(r0 + mr).min(last)],
                        panel,
                        ldb,
                        ldc: n,
                        cols,
                        lanes: lanes.map(|(l, _)| l),
                    }
                }};
            }
            // K blocks outermost: one kc × NR block of each panel serves every row tile
            // given from L1 or L2, and each row tile's block of A serves the group's
            // panels from L1. Where the tuning takes K whole (Zen 5), each tile runs
            // its K at once, its accumulators never leaving the registers, and streams
            // its panel and its rows of A from L2 (`Tuning::gemm_kc`).
            // `next(j, k0)`: what tile j prefetches on K block k0.
            // A stored tile's rows of its panel, summed while in this core's cache (see
            // PanelSums).
            let sum_tile = |tile: &Tile| {
                let Some(ps) = sums else { return };
                let c0 = tile.cols[0];
                // SAFETY: the tile's cells lie inside `out` (its size is checked above)
                // and were stored on this thread; each (row, panel) sum is written by the
                // one tile computing that row's panel, inside the caller's batch × panels
                // × rows.
                unsafe {
                    row_sums(
                        self.isa,
                        ptr.get().add(out_off + c0),
                        n,
                        tile.cols.len(),
                        tile.rows,
                        ps.at
                            .get()
                            .wrapping_add((sg * panels + c0 / NR) * rows_total),
                    )
                };
            };
            let run = |tiles: &[Tile],
                       accs: &mut Vec<gemm::Acc>,
                       next: &dyn Fn(usize, usize) -> gemm::Prefetch| {
                // The kernels start each accumulator from zero at k = 0: a thread's
                // buffer is reused as it is, not zeroed per task (unless there is no k to
                // start at).
                if accs.len() < tiles.len() {
                    accs.resize(tiles.len(), [[0f32; NR]; 12]);
                }
                if k == 0 {
                    accs.fill([[0f32; NR]; 12]);
                }
                for k0 in (0..k).step_by(self.kc) {
                    let k1 = k0.saturating_add(self.kc).min(k);
                    let fin = (k1 == k).then(|| gemm::Finish {
                        ep: &ep,
                        c: ptr.get().wrapping_add(out_off),
                    });
                    for (j, (tile, acc)) in tiles.iter().zip(accs.iter_mut()).enumerate() {
                        if k1 == k && prefetch_io {
                            if let Some(nt) = tiles.get(j + 1) {
                                gemm::prefetch_epilogue(nt, &ep, ptr.get().wrapping_add(out_off));
                            }
                        }
                        // SAFETY: arows < rows_per_group index `a` (whole blocks, ka
                        // columns, k ≤ ka), or index the task's copy of its blocks (whole
                        // blocks of k columns); the panel holds k × NR, or (in place)
                        // every boff[kk] + NR is inside it: shifted windows through the
                        // padded input's NR values of slack; a 1×1 layer's kept channel
                        // c at c · plane, with the values the kernel reads from the
                        // panel's first position (`gemm::panel_reads`) inside the plane.
                        // With `fin`, as for the store below.
                        let stored = unsafe {
                            if rows_major.is_some() {
                                // Stored below (no epilogue from the registers).
                                gemm::accumulate_rows_major(self.isa, tile, k0, k1, acc);
                                false
                            } else {
                                gemm::accumulate_finishing(
                                    self.isa,
                                    tile,
                                    k0,
                                    k1,
                                    acc,
                                    next(j, k0),
                                    fin,
                                )
                            }
                        };
                        // A finished tile the kernel did not store is stored now.
                        if k1 == k && !stored {
                            // SAFETY: rows < rows_per_group and cols < n index inside
                            // this (sample, group) block of `out`; tasks cover disjoint
                            // (rows, cols) cells.
                            unsafe { gemm::store(tile, &ep, acc, ptr.get().add(out_off)) };
                        }
                        if k1 == k {
                            sum_tile(tile);
                        }
                    }
                }
                // Without K, no kernel ran: the tiles are their (zeroed) accumulators.
                if k == 0 {
                    for (tile, acc) in tiles.iter().zip(accs.iter()) {
                        // SAFETY: as above.
                        unsafe { gemm::store(tile, &ep, acc, ptr.get().add(out_off)) };
                        sum_tile(tile);
                    }
                }
            };
            if let Some(c) = chans.filter(|_| local_copy) {
                // Big kept weights: the task copies the kept columns of the blocks its
                // rows lie in (rows keep their place in the block), row tile by row
                // tile, just before the tile needs them; meanwhile each row tile's first
                // panel prefetches, over its steps of K, the source blocks the next row
                // tile will copy, so the copy reads from cache what a copy up front had
                // to wait for from memory.
                //
                // On AVX-512 the copy is of the row tile's own rows, gathered into one
                // block (`gemm::gather_tile`): it writes only those rows' values, not
                // the twelve of each block they lie in, and the tile reads one stream.
                // ResNet-50's `layer4.0.conv2` (3×3 stride 2, 512 → 512 from 14 × 14, 0.57
                // of the rows and channels kept), one engine, the way switched pass by
                // pass (40 pairs, 2 threads, Zen 4, budget 0.5): 0.91–0.96 of its time at
                // batch 1 and 0.94 at batch 8, passes 0.980–0.999 and 0.990; alone,
                // weights in L3, 0.85–0.87 (MobileNetV2, whose 7 × 7 projections copy
                // every row of their blocks anyway: passes 0.991 and 1.004).
                let gathering = self.isa == Isa::Avx512;
                let mut blocks: Vec<usize> = Vec::new();
                let mut local = Vec::with_capacity(last.saturating_sub(first));
                for &r in &row_list[first.min(last)..last] {
                    if blocks.last() != Some(&(r / gemm::PACK)) {
                        blocks.push(r / gemm::PACK);
                    }
                    local.push((blocks.len() - 1) * gemm::PACK + r % gemm::PACK);
                }
                let (src, dst) = (gemm::PACK * lda, gemm::PACK * k);
                let mut buf = self.pool.take_dirty(if gathering {
                    dst + gemm::GATHER_SLACK
                } else {
                    blocks.len() * dst
                });
                let mut copied = 0;
                let mut packed_panels: Option<Vec<usize>> = None;
                for r0 in (first..last).step_by(mr) {
                    let n_rows = (r0 + mr).min(last) - r0;
                    let in_blocks = &local[r0 - first..r0 - first + n_rows];
                    let need = in_blocks[n_rows - 1] / gemm::PACK + 1;
                    let arows = if gathering {
                        let rows = &row_list[r0..r0 + n_rows];
                        let gathered = gemm::gather_tile(self.isa, a, lda, rows, c, taps, &mut buf);
                        debug_assert!(gathered);
                        &self.all_rows[..n_rows]
                    } else {
                        for (b, out) in buf[copied * dst..need * dst]
                            .chunks_exact_mut(dst.max(1))
                            .enumerate()
                        {
                            let at = blocks[copied + b] * src;
                            gemm::pack_a_channels(&a[at..at + src], lda, c, taps, out);
                        }
                        copied = copied.max(need);
                        in_blocks
                    };
                    // The next row tile's blocks not copied yet, as far as they are
                    // consecutive in the source.
                    let ahead = local
                        .get(r0 + mr - first..((r0 + 2 * mr).min(last)).saturating_sub(first))
                        .filter(|r| !r.is_empty())
                        .map(|r| (need, r[r.len() - 1] / gemm::PACK + 1))
                        .filter(|&(b0, b1)| b0 < b1)
                        .map(|(b0, b1)| {
                            let run = (b0..b1)
                                .take_while(|&b| blocks[b] - blocks[b0] == b - b0)
                                .count();
                            (blocks[b0], run.min(gemm::Prefetch::MAX))
                        });
                    let tiles: Vec<Tile> = group
                        .clone()
                        .map(|p| tile!(&buf[..], k, arows, r0, p))
                        .collect();
                    // Spread over the group's packed panels (the kernel of a panel read
                    // in place takes no prefetch), each its share of the blocks; which
                    // panels those are is the same for every row tile.
                    let packed_panels = packed_panels.get_or_insert_with(|| {
                        tiles
                            .iter()
                            .enumerate()
                            .filter(|(_, t)| t.boff.is_none() && t.cols.len() > 16)
                            .map(|(j, _)| j)
                            .collect::<Vec<usize>>()
                    });
                    let share = packed_panels.len().max(1);
                    let step = src.div_ceil(k.max(1) * share).next_multiple_of(16);
                    let next = |j: usize, k0: usize| match (
                        ahead,
                        packed_panels.iter().position(|&p| p == j),
                    ) {
                        (Some((b, blocks)), Some(e)) => gemm::Prefetch {
                            at: a.as_ptr().wrapping_add(b * src + (e * k + k0) * step),
                            blocks,
                            stride: src,
                            step,
                            panel: std::ptr::null(),
                        },
                        _ => gemm::Prefetch::NONE,
                    };
                    run(&tiles, accs, &next);
                }
                self.pool.give(buf);
            } else {
                // Tiles row tile by row tile, each with the group's panels.
                let mut tiles: Vec<Tile> = Vec::with_capacity(np * row_blocks);
                for r0 in (first..last).step_by(mr) {
                    let n_rows = (r0 + mr).min(last) - r0;
                    let arows = match rows_a {
                        Some(_) => &self.all_rows[r0..r0 + n_rows],
                        None => &row_list[r0..r0 + n_rows],
                    };
                    for p in group.clone() {
                        tiles.push(tile!(a, ka, arows, r0, p));
                    }
                }
                // Where A streams from memory (grouped panels), the group's first panel
                // prefetches the next row tile's block of A. Elsewhere A is in L2, and
                // prefetching measured no gain.
                // A 1×1 layer's panels read in place: the group's first row tile
                // prefetches the panels the thread runs next (past the sample's last, the
                // next sample's first) into L2. Their K rows lie in as many planes, more
                // streams than the hardware prefetcher follows, and the first row tile
                // to read them would otherwise wait on each row.
                // (Tile j < np reads panel group.start + j; one packed instead, a narrow
                // last panel, reads its rows at another stride and prefetches nothing.)
                let next_panel = |j: usize| {
                    (self.panel_prefetch
                        && direct
                        && j < np
                        && runs_next_group
                        && read_in_place(group.start + j))
                    .then(|| panel_after(sg, group.end + j, panels, batch * groups))
                    .flatten()
                    .filter(|&(_, p)| read_in_place(p))
                    .map_or(std::ptr::null(), |(s, p)| {
                        x.as_ptr().wrapping_add(s * g.in_c * in_plane + p * NR)
                    })
                };
                let next = |j: usize, k0: usize| match tiles.get(j + np) {
                    Some(n) if per_group > 1 && j.is_multiple_of(np) => {
                        let at = gemm::a_offset(n.arows[0], n.ka) + k0 * gemm::PACK;
                        // Kept rows spread over blocks: prefetch the blocks they span.
                        let span =
                            n.arows[n.arows.len() - 1] / gemm::PACK - n.arows[0] / gemm::PACK + 1;
                        gemm::Prefetch {
                            at: n.a.as_ptr().wrapping_add(at),
                            blocks: span.min(gemm::Prefetch::MAX),
                            stride: gemm::PACK * n.ka,
                            step: gemm::PACK,
                            panel: next_panel(j),
                        }
                    }
                    _ => gemm::Prefetch {
                        panel: next_panel(j),
                        ..gemm::Prefetch::NONE
                    },
                };
                run(&tiles, accs, &next);
            }
        };
        if serial {
            let mut own = (Spare::take(), Spare::take());
            (0..tasks).for_each(|t| task(&mut own, t));
        } else {
            (0..tasks)
                .into_par_iter()
                .for_each_init(|| (Spare::take(), Spare::take()), task);
        }
        if let Some(ps) = sums {
            debug_assert_eq!(ps.panels, panels);
            ps.filled
                .fetch_add(batch, std::sync::atomic::Ordering::Release);
        }
        self.pool.give(packed);
        if let Some(a) = compact_a {
            self.pool.give(a);
        }
        if let Some(a) = rows_a {
            self.pool.give(a);
        }
        if let Some(p) = padded {
            self.pool.give(p);
        }
        if let Some(p) = phased {
            self.pool.give(p);
        }
    }

    /// A gated convolution of a batch whose samples each keep their own output rows and
    /// input channels, every output position computed: the batch's tiles run together,
    /// block of weight rows by block, each tile reading its sample's kept columns of the
    /// packed weights in place through a column map, instead of each sample copying its
    /// kept columns out of the weights and running on its copy. For layers of few
    /// positions per sample (7×7; see [`BATCH_GATED_PANELS`]), where a sample's GEMM is
    /// short next to that copy. Each sample's panels are packed up front for its kept
    /// channels; within a task, K goes in ranges of input channels, each sample's kept
    /// columns in the range after the other's, so that the range's A stays in L2 across
    /// the samples.
    #[allow(clippy::too_many_arguments)]
    fn conv_gated_batch(
        &self,
        x: &[f32],
        weight: &[f32],
        g: &ConvGeom,
        act: Act,
        plans: &[SamplePlan],
        residual: Residual,
        out: &mut [f32],
    ) {
        let batch = plans.len();
        let cout = plans[0].bias.len();
        let n = g.out_hw[0] * g.out_hw[1];
        let plane = g.in_hw[0] * g.in_hw[1];
        let (cin, lda) = (g.in_c, g.k());
        let taps = g.kernel[0] * g.kernel[1];
        let panels = n.div_ceil(NR);
        let all_chans = &self.all_rows[..cin];
        let ph = (g.out_hw[0] - 1) * g.stride[0] + g.kernel[0];
        let pw = (g.out_hw[1] - 1) * g.stride[1] + g.kernel[1];
        let needs_pad = g.pad_tl != [0, 0] || ph > g.in_hw[0] || pw > g.in_hw[1];
        let padded_geom = ConvGeom {
            in_hw: [ph, pw],
            pad_tl: [0, 0],
            ..*g
        };
        // Per sample: the A column of each of its panel rows (empty: all channels kept),
        // their count, and its panels packed for its kept channels.
        let packed: Vec<(Vec<usize>, usize, Buf)> = plans
            .par_iter()
            .enumerate()
            .map(|(s, plan)| {
                let chans = plan.chans.unwrap_or(all_chans);
                // Every channel kept: the panel rows are A's columns, no map.
                let kmap: Vec<usize> = plan.chans.map_or_else(Vec::new, |c| {
                    c.iter()
                        .flat_map(|&c| (0..taps).map(move |t| c * taps + t))
                        .collect()
                });
                let k = chans.len() * taps;
                let xs = &x[s * cin * plane..(s + 1) * cin * plane];
                // Zero-padded first (its kept planes), as in `conv_gemm_into`: every
                // window is then inside and packs as contiguous runs.
                let padded = needs_pad.then(|| {
                    pad_planes(
                        &self.gated_pool,
                        xs,
                        g.in_hw,
                        g.pad_tl,
                        [ph, pw],
                        plan.chans,
                    )
                });
                let gk = ConvGeom {
                    in_c: chans.len(),
                    ..if needs_pad { padded_geom } else { *g }
                };
                let len = k * NR;
                let mut buf = self.gated_pool.take_dirty(panels * len);
                for (p, panel) in buf.chunks_exact_mut(len.max(1)).enumerate().take(panels) {
                    let cols = &self.all_cols[p * NR..(p * NR + NR).min(n)];
                    gemm::pack_panel(
                        padded.as_deref().unwrap_or(xs),
                        &gk,
                        plan.chans,
                        cols,
                        panel,
                    );
                }
                if let Some(p) = padded {
                    self.gated_pool.give(p);
                }
                (kmap, k, buf)
            })
            .collect();
        assert_eq!(out.len(), batch * cout * n, "output buffer size");
        pass_dropped_rows(plans, residual, cout * n, out);
        let ptr = OutPtr(out.as_mut_ptr());
        let mr = self.isa.mr();
        let blocks = cout.div_ceil(gemm::PACK);
        let tasks = (4 * rayon::current_num_threads()).min(blocks);
        // Input channels per range of K: about two K blocks of columns.
        let span = (2 * KC).div_ceil(taps);
        let task = |accs: &mut Spare<gemm::Acc>, t: usize| {
            let (r0, r1) = (
                t * blocks / tasks * gemm::PACK,
                ((t + 1) * blocks / tasks * gemm::PACK).min(cout),
            );
            // Per sample: its rows in this task's blocks, and its epilogue.
            let mut tiles: Vec<(usize, Tile)> = Vec::new();
            let eps: Vec<Epilogue> = plans
                .iter()
                .enumerate()
                .map(|(s, plan)| Epilogue {
                    bias: plan.bias,
                    residual: residual.sample(s, cout * n),
                    act,
                })
                .collect();
            for (s, plan) in plans.iter().enumerate() {
                let rows = match plan.rows {
                    Some(r) => {
                        let lo = r.partition_point(|&x| x < r0);
                        &r[lo..lo + r[lo..].partition_point(|&x| x < r1)]
                    }
                    None => &self.all_rows[r0..r1],
                };
                let (kmap, k, panel_buf) = &packed[s];
                let k = *k;
                for p in 0..panels {
                    for tile_rows in rows.chunks(mr) {
                        tiles.push((
                            s,
                            Tile {
                                a: weight,
                                ka: lda,
                                arows: tile_rows,
                                kmap: plan.chans.map(|_| &kmap[..]),
                                boff: None,
                                k,
                                rows: tile_rows,
                                panel: &panel_buf[p * k * NR..(p + 1) * k * NR],
                                ldb: NR,
                                ldc: n,
                                cols: &self.all_cols[p * NR..(p * NR + NR).min(n)],
                                lanes: None,
                            },
                        ));
                    }
                }
            }
            if accs.len() < tiles.len() {
                accs.resize(tiles.len(), [[0f32; NR]; 12]);
            }
            let store = |s: usize, tile: &Tile, acc: &gemm::Acc| {
                // SAFETY: the tile's rows < cout and columns < n index inside sample s's
                // block of `out`; tasks hold disjoint rows.
                unsafe { gemm::store(tile, &eps[s], acc, ptr.get().add(s * cout * n)) };
            };
            for c0 in (0..cin).step_by(span) {
                let c1 = (c0 + span).min(cin);
                let mut j = 0;
                while j < tiles.len() {
                    let s = tiles[j].0;
                    let end = j + tiles[j..].iter().take_while(|(t, _)| *t == s).count();
                    let chans = plans[s].chans;
                    let at = |c: usize| chans.map_or(c, |v| v.partition_point(|&x| x < c)) * taps;
                    let (k0, k1) = (at(c0), at(c1));
                    let k = packed[s].1;
                    let fin = (k1 == k).then(|| gemm::Finish {
                        ep: &eps[s],
                        c: ptr.get().wrapping_add(s * cout * n),
                    });
                    for ((_, tile), acc) in tiles[j..end].iter().zip(accs[j..end].iter_mut()) {
                        if k == 0 {
                            // No kept channel: the tile is its bias.
                            acc.iter_mut().for_each(|r| r.fill(0.0));
                            if c0 == 0 {
                                store(s, tile, acc);
                            }
                            continue;
                        }
                        if k0 == k1 {
                            continue;
                        }
                        // SAFETY: the tile's rows < cout index whole blocks of the packed
                        // weights (lda columns) and every column map entry is < lda; the
                        // panel holds k rows of NR values; with `fin`, as for the store.
                        let stored = unsafe {
                            gemm::accumulate_finishing(
                                self.isa,
                                tile,
                                k0,
                                k1,
                                acc,
                                gemm::Prefetch::NONE,
                                fin,
                            )
                        };
                        if fin.is_some() && !stored {
                            store(s, tile, acc);
                        }
                    }
                    j = end;
                }
            }
        };
        (0..tasks)
            .into_par_iter()
            .for_each_init(Spare::take, |accs, t| task(accs, t));
        for (_, _, buf) in packed {
            self.gated_pool.give(buf);
        }
    }

    /// [`Self::conv_gated_batch`] by Winograd's F(2×2, 3×3): every sample's kept
    /// channels through [`winograd::conv_samples`], or on AVX-512 over 7 × 7 planes,
    /// where every sample drops input channels, on the filters as lines
    /// (`winograd_lines::conv_samples`).
    #[allow(clippy::too_many_arguments)]
    fn conv_winograd_samples(
        &self,
        x: &[f32],
        wg: &WinogradWeights,
        g: &ConvGeom,
        act: Act,
        plans: &[SamplePlan],
        residual: Residual,
        out: &mut [f32],
    ) {
        let n = g.out_hw[0] * g.out_hw[1];
        let cout = wg.rows;
        assert_eq!(out.len(), plans.len() * cout * n, "output buffer size");
        pass_dropped_rows(plans, residual, cout * n, out);
        let samples: Vec<winograd::SampleKeep> = plans
            .iter()
            .map(|p| winograd::SampleKeep {
                chans: p.chans,
                rows: p.rows,
                bias: p.bias,
            })
            .collect();
        let job = winograd::SamplesJob {
            isa: self.isa,
            x: &x[..plans.len() * g.in_c * g.in_hw[0] * g.in_hw[1]],
            hw: g.out_hw,
            weights: wg,
            samples: &samples,
            residual,
            act,
        };
        // Where every sample drops input channels, on the lines (see
        // `winograd_lines::conv_samples`).
        #[cfg(target_arch = "x86_64")]
        if let Some(lines) = plans
            .iter()
            .all(|p| p.chans.is_some())
            .then(|| wg.lines_for_samples(self.isa, g.out_hw))
            .flatten()
        {
            return winograd_lines::conv_samples(&job, lines, &self.pool, out);
        }
        winograd::conv_samples(&job, &self.pool, out);
    }

    /// [`Self::conv_gemm_into`] by Winograd's F(2×2, 3×3) ([`winograd`]), for a layer
    /// with `WinogradWeights` and a plan without kept pixels.
    #[allow(clippy::too_many_arguments)]
    fn conv_winograd(
        &self,
        x: &[f32],
        batch: usize,
        wg: &WinogradWeights,
        bias: &[f32],
        g: &ConvGeom,
        residual: Residual,
        act: Act,
        sub: Subset,
        zero_dropped: bool,
        out: &mut [f32],
    ) {
        let n = g.out_hw[0] * g.out_hw[1];
        let (rows_total, in_len) = (bias.len(), g.in_c * g.in_hw[0] * g.in_hw[1]);
        assert_eq!(out.len(), batch * rows_total * n, "output buffer size");
        // Cells of dropped rows that a reader may see: the residual passes through, or zero.
        if sub.rows.is_some() && !sub.dropped_unread {
            residual.pass_through(out, 0);
        }
        // One job for the whole batch: every sample's tiles go through the GEMMs together.
        let job = winograd::Job {
            isa: self.isa,
            batch,
            x: &x[..batch * in_len],
            hw: g.out_hw,
            weights: wg,
            chans: sub.chans,
            rows: sub.rows,
            bias,
            residual,
            act,
            serial: sub.serial,
            zero_dropped,
            bands: self.winograd_bands,
        };
        winograd::conv(&job, &self.pool, out);
    }

    /// The planes of `x` (`in_hw` each) zero-padded as [`pad_planes`] pads them to
    /// `out_hw`, each padded plane stored as its even columns then its odd columns (two
    /// planes of `out_hw[1].div_ceil(2)` columns; an odd-width plane's odd half ends in a
    /// zero), followed by [`NR`] zeros of slack; with `chans`, only those planes. One pass
    /// from the input: a padded copy split afterwards wrote and read every value twice,
    /// and on AVX2 split it value by value (`perf` on a one-layer probe of MobileNetV2's
    /// stem: 11% of samples in that split, 12% in copies, some of them the probe's own).
    /// One-layer pairs against it: the stem 0.83–0.85 of the time on one thread,
    /// 0.72–0.77 on two. Few planes are shared out in bands of rows
    /// ([`SPLIT_TASKS_PER_THREAD`]). Expects padded planes that reach past the top and left
    /// pads.
    fn pad_split_planes(
        &self,
        x: &[f32],
        in_hw: [usize; 2],
        pad_tl: [usize; 2],
        out_hw: [usize; 2],
        chans: Option<&[usize]>,
        serial: bool,
    ) -> Buf {
        let in_plane = in_hw[0] * in_hw[1];
        let [ph, pw] = out_hw;
        let half = pw.div_ceil(2);
        let out_plane = 2 * ph * half;
        let planes = x.len() / in_plane;
        let mut out = self.pool.take_dirty(planes * out_plane + NR);
        out[planes * out_plane..].fill(0.0);
        let rows = in_hw[0].min(ph.saturating_sub(pad_tl[0]));
        let cols = in_hw[1].min(pw.saturating_sub(pad_tl[1]));
        let [top, left] = pad_tl;
        // Input column ix is padded column ix + left: phase (ix + left) % 2, index
        // (ix + left) / 2. So the input's even columns go to phase left % 2 from index
        // left / 2, its odd ones to the other phase from ⌈left / 2⌉.
        let (ne, no) = (cols.div_ceil(2), cols / 2);
        let (e0, o0) = (left / 2, left.div_ceil(2));
        // Rows `y0..` of one padded plane: its even columns' rows `evens` and its odd
        // columns' rows `odds`, from input plane `i`.
        let split = |y0: usize, evens: &mut [f32], odds: &mut [f32], i: &[f32]| {
            let rows_here = evens
                .chunks_exact_mut(half)
                .zip(odds.chunks_exact_mut(half));
            for (y, (er, or)) in (y0..).zip(rows_here) {
                if y < top || y >= top + rows {
                    er.fill(0.0);
                    or.fill(0.0);
                    continue;
                }
                let src = &i[(y - top) * in_hw[1]..][..cols];
                er[..e0].fill(0.0);
                er[e0 + ne..].fill(0.0);
                or[..o0].fill(0.0);
                or[o0 + no..].fill(0.0);
                ops::split_even_odd(src, &mut er[e0..e0 + ne], &mut or[o0..o0 + no]);
            }
        };
        let (src, dst) = (&x[..planes * in_plane], &mut out[..planes * out_plane]);
        let read = read_planes(planes, chans);
        // Few planes (a stem's three) are split in bands of rows as well, so that the
        // threads share them evenly: by whole planes one thread split two of three.
        let kept = read.iter().filter(|&&k| k).count().max(1);
        let bands = if serial {
            1
        } else {
            (SPLIT_TASKS_PER_THREAD * rayon::current_num_threads())
                .div_ceil(kept)
                .clamp(1, ph.max(1))
        };
        let band = ph.div_ceil(bands).max(1) * half;
        let mut tasks = Vec::with_capacity(kept * bands);
        for ((o, i), _) in dst
            .chunks_exact_mut(out_plane)
            .zip(src.chunks_exact(in_plane))
            .zip(&read)
            .filter(|(_, &k)| k)
        {
            let (p0, p1) = o.split_at_mut(ph * half);
            let (evens, odds) = if left.is_multiple_of(2) {
                (p0, p1)
            } else {
                (p1, p0)
            };
            for (b, (e, d)) in evens
                .chunks_mut(band)
                .zip(odds.chunks_mut(band))
                .enumerate()
            {
                tasks.push((b * band / half, e, d, i));
            }
        }
        let run = |(y0, e, d, i): (usize, &mut [f32], &mut [f32], &[f32])| split(y0, e, d, i);
        if serial {
            tasks.into_iter().for_each(run);
        } else {
            tasks.into_par_iter().for_each(run);
        }
        out
    }

    /// The forward pass; with `cuts`, each node's gates cut per sample what it computes
    /// and readers skip the dropped channels.
    fn run(&self, input: &[f32], batch: usize, cuts: Option<&[NodeCut]>) -> Result<Forward> {
        // Called from outside any worker pool, the pass moves into the global pool once:
        // otherwise every parallel loop of the pass is injected from outside and wakes
        // the sleeping workers again (worth about a fifth of MobileNetV2's time at
        // batch 1 on two cores).
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.run(input, batch, cuts));
        }
        if input.len() != batch * self.sizes[0] {
            return Err(Error::Input(format!(
                "{} values do not fill a batch of {batch} inputs of {} values",
                input.len(),
                self.sizes[0]
            )));
        }
        let nodes = self.layers.len();
        let pass = if batch > self.sub_batch {
            // The first nodes in parts (see SUB_BATCH_FLOATS), the rest over the whole
            // batch from where its values are small (see WHOLE_BATCH_FLOATS).
            let split = self.whole_from(batch).unwrap_or(nodes);
            // The parts run side by side, each thread taking parts of its own (and
            // helping with the other's parallel loops when it runs out): a part's values
            // then stay in its thread's core rather than being shared out over both
            // cores layer by layer. One engine, the way switched pass by pass (16 pairs,
            // 2 threads, batch 8, AMD EPYC of Zen 4), against the parts one after the
            // other: MobileNetV2 0.953 and 0.970 of the time dense, 0.977 at budget 0.5;
            // EfficientNet-Lite0 0.972 and 0.958, 0.905; ResNet-18 0.950, 0.939;
            // ResNet-50 0.996, 0.969. With every node in parts (no whole-batch tail):
            // MobileNetV2 0.962, Lite0 0.985.
            let parts = input
                .par_chunks(self.sub_batch * self.sizes[0])
                .map(|part| {
                    let n = part.len() / self.sizes[0];
                    self.run_nodes(self.copy_input(part, cuts), n, cuts, 0..split, None)
                })
                .collect::<Result<Vec<_>>>()?;
            let head = self.concat(parts);
            if split < nodes {
                let tail =
                    self.run_nodes((head.out, None), batch, cuts, split..nodes, head.kept)?;
                Segment {
                    out: tail.out,
                    kept: tail.kept,
                    node_kept: head
                        .node_kept
                        .into_iter()
                        .zip(tail.node_kept)
                        .map(|(a, b)| a.or(b))
                        .collect(),
                    node_tiles: head
                        .node_tiles
                        .into_iter()
                        .zip(tail.node_tiles)
                        .map(|(a, b)| a.or(b))
                        .collect(),
                    traces: head.traces.into_iter().chain(tail.traces).collect(),
                    gate_flops: head
                        .gate_flops
                        .iter()
                        .zip(&tail.gate_flops)
                        .map(|(a, b)| a + b)
                        .collect(),
                }
            } else {
                head
            }
        } else {
            self.run_nodes(self.copy_input(input, cuts), batch, cuts, 0..nodes, None)?
        };
        let logits = pass.out.into_vec();
        if logits.len() != batch * self.classes {
            return Err(Error::Exec(format!(
                "{} logits for {batch} samples",
                logits.len()
            )));
        }
        let dynamic = cuts.is_some();
        let flops = (0..batch)
            .map(|s| pass.traces.iter().map(|t| t.flops[s]).sum())
            .collect();
        Ok(Forward {
            logits,
            flops: dynamic.then_some(flops),
            gate_flops: dynamic.then_some(pass.gate_flops),
            kept: if dynamic { pass.node_kept } else { Vec::new() },
            tiles: if dynamic { pass.node_tiles } else { Vec::new() },
            layers: pass.traces,
        })
    }

    /// The first node from which the rest of the network runs over a batch of `batch`
    /// samples at once rather than in parts: every value from there on, over the whole
    /// batch, holds at most `whole_batch` floats, and no node from there on reads a value
    /// from before it. `None` where there is none.
    fn whole_from(&self, batch: usize) -> Option<usize> {
        let nodes = self.layers.len();
        // Per value: the last node that reads any value up to it.
        let mut read_until = 0;
        (1..nodes).find(|&s| {
            read_until = read_until.max(self.last_use[s - 1]);
            let banded = self.bands[s - 1].is_some();
            read_until < s
                && !banded
                && self.sizes[s..]
                    .iter()
                    .all(|&v| v * batch <= self.whole_batch)
        })
    }

    /// Sample-ordered concatenation of the segments of consecutive parts of one batch:
    /// their values and per-sample figures in order, node times summed.
    fn concat(&self, parts: Vec<Segment>) -> Segment {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        // Per value or node, per sample: the sets of every part, when every part has
        // them; the same nodes are gated in every part, so either all or none do.
        fn sets(of: impl Iterator<Item = Kept>) -> Kept {
            of.collect::<Option<Vec<_>>>().map(|v| v.concat())
        }
        debug_assert!(parts
            .iter()
            .all(|p| p.kept.is_some() == parts[0].kept.is_some()));
        let len = parts.iter().map(|p| p.out.len()).sum();
        let mut out = self.pool.take_dirty(len);
        let mut at = 0;
        for p in &parts {
            out[at..at + p.out.len()].copy_from_slice(&p.out);
            at += p.out.len();
        }
        let nodes = parts[0].node_kept.len();
        let traced = parts[0].traces.len();
        let joined = Segment {
            out,
            kept: sets(parts.iter().map(|p| p.kept.clone())),
            node_kept: (0..nodes)
                .map(|i| sets(parts.iter().map(|p| p.node_kept[i].clone())))
                .collect(),
            node_tiles: (0..nodes)
                .map(|i| sets(parts.iter().map(|p| p.node_tiles[i].clone())))
                .collect(),
            traces: (0..traced)
                .map(|i| LayerTrace {
                    ms: parts.iter().map(|p| p.traces[i].ms).sum(),
                    gate_ms: parts.iter().map(|p| p.traces[i].gate_ms).sum(),
                    flops: parts
                        .iter()
                        .flat_map(|p| p.traces[i].flops.iter().copied())
                        .collect(),
                })
                .collect(),
            gate_flops: parts
                .iter()
                .flat_map(|p| p.gate_flops.iter().copied())
                .collect(),
        };
        for p in parts {
            self.pool.give(p.out);
        }
        joined
    }

    /// `values` in a buffer of the pool.
    fn copy_of(&self, values: &[f32]) -> Buf {
        let mut b = self.pool.take_dirty(values.len());
        // In parts over the pool's threads: the caller's input is rarely in this core's
        // cache, and one core alone copied MobileNetV2's 600 KB input in 85–105 µs
        // (a throwaway task timer, 2 threads, batch 1) while the other waited. Whole
        // passes, in-process pairs against one `copy_from_slice`: MobileNetV2 and
        // EfficientNet-Lite0 1.013 and 1.021 times as fast at batch 8 (20 pairs),
        // 0.985–1.013 at batch 1 (40–60 pairs; noise as large), ResNet-18 1.004.
        b.par_chunks_mut(COPY_CHUNK)
            .zip(values.par_chunks(COPY_CHUNK))
            .for_each(|(o, i)| o.copy_from_slice(i));
        b
    }

    /// Network inputs in a buffer of the pool, with their channel means where a gate of
    /// this pass reads them ([`copy_pooled`]).
    fn copy_input(&self, input: &[f32], cuts: Option<&[NodeCut]>) -> (Buf, Option<Vec<f32>>) {
        let gated = cuts.is_some_and(|c| {
            self.input_gates
                .iter()
                .any(|&i| !matches!(c[i].channels, Cut::All))
        });
        if !gated {
            return (self.copy_of(input), None);
        }
        let mut b = self.pool.take_dirty(input.len());
        let means = copy_pooled(input, &mut b, self.input_plane);
        (b, Some(means))
    }

    /// Nodes `range` of the network over `batch` samples of `first` (the value the
    /// range's first node starts from, whose kept sets are `kept_in`, and whose channel
    /// means, when known, are `first_means`).
    fn run_nodes(
        &self,
        (first, first_means): (Buf, Option<Vec<f32>>),
        batch: usize,
        cuts: Option<&[NodeCut]>,
        range: std::ops::Range<usize>,
        kept_in: Kept,
    ) -> Result<Segment> {
        let mut values: Vec<Option<Buf>> = std::iter::repeat_with(|| None)
            .take(self.layers.len() + 1)
            .collect();
        let mut kept: Vec<Kept> = vec![None; self.layers.len() + 1];
        let mut node_kept: Vec<Kept> = vec![None; self.layers.len()];
        let mut node_tiles: Vec<Kept> = vec![None; self.layers.len()];
        let mut traces = Vec::with_capacity(range.len());
        let mut gate_flops = vec![0u64; batch];
        values[range.start] = Some(first);
        kept[range.start] = kept_in;
        // Per value: each sample's channel means, where a gate reading it will want them
        // and the layer that wrote it summed them.
        let mut means: Vec<Option<Vec<f32>>> = vec![None; self.layers.len() + 1];
        means[range.start] = first_means;
        // The previous node ran in bands with this one and left this one's output.
        let mut banded = false;
        let (start, end) = (range.start, range.end);
        for (i, (src, layer)) in self.layers.iter().enumerate().take(end).skip(start) {
            if std::mem::take(&mut banded) {
                values[i + 1] = values[*src].take();
                let flops = match (&kept[*src], layer) {
                    (Some(sets), Layer::Depthwise { plan, .. }) => {
                        let win = plan.win();
                        let per = win.out_hw[0] * win.out_hw[1] * win.kernel[0] * win.kernel[1];
                        let f = sets.iter().map(|s| 2 * (per * s.len()) as u64).collect();
                        node_kept[i] = Some(sets.clone());
                        kept[i + 1] = Some(sets.clone());
                        f
                    }
                    _ => vec![self.flops[i]; batch],
                };
                traces.push(LayerTrace {
                    ms: 0.0,
                    gate_ms: 0.0,
                    flops,
                });
                continue;
            }
            let start = std::time::Instant::now();
            let mut gate_ms = 0.0;
            // A convolution that is the last reader of its residual writes its output over
            // it (`Residual::InOut`); a gated one leaves the cells it skips as they are.
            let in_out = match layer {
                Layer::Gemm {
                    residual: Some(rv), ..
                } if self.last_use[*rv] == i
                    && *rv != *src
                    && self.bands[i].is_none()
                    && values[*rv]
                        .as_ref()
                        .is_some_and(|b| b.len() == batch * self.sizes[i + 1]) =>
                {
                    values[*rv].take()
                }
                _ => None,
            };
            let get = |v: usize| {
                values[v]
                    .as_deref()
                    .ok_or_else(|| Error::Exec(format!("value {v} was freed before its last use")))
            };
            let x = get(*src)?;
            let dense = vec![self.flops[i]; batch];
            let (out, flops) = match layer {
                Layer::Gemm {
                    weight,
                    bias,
                    groups,
                    geom,
                    residual,
                    act,
                    dropped,
                    winograd,
                    channel_panels,
                    rows_major,
                } => {
                    let wino = winograd.as_ref();
                    let r = match in_out {
                        Some(_) => None,
                        None => residual.map(get).transpose()?,
                    };
                    let ic_sets = kept[*src].as_ref().filter(|_| *groups == 1);
                    let gates = self.conv_gates(i, cuts);
                    let inputs = Inputs {
                        kept: ic_sets,
                        dropped: dropped.as_ref(),
                        means: means[*src].as_deref(),
                    };
                    // A gate of this pass reads this node's output: it sums its panels.
                    let rows = bias.len();
                    let plane = geom.out_hw[0] * geom.out_hw[1];
                    let panels = plane.div_ceil(NR);
                    let summed = std::sync::atomic::AtomicUsize::new(0);
                    let mut sums_buf = (self.summed_means
                        && cuts.is_some_and(|c| {
                            self.sum_readers[i]
                                .iter()
                                .any(|&j| !matches!(c[j].channels, Cut::All))
                        }))
                    .then(|| vec![0f32; batch * rows * panels]);
                    let sums = sums_buf.as_mut().map(|b| PanelSums {
                        at: OutPtr(b.as_mut_ptr()),
                        panels,
                        filled: &summed,
                    });
                    // With a depthwise layer as its only reader (and no spatial gate),
                    // that layer computes this node's output band by band, and this
                    // node's result stands in for that layer's.
                    let band = match (self.bands[i].as_ref(), self.layers.get(i + 1)) {
                        (
                            Some(b),
                            Some((
                                _,
                                Layer::Depthwise {
                                    weight: dw,
                                    bias: db,
                                    act: da,
                                    shift,
                                    ..
                                },
                            )),
                        ) if gates.tiles.is_none() => Some(BandPass {
                            bands: b,
                            weight,
                            bias,
                            act: *act,
                            inputs,
                            gate: gates.channels,
                            dw: bands::Depthwise {
                                weight: dw,
                                bias: db,
                                act: *da,
                            },
                            shift: shift.as_deref(),
                        }),
                        _ => None,
                    };
                    let ungated = ic_sets.is_none() && gates.is_open();
                    let by_rows = self.depthwise_next[i];
                    let result = if ungated && band.is_none() {
                        let out = match in_out {
                            Some(mut out) => {
                                self.conv_gemm_into(
                                    x,
                                    batch,
                                    weight,
                                    wino,
                                    bias,
                                    *groups,
                                    geom,
                                    Residual::InOut,
                                    *act,
                                    Subset {
                                        by_rows,
                                        sums,
                                        ..Subset::default()
                                    },
                                    &mut out,
                                );
                                out
                            }
                            None => self.conv_gemm(
                                x, batch, weight, wino, bias, *groups, geom, r, *act, by_rows, sums,
                            ),
                        };
                        (out, dense)
                    } else {
                        let c = match band {
                            Some(pass) => {
                                banded = true;
                                self.run_bands(x, batch, geom, pass, self.sizes[i + 2])
                            }
                            None => self.conv_compact(
                                x,
                                batch,
                                weight,
                                wino,
                                channel_panels.as_ref().map(transposed::ChannelPanels::get),
                                rows_major.as_deref(),
                                bias,
                                geom,
                                r,
                                in_out,
                                *act,
                                inputs,
                                gates,
                                sums,
                                by_rows,
                            ),
                        };
                        if gates.channels.is_some() {
                            kept[i + 1] = Some(c.oc.clone());
                            node_kept[i] = Some(c.oc);
                        }
                        if gates.tiles.is_some() {
                            node_tiles[i] = Some(c.tiles);
                        }
                        gate_flops
                            .iter_mut()
                            .zip(&c.gate_flops)
                            .for_each(|(a, b)| *a += b);
                        gate_ms = c.gate_ms;
                        (c.out, c.flops)
                    };
                    if let Some(b) = sums_buf
                        .filter(|_| summed.load(std::sync::atomic::Ordering::Acquire) == batch)
                    {
                        // Each plane's panel sums in order (see PanelSums).
                        let mut m = vec![0f32; batch * rows];
                        for (ms, bs) in m.chunks_exact_mut(rows).zip(b.chunks_exact(panels * rows))
                        {
                            for p in bs.chunks_exact(rows) {
                                ms.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
                            }
                            ms.iter_mut().for_each(|s| *s /= plane as f32);
                        }
                        means[i + 1] = Some(m);
                    }
                    result
                }
                Layer::Depthwise {
                    weight,
                    bias,
                    plan,
                    residual,
                    act,
                    shift,
                } => {
                    let r = residual.map(get).transpose()?;
                    match kept[*src].clone() {
                        Some(sets) => {
                            let (out, f) = self.depthwise_compact(
                                x,
                                batch,
                                weight,
                                bias,
                                plan,
                                r,
                                *act,
                                &sets,
                                shift.as_deref(),
                            );
                            node_kept[i] = Some(sets.clone());
                            kept[i + 1] = Some(sets);
                            (out, f)
                        }
                        None => {
                            // Every plane is written.
                            let mut out = self.pool.take_dirty(batch * self.sizes[i + 1]);
                            plan.run(&mut out, x, weight, bias, r, *act, bias.len(), None, None);
                            (out, dense)
                        }
                    }
                }
                Layer::Linear { weight, bias, act } => {
                    let fin = self.sizes[*src];
                    let fout = bias.len();
                    // Output rows four at a time ([`linear`]), every sample of the
                    // batch while their weights are in L1: the weights (a 1280 → 1000
                    // classifier's are 5 MB) are read once per batch rather than once
                    // per sample. Row by row through one 16-lane sum had made
                    // MobileNetV2's classifier 0.62 of the time it took sample by sample
                    // (batch 8). Four rows with fused multiply-adds against that, in
                    // process, pass by pass (40–60 pairs, 2 threads, the Intel Xeon
                    // machine): the classifier 0.57–0.58 of its time at batch 1 and 0.45–0.50
                    // at batch 8 (MobileNetV2, EfficientNet-Lite0 0.57 / 0.45, ResNet-18
                    // 0.65 / 0.54, ResNet-50 0.57 / 0.46); passes 0.974–0.989 at batch 1
                    // (MobileNetV2), 0.980 (Lite0), 0.990–0.992 (ResNets), 0.99–1.00 at
                    // batch 8.
                    let mut by_row = vec![0f32; fout * batch];
                    by_row
                        .par_chunks_mut(LINEAR_CHUNK_ROWS * batch)
                        .enumerate()
                        .for_each(|(c, o)| {
                            let m0 = c * LINEAR_CHUNK_ROWS;
                            let rows = m0..m0 + o.len() / batch;
                            linear::products(self.isa, weight, fin, x, batch, rows, o);
                            for (j, v) in o.iter_mut().enumerate() {
                                *v = act.apply(*v + bias[m0 + j / batch]);
                            }
                        });
                    let out: Vec<f32> = if batch == 1 {
                        by_row
                    } else {
                        (0..batch * fout)
                            .map(|i| by_row[(i % fout) * batch + i / fout])
                            .collect()
                    };
                    (out.into(), dense)
                }
                Layer::MaxPool(win) => {
                    let mut out = self.pool.take_dirty(batch * self.sizes[i + 1]);
                    ops::max_pool_into(&mut out, x, *win, batch);
                    (out, dense)
                }
                Layer::GlobalAvgPool => {
                    let plane = self.sizes[*src] / self.sizes[i + 1];
                    let out: Vec<f32> = x
                        .chunks_exact(plane)
                        .map(|p| sum(p) / plane as f32)
                        .collect();
                    (out.into(), dense)
                }
                Layer::AdaptiveAvgPool { in_hw, output } => {
                    (ops::adaptive_avg_pool(x, *in_hw, *output).into(), dense)
                }
            };
            values[i + 1] = Some(out);
            for (v, slot) in values.iter_mut().enumerate().take(i + 1) {
                if self.last_use[v] == i {
                    if let Some(buf) = slot.take() {
                        self.pool.give(buf);
                    }
                }
            }
            traces.push(LayerTrace {
                ms: start.elapsed().as_secs_f64() * 1e3,
                gate_ms,
                flops,
            });
        }
        let out = values[end]
            .take()
            .ok_or_else(|| Error::Exec("the model produced no output".into()))?;
        for buf in values.into_iter().flatten() {
            self.pool.give(buf);
        }
        Ok(Segment {
            out,
            kept: kept[end].take(),
            node_kept,
            node_tiles,
            traces,
            gate_flops,
        })
    }

    /// The gates of convolution `i` that `cuts` close.
    fn conv_gates(&self, i: usize, cuts: Option<&[NodeCut]>) -> ConvGates<'_> {
        let cut = cuts.map(|c| c[i]);
        ConvGates {
            channels: match (cut.map(|c| c.channels), &self.gates[i]) {
                (Some(c), Some(g)) if c != Cut::All => Some((g, c)),
                _ => None,
            },
            tiles: match (cut.map(|c| c.tiles), &self.spatial[i]) {
                (Some(c), Some(t)) if c != Cut::All => Some((t, c)),
                _ => None,
            },
        }
    }

    /// One gated convolution, sample by sample: each sample's gates decide (from its
    /// kept input channels `ic`, the value's kept sets) the output channels and the
    /// output tiles to compute, and [`Self::conv_gemm_into`] computes just those. Cells not
    /// computed are zero, or the residual where there is one (skipped tiles of a residual
    /// block pass the identity through). With `by_rows` (the output's reader splits its
    /// work by channel) a sample's tasks share out its kept rows before its positions.
    #[allow(clippy::too_many_arguments)]
    fn conv_compact(
        &self,
        x: &[f32],
        batch: usize,
        weight: &[f32],
        wino: Option<&WinogradWeights>,
        channel_panels: Option<&[f32]>,
        rows_major: Option<&[f32]>,
        bias: &[f32],
        geom: &ConvGeom,
        residual: Option<&[f32]>,
        in_out: Option<Buf>,
        act: Act,
        inputs: Inputs,
        gates: ConvGates,
        sums: Option<PanelSums>,
        by_rows: bool,
    ) -> Compact {
        let ic_sets = inputs.kept;
        let (cin, cout) = (geom.in_c, bias.len());
        let plane = geom.in_hw[0] * geom.in_hw[1];
        let n = geom.out_hw[0] * geom.out_hw[1];
        let taps = geom.kernel[0] * geom.kernel[1];
        // Enough samples to share out: one thread each.
        let serial = batch >= 2 * rayon::current_num_threads();
        // Every cell read later is written below; or the output is the residual's buffer,
        // whose cells the convolution adds to or leaves as they are.
        let (mut out, residual) = match in_out {
            Some(buf) => (buf, Residual::InOut),
            None => (self.pool.take_dirty(batch * cout * n), residual.into()),
        };
        let decide = |s: usize| -> Decided {
            let xs = &x[s * cin * plane..(s + 1) * cin * plane];
            let ic: Vec<usize> = ic_sets.map_or_else(|| (0..cin).collect(), |v| v[s].clone());
            let mut gf = 0u64;
            let decided = std::time::Instant::now();
            let oc: Vec<usize> = match gates.channels {
                Some((g, cut)) => {
                    let known = inputs.means.map(|m| &m[s * cin..(s + 1) * cin]);
                    let (oc, f) = self.decide_channels(xs, known, &ic, plane, cout, g, cut);
                    gf += f;
                    oc
                }
                None => (0..cout).collect(),
            };
            let (tiles, cols): (Vec<usize>, Option<Vec<usize>>) = match gates.tiles {
                Some((sg, cut)) => {
                    let t = sg.tiling;
                    let round = gating::tiles_per_panel(&t, NR);
                    let kept = match &sg.score {
                        gating::TileScore::Energy => {
                            let (scores, mean) = gating::tile_scores(xs, &ic, None, geom, &t);
                            gating::choose(&scores, cut, |p| gating::tile_bar(p, mean), round)
                        }
                        gating::TileScore::Trained { weight, bias } => {
                            let (mut scores, _) =
                                gating::tile_scores(xs, &ic, Some(weight), geom, &t);
                            scores.iter_mut().for_each(|s| *s += bias);
                            gating::choose(&scores, cut, gating::channel_bar, round)
                        }
                    };
                    gf += gating::tile_gate_flops(ic.len(), plane, t.tiles);
                    let cols =
                        (kept.len() < t.tiles).then(|| gating::tile_pixels(&t, &kept, geom.out_hw));
                    (kept, cols)
                }
                None => (Vec::new(), None),
            };
            let gate_ms = decided.elapsed().as_secs_f64() * 1e3;
            // Kept inputs written less their constant (see `depthwise_compact`) go
            // with the bias that adds every channel's constant back.
            let shifted = inputs.dropped.is_some() && ic.len() < cin;
            Decided {
                ic,
                oc,
                tiles,
                cols,
                shifted,
                gate_flops: gf,
                gate_ms,
            }
        };
        let bias_of = |shifted: bool| match inputs.dropped {
            Some(d) if shifted => &d.shifted_bias[..],
            _ => bias,
        };
        fn subset(d: &Decided, cout: usize, cin: usize, unread: bool, serial: bool) -> Subset<'_> {
            Subset {
                rows: (d.oc.len() < cout).then_some(&d.oc[..]),
                cols: d.cols.as_deref(),
                chans: (d.ic.len() < cin).then_some(&d.ic[..]),
                dropped_unread: unread,
                serial,
                by_rows: false,
                sums: None,
                rows_major: None,
            }
        }
        let unread = gates.channels.is_some();
        let per_sample = |d: Decided| -> SampleOut {
            let positions = d.cols.as_ref().map_or(n, Vec::len);
            let f = d.gate_flops + 2 * (positions * d.oc.len() * d.ic.len() * taps) as u64;
            (d.oc, d.tiles, f, d.gate_flops, d.gate_ms)
        };
        // A batch of samples with few positions each, each keeping some of the input
        // channels (known before the gates run) and no pixels dropped, runs together
        // (see BATCH_GATED_PANELS). A layer with Winograd weights runs its batch
        // together by Winograd when its plane is one panel of tiles (7 × 7: 16), which
        // one sample alone would not with dropped inputs (see `winograd_pays`): the
        // batch's samples share each block of U from L2, where alone each streams U from
        // memory for 16 tiles. In-process pairs at budget 0.5 against the direct batch
        // (2 threads, before mapped tiles ran in halves): the 7 × 7 3×3 layers of
        // ResNet-50's layer 4 took 0.41–0.54 of their time at batch 2, 4 and 8,
        // ResNet-18's 0.83–1.06; whole passes 0.96, 0.95 and 0.98 (ResNet-50), 0.99,
        // 0.97 and 0.98 (ResNet-18). So does a plan that keeps every input channel and
        // drops output rows (ResNet-18's `layer4.1.conv1`), which ran sample by sample by
        // Winograd: 0.73–0.82 of its time at batch 2, 4 and 8, passes 0.97–0.99.
        let (th, tw) = wino
            .map_or(Algorithm::F2, |w| w.algo)
            .tiles(geom.out_hw[0], geom.out_hw[1]);
        // A layer that keeps every output channel runs transposed where it has channel
        // panels (see `transposed`), each sample on its own, if there are panels enough
        // to share out: with two threads, MobileNetV2's 7 × 7 projections of 160
        // channels (5 panels) took 1.03–1.16× the direct way's time (in-process pairs at
        // budget 0.5, batch 1), its and EfficientNet-Lite0's of 320 (10 panels)
        // 0.79–0.96×.
        let transposing = channel_panels.filter(|_| {
            gates.channels.is_none()
                && gates.tiles.is_none()
                && (serial || cout.div_ceil(NR) >= 4 * rayon::current_num_threads())
        });
        let together = batch >= 2
            && transposing.is_none()
            && n.div_ceil(NR) <= self.batch_gated_panels
            && std::mem::size_of_val(weight) >= BATCH_GATED_BYTES
            && gates.tiles.is_none()
            && match wino {
                Some(_) => th * tw <= NR,
                // 1×1 layers only: see BATCH_GATED_BYTES.
                None => {
                    geom.kernel == [1, 1]
                        && ic_sets.is_some_and(|v| v.iter().all(|ic| ic.len() < cin))
                }
            };
        let per: Vec<SampleOut> = if together {
            let decided: Vec<Decided> = (0..batch).into_par_iter().map(decide).collect();
            let plans: Vec<SamplePlan> = decided
                .iter()
                .map(|d| {
                    let sub = subset(d, cout, cin, unread, serial);
                    SamplePlan {
                        rows: sub.rows,
                        chans: sub.chans,
                        bias: bias_of(d.shifted),
                        dropped_unread: sub.dropped_unread,
                    }
                })
                .collect();
            match wino {
                Some(wg) => {
                    self.conv_winograd_samples(x, wg, geom, act, &plans, residual, &mut out)
                }
                None => self.conv_gated_batch(x, weight, geom, act, &plans, residual, &mut out),
            }
            decided.into_iter().map(per_sample).collect()
        } else {
            // Samples in parallel (each sample's GEMM splits further): small layers of a
            // big batch keep both cores busy without waking the pool once per sample.
            // Each sample's gates decide just before its convolution, as before batches
            // ran together (deciding every sample first measured the same within the
            // noise: in-process pairs at batch 8 and budget 0.5, 0.93–1.02 of the time
            // on the four models).
            out.par_chunks_mut(cout * n)
                .enumerate()
                .map(|(s, os)| {
                    let d = decide(s);
                    let xs = &x[s * cin * plane..(s + 1) * cin * plane];
                    let rs = residual.sample(s, cout * n);
                    let b = bias_of(d.shifted);
                    // A plan that keeps some of the inputs: transposed.
                    if let Some(cp) = transposing.filter(|_| d.ic.len() < cin) {
                        let mut packed =
                            self.pool.take_dirty(transposed::packed_len(n, d.ic.len()));
                        // Sample s's panel sums, when the next layer's gate wants them.
                        let at = sums.map(|p| OutPtr(p.at.get().wrapping_add(s * cout * p.panels)));
                        let sum = |out: *const f32, chs: std::ops::Range<usize>| {
                            let Some(at) = at else { return };
                            for q in 0..n.div_ceil(NR) {
                                // SAFETY: the output's cells of channels `chs` are
                                // stored; panel q's sums of those rows lie inside the
                                // sample's `cout × panels` and no other task writes them.
                                unsafe {
                                    row_sums(
                                        self.isa,
                                        out.add(q * NR),
                                        n,
                                        NR.min(n - q * NR),
                                        &self.all_rows[chs.clone()],
                                        at.get().wrapping_add(q * cout),
                                    )
                                };
                            }
                        };
                        let job = transposed::Job {
                            isa: self.isa,
                            kc: self.kc,
                            x: xs,
                            n,
                            chans: &d.ic,
                            panels: cp,
                            cin,
                            bias: b,
                            residual: rs,
                            act,
                            index: &self.all_cols,
                            sums: Some(&sum),
                        };
                        transposed::run(&job, &mut packed, os, serial);
                        self.pool.give(packed);
                        if let Some(ps) = sums {
                            ps.filled.fetch_add(1, std::sync::atomic::Ordering::Release);
                        }
                        return per_sample(d);
                    }
                    // Sample s's sums, when the next layer's gate wants them.
                    let panels = sums.map_or(0, |p| p.panels);
                    let sums = sums.map(|p| PanelSums {
                        at: OutPtr(p.at.get().wrapping_add(s * cout * panels)),
                        ..p
                    });
                    self.conv_gemm_into(
                        xs,
                        1,
                        weight,
                        wino,
                        b,
                        1,
                        geom,
                        rs,
                        act,
                        Subset {
                            sums,
                            rows_major,
                            by_rows,
                            ..subset(&d, cout, cin, unread, serial)
                        },
                        os,
                    );
                    per_sample(d)
                })
                .collect()
        };
        let mut c = Compact {
            out,
            oc: Vec::with_capacity(batch),
            tiles: Vec::with_capacity(batch),
            flops: Vec::with_capacity(batch),
            gate_flops: Vec::with_capacity(batch),
            gate_ms: 0.0,
        };
        for (oc, tiles, f, gf, ms) in per {
            c.oc.push(oc);
            c.tiles.push(tiles);
            c.flops.push(f);
            c.gate_flops.push(gf);
            c.gate_ms += ms;
        }
        c
    }

    /// FLOPs per sample, gates aside, of a pass with these ratio cuts. Counts only depend
    /// on the ratios, so this is exactly what the pass executes; the budget planner
    /// searches it.
    fn planned_flops(&self, cuts: &[NodeCut]) -> u64 {
        let mut kept: Vec<Option<usize>> = vec![None; self.layers.len() + 1];
        let ratio = |c: Cut| match c {
            Cut::Ratio(r) => Some(r),
            _ => None,
        };
        let mut total = 0;
        for (i, (src, layer)) in self.layers.iter().enumerate() {
            total += match layer {
                Layer::Gemm {
                    bias,
                    groups: 1,
                    geom,
                    ..
                } => {
                    let cout = bias.len();
                    let ic = kept[*src].unwrap_or(geom.in_c);
                    let oc = match (ratio(cuts[i].channels), &self.gates[i]) {
                        (Some(r), Some(_)) => {
                            let k = gating::kept_count(cout, r, self.round);
                            kept[i + 1] = Some(k);
                            k
                        }
                        _ => cout,
                    };
                    let px = match (ratio(cuts[i].tiles), &self.spatial[i]) {
                        (Some(r), Some(sg)) => {
                            let t = sg.tiling;
                            let round = gating::tiles_per_panel(&t, NR);
                            gating::kept_count(t.tiles, r, round) * t.g * t.g
                        }
                        _ => geom.out_hw[0] * geom.out_hw[1],
                    };
                    2 * (oc * ic * geom.kernel[0] * geom.kernel[1] * px) as u64
                }
                Layer::Depthwise { plan, .. } if kept[*src].is_some() => {
                    kept[i + 1] = kept[*src];
                    let win = plan.win();
                    let taps = win.kernel[0] * win.kernel[1];
                    2 * (win.out_hw[0] * win.out_hw[1] * kept[*src].unwrap_or(0) * taps) as u64
                }
                _ => self.flops[i],
            };
        }
        total
    }

    /// Per-node cuts for a policy, or `None` for a dense pass.
    fn cuts(&self, policy: Policy) -> Result<Option<Vec<NodeCut>>> {
        policy.validate()?;
        let uniform =
            |channels: Cut, tiles: Cut| vec![NodeCut { channels, tiles }; self.layers.len()];
        let gates = match policy {
            Policy::Dense => return Ok(None),
            Policy::Keep(r) => Gates {
                channels: Cut::Ratio(r),
                tiles: Cut::All,
            },
            Policy::Gates(g) => g,
            Policy::Budget(b) => {
                let (budget, with_tiles) = match b {
                    Budget::Flops(f) => (f, false),
                    Budget::FlopsWithTiles(f) => (f, true),
                };
                let key = (budget.to_bits(), with_tiles, self.round, self.group);
                if let Some(cuts) = self.budget_plans.get(key) {
                    return Ok(cuts);
                }
                let cuts = self.plan_budget(budget, with_tiles)?;
                self.budget_plans.put(key, cuts.clone());
                return Ok(cuts);
            }
        };
        let keeps_all = |c: Cut| c == Cut::All || c == Cut::Ratio(1.0);
        if keeps_all(gates.channels) && keeps_all(gates.tiles) {
            return Ok(None);
        }
        Ok(Some(uniform(gates.channels, gates.tiles)))
    }

    /// The cuts that keep a pass within `budget` of the dense FLOPs (`None`: the dense
    /// pass does), one ratio for every gate, the largest that fits, then what it leaves
    /// spent by [`Self::fill_budget`].
    fn plan_budget(&self, budget: f64, with_tiles: bool) -> Result<Option<Vec<NodeCut>>> {
        let at = |r: f64| {
            let tiles = if with_tiles { Cut::Ratio(r) } else { Cut::All };
            vec![
                NodeCut {
                    channels: Cut::Ratio(r),
                    tiles
                };
                self.layers.len()
            ]
        };
        let dense: u64 = self.flops.iter().sum();
        let limit = (budget * dense as f64).floor() as u64;
        if self.planned_flops(&at(1.0)) <= limit {
            return Ok(None);
        }
        let least = self.planned_flops(&at(f64::MIN_POSITIVE));
        if least > limit {
            return Err(Error::Input(format!(
                "a budget of {budget} of the dense FLOPs is below the least these \
                 gates can execute on this model ({:.3})",
                least as f64 / dense as f64
            )));
        }
        // FLOPs grow with the ratio: bisect for the largest ratio within budget.
        let (mut lo, mut hi) = (f64::MIN_POSITIVE, 1.0);
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if self.planned_flops(&at(mid)) <= limit {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(Some(self.fill_budget(at(lo), limit)))
    }

    /// Spends what a uniform plan leaves of the budget: kept counts move in steps of the
    /// kernel's tile, so one ratio for every layer stops short of the limit. Repeatedly
    /// grows by one step the gate that keeps the smallest fraction, among those whose step
    /// still fits; a step that does not fit never will (FLOPs only grow), so each gate is
    /// dropped at its first miss.
    fn fill_budget(&self, mut cuts: Vec<NodeCut>, limit: u64) -> Vec<NodeCut> {
        // (node, tiles?, units, step)
        let mut open: Vec<(usize, bool, usize, usize)> = Vec::new();
        for (i, c) in cuts.iter().enumerate() {
            if let (Cut::Ratio(_), Some(_), Layer::Gemm { bias, .. }) =
                (c.channels, &self.gates[i], &self.layers[i].1)
            {
                open.push((i, false, bias.len(), self.round));
            }
            if let (Cut::Ratio(_), Some(sg)) = (c.tiles, &self.spatial[i]) {
                let t = sg.tiling;
                open.push((i, true, t.tiles, gating::tiles_per_panel(&t, NR)));
            }
        }
        let ratio = |c: &NodeCut, tiles: bool| match if tiles { c.tiles } else { c.channels } {
            Cut::Ratio(r) => r,
            _ => 1.0,
        };
        loop {
            let kept = |c: &NodeCut, &(_, tiles, units, step): &(usize, bool, usize, usize)| {
                gating::kept_count(units, ratio(c, tiles), step)
            };
            open.retain(|g| kept(&cuts[g.0], g) < g.2);
            open.sort_by(|a, b| {
                let fa = kept(&cuts[a.0], a) as f64 / a.2 as f64;
                let fb = kept(&cuts[b.0], b) as f64 / b.2 as f64;
                fa.total_cmp(&fb)
            });
            let mut grown = false;
            while let Some(&g) = open.first() {
                let next = kept(&cuts[g.0], &g) + g.3;
                // Just under next/units, so the rounding up lands on `next` exactly.
                let r = if next >= g.2 {
                    1.0
                } else {
                    next as f64 / g.2 as f64 - 1e-9
                };
                let mut trial = cuts.clone();
                if g.1 {
                    trial[g.0].tiles = Cut::Ratio(r);
                } else {
                    trial[g.0].channels = Cut::Ratio(r);
                }
                if self.planned_flops(&trial) <= limit {
                    cuts = trial;
                    grown = true;
                    break;
                }
                open.remove(0);
            }
            if !grown {
                return cuts;
            }
        }
    }

    /// A 1×1 expansion and the depthwise layer reading it, band by band ([`bands`]), for
    /// a pass's kept input channels and channel gate: the depthwise layer's output
    /// (`out_size` values per sample), and the expansion's kept channels and costs.
    fn run_bands(
        &self,
        x: &[f32],
        batch: usize,
        geom: &ConvGeom,
        pass: BandPass,
        out_size: usize,
    ) -> Compact {
        let (cin, cout) = (geom.in_c, pass.bias.len());
        let plane = geom.in_hw[0] * geom.in_hw[1];
        struct Decided {
            oc: Vec<usize>,
            ic: Vec<usize>,
            /// Packed weights of the kept input channels, when not all.
            a: Option<Buf>,
            gf: u64,
            ms: f64,
        }
        let decide = |s: usize| {
            let xs = &x[s * cin * plane..(s + 1) * cin * plane];
            let ic: Vec<usize> = pass
                .inputs
                .kept
                .map_or_else(|| (0..cin).collect(), |v| v[s].clone());
            let t = std::time::Instant::now();
            let (oc, gf) = match pass.gate {
                Some((g, cut)) => {
                    let known = pass.inputs.means.map(|m| &m[s * cin..(s + 1) * cin]);
                    self.decide_channels(xs, known, &ic, plane, cout, g, cut)
                }
                None => ((0..cout).collect(), 0),
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let a = (ic.len() < cin).then(|| {
                let mut a = self.pool.take_dirty(gemm::packed_a_len(cout, ic.len()));
                gemm::pack_a_channels(pass.weight, cin, &ic, 1, &mut a);
                a
            });
            Decided { oc, ic, a, gf, ms }
        };
        let decided: Vec<Decided> = if pass.gate.is_some() && batch > 1 {
            (0..batch).into_par_iter().map(decide).collect()
        } else {
            (0..batch).map(decide).collect()
        };
        let samples: Vec<bands::Sample> = decided
            .iter()
            .map(|d| {
                let dropped_inputs = d.ic.len() < cin;
                bands::Sample {
                    rows: &d.oc,
                    weight: d.a.as_deref().unwrap_or(pass.weight),
                    chans: dropped_inputs.then_some(&d.ic[..]),
                    bias: match pass.inputs.dropped {
                        Some(dc) if dropped_inputs => &dc.shifted_bias,
                        _ => pass.bias,
                    },
                    shift: pass.shift.filter(|_| d.oc.len() < cout),
                }
            })
            .collect();
        let mut out = self.pool.take_dirty(batch * out_size);
        let index = if self.all_cols.len() > self.all_rows.len() {
            &self.all_cols
        } else {
            &self.all_rows
        };
        pass.bands.run(
            self.isa, x, &samples, pass.act, pass.dw, &mut out, index, &self.pool,
        );
        drop(samples);
        let mut c = Compact {
            out,
            oc: Vec::with_capacity(batch),
            tiles: Vec::new(),
            flops: Vec::with_capacity(batch),
            gate_flops: Vec::with_capacity(batch),
            gate_ms: 0.0,
        };
        for d in decided {
            c.flops
                .push(d.gf + 2 * (plane * d.oc.len() * d.ic.len()) as u64);
            c.gate_flops.push(d.gf);
            c.gate_ms += d.ms;
            c.oc.push(d.oc);
            if let Some(a) = d.a {
                self.pool.give(a);
            }
        }
        c
    }

    /// A sample's kept output channels under its channel gate `g` cut at `cut`, from its
    /// input `xs` (planes of `plane` values) of which channels `ic` were kept, or from
    /// every channel's mean where `known` has them, and the gate's FLOPs.
    #[allow(clippy::too_many_arguments)]
    fn decide_channels(
        &self,
        xs: &[f32],
        known: Option<&[f32]>,
        ic: &[usize],
        plane: usize,
        cout: usize,
        g: &GateWeights,
        cut: Cut,
    ) -> (Vec<usize>, u64) {
        let cin = xs.len() / plane;
        // Mean of each kept input plane, zero for dropped ones (whose planes are never
        // written). Each plane is summed the same way on whichever thread, so the scores
        // do not depend on the split (see PAR_POOL_FLOATS).
        let mean = |c: usize| sum(&xs[c * plane..(c + 1) * plane]) / plane as f32;
        let mut pooled = vec![0f32; cin];
        if let Some(m) = known {
            for &c in ic {
                pooled[c] = m[c];
            }
        } else if ic.len() * plane >= PAR_POOL_FLOATS {
            let means: Vec<f32> = ic
                .par_iter()
                .with_min_len(ic.len().div_ceil(rayon::current_num_threads()))
                .map(|&c| mean(c))
                .collect();
            for (&c, m) in ic.iter().zip(means) {
                pooled[c] = m;
            }
        } else {
            for &c in ic {
                pooled[c] = mean(c);
            }
        }
        let scores = g.scores(&pooled);
        let flops = match g.rank() {
            // V reads every input (dropped ones are zero).
            Some(r) => gating::factored_gate_flops(ic.len(), plane, cin, cout, r),
            None => gating::gate_flops(ic.len(), plane, cout),
        };
        let oc = gating::choose_grouped(&scores, cut, gating::channel_bar, self.round, self.group);
        (oc, flops)
    }

    /// Depthwise convolution of each sample's kept channels only; the others are left
    /// unwritten (readers of a gated value skip them).
    #[allow(clippy::too_many_arguments)]
    fn depthwise_compact(
        &self,
        x: &[f32],
        batch: usize,
        weight: &[f32],
        bias: &[f32],
        plan: &depthwise::Plan,
        residual: Option<&[f32]>,
        act: Act,
        sets: &[Vec<usize>],
        shift: Option<&[f32]>,
    ) -> (Buf, Vec<u64>) {
        let win = plan.win();
        let c = bias.len();
        let op = win.out_hw[0] * win.out_hw[1];
        let taps = win.kernel[0] * win.kernel[1];
        let mut keep = vec![false; batch * c];
        for (s, set) in sets.iter().enumerate().take(batch) {
            set.iter().for_each(|&ch| keep[s * c + ch] = true);
        }
        // Samples that dropped channels write their kept planes less the constants
        // (gating::DroppedConstants); the readers' shifted bias adds them back.
        let shifts: Option<Vec<f32>> = shift.map(|k| {
            sets.iter()
                .take(batch)
                .flat_map(|set| {
                    let on = set.len() < c;
                    k.iter().map(move |&v| if on { v } else { 0.0 })
                })
                .collect()
        });
        // Kept planes are written; the others are never read.
        let mut out = self.pool.take_dirty(batch * c * op);
        plan.run(
            &mut out,
            x,
            weight,
            bias,
            residual,
            act,
            c,
            Some(&keep),
            shifts.as_deref(),
        );
        let flops = sets
            .iter()
            .take(batch)
            .map(|set| 2 * (op * set.len() * taps) as u64)
            .collect();
        (out, flops)
    }
}

/// Widest output row a 3×3 convolution runs by Winograd at ([`winograd_fits`]). At
/// 56 × 56 (64 → 64, K = 64) its GEMMs are short and its transformed values (16 × 3136
/// per channel) go to memory and back: a gated pair (64 → 64 → 64, in-process pairs on
/// the AVX2 machine, 2 threads) took 0.975 of the direct time dense but 1.10–1.30 with
/// 0.75 to 0.3 of the channels kept; at 28 × 28 0.72 dense and 0.75–0.85 at keep 0.75
/// and 0.5.
/// The rows a gated batch's samples do not compute (`len` output cells per sample):
/// left unwritten where nobody reads them, otherwise the residual passes through, or
/// zero.
/// The flat panels (see `conv_gemm_into`) that hold the kept outputs `cols` (ascending)
/// of a stride-1 layer `ow` wide over a padded input `pitch` wide: per panel, its index,
/// its kept lanes, and where its first kept output is in `cols`.
fn kept_flat_panels(cols: &[usize], ow: usize, pitch: usize) -> Vec<(usize, u32, usize)> {
    let mut panels: Vec<(usize, u32, usize)> = Vec::new();
    for (i, &c) in cols.iter().enumerate() {
        let q = (c / ow) * pitch + c % ow;
        let (p, lane) = (q / NR, 1u32 << (q % NR));
        match panels.last_mut() {
            Some((last, lanes, _)) if *last == p => *lanes |= lane,
            _ => panels.push((p, lane, i)),
        }
    }
    panels
}

/// Panel `p` of (sample, group) block `sg`, counted on past the block's last panel into
/// the blocks after it: the block and panel it is, if there is one.
fn panel_after(sg: usize, p: usize, panels: usize, blocks: usize) -> Option<(usize, usize)> {
    let (s, p) = (sg + p / panels.max(1), p % panels.max(1));
    (s < blocks && p < panels).then_some((s, p))
}

fn pass_dropped_rows(plans: &[SamplePlan], residual: Residual, len: usize, out: &mut [f32]) {
    for (s, plan) in plans.iter().enumerate() {
        if plan.rows.is_some() && !plan.dropped_unread {
            let at = s * len;
            residual.pass_through(&mut out[at..at + len], at);
        }
    }
}

/// Output positions up to which a 1×1 layer with a channel gate holds its weights row by
/// row as well (on AVX-512), for plans that keep some of its rows and every input
/// channel: over small planes its weights stream from memory, and kept rows spread over
/// the packed blocks read every block's lines, where rows stored one after another cost
/// only their own ([`gemm::accumulate_rows_major`]). One layer alone, one thread: 2048 →
/// 512 at 7 × 7 keeping 288 rows took 1.15 ms, a dense layer of 276 rows 0.72, the dense
/// one 1.37. Row by row against packed, in-process pairs at budget 0.5, batch 1:
/// ResNet-50's `layer4.1.conv1` and `layer4.2.conv1` (2048 → 512 at 7 × 7) 0.85–0.89 of
/// the time on one thread and 0.82–0.94 on two, `layer4.0.conv1` (1024 → 512 at 14 × 14)
/// 0.92–0.93, the `layer3` `conv1` layers (1024 → 256 at 14 × 14) 0.92–0.94 on one thread
/// and 0.91–0.95 on two; at batch 8 (two threads) 0.90–0.96. The memory: ResNet-50's
/// eight such layers hold 16 MB more.
const ROWS_MAJOR_MAX_POSITIONS: usize = 14 * 14;

/// Output positions up to which a stride-2 layer with a channel gate holds its weights row
/// by row as well, for the same reason: over a 7 × 7 output (two packed panels) its
/// weights stream from memory, and kept rows spread over the packed blocks read every
/// block's lines. ResNet-18's `layer4.0.conv1` (3×3, 256 → 512 from 14 × 14, K = 2304,
/// 4.7 MB more), in-process pairs against packed: at budget 0.5, batch 1, 0.68–0.70 of
/// the time on two threads and 0.75 on one, 0.91 at batch 8; at budget 0.25 0.68, at 0.75
/// 0.89; at keep ratios 0.3–0.8 0.89–0.95. Whole passes at batch 1 0.984–0.990 (two
/// threads), 0.995 (one). Over 14 × 14 too (ResNet-18's `layer3.0.conv1`, K = 1152, seven
/// panels, 1.2 MB more; ResNet-50's `layer3.0.conv2`, 2.4 MB): it had taken 0.77–0.85 of
/// the packed way's time at budget 0.5 but 1.03–1.10 at keep ratios 0.4–0.8; since the
/// kernel's later changes (in-process pairs, 2 threads, 60 at batch 1 and 12 at batch 8)
/// 0.76, 0.77 and 0.82 at budgets 0.5, 0.25 and 0.75, 0.77 and 0.86 at keep ratios 0.5
/// and 0.7, 0.86 at batch 8; ResNet-18's passes 0.984–0.990 and 1.000 at keep 0.7 (1.003
/// at batch 8), ResNet-50's 0.992.
const ROWS_MAJOR_MAX_STRIDED_POSITIONS: usize = 14 * 14;

/// Columns of A (input channels × taps) from which such a layer does. Short rows gained
/// nothing against the packed kernel's other means (its epilogue from the registers, its
/// column kernel): the 7 × 7 expansions of MobileNetV2 and EfficientNet-Lite0 (K = 160
/// and 192) took 1.04–1.18× the time, their 14 × 14 ones (K = 64–112) 0.91–1.12×.
const ROWS_MAJOR_MIN_K: usize = 512;

/// Whether a gated layer of this geometry holds its weights row by row as well (on
/// AVX-512): a 1×1, stride-1 layer over at most [`ROWS_MAJOR_MAX_POSITIONS`], or a
/// stride-2 one over at most [`ROWS_MAJOR_MAX_STRIDED_POSITIONS`], with at least
/// [`ROWS_MAJOR_MIN_K`] columns. Kept in step with the panels those layers get: packed
/// or read in place whole, never through offsets ([`gemm::accumulate_rows_major`]).
fn rows_major_fits(g: &ConvGeom) -> bool {
    let positions = g.out_hw[0] * g.out_hw[1];
    let one_by_one = g.kernel == [1, 1] && g.stride == [1, 1] && g.pad_tl == [0, 0];
    let strided = g.stride == [2, 2] && g.out_hw[1] < IMPLICIT_WIDTH;
    g.k() >= ROWS_MAJOR_MIN_K
        && ((one_by_one && positions <= ROWS_MAJOR_MAX_POSITIONS)
            || (strided && positions <= ROWS_MAJOR_MAX_STRIDED_POSITIONS))
}

/// Output panels per sample up to which a gated batch runs its samples' tiles together
/// ([`EngineExecutor::conv_gated_batch`]) rather than sample by sample: at 7×7 (two
/// panels) a sample's GEMM is short next to copying its kept columns out of the weights,
/// which running together does without. In-process pairs at batch 8, budget 0.5: the
/// ResNets' stride-1 3×3 layers of layer 4 took 0.74–0.95 of their time (they now run
/// together by Winograd instead: [`EngineExecutor::conv_winograd_samples`]).
const BATCH_GATED_PANELS: usize = 2;

/// What packing one panel of kept pixels costs, in output rows' worth of the micro-kernel's
/// multiply-adds: a spatial plan over a flat stride-1 layer (see `conv_gemm_into`) reads
/// its kept pixels in place, computing every lane of the flat panels that hold them,
/// where `panels · NR · m ≤ kept · (m + this)` for `m` computed rows (16 rows: where the
/// kept pixels fill at least 0.4 of those panels' lanes). Packing copies a panel's K
/// rows of 32 values in runs of a tile's width, roughly as much work as the multiply-adds
/// of 16 rows. The demo model (16–64 channels at 64×64 to 16×16), spatial gates keeping
/// a share of every layer's tiles, in-process pairs against packing every plan (30,
/// Intel Xeon, 2 threads), batch 8: at 24, keeping 0.75 of the tiles 0.85 of the time,
/// 0.5 0.92, 0.3 1.02. At 16: 0.75 0.79–0.90 (batch 1, 8, 100), 0.5 1.01–1.03; at 32,
/// 0.75 0.87–0.88, 0.5 0.94, 0.3 1.03–1.06; at 48, 0.3 1.01; at 200 (nearly always in
/// place) 0.3 1.06. A FLOP budget of 0.5: 0.98–1.01. Since kept lanes are stored in
/// runs (not one by one), at 24: 0.75 0.83 / 0.77 (batch 1 / 8), 0.5 0.91 / 0.875 (0.90
/// at batch 100), 0.3 1.02 / 0.99; the budget 1.01.
const KEPT_IN_PLACE_PACK_ROWS: usize = 24;

/// Packed weights (bytes) from which a gated batch of few positions per sample runs
/// together ([`BATCH_GATED_PANELS`]). Below it, MobileNetV2's and EfficientNet-Lite0's
/// 7×7 projections (1.2–1.5 MB, one column per kept channel) took 0.91–1.13 of their
/// time together and their passes 1.03–1.04 (in-process pairs, batch 8, budget 0.5);
/// ResNet-50's 1×1 layers of 4 MB 0.84–1.08. Only 1×1 layers (and Winograd's) run
/// together: ResNet-50's stride-2 3×3 layer of 9.4 MB (`layer4.0.conv2`) had taken
/// 0.74–0.95 of its time so when this was measured first; measured again on Zen 5, after
/// the sample-by-sample way's later changes, sample by sample took 0.69–0.71 of the time
/// together takes (in-process pairs, batch 8, budget 0.5; 0.76 at batch 2, 0.74 and 0.83
/// at budgets 0.75 and 0.25), passes 0.978–1.001.
const BATCH_GATED_BYTES: usize = 2 << 20;

/// Widest output row at which any plan runs by Winograd, and at which plans that keep
/// at least [`Tuning::winograd_wide_min_kept`] do whatever the CPU
/// ([`Tuning::winograd_wide_width`]).
const WINOGRAD_MAX_WIDTH: usize = 28;
const _: () = assert!(WINOGRAD_MAX_WIDTH <= winograd::MAX_WIDTH);

/// Whether a convolution runs by Winograd: one group, 3×3, stride 1, one
/// pixel of padding on every side (output as large as the input), rows at most `width`
/// wide: [`WINOGRAD_MAX_WIDTH`], or this CPU's [`Tuning::winograd_wide_width`] where
/// that is wider (for plans that keep most channel pairs, see `conv_gemm_into`).
fn winograd_fits(
    groups: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    pad_tl: [usize; 2],
    in_hw: [usize; 2],
    out_hw: [usize; 2],
    width: usize,
) -> bool {
    groups == 1
        && kernel == [3, 3]
        && stride == [1, 1]
        && pad_tl == [1, 1]
        && in_hw == out_hw
        && out_hw[1] <= width
}

/// Whether a plan runs faster by Winograd than directly: a dense one always; one with
/// dropped channels where its tiles fill more than one panel, or where it keeps every
/// input channel. With a single panel (7 × 7 outputs: 16 tiles) each transformed
/// weight serves at most [`NR`] tiles, the layer waits on weights, and Winograd reads
/// 16/9 as many of them, and with dropped input channels copies their columns first.
/// Chains of three 3×3 convolutions gated at keep 0.5 / 0.4 / 0.3 (the middle one on
/// both sides), in-process pairs on the AVX2 machine, 2 threads, Winograd against
/// direct: 128 channels at 28 × 28 0.75 / 0.82 / 0.91, 256 at 14 × 14 0.76 / 0.81 /
/// 0.89, 512 at 7 × 7 1.05 / 1.07 / 1.26 (dense 0.74–0.77). Since the transforms run in
/// whole vectors (`21dcca6`), a 7 × 7 plan that drops only output rows pays (AVX-512,
/// 2 threads, in-process pairs): ResNet-18's `layer4.1.conv1` at budget 0.5 took 0.60
/// of its time at batch 1 and 8, whole passes 0.971–0.975 at batch 1 (0.966 at budget
/// 0.75) and 0.953–0.959 at batch 8; ResNet-50's 7 × 7 3×3 layers drop input channels
/// and do not change (0.995–0.996). Those with dropped input channels still lose by
/// Winograd: ResNet-18's `layer4` `conv2` 1.26–1.39× at batch 1.
fn winograd_pays(w: &WinogradWeights, sub: &Subset, out_hw: [usize; 2]) -> bool {
    let (th, tw) = w.algo.tiles(out_hw[0], out_hw[1]);
    let dropped_inputs = sub.chans.is_some_and(|c| c.len() < w.cin);
    !dropped_inputs || th * tw > NR
}

/// How a plan runs by Winograd: `None`, directly; `Some(false)`, on its kept input
/// channels' columns of `U` (see [`winograd_pays`]); `Some(true)`, on every column, the
/// dropped input channels entering as planes of zeros.
///
/// A one-panel plane (7 × 7) that drops input channels runs directly rather than
/// copying its kept columns of `U` (see [`winograd_pays`]), but from half of the input
/// channels kept, Winograd over all of them, nothing copied, is faster still: per
/// output row it does 16 · 16 multiply-adds per input channel (16 tiles, one vector of
/// 16) where the direct convolution does 9 · 64 per kept one (49 positions in two
/// panels), 0.44 of it at every channel kept and as much at 0.44 of them. ResNet-18 at
/// batch 1, 2 threads, in-process pairs against the direct way: its `layer4` `conv2`
/// layers (every output row; 512 inputs, of which the gate before keeps some) took
/// 0.61–0.81 of their time with 384 inputs kept (budget 0.85), 0.77–0.78 with 360
/// (0.75), 0.87–0.89 with 288–300 (0.6), 1.12 with 192–204 (0.5). The same layers over
/// planes of more than one panel (14 × 14 and 28 × 28) lose by it: 1.05–1.49 of the
/// time their copy takes.
/// Executed FLOPs stay those of the kept convolution, as for every Winograd plan; the
/// multiply-adds by the zeros are not counted, as a panel's padding lanes are not (with
/// half the inputs kept this path multiplies 1.16× the counted FLOPs' worth, 16 · 16 ·
/// cin against 49 · 9 · cin / 2 per output row; with 0.58 of them, as many).
///
/// A plan that runs on the filters as lines (`on_lines`, see
/// [`WinogradWeights::lines_for`]) reads only its kept (row, channel) pairs' lines of
/// `U` and takes the first way whatever it drops. ResNet-18 at budget 0.5, batch 1,
/// against the ways above: its `layer4` `conv2` layers took 0.49–0.64 of their time,
/// `layer4.1.conv1` 0.72–0.80.
fn winograd_way(
    w: &WinogradWeights,
    sub: &Subset,
    out_hw: [usize; 2],
    on_lines: bool,
) -> Option<bool> {
    if on_lines || winograd_pays(w, sub, out_hw) {
        return Some(false);
    }
    let kept = sub.chans.map_or(w.cin, <[usize]>::len);
    (2 * kept >= w.cin).then_some(true)
}

/// Bands of at most `band_bytes` for node `i` when it is a 1×1, stride-1, unpadded
/// convolution without residual whose only reader is the depthwise layer after it
/// (without residual), and its output takes at least `band_min` of that layer's window
/// in bytes per sample; the depthwise planes in strips of `strip_bytes`.
fn band_pair(
    layers: &[(usize, Layer)],
    readers: &[usize],
    i: usize,
    band_min: fn(&Window) -> usize,
    band_bytes: usize,
    strip_bytes: usize,
) -> Option<Bands> {
    let Layer::Gemm {
        bias,
        groups: 1,
        geom,
        residual: None,
        ..
    } = &layers[i].1
    else {
        return None;
    };
    let Some((
        src,
        Layer::Depthwise {
            plan,
            residual: None,
            ..
        },
    )) = layers.get(i + 1)
    else {
        return None;
    };
    let pointwise = geom.kernel == [1, 1] && geom.stride == [1, 1] && geom.pad_tl == [0, 0];
    let bytes = bias.len() * geom.out_hw[0] * geom.out_hw[1] * std::mem::size_of::<f32>();
    (pointwise && *src == i + 1 && readers[i + 1] == 1 && bytes >= band_min(&plan.win()))
        .then(|| Bands::holding(bias.len(), geom.in_c, plan.win(), band_bytes, strip_bytes))
}

/// The planes of `x` (`in_hw` each) in planes of `out_hw`, placed at `pad_tl` with zeros
/// around, followed by [`NR`] zeros of slack: a shifted-window panel of the last row
/// reads up to `NR - 1` values beyond its row (lanes the store ignores). With `chans`,
/// only those planes (the ones a sparse plan reads) are written; the others hold
/// whatever the buffer held.
fn pad_planes(
    pool: &BufferPool,
    x: &[f32],
    in_hw: [usize; 2],
    pad_tl: [usize; 2],
    out_hw: [usize; 2],
    chans: Option<&[usize]>,
) -> Buf {
    let (in_plane, out_plane) = (in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]);
    let planes = x.len() / in_plane;
    let mut out = pool.take_dirty(planes * out_plane + NR);
    out[planes * out_plane..].fill(0.0);
    let rows = in_hw[0].min(out_hw[0].saturating_sub(pad_tl[0]));
    let cols = in_hw[1].min(out_hw[1].saturating_sub(pad_tl[1]));
    let [top, left] = pad_tl;
    let ow = out_hw[1];
    let pad =
        |o: &mut [f32], i: &[f32]| ops::pad_plane(o, i, in_hw[1], [top, left], [rows, cols], ow);
    out[..planes * out_plane]
        .par_chunks_exact_mut(out_plane)
        .zip(x.par_chunks_exact(in_plane))
        .zip(read_planes(planes, chans).par_iter())
        .filter(|(_, &k)| k)
        .for_each(|((o, i), _)| pad(o, i));
    out
}

/// Per plane of `planes`: whether a plan reads it (`chans`; every plane without a list).
fn read_planes(planes: usize, chans: Option<&[usize]>) -> Vec<bool> {
    match chans {
        None => vec![true; planes],
        Some(c) => {
            let mut keep = vec![false; planes];
            c.iter().for_each(|&c| keep[c] = true);
            keep
        }
    }
}

/// Copies `src` (whole planes of `plane` values) into `dst` and returns each plane's
/// mean, summed as [`sum`] sums (the same blocks in the same order: the same bits), so
/// a gate decides on them as on means it took itself. Planes are shared out between the
/// threads. The gate reading a network's input then reads no plane again: MobileNetV2's
/// first gate took 12.6 µs of the 159 its gates took per pass, and 3.6 µs of 145 since
/// (batch 1, budget 0.5, medians of 55 passes).
fn copy_pooled(src: &[f32], dst: &mut [f32], plane: usize) -> Vec<f32> {
    let plane = plane.max(1);
    dst.par_chunks_mut(plane)
        .zip(src.par_chunks(plane))
        .map(|(d, s)| {
            let mut total = 0f32;
            for (x, y) in s.chunks(NR).zip(d.chunks_mut(NR)) {
                y.copy_from_slice(x);
                total += block_sum(x);
            }
            total / plane as f32
        })
        .collect()
}

/// A plane's sum as the gates take it: its blocks of [`NR`] values ([`block_sum`]) added
/// in order. A convolution sums its output's panels as it stores them ([`PanelSums`])
/// and gets these bits.
fn sum(a: &[f32]) -> f32 {
    // The CPU is asked once per plane, not once per block.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { sum_avx512(a) };
    }
    a.chunks(NR).fold(0.0, |s, b| s + block_sum_portable(b))
}

/// [`sum`] with AVX-512F, each block's sum inlined.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(a: &[f32]) -> f32 {
    a.chunks(NR).fold(0.0, |s, b| s + block_sum_avx512(b))
}

/// The sum of at most [`NR`] values: lane `j` of sixteen adds value `j` and value
/// `j + 16` (from zero), then the lanes add in halves (8, 4, 2, 1), a fixed tree that
/// vectorizes.
#[inline]
fn block_sum(b: &[f32]) -> f32 {
    debug_assert!(b.len() <= NR);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { block_sum_avx512(b) };
    }
    block_sum_portable(b)
}

/// For each row `r` of `rows`, `sums[r]` = [`block_sum`] of the `w` (at most [`NR`])
/// values at `cells + r · ld`.
///
/// # Safety
/// Those values are readable and those sums writable; `isa` is available.
unsafe fn row_sums(
    isa: Isa,
    cells: *const f32,
    ld: usize,
    w: usize,
    rows: &[usize],
    sums: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return row_sums_avx512(cells, ld, w, rows, sums);
    }
    let _ = isa;
    for &r in rows {
        *sums.add(r) = block_sum_portable(std::slice::from_raw_parts(cells.add(r * ld), w));
    }
}

/// [`row_sums`] with AVX-512F, sixteen rows at a time: each level of [`block_sum`]'s
/// tree adds the same lanes of every row, with two rows' halves shuffled into one
/// vector, so sixteen rows take 30 shuffles where one tree per row took 64. The same
/// additions in the same order: the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_sums_avx512(cells: *const f32, ld: usize, w: usize, rows: &[usize], sums: *mut f32) {
    use std::arch::x86_64::*;
    let mask = |m: usize| ((1u32 << m.min(16)) - 1) as __mmask16;
    let (lo, hi) = (mask(w), mask(w.saturating_sub(16)));
    let zero = _mm512_setzero_ps();
    for chunk in rows.chunks(16) {
        // Lane j of row i: value j plus value j + 16 (from zero), as in block_sum.
        let mut v = [zero; 16];
        for (x, &r) in v.iter_mut().zip(chunk) {
            let p = cells.add(r * ld);
            let a = _mm512_add_ps(zero, _mm512_maskz_loadu_ps(lo, p));
            *x = _mm512_add_ps(a, _mm512_maskz_loadu_ps(hi, p.wrapping_add(16)));
        }
        // Lanes j and j + 8: rows 2i and 2i + 1 in halves of one vector.
        let c: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        });
        // Then j + 4: rows 4i .. 4i + 3 in the four 128-bit lanes.
        let e: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (c[2 * i], c[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        // Then j + 2: in 128-bit lane k, rows 8i + k and 8i + 4 + k, two values each.
        let g: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (e[2 * i], e[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        });
        // Then j + 1: value 4k + q is row 4q + k's sum.
        let t = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(g[0], g[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(g[0], g[1]),
        );
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), t);
        for (i, &r) in chunk.iter().enumerate() {
            *sums.add(r) = out[(i % 4) * 4 + i / 4];
        }
    }
}

/// [`block_sum`] one lane at a time.
fn block_sum_portable(b: &[f32]) -> f32 {
    let mut l = [0f32; 16];
    let (lo, hi) = b.split_at(b.len().min(16));
    for (x, &v) in l.iter_mut().zip(lo) {
        *x += v;
    }
    for (x, &v) in l.iter_mut().zip(hi) {
        *x += v;
    }
    for half in [8, 4, 2, 1] {
        for j in 0..half {
            l[j] += l[j + half];
        }
    }
    l[0]
}

/// [`block_sum`] in one vector: the same additions in the same order, so the same bits.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block_sum_avx512(b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = b.len();
    let mask = |m: usize| ((1u32 << m.min(16)) - 1) as __mmask16;
    let lo = _mm512_maskz_loadu_ps(mask(n), b.as_ptr());
    let hi = _mm512_maskz_loadu_ps(mask(n.saturating_sub(16)), b.as_ptr().wrapping_add(16));
    let l = _mm512_add_ps(_mm512_add_ps(_mm512_setzero_ps(), lo), hi);
    // Lanes j and j + 8, then j + 4, j + 2, j + 1 (lane 0 ends with the sum).
    let l = _mm512_add_ps(l, _mm512_shuffle_f32x4::<0b11_10_11_10>(l, l));
    let l = _mm512_add_ps(l, _mm512_shuffle_f32x4::<0b01_01_01_01>(l, l));
    let l = _mm512_add_ps(l, _mm512_permute_ps::<0b11_10_11_10>(l));
    let l = _mm512_add_ps(l, _mm512_permute_ps::<0b01_01_01_01>(l));
    _mm512_cvtss_f32(l)
}

impl Executor for EngineExecutor {
    fn name(&self) -> &'static str {
        self.isa.engine_name()
    }

    fn forward(&self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        Ok(self.run(input, batch, None)?.logits)
    }

    /// On the pool or on one thread, by the pass's kind's recent times on each
    /// ([`super::thread_choice`]); on the pool, with its other workers kept awake for the
    /// pass (the `workers` module). In-process pairs against sleeping workers (40–60 per
    /// model, 2 threads, AVX2; medians of the pair ratios): at batch 1 MobileNetV2
    /// 0.973–0.979, EfficientNet-Lite0 0.976–0.993, ResNet-50 0.981, ResNet-18 0.977; at
    /// budget 0.5 0.950–0.981, 0.941, 0.966–0.969; MobileNetV2 at batch 8 0.945, and 0.967
    /// without a pool of its own.
    fn forward_with(&self, input: &[f32], batch: usize, policy: Policy) -> Result<Forward> {
        let Some(choice) = self
            .thread_choice
            .as_ref()
            .filter(|_| rayon::current_num_threads() > 1)
        else {
            return super::workers::with_workers_awake(self.linger, || {
                self.pass(input, batch, policy)
            });
        };
        let key = pass_kind(batch, policy);
        let way = choice.choose(key);
        let start = std::time::Instant::now();
        let out = self.pass_on(way, input, batch, policy);
        if out.is_ok() {
            choice.record(key, way, start.elapsed().as_secs_f64() * 1e3);
        }
        out
    }
}

/// A number naming a kind of pass for [`ThreadChoice`]: its batch size and policy.
fn pass_kind(batch: usize, policy: Policy) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    batch.hash(&mut h);
    // Policies hold floats; their printed form tells them apart.
    format!("{policy:?}").hash(&mut h);
    h.finish()
}

impl EngineExecutor {
    /// A pass run `way`: on the calling pool with its workers kept awake, or on a pool
    /// of one thread (on the pool, where that thread cannot be started).
    fn pass_on(&self, way: Way, input: &[f32], batch: usize, policy: Policy) -> Result<Forward> {
        let one = match way {
            Way::One => self
                .one_thread
                .get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(1).build().ok())
                .as_ref(),
            Way::Pool => None,
        };
        match one {
            Some(pool) => {
                // Workers lingering after a pass on the pool would take a core from this one.
                super::workers::stop_lingering();
                pool.install(|| self.pass(input, batch, policy))
            }
            None => {
                super::workers::with_workers_awake(self.linger, || self.pass(input, batch, policy))
            }
        }
    }

    /// [`Executor::forward_with`] on the calling thread.
    fn pass(&self, input: &[f32], batch: usize, policy: Policy) -> Result<Forward> {
        match self.cuts(policy)? {
            // Gates that keep every channel drop nothing: the dense pass, reported as such.
            None if policy != Policy::Dense => {
                let mut f = self.run(input, batch, None)?;
                f.flops = Some(vec![self.flops.iter().sum(); batch]);
                f.gate_flops = Some(vec![0; batch]);
                Ok(f)
            }
            None => self.run(input, batch, None),
            Some(cuts) => self.run(input, batch, Some(&cuts)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cpu::fresh_rng;
    use crate::exec::plan::Tiling;
    use rand::seq::index::sample;
    use rand::Rng;

    /// An engine with no layers, for driving its per-sample kernels directly.
    fn bare(isa: Isa) -> EngineExecutor {
        EngineExecutor {
            layers: Vec::new(),
            sizes: Vec::new(),
            last_use: Vec::new(),
            classes: 0,
            isa,
            all_rows: (0..256).collect(),
            all_cols: (0..4096).collect(),
            pool: BufferPool::default(),
            gates: Vec::new(),
            spatial: Vec::new(),
            round: isa.mr(),
            group: 1,
            flops: Vec::new(),
            a_resident: A_RESIDENT_BYTES,
            local_a: LOCAL_A_BYTES,
            pack_misaligned: PACK_MISALIGNED_FROM,
            pack_misaligned_avx512: PACK_MISALIGNED_FROM,
            kc: KC,
            sub_batch: usize::MAX,
            whole_batch: WHOLE_BATCH_FLOATS,
            bands: Vec::new(),
            depthwise_next: Vec::new(),
            batch_gated_panels: BATCH_GATED_PANELS,
            kept_in_place: Some(KEPT_IN_PLACE_PACK_ROWS),
            panel_prefetch: true,
            winograd_bands: true,
            gated_pool: BufferPool::default(),
            budget_plans: BudgetPlans::default(),
            input_gates: Vec::new(),
            input_plane: 1,
            sum_readers: Vec::new(),
            linger: std::time::Duration::ZERO,
            summed_means: true,
            thread_choice: None,
            one_thread: OnceLock::new(),
        }
    }

    /// A pass moved to one thread by the thread choice computes what the pool does:
    /// the same logits and costs, dense and gated, one sample and several.
    #[test]
    fn passes_on_one_thread_equal_passes_on_the_pool() {
        use crate::synthetic::{conv_chain, ConvSpec};
        let conv = |cout, k, stride, depthwise| ConvSpec {
            cout,
            k,
            stride,
            depthwise,
        };
        let model = conv_chain(
            8,
            32,
            &[
                conv(24, 3, 2, false),
                conv(48, 1, 1, false),
                conv(48, 3, 1, true),
                conv(32, 1, 1, false),
                conv(32, 3, 1, false),
            ],
        )
        .unwrap();
        let e = EngineExecutor::new(&model).unwrap();
        let pool = two_threads();
        for batch in [1, 3] {
            let input: Vec<f32> = (0..batch * 8 * 32 * 32)
                .map(|i| ((i * 37) % 101) as f32 * 0.02 - 1.0)
                .collect();
            for policy in [Policy::Dense, Policy::Keep(0.5)] {
                let [on_pool, on_one] = [Way::Pool, Way::One]
                    .map(|way| pool.install(|| e.pass_on(way, &input, batch, policy).unwrap()));
                assert_eq!(on_pool.logits, on_one.logits, "{policy:?} batch {batch}");
                assert_eq!(on_pool.flops, on_one.flops);
                assert!(on_pool.logits.iter().any(|&v| v != 0.0));
            }
        }
        // The one thread really is one: a pass there sees a pool of one.
        let one = e.one_thread.get().and_then(Option::as_ref).unwrap();
        assert_eq!(one.install(rayon::current_num_threads), 1);
    }

    #[test]
    fn expansions_run_in_bands_equal_them_run_layer_by_layer() {
        use crate::exec::{Cut, Gates};
        use crate::synthetic::{conv_chain, pseudo_random, ConvSpec};
        let mut rng = fresh_rng();
        let conv = |cout, k, stride, depthwise| ConvSpec {
            cout,
            k,
            stride,
            depthwise,
        };
        for round in 0..6 {
            let (cin, hw) = (rng.random_range(2..8), rng.random_range(8..20));
            let (e1, e2) = (rng.random_range(8..40), rng.random_range(8..40));
            let (k1, k2) = ([3, 5][round % 2], [5, 3][round % 2]);
            let (s1, s2) = (rng.random_range(1..=2), rng.random_range(1..=2));
            // Expansion, depthwise, projection (its output gated into the next expansion);
            // or a depthwise layer read by the next expansion, which then adds back the
            // constants of the channels dropped before it (`DroppedConstants`).
            let specs = if round % 3 == 2 {
                vec![
                    conv(e1, 1, 1, false),
                    conv(e1, k1, s1, true),
                    conv(e2, 1, 1, false),
                    conv(e2, k2, s2, true),
                    conv(cin, 1, 1, false),
                ]
            } else {
                vec![
                    conv(e1, 1, 1, false),
                    conv(e1, k1, s1, true),
                    conv(cin + 3, 1, 1, false),
                    conv(e2, 1, 1, false),
                    conv(e2, k2, s2, true),
                    conv(cin, 1, 1, false),
                ]
            };
            let second = specs.len() - 3;
            let model = conv_chain(cin, hw, &specs).unwrap();
            // Kept counts unrounded, so that small layers are cut too.
            let layered =
                EngineExecutor::build(&model, Isa::detect(), Tuning::detect(), |_| usize::MAX, 0)
                    .unwrap()
                    .with_channel_round(1);
            let bytes = rng.random_range(1..4 * hw) * 4 * e1.max(e2) * hw / 3;
            let banded =
                EngineExecutor::build(&model, Isa::detect(), Tuning::detect(), |_| 0, bytes)
                    .unwrap()
                    .with_channel_round(1);
            assert!(layered.bands.iter().all(Option::is_none));
            assert_eq!(banded.bands.iter().flatten().count(), 2);
            let batch = rng.random_range(1..4);
            let x: Vec<f32> = pseudo_random(batch * cin * hw * hw, rng.random())
                .iter()
                .map(|v| v - 0.5)
                .collect();
            let channels = |c| Gates {
                channels: c,
                tiles: Cut::All,
            };
            for policy in [
                Policy::Dense,
                Policy::Keep(0.5),
                Policy::Keep(0.2),
                Policy::Gates(channels(Cut::Threshold(0.5))),
                Policy::Budget(Budget::Flops(0.6)),
            ] {
                let a = layered.forward_with(&x, batch, policy).unwrap();
                let b = banded.forward_with(&x, batch, policy).unwrap();
                assert_eq!(a.logits.len(), batch * model.desc.classes.len());
                for (p, q) in a.logits.iter().zip(&b.logits) {
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                        "{policy:?}: {p} vs {q}"
                    );
                }
                assert_eq!(a.flops, b.flops, "{policy:?}");
                assert_eq!(a.gate_flops, b.gate_flops, "{policy:?}");
                assert_eq!(a.kept, b.kept, "{policy:?}");
                let flops =
                    |f: &Forward| f.layers.iter().map(|l| l.flops.clone()).collect::<Vec<_>>();
                assert_eq!(flops(&a), flops(&b), "{policy:?}");
                if matches!(policy, Policy::Keep(_)) {
                    // The ratio cuts cut both expansions (a threshold or a budget may
                    // keep every channel of one of them, depending on the draw).
                    for node in [0, second] {
                        let kept = a.kept[node].as_ref().expect("a gated node");
                        assert!(
                            kept.iter().any(|k| k.len() < specs[node].cout),
                            "{policy:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_batch_run_in_parts_equals_the_batch_run_whole() {
        use crate::exec::{Cut, Gates};
        use crate::synthetic::{conv_chain, pseudo_random, ConvSpec};
        let conv = |cout, k, stride, depthwise| ConvSpec {
            cout,
            k,
            stride,
            depthwise,
        };
        let specs = [
            conv(16, 3, 1, false),
            conv(16, 3, 2, true),
            conv(24, 1, 1, false),
            conv(24, 3, 1, false),
        ];
        let model = conv_chain(8, 16, &specs).unwrap();
        let whole = EngineExecutor::new(&model).unwrap();
        let mut parts = EngineExecutor::new(&model).unwrap();
        parts.sub_batch = 2;
        parts.whole_batch = 0;
        let batch = 5;
        // In parts up to the depthwise layer's output (16 × 8 × 8 values per sample), then
        // the whole batch.
        let mut hybrid = EngineExecutor::new(&model).unwrap();
        hybrid.sub_batch = 2;
        hybrid.whole_batch = 24 * 8 * 8 * batch;
        assert_eq!(hybrid.whole_from(batch), Some(2));
        assert_eq!(parts.whole_from(batch), None);
        let x: Vec<f32> = pseudo_random(batch * 8 * 16 * 16, 11)
            .iter()
            .map(|v| v - 0.5)
            .collect();
        let gated = Gates {
            channels: Cut::Ratio(0.5),
            tiles: Cut::Ratio(0.5),
        };
        for policy in [Policy::Dense, Policy::Keep(0.5), Policy::Gates(gated)] {
            let a = whole.forward_with(&x, batch, policy).unwrap();
            for b in [
                parts.forward_with(&x, batch, policy).unwrap(),
                hybrid.forward_with(&x, batch, policy).unwrap(),
            ] {
                assert_eq!(a.logits.len(), batch * model.desc.classes.len());
                for (p, q) in a.logits.iter().zip(&b.logits) {
                    assert!(
                        (p - q).abs() <= 1e-6 * (1.0 + p.abs()),
                        "{policy:?}: {p} vs {q}"
                    );
                }
                assert_eq!(a.logits.len(), b.logits.len());
                assert_eq!(a.flops, b.flops, "{policy:?}");
                assert_eq!(a.gate_flops, b.gate_flops, "{policy:?}");
                assert_eq!(a.kept, b.kept, "{policy:?}");
                assert_eq!(a.tiles, b.tiles, "{policy:?}");
                let flops =
                    |f: &Forward| f.layers.iter().map(|l| l.flops.clone()).collect::<Vec<_>>();
                assert_eq!(flops(&a), flops(&b), "{policy:?}");
            }
            if policy != Policy::Dense {
                // The gates did cut: every sample ran fewer FLOPs than the dense pass.
                let dense: u64 = whole.flops.iter().sum();
                assert!(a.flops.unwrap().iter().all(|&f| f < dense), "{policy:?}");
            }
        }
    }

    use super::super::test_isas as isas;

    /// Sorted distinct indices below `n`: all of them about a third of the time, else a
    /// random non-empty subset.
    fn subset(rng: &mut impl Rng, n: usize) -> Vec<usize> {
        if rng.random_bool(0.3) {
            return (0..n).collect();
        }
        let k = rng.random_range(1..=n);
        let mut v = sample(rng, n, k).into_vec();
        v.sort_unstable();
        v
    }

    fn act(rng: &mut impl Rng) -> Act {
        [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)]
    }

    /// The geometry of a convolution with this padding on each side, or `None` where the
    /// padded input is smaller than the kernel.
    fn conv_geom(
        in_c: usize,
        in_hw: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        pad_tl: [usize; 2],
        pad_br: [usize; 2],
    ) -> Option<ConvGeom> {
        let (ph, pw) = (
            in_hw[0] + pad_tl[0] + pad_br[0],
            in_hw[1] + pad_tl[1] + pad_br[1],
        );
        (ph >= kernel[0] && pw >= kernel[1]).then(|| ConvGeom {
            in_c,
            in_hw,
            out_hw: [
                (ph - kernel[0]) / stride[0] + 1,
                (pw - kernel[1]) / stride[1] + 1,
            ],
            kernel,
            stride,
            pad_tl,
        })
    }

    /// The planned convolution by definition: for kept output channels at kept pixels, the
    /// window sum over kept input channels (zero outside the image) plus bias and
    /// residual, activated; every other cell the residual, or zero.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv(
        xs: &[f32],
        w: &[f32],
        b: &[f32],
        g: &ConvGeom,
        rs: Option<&[f32]>,
        act: Act,
        (ic, oc, cols): (&[usize], &[usize], Option<&[usize]>),
    ) -> Vec<f32> {
        let (cin, cout) = (g.in_c, b.len());
        let [h, wd] = g.in_hw;
        let [oh, ow] = g.out_hw;
        let [kh, kw] = g.kernel;
        let n = oh * ow;
        let mut out: Vec<f32> = rs.map_or_else(|| vec![0.0; cout * n], <[f32]>::to_vec);
        let cols: Vec<usize> = cols.map_or_else(|| (0..n).collect(), <[usize]>::to_vec);
        for &o in oc {
            for &p in &cols {
                let (oy, ox) = (p / ow, p % ow);
                let mut acc = f64::from(b[o]);
                for &c in ic {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * g.stride[0] + ky) as isize - g.pad_tl[0] as isize;
                            let ix = (ox * g.stride[1] + kx) as isize - g.pad_tl[1] as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                let xv = xs[c * h * wd + iy as usize * wd + ix as usize];
                                let wv = w[((o * cin + c) * kh + ky) * kw + kx];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                }
                let r = rs.map_or(0.0, |r| f64::from(r[o * n + p]));
                out[o * n + p] = act.apply((acc + r) as f32);
            }
        }
        out
    }

    /// A plan that keeps no input channel has no K: its kept rows are bias and residual,
    /// activated, whether its panels are packed up front or by each task (serial, with
    /// every A treated as too big for L2: groups of packed panels), and its weights
    /// copied for all tasks or by each. Gates keep at least one channel, so no pass
    /// plans this today; the engine must still not fail on it.
    #[test]
    fn a_plan_without_input_channels_stores_bias_and_residual() {
        let mut rng = fresh_rng();
        // 3×3 stride 2 over 13 × 11: 7 × 6 = 42 outputs, two packed panels.
        let g = conv_geom(5, [13, 11], [3, 3], [2, 2], [1, 1], [1, 1]).expect("geometry");
        let (cout, n) = (20, g.out_hw[0] * g.out_hw[1]);
        let xs = uniform(&mut rng, g.in_c * 13 * 11);
        let w = uniform(&mut rng, cout * g.k());
        let b = uniform(&mut rng, cout);
        let rs = uniform(&mut rng, cout * n);
        let oc: Vec<usize> = (0..cout).step_by(3).collect();
        let want = naive_conv(&xs, &w, &b, &g, Some(&rs), Act::Relu, (&[], &oc, None));
        let packed = gemm::pack_a(&w, cout, g.k());
        for isa in isas() {
            for serial in [false, true] {
                let mut e = bare(isa);
                e.a_resident = 0;
                e.local_a = 0;
                let sub = Subset {
                    rows: Some(&oc),
                    chans: Some(&[]),
                    serial,
                    ..Subset::default()
                };
                let mut got = vec![f32::NAN; cout * n];
                e.conv_gemm_into(
                    &xs,
                    1,
                    &packed,
                    None,
                    &b,
                    1,
                    &g,
                    Residual::Apart(&rs),
                    Act::Relu,
                    sub,
                    &mut got,
                );
                for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - w).abs() <= 1e-6,
                        "{isa:?} serial {serial} cell {i}: {a} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_budget_planned_once_cuts_as_planned_afresh() {
        use crate::synthetic::{conv_chain, pseudo_random, ConvSpec};
        let conv = |cout, k, depthwise| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise,
        };
        let specs = [conv(40, 3, false), conv(36, 1, false), conv(30, 3, false)];
        let model = conv_chain(8, 8, &specs).unwrap();
        let x: Vec<f32> = pseudo_random(2 * 8 * 8 * 8, 5);
        let dense: u64 = model.flops_per_sample();
        for round in [1, 4] {
            let e = EngineExecutor::new(&model)
                .unwrap()
                .with_channel_round(round);
            for (f, tiles) in [(0.6, false), (0.45, false), (0.6, true), (0.6, false)] {
                let b = if tiles {
                    Budget::FlopsWithTiles(f)
                } else {
                    Budget::Flops(f)
                };
                let fresh = e.plan_budget(f, tiles).unwrap();
                assert!(fresh.is_some(), "{b:?} cuts nothing");
                for _ in 0..2 {
                    assert_eq!(e.cuts(Policy::Budget(b)).unwrap(), fresh, "round {round}");
                }
                let fwd = e.forward_with(&x, 2, Policy::Budget(b)).unwrap();
                let gates: u64 = fwd.gate_flops.as_ref().unwrap()[0];
                let flops = fwd.flops.as_ref().unwrap()[0] - gates;
                assert!(
                    flops as f64 <= f * dense as f64,
                    "{b:?}: {flops} of {dense}"
                );
            }
            // Budgets below the least are refused every time, and not remembered.
            for _ in 0..2 {
                assert!(e.cuts(Policy::Budget(Budget::Flops(0.01))).is_err());
            }
            let plans = e.budget_plans.0.lock().unwrap();
            assert_eq!(plans.len(), 3, "round {round}");
        }
    }

    /// The phase split of a stride-2 layer's padded input against the padded planes
    /// built value by value: few planes (split in bands of rows) and many, odd and even
    /// pads and widths, every plane or some, on the pool and serially.
    #[test]
    fn padded_planes_split_into_column_phases_hold_every_value_in_its_place() {
        use crate::synthetic::{conv_chain, ConvSpec};
        let mut rng = fresh_rng();
        let model = conv_chain(
            3,
            8,
            &[ConvSpec {
                cout: 4,
                k: 3,
                stride: 1,
                depthwise: false,
            }],
        )
        .unwrap();
        let e = EngineExecutor::new(&model).unwrap();
        for round in 0..200 {
            let planes = if round % 2 == 0 {
                rng.random_range(1..5)
            } else {
                rng.random_range(5..40)
            };
            let in_hw = [rng.random_range(1..40), rng.random_range(1..40)];
            let pad_tl = [rng.random_range(0..4), rng.random_range(0..4)];
            // Padded sizes that cut into the input, too (past the top and left pads, as
            // a layer's windows always reach).
            let out_hw = [
                rng.random_range(pad_tl[0] + 1..in_hw[0] + 2 * pad_tl[0] + 2),
                rng.random_range(pad_tl[1] + 1..in_hw[1] + 2 * pad_tl[1] + 2),
            ];
            let x: Vec<f32> = (0..planes * in_hw[0] * in_hw[1])
                .map(|_| rng.random_range(0.5..1.5))
                .collect();
            let chans: Option<Vec<usize>> = rng
                .random_bool(0.5)
                .then(|| (0..planes).filter(|_| rng.random_bool(0.6)).collect());
            let serial = rng.random_bool(0.25);
            let got = e.pad_split_planes(&x, in_hw, pad_tl, out_hw, chans.as_deref(), serial);
            let [ph, pw] = out_hw;
            let half = pw.div_ceil(2);
            let out_plane = 2 * ph * half;
            assert_eq!(got.len(), planes * out_plane + NR);
            assert!(got[planes * out_plane..].iter().all(|&v| v == 0.0));
            let padded = |p: usize, y: usize, c: usize| -> f32 {
                match (y.checked_sub(pad_tl[0]), c.checked_sub(pad_tl[1])) {
                    (Some(iy), Some(ix)) if iy < in_hw[0] && ix < in_hw[1] && c < pw => {
                        x[(p * in_hw[0] + iy) * in_hw[1] + ix]
                    }
                    _ => 0.0,
                }
            };
            let read = read_planes(planes, chans.as_deref());
            for p in (0..planes).filter(|&p| read[p]) {
                for phase in 0..2 {
                    for y in 0..ph {
                        for j in 0..half {
                            let at = p * out_plane + (phase * ph + y) * half + j;
                            let want = padded(p, y, 2 * j + phase);
                            assert_eq!(
                                got[at], want,
                                "plane {p} of {planes}, phase {phase}, row {y}, column {j}: \
                                 {in_hw:?} padded by {pad_tl:?} to {out_hw:?}, serial {serial}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn planes_copied_and_pooled_are_summed_as_sum_sums() {
        let mut rng = fresh_rng();
        for _ in 0..20 {
            let plane = rng.random_range(1..300);
            let planes = rng.random_range(1..9);
            let src: Vec<f32> = (0..plane * planes)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let mut dst = vec![f32::NAN; src.len()];
            let means = copy_pooled(&src, &mut dst, plane);
            assert_eq!(dst, src);
            assert_eq!(means.len(), planes);
            for (c, m) in means.iter().enumerate() {
                let want = sum(&src[c * plane..(c + 1) * plane]) / plane as f32;
                assert_eq!(m.to_bits(), want.to_bits(), "plane {plane}, channel {c}");
            }
        }
    }

    #[test]
    fn a_gate_on_the_input_decides_on_the_means_taken_while_copying() {
        use crate::synthetic::{conv_chain, ConvSpec};
        let mut rng = fresh_rng();
        let conv = |cout, k| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise: false,
        };
        let (cin, batch) = (3, 4);
        let mut differ = false;
        for _ in 0..6 {
            let hw = rng.random_range(4..20);
            let model = conv_chain(cin, hw, &[conv(24, 3), conv(16, 1)]).unwrap();
            let e = EngineExecutor::new(&model).unwrap().with_channel_round(1);
            assert_eq!(e.input_gates, vec![0]);
            let plane = hw * hw;
            // Each sample's channels with their own offsets, so that the means decide.
            let x: Vec<f32> = (0..batch * cin * plane)
                .map(|i| rng.random_range(-1.0..1.0) + ((i / plane) % 5) as f32 * 0.3)
                .collect();
            let cut = Cut::Ratio(0.5);
            let fwd = e.forward_with(&x, batch, Policy::Keep(0.5)).unwrap();
            let gate = gating::channel_gates(&model).unwrap()[0].clone().unwrap();
            let g = GateWeights::new(&gate);
            let kept = fwd.kept[0]
                .as_ref()
                .expect("the first convolution is gated");
            for (s, got) in kept.iter().enumerate() {
                let pooled: Vec<f32> = (0..cin)
                    .map(|c| {
                        let at = (s * cin + c) * plane;
                        sum(&x[at..at + plane]) / plane as f32
                    })
                    .collect();
                let want =
                    gating::choose_grouped(&g.scores(&pooled), cut, gating::channel_bar, 1, 1);
                assert_eq!(got, &want, "sample {s}, {hw}×{hw}");
                differ |= got != &kept[0];
            }
        }
        assert!(differ, "every sample kept the same channels");
    }

    /// Every way of summing a block gives the same bits: the vector one, the lane-by-lane
    /// one and the plane sum over blocks, whatever the length (signed zeros included).
    #[test]
    fn a_block_sums_to_the_same_bits_every_way() {
        let mut rng = fresh_rng();
        for _ in 0..2000 {
            let n = rng.random_range(0..=NR);
            let b: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..8) {
                    0 => -0.0,
                    1 => 0.0,
                    _ => rng.random_range(-1e3f32..1e3) * 10f32.powi(rng.random_range(-6..6)),
                })
                .collect();
            let want = block_sum_portable(&b);
            assert_eq!(block_sum(&b).to_bits(), want.to_bits(), "{b:?}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F is present.
                let v = unsafe { block_sum_avx512(&b) };
                assert_eq!(v.to_bits(), want.to_bits(), "{b:?}");
            }
            assert_eq!(sum(&b).to_bits(), (0.0 + want).to_bits());
        }
    }

    /// Rows summed together give each row's block sum, bit for bit, whatever the row
    /// count, width and order.
    #[test]
    fn rows_summed_together_are_each_rows_block_sum() {
        let mut rng = fresh_rng();
        for _ in 0..300 {
            let (n_rows, w) = (rng.random_range(0..40), rng.random_range(0..=NR));
            let ld = w + rng.random_range(0..5);
            let cells: Vec<f32> = (0..n_rows * ld + NR)
                .map(|_| match rng.random_range(0..6) {
                    0 => -0.0,
                    _ => rng.random_range(-1e3f32..1e3) * 10f32.powi(rng.random_range(-6..6)),
                })
                .collect();
            let mut rows: Vec<usize> = (0..n_rows).filter(|_| rng.random_bool(0.8)).collect();
            if rng.random_bool(0.5) {
                rows.reverse();
            }
            for isa in isas() {
                let mut got = vec![f32::NAN; n_rows];
                // SAFETY: every row's w values and its sum are in bounds.
                unsafe { row_sums(isa, cells.as_ptr(), ld, w, &rows, got.as_mut_ptr()) };
                for &r in &rows {
                    let want = block_sum_portable(&cells[r * ld..r * ld + w]);
                    assert_eq!(
                        got[r].to_bits(),
                        want.to_bits(),
                        "{isa:?} row {r} of {n_rows}, w {w}"
                    );
                }
            }
        }
    }

    /// A convolution asked for its panels' sums leaves, for every row it computes, sums
    /// whose fold is the mean [`sum`] takes of the row's plane, bit for bit: dense or
    /// with kept rows and input channels, 1×1 read in place or packed, k×k by im2col,
    /// with a residual, over batches, on one and two threads.
    #[test]
    fn summed_panels_give_the_means_a_gate_takes_of_the_output() {
        let mut rng = fresh_rng();
        let pools: Vec<rayon::ThreadPool> = [1, 2]
            .iter()
            .map(|&t| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
            })
            .collect();
        for case in 0..60 {
            let kernel = [1, 1, 3][case % 3];
            let p = kernel / 2;
            // 3×3 layers packed by im2col: narrower than IMPLICIT_WIDTH, and than the
            // rows AVX2 sweeps flat (FLAT_AVX2_WIDTHS).
            let hw = [rng.random_range(1..20), rng.random_range(1..14)];
            let in_c = rng.random_range(1..80);
            let g = conv_geom(in_c, hw, [kernel; 2], [1, 1], [p, p], [p, p]).unwrap();
            let n = g.out_hw[0] * g.out_hw[1];
            let cout = rng.random_range(1..60);
            let batch = rng.random_range(1..=3);
            let xs = uniform(&mut rng, batch * in_c * hw[0] * hw[1]);
            let w = uniform(&mut rng, cout * g.k());
            let b = uniform(&mut rng, cout);
            let packed = gemm::pack_a(&w, cout, g.k());
            let res = uniform(&mut rng, batch * cout * n);
            let rows: Vec<usize> = (0..cout).filter(|_| rng.random_bool(0.6)).collect();
            let chans: Vec<usize> = (0..in_c).filter(|_| rng.random_bool(0.7)).collect();
            let gated = batch == 1 && rng.random_bool(0.5) && !rows.is_empty();
            let isas = isas();
            let mut e = bare(isas[rng.random_range(0..isas.len())]);
            e.kc = [KC, usize::MAX, 29][case / 3 % 3];
            let panels = n.div_ceil(NR);
            let mut got = vec![f32::NAN; batch * panels * cout];
            let mut out = vec![0f32; batch * cout * n];
            let filled = std::sync::atomic::AtomicUsize::new(0);
            let sums = PanelSums {
                at: OutPtr(got.as_mut_ptr()),
                panels,
                filled: &filled,
            };
            let sub = Subset {
                rows: gated.then_some(&rows[..]),
                chans: (gated && !chans.is_empty()).then_some(&chans[..]),
                sums: Some(sums),
                ..Subset::default()
            };
            let residual = if rng.random_bool(0.5) {
                Residual::Apart(&res)
            } else {
                Residual::None
            };
            pools[case % 2].install(|| {
                e.conv_gemm_into(
                    &xs,
                    batch,
                    &packed,
                    None,
                    &b,
                    1,
                    &g,
                    residual,
                    Act::Relu,
                    sub,
                    &mut out,
                )
            });
            assert_eq!(filled.into_inner(), batch, "case {case}: no sums");
            let computed = if gated {
                rows.clone()
            } else {
                (0..cout).collect()
            };
            for s in 0..batch {
                for &r in &computed {
                    let plane = &out[(s * cout + r) * n..(s * cout + r + 1) * n];
                    let folded = (0..panels)
                        .fold(0f32, |acc, p| acc + got[(s * panels + p) * cout + r])
                        / n as f32;
                    let want = sum(plane) / n as f32;
                    assert_eq!(
                        folded.to_bits(),
                        want.to_bits(),
                        "case {case}: {kernel}×{kernel} {hw:?}, sample {s} row {r}"
                    );
                }
            }
        }
    }

    /// Gated passes decide alike whether convolutions sum their output for the gates or
    /// the gates pool it themselves: the same logits, kept channels and FLOPs, at batch 1
    /// and 3, on one and two threads.
    #[test]
    fn passes_with_summed_means_equal_passes_that_pool() {
        use crate::exec::{Budget, Executor, Policy};
        use crate::synthetic::{conv_chain, ConvSpec};
        let conv = |cout, k, depthwise| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise,
        };
        // An inverted residual stack: 1×1 layers whose outputs gates read, a depthwise
        // layer between, and a 3×3 layer (packed by im2col at 12 wide).
        let model = conv_chain(
            24,
            12,
            &[
                conv(96, 1, false),
                conv(96, 3, true),
                conv(32, 1, false),
                conv(64, 1, false),
                conv(48, 3, false),
                conv(40, 1, false),
            ],
        )
        .unwrap();
        let summed = EngineExecutor::new(&model).unwrap();
        let pooled = EngineExecutor::new(&model).unwrap().without_summed_means();
        let mut rng = fresh_rng();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for batch in [1, 3] {
                let input = uniform(&mut rng, batch * 24 * 12 * 12);
                for f in [0.3, 0.5, 0.8] {
                    let policy = Policy::Budget(Budget::Flops(f));
                    let (a, b) = pool.install(|| {
                        (
                            summed.forward_with(&input, batch, policy).unwrap(),
                            pooled.forward_with(&input, batch, policy).unwrap(),
                        )
                    });
                    assert_eq!(a.logits, b.logits, "budget {f}, batch {batch}");
                    assert_eq!(a.kept, b.kept, "budget {f}, batch {batch}");
                    assert_eq!(a.flops, b.flops, "budget {f}, batch {batch}");
                }
            }
        }
    }

    #[test]
    fn gate_means_summed_by_every_thread_decide_as_on_one() {
        use crate::exec::Cut;
        let mut rng = fresh_rng();
        let pool = two_threads();
        let e = bare(Isa::Portable);
        let mut shared = 0;
        for _ in 0..12 {
            let plane = rng.random_range(1..=64) * rng.random_range(1..=64);
            let cin = PAR_POOL_FLOATS.div_ceil(plane) * 3 / 2 + rng.random_range(2..24);
            let cout = rng.random_range(1..40);
            // Most inputs kept: enough values to be summed by both threads.
            let ic: Vec<usize> = (0..cin).filter(|_| rng.random_bool(0.9)).collect();
            let rand = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let xs = rand(&mut rng, cin * plane);
            let gate = gating::ChannelGate {
                weight: rand(&mut rng, cout * cin),
                bias: rand(&mut rng, cout),
                factors: None,
            };
            let g = GateWeights::new(&gate);
            let cut = Cut::Ratio(rng.random_range(0.2..0.8));
            let (got, _) = pool.install(|| e.decide_channels(&xs, None, &ic, plane, cout, &g, cut));
            // The means summed plane by plane on this thread, dropped inputs zero.
            let mut pooled = vec![0f32; cin];
            for &c in &ic {
                pooled[c] = sum(&xs[c * plane..(c + 1) * plane]) / plane as f32;
            }
            let want =
                gating::choose_grouped(&g.scores(&pooled), cut, gating::channel_bar, e.round, 1);
            shared += usize::from(ic.len() * plane >= PAR_POOL_FLOATS);
            assert_eq!(got, want, "plane {plane}, {} of {cin} inputs", ic.len());
        }
        assert!(
            shared >= 10,
            "only {shared} of 12 cases summed by both threads"
        );
    }

    #[test]
    fn planned_convolutions_match_a_naive_reference() {
        let mut rng = fresh_rng();
        // Each kernel, also with every A treated as too big for L2 (panels in groups), and
        // with kept pixels always packed or, wherever the layer allows, read in place;
        // K in blocks of KC, whole, and in short blocks with a remainder (`kc`).
        let engines: Vec<EngineExecutor> = isas()
            .into_iter()
            .flat_map(|isa| {
                [
                    bare(isa),
                    {
                        let mut e = bare(isa);
                        e.a_resident = 0;
                        e.local_a = 0;
                        e.pack_misaligned = 0;
                        e.pack_misaligned_avx512 = 0;
                        e.kept_in_place = None;
                        e.kc = usize::MAX;
                        e
                    },
                    {
                        let mut e = bare(isa);
                        e.kept_in_place = Some(usize::MAX);
                        e.kc = 37;
                        e
                    },
                ]
            })
            .collect();
        for case in 0..300 {
            // A quarter of the cases in the shape Winograd serves (3×3, stride 1, pad 1).
            let wino_shape = rng.random_bool(0.25);
            let kernel = match rng.random_range(0..5) {
                _ if wino_shape => [3, 3],
                0 => [1, 1],
                1 => [3, 3],
                2 => [5, 5],
                3 => [7, 7],
                _ => [rng.random_range(1..=7), rng.random_range(1..=7)],
            };
            let stride = match wino_shape {
                true => [1, 1],
                false => [rng.random_range(1..=2), rng.random_range(1..=2)],
            };
            // A third of the cases wide enough for the in-place (shifted-window) path, at
            // either column stride.
            // Up to the widest rows any tuning runs by Winograd (plans that keep most
            // channel pairs only, past WINOGRAD_MAX_WIDTH).
            let widest = Tuning::INTEL.winograd_wide_width.max(WINOGRAD_MAX_WIDTH);
            let width = if wino_shape {
                rng.random_range(1..=widest)
            } else if rng.random_bool(0.35) {
                let w = stride[1] * IMPLICIT_WIDTH;
                rng.random_range(w..w + 40)
            } else {
                rng.random_range(1..24)
            };
            let in_hw = [rng.random_range(1..24), width];
            let mut pad_tl = [
                rng.random_range(0..kernel[0]),
                rng.random_range(0..kernel[1]),
            ];
            let mut pad_br = [
                rng.random_range(0..kernel[0]),
                rng.random_range(0..kernel[1]),
            ];
            if wino_shape {
                (pad_tl, pad_br) = ([1, 1], [1, 1]);
            }
            let in_c = rng.random_range(1..20);
            let Some(g) = conv_geom(in_c, in_hw, kernel, stride, pad_tl, pad_br) else {
                continue;
            };
            let cout = rng.random_range(1..40);
            let n = g.out_hw[0] * g.out_hw[1];
            let plane = in_hw[0] * in_hw[1];
            let xs = uniform(&mut rng, g.in_c * plane);
            let w = uniform(&mut rng, cout * g.k());
            let b = uniform(&mut rng, cout);
            let rs: Option<Vec<f32>> = rng
                .random_bool(0.4)
                .then(|| (0..cout * n).map(|_| rng.random_range(-1.0..1.0)).collect());
            let act = act(&mut rng);
            let ic = subset(&mut rng, g.in_c);
            let oc = subset(&mut rng, cout);
            // Pixels: all, a random subset, or whole tiles as the spatial gate keeps them.
            let cols: Option<Vec<usize>> = match rng.random_range(0..3) {
                0 => None,
                1 => Some(subset(&mut rng, n)),
                _ => {
                    let t = Tiling::with_edge(g.out_hw[0], g.out_hw[1], rng.random_range(1..5));
                    let kept = subset(&mut rng, t.tiles);
                    Some(gating::tile_pixels(&t, &kept, g.out_hw))
                }
            };
            let sub = Subset {
                rows: (oc.len() < cout).then_some(&oc[..]),
                cols: cols.as_deref(),
                chans: (ic.len() < g.in_c).then_some(&ic[..]),
                dropped_unread: rng.random_bool(0.5),
                serial: rng.random_bool(0.5),
                by_rows: rng.random_bool(0.5),
                sums: None,
                // The weights row by row, as a 1×1 layer with a channel gate holds them.
                rows_major: rng.random_bool(0.5).then_some(&w[..]),
            };
            let plan = (&ic[..], &oc[..], cols.as_deref());
            let mut want = naive_conv(&xs, &w, &b, &g, rs.as_deref(), act, plan);
            // A residual apart, or already in the output.
            let in_out = rs.is_some() && rng.random_bool(0.5);
            if sub.dropped_unread {
                // Dropped rows are left as they were: NaN here, NaN there (or the
                // residual the output held).
                for o in (0..cout).filter(|o| oc.binary_search(o).is_err()) {
                    let was = &mut want[o * n..(o + 1) * n];
                    match rs.as_deref().filter(|_| in_out) {
                        Some(r) => was.copy_from_slice(&r[o * n..(o + 1) * n]),
                        None => was.fill(f32::NAN),
                    }
                }
            }
            let packed = gemm::pack_a(&w, cout, g.k());
            let wino =
                winograd_fits(1, kernel, stride, pad_tl, in_hw, g.out_hw, widest).then(|| {
                    // Either algorithm, as a tuning may choose at any width.
                    let algo = [Algorithm::F2, Algorithm::F4][usize::from(rng.random_bool(0.5))];
                    WinogradWeights::new(&w, cout, g.in_c, algo)
                });
            assert!(
                wino.is_some() || !wino_shape,
                "{g:?} should run by Winograd"
            );
            // Each engine directly, and by Winograd where the shape allows (which a
            // plan with kept pixels still runs directly).
            let runs = engines.iter().map(|e| (e, None)).chain(
                wino.iter()
                    .flat_map(|w| engines.iter().map(move |e| (e, Some(w)))),
            );
            for (e, wino) in runs {
                let (mut got, residual) = match &rs {
                    Some(r) if in_out => (r.clone(), Residual::InOut),
                    r => (vec![f32::NAN; cout * n], r.as_deref().into()),
                };
                e.conv_gemm_into(
                    &xs, 1, &packed, wino, &b, 1, &g, residual, act, sub, &mut got,
                );
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.is_nan(), b.is_nan(), "cell {i}: {a} vs {b}");
                }
                let (got, want): (Vec<f32>, Vec<f32>) = got
                    .iter()
                    .zip(&want)
                    .filter(|(_, b)| !b.is_nan())
                    .map(|(a, b)| (*a, *b))
                    .unzip();
                let (err, scale) = max_error(&got, &want);
                assert!(
                    err <= 1e-5 * scale * (g.k() as f32).sqrt().max(1.0),
                    "case {case} {:?} winograd {}: {g:?} cout {cout} ic {} oc {} cols {:?}: error {err}",
                    e.isa,
                    wino.is_some(),
                    ic.len(),
                    oc.len(),
                    cols.as_ref().map(Vec::len)
                );
            }
        }
    }

    /// The Intel tuning builds Winograd weights for a 56-wide 3×3 layer (run by dense plans
    /// and by gated ones that keep most channel pairs: Keep(0.6) and budget 0.75 here)
    /// and sends a dense one-sample 7 × 7 plan to the filters as lines; the default
    /// builds none for the first and keeps the packed filters for the second; Zen 5's
    /// builds them for the first by F(4×4, 3×3) (run by dense plans and gated ones
    /// keeping at least 0.25 of the pairs) and keeps the packed filters for the second.
    /// All compute the same model as the reference executor, dense and gated.
    #[test]
    fn either_tuning_computes_what_the_reference_does() {
        use crate::exec::cpu::ReferenceExecutor;
        use crate::synthetic::{conv_chain, pseudo_random, ConvSpec};
        let mut rng = fresh_rng();
        let conv = |cout, stride| ConvSpec {
            cout,
            k: 3,
            stride,
            depthwise: false,
        };
        // 56 → 28 → 14 → 7, then a stride-1 layer over 7 × 7.
        let specs = [
            conv(16, 1),
            conv(16, 2),
            conv(24, 2),
            conv(32, 2),
            conv(32, 1),
        ];
        let model = conv_chain(8, 56, &specs).unwrap();
        let isa = Isa::detect();
        let intel = EngineExecutor::with_tuning(&model, isa, Tuning::INTEL).unwrap();
        let zen5 = EngineExecutor::with_tuning(&model, isa, Tuning::ZEN5).unwrap();
        let zen4 = EngineExecutor::with_tuning(&model, isa, Tuning::ZEN4).unwrap();
        let default = EngineExecutor::with_tuning(&model, isa, Tuning::DEFAULT).unwrap();
        let wino = |e: &EngineExecutor, node: usize| match &e.layers[node].1 {
            Layer::Gemm { winograd, .. } => winograd.as_ref().map(|w| w as *const _),
            _ => panic!("node {node} is a convolution"),
        };
        assert!(wino(&intel, 0).is_some() && wino(&default, 0).is_none());
        assert!(wino(&zen5, 0).is_some() && wino(&zen4, 0).is_some());
        let algo = |e: &EngineExecutor, node: usize| match &e.layers[node].1 {
            Layer::Gemm {
                winograd: Some(w), ..
            } => w.algo,
            _ => panic!("node {node} runs by Winograd"),
        };
        assert_eq!(algo(&intel, 0), Algorithm::F2);
        assert_eq!(algo(&zen5, 0), Algorithm::F4);
        assert_eq!(algo(&zen5, 4), Algorithm::F2);
        assert_eq!(algo(&zen4, 0), Algorithm::F4);
        assert_eq!(algo(&zen4, 4), Algorithm::F2);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            let lines = |e: &EngineExecutor| match &e.layers[4].1 {
                Layer::Gemm {
                    winograd: Some(w), ..
                } => w.lines_for(isa, 1, [7, 7], None, None).is_some(),
                _ => panic!("the 7 × 7 layer runs by Winograd"),
            };
            assert!(lines(&intel) && !lines(&default) && !lines(&zen5) && !lines(&zen4));
        }
        let reference = ReferenceExecutor::new(&model).unwrap();
        for batch in [1, 2] {
            let x: Vec<f32> = pseudo_random(batch * 8 * 56 * 56, rng.random())
                .iter()
                .map(|v| v - 0.5)
                .collect();
            let want = reference.forward(&x, batch).unwrap();
            for policy in [
                Policy::Dense,
                Policy::Keep(0.6),
                Policy::Budget(Budget::Flops(0.75)),
            ] {
                let b = default.forward_with(&x, batch, policy).unwrap();
                for tuned in [&intel, &zen5, &zen4] {
                    let a = tuned.forward_with(&x, batch, policy).unwrap();
                    assert_eq!(a.kept, b.kept, "{policy:?}");
                    assert_eq!(a.flops, b.flops, "{policy:?}");
                    for (p, q) in a.logits.iter().zip(&b.logits) {
                        assert!(
                            (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                            "{policy:?}: {p} vs {q}"
                        );
                    }
                    if policy == Policy::Dense {
                        for (p, q) in a.logits.iter().zip(&want) {
                            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "dense: {p} vs {q}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_small_plane_with_most_inputs_kept_runs_by_winograd_over_zeroed_inputs() {
        let mut rng = fresh_rng();
        for case in 0..24 {
            // Planes of one panel of tiles (at most 8 × 8), most input channels kept.
            let hw = [rng.random_range(5..=8), rng.random_range(5..=8)];
            let (cin, cout) = (rng.random_range(8..40), rng.random_range(1..40));
            let g = conv_geom(cin, hw, [3, 3], [1, 1], [1, 1], [1, 1]).unwrap();
            let n = hw[0] * hw[1];
            let kept = rng.random_range(cin.div_ceil(2)..cin);
            let mut ic = sample(&mut rng, cin, kept).into_vec();
            ic.sort_unstable();
            let oc = subset(&mut rng, cout);
            let xs = uniform(&mut rng, cin * n);
            let w = uniform(&mut rng, cout * cin * 9);
            let b = uniform(&mut rng, cout);
            let act = act(&mut rng);
            let wino = WinogradWeights::new(&w, cout, cin, Algorithm::F2);
            let sub = Subset {
                rows: (oc.len() < cout).then_some(&oc[..]),
                chans: Some(&ic[..]),
                ..Subset::default()
            };
            assert_eq!(
                winograd_way(&wino, &sub, hw, false),
                Some(true),
                "case {case}"
            );
            // Fewer than half of them kept: directly.
            let few = Subset {
                chans: Some(&ic[..(cin - 1) / 2]),
                ..sub
            };
            assert_eq!(winograd_way(&wino, &few, hw, false), None, "case {case}");
            let want = naive_conv(&xs, &w, &b, &g, None, act, (&ic, &oc, None));
            let packed = gemm::pack_a(&w, cout, g.k());
            for isa in isas() {
                let mut got = vec![f32::NAN; cout * n];
                bare(isa).conv_gemm_into(
                    &xs,
                    1,
                    &packed,
                    Some(&wino),
                    &b,
                    1,
                    &g,
                    Residual::None,
                    act,
                    sub,
                    &mut got,
                );
                assert!(got.iter().all(|v| v.is_finite()), "case {case} {isa:?}");
                let (err, scale) = max_error(&got, &want);
                assert!(
                    err <= 1e-5 * scale * (g.k() as f32).sqrt(),
                    "case {case} {isa:?}: {hw:?} {kept} of {cin} inputs: error {err}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_gated_sample_over_a_small_plane_runs_on_the_filters_as_lines() {
        if Isa::detect() != Isa::Avx512 {
            eprintln!("no AVX-512: the filters as lines are not served here");
            return;
        }
        let mut rng = fresh_rng();
        for case in 0..24 {
            // Planes of at most 16 tiles; rows, input channels or both dropped.
            let hw = [rng.random_range(1..=8), rng.random_range(1..=8)];
            let (cin, cout) = (rng.random_range(4..60), rng.random_range(4..60));
            let g = conv_geom(cin, hw, [3, 3], [1, 1], [1, 1], [1, 1]).unwrap();
            let n = hw[0] * hw[1];
            // At most 0.85 of either kept, so that each plan drops enough on its own.
            let (ki, ko) = (
                rng.random_range(0..=cin * 17 / 20),
                rng.random_range(1..=cout * 17 / 20),
            );
            let mut ic = sample(&mut rng, cin, ki).into_vec();
            ic.sort_unstable();
            let mut oc = sample(&mut rng, cout, ko).into_vec();
            oc.sort_unstable();
            let (rows, chans) = match case % 3 {
                0 => (Some(&oc[..]), None),
                1 => (None, Some(&ic[..])),
                _ => (Some(&oc[..]), Some(&ic[..])),
            };
            let xs = uniform(&mut rng, cin * n);
            let w = uniform(&mut rng, cout * cin * 9);
            let b = uniform(&mut rng, cout);
            let res = uniform(&mut rng, cout * n);
            let act = act(&mut rng);
            let mut wino = WinogradWeights::new(&w, cout, cin, Algorithm::F2);
            wino.lines = Some(Default::default());
            let isa = Isa::Avx512;
            // Dense, or with too few pairs dropped, the packed filters serve.
            assert!(wino.lines_for(isa, 1, hw, None, None).is_none());
            let most: Vec<usize> = (1..cout).collect();
            if cout >= 8 {
                assert!(wino.lines_for(isa, 1, hw, Some(&most), None).is_none());
            }
            // Nor a batch, nor a plane of more than 16 tiles.
            assert!(wino.lines_for(isa, 2, hw, rows, chans).is_none());
            assert!(wino.lines_for(isa, 1, [9, 8], rows, chans).is_none());
            // Made by the first plan that runs on them, not before.
            let made = |w: &WinogradWeights| w.lines.as_ref().is_some_and(|l| l.get().is_some());
            assert!(!made(&wino), "case {case}");
            assert!(
                wino.lines_for(isa, 1, hw, rows, chans).is_some(),
                "case {case}"
            );
            assert!(made(&wino), "case {case}");
            let sub = Subset {
                rows,
                chans,
                ..Subset::default()
            };
            assert_eq!(winograd_way(&wino, &sub, hw, true), Some(false));
            let kept_ic: Vec<usize> = chans.map_or_else(|| (0..cin).collect(), <[_]>::to_vec);
            let kept_oc: Vec<usize> = rows.map_or_else(|| (0..cout).collect(), <[_]>::to_vec);
            // Dropped rows pass the residual through.
            let want = naive_conv(&xs, &w, &b, &g, Some(&res), act, (&kept_ic, &kept_oc, None));
            let packed = gemm::pack_a(&w, cout, g.k());
            let mut got = vec![f32::NAN; cout * n];
            bare(isa).conv_gemm_into(
                &xs,
                1,
                &packed,
                Some(&wino),
                &b,
                1,
                &g,
                Residual::Apart(&res),
                act,
                sub,
                &mut got,
            );
            let (err, scale) = max_error(&got, &want);
            assert!(
                err <= 1e-5 * scale * (g.k() as f32).sqrt(),
                "case {case}: {hw:?}, {} of {cin} inputs, {} of {cout} rows: error {err}",
                kept_ic.len(),
                kept_oc.len()
            );
        }
    }

    /// `len` values drawn uniformly from [-1, 1).
    /// A pool of two threads: tasks shared out as on this project's 2-core machines.
    fn two_threads() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    }

    fn uniform(rng: &mut impl Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// The largest absolute difference between `got` and `want`, and the scale it is
    /// judged against: the largest magnitude in `want`, at least 1.
    fn max_error(got: &[f32], want: &[f32]) -> (f32, f32) {
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        (err, scale)
    }

    /// `values` copied to the end of a mapping whose next page is inaccessible: a read
    /// past the last value faults.
    #[cfg(unix)]
    struct Guarded {
        base: *mut libc::c_void,
        bytes: usize,
        at: usize,
        len: usize,
    }

    #[cfg(unix)]
    impl Guarded {
        fn new(values: &[f32]) -> Self {
            // SAFETY: plain anonymous mappings, written only inside the first `pages`.
            unsafe {
                let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
                let data = std::mem::size_of_val(values);
                let pages = data.div_ceil(page).max(1);
                let bytes = (pages + 1) * page;
                let base = libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(base, libc::MAP_FAILED);
                let guard = base.cast::<u8>().add(pages * page);
                assert_eq!(libc::mprotect(guard.cast(), page, libc::PROT_NONE), 0);
                let at = pages * page - data;
                let g = Guarded {
                    base,
                    bytes,
                    at,
                    len: values.len(),
                };
                std::ptr::copy_nonoverlapping(
                    values.as_ptr(),
                    base.cast::<u8>().add(at).cast(),
                    values.len(),
                );
                g
            }
        }

        fn values(&self) -> &[f32] {
            // SAFETY: `len` floats written at `at`, inside the mapping.
            unsafe {
                std::slice::from_raw_parts(self.base.cast::<u8>().add(self.at).cast(), self.len)
            }
        }
    }

    #[cfg(unix)]
    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`.
            unsafe { libc::munmap(self.base, self.bytes) };
        }
    }

    #[test]
    fn the_panel_prefetched_next_is_the_next_one_of_the_batch() {
        // Within a sample, then the next sample's first panels, then none past the batch.
        assert_eq!(panel_after(0, 5, 98, 2), Some((0, 5)));
        assert_eq!(panel_after(0, 98, 98, 2), Some((1, 0)));
        assert_eq!(panel_after(0, 99, 98, 2), Some((1, 1)));
        assert_eq!(panel_after(1, 98, 98, 2), None);
        assert_eq!(panel_after(1, 3, 2, 3), Some((2, 1)));
        assert_eq!(panel_after(0, 0, 0, 1), None);
    }

    #[test]
    #[cfg(unix)]
    fn a_1x1_input_read_in_place_is_read_no_further_than_its_end() {
        // Every width of a last panel after zero to two whole ones, the input ending on
        // an inaccessible page: a kernel reading a value past the plane faults. Dense
        // (rows in whole blocks: the last few columns one at a time), with kept rows
        // over big weights (rows read where they are), with kept channels; batches of
        // one and two samples.
        let mut rng = fresh_rng();
        let pool = two_threads();
        for n in 1..=3 * NR {
            let (in_c, cout) = if n % 3 == 0 { (96, 70) } else { (20, 24) };
            let g = conv_geom(in_c, [1, n], [1, 1], [1, 1], [0, 0], [0, 0]).unwrap();
            let batch = 1 + n % 2;
            let xs = uniform(&mut rng, batch * in_c * n);
            let w = uniform(&mut rng, cout * in_c);
            let b = uniform(&mut rng, cout);
            let packed = gemm::pack_a(&w, cout, in_c);
            let ic = subset(&mut rng, in_c);
            let oc = subset(&mut rng, cout);
            let every = ((0..in_c).collect::<Vec<_>>(), (0..cout).collect::<Vec<_>>());
            let guarded = Guarded::new(&xs);
            let x = guarded.values();
            for (rows, chans) in [(None, None), (Some(&oc[..]), None), (None, Some(&ic[..]))] {
                let plan = (
                    chans.unwrap_or(&every.0[..]),
                    rows.unwrap_or(&every.1[..]),
                    None,
                );
                let want: Vec<f32> = xs
                    .chunks_exact(in_c * n)
                    .flat_map(|x| naive_conv(x, &w, &b, &g, None, Act::None, plan))
                    .collect();
                for isa in isas() {
                    let e = bare(isa);
                    let mut got = vec![0f32; batch * cout * n];
                    let sub = Subset {
                        rows,
                        chans,
                        ..Subset::default()
                    };
                    pool.install(|| {
                        e.conv_gemm_into(
                            x,
                            batch,
                            &packed,
                            None,
                            &b,
                            1,
                            &g,
                            Residual::None,
                            Act::None,
                            sub,
                            &mut got,
                        )
                    });
                    let kept = |i: &usize| rows.is_none_or(|r| r.contains(&(i / n % cout)));
                    let (got, want): (Vec<f32>, Vec<f32>) = (0..got.len())
                        .filter(kept)
                        .map(|i| (got[i], want[i]))
                        .unzip();
                    let (err, scale) = max_error(&got, &want);
                    assert!(
                        err <= 1e-5 * scale * (in_c as f32).sqrt(),
                        "{isa:?} width {n} batch {batch} rows {} chans {}: error {err}",
                        rows.is_some(),
                        chans.is_some()
                    );
                }
            }
        }
    }

    /// One dense sample of a convolution, for `conv_gemm_into` on a pool.
    struct OneConv<'a> {
        xs: &'a [f32],
        packed: &'a [f32],
        bias: &'a [f32],
        g: &'a ConvGeom,
        act: Act,
    }

    impl OneConv<'_> {
        /// Runs the convolution on `pool` with each instruction set this CPU has, over
        /// the subset `sub`, and checks every output cell against `want`.
        fn assert_matches(&self, pool: &rayon::ThreadPool, sub: Subset, want: &[f32], what: &str) {
            for isa in isas() {
                let e = bare(isa);
                let mut got = vec![f32::NAN; want.len()];
                pool.install(|| {
                    e.conv_gemm_into(
                        self.xs,
                        1,
                        self.packed,
                        None,
                        self.bias,
                        1,
                        self.g,
                        Residual::None,
                        self.act,
                        sub,
                        &mut got,
                    )
                });
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{isa:?} {what}: a cell unwritten"
                );
                let (err, scale) = max_error(&got, want);
                assert!(
                    err <= 1e-5 * scale * (self.g.k() as f32).sqrt(),
                    "{isa:?} {what}: error {err}"
                );
            }
        }
    }

    #[test]
    fn a_narrow_last_panel_run_with_the_panel_before_it_matches_a_naive_reference() {
        // Two threads, so that a batch of one has too few panels for the tasks wanted and
        // the narrow last panel joins the group before it (see `conv_gemm_into`).
        let pool = two_threads();
        let mut rng = fresh_rng();
        // 14×14 (6 · 32 + 4), 7×10 (2 · 32 + 6), 9×9 (2 · 32 + 17: not narrow); 1×1 read
        // in place and 3×3 packed.
        for (hw, kernel) in [
            ([14, 14], 1),
            ([14, 14], 3),
            ([7, 10], 1),
            ([7, 10], 3),
            ([9, 9], 1),
        ] {
            let p = kernel / 2;
            let g = conv_geom(24, hw, [kernel; 2], [1, 1], [p, p], [p, p]).unwrap();
            for cout in [16, 64, 100] {
                let xs = uniform(&mut rng, g.in_c * hw[0] * hw[1]);
                let w = uniform(&mut rng, cout * g.k());
                let b = uniform(&mut rng, cout);
                let every = (
                    (0..g.in_c).collect::<Vec<_>>(),
                    (0..cout).collect::<Vec<_>>(),
                );
                let want = naive_conv(&xs, &w, &b, &g, None, Act::Relu, (&every.0, &every.1, None));
                let packed = gemm::pack_a(&w, cout, g.k());
                let what = format!("{hw:?} {kernel}×{kernel} cout {cout}");
                let conv = OneConv {
                    xs: &xs,
                    packed: &packed,
                    bias: &b,
                    g: &g,
                    act: Act::Relu,
                };
                conv.assert_matches(&pool, Subset::default(), &want, &what);
            }
        }
    }

    #[test]
    fn panels_packed_in_parts_of_their_channels_match_a_naive_reference() {
        // Two threads and few panels with long K, so that each panel packed up front is
        // packed in parts of its input channels (see `conv_gemm_into`): a 3×3 stride-2
        // layer over 14 × 14 (7 × 7 out: two panels, K ≥ 1080) and a 1×1 layer over
        // 14 × 14 (packed: seven panels, K ≥ 1030), every input channel or some.
        let pool = two_threads();
        let mut rng = fresh_rng();
        for (cin, kernel, stride) in [(130, 3, 2), (1100, 1, 1)] {
            let p = kernel / 2;
            let g = conv_geom(cin, [14, 14], [kernel; 2], [stride; 2], [p, p], [p, p]).unwrap();
            let cout = 20;
            let xs = uniform(&mut rng, cin * 14 * 14);
            let w = uniform(&mut rng, cout * g.k());
            let b = uniform(&mut rng, cout);
            let packed = gemm::pack_a(&w, cout, g.k());
            let oc: Vec<usize> = (0..cout).collect();
            // Every channel, then a random ninth of them dropped.
            let mut some: Vec<usize> = (0..cin).filter(|_| !rng.random_bool(1.0 / 9.0)).collect();
            some.dedup();
            for ic in [(0..cin).collect::<Vec<_>>(), some] {
                let want = naive_conv(&xs, &w, &b, &g, None, Act::None, (&ic, &oc, None));
                let sub = Subset {
                    chans: (ic.len() < cin).then_some(&ic[..]),
                    ..Subset::default()
                };
                let what = format!("{kernel}×{kernel} cin {cin}, {} kept", ic.len());
                let conv = OneConv {
                    xs: &xs,
                    packed: &packed,
                    bias: &b,
                    g: &g,
                    act: Act::None,
                };
                conv.assert_matches(&pool, sub, &want, &what);
            }
        }
    }

    #[test]
    fn kept_rows_over_weights_row_by_row_match_a_naive_reference() {
        // Plans that keep some output rows and every input channel, the weights given
        // row by row as a gated layer holds them (read so on AVX-512 where
        // `rows_major_fits`; the other kernels take the packed weights): 1×1 layers over
        // planes of whole and part panels (7 × 7: 32 + 17, 14 × 14 read packed or in
        // place, 5 × 9), and 3×3 stride-2 ones to 7 × 7, 4 × 6 and 14 × 14 (packed
        // panels), short and long K, on two threads.
        let pool = two_threads();
        let mut rng = fresh_rng();
        let one = ([1, 1], [1, 1], [0, 0]);
        let strided = ([3, 3], [2, 2], [1, 1]);
        let cases = [
            (one, [7, 7]),
            (one, [14, 14]),
            (one, [5, 9]),
            (strided, [14, 14]),
            (strided, [8, 11]),
            (strided, [28, 28]),
        ];
        for ((kernel, stride, pad), hw) in cases {
            for cin in [40, 600] {
                let g = conv_geom(cin, hw, kernel, stride, pad, pad).unwrap();
                let cout = 50;
                let xs = uniform(&mut rng, cin * hw[0] * hw[1]);
                let w = uniform(&mut rng, cout * g.k());
                let b = uniform(&mut rng, cout);
                let packed = gemm::pack_a(&w, cout, g.k());
                let ic: Vec<usize> = (0..cin).collect();
                let oc: Vec<usize> = (0..cout).filter(|_| rng.random_bool(0.5)).collect();
                let want = naive_conv(&xs, &w, &b, &g, None, Act::Relu6, (&ic, &oc, None));
                let sub = Subset {
                    rows: (oc.len() < cout).then_some(&oc[..]),
                    rows_major: Some(&w),
                    ..Subset::default()
                };
                let what = format!(
                    "{kernel:?} from {hw:?} cin {cin}, {} of {cout} rows",
                    oc.len()
                );
                let conv = OneConv {
                    xs: &xs,
                    packed: &packed,
                    bias: &b,
                    g: &g,
                    act: Act::Relu6,
                };
                conv.assert_matches(&pool, sub, &want, &what);
            }
        }
    }

    #[test]
    fn gated_batches_run_together_match_a_naive_reference() {
        let mut rng = fresh_rng();
        for case in 0..120 {
            let isas = isas();
            let e = bare(isas[rng.random_range(0..isas.len())]);
            // A quarter of the cases 3×3, stride 1, one pixel of padding: those run by
            // Winograd too (`conv_winograd_samples`), checked the same way.
            let wino = rng.random_bool(0.25);
            let kernel = match rng.random_range(0..3) {
                _ if wino => [3, 3],
                0 => [1, 1],
                1 => [3, 3],
                _ => [rng.random_range(1..=5), rng.random_range(1..=5)],
            };
            let stride = match wino {
                true => [1, 1],
                false => [rng.random_range(1..=2), rng.random_range(1..=2)],
            };
            let in_hw = [rng.random_range(1..16), rng.random_range(1..16)];
            let pad_tl = match wino {
                true => [1, 1],
                false => [
                    rng.random_range(0..kernel[0]),
                    rng.random_range(0..kernel[1]),
                ],
            };
            // Up to 100 channels: a 3×3 layer's K then goes in several ranges.
            let in_c = rng.random_range(1..100);
            let Some(g) = conv_geom(in_c, in_hw, kernel, stride, pad_tl, pad_tl) else {
                continue;
            };
            let (batch, cout) = (rng.random_range(1..5), rng.random_range(1..60));
            let (n, plane) = (g.out_hw[0] * g.out_hw[1], in_hw[0] * in_hw[1]);
            let values = |rng: &mut rand::rngs::StdRng, len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let xs = values(&mut rng, batch * g.in_c * plane);
            let w = values(&mut rng, cout * g.k());
            let biases: Vec<Vec<f32>> = (0..batch).map(|_| values(&mut rng, cout)).collect();
            let rs: Option<Vec<f32>> = rng
                .random_bool(0.4)
                .then(|| values(&mut rng, batch * cout * n));
            let act = act(&mut rng);
            // Each sample its own plan: kept rows and channels (all, some or none).
            let plans: Vec<(Vec<usize>, Vec<usize>, bool)> = (0..batch)
                .map(|_| {
                    let ic = match rng.random_range(0..8) {
                        0 => Vec::new(),
                        1 => (0..g.in_c).collect(),
                        _ => subset(&mut rng, g.in_c),
                    };
                    (ic, subset(&mut rng, cout), rng.random_bool(0.5))
                })
                .collect();
            let sample_plans: Vec<SamplePlan> = plans
                .iter()
                .zip(&biases)
                .map(|((ic, oc, unread), bias)| SamplePlan {
                    rows: (oc.len() < cout).then_some(&oc[..]),
                    chans: (ic.len() < g.in_c).then_some(&ic[..]),
                    bias,
                    dropped_unread: *unread,
                })
                .collect();
            let packed = gemm::pack_a(&w, cout, g.k());
            // A residual apart, or already in the output.
            let in_out = rs.is_some() && rng.random_bool(0.5);
            let fresh = || match &rs {
                Some(r) if in_out => (r.clone(), Residual::InOut),
                r => (vec![f32::NAN; batch * cout * n], r.as_deref().into()),
            };
            let (mut direct, residual) = fresh();
            e.conv_gated_batch(&xs, &packed, &g, act, &sample_plans, residual, &mut direct);
            let mut outs = vec![("direct", direct)];
            if wino {
                let wg = WinogradWeights::new(&w, cout, g.in_c, Algorithm::F2);
                let (mut by_wino, residual) = fresh();
                e.conv_winograd_samples(&xs, &wg, &g, act, &sample_plans, residual, &mut by_wino);
                outs.push(("winograd", by_wino));
                // With lines too: on AVX-512, planes of at most 16 tiles run on them.
                #[cfg(target_arch = "x86_64")]
                {
                    let mut wg = WinogradWeights::new(&w, cout, g.in_c, Algorithm::F2);
                    wg.lines = Some(Default::default());
                    let (mut on_lines, residual) = fresh();
                    e.conv_winograd_samples(
                        &xs,
                        &wg,
                        &g,
                        act,
                        &sample_plans,
                        residual,
                        &mut on_lines,
                    );
                    outs.push(("winograd lines", on_lines));
                }
            }
            for (way, got) in &outs {
                for (s, ((ic, oc, unread), bias)) in plans.iter().zip(&biases).enumerate() {
                    let x = &xs[s * g.in_c * plane..(s + 1) * g.in_c * plane];
                    let r = rs.as_deref().map(|r| &r[s * cout * n..(s + 1) * cout * n]);
                    let mut want = naive_conv(x, &w, bias, &g, r, act, (ic, oc, None));
                    if *unread {
                        // Dropped rows are left as they were.
                        for o in (0..cout).filter(|o| oc.binary_search(o).is_err()) {
                            let was = &mut want[o * n..(o + 1) * n];
                            match r.filter(|_| in_out) {
                                Some(r) => was.copy_from_slice(&r[o * n..(o + 1) * n]),
                                None => was.fill(f32::NAN),
                            }
                        }
                    }
                    let got = &got[s * cout * n..(s + 1) * cout * n];
                    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.is_nan(),
                            b.is_nan(),
                            "case {case} {way} sample {s} cell {i}"
                        );
                        if !b.is_nan() {
                            assert!(
                            (a - b).abs() <= 1e-5 * scale * (g.k() as f32).sqrt().max(1.0),
                            "case {case} {way} {:?} sample {s} cell {i}: {a} vs {b}, {g:?} cout {cout} ic {} oc {}",
                            e.isa,
                            ic.len(),
                            oc.len()
                        );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn planned_depthwise_matches_a_naive_reference() {
        let mut rng = fresh_rng();
        for _ in 0..200 {
            let kernel = [[3, 3], [5, 5]][rng.random_range(0..2)];
            let stride = [rng.random_range(1..=2); 2];
            let in_hw = [rng.random_range(1..20), rng.random_range(1..20)];
            let pad = kernel[0] / 2;
            let out_hw = [
                (in_hw[0] + 2 * pad - kernel[0]) / stride[0] + 1,
                (in_hw[1] + 2 * pad - kernel[1]) / stride[1] + 1,
            ];
            let win = Window {
                in_hw,
                out_hw,
                kernel,
                stride,
                pad_tl: [pad, pad],
            };
            let c = rng.random_range(1..24);
            let batch = rng.random_range(1..4);
            let (ip, op) = (in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]);
            let xs: Vec<f32> = (0..batch * c * ip)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let w: Vec<f32> = (0..c * 25).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w = &w[..c * kernel[0] * kernel[1]];
            let b: Vec<f32> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
            let rs: Option<Vec<f32>> = (stride == [1, 1] && rng.random_bool(0.5)).then(|| {
                (0..batch * c * op)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect()
            });
            let act = act(&mut rng);
            // Each sample its own channels.
            let sets: Vec<Vec<usize>> = (0..batch).map(|_| subset(&mut rng, c)).collect();
            let e = bare(Isa::detect());
            let plan = depthwise::Plan::new(win, Tuning::detect().depthwise_strip_bytes);
            // Half the cases shift kept planes of samples that dropped channels.
            let shift: Option<Vec<f32>> = rng
                .random_bool(0.5)
                .then(|| (0..c).map(|_| rng.random_range(0.0..6.0)).collect());
            let (got, _) = e.depthwise_compact(
                &xs,
                batch,
                w,
                &b,
                &plan,
                rs.as_deref(),
                act,
                &sets,
                shift.as_deref(),
            );
            // Reference: the dense naive depthwise, less the shift where it applies;
            // dropped channels are left unwritten.
            let mut want = ops::depthwise(&xs, w, &b, rs.as_deref(), act, c, win);
            if let Some(k) = &shift {
                for (p, plane) in want.chunks_mut(op).enumerate() {
                    if sets[p / c].len() < c {
                        plane.iter_mut().for_each(|v| *v -= k[p % c]);
                    }
                }
            }
            let got: Vec<f32> = got
                .chunks(op)
                .zip(want.chunks(op))
                .enumerate()
                .flat_map(|(p, (g, w))| {
                    let kept = sets[p / c].binary_search(&(p % c)).is_ok();
                    if kept {
                        g.to_vec()
                    } else {
                        w.to_vec()
                    }
                })
                .collect();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "cell {i}: {a} vs {b}"
                );
            }
        }
    }
}
