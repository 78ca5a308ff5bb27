//! Evaluation on a dataset split: zero-shot classification (class names × prompt templates, as
//! OpenCLIP's zero-shot eval) and image↔text retrieval recall@1/5/10 over the split's captions,
//! grouped by image where the dataset has several captions per image (`image_id`), as
//! CLIP_benchmark computes it. With `--itm-rerank K` (a model with a fusion encoder) each query's
//! top K candidates by the dual-encoder similarity are re-scored by the ITM head (BLIP's
//! re-ranking, scored as ITM log-odds + the contrastive logit) and recall is reported before and
//! after, with the queries whose top-1 re-ranking changed and McNemar's test of those counts.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferroclip_shards::{Classes, Label, StoreArgs, StoreOptions};
use tch::{Kind, Tensor};

use crate::data::{ImageTransform, Loader, LoaderOptions, SampleRef, Tokenizer};
use crate::model::{normalize, Clip};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Rows (captions) evaluated.
    pub samples: usize,
    /// Distinct images among them (each encoded once).
    pub images: usize,
    pub classes: usize,
    /// Zero-shot top-1 / top-5 accuracy (samples with a label in the class list only).
    pub zeroshot_top1: f64,
    pub zeroshot_top5: f64,
    /// Images whose label is in the class list (the zero-shot denominator).
    pub labelled: usize,
    /// Images whose label names no class (an unknown name, an index out of range): counted,
    /// not scored; a few of them as examples.
    pub bad_labels: usize,
    pub bad_label_examples: Vec<String>,
    /// Image → text and text → image recall@{1,5,10}.
    pub image_to_text: [f64; 3],
    pub text_to_image: [f64; 3],
    /// Recall after ITM re-ranking (`--itm-rerank`); the fields above are the figures before.
    pub itm_rerank: Option<RerankReport>,
}

/// Retrieval recall@{1,5,10} after re-scoring each query's top `k` candidates by ITM.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RerankReport {
    pub k: usize,
    pub image_to_text: [f64; 3],
    pub text_to_image: [f64; 3],
    /// Image queries whose first text re-ranking made right / wrong, and McNemar's exact
    /// two-sided p of those counts: whether the R@1 change is more than chance.
    pub image_to_text_changes: TopOneChanges,
    pub text_to_image_changes: TopOneChanges,
}

/// Queries whose top-1 hit re-ranking changed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TopOneChanges {
    /// Wrong before, right after.
    pub fixed: usize,
    /// Right before, wrong after.
    pub broken: usize,
    /// McNemar's exact test: the two-sided binomial p of `fixed` against `broken` at ½.
    pub p: f64,
}

impl TopOneChanges {
    fn between(before: &[bool], after: &[bool]) -> Self {
        let fixed = before.iter().zip(after).filter(|&(&b, &a)| !b && a).count();
        let broken = before.iter().zip(after).filter(|&(&b, &a)| b && !a).count();
        TopOneChanges {
            fixed,
            broken,
            p: mcnemar_p(fixed, broken),
        }
    }
}

