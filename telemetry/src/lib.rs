//! Logging and tracing for both binaries: pretty logs on a terminal or one JSON object per line
//! (`--log-format json`), filtered by `RUST_LOG`; spans and metrics exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The other
//! standard variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS,
//! OTEL_BSP_*, OTEL_METRIC_EXPORT_INTERVAL) are read by the OpenTelemetry SDK. Without an
//! endpoint no exporter exists and the global meter stays a no-op.

use std::io::IsTerminal;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The `--log-format` flag both binaries take (global: it goes before or after the subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log lines: pretty (a terminal) or json (one object per line); RUST_LOG filters.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "FERROCLIP_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Keeps the exporter alive; dropping it flushes the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
    /// The exporter's gRPC channel lives on its own runtime thread, so callers need none.
    runtime: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

fn otlp_endpoint_set() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

/// Installs the global subscriber. `service` names the process in traces unless
/// OTEL_SERVICE_NAME says otherwise.
pub fn init(service: &'static str, format: LogFormat) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut telemetry = Telemetry {
        provider: None,
        meters: None,
        runtime: None,
    };
    let otel = if otlp_endpoint_set() {
        let (provider, meters, runtime) = start_exporter(service)?;
        let tracer = provider.tracer("ferroclip");
        opentelemetry::global::set_meter_provider(meters.clone());
        telemetry.provider = Some(provider);
        telemetry.meters = Some(meters);
        telemetry.runtime = Some(runtime);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    } else {
        None
    };
    // try_init: tests and embedders may have installed a subscriber already.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(telemetry)
}

type RuntimeHandle = (tokio::sync::oneshot::Sender<()>, JoinHandle<()>);

type Exporters = (
    opentelemetry_otlp::SpanExporter,
    opentelemetry_otlp::MetricExporter,
);

fn start_exporter(
    service: &'static str,
) -> Result<(SdkTracerProvider, SdkMeterProvider, RuntimeHandle)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let built = || -> Result<Exporters> {
                    let spans = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .build()?;
                    let metrics = opentelemetry_otlp::MetricExporter::builder()
                        .with_tonic()
                        .build()?;
                    Ok((spans, metrics))
                };
                let _ = tx.send(built());
                // Drive the exporter's connections until the process shuts telemetry down.
                let _ = stop_rx.await;
            });
        })
        .context("starting the OTLP export thread")?;
    let (spans, metrics) = rx
        .recv()
        .context("the OTLP export thread ended")?
        .context("building the OTLP exporters")?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service);
    }
    let resource = resource.build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let meters = SdkMeterProvider::builder()
        .with_periodic_exporter(metrics)
        .with_resource(resource)
        .build();
    Ok((provider, meters, (stop_tx, thread)))
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("OTLP span export: {e}");
            }
        }
        if let Some(m) = self.meters.take() {
            if let Err(e) = m.shutdown() {
                eprintln!("OTLP metric export: {e}");
            }
        }
        if let Some((stop, thread)) = self.runtime.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
