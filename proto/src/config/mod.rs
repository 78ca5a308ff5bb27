//! The run configuration (`run.toml`). The coordinator reads it and hands it to every worker at
//! Join, so there is one source of truth. Every field has a default so a config can be short.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {key}{source}")]
    Parse {
        path: String,
        /// `section.key: ` of the value at fault, when the error points at one.
        key: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config {path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub run: RunSection,
    pub data: DataSection,
    pub model: ModelSection,
    pub objectives: Objectives,
    pub optim: OptimSection,
    pub checkpoint: CheckpointSection,
    pub eval: EvalSection,
    pub cluster: ClusterSection,
    pub store: StoreSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Name shown on the dashboard and in metrics.
    pub name: String,
    /// Where checkpoints, the journal, audit logs and TensorBoard events go (path or URL).
    pub dir: String,
    /// The one seed: model init, epoch plans, augmentation.
    pub seed: u64,
    /// Stop after this many optimizer steps (0 = run `epochs` whole epochs).
    pub steps: u64,
    /// Whole epochs to run when `steps` is 0.
    pub epochs: u32,
    /// Workers append the sample keys of every step to `<dir>/audit/` (exactly-once tests).
    pub audit: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Dataset root (holds manifest.json): a path or an object-store URL. Absent: `sources`,
    /// or `DEFAULT_ROOT` when neither is set. Use `sources()` rather than this field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Several datasets mixed by weight in one epoch plan (excludes `root`): every sample of
    /// every source once per epoch, the weights setting the interleave rate (`ferroclip_plan::mix`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<DataSource>,
    pub train_split: String,
    pub val_split: String,
    /// Blocks (row groups) whose samples are shuffled together in the epoch plan.
    pub shuffle_window_blocks: u32,
    /// Fixed lanes feeding every step (`ferroclip_plan::ledger`): with N > 0 a step's samples and
    /// their order are the same at any world size and across regroups (set it to the largest
    /// world the run will have: a rank reads about N / world lanes' chunks). 0: one lane per
    /// rank, each reading its own chunks.
    pub lanes: u32,
    /// Blocks a worker reads ahead of the step it trains.
    pub prefetch_blocks: u32,
    /// Threads decoding and augmenting images (0 = all cores).
    pub decode_threads: u32,
    /// RandomResizedCrop scale range (OpenCLIP's default 0.9..1.0).
    pub crop_scale: [f64; 2],
    /// Tokenizer: "clip" (CLIP BPE) or a path to a Hugging Face tokenizer.json.
    pub tokenizer: String,
}

/// One dataset of `data.sources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// Dataset root (holds manifest.json).
    pub root: String,
    /// Relative rate at which its samples are interleaved (finite, > 0; default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl DataSection {
    /// The dataset used when the config names none.
    pub const DEFAULT_ROOT: &'static str = "data/synth";

    /// The run's datasets in plan order: `sources`, else `root` as one source of weight 1.
    pub fn sources(&self) -> Vec<DataSource> {
        if !self.sources.is_empty() {
            return self.sources.clone();
        }
        vec![DataSource {
            root: self
                .root
                .clone()
                .unwrap_or_else(|| Self::DEFAULT_ROOT.into()),
            weight: 1.0,
        }]
    }

    /// The data as logs and errors name it: the root, or the roots joined by " + ".
    pub fn describe(&self) -> String {
        self.sources()
            .iter()
            .map(|s| s.root.as_str())
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// "tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14", or "custom" (then every field below is used);
    /// the ViTs with "-quickgelu" (e.g. "ViT-B-32-quickgelu") use QuickGELU, as OpenAI's weights;
    /// "-fusion" (e.g. "ViT-B-16-fusion", "tiny-fusion") adds a fusion encoder (`fusion_layers`).
    pub preset: String,
    /// Overrides of the preset's shape; absent = the preset's value.
    pub embed_dim: Option<i64>,
    pub image_size: Option<i64>,
    pub patch_size: Option<i64>,
    pub vision_width: Option<i64>,
    pub vision_layers: Option<i64>,
    pub vision_heads: Option<i64>,
    pub context_length: Option<i64>,
    pub vocab_size: Option<i64>,
    pub text_width: Option<i64>,
    pub text_layers: Option<i64>,
    pub text_heads: Option<i64>,
    /// MAE decoder shape.
    pub decoder_width: Option<i64>,
    pub decoder_layers: Option<i64>,
    pub decoder_heads: Option<i64>,
    /// Layers of the fusion encoder over the text tower's tokens with cross-attention to the
    /// image tower's (ALBEF/BLIP; `objectives.itm` needs it); absent = the preset's (0 = none,
    /// 6 for the `-fusion` ViT presets).
    pub fusion_layers: Option<i64>,
    /// Weights to start from ("" = random init): a ferroclip checkpoint (or a directory of
    /// them), an OpenCLIP / Hugging Face hub directory (`open_clip_config.json` +
    /// `open_clip_model.safetensors`; its config picks the architecture, `preset` and the
    /// overrides are then unused), or a bare OpenCLIP `.safetensors` file (of `preset`'s shape).
    /// Only the model's weights are taken: the step, the optimizer and the data start afresh.
    pub init: String,
    /// LiT: freeze the image tower (OpenCLIP's `--lock-image`); its parameters are neither
    /// updated nor all-reduced.
    pub lock_image: bool,
    /// With `lock_image`, the image tower's last N groups stay trainable (OpenCLIP's
    /// `--lock-image-unlocked-groups`; groups: embeddings, each block, the last block with
    /// ln_post, the projection).
    pub lock_image_unlocked_groups: u32,
    /// Freeze the text tower (OpenCLIP's `--lock-text`).
    pub lock_text: bool,
    /// With `lock_text`, the text tower's last N groups stay trainable (OpenCLIP's
    /// `--lock-text-unlocked-layers`; groups as the image tower's, ln_final for ln_post).
    pub lock_text_unlocked_groups: u32,
    /// Activation checkpointing: each transformer block (both towers, the MAE decoder) keeps
    /// only its input for backward and is recomputed there (less memory, ~one more forward).
    pub grad_checkpointing: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Objectives {
    /// Weight of the symmetric InfoNCE loss over the global batch (0 = off).
    pub contrastive: f64,
    /// Weight of SigLIP's sigmoid pairwise loss over the global batch (0 = off): a learnable
    /// bias `logit_bias` (init -10) joins the model and the logit scale starts at ln 10.
    pub siglip: f64,
    /// Weight of text masked-language-modeling (0 = off).
    pub mlm: f64,
    /// Weight of image masked-autoencoding (0 = off).
    pub mae: f64,
    /// Weight of image-text matching on the fusion encoder (0 = off; needs
    /// `model.fusion_layers` > 0): each pair of the global batch, one hard negative text and one
    /// hard negative image sampled from the contrastive similarities of the global batch.
    pub itm: f64,
    /// FLIP: fraction of image patches dropped in the contrastive pass.
    pub patch_dropout: f64,
    /// Fraction of text tokens chosen for MLM (80% mask / 10% random / 10% kept).
    pub mlm_ratio: f64,
    /// Fraction of patches masked for MAE.
    pub mae_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// Samples per optimizer step across all workers; kept constant when the world size changes.
    pub global_batch: u32,
    pub lr: f64,
    pub weight_decay: f64,
    /// Which parameters `weight_decay` applies to: "openclip" (OpenCLIP's rule: not to
    /// parameters with fewer than 2 dims, norms, biases, `logit_scale`/`logit_bias`) or
    /// "no_embeddings" (that rule, and not to the token, positional and class embeddings or the
    /// MAE/MLM learned vectors either).
    pub weight_decay_rule: WeightDecayRule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub warmup_steps: u64,
    /// Clip gradients by global norm (0 = off).
    pub grad_clip: f64,
    /// Exact gradient accumulation (GradCache): rows per forward pass with activations kept, on
    /// each rank (0 = the whole local batch at once). Features of every micro-batch are first
    /// computed without activations, the losses taken over the global batch, then each
    /// micro-batch re-runs with grad; the update equals the one-pass step's.
    pub micro_batch: u32,
    /// auto (bf16 autocast with fp32 master weights on a GPU, fp32 on CPU), fp32 or amp_bf16
    /// (GPU only).
    pub precision: Precision,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Write a checkpoint every N steps (0 = only at the end).
    pub every_steps: u64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Zero-shot + retrieval eval on the val split every N steps (0 = only at the end).
    pub every_steps: u64,
    /// Class names and prompt templates (JSON); empty = derived from the dataset's `label` column.
    pub classes: String,
    /// Val samples used by the periodic eval (0 = all).
    pub max_samples: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub min_workers: u32,
    pub max_workers: u32,
    /// Quiet time after the last join before a generation forms with fewer than max_workers.
    pub settle_s: f64,
    pub heartbeat_interval_s: f64,
    /// A worker silent this long is declared dead.
    pub heartbeat_timeout_s: f64,
    /// A collective that makes no progress this long reports its peer as failed.
    pub collective_timeout_s: f64,
    /// Collective backend: ring (TCP, CPU) or nccl.
    pub backend: Backend,
    /// Gradient all-reduce bucket size in MiB.
    pub bucket_mb: f64,
    /// fp32 or bf16 on the wire.
    pub allreduce_dtype: WireFormat,
    /// Ring all-reduce data path: auto (shared memory when every rank is on one host, else
    /// TCP), tcp or shm.
    pub transport: Transport,
    /// All-reduce gradient buckets while backward still runs, as DDP does: on, off, or auto
    /// (on for GPU workers; off on CPUs, where the communication thread takes cores from
    /// backward: 0.91 vs 0.86 s per step in bench/README-train.md's run).
    pub overlap_allreduce: Switch,
}

/// The closed sets of values a config takes, parsed once (a misspelling is a config error
/// naming the key) and used as enums everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The TCP ring (host memory, CPU workers).
    #[default]
    Ring,
    /// NCCL (GPU memory, GPU workers).
    Nccl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Auto,
    Fp32,
    AmpBf16,
}

/// Which parameters AdamW's weight decay applies to (`optim.weight_decay_rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDecayRule {
    /// OpenCLIP's `exclude`: no decay for `ndim < 2` or a name containing "bn", "ln", "bias"
    /// or "logit_scale".
    #[default]
    Openclip,
    /// OpenCLIP's rule, and no decay for embeddings (names containing "embedding" or
    /// "pos_embed") either.
    NoEmbeddings,
}