/// McNemar's exact two-sided p: 2 P(X ≤ min(a, b)) for X ~ Binomial(a + b, ½), at most 1; the
/// binomial terms in log space (n in the thousands underflows 2^-n).
pub fn mcnemar_p(a: usize, b: usize) -> f64 {
    let n = a + b;
    // ln k! for k = 0..=n.
    let ln_fact: Vec<f64> = std::iter::once(0.0)
        .chain((1..=n).scan(0.0, |acc, i| {
            *acc += (i as f64).ln();
            Some(*acc)
        }))
        .collect();
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    let tail: f64 = (0..=a.min(b))
        .map(|k| (ln_fact[n] - ln_fact[k] - ln_fact[n - k] - ln_half_n).exp())
        .sum();
    (2.0 * tail).min(1.0)
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
/// Zero-shot classes come from `classes` (a classes file's path or URL: `--classes`,
/// `eval.classes`) or else the dataset's own `classes.json`.
pub fn evaluate(
    model: &Clip,
    tokenizer: Arc<Tokenizer>,
    url: &str,
    store: &StoreOptions,
    split: &str,
    max_samples: usize,
    classes: Option<&str>,
) -> Result<EvalReport> {
    evaluate_with(model, tokenizer, url, store, split, max_samples, classes, 0)
}

/// `evaluate`, and with `itm_rerank` > 0 the recall after re-ranking each query's top
/// `itm_rerank` candidates by the ITM head (the model needs a fusion encoder).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    model: &Clip,
    tokenizer: Arc<Tokenizer>,
    url: &str,
    store: &StoreOptions,
    split: &str,
    max_samples: usize,
    classes: Option<&str>,
    itm_rerank: usize,
) -> Result<EvalReport> {
    if itm_rerank > 0 && model.fusion.is_none() {
        bail!("--itm-rerank: {}", crate::model::ModelError::NoFusion);
    }
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
    let classes = match classes {
        Some(c) => Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(Classes::load(c, store))?,
        ),
        None => loader.dataset().classes().cloned(),
    };
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
    let (mut img, mut txt, mut labels, mut ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Re-ranking's inputs: image tokens, text hidden states (padded to the context), EOTs.
    let (mut img_tok, mut txt_hid, mut eots) = (Vec::new(), Vec::new(), Vec::new());
    let mut tokens: Vec<Vec<i64>> = Vec::new();
    let mut firsts = std::collections::HashSet::new();
    for chunk in refs.chunks(256) {
        let batch = loader.load(chunk)?;
        // Each image once: the rows that repeat an earlier row's image id encode only text.
        let new: Vec<i64> = (0..batch.image_ids.len())
            .filter(|&r| batch.image_ids[r].is_none_or(|id| firsts.insert(id)))
            .map(|r| r as i64)
            .collect();
        if !new.is_empty() {
            let rows = Tensor::from_slice(&new);
            let images = batch.images.index_select(0, &rows);
            if itm_rerank > 0 {
                let (f, t) = model.image_features_and_tokens(&images, None);
                img.push(f);
                img_tok.push(t);
            } else {
                img.push(model.image_features(&images, None));
            }
            labels.extend(new.iter().map(|&r| batch.labels[r as usize].clone()));
        }
        if itm_rerank > 0 {
            let (f, h, eot) = model.text_features_and_tokens(&batch.tokens);
            let pad = batch.tokens.size()[1] - h.size()[1];
            txt.push(f);
            txt_hid.push(h.constant_pad_nd([0, 0, 0, pad]));
            eots.push(eot);
        } else {
            txt.push(model.text_features(&batch.tokens));
        }
        if itm_rerank > 0 {
            tokens.extend(Vec::<Vec<i64>>::try_from(&batch.tokens)?);
        }
        ids.extend(batch.image_ids);
    }
    let img = Tensor::cat(&img, 0);
    let txt = Tensor::cat(&txt, 0);
    let text_image = image_of_each_text(&ids);
    let mut report = EvalReport {
        samples: refs.len(),
        images: img.size()[0] as usize,
        ..Default::default()
    };
    let sims = img.matmul(&txt.tr());
    let (i2t_rank, t2i_rank) = ranks(&sims, &text_image);
    (report.image_to_text, report.text_to_image) = (recall_at(&i2t_rank), recall_at(&t2i_rank));
    if itm_rerank > 0 {
        let tokens = ItmTokens {
            image: Tensor::cat(&img_tok, 0),
            text: Tensor::cat(&txt_hid, 0),
            eot: Tensor::cat(&eots, 0),
            group: text_groups(&tokens),
        };
        let (i2t, t2i) = rerank(model, &sims, &tokens, itm_rerank as i64)?;
        let (i2t, t2i) = (ranks(&i2t, &text_image).0, ranks(&t2i, &text_image).1);
        report.itm_rerank = Some(RerankReport {
            k: itm_rerank,
            image_to_text: recall_at(&i2t),
            text_to_image: recall_at(&t2i),
            image_to_text_changes: TopOneChanges::between(&top_one(&i2t_rank)?, &top_one(&i2t)?),
            text_to_image_changes: TopOneChanges::between(&top_one(&t2i_rank)?, &top_one(&t2i)?),
        });
    }
    if let Some(classes) = classes {
        let z = zero_shot(model, &tokenizer, &classes, &img, &labels)?;
        report.classes = classes.classes.len();
        (report.zeroshot_top1, report.zeroshot_top5) = (z.top1, z.top5);
        (report.labelled, report.bad_labels) = (z.labelled, z.bad.len());
        report.bad_label_examples = z.bad.into_iter().take(5).collect();
    }
    Ok(report)
}

