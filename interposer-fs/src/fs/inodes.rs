//! The inode table: FUSE node ids ↔ backing inodes, with the kernel's lookup counts.
//!
//! A node does not hold a file descriptor: it holds a kernel file handle (`name_to_handle_at`)
//! and is reopened on demand with `open_by_handle_at`, so a volume with millions of files needs
//! no more descriptors than it has open files. (Filesystems without handle support, and objects
//! on another mount below SOURCE, fall back to an `O_PATH` descriptor.)
//!
//! Invariants and the races they guard against:
//! - One node per backing inode `(st_dev, st_ino)`: two hard links share a node, so the kernel's
//!   attribute cache sees one file.
//! - A node lives while the kernel holds lookups on it (`lookup`/`create`/`mkdir`… add one,
//!   `forget` removes n). A `forget` for an id we no longer hold is ignored.
//! - Each node carries a generation, new whenever its id starts naming another object. Ids are
//!   backing inode numbers, and the backing filesystem reuses a freed number while the kernel may
//!   still hold its inode for the old object (a process whose working directory was removed
//!   keeps it). Same id, same generation: the kernel would take the new object for the old one
//!   (for a removed directory: refuse to create anything in the new one, ENOENT). A new
//!   generation makes it retire the old inode and start a fresh one.
//! - `(parent, name)` is only for telling users where a file is (span paths, fault globs); it
//!   is updated on rename and never used to *reach* a file, so a stale name cannot send an
//!   operation to the wrong object.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::fs::errno::{Errno, FsResult};
use crate::fs::sys::{self, KernelHandle};

/// FUSE's id for the volume root.
pub const ROOT: u64 = 1;

/// `O_PATH` descriptors kept for recently used nodes (the parents of every name operation, and
/// the files whose attributes the kernel asks for), so hot paths skip `open_by_handle_at`
/// (GETATTR on a file outside the cache: 1.6 µs more on this VM, a tenth of a stat through the
/// mount). Sized from the open-file limit: a quarter of it, the rest left for open files,
/// between these bounds. Bounded: a volume with millions of files still needs at most this many
/// descriptors for it, and a cached descriptor is dropped when the kernel forgets its node.
pub const FD_CACHE_MIN: usize = 512;
pub const FD_CACHE_MAX: usize = 16_384;
const FD_SHARDS: usize = 16;

/// The descriptor cache's capacity for a process allowed `open_files` descriptors.
pub fn fd_cache_capacity(open_files: u64) -> usize {
    usize::try_from(open_files / 4)
        .unwrap_or(FD_CACHE_MAX)
        .clamp(FD_CACHE_MIN, FD_CACHE_MAX)
}

/// Ids from here up are handed out by counter (objects on other devices below SOURCE).
const FOREIGN_IDS: u64 = 1 << 63;

/// How to reach a backing inode again.
#[derive(Debug)]
pub enum InodeRef {
    Handle(KernelHandle),
    Fd(OwnedFd),
}

/// The immutable part of a node, shared with in-flight operations.
#[derive(Debug)]
pub struct InodeData {
    pub reference: InodeRef,
    pub dev: u64,
    pub ino: u64,
    /// Told to the kernel with the id (see the module doc). The kernel keeps 32 bits of it.
    pub generation: u32,
    /// The file was created through this mount and nothing has set `security.capability` on it
    /// since: the kernel's question before its first write can be answered without a syscall.
    pub no_file_caps: AtomicBool,
    /// The size and mtime of a regular file the kernel was last told, folded into one number
    /// (0: nothing told yet). See [`InodeData::tell`].
    told: AtomicU64,
    /// The contents changed through the mount since `told` was recorded.
    written: AtomicBool,
}

impl InodeData {
    fn new(reference: InodeRef, st: &libc::stat, generation: u32, created: bool) -> Self {
        InodeData {
            reference,
            dev: st.st_dev,
            ino: st.st_ino,
            generation,
            no_file_caps: AtomicBool::new(created),
            told: AtomicU64::new(0),
            written: AtomicBool::new(false),
        }
    }

    /// The file's contents or size changed through the mount (a write, truncation, allocation
    /// or copy): the kernel saw it happen, and what it caches already agrees.
    pub fn wrote(&self) {
        if !self.written.load(Ordering::Relaxed) {
            self.written.store(true, Ordering::Relaxed);
        }
    }

