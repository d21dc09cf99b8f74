//! vublk-tier against a test "guest": a child process with a 256 MiB shared
//! memfd, 20% of its pages touched continually, a known pattern in every
//! page, and a zram swap created (and removed) by the test.
//!
//! The child is this test binary re-executed with `VUBLK_TIER_TEST_CHILD`
//! set (see `child_helper`), so no extra binary is needed.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vublk::tier::status::Status;
use vublk::tier::sys::{self, SharedMap};
use vublk::tier::zram::ZramSwap;

const CHILD_ENV: &str = "VUBLK_TIER_TEST_CHILD";
const SIZE: usize = 256 << 20;
/// Every 5th page is hot: 20%.
const HOT_EVERY: usize = 5;

fn is_hot(page: usize) -> bool {
    page % HOT_EVERY == 0
}

fn pattern(page: usize, word: usize) -> u64 {
    ((page as u64) << 20 | word as u64) ^ 0x5eed_0000_0000_0000
}

/// Not a test: the body of the re-executed child. A no-op in normal runs.
#[test]
fn child_helper() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child_main();
    }
}

fn child_main() -> ! {
    let ps = sys::page_size();
    let pages = SIZE / ps;
    let file = sys::memfd_create("tier-test-guest", SIZE as u64).expect("memfd");
    let map = Arc::new(SharedMap::new(file.as_fd(), SIZE, 0, true).expect("mmap"));
    for p in 0..pages {
        for w in 0..ps / 8 {
            map.write_u64(p * ps + w * 8, pattern(p, w)).expect("fill");
        }
    }
    let rounds = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicBool::new(false));
    {
        let (map, rounds, bad) = (map.clone(), rounds.clone(), bad.clone());
        std::thread::spawn(move || loop {
            let r = rounds.load(Ordering::SeqCst);
            for p in (0..pages).filter(|&p| is_hot(p)) {
                // Read every hot page; write one back every 4th round.
                let w = (r as usize * 7) % (ps / 8);
                let v = map.read_u64(p * ps + w * 8).unwrap_or(0);
                if v != pattern(p, w) {
                    bad.store(true, Ordering::SeqCst);
                }
                if r % 4 == 0 {
                    let _ = map.write_u64(p * ps + w * 8, pattern(p, w));
                }
            }
            rounds.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
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
                    std::thread::sleep(Duration::from_millis(2));
                }
                say(format!("ROUND {}", rounds.load(Ordering::SeqCst)));
            }
            "verify" => {
                let mut res = "VERIFY OK".to_string();
                if bad.load(Ordering::SeqCst) {
                    res = "VERIFY BAD toucher saw a wrong word".into();
                }
                'outer: for p in 0..pages {
                    for w in 0..ps / 8 {
                        let v = map.read_u64(p * ps + w * 8).unwrap_or(0);
                        if v != pattern(p, w) {
                            res = format!("VERIFY BAD page {p} word {w}: {v:#x}");
                            break 'outer;
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

/// The child process; killed on drop.
struct Guest {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: u64,
}

impl Guest {
    fn spawn() -> Guest {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_helper", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning the guest child");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut g = Guest {
            child,
            stdin,
            stdout,
            addr: 0,
        };
        let l = g.read_until("READY");
        g.addr = u64::from_str_radix(l.trim_start_matches("READY ").trim(), 16).unwrap();
        g
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn read_until(&mut self, prefix: &str) -> String {
        loop {
            let mut l = String::new();
            let n = self.stdout.read_line(&mut l).unwrap();
            assert!(n > 0, "guest child exited before {prefix}");
            // libtest may print "test child_helper ... " before it.
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

/// The controller process; killed on drop if still running.
struct Ctl(Child);

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn rss(pid: i32) -> u64 {
    vublk::tier::target::rss_bytes(pid).unwrap_or(0)
}

/// Residency of hot and cold pages, from our own view of the child's memfd.
fn residency(view: &SharedMap) -> (usize, usize, usize, usize) {
    let ps = sys::page_size();
    let pages = SIZE / ps;
    let mut v = vec![0u8; pages];
    view.mincore(0, &mut v).unwrap();
    let (mut hot_res, mut hot, mut cold_res, mut cold) = (0, 0, 0, 0);
    for (p, b) in v.iter().enumerate() {
        let r = b & 1 != 0;
        if is_hot(p) {
            hot += 1;
            hot_res += r as usize;
        } else {
            cold += 1;
            cold_res += r as usize;
        }
    }
    (hot_res, hot, cold_res, cold)
}

fn skip_reason() -> Option<String> {
    if sys::euid() != 0 {
        return Some("not root (needs zram, process_madvise and pagemap)".into());
    }
    ZramSwap::check().err().map(|e| e.to_string())
}

#[test]
fn cold_pages_move_to_zram_hot_pages_stay() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    if let Some(r) = skip_reason() {
        println!("SKIP cold_pages_move_to_zram_hot_pages_stay: {r}");
        return;
    }
    // Highest priority, so the kernel swaps to this device.
    let zram = ZramSwap::create(512 << 20, 32767).expect("creating the zram swap");
    let mut guest = Guest::spawn();
    let pid = guest.pid();
    let ps = sys::page_size();

    // Our own, never-touched view of the child's memfd, for mincore.
    let mf = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        guest.addr,
        guest.addr + SIZE as u64
    );
    let f = std::fs::File::open(&mf).expect("opening the child's memfd");
    let view = SharedMap::new(f.as_fd(), SIZE, 0, false).unwrap();
    guest.cmd("round", "ROUND");
    let rss0 = rss(pid);
    let (hr0, h, cr0, c) = residency(&view);
    assert_eq!((hr0, cr0), (h, c), "all pages resident before");

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
scan_interval = "100ms"
cold_age = 2
max_move_rate = "4GiB"
probe_sample = 0.5
refault_budget = "1GiB"
psi_limit = 0
[[tiers]]
kind = "zram"
"#,
    )
    .unwrap();
    let status = dir.path().join("status.json");
    let t0 = Instant::now();
    let mut ctl = Ctl(Command::new(env!("CARGO_BIN_EXE_vublk-tier"))
        .args(["--pid", &pid.to_string(), "--policy"])
        .arg(&policy)
        .arg("--status")
        .arg(&status)
        .env("RUST_LOG", "info")
        .spawn()
        .expect("starting vublk-tier"));

    // Run until the cold pages are out (at most 40 s), then 5 more scans.
    let mut done_at: Option<u64> = None;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            ctl.0.try_wait().unwrap().is_none(),
            "vublk-tier exited early"
        );
        let Ok(st) = Status::read(&status) else {
            continue;
        };
        let (_, _, cr, c) = residency(&view);
        if done_at.is_none() && cr * 100 <= c {
            done_at = Some(st.scans);
        }
        if done_at.is_some_and(|d| st.scans >= d + 5) || Instant::now() > deadline {
            break;
        }
    }
    let elapsed = t0.elapsed();
    // SIGTERM: the controller stops moving and exits cleanly.
    let kill = Command::new("kill")
        .args(["-TERM", &ctl.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t1 = Instant::now();
    let code = loop {
        if let Some(c) = ctl.0.try_wait().unwrap() {
            break c;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "vublk-tier ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "vublk-tier exit status {code}");
    let st = Status::read(&status).unwrap();
    assert_eq!(st.state, "stopped");

    // Let the guest touch its hot set once more, then measure.
    guest.cmd("round", "ROUND");
    let (hr, h, cr, c) = residency(&view);
    let rss1 = rss(pid);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "tier_memfd: tracker {}, {} scans in {:.1} s; RSS {:.1} -> {:.1} MiB (saved {:.1} MiB); \
         hot resident {hr}/{h}, cold resident {cr}/{c}; moved {:.1} MiB, refaulted {:.1} MiB \
         ({:.1}% of moved), skipped {} pages; last scan {:.2} ms ({:.1} ms/GiB); zram holds {:.1} MiB",
        st.tracker.as_ref().map_or("?", |t| t.name.as_str()),
        st.scans,
        elapsed.as_secs_f64(),
        mib(rss0),
        mib(rss1),
        mib(rss0.saturating_sub(rss1)),
        mib(st.bytes.moved_total),
        mib(st.bytes.refaulted_total),
        100.0 * st.bytes.refaulted_total as f64 / st.bytes.moved_total.max(1) as f64,
        st.pages_skipped_total,
        st.time.last_scan_ms,
        st.time.scan_ms_per_gib,
        mib(zram.stored_bytes()),
    );
    assert_eq!(hr, h, "every hot page resident");
    assert!(cr * 100 <= c, "cold pages resident: {cr} of {c} (> 1%)");
    assert!(
        rss0.saturating_sub(rss1) >= 150 << 20,
        "RSS went from {rss0} to {rss1}: less than 150 MiB saved"
    );
    assert!(st.bytes.moved_total >= (c * ps) as u64 * 99 / 100);

    // The status subcommand prints it.
    let out = Command::new(env!("CARGO_BIN_EXE_vublk-tier"))
        .args(["status", "--status"])
        .arg(&status)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("stopped"), "{text}");
    println!("{text}");

    // Every page reads back its pattern (cold ones come back from zram).
    let v = guest.cmd("verify", "VERIFY");
    assert_eq!(v, "VERIFY OK");
    drop(view);
    drop(guest);
    drop(zram);
}
