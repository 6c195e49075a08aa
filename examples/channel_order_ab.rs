//! What a calibrated channel order ([`dynsparse::exec::channel_order`]) buys on a model:
//! calibrates on every other image of a folder (or on the all-zero input, the dataset's
//! mean image after normalisation, with `--calibrate zero`), then on the images it did
//! not see, at a FLOP budget, prints how many of the kept channels lie in each gated
//! layer's leading run before and after, how far the dense logits moved, and the median
//! ratio of in-process pairs of passes, reordered against original, alternating pass by
//! pass on the CPU engine.
//!
//! usage: cargo run --release --example channel_order_ab -- MODEL.dsm IMAGE_DIR
//!        [--budget 0.5] [--batch 1] [--pairs 60] [--calibrate images|zero]

use std::time::Instant;

use dynsparse::exec::channel_order::{self, leading_share};
use dynsparse::exec::cpu::EngineExecutor;
use dynsparse::exec::{gating, Budget, Executor, Policy};
use dynsparse::{preprocess, Model};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut budget, mut batch, mut pairs, mut zero) = (0.5, 1usize, 60usize, false);
    let mut paths = Vec::new();
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--budget" => budget = value()?.parse()?,
            "--batch" => batch = value()?.parse()?,
            "--pairs" => pairs = value()?.parse()?,
            "--calibrate" => {
                zero = match value()?.as_str() {
                    "zero" => true,
                    "images" => false,
                    v => return Err(format!("--calibrate takes images or zero, not {v}").into()),
                }
            }
            _ => paths.push(a),
        }
    }
    let [model_path, dir] = <[String; 2]>::try_from(paths).map_err(|_| "usage: MODEL IMAGE_DIR")?;
    let model = Model::load(&model_path)?;
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let images = files
        .iter()
        .map(|f| preprocess::preprocess(&preprocess::load_image(f)?, &model.desc.preprocess))
        .collect::<Result<Vec<_>, _>>()?;
    let sample = images.first().ok_or("no images")?.len();
    let (seen, unseen): (Vec<_>, Vec<_>) = images.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let calibration: Vec<f32> = if zero {
        vec![0.0; sample]
    } else {
        seen.iter().flat_map(|(_, x)| x.iter().copied()).collect()
    };
    let started = Instant::now();
    let (reordered, counts) = channel_order::calibrate(&model, &calibration)?;
    println!(
        "calibrated on {} ({} sample passes) in {:.1} s",
        if zero {
            "the all-zero input".to_string()
        } else {
            format!("{} images", seen.len())
        },
        counts.passes,
        started.elapsed().as_secs_f64()
    );
    let policy = Policy::Budget(Budget::Flops(budget));
    let original = EngineExecutor::new(&model)?.without_thread_choice();
    let fast = EngineExecutor::new(&reordered)?.without_thread_choice();
    // Held-out batches, cycling through the unseen images.
    let batches: Vec<Vec<f32>> = (0..unseen.len().max(1))
        .map(|b| {
            (0..batch)
                .flat_map(|s| unseen[(b * batch + s) % unseen.len()].1.iter().copied())
                .collect()
        })
        .collect();
    let gated: Vec<usize> = gating::gateable(&model).iter().map(|g| g.0).collect();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut moved = 0f32;
    for x in &batches {
        let (a, b) = (
            original.forward_with(x, batch, policy)?,
            fast.forward_with(x, batch, policy)?,
        );
        // The gated layers only: a depthwise reader reports its input's kept channels.
        for (node, (ka, kb)) in a.kept.into_iter().zip(b.kept).enumerate() {
            if gated.contains(&node) {
                before.extend(ka.into_iter().flatten());
                after.extend(kb.into_iter().flatten());
            }
        }
        let (a, b) = (original.forward(x, batch)?, fast.forward(x, batch)?);
        let top = a
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        moved = a
            .iter()
            .zip(&b)
            .fold(moved, |m, (u, v)| m.max((u - v).abs() / top));
    }
    println!(
        "held-out ({} images): kept channels in each layer's leading run {:.3} → {:.3}; \
         dense logits moved by at most {moved:.1e} of the largest",
        unseen.len(),
        leading_share(&before),
        leading_share(&after)
    );
    let (mut ta, mut tb, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for p in 0..pairs + 5 {
        let x = &batches[p % batches.len()];
        let start = Instant::now();
        std::hint::black_box(original.forward_with(x, batch, policy)?);
        let a = start.elapsed().as_secs_f64() * 1e3;
        let start = Instant::now();
        std::hint::black_box(fast.forward_with(x, batch, policy)?);
        let b = start.elapsed().as_secs_f64() * 1e3;
        if p >= 5 {
            ta.push(a);
            tb.push(b);
            ratios.push(b / a);
        }
    }
    println!(
        "{model_path} batch {batch} budget {budget}: reordered {:.2} ms, original {:.2} ms, \
         ratio {:.3} (median of {pairs} pairs)",
        median(&mut tb),
        median(&mut ta),
        median(&mut ratios)
    );
    Ok(())
}
