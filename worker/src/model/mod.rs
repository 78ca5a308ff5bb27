//! CLIP towers with OpenCLIP's shapes and parameter names.
//!
//! `Clip` holds every parameter in one ordered [`Params`] list whose names are OpenCLIP's
//! state-dict keys (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, ...);
//! the MAE decoder and MLM head, when enabled, live under `mae.` and `mlm.`, the fusion encoder
//! of image-text matching under `fusion.` and its head under `itm_head.`.

pub mod fusion;
pub mod lock;
pub mod mae;
pub mod masking;
pub mod mlm;
pub mod params;
mod recompute;
pub mod text;
pub mod transformer;
pub mod vit;

use ferroclip_proto::config::ModelSection;
use params::{Params, Scope};
use std::collections::HashMap;
use tch::{Kind, Tensor};
use transformer::Attend;

pub use recompute::recomputed_blocks;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model.preset: unknown preset \"{0}\" (tiny, ViT-B-32, ViT-B-16, ViT-L-14, custom; the ViTs with -quickgelu; any of them with -fusion)")]
    UnknownPreset(String),
    #[error("model.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("state dict {origin}: {message}")]
    StateDict { origin: String, message: String },
    #[error("the model has no {0} head (objectives.{0} was 0 when it was built)")]
    NoHead(&'static str),
    #[error("the model has no fusion encoder (model.fusion_layers is 0; objectives.itm and ITM re-ranking need one)")]
    NoFusion,
}

/// The resolved shape of a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub embed_dim: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub vision_width: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub context_length: i64,
    pub vocab_size: i64,
    pub text_width: i64,
    pub text_layers: i64,
    pub text_heads: i64,
    pub decoder_width: i64,
    pub decoder_layers: i64,
    pub decoder_heads: i64,
    /// QuickGELU in both towers (OpenCLIP's `quick_gelu`, the OpenAI weights' activation).
    #[serde(default)]
    pub quick_gelu: bool,
    /// Layers of the ITM fusion encoder (0 = none); its width and heads are the text tower's.
    #[serde(default)]
    pub fusion_layers: i64,
}

/// Auxiliary heads beyond OpenCLIP's CLIP.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Heads {
    /// SigLIP: a `logit_bias` parameter, and the logit scale initialised to ln 10.
    pub siglip: bool,
    pub mlm: bool,
    pub mae: bool,
}

