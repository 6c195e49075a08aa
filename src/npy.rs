//! Minimal `.npy` reading and writing for f32 arrays in C order — the format of
//! `dynsparse infer --tensor`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::TensorData;

const MAGIC: &[u8] = b"\x93NUMPY";

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("not a usable .npy file: {msg}"))
}

/// Reads a little-endian f32 (`<f4`) or f64 (`<f8`, converted) array in C order.
pub fn read(path: &Path) -> Result<TensorData> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("{}: {m}", path.display())),
        e => e,
    })
}

/// Parses `.npy` bytes; see [`read`].
pub fn parse(bytes: &[u8]) -> Result<TensorData> {
    if !bytes.starts_with(MAGIC) || bytes.len() < 10 {
        return Err(bad("missing the NUMPY magic"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported version {v}"))),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .ok_or_else(|| bad("header is cut short"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    let field = |key: &str| -> Result<&str> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| bad(format!("header lacks '{key}'")))?;
        let rest = header[at + key.len() + 2..].trim_start();
        rest.strip_prefix(':')
            .map(str::trim_start)
            .ok_or_else(|| bad("malformed header"))
    };
    let descr = field("descr")?;
    let size = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(bad(format!(
            "dtype {} is not float32 (<f4) or float64 (<f8)",
            &descr[..descr.find(',').unwrap_or(descr.len())]
        )));
    };
    if !field("fortran_order")?.starts_with("False") {
        return Err(bad("Fortran-ordered arrays are not supported"));
    }
    let shape_txt = field("shape")?;
    let close = shape_txt.find(')').ok_or_else(|| bad("malformed shape"))?;
    let shape: Vec<usize> = shape_txt[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad(format!("bad dimension '{s}'"))))
        .collect::<Result<_>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let body = &bytes[hstart + hlen..];
    if body.len() != n * size {
        return Err(bad(format!(
            "shape {shape:?} needs {} bytes of data, file has {}",
            n * size,
            body.len()
        )));
    }
    let data = if size == 4 {
        body.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect()
    };
    TensorData::new(shape, data)
}

/// Serializes an f32 array as `.npy` (version 1.0).
pub fn to_bytes(t: &TensorData) -> Vec<u8> {
    let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so the data starts on a 64-byte boundary, as numpy does.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &t.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let t = TensorData::new(vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, 1e-8, 7.0]).unwrap();
        let bytes = to_bytes(&t);
        assert_eq!(
            (10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64,
            0
        );
        assert_eq!(parse(&bytes).unwrap(), t);
        let mut short = bytes.clone();
        short.pop();
        assert!(parse(&short)
            .unwrap_err()
            .to_string()
            .contains("needs 24 bytes"));
        let mut int = bytes.clone();
        let at = int.windows(3).position(|w| w == b"<f4").unwrap();
        int[at + 1] = b'i';
        assert!(parse(&int).unwrap_err().to_string().contains("not float32"));
        assert!(parse(b"garbage").is_err());
    }
}
