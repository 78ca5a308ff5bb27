//! URLs → object stores. Every input and output of this crate goes through here, so a plain path,
//! `file://`, `s3://`, `gs://`, `az://` and `memory://` all behave the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::error::ShardsError;

/// Settings that URLs alone cannot carry. `AWS_*` (and GCS/Azure) environment variables are read too.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// An S3-compatible endpoint such as `http://127.0.0.1:9000` (MinIO, Ceph, s3s-fs, ...).
    pub s3_endpoint: Option<String>,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
    /// How long reads and writes of a run keep retrying a store that fails transiently (an
    /// outage, a refused connection, 5xx) before giving up (`store.retry_budget_s`).
    pub retry_budget: Duration,
}

/// `store.retry_budget_s`'s default: object stores blink for minutes, not seconds.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(300);

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            s3_endpoint: None,
            allow_http: false,
            retry_budget: DEFAULT_RETRY_BUDGET,
        }
    }
}

/// The object-store flags of every command that reads datasets or writes run directories.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// S3-compatible endpoint (MinIO, Ceph, ...), e.g. http://127.0.0.1:9000. AWS_* variables are read too.
    #[arg(long, global = true, env = "FERROCLIP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Allow plain-HTTP object-store endpoints.
    #[arg(long, global = true, env = "FERROCLIP_ALLOW_HTTP", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_http: bool,
}

impl StoreArgs {
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            allow_http: self.allow_http,
            ..StoreOptions::default()
        }
    }

    /// The same flags as arguments for a child process (the local launcher's workers).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.s3_endpoint {
            out.extend(["--s3-endpoint".to_string(), e.clone()]);
        }
        if self.allow_http {
            out.push("--allow-http".into());
        }
        out
    }
}

/// Opens the store a URL points into and returns it with the object path inside it.
pub fn open_url(
    url: &str,
    opts: &StoreOptions,
) -> Result<(Arc<dyn ObjectStore>, Path), ShardsError> {
    let loc = Location::open(url, opts)?;
    Ok((loc.store, loc.path))
}

/// A store, a path in it, and how to print paths in it for humans.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    /// Printed before an object path, e.g. `s3://bucket/` or `/`.
    display_prefix: String,
}

/// The schemes of stores that every machine of a cluster reaches (not `file://` or `memory://`):
/// what `k8s render` accepts for data and run directories.
pub const SHARED_SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "azure", "abfs"];

impl Location {
    pub fn open(url: &str, opts: &StoreOptions) -> Result<Location, ShardsError> {
        let bad = |reason: &str| ShardsError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return local(url);
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let path = Path::from(key.trim_end_matches('/'));
        let config = |e| ShardsError::StoreConfig {
            url: url.to_string(),
            source: e,
        };
        if !matches!(scheme, "file" | "memory") {
            tls_provider();
        }
        let store: Arc<dyn ObjectStore> = match scheme {
            "file" => return local(rest),
            "memory" => memory_store(bucket),
            "s3" | "s3a" => {
                if bucket.is_empty() {
                    return Err(bad("no bucket name"));
                }
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry_config())
                    .with_client_options(client_options(opts.allow_http));
                if let Some(endpoint) = &opts.s3_endpoint {
                    // Path-style requests: local S3-compatible servers have no per-bucket DNS names.
                    b = b.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
                }
                if opts.allow_http {
                    b = b.with_allow_http(true);
                }
                Arc::new(b.build().map_err(config)?)
            }
            "gs" => {
                if bucket.is_empty() {
                    return Err(bad("no bucket name"));
                }
                let b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry_config())
                    .with_client_options(client_options(opts.allow_http));
                Arc::new(b.build().map_err(config)?)
            }
            "az" | "azure" | "abfs" => {
                if bucket.is_empty() {
                    return Err(bad("no container name"));
                }
                let b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_retry(retry_config())
                    .with_client_options(client_options(opts.allow_http));
                Arc::new(b.build().map_err(config)?)
            }
            other => return Err(bad(&format!("unsupported scheme {other:?} (use a path, file://, s3://, gs://, az:// or memory://)"))),
        };
        Ok(Location {
            store,
            path,
            display_prefix: format!("{scheme}://{bucket}/"),
        })
    }

    /// The object `rel` (may contain `/`) below this location.
    pub fn join(&self, rel: &str) -> Location {
        Location {
            store: self.store.clone(),
            path: join_path(&self.path, rel),
            display_prefix: self.display_prefix.clone(),
        }
    }

    /// Another path in the same store.
    pub fn with_path(&self, path: Path) -> Location {
        Location {
            store: self.store.clone(),
            path,
            display_prefix: self.display_prefix.clone(),
        }
    }

    /// The file behind a path of this store, when the store is the local file system.
    pub fn local_file(&self, path: &Path) -> Option<std::path::PathBuf> {
        (self.display_prefix == "/").then(|| std::path::PathBuf::from(format!("/{path}")))
    }

    /// Makes a just-written object durable where that is up to us: on the local file system,
    /// the file and its directory are fsynced (object stores acknowledge durable writes).
    pub fn sync(&self, path: &Path) -> std::io::Result<()> {
        let Some(file) = self.local_file(path) else {
            return Ok(());
        };
        std::fs::File::open(&file)?.sync_all()?;
        if let Some(dir) = file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// A human-readable URL of a path in this store.
    pub fn display(&self, path: &Path) -> String {
        format!("{}{}", self.display_prefix, path)
    }

    pub fn url(&self) -> String {
        self.display(&self.path)
    }

    /// `path` relative to this location (for paths found by listing it).
    pub fn relative(&self, path: &Path) -> String {
        match path.prefix_match(&self.path) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.to_string(),
        }
    }
}

