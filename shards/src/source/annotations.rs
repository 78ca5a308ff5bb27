//! The captioning datasets' own annotation files, read into rows of a folder source: one row per
//! (image, caption) pair, with the image's id (it groups an image's captions for retrieval eval)
//! and the split the annotations give it.
//!
//! - `coco`: a COCO captions file (`captions_train2017.json`): `images[]` with `id`/`file_name`,
//!   `annotations[]` with `image_id`/`caption`. One file is one split (named by the file).
//! - `karpathy`: Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`: `images[]` with
//!   `filepath` (COCO only) / `filename`, `split` (train/val/test/restval), `sentences[].raw`,
//!   `cocoid` or `imgid`.
//! - `vg`: Visual Genome's `region_descriptions.json` (`[{id, regions: [{image_id, phrase}]}]`),
//!   read as whole images captioned by their region phrases (not crops: a region's box is often
//!   too small for the image encoder). `image_data.json` (`--image-data`) maps an image id to its
//!   file (`VG_100K_2/1.jpg`, from its `url`); without it the file is `<id>.jpg`. One split,
//!   `train`.

use std::collections::HashMap;

use serde::Deserialize;

use crate::error::ShardsError;
use crate::validate::RawCaption;

/// An annotation file's format (`shards build --format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Coco,
    Karpathy,
    Vg,
}

/// One (image, caption) pair of an annotation file.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The image's path under `--images`.
    pub path: String,
    pub key: String,
    pub caption: RawCaption,
    pub image_id: i64,
    /// Index into [`Annotations::splits`].
    pub split: u16,
}

/// An annotation file's pairs, in file order, and its split names in order of appearance.
#[derive(Debug)]
pub struct Annotations {
    pub pairs: Vec<Pair>,
    pub splits: Vec<String>,
}

/// A second file some formats need: Visual Genome's `image_data.json` (URL, bytes).
pub type ImageData<'a> = Option<(&'a str, &'a [u8])>;

impl Annotations {
    pub fn parse(
        format: Format,
        url: &str,
        bytes: &[u8],
        image_data: ImageData,
    ) -> Result<Annotations, ShardsError> {
        match format {
            Format::Coco => coco(url, bytes),
            Format::Karpathy => karpathy(url, bytes),
            Format::Vg => vg(url, bytes, image_data),
        }
    }

    fn split_index(splits: &mut Vec<String>, name: &str) -> u16 {
        match splits.iter().position(|s| s == name) {
            Some(i) => i as u16,
            None => {
                splits.push(name.to_string());
                (splits.len() - 1) as u16
            }
        }
    }
}

fn parse_json<'a, T: Deserialize<'a>>(url: &str, bytes: &'a [u8]) -> Result<T, ShardsError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ShardsError::bad_input(
            url,
            format!("not the expected annotation file (line {}): {e}", e.line()),
        )
    })
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoCaption>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: i64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoCaption {
    image_id: i64,
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    caption: Option<String>,
}

/// The split a COCO captions file holds, from its name: `captions_val2017.json` → `val`.
fn coco_split(url: &str) -> &'static str {
    let name = url.rsplit('/').next().unwrap_or(url);
    if name.contains("val") {
        "val"
    } else if name.contains("test") {
        "test"
    } else {
        "train"
    }
}

fn coco(url: &str, bytes: &[u8]) -> Result<Annotations, ShardsError> {
    let file: CocoFile = parse_json(url, bytes)?;
    let paths: HashMap<i64, &str> = file
        .images
        .iter()
        .map(|i| (i.id, i.file_name.as_str()))
        .collect();
    let mut splits = Vec::new();
    let split = Annotations::split_index(&mut splits, coco_split(url));
    let mut pairs = Vec::with_capacity(file.annotations.len());
    for (n, a) in file.annotations.iter().enumerate() {
        let path = paths.get(&a.image_id).ok_or_else(|| {
            ShardsError::bad_input(
                url,
                format!(
                    "annotations[{n}].image_id {} is not an id of images[]",
                    a.image_id
                ),
            )
        })?;
        pairs.push(Pair {
            path: path.to_string(),
            key: format!("{}-{}", a.image_id, a.id.unwrap_or(n as i64)),
            caption: a
                .caption
                .clone()
                .map_or(RawCaption::Missing, RawCaption::Text),
            image_id: a.image_id,
            split,
        });
    }
    Ok(Annotations { pairs, splits })
}

