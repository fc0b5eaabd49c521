//! Run a filesystem call with the caller's credentials.
//!
//! The daemon is root, acting for untrusted pods. For every call that creates or changes
//! something, the worker thread takes the caller's fsuid, fsgid and supplementary groups, so the
//! backing filesystem itself applies ownership, setgid inheritance, sticky bits and permission
//! checks as it would for the caller. Linux keeps these per thread (the raw syscalls, unlike
//! glibc's `setgroups`, do not broadcast to other threads), and a guard puts root back when the
//! call ends. Objects are always located (opened by handle) *before* switching, as root, since
//! `open_by_handle_at` needs CAP_DAC_READ_SEARCH, which a non-zero fsuid drops.
//!
//! FUSE sends no supplementary groups; they are read from `/proc` and reused for a second (see
//! [`GROUPS_TTL`]).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::fs::op::Caller;

/// How long a caller's supplementary groups are reused before `/proc` is read again. A read
/// costs ~10 µs, a third of the daemon's work for a small operation by a non-root caller. The
/// kernel has already checked the caller's access with its real credentials
/// (`default_permissions`, always on); the groups here only make the backing filesystem agree,
/// so groups changed in place (same thread, uid and gid) that reach it up to a second late
/// change no access decision.
const GROUPS_TTL: Duration = Duration::from_secs(1);

/// Callers whose groups are remembered, at most (then the cache starts over).
const GROUPS_CACHE_MAX: usize = 4096;

struct KnownGroups {
    groups: Arc<[u32]>,
    read_at: Instant,
}

/// Thread id, uid and gid of a caller.
type CallerKey = (u32, u32, u32);

static GROUPS: LazyLock<Mutex<HashMap<CallerKey, KnownGroups>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// While alive, the current thread acts as the caller. Dropping it restores root.
pub struct AsCaller {
    switched: bool,
}

impl AsCaller {
    /// Take the caller's identity on this thread. Root callers cost nothing.
    pub fn new(caller: Caller) -> io::Result<AsCaller> {
        if caller.uid == 0 && caller.gid == 0 {
            return Ok(AsCaller { switched: false });
        }
        let groups = groups_of(caller);
        // Order matters: groups and gid first, uid last (dropping uid 0 drops the capabilities
        // needed for nothing here, but keep the conventional order).
        set_groups(&groups)?;
        set_fsgid(caller.gid)?;
        set_fsuid(caller.uid)?;
        Ok(AsCaller { switched: true })
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        if self.switched {
            // These cannot fail for root going back to root; if they ever did, the thread
            // would be left with reduced rights (never elevated), so failures are only logged.
            if set_fsuid(0).is_err() || set_fsgid(0).is_err() || set_groups(&[]).is_err() {
                log::error!("could not restore root credentials on a worker thread");
            }
        }
    }
}

fn set_fsuid(uid: u32) -> io::Result<()> {
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
    // setfsuid reports the previous value, not errors: read it back to check.
    let now = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) } as u32;
    if now == uid {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

fn set_fsgid(gid: u32) -> io::Result<()> {
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) };
    let now = unsafe { libc::syscall(libc::SYS_setfsgid, u32::MAX) } as u32;
    if now == gid {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

fn set_groups(groups: &[u32]) -> io::Result<()> {
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The caller's supplementary groups: remembered for [`GROUPS_TTL`] by thread, uid and gid;
/// just its gid when they cannot be read (the thread is gone).
fn groups_of(caller: Caller) -> Arc<[u32]> {
    let key = (caller.pid, caller.uid, caller.gid);
    if let Some(known) = GROUPS.lock().get(&key) {
        if known.read_at.elapsed() < GROUPS_TTL {
            return known.groups.clone();
        }
    }
    let Some(groups) = supplementary_groups(caller.pid) else {
        return Arc::from([caller.gid]);
    };
    let groups: Arc<[u32]> = groups.into();
    let mut cache = GROUPS.lock();
    if cache.len() >= GROUPS_CACHE_MAX {
        cache.clear();
    }
    cache.insert(
        key,
        KnownGroups {
            groups: groups.clone(),
            read_at: Instant::now(),
        },
    );
    groups
}

/// The supplementary groups of `pid`, from `/proc/<pid>/status`. FUSE only sends uid and gid,
/// so this is the one way to apply group membership exactly as the kernel sees it.
fn supplementary_groups(pid: u32) -> Option<Vec<u32>> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    Some(
        line["Groups:".len()..]
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_read_from_proc_are_the_ones_the_kernel_reports() {
        let mut from_proc =
            supplementary_groups(std::process::id()).expect("own status is readable");
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut kernel = vec![0 as libc::gid_t; n.max(0) as usize];
        let n = unsafe { libc::getgroups(kernel.len() as i32, kernel.as_mut_ptr()) };
        kernel.truncate(n.max(0) as usize);
        from_proc.sort_unstable();
        kernel.sort_unstable();
        assert_eq!(from_proc, kernel);
        assert!(supplementary_groups(0).is_none());
    }

    #[test]
    fn groups_are_read_once_per_caller_and_second() {
        let me = Caller {
            pid: std::process::id(),
            uid: 12345,
            gid: 54321,
        };
        let first = groups_of(me);
        assert!(Arc::ptr_eq(&first, &groups_of(me)), "reused within the TTL");
        let other = Caller { uid: 12346, ..me };
        assert!(
            !Arc::ptr_eq(&first, &groups_of(other)),
            "another uid reads again"
        );
        let gone = Caller { pid: 0, ..me };
        assert_eq!(&*groups_of(gone), &[54321], "unreadable: the gid alone");
    }
}