/// The fusion encoder's inputs for every evaluated image and text.
struct ItmTokens {
    /// [images, 1+G, Wv]
    image: Tensor,
    /// [texts, ctx, W]
    text: Tensor,
    /// [texts]
    eot: Tensor,
    /// Each text's first text with the same token ids (`text_groups`).
    group: Vec<i64>,
}

/// Above every dual-encoder similarity (cosines, in [-1, 1]): re-scored candidates rank first.
/// ITM log-odds and contrastive logits (at most 100) are far below it, and f64 keeps 1e-10 of
/// resolution at this size.
const RERANKED: f64 = 1e6;

/// Score matrices [images, texts] (f64) for image→text and for text→image recall: each image's
/// top `k` distinct texts, with every copy of each (first), and each text's top `k` images
/// (second) by `sims` re-scored as
/// `RERANKED` + ITM log-odds + the contrastive logit (logit scale × cosine); other entries keep
/// `sims`. Both terms are log-odds, so their sum weighs the two models as a product of
/// experts: an undecided ITM head leaves the dual encoder's order, a confident one overrides
/// it. (BLIP adds the bare cosine, which any ITM noise outweighs: with a weak head that made
/// R@1 worse than the dual encoder's, bench/README-itm.md.)
fn rerank(model: &Clip, sims: &Tensor, t: &ItmTokens, k: i64) -> Result<(Tensor, Tensor)> {
    let scale = model
        .logit_scale
        .detach()
        .exp()
        .to_kind(Kind::Double)
        .double_value(&[]);
    let sims = sims.to_kind(Kind::Double);
    let (n_img, n_txt) = (sims.size()[0], sims.size()[1]);
    let i2t = sims.copy();
    let t2i = sims.copy();
    // Image → text: row i's best k distinct texts, each scored once and its score given to
    // every copy of it (the ITM score is a function of the image and the tokens). Re-scoring
    // k columns instead would lift k copies of a caption over the image's own copy of it,
    // which the dual encoder ties with them (bench/README-itm.md).
    let mut copies: std::collections::HashMap<i64, Vec<i64>> = Default::default();
    for (j, &g) in t.group.iter().enumerate() {
        copies.entry(g).or_default().push(j as i64);
    }
    let (_, cand) = sims.topk((CANDIDATE_POOL * k).min(n_txt), 1, true, true);
    let cand: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(cand)?;
    let pairs: Vec<(i64, i64)> = cand
        .iter()
        .enumerate()
        .flat_map(|(i, row)| {
            distinct_top(row, &t.group, k as usize)
                .into_iter()
                .map(move |g| (i as i64, g))
        })
        .collect();
    let scores = itm_log_odds(model, t, &pairs)?;
    for (&(i, g), s) in pairs.iter().zip(scores) {
        for &j in copies.get(&g).map(Vec::as_slice).unwrap_or(&[g]) {
            let v = RERANKED + s + scale * sims.double_value(&[i, j]);
            let _ = i2t.get(i).get(j).fill_(v);
        }
    }
    // Text → image: column j's best images.
    let (_, cand) = sims.topk(k.min(n_img), 0, true, true);
    let cand: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(cand.tr().contiguous())?;
    let pairs: Vec<(i64, i64)> = cand
        .iter()
        .enumerate()
        .flat_map(|(j, col)| col.iter().map(move |&i| (i, j as i64)))
        .collect();
    let scores = itm_log_odds(model, t, &pairs)?;
    for (&(i, j), s) in pairs.iter().zip(scores) {
        let v = RERANKED + s + scale * sims.double_value(&[i, j]);
        let _ = t2i.get(i).get(j).fill_(v);
    }
    Ok((i2t, t2i))
}

