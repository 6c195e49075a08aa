//! The `dynsparse` command line: convert checkpoints, classify images or tensors, and
//! run the demo on the embedded model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dynsparse::{
    convert, npy, preprocess, Budget, Cut, DeviceChoice, Gates, Input, Options, Policy, Prediction,
    Runtime,
};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "dynsparse",
    version,
    about = "Dynamic-sparsity inference for image-classification CNNs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a PyTorch checkpoint (.pth, zip or legacy) or .safetensors file into a model file.
    Convert {
        /// Architecture of the checkpoint: resnet18, resnet34, resnet50, resnet101, resnet20,
        /// resnet56, vgg16_bn, mobilenet_v2, efficientnet_lite0.
        #[arg(long)]
        arch: String,
        /// Checkpoint to read.
        #[arg(long)]
        input: PathBuf,
        /// Model file to write.
        #[arg(long)]
        output: PathBuf,
        /// Class names, one per line (ImageNet's by default for 1000-class models).
        #[arg(long)]
        classes: Option<PathBuf>,
        /// Preprocessing as JSON (resize_shorter, crop, mean, std, channel_order); the
        /// architecture's default otherwise.
        #[arg(long)]
        preprocess: Option<PathBuf>,
        /// Then renumber the gated channels, most often kept first, calibrated on these
        /// images (files or folders; none: the all-zero input), as `dynsparse reorder`
        /// does.
        #[arg(long, num_args = 0.., value_name = "IMAGES")]
        reorder: Option<Vec<PathBuf>>,
    },
    /// Renumber a model's gated channels, those the gates keep most often first, so
    /// that a gated pass's kept channels lie mostly in leading runs the kernels read
    /// whole: the same network, faster gated passes. Calibrated on images like the ones
    /// the model will see, or, given none, on the all-zero input (the mean image).
    Reorder {
        /// Model file to read.
        #[arg(long)]
        model: PathBuf,
        /// Model file to write.
        #[arg(long)]
        output: PathBuf,
        /// Calibration images: files, or folders of them (png, jpg, jpeg, bmp, webp).
        images: Vec<PathBuf>,
    },
    /// Classify images, or a preprocessed NCHW float32 tensor (.npy).
    Infer {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// Classes to report per input.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        gates: GateArgs,
        /// Per-layer cost (kept channels and tiles, FLOPs, time) of the first input; in
        /// the JSON, of every input.
        #[arg(long)]
        verbose: bool,
        /// Where to run: auto (a CUDA GPU when present, else the CPU), cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// An .npy array of shape N×C×H×W, already preprocessed.
        #[arg(long, conflicts_with = "images")]
        tensor: Option<PathBuf>,
        /// Images (JPEG, PNG), run as one batch.
        #[arg(required_unless_present = "tensor")]
        images: Vec<PathBuf>,
    },
    /// Run the embedded demo model on its sample canvases and its held-out set, dense
    /// and with its trained gates.
    Demo {
        /// Also draw held-out accuracy against executed FLOPs per kind of gate (.svg or
        /// .png).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Validate and time the CUDA kernels on this machine's GPU: every kernel against a
    /// CPU reference on random shapes and plans, each model's logits against the CPU
    /// engine, and the captured pass's latency at several kept fractions.
    CudaCheck {
        /// Random cases per kernel.
        #[arg(long, default_value_t = 40)]
        cases: usize,
        /// Seed for shapes, plans and data (default: from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Model files to check end to end and time.
        #[arg(long = "model")]
        models: Vec<PathBuf>,
        /// Batch sizes to time.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        batch: Vec<usize>,
        /// Fractions of output tiles kept (synthetic spatial plans) to time.
        #[arg(long, value_delimiter = ',', default_value = "1,0.75,0.5,0.25")]
        keep: Vec<f64>,
        /// Timed replays per point.
        #[arg(long, default_value_t = 50)]
        reps: usize,
        /// Write every number as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Time a model dense and dynamic on the CPU (dense alone on a CUDA GPU with
    /// --device cuda): policies interleaved in short turns, median / p10 / p90, executed
    /// FLOPs, GFLOP/s and the ratio to dense from the same run, as a Markdown table (and
    /// JSON with every number).
    Bench {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        /// Channel-gate keep ratios to time.
        #[arg(long, value_delimiter = ',')]
        keep: Vec<f64>,
        /// Spatial-gate keep ratios to time.
        #[arg(long, value_delimiter = ',')]
        tiles: Vec<f64>,
        /// FLOP budgets to time (channel gates; with --spatial, also tiles).
        #[arg(long, value_delimiter = ',')]
        budget: Vec<f64>,
        /// With --budget: plan spatial gates too.
        #[arg(long)]
        spatial: bool,
        /// Gate probability thresholds to time, each applied to channel and spatial gates
        /// alike (a trained model's operating point is usually 0.5).
        #[arg(long, value_delimiter = ',')]
        threshold: Vec<f64>,
        /// Timed runs per policy and batch.
        #[arg(long, default_value_t = 15)]
        runs: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed runs in a row per policy before the next policy's turn. Each policy has
        /// its own runtime; a pass right after another policy's finds the caches holding
        /// that one's weights and buffers, which an application running one policy never
        /// sees. `--visit 1 --settle 0` switches policy every run.
        #[arg(long, default_value_t = 5)]
        visit: usize,
        /// Untimed runs opening each turn.
        #[arg(long, default_value_t = 1)]
        settle: usize,
        /// Pause this long before each timed run (and each of the peers' with --peers), as
        /// an application that runs a pass now and then (a camera's frames: 33).
        #[arg(long, default_value_t = 0.0)]
        gap_ms: f64,
        /// How long the pool's workers spin after each pass, ready for the next.
        #[arg(long, default_value_t = dynsparse::DEFAULT_LINGER.as_secs_f64() * 1e3)]
        linger_ms: f64,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Also print per-layer median times (first batch size).
        #[arg(long)]
        layers: bool,
        /// Write every number as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Plot latency against executed FLOPs (with the ideal line) here (.svg or .png).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Plot per-layer median times (first batch size), a bar per policy, here (.svg or
        /// .png).
        #[arg(long)]
        layer_plot: Option<PathBuf>,
        /// Hardware profile from `dynsparse profile`: gated runs round kept channel
        /// counts to its granularity.
        #[arg(long, conflicts_with = "channel_round")]
        profile: Option<PathBuf>,
        /// Round kept channel counts up to multiples of this (e.g. the rounding a model's
        /// gates were trained with) instead of the micro-kernel's rows.
        #[arg(long)]
        channel_round: Option<usize>,
        /// Channel gates choose kept channels in aligned groups of this many, ranked by
        /// their mean score (12, a packed block of weights, runs fastest on the CPU).
        #[arg(long)]
        channel_groups: Option<usize>,
        /// A folder of images: timed batches are made of them, and each policy's top-1
        /// agreement with dense over all of them is reported; and its accuracy when every
        /// file name ends in `_CLASS` (a class index, as in `canvas_0_6.png`).
        #[arg(long)]
        images: Option<PathBuf>,
        /// With --images: plot each policy's top-1 agreement with dense (and accuracy,
        /// when labelled) against its executed FLOPs here (.svg or .png).
        #[arg(long, requires = "images")]
        quality_plot: Option<PathBuf>,
        /// Also time dense peers on the same weights and input, after our runs: ONNX
        /// Runtime and PyTorch eager on the CPU, PyTorch + cuDNN (eager TF32, CUDA graphs
        /// in TF32 and FP16) on a GPU, through `python3 benches/peers/dsm_peer.py` (needs
        /// torch, safetensors, onnx and onnxruntime).
        #[arg(long, conflicts_with = "images")]
        peers: bool,
        /// Where to run: the CPU, or a CUDA GPU (dense, or --keep on models whose gates feed
        /// no depthwise layer; an error without a GPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
    /// Measure this machine's tail-effect staircase — latency against kept output
    /// channels and kept tiles for representative layers — and save the channel
    /// granularity the planner should round kept counts to (use with --profile).
    Profile {
        /// Where to write the profile (JSON).
        #[arg(long, default_value = "dynsparse-profile.json")]
        out: PathBuf,
        /// Also plot the staircases (.svg or .png).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Timed rounds; each round runs every count once, interleaved.
        #[arg(long, default_value_t = 9)]
        runs: usize,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Small layers only: a quick check of the command, not a profile to plan with.
        #[arg(long)]
        quick: bool,
        /// Where to measure: the CPU engine, or the CUDA kernels on a GPU (an error
        /// without one).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Samples per timed pass, each with its own plan (CUDA only; the CPU profile is
        /// measured at batch 1).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Describe a model file: architecture, layers, FLOPs.
    Info {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
    },
}

/// What the gates compute (CPU); dense when none is given.
#[derive(clap::Args)]
struct GateArgs {
    /// Channel gates keep this fraction (0, 1] of every gated convolution's output
    /// channels, the best per input (with --device cuda: the device gates, on models whose
    /// gated layers feed no depthwise layer).
    #[arg(long, conflicts_with_all = ["dense", "threshold", "budget"])]
    keep: Option<f64>,
    /// Channel gates keep the channels whose gate probability is at least this, in (0, 1):
    /// the sigmoid of a trained gate's score (for training-free gates, 0.5 keeps the
    /// channels whose predicted mean pre-activation is above zero).
    #[arg(long, conflicts_with_all = ["dense", "budget"])]
    threshold: Option<f64>,
    /// Spatial gates keep this fraction (0, 1] of every gated convolution's output tiles,
    /// the most active per input.
    #[arg(long, conflicts_with_all = ["dense", "tile_threshold", "budget"])]
    tiles: Option<f64>,
    /// Spatial gates keep the tiles whose gate probability is at least this, in (0, 1):
    /// the sigmoid of a trained gate's score, or e/(e+mean) for training-free gates
    /// (0.5: busier than the layer's average).
    #[arg(long, conflicts_with_all = ["dense", "budget"])]
    tile_threshold: Option<f64>,
    /// At most this fraction (0, 1] of the dense FLOPs per input, the gates' own cost
    /// aside; the planner sets the channel cuts (and the tile cuts with --spatial).
    #[arg(long, conflicts_with = "dense")]
    budget: Option<f64>,
    /// With --budget: plan spatial gates as well as channel gates.
    #[arg(long, requires = "budget")]
    spatial: bool,
    /// Dense execution (the default).
    #[arg(long)]
    dense: bool,
    /// Hardware profile from `dynsparse profile`: kept channel counts round to its
    /// granularity.
    #[arg(long, conflicts_with = "channel_round")]
    profile: Option<PathBuf>,
    /// Round kept channel counts up to multiples of this (the rounding a model's gates
    /// were trained with) instead of the micro-kernel's rows.
    #[arg(long)]
    channel_round: Option<usize>,
    /// Channel gates choose kept channels in aligned groups of this many, ranked by
    /// their mean score (12, a packed block of weights, runs fastest on the CPU; the
    /// default, 1, chooses them one by one; a model whose gates were trained in groups
    /// needs its groups).
    #[arg(long)]
    channel_groups: Option<usize>,
}

impl GateArgs {
    fn policy(&self) -> Policy {
        if let Some(f) = self.budget {
            return Policy::Budget(if self.spatial {
                Budget::FlopsWithTiles(f)
            } else {
                Budget::Flops(f)
            });
        }
        let cut = |ratio: Option<f64>, threshold: Option<f64>| match (ratio, threshold) {
            (Some(r), _) => Cut::Ratio(r),
            (None, Some(t)) => Cut::Threshold(t),
            (None, None) => Cut::All,
        };
        let gates = Gates {
            channels: cut(self.keep, self.threshold),
            tiles: cut(self.tiles, self.tile_threshold),
        };
        if gates.channels == Cut::All && gates.tiles == Cut::All {
            Policy::Dense
        } else {
            Policy::Gates(gates)
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
        }
    }
}

#[derive(Serialize)]
struct JsonResult<'a> {
    input: String,
    #[serde(flatten)]
    prediction: &'a Prediction,
}

fn main() {
    // Rust ignores SIGPIPE, so a write to a closed pipe (`dynsparse bench | head`) would
    // panic in `println!`; with the default disposition the program ends quietly, as
    // other command-line tools do.
    #[cfg(unix)]
    // SAFETY: sets a signal disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let mut cli = Cli::parse();
    // This thread runs each pass as worker 0 of the global pool rather than handing it to
    // a pool thread and sleeping (see `dynsparse::join_global_pool`); `--threads` sizes
    // that pool, which the command's runtimes then use.
    let threads = match &mut cli.command {
        Command::Infer { threads, .. } | Command::Bench { threads, .. } => threads.take(),
        _ => None,
    };
    let done = dynsparse::join_global_pool(threads)
        .context("--threads")
        .and_then(|()| run(cli));
    if let Err(e) = done {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            arch,
            input,
            output,
            classes,
            preprocess,
            reorder,
        } => cmd_convert(
            &arch,
            &input,
            &output,
            classes.as_deref(),
            preprocess.as_deref(),
            reorder.as_deref(),
        ),
        Command::Reorder {
            model,
            output,
            images,
        } => cmd_reorder(&model, &output, &images),
        Command::Infer {
            model,
            top_k,
            json,
            threads,
            gates,
            verbose,
            device,
            tensor,
            images,
        } => cmd_infer(
            &model,
            top_k,
            json,
            threads,
            &gates,
            verbose,
            device.into(),
            tensor.as_deref(),
            &images,
        ),
        Command::Demo { plot } => cmd_demo(plot.as_deref()),
        Command::CudaCheck {
            cases,
            seed,
            models,
            batch,
            keep,
            reps,
            json,
        } => cmd_cuda_check(cases, seed, &models, &batch, &keep, reps, json.as_deref()),
        Command::Bench {
            model,
            batch,
            keep,
            tiles,
            budget,
            spatial,
            runs,
            warmup,
            visit,
            settle,
            gap_ms,
            linger_ms,
            threads,
            layers,
            json,
            plot,
            layer_plot,
            profile,
            channel_round,
            channel_groups,
            threshold,
            images,
            quality_plot,
            peers,
            device,
        } => {
            let gates = |channels, tiles| Policy::Gates(Gates { channels, tiles });
            let mut policies: Vec<(String, Policy)> = Vec::new();
            policies.extend(keep.iter().map(|&r| (format!("keep {r}"), Policy::Keep(r))));
            policies.extend(
                tiles
                    .iter()
                    .map(|&r| (format!("tiles {r}"), gates(Cut::All, Cut::Ratio(r)))),
            );
            policies.extend(threshold.iter().map(|&t| {
                (
                    format!("threshold {t}"),
                    gates(Cut::Threshold(t), Cut::Threshold(t)),
                )
            }));
            policies.extend(budget.iter().map(|&f| {
                if spatial {
                    (
                        format!("budget {f} spatial"),
                        Policy::Budget(Budget::FlopsWithTiles(f)),
                    )
                } else {
                    (format!("budget {f}"), Policy::Budget(Budget::Flops(f)))
                }
            }));
            let mut config = dynsparse::bench::Config {
                batches: batch,
                policies,
                runs,
                warmup,
                visit,
                settle,
                threads,
                device: device.into(),
                channel_round: match profile {
                    Some(p) => Some(dynsparse::profile::Profile::load(&p)?.channel_round_here()?),
                    None => channel_round,
                },
                channel_groups,
                images: Vec::new(),
                labels: Vec::new(),
                gap: millis(gap_ms, "--gap-ms")?,
                linger: millis(linger_ms, "--linger-ms")?,
            };
            if let Some(dir) = images {
                (config.images, config.labels) = load_folder(&dir)?;
            }
            let plots = [
                plot.as_deref(),
                layer_plot.as_deref(),
                quality_plot.as_deref(),
            ];
            cmd_bench(&model, &config, layers, peers, json.as_deref(), plots)
        }
        Command::Info { model } => cmd_info(&model),
        Command::Profile {
            out,
            plot,
            runs,
            threads,
            quick,
            device,
            batch,
        } => cmd_profile(&out, plot.as_deref(), runs, threads, quick, device, batch),
    }
}

fn cmd_convert(
    arch: &str,
    input: &Path,
    output: &Path,
    classes: Option<&Path>,
    pre: Option<&Path>,
    reorder: Option<&[PathBuf]>,
) -> Result<()> {
    let classes = classes.map(convert::read_classes).transpose()?;
    let mut model = convert::convert(arch, input, classes)?;
    if let Some(p) = pre {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        let pre = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a preprocessing description", p.display()))?;
        model = convert::with_preprocess(model, pre).with_context(|| {
            format!(
                "{}: {arch} cannot take the input its crop asks for",
                p.display()
            )
        })?;
    }
    if let Some(images) = reorder {
        let (reordered, report) = reorder_channels(&model, images)?;
        println!("{report}");
        model = reordered;
    }
    model.save(output)?;
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({}, {} classes, {} nodes, {:.2} GFLOPs per image, {:.1} MB)",
        output.display(),
        model.desc.arch,
        model.desc.classes.len(),
        model.desc.nodes.len(),
        model.flops_per_sample() as f64 / 1e9,
        size as f64 / 1e6
    );
    Ok(())
}

