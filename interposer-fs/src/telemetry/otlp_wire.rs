//! The OTLP protobuf encoding of a batch of finished spans, written straight from the SDK's
//! `SpanData` into one buffer.
//!
//! opentelemetry-otlp first converts each span into the generated prost structs (a `String`
//! for every attribute key and value) and then encodes those: measured here, 2.5 µs of CPU
//! per span on the batch thread and 1.6 µs more on the export runtime, about a third of a
//! FUSE round trip, on a node that runs the workload. Encoding directly costs a copy of each
//! attribute. The output is an `ExportTraceServiceRequest`, field for field what the SDK's own
//! conversion gives (the unit test decodes it with the generated types and compares).

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `SpanFlags`: the span's context says whether its parent is remote (always known here).
const CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const CONTEXT_IS_REMOTE: u32 = 0x200;

/// Appends protobuf fields to a buffer. A nested message is written into a spare buffer
/// first, then copied behind its length; spares are kept, so a batch allocates nothing once
/// the buffers have grown.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
    spare: Vec<Vec<u8>>,
}

impl Encoder {
    /// The `ExportTraceServiceRequest` for `spans`, which all share `resource`.
    pub fn request(&mut self, resource: &Resource, spans: &[SpanData]) -> &[u8] {
        self.buf.clear();
        // Spans grouped by instrumentation scope, in order of first appearance.
        let mut scopes: Vec<(&InstrumentationScope, Vec<&SpanData>)> = Vec::new();
        for span in spans {
            match scopes
                .iter_mut()
                .find(|(s, _)| *s == &span.instrumentation_scope)
            {
                Some((_, group)) => group.push(span),
                None => scopes.push((&span.instrumentation_scope, vec![span])),
            }
        }
        // ExportTraceServiceRequest.resource_spans
        self.message(1, |e| {
            // ResourceSpans.resource
            e.message(1, |e| {
                for (key, value) in resource.iter() {
                    e.key_value(1, key.as_str(), value);
                }
            });
            for (scope, group) in &scopes {
                // ResourceSpans.scope_spans
                e.message(2, |e| {
                    e.message(1, |e| e.scope(scope));
                    for span in group {
                        e.message(2, |e| e.span(span));
                    }
                    e.string(3, scope.schema_url().unwrap_or_default());
                });
            }
            e.string(3, resource.schema_url().unwrap_or_default());
        });
        &self.buf
    }

    fn scope(&mut self, scope: &InstrumentationScope) {
        self.string(1, scope.name());
        self.string(2, scope.version().unwrap_or_default());
        for kv in scope.attributes() {
            self.attribute(3, kv);
        }
    }

    fn span(&mut self, s: &SpanData) {
        let cx = &s.span_context;
        self.bytes(1, &cx.trace_id().to_bytes());
        self.bytes(2, &cx.span_id().to_bytes());
        self.string(3, &cx.trace_state().header());
        if s.parent_span_id != SpanId::INVALID {
            self.bytes(4, &s.parent_span_id.to_bytes());
        }
        self.string(5, &s.name);
        self.uint(6, kind(&s.span_kind));
        self.fixed64(7, nanos(s.start_time));
        self.fixed64(8, nanos(s.end_time));
        for kv in &s.attributes {
            self.attribute(9, kv);
        }
        self.uint(10, s.dropped_attributes_count.into());
        for event in s.events.iter() {
            self.message(11, |e| {
                e.fixed64(1, nanos(event.timestamp));
                e.string(2, &event.name);
                for kv in &event.attributes {
                    e.attribute(3, kv);
                }
                e.uint(4, event.dropped_attributes_count.into());
            });
        }
        self.uint(12, s.events.dropped_count.into());
        for link in s.links.iter() {
            self.message(13, |e| {
                let cx = &link.span_context;
                e.bytes(1, &cx.trace_id().to_bytes());
                e.bytes(2, &cx.span_id().to_bytes());
                e.string(3, &cx.trace_state().header());
                for kv in &link.attributes {
                    e.attribute(4, kv);
                }
                e.uint(5, link.dropped_attributes_count.into());
                e.fixed32(6, flags(cx.is_remote(), cx.trace_flags().to_u8()));
            });
        }
        self.uint(14, s.links.dropped_count.into());
        // Status: always present, as the SDK sends it.
        self.message(15, |e| match &s.status {
            Status::Unset => {}
            Status::Ok => e.uint(3, 1),
            Status::Error { description } => {
                e.string(2, description);
                e.uint(3, 2);
            }
        });
        self.fixed32(16, flags(s.parent_span_is_remote, cx.trace_flags().to_u8()));
    }

    fn attribute(&mut self, field: u32, kv: &KeyValue) {
        self.key_value(field, kv.key.as_str(), &kv.value);
    }

    fn key_value(&mut self, field: u32, key: &str, value: &Value) {
        self.message(field, |e| {
            e.string(1, key);
            e.message(2, |e| e.any_value(value));
        });
    }

