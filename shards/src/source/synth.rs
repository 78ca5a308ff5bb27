//! The synthetic generator as an input (`shards synth`): rows made on rayon from per-row seeds by
//! [`crate::synth::generate`], each with its class as the passthrough column `label`.

use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use rayon::prelude::*;

use super::{Input, InputPlan, RawBatch, RawRow, Sink, BATCH_ROWS};
use crate::error::ShardsError;
use crate::manifest::COL_LABEL;
use crate::synth::{generate, SynthOptions, SynthRow};
use crate::validate::RawCaption;

/// The generator's one passthrough column: the class label.
fn label_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        COL_LABEL,
        DataType::Utf8,
        true,
    )]))
}

impl InputPlan {
    pub fn synth(opts: SynthOptions) -> InputPlan {
        let total_rows = opts.rows;
        InputPlan {
            input: Input::Synth(opts),
            passthrough: label_schema(),
            total_rows,
            splits: None,
        }
    }
}

/// Generates rows batch by batch on rayon and sends them down the build pipeline.
pub(super) async fn produce(opts: SynthOptions, tx: &Sink) -> Result<(), ShardsError> {
    let schema = label_schema();
    let source: Arc<str> = Arc::from("synth");
    let mut start = 0u64;
    while start < opts.rows {
        let end = (start + BATCH_ROWS as u64 * 4).min(opts.rows);
        let (seed, size, captions) = (opts.seed, opts.image_size, opts.captions);
        let rows: Vec<SynthRow> = tokio::task::spawn_blocking(move || {
            (start..end)
                .into_par_iter()
                .map(|i| generate(seed, i, size, captions))
                .collect::<Result<Vec<_>, String>>()
        })
        .await
        .map_err(|e| ShardsError::Join(e.to_string()))?
        .map_err(|e| ShardsError::Config(format!("synth: {e}")))?;
        let labels = StringArray::from_iter_values(rows.iter().map(|r| r.label.as_str()));
        let pass = Arc::new(
            RecordBatch::try_new(schema.clone(), vec![Arc::new(labels)]).map_err(|e| {
                ShardsError::Arrow {
                    file: "synth".into(),
                    source: e,
                }
            })?,
        );
        let mut bytes = 0;
        let raw = rows
            .into_iter()
            .enumerate()
            .map(|(j, r)| {
                bytes += r.jpeg.len() as u64;
                RawRow {
                    index: start + j as u64,
                    source: source.clone(),
                    source_row: start + j as u64,
                    key: r.key,
                    image: Some(Bytes::from(r.jpeg)),
                    caption: RawCaption::Text(r.caption),
                    passthrough: Some((pass.clone(), j)),
                    split: None,
                }
            })
            .collect();
        if tx.send(Ok(RawBatch { rows: raw, bytes })).await.is_err() {
            return Ok(());
        }
        start = end;
    }
    Ok(())
}
