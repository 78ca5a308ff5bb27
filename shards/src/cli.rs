//! `ferroclip shards …`: the command-line face of this crate.

use std::io::IsTerminal;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::build::{build, BuildOptions, BuildReport};
use crate::error::ShardsError;
use crate::manifest::{Manifest, CLASSES_FILE, MANIFEST_FILE};
use crate::reader::get_all;
use crate::source::webdataset::WdsFields;
use crate::source::{ColumnNames, InputPlan};
use crate::store::{Location, StoreArgs, StoreOptions};
use crate::synth::{Captions, SynthOptions};
use crate::validate::ValidateOptions;
use crate::writer::Sizing;

#[derive(Args, Debug)]
pub struct ShardsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(subcommand)]
    pub command: ShardsCommand,
}

#[derive(Subcommand, Debug)]
pub enum ShardsCommand {
    /// Build verified Parquet shards and manifest.json from Parquet files or a folder of images.
    Build(Box<BuildArgs>),
    /// Generate a procedural captioned dataset (coloured shapes) through the same writer.
    Synth(SynthArgs),
    /// Show splits, shards, rows, bytes and statistics.
    Inspect {
        url: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
        /// List every shard.
        #[arg(long)]
        shards: bool,
    },
    /// Check every shard's checksum, row groups and images; exits non-zero naming bad shards.
    Verify { url: String },
    /// Print the first rows' keys and captions.
    Head {
        url: String,
        #[arg(short = 'n', default_value_t = 5)]
        n: usize,
        #[arg(long, default_value = "train")]
        split: String,
        /// Write the images into this directory (path or URL).
        #[arg(long)]
        thumbnails: Option<String>,
    },
}

/// Shard and row-group sizing, shared by `build` and `synth`.
#[derive(Args, Debug)]
pub struct SizingArgs {
    /// Rows per shard (default: cut shards by --target-shard-bytes).
    #[arg(long)]
    pub rows_per_shard: Option<u64>,
    /// Approximate shard size (payload bytes), e.g. 256MiB.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub target_shard_bytes: u64,
    /// Rows per row group (= block); the row group also closes at --row-group-bytes.
    #[arg(long)]
    pub rows_per_row_group: Option<u64>,
    /// Row-group (block) size: one ranged GET. 1–8 MiB suits object stores.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub row_group_bytes: u64,
    /// Fraction of rows (chosen by a hash of the key) in the `val` split.
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Threads for decoding/validation/re-encoding (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Parquet files or prefixes, or one folder of images with a captions file.
    #[arg(required_unless_present = "format")]
    pub srcs: Vec<String>,
    /// Read a captioning dataset's annotation file instead: `coco` (captions_*.json),
    /// `karpathy` (dataset_coco.json / dataset_flickr30k.json) or `vg` (Visual Genome's
    /// region_descriptions.json: whole images captioned by their region phrases). One row per
    /// (image, caption), an `image_id` column, the file's splits as the shards' splits.
    #[arg(long, value_enum, requires_all = ["annotations", "images"], conflicts_with = "srcs")]
    pub format: Option<crate::source::annotations::Format>,
    /// The annotation file (any store) for --format.
    #[arg(long, requires = "format")]
    pub annotations: Option<String>,
    /// The folder or prefix (any store) holding the images the annotations name.
    #[arg(long, requires = "format")]
    pub images: Option<String>,
    /// `--format vg`: Visual Genome's image_data.json (image id → file, from its URL).
    #[arg(long, requires = "format")]
    pub image_data: Option<String>,
    #[arg(long)]
    pub out: String,
    #[arg(long, default_value = "jpg")]
    pub image_col: String,
    /// Caption column (default: `caption`, falling back to `txt`).
    #[arg(long)]
    pub text_col: Option<String>,
    /// Key column (default: `key` if present, else <file>-<row>).
    #[arg(long)]
    pub key_col: Option<String>,
    /// Captions file (CSV or JSONL of path + caption) for a folder source; default:
    /// captions.jsonl or captions.csv inside the folder.
    #[arg(long)]
    pub captions: Option<String>,
    /// Webdataset tars / img2dataset `files` layout: the image member's extension(s), first
    /// match wins (e.g. `jpg,png,webp`).
    #[arg(long, default_value = "jpg", value_delimiter = ',')]
    pub image_ext: Vec<String>,
    /// Webdataset tars / img2dataset `files` layout: the caption member's extension.
    #[arg(long, default_value = "txt")]
    pub caption_ext: String,
    /// Downscale images so the short side is this many pixels, re-encoding as JPEG.
    #[arg(long)]
    pub resize: Option<u32>,
    /// JPEG quality for re-encoded images.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,
    /// Reject images whose short side is below this.
    #[arg(long, default_value_t = 1)]
    pub min_size: u32,
    /// Reject images whose long side is above this.
    #[arg(long, default_value_t = 16384)]
    pub max_size: u32,
    /// Reject captions longer than this many characters.
    #[arg(long, default_value_t = 4096)]
    pub max_caption_chars: usize,
    /// Write rejected rows (key, source file, row, reason) here as JSON lines.
    #[arg(long)]
    pub rejects: Option<String>,
    #[command(flatten)]
    pub sizing: SizingArgs,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: String,
    #[arg(long)]
    pub rows: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// `varied`: paraphrased captions (a random lead and size word); `plain`: only what the
    /// image shows, so same-content images share their caption.
    #[arg(long, value_enum, default_value_t = Captions::Varied)]
    pub captions: Captions,
    #[command(flatten)]
    pub sizing: SizingArgs,
}

/// Parses `123`, `64KiB`, `4MiB`, `1GiB`, `10MB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    if n == 0 {
        return Err("size must be positive".into());
    }
    Ok(n * mult)
}

