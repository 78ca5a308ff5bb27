//! Encoded image → normalised `[3, S, S]` f32, as OpenCLIP's `image_transform` does it:
//! train = RandomResizedCrop(S, scale, ratio, bicubic); eval by `ResizeMode` (OpenCLIP's
//! `resize_mode`): shortest side to S + centre crop (the default), longest side to S + centred
//! padding with the fill colour, or squash to S×S. Then ToTensor + mean/std normalisation.

use std::cell::RefCell;

use fast_image_resize::{
    images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};
use rand::{Rng, SeedableRng};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// OpenAI's published constants, kept digit for digit.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("image is empty ({0}x{1})")]
    Empty(u32, u32),
    #[error("resize failed: {0}")]
    Resize(String),
    #[error("output buffer holds {got} floats, need {need}")]
    OutputSize { got: usize, need: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Bilinear,
    /// Catmull-Rom (a = -0.5), Pillow's and OpenCLIP's BICUBIC.
    Bicubic,
}

/// How the eval transform fits an image into S×S (OpenCLIP's `preprocess_cfg.resize_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// Shortest side → S, then centre crop (OpenCLIP's and CLIP's default).
    Shortest,
    /// Longest side → S keeping the aspect ratio, then centred padding with `fill`.
    Longest,
    /// Both sides → S, ignoring the aspect ratio.
    Squash,
}

/// How one sample's image becomes a tensor. `scale`/`ratio` only matter when `train`.
#[derive(Debug, Clone)]
pub struct ImageTransform {
    pub image_size: i64,
    pub train: bool,
    /// RandomResizedCrop area fraction (OpenCLIP default 0.9–1.0).
    pub scale: (f64, f64),
    /// RandomResizedCrop aspect-ratio range (3/4–4/3).
    pub ratio: (f64, f64),
    pub interpolation: Interpolation,
    /// Eval only (training always takes a random resized crop).
    pub resize_mode: ResizeMode,
    /// The padding colour of `ResizeMode::Longest` (OpenCLIP's `fill_color`), before normalising.
    pub fill: u8,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Run seed; each sample's crop comes from (seed, epoch, key), see [`sample_seed`].
    pub seed: u64,
}

impl ImageTransform {
    /// OpenCLIP's training transform.
    pub fn train(image_size: i64, seed: u64) -> Self {
        Self {
            image_size,
            train: true,
            scale: (0.9, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            interpolation: Interpolation::Bicubic,
            resize_mode: ResizeMode::Shortest,
            fill: 0,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            seed,
        }
    }

    /// OpenCLIP's evaluation transform.
    pub fn eval(image_size: i64) -> Self {
        Self {
            train: false,
            ..Self::train(image_size, 0)
        }
    }

    /// Floats per output image (3 × S × S).
    pub fn output_len(&self) -> usize {
        let s = self.image_size.max(0) as usize;
        3 * s * s
    }

    /// Decode `bytes` and write the normalised CHW image into `out` (`output_len()` floats).
    /// `sample_seed` picks the random crop (ignored for eval).
    pub fn apply_into(
        &self,
        bytes: &[u8],
        sample_seed: u64,
        out: &mut [f32],
    ) -> Result<(), ImageError> {
        let rgb = decode_rgb8(bytes)?;
        self.apply_rgb_into(&rgb, sample_seed, out)
    }

    /// The transform of an image already decoded to 8-bit RGB: what [`Self::apply_into`] runs
    /// after its decode (the benchmark times other decoders through it).
    pub fn apply_rgb_into(
        &self,
        rgb: &image::RgbImage,
        sample_seed: u64,
        out: &mut [f32],
    ) -> Result<(), ImageError> {
        let need = self.output_len();
        if out.len() != need {
            return Err(ImageError::OutputSize {
                got: out.len(),
                need,
            });
        }
        let (w, h) = rgb.dimensions();
        if w == 0 || h == 0 {
            return Err(ImageError::Empty(w, h));
        }
        let size = self.image_size as u32;
        let (crop, (rw, rh)) = if self.train {
            let mut rng = rand::rngs::StdRng::seed_from_u64(sample_seed);
            let (top, left, ch, cw) = random_resized_crop(w, h, self.scale, self.ratio, &mut rng);
            (
                (left as f64, top as f64, cw as f64, ch as f64),
                (size, size),
            )
        } else {
            match self.resize_mode {
                ResizeMode::Shortest => (centre_crop(w, h, size), (size, size)),
                ResizeMode::Squash => ((0.0, 0.0, w as f64, h as f64), (size, size)),
                ResizeMode::Longest => (
                    (0.0, 0.0, w as f64, h as f64),
                    keep_ratio_longest(w, h, size),
                ),
            }
        };
        let src = ImageRef::new(w, h, rgb.as_raw(), PixelType::U8x3)
            .map_err(|e| ImageError::Resize(e.to_string()))?;
        let filter = match self.interpolation {
            Interpolation::Bilinear => FilterType::Bilinear,
            Interpolation::Bicubic => FilterType::CatmullRom,
        };
        let options = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(filter))
            .crop(crop.0, crop.1, crop.2, crop.3);
        // The resizer keeps scratch buffers; one per thread avoids reallocating them per image.
        thread_local! {
            static SCRATCH: RefCell<(Resizer, Vec<u8>, Vec<u8>)> =
                RefCell::new((Resizer::new(), Vec::new(), Vec::new()));
        }
        SCRATCH.with(|cell| {
            let (resizer, dst, padded) = &mut *cell.borrow_mut();
            dst.clear();
            dst.resize((rw * rh * 3) as usize, 0);
            let mut dst_img =
                fast_image_resize::images::Image::from_slice_u8(rw, rh, dst, PixelType::U8x3)
                    .map_err(|e| ImageError::Resize(e.to_string()))?;
            resizer
                .resize(&src, &mut dst_img, &options)
                .map_err(|e| ImageError::Resize(e.to_string()))?;
            if (rw, rh) == (size, size) {
                normalise_into(dst, &self.mean, &self.std, out);
            } else {
                pad_centred(dst, (rw, rh), size, self.fill, padded);
                normalise_into(padded, &self.mean, &self.std, out);
            }
            Ok(())
        })
    }

