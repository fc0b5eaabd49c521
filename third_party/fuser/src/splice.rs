//! Receiving requests from `/dev/fuse` through a pipe, so that a large WRITE's payload can go
//! on to a file with `splice(2)` without being copied into and out of user memory. Added for
//! csi-interposer, see PATCHES.md.
//!
//! The kernel moves a request into the pipe as one buffer for the header and arguments and
//! references to the pages that hold the written data. A worker reads the header and
//! arguments out of the pipe; a WRITE of at least [`SPLICE_MIN`] bytes leaves its payload in
//! the pipe as a [`WritePayload`], anything else is read out whole and dispatched as usual.
//! Splicing costs a second system call per request (splice, then read), so a worker splices
//! only from a large write until a run of small requests ([`Adaptive`]).

use std::cell::Cell;
use std::io;
use std::mem::offset_of;
use std::mem::size_of;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::FcntlArg;
use nix::fcntl::OFlag;
use nix::fcntl::SpliceFFlags;
use nix::fcntl::fcntl;

use crate::ll::fuse_abi as abi;

/// The smallest WRITE payload worth a splice: below it, the copy saved is smaller than the
/// extra system call.
pub(crate) const SPLICE_MIN: usize = 32 * 1024;

/// Header and arguments of a WRITE request, ahead of its payload.
const WRITE_HEAD: usize = size_of::<abi::fuse_in_header>() + size_of::<abi::fuse_write_in>();

/// The largest request the kernel sends, for the `max_write` and `max_pages` of INIT.
pub(crate) fn request_size(max_write: u32, max_pages: u16) -> usize {
    let data = (max_write as usize).min(usize::from(max_pages) * page_size::get());
    WRITE_HEAD + data
}

/// One worker's pipe.
#[derive(Debug)]
pub(crate) struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    /// The largest request: what each splice from the device asks for (the kernel refuses
    /// less than that).
    request_size: usize,
}

