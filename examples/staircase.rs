//! The tail-effect staircase of one gated layer on the CPU: latency against the number of
//! output channels kept, with rounding turned off, so every count from 1 to C runs.
//!
//! The model is two 3×3 convolutions (C_in → C → C_in) at H×W: the first is gated (its
//! kept channels are its GEMM rows), the second reads only the kept channels (its GEMM's
//! K). Per kept count: the median time of each, from the executor's per-layer trace. The
//! summary compares each count with the next multiple of the micro-kernel's row tile:
//! when they cost the same, rounding up to the tile keeps more channels for free.
//!
//! usage: cargo run --release --example staircase -- [--channels 96] [--cin 64] [--hw 28] [--runs 15]

use dynsparse::exec::cpu::EngineExecutor;
use dynsparse::exec::{Executor, Policy};
use dynsparse::synthetic::{conv_chain, pseudo_random, ConvSpec};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut c, mut cin, mut hw, mut runs) = (96usize, 64usize, 28usize, 15usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: usize = args.next().ok_or(format!("{a} needs a value"))?.parse()?;
        match a.as_str() {
            "--channels" => c = v,
            "--cin" => cin = v,
            "--hw" => hw = v,
            "--runs" => runs = v,
            _ => return Err(format!("unknown option {a}").into()),
        }
    }
    let conv = |cout| ConvSpec {
        cout,
        k: 3,
        stride: 1,
        depthwise: false,
    };
    let model = conv_chain(cin, hw, &[conv(c), conv(cin)])?;
    let engine = EngineExecutor::new(&model)?;
    let tile = engine.channel_round();
    let engine = engine.with_channel_round(1);
    let input = pseudo_random(cin * hw * hw, 7);
    // Keep ratios just under k / C select exactly k channels once rounding is off.
    let policy = |k: usize| Policy::Keep((k as f64 / c as f64 - 1e-9).min(1.0));
    let mut times = vec![(Vec::new(), Vec::new()); c + 1];
    for _ in 0..2 {
        engine.forward_with(&input, 1, policy(c))?;
    }
    // Counts interleaved within each run, so drift hits every count alike.
    for _ in 0..runs {
        for (k, t) in times.iter_mut().enumerate().skip(1) {
            let f = engine.forward_with(&input, 1, policy(k))?;
            t.0.push(f.layers[0].ms);
            t.1.push(f.layers[1].ms);
        }
    }
    let med: Vec<(f64, f64)> = times
        .into_iter()
        .map(|(a, b)| {
            if a.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                (median(a), median(b))
            }
        })
        .collect();
    println!("3x3 {cin}->{c}->{cin} at {hw}x{hw}, batch 1, micro-kernel row tile {tile}");
    println!("| kept | gated conv ms | reader conv ms | both ms |");
    println!("|---|---|---|---|");
    for (k, (a, b)) in med.iter().enumerate().skip(1) {
        println!("| {k} | {a:.3} | {b:.3} | {:.3} |", a + b);
    }
    // Each count against the tile multiple at or above it: what rounding up costs.
    let mut ratios = Vec::new();
    let mut gained = 0usize;
    for k in (1..=c).filter(|k| k % tile != 0) {
        let up = (k.div_ceil(tile) * tile).min(c);
        ratios.push((med[up].0 + med[up].1) / (med[k].0 + med[k].1));
        gained += up - k;
    }
    if !ratios.is_empty() {
        println!(
            "rounding up to the tile: median time ratio {:.3} (rounded / unrounded, {} counts), {:.1} more channels kept on average",
            median(ratios.clone()),
            ratios.len(),
            gained as f64 / ratios.len() as f64
        );
    }
    Ok(())
}
