//! The layer stack: small wrappers around a `next` call.
//!
//! A layer sees every operation as an [`OpInfo`] and decides whether and when to call `next`
//! (the rest of the stack, ending in the passthrough). It never touches the typed result, so a
//! layer is a few dozen lines, not forty methods. The stack is built once from `layers`,
//! outermost first; a stack with no layers calls the passthrough directly.

pub mod fault;
pub mod metrics;
pub mod throttle;
pub mod trace;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::fs::op::{OpInfo, OpResult};

/// One interposer layer.
pub trait Layer: Send + Sync {
    /// Handle `info`: usually do something, call `next()`, look at its result, return it.
    fn call(&self, info: &OpInfo<'_>, next: &mut dyn FnMut() -> OpResult) -> OpResult;
}

/// A shared layer (kept also by whoever retunes it on a running volume).
impl<L: Layer + ?Sized> Layer for Arc<L> {
    fn call(&self, info: &OpInfo<'_>, next: &mut dyn FnMut() -> OpResult) -> OpResult {
        (**self).call(info, next)
    }
}

/// Layers in call order, outermost first.
#[derive(Default)]
pub struct Stack {
    layers: Vec<Box<dyn Layer>>,
}

impl Stack {
    pub fn new(layers: Vec<Box<dyn Layer>>) -> Self {
        Stack { layers }
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Run `op` through every layer.
    pub fn call(&self, info: &OpInfo<'_>, op: &mut dyn FnMut() -> OpResult) -> OpResult {
        self.call_from(0, info, op)
    }

    fn call_from(&self, i: usize, info: &OpInfo<'_>, op: &mut dyn FnMut() -> OpResult) -> OpResult {
        match self.layers.get(i) {
            None => op(),
            Some(layer) => layer.call(info, &mut || self.call_from(i + 1, info, op)),
        }
    }
}

/// Lets sleeping layers (fault delay, throttle wait) wake up at once when the volume unmounts,
/// so an unmount never waits on a sleeping fault.
#[derive(Default)]
pub struct Shutdown {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Shutdown {
    pub fn new() -> Arc<Self> {
        Arc::new(Shutdown::default())
    }

    /// Sleep for `d` unless shutdown comes first. Returns false if cut short by shutdown.
    pub fn sleep(&self, d: Duration) -> bool {
        if d.is_zero() {
            return true;
        }
        let deadline = std::time::Instant::now() + d;
        let mut stopped = self.stopped.lock();
        while !*stopped {
            if self.cv.wait_until(&mut stopped, deadline).timed_out() {
                return true;
            }
        }
        false
    }

    pub fn trigger(&self) {
        *self.stopped.lock() = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::op::{Caller, Op, Outcome};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Record(&'static str, Arc<Mutex<Vec<&'static str>>>);
    impl Layer for Record {
        fn call(&self, _info: &OpInfo<'_>, next: &mut dyn FnMut() -> OpResult) -> OpResult {
            self.1.lock().push(self.0);
            next()
        }
    }

    #[test]
    fn layers_run_outermost_first_and_reach_the_operation_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stack = Stack::new(vec![
            Box::new(Record("outer", log.clone())),
            Box::new(Record("inner", log.clone())),
        ]);
        let resolve = |_: &OpInfo<'_>| (Arc::from(""), None);
        let info = OpInfo::new(
            Op::Read,
            Caller {
                pid: 1,
                uid: 0,
                gid: 0,
            },
            1,
            &resolve,
        );
        let calls = AtomicUsize::new(0);
        let r = stack.call(&info, &mut || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome { bytes: 7, fh: None })
        });
        assert_eq!(r, Ok(Outcome { bytes: 7, fh: None }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(*log.lock(), vec!["outer", "inner"]);
    }

    #[test]
    fn shutdown_cuts_a_sleep_short() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.sleep(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        assert!(!t.join().unwrap());
    }
}
