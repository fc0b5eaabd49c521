//! Run one volume: check the input, build the layers, mount, serve until a signal, clean up.
//!
//! Everything that can be refused is refused before mount(2), so a bad option never leaves a
//! mount behind. After the mount, SIGINT/SIGTERM detach it and wake any sleeping fault or
//! throttle wait, and the session ends once the kernel lets go.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::adapter::{CacheConfig, Interposer, PageInvalidator};
use crate::config::DaemonConfig;
use crate::fs::op::OpSet;
use crate::fs::passthrough::Passthrough;
use crate::layers::fault::{self, FaultLayer};
use crate::layers::metrics::{Metrics, MetricsLayer, SpanCounters};
use crate::layers::throttle::ThrottleLayer;
use crate::layers::trace::{LiveResource, TraceLayer};
use crate::layers::{Layer, Shutdown, Stack};
use crate::mount::{self, MountSpec};
use crate::params::{LayerKind, PageCache, VolumeParams, is_volume_key};
use crate::telemetry::metrics_server;
use crate::telemetry::otlp::{self, SpanExport};
use crate::telemetry::span::{Attribute, Value};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("SOURCE {0:?} is not a directory (expected an existing directory to serve)")]
    SourceNotDirectory(PathBuf),
    #[error("MOUNTPOINT {0:?} is not a directory (expected an existing empty directory)")]
    MountpointNotDirectory(PathBuf),
    #[error(
        "MOUNTPOINT {0:?} is already a mount point (unmount it first, or choose another directory)"
    )]
    MountpointInUse(PathBuf),
    #[error("option metrics.address needs the metrics layer (add metrics to layers=)")]
    MetricsAddressWithoutLayer,
    #[error("serving metrics on {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("opening SOURCE {path:?}: {source}")]
    OpenSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
    #[error("mounting at {path:?}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("FUSE session: {0}")]
    Session(#[source] io::Error),
}

/// What was built from the configuration, ready to mount.
struct Prepared {
    fs: Interposer,
    /// Drops stale pages once the session is up; `None` where the kernel drops them itself.
    invalidator: Option<PageInvalidator>,
    live: Arc<LiveResource>,
    tunable: Tunable,
    passthrough: Arc<Passthrough>,
    shutdown: Arc<Shutdown>,
    export: Option<SpanExport>,
}

/// The layers whose settings can change on a running volume, and the settings now in force.
struct Tunable {
    params: VolumeParams,
    fault: Option<Arc<FaultLayer>>,
    throttle: Option<Arc<ThrottleLayer>>,
}

fn check_paths(c: &DaemonConfig) -> Result<(), DaemonError> {
    if !c.source.is_dir() {
        return Err(DaemonError::SourceNotDirectory(c.source.clone()));
    }
    if !c.mountpoint.is_dir() {
        return Err(DaemonError::MountpointNotDirectory(c.mountpoint.clone()));
    }
    match mount::is_mount_point(&c.mountpoint) {
        Ok(false) => Ok(()),
        Ok(true) => Err(DaemonError::MountpointInUse(c.mountpoint.clone())),
        Err(_) => Err(DaemonError::MountpointNotDirectory(c.mountpoint.clone())),
    }
}

fn resource(c: &DaemonConfig) -> Vec<Attribute> {
    let id = &c.identity;
    let mut attrs = vec![(
        "interposer.volume.id",
        Value::Shared(id.volume_id.as_str().into()),
    )];
    let optional = [
        ("k8s.node.name", &id.node_name),
        ("k8s.pvc.name", &id.pvc_name),
        ("k8s.pvc.namespace", &id.pvc_namespace),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            attrs.push((k, Value::Shared(v.as_str().into())));
        }
    }
    attrs
}

fn metric_labels(c: &DaemonConfig) -> Vec<(String, String)> {
    let id = &c.identity;
    let mut labels = vec![("volume".to_string(), id.volume_id.clone())];
    if let Some(p) = &id.pvc_name {
        labels.push(("pvc".into(), p.clone()));
    }
    if let Some(n) = &id.pvc_namespace {
        labels.push(("namespace".into(), n.clone()));
    }
    labels
}

