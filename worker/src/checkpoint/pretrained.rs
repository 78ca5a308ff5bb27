//! Weights to start from (`model.init`) or to embed / evaluate with (`--checkpoint`), in three
//! forms: a ferroclip checkpoint (or a directory of them: the newest), an OpenCLIP / Hugging
//! Face hub directory (`open_clip_config.json` + `open_clip_model.safetensors`, as
//! `open_clip.push_to_hf_hub` writes them; the config picks the architecture), or a bare
//! OpenCLIP `.safetensors` file (the architecture then comes from `model.preset`).

use serde_json::Value;
use tch::Tensor;

use super::store::{decode_tensors, read_object};
use super::{read, resolve, CheckpointError, Result};
use crate::data::{ImageTransform, Interpolation, ResizeMode};
use crate::model::{is_extra_key, Clip, ModelConfig};
use ferroclip_shards::StoreOptions;

pub const HUB_CONFIG: &str = "open_clip_config.json";
pub const HUB_WEIGHTS: &str = "open_clip_model.safetensors";

/// A hub config's `preprocess_cfg`: what the weights were trained to see. Absent keys keep
/// OpenCLIP's defaults (CLIP's mean/std, bicubic, shortest side, fill 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preprocess {
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub interpolation: Option<Interpolation>,
    pub resize_mode: Option<ResizeMode>,
    pub fill: Option<u8>,
}

impl Preprocess {
    /// The eval transform for `image_size` with these settings.
    pub fn eval_transform(&self, image_size: i64) -> ImageTransform {
        let d = ImageTransform::eval(image_size);
        ImageTransform {
            mean: self.mean.unwrap_or(d.mean),
            std: self.std.unwrap_or(d.std),
            interpolation: self.interpolation.unwrap_or(d.interpolation),
            resize_mode: self.resize_mode.unwrap_or(d.resize_mode),
            fill: self.fill.unwrap_or(d.fill),
            ..d
        }
    }
}

/// What `read_pretrained` found.
pub struct Pretrained {
    pub url: String,
    /// The architecture the weights come with; None for a bare safetensors file.
    pub config: Option<ModelConfig>,
    pub tensors: Vec<(String, Tensor)>,
    /// The hub config's preprocessing (default for the other forms).
    pub preprocess: Preprocess,
    /// A ferroclip checkpoint's run config (TOML) and step.
    pub run_config: Option<String>,
    pub step: u64,
}

fn invalid(path: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Reads `url` in whichever of the three forms it is.
pub fn read_pretrained(url: &str, opts: &StoreOptions) -> Result<Pretrained> {
    let base = url.trim_end_matches('/');
    let bare = |url: String, config, preprocess, tensors| Pretrained {
        url,
        config,
        tensors,
        preprocess,
        run_config: None,
        step: 0,
    };
    if base.ends_with(".safetensors") {
        let bytes = read_object(base, opts)?.ok_or_else(|| invalid(base, "no such file"))?;
        let tensors = decode_tensors(&bytes, base)?;
        return Ok(bare(base.into(), None, Preprocess::default(), tensors));
    }
    let cfg_url = format!("{base}/{HUB_CONFIG}");
    if let Some(bytes) = read_object(&cfg_url, opts)? {
        let json: Value =
            serde_json::from_slice(&bytes).map_err(|e| invalid(&cfg_url, e.to_string()))?;
        let config = hub_model_config(&json).map_err(|m| invalid(&cfg_url, m))?;
        let preprocess = hub_preprocess(&json).map_err(|m| invalid(&cfg_url, m))?;
        let w_url = format!("{base}/{HUB_WEIGHTS}");
        let weights = read_object(&w_url, opts)?
            .ok_or_else(|| invalid(&w_url, format!("missing next to {HUB_CONFIG}")))?;
        let tensors = decode_tensors(&weights, &w_url)?;
        return Ok(bare(w_url, Some(config), preprocess, tensors));
    }
    let url = resolve(url, opts).map_err(|e| {
        invalid(
            url,
            format!("not a .safetensors file, no {HUB_CONFIG}, and not a checkpoint: {e}"),
        )
    })?;
    let c = read(&url, opts, false)?;
    Ok(Pretrained {
        url: c.url,
        config: Some(c.state.model),
        tensors: c.tensors,
        preprocess: Preprocess::default(),
        run_config: Some(c.state.config),
        step: c.state.step,
    })
}

/// Copies `p`'s tensors into `model`: every OpenCLIP key must be there with its shape, and a
/// tensor the model has no place for is an error naming it (OpenCLIP's `attn_mask` buffers
/// aside, and ferroclip's own MAE/MLM/SigLIP keys, which a model without those heads skips).
pub fn load_into(model: &Clip, p: &Pretrained) -> Result<()> {
    let unknown: Vec<&str> = p
        .tensors
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| model.params.get(n).is_none())
        .filter(|n| !(n.ends_with("attn_mask") || is_extra_key(n) || *n == "logit_bias"))
        .collect();
    if let Some(first) = unknown.first() {
        return Err(invalid(
            &p.url,
            format!(
                "{} tensors the model has no place for, e.g. {first} (another architecture?)",
                unknown.len()
            ),
        ));
    }
    let mut tensors: Vec<(String, Tensor)> = p
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    // A SigLIP head's bias keeps its initial value when the weights have none.
    if let Some(b) = &model.logit_bias {
        if !tensors.iter().any(|(n, _)| n == "logit_bias") {
            tensors.push(("logit_bias".into(), b.detach().copy()));
        }
    }
    model
        .load_state_dict(&tensors, &p.url, false)
        .map_err(|e| invalid(&p.url, e.to_string()))
}

