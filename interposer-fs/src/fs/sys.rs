//! Thin, safe wrappers over the `*at()` syscalls the passthrough needs.
//!
//! Every name given to these functions is a single path component relative to a directory file
//! descriptor, and nothing here follows a symlink in the last component: that is what keeps every
//! operation inside SOURCE even while a pod races renames and swaps directories for symlinks.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use crate::fs::errno::{Errno, FsResult};

fn check(r: libc::c_int) -> FsResult<libc::c_int> {
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

fn check_ssize(r: libc::ssize_t) -> FsResult<usize> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

/// A validated single path component.
pub fn cname(name: &OsStr) -> FsResult<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    if b.len() > 255 {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    CString::new(b).map_err(|_| Errno::EINVAL)
}

const EMPTY: &CStr = c"";

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> FsResult<OwnedFd> {
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Re-open an `O_PATH` descriptor with real access flags, through `/proc/self/fd`.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> FsResult<OwnedFd> {
    let path = proc_path(fd);
    let fd = check(unsafe {
        libc::open(
            path.as_ptr(),
            (flags | libc::O_CLOEXEC) & !(libc::O_NOFOLLOW | libc::O_CREAT),
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `/proc/self/fd/N`: names the object behind a descriptor, for calls that take no fd.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

// Calls the kernel refuses an `O_PATH` descriptor for (chmod, extended attributes) name the
// object as `/proc/self/fd/N`: a walk through procfs and a magic link that costs the daemon
// more than the call itself (`getxattr` of an absent name: 3.8 µs against 2.5 relative to an
// open `/proc/self/fd`, by hand on this VM). Newer kernels offer cheaper ways, probed once:
// `fchmodat2(fd, "", mode, AT_EMPTY_PATH)` (Linux 6.6) takes the descriptor itself, and the
// `*xattrat` calls (6.13), whose empty-path form refuses `O_PATH`, take the name `N` relative
// to `/proc/self/fd` held open. An older kernel, or a seccomp filter that refuses them, gets
// the path. These numbers are the same on every architecture.
const SYS_FCHMODAT2: libc::c_long = 452;
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// Whether the kernel offers `fchmodat2`.
fn fchmodat2_offered() -> bool {
    static OFFERED: OnceLock<bool> = OnceLock::new();
    // Flags no kernel accepts: EINVAL if the call exists.
    *OFFERED.get_or_init(|| {
        offered(unsafe { libc::syscall(SYS_FCHMODAT2, -1, EMPTY.as_ptr(), 0, u32::MAX) })
    })
}

/// A descriptor named for the `*xattrat` calls: its number `N`, relative to `/proc/self/fd`.
struct ProcFdName {
    dir: RawFd,
    /// `N`, NUL-terminated, written without allocating.
    name: [u8; 12],
}

impl ProcFdName {
    /// `fd` named for the `*xattrat` calls, if the kernel offers them.
    fn for_xattrat(fd: BorrowedFd<'_>) -> Option<Self> {
        static DIR: OnceLock<Option<OwnedFd>> = OnceLock::new();
        let dir = DIR.get_or_init(|| {
            // Flags no kernel accepts: EINVAL if the call exists.
            let probe = unsafe {
                libc::syscall(
                    SYS_GETXATTRAT,
                    -1,
                    EMPTY.as_ptr(),
                    u32::MAX,
                    EMPTY.as_ptr(),
                    std::ptr::null_mut::<XattrArgs>(),
                    0,
                )
            };
            if !offered(probe) {
                return None;
            }
            let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
            let fd = unsafe { libc::open(c"/proc/self/fd".as_ptr(), flags) };
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        });
        let dir = dir.as_ref()?.as_raw_fd();
        let name = decimal(fd.as_raw_fd().unsigned_abs());
        Some(ProcFdName { dir, name })
    }
}

/// `n` in decimal, NUL-terminated.
fn decimal(mut n: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    let mut digits = 0;
    loop {
        out[digits] = b'0' + (n % 10) as u8;
        digits += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out[..digits].reverse();
    out
}

/// Whether a probe with flags no kernel accepts failed as a call that exists does.
fn offered(probe: libc::c_long) -> bool {
    probe < 0 && Errno::last().0 == libc::EINVAL
}

pub fn fstat(fd: BorrowedFd<'_>) -> FsResult<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat_nofollow(dir: BorrowedFd<'_>, name: &CStr) -> FsResult<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

/// A kernel file handle (`name_to_handle_at`): names an inode without holding a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelHandle {
    handle_type: i32,
    bytes: Box<[u8]>,
}

const MAX_HANDLE_SZ: usize = 128;

#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// The file handle of the object `fd` refers to (symlinks included, never followed).
pub fn name_to_handle(fd: BorrowedFd<'_>) -> FsResult<KernelHandle> {
    handle_at(fd, EMPTY, libc::AT_EMPTY_PATH).map(|(h, _)| h)
}

/// The file handle of `dir/name` (a symlink itself, never followed), and the id of the mount
/// it is on.
pub fn name_to_handle_at(dir: BorrowedFd<'_>, name: &CStr) -> FsResult<(KernelHandle, i32)> {
    handle_at(dir, name, 0)
}

fn handle_at(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> FsResult<(KernelHandle, i32)> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    check(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut raw as *mut RawHandle,
            &mut mount_id as *mut libc::c_int,
            flags,
        ) as libc::c_int
    })?;
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    let handle = KernelHandle {
        handle_type: raw.handle_type,
        bytes: raw.f_handle[..len].into(),
    };
    Ok((handle, mount_id))
}

/// Open the object named by `handle` on the filesystem of `mount_fd`. Needs CAP_DAC_READ_SEARCH,
/// so it must run with root credentials.
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    handle: &KernelHandle,
    flags: i32,
) -> FsResult<OwnedFd> {
    let mut raw = RawHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut raw as *mut RawHandle,
            flags | libc::O_CLOEXEC,
        ) as libc::c_int
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> FsResult<()> {
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> FsResult<()> {
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, rdev) })
        .map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> FsResult<()> {
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> FsResult<()> {
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> FsResult<()> {
    check(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// Hard-link the object behind `fd` as `dir/name`. With `as_root` the kernel's `AT_EMPTY_PATH`
/// form is used (needs CAP_DAC_READ_SEARCH); otherwise the `/proc/self/fd` magic link.
pub fn link_fd(
    fd: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &CStr,
    as_root: bool,
) -> FsResult<()> {
    let r = if as_root {
        unsafe {
            libc::linkat(
                fd.as_raw_fd(),
                EMPTY.as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        }
    } else {
        let p = proc_path(fd);
        unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                p.as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        }
    };
    check(r).map(drop)
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> FsResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = check_ssize(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> FsResult<()> {
    if fchmodat2_offered() {
        return check_ssize(unsafe {
            libc::syscall(
                SYS_FCHMODAT2,
                fd.as_raw_fd(),
                EMPTY.as_ptr(),
                mode,
                libc::AT_EMPTY_PATH,
            ) as libc::ssize_t
        })
        .map(drop);
    }
    let p = proc_path(fd);
    check(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> FsResult<()> {
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn truncate_fd(fd: BorrowedFd<'_>, size: u64) -> FsResult<()> {
    let p = proc_path(fd);
    check(unsafe { libc::truncate(p.as_ptr(), size as libc::off_t) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> FsResult<()> {
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

/// Set times; `None` leaves a time alone (`UTIME_OMIT`).
pub fn utimens_fd(fd: BorrowedFd<'_>, times: [libc::timespec; 2]) -> FsResult<()> {
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> FsResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = check_ssize(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> FsResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = check_ssize(unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> FsResult<()> {
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> FsResult<()> {
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
    flags: u32,
) -> FsResult<usize> {
    let mut oi = off_in as libc::loff_t;
    let mut oo = off_out as libc::loff_t;
    check_ssize(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut oi,
            fd_out.as_raw_fd(),
            &mut oo,
            len as usize,
            flags,
        )
    })
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> FsResult<i64> {
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> FsResult<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// `close(dup(fd))`: what `close()` on the application's side means for POSIX locks and for
/// filesystems that report write-back errors at close.
pub fn flush(fd: BorrowedFd<'_>) -> FsResult<()> {
    let dup = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    check(unsafe { libc::close(dup) }).map(drop)
}

pub fn dup(fd: BorrowedFd<'_>) -> FsResult<OwnedFd> {
    fd.try_clone_to_owned().map_err(Errno::from)
}

// Extended attributes of the object behind an `O_PATH` descriptor: by the `*xattrat` calls,
// relative to `/proc/self/fd`, where offered (see `ProcFdName`); otherwise by the `/proc/self/fd/N`
// path.

/// `struct xattr_args` of the `*xattrat` calls.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

pub fn getxattr(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> FsResult<usize> {
    if let Some(at) = ProcFdName::for_xattrat(fd) {
        let mut args = XattrArgs {
            value: buf.as_mut_ptr() as u64,
            size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
            flags: 0,
        };
        return check_ssize(unsafe {
            libc::syscall(
                SYS_GETXATTRAT,
                at.dir,
                at.name.as_ptr(),
                0,
                name.as_ptr(),
                &mut args,
                std::mem::size_of::<XattrArgs>(),
            ) as libc::ssize_t
        });
    }
    let p = proc_path(fd);
    check_ssize(unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

pub fn listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> FsResult<usize> {
    if let Some(at) = ProcFdName::for_xattrat(fd) {
        return check_ssize(unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                at.dir,
                at.name.as_ptr(),
                0,
                buf.as_mut_ptr(),
                buf.len(),
            ) as libc::ssize_t
        });
    }
    let p = proc_path(fd);
    check_ssize(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn setxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> FsResult<()> {
    if let Some(at) = ProcFdName::for_xattrat(fd) {
        let args = XattrArgs {
            value: value.as_ptr() as u64,
            size: u32::try_from(value.len()).map_err(|_| Errno(libc::E2BIG))?,
            flags: flags as u32,
        };
        return check_ssize(unsafe {
            libc::syscall(
                SYS_SETXATTRAT,
                at.dir,
                at.name.as_ptr(),
                0,
                name.as_ptr(),
                &args,
                std::mem::size_of::<XattrArgs>(),
            ) as libc::ssize_t
        })
        .map(drop);
    }
    let p = proc_path(fd);
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// Whether the open file `fd` has the extended attribute `name`.
pub fn fgetxattr_exists(fd: BorrowedFd<'_>, name: &CStr) -> bool {
    unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0) >= 0 }
}

pub fn fremovexattr(fd: BorrowedFd<'_>, name: &CStr) -> FsResult<()> {
    check(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn removexattr(fd: BorrowedFd<'_>, name: &CStr) -> FsResult<()> {
    if let Some(at) = ProcFdName::for_xattrat(fd) {
        return check_ssize(unsafe {
            libc::syscall(
                SYS_REMOVEXATTRAT,
                at.dir,
                at.name.as_ptr(),
                0,
                name.as_ptr(),
            ) as libc::ssize_t
        })
        .map(drop);
    }
    let p = proc_path(fd);
    check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// One directory entry as `getdents64` returns it.
#[derive(Debug, Clone)]
pub struct RawDirEntry {
    pub ino: u64,
    /// Cookie to resume reading after this entry.
    pub next_offset: i64,
    pub d_type: u8,
    pub name: Vec<u8>,
}

/// Read entries of the directory `fd` starting at cookie `offset`.
pub fn read_dir_at(fd: RawFd, offset: i64, buf: &mut [u8]) -> FsResult<Vec<RawDirEntry>> {
    if unsafe { libc::lseek(fd, offset, libc::SEEK_SET) } < 0 {
        return Err(Errno::last());
    }
    let n = check_ssize(unsafe {
        libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) as libc::ssize_t
    })?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 19 <= n {
        let ino = u64::from_ne_bytes(buf[pos..pos + 8].try_into().map_err(|_| Errno::EIO)?);
        let off = i64::from_ne_bytes(buf[pos + 8..pos + 16].try_into().map_err(|_| Errno::EIO)?);
        let reclen = u16::from_ne_bytes(buf[pos + 16..pos + 18].try_into().map_err(|_| Errno::EIO)?)
            as usize;
        let d_type = buf[pos + 18];
        if reclen == 0 || pos + reclen > n {
            return Err(Errno::EIO);
        }
        let name_bytes = &buf[pos + 19..pos + reclen];
        let len = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        out.push(RawDirEntry {
            ino,
            next_offset: off,
            d_type,
            name: name_bytes[..len].to_vec(),
        });
        pos += reclen;
    }
    Ok(out)
}

/// Set the process umask (returns the old one). The daemon runs with 0: the kernel has already
/// applied the caller's umask to every mode it sends.
pub fn set_umask(mask: u32) -> u32 {
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// The process's open-file limits (soft, hard).
fn open_file_limits() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        (lim.rlim_cur, lim.rlim_max)
    } else {
        (1024, 1024)
    }
}

/// How many descriptors this process may hold.
pub fn open_file_limit() -> u64 {
    open_file_limits().0
}

/// Every open file of a volume holds a descriptor in its daemon: allow as many as the hard
/// limit. Left as it is if the kernel refuses.
pub fn raise_open_file_limit() {
    let (soft, hard) = open_file_limits();
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Convert a `CStr` target for symlinks.
pub fn cpath(p: &std::path::Path) -> FsResult<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

pub fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.0)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    use super::*;

    #[test]
    fn a_descriptor_number_is_written_in_decimal() {
        let name = |n| {
            let d = decimal(n);
            CStr::from_bytes_until_nul(&d).unwrap().to_owned()
        };
        assert_eq!(name(0), c"0".to_owned());
        assert_eq!(name(7), c"7".to_owned());
        assert_eq!(name(1_048_576), c"1048576".to_owned());
        assert_eq!(name(i32::MAX as u32), c"2147483647".to_owned());
    }

    /// Whichever way this kernel offers, the calls reach the object behind an `O_PATH`
    /// descriptor, and match what the `/proc/self/fd` path gives.
    #[test]
    fn xattrs_and_modes_reach_the_object_behind_an_o_path_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&path)
            .unwrap();
        let fd = file.as_fd();
        let by_path = |name: &CStr| {
            let mut buf = [0u8; 16];
            let p = proc_path(fd);
            let n =
                unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
            (n >= 0).then(|| buf[..n as usize].to_vec())
        };

        setxattr(fd, c"user.k", b"value", 0).unwrap();
        assert_eq!(by_path(c"user.k").as_deref(), Some(&b"value"[..]));
        let mut buf = [0u8; 64];
        let n = getxattr(fd, c"user.k", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"value");
        assert_eq!(
            getxattr(fd, c"user.k", &mut buf[..2]),
            Err(Errno(libc::ERANGE))
        );
        assert_eq!(
            setxattr(fd, c"user.k", b"x", libc::XATTR_CREATE),
            Err(Errno(libc::EEXIST))
        );
        let n = listxattr(fd, &mut buf).unwrap();
        assert!(buf[..n].split(|b| *b == 0).any(|name| name == b"user.k"));
        removexattr(fd, c"user.k").unwrap();
        assert_eq!(getxattr(fd, c"user.k", &mut buf), Err(Errno(libc::ENODATA)));
        assert_eq!(by_path(c"user.k"), None);

        chmod_fd(fd, 0o640).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);
    }
}
