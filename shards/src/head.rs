//! `shards head`: the first rows of a split, optionally with their images written out.

use object_store::{ObjectStoreExt, PutPayload};

use crate::error::ShardsError;
use crate::reader::{Dataset, Sample};
use crate::store::{Location, StoreOptions};

pub async fn head(
    url: &str,
    split: &str,
    n: usize,
    opts: &StoreOptions,
) -> Result<Vec<Sample>, ShardsError> {
    let ds = Dataset::open(url, opts).await?;
    let mut out = Vec::new();
    for b in ds.blocks(split)? {
        if out.len() >= n {
            break;
        }
        out.extend(ds.read_block(split, b.index).await?);
    }
    out.truncate(n);
    Ok(out)
}

/// Writes each sample's image as `<key>.<ext>` below `dir` (a path or URL); returns the names.
pub async fn write_thumbnails(
    samples: &[Sample],
    dir: &str,
    opts: &StoreOptions,
) -> Result<Vec<String>, ShardsError> {
    let root = Location::open(dir, opts)?;
    let mut names = Vec::new();
    for s in samples {
        let ext = match image::guess_format(&s.image) {
            Ok(image::ImageFormat::Png) => "png",
            _ => "jpg",
        };
        // Keys may hold any character; keep file names portable.
        let safe: String = s
            .key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = format!("{safe}.{ext}");
        let loc = root.join(&name);
        loc.store
            .put(&loc.path, PutPayload::from(s.image.clone()))
            .await
            .map_err(|e| ShardsError::store(loc.url(), e))?;
        names.push(name);
    }
    Ok(names)
}
