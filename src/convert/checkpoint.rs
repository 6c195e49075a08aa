//! Reading checkpoints into named f32 tensors: PyTorch `.pth` in the zip format
//! (torch ≥ 1.6, through Candle's pickle reader), the legacy format (see `convert::legacy`)
//! and `.safetensors`. The format is recognised from the file's first bytes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::legacy;
use crate::error::{Error, Result};
use crate::format::TensorData;

/// Named tensors of a checkpoint, converted to f32.
pub type Checkpoint = HashMap<String, TensorData>;

/// Which container a checkpoint file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// torch ≥ 1.6 zip archive.
    TorchZip,
    /// torch < 1.6 sequential pickles.
    TorchLegacy,
    /// safetensors.
    Safetensors,
}

/// Recognises the container from the first bytes of a file.
pub fn sniff(head: &[u8]) -> Option<CheckpointKind> {
    if head.starts_with(b"PK\x03\x04") {
        Some(CheckpointKind::TorchZip)
    } else if legacy::is_legacy(head) {
        Some(CheckpointKind::TorchLegacy)
    } else if head.len() > 8 && head[8] == b'{' {
        Some(CheckpointKind::Safetensors)
    } else {
        None
    }
}

/// Reads every tensor of a checkpoint. A state dict nested under `state_dict` or `model`
/// is found, and a `module.` prefix (from `DataParallel`) is removed.
pub fn read(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let kind = sniff(&bytes).ok_or_else(|| {
        Error::Checkpoint(format!(
            "{}: not a PyTorch checkpoint (zip or legacy) nor a safetensors file",
            path.display()
        ))
    })?;
    let tensors = match kind {
        CheckpointKind::TorchZip => read_zip(path)?,
        CheckpointKind::TorchLegacy => legacy::read(&bytes)?,
        CheckpointKind::Safetensors => read_safetensors(&bytes)?,
    };
    if tensors.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{}: holds no tensors",
            path.display()
        )));
    }
    Ok(strip_prefix(tensors, "module."))
}

fn strip_prefix(tensors: Checkpoint, prefix: &str) -> Checkpoint {
    if tensors.keys().all(|k| k.starts_with(prefix)) {
        tensors
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v))
            .collect()
    } else {
        tensors
    }
}

fn read_zip(path: &Path) -> Result<Checkpoint> {
    let err = |e: candle_core::Error| Error::Checkpoint(format!("{}: {e}", path.display()));
    for key in [None, Some("state_dict"), Some("model")] {
        let pth = candle_core::pickle::PthTensors::new(path, key).map_err(err)?;
        if pth.tensor_infos().is_empty() {
            continue;
        }
        let mut out = HashMap::new();
        for name in pth.tensor_infos().keys() {
            let t = pth.get(name).map_err(err)?.ok_or_else(|| {
                Error::Checkpoint(format!("tensor '{name}' vanished while reading"))
            })?;
            out.insert(name.clone(), to_data(&t).map_err(err)?);
        }
        return Ok(out);
    }
    Ok(HashMap::new())
}

fn to_data(t: &Tensor) -> candle_core::Result<TensorData> {
    let shape = t.dims().to_vec();
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(TensorData { shape, data })
}

fn read_safetensors(bytes: &[u8]) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Checkpoint(format!("safetensors: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.iter() {
        let d = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(Error::Checkpoint(format!(
                    "tensor '{name}' has unsupported dtype {other:?}"
                )));
            }
        };
        out.insert(
            name.to_string(),
            TensorData::new(view.shape().to_vec(), data)?,
        );
    }
    Ok(out)
}
