//! The parameter contract (v1): one flat string map, validated once.
//!
//! The same keys arrive as StorageClass `parameters`, as PV `volumeAttributes` and as
//! `interposer-fs -o key=value`. This module is the only place that knows them, so the CSI driver
//! and the command line refuse exactly the same input with exactly the same message.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::fs::op::{Op, OpSet};
use crate::glob::Glob;

/// A refused parameter: which key, what was wrong, and what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown parameter {key:?}; known parameters: {known}")]
    UnknownKey { key: String, known: String },
    #[error("parameter {key:?}: {value:?} is not valid; expected {expected}")]
    BadValue {
        key: String,
        value: String,
        expected: String,
    },
}

impl ParamError {
    fn bad(key: &str, value: &str, expected: impl Into<String>) -> Self {
        ParamError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// The key this error is about.
    pub fn key(&self) -> &str {
        match self {
            ParamError::UnknownKey { key, .. } | ParamError::BadValue { key, .. } => key,
        }
    }
}

/// A layer of the interposer stack, as named in `layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Trace,
    Metrics,
    Fault,
    Throttle,
}

impl LayerKind {
    pub const ALL: [LayerKind; 4] = [
        LayerKind::Trace,
        LayerKind::Metrics,
        LayerKind::Fault,
        LayerKind::Throttle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Trace => "trace",
            LayerKind::Metrics => "metrics",
            LayerKind::Fault => "fault",
            LayerKind::Throttle => "throttle",
        }
    }
}

/// Storage backend of a volume (used by the CSI driver; carried here so one parser validates all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Dir,
    Pvc,
}

/// What the kernel does with a file's cached pages when the file is opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageCache {
    /// Keep them, as a native filesystem does: the volume sees the I/O the disk would see.
    /// Changes made to SOURCE behind the mount are noticed when attributes are refreshed.
    #[default]
    Keep,
    /// Drop them at every open, so every read of a newly opened file reaches the layers
    /// (each read traced, counted, open to faults) at the cost of re-reading cached data.
    DropOnOpen,
    /// Keep them, and let `write(2)` return once the data is in the page cache, as natively
    /// (the kernel's FUSE writeback cache). The layers see writes when the kernel flushes
    /// them: merged into large requests, from the kernel's flusher rather than the writing
    /// process, at the latest on `close`/`fsync`, whose callers see any error.
    Writeback,
}

/// `trace.*` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceParams {
    /// Fraction of root spans kept (file sessions and lone operations), 0..=1.
    pub sample_ratio: f64,
    /// Operations that get a span.
    pub ops: OpSet,
    /// Whether an open-file session (open → release) gets a parent span.
    pub file_spans: bool,
}

impl Default for TraceParams {
    fn default() -> Self {
        TraceParams {
            sample_ratio: 1.0,
            ops: OpSet::all(),
            file_spans: true,
        }
    }
}

/// `fault.*` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultParams {
    /// The errno returned by an injected failure (positive).
    pub errno: i32,
    /// Probability that a matching operation fails, 0..=1.
    pub probability: f64,
    pub ops: OpSet,
    pub paths: Glob,
    /// `None` means "choose one at start and log it", so any run can be replayed.
    pub seed: Option<u64>,
    /// Delay added to a matching operation (zero: none).
    pub delay: Duration,
    /// Probability that a matching operation is delayed, 0..=1.
    pub delay_probability: f64,
}

impl Default for FaultParams {
    fn default() -> Self {
        FaultParams {
            errno: libc::EIO,
            probability: 0.0,
            ops: OpSet::all(),
            paths: Glob::new("**").expect("the default glob is valid"),
            seed: None,
            delay: Duration::ZERO,
            delay_probability: 0.0,
        }
    }
}

/// `throttle.*` settings; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ThrottleParams {
    pub read_bytes_per_second: Option<u64>,
    pub write_bytes_per_second: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    /// Seconds of quota that may be spent at once (bucket depth = rate × burst).
    pub burst: f64,
}

