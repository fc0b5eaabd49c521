//! The passthrough: every operation done on SOURCE, as the caller, with `*at()` syscalls.
//!
//! Each method returns [`FsResult`]; the adapter (`crate::adapter`) is the only code that turns
//! results into kernel replies. Objects are located by node (file handle, see `inodes`) and a
//! single name component, never by a path string, so nothing a pod does inside the volume can
//! make an operation land outside it.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};

use crate::fs::creds::AsCaller;
use crate::fs::errno::{Errno, FsResult};
use crate::fs::inodes::{InodeData, InodeRef, InodeTable};
use crate::fs::op::Caller;
use crate::fs::quota::Quota;
use crate::fs::sys;

/// A node the kernel now knows, with its attributes.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub ino: u64,
    pub generation: u32,
    pub attr: libc::stat,
    /// SOURCE changed the file behind the mount (see [`InodeData::tell`]).
    pub changed_behind: bool,
}

/// A node's attributes for the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub st: libc::stat,
    /// SOURCE changed the file behind the mount (see [`InodeData::tell`]).
    pub changed_behind: bool,
}

/// A time to set: now, or a given instant.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// Attribute changes of one `setattr`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// One directory entry for the kernel.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    /// Cookie for the next `readdir` after this entry.
    pub offset: u64,
    /// `S_IF*` type bits, or 0 when unknown.
    pub kind: u32,
    pub name: Vec<u8>,
}

/// An open file or directory.
pub struct OpenFile {
    pub fd: OwnedFd,
    pub ino: u64,
    node: Arc<InodeData>,
    /// Serialises seek+getdents on a directory stream.
    dir_lock: Mutex<()>,
    /// The file carried a `security.capability` xattr when opened for writing: the first write
    /// must remove it (we told the kernel we kill privileges ourselves, see `adapter::init`).
    has_caps: AtomicBool,
}

/// File-handle table. Handles are never reused within a mount.
#[derive(Default)]
struct Handles {
    map: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next: AtomicU64,
}

impl Handles {
    /// `check_caps`: the file is open for writing and may carry file capabilities.
    fn insert(&self, fd: OwnedFd, ino: u64, node: Arc<InodeData>, check_caps: bool) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        // One syscall here instead of a kernel round trip on every write.
        let has_caps = check_caps && sys::fgetxattr_exists(fd.as_fd(), SECURITY_CAPABILITY);
        self.map.write().insert(
            fh,
            Arc::new(OpenFile {
                fd,
                ino,
                node,
                dir_lock: Mutex::new(()),
                has_caps: AtomicBool::new(has_caps),
            }),
        );
        fh
    }
    fn get(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.map.read().get(&fh).cloned().ok_or(Errno::EBADF)
    }
    fn remove(&self, fh: u64) -> Option<Arc<OpenFile>> {
        self.map.write().remove(&fh)
    }
}

const SECURITY_CAPABILITY: &CStr = c"security.capability";

/// Flags never passed to the backing open: the kernel already handled them, or they would break
/// our buffers (O_DIRECT needs aligned memory).
const STRIP_OPEN_FLAGS: i32 =
    libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_DIRECT;

/// The data of a write: a buffer, or (from the adapter) a payload the kernel left in a pipe,
/// which goes on to the backing file without being copied through the daemon.
pub trait WriteData {
    /// Bytes to write.
    fn size(&self) -> usize;
    /// Write the data into `fd` at `offset`, as `pwrite` does: how much was written.
    fn write_at(&self, fd: BorrowedFd<'_>, offset: u64) -> FsResult<usize>;
}

impl WriteData for [u8] {
    fn size(&self) -> usize {
        self.len()
    }

