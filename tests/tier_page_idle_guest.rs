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

use std::sync::Arc;
use std::time::{Duration, Instant};
use vublk::tier::maps::Selector;
use vublk::tier::page_idle::PageIdle;
use vublk::tier::pages::{Access, BitSet, PageTable};
use vublk::tier::policy::{Bytes, Dur, Policy, TierSpec, TrackerChoice};
use vublk::tier::sys::{self, SharedMap};
use vublk::tier::target::Target;
use vublk::tier::tracker::{ScanInput, Tracker};
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
VUBLK_TIER_IN_GUEST=1 /tier-test --exact page_idle_tracker_in_guest_kernel --nocapture --test-threads=1
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
            "tier_page_idle_guest",
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
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "tier_page_idle_guest" {
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

fn host_side() {
    let kernel = match find_kernel() {
        Ok(k) => k,
        Err(e) => return println!("SKIP {TEST_NAME}: {e}"),
    };
    let Some(qemu) = which("qemu-system-x86_64") else {
        return println!(
            "SKIP {TEST_NAME}: qemu-system-x86_64 not installed (tests/guest/deps.sh)"
        );
    };
    let busybox = match find_busybox() {
        Ok(b) => b,
        Err(e) => return println!("SKIP {TEST_NAME}: {e}"),
    };
    let t0 = Instant::now();
    let exe = build_static();
    let build_time = t0.elapsed();

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

    let t1 = Instant::now();
    let mut q = Command::new(qemu)
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
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting QEMU");
    let stdout = q.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let mut rc: Option<i32> = None;
    let deadline = Instant::now() + QEMU_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                let l = l.trim_end_matches('\r').to_string();
                println!("guest| {l}");
                if let Some(v) = l.strip_prefix("TIER-GUEST-RC=") {
                    rc = v.trim().parse().ok();
                }
                log.push(l);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
        if Instant::now() > deadline {
            let _ = q.kill();
            let _ = q.wait();
            panic!("guest did not finish within {QEMU_TIMEOUT:?}");
        }
    }
    let _ = q.wait();
    println!(
        "{TEST_NAME}: static build {:.1} s, guest run {:.1} s",
        build_time.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
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
