//! The model against OpenCLIP 3.3.0: parameter names, shapes, counts, and outputs of a tiny
//! OpenCLIP model loaded from its safetensors. Reference data: tests/data/gen_openclip_ref.py.

use ferroclip_worker::model::{Clip, Heads, ModelConfig};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(data("openclip_shapes.json")).expect("reference json");
    serde_json::from_str(&text).expect("valid json")
}

#[test]
fn preset_parameter_counts_equal_openclip() {
    let r = reference();
    for (preset, expected, kind) in [
        ("ViT-B-32", 151_277_313i64, Kind::Float),
        ("ViT-B-16", 149_620_737, Kind::Float),
        // Half precision: only the count matters, and it halves the memory of the largest model.
        ("ViT-L-14", 427_616_513, Kind::BFloat16),
        ("tiny", 7_962_625, Kind::Float),
    ] {
        let key = if preset == "tiny" {
            "bench-7.96M"
        } else {
            preset
        };
        assert_eq!(
            r["counts"][key].as_i64(),
            Some(expected),
            "reference json for {preset}"
        );
        let cfg = ModelConfig::preset(preset).expect("preset");
        let m = Clip::new(&cfg, Heads::default(), 0, kind).expect("model");
        assert_eq!(m.num_clip_params(), expected, "{preset}");
    }
}

#[test]
fn vit_b_32_names_and_shapes_equal_openclip() {
    let r = reference();
    let expected: BTreeMap<String, Vec<i64>> = r["shapes"]["ViT-B-32"]
        .as_object()
        .expect("shapes")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_i64().expect("dim"))
                    .collect(),
            )
        })
        .collect();
    let cfg = ModelConfig::preset("ViT-B-32").expect("preset");
    // With the MAE/MLM heads on: they must not leak into the OpenCLIP state dict.
    let m = Clip::new(
        &cfg,
        Heads {
            siglip: false,
            mlm: true,
            mae: true,
        },
        0,
        Kind::Float,
    )
    .expect("model");
    let ours: BTreeMap<String, Vec<i64>> = m
        .state_dict(false)
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    let missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (k, shape) in &expected {
        assert_eq!(&ours[k], shape, "{k}");
    }
    assert!(m
        .state_dict(true)
        .iter()
        .any(|(n, _)| n.starts_with("mae.")));
    assert!(m
        .state_dict(true)
        .iter()
        .any(|(n, _)| n.starts_with("mlm.")));
}

fn tiny_openclip_config() -> ModelConfig {
    ModelConfig {
        embed_dim: 16,
        image_size: 16,
        patch_size: 4,
        vision_width: 32,
        vision_layers: 2,
        vision_heads: 2,
        context_length: 8,
        vocab_size: 1000,
        text_width: 32,
        text_layers: 2,
        text_heads: 2,
        decoder_width: 16,
        decoder_layers: 1,
        decoder_heads: 1,
        quick_gelu: false,
        fusion_layers: 0,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn openclip_weights_load_and_give_openclip_outputs() {
    let weights = Tensor::read_safetensors(data("openclip_tiny.safetensors")).expect("weights");
    let io: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(data("openclip_tiny_io.safetensors"))
            .expect("io")
            .into_iter()
            .collect();
    let m = Clip::new(&tiny_openclip_config(), Heads::default(), 1, Kind::Float).expect("model");
    m.load_state_dict(&weights, "openclip_tiny.safetensors", false)
        .expect("load");
    tch::no_grad(|| {
        let img = m.visual.encode(&io["images"], None);
        let txt = m.text.encode(&io["tokens"]);
        assert!(
            max_diff(&img, &io["image_features"]) < 1e-4,
            "image features differ by {}",
            max_diff(&img, &io["image_features"])
        );
        assert!(
            max_diff(&txt, &io["text_features"]) < 1e-4,
            "text features differ by {}",
            max_diff(&txt, &io["text_features"])
        );
    });
}

#[test]
fn a_state_dict_with_a_wrong_shape_or_missing_key_is_refused_by_name() {
    let mut weights = Tensor::read_safetensors(data("openclip_tiny.safetensors")).expect("weights");
    let m = Clip::new(&tiny_openclip_config(), Heads::default(), 1, Kind::Float).expect("model");
    let i = weights
        .iter()
        .position(|(n, _)| n == "visual.proj")
        .expect("visual.proj");
    weights[i].1 = Tensor::zeros([3, 3], (Kind::Float, tch::Device::Cpu));
    let err = m
        .load_state_dict(&weights, "bad.safetensors", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("visual.proj"),
        "{err}"
    );
    let _removed = weights.remove(i);
    let err = m
        .load_state_dict(&weights, "short.safetensors", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing") && err.contains("visual.proj"),
        "{err}"
    );
}

#[test]
fn unknown_preset_and_bad_override_name_the_field() {
    let mut s = ferroclip_proto::config::ModelSection {
        preset: "ViT-X".into(),
        ..Default::default()
    };
    assert!(ModelConfig::from_section(&s)
        .unwrap_err()
        .to_string()
        .contains("model.preset"));
    s.preset = "tiny".into();
    s.patch_size = Some(5);
    assert!(ModelConfig::from_section(&s)
        .unwrap_err()
        .to_string()
        .contains("model.patch_size"));
}
