//! FUSE over io_uring (Linux 6.14+, with the `fuse` module's `enable_uring` parameter on).
//!
//! Not part of fuser 0.18.0; added for csi-interposer (see PATCHES.md). With `/dev/fuse`, every
//! request wakes a daemon thread that may sleep on another CPU, and every reply wakes the caller
//! back: two cross-CPU wake-ups per round trip. Over io_uring the kernel keeps one queue per CPU
//! and hands a request to a thread bound to the caller's CPU, which answers and fetches the next
//! request in one `io_uring_enter`: the round trip stays on one CPU.
//!
//! Each queue thread owns an io_uring and registers [`ENTRIES_PER_THREAD`] entries with the
//! kernel: a 288-byte header (the request's `fuse_in_header`, the operation's own header, and the
//! ring's bookkeeping) and a payload buffer (names, data). A fetched request is laid out again as
//! one contiguous `/dev/fuse`-style message and dispatched exactly like a request read from the
//! device; the reply is committed with the next fetch. `FORGET`s, `INTERRUPT`s and requests made
//! before every queue has registered still come through `/dev/fuse`, so the classic event loop
//! keeps running next to the queues.

use std::cell::UnsafeCell;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;

use io_uring::IoUring;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::error;
use log::warn;

use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::ll;
use crate::ll::fuse_abi as abi;
use crate::passthrough::BackingId;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `struct fuse_uring_req_header`: `in_out` (128), `op_in` (128), `ring_ent_in_out` (32).
const HEADER_SIZE: usize = 288;
const OP_IN_OFFSET: usize = 128;
const ENT_IN_OUT_OFFSET: usize = 256;
const IN_HEADER_SIZE: usize = size_of::<abi::fuse_in_header>();
const OUT_HEADER_SIZE: usize = 16;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// Entries each queue thread registers. One: an entry the kernel fills while its thread is busy
/// (a slow backing call, a throttle wait) would wait behind it even when the queue's other
/// threads are idle; with one entry per thread the kernel hands the request to an idle one.
pub(crate) const ENTRIES_PER_THREAD: usize = 1;

/// Requests with at most this many bytes after the header are copied out of the registered
/// buffer before dispatch, so the reply can be written straight into it. Larger ones (writes)
/// are dispatched in place and their (small) reply is copied in afterwards.
const COPY_OUT_LIMIT: usize = 16 * 1024;

/// The kernel's size for a ring entry's payload buffer: the largest request or reply.
pub(crate) fn payload_size(max_write: u32, max_pages: u16) -> usize {
    let page = page_size::get();
    (max_write as usize)
        .max(usize::from(max_pages) * page)
        .max(8192)
}

/// The kernel's number of queues: one per possible CPU (`nr_cpu_ids`), all of which must
/// register before it sends anything over io_uring.
pub(crate) fn possible_cpus() -> io::Result<u16> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let last = text
        .trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|n| n.parse::<u16>().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected CPU list {text:?}")))?;
    Ok(last + 1)
}

/// One registered entry: the buffer the kernel reads from and writes to, and the state of the
/// reply to the request it currently holds.
struct Entry {
    /// `HEADER_SIZE` bytes of header, then the payload; `u64`s for alignment.
    buf: UnsafeCell<Box<[u64]>>,
    payload_len: usize,
    reply: Mutex<ReplyState>,
    replied: Condvar,
    /// For `open_backing` (kernel passthrough), which is an ioctl on the device.
    device: ChannelSender,
}

// The buffer is written by the kernel between fetches and by the one reply of the request it
// holds (serialized by `reply`); the queue thread reads it only while no reply is pending.
unsafe impl Sync for Entry {}
unsafe impl Send for Entry {}

#[derive(Default)]
struct ReplyState {
    done: bool,
    /// The request still lives in the registered buffer: the reply waits here.
    in_place: bool,
    side: Vec<u8>,
}

impl Entry {
    fn new(payload_len: usize, device: ChannelSender) -> Entry {
        Entry {
            buf: UnsafeCell::new(vec![0u64; (HEADER_SIZE + payload_len).div_ceil(8)].into()),
            payload_len,
            reply: Mutex::new(ReplyState::default()),
            replied: Condvar::new(),
            device,
        }
    }