impl ThrottleParams {
    pub fn is_unlimited(&self) -> bool {
        self.read_bytes_per_second.is_none()
            && self.write_bytes_per_second.is_none()
            && self.read_iops.is_none()
            && self.write_iops.is_none()
    }
}

/// Every volume parameter of the contract, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeParams {
    /// Layers, outermost first.
    pub layers: Vec<LayerKind>,
    pub backend: Backend,
    pub backing_storage_class: Option<String>,
    /// `(namespace, name)` of an existing PVC to wrap.
    pub backing_claim: Option<(String, String)>,
    pub page_cache: PageCache,
    /// How long the kernel may trust a name (also an absent one) and attributes it was given.
    /// Changes made to SOURCE behind the mount show after at most this long; changes made
    /// through the mount show at once, so a volume nothing else writes can trust them long.
    pub cache_ttl: Duration,
    pub trace: TraceParams,
    pub fault: FaultParams,
    pub throttle: ThrottleParams,
}

impl Default for VolumeParams {
    fn default() -> Self {
        VolumeParams {
            layers: vec![LayerKind::Trace, LayerKind::Metrics],
            backend: Backend::Dir,
            backing_storage_class: None,
            backing_claim: None,
            page_cache: PageCache::Keep,
            cache_ttl: DEFAULT_CACHE_TTL,
            trace: TraceParams::default(),
            fault: FaultParams::default(),
            throttle: ThrottleParams {
                burst: 1.0,
                ..ThrottleParams::default()
            },
        }
    }
}

/// `cacheTTL`'s default: a change made to SOURCE behind the mount shows within a second.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);

/// The keys of the contract with their accepted form, in the order `--help` shows them.
pub const KEYS: &[(&str, &str)] = &[
    (
        "layers",
        "comma list of trace, metrics, fault, throttle, outermost first; empty = plain passthrough (default trace,metrics)",
    ),
    ("backend", "dir or pvc (default dir)"),
    (
        "backingStorageClass",
        "StorageClass of the backing PVC (backend pvc)",
    ),
    (
        "backingClaim",
        "namespace/name of an existing PVC to wrap (static volumes)",
    ),
    (
        "pageCache",
        "keep (cached pages survive reopening, as natively), dropOnOpen (every read after an open reaches the layers) or writeback (keep, and writes are cached and reach the layers merged, by close or fsync at the latest) (default keep)",
    ),
    (
        "cacheTTL",
        "duration up to 1h (0s: ask every time) the kernel trusts names, also absent ones, and attributes; changes made through the mount show at once, changes made to SOURCE behind it after at most this long (default 1s)",
    ),
    ("trace.sampleRatio", "number in 0..1 (default 1)"),
    (
        "trace.ops",
        "all, or a comma list of operation names (default all)",
    ),
    (
        "trace.fileSpans",
        "true or false: a parent span per open-file session (default true)",
    ),
    (
        "fault.errno",
        "an errno name such as EIO, ENOSPC, EACCES (default EIO)",
    ),
    (
        "fault.probability",
        "number in 0..1, per matching operation (default 0)",
    ),
    (
        "fault.ops",
        "all, or a comma list of operation names (default all)",
    ),
    (
        "fault.paths",
        "glob on the path inside the volume: * within a name, ** across names, ? one character (default **)",
    ),
    (
        "fault.seed",
        "unsigned 64-bit integer; same seed + same operations = same faults (default random, logged)",
    ),
    (
        "fault.delay",
        "duration such as 50ms, 1s, 250us added to matching operations (default 0)",
    ),
    (
        "fault.delayProbability",
        "number in 0..1 (default 1 when fault.delay is set)",
    ),
    (
        "throttle.readBytesPerSecond",
        "Kubernetes quantity such as 10Mi, 500k (default unlimited)",
    ),
    (
        "throttle.writeBytesPerSecond",
        "Kubernetes quantity such as 10Mi, 500k (default unlimited)",
    ),
    ("throttle.readIOPS", "positive integer (default unlimited)"),
    ("throttle.writeIOPS", "positive integer (default unlimited)"),
    (
        "throttle.burst",
        "seconds of quota that may be spent at once, > 0 (default 1)",
    ),
];

