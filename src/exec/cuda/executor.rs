//! The CUDA executor: weights uploaded once in the kernels' layouts, activations and plan
//! buffers planned once per batch size, and each forward pass captured once as a CUDA
//! graph and replayed. Plans live in device memory; changing what is kept is a copy into
//! the plan buffers, never a new capture and never a device-to-host copy mid-pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::{nvrtc, Device};
use crate::error::{Error, Result};
use crate::exec::plan::{SamplePlan, Tiling};
use crate::exec::{gating, Cut, Executor, Forward, Gates, Policy};
use crate::format::Model;
use crate::model::{Act, Op, ValueShape};

/// Parameters of one convolution launch; mirrors `struct ConvParams` in cuda/dynsparse.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvParams {
    pub h: i32,
    pub w: i32,
    pub cin: i32,
    pub oh: i32,
    pub ow: i32,
    pub cout: i32,
    pub kh: i32,
    pub kw: i32,
    pub sh: i32,
    pub sw: i32,
    pub pt: i32,
    pub pl: i32,
    pub g: i32,
    pub tiles_w: i32,
    pub tiles: i32,
    pub act: i32,
    pub has_res: i32,
    pub split_max: i32,
    pub target_blocks: i32,
    pub batch: i32,
}

impl ConvParams {
    /// K-loop iterations of one block for the dense plan.
    /// These parameters for a launch over `batch` samples on a device that holds
    /// `target_blocks` blocks at once: convolutions whose dense grid cannot fill the
    /// device four times over may split K (up to 16 ways) so that small problems and
    /// sparse plans still occupy it.
    pub fn for_launch(&self, batch: usize, target_blocks: i32, depthwise: bool) -> ConvParams {
        let mut p = *self;
        p.batch = batch as i32;
        p.target_blocks = target_blocks;
        let blocks = ((p.tiles * p.g * p.g + 63) / 64) * ((p.cout + 63) / 64) * p.batch;
        let iters = p.kh * p.kw * ((p.cin + 15) / 16);
        p.split_max = if depthwise || blocks >= 4 * target_blocks {
            1
        } else {
            (iters / 2).clamp(1, 16)
        };
        p
    }

    /// Floats of split-K workspace a launch needs (0 when it cannot split).
    pub fn workspace_len(&self) -> usize {
        if self.split_max <= 1 {
            0
        } else {
            self.split_max as usize
                * self.batch as usize
                * (self.tiles * self.g * self.g) as usize
                * self.cout as usize
        }
    }
}

// SAFETY: plain-old-data with the same C layout as the kernel's struct.
unsafe impl DeviceRepr for ConvParams {}

/// Destinations of a gate's decision; mirrors `struct PlanDests` in cuda/dynsparse.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PlanDests {
    pub idx: [u64; 4],
    pub cnt: [u64; 4],
    pub count: i32,
}

// SAFETY: plain-old-data with the kernel struct's layout (8 pointers, an int, padding).
unsafe impl DeviceRepr for PlanDests {}

impl PlanDests {
    /// Adds one (index list, count) destination; at most four.
    pub fn push(
        &mut self,
        stream: &CudaStream,
        idx: &mut CudaSlice<i32>,
        cnt: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let k = self.count as usize;
        if k >= 4 {
            return Err(Error::Cuda(
                "a gate decision has more than four destinations".into(),
            ));
        }
        self.idx[k] = idx.device_ptr_mut(stream).0;
        self.cnt[k] = cnt.device_ptr_mut(stream).0;
        self.count += 1;
        Ok(())
    }
}

pub(crate) fn act_code(a: Act) -> i32 {
    match a {
        Act::None => 0,
        Act::Relu => 1,
        Act::Relu6 => 2,
    }
}

pub(crate) fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// The loaded kernels.
#[derive(Clone)]
pub(crate) struct Kernels {
    pub conv: CudaFunction,
    pub conv_precise: CudaFunction,
    pub conv_f16: CudaFunction,
    /// Arithmetic of the convolutions' products.
    pub precision: Precision,
    pub depthwise: CudaFunction,
    pub init_skipped: CudaFunction,
    pub nchw_to_nhwc: CudaFunction,
    pub maxpool: CudaFunction,
    pub avgpool: CudaFunction,
    pub linear: CudaFunction,
    pub splitk_finish: CudaFunction,
    pub gate_pool: CudaFunction,
    pub gate_fc: CudaFunction,
    pub gate_rank: CudaFunction,
    pub gate_compact: CudaFunction,
    /// Convolution blocks resident on the whole device at once.
    pub conv_blocks: i32,
    _module: Arc<CudaModule>,
}

impl Kernels {
    pub fn load(dev: &Device) -> Result<Self> {
        let cubin = nvrtc::cubin_cached(&dev.arch())?;
        let module = dev
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(cuda_err("loading the compiled kernels"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| Error::Cuda(format!("kernel {name}: {e:?}")))
        };
        let conv = f("conv_igemm_tf32")?;
        let per_sm = conv
            .occupancy_max_active_blocks_per_multiprocessor(128, 0, None)
            .map_err(cuda_err("reading the convolution's occupancy"))?;
        Ok(Kernels {
            conv_blocks: (per_sm.max(1) as i32) * dev.sm_count(),
            splitk_finish: f("conv_splitk_finish")?,
            gate_pool: f("gate_pool")?,
            gate_fc: f("gate_fc")?,
            gate_rank: f("gate_rank")?,
            gate_compact: f("gate_compact")?,
            conv_precise: f("conv_igemm_3xtf32")?,
            conv_f16: f("conv_igemm_f16")?,
            precision: Precision::Tf32,
            conv,
            depthwise: f("depthwise_conv")?,
            init_skipped: f("init_skipped")?,
            nchw_to_nhwc: f("nchw_to_nhwc")?,
            maxpool: f("maxpool_nhwc")?,
            avgpool: f("adaptive_avgpool_nhwc")?,
            linear: f("linear")?,
            _module: module,
        })
    }
}