impl ModelConfig {
    /// OpenCLIP's preset shapes; vision heads are width / 64 as in OpenCLIP. `tiny` is the
    /// 7.96 M-parameter shape of the step benchmarks (`bench/`). A `-quickgelu` suffix (as
    /// OpenCLIP's `ViT-B-32-quickgelu`) switches the activation to QuickGELU.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        // `-fusion`: the ITM fusion encoder on top (ALBEF's 6 layers; 2 on tiny).
        if let Some(base) = name.strip_suffix("-fusion") {
            let mut c = Self::preset(base)?;
            c.fusion_layers = if base.starts_with("tiny") { 2 } else { 6 };
            return Ok(c);
        }
        if let Some(base) = name.strip_suffix("-quickgelu") {
            if base != "tiny" {
                let mut c = Self::preset(base)?;
                c.quick_gelu = true;
                return Ok(c);
            }
        }
        #[rustfmt::skip]
        let (e, img, patch, vw, vl, tw, tl, th, ctx) = match name {
            "tiny" => (128, 32, 4, 128, 4, 128, 4, 4, 32),
            "ViT-B-32" => (512, 224, 32, 768, 12, 512, 12, 8, 77),
            "ViT-B-16" => (512, 224, 16, 768, 12, 512, 12, 8, 77),
            "ViT-L-14" => (768, 224, 14, 1024, 24, 768, 12, 12, 77),
            other => return Err(ModelError::UnknownPreset(other.to_string())),
        };
        let vh = if name == "tiny" { 4 } else { vw / 64 };
        let dw = (vw / 2).min(256);
        Ok(Self {
            embed_dim: e,
            image_size: img,
            patch_size: patch,
            vision_width: vw,
            vision_layers: vl,
            vision_heads: vh,
            context_length: ctx,
            vocab_size: 49408,
            text_width: tw,
            text_layers: tl,
            text_heads: th,
            decoder_width: dw,
            decoder_layers: 2,
            decoder_heads: (dw / 32).max(1),
            quick_gelu: false,
            fusion_layers: 0,
        })
    }

    /// The preset named in `[model]` with its overrides applied; "custom" starts from `tiny`.
    pub fn from_section(m: &ModelSection) -> Result<Self, ModelError> {
        let base = if m.preset == "custom" {
            "tiny"
        } else {
            m.preset.as_str()
        };
        let mut c = Self::preset(base)?;
        let set = |dst: &mut i64, v: Option<i64>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut c.embed_dim, m.embed_dim);
        set(&mut c.image_size, m.image_size);
        set(&mut c.patch_size, m.patch_size);
        set(&mut c.vision_width, m.vision_width);
        set(&mut c.vision_layers, m.vision_layers);
        set(&mut c.vision_heads, m.vision_heads);
        set(&mut c.context_length, m.context_length);
        set(&mut c.vocab_size, m.vocab_size);
        set(&mut c.text_width, m.text_width);
        set(&mut c.text_layers, m.text_layers);
        set(&mut c.text_heads, m.text_heads);
        set(&mut c.decoder_width, m.decoder_width);
        set(&mut c.decoder_layers, m.decoder_layers);
        set(&mut c.decoder_heads, m.decoder_heads);
        set(&mut c.fusion_layers, m.fusion_layers);
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field, message: String| Err(ModelError::Invalid { field, message });
        for (field, v) in [
            ("embed_dim", self.embed_dim),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("vision_width", self.vision_width),
            ("vision_layers", self.vision_layers),
            ("vision_heads", self.vision_heads),
            ("context_length", self.context_length),
            ("text_width", self.text_width),
            ("text_layers", self.text_layers),
            ("text_heads", self.text_heads),
            ("decoder_width", self.decoder_width),
            ("decoder_layers", self.decoder_layers),
            ("decoder_heads", self.decoder_heads),
        ] {
            if v < 1 {
                return bad(field, format!("must be at least 1, got {v}"));
            }
        }
        if self.fusion_layers < 0 {
            return bad(
                "fusion_layers",
                format!("must be at least 0, got {}", self.fusion_layers),
            );
        }
        if self.vocab_size < 3 {
            return bad(
                "vocab_size",
                format!("must be at least 3, got {}", self.vocab_size),
            );
        }
        if self.image_size % self.patch_size != 0 {
            return bad(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            );
        }
        for (field, w, h) in [
            ("vision_heads", self.vision_width, self.vision_heads),
            ("text_heads", self.text_width, self.text_heads),
            ("decoder_heads", self.decoder_width, self.decoder_heads),
        ] {
            if w % h != 0 {
                return bad(field, format!("{h} heads do not divide width {w}"));
            }
        }
        Ok(())
    }

    pub fn num_patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// OpenCLIP's CLIP plus optional MAE decoder and MLM head.
#[derive(Debug)]
pub struct Clip {
    pub config: ModelConfig,
    pub heads: Heads,
    pub params: Params,
    pub visual: vit::VisionTower,
    pub text: text::TextTower,
    pub logit_scale: Tensor,
    /// SigLIP's learnable bias (OpenCLIP's `logit_bias`), when `heads.siglip`.
    pub logit_bias: Option<Tensor>,
    pub mae: Option<mae::MaeDecoder>,
    pub mlm: Option<mlm::MlmHead>,
    /// The ITM fusion encoder and head, when `config.fusion_layers` > 0.
    pub fusion: Option<fusion::FusionEncoder>,
}

/// Keys that are ferroclip's own (not in OpenCLIP's CLIP state dict).
pub fn is_extra_key(name: &str) -> bool {
    name.starts_with("mae.")
        || name.starts_with("mlm.")
        || name.starts_with("fusion.")
        || name.starts_with("itm_head.")
}

