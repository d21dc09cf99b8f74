//! IOPS and latency of vublk against qemu-storage-daemon, measured in the
//! same run, interleaved, best of several repetitions.
//!
//! The load generator is libblkio's virtio-blk-vhost-user frontend (the
//! `blkio` crate): one thread per virtqueue, random 4 KiB reads or writes at a
//! fixed depth for a fixed time, in two completion modes:
//! - `irq`: a normal queue, `do_io` with min_completions 1 sleeps on the
//!   completion eventfd, like a guest taking interrupts;
//! - `poll`: a blkio poll queue, `do_io` with min_completions 0 in a loop, so
//!   the figures are the backend's own latency.
//!
//! Backends: vublk on a `null:` disk vs qemu-storage-daemon's `null-co`
//! (both polling: vublk's queue thread, qsd's iothread with adaptive
//! polling), then both on the same preallocated file with O_DIRECT and
//! io_uring. Per run it prints IOPS, mean / p50 / p99 latency, the CPU time
//! the backend process spent per I/O (all its threads, from
//! /proc/PID/task/*/schedstat) and the generator's own CPU and busy time per
//! I/O (busy = not waiting for the backend: when it nears 1/IOPS per thread,
//! the generator is the bottleneck, not the backend).
//!
//! ```text
//! cargo bench --bench iops                 # full run (several minutes)
//! cargo bench --bench iops -- --quick      # smoke run (< 60 s)
//! cargo bench --bench iops -- --help
//! ```
//!
//! The vublk binary is the one Cargo builds for the bench (release profile,
//! `CARGO_BIN_EXE_vublk`); `--vublk BIN` or `--extra NAME=BIN` compare other
//! builds in the same run. Daemons are started with PR_SET_PDEATHSIG and
//! stopped on drop, the data file lives in a temporary directory under the
//! target directory (a real disk, not tmpfs) and is removed on exit, also on
//! error or Ctrl-C.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const BLOCK: usize = 4096;
const NULL_SIZE: u64 = 1 << 30;
/// Adaptive polling ceiling for qsd's iothread, matched to vublk's default
/// `--poll-us 50`.
const QSD_POLL_MAX_NS: u64 = 50_000;

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(ctx: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{ctx}: {e}")
}

