//! Bind mounts, unmounts and path checks for staging and target paths.
//!
//! Paths in requests come from kubelet or from anyone who can reach the socket, so every path is
//! checked before use: absolute, no `..`, no symlink anywhere on the way. A path that fails the
//! check is refused, never "fixed", so a planted symlink cannot redirect a mount.

use std::path::{Component, Path};
use std::sync::mpsc;
use std::time::Duration;

use nix::mount::{MsFlags, mount};

use crate::error::{DriverError, DriverResult};

pub use interposer_fs::mount::{is_mount_point, unmount};

/// Check a path from a request (`field` names it in errors). It may not exist yet, but every
/// existing part of it must be a real directory, not a symlink.
pub fn check_path(path: &str, field: &str) -> DriverResult<()> {
    if path.is_empty() {
        return Err(DriverError::InvalidArgument(format!("{field} is required")));
    }
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(DriverError::InvalidArgument(format!(
            "{field} {path:?} must be an absolute path"
        )));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(DriverError::InvalidArgument(format!(
            "{field} {path:?} must not contain . or .."
        )));
    }
    let mut cur = std::path::PathBuf::from("/");
    for c in p.components().skip(1) {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(DriverError::InvalidArgument(format!(
                    "{field} {path:?} goes through the symlink {}; refusing to follow it",
                    cur.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            // A dead FUSE mount answers ENOTCONN: that is a state to repair, not a bad path.
            Err(_) => break,
        }
    }
    Ok(())
}

/// Bind `source` onto `target`, read-only if asked.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> DriverResult<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        DriverError::internal(
            format!("bind mount {} on {}", source.display(), target.display()),
            e,
        )
    })?;
    if readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = unmount(target);
            return Err(DriverError::internal(
                format!("remount {} read-only", target.display()),
                e,
            ));
        }
    }
    Ok(())
}

/// Whether the mount at `path` answers `statfs` within two seconds. A dead FUSE daemon gives
/// ENOTCONN; a hung one would block forever, hence the thread.
pub fn answers(path: &Path) -> bool {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(nix::sys::statvfs::statvfs(&p).is_ok());
    });
    rx.recv_timeout(Duration::from_secs(2)).unwrap_or(false)
}

/// Unmount `path` if it is a mount point (detaching busy mounts); true if something was there.
pub fn unmount_if_mounted(path: &Path) -> DriverResult<bool> {
    if is_mount_point(path).unwrap_or(false) {
        unmount(path)
            .map_err(|e| DriverError::internal(format!("unmount {}", path.display()), e))?;
        return Ok(true);
    }
    Ok(false)
}

/// Create a directory and its parents.
pub fn mkdir(path: &Path) -> DriverResult<()> {
    std::fs::create_dir_all(path)
        .map_err(|e| DriverError::internal(format!("creating {}", path.display()), e))
}

/// Remove an empty directory if it is there (a failure is only logged: it leaks nothing).
pub fn remove_dir(path: &Path) {
    if let Err(e) = std::fs::remove_dir(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_are_checked_before_use() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let ok = real.join("target");
        assert!(check_path(ok.to_str().unwrap(), "target_path").is_ok());
        let bad = [
            String::new(),
            "relative/path".into(),
            format!("{}/../x", d.path().display()),
            format!("{}/link/target", d.path().display()),
            format!("{}/link", d.path().display()),
        ];
        for p in bad {
            let e = check_path(&p, "target_path").unwrap_err();
            assert!(matches!(e, DriverError::InvalidArgument(_)), "{p}: {e}");
            assert!(e.to_string().contains("target_path"));
        }
    }
}
