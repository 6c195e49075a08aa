//! Reader for PyTorch's legacy (pre-1.6) checkpoint format, which Candle does not read.
//!
//! The file is a sequence of pickles followed by raw storages:
//! 1. the magic number 0x1950a86a20f9469cfc6c, 2. the protocol version (1001),
//! 3. system info, 4. the saved object, whose tensors refer to storages through
//!    persistent ids `('storage', <type>, key, location, numel, view_metadata)`,
//! 5. the list of storage keys, then for each key in that order an 8-byte
//!    little-endian element count followed by the storage's bytes.
//!
//! Pickles 2–5 are parsed with Candle's pickle machine; the layout around them is ours.

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::pickle::{Object, Stack};

use super::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::TensorData;

/// Protocol 2, LONG1 of 10 bytes holding the magic number, STOP.
const MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];
const PROTOCOL_VERSION: i64 = 1001;

fn bad(msg: impl Into<String>) -> Error {
    Error::Checkpoint(format!("legacy PyTorch checkpoint: {}", msg.into()))
}

/// Whether the bytes start like a legacy PyTorch checkpoint.
pub fn is_legacy(head: &[u8]) -> bool {
    head.starts_with(&MAGIC_PICKLE)
}

/// Decodes one little-endian element into f32.
type Decode = fn(&[u8]) -> f32;

/// Element size and decoder of a storage, from its Python class name.
fn element(class: &str) -> Option<(usize, Decode)> {
    Some(match class {
        "FloatStorage" => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        "DoubleStorage" => (8, |b| {
            f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32
        }),
        "HalfStorage" => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        "BFloat16Storage" => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        "LongStorage" => (8, |b| {
            i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32
        }),
        "IntStorage" => (4, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32),
        "ShortStorage" => (2, |b| i16::from_le_bytes([b[0], b[1]]) as f32),
        "CharStorage" => (1, |b| b[0] as i8 as f32),
        "ByteStorage" | "BoolStorage" => (1, |b| b[0] as f32),
        _ => return None,
    })
}

fn next_pickle(cur: &mut Cursor<&[u8]>, what: &str) -> Result<Object> {
    let mut stack = Stack::empty();
    stack
        .read_loop(cur)
        .map_err(|e| bad(format!("cannot parse the {what} pickle ({e})")))?;
    stack
        .finalize()
        .map_err(|e| bad(format!("the {what} pickle is empty ({e})")))
}

/// A tensor's view of a storage, as pickled by `torch._utils._rebuild_tensor_v2`.
struct TensorRef {
    key: String,
    class: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn usizes(o: Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(v) | Object::List(v) => v
            .into_iter()
            .map(|x| x.int_or_long().ok().and_then(|i| usize::try_from(i).ok()))
            .collect(),
        _ => None,
    }
}

/// Recognises `_rebuild_tensor_v2(storage, offset, size, stride, …)`, also inside
/// `_rebuild_parameter(tensor, requires_grad, hooks)`.
fn tensor_ref(o: Object) -> Option<TensorRef> {
    let Object::Reduce { callable, args } = o else {
        return None;
    };
    let Object::Class { class_name, .. } = *callable else {
        return None;
    };
    let mut args = args.tuple().ok()?;
    if class_name == "_rebuild_parameter" {
        return tensor_ref(args.into_iter().next()?);
    }
    if class_name != "_rebuild_tensor_v2" || args.len() < 4 {
        return None;
    }
    let stride = usizes(args.remove(3))?;
    let shape = usizes(args.remove(2))?;
    let offset = usize::try_from(args.remove(1).int_or_long().ok()?).ok()?;
    let Object::PersistentLoad(pid) = args.remove(0) else {
        return None;
    };
    let mut pid = pid.tuple().ok()?;
    if pid.len() < 3 {
        return None;
    }
    let key = pid.remove(2).unicode().ok()?;
    let (_, class) = pid.remove(1).class().ok()?;
    Some(TensorRef {
        key,
        class,
        offset,
        shape,
        stride,
    })
}

/// Finds the state dict: the object itself, or its `state_dict`/`model` entry.
fn state_dict(obj: Object) -> Result<Vec<(Object, Object)>> {
    let Object::Dict(entries) = obj else {
        return Err(bad(
            "the saved object is not a state dict (a whole pickled model is not supported)",
        ));
    };
    let nested = entries.iter().position(|(k, v)| {
        matches!(k, Object::Unicode(s) if s == "state_dict" || s == "model")
            && matches!(v, Object::Dict(_))
    });
    match nested {
        Some(i) => match entries.into_iter().nth(i) {
            Some((_, Object::Dict(inner))) => Ok(inner),
            _ => Err(bad("nested state dict vanished")),
        },
        None => Ok(entries),
    }
}

