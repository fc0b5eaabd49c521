//! OTLP/gRPC span export, batched and off the I/O path.
//!
//! OpenTelemetry's batch processor exports from its own thread, but the tonic exporter needs a
//! Tokio reactor. [`RuntimeExporter`] gives it one: a one-worker runtime owned by the exporter,
//! entered only for the export call. FUSE threads only push finished spans into the bounded
//! queue; when the collector is slow or gone, the queue fills and spans are dropped, never I/O.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};

/// Default collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4317";

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("starting the span export runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("building the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// An OTLP exporter that carries the Tokio runtime it needs.
#[derive(Debug)]
struct RuntimeExporter {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for RuntimeExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // Called on the batch processor's own thread, never on a FUSE worker.
        let result = self.runtime.block_on(self.inner.export(batch));
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _guard = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Build a tracer provider exporting to `OTEL_EXPORTER_OTLP_ENDPOINT`.
///
/// `sample_ratio` applies to root spans; children follow their parent's decision, so a sampled
/// file session keeps all of its operations.
pub fn tracer_provider(
    resource: Vec<KeyValue>,
    sample_ratio: f64,
) -> Result<SdkTracerProvider, OtlpError> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "interposer-fs".to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(OtlpError::Runtime)?;
    let inner = {
        let _guard = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| OtlpError::Exporter { endpoint, source })?
    };
    let exporter = RuntimeExporter { inner, runtime };
    // The queue's slots are allocated and touched up front (~400 bytes each): 16,384 of them
    // hold a third of a second at 50,000 operations/s and keep an idle daemon small; a full
    // queue drops spans, never I/O.
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(16_384)
        .with_max_export_batch_size(2048)
        .with_scheduled_delay(Duration::from_millis(500))
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build();
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attributes(resource)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            sample_ratio,
        ))))
        .with_resource(resource)
        .build())
}
