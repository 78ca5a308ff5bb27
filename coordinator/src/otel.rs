//! The /metrics families as OpenTelemetry instruments, so an OTLP collector receives the same
//! figures as Prometheus. They are registered on the global meter provider, which is a no-op
//! unless the telemetry setup installed an OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use opentelemetry::metrics::AsyncInstrument;
use opentelemetry::KeyValue;

use crate::metrics::{samples, FAMILIES};
use crate::service::Shared;

pub fn register(shared: &Arc<Shared>) {
    let meter = opentelemetry::global::meter("ferroclip-coordinator");
    for &(name, kind, help) in FAMILIES {
        let shared = shared.clone();
        let observe = move |obs: &dyn AsyncInstrument<f64>| {
            // Collection runs on the SDK's thread: skip a round rather than wait for the lock.
            let Ok(run) = shared.run.try_lock() else {
                return;
            };
            let service = crate::metrics::Service {
                rejected: shared.rejected.load(Ordering::Relaxed),
                journal_store_wait_s: shared.store_wait_s(),
            };
            for s in samples(&run, service)
                .into_iter()
                .filter(|s| s.name == name)
            {
                let attrs: Vec<KeyValue> = s
                    .labels
                    .into_iter()
                    .map(|(k, v)| KeyValue::new(k, v))
                    .collect();
                obs.observe(s.value, &attrs);
            }
        };
        // The SDK keeps the callbacks; the instrument handles need not be held.
        if kind == "counter" {
            meter
                .f64_observable_counter(name)
                .with_description(help)
                .with_callback(observe)
                .build();
        } else {
            meter
                .f64_observable_gauge(name)
                .with_description(help)
                .with_callback(observe)
                .build();
        }
    }
}
