//! The public face: load a model once, then classify images or tensors from any number
//! of threads.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};

use image::DynamicImage;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::exec::cpu::{EngineExecutor, ReferenceExecutor};
use crate::exec::cuda;
use crate::exec::{gating, Executor, Forward, Policy};
use crate::format::{Model, TensorData};
use crate::preprocess::preprocess;

/// How a [`Runtime`] runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Classes reported per prediction, best first.
    pub top_k: usize,
    /// Which executor computes the forward pass.
    pub engine: Engine,
    /// Worker threads for the forward pass; `None` uses rayon's global pool (one thread
    /// per core), on which passes start fastest where the calling thread is one of its
    /// workers ([`join_global_pool`]). With `Some(n)` the runtime owns a pool of `n`
    /// threads, so several runtimes can share a machine without oversubscribing it.
    pub threads: Option<usize>,
    /// Where the forward pass runs.
    pub device: DeviceChoice,
    /// What each forward pass computes: dense, or what the gates keep. On
    /// [`DeviceChoice::Cuda`] the gates keep a ratio ([`Policy::Keep`]) on models whose
    /// gated layers feed no depthwise layer ([`crate::exec::cuda::gate_ratio`]); other
    /// policies are refused there, and [`DeviceChoice::Auto`] runs gated passes on the CPU.
    pub policy: Policy,
    /// Report per-layer cost in [`Stats::layers`].
    pub layer_stats: bool,
    /// Kept channel counts of gated runs round up to multiples of this instead of the
    /// micro-kernel's row tile (on a GPU: instead of
    /// [`DEFAULT_CHANNEL_ROUND`](crate::exec::cuda::DEFAULT_CHANNEL_ROUND)): a hardware profile's granularity
    /// ([`crate::profile::Profile::channel_round_here`]), or the rounding a model's gates
    /// were trained with.
    pub channel_round: Option<usize>,
    /// Gated runs on the CPU choose kept channels in aligned groups of this many
    /// ([`EngineExecutor::with_channel_groups`]; `None` or 1: one by one). Refused on a
    /// GPU.
    pub channel_groups: Option<usize>,
    /// How long after each pass on the CPU pool its other workers keep spinning, ready for
    /// the next pass (they stop when it begins). An application that runs a pass every
    /// few milliseconds, a camera's frames, finds them running: on a VM a sleeping
    /// worker's vCPU is soon lent elsewhere, and the next pass ran as if on one thread or
    /// slower (MobileNetV2 at batch 1, one pass every 30 ms on the 2-vCPU Zen 5 VM: 3.5–4.5
    /// ms a pass without, 1.9–2.4 with 50 ms; back to back 1.9; ONNX Runtime, whose
    /// workers spin after a run too, 2.0–3.0). The price is a core kept busy meanwhile;
    /// `Duration::ZERO` lets the workers sleep at once
    /// ([`EngineExecutor::with_linger`]).
    pub linger: Duration,
}

/// [`Options::linger`] by default: longer than the gaps between a camera's frames (33 ms
/// at 30 per second), as ONNX Runtime's spinning covers 30 ms gaps but not 100.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(50);

impl Default for Options {
    fn default() -> Self {
        Options {
            top_k: 5,
            engine: Engine::Fast,
            threads: None,
            device: DeviceChoice::Auto,
            policy: Policy::Dense,
            layer_stats: false,
            channel_round: None,
            channel_groups: None,
            linger: DEFAULT_LINGER,
        }
    }
}

/// Where a [`Runtime`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first CUDA GPU when there is one (driver, device and NVRTC present), else the
    /// CPU; [`Runtime::device_note`] says why the CPU was chosen.
    #[default]
    Auto,
    /// The CPU, with [`Options::engine`].
    Cpu,
    /// The first CUDA GPU; an error when there is none.
    Cuda,
}

