//! Per-row checks and transforms, run in parallel on rayon: the caption must be non-empty UTF-8,
//! the image must decode fully and be within size limits; optionally it is downscaled and
//! re-encoded. Everything here is a pure function of the row, so results do not depend on scheduling.

use std::cell::RefCell;
use std::io::Cursor;

use bytes::Bytes;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{ImageFormat, ImageReader, Limits};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::jpeg;

/// Options that change what a row becomes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ValidateOptions {
    /// Downscale so the short side is this many pixels (never upscales), re-encoding as JPEG.
    pub resize: Option<u32>,
    pub quality: u8,
    /// Reject images whose short side is smaller.
    pub min_size: u32,
    /// Reject images whose long side is larger (also protects against decompression bombs).
    pub max_size: u32,
    pub max_caption_chars: usize,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions {
            resize: None,
            quality: 90,
            min_size: 1,
            max_size: 16384,
            max_caption_chars: 4096,
        }
    }
}

/// A caption as found in the source.
#[derive(Clone, Debug)]
pub enum RawCaption {
    Text(String),
    Bytes(Vec<u8>),
    Missing,
}

#[derive(Clone, Debug)]
pub struct Accepted {
    pub image: Bytes,
    pub caption: String,
    pub width: u32,
    pub height: u32,
    pub hash: u128,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}

/// The identity of a pair for exact-duplicate detection: 128 bits of SHA-256 over the source
/// image bytes and the caption. An image with several captions (COCO, Flickr30K) keeps them all;
/// only a repeated (image, caption) pair is a duplicate.
pub fn pair_hash(image: &[u8], caption: &str) -> u128 {
    let mut hasher = Sha256::new();
    // Length-prefixed, so no (image, caption) split of the same bytes collides with another.
    hasher.update((image.len() as u64).to_le_bytes());
    hasher.update(image);
    hasher.update(caption.as_bytes());
    let d = hasher.finalize();
    let mut h = [0u8; 16];
    h.copy_from_slice(&d[..16]);
    u128::from_le_bytes(h)
}

pub fn check_caption(raw: &RawCaption, opts: &ValidateOptions) -> Result<String, Rejection> {
    let text = match raw {
        RawCaption::Text(t) => t.as_str(),
        RawCaption::Bytes(b) => std::str::from_utf8(b)
            .map_err(|e| reject("caption_not_utf8", format!("caption is not UTF-8: {e}")))?,
        RawCaption::Missing => return Err(reject("caption_missing", "caption is null")),
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(reject("caption_empty", "caption is empty after trimming"));
    }
    let chars = t.chars().count();
    if chars > opts.max_caption_chars {
        return Err(reject(
            "caption_too_long",
            format!(
                "caption has {chars} characters (limit {})",
                opts.max_caption_chars
            ),
        ));
    }
    Ok(t.to_string())
}

pub fn validate(
    image: Option<&Bytes>,
    caption: &RawCaption,
    opts: &ValidateOptions,
) -> Result<Accepted, Rejection> {
    let caption = check_caption(caption, opts)?;
    let bytes = match image {
        Some(b) if !b.is_empty() => b,
        _ => return Err(reject("image_missing", "image is null or empty")),
    };
    let format = image::guess_format(bytes)
        .map_err(|e| reject("image_decode", format!("unknown image format: {e}")))?;
    if format == ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        // The JPEG decoder pads truncated scans silently; a missing end marker reveals them.
        return Err(reject(
            "image_decode",
            "truncated JPEG (no end-of-image marker)",
        ));
    }
    let Decoded { w, h, rgb } = if format == ImageFormat::Jpeg {
        decode_jpeg(bytes, opts)?
    } else {
        decode_other(bytes, format, opts)?
    };
    if w.min(h) < opts.min_size {
        return Err(reject(
            "image_too_small",
            format!(
                "image is {w}x{h}, short side below --min-size {}",
                opts.min_size
            ),
        ));
    }
    let hash = pair_hash(bytes, &caption);
    match (rgb, opts.resize) {
        (Some(rgb), Some(short)) => {
            let (nw, nh) = scaled(w, h, short);
            let encoded = resize_encode(&rgb, (nw, nh), opts.quality)
                .map_err(|e| reject("image_decode", format!("resize failed: {e}")))?;
            Ok(Accepted {
                image: Bytes::from(encoded),
                caption,
                width: nw,
                height: nh,
                hash,
            })
        }
        _ => Ok(Accepted {
            image: bytes.clone(),
            caption,
            width: w,
            height: h,
            hash,
        }),
    }
}

