//! `throttle`: token buckets for bytes/s and operations/s, read and write apart.
//!
//! FUSE needs full replies (a short read looks like end of file), so an operation is never cut
//! down to fit the quota: it takes its whole cost from the bucket, which may go into debt, and
//! waits until the debt is paid. Waits happen on the FUSE worker thread that carries the
//! operation (never on an async runtime) and end at once when the volume unmounts.
//!
//! Limits can be replaced on a running volume ([`ThrottleLayer::retune`]); an unlimited layer
//! costs one lock-free read per operation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::fs::op::{Direction, OpInfo, OpResult};
use crate::layers::metrics::Metrics;
use crate::layers::{Layer, Shutdown};
use crate::params::ThrottleParams;

/// A token bucket that lends: `reserve` always succeeds and says how long to wait.
///
/// The bucket starts empty, so a measurement taken from mount time sees the configured rate;
/// unused quota accumulates while idle, up to `rate × burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    /// (tokens, when they were counted). Guarded together so a reservation is atomic.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate` tokens per second; `burst` seconds of quota may accumulate.
    pub fn new(rate: u64, burst: f64) -> Self {
        let rate = rate as f64;
        TokenBucket {
            rate,
            capacity: (rate * burst).max(1.0),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Take `n` tokens now; returns how long the caller must wait before going on.
    pub fn reserve(&self, n: f64) -> Duration {
        self.reserve_at(n, Instant::now())
    }

    fn reserve_at(&self, n: f64, now: Instant) -> Duration {
        let mut state = self.state.lock();
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.capacity);
        *last = now.max(*last);
        *tokens -= n;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / self.rate)
        }
    }
}

/// The buckets of one set of limits; `None` is unlimited.
struct Buckets {
    read_bytes: Option<TokenBucket>,
    write_bytes: Option<TokenBucket>,
    read_ops: Option<TokenBucket>,
    write_ops: Option<TokenBucket>,
}

impl Buckets {
    fn new(p: &ThrottleParams) -> Self {
        let bucket = |rate: Option<u64>| rate.map(|r| TokenBucket::new(r, p.burst));
        Buckets {
            read_bytes: bucket(p.read_bytes_per_second),
            write_bytes: bucket(p.write_bytes_per_second),
            read_ops: bucket(p.read_iops),
            write_ops: bucket(p.write_iops),
        }
    }
}

pub struct ThrottleLayer {
    buckets: RwLock<Arc<Buckets>>,
    /// Whether any limit is set (read without the lock).
    limited: AtomicBool,
    shutdown: Arc<Shutdown>,
    metrics: Option<Arc<Metrics>>,
}

impl ThrottleLayer {
    pub fn new(p: &ThrottleParams, shutdown: Arc<Shutdown>, metrics: Option<Arc<Metrics>>) -> Self {
        ThrottleLayer {
            buckets: RwLock::new(Arc::new(Buckets::new(p))),
            limited: AtomicBool::new(!p.is_unlimited()),
            shutdown,
            metrics,
        }
    }

    /// Replace the limits on a running volume; the new buckets start empty.
    pub fn retune(&self, p: &ThrottleParams) {
        *self.buckets.write() = Arc::new(Buckets::new(p));
        self.limited.store(!p.is_unlimited(), Ordering::Release);
    }
}

impl Layer for ThrottleLayer {
    fn call(&self, info: &OpInfo<'_>, next: &mut dyn FnMut() -> OpResult) -> OpResult {
        let Some(dir) = info.op.direction() else {
            return next();
        };
        if !self.limited.load(Ordering::Acquire) {
            return next();
        }
        let b = self.buckets.read().clone();
        let (bytes, ops) = match dir {
            Direction::Read => (&b.read_bytes, &b.read_ops),
            Direction::Write => (&b.write_bytes, &b.write_ops),
        };
        let size = info.size.unwrap_or(0) as f64;
        let wait = [
            bytes.as_ref().map(|b| b.reserve(size)),
            ops.as_ref().map(|b| b.reserve(1.0)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            info.throttle_wait.set(wait);
            if let Some(m) = &self.metrics {
                m.throttle_waited(dir, wait);
            }
            self.shutdown.sleep(wait);
        }
        next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_bucket_makes_the_caller_wait_for_its_whole_cost() {
        let b = TokenBucket::new(1000, 1.0);
        let t0 = Instant::now();
        let w = b.reserve_at(500.0, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-3, "{w:?}");
    }

    #[test]
    fn debt_accumulates_so_the_long_run_rate_is_exact() {
        let b = TokenBucket::new(100, 1.0);
        let t0 = Instant::now();
        // 10 reservations of 50 at the same instant: the last must wait 5 s.
        let mut w = Duration::ZERO;
        for _ in 0..10 {
            w = b.reserve_at(50.0, t0);
        }
        assert!((w.as_secs_f64() - 5.0).abs() < 1e-3, "{w:?}");
    }

    #[test]
    fn idle_time_refills_up_to_the_burst_only() {
        let b = TokenBucket::new(100, 0.5);
        let t0 = Instant::now();
        assert_eq!(b.reserve_at(0.0, t0), Duration::ZERO);
        // 10 s idle, but capacity is 50 tokens.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.reserve_at(50.0, t1), Duration::ZERO);
        let w = b.reserve_at(50.0, t1);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-3, "{w:?}");
    }

    #[test]
    fn operations_larger_than_the_bucket_still_pass_whole() {
        let b = TokenBucket::new(10, 1.0);
        let w = b.reserve_at(1000.0, Instant::now());
        assert!((w.as_secs_f64() - 100.0).abs() < 1e-6);
    }
}