fn int(v: &Value, key: &str, path: &str) -> std::result::Result<Option<i64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_i64().map(Some).ok_or_else(|| {
            format!("{path}.{key}: {x} is not an integer (unsupported architecture)")
        }),
    }
}

/// `model_cfg` of a hub config → ferroclip's shape. Keys ferroclip does not implement with a
/// non-default value are errors naming them.
pub fn hub_model_config(json: &Value) -> std::result::Result<ModelConfig, String> {
    let m = json.get("model_cfg").ok_or("no model_cfg")?;
    let vision = m.get("vision_cfg").ok_or("model_cfg.vision_cfg missing")?;
    let text = m.get("text_cfg").ok_or("model_cfg.text_cfg missing")?;
    let allowed: [(&Value, &str, &[&str]); 3] = [
        (
            m,
            "model_cfg",
            &[
                "embed_dim",
                "quick_gelu",
                "vision_cfg",
                "text_cfg",
                "custom_text",
                "init_logit_scale",
                "init_logit_bias",
                "cast_dtype",
            ],
        ),
        (
            vision,
            "model_cfg.vision_cfg",
            &[
                "image_size",
                "layers",
                "width",
                "head_width",
                "patch_size",
                "mlp_ratio",
                "patch_dropout",
            ],
        ),
        (
            text,
            "model_cfg.text_cfg",
            &[
                "context_length",
                "vocab_size",
                "width",
                "heads",
                "layers",
                "mlp_ratio",
                "hf_tokenizer_name",
                "tokenizer_kwargs",
            ],
        ),
    ];
    for (obj, path, keys) in allowed {
        for (k, v) in obj.as_object().ok_or(format!("{path} is not an object"))? {
            let default_ok = matches!(v, Value::Null | Value::Bool(false));
            if !keys.contains(&k.as_str()) && !default_ok {
                return Err(format!(
                    "{path}.{k} = {v}: not supported by ferroclip's towers"
                ));
            }
        }
        if let Some(r) = obj.get("mlp_ratio").and_then(Value::as_f64) {
            if r != 4.0 {
                return Err(format!("{path}.mlp_ratio = {r}: ferroclip's blocks use 4"));
            }
        }
    }
    let mut c = ModelConfig::preset("tiny").map_err(|e| e.to_string())?;
    let v = "model_cfg.vision_cfg";
    let t = "model_cfg.text_cfg";
    let need = |x: Option<i64>, path: &str| x.ok_or(format!("{path} missing"));
    c.embed_dim = need(int(m, "embed_dim", "model_cfg")?, "model_cfg.embed_dim")?;
    c.image_size = need(
        int(vision, "image_size", v)?,
        "model_cfg.vision_cfg.image_size",
    )?;
    c.patch_size = need(
        int(vision, "patch_size", v)?,
        "model_cfg.vision_cfg.patch_size",
    )?;
    c.vision_width = need(int(vision, "width", v)?, "model_cfg.vision_cfg.width")?;
    c.vision_layers = need(int(vision, "layers", v)?, "model_cfg.vision_cfg.layers")?;
    c.vision_heads = c.vision_width / int(vision, "head_width", v)?.unwrap_or(64).max(1);
    c.context_length = int(text, "context_length", t)?.unwrap_or(77);
    c.vocab_size = int(text, "vocab_size", t)?.unwrap_or(49408);
    c.text_width = int(text, "width", t)?.unwrap_or(512);
    c.text_heads = int(text, "heads", t)?.unwrap_or(8);
    c.text_layers = int(text, "layers", t)?.unwrap_or(12);
    c.quick_gelu = m
        .get("quick_gelu")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    c.decoder_width = (c.vision_width / 2).min(256);
    c.decoder_heads = (c.decoder_width / 32).max(1);
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// `preprocess_cfg`'s keys that change what a model sees: mean, std, interpolation,
/// resize_mode, fill_color. An unknown value is an error naming the key.
fn hub_preprocess(json: &Value) -> std::result::Result<Preprocess, String> {
    let Some(pp) = json.get("preprocess_cfg") else {
        return Ok(Preprocess::default());
    };
    let three = |key: &str| -> std::result::Result<Option<[f32; 3]>, String> {
        let Some(v) = pp.get(key) else {
            return Ok(None);
        };
        let xs: Vec<f32> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_f64)
                    .map(|x| x as f32)
                    .collect()
            })
            .unwrap_or_default();
        <[f32; 3]>::try_from(xs)
            .map(Some)
            .map_err(|_| format!("preprocess_cfg.{key} = {v}: need 3 numbers"))
    };
    let text = |key: &str| -> std::result::Result<Option<&str>, String> {
        match pp.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(format!("preprocess_cfg.{key} = {v}: need a string")),
        }
    };
    let unsupported = |key: &str, value: &str, supported: &str| {
        format!("preprocess_cfg.{key} = {value:?}: supported are {supported}")
    };
    let interpolation = match text("interpolation")? {
        None => None,
        Some("bicubic") => Some(Interpolation::Bicubic),
        Some("bilinear") => Some(Interpolation::Bilinear),
        Some(v) => return Err(unsupported("interpolation", v, "bicubic, bilinear")),
    };
    let resize_mode = match text("resize_mode")? {
        None => None,
        Some("shortest") => Some(ResizeMode::Shortest),
        Some("longest") => Some(ResizeMode::Longest),
        Some("squash") => Some(ResizeMode::Squash),
        Some(v) => {
            return Err(unsupported("resize_mode", v, "shortest, longest, squash"));
        }
    };
    let fill = match pp.get("fill_color") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(x) if x <= 255 => Some(x as u8),
            _ => {
                return Err(format!(
                    "preprocess_cfg.fill_color = {v}: need an integer 0..=255"
                ))
            }
        },
    };
    Ok(Preprocess {
        mean: three("mean")?,
        std: three("std")?,
        interpolation,
        resize_mode,
        fill,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra_vision: &str) -> Value {
        let text = format!(
            r#"{{"model_cfg": {{"embed_dim": 512, "quick_gelu": true,
                "vision_cfg": {{"image_size": 224, "layers": 12, "width": 768,
                                "patch_size": 32{extra_vision}}},
                "text_cfg": {{"context_length": 77, "vocab_size": 49408, "width": 512,
                              "heads": 8, "layers": 12}}}}}}"#
        );
        serde_json::from_str(&text).expect("json")
    }

    #[test]
    fn a_hub_config_of_vit_b_32_quickgelu_is_that_preset() {
        let got = hub_model_config(&cfg("")).expect("config");
        let want = ModelConfig::preset("ViT-B-32-quickgelu").expect("preset");
        assert_eq!(got, want);
    }

    #[test]
    fn architectures_ferroclip_lacks_are_errors_naming_the_key() {
        for (extra, key) in [
            (
                r#", "timm_model_name": "vit_base""#,
                "vision_cfg.timm_model_name",
            ),
            (r#", "mlp_ratio": 2.6667"#, "vision_cfg.mlp_ratio"),
            (r#", "layers": [3, 4, 6, 3]"#, "vision_cfg.layers"),
        ] {
            let err = hub_model_config(&cfg(extra)).expect_err(extra);
            assert!(err.contains(key), "{extra}: {err}");
        }
        // Keys at their default values are accepted.
        hub_model_config(&cfg(
            r#", "attentional_pool": false, "ls_init_value": null"#,
        ))
        .expect("defaults");
    }

    #[test]
    fn preprocess_cfg_sets_the_eval_transform_and_names_bad_keys() {
        let json: Value = serde_json::from_str(
            r#"{"preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 128}}"#,
        )
        .expect("json");
        let t = hub_preprocess(&json)
            .expect("preprocess")
            .eval_transform(64);
        assert_eq!(
            (t.mean, t.interpolation, t.resize_mode, t.fill, t.train),
            (
                [0.5; 3],
                Interpolation::Bilinear,
                ResizeMode::Longest,
                128,
                false
            )
        );
        let t = Preprocess::default().eval_transform(64);
        assert_eq!(
            (t.interpolation, t.resize_mode, t.fill),
            (Interpolation::Bicubic, ResizeMode::Shortest, 0)
        );
        for (bad, key) in [
            (
                r#"{"interpolation": "lanczos"}"#,
                "preprocess_cfg.interpolation",
            ),
            (r#"{"resize_mode": "crop"}"#, "preprocess_cfg.resize_mode"),
            (r#"{"fill_color": 300}"#, "preprocess_cfg.fill_color"),
            (r#"{"mean": [0.5]}"#, "preprocess_cfg.mean"),
        ] {
            let json: Value =
                serde_json::from_str(&format!(r#"{{"preprocess_cfg": {bad}}}"#)).expect("json");
            let err = hub_preprocess(&json).expect_err(bad);
            assert!(err.contains(key), "{bad}: {err}");
        }
    }
}
