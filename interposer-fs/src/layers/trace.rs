//! `trace`: one OpenTelemetry span per operation, grouped under a span per open-file session.
//!
//! Span names are the operation names (`read`, `rename`). Attributes follow OpenTelemetry
//! semantic conventions where one exists (`file.path`, `process.pid`, `error.type`) and use the
//! `interposer.*` namespace otherwise. With `trace.fileSpans` on, `open`/`create` start a
//! `file.session` span that ends at `release`; every operation on that handle is its child, so
//! Jaeger shows one tree per opened file. This layer decides what is sampled, gives spans their
//! ids and builds each finished span as a [`SpanRecord`]; it only queues them. Export is the
//! export thread's business (see `telemetry::otlp`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::fs::op::{Op, OpInfo, OpResult, OpSet, Outcome};
use crate::layers::Layer;
use crate::params::{TraceParams, errno_name};
use crate::telemetry::otlp::SpanQueue;
use crate::telemetry::span::{self, Attribute, Event, SpanRecord, Value};

const SHARDS: usize = 16;

/// The resource attributes that can change while the volume runs (the pod using it, learnt at
/// publish time, after the daemon started). Each span takes the set current when it starts.
pub struct LiveResource(parking_lot::RwLock<span::LiveResource>);

impl Default for LiveResource {
    fn default() -> Self {
        LiveResource(parking_lot::RwLock::new(Arc::new([])))
    }
}

impl LiveResource {
    /// Set (or replace) `key`; false if it had that value already. Spans already started keep
    /// the set they started under.
    pub fn set(&self, key: &'static str, value: &str) -> bool {
        let mut current = self.0.write();
        let value = Value::Shared(value.into());
        if current.iter().any(|(k, v)| *k == key && *v == value) {
            return false;
        }
        let mut attrs: Vec<Attribute> =
            current.iter().filter(|(k, _)| *k != key).cloned().collect();
        attrs.push((key, value));
        *current = attrs.into();
        true
    }

