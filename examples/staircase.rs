//! The tail-effect staircase of one gated layer pair on the CPU, printed as a table:
//! latency against the number of output channels kept, rounding off, so every count
//! from 1 to C runs. The model is two k×k convolutions (C_in → C → C_in) at H×W: the
//! first is gated (its kept channels are its GEMM rows), the second reads only the kept
//! channels (its GEMM's K). The timing is `dynsparse::profile::measure`, the same as
//! `dynsparse profile`; this prints one pair in full and what rounding each count up to
//! the micro-kernel's row tile costs.
//!
//! usage: cargo run --release --example staircase -- [--channels 96] [--cin 64] [--hw 28] [--k 3] [--runs 15]

use dynsparse::profile::{measure, PairShape};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut shape = PairShape {
        cin: 64,
        cout: 96,
        k: 3,
        hw: 28,
    };
    let mut runs = 15usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: usize = args.next().ok_or(format!("{a} needs a value"))?.parse()?;
        match a.as_str() {
            "--channels" => shape.cout = v,
            "--cin" => shape.cin = v,
            "--hw" => shape.hw = v,
            "--k" => shape.k = v,
            "--runs" => runs = v,
            _ => return Err(format!("unknown option {a}").into()),
        }
    }
    let p = measure(&[shape], None, runs, |_, _| {})?;
    let st = &p.stairs[0];
    let tile = p.kernel_rows;
    println!(
        "{k}x{k} {}->{}->{} at {hw}x{hw}, batch 1, {}, micro-kernel row tile {tile}",
        shape.cin,
        shape.cout,
        shape.cin,
        p.executor,
        k = shape.k,
        hw = shape.hw
    );
    println!("| kept | both ms | reader conv ms |");
    println!("|---|---|---|");
    for ((k, both), reader) in st.counts.iter().zip(&st.ms).zip(&st.reader_ms) {
        println!("| {k} | {both:.3} | {reader:.3} |");
    }
    // Each count against the tile multiple at or above it: what rounding up costs.
    let c = shape.cout;
    let mut ratios = Vec::new();
    let mut gained = 0usize;
    for k in (1..=c).filter(|k| k % tile != 0) {
        let up = (k.div_ceil(tile) * tile).min(c);
        ratios.push(st.ms[up - 1] / st.ms[k - 1]);
        gained += up - k;
    }
    ratios.sort_by(f64::total_cmp);
    if let Some(&m) = ratios.get(ratios.len() / 2) {
        println!(
            "rounding up to the tile: median time ratio {m:.3} (rounded / unrounded, {} counts), {:.1} more channels kept on average",
            ratios.len(),
            gained as f64 / ratios.len() as f64
        );
    }
    Ok(())
}
