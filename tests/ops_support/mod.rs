//! Helpers of the ops_* integration tests: the real `vublk` binary started
//! with extra environment (sd_notify, socket activation) and small clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");

/// A vublk child; SIGTERM and reaped on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null());
        Proc {
            child: cmd.spawn().expect("spawn vublk"),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, then waits (10 s at most) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let status = wait_exit(&mut self.child);
        std::mem::forget(self);
        status
    }
}

pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vublk did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vublk ARGS` with the disk on a null device and polling off.
pub fn daemon_cmd(socket: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(VUBLK);
    c.arg("--socket")
        .arg(socket)
        .args(["--disk", "null:64M", "--poll-us", "0"])
        .args(extra);
    c
}

/// `vublk ARGS` on a fresh 16 MiB sparse image, polling off.
pub fn image_cmd(socket: &Path, image: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(VUBLK);
    c.arg("--socket")
        .arg(socket)
        .arg("--disk")
        .arg(image)
        .args(["--size", "16M", "--poll-us", "0"])
        .args(extra);
    c
}

/// Waits until `path` exists (the daemon is up) or the child exits.
pub fn wait_for_path(p: &mut Proc, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(s)) = p.child.try_wait() {
            panic!("vublk exited early: {s}");
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything a notification socket received, in order.
pub struct Notifications {
    pub sock: UnixDatagram,
    pub all: String,
}

impl Notifications {
    pub fn new(sock: UnixDatagram) -> Notifications {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notifications {
            sock,
            all: String::new(),
        }
    }

    /// Receives until `done` holds for everything received so far.
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut buf = [0u8; 4096];
        while !done(&self.all) {
            assert!(Instant::now() < deadline, "no {what}; got {:?}", self.all);
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.all.push_str(&String::from_utf8_lossy(&buf[..n]));
                self.all.push('\u{1e}'); // datagram boundary
            }
        }
    }
}

/// One control-socket request and its JSON answer.
pub fn control(path: &Path, request: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(path).expect("connect control socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

/// GET `path` over HTTP/1.0; returns the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A free loopback port (bound then released; another process could take
/// it in between, which these tests accept).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `vublk ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(VUBLK)
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .expect("run vublk")
}

/// The `Seccomp:` mode and the name of every thread of `pid`.
pub fn thread_seccomp(pid: i32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:").parse().unwrap_or(99)));
    }
    out.sort();
    out
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn join(d: &tempfile::TempDir, name: &str) -> PathBuf {
    d.path().join(name)
}
