//! Image pipeline throughput: JPEG decode + RandomResizedCrop 224 + normalise, on N threads,
//! over the images of a Parquet shard (read into memory first; only the pipeline is timed).
//! Run through `bench/run-image.sh`, which also runs the Pillow + torchvision baseline.
//!
//! cargo bench -p ferroclip-worker --bench image_pipeline -- SHARD [--threads 1] [--passes 3]
//!     [--interpolation bicubic|bilinear] [--decoder pipeline|libjpeg-turbo|zune]
//! `--decoder pipeline` (the default) times `ImageTransform::apply_into`, exactly what the
//! training loader runs; `libjpeg-turbo` (`ferroclip_shards::jpeg`) and `zune` (the `image`
//! crate's zune-jpeg) time that decoder followed by the same crop + normalise
//! (`ImageTransform::apply_rgb_into`), so the two decoders can be compared in one run.
//! Prints one JSON line like bench/image_baseline.py does.

use std::time::Instant;

use anyhow::{bail, Context};
use arrow::array::{Array, AsArray};
use clap::{Parser, ValueEnum};
use ferroclip_worker::data::image::{decode_rgb8, ImageError};
use ferroclip_worker::data::{sample_seed, ImageTransform, Interpolation};
use image::RgbImage;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Decoder {
    /// What training runs: `data::image::decode_rgb8` inside `ImageTransform::apply_into`.
    Pipeline,
    /// libjpeg-turbo-rs through `ferroclip_shards::jpeg::decode` (what shard validation runs).
    LibjpegTurbo,
    /// zune-jpeg through `image::load_from_memory`.
    Zune,
}

impl Decoder {
    fn name(self) -> &'static str {
        match self {
            Decoder::Pipeline => ferroclip_worker::data::image::JPEG_DECODER,
            Decoder::LibjpegTurbo => "libjpeg-turbo-rs",
            Decoder::Zune => "zune-jpeg",
        }
    }

    fn decode(self, bytes: &[u8]) -> Result<RgbImage, ImageError> {
        match self {
            Decoder::Pipeline => decode_rgb8(bytes),
            Decoder::LibjpegTurbo => {
                let rgb =
                    ferroclip_shards::jpeg::decode(bytes, None).map_err(ImageError::Decode)?;
                RgbImage::from_raw(rgb.width, rgb.height, rgb.pixels)
                    .ok_or_else(|| ImageError::Decode("short pixel buffer".into()))
            }
            Decoder::Zune => image::load_from_memory(bytes)
                .map(|i| i.into_rgb8())
                .map_err(|e| ImageError::Decode(e.to_string())),
        }
    }
}

#[derive(Parser)]
struct Args {
    /// Parquet file with `key` (string) and `image` (binary) columns.
    shard: std::path::PathBuf,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 3)]
    passes: usize,
    #[arg(long, default_value = "bicubic")]
    interpolation: String,
    #[arg(long, value_enum, default_value_t = Decoder::Pipeline)]
    decoder: Decoder,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let samples = read_shard(&args.shard)?;
    let mut transform = ImageTransform::train(224, 0);
    transform.interpolation = match args.interpolation.as_str() {
        "bicubic" => Interpolation::Bicubic,
        "bilinear" => Interpolation::Bilinear,
        other => bail!("--interpolation must be bicubic or bilinear, not {other:?}"),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?;
    let per = transform.output_len();
    // (wall img/s, img per CPU-second): the second holds up when other processes share the core.
    let run = |n: usize| -> anyhow::Result<(f64, f64)> {
        let (start, cpu0) = (Instant::now(), cpu_seconds());
        pool.install(|| {
            samples[..n].par_iter().try_for_each_init(
                || vec![0f32; per],
                |buf, (key, bytes)| {
                    let seed = sample_seed(0, 0, key);
                    match args.decoder {
                        Decoder::Pipeline => transform.apply_into(bytes, seed, buf),
                        d => transform.apply_rgb_into(&d.decode(bytes)?, seed, buf),
                    }
                },
            )
        })?;
        let cpu = cpu_seconds() - cpu0;
        Ok((
            n as f64 / start.elapsed().as_secs_f64(),
            n as f64 / cpu.max(1e-9),
        ))
    };
    run(samples.len().min(32))?; // warm-up
    let both = (0..args.passes.max(1))
        .map(|_| run(samples.len()))
        .collect::<anyhow::Result<Vec<(f64, f64)>>>()?;
    let rates: Vec<f64> = both.iter().map(|r| r.0).collect();
    let cpu_best = both.iter().map(|r| r.1).fold(0.0, f64::max);
    let start = Instant::now();
    pool.install(|| {
        samples
            .par_iter()
            .try_for_each(|(_, b)| args.decoder.decode(b).map(drop))
    })?;
    let decode_only = samples.len() as f64 / start.elapsed().as_secs_f64();
    let best = rates.iter().cloned().fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "impl": format!("ferroclip ({})", args.interpolation),
            "decoder": args.decoder.name(),
            "pipeline": args.decoder == Decoder::Pipeline,
            "images": samples.len(),
            "threads": args.threads,
            "img_per_s": best,
            "passes": rates,
            "decode_only_img_per_s": decode_only,
            "cpu_img_per_s": cpu_best,
        })
    );
    Ok(())
}

fn read_shard(path: &std::path::Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("reading {}", path.display()))?;
        let (Some(keys), Some(images)) =
            (batch.column_by_name("key"), batch.column_by_name("image"))
        else {
            bail!("{}: needs columns `key` and `image`", path.display());
        };
        let (Some(keys), Some(images)) =
            (keys.as_string_opt::<i32>(), images.as_binary_opt::<i32>())
        else {
            bail!(
                "{}: `key` must be a string column and `image` a binary column",
                path.display()
            );
        };
        for i in 0..batch.num_rows() {
            if keys.is_valid(i) && images.is_valid(i) {
                out.push((keys.value(i).to_string(), images.value(i).to_vec()));
            }
        }
    }
    if out.is_empty() {
        bail!("{}: no images", path.display());
    }
    Ok(out)
}

/// CPU seconds used by this process so far (user + system, all threads), from /proc.
fn cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, after the parenthesised command name; USER_HZ = 100.
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}