/// Calibration samples the report after reordering runs on at most.
const REORDER_REPORT_SAMPLES: usize = 64;

fn cmd_reorder(model_path: &Path, output: &Path, images: &[PathBuf]) -> Result<()> {
    let model = dynsparse::Model::load(model_path)?;
    let (reordered, report) = reorder_channels(&model, images)?;
    reordered.save(output)?;
    println!("{report}; wrote {}", output.display());
    Ok(())
}

/// `model` with its gated channels renumbered ([`dynsparse::exec::channel_order`]),
/// calibrated on `images` (files or folders; none: the all-zero input), and a report of
/// what was done and how far the kept channels moved into leading runs.
fn reorder_channels(
    model: &dynsparse::Model,
    images: &[PathBuf],
) -> Result<(dynsparse::Model, String)> {
    use dynsparse::exec::channel_order::{self, leading_share};
    use dynsparse::exec::cpu::EngineExecutor;
    use dynsparse::exec::Executor;
    let mut inputs = Vec::new();
    for path in images {
        let found = if path.is_dir() {
            load_folder(path)?.0
        } else {
            vec![preprocess::load_image(path)?]
        };
        for img in found {
            inputs.extend(preprocess::preprocess(&img, &model.desc.preprocess)?);
        }
    }
    let sample: usize = model.layers[0].input.iter().product();
    let samples = inputs.len() / sample;
    let source = if samples == 0 {
        inputs = vec![0.0; sample];
        "the all-zero input (no images given)".to_string()
    } else {
        format!("{samples} image{}", if samples == 1 { "" } else { "s" })
    };
    let engine = EngineExecutor::new(model)?;
    let bar = indicatif::ProgressBar::new(samples.max(1) as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} calibration samples")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let counts = channel_order::keep_counts(&engine, model, &inputs, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let orders = counts.orders();
    let reordered = channel_order::reorder(model, &orders)?;
    // How far the kept channels moved into leading runs, on (some of) the calibration
    // inputs at keep 0.5.
    let report = &inputs[..sample * samples.clamp(1, REORDER_REPORT_SAMPLES)];
    let share = |m: &dynsparse::Model| -> Result<f64> {
        let e = EngineExecutor::new(m)?;
        let mut kept = Vec::new();
        for batch in report.chunks(8 * sample) {
            let f = e.forward_with(batch, batch.len() / sample, Policy::Keep(0.5))?;
            for (node, k) in f.kept.into_iter().enumerate() {
                if orders[node].is_some() {
                    kept.extend(k.into_iter().flatten());
                }
            }
        }
        Ok(leading_share(&kept))
    };
    let (before, after) = (share(model)?, share(&reordered)?);
    Ok((
        reordered,
        format!(
            "reordered the channels of {} gated convolutions, calibrated on {source} at \
             keep {:?}; kept channels (keep 0.5, calibration inputs) lying in each layer's \
             leading run: {before:.3} before, {after:.3} after",
            orders.iter().flatten().count(),
            channel_order::CALIBRATION_KEEPS,
        ),
    ))
}

