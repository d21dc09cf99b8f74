//! The control socket: a unix stream socket (mode 0600) speaking
//! newline-delimited JSON, one request per line, one answer per line.
//!
//! Requests (a bare word works too: `stats`):
//! - `{"cmd":"stats"}`: per-queue counters and latency, alarms, QoS limits.
//!   On a connection that asked before, each queue also carries `interval`:
//!   rates and latency percentiles since that previous request.
//! - `{"cmd":"set-qos","qos-iops":1000,"qos-bps":"100M"}`: replaces the QoS
//!   limits with the given ones (the same keys as the config file; keys left
//!   out are unlimited; `{"cmd":"set-qos"}` lifts every limit).
//! - `{"cmd":"alarms"}`: active alarms.
//! - `{"cmd":"version"}`.
//!
//! Answers are `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::seccomp;
use super::state::{qos_to_keys, OpsState};
use crate::config::{Args, Config, Settings};
use crate::stats::QueueSnapshot;

/// Longest request line; a client sending more is dropped.
const MAX_LINE: usize = 64 << 10;
/// Clients served at once.
const MAX_CLIENTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {0} is in use by a running process")]
    InUse(PathBuf),
    #[error("control socket path {0} exists and is not a socket")]
    NotSocket(PathBuf),
    #[error("cannot bind the control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the control thread: {0}")]
    Spawn(io::Error),
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotSocket(path.to_owned()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse(path.to_owned()));
    }
    std::fs::remove_file(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })
}

impl ControlServer {
    /// Binds `path` with mode 0600 (created so: no window with a wider mode).
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        remove_stale(path)?;
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        // SAFETY: umask only swaps the process file mode mask; restored
        // right after. Start-up runs this before the daemon's threads that
        // create files.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves on a thread of its own (under the control seccomp filter).
    pub fn spawn(self, state: Arc<OpsState>) -> Result<(), ControlError> {
        let epoll = epoll::create(true).map_err(ControlError::Spawn)?;
        let spawned = thread::Builder::new()
            .name("vublk-control".into())
            .spawn(move || {
                if let Err(e) = seccomp::enter(seccomp::ThreadKind::Control) {
                    log::error!("control thread: {e}");
                    return;
                }
                if let Err(e) = self.serve_on(epoll, &state) {
                    log::error!("control socket {}: {e}", self.path.display());
                }
                // SAFETY: our own epoll descriptor, closed once, here.
                unsafe { libc::close(epoll) };
            });
        if let Err(e) = spawned {
            // SAFETY: the thread that would own it never started.
            unsafe { libc::close(epoll) };
            return Err(ControlError::Spawn(e));
        }
        Ok(())
    }

    fn serve_on(&self, epoll: i32, state: &OpsState) -> io::Result<()> {
        const LISTENER: u64 = 0;
        let add = |fd: i32, token: u64| {
            epoll::ctl(
                epoll,
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Event::new(epoll::Events::EPOLLIN, token),
            )
        };
        add(self.listener.as_raw_fd(), LISTENER)?;
        let mut clients: BTreeMap<u64, Client> = BTreeMap::new();
        let mut next_token = 1u64;
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 16];
        loop {
            let n = match epoll::wait(epoll, -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                let token = ev.data;
                if token == LISTENER {
                    let Ok((stream, _)) = self.listener.accept() else {
                        continue;
                    };
                    if clients.len() >= MAX_CLIENTS {
                        continue; // dropped: closed
                    }
                    // A client that stops reading must not block the thread.
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                    if add(stream.as_raw_fd(), next_token).is_ok() {
                        clients.insert(next_token, Client::new(stream));
                        next_token += 1;
                    }
                    continue;
                }
                let keep = clients
                    .get_mut(&token)
                    .is_some_and(|c| c.on_readable(state));
                if !keep {
                    if let Some(c) = clients.remove(&token) {
                        let _ = epoll::ctl(
                            epoll,
                            epoll::ControlOptions::EPOLL_CTL_DEL,
                            c.stream.as_raw_fd(),
                            epoll::Event::new(epoll::Events::empty(), 0),
                        );
                    }
                }
            }
        }
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// The snapshot the previous `stats` answer was made from.
    last: Option<(Vec<QueueSnapshot>, Instant)>,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
            last: None,
        }
    }

    /// Reads what is there (the socket is readable: one read cannot block)
    /// and answers every complete line; false to drop the client.
    fn on_readable(&mut self, state: &OpsState) -> bool {
        let mut chunk = [0u8; 4096];
        let n = match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            if line.trim().is_empty() {
                continue;
            }
            let mut answer = handle(line.trim(), state, &mut self.last).to_string();
            answer.push('\n');
            if self.stream.write_all(answer.as_bytes()).is_err() {
                return false;
            }
        }
        self.buf.len() <= MAX_LINE
    }
}

fn error(message: impl ToString) -> Value {
    json!({"ok": false, "error": message.to_string()})
}

/// Answers one request line.
pub fn handle(
    line: &str,
    state: &OpsState,
    last: &mut Option<(Vec<QueueSnapshot>, Instant)>,
) -> Value {
    let mut request: Map<String, Value> = if line.starts_with('{') {
        match serde_json::from_str(line) {
            Ok(m) => m,
            Err(e) => return error(format!("invalid JSON: {e}")),
        }
    } else {
        let mut m = Map::new();
        m.insert("cmd".into(), Value::String(line.to_string()));
        m
    };
    let cmd = match request.remove("cmd") {
        Some(Value::String(c)) => c,
        _ => return error("missing \"cmd\" (stats, set-qos, alarms, version)"),
    };
    match cmd.as_str() {
        "stats" => {
            let now = state.snapshot();
            let report = state.report(&now, last.as_ref().map(|(s, t)| (s.as_slice(), *t)));
            *last = Some((now, Instant::now()));
            with_ok(serde_json::to_value(report))
        }
        "alarms" => with_ok(serde_json::to_value(json!({"alarms": state.alarms()}))),
        "version" => json!({
            "ok": true,
            "name": env!("CARGO_PKG_NAME"),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        }),
        "set-qos" => match set_qos(request, state) {
            Ok(v) => v,
            Err(e) => error(e),
        },
        other => error(format!(
            "unknown command `{other}` (stats, set-qos, alarms, version)"
        )),
    }
}

fn with_ok(v: Result<Value, serde_json::Error>) -> Value {
    match v {
        Ok(Value::Object(mut m)) => {
            m.insert("ok".into(), Value::Bool(true));
            Value::Object(m)
        }
        Ok(_) => error("internal: answer is not an object"),
        Err(e) => error(e),
    }
}

fn set_qos(request: Map<String, Value>, state: &OpsState) -> Result<Value, String> {
    if let Some(k) = request.keys().find(|k| !k.starts_with("qos-")) {
        return Err(format!("set-qos takes qos-* keys only, not `{k}`"));
    }
    let settings: Settings =
        serde_json::from_value(Value::Object(request)).map_err(|e| e.to_string())?;
    let args = Args {
        settings,
        ..Args::default()
    };
    let (limits, _) = Config::reload(&args).map_err(|e| e.to_string())?;
    state.set_qos_limits(limits);
    let now = qos_to_keys(&state.qos_limits());
    log::info!("control: QoS limits set to {now:?}");
    Ok(json!({"ok": true, "qos": now}))
}
