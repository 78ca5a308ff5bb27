//! Every example config in `configs/` parses and validates: they are documentation users copy.

use ferroclip_proto::config::RunConfig;

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let cfg = RunConfig::load(&path.to_string_lossy())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen.push((
            path.file_name().map(|n| n.to_string_lossy().to_string()),
            cfg,
        ));
    }
    let names: Vec<_> = seen.iter().filter_map(|(n, _)| n.clone()).collect();
    for want in ["demo.toml", "vit-b-32.toml", "vit-b-16.toml"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    let b16 = seen
        .iter()
        .find(|(n, _)| n.as_deref() == Some("vit-b-16.toml"))
        .map(|(_, c)| c)
        .expect("vit-b-16");
    assert_eq!(b16.model.preset, "ViT-B-16");
    assert_eq!(b16.objectives.patch_dropout, 0.5);
}
