//! Dynamic execution on the CPU: a gated pass must equal, per sample, a pass of the
//! independent Candle reference executor over the same network with that sample's
//! dropped channels removed (weights and biases zeroed) and its skipped tiles replaced by
//! the residual or zero; with every gate open it must equal the dense pass; fewer kept
//! units must mean fewer FLOPs, and a FLOP budget must hold.

mod common;

use common::{demo_model, fixtures, manifest, rel_err};
use dynsparse::exec::cpu::{EngineExecutor, ReferenceExecutor};
use dynsparse::exec::{channel_order, gating, Budget, Cut, Executor, Forward, Gates, Policy};
use dynsparse::model::Op;
use dynsparse::{convert, npy, Model};

/// The model with, for one sample, every channel a gated pass dropped zeroed where its
/// gate decided it. A depthwise convolution after a gated one is left whole: it turns
/// the zero plane into its constant `act(bias)`, as the dense network would, and the
/// engine adds that constant's effect to the next layer's bias instead of computing it.
fn pruned(model: &Model, kept: &[Option<Vec<Vec<usize>>>], sample: usize) -> Model {
    let mut m = model.clone();
    for (node, k) in model.desc.nodes.iter().zip(kept) {
        let (Some(sets), Op::Conv(cv)) = (k, &node.op) else {
            continue;
        };
        if cv.groups > 1 {
            continue;
        }
        let keep = &sets[sample];
        let per_row = m.weights[&format!("{}.weight", node.name)].data.len() / cv.out_channels;
        let w = m.weights.get_mut(&format!("{}.weight", node.name)).unwrap();
        for o in (0..cv.out_channels).filter(|o| keep.binary_search(o).is_err()) {
            w.data[o * per_row..(o + 1) * per_row].fill(0.0);
        }
        let b = m.weights.get_mut(&format!("{}.bias", node.name)).unwrap();
        for o in (0..cv.out_channels).filter(|o| keep.binary_search(o).is_err()) {
            b.data[o] = 0.0;
        }
    }
    m
}

