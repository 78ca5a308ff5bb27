//! `ferroclip-worker embed`: L2-normalised image or text embeddings of a checkpoint, for users'
//! retrieval systems, written as `.npy` or `.parquet` (see `output`). Images get the eval
//! transform (resize + centre crop), texts the checkpoint's own tokenizer.

pub mod output;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferroclip_proto::config::RunConfig;
use ferroclip_shards::store::Location;
use ferroclip_shards::{StoreArgs, StoreOptions};
use object_store::{ObjectStoreExt, PutPayload};
use tch::{Kind, Tensor};

use crate::checkpoint;
use crate::data::{ImageTransform, Loader, LoaderOptions, SampleRef, Tokenizer};
use crate::model::{Clip, Heads, ModelConfig};

#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    /// A checkpoint (`…/step-NNNNNNNN`) or a directory of them (the newest committed is used),
    /// an OpenCLIP / Hugging Face hub directory (`open_clip_config.json` +
    /// `open_clip_model.safetensors`), or a bare OpenCLIP `.safetensors` file (with --preset).
    #[arg(long)]
    pub checkpoint: String,
    /// The architecture of a bare `.safetensors` --checkpoint (e.g. ViT-B-32-quickgelu).
    #[arg(long)]
    pub preset: Option<String>,
    /// Dataset URL (holds manifest.json) whose images to embed, or a local folder of image
    /// files (.jpg, .jpeg, .png; keys are the file names, in name order).
    #[arg(long, required_unless_present = "texts", conflicts_with = "texts")]
    pub images: Option<String>,
    /// Split of --images.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Text file, one text per line (empty lines skipped).
    #[arg(long)]
    pub texts: Option<String>,
    /// Output path or URL ending in .npy or .parquet.
    #[arg(long)]
    pub out: String,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// A checkpoint's CLIP towers and tokenizer, for inference.
pub struct Encoder {
    pub model: Clip,
    pub tokenizer: Arc<Tokenizer>,
    /// The weights' URL and (for a ferroclip checkpoint) step.
    pub url: String,
    pub step: u64,
    /// The eval transform with the weights' own normalisation (a hub config's, else CLIP's).
    pub transform: ImageTransform,
    /// A ferroclip checkpoint's `eval.classes` (zero-shot classes file), when it names one.
    pub eval_classes: Option<String>,
}

impl Encoder {
    /// Loads `url` in any of `checkpoint::read_pretrained`'s forms; `preset` is the
    /// architecture of a bare safetensors file. No optimizer state is read.
    pub fn load(url: &str, store: &StoreOptions, preset: Option<&str>) -> Result<Self> {
        let p = checkpoint::read_pretrained(url, store)?;
        let config = match (&p.config, preset) {
            (Some(c), _) => c.clone(),
            (None, Some(name)) => ModelConfig::preset(name)?,
            (None, None) => bail!("{}: a bare safetensors file needs --preset", p.url),
        };
        let model = Clip::new(&config, Heads::default(), 0, Kind::Float)?;
        checkpoint::load_into(&model, &p)?;
        // A ferroclip checkpoint names its tokenizer; OpenCLIP's CLIP models use CLIP's BPE.
        let run = match &p.run_config {
            Some(text) => Some(RunConfig::parse(text, &format!("{}/trainer.json", p.url))?),
            None => None,
        };
        let tokenizer = run
            .as_ref()
            .map_or_else(|| "clip".to_string(), |r| r.data.tokenizer.clone());
        let eval_classes = run.map(|r| r.eval.classes).filter(|c| !c.is_empty());
        let ctx = config.context_length as usize;
        let mut transform = ImageTransform::eval(config.image_size);
        if let Some((mean, std)) = p.mean_std {
            (transform.mean, transform.std) = (mean, std);
        }
        Ok(Self {
            model,
            tokenizer: Arc::new(Tokenizer::from_config(&tokenizer, ctx)?),
            url: p.url,
            step: p.step,
            transform,
            eval_classes,
        })
    }

    /// `[N, E]` unit-norm embeddings of `texts`, `batch` at a time.
    pub fn texts(&self, texts: &[String], batch: usize) -> Tensor {
        let _guard = tch::no_grad_guard();
        let parts: Vec<Tensor> = texts
            .chunks(batch.max(1))
            .map(|chunk| {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                self.model
                    .text_features(&self.tokenizer.encode_batch(&refs))
            })
            .collect();
        cat_rows(parts, self.model.config.embed_dim)
    }