impl Kernels {
    /// Per kernel, as the driver reports it: registers per thread, local memory bytes per
    /// thread (spills and stack), static shared memory bytes.
    pub fn resources(&self) -> Vec<(&'static str, i32, i32, i32)> {
        [
            ("conv_igemm_tf32", &self.conv),
            ("conv_igemm_3xtf32", &self.conv_precise),
            ("conv_igemm_f16", &self.conv_f16),
            ("conv_splitk_finish", &self.splitk_finish),
            ("depthwise_conv", &self.depthwise),
            ("init_skipped", &self.init_skipped),
            ("nchw_to_nhwc", &self.nchw_to_nhwc),
            ("maxpool_nhwc", &self.maxpool),
            ("adaptive_avgpool_nhwc", &self.avgpool),
            ("linear", &self.linear),
            ("gate_pool", &self.gate_pool),
            ("gate_fc", &self.gate_fc),
            ("gate_rank", &self.gate_rank),
            ("gate_compact", &self.gate_compact),
        ]
        .into_iter()
        .map(|(n, f)| {
            (
                n,
                f.num_regs().unwrap_or(-1),
                f.local_size_bytes().unwrap_or(-1),
                f.shared_size_bytes().unwrap_or(-1),
            )
        })
        .collect()
    }
}

