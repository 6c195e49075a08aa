//! The benchmark harness behind `dynsparse bench`: one model, several policies, timed
//! in one process with the policies interleaved, so that drift on a shared machine hits
//! all of them alike and every ratio to dense comes from the same run.
//!
//! Policies take turns in visits: a few untimed passes ([`Config::settle`]), then
//! [`Config::visit`] timed ones, then the next policy. An application runs one policy
//! pass after pass, its weights and buffers warm in the caches; each policy here has its
//! own runtime, and a pass right after another policy's finds the caches holding that
//! runtime's weights and buffers instead. Switching policy every pass (`visit: 1, settle:
//! 0`) put MobileNetV2's budget 0.5 at 0.70–0.71 of its dense time at batch 1 (2
//! threads), turns at 0.64–0.69, both policies running faster in turns (four rounds).
//!
//! ```
//! use dynsparse::bench::{self, Config};
//! use dynsparse::{demo, Model, Policy};
//! let model = Model::from_bytes(demo::MODEL)?;
//! // Real inputs (optional): timed batches are made of them, and each policy's top-1
//! // agreement with dense over all of them is reported.
//! let images = demo::heldout()?.into_iter().take(8).map(|(img, _)| img).collect();
//! let config = Config {
//!     batches: vec![1],
//!     policies: vec![("keep 0.5".into(), Policy::Keep(0.5))],
//!     runs: 3,
//!     warmup: 1,
//!     visit: 3,
//!     settle: 1,
//!     threads: Some(1),
//!     device: dynsparse::DeviceChoice::Cpu,
//!     channel_round: None,
//!     channel_groups: None,
//!     images,
//!     labels: Vec::new(),
//!     gap: std::time::Duration::ZERO,
//!     linger: dynsparse::DEFAULT_LINGER,
//! };
//! let report = bench::run(&model, &config, |_, _| {})?;
//! // Dense comes first, then each policy; ratios are to the dense median.
//! assert_eq!(report.results[0].policy, "dense");
//! assert!(report.results[1].flops_fraction < 1.0);
//! assert!(report.markdown().contains("keep 0.5"));
//! assert_eq!(report.quality[0].agreement, 1.0);
//! assert!(report.quality_markdown().contains("keep 0.5"));
//! // The CPU engine's ceiling, timed after each turn, that per-layer rates are read against.
//! let peak = report.kernel_peak.expect("timed on the CPU engine");
//! assert!(peak.median_gflops > 0.0 && peak.bursts >= 1);
//! # Ok::<(), dynsparse::Error>(())
//! ```

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::exec::Policy;
use crate::format::{Model, TensorData};
use crate::runtime::{DeviceChoice, Input, Options, Runtime};

/// What to time.
#[derive(Debug, Clone)]
pub struct Config {
    /// Batch sizes, each timed separately.
    pub batches: Vec<usize>,
    /// Labelled policies to time beside dense (dense is always timed, first).
    pub policies: Vec<(String, Policy)>,
    /// Timed runs per policy and batch.
    pub runs: usize,
    /// Untimed runs per policy and batch, first.
    pub warmup: usize,
    /// Timed runs in a row per policy before the next policy's turn (at least 1).
    pub visit: usize,
    /// Untimed runs opening each turn, so that the timed ones find the caches as that
    /// policy's previous pass left them.
    pub settle: usize,
    /// Worker threads (`None`: one per core).
    pub threads: Option<usize>,
    /// Where to run. On [`DeviceChoice::Cuda`] the policies must be ones the device gates
    /// run (dense, or a keep ratio on a model whose gates feed no depthwise layer; see
    /// `CudaExecutor::gate_ratio`), else the run stops at once with the reason, as it does
    /// without a GPU. Per-layer times are the CPU's only.
    pub device: DeviceChoice,
    /// Kept channel counts round to this (see [`Options::channel_round`]).
    pub channel_round: Option<usize>,
    /// Kept channels are chosen in aligned groups of this many (see
    /// [`Options::channel_groups`]).
    pub channel_groups: Option<usize>,
    /// Real inputs: when given, the timed batches are made of them (cycled) instead of
    /// pseudo-random values, and every policy's top-1 agreement with dense over all of
    /// them is reported ([`Report::quality`]).
    pub images: Vec<image::DynamicImage>,
    /// The class of each of `images`, when known (empty otherwise): accuracy is then
    /// reported beside agreement.
    pub labels: Vec<usize>,
    /// A pause before each timed run (`Duration::ZERO`: none, runs back to back): what an
    /// application sees that runs a pass now and then, as on a camera's frames every
    /// 33 ms. Back to back, the workers are always awake; after a pause they have to be
    /// lingering ([`Config::linger`]) or be woken, and on a VM their vCPUs may have been
    /// lent elsewhere meanwhile.
    pub gap: Duration,
    /// How long the workers spin after each pass ([`Options::linger`]).
    pub linger: Duration,
}