impl SplicePipe {
    /// A pipe that holds a whole request of up to `request_size` bytes: the kernel fails a
    /// request that does not fit (with EIO, to the caller). Above `/proc/sys/fs/pipe-max-size`
    /// (1 MiB by default) only a process with CAP_SYS_RESOURCE gets one.
    pub(crate) fn new(request_size: usize) -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // One page for the header and arguments, one per page of data, one more in case the
        // data does not start on a page boundary.
        let want = request_size + 2 * page_size::get();
        let got = fcntl(&write, FcntlArg::F_SETPIPE_SZ(want as i32))?;
        if (got as usize) < want {
            return Err(io::Error::other(format!(
                "pipe holds {got} bytes, a request needs {want}"
            )));
        }
        Ok(Self {
            read,
            write,
            request_size,
        })
    }

    /// Receive the next request from `dev` into `buf` (see the module doc). Returns the
    /// length of the request in `buf` and, for a large WRITE, its payload left in the pipe;
    /// the header in `buf` then says the payload is empty, and the payload says how long it is.
    /// EAGAIN (a non-blocking device with nothing queued) is returned, as by a read.
    pub(crate) fn receive<'a>(
        &'a self,
        dev: BorrowedFd<'_>,
        buf: &mut [u8],
    ) -> nix::Result<(usize, Option<WritePayload<'a>>)> {
        let n = loop {
            let len = self.request_size.min(buf.len());
            match nix::fcntl::splice(dev, None, &self.write, None, len, SpliceFFlags::empty()) {
                Ok(n) => break n,
                Err(Errno::ENOENT | Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        };
        let head = n.min(WRITE_HEAD);
        self.read_exact(&mut buf[..head])?;
        if opcode(buf) == Some(abi::fuse_opcode::FUSE_WRITE as u32) && n - head >= SPLICE_MIN {
            let len = n - head;
            // The request as parsed: header and arguments, no data.
            put_u32(buf, offset_of!(abi::fuse_in_header, len), head as u32);
            put_u32(
                buf,
                size_of::<abi::fuse_in_header>() + offset_of!(abi::fuse_write_in, size),
                0,
            );
            let payload = WritePayload {
                pipe: self,
                len,
                left: Cell::new(len),
            };
            return Ok((head, Some(payload)));
        }
        self.read_exact(&mut buf[head..n])?;
        Ok((n, None))
    }

    fn read_exact(&self, mut buf: &mut [u8]) -> nix::Result<()> {
        while !buf.is_empty() {
            match nix::unistd::read(&self.read, buf) {
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => buf = &mut buf[n..],
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The data of a WRITE request, still in the worker's pipe. Whatever the filesystem does not
/// take is discarded by the worker after the request's dispatch.
#[derive(Debug)]
pub struct WritePayload<'a> {
    pipe: &'a SplicePipe,
    len: usize,
    left: Cell<usize>,
}

impl WritePayload<'_> {
    /// The number of bytes the caller wrote.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a payload is only left in the pipe when it is large.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Move the payload into `fd` at `offset` (as `pwrite` would), returning how much was
    /// written; less than [`len`](Self::len) if the file took less. Fails only if nothing
    /// was written. `fd` cannot be opened with `O_APPEND` (EINVAL; use
    /// [`read_into`](Self::read_into) then).
    pub fn splice_to(&self, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize> {
        let mut off = offset as libc::loff_t;
        let mut done = 0;
        while self.left.get() > 0 {
            match nix::fcntl::splice(
                self.pipe.read.as_fd(),
                None,
                fd,
                Some(&mut off),
                self.left.get(),
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    self.left.set(self.left.get() - n);
                }
                Err(Errno::EINTR) => continue,
                Err(e) if done == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    /// Copy the payload out of the pipe into `buf`, which must hold [`len`](Self::len) bytes.
    pub fn read_into(&self, buf: &mut [u8]) -> io::Result<()> {
        if self.left.get() != self.len || buf.len() < self.len {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        self.pipe.read_exact(&mut buf[..self.len])?;
        self.left.set(0);
        Ok(())
    }

    /// Empty the pipe of what the filesystem did not take, using `scratch` as a sink.
    pub(crate) fn discard(&self, scratch: &mut [u8]) -> nix::Result<()> {
        while self.left.get() > 0 {
            let n = self.left.get().min(scratch.len());
            self.pipe.read_exact(&mut scratch[..n])?;
            self.left.set(self.left.get() - n);
        }
        Ok(())
    }
}

/// Small requests in a row after which a worker stops splicing.
const SMALL_RUN: u32 = 16;

/// Whether a worker receives its next request through its pipe: after a large WRITE, yes,
/// until [`SMALL_RUN`] other requests in a row have come. Reading a large write costs a copy
/// of up to `max_write` bytes; splicing a small request costs one more system call. A worker
/// of a workload of large writes (whose unaligned ends make small writes between them) keeps
/// splicing, one of small requests soon stops.
#[derive(Debug)]
pub(crate) struct Adaptive {
    small_run: u32,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            small_run: SMALL_RUN,
        }
    }
}

impl Adaptive {
    pub(crate) fn splice_next(&self) -> bool {
        self.small_run < SMALL_RUN
    }

    /// Note the request just received (`buf`, `len` bytes, `spliced` if its payload was
    /// left in the pipe).
    pub(crate) fn received(&mut self, buf: &[u8], len: usize, spliced: bool) {
        let large_write = spliced
            || (opcode(buf) == Some(abi::fuse_opcode::FUSE_WRITE as u32)
                && len >= WRITE_HEAD + SPLICE_MIN);
        self.small_run = if large_write {
            0
        } else {
            (self.small_run + 1).min(SMALL_RUN)
        };
    }
}

fn opcode(buf: &[u8]) -> Option<u32> {
    let at = offset_of!(abi::fuse_in_header, opcode);
    let bytes = buf.get(at..at + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