/// Grid-stride launch for `total` elements.
pub(crate) fn elementwise(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((total.div_ceil(256)).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch shape of the implicit-GEMM convolution for a worst-case plan.
pub(crate) fn conv_grid(p: &ConvParams, batch: usize) -> LaunchConfig {
    let positions = (p.tiles * p.g * p.g) as u32;
    LaunchConfig {
        grid_dim: (
            positions.div_ceil(64) * (p.cout as u32).div_ceil(64) * p.split_max.max(1) as u32,
            1,
            batch as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch shape of the depthwise kernel.
pub(crate) fn depthwise_grid(p: &ConvParams, batch: usize) -> LaunchConfig {
    let positions = (p.tiles * p.g * p.g) as u32;
    LaunchConfig {
        grid_dim: (
            positions.div_ceil(8).clamp(1, 4096),
            (p.cout as u32).div_ceil(32),
            batch as u32,
        ),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// Device buffers of one convolution's plan for `batch` samples.
pub(crate) struct PlanBuffers {
    pub oc_idx: CudaSlice<i32>,
    pub oc_cnt: CudaSlice<i32>,
    pub ic_idx: CudaSlice<i32>,
    pub ic_cnt: CudaSlice<i32>,
    pub tile_idx: CudaSlice<i32>,
    pub tile_cnt: CudaSlice<i32>,
}

impl PlanBuffers {
    pub fn new(stream: &Arc<CudaStream>, p: &ConvParams, batch: usize) -> Result<Self> {
        let z = |n: usize| {
            stream
                .alloc_zeros::<i32>(n.max(1))
                .map_err(cuda_err("allocating plan buffers"))
        };
        Ok(PlanBuffers {
            oc_idx: z(batch * p.cout as usize)?,
            oc_cnt: z(batch)?,
            ic_idx: z(batch * p.cin as usize)?,
            ic_cnt: z(batch)?,
            tile_idx: z(batch * p.tiles as usize)?,
            tile_cnt: z(batch)?,
        })
    }

    /// Copies per-sample plans into the buffers (host to device, before a pass).
    pub fn upload(
        &mut self,
        stream: &Arc<CudaStream>,
        p: &ConvParams,
        plans: &[SamplePlan],
    ) -> Result<()> {
        let (cout, cin, tiles) = (p.cout as usize, p.cin as usize, p.tiles as usize);
        let mut oc = vec![0i32; plans.len() * cout];
        let mut ic = vec![0i32; plans.len() * cin];
        let mut ti = vec![0i32; plans.len() * tiles];
        let (mut occ, mut icc, mut tic) = (vec![], vec![], vec![]);
        for (n, s) in plans.iter().enumerate() {
            let check = |v: &[i32], max: usize, what: &str| -> Result<()> {
                if v.len() > max || v.iter().any(|&i| i < 0 || i as usize >= max) {
                    return Err(Error::Input(format!(
                        "plan for sample {n}: {what} indices out of range 0..{max}"
                    )));
                }
                Ok(())
            };
            check(&s.oc, cout, "output-channel")?;
            check(&s.ic, cin, "input-channel")?;
            check(&s.tiles, tiles, "tile")?;
            oc[n * cout..n * cout + s.oc.len()].copy_from_slice(&s.oc);
            ic[n * cin..n * cin + s.ic.len()].copy_from_slice(&s.ic);
            ti[n * tiles..n * tiles + s.tiles.len()].copy_from_slice(&s.tiles);
            occ.push(s.oc.len() as i32);
            icc.push(s.ic.len() as i32);
            tic.push(s.tiles.len() as i32);
        }
        let e = cuda_err("uploading a plan");
        stream.memcpy_htod(&oc, &mut self.oc_idx).map_err(&e)?;
        stream.memcpy_htod(&ic, &mut self.ic_idx).map_err(&e)?;
        stream.memcpy_htod(&ti, &mut self.tile_idx).map_err(&e)?;
        stream.memcpy_htod(&occ, &mut self.oc_cnt).map_err(&e)?;
        stream.memcpy_htod(&icc, &mut self.ic_cnt).map_err(&e)?;
        stream.memcpy_htod(&tic, &mut self.tile_cnt).map_err(&e)?;
        Ok(())
    }
}

/// Launches `init_skipped` then the convolution (implicit GEMM or depthwise) of one layer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_conv(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    p: &ConvParams,
    depthwise: bool,
    batch: usize,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    res: Option<&CudaSlice<f32>>,
    y: &mut CudaSlice<f32>,
    plan: &PlanBuffers,
    sparse: bool,
    ws: &mut CudaSlice<f32>,
) -> Result<()> {
    let e = cuda_err("launching a convolution");
    let p = &p.for_launch(batch, k.conv_blocks, depthwise);
    if ws.len() < p.workspace_len() {
        return Err(Error::Cuda(format!(
            "split-K workspace holds {} floats, the launch needs {}",
            ws.len(),
            p.workspace_len()
        )));
    }
    // A null residual is passed as the output pointer itself; has_res says not to read it.
    let per_sample = (p.oh * p.ow * p.cout) as i64;
    if sparse {
        let mut cfg = elementwise(per_sample as usize);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
        cfg.grid_dim.1 = batch as u32;
        let mut lb = stream.launch_builder(&k.init_skipped);
        lb.arg(&mut *y);
        match res {
            Some(r) => lb.arg(r),
            None => lb.arg(&plan.oc_cnt),
        };
        lb.arg(&p.has_res)
            .arg(&per_sample)
            .arg(&plan.oc_cnt)
            .arg(&plan.tile_cnt)
            .arg(&p.cout)
            .arg(&p.tiles);
        // SAFETY: argument list matches init_skipped's signature; buffers are sized for batch.
        unsafe { lb.launch(cfg) }.map_err(&e)?;
    }
    let (func, cfg) = if depthwise {
        (&k.depthwise, depthwise_grid(p, batch))
    } else {
        let f = match k.precision {
            Precision::Tf32 => &k.conv,
            Precision::Tf32x3 => &k.conv_precise,
            Precision::Fp16 => &k.conv_f16,
        };
        (f, conv_grid(p, batch))
    };
    let mut lb = stream.launch_builder(func);
    lb.arg(p).arg(x).arg(w).arg(b);
    match res {
        Some(r) => lb.arg(r),
        None => lb.arg(x),
    };
    lb.arg(&mut *y).arg(&plan.oc_idx).arg(&plan.oc_cnt);
    if !depthwise {
        lb.arg(&plan.ic_idx).arg(&plan.ic_cnt);
    }
    lb.arg(&plan.tile_idx).arg(&plan.tile_cnt);
    if !depthwise {
        lb.arg(&mut *ws);
    }
    // SAFETY: argument lists match the kernels' signatures; every buffer holds the
    // worst-case plan's extent for `batch` samples, the workspace its split slices.
    unsafe { lb.launch(cfg) }.map_err(&e)?;
    if p.split_max > 1 {
        let positions = (p.tiles * p.g * p.g) as u32;
        let cfg = LaunchConfig {
            grid_dim: (positions.div_ceil(4).clamp(1, 64), 1, batch as u32),
            block_dim: (64, 4, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = stream.launch_builder(&k.splitk_finish);
        lb.arg(p).arg(&*ws).arg(b);
        match res {
            Some(r) => lb.arg(r),
            None => lb.arg(x),
        };
        lb.arg(&mut *y)
            .arg(&plan.oc_idx)
            .arg(&plan.oc_cnt)
            .arg(&plan.ic_cnt)
            .arg(&plan.tile_idx)
            .arg(&plan.tile_cnt);
        // SAFETY: matches conv_splitk_finish's signature.
        unsafe { lb.launch(cfg) }.map_err(&e)?;
    }
    Ok(())
}

/// A channel gate on one convolution and the plans that follow its decision.
struct Gate {
    /// Gate weights `[cout][cin]` and bias `[cout]`.
    g: CudaSlice<f32>,
    gb: CudaSlice<f32>,
    /// Nodes whose plans copy this gate's kept list: `(node, depthwise)` — a convolution
    /// takes it as its input channels, a depthwise layer as its channels.
    followers: Vec<(usize, bool)>,
}

enum Layer {
    Conv {
        p: ConvParams,
        depthwise: bool,
        residual: Option<usize>,
        w: CudaSlice<f32>,
        b: CudaSlice<f32>,
        gate: Option<Box<Gate>>,
    },
    MaxPool {
        k: [i32; 2],
        s: [i32; 2],
        pad: [i32; 2],
    },
    AvgPool,
    Linear {
        in_f: i32,
        out_f: i32,
        act: i32,
        w: CudaSlice<f32>,
        b: CudaSlice<f32>,
    },
}

struct Node {
    input: usize,
    input_shape: ValueShape,
    output_shape: ValueShape,
    layer: Layer,
}

/// A captured graph. cudarc leaves graphs `!Send` because the driver does not
/// synchronize access to them; every access here goes through the executor's mutex.
struct Graph(CudaGraph);

// SAFETY: a `Graph` is only touched while holding `CudaExecutor::states`' lock.
unsafe impl Send for Graph {}

/// Most output channels a gate can rank (`GATE_MAX` in cuda/dynsparse.cu).
const GATE_MAX: usize = 4096;

/// Per batch size: activations, plans and the captured graphs (dense and sparse).
struct BatchState {
    input: CudaSlice<f32>,
    values: Vec<CudaSlice<f32>>,
    plans: Vec<Option<PlanBuffers>>,
    workspace: CudaSlice<f32>,
    sparse: bool,
    /// Channel gates run on the device (plans of gated layers and their followers are
    /// written by the gates, not by the host).
    gated: bool,
    pooled: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    flags: CudaSlice<i32>,
    /// Per gated node, per sample: how many channels to keep.
    keep: Vec<Option<CudaSlice<i32>>>,
    /// The keep ratio and rounding the device gates were last set to (`None`: gates off).
    policy: Option<(f64, usize)>,
    /// Graphs for dense plans, host plans and device gates.
    graphs: [Option<Graph>; 3],
}

/// Arithmetic of the convolutions' tensor-core products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// TF32 operands (10-bit mantissa), FP32 accumulation: the fast default.
    #[default]
    Tf32,
    /// Each operand split into two TF32 parts, three products: close to FP32, ~3× the
    /// tensor-core work.
    Tf32x3,
    /// Operands rounded to FP16 on their way from shared memory to the tensor cores
    /// (memory stays FP32), FP32 accumulation.
    Fp16,
}

/// The keep ratio `policy` asks the CUDA executor's device gates for on `model` (`None`:
/// dense), or why they cannot run it — known before any GPU is opened. The device gates
/// keep a ratio of each gated layer's channels; thresholds, tile gates and FLOP budgets
/// are decided on the CPU only. A model whose gateable layers feed depthwise layers
/// (MobileNetV2, EfficientNet-Lite) is refused: the constant a depthwise layer makes of a
/// dropped channel is not carried to the next layer's bias on the GPU (see
/// [`CudaExecutor::set_channel_gates`]), so the pass would not be the CPU engine's.
pub fn gate_ratio(model: &Model, policy: Policy) -> Result<Option<f64>> {
    checked_ratio(policy, feeds_depthwise(model))
}

fn feeds_depthwise(model: &Model) -> bool {
    gating::gateable(model)
        .iter()
        .any(|(_, followers)| followers.iter().any(|&(_, depthwise)| depthwise))
}

fn checked_ratio(policy: Policy, feeds_depthwise: bool) -> Result<Option<f64>> {
    policy.validate()?;
    let keep = match policy {
        Policy::Dense => return Ok(None),
        Policy::Keep(r) => r,
        Policy::Gates(Gates {
            channels: Cut::Ratio(r),
            tiles: Cut::All,
        }) => r,
        _ => {
            return Err(Error::Input(
                "on a CUDA GPU the gates keep a ratio of each layer's channels (keep R); \
                 thresholds, tile gates and FLOP budgets run on the CPU"
                    .into(),
            ))
        }
    };
    if keep >= 1.0 {
        // Everything kept: the gates would decide nothing (the CPU engine skips them too).
        return Ok(None);
    }
    if feeds_depthwise {
        return Err(Error::Input(
            "this model's gated layers feed depthwise layers, which the CUDA executor does \
             not gate yet (MobileNetV2 / EfficientNet-Lite blocks): run it gated on the CPU, \
             or dense on the GPU"
                .into(),
        ));
    }
    Ok(Some(keep))
}

/// What a node executes, for counting FLOPs under a gate policy.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NodeFlops {
    Conv {
        cin: usize,
        cout: usize,
        /// Kernel taps (kh · kw).
        taps: usize,
        /// Output pixels.
        pixels: usize,
        /// Input pixels: what a gate pools over.
        plane: usize,
        depthwise: bool,
    },
    /// Anything else: its dense FLOPs.
    Fixed(u64),
}

pub(crate) fn node_flops(model: &Model) -> Vec<NodeFlops> {
    model
        .desc
        .nodes
        .iter()
        .zip(&model.layers)
        .map(|(n, info)| match &n.op {
            Op::Conv(c) => NodeFlops::Conv {
                cin: c.in_channels,
                cout: c.out_channels,
                taps: c.kernel[0] * c.kernel[1],
                pixels: info.output[1] * info.output[2],
                plane: info.input[1] * info.input[2],
                depthwise: c.groups > 1,
            },
            _ => NodeFlops::Fixed(info.flops),
        })
        .collect()
}

/// FLOPs per sample when the gates at `gates` (node, followers) keep
/// `kept_count(cout, keep, round)` channels: `(executed, of which the gates')`. A follower
/// reads only the kept channels; a depthwise follower also computes only those. Counted
/// as the kernels run: `2 · pixels · kept outputs · kept inputs · taps` per convolution
/// (kept inputs 1 for depthwise), plus [`gating::gate_flops`] per gate.
pub(crate) fn keep_flops(
    geometry: &[NodeFlops],
    gates: &[(usize, Vec<(usize, bool)>)],
    keep: f64,
    round: usize,
) -> (u64, u64) {
    let n = geometry.len();
    let (mut oc, mut ic) = (vec![None; n], vec![None; n]);
    let mut gated = vec![false; n];
    for (i, followers) in gates {
        let Some(NodeFlops::Conv { cout, .. }) = geometry.get(*i) else {
            continue;
        };
        let k = gating::kept_count(*cout, keep, round);
        oc[*i] = Some(k);
        gated[*i] = true;
        for &(j, depthwise) in followers {
            if j < n {
                ic[j] = Some(k);
                if depthwise {
                    oc[j] = Some(k);
                }
            }
        }
    }
    let (mut total, mut gate_total) = (0u64, 0u64);
    for (i, g) in geometry.iter().enumerate() {
        match *g {
            NodeFlops::Conv {
                cin,
                cout,
                taps,
                pixels,
                plane,
                depthwise,
            } => {
                let kept_in = ic[i].unwrap_or(cin);
                let inner = if depthwise { 1 } else { kept_in };
                total += (2 * pixels * oc[i].unwrap_or(cout) * inner * taps) as u64;
                if gated[i] {
                    let f = gating::gate_flops(kept_in, plane, cout);
                    total += f;
                    gate_total += f;
                }
            }
            NodeFlops::Fixed(f) => total += f,
        }
    }
    (total, gate_total)
}

/// Runs a model on one CUDA device.
pub struct CudaExecutor {
    dev: Device,
    kernels: Kernels,
    nodes: Vec<Node>,
    input_shape: ValueShape,
    classes: usize,
    /// Gated channel counts round up to this in [`Executor::forward_with`].
    channel_round: usize,
    /// See [`gate_ratio`].
    feeds_depthwise: bool,
    /// Per node, what [`keep_flops`] counts; and the gated nodes with their followers.
    geometry: Vec<NodeFlops>,
    gates: Vec<(usize, Vec<(usize, bool)>)>,
    states: Mutex<HashMap<usize, BatchState>>,
}

/// Output channels a device gate keeps rounded up to, unless
/// [`CudaExecutor::with_channel_round`] says otherwise: the tensor cores' n8 fragment. A
/// measured profile (`dynsparse profile --device cuda`, H200) stepped only at the
/// 64-channel block tile; inside one, each channel added about 0.2% of the pass at batch
/// 64, so rounding to 8 costs little.
pub const DEFAULT_CHANNEL_ROUND: usize = 8;

impl CudaExecutor {
    /// Compiles (or loads from the cache) the kernels and uploads the model's weights in
    /// the kernels' layouts.
    pub fn new(model: &Model, dev: Device) -> Result<Self> {
        Self::with_precision(model, dev, Precision::Tf32)
    }

    /// [`CudaExecutor::new`] with a chosen convolution precision.
    pub fn with_precision(model: &Model, dev: Device, precision: Precision) -> Result<Self> {
        let mut kernels = Kernels::load(&dev)?;
        kernels.precision = precision;
        let stream = &dev.stream;
        let up = |v: &[f32]| stream.clone_htod(v).map_err(cuda_err("uploading weights"));
        let mut nodes = Vec::new();
        for (node, info) in model.desc.nodes.iter().zip(&model.layers) {
            let [c, h, w] = info.input;
            let [oc, oh, ow] = info.output;
            let layer = match &node.op {
                Op::Conv(cv) => {
                    let weight = model.weight(&format!("{}.weight", node.name))?;
                    let bias = model.weight(&format!("{}.bias", node.name))?;
                    let [kh, kw] = cv.kernel;
                    let depthwise = cv.groups > 1;
                    if depthwise && !(cv.groups == c && oc == c) {
                        return Err(Error::Cuda(format!(
                            "node '{}': grouped convolution with {} groups is not supported on CUDA (only depthwise)",
                            node.name, cv.groups
                        )));
                    }
                    let packed: Vec<f32> = if depthwise {
                        // [c][1][kh][kw] -> [kh][kw][c]
                        let mut v = vec![0.0; kh * kw * c];
                        for ch in 0..c {
                            for t in 0..kh * kw {
                                v[t * c + ch] = weight.data[ch * kh * kw + t];
                            }
                        }
                        v
                    } else {
                        // [co][ci][kh][kw] -> [co][kh][kw][ci]
                        let mut v = vec![0.0; oc * kh * kw * c];
                        for o in 0..oc {
                            for ci in 0..c {
                                for t in 0..kh * kw {
                                    v[(o * kh * kw + t) * c + ci] =
                                        weight.data[(o * c + ci) * kh * kw + t];
                                }
                            }
                        }
                        v
                    };
                    let [pt, _, pl, _] = cv.padding.resolve([h, w], cv.kernel, cv.stride);
                    let tiling = Tiling::for_output(oh, ow);
                    Layer::Conv {
                        p: ConvParams {
                            h: h as i32,
                            w: w as i32,
                            cin: c as i32,
                            oh: oh as i32,
                            ow: ow as i32,
                            cout: oc as i32,
                            kh: kh as i32,
                            kw: kw as i32,
                            sh: cv.stride[0] as i32,
                            sw: cv.stride[1] as i32,
                            pt: pt as i32,
                            pl: pl as i32,
                            g: tiling.g as i32,
                            tiles_w: tiling.tiles_w as i32,
                            tiles: tiling.tiles as i32,
                            act: act_code(cv.act),
                            has_res: cv.residual.is_some() as i32,
                            ..ConvParams::default()
                        },
                        depthwise,
                        residual: cv.residual,
                        w: up(&packed)?,
                        b: up(&bias.data)?,
                        gate: None,
                    }
                }
                Op::MaxPool(mp) => Layer::MaxPool {
                    k: [mp.kernel[0] as i32, mp.kernel[1] as i32],
                    s: [mp.stride[0] as i32, mp.stride[1] as i32],
                    pad: [mp.padding[0] as i32, mp.padding[1] as i32],
                },
                Op::GlobalAvgPool | Op::AdaptiveAvgPool { .. } => Layer::AvgPool,
                Op::Linear(l) => {
                    let weight = model.weight(&format!("{}.weight", node.name))?;
                    let bias = model.weight(&format!("{}.bias", node.name))?;
                    // Input features arrive in NHWC order: permute the NCHW-ordered columns.
                    let (fi, fo) = (l.in_features, l.out_features);
                    let hw = h * w;
                    let mut v = vec![0.0; fi * fo];
                    for o in 0..fo {
                        for ch in 0..c {
                            for p in 0..hw {
                                v[o * fi + p * c + ch] = weight.data[o * fi + ch * hw + p];
                            }
                        }
                    }
                    Layer::Linear {
                        in_f: fi as i32,
                        out_f: fo as i32,
                        act: act_code(l.act),
                        w: up(&v)?,
                        b: up(&bias.data)?,
                    }
                }
            };
            nodes.push(Node {
                input: node.input,
                input_shape: info.input,
                output_shape: info.output,
                layer,
            });
        }
        let channel_gates = gating::channel_gates(model)?;
        for (i, followers) in gating::gateable(model) {
            let Some(cg) = &channel_gates[i] else {
                continue;
            };
            if cg.bias.len() > GATE_MAX {
                continue;
            }
            let gate = Gate {
                g: up(&cg.weight)?,
                gb: up(&cg.bias)?,
                followers,
            };
            if let Layer::Conv { gate: slot, .. } = &mut nodes[i].layer {
                *slot = Some(Box::new(gate));
            }
        }
        let gates = nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.layer {
                Layer::Conv { gate: Some(g), .. } => Some((i, g.followers.clone())),
                _ => None,
            })
            .collect();
        let i = model.desc.input;
        Ok(CudaExecutor {
            dev,
            kernels,
            nodes,
            input_shape: [i.channels, i.height, i.width],
            classes: model.desc.classes.len(),
            channel_round: DEFAULT_CHANNEL_ROUND,
            feeds_depthwise: feeds_depthwise(model),
            geometry: node_flops(model),
            gates,
            states: Mutex::new(HashMap::new()),
        })
    }

    /// The device this executor runs on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Per node: the convolution's worst-case plan shape `(cout, cin, tiling, depthwise)`,
    /// or `None` for nodes without a plan.
    pub fn conv_shapes(&self) -> Vec<Option<(usize, usize, Tiling, bool)>> {
        self.nodes
            .iter()
            .map(|n| match &n.layer {
                Layer::Conv { p, depthwise, .. } => Some((
                    p.cout as usize,
                    p.cin as usize,
                    Tiling {
                        g: p.g as usize,
                        tiles_w: p.tiles_w as usize,
                        tiles: p.tiles as usize,
                    },
                    *depthwise,
                )),
                _ => None,
            })
            .collect()
    }

    fn new_state(&self, batch: usize) -> Result<BatchState> {
        let s = &self.dev.stream;
        let alloc = |n: usize| {
            s.alloc_zeros::<f32>(n.max(1))
                .map_err(cuda_err("allocating activations"))
        };
        let [c, h, w] = self.input_shape;
        let mut values = vec![alloc(batch * c * h * w)?];
        let mut plans = Vec::new();
        for n in &self.nodes {
            let [oc, oh, ow] = n.output_shape;
            values.push(alloc(batch * oc * oh * ow)?);
            plans.push(match &n.layer {
                Layer::Conv { p, .. } => {
                    let mut pb = PlanBuffers::new(s, p, batch)?;
                    let dense =
                        vec![
                            SamplePlan::dense(p.cout as usize, p.cin as usize, p.tiles as usize);
                            batch
                        ];
                    pb.upload(s, p, &dense)?;
                    Some(pb)
                }
                _ => None,
            });
        }
        let ws_len = self
            .nodes
            .iter()
            .map(|n| match &n.layer {
                Layer::Conv { p, depthwise, .. } => p
                    .for_launch(batch, self.kernels.conv_blocks, *depthwise)
                    .workspace_len(),
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        let widest = self
            .nodes
            .iter()
            .map(|n| n.input_shape[0].max(n.output_shape[0]))
            .max()
            .unwrap_or(1);
        let mut keep = Vec::new();
        for n in &self.nodes {
            keep.push(match &n.layer {
                Layer::Conv {
                    p, gate: Some(_), ..
                } => Some(
                    s.clone_htod(&vec![p.cout; batch])
                        .map_err(cuda_err("allocating gate policies"))?,
                ),
                _ => None,
            });
        }
        Ok(BatchState {
            gated: false,
            policy: None,
            pooled: alloc(batch * widest)?,
            scores: alloc(batch * widest)?,
            flags: s
                .alloc_zeros::<i32>(batch * widest)
                .map_err(cuda_err("allocating gate buffers"))?,
            keep,
            workspace: alloc(ws_len)?,
            input: alloc(batch * c * h * w)?,
            values,
            plans,
            sparse: false,
            graphs: [None, None, None],
        })
    }

    /// Enqueues one forward pass (NCHW input buffer to logits value) on the stream.
    fn enqueue(&self, st: &mut BatchState, batch: usize) -> Result<()> {
        let s = &self.dev.stream;
        let k = &self.kernels;
        let e = cuda_err("launching a kernel");
        let [c, h, w] = self.input_shape;
        {
            let total = batch * c * h * w;
            let (nb, cb, hwb) = (batch as i32, c as i32, (h * w) as i32);
            let mut lb = s.launch_builder(&k.nchw_to_nhwc);
            lb.arg(&st.input)
                .arg(&mut st.values[0])
                .arg(&nb)
                .arg(&cb)
                .arg(&hwb);
            // SAFETY: matches nchw_to_nhwc(x, y, n, c, hw); both buffers hold `total`.
            unsafe { lb.launch(elementwise(total)) }.map_err(&e)?;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            // Node i reads earlier values and writes value i + 1.
            let (before, after) = st.values.split_at_mut(i + 1);
            let y = &mut after[0];
            let x = &before[node.input];
            let [ic, ih, iw] = node.input_shape;
            let [oc, oh, ow] = node.output_shape;
            match &node.layer {
                Layer::Conv {
                    p,
                    depthwise,
                    residual,
                    w,
                    b,
                    gate,
                } => {
                    if let (true, Some(g)) = (st.gated, gate) {
                        let keep = st.keep[i].as_ref().expect("gated nodes have policies");
                        self.enqueue_gate(
                            &mut st.plans,
                            &mut st.pooled,
                            &mut st.scores,
                            &mut st.flags,
                            keep,
                            i,
                            p,
                            g,
                            x,
                            batch,
                        )?;
                    }
                    let plan = st.plans[i].as_ref().expect("conv nodes have plans");
                    let res = residual.map(|r| &before[r]);
                    launch_conv(
                        s,
                        k,
                        p,
                        *depthwise,
                        batch,
                        x,
                        w,
                        b,
                        res,
                        y,
                        plan,
                        st.sparse && !st.gated,
                        &mut st.workspace,
                    )?;
                }
                Layer::MaxPool { k: kk, s: ss, pad } => {
                    let args = [
                        batch as i32,
                        ih as i32,
                        iw as i32,
                        ic as i32,
                        oh as i32,
                        ow as i32,
                        kk[0],
                        kk[1],
                        ss[0],
                        ss[1],
                        pad[0],
                        pad[1],
                    ];
                    let mut lb = s.launch_builder(&k.maxpool);
                    lb.arg(x).arg(&mut *y);
                    for a in &args {
                        lb.arg(a);
                    }
                    // SAFETY: matches maxpool_nhwc's signature.
                    unsafe { lb.launch(elementwise(batch * oc * oh * ow)) }.map_err(&e)?;
                }
                Layer::AvgPool => {
                    let args = [
                        batch as i32,
                        ih as i32,
                        iw as i32,
                        ic as i32,
                        oh as i32,
                        ow as i32,
                    ];
                    let mut lb = s.launch_builder(&k.avgpool);
                    lb.arg(x).arg(&mut *y);
                    for a in &args {
                        lb.arg(a);
                    }
                    // SAFETY: matches adaptive_avgpool_nhwc's signature.
                    unsafe { lb.launch(elementwise(batch * oc * oh * ow)) }.map_err(&e)?;
                }
                Layer::Linear {
                    in_f,
                    out_f,
                    act,
                    w,
                    b,
                } => {
                    let nb = batch as i32;
                    let warps = batch * *out_f as usize;
                    let cfg = LaunchConfig {
                        grid_dim: ((warps * 32).div_ceil(256) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut lb = s.launch_builder(&k.linear);
                    lb.arg(x)
                        .arg(w)
                        .arg(b)
                        .arg(&mut *y)
                        .arg(&nb)
                        .arg(in_f)
                        .arg(out_f)
                        .arg(act);
                    // SAFETY: matches linear's signature.
                    unsafe { lb.launch(cfg) }.map_err(&e)?;
                }
            }
        }
        Ok(())
    }

    /// Enqueues node `i`'s channel gate: pool its input, score its output channels over
    /// the kept inputs, rank, and write the decision to its plan and its followers'.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_gate(
        &self,
        plans: &mut [Option<PlanBuffers>],
        pooled: &mut CudaSlice<f32>,
        scores: &mut CudaSlice<f32>,
        flags: &mut CudaSlice<i32>,
        keep: &CudaSlice<i32>,
        i: usize,
        p: &ConvParams,
        g: &Gate,
        x: &CudaSlice<f32>,
        batch: usize,
    ) -> Result<()> {
        let s = &self.dev.stream;
        let k = &self.kernels;
        let e = cuda_err("launching a gate");
        let (hw, cin, cout, nb) = (p.h * p.w, p.cin, p.cout, batch as i32);
        s.memset_zeros(pooled).map_err(&e)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (cin as u32).div_ceil(32),
                (hw as u32).div_ceil(256).clamp(1, 64),
                batch as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = s.launch_builder(&k.gate_pool);
        lb.arg(x).arg(&mut *pooled).arg(&hw).arg(&cin);
        // SAFETY: matches gate_pool(x, pooled, hw, c); pooled holds batch × widest.
        unsafe { lb.launch(cfg) }.map_err(&e)?;

        let (head, tail) = plans.split_at_mut(i + 1);
        let own = head[i].as_mut().expect("conv nodes have plans");
        let cfg = LaunchConfig {
            grid_dim: ((batch * cout as usize * 32).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = s.launch_builder(&k.gate_fc);
        lb.arg(&*pooled)
            .arg(&g.g)
            .arg(&g.gb)
            .arg(&own.ic_idx)
            .arg(&own.ic_cnt)
            .arg(&mut *scores)
            .arg(&nb)
            .arg(&cin)
            .arg(&cout);
        // SAFETY: matches gate_fc's signature.
        unsafe { lb.launch(cfg) }.map_err(&e)?;

        let cfg = LaunchConfig {
            grid_dim: ((cout as u32).div_ceil(256), batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = s.launch_builder(&k.gate_rank);
        lb.arg(&*scores).arg(&cout).arg(keep).arg(&mut *flags);
        // SAFETY: matches gate_rank's signature; cout ≤ GATE_MAX was checked at load.
        unsafe { lb.launch(cfg) }.map_err(&e)?;

        let mut dests = PlanDests::default();
        dests.push(s, &mut own.oc_idx, &mut own.oc_cnt)?;
        for &(f, depthwise) in &g.followers {
            let dst = tail[f - i - 1]
                .as_mut()
                .expect("followers are convolutions");
            dests.push(s, &mut dst.ic_idx, &mut dst.ic_cnt)?;
            if depthwise {
                dests.push(s, &mut dst.oc_idx, &mut dst.oc_cnt)?;
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (batch as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = s.launch_builder(&k.gate_compact);
        lb.arg(&*flags).arg(&cout).arg(&dests);
        // SAFETY: matches gate_compact's signature; every destination list has this
        // layer's output channels as its stride (they are the same channels).
        unsafe { lb.launch(cfg) }.map_err(&e)?;
        Ok(())
    }

    /// Turns device-side channel gates on (`Some(keep)`: each gated layer keeps
    /// `keep × channels`, rounded up to `round` and at least `round`) or off (`None`:
    /// plans come from [`CudaExecutor::set_plans`] or are dense). Returns the number of
    /// gated layers.
    ///
    /// Not yet the CPU engine's semantics behind a depthwise layer: a channel dropped
    /// before one is a zero plane here too, but the constant the depthwise layer would
    /// make of it is not accounted for ([`gating::DroppedConstants`]: kept planes less
    /// their constant, read with a shifted bias), so gated MobileNetV2 /
    /// EfficientNet-Lite passes differ from the CPU engine's.
    pub fn set_channel_gates(
        &self,
        batch: usize,
        keep: Option<f64>,
        round: usize,
    ) -> Result<usize> {
        self.with_state(batch, |st| self.set_gates_in(st, batch, keep, round))
    }

    fn set_gates_in(
        &self,
        st: &mut BatchState,
        batch: usize,
        keep: Option<f64>,
        round: usize,
    ) -> Result<usize> {
        let dense: Vec<Option<Vec<SamplePlan>>> = self.dense_plans(batch);
        self.upload_plans(st, batch, &dense)?;
        st.gated = keep.is_some();
        st.policy = keep.map(|k| (k, round));
        let mut gated = 0;
        for (node, kbuf) in self.nodes.iter().zip(st.keep.iter_mut()) {
            if let (Layer::Conv { p, .. }, Some(kbuf)) = (&node.layer, kbuf) {
                gated += 1;
                let cout = p.cout as usize;
                let k = keep.map_or(cout, |f| gating::kept_count(cout, f, round));
                self.dev
                    .stream
                    .memcpy_htod(&vec![k as i32; batch], kbuf)
                    .map_err(cuda_err("setting gate policies"))?;
            }
        }
        Ok(gated)
    }

    /// Per node: `(input channels, input positions)` of each gated convolution, `None`
    /// elsewhere — what a gate's own FLOPs depend on.
    pub fn gate_shapes(&self) -> Vec<Option<(usize, usize)>> {
        self.nodes
            .iter()
            .map(|n| match &n.layer {
                Layer::Conv {
                    p, gate: Some(_), ..
                } => Some((p.cin as usize, (p.h * p.w) as usize)),
                _ => None,
            })
            .collect()
    }

    /// Rounds gated channel counts up to `round` (at least 1) in
    /// [`Executor::forward_with`].
    pub fn with_channel_round(mut self, round: usize) -> Self {
        self.channel_round = round.max(1);
        self
    }

    /// The keep ratio `policy` asks the device gates for (`None`: dense), or why this
    /// executor cannot run it: [`gate_ratio`] for this executor's model.
    pub fn gate_ratio(&self, policy: Policy) -> Result<Option<f64>> {
        checked_ratio(policy, self.feeds_depthwise)
    }

    /// FLOPs per sample of a pass whose device gates keep `keep` (rounded to `round`) of
    /// each gated layer's channels: `(executed, of which the gates')`. The gates keep
    /// exactly their count for every sample (`dynsparse cuda-check` checks this against
    /// the plans read back), so this needs nothing from the device.
    pub fn gated_flops(&self, keep: f64, round: usize) -> (u64, u64) {
        keep_flops(&self.geometry, &self.gates, keep, round)
    }

    fn dense_plans(&self, batch: usize) -> Vec<Option<Vec<SamplePlan>>> {
        self.nodes
            .iter()
            .map(|n| match &n.layer {
                Layer::Conv { p, .. } => Some(vec![
                    SamplePlan::dense(
                        p.cout as usize,
                        p.cin as usize,
                        p.tiles as usize
                    );
                    batch
                ]),
                _ => None,
            })
            .collect()
    }

    /// Reads the plans as they stand on the device (for checks and reports; a copy to the
    /// host, never part of a forward pass).
    pub fn read_plans(&self, batch: usize) -> Result<Vec<Option<Vec<SamplePlan>>>> {
        let s = self.dev.stream.clone();
        self.with_state(batch, |st| {
            let e = cuda_err("reading plans");
            let mut out = Vec::new();
            for (node, pb) in self.nodes.iter().zip(&st.plans) {
                let (Layer::Conv { p, .. }, Some(pb)) = (&node.layer, pb) else {
                    out.push(None);
                    continue;
                };
                let (cout, cin, tiles) = (p.cout as usize, p.cin as usize, p.tiles as usize);
                let oc = s.clone_dtoh(&pb.oc_idx).map_err(&e)?;
                let ic = s.clone_dtoh(&pb.ic_idx).map_err(&e)?;
                let ti = s.clone_dtoh(&pb.tile_idx).map_err(&e)?;
                let occ = s.clone_dtoh(&pb.oc_cnt).map_err(&e)?;
                let icc = s.clone_dtoh(&pb.ic_cnt).map_err(&e)?;
                let tic = s.clone_dtoh(&pb.tile_cnt).map_err(&e)?;
                s.synchronize().map_err(&e)?;
                let clamp = |c: i32, max: usize| (c.max(0) as usize).min(max);
                out.push(Some(
                    (0..batch)
                        .map(|n| SamplePlan {
                            oc: oc[n * cout..n * cout + clamp(occ[n], cout)].to_vec(),
                            ic: ic[n * cin..n * cin + clamp(icc[n], cin)].to_vec(),
                            tiles: ti[n * tiles..n * tiles + clamp(tic[n], tiles)].to_vec(),
                        })
                        .collect(),
                ));
            }
            Ok(out)
        })
    }

    fn with_state<T>(
        &self,
        batch: usize,
        f: impl FnOnce(&mut BatchState) -> Result<T>,
    ) -> Result<T> {
        let mut states = self
            .states
            .lock()
            .map_err(|_| Error::Cuda("executor state poisoned by an earlier panic".into()))?;
        let st = match states.entry(batch) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(self.new_state(batch)?),
        };
        f(st)
    }

    /// Sets what every sample computes in every convolution: `plans[node][sample]`
    /// (`None` entries for nodes without a plan). Copies into the device buffers only, and
    /// turns device-side gates off.
    pub fn set_plans(&self, batch: usize, plans: &[Option<Vec<SamplePlan>>]) -> Result<()> {
        self.with_state(batch, |st| {
            st.gated = false;
            st.policy = None;
            self.upload_plans(st, batch, plans)
        })
    }

    fn upload_plans(
        &self,
        st: &mut BatchState,
        batch: usize,
        plans: &[Option<Vec<SamplePlan>>],
    ) -> Result<()> {
        if plans.len() != self.nodes.len() {
            return Err(Error::Input(format!(
                "{} layer plans for {} nodes",
                plans.len(),
                self.nodes.len()
            )));
        }
        let mut sparse = false;
        for (i, (node, plan)) in self.nodes.iter().zip(plans).enumerate() {
            if let (Layer::Conv { p, depthwise, .. }, Some(pl)) = (&node.layer, plan) {
                if pl.len() != batch {
                    return Err(Error::Input(format!(
                        "node {i}: {} sample plans for batch {batch}",
                        pl.len()
                    )));
                }
                if *depthwise && pl.iter().any(|s| s.oc != s.ic) {
                    return Err(Error::Input(format!(
                        "node {i}: a depthwise plan keeps the same input and output channels"
                    )));
                }
                sparse |= pl
                    .iter()
                    .any(|s| !s.is_dense(p.cout as usize, p.cin as usize, p.tiles as usize));
                let buf = st.plans[i].as_mut().expect("conv nodes have plans");
                buf.upload(&self.dev.stream, p, pl)?;
            }
        }
        st.sparse = sparse;
        Ok(())
    }

    /// Copies `input` (NCHW) in, replays the captured pass (capturing it on first use for
    /// this batch size and plan kind), and copies the logits out.
    pub fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.check_input(input, batch)?;
        self.with_state(batch, |st| self.run_in(st, input, batch))
    }

    fn check_input(&self, input: &[f32], batch: usize) -> Result<()> {
        let [c, h, w] = self.input_shape;
        if input.len() != batch * c * h * w {
            return Err(Error::Input(format!(
                "{} input values for batch {batch} of {c}×{h}×{w}",
                input.len()
            )));
        }
        Ok(())
    }

    fn run_in(&self, st: &mut BatchState, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        let s = &self.dev.stream;
        s.memcpy_htod(input, &mut st.input)
            .map_err(cuda_err("copying the input"))?;
        self.replay(st, batch)?;
        let logits = st.values.last().expect("at least one node");
        let mut out = vec![0.0f32; batch * self.classes];
        s.memcpy_dtoh(logits, &mut out)
            .map_err(cuda_err("copying the logits"))?;
        s.synchronize().map_err(cuda_err("running the pass"))?;
        Ok(out)
    }

    fn replay(&self, st: &mut BatchState, batch: usize) -> Result<()> {
        let slot = if st.gated { 2 } else { st.sparse as usize };
        if st.graphs[slot].is_none() {
            let s = &self.dev.stream;
            s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(cuda_err("starting graph capture"))?;
            let enq = self.enqueue(st, batch);
            let graph = s
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .map_err(cuda_err("ending graph capture"))?;
            enq?;
            st.graphs[slot] = graph.map(Graph);
        }
        match &st.graphs[slot] {
            Some(g) => g.0.launch().map_err(cuda_err("replaying the graph")),
            None => self.enqueue(st, batch),
        }
    }

    /// Times `reps` replays of the captured pass for `batch` (plans as last set) with
    /// device events; returns each replay's milliseconds. Input and logits stay on the device.
    pub fn time_replays(&self, batch: usize, warmup: usize, reps: usize) -> Result<Vec<f32>> {
        let s = self.dev.stream.clone();
        self.with_state(batch, |st| {
            for _ in 0..warmup {
                self.replay(st, batch)?;
            }
            let e = cuda_err("timing");
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                let a = s
                    .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(&e)?;
                self.replay(st, batch)?;
                let b = s
                    .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(&e)?;
                b.synchronize().map_err(&e)?;
                times.push(a.elapsed_ms(&b).map_err(&e)?);
            }
            Ok(times)
        })
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }
}

impl Executor for CudaExecutor {
    fn name(&self) -> &'static str {
        "cuda"
    }

    /// A dense pass, whatever plans [`CudaExecutor::set_plans`] or the gates left.
    fn forward(&self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        Ok(self.forward_with(input, batch, Policy::Dense)?.logits)
    }

    /// Dense, or channel gates on the device keeping a ratio ([`CudaExecutor::gate_ratio`]
    /// says which policies run here). The gates' setting is uploaded when it changes, not
    /// per call, under the same lock as the pass, so concurrent callers with different
    /// policies each run their own; executed FLOPs come from
    /// [`CudaExecutor::gated_flops`].
    fn forward_with(&self, input: &[f32], batch: usize, policy: Policy) -> Result<Forward> {
        let keep = self.gate_ratio(policy)?;
        let round = self.channel_round;
        self.check_input(input, batch)?;
        let logits = self.with_state(batch, |st| {
            let stale = match keep {
                Some(k) => st.policy != Some((k, round)),
                None => st.gated || st.sparse,
            };
            if stale {
                self.set_gates_in(st, batch, keep, round)?;
            }
            self.run_in(st, input, batch)
        })?;
        let (flops, gate_flops) = match keep {
            Some(k) => {
                let (f, g) = self.gated_flops(k, round);
                (Some(vec![f; batch]), Some(vec![g; batch]))
            }
            None => (None, None),
        };
        Ok(Forward {
            logits,
            flops,
            gate_flops,
            ..Forward::default()
        })
    }
}