/// Executor choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// dynsparse's CPU engine: packed GEMM with SIMD micro-kernels chosen at run time.
    #[default]
    Fast,
    /// Candle's operations: slower, kept as an independent reference.
    Reference,
}

/// What to classify.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// One decoded image; preprocessed per the model file.
    Image(&'a DynamicImage),
    /// A batch of decoded images.
    Images(&'a [DynamicImage]),
    /// An already preprocessed NCHW f32 batch matching the model's input shape.
    Tensor(&'a TensorData),
}

impl<'a> From<&'a DynamicImage> for Input<'a> {
    fn from(i: &'a DynamicImage) -> Self {
        Input::Image(i)
    }
}
impl<'a> From<&'a [DynamicImage]> for Input<'a> {
    fn from(i: &'a [DynamicImage]) -> Self {
        Input::Images(i)
    }
}
impl<'a> From<&'a Vec<DynamicImage>> for Input<'a> {
    fn from(i: &'a Vec<DynamicImage>) -> Self {
        Input::Images(i)
    }
}
impl<'a> From<&'a TensorData> for Input<'a> {
    fn from(t: &'a TensorData) -> Self {
        Input::Tensor(t)
    }
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    /// Class index.
    pub class: usize,
    /// Class name from the model file.
    pub label: String,
    /// Softmax probability.
    pub prob: f32,
}

/// Cost of computing one prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// FLOPs of dense execution for this sample (2 per multiply-add).
    pub flops_dense: u64,
    /// FLOPs actually executed for this sample, the gates' included.
    pub flops_executed: u64,
    /// Of those, FLOPs the gates spent deciding what to compute.
    pub flops_gates: u64,
    /// Wall time of the forward pass that computed this sample (shared by its batch),
    /// preprocessing excluded.
    pub latency_ms: f64,
    /// Samples in that forward pass.
    pub batch_size: usize,
    /// The executor that ran it.
    pub executor: &'static str,
    /// Per layer, in graph order, with [`Options::layer_stats`] (and an executor that
    /// traces layers); empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerStats>,
}

/// Cost of one layer for one sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerStats {
    /// Node name in the model file.
    pub name: String,
    /// Output channels computed, of `channels`.
    pub kept_channels: usize,
    /// Output channels of the layer.
    pub channels: usize,
    /// Output tiles computed, of `tiles`; both 0 for layers without a spatial gate.
    pub kept_tiles: usize,
    /// Output tiles of a layer with a spatial gate.
    pub tiles: usize,
    /// FLOPs executed, the layer's gates included.
    pub flops: u64,
    /// Dense FLOPs of the layer.
    pub flops_dense: u64,
    /// Wall time of the layer for the whole batch.
    pub ms: f64,
    /// Of which its gates took deciding.
    pub gate_ms: f64,
}

/// The result for one input sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The `top_k` most probable classes, best first.
    pub top: Vec<ClassScore>,
    /// Raw class scores.
    pub logits: Vec<f32>,
    /// Cost.
    pub stats: Stats,
}

/// A loaded model ready to classify. `Send + Sync`: share it between threads.
///
/// ```
/// use dynsparse::{demo, preprocess::decode_image, Input, Options, Runtime, TensorData};
/// let rt = Runtime::from_bytes(demo::MODEL, Options { top_k: 3, ..Options::default() })?;
/// // A batch of images: one prediction per image, in order.
/// let imgs = demo::SAMPLES.iter().map(|(_, png)| decode_image(png)).collect::<Result<Vec<_>, _>>()?;
/// let preds = rt.infer(&imgs)?;
/// assert_eq!(preds.len(), imgs.len());
/// assert_eq!(preds[0].top.len(), 3);
/// // An already preprocessed NCHW tensor of the model's input shape.
/// let t = TensorData::new(vec![2, 3, 64, 64], vec![0.0; 2 * 3 * 64 * 64])?;
/// let preds = rt.infer(Input::Tensor(&t))?;
/// assert_eq!(preds[1].logits.len(), rt.model().desc.classes.len());
/// // A tensor of the wrong shape is an error, not a panic.
/// let bad = TensorData::new(vec![1, 3, 28, 28], vec![0.0; 3 * 28 * 28])?;
/// assert!(rt.infer(Input::Tensor(&bad)).is_err());
/// # Ok::<(), dynsparse::Error>(())
/// ```
pub struct Runtime {
    model: Model,
    executor: Box<dyn Executor>,
    options: Options,
    pool: Option<rayon::ThreadPool>,
    device_note: Option<String>,
}

