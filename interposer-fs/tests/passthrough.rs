//! The passthrough over a real mount: data, names, links, xattrs, and every bad input refused
//! with nothing mounted.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::process::Command;

use common::{BIN, Volume, is_mounted};

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn data_written_through_the_mount_is_byte_identical_in_source_and_back() {
    let v = Volume::start(&["layers="]);
    let data = pseudo_random(5 * 1024 * 1024 + 123, 42);
    fs::write(v.path("blob"), &data).unwrap();
    assert_eq!(
        fs::read(v.source_path("blob")).unwrap(),
        data,
        "SOURCE sees the bytes"
    );
    let other = pseudo_random(1 << 20, 7);
    fs::write(v.source_path("from-source"), &other).unwrap();
    assert_eq!(
        fs::read(v.path("from-source")).unwrap(),
        other,
        "the mount sees SOURCE"
    );

    // Random-access overwrite, then read back at an offset.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(v.path("blob"))
        .unwrap();
    f.seek(SeekFrom::Start(4096 * 3 + 5)).unwrap();
    f.write_all(b"patched").unwrap();
    f.sync_all().unwrap();
    let mut buf = [0u8; 7];
    f.seek(SeekFrom::Start(4096 * 3 + 5)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"patched");
    assert_eq!(
        &fs::read(v.source_path("blob")).unwrap()[4096 * 3 + 5..][..7],
        b"patched"
    );
}