/// One policy's quality against cost on [`Config::images`].
#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    pub policy: String,
    /// Images compared.
    pub images: usize,
    /// Fraction whose top-1 class equals dense execution's.
    pub agreement: f64,
    /// Fraction whose top-1 class is the label, with [`Config::labels`].
    pub accuracy: Option<f64>,
    /// Executed FLOPs over dense, averaged over the images (gates included).
    pub flops_fraction: f64,
}

/// One policy at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyResult {
    pub policy: String,
    pub batch: usize,
    /// Forward-pass wall time of the whole batch: median, 10th and 90th percentile.
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    /// Time over dense's: the median, over the runs, of each run's time over the time
    /// of the dense run in the same place of the same round (the same turn's `k`-th
    /// timed run). Policies alternate in short turns, so each ratio compares two runs
    /// close in time; on a shared machine whose speed changes over seconds (this
    /// project's 2-core VM ran at half speed for stretches), a ratio of two medians
    /// could pair a fast stretch with a slow one.
    pub vs_dense: f64,
    /// 10th and 90th percentile of those per-round ratios.
    pub vs_dense_p10: f64,
    pub vs_dense_p90: f64,
    /// FLOPs executed per sample (gates included), averaged over the batch.
    pub flops_executed: f64,
    /// Of those, the gates' own.
    pub flops_gates: f64,
    /// `flops_executed` over the dense FLOPs.
    pub flops_fraction: f64,
    /// Executed FLOPs of the batch over the median time.
    pub gflops_per_s: f64,
    /// Sum over layers of the median time the gates took deciding (summed over the
    /// samples of the batch).
    pub gate_ms: f64,
    /// Per layer, in graph order: median time and the first sample's costs.
    pub layers: Vec<LayerResult>,
}

/// One layer under one policy.
#[derive(Debug, Clone, Serialize)]
pub struct LayerResult {
    pub name: String,
    /// Median wall time for the batch.
    pub ms: f64,
    /// Median time its gates took.
    pub gate_ms: f64,
    /// FLOPs executed for the first sample, gates included.
    pub flops: u64,
    pub flops_dense: u64,
    pub kept_channels: usize,
    pub channels: usize,
    pub kept_tiles: usize,
    pub tiles: usize,
}

/// Everything one `run` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub executor: String,
    pub threads: usize,
    pub runs: usize,
    /// Timed runs per turn ([`Config::visit`]) and the untimed ones opening it.
    pub visit: usize,
    pub settle: usize,
    /// The pause before each timed run ([`Config::gap`]) and the workers' linger after
    /// each pass ([`Config::linger`]), in milliseconds.
    pub gap_ms: f64,
    pub linger_ms: f64,
    pub flops_dense: u64,
    /// Kept channel counts' rounding, when set ([`Config::channel_round`]; otherwise the
    /// micro-kernel's rows).
    pub channel_round: Option<usize>,
    /// The groups kept channels were chosen in, when set ([`Config::channel_groups`]).
    pub channel_groups: Option<usize>,
    /// Per batch: dense first, then the policies in the order given.
    pub results: Vec<PolicyResult>,
    /// Per policy (dense first), on the images given; empty without images.
    pub quality: Vec<Quality>,
    /// Dense peers on the same weights and input, when timed (`dynsparse bench --peers`).
    pub peers: Vec<PeerResult>,
    /// The CPU micro-kernel's ceiling on the run's threads, timed in a short burst after
    /// every turn of the policies; `None` off the CPU engine.
    pub kernel_peak: Option<KernelPeak>,
}

/// The micro-kernel's GFLOP/s in all of the run's threads over L1-resident operands
/// ([`crate::exec::cpu::peak::burst`]): what a layer could reach in the same minutes.
#[derive(Debug, Clone, Serialize)]
pub struct KernelPeak {
    /// Median over the bursts, and their 10th and 90th percentile.
    pub median_gflops: f64,
    pub p10_gflops: f64,
    pub p90_gflops: f64,
    pub bursts: usize,
}

/// Micro-tiles per thread in one burst of the peak: about 20 ms at 150 GFLOP/s a
/// thread, long enough that thread start-up and the vector units' wake-up do not count.
const PEAK_REPS: usize = 20_000;

/// The peak's p90 over its p10 beyond which a report says the machine changed speed
/// during the run.
const UNSTEADY_PEAK: f64 = 1.3;

/// A dense peer runtime (ONNX Runtime, PyTorch) at one batch size, timed on the same
/// weights and the same input after our runs (not interleaved with them).
#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    pub peer: String,
    pub batch: usize,
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    /// max |peer − ours| / max |ours| over the first sample's dense logits: a check that
    /// the peer computes what we compute. NaN when the peer's logits are not all finite
    /// (FP16 overflows on some random-weight networks).
    pub logits_rel_diff: f64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Each round's time over the dense run's of the same round, sorted.
