//! Real-guest end-to-end tests: a Debian kernel boots under QEMU with a disk served by
//! vublk as `vhost-user-blk-pci` and runs checks and fio inside the guest.
//!
//! The pieces live in `tests/guest/`: `deps.sh` installs the Debian packages (QEMU 10
//! from bookworm-backports, the kernel, busybox, fio, e2fsprogs), `build-guest.sh`
//! builds and caches the guest (ELF vmlinux for PVH boot + initramfs), `init` and
//! `guest-test.sh` run inside the guest and print `E2E-...` markers on the serial
//! console. QEMU is started through `examples/qemu.sh`, the command line users copy.
//!
//! Each test skips (prints `SKIP: reason` and passes) only when not run as root or
//! when the packages cannot be installed. Guests run one at a time (a global lock):
//! TCG on two cores has no room for two.
//!
//! Run: `sudo cargo test --test guest_e2e -- --nocapture`
//! Environment:
//! - `VUBLK_E2E_BACKEND=qsd` runs the same scenarios against qemu-storage-daemon
//!   (the reference backend) instead of vublk;
//! - `VUBLK_E2E_SKIP_DEPS=1` does not run `deps.sh`;
//! - `VUBLK_E2E_TIMEOUT=SECS` hard limit for one guest (default 300).
//!
//! Logs (serial console, daemon output) and a one-line-per-scenario summary with boot
//! time, scenario time and the fio numbers go to `$CARGO_TARGET_TMPDIR/guest-e2e/`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const TMP: &str = env!("CARGO_TARGET_TMPDIR");

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// What the guest sees for vublk's discard and write-zeroes limits: Linux sets
/// `discard_max_bytes = max_discard_sectors * 512` and `write_zeroes_max_bytes =
/// max_write_zeroes_sectors * 512` from the virtio-blk config space. These mirror
/// `MAX_DISCARD_SECTORS` and `MAX_WRITE_ZEROES_SECTORS` in `src/virtio/mod.rs`
/// (kept as literals so that this test does not depend on the library's layout).
const VUBLK_DISCARD_MAX_BYTES: u64 = 0x3f_ffff * 512;
const VUBLK_WRITE_ZEROES_MAX_BYTES: u64 = 64 << 20;

// ---------------------------------------------------------------------------------
// Setup: packages, guest build, one guest at a time.

enum SetupError {
    Skip(String),
    Fail(String),
}

static SETUP: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static SETUP_SKIP: OnceLock<bool> = OnceLock::new();
static GUEST_LOCK: Mutex<()> = Mutex::new(());

