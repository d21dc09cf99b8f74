//! The sd_notify protocol, spoken directly over a unix datagram socket:
//! READY=1 once the vhost-user socket listens, STATUS= lines with the state
//! and alarms, WATCHDOG=1 every half WATCHDOG_USEC, STOPPING=1 at the end.
//!
//! `NOTIFY_SOCKET` is a path, or an abstract name written with a leading `@`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::seccomp;
use super::state::OpsState;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET `{0}` is not a usable socket address")]
    Address(String),
    #[error("cannot create the notification socket: {0}")]
    Socket(io::Error),
    #[error("cannot notify the service manager: {0}")]
    Send(io::Error),
    #[error("WATCHDOG_USEC `{0}` is not a number of microseconds")]
    Watchdog(String),
    #[error("cannot start the status thread: {0}")]
    Spawn(io::Error),
}

/// A connection to the service manager's notification socket.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

/// Parses NOTIFY_SOCKET: `/path` or `@abstract`.
pub fn parse_address(text: &str) -> Result<SocketAddr, NotifyError> {
    let bad = || NotifyError::Address(text.to_string());
    if let Some(name) = text.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if text.starts_with('/') {
        SocketAddr::from_pathname(text).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

/// The watchdog interval systemd asks for, when it asks this process.
pub fn watchdog_from(
    usec: Option<&str>,
    pid: Option<&str>,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(None);
        }
    }
    let n: u64 = usec
        .trim()
        .parse()
        .map_err(|_| NotifyError::Watchdog(usec.to_string()))?;
    Ok((n > 0).then(|| Duration::from_micros(n)))
}

impl Notifier {
    /// The notifier systemd configured through the environment, if any.
    /// The socket is created here, at start-up, so that sending needs no
    /// syscall beyond sendto under the sandbox.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let path = path.to_string_lossy().into_owned();
        let watchdog = watchdog_from(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        )?;
        Notifier::new(&path, watchdog).map(Some)
    }

    pub fn new(address: &str, watchdog: Option<Duration>) -> Result<Notifier, NotifyError> {
        let addr = parse_address(address)?;
        let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Notifier {
            sock,
            addr,
            watchdog,
        })
    }

    /// The full watchdog timeout, if the manager asked for pings.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (`KEY=value` lines).
    pub fn send(&self, msg: &str) -> Result<(), NotifyError> {
        self.sock
            .send_to_addr(msg.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(NotifyError::Send)
    }

    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}\n",
            one_line(status),
            std::process::id()
        ))
    }

    /// Best effort: a manager that went away must not stop the daemon.
    pub fn status(&self, status: &str) {
        if let Err(e) = self.send(&format!("STATUS={}\n", one_line(status))) {
            log::debug!("{e}");
        }
    }

    pub fn stopping(&self) {
        if let Err(e) = self.send("STOPPING=1\nSTATUS=stopping\n") {
            log::debug!("{e}");
        }
    }

    pub fn watchdog_ping(&self) {
        if let Err(e) = self.send("WATCHDOG=1\n") {
            log::warn!("watchdog ping: {e}");
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// The status thread: a WATCHDOG=1 ping every half watchdog timeout and a
/// fresh STATUS= whenever the line changes (alarms raised or cleared).
pub fn spawn_status(notifier: Arc<Notifier>, state: Arc<OpsState>) -> Result<(), NotifyError> {
    let ping_every = notifier.watchdog().map(|w| w / 2);
    let tick = ping_every.map_or(Duration::from_secs(1), |p| p.min(Duration::from_secs(1)));
    thread::Builder::new()
        .name("vublk-notify".into())
        .spawn(move || {
            if let Err(e) = seccomp::enter(seccomp::ThreadKind::Control) {
                log::error!("notify thread: {e}");
                return;
            }
            let mut last_status = String::new();
            let mut next_ping = Instant::now();
            loop {
                let now = Instant::now();
                if let Some(every) = ping_every {
                    if now >= next_ping {
                        notifier.watchdog_ping();
                        next_ping = now + every;
                    }
                }
                let status = state.status_line();
                if status != last_status && state.run_state() != super::RunState::Starting {
                    notifier.status(&status);
                    last_status = status;
                }
                thread::sleep(tick);
            }
        })
        .map(|_| ())
        .map_err(NotifyError::Spawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert!(parse_address("/run/systemd/notify").is_ok());
        let a = parse_address("@vublk-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"vublk-test"[..]));
        assert!(parse_address("relative").is_err());
        assert!(parse_address("").is_err());
    }

    #[test]
    fn watchdog_env() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog_from(None, None).unwrap(), None);
        assert_eq!(
            watchdog_from(Some("2000000"), Some(&me)).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_from(Some("2000000"), None).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_from(Some("2000000"), Some("1")).unwrap(), None);
        assert_eq!(watchdog_from(Some("0"), None).unwrap(), None);
        assert!(watchdog_from(Some("soon"), None).is_err());
    }

    #[test]
    fn messages_reach_a_bound_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap(), None).unwrap();
        n.ready("up\nand running").unwrap();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(
            text.starts_with("READY=1\nSTATUS=up and running\n"),
            "{text}"
        );
    }
}
