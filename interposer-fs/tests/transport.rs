//! The two ways requests reach the daemon: FUSE over io_uring (the default when the kernel
//! offers it; every other test runs over it) and `/dev/fuse` (`uring=off`, and the fallback).
//! Over io_uring each CPU has its own queue, so these tests drive every CPU's queue and check
//! that a request which blocks does not hold up the next one from the same CPU.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Volume;

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Run `f` on a thread bound to `cpu`; a hang fails the test instead of stalling the suite.
fn on_cpu<T: Send + 'static>(
    cpu: usize,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                0,
                "bind to CPU {cpu}"
            );
        }
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("requests from CPU {cpu} got no answer within {limit:?}"))
}

/// Create, write, read back, list, rename, set and read an xattr, stat and unlink, under `dir`.
fn exercise(dir: std::path::PathBuf, tag: &str) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let a = dir.join(format!("{tag}-a"));
    let b = dir.join(format!("{tag}-b"));
    fs::write(&a, &data).unwrap();
    assert_eq!(fs::read(&a).unwrap(), data);
    fs::rename(&a, &b).unwrap();
    assert!(
        fs::read_dir(&dir)
            .unwrap()
            .any(|e| e.unwrap().file_name() == b.file_name().unwrap())
    );
    xattr_set(&b, "user.k", b"v");
    assert_eq!(fs::metadata(&b).unwrap().size(), data.len() as u64);
    fs::remove_file(&b).unwrap();
    assert!(!b.exists());
}

fn xattr_set(path: &std::path::Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 16];
    let got = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(got, value.len() as isize);
    assert_eq!(&buf[..value.len()], value);
}

/// Mount with `options` and [`exercise`] the volume from a thread on each CPU in turn.
fn exercise_from_every_cpu(options: &[&str]) {
    let v = Volume::start(options);
    for cpu in 0..cpus() {
        let dir = v.mnt.clone();
        on_cpu(cpu, Duration::from_secs(30), move || {
            exercise(dir, &format!("cpu{cpu}"))
        });
    }
}

/// Bytes the daemon `pid` has taken in through `read`-like system calls (its `rchar`).
fn bytes_read_by(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rchar in /proc/{pid}/io:\n{io}"))
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
        .collect()
}

/// Over `/dev/fuse`, the data of large writes goes from the kernel to SOURCE by splice: it
/// arrives intact (at an offset that is not page-aligned, and appended with `O_APPEND`, which
/// the kernel cannot splice into and which the daemon writes from a buffer instead), and the
/// daemon does not read it (its read count grows by far less than was written); with
/// `splice=off` it reads every byte.
#[test]
fn over_dev_fuse_large_writes_are_spliced_not_read() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 64;
    for splice in [true, false] {
        let v = Volume::start(&[
            "layers=trace,metrics",
            "uring=off",
            if splice { "splice=on" } else { "splice=off" },
        ]);
        let data = pattern(CHUNK * CHUNKS, 1);
        let f = fs::File::create(v.path("big")).unwrap();
        let before = bytes_read_by(v.pid());
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            f.write_all_at(chunk, 100 + (i * CHUNK) as u64).unwrap();
        }
        let read = bytes_read_by(v.pid()) - before;
        drop(f);
        let back = fs::read(v.source_path("big")).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0));
        assert!(
            back[100..] == data[..],
            "splice={splice}: SOURCE holds what was written"
        );
        let written = data.len() as u64;
        if splice {
            assert!(
                read < written / 8,
                "spliced, yet the daemon read {read} of {written} bytes"
            );
        } else {
            assert!(
                read >= written,
                "splice=off, yet the daemon read only {read} of {written} bytes"
            );
        }

        let tail = pattern(3 * CHUNK, 2);
        let mut a = fs::OpenOptions::new()
            .append(true)
            .open(v.path("big"))
            .unwrap();
        a.write_all(&tail).unwrap();
        drop(a);
        let back = fs::read(v.path("big")).unwrap();
        assert_eq!(back.len(), 100 + data.len() + tail.len());
        assert!(
            back[100 + data.len()..] == tail[..],
            "splice={splice}: appended data"
        );
    }
}

/// A large write that a layer fails never reaches SOURCE, and its data, left in the worker's
/// pipe, does not leak into the requests after it.
#[test]
fn over_dev_fuse_a_failed_large_write_leaves_the_next_requests_whole() {
    let v = Volume::start(&[
        "layers=fault",
        "fault.ops=write",
        "fault.paths=*.fail",
        "fault.probability=1",
        "uring=off",
    ]);
    let big = pattern(1 << 20, 3);
    for round in 0..4 {
        let err = fs::write(v.path("x.fail"), &big).expect_err("the fault layer fails the write");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "round {round}");
        let ok = pattern((1 << 20) + round * 4096, round as u32);
        fs::write(v.path("x.ok"), &ok).unwrap();
        assert!(
            fs::read(v.source_path("x.ok")).unwrap() == ok,
            "round {round}"
        );
        assert_eq!(fs::metadata(v.source_path("x.fail")).unwrap().len(), 0);
    }
}

