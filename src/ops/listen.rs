//! Socket activation (sd_listen_fds): systemd binds the vhost-user socket,
//! passes it as fd 3 with `LISTEN_FDS=1` and `LISTEN_PID=<our pid>`, and
//! keeps it across restarts, so a frontend can connect before vublk starts
//! and reconnect to the same path after a restart.

use std::io;
use std::mem;
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first passed descriptor (SD_LISTEN_FDS_START).
pub const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("LISTEN_FDS `{0}` is not a count of descriptors")]
    Count(String),
    #[error("LISTEN_FDS passes no descriptor")]
    NoFds,
    #[error("passed descriptor {fd}: {source}")]
    Inspect { fd: RawFd, source: io::Error },
    #[error("passed descriptor {0} is not a listening AF_UNIX stream socket")]
    NotUnixListener(RawFd),
    #[error("passed socket is not bound to a path (abstract or unnamed)")]
    NoPath,
    #[error("the passed descriptor was already taken")]
    Taken,
}

/// The inherited vhost-user listener and the path it is bound to.
#[derive(Debug)]
pub struct Activated {
    pub listener: UnixListener,
    pub path: PathBuf,
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Which passed descriptor to use: the one named `vhost-user` in
/// LISTEN_FDNAMES (`FileDescriptorName=` in the .socket unit), else the first.
fn pick(count: usize, names: Option<&str>) -> RawFd {
    let index = names
        .and_then(|n| n.split(':').position(|n| n == "vhost-user"))
        .filter(|i| *i < count)
        .unwrap_or(0);
    LISTEN_FDS_START + index as RawFd
}

/// Parses LISTEN_PID/LISTEN_FDS; `None` when nothing was passed to this
/// process.
pub fn passed_fds(
    pid: Option<&str>,
    fds: Option<&str>,
    me: u32,
) -> Result<Option<usize>, ListenError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(None); // meant for another process (we inherited it)
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| ListenError::Count(fds.to_string()))?;
    if n == 0 {
        return Err(ListenError::NoFds);
    }
    Ok(Some(n))
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Result<libc::c_int, ListenError> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a c_int we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(ListenError::Inspect {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    Ok(v)
}

/// Takes the listener systemd passed, if any, and clears the LISTEN_*
/// variables so that children (alarm commands) do not see them. Call early,
/// while the process is single-threaded.
pub fn take_listener() -> Result<Option<Activated>, ListenError> {
    let var = |k: &str| std::env::var(k).ok();
    let count = passed_fds(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        std::process::id(),
    )?;
    let names = var("LISTEN_FDNAMES");
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let Some(count) = count else {
        return Ok(None);
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ListenError::Taken);
    }
    let fd = pick(count, names.as_deref());
    let is_listener = sockopt(fd, libc::SO_DOMAIN)? == libc::AF_UNIX
        && sockopt(fd, libc::SO_TYPE)? == libc::SOCK_STREAM
        && sockopt(fd, libc::SO_ACCEPTCONN)? == 1;
    if !is_listener {
        return Err(ListenError::NotUnixListener(fd));
    }
    // SAFETY: `fd` was passed to this process by the service manager for
    // it to own (LISTEN_PID is our pid), it is a listening unix stream
    // socket (checked above), and TAKEN makes sure it is wrapped only once.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // Keep it out of children (alarm commands).
    // SAFETY: F_SETFD on a descriptor we own; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let addr = listener
        .local_addr()
        .map_err(|source| ListenError::Inspect { fd, source })?;
    let path = addr.as_pathname().ok_or(ListenError::NoPath)?.to_owned();
    Ok(Some(Activated { listener, path }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_is_checked() {
        assert_eq!(passed_fds(None, None, 7).unwrap(), None);
        assert_eq!(passed_fds(Some("7"), None, 7).unwrap(), None);
        assert_eq!(passed_fds(Some("8"), Some("1"), 7).unwrap(), None);
        assert_eq!(passed_fds(Some("7"), Some("2"), 7).unwrap(), Some(2));
        assert!(matches!(
            passed_fds(Some("7"), Some("0"), 7),
            Err(ListenError::NoFds)
        ));
        assert!(matches!(
            passed_fds(Some("7"), Some("x"), 7),
            Err(ListenError::Count(_))
        ));
    }

    #[test]
    fn named_descriptor_is_picked() {
        assert_eq!(pick(1, None), 3);
        assert_eq!(pick(2, Some("metrics:vhost-user")), 4);
        assert_eq!(pick(2, Some("a:b")), 3);
        assert_eq!(pick(1, Some("x:vhost-user")), 3, "name beyond the count");
    }
}