// ---------------------------------------------------------------- options

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Poll,
    Irq,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rw {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DiskKind {
    Null,
    File,
}

#[derive(Clone, Debug)]
enum Impl {
    /// A vublk binary and arguments of its own.
    Vublk(PathBuf, Vec<String>),
    Qsd,
}

/// QoS limits far above anything this machine can do: every request goes
/// through the limiter but none waits, which shows what the limiter costs.
const QOS_UNREACHED: [&str; 4] = ["--qos-iops", "1000000000", "--qos-bps", "100T"];

#[derive(Clone, Debug)]
struct Backend {
    name: String,
    imp: Impl,
}

struct Opts {
    secs: f64,
    warmup: f64,
    reps: usize,
    depths: Vec<usize>,
    queues: Vec<usize>,
    modes: Vec<Mode>,
    rws: Vec<Rw>,
    disks: Vec<DiskKind>,
    file_size: u64,
    /// An existing file or block device to use instead of a fresh file.
    file: Option<PathBuf>,
    backends: Vec<Backend>,
    vublk_args: Vec<String>,
}

const HELP: &str = "\
usage: cargo bench --bench iops -- [options]
  --quick            short smoke run (< 60 s): 1 queue, depths 1 and 32, reads,
                     null and file disks, both modes, 2 x 0.5 s
  --secs S           measured seconds per run (default 2)
  --warmup S         unmeasured seconds before each run (default 0.3)
  --reps N           repetitions, best kept (default 3)
  --depth 1,32       queue depths
  --queues 1,2       queues (one generator thread each)
  --mode poll,irq    client completion modes
  --rw read,write    random reads and/or random writes
  --disk null,file   backing disks
  --file-size MiB    size of the data file (default 1024)
  --file PATH        use this existing file or block device for the file runs
                     (e.g. a loop device for a fast one); --rw write
                     overwrites its contents
  --only vublk,qsd   backends to run (names, see --extra)
  --vublk BIN        vublk binary (default: the one built for this bench)
  --vublk-arg ARG    extra argument for every vublk daemon (repeatable)
  --extra NAME=BIN   one more vublk build to compare (repeatable)
  --qos-overhead     also run `vublk-qos`: vublk with QoS limits far above the
                     load, beside plain vublk (no limit), to show what an active
                     limiter costs";

fn list<T>(v: &str, f: impl Fn(&str) -> Option<T>) -> Res<Vec<T>> {
    v.split(',')
        .map(|s| f(s.trim()).ok_or_else(|| format!("bad value {s:?}")))
        .collect()
}

fn parse_opts() -> Res<Opts> {
    let mut o = Opts {
        secs: 2.0,
        warmup: 0.3,
        reps: 3,
        depths: vec![1, 32],
        queues: vec![1, 2],
        modes: vec![Mode::Poll, Mode::Irq],
        rws: vec![Rw::Read, Rw::Write],
        disks: vec![DiskKind::Null, DiskKind::File],
        file_size: 1 << 30,
        file: None,
        backends: Vec::new(),
        vublk_args: Vec::new(),
    };
    let mut vublk = PathBuf::from(env!("CARGO_BIN_EXE_vublk"));
    let mut extra = Vec::new();
    let mut qos_overhead = false;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            // Cargo passes --bench to harness = false benches.
            "--bench" => {}
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--quick" => {
                o.secs = 0.5;
                o.warmup = 0.2;
                o.reps = 2;
                o.queues = vec![1];
                o.rws = vec![Rw::Read];
                o.file_size = 128 << 20;
            }
            "--secs" => o.secs = val()?.parse().map_err(err("--secs"))?,
            "--warmup" => o.warmup = val()?.parse().map_err(err("--warmup"))?,
            "--reps" => o.reps = val()?.parse().map_err(err("--reps"))?,
            "--depth" => o.depths = list(&val()?, |s| s.parse().ok().filter(|&d| d > 0))?,
            "--queues" => o.queues = list(&val()?, |s| s.parse().ok().filter(|&d| d > 0))?,
            "--mode" => {
                o.modes = list(&val()?, |s| match s {
                    "poll" => Some(Mode::Poll),
                    "irq" => Some(Mode::Irq),
                    _ => None,
                })?
            }
            "--rw" => {
                o.rws = list(&val()?, |s| match s {
                    "read" | "randread" => Some(Rw::Read),
                    "write" | "randwrite" => Some(Rw::Write),
                    _ => None,
                })?
            }
            "--disk" => {
                o.disks = list(&val()?, |s| match s {
                    "null" => Some(DiskKind::Null),
                    "file" => Some(DiskKind::File),
                    _ => None,
                })?
            }
            "--file-size" => {
                let mib: u64 = val()?.parse().map_err(err("--file-size"))?;
                o.file_size = mib.max(16) << 20;
            }
            "--file" => o.file = Some(PathBuf::from(val()?)),
            "--only" => only = Some(val()?.split(',').map(str::to_owned).collect()),
            "--vublk" => vublk = PathBuf::from(val()?),
            "--vublk-arg" => o.vublk_args.push(val()?),
            "--qos-overhead" => qos_overhead = true,
            "--extra" => {
                let v = val()?;
                let (name, bin) = v.split_once('=').ok_or("--extra takes NAME=BIN")?;
                extra.push(Backend {
                    name: name.to_owned(),
                    imp: Impl::Vublk(PathBuf::from(bin), Vec::new()),
                });
            }
            // Anything else (a filter cargo passes along) is ignored.
            _ => {}
        }
    }
    if qos_overhead {
        o.backends.push(Backend {
            name: "vublk-qos".into(),
            imp: Impl::Vublk(vublk.clone(), QOS_UNREACHED.map(String::from).to_vec()),
        });
    }
    o.backends.push(Backend {
        name: "vublk".into(),
        imp: Impl::Vublk(vublk, Vec::new()),
    });
    o.backends.extend(extra);
    o.backends.push(Backend {
        name: "qsd".into(),
        imp: Impl::Qsd,
    });
    if let Some(only) = only {
        o.backends.retain(|b| only.contains(&b.name));
    }
    if o.backends.is_empty() {
        return Err("no backend left to run".into());
    }
    if o.reps == 0 || o.secs <= 0.0 {
        return Err("--reps and --secs must be positive".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------- daemons

/// A backend process; SIGTERM, then SIGKILL, and reaped on drop. It also dies
/// with the benchmark (PR_SET_PDEATHSIG) if the benchmark is killed.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(b: &Backend, disk: &DiskSpec, socket: &Path, queues: usize, o: &Opts) -> Res<Daemon> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = match &b.imp {
            Impl::Vublk(bin, own_args) => {
                let mut c = Command::new(bin);
                c.arg("--socket")
                    .arg(socket)
                    .arg("--num-queues")
                    .arg(queues.to_string());
                match disk {
                    DiskSpec::Null => c.arg("--disk").arg(format!("null:{NULL_SIZE}")),
                    DiskSpec::File(p) => c.arg("--disk").arg(p).arg("--cache").arg("none"),
                };
                c.args(&o.vublk_args).args(own_args);
                c.env("RUST_LOG", "warn");
                c
            }
            Impl::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                let blockdev = match disk {
                    DiskSpec::Null => {
                        format!("driver=null-co,node-name=n,size={NULL_SIZE},read-zeroes=on")
                    }
                    DiskSpec::File(p) => {
                        use std::os::unix::fs::FileTypeExt;
                        let dev =
                            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device());
                        format!(
                            "driver={},node-name=n,filename={},cache.direct=on,aio=io_uring",
                            if dev { "host_device" } else { "file" },
                            p.display()
                        )
                    }
                };
                c.arg("--blockdev")
                    .arg(blockdev)
                    .arg("--object")
                    .arg(format!("iothread,id=io0,poll-max-ns={QSD_POLL_MAX_NS}"))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={},\
                         writable=on,num-queues={queues},iothread=io0",
                        socket.display()
                    ));
                c
            }
        };
        cmd.stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(err(&b.name))?;
        let mut d = Daemon {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(format!("{} exited at start: {st}", b.name));
            }
            if Instant::now() > deadline {
                return Err(format!("{}: socket did not appear", b.name));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Nanoseconds on CPU of every thread of `pid` (schedstat), and of the
/// busiest one.
fn process_cpu_ns(pid: u32) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(ns) = read_schedstat(&e.path().join("schedstat")) {
            out.insert(tid, ns);
        }
    }
    out
}