fn prepare(c: &DaemonConfig) -> Result<Prepared, DaemonError> {
    check_paths(c)?;
    let p = &c.params;
    let shutdown = Shutdown::new();
    let metrics = p
        .has_layer(LayerKind::Metrics)
        .then(|| Metrics::new(metric_labels(c)));
    match (&metrics, c.metrics_address) {
        (None, Some(_)) => return Err(DaemonError::MetricsAddressWithoutLayer),
        (Some(m), Some(addr)) => {
            let bound = metrics_server::serve(addr, m.clone())
                .map_err(|source| DaemonError::MetricsListen { addr, source })?;
            eprintln!("interposer-fs: metrics at http://{bound}/metrics");
        }
        _ => {}
    }
    // Counted on the metrics endpoint when there is one.
    let spans = match &metrics {
        Some(m) if p.has_layer(LayerKind::Trace) => m.span_counters(),
        _ => SpanCounters::default(),
    };
    let export = if p.has_layer(LayerKind::Trace) {
        Some(SpanExport::start(resource(c), spans)?)
    } else {
        None
    };
    let live = Arc::new(LiveResource::default());
    for (key, value) in [
        ("k8s.pod.name", &c.identity.pod_name),
        ("k8s.namespace.name", &c.identity.pod_namespace),
    ] {
        if let Some(v) = value {
            live.set(key, v);
        }
    }
    let mut layers: Vec<Box<dyn Layer>> = Vec::new();
    let mut tunable = Tunable {
        params: p.clone(),
        fault: None,
        throttle: None,
    };
    for kind in &p.layers {
        match kind {
            LayerKind::Trace => {
                if let Some(e) = &export {
                    layers.push(Box::new(TraceLayer::new(e.queue(), &p.trace, live.clone())));
                }
            }
            LayerKind::Metrics => {
                if let Some(m) = &metrics {
                    layers.push(Box::new(MetricsLayer::new(m.clone())));
                }
            }
            LayerKind::Fault => {
                let f = Arc::new(FaultLayer::new(
                    p.fault.clone(),
                    shutdown.clone(),
                    metrics.clone(),
                ));
                eprintln!(
                    "interposer-fs: fault seed {} (set fault.seed to replay)",
                    f.seed()
                );
                tunable.fault = Some(f.clone());
                layers.push(Box::new(f));
            }
            LayerKind::Throttle => {
                let t = Arc::new(ThrottleLayer::new(
                    &p.throttle,
                    shutdown.clone(),
                    metrics.clone(),
                ));
                tunable.throttle = Some(t.clone());
                layers.push(Box::new(t));
            }
        }
    }
    let passthrough = Passthrough::new(&c.source, c.capacity)
        .map(Arc::new)
        .map_err(|e| DaemonError::OpenSource {
            path: c.source.clone(),
            source: e.into(),
        })?;
    if !passthrough.inodes().handles_supported() {
        log::warn!(
            "SOURCE's filesystem has no file handles: each known inode will hold a descriptor"
        );
    }
    if let Some(m) = &metrics {
        let p = passthrough.clone();
        m.count_inodes_with(move || p.inodes().len());
    }
    let (fs, invalidator) = Interposer::new(
        passthrough.clone(),
        Stack::new(layers),
        CacheConfig {
            ttl: p.cache_ttl,
            page_cache: p.page_cache,
        },
        c.kernel_passthrough,
        if p.has_layer(LayerKind::Fault) && fault::injects(&p.fault) {
            p.fault.ops
        } else {
            OpSet::empty()
        },
    );
    Ok(Prepared {
        fs,
        invalidator,
        live,
        tunable,
        passthrough,
        shutdown,
        export,
    })
}