fn check(model: &Model, input: &[f32], batch: usize, name: &str) {
    let engine = EngineExecutor::new(model).unwrap();
    let dense = engine.forward(input, batch).unwrap();
    let dense_flops = model.flops_per_sample();

    // Every channel kept: the dense result at the dense cost. Gates that keep all but a
    // sliver keep everything after rounding, run the compact path and must still agree.
    let all = engine
        .forward_with(input, batch, Policy::Keep(1.0))
        .unwrap();
    assert_eq!(all.logits, dense, "{name}: keep 1.0 differs from dense");
    assert_eq!(all.flops.as_ref().unwrap(), &vec![dense_flops; batch]);
    let nearly = engine
        .forward_with(input, batch, Policy::Keep(0.999))
        .unwrap();
    let err = rel_err(&nearly.logits, &dense);
    println!("{name}: keep 0.999 (every channel after rounding) vs dense {err:.2e}");
    assert!(
        err <= 1e-5,
        "{name}: keep 0.999 differs from dense by {err:e}"
    );
    for &f in nearly.flops.as_ref().unwrap() {
        assert!(
            f > dense_flops && f < dense_flops + dense_flops / 50,
            "{name}: {f} vs {dense_flops}"
        );
    }

    // Every gate open after rounding, spatial gates included: still the dense result.
    let open = engine
        .forward_with(
            input,
            batch,
            Policy::Gates(Gates {
                channels: Cut::Ratio(0.999),
                tiles: Cut::Ratio(0.999),
            }),
        )
        .unwrap();
    let err = rel_err(&open.logits, &dense);
    println!("{name}: channels and tiles at 0.999 vs dense {err:.2e}");
    assert!(
        err <= 1e-5,
        "{name}: open gates differ from dense by {err:e}"
    );

    // Half the channels: each sample equals the dense pass of its pruned network.
    let half = against_reference(model, &engine, input, batch, Policy::Keep(0.5), name);
    let gated = half.kept.iter().filter(|k| k.is_some()).count();
    for &f in half.flops.as_ref().unwrap() {
        assert!(
            f < dense_flops * 4 / 5,
            "{name}: {f} FLOPs at keep 0.5 vs {dense_flops} dense ({gated} gated layers)"
        );
    }
    // Samples choose their own channels somewhere in the network.
    let differs = half
        .kept
        .iter()
        .flatten()
        .any(|sets| sets.iter().any(|k| k != &sets[0]));
    assert!(
        batch < 2 || differs,
        "{name}: every sample kept the same channels"
    );

    // Kept channels chosen in aligned groups of 12 (a packed block of weights): each
    // sample still equals its pruned network, and every gated layer keeps whole groups
    // but at most one.
    let grouped = EngineExecutor::new(model).unwrap().with_channel_groups(12);
    let fwd = against_reference(model, &grouped, input, batch, Policy::Keep(0.5), name);
    for (i, sets) in fwd.kept.iter().enumerate() {
        let Some(sets) = sets else { continue };
        let cout = model.layers[i].output[0];
        for k in sets {
            let mut per = vec![0; cout.div_ceil(12)];
            k.iter().for_each(|&c| per[c / 12] += 1);
            let partial = per
                .iter()
                .enumerate()
                .filter(|&(b, &n)| n > 0 && n < (cout - b * 12).min(12))
                .count();
            assert!(partial <= 1, "{name}: node {i} keeps {k:?} in groups of 12");
        }
    }

    // Channel and spatial gates by ratio, and by threshold.
    let both = Policy::Gates(Gates {
        channels: Cut::Ratio(0.5),
        tiles: Cut::Ratio(0.5),
    });
    let fwd = against_reference(model, &engine, input, batch, both, name);
    assert!(
        fwd.tiles.iter().any(Option::is_some),
        "{name}: no spatial gate ran"
    );
    for (f, h) in fwd.flops.unwrap().iter().zip(half.flops.as_ref().unwrap()) {
        assert!(f < h, "{name}: tiles saved nothing ({f} vs {h})");
    }
    let thresholds = Policy::Gates(Gates {
        channels: Cut::Threshold(0.5),
        tiles: Cut::Threshold(0.5),
    });
    against_reference(model, &engine, input, batch, thresholds, name);

    // A budget holds, the gates' own cost aside, and is mostly spent.
    for (budget, policy) in [
        (0.6, Policy::Budget(Budget::Flops(0.6))),
        (0.4, Policy::Budget(Budget::FlopsWithTiles(0.4))),
    ] {
        let fwd = engine.forward_with(input, batch, policy).unwrap();
        let limit = (budget * dense_flops as f64) as u64;
        for (f, g) in fwd.flops.unwrap().iter().zip(fwd.gate_flops.unwrap()) {
            println!(
                "{name}: {policy:?}: {:.3} of dense, gates {:.4}",
                (f - g) as f64 / dense_flops as f64,
                g as f64 / dense_flops as f64
            );
            assert!(
                f - g <= limit,
                "{name}: {policy:?} executed {} > {limit}",
                f - g
            );
            assert!(
                f - g >= limit * 4 / 5,
                "{name}: {policy:?} left a fifth unspent"
            );
        }
    }
    // An impossible budget is a clear error.
    let err = engine
        .forward_with(input, batch, Policy::Budget(Budget::Flops(0.001)))
        .unwrap_err();
    assert!(err.to_string().contains("below the least"), "{err}");
}

/// Runs `policy` and checks each sample against the reference pass of its pruned network
/// with its skipped pixels masked.
fn against_reference(
    model: &Model,
    engine: &EngineExecutor,
    input: &[f32],
    batch: usize,
    policy: Policy,
    name: &str,
) -> Forward {
    let fwd = engine.forward_with(input, batch, policy).unwrap();
    let per = input.len() / batch;
    let classes = fwd.logits.len() / batch;
    let dense_flops = model.flops_per_sample();
    for s in 0..batch {
        let pixels: Vec<Option<Vec<usize>>> = fwd
            .tiles
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_ref().map(|t| {
                    let [_, oh, ow] = model.layers[i].output;
                    let tiling = gating::cpu_tiling(oh, ow).expect("a spatial gate has a tiling");
                    gating::tile_pixels(&tiling, &t[s], [oh, ow])
                })
            })
            .collect();
        let reference = ReferenceExecutor::new(&pruned(model, &fwd.kept, s)).unwrap();
        let want = reference
            .forward_masked(&input[s * per..(s + 1) * per], &pixels)
            .unwrap();
        let got = &fwd.logits[s * classes..(s + 1) * classes];
        let err = rel_err(got, &want);
        let f = fwd.flops.as_ref().unwrap()[s];
        println!(
            "{name}: {policy:?} sample {s}: {:.3} of dense FLOPs, {} channel- and {} tile-gated layers, vs masked pruned reference {err:.2e}",
            f as f64 / dense_flops as f64,
            fwd.kept.iter().filter(|k| k.is_some()).count(),
            pixels.iter().filter(|p| p.is_some()).count(),
        );
        assert!(err <= 1e-4, "{name} {policy:?} sample {s}: {err:e}");
    }
    fwd
}

