//! Representative convolution layers on the CPU engine and on the Candle reference,
//! reported in FLOP/s (criterion's "elements" are FLOPs here).
//!
//! Each layer is benchmarked as a one-convolution model (conv → global pool → 1-class
//! linear); the pool and the linear layer cost under 1% of the convolution.
//!
//! The `sparse` group runs gated pairs (a gated convolution and the convolution reading
//! it) at several kept fractions of channels and of tiles; its throughput counts the
//! FLOPs executed, so GFLOP/s compare directly with the dense pair's.
//!
//! The `bands` group runs a 1×1 expansion and the depthwise layer reading it, banded
//! together and layer by layer; the `winograd` group pairs of 3×3 layers by Winograd's
//! F(2×2, 3×3) and directly.
//!
//! `cargo bench --bench conv_layers`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dynsparse::exec::cpu::{EngineExecutor, ReferenceExecutor};
use dynsparse::exec::{Cut, Executor, Gates, Policy};
use dynsparse::synthetic::{conv_chain, pseudo_random, ConvSpec};
use dynsparse::Model;

struct Layer {
    name: &'static str,
    cin: usize,
    cout: usize,
    hw: usize,
    k: usize,
    stride: usize,
    depthwise: bool,
}

const LAYERS: &[Layer] = &[
    Layer {
        name: "3x3 256->256 14x14",
        cin: 256,
        cout: 256,
        hw: 14,
        k: 3,
        stride: 1,
        depthwise: false,
    },
    Layer {
        name: "3x3 64->64 56x56",
        cin: 64,
        cout: 64,
        hw: 56,
        k: 3,
        stride: 1,
        depthwise: false,
    },
    Layer {
        name: "1x1 1024->256 14x14",
        cin: 1024,
        cout: 256,
        hw: 14,
        k: 1,
        stride: 1,
        depthwise: false,
    },
    Layer {
        name: "1x1 64->256 56x56",
        cin: 64,
        cout: 256,
        hw: 56,
        k: 1,
        stride: 1,
        depthwise: false,
    },
    Layer {
        name: "7x7/2 3->64 224x224",
        cin: 3,
        cout: 64,
        hw: 224,
        k: 7,
        stride: 2,
        depthwise: false,
    },
    Layer {
        name: "3x3/2 128->128 28x28",
        cin: 128,
        cout: 128,
        hw: 28,
        k: 3,
        stride: 2,
        depthwise: false,
    },
    Layer {
        name: "dw 3x3 144 56x56",
        cin: 144,
        cout: 144,
        hw: 56,
        k: 3,
        stride: 1,
        depthwise: true,
    },
    Layer {
        name: "dw 3x3/2 96 112x112",
        cin: 96,
        cout: 96,
        hw: 112,
        k: 3,
        stride: 2,
        depthwise: true,
    },
    Layer {
        name: "dw 5x5 480 14x14",
        cin: 480,
        cout: 480,
        hw: 14,
        k: 5,
        stride: 1,
        depthwise: true,
    },
];

fn one_conv_model(l: &Layer) -> Model {
    let conv = ConvSpec {
        cout: l.cout,
        k: l.k,
        stride: l.stride,
        depthwise: l.depthwise,
    };
    conv_chain(l.cin, l.hw, &[conv]).expect("valid synthetic model")
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv");
    group.sample_size(20);
    for l in LAYERS {
        let model = one_conv_model(l);
        let flops = model.layers[0].flops;
        group.throughput(Throughput::Elements(flops));
        let input = pseudo_random(l.cin * l.hw * l.hw, 7);
        let engine = EngineExecutor::new(&model).unwrap();
        let reference = ReferenceExecutor::new(&model).unwrap();
        let executors: [(&str, &dyn Executor); 2] =
            [("engine", &engine), ("reference", &reference)];
        for (name, ex) in executors {
            group.bench_with_input(BenchmarkId::new(name, l.name), &input, |b, x| {
                b.iter(|| ex.forward(x, 1).unwrap())
            });
        }
    }
    group.finish();
}

/// Gated pairs: (name, input channels, size, the two convolutions).
const PAIRS: &[(&str, usize, usize, [ConvSpec; 2])] = &[
    (
        "3x3 64->64->64 56x56",
        64,
        56,
        [
            ConvSpec {
                cout: 64,
                k: 3,
                stride: 1,
                depthwise: false,
            },
            ConvSpec {
                cout: 64,
                k: 3,
                stride: 1,
                depthwise: false,
            },
        ],
    ),
    (
        "1x1 1024->256, 3x3 256->256 14x14",
        1024,
        14,
        [
            ConvSpec {
                cout: 256,
                k: 1,
                stride: 1,
                depthwise: false,
            },
            ConvSpec {
                cout: 256,
                k: 3,
                stride: 1,
                depthwise: false,
            },
        ],
    ),
];

