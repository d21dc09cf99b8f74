//! The seccomp-bpf sandbox: one syscall allowlist per kind of thread,
//! installed once start-up is over (disk, sockets and privileges done).
//!
//! Thread kinds:
//! - listener: the main thread, serving the vhost-user control plane. It
//!   spawns the queue workers, and a filter is inherited by the threads a
//!   thread creates, so its filter is the union of its own list and the
//!   workers' (a thread can only narrow its filter, never widen it).
//! - worker: one per virtqueue; [`enter`] with [`ThreadKind::Worker`] at
//!   the start of a queue thread narrows it to the worker list.
//! - control: the control socket, metrics and sd_notify threads.
//!
//! Alarm commands (`/bin/sh`) would inherit a filter; [`spawn_detached`]
//! runs them from an unconfined helper thread started before any filter.
//!
//! The lists are the smallest that pass the whole test suite (found by
//! tracing every thread of the daemon under the suite, then checked with
//! `--seccomp log`, which logs each syscall outside the list to the kernel
//! log as an audit record with the thread's name, `comm="vublk-q0"`).

use std::collections::BTreeMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::config::SeccompMode;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp is not supported on {0}")]
    Arch(&'static str),
    #[error("cannot build the {kind} seccomp filter: {message}")]
    Build { kind: &'static str, message: String },
    #[error("cannot install the {kind} seccomp filter: {message}")]
    Install { kind: &'static str, message: String },
}

/// Which allowlist a thread gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Listener,
    Worker,
    Control,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Listener => "listener",
            ThreadKind::Worker => "worker",
            ThreadKind::Control => "control",
        }
    }
}

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), sys::$name)),*]
    };
}

/// Syscall numbers by name, for the architectures we build for.
#[allow(non_upper_case_globals)]
#[allow(dead_code)] // the full table, for trying lists out
mod sys {
    macro_rules! nr {
        ($($name:ident => $c:ident),* $(,)?) => {
            $(pub const $name: i64 = libc::$c as i64;)*
        };
    }
    nr!(
        accept4 => SYS_accept4,
        brk => SYS_brk,
        clock_nanosleep => SYS_clock_nanosleep,
        clone => SYS_clone,
        clone3 => SYS_clone3,
        close => SYS_close,
        connect => SYS_connect,
        epoll_ctl => SYS_epoll_ctl,
        epoll_pwait => SYS_epoll_pwait,
        eventfd2 => SYS_eventfd2,
        exit => SYS_exit,
        exit_group => SYS_exit_group,
        fallocate => SYS_fallocate,
        fcntl => SYS_fcntl,
        fdatasync => SYS_fdatasync,
        fstat => SYS_fstat,
        fsync => SYS_fsync,
        ftruncate => SYS_ftruncate,
        futex => SYS_futex,
        getpid => SYS_getpid,
        getrandom => SYS_getrandom,
        gettid => SYS_gettid,
        io_uring_enter => SYS_io_uring_enter,
        io_uring_register => SYS_io_uring_register,
        io_uring_setup => SYS_io_uring_setup,
        lseek => SYS_lseek,
        madvise => SYS_madvise,
        memfd_create => SYS_memfd_create,
        mmap => SYS_mmap,
        mprotect => SYS_mprotect,
        mremap => SYS_mremap,
        munmap => SYS_munmap,
        newfstatat => SYS_newfstatat,
        openat => SYS_openat,
        prctl => SYS_prctl,
        pread64 => SYS_pread64,
        pwrite64 => SYS_pwrite64,
        read => SYS_read,
        recvfrom => SYS_recvfrom,
        recvmsg => SYS_recvmsg,
        rseq => SYS_rseq,
        rt_sigaction => SYS_rt_sigaction,
        rt_sigprocmask => SYS_rt_sigprocmask,
        rt_sigreturn => SYS_rt_sigreturn,
        sched_getaffinity => SYS_sched_getaffinity,
        sched_yield => SYS_sched_yield,
        seccomp => SYS_seccomp,
        sendmsg => SYS_sendmsg,
        sendto => SYS_sendto,
        set_robust_list => SYS_set_robust_list,
        setsockopt => SYS_setsockopt,
        sigaltstack => SYS_sigaltstack,
        socket => SYS_socket,
        statx => SYS_statx,
        tgkill => SYS_tgkill,
        unlinkat => SYS_unlinkat,
        write => SYS_write,
        writev => SYS_writev,
    );
    #[cfg(target_arch = "x86_64")]
    nr!(
        epoll_wait => SYS_epoll_wait,
        poll => SYS_poll,
        unlink => SYS_unlink,
    );
}

