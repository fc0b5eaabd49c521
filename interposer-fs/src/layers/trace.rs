//! `trace`: one OpenTelemetry span per operation, grouped under a span per open-file session.
//!
//! Span names are the operation names (`read`, `rename`). Attributes follow OpenTelemetry
//! semantic conventions where one exists (`file.path`, `process.pid`, `error.type`) and use the
//! `interposer.*` namespace otherwise. With `trace.fileSpans` on, `open`/`create` start a
//! `file.session` span that ends at `release`; every operation on that handle is its child, so
//! Jaeger shows one tree per opened file. Spans are only queued here; export is the batch
//! processor's business (see `telemetry::otlp`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{Span, SpanContext, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, StringValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use parking_lot::Mutex;

use crate::fs::op::{Op, OpInfo, OpResult, OpSet};
use crate::layers::Layer;
use crate::layers::metrics::SpanCounters;
use crate::params::{TraceParams, errno_name};

const SHARDS: usize = 16;

/// Attributes that can change while the volume runs (the pod using it, learnt at publish time,
/// after the daemon started): added to every span.
#[derive(Default)]
pub struct LiveAttributes(parking_lot::RwLock<Vec<KeyValue>>);

impl LiveAttributes {
    /// Set (or replace) `key`. The value is shared, not copied, by every span that carries it.
    pub fn set(&self, key: &'static str, value: String) {
        let mut attrs = self.0.write();
        attrs.retain(|kv| kv.key.as_str() != key);
        attrs.push(KeyValue::new(
            key,
            StringValue::from(Arc::<str>::from(value)),
        ));
    }
}

/// What a span says about the calling process.
#[derive(Clone)]
struct ProcessInfo {
    /// Thread group id: the process id users know.
    pid: u32,
    /// Shared by every span of the process.
    name: Arc<str>,
    read_at: Instant,
}

pub struct TraceLayer {
    tracer: SdkTracer,
    ops: OpSet,
    sample_ratio: f64,
    file_spans: bool,
    /// Open-file sessions by file handle; sharded so parallel opens rarely contend.
    sessions: [Mutex<HashMap<u64, Context>>; SHARDS],
    /// thread id → ((tgid, process name), when read). Bounded; refreshed so a reused id is not
    /// misnamed for long. Read-locked on the hot path; `/proc` is read with no lock held.
    comm_cache: parking_lot::RwLock<HashMap<u32, ProcessInfo>>,
    live: Arc<LiveAttributes>,
    /// `recorded` counts each span handed to the SDK.
    spans: SpanCounters,
}

impl TraceLayer {
    pub fn new(
        provider: &SdkTracerProvider,
        params: &TraceParams,
        live: Arc<LiveAttributes>,
        spans: SpanCounters,
    ) -> Self {
        use opentelemetry::trace::TracerProvider as _;
        TraceLayer {
            tracer: provider.tracer("interposer-fs"),
            ops: params.ops,
            sample_ratio: params.sample_ratio,
            file_spans: params.file_spans,
            sessions: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            comm_cache: parking_lot::RwLock::new(HashMap::new()),
            live,
            spans,
        }
    }

    /// Whether a new trace (an operation outside any file session, or a new session) is
    /// recorded: `trace.sampleRatio` of them, chosen at random. Decided here, before anything is
    /// built, so what sampling leaves out costs nothing; the SDK then records what it is given.
    fn sampled(&self) -> bool {
        sample(self.sample_ratio, next_random())
    }

    fn shard(&self, fh: u64) -> &Mutex<HashMap<u64, Context>> {
        &self.sessions[(fh as usize) % SHARDS]
    }

