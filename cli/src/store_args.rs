//! Object-store flags shared by the commands that read datasets or write run directories.

use clap::Args;
use ferroclip_shards::StoreOptions;

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// S3-compatible endpoint (MinIO, Ceph, ...), e.g. http://127.0.0.1:9000. AWS_* variables are read too.
    #[arg(long, env = "FERROCLIP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Allow plain-HTTP endpoints.
    #[arg(long)]
    pub allow_http: bool,
}

impl StoreArgs {
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            allow_http: self.allow_http,
        }
    }
}
