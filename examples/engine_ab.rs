//! What one of the CPU engine's paths buys on whole models: in-process pairs of forward
//! passes, the engine as it is against the same engine without that path, alternating
//! run by run; prints each side's median time and the median of the per-pass ratios
//! (each pass with the path against the mean of the passes without it on either side).
//! The paths: `winograd` (3×3 convolutions by Winograd's F(2×2, 3×3);
//! without: `EngineExecutor::without_winograd`), `batched-gates` (a gated batch's
//! samples run together in layers of few positions; without:
//! `EngineExecutor::without_batched_gates`), `winograd-lines` (gated 3×3 convolutions
//! over 7 × 7 planes on the filters as one cache line per channel pair; without:
//! `EngineExecutor::without_winograd_lines`), `winograd-bands` (Winograd layers with
//! many tiles band by band, each thread on its own tiles; without:
//! `EngineExecutor::without_winograd_bands`), `tuning` (the choices made for this CPU's
//! microarchitecture, `Tuning::detect()`; without: `Tuning::DEFAULT`, which on a CPU
//! tuned by default makes two engines alike), `kept-in-place` (a spatial plan's kept
//! pixels read in place over flat stride-1 layers; without:
//! `EngineExecutor::without_kept_in_place`), `panel-prefetch` (1×1 layers prefetching the
//! panels they read in place next; without: `EngineExecutor::without_panel_prefetch`),
//! `summed-means` (convolutions summing their output's panels for the channel gates that
//! read it; without: `EngineExecutor::without_summed_means`), `thread-choice` (a pass
//! moved to one thread while the pool has been the slower; without:
//! `EngineExecutor::without_thread_choice`), `transposed` (gated 1×1 layers over 7 × 7
//! planes run transposed; without: `EngineExecutor::without_transposed`), `rows-major`
//! (kept rows of gated 1×1 and small stride-2 layers read from weights stored row by
//! row, where the tuning holds them, `Tuning::rows_major`: not on Zen 4, where both
//! engines are alike; without:
//! `EngineExecutor::without_rows_major`); `nothing` is a control, two
//! engines alike.
//! `--tuning intel|zen4|zen5|zen5-blocked|default|WIDTH,MIN_KEPT,LINES[,F4_WIDTH[,STRIP_KIB[,PACK14_K[,KC]]]]`
//! sets the tuning of both engines (the fields of `Tuning`: `winograd_wide_width`,
//! `winograd_wide_min_kept`, `lines_max_kept`, `winograd_f4_min_width` (`none` or left
//! out: no layer), `depthwise_strip_bytes` in KiB, `pack_misaligned_avx512` (`none`:
//! never) and `gemm_kc` (`all`: K whole; each left out: the default tuning's)); by
//! default `Tuning::detect()`. With
//! `--without tuning` only the engine measured "with" takes it, the other
//! `Tuning::DEFAULT` or the tuning given by `--against`: `--tuning intel --without
//! tuning` weighs the Intel choices against the default ones on any CPU, `--tuning zen5
//! --without tuning --against 56,0.25,0.85,none,128,none` Zen 5's with and without
//! F(4×4, 3×3), `--tuning zen5 --without tuning --against zen5-blocked` with and
//! without K whole (`zen5-blocked`: Zen 5's tuning with the default K blocks).
//! `--tiles R` runs spatial gates keeping the share R of each layer's tiles (every
//! channel), instead of `--budget`.
//!
//! With `--layers`, also each layer's median time both ways (where they differ by more
//! than 2%).
//!
//! usage: cargo run --release --example engine_ab -- [--without winograd|batched-gates|winograd-lines|winograd-bands|tuning|kept-in-place|panel-prefetch|summed-means|thread-choice|transposed|rows-major|nothing] [--tuning intel|zen4|zen5|zen5-blocked|default|WIDTH,MIN_KEPT,LINES[,F4_WIDTH[,STRIP_KIB[,PACK14_K[,KC]]]]] [--against TUNING] [--batch 1] [--pairs 20] [--budget 0.5 | --tiles 0.5] [--layers] MODEL.dsm...

use std::time::Instant;

