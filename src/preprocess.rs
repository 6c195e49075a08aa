//! Image decoding and preprocessing into the model's input layout (CHW f32), following
//! the model file's [`Preprocess`] metadata: resize the shorter side (bilinear), center
//! crop, scale to [0, 1], normalize per channel.

use std::path::Path;

use image::{imageops::FilterType, DynamicImage};

use crate::error::{Error, Result};
use crate::model::{ChannelOrder, Preprocess};

/// Decodes an image file (JPEG or PNG; 8- or 16-bit; grayscale, RGB or RGBA).
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(|e| match e {
        Error::Image(msg) => Error::Image(format!("{}: {msg}", path.display())),
        e => e,
    })
}

/// Decodes an image held in memory.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::Image("the file is empty".into()));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(e.to_string()))?;
    if reader.format().is_none() {
        return Err(Error::Image(
            "not a recognised image format (JPEG or PNG)".into(),
        ));
    }
    reader.decode().map_err(|e| Error::Image(e.to_string()))
}

/// Turns an image into `3 × crop[0] × crop[1]` normalized values (CHW).
pub fn preprocess(img: &DynamicImage, p: &Preprocess) -> Result<Vec<f32>> {
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(Error::Image(format!("image has no pixels ({w}×{h})")));
    }
    let [ch, cw] = p.crop;
    // Resize so the shorter side is `resize_shorter`, keeping the aspect ratio.
    let s = p.resize_shorter as f64 / w.min(h) as f64;
    let (rw, rh) = (
        ((w as f64 * s).round() as u32).max(cw),
        ((h as f64 * s).round() as u32).max(ch),
    );
    // Resize in f32 so every pixel format (8/16-bit, gray, RGBA) gives the same values.
    let rgb = DynamicImage::ImageRgb32F(img.to_rgb32f());
    // An image already at the target size is used as it is (a resize would blur it).
    let resized = if (rw, rh) == (w, h) {
        rgb.to_rgb32f()
    } else {
        rgb.resize_exact(rw, rh, FilterType::Triangle).to_rgb32f()
    };
    let top = ((rh - ch) as f64 / 2.0).round() as u32;
    let left = ((rw - cw) as f64 / 2.0).round() as u32;
    let plane = (ch * cw) as usize;
    let mut out = vec![0f32; 3 * plane];
    let order = match p.channel_order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    for y in 0..ch {
        for x in 0..cw {
            let px = resized.get_pixel(left + x, top + y);
            for (c, &src) in order.iter().enumerate() {
                out[c * plane + (y * cw + x) as usize] = (px[src] - p.mean[c]) / p.std[c];
            }
        }
    }
    Ok(out)
}