    /// Decode and transform into a fresh `Vec` (tests, tools).
    pub fn apply(&self, bytes: &[u8], sample_seed: u64) -> Result<Vec<f32>, ImageError> {
        let mut out = vec![0.0; self.output_len()];
        self.apply_into(bytes, sample_seed, &mut out)?;
        Ok(out)
    }
}

/// A per-sample seed from (run seed, epoch, sample key): the same crop on every run and
/// every thread schedule, a different one each epoch.
pub fn sample_seed(seed: u64, epoch: u64, key: &str) -> u64 {
    // FNV-1a over the key, mixed with seed and epoch by SplitMix64 finalisers.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(splitmix(seed ^ splitmix(epoch)) ^ h)
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The JPEG decoder behind [`decode_rgb8`]: shard validation's (`ferroclip_shards::jpeg`), so a
/// JPEG that `shards build` accepted decodes here the same way. It measured faster than the `image`
/// crate's zune-jpeg on this pipeline (`bench/README-image.md`).
pub const JPEG_DECODER: &str = "libjpeg-turbo-rs";

/// JPEG/PNG/... → 8-bit RGB. JPEGs through [`ferroclip_shards::jpeg::decode`] (a corrupt or
/// short scan is an error, not grey fill); other formats through the `image` crate, grey and
/// alpha converted like `_convert_to_rgb`.
pub fn decode_rgb8(bytes: &[u8]) -> Result<image::RgbImage, ImageError> {
    let format = image::guess_format(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
    if format == image::ImageFormat::Jpeg {
        let rgb = ferroclip_shards::jpeg::decode(bytes, None).map_err(ImageError::Decode)?;
        let (w, h) = (rgb.width, rgb.height);
        return image::RgbImage::from_raw(w, h, rgb.pixels)
            .ok_or_else(|| ImageError::Decode(format!("short pixel buffer for {w}x{h}")));
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    Ok(img.into_rgb8())
}

/// torchvision's `RandomResizedCrop.get_params`: (top, left, height, width).
pub fn random_resized_crop(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (u32, u32, u32, u32) {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even() as i64;
        let h = (target_area / aspect).sqrt().round_ties_even() as i64;
        if 0 < w && w <= i64::from(width) && 0 < h && h <= i64::from(height) {
            let top = rng.gen_range(0..=(i64::from(height) - h)) as u32;
            let left = rng.gen_range(0..=(i64::from(width) - w)) as u32;
            return (top, left, h as u32, w as u32);
        }
    }
    // Fallback: the central crop with the ratio clamped into range.
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < ratio.0 {
        (width, (f64::from(width) / ratio.0).round_ties_even() as u32)
    } else if in_ratio > ratio.1 {
        (
            (f64::from(height) * ratio.1).round_ties_even() as u32,
            height,
        )
    } else {
        (width, height)
    };
    (
        (height - h.min(height)) / 2,
        (width - w.min(width)) / 2,
        h.min(height),
        w.min(width),
    )
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// Resize(shortest side → size) + CenterCrop(size), expressed as a crop box in source
/// pixels (left, top, width, height) so it is a single resampling pass.
fn centre_crop(width: u32, height: u32, size: u32) -> (f64, f64, f64, f64) {
    let (w, h, s) = (f64::from(width), f64::from(height), f64::from(size));
    // torchvision: the long side becomes int(size * long / short).
    let (rw, rh) = if width <= height {
        (s, (s * h / w).floor())
    } else {
        ((s * w / h).floor(), s)
    };
    let (fx, fy) = (w / rw, h / rh);
    let left = ((rw - s) / 2.0).round_ties_even() * fx;
    let top = ((rh - s) / 2.0).round_ties_even() * fy;
    (left, top, s * fx, s * fy)
}

/// OpenCLIP's `ResizeKeepRatio(S, longest=1)`: the size (w, h) that fits the longest side to S,
/// each side rounded half to even as Python's `round` does.
fn keep_ratio_longest(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (w, h, s) = (f64::from(width), f64::from(height), f64::from(size));
    let ratio = (w / s).max(h / s);
    let side = |x: f64| ((x / ratio).round_ties_even() as u32).clamp(1, size);
    (side(w), side(h))
}

/// OpenCLIP's `center_crop_or_pad` of a (w, h) ≤ S image: `fill` around it, the odd pixel of
/// padding on the right / bottom.
fn pad_centred(hwc: &[u8], (w, h): (u32, u32), size: u32, fill: u8, out: &mut Vec<u8>) {
    let s = size as usize;
    out.clear();
    out.resize(s * s * 3, fill);
    let (left, top) = (((size - w) / 2) as usize, ((size - h) / 2) as usize);
    let row = w as usize * 3;
    for (y, src) in hwc.chunks_exact(row).enumerate() {
        let at = ((top + y) * s + left) * 3;
        out[at..at + row].copy_from_slice(src);
    }
}

/// HWC u8 → CHW f32, `(v / 255 - mean) / std` through a per-channel lookup table.
fn normalise_into(hwc: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut [f32]) {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, x) in table.iter_mut().enumerate() {
            *x = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    let plane = hwc.len() / 3;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_params_stay_inside_and_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            let (top, left, h, w) =
                random_resized_crop(256, 200, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(top + h <= 200 && left + w <= 256, "{top} {left} {h} {w}");
            let frac = f64::from(h * w) / (256.0 * 200.0);
            assert!((0.85..=1.01).contains(&frac), "area fraction {frac}");
        }
        // An extreme panorama never fits 10 tries and takes the clamped central crop.
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        assert_eq!(
            random_resized_crop(1000, 10, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng),
            (0, 493, 10, 13)
        );
    }

    #[test]
    fn centre_crop_box_matches_resize_then_crop() {
        // 256x256 → 224: whole image.
        assert_eq!(centre_crop(256, 256, 224), (0.0, 0.0, 256.0, 256.0));
        // 300x200 → resized 336x224, crop left 56 resized px = 50 source px.
        let (l, t, w, h) = centre_crop(300, 200, 224);
        assert!(
            (l - 50.0).abs() < 1e-9
                && t == 0.0
                && (w - 200.0).abs() < 1e-9
                && (h - 200.0).abs() < 1e-9
        );
    }

    #[test]
    fn longest_side_fits_and_the_rest_is_fill() {
        assert_eq!(keep_ratio_longest(64, 32, 32), (32, 16));
        assert_eq!(keep_ratio_longest(30, 50, 32), (19, 32)); // 19.2
        assert_eq!(keep_ratio_longest(1000, 1, 32), (32, 1));
        // A 4x2 white image into 4x4 with fill 7: one row of fill above and below.
        let mut out = Vec::new();
        pad_centred(&[255; 4 * 2 * 3], (4, 2), 4, 7, &mut out);
        let rows: Vec<u8> = out.chunks_exact(4 * 3).map(|r| r[0]).collect();
        assert_eq!(rows, vec![7, 255, 255, 7]);
        // 3 wide into 4: the odd column of padding goes right.
        pad_centred(&[255; 3 * 4 * 3], (3, 4), 4, 0, &mut out);
        let first_row: Vec<u8> = out[..4 * 3].chunks_exact(3).map(|p| p[0]).collect();
        assert_eq!(first_row, vec![255, 255, 255, 0]);
    }

    #[test]
    fn every_resize_mode_gives_a_full_image() {
        let mut png = Vec::new();
        image::RgbImage::from_fn(48, 20, |x, _| image::Rgb([x as u8 * 5, 100, 200]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        for mode in [
            ResizeMode::Shortest,
            ResizeMode::Longest,
            ResizeMode::Squash,
        ] {
            let t = ImageTransform {
                resize_mode: mode,
                ..ImageTransform::eval(16)
            };
            let px = t.apply(&png, 0).expect("transform");
            assert_eq!(px.len(), 3 * 16 * 16);
            // Channel 1 is 100 everywhere in the image; only Longest pads (with 0).
            let g = &px[256..512];
            let from = |v: f32| (v / 255.0 - t.mean[1]) / t.std[1];
            let padded = g.iter().filter(|&&x| (x - from(0.0)).abs() < 1e-4).count();
            let image = g
                .iter()
                .filter(|&&x| (x - from(100.0)).abs() < 1e-2)
                .count();
            match mode {
                // 48x20 → 16x7 (6.67 rounds to 7): 4 rows of padding above, 5 below.
                ResizeMode::Longest => assert_eq!((padded, image), (16 * 9, 16 * 7)),
                _ => assert_eq!((padded, image), (0, 256)),
            }
        }
    }

    #[test]
    fn sample_seed_depends_on_every_part() {
        let a = sample_seed(1, 0, "k");
        assert_ne!(a, sample_seed(2, 0, "k"));
        assert_ne!(a, sample_seed(1, 1, "k"));
        assert_ne!(a, sample_seed(1, 0, "j"));
        assert_eq!(a, sample_seed(1, 0, "k"));
    }
}