fn read_schedstat(p: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn thread_cpu_ns() -> u64 {
    read_schedstat(Path::new("/proc/thread-self/schedstat")).unwrap_or(0)
}

/// (total, busiest thread) CPU nanoseconds between two samples.
fn cpu_delta(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> (u64, u64) {
    let mut total = 0;
    let mut max = 0;
    for (tid, &ns) in b {
        let d = ns.saturating_sub(a.get(tid).copied().unwrap_or(0));
        total += d;
        max = max.max(d);
    }
    (total, max)
}

// ---------------------------------------------------------------- data file

enum DiskSpec {
    Null,
    File(PathBuf),
}

/// Writes `size` bytes of non-zero data with O_DIRECT, so that every block
/// is allocated and written (reads of unwritten extents never reach the
/// device), and nothing lingers in the page cache.
fn create_data_file(path: &Path, size: u64) -> Res<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(err("create data file"))?;
    let chunk = 1 << 20;
    let layout = std::alloc::Layout::from_size_align(chunk, BLOCK).map_err(err("layout"))?;
    // SAFETY: non-zero size; freed below.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: `p` is `chunk` bytes we own.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, chunk) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    let mut res = Ok(());
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        if let Err(e) = f.write_all(&buf[..n]) {
            res = Err(format!("write data file: {e}"));
            break;
        }
        left -= n as u64;
    }
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(p, layout) };
    res?;
    f.sync_all().map_err(err("sync data file"))?;
    Ok(())
}

