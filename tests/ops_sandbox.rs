//! The seccomp sandbox and privilege drop of the real daemon.

mod common;
mod ops_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{fill_pattern, Client};
use ops_support::*;
use vublk::config::SeccompMode;
use vublk::ops::seccomp::{install, ThreadKind};

const CHILD_ENV: &str = "VUBLK_SECCOMP_CHILD";

/// Runs `child_entry` in a fresh copy of this test binary with `mode`.
fn child(mode: &str, kind: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}:{kind}"))
        .output()
        .unwrap()
}

/// In a child process only: installs a filter on this thread, makes an
/// allowed syscall, then a forbidden one (an AF_INET socket: no thread of
/// vublk may create one once it runs).
#[test]
fn child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // the parent run: nothing to do here
    };
    let (mode, kind) = spec.split_once(':').unwrap();
    let mode = match mode {
        "log" => SeccompMode::Log,
        _ => SeccompMode::Kill,
    };
    let kind = match kind {
        "worker" | "worker:open" => ThreadKind::Worker,
        "control" => ThreadKind::Control,
        _ => ThreadKind::Listener,
    };
    install(kind, mode).unwrap();
    if spec.ends_with(":open") {
        // Refused, not fatal: glibc's malloc may open this one lazily.
        let path = c"/proc/sys/vm/overcommit_memory";
        // SAFETY: a NUL-terminated path; the result is only inspected.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
        let err = std::io::Error::last_os_error().raw_os_error();
        println!("open = {fd} errno {err:?}");
        // SAFETY: ends the child at once, as planned.
        unsafe { libc::_exit(0) };
    }
    let msg = b"allowed write\n";
    // SAFETY: plain syscalls on our own stdout and a new descriptor.
    unsafe {
        libc::write(1, msg.as_ptr().cast(), msg.len());
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let after = format!("survived socket() = {fd}\n");
        libc::write(1, after.as_ptr().cast(), after.len());
        libc::_exit(0);
    }
}

#[test]
fn a_forbidden_syscall_kills_the_process_with_sigsys() {
    for kind in ["listener", "worker", "control"] {
        let out = child("kill", kind);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{kind}: {out:?}");
        assert!(stdout.contains("allowed write"), "{kind}: {stdout}");
        assert!(!stdout.contains("survived"), "{kind}: {stdout}");
    }
    // openat is refused with EACCES in queue threads, not fatal.
    let out = child("kill", "worker:open");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("open = -1 errno Some({})", libc::EACCES)),
        "{text}"
    );
    // Log mode lets it through (and logs it to the audit/kernel log).
    let out = child("log", "worker");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("survived socket()"));
}

#[test]
fn every_daemon_thread_runs_filtered_by_default() {
    let dir = tmp();
    let sock = join(&dir, "vhost.sock");
    let ctl = join(&dir, "vublk.ctl");
    let img = join(&dir, "d.img");
    let mut cmd = Command::new(VUBLK);
    cmd.arg("--socket").arg(&sock).args([
        "--disk",
        path_str(&img),
        "--size",
        "16M",
        "--num-queues",
        "2",
        "--poll-us",
        "0",
        "--control",
        path_str(&ctl),
    ]);
    let mut p = Proc::spawn(cmd);
    wait_for_path(&mut p, &ctl);
    let mut c = Client::connect_retry(&sock, 2);
    fill_pattern(c.buf(0, 65536), 9, 0);
    assert_eq!(c.write(0, 0, 0, 65536), 0);
    assert_eq!(c.write(1, 65536, 0, 65536), 0);
    assert_eq!(c.flush(1), 0);
    assert_eq!(c.discard(0, 1 << 20, 1 << 20), 0);
    assert_eq!(control(&ctl, "stats")["ok"], true);

    let threads = thread_seccomp(p.pid());
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["vublk", "vublk-q0", "vublk-q1", "vublk-control"] {
        assert!(names.contains(&want), "no thread {want}: {threads:?}");
    }
    for (name, mode) in &threads {
        // 2 = SECCOMP_MODE_FILTER. The command spawner alone stays
        // unconfined, so that alarm commands do not inherit a filter.
        let want = if name == "vublk-spawn" { 0 } else { 2 };
        assert_eq!(*mode, want, "thread {name}: {threads:?}");
    }
    drop(c);
    let status = p.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn root_is_dropped_after_start_up_and_io_uring_still_works() {
    let Ok(out) = Command::new("id").args(["-u", "nobody"]).output() else {
        eprintln!("skipped: no `id` command");
        return;
    };
    // SAFETY: getuid has no failure modes.
    if !out.status.success() || unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root and a `nobody` user");
        return;
    }
    let dir = tmp();
    // The directory stays root's: the socket must be usable because of
    // --socket-mode/--socket-group, not because of the directory.
    let sock = join(&dir, "vhost.sock");
    let img = join(&dir, "d.img");
    let ctl = join(&dir, "vublk.ctl");
    let notify = std::os::unix::net::UnixDatagram::bind(join(&dir, "notify")).unwrap();
    let mut cmd = Command::new(VUBLK);
    // Every confined thread runs while root is dropped (glibc makes each
    // thread switch ids itself: their filters must not see that).
    cmd.env("NOTIFY_SOCKET", join(&dir, "notify"))
        .env("WATCHDOG_USEC", "200000");
    cmd.arg("--socket").arg(&sock).args([
        "--disk",
        path_str(&img),
        "--size",
        "16M",
        "--poll-us",
        "0",
        "--control",
        path_str(&ctl),
        "--metrics",
        &format!("127.0.0.1:{}", free_port()),
        "--socket-mode",
        "0660",
        "--socket-group",
        "nogroup",
        "--user",
        "nobody",
        "--group",
        "nogroup",
    ]);
    let mut p = Proc::spawn(cmd);
    wait_for_path(&mut p, &sock);
    // Wait until start-up is over (the drop happens after the bind).
    let status_of = |p: &Proc| std::fs::read_to_string(format!("/proc/{}/status", p.pid()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = status_of(&p).unwrap_or_default();
        if s.lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534"))
        {
            let uid = s.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert!(!uid.split_whitespace().skip(1).any(|u| u == "0"), "{uid}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never dropped: {s}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    // Queue rings are created now, per connection, as nobody.
    let mut c = Client::connect_retry(&sock, 1);
    fill_pattern(c.buf(0, 65536), 5, 0);
    assert_eq!(c.write(0, 0, 0, 65536), 0);
    assert_eq!(c.read(0, 0, 65536, 65536), 0);
    let (a, b) = (c.buf(0, 65536).to_vec(), c.buf(65536, 65536).to_vec());
    assert!(a == b);
    drop(c);
    // Root's control socket still answers (the daemon bound it as root).
    assert_eq!(control(&ctl, "version")["pid"], p.pid());
    drop(notify);
    assert!(p.terminate().success());
}

#[test]
fn unknown_user_is_refused_before_serving() {
    let dir = tmp();
    let out = run(&[
        "--socket",
        path_str(&join(&dir, "s")),
        "--disk",
        "null:1M",
        "--user",
        "no-such-user-vublk",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown user"));
}
