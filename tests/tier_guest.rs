//! The idle page tracking tracker, on a kernel that has it.
//!
//! The host kernel has no page_idle, so this test boots the small guest
//! kernel of `../shared/guest-kernel/` (CONFIG_IDLE_PAGE_TRACKING) under TCG
//! with an initramfs built here: busybox-static plus this very test binary,
//! rebuilt statically (`-C target-feature=+crt-static`, its own target dir).
//! Inside the guest the binary runs again with `VUBLK_TIER_IN_GUEST=1`: a
//! child process holds a 64 MiB shared memfd and keeps 20% of its pages hot;
//! the page_idle tracker must see exactly those as accessed, and the
//! controller with it must page the rest out to zram and keep the hot set.
//!
//! Without the kernel, QEMU or busybox-static the test prints SKIP and why.
//! Kernel: `$VUBLK_GUEST_KERNEL`, else `../shared/guest-kernel/bzImage`
//! relative to the package root.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vublk::tier::maps::Selector;
use vublk::tier::page_idle::PageIdle;
use vublk::tier::pages::{Access, BitSet, PageTable};
use vublk::tier::policy::{Bytes, Dur, Policy, TierSpec, TrackerChoice};
use vublk::tier::status::Status;
use vublk::tier::sys::{self, SharedMap};
use vublk::tier::target::Target;
use vublk::tier::tracker::{ScanInput, Tracker};
use vublk::tier::zram::ZramSwap;
use vublk::tier::{Controller, Options};

const IN_GUEST: &str = "VUBLK_TIER_IN_GUEST";
const CHILD_ENV: &str = "VUBLK_TIER_GUEST_CHILD";
const TEST_NAME: &str = "page_idle_tracker_in_guest_kernel";
const SIZE: usize = 64 << 20;
const HOT_EVERY: usize = 5;
const QEMU_TIMEOUT: Duration = Duration::from_secs(300);

fn is_hot(p: usize) -> bool {
    p % HOT_EVERY == 0
}

fn pattern(p: usize, w: usize) -> u64 {
    ((p as u64) << 20 | w as u64) ^ 0x1d1e_0000_0000_0000
}

fn words(ps: usize) -> [usize; 3] {
    [0, ps / 16, ps / 8 - 1]
}

// ---------------------------------------------------------------- host side

/// A newc cpio archive writer (enough for an initramfs).
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, data: &[u8]) {
        self.entry(name, 0o100755, data, (0, 0));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "TIER-GUEST: booted $(uname -r)"
if [ -e /sys/block/zram0 ]; then
    echo 128M > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0
fi
test=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^tier.test=//p')
VUBLK_TIER_IN_GUEST=1 /tier-test --exact "$test" --nocapture --test-threads=1
echo "TIER-GUEST-RC=$?"
poweroff -f
"#;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn find_kernel() -> Result<PathBuf, String> {
    let k = match std::env::var_os("VUBLK_GUEST_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => manifest_dir().join("../shared/guest-kernel/bzImage"),
    };
    if k.is_file() {
        Ok(k)
    } else {
        Err(format!(
            "guest kernel {} not found (set VUBLK_GUEST_KERNEL)",
            k.display()
        ))
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn find_busybox() -> Result<PathBuf, String> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let Ok(bytes) = std::fs::read(p) else {
            continue;
        };
        // A dynamic ELF names its loader in PT_INTERP.
        if bytes.windows(14).any(|w| w == b"/lib64/ld-linu") {
            continue;
        }
        return Ok(PathBuf::from(p));
    }
    Err("no static busybox (install busybox-static)".into())
}

