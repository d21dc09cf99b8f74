//! The shared-page handshake between vublk and vublk-tier.
//!
//! The kernel's MADV_PAGEOUT skips a page that more than one page table
//! maps, and vublk maps all of guest RAM to do I/O. Before each pageout pass
//! the controller therefore asks every vublk daemon serving the guest to drop
//! its own page-table entries for guest RAM (MADV_DONTNEED on its shared
//! mapping: only its view goes, the data stays in the memfd, and the next
//! I/O faults the pages it needs back in).
//!
//! Protocol: a unix stream socket, one JSON object per line each way.
//!
//! ```text
//! -> {"op":"release"}
//! <- {"ok":true,"released_bytes":1073741824}
//! -> {"op":"ping"}
//! <- {"ok":true}
//! -> {"op":"format-disk"}
//! <- {"ok":false,"error":"unknown op \"format-disk\""}
//! ```
//!
//! A connection may carry any number of requests. The server side runs in
//! vublk ([`spawn_release_server`], wired to `--tier-socket PATH`), the
//! client in vublk-tier ([`request_release`], `--vublk-socket PATH`).

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use crate::tier::sys::drop_shared_view;

/// How long either side waits for the other.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest accepted line.
const MAX_LINE: usize = 4096;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `release` or `ping`.
    pub op: String,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// Bytes of guest RAM whose mapping the daemon dropped (release only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_bytes: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The socket could not be reached.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("talking to {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The reply was not valid protocol.
    #[error("bad reply from {path}: {detail}")]
    Protocol {
        /// Socket path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// The daemon answered with an error.
    #[error("{path} refused: {error}")]
    Refused {
        /// Socket path.
        path: String,
        /// The daemon's error text.
        error: String,
    },
}

/// Send one request and read its reply.
pub fn call(path: &Path, op: &str) -> Result<Reply, ReleaseError> {
    let p = path.display().to_string();
    let io = |source| ReleaseError::Io {
        path: p.clone(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| ReleaseError::Connect {
        path: p.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_string(&Request { op: op.to_string() }).map_err(|e| {
        ReleaseError::Protocol {
            path: p.clone(),
            detail: e.to_string(),
        }
    })?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(&stream).take(MAX_LINE as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ReleaseError::Protocol {
            path: p,
            detail: "connection closed without a reply".into(),
        });
    }
    let reply: Reply = serde_json::from_str(answer.trim()).map_err(|e| ReleaseError::Protocol {
        path: p.clone(),
        detail: format!("{e}: {:?}", answer.trim()),
    })?;
    if !reply.ok {
        return Err(ReleaseError::Refused {
            path: p,
            error: reply.error.unwrap_or_else(|| "no error text".into()),
        });
    }
    Ok(reply)
}

/// Ask the daemon at `path` to drop its view of guest RAM; returns the
/// bytes it released.
pub fn request_release(path: &Path) -> Result<u64, ReleaseError> {
    let r = call(path, "release")?;
    r.released_bytes.ok_or_else(|| ReleaseError::Protocol {
        path: path.display().to_string(),
        detail: "reply without released_bytes".into(),
    })
}

/// The release callback: drops the daemon's mappings, returns the bytes.
pub type ReleaseFn = Arc<dyn Fn() -> io::Result<u64> + Send + Sync>;

/// A running server; dropping it (or `shutdown`) stops the accept thread
/// and removes the socket file.
pub struct ReleaseServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReleaseServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting and remove the socket file. Connections being served
    /// finish their current request on their own threads.
    pub fn shutdown(&mut self) {
        let Some(t) = self.thread.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(); failure means it is gone already.
        let _ = UnixStream::connect(&self.path);
        let _ = t.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ReleaseServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Answer one request line.
pub fn handle_line(line: &str, release: &(dyn Fn() -> io::Result<u64> + Send + Sync)) -> Reply {
    let fail = |e: String| Reply {
        ok: false,
        released_bytes: None,
        error: Some(e),
    };
    match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => fail(format!("bad request: {e}")),
        Ok(r) => match r.op.as_str() {
            "release" => match release() {
                Ok(n) => Reply {
                    ok: true,
                    released_bytes: Some(n),
                    error: None,
                },
                Err(e) => fail(format!("release failed: {e}")),
            },
            "ping" => Reply {
                ok: true,
                ..Reply::default()
            },
            other => fail(format!("unknown op {other:?}")),
        },
    }
}

fn serve_conn(stream: UnixStream, release: ReleaseFn) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = handle_line(&line, release.as_ref());
        let mut out = serde_json::to_string(&reply)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"internal"}"#.into());
        out.push('\n');
        if (&stream).write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

/// Listen on `path` (mode 0600) and answer requests on a thread.
///
/// A stale socket file at `path` (nobody listening) is replaced; a live one
/// is an `AddrInUse` error.
pub fn spawn_release_server(path: &Path, release: ReleaseFn) -> io::Result<ReleaseServer> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("tier-release".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = conn else { continue };
                let r = release.clone();
                let _ = std::thread::Builder::new()
                    .name("tier-release-conn".into())
                    .spawn(move || serve_conn(stream, r));
            }
        })?;
    Ok(ReleaseServer {
        path: path.to_path_buf(),
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn handles_lines() {
        let f = |n: u64| move || -> io::Result<u64> { Ok(n) };
        let ok = handle_line("{\"op\":\"release\"}\n", &f(42));
        assert_eq!(ok.released_bytes, Some(42));
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":true,"released_bytes":42}"#
        );
        assert!(handle_line("{\"op\":\"ping\"}", &f(0)).ok);
        let bad = handle_line("{\"op\":\"dance\"}", &f(0));
        assert!(!bad.ok && bad.error.unwrap().contains("unknown op"));
        assert!(!handle_line("not json", &f(0)).ok);
        let err = || -> io::Result<u64> { Err(io::Error::other("nope")) };
        let e = handle_line("{\"op\":\"release\"}", &err);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"ok":false,"error":"release failed: nope"}"#
        );
    }

    #[test]
    fn server_and_client_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tier.sock");
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let mut srv = spawn_release_server(
            &path,
            Arc::new(move || {
                c2.fetch_add(1, Ordering::SeqCst);
                Ok(4096)
            }),
        )
        .unwrap();
        assert_eq!(request_release(&path).unwrap(), 4096);
        assert_eq!(request_release(&path).unwrap(), 4096);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(call(&path, "ping").unwrap().ok);
        assert!(matches!(
            call(&path, "x"),
            Err(ReleaseError::Refused { .. })
        ));
        // A second server on a live socket is refused.
        assert!(spawn_release_server(&path, Arc::new(|| Ok(0))).is_err());
        srv.shutdown();
        assert!(!path.exists());
        assert!(matches!(
            request_release(&path),
            Err(ReleaseError::Connect { .. })
        ));
        // A stale socket file is replaced.
        let l = UnixListener::bind(&path).unwrap();
        drop(l);
        let srv2 = spawn_release_server(&path, Arc::new(|| Ok(7))).unwrap();
        assert_eq!(request_release(&path).unwrap(), 7);
        drop(srv2);
        assert!(!path.exists());
    }
}