    fn current(&self) -> span::LiveResource {
        self.0.read().clone()
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

/// An open file's session span, from open or create until release.
struct Session {
    /// `None`: sampling left the session out, and its operations with it.
    ids: Option<(u128, u64)>,
    start: u64,
    path: Arc<str>,
}

pub struct TraceLayer {
    queue: Arc<SpanQueue>,
    ops: OpSet,
    sample_ratio: f64,
    file_spans: bool,
    /// Open-file sessions by file handle; sharded so parallel opens rarely contend.
    sessions: [Mutex<HashMap<u64, Session>>; SHARDS],
    /// thread id → ((tgid, process name), when read). Bounded; refreshed so a reused id is not
    /// misnamed for long. Read-locked on the hot path; `/proc` is read with no lock held.
    comm_cache: parking_lot::RwLock<HashMap<u32, ProcessInfo>>,
    live: Arc<LiveResource>,
}

impl TraceLayer {
    pub fn new(queue: Arc<SpanQueue>, params: &TraceParams, live: Arc<LiveResource>) -> Self {
        TraceLayer {
            queue,
            ops: params.ops,
            sample_ratio: params.sample_ratio,
            file_spans: params.file_spans,
            sessions: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            comm_cache: parking_lot::RwLock::new(HashMap::new()),
            live,
        }
    }

    /// Whether a new trace (an operation outside any file session, or a new session) is
    /// recorded: `trace.sampleRatio` of them, chosen at random. Decided here, before anything is
    /// built, so what sampling leaves out costs nothing.
    fn sampled(&self) -> bool {
        sample(self.sample_ratio, next_random())
    }

    fn shard(&self, fh: u64) -> &Mutex<HashMap<u64, Session>> {
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

    fn attributes(&self, info: &OpInfo<'_>) -> SmallVec<[Attribute; span::INLINE_ATTRS]> {
        let mut attrs = SmallVec::new();
        attrs.push(("file.path", Value::Shared(info.path().clone())));
        if let Some(np) = info.new_path() {
            attrs.push(("interposer.new_path", Value::Shared(np.clone())));
        }
        let tid = info.caller.pid;
        match self.process_of(tid) {
            Some(p) => {
                attrs.push(("process.pid", Value::Int(p.pid.into())));
                attrs.push(("process.executable.name", Value::Shared(p.name)));
            }
            None => attrs.push(("process.pid", Value::Int(tid.into()))),
        }
        attrs.push(("thread.id", Value::Int(tid.into())));
        attrs.push(("process.user.id", Value::Int(info.caller.uid.into())));
        attrs.push(("process.group.id", Value::Int(info.caller.gid.into())));
        attrs.push(("interposer.inode", Value::Int(info.ino as i64)));
        if let Some(fh) = info.fh {
            attrs.push(("interposer.fh", Value::Int(fh as i64)));
        }
        if let Some(off) = info.offset {
            attrs.push(("interposer.offset", Value::Int(off as i64)));
        }
        if let Some(size) = info.size {
            attrs.push(("interposer.size", Value::Int(size as i64)));
        }
        if let Some(flags) = info.flags {
            attrs.push(("interposer.flags", Value::Octal(flags as u32)));
        }
        attrs
    }

    /// What the layers below did and how the operation ended.
    fn finish(&self, span: &mut SpanRecord, info: &OpInfo<'_>, result: &OpResult) {
        if let Some(errno) = info.injected_errno.get() {
            span.events.push(Event {
                name: "fault.injected",
                time: span.end,
                attribute: ("error.type", errno_name(errno).into()),
            });
            span.attributes
                .push(("interposer.fault.injected", Value::Bool(true)));
        }
        let delay = info.injected_delay.get();
        if !delay.is_zero() {
            span.events.push(Event {
                name: "fault.delay",
                time: span.end,
                attribute: ("interposer.delay_ms", Value::Float(millis(delay))),
            });
        }
        let wait = info.throttle_wait.get();
        if !wait.is_zero() {
            span.events.push(Event {
                name: "throttle.wait",
                time: span.end,
                attribute: ("interposer.wait_ms", Value::Float(millis(wait))),
            });
            span.attributes
                .push(("interposer.throttle.wait_ms", Value::Float(millis(wait))));
        }
        match result {
            Ok(outcome) => {
                if info.op.direction().is_some() {
                    span.attributes
                        .push(("interposer.bytes", Value::Int(outcome.bytes as i64)));
                }
                if let Some(fh) = outcome.fh {
                    span.attributes
                        .push(("interposer.fh", Value::Int(fh as i64)));
                }
            }
            Err(errno) => {
                // A static name for every errno the kernel knows: no allocation.
                let name = errno_name(errno.0);
                span.attributes.push(("error.type", name.clone().into()));
                span.error = Some(name);
            }
        }
    }

    /// End an open file's session span.
    fn end_session(&self, fh: Option<u64>, session: Session, error: Option<&'static str>) {
        let Some((trace_id, span_id)) = session.ids else {
            return;
        };
        let mut attributes = SmallVec::new();
        attributes.push(("file.path", Value::Shared(session.path)));
        if let Some(fh) = fh {
            attributes.push(("interposer.fh", Value::Int(fh as i64)));
        }
        self.queue.push(SpanRecord {
            trace_id,
            span_id,
            parent_id: 0,
            name: "file.session",
            start: session.start,
            end: span::now(),
            attributes,
            events: Vec::new(),
            error: error.map(Into::into),
            live_resource: self.live.current(),
        });
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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

/// A new trace id: 128 random bits, never zero.
fn new_trace_id() -> u128 {
    (u128::from(next_random()) << 64) | u128::from(new_span_id())
}

/// A new span id: 64 random bits, never zero (zero means "no parent" on the wire).
fn new_span_id() -> u64 {
    next_random().max(1)
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
        // Without file sessions there is no map to look in (and no lock to take).
        let in_session = match info.fh {
            Some(fh) if self.file_spans && !opens_session => {
                self.shard(fh).lock().get(&fh).map(|s| s.ids)
            }
            _ => None,
        };
        let (recorded, parent) = match in_session {
            Some(ids) => (ids.is_some(), ids),
            None => (self.sampled(), None),
        };
        // What sampling leaves out costs nothing more: no clock read, no attributes, no span.
        let start = recorded.then(span::now);
        let session = opens_session.then(|| Session {
            ids: start.map(|_| (new_trace_id(), new_span_id())),
            start: start.unwrap_or_default(),
            path: info.path().clone(),
        });
        let span = start.filter(|_| traced).map(|start| {
            // In a session (new or found), a child of its span; otherwise a trace of its own.
            let (trace_id, parent_id) = session
                .as_ref()
                .and_then(|s| s.ids)
                .or(parent)
                .unwrap_or_else(|| (new_trace_id(), 0));
            SpanRecord {
                trace_id,
                span_id: new_span_id(),
                parent_id,
                name: info.op.name(),
                start,
                end: 0,
                attributes: self.attributes(info),
                events: Vec::new(),
                error: None,
                live_resource: self.live.current(),
            }
        });
        let result = next();
        if let Some(mut span) = span {
            span.end = span::now();
            self.finish(&mut span, info, &result);
            self.queue.push(span);
        }
        if let Some(session) = session {
            match &result {
                Ok(Outcome { fh: Some(fh), .. }) => {
                    self.shard(*fh).lock().insert(*fh, session);
                }
                _ => self.end_session(None, session, Some("open failed")),
            }
        } else if closes_session {
            if let Some(fh) = info.fh {
                if let Some(session) = self.shard(fh).lock().remove(&fh) {
                    self.end_session(Some(fh), session, None);
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
            for (fh, session) in shard.lock().drain() {
                self.end_session(Some(fh), session, None);
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
