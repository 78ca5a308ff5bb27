//! The crate's one error type. Messages name the file/row/column so a user can act on them.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ShardsError {
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("cannot configure the store for {url}: {source}")]
    StoreConfig {
        url: String,
        #[source]
        source: object_store::Error,
    },

    #[error("{}", store_message(.url, .source))]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },

    #[error("{file}: unreadable Parquet: {source}")]
    Parquet {
        file: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    #[error("{file}: {source}")]
    Arrow {
        file: String,
        #[source]
        source: arrow::error::ArrowError,
    },

    #[error("{file}: missing column {column:?} (columns: {available})")]
    MissingColumn {
        file: String,
        column: String,
        available: String,
    },

    #[error("{file}: column {column:?} has type {found}, expected {expected}")]
    ColumnType {
        file: String,
        column: String,
        found: String,
        expected: String,
    },

    #[error("{file}: {message}")]
    BadInput { file: String, message: String },

    #[error("no input rows found in {0}")]
    EmptySource(String),

    #[error("{url}: invalid manifest: {message}")]
    Manifest { url: String, message: String },

    #[error("unknown split {split:?} (splits: {available})")]
    UnknownSplit { split: String, available: String },

    #[error("split {split:?} has {count} blocks; block {block} does not exist")]
    NoSuchBlock {
        split: String,
        block: u32,
        count: usize,
    },

    #[error("invalid option: {0}")]
    Config(String),

    #[error("{0}")]
    Io(#[from] std::io::Error),

    #[error("internal task failed: {0}")]
    Join(String),
}

/// object_store's messages are precise but miss the hint a user needs for auth and network failures.
fn store_message(url: &str, e: &object_store::Error) -> String {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => format!("{url}: not found ({e})"),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => format!(
            "{url}: access denied, check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*): {e}"
        ),
        _ => {
            let text = e.to_string();
            if text.contains("403")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("InvalidAccessKeyId")
            {
                format!("{url}: access denied, check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {text}")
            } else if text.contains("error sending request") || text.contains("onnect") {
                format!("{url}: endpoint unreachable (check --s3-endpoint / network): {text}")
            } else {
                format!("{url}: {text}")
            }
        }
    }
}

impl ShardsError {
    pub(crate) fn store(url: impl Into<String>, source: object_store::Error) -> Self {
        ShardsError::Store {
            url: url.into(),
            source,
        }
    }

    pub(crate) fn parquet(file: impl Into<String>, source: parquet::errors::ParquetError) -> Self {
        ShardsError::Parquet {
            file: file.into(),
            source,
        }
    }

    pub(crate) fn bad_input(file: impl Into<String>, message: impl Into<String>) -> Self {
        ShardsError::BadInput {
            file: file.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = ShardsError> = std::result::Result<T, E>;