pub async fn run(args: ShardsArgs) -> anyhow::Result<()> {
    // Interactive tools: say that the store is unreachable within seconds (runs wait minutes).
    let store = StoreOptions {
        retry_budget: std::time::Duration::from_secs(15),
        ..args.store.options()
    };
    match args.command {
        ShardsCommand::Build(b) => run_build(*b, store).await,
        ShardsCommand::Synth(s) => run_synth(s, store).await,
        ShardsCommand::Inspect { url, json, shards } => {
            let loc = Location::open(&url, &store)?;
            let mloc = loc.join(MANIFEST_FILE);
            let m = Manifest::parse(&mloc.url(), &get_all(&mloc).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{}", render_manifest(&m, shards));
            }
            Ok(())
        }
        ShardsCommand::Verify { url } => {
            let r = crate::verify::verify(&url, &store).await?;
            if r.bad.is_empty() {
                println!("ok: {} shards, {} rows verified", r.shards, r.rows);
                Ok(())
            } else {
                for b in &r.bad {
                    println!("BAD {}: {}", b.path, b.problem);
                }
                bail!("{} of {} shards failed verification", r.bad.len(), r.shards)
            }
        }
        ShardsCommand::Head {
            url,
            n,
            split,
            thumbnails,
        } => {
            let samples = crate::head::head(&url, &split, n, &store).await?;
            for s in &samples {
                let label = s
                    .label
                    .as_ref()
                    .map(|l| format!(" [{l}]"))
                    .unwrap_or_default();
                println!(
                    "{}\t{}x{}\t{}{}",
                    s.key, s.width, s.height, s.caption, label
                );
            }
            if let Some(dir) = thumbnails {
                let names = crate::head::write_thumbnails(&samples, &dir, &store).await?;
                println!("wrote {} images to {dir}", names.len());
            }
            Ok(())
        }
    }
}

fn sizing(a: &SizingArgs) -> Sizing {
    Sizing {
        rows_per_shard: a.rows_per_shard,
        target_shard_bytes: a.target_shard_bytes,
        rows_per_row_group: a.rows_per_row_group,
        row_group_bytes: a.row_group_bytes,
    }
}

fn build_options(out: &str, a: &SizingArgs, default_val: f64, store: StoreOptions) -> BuildOptions {
    BuildOptions {
        val_fraction: a.val_fraction.unwrap_or(default_val),
        sizing: sizing(a),
        threads: a.threads,
        command: std::env::args().collect(),
        progress: !a.no_progress && std::io::stderr().is_terminal(),
        store,
        ..BuildOptions::new(out)
    }
}

async fn run_build(b: BuildArgs, store: StoreOptions) -> anyhow::Result<()> {
    let mut opts = build_options(&b.out, &b.sizing, 0.0, store.clone());
    opts.validate = ValidateOptions {
        resize: b.resize,
        quality: b.quality.clamp(1, 100),
        min_size: b.min_size,
        max_size: b.max_size,
        max_caption_chars: b.max_caption_chars,
    };
    opts.rejects = b.rejects.clone();
    let plan =
        if let (Some(format), Some(ann), Some(images)) = (b.format, &b.annotations, &b.images) {
            InputPlan::annotated(format, ann, b.image_data.as_deref(), images, &store).await?
        } else if let Some(c) = &b.captions {
            if b.srcs.len() != 1 {
                bail!("--captions takes exactly one image folder");
            }
            InputPlan::folder(&b.srcs[0], Some(c), &store).await?
        } else {
            let cols = ColumnNames {
                image: b.image_col.clone(),
                text: b.text_col.clone(),
                key: b.key_col.clone(),
            };
            let fields = WdsFields {
                image_exts: b.image_ext.iter().map(|e| e.to_ascii_lowercase()).collect(),
                caption_ext: b.caption_ext.to_ascii_lowercase(),
            };
            if b.srcs
                .iter()
                .any(|s| s.ends_with(".tar") || s.contains('{'))
            {
                InputPlan::webdataset(&b.srcs, fields, &store).await?
            } else {
                match InputPlan::parquet(&b.srcs, cols, &store).await {
                    // One prefix with no Parquet in it: tars, a folder with a captions file, or
                    // img2dataset's files layout, in that order.
                    Err(ShardsError::EmptySource(msg)) if b.srcs.len() == 1 => {
                        other_layouts(&b.srcs[0], &msg, fields, &store).await?
                    }
                    other => other?,
                }
            }
        };
    let report = build(plan, &opts, vec![]).await?;
    print!("{}", render_report(&report));
    Ok(())
}

