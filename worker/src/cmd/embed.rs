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
use crate::model::{Clip, Heads};

#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    /// A checkpoint (`…/step-NNNNNNNN`) or a directory of them (the newest committed is used).
    #[arg(long)]
    pub checkpoint: String,
    /// Dataset URL (holds manifest.json) whose images to embed.
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
    /// The checkpoint's URL and step.
    pub url: String,
    pub step: u64,
}

impl Encoder {
    /// Loads `url` (a checkpoint, or the newest under it); no optimizer state is read.
    pub fn load(url: &str, store: &StoreOptions) -> Result<Self> {
        let url = checkpoint::resolve(url, store)?;
        let c = checkpoint::read(&url, store, false)?;
        let cfg = RunConfig::parse(&c.state.config, &format!("{url}/trainer.json"))?;
        let model = Clip::new(&c.state.model, Heads::default(), 0, Kind::Float)?;
        model.load_state_dict(&c.tensors, &url, false)?;
        let ctx = c.state.model.context_length as usize;
        let tokenizer = Arc::new(if cfg.data.tokenizer == "clip" {
            Tokenizer::clip(ctx)?
        } else {
            Tokenizer::from_hf_json(cfg.data.tokenizer.as_ref(), ctx)?
        });
        Ok(Self {
            model,
            tokenizer,
            url,
            step: c.state.step,
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
            ImageTransform::eval(self.model.config.image_size),
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
    let enc = Encoder::load(&args.checkpoint, &store)?;
    let (column, ids, emb) = match (&args.images, &args.texts) {
        (Some(data), _) => {
            let (keys, emb) = enc.images(data, &args.split, &store, args.batch)?;
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
