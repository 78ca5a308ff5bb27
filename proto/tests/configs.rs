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

/// `configs/demo.toml` is the reference users read: with its commented-out `# key = value`
/// lines switched on it must set every key of `RunConfig` (no option left unset), and parse.
#[test]
fn the_demo_config_documents_every_key() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
    let text = std::fs::read_to_string(&path).expect("configs/demo.toml");
    let commented = uncomment_settings(&text);
    let cfg: RunConfig = toml::from_str(&commented).expect("demo.toml with every key switched on");
    let mut unset = Vec::new();
    let json = serde_json::to_value(&cfg).expect("config as JSON");
    let doc: toml::Table = toml::from_str(&commented).expect("demo.toml as a table");
    for (section, fields) in json.as_object().expect("sections") {
        for (key, value) in fields.as_object().expect("fields") {
            let named = doc
                .get(section)
                .and_then(|s| s.as_table())
                .is_some_and(|s| s.contains_key(key));
            if value.is_null() || !named {
                unset.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(
        unset.is_empty(),
        "configs/demo.toml does not document {unset:?}"
    );
}

/// `# key = value` (a commented-out setting) becomes `key = value`; other comments stay.
fn uncomment_settings(text: &str) -> String {
    text.lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_string();
            };
            let key_len = rest
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
                .count();
            if key_len > 0 && rest[key_len..].starts_with(" = ") {
                rest.to_string()
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