#[allow(clippy::too_many_arguments)]
fn cmd_infer(
    model: &Path,
    top_k: usize,
    json: bool,
    threads: Option<usize>,
    gates: &GateArgs,
    verbose: bool,
    device: DeviceChoice,
    tensor: Option<&Path>,
    images: &[PathBuf],
) -> Result<()> {
    let rt = Runtime::load(
        model,
        Options {
            top_k,
            threads,
            device,
            policy: gates.policy(),
            layer_stats: verbose,
            channel_round: match &gates.profile {
                Some(p) => Some(dynsparse::profile::Profile::load(p)?.channel_round_here()?),
                None => gates.channel_round,
            },
            channel_groups: gates.channel_groups,
            ..Options::default()
        },
    )?;

    let (names, preds) = if let Some(t) = tensor {
        let data = npy::read(t)?;
        let preds = rt.infer(Input::Tensor(&data))?;
        let names: Vec<String> = (0..preds.len())
            .map(|i| format!("{}[{i}]", t.display()))
            .collect();
        (names, preds)
    } else {
        let imgs = images
            .iter()
            .map(|p| preprocess::load_image(p))
            .collect::<dynsparse::Result<Vec<_>>>()?;
        let names = images.iter().map(|p| p.display().to_string()).collect();
        (names, rt.infer(&imgs)?)
    };
    if json {
        let results: Vec<JsonResult> = names
            .into_iter()
            .zip(&preds)
            .map(|(input, prediction)| JsonResult { input, prediction })
            .collect();
        println!("{}", serde_json::json!({ "results": results }));
    } else {
        for (name, p) in names.iter().zip(&preds) {
            println!("{name}");
            for c in &p.top {
                println!("  {:>6.2}%  {:>4}  {}", 100.0 * c.prob, c.class, c.label);
            }
        }
        if let Some(p) = preds.first() {
            if verbose {
                print_layers(&names[0], &p.stats);
            }
            println!(
                "{} input(s) in {:.2} ms on {}, {:.3} GFLOPs per input (dense {:.3}; gates {:.4})",
                preds.len(),
                p.stats.latency_ms,
                p.stats.executor,
                p.stats.flops_executed as f64 / 1e9,
                p.stats.flops_dense as f64 / 1e9,
                p.stats.flops_gates as f64 / 1e9
            );
        }
    }
    if let Some(note) = rt.device_note() {
        eprintln!("note: {note}");
    }
    let gated = !matches!(gates.policy(), Policy::Dense | Policy::Keep(1.0));
    if gated && !dynsparse::exec::gating::has_trained_gates(&rt.model().desc.nodes) {
        eprintln!(
            "note: this model carries no trained gates, so training-free ones chose what \
             to skip; on real weights they keep the dense answer mostly for small cuts \
             (EfficientNet-Lite0: about half of the README's test images at 0.9 of the \
             FLOPs, few at 0.75)"
        );
    }
    Ok(())
}

