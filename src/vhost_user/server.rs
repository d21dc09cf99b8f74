//! Accepts frontends on the vhost-user socket, one at a time, until SIGINT
//! or SIGTERM. A frontend that disconnects (or crashes) leaves the daemon
//! listening for the next one, as QEMU's `reconnect=` expects.

use std::fs;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use super::BlkBackend;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("epoll: {0}")]
    Epoll(io::Error),
}

const EV_LISTENER: u64 = 1;
const EV_SIGNAL: u64 = 2;
const EV_CONN: u64 = 3;
const EV_RELOAD: u64 = 4;

/// What [`Server::on_event`] observers hear (sd_notify STATUS=, stats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    Listening,
    Connected,
    Disconnected,
    Stopping,
}

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// We bound the path, so we remove it; an inherited (socket-activated)
    /// listener's path belongs to the service manager and outlives us.
    owns_path: bool,
    on_event: Option<Box<dyn FnMut(ServerEvent) + Send>>,
    backend: Arc<Mutex<BlkBackend>>,
    signals: UnixStream,
    hangups: UnixStream,
    on_reload: Option<Box<dyn FnMut() + Send>>,
    epoll: RawFd,
}

impl Server {
    /// Binds the socket and installs SIGINT/SIGTERM handlers that make
    /// [`Server::run`] return.
    pub fn bind(path: &Path, backend: BlkBackend) -> Result<Server, ServerError> {
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let mut server = Server::from_listener(listener, path, backend)?;
        server.owns_path = true;
        Ok(server)
    }

    /// Serves on a listener that is already bound (socket activation).
    pub fn from_listener(
        listener: UnixListener,
        path: &Path,
        backend: BlkBackend,
    ) -> Result<Server, ServerError> {
        let (signals, notifier) = UnixStream::pair().map_err(ServerError::Signals)?;
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let n = notifier.try_clone().map_err(ServerError::Signals)?;
            signal_hook::low_level::pipe::register(sig, n).map_err(ServerError::Signals)?;
        }
        let (hangups, hup_notifier) = UnixStream::pair().map_err(ServerError::Signals)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, hup_notifier)
            .map_err(ServerError::Signals)?;
        hangups
            .set_nonblocking(true)
            .map_err(ServerError::Signals)?;
        let epoll = epoll::create(true).map_err(ServerError::Epoll)?;
        let server = Server {
            listener,
            path: path.to_owned(),
            owns_path: false,
            on_event: None,
            backend: Arc::new(Mutex::new(backend)),
            signals,
            hangups,
            on_reload: None,
            epoll,
        };
        server.watch(server.listener.as_raw_fd(), EV_LISTENER)?;
        server.watch(server.signals.as_raw_fd(), EV_SIGNAL)?;
        server.watch(server.hangups.as_raw_fd(), EV_RELOAD)?;
        log::info!("listening on {}", path.display());
        Ok(server)
    }

    fn watch(&self, fd: RawFd, token: u64) -> Result<(), ServerError> {
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, token);
        epoll::ctl(self.epoll, epoll::ControlOptions::EPOLL_CTL_ADD, fd, ev)
            .map_err(ServerError::Epoll)
    }

    fn unwatch(&self, fd: RawFd) {
        let ev = epoll::Event::new(epoll::Events::empty(), 0);
        let _ = epoll::ctl(self.epoll, epoll::ControlOptions::EPOLL_CTL_DEL, fd, ev);
    }

    /// Called on SIGHUP, from the thread that runs [`Server::run`].
    pub fn on_reload(&mut self, f: Box<dyn FnMut() + Send>) {
        self.on_reload = Some(f);
    }

    fn reload(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.hangups).read(&mut buf), Ok(n) if n > 0) {}
        if let Some(f) = self.on_reload.as_mut() {
            f();
        }
    }

    fn wait(&mut self) -> Result<u64, ServerError> {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
        loop {
            match epoll::wait(self.epoll, -1, &mut events) {
                Ok(0) => continue,
                Ok(n) if events[..n].iter().any(|e| e.data == EV_RELOAD) => {
                    self.reload();
                    continue;
                }
                // A signal is reported as readable on the signal pipe. It
                // goes first, then the frontend being served: a frontend
                // waiting on the (level-triggered) listener must not hide
                // it, or `serve` spins on the listener forever.
                Ok(n) => {
                    let tokens = events[..n].iter().map(|e| e.data);
                    let rank = |t: &u64| match *t {
                        EV_SIGNAL => 0,
                        EV_CONN => 1,
                        _ => 2,
                    };
                    return Ok(tokens.min_by_key(rank).unwrap_or(0));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServerError::Epoll(e)),
            }
        }
    }

    /// Called from the thread that runs [`Server::run`] as frontends come
    /// and go.
    pub fn on_event(&mut self, f: Box<dyn FnMut(ServerEvent) + Send>) {
        self.on_event = Some(f);
    }

    fn event(&mut self, e: ServerEvent) {
        if let Some(f) = self.on_event.as_mut() {
            f(e);
        }
    }

    /// Serves frontends until a termination signal arrives.
    pub fn run(&mut self) -> Result<(), ServerError> {
        self.event(ServerEvent::Listening);
        loop {
            match self.wait()? {
                EV_SIGNAL => break,
                EV_LISTENER => {}
                _ => continue,
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    continue;
                }
            };
            log::info!("frontend connected");
            self.event(ServerEvent::Connected);
            let shutdown = self.serve(stream)?;
            self.lock_backend().disconnect();
            self.event(ServerEvent::Disconnected);
            log::info!("frontend disconnected; waiting for the next one");
            if shutdown {
                break;
            }
        }
        log::info!("shutting down");
        self.event(ServerEvent::Stopping);
        Ok(())
    }

    fn lock_backend(&self) -> std::sync::MutexGuard<'_, BlkBackend> {
        // A panic while holding the lock cannot leave the backend in a state
        // worse than the disconnect that follows; keep going.
        self.backend.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles one connection; returns true when a signal asks us to exit.
    fn serve(&mut self, stream: UnixStream) -> Result<bool, ServerError> {
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&self.backend));
        let conn = handler.try_clone_connection().map_err(ServerError::Epoll)?;
        self.watch(conn.as_raw_fd(), EV_CONN)?;
        let result = loop {
            match self.wait() {
                Ok(EV_SIGNAL) => break Ok(true),
                Ok(EV_CONN) => {}
                Ok(_) => continue,
                Err(e) => break Err(e),
            }
            match handler.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected | VuError::PartialMessage) => break Ok(false),
                Err(e) => {
                    // The message stream cannot be trusted after an error
                    // (and the frontend may wait for a reply it will not
                    // get): drop the connection and wait for the next one.
                    log::error!("vhost-user request failed, closing the connection: {e}");
                    break Ok(false);
                }
            }
        };
        self.unwatch(conn.as_raw_fd());
        result
    }

    /// Drains pending signal notifications (for tests that reuse a server).
    pub fn clear_signals(&mut self) {
        let mut buf = [0u8; 64];
        let _ = self.signals.set_nonblocking(true);
        while matches!(self.signals.read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.lock_backend().disconnect();
        if self.owns_path {
            let _ = fs::remove_file(&self.path);
        }
        // SAFETY: `epoll` is our own descriptor from epoll::create, closed
        // exactly once, here.
        unsafe { libc::close(self.epoll) };
    }
}