fn round_ratios(times: &[f64], dense: &[f64]) -> Vec<f64> {
    let mut r: Vec<f64> = times.iter().zip(dense).map(|(t, d)| t / d).collect();
    r.sort_by(f64::total_cmp);
    r
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    quantile(&s, 0.5)
}

/// The deterministic pseudo-random input in [-1, 1) the harness times without images:
/// value `i` is `((i · 2654435761) mod 2³² >> 8) / 2²³ − 1`.
pub fn input(model: &Model, batch: usize) -> Result<TensorData> {
    let s = model.desc.input;
    let n = batch * s.channels * s.height * s.width;
    let data = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect();
    TensorData::new(vec![batch, s.channels, s.height, s.width], data)
}

/// Times `config` on `model` on [`Config::device`]. `progress(done, total)` is called
/// after every timed or warm-up pass.
pub fn run(
    model: &Model,
    config: &Config,
    mut progress: impl FnMut(usize, usize),
) -> Result<Report> {
    if config.runs == 0 {
        return Err(Error::Input("runs must be at least 1".into()));
    }
    if config.visit == 0 {
        return Err(Error::Input("a visit must time at least 1 run".into()));
    }
    if !config.labels.is_empty() && config.labels.len() != config.images.len() {
        return Err(Error::Input(format!(
            "{} labels for {} images",
            config.labels.len(),
            config.images.len()
        )));
    }
    if config.batches.is_empty() || config.batches.contains(&0) {
        return Err(Error::Input("batch sizes must be at least 1".into()));
    }
    if config.device == DeviceChoice::Cuda {
        // Every policy the device gates cannot run is refused before the first runtime
        // looks for a GPU.
        for (label, policy) in &config.policies {
            crate::exec::cuda::gate_ratio(model, *policy).map_err(|e| match e {
                Error::Input(why) => Error::Input(format!("`{label}` on the GPU: {why}")),
                other => other,
            })?;
        }
    }
    let mut policies = vec![("dense".to_string(), Policy::Dense)];
    policies.extend(config.policies.iter().cloned());
    let runtimes = policies
        .iter()
        .map(|(_, policy)| {
            let options = Options {
                top_k: 1,
                threads: config.threads,
                device: config.device,
                policy: *policy,
                layer_stats: true,
                channel_round: config.channel_round,
                channel_groups: config.channel_groups,
                linger: config.linger,
                ..Options::default()
            };
            Runtime::new(model.clone(), options)
        })
        .collect::<Result<Vec<_>>>()?;
    let turns = config.runs.div_ceil(config.visit);
    let total = config.batches.len()
        * policies.len()
        * (config.warmup + config.runs + turns * config.settle);
    let mut done = 0;
    let mut results = Vec::new();
    let mut executor = String::new();
    let threads = config.threads.unwrap_or_else(rayon::current_num_threads);
    let mut peaks = Vec::new();
    // A burst of the micro-kernel on the run's threads, once the first pass has named
    // the executor as the CPU engine.
    let time_peak = |executor: &str, peaks: &mut Vec<f64>| {
        if executor.starts_with("cpu-engine") {
            let isa = crate::exec::cpu::gemm::Isa::detect();
            peaks.push(crate::exec::cpu::peak::burst(isa, threads, PEAK_REPS));
        }
    };
    for &batch in &config.batches {
        let x = if config.images.is_empty() {
            input(model, batch)?
        } else {
            let s = model.desc.input;
            let mut data = Vec::with_capacity(batch * s.channels * s.height * s.width);
            for img in config.images.iter().cycle().take(batch) {
                data.extend(crate::preprocess::preprocess(img, &model.desc.preprocess)?);
            }
            TensorData::new(vec![batch, s.channels, s.height, s.width], data)?
        };
        for rt in &runtimes {
            for _ in 0..config.warmup {
                rt.infer(Input::Tensor(&x))?;
                done += 1;
                progress(done, total);
            }
        }
        // Per policy: times, per-layer times, per-layer gate times; and the last stats.
        let mut times = vec![Vec::with_capacity(config.runs); runtimes.len()];
        let mut layer_ms = vec![vec![Vec::new(); model.desc.nodes.len()]; runtimes.len()];
        let mut gate_ms = vec![vec![Vec::new(); model.desc.nodes.len()]; runtimes.len()];
        let mut last = vec![None; runtimes.len()];
        for turn in 0..turns {
            if turn > 0 {
                time_peak(&executor, &mut peaks);
            }
            let timed = config.visit.min(config.runs - turn * config.visit);
            for (p, rt) in runtimes.iter().enumerate() {
                for _ in 0..config.settle {
                    rt.infer(Input::Tensor(&x))?;
                    done += 1;
                    progress(done, total);
                }
                for _ in 0..timed {
                    if !config.gap.is_zero() {
                        std::thread::sleep(config.gap);
                    }
                    let preds = rt.infer(Input::Tensor(&x))?;
                    let stats = &preds[0].stats;
                    times[p].push(stats.latency_ms);
                    for (i, l) in stats.layers.iter().enumerate() {
                        layer_ms[p][i].push(l.ms);
                        gate_ms[p][i].push(l.gate_ms);
                    }
                    executor = stats.executor.to_string();
                    last[p] = Some(preds);
                    done += 1;
                    progress(done, total);
                }
            }
        }
        time_peak(&executor, &mut peaks);
        for (p, (label, _)) in policies.iter().enumerate() {
            let mut sorted = times[p].clone();
            sorted.sort_by(f64::total_cmp);
            let ratios = round_ratios(&times[p], &times[0]);
            let preds = last[p].take().unwrap_or_default();
            let n = preds.len().max(1) as f64;
            let flops_executed = preds
                .iter()
                .map(|q| q.stats.flops_executed as f64)
                .sum::<f64>()
                / n;
            let flops_gates = preds
                .iter()
                .map(|q| q.stats.flops_gates as f64)
                .sum::<f64>()
                / n;
            let dense = model.flops_per_sample();
            let med = quantile(&sorted, 0.5);
            let layers: Vec<LayerResult> = preds
                .first()
                .map(|q| {
                    q.stats
                        .layers
                        .iter()
                        .enumerate()
                        .map(|(i, l)| LayerResult {
                            name: l.name.clone(),
                            ms: median(&layer_ms[p][i]),
                            gate_ms: median(&gate_ms[p][i]),
                            flops: l.flops,
                            flops_dense: l.flops_dense,
                            kept_channels: l.kept_channels,
                            channels: l.channels,
                            kept_tiles: l.kept_tiles,
                            tiles: l.tiles,
                        })
                        .collect()
                })
                .unwrap_or_default();
            // `+ 0.0`: an empty sum of f64 is -0.0.
            let gate_ms = layers.iter().map(|l| l.gate_ms).sum::<f64>() + 0.0;
            results.push(PolicyResult {
                policy: label.clone(),
                batch,
                median_ms: med,
                p10_ms: quantile(&sorted, 0.1),
                p90_ms: quantile(&sorted, 0.9),
                vs_dense: quantile(&ratios, 0.5),
                vs_dense_p10: quantile(&ratios, 0.1),
                vs_dense_p90: quantile(&ratios, 0.9),
                flops_executed,
                flops_gates,
                flops_fraction: flops_executed / dense as f64,
                gflops_per_s: flops_executed * batch as f64 / (med * 1e6),
                gate_ms,
                layers,
            });
        }
    }
    let mut quality = Vec::new();
    let mut dense_top = Vec::new();
    for ((label, _), rt) in policies.iter().zip(&runtimes) {
        if config.images.is_empty() {
            break;
        }
        let (mut top, mut flops) = (Vec::new(), 0u64);
        for chunk in config.images.chunks(32) {
            for p in rt.infer(chunk)? {
                top.push(p.top[0].class);
                flops += p.stats.flops_executed;
            }
        }
        if dense_top.is_empty() {
            dense_top = top.clone();
        }
        let same = top.iter().zip(&dense_top).filter(|(a, b)| a == b).count();
        let n = top.len() as f64;
        let right = top
            .iter()
            .zip(&config.labels)
            .filter(|(a, b)| a == b)
            .count();
        quality.push(Quality {
            policy: label.clone(),
            images: top.len(),
            agreement: same as f64 / n,
            accuracy: (config.labels.len() == top.len()).then_some(right as f64 / n),
            flops_fraction: flops as f64 / n / model.flops_per_sample() as f64,
        });
    }
    peaks.sort_by(f64::total_cmp);
    let kernel_peak = (!peaks.is_empty()).then(|| KernelPeak {
        median_gflops: quantile(&peaks, 0.5),
        p10_gflops: quantile(&peaks, 0.1),
        p90_gflops: quantile(&peaks, 0.9),
        bursts: peaks.len(),
    });
    Ok(Report {
        quality,
        kernel_peak,
        peers: Vec::new(),
        model: model.desc.arch.clone(),
        executor,
        threads,
        runs: config.runs,
        visit: config.visit,
        settle: config.settle,
        gap_ms: config.gap.as_secs_f64() * 1e3,
        linger_ms: config.linger.as_secs_f64() * 1e3,
        flops_dense: model.flops_per_sample(),
        channel_round: config.channel_round,
        channel_groups: config.channel_groups,
        results,
    })
}

