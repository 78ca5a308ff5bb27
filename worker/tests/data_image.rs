//! Image decode + transform: shapes, CLIP normalisation, deterministic eval crop, seeded train
//! crop, PNG and JPEG decoding, and clear errors (never panics) on bad bytes.

use ferroclip_worker::data::{sample_seed, ImageTransform, CLIP_MEAN, CLIP_STD};
use image::{ImageFormat, Rgb, RgbImage};

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A picture with structure everywhere, so any change of crop changes the output.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x * y) % 251) as u8,
        ])
    })
}

fn expected(v: [u8; 3]) -> [f32; 3] {
    [0, 1, 2].map(|c| (f32::from(v[c]) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c])
}

#[test]
fn constant_png_normalises_to_clip_values() {
    let colour = [200u8, 100, 30];
    let png = encode(&RgbImage::from_pixel(64, 48, Rgb(colour)), ImageFormat::Png);
    for t in [ImageTransform::eval(32), ImageTransform::train(32, 7)] {
        let out = t.apply(&png, 1).unwrap();
        assert_eq!(out.len(), 3 * 32 * 32);
        let want = expected(colour);
        for c in 0..3 {
            let plane = &out[c * 1024..(c + 1) * 1024];
            assert!(
                plane.iter().all(|&v| (v - want[c]).abs() < 1e-5),
                "channel {c}: {} vs {}",
                plane[0],
                want[c]
            );
        }
    }
}

#[test]
fn jpeg_decodes_close_to_its_colour() {
    let colour = [30u8, 144, 255];
    let jpg = encode(
        &RgbImage::from_pixel(256, 256, Rgb(colour)),
        ImageFormat::Jpeg,
    );
    let out = ImageTransform::train(224, 0).apply(&jpg, 5).unwrap();
    assert_eq!(out.len(), 3 * 224 * 224);
    let want = expected(colour);
    for c in 0..3 {
        let mean: f32 =
            out[c * 224 * 224..(c + 1) * 224 * 224].iter().sum::<f32>() / (224.0 * 224.0);
        // JPEG chroma quantisation moves a saturated colour by a few levels.
        assert!(
            (mean - want[c]).abs() < 0.1,
            "channel {c}: {mean} vs {}",
            want[c]
        );
    }
}

#[test]
fn grey_and_alpha_pngs_become_rgb() {
    let grey = image::GrayImage::from_pixel(20, 20, image::Luma([128]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    grey.write_to(&mut bytes, ImageFormat::Png).unwrap();
    let out = ImageTransform::eval(8).apply(bytes.get_ref(), 0).unwrap();
    let want = expected([128, 128, 128]);
    assert!(
        (out[0] - want[0]).abs() < 1e-5
            && (out[64] - want[1]).abs() < 1e-5
            && (out[128] - want[2]).abs() < 1e-5
    );

    let rgba = image::RgbaImage::from_pixel(20, 20, image::Rgba([10, 20, 30, 40]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    rgba.write_to(&mut bytes, ImageFormat::Png).unwrap();
    let out = ImageTransform::eval(8).apply(bytes.get_ref(), 0).unwrap();
    assert!((out[0] - expected([10, 20, 30])[0]).abs() < 1e-5);
}

#[test]
fn grey_jpeg_becomes_rgb() {
    let grey = image::GrayImage::from_pixel(32, 32, image::Luma([90]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    grey.write_to(&mut bytes, ImageFormat::Jpeg).unwrap();
    let out = ImageTransform::eval(8).apply(bytes.get_ref(), 0).unwrap();
    let want = expected([90, 90, 90]);
    for c in 0..3 {
        assert!(
            (out[c * 64] - want[c]).abs() < 0.05,
            "channel {c}: {} vs {}",
            out[c * 64],
            want[c]
        );
    }
}

#[test]
fn eval_centre_crop_is_deterministic_and_central() {
    // Left third red, middle blue, right third red: a central square crop of a 3:1 image is all blue.
    let img = RgbImage::from_fn(300, 100, |x, _| {
        if (100..200).contains(&x) {
            Rgb([0, 0, 255])
        } else {
            Rgb([255, 0, 0])
        }
    });
    let png = encode(&img, ImageFormat::Png);
    let t = ImageTransform::eval(50);
    let a = t.apply(&png, 1).unwrap();
    let b = t.apply(&png, 999).unwrap();
    assert_eq!(a, b, "eval must not depend on the sample seed");
    let blue = expected([0, 0, 255]);
    // Away from the crop's edge columns (bicubic ringing), every pixel is the blue.
    for y in 0..50 {
        for x in 3..47 {
            for c in 0..3 {
                let v = a[c * 2500 + y * 50 + x];
                assert!((v - blue[c]).abs() < 0.05, "({x},{y}) c{c}: {v}");
            }
        }
    }
}

#[test]
fn train_crop_is_reproducible_per_seed_and_varies_across_seeds() {
    let jpg = encode(&pattern(256, 256), ImageFormat::Jpeg);
    let t = ImageTransform::train(64, 42);
    let s1 = sample_seed(42, 0, "sample-1");
    let a = t.apply(&jpg, s1).unwrap();
    assert_eq!(a, t.apply(&jpg, s1).unwrap());
    let others: Vec<Vec<f32>> = ["sample-2", "sample-3", "sample-4"]
        .iter()
        .map(|k| t.apply(&jpg, sample_seed(42, 0, k)).unwrap())
        .collect();
    assert!(
        others.iter().all(|o| o != &a),
        "different seeds gave the same crop"
    );
    // The next epoch crops the same sample differently.
    assert_ne!(a, t.apply(&jpg, sample_seed(42, 1, "sample-1")).unwrap());
}

#[test]
fn bad_bytes_are_errors_not_panics() {
    let t = ImageTransform::train(32, 0);
    for bad in [
        &b""[..],
        b"not an image",
        &[0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F'],
    ] {
        let err = t.apply(bad, 0).expect_err("garbage decoded").to_string();
        assert!(err.contains("decode"), "{err}");
    }
    let png = encode(&pattern(40, 40), ImageFormat::Png);
    let truncated = &png[..png.len() / 2];
    assert!(t.apply(truncated, 0).is_err());
    // A JPEG cut in its scan is an error too, not an image padded with grey.
    let jpg = encode(&pattern(64, 64), ImageFormat::Jpeg);
    let err = t
        .apply(&jpg[..jpg.len() / 2], 0)
        .expect_err("truncated JPEG decoded");
    assert!(err.to_string().contains("decode"), "{err}");
    // A wrongly sized output buffer is an error too.
    let mut small = vec![0f32; 10];
    assert!(t.apply_into(&png, 0, &mut small).is_err());
}
