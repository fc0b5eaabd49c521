//! The filesystem's error type: a raw errno, kept exactly as the kernel or a syscall gave it.
//!
//! Every syscall failure becomes an [`Errno`] through one conversion (`From<io::Error>`), so an
//! ENOSPC from the backing filesystem reaches the application as ENOSPC, never as a generic EIO.

use std::io;

/// A positive errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ESTALE: Errno = Errno(libc::ESTALE);

    /// The errno of the last failed libc call on this thread.
    pub fn last() -> Errno {
        Errno::from(io::Error::last_os_error())
    }
}

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        // An io::Error without an OS code was made by Rust code (a bug or a short buffer):
        // EIO is the honest answer for those.
        Errno(e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO))
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.0)
    }
}

/// Result of a filesystem operation.
pub type FsResult<T> = Result<T, Errno>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_survives_the_round_trip_through_io_error() {
        for n in [
            libc::ENOENT,
            libc::ENOSPC,
            libc::EACCES,
            libc::EDQUOT,
            libc::EXDEV,
        ] {
            let io = io::Error::from(Errno(n));
            assert_eq!(Errno::from(io), Errno(n));
        }
        let synthetic = io::Error::other("no os code");
        assert_eq!(Errno::from(synthetic), Errno::EIO);
    }
}
