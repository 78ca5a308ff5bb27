//! Embedding files: `.npy` (float32 `[N, D]`, C order) or `.parquet` (an id column, `key` or
//! `text`, and `embedding` as a fixed-size list of float32), chosen by the file's extension.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Npy,
    Parquet,
}

impl Format {
    pub fn from_path(path: &str) -> Result<Self> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".npy") {
            Ok(Format::Npy)
        } else if lower.ends_with(".parquet") {
            Ok(Format::Parquet)
        } else {
            bail!("{path}: the output must end in .npy or .parquet")
        }
    }
}

/// `rows` × `dim` float32 values as a NumPy v1.0 `.npy` file.
pub fn npy(values: &[f32], rows: usize, dim: usize) -> Result<Vec<u8>> {
    if values.len() != rows * dim {
        bail!("{} values are not {rows} x {dim}", values.len());
    }
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to 64 bytes, ending in \n.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let len = u16::try_from(header.len()).context("npy header too long")?;
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// One row per id: `id_column` (string) and `embedding` (fixed-size list of `dim` float32).
pub fn parquet(id_column: &str, ids: &[String], values: &[f32], dim: usize) -> Result<Vec<u8>> {
    if values.len() != ids.len() * dim {
        bail!("{} values are not {} x {dim}", values.len(), ids.len());
    }
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = FixedSizeListArray::try_new(
        item.clone(),
        i32::try_from(dim).context("embedding too wide")?,
        Arc::new(Float32Array::from(values.to_vec())),
        None,
    )?;
    let schema = Arc::new(Schema::new(vec![
        Field::new(id_column, DataType::Utf8, false),
        Field::new(
            "embedding",
            DataType::FixedSizeList(item, dim as i32),
            false,
        ),
    ]));
    let columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(ids.to_vec())), Arc::new(list)];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(buf)
}
