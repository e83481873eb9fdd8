//! Eventfds, the wake-up every part of the daemon uses between threads (a reactor's inbox, a
//! completion hand-off, a virtqueue's kick, call and error notifiers, an admin thread's
//! wake-up): made, signalled and drained here, once.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A new non-blocking, close-on-exec eventfd with a zero counter.
pub fn new() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to `fd`'s counter, waking whoever waits on it (a full counter already wakes its
/// reader, so a failure to add is of no consequence).
pub fn signal(fd: BorrowedFd<'_>) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to a descriptor the borrow keeps open.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Takes `fd`'s counter (0 if it was zero: a non-blocking eventfd never waits), so that it
/// reports again on the next signal.
pub fn drain(fd: BorrowedFd<'_>) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64 from a descriptor the borrow keeps open.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n == 8 { v } else { 0 }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn signals_add_up_and_drain_takes_them_once() {
        let fd = new().unwrap();
        assert_eq!(drain(fd.as_fd()), 0, "an empty eventfd does not block");
        signal(fd.as_fd());
        signal(fd.as_fd());
        assert_eq!(drain(fd.as_fd()), 2);
        assert_eq!(drain(fd.as_fd()), 0);
    }
}
