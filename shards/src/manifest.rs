//! `manifest.json`: what a built dataset contains. Written last and atomically by a build; the
//! coordinator plans epochs from it and workers find blocks through it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const CLASSES_FILE: &str = "classes.json";

/// The fixed output columns; passthrough columns follow them.
pub const COL_KEY: &str = "key";
pub const COL_IMAGE: &str = "image";
pub const COL_CAPTION: &str = "caption";
pub const COL_WIDTH: &str = "width";
pub const COL_HEIGHT: &str = "height";
/// Optional passthrough column read into `Sample::label` (written by `shards synth`).
pub const COL_LABEL: &str = "label";
/// Optional passthrough column read into `Sample::image_id`: groups an image's captions
/// (written by `shards build --format coco|karpathy`).
pub const COL_IMAGE_ID: &str = "image_id";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub splits: BTreeMap<String, Split>,
    pub schema: Vec<ColumnInfo>,
    /// Rows left out, by reason (`image_decode`, `caption_empty`, `duplicate`, ...).
    pub rejected: BTreeMap<String, u64>,
    pub stats: Stats,
    /// The command line that made this dataset.
    pub command: Vec<String>,
    /// Fingerprint of the build's inputs and options; a re-run with the same one resumes.
    pub build_id: String,
    /// Rows read from the sources (accepted + rejected).
    pub input_rows: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Split {
    pub shards: Vec<ShardInfo>,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ShardInfo {
    /// Relative to the dataset root, e.g. `train/shard-00000.parquet`.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    /// Rows of each row group (= block) in file order.
    pub row_groups: Vec<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    pub data_type: String,
}

/// Statistics over the accepted rows (as stored, i.e. after `--resize`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub caption_chars: Summary,
    pub width: Summary,
    pub height: Summary,
    pub image_bytes: Summary,
}

impl Stats {
    pub fn add(&mut self, caption_chars: u64, width: u32, height: u32, image_bytes: u64) {
        self.caption_chars.add(caption_chars);
        self.width.add(width.into());
        self.height.add(height.into());
        self.image_bytes.add(image_bytes);
    }

    pub fn merge(&mut self, other: &Stats) {
        self.caption_chars.merge(&other.caption_chars);
        self.width.merge(&other.width);
        self.height.merge(&other.height);
        self.image_bytes.merge(&other.image_bytes);
    }
}

/// Count/sum/min/max: additive, so per-shard summaries merge into the dataset's.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: u64,
    pub min: u64,
    pub max: u64,
}

impl Summary {
    pub fn add(&mut self, v: u64) {
        self.merge(&Summary {
            count: 1,
            sum: v,
            min: v,
            max: v,
        });
    }

    pub fn merge(&mut self, o: &Summary) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = o.clone();
            return;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }
}

impl Manifest {
    pub fn total_rows(&self) -> u64 {
        // Saturating: a hand-edited manifest's figures must not overflow a report.
        self.splits
            .values()
            .fold(0u64, |total, s| total.saturating_add(s.rows))
    }