/// An image's original size and, when it is to be resized, its pixels (possibly decoded at a
/// reduced scale, never below the target short side).
struct Decoded {
    w: u32,
    h: u32,
    rgb: Option<jpeg::Rgb>,
}

/// The short side to resize to, if this image gets resized (never upscaled).
fn resize_to(w: u32, h: u32, opts: &ValidateOptions) -> Option<u32> {
    opts.resize.filter(|&s| w.min(h) > s)
}

fn decode_jpeg(bytes: &[u8], opts: &ValidateOptions) -> Result<Decoded, Rejection> {
    let undecodable = |e: String| reject("image_decode", format!("image does not decode: {e}"));
    let jpeg = jpeg::Jpeg::open(bytes).map_err(undecodable)?;
    let (w, h) = jpeg.size();
    if w.max(h) > opts.max_size {
        return Err(reject(
            "image_too_large",
            format!("image is {w}x{h}, exceeds {} px", opts.max_size),
        ));
    }
    let target = resize_to(w, h, opts);
    let rgb = jpeg.decode(target).map_err(undecodable)?;
    Ok(Decoded {
        w,
        h,
        rgb: target.map(|_| rgb),
    })
}

fn decode_other(
    bytes: &[u8],
    format: ImageFormat,
    opts: &ValidateOptions,
) -> Result<Decoded, Rejection> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(opts.max_size);
    limits.max_image_height = Some(opts.max_size);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => reject(
            "image_too_large",
            format!("image exceeds {} px: {e}", opts.max_size),
        ),
        e => reject("image_decode", format!("image does not decode: {e}")),
    })?;
    let (w, h) = (img.width(), img.height());
    let rgb = resize_to(w, h, opts).map(|_| jpeg::Rgb {
        pixels: img.into_rgb8().into_raw(),
        width: w,
        height: h,
    });
    Ok(Decoded { w, h, rgb })
}

/// Decodes an image fully with the decoder `shards build` uses; returns its size.
pub fn decoded_size(bytes: &[u8]) -> Result<(u32, u32), String> {
    match image::guess_format(bytes).map_err(|e| e.to_string())? {
        ImageFormat::Jpeg => jpeg::decode(bytes, None).map(|i| (i.width, i.height)),
        _ => image::load_from_memory(bytes)
            .map(|i| (i.width(), i.height()))
            .map_err(|e| e.to_string()),
    }
}

/// New size with the short side equal to `short`, keeping the aspect ratio.
pub fn scaled(w: u32, h: u32, short: u32) -> (u32, u32) {
    if w <= h {
        let nh = ((h as u64 * short as u64 + w as u64 / 2) / w as u64).max(1) as u32;
        (short, nh)
    } else {
        let nw = ((w as u64 * short as u64 + h as u64 / 2) / h as u64).max(1) as u32;
        (nw, short)
    }
}