    /// Record the attributes about to be told to the kernel. True when this regular file's size
    /// or mtime changed since the kernel was last told, and not through the mount: SOURCE
    /// changed behind it, and any page the kernel caches may be stale.
    ///
    /// Racing with a write through the mount can only give a needless true (the write's change
    /// seen before `wrote`); a change behind the mount racing with one through it can be missed,
    /// which a volume with one writer, the mount, never sees.
    pub fn tell(&self, st: &libc::stat) -> bool {
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return false;
        }
        let now = (st.st_mtime as u64)
            .wrapping_mul(1_000_000_007)
            .wrapping_add(st.st_mtime_nsec as u64)
            ^ (st.st_size as u64).rotate_left(29);
        let now = now.max(1);
        let before = self.told.swap(now, Ordering::Relaxed);
        let ours = self.written.swap(false, Ordering::Relaxed);
        before != 0 && before != now && !ours
    }
}

struct Node {
    data: Arc<InodeData>,
    parent: u64,
    name: OsString,
    lookups: u64,
}

#[derive(Default)]
struct Maps {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
}

pub struct InodeTable {
    /// The descriptor of SOURCE: the root node and the mount fd for `open_by_handle_at`.
    root_fd: OwnedFd,
    maps: RwLock<Maps>,
    next_id: AtomicU64,
    next_generation: AtomicU32,
    /// False when SOURCE's filesystem refused `name_to_handle_at`.
    handles_supported: bool,
    /// The mount id `name_to_handle_at` gives for SOURCE (0 without handles).
    root_mount: i32,
    root_dev: u64,
    root_ino: u64,
    /// node id → `O_PATH` descriptor; sharded, each shard bounded to `fd_shard_capacity`.
    fd_cache: [parking_lot::Mutex<HashMap<u64, Arc<OwnedFd>>>; FD_SHARDS],
    fd_shard_capacity: usize,
}

impl InodeTable {
    pub fn new(root_fd: OwnedFd) -> FsResult<Self> {
        let st = sys::fstat(root_fd.as_fd())?;
        let root_mount = sys::name_to_handle_at(root_fd.as_fd(), c".")
            .ok()
            .map(|(_, mount)| mount);
        let root = Node {
            data: Arc::new(InodeData::new(
                InodeRef::Fd(sys::dup(root_fd.as_fd())?),
                &st,
                0,
                false,
            )),
            parent: ROOT,
            name: OsString::new(),
            lookups: 1,
        };
        let mut maps = Maps::default();
        maps.by_key.insert((st.st_dev, st.st_ino), ROOT);
        maps.nodes.insert(ROOT, root);
        Ok(InodeTable {
            root_fd,
            maps: RwLock::new(maps),
            next_id: AtomicU64::new(FOREIGN_IDS),
            next_generation: AtomicU32::new(1),
            root_ino: st.st_ino,
            handles_supported: root_mount.is_some(),
            root_mount: root_mount.unwrap_or(0),
            root_dev: st.st_dev,
            fd_cache: std::array::from_fn(|_| parking_lot::Mutex::new(HashMap::new())),
            fd_shard_capacity: fd_cache_capacity(sys::open_file_limit()) / FD_SHARDS,
        })
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root_fd.as_fd()
    }

    pub fn handles_supported(&self) -> bool {
        self.handles_supported
    }

    /// The node's shared data, or ESTALE if the kernel already forgot it.
    pub fn get(&self, id: u64) -> FsResult<Arc<InodeData>> {
        self.maps
            .read()
            .nodes
            .get(&id)
            .map(|n| n.data.clone())
            .ok_or(Errno::ESTALE)
    }

    /// An `O_PATH` descriptor of node `id` (from the cache when possible). Must run as root.
    pub fn path_fd(&self, id: u64) -> FsResult<Arc<OwnedFd>> {
        let shard = &self.fd_cache[(id as usize) % FD_SHARDS];
        if let Some(fd) = shard.lock().get(&id) {
            return Ok(fd.clone());
        }
        let fd = Arc::new(self.open(id, libc::O_PATH)?);
        let mut cache = shard.lock();
        if cache.len() >= self.fd_shard_capacity {
            if let Some(&victim) = cache.keys().next() {
                cache.remove(&victim);
            }
        }
        cache.insert(id, fd.clone());
        Ok(fd)
    }

    fn uncache(&self, id: u64) {
        self.fd_cache[(id as usize) % FD_SHARDS].lock().remove(&id);
    }