/// Build this test binary statically; returns its path.
fn build_static() -> PathBuf {
    let target_dir = manifest_dir().join("target-tier-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(manifest_dir())
        .args([
            "test",
            "--no-run",
            "--test",
            "tier_guest",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--message-format=json",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo for the static build");
    assert!(
        out.status.success(),
        "static build of the test binary failed"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "tier_guest" {
            if let Some(exe) = v["executable"].as_str() {
                return PathBuf::from(exe);
            }
        }
    }
    panic!("cargo did not report the static test executable");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    w.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

/// What both guest tests need: the kernel, QEMU and an initramfs holding
/// busybox and this binary built statically. Built once per test process.
struct Prepared {
    kernel: PathBuf,
    qemu: PathBuf,
    initrd: PathBuf,
    _dir: tempfile::TempDir,
}

static PREPARED: OnceLock<Result<Prepared, String>> = OnceLock::new();
/// One TCG guest at a time: two cores have no room for two.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

fn prepare() -> Result<&'static Prepared, String> {
    PREPARED
        .get_or_init(|| {
            let kernel = find_kernel()?;
            let qemu = which("qemu-system-x86_64")
                .ok_or("qemu-system-x86_64 not installed (tests/guest/deps.sh)")?;
            let busybox = find_busybox()?;
            let t0 = Instant::now();
            let exe = build_static();
            println!(
                "static build of the test binary: {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            let mut cpio = Cpio::new();
            for d in ["bin", "dev", "proc", "sys", "tmp"] {
                cpio.dir(d);
            }
            cpio.entry("dev/console", 0o020600, &[], (5, 1));
            cpio.file("bin/busybox", &std::fs::read(&busybox).unwrap());
            cpio.file("init", INIT.as_bytes());
            cpio.file("tier-test", &std::fs::read(&exe).unwrap());
            let dir = tempfile::tempdir().unwrap();
            let initrd = dir.path().join("initrd.cpio.gz");
            std::fs::write(&initrd, gzip(&cpio.finish())).unwrap();
            Ok(Prepared {
                kernel,
                qemu,
                initrd,
                _dir: dir,
            })
        })
        .as_ref()
        .map_err(|e| e.clone())
}

/// Lines of a guest's serial console, read on a thread.
struct Serial {
    rx: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Serial {
    fn new(out: std::process::ChildStdout) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            log: Vec::new(),
        }
    }

    /// The next line, or None when the guest is gone or `deadline` passed.
    fn next(&mut self, deadline: Instant) -> Option<String> {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    println!("guest| {l}");
                    self.log.push(l.clone());
                    return Some(l);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(_) if Instant::now() > deadline => return None,
                Err(_) => {}
            }
        }
    }

    /// Read until a line contains `text`; returns that line.
    fn wait_for(&mut self, text: &str, deadline: Instant) -> String {
        loop {
            match self.next(deadline) {
                Some(l) if l.contains(text) => return l,
                Some(_) => {}
                None => panic!("guest: no {text:?} before the deadline or the end"),
            }
        }
    }

    /// Read to the end; returns the in-guest test's exit code.
    fn finish(&mut self, deadline: Instant) -> Option<i32> {
        let mut rc = None;
        while let Some(l) = self.next(deadline) {
            if let Some(v) = l.strip_prefix("TIER-GUEST-RC=") {
                rc = v.trim().parse().ok();
            }
        }
        rc
    }
}

/// A child killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn host_side() {
    let p = match prepare() {
        Ok(p) => p,
        Err(e) => return println!("SKIP {TEST_NAME}: {e}"),
    };
    let _one = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t1 = Instant::now();
    let mut q = Killed(
        Command::new(&p.qemu)
            .args([
                "-M",
                "q35",
                "-accel",
                "tcg,thread=multi",
                "-cpu",
                "max",
                "-smp",
                "2",
                "-m",
                "1G",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&p.kernel)
            .arg("-initrd")
            .arg(&p.initrd)
            .args([
                "-append",
                &format!("console=ttyS0 panic=-1 quiet tier.test={TEST_NAME}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting QEMU"),
    );
    let mut serial = Serial::new(q.0.stdout.take().unwrap());
    let rc = serial.finish(Instant::now() + QEMU_TIMEOUT);
    println!("{TEST_NAME}: guest run {:.1} s", t1.elapsed().as_secs_f64());
    let log = &serial.log;
    assert!(
        log.iter().any(|l| l.contains("TIER-GUEST: booted")),
        "guest did not boot"
    );
    assert_eq!(rc, Some(0), "the in-guest test failed (see guest| lines)");
    assert!(
        log.iter().any(|l| l.contains("TIER-GUEST-PASS")),
        "the in-guest test did not report its checks"
    );
}

// --------------------------------------------------------------- guest side

/// Not a test: the body of the in-guest child. A no-op elsewhere.
#[test]
fn guest_child_helper() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child_main();
    }
}

