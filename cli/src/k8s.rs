//! `ferroclip k8s …`: Kubernetes manifests for a run.

mod manifests;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferroclip_proto::config::{Backend, RunConfig};
use std::io::Write;

use manifests::{Kind, RunSpec};

#[derive(Args, Debug)]
pub struct K8sArgs {
    #[command(subcommand)]
    pub command: K8sCommand,
}

#[derive(Subcommand, Debug)]
pub enum K8sCommand {
    /// Print the manifests of a run (multi-document YAML) for `kubectl apply -f -`.
    Render(RenderArgs),
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// The objects that carry the pods: `job` (a coordinator Deployment and a workers' Indexed
    /// Job; any cluster) or `jobset` (one JobSet holding both; needs the JobSet controller,
    /// and is what Kueue admits as one unit).
    #[arg(long, value_enum, default_value = "job")]
    pub kind: Kind,
    /// Kueue LocalQueue to submit to (`kueue.x-k8s.io/queue-name`); the JobSet starts
    /// suspended until Kueue admits it. Needs --kind jobset.
    #[arg(long)]
    pub queue: Option<String>,
    /// PriorityClass of every pod (Kueue orders and preempts queued runs by it).
    #[arg(long)]
    pub priority_class: Option<String>,
    /// Worker pods (one per node).
    #[arg(long)]
    pub workers: u32,
    /// GPUs per worker pod, one worker process each; with --cpu: CPU worker processes per pod.
    #[arg(long, default_value_t = 1)]
    pub gpus_per_worker: u32,
    /// Control-plane image (runs `ferroclip coordinator`).
    #[arg(long, default_value = concat!("ferroclip:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// Worker image (CUDA runtime + libtorch + `ferroclip-worker`).
    #[arg(long, default_value = concat!("ferroclip-worker:", env!("CARGO_PKG_VERSION")))]
    pub worker_image: String,
    /// Dataset root (holds manifest.json) in object storage; replaces `data.root` of the config.
    /// Without it the config's `data.root` or `data.sources` are used (object-store URLs).
    #[arg(long)]
    pub data: Option<String>,
    /// The run's run.toml; it goes into a ConfigMap with every default filled in.
    #[arg(long)]
    pub config: String,
    /// Run directory (journal, checkpoints) in object storage; default: `run.dir` of the config.
    #[arg(long)]
    pub run_dir: Option<String>,
    /// Namespace of every object; default: none (kubectl's current namespace).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Prefix of every object name and the `app.kubernetes.io/instance` label.
    #[arg(long, default_value = "ferroclip")]
    pub run_name: String,
    /// CPU workers (TCP ring all-reduce) instead of GPUs (NCCL).
    #[arg(long)]
    pub cpu: bool,
    /// Start the coordinator with --fresh: start the run over even if its journal holds one.
    /// (Without it a coordinator resumes an existing journal of the same run: a restarted pod
    /// continues unattended.)
    #[arg(long)]
    pub fresh: bool,
    /// Accepted for compatibility: resuming is the default.
    #[arg(long, hide = true)]
    pub resume: bool,
}

pub fn run(args: K8sArgs) -> Result<()> {
    match args.command {
        K8sCommand::Render(args) => {
            let spec = plan(&args)?;
            let yaml = to_yaml(&spec)?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
            Ok(())
        }
    }
}

