//! OTLP/gRPC span export, batched and off the I/O path.
//!
//! FUSE workers only push finished spans ([`SpanRecord`]) into a bounded [`SpanQueue`]; when
//! the collector is slow or gone, the queue fills and spans are dropped (and counted), never
//! I/O. The queue keeps its spans in segments of one batch. One export thread of its own takes
//! a segment at a time (so the spans in memory never exceed the queue's bound plus the batch
//! being sent), encodes it itself (`otlp_wire`) and sends the bytes as one unary gRPC call,
//! driving a single-threaded Tokio runtime only for the call. The OpenTelemetry SDK is not
//! used: it cost each span a heap object built on the worker and dropped on its batch thread,
//! measured as most of what tracing cost the daemon.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::Bytes;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::otlp_wire;
use super::span::{Attribute, SpanRecord, Value};
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
/// Spans sent in one call.
const BATCH: usize = 2048;
/// Spans held while the export thread is busy; beyond this they are dropped. A third of a
/// second at 50,000 operations/s.
const QUEUE: usize = 16_384;
/// The longest a span waits for a batch to fill.
const DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("starting the span export runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("starting the span export thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the OTLP endpoint {endpoint:?} is not a valid URI: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Where the trace layer leaves finished spans for the export thread.
pub struct SpanQueue {
    state: Mutex<QueueState>,
    /// Wakes the export thread: on the first span after it emptied the queue, on a full
    /// batch, and at shutdown.
    wake: Condvar,
    counters: SpanCounters,
}

#[derive(Default)]
struct QueueState {
    /// Oldest first; each holds at most `BATCH` spans and has room for that many, and only
    /// the last is not full.
    segments: VecDeque<Vec<SpanRecord>>,
    /// Spans in `segments`.
    len: usize,
    /// Sent batches' emptied vectors, for the next segments. Vectors are recycled, never
    /// freed: freeing and allocating them again from the FUSE workers' own allocator arenas
    /// let the daemon's resident memory grow to twice the queue's worth. So there are never
    /// more than the queue's segments plus the batch in flight.
    free: Vec<Vec<SpanRecord>>,
    /// Set at shutdown: the last spans must be sent by then.
    closing: Option<Instant>,
}

impl SpanQueue {
    fn new(counters: SpanCounters) -> Self {
        SpanQueue {
            state: Mutex::default(),
            wake: Condvar::new(),
            counters,
        }
    }

    /// Queue a finished span, or drop it if the queue is full. Never blocks for longer than
    /// a push onto a vector (and, once per batch, taking a segment).
    pub fn push(&self, span: SpanRecord) {
        self.counters.recorded.inc();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.len >= QUEUE {
            drop(guard);
            self.counters.dropped.inc();
            return;
        }
        let full = match state.segments.back_mut() {
            Some(segment) if segment.len() < BATCH => {
                segment.push(span);
                segment.len() == BATCH
            }
            _ => {
                let mut segment = state
                    .free
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(BATCH));
                segment.push(span);
                let full = segment.len() == BATCH;
                state.segments.push_back(segment);
                full
            }
        };
        state.len += 1;
        let first = state.len == 1;
        drop(guard);
        if first || full {
            self.wake.notify_one();
        }
    }

    /// Wait until there is a batch to send (full, or `DELAY` after this thread found the queue
    /// not empty) or the queue is closing, then hand over the oldest segment as `batch`, whose
    /// vector (emptied by the caller) is kept for reuse. Returns when the queue closes, by
    /// which time the spans must be sent, if it is closing; `batch` is then empty once the
    /// queue is.
    fn take(&self, batch: &mut Vec<SpanRecord>) -> Option<Instant> {
        let mut state = self.state.lock();
        while state.len == 0 && state.closing.is_none() {
            self.wake.wait(&mut state);
        }
        if state.len < BATCH && state.closing.is_none() {
            self.wake.wait_for(&mut state, DELAY);
        }
        if let Some(segment) = state.segments.pop_front() {
            state.len -= segment.len();
            let sent = std::mem::replace(batch, segment);
            if sent.capacity() >= BATCH {
                state.free.push(sent);
            }
        }
        state.closing
    }
}

/// The export thread and the queue it drains.
pub struct SpanExport {
    queue: Arc<SpanQueue>,
    /// Disconnected when the export thread has ended.
    ended: mpsc::Receiver<()>,
}

