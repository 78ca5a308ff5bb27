//! ferroclip's coordinator: owns a run's membership, data plan, step commits and checkpoints.
//! Never links libtorch.

pub mod fault;
pub mod http;
pub mod journal;
pub mod liveness;
pub mod login;
pub mod membership;
pub mod metrics;
pub mod otel;
pub mod run;
pub mod service;
pub mod stats;
pub mod tls;
pub mod wire;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferroclip_plan::{EpochPlan, Source};
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::v1::coordinator_server::CoordinatorServer;
use ferroclip_shards::store::Location;
use ferroclip_shards::{Dataset, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::journal::{Journal, JournalError};
use crate::run::Run;
use crate::service::{CoordinatorService, Shared};
use crate::writer::Writer;

/// One span per RPC, named after its method in OpenTelemetry; heartbeats only at debug level.
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let method = req.uri().path().rsplit('/').next().unwrap_or("");
    if method == "Heartbeat" {
        tracing::debug_span!("rpc", otel.name = method, rpc.method = method)
    } else {
        tracing::info_span!("rpc", otel.name = method, rpc.method = method)
    }
}

/// Connections waiting to be accepted: thousands of workers connect at once when a job starts,
/// and a SYN dropped from a full queue is retried only after a second or more.
const ACCEPT_BACKLOG: u32 = 4096;

/// Accepted connections without Nagle: an answer written in several segments otherwise waits
/// for the client's delayed ACK (40 ms) before its last one leaves.
fn no_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.inspect(|s| {
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY: {e}");
                }
            })
        },
    )
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// How to start a coordinator.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: RunConfig,
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    /// The heartbeat port's address (`liveness`); None: the gRPC address's IP, any free port.
    pub heartbeat_addr: Option<SocketAddr>,
    /// The worker token: Join and every member RPC.
    pub token: String,
    /// The read-only viewer token (`/`, `/metrics`, `/api/status`, Status). Without one the
    /// worker token grants viewing too.
    pub viewer_token: Option<String>,
    /// TLS on both ports; plaintext without it.
    pub tls: Option<tls::ServerTls>,
    /// Journal directory URL; default `<run.dir>/journal`.
    pub journal: Option<String>,
    /// Start the run over even if the journal holds one (default: an existing journal of this
    /// run is resumed, so a restarted coordinator continues unattended).
    pub fresh: bool,
    pub store: StoreOptions,
}

