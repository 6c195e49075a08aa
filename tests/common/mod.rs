//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Directory of the PyTorch reference fixtures made by `tests/make_reference.py`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("DYNSPARSE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"))
}

/// The fixture manifest; fails the test with instructions when fixtures are missing.
pub fn manifest() -> serde_json::Value {
    let path = fixtures().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\nmake the PyTorch reference fixtures first: python3 tests/make_reference.py",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    assert!(scale > 0.0, "reference is all zeros");
    diff / scale
}

/// Path of the built `dynsparse` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dynsparse"))
}

/// The committed demo model file.
pub fn demo_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo/demo.dsm")
}

/// A finished command's stdout, failing the test with its stderr when it failed.
pub fn succeeded(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A JSON file written by the binary.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The first `n` of the demo's held-out images.
pub fn heldout_images(n: usize) -> Vec<image::DynamicImage> {
    dynsparse::demo::heldout()
        .unwrap()
        .into_iter()
        .take(n)
        .map(|(i, _)| i)
        .collect()
}