/// Threads per CPU queue over io_uring: a request that blocks (a throttle wait, an injected
/// delay, a slow backing call) leaves the other to serve that CPU.
const URING_THREADS_PER_CPU: usize = 2;

/// Serve the volume until SIGINT/SIGTERM. Call with those signals blocked in every thread
/// (see [`block_signals`]), before any other thread starts.
pub fn run(c: DaemonConfig) -> Result<(), DaemonError> {
    crate::fs::sys::set_umask(0);
    crate::fs::sys::raise_open_file_limit();
    let prepared = prepare(&c)?;
    let spec = MountSpec {
        fsname: c.source.to_string_lossy().into_owned(),
        read_only: c.read_only,
        allow_other: c.allow_other,
    };
    let fd: OwnedFd = mount::mount(&c.mountpoint, &spec).map_err(|source| DaemonError::Mount {
        path: c.mountpoint.clone(),
        source,
    })?;
    let acl = if c.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::RootAndOwner
    };
    let mut config = fuser::Config::default();
    config.n_threads = Some(c.threads);
    config.clone_fd = true;
    config.splice_write = c.splice;
    config.spin = c.spin;
    if c.uring {
        config.io_uring_queue_threads = URING_THREADS_PER_CPU;
    }
    let session = match fuser::Session::from_fd(prepared.fs, fd, acl, config) {
        Ok(s) => s,
        Err(e) => {
            let _ = mount::unmount(&c.mountpoint);
            return Err(DaemonError::Session(e));
        }
    };
    if let Some(invalidator) = prepared.invalidator {
        invalidator
            .spawn(session.notifier())
            .map_err(DaemonError::Session)?;
    }
    let signals = Signals {
        mountpoint: c.mountpoint.clone(),
        shutdown: prepared.shutdown.clone(),
        passthrough: prepared.passthrough.clone(),
        live: prepared.live.clone(),
        tunable: prepared.tunable,
        control: c.control.clone(),
    };
    // Not on this thread: the stat inside waits for INIT, which `session.run` answers.
    if c.params.page_cache == PageCache::Writeback {
        let mountpoint = c.mountpoint.clone();
        let tuning = std::thread::Builder::new()
            .name("bdi-tuning".into())
            .spawn(move || {
                if let Err(e) = mount::lift_dirty_limit(&mountpoint) {
                    log::warn!("the mount keeps the kernel's strict dirty-page limit: {e}");
                }
            });
        if let Err(e) = tuning {
            log::warn!(
                "the mount keeps the kernel's strict dirty-page limit: no thread to lift it: {e}"
            );
        }
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || signals.run())
        .map_err(DaemonError::Session)?;
    eprintln!(
        "interposer-fs: serving {} at {} over {} (layers: {})",
        c.source.display(),
        c.mountpoint.display(),
        if session.io_uring() {
            "io_uring"
        } else {
            "/dev/fuse"
        },
        if c.params.layers.is_empty() {
            "none".to_string()
        } else {
            c.params
                .layers
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(",")
        }
    );
    if c.uring && !session.io_uring() {
        eprintln!(
            "interposer-fs: FUSE over io_uring not offered by this kernel (fuse module parameter \
             enable_uring); serving /dev/fuse"
        );
    }
    let result = session.run().map_err(DaemonError::Session);
    prepared.shutdown.trigger();
    if let Some(e) = prepared.export {
        e.shutdown(FINAL_SPAN_FLUSH);
    }
    result
}

/// How long the spans still queued at unmount may take to reach the collector. The volume is
/// already unmounted by then, and the CSI driver waits for this process to end before
/// NodeUnstageVolume answers: a dead or slow collector must not hold that up (an export attempt
/// alone may take its whole 5 s timeout).
const FINAL_SPAN_FLUSH: Duration = Duration::from_secs(1);

/// Block the signals the daemon handles, so that only the signal thread receives them.
pub fn block_signals() -> nix::Result<()> {
    signal_set().thread_block()
}

fn signal_set() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.add(Signal::SIGUSR1);
    set
}

