//! Starting from pretrained OpenCLIP weights. The fixture (`data/gen_openclip_hub.py`) is a
//! tiny QuickGELU model saved by open_clip in the Hugging Face hub layout, open_clip's own
//! embeddings of 4 images and 4 captions, and open_clip's contrastive loss on that batch.
//! ferroclip must reproduce them: `embed --checkpoint DIR --images FOLDER` / `--texts FILE`
//! (cosine ≥ 0.9999 per row), and `model.init = DIR`'s first training loss (within 1e-5
//! relative). Both would fail with GELU in place of the config's QuickGELU: open_clip's own
//! model with `quick_gelu = False` on these weights gives text cosines down to 0.99976 and a
//! loss 6e-3 (relative) away.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{embed, ok, read_npy, RNG};
use ferroclip_proto::config::RunConfig;
use ferroclip_worker::collective::Single;
use ferroclip_worker::train::Trainer;
use tch::{Kind, Tensor};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn path(name: &str) -> String {
    data(name).to_str().expect("utf8 path").to_string()
}

fn reference() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(data("openclip_hub_ref.safetensors"))
        .expect("reference")
        .into_iter()
        .collect()
}

/// Each row's cosine with the same row of `want` (both sides normalised here).
fn min_cosine(values: &[f32], dim: usize, want: &Tensor) -> f64 {
    let got = Tensor::from_slice(values)
        .view([-1, dim as i64])
        .to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    assert_eq!(got.size(), want.size());
    let unit = |t: &Tensor| t / t.norm_scalaropt_dim(2, [-1], true);
    (unit(&got) * unit(&want))
        .sum_dim_intlist([-1i64].as_slice(), false, Kind::Double)
        .min()
        .double_value(&[])
}

#[test]
fn embed_of_the_hub_directory_equals_open_clip() {
    let r = reference();
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = path("openclip_hub");
    let img_out = tmp.path().join("img.npy");
    let o = embed(&[
        "--checkpoint",
        &hub,
        "--images",
        &path("openclip_hub_images"),
        "--out",
        img_out.to_str().expect("utf8"),
    ]);
    ok(&o);
    let (rows, dim, values) = read_npy(&img_out);
    assert_eq!((rows, dim), (4, 16));
    let img_cos = min_cosine(&values, dim, &r["image_emb"]);
    let txt_out = tmp.path().join("txt.npy");
    ok(&embed(&[
        "--checkpoint",
        &hub,
        "--texts",
        &path("openclip_hub_texts.txt"),
        "--out",
        txt_out.to_str().expect("utf8"),
    ]));
    let (rows, dim, values) = read_npy(&txt_out);
    assert_eq!((rows, dim), (4, 16));
    let txt_cos = min_cosine(&values, dim, &r["text_emb"]);
    eprintln!("smallest cosine with open_clip: images {img_cos:.8}, texts {txt_cos:.8}");
    assert!(img_cos >= 0.9999, "image embeddings: cosine {img_cos}");
    assert!(txt_cos >= 0.9999, "text embeddings: cosine {txt_cos}");
}

fn init_config(init: &str) -> RunConfig {
    let mut c = RunConfig::default();
    c.model.init = init.to_string();
    c.optim.warmup_steps = 1;
    c
}

fn trainer(cfg: &RunConfig) -> Result<Trainer, ferroclip_worker::train::TrainError> {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    Trainer::new(cfg, 10)
}

#[test]
fn model_init_of_the_hub_directory_starts_from_open_clips_loss_and_trains() {
    let r = reference();
    let mut t = trainer(&init_config(&path("openclip_hub"))).expect("trainer");
    assert!(t.model.config.quick_gelu, "the hub config's quick_gelu");
    let (pixels, tokens) = (&r["pixels"], &r["tokens"]);
    let first = t
        .compute_grads_tensors(pixels, tokens, 4, &mut Single)
        .expect("grads");
    let want = r["loss"].double_value(&[0]);
    eprintln!("first loss {:.8}, open_clip's {want:.8}", first.contrastive);
    assert!(
        (first.contrastive - want).abs() < 1e-5 * want,
        "first loss {} vs open_clip {want}",
        first.contrastive
    );
    t.apply_update().expect("update");
    let second = t
        .compute_grads_tensors(pixels, tokens, 4, &mut Single)
        .expect("grads");
    assert!(second.contrastive < first.contrastive - 1e-4, "{second:?}");
}