impl Clip {
    /// Initialises from `seed` (libtorch's global CPU generator), in `kind` (Float for training;
    /// Double for gradient checks).
    pub fn new(
        config: &ModelConfig,
        heads: Heads,
        seed: i64,
        kind: Kind,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let c = config;
        tch::manual_seed(seed);
        let mut p = Params::default();
        let root = Scope::root(kind);
        let mut visual = vit::VisionTower::new(
            &mut p,
            &root.sub("visual"),
            c.image_size,
            c.patch_size,
            c.vision_width,
            c.vision_layers,
            c.vision_heads,
            c.embed_dim,
        );
        let mut text = text::TextTower::new(
            &mut p,
            &root,
            c.context_length,
            c.vocab_size,
            c.text_width,
            c.text_layers,
            c.text_heads,
            c.embed_dim,
        );
        // SigLIP's init (the paper, OpenCLIP's `init_logit_scale`/`init_logit_bias`): t = 10,
        // b = -10; CLIP's: t = 1 / 0.07.
        let init_scale = if heads.siglip { 10f64 } else { 1.0 / 0.07 };
        visual.transformer.set_quick_gelu(c.quick_gelu);
        text.transformer.set_quick_gelu(c.quick_gelu);
        let logit_scale = p.constant("logit_scale".into(), &[], init_scale.ln(), kind);
        let logit_bias = heads
            .siglip
            .then(|| p.constant("logit_bias".into(), &[], -10.0, kind));
        let mae = heads.mae.then(|| {
            mae::MaeDecoder::new(
                &mut p,
                &root.sub("mae"),
                c.vision_width,
                c.num_patches(),
                c.patch_size,
                c.decoder_width,
                c.decoder_layers,
                c.decoder_heads,
            )
        });
        let mlm = heads
            .mlm
            .then(|| mlm::MlmHead::new(&mut p, &root.sub("mlm"), c.text_width, c.vocab_size));
        let fusion = (c.fusion_layers > 0).then(|| {
            fusion::FusionEncoder::new(
                &mut p,
                &root.sub("fusion"),
                &root.sub("itm_head"),
                c.text_width,
                c.vision_width,
                c.fusion_layers,
                c.text_heads,
            )
        });
        Ok(Self {
            config: c.clone(),
            heads,
            params: p,
            visual,
            text,
            logit_scale,
            logit_bias,
            mae,
            mlm,
            fusion,
        })
    }

