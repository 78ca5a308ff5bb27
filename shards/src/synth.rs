//! `shards synth`: a procedural captioned dataset (coloured shapes at positions) that a tiny CLIP
//! can learn from captions. Each row's label is the main shape's class, e.g. `"red circle"`.
//! Rows are generated in parallel from per-row seeds, so the output depends only on (seed, rows, size);
//! `source/synth.rs` streams them into a build.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::jpeg;
use crate::reader::Classes;

pub const COLORS: [(&str, [u8; 3]); 4] = [
    ("red", [215, 40, 40]),
    ("green", [40, 165, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 205, 35]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const TEMPLATES: [&str; 4] = [
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture of a {}.",
];

#[derive(Clone, Debug, Serialize)]
pub struct SynthOptions {
    pub rows: u64,
    pub seed: u64,
    pub image_size: u32,
    pub captions: Captions,
}

/// How a row's caption is worded. The images are the same either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Captions {
    /// A random lead ("a photo of a", "an image of a", ...) and size word ("big", "large"):
    /// paraphrases that say nothing about the image, as web captions vary.
    #[default]
    Varied,
    /// Only what the image shows ("a red circle above a small blue square"): images with the
    /// same content have the same caption, so retrieval measures telling contents apart.
    Plain,
}

/// The 12 classes (colour × shape) and the zero-shot prompt templates.
pub fn classes() -> Classes {
    let mut classes = Vec::new();
    for (c, _) in COLORS {
        for s in SHAPES {
            classes.push(format!("{c} {s}"));
        }
    }
    Classes {
        classes,
        templates: TEMPLATES.iter().map(|t| t.to_string()).collect(),
    }
}

pub struct SynthRow {
    pub key: String,
    pub jpeg: Vec<u8>,
    pub caption: String,
    pub label: String,
}

struct Shape {
    color: usize,
    kind: usize,
    cx: f32,
    cy: f32,
    r: f32,
}

/// One row, a pure function of (seed, index, size, captions).
pub fn generate(seed: u64, index: u64, size: u32, captions: Captions) -> Result<SynthRow, String> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
    let s = size as f32;
    let main_color = rng.gen_range(0..COLORS.len());
    let main_kind = rng.gen_range(0..SHAPES.len());
    let with_second = rng.gen_bool(0.6);
    let relation = rng.gen_range(0..4usize); // above, below, left of, right of
    let big_r = s * rng.gen_range(0.22..0.30);
    let small_r = s * rng.gen_range(0.09..0.13);
    let jitter = |rng: &mut StdRng| rng.gen_range(-0.06..0.06) * s;
    let (mut main, mut second) = (
        Shape {
            color: main_color,
            kind: main_kind,
            cx: s * 0.5 + jitter(&mut rng),
            cy: s * 0.5 + jitter(&mut rng),
            r: big_r,
        },
        None,
    );
    if with_second {
        // A different class for the small shape, placed on the named side of the big one.
        let mut color = rng.gen_range(0..COLORS.len());
        let kind = rng.gen_range(0..SHAPES.len());
        if color == main_color && kind == main_kind {
            color = (color + 1) % COLORS.len();
        }
        // Image y grows downwards: "above" puts the big shape in the upper part.
        let (near, far) = (s * 0.36, s * 0.80);
        let (main_xy, second_xy) = match relation {
            0 => ((s * 0.5, near), (s * 0.5, far)),
            1 => ((s * 0.5, s - near), (s * 0.5, s - far)),
            2 => ((near, s * 0.5), (far, s * 0.5)),
            _ => ((s - near, s * 0.5), (s - far, s * 0.5)),
        };
        let (sx, sy) = second_xy;
        main.cx = main_xy.0 + if relation < 2 { jitter(&mut rng) } else { 0.0 };
        main.cy = main_xy.1 + if relation >= 2 { jitter(&mut rng) } else { 0.0 };
        second = Some(Shape {
            color,
            kind,
            cx: sx + jitter(&mut rng) * 0.5,
            cy: sy + jitter(&mut rng) * 0.5,
            r: small_r,
        });
    }
    let bg = {
        let base: u8 = rng.gen_range(185..245);
        [
            base,
            base.saturating_sub(rng.gen_range(0..12)),
            base.saturating_sub(rng.gen_range(0..12)),
        ]
    };
    let mut px = vec![0u8; (size * size * 3) as usize];
    for p in px.chunks_exact_mut(3) {
        p.copy_from_slice(&bg);
    }
    draw(&mut px, size, &main);
    if let Some(sec) = &second {
        draw(&mut px, size, sec);
    }
    let jpeg = jpeg::encode(&px, size, size, 90)?;
    let label = format!("{} {}", COLORS[main.color].0, SHAPES[main.kind]);
    let size_word = ["", "large ", "big "][rng.gen_range(0..3)];
    let lead = ["a", "a photo of a", "an image of a", "a picture of a"][rng.gen_range(0..4)];
    // Drawn either way, so the two wordings caption the same images.
    let (lead, size_word) = match captions {
        Captions::Varied => (lead, size_word),
        Captions::Plain => ("a", ""),
    };
    let caption = match &second {
        Some(sec) => format!(
            "{lead} {size_word}{label} {} a small {} {}",
            ["above", "below", "left of", "right of"][relation],
            COLORS[sec.color].0,
            SHAPES[sec.kind]
        ),
        None => format!("{lead} {size_word}{label}"),
    };
    Ok(SynthRow {
        key: format!("synth-{index:09}"),
        jpeg,
        caption,
        label,
    })
}