/// A running coordinator.
pub struct Handle {
    pub grpc_addr: SocketAddr,
    pub heartbeat_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Waits until the run is finished.
    pub async fn finished(&self) {
        loop {
            if self.shared.run.lock().await.finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn is_finished(&self) -> bool {
        self.shared.run.lock().await.finished()
    }

    /// Resolves when this coordinator has lost its journal (another coordinator took it, or
    /// its store stayed down beyond `store.retry_budget_s`): it no longer acknowledges
    /// anything and should exit.
    pub async fn fatal(&self) -> String {
        self.shared.fatal().await
    }

    /// Journals (marking the journal released, so the next coordinator need not wait out a
    /// lease) and stops serving.
    pub async fn shutdown(mut self) {
        self.shared.shutdown_journal().await;
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

impl Drop for Handle {
    /// Without `shutdown`, serving and journaling stop at once, as in a crash (in-process tests
    /// use this to kill a coordinator).
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Every source's train-split block sizes with its weight, in `data.sources` order.
async fn open_sources(cfg: &RunConfig, store: &StoreOptions) -> Result<Vec<Source>> {
    let split = &cfg.data.train_split;
    let mut out = Vec::new();
    for (i, src) in cfg.data.sources().into_iter().enumerate() {
        let dataset = Dataset::open(&src.root, store)
            .await
            .with_context(|| format!("opening the dataset {} (data source {i})", src.root))?;
        let blocks = dataset
            .blocks(split)
            .with_context(|| format!("dataset {} split {split}", src.root))?;
        if blocks.is_empty() {
            bail!("dataset {} has no blocks in split {split:?}", src.root);
        }
        out.push(Source {
            block_rows: blocks.iter().map(|b| b.rows).collect(),
            weight: src.weight,
        });
    }
    Ok(out)
}

/// Says at start how a mixed plan's epochs end: when the sources' sizes are not in the ratio
/// of their weights, the relatively smaller one runs out first and the tail holds the others.
fn log_mix(run: &mut Run, sources: &[Source]) {
    let roots = run.config.data.sources();
    if roots.len() < 2 {
        return;
    }
    let (seed, window) = (run.config.run.seed, run.config.data.shuffle_window_blocks);
    let plan = EpochPlan::mixed(seed, 0, sources, window);
    let (unmixed, len) = (plan.unmixed_rows(), plan.len().max(1));
    let share = 100.0 * unmixed as f64 / len as f64;
    let names: Vec<String> = roots
        .iter()
        .map(|s| format!("{} (weight {})", s.root, s.weight))
        .collect();
    if unmixed * 100 > len {
        let message = format!(
            "data.sources: the sources' sizes are not in the ratio of their weights: the last {unmixed} of {len} samples of each epoch ({share:.1} %) come from fewer than all of {}",
            names.join(", ")
        );
        tracing::warn!(unmixed, epoch = len, "{message}");
        run.event("data", message);
    } else {
        run.event(
            "data",
            format!(
                "mixing {} over the whole epoch ({len} samples)",
                names.join(", ")
            ),
        );
    }
}

pub async fn serve(opts: ServeOptions) -> Result<Handle> {
    let cfg = opts.config.clone();
    let sources = open_sources(&cfg, &opts.store).await?;

    let journal_url = opts
        .journal
        .clone()
        .unwrap_or_else(|| format!("{}/journal", cfg.run.dir.trim_end_matches('/')));
    let budget = Duration::from_secs_f64(cfg.store.retry_budget_s);
    let store = StoreOptions {
        retry_budget: budget,
        ..opts.store.clone()
    };
    let dir = Location::open(&journal_url, &store)
        .with_context(|| format!("journal location {journal_url}"))?;
    let mut journal = Journal::new(dir, budget);
    let mut run = Run::mixed(cfg.clone(), sources.clone());
    log_mix(&mut run, &sources);
    match journal.claim(opts.fresh).await? {
        Some(loaded) => {
            if let Some(why) = run.identity.mismatch(&loaded.snapshot.identity) {
                return Err(JournalError::OtherRun {
                    url: journal.url(),
                    why,
                }
                .into());
            }
            let t = std::time::Instant::now();
            let records = loaded.records.len();
            run.restore(loaded.snapshot)
                .and_then(|()| run.replay(&loaded.records))
                .map_err(|detail| JournalError::Corrupt {
                    url: journal.url(),
                    detail,
                })?;
            tracing::info!(
                step = run.ledger.committed_step(),
                records,
                load_s = loaded.read_s + t.elapsed().as_secs_f64(),
                "journal loaded"
            );
        }
        None if opts.fresh => run.event(
            "start",
            format!(
                "run {} starts over (--fresh) in {}",
                cfg.run.name,
                journal.url()
            ),
        ),
        None => run.event("start", format!("run {} starts", cfg.run.name)),
    }
    journal.prune().await;
    // Our first entry is a compaction of the resumed state: replay never crosses owners.
    run.take_records();
    let first = writer::Batch {
        records: Vec::new(),
        snapshot: Some(run.snapshot()),
        summary: run.summary(),
        released: false,
    };
    let (writer, writer_task) = Writer::spawn(journal, first, budget);
    // The claim is complete once our first snapshot is durable: fail fast if another
    // coordinator won the race, or the store is down beyond the budget.
    writer
        .durable(1, budget + Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("{journal_url}: {e}"))?;
    let shared = Shared::new(
        run,
        writer,
        journal_url,
        opts.token.clone(),
        opts.viewer_token.clone(),
        store,
    );
    otel::register(&shared);
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = vec![writer_task];

    let listener = listen(opts.grpc_addr)
        .with_context(|| format!("binding gRPC address {}", opts.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let svc = CoordinatorServer::new(CoordinatorService::new(shared.clone()));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder
            .tls_config(tls.grpc_config())
            .context("the gRPC port's TLS configuration")?;
    } else {
        tracing::warn!(
            "serving gRPC and HTTP in plaintext: tokens travel unencrypted (pass --tls-cert and --tls-key)"
        );
    }
    let mut stop = rx.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = no_delay(listener);
        let r = builder
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

    let heartbeat_addr = opts
        .heartbeat_addr
        .unwrap_or_else(|| SocketAddr::new(grpc_addr.ip(), 0));
    let (heartbeat_addr, task) = liveness::serve(
        heartbeat_addr,
        shared.clone(),
        opts.tls.as_ref(),
        rx.clone(),
    )
    .await?;
    tasks.push(task);

    let http_addr = match opts.http_addr {
        Some(addr) => {
            let (addr, task) =
                http::serve(addr, shared.clone(), opts.tls.as_ref(), rx.clone()).await?;
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
    tracing::info!(%grpc_addr, %heartbeat_addr, ?http_addr, tls = opts.tls.is_some(), "coordinator serving");
    Ok(Handle {
        grpc_addr,
        heartbeat_addr,
        http_addr,
        shared,
        shutdown,
        tasks,
    })
}