#[test]
fn rename_link_symlink_xattr_and_fsync_round_trip() {
    let v = Volume::start(&["layers=trace,metrics,fault,throttle"]);
    fs::create_dir_all(v.path("a/b")).unwrap();
    fs::write(v.path("a/b/f"), b"one").unwrap();

    fs::rename(v.path("a/b/f"), v.path("a/g")).unwrap();
    assert!(!v.source_path("a/b/f").exists());
    assert_eq!(fs::read(v.source_path("a/g")).unwrap(), b"one");

    fs::hard_link(v.path("a/g"), v.path("h")).unwrap();
    let (m1, m2) = (
        fs::metadata(v.path("a/g")).unwrap(),
        fs::metadata(v.path("h")).unwrap(),
    );
    assert_eq!(m1.ino(), m2.ino(), "hard links are one inode");
    assert_eq!(m1.nlink(), 2);
    assert_eq!(
        m1.ino(),
        fs::metadata(v.source_path("h")).unwrap().ino(),
        "real inode numbers"
    );

    std::os::unix::fs::symlink("a/g", v.path("s")).unwrap();
    assert_eq!(fs::read_link(v.path("s")).unwrap().to_str(), Some("a/g"));
    assert_eq!(
        fs::read_link(v.source_path("s")).unwrap().to_str(),
        Some("a/g")
    );
    assert_eq!(fs::read(v.path("s")).unwrap(), b"one");

    let st = Command::new("setfattr")
        .args(["-n", "user.color", "-v", "blue"])
        .arg(v.path("h"))
        .status()
        .expect("setfattr (Debian package attr)");
    assert!(st.success());
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "user.color"])
        .arg(v.source_path("a/g"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"blue", "the xattr reached SOURCE");

    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(v.path("h"))
        .unwrap();
    f.write_all(b"+two").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    assert_eq!(fs::read(v.source_path("a/g")).unwrap(), b"one+two");

    fs::set_permissions(v.path("h"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(v.source_path("h")).unwrap().mode() & 0o7777,
        0o640
    );

    // rename(2) with RENAME_EXCHANGE swaps two names atomically.
    fs::write(v.path("x"), b"x").unwrap();
    fs::write(v.path("y"), b"y").unwrap();
    let r = unsafe {
        let (x, y) = (c"x", c"y");
        let dir = fs::File::open(&v.mnt).unwrap();
        use std::os::fd::AsRawFd;
        libc::renameat2(
            dir.as_raw_fd(),
            x.as_ptr(),
            dir.as_raw_fd(),
            y.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(
        r,
        0,
        "renameat2 exchange: {}",
        std::io::Error::last_os_error()
    );
    assert_eq!(fs::read(v.source_path("x")).unwrap(), b"y");

    fs::remove_file(v.path("h")).unwrap();
    fs::remove_file(v.path("a/g")).unwrap();
    fs::remove_dir(v.path("a/b")).unwrap();
    assert!(!v.source_path("a/b").exists());
}

#[test]
fn fallocate_copy_file_range_and_seek_data_work_through_the_mount() {
    let v = Volume::start(&["layers=metrics"]);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(v.path("sparse"))
        .unwrap();
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    assert_eq!(
        unsafe { libc::fallocate(fd, 0, 0, 1 << 20) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    // Real data (preallocated blocks count as holes for SEEK_DATA), then punch the first half.
    f.write_all_at(&vec![1u8; 1 << 20], 0).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(unsafe { libc::fallocate(fd, punch, 0, 1 << 19) }, 0);
    let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
    assert_eq!(data, 1 << 19, "SEEK_DATA finds the end of the punched hole");

    fs::write(v.path("src"), pseudo_random(300_000, 3)).unwrap();
    let out = Command::new("cp")
        .arg("--reflink=never")
        .arg(v.path("src"))
        .arg(v.path("dst"))
        .status()
        .unwrap();
    assert!(out.success());
    assert_eq!(
        fs::read(v.source_path("dst")).unwrap(),
        fs::read(v.source_path("src")).unwrap()
    );
    let (i, o) = (
        fs::File::open(v.path("src")).unwrap(),
        fs::File::create(v.path("dst2")).unwrap(),
    );
    let n = unsafe {
        libc::copy_file_range(
            i.as_raw_fd(),
            std::ptr::null_mut(),
            o.as_raw_fd(),
            std::ptr::null_mut(),
            300_000,
            0,
        )
    };
    assert!(
        n > 0,
        "copy_file_range: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn files_made_by_other_users_belong_to_them_and_permissions_hold() {
    let v = Volume::start(&["layers="]);
    fs::set_permissions(&v.mnt, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(v.path("secret"), b"root only").unwrap();
    fs::set_permissions(v.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let status = common::as_nobody(&format!(
        "echo hi > {0}/mine && mkdir {0}/mydir && ! cat {0}/secret 2>/dev/null && ! rm -f {0}/secret",
        v.mnt.display()
    ))
    .status()
        .expect("setpriv (util-linux)");
    assert!(
        status.success(),
        "an unprivileged user works in the volume but cannot read or remove root's private file"
    );
    for name in ["mine", "mydir"] {
        let m = fs::metadata(v.source_path(name)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (65534, 65534),
            "{name} is owned by its creator, not by root"
        );
    }
    assert_eq!(fs::read(v.source_path("secret")).unwrap(), b"root only");
}

#[test]
fn many_files_need_no_descriptor_each_and_forgotten_inodes_are_dropped() {
    let v = Volume::start(&["layers="]);
    let pid = Command::new("pgrep")
        .args(["-f", &format!("{BIN} {}", v.source.display())])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(!pid.is_empty(), "daemon pid");
    // The descriptor cache is sized from the daemon's own open-file limit.
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .expect("the daemon's open-file limit");
    let capacity = interposer_fs::fs::inodes::fd_cache_capacity(soft);
    let files = capacity + 2000;
    for i in 0..files {
        fs::write(v.path(&format!("f{i}")), b"x").unwrap();
    }
    for i in 0..files {
        assert_eq!(fs::metadata(v.path(&format!("f{i}"))).unwrap().len(), 1);
    }
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let bound = capacity + 64;
    assert!(
        fds < bound,
        "{files} known inodes must not hold a descriptor each (holding {fds}, bound {bound})"
    );
    for i in 0..files {
        fs::remove_file(v.path(&format!("f{i}"))).unwrap();
    }
    // A removed file's inode leaves the kernel, which then forgets its node (dropping the
    // dentry and inode caches makes sure of it); the node's cached descriptor goes with it.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let fds = loop {
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
        if fds < 64 || std::time::Instant::now() > deadline {
            break fds;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        fds < 64,
        "forgotten nodes keep no descriptor (holding {fds})"
    );
}

/// Node ids are backing inode numbers, and the backing filesystem hands a freed number to the
/// next new object. A directory removed while a process still works in it stays in the kernel;
/// a directory made next may get its number and must be a live directory, not the removed one
/// (whose kernel inode refuses new entries with ENOENT).
#[test]
fn a_new_directory_on_a_removed_ones_inode_number_takes_new_files() {
    let v = Volume::start(&["layers="]);
    let mut checked = 0;
    for i in 0..50 {
        let old = v.path(&format!("old{i}"));
        fs::create_dir(&old).unwrap();
        let old_ino = fs::metadata(v.source_path(&format!("old{i}")))
            .unwrap()
            .ino();
        // Killed when dropped, so a failing check leaves nothing working in the mount.
        let worker = KillOnDrop(
            Command::new("sleep")
                .arg("60")
                .current_dir(&old)
                .spawn()
                .unwrap(),
        );
        fs::remove_dir(&old).unwrap();
        fs::create_dir(v.path(&format!("new{i}"))).unwrap();
        let reused = fs::metadata(v.source_path(&format!("new{i}")))
            .unwrap()
            .ino()
            == old_ino;
        let made = fs::write(v.path(&format!("new{i}/file")), b"x");
        drop(worker);
        if reused {
            made.unwrap_or_else(|e| panic!("a file in new{i}, on old{i}'s inode number: {e}"));
            checked += 1;
            if checked == 3 {
                return;
            }
        }
    }
    panic!("the backing filesystem reused an inode number {checked} times in 50: not checked");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_bad(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run interposer-fs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_exits_non_zero_naming_the_problem_with_nothing_mounted() {
    common::require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let (s, m, f) = (
        src.to_str().unwrap(),
        mnt.to_str().unwrap(),
        file.to_str().unwrap(),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![s, m, "-o", "fault.probabilty=0.5"],
            "unknown parameter \"fault.probabilty\"",
        ),
        (
            vec![s, m, "-o", "fault.probability=2"],
            "\"fault.probability\": \"2\" is not valid; expected a number in 0..1",
        ),
        (vec![s, m, "-o", "layers=trace,nope"], "\"layers\""),
        (vec![s, m, "-o", "fault.errno=EWHAT"], "an errno name"),
        (
            vec![s, m, "-o", "throttle.writeBytesPerSecond=fast"],
            "Kubernetes quantity",
        ),
        (vec![s, m, "-o", "metrics.address=here"], "HOST:PORT"),
        (
            vec![
                s,
                m,
                "-o",
                "layers=trace",
                "-o",
                "metrics.address=127.0.0.1:0",
            ],
            "needs the metrics layer",
        ),
        (vec![f, m], "is not a directory"),
        (vec!["/nonexistent/src", m], "is not a directory"),
        (vec![s, f], "MOUNTPOINT"),
    ];
    for (args, want) in cases {
        let (code, err) = run_bad(&args);
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in: {err}");
        assert!(!is_mounted(&mnt), "{args:?} left a mount");
    }

    // A mountpoint in use is refused, and the first mount stays intact.
    let v = Volume::start(&["layers="]);
    let (code, err) = run_bad(&[s, v.mnt.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("already a mount point"), "{err}");
    let count = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(v.mnt.to_str().unwrap()))
        .count();
    assert_eq!(count, 1, "exactly the first mount is there");
}

#[test]
fn sigterm_unmounts_cleanly_and_exits_zero() {
    let mut v = Volume::start(&[
        "layers=trace,metrics,fault,throttle",
        "fault.delay=30s",
        "fault.ops=read",
        "pageCache=dropOnOpen",
    ]);
    fs::write(v.path("f"), b"data").unwrap();
    // A reader stuck in a 30 s injected delay must not hold up the unmount.
    let p = v.path("f");
    let reader = std::thread::spawn(move || fs::read(p));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = std::time::Instant::now();
    let status = v.stop().expect("daemon was running");
    assert!(status.success(), "exit status {status}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "unmount waited on a sleeping fault"
    );
    assert!(!is_mounted(&v.mnt));
    let _ = reader.join();
}

#[test]
fn kernel_passthrough_moves_data_without_the_daemon_seeing_reads_or_writes() {
    let v = Volume::start(&[
        "layers=metrics",
        "kernelPassthrough=true",
        "metrics.address=127.0.0.1:0",
    ]);
    let data = pseudo_random(3 << 20, 9);
    fs::write(v.path("f"), &data).unwrap();
    assert_eq!(fs::read(v.path("f")).unwrap(), data);
    assert_eq!(fs::read(v.source_path("f")).unwrap(), data);
    let m = common::http_get(&v.metrics_url());
    assert!(
        m.contains(r#"op="open",result="ok""#) || m.contains(r#"op="create",result="ok""#),
        "{m}"
    );
    assert!(
        !m.contains(r#"op="read""#) && !m.contains(r#"op="write""#),
        "data went through the daemon:\n{m}"
    );
}

#[test]
fn capacity_is_enforced_and_df_shows_the_volume_size() {
    let v = Volume::start(&["layers=", "capacity=10Mi"]);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(v.mnt.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(
        st.f_blocks * st.f_frsize,
        10 << 20,
        "df shows the volume's size"
    );

    fs::write(v.path("a"), vec![1u8; 6 << 20]).unwrap();
    let e = fs::write(v.path("b"), vec![1u8; 6 << 20]).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "writing past the size fails with ENOSPC"
    );
    assert!(fs::metadata(v.source_path("b")).unwrap().len() < 6 << 20);
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert!(st.f_bavail * st.f_frsize < 5 << 20, "free space went down");

    // Freeing space makes room again.
    fs::remove_file(v.path("a")).unwrap();
    fs::remove_file(v.path("b")).unwrap();
    fs::write(v.path("c"), vec![1u8; 8 << 20]).unwrap();
}

#[test]
fn with_the_writeback_cache_a_full_volume_fails_fsync_with_enospc() {
    let v = Volume::start(&["layers=", "capacity=10Mi", "pageCache=writeback"]);
    fs::write(v.path("a"), vec![1u8; 6 << 20]).unwrap();
    let mut f = fs::File::create(v.path("b")).unwrap();
    // The write may be accepted into the page cache; the flush cannot be.
    let e = f
        .write_all(&vec![1u8; 6 << 20])
        .and_then(|()| f.sync_all())
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert!(fs::metadata(v.source_path("b")).unwrap().len() < 6 << 20);
}

#[test]
fn an_unprivileged_write_clears_setuid_as_the_kernel_would() {
    for cache in ["pageCache=keep", "pageCache=writeback"] {
        let v = Volume::start(&["layers=", cache]);
        fs::set_permissions(&v.mnt, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(v.path("suid"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(v.path("suid"), fs::Permissions::from_mode(0o6777)).unwrap();
        // Root writing keeps the bits (CAP_FSETID)...
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(v.path("suid"))
            .unwrap();
        f.write_all(b"# root\n").unwrap();
        drop(f);
        assert_eq!(
            fs::metadata(v.source_path("suid")).unwrap().mode() & 0o7777,
            0o6777,
            "{cache}"
        );
        // ...an unprivileged writer drops set-user-ID and (group-executable) set-group-ID.
        let status = common::as_nobody(&format!("echo '# nobody' >> {}", v.path("suid").display()))
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            fs::metadata(v.source_path("suid")).unwrap().mode() & 0o7777,
            0o0777,
            "{cache}"
        );
        assert_eq!(
            fs::read(v.source_path("suid")).unwrap(),
            b"#!/bin/sh\n# root\n# nobody\n",
            "{cache}"
        );
    }
}

fn xattr_of(path: &std::path::Path, name: &str) -> Result<Vec<u8>, i32> {
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `setcap cap_net_bind_service=ep` as bytes: a version 2 `vfs_cap_data`.
fn set_file_caps(path: &std::path::Path) {
    let mut value = Vec::new();
    value.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes()); // revision 2, effective
    value.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted: CAP_NET_BIND_SERVICE
    value.extend_from_slice(&[0; 12]); // inheritable, and the high words
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"security.capability".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setcap: {}", std::io::Error::last_os_error());
}

#[test]
fn a_write_removes_file_capabilities_as_the_kernel_would() {
    for cache in ["pageCache=keep", "pageCache=writeback"] {
        let v = Volume::start(&["layers=", cache]);
        let path = v.path("tool");
        let mut early = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(
            xattr_of(&path, "security.capability"),
            Err(libc::ENODATA),
            "a new file has no capabilities"
        );
        set_file_caps(&path);
        assert_eq!(
            xattr_of(&path, "security.capability").map(|b| b.len()),
            Ok(20)
        );
        // Written through a descriptor opened before the capabilities were set...
        early.write_all(b"#!/bin/sh\n").unwrap();
        assert_eq!(
            xattr_of(&v.source_path("tool"), "security.capability"),
            Err(libc::ENODATA),
            "a write through an earlier descriptor removes them"
        );
        // ...and through one opened after.
        set_file_caps(&path);
        let mut late = fs::OpenOptions::new().append(true).open(&path).unwrap();
        late.write_all(b"exit 0\n").unwrap();
        assert_eq!(
            xattr_of(&v.source_path("tool"), "security.capability"),
            Err(libc::ENODATA),
            "a write through a later descriptor removes them"
        );
        // (With the writeback cache the data reaches SOURCE at close.)
        drop((early, late));
        assert_eq!(
            fs::read(v.source_path("tool")).unwrap(),
            b"#!/bin/sh\nexit 0\n",
            "{cache}"
        );
    }
}

#[test]
fn a_create_over_a_name_made_behind_the_mount_opens_that_file() {
    let v = Volume::start(&["layers="]);
    let path = v.path("late");
    // The kernel now holds a negative entry for the name...
    assert!(fs::metadata(&path).is_err());
    // ...which the backing directory contradicts a moment later.
    fs::write(v.source_path("late"), b"made behind the mount").unwrap();
    let e = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "O_EXCL is honoured");
    assert!(fs::metadata(v.source_path("late")).unwrap().len() > 0);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(
        text, "made behind the mount",
        "the existing file, not a new one"
    );
}