fn draw(px: &mut [u8], size: u32, sh: &Shape) {
    let color = COLORS[sh.color].1;
    let (x0, x1) = (
        (sh.cx - sh.r).floor().max(0.0) as u32,
        ((sh.cx + sh.r).ceil() as u32).min(size),
    );
    let (y0, y1) = (
        (sh.cy - sh.r).floor().max(0.0) as u32,
        ((sh.cy + sh.r).ceil() as u32).min(size),
    );
    for y in y0..y1 {
        for x in x0..x1 {
            let (dx, dy) = (x as f32 + 0.5 - sh.cx, y as f32 + 0.5 - sh.cy);
            let inside = match sh.kind {
                0 => dx * dx + dy * dy <= sh.r * sh.r,
                1 => dx.abs() <= sh.r * 0.85 && dy.abs() <= sh.r * 0.85,
                // Upward triangle: half-width grows linearly from the apex.
                _ => dy >= -sh.r && dy <= sh.r * 0.8 && dx.abs() <= (dy + sh.r) * 0.6,
            };
            if inside {
                let i = ((y * size + x) * 3) as usize;
                px[i..i + 3].copy_from_slice(&color);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deterministic_and_labelled() {
        let a = generate(7, 3, 64, Captions::Varied).unwrap();
        let b = generate(7, 3, 64, Captions::Varied).unwrap();
        assert_eq!(a.jpeg, b.jpeg);
        assert_eq!(a.caption, b.caption);
        assert!(a.caption.contains(&a.label), "{} / {}", a.caption, a.label);
        assert!(classes().classes.contains(&a.label));
        let img = image::load_from_memory(&a.jpeg).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        assert_ne!(generate(8, 3, 64, Captions::Varied).unwrap().jpeg, a.jpeg);
    }

    #[test]
    fn plain_captions_caption_the_same_images_with_only_their_content() {
        for i in 0..40 {
            let (v, p) = (
                generate(5, i, 32, Captions::Varied).unwrap(),
                generate(5, i, 32, Captions::Plain).unwrap(),
            );
            assert_eq!(v.jpeg, p.jpeg, "row {i}: the same image");
            assert_eq!(v.label, p.label);
            // The varied caption is the plain one with a lead and a size word added.
            let content = p.caption.strip_prefix("a ").unwrap();
            assert!(
                content.starts_with(&p.label),
                "row {i}: {:?} does not start with the label",
                p.caption
            );
            assert!(v.caption.ends_with(content.strip_prefix(&p.label).unwrap()));
            for noise in ["photo", "image", "picture", "big", "large"] {
                assert!(!p.caption.contains(noise), "row {i}: {:?}", p.caption);
            }
        }
    }

    #[test]
    fn the_main_shape_has_its_colour_in_the_image() {
        for i in 0..20 {
            let r = generate(1, i, 64, Captions::Varied).unwrap();
            let color = COLORS
                .iter()
                .find(|(n, _)| r.label.starts_with(n))
                .unwrap()
                .1;
            let img = image::load_from_memory(&r.jpeg).unwrap().to_rgb8();
            let close = img
                .pixels()
                .filter(|p| {
                    p.0.iter()
                        .zip(color)
                        .all(|(a, b)| (*a as i32 - b as i32).abs() < 40)
                })
                .count();
            // The big shape covers several percent of the image at least.
            assert!(
                close > 64 * 64 / 25,
                "row {i}: {} has only {close} pixels of its colour",
                r.label
            );
        }
    }

    #[test]
    fn class_scheme_has_twelve_classes() {
        let c = classes();
        assert_eq!(c.classes.len(), 12);
        assert!(c.templates.iter().all(|t| t.contains("{}")));
    }
}
