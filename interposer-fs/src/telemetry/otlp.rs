//! OTLP/gRPC span export, batched and off the I/O path.
//!
//! OpenTelemetry's batch processor exports from its own thread: FUSE threads only push
//! finished spans into its bounded queue; when the collector is slow or gone, the queue fills
//! and spans are dropped, never I/O. [`GrpcExporter`] encodes each batch itself
//! (`otlp_wire`) and sends the bytes as a unary gRPC call on a one-worker Tokio runtime it
//! owns, entered only for the call.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};
use parking_lot::Mutex;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::Bytes;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::otlp_wire;
use crate::layers::metrics::SpanCounters;

/// Default collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4317";

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// A batch is given up after this long, retries included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a batch the collector could not take, as the OTLP specification recommends:
/// backing off from 100 ms, doubling.
const RETRIES: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("starting the span export runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the OTLP endpoint {endpoint:?} is not a valid URI: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Sends each batch, encoded by [`otlp_wire::Encoder`], to the collector's TraceService.
struct GrpcExporter {
    channel: Channel,
    runtime: tokio::runtime::Runtime,
    resource: Resource,
    encoder: Mutex<otlp_wire::Encoder>,
    spans: SpanCounters,
}

impl std::fmt::Debug for GrpcExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcExporter")
    }
}

impl GrpcExporter {
    async fn send(&self, body: Bytes) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            let mut client = tonic::client::Grpc::new(self.channel.clone());
            let call = async {
                client
                    .ready()
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let request = tonic::Request::new(body.clone());
                client
                    .unary(request, PathAndQuery::from_static(EXPORT), RawCodec)
                    .await
            };
            let status = match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status)) => status,
                Err(_) => return Err(Status::deadline_exceeded("OTLP export timed out")),
            };
            attempt += 1;
            if attempt > RETRIES || !retryable(status.code()) {
                return Err(status);
            }
            if tokio::time::Instant::now() + backoff >= deadline {
                return Err(status);
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}

/// The codes the OTLP specification calls transient.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

impl SpanExporter for GrpcExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // Called on the batch processor's own thread, never on a FUSE worker.
        let body = Bytes::copy_from_slice(self.encoder.lock().request(&self.resource, &batch));
        let n = batch.len() as u64;
        drop(batch);
        let result = self.runtime.block_on(self.send(body));
        let outcome = if result.is_ok() {
            &self.spans.exported
        } else {
            &self.spans.failed
        };
        outcome.inc_by(n);
        std::future::ready(
            result.map_err(|s| OTelSdkError::InternalFailure(format!("OTLP export: {s}"))),
        )
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }
}

/// A gRPC codec for bytes already encoded: the request goes out as is, the reply (an
/// `ExportTraceServiceResponse`) is read and let go.
#[derive(Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        let n = bytes::Buf::remaining(src);
        bytes::Buf::advance(src, n);
        Ok(Some(()))
    }
}

/// Build a tracer provider exporting to `OTEL_EXPORTER_OTLP_ENDPOINT`. It records every span
/// it is asked for: the trace layer samples before it asks (`trace.sampleRatio`).
/// What it exports, or fails to, is counted in `spans`.
pub fn tracer_provider(
    resource: Vec<KeyValue>,
    spans: SpanCounters,
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
    let channel = {
        let _guard = runtime.enter();
        Endpoint::from_shared(endpoint.clone())
            .map_err(|source| OtlpError::Endpoint { endpoint, source })?
            .timeout(TIMEOUT)
            .connect_lazy()
    };
    let exporter = GrpcExporter {
        channel,
        runtime,
        resource: Resource::builder_empty().build(),
        encoder: Mutex::new(otlp_wire::Encoder::default()),
        spans,
    };
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
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(resource)
        .build())
}
