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
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
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
    /// Dataset URL (holds manifest.json) whose images to embed, or a folder / object-store
    /// prefix of image files (.jpg, .jpeg, .png directly under it; keys are the file names, in
    /// name order), preprocessed as the checkpoint's config says (size, mean/std,
    /// interpolation, resize mode).
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
    /// The eval transform with the weights' own preprocessing (a hub config's, else CLIP's).
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
        let transform = p.preprocess.eval_transform(config.image_size);
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

    /// Keys (file names) and `[N, E]` unit-norm embeddings of the image files directly under
    /// `url` (a local folder or an object-store prefix), in name order. Each batch's files are
    /// fetched concurrently.
    pub fn image_folder(
        &self,
        url: &str,
        store: &StoreOptions,
        batch: usize,
    ) -> Result<(Vec<String>, Tensor)> {
        let loc = Location::open(url, store)?;
        let rt = runtime()?;
        let listed = rt
            .block_on(loc.store.list_with_delimiter(Some(&loc.path)))
            .with_context(|| format!("listing {url}"))?;
        let mut files: Vec<object_store::path::Path> = listed
            .objects
            .into_iter()
            .map(|o| o.location)
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_lowercase().as_str()))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{url}: no image files (.jpg, .jpeg, .png) and no manifest.json");
        }
        let s = self.model.config.image_size;
        let _guard = tch::no_grad_guard();
        let mut parts = Vec::new();
        for chunk in files.chunks(batch.max(1)) {
            let fetched: Vec<Vec<u8>> = rt
                .block_on(
                    futures::stream::iter(chunk.iter().map(|f| {
                        let store = loc.store.clone();
                        let name = loc.display(f);
                        async move {
                            let get = store
                                .get(f)
                                .await
                                .with_context(|| format!("reading {name}"))?;
                            let bytes = get
                                .bytes()
                                .await
                                .with_context(|| format!("reading {name}"))?;
                            anyhow::Ok(bytes.to_vec())
                        }
                    }))
                    .buffered(16)
                    .collect::<Vec<_>>(),
                )
                .into_iter()
                .collect::<Result<_>>()?;
            let mut pixels = Vec::with_capacity(chunk.len() * self.transform.output_len());
            for (f, bytes) in chunk.iter().zip(&fetched) {
                let px = self
                    .transform
                    .apply(bytes, 0)
                    .with_context(|| format!("decoding {}", loc.display(f)))?;
                pixels.extend(px);
            }
            let images = Tensor::from_slice(&pixels).view([chunk.len() as i64, 3, s, s]);
            parts.push(self.model.image_features(&images, None));
        }
        let keys = files
            .iter()
            .map(|f| f.filename().unwrap_or_default().to_string())
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

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Whether `url` is a built dataset (holds `manifest.json`) rather than a folder of images.
fn is_dataset(url: &str, store: &StoreOptions) -> Result<bool> {
    let manifest = Location::open(url, store)?.join("manifest.json");
    match runtime()?.block_on(manifest.store.head(&manifest.path)) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", manifest.url())),
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
    runtime()?
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
            let (keys, emb) = if is_dataset(data, &store)? {
                enc.images(data, &args.split, &store, args.batch)?
            } else {
                enc.image_folder(data, &store, args.batch)?
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