impl Runtime {
    /// Loads a model file written by `dynsparse convert`.
    pub fn load(path: impl AsRef<Path>, options: Options) -> Result<Self> {
        Self::new(Model::load(path)?, options)
    }

    /// Loads a model file held in memory (for example [`crate::demo::MODEL`]).
    pub fn from_bytes(bytes: &[u8], options: Options) -> Result<Self> {
        Self::new(Model::from_bytes(bytes)?, options)
    }

    /// Wraps an already loaded model.
    pub fn new(model: Model, options: Options) -> Result<Self> {
        let cpu = |model: &Model| -> Result<Box<dyn Executor>> {
            Ok(match options.engine {
                Engine::Fast => {
                    let mut engine = EngineExecutor::new(model)?.with_linger(options.linger);
                    engine = match options.channel_round {
                        Some(0) => {
                            return Err(Error::Input("channel_round must be at least 1".into()))
                        }
                        Some(r) => engine.with_channel_round(r),
                        None => engine,
                    };
                    Box::new(match options.channel_groups {
                        Some(0) => {
                            return Err(Error::Input("channel_groups must be at least 1".into()))
                        }
                        Some(g) => engine.with_channel_groups(g),
                        None => engine,
                    })
                }
                Engine::Reference => Box::new(ReferenceExecutor::new(model)?),
            })
        };
        let cuda = |model: &Model| -> Result<Box<dyn Executor>> {
            if options.channel_groups.is_some() {
                return Err(Error::Input(
                    "channel groups are chosen by the CPU engine's gates; the CUDA gates \
                     keep channels one by one"
                        .into(),
                ));
            }
            // A policy the device gates cannot run is refused before looking for a GPU.
            cuda::gate_ratio(model, options.policy)?;
            let dev = cuda::Device::open(0)?;
            let mut exec = cuda::CudaExecutor::new(model, dev)?;
            exec = match options.channel_round {
                Some(0) => return Err(Error::Input("channel_round must be at least 1".into())),
                Some(r) => exec.with_channel_round(r),
                None => exec,
            };
            Ok(Box::new(exec))
        };
        options.policy.validate()?;
        let dynamic = options.policy != Policy::Dense;
        let (executor, device_note) = match options.device {
            DeviceChoice::Cpu => (cpu(&model)?, None),
            DeviceChoice::Cuda => (cuda(&model)?, None),
            DeviceChoice::Auto if options.engine == Engine::Reference => (cpu(&model)?, None),
            DeviceChoice::Auto if dynamic => (
                cpu(&model)?,
                (cuda::device_count() > 0).then(|| {
                    "gated execution runs on the CPU unless the CUDA device is asked for"
                        .to_string()
                }),
            ),
            DeviceChoice::Auto => {
                if cuda::device_count() == 0 {
                    (
                        cpu(&model)?,
                        Some("no CUDA GPU found; running on the CPU".to_string()),
                    )
                } else {
                    match cuda(&model) {
                        Ok(e) => (e, None),
                        Err(e) => (cpu(&model)?, Some(format!("{e}; running on the CPU"))),
                    }
                }
            }
        };
        let pool = match options.threads {
            None => None,
            Some(0) => return Err(Error::Input("threads must be at least 1".into())),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| Error::Exec(format!("cannot start {n} threads: {e}")))?,
            ),
        };
        Ok(Runtime {
            model,
            executor,
            options,
            pool,
            device_note,
        })
    }

    /// Why [`DeviceChoice::Auto`] fell back to the CPU, if it did.
    pub fn device_note(&self) -> Option<&str> {
        self.device_note.as_deref()
    }

    /// The loaded model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Classifies one image, a batch of images or a preprocessed tensor; returns one
    /// prediction per sample, in order.
    pub fn infer<'a>(&self, input: impl Into<Input<'a>>) -> Result<Vec<Prediction>> {
        let spec = self.model.desc.input;
        // A tensor is read where it is: copying it cost a pass over the input (4.8 MB at
        // batch 8 of 224×224) outside the timed forward pass but inside the call.
        let (data, batch): (Cow<[f32]>, usize) = match input.into() {
            Input::Image(img) => (preprocess(img, &self.model.desc.preprocess)?.into(), 1),
            Input::Images(imgs) => {
                let mut data = Vec::new();
                for img in imgs {
                    data.extend(preprocess(img, &self.model.desc.preprocess)?);
                }
                (data.into(), imgs.len())
            }
            Input::Tensor(t) => {
                let want = [spec.channels, spec.height, spec.width];
                if t.shape.len() != 4 || t.shape[1..] != want || t.shape[0] == 0 {
                    return Err(Error::Input(format!(
                        "tensor shape {:?} does not match the model's input N×{}×{}×{}",
                        t.shape, want[0], want[1], want[2]
                    )));
                }
                if t.data.len() != t.shape.iter().product::<usize>() {
                    return Err(Error::Input("tensor data does not fill its shape".into()));
                }
                // A pass without early exit first, which vectorizes (a search for the first
                // bad value tests and branches per value); the index only when there is one.
                let bad = t
                    .data
                    .chunks(4096)
                    .any(|c| c.iter().fold(0u32, |m, v| m | u32::from(!v.is_finite())) != 0);
                let first_bad = bad.then(|| t.data.iter().position(|v| !v.is_finite()));
                if let Some(i) = first_bad.flatten() {
                    return Err(Error::Input(format!(
                        "tensor holds a non-finite value ({}) at index {i}",
                        t.data[i]
                    )));
                }
                (Cow::Borrowed(&t.data[..]), t.shape[0])
            }
        };
        if batch == 0 {
            return Err(Error::Input("empty batch".into()));
        }
        let start = Instant::now();
        let policy = self.options.policy;
        let mut fwd = match &self.pool {
            Some(pool) => pool.install(|| self.executor.forward_with(&data, batch, policy))?,
            None => self.executor.forward_with(&data, batch, policy)?,
        };
        let logits = std::mem::take(&mut fwd.logits);
        let latency_ms = start.elapsed().as_secs_f64() * 1e3;
        let classes = self.model.desc.classes.len();
        if logits.len() != batch * classes {
            return Err(Error::Exec(format!(
                "executor returned {} logits for {batch} × {classes}",
                logits.len()
            )));
        }
        let flops = self.model.flops_per_sample();
        Ok(logits
            .chunks_exact(classes)
            .enumerate()
            .map(|(i, l)| Prediction {
                top: self.top_k(l),
                logits: l.to_vec(),
                stats: Stats {
                    flops_dense: flops,
                    flops_executed: fwd.flops.as_ref().map_or(flops, |f| f[i]),
                    flops_gates: fwd.gate_flops.as_ref().map_or(0, |f| f[i]),
                    latency_ms,
                    batch_size: batch,
                    executor: self.executor.name(),
                    layers: if self.options.layer_stats {
                        self.layer_stats(&fwd, i)
                    } else {
                        Vec::new()
                    },
                },
            })
            .collect())
    }

    fn layer_stats(&self, fwd: &Forward, sample: usize) -> Vec<LayerStats> {
        let nodes = &self.model.desc.nodes;
        fwd.layers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let info = &self.model.layers[i];
                let channels = info.output[0];
                let at = |v: &[Option<Vec<Vec<usize>>>]| {
                    v.get(i).and_then(|k| k.as_ref()).map(|k| k[sample].len())
                };
                let tiling = at(&fwd.tiles).and(gating::cpu_tiling(info.output[1], info.output[2]));
                LayerStats {
                    name: nodes[i].name.clone(),
                    kept_channels: at(&fwd.kept).unwrap_or(channels),
                    channels,
                    kept_tiles: at(&fwd.tiles).unwrap_or(0),
                    tiles: tiling.map_or(0, |t| t.tiles),
                    flops: t.flops.get(sample).copied().unwrap_or(info.flops),
                    flops_dense: info.flops,
                    ms: t.ms,
                    gate_ms: t.gate_ms,
                }
            })
            .collect()
    }

    fn top_k(&self, logits: &[f32]) -> Vec<ClassScore> {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let exp: Vec<f64> = logits.iter().map(|&v| ((v - max) as f64).exp()).collect();
        let sum: f64 = exp.iter().sum();
        best_classes(logits, self.options.top_k)
            .into_iter()
            .map(|i| ClassScore {
                class: i,
                label: self.model.desc.classes[i].clone(),
                prob: (exp[i] / sum) as f32,
            })
            .collect()
    }
}