    fn write_at(&self, fd: BorrowedFd<'_>, offset: u64) -> FsResult<usize> {
        sys::pwrite(fd, self, offset)
    }
}

pub struct Passthrough {
    inodes: InodeTable,
    handles: Handles,
    /// Set when the volume has a size to enforce.
    quota: Option<Quota>,
}

fn to_timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => {
            let (sec, nsec) = match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    // Before 1970: negative seconds, positive nanoseconds.
                    let d = e.duration();
                    let mut s = -(d.as_secs() as i64);
                    let mut n = d.subsec_nanos() as i64;
                    if n > 0 {
                        s -= 1;
                        n = 1_000_000_000 - n;
                    }
                    (s, n)
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

/// The reply to a lookup of node `ino`, whose attributes are `st`.
fn entry(ino: u64, node: &InodeData, st: libc::stat) -> Entry {
    Entry {
        ino,
        generation: node.generation,
        attr: st,
        changed_behind: node.tell(&st),
    }
}

impl Passthrough {
    /// Serve the directory `source`; with `capacity`, enforce that many bytes.
    pub fn new(source: &Path, capacity: Option<u64>) -> FsResult<Self> {
        let c = sys::cpath(source)?;
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                // Not O_PATH: open_by_handle_at refuses an O_PATH descriptor as its mount fd.
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Errno::last());
        }
        let root = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let quota = match capacity {
            Some(limit) => Some(Quota::new(root.as_fd(), limit)?),
            None => None,
        };
        Ok(Passthrough {
            inodes: InodeTable::new(root)?,
            handles: Handles::default(),
            quota,
        })
    }

    /// Change the enforced size (no effect on a volume mounted without one). Returns whether
    /// there was a size to change.
    pub fn set_capacity(&self, bytes: u64) -> bool {
        match &self.quota {
            Some(q) => {
                q.set_limit(bytes);
                true
            }
            None => false,
        }
    }

    pub fn inodes(&self) -> &InodeTable {
        &self.inodes
    }

    fn fd_of(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.handles.get(fh)
    }

    /// Open `name` (`c`) in the directory `dir`, and remember it as a node.
    fn enter(&self, parent: u64, dir: BorrowedFd<'_>, name: &OsStr, c: &CStr) -> FsResult<Entry> {
        let fd = sys::openat(dir, c, libc::O_PATH, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        let reference = self.inodes.reference(fd, &st);
        let (ino, node) = self.inodes.remember(parent, name, reference, &st, false)?;
        Ok(entry(ino, &node, st))
    }

    /// The kernel looks a name up when it first meets it, and again each time its entry expires
    /// (`cacheTTL`). The name then usually still names the node it knew: two calls by name
    /// (`fstatat`, `name_to_handle_at`) tell, instead of four that open the object (see
    /// `InodeTable::revisit`). A name first met costs the `fstatat` more; without file handles
    /// there is nothing to match, and the object is opened at once.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        let dir = self.inodes.path_fd(parent)?;
        let c = sys::cname(name)?;
        if !self.inodes.handles_supported() {
            return self.enter(parent, dir.as_fd(), name, &c);
        }
        let st = sys::fstatat_nofollow(dir.as_fd(), &c)?;
        let known = self.inodes.revisit(parent, name, &st, || {
            sys::name_to_handle_at(dir.as_fd(), &c).ok()
        });
        match known {
            Some((ino, node)) => Ok(entry(ino, &node, st)),
            None => self.enter(parent, dir.as_fd(), name, &c),
        }
    }

    /// `lookup` of `name` in the open directory `fh` of node `parent` (for listings that carry
    /// each entry's attributes).
    pub fn lookup_in(&self, fh: u64, parent: u64, name: &OsStr) -> FsResult<Entry> {
        let dir = self.fd_of(fh)?;
        self.enter(parent, dir.fd.as_fd(), name, &sys::cname(name)?)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        if let Some(fh) = fh {
            if let Ok(f) = self.fd_of(fh) {
                let st = sys::fstat(f.fd.as_fd())?;
                let changed_behind = f.node.tell(&st);
                return Ok(Attr { st, changed_behind });
            }
        }
        let fd = self.inodes.path_fd(ino)?;
        let st = sys::fstat(fd.as_fd())?;
        let changed_behind = self.inodes.get(ino)?.tell(&st);
        Ok(Attr { st, changed_behind })
    }

    /// The open files whose size or mtime SOURCE changed behind the mount since the kernel was
    /// last told (see `InodeData::tell`). One `fstat` per open file.
    pub fn open_files_changed_behind(&self) -> Vec<u64> {
        let open: Vec<Arc<OpenFile>> = self.handles.map.read().values().cloned().collect();
        open.iter()
            .filter(|f| sys::fstat(f.fd.as_fd()).is_ok_and(|st| f.node.tell(&st)))
            .map(|f| f.ino)
            .collect()
    }

