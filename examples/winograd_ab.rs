//! What Winograd's F(2×2, 3×3) buys on whole models: in-process pairs of forward passes,
//! the engine as it is against the same engine with every 3×3 convolution run directly
//! (`EngineExecutor::without_winograd`), alternating run by run; prints each policy's
//! median times and the median of the per-pair ratios (Winograd / direct).
//!
//! usage: cargo run --release --example winograd_ab -- [--batch 1] [--pairs 20] [--budget 0.5] MODEL.dsm...

use std::time::Instant;

use dynsparse::exec::cpu::EngineExecutor;
use dynsparse::exec::{Budget, Executor, Policy};
use dynsparse::Model;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut batch, mut pairs, mut budget) = (1usize, 20usize, None);
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batch" => batch = args.next().ok_or("--batch needs a value")?.parse()?,
            "--pairs" => pairs = args.next().ok_or("--pairs needs a value")?.parse()?,
            "--budget" => budget = Some(args.next().ok_or("--budget needs a value")?.parse()?),
            _ => models.push(a),
        }
    }
    let policy = budget.map_or(Policy::Dense, |f| Policy::Budget(Budget::Flops(f)));
    for path in models {
        let model = Model::load(&path)?;
        let wino = EngineExecutor::new(&model)?;
        let direct = EngineExecutor::new(&model)?.without_winograd();
        let [c, h, w] = model.layers[0].input;
        let input: Vec<f32> = (0..batch * c * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let time = |e: &EngineExecutor| -> Result<f64, dynsparse::Error> {
            let start = Instant::now();
            std::hint::black_box(e.forward_with(&input, batch, policy)?);
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        for _ in 0..3 {
            time(&wino)?;
            time(&direct)?;
        }
        let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..pairs {
            let (x, y) = if i % 2 == 0 {
                let x = time(&wino)?;
                (x, time(&direct)?)
            } else {
                let y = time(&direct)?;
                (time(&wino)?, y)
            };
            a.push(x);
            b.push(y);
            r.push(x / y);
        }
        println!(
            "{path} batch {batch} {policy:?}: winograd {:.2} ms, direct {:.2} ms, ratio {:.3} (pairs {pairs})",
            median(&mut a),
            median(&mut b),
            median(&mut r)
        );
    }
    Ok(())
}