    pub fn parse(url: &str, bytes: &[u8]) -> Result<Manifest, crate::ShardsError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| crate::ShardsError::Manifest {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        if m.format_version != FORMAT_VERSION {
            return Err(crate::ShardsError::Manifest {
                url: url.to_string(),
                message: format!(
                    "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                    m.format_version
                ),
            });
        }
        let invalid = |message: String| crate::ShardsError::Manifest {
            url: url.to_string(),
            message,
        };
        for (name, split) in &m.splits {
            let mut blocks = 0u64;
            for shard in &split.shards {
                // A row group is a block, whose rows are a u32 (`Block::rows`).
                if let Some(rg) = shard
                    .row_groups
                    .iter()
                    .position(|&r| r > u64::from(u32::MAX))
                {
                    return Err(invalid(format!(
                        "split {name}: {}: row group {rg} has {} rows, more than a block holds ({})",
                        shard.path,
                        shard.row_groups[rg],
                        u32::MAX
                    )));
                }
                let sum = shard
                    .row_groups
                    .iter()
                    .try_fold(0u64, |total, &r| total.checked_add(r));
                if sum != Some(shard.rows) {
                    return Err(invalid(format!(
                        "split {name}: {}: row groups do not add up to its rows",
                        shard.path
                    )));
                }
                blocks += shard.row_groups.len() as u64;
            }
            // Blocks are numbered with a u32 (`Block::index`).
            if blocks > u64::from(u32::MAX) {
                return Err(invalid(format!(
                    "split {name}: {blocks} row groups, more than {} blocks",
                    u32::MAX
                )));
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_merge_like_one_pass() {
        let mut a = Summary::default();
        let mut b = Summary::default();
        let mut all = Summary::default();
        for v in [5, 1, 9] {
            a.add(v);
            all.add(v);
        }
        for v in [20, 0] {
            b.add(v);
            all.add(v);
        }
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!((a.min, a.max, a.count, a.sum), (0, 20, 5, 35));
    }

    fn one_shard(rows: u64, row_groups: Vec<u64>) -> Vec<u8> {
        let mut m: Manifest = serde_json::from_slice(&one_shard_json()).unwrap();
        let shard = &mut m.splits.get_mut("train").unwrap().shards[0];
        shard.rows = rows;
        shard.row_groups = row_groups;
        serde_json::to_vec(&m).unwrap()
    }

    fn one_shard_json() -> Vec<u8> {
        let m = Manifest {
            format_version: FORMAT_VERSION,
            splits: BTreeMap::from([(
                "train".to_string(),
                Split {
                    shards: vec![ShardInfo {
                        path: "train/shard-00000.parquet".into(),
                        rows: 8,
                        bytes: 1,
                        sha256: String::new(),
                        row_groups: vec![4, 4],
                    }],
                    rows: 8,
                    bytes: 1,
                },
            )]),
            schema: vec![],
            rejected: BTreeMap::new(),
            stats: Stats::default(),
            command: vec![],
            build_id: String::new(),
            input_rows: 8,
        };
        serde_json::to_vec(&m).unwrap()
    }

    /// Found by `fuzz_manifest`: row groups whose sum overflows u64 panicked (debug builds) or
    /// wrapped around to the shard's rows (release builds).
    #[test]
    fn row_groups_that_overflow_are_rejected() {
        let err = Manifest::parse("x/manifest.json", &one_shard(1, vec![u64::MAX, 2]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x/manifest.json") && err.contains("row group"),
            "{err}"
        );
    }

    /// Found by `fuzz_manifest`: a row group of 2^32 rows or more became a block of (rows mod
    /// 2^32) rows, and one of about 2^32 made `read_block` reserve room for that many samples
    /// (hundreds of GB: an abort) before reading anything.
    #[test]
    fn a_row_group_beyond_a_blocks_u32_rows_is_rejected() {
        assert!(Manifest::parse("x/manifest.json", &one_shard(8, vec![4, 4])).is_ok());
        for rows in [1u64 << 32, u64::from(u32::MAX) + 7] {
            let err = Manifest::parse("x/manifest.json", &one_shard(rows, vec![rows]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("x/manifest.json") && err.contains("row group"),
                "{err}"
            );
        }
    }

    #[test]
    fn manifest_with_inconsistent_row_groups_is_rejected() {
        let m = Manifest {
            format_version: FORMAT_VERSION,
            splits: BTreeMap::from([(
                "train".to_string(),
                Split {
                    shards: vec![ShardInfo {
                        path: "train/shard-00000.parquet".into(),
                        rows: 10,
                        bytes: 1,
                        sha256: String::new(),
                        row_groups: vec![4, 4],
                    }],
                    rows: 10,
                    bytes: 1,
                },
            )]),
            schema: vec![],
            rejected: BTreeMap::new(),
            stats: Stats::default(),
            command: vec![],
            build_id: String::new(),
            input_rows: 10,
        };
        let bytes = serde_json::to_vec(&m).unwrap();
        let err = Manifest::parse("x/manifest.json", &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row groups do not add up"), "{err}");
    }
}