use dynsparse::exec::cpu::gemm::Isa;
use dynsparse::exec::cpu::{EngineExecutor, Tuning};
use dynsparse::exec::{Budget, Cut, Executor, Gates, Policy};
use dynsparse::Model;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `intel`, `zen4`, `zen5`, `default`, or `WIDTH,MIN_KEPT,LINES[,F4_WIDTH[,STRIP_KIB[,PACK14_K[,KC]]]]`
/// for the fields of [`Tuning`] (with `F4_WIDTH` left out or `none`, no layer runs by
/// F(4×4, 3×3); `STRIP_KIB`, `PACK14_K` and `KC` left out, the default tuning's;
/// `KC` `all`: K whole), or `zen5-blocked` (Zen 5's with the default tuning's K blocks).
fn parse_tuning(s: &str) -> Result<Tuning, Box<dyn std::error::Error>> {
    Ok(match s {
        "intel" => Tuning::INTEL,
        "zen4" => Tuning::ZEN4,
        "zen5" => Tuning::ZEN5,
        "zen5-blocked" => Tuning {
            gemm_kc: Tuning::DEFAULT.gemm_kc,
            ..Tuning::ZEN5
        },
        "default" => Tuning::DEFAULT,
        _ => match s.split(',').collect::<Vec<_>>()[..] {
            [w, k, l, ref rest @ ..] if rest.len() <= 4 => Tuning {
                winograd_wide_width: w.parse()?,
                winograd_wide_min_kept: k.parse()?,
                lines_max_kept: l.parse()?,
                winograd_f4_min_width: match rest.first() {
                    Some(&"none") | None => usize::MAX,
                    Some(f) => f.parse()?,
                },
                depthwise_strip_bytes: match rest.get(1) {
                    Some(kib) => kib.parse::<usize>()? << 10,
                    None => Tuning::DEFAULT.depthwise_strip_bytes,
                },
                pack_misaligned_avx512: match rest.get(2) {
                    Some(&"none") => usize::MAX,
                    Some(k) => k.parse()?,
                    None => Tuning::DEFAULT.pack_misaligned_avx512,
                },
                gemm_kc: match rest.get(3) {
                    Some(&"all") => usize::MAX,
                    Some(k) => k.parse()?,
                    None => Tuning::DEFAULT.gemm_kc,
                },
                rows_major: Tuning::DEFAULT.rows_major,
            },
            _ => {
                return Err(
                    "--tuning takes intel, zen4, zen5, zen5-blocked, default or WIDTH,MIN_KEPT,LINES[,F4_WIDTH[,STRIP_KIB[,PACK14_K[,KC]]]]"
                        .into(),
                )
            }
        },
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut batch, mut pairs, mut budget, mut layers) = (1usize, 20usize, None, false);
    let mut tiles: Option<f64> = None;
    let mut without = String::from("winograd");
    let mut tuning = Tuning::detect();
    let mut against = Tuning::DEFAULT;
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batch" => batch = args.next().ok_or("--batch needs a value")?.parse()?,
            "--pairs" => pairs = args.next().ok_or("--pairs needs a value")?.parse()?,
            "--budget" => budget = Some(args.next().ok_or("--budget needs a value")?.parse()?),
            "--tiles" => tiles = Some(args.next().ok_or("--tiles needs a value")?.parse()?),
            "--without" => without = args.next().ok_or("--without needs a path")?,
            "--tuning" => tuning = parse_tuning(&args.next().ok_or("--tuning needs a value")?)?,
            "--against" => against = parse_tuning(&args.next().ok_or("--against needs a value")?)?,
            "--layers" => layers = true,
            _ => models.push(a),
        }
    }
    if pairs == 0 {
        return Err("--pairs must be at least 1".into());
    }
    let strip: fn(EngineExecutor) -> EngineExecutor = match without.as_str() {
        "winograd" => EngineExecutor::without_winograd,
        "batched-gates" => EngineExecutor::without_batched_gates,
        "winograd-lines" => EngineExecutor::without_winograd_lines,
        "winograd-bands" => EngineExecutor::without_winograd_bands,
        "kept-in-place" => EngineExecutor::without_kept_in_place,
        "panel-prefetch" => EngineExecutor::without_panel_prefetch,
        "summed-means" => EngineExecutor::without_summed_means,
        "thread-choice" => EngineExecutor::without_thread_choice,
        "transposed" => EngineExecutor::without_transposed,
        "rows-major" => EngineExecutor::without_rows_major,
        // A control: two engines alike, to see what placement alone does.
        "nothing" | "tuning" => |e| e,
        other => {
            return Err(format!(
                "unknown path {other}: winograd, batched-gates, winograd-lines, winograd-bands, \
                 tuning, kept-in-place, panel-prefetch, summed-means, thread-choice, transposed, \
                 rows-major or nothing"
            )
            .into())
        }
    };
    let policy = match (budget, tiles) {
        (Some(_), Some(_)) => return Err("--budget and --tiles exclude each other".into()),
        (Some(f), None) => Policy::Budget(Budget::Flops(f)),
        (None, Some(r)) => Policy::Gates(Gates {
            channels: Cut::All,
            tiles: Cut::Ratio(r),
        }),
        (None, None) => Policy::Dense,
    };
    for path in models {
        let model = Model::load(&path)?;
        let with = EngineExecutor::with_tuning(&model, Isa::detect(), tuning)?;
        let stripped = strip(if without == "tuning" {
            EngineExecutor::with_tuning(&model, Isa::detect(), against)?
        } else {
            EngineExecutor::with_tuning(&model, Isa::detect(), tuning)?
        });
        let [c, h, w] = model.layers[0].input;
        let input: Vec<f32> = (0..batch * c * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let nodes = model.desc.nodes.len();
        let (per_a, per_b) = (
            std::cell::RefCell::new(vec![Vec::new(); nodes]),
            std::cell::RefCell::new(vec![Vec::new(); nodes]),
        );
        let time = |e: &EngineExecutor,
                    per: &std::cell::RefCell<Vec<Vec<f64>>>|
         -> Result<f64, dynsparse::Error> {
            let start = Instant::now();
            let f = std::hint::black_box(e.forward_with(&input, batch, policy)?);
            let ms = start.elapsed().as_secs_f64() * 1e3;
            for (v, l) in per.borrow_mut().iter_mut().zip(&f.layers) {
                v.push(l.ms);
            }
            Ok(ms)
        };
        for _ in 0..3 {
            time(&with, &per_a)?;
            time(&stripped, &per_b)?;
        }
        per_a.borrow_mut().iter_mut().for_each(Vec::clear);
        per_b.borrow_mut().iter_mut().for_each(Vec::clear);
        // Strictly alternating passes, each after one of the other side. Pairs whose
        // order flipped from pair to pair ran each engine twice in a row at every
        // flip, and a pass after one of its own engine ran faster: the median of their
        // ratios read 1.04–1.10 for two engines alike on MobileNetV2 and
        // EfficientNet-Lite0 (`--without nothing`; 0.992–1.009 this way). Each "with"
        // pass is set against the mean of the "without" passes on either side of it.
        let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
        let mut before = time(&stripped, &per_b)?;
        per_b.borrow_mut().iter_mut().for_each(Vec::clear);
        for _ in 0..pairs {
            let x = time(&with, &per_a)?;
            let y = time(&stripped, &per_b)?;
            a.push(x);
            b.push(y);
            r.push(x / (0.5 * (before + y)));
            before = y;
        }
        if layers {
            let (mut pa, mut pb) = (per_a.into_inner(), per_b.into_inner());
            for (i, node) in model.desc.nodes.iter().enumerate() {
                let (x, y) = (median(&mut pa[i]), median(&mut pb[i]));
                if y > 0.0 && (x / y - 1.0).abs() > 0.02 {
                    println!(
                        "  {}: with {x:.3} ms, without {y:.3} ms ({:.2})",
                        node.name,
                        x / y
                    );
                }
            }
        }
        println!(
            "{path} batch {batch} {policy:?}: with {without} {:.2} ms, without {:.2} ms, ratio {:.3} (pairs {pairs})",
            median(&mut a),
            median(&mut b),
            median(&mut r)
        );
    }
    Ok(())
}
