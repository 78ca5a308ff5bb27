//! The run token: a shared secret every RPC and page presents. Coordinator and workers read it
//! the same way: from a file (a mounted Kubernetes Secret) or the value itself.

/// Shorter tokens are refused: they are guessable.
pub const MIN_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the run token file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("no run token: pass --token-file or set FERROCLIP_TOKEN")]
    Missing,
    #[error("the run token is too short ({0} characters; use at least {MIN_LEN})")]
    TooShort(usize),
}

/// The token from `file` if given, else `value`; surrounding whitespace is dropped.
pub fn resolve(file: Option<&str>, value: Option<&str>) -> Result<String, TokenError> {
    let token = match (file, value) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|source| TokenError::File {
                path: path.to_string(),
                source,
            })?
            .trim()
            .to_string(),
        (None, Some(t)) => t.trim().to_string(),
        (None, None) => return Err(TokenError::Missing),
    };
    if token.len() < MIN_LEN {
        return Err(TokenError::TooShort(token.len()));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_wins_over_the_value_and_is_trimmed() {
        let dir = std::env::temp_dir().join(format!("ferroclip-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        std::fs::write(&path, "from-the-file\n").expect("write");
        let p = path.to_string_lossy().to_string();
        assert_eq!(
            resolve(Some(&p), Some("the-value-1")).expect("ok"),
            "from-the-file"
        );
        assert_eq!(
            resolve(None, Some("  the-value-1 ")).expect("ok"),
            "the-value-1"
        );
        assert!(matches!(resolve(None, None), Err(TokenError::Missing)));
        assert!(matches!(
            resolve(None, Some("short")),
            Err(TokenError::TooShort(5))
        ));
        let missing = dir.join("nope").to_string_lossy().to_string();
        let err = resolve(Some(&missing), None).expect_err("missing file");
        assert!(err.to_string().contains("nope"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
