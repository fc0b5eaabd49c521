//! No operation through the mount may reach outside SOURCE, even while a pod races renames that
//! swap a directory for a symlink pointing out of the volume.
//!
//! Layout: `<tmp>/s/source` is served at `<tmp>/m/mnt`; the victim is `<tmp>/s/outside/secret`.
//! Inside the volume, `link -> ../outside`: from SOURCE's point of view that names the victim,
//! but the kernel resolves it from the mount's place, where `<tmp>/m/outside` does not exist.
//! So the victim can only be touched if the daemon itself followed a symlink inside SOURCE.
//! inotify on the victim catches any open, read, write or attribute change.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn watch(path: &Path) -> i32 {
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mask =
        libc::IN_OPEN | libc::IN_ACCESS | libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_CLOSE_WRITE;
    assert!(unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) } >= 0);
    fd
}

fn events(fd: i32) -> usize {
    let mut buf = [0u8; 4096];
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 { 0 } else { n as usize }
}

#[test]
fn racing_a_directory_into_an_escaping_symlink_never_reaches_the_outside_file() {
    let v = common::Volume::start_in(
        "s/source",
        "m/mnt",
        &["layers=trace,metrics,fault,throttle", "cacheTTL=0s"],
        &[],
    );
    let victim_dir = v.dir.path().join("s/outside");
    fs::create_dir(&victim_dir).unwrap();
    let victim = victim_dir.join("secret");
    fs::write(&victim, b"do not touch").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
    let before = fs::metadata(&victim).unwrap();
    assert!(
        !v.dir.path().join("m/outside").exists(),
        "from the mount, ../outside must lead nowhere"
    );

    fs::set_permissions(&v.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(v.path("d")).unwrap();
    fs::write(v.path("d/secret"), b"inside").unwrap();
    symlink("../outside", v.path("link")).unwrap();
    symlink("../outside/secret", v.path("filelink")).unwrap();
    let ino = watch(&victim);

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // The swapper: d <-> link, over and over.
    {
        let (stop, d, l, tmp) = (stop.clone(), v.path("d"), v.path("link"), v.path("tmp"));
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::rename(&d, &tmp);
                let _ = fs::rename(&l, &d);
                let _ = fs::rename(&d, &l);
                let _ = fs::rename(&tmp, &d);
            }
        }));
    }
    // Openers as root: open, write, chmod, truncate, xattr through d/secret and filelink.
    for _ in 0..2 {
        let (stop, p, fl) = (stop.clone(), v.path("d/secret"), v.path("filelink"));
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for path in [&p, &fl] {
                    let _ = fs::metadata(path);
                    if let Ok(mut f) = fs::OpenOptions::new().write(true).open(path) {
                        use std::io::Write;
                        let _ = f.write_all(b"x");
                    }
                    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o666));
                    let _ = fs::read(path);
                }
            }
        }));
    }
    // And an unprivileged opener in a separate process.
    let script = format!(
        "end=$(($(date +%s)+3)); while [ $(date +%s) -lt $end ]; do \
         cat {0}/d/secret {0}/filelink >/dev/null 2>&1; echo y >> {0}/d/secret 2>/dev/null; \
         chmod 600 {0}/d/secret 2>/dev/null; done",
        v.mnt.display()
    );
    let mut nobody = common::as_nobody(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv");

    let t = Instant::now();
    let mut seen = 0;
    while t.elapsed() < Duration::from_secs(4) {
        seen += events(ino);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let _ = nobody.wait();
    seen += events(ino);
    unsafe { libc::close(ino) };

    assert_eq!(
        seen, 0,
        "the outside file saw inotify events: something reached it"
    );
    let after = fs::metadata(&victim).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"do not touch");
    assert_eq!(after.mode(), before.mode(), "mode unchanged");
    assert_eq!(
        after.ctime_nsec(),
        before.ctime_nsec(),
        "no attribute change"
    );
    assert_eq!(after.mtime_nsec(), before.mtime_nsec(), "no write");
}
