//! `DataState::open` as a list of pairs: JSON maps need string keys.

use super::ChunkId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

pub fn serialize<S: Serializer>(map: &BTreeMap<ChunkId, u32>, s: S) -> Result<S::Ok, S::Error> {
    let list: Vec<(ChunkId, u32)> = map.iter().map(|(k, v)| (*k, *v)).collect();
    list.serialize(s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<ChunkId, u32>, D::Error> {
    let list: Vec<(ChunkId, u32)> = Vec::deserialize(d)?;
    Ok(list.into_iter().collect())
}