pub fn join_path(base: &Path, rel: &str) -> Path {
    let base = base.as_ref();
    if base.is_empty() {
        Path::from(rel)
    } else {
        Path::from(format!("{base}/{rel}"))
    }
}

fn local(path: &str) -> Result<Location, ShardsError> {
    let bad = |reason: String| ShardsError::BadUrl {
        url: path.to_string(),
        reason,
    };
    let p = std::path::Path::new(path);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let abs = normalize(&abs);
    let object_path = Path::from_absolute_path(&abs).map_err(|e| bad(e.to_string()))?;
    Ok(Location {
        store: Arc::new(LocalFileSystem::new()),
        path: object_path,
        display_prefix: "/".to_string(),
    })
}

/// The form `Location::url` prints for `url`: local paths (plain or `file://`) made absolute and
/// normalised against the current directory, object-store URLs unchanged.
pub fn canonical_url(url: &str) -> String {
    let path = match url.split_once("://") {
        Some(("file", rest)) => rest,
        Some(_) => return url.to_string(),
        None => url,
    };
    let p = std::path::Path::new(path);
    let abs = match (p.is_absolute(), std::env::current_dir()) {
        (true, _) => p.to_path_buf(),
        (false, Ok(cwd)) => cwd.join(p),
        (false, Err(_)) => return url.to_string(),
    };
    let mut out = normalize(&abs).to_string_lossy().into_owned();
    if url.ends_with('/') && !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// Removes `.` and `..` without touching the file system (the path may not exist yet).
fn normalize(p: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `memory://NAME/...` URLs share one in-process store per NAME, so a build and a later read meet.
fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

/// reqwest is built without a default TLS crypto provider (see Cargo.toml): ring serves the
/// whole process. Installing twice is harmless; the first wins.
fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Fail in seconds, not minutes, on an unreachable endpoint or refused credentials.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

fn client_options(allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(120))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An https endpoint makes the store build a TLS client (ring, installed by `open`) and
    /// sign a request; a closed port then gives an error, never a panic.
    #[tokio::test]
    async fn https_endpoints_get_a_working_tls_client() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        let opts = StoreOptions {
            s3_endpoint: Some("https://127.0.0.1:9".into()),
            ..StoreOptions::default()
        };
        let loc = Location::open("s3://bucket/key", &opts).unwrap();
        use object_store::ObjectStoreExt;
        let err = loc.store.head(&loc.path).await.unwrap_err().to_string();
        assert!(
            err.contains("127.0.0.1") || err.to_lowercase().contains("connect"),
            "{err}"
        );
    }

    #[test]
    fn local_paths_are_absolute_and_normalized() {
        let loc = Location::open("/tmp/a/../b/", &StoreOptions::default()).unwrap();
        assert_eq!(loc.path.as_ref(), "tmp/b");
        assert_eq!(loc.url(), "/tmp/b");
        let loc = Location::open("file:///tmp/c", &StoreOptions::default()).unwrap();
        assert_eq!(loc.path.as_ref(), "tmp/c");
        assert_eq!(
            loc.join("train/x.parquet").path.as_ref(),
            "tmp/c/train/x.parquet"
        );
    }

    #[test]
    fn remote_urls_split_bucket_and_key() {
        let opts = StoreOptions {
            s3_endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
            ..StoreOptions::default()
        };
        let loc = Location::open("s3://bucket/some/prefix/", &opts).unwrap();
        assert_eq!(loc.path.as_ref(), "some/prefix");
        assert_eq!(loc.url(), "s3://bucket/some/prefix");
        let err = Location::open("ftp://x/y", &opts).unwrap_err().to_string();
        assert!(err.contains("unsupported scheme"), "{err}");
        let err = Location::open("s3:///y", &opts).unwrap_err().to_string();
        assert!(err.contains("no bucket"), "{err}");
    }

    /// `k8s render` trusts this list: every scheme in it is one `open` knows.
    #[test]
    fn every_shared_scheme_is_one_open_knows() {
        for scheme in SHARED_SCHEMES {
            match Location::open(&format!("{scheme}://bucket/x"), &StoreOptions::default()) {
                Ok(_) => {}
                Err(e) => assert!(
                    !e.to_string().contains("unsupported scheme"),
                    "{scheme}: {e}"
                ),
            }
        }
        let e = Location::open("http://host/x", &StoreOptions::default()).err();
        assert!(e.is_some_and(|e| e.to_string().contains("unsupported scheme")));
    }

    #[test]
    fn memory_urls_share_a_store_by_name() {
        let a = Location::open("memory://t1/x", &StoreOptions::default()).unwrap();
        let b = Location::open("memory://t1/y", &StoreOptions::default()).unwrap();
        assert!(Arc::ptr_eq(&a.store, &b.store));
    }
}
