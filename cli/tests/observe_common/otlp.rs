//! An in-process OTLP collector (traces and metrics) and processes started to export to it.

use crate::run_common::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// What the OTLP collector received: (service.name, span name) for spans, (metric name, data)
/// for metrics.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

pub struct Collector(pub Received);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        let mut got = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(
                    |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Any::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    },
                )
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                got.push((service.clone(), span.name.clone()));
                for kv in &span.attributes {
                    got.push((service.clone(), format!("{}.{}", span.name, kv.key)));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Metric names an OTLP metric exporter sent.
pub struct MetricCollector(pub Received);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for MetricCollector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        let mut got = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for rm in req.into_inner().resource_metrics {
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                got.push((m.name.clone(), format!("{:?}", m.data)));
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

pub fn spawn_traced(cmd: &mut Command, endpoint: &str, log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    Proc(
        cmd.env("FERROCLIP_TOKEN", TOKEN)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
            .env_remove("OTEL_SERVICE_NAME")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a traced process"),
    )
}