impl SpanExport {
    /// Start exporting to `OTEL_EXPORTER_OTLP_ENDPOINT`, as `OTEL_SERVICE_NAME` with the
    /// resource attributes `resource`. Spans sent, or not, are counted in `counters`.
    pub fn start(resource: Vec<Attribute>, counters: SpanCounters) -> Result<Self, OtlpError> {
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .map_or(Value::Static("interposer-fs"), |s| Value::Shared(s.into()));
        let runtime = tokio::runtime::Builder::new_current_thread()
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
        let mut attributes = vec![
            ("service.name", service),
            ("telemetry.sdk.name", Value::Static("interposer-fs")),
            ("telemetry.sdk.language", Value::Static("rust")),
            (
                "telemetry.sdk.version",
                Value::Static(env!("CARGO_PKG_VERSION")),
            ),
        ];
        attributes.extend(resource);
        let queue = Arc::new(SpanQueue::new(counters.clone()));
        let exporter = GrpcExporter {
            channel,
            runtime,
            resource: attributes,
            encoder: otlp_wire::Encoder::default(),
            counters,
        };
        let (done, ended) = mpsc::channel();
        let q = queue.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                exporter.run(&q);
                drop(done);
            })
            .map_err(OtlpError::Thread)?;
        Ok(SpanExport { queue, ended })
    }

    /// The queue the trace layer pushes to.
    pub fn queue(&self) -> Arc<SpanQueue> {
        self.queue.clone()
    }

    /// Send what is queued, waiting at most `timeout`, and stop the export thread.
    pub fn shutdown(self, timeout: Duration) {
        self.queue.state.lock().closing = Some(Instant::now() + timeout);
        self.queue.wake.notify_one();
        let _ = self.ended.recv_timeout(timeout);
    }
}

/// Sends each batch, encoded by [`otlp_wire::Encoder`], to the collector's TraceService.
struct GrpcExporter {
    channel: Channel,
    runtime: tokio::runtime::Runtime,
    resource: Vec<Attribute>,
    encoder: otlp_wire::Encoder,
    counters: SpanCounters,
}

impl GrpcExporter {
    /// The export thread: batches until the queue closes and is empty.
    fn run(mut self, queue: &SpanQueue) {
        let mut batch = Vec::new();
        loop {
            let closing = queue.take(&mut batch);
            // `take` waits for spans unless the queue is closing: empty means closed and sent.
            if batch.is_empty() {
                return;
            }
            let deadline = Instant::now() + TIMEOUT;
            self.export(&batch, closing.map_or(deadline, |c| c.min(deadline)));
            // Dropped here, on this thread, not on a worker.
            batch.clear();
        }
    }

    fn export(&mut self, spans: &[SpanRecord], deadline: Instant) {
        let body = Bytes::copy_from_slice(self.encoder.request(&self.resource, spans));
        let sent = self.runtime.block_on(self.send(body, deadline.into()));
        let outcome = match sent {
            Ok(()) => &self.counters.exported,
            Err(status) => {
                log::debug!("OTLP export of {} spans failed: {status}", spans.len());
                &self.counters.failed
            }
        };
        outcome.inc_by(spans.len() as u64);
    }

    async fn send(&self, body: Bytes, deadline: tokio::time::Instant) -> Result<(), Status> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: u64) -> SpanRecord {
        SpanRecord {
            trace_id: 1,
            span_id: id,
            parent_id: 0,
            name: "write",
            start: 0,
            end: 1,
            attributes: Default::default(),
            events: Vec::new(),
            error: None,
            live_resource: Arc::new([]),
        }
    }

    /// Take everything from a closing queue, as the export thread does.
    fn drain(queue: &SpanQueue) -> Vec<Vec<u64>> {
        queue.state.lock().closing = Some(Instant::now());
        let mut batches = Vec::new();
        let mut batch = Vec::new();
        loop {
            queue.take(&mut batch);
            if batch.is_empty() {
                return batches;
            }
            batches.push(batch.iter().map(|s| s.span_id).collect());
            batch.clear();
        }
    }

    #[test]
    fn spans_leave_in_order_one_batch_at_a_time() {
        let queue = SpanQueue::new(SpanCounters::default());
        let n = 2 * BATCH as u64 + 5;
        (0..n).for_each(|i| queue.push(span(i)));
        let batches = drain(&queue);
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [BATCH, BATCH, 5]);
        assert!(batches.concat().into_iter().eq(0..n));
        let state = queue.state.lock();
        assert_eq!(state.len, 0);
        assert_eq!(
            state.free.len(),
            2,
            "sent batches' vectors are kept for reuse"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_what_does_not_fit() {
        let counters = SpanCounters::default();
        let queue = SpanQueue::new(counters.clone());
        (0..QUEUE as u64 + 10).for_each(|i| queue.push(span(i)));
        assert_eq!(counters.recorded.get(), QUEUE as u64 + 10);
        assert_eq!(counters.dropped.get(), 10);
        let batches = drain(&queue);
        assert_eq!(batches.len(), QUEUE / BATCH);
        assert!(batches.concat().into_iter().eq(0..QUEUE as u64));
    }
}