/// A complete JPEG ends with EOI (FF D9), possibly followed by padding some encoders add.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Resizes (bilinear) to `size` unless the decoder already produced it, then encodes.
fn resize_encode(src: &jpeg::Rgb, size: (u32, u32), quality: u8) -> Result<Vec<u8>, String> {
    let (nw, nh) = size;
    if (src.width, src.height) == size {
        return jpeg::encode(&src.pixels, nw, nh, quality);
    }
    let from = ImageRef::new(src.width, src.height, &src.pixels, PixelType::U8x3)
        .map_err(|e| e.to_string())?;
    let mut dst = Image::new(nw, nh, PixelType::U8x3);
    // The resizer keeps scratch buffers; one per thread avoids reallocating them per image.
    thread_local! {
        static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
    }
    RESIZER.with(|r| {
        r.borrow_mut()
            .resize(
                &from,
                &mut dst,
                &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)),
            )
            .map_err(|e| e.to_string())
    })?;
    jpeg::encode(dst.buffer(), nw, nh, quality)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Bytes {
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        Bytes::from(jpeg::encode(&rgb, w, h, 90).unwrap())
    }

    fn text(s: &str) -> RawCaption {
        RawCaption::Text(s.to_string())
    }

    #[test]
    fn good_row_is_accepted_with_its_size() {
        let a = validate(
            Some(&jpeg(40, 30)),
            &text("  a cat "),
            &ValidateOptions::default(),
        )
        .unwrap();
        assert_eq!((a.width, a.height, a.caption.as_str()), (40, 30, "a cat"));
    }

    #[test]
    fn captions_are_checked() {
        let o = ValidateOptions::default();
        let img = jpeg(8, 8);
        let reason = |c: RawCaption| validate(Some(&img), &c, &o).unwrap_err().reason;
        assert_eq!(reason(text(" \t ")), "caption_empty");
        assert_eq!(
            reason(RawCaption::Bytes(vec![b'a', 0xFF, 0xFE])),
            "caption_not_utf8"
        );
        assert_eq!(reason(RawCaption::Missing), "caption_missing");
        assert_eq!(reason(text(&"x".repeat(5000))), "caption_too_long");
    }

    #[test]
    fn truncated_and_corrupt_jpegs_are_rejected() {
        let o = ValidateOptions::default();
        let good = jpeg(64, 64);
        let truncated = good.slice(..good.len() * 2 / 3);
        let r = validate(Some(&truncated), &text("x"), &o).unwrap_err();
        assert_eq!(r.reason, "image_decode", "{r:?}");
        let mut corrupt = good.to_vec();
        for b in corrupt[2..200].iter_mut() {
            *b = 0x5A;
        }
        let r = validate(Some(&Bytes::from(corrupt)), &text("x"), &o).unwrap_err();
        assert_eq!(r.reason, "image_decode", "{r:?}");
        let r = validate(Some(&Bytes::from_static(b"not an image")), &text("x"), &o).unwrap_err();
        assert_eq!(r.reason, "image_decode");
        assert_eq!(
            validate(None, &text("x"), &o).unwrap_err().reason,
            "image_missing"
        );
    }

    #[test]
    fn size_limits_and_resize() {
        let img = jpeg(100, 50);
        let o = ValidateOptions {
            min_size: 60,
            ..Default::default()
        };
        assert_eq!(
            validate(Some(&img), &text("x"), &o).unwrap_err().reason,
            "image_too_small"
        );
        let o = ValidateOptions {
            max_size: 80,
            ..Default::default()
        };
        assert_eq!(
            validate(Some(&img), &text("x"), &o).unwrap_err().reason,
            "image_too_large"
        );
        let o = ValidateOptions {
            resize: Some(20),
            ..Default::default()
        };
        let a = validate(Some(&img), &text("x"), &o).unwrap();
        assert_eq!((a.width, a.height), (40, 20));
        let decoded = image::load_from_memory(&a.image).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (40, 20));
        // Smaller than the target: kept byte for byte.
        let o = ValidateOptions {
            resize: Some(64),
            ..Default::default()
        };
        assert_eq!(validate(Some(&img), &text("x"), &o).unwrap().image, img);
        assert_eq!(scaled(256, 256, 224), (224, 224));
        assert_eq!(scaled(300, 200, 100), (150, 100));
    }
}
