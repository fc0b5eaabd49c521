//! A finished span, as the trace layer hands it to the exporter.
//!
//! A FUSE worker builds one of these per traced operation, so it is made to cost little there:
//! ids and times are plain integers, attribute keys are static, string values are shared
//! (`Arc<str>`) or static, and up to [`INLINE_ATTRS`] attributes live inside the record. Nothing
//! is allocated on the worker unless an event is added (an injected fault, a throttle wait).
//! Turning this into OTLP protobuf is `otlp_wire`'s job, on the export thread.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use smallvec::SmallVec;

/// Attributes held in the record itself: as many as a traced write has with a throttle wait
/// (an injected fault on one adds two more, which then go to the heap).
pub const INLINE_ATTRS: usize = 12;

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string shared with its owner (a path, a process name): not copied.
    Shared(Arc<str>),
    Static(&'static str),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Open flags, sent as an octal string (`0o100101`), formatted on the export thread.
    Octal(u32),
}

impl From<Cow<'static, str>> for Value {
    fn from(s: Cow<'static, str>) -> Self {
        match s {
            Cow::Borrowed(s) => Value::Static(s),
            Cow::Owned(s) => Value::Shared(s.into()),
        }
    }
}

pub type Attribute = (&'static str, Value);

/// Resource attributes that can change while the volume runs (the pod using it, learnt at
/// publish time), as they were when a span started. One allocation per change, shared by every
/// span recorded under it; the exporter sends them with its fixed resource attributes.
pub type LiveResource = Arc<[Attribute]>;

/// Something that happened during a span, with one attribute.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: &'static str,
    /// Unix time in nanoseconds.
    pub time: u64,
    pub attribute: Attribute,
}

/// A finished span. Its kind is always internal; its trace is always sampled (what sampling
/// leaves out is never built).
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    pub trace_id: u128,
    pub span_id: u64,
    /// 0 for a root span.
    pub parent_id: u64,
    pub name: &'static str,
    /// Unix times in nanoseconds.
    pub start: u64,
    pub end: u64,
    pub attributes: SmallVec<[Attribute; INLINE_ATTRS]>,
    pub events: Vec<Event>,
    /// The error status's description; `None` leaves the status unset.
    pub error: Option<Cow<'static, str>>,
    pub live_resource: LiveResource,
}

/// Now, as a Unix time in nanoseconds (the unit OTLP speaks).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