/// Whether `key` belongs to the volume parameter contract.
pub fn is_volume_key(key: &str) -> bool {
    KEYS.iter().any(|(k, _)| *k == key)
}

fn known_keys() -> String {
    KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

impl VolumeParams {
    /// Validate a parameter map. Every key must be known; every value must parse.
    pub fn parse<'a>(
        map: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<VolumeParams, ParamError> {
        let mut p = VolumeParams::default();
        let mut delay_probability_set = false;
        let map: BTreeMap<&str, &str> = map.into_iter().collect();
        for (&key, &value) in &map {
            let v = value.trim();
            match key {
                "layers" => p.layers = parse_layers(key, v)?,
                "backend" => {
                    p.backend = match v {
                        "dir" => Backend::Dir,
                        "pvc" => Backend::Pvc,
                        _ => return Err(ParamError::bad(key, value, "dir or pvc")),
                    }
                }
                "backingStorageClass" => {
                    if !is_dns_subdomain(v) {
                        return Err(ParamError::bad(
                            key,
                            value,
                            "a StorageClass name (DNS subdomain)",
                        ));
                    }
                    p.backing_storage_class = Some(v.to_string());
                }
                "backingClaim" => {
                    let parsed = v
                        .split_once('/')
                        .filter(|(ns, name)| is_dns_label(ns) && is_dns_subdomain(name));
                    match parsed {
                        Some((ns, name)) => {
                            p.backing_claim = Some((ns.to_string(), name.to_string()))
                        }
                        None => return Err(ParamError::bad(key, value, "namespace/name")),
                    }
                }
                "pageCache" => {
                    p.page_cache = match v {
                        "keep" => PageCache::Keep,
                        "dropOnOpen" => PageCache::DropOnOpen,
                        "writeback" => PageCache::Writeback,
                        _ => {
                            return Err(ParamError::bad(
                                key,
                                value,
                                "keep, dropOnOpen or writeback",
                            ));
                        }
                    }
                }
                "cacheTTL" => p.cache_ttl = parse_duration(key, v)?,
                "trace.sampleRatio" => p.trace.sample_ratio = parse_ratio(key, v)?,
                "trace.ops" => p.trace.ops = parse_ops(key, v)?,
                "trace.fileSpans" => p.trace.file_spans = parse_bool(key, v)?,
                "fault.errno" => {
                    p.fault.errno = errno_from_name(v).ok_or_else(|| {
                        ParamError::bad(key, value, "an errno name such as EIO, ENOSPC, EACCES")
                    })?
                }
                "fault.probability" => p.fault.probability = parse_ratio(key, v)?,
                "fault.ops" => p.fault.ops = parse_ops(key, v)?,
                "fault.paths" => {
                    p.fault.paths = Glob::new(v).map_err(|e| ParamError::bad(key, value, e))?
                }
                "fault.seed" => {
                    p.fault.seed =
                        Some(v.parse::<u64>().map_err(|_| {
                            ParamError::bad(key, value, "an unsigned 64-bit integer")
                        })?)
                }
                "fault.delay" => p.fault.delay = parse_duration(key, v)?,
                "fault.delayProbability" => {
                    p.fault.delay_probability = parse_ratio(key, v)?;
                    delay_probability_set = true;
                }
                "throttle.readBytesPerSecond" => {
                    p.throttle.read_bytes_per_second = Some(parse_quantity(key, v)?)
                }
                "throttle.writeBytesPerSecond" => {
                    p.throttle.write_bytes_per_second = Some(parse_quantity(key, v)?)
                }
                "throttle.readIOPS" => p.throttle.read_iops = Some(parse_positive(key, v)?),
                "throttle.writeIOPS" => p.throttle.write_iops = Some(parse_positive(key, v)?),
                "throttle.burst" => {
                    let b: f64 = v.parse().map_err(|_| {
                        ParamError::bad(key, value, "a number of seconds greater than 0")
                    })?;
                    if !(b.is_finite() && b > 0.0 && b <= 3600.0) {
                        return Err(ParamError::bad(
                            key,
                            value,
                            "a number of seconds in (0, 3600]",
                        ));
                    }
                    p.throttle.burst = b;
                }
                _ => {
                    return Err(ParamError::UnknownKey {
                        key: key.to_string(),
                        known: known_keys(),
                    });
                }
            }
        }
        if !p.fault.delay.is_zero() && !delay_probability_set {
            p.fault.delay_probability = 1.0;
        }
        if p.backend == Backend::Pvc
            && p.backing_storage_class.is_none()
            && p.backing_claim.is_none()
        {
            return Err(ParamError::bad(
                "backend",
                "pvc",
                "backend pvc together with backingStorageClass or backingClaim",
            ));
        }
        if p.backing_storage_class.is_some() && p.backing_claim.is_some() {
            return Err(ParamError::bad(
                "backingClaim",
                map["backingClaim"],
                "either backingStorageClass or backingClaim, not both",
            ));
        }
        Ok(p)
    }

    pub fn has_layer(&self, kind: LayerKind) -> bool {
        self.layers.contains(&kind)
    }
}

fn parse_layers(key: &str, v: &str) -> Result<Vec<LayerKind>, ParamError> {
    let mut layers = Vec::new();
    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind = LayerKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                ParamError::bad(
                    key,
                    v,
                    "a comma list of trace, metrics, fault, throttle (outermost first)",
                )
            })?;
        if layers.contains(&kind) {
            return Err(ParamError::bad(key, v, "each layer at most once"));
        }
        layers.push(kind);
    }
    Ok(layers)
}

