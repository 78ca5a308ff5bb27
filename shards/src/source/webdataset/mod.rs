//! The layouts img2dataset writes and OpenCLIP trains on: webdataset tar shards (`{00000..00999}.tar`,
//! each sample `KEY.jpg` + `KEY.txt` + `KEY.json`, streamed as they download) and the `files`
//! layout (the same triplets as objects in numbered folders). A sample's members share a key:
//! the path up to the first dot of the file name. The `.json` fields become passthrough
//! columns, typed by the first sample (fields it lacks are dropped; missing values are null).

mod files;
mod json;
mod tar;
mod tars;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use bytes::Bytes;

use super::{RawBatch, RawRow};
use crate::error::ShardsError;
use crate::validate::RawCaption;

pub(crate) use files::FilesInput;
pub(crate) use tars::TarInput;

/// Which members of a sample are its image and its caption.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WdsFields {
    /// Image extensions, first match wins (`jpg`, or e.g. `jpg,png,webp`).
    pub image_exts: Vec<String>,
    pub caption_ext: String,
}

impl Default for WdsFields {
    fn default() -> Self {
        Self {
            image_exts: vec!["jpg".into()],
            caption_ext: "txt".into(),
        }
    }
}

/// One sample: its key and its members by extension.
struct Sample {
    key: String,
    members: BTreeMap<String, Bytes>,
}

/// Splits a member path into (key, extension): `dir/000001.jpg` → (`dir/000001`, `jpg`).
fn split_key(path: &str) -> Option<(String, String)> {
    let (dir, file) = path.rsplit_once('/').map_or(("", path), |(d, f)| (d, f));
    let (stem, ext) = file.split_once('.')?;
    let key = if dir.is_empty() {
        stem.to_string()
    } else {
        format!("{dir}/{stem}")
    };
    Some((key, ext.to_ascii_lowercase()))
}

/// Expands webdataset's brace patterns: `{00000..00012}` (zero-padded as written) and `{a,b}`.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| format!("{pattern}: '{{' without '}}'"))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let items: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let bad = || format!("{pattern}: {{{body}}} is not a range of numbers");
        let (lo, hi): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if lo > hi || hi - lo >= 10_000_000 {
            return Err(bad());
        }
        let width = a.len();
        (lo..=hi).map(|n| format!("{n:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    let mut out = Vec::new();
    for rest in expand_braces(tail)? {
        for item in &items {
            out.push(format!("{head}{item}{rest}"));
        }
    }
    out.sort();
    Ok(out)
}

/// Groups consecutive members into samples by key.
#[derive(Default)]
struct Grouper {
    current: Option<Sample>,
}

impl Grouper {
    /// Adds a member; returns the previous sample when this member starts a new one.
    fn push(&mut self, name: &str, data: Bytes) -> Option<Sample> {
        let (key, ext) = split_key(name)?;
        match &mut self.current {
            Some(s) if s.key == key => {
                s.members.insert(ext, data);
                None
            }
            _ => self.current.replace(Sample {
                key,
                members: BTreeMap::from([(ext, data)]),
            }),
        }
    }

    fn finish(&mut self) -> Option<Sample> {
        self.current.take()
    }
}

/// Rows of a batch of samples from one source (a tar, or the files layout's root).
fn rows(
    source: &Arc<str>,
    first_index: u64,
    first_row: u64,
    samples: &[Sample],
    fields: &WdsFields,
    schema: &SchemaRef,
) -> Result<RawBatch, ShardsError> {
    let pass = json::json_batch(schema, samples)?;
    let mut bytes = 0;
    let rows = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let image = fields
                .image_exts
                .iter()
                .find_map(|e| s.members.get(e))
                .cloned();
            bytes += image.as_ref().map_or(0, |b| b.len() as u64);
            let caption = match s.members.get(&fields.caption_ext) {
                Some(c) => match std::str::from_utf8(c) {
                    Ok(t) => RawCaption::Text(t.to_string()),
                    Err(_) => RawCaption::Bytes(c.to_vec()),
                },
                None => RawCaption::Missing,
            };
            RawRow {
                index: first_index + i as u64,
                source: source.clone(),
                source_row: first_row + i as u64,
                key: s.key.clone(),
                image,
                caption,
                passthrough: Some((pass.clone(), i)),
                split: None,
            }
        })
        .collect();
    Ok(RawBatch { rows, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_zero_padded_ranges_and_lists() {
        assert_eq!(
            expand_braces("s3://b/laion/{00008..00011}.tar").unwrap(),
            [
                "s3://b/laion/00008.tar",
                "s3://b/laion/00009.tar",
                "s3://b/laion/00010.tar",
                "s3://b/laion/00011.tar"
            ]
        );
        assert_eq!(
            expand_braces("a/{x,y}/{1..2}.tar").unwrap(),
            ["a/x/1.tar", "a/x/2.tar", "a/y/1.tar", "a/y/2.tar"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        for bad in ["a/{3..1}.tar", "a/{1..x}.tar", "a/{1..2.tar"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_the_path_up_to_the_first_dot_of_the_file_name() {
        assert_eq!(
            split_key("00000/000000012.jpg"),
            Some(("00000/000000012".into(), "jpg".into()))
        );
        assert_eq!(
            split_key("a.b/c.seg.PNG"),
            Some(("a.b/c".into(), "seg.png".into()))
        );
        assert_eq!(split_key("noext"), None);
    }
}
