//! Capacity enforcement: a volume that cannot grow past its size.
//!
//! A plain directory has no size of its own, so the interposer keeps the books: the bytes
//! allocated under SOURCE are counted once at mount (hard links once), then adjusted by every
//! operation that allocates or frees (measured as the change in `st_blocks`, so sparse files and
//! overwrites cost what they really cost). An operation that could take the volume past its
//! limit fails with ENOSPC before touching anything, and `statfs` (so `df`) reports the volume's
//! size and free space. Known approximation: a file unlinked while still open is counted as freed
//! at unlink.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::fs::errno::{Errno, FsResult};
use crate::fs::sys;

/// Block size reported by statfs for a quota'd volume.
pub const BLOCK: u64 = 4096;

#[derive(Debug)]
pub struct Quota {
    /// Bytes the volume may hold; changes when the volume is expanded.
    limit: AtomicU64,
    used: AtomicI64,
}

fn allocated(st: &libc::stat) -> i64 {
    st.st_blocks * 512
}

impl Quota {
    /// Count what `root` already holds and enforce `limit` bytes from now on.
    pub fn new(root: BorrowedFd<'_>, limit: u64) -> FsResult<Quota> {
        let mut seen = HashSet::new();
        let used = walk(root, &mut seen)?;
        Ok(Quota {
            limit: AtomicU64::new(limit),
            used: AtomicI64::new(used),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// A new size (volume expansion), effective for the next operation.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed).max(0) as u64
    }

    /// Refuse (ENOSPC) if growing by `bytes` would pass the limit.
    pub fn check_growth(&self, bytes: u64) -> FsResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        let rounded = bytes.div_ceil(BLOCK) * BLOCK;
        if self.used().saturating_add(rounded) > self.limit() {
            Err(Errno::ENOSPC)
        } else {
            Ok(())
        }
    }

    /// Growth a write or allocation of `[offset, offset+len)` may cause on a file of `size`.
    pub fn growth(size: u64, offset: u64, len: u64) -> u64 {
        offset.saturating_add(len).saturating_sub(size)
    }

    pub fn add(&self, delta: i64) {
        self.used.fetch_add(delta, Ordering::Relaxed);
    }

    /// Apply the change in allocation between two `stat`s of the same file.
    pub fn account(&self, before: &libc::stat, after: &libc::stat) {
        self.add(allocated(after) - allocated(before));
    }

    pub fn created(&self, st: &libc::stat) {
        self.add(allocated(st));
    }

    /// The object described by `st` lost a name; free it if that was its last.
    pub fn unlinked(&self, st: &libc::stat) {
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir || st.st_nlink <= 1 {
            self.add(-allocated(st));
        }
    }

    /// statfs numbers for the volume: (blocks, free blocks).
    pub fn statfs_blocks(&self) -> (u64, u64) {
        let limit = self.limit();
        let total = limit / BLOCK;
        let free = limit.saturating_sub(self.used()) / BLOCK;
        (total, free)
    }
}

/// Bytes allocated under `dir` (the directory itself included), hard links counted once.
fn walk(dir: BorrowedFd<'_>, seen: &mut HashSet<(u64, u64)>) -> FsResult<i64> {
    let st = sys::fstat(dir)?;
    let mut total = allocated(&st);
    let fd = sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0i64;
    loop {
        let entries = sys::read_dir_at(std::os::fd::AsRawFd::as_raw_fd(&fd), offset, &mut buf)?;
        if entries.is_empty() {
            break;
        }
        for e in entries {
            offset = e.next_offset;
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let name = std::ffi::CString::new(e.name).map_err(|_| Errno::EINVAL)?;
            let Ok(st) = sys::fstatat_nofollow(fd.as_fd(), &name) else {
                continue; // raced with a removal
            };
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                if let Ok(sub) = sys::openat(fd.as_fd(), &name, libc::O_PATH | libc::O_DIRECTORY, 0)
                {
                    total += walk(sub.as_fd(), seen)?;
                }
            } else if st.st_nlink <= 1 || seen.insert((st.st_dev, st.st_ino)) {
                total += allocated(&st);
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn existing_data_is_counted_and_growth_past_the_limit_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![1u8; 100_000]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/b"), vec![1u8; 50_000]).unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("a2")).unwrap();
        let root = std::fs::File::open(d.path()).unwrap();
        let q = Quota::new(root.as_fd(), 1 << 20).unwrap();
        assert!(
            q.used() >= 150_000 && q.used() < 250_000,
            "used {}",
            q.used()
        );
        assert!(q.check_growth(500_000).is_ok());
        assert_eq!(q.check_growth(1 << 20), Err(Errno::ENOSPC));
        let (total, free) = q.statfs_blocks();
        assert_eq!(total, 256);
        assert!(free < total);
    }

    #[test]
    fn growth_is_what_lies_past_the_end_of_the_file() {
        assert_eq!(Quota::growth(100, 0, 50), 0);
        assert_eq!(Quota::growth(100, 90, 50), 40);
        assert_eq!(Quota::growth(0, 1000, 10), 1010);
    }
}
