//! The model file: one `.safetensors` file holding BN-folded f32 weights, with the
//! [`ModelDesc`] as JSON under the `dynsparse.model` metadata key.
//!
//! Loading checks every tensor the description needs — name, shape and dtype — and
//! reports every mismatch at once.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};
use crate::model::{LayerInfo, ModelDesc};

/// Metadata key holding the JSON model description.
pub const META_MODEL: &str = "dynsparse.model";
/// Metadata key naming the file format; its value is [`FORMAT_NAME`].
pub const META_FORMAT: &str = "format";
/// Value of [`META_FORMAT`].
pub const FORMAT_NAME: &str = "dynsparse";

/// A dense f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl TensorData {
    /// Creates a tensor, checking that the data fills the shape.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Exec(format!(
                "shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(TensorData { shape, data })
    }
}

impl View for &TensorData {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = Vec::with_capacity(self.data.len() * 4);
        for v in &self.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// A loaded model: the validated description, per-node derived facts and the weights.
#[derive(Debug, Clone)]
pub struct Model {
    /// What the network computes.
    pub desc: ModelDesc,
    /// Per node: shapes, FLOPs, tensors (same order as `desc.nodes`).
    pub layers: Vec<LayerInfo>,
    /// Weights by name.
    pub weights: HashMap<String, TensorData>,
}

impl Model {
    /// Builds a model, validating the description and that `weights` holds exactly the
    /// tensors it needs with the right shapes.
    pub fn new(desc: ModelDesc, weights: HashMap<String, TensorData>) -> Result<Self> {
        let layers = desc.analyze()?;
        crate::exec::gating::check_trained(&desc.nodes, &layers)?;
        let mut problems = Vec::new();
        let mut needed = std::collections::HashSet::new();
        for (name, shape) in layers.iter().flat_map(|l| l.tensors.iter()) {
            needed.insert(name.as_str());
            match weights.get(name) {
                None => problems.push(format!("missing tensor '{name}' (shape {shape:?})")),
                Some(t) if &t.shape != shape => problems.push(format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?}",
                    t.shape
                )),
                Some(_) => {}
            }
        }
        let mut extra: Vec<&String> = weights
            .keys()
            .filter(|k| !needed.contains(k.as_str()))
            .collect();
        extra.sort();
        problems.extend(
            extra
                .into_iter()
                .map(|k| format!("unexpected tensor '{k}'")),
        );
        if !problems.is_empty() {
            return Err(Error::ModelTensors(problems.join("; ")));
        }
        Ok(Model {
            desc,
            layers,
            weights,
        })
    }

    /// The same network without its trained gates, so executors fall back to
    /// training-free ones (see [`crate::exec::gating`]): for comparing the two.
    ///
    /// ```
    /// let model = dynsparse::Model::from_bytes(dynsparse::demo::MODEL)?;
    /// let plain = model.without_trained_gates();
    /// assert!(dynsparse::exec::gating::has_trained_gates(&model.desc.nodes));
    /// assert!(!dynsparse::exec::gating::has_trained_gates(&plain.desc.nodes));
    /// # Ok::<(), dynsparse::Error>(())
    /// ```
    pub fn without_trained_gates(&self) -> Model {
        let mut m = self.clone();
        for n in &mut m.desc.nodes {
            if let crate::model::Op::Conv(c) = &mut n.op {
                c.gate = None;
            }
        }
        m.weights.retain(|k, _| !k.contains(".gate."));
        for l in &mut m.layers {
            l.tensors.retain(|(k, _)| !k.contains(".gate."));
        }
        m
    }

    /// Dense FLOPs for one sample.
    pub fn flops_per_sample(&self) -> u64 {
        self.layers.iter().map(|l| l.flops).sum()
    }

    /// Returns a weight the model was validated to hold.
    pub fn weight(&self, name: &str) -> Result<&TensorData> {
        self.weights
            .get(name)
            .ok_or_else(|| Error::ModelTensors(format!("missing tensor '{name}'")))
    }

    /// Reads and validates a model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes)
    }

    /// Parses and validates a model file held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::ModelFormat(format!("not a readable safetensors file ({e})")))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::ModelFormat(format!("not a readable safetensors file ({e})")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get(META_FORMAT).map(String::as_str) != Some(FORMAT_NAME) {
            return Err(Error::ModelFormat(
                "safetensors file without dynsparse metadata (convert checkpoints with `dynsparse convert`)".into(),
            ));
        }
        let json = meta
            .get(META_MODEL)
            .ok_or_else(|| Error::ModelFormat(format!("metadata key '{META_MODEL}' is missing")))?;
        let desc: ModelDesc = serde_json::from_str(json)
            .map_err(|e| Error::ModelFormat(format!("model description is invalid: {e}")))?;
        let mut weights = HashMap::new();
        let mut problems = Vec::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                problems.push(format!(
                    "tensor '{name}' has dtype {:?}, expected F32",
                    view.dtype()
                ));
                continue;
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            weights.insert(
                name.to_string(),
                TensorData::new(view.shape().to_vec(), data)?,
            );
        }
        if !problems.is_empty() {
            return Err(Error::ModelTensors(problems.join("; ")));
        }
        Self::new(desc, weights)
    }

    /// Serializes the model to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let json =
            serde_json::to_string(&self.desc).map_err(|e| Error::ModelFormat(e.to_string()))?;
        let meta = HashMap::from([
            (META_FORMAT.to_string(), FORMAT_NAME.to_string()),
            (META_MODEL.to_string(), json),
        ]);
        let sorted: BTreeMap<&String, &TensorData> = self.weights.iter().collect();
        safetensors::serialize(sorted, Some(meta)).map_err(|e| Error::ModelFormat(e.to_string()))
    }

    /// Writes the model file atomically: a failure leaves no file at `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("partial");
        let result = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(path, e));
        }
        Ok(())
    }
}