/// Checks the arguments and the config and turns them into a run spec.
fn plan(args: &RenderArgs) -> Result<RunSpec> {
    check_dns_label("--run-name", &args.run_name, 40)?;
    if let Some(ns) = &args.namespace {
        check_dns_label("--namespace", ns, 63)?;
    }
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if !(1..=16).contains(&args.gpus_per_worker) {
        bail!(
            "--gpus-per-worker must be in 1..=16, got {}",
            args.gpus_per_worker
        );
    }
    if let Some(q) = &args.queue {
        if args.kind != Kind::Jobset {
            bail!("--queue needs --kind jobset: Kueue must admit the coordinator and the workers as one unit");
        }
        check_dns_subdomain("--queue", q)?;
    }
    if let Some(p) = &args.priority_class {
        check_dns_subdomain("--priority-class", p)?;
    }
    check_image("--image", &args.image)?;
    check_image("--worker-image", &args.worker_image)?;
    let mut cfg =
        RunConfig::load(&args.config).with_context(|| format!("--config {}", args.config))?;
    let run_dir = match &args.run_dir {
        Some(dir) => {
            check_store_url("--run-dir", dir)?;
            dir.clone()
        }
        None => {
            check_store_url(&format!("run.dir in {}", args.config), &cfg.run.dir).context(
                "pods share no disk; set run.dir to an object-store URL or pass --run-dir",
            )?;
            cfg.run.dir.clone()
        }
    };
    cfg.run.dir = run_dir.clone();
    match &args.data {
        Some(data) => {
            check_store_url("--data", data)?;
            if !cfg.data.sources.is_empty() {
                bail!(
                    "--data replaces data.root, but {} mixes data.sources: leave out --data",
                    args.config
                );
            }
        }
        None => {
            for (i, s) in cfg.data.sources().iter().enumerate() {
                let what = match cfg.data.sources.is_empty() {
                    true => format!("data.root in {}", args.config),
                    false => format!("data.sources[{i}].root in {}", args.config),
                };
                check_store_url(&what, &s.root)
                    .context("pods share no disk; use object-store URLs or pass --data")?;
            }
        }
    }
    if let Some(data) = &args.data {
        cfg.data.root = Some(data.clone());
    }

    let backend = if args.cpu {
        Backend::Ring
    } else {
        Backend::Nccl
    };
    if cfg.cluster.backend != backend {
        tracing::info!(from = ?cfg.cluster.backend, to = ?backend, "cluster.backend set for the device kind");
        cfg.cluster.backend = backend;
    }
    let procs = args
        .workers
        .checked_mul(args.gpus_per_worker)
        .context("--workers × --gpus-per-worker overflows")?;
    if cfg.cluster.min_workers > procs {
        bail!(
            "cluster.min_workers ({}) in {} exceeds the {procs} worker processes rendered \
             (--workers {} × --gpus-per-worker {}): the run would never start",
            cfg.cluster.min_workers,
            args.config,
            args.workers,
            args.gpus_per_worker
        );
    }
    if cfg.cluster.max_workers < procs {
        tracing::info!(
            from = cfg.cluster.max_workers,
            to = procs,
            "cluster.max_workers raised to the processes rendered"
        );
        cfg.cluster.max_workers = procs;
    }

    Ok(RunSpec {
        kind: args.kind,
        queue: args.queue.clone(),
        priority_class: args.priority_class.clone(),
        run_name: args.run_name.clone(),
        namespace: args.namespace.clone(),
        pods: args.workers,
        procs_per_pod: args.gpus_per_worker,
        cpu: args.cpu,
        image: args.image.clone(),
        worker_image: args.worker_image.clone(),
        run_dir,
        config_toml: format!(
            "# ferroclip run config (rendered by `ferroclip k8s render`; every default filled in)\n{}",
            cfg.to_toml()
        ),
        fresh: args.fresh,
    })
}

/// The objects as one multi-document YAML stream.
fn to_yaml(spec: &RunSpec) -> Result<String> {
    let mut out = format!(
        "# ferroclip run \"{}\" ({}): {} worker pod(s) × {} {} worker process(es); rendered by `ferroclip k8s render`\n",
        spec.run_name,
        match spec.kind {
            Kind::Job => "Deployment + Indexed Job",
            Kind::Jobset => "JobSet",
        },
        spec.pods,
        spec.procs_per_pod,
        if spec.cpu { "CPU" } else { "GPU" }
    );
    for doc in manifests::render(spec) {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&doc).context("serialising a manifest")?);
    }
    Ok(out)
}

/// A DNS-1035 label (Service names must be one): lowercase letters, digits, '-', starting with a letter.
fn check_dns_label(flag: &str, value: &str, max: usize) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && !value.ends_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!(
            "{flag} \"{value}\" is not a valid name: use at most {max} lowercase letters, digits and '-', \
             starting with a letter and not ending with '-'"
        );
    }
    Ok(())
}

fn check_image(flag: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{flag} \"{value}\" is not an image reference");
    }
    Ok(())
}

/// A DNS-1123 subdomain (names of queues and PriorityClasses).
fn check_dns_subdomain(flag: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|part| {
            !part.is_empty()
                && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
    if !ok {
        bail!("{flag} \"{value}\" is not a valid Kubernetes name (lowercase letters, digits, '-' and '.')");
    }
    Ok(())
}

/// Pods share no disk: data and run directory must live in an object store that the store
/// layer opens (its own list of schemes, so render and the pods agree).
fn check_store_url(what: &str, value: &str) -> Result<()> {
    let schemes = ferroclip_shards::store::SHARED_SCHEMES;
    let rest = value
        .split_once("://")
        .filter(|(scheme, _)| schemes.contains(scheme))
        .map(|(_, rest)| rest);
    match rest {
        Some(rest) if !rest.is_empty() && !value.chars().any(char::is_whitespace) => Ok(()),
        _ => bail!(
            "{what} \"{value}\" is not an object-store URL the workers can open ({}): pods share \
             no local disk",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls_are_checked() {
        assert!(check_dns_label("--run-name", "clip-b16", 40).is_ok());
        for bad in ["", "Clip", "1abc", "a_b", "abc-", &"a".repeat(41)] {
            let err = check_dns_label("--run-name", bad, 40)
                .unwrap_err()
                .to_string();
            assert!(err.contains("--run-name"), "{err}");
        }
        assert!(check_store_url("--data", "s3://bucket/ds").is_ok());
        for bad in [
            "data/synth",
            "file:///data",
            "s3://",
            "memory://x",
            "s3://a b",
            "http://host/ds",
            "https://host/ds",
        ] {
            let err = check_store_url("--data", bad).unwrap_err().to_string();
            assert!(
                err.contains("--data") && err.contains("object-store URL"),
                "{err}"
            );
        }
        assert!(check_dns_subdomain("--queue", "team-a.gpu").is_ok());
        for bad in ["", "Team", "a..b", "-a", "a_b"] {
            assert!(check_dns_subdomain("--queue", bad).is_err(), "{bad}");
        }
    }
}
