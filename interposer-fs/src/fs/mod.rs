//! The filesystem proper: a passthrough of SOURCE, and what layers see of each operation.
//!
//! - `op`: operation names, sets, and the [`op::OpInfo`] every layer receives.
//! - `errno`: the error type, a raw errno kept as the syscall gave it.
//! - `sys`: safe wrappers over the `*at()` syscalls (the only `unsafe` for file access).
//! - `creds`: running a call with the caller's fsuid/fsgid/groups.
//! - `inodes`: node ids ↔ backing inodes by file handle, with lookup counts.
//! - `passthrough`: the operations themselves, each returning `FsResult`.
//! - `quota`: capacity enforcement for volumes with a size.

pub mod creds;
pub mod errno;
pub mod inodes;
pub mod op;
pub mod passthrough;
pub mod quota;
pub mod sys;