/// Number format of all-reduce payloads on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFormat {
    #[default]
    Fp32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Auto,
    Tcp,
    Shm,
}

/// on, off, or auto (the code decides, as documented where the key is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Switch {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// How long block reads, checkpoint and journal writes keep retrying an object store that
    /// fails transiently (an outage, refused connections, 5xx) while the run waits, before
    /// giving up. Minutes, not seconds: stores blink.
    pub retry_budget_s: f64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            retry_budget_s: 300.0,
        }
    }
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            name: "ferroclip".into(),
            dir: "runs/ferroclip".into(),
            seed: 0,
            steps: 0,
            epochs: 1,
            audit: false,
        }
    }
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            root: None,
            sources: Vec::new(),
            train_split: "train".into(),
            val_split: "val".into(),
            shuffle_window_blocks: 4,
            lanes: 0,
            prefetch_blocks: 4,
            decode_threads: 0,
            crop_scale: [0.9, 1.0],
            tokenizer: "clip".into(),
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "tiny".into(),
            embed_dim: None,
            image_size: None,
            patch_size: None,
            vision_width: None,
            vision_layers: None,
            vision_heads: None,
            context_length: None,
            vocab_size: None,
            text_width: None,
            text_layers: None,
            text_heads: None,
            decoder_width: None,
            decoder_layers: None,
            decoder_heads: None,
            fusion_layers: None,
            init: String::new(),
            lock_image: false,
            lock_image_unlocked_groups: 0,
            lock_text: false,
            lock_text_unlocked_groups: 0,
            grad_checkpointing: false,
        }
    }
}

