//! A Hugging Face tokenizer.json works through `Tokenizer::from_hf_json`: its normaliser,
//! pre-tokeniser and template post-processor are honoured, rows are truncated (end token kept)
//! and padded to the context length.

use ferroclip_worker::data::tokenizer::Tokenizer;

/// A tiny BERT-like word-level tokenizer: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, lower-casing.
const TOKENIZER_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 3, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "Lowercase"},
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
    "special_tokens": {
      "[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
      "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}
    }
  },
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "a": 4, "photo": 5, "of": 6, "cat": 7, "dog": 8, "&": 9}, "unk_token": "[UNK]"}
}"#;

fn tokenizer(ctx: usize) -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, TOKENIZER_JSON).unwrap();
    let tok = Tokenizer::from_hf_json(&path, ctx).unwrap();
    (dir, tok)
}

#[test]
fn ids_follow_the_tokenizer_json() {
    let (_dir, tok) = tokenizer(10);
    assert_eq!((tok.sot(), tok.eot(), tok.pad()), (1, 2, 0));
    assert_eq!(tok.vocab_size(), 10);
    assert_eq!(
        tok.encode("A Photo  of a CAT"),
        vec![1, 4, 5, 6, 4, 7, 2, 0, 0, 0]
    );
    // Unknown words map to [UNK]; HTML entities are unescaped first, as OpenCLIP does.
    assert_eq!(
        tok.encode("a zebra &amp; a dog"),
        vec![1, 4, 3, 9, 4, 8, 2, 0, 0, 0]
    );
    assert_eq!(tok.encode(""), vec![1, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn long_captions_are_truncated_keeping_the_end_token() {
    let (_dir, tok) = tokenizer(6);
    let row = tok.encode("a photo of a cat and a dog and a cat");
    assert_eq!(row, vec![1, 4, 5, 6, 4, 2]);
    let t = tok.encode_batch(&["a cat", "a photo of a cat a dog"]);
    assert_eq!(t.size(), vec![2, 6]);
    assert_eq!(
        Vec::<i64>::try_from(t.get(0)).unwrap(),
        vec![1, 4, 7, 2, 0, 0]
    );
    assert_eq!(
        Vec::<i64>::try_from(t.get(1)).unwrap(),
        vec![1, 4, 5, 6, 4, 2]
    );
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-tokenizer.json");
    let err = Tokenizer::from_hf_json(&missing, 8)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing-tokenizer.json"), "{err}");
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_hf_json(&broken, 8)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("broken.json"), "{err}");
}