    /// Open node `id` with `flags` (`O_PATH` to just locate it). Must run as root.
    pub fn open(&self, id: u64, flags: i32) -> FsResult<OwnedFd> {
        let data = self.get(id)?;
        self.open_data(&data, flags)
    }

    pub fn open_data(&self, data: &InodeData, flags: i32) -> FsResult<OwnedFd> {
        match &data.reference {
            InodeRef::Handle(h) => sys::open_by_handle(self.root_fd.as_fd(), h, flags),
            InodeRef::Fd(fd) if flags & libc::O_PATH != 0 => sys::dup(fd.as_fd()),
            InodeRef::Fd(fd) => sys::reopen(fd.as_fd(), flags),
        }
    }

    /// How to reach the object `fd` again: its kernel handle, or `fd` itself (which must then
    /// be an `O_PATH` descriptor) where handles cannot be used.
    pub fn reference(&self, fd: OwnedFd, st: &libc::stat) -> InodeRef {
        match self.handle_for(fd.as_fd(), st) {
            Some(h) => InodeRef::Handle(h),
            None => InodeRef::Fd(fd),
        }
    }

    /// The kernel handle of the object open as `fd` (any descriptor of it), if the backing
    /// filesystem gives one and the object is on SOURCE's device.
    pub fn handle_for(&self, fd: BorrowedFd<'_>, st: &libc::stat) -> Option<KernelHandle> {
        if self.handles_supported && st.st_dev == self.root_dev {
            sys::name_to_handle(fd).ok()
        } else {
            None
        }
    }

