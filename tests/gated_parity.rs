//! Trained gates: the runtime's per-layer masks, FLOPs and logits on the embedded demo
//! model equal those of the PyTorch reference (`models/gated.py`), recorded in the
//! committed fixture `tests/fixtures/gated_demo.json` by `models/demo/make_parity.py`.
//! Masks must be identical except where the reference's nearest score lay within 1e-4 of
//! the cut (a tie that float rounding may break either way); where every mask of a sample
//! agrees, its FLOPs must be equal and its logits within 1e-4 of the largest.

mod common;

use common::{demo_model, rel_err};
use dynsparse::exec::cpu::EngineExecutor;
use dynsparse::exec::{Budget, Cut, Executor, Gates, Policy};
use dynsparse::Model;
use serde_json::Value;

const NEAR_TIE: f64 = 1e-4;

fn cut(v: &Value) -> Cut {
    match (v["ratio"].as_f64(), v["threshold"].as_f64()) {
        (Some(r), None) => Cut::Ratio(r),
        (None, Some(t)) => Cut::Threshold(t),
        _ => Cut::All,
    }
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gated_demo.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture present")).unwrap()
}

#[test]
fn trained_gates_match_the_pytorch_reference() {
    let fx = fixture();
    let model = Model::load(demo_model()).unwrap();
    assert!(
        dynsparse::exec::gating::has_trained_gates(&model.desc.nodes),
        "the demo model carries no trained gates"
    );
    let samples: Vec<String> = fx["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo/samples");
    let mut input = Vec::new();
    for name in &samples {
        let img = dynsparse::preprocess::load_image(format!("{dir}/{name}").as_ref()).unwrap();
        input.extend(dynsparse::preprocess::preprocess(&img, &model.desc.preprocess).unwrap());
    }
    let batch = samples.len();
    // The reference does not round channel counts: neither does the engine here.
    let engine = EngineExecutor::new(&model).unwrap().with_channel_round(1);
    let index = |name: &str| {
        model
            .desc
            .nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    };
    for (pname, p) in fx["policies"].as_object().unwrap() {
        let spec = &p["spec"];
        let policy = match spec["budget"].as_f64() {
            Some(b) if spec["tiles"] == true => Policy::Budget(Budget::FlopsWithTiles(b)),
            Some(b) => Policy::Budget(Budget::Flops(b)),
            None => Policy::Gates(Gates {
                channels: cut(&spec[0]),
                tiles: cut(&spec[1]),
            }),
        };
        let fwd = engine.forward_with(&input, batch, policy).unwrap();
        let mut agree = vec![true; batch];
        let (mut units, mut ties) = (0, 0);
        for (conv, gates) in p["layers"].as_object().unwrap() {
            let i = index(conv);
            for (kind, got_all) in [("channels", &fwd.kept[i]), ("tiles", &fwd.tiles[i])] {
                let Some(want_all) = gates.get(kind) else {
                    continue;
                };
                let got_all = got_all
                    .as_ref()
                    .unwrap_or_else(|| panic!("{pname}: {conv} ran no {kind} gate"));
                assert_eq!(got_all.len(), batch);
                for (s, want) in want_all.as_array().unwrap().iter().enumerate() {
                    let kept: Vec<usize> = want["kept"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as usize)
                        .collect();
                    units += 1;
                    if got_all[s] == kept {
                        continue;
                    }
                    let margin = want["margin"].as_f64().unwrap_or(f64::INFINITY);
                    assert!(
                        margin <= NEAR_TIE,
                        "{pname}: {conv} {kind} sample {s}: runtime kept {:?}, PyTorch {:?} \
                         (nearest score {margin:.2e} from the cut)",
                        got_all[s],
                        kept
                    );
                    ties += 1;
                    agree[s] = false;
                }
            }
        }
        assert!(units > 0, "{pname}: the fixture lists no gates");
        let want_flops: Vec<u64> = p["flops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let classes = fwd.logits.len() / batch;
        let mut checked = 0;
        for s in (0..batch).filter(|&s| agree[s]) {
            let want: Vec<f32> = p["logits"][s]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let got = &fwd.logits[s * classes..(s + 1) * classes];
            let err = rel_err(got, &want);
            let flops = fwd.flops.as_ref().unwrap()[s];
            println!(
                "{pname} sample {s}: logits vs PyTorch {err:.2e}, FLOPs {flops} vs {}",
                want_flops[s]
            );
            assert!(err <= 1e-4, "{pname} sample {s}: logits differ by {err:e}");
            assert_eq!(flops, want_flops[s], "{pname} sample {s}: FLOPs");
            checked += 1;
        }
        println!("{pname}: {units} gate decisions, {ties} near-ties broken differently");
        assert!(
            checked * 2 >= batch,
            "{pname}: near-ties in most samples; the fixture no longer tests much"
        );
    }
}

/// The demo checkpoint's tensors, gates included.
fn demo_checkpoint() -> dynsparse::convert::Checkpoint {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo/demo.safetensors");
    dynsparse::convert::checkpoint::read(path.as_ref()).unwrap()
}

#[test]
fn converter_carries_gates_and_rejects_misplaced_ones() {
    let ckpt = demo_checkpoint();
    let model = dynsparse::convert::convert_tensors("resnet20", &ckpt, None).unwrap();
    let gated: Vec<&str> = model
        .desc
        .nodes
        .iter()
        .filter(|n| matches!(&n.op, dynsparse::model::Op::Conv(c) if c.gate.is_some()))
        .map(|n| n.name.as_str())
        .collect();
    // Nine blocks: conv1 (channels and tiles) and conv2 (tiles) of each.
    assert_eq!(gated.len(), 18, "{gated:?}");
    let plain = model.without_trained_gates();
    assert!(plain.weights.keys().all(|k| !k.contains(".gate.")));
    assert_eq!(plain.weights.len() + 9 * 2 + 18 * 2, model.weights.len());

    // A gate for a node that does not exist.
    let mut bad = ckpt.clone();
    let w = bad["layer1.0.conv1.gate.spatial.weight"].clone();
    bad.insert("layer9.0.conv1.gate.spatial.weight".into(), w);
    let err = dynsparse::convert::convert_tensors("resnet20", &bad, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("layer9.0.conv1.gate.spatial.weight"),
        "{err}"
    );

    // A channel gate where channels cannot be gated (conv2 adds the residual).
    let mut bad = ckpt.clone();
    for (suffix, from) in [("weight", "layer1.0.conv1"), ("bias", "layer1.0.conv1")] {
        let t = bad[&format!("{from}.gate.channel.{suffix}")].clone();
        bad.insert(format!("layer1.0.conv2.gate.channel.{suffix}"), t);
    }
    let err = dynsparse::convert::convert_tensors("resnet20", &bad, None).unwrap_err();
    assert!(err.to_string().contains("cannot be gated"), "{err}");

    // A mis-shaped gate, and half a gate.
    let mut bad = ckpt.clone();
    let t = dynsparse::TensorData::new(vec![3], vec![0.0; 3]).unwrap();
    bad.insert("layer2.0.conv2.gate.spatial.weight".into(), t);
    let err = dynsparse::convert::convert_tensors("resnet20", &bad, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("layer2.0.conv2.gate.spatial.weight"),
        "{err}"
    );
    let mut bad = ckpt;
    bad.remove("layer3.1.conv1.gate.channel.bias");
    let err = dynsparse::convert::convert_tensors("resnet20", &bad, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("missing tensor 'layer3.1.conv1.gate.channel.bias'"),
        "{err}"
    );
}

#[test]
fn trained_gates_reproduce_the_training_scripts_evidence() {
    reproduce_evidence(&demo_model(), include_str!("../models/demo/evidence.json"));
}

/// The demo's gates fine-tuned to keep channels in aligned groups of 6
/// (`DEMO_GROUPS=6 DEMO_INIT=models/demo/demo.safetensors DEMO_GATED_EPOCHS=6 python3
/// models/demo/make_demo.py OUT`): the runtime's `--channel-groups` rule reproduces what
/// the PyTorch reference's group rule recorded.
#[test]
fn group_trained_gates_reproduce_the_training_scripts_evidence() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/groups/demo.dsm");
    reproduce_evidence(&path, include_str!("../models/demo/groups/evidence.json"));
}

