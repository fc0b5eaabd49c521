//! The OTLP protobuf encoding of a batch of finished spans, written straight from the trace
//! layer's records into one buffer.
//!
//! opentelemetry-otlp first converts each span into the generated prost structs (a `String`
//! for every attribute key and value) and then encodes those: measured here, 2.5 µs of CPU
//! per span on the batch thread and 1.6 µs more on the export runtime, about a third of a
//! FUSE round trip, on a node that runs the workload. Encoding directly costs a copy of each
//! attribute. The output is an `ExportTraceServiceRequest` (the unit test decodes it with the
//! generated types and compares it field by field).

use std::fmt::Write as _;
use std::sync::Arc;

use super::span::{Attribute, SpanRecord, Value};

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `SpanKind::SPAN_KIND_INTERNAL`: every span here is the daemon's own work.
const KIND_INTERNAL: u64 = 1;
/// `StatusCode::STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;
/// `SpanFlags`: sampled, and the parent is known not to be remote (there is no remote parent).
const FLAGS: u32 = 0x01 | 0x100;

/// The instrumentation scope every span is sent under.
pub const SCOPE: &str = "interposer-fs";

/// Appends protobuf fields to a buffer. A nested message is written into a spare buffer
/// first, then copied behind its length; spares are kept, so a batch allocates nothing once
/// the buffers have grown.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
    spare: Vec<Vec<u8>>,
    /// Where octal flags are formatted.
    text: String,
}

impl Encoder {
    /// The `ExportTraceServiceRequest` for `spans`: one `ResourceSpans` per run of spans that
    /// share a live resource (one run unless the pod changed meanwhile), each with `resource`
    /// and that run's live attributes.
    pub fn request(&mut self, resource: &[Attribute], spans: &[SpanRecord]) -> &[u8] {
        self.buf.clear();
        for run in spans.chunk_by(|a, b| Arc::ptr_eq(&a.live_resource, &b.live_resource)) {
            // ExportTraceServiceRequest.resource_spans
            self.message(1, |e| {
                // ResourceSpans.resource
                e.message(1, |e| {
                    for kv in resource.iter().chain(run[0].live_resource.iter()) {
                        e.attribute(1, kv);
                    }
                });
                // ResourceSpans.scope_spans
                e.message(2, |e| {
                    e.message(1, |e| {
                        e.string(1, SCOPE);
                        e.string(2, env!("CARGO_PKG_VERSION"));
                    });
                    for span in run {
                        e.message(2, |e| e.span(span));
                    }
                });
            });
        }
        &self.buf
    }

    fn span(&mut self, s: &SpanRecord) {
        self.bytes(1, &s.trace_id.to_be_bytes());
        self.bytes(2, &s.span_id.to_be_bytes());
        if s.parent_id != 0 {
            self.bytes(4, &s.parent_id.to_be_bytes());
        }
        self.string(5, s.name);
        self.uint(6, KIND_INTERNAL);
        self.fixed64(7, s.start);
        self.fixed64(8, s.end);
        for kv in &s.attributes {
            self.attribute(9, kv);
        }
        for event in &s.events {
            self.message(11, |e| {
                e.fixed64(1, event.time);
                e.string(2, event.name);
                e.attribute(3, &event.attribute);
            });
        }
        // Status: always present, as the OpenTelemetry SDK sends it.
        self.message(15, |e| {
            if let Some(description) = &s.error {
                e.string(2, description);
                e.uint(3, STATUS_ERROR);
            }
        });
        self.fixed32(16, FLAGS);
    }

    fn attribute(&mut self, field: u32, (key, value): &Attribute) {
        self.message(field, |e| {
            e.string(1, key);
            e.message(2, |e| e.any_value(value));
        });
    }