    /// `AnyValue`: a oneof, so even a default value (false, 0, "") is written.
    fn any_value(&mut self, value: &Value) {
        match value {
            Value::String(s) => self.bytes(1, s.as_str().as_bytes()),
            Value::Bool(b) => {
                self.key(2, VARINT);
                self.varint(u64::from(*b));
            }
            Value::I64(i) => {
                self.key(3, VARINT);
                self.varint(*i as u64);
            }
            Value::F64(f) => {
                self.key(4, FIXED64);
                self.buf.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Value::Array(array) => self.message(5, |e| e.array(array)),
            // A value kind this encoder does not know: sent as its text.
            other => self.bytes(1, other.as_str().as_bytes()),
        }
    }

    /// `ArrayValue.values`, each an `AnyValue`.
    fn array(&mut self, array: &Array) {
        let mut each = |v: Value| self.message(1, |e| e.any_value(&v));
        match array {
            Array::Bool(v) => v.iter().for_each(|x| each(Value::Bool(*x))),
            Array::I64(v) => v.iter().for_each(|x| each(Value::I64(*x))),
            Array::F64(v) => v.iter().for_each(|x| each(Value::F64(*x))),
            Array::String(v) => v.iter().for_each(|x| each(Value::String(x.clone()))),
            _ => {}
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

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn flags(remote: bool, trace_flags: u8) -> u32 {
    let remote = if remote { CONTEXT_IS_REMOTE } else { 0 };
    u32::from(trace_flags) | CONTEXT_HAS_IS_REMOTE | remote
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message;

    use super::*;

    fn span(n: u8, parent: SpanId, status: Status, scope: &InstrumentationScope) -> SpanData {
        let start = UNIX_EPOCH + Duration::from_nanos(1_795_000_000_123_456_789 + u64::from(n));
        let mut events = SpanEvents::default();
        if n == 1 {
            events.events.push(opentelemetry::trace::Event::new(
                "fault.injected",
                start + Duration::from_micros(3),
                vec![KeyValue::new("error.type", "EIO")],
                0,
            ));
            events.dropped_count = 2;
        }
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes([n; 16]),
                SpanId::from_bytes([n + 1; 8]),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: if n == 2 {
                SpanKind::Server
            } else {
                SpanKind::Internal
            },
            name: format!("op{n}").into(),
            start_time: start,
            end_time: start + Duration::from_micros(7),
            attributes: vec![
                KeyValue::new("file.path", "d/é b.txt"),
                KeyValue::new("interposer.inode", 1_234_567_i64),
                KeyValue::new("interposer.offset", -1_i64),
                KeyValue::new("interposer.size", 0_i64),
                KeyValue::new("interposer.fault.injected", n == 1),
                KeyValue::new("interposer.delay_ms", 0.25),
                KeyValue::new("empty", ""),
                KeyValue::new(
                    "list",
                    Value::Array(Array::String(vec![StringValue::from("a"), "".into()])),
                ),
                KeyValue::new("ints", Value::Array(Array::I64(vec![0, -5, 1 << 40]))),
            ],
            dropped_attributes_count: u32::from(n == 2),
            events,
            links: SpanLinks::default(),
            status,
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn a_batch_decodes_to_what_the_sdk_conversion_gives() {
        let fs = InstrumentationScope::builder("interposer-fs").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2")
            .with_schema_url("https://opentelemetry.io/schemas/1.26.0")
            .with_attributes([KeyValue::new("k", 1_i64)])
            .build();
        let spans = vec![
            span(0, SpanId::INVALID, Status::Unset, &fs),
            span(1, SpanId::from_bytes([9; 8]), Status::error("EIO"), &fs),
            span(2, SpanId::INVALID, Status::Ok, &other),
            span(3, SpanId::from_bytes([1; 8]), Status::Unset, &fs),
        ];
        let resource = Resource::builder_empty()
            .with_service_name("interposer-fs")
            .with_attributes([
                KeyValue::new("interposer.volume.id", "pvc-1"),
                KeyValue::new("n", 3_i64),
            ])
            .build();

        let mut encoder = Encoder::default();
        let ours = ExportTraceServiceRequest::decode(encoder.request(&resource, &spans))
            .expect("our bytes decode");
        let scopes: Vec<_> = ours.resource_spans[0]
            .scope_spans
            .iter()
            .map(|s| s.scope.as_ref().map(|s| s.name.clone()))
            .collect();
        assert_eq!(
            scopes,
            [Some("interposer-fs".into()), Some("other".into())],
            "spans are grouped by scope in order of first appearance"
        );
        let sdk = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans.clone(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        // Resource attributes come from a hash map: compare them as a set.
        let sorted = |mut r: ExportTraceServiceRequest| {
            for rs in &mut r.resource_spans {
                if let Some(res) = rs.resource.as_mut() {
                    res.attributes.sort_by(|a, b| a.key.cmp(&b.key));
                }
            }
            r
        };
        assert_eq!(sorted(ours), sorted(sdk));

        // The buffers are reused: a second, smaller batch is not polluted by the first.
        let again = ExportTraceServiceRequest::decode(encoder.request(&resource, &spans[..1]))
            .expect("the second batch decodes");
        assert_eq!(again.resource_spans[0].scope_spans[0].spans.len(), 1);
    }
}
