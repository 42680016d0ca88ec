//! Non-blocking reads and writes on child pipes and PTY masters, through tokio's `AsyncFd`.
//!
//! These use plain `read`/`write` on the descriptor rather than tokio's pipe types because after a
//! child exits, envd drains what is left with direct non-blocking reads: that answers "is there more
//! data right now" exactly, independent of when the reactor last saw an readiness event.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;

/// Registers `fd` with the reactor in non-blocking mode.
pub fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = fcntl_getfl(&fd)?;
    fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
    // SAFETY: an `OwnedFd` is open and keeps the same descriptor number until it is dropped, which
    // only happens with the `AsyncFd` that owns it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// One non-blocking read. `Ok(0)` is end of stream; on a PTY master, EIO (every slave closed) is
/// end of stream too.
pub fn read_now(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    match rustix::io::read(fd, buf) {
        Ok(n) => Ok(n),
        Err(Errno::IO) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Waits until `fd` is readable and reads once.
pub async fn read(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| read_now(inner.get_ref(), buf)) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Writes all of `data`, waiting for room as needed.
pub async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|inner| Ok(rustix::io::write(inner.get_ref(), data)?)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}
