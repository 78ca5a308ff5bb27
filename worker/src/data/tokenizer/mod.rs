//! Captions → fixed-length token rows: OpenAI CLIP's BPE (ids identical to
//! `open_clip.tokenize`) or any Hugging Face `tokenizer.json`.

mod clean;
mod clip;
mod tables;

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

pub use clean::{clean_lower, fix_text, html_unescape};

/// File name of CLIP's merges, installed by `scripts/setup-libtorch` under `<libtorch>/assets/`.
pub const CLIP_BPE_FILE: &str = "bpe_simple_vocab_16e6.txt.gz";
/// OpenAI CLIP's context length.
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;
/// OpenAI CLIP's start-of-text id (what a CLIP [`Tokenizer`]'s `sot()` returns).
pub const CLIP_SOT: i64 = clip::SOT;
/// OpenAI CLIP's end-of-text id (`eot()`): the largest id of its vocabulary, so the text
/// tower's argmax pooling finds it.
pub const CLIP_EOT: i64 = clip::EOT;

/// Random CLIP rows `[batch, context_length]` for timing on synthetic data: the start token,
/// ids drawn by libtorch's generator from `1..CLIP_SOT - 1`, the end token in the last column.
pub fn random_clip_rows(batch: i64, context_length: i64, device: Device) -> Tensor {
    let tokens = Tensor::randint_low(
        1,
        CLIP_SOT - 1,
        [batch, context_length],
        (tch::Kind::Int64, device),
    );
    let _ = tokens.select(1, 0).fill_(CLIP_SOT);
    let _ = tokens.select(1, context_length - 1).fill_(CLIP_EOT);
    tokens
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{CLIP_BPE_FILE} not found (looked in: {0}); run scripts/setup-libtorch or pass its path"
    )]
    BpeNotFound(String),
    #[error("reading {0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}: line {1} is not a BPE merge (\"a b\"), or the file has too few merges")]
    BadMerges(PathBuf, usize),
    #[error("Hugging Face tokenizer {0}: {1}")]
    Hf(PathBuf, String),
    #[error("context length must be at least 2 (start and end token), got {0}")]
    ContextLength(usize),
}

#[allow(clippy::large_enum_variant)] // one tokenizer per process
enum Kind {
    Clip(clip::ClipBpe),
    Hf(Box<tokenizers::Tokenizer>),
}

/// A tokenizer that returns rows of exactly `context_length` ids, zero-padded.
pub struct Tokenizer {
    kind: Kind,
    context_length: usize,
    vocab_size: usize,
    sot: i64,
    eot: i64,
    pad: i64,
}

impl Tokenizer {
    /// The tokenizer a run config names in `data.tokenizer`: "clip", or a `tokenizer.json` path.
    pub fn from_config(name: &str, context_length: usize) -> Result<Self, TokenizerError> {
        if name == "clip" {
            Self::clip(context_length)
        } else {
            Self::from_hf_json(Path::new(name), context_length)
        }
    }

    /// OpenAI CLIP's tokenizer, with its merges found beside libtorch (see [`find_clip_bpe`]).
    pub fn clip(context_length: usize) -> Result<Self, TokenizerError> {
        Self::clip_from_path(&find_clip_bpe()?, context_length)
    }

    /// OpenAI CLIP's tokenizer from an explicit `bpe_simple_vocab_16e6.txt.gz`.
    pub fn clip_from_path(path: &Path, context_length: usize) -> Result<Self, TokenizerError> {
        check_context(context_length)?;
        Ok(Self {
            kind: Kind::Clip(clip::ClipBpe::load(path)?),
            context_length,
            vocab_size: clip::VOCAB_SIZE,
            sot: clip::SOT,
            eot: clip::EOT,
            pad: 0,
        })
    }