    /// `AnyValue`: a oneof, so even a default value (false, 0, "") is written.
    fn any_value(&mut self, value: &Value) {
        match value {
            Value::Shared(s) => self.bytes(1, s.as_bytes()),
            Value::Static(s) => self.bytes(1, s.as_bytes()),
            Value::Bool(b) => {
                self.key(2, VARINT);
                self.varint(u64::from(*b));
            }
            Value::Int(i) => {
                self.key(3, VARINT);
                self.varint(*i as u64);
            }
            Value::Float(f) => {
                self.key(4, FIXED64);
                self.buf.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Value::Octal(flags) => {
                let mut text = std::mem::take(&mut self.text);
                text.clear();
                let _ = write!(text, "{flags:#o}");
                self.bytes(1, text.as_bytes());
                self.text = text;
            }
        }
    }

    fn message(&mut self, field: u32, body: impl FnOnce(&mut Self)) {
        let outer = std::mem::replace(&mut self.buf, self.spare.pop().unwrap_or_default());
        body(self);
        let mut inner = std::mem::replace(&mut self.buf, outer);
        self.bytes(field, &inner);
        inner.clear();
        self.spare.push(inner);
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, LEN);
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    // Plain proto3 fields: a default value is left out, as every protobuf encoder does.

    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }

    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, VARINT);
            self.varint(v);
        }
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, FIXED64);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn fixed32(&mut self, field: u32, v: u32) {
        if v != 0 {
            self.key(field, FIXED32);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, InstrumentationScope, KeyValue, any_value,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{
        ResourceSpans, ScopeSpans, Span, Status, span::Event as ProtoEvent,
    };
    use prost::Message;
    use smallvec::smallvec;

    use super::*;
    use crate::telemetry::span::{Event, LiveResource};

    const T0: u64 = 1_795_000_000_123_456_789;

    fn record(n: u8, live: &LiveResource) -> SpanRecord {
        SpanRecord {
            trace_id: u128::from_be_bytes([n; 16]),
            span_id: u64::from_be_bytes([n + 1; 8]),
            parent_id: if n == 1 { 0x0909_0909_0909_0909 } else { 0 },
            name: if n == 1 { "write" } else { "file.session" },
            start: T0 + u64::from(n),
            end: T0 + u64::from(n) + 7_000,
            attributes: smallvec![
                ("file.path", Value::Shared("d/é b.txt".into())),
                ("interposer.inode", Value::Int(1_234_567)),
                ("interposer.offset", Value::Int(-1)),
                ("interposer.size", Value::Int(0)),
                ("interposer.fault.injected", Value::Bool(n == 1)),
                ("interposer.wait_ms", Value::Float(0.25)),
                ("interposer.flags", Value::Octal(0o100101)),
                ("empty", Value::Static("")),
            ],
            events: if n == 1 {
                vec![Event {
                    name: "fault.injected",
                    time: T0 + 3_000,
                    attribute: ("error.type", Value::Static("EIO")),
                }]
            } else {
                Vec::new()
            },
            error: (n == 1).then_some(Cow::Borrowed("EIO")),
            live_resource: live.clone(),
        }
    }

    fn pod(name: &str) -> LiveResource {
        Arc::new([("k8s.pod.name", Value::Shared(name.into()))])
    }

    fn string(s: &str) -> Option<AnyValue> {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(s.into())),
        })
    }

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn expected(n: u8) -> Span {
        use any_value::Value::*;
        Span {
            trace_id: vec![n; 16],
            span_id: vec![n + 1; 8],
            trace_state: String::new(),
            parent_span_id: if n == 1 { vec![9; 8] } else { vec![] },
            flags: 0x101,
            name: if n == 1 { "write" } else { "file.session" }.into(),
            kind: 1,
            start_time_unix_nano: T0 + u64::from(n),
            end_time_unix_nano: T0 + u64::from(n) + 7_000,
            attributes: vec![
                kv("file.path", StringValue("d/é b.txt".into())),
                kv("interposer.inode", IntValue(1_234_567)),
                kv("interposer.offset", IntValue(-1)),
                kv("interposer.size", IntValue(0)),
                kv("interposer.fault.injected", BoolValue(n == 1)),
                kv("interposer.wait_ms", DoubleValue(0.25)),
                kv("interposer.flags", StringValue("0o100101".into())),
                kv("empty", StringValue(String::new())),
            ],
            dropped_attributes_count: 0,
            events: if n == 1 {
                vec![ProtoEvent {
                    time_unix_nano: T0 + 3_000,
                    name: "fault.injected".into(),
                    attributes: vec![kv("error.type", StringValue("EIO".into()))],
                    dropped_attributes_count: 0,
                }]
            } else {
                vec![]
            },
            dropped_events_count: 0,
            links: vec![],
            dropped_links_count: 0,
            status: Some(if n == 1 {
                Status {
                    message: "EIO".into(),
                    code: 2,
                }
            } else {
                Status::default()
            }),
        }
    }

    #[test]
    fn a_batch_decodes_to_the_request_it_stands_for() {
        let resource = [
            ("service.name", Value::Static("interposer-fs")),
            ("interposer.volume.id", Value::Shared("pvc-1".into())),
        ];
        let app = pod("app-0");
        let spans = [record(0, &app), record(1, &app)];
        let mut encoder = Encoder::default();
        let ours = ExportTraceServiceRequest::decode(encoder.request(&resource, &spans))
            .expect("our bytes decode");
        let want = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv(
                            "service.name",
                            any_value::Value::StringValue("interposer-fs".into()),
                        ),
                        kv(
                            "interposer.volume.id",
                            any_value::Value::StringValue("pvc-1".into()),
                        ),
                        kv(
                            "k8s.pod.name",
                            any_value::Value::StringValue("app-0".into()),
                        ),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: vec![expected(0), expected(1)],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        assert_eq!(ours, want);

        // The buffers are reused: a second, smaller batch is not polluted by the first.
        let again = ExportTraceServiceRequest::decode(encoder.request(&resource, &spans[..1]))
            .expect("the second batch decodes");
        assert_eq!(again.resource_spans[0].scope_spans[0].spans, [expected(0)]);
    }

    #[test]
    fn spans_from_before_and_after_a_pod_change_go_under_their_own_resource() {
        let resource = [("interposer.volume.id", Value::Static("pvc-1"))];
        let (a, b) = (pod("app-0"), pod("app-1"));
        let spans = [record(0, &a), record(1, &a), record(0, &b)];
        let mut encoder = Encoder::default();
        let got = ExportTraceServiceRequest::decode(encoder.request(&resource, &spans))
            .expect("our bytes decode");
        let runs: Vec<(Vec<Option<AnyValue>>, usize)> = got
            .resource_spans
            .iter()
            .map(|rs| {
                let attrs = rs
                    .resource
                    .as_ref()
                    .map_or(vec![], |r| r.attributes.clone());
                let values = attrs.into_iter().map(|kv| kv.value).collect();
                (values, rs.scope_spans[0].spans.len())
            })
            .collect();
        assert_eq!(
            runs,
            [
                (vec![string("pvc-1"), string("app-0")], 2),
                (vec![string("pvc-1"), string("app-1")], 1),
            ]
        );
    }
}