fn run_setup() -> Result<PathBuf, SetupError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(SetupError::Skip(
            "not root (needs apt-get for deps.sh and QEMU with a vhost-user disk)".into(),
        ));
    }
    let guest_dir = Path::new(ROOT).join("tests/guest");
    if std::env::var_os("VUBLK_E2E_SKIP_DEPS").is_none() {
        let out = Command::new("bash")
            .arg(guest_dir.join("deps.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| SetupError::Skip(format!("cannot run deps.sh: {e}")))?;
        if !out.status.success() {
            return Err(SetupError::Skip(format!(
                "packages could not be installed (deps.sh: {}): {}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 10)
            )));
        }
    }
    let out = Command::new("bash")
        .arg(guest_dir.join("build-guest.sh"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SetupError::Fail(format!("cannot run build-guest.sh: {e}")))?;
    if !out.status.success() {
        return Err(SetupError::Fail(format!(
            "build-guest.sh failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let dir = PathBuf::from(dir);
    if !dir.join("vmlinux").is_file() || !dir.join("initramfs.cpio.gz").is_file() {
        return Err(SetupError::Fail(format!(
            "build-guest.sh printed {} without a guest in it",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The guest folder, or None (after printing "SKIP: reason") when this machine cannot
/// run guests. Panics when the packages are there but the guest cannot be built.
fn guest_or_skip() -> Option<PathBuf> {
    let res = SETUP.get_or_init(|| match run_setup() {
        Ok(p) => Ok(p),
        Err(SetupError::Skip(r)) => {
            let _ = SETUP_SKIP.set(true);
            Err(r)
        }
        Err(SetupError::Fail(r)) => Err(r),
    });
    match res {
        Ok(p) => Some(p.clone()),
        Err(r) if SETUP_SKIP.get().copied().unwrap_or(false) => {
            println!("SKIP: {r}");
            None
        }
        Err(r) => panic!("guest setup failed: {r}"),
    }
}

fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn guest_timeout() -> Duration {
    let secs = std::env::var("VUBLK_E2E_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

fn work_dir(scenario: &str) -> PathBuf {
    let d = Path::new(TMP).join("guest-e2e").join(scenario);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create scenario folder");
    d
}

// ---------------------------------------------------------------------------------
// The backend: vublk, or qemu-storage-daemon for comparison.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Vublk,
    Qsd,
}

impl Kind {
    fn from_env() -> Kind {
        match std::env::var("VUBLK_E2E_BACKEND").as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => Kind::Qsd,
            _ => Kind::Vublk,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Vublk => "vublk",
            Kind::Qsd => "qemu-storage-daemon",
        }
    }
}

#[derive(Clone, Debug)]
struct Disk {
    image: PathBuf,
    size: u64,
    queues: u32,
    /// Virtqueue size: QEMU's `queue-size` and vublk's `--queue-size`.
    queue_size: u32,
    /// Pass `--queue-size` to vublk (false: leave vublk at its default).
    set_daemon_queue_size: bool,
    read_only: bool,
    serial: Option<String>,
    /// Let vublk create the image (`--size`); otherwise the test creates it.
    daemon_creates: bool,
}

struct Backend {
    kind: Kind,
    disk: Disk,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Backend {
    fn new(kind: Kind, dir: &Path, disk: Disk) -> Backend {
        if (kind == Kind::Qsd || !disk.daemon_creates) && !disk.image.exists() {
            File::create(&disk.image)
                .and_then(|f| f.set_len(disk.size))
                .expect("create disk image");
        }
        Backend {
            kind,
            disk,
            socket: dir.join("vhost-user-blk.sock"),
            log: dir.join("daemon.log"),
            child: None,
            starts: 0,
        }
    }

    fn command(&self) -> Command {
        let d = &self.disk;
        match self.kind {
            Kind::Vublk => {
                let mut c = Command::new(VUBLK);
                c.arg("--socket")
                    .arg(&self.socket)
                    .arg("--disk")
                    .arg(&d.image)
                    .arg("--num-queues")
                    .arg(d.queues.to_string());
                if d.set_daemon_queue_size {
                    c.arg("--queue-size").arg(d.queue_size.to_string());
                }
                if d.daemon_creates {
                    c.arg("--size").arg(format!("{}M", d.size / MIB));
                }
                if d.read_only {
                    c.arg("--read-only");
                }
                if let Some(s) = &d.serial {
                    c.arg("--serial").arg(s);
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    c.env("RUST_LOG", "info");
                }
                c
            }
            Kind::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f,filename={},cache.direct=on,aio=io_uring{}",
                        d.image.display(),
                        if d.read_only { ",read-only=on" } else { "" }
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},num-queues={},writable={}",
                        self.socket.display(),
                        d.queues,
                        if d.read_only { "off" } else { "on" }
                    ));
                c
            }
        }
    }

    /// Start the daemon and wait until its socket listens.
    fn start(&mut self) {
        assert!(self.child.is_none(), "backend already running");
        if self.kind == Kind::Qsd {
            // qemu-storage-daemon does not bind over a stale socket file; vublk is
            // expected to cope with one itself (restart after SIGKILL).
            let _ = fs::remove_file(&self.socket);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let mut cmd = self.command();
        self.starts += 1;
        println!("[host] start #{} {:?}", self.starts, cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.kind.name()));
        self.child = Some(child);
        let t0 = Instant::now();
        while !unix_socket_listening(&self.socket) {
            if let Some(st) = self.try_wait() {
                panic!(
                    "{} exited ({st}) before listening; log:\n{}",
                    self.kind.name(),
                    tail(&fs::read_to_string(&self.log).unwrap_or_default(), 30)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{} did not listen on {} within 30 s",
                self.kind.name(),
                self.socket.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
        println!(
            "[host] {} listening after {:?}",
            self.kind.name(),
            t0.elapsed()
        );
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("backend not running").id() as i32
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten();
        if st.is_some() {
            self.child = None;
        }
        st
    }

    fn alive(&mut self) -> bool {
        let _ = self.try_wait();
        self.child.is_some()
    }

    /// Send `sig` and wait for the process to end.
    fn stop(&mut self, sig: i32, within: Duration) -> ExitStatus {
        let pid = self.pid();
        println!("[host] signal {sig} to {} (pid {pid})", self.kind.name());
        // SAFETY: pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, sig) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                println!(
                    "[host] {} exited: {st} after {:?}",
                    self.kind.name(),
                    t0.elapsed()
                );
                return st;
            }
            if t0.elapsed() > within {
                let _ = self.child.as_mut().map(|c| c.kill());
                let st = self.child.take().and_then(|mut c| c.wait().ok());
                panic!(
                    "{} did not exit within {within:?} after signal {sig} (killed: {st:?})",
                    self.kind.name()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether a unix socket is listening at `path` (from /proc/net/unix, without
/// connecting: a probe connection would look like a frontend to the daemon).
fn unix_socket_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & SO_ACCEPTCON != 0)
    })
}

// ---------------------------------------------------------------------------------
// The guest: QEMU through examples/qemu.sh, serial console on stdout.

#[derive(Clone, Debug)]
struct GuestParams {
    steps: &'static str,
    queues: u32,
    queue_size: u32,
    size: u64,
    read_only: bool,
    discard_max: String,
    wz_max: String,
    serial: Option<String>,
    fio_job: &'static str,
    fio_size: &'static str,
    fio_rate: &'static str,
    fio_bs: &'static str,
    mem: &'static str,
    /// A hugetlbfs mount to back guest RAM with (memfd otherwise).
    mem_path: Option<PathBuf>,
}

impl GuestParams {
    fn for_disk(kind: Kind, disk: &Disk, steps: &'static str) -> GuestParams {
        let (discard_max, wz_max) = match (kind, disk.read_only) {
            (Kind::Vublk, false) => (
                VUBLK_DISCARD_MAX_BYTES.to_string(),
                VUBLK_WRITE_ZEROES_MAX_BYTES.to_string(),
            ),
            (Kind::Qsd, false) => ("nonzero".into(), "nonzero".into()),
            // What a read-only disk reports for discard is up to the backend.
            (_, true) => ("any".into(), "any".into()),
        };
        GuestParams {
            steps,
            queues: disk.queues,
            queue_size: disk.queue_size,
            size: disk.size,
            read_only: disk.read_only,
            discard_max,
            wz_max,
            serial: if kind == Kind::Vublk {
                disk.serial.clone()
            } else {
                None
            },
            fio_job: "verify",
            fio_size: "128M",
            fio_rate: "0",
            fio_bs: "4k-128k",
            mem: "1G",
            mem_path: None,
        }
    }

    fn append(&self) -> String {
        let mut a = format!(
            "console=ttyS0 panic=-1 loglevel=4 e2e.steps={} e2e.queues={} e2e.size={} \
             e2e.ro={} e2e.discard_max={} e2e.wz_max={} e2e.fio_job={} e2e.fio_size={} \
             e2e.fio_rate={} e2e.fio_bs={}",
            self.steps,
            self.queues,
            self.size,
            u8::from(self.read_only),
            self.discard_max,
            self.wz_max,
            self.fio_job,
            self.fio_size,
            self.fio_rate,
            self.fio_bs
        );
        if let Some(s) = &self.serial {
            a.push_str(&format!(" e2e.serial={s}"));
        }
        a
    }
}

struct Guest {
    child: Option<Child>,
    rx: Receiver<String>,
    seen: Vec<String>,
    started: Instant,
    booted_after: Option<Duration>,
    deadline: Instant,
}

#[derive(Debug)]
struct Outcome {
    pass: bool,
    /// The host killed this guest on purpose (frontend crash scenario).
    killed: bool,
    result_line: String,
    wall: Duration,
    booted_after: Option<Duration>,
    lines: Vec<String>,
}

impl Outcome {
    fn fio_lines(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("E2E-FIO "))
            .filter(|l| l.starts_with("read:") || l.starts_with("write:"))
            .map(|l| l.split(" (").next().unwrap_or(l).to_string())
            .collect()
    }
    fn step_times(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("E2E-STEP "))
            .filter(|l| !l.contains(" BEGIN"))
            .map(str::to_string)
            .collect()
    }
}

impl Guest {
    fn spawn(guest: &Path, socket: &Path, p: &GuestParams, log: PathBuf) -> Guest {
        let mut cmd = Command::new("bash");
        cmd.arg(Path::new(ROOT).join("examples/qemu.sh"))
            .env("VUBLK_SOCKET", socket)
            .env("NUM_QUEUES", p.queues.to_string())
            .env("QUEUE_SIZE", p.queue_size.to_string())
            .env("MEM", p.mem)
            .env("MEM_PATH", p.mem_path.as_deref().unwrap_or(Path::new("")))
            .env("KERNEL", guest.join("vmlinux"))
            .env("INITRD", guest.join("initramfs.cpio.gz"))
            .env("APPEND", p.append())
            .env("SERIAL", "stdio")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        println!("[host] guest: {}", p.append());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("start QEMU (examples/qemu.sh)");
        let (tx, rx) = mpsc::channel();
        let logf = File::create(&log).expect("create serial log");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for (stream, tag) in [
            (Box::new(out) as Box<dyn Read + Send>, ""),
            (Box::new(err), "qemu: "),
        ] {
            let tx = tx.clone();
            let mut logf = logf.try_clone().expect("dup serial log");
            thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf)
                                .trim_end_matches(['\r', '\n'])
                                .replace('\r', "");
                            let line = format!("{tag}{line}");
                            let _ = writeln!(logf, "{line}");
                            if tx.send(line).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
        Guest {
            child: Some(child),
            rx,
            seen: Vec::new(),
            started,
            booted_after: None,
            deadline: started + guest_timeout(),
        }
    }

    fn note(&mut self, line: String) {
        println!("[guest] {line}");
        if self.booted_after.is_none() && line.starts_with("E2E-BOOTED") {
            self.booted_after = Some(self.started.elapsed());
        }
        self.seen.push(line);
    }

    /// Read console lines until one contains `needle`. Err when QEMU ended first or
    /// the guest's hard deadline passed.
    fn wait_for(&mut self, needle: &str) -> Result<String, String> {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return Ok(l.clone());
        }
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.note(line.clone());
                    if hit {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "timed out after {:?} waiting for {needle:?}",
                        guest_timeout()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("QEMU ended before {needle:?}"))
                }
            }
        }
    }

    /// Whether a line containing `needle` has arrived (reads what is buffered).
    fn has_seen(&mut self, needle: &str) -> bool {
        while let Ok(l) = self.rx.try_recv() {
            self.note(l);
        }
        self.seen.iter().any(|l| l.contains(needle))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        while let Ok(l) = self.rx.try_recv() {
            self.note(l);
        }
    }

    /// Wait for the guest's result marker and for QEMU to exit.
    fn finish(mut self) -> Outcome {
        let res = self.wait_for("E2E-RESULT:");
        let (pass, result_line) = match res {
            Ok(l) => (l.contains("E2E-RESULT: PASS"), l),
            Err(e) => (false, e),
        };
        // The guest powers off right after the marker; give QEMU a moment to exit.
        let t0 = Instant::now();
        let mut exited = None;
        while let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                exited = Some(st);
                self.child = None;
                break;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let wall = self.started.elapsed();
        self.kill();
        let pass = pass && exited.is_some_and(|s| s.success());
        let result_line = match exited {
            Some(s) if !s.success() => format!("{result_line} (QEMU exited {s})"),
            None if pass || result_line.starts_with("E2E-RESULT") => {
                format!("{result_line} (QEMU did not exit; killed)")
            }
            _ => result_line,
        };
        Outcome {
            pass,
            killed: false,
            result_line,
            wall,
            booted_after: self.booted_after,
            lines: std::mem::take(&mut self.seen),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------
// Reporting.

fn report(scenario: &str, kind: Kind, total: Duration, runs: &[&Outcome]) {
    let mut s = format!(
        "E2E-SUMMARY scenario={scenario} backend={} total={:.1}s",
        kind.name(),
        total.as_secs_f64()
    );
    for (i, o) in runs.iter().enumerate() {
        s.push_str(&format!(
            " | guest{}: {} boot={} wall={:.1}s steps=[{}] fio=[{}]",
            i + 1,
            match (o.killed, o.pass) {
                (true, _) => "KILLED",
                (false, true) => "PASS",
                (false, false) => "FAIL",
            },
            o.booted_after
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            o.wall.as_secs_f64(),
            o.step_times().join("; "),
            o.fio_lines().join("; ")
        ));
    }
    println!("{s}");
    let path = Path::new(TMP).join("guest-e2e/summary.txt");
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{s}");
    }
}

fn assert_pass(o: &Outcome, what: &str, log: &Path) {
    assert!(
        o.pass,
        "{what}: {}\n--- last serial lines ({}) ---\n{}",
        o.result_line,
        log.display(),
        tail(&o.lines.join("\n"), 60)
    );
}

// ---------------------------------------------------------------------------------
// Scenarios.

/// Run one guest against a freshly started backend; `during` runs on the host while
/// the guest runs (it gets the backend and the guest; the guest's lines are read as
/// it waits for markers).
fn scenario(
    name: &str,
    disk: impl FnOnce(&Path) -> Disk,
    steps: &'static str,
    tune: impl FnOnce(&mut GuestParams),
    during: impl FnOnce(&mut Backend, &mut Guest),
) {
    let Some(guest) = guest_or_skip() else {
        return;
    };
    let _one = one_guest_at_a_time();
    let kind = Kind::from_env();
    let t0 = Instant::now();
    let dir = work_dir(name);
    let disk = disk(&dir);
    let mut be = Backend::new(kind, &dir, disk);
    be.start();
    let mut p = GuestParams::for_disk(kind, &be.disk, steps);
    tune(&mut p);
    let log = dir.join("serial.log");
    let mut vm = Guest::spawn(&guest, &be.socket, &p, log.clone());
    during(&mut be, &mut vm);
    let o = vm.finish();
    let alive = be.alive();
    report(name, kind, t0.elapsed(), &[&o]);
    assert_pass(&o, name, &log);
    assert!(
        alive,
        "{} is no longer running after the guest",
        kind.name()
    );
}

fn rw_disk(queues: u32) -> impl FnOnce(&Path) -> Disk {
    move |dir| Disk {
        image: dir.join("disk.img"),
        size: GIB,
        queues,
        queue_size: 256,
        set_daemon_queue_size: true,
        read_only: false,
        serial: Some("vublk-e2e".into()),
        daemon_creates: true,
    }
}

/// Writable 1 GiB disk, two queues (two vCPUs): geometry, fio write+verify with one
/// job per queue, discard and write-zeroes, ext4.
#[test]
fn writable_two_queues_verify_fs_discard() {
    scenario(
        "rw-2q",
        rw_disk(2),
        "props,fio,discard,fs",
        |_| {},
        |_, _| {},
    );
}

/// Huge pages reserved and a hugetlbfs mounted for one scenario; both are
/// given back on drop, even when the scenario fails.
struct HugePages {
    mount: PathBuf,
    old_nr: String,
}

impl HugePages {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    fn reserve(dir: &Path, pages: u64) -> Result<HugePages, String> {
        let old_nr = std::fs::read_to_string(Self::NR).map_err(|e| e.to_string())?;
        let want = old_nr.trim().parse::<u64>().unwrap_or(0) + pages;
        std::fs::write(Self::NR, want.to_string()).map_err(|e| e.to_string())?;
        let mount = dir.join("hugepages");
        let _ = std::fs::create_dir_all(&mount);
        let guard = HugePages { mount, old_nr };
        let free = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if free < pages {
            return Err(format!("only {free} huge pages could be reserved"));
        }
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "vublk-e2e-huge"])
            .arg(&guard.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("cannot mount hugetlbfs".into());
        }
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = std::fs::write(Self::NR, self.old_nr.trim());
    }
}

/// Guest RAM on hugetlbfs (`memory-backend-file,mem-path=...,share=on`)
/// instead of a memfd: vublk maps it the same way and the data checks pass.
#[test]
fn hugetlbfs_guest_ram() {
    let dir = work_dir("hugetlbfs-pages");
    let huge = match HugePages::reserve(&dir, 264) {
        Ok(h) => h,
        Err(e) => {
            println!("SKIP: huge pages: {e}");
            return;
        }
    };
    let mount = huge.mount.clone();
    scenario(
        "hugetlbfs",
        rw_disk(1),
        "props,fio",
        move |p| {
            p.mem = "512M";
            p.mem_path = Some(mount);
            p.fio_size = "64M";
        },
        |_, _| {},
    );
    drop(huge);
}

/// Read-only disk: geometry and RO flag, the host's data reads back, writes fail.
#[test]
fn read_only_disk() {
    scenario(
        "ro",
        |dir| {
            let image = dir.join("ro.img");
            let size = 256 * MIB;
            let f = File::create(&image).expect("create image");
            f.set_len(size).expect("size image");
            f.write_all_at(b"VUBLK-E2E-RO", 0).expect("write magic");
            f.write_all_at(b"VUBLK-E2E-RO", size - 4096)
                .expect("write magic");
            Disk {
                image,
                size,
                queues: 1,
                queue_size: 256,
                set_daemon_queue_size: true,
                read_only: true,
                serial: Some("vublk-ro".into()),
                daemon_creates: false,
            }
        },
        "props,ro",
        |_| {},
        |_, _| {},
    );
}

/// QEMU at its default queue size (128) and vublk at its defaults: what a user gets
/// who adds the disk without tuning. The guest sizes its requests from seg_max, so
/// large requests (1 MiB dd, 1 MiB fio blocks) must still work.
#[test]
fn qemu_default_queue_size_large_requests() {
    scenario(
        "qemu-qs128",
        |dir| Disk {
            queue_size: 128,
            set_daemon_queue_size: false,
            ..rw_disk(1)(dir)
        },
        "props,fio,discard",
        |p| p.fio_bs = "1M-1M",
        |_, _| {},
    );
}

/// Guest parameters for the runs that keep fio busy while the host acts: 2 jobs of
/// 192 MiB each at 24 MiB/s, so fio writes for about 8 s at full speed, longer with
/// the stalls, and verifies as it goes (verify_backlog).
fn under_load(p: &mut GuestParams) {
    p.fio_job = "crash";
    p.fio_size = "192M";
    p.fio_rate = "24m";
}

/// Wait until fio runs in the guest, then a little longer so requests are in flight.
fn wait_fio_running(vm: &mut Guest) {
    vm.wait_for("E2E-STEP fio BEGIN")
        .unwrap_or_else(|e| panic!("guest never started fio: {e}"));
    thread::sleep(Duration::from_millis(1500));
}

fn assert_fio_still_running(vm: &mut Guest, what: &str) {
    assert!(
        !vm.has_seen("E2E-STEP fio OK") && !vm.has_seen("E2E-STEP fio FAIL"),
        "fio ended before {what}: the scenario did not test I/O across it"
    );
}

/// SIGKILL vublk three times under fio write+verify; each time a new vublk starts on
/// the same socket, QEMU reconnects, and the in-flight requests are resubmitted
/// (INFLIGHT_SHMFD). fio must finish with no I/O error and no verify failure.
#[test]
fn sigkill_restart_under_fio() {
    scenario(
        "sigkill-x3",
        rw_disk(2),
        "props,fio",
        under_load,
        |be, vm| {
            wait_fio_running(vm);
            for i in 1..=3 {
                assert_fio_still_running(vm, &format!("kill #{i}"));
                be.stop(libc::SIGKILL, Duration::from_secs(10));
                be.start();
                thread::sleep(Duration::from_millis(1500));
            }
        },
    );
}

/// SIGTERM vublk under fio, start it again: a clean restart loses no I/O either.
#[test]
fn sigterm_restart_under_fio() {
    scenario("sigterm", rw_disk(2), "props,fio", under_load, |be, vm| {
        wait_fio_running(vm);
        assert_fio_still_running(vm, "SIGTERM");
        let st = be.stop(libc::SIGTERM, Duration::from_secs(20));
        assert!(
            st.success() || be.kind == Kind::Qsd,
            "vublk exited with {st} on SIGTERM"
        );
        be.start();
    });
}

/// QEMU dies (SIGKILL) while the guest runs fio: the daemon keeps running and serves
/// the next QEMU, whose guest passes write+verify and the filesystem check.
#[test]
fn frontend_crash_then_new_frontend() {
    let Some(guest) = guest_or_skip() else {
        return;
    };
    let _one = one_guest_at_a_time();
    let kind = Kind::from_env();
    let name = "qemu-crash";
    let t0 = Instant::now();
    let dir = work_dir(name);
    let mut be = Backend::new(kind, &dir, rw_disk(2)(&dir));
    be.start();

    let mut p1 = GuestParams::for_disk(kind, &be.disk, "props,fio");
    under_load(&mut p1);
    let log1 = dir.join("serial-1.log");
    let mut vm1 = Guest::spawn(&guest, &be.socket, &p1, log1);
    wait_fio_running(&mut vm1);
    assert_fio_still_running(&mut vm1, "the QEMU crash");
    println!("[host] SIGKILL QEMU");
    vm1.kill();
    let first = Outcome {
        pass: true,
        killed: true,
        result_line: "killed".into(),
        wall: vm1.started.elapsed(),
        booted_after: vm1.booted_after,
        lines: std::mem::take(&mut vm1.seen),
    };
    drop(vm1);
    thread::sleep(Duration::from_secs(1));
    assert!(be.alive(), "{} died with its frontend", kind.name());
    assert!(
        unix_socket_listening(&be.socket),
        "{} no longer listens after its frontend died",
        kind.name()
    );

    let p2 = GuestParams::for_disk(kind, &be.disk, "props,fio,fs");
    let log2 = dir.join("serial-2.log");
    let vm2 = Guest::spawn(&guest, &be.socket, &p2, log2.clone());
    let second = vm2.finish();
    let alive = be.alive();
    report(name, kind, t0.elapsed(), &[&first, &second]);
    assert_pass(&second, "second QEMU", &log2);
    assert!(
        alive,
        "{} is no longer running after the second guest",
        kind.name()
    );
}