/// ALBEF/BLIP's start: an ITM re-ranker on pretrained towers. The hub directory has no fusion
/// encoder; `[model]` asks for one (`tiny-fusion`, or `fusion_layers`), which starts fresh on
/// top of the OpenCLIP weights, and with both towers locked only it and the ITM head train.
#[test]
fn model_init_without_a_fusion_encoder_gets_the_one_the_config_asks_for() {
    let r = reference();
    let mut cfg = init_config(&path("openclip_hub"));
    cfg.model.preset = "tiny-fusion".into();
    (cfg.model.lock_image, cfg.model.lock_text) = (true, true);
    (cfg.objectives.contrastive, cfg.objectives.itm) = (0.0, 1.0);
    cfg.optim.lr = 1e-2;
    let mut t = trainer(&cfg).expect("trainer");
    assert_eq!(t.model.config.fusion_layers, 2, "tiny-fusion's two layers");
    assert!(
        t.model.config.quick_gelu,
        "the towers keep the hub's architecture"
    );
    let hub: HashMap<String, Tensor> =
        Tensor::read_safetensors(data("openclip_hub/open_clip_model.safetensors"))
            .expect("weights")
            .into_iter()
            .collect();
    let before: Vec<(String, Tensor)> = t
        .model
        .params
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy()))
        .collect();
    for (name, p) in &before {
        if let Some(w) = hub.get(name) {
            assert!(p.equal(w), "{name} is not the hub's");
        } else {
            let fresh = name.starts_with("fusion.") || name.starts_with("itm_head.");
            assert!(fresh, "{name}: neither the hub's nor the fusion encoder's");
        }
    }
    let (pixels, tokens) = (&r["pixels"], &r["tokens"]);
    for _ in 0..2 {
        let l = t
            .compute_grads_tensors(pixels, tokens, 4, &mut Single)
            .expect("grads");
        assert!(l.itm.is_finite() && l.itm > 0.0, "{l:?}");
        t.apply_update().expect("update");
    }
    let mut trained = 0;
    for (name, was) in &before {
        let now = t.model.params.get(name).expect("param");
        let fusion = name.starts_with("fusion.") || name.starts_with("itm_head.");
        assert_eq!(!now.equal(was), fusion, "{name}");
        trained += usize::from(fusion);
    }
    assert!(trained > 10, "{trained} fusion tensors trained");
    // Without the config asking, the hub's architecture stands: no fusion encoder, so ITM is
    // refused by name.
    cfg.model.preset = "tiny".into();
    let err = trainer(&cfg).err().expect("no fusion encoder").to_string();
    assert!(err.contains("fusion"), "{err}");
}

#[test]
fn a_bare_safetensors_file_takes_the_presets_shape_and_mismatches_name_the_tensor() {
    // openclip_tiny.safetensors (gen_openclip_ref.py): GELU, 16-pixel images, vocab 1000.
    let mut cfg = init_config(&path("openclip_tiny.safetensors"));
    let m = &mut cfg.model;
    m.preset = "custom".into();
    (m.embed_dim, m.image_size, m.patch_size) = (Some(16), Some(16), Some(4));
    (m.vision_width, m.vision_layers, m.vision_heads) = (Some(32), Some(2), Some(2));
    (m.context_length, m.vocab_size) = (Some(8), Some(1000));
    (m.text_width, m.text_layers, m.text_heads) = (Some(32), Some(2), Some(2));
    let t = trainer(&cfg).expect("trainer");
    let file: HashMap<String, Tensor> = Tensor::read_safetensors(data("openclip_tiny.safetensors"))
        .expect("weights")
        .into_iter()
        .collect();
    let name = "visual.transformer.resblocks.1.mlp.c_fc.weight";
    assert!(t.model.params.get(name).expect("param").equal(&file[name]));
    cfg.model.text_width = Some(64);
    let err = trainer(&cfg).err().expect("a shape mismatch").to_string();
    assert!(err.contains("model.init") && err.contains("shape"), "{err}");
    assert!(err.contains("token_embedding.weight"), "{err}");
    // The hub directory's weights under another architecture: the tensor is named.
    let mut cfg = init_config(&path("openclip_hub/open_clip_model.safetensors"));
    cfg.model.preset = "tiny".into();
    let err = trainer(&cfg).err().expect("wrong architecture").to_string();
    assert!(err.contains("visual."), "{err}");
}

