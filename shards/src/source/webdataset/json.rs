//! A sample's `.json` as passthrough columns: one per field of the first `.json`, typed by its
//! value; later samples' missing fields or values of another type are null.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::Sample;
use crate::error::ShardsError;

/// Passthrough columns from a sample's `.json`: one per field, typed by its value.
pub(super) fn json_schema(sample: &Sample) -> SchemaRef {
    let Some(obj) = sample
        .members
        .get("json")
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(b).ok())
    else {
        return Arc::new(Schema::empty());
    };
    let fields: Vec<Field> = obj
        .iter()
        .filter(|(name, _)| !crate::writer::is_fixed_column(name))
        .map(|(name, v)| {
            let t = match v {
                serde_json::Value::Bool(_) => DataType::Boolean,
                serde_json::Value::Number(n) if n.is_i64() => DataType::Int64,
                serde_json::Value::Number(_) => DataType::Float64,
                _ => DataType::Utf8,
            };
            Field::new(name, t, true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The passthrough batch of samples' `.json` values (null where missing or of another type).
pub(super) fn json_batch(
    schema: &SchemaRef,
    samples: &[Sample],
) -> Result<Arc<RecordBatch>, ShardsError> {
    let objs: Vec<Option<serde_json::Map<String, serde_json::Value>>> = samples
        .iter()
        .map(|s| {
            s.members
                .get("json")
                .and_then(|b| serde_json::from_slice(b).ok())
        })
        .collect();
    let value = |o: &Option<serde_json::Map<String, serde_json::Value>>, name: &str| {
        o.as_ref().and_then(|o| o.get(name)).cloned()
    };
    let mut columns: Vec<ArrayRef> = Vec::new();
    for f in schema.fields() {
        let name = f.name();
        let col: ArrayRef = match f.data_type() {
            DataType::Boolean => {
                let mut b = BooleanBuilder::new();
                objs.iter()
                    .for_each(|o| b.append_option(value(o, name).and_then(|v| v.as_bool())));
                Arc::new(b.finish())
            }
            DataType::Int64 => {
                let mut b = Int64Builder::new();
                objs.iter()
                    .for_each(|o| b.append_option(value(o, name).and_then(|v| v.as_i64())));
                Arc::new(b.finish())
            }
            DataType::Float64 => {
                let mut b = Float64Builder::new();
                objs.iter()
                    .for_each(|o| b.append_option(value(o, name).and_then(|v| v.as_f64())));
                Arc::new(b.finish())
            }
            _ => {
                let mut b = StringBuilder::new();
                for o in &objs {
                    b.append_option(value(o, name).and_then(|v| match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s),
                        other => Some(other.to_string()),
                    }));
                }
                Arc::new(b.finish())
            }
        };
        columns.push(col);
    }
    let batch = if columns.is_empty() {
        RecordBatch::try_new_with_options(
            schema.clone(),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(samples.len())),
        )
    } else {
        RecordBatch::try_new(schema.clone(), columns)
    };
    batch
        .map(Arc::new)
        .map_err(|e| ShardsError::Config(format!(".json passthrough columns: {e}")))
}
