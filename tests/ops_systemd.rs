//! systemd integration against the real binary: sd_notify over a real
//! notification socket (path and abstract), and socket activation with a
//! real inherited listening descriptor.

mod common;
mod ops_support;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{fill_pattern, Client};
use ops_support::*;

#[test]
fn sd_notify_ready_status_watchdog_and_stopping() {
    let dir = tmp();
    let sock = join(&dir, "vhost.sock");
    let notify_path = join(&dir, "notify");
    let mut n = Notifications::new(UnixDatagram::bind(&notify_path).unwrap());
    let mut cmd = daemon_cmd(&sock, &["--num-queues", "1"]);
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000");
    let p = Proc::spawn(cmd);

    n.wait_for("READY=1", |t| t.contains("READY=1"));
    // READY comes after the socket listens: a frontend can connect now.
    assert!(UnixStream::connect(&sock).is_ok(), "READY before listen");
    assert!(n.all.contains(&format!("MAINPID={}", p.pid())), "{}", n.all);
    n.wait_for("two watchdog pings", |t| {
        t.matches("WATCHDOG=1").count() >= 2
    });
    n.wait_for("STATUS while idle", |t| {
        t.contains("STATUS=null:67108864: waiting for a frontend; no alarms")
    });

    let mut c = Client::connect_retry(&sock, 1);
    n.wait_for("STATUS while serving", |t| t.contains("serving a frontend"));
    fill_pattern(c.buf(0, 4096), 3, 0);
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    drop(c);

    p.signal(libc::SIGTERM);
    n.wait_for("STOPPING=1", |t| t.contains("STOPPING=1"));
    let status = p.terminate();
    assert!(status.success(), "{status}");
}

/// WATCHDOG_PID naming another process: no pings for us.
#[test]
fn watchdog_pid_of_another_process_means_no_pings() {
    let dir = tmp();
    let sock = join(&dir, "other.sock");
    let notify_path = join(&dir, "notify-other");
    let mut n = Notifications::new(UnixDatagram::bind(&notify_path).unwrap());
    let mut cmd = daemon_cmd(&sock, &[]);
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "100000")
        .env("WATCHDOG_PID", "1");
    let p = Proc::spawn(cmd);
    n.wait_for("READY=1", |t| t.contains("READY=1"));
    // 0.5 s is five watchdog periods; no ping may arrive at all.
    std::thread::sleep(std::time::Duration::from_millis(500));
    n.sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(len) = n.sock.recv(&mut buf) {
        n.all.push_str(&String::from_utf8_lossy(&buf[..len]));
    }
    assert!(!n.all.contains("WATCHDOG=1"), "{}", n.all);
    assert!(p.terminate().success());
}

#[test]
fn sd_notify_to_an_abstract_socket() {
    let dir = tmp();
    let sock = join(&dir, "vhost.sock");
    let name = format!("vublk-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let mut n = Notifications::new(UnixDatagram::bind_addr(&addr).unwrap());
    let mut cmd = daemon_cmd(&sock, &[]);
    cmd.env("NOTIFY_SOCKET", format!("@{name}"));
    let p = Proc::spawn(cmd);
    n.wait_for("READY=1 on the abstract socket", |t| t.contains("READY=1"));
    assert!(p.terminate().success());
}

/// Starts vublk the way systemd does: the listener as fd 3, LISTEN_FDS=1
/// and LISTEN_PID set to the pid of vublk itself (the shell's, which execs).
fn activated(listener: &UnixListener, args: &[&str]) -> Proc {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(
            "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=vhost-user; \
             export LISTEN_PID LISTEN_FDS LISTEN_FDNAMES; exec \"$0\" \"$@\"",
        )
        .arg(VUBLK)
        .args(args);
    let fd = listener.as_raw_fd();
    // SAFETY: between fork and exec we only call async-signal-safe dup2
    // and fcntl on descriptors of the child.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Proc::spawn(cmd)
}

#[test]
fn socket_activation_serves_the_inherited_listener_across_restarts() {
    let dir = tmp();
    let sock = join(&dir, "activated.sock");
    let img = join(&dir, "d.img");
    // What systemd's vublk@.socket does: bind and listen before vublk runs.
    let listener = UnixListener::bind(&sock).unwrap();
    let args = [
        "--disk",
        path_str(&img),
        "--size",
        "16M",
        "--poll-us",
        "0",
        "--seccomp",
        "kill",
    ];
    let first = activated(&listener, &args);
    let mut c = Client::connect_retry(&sock, 1);
    fill_pattern(c.buf(0, 65536), 7, 4096);
    assert_eq!(c.write(0, 4096, 0, 65536), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    assert!(first.terminate().success());
    // The socket belongs to the service manager: vublk leaves it in place.
    assert!(sock.exists(), "vublk removed the activated socket");

    // A restart takes over the same listening socket and path.
    let second = activated(&listener, &args);
    let mut c = Client::connect_retry(&sock, 1);
    assert_eq!(c.read(0, 4096, 1 << 20, 65536), 0);
    let mut want = vec![0u8; 65536];
    fill_pattern(&mut want, 7, 4096);
    assert!(c.buf(1 << 20, 65536) == want.as_slice(), "data lost");
    drop(c);
    assert!(second.terminate().success());
}

#[test]
fn listen_fds_for_another_process_is_ignored() {
    // LISTEN_PID names someone else: vublk must not touch fd 3 and needs
    // its own --socket.
    let dir = tmp();
    let sock = join(&dir, "own.sock");
    let mut cmd = daemon_cmd(&sock, &[]);
    cmd.env("LISTEN_PID", "1").env("LISTEN_FDS", "1");
    let mut p = Proc::spawn(cmd);
    wait_for_path(&mut p, &sock);
    assert!(p.terminate().success());
}