/// Makes the calling thread worker 0 of rayon's global pool, of `threads` workers in all
/// (`None`: rayon's default, one per core or `RAYON_NUM_THREADS`), so that a
/// [`Runtime`] without a pool of its own ([`Options::threads`] `None`) runs each pass on
/// the thread that calls [`Runtime::infer`], the others joining it. Otherwise the pass is
/// handed to a pool thread while the caller sleeps, and each call pays two thread
/// wake-ups: the pool thread's at the start and the caller's at the end. On this
/// project's 2-vCPU VM the end of a MobileNetV2 pass took 15–21 µs between the last
/// layer and the return, 2.5–3.5 µs with the caller as a worker; the start 17–26 µs
/// against 12.5–17 (medians of 400 passes each way, batch 1).
///
/// Call it once, first in `main`, before anything else uses rayon; a global pool that
/// already exists is an error. The calling thread stays in the pool for the process's
/// life.
///
/// ```no_run
/// use dynsparse::{Options, Runtime};
/// dynsparse::join_global_pool(None)?;
/// let rt = Runtime::from_bytes(dynsparse::demo::MODEL, Options::default())?;
/// # Ok::<(), dynsparse::Error>(())
/// ```
pub fn join_global_pool(threads: Option<usize>) -> Result<()> {
    if threads == Some(0) {
        return Err(Error::Input("threads must be at least 1".into()));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .use_current_thread()
        .build_global()
        .map_err(|e| {
            Error::Exec(format!(
                "cannot make this thread a worker of the global pool: {e}"
            ))
        })
}

/// The `k` classes of the highest logits, best first, ties by class index (as a stable
/// sort of every class orders them). They are picked out before they are sorted: sorting
/// all 1000 ImageNet classes took 12 µs a sample.
fn best_classes(logits: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let better = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, better);
        order.truncate(k);
    }
    order.sort_unstable_by(better);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Against every class sorted by a stable sort, best first: random logits drawn from
    /// a few values (many ties), with infinities and NaNs, every k from none to past the
    /// number of classes.
    #[test]
    fn the_best_classes_come_as_a_stable_sort_orders_them() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let values = [
            -1.0,
            0.0,
            0.5,
            2.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for _ in 0..500 {
            let n = rng.random_range(1..60);
            let logits: Vec<f32> = (0..n)
                .map(|_| values[rng.random_range(0..values.len())])
                .collect();
            let mut all: Vec<usize> = (0..n).collect();
            all.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            for k in 0..=n + 1 {
                let want: Vec<usize> = all.iter().copied().take(k).collect();
                assert_eq!(best_classes(&logits, k), want, "{logits:?}, k {k}");
            }
        }
    }
}