    /// Record one kernel lookup of the object found as `parent/name`, described by `st` and
    /// reached through `reference`; `created` when this mount just created it. Returns the node
    /// id, and its data (with the generation to give the kernel).
    ///
    /// Node ids are the backing inode numbers (so `stat` and `readdir` inside the volume show
    /// the real, stable numbers, as tools like git and rsync expect across remounts); objects on
    /// another device below SOURCE get ids from a separate counter range. If the backing
    /// filesystem reused an inode number for a new file (the handle differs), the node is
    /// pointed at the new file, under a new generation.
    pub fn remember(
        &self,
        parent: u64,
        name: &OsStr,
        reference: InodeRef,
        st: &libc::stat,
        created: bool,
    ) -> FsResult<(u64, Arc<InodeData>)> {
        let key = (st.st_dev, st.st_ino);
        let data = |reference| {
            // Never 0, the root's; wrapping after 4 billion nodes is harmless (a collision needs
            // the kernel to still hold the one node from 2^32 ago with this id).
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed).max(1);
            Arc::new(InodeData::new(reference, st, generation, created))
        };
        let mut maps = self.maps.write();
        if let Some(&id) = maps.by_key.get(&key) {
            if let Some(node) = maps.nodes.get_mut(&id) {
                node.lookups += 1;
                if id != ROOT {
                    node.parent = parent;
                    node.name = name.to_os_string();
                    let stale = match (&node.data.reference, &reference) {
                        (InodeRef::Handle(old), InodeRef::Handle(new)) => old != new,
                        _ => false,
                    };
                    if stale {
                        self.uncache(id);
                        node.data = data(reference);
                    }
                }
                return Ok((id, node.data.clone()));
            }
        }
        let id = if st.st_dev == self.root_dev && st.st_ino > ROOT && st.st_ino < FOREIGN_IDS {
            st.st_ino
        } else {
            self.next_id.fetch_add(1, Ordering::Relaxed)
        };
        let data = data(reference);
        maps.by_key.insert(key, id);
        maps.nodes.insert(
            id,
            Node {
                data: data.clone(),
                parent,
                name: name.to_os_string(),
                lookups: 1,
            },
        );
        Ok((id, data))
    }

    /// The node a name the kernel looks up again already is, told without opening the object:
    /// `st` is what `fstatat` said `parent/name` is, and `handle_now` gives the name's kernel
    /// handle and mount id, asked after that. None: not a node we hold, not on SOURCE's
    /// filesystem, or the name now names another object; the caller opens it and remembers it.
    ///
    /// Why two calls by name are enough: a handle equal to the node's says the node's inode
    /// existed when it was asked; it existed when the node was remembered, so it existed in
    /// between, when the name was `stat`ed. A filesystem gives an inode number to one live
    /// inode at a time, so the inode `st` describes is the node's own.
    pub fn revisit(
        &self,
        parent: u64,
        name: &OsStr,
        st: &libc::stat,
        handle_now: impl FnOnce() -> Option<(KernelHandle, i32)>,
    ) -> Option<(u64, Arc<InodeData>)> {
        if !self.handles_supported || st.st_dev != self.root_dev {
            return None;
        }
        let (id, data) = {
            let maps = self.maps.read();
            let id = *maps.by_key.get(&(st.st_dev, st.st_ino))?;
            (id, maps.nodes.get(&id)?.data.clone())
        };
        let InodeRef::Handle(known) = &data.reference else {
            return None;
        };
        match handle_now() {
            Some((now, mount)) if now == *known && mount == self.root_mount => {}
            _ => return None,
        }
        let mut maps = self.maps.write();
        let node = maps.nodes.get_mut(&id)?;
        // Forgotten and remembered again meanwhile: that record may be of another object.
        if !Arc::ptr_eq(&node.data, &data) {
            return None;
        }
        node.lookups += 1;
        if node.parent != parent || node.name != name {
            node.parent = parent;
            node.name = name.to_os_string();
        }
        Some((id, data))
    }

    /// The node id readdir should show for a backing inode number.
    pub fn id_for_ino(&self, ino: u64) -> u64 {
        if ino == self.root_ino { ROOT } else { ino }
    }

    /// The kernel dropped `n` lookups of `id`.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let mut maps = self.maps.write();
        let remove = match maps.nodes.get_mut(&id) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
            }
            None => false,
        };
        if remove {
            self.uncache(id);
            if let Some(node) = maps.nodes.remove(&id) {
                let key = (node.data.dev, node.data.ino);
                if maps.by_key.get(&key) == Some(&id) {
                    maps.by_key.remove(&key);
                }
            }
        }
    }

    /// After a rename: the inode `key` is now called `parent/name`.
    pub fn moved(&self, key: (u64, u64), parent: u64, name: &OsStr) {
        let mut maps = self.maps.write();
        if let Some(&id) = maps.by_key.get(&key) {
            if let Some(node) = maps.nodes.get_mut(&id) {
                node.parent = parent;
                node.name = name.to_os_string();
            }
        }
    }

    /// Path of node `id` relative to the root (`""` for the root, `?` where unknown).
    pub fn path(&self, id: u64) -> Arc<str> {
        self.path_with(id, None)
    }

    /// Path of `name` inside node `parent`.
    pub fn child_path(&self, parent: u64, name: &OsStr) -> Arc<str> {
        self.path_with(parent, Some(name))
    }

    /// The names from node `id` up to the root joined by `/`, then `child`: assembled from the
    /// end in a per-thread buffer, so a path costs one allocation, shared by every span that
    /// carries it.
    fn path_with(&self, id: u64, child: Option<&OsStr>) -> Arc<str> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let maps = self.maps.read();
        let nodes = &maps.nodes;
        // `child`, then the names up to the root. Bounded walk: a cycle would be a bug, but must
        // never hang an operation.
        let parts = move || {
            let (mut cur, mut steps) = (id, 0);
            let up = std::iter::from_fn(move || {
                if cur == ROOT || steps == 4096 {
                    return None;
                }
                steps += 1;
                match nodes.get(&cur) {
                    Some(node) => {
                        cur = node.parent;
                        Some(node.name.as_bytes())
                    }
                    None => {
                        cur = ROOT;
                        Some(b"?".as_slice())
                    }
                }
            });
            child.map(OsStr::as_bytes).into_iter().chain(up)
        };
        let (count, bytes) = parts().fold((0, 0), |(n, len), p| (n + 1, len + p.len()));
        let len = bytes + count.max(1) - 1;
        BUF.with_borrow_mut(|buf| {
            buf.clear();
            buf.resize(len, b'/');
            let mut end = len;
            for part in parts() {
                buf[end - part.len()..end].copy_from_slice(part);
                end = end.saturating_sub(part.len() + 1);
            }
            Arc::from(String::from_utf8_lossy(buf).as_ref())
        })
    }

    /// Number of live nodes (root included).
    pub fn len(&self) -> usize {
        self.maps.read().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_cache_takes_a_quarter_of_the_limit_within_bounds() {
        assert_eq!(fd_cache_capacity(1024), FD_CACHE_MIN);
        assert_eq!(fd_cache_capacity(20_000), 5_000);
        assert_eq!(fd_cache_capacity(1 << 20), FD_CACHE_MAX);
        assert_eq!(fd_cache_capacity(u64::MAX), FD_CACHE_MAX);
    }

    #[test]
    fn only_a_change_not_made_through_the_mount_is_told_as_changed_behind() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | 0o644;
        st.st_size = 4096;
        st.st_mtime = 1_000;
        let node = InodeData::new(InodeRef::Fd(null.into()), &st, 1, false);
        assert!(!node.tell(&st), "the first attributes told");
        assert!(!node.tell(&st), "nothing changed");

        st.st_mtime_nsec = 1;
        assert!(node.tell(&st), "mtime changed behind the mount");
        st.st_size = 0;
        assert!(node.tell(&st), "size changed behind the mount");

        node.wrote();
        st.st_size = 10;
        st.st_mtime = 1_001;
        assert!(!node.tell(&st), "changed through the mount");
        st.st_mtime = 1_002;
        assert!(node.tell(&st), "the write was accounted for once");

        st.st_mode = libc::S_IFDIR | 0o755;
        st.st_mtime = 1_003;
        assert!(!node.tell(&st), "only regular files cache pages");
    }

    #[test]
    fn a_name_looked_up_again_is_its_node_only_while_it_names_the_same_object() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"f").unwrap();
        std::fs::write(dir.path().join("g"), b"g").unwrap();
        let table = InodeTable::new(std::fs::File::open(dir.path()).unwrap().into()).unwrap();
        assert!(
            table.handles_supported(),
            "{}: no file handles",
            dir.path().display()
        );
        let name = OsStr::new("f");
        let fd = sys::openat(table.root_fd(), c"f", libc::O_PATH, 0).unwrap();
        let st = sys::fstat(fd.as_fd()).unwrap();
        let (id, _) = table
            .remember(ROOT, name, table.reference(fd, &st), &st, false)
            .unwrap();
        let now = || sys::name_to_handle_at(table.root_fd(), c"f").ok();
        let (handle, mount) = now().unwrap();

        assert_eq!(
            table.revisit(ROOT, name, &st, now).map(|(i, _)| i),
            Some(id)
        );
        let other = sys::name_to_handle_at(table.root_fd(), c"g").unwrap().0;
        assert!(
            table
                .revisit(ROOT, name, &st, || Some((other, mount)))
                .is_none(),
            "the name now names another object with the same number"
        );
        assert!(
            table
                .revisit(ROOT, name, &st, || Some((handle, mount + 1)))
                .is_none(),
            "the name is on another mount"
        );
        assert!(table.revisit(ROOT, name, &st, || None).is_none());

        // The revisit counted as a lookup: two to forget.
        table.forget(id, 1);
        assert!(table.revisit(ROOT, name, &st, now).is_some());
        table.forget(id, 2);
        assert!(
            table.revisit(ROOT, name, &st, now).is_none(),
            "a forgotten node"
        );
    }

    #[test]
    fn a_path_joins_the_names_from_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/bé")).unwrap();
        let table = InodeTable::new(std::fs::File::open(dir.path()).unwrap().into()).unwrap();
        let remember = |parent: u64, name: &str| {
            let parent_fd = table.path_fd(parent).unwrap();
            let c = std::ffi::CString::new(name).unwrap();
            let fd = sys::openat(parent_fd.as_fd(), &c, libc::O_PATH, 0).unwrap();
            let st = sys::fstat(fd.as_fd()).unwrap();
            let reference = table.reference(fd, &st);
            let (id, _) = table
                .remember(parent, OsStr::new(name), reference, &st, false)
                .unwrap();
            id
        };
        let a = remember(ROOT, "a");
        let b = remember(a, "bé");

        assert_eq!(&*table.path(ROOT), "");
        assert_eq!(&*table.path(a), "a");
        assert_eq!(&*table.path(b), "a/bé");
        assert_eq!(&*table.child_path(ROOT, OsStr::new("x")), "x");
        assert_eq!(&*table.child_path(b, OsStr::new("x.txt")), "a/bé/x.txt");
        assert_eq!(&*table.path(999_999), "?", "a node the table does not know");
        assert_eq!(&*table.child_path(999_999, OsStr::new("n")), "?/n");
        // Each path is built from scratch: a longer one before does not leak into it.
        assert_eq!(&*table.child_path(a, OsStr::new("c")), "a/c");
        assert_eq!(
            &*table.child_path(ROOT, OsStr::from_bytes(b"\xff")),
            "\u{fffd}",
            "a name that is not UTF-8 is shown lossily"
        );
    }
}