    fn base(&self) -> *mut u8 {
        // SAFETY: the box is never reallocated; callers respect the protocol above.
        unsafe { (*self.buf.get()).as_mut_ptr().cast::<u8>() }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        // SAFETY: offset + 4 <= HEADER_SIZE.
        unsafe { std::ptr::copy_nonoverlapping(self.base().add(offset), b.as_mut_ptr(), 4) };
        u32::from_ne_bytes(b)
    }

    fn read_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: offset + 8 <= HEADER_SIZE.
        unsafe { std::ptr::copy_nonoverlapping(self.base().add(offset), b.as_mut_ptr(), 8) };
        u64::from_ne_bytes(b)
    }

    /// Write a reply (`fuse_out_header` then data, in parts) where the kernel reads it.
    fn write_reply<'a>(&self, parts: impl Iterator<Item = &'a [u8]> + Clone) -> io::Result<()> {
        let total: usize = parts.clone().map(<[u8]>::len).sum();
        if total < OUT_HEADER_SIZE || total - OUT_HEADER_SIZE > self.payload_len {
            return Err(io::Error::other("FUSE reply does not fit the ring entry"));
        }
        let base = self.base();
        // Byte `at` of the reply goes to the header's `in_out` below OUT_HEADER_SIZE, else to
        // the payload.
        let mut at = 0usize;
        for mut s in parts {
            if at < OUT_HEADER_SIZE {
                let n = s.len().min(OUT_HEADER_SIZE - at);
                // SAFETY: at + n <= OUT_HEADER_SIZE < HEADER_SIZE.
                unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), base.add(at), n) };
                at += n;
                s = &s[n..];
            }
            // SAFETY: the payload part ends within payload_len (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    s.as_ptr(),
                    base.add(HEADER_SIZE + at - OUT_HEADER_SIZE),
                    s.len(),
                )
            };
            at += s.len();
        }
        let payload_sz = (total - OUT_HEADER_SIZE) as u32;
        // SAFETY: within the header.
        unsafe {
            std::ptr::copy_nonoverlapping(
                payload_sz.to_ne_bytes().as_ptr(),
                base.add(ENT_IN_OUT_OFFSET + 16),
                4,
            );
        }
        Ok(())
    }
}

/// Where a request fetched through a ring entry sends its reply.
#[derive(Clone)]
pub(crate) struct RingReply(Arc<Entry>);

impl std::fmt::Debug for RingReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingReply")
    }
}

