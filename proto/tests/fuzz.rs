//! Fuzz target of `run.toml` (`ferroclip-fuzz`, `FERROCLIP_FUZZ_SECS`): `RunConfig::parse` +
//! validation over mutants of the example configs. No input may panic or hang; an invalid one is
//! an error naming the file; a valid one serialises back to a config that parses again.
//! Regression inputs live in `tests/fuzz_corpus/run_toml/`.

use std::path::Path;

use ferroclip_fuzz::{Fuzzer, LimitAlloc, TOML_DICT};
use ferroclip_proto::config::RunConfig;

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

#[test]
fn fuzz_run_toml() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir.join("../configs"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    seeds.sort();
    seeds.push(RunConfig::default().to_toml().into_bytes());
    let keys: Vec<Vec<u8>> = RunConfig::default()
        .to_toml()
        .lines()
        .filter_map(|l| {
            l.split_once(" = ")
                .map(|(k, _)| format!("\n{k} = ").into_bytes())
        })
        .collect();
    let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    Fuzzer::new("run_toml")
        .dict(TOML_DICT)
        .dict(&keys)
        .corpus_dir(dir.join("tests/fuzz_corpus/run_toml"))
        .run(&seeds, |input| {
            // The loader reads UTF-8 text (anything else is a read error naming the file).
            let text = String::from_utf8_lossy(input);
            match RunConfig::parse(&text, "fuzz/run.toml") {
                Err(e) => {
                    let m = e.to_string();
                    assert!(m.contains("fuzz/run.toml"), "{m}");
                }
                Ok(cfg) => {
                    let again = cfg.to_toml();
                    if let Err(e) = RunConfig::parse(&again, "again.toml") {
                        panic!("a valid config does not parse once written back: {e}\n{again}");
                    }
                }
            }
        });
}