/// The held-out accuracy and FLOPs the PyTorch reference recorded at training time, at
/// the trained operating point (threshold 0.5) and at a ratio, with channel counts
/// rounded (and grouped) as the script did.
fn reproduce_evidence(model: &std::path::Path, evidence: &str) {
    let file: Value = serde_json::from_str(evidence).unwrap();
    let round = file["round"].as_u64().unwrap_or(1) as usize;
    let groups = file["groups"].as_u64().unwrap_or(1) as usize;
    let model = Model::load(model).unwrap();
    let engine = EngineExecutor::new(&model)
        .unwrap()
        .with_channel_round(round)
        .with_channel_groups(groups);
    let heldout = dynsparse::demo::heldout().unwrap();
    let mut input = Vec::new();
    for (img, _) in &heldout {
        input.extend(dynsparse::preprocess::preprocess(img, &model.desc.preprocess).unwrap());
    }
    let per = input.len() / heldout.len();
    for (name, cut) in [
        ("threshold 0.5", Cut::Threshold(0.5)),
        ("ratio 0.5", Cut::Ratio(0.5)),
    ] {
        let want = file["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == "trained" && r["policy"] == name)
            .unwrap();
        let (want_acc, want_flops) = (
            want["accuracy"].as_f64().unwrap(),
            want["flops"].as_f64().unwrap(),
        );
        let policy = Policy::Gates(Gates {
            channels: cut,
            tiles: cut,
        });
        let (mut correct, mut flops) = (0usize, 0u64);
        for (chunk, rows) in input.chunks(100 * per).zip(heldout.chunks(100)) {
            let fwd = engine.forward_with(chunk, rows.len(), policy).unwrap();
            let classes = fwd.logits.len() / rows.len();
            for (s, (_, label)) in rows.iter().enumerate() {
                let l = &fwd.logits[s * classes..(s + 1) * classes];
                let best = (0..classes).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
                correct += usize::from(best == *label);
            }
            flops += fwd.flops.unwrap().iter().sum::<u64>();
        }
        let acc = correct as f64 / heldout.len() as f64 * 100.0;
        let frac = flops as f64 / heldout.len() as f64 / model.flops_per_sample() as f64;
        println!("{name}: {acc:.1}% at {frac:.3} of dense FLOPs; PyTorch {want_acc:.1}% at {want_flops:.3}");
        assert!((acc - want_acc).abs() <= 0.2, "{name}: accuracy");
        assert!((frac - want_flops).abs() <= 0.002, "{name}: FLOPs");
    }
}
