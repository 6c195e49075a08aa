//! The conversion tool: a PyTorch checkpoint (or safetensors file) with the original
//! implementation's parameter names becomes one dynsparse model file, with BatchNorm
//! folded into the convolutions.
//!
//! ```no_run
//! use dynsparse::convert::convert;
//! let model = convert("resnet18", "resnet18.pth".as_ref(), None)?;
//! model.save("resnet18.dsm")?;
//! # Ok::<(), dynsparse::Error>(())
//! ```

mod arch;
pub mod checkpoint;
mod legacy;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use arch::Source;
pub use checkpoint::{sniff, Checkpoint, CheckpointKind};

use crate::error::{Error, Result};
use crate::format::{Model, TensorData};
use crate::model::{ModelDesc, FORMAT_VERSION};

/// Architectures `convert` accepts.
pub const ARCHITECTURES: &[&str] = &[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet20",
    "resnet56",
    "vgg16_bn",
    "mobilenet_v2",
    "efficientnet_lite0",
];

/// ImageNet-1k class names in torchvision's order, the default for 1000-class models.
pub fn imagenet_classes() -> Vec<String> {
    include_str!("../../models/imagenet_classes.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Reads a class-name file: one name per line, blank lines at the end ignored.
pub fn read_classes(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut names: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    while names.last().is_some_and(|l| l.is_empty()) {
        names.pop();
    }
    Ok(names)
}

/// Converts the checkpoint at `path` as architecture `arch`. `classes` overrides the
/// class names (ImageNet's for 1000 classes, otherwise "0", "1", … by default).
pub fn convert(arch: &str, path: &Path, classes: Option<Vec<String>>) -> Result<Model> {
    if !ARCHITECTURES.contains(&arch) {
        return Err(Error::UnknownArch(arch.to_string()));
    }
    let ckpt = checkpoint::read(path)?;
    convert_tensors(arch, &ckpt, classes)
}

/// Converts already-read checkpoint tensors; see [`convert`].
pub fn convert_tensors(
    arch: &str,
    ckpt: &Checkpoint,
    classes: Option<Vec<String>>,
) -> Result<Model> {
    let fc = arch::classifier_weight(arch).ok_or_else(|| Error::UnknownArch(arch.to_string()))?;
    let num_classes = ckpt
        .get(fc)
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(1000);
    let mut b =
        arch::build(arch, num_classes).ok_or_else(|| Error::UnknownArch(arch.to_string()))?;
    check_names(arch, ckpt, &b.sources)?;
    let gates = attach_gates(arch, ckpt, &mut b.nodes)?;

    let classes = match classes {
        Some(c) if c.len() != num_classes => {
            return Err(Error::Input(format!(
                "{} class names given, the checkpoint has {num_classes} classes",
                c.len()
            )))
        }
        Some(c) => c,
        None if num_classes == 1000 => imagenet_classes(),
        None => (0..num_classes).map(|i| i.to_string()).collect(),
    };
    let mut weights = HashMap::new();
    for (node, source) in &b.sources {
        let (w, bias) = fold(ckpt, source)?;
        weights.insert(format!("{node}.weight"), w);
        weights.insert(format!("{node}.bias"), bias);
    }
    weights.extend(gates);
    let desc = ModelDesc {
        format_version: FORMAT_VERSION,
        arch: arch.to_string(),
        input: b.input,
        preprocess: b.preprocess,
        classes,
        nodes: b.nodes,
    };
    Model::new(desc, weights)
}

/// Suffixes of the trained-gate tensors a checkpoint may carry beside a convolution
/// `{conv}` (see [`crate::model::ConvGate`]); they are copied as they are (BatchNorm does
/// not touch a gate, which reads the convolution's input).
const GATE_SUFFIXES: [(&str, bool); 4] = [
    (".gate.channel.weight", false),
    (".gate.channel.bias", false),
    (".gate.spatial.weight", true),
    (".gate.spatial.bias", true),
];

fn is_gate_tensor(name: &str) -> bool {
    GATE_SUFFIXES.iter().any(|(s, _)| name.ends_with(s))
}

/// Marks each convolution whose gate tensors the checkpoint carries and returns those
/// tensors under the node's name; shapes are checked when the model is built.
fn attach_gates(
    arch: &str,
    ckpt: &Checkpoint,
    nodes: &mut [crate::model::Node],
) -> Result<HashMap<String, TensorData>> {
    let mut out = HashMap::new();
    let mut stray = Vec::new();
    let mut names: Vec<&String> = ckpt.keys().filter(|k| is_gate_tensor(k)).collect();
    names.sort();
    for name in names {
        let (suffix, tiles) = GATE_SUFFIXES
            .iter()
            .find(|(s, _)| name.ends_with(s))
            .copied()
            .unwrap_or(("", false));
        let conv = &name[..name.len() - suffix.len()];
        let node = nodes.iter_mut().find(|n| n.name == conv);
        match node.map(|n| &mut n.op) {
            Some(crate::model::Op::Conv(c)) => {
                let g = c.gate.get_or_insert(crate::model::ConvGate {
                    channels: false,
                    tiles: false,
                });
                if tiles {
                    g.tiles = true;
                } else {
                    g.channels = true;
                }
                out.insert(name.clone(), ckpt[name].clone());
            }
            _ => stray.push(name.clone()),
        }
    }
    if !stray.is_empty() {
        return Err(Error::CheckpointMismatch {
            arch: arch.to_string(),
            details: format!(
                "gate tensors for no convolution of {arch}: {}",
                stray.join(", ")
            ),
        });
    }
    Ok(out)
}

/// Gives `model` the preprocessing `pre`. Its crop is the input size: a network that ends
/// in global pooling takes any, so the input changes with it; one that cannot is an error.
///
/// ```
/// let model = dynsparse::Model::from_bytes(dynsparse::demo::MODEL)?;
/// let mut pre = model.desc.preprocess.clone();
/// pre.crop = [96, 96];
/// pre.resize_shorter = 96;
/// let bigger = dynsparse::convert::with_preprocess(model, pre)?;
/// assert_eq!((bigger.desc.input.height, bigger.desc.input.width), (96, 96));
/// # Ok::<(), dynsparse::Error>(())
/// ```
pub fn with_preprocess(model: Model, pre: crate::model::Preprocess) -> Result<Model> {
    let mut desc = model.desc;
    desc.input.height = pre.crop[0] as usize;
    desc.input.width = pre.crop[1] as usize;
    desc.preprocess = pre;
    Model::new(desc, model.weights)
}

/// Reports every missing, mis-shaped and unexpected tensor at once.
fn check_names(arch: &str, ckpt: &Checkpoint, sources: &[(String, Source)]) -> Result<()> {
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut expected = BTreeSet::new();
    for (name, shape) in sources.iter().flat_map(|(_, s)| s.tensors()) {
        match ckpt.get(&name) {
            None => missing.push(name.clone()),
            Some(t) if t.shape != shape => {
                misshaped.push(format!("{name} is {:?}, expected {shape:?}", t.shape))
            }
            Some(_) => {}
        }
        expected.insert(name);
    }
    let mut unexpected: Vec<&String> = ckpt
        .keys()
        .filter(|k| {
            !expected.contains(*k) && !k.ends_with(".num_batches_tracked") && !is_gate_tensor(k)
        })
        .collect();
    unexpected.sort();
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    fn list<T: std::fmt::Display>(what: &str, items: &[T]) -> Option<String> {
        const SHOWN: usize = 8;
        if items.is_empty() {
            return None;
        }
        let shown: Vec<String> = items.iter().take(SHOWN).map(|s| s.to_string()).collect();
        let more = if items.len() > SHOWN {
            format!(", … ({} more)", items.len() - SHOWN)
        } else {
            String::new()
        };
        Some(format!(
            "{} {what}: {}{more}",
            items.len(),
            shown.join(", ")
        ))
    }
    let details = [
        list("missing", &missing),
        list("mis-shaped", &misshaped),
        list("unexpected", &unexpected),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("; ");
    Err(Error::CheckpointMismatch {
        arch: arch.to_string(),
        details,
    })
}

/// Folds BatchNorm into the preceding convolution:
/// w' = w·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β.
fn fold(ckpt: &Checkpoint, source: &Source) -> Result<(TensorData, TensorData)> {
    let get = |n: String| {
        ckpt.get(&n).ok_or_else(|| Error::CheckpointMismatch {
            arch: String::new(),
            details: format!("missing {n}"),
        })
    };
    match source {
        Source::Linear { name, .. } => Ok((
            get(format!("{name}.weight"))?.clone(),
            get(format!("{name}.bias"))?.clone(),
        )),
        Source::Conv {
            conv,
            has_bias,
            bn,
            eps,
            shape,
        } => {
            let w = get(format!("{conv}.weight"))?;
            let cout = shape[0];
            let mut bias = if *has_bias {
                get(format!("{conv}.bias"))?.data.clone()
            } else {
                vec![0.0; cout]
            };
            let mut wd = w.data.clone();
            if let Some(bn) = bn {
                let gamma = &get(format!("{bn}.weight"))?.data;
                let beta = &get(format!("{bn}.bias"))?.data;
                let mean = &get(format!("{bn}.running_mean"))?.data;
                let var = &get(format!("{bn}.running_var"))?.data;
                let per_out = wd.len() / cout;
                for o in 0..cout {
                    // f64 keeps the fold itself from adding rounding error.
                    let scale = gamma[o] as f64 / (var[o] as f64 + *eps as f64).sqrt();
                    for v in &mut wd[o * per_out..(o + 1) * per_out] {
                        *v = (*v as f64 * scale) as f32;
                    }
                    bias[o] = ((bias[o] as f64 - mean[o] as f64) * scale + beta[o] as f64) as f32;
                }
            }
            Ok((
                TensorData::new(w.shape.clone(), wd)?,
                TensorData::new(vec![cout], bias)?,
            ))
        }
    }
}
