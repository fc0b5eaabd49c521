//! The one module that speaks fuser: kernel requests in, the layer stack around the
//! passthrough, kernel replies out.
//!
//! Each method builds an [`OpInfo`], runs the passthrough call through [`Stack`], and turns the
//! `FsResult` into a reply. Nothing else in the crate touches fuser's reply types, which is what
//! lets layers stay small.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Weak, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, CopyFileRangeFlags, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags, WritePayload,
};
use parking_lot::Mutex;

use crate::fs::errno::{Errno, FsResult};
use crate::fs::op::{Caller, Op, OpInfo, OpSet, Outcome, ResolvePaths};
use crate::fs::passthrough::{
    Attr, DirEntry, Entry, Passthrough, SetAttrs, SetTime, WriteData, Xattr,
};
use crate::layers::Stack;
use crate::params::PageCache;

/// How the kernel may cache what we tell it.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// How long the kernel may trust attributes and names without asking again.
    pub ttl: Duration,
    /// What happens to a file's cached pages (see `PageCache`). Kept pages (FOPEN_KEEP_CACHE)
    /// are still dropped when SOURCE changes the file behind the mount (see
    /// [`PageInvalidator`]); `Writeback` also asks for FUSE_WRITEBACK_CACHE.
    pub page_cache: PageCache,
}

impl CacheConfig {
    fn writeback(&self) -> bool {
        self.page_cache == PageCache::Writeback
    }

    /// Flags for an open or create reply.
    fn open_flags(&self) -> FopenFlags {
        if self.page_cache == PageCache::DropOnOpen {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    /// The flags to open the backing file with, for a caller's open `flags`. With the
    /// writeback cache the kernel reads pages around a partial write through any handle, so
    /// write-only becomes read-write; and it places appends itself (it knows the cached size),
    /// so `O_APPEND`, which would make the backing `pwrite` ignore the offset, is dropped.
    fn backing_flags(&self, flags: i32) -> i32 {
        if !self.writeback() {
            return flags;
        }
        let flags = flags & !libc::O_APPEND;
        if flags & libc::O_ACCMODE == libc::O_WRONLY {
            (flags & !libc::O_ACCMODE) | libc::O_RDWR
        } else {
            flags
        }
    }
}

/// A WRITE's data left in the worker's pipe by the kernel (`-o splice=on`), spliced into the
/// backing file. A file the kernel cannot splice into (`O_APPEND`, or `O_DIRECT` with pages
/// it cannot use) gets the data through the worker's buffer instead.
struct Spliced<'a>(&'a WritePayload<'a>);

impl WriteData for Spliced<'_> {
    fn size(&self) -> usize {
        self.0.len()
    }

    fn write_at(&self, fd: BorrowedFd<'_>, offset: u64) -> FsResult<usize> {
        match self.0.splice_to(fd, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                WORKER_BUFFER.with_borrow_mut(|buf| {
                    let buf = worker_buffer(buf, self.0.len());
                    self.0.read_into(buf)?;
                    buf.write_at(fd, offset)
                })
            }
            r => Ok(r?),
        }
    }
}

/// The largest WRITE the kernel sends. A 1 MiB application write then arrives as two requests,
/// and the data's copies (the caller's buffer, the kernel's pages, the daemon's buffer or pipe,
/// the backing file's pages) stay within a core's cache: 1 MiB sequential writes through
/// `/dev/fuse` ran 1,600 MiB/s with 1 MiB requests, 2,100 with 512 KiB and 1,750 with 256 KiB
/// (write-through, no layers, on the 2-core benchmark VM). It also lets a worker's pipe hold a
/// whole request without raising the system's pipe size limit (see `-o splice`).
const MAX_WRITE: u32 = 512 * 1024;

/// How long a FUSE worker waits for the kernel to drop a file's stale pages before it answers
/// anyway (see [`PageInvalidator`]).
const INVALIDATION_WAIT: Duration = Duration::from_millis(100);

/// The shortest interval between two checks of the open files for changes behind the mount
/// (with `cacheTTL=0s`): each check costs one `fstat` per open file.
const RECHECK_MIN: Duration = Duration::from_millis(100);