/// The per-layer table of one input.
fn print_layers(name: &str, stats: &dynsparse::Stats) {
    println!("per layer, {name} (time is the whole batch's):");
    println!(
        "  {:<28} {:>11} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "layer", "channels", "tiles", "MFLOPs", "dense", "ms", "gate ms"
    );
    for l in &stats.layers {
        let tiles = if l.tiles > 0 {
            format!("{}/{}", l.kept_tiles, l.tiles)
        } else {
            "-".into()
        };
        println!(
            "  {:<28} {:>11} {:>9} {:>9.2} {:>9.2} {:>8.3} {:>8.3}",
            l.name,
            format!("{}/{}", l.kept_channels, l.channels),
            tiles,
            l.flops as f64 / 1e6,
            l.flops_dense as f64 / 1e6,
            l.ms,
            l.gate_ms
        );
    }
    let (ms, gate): (f64, f64) = stats
        .layers
        .iter()
        .map(|l| (l.ms, l.gate_ms))
        .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d));
    println!(
        "  gates: {:.3} ms of {:.3} ms ({:.1}%), {:.2}% of the executed FLOPs",
        gate,
        ms,
        100.0 * gate / ms.max(1e-9),
        100.0 * stats.flops_gates as f64 / stats.flops_executed.max(1) as f64
    );
}

fn cmd_bench(
    model: &Path,
    config: &dynsparse::bench::Config,
    layers: bool,
    peers: bool,
    json: Option<&Path>,
    [plot, layer_plot, quality_plot]: [Option<&Path>; 3],
) -> Result<()> {
    for p in [plot, layer_plot, quality_plot].into_iter().flatten() {
        plot_format(p)?;
    }
    let m = dynsparse::Model::load(model)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} passes, {elapsed} ({eta} left)",
        )
        .context("progress style")?,
    );
    let mut report = dynsparse::bench::run(&m, config, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if peers {
        let gpu = report.executor == "cuda";
        report.peers = run_peers(model, &m, config, gpu)?;
    }
    let mut gating = String::new();
    if let Some(r) = report.channel_round {
        gating += &format!("; kept channel counts rounded to {r}");
    }
    if let Some(g) = report.channel_groups.filter(|&g| g > 1) {
        gating += &format!("; kept channels in groups of {g}");
    }
    // A GPU pass is launched from one host thread: the pool size says nothing there.
    let threads = if report.executor == "cuda" {
        String::new()
    } else {
        format!("{} threads, ", report.threads)
    };
    println!(
        "{} on {}, {threads}{} timed runs per point, policies interleaved; dense {:.3} GFLOPs per sample{gating}\n",
        report.model,
        report.executor,
        report.runs,
        report.flops_dense as f64 / 1e9
    );
    print!("{}", report.markdown());
    if !report.quality.is_empty() {
        println!(
            "\nquality against cost on {} images (timed batches above are made of them):\n",
            report.quality[0].images
        );
        print!("{}", report.quality_markdown());
    }
    if !report.peers.is_empty() {
        println!(
            "\ndense peers on the same weights and input, timed after our runs (not \
             interleaved):\n"
        );
        print!("{}", report.peers_markdown());
    }
    if layers {
        if let Some(&b) = config.batches.first() {
            println!("\nper layer, batch {b} (median ms):\n");
            print!("{}", report.layers_markdown(b));
        }
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("{}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = plot {
        plot_latency(&report, path)?;
        eprintln!("wrote {}", path.display());
    }
    if let (Some(path), Some(&b)) = (layer_plot, config.batches.first()) {
        plot_layers(&report, b, path)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = quality_plot {
        plot_quality(&report, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// How a plot is written, from its file's extension.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlotFormat {
    Svg,
    Png,
}

/// The format `path` asks for: checked before any long run, so that a wrong name costs
/// nothing.
fn plot_format(path: &Path) -> Result<PlotFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => Ok(PlotFormat::Svg),
        Some("png") => Ok(PlotFormat::Png),
        _ => bail!(
            "{}: plots are written as SVG (.svg) or PNG (.png)",
            path.display()
        ),
    }
}

/// Draws a plot of `size` with `draw` and writes it to `path`: the SVG as it is, or
/// rasterized to PNG (see [`plot_format`]).
fn draw_plot(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(
        &plotters::drawing::DrawingArea<plotters::prelude::SVGBackend<'_>, plotters::coord::Shift>,
    ) -> Result<()>,
) -> Result<()> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    let bytes = match plot_format(path)? {
        PlotFormat::Svg => svg.into_bytes(),
        PlotFormat::Png => rasterize(&svg)?,
    };
    std::fs::write(path, bytes).with_context(|| format!("{}", path.display()))
}

/// Families tried, in order, for the plots' `sans-serif` text in PNG files.
const PNG_FONTS: [&str; 6] = [
    "DejaVu Sans",
    "Liberation Sans",
    "Noto Sans",
    "FreeSans",
    "Arial",
    "Helvetica",
];

/// A PNG of `svg` at twice its drawn size (sharp text), on white, its text set in the
/// first installed family of [`PNG_FONTS`] (else any installed one).
fn rasterize(svg: &str) -> Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    let fonts = opt.fontdb_mut();
    fonts.load_system_fonts();
    let installed = |family: &str| {
        fonts
            .faces()
            .any(|f| f.families.iter().any(|(name, _)| name == family))
    };
    let family = PNG_FONTS
        .iter()
        .find(|f| installed(f))
        .map(|f| f.to_string())
        .or_else(|| {
            fonts
                .faces()
                .find_map(|f| f.families.first().map(|(name, _)| name.clone()))
        });
    let Some(family) = family else {
        bail!(
            "PNG plots need a font for their text, and none is installed (the system's \
             font folders are empty); write the plot as .svg instead"
        );
    };
    fonts.set_sans_serif_family(family);
    let tree = usvg::Tree::from_str(svg, &opt).context("reading the drawn plot")?;
    const SCALE: u32 = 2;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width() * SCALE, size.height() * SCALE)
        .context("the plot has no area")?;
    pixmap.fill(tiny_skia::Color::WHITE);
    let scale = SCALE as f32;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().context("encoding the PNG")
}