type List = &'static [(&'static str, i64)];

/// Every confined thread: memory allocation, locks, logging to stderr,
/// dropping descriptors, signal return, thread exit. brk, mremap and
/// sched_yield were not seen under the test suite but the allocator and
/// std may use them at any time: killing the daemon for them would be a bug.
/// (fcntl: debug builds check a descriptor with F_GETFD before closing it.)
pub const BASE: List = syscalls!(
    brk,
    close,
    exit,
    exit_group,
    fcntl,
    futex,
    getpid,
    gettid,
    madvise,
    mmap,
    mprotect,
    mremap,
    munmap,
    rt_sigprocmask,
    rt_sigreturn,
    sched_yield,
    sigaltstack,
    write,
);

/// Queue workers, after [`enter_worker`]: their io_uring, the eventfds.
pub const WORKER: List = syscalls!(io_uring_enter, io_uring_register, io_uring_setup, read);

/// The vhost-user listener: accept a frontend, vhost-user messages with
/// descriptors (recvmsg/sendmsg), the in-flight memfd, queue threads
/// started (clone3 and what a new thread does before narrowing its
/// filter, seccomp included), signal pipes, SIGHUP's config re-read, sd_notify (sendto), the final flush, removing
/// the socket, and waking the tier release thread (an AF_UNIX socket).
#[cfg(target_arch = "x86_64")]
pub const LISTENER: List = syscalls!(
    accept4,
    clone3,
    connect,
    epoll_ctl,
    epoll_wait,
    eventfd2,
    fdatasync,
    ftruncate,
    memfd_create,
    openat,
    prctl,
    read,
    recvfrom,
    recvmsg,
    rseq,
    sched_getaffinity,
    seccomp,
    sendmsg,
    sendto,
    set_robust_list,
    socket,
    statx,
    unlink,
);
#[cfg(not(target_arch = "x86_64"))]
pub const LISTENER: List = syscalls!(
    accept4,
    clone3,
    connect,
    epoll_ctl,
    epoll_pwait,
    eventfd2,
    fdatasync,
    ftruncate,
    memfd_create,
    openat,
    prctl,
    read,
    recvfrom,
    recvmsg,
    rseq,
    sched_getaffinity,
    seccomp,
    sendmsg,
    sendto,
    set_robust_list,
    socket,
    statx,
    unlinkat,
);

/// Control socket, metrics and sd_notify threads: accept a client, read a
/// request, write an answer (with a send timeout), sleep.
#[cfg(target_arch = "x86_64")]
pub const CONTROL: List = syscalls!(
    accept4,
    clock_nanosleep,
    epoll_ctl,
    epoll_wait,
    read,
    recvfrom,
    sendto,
    setsockopt,
);
#[cfg(not(target_arch = "x86_64"))]
pub const CONTROL: List = syscalls!(
    accept4,
    clock_nanosleep,
    epoll_ctl,
    epoll_pwait,
    read,
    recvfrom,
    sendto,
    setsockopt,
);

/// Syscalls a confined thread is refused with EACCES rather than killed
/// for: glibc's malloc reads /proc/sys/vm/overcommit_memory once, lazily,
/// from whichever thread first shrinks an arena, and copes with failing to.
/// (The listener may open files: SIGHUP re-reads the config file.)
pub const REFUSED: List = syscalls!(openat);

fn refused(kind: ThreadKind) -> List {
    match kind {
        ThreadKind::Listener => &[],
        ThreadKind::Worker | ThreadKind::Control => REFUSED,
    }
}

fn lists(kind: ThreadKind) -> &'static [List] {
    match kind {
        ThreadKind::Listener => &[BASE, LISTENER, WORKER],
        ThreadKind::Worker => &[BASE, WORKER],
        ThreadKind::Control => &[BASE, CONTROL],
    }
}

/// The syscall names a thread of `kind` may make (the listener's include
/// the workers', which it passes on).
pub fn allowed(kind: ThreadKind) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = lists(kind)
        .iter()
        .flat_map(|l| l.iter().map(|s| s.0))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The syscall names a thread of `kind` gets EACCES for.
pub fn refused_names(kind: ThreadKind) -> Vec<&'static str> {
    refused(kind).iter().map(|s| s.0).collect()
}

fn numbers(kind: ThreadKind) -> Vec<i64> {
    lists(kind)
        .iter()
        .chain(std::iter::once(&refused(kind)))
        .flat_map(|l| l.iter().map(|s| s.1))
        .collect()
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))
}