#[test]
fn over_io_uring_every_cpus_queue_answers() {
    exercise_from_every_cpu(&["layers=trace,metrics"]);
}

#[test]
fn over_dev_fuse_when_asked_data_names_and_xattrs_round_trip() {
    exercise_from_every_cpu(&["layers=trace,metrics", "uring=off"]);
}

#[test]
fn over_io_uring_a_request_that_blocks_leaves_its_cpu_served() {
    // Reads of `slow` wait 5 s in the daemon (an injected delay); everything else is plain.
    let v = Volume::start(&[
        "layers=fault",
        "fault.ops=read",
        "fault.paths=slow",
        "fault.delay=5s",
    ]);
    fs::write(v.source_path("slow"), b"slow").unwrap();
    fs::write(v.source_path("fast"), b"fast").unwrap();
    let slow = v.path("slow");
    let fast = v.path("fast");
    // Both callers on CPU 0: over io_uring they share that CPU's queue.
    let (started_tx, started_rx) = mpsc::channel();
    let blocked = std::thread::spawn(move || {
        on_cpu(0, Duration::from_secs(30), move || {
            let t = Instant::now();
            let _ = started_tx.send(());
            let data = fs::read(&slow).unwrap();
            (data, t.elapsed())
        })
    });
    started_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Not a speed check: a request queued behind the blocked one would take the delay's 5 s.
    let (data, took) = on_cpu(0, Duration::from_secs(30), move || {
        let t = Instant::now();
        (fs::read(&fast).unwrap(), t.elapsed())
    });
    assert_eq!(data, b"fast");
    assert!(
        took < Duration::from_secs(3),
        "a read on the same CPU waited {took:?} behind the delayed one"
    );
    let (data, took) = blocked.join().unwrap();
    assert_eq!(data, b"slow");
    assert!(
        took >= Duration::from_secs(5),
        "the delay applied ({took:?})"
    );
}

/// Whether each of the daemon `pid`'s `/dev/fuse` descriptors is non-blocking now.
fn dev_fuse_nonblocking(pid: u32) -> Vec<bool> {
    let mut found = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        if fs::read_link(entry.path()).ok().as_deref() != Some(std::path::Path::new("/dev/fuse")) {
            continue;
        }
        let fd = entry.file_name().to_string_lossy().into_owned();
        // A descriptor closed since the listing is simply not counted.
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags in fdinfo of fd {fd}:\n{info}"));
        found.push(flags & libc::O_NONBLOCK as u32 != 0);
    }
    found
}

/// CPU time the process `pid` has used, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')': utime and stime are the
    // 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Over `/dev/fuse`, the worker that has just replied polls the device for the next request
/// (`spin`): while a caller sends one request after another, a worker's descriptor is seen
/// non-blocking. Once requests stop, every worker sleeps in a blocking read and the daemon uses
/// no CPU. With `spin=0s` no descriptor is ever non-blocking.
#[test]
fn over_dev_fuse_a_worker_polls_between_requests_and_sleeps_when_idle() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    for spin in ["1ms", "0s"] {
        let v = Volume::start(&["layers=", "uring=off", "threads=4", &format!("spin={spin}")]);
        let idle = |when: &str| {
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(
                dev_fuse_nonblocking(v.pid()),
                vec![false; 4],
                "spin={spin}, {when}: all four workers block"
            );
            let before = cpu_ticks(v.pid());
            std::thread::sleep(Duration::from_secs(1));
            let used = cpu_ticks(v.pid()) - before;
            assert!(
                used <= 2,
                "spin={spin}, {when}: idle for 1 s, the daemon used {used} ticks of CPU"
            );
        };
        fs::write(v.path("f"), b"x").unwrap();
        idle("after a write");

        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let caller = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            let path =
                std::ffi::CString::new(v.path("f").into_os_string().into_encoded_bytes()).unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    // An absent name: one round trip to the daemon each time.
                    let rc = unsafe {
                        libc::getxattr(
                            path.as_ptr(),
                            c"user.none".as_ptr(),
                            buf.as_mut_ptr().cast(),
                            16,
                        )
                    };
                    assert_eq!(rc, -1);
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let t = Instant::now();
        while rounds.load(Ordering::Relaxed) < 100 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let seen = (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(1));
            dev_fuse_nonblocking(v.pid()).contains(&true)
        });
        stop.store(true, Ordering::Relaxed);
        caller.join().unwrap();
        let rounds = rounds.load(Ordering::Relaxed);
        assert!(rounds >= 100, "spin={spin}: only {rounds} round trips");
        assert_eq!(
            seen,
            spin != "0s",
            "spin={spin}: a worker was seen polling during {rounds} round trips"
        );
        idle("after the round trips");
    }
}
