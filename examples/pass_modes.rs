//! Why the same pass is sometimes slow: times many passes of one model in a row, splits
//! them into slow and fast ones, and prints each layer's median time in both, next to the
//! round trip of one cache line between two threads measured before and after.
//!
//! On the 2-core VM this project is measured on, ResNet-18's dense pass at batch 1 takes
//! about 15.5 ms in some stretches of seconds and about 20.5 ms in others, one process
//! switching between them, while one thread's passes and ONNX Runtime's stay steady. The
//! slow stretches coincide with a round trip of about 400 ns between the two vCPUs
//! against about 100 ns (the host placing them apart, it seems), and every layer slows by
//! how much it hands between the threads: see `docs/speed-log.md`.
//!
//! usage: cargo run --release --example pass_modes -- [--batch 1] [--passes 300]
//! [--threads 2] [--split MS] [--budget F] MODEL.dsm
//!
//! `--split`: passes longer than this are slow (default: 1.15 × the 10th percentile).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dynsparse::synthetic::pseudo_random;
use dynsparse::{Budget, Input, Model, Options, Policy, Runtime, TensorData};

/// Median of a non-empty list (sorts it).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds for one cache line to go to another thread and back (median of 20
/// bursts of 20 000).
fn round_trip_ns() -> f64 {
    let flag = AtomicU64::new(0);
    let mut bursts = Vec::new();
    let n = 20_000u64;
    for burst in 0..20u64 {
        let base = burst * 2 * n;
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..n {
                    while flag.load(Ordering::Acquire) != base + 2 * i + 1 {
                        std::hint::spin_loop();
                    }
                    flag.store(base + 2 * i + 2, Ordering::Release);
                }
            });
            let t = Instant::now();
            for i in 0..n {
                flag.store(base + 2 * i + 1, Ordering::Release);
                while flag.load(Ordering::Acquire) != base + 2 * i + 2 {
                    std::hint::spin_loop();
                }
            }
            bursts.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        });
    }
    median(&mut bursts)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut batch, mut passes, mut threads) = (1usize, 300usize, 2usize);
    let (mut split, mut policy, mut model) = (None, Policy::Dense, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--batch" => batch = value()?.parse()?,
            "--passes" => passes = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            "--split" => split = Some(value()?.parse::<f64>()?),
            "--budget" => policy = Policy::Budget(Budget::Flops(value()?.parse()?)),
            _ => model = Some(a),
        }
    }
    let path = model.ok_or("usage: pass_modes [options] MODEL.dsm")?;
    if passes < 10 {
        return Err("--passes must be at least 10".into());
    }
    let model = Model::load(&path)?;
    let names: Vec<String> = model.desc.nodes.iter().map(|n| n.name.clone()).collect();
    let spec = &model.desc.input;
    let len = spec.channels * spec.height * spec.width;
    let x = TensorData::new(
        vec![batch, spec.channels, spec.height, spec.width],
        pseudo_random(batch * len, 5),
    )?;
    let options = Options {
        threads: Some(threads),
        layer_stats: true,
        policy,
        ..Options::default()
    };
    let rt = Runtime::new(model, options)?;
    for _ in 0..5 {
        rt.infer(Input::Tensor(&x))?;
    }
    let before = round_trip_ns();
    let mut runs: Vec<(f64, Vec<f64>)> = Vec::with_capacity(passes);
    for _ in 0..passes {
        let p = rt.infer(Input::Tensor(&x))?;
        let s = &p[0].stats;
        runs.push((s.latency_ms, s.layers.iter().map(|l| l.ms).collect()));
    }
    let after = round_trip_ns();
    let mut totals: Vec<f64> = runs.iter().map(|r| r.0).collect();
    totals.sort_by(f64::total_cmp);
    let split = split.unwrap_or(1.15 * totals[totals.len() / 10]);
    let (slow, fast): (Vec<_>, Vec<_>) = runs.iter().partition(|r| r.0 > split);
    // The passes in order, one letter each: where the stretches lie.
    let trace: String = runs
        .iter()
        .map(|r| if r.0 > split { 'S' } else { '.' })
        .collect();
    println!("{path}, batch {batch}, {threads} threads, {passes} passes in a row");
    println!("round trip between two threads: {before:.0} ns before, {after:.0} ns after");
    println!("passes over {split:.2} ms are slow (S), the others fast (.):\n{trace}\n");
    let pick = |set: &[&(f64, Vec<f64>)], i: Option<usize>| -> Option<f64> {
        if set.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = set
            .iter()
            .map(|r| i.map_or(r.0, |i| r.1.get(i).copied().unwrap_or(0.0)))
            .collect();
        Some(median(&mut v))
    };
    let show = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
    let ratio = |s: Option<f64>, f: Option<f64>| match (s, f) {
        (Some(s), Some(f)) if f > 0.0 => format!("{:.2}", s / f),
        _ => "–".to_string(),
    };
    println!(
        "| layer | slow ms (median of {}) | fast ms (median of {}) | slow / fast |",
        slow.len(),
        fast.len()
    );
    println!("|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let (s, f) = (pick(&slow, Some(i)), pick(&fast, Some(i)));
        println!("| {name} | {} | {} | {} |", show(s), show(f), ratio(s, f));
    }
    let (s, f) = (pick(&slow, None), pick(&fast, None));
    println!(
        "| whole pass | {} | {} | {} |",
        show(s),
        show(f),
        ratio(s, f)
    );
    Ok(())
}