    /// Keys (file names) and `[N, E]` unit-norm embeddings of the image files in the local
    /// folder `dir`, in name order.
    pub fn image_folder(&self, dir: &str, batch: usize) -> Result<(Vec<String>, Tensor)> {
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {dir}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| ["jpg", "jpeg", "png"].contains(&x.to_lowercase().as_str()))
            })
            .collect();
        files.sort();
        let s = self.model.config.image_size;
        let _guard = tch::no_grad_guard();
        let mut parts = Vec::new();
        for chunk in files.chunks(batch.max(1)) {
            let mut pixels = Vec::with_capacity(chunk.len() * self.transform.output_len());
            for f in chunk {
                let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let px = self
                    .transform
                    .apply(&bytes, 0)
                    .with_context(|| format!("decoding {}", f.display()))?;
                pixels.extend(px);
            }
            let images = Tensor::from_slice(&pixels).view([chunk.len() as i64, 3, s, s]);
            parts.push(self.model.image_features(&images, None));
        }
        let keys = files
            .iter()
            .map(|f| {
                f.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into())
            })
            .collect();
        Ok((keys, cat_rows(parts, self.model.config.embed_dim)))
    }

    /// Keys and `[N, E]` unit-norm embeddings of every image of `split` at `data`, in block order.
    pub fn images(
        &self,
        data: &str,
        split: &str,
        store: &StoreOptions,
        batch: usize,
    ) -> Result<(Vec<String>, Tensor)> {
        let loader = Loader::open(
            data,
            store,
            split,
            self.transform.clone(),
            self.tokenizer.clone(),
            &LoaderOptions::default(),
        )
        .with_context(|| format!("opening {data}"))?;
        let refs: Vec<SampleRef> = loader
            .block_rows()
            .iter()
            .enumerate()
            .flat_map(|(b, &rows)| (0..rows).map(move |row| SampleRef::at(b as u32, row)))
            .collect();
        let _guard = tch::no_grad_guard();
        let mut keys = Vec::with_capacity(refs.len());
        let mut parts = Vec::new();
        for (i, chunk) in refs.chunks(batch.max(1)).enumerate() {
            if let Some(next) = refs.chunks(batch.max(1)).nth(i + 1) {
                let blocks: Vec<u32> = next.iter().map(|r| r.block).collect();
                loader.prefetch(&blocks);
            }
            let b = loader.load(chunk)?;
            parts.push(self.model.image_features(&b.images, None));
            keys.extend(b.keys);
        }
        Ok((keys, cat_rows(parts, self.model.config.embed_dim)))
    }
}

fn cat_rows(parts: Vec<Tensor>, dim: i64) -> Tensor {
    if parts.is_empty() {
        Tensor::zeros([0, dim], (Kind::Float, tch::Device::Cpu))
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// Non-empty lines of a text file (trailing whitespace trimmed).
pub fn read_texts(path: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text
        .lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Serialises `[N, D]` embeddings with their ids and puts the file at `out` (path or URL).
pub fn write(
    out: &str,
    store: &StoreOptions,
    id_column: &str,
    ids: &[String],
    emb: &Tensor,
) -> Result<()> {
    let format = output::Format::from_path(out)?;
    let (rows, dim) = match emb.size().as_slice() {
        [r, d] => (*r as usize, *d as usize),
        other => bail!("embeddings have shape {other:?}, expected [N, D]"),
    };
    let values = Vec::<f32>::try_from(emb.to_kind(Kind::Float).contiguous().view([-1]))?;
    let bytes = match format {
        output::Format::Npy => output::npy(&values, rows, dim)?,
        output::Format::Parquet => output::parquet(id_column, ids, &values, dim)?,
    };
    let loc = Location::open(out, store)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(loc.store.put(&loc.path, PutPayload::from(bytes)))
        .with_context(|| format!("writing {out}"))?;
    Ok(())
}

pub fn run_cli(args: EmbedArgs) -> Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n.max(1));
    }
    // Fail on a bad extension before any model is loaded.
    output::Format::from_path(&args.out)?;
    let store = args.store.options();
    let enc = Encoder::load(&args.checkpoint, &store, args.preset.as_deref())?;
    let (column, ids, emb) = match (&args.images, &args.texts) {
        (Some(data), _) => {
            let dir = std::path::Path::new(data);
            let (keys, emb) = if dir.is_dir() && !dir.join("manifest.json").exists() {
                enc.image_folder(data, args.batch)?
            } else {
                enc.images(data, &args.split, &store, args.batch)?
            };
            ("key", keys, emb)
        }
        (None, Some(path)) => {
            let texts = read_texts(path)?;
            let emb = enc.texts(&texts, args.batch);
            ("text", texts, emb)
        }
        (None, None) => bail!("give --images DATA_URL or --texts FILE"),
    };
    write(&args.out, &store, column, &ids, &emb)?;
    println!(
        "wrote {} embeddings of dimension {} from {} (step {}) to {}",
        ids.len(),
        enc.model.config.embed_dim,
        enc.url,
        enc.step,
        args.out
    );
    Ok(())
}
