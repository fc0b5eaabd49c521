//! An OTLP/gRPC trace receiver that only counts what it is sent, for the benchmark.
//!
//! A real collector (the benchmark's Jaeger) costs several times the daemon's CPU per span, and
//! on a small machine it runs on the same cores as the workload. Exporting to this sink instead
//! shows what tracing costs the node that runs the volume, with every span still encoded and
//! sent over gRPC; the count it prints shows whether any were dropped on the way.
//!
//! Usage: `otlp_sink ADDR` (for example `127.0.0.1:4327`). After each request it prints one
//! line, `spans=N requests=M` (running totals), and flushes. Stops on SIGTERM or SIGINT.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Bytes, Context, Poll, Service, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

/// Running totals, printed after each request.
#[derive(Default)]
struct Totals {
    spans: AtomicU64,
    requests: AtomicU64,
}

/// The TraceService, routed by hand: the request is counted in its wire form, not decoded into
/// messages (decoding cost this sink more CPU per span than the daemon spends making it).
#[derive(Clone, Default)]
struct TraceService(Arc<Totals>);

impl NamedService for TraceService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl Service<http::Request<Body>> for TraceService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let export = Export(self.0.clone());
        Box::pin(async move {
            if req.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
                return Ok(Status::unimplemented("only Export").into_http());
            }
            Ok(Grpc::new(Raw).unary(export, req).await)
        })
    }
}

struct Export(Arc<Totals>);

impl UnaryService<Bytes> for Export {
    type Response = ();
    type Future = std::future::Ready<Result<Response<()>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let Some(n) = count_spans(request.get_ref()) else {
            return std::future::ready(Err(Status::invalid_argument("not a trace export")));
        };
        let spans = self.0.spans.fetch_add(n, Ordering::Relaxed) + n;
        let requests = self.0.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let mut out = std::io::stdout().lock();
        // The reader may be gone at the end of a run: nothing to do about it here.
        let _ = writeln!(out, "spans={spans} requests={requests}");
        let _ = out.flush();
        // An empty ExportTraceServiceResponse: full success.
        std::future::ready(Ok(Response::new(())))
    }
}

/// Spans in an `ExportTraceServiceRequest`: field 2 (spans) of each field 2 (scope spans) of
/// each field 1 (resource spans). `None` if the bytes are not protobuf.
fn count_spans(request: &[u8]) -> Option<u64> {
    let mut n = 0;
    for (field, resource_spans) in fields(request)? {
        if field == 1 {
            for (field, scope_spans) in fields(resource_spans?)? {
                if field == 2 {
                    n += fields(scope_spans?)?
                        .iter()
                        .filter(|(f, _)| *f == 2)
                        .count() as u64;
                }
            }
        }
    }
    Some(n)
}

/// A message's fields: number, and the bytes of the length-delimited ones.
type Fields<'a> = Vec<(u64, Option<&'a [u8]>)>;

fn fields(mut buf: &[u8]) -> Option<Fields<'_>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let bytes = match key & 7 {
            0 => varint(&mut buf).map(|_| None)?,
            1 => skip(&mut buf, 8).map(|_| None)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                Some(skip(&mut buf, len)?)
            }
            5 => skip(&mut buf, 4).map(|_| None)?,
            _ => return None,
        };
        out.push((key >> 3, bytes));
    }
    Some(out)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn skip<'a>(buf: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    if buf.len() < len {
        return None;
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Some(head)
}

/// Request bytes in as they came, an empty message out.
#[derive(Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = ();
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = ();
    type Error = Status;

    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use bytes::Buf as _;
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: otlp_sink ADDR"))?
        .parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        tonic::transport::Server::builder()
            .add_service(TraceService::default())
            .serve_with_shutdown(addr, stop)
            .await?;
        Ok(())
    })
}
