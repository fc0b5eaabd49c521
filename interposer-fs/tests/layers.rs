//! The layers over a real mount: faults a real process sees, replayable seeds, a measured
//! throttle rate, metrics that count exactly, and spans at a real OTLP/gRPC receiver.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Volume, http_get, metric};

#[test]
fn a_write_fault_on_log_files_fails_a_real_process_while_other_files_work() {
    let v = Volume::start(&[
        "layers=metrics,fault",
        "fault.ops=write",
        "fault.paths=*.log",
        "fault.probability=1",
        "fault.errno=ENOSPC",
    ]);
    fs::create_dir(v.path("logs")).unwrap();
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=4096", "count=1"])
        .arg(format!("of={}", v.path("logs/app.log").display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "dd's write must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");

    let e = fs::write(v.path("logs/app.log"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(
        v.source_path("logs/app.log").exists(),
        "create is not a write: the file exists"
    );
    assert_eq!(
        fs::metadata(v.source_path("logs/app.log")).unwrap().len(),
        0
    );

    fs::write(v.path("logs/app.txt"), b"fine").unwrap();
    assert_eq!(fs::read(v.source_path("logs/app.txt")).unwrap(), b"fine");
    assert_eq!(
        fs::read(v.path("logs/app.log")).unwrap(),
        b"",
        "reads of .log are untouched"
    );
}

fn fault_pattern(seed: &str) -> Vec<bool> {
    let v = Volume::start(&[
        "layers=fault",
        "fault.ops=write",
        "fault.probability=0.5",
        &format!("fault.seed={seed}"),
    ]);
    let f = fs::File::create(v.path("f")).unwrap();
    (0..200u64)
        .map(|i| f.write_at(b"0123456789", i * 10).is_err())
        .collect()
}

#[test]
fn two_runs_with_the_same_seed_fail_the_same_operations() {
    let a = fault_pattern("1234");
    let b = fault_pattern("1234");
    assert_eq!(a, b, "same seed, same operations, same faults");
    let fails = a.iter().filter(|&&x| x).count();
    assert!(
        (60..=140).contains(&fails),
        "probability 0.5 over 200 writes gave {fails}"
    );
    assert_ne!(a, fault_pattern("99"), "another seed gives other faults");
}

#[test]
fn throttle_at_20_mib_per_second_writes_at_that_rate() {
    // Tolerance ±5% (the issue's): the bucket starts empty at mount, so the only slack is
    // sleep overshoot and scheduling on this 2-core machine, which makes the rate lower, never
    // higher, and stays well under 1% per second of run time in practice.
    let v = Volume::start(&[
        "layers=metrics,throttle",
        "throttle.writeBytesPerSecond=20Mi",
        "metrics.address=127.0.0.1:0",
    ]);
    let chunk = vec![0xabu8; 1 << 20];
    let total_mib = 200u64;
    let mut f = fs::File::create(v.path("big")).unwrap();
    let t = Instant::now();
    for _ in 0..total_mib {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let rate = total_mib as f64 / secs;
    println!("throttle: {total_mib} MiB in {secs:.2} s = {rate:.2} MiB/s (limit 20 MiB/s)");
    assert!(
        (19.0..=21.0).contains(&rate),
        "achieved {rate:.2} MiB/s, limit 20 MiB/s ±5%"
    );
    let m = http_get(&v.metrics_url());
    let waited = metric(
        &m,
        r#"interposer_throttle_wait_seconds_total{volume="mnt",direction="write"}"#,
    )
    .unwrap_or(0.0);
    assert!(
        waited > 5.0,
        "the waits show in telemetry ({waited} s)\n{m}"
    );
}

/// Wait until the mount's device setting `name` reads `value` (the daemon tunes it on a thread
/// of its own once INIT is answered).
fn wait_for_bdi(v: &Volume, name: &str, value: &str) {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(&v.mnt).unwrap().dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/{name}",
        libc::major(dev),
        libc::minor(dev)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(&path).unwrap().trim() != value {
        assert!(Instant::now() < deadline, "{path} never became {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sequential_read_reaches_the_daemon_in_the_kernels_read_ahead_requests() {
    let v = Volume::start(&[
        "layers=metrics",
        "pageCache=dropOnOpen",
        "metrics.address=127.0.0.1:0",
    ]);
    // Both the kernel's: read-ahead is left alone (see `mount::lift_dirty_limit`), and the
    // strict dirty-page limit is only lifted with the writeback cache.
    wait_for_bdi(&v, "read_ahead_kb", "128");
    wait_for_bdi(&v, "strict_limit", "1");
    let size = 32 << 20;
    fs::write(v.source_path("big"), vec![9u8; size]).unwrap();
    assert_eq!(fs::read(v.path("big")).unwrap().len(), size);
    let reads = operations(&v, "read");
    // 32 MiB in 128 KiB requests is 256 (and a short one at the end), not one per page.
    assert!(
        (256.0..=270.0).contains(&reads),
        "{reads} read requests for 32 MiB"
    );
}

#[test]
fn a_listing_carries_each_entrys_attributes_and_every_entry_is_forgotten_again() {
    let v = Volume::start(&["layers=metrics", "metrics.address=127.0.0.1:0"]);
    fs::create_dir(v.source_path("d")).unwrap();
    for i in 0..50 {
        fs::write(v.source_path(&format!("d/f{i:02}")), format!("{i}")).unwrap();
    }
    let names: Vec<_> = fs::read_dir(v.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 50);
    let listed = Command::new("ls")
        .env("LC_ALL", "C")
        .arg("-a")
        .arg(v.path("d"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.lines().take(2).eq([".", ".."]), "{listed}");
    // `ls -l`, `find` and `grep -r` stat or open what they listed: no LOOKUP per file.
    let lookups = operations(&v, "lookup");
    for name in &names {
        let path = v.path("d").join(name);
        let i: usize = name.to_string_lossy()[1..].parse().unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            format!("{i}").len() as u64
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{i}"));
    }
    assert_eq!(
        operations(&v, "lookup") - lookups,
        0.0,
        "lookups after a listing"
    );
    // Each listed entry counted as one kernel reference: all are let go when the kernel drops
    // its dentries (a count too low would have failed the opens above; too high stays here).
    assert_eq!(inodes(&v), 52.0, "root, d and its 50 files");
    // A listing longer than one reply: the entry that did not fit is let go at once.
    fs::create_dir(v.source_path("big")).unwrap();
    for i in 0..600 {
        fs::write(
            v.source_path(&format!("big/a-longer-file-name-{i:03}")),
            b"",
        )
        .unwrap();
    }
    assert_eq!(fs::read_dir(v.path("big")).unwrap().count(), 600);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        if inodes(&v) == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} inodes still known",
            inodes(&v)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `interposer_inodes`: what the daemon holds for the kernel.
fn inodes(v: &Volume) -> f64 {
    http_get(&v.metrics_url())
        .lines()
        .find(|l| l.starts_with("interposer_inodes{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// Operations `op` counted by the metrics layer, whatever their result.
fn operations(v: &Volume, op: &str) -> f64 {
    let label = format!(r#"op="{op}""#);
    http_get(&v.metrics_url())
        .lines()
        .filter(|l| l.starts_with("interposer_operations_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn with_the_writeback_cache_small_writes_reach_the_daemon_merged_and_close_writes_them() {
    use std::io::{Seek, SeekFrom};
    let v = Volume::start(&[
        "layers=metrics",
        "pageCache=writeback",
        "metrics.address=127.0.0.1:0",
    ]);
    // Dirty pages count as a local disk's (see `mount::tune_bdi`).
    wait_for_bdi(&v, "strict_limit", "0");
    // 4 MiB in 4 KiB write(2)s: 1,024 WRITE requests without the cache.
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let mut f = fs::File::create(v.path("log")).unwrap();
    for _ in 0..1024 {
        f.write_all(&block).unwrap();
    }
    drop(f);
    // close() has written everything back: SOURCE holds it, byte for byte.
    let written = fs::read(v.source_path("log")).unwrap();
    assert_eq!(written.len(), 4 << 20);
    assert!(written.chunks(4096).all(|c| c == block.as_slice()));
    let writes = operations(&v, "write");
    assert!(
        (1.0..=64.0).contains(&writes),
        "{writes} write requests for 1,024 writes of 4 KiB"
    );

    // A write-only descriptor: the kernel reads the rest of the page through our handle.
    fs::write(v.source_path("page"), vec![b'a'; 10_000]).unwrap();
    let mut w = fs::OpenOptions::new()
        .write(true)
        .open(v.path("page"))
        .unwrap();
    w.seek(SeekFrom::Start(5000)).unwrap();
    w.write_all(b"XY").unwrap();
    drop(w);
    let page = fs::read(v.source_path("page")).unwrap();
    assert_eq!(page.len(), 10_000);
    assert_eq!(&page[4998..5004], b"aaXYaa");

    // Appends land at the end the kernel knows, even with data still cached.
    let mut a = fs::OpenOptions::new()
        .append(true)
        .open(v.path("page"))
        .unwrap();
    a.write_all(b"one").unwrap();
    a.write_all(b"two").unwrap();
    a.sync_all().unwrap();
    let page = fs::read(v.source_path("page")).unwrap();
    assert_eq!(page.len(), 10_006);
    assert!(page.ends_with(b"aonetwo"));
}

#[test]
fn pages_written_through_the_mount_stay_cached_and_a_change_behind_it_is_read_fresh() {
    // The kernel is asked to drop pages over /dev/fuse, whichever transport serves requests.
    for transport in ["uring=on", "uring=off"] {
        cached_pages_follow_source(transport);
    }
}

fn cached_pages_follow_source(transport: &str) {
    // No attribute caching: every stat and open asks the daemon.
    let v = Volume::start(&[
        "layers=metrics",
        "metrics.address=127.0.0.1:0",
        "cacheTTL=0s",
        transport,
    ]);
    let ours = vec![b'a'; 8192];
    fs::write(v.path("f"), &ours).unwrap();
    // The stat sees the mtime our write set: the pages it wrote are current and stay.
    fs::metadata(v.path("f")).unwrap();
    let reads = operations(&v, "read");
    assert_eq!(fs::read(v.path("f")).unwrap(), ours);
    assert_eq!(
        operations(&v, "read"),
        reads,
        "{transport}: pages written through the mount were fetched again after a stat"
    );

    // SOURCE changes the file behind the mount: same size, other bytes, another mtime.
    let theirs = vec![b'b'; 8192];
    behind(&v, &theirs, 1 << 30);
    assert_eq!(
        fs::read(v.path("f")).unwrap(),
        theirs,
        "{transport}: the kernel kept pages SOURCE changed behind the mount"
    );
    assert!(operations(&v, "read") > reads);

    // Seen first by a chmod through an open descriptor (no lookup on the way), a change
    // behind the mount is still one.
    let open = fs::File::open(v.path("f")).unwrap();
    let later = vec![b'c'; 8192];
    behind(&v, &later, 1 << 31);
    open.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    let mut read = vec![0; 8192];
    open.read_exact_at(&mut read, 0).unwrap();
    assert_eq!(
        read, later,
        "{transport}: the kernel kept pages SOURCE changed before a chmod"
    );

    // A reader that keeps the file open asks for no attributes: the daemon checks open files
    // itself (every cacheTTL, here its floor of 100 ms).
    let last = vec![b'd'; 8192];
    behind(&v, &last, 1 << 32);
    let deadline = Instant::now() + Duration::from_secs(3);
    while read != last && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        open.read_exact_at(&mut read, 0).unwrap();
    }
    assert_eq!(
        read, last,
        "{transport}: a file held open still read pages SOURCE changed 3 s ago"
    );
}

/// Rewrite `f` in SOURCE behind the mount, with mtime `secs` (set: two writes within one clock
/// tick could share one).
fn behind(v: &Volume, data: &[u8], secs: u64) {
    fs::write(v.source_path("f"), data).unwrap();
    fs::File::options()
        .write(true)
        .open(v.source_path("f"))
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn an_absent_name_is_asked_for_once_and_creating_it_shows_at_once() {
    let v = Volume::start(&[
        "layers=metrics",
        "metrics.address=127.0.0.1:0",
        "cacheTTL=30s",
    ]);
    let before = operations(&v, "lookup");
    for _ in 0..100 {
        assert!(fs::metadata(v.path("missing")).is_err());
    }
    assert_eq!(
        operations(&v, "lookup") - before,
        1.0,
        "the kernel remembered the absence"
    );
    fs::write(v.path("missing"), b"here").unwrap();
    assert_eq!(fs::read(v.path("missing")).unwrap(), b"here");
    assert_eq!(fs::metadata(v.path("missing")).unwrap().len(), 4);
}

/// Round trips (LOOKUP and GETATTR) a `stat` of a known file costs once `wait` has passed.
fn round_trips_of_a_stat_after(ttl: &str, wait: Duration) -> f64 {
    let ttl = format!("cacheTTL={ttl}");
    let v = Volume::start(&["layers=metrics", "metrics.address=127.0.0.1:0", &ttl]);
    fs::write(v.path("f"), b"data").unwrap();
    fs::metadata(v.path("f")).unwrap();
    std::thread::sleep(wait);
    let asked = |v: &Volume| operations(v, "lookup") + operations(v, "getattr");
    let before = asked(&v);
    assert_eq!(fs::metadata(v.path("f")).unwrap().len(), 4);
    asked(&v) - before
}

#[test]
fn cache_ttl_decides_whether_a_later_stat_asks_the_daemon() {
    let wait = Duration::from_millis(1500);
    // The name's LOOKUP, and a GETATTR of the directory for the permission to search it.
    assert!(
        round_trips_of_a_stat_after("1s", wait) >= 1.0,
        "past 1s the kernel asks again"
    );
    assert_eq!(
        round_trips_of_a_stat_after("1m", wait),
        0.0,
        "within cacheTTL the kernel answers itself"
    );
}

#[test]
fn a_lookup_fault_hits_names_a_listing_showed() {
    let v = Volume::start(&[
        "layers=fault",
        "fault.ops=lookup",
        "fault.paths=*.log",
        "fault.errno=ENOENT",
        "fault.probability=1",
    ]);
    fs::create_dir(v.source_path("d")).unwrap();
    for name in ["a.log", "a.txt"] {
        fs::write(v.source_path(&format!("d/{name}")), b"x").unwrap();
    }
    assert_eq!(fs::read_dir(v.path("d")).unwrap().count(), 2);
    // A listing with attributes would have told the kernel about a.log without a LOOKUP.
    assert_eq!(
        fs::metadata(v.path("d/a.log")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(fs::read(v.path("d/a.txt")).unwrap(), b"x");
}

#[test]
fn an_injected_enoent_is_not_remembered_by_the_kernel() {
    let control = tempfile::NamedTempFile::new().unwrap();
    let ctl = format!("control={}", control.path().display());
    let v = Volume::start(&[
        "layers=fault",
        "fault.ops=lookup",
        "fault.errno=ENOENT",
        "fault.probability=1",
        "cacheTTL=30s",
        &ctl,
    ]);
    fs::write(v.source_path("f"), b"data").unwrap();
    assert_eq!(
        fs::metadata(v.path("f")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    v.apply_control(
        control.path(),
        "layers=fault\nfault.ops=lookup\nfault.errno=ENOENT\n",
        "fault settings changed",
    );
    assert_eq!(
        fs::read(v.path("f")).unwrap(),
        b"data",
        "the fault ended, so did the ENOENT"
    );
}

#[test]
fn metrics_counters_equal_the_operations_performed() {
    let v = Volume::start(&[
        "layers=metrics",
        // Every read after an open is counted (none served from kept pages).
        "pageCache=dropOnOpen",
        "metrics.address=127.0.0.1:0",
        "volumeId=vol-7",
        "pvcName=data",
        "pvcNamespace=team",
    ]);
    fs::create_dir(v.path("d1")).unwrap();
    fs::create_dir(v.path("d2")).unwrap();
    let mut f = fs::File::create(v.path("d1/f")).unwrap();
    for _ in 0..10 {
        f.write_all(&[7u8; 4096]).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(v.path("d1/f")).unwrap().len(), 40960);
    fs::remove_file(v.path("d1/f")).unwrap();
    assert!(fs::remove_dir(v.path("d1/nope")).is_err());

    let m = http_get(&v.metrics_url());
    let labels = r#"volume="vol-7",pvc="data",namespace="team""#;
    let get = |s: &str| {
        metric(&m, &format!("interposer_{s}")).unwrap_or_else(|| panic!("no {s} in\n{m}"))
    };
    assert_eq!(
        get(&format!(
            r#"operations_total{{{labels},op="write",result="ok"}}"#
        )),
        10.0
    );
    assert_eq!(
        get(&format!(
            r#"operations_total{{{labels},op="mkdir",result="ok"}}"#
        )),
        2.0
    );
    assert_eq!(
        get(&format!(
            r#"operations_total{{{labels},op="create",result="ok"}}"#
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            r#"operations_total{{{labels},op="unlink",result="ok"}}"#
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            r#"operations_total{{{labels},op="fsync",result="ok"}}"#
        )),
        1.0
    );
    assert_eq!(get(&format!(r#"written_bytes_total{{{labels}}}"#)), 40960.0);
    assert_eq!(get(&format!(r#"read_bytes_total{{{labels}}}"#)), 40960.0);
    assert_eq!(
        get(&format!(
            r#"operation_duration_seconds_count{{{labels},op="write"}}"#
        )),
        10.0
    );
    assert!(
        get(&format!(
            r#"operations_total{{{labels},op="lookup",result="ENOENT"}}"#
        )) >= 1.0
    );
}

// --- A real OTLP/gRPC receiver -------------------------------------------------------------

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

type Attrs = Vec<(String, String)>;

#[derive(Clone, Default)]
struct Receiver {
    /// Each span with its resource attributes.
    spans: Arc<Mutex<Vec<(Attrs, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((resource.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attrs(kv: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Vec<(String, String)> {
    kv.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                _ => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    attrs(&span.attributes)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Start the receiver on a free loopback port; returns its endpoint.
fn start_receiver() -> (Receiver, String, std::sync::mpsc::Sender<()>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let receiver = Receiver::default();
    let svc = TraceServiceServer::new(receiver.clone());
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let stop = async move {
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            };
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_shutdown(addr, stop)
                .await
                .unwrap();
        });
    });
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "OTLP receiver did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (receiver, format!("http://{addr}"), stop_tx)
}

#[test]
fn spans_reach_an_otlp_receiver_with_paths_callers_sessions_and_faults() {
    let (receiver, endpoint, _stop) = start_receiver();
    let v = Volume::start_with_env(
        &[
            "layers=trace,metrics,fault",
            // Every read reaches the layers, so the re-reads below are spans too.
            "pageCache=dropOnOpen",
            "fault.ops=unlink",
            "fault.paths=*.doomed",
            "fault.probability=1",
            "fault.errno=EACCES",
            "pvcName=data",
            "pvcNamespace=team",
            "podName=app-0",
            "nodeName=node-a",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "itest"),
        ],
    );
    fs::create_dir(v.path("d")).unwrap();
    let mut f = fs::File::create(v.path("d/a.txt")).unwrap();
    f.write_all(b"hello spans").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::rename(v.path("d/a.txt"), v.path("d/b.txt")).unwrap();
    assert_eq!(fs::read(v.path("d/b.txt")).unwrap(), b"hello spans");
    fs::write(v.path("x.doomed"), b"").unwrap();
    let e = fs::remove_file(v.path("x.doomed")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));

    let find = |pred: &dyn Fn(&Span) -> bool| -> Option<Span> {
        receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s)
            .find(|s| pred(s))
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let has_all = || {
        find(&|s| s.name == "unlink" && attr(s, "file.path").as_deref() == Some("x.doomed"))
            .is_some()
            && find(&|s| s.name == "read" && attr(s, "file.path").as_deref() == Some("d/b.txt"))
                .is_some()
    };
    while !has_all() {
        assert!(
            Instant::now() < deadline,
            "spans did not arrive; got {:?}",
            receiver
                .spans
                .lock()
                .unwrap()
                .iter()
                .map(|(_, s)| (s.name.clone(), attr(s, "file.path")))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let write = find(&|s| s.name == "write" && attr(s, "file.path").as_deref() == Some("d/a.txt"))
        .expect("write span");
    assert_eq!(
        attr(&write, "process.pid"),
        Some(std::process::id().to_string())
    );
    assert_eq!(attr(&write, "process.user.id").as_deref(), Some("0"));
    assert_eq!(attr(&write, "process.group.id").as_deref(), Some("0"));
    assert!(attr(&write, "process.executable.name").is_some());
    assert_eq!(attr(&write, "interposer.offset").as_deref(), Some("0"));
    assert_eq!(attr(&write, "interposer.size").as_deref(), Some("11"));
    assert_eq!(attr(&write, "interposer.bytes").as_deref(), Some("11"));

    let session = find(&|s| s.span_id == write.parent_span_id).expect("the write's parent span");
    assert_eq!(session.name, "file.session");
    assert_eq!(attr(&session, "file.path").as_deref(), Some("d/a.txt"));
    let create =
        find(&|s| s.name == "create" && attr(s, "file.path").as_deref() == Some("d/a.txt"))
            .expect("create span");
    assert_eq!(
        create.parent_span_id, session.span_id,
        "create belongs to the session it opened"
    );

    let rename = find(&|s| s.name == "rename").expect("rename span");
    assert_eq!(attr(&rename, "file.path").as_deref(), Some("d/a.txt"));
    assert_eq!(
        attr(&rename, "interposer.new_path").as_deref(),
        Some("d/b.txt")
    );

    let unlink =
        find(&|s| s.name == "unlink" && attr(s, "file.path").as_deref() == Some("x.doomed"))
            .unwrap();
    assert_eq!(attr(&unlink, "error.type").as_deref(), Some("EACCES"));
    assert!(
        unlink.events.iter().any(|e| e.name == "fault.injected"),
        "the injected fault is an event"
    );

    let resource = receiver.spans.lock().unwrap()[0].0.clone();
    let res = |k: &str| {
        resource
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(res("service.name").as_deref(), Some("itest"));
    assert_eq!(res("k8s.pvc.name").as_deref(), Some("data"));
    // The pod (learnt at publish, so it can change while the volume runs) is a resource
    // attribute too, sent with each batch, not with each span.
    assert_eq!(res("k8s.pod.name").as_deref(), Some("app-0"));
    assert_eq!(attr(&write, "k8s.pod.name"), None);
    assert_eq!(res("k8s.node.name").as_deref(), Some("node-a"));
}

#[test]
fn spans_after_a_pod_change_carry_the_new_pod_and_spans_before_it_the_old() {
    let (receiver, endpoint, _stop) = start_receiver();
    let control = tempfile::NamedTempFile::new().unwrap();
    let ctl = format!("control={}", control.path().display());
    let v = Volume::start_with_env(
        &[
            "layers=trace",
            "trace.fileSpans=false",
            "podName=app-0",
            &ctl,
        ],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    fs::write(v.path("before"), b"").unwrap();
    v.apply_control(
        control.path(),
        "podName=app-1\npodNamespace=team\n",
        "spans from now on carry k8s.namespace.name=team",
    );
    fs::write(v.path("after"), b"").unwrap();

    let pod_of = |path: &str| -> Option<(Option<String>, Option<String>)> {
        let spans = receiver.spans.lock().unwrap();
        let (resource, _) = spans
            .iter()
            .find(|(_, s)| s.name == "create" && attr(s, "file.path").as_deref() == Some(path))?;
        let res = |k: &str| {
            resource
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        Some((res("k8s.pod.name"), res("k8s.namespace.name")))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while pod_of("before").is_none() || pod_of("after").is_none() {
        assert!(Instant::now() < deadline, "the create spans did not arrive");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pod_of("before"), Some((Some("app-0".into()), None)));
    assert_eq!(
        pod_of("after"),
        Some((Some("app-1".into()), Some("team".into())))
    );
}

#[test]
fn io_and_unmount_keep_working_when_no_collector_listens() {
    // Port 9 (discard) on loopback: nothing listens; exports fail, I/O must not notice.
    let mut v = Volume::start_with_env(
        &["layers=trace"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")],
    );
    let t = Instant::now();
    for i in 0..2000 {
        fs::write(v.path(&format!("f{}", i % 50)), b"payload").unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "I/O stalled behind a dead collector: {:?}",
        t.elapsed()
    );
    // Nor does it hold up the unmount: the spans still queued get a short last chance.
    let t = Instant::now();
    let status = v.stop().expect("the daemon ran");
    assert!(status.success(), "daemon exit: {status}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the daemon took {:?} to exit after its unmount, waiting for a dead collector",
        t.elapsed()
    );
}

/// The control file retunes a running volume: faults switch on and off, a bad value changes
/// nothing, and the mount stays up throughout (no remount).
#[test]
fn faults_switch_on_and_off_on_a_running_volume_through_the_control_file() {
    let control = tempfile::NamedTempFile::new().unwrap();
    let ctl = format!("control={}", control.path().display());
    // dropOnOpen: every read after an open reaches the layers (not the kernel's page cache).
    let v = Volume::start(&[
        "layers=fault,throttle",
        "fault.ops=read",
        "pageCache=dropOnOpen",
        &ctl,
    ]);
    fs::write(v.path("f"), b"data").unwrap();
    // Each open drops the kernel's cached pages, so every read reaches the daemon.
    let read = || fs::read(v.path("f"));
    // Wait for the daemon to have applied the file: it logs each change.
    let apply =
        |text: &str, expect_in_log: &str| v.apply_control(control.path(), text, expect_in_log);
    assert_eq!(read().unwrap(), b"data");
    apply(
        "layers=fault,throttle\nfault.ops=read\nfault.probability=1\nfault.errno=EACCES\n",
        "fault settings changed",
    );
    assert_eq!(read().unwrap_err().raw_os_error(), Some(libc::EACCES));
    apply(
        "layers=fault,throttle\nfault.probability=2\n",
        "the volume keeps its settings",
    );
    assert_eq!(
        read().unwrap_err().raw_os_error(),
        Some(libc::EACCES),
        "a refused value leaves the volume as it was"
    );
    apply(
        "layers=fault,throttle\nfault.ops=read\n",
        "fault settings changed",
    );
    assert_eq!(read().unwrap(), b"data", "back to the StorageClass value");
    apply(
        "layers=fault,throttle\nfault.ops=read\nthrottle.readIOPS=5\n",
        "throttle settings changed",
    );
    let t = Instant::now();
    for _ in 0..10 {
        read().unwrap();
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "10 reads at 5 IOPS took {:?}",
        t.elapsed()
    );
}

#[test]
fn sampling_keeps_or_leaves_out_a_file_session_whole() {
    let (receiver, endpoint, _stop) = start_receiver();
    let mut v = Volume::start_with_env(
        &["layers=trace", "trace.sampleRatio=0.5"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    const FILES: usize = 200;
    for i in 0..FILES {
        fs::write(v.path(&format!("f{i}")), b"x").unwrap();
    }
    // The daemon sends what it holds before it exits.
    assert!(
        v.stop().is_some_and(|s| s.success()),
        "the daemon exits cleanly"
    );
    let spans = receiver.spans.lock().unwrap();
    let mut sessions = 0;
    for i in 0..FILES {
        let path = format!("f{i}");
        let count = |name: &str| {
            spans
                .iter()
                .filter(|(_, s)| s.name == name && attr(s, "file.path").as_deref() == Some(&path))
                .count()
        };
        let (session, create, write) = (count("file.session"), count("create"), count("write"));
        assert!(
            matches!((session, create, write), (0, 0, 0) | (1, 1, 1)),
            "{path}: {session} session, {create} create, {write} write spans: a session's \
             operations are sampled with it"
        );
        sessions += session;
    }
    assert!(
        (FILES / 5..=FILES * 4 / 5).contains(&sessions),
        "{sessions} of {FILES} sessions sampled at a ratio of 0.5"
    );
}

#[test]
fn span_counters_show_spans_exported_and_spans_the_collector_never_took() {
    let count = |v: &Volume, outcome: &str| {
        let m = http_get(&v.metrics_url());
        let series = format!(r#"interposer_trace_spans_total{{volume="mnt",outcome="{outcome}"}}"#);
        metric(&m, &series).unwrap_or_else(|| panic!("no {series} in\n{m}"))
    };
    let work = |v: &Volume| {
        for i in 0..20 {
            fs::write(v.path(&format!("f{i}")), b"x").unwrap();
        }
    };
    let settled = |v: &Volume, outcome: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while count(v, outcome) < count(v, "recorded") {
            assert!(
                Instant::now() < deadline,
                "{outcome} spans never caught up with recorded"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let (receiver, endpoint, _stop) = start_receiver();
    let v = Volume::start_with_env(
        &["layers=trace,metrics", "metrics.address=127.0.0.1:0"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    work(&v);
    settled(&v, "exported");
    let received = receiver.spans.lock().unwrap().len() as f64;
    assert!(received >= 60.0, "3 spans or more per file, got {received}");
    assert_eq!(count(&v, "exported"), received);
    assert_eq!(count(&v, "recorded"), received);
    assert_eq!(count(&v, "failed"), 0.0);
    drop(v);

    // A port nobody listens on: every batch fails once its retries are spent.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let v = Volume::start_with_env(
        &["layers=trace,metrics", "metrics.address=127.0.0.1:0"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    work(&v);
    settled(&v, "failed");
    assert!(count(&v, "failed") >= 60.0);
    assert_eq!(count(&v, "exported"), 0.0);
}
