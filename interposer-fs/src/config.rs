//! The daemon's configuration: the volume parameters plus daemon-only options, from one
//! `-o key=value` list.
//!
//! Volume keys are the parameter contract (`params`); the keys below only make sense to a
//! running daemon (where to serve metrics, who the volume belongs to for telemetry, FUSE mount
//! flags). Each `-o` carries exactly one `key=value`, because contract values contain commas
//! (`layers=trace,metrics`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::params::{ParamError, VolumeParams, is_volume_key};

/// Threads reading `/dev/fuse`. One caller waiting on one request at a time still goes faster
/// with more threads queued on the device: on a 2-CPU VM, a `getxattr` round trip ran 10% and a
/// GETATTR 18% faster with 8 than with 4 (medians of 10 interleaved runs); 6 to 16 were alike,
/// and libfuse's multi-threaded loop grows to 10. Each idle thread costs about 0.2 MiB.
pub const DEFAULT_THREADS: usize = 8;

/// How long the worker that has just replied polls `/dev/fuse` for the next request before
/// sleeping (`fuser::Config::spin`). On a 2-CPU VM, waking a sleeping worker cost as much as
/// the request: with 5 µs, 4 KiB random writes went from 84,000-92,000 to 139,000-152,000 a
/// second, round trips 20-30% faster, and the daemon's CPU per write rose from 5.0 to 5.2 µs
/// (three interleaved rounds; 2 µs was too short, 20 and 100 µs were no faster and cost more).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(5);

/// The longest `spin` accepted: past that, sleeping is cheaper than polling anywhere.
const MAX_SPIN: Duration = Duration::from_millis(1);

/// Daemon-only options, with their accepted form, for `--help`.
pub const DAEMON_KEYS: &[(&str, &str)] = &[
    (
        "metrics.address",
        "HOST:PORT to serve Prometheus /metrics on (needs the metrics layer); port 0 picks one",
    ),
    (
        "kernelPassthrough",
        "true or false: reads and writes of regular files go straight from the kernel to SOURCE, unseen by layers (default false)",
    ),
    (
        "threads",
        "FUSE worker threads over /dev/fuse, 1..64 (default 8)",
    ),
    (
        "spin",
        "duration up to 1ms: over /dev/fuse, how long the worker that has just replied polls for the next request before sleeping, one worker at a time; 0s never polls (default 5us)",
    ),
    (
        "uring",
        "on or off: serve FUSE over io_uring, two threads per CPU, when the kernel offers it (fuse module parameter enable_uring=Y); /dev/fuse otherwise (default on)",
    ),
    (
        "splice",
        "on or off: over /dev/fuse, move the data of large writes from the kernel to SOURCE with splice(2), never copying it through the daemon (default on)",
    ),
    (
        "capacity",
        "volume size as a quantity (10Gi): writes past it fail with ENOSPC, df shows it (default: none)",
    ),
    (
        "control",
        "a file of key=value lines read on SIGUSR1 to change a running volume (capacity, podName, podNamespace)",
    ),
    (
        "allow_other",
        "flag: let every user use the mount (default on)",
    ),
    ("allow_root_only", "flag: only root may use the mount"),
    ("ro", "flag: mount read-only"),
    ("rw", "flag: mount read-write (default)"),
    (
        "volumeId",
        "volume id for telemetry labels (default: the mount point's name)",
    ),
    (
        "pvcName",
        "PVC name for telemetry labels and resource attributes",
    ),
    ("pvcNamespace", "PVC namespace for telemetry"),
    ("podName", "pod name for telemetry resource attributes"),
    (
        "podNamespace",
        "pod namespace for telemetry resource attributes",
    ),
    ("nodeName", "node name for telemetry resource attributes"),
];

/// Who a volume belongs to, for metric labels and span resource attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub volume_id: String,
    pub pvc_name: Option<String>,
    pub pvc_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub node_name: Option<String>,
}

/// Everything `interposer-fs` needs to run one volume.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub source: PathBuf,
    pub mountpoint: PathBuf,
    pub params: VolumeParams,
    pub metrics_address: Option<SocketAddr>,
    pub kernel_passthrough: bool,
    pub threads: usize,
    /// Over `/dev/fuse`, poll this long for the next request after a reply.
    pub spin: Duration,
    /// Serve FUSE over io_uring when the kernel offers it.
    pub uring: bool,
    /// Over `/dev/fuse`, splice large writes' data into SOURCE.
    pub splice: bool,
    /// Bytes the volume may hold (enforced by the passthrough).
    pub capacity: Option<u64>,
    /// Live settings file, read on SIGUSR1.
    pub control: Option<PathBuf>,
    pub allow_other: bool,
    pub read_only: bool,
    pub identity: Identity,
}

