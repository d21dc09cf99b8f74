//! I/O suspension (retry and alarm) with real and injected faults, and QoS
//! limits measured through a real frontend.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::*;

const MIB: usize = 1 << 20;

fn sock(dir: &Path) -> PathBuf {
    dir.join("vublk.sock")
}

/// Waits up to `timeout` for at least one completion; libblkio reports a
/// timeout as ETIME.
fn do_io(q: &mut Queue, c: &mut [MaybeUninit<Completion>], timeout: &mut Duration) -> usize {
    match q.q.do_io(c, 1, Some(timeout), None) {
        Ok(n) => n,
        Err(e) if e.errno() == blkio::Errno::TIME => 0,
        Err(e) => panic!("do_io: {e:?}"),
    }
}

/// Completions that arrive within `timeout` (at most `want`), as (tag, ret).
fn completions(q: &mut Queue, want: usize, timeout: Duration) -> Vec<(usize, i32)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut c: [MaybeUninit<Completion>; 4] = std::array::from_fn(|_| MaybeUninit::uninit());
        let mut t = left;
        let n = do_io(q, &mut c, &mut t);
        for done in &c[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let done = unsafe { done.assume_init_ref() };
            out.push((done.user_data, done.ret));
        }
    }
    out
}

/// Keeps `depth` reads of `len` bytes in flight and counts completions in
/// each of the consecutive `windows`.
fn saturate(q: &mut Queue, depth: usize, len: usize, windows: &[Duration]) -> Vec<u64> {
    let buf = q.buf(0, len).as_mut_ptr();
    for i in 0..depth {
        q.q.read((i * len) as u64, buf, len, i, ReqFlags::empty());
    }
    let mut counts = Vec::new();
    let mut c: [MaybeUninit<Completion>; 64] = std::array::from_fn(|_| MaybeUninit::uninit());
    for w in windows {
        let end = Instant::now() + *w;
        let mut n_done = 0u64;
        while Instant::now() < end {
            let mut t = end.saturating_duration_since(Instant::now());
            let n = do_io(q, &mut c, &mut t);
            for done in &c[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let done = unsafe { done.assume_init_ref() };
                assert_eq!(done.ret, 0, "read failed");
                q.q.read(
                    (done.user_data * len) as u64,
                    buf,
                    len,
                    done.user_data,
                    ReqFlags::empty(),
                );
            }
            n_done += n as u64;
        }
        counts.push(n_done);
    }
    // Drain what is still in flight so the daemon sees a quiet queue.
    let _ = completions(q, depth, Duration::from_secs(5));
    counts
}

fn within(measured: f64, expected: f64, tolerance: f64) -> bool {
    (measured - expected).abs() <= expected * tolerance
}