#[test]
fn gated_demo_model_equals_its_pruned_dense_network() {
    let model = Model::load(demo_model()).unwrap();
    let i = model.desc.input;
    let per = i.channels * i.height * i.width;
    // The demo's held-out digits: real inputs, so gates see real activation statistics.
    let imgs = dynsparse::demo::heldout().unwrap();
    let mut input = Vec::new();
    for (img, _) in imgs.iter().take(3) {
        input.extend(dynsparse::preprocess::preprocess(img, &model.desc.preprocess).unwrap());
    }
    assert_eq!(input.len(), 3 * per);
    check(&model, &input, 3, "resnet20 demo");
}

/// EfficientNet-Lite0 with its real ImageNet weights, and the two photos as a batch.
fn lite0_on_photos() -> (Model, Vec<f32>) {
    let m = manifest();
    let model = convert::convert(
        "efficientnet_lite0",
        m["lite0_checkpoint"].as_str().unwrap().as_ref(),
        None,
    )
    .unwrap();
    let mut input = Vec::new();
    for photo in ["cat", "espresso"] {
        let img = dynsparse::preprocess::load_image(m["photos"][photo].as_str().unwrap().as_ref())
            .unwrap();
        input.extend(dynsparse::preprocess::preprocess(&img, &model.desc.preprocess).unwrap());
    }
    (model, input)
}