fn child_main() -> ! {
    let ps = sys::page_size();
    let pages = SIZE / ps;
    let file = sys::memfd_create("guest-idle-test", SIZE as u64).unwrap();
    let map = Arc::new(SharedMap::new(file.as_fd(), SIZE, 0, true).unwrap());
    for p in 0..pages {
        for w in words(ps) {
            map.write_u64(p * ps + w * 8, pattern(p, w)).unwrap();
        }
    }
    let rounds = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicBool::new(false));
    {
        let (map, rounds, bad) = (map.clone(), rounds.clone(), bad.clone());
        std::thread::spawn(move || loop {
            for p in (0..pages).filter(|&p| is_hot(p)) {
                if map.read_u64(p * ps).unwrap_or(0) != pattern(p, 0) {
                    bad.store(true, Ordering::SeqCst);
                }
            }
            rounds.fetch_add(1, Ordering::SeqCst);
            // Sleeping switches context, which (under TCG) flushes the
            // soft TLB: see point 4 of the guest kernel's README.
            std::thread::sleep(Duration::from_millis(20));
        });
    }
    let out = std::io::stdout();
    let say = |s: String| {
        let mut o = out.lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };
    say(format!("READY {:x}", map.addr()));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "round" => {
                let r0 = rounds.load(Ordering::SeqCst);
                while rounds.load(Ordering::SeqCst) < r0 + 2 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                say("ROUND".into());
            }
            "verify" => {
                let mut res = if bad.load(Ordering::SeqCst) {
                    "VERIFY BAD toucher".to_string()
                } else {
                    "VERIFY OK".to_string()
                };
                'o: for p in 0..pages {
                    for w in words(ps) {
                        if map.read_u64(p * ps + w * 8).unwrap_or(0) != pattern(p, w) {
                            res = format!("VERIFY BAD page {p} word {w}");
                            break 'o;
                        }
                    }
                }
                say(res);
            }
            _ => break,
        }
    }
    std::process::exit(0);
}