fn on_tmpfs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut s = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs succeeded.
    let t = unsafe { s.assume_init() }.f_type;
    t == libc::TMPFS_MAGIC
}

// ---------------------------------------------------------------- histogram

/// Log-linear latency histogram in nanoseconds: 32 sub-buckets per power of
/// two (~3% resolution), fixed size, no allocation per sample.
struct Hist {
    counts: Box<[u64; Hist::BUCKETS]>,
    n: u64,
    sum: u64,
}

impl Hist {
    const SUB: u32 = 5;
    const BUCKETS: usize = (64 - Self::SUB as usize) << Self::SUB;

    fn new() -> Hist {
        Hist {
            counts: Box::new([0; Self::BUCKETS]),
            n: 0,
            sum: 0,
        }
    }

    #[inline]
    fn index(v: u64) -> usize {
        if v < (1 << Self::SUB) {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - Self::SUB;
        ((shift as usize) << Self::SUB) + (v >> shift) as usize
    }

    /// Midpoint of a bucket.
    fn value(i: usize) -> u64 {
        if i < (2 << Self::SUB) {
            return i as u64;
        }
        let shift = (i >> Self::SUB) - 1;
        let top = (i & ((1 << Self::SUB) - 1)) as u64 + (1 << Self::SUB);
        (top << shift) + (1 << shift) / 2
    }

    #[inline]
    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.n += 1;
        self.sum += v;
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.n += o.n;
        self.sum += o.sum;
    }

    fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum as f64 / self.n as f64
        }
    }

    fn quantile(&self, q: f64) -> u64 {
        let target = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= target {
                return Self::value(i);
            }
        }
        0
    }
}

// ---------------------------------------------------------------- generator

#[derive(Clone, Copy)]
struct Case {
    disk: DiskKind,
    mode: Mode,
    rw: Rw,
    depth: usize,
    queues: usize,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "{:<4} {:<4} {:<9} q{} d{:<2}",
            match self.disk {
                DiskKind::Null => "null",
                DiskKind::File => "file",
            },
            match self.mode {
                Mode::Poll => "poll",
                Mode::Irq => "irq",
            },
            match self.rw {
                Rw::Read => "randread",
                Rw::Write => "randwrite",
            },
            self.queues,
            self.depth
        )
    }
}

struct ThreadStats {
    hist: Hist,
    ios: u64,
    errors: u64,
    wall_ns: u64,
    wait_ns: u64,
    cpu_ns: u64,
}

#[derive(Clone, Copy, Default)]
struct RunStats {
    iops: f64,
    mean_ns: f64,
    p50_ns: u64,
    p99_ns: u64,
    /// Backend process CPU per I/O (all threads) and its busiest thread's.
    backend_cpu_ns: f64,
    backend_thread_ns: f64,
    /// Generator CPU per I/O, and its time not spent waiting for the backend.
    client_cpu_ns: f64,
    client_busy_ns: f64,
    errors: u64,
}

struct Phases {
    origin: Instant,
    warm_ns: u64,
    end_ns: u64,
}

#[inline]
fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    x
}

struct Gen {
    q: Blkioq,
    base: usize,
    blocks: u64,
    rng: u64,
    write: bool,
}

impl Gen {
    #[inline]
    fn submit(&mut self, slot: usize) {
        let off = (xorshift(&mut self.rng) % self.blocks) * BLOCK as u64;
        let buf = (self.base + slot * BLOCK) as *mut u8;
        if self.write {
            self.q.write(off, buf, BLOCK, slot, ReqFlags::empty());
        } else {
            self.q.read(off, buf, BLOCK, slot, ReqFlags::empty());
        }
    }
}