/// A file whose cached pages are stale, and who waits for them to be dropped.
type Invalidation = (u64, mpsc::SyncSender<()>);

/// Drops the kernel's cached pages of files that SOURCE changed behind the mount.
///
/// With `pageCache` `keep` or `dropOnOpen` over the daemon's reads and writes, the kernel is
/// told to leave a file's pages alone when it sees a new mtime (FUSE_EXPLICIT_INVAL_DATA instead
/// of FUSE_AUTO_INVAL_DATA). A write through the mount changes the mtime too, and its pages are
/// already current: otherwise the first `stat` after every write would throw them away, and the
/// next read would fetch them again. The daemon knows which changes are its own
/// (`InodeData::tell`) and has the others dropped:
/// - before it answers with the new attributes (a lookup, `stat`, open…), on a worker's request;
/// - for the files held open, every `cacheTTL` (at least [`RECHECK_MIN`]): a read does not ask
///   for attributes, so a process reading a file it keeps open would otherwise never see a
///   change made behind the mount (with FUSE_AUTO_INVAL_DATA the kernel asked on a read once
///   the attributes had expired).
///
/// The kernel is told from a thread of its own: it locks each cached page to drop it, and a
/// reader holds that lock while its READ waits for a FUSE worker, so a worker telling it could
/// wait for itself. The worker waits at most [`INVALIDATION_WAIT`].
pub struct PageInvalidator {
    requests: mpsc::Receiver<Invalidation>,
    fs: Arc<Passthrough>,
    recheck: Duration,
}