struct Guest {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Guest {
    fn spawn() -> (Guest, u64) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "guest_child_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env_remove(IN_GUEST)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut g = Guest {
            child,
            stdin,
            stdout,
        };
        let l = g.read_until("READY");
        let addr = u64::from_str_radix(l.trim_start_matches("READY ").trim(), 16).unwrap();
        (g, addr)
    }

    fn read_until(&mut self, prefix: &str) -> String {
        loop {
            let mut l = String::new();
            assert!(self.stdout.read_line(&mut l).unwrap() > 0, "child exited");
            if let Some(k) = l.find(prefix) {
                return l[k..].trim().to_string();
            }
        }
    }

    fn cmd(&mut self, c: &str, reply: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        self.read_until(reply)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (hot accessed, hot idle, hot unknown, cold accessed, cold idle, cold unknown)
type Counts = [usize; 6];

fn tracker_scan(t: &Target, tr: &mut PageIdle, pages: &mut PageTable) -> Counts {
    let mut pm = Vec::new();
    t.read_pagemap(&mut pm).unwrap();
    let mut res = BitSet::new(t.pages());
    t.residency(&mut res).unwrap();
    // Age every page by one first, so that "accessed" (age 0), "idle"
    // (age + 1) and "unknown" (age unchanged) are told apart.
    for i in 0..t.pages() {
        pages.observe(i, Access::Idle);
    }
    let before: Vec<u8> = (0..t.pages()).map(|i| pages.age(i)).collect();
    tr.scan(ScanInput {
        target: t,
        pagemap: &pm,
        resident: &res,
        pages,
    })
    .unwrap();
    let mut c = [0usize; 6];
    for (i, &b) in before.iter().enumerate() {
        let a = pages.age(i);
        let k = if a == 0 {
            0
        } else if a == b.saturating_add(1) {
            1
        } else {
            2
        };
        c[if is_hot(i) { k } else { 3 + k }] += 1;
    }
    c
}

fn guest_side() {
    println!(
        "in guest: {}",
        std::fs::read_to_string("/proc/version")
            .unwrap_or_default()
            .trim()
    );
    PageIdle::check().expect("page_idle must be available in the guest kernel");
    let ps = sys::page_size();
    let pages = SIZE / ps;
    let (hot_n, cold_n) = (
        (0..pages).filter(|&p| is_hot(p)).count(),
        (0..pages).filter(|&p| !is_hot(p)).count(),
    );
    let (mut g, addr) = Guest::spawn();
    let pid = g.child.id() as i32;
    g.cmd("round", "ROUND");

    // 1. The tracker alone: mark, wait, read back; three times.
    let t = Target::open(pid, &Selector::Auto).unwrap();
    assert_eq!(t.region().start, addr);
    let mut tr = PageIdle::new(t.pages()).unwrap();
    let mut pt = PageTable::new(t.pages());
    let first = tracker_scan(&t, &mut tr, &mut pt);
    assert_eq!(
        first[0] + first[1] + first[3] + first[4],
        0,
        "first scan only marks: {first:?}"
    );
    for k in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        g.cmd("round", "ROUND");
        let t0 = Instant::now();
        let c = tracker_scan(&t, &mut tr, &mut pt);
        println!(
            "page_idle scan {k}: hot accessed/idle/unknown {}/{}/{}, cold {}/{}/{} ({:.1} ms)",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            t0.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(c[3], 0, "cold pages read accessed");
        assert!(c[4] * 100 >= cold_n * 99, "cold pages not idle: {c:?}");
        assert!(
            c[0] * 100 >= hot_n * 95,
            "hot pages not seen accessed: {c:?}"
        );
    }

    // 2. The controller with it: cold pages out to zram, the hot set stays.
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    assert!(swaps.contains("zram"), "no zram swap in the guest: {swaps}");
    let policy = Policy {
        scan_interval: Dur(Duration::from_millis(300)),
        cold_age: 2,
        tracker: TrackerChoice::PageIdle,
        max_move_rate: Bytes(1 << 30),
        refault_budget: Bytes(1 << 30),
        psi_limit: 0.0,
        tiers: vec![TierSpec::Zram],
        ..Policy::default()
    };
    let mut c = Controller::new(Options {
        pid,
        selector: Selector::Auto,
        policy,
        status_path: None,
        vublk_sockets: vec![],
        max_scans: Some(8),
    })
    .unwrap();
    for _ in 0..8 {
        c.scan_once(&|| false).unwrap();
        let st = c.status();
        println!(
            "  scan {}: resident {} KiB, moved {} KiB, refaulted {} KiB, skipped {}, wss {:?} KiB",
            st.scans,
            st.bytes.resident >> 10,
            st.bytes.moved_total >> 10,
            st.bytes.refaulted_total >> 10,
            st.pages_skipped_total,
            st.bytes.working_set.map(|w| w >> 10)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let st = c.status().clone();
    g.cmd("round", "ROUND");
    let mut res = BitSet::new(t.pages());
    t.residency(&mut res).unwrap();
    let hot_res = (0..pages).filter(|&p| is_hot(p) && res.get(p)).count();
    let cold_res = (0..pages).filter(|&p| !is_hot(p) && res.get(p)).count();
    println!(
        "controller: tracker {}, {} scans, moved {} KiB, refaulted {} KiB, skipped {}, wss {:?} KiB, \
         hot resident {hot_res}/{hot_n}, cold resident {cold_res}/{cold_n}, scan {:.1} ms/GiB",
        st.tracker.as_ref().map_or("?", |t| t.name.as_str()),
        st.scans,
        st.bytes.moved_total >> 10,
        st.bytes.refaulted_total >> 10,
        st.pages_skipped_total,
        st.bytes.working_set.map(|w| w >> 10),
        st.time.scan_ms_per_gib
    );
    assert_eq!(
        st.tracker.as_ref().map(|t| t.name.as_str()),
        Some("page-idle")
    );
    assert_eq!(hot_res, hot_n, "hot pages resident");
    assert!(
        cold_res * 100 <= cold_n,
        "cold pages resident {cold_res}/{cold_n}"
    );
    assert!(
        st.bytes.refaulted_total * 20 <= (hot_n * ps) as u64,
        "page_idle should not move hot pages: {} refaulted",
        st.bytes.refaulted_total
    );
    assert_eq!(g.cmd("verify", "VERIFY"), "VERIFY OK");
    println!("TIER-GUEST-PASS");
}

#[test]
fn page_idle_tracker_in_guest_kernel() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    if std::env::var_os(IN_GUEST).is_some() {
        guest_side();
    } else {
        host_side();
    }
}

#[test]
fn cpio_newc_layout() {
    let mut c = Cpio::new();
    c.file("a", b"xyz");
    let out = c.finish();
    assert_eq!(&out[..6], b"070701");
    assert_eq!(out.len() % 4, 0);
    // Header 110 bytes + "a\0" padded to 112, data 3 padded to 4.
    assert_eq!(&out[110..112], b"a\0");
    assert_eq!(&out[112..115], b"xyz");
    assert_eq!(&out[116..122], b"070701");
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).is_dir());
}

// ------------------------------------------ a QEMU guest served by vublk

const QEMU_TEST: &str = "qemu_guest_ram_moves_while_vublk_serves_disk";
/// Guest memory the in-guest workload fills; a fifth of it stays hot.
const WL_SIZE: usize = 384 << 20;
/// Disk blocks the workload cycles through (4 KiB each).
const WL_BLOCKS: u64 = 4096;