impl DaemonConfig {
    /// Build from the positional arguments and the `-o` list.
    pub fn parse(
        source: PathBuf,
        mountpoint: PathBuf,
        options: &[String],
    ) -> Result<DaemonConfig, ParamError> {
        let mut volume: Vec<(&str, &str)> = Vec::new();
        let mut c = DaemonConfig {
            identity: Identity {
                volume_id: mountpoint
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "volume".into()),
                ..Identity::default()
            },
            source,
            mountpoint,
            params: VolumeParams::default(),
            metrics_address: None,
            kernel_passthrough: false,
            threads: DEFAULT_THREADS,
            spin: DEFAULT_SPIN,
            uring: true,
            splice: true,
            capacity: None,
            control: None,
            allow_other: true,
            read_only: false,
        };
        for opt in options {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v)),
                None => (opt.trim(), None),
            };
            let bad = |expected: &str| ParamError::BadValue {
                key: key.to_string(),
                value: value.unwrap_or("").to_string(),
                expected: expected.to_string(),
            };
            let need = |expected: &str| value.ok_or_else(|| bad(expected));
            match key {
                k if is_volume_key(k) => volume.push((k, need("key=value")?)),
                "metrics.address" => {
                    c.metrics_address = Some(
                        need("HOST:PORT")?
                            .parse()
                            .map_err(|_| bad("HOST:PORT such as 127.0.0.1:9100 or [::]:9100"))?,
                    )
                }
                "kernelPassthrough" => {
                    c.kernel_passthrough = match value {
                        None | Some("true") => true,
                        Some("false") => false,
                        Some(_) => return Err(bad("true or false")),
                    }
                }
                "threads" => {
                    c.threads = need("1..64")?
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| bad("an integer in 1..64"))?
                }
                "spin" => {
                    c.spin = crate::params::parse_duration(key, need("a duration")?)
                        .ok()
                        .filter(|d| *d <= MAX_SPIN)
                        .ok_or_else(|| bad("a duration of at most 1ms, such as 5us or 0s"))?
                }
                "uring" => c.uring = on_off(need("on or off")?).ok_or_else(|| bad("on or off"))?,
                "splice" => {
                    c.splice = on_off(need("on or off")?).ok_or_else(|| bad("on or off"))?
                }
                "capacity" => {
                    c.capacity = Some(crate::params::parse_quantity(key, need("a quantity")?)?)
                }
                "control" => c.control = Some(PathBuf::from(need("a file path")?)),
                "allow_other" if value.is_none() => c.allow_other = true,
                "allow_root_only" if value.is_none() => c.allow_other = false,
                "ro" if value.is_none() => c.read_only = true,
                "rw" if value.is_none() => c.read_only = false,
                "volumeId" => c.identity.volume_id = label(key, need("a name")?)?,
                "pvcName" => c.identity.pvc_name = Some(label(key, need("a name")?)?),
                "pvcNamespace" => c.identity.pvc_namespace = Some(label(key, need("a name")?)?),
                "podName" => c.identity.pod_name = Some(label(key, need("a name")?)?),
                "podNamespace" => c.identity.pod_namespace = Some(label(key, need("a name")?)?),
                "nodeName" => c.identity.node_name = Some(label(key, need("a name")?)?),
                "allow_other" | "allow_root_only" | "ro" | "rw" => {
                    return Err(bad("the flag alone, without =value"));
                }
                _ => {
                    let mut known: Vec<&str> =
                        crate::params::KEYS.iter().map(|(k, _)| *k).collect();
                    known.extend(DAEMON_KEYS.iter().map(|(k, _)| *k));
                    return Err(ParamError::UnknownKey {
                        key: key.to_string(),
                        known: known.join(", "),
                    });
                }
            }
        }
        c.params = VolumeParams::parse(volume)?;
        if c.kernel_passthrough && c.params.page_cache == crate::params::PageCache::Writeback {
            // Kernel passthrough already writes through the backing file's own page cache.
            return Err(ParamError::BadValue {
                key: "pageCache".into(),
                value: "writeback".into(),
                expected: "keep or dropOnOpen with kernelPassthrough".into(),
            });
        }
        Ok(c)
    }
}

/// A telemetry label value: printable, bounded.
fn label(key: &str, v: &str) -> Result<String, ParamError> {
    if v.is_empty() || v.len() > 253 || v.chars().any(|c| c.is_control()) {
        return Err(ParamError::BadValue {
            key: key.into(),
            value: v.into(),
            expected: "a non-empty printable name of at most 253 characters".into(),
        });
    }
    Ok(v.to_string())
}

fn on_off(value: &str) -> Option<bool> {
    match value {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(opts: &[&str]) -> Result<DaemonConfig, ParamError> {
        let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
        DaemonConfig::parse("/src".into(), "/mnt/vol1".into(), &opts)
    }

    #[test]
    fn volume_and_daemon_keys_mix_in_one_list() {
        let c = parse(&[
            "layers=trace,metrics,fault",
            "metrics.address=127.0.0.1:0",
            "fault.probability=0.5",
            "ro",
            "threads=8",
            "uring=off",
            "splice=off",
            "spin=20us",
            "pvcName=data",
        ])
        .unwrap();
        assert_eq!(c.params.layers.len(), 3);
        assert_eq!(c.params.fault.probability, 0.5);
        assert!(c.read_only);
        assert_eq!(c.threads, 8);
        assert!(!c.uring, "uring=off keeps the daemon on /dev/fuse");
        assert!(!c.splice);
        assert_eq!(c.spin, Duration::from_micros(20));
        assert_eq!(c.identity.volume_id, "vol1");
        assert_eq!(c.identity.pvc_name.as_deref(), Some("data"));
    }

    #[test]
    fn bad_daemon_options_name_their_key() {
        for (opt, key) in [
            ("metrics.address=nowhere", "metrics.address"),
            ("threads=0", "threads"),
            ("threads=x", "threads"),
            ("ro=yes", "ro"),
            ("kernelPassthrough=maybe", "kernelPassthrough"),
            ("cacheTTL=forever", "cacheTTL"),
            ("uring=maybe", "uring"),
            ("spin=2ms", "spin"),
            ("spin=fast", "spin"),
            ("splice=yes", "splice"),
            ("bogus=1", "bogus"),
            ("layers", "layers"),
        ] {
            let e = parse(&[opt]).expect_err(opt);
            assert_eq!(e.key(), key, "{opt}: {e}");
        }
    }

    #[test]
    fn kernel_passthrough_refuses_the_writeback_cache() {
        let e = parse(&["kernelPassthrough=true", "pageCache=writeback"]).expect_err("both");
        assert_eq!(e.key(), "pageCache", "{e}");
        assert!(parse(&["pageCache=writeback"]).is_ok());
    }
}
