//! Logits agree with PyTorch for every supported architecture, at batch 1 and batch 3,
//! with randomized BatchNorm statistics, for checkpoints in all three formats; with every
//! gate open, gated execution agrees with dense.

mod common;

use common::{fixtures, manifest, rel_err};
use dynsparse::exec::cpu::{gemm::Isa, EngineExecutor, ReferenceExecutor};
use dynsparse::exec::{Cut, Executor, Gates, Policy};
use dynsparse::{convert, npy, Input, Options, Runtime};

const TOLERANCE: f32 = 1e-4;

/// Every executor the CPU offers: the Candle reference and the engine with each
/// micro-kernel this machine can run.
fn executors(model: &dynsparse::Model) -> Vec<(String, Box<dyn Executor>)> {
    let mut v: Vec<(String, Box<dyn Executor>)> = vec![(
        "reference".into(),
        Box::new(ReferenceExecutor::new(model).unwrap()),
    )];
    let best = Isa::detect();
    for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
        let supported = match isa {
            Isa::Avx512 => best == Isa::Avx512,
            Isa::Avx2 => best != Isa::Portable,
            Isa::Portable => true,
        };
        if supported {
            v.push((
                format!("engine {isa:?}"),
                Box::new(EngineExecutor::with_isa(model, isa).unwrap()),
            ));
        }
    }
    v
}

fn check(arch: &str) {
    let m = manifest();
    let entry = &m["archs"][arch];
    let ckpt = entry["checkpoint"].as_str().expect("checkpoint path");
    let model =
        convert::convert(arch, ckpt.as_ref(), None).unwrap_or_else(|e| panic!("{arch}: {e}"));
    // Round-trip through the file format, as a user would.
    let bytes = model.to_bytes().expect("serialize");
    let rt = Runtime::from_bytes(&bytes, Options::default()).expect("load");
    let dir = fixtures().join(arch);
    for b in ["b1", "b3"] {
        let input = npy::read(&dir.join(format!("input_{b}.npy"))).expect("input fixture");
        let want = npy::read(&dir.join(format!("logits_{b}.npy"))).expect("logits fixture");
        let preds = rt.infer(Input::Tensor(&input)).expect("infer");
        assert_eq!(preds.len(), input.shape[0]);
        let got: Vec<f32> = preds
            .iter()
            .flat_map(|p| p.logits.iter().copied())
            .collect();
        let err = rel_err(&got, &want.data);
        println!("{arch} {b} runtime: relative error {err:.2e}");
        assert!(
            err <= TOLERANCE,
            "{arch} {b}: relative error {err:e} > {TOLERANCE:e}"
        );
        // Stats are per sample and count the whole network.
        assert_eq!(preds[0].stats.batch_size, input.shape[0]);
        assert_eq!(preds[0].stats.flops_dense, rt.model().flops_per_sample());
        // Every gate running but keeping everything after rounding (up to the 3,136
        // tiles of VGG's first layers): the dense result.
        let engine = EngineExecutor::new(rt.model()).unwrap();
        let open = Policy::Gates(Gates {
            channels: Cut::Ratio(0.9999),
            tiles: Cut::Ratio(0.9999),
        });
        let gated = engine
            .forward_with(&input.data, input.shape[0], open)
            .expect("gated forward");
        let dense = engine.forward(&input.data, input.shape[0]).unwrap();
        let err = rel_err(&gated.logits, &dense);
        println!("{arch} {b} open gates vs dense: {err:.2e}");
        assert!(err <= 1e-5, "{arch} {b}: open gates differ by {err:e}");
        assert!(gated.flops.unwrap()[0] > preds[0].stats.flops_dense);
        for (name, ex) in executors(rt.model()) {
            let got = ex.forward(&input.data, input.shape[0]).expect("forward");
            let err = rel_err(&got, &want.data);
            println!("{arch} {b} {name}: relative error {err:.2e}");
            assert!(
                err <= TOLERANCE,
                "{arch} {b} {name}: relative error {err:e} > {TOLERANCE:e}"
            );
        }
    }
}

#[test]
fn resnet18() {
    check("resnet18");
}
#[test]
fn resnet34() {
    check("resnet34");
}
#[test]
fn resnet50() {
    check("resnet50");
}
#[test]
fn resnet101() {
    check("resnet101");
}
#[test]
fn resnet20() {
    check("resnet20");
}
#[test]
fn resnet56() {
    check("resnet56");
}
#[test]
fn vgg16_bn() {
    check("vgg16_bn");
}
#[test]
fn mobilenet_v2() {
    check("mobilenet_v2");
}
#[test]
fn efficientnet_lite0() {
    check("efficientnet_lite0");
}

/// FLOP counts agree with the well-known figures (multiply-adds × 2).
#[test]
fn flop_counts() {
    let m = manifest();
    for (arch, gmacs) in [
        ("resnet18", 1.82),
        ("resnet50", 4.11),
        ("mobilenet_v2", 0.30),
        ("vgg16_bn", 15.47),
    ] {
        let ckpt = m["archs"][arch]["checkpoint"].as_str().unwrap();
        let model = convert::convert(arch, ckpt.as_ref(), None).unwrap();
        let got = model.flops_per_sample() as f64 / 2e9;
        assert!(
            (got - gmacs).abs() / gmacs < 0.02,
            "{arch}: {got:.3} GMACs, expected about {gmacs}"
        );
    }
}

/// The real EfficientNet-Lite0 ImageNet weights classify real photos correctly.
#[test]
fn efficientnet_lite0_real_photos() {
    let m = manifest();
    let ckpt = m["lite0_checkpoint"].as_str().unwrap();
    let model =
        convert::convert("efficientnet_lite0", ckpt.as_ref(), None).expect("convert real Lite0");
    let rt = Runtime::new(
        model,
        Options {
            top_k: 3,
            ..Options::default()
        },
    )
    .unwrap();
    let cat =
        dynsparse::preprocess::load_image(m["photos"]["cat"].as_str().unwrap().as_ref()).unwrap();
    let coffee =
        dynsparse::preprocess::load_image(m["photos"]["espresso"].as_str().unwrap().as_ref())
            .unwrap();
    let preds = rt.infer(&vec![cat, coffee]).unwrap();
    // ImageNet 281..=285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
    println!(
        "cat photo: {:?}\nespresso photo: {:?}",
        preds[0].top, preds[1].top
    );
    let top = &preds[0].top[0];
    assert!(
        (281..=285).contains(&top.class),
        "cat photo → {} ({})",
        top.label,
        top.class
    );
    let top = &preds[1].top[0];
    assert_eq!(
        top.label, "espresso",
        "espresso photo → {} ({})",
        top.label, top.class
    );
}

/// A legacy checkpoint cut anywhere gives an error, never a panic or a partial result.
#[test]
fn truncated_legacy_checkpoint_is_an_error() {
    let m = manifest();
    let ckpt = m["archs"]["resnet20"]["checkpoint"].as_str().unwrap();
    let bytes = std::fs::read(ckpt).unwrap();
    assert_eq!(
        convert::sniff(&bytes),
        Some(convert::CheckpointKind::TorchLegacy)
    );
    let dir = std::env::temp_dir().join(format!("dynsparse-legacy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cut_path = dir.join("cut.pth");
    for frac in [0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.9999] {
        let cut = (bytes.len() as f64 * frac) as usize;
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let err =
            convert::convert("resnet20", &cut_path, None).expect_err("truncated file converted");
        assert!(
            err.to_string().contains("checkpoint"),
            "cut at {cut}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