impl Report {
    /// One row per batch and policy.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| batch | policy | FLOPs executed | median ms | p10 ms | p90 ms | GFLOP/s | vs dense | vs dense p10–p90 | gates ms |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.results {
            s += &format!(
                "| {} | {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2}–{:.2} | {} |\n",
                r.batch,
                r.policy,
                r.flops_fraction,
                r.median_ms,
                r.p10_ms,
                r.p90_ms,
                r.gflops_per_s,
                r.vs_dense,
                r.vs_dense_p10,
                r.vs_dense_p90,
                // Executors without a per-layer trace (the GPU's) cannot say.
                if r.layers.is_empty() {
                    "n/a".to_string()
                } else {
                    format!("{:.2}", r.gate_ms)
                }
            );
        }
        s += &format!(
            "\nvs dense: the median over the runs of each run's time over the dense run in the \
             same place of the same round, and those ratios' 10th–90th percentile. Policies \
             take turns of {} timed run{} after {} untimed.\n",
            self.visit,
            if self.visit == 1 { "" } else { "s" },
            self.settle
        );
        if self.gap_ms > 0.0 {
            s += &format!(
                "Each timed run came {} ms after the last pass ended; the workers lingered {} ms \
                 after each pass.\n",
                self.gap_ms, self.linger_ms
            );
        }
        if self.results.iter().any(|r| r.batch > 1 && r.gate_ms > 0.0) {
            s += "gates ms: the time the gates took deciding, summed over a batch's samples; \
                  at batch > 1 samples run in parallel, one per core, so their share of the \
                  wall time is smaller.\n";
        }
        if let Some(p) = &self.kernel_peak {
            s += &format!(
                "Peak: the micro-kernel alone on {} thread{}, over operands in L1, {:.0} GFLOP/s \
                 (median of {} bursts between the turns, p10–p90 {:.0}–{:.0}); the machine's \
                 speed in the same minutes, which per-layer rates are read against.\n",
                self.threads,
                if self.threads == 1 { "" } else { "s" },
                p.median_gflops,
                p.bursts,
                p.p10_gflops,
                p.p90_gflops
            );
            if p.p90_gflops > UNSTEADY_PEAK * p.p10_gflops {
                s += &format!(
                    "The peak moved by more than {:.0}% during the run: the machine changed \
                     speed, so its absolute times mix stretches of different speeds; the \
                     paired ratios to dense hold better.\n",
                    100.0 * (UNSTEADY_PEAK - 1.0)
                );
            }
        }
        s
    }

    /// Per policy: top-1 agreement with dense on the given images and FLOPs on them,
    /// beside the median time against dense at each batch size.
    pub fn quality_markdown(&self) -> String {
        let batches: Vec<usize> = {
            let mut b: Vec<usize> = self.results.iter().map(|r| r.batch).collect();
            b.dedup();
            b
        };
        let labelled = self.quality.iter().any(|q| q.accuracy.is_some());
        let mut s = String::from("| policy | images | top-1 agreement with dense |");
        if labelled {
            s += " accuracy |";
        }
        s += " FLOPs executed |";
        for b in &batches {
            s += &format!(" time vs dense, batch {b} |");
        }
        s += "\n|---|---|---|---|";
        s += &"---|".repeat(batches.len() + usize::from(labelled));
        s += "\n";
        for q in &self.quality {
            s += &format!(
                "| {} | {} | {:.1}% |",
                q.policy,
                q.images,
                100.0 * q.agreement
            );
            if let Some(a) = q.accuracy {
                s += &format!(" {:.1}% |", 100.0 * a);
            }
            s += &format!(" {:.3} |", q.flops_fraction);
            for b in &batches {
                let t = self
                    .results
                    .iter()
                    .find(|r| r.batch == *b && r.policy == q.policy)
                    .map_or(f64::NAN, |r| r.vs_dense);
                s += &format!(" {t:.2} |");
            }
            s += "\n";
        }
        s
    }

    /// Per batch and peer: the peer's median and our dense and policies' medians over it.
    pub fn peers_markdown(&self) -> String {
        let policies: Vec<&str> = {
            let mut p: Vec<&str> = Vec::new();
            for r in &self.results {
                if !p.contains(&r.policy.as_str()) {
                    p.push(&r.policy);
                }
            }
            p
        };
        let mut s = String::from("| batch | peer | peer median ms |");
        for p in &policies {
            s += &format!(" ours {p} / peer |");
        }
        s += " logits vs ours |\n|---|---|---|";
        s += &"---|".repeat(policies.len() + 1);
        s += "\n";
        for peer in &self.peers {
            s += &format!("| {} | {} | {:.2} |", peer.batch, peer.peer, peer.median_ms);
            for p in &policies {
                let ours = self
                    .results
                    .iter()
                    .find(|r| r.batch == peer.batch && r.policy == *p)
                    .map_or(f64::NAN, |r| r.median_ms);
                s += &format!(" {:.2} |", ours / peer.median_ms);
            }
            if peer.logits_rel_diff.is_nan() {
                s += " not finite |\n";
            } else {
                s += &format!(" {:.1e} |\n", peer.logits_rel_diff);
            }
        }
        s
    }

    /// Per-layer median times at one batch size, a column per policy, with each layer's
    /// kept fraction of FLOPs under the last policy. With dense first and a gated policy
    /// last, also each layer's time under it against dense, and what it takes beyond its
    /// kept share of its dense time (`last − dense × kept`: zero where time falls with
    /// the FLOPs), then those summed, and the layers that lose most to that share.
    pub fn layers_markdown(&self, batch: usize) -> String {
        let rows: Vec<&PolicyResult> = self.results.iter().filter(|r| r.batch == batch).collect();
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return String::new();
        };
        let against_dense = rows.len() >= 2 && first.policy == "dense";
        let peak = self.kernel_peak.as_ref().map(|p| p.median_gflops);
        let mut s = format!("| layer | MFLOPs dense | {} GFLOP/s |", first.policy);
        if peak.is_some() {
            s += " % of kernel peak |";
        }
        for r in &rows {
            s += &format!(" {} ms |", r.policy);
        }
        s += " FLOPs kept (last) |";
        if against_dense {
            s += &format!(" {} / dense | beyond kept share, ms |", last.policy);
        }
        s += "\n|---|---|---|";
        s += &"---|".repeat(
            rows.len() + 1 + usize::from(peak.is_some()) + if against_dense { 2 } else { 0 },
        );
        s += "\n";
        let ms = |r: &PolicyResult, i: usize| r.layers.get(i).map_or(f64::NAN, |x| x.ms);
        // (layer, dense ms, last ms, kept share of dense ms)
        let mut shares: Vec<(&str, f64, f64, f64)> = Vec::new();
        let mut above_peak = false;
        for (i, l) in first.layers.iter().enumerate() {
            s += &format!("| {} | {:.1} |", l.name, l.flops_dense as f64 / 1e6);
            // The first policy's rate, over the FLOPs it executed for the whole batch.
            let gflops = (l.flops > 0 && ms(first, i) > 0.0)
                .then(|| l.flops as f64 * batch as f64 / (ms(first, i) * 1e6));
            match gflops {
                Some(g) => s += &format!(" {g:.0} |"),
                None => s += " – |",
            }
            if let Some(p) = peak {
                match gflops {
                    Some(g) => {
                        above_peak |= g > p;
                        s += &format!(" {:.0} |", 100.0 * g / p);
                    }
                    None => s += " – |",
                }
            }
            for r in &rows {
                s += &format!(" {:.3} |", ms(r, i));
            }
            let kept = last
                .layers
                .get(i)
                .filter(|x| x.flops_dense > 0)
                .map_or(1.0, |x| x.flops as f64 / x.flops_dense as f64);
            s += &format!(" {kept:.2} |");
            if against_dense {
                let (d, g) = (ms(first, i), ms(last, i));
                let ratio = if d > 0.0 {
                    format!("{:.2}", g / d)
                } else {
                    "–".into()
                };
                s += &format!(" {ratio} | {:.3} |", g - d * kept);
                shares.push((&l.name, d, g, d * kept));
            }
            s += "\n";
        }
        if against_dense {
            let sum = |f: fn(&(&str, f64, f64, f64)) -> f64| shares.iter().map(f).sum::<f64>();
            let (d, g, share) = (sum(|x| x.1), sum(|x| x.2), sum(|x| x.3));
            shares.sort_by(|a, b| (b.2 - b.3).total_cmp(&(a.2 - a.3)));
            let most: Vec<String> = shares
                .iter()
                .take(5)
                .map(|(n, _, g, k)| format!("{n} {:.3}", g - k))
                .collect();
            s += &format!(
                "\nSummed over layers: dense {d:.3} ms, {} {g:.3} ms ({:.2} of dense); at each \
                 layer's kept share of its dense time {share:.3} ms ({:.2}). Beyond that share \
                 most (ms): {}.\n",
                last.policy,
                g / d,
                share / d,
                most.join(", ")
            );
        }
        let banded = (0..first.layers.len()).any(|i| {
            first.layers[i].flops_dense > 0
                && rows
                    .iter()
                    .all(|r| r.layers.get(i).is_some_and(|x| x.ms == 0.0))
        });
        if above_peak {
            s += "\nAbove 100% of the peak: a layer that does fewer multiply-adds than the \
                  direct convolution counted here (Winograd's F(2×2, 3×3) on a stride-1 3×3 \
                  layer does 4/9 of them, F(4×4, 3×3) 1/4).\n";
        }
        if banded {
            s += "\nA layer at 0.000 ms in every column ran inside the 1×1 expansion above it, \
                  band by band; that row's time includes it.\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a gap, each timed run waits it out first, and the report says so.
    #[test]
    fn a_gap_comes_before_every_timed_run() {
        let model = Model::from_bytes(crate::demo::MODEL).unwrap();
        let config = Config {
            batches: vec![1],
            policies: Vec::new(),
            runs: 3,
            warmup: 0,
            visit: 3,
            settle: 0,
            threads: Some(2),
            device: DeviceChoice::Cpu,
            channel_round: None,
            channel_groups: None,
            images: Vec::new(),
            labels: Vec::new(),
            gap: Duration::from_millis(40),
            linger: Duration::from_millis(10),
        };
        let start = std::time::Instant::now();
        let report = run(&model, &config, |_, _| {}).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(120));
        assert_eq!((report.gap_ms, report.linger_ms), (40.0, 10.0));
        assert!(report
            .markdown()
            .contains("came 40 ms after the last pass ended; the workers lingered 10 ms"));
    }

    /// Turns of `visit` timed runs after `settle` untimed ones: 4 runs in turns of 3 are
    /// a turn of 3 and a turn of 1, each opened by an untimed run, for each policy.
    #[test]
    fn policies_take_turns_of_untimed_then_timed_runs() {
        let model = Model::from_bytes(crate::demo::MODEL).unwrap();
        let config = Config {
            batches: vec![1],
            policies: vec![("keep 0.5".into(), Policy::Keep(0.5))],
            runs: 4,
            warmup: 1,
            visit: 3,
            settle: 1,
            threads: Some(1),
            device: DeviceChoice::Cpu,
            channel_round: None,
            channel_groups: None,
            images: Vec::new(),
            labels: Vec::new(),
            gap: Duration::ZERO,
            linger: crate::runtime::DEFAULT_LINGER,
        };
        let mut calls = Vec::new();
        let report = run(&model, &config, |done, total| calls.push((done, total))).unwrap();
        // Per policy: 1 warm-up, 2 turns each opened by 1 untimed run, 4 timed.
        assert_eq!(calls.len(), 2 * (1 + 2 + 4));
        assert!(calls.iter().all(|&(_, total)| total == calls.len()));
        assert_eq!(calls.last().unwrap().0, calls.len());
        assert_eq!((report.runs, report.visit, report.settle), (4, 3, 1));
        assert!(report
            .markdown()
            .contains("turns of 3 timed runs after 1 untimed"));
        let none = Config { visit: 0, ..config };
        assert!(matches!(
            run(&model, &none, |_, _| {}),
            Err(Error::Input(_))
        ));
    }

    const M100: u64 = 100_000_000;
    const M50: u64 = 50_000_000;

    /// A batch-1 result of 3 ms for `policy`, with these layers.
    fn result(policy: &str, layers: Vec<LayerResult>) -> PolicyResult {
        PolicyResult {
            policy: policy.into(),
            batch: 1,
            median_ms: 3.0,
            p10_ms: 3.0,
            p90_ms: 3.0,
            vs_dense: 1.0,
            vs_dense_p10: 1.0,
            vs_dense_p90: 1.0,
            flops_executed: 1.0,
            flops_gates: 0.0,
            flops_fraction: 1.0,
            gflops_per_s: 1.0,
            gate_ms: 0.0,
            layers,
        }
    }

    /// A policy twice as slow as dense in every round is 2× dense, though the machine ran
    /// at half speed for some rounds: the ratio of the two medians would say 4×.
    #[test]
    fn time_against_dense_pairs_runs_of_the_same_round() {
        let dense = [1.0, 1.0, 2.0, 2.0, 1.0];
        let policy = [2.0, 4.0, 4.0, 4.0, 2.0];
        let r = round_ratios(&policy, &dense);
        assert_eq!(r, vec![2.0, 2.0, 2.0, 2.0, 4.0]);
        assert_eq!(quantile(&r, 0.5), 2.0);
        assert_eq!(median(&policy) / median(&dense), 4.0);
        assert_eq!(round_ratios(&dense, &dense), vec![1.0; 5]);
    }

    /// A gated layer at half its FLOPs and half its time takes nothing beyond its share;
    /// one at half its FLOPs and all of its time takes half its dense time beyond it.
    #[test]
    fn layers_table_shows_time_beyond_each_layers_kept_share() {
        let layer = |name: &str, ms: f64, flops: u64| LayerResult {
            name: name.into(),
            ms,
            gate_ms: 0.0,
            flops,
            flops_dense: 100_000_000,
            kept_channels: 0,
            channels: 0,
            kept_tiles: 0,
            tiles: 0,
        };
        let mut report = Report {
            model: "m".into(),
            executor: "cpu".into(),
            threads: 1,
            runs: 1,
            visit: 1,
            settle: 0,
            gap_ms: 0.0,
            linger_ms: 50.0,
            flops_dense: 200,
            channel_round: None,
            channel_groups: None,
            results: vec![
                result("dense", vec![layer("a", 2.0, M100), layer("b", 4.0, M100)]),
                result(
                    "budget 0.5",
                    vec![layer("a", 1.0, M50), layer("b", 4.0, M50)],
                ),
            ],
            quality: Vec::new(),
            peers: Vec::new(),
            kernel_peak: None,
        };
        let md = report.layers_markdown(1);
        assert!(
            md.contains("| budget 0.5 / dense | beyond kept share, ms |"),
            "{md}"
        );
        // 100 MFLOPs in 2 ms: 50 GFLOP/s.
        assert!(
            md.contains("| a | 100.0 | 50 | 2.000 | 1.000 | 0.50 | 0.50 | 0.000 |"),
            "{md}"
        );
        assert!(
            md.contains("| b | 100.0 | 25 | 4.000 | 4.000 | 0.50 | 1.00 | 2.000 |"),
            "{md}"
        );
        assert!(!md.contains("% of kernel peak"), "{md}");
        assert!(
            md.contains("dense 6.000 ms, budget 0.5 5.000 ms (0.83 of dense)"),
            "{md}"
        );
        assert!(md.contains("3.000 ms (0.50)"), "{md}");
        assert!(md.contains("most (ms): b 2.000, a 0.000."), "{md}");
        // Dense alone: no comparison columns.
        report.results.truncate(1);
        let md = report.layers_markdown(1);
        assert!(!md.contains("beyond"), "{md}");
        assert!(md.contains("| a | 100.0 | 50 | 2.000 | 1.00 |"), "{md}");
    }

    /// Each layer's rate is read against the micro-kernel's peak of the same run; a
    /// layer without FLOPs has no rate, and one past the peak is explained.
    #[test]
    fn layers_table_reads_each_rate_against_the_kernel_peak() {
        let layer = |name: &str, ms: f64, flops: u64| LayerResult {
            name: name.into(),
            ms,
            gate_ms: 0.0,
            flops,
            flops_dense: flops,
            kept_channels: 0,
            channels: 0,
            kept_tiles: 0,
            tiles: 0,
        };
        let peak = |median_gflops| KernelPeak {
            median_gflops,
            p10_gflops: median_gflops,
            p90_gflops: median_gflops,
            bursts: 3,
        };
        let mut report = Report {
            model: "m".into(),
            executor: "cpu".into(),
            threads: 2,
            runs: 1,
            visit: 1,
            settle: 0,
            gap_ms: 0.0,
            linger_ms: 50.0,
            flops_dense: M100,
            channel_round: None,
            channel_groups: None,
            results: vec![result(
                "dense",
                vec![layer("conv", 2.0, M100), layer("pool", 0.5, 0)],
            )],
            quality: Vec::new(),
            peers: Vec::new(),
            kernel_peak: Some(peak(200.0)),
        };
        let md = report.layers_markdown(1);
        assert!(md.contains("| dense GFLOP/s | % of kernel peak |"), "{md}");
        assert!(md.contains("| conv | 100.0 | 50 | 25 | 2.000 |"), "{md}");
        assert!(md.contains("| pool | 0.0 | – | – | 0.500 |"), "{md}");
        assert!(!md.contains("Above 100%"), "{md}");
        assert!(report
            .markdown()
            .contains("200 GFLOP/s (median of 3 bursts"));
        assert!(!report.markdown().contains("changed speed"));
        report.kernel_peak = Some(KernelPeak {
            p10_gflops: 100.0,
            ..peak(200.0)
        });
        assert!(
            report.markdown().contains("changed speed"),
            "{}",
            report.markdown()
        );
        report.kernel_peak = Some(peak(40.0));
        let md = report.layers_markdown(1);
        assert!(md.contains("| conv | 100.0 | 50 | 125 | 2.000 |"), "{md}");
        assert!(md.contains("Above 100%"), "{md}");
    }

    #[test]
    fn peers_table_gives_ratios_and_flags_non_finite_logits() {
        let peer = |name: &str, ms, diff| PeerResult {
            peer: name.into(),
            batch: 1,
            median_ms: ms,
            p10_ms: ms,
            p90_ms: ms,
            logits_rel_diff: diff,
        };
        let report = Report {
            model: "m".into(),
            executor: "cuda".into(),
            threads: 1,
            runs: 1,
            visit: 1,
            settle: 0,
            gap_ms: 0.0,
            linger_ms: 50.0,
            flops_dense: 1,
            channel_round: None,
            channel_groups: None,
            results: vec![result("dense", Vec::new())],
            quality: Vec::new(),
            peers: vec![peer("tf32", 2.0, 5e-4), peer("fp16", 1.0, f64::NAN)],
            kernel_peak: None,
        };
        let md = report.peers_markdown();
        assert!(md.contains("| 1 | tf32 | 2.00 | 1.50 | 5.0e-4 |"), "{md}");
        assert!(
            md.contains("| 1 | fp16 | 1.00 | 3.00 | not finite |"),
            "{md}"
        );
        // No per-layer trace (the GPU's): the gate time is not claimed.
        assert!(
            report.markdown().contains("| n/a |"),
            "{}",
            report.markdown()
        );
    }
}