/// The BPF program for `kind`: allowed syscalls pass, others kill the
/// process (`kill`) or pass and are logged (`log`). `None` for `off`.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Kill => SeccompAction::KillProcess,
    };
    let build = |message: String| SeccompError::Build {
        kind: kind.name(),
        message,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        numbers(kind).into_iter().map(|n| (n, Vec::new())).collect();
    if let Some(r) = rules.get_mut(&sys::socket) {
        // Unix sockets only: no network from a confined thread.
        let unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .map_err(|e| build(e.to_string()))?;
        *r = vec![SeccompRule::new(vec![unix]).map_err(|e| build(e.to_string()))?];
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()?)
        .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(|e| build(e.to_string()))
}

/// The second filter of `kind`: EACCES for its [`REFUSED`] syscalls (the
/// kernel takes the strictest answer of all filters, so this wins over the
/// allowlist's "allow" for them and loses to its "kill" for the rest).
pub fn refusal_program(kind: ThreadKind) -> Result<Option<BpfProgram>, SeccompError> {
    if refused(kind).is_empty() {
        return Ok(None);
    }
    let build = |message: String| SeccompError::Build {
        kind: kind.name(),
        message,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        refused(kind).iter().map(|s| (s.1, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        target_arch()?,
    )
    .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(|e| build(e.to_string()))
}

/// Installs the filters of `kind` in `mode` on the calling thread (and the
/// threads it creates from now on).
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(prog) = program(kind, mode)? else {
        return Ok(());
    };
    let apply = |p: &BpfProgram| {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install {
            kind: kind.name(),
            message: e.to_string(),
        })
    };
    if let Some(refusal) = refusal_program(kind)? {
        apply(&refusal)?;
    }
    apply(&prog)?;
    log::debug!(
        "seccomp {:?}: {} filter installed ({} syscalls)",
        mode,
        kind.name(),
        allowed(kind).len()
    );
    Ok(())
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Sets the mode for [`enter`] (once, at start-up).
pub fn configure(mode: SeccompMode) {
    let _ = MODE.set(mode);
}

/// Installs the filter of `kind` on the calling thread in the configured
/// mode; nothing when none is configured (tests, `--seccomp off`).
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    match MODE.get() {
        Some(mode) => install(kind, *mode),
        None => Ok(()),
    }
}

/// The start of a queue thread: narrows the inherited listener filter to
/// the workers' list. A failure leaves the (wider) listener filter on.
pub fn enter_worker() {
    if let Err(e) = enter(ThreadKind::Worker) {
        log::error!("{e}");
    }
}

type Job = (Command, Sender<io::Result<u32>>);

static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the unconfined thread that runs [`spawn_detached`] commands.
/// Call before installing any filter on the calling thread.
pub fn start_spawner() {
    let (tx, rx) = mpsc::channel::<Job>();
    let started = std::thread::Builder::new()
        .name("vublk-spawn".into())
        .spawn(move || spawner(rx));
    match started {
        Ok(_) => {
            let _ = SPAWNER.set(Mutex::new(tx));
        }
        Err(e) => log::error!("cannot start the command spawner thread: {e}"),
    }
}

fn spawner(rx: Receiver<Job>) {
    let mut children: Vec<Child> = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok((mut cmd, reply)) => {
                let r = cmd.spawn().map(|c| {
                    let pid = c.id();
                    children.push(c);
                    pid
                });
                let _ = reply.send(r);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }
}

/// Runs `cmd` without waiting for it and reaps it later. Under the sandbox
/// it is spawned by the unconfined helper thread, so the command does not
/// inherit a seccomp filter.
pub fn spawn_detached(mut cmd: Command) -> io::Result<u32> {
    let Some(tx) = SPAWNER.get() else {
        let mut child = cmd.spawn()?;
        let pid = child.id();
        std::thread::Builder::new()
            .name("vublk-reap".into())
            .spawn(move || child.wait())?;
        return Ok(pid);
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .map_err(|_| io::Error::other("spawner lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("spawner thread gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("spawner thread gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_build_for_every_kind() {
        for kind in [
            ThreadKind::Listener,
            ThreadKind::Worker,
            ThreadKind::Control,
        ] {
            assert!(program(kind, SeccompMode::Off).unwrap().is_none());
            let p = program(kind, SeccompMode::Kill).unwrap().unwrap();
            assert!(p.len() > allowed(kind).len(), "{kind:?}");
        }
        let listener = allowed(ThreadKind::Listener);
        for w in allowed(ThreadKind::Worker) {
            assert!(
                listener.contains(&w),
                "workers inherit the listener filter: {w}"
            );
        }
    }
}
