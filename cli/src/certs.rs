//! `ferroclip certs --out DIR --hosts NAME,…`: a self-signed CA and the certificates of a
//! cluster or a local run (ECDSA P-256, rcgen on ring): `ca.pem`, `server.pem` +
//! `server-key.pem` (the coordinator, valid for `--hosts`), `worker.pem` + `worker-key.pem`
//! (a client certificate for mutual TLS). Keys are written owner-only (0600). The CA's key is
//! not kept: to issue more certificates, run the command again (or use cert-manager,
//! k8s/README.md).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Directory to write ca.pem, server.pem, server-key.pem, worker.pem, worker-key.pem into.
    #[arg(long)]
    pub out: PathBuf,
    /// Names (DNS names or IP addresses) the coordinator is reached by, comma-separated, e.g.
    /// ferroclip-coordinator,ferroclip-coordinator.default.svc,127.0.0.1.
    #[arg(long, value_delimiter = ',', required = true)]
    pub hosts: Vec<String>,
    /// Validity of the certificates in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// For tests: certificates that expired yesterday.
    #[arg(long, hide = true)]
    pub expired: bool,
}

/// Where `generate` wrote the files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub server: PathBuf,
    pub server_key: PathBuf,
    pub worker: PathBuf,
    pub worker_key: PathBuf,
}

impl CertFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            server: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            worker: dir.join("worker.pem"),
            worker_key: dir.join("worker-key.pem"),
        }
    }
}

pub fn run(args: CertsArgs) -> Result<()> {
    let files = CertFiles::in_dir(&args.out);
    if !args.force {
        for p in [
            &files.ca,
            &files.server,
            &files.server_key,
            &files.worker,
            &files.worker_key,
        ] {
            if p.exists() {
                bail!("{} exists (pass --force to overwrite)", p.display());
            }
        }
    }
    let validity = if args.expired {
        Validity::Expired
    } else {
        Validity::Days(args.days)
    };
    generate(&args.out, &args.hosts, validity)?;
    println!(
        "wrote {}, {}, {}, {}, {} (server valid for {})",
        files.ca.display(),
        files.server.display(),
        files.server_key.display(),
        files.worker.display(),
        files.worker_key.display(),
        args.hosts.join(", ")
    );
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub enum Validity {
    Days(u32),
    Expired,
}

fn params(names: Vec<String>, cn: &str, validity: Validity) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(names.clone())
        .with_context(|| format!("certificate names {names:?}"))?;
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    match validity {
        Validity::Days(d) => {
            if d == 0 {
                bail!("--days must be at least 1");
            }
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(i64::from(d));
        }
        Validity::Expired => {
            p.not_before = now - time::Duration::days(30);
            p.not_after = now - time::Duration::days(1);
        }
    }
    Ok(p)
}

/// Writes a new CA and the server and worker certificates into `dir`.
pub fn generate(dir: &Path, hosts: &[String], validity: Validity) -> Result<CertFiles> {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        bail!("--hosts names no host");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = CertFiles::in_dir(dir);

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    // A name of its own: a client trusting another ferroclip CA then reports an unknown
    // issuer, not a bad signature.
    let ca_name = format!("ferroclip CA {:08x}", rand::random::<u32>());
    let mut ca = params(Vec::new(), &ca_name, validity)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().context("generating the server key")?;
    let mut server = params(hosts.clone(), &hosts[0], validity)?;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .context("signing the server certificate")?;

    let worker_key = KeyPair::generate().context("generating the worker key")?;
    let mut worker = params(
        vec!["ferroclip-worker".into()],
        "ferroclip-worker",
        validity,
    )?;
    worker.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    worker.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let worker_cert = worker
        .signed_by(&worker_key, &issuer)
        .context("signing the worker certificate")?;

    write(&files.ca, ca_cert.pem().as_bytes(), false)?;
    write(&files.server, server_cert.pem().as_bytes(), false)?;
    write(
        &files.server_key,
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    write(&files.worker, worker_cert.pem().as_bytes(), false)?;
    write(
        &files.worker_key,
        worker_key.serialize_pem().as_bytes(),
        true,
    )?;
    Ok(files)
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}