    pub fn setattr(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        set: SetAttrs,
    ) -> FsResult<Attr> {
        let open = fh.and_then(|fh| self.fd_of(fh).ok());
        let path_fd = self.inodes.path_fd(ino)?;
        let node = self.inodes.get(ino)?;
        let _as = AsCaller::new(caller)?;
        if let Some(mode) = set.mode {
            sys::chmod_fd(path_fd.as_fd(), mode & 0o7777)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            sys::chown_fd(path_fd.as_fd(), set.uid, set.gid)?;
        }
        if let Some(size) = set.size {
            let before = self
                .quota
                .as_ref()
                .map(|_| sys::fstat(path_fd.as_fd()))
                .transpose()?;
            match &open {
                Some(f) => sys::ftruncate(f.fd.as_fd(), size)?,
                None => sys::truncate_fd(path_fd.as_fd(), size)?,
            }
            if let (Some(q), Some(before)) = (&self.quota, before) {
                q.account(&before, &sys::fstat(path_fd.as_fd())?);
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [to_timespec(set.atime), to_timespec(set.mtime)];
            match &open {
                Some(f) => {
                    if unsafe { libc::futimens(f.fd.as_raw_fd(), times.as_ptr()) } < 0 {
                        return Err(Errno::last());
                    }
                }
                None => sys::utimens_fd(path_fd.as_fd(), times)?,
            }
        }
        let st = sys::fstat(path_fd.as_fd())?;
        // The kernel asked for a new size or mtime and applies it to what it caches; a change
        // of mode or owner leaves either as SOURCE had it, which may still be news.
        if set.size.is_some() || set.mtime.is_some() {
            node.wrote();
        }
        let changed_behind = node.tell(&st);
        Ok(Attr { st, changed_behind })
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let fd = self.inodes.path_fd(ino)?;
        sys::readlink_fd(fd.as_fd())
    }

    /// Create something in `parent` as the caller with `make`, then look it up.
    fn make(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(BorrowedFd<'_>, &CStr) -> FsResult<()>,
    ) -> FsResult<Entry> {
        let dir = self.inodes.path_fd(parent)?;
        let c = sys::cname(name)?;
        {
            let _as = AsCaller::new(caller)?;
            make(dir.as_fd(), &c)?;
        }
        let entry = self.enter(parent, dir.as_fd(), name, &c)?;
        if let Some(q) = &self.quota {
            if entry.attr.st_nlink <= 1 || entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR {
                q.created(&entry.attr);
            }
        }
        Ok(entry)
    }

    /// For accounting: what `dir/name` is before it loses that name.
    fn victim(&self, dir: BorrowedFd<'_>, name: &CStr) -> Option<libc::stat> {
        self.quota.as_ref()?;
        sys::fstatat_nofollow(dir, name).ok()
    }

    fn freed(&self, victim: Option<libc::stat>) {
        if let (Some(q), Some(st)) = (&self.quota, victim) {
            q.unlinked(&st);
        }
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> FsResult<Entry> {
        self.make(caller, parent, name, |dir, c| {
            sys::mknodat(dir, c, mode, rdev as u64)
        })
    }

    pub fn mkdir(&self, caller: Caller, parent: u64, name: &OsStr, mode: u32) -> FsResult<Entry> {
        self.make(caller, parent, name, |dir, c| sys::mkdirat(dir, c, mode))
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> FsResult<Entry> {
        let t = sys::cpath(target)?;
        self.make(caller, parent, name, |dir, c| sys::symlinkat(&t, dir, c))
    }

    pub fn link(
        &self,
        caller: Caller,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> FsResult<Entry> {
        let src = self.inodes.path_fd(ino)?;
        let as_root = caller.uid == 0;
        self.make(caller, newparent, newname, |dir, c| {
            sys::link_fd(src.as_fd(), dir, c, as_root)
        })
    }

    pub fn unlink(&self, caller: Caller, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.inodes.path_fd(parent)?;
        let c = sys::cname(name)?;
        let victim = self.victim(dir.as_fd(), &c);
        {
            let _as = AsCaller::new(caller)?;
            sys::unlinkat(dir.as_fd(), &c, 0)?;
        }
        self.freed(victim);
        Ok(())
    }

    pub fn rmdir(&self, caller: Caller, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.inodes.path_fd(parent)?;
        let c = sys::cname(name)?;
        let victim = self.victim(dir.as_fd(), &c);
        {
            let _as = AsCaller::new(caller)?;
            sys::unlinkat(dir.as_fd(), &c, libc::AT_REMOVEDIR)?;
        }
        self.freed(victim);
        Ok(())
    }

    pub fn rename(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let old_dir = self.inodes.path_fd(parent)?;
        let new_dir = self.inodes.path_fd(newparent)?;
        let (oc, nc) = (sys::cname(name)?, sys::cname(newname)?);
        let replaced = if flags & libc::RENAME_EXCHANGE == 0 {
            self.victim(new_dir.as_fd(), &nc)
        } else {
            None
        };
        {
            let _as = AsCaller::new(caller)?;
            sys::renameat2(old_dir.as_fd(), &oc, new_dir.as_fd(), &nc, flags)?;
        }
        self.freed(replaced);
        // Keep display paths right: whatever is now at the new name came from the old one.
        if let Ok(st) = sys::fstatat_nofollow(new_dir.as_fd(), &nc) {
            self.inodes
                .moved((st.st_dev, st.st_ino), newparent, newname);
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            if let Ok(st) = sys::fstatat_nofollow(old_dir.as_fd(), &oc) {
                self.inodes.moved((st.st_dev, st.st_ino), parent, name);
            }
        }
        Ok(())
    }

    /// Open node `ino`; returns the new file handle.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let node = self.inodes.get(ino)?;
        let fd = self
            .inodes
            .open_data(&node, flags & !STRIP_OPEN_FLAGS & !libc::O_NOFOLLOW)?;
        Ok(self.handles.insert(fd, ino, node, writable(flags)))
    }

    /// Create and open `parent/name` as the caller.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> FsResult<(Entry, u64)> {
        let dir = self.inodes.path_fd(parent)?;
        let c = sys::cname(name)?;
        let (fd, opened) = {
            let _as = AsCaller::new(caller)?;
            open_or_create(
                dir.as_fd(),
                &c,
                flags & !(libc::O_DIRECT | libc::O_NOCTTY),
                mode,
            )?
        };
        let st = sys::fstat(fd.as_fd())?;
        if let Some(q) = &self.quota {
            match &opened {
                Opened::Created => q.created(&st),
                Opened::Existed {
                    before: Some(before),
                } => q.account(before, &st),
                Opened::Existed { before: None } => {}
            }
        }
        let created = matches!(opened, Opened::Created);
        // The handle comes from the descriptor we already have: no second open of the name.
        let reference = match self.inodes.handle_for(fd.as_fd(), &st) {
            Some(h) => InodeRef::Handle(h),
            None => InodeRef::Fd(sys::openat(dir.as_fd(), &c, libc::O_PATH, 0)?),
        };
        let (ino, node) = self
            .inodes
            .remember(parent, name, reference, &st, created)?;
        let entry = entry(ino, &node, st);
        // A file this call created has no capabilities to kill.
        let fh = self
            .handles
            .insert(fd, ino, node, writable(flags) && !created);
        Ok((entry, fh))
    }

    /// The descriptor behind `fh` (for kernel passthrough registration).
    pub fn open_file(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.fd_of(fh)
    }

    /// Read into `buf` from `offset`; the bytes read (fewer only at the end of the file).
    pub fn read(&self, fh: u64, offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        sys::pread(self.fd_of(fh)?.fd.as_fd(), buf, offset)
    }

    /// Write `data`. `kill_suidgid` is the kernel's request (FUSE_WRITE_KILL_SUIDGID) to drop
    /// set-user-ID and set-group-ID as a write by an unprivileged caller does; like the kernel,
    /// any write also removes file capabilities.
    pub fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &(impl WriteData + ?Sized),
        kill_suidgid: bool,
    ) -> FsResult<u32> {
        let f = self.fd_of(fh)?;
        if kill_suidgid {
            let st = sys::fstat(f.fd.as_fd())?;
            let mut mode = st.st_mode & 0o7777;
            mode &= !libc::S_ISUID;
            if mode & libc::S_IXGRP != 0 {
                mode &= !libc::S_ISGID;
            }
            if mode != st.st_mode & 0o7777 {
                sys::chmod_fd(f.fd.as_fd(), mode)?;
            }
        }
        if f.has_caps.swap(false, Ordering::Relaxed) {
            match sys::fremovexattr(f.fd.as_fd(), SECURITY_CAPABILITY) {
                Ok(()) | Err(Errno(libc::ENODATA)) => {}
                Err(e) => return Err(e),
            }
        }
        let written = self.metered(f.fd.as_fd(), offset, data.size() as u64, || {
            data.write_at(f.fd.as_fd(), offset).map(|n| n as u32)
        });
        f.node.wrote();
        written
    }

    /// Run an operation that may allocate `[offset, offset+len)` in `fd`, within the quota.
    fn metered<T>(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> FsResult<T>,
    ) -> FsResult<T> {
        let Some(q) = &self.quota else {
            return op();
        };
        let before = sys::fstat(fd)?;
        q.check_growth(Quota::growth(before.st_size as u64, offset, len))?;
        let r = op();
        if let Ok(after) = sys::fstat(fd) {
            q.account(&before, &after);
        }
        r
    }

    pub fn flush(&self, fh: u64) -> FsResult<()> {
        sys::flush(self.fd_of(fh)?.fd.as_fd())
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        self.handles.remove(fh);
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        sys::fsync(self.fd_of(fh)?.fd.as_fd(), datasync)
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let node = self.inodes.get(ino)?;
        let fd = self
            .inodes
            .open_data(&node, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(self.handles.insert(fd, ino, node, false))
    }

    /// Entries of directory `fh` after cookie `offset` (one batch; call again from the last
    /// entry's offset for more). An empty batch is the end.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let f = self.fd_of(fh)?;
        let _g = f.dir_lock.lock();
        let mut buf = vec![0u8; 32 * 1024];
        let raw = sys::read_dir_at(f.fd.as_raw_fd(), offset as i64, &mut buf)?;
        Ok(raw
            .into_iter()
            .map(|e| DirEntry {
                ino: self.inodes.id_for_ino(e.ino),
                offset: e.next_offset as u64,
                kind: dtype_to_mode(e.d_type),
                name: e.name,
            })
            .collect())
    }

    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.handles.remove(fh);
        Ok(())
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        sys::fsync(self.fd_of(fh)?.fd.as_fd(), datasync)
    }

    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        let mut st = sys::fstatvfs(self.inodes.root_fd())?;
        if let Some(q) = &self.quota {
            let (total, free) = q.statfs_blocks();
            st.f_bsize = crate::fs::quota::BLOCK as _;
            st.f_frsize = crate::fs::quota::BLOCK as _;
            st.f_blocks = total;
            st.f_bfree = free;
            st.f_bavail = free;
        }
        Ok(st)
    }