/// A white chart on `root` whose x axis is executed FLOPs as a fraction of dense (gates
/// included), from 0 to 1.05, and whose y axis spans `y`.
fn flops_chart<'a, 'b>(
    root: &'a plotters::drawing::DrawingArea<
        plotters::prelude::SVGBackend<'b>,
        plotters::coord::Shift,
    >,
    caption: String,
    y: std::ops::Range<f64>,
    y_desc: &str,
) -> Result<
    plotters::prelude::ChartContext<
        'a,
        plotters::prelude::SVGBackend<'b>,
        plotters::prelude::Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
> {
    use plotters::prelude::*;
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1.05, y)?;
    chart
        .configure_mesh()
        .x_desc("executed FLOPs / dense (gates included)")
        .y_desc(y_desc)
        .draw()?;
    Ok(chart)
}

/// The series' legend on a white, framed box at `position`.
fn legend<'a, 'b: 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut plotters::prelude::ChartContext<'a, plotters::prelude::SVGBackend<'b>, CT>,
    position: plotters::prelude::SeriesLabelPosition,
) -> Result<()> {
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(position)
        .draw()?;
    Ok(())
}

/// Each policy's top-1 agreement with dense (and accuracy, when the images are labelled)
/// against its executed FLOPs, each point named by its policy.
fn plot_quality(report: &dynsparse::bench::Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    draw_plot(path, (720, 480), |root| {
        let images = report.quality.first().map_or(0, |q| q.images);
        let mut chart = flops_chart(
            root,
            format!(
                "{}: quality against executed FLOPs ({images} images)",
                report.model
            ),
            0.0..105.0,
            "%",
        )?;
        type Measure = fn(&dynsparse::bench::Quality) -> Option<f64>;
        let series: [(&str, Measure); 2] = [
            ("top-1 agreement with dense", |q| Some(q.agreement)),
            ("accuracy", |q| q.accuracy),
        ];
        for (i, (name, value)) in series.into_iter().enumerate() {
            let pts: Vec<(f64, f64, &str)> = report
                .quality
                .iter()
                .filter_map(|q| value(q).map(|v| (q.flops_fraction, 100.0 * v, q.policy.as_str())))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y, _)| Circle::new((x, y), 4, color.filled())),
                )?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
            if i == 0 {
                // Names to the left of their points: most points sit near the right edge.
                use plotters::style::text_anchor::{HPos, Pos, VPos};
                let style = TextStyle::from(("sans-serif", 12).into_font())
                    .pos(Pos::new(HPos::Right, VPos::Center));
                chart
                    .draw_series(pts.iter().map(|&(x, y, p)| {
                        Text::new(format!("{p} "), (x - 0.01, y), style.clone())
                    }))?;
            }
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

/// Per-layer median times at one batch size: for each layer that takes time, a bar per
/// policy side by side.
fn plot_layers(report: &dynsparse::bench::Report, batch: usize, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let rows: Vec<_> = report.results.iter().filter(|r| r.batch == batch).collect();
    let Some(first) = rows.first() else {
        bail!("no results at batch {batch}");
    };
    // Layers that cost something under dense; pooling and the like would be invisible.
    let total: f64 = first.layers.iter().map(|l| l.ms).sum();
    let shown: Vec<usize> = (0..first.layers.len())
        .filter(|&i| first.layers[i].ms >= total * 0.002)
        .collect();
    let top = rows
        .iter()
        .flat_map(|r| shown.iter().map(|&i| r.layers.get(i).map_or(0.0, |l| l.ms)))
        .fold(0.0f64, f64::max)
        * 1.1;
    let width = (shown.len() as u32 * 14 + 160).max(640);
    draw_plot(path, (width, 480), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("{}: per-layer time, batch {batch}", report.model),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..shown.len() as f64, 0f64..top.max(1e-3))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("layer (graph order; names in the --layers table)")
            .y_desc("median ms")
            .draw()?;
        let n = rows.len() as f64;
        for (p, r) in rows.iter().enumerate() {
            let color = Palette99::pick(p).to_rgba();
            chart
                .draw_series(shown.iter().enumerate().map(|(j, &i)| {
                    let x0 = j as f64 + 0.1 + 0.8 * p as f64 / n;
                    let ms = r.layers.get(i).map_or(0.0, |l| l.ms);
                    Rectangle::new([(x0, 0.0), (x0 + 0.8 / n, ms)], color.filled())
                }))?
                .label(r.policy.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    })
}

/// Latency against executed FLOPs, both as fractions of dense, a series per batch size,
/// with the ideal (time proportional to FLOPs) as a dashed line.
fn plot_latency(report: &dynsparse::bench::Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let top = report
        .results
        .iter()
        .map(|r| r.vs_dense)
        .fold(1.2f64, f64::max);
    draw_plot(path, (720, 480), |root| {
        let mut chart = flops_chart(
            root,
            format!(
                "{}: latency against executed FLOPs ({})",
                report.model, report.executor
            ),
            0.0..top * 1.05,
            "latency / dense latency",
        )?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                6,
                4,
                BLACK.stroke_width(1),
            ))?
            .label("ideal: time ∝ FLOPs")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        let mut batches: Vec<usize> = report.results.iter().map(|r| r.batch).collect();
        batches.dedup();
        for (i, &b) in batches.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts: Vec<(f64, f64)> = report
                .results
                .iter()
                .filter(|r| r.batch == b)
                .map(|r| (r.flops_fraction, r.vs_dense))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(format!("batch {b}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

/// One held-out evaluation of the demo: accuracy, FLOPs and time under a policy.
struct DemoRow {
    policy: String,
    gates: &'static str,
    accuracy: f64,
    flops: f64,
    ms: f64,
}

fn demo_eval(
    model: &dynsparse::Model,
    policy: Policy,
    heldout: &[(image::DynamicImage, usize)],
) -> Result<(f64, f64, f64)> {
    let rt = Runtime::new(
        model.clone(),
        Options {
            top_k: 1,
            device: DeviceChoice::Cpu,
            policy,
            channel_round: Some(dynsparse::demo::channel_round()?),
            ..Options::default()
        },
    )?;
    let (mut correct, mut ms, mut flops) = (0, 0.0, 0u64);
    for chunk in heldout.chunks(100) {
        let imgs: Vec<_> = chunk.iter().map(|(i, _)| i.clone()).collect();
        let preds = rt.infer(&imgs)?;
        ms += preds[0].stats.latency_ms;
        flops += preds.iter().map(|p| p.stats.flops_executed).sum::<u64>();
        correct += preds
            .iter()
            .zip(chunk)
            .filter(|(p, (_, l))| p.top[0].class == *l)
            .count();
    }
    let n = heldout.len() as f64;
    Ok((
        100.0 * correct as f64 / n,
        flops as f64 / n / model.flops_per_sample() as f64,
        ms / n,
    ))
}

fn cmd_demo(plot: Option<&Path>) -> Result<()> {
    use dynsparse::demo;
    if let Some(p) = plot {
        plot_format(p)?;
    }
    let model = dynsparse::Model::from_bytes(demo::MODEL)?;
    let plain = model.without_trained_gates();
    let round = demo::channel_round()?;
    let cpu = |policy| {
        Runtime::new(
            model.clone(),
            Options {
                top_k: 1,
                device: DeviceChoice::Cpu,
                policy,
                channel_round: Some(round),
                ..Options::default()
            },
        )
    };
    let both = |c: Cut, t: Cut| {
        Policy::Gates(Gates {
            channels: c,
            tiles: t,
        })
    };
    let operating = both(Cut::Threshold(0.5), Cut::Threshold(0.5));
    let dense = cpu(Policy::Dense)?;
    let gated = cpu(operating)?;
    println!(
        "demo model: {} with trained channel and spatial gates, on {}×{} canvases of real MNIST \
         digits among clutter\n(embedded; {:.1} MFLOPs per image dense; gates cut at sigmoid ≥ 0.5; kept channel counts \
         rounded up to {round}, as in training; CPU)\n",
        model.desc.arch,
        model.desc.input.height,
        model.desc.input.width,
        model.flops_per_sample() as f64 / 1e6
    );
    println!(
        "{:<16} {:>5} {:>9} {:>7} {:>24} {:>9} {:>9}",
        "sample", "label", "predicted", "prob", "MFLOPs executed / dense", "dense ms", "gated ms"
    );
    for (name, png) in demo::SAMPLES {
        let img = preprocess::decode_image(png)?;
        // Warm-up, then the median of 5 runs of each, taken in turn.
        dense.infer(&img)?;
        gated.infer(&img)?;
        let (mut td, mut tg) = (Vec::new(), Vec::new());
        let mut last = None;
        for _ in 0..5 {
            td.push(dense.infer(&img)?[0].stats.latency_ms);
            let p = gated.infer(&img)?.remove(0);
            tg.push(p.stats.latency_ms);
            last = Some(p);
        }
        let p = last.context("no prediction")?;
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let label = demo::sample_label(name).map_or("?".into(), |l| l.to_string());
        println!(
            "{:<16} {:>5} {:>9} {:>6.1}% {:>11.1} / {:<10.1} {:>9.3} {:>9.3}",
            name,
            label,
            p.top[0].label,
            100.0 * p.top[0].prob,
            p.stats.flops_executed as f64 / 1e6,
            p.stats.flops_dense as f64 / 1e6,
            median(&mut td),
            median(&mut tg)
        );
    }

    let heldout = demo::heldout()?;
    println!(
        "\nheld-out set: {} canvases never seen in training, in batches of 100 (CPU, {} threads)",
        heldout.len(),
        rayon::current_num_threads()
    );
    let mut runs: Vec<(String, &'static str, &dynsparse::Model, Policy)> = vec![
        ("dense".into(), "none", &model, Policy::Dense),
        ("threshold 0.5".into(), "trained", &model, operating),
        (
            "budget 0.5".into(),
            "trained",
            &model,
            Policy::Budget(Budget::FlopsWithTiles(0.5)),
        ),
        (
            "budget 0.3".into(),
            "trained",
            &model,
            Policy::Budget(Budget::FlopsWithTiles(0.3)),
        ),
    ];
    for r in demo::RATIOS {
        let p = both(Cut::Ratio(r), Cut::Ratio(r));
        runs.push((format!("ratio {r}"), "trained", &model, p));
        runs.push((format!("ratio {r}"), "training-free", &plain, p));
    }
    runs.push((
        "budget 0.5".into(),
        "training-free",
        &plain,
        Policy::Budget(Budget::FlopsWithTiles(0.5)),
    ));
    let bar = indicatif::ProgressBar::new(runs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} policies {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for (policy, gates, m, p) in runs {
        bar.set_message(format!("{policy}, {gates}"));
        let (accuracy, flops, ms) = demo_eval(m, p, &heldout)?;
        rows.push(DemoRow {
            policy,
            gates,
            accuracy,
            flops,
            ms,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let dense_ms = rows[0].ms;
    println!(
        "{:<15} {:<14} {:>9} {:>15} {:>13} {:>14}",
        "policy", "gates", "accuracy", "FLOPs vs dense", "ms per image", "time vs dense"
    );
    for r in &rows {
        println!(
            "{:<15} {:<14} {:>8.1}% {:>15.3} {:>13.3} {:>14.2}",
            r.policy,
            r.gates,
            r.accuracy,
            r.flops,
            r.ms,
            r.ms / dense_ms
        );
    }
    let evidence = demo::evidence()?;
    println!(
        "\nstatic pruning, the same channels and tiles for every input (PyTorch reference of \
         the same weights,\nmodels/demo/make_demo.py, the same rounding):"
    );
    for r in evidence.iter().filter(|r| r.kind == "static") {
        println!(
            "{:<15} {:<14} {:>8.1}% {:>15.3}",
            r.policy, "static", r.accuracy, r.flops
        );
    }
    if let Some(path) = plot {
        plot_demo(&rows, &evidence, path)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// Held-out accuracy against executed FLOPs: trained gates, training-free gates (both
/// measured by the runtime) and static pruning (the PyTorch reference's figures).
fn plot_demo(rows: &[DemoRow], evidence: &[dynsparse::demo::Evidence], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut series: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for gates in ["trained", "training-free"] {
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.gates == gates || r.gates == "none")
            .map(|r| (r.flops, r.accuracy))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push((gates, pts));
    }
    let mut stat: Vec<(f64, f64)> = evidence
        .iter()
        .filter(|r| r.kind == "static" || r.kind == "dense")
        .map(|r| (r.flops, r.accuracy))
        .collect();
    stat.sort_by(|a, b| a.0.total_cmp(&b.0));
    series.push(("static pruning (PyTorch reference)", stat));
    let low = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(100f64, f64::min);
    draw_plot(path, (720, 480), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(
                "demo: held-out accuracy against executed FLOPs",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1.1, (low - 2.0).max(0.0)..100.5)?;
        chart
            .configure_mesh()
            .x_desc("executed FLOPs / dense (gates included)")
            .y_desc("accuracy (%)")
            .draw()?;
        for (i, (name, pts)) in series.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    })
}

/// `ms` milliseconds as a duration, or why not (`flag` names the option).
fn millis(ms: f64, flag: &str) -> Result<std::time::Duration> {
    if !(0.0..=3_600_000.0).contains(&ms) {
        bail!("{flag} takes milliseconds from 0 to an hour, not {ms}");
    }
    Ok(std::time::Duration::from_secs_f64(ms / 1e3))
}

/// Times the dense peers with `benches/peers/dsm_peer.py` and checks their logits
/// against ours on the same input.
fn run_peers(
    path: &Path,
    model: &dynsparse::Model,
    config: &dynsparse::bench::Config,
    gpu: bool,
) -> Result<Vec<dynsparse::bench::PeerResult>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/dsm_peer.py");
    if !script.exists() {
        bail!("{}: the peer script is missing", script.display());
    }
    let threads = config.threads.unwrap_or_else(rayon::current_num_threads);
    let batches: Vec<String> = config.batches.iter().map(|b| b.to_string()).collect();
    eprintln!(
        "timing dense peers ({}) with {}",
        if gpu {
            "PyTorch + cuDNN on the GPU"
        } else {
            "ONNX Runtime, PyTorch eager"
        },
        script.display()
    );
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg("--model")
        .arg(path)
        .args(["--batch", &batches.join(",")])
        .args(["--runs", &config.runs.to_string()])
        .args(["--warmup", &config.warmup.to_string()])
        .args(["--gap-ms", &(config.gap.as_secs_f64() * 1e3).to_string()])
        .args(["--threads", &threads.to_string(), "--torch"])
        .args(["--device", if gpu { "cuda" } else { "cpu" }])
        .output()
        .context("running python3 for the peers")?;
    if !out.status.success() {
        bail!(
            "the peer script failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dense = Runtime::new(
        model.clone(),
        Options {
            top_k: 1,
            threads: config.threads,
            device: DeviceChoice::Cpu,
            ..Options::default()
        },
    )?;
    let mut results = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("peer output: {line}"))?;
        let batch = v["batch"].as_u64().context("peer output: batch")? as usize;
        let theirs: Vec<f32> = v["logits"]
            .as_array()
            .context("peer output: logits")?
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
            .collect();
        let x = dynsparse::bench::input(model, batch)?;
        let ours = dense.infer(Input::Tensor(&x))?.remove(0).logits;
        let scale = ours
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // A peer whose logits overflowed (FP16 on random weights) computed something else:
        // say so rather than let `max` skip its NaNs.
        let rel = if theirs.len() != ours.len() {
            f64::INFINITY
        } else if theirs.iter().any(|v| !v.is_finite()) {
            f64::NAN
        } else {
            f64::from(diff / scale)
        };
        results.push(dynsparse::bench::PeerResult {
            peer: v["peer"].as_str().unwrap_or("?").to_string(),
            batch,
            median_ms: v["median_ms"].as_f64().unwrap_or(f64::NAN),
            p10_ms: v["p10_ms"].as_f64().unwrap_or(f64::NAN),
            p90_ms: v["p90_ms"].as_f64().unwrap_or(f64::NAN),
            logits_rel_diff: rel,
        });
    }
    if results.is_empty() {
        bail!("the peer script timed nothing (is onnxruntime installed?)");
    }
    Ok(results)
}

/// Every image in `dir` (by extension), in name order, and their classes when every
/// file name ends in `_CLASS` (empty otherwise).
fn load_folder(dir: &Path) -> Result<(Vec<image::DynamicImage>, Vec<usize>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["png", "jpg", "jpeg", "bmp", "webp"].contains(&e.to_lowercase().as_str())
            })
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("{}: no images (png, jpg, jpeg, bmp, webp)", dir.display());
    }
    let images = paths
        .iter()
        .map(|p| preprocess::load_image(p).map_err(Into::into))
        .collect::<Result<Vec<_>>>()?;
    let labels: Option<Vec<usize>> = paths
        .iter()
        .map(|p| {
            let stem = p.file_stem()?.to_str()?;
            stem.rsplit_once('_')?.1.parse().ok()
        })
        .collect();
    Ok((images, labels.unwrap_or_default()))
}

fn cmd_profile(
    out: &Path,
    plot: Option<&Path>,
    runs: usize,
    threads: Option<usize>,
    quick: bool,
    device: DeviceArg,
    batch: usize,
) -> Result<()> {
    use dynsparse::profile::{self, PairShape, Unit};
    if let Some(p) = plot {
        plot_format(p)?;
    }

    let bar = indicatif::ProgressBar::new(runs as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} rounds, {elapsed} ({eta} left)",
        )
        .context("progress style")?,
    );
    let cuda = match device {
        DeviceArg::Cpu => None,
        DeviceArg::Cuda => Some(dynsparse::exec::cuda::Device::open(0)?),
        DeviceArg::Auto => dynsparse::exec::cuda::Device::open(0).ok(),
    };
    if cuda.is_none() && batch != 1 {
        bail!("the CPU profile is measured at batch 1; --batch applies to --device cuda");
    }
    if cuda.is_some() && threads.is_some() {
        bail!("--threads applies to the CPU; a GPU profile launches from one thread");
    }
    let (shapes, tiles): (Vec<PairShape>, PairShape) = if quick {
        let small = PairShape {
            cin: 16,
            cout: 24,
            k: 3,
            hw: 16,
        };
        (vec![small], small)
    } else if cuda.is_some() {
        (profile::CUDA_CHANNEL_SHAPES.to_vec(), profile::TILE_SHAPE)
    } else {
        (profile::CHANNEL_SHAPES.to_vec(), profile::TILE_SHAPE)
    };
    let work = || {
        profile::measure(&shapes, Some(tiles), runs, |done, _| {
            bar.set_position(done as u64)
        })
    };
    let p = match (&cuda, threads) {
        (Some(dev), _) => {
            profile::measure_cuda(dev, &shapes, Some(tiles), batch, runs, |done, _| {
                bar.set_position(done as u64)
            })?
        }
        (None, threads) => match threads {
            Some(0) => bail!("threads must be at least 1"),
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .context("thread pool")?
                .install(work)?,
            None => work()?,
        },
    };
    bar.finish_and_clear();
    match &p.device {
        Some(dev) => println!(
            "{} on {dev}, batch {} (block tile {} channels), medians of {runs} interleaved \
             rounds of 3 replays, whole pass",
            p.executor, p.batch, p.kernel_rows
        ),
        None => println!(
            "{} ({} threads, micro-kernel rows {}), medians of {runs} interleaved rounds",
            p.executor, p.threads, p.kernel_rows
        ),
    }
    // On a GPU the time is the whole captured pass, and steps come at block tiles.
    let (timed, tile) = if p.device.is_some() {
        ("whole pass", "channel block tile")
    } else {
        ("both convolutions", "row tile")
    };
    for st in &p.stairs {
        let s = st.shape;
        let what = match st.unit {
            Unit::Channels => format!(
                "{k}x{k} {}->[kept of {}]->{} at {hw}x{hw}, {timed}",
                s.cin,
                s.cout,
                s.cin,
                k = s.k,
                hw = s.hw
            ),
            Unit::Tiles => format!(
                "{k}x{k} {}->{} at {hw}x{hw}, kept output tiles",
                s.cout,
                s.cin,
                k = s.k,
                hw = s.hw
            ),
        };
        // The staircase in two numbers: the mean rise across a row-tile boundary
        // (r·m → r·m + 1) and the mean rise between other neighbouring counts.
        let r = p.kernel_rows.max(1);
        let (mut edge, mut inner) = (Vec::new(), Vec::new());
        for w in st.counts.windows(2).zip(st.ms.windows(2)) {
            let ((k0, k1), (m0, m1)) = ((w.0[0], w.0[1]), (w.1[0], w.1[1]));
            if k1 == k0 + 1 && k1 < *st.counts.last().unwrap_or(&0) {
                if k0 % r == 0 {
                    edge.push(m1 - m0);
                } else {
                    inner.push(m1 - m0);
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let steps = match st.unit {
            Unit::Channels => format!(
                "; +{:.4} ms across a {r}-{tile} boundary, +{:.4} ms per channel elsewhere",
                mean(&edge),
                mean(&inner)
            ),
            Unit::Tiles => String::new(),
        };
        println!(
            "  {what}: {:.3} ms at {} to {:.3} ms at {}{steps}",
            st.ms.first().copied().unwrap_or(0.0),
            st.counts.first().copied().unwrap_or(0),
            st.ms.last().copied().unwrap_or(0.0),
            st.counts.last().copied().unwrap_or(0),
        );
    }
    println!(
        "channel granularity: {} (the largest rounding that costs at most {:.0}% more time, \
         for 9 counts in 10)",
        p.channel_round,
        (profile::ROUND_COST - 1.0) * 100.0
    );
    p.save(out)?;
    println!("wrote {} (use it with --profile)", out.display());
    if let Some(path) = plot {
        plot_profile(&p, path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One panel per staircase: median latency against kept units, with the micro-kernel's
/// row tile marked on channel staircases.
fn plot_profile(p: &dynsparse::profile::Profile, path: &Path) -> Result<()> {
    use dynsparse::profile::Unit;
    use plotters::prelude::*;
    draw_plot(path, (760, 260 * p.stairs.len() as u32), |root| {
        root.fill(&WHITE)?;
        for (st, area) in p.stairs.iter().zip(root.split_evenly((p.stairs.len(), 1))) {
            let s = st.shape;
            let top = st.ms.iter().copied().fold(0f64, f64::max) * 1.1;
            let last = st.counts.last().copied().unwrap_or(1);
            let (unit, caption) = match st.unit {
                Unit::Channels => (
                    "kept output channels",
                    format!(
                        "{k}x{k} {}->{}->{} at {hw}x{hw} ({})",
                        s.cin,
                        s.cout,
                        s.cin,
                        p.executor,
                        k = s.k,
                        hw = s.hw
                    ),
                ),
                Unit::Tiles => (
                    "kept output tiles",
                    format!(
                        "{k}x{k} {}->{} at {hw}x{hw} ({})",
                        s.cout,
                        s.cin,
                        p.executor,
                        k = s.k,
                        hw = s.hw
                    ),
                ),
            };
            let mut chart = ChartBuilder::on(&area)
                .caption(caption, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..last as f64 + 1.0, 0f64..top.max(1e-3))?;
            chart
                .configure_mesh()
                .x_desc(unit)
                .y_desc("median ms")
                .draw()?;
            if st.unit == Unit::Channels {
                let r = p.kernel_rows.max(1);
                chart.draw_series((r..=last).step_by(r).map(|k| {
                    PathElement::new(
                        [(k as f64, 0.0), (k as f64, top)],
                        BLACK.mix(0.15).stroke_width(1),
                    )
                }))?;
            }
            let pts: Vec<(f64, f64)> = st
                .counts
                .iter()
                .zip(&st.ms)
                .map(|(&k, &m)| (k as f64, m))
                .collect();
            let color = Palette99::pick(0).to_rgba();
            chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 2, color.filled())))?;
        }
        Ok(())
    })
}

fn cmd_info(model: &Path) -> Result<()> {
    let m = dynsparse::Model::load(model)?;
    let d = &m.desc;
    println!(
        "{}: {} nodes, {} classes, input {}×{}×{}, {:.3} GFLOPs per image",
        d.arch,
        d.nodes.len(),
        d.classes.len(),
        d.input.channels,
        d.input.height,
        d.input.width,
        m.flops_per_sample() as f64 / 1e9
    );
    let trained = dynsparse::exec::gating::has_trained_gates(&d.nodes);
    for (n, l) in d.nodes.iter().zip(&m.layers) {
        let gates = match &n.op {
            dynsparse::model::Op::Conv(c) => match c.gate {
                Some(g) if g.channels && g.tiles => "  gates: channels, tiles",
                Some(g) if g.channels => "  gates: channels",
                Some(_) => "  gates: tiles",
                None => "",
            },
            _ => "",
        };
        println!(
            "  {:<32} {:?} -> {:?}  {:>8.2} MFLOPs{gates}",
            n.name,
            l.input,
            l.output,
            l.flops as f64 / 1e6
        );
    }
    println!(
        "{}",
        if trained {
            "trained gates: gated runs use them, and only them"
        } else {
            "no trained gates: gated runs use training-free ones"
        }
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_cuda_check(
    cases: usize,
    seed: Option<u64>,
    models: &[PathBuf],
    batches: &[usize],
    keeps: &[f64],
    reps: usize,
    json: Option<&Path>,
) -> Result<()> {
    use dynsparse::exec::cuda::{check, nvrtc, Device};
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let dev = Device::open(0)?;
    let (major, minor) = nvrtc::version()?;
    println!(
        "device: {} ({}, {} SMs); NVRTC {major}.{minor}; seed {seed}",
        dev.name(),
        dev.arch(),
        dev.sm_count()
    );
    let resources = check::kernel_resources(&dev)?;
    println!("\n| kernel | registers | local bytes (spills, stack) | static shared bytes |\n|---|---|---|---|");
    for (name, regs, local, shared) in &resources {
        println!("| {name} | {regs} | {local} | {shared} |");
    }

    let kernel_results = check::check_kernels(&dev, seed, cases)?;
    let failed = kernel_results.iter().filter(|r| !r.pass).count();
    let worst = |dw: bool| {
        kernel_results
            .iter()
            .filter(|r| r.case.starts_with("dw") == dw)
            .map(|r| r.rel_max)
            .fold(0.0f64, f64::max)
    };
    println!(
        "\nkernel checks: {} cases, {failed} failed; worst rel max error: conv (TF32) {:.2e}, depthwise (f32) {:.2e}",
        kernel_results.len(),
        worst(false),
        worst(true)
    );
    for r in kernel_results.iter().filter(|r| !r.pass) {
        println!("  FAILED {} rel max {:.3e}", r.case, r.rel_max);
    }
    let gate_results = check::check_gates(&dev, seed, cases)?;
    println!(
        "gate checks: {} cases, {} failed",
        gate_results.len(),
        gate_results.iter().filter(|r| !r.pass).count()
    );
    for r in gate_results
        .iter()
        .filter(|r| !r.pass || r.case.contains("near tie"))
    {
        println!("  {} {}", if r.pass { "ok" } else { "FAILED" }, r.case);
    }

    let mut model_results = Vec::new();
    let mut timings = Vec::new();
    for path in models {
        let model = dynsparse::Model::load(path)?;
        for b in [1usize, 3, 32] {
            for r in check::check_model(&model, &dev, b, seed ^ b as u64)? {
                println!(
                    "{}: rel max {:.2e}, rel l2 {:.2e} -> {}",
                    r.case,
                    r.rel_max,
                    r.rel_l2,
                    if r.pass { "ok" } else { "FAILED" }
                );
                model_results.push(r);
            }
        }
        let r = check::check_gated_model(&model, &dev, 3, seed)?;
        println!(
            "{}: rel max {:.2e} -> {}",
            r.case,
            r.rel_max,
            if r.pass { "ok" } else { "FAILED" }
        );
        model_results.push(r);
        if !batches.is_empty() && reps > 0 {
            let rows = check::time_model(
                &model,
                &dev,
                batches,
                keeps,
                &[
                    check::PlanMode::Tiles,
                    check::PlanMode::Channels,
                    check::PlanMode::Gates,
                    check::PlanMode::DenseFp16,
                ],
                reps,
                seed,
            )?;
            timings.extend(rows);
        }
    }
    if !timings.is_empty() {
        println!("\n{}", check::timing_table(&timings));
    }
    if let Some(path) = json {
        let report = serde_json::json!({
            "device": dev.name(),
            "arch": dev.arch(),
            "sms": dev.sm_count(),
            "nvrtc": format!("{major}.{minor}"),
            "seed": seed,
            "resources": resources.iter().map(|(name, regs, local, shared)| serde_json::json!({
                "kernel": name, "registers": regs, "local_bytes": local, "shared_bytes": shared,
            })).collect::<Vec<_>>(),
            "kernel_checks": kernel_results,
            "gate_checks": gate_results,
            "model_checks": model_results,
            "timings": timings,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    check::require_all_pass(&kernel_results)?;
    check::require_all_pass(&gate_results)?;
    check::require_all_pass(&model_results)?;
    Ok(())
}