    /// Process id (tgid) and name for the kernel's request pid, which is a thread id.
    fn process_of(&self, tid: u32) -> Option<ProcessInfo> {
        if tid == 0 {
            return None;
        }
        if let Some(p) = self.comm_cache.read().get(&tid) {
            if p.read_at.elapsed() < Duration::from_secs(10) {
                return Some(p.clone());
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let tgid = field("Tgid:")?.parse().ok()?;
        let proc = ProcessInfo {
            pid: tgid,
            name: field("Name:")?.into(),
            read_at: Instant::now(),
        };
        let mut cache = self.comm_cache.write();
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(tid, proc.clone());
        Some(proc)
    }

    fn attributes(&self, info: &OpInfo<'_>) -> Vec<KeyValue> {
        // Room for every attribute below and the pod's (name and namespace): one allocation.
        let mut attrs = Vec::with_capacity(16);
        attrs.push(KeyValue::new("file.path", shared(info.path())));
        if let Some(np) = info.new_path() {
            attrs.push(KeyValue::new("interposer.new_path", shared(np)));
        }
        let tid = info.caller.pid;
        match self.process_of(tid) {
            Some(p) => {
                attrs.push(KeyValue::new("process.pid", p.pid as i64));
                attrs.push(KeyValue::new(
                    "process.executable.name",
                    StringValue::from(p.name),
                ));
            }
            None => attrs.push(KeyValue::new("process.pid", tid as i64)),
        }
        attrs.push(KeyValue::new("thread.id", tid as i64));
        attrs.push(KeyValue::new("process.user.id", info.caller.uid as i64));
        attrs.push(KeyValue::new("process.group.id", info.caller.gid as i64));
        attrs.push(KeyValue::new("interposer.inode", info.ino as i64));
        if let Some(fh) = info.fh {
            attrs.push(KeyValue::new("interposer.fh", fh as i64));
        }
        if let Some(off) = info.offset {
            attrs.push(KeyValue::new("interposer.offset", off as i64));
        }
        if let Some(size) = info.size {
            attrs.push(KeyValue::new("interposer.size", size as i64));
        }
        if let Some(flags) = info.flags {
            attrs.push(KeyValue::new("interposer.flags", format!("{flags:#o}")));
        }
        attrs.extend(self.live.0.read().iter().cloned());
        attrs
    }

    fn finish(&self, span: &mut impl Span, info: &OpInfo<'_>, result: &OpResult) {
        if let Some(errno) = info.injected_errno.get() {
            span.add_event(
                "fault.injected",
                vec![KeyValue::new("error.type", errno_name(errno))],
            );
            span.set_attribute(KeyValue::new("interposer.fault.injected", true));
        }
        let delay = info.injected_delay.get();
        if !delay.is_zero() {
            span.add_event(
                "fault.delay",
                vec![KeyValue::new(
                    "interposer.delay_ms",
                    delay.as_secs_f64() * 1e3,
                )],
            );
        }
        let wait = info.throttle_wait.get();
        if !wait.is_zero() {
            span.add_event(
                "throttle.wait",
                vec![KeyValue::new(
                    "interposer.wait_ms",
                    wait.as_secs_f64() * 1e3,
                )],
            );
            span.set_attribute(KeyValue::new(
                "interposer.throttle.wait_ms",
                wait.as_secs_f64() * 1e3,
            ));
        }
        match result {
            Ok(outcome) => {
                if info.op.direction().is_some() {
                    span.set_attribute(KeyValue::new("interposer.bytes", outcome.bytes as i64));
                }
                if let Some(fh) = outcome.fh {
                    span.set_attribute(KeyValue::new("interposer.fh", fh as i64));
                }
            }
            Err(errno) => {
                // A static name for every errno the kernel knows: no allocation.
                let name = errno_name(errno.0);
                span.set_attribute(KeyValue::new("error.type", name.clone()));
                span.set_status(Status::error(name));
            }
        }
    }
}

/// Whether `random` (uniform over `u64`) falls within `ratio` of its range.
fn sample(ratio: f64, random: u64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    // The top 53 bits as a fraction in [0, 1): exact in an f64.
    ((random >> 11) as f64) / ((1u64 << 53) as f64) < ratio
}

/// A per-thread xorshift64* generator, seeded from the standard library's random hash keys:
/// fast, and good enough to choose which operations are traced.
fn next_random() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1,
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A path as a span attribute: shared with the operation, not copied.
fn shared(path: &Arc<str>) -> StringValue {
    StringValue::from(Arc::clone(path))
}

impl Layer for TraceLayer {
    fn call(&self, info: &OpInfo<'_>, next: &mut dyn FnMut() -> OpResult) -> OpResult {
        let opens_session = self.file_spans && matches!(info.op, Op::Open | Op::Create);
        let traced = self.ops.contains(info.op);
        let closes_session = self.file_spans && info.op == Op::Release;
        if !(traced || opens_session || closes_session) {
            return next();
        }
        // Parent: the file session of this handle, if any; it decided for its operations.
        let mut parent = info
            .fh
            .and_then(|fh| self.shard(fh).lock().get(&fh).cloned());
        let recorded = match &parent {
            Some(cx) if !opens_session => cx.span().span_context().is_sampled(),
            _ => self.sampled(),
        };
        // What sampling leaves out costs nothing more: no clock read, no attributes, no span.
        let start = recorded.then(SystemTime::now);
        if opens_session {
            parent = Some(match start {
                Some(start) => {
                    let session = self
                        .tracer
                        .span_builder("file.session")
                        .with_kind(SpanKind::Internal)
                        .with_start_time(start)
                        .with_attributes(vec![KeyValue::new("file.path", shared(info.path()))])
                        .start(&self.tracer);
                    self.spans.recorded.inc();
                    Context::new().with_span(session)
                }
                // Remembered too, so that the session's operations are left out with it.
                None => Context::new().with_remote_span_context(SpanContext::empty_context()),
            });
        }
        let mut span = start.filter(|_| traced).map(|start| {
            self.spans.recorded.inc();
            self.tracer
                .span_builder(info.op.name())
                .with_kind(SpanKind::Internal)
                .with_start_time(start)
                .with_attributes(self.attributes(info))
                .start_with_context(&self.tracer, parent.as_ref().unwrap_or(&Context::new()))
        });
        let result = next();
        if let Some(span) = span.as_mut() {
            self.finish(span, info, &result);
            span.end();
        }
        if opens_session {
            let parent = parent.unwrap_or_default();
            match result {
                Ok(outcome) if outcome.fh.is_some() => {
                    let fh = outcome.fh.unwrap_or_default();
                    parent
                        .span()
                        .set_attribute(KeyValue::new("interposer.fh", fh as i64));
                    self.shard(fh).lock().insert(fh, parent);
                }
                _ => {
                    let s = parent.span();
                    s.set_status(Status::error("open failed"));
                    s.end();
                }
            }
        } else if info.op == Op::Release {
            if let Some(fh) = info.fh {
                if let Some(cx) = self.shard(fh).lock().remove(&fh) {
                    cx.span().end();
                }
            }
        }
        result
    }
}

impl Drop for TraceLayer {
    fn drop(&mut self) {
        // Sessions still open at unmount end here, so their children are not orphaned.
        for shard in &self.sessions {
            for (_, cx) in shard.lock().drain() {
                cx.span().end();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_of_operations_sampled_is_the_ratio_asked() {
        assert!(sample(1.0, u64::MAX));
        assert!(!sample(0.0, 0));
        assert!(sample(0.5, 0) && !sample(0.5, u64::MAX));
        for ratio in [0.01, 0.25, 0.5, 0.9] {
            let n = 100_000;
            let hits = (0..n).filter(|_| sample(ratio, next_random())).count();
            let got = hits as f64 / n as f64;
            assert!(
                (got - ratio).abs() < 0.01,
                "asked {ratio}, sampled {got} of {n}"
            );
        }
    }
}
