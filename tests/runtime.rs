//! The library API: images of every supported pixel format, batches, threads, the demo.

mod common;

use std::io::Cursor;

use common::{bin, demo_model};
use dynsparse::{demo, preprocess::decode_image, Input, Model, Options, Runtime, TensorData};
use image::{DynamicImage, ImageFormat};

fn demo_runtime() -> Runtime {
    Runtime::from_bytes(
        demo::MODEL,
        Options {
            top_k: 3,
            ..Options::default()
        },
    )
    .expect("embedded model loads")
}

fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).expect("encode");
    out.into_inner()
}

#[test]
fn runtime_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Runtime>();
}

#[test]
fn every_pixel_format_gives_the_same_answer() {
    let rt = demo_runtime();
    let gray = decode_image(demo::SAMPLES[1].1).unwrap();
    assert!(matches!(gray, DynamicImage::ImageLuma8(_)));
    let base = rt.infer(&gray).unwrap().remove(0);
    let label = demo::sample_label(demo::SAMPLES[1].0).unwrap();
    assert_eq!(base.top[0].class, label);
    let lossless = [
        DynamicImage::ImageRgb8(gray.to_rgb8()),
        DynamicImage::ImageRgba8(gray.to_rgba8()),
        DynamicImage::ImageLuma16(gray.to_luma16()),
        DynamicImage::ImageRgb16(gray.to_rgb16()),
        DynamicImage::ImageLumaA8(gray.to_luma_alpha8()),
    ];
    for img in lossless {
        let decoded = decode_image(&encode(&img, ImageFormat::Png)).unwrap();
        assert_eq!(decoded.color(), img.color(), "PNG keeps the pixel format");
        let p = rt.infer(&decoded).unwrap().remove(0);
        // Conversions to f32 may round in the last bit, nothing more.
        let err = common::rel_err(&p.logits, &base.logits);
        assert!(err < 1e-6, "{:?}: relative error {err}", img.color());
    }
    let jpeg = decode_image(&encode(
        &DynamicImage::ImageRgb8(gray.to_rgb8()),
        ImageFormat::Jpeg,
    ))
    .unwrap();
    let p = rt.infer(&jpeg).unwrap().remove(0);
    assert_eq!(p.top[0].class, label, "JPEG");
}

