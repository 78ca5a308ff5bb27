//! ferroclip's coordinator: owns a run's membership, data plan, step commits and checkpoints.
//! Never links libtorch.

pub mod http;
pub mod journal;
pub mod ledger;
pub mod membership;
pub mod metrics;
pub mod otel;
pub mod plan;
pub mod run;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::v1::coordinator_server::CoordinatorServer;
use ferroclip_shards::{open_url, Dataset, StoreOptions};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::journal::Journal;
use crate::run::Run;
use crate::service::{CoordinatorService, Shared};

/// One span per RPC, named after its method in OpenTelemetry; heartbeats only at debug level.
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let method = req.uri().path().rsplit('/').next().unwrap_or("");
    if method == "Heartbeat" {
        tracing::debug_span!("rpc", otel.name = method, rpc.method = method)
    } else {
        tracing::info_span!("rpc", otel.name = method, rpc.method = method)
    }
}

/// How to start a coordinator.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: RunConfig,
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub token: String,
    /// Journal directory URL; default `<run.dir>/journal`.
    pub journal: Option<String>,
    /// Continue from an existing journal (without it, an existing journal is an error).
    pub resume: bool,
    pub store: StoreOptions,
}

/// A running coordinator.
pub struct Handle {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Waits until every worker has left a finished run.
    pub async fn finished(&self) {
        loop {
            if self.shared.run.lock().await.finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Journals and stops serving.
    pub async fn shutdown(self) {
        {
            let run = self.shared.run.lock().await;
            if let Err(e) = self.shared.journal.save(&run.snapshot()).await {
                tracing::error!("final journal write failed: {e}");
            }
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

pub async fn serve(opts: ServeOptions) -> Result<Handle> {
    let cfg = opts.config.clone();
    let dataset = Dataset::open(&cfg.data.root, &opts.store)
        .await
        .with_context(|| format!("opening the dataset {}", cfg.data.root))?;
    let blocks = dataset
        .blocks(&cfg.data.train_split)
        .with_context(|| format!("dataset {} split {}", cfg.data.root, cfg.data.train_split))?;
    if blocks.is_empty() {
        bail!(
            "dataset {} has no blocks in split {:?}",
            cfg.data.root,
            cfg.data.train_split
        );
    }
    let block_rows: Vec<u32> = blocks.iter().map(|b| b.rows).collect();

    let journal_url = opts
        .journal
        .clone()
        .unwrap_or_else(|| format!("{}/journal", cfg.run.dir.trim_end_matches('/')));
    let (store, path) = open_url(&journal_url, &opts.store)
        .with_context(|| format!("journal location {journal_url}"))?;
    let journal = Journal::new(store, &path, &journal_url);

    let mut run = Run::new(cfg.clone(), block_rows);
    match journal.load().await? {
        Some(snap) if opts.resume => run.restore(snap),
        Some(_) => bail!(
            "{} exists: this run directory already holds a run. Pass --resume to continue it, \
             or set run.dir to a new directory",
            journal.url()
        ),
        None => {
            run.event("start", format!("run {} starts", cfg.run.name));
            journal.save(&run.snapshot()).await?;
        }
    }
    let shared = Shared::new(run, journal, opts.token.clone(), opts.store.clone());
    otel::register(&shared);
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let listener = TcpListener::bind(opts.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC address {}", opts.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let svc = CoordinatorServer::new(CoordinatorService::new(shared.clone()));
    let mut stop = rx.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let r = tonic::transport::Server::builder()
            .trace_fn(rpc_span)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("gRPC server stopped: {e}");
        }
    }));

    let http_addr = match opts.http_addr {
        Some(addr) => {
            let (addr, task) = http::serve(addr, shared.clone(), rx.clone()).await?;
            tasks.push(task);
            Some(addr)
        }
        None => None,
    };

    let ticker = shared.clone();
    let mut stop = rx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => ticker.tick().await,
                _ = stop.changed() => return,
            }
        }
    }));
    tracing::info!(%grpc_addr, ?http_addr, "coordinator serving");
    Ok(Handle {
        grpc_addr,
        http_addr,
        shared,
        shutdown,
        tasks,
    })
}

/// Deletes old checkpoints (every object under each URL). Failures are logged, not fatal.
pub async fn delete_checkpoints(urls: Vec<String>, opts: &StoreOptions) {
    for url in urls {
        let result = async {
            let (store, prefix) = open_url(&url, opts)?;
            let objects: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
            for meta in objects {
                store.delete(&meta.location).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => tracing::info!("deleted old checkpoint {url}"),
            Err(e) => tracing::warn!("could not delete old checkpoint {url}: {e:#}"),
        }
    }
}
