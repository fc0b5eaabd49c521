//! What every layer sees of an operation: its name, who called, where, and how it ended.
//!
//! Layers never see fuser's types or the typed result of an operation; they see an [`OpInfo`]
//! describing the call and an [`Outcome`] (bytes moved, file handle opened) or an errno. That is
//! what lets a layer be a few dozen lines.

use std::cell::{Cell, OnceCell};
use std::sync::Arc;
use std::time::Duration;

/// A filesystem operation, named as FUSE names it (lower case in the parameter contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Access,
    Create,
    Fallocate,
    CopyFileRange,
    Lseek,
}

impl Op {
    pub const ALL: [Op; 31] = [
        Op::Lookup,
        Op::Getattr,
        Op::Setattr,
        Op::Readlink,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::Open,
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Release,
        Op::Fsync,
        Op::Opendir,
        Op::Readdir,
        Op::Releasedir,
        Op::Fsyncdir,
        Op::Statfs,
        Op::Setxattr,
        Op::Getxattr,
        Op::Listxattr,
        Op::Removexattr,
        Op::Access,
        Op::Create,
        Op::Fallocate,
        Op::CopyFileRange,
        Op::Lseek,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Releasedir => "releasedir",
            Op::Fsyncdir => "fsyncdir",
            Op::Statfs => "statfs",
            Op::Setxattr => "setxattr",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Removexattr => "removexattr",
            Op::Access => "access",
            Op::Create => "create",
            Op::Fallocate => "fallocate",
            Op::CopyFileRange => "copy_file_range",
            Op::Lseek => "lseek",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Operations that move file data (what the throttle layer meters).
    pub fn direction(self) -> Option<Direction> {
        match self {
            Op::Read => Some(Direction::Read),
            Op::Write | Op::CopyFileRange => Some(Direction::Write),
            _ => None,
        }
    }
}

/// Read or write, for throttling and byte counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// A set of operations as a bitmask: membership is one AND on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSet(u64);

impl OpSet {
    pub const fn empty() -> OpSet {
        OpSet(0)
    }
    pub fn all() -> OpSet {
        OpSet((1u64 << Op::ALL.len()) - 1)
    }
    pub fn insert(&mut self, op: Op) {
        self.0 |= 1 << op as u8;
    }
    pub fn contains(self, op: Op) -> bool {
        self.0 & (1 << op as u8) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The caller of an operation, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// How an [`OpInfo`] learns its path (and, for rename and link, the new path) when a layer first
/// asks.
pub type ResolvePaths<'a> = &'a dyn Fn(&OpInfo<'_>) -> (Arc<str>, Option<Arc<str>>);

/// What layers get to know about one call. Built by the adapter, borrowed by every layer.
///
/// The path is resolved lazily (only a layer that needs it pays), and the cells let inner layers
/// leave notes (an injected fault, a throttle wait) for outer ones to report.
pub struct OpInfo<'a> {
    pub op: Op,
    pub caller: Caller,
    /// FUSE node the operation is on (the parent directory for name operations).
    pub ino: u64,
    pub fh: Option<u64>,
    pub offset: Option<u64>,
    /// Requested size (read/write/copy/fallocate length).
    pub size: Option<u64>,
    pub flags: Option<i32>,
    path: OnceCell<Arc<str>>,
    new_path: OnceCell<Arc<str>>,
    resolve: ResolvePaths<'a>,
    /// Set by the fault layer when it failed this operation on purpose.
    pub injected_errno: Cell<Option<i32>>,
    /// Set by the fault layer when it delayed this operation on purpose.
    pub injected_delay: Cell<Duration>,
    /// Time the throttle layer made this operation wait for quota.
    pub throttle_wait: Cell<Duration>,
}

impl<'a> OpInfo<'a> {
    pub fn new(op: Op, caller: Caller, ino: u64, resolve: ResolvePaths<'a>) -> Self {
        OpInfo {
            op,
            caller,
            ino,
            fh: None,
            offset: None,
            size: None,
            flags: None,
            path: OnceCell::new(),
            new_path: OnceCell::new(),
            resolve,
            injected_errno: Cell::new(None),
            injected_delay: Cell::new(Duration::ZERO),
            throttle_wait: Cell::new(Duration::ZERO),
        }
    }

    pub fn with_fh(mut self, fh: u64) -> Self {
        self.fh = Some(fh);
        self
    }
    pub fn with_range(mut self, offset: u64, size: u64) -> Self {
        self.offset = Some(offset);
        self.size = Some(size);
        self
    }
    pub fn with_flags(mut self, flags: i32) -> Self {
        self.flags = Some(flags);
        self
    }

    fn resolve_paths(&self) -> &Arc<str> {
        self.path.get_or_init(|| {
            let (path, new_path) = (self.resolve)(self);
            if let Some(np) = new_path {
                let _ = self.new_path.set(np);
            }
            path
        })
    }

    /// Path of the file the operation is about, relative to the volume root (`""` is the root).
    /// Resolved once, when first asked, from the state before the operation ran.
    pub fn path(&self) -> &Arc<str> {
        self.resolve_paths()
    }

    /// For rename and link: the new path.
    pub fn new_path(&self) -> Option<&Arc<str>> {
        self.resolve_paths();
        self.new_path.get()
    }
}

/// How a successful operation ended, as far as layers care.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes read or written.
    pub bytes: u64,
    /// File handle created by open/create/opendir.
    pub fh: Option<u64>,
}

/// Result of an operation as layers see it: the outcome, or the errno it failed with.
pub type OpResult = Result<Outcome, crate::fs::errno::Errno>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_round_trip_and_fit_the_bitmask() {
        assert!(Op::ALL.len() < 64);
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), Some(op));
            assert!(OpSet::all().contains(op));
            assert!(!OpSet::empty().contains(op));
        }
        assert_eq!(Op::from_name("frobnicate"), None);
    }
}