/// The in-guest workload: fills WL_SIZE with a pattern, keeps every 5th page
/// hot, writes, syncs and reads back disk blocks on /dev/vda (served by
/// vublk) with the guest page cache dropped in between, and prints a tick
/// every second. On "verify" from the console it checks every page.
fn guest_workload() {
    let ps = sys::page_size();
    let pages = WL_SIZE / ps;
    let file = sys::memfd_create("workload", WL_SIZE as u64).unwrap();
    let map = Arc::new(SharedMap::new(file.as_fd(), WL_SIZE, 0, true).unwrap());
    for p in 0..pages {
        for w in words(ps) {
            map.write_u64(p * ps + w * 8, pattern(p, w)).unwrap();
        }
    }
    let errors = Arc::new(AtomicU64::new(0));
    let rounds = Arc::new(AtomicU64::new(0));
    let ios = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (map, errors, rounds, stop) =
            (map.clone(), errors.clone(), rounds.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for p in (0..pages).filter(|&p| is_hot(p)) {
                    if map.read_u64(p * ps).unwrap_or(0) != pattern(p, 0) {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                rounds.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
    {
        let (errors, ios, stop) = (errors.clone(), ios.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let disk = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/vda")
            {
                Ok(d) => d,
                Err(e) => {
                    println!("WORKLOAD no disk: {e}");
                    errors.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let blk = (n * 7) % WL_BLOCKS;
                let buf: Vec<u8> = (0..4096u64).map(|i| (i ^ n ^ (n >> 8)) as u8).collect();
                let ok = disk.write_all_at(&buf, blk * 4096).is_ok() && disk.sync_data().is_ok();
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                let mut back = vec![0u8; 4096];
                if !ok || disk.read_exact_at(&mut back, blk * 4096).is_err() || back != buf {
                    errors.fetch_add(1, Ordering::SeqCst);
                }
                ios.fetch_add(1, Ordering::SeqCst);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    {
        let (errors, rounds, ios) = (errors.clone(), rounds.clone(), ios.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            println!(
                "WORKLOAD tick rounds={} ios={} errors={}",
                rounds.load(Ordering::SeqCst),
                ios.load(Ordering::SeqCst),
                errors.load(Ordering::SeqCst)
            );
        });
    }
    println!(
        "WORKLOAD READY {} MiB, hot every {HOT_EVERY}th page",
        WL_SIZE >> 20
    );
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "verify" {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut bad = 0usize;
    for p in 0..pages {
        for w in words(ps) {
            bad += (map.read_u64(p * ps + w * 8).unwrap_or(0) != pattern(p, w)) as usize;
        }
    }
    let errs = errors.load(Ordering::SeqCst);
    println!(
        "WORKLOAD VERIFY {} bad_words={bad} errors={errs} ios={}",
        if bad == 0 && errs == 0 { "OK" } else { "FAIL" },
        ios.load(Ordering::SeqCst)
    );
    assert!(bad == 0 && errs == 0);
    println!("TIER-GUEST-PASS");
}

fn qemu_host_side() {
    let p = match prepare() {
        Ok(p) => p,
        Err(e) => return println!("SKIP {QEMU_TEST}: {e}"),
    };
    if sys::euid() != 0 {
        return println!("SKIP {QEMU_TEST}: not root");
    }
    if let Err(e) = ZramSwap::check() {
        return println!("SKIP {QEMU_TEST}: {e}");
    }
    let _one = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let zram = ZramSwap::create(1 << 30, 32767).expect("zram");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vublk.sock");
    let tier_sock = dir.path().join("tier.sock");
    let _vublk = Killed(
        Command::new(env!("CARGO_BIN_EXE_vublk"))
            .arg("--socket")
            .arg(&sock)
            .arg("--disk")
            .arg(dir.path().join("disk.img"))
            .args(["--size", "64M", "--poll-us", "0"])
            .arg("--tier-socket")
            .arg(&tier_sock)
            .spawn()
            .expect("starting vublk"),
    );
    let t0 = Instant::now();
    while !(sock.exists() && tier_sock.exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "vublk did not create its sockets"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut q = Killed(
        Command::new(manifest_dir().join("examples/qemu.sh"))
            .env("VUBLK_SOCKET", &sock)
            .env("KERNEL", &p.kernel)
            .env("INITRD", &p.initrd)
            .env(
                "APPEND",
                format!("console=ttyS0 panic=-1 quiet tier.test={QEMU_TEST}"),
            )
            .env("MEM", "1G")
            .env("SMP", "2")
            .env("ACCEL", "tcg")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting QEMU through examples/qemu.sh"),
    );
    let qpid = q.0.id() as i32;
    let mut console = q.0.stdin.take().unwrap();
    let mut serial = Serial::new(q.0.stdout.take().unwrap());
    let deadline = Instant::now() + QEMU_TIMEOUT;
    serial.wait_for("WORKLOAD READY", deadline);
    serial.wait_for("WORKLOAD tick", deadline);
    let rss0 = vublk::tier::target::rss_bytes(qpid).unwrap_or(0);

    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "scan_interval = \"250ms\"\ncold_age = 2\nmax_move_rate = \"1GiB\"\nprobe_sample = 0.25\n\
         refault_budget = \"1GiB\"\npsi_limit = 0\n[[tiers]]\nkind = \"zram\"\n",
    )
    .unwrap();
    let status = dir.path().join("status.json");
    let mut ctl = Killed(
        Command::new(env!("CARGO_BIN_EXE_vublk-tier"))
            .args(["--pid", &qpid.to_string(), "--policy"])
            .arg(&policy)
            .arg("--status")
            .arg(&status)
            .arg("--vublk-socket")
            .arg(&tier_sock)
            .spawn()
            .expect("starting vublk-tier"),
    );
    // Let it work for up to 40 s, until QEMU's RSS fell by 250 MiB, while
    // the guest keeps ticking.
    let t1 = Instant::now();
    let mut last_tick = String::new();
    while t1.elapsed() < Duration::from_secs(40) {
        if let Some(l) = serial.next(deadline) {
            if l.contains("WORKLOAD tick") {
                assert!(l.ends_with("errors=0"), "workload errors: {l}");
                last_tick = l;
            }
        }
        let rss = vublk::tier::target::rss_bytes(qpid).unwrap_or(0);
        if rss0.saturating_sub(rss) >= 250 << 20 && t1.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let rss1 = vublk::tier::target::rss_bytes(qpid).unwrap_or(0);
    // The guest keeps running with its memory moved out.
    let t2 = Instant::now();
    while t2.elapsed() < Duration::from_secs(3) {
        if let Some(l) = serial.next(deadline) {
            if l.contains("WORKLOAD tick") {
                assert!(l.ends_with("errors=0"), "workload errors: {l}");
                last_tick = l;
            }
        }
    }
    let kill = Command::new("kill")
        .args(["-TERM", &ctl.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let code = ctl.0.wait().unwrap();
    assert!(code.success(), "vublk-tier: {code}");
    let st = Status::read(&status).unwrap();
    writeln!(console, "verify").unwrap();
    console.flush().unwrap();
    let v = serial.wait_for("WORKLOAD VERIFY", deadline);
    let rc = serial.finish(deadline);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{QEMU_TEST}: QEMU RSS {:.0} -> {:.0} MiB (saved {:.0} MiB) in {:.1} s; {} scans, moved {:.0} MiB, \
         refaulted {:.0} MiB ({:.1} MiB/s), skipped {} pages, {} vublk releases ({:.0} MiB), \
         last scan {:.1} ms/GiB; {last_tick}; zram holds {:.0} MiB",
        mib(rss0),
        mib(rss1),
        mib(rss0.saturating_sub(rss1)),
        t1.elapsed().as_secs_f64(),
        st.scans,
        mib(st.bytes.moved_total),
        mib(st.bytes.refaulted_total),
        st.bytes.refaulted_total as f64 / (1 << 20) as f64 / t1.elapsed().as_secs_f64(),
        st.pages_skipped_total,
        st.release.requests,
        mib(st.release.released_bytes_total),
        st.time.scan_ms_per_gib,
        mib(zram.stored_bytes())
    );
    assert!(v.contains("WORKLOAD VERIFY OK"), "{v}");
    assert_eq!(rc, Some(0));
    assert!(
        st.release.requests >= 1 && st.release.failures == 0,
        "{:?}",
        st.release
    );
    assert!(
        rss0.saturating_sub(rss1) >= 200 << 20,
        "QEMU RSS {rss0} -> {rss1}: less than 200 MiB saved"
    );
    drop(q);
    drop(zram);
}

#[test]
fn qemu_guest_ram_moves_while_vublk_serves_disk() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    if std::env::var_os(IN_GUEST).is_some() {
        guest_workload();
    } else {
        qemu_host_side();
    }
}