fn parse_ops(key: &str, v: &str) -> Result<OpSet, ParamError> {
    if v == "all" {
        return Ok(OpSet::all());
    }
    let mut set = OpSet::empty();
    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let op = Op::from_name(name).ok_or_else(|| {
            ParamError::bad(
                key,
                v,
                format!(
                    "all, or a comma list of: {}",
                    Op::ALL
                        .iter()
                        .map(|o| o.name())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            )
        })?;
        set.insert(op);
    }
    if set.is_empty() {
        return Err(ParamError::bad(
            key,
            v,
            "all, or at least one operation name",
        ));
    }
    Ok(set)
}

fn parse_ratio(key: &str, v: &str) -> Result<f64, ParamError> {
    match v.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(ParamError::bad(key, v, "a number in 0..1")),
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ParamError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ParamError::bad(key, v, "true or false")),
    }
}

fn parse_positive(key: &str, v: &str) -> Result<u64, ParamError> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ParamError::bad(key, v, "a positive integer")),
    }
}

/// A duration as Kubernetes and Go write them: `250us`, `50ms`, `1s`, `2m`, `1.5s`.
pub fn parse_duration(key: &str, v: &str) -> Result<Duration, ParamError> {
    let expected = "a duration such as 50ms, 1s, 250us (units: ns, us, ms, s, m, h)";
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| ParamError::bad(key, v, expected))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().map_err(|_| ParamError::bad(key, v, expected))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(ParamError::bad(key, v, expected)),
    };
    let secs = n * scale;
    if !secs.is_finite() || !(0.0..=3600.0).contains(&secs) {
        return Err(ParamError::bad(key, v, "a duration of at most 1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A Kubernetes resource quantity as a whole number: `10Mi`, `500k`, `1G`, `1048576`.
pub fn parse_quantity(key: &str, v: &str) -> Result<u64, ParamError> {
    let expected = "a Kubernetes quantity such as 10Mi, 500k, 1G or a plain integer, > 0";
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let n: f64 = num.parse().map_err(|_| ParamError::bad(key, v, expected))?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(ParamError::bad(key, v, expected)),
    };
    let total = n * mult;
    if !total.is_finite() || total < 1.0 || total > u64::MAX as f64 {
        return Err(ParamError::bad(key, v, expected));
    }
    Ok(total as u64)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Errno names accepted by `fault.errno`, with their Linux numbers.
pub const ERRNOS: &[(&str, i32)] = &[
    ("EPERM", libc::EPERM),
    ("ENOENT", libc::ENOENT),
    ("EINTR", libc::EINTR),
    ("EIO", libc::EIO),
    ("ENXIO", libc::ENXIO),
    ("E2BIG", libc::E2BIG),
    ("EBADF", libc::EBADF),
    ("EAGAIN", libc::EAGAIN),
    ("ENOMEM", libc::ENOMEM),
    ("EACCES", libc::EACCES),
    ("EFAULT", libc::EFAULT),
    ("EBUSY", libc::EBUSY),
    ("EEXIST", libc::EEXIST),
    ("EXDEV", libc::EXDEV),
    ("ENODEV", libc::ENODEV),
    ("ENOTDIR", libc::ENOTDIR),
    ("EISDIR", libc::EISDIR),
    ("EINVAL", libc::EINVAL),
    ("ENFILE", libc::ENFILE),
    ("EMFILE", libc::EMFILE),
    ("ETXTBSY", libc::ETXTBSY),
    ("EFBIG", libc::EFBIG),
    ("ENOSPC", libc::ENOSPC),
    ("ESPIPE", libc::ESPIPE),
    ("EROFS", libc::EROFS),
    ("EMLINK", libc::EMLINK),
    ("ERANGE", libc::ERANGE),
    ("EDEADLK", libc::EDEADLK),
    ("ENAMETOOLONG", libc::ENAMETOOLONG),
    ("ENOLCK", libc::ENOLCK),
    ("ENOSYS", libc::ENOSYS),
    ("ENOTEMPTY", libc::ENOTEMPTY),
    ("ELOOP", libc::ELOOP),
    ("ENODATA", libc::ENODATA),
    ("EOVERFLOW", libc::EOVERFLOW),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("ESTALE", libc::ESTALE),
    ("EDQUOT", libc::EDQUOT),
    ("ECANCELED", libc::ECANCELED),
    ("ENOTCONN", libc::ENOTCONN),
    ("ECONNRESET", libc::ECONNRESET),
];

/// `EIO` → 5. Case-sensitive, as errno names are written.
pub fn errno_from_name(name: &str) -> Option<i32> {
    ERRNOS.iter().find(|(n, _)| *n == name).map(|(_, e)| *e)
}

/// 5 → `EIO`; unknown numbers come back as `E<number>`.
pub fn errno_name(errno: i32) -> std::borrow::Cow<'static, str> {
    if errno == libc::ENOTSUP {
        return "EOPNOTSUPP".into();
    }
    match ERRNOS.iter().find(|(_, e)| *e == errno) {
        Some((n, _)) => (*n).into(),
        None => format!("E{errno}").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<VolumeParams, ParamError> {
        VolumeParams::parse(pairs.iter().copied())
    }

    #[test]
    fn empty_map_gives_the_documented_defaults() {
        let p = parse(&[]).unwrap();
        assert_eq!(p.layers, vec![LayerKind::Trace, LayerKind::Metrics]);
        assert_eq!(p.backend, Backend::Dir);
        assert_eq!(p.fault.errno, libc::EIO);
        assert_eq!(p.fault.probability, 0.0);
        assert_eq!(p.throttle.burst, 1.0);
        assert!(p.throttle.is_unlimited());
        assert_eq!(p.page_cache, PageCache::Keep);
        assert_eq!(p.cache_ttl, Duration::from_secs(1));
        assert!(p.trace.file_spans);
    }

    #[test]
    fn every_documented_key_parses_with_its_example_value() {
        let p = parse(&[
            ("layers", "throttle,fault,metrics,trace"),
            ("trace.sampleRatio", "0.25"),
            ("trace.ops", "read,write"),
            ("trace.fileSpans", "false"),
            ("fault.errno", "ENOSPC"),
            ("fault.probability", "0.5"),
            ("fault.ops", "write"),
            ("fault.paths", "**/*.log"),
            ("fault.seed", "42"),
            ("fault.delay", "50ms"),
            ("throttle.readBytesPerSecond", "10Mi"),
            ("throttle.writeBytesPerSecond", "500k"),
            ("throttle.readIOPS", "100"),
            ("throttle.writeIOPS", "50"),
            ("throttle.burst", "0.5"),
            ("pageCache", "dropOnOpen"),
            ("cacheTTL", "1m"),
        ])
        .unwrap();
        assert_eq!(p.page_cache, PageCache::DropOnOpen);
        assert_eq!(p.cache_ttl, Duration::from_secs(60));
        assert_eq!(p.layers[0], LayerKind::Throttle);
        assert_eq!(p.trace.sample_ratio, 0.25);
        assert!(p.trace.ops.contains(Op::Read) && !p.trace.ops.contains(Op::Open));
        assert_eq!(p.fault.errno, libc::ENOSPC);
        assert_eq!(p.fault.seed, Some(42));
        assert_eq!(p.fault.delay, Duration::from_millis(50));
        assert_eq!(
            p.fault.delay_probability, 1.0,
            "delay implies probability 1"
        );
        assert_eq!(p.throttle.read_bytes_per_second, Some(10 * 1024 * 1024));
        assert_eq!(p.throttle.write_bytes_per_second, Some(500_000));
        assert_eq!(p.throttle.write_iops, Some(50));
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let cases: &[(&str, &str)] = &[
            ("layers", "trace,bogus"),
            ("layers", "trace,trace"),
            ("backend", "nfs"),
            ("backingClaim", "no-slash"),
            ("pageCache", "sometimes"),
            ("cacheTTL", "forever"),
            ("cacheTTL", "2h"),
            ("backingClaim", "NS/x"),
            ("backingStorageClass", "Bad_Name"),
            ("trace.sampleRatio", "1.5"),
            ("trace.sampleRatio", "-0.1"),
            ("trace.ops", "read,frobnicate"),
            ("trace.ops", ""),
            ("trace.fileSpans", "yes"),
            ("fault.errno", "EWHATEVER"),
            ("fault.errno", "eio"),
            ("fault.probability", "NaN"),
            ("fault.paths", "a/**b"),
            ("fault.seed", "-1"),
            ("fault.delay", "5"),
            ("fault.delay", "5 parsecs"),
            ("fault.delay", "2h"),
            ("fault.delayProbability", "2"),
            ("throttle.readBytesPerSecond", "10MB"),
            ("throttle.readBytesPerSecond", "0"),
            ("throttle.writeIOPS", "0"),
            ("throttle.readIOPS", "1.5"),
            ("throttle.burst", "0"),
        ];
        for (key, value) in cases {
            let err = parse(&[(key, value)]).expect_err(&format!("{key}={value} must be refused"));
            assert_eq!(err.key(), *key, "{err}");
            assert!(err.to_string().contains("expected"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_the_list_of_known_keys() {
        let err = parse(&[("fault.probabilty", "0.1")]).unwrap_err();
        assert!(matches!(err, ParamError::UnknownKey { .. }));
        assert!(err.to_string().contains("fault.probability"));
    }

    #[test]
    fn pvc_backend_needs_a_source() {
        assert!(parse(&[("backend", "pvc")]).is_err());
        assert!(parse(&[("backend", "pvc"), ("backingStorageClass", "fast")]).is_ok());
        assert!(
            parse(&[("backingStorageClass", "fast"), ("backingClaim", "ns/c")]).is_err(),
            "both sources at once"
        );
    }

    #[test]
    fn quantities_and_durations_parse_like_kubernetes() {
        for (q, n) in [
            ("1", 1),
            ("1k", 1000),
            ("1Ki", 1024),
            ("1.5Mi", 1572864),
            ("2G", 2_000_000_000),
        ] {
            assert_eq!(parse_quantity("k", q).unwrap(), n, "{q}");
        }
        for (d, ms) in [("1s", 1000), ("50ms", 50), ("1.5s", 1500), ("1m", 60_000)] {
            assert_eq!(
                parse_duration("k", d).unwrap(),
                Duration::from_millis(ms),
                "{d}"
            );
        }
        assert_eq!(
            parse_duration("k", "250us").unwrap(),
            Duration::from_micros(250)
        );
    }

    #[test]
    fn errno_names_round_trip() {
        for (name, n) in ERRNOS {
            assert_eq!(errno_from_name(name), Some(*n));
            assert_eq!(errno_name(*n), *name);
        }
        assert_eq!(errno_name(9999), "E9999");
    }
}