/// The fixture of `arch` converted, and its batch of three inputs.
fn fixture_model(arch: &str) -> (Model, Vec<f32>) {
    let ckpt = manifest()["archs"][arch]["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let model = convert::convert(arch, ckpt.as_ref(), None).unwrap();
    let input = npy::read(&fixtures().join(arch).join("input_b3.npy")).unwrap();
    (model, input.data)
}

#[test]
fn gated_lite0_on_real_photos_equals_its_pruned_dense_network() {
    // The real ImageNet weights on the two photos: gates choose per picture.
    let (model, input) = lite0_on_photos();
    check(&model, &input, 2, "efficientnet_lite0 (photos)");
}

#[test]
fn gated_imagenet_models_equal_their_pruned_dense_networks() {
    for arch in ["mobilenet_v2", "resnet50"] {
        let (model, input) = fixture_model(arch);
        check(&model, &input, 3, arch);
    }
}

/// A model renumbered by calibrated channel orders is the same network: its dense logits
/// equal the original's, and its gated passes their own pruned dense networks. On the
/// real Lite0 weights and two photos, calibrated on those photos, the channels its gates
/// keep there lie mostly in each layer's leading run, where before they were spread.
#[test]
fn reordered_models_are_the_same_network_with_kept_channels_first() {
    let (lite0, photos) = lite0_on_photos();
    let mut cases = vec![("efficientnet_lite0 (photos)", lite0, photos, 2)];
    for arch in ["mobilenet_v2", "resnet50"] {
        let (model, input) = fixture_model(arch);
        cases.push((arch, model, input, 3));
    }
    for (name, model, input, batch) in cases {
        let (reordered, counts) = channel_order::calibrate(&model, &input).unwrap();
        assert_eq!(
            counts.passes,
            batch * channel_order::CALIBRATION_KEEPS.len()
        );
        let dense = EngineExecutor::new(&model)
            .unwrap()
            .forward(&input, batch)
            .unwrap();
        let again = EngineExecutor::new(&reordered)
            .unwrap()
            .forward(&input, batch)
            .unwrap();
        // Sums over input channels run in another order: as close as PyTorch's logits
        // are required to be (ResNet-50 moved by 2.1e-5).
        let err = rel_err(&again, &dense);
        assert!(
            err <= 1e-4,
            "{name}: reordered dense logits differ by {err:.2e}"
        );
        check(&reordered, &input, batch, &format!("{name}, reordered"));
        if batch == 2 {
            let share = |model: &Model| {
                let f = EngineExecutor::new(model)
                    .unwrap()
                    .forward_with(&input, batch, Policy::Keep(0.5))
                    .unwrap();
                let gated: Vec<usize> = gating::gateable(model).iter().map(|g| g.0).collect();
                let kept: Vec<Vec<usize>> = gated
                    .iter()
                    .filter_map(|&g| f.kept[g].clone())
                    .flatten()
                    .collect();
                channel_order::leading_share(&kept)
            };
            let (before, after) = (share(&model), share(&reordered));
            println!("{name}: kept channels in leading runs {before:.3} -> {after:.3}");
            assert!(after >= 0.9 && after > before + 0.2, "{before} -> {after}");
        }
    }
}

/// `dynsparse reorder` writes a model that computes what the original does, calibrated
/// on the images given or, given none, on the all-zero input, and reports how far the
/// kept channels moved into leading runs; a missing image is an error that writes
/// nothing.
#[test]
fn cli_reorder_writes_the_same_network() {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("dynsparse-reorder-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples");
    let model = Model::load(demo_model()).unwrap();
    let i = model.desc.input;
    let mut input = Vec::new();
    for img in common::heldout_images(4) {
        input.extend(dynsparse::preprocess::preprocess(&img, &model.desc.preprocess).unwrap());
    }
    assert_eq!(input.len(), 4 * i.channels * i.height * i.width);
    let dense = EngineExecutor::new(&model)
        .unwrap()
        .forward(&input, 4)
        .unwrap();
    // The demo's small network moves by rounding well under the 1e-5 that open gates
    // are held to (6.3e-7 of the largest on 200 held-out canvases).
    let same_network = |path: &std::path::Path, what: &str| {
        let reordered = Model::load(path).unwrap();
        let again = EngineExecutor::new(&reordered)
            .unwrap()
            .forward(&input, 4)
            .unwrap();
        let err = rel_err(&again, &dense);
        assert!(err <= 1e-5, "{what}: logits moved by {err:.2e}");
        assert_ne!(
            reordered.weights, model.weights,
            "{what}: nothing reordered"
        );
    };
    let reorder = |out: &std::path::Path, images: &[std::path::PathBuf]| {
        Command::new(common::bin())
            .args([
                "reorder",
                "--model",
                demo_model().to_str().unwrap(),
                "--output",
            ])
            .arg(out)
            .args(images)
            .output()
            .unwrap()
    };
    for (images, source) in [
        (vec![samples.clone()], "images"),
        (vec![], "all-zero input"),
    ] {
        let out = dir.join(format!("{}.dsm", images.len()));
        let stdout = common::succeeded(reorder(&out, &images));
        assert!(
            stdout.contains(source) && stdout.contains("after"),
            "{stdout}"
        );
        same_network(&out, source);
    }
    // The converter does the same as it writes the model (`--reorder IMAGES`), and a
    // calibration image it cannot read fails the conversion, leaving no file.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let convert = |out: &std::path::Path, images: &[std::path::PathBuf]| {
        Command::new(common::bin())
            .args(["convert", "--arch", "resnet20", "--input"])
            .arg(root.join("models/demo/demo.safetensors"))
            .arg("--preprocess")
            .arg(root.join("models/demo/preprocess.json"))
            .arg("--output")
            .arg(out)
            .arg("--reorder")
            .args(images)
            .output()
            .unwrap()
    };
    let converted = dir.join("converted.dsm");
    let stdout = common::succeeded(convert(&converted, std::slice::from_ref(&samples)));
    assert!(
        stdout.contains("images at keep") && stdout.contains("after"),
        "{stdout}"
    );
    same_network(&converted, "converted with --reorder");
    let no_image = vec![dir.join("no-such-image.png")];
    for (run, what) in [
        (
            &reorder as &dyn Fn(&std::path::Path, &[std::path::PathBuf]) -> std::process::Output,
            "reorder",
        ),
        (&convert, "convert --reorder"),
    ] {
        let out_path = dir.join("failed.dsm");
        let out = run(&out_path, &no_image);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no-such-image.png"),
            "{what}"
        );
        assert!(!out_path.exists(), "{what} left a file");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_keep_reports_fewer_flops_and_rejects_bad_ratios() {
    use std::process::Command;
    let png =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples/canvas_1_3.png");
    let run = |args: &[&str]| {
        Command::new(common::bin())
            .args(["infer", "--json", "--model", demo_model().to_str().unwrap()])
            .args(args)
            .arg(&png)
            .output()
            .unwrap()
    };
    let out = run(&["--keep", "0.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stats = &v["results"][0]["stats"];
    let (exec, dense) = (
        stats["flops_executed"].as_u64().unwrap(),
        stats["flops_dense"].as_u64().unwrap(),
    );
    assert!(exec < dense * 4 / 5, "{exec} of {dense}");
    let out = run(&["--dense"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["results"][0]["stats"]["flops_executed"],
        v["results"][0]["stats"]["flops_dense"]
    );
    // The same cut in aligned groups of channels: as many FLOPs.
    let out = run(&["--keep", "0.5", "--channel-groups", "4"]);
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["results"][0]["stats"]["flops_executed"], exec);
    // Rounded as a model's gates were trained: at 0.45 of 32 or 64 channels, counts in
    // steps of 1 keep fewer than any kernel's row tile (4 to 12) would.
    let flops = |args: &[&str]| {
        let out = run(args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["results"][0]["stats"]["flops_executed"].as_u64().unwrap()
    };
    assert!(
        flops(&["--keep", "0.45", "--channel-round", "1"]) < flops(&["--keep", "0.45"]),
        "--channel-round 1 kept as much as the kernel's rounding"
    );
    let out = run(&["--keep", "0.5", "--channel-round", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("channel_round must be at least 1"));
    let out = run(&["--keep", "0.5", "--channel-groups", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("channel_groups must be at least 1"));
    let out = run(&["--keep", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("keep ratio 0 is outside (0, 1]"));
    let out = run(&["--tile-threshold", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tile threshold 1 is outside (0, 1)"));
    // Gates that conflict are refused by the parser.
    assert_eq!(
        run(&["--keep", "0.5", "--budget", "0.5"]).status.code(),
        Some(2)
    );
}

#[test]
fn cli_budget_and_verbose_layers() {
    use std::process::Command;
    let png =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples/canvas_1_3.png");
    let run = |args: &[&str]| {
        let out = Command::new(common::bin())
            .args(["infer", "--json", "--model", demo_model().to_str().unwrap()])
            .args(args)
            .arg(&png)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["results"][0]["stats"].clone()
    };
    let s = run(&["--budget", "0.5", "--spatial"]);
    let (exec, gates, dense) = (
        s["flops_executed"].as_u64().unwrap(),
        s["flops_gates"].as_u64().unwrap(),
        s["flops_dense"].as_u64().unwrap(),
    );
    assert!(
        gates > 0 && exec - gates <= dense / 2,
        "{exec} - {gates} of {dense}"
    );
    assert!(s.get("layers").is_none(), "layers without --verbose");
    // Gates the model was trained with: no warning about training-free ones; a model
    // without trained gates gets one, and only when gated.
    let note = "carries no trained gates";
    let stderr = |model: &std::path::Path, args: &[&str]| {
        let out = Command::new(common::bin())
            .args(["infer", "--model", model.to_str().unwrap()])
            .args(args)
            .arg(&png)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(!stderr(&demo_model(), &["--budget", "0.5"]).contains(note));
    let plain = std::env::temp_dir().join(format!("dynsparse-plain-{}.dsm", std::process::id()));
    let m = Model::load(demo_model()).unwrap().without_trained_gates();
    std::fs::write(&plain, m.to_bytes().unwrap()).unwrap();
    assert!(stderr(&plain, &["--budget", "0.5"]).contains(note));
    assert!(!stderr(&plain, &[]).contains(note));
    let _ = std::fs::remove_file(&plain);
    let s = run(&["--keep", "0.5", "--tiles", "0.25", "--verbose"]);
    let layers = s["layers"].as_array().unwrap();
    let sum: u64 = layers.iter().map(|l| l["flops"].as_u64().unwrap()).sum();
    assert_eq!(sum, s["flops_executed"].as_u64().unwrap());
    let tiled = layers
        .iter()
        .filter(|l| l["tiles"].as_u64().unwrap() > 0)
        .map(|l| {
            (
                l["kept_tiles"].as_u64().unwrap(),
                l["tiles"].as_u64().unwrap(),
            )
        })
        .collect::<Vec<_>>();
    assert!(!tiled.is_empty());
    for (kept, all) in tiled {
        assert!(
            kept < all && kept * 4 >= all,
            "{kept} of {all} tiles at 0.25"
        );
    }
    assert!(layers
        .iter()
        .any(|l| l["kept_channels"].as_u64() < l["channels"].as_u64()));
}

#[test]
fn cli_bench_times_dense_and_gated_policies_in_one_run() {
    use std::process::Command;
    let json = std::env::temp_dir().join(format!("dynsparse-bench-{}.json", std::process::id()));
    let svg = json.with_extension("svg");
    let out = Command::new(common::bin())
        .args(["bench", "--model", demo_model().to_str().unwrap()])
        .args([
            "--batch",
            "1,2",
            "--keep",
            "0.5",
            "--budget",
            "0.4",
            "--spatial",
        ])
        .args([
            "--runs",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--layers",
            "--json",
        ])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .arg("--layer-plot")
        .arg(json.with_extension("layers.svg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| 2 | budget 0.4 spatial |"), "{text}");
    assert!(text.contains("layer1.0.conv1"), "{text}");
    // Gates timed at batch 2: the table says their time is summed over the samples.
    assert!(text.contains("summed over a batch's samples"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    let plot = std::fs::read_to_string(&svg).unwrap();
    std::fs::remove_file(&svg).ok();
    assert!(plot.starts_with("<svg") && plot.contains("ideal") && plot.contains("batch 2"));
    let bars = std::fs::read_to_string(json.with_extension("layers.svg")).unwrap();
    std::fs::remove_file(json.with_extension("layers.svg")).ok();
    assert!(bars.contains("per-layer time, batch 1") && bars.contains("budget 0.4 spatial"));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 6, "2 batches × (dense + 2 policies)");
    assert_eq!(results[0]["policy"], "dense");
    assert_eq!(results[0]["vs_dense"].as_f64(), Some(1.0));
    assert_eq!(results[0]["flops_fraction"].as_f64(), Some(1.0));
    let budget = &results[2];
    let spent = (budget["flops_executed"].as_f64().unwrap()
        - budget["flops_gates"].as_f64().unwrap())
        / v["flops_dense"].as_f64().unwrap();
    assert!(spent <= 0.4 && spent > 0.3, "budget 0.4 spent {spent}");
    assert!(results[1]["layers"].as_array().unwrap().len() > 10);
    // No rounding or groups asked for: none reported.
    assert!(v["channel_round"].is_null() && v["channel_groups"].is_null());
    // Asked for, they are in the header and the JSON.
    let out = Command::new(common::bin())
        .args(["bench", "--model", demo_model().to_str().unwrap()])
        .args([
            "--batch", "1", "--keep", "0.5", "--runs", "1", "--warmup", "0",
        ])
        .args(["--channel-round", "6", "--channel-groups", "6", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(json.with_extension("png"))
        .output()
        .unwrap();
    // A PNG plot: the SVG rasterized at twice its 720×480 size, drawn in colour. A
    // machine without any font cannot set its text, and says so.
    let png = json.with_extension("png");
    if out.status.success() {
        let img = image::open(&png).unwrap().to_rgb8();
        std::fs::remove_file(&png).ok();
        assert_eq!(img.dimensions(), (1440, 960));
        let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 10, "{} colours", colours.len());
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("PNG plots need a font"), "{err}");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rounded to 6; kept channels in groups of 6"),
        "{text}"
    );
    assert!(!text.contains("summed over a batch's samples"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert_eq!(
        (v["channel_round"].as_u64(), v["channel_groups"].as_u64()),
        (Some(6), Some(6))
    );
    // Bad arguments are clear errors.
    let out = Command::new(common::bin())
        .args([
            "bench",
            "--model",
            demo_model().to_str().unwrap(),
            "--runs",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs must be at least 1"));
    let out = Command::new(common::bin())
        .args([
            "bench",
            "--model",
            demo_model().to_str().unwrap(),
            "--plot",
            "x.gif",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("x.gif: plots are written as SVG (.svg) or PNG (.png)"));
    // Policies the device gates cannot run are refused before a GPU is looked for; a
    // keep ratio and dense need one, and without one stop with the reason.
    let model = demo_model();
    let on_cuda = |extra: &[&str]| {
        let mut args = vec!["bench", "--model", model.to_str().unwrap()];
        args.extend(["--device", "cuda", "--runs", "1", "--batch", "1"]);
        args.extend(extra);
        Command::new(common::bin()).args(&args).output().unwrap()
    };
    for policy in [["--threshold", "0.5"], ["--budget", "0.5"]] {
        let out = on_cuda(&policy);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("budgets run on the CPU"), "{err}");
    }
    if dynsparse::exec::cuda::device_count() == 0 {
        for extra in [&[][..], &["--keep", "0.5"][..]] {
            let out = on_cuda(extra);
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("no CUDA driver"), "{err}");
        }
    }
}

#[test]
fn cli_profile_saves_a_granularity_that_infer_reads() {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("dynsparse-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("profile.json");
    let svg = dir.join("profile.svg");
    let out = Command::new(common::bin())
        .args([
            "profile",
            "--quick",
            "--runs",
            "2",
            "--threads",
            "1",
            "--out",
        ])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    common::succeeded(out);
    let p = dynsparse::profile::Profile::load(&json).unwrap();
    assert!(p.channel_round >= 1 && p.channel_round <= 16);
    assert_eq!(p.stairs.len(), 2);
    let channels = &p.stairs[0];
    assert_eq!(
        channels.counts,
        (1..=channels.shape.cout).collect::<Vec<_>>()
    );
    assert!(channels.ms.iter().all(|&m| m > 0.0));
    // The reader's own median is part of the pair's time at every count.
    assert_eq!(channels.reader_ms.len(), channels.counts.len());
    assert!(channels.reader_ms.iter().all(|&m| m > 0.0));
    assert!(p.stairs[1].reader_ms.is_empty());
    // Tile counts run in whole GEMM panels (2 tiles of 4×4), ascending, up to all 16.
    let tiles = &p.stairs[1];
    assert!(
        tiles.counts.iter().all(|k| k % 2 == 0),
        "{:?}",
        tiles.counts
    );
    assert_eq!(tiles.counts.last(), Some(&16));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));

    // Its granularity reaches the planner: a channel budget keeps multiples of it.
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples/canvas_1_3.png");
    let run = |profile: &std::path::Path| {
        Command::new(common::bin())
            .args(["infer", "--model", demo_model().to_str().unwrap()])
            .args(["--keep", "0.3", "--json", "--verbose", "--profile"])
            .arg(profile)
            .arg(&sample)
            .output()
            .unwrap()
    };
    let mut fixed = p.clone();
    fixed.channel_round = 4;
    let four = dir.join("four.json");
    fixed.save(&four).unwrap();
    let v: serde_json::Value = serde_json::from_str(&common::succeeded(run(&four))).unwrap();
    let layers = v["results"][0]["stats"]["layers"].as_array().unwrap();
    // The channel-gated layers (conv1 of each block, 16 to 64 channels).
    let kept: Vec<u64> = layers
        .iter()
        .filter(|l| l["name"].as_str().unwrap().ends_with("conv1") && l["name"] != "conv1")
        .map(|l| l["kept_channels"].as_u64().unwrap())
        .collect();
    assert_eq!(kept.len(), 9, "{layers:?}");
    assert!(!kept.is_empty(), "{layers:?}");
    assert!(kept.iter().all(|k| k % 4 == 0), "{kept:?}");

    // A profile from another micro-kernel is refused.
    let mut other = p;
    other.executor = "cpu-engine-elsewhere".into();
    let bad = dir.join("other.json");
    other.save(&bad).unwrap();
    let out = run(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("measured with cpu-engine-elsewhere"), "{err}");

    // A GPU profile is refused on the CPU; a batch is a GPU profile's alone; without a GPU
    // `--device cuda` stops with the reason.
    let mut gpu = other.clone();
    gpu.executor = "cuda".into();
    let gpu_json = dir.join("gpu.json");
    gpu.save(&gpu_json).unwrap();
    let out = run(&gpu_json);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("measured with cuda"));
    let profile = |extra: &[&str]| {
        Command::new(common::bin())
            .args(["profile", "--quick", "--runs", "1", "--out"])
            .arg(dir.join("never.json"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = profile(&["--batch", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch applies to --device cuda"));
    if dynsparse::exec::cuda::device_count() == 0 {
        let out = profile(&["--device", "cuda"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no CUDA driver"));
    }
    assert!(!dir.join("never.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_bench_reports_agreement_with_dense_on_a_folder_of_images() {
    use std::process::Command;
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples");
    let json = std::env::temp_dir().join(format!("dynsparse-quality-{}.json", std::process::id()));
    let svg = std::env::temp_dir().join(format!("dynsparse-quality-{}.svg", std::process::id()));
    let out = Command::new(common::bin())
        .args(["bench", "--model", demo_model().to_str().unwrap()])
        .args(["--batch", "2", "--threshold", "0.5", "--keep", "0.25"])
        .args([
            "--channel-round",
            "6",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--images",
        ])
        .arg(&samples)
        .arg("--json")
        .arg(&json)
        .arg("--quality-plot")
        .arg(&svg)
        .output()
        .unwrap();
    let text = common::succeeded(out);
    assert!(text.contains("top-1 agreement with dense"), "{text}");
    // The plot names every policy beside its point, and shows accuracy too.
    let plot = std::fs::read_to_string(&svg).unwrap();
    for name in ["dense", "threshold 0.5", "keep 0.25", "accuracy"] {
        assert!(plot.contains(name), "{name} missing from the quality plot");
    }
    let _ = std::fs::remove_file(&svg);
    let v: serde_json::Value = common::read_json(&json);
    let q = v["quality"].as_array().unwrap();
    assert_eq!(q.len(), 3, "{q:?}");
    assert_eq!(q[0]["policy"], "dense");
    assert_eq!(q[0]["agreement"], 1.0);
    assert_eq!(q[0]["images"], 8);
    // The sample names end in their labels: accuracy too (dense gets all eight right, as
    // `dynsparse demo` shows).
    assert_eq!(q[0]["accuracy"], 1.0, "{q:?}");
    assert!(text.contains("| accuracy |"), "{text}");
    // The trained gates at their operating point: most of the FLOPs go, the answers stay
    // (the sample canvases are classified alike dense and gated).
    let t = q.iter().find(|p| p["policy"] == "threshold 0.5").unwrap();
    assert!(t["flops_fraction"].as_f64().unwrap() < 0.6, "{q:?}");
    assert_eq!(t["agreement"], 1.0, "{q:?}");
    let k = q.iter().find(|p| p["policy"] == "keep 0.25").unwrap();
    assert!(k["flops_fraction"].as_f64().unwrap() < 0.9, "{q:?}");
    let _ = std::fs::remove_file(&json);

    // A folder without images is a clear error.
    let empty = std::env::temp_dir().join(format!("dynsparse-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(common::bin())
        .args([
            "bench",
            "--model",
            demo_model().to_str().unwrap(),
            "--images",
        ])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no images"));
    let _ = std::fs::remove_dir_all(&empty);

    // A quality plot needs images to measure quality on.
    let out = Command::new(common::bin())
        .args(["bench", "--model", demo_model().to_str().unwrap()])
        .args(["--quality-plot", "q.svg"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--images"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_bench_times_dense_peers_on_the_same_weights() {
    // ONNX Runtime and PyTorch run the demo model's weights, read from the model file
    // by benches/peers/dsm_peer.py; their logits must be ours.
    let json = std::env::temp_dir().join(format!("dynsparse-peers-{}.json", std::process::id()));
    let out = std::process::Command::new(common::bin())
        .args(["bench", "--model", demo_model().to_str().unwrap()])
        .args([
            "--batch", "1,2", "--keep", "0.5", "--runs", "2", "--warmup", "1",
        ])
        .args(["--threads", "1", "--peers", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let text = common::succeeded(out);
    assert!(text.contains("ours dense / peer"), "{text}");
    let v: serde_json::Value = common::read_json(&json);
    let peers = v["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 4, "{peers:?}");
    for p in peers {
        let name = p["peer"].as_str().unwrap();
        assert!(
            name.starts_with("onnxruntime") || name.starts_with("pytorch"),
            "{name}"
        );
        assert!(p["median_ms"].as_f64().unwrap() > 0.0);
        let diff = p["logits_rel_diff"].as_f64().unwrap();
        assert!(diff <= 1e-4, "{name}: logits differ from ours by {diff:e}");
    }
    let _ = std::fs::remove_file(&json);
}
