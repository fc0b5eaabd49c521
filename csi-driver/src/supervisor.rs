//! Per-volume interposer-fs daemons: start, watch, stop, re-adopt.
//!
//! Each staged volume gets its own `interposer-fs` process, so a crash in one volume never
//! touches another. Daemons run in their own session: they outlive a restart of the driver,
//! which re-adopts them from its state directory (pid + start time identify a process even if
//! the pid is reused). `start` returns only once the mount answers.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{DriverError, DriverResult};
use crate::mounts;

/// A running daemon, as recorded in state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Daemon {
    pub pid: u32,
    pub start: u64,
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    bin: PathBuf,
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/pid/stat), if it runs and
/// is not a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Polling intervals while waiting for a daemon to mount or to exit: 1 ms, doubling up to 20 ms.
/// A mount takes 6–15 ms, so a fixed 20 ms step would add up to that much to every stage.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(1))
    }

    fn sleep(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_millis(20));
    }
}

impl Supervisor {
    pub fn new(bin: PathBuf) -> Self {
        Supervisor { bin }
    }

    pub fn alive(&self, d: Daemon) -> bool {
        d.pid != 0 && start_time(d.pid) == Some(d.start)
    }

    /// Start `interposer-fs BACKING MOUNT -o ...`, logging to `log`; wait until the mount answers.
    /// Also returns the daemon's metrics URL, if it serves one.
    pub fn start(
        &self,
        backing: &Path,
        mount_path: &Path,
        options: &[String],
        log: &Path,
    ) -> DriverResult<(Daemon, Option<String>)> {
        let logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| DriverError::internal(format!("opening {}", log.display()), e))?;
        let log_len = logf.metadata().map(|m| m.len()).unwrap_or(0);
        let errf = logf
            .try_clone()
            .map_err(|e| DriverError::internal("log file", e))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg(backing).arg(mount_path);
        for o in options {
            cmd.arg("-o").arg(o);
        }
        cmd.stdin(Stdio::null()).stdout(logf).stderr(errf);
        // Own session: the daemon must not die with the driver or its terminal.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| DriverError::internal(format!("starting {}", self.bin.display()), e))?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut backoff = Backoff::new();
        loop {
            if mounts::is_mount_point(mount_path).unwrap_or(false) && mounts::answers(mount_path) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let out = std::fs::read(log).unwrap_or_default();
                let tail = String::from_utf8_lossy(&out[(log_len as usize).min(out.len())..])
                    .trim()
                    .to_string();
                return Err(DriverError::internal(
                    format!(
                        "interposer-fs for {} exited ({status}) before mounting",
                        mount_path.display()
                    ),
                    tail,
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = mounts::unmount_if_mounted(mount_path);
                return Err(DriverError::Internal(format!(
                    "interposer-fs did not answer at {} within 15 s",
                    mount_path.display()
                )));
            }
            backoff.sleep();
        }
        let start = start_time(pid).unwrap_or(0);
        // Reap the child when it ends, whenever that is.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let out = std::fs::read(log).unwrap_or_default();
        let metrics = String::from_utf8_lossy(&out[(log_len as usize).min(out.len())..])
            .lines()
            .find_map(|l| l.strip_prefix("interposer-fs: metrics at "))
            .map(str::to_string);
        Ok((Daemon { pid, start }, metrics))
    }

    /// Stop the daemon (SIGTERM, then SIGKILL after 10 s) and make sure nothing stays mounted.
    pub fn stop(&self, d: Daemon, mount_path: &Path) -> DriverResult<()> {
        if self.alive(d) {
            unsafe { libc::kill(d.pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut backoff = Backoff::new();
            while self.alive(d) && Instant::now() < deadline {
                backoff.sleep();
            }
            if self.alive(d) {
                unsafe { libc::kill(d.pid as i32, libc::SIGKILL) };
            }
        }
        mounts::unmount_if_mounted(mount_path)?;
        Ok(())
    }

    /// Healthy: the process runs and its mount answers.
    pub fn healthy(&self, d: Daemon, mount_path: &Path) -> bool {
        self.alive(d)
            && mounts::is_mount_point(mount_path).unwrap_or(false)
            && mounts::answers(mount_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_readable_and_a_dead_pid_is_not_alive() {
        let me = std::process::id();
        let t = start_time(me).expect("own stat");
        let s = Supervisor::new("/bin/true".into());
        assert!(s.alive(Daemon { pid: me, start: t }));
        assert!(
            !s.alive(Daemon {
                pid: me,
                start: t + 1
            }),
            "a reused pid is not our daemon"
        );
        assert!(!s.alive(Daemon { pid: 0, start: 0 }));
    }
}