fn generator(mut g: Gen, case: Case, ph: &Phases, stop: &AtomicBool) -> Res<ThreadStats> {
    let depth = case.depth;
    let poll = case.mode == Mode::Poll;
    let mut issued = vec![0u64; depth];
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut hist = Hist::new();
    let now = || ph.origin.elapsed().as_nanos() as u64;
    let t = now();
    for (slot, at) in issued.iter_mut().enumerate() {
        *at = t;
        g.submit(slot);
    }
    let (mut measuring, mut ios, mut errors) = (false, 0u64, 0u64);
    let (mut t0, mut cpu0, mut wait_ns) = (0u64, 0u64, 0u64);
    let mut wait_start: Option<u64> = None;
    let mut empty = 0u32;
    let mut t_end;
    loop {
        let n = if poll {
            g.q.do_io(&mut comps, 0, None, None)
        } else {
            wait_start = Some(now());
            let mut timeout = Duration::from_secs(10);
            g.q.do_io(&mut comps, 1, Some(&mut timeout), None)
        }
        .map_err(err("do_io"))?;
        if n == 0 {
            if !poll {
                return Err("request timed out".into());
            }
            empty = empty.wrapping_add(1);
            if wait_start.is_none() {
                wait_start = Some(now());
            } else if empty % 4096 == 0 {
                t_end = now();
                if t_end >= ph.end_ns || stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            continue;
        }
        let t = now();
        t_end = t;
        if let Some(ws) = wait_start.take() {
            if measuring {
                wait_ns += t - ws;
            }
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if c.ret != 0 {
                errors += 1;
            }
            if measuring {
                hist.record(t - issued[slot]);
            }
            issued[slot] = t;
            g.submit(slot);
        }
        if measuring {
            ios += n as u64;
            if t >= ph.end_ns {
                break;
            }
        } else if t >= ph.warm_ns {
            measuring = true;
            t0 = t;
            cpu0 = thread_cpu_ns();
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let cpu_ns = thread_cpu_ns().saturating_sub(cpu0);
    if !measuring {
        return Err("run ended before the warm-up did".into());
    }
    // Drain what is still in flight before the queue goes away.
    let mut left = depth;
    while left > 0 {
        let mut timeout = Duration::from_secs(10);
        let n =
            g.q.do_io(&mut comps, left, Some(&mut timeout), None)
                .map_err(err("drain"))?;
        if n == 0 {
            return Err("drain timed out".into());
        }
        left -= n;
    }
    Ok(ThreadStats {
        hist,
        ios,
        errors,
        wall_ns: t_end - t0,
        wait_ns,
        cpu_ns,
    })
}

fn run_case(socket: &Path, pid: u32, case: Case, o: &Opts, stop: &AtomicBool) -> Res<RunStats> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err("blkio"))?;
    b.set_str("path", socket.to_str().ok_or("socket path")?)
        .map_err(err("path"))?;
    b.connect().map_err(err("connect"))?;
    let (nq, npq) = match case.mode {
        Mode::Irq => (case.queues as i32, 0),
        Mode::Poll => (0, case.queues as i32),
    };
    b.set_i32("num-queues", nq).map_err(err("num-queues"))?;
    b.set_i32("num-poll-queues", npq)
        .map_err(err("num-poll-queues"))?;
    let started = b.start().map_err(err("start"))?;
    let queues = match case.mode {
        Mode::Irq => started.queues,
        Mode::Poll => started.poll_queues,
    };
    let capacity = b.get_u64("capacity").map_err(err("capacity"))?;
    let per_queue = case.depth * BLOCK;
    let len = (per_queue * case.queues).next_multiple_of(2 << 20);
    let region = b.alloc_mem_region(len).map_err(err("alloc region"))?;
    b.map_mem_region(&region).map_err(err("map region"))?;

    let warm = Duration::from_secs_f64(o.warmup);
    let meas = Duration::from_secs_f64(o.secs);
    let barrier = Barrier::new(case.queues + 1);
    let start_at = Instant::now() + Duration::from_millis(20);
    let phases = Phases {
        origin: start_at,
        warm_ns: warm.as_nanos() as u64,
        end_ns: (warm + meas).as_nanos() as u64,
    };
    let (cpu_a, cpu_b, results) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        let phases = &phases;
        let barrier = &barrier;
        for (i, q) in queues.into_iter().enumerate() {
            let g = Gen {
                q,
                base: region.addr + i * per_queue,
                blocks: capacity / BLOCK as u64,
                rng: 0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) << 32) ^ u64::from(pid),
                write: case.rw == Rw::Write,
            };
            handles.push(s.spawn(move || {
                barrier.wait();
                while Instant::now() < phases.origin {
                    std::hint::spin_loop();
                }
                generator(g, case, phases, stop)
            }));
        }
        barrier.wait();
        sleep_until(start_at + warm);
        let a = process_cpu_ns(pid);
        sleep_until(start_at + warm + meas);
        let b = process_cpu_ns(pid);
        let results: Vec<Res<ThreadStats>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("generator panicked".into()))
            })
            .collect();
        (a, b, results)
    });
    let mut hist = Hist::new();
    let (mut iops, mut cpu, mut busy, mut ios, mut errors) = (0.0, 0u64, 0u64, 0u64, 0u64);
    for r in results {
        let t = r?;
        hist.merge(&t.hist);
        iops += t.ios as f64 / (t.wall_ns.max(1) as f64 / 1e9);
        cpu += t.cpu_ns;
        busy += t.wall_ns.saturating_sub(t.wait_ns);
        ios += t.ios;
        errors += t.errors;
    }
    let (be_total, be_max) = cpu_delta(&cpu_a, &cpu_b);
    let be_ios = iops * o.secs;
    drop(b);
    let per = |ns: u64, n: f64| if n > 0.0 { ns as f64 / n } else { 0.0 };
    Ok(RunStats {
        iops,
        mean_ns: hist.mean(),
        p50_ns: hist.quantile(0.50),
        p99_ns: hist.quantile(0.99),
        backend_cpu_ns: per(be_total, be_ios),
        backend_thread_ns: per(be_max, be_ios),
        client_cpu_ns: per(cpu, ios as f64),
        client_busy_ns: per(busy, ios as f64),
        errors,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

// ---------------------------------------------------------------- report

fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

fn row(name: &str, r: &RunStats) -> String {
    format!(
        "{:<10} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}{}",
        name,
        r.iops,
        us(r.mean_ns),
        us(r.p50_ns as f64),
        us(r.p99_ns as f64),
        us(r.backend_cpu_ns),
        us(r.backend_thread_ns),
        us(r.client_cpu_ns),
        us(r.client_busy_ns),
        if r.errors > 0 {
            format!("  ({} errors)", r.errors)
        } else {
            String::new()
        }
    )
}

const HEADER: &str =
    "backend          IOPS  mean_us   p50_us   p99_us  cpu/IO thr/IO  gen_cpu gen_busy";

fn main() {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("iops: {e}\n{HELP}");
            std::process::exit(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    if let Err(e) = run(&o, &stop) {
        eprintln!("iops: {e}");
        std::process::exit(1);
    }
}

fn run(o: &Opts, stop: &AtomicBool) -> Res<()> {
    let tmp_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&tmp_root).map_err(err("tmp dir"))?;
    let tmp = tempfile::Builder::new()
        .prefix("iops-")
        .tempdir_in(&tmp_root)
        .map_err(err("tmp dir"))?;
    let max_q = o.queues.iter().copied().max().unwrap_or(1);
    println!(
        "vublk vs qemu-storage-daemon: random 4 KiB I/O, {} s per run after {} s warm-up, \
         best of {} (by IOPS), backends interleaved",
        o.secs, o.warmup, o.reps
    );
    for b in &o.backends {
        if let Impl::Vublk(p, own) = &b.imp {
            let args = [o.vublk_args.as_slice(), own.as_slice()].concat();
            println!("  {}: {} {}", b.name, p.display(), args.join(" "));
        }
    }
    println!(
        "  qsd: iothread poll-max-ns={QSD_POLL_MAX_NS}; {} CPUs; times in µs; cpu/IO = backend \
         process CPU per I/O (thr/IO: its busiest thread), gen_cpu / gen_busy = generator CPU and \
         non-waiting time per I/O per thread",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for &disk in &o.disks {
        let spec = match disk {
            DiskKind::Null => DiskSpec::Null,
            DiskKind::File if o.file.is_some() => {
                let p = o.file.clone().unwrap_or_default();
                println!("\ndata file {} (given)", p.display());
                DiskSpec::File(p)
            }
            DiskKind::File => {
                let p = tmp.path().join("data.img");
                if on_tmpfs(tmp.path()) {
                    println!(
                        "warning: {} is on tmpfs, the file runs measure no device",
                        tmp.path().display()
                    );
                }
                let t = Instant::now();
                create_data_file(&p, o.file_size)?;
                println!(
                    "\ndata file {} ({} MiB, written in {:.1} s)",
                    p.display(),
                    o.file_size >> 20,
                    t.elapsed().as_secs_f64()
                );
                DiskSpec::File(p)
            }
        };
        let mut daemons = Vec::new();
        for (i, b) in o.backends.iter().enumerate() {
            let sock = tmp.path().join(format!("{}-{i}.sock", b.name));
            daemons.push(Daemon::start(b, &spec, &sock, max_q, o)?);
        }
        let mut cases = Vec::new();
        for &mode in &o.modes {
            for &rw in &o.rws {
                for &queues in &o.queues {
                    for &depth in &o.depths {
                        cases.push(Case {
                            disk,
                            mode,
                            rw,
                            depth,
                            queues,
                        });
                    }
                }
            }
        }
        let nb = o.backends.len();
        let mut best: Vec<Vec<Option<RunStats>>> = vec![vec![None; nb]; cases.len()];
        for rep in 0..o.reps {
            for (ci, case) in cases.iter().enumerate() {
                for k in 0..nb {
                    // Alternate the order so neither backend always goes first.
                    let bi = if rep % 2 == 0 { k } else { nb - 1 - k };
                    if stop.load(Ordering::Relaxed) {
                        return Err("interrupted".into());
                    }
                    let d = &daemons[bi];
                    let r = run_case(&d.socket, d.pid(), *case, o, stop)
                        .map_err(|e| format!("{} {}: {e}", o.backends[bi].name, case.label()))?;
                    let slot = &mut best[ci][bi];
                    if slot.is_none_or(|b| r.iops > b.iops) {
                        *slot = Some(r);
                    }
                }
            }
            eprintln!("{disk:?} disk: repetition {}/{} done", rep + 1, o.reps);
        }
        drop(daemons);
        for (ci, case) in cases.iter().enumerate() {
            let mut block = format!("\n{}\n{HEADER}\n", case.label());
            for (bi, b) in o.backends.iter().enumerate() {
                if let Some(r) = &best[ci][bi] {
                    let _ = writeln!(block, "{}", row(&b.name, r));
                }
            }
            let qsd = o.backends.iter().position(|b| matches!(b.imp, Impl::Qsd));
            if let Some(q) = qsd.and_then(|q| best[ci][q]) {
                for (bi, b) in o.backends.iter().enumerate() {
                    if matches!(b.imp, Impl::Qsd) {
                        continue;
                    }
                    if let Some(r) = best[ci][bi] {
                        let _ = writeln!(
                            block,
                            "{:<10} IOPS x{:.2}  mean x{:.2}  p99 x{:.2}  cpu/IO x{:.2}",
                            format!("{}/qsd", b.name),
                            r.iops / q.iops,
                            r.mean_ns / q.mean_ns,
                            r.p99_ns as f64 / q.p99_ns as f64,
                            r.backend_cpu_ns / q.backend_cpu_ns
                        );
                    }
                }
            }
            print!("{block}");
        }
        io::stdout().flush().ok();
    }
    Ok(())
}