impl RingReply {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let entry = &self.0;
        let mut state = entry.reply.lock().unwrap_or_else(|e| e.into_inner());
        if state.done {
            return Err(io::Error::other("FUSE request replied twice"));
        }
        let result = if state.in_place {
            state.side.clear();
            for s in data {
                state.side.extend_from_slice(s);
            }
            Ok(())
        } else {
            entry.write_reply(data.iter().map(|s| &**s))
        };
        state.done = true;
        entry.replied.notify_one();
        result
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> io::Result<BackingId> {
        self.0.device.open_backing(fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { self.0.device.wrap_backing(id) }
    }
}

/// An SQE for `cmd` on `entry`: the 80-byte command area holds `struct fuse_uring_cmd_req`.
fn command(
    fuse_fd: i32,
    cmd: u32,
    qid: u16,
    commit_id: u64,
    iov: *const libc::iovec,
    index: usize,
) -> squeue::Entry128 {
    let mut area = [0u8; 80];
    area[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    area[16..18].copy_from_slice(&qid.to_ne_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(fuse_fd), cmd)
        .cmd(area)
        .addr(Some(iov as u64))
        .build()
        .user_data(index as u64);
    // io-uring does not set the SQE's `len`, which holds the number of iovecs (2).
    // SAFETY: Entry128 is repr(C) over `struct io_uring_sqe` (128 bytes with the command area);
    // `len` is the u32 at byte 24, and any value of it is valid.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Serve queue `qid` (a CPU number) until the connection ends.
pub(crate) fn run_queue<FS: Filesystem>(
    se: SessionEventLoop<FS>,
    device: ChannelSender,
    qid: u16,
    payload_len: usize,
) -> io::Result<()> {
    // On the queue's CPU, so the kernel's wake-up of this thread stays local. A CPU that is
    // possible but offline never queues requests; the thread just waits.
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET bounds-checks nothing, so check qid first.
    unsafe {
        let mut cpus: libc::cpu_set_t = std::mem::zeroed();
        if usize::from(qid) < libc::CPU_SETSIZE as usize {
            libc::CPU_SET(usize::from(qid), &mut cpus);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &cpus) != 0 {
                warn!(
                    "FUSE io_uring queue {qid}: not bound to its CPU: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
    let fuse_fd = device_fd(&se);
    let mut ring: IoUring<squeue::Entry128> =
        IoUring::builder().build((ENTRIES_PER_THREAD * 2) as u32)?;
    let entries: Vec<Arc<Entry>> = (0..ENTRIES_PER_THREAD)
        .map(|_| Arc::new(Entry::new(payload_len, device.clone())))
        .collect();
    let iovecs: Vec<[libc::iovec; 2]> = entries
        .iter()
        .map(|e| {
            let base = e.base();
            [
                libc::iovec {
                    iov_base: base.cast(),
                    iov_len: HEADER_SIZE,
                },
                libc::iovec {
                    // SAFETY: the payload starts right after the header in the same allocation.
                    iov_base: unsafe { base.add(HEADER_SIZE) }.cast(),
                    iov_len: payload_len,
                },
            ]
        })
        .collect();
    for (i, iov) in iovecs.iter().enumerate() {
        let sqe = command(fuse_fd, CMD_REGISTER, qid, 0, iov.as_ptr(), i);
        // SAFETY: the iovecs and buffers outlive the ring (both dropped after it, below).
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    // A scratch copy of small requests, aligned like `fuse_in_header`.
    let mut scratch = vec![0u64; (IN_HEADER_SIZE + 128 + COPY_OUT_LIMIT).div_ceil(8)];
    let mut live = ENTRIES_PER_THREAD;
    let mut completions: Vec<(usize, i32)> = Vec::with_capacity(ENTRIES_PER_THREAD);
    let result = loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => break Err(e),
        }
        completions.clear();
        completions.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        let mut failed = None;
        for &(i, res) in &completions {
            if res < 0 {
                // The connection ended (unmount, abort) or the kernel refused the entry.
                live -= 1;
                let err = io::Error::from_raw_os_error(-res);
                if ![libc::ENOTCONN, libc::ECANCELED, libc::ENODEV, libc::ECONNABORTED]
                    .contains(&-res)
                {
                    failed = Some(err);
                }
                continue;
            }
            let Some(entry) = entries.get(i) else {
                continue;
            };
            let commit_id = entry.read_u64(ENT_IN_OUT_OFFSET + 8);
            serve(&se, entry, &mut scratch);
            let sqe = command(
                fuse_fd,
                CMD_COMMIT_AND_FETCH,
                qid,
                commit_id,
                iovecs[i].as_ptr(),
                i,
            );
            // SAFETY: as above.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                failed = Some(io::Error::other("io_uring submission queue full"));
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if live == 0 {
            break Ok(());
        }
    };
    drop(ring);
    drop(iovecs);
    if let Err(e) = &result {
        // The kernel drops io_uring for the connection when an entry is refused; requests
        // then keep coming through /dev/fuse.
        error!("FUSE io_uring queue {qid}: {e}");
    }
    result
}

fn device_fd<FS: Filesystem>(se: &SessionEventLoop<FS>) -> i32 {
    use std::os::fd::AsFd;
    se.ch.as_fd().as_raw_fd()
}

/// Dispatch the request `entry` holds and leave its reply where the kernel reads it.
fn serve<FS: Filesystem>(se: &SessionEventLoop<FS>, entry: &Arc<Entry>, scratch: &mut [u64]) {
    let len = entry.read_u32(0) as usize;
    let unique = entry.read_u64(8);
    let payload_sz = entry.read_u32(ENT_IN_OUT_OFFSET + 16) as usize;
    let op_in = len.saturating_sub(IN_HEADER_SIZE + payload_sz);
    if len < IN_HEADER_SIZE || op_in > HEADER_SIZE - OP_IN_OFFSET - 32 || payload_sz > entry.payload_len
    {
        error!("FUSE io_uring: malformed request (len {len}, payload {payload_sz})");
        reply_error(entry, unique, ll::Errno::EIO);
        return;
    }
    let base = entry.base();
    let in_place = payload_sz > COPY_OUT_LIMIT;
    {
        let mut state = entry.reply.lock().unwrap_or_else(|e| e.into_inner());
        state.done = false;
        state.in_place = in_place;
    }
    let sender = ReplySender::Ring(RingReply(entry.clone()));
    if in_place {
        // Move the two headers to end where the payload starts: one contiguous message with
        // no copy of the (large) payload. `op_in` is a multiple of 8 for every operation, so
        // the message stays aligned; ring bookkeeping under it is read already.
        let start = HEADER_SIZE - op_in - IN_HEADER_SIZE;
        if start % 8 != 0 {
            error!("FUSE io_uring: unaligned request header (op header {op_in} bytes)");
            reply_error(entry, unique, ll::Errno::EIO);
            return;
        }
        // SAFETY: all ranges lie within the entry's buffer; `copy` allows overlap.
        let message = unsafe {
            std::ptr::copy(base.add(OP_IN_OFFSET), base.add(HEADER_SIZE - op_in), op_in);
            std::ptr::copy(base, base.add(start), IN_HEADER_SIZE);
            std::slice::from_raw_parts(base.add(start), len)
        };
        dispatch(se, sender, message, entry, unique);
        let mut state = wait_reply(entry);
        let side = std::mem::take(&mut state.side);
        if let Err(e) = entry.write_reply(std::iter::once(&side[..])) {
            error!("FUSE io_uring: {e}");
            state.side = side;
            drop(state);
            reply_error(entry, unique, ll::Errno::EIO);
            return;
        }
        state.side = side;
    } else {
        let bytes: &mut [u8] = {
            // SAFETY: u64 slice reinterpreted as bytes.
            unsafe {
                std::slice::from_raw_parts_mut(scratch.as_mut_ptr().cast::<u8>(), scratch.len() * 8)
            }
        };
        // SAFETY: source ranges lie within the entry's buffer; `bytes` is large enough.
        unsafe {
            std::ptr::copy_nonoverlapping(base, bytes.as_mut_ptr(), IN_HEADER_SIZE);
            std::ptr::copy_nonoverlapping(
                base.add(OP_IN_OFFSET),
                bytes.as_mut_ptr().add(IN_HEADER_SIZE),
                op_in,
            );
            std::ptr::copy_nonoverlapping(
                base.add(HEADER_SIZE),
                bytes.as_mut_ptr().add(IN_HEADER_SIZE + op_in),
                payload_sz,
            );
        }
        dispatch(se, sender, &bytes[..len], entry, unique);
        drop(wait_reply(entry));
    }
}

fn dispatch<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    sender: ReplySender,
    message: &[u8],
    entry: &Entry,
    unique: u64,
) {
    match RequestWithSender::new(sender, message) {
        Some(req) => {
            if let Ok(ll::Operation::Destroy(_)) = req.request.operation() {
                // The classic event loop ends its thread here; queues end when the kernel
                // cancels their entries.
                req.reply::<crate::ReplyEmpty>().ok();
            } else {
                req.dispatch(se);
            }
        }
        None => {
            error!("FUSE io_uring: request could not be parsed");
            let mut state = entry.reply.lock().unwrap_or_else(|e| e.into_inner());
            state.in_place = false;
            state.done = true;
            drop(state);
            reply_error(entry, unique, ll::Errno::EIO);
        }
    }
}

/// Block until the request's reply has been sent (it usually is, before `dispatch` returns; a
/// filesystem may also reply from another thread).
fn wait_reply(entry: &Entry) -> std::sync::MutexGuard<'_, ReplyState> {
    let mut state = entry.reply.lock().unwrap_or_else(|e| e.into_inner());
    while !state.done {
        state = entry
            .replied
            .wait(state)
            .unwrap_or_else(|e| e.into_inner());
    }
    state
}

fn reply_error(entry: &Entry, unique: u64, errno: ll::Errno) {
    let mut header = [0u8; OUT_HEADER_SIZE];
    header[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&(-errno.code()).to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    if let Err(e) = entry.write_reply(std::iter::once(&header[..])) {
        error!("FUSE io_uring: {e}");
    }
}