impl PageInvalidator {
    /// Serve invalidations through `notifier` until the filesystem is dropped.
    pub fn spawn(self, notifier: fuser::Notifier) -> std::io::Result<()> {
        let drop_pages = move |ino: u64| match notifier.inval_inode(INodeNo(ino), 0, 0) {
            // Not known to the kernel any more: nothing is cached.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => log::warn!("cached pages of node {ino} not dropped: {e}"),
            Ok(()) => {}
        };
        std::thread::Builder::new()
            .name("invalidator".into())
            .spawn(move || {
                let mut next_check = Instant::now() + self.recheck;
                loop {
                    let wait = next_check.saturating_duration_since(Instant::now());
                    match self.requests.recv_timeout(wait) {
                        Ok((ino, done)) => {
                            drop_pages(ino);
                            let _ = done.try_send(());
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.fs
                                .open_files_changed_behind()
                                .into_iter()
                                .for_each(&drop_pages);
                            next_check = Instant::now() + self.recheck;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            })
            .map(|_| ())
    }
}

thread_local! {
    /// Each FUSE worker's buffer for READ replies and for the data of a spliced WRITE that
    /// cannot be spliced on: grown (and zeroed) once to the largest request (at most
    /// `max_read`, 1 MiB), not allocated and zeroed per request.
    static WORKER_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The first `size` bytes of a worker's buffer, grown if need be.
fn worker_buffer(buf: &mut Vec<u8>, size: usize) -> &mut [u8] {
    if buf.len() < size {
        buf.resize(size, 0);
    }
    &mut buf[..size]
}

/// The mounted filesystem: passthrough + layers, as fuser sees it.
pub struct Interposer {
    fs: Arc<Passthrough>,
    stack: Stack,
    cache: CacheConfig,
    /// Kernel FUSE passthrough for read/write of regular files (opt-in).
    kernel_passthrough: bool,
    /// Operations a fault may hit (empty without the fault layer, or with faults that do
    /// nothing). The kernel is asked to send them even where it could do without:
    /// - FLUSH (each close()): otherwise the first FLUSH answers ENOSYS and the kernel stops
    ///   sending it, saving a round trip per close: we hold no dirty data (with the writeback
    ///   cache the kernel writes its cached pages back, and reports their errors, before it
    ///   would send FLUSH).
    /// - LOOKUP: otherwise listings carry attributes (READDIRPLUS) and a listed name needs no
    ///   LOOKUP before it is opened.
    faulted: OpSet,
    /// Backing ids must be shared by all open handles of an inode: node → live id.
    backing_by_ino: Mutex<HashMap<u64, Weak<BackingId>>>,
    /// Keeps each handle's backing id alive until release.
    backing_by_fh: Mutex<HashMap<u64, Arc<BackingId>>>,
    /// Where files SOURCE changed behind the mount go to have their pages dropped; `None` where
    /// the kernel drops them itself (FUSE_AUTO_INVAL_DATA: the writeback cache, where it trusts
    /// its own size and mtime, and kernel passthrough, where it caches no pages of its own).
    stale_pages: Option<mpsc::Sender<Invalidation>>,
}

/// What a passthrough result tells layers (bytes moved, handle opened).
trait Measure {
    fn outcome(&self) -> Outcome {
        Outcome::default()
    }
}
impl Measure for () {}
impl Measure for Attr {}
impl Measure for libc::statvfs {}
impl Measure for Entry {}
impl Measure for i64 {}
impl Measure for Xattr {}
impl Measure for Vec<DirEntry> {}
/// A READDIRPLUS reply filled.
struct Listed;
impl Measure for Listed {}
/// A link target.
impl Measure for Vec<u8> {}
/// Bytes read into the worker's buffer.
struct BytesRead(usize);
impl Measure for BytesRead {
    fn outcome(&self) -> Outcome {
        Outcome {
            bytes: self.0 as u64,
            fh: None,
        }
    }
}
/// Bytes written.
impl Measure for u32 {
    fn outcome(&self) -> Outcome {
        Outcome {
            bytes: *self as u64,
            fh: None,
        }
    }
}
/// A new file handle.
impl Measure for u64 {
    fn outcome(&self) -> Outcome {
        Outcome {
            bytes: 0,
            fh: Some(*self),
        }
    }
}
impl Measure for (Entry, u64) {
    fn outcome(&self) -> Outcome {
        Outcome {
            bytes: 0,
            fh: Some(self.1),
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn errno(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// A `stat` of all zeroes: the attributes of a negative entry, which the kernel ignores.
fn zeroed_stat() -> libc::stat {
    // SAFETY: `stat` is plain integers, for which all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Kernel attributes for node `ino` from the backing `stat` (fuser uses `attr.ino` as the
/// node id; see `inodes` for why ids are the backing inode numbers).
fn to_attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

impl Interposer {
    pub fn new(
        fs: Arc<Passthrough>,
        stack: Stack,
        cache: CacheConfig,
        kernel_passthrough: bool,
        faulted: OpSet,
    ) -> (Self, Option<PageInvalidator>) {
        let (stale_pages, invalidator) =
            if kernel_passthrough || cache.page_cache == PageCache::Writeback {
                (None, None)
            } else {
                let (tx, rx) = mpsc::channel();
                let invalidator = PageInvalidator {
                    requests: rx,
                    fs: fs.clone(),
                    recheck: cache.ttl.max(RECHECK_MIN),
                };
                (Some(tx), Some(invalidator))
            };
        let fs = Interposer {
            fs,
            stack,
            cache,
            kernel_passthrough,
            faulted,
            backing_by_ino: Mutex::new(HashMap::new()),
            backing_by_fh: Mutex::new(HashMap::new()),
            stale_pages,
        };
        (fs, invalidator)
    }

    /// Before telling the kernel a node's attributes: if SOURCE changed the file behind the
    /// mount, have its cached pages dropped first.
    fn drop_stale_pages(&self, ino: u64, changed_behind: bool) {
        if !changed_behind {
            return;
        }
        let Some(queue) = &self.stale_pages else {
            return;
        };
        let (done, dropped) = mpsc::sync_channel(1);
        if queue.send((ino, done)).is_ok() {
            let _ = dropped.recv_timeout(INVALIDATION_WAIT);
        }
    }

    /// Run `f` through the layer stack and give back its typed result.
    fn run<T: Measure>(&self, info: &OpInfo<'_>, f: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        if self.stack.is_empty() {
            return f();
        }
        let mut f = Some(f);
        let mut out: Option<FsResult<T>> = None;
        let status = self.stack.call(info, &mut || {
            // A layer calling `next` twice would be a bug; the second call fails instead of
            // repeating a side effect.
            let r = match f.take() {
                Some(f) => f(),
                None => Err(Errno::EIO),
            };
            let s = r.as_ref().map(Measure::outcome).map_err(|e| *e);
            out = Some(r);
            s
        });
        match (status, out) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(r)) => r,
            (Ok(_), None) => Err(Errno::EIO),
        }
    }

    fn info<'a>(&self, op: Op, req: &Request, ino: u64, resolve: ResolvePaths<'a>) -> OpInfo<'a> {
        OpInfo::new(op, caller(req), ino, resolve)
    }

    fn reply_entry(&self, r: FsResult<Entry>, reply: ReplyEntry) {
        match r {
            Ok(e) => {
                self.drop_stale_pages(e.ino, e.changed_behind);
                reply.entry(
                    &self.cache.ttl,
                    &to_attr(e.ino, &e.attr),
                    Generation(e.generation.into()),
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_empty(r: FsResult<()>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_xattr(r: FsResult<Xattr>, reply: ReplyXattr) {
        match r {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(d)) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// A WRITE, its data in a buffer or still in the worker's pipe.
    #[allow(clippy::too_many_arguments)]
    fn write_from(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &(impl WriteData + ?Sized),
        write_flags: WriteFlags,
        reply: ReplyWrite,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self
            .info(Op::Write, req, ino.0, &resolve)
            .with_fh(fh.0)
            .with_range(offset, data.size() as u64);
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.run(&info, || self.fs.write(fh.0, offset, data, kill)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Register `fh`'s descriptor as the kernel passthrough backing file of node `ino`,
    /// sharing one backing id per node as the kernel requires.
    fn backing_for(
        &self,
        ino: u64,
        fh: u64,
        open_backing: impl FnOnce(&std::os::fd::OwnedFd) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut by_ino = self.backing_by_ino.lock();
        let id = match by_ino.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let file = self.fs.open_file(fh).ok()?;
                let id = Arc::new(open_backing(&file.fd).ok()?);
                by_ino.insert(ino, Arc::downgrade(&id));
                id
            }
        };
        self.backing_by_fh.lock().insert(fh, id.clone());
        Some(id)
    }

    fn drop_backing(&self, ino: u64, fh: u64) {
        if self.backing_by_fh.lock().remove(&fh).is_some() {
            let mut by_ino = self.backing_by_ino.lock();
            if by_ino.get(&ino).is_some_and(|w| w.strong_count() == 0) {
                by_ino.remove(&ino);
            }
        }
    }
}

impl Filesystem for Interposer {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        config.set_max_write(MAX_WRITE).map_err(|max| {
            std::io::Error::other(format!("fuser takes writes of {max} bytes at most"))
        })?;
        // Who drops kept pages when SOURCE changes a file (see `PageInvalidator`).
        if self.stale_pages.is_some() {
            config
                .add_capabilities(InitFlags::FUSE_EXPLICIT_INVAL_DATA)
                .map_err(|_| std::io::Error::other("this kernel has no explicit invalidation"))?;
        } else {
            let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
        }
        // We kill set-user-ID/set-group-ID bits and file capabilities ourselves (see
        // `Passthrough::write`); without this the kernel asks for `security.capability` before
        // every single write, which halves small-write throughput.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // Listings carry each entry's attributes (READDIRPLUS), so `ls -l`, `find` and a
        // `grep -r` ask nothing per file before opening it. AUTO: the kernel asks for them on a
        // directory's first batch and while lookups follow its listings, not for every
        // batch of a huge directory read by name only. Useless when nothing may be cached.
        if !self.cache.ttl.is_zero() && !self.faulted.contains(Op::Lookup) {
            let _ = config.add_capabilities(
                InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            );
        }
        if self.cache.writeback() {
            config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .map_err(|_| std::io::Error::other("this kernel has no FUSE writeback cache"))?;
        }
        if self.kernel_passthrough {
            config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .map_err(|_| std::io::Error::other("this kernel has no FUSE passthrough"))?;
            config
                .set_max_stack_depth(1)
                .map_err(|_| std::io::Error::other("FUSE passthrough stack depth refused"))?;
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().child_path(parent.0, name), None);
        let info = self.info(Op::Lookup, req, parent.0, &resolve);
        match self.run(&info, || self.fs.lookup(parent.0, name)) {
            // A negative entry: the kernel remembers the name is absent for the same time it
            // would remember it present, so tools probing for missing files (shells walking
            // PATH, interpreters and compilers searching their paths) ask once, not every time.
            // Creating the name through the mount replaces the kernel's entry at once. An
            // injected ENOENT is not remembered: a fault hits one operation, not the next ones.
            Err(e)
                if e == Errno::ENOENT
                    && !self.cache.ttl.is_zero()
                    && info.injected_errno.get().is_none() =>
            {
                reply.entry(&self.cache.ttl, &to_attr(0, &zeroed_stat()), Generation(0))
            }
            r => self.reply_entry(r, reply),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self.info(Op::Getattr, req, ino.0, &resolve);
        info.fh = fh.map(|f| f.0);
        match self.run(&info, || self.fs.getattr(ino.0, fh.map(|f| f.0))) {
            Ok(a) => {
                self.drop_stale_pages(ino.0, a.changed_behind);
                reply.attr(&self.cache.ttl, &to_attr(ino.0, &a.st))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self.info(Op::Setattr, req, ino.0, &resolve);
        info.fh = fh.map(|f| f.0);
        info.size = size;
        info.flags = mode.map(|m| m as i32);
        let set = SetAttrs {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let c = caller(req);
        match self.run(&info, || self.fs.setattr(c, ino.0, fh.map(|f| f.0), set)) {
            Ok(a) => {
                self.drop_stale_pages(ino.0, a.changed_behind);
                reply.attr(&self.cache.ttl, &to_attr(ino.0, &a.st))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self.info(Op::Readlink, req, ino.0, &resolve);
        match self.run(&info, || self.fs.readlink(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().child_path(parent.0, name), None);
        let info = self
            .info(Op::Mknod, req, parent.0, &resolve)
            .with_flags(mode as i32);
        let c = caller(req);
        self.reply_entry(
            self.run(&info, || self.fs.mknod(c, parent.0, name, mode, rdev)),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().child_path(parent.0, name), None);
        let info = self
            .info(Op::Mkdir, req, parent.0, &resolve)
            .with_flags(mode as i32);
        let c = caller(req);
        self.reply_entry(
            self.run(&info, || self.fs.mkdir(c, parent.0, name, mode)),
            reply,
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().child_path(parent.0, name), None);
        let info = self.info(Op::Unlink, req, parent.0, &resolve);
        let c = caller(req);
        Self::reply_empty(self.run(&info, || self.fs.unlink(c, parent.0, name)), reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().child_path(parent.0, name), None);
        let info = self.info(Op::Rmdir, req, parent.0, &resolve);
        let c = caller(req);
        Self::reply_empty(self.run(&info, || self.fs.rmdir(c, parent.0, name)), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().child_path(parent.0, link_name), None);
        let info = self.info(Op::Symlink, req, parent.0, &resolve);
        let c = caller(req);
        self.reply_entry(
            self.run(&info, || self.fs.symlink(c, parent.0, link_name, target)),
            reply,
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let resolve = |_: &OpInfo<'_>| {
            let inodes = self.fs.inodes();
            (
                inodes.child_path(parent.0, name),
                Some(inodes.child_path(newparent.0, newname)),
            )
        };
        let info = self
            .info(Op::Rename, req, parent.0, &resolve)
            .with_flags(flags.bits() as i32);
        let c = caller(req);
        Self::reply_empty(
            self.run(&info, || {
                self.fs
                    .rename(c, parent.0, name, newparent.0, newname, flags.bits())
            }),
            reply,
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let resolve = |_: &OpInfo<'_>| {
            let inodes = self.fs.inodes();
            (
                inodes.path(ino.0),
                Some(inodes.child_path(newparent.0, newname)),
            )
        };
        let info = self.info(Op::Link, req, ino.0, &resolve);
        let c = caller(req);
        self.reply_entry(
            self.run(&info, || self.fs.link(c, ino.0, newparent.0, newname)),
            reply,
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self
            .info(Op::Open, req, ino.0, &resolve)
            .with_flags(flags.0);
        let backing = self.cache.backing_flags(flags.0);
        match self.run(&info, || self.fs.open(ino.0, backing)) {
            Ok(fh) => {
                if self.kernel_passthrough {
                    if let Some(id) = self.backing_for(ino.0, fh, |fd| reply.open_backing(fd)) {
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                        return;
                    }
                }
                reply.opened(FileHandle(fh), self.cache.open_flags())
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self
            .info(Op::Read, req, ino.0, &resolve)
            .with_fh(fh.0)
            .with_range(offset, size as u64);
        WORKER_BUFFER.with_borrow_mut(|buf| {
            let buf = worker_buffer(buf, size as usize);
            match self.run(&info, || self.fs.read(fh.0, offset, buf).map(BytesRead)) {
                Ok(BytesRead(n)) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.write_from(req, ino, fh, offset, data, write_flags, reply);
    }

    fn write_spliced(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &WritePayload<'_>,
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.write_from(req, ino, fh, offset, &Spliced(data), write_flags, reply);
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if !self.faulted.contains(Op::Flush) {
            reply.error(fuser::Errno::ENOSYS);
            return;
        }
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self.info(Op::Flush, req, ino.0, &resolve).with_fh(fh.0);
        Self::reply_empty(self.run(&info, || self.fs.flush(fh.0)), reply);
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self.info(Op::Release, req, ino.0, &resolve).with_fh(fh.0);
        let r = self.run(&info, || self.fs.release(fh.0));
        if self.kernel_passthrough {
            self.drop_backing(ino.0, fh.0);
        }
        Self::reply_empty(r, reply);
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self.info(Op::Fsync, req, ino.0, &resolve).with_fh(fh.0);
        Self::reply_empty(self.run(&info, || self.fs.fsync(fh.0, datasync)), reply);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self
            .info(Op::Opendir, req, ino.0, &resolve)
            .with_flags(flags.0);
        match self.run(&info, || self.fs.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self.info(Op::Readdir, req, ino.0, &resolve).with_fh(fh.0);
        info.offset = Some(offset);
        match self.run(&info, || self.fs.readdir(fh.0, offset)) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.offset,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// A listing with each entry's attributes. Every entry but `.` and `..` counts as a lookup
    /// in the kernel, so it is remembered like one, and forgotten again if it does not make it
    /// into the reply. Entries gone since the directory was read are left out.
    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self.info(Op::Readdir, req, ino.0, &resolve).with_fh(fh.0);
        info.offset = Some(offset);
        let mut remembered = Vec::new();
        let listed = self.run(&info, || {
            let mut added = 0;
            for e in self.fs.readdir(fh.0, offset)? {
                let name = OsStr::from_bytes(&e.name);
                let entry = if name == "." || name == ".." {
                    None
                } else {
                    match self.fs.lookup_in(fh.0, ino.0, name) {
                        Ok(entry) => Some(entry),
                        Err(Errno::ENOENT) => continue,
                        // The caller sees the error when it reaches this entry, not before.
                        Err(_) if added > 0 => break,
                        Err(err) => return Err(err),
                    }
                };
                let attr = match &entry {
                    Some(entry) => {
                        self.drop_stale_pages(entry.ino, entry.changed_behind);
                        to_attr(entry.ino, &entry.attr)
                    }
                    // The kernel takes nothing from these but the name and type.
                    None => {
                        let mut st = zeroed_stat();
                        st.st_mode = libc::S_IFDIR;
                        to_attr(e.ino, &st)
                    }
                };
                let generation = entry.map_or(0, |entry| entry.generation);
                let full = reply.add(
                    INodeNo(attr.ino.0),
                    e.offset,
                    name,
                    &self.cache.ttl,
                    &attr,
                    Generation(generation.into()),
                );
                if full {
                    if let Some(entry) = entry {
                        self.fs.forget(entry.ino, 1);
                    }
                    break;
                }
                if let Some(entry) = entry {
                    remembered.push(entry.ino);
                }
                added += 1;
            }
            Ok(Listed)
        });
        match listed {
            Ok(_) => reply.ok(),
            Err(e) => {
                for id in remembered {
                    self.fs.forget(id, 1);
                }
                reply.error(errno(e))
            }
        }
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self
            .info(Op::Releasedir, req, ino.0, &resolve)
            .with_fh(fh.0);
        Self::reply_empty(self.run(&info, || self.fs.releasedir(fh.0)), reply);
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self.info(Op::Fsyncdir, req, ino.0, &resolve).with_fh(fh.0);
        Self::reply_empty(self.run(&info, || self.fs.fsyncdir(fh.0, datasync)), reply);
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self.info(Op::Statfs, req, ino.0, &resolve);
        match self.run(&info, || self.fs.statfs()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self
            .info(Op::Setxattr, req, ino.0, &resolve)
            .with_flags(flags);
        info.size = Some(value.len() as u64);
        let c = caller(req);
        Self::reply_empty(
            self.run(&info, || self.fs.setxattr(c, ino.0, name, value, flags)),
            reply,
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self.info(Op::Getxattr, req, ino.0, &resolve);
        info.size = Some(size as u64);
        Self::reply_xattr(
            self.run(&info, || self.fs.getxattr(ino.0, name, size)),
            reply,
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self.info(Op::Listxattr, req, ino.0, &resolve);
        info.size = Some(size as u64);
        Self::reply_xattr(self.run(&info, || self.fs.listxattr(ino.0, size)), reply);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self.info(Op::Removexattr, req, ino.0, &resolve);
        let c = caller(req);
        Self::reply_empty(
            self.run(&info, || self.fs.removexattr(c, ino.0, name)),
            reply,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().child_path(parent.0, name), None);
        let info = self
            .info(Op::Create, req, parent.0, &resolve)
            .with_flags(flags);
        let c = caller(req);
        let backing = self.cache.backing_flags(flags);
        match self.run(&info, || self.fs.create(c, parent.0, name, mode, backing)) {
            Ok((entry, fh)) => {
                self.drop_stale_pages(entry.ino, entry.changed_behind);
                let attr = to_attr(entry.ino, &entry.attr);
                if self.kernel_passthrough {
                    if let Some(id) = self.backing_for(entry.ino, fh, |fd| reply.open_backing(fd)) {
                        reply.created_passthrough(
                            &self.cache.ttl,
                            &attr,
                            Generation(entry.generation.into()),
                            FileHandle(fh),
                            FopenFlags::empty(),
                            &id,
                        );
                        return;
                    }
                }
                reply.created(
                    &self.cache.ttl,
                    &attr,
                    Generation(entry.generation.into()),
                    FileHandle(fh),
                    self.cache.open_flags(),
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let info = self
            .info(Op::Fallocate, req, ino.0, &resolve)
            .with_fh(fh.0)
            .with_range(offset, length)
            .with_flags(mode);
        Self::reply_empty(
            self.run(&info, || self.fs.fallocate(fh.0, offset, length, mode)),
            reply,
        );
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let resolve = |_: &OpInfo<'_>| (self.fs.inodes().path(ino.0), None);
        let mut info = self
            .info(Op::Lseek, req, ino.0, &resolve)
            .with_fh(fh.0)
            .with_flags(whence);
        info.offset = Some(offset as u64);
        match self.run(&info, || self.fs.lseek(fh.0, offset, whence)) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let resolve = |_: &OpInfo<'_>| {
            let inodes = self.fs.inodes();
            (inodes.path(ino_out.0), Some(inodes.path(ino_in.0)))
        };
        let info = self
            .info(Op::CopyFileRange, req, ino_out.0, &resolve)
            .with_fh(fh_out.0)
            .with_range(offset_out, len);
        match self.run(&info, || {
            self.fs.copy_file_range(
                fh_in.0,
                offset_in,
                fh_out.0,
                offset_out,
                len,
                flags.bits() as u32,
            )
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }
}
