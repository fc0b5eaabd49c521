//! `fault`: fail or delay chosen operations, reproducibly.
//!
//! A filter (operation set, path glob) picks the operations the layer may touch. Each matching
//! operation takes the next number of a counter, and the decision for number `n` is a pure
//! function of `(seed, n)`, so the same seed and the same sequence of operations give the same
//! faults on every run, on any machine. Delays sleep on the volume's [`Shutdown`] so an
//! unmount is never held up by a sleeping fault.
//!
//! The settings can be replaced on a running volume ([`FaultLayer::retune`]); while they inject
//! nothing (probability 0, no delay) the layer costs one lock-free read per operation, so a
//! StorageClass can keep `fault` in its layers, dormant, ready to be switched on live.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::fs::errno::Errno;
use crate::fs::op::{OpInfo, OpResult};
use crate::layers::metrics::Metrics;
use crate::layers::{Layer, Shutdown};
use crate::params::FaultParams;

pub struct FaultLayer {
    params: RwLock<Arc<FaultParams>>,
    /// Whether the current settings can inject anything (read without the lock).
    active: AtomicBool,
    seed: AtomicU64,
    counter: AtomicU64,
    shutdown: Arc<Shutdown>,
    metrics: Option<Arc<Metrics>>,
}

/// What the fault layer decided for one matching operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub fail: bool,
    pub delay: bool,
}

impl FaultLayer {
    pub fn new(
        params: FaultParams,
        shutdown: Arc<Shutdown>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        FaultLayer {
            active: AtomicBool::new(injects(&params)),
            params: RwLock::new(Arc::new(params)),
            seed: AtomicU64::new(seed),
            counter: AtomicU64::new(0),
            shutdown,
            metrics,
        }
    }

    /// The seed in use (logged at start so a run can be replayed).
    pub fn seed(&self) -> u64 {
        self.seed.load(Ordering::Relaxed)
    }

    /// Replace the settings on a running volume. The operation counter goes on, and so does
    /// the seed unless the new settings name one.
    pub fn retune(&self, params: FaultParams) {
        if let Some(seed) = params.seed {
            self.seed.store(seed, Ordering::Relaxed);
        }
        let active = injects(&params);
        *self.params.write() = Arc::new(params);
        self.active.store(active, Ordering::Release);
    }

    /// The decision for the `n`-th matching operation.
    pub fn decide(&self, n: u64) -> Decision {
        decide(&self.params.read(), self.seed(), n)
    }
}

/// Whether settings can fail or delay anything at all.
pub fn injects(p: &FaultParams) -> bool {
    p.probability > 0.0 || (!p.delay.is_zero() && p.delay_probability > 0.0)
}

fn decide(p: &FaultParams, seed: u64, n: u64) -> Decision {
    Decision {
        fail: p.probability > 0.0 && unit(mix(seed, n, 0x6661_756c_7400_0001)) < p.probability,
        delay: !p.delay.is_zero()
            && p.delay_probability > 0.0
            && unit(mix(seed, n, 0x6465_6c61_7900_0002)) < p.delay_probability,
    }
}