    pub fn setxattr(
        &self,
        caller: Caller,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> FsResult<()> {
        let fd = self.inodes.path_fd(ino)?;
        let c = xattr_name(name)?;
        if c.as_c_str() == SECURITY_CAPABILITY {
            // Before the change, so no reader can miss it.
            self.inodes
                .get(ino)?
                .no_file_caps
                .store(false, Ordering::Release);
        }
        let _as = AsCaller::new(caller)?;
        sys::setxattr(fd.as_fd(), &c, value, flags)
    }

    /// `size == 0` asks for the length only.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<Xattr> {
        let c = xattr_name(name)?;
        // The kernel asks this before the first write to every file; for one we just created
        // the answer is known.
        if c.as_c_str() == SECURITY_CAPABILITY
            && self.inodes.get(ino)?.no_file_caps.load(Ordering::Acquire)
        {
            return Err(Errno(libc::ENODATA));
        }
        let fd = self.inodes.path_fd(ino)?;
        if size == 0 {
            return sys::getxattr(fd.as_fd(), &c, &mut []).map(|n| Xattr::Size(n as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let n = sys::getxattr(fd.as_fd(), &c, &mut buf)?;
        buf.truncate(n);
        Ok(Xattr::Data(buf))
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> FsResult<Xattr> {
        let fd = self.inodes.path_fd(ino)?;
        if size == 0 {
            return sys::listxattr(fd.as_fd(), &mut []).map(|n| Xattr::Size(n as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let n = sys::listxattr(fd.as_fd(), &mut buf)?;
        buf.truncate(n);
        Ok(Xattr::Data(buf))
    }

    pub fn removexattr(&self, caller: Caller, ino: u64, name: &OsStr) -> FsResult<()> {
        let fd = self.inodes.path_fd(ino)?;
        let c = xattr_name(name)?;
        let _as = AsCaller::new(caller)?;
        sys::removexattr(fd.as_fd(), &c)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let f = self.fd_of(fh)?;
        let fd = f.fd.as_fd();
        // Allocation inside the file may fill holes: the whole range is the upper bound.
        if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
            if let Some(q) = &self.quota {
                q.check_growth(length)?;
            }
        }
        let r = self.metered(fd, 0, 0, || sys::fallocate(fd, mode, offset, length));
        f.node.wrote();
        r
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
    ) -> FsResult<u32> {
        let (fi, fo) = (self.fd_of(fh_in)?, self.fd_of(fh_out)?);
        let len = len.min(u32::MAX as u64 & !0xfff);
        let copied = sys::copy_file_range(
            fi.fd.as_fd(),
            offset_in,
            fo.fd.as_fd(),
            offset_out,
            len,
            flags,
        )
        .map(|n| n as u32);
        fo.node.wrote();
        copied
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        sys::lseek(self.fd_of(fh)?.fd.as_fd(), offset, whence)
    }
}

/// A `getxattr`/`listxattr` answer: the size asked for, or the data.
#[derive(Debug)]
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

fn xattr_name(name: &OsStr) -> FsResult<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// What `open_or_create` found.
enum Opened {
    Created,
    /// The name existed after all (the backing directory changed behind the kernel's back);
    /// `before`: its `stat` before our open (which may truncate it), for the quota.
    Existed {
        before: Option<libc::stat>,
    },
}

/// Open `name` in `dir` for a FUSE CREATE, knowing whether this call made the file. The kernel
/// sends CREATE for a name it believes absent; `O_EXCL` tells us it was: a file we made has no
/// capabilities, and counts whole towards the quota, where one that existed counts only for
/// what our open changed (an `O_TRUNC`).
fn open_or_create(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
    mode: u32,
) -> FsResult<(OwnedFd, Opened)> {
    let exclusive = flags | libc::O_CREAT | libc::O_EXCL;
    if flags & libc::O_EXCL != 0 {
        return Ok((sys::openat(dir, name, exclusive, mode)?, Opened::Created));
    }
    // Bounded: each turn means another process created and removed the name in between.
    for _ in 0..3 {
        match sys::openat(dir, name, exclusive, mode) {
            Ok(fd) => return Ok((fd, Opened::Created)),
            Err(Errno(libc::EEXIST)) => {}
            Err(e) => return Err(e),
        }
        let before = sys::fstatat_nofollow(dir, name).ok();
        match sys::openat(dir, name, flags, 0) {
            Ok(fd) => return Ok((fd, Opened::Existed { before })),
            Err(Errno(libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
    }
    Err(Errno(libc::EAGAIN))
}

/// Whether open flags allow writing.
fn writable(flags: i32) -> bool {
    matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR)
}

fn dtype_to_mode(d: u8) -> u32 {
    match d {
        libc::DT_DIR => libc::S_IFDIR,
        libc::DT_REG => libc::S_IFREG,
        libc::DT_LNK => libc::S_IFLNK,
        libc::DT_CHR => libc::S_IFCHR,
        libc::DT_BLK => libc::S_IFBLK,
        libc::DT_FIFO => libc::S_IFIFO,
        libc::DT_SOCK => libc::S_IFSOCK,
        _ => 0,
    }
}