fn bench_sparse(c: &mut Criterion) {
    let mut group = c.benchmark_group("sparse");
    group.sample_size(20);
    for &(name, cin, hw, convs) in PAIRS {
        let model = conv_chain(cin, hw, &convs).expect("valid synthetic model");
        let input = pseudo_random(cin * hw * hw, 7);
        let engine = EngineExecutor::new(&model).unwrap();
        let gates = |channels, tiles| Policy::Gates(Gates { channels, tiles });
        let mut policies = vec![("dense".to_string(), Policy::Dense)];
        for r in [0.75, 0.5, 0.25] {
            policies.push((format!("channels {r}"), gates(Cut::Ratio(r), Cut::All)));
            policies.push((format!("tiles {r}"), gates(Cut::All, Cut::Ratio(r))));
        }
        for (label, policy) in policies {
            let flops = engine
                .forward_with(&input, 1, policy)
                .unwrap()
                .flops
                .map_or(model.flops_per_sample(), |f| f[0]);
            group.throughput(Throughput::Elements(flops));
            let id = BenchmarkId::new(name, &label);
            group.bench_with_input(id, &input, |b, x| {
                b.iter(|| engine.forward_with(x, 1, policy).unwrap())
            });
        }
    }
    group.finish();
}

/// MobileNetV2's second block's expansion (16 → 96 at 112×112) and the stride-2
/// depthwise layer reading it: run together in bands, and layer by layer; dense and with
/// half the expanded channels kept.
fn bench_bands(c: &mut Criterion) {
    let mut group = c.benchmark_group("bands");
    group.sample_size(20);
    let conv = |cout, k, stride, depthwise| ConvSpec {
        cout,
        k,
        stride,
        depthwise,
    };
    let model = conv_chain(16, 112, &[conv(96, 1, 1, false), conv(96, 3, 2, true)])
        .expect("valid synthetic model");
    let input = pseudo_random(16 * 112 * 112, 7);
    let banded = EngineExecutor::new(&model).unwrap();
    let layered = EngineExecutor::new(&model).unwrap().without_bands();
    let half = Policy::Gates(Gates {
        channels: Cut::Ratio(0.5),
        tiles: Cut::All,
    });
    for (label, policy) in [("dense", Policy::Dense), ("channels 0.5", half)] {
        let flops = banded
            .forward_with(&input, 1, policy)
            .unwrap()
            .flops
            .map_or(model.flops_per_sample(), |f| f[0]);
        group.throughput(Throughput::Elements(flops));
        for (name, ex) in [("bands", &banded), ("layer by layer", &layered)] {
            group.bench_with_input(BenchmarkId::new(name, label), &input, |b, x| {
                b.iter(|| ex.forward_with(x, 1, policy).unwrap())
            });
        }
    }
    group.finish();
}

/// ResNet's stride-1 3×3 layers in pairs, by Winograd's F(2×2, 3×3) and directly: dense,
/// and gated at keep 0.5 (the second layer then reads half the channels). Throughput
/// counts the direct convolution's FLOPs either way.
fn bench_winograd(c: &mut Criterion) {
    let mut group = c.benchmark_group("winograd");
    group.sample_size(20);
    for (channels, hw) in [(128, 28), (256, 14), (512, 7)] {
        let conv = ConvSpec {
            cout: channels,
            k: 3,
            stride: 1,
            depthwise: false,
        };
        let model = conv_chain(channels, hw, &[conv, conv]).expect("valid synthetic model");
        let input = pseudo_random(channels * hw * hw, 7);
        let winograd = EngineExecutor::new(&model).unwrap();
        let direct = EngineExecutor::new(&model).unwrap().without_winograd();
        for (label, policy) in [("dense", Policy::Dense), ("keep 0.5", Policy::Keep(0.5))] {
            let flops = winograd
                .forward_with(&input, 1, policy)
                .unwrap()
                .flops
                .map_or(model.flops_per_sample(), |f| f[0]);
            group.throughput(Throughput::Elements(flops));
            let shape = format!("{channels}x{hw}x{hw} {label}");
            for (name, ex) in [("winograd", &winograd), ("direct", &direct)] {
                group.bench_with_input(BenchmarkId::new(name, &shape), &input, |b, x| {
                    b.iter(|| ex.forward_with(x, 1, policy).unwrap())
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench, bench_sparse, bench_bands, bench_winograd);
criterion_main!(benches);