/// Reads every tensor of a legacy checkpoint held in memory.
pub fn read(bytes: &[u8]) -> Result<Checkpoint> {
    if !is_legacy(bytes) {
        return Err(bad("missing magic number"));
    }
    let mut cur = Cursor::new(bytes);
    cur.set_position(MAGIC_PICKLE.len() as u64);
    match next_pickle(&mut cur, "protocol version")?.int_or_long() {
        Ok(PROTOCOL_VERSION) => {}
        Ok(v) => {
            return Err(bad(format!(
                "protocol version {v}, expected {PROTOCOL_VERSION}"
            )))
        }
        Err(_) => return Err(bad("protocol version is not an integer")),
    }
    next_pickle(&mut cur, "system info")?;
    let obj = next_pickle(&mut cur, "state dict")?;
    let keys: Vec<String> = match next_pickle(&mut cur, "storage keys")? {
        Object::List(v) | Object::Tuple(v) => v.into_iter().map(|k| k.unicode().ok()).collect(),
        _ => None,
    }
    .ok_or_else(|| bad("the storage key list is not a list of strings"))?;

    let mut refs = Vec::new();
    for (name, value) in state_dict(obj)? {
        let Object::Unicode(name) = name else {
            continue;
        };
        if let Some(r) = tensor_ref(value) {
            refs.push((name, r));
        }
    }
    let class_of: HashMap<String, String> = refs
        .iter()
        .map(|(_, r)| (r.key.clone(), r.class.clone()))
        .collect();

    // Storages follow in key order: an element count, then the elements.
    let mut pos = cur.position() as usize;
    let mut storages: HashMap<&str, (&[u8], &str)> = HashMap::new();
    for key in &keys {
        let class = class_of
            .get(key)
            .map(String::as_str)
            .unwrap_or("FloatStorage");
        let (size, _) =
            element(class).ok_or_else(|| bad(format!("unsupported storage type {class}")))?;
        let count = bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
            .ok_or_else(|| bad(format!("file ends before storage '{key}'")))?;
        let len = count
            .checked_mul(size)
            .ok_or_else(|| bad(format!("storage '{key}' is impossibly large")))?;
        let data = bytes
            .get(pos + 8..pos + 8 + len)
            .ok_or_else(|| bad(format!("file is truncated inside storage '{key}'")))?;
        storages.insert(key.as_str(), (data, class));
        pos += 8 + len;
    }

    let mut out = HashMap::new();
    for (name, r) in refs {
        let (data, class) = storages.get(r.key.as_str()).ok_or_else(|| {
            bad(format!(
                "tensor '{name}' refers to missing storage '{}'",
                r.key
            ))
        })?;
        let (size, decode) =
            element(class).ok_or_else(|| bad(format!("unsupported storage type {class}")))?;
        if r.shape.len() != r.stride.len() {
            return Err(bad(format!(
                "tensor '{name}' has mismatched size and stride"
            )));
        }
        // Every element a view can reach must lie inside its storage; checking the last
        // one up front also bounds the allocation below by the file's size.
        let reach = r
            .shape
            .iter()
            .zip(&r.stride)
            .try_fold(r.offset, |acc, (&n, &s)| {
                acc.checked_add(n.saturating_sub(1).checked_mul(s)?)
            });
        let numel = r.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
        let (Some(reach), Some(numel)) = (reach, numel) else {
            return Err(bad(format!("tensor '{name}' has an impossible shape")));
        };
        if numel > 0 && (reach >= data.len() / size || numel > data.len() / size) {
            return Err(bad(format!(
                "tensor '{name}' reaches past the end of its storage"
            )));
        }
        let mut values = Vec::with_capacity(numel);
        // Strided gather: works for contiguous and permuted views alike.
        let mut index = vec![0usize; r.shape.len()];
        for _ in 0..numel {
            let elem = r.offset
                + index
                    .iter()
                    .zip(&r.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let b = data.get(elem * size..(elem + 1) * size).ok_or_else(|| {
                bad(format!(
                    "tensor '{name}' reaches past the end of its storage"
                ))
            })?;
            values.push(decode(b));
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < r.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out.insert(name, TensorData::new(r.shape, values)?);
    }
    Ok(out)
}