/// How many of a row's best columns are searched for its k distinct texts: a row whose best
/// 4k columns hold fewer than k distinct texts re-ranks those it found.
const CANDIDATE_POOL: i64 = 4;

/// Each text's group: the index of the first text with the same token ids.
fn text_groups(tokens: &[Vec<i64>]) -> Vec<i64> {
    let mut first = std::collections::HashMap::new();
    tokens
        .iter()
        .enumerate()
        .map(|(j, t)| *first.entry(t.as_slice()).or_insert(j as i64))
        .collect()
}

/// The groups of the first `k` distinct texts among `best` (columns, best first).
fn distinct_top(best: &[i64], group: &[i64], k: usize) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::with_capacity(k);
    for &j in best {
        let g = group.get(j as usize).copied().unwrap_or(j);
        if !out.contains(&g) {
            out.push(g);
            if out.len() == k {
                break;
            }
        }
    }
    out
}

/// ITM log-odds (match − no match) of (image, text) pairs, in batches.
fn itm_log_odds(model: &Clip, t: &ItmTokens, pairs: &[(i64, i64)]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(256) {
        let ti = Tensor::from_slice(&chunk.iter().map(|p| p.1).collect::<Vec<_>>());
        // Each distinct image's keys and values once (an image's k candidates share it).
        let mut distinct: Vec<i64> = chunk.iter().map(|p| p.0).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let image_of: Vec<i64> = chunk
            .iter()
            .map(|p| distinct.partition_point(|&d| d < p.0) as i64)
            .collect();
        let eot = t.eot.index_select(0, &ti);
        let used = eot.max().int64_value(&[]) + 1;
        let logits = model.itm_logits(
            &t.text.index_select(0, &ti).narrow(1, 0, used),
            &eot,
            &t.image.index_select(0, &Tensor::from_slice(&distinct)),
            Some(&Tensor::from_slice(&image_of)),
        )?;
        let odds = (logits.select(1, 1) - logits.select(1, 0)).to_kind(Kind::Double);
        out.extend(Vec::<f64>::try_from(odds)?);
    }
    Ok(out)
}

/// Each text's image: an index into the distinct images in order of first appearance (a row
/// without an image id is an image of its own).
fn image_of_each_text(ids: &[Option<i64>]) -> Vec<i64> {
    let mut index = std::collections::HashMap::new();
    let mut next = 0i64;
    ids.iter()
        .map(|id| {
            let mut new = || {
                next += 1;
                next - 1
            };
            match id {
                Some(id) => *index.entry(*id).or_insert_with(new),
                None => new(),
            }
        })
        .collect()
}

/// Recall@{1,5,10} both ways over `sims` = [images, texts], text t being a caption of image
/// `text_image[t]` (CLIP_benchmark's definition). Image→text: an image is a hit at k when any of
/// its captions ranks within k. Text→image: each caption's own image within k. A rank is the
/// number of candidates scoring strictly higher than the true one.
#[cfg(test)]
fn recall(sims: &Tensor, text_image: &[i64]) -> ([f64; 3], [f64; 3]) {
    let (i2t_rank, t2i_rank) = ranks(sims, text_image);
    (recall_at(&i2t_rank), recall_at(&t2i_rank))
}

/// Recall@{1,5,10} of the queries' ranks.
fn recall_at(rank: &Tensor) -> [f64; 3] {
    let n = rank.size()[0] as f64;
    [1, 5, 10].map(|k| rank.lt(k).sum(Kind::Int64).double_value(&[]) / n)
}

/// Per query, whether its first candidate is right (rank 0).
fn top_one(rank: &Tensor) -> Result<Vec<bool>> {
    Ok(Vec::<bool>::try_from(rank.eq(0))?)
}