#[derive(Deserialize)]
struct KarpathyFile {
    images: Vec<KarpathyImage>,
}

#[derive(Deserialize)]
struct KarpathyImage {
    #[serde(default)]
    filepath: Option<String>,
    filename: String,
    split: String,
    imgid: i64,
    #[serde(default)]
    cocoid: Option<i64>,
    sentences: Vec<KarpathySentence>,
}

#[derive(Deserialize)]
struct KarpathySentence {
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    sentid: Option<i64>,
}

fn karpathy(url: &str, bytes: &[u8]) -> Result<Annotations, ShardsError> {
    let file: KarpathyFile = parse_json(url, bytes)?;
    let mut splits = Vec::new();
    let mut pairs = Vec::new();
    for img in &file.images {
        let split = Annotations::split_index(&mut splits, &img.split);
        let path = match &img.filepath {
            Some(dir) if !dir.is_empty() => format!("{dir}/{}", img.filename),
            _ => img.filename.clone(),
        };
        // COCO's own id where the file has it, so ids agree with the COCO files.
        let image_id = img.cocoid.unwrap_or(img.imgid);
        for (n, s) in img.sentences.iter().enumerate() {
            pairs.push(Pair {
                path: path.clone(),
                key: format!("{image_id}-{}", s.sentid.unwrap_or(n as i64)),
                caption: s.raw.clone().map_or(RawCaption::Missing, RawCaption::Text),
                image_id,
                split,
            });
        }
    }
    Ok(Annotations { pairs, splits })
}

#[derive(Deserialize)]
struct VgImage {
    #[serde(default)]
    id: Option<i64>,
    regions: Vec<VgRegion>,
}

#[derive(Deserialize)]
struct VgRegion {
    image_id: i64,
    #[serde(default)]
    region_id: Option<i64>,
    #[serde(default)]
    phrase: Option<String>,
}

#[derive(Deserialize)]
struct VgImageData {
    #[serde(alias = "id")]
    image_id: i64,
    #[serde(default)]
    url: Option<String>,
}