/// A size-limited tmpfs, so that writes hit a real ENOSPC; unmounted on
/// drop, even after a failed assertion.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "vublk-enospc"])
            .arg(dir.path())
            .status()
            .map_err(|e| e.to_string())?
            .success();
        if !ok {
            return Err("mount -t tmpfs failed (not root?)".into());
        }
        Ok(SmallFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system that holds `path` until it is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0xa5u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

fn wait_for_line(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn full_file_system_suspends_the_write_until_space_is_freed() {
    let fs = match SmallFs::mount("8M") {
        Ok(fs) => fs,
        Err(e) => {
            println!("SKIP: {e}");
            return;
        }
    };
    let work = disk_dir();
    let image = fs.path().join("disk.img");
    let alarm_log = work.path().join("alarms.log");
    let cmd = format!(
        "echo \"$VUBLK_EVENT $VUBLK_ERROR $VUBLK_QUEUE $VUBLK_SECTOR\" >> {}",
        alarm_log.display()
    );
    let _d = Daemon::start(
        &sock(work.path()),
        &[
            "--disk",
            image.to_str().unwrap(),
            "--size",
            "32M",
            "--cache",
            "writeback",
            "--poll-us",
            "0",
            "--retry-interval",
            "100ms",
            "--alarm-after",
            "500ms",
            "--retry-timeout",
            "0",
            "--alarm-command",
            &cmd,
        ],
    );
    let filler = fs.path().join("filler");
    fill(&filler);
    let mut c = Client::connect(&sock(work.path()), 1).unwrap();
    let mut qs = c.queue_refs();
    let q = &mut qs[0];
    let offset = 4 * MIB as u64;
    fill_pattern(q.buf(0, MIB), 7, offset);
    q.submit_write(offset, 0, MIB, 1);
    // Storage is full: the guest sees a slow request, not an error.
    assert!(completions(q, 1, Duration::from_millis(1500)).is_empty());
    assert!(
        wait_for_line(&alarm_log, "raise ENOSPC 0 8192", Duration::from_secs(5)),
        "no alarm: {:?}",
        std::fs::read_to_string(&alarm_log)
    );
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let done = completions(q, 1, Duration::from_secs(10));
    let resumed = freed.elapsed();
    assert_eq!(done, vec![(1, 0)], "write completes once space is back");
    println!(
        "I/O resumed {:.0} ms after space was freed",
        resumed.as_secs_f64() * 1e3
    );
    assert!(wait_for_line(
        &alarm_log,
        "clear ENOSPC",
        Duration::from_secs(5)
    ));
    // The data is intact, through the daemon and in the image itself.
    assert_eq!(q.read(offset, MIB, MIB), 0);
    let (written, read) = (q.buf(0, MIB).to_vec(), q.buf(MIB, MIB).to_vec());
    assert!(written == read, "read back differs");
    drop(qs);
    drop(c);
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk[offset as usize..offset as usize + MIB] == written[..]);
}

fn fault_daemon(dir: &Path, extra: &[&str]) -> (Daemon, PathBuf) {
    let image = dir.join("disk.img");
    let faults = dir.join("faults");
    std::fs::write(&faults, "").unwrap();
    let mut args = vec![
        "--disk",
        image.to_str().unwrap(),
        "--size",
        "16M",
        "--poll-us",
        "0",
        "--retry-interval",
        "50ms",
        "--fault-file",
        faults.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Daemon::start(&sock(dir), &args), faults)
}

/// Writes a fault rule and gives the daemon's watcher time to see it.
fn inject(faults: &Path, rule: &str) {
    std::fs::write(faults, rule).unwrap();
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
fn a_flush_never_overtakes_a_suspended_write() {
    let dir = disk_dir();
    let (_d, faults) = fault_daemon(dir.path(), &["--retry-timeout", "0"]);
    let mut c = Client::connect(&sock(dir.path()), 1).unwrap();
    let mut qs = c.queue_refs();
    let q = &mut qs[0];
    inject(&faults, "write ETIMEDOUT");
    fill_pattern(q.buf(0, 65536), 3, 0);
    q.submit_write(0, 0, 65536, 1);
    // Once the write is known to fail, later requests of the queue wait.
    assert!(completions(q, 1, Duration::from_millis(300)).is_empty());
    q.q.flush(2, ReqFlags::empty());
    let early = completions(q, 2, Duration::from_millis(800));
    assert!(early.is_empty(), "completed while failing: {early:?}");
    inject(&faults, "");
    let done = completions(q, 2, Duration::from_secs(5));
    assert_eq!(done, vec![(1, 0), (2, 0)], "write first, then the flush");
    assert_eq!(q.read(0, 65536, 65536), 0);
    assert!(q.buf(0, 65536).to_vec() == q.buf(65536, 65536).to_vec());
}

#[test]
fn retry_timeout_fails_or_keeps_the_request() {
    let dir = disk_dir();
    let (_d, faults) = fault_daemon(dir.path(), &["--retry-timeout", "500ms"]);
    let mut c = Client::connect(&sock(dir.path()), 1).unwrap();
    let mut qs = c.queue_refs();
    let q = &mut qs[0];
    inject(&faults, "read ENOLINK");
    let started = Instant::now();
    let buf = q.buf(0, 4096).as_mut_ptr();
    q.q.read(0, buf, 4096, 9, ReqFlags::empty());
    let done = completions(q, 1, Duration::from_secs(5));
    assert_eq!(done.len(), 1);
    assert!(done[0].1 < 0, "fails after the timeout: {done:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    // An errno not in the list fails at once.
    inject(&faults, "read ENXIO");
    assert!(q.read(0, 0, 4096) < 0);
    inject(&faults, "");
    assert_eq!(q.read(0, 0, 4096), 0);
    drop(qs);
    drop(c);

    let dir = disk_dir();
    let (_d, faults) = fault_daemon(
        dir.path(),
        &["--retry-timeout", "300ms", "--on-timeout", "suspend"],
    );
    let mut c = Client::connect(&sock(dir.path()), 1).unwrap();
    let mut qs = c.queue_refs();
    let q = &mut qs[0];
    inject(&faults, "read EIO");
    let buf = q.buf(0, 4096).as_mut_ptr();
    q.q.read(0, buf, 4096, 9, ReqFlags::empty());
    assert!(completions(q, 1, Duration::from_millis(1200)).is_empty());
    inject(&faults, "");
    assert_eq!(completions(q, 1, Duration::from_secs(5)), vec![(9, 0)]);
}

#[test]
fn iops_and_bandwidth_limits_hold_over_ten_seconds() {
    let iops_dir = tempfile::tempdir().unwrap();
    let bps_dir = tempfile::tempdir().unwrap();
    let common = ["--disk", "null:1G", "--poll-us", "0"];
    let iops_args = [&common[..], &["--qos-iops", "2000"]].concat();
    let bps_args = [&common[..], &["--qos-bps", "20M"]].concat();
    let _a = Daemon::start(&sock(iops_dir.path()), &iops_args);
    let _b = Daemon::start(&sock(bps_dir.path()), &bps_args);
    let ten = [Duration::from_secs(10)];
    let (iops, bps) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut c = Client::connect(&sock(iops_dir.path()), 1).unwrap();
            saturate(&mut c.queue_refs()[0], 32, 4096, &ten)[0] as f64 / 10.0
        });
        let b = s.spawn(|| {
            let mut c = Client::connect(&sock(bps_dir.path()), 1).unwrap();
            saturate(&mut c.queue_refs()[0], 32, 65536, &ten)[0] as f64 * 65536.0 / 10.0
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    println!(
        "qos-iops 2000: measured {iops:.1}/s; qos-bps 20M: measured {:.3} MiB/s",
        bps / MIB as f64
    );
    assert!(within(iops, 2000.0, 0.05), "IOPS {iops}");
    assert!(within(bps, 20.0 * MIB as f64, 0.05), "bytes/s {bps}");
}

#[test]
fn a_burst_is_honoured_and_then_ends() {
    let dir = tempfile::tempdir().unwrap();
    let _d = Daemon::start(
        &sock(dir.path()),
        &[
            "--disk",
            "null:1G",
            "--poll-us",
            "0",
            "--qos-iops",
            "500",
            "--qos-iops-burst",
            "2000",
            "--qos-iops-burst-length",
            "2",
        ],
    );
    let mut c = Client::connect(&sock(dir.path()), 1).unwrap();
    let counts = saturate(
        &mut c.queue_refs()[0],
        32,
        4096,
        &[Duration::from_secs(2), Duration::from_secs(3)],
    );
    println!(
        "burst: {} in the first 2 s, then {} in 3 s",
        counts[0], counts[1]
    );
    // 2 s at 2000/s, then back to 500/s.
    assert!(
        within(counts[0] as f64, 4000.0, 0.10),
        "burst {}",
        counts[0]
    );
    assert!(
        within(counts[1] as f64, 1500.0, 0.10),
        "after {}",
        counts[1]
    );
}

#[test]
fn queues_share_a_limit_fairly_and_sighup_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vublk.toml");
    std::fs::write(&config, "qos-iops = 1000\n").unwrap();
    let d = Daemon::start(
        &sock(dir.path()),
        &[
            "--config",
            config.to_str().unwrap(),
            "--disk",
            "null:1G",
            "--num-queues",
            "2",
            "--poll-us",
            "0",
        ],
    );
    let mut c = Client::connect(&sock(dir.path()), 2).unwrap();
    let windows = [
        Duration::from_secs(3),
        Duration::from_millis(500),
        Duration::from_secs(3),
    ];
    let pid = d.pid();
    let config = &config;
    let counts: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = c
            .queue_refs()
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                s.spawn(move || {
                    if i == 0 {
                        // Raise the limit between the two measured windows.
                        let cfg = config.to_path_buf();
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(3100));
                            std::fs::write(&cfg, "qos-iops = 3000\n").unwrap();
                            // SAFETY: signalling the daemon we started.
                            unsafe { libc::kill(pid, libc::SIGHUP) };
                        });
                    }
                    saturate(&mut q, 32, 4096, &windows)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (a, b) = (counts[0][0] as f64, counts[1][0] as f64);
    println!(
        "1000 IOPS over 2 queues for 3 s: {a} + {b}; after SIGHUP to 3000: {} + {}",
        counts[0][2], counts[1][2]
    );
    assert!(within(a + b, 3000.0, 0.05), "total {}", a + b);
    assert!(within(a, b, 0.2), "unfair: {a} vs {b}");
    let after = (counts[0][2] + counts[1][2]) as f64;
    assert!(within(after, 9000.0, 0.05), "after SIGHUP {after}");
    drop(c);
    assert!(d.terminate().success());
}