#[test]
fn batch_equals_one_at_a_time_and_threads_equal_sequential() {
    let rt = demo_runtime();
    let imgs = common::heldout_images(24);
    let batch = rt.infer(&imgs).unwrap();
    assert_eq!(batch.len(), imgs.len());
    let single: Vec<_> = imgs
        .iter()
        .map(|i| rt.infer(i).unwrap().remove(0))
        .collect();
    for (b, s) in batch.iter().zip(&single) {
        assert_eq!(b.top[0].class, s.top[0].class);
        let err = common::rel_err(&b.logits, &s.logits);
        assert!(err < 1e-5, "batch vs single: {err}");
    }
    let concurrent: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = imgs
            .iter()
            .map(|img| {
                let rt = &rt;
                scope.spawn(move || rt.infer(img).unwrap().remove(0).logits)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (c, s) in concurrent.iter().zip(&single) {
        assert_eq!(c, &s.logits, "concurrent infer differs from sequential");
    }
}

#[test]
fn demo_model_is_accurate_and_reproducible() {
    let rt = demo_runtime();
    let heldout = demo::heldout().unwrap();
    assert_eq!(heldout.len(), 1000);
    let imgs: Vec<DynamicImage> = heldout.iter().map(|(i, _)| i.clone()).collect();
    let preds = rt.infer(&imgs).unwrap();
    let correct = preds
        .iter()
        .zip(&heldout)
        .filter(|(p, (_, l))| p.top[0].class == *l)
        .count();
    // PyTorch measured the same 1,000 canvases when the model was trained.
    let evidence = demo::evidence().unwrap();
    let dense = evidence.iter().find(|r| r.kind == "dense").unwrap();
    let got = correct as f64 / 10.0;
    assert!(
        (got - dense.accuracy).abs() <= 0.2,
        "held-out accuracy {got}% vs PyTorch's {}%",
        dense.accuracy
    );
    assert!(got >= 90.0, "held-out accuracy {got}%");

    // The embedded bytes are the committed file, and the committed checkpoint converts to it.
    assert_eq!(std::fs::read(demo_model()).unwrap(), demo::MODEL);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let classes = dynsparse::convert::read_classes(&root.join("classes.txt")).unwrap();
    let fresh =
        dynsparse::convert::convert("resnet20", &root.join("demo.safetensors"), Some(classes))
            .unwrap();
    let pre = serde_json::from_str(&std::fs::read_to_string(root.join("preprocess.json")).unwrap())
        .unwrap();
    let fresh = dynsparse::convert::with_preprocess(fresh, pre).unwrap();
    let embedded = Model::from_bytes(demo::MODEL).unwrap();
    assert_eq!(fresh.desc, embedded.desc);
    assert_eq!(fresh.weights, embedded.weights);
}

#[test]
fn tensor_input_gives_one_result_per_row() {
    let rt = demo_runtime();
    let imgs = common::heldout_images(3);
    let mut data = Vec::new();
    for img in &imgs {
        data.extend(dynsparse::preprocess::preprocess(img, &rt.model().desc.preprocess).unwrap());
    }
    let i = rt.model().desc.input;
    let t = TensorData::new(vec![3, 3, i.height, i.width], data).unwrap();
    let from_tensor = rt.infer(Input::Tensor(&t)).unwrap();
    let from_images = rt.infer(&imgs).unwrap();
    for (a, b) in from_tensor.iter().zip(&from_images) {
        assert_eq!(a.logits, b.logits);
    }
}

#[test]
fn cli_infer_json_and_demo() {
    let dir = std::env::temp_dir().join(format!("dynsparse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = demo_runtime();
    let img = decode_image(demo::SAMPLES[2].1).unwrap();
    let row = dynsparse::preprocess::preprocess(&img, &rt.model().desc.preprocess).unwrap();
    let i = rt.model().desc.input;
    let t = TensorData::new(vec![2, 3, i.height, i.width], [row.clone(), row].concat()).unwrap();
    let npy = dir.join("x.npy");
    std::fs::write(&npy, dynsparse::npy::to_bytes(&t)).unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "infer",
            "--model",
            demo_model().to_str().unwrap(),
            "--tensor",
            npy.to_str().unwrap(),
            "--json",
            "--top-k",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let label = demo::sample_label(demo::SAMPLES[2].0).unwrap();
    for r in results {
        assert_eq!(r["top"].as_array().unwrap().len(), 2);
        assert_eq!(r["top"][0]["class"], label);
        assert_eq!(r["top"][0]["label"], label.to_string());
        assert!(r["top"][0]["prob"].as_f64().unwrap() > 0.5);
        assert_eq!(r["logits"].as_array().unwrap().len(), 10);
        assert_eq!(r["stats"]["flops_dense"], rt.model().flops_per_sample());
        assert_eq!(r["stats"]["flops_executed"], rt.model().flops_per_sample());
        assert!(r["stats"]["latency_ms"].as_f64().unwrap() > 0.0);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let out = std::process::Command::new(bin())
        .arg("demo")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("held-out set: 1000 canvases"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("canvas_")).count(),
        demo::SAMPLES.len()
    );
    // Every policy row: dense, the trained gates' threshold, two budgets, each ratio
    // trained and training-free, a training-free budget; then the static rows.
    for policy in ["dense ", "threshold 0.5 ", "budget 0.5 ", "ratio 0.25 "] {
        assert!(
            text.lines().any(|l| l.starts_with(policy)),
            "{policy}: {text}"
        );
    }
    assert!(text.contains("training-free"), "{text}");
    assert!(text.contains("static"), "{text}");
}

#[test]
fn own_thread_pool_gives_the_same_results() {
    let imgs = common::heldout_images(8);
    let shared = demo_runtime().infer(&imgs).unwrap();
    for threads in [1, 3] {
        let opts = Options {
            threads: Some(threads),
            ..Options::default()
        };
        let own = Runtime::from_bytes(demo::MODEL, opts)
            .unwrap()
            .infer(&imgs)
            .unwrap();
        for (a, b) in own.iter().zip(&shared) {
            assert!(
                common::rel_err(&a.logits, &b.logits) < 1e-6,
                "{threads} threads"
            );
        }
    }
    let zero = Options {
        threads: Some(0),
        ..Options::default()
    };
    assert!(Runtime::from_bytes(demo::MODEL, zero).is_err());
}