/// The input at `src` when it holds no Parquet: webdataset tars, a folder of images with a
/// captions file, or img2dataset's `files` layout.
async fn other_layouts(
    src: &str,
    parquet: &str,
    fields: WdsFields,
    store: &StoreOptions,
) -> Result<InputPlan, ShardsError> {
    match InputPlan::webdataset(&[src.to_string()], fields.clone(), store).await {
        Err(ShardsError::EmptySource(_)) => {}
        other => return other,
    }
    match InputPlan::folder(src, None, store).await {
        Err(ShardsError::BadInput { message, .. }) if message.starts_with("no captions file") => {}
        other => return other,
    }
    InputPlan::files_layout(src, fields, store)
        .await
        .map_err(|e| match e {
            ShardsError::EmptySource(_) => ShardsError::EmptySource(format!(
                "{parquet}; no .tar files, captions file or KEY.jpg + KEY.txt files either"
            )),
            e => e,
        })
}

async fn run_synth(s: SynthArgs, store: StoreOptions) -> anyhow::Result<()> {
    if s.rows == 0 {
        bail!("--rows must be positive");
    }
    if !(8..=1024).contains(&s.image_size) {
        bail!("--image-size must be between 8 and 1024");
    }
    let opts = build_options(&s.out, &s.sizing, 0.1, store);
    let plan = InputPlan::synth(SynthOptions {
        rows: s.rows,
        seed: s.seed,
        image_size: s.image_size,
        captions: s.captions,
    });
    let classes = serde_json::to_vec_pretty(&crate::synth::classes()).context("classes.json")?;
    let report = build(plan, &opts, vec![(CLASSES_FILE.to_string(), classes)]).await?;
    print!("{}", render_report(&report));
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A plain text table with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        format!("{}\n", parts.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out += &line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

pub fn render_manifest(m: &Manifest, shards: bool) -> String {
    let mut out = String::new();
    let rows: Vec<Vec<String>> = m
        .splits
        .iter()
        .map(|(name, s)| {
            let blocks: usize = s.shards.iter().map(|x| x.row_groups.len()).sum();
            vec![
                name.clone(),
                s.shards.len().to_string(),
                blocks.to_string(),
                s.rows.to_string(),
                human_bytes(s.bytes),
            ]
        })
        .collect();
    out += &table(&["split", "shards", "blocks", "rows", "bytes"], &rows);
    if shards {
        out += "\n";
        let rows: Vec<Vec<String>> = m
            .splits
            .values()
            .flat_map(|s| s.shards.iter())
            .map(|s| {
                vec![
                    s.path.clone(),
                    s.rows.to_string(),
                    s.row_groups.len().to_string(),
                    human_bytes(s.bytes),
                    s.sha256[..16.min(s.sha256.len())].to_string(),
                ]
            })
            .collect();
        out += &table(&["shard", "rows", "blocks", "bytes", "sha256"], &rows);
    }
    out += "\n";
    let st = &m.stats;
    let stat = |name: &str, s: &crate::manifest::Summary| {
        vec![
            name.to_string(),
            s.min.to_string(),
            format!("{:.1}", s.mean()),
            s.max.to_string(),
        ]
    };
    out += &table(
        &["statistic", "min", "mean", "max"],
        &[
            stat("caption chars", &st.caption_chars),
            stat("width", &st.width),
            stat("height", &st.height),
            stat("image bytes", &st.image_bytes),
        ],
    );
    out += &format!(
        "\ninput rows: {}, accepted: {}\n",
        m.input_rows,
        m.total_rows()
    );
    if !m.rejected.is_empty() {
        let rows: Vec<Vec<String>> = m
            .rejected
            .iter()
            .map(|(k, v)| vec![k.clone(), v.to_string()])
            .collect();
        out += &table(&["rejected", "rows"], &rows);
    }
    out += &format!(
        "columns: {}\n",
        m.schema
            .iter()
            .map(|c| format!("{} ({})", c.name, c.data_type))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}

fn render_report(r: &BuildReport) -> String {
    let mut out = String::new();
    if r.already_built {
        out += "already built by the same command: nothing to do\n";
    } else if r.kept_shards > 0 {
        out += &format!("resumed: kept {} finished shards\n", r.kept_shards);
    }
    out += &render_manifest(&r.manifest, false);
    let secs = r.elapsed.as_secs_f64().max(1e-6);
    out += &format!(
        "time: {:.1} s, {:.0} rows/s, {:.1} MB/s of input\n",
        secs,
        r.manifest.input_rows as f64 / secs,
        r.input_bytes as f64 / 1e6 / secs
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2 GB"), Ok(2_000_000_000));
        assert!(parse_size("x").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