/// `embed --images IMAGES` of `hub` into `out` (`extra` flags appended): the values.
fn embed_folder(hub: &str, images: &str, out: &std::path::Path, extra: &[&str]) -> Vec<f32> {
    let out_arg = out.to_str().expect("utf8");
    let mut args = vec!["--checkpoint", hub, "--images", images, "--out", out_arg];
    args.extend(extra);
    let o = embed(&args);
    ok(&o);
    let (rows, dim, values) = read_npy(out);
    assert_eq!((rows, dim), (4, 16));
    values
}

#[test]
fn embed_preprocesses_as_the_hub_config_says() {
    // gen_openclip_preprocess.py: non-square images through open_clip's own preprocess of each
    // resize_mode (longest: bilinear with fill 128; squash: bicubic; shortest: the default).
    let r: HashMap<String, Tensor> =
        Tensor::read_safetensors(data("openclip_preprocess_ref.safetensors"))
            .expect("reference")
            .into_iter()
            .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = path("openclip_wide_images");
    let modes = ["shortest", "longest", "squash"];
    let mut got = Vec::new();
    for mode in modes {
        let hub = match mode {
            "shortest" => path("openclip_hub"),
            m => path(&format!("openclip_hub_{m}")),
        };
        let values = embed_folder(&hub, &images, &tmp.path().join(format!("{mode}.npy")), &[]);
        let cos = min_cosine(&values, 16, &r[&format!("{mode}_image_emb")]);
        eprintln!("{mode}: smallest cosine with open_clip {cos:.8}");
        assert!(cos >= 0.9999, "{mode}: cosine {cos}");
        got.push(values);
    }
    // The modes see different pixels: each one's embeddings are far from the others' references,
    // so the check above could not pass with the default transform everywhere.
    for (i, values) in got.iter().enumerate() {
        for other in modes.iter().filter(|m| **m != modes[i]) {
            let cos = min_cosine(values, 16, &r[&format!("{other}_image_emb")]);
            assert!(cos < 0.999, "{} vs {other}: cosine {cos}", modes[i]);
        }
    }
}

#[test]
fn embed_reads_an_image_prefix_on_s3() {
    common::s3::credentials();
    let s3 = common::s3::S3Server::start();
    let opts = s3.options();
    let prefix = format!("s3://{}/photos/2026", common::s3::BUCKET);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = data("openclip_wide_images");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("images")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    for name in &names {
        let name = name.to_str().expect("utf8");
        let loc = ferroclip_shards::store::Location::open(&format!("{prefix}/{name}"), &opts)
            .expect("location");
        let bytes = std::fs::read(dir.join(name)).expect("read");
        rt.block_on(object_store::ObjectStoreExt::put(
            loc.store.as_ref(),
            &loc.path,
            bytes.into(),
        ))
        .expect("upload");
    }
    // Not an image: skipped.
    let notes = ferroclip_shards::store::Location::open(&format!("{prefix}/notes.txt"), &opts)
        .expect("location");
    rt.block_on(object_store::ObjectStoreExt::put(
        notes.store.as_ref(),
        &notes.path,
        b"hello".to_vec().into(),
    ))
    .expect("upload");
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = path("openclip_hub_longest");
    let local = embed_folder(
        &hub,
        &path("openclip_wide_images"),
        &tmp.path().join("l.npy"),
        &[],
    );
    let endpoint = s3.endpoint.clone();
    let remote = embed_folder(
        &hub,
        &prefix,
        &tmp.path().join("r.npy"),
        &["--s3-endpoint", &endpoint, "--allow-http"],
    );
    assert_eq!(local, remote, "the same files embed the same from S3");
    // An empty prefix is an error naming it, not an empty file.
    let o = embed(&[
        "--checkpoint",
        &hub,
        "--images",
        &format!("s3://{}/nothing", common::s3::BUCKET),
        "--s3-endpoint",
        &endpoint,
        "--allow-http",
        "--out",
        tmp.path().join("e.npy").to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("nothing") && err.contains("no image files"),
        "{err}"
    );
}
