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
            // A request that never got an answer has no status: checked first, since its text
            // holds timings ("in 365.440349ms") that may contain "403".
            if text.contains("error sending request") || text.contains("onnect") {
                format!("{url}: endpoint unreachable (check --s3-endpoint / network): {text}")
            } else if has_number(&text, "403")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("InvalidAccessKeyId")
            {
                format!("{url}: access denied, check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {text}")
            } else {
                format!("{url}: {text}")
            }
        }
    }
}

/// Whether `text` holds `number` as a number of its own (an HTTP status), not inside another
/// one such as a duration.
fn has_number(text: &str, number: &str) -> bool {
    text.match_indices(number).any(|(i, m)| {
        let before = text[..i].chars().next_back();
        let mut after = text[i + m.len()..].chars();
        let (next, then) = (after.next(), after.next());
        // "1.403" and "14035" are other numbers; "403." ends a sentence.
        let digits_before = before.is_some_and(|c| c.is_ascii_digit() || c == '.');
        let digits_after = next.is_some_and(|c| c.is_ascii_digit())
            || (next == Some('.') && then.is_some_and(|c| c.is_ascii_digit()));
        !digits_before && !digits_after
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(text: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: text.into(),
        }
    }

    #[test]
    fn a_refused_connection_is_unreachable_whatever_its_timings_say() {
        // CI saw this one called "access denied": "365.440349ms" holds "403".
        let e = generic(
            "Error performing GET http://127.0.0.1:35799/bucket/ds/manifest.json in \
             365.440349ms, after 3 retries - HTTP error: error sending request",
        );
        let m = store_message("s3://bucket/ds/manifest.json", &e);
        assert!(m.contains("endpoint unreachable"), "{m}");
        let e = generic("Error performing GET http://h/b/k in 1.403s - server returned 500");
        assert!(!store_message("s3://b/k", &e).contains("access denied"));
    }

    #[test]
    fn a_403_status_is_access_denied() {
        let e = generic("Client error with status 403 Forbidden: <Error><Code>AccessDenied</Code>");
        let m = store_message("s3://b/k", &e);
        assert!(m.contains("access denied, check the credentials"), "{m}");
        assert!(has_number("status 403.", "403") && has_number("(403)", "403"));
        assert!(!has_number("in 14035ms", "403") && !has_number("1.403s", "403"));
        assert!(!has_number("403.5 ms", "403"));
    }
}
