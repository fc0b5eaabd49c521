//! `metrics`: Prometheus counters and histograms for every operation.
//!
//! [`Metrics`] is the volume's registry; the metrics layer records operations, and the fault and
//! throttle layers record what they did into the same registry, so one scrape shows the whole
//! story. Names follow Prometheus conventions (`_total`, `_seconds`, `_bytes`); constant labels
//! say which volume (and, when known, which PVC and namespace) a series belongs to.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::fs::op::{Direction, Op, OpInfo, OpResult};
use crate::layers::Layer;
use crate::params::errno_name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpResultLabels {
    op: &'static str,
    /// `ok`, or the errno name (`ENOENT`).
    result: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    op: &'static str,
    /// `errno` or `delay`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpanLabels {
    /// `recorded`, `exported`, `failed` or `dropped`.
    outcome: &'static str,
}

/// What became of the volume's spans, for users to see spans lost before their collector:
/// `recorded` by the trace layer (when the span ends), then `exported` to the collector,
/// `failed` (in a batch the collector did not take, retries included) or `dropped` (the export
/// queue was full). Once the queue is empty, recorded = exported + failed + dropped.
#[derive(Clone, Default)]
pub struct SpanCounters {
    pub recorded: Counter,
    pub exported: Counter,
    pub failed: Counter,
    pub dropped: Counter,
}

fn histogram() -> Histogram {
    // 10 µs .. ~10 s, factor 2.5: fine enough for p50/p99 from RAM-speed to stalled disks.
    Histogram::new(exponential_buckets(10e-6, 2.5, 16))
}

/// The metric set of one volume.
pub struct Metrics {
    registry: Registry,
    operations: Family<OpResultLabels, Counter>,
    duration: Family<OpLabels, Histogram, fn() -> Histogram>,
    read_bytes: Counter,
    write_bytes: Counter,
    faults: Family<FaultLabels, Counter>,
    throttle_wait: Family<DirectionLabels, Counter<f64>>,
    inodes: Gauge,
    spans: Family<SpanLabels, Counter>,
    /// Counts the inodes the kernel holds, read at each scrape.
    inode_count: OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
}

