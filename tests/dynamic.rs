//! Dynamic execution on the CPU: with channel gates, the gated pass must equal a dense pass
//! of the same network with each sample's dropped channels removed (weights and biases
//! zeroed), computed by the independent Candle reference executor; with every channel
//! kept it must equal the dense pass; and fewer channels must mean fewer FLOPs.

mod common;

use common::{demo_model, fixtures, manifest, rel_err};
use dynsparse::exec::cpu::{EngineExecutor, ReferenceExecutor};
use dynsparse::exec::{Executor, Policy};
use dynsparse::model::Op;
use dynsparse::{convert, npy, Model};

/// The model with, for one sample, every channel a gated pass dropped removed.
fn pruned(model: &Model, kept: &[Option<Vec<Vec<usize>>>], sample: usize) -> Model {
    let mut m = model.clone();
    for (node, k) in model.desc.nodes.iter().zip(kept) {
        let (Some(sets), Op::Conv(cv)) = (k, &node.op) else {
            continue;
        };
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

    // Half the channels: each sample equals the dense pass of its pruned network.
    let half = engine
        .forward_with(input, batch, Policy::Keep(0.5))
        .unwrap();
    let gated = half.kept.iter().filter(|k| k.is_some()).count();
    assert!(gated > 0, "{name}: nothing was gated");
    let per = input.len() / batch;
    let classes = dense.len() / batch;
    for s in 0..batch {
        let reference = ReferenceExecutor::new(&pruned(model, &half.kept, s)).unwrap();
        let want = reference
            .forward(&input[s * per..(s + 1) * per], 1)
            .unwrap();
        let got = &half.logits[s * classes..(s + 1) * classes];
        let err = rel_err(got, &want);
        let f = half.flops.as_ref().unwrap()[s];
        println!(
            "{name}: sample {s}, {gated} gated layers, {:.3} of dense FLOPs, vs pruned reference {err:.2e}",
            f as f64 / dense_flops as f64
        );
        assert!(err <= 1e-4, "{name} sample {s}: {err:e}");
        assert!(
            f < dense_flops * 4 / 5,
            "{name}: {f} FLOPs at keep 0.5 vs {dense_flops} dense"
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

#[test]
fn gated_lite0_on_real_photos_equals_its_pruned_dense_network() {
    // The real ImageNet weights on the two photos: gates choose per picture.
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
    check(&model, &input, 2, "efficientnet_lite0 (photos)");
}

#[test]
fn gated_imagenet_models_equal_their_pruned_dense_networks() {
    let m = manifest();
    for arch in ["mobilenet_v2", "resnet50"] {
        let ckpt = m["archs"][arch]["checkpoint"].as_str().unwrap();
        let model = convert::convert(arch, ckpt.as_ref(), None).unwrap();
        let input = npy::read(&fixtures().join(arch).join("input_b3.npy")).unwrap();
        check(&model, &input.data, 3, arch);
    }
}

#[test]
fn cli_keep_reports_fewer_flops_and_rejects_bad_ratios() {
    use std::process::Command;
    let png =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples/digit_1_5.png");
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
    let out = run(&["--keep", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("keep ratio 0 is outside (0, 1]"));
}
