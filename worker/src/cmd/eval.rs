//! Evaluation on a dataset split: zero-shot classification (class names × prompt templates, as
//! OpenCLIP's zero-shot eval) and image↔text retrieval recall@1/5/10 over the split's captions.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferroclip_shards::{Classes, StoreArgs, StoreOptions};
use tch::{Kind, Tensor};

use crate::data::{ImageTransform, Loader, LoaderOptions, SampleRef, Tokenizer};
use crate::model::{normalize, Clip};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EvalReport {
    pub samples: usize,
    pub classes: usize,
    /// Zero-shot top-1 / top-5 accuracy (samples with a label only).
    pub zeroshot_top1: f64,
    pub zeroshot_top5: f64,
    /// Image → text and text → image recall@{1,5,10}.
    pub image_to_text: [f64; 3],
    pub text_to_image: [f64; 3],
}

impl EvalReport {
    pub fn metrics(&self) -> Vec<(String, f64)> {
        vec![
            ("eval/zeroshot_top1".into(), self.zeroshot_top1),
            ("eval/zeroshot_top5".into(), self.zeroshot_top5),
            ("eval/i2t_r1".into(), self.image_to_text[0]),
            ("eval/i2t_r5".into(), self.image_to_text[1]),
            ("eval/i2t_r10".into(), self.image_to_text[2]),
            ("eval/t2i_r1".into(), self.text_to_image[0]),
            ("eval/t2i_r5".into(), self.text_to_image[1]),
            ("eval/t2i_r10".into(), self.text_to_image[2]),
        ]
    }
}