impl Default for Objectives {
    fn default() -> Self {
        Self {
            contrastive: 1.0,
            siglip: 0.0,
            mlm: 0.0,
            mae: 0.0,
            itm: 0.0,
            patch_dropout: 0.0,
            mlm_ratio: 0.15,
            mae_ratio: 0.75,
        }
    }
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            global_batch: 64,
            lr: 5e-4,
            weight_decay: 0.2,
            weight_decay_rule: WeightDecayRule::Openclip,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            warmup_steps: 10,
            grad_clip: 1.0,
            micro_batch: 0,
            precision: Precision::Auto,
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every_steps: 0,
            keep: 3,
        }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 64,
            settle_s: 2.0,
            heartbeat_interval_s: 1.0,
            heartbeat_timeout_s: 10.0,
            collective_timeout_s: 30.0,
            backend: Backend::Ring,
            bucket_mb: 25.0,
            allreduce_dtype: WireFormat::Fp32,
            transport: Transport::Auto,
            overlap_allreduce: Switch::Auto,
        }
    }
}

/// The dotted key (`cluster.backend`) of the `key = value` line holding byte `offset`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let section = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

impl RunConfig {
    /// Reads and validates a config file; errors name the file and the field.
    pub fn load(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `origin` names it in errors (and the key, where there is one).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: RunConfig = toml::from_str(text).map_err(|source| {
            let key = source.span().and_then(|span| key_at(text, span.start));
            ConfigError::Parse {
                path: origin.to_string(),
                key: key.map(|k| format!("{k}: ")).unwrap_or_default(),
                source: Box::new(source),
            }
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

mod validate;

#[cfg(test)]
mod tests;
