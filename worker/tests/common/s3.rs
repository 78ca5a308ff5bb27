//! s3s-fs on 127.0.0.1 for tests that read or write `s3://` URLs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use ferroclip_shards::StoreOptions;

pub const ACCESS_KEY: &str = "ferroclip-test";
pub const SECRET_KEY: &str = "ferroclip-secret";
pub const BUCKET: &str = "bucket";

/// s3s-fs serving a temporary directory; killed on drop.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> S3Server {
        let home = std::env::var_os("HOME").unwrap_or_default();
        let bin = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("s3s-fs"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .chain([Path::new(&home).join(".cargo/bin/s3s-fs")])
            .find(|p| p.is_file())
            .expect("s3s-fs is not installed: run scripts/setup-test-tools");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join(BUCKET)).expect("bucket dir");
        let port = ferroclip_proto::ports::spare_loopback_port().expect("free port");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            s3_endpoint: Some(self.endpoint.clone()),
            allow_http: true,
            ..StoreOptions::default()
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every test here uses the same credentials; set once, before any client exists.
pub fn credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
    });
}