impl Layer for FaultLayer {
    fn call(&self, info: &OpInfo<'_>, next: &mut dyn FnMut() -> OpResult) -> OpResult {
        if !self.active.load(Ordering::Acquire) {
            return next();
        }
        let p = self.params.read().clone();
        if !(p.ops.contains(info.op) && p.paths.matches(info.path())) {
            return next();
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let d = decide(&p, self.seed(), n);
        if d.delay {
            info.injected_delay.set(p.delay);
            if let Some(m) = &self.metrics {
                m.fault_injected(info.op, "delay");
            }
            self.shutdown.sleep(p.delay);
        }
        if d.fail {
            info.injected_errno.set(Some(p.errno));
            if let Some(m) = &self.metrics {
                m.fault_injected(info.op, "errno");
            }
            return Err(Errno(p.errno));
        }
        next()
    }
}

/// splitmix64 over the seed, the operation number and a stream constant.
fn mix(seed: u64, n: u64, stream: u64) -> u64 {
    let mut z =
        seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from 53 random bits.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    // getrandom(2) cannot fail for 8 bytes once the pool is initialised; fall back to the clock.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::op::{Caller, Op, Outcome};
    use crate::glob::Glob;
    use std::time::Duration;

    fn layer(seed: u64, probability: f64) -> FaultLayer {
        FaultLayer::new(
            FaultParams {
                probability,
                seed: Some(seed),
                ..FaultParams::default()
            },
            Shutdown::new(),
            None,
        )
    }

    #[test]
    fn the_same_seed_fails_the_same_operations() {
        let a: Vec<bool> = (0..1000).map(|n| layer(7, 0.3).decide(n).fail).collect();
        let b: Vec<bool> = (0..1000).map(|n| layer(7, 0.3).decide(n).fail).collect();
        let c: Vec<bool> = (0..1000).map(|n| layer(8, 0.3).decide(n).fail).collect();
        assert_eq!(a, b);
        assert_ne!(a, c, "another seed gives another sequence");
    }

    #[test]
    fn the_failure_rate_follows_the_probability() {
        for p in [0.0, 0.1, 0.5, 1.0] {
            let l = layer(42, p);
            let fails = (0..20_000).filter(|&n| l.decide(n).fail).count() as f64 / 20_000.0;
            assert!((fails - p).abs() < 0.02, "p={p} got {fails}");
        }
    }

    #[test]
    fn only_matching_operations_and_paths_fail() {
        let l = FaultLayer::new(
            FaultParams {
                probability: 1.0,
                seed: Some(1),
                ops: {
                    let mut s = crate::fs::op::OpSet::empty();
                    s.insert(Op::Write);
                    s
                },
                paths: Glob::new("*.log").unwrap(),
                ..FaultParams::default()
            },
            Shutdown::new(),
            None,
        );
        let run = |op: Op, path: &'static str| {
            let resolve = move |_: &OpInfo<'_>| (Arc::from(path), None);
            let info = OpInfo::new(
                op,
                Caller {
                    pid: 1,
                    uid: 0,
                    gid: 0,
                },
                2,
                &resolve,
            );
            l.call(&info, &mut || Ok(Outcome::default()))
        };
        assert_eq!(run(Op::Write, "x/app.log"), Err(Errno::EIO));
        assert!(run(Op::Write, "x/app.txt").is_ok());
        assert!(run(Op::Read, "x/app.log").is_ok());
    }

    #[test]
    fn retuning_switches_faults_on_and_off_and_keeps_the_seed() {
        let l = layer(5, 0.0);
        let resolve = |_: &OpInfo<'_>| (Arc::from("f"), None);
        let caller = Caller {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let run = |l: &FaultLayer| {
            let info = OpInfo::new(Op::Read, caller, 2, &resolve);
            l.call(&info, &mut || Ok(Outcome::default()))
        };
        assert!(run(&l).is_ok());
        l.retune(FaultParams {
            probability: 1.0,
            errno: libc::EACCES,
            ..FaultParams::default()
        });
        assert_eq!(run(&l), Err(Errno(libc::EACCES)));
        assert_eq!(l.seed(), 5, "no seed given: the old one stays");
        l.retune(FaultParams::default());
        assert!(run(&l).is_ok());
    }

    #[test]
    fn a_delay_is_recorded_on_the_operation() {
        let l = FaultLayer::new(
            FaultParams {
                delay: Duration::from_millis(20),
                delay_probability: 1.0,
                seed: Some(3),
                ..FaultParams::default()
            },
            Shutdown::new(),
            None,
        );
        let resolve = |_: &OpInfo<'_>| (Arc::from("f"), None);
        let info = OpInfo::new(
            Op::Read,
            Caller {
                pid: 1,
                uid: 0,
                gid: 0,
            },
            2,
            &resolve,
        );
        let t = std::time::Instant::now();
        assert!(l.call(&info, &mut || Ok(Outcome::default())).is_ok());
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!(info.injected_delay.get(), Duration::from_millis(20));
    }
}