/// The signal thread: SIGUSR1 applies the control file; anything else unmounts.
struct Signals {
    mountpoint: PathBuf,
    shutdown: Arc<Shutdown>,
    passthrough: Arc<Passthrough>,
    live: Arc<LiveResource>,
    tunable: Tunable,
    control: Option<PathBuf>,
}

impl Signals {
    fn run(mut self) {
        loop {
            match signal_set().wait() {
                Ok(nix::sys::signal::Signal::SIGUSR1) => self.apply_control(),
                Ok(sig) => {
                    eprintln!(
                        "interposer-fs: {sig:?}: unmounting {}",
                        self.mountpoint.display()
                    );
                    break;
                }
                Err(e) => {
                    eprintln!("interposer-fs: waiting for signals failed ({e}); unmounting");
                    break;
                }
            }
        }
        self.shutdown.trigger();
        if let Err(e) = mount::unmount(&self.mountpoint) {
            eprintln!("interposer-fs: unmount {}: {e}", self.mountpoint.display());
        }
    }

    /// Read `key=value` lines from the control file and apply what can change live: capacity,
    /// the pod using the volume (podName, podNamespace) for spans, and the volume parameters.
    /// Parameter lines are the volume's whole contract: keys left out take their defaults.
    fn apply_control(&mut self) {
        let Some(path) = &self.control else {
            eprintln!("interposer-fs: SIGUSR1 without a control= file; nothing to do");
            return;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("interposer-fs: reading {}: {e}", path.display());
                return;
            }
        };
        let mut contract = Vec::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            match line.split_once('=') {
                Some((k, v)) if is_volume_key(k) => contract.push((k, v)),
                Some(("capacity", v)) => {
                    match crate::params::parse_quantity("capacity", v.trim()) {
                        Ok(bytes) if self.passthrough.set_capacity(bytes) => {
                            eprintln!("interposer-fs: capacity is now {bytes} bytes")
                        }
                        Ok(_) => eprintln!(
                            "interposer-fs: capacity: this volume was mounted without a size"
                        ),
                        Err(e) => eprintln!("interposer-fs: control: {e}"),
                    }
                }
                Some(("podName", v)) => self.set_live("k8s.pod.name", v),
                Some(("podNamespace", v)) => self.set_live("k8s.namespace.name", v),
                _ => eprintln!(
                    "interposer-fs: control: {line:?} cannot be changed on a running volume"
                ),
            }
        }
        if !contract.is_empty() {
            self.retune(&contract);
        }
    }

    fn set_live(&self, key: &'static str, value: &str) {
        if self.live.set(key, value.trim()) {
            eprintln!(
                "interposer-fs: spans from now on carry {key}={}",
                value.trim()
            );
        }
    }

    /// Apply new volume parameters to the running layers: fault and throttle settings change
    /// at once; anything else needs a new mount and is reported, not applied.
    fn retune(&mut self, contract: &[(&str, &str)]) {
        let p = match VolumeParams::parse(contract.iter().copied()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("interposer-fs: control: {e}; the volume keeps its settings");
                return;
            }
        };
        let old = &self.tunable.params;
        let beyond_fault_and_throttle = VolumeParams {
            fault: old.fault.clone(),
            throttle: old.throttle.clone(),
            ..p.clone()
        };
        if beyond_fault_and_throttle != *old {
            eprintln!(
                "interposer-fs: control: only fault.* and throttle.* change a running volume; the other keys apply at the next mount"
            );
        }
        if let Some(f) = &self.tunable.fault {
            if p.fault != old.fault {
                f.retune(p.fault.clone());
                eprintln!("interposer-fs: fault settings changed: {:?}", p.fault);
            }
        }
        if let Some(t) = &self.tunable.throttle {
            if p.throttle != old.throttle {
                t.retune(&p.throttle);
                eprintln!("interposer-fs: throttle settings changed: {:?}", p.throttle);
            }
        }
        self.tunable.params = p;
    }
}