impl Metrics {
    /// `labels` are constant labels on every series (volume, pvc, namespace).
    pub fn new(labels: Vec<(String, String)>) -> Arc<Self> {
        let mut registry = Registry::with_prefix_and_labels(
            "interposer",
            labels
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v))),
        );
        let operations = Family::<OpResultLabels, Counter>::default();
        let duration = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            histogram as fn() -> Histogram,
        );
        let read_bytes = Counter::default();
        let write_bytes = Counter::default();
        let faults = Family::<FaultLabels, Counter>::default();
        let throttle_wait = Family::<DirectionLabels, Counter<f64>>::default();
        let inodes = Gauge::default();
        let spans = Family::<SpanLabels, Counter>::default();
        registry.register(
            "operations",
            "Filesystem operations by operation and result (ok or errno name)",
            operations.clone(),
        );
        registry.register_with_unit(
            "operation_duration",
            "Time to complete a filesystem operation, layers included",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register_with_unit(
            "read",
            "Bytes read through the volume",
            Unit::Bytes,
            read_bytes.clone(),
        );
        registry.register_with_unit(
            "written",
            "Bytes written through the volume",
            Unit::Bytes,
            write_bytes.clone(),
        );
        registry.register(
            "faults_injected",
            "Faults injected by the fault layer, by operation and kind (errno or delay)",
            faults.clone(),
        );
        registry.register_with_unit(
            "throttle_wait",
            "Time operations waited for throttle quota",
            Unit::Seconds,
            throttle_wait.clone(),
        );
        registry.register(
            "inodes",
            "Files and directories the kernel holds a reference to (each costs daemon memory)",
            inodes.clone(),
        );
        registry.register(
            "trace_spans",
            "Spans of the trace layer by outcome: recorded, then exported to the collector, failed \
             (the collector did not take them) or dropped (the export queue was full)",
            spans.clone(),
        );
        Arc::new(Metrics {
            registry,
            operations,
            duration,
            read_bytes,
            write_bytes,
            faults,
            throttle_wait,
            inodes,
            spans,
            inode_count: OnceLock::new(),
        })
    }

    /// The counters the trace layer and the span exporter keep (their series appear with them).
    pub fn span_counters(&self) -> SpanCounters {
        let get = |outcome| self.spans.get_or_create(&SpanLabels { outcome }).clone();
        SpanCounters {
            recorded: get("recorded"),
            exported: get("exported"),
            failed: get("failed"),
            dropped: get("dropped"),
        }
    }

    /// Where `interposer_inodes` comes from (set once, when the filesystem exists).
    pub fn count_inodes_with(&self, count: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.inode_count.set(Box::new(count));
    }

    /// The OpenMetrics text exposition of every series.
    pub fn encode(&self) -> String {
        if let Some(count) = self.inode_count.get() {
            self.inodes.set(count() as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn fault_injected(&self, op: Op, kind: &'static str) {
        self.faults
            .get_or_create(&FaultLabels {
                op: op.name(),
                kind,
            })
            .inc();
    }

    pub fn throttle_waited(&self, dir: Direction, wait: Duration) {
        let direction = match dir {
            Direction::Read => "read",
            Direction::Write => "write",
        };
        self.throttle_wait
            .get_or_create(&DirectionLabels { direction })
            .inc_by(wait.as_secs_f64());
    }

    fn record(&self, op: Op, result: &OpResult, elapsed: Duration) {
        let result_label: Cow<'static, str> = match result {
            Ok(_) => Cow::Borrowed("ok"),
            Err(e) => errno_name(e.0),
        };
        self.operations
            .get_or_create(&OpResultLabels {
                op: op.name(),
                result: result_label,
            })
            .inc();
        self.duration
            .get_or_create(&OpLabels { op: op.name() })
            .observe(elapsed.as_secs_f64());
        if let Ok(outcome) = result {
            match op.direction() {
                Some(Direction::Read) => self.read_bytes.inc_by(outcome.bytes),
                Some(Direction::Write) => self.write_bytes.inc_by(outcome.bytes),
                None => 0,
            };
        }
    }
}

/// The layer: time the rest of the stack, count the result.
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsLayer { metrics }
    }
}

impl Layer for MetricsLayer {
    fn call(&self, info: &OpInfo<'_>, next: &mut dyn FnMut() -> OpResult) -> OpResult {
        let start = Instant::now();
        let result = next();
        self.metrics.record(info.op, &result, start.elapsed());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::op::{Caller, Outcome};

    #[test]
    fn operations_bytes_and_errors_show_in_the_exposition() {
        let m = Metrics::new(vec![("volume".into(), "v1".into())]);
        let layer = MetricsLayer::new(m.clone());
        let resolve = |_: &OpInfo<'_>| (Arc::from(""), None);
        let caller = Caller {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        for _ in 0..3 {
            let info = OpInfo::new(Op::Write, caller, 2, &resolve);
            let _ = layer.call(&info, &mut || {
                Ok(Outcome {
                    bytes: 100,
                    fh: None,
                })
            });
        }
        let info = OpInfo::new(Op::Unlink, caller, 2, &resolve);
        let _ = layer.call(&info, &mut || Err(crate::fs::errno::Errno::ENOENT));
        m.fault_injected(Op::Write, "errno");
        let text = m.encode();
        assert!(
            text.contains(r#"interposer_operations_total{volume="v1",op="write",result="ok"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"interposer_operations_total{volume="v1",op="unlink",result="ENOENT"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"interposer_written_bytes_total{volume="v1"} 300"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"interposer_faults_injected_total{volume="v1",op="write",kind="errno"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("interposer_operation_duration_seconds_bucket"),
            "{text}"
        );
    }
}