    /// Activation checkpointing in every transformer stack (both towers and the MAE decoder):
    /// each block keeps only its input for backward and runs again there.
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.visual.transformer.set_checkpointing(on);
        self.text.transformer.set_checkpointing(on);
        if let Some(m) = &mut self.mae {
            m.decoder.set_checkpointing(on);
        }
    }

    /// L2-normalised image features [B, E]; `keep` = FLIP's visible patches (None at eval).
    pub fn image_features(&self, images: &Tensor, keep: Option<&Tensor>) -> Tensor {
        normalize(&self.visual.encode(images, keep))
    }

    /// L2-normalised text features [B, E].
    pub fn text_features(&self, tokens: &Tensor) -> Tensor {
        normalize(&self.text.encode(tokens))
    }

    /// `image_features` and, from the same pass, every token after ln_post [B, 1+K, Wv]
    /// (what the fusion encoder cross-attends to).
    pub fn image_features_and_tokens(
        &self,
        images: &Tensor,
        keep: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let (f, t) = self.visual.encode_with_tokens(images, keep);
        (normalize(&f), t)
    }

    /// `text_features` and, from the same pass, the hidden states after ln_final
    /// [B, used, W] (the columns up to the batch's last end-of-text) and each row's end-of-text
    /// position [B].
    pub fn text_features_and_tokens(&self, tokens: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (f, h, eot) = self.text.encode_with_hidden(tokens);
        (normalize(&f), h, eot)
    }

    /// ITM logits [B, 2] (no match, match) of text hidden states `text` [B, N, W] with
    /// end-of-text positions `eot` [B] against image tokens `image` [U, M, Wv], row
    /// `image_of[b]` for text b (None: U = B, in order; `fusion::FusionEncoder::logits`).
    pub fn itm_logits(
        &self,
        text: &Tensor,
        eot: &Tensor,
        image: &Tensor,
        image_of: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let f = self.fusion.as_ref().ok_or(ModelError::NoFusion)?;
        Ok(f.logits(text, eot, image, image_of))
    }

    /// MAE's encoder pass: the class token and the visible patches `keep` ([B, K] indices)
    /// through the vision tower, after ln_post: [B, 1+K, W].
    pub fn mae_encode(&self, images: &Tensor, keep: &Tensor) -> Tensor {
        self.visual.encode_tokens(images, keep)
    }

    /// MAE's pixel predictions [B, G, 3·p·p] for every patch, from the visible ones (`keep`);
    /// `restore` [B, G] undoes the shuffle that put them first (`masking::MaeMask`).
    pub fn mae_predict(
        &self,
        images: &Tensor,
        keep: &Tensor,
        restore: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let dec = self.mae.as_ref().ok_or(ModelError::NoHead("mae"))?;
        let enc = self.mae_encode(images, keep);
        Ok(dec.forward(&enc, restore))
    }

    /// MLM's logits [M, vocab] at the `chosen` positions of `input` [B, N] (`masking::MlmMask`):
    /// the text tower attending per `attend`, with the token embedding of the `replace`
    /// positions swapped for the head's mask embedding.
    pub fn mlm_logits(
        &self,
        input: &Tensor,
        attend: &Tensor,
        replace: &Tensor,
        chosen: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let head = self.mlm.as_ref().ok_or(ModelError::NoHead("mlm"))?;
        let h = self.text.hidden(
            input,
            Attend::Mask(attend),
            Some((replace, head.mask_embedding())),
        );
        let at = h.index(&[Some(chosen.shallow_clone())]);
        Ok(head.forward(&at, self.text.token_embedding()))
    }

    /// Number of scalars in OpenCLIP's keys only (what OpenCLIP's parameter count reports).
    pub fn num_clip_params(&self) -> i64 {
        self.params
            .iter()
            .filter(|(n, _)| !is_extra_key(n))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    /// Named tensors (detached, sharing storage). `extras`: include `mae.`/`mlm.` keys.
    pub fn state_dict(&self, extras: bool) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter(|(n, _)| extras || !is_extra_key(n))
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect()
    }

    /// Copies values in by name. Every OpenCLIP key must be present with the right shape;
    /// extra keys in `tensors` (e.g. OpenCLIP's `attn_mask` buffers) are ignored; our own
    /// `mae.`/`mlm.` keys are copied when present and must all be present if `need_extras`.
    pub fn load_state_dict(
        &self,
        tensors: &[(String, Tensor)],
        origin: &str,
        need_extras: bool,
    ) -> Result<(), ModelError> {
        let by_name: HashMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let err = |message: String| ModelError::StateDict {
            origin: origin.to_string(),
            message,
        };
        let mut missing = Vec::new();
        for (name, _) in self.params.iter() {
            if !by_name.contains_key(name.as_str()) && (need_extras || !is_extra_key(name)) {
                missing.push(name.clone());
            }
        }
        if !missing.is_empty() {
            let shown: Vec<_> = missing.iter().take(5).cloned().collect();
            return Err(err(format!(
                "{} missing keys, e.g. {}",
                missing.len(),
                shown.join(", ")
            )));
        }
        tch::no_grad(|| {
            for (name, p) in self.params.iter() {
                let Some(src) = by_name.get(name.as_str()) else {
                    continue;
                };
                if src.size() != p.size() {
                    return Err(err(format!(
                        "{name}: shape {:?} in file, model expects {:?}",
                        src.size(),
                        p.size()
                    )));
                }
                if !matches!(
                    src.kind(),
                    Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
                ) {
                    return Err(err(format!(
                        "{name}: dtype {:?} is not a float type",
                        src.kind()
                    )));
                }
                p.detach().copy_(src);
            }
            Ok(())
        })
    }

    /// OpenCLIP clamps the logit scale to [0, ln 100] after each update.
    pub fn clamp_logit_scale(&self) {
        tch::no_grad(|| {
            let _ = self.logit_scale.detach().clamp_(0.0, 100f64.ln());
        });
    }

    pub fn kind(&self) -> Kind {
        self.visual.kind()
    }
}

/// x / ‖x‖ along the last dim (F.normalize with eps 1e-12).
pub fn normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    x / n
}
