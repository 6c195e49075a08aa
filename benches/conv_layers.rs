//! Representative convolution layers on the CPU engine and on the Candle reference,
//! reported in FLOP/s (criterion's "elements" are FLOPs here).
//!
//! Each layer is benchmarked as a one-convolution model (conv → global pool → 1-class
//! linear); the pool and the linear layer cost under 1% of the convolution.
//!
//! `cargo bench --bench conv_layers`

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dynsparse::exec::cpu::{EngineExecutor, ReferenceExecutor};
use dynsparse::exec::Executor;
use dynsparse::model::{
    Act, ChannelOrder, Conv, InputSpec, Linear, ModelDesc, Node, Op, Padding, Preprocess,
    FORMAT_VERSION,
};
use dynsparse::{Model, TensorData};

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

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32 ^ seed).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn one_conv_model(l: &Layer) -> Model {
    let groups = if l.depthwise { l.cin } else { 1 };
    let conv = Conv {
        in_channels: l.cin,
        out_channels: l.cout,
        kernel: [l.k; 2],
        stride: [l.stride; 2],
        padding: Padding::Symmetric { pad: [l.k / 2; 2] },
        groups,
        residual: None,
        act: Act::Relu,
    };
    let desc = ModelDesc {
        format_version: FORMAT_VERSION,
        arch: "bench".into(),
        input: InputSpec {
            channels: l.cin,
            height: l.hw,
            width: l.hw,
        },
        preprocess: Preprocess {
            resize_shorter: l.hw as u32,
            crop: [l.hw as u32; 2],
            mean: [0.0; 3],
            std: [1.0; 3],
            channel_order: ChannelOrder::Rgb,
        },
        classes: vec!["x".into()],
        nodes: vec![
            Node {
                name: "conv".into(),
                input: 0,
                op: Op::Conv(conv),
            },
            Node {
                name: "pool".into(),
                input: 1,
                op: Op::GlobalAvgPool,
            },
            Node {
                name: "fc".into(),
                input: 2,
                op: Op::Linear(Linear {
                    in_features: l.cout,
                    out_features: 1,
                    act: Act::None,
                }),
            },
        ],
    };
    let w = |shape: Vec<usize>, seed| {
        TensorData::new(shape.clone(), pseudo_random(shape.iter().product(), seed)).unwrap()
    };
    let weights = HashMap::from([
        (
            "conv.weight".to_string(),
            w(vec![l.cout, l.cin / groups, l.k, l.k], 1),
        ),
        ("conv.bias".to_string(), w(vec![l.cout], 2)),
        ("fc.weight".to_string(), w(vec![1, l.cout], 3)),
        ("fc.bias".to_string(), w(vec![1], 4)),
    ]);
    Model::new(desc, weights).expect("valid bench model")
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

criterion_group!(benches, bench);
criterion_main!(benches);
