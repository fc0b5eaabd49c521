//! Polling `/dev/fuse` for a moment after answering a request, before sleeping in `read(2)`.
//! Added for csi-interposer, see PATCHES.md.
//!
//! A caller doing synchronous I/O (a 4 KiB write, a `stat`, an `unlink`) sends its next request
//! a few microseconds after our reply. A worker asleep in `read(2)` must then be woken by the
//! kernel, and on a virtual machine the idle vCPU it sleeps on first has to be resumed by the
//! hypervisor: on a 2-CPU VM that wake-up took as long as the work of the request. So the
//! worker that has just replied keeps reading the device without blocking for a short while
//! ([`crate::Config::spin`]), and goes to sleep as before when nothing came.
//!
//! One worker spins at a time (the others sleep as usual), so a busy volume spends at most the
//! spin time of CPU per request, and an idle one nothing. The device's `O_NONBLOCK` flag is
//! per descriptor, and each worker has its own (`clone_fd`): a worker switches its flag only
//! when it starts or stops spinning, not per request.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use nix::fcntl::FcntlArg;
use nix::fcntl::OFlag;
use nix::fcntl::fcntl;

/// The spin settings of a session, shared by its `/dev/fuse` workers.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpinPolicy {
    /// How long to poll; zero never spins.
    budget: Duration,
    /// Set while some worker spins.
    taken: Arc<AtomicBool>,
}

impl SpinPolicy {
    pub(crate) fn new(budget: Duration) -> Self {
        Self {
            budget,
            taken: Arc::default(),
        }
    }
}

/// One worker's side: whether it spins now, and what its descriptor's flag is.
#[derive(Debug)]
pub(crate) struct Spin<'a> {
    policy: &'a SpinPolicy,
    fd: BorrowedFd<'a>,
    /// The descriptor's flags as the worker found them, without `O_NONBLOCK`.
    flags: OFlag,
    nonblocking: bool,
    /// While spinning: when to stop.
    until: Option<Instant>,
}

impl<'a> Spin<'a> {
    /// `fd` is the worker's own device descriptor.
    pub(crate) fn new(policy: &'a SpinPolicy, fd: BorrowedFd<'a>) -> nix::Result<Self> {
        let flags = if policy.budget.is_zero() {
            OFlag::empty()
        } else {
            OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?) - OFlag::O_NONBLOCK
        };
        Ok(Self {
            policy,
            fd,
            flags,
            nonblocking: false,
            until: None,
        })
    }

    /// Before receiving a request: spin if no other worker does.
    pub(crate) fn begin(&mut self) -> nix::Result<()> {
        if self.policy.budget.is_zero() {
            return Ok(());
        }
        if self.policy.taken.swap(true, Ordering::Acquire) {
            return self.set_nonblocking(false);
        }
        self.until = Some(Instant::now() + self.policy.budget);
        self.set_nonblocking(true)
    }

    /// The device had nothing (`EAGAIN`): poll again at once while the time lasts, then give
    /// the turn up and block. The caller reads again either way.
    pub(crate) fn again(&mut self) -> nix::Result<()> {
        if let Some(until) = self.until {
            if Instant::now() < until {
                std::hint::spin_loop();
                return Ok(());
            }
            self.end();
        }
        self.set_nonblocking(false)
    }

    /// A request (or an error) came: another worker may spin while this one works.
    pub(crate) fn end(&mut self) {
        if self.until.take().is_some() {
            self.policy.taken.store(false, Ordering::Release);
        }
    }

    fn set_nonblocking(&mut self, on: bool) -> nix::Result<()> {
        if self.nonblocking != on {
            let flags = if on {
                self.flags | OFlag::O_NONBLOCK
            } else {
                self.flags
            };
            fcntl(self.fd, FcntlArg::F_SETFL(flags))?;
            self.nonblocking = on;
        }
        Ok(())
    }
}

impl Drop for Spin<'_> {
    /// A worker that stops (unmount, error) leaves the turn to the others.
    fn drop(&mut self) {
        self.end();
    }
}
