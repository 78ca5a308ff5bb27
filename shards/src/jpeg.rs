//! JPEG decode and encode through libjpeg-turbo-rs, a pure-Rust port of libjpeg-turbo with its
//! SIMD paths: about twice as fast as the image crate's encoder. Its decoder can also scale by
//! 1/2, 1/4 or 1/8 inside the inverse DCT (Pillow's "draft" mode), so a large downscale decodes
//! fewer pixels; the odd eighths (7/8, ...) measured slower than a full decode plus a resize.
//!
//! This is the project's one JPEG decoder: shard validation and `verify` decode here, and so does
//! the training pipeline (`ferroclip-worker`'s `data::image::decode_rgb8` calls [`decode`]), where
//! it measured faster than the image crate's zune-jpeg (`bench/README-image.md`).

use libjpeg_turbo_rs::common::types::ScalingFactor;
use libjpeg_turbo_rs::decode::pipeline::Decoder;
use libjpeg_turbo_rs::{PixelFormat, Subsampling};

/// A decoded image, 3 bytes per pixel.
pub struct Rgb {
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// A JPEG whose headers are parsed: its size is known before the scan is decoded.
pub struct Jpeg<'a>(Decoder<'a>);

impl<'a> Jpeg<'a> {
    pub fn open(bytes: &'a [u8]) -> Result<Self, String> {
        Decoder::new(bytes).map(Jpeg).map_err(|e| e.to_string())
    }

    /// Width and height from the frame header.
    pub fn size(&self) -> (u32, u32) {
        let h = self.0.header();
        (h.width as u32, h.height as u32)
    }

    /// Decodes every scan fully (a corrupt or short scan is an error, not grey fill). With
    /// `min_short`, decodes at the smallest power-of-two reduction whose short side is still at
    /// least that.
    pub fn decode(self, min_short: Option<u32>) -> Result<Rgb, String> {
        let (w, h) = self.size();
        let mut d = self.0;
        d.set_output_format(PixelFormat::Rgb);
        d.set_stop_on_warning(true);
        if let Some(target) = min_short {
            let n = scale_eighths(w.min(h), target);
            if n < 8 {
                // n is 1, 2 or 4: n/8 in lowest terms is 1/(8/n).
                d.set_scale(ScalingFactor::try_new(1, 8 / n).map_err(|e| e.to_string())?);
            }
        }
        let img = d.decode_image().map_err(|e| e.to_string())?;
        let (width, height) = (img.width as u32, img.height as u32);
        if img.data.len() != width as usize * height as usize * 3 {
            return Err(format!(
                "decoder returned {} bytes for {width}x{height} RGB",
                img.data.len()
            ));
        }
        Ok(Rgb {
            pixels: img.data,
            width,
            height,
        })
    }
}

/// Opens and fully decodes.
pub fn decode(bytes: &[u8], min_short: Option<u32>) -> Result<Rgb, String> {
    Jpeg::open(bytes)?.decode(min_short)
}

/// The smallest N in {1, 2, 4, 8} with ceil(short * N / 8) >= target (libjpeg's scaled size).
fn scale_eighths(short: u32, target: u32) -> u32 {
    [1u32, 2, 4, 8]
        .into_iter()
        .find(|n| (short as u64 * *n as u64).div_ceil(8) >= target as u64)
        .unwrap_or(8)
}

/// Baseline JPEG with 4:2:0 chroma, as libjpeg (and so Pillow) writes by default.
pub fn encode(rgb: &[u8], w: u32, h: u32, quality: u8) -> Result<Vec<u8>, String> {
    if w == 0 || h == 0 || w > 65_535 || h > 65_535 {
        return Err(format!("cannot encode a {w}x{h} JPEG"));
    }
    if rgb.len() != w as usize * h as usize * 3 {
        return Err(format!("{} bytes are not a {w}x{h} RGB image", rgb.len()));
    }
    libjpeg_turbo_rs::compress(
        rgb,
        w as usize,
        h as usize,
        PixelFormat::Rgb,
        quality.clamp(1, 100),
        Subsampling::S420,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x * 255 / w) as u8, (y * 255 / h) as u8, 128]))
            .collect()
    }

    #[test]
    fn scale_is_the_smallest_that_keeps_the_short_side() {
        assert_eq!(scale_eighths(256, 224), 8);
        assert_eq!(scale_eighths(512, 224), 4);
        assert_eq!(scale_eighths(446, 224), 8);
        assert_eq!(scale_eighths(447, 224), 4);
        assert_eq!(scale_eighths(1000, 224), 2);
        assert_eq!(scale_eighths(1792, 224), 1);
        assert_eq!(scale_eighths(100, 224), 8);
    }

    #[test]
    fn round_trip_and_scaled_decode_match_the_full_image() {
        let (w, h) = (256, 192);
        let jpeg = encode(&gradient(w, h), w, h, 95).unwrap();
        assert_eq!(Jpeg::open(&jpeg).unwrap().size(), (256, 192));
        let full = decode(&jpeg, None).unwrap();
        assert_eq!((full.width, full.height), (256, 192));
        let max_err = full
            .pixels
            .iter()
            .zip(gradient(w, h))
            .map(|(a, b)| (*a as i32 - b as i32).abs())
            .max()
            .unwrap();
        assert!(max_err <= 8, "round-trip error {max_err}");
        // Short side 192 down to >= 96: 4/8.
        let half = decode(&jpeg, Some(96)).unwrap();
        assert_eq!((half.width, half.height), (128, 96));
        // Pixel (x, y) of the half-size image covers (2x.., 2y..) of the full one.
        let (x, y) = (100u32, 40u32);
        let a = &half.pixels[((y * 128 + x) * 3) as usize..][..3];
        let b = &full.pixels[((2 * y * 256 + 2 * x) * 3) as usize..][..3];
        for (p, q) in a.iter().zip(b) {
            assert!((*p as i32 - *q as i32).abs() <= 8, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn short_and_corrupt_scans_are_errors() {
        let jpeg = encode(&gradient(64, 64), 64, 64, 90).unwrap();
        assert!(decode(&jpeg[..jpeg.len() / 2], None).is_err());
        assert!(decode(b"not a jpeg", None).is_err());
        assert!(encode(&[0; 10], 4, 4, 90).is_err());
    }
}
