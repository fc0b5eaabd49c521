//! Test harness: run the real `interposer-fs` binary over a temporary directory.
//!
//! [`Volume`] starts the daemon, waits until the mount answers, and on drop (also when a test
//! panics) stops the daemon with SIGTERM, waits for it, and detaches the mount if anything is
//! left, so no test leaves a mount or a process behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_interposer-fs");

/// Fail loudly (never skip) when the machine cannot run real mounts.
pub fn require_fuse() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "these tests mount FUSE filesystems and must run as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the kernel FUSE module is needed for these tests"
    );
}

/// Volumes are served over io_uring by default when the kernel offers it: turn the offer on so
/// every test covers that transport, except tests that ask for `/dev/fuse` with `uring=off`.
fn enable_fuse_uring() {
    interposer_fs::mount::enable_uring().unwrap_or_else(|e| {
        panic!(
            "cannot turn on FUSE over io_uring ({}): {e}; the kernel needs 6.14+",
            interposer_fs::mount::URING_SWITCH
        )
    });
}

/// What the daemon must say it serves over, for these options.
fn expected_transport(options: &[&str]) -> &'static str {
    if options.contains(&"uring=off") {
        "over /dev/fuse"
    } else {
        "over io_uring"
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|mp| Path::new(mp) == path)
            .unwrap_or(false)
    })
}

pub struct Volume {
    pub dir: tempfile::TempDir,
    pub source: PathBuf,
    pub mnt: PathBuf,
    child: Option<Child>,
    /// Everything the daemon printed on stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

impl Volume {
    /// Mount a fresh empty SOURCE with `-o` options.
    pub fn start(options: &[&str]) -> Volume {
        Self::start_with_env(options, &[])
    }

    pub fn start_with_env(options: &[&str], env: &[(&str, &str)]) -> Volume {
        Self::start_in("source", "mnt", options, env)
    }

    /// Mount with SOURCE and MOUNTPOINT at the given places inside a fresh temporary directory.
    pub fn start_in(source: &str, mnt: &str, options: &[&str], env: &[(&str, &str)]) -> Volume {
        require_fuse();
        enable_fuse_uring();
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join(source);
        let mnt = dir.path().join(mnt);
        std::fs::create_dir_all(&source).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg(&source).arg(&mnt);
        for o in options {
            cmd.arg("-o").arg(o);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start interposer-fs");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut v = Volume {
            dir,
            source,
            mnt,
            child: Some(child),
            stderr,
        };
        v.wait_until_mounted();
        v.expect_transport(expected_transport(options));
        v
    }

    /// The daemon's "serving" line names its transport: a silent fallback fails the test.
    fn expect_transport(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.stderr.lock().unwrap().clone();
            if let Some(line) = log
                .lines()
                .find(|l| l.starts_with("interposer-fs: serving"))
            {
                assert!(
                    line.contains(want),
                    "expected the daemon to serve {want}:\n{log}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no \"serving\" line from the daemon:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_until_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if is_mounted(&self.mnt) && std::fs::read_dir(&self.mnt).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "interposer-fs exited with {status} before mounting:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mount did not answer within 15 s:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn source_path(&self, rel: &str) -> PathBuf {
        self.source.join(rel)
    }

    /// The metrics URL the daemon printed (with `metrics.address=127.0.0.1:0`).
    pub fn metrics_url(&self) -> String {
        let log = self.stderr.lock().unwrap().clone();
        log.lines()
            .find_map(|l| l.strip_prefix("interposer-fs: metrics at "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no metrics address in daemon output:\n{log}"))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon is running").id()
    }

    /// Send `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Write `text` to the control file at `control`, signal the daemon, and wait until it logs
    /// `expect_in_log` (each change it applies or refuses is logged).
    pub fn apply_control(&self, control: &Path, text: &str, expect_in_log: &str) {
        let before = self.stderr.lock().unwrap().len();
        std::fs::write(control, text).unwrap();
        self.signal(libc::SIGUSR1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.stderr.lock().unwrap()[before..].contains(expect_in_log) {
            assert!(
                Instant::now() < deadline,
                "daemon did not log {expect_in_log:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop the daemon (SIGTERM) and wait; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        status
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Plain HTTP GET on 127.0.0.1 (enough for the metrics endpoint).
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of the series whose line starts with `series` (name and labels, exactly).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `sh -c SCRIPT` as uid/gid 65534 (nobody) with no supplementary groups (util-linux setpriv).
pub fn as_nobody(script: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
        script,
    ]);
    c
}