    /// Any Hugging Face `tokenizer.json`, used like OpenCLIP's `HFTokenizer`: whitespace
    /// clean-up, the file's own special tokens, truncation to `context_length`, padding.
    pub fn from_hf_json(path: &Path, context_length: usize) -> Result<Self, TokenizerError> {
        check_context(context_length)?;
        let hf_err = |e: String| TokenizerError::Hf(path.to_path_buf(), e);
        let mut hf = tokenizers::Tokenizer::from_file(path).map_err(|e| hf_err(e.to_string()))?;
        let find = |names: &[&str]| names.iter().find_map(|n| hf.token_to_id(n)).map(i64::from);
        let sot = find(&[
            "<start_of_text>",
            "<|startoftext|>",
            "<s>",
            "[CLS]",
            "<bos>",
            "[BOS]",
        ]);
        let eot = find(&[
            "<end_of_text>",
            "<|endoftext|>",
            "</s>",
            "[SEP]",
            "<eos>",
            "[EOS]",
        ]);
        let pad = match hf.get_padding() {
            Some(p) => i64::from(p.pad_id),
            None => find(&["<pad>", "[PAD]", "<|pad|>"]).unwrap_or(0),
        };
        let pad_token = hf
            .id_to_token(pad as u32)
            .unwrap_or_else(|| "[PAD]".to_string());
        hf.with_truncation(Some(tokenizers::TruncationParams {
            max_length: context_length,
            ..Default::default()
        }))
        .map_err(|e| hf_err(e.to_string()))?;
        hf.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(context_length),
            pad_id: pad as u32,
            pad_token,
            ..Default::default()
        }));
        let vocab_size = hf.get_vocab_size(true);
        Ok(Self {
            kind: Kind::Hf(Box::new(hf)),
            context_length,
            vocab_size,
            sot: sot.unwrap_or(pad),
            eot: eot.unwrap_or(pad),
            pad,
        })
    }

    /// One caption → `context_length` ids: start token, text, end token, zero padding.
    /// A caption too long keeps the end token as its last id (OpenCLIP's truncation).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        match &self.kind {
            Kind::Clip(bpe) => {
                let mut row = Vec::with_capacity(self.context_length);
                row.push(self.sot);
                row.extend(bpe.encode(text));
                row.push(self.eot);
                if row.len() > self.context_length {
                    row.truncate(self.context_length);
                    row[self.context_length - 1] = self.eot;
                }
                row.resize(self.context_length, self.pad);
                row
            }
            Kind::Hf(hf) => {
                let cleaned = whitespace_clean(text);
                // Encoding only fails for inputs the model cannot represent at all; an
                // empty row (start/end only) keeps the batch going and is logged.
                match hf.encode(cleaned.as_str(), true) {
                    Ok(enc) => enc.get_ids().iter().map(|&i| i64::from(i)).collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, caption = text, "tokenizer failed on caption");
                        let mut row = vec![self.pad; self.context_length];
                        row[0] = self.sot;
                        row[1] = self.eot;
                        row
                    }
                }
            }
        }
    }

    /// BPE ids of the caption alone (no start/end token, no truncation); CLIP only uses it
    /// for tests and tools, so a Hugging Face tokenizer returns its ids without specials.
    pub fn encode_ids(&self, text: &str) -> Vec<i64> {
        match &self.kind {
            Kind::Clip(bpe) => bpe.encode(text),
            Kind::Hf(hf) => hf
                .encode(whitespace_clean(text).as_str(), false)
                .map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect())
                .unwrap_or_default(),
        }
    }

    /// Captions → `[N, context_length]` i64 tensor.
    pub fn encode_batch(&self, texts: &[&str]) -> Tensor {
        let mut flat = Vec::with_capacity(texts.len() * self.context_length);
        for t in texts {
            flat.extend(self.encode(t));
        }
        Tensor::from_slice(&flat).view([texts.len() as i64, self.context_length as i64])
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    pub fn context_length(&self) -> usize {
        self.context_length
    }
    pub fn sot(&self) -> i64 {
        self.sot
    }
    pub fn eot(&self) -> i64 {
        self.eot
    }
    pub fn pad(&self) -> i64 {
        self.pad
    }
}

fn check_context(context_length: usize) -> Result<(), TokenizerError> {
    if context_length < 2 {
        return Err(TokenizerError::ContextLength(context_length));
    }
    Ok(())
}

/// OpenCLIP's `_clean_whitespace` (used with Hugging Face tokenizers): no lower-casing.
fn whitespace_clean(text: &str) -> String {
    let text = fix_text(text);
    let text = html_unescape(&html_unescape(&text));
    text.split(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where CLIP's merges live: `$FERROCLIP_CLIP_BPE`, then `assets/` of `$LIBTORCH`, of the
/// libtorch loaded into this process, and of the `.libtorch` beside this workspace.
pub fn find_clip_bpe() -> Result<PathBuf, TokenizerError> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("FERROCLIP_CLIP_BPE") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        candidates.push(PathBuf::from(dir).join("assets").join(CLIP_BPE_FILE));
    }
    if let Some(lib) = crate::libtorch::loaded_lib_dir() {
        if let Some(root) = lib.parent() {
            candidates.push(root.join("assets").join(CLIP_BPE_FILE));
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join(".libtorch/assets").join(CLIP_BPE_FILE));
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked = candidates
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(TokenizerError::BpeNotFound(looked))
}