/// Each image's rank (texts scoring above its best caption) and each text's (images scoring
/// above its own): ties count for the query.
fn ranks(sims: &Tensor, text_image: &[i64]) -> (Tensor, Tensor) {
    let n_img = sims.size()[0];
    let owner = Tensor::from_slice(text_image).to_device(sims.device());
    let positive = Tensor::arange(n_img, (Kind::Int64, sims.device()))
        .unsqueeze(1)
        .eq_tensor(&owner.unsqueeze(0));
    // An image's best-scoring caption against every other caption.
    let best = sims
        .masked_fill(&positive.logical_not(), f64::NEG_INFINITY)
        .amax([1i64].as_slice(), true);
    let i2t_rank = sims.gt_tensor(&best).sum_dim_intlist(1, false, Kind::Int64);
    // A caption's own image against every image.
    let own = sims.gather(0, &owner.unsqueeze(0), false);
    let t2i_rank = sims.gt_tensor(&own).sum_dim_intlist(0, false, Kind::Int64);
    (i2t_rank, t2i_rank)
}

/// Zero-shot accuracy over the images with a label in the class list.
struct ZeroShot {
    top1: f64,
    top5: f64,
    labelled: usize,
    /// The labels that name no class, one per image.
    bad: Vec<String>,
}

/// A label's class: a name's position in the list, or an index within it.
fn class_of(label: &Label, classes: &[String]) -> Option<usize> {
    match label {
        Label::Name(n) => classes.iter().position(|c| c == n),
        Label::Index(i) => usize::try_from(*i).ok().filter(|&i| i < classes.len()),
    }
}

