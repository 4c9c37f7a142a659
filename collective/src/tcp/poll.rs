//! Waiting for a socket: yield first, then sleep in `poll(2)`.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Times a waiting side yields the CPU before sleeping in `poll`. Data on loopback usually
/// arrives within microseconds, and a sleeping process takes tens of microseconds to wake; yielding
/// (rather than spinning) keeps this fair when ranks outnumber cores.
const YIELDS_BEFORE_SLEEP: u32 = 64;

/// Waits for readiness: first by yielding a bounded number of times (`*idle` counts them; the
/// caller resets it on progress), then by sleeping in `poll`. Returns (readable, writable).
pub(super) fn wait_ready(
    write: Option<&TcpStream>,
    read: Option<&TcpStream>,
    wait: Duration,
    idle: &mut u32,
) -> (bool, bool) {
    if *idle < YIELDS_BEFORE_SLEEP {
        *idle += 1;
        std::thread::yield_now();
        return (read.is_some(), write.is_some());
    }
    poll(write, read, wait)
}

/// Waits until `read` is readable or `write` writable (either may be absent, or the same socket).
fn poll(write: Option<&TcpStream>, read: Option<&TcpStream>, wait: Duration) -> (bool, bool) {
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2);
    let (wfd, rfd) = (write.map(|s| s.as_raw_fd()), read.map(|s| s.as_raw_fd()));
    for (fd, events) in [(wfd, libc::POLLOUT), (rfd, libc::POLLIN)] {
        let Some(fd) = fd else { continue };
        match fds.iter_mut().find(|p| p.fd == fd) {
            Some(p) => p.events |= events,
            None => fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            }),
        }
    }
    if fds.is_empty() {
        return (false, false);
    }
    // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structs that outlives the call.
    let n = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            wait.as_millis().max(1) as i32,
        )
    };
    if n <= 0 {
        return (false, false);
    }
    // Errors and hang-ups count as ready: the following read or write reports them.
    let ready = |fd: Option<i32>, flag: i16| {
        fd.is_some_and(|fd| {
            fds.iter()
                .any(|p| p.fd == fd && p.revents & (flag | libc::POLLERR | libc::POLLHUP) != 0)
        })
    };
    (ready(rfd, libc::POLLIN), ready(wfd, libc::POLLOUT))
}