fn vg(url: &str, bytes: &[u8], image_data: ImageData) -> Result<Annotations, ShardsError> {
    let images: Vec<VgImage> = parse_json(url, bytes)?;
    // image_data.json: an image's file is the last two parts of its URL (`VG_100K_2/1.jpg`).
    let mut files: HashMap<i64, String> = HashMap::new();
    if let Some((data_url, data)) = image_data {
        let entries: Vec<VgImageData> = parse_json(data_url, data)?;
        for e in entries {
            if let Some(u) = e.url {
                let parts: Vec<&str> = u.rsplitn(3, '/').collect();
                let file = match parts.as_slice() {
                    [name, dir, _] => format!("{dir}/{name}"),
                    _ => u.clone(),
                };
                files.insert(e.image_id, file);
            }
        }
    }
    let mut splits = Vec::new();
    let split = Annotations::split_index(&mut splits, "train");
    let mut pairs = Vec::new();
    for (n, img) in images.iter().enumerate() {
        for (r, region) in img.regions.iter().enumerate() {
            let id = region.image_id;
            if img.id.is_some_and(|i| i != id) {
                return Err(ShardsError::bad_input(
                    url,
                    format!(
                        "[{n}].regions[{r}].image_id {id} is not the entry's id {:?}",
                        img.id
                    ),
                ));
            }
            let path = match (image_data.is_some(), files.get(&id)) {
                (_, Some(f)) => f.clone(),
                (false, None) => format!("{id}.jpg"),
                (true, None) => {
                    return Err(ShardsError::bad_input(
                        url,
                        format!("[{n}].regions[{r}].image_id {id} is not in the --image-data file"),
                    ))
                }
            };
            pairs.push(Pair {
                path,
                key: format!("{id}-{}", region.region_id.unwrap_or(r as i64)),
                caption: region
                    .phrase
                    .clone()
                    .map_or(RawCaption::Missing, RawCaption::Text),
                image_id: id,
                split,
            });
        }
    }
    Ok(Annotations { pairs, splits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_pairs_keep_every_caption_and_name_a_dangling_image_id() {
        let json =
            br#"{"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": "one"},
                            {"image_id": 9, "id": 2, "caption": "two"},
                            {"image_id": 7, "id": 3, "caption": "three"}]}"#;
        let a =
            Annotations::parse(Format::Coco, "s3://b/captions_val2017.json", json, None).unwrap();
        assert_eq!(a.splits, ["val"]);
        let got: Vec<(&str, &str, i64)> = a
            .pairs
            .iter()
            .map(|p| (p.path.as_str(), p.key.as_str(), p.image_id))
            .collect();
        assert_eq!(
            got,
            [
                ("a.jpg", "7-1", 7),
                ("b.jpg", "9-2", 9),
                ("a.jpg", "7-3", 7)
            ]
        );
        let bad = br#"{"images": [], "annotations": [{"image_id": 5, "caption": "x"}]}"#;
        let e = Annotations::parse(Format::Coco, "c.json", bad, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.json") && e.contains("annotations[0].image_id 5"),
            "{e}"
        );
        let e = Annotations::parse(Format::Coco, "c.json", b"{\"images\": 3}", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.json") && e.contains("annotation file"), "{e}");
    }

    #[test]
    fn karpathy_pairs_keep_the_files_splits_and_paths() {
        let json = br#"{"dataset": "coco", "images": [
            {"filepath": "val2014", "filename": "x.jpg", "imgid": 0, "cocoid": 42, "split": "test",
             "sentences": [{"raw": "A.", "sentid": 0}, {"raw": "B.", "sentid": 1}]},
            {"filename": "y.jpg", "imgid": 1, "split": "restval", "sentences": [{"raw": "C."}]}]}"#;
        let a = Annotations::parse(Format::Karpathy, "k.json", json, None).unwrap();
        assert_eq!(a.splits, ["test", "restval"]);
        let got: Vec<(&str, &str, i64, u16)> = a
            .pairs
            .iter()
            .map(|p| (p.path.as_str(), p.key.as_str(), p.image_id, p.split))
            .collect();
        assert_eq!(
            got,
            [
                ("val2014/x.jpg", "42-0", 42, 0),
                ("val2014/x.jpg", "42-1", 42, 0),
                ("y.jpg", "1-0", 1, 1)
            ]
        );
    }

    #[test]
    fn vg_regions_caption_whole_images_found_through_image_data() {
        let regions = br#"[{"id": 1, "regions": [
                {"region_id": 10, "image_id": 1, "phrase": "white clouds"},
                {"region_id": 11, "image_id": 1, "phrase": "a red bus"}]},
            {"id": 2, "regions": [{"region_id": 20, "image_id": 2, "phrase": "a dog"}]}]"#;
        let data = br#"[{"image_id": 1, "url": "https://x/rak248/VG_100K/1.jpg"},
            {"image_id": 2, "url": "https://x/rak248/VG_100K_2/2.jpg"}]"#;
        let a = Annotations::parse(Format::Vg, "r.json", regions, Some(("d.json", data))).unwrap();
        assert_eq!(a.splits, ["train"]);
        let got: Vec<(&str, &str, i64)> = a
            .pairs
            .iter()
            .map(|p| (p.path.as_str(), p.key.as_str(), p.image_id))
            .collect();
        assert_eq!(
            got,
            [
                ("VG_100K/1.jpg", "1-10", 1),
                ("VG_100K/1.jpg", "1-11", 1),
                ("VG_100K_2/2.jpg", "2-20", 2)
            ]
        );
        // Without image_data.json the file is <id>.jpg; an id missing from it is an error.
        let a = Annotations::parse(Format::Vg, "r.json", regions, None).unwrap();
        assert_eq!(a.pairs[2].path, "2.jpg");
        let e = Annotations::parse(Format::Vg, "r.json", regions, Some(("d.json", b"[]")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.json") && e.contains("image_id 1"), "{e}");
    }
}