fn zero_shot(
    model: &Clip,
    tokenizer: &Tokenizer,
    classes: &Classes,
    img: &Tensor,
    labels: &[Option<Label>],
) -> Result<ZeroShot> {
    if classes.classes.is_empty() || classes.templates.is_empty() {
        bail!("the class list needs at least one class and one template");
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
    let (mut n, mut hit1, mut hit5, mut bad) = (0usize, 0usize, 0usize, Vec::new());
    for (row, label) in top.iter().zip(labels) {
        let Some(label) = label else { continue };
        let Some(idx) = class_of(label, &classes.classes) else {
            bad.push(label.to_string());
            continue;
        };
        n += 1;
        hit1 += usize::from(row.first() == Some(&(idx as i64)));
        hit5 += usize::from(row.contains(&(idx as i64)));
    }
    if n == 0 {
        bail!(
            "no evaluated sample has a label among the {} classes ({} labels name no class, e.g. {:?})",
            classes.classes.len(),
            bad.len(),
            bad.iter().take(5).collect::<Vec<_>>()
        );
    }
    Ok(ZeroShot {
        top1: hit1 as f64 / n as f64,
        top5: hit5 as f64 / n as f64,
        labelled: n,
        bad,
    })
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint (a `step-N` directory) or a directory holding them (the newest is
    /// used): a path or an object-store URL; or an OpenCLIP / Hugging Face hub directory
    /// (`open_clip_config.json` + `open_clip_model.safetensors`), or a bare OpenCLIP
    /// `.safetensors` file (with --preset).
    #[arg(long)]
    pub checkpoint: String,
    /// The architecture of a bare `.safetensors` --checkpoint (e.g. ViT-B-32-quickgelu).
    #[arg(long)]
    pub preset: Option<String>,
    /// Dataset URL (holds manifest.json; classes.json gives the zero-shot classes).
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Evaluate at most this many samples (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_samples: usize,
    /// Print the report as one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Zero-shot class names and prompt templates (a `classes.json`-shaped file, path or URL)
    /// instead of the dataset's own classes.json. Integer labels index this list.
    #[arg(long)]
    pub classes: Option<String>,
    /// Re-rank each query's top K retrieval candidates by the ITM head of the fusion encoder
    /// and report recall before and after (0 = off; the model needs a fusion encoder).
    #[arg(long, default_value_t = 0)]
    pub itm_rerank: usize,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `ferroclip-worker eval`: loads the weights (a checkpoint's own trainer.json names the model
/// and the tokenizer; a hub directory's config the model) and prints the report.
pub fn run(args: EvalArgs) -> Result<EvalReport> {
    let store = args.store.options();
    let (checkpoint, split) = (args.checkpoint.as_str(), args.split.as_str());
    // A checkpoint (or the newest under a directory), a hub directory or a bare file.
    let enc = super::embed::Encoder::load(checkpoint, &store, args.preset.as_deref())?;
    let state = enc.step;
    // --classes, else the run's eval.classes, else the dataset's classes.json.
    let classes = args.classes.as_deref().or(enc.eval_classes.as_deref());
    let r = evaluate_with(
        &enc.model,
        enc.tokenizer.clone(),
        &args.data,
        &store,
        split,
        args.max_samples,
        classes,
        args.itm_rerank,
    )?;
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["split"] = split.into();
        v["step"] = state.into();
        println!("{v}");
        return Ok(r);
    }
    println!(
        "evaluated {} samples ({} images) of split {split:?} at step {}",
        r.samples, r.images, state
    );
    if r.classes > 0 {
        println!(
            "zero-shot ({} classes, chance {:.1}%): top-1 {:.1}%  top-5 {:.1}%",
            r.classes,
            100.0 / r.classes as f64,
            100.0 * r.zeroshot_top1,
            100.0 * r.zeroshot_top5
        );
        if r.bad_labels > 0 {
            println!(
                "zero-shot: {} of {} labelled images have a label outside the class list (e.g. {}): not scored",
                r.bad_labels,
                r.labelled + r.bad_labels,
                r.bad_label_examples.join(", ")
            );
        }
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
    if let Some(rr) = &r.itm_rerank {
        println!(
            "image→text retrieval, ITM re-ranking of the top {}: {}",
            rr.k,
            pct(rr.image_to_text)
        );
        println!(
            "text→image retrieval, ITM re-ranking of the top {}: {}",
            rr.k,
            pct(rr.text_to_image)
        );
        for (dir, c) in [
            ("image→text", &rr.image_to_text_changes),
            ("text→image", &rr.text_to_image_changes),
        ] {
            println!(
                "{dir} top-1 changed by re-ranking: {} fixed, {} broken (McNemar p {:.2e})",
                c.fixed, c.broken, c.p
            );
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_p_is_the_exact_two_sided_binomial_tail() {
        // Values from Python's exact integers: 2 Σ_{k ≤ min} C(n, k) / 2^n.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.max(1e-300);
        assert_eq!(mcnemar_p(0, 0), 1.0);
        assert_eq!(mcnemar_p(17, 17), 1.0);
        assert!(close(mcnemar_p(5, 0), 0.0625));
        assert!(close(mcnemar_p(28, 14), 0.043_558_521_923_841_91));
        assert!(close(mcnemar_p(14, 28), 0.043_558_521_923_841_91));
        assert!(close(mcnemar_p(57, 7), 7.638_141_345_540_223e-11));
        // Thousands of changes: 2^-2900 underflows f64; the log-space terms do not.
        assert!(close(mcnemar_p(1500, 1400), 0.065_987_349_665_183_81));
    }

    #[test]
    fn top_one_changes_count_fixed_and_broken_queries() {
        // 2 images, texts 0 and 1 of image 0, text 2 of image 1.
        let owner = [0, 0, 1];
        let before = Tensor::from_slice(&[0.9f32, 0.1, 0.5, 0.8, 0.2, 0.7]).view([2, 3]);
        let after = Tensor::from_slice(&[0.1f32, 0.2, 0.5, 0.1, 0.2, 0.9]).view([2, 3]);
        let hits = |sims: &Tensor| {
            let (i, t) = ranks(sims, &owner);
            (top_one(&i).unwrap(), top_one(&t).unwrap())
        };
        let ((bi, bt), (ai, at)) = (hits(&before), hits(&after));
        // Image 0: text 0 first (right) → text 2 first (wrong); image 1: text 0 → text 2.
        assert_eq!(
            (bi.clone(), ai.clone()),
            (vec![true, false], vec![false, true])
        );
        let c = TopOneChanges::between(&bi, &ai);
        assert_eq!((c.fixed, c.broken, c.p), (1, 1, 1.0));
        // Texts: t0 0.9 vs 0.8 right → 0.1 vs 0.1 (a tie counts) right; t1 0.1 vs 0.2 wrong →
        // 0.2 vs 0.2 right; t2 0.7 vs 0.5 right → 0.9 vs 0.5 right.
        assert_eq!(
            (bt.clone(), at.clone()),
            (vec![true, false, true], vec![true, true, true])
        );
        let c = TopOneChanges::between(&bt, &at);
        assert_eq!((c.fixed, c.broken), (1, 0));
    }

    #[test]
    fn re_ranking_takes_the_best_k_distinct_texts_and_scores_each_once() {
        // Texts 0, 2 and 5 are one caption; 1 and 4 another; 3 is alone.
        let t = |x: i64| vec![49406, x, 49407, 0];
        let group = text_groups(&[t(7), t(8), t(7), t(9), t(8), t(7)]);
        assert_eq!(group, [0, 1, 0, 3, 1, 0]);
        // A row whose best columns are 2, 5, 0 (copies), then 4, 3: its 2 best distinct texts
        // are the first caption and the second, each once, by its first copy.
        assert_eq!(distinct_top(&[2, 5, 0, 4, 3, 1], &group, 2), [0, 1]);
        assert_eq!(distinct_top(&[3, 2, 5], &group, 3), [3, 0]);
        assert_eq!(distinct_top(&[4, 1, 3, 0], &group, 1), [1]);
    }

    #[test]
    fn recall_counts_an_image_hit_when_any_of_its_captions_ranks_within_k() {
        // 3 images; texts 0,1 are captions of image 0, text 2 of image 1, texts 3..=11 of image 2.
        let owner = image_of_each_text(&[
            Some(70),
            Some(70),
            Some(5),
            Some(9),
            Some(9),
            Some(9),
            Some(9),
            Some(9),
            Some(9),
            Some(9),
            Some(9),
            Some(9),
        ]);
        assert_eq!(owner, [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
        #[rustfmt::skip]
        let sims = Tensor::from_slice(&[
            // image 0: its second caption (0.9) is beaten only by text 2 (0.95): rank 1.
            0.1f32, 0.9, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // image 1: its caption (0.5) is beaten by 6 texts: rank 6.
            0.6, 0.6, 0.5, 0.6, 0.6, 0.6, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0,
            // image 2: its best caption (text 3, 0.8) is the top score: rank 0.
            0.0, 0.0, 0.0, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
        ])
        .view([3, 12]);
        let (i2t, t2i) = recall(&sims, &owner);
        // Image ranks 1, 6, 0: R@1 1/3, R@5 2/3, R@10 3/3.
        assert_eq!(i2t, [1.0 / 3.0, 2.0 / 3.0, 1.0]);
        // Text ranks (own image's score vs the others in the column):
        // t0: 0.1 vs 0.6 → 1; t1: 0.9 → 0; t2: 0.5 vs 0.95 → 1; t3: 0.8 vs 0.6 → 0;
        // t4..=6: 0.1 vs 0.6 → 1 each; t7..=11: 0.1 vs 0.0, 0.0 → 0 each.
        let r1 = 7.0 / 12.0;
        assert_eq!(t2i, [r1, 1.0, 1.0]);
        // One caption per image (no ids): the diagonal, as before.
        let single = image_of_each_text(&[None, None, None]);
        let sims =
            Tensor::from_slice(&[0.9f32, 0.1, 0.95, 0.2, 0.8, 0.1, 0.3, 0.2, 0.1]).view([3, 3]);
        let (i2t, t2i) = recall(&sims, &single);
        // Image ranks 1, 0, 2; text ranks 0, 0, 1.
        assert_eq!(i2t, [1.0 / 3.0, 1.0, 1.0]);
        assert_eq!(t2i, [2.0 / 3.0, 1.0, 1.0]);
    }
}
