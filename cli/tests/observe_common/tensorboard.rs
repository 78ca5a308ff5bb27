//! Rank 0's TensorBoard event files read back with their checksums.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub fn masked_crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0x82F6_3B78 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    (!crc).rotate_right(15).wrapping_add(0xa282_ead8)
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// Every event of every file in `dir`, each record's two checksums verified.
pub fn read_events(dir: &Path) -> Vec<Event> {
    use prost::Message;
    let mut events = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("tensorboard dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        files += 1;
        let bytes = std::fs::read(&path).expect("event file");
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            assert!(rest.len() >= 16, "truncated record in {name}");
            let len_bytes: [u8; 8] = rest[..8].try_into().expect("8 bytes");
            let len = u64::from_le_bytes(len_bytes) as usize;
            let len_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
            assert_eq!(len_crc, masked_crc32c(&len_bytes), "length crc in {name}");
            let data = &rest[12..12 + len];
            let crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().expect("4 bytes"));
            assert_eq!(crc, masked_crc32c(data), "data crc in {name}");
            events.push(Event::decode(data).expect("an Event"));
            rest = &rest[16 + len..];
        }
    }
    assert!(files >= 1, "no event file");
    events
}

pub fn check_tensorboard(run: &Path, last_step: u64) {
    let events = read_events(&run.join("tensorboard"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.file_version.as_deref() == Some("brain.Event:2"))
            .count(),
        1,
        "one file, opened once by rank 0"
    );
    let mut by_tag: HashMap<String, BTreeMap<i64, f32>> = HashMap::new();
    for e in &events {
        for v in e.summary.iter().flat_map(|s| &s.value) {
            by_tag
                .entry(v.tag.clone())
                .or_default()
                .insert(e.step, v.simple_value.unwrap_or(f32::NAN));
        }
    }
    let lr = by_tag.get("lr").expect("lr scalars");
    let steps: Vec<i64> = lr.keys().copied().collect();
    let expected: Vec<i64> = (1..=last_step as i64).collect();
    assert_eq!(steps, expected, "a scalar per step");
    // The cosine schedule ends at 0.
    assert!(lr.values().all(|v| *v >= 0.0 && *v <= 1e-3), "{lr:?}");
    for tag in ["logit_scale", "time/step_s", "time/allreduce_s"] {
        assert_eq!(by_tag.get(tag).map(|m| m.len()), Some(steps.len()), "{tag}");
    }
    // Losses only where rank 0 had rows (the last steps of an epoch may give it none).
    let loss = by_tag.get("loss/total").expect("loss/total scalars");
    assert!(
        loss.len() * 10 >= steps.len() * 8,
        "{} of {} steps",
        loss.len(),
        steps.len()
    );
    assert!(loss.values().all(|v| v.is_finite() && *v > 0.0), "{loss:?}");
    assert_eq!(
        by_tag.get("loss/contrastive").map(|m| m.len()),
        Some(loss.len())
    );
}