/// Evaluates `model` on `split` of the dataset at `url` (at most `max_samples`, 0 = all).
pub fn evaluate(
    model: &Clip,
    tokenizer: Arc<Tokenizer>,
    url: &str,
    store: &StoreOptions,
    split: &str,
    max_samples: usize,
) -> Result<EvalReport> {
    // The loader opens the dataset on its own runtime: an object store's pooled connections
    // belong to the runtime that made them (one made on a runtime that then stops would hang
    // the next request until its timeout).
    let loader = Loader::open(
        url,
        store,
        split,
        ImageTransform::eval(model.config.image_size),
        tokenizer.clone(),
        &LoaderOptions::default(),
    )
    .with_context(|| format!("opening {url}"))?;
    let classes = loader.dataset().classes().cloned();
    let blocks = loader.dataset().blocks(split)?;
    let mut refs: Vec<SampleRef> = blocks
        .iter()
        .flat_map(|b| (0..b.rows).map(move |row| SampleRef::at(b.index, row)))
        .collect();
    if max_samples > 0 {
        refs.truncate(max_samples);
    }
    if refs.is_empty() {
        bail!("{url}: split {split:?} has no samples to evaluate");
    }
    let _guard = tch::no_grad_guard();
    let (mut img, mut txt, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in refs.chunks(256) {
        let batch = loader.load(chunk)?;
        img.push(model.image_features(&batch.images, None));
        txt.push(model.text_features(&batch.tokens));
        labels.extend(batch.labels);
    }
    let img = Tensor::cat(&img, 0);
    let txt = Tensor::cat(&txt, 0);
    let mut report = EvalReport {
        samples: refs.len(),
        ..Default::default()
    };
    let sims = img.matmul(&txt.tr());
    report.image_to_text = recall(&sims);
    report.text_to_image = recall(&sims.tr());
    if let Some(classes) = classes {
        let (top1, top5) = zero_shot(model, &tokenizer, &classes, &img, &labels)?;
        report.classes = classes.classes.len();
        report.zeroshot_top1 = top1;
        report.zeroshot_top5 = top5;
    }
    Ok(report)
}

/// Fraction of rows whose matching column (the diagonal) ranks within the top 1, 5, 10.
fn recall(sims: &Tensor) -> [f64; 3] {
    let n = sims.size()[0];
    let diag = sims.diagonal(0, 0, 1).unsqueeze(1);
    // Rank = how many columns score strictly higher than the true one.
    let rank = sims.gt_tensor(&diag).sum_dim_intlist(1, false, Kind::Int64);
    [1, 5, 10].map(|k| rank.lt(k).sum(Kind::Int64).double_value(&[]) / n as f64)
}

fn zero_shot(
    model: &Clip,
    tokenizer: &Tokenizer,
    classes: &Classes,
    img: &Tensor,
    labels: &[Option<String>],
) -> Result<(f64, f64)> {
    if classes.classes.is_empty() || classes.templates.is_empty() {
        bail!("classes.json needs at least one class and one template");
    }
    let mut class_emb = Vec::new();
    for name in &classes.classes {
        let prompts: Vec<String> = classes
            .templates
            .iter()
            .map(|t| t.replace("{}", name))
            .collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let f = model.text_features(&tokenizer.encode_batch(&refs));
        class_emb.push(normalize(&f.mean_dim(
            [0i64].as_slice(),
            false,
            Kind::Float,
        )));
    }
    let class_emb = Tensor::stack(&class_emb, 0);
    let logits = img.matmul(&class_emb.tr());
    let k = 5.min(classes.classes.len() as i64);
    let (_, top) = logits.topk(k, 1, true, true);
    let top: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(top)?;
    let (mut n, mut hit1, mut hit5) = (0usize, 0usize, 0usize);
    for (row, label) in top.iter().zip(labels) {
        let Some(label) = label else { continue };
        let Some(idx) = classes.classes.iter().position(|c| c == label) else {
            continue;
        };
        n += 1;
        hit1 += usize::from(row.first() == Some(&(idx as i64)));
        hit5 += usize::from(row.contains(&(idx as i64)));
    }
    if n == 0 {
        bail!(
            "no evaluated sample has a label among the {} classes",
            classes.classes.len()
        );
    }
    Ok((hit1 as f64 / n as f64, hit5 as f64 / n as f64))
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint (a `step-N` directory) or a directory holding them (the newest is
    /// used): a path or an object-store URL.
    #[arg(long)]
    pub checkpoint: String,
    /// Dataset URL (holds manifest.json; classes.json gives the zero-shot classes).
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Evaluate at most this many samples (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_samples: usize,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `ferroclip-worker eval` from its flags.
pub fn run(args: EvalArgs) -> Result<EvalReport> {
    run_cli(
        &args.checkpoint,
        &args.data,
        &args.split,
        args.max_samples,
        &args.store.options(),
    )
}

/// `ferroclip-worker eval`: loads a checkpoint (its own trainer.json names the model and the
/// tokenizer) and prints the report.
pub fn run_cli(
    checkpoint: &str,
    data: &str,
    split: &str,
    max_samples: usize,
    store: &StoreOptions,
) -> Result<EvalReport> {
    // A checkpoint, or the newest under a directory, on any store.
    let url = crate::checkpoint::resolve(checkpoint, store)?;
    let c = crate::checkpoint::read(&url, store, true)?;
    let state = c.state.clone();
    let cfg =
        ferroclip_proto::config::RunConfig::parse(&state.config, &format!("{url}/trainer.json"))?;
    let mut trainer = crate::train::Trainer::new(&cfg, 1)?;
    crate::checkpoint::restore(&mut trainer, &c.state, &c.tensors, c.optim, &c.url)?;
    let ctx = trainer.model.config.context_length as usize;
    let tokenizer = Arc::new(Tokenizer::from_config(&cfg.data.tokenizer, ctx)?);
    let r = evaluate(&trainer.model, tokenizer, data, store, split, max_samples)?;
    println!(
        "evaluated {} samples of split {split:?} at step {}",
        r.samples, state.step
    );
    if r.classes > 0 {
        println!(
            "zero-shot ({} classes, chance {:.1}%): top-1 {:.1}%  top-5 {:.1}%",
            r.classes,
            100.0 / r.classes as f64,
            100.0 * r.zeroshot_top1,
            100.0 * r.zeroshot_top5
        );
    }
    let pct = |v: [f64; 3]| {
        format!(
            "R@1 {:.1}%  R@5 {:.1}%  R@10 {:.1}%",
            100.0 * v[0],
            100.0 * v[1],
            100.0 * v[2]
        )
    };
    println!("image→text retrieval: {}", pct(r.image_to_text));
    println!("text→image retrieval: {}", pct(r.text_to_image));
    Ok(r)
}
