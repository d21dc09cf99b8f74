//! The real daemon on a real socket and real files, driven by a third-party
//! vhost-user-blk frontend (libblkio's virtio-blk-vhost-user driver).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A daemon on a fresh sparse image of `size` bytes in a disk directory.
fn image_daemon(size: &str, extra: &[&str]) -> (tempfile::TempDir, Daemon) {
    let dir = disk_dir();
    let sock = dir.path().join("s");
    let img = dir.path().join("d.img");
    let mut args = vec!["--disk", s(&img), "--size", size, "--poll-us", "20"];
    args.extend_from_slice(extra);
    let d = Daemon::start(&sock, &args);
    (dir, d)
}

fn sock(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("s")
}

fn img(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("d.img")
}

/// The expected contents of one 4 KiB block written with `seed` (0: never
/// written, reads as zeroes).
fn expected_block(seed: u64, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    if seed != 0 {
        fill_pattern(&mut b, seed, offset);
    }
    b
}

fn assert_block(got: &[u8], seed: u64, offset: u64, what: &str) {
    if got != expected_block(seed, offset).as_slice() {
        panic!("{what}: block at {offset:#x} does not hold seed {seed}");
    }
}

#[test]
fn several_queues_at_once_write_read_verify() {
    const QUEUES: usize = 4;
    const STRIPE: u64 = 16 * MIB;
    let (dir, mut d) = image_daemon("64M", &["--num-queues", "4"]);
    let mut c = Client::connect(&sock(&dir), QUEUES as i32).unwrap();
    assert_eq!(c.capacity(), 64 * MIB);
    assert_eq!(c.blkio.get_i32("max-queues").unwrap(), QUEUES as i32);

    // Each thread owns one queue, 4 MiB of the buffer region and one
    // 16 MiB stripe of the disk, which it writes at random offsets and
    // sizes, reading back as it goes. It returns the seed of each block.
    let per_thread = REGION / QUEUES;
    let maps: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = c
            .queue_refs()
            .into_iter()
            .enumerate()
            .map(|(t, mut q)| {
                scope.spawn(move || {
                    let wbuf = t * per_thread;
                    let rbuf = wbuf + per_thread / 2;
                    let base = t as u64 * STRIPE;
                    let blocks = (STRIPE / BLOCK) as usize;
                    let mut seeds = vec![0u64; blocks];
                    let mut rng = Rng::new(t as u64 + 1);
                    for i in 0..150u64 {
                        let n = 1 + rng.below(32) as usize; // 4 KiB .. 128 KiB
                        let first = rng.below((blocks - n) as u64) as usize;
                        let seed = (t as u64 + 1) << 32 | (i + 1);
                        let off = base + first as u64 * BLOCK;
                        let len = n * BLOCK as usize;
                        for (k, chunk) in q.buf(wbuf, len).chunks_mut(BLOCK as usize).enumerate() {
                            fill_pattern(chunk, seed, off + k as u64 * BLOCK);
                        }
                        assert_eq!(q.write(off, wbuf, len), 0, "write q{t}");
                        seeds[first..first + n].fill(seed);
                        // Read back a random range of the stripe.
                        let rn = 1 + rng.below(32) as usize;
                        let rfirst = rng.below((blocks - rn) as u64) as usize;
                        let roff = base + rfirst as u64 * BLOCK;
                        assert_eq!(q.read(roff, rbuf, rn * BLOCK as usize), 0);
                        let got = q.buf(rbuf, rn * BLOCK as usize).to_vec();
                        for k in 0..rn {
                            let o = roff + k as u64 * BLOCK;
                            let b = &got[k * BLOCK as usize..(k + 1) * BLOCK as usize];
                            assert_block(b, seeds[rfirst + k], o, "read-back");
                        }
                    }
                    seeds
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(c.flush(0), 0);

    // Verify every stripe through a queue other than the one that wrote it.
    let chunk = 2 * MIB as usize;
    for (t, seeds) in maps.iter().enumerate() {
        let q = (t + 1) % QUEUES;
        for part in 0..(STRIPE as usize / chunk) {
            let off = t as u64 * STRIPE + (part * chunk) as u64;
            assert_eq!(c.read(q, off, 0, chunk), 0);
            let got = c.buf(0, chunk).to_vec();
            for (k, b) in got.chunks(BLOCK as usize).enumerate() {
                let idx = part * chunk / BLOCK as usize + k;
                assert_block(b, seeds[idx], off + k as u64 * BLOCK, "cross-queue");
            }
        }
    }
    drop(c);
    // And the image file itself holds the same bytes.
    let f = fs::File::open(img(&dir)).unwrap();
    let mut b = vec![0u8; BLOCK as usize];
    for (t, seeds) in maps.iter().enumerate() {
        for (idx, &seed) in seeds.iter().enumerate().step_by(7) {
            let off = t as u64 * STRIPE + idx as u64 * BLOCK;
            f.read_exact_at(&mut b, off).unwrap();
            assert_block(&b, seed, off, "image file");
        }
    }
    assert!(d.alive());
}

#[test]
fn misaligned_guest_buffers_are_bounced_correctly() {
    // O_DIRECT (the default) needs aligned buffers; libblkio lets us pass
    // buffers at any address, so the daemon must bounce them.
    let (dir, _d) = image_daemon("8M", &[]);
    let mut c = Client::connect(&sock(&dir), 1).unwrap();
    let len = 3 * MIB as usize; // larger than one bounce chunk
    for (i, buf_off) in [1usize, 513, 4097].into_iter().enumerate() {
        let disk_off = i as u64 * 3 * MIB / 2 / 512 * 512;
        fill_pattern(c.buf(buf_off, len), 77 + i as u64, disk_off);
        let want = c.buf(buf_off, len).to_vec();
        assert_eq!(c.write(0, disk_off, buf_off, len), 0);
        c.buf(8 * MIB as usize + 3, len).fill(0xee);
        assert_eq!(c.read(0, disk_off, 8 * MIB as usize + 3, len), 0);
        assert!(
            c.buf(8 * MIB as usize + 3, len) == want.as_slice(),
            "offset {buf_off}"
        );
    }
}

#[test]
fn flush_discard_and_write_zeroes_on_a_file() {
    let (dir, mut d) = image_daemon("32M", &[]);
    let image = img(&dir);
    let mut c = Client::connect(&sock(&dir), 1).unwrap();
    // 8 MiB of data at 8 MiB.
    let len = 8 * MIB as usize;
    fill_pattern(c.buf(0, len), 5, 8 * MIB);
    assert_eq!(c.write(0, 8 * MIB, 0, len), 0);
    assert_eq!(c.flush(0), 0);
    let full = allocated(&image);
    assert!(full >= 8 * MIB, "written data is allocated ({full})");

    // Discard the first 2 MiB of it: the blocks go away.
    assert_eq!(c.discard(0, 8 * MIB, 2 * MIB), 0);
    let after_discard = allocated(&image);
    assert!(
        after_discard <= full - 2 * MIB,
        "discard freed nothing: {full} -> {after_discard}"
    );
    // Reads after discard work (zeroes on a punched file), and the data
    // next to the hole is intact.
    c.buf(MIB as usize * 9, 3 * MIB as usize).fill(0xaa);
    assert_eq!(c.read(0, 8 * MIB, MIB as usize * 9, 3 * MIB as usize), 0);
    let got = c.buf(MIB as usize * 9, 3 * MIB as usize).to_vec();
    assert!(got[..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(got[2 * MIB as usize..] == *c.buf(2 * MIB as usize, MIB as usize));

    // Write-zeroes without unmap: zeroes, blocks stay allocated.
    assert_eq!(c.write_zeroes(0, 10 * MIB, 2 * MIB, false), 0);
    let after_zero = allocated(&image);
    assert!(
        after_zero + 64 * 1024 >= after_discard,
        "NO_UNMAP write-zeroes deallocated: {after_discard} -> {after_zero}"
    );
    // Write-zeroes with unmap: zeroes and deallocated.
    assert_eq!(c.write_zeroes(0, 12 * MIB, 2 * MIB, true), 0);
    let after_unmap = allocated(&image);
    assert!(
        after_unmap <= after_zero - 2 * MIB,
        "unmapping write-zeroes freed nothing: {after_zero} -> {after_unmap}"
    );
    c.buf(MIB as usize * 9, 6 * MIB as usize).fill(0xaa);
    assert_eq!(c.read(0, 10 * MIB, MIB as usize * 9, 6 * MIB as usize), 0);
    let got = c.buf(MIB as usize * 9, 6 * MIB as usize).to_vec();
    assert!(got[..4 * MIB as usize].iter().all(|&b| b == 0), "zeroes");
    assert!(
        got[4 * MIB as usize..] == *c.buf(6 * MIB as usize, 2 * MIB as usize),
        "the last 2 MiB were not touched"
    );
    // Small, unaligned-to-4K but sector-aligned ranges work too.
    assert_eq!(c.write_zeroes(0, 14 * MIB + 512, 1024, false), 0);
    assert_eq!(c.discard(0, 15 * MIB + 1536, 512), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);

    // The image file agrees.
    let f = fs::File::open(&image).unwrap();
    let mut b = vec![0u8; 1024];
    f.read_exact_at(&mut b, 14 * MIB + 512).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let mut want = vec![0u8; 512];
    fill_pattern(&mut want, 5, 14 * MIB + 1536);
    f.read_exact_at(&mut b[..512], 14 * MIB + 1536).unwrap();
    assert_eq!(&b[..512], &want[..], "data past the zeroed range is intact");
    assert!(d.alive());
}

#[test]
fn read_only_disk() {
    let dir = disk_dir();
    let image = img(&dir);
    let mut data = vec![0u8; 4 * MIB as usize];
    fill_pattern(&mut data, 9, 0);
    fs::write(&image, &data).unwrap();
    let sk = sock(&dir);
    let mut d = Daemon::start(&sk, &["--disk", s(&image), "--read-only", "--poll-us", "0"]);
    // libblkio refuses a read-write start on a device that offers RO.
    let err = Client::connect(&sk, 1)
        .err()
        .expect("RO feature not offered");
    assert_eq!(err.errno(), blkio::Errno::ROFS, "{err}");
    let mut c = Client::connect_opts(&sk, 1, true).unwrap();
    assert!(c.blkio.get_bool("read-only").unwrap());
    assert_eq!(c.capacity(), 4 * MIB);
    assert_eq!(c.read(0, 0, 0, 4 * MIB as usize), 0);
    assert!(c.buf(0, 4 * MIB as usize) == data.as_slice());
    // libblkio fails these itself on a read-only device; the daemon's own
    // refusal is checked in tests/malformed.rs with a hand-built frontend.
    assert!(c.write(0, 0, 0, 4096) < 0);
    assert!(c.discard(0, 0, 4096) < 0);
    assert!(c.write_zeroes(0, 0, 4096, true) < 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    assert_eq!(fs::read(&image).unwrap(), data, "image untouched");
    assert!(d.alive());
}

#[test]
fn out_of_range_requests_fail_and_the_daemon_keeps_serving() {
    let (dir, mut d) = image_daemon("4M", &[]);
    let mut c = Client::connect(&sock(&dir), 1).unwrap();
    let cap = c.capacity();
    assert_eq!(cap, 4 * MIB);
    fill_pattern(c.buf(0, 8192), 3, 0);
    assert!(c.read(0, cap, 0, 512) < 0, "read at capacity");
    assert!(c.read(0, cap - 512, 0, 1024) < 0, "read across the end");
    assert!(c.write(0, cap - 4096, 0, 8192) < 0, "write across the end");
    assert!(c.write(0, 1 << 40, 0, 4096) < 0, "write far past the end");
    assert!(c.discard(0, cap - 4096, 8192) < 0, "discard across the end");
    assert!(
        c.write_zeroes(0, cap, 4096, false) < 0,
        "write-zeroes past end"
    );
    // Nothing of the failed write landed in the last block.
    assert_eq!(c.read(0, cap - 4096, 0, 4096), 0);
    assert!(c.buf(0, 4096).iter().all(|&b| b == 0));
    // The last block itself is fine.
    fill_pattern(c.buf(0, 4096), 4, cap - 4096);
    let want = c.buf(0, 4096).to_vec();
    assert_eq!(c.write(0, cap - 4096, 0, 4096), 0);
    assert_eq!(c.read(0, cap - 4096, 4096, 4096), 0);
    assert!(c.buf(4096, 4096) == want.as_slice());
    assert!(d.alive());
}

#[test]
fn capacity_and_queue_count_are_reported() {
    let dir = disk_dir();
    let sk = sock(&dir);
    let image = img(&dir);
    let _d = Daemon::start(
        &sk,
        &[
            "--disk",
            s(&image),
            "--size",
            "48M",
            "--num-queues",
            "3",
            "--poll-us",
            "0",
        ],
    );
    let c = Client::connect(&sk, 3).unwrap();
    assert_eq!(c.capacity(), 48 * MIB);
    assert_eq!(c.blkio.get_i32("max-queues").unwrap(), 3);
    assert_eq!(c.queues.len(), 3);
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 512);
    drop(c);
    // More queues than offered is refused by the frontend.
    assert!(Client::connect(&sk, 4).is_err());
    assert_eq!(
        fs::metadata(&image).unwrap().len(),
        48 * MIB,
        "sparse image created"
    );

    // An existing image's own size wins; a single queue is the default.
    drop(_d);
    let sk2 = dir.path().join("s2");
    let _d = Daemon::start(&sk2, &["--disk", s(&image), "--poll-us", "0"]);
    let c = Client::connect(&sk2, 1).unwrap();
    assert_eq!(c.capacity(), 48 * MIB);
    assert_eq!(c.blkio.get_i32("max-queues").unwrap(), 1);
}

#[test]
fn reconnects_keep_data_and_the_daemon() {
    let (dir, mut d) = image_daemon("16M", &["--num-queues", "2"]);
    let sk = sock(&dir);
    for round in 0..6u64 {
        let mut c = Client::connect_retry(&sk, 2);
        // Everything earlier rounds wrote is still there.
        for r in 0..round {
            let q = (r % 2) as usize;
            assert_eq!(c.read(q, r * MIB, 0, 64 * 1024), 0);
            let mut want = vec![0u8; 64 * 1024];
            fill_pattern(&mut want, 100 + r, r * MIB);
            assert!(c.buf(0, 64 * 1024) == want.as_slice(), "round {round}: {r}");
        }
        fill_pattern(c.buf(MIB as usize, 64 * 1024), 100 + round, round * MIB);
        assert_eq!(
            c.write((round % 2) as usize, round * MIB, MIB as usize, 64 * 1024),
            0
        );
        if round % 2 == 1 {
            // Leave with requests in flight: the daemon must cope.
            let mut qs = c.queue_refs();
            for i in 0..8 {
                qs[0].submit_write(8 * MIB + i * 65536, 2 * MIB as usize, 65536, i as usize);
            }
            let _ = qs[0].q.do_io(&mut [], 0, None, None);
        }
        drop(c);
        assert!(d.alive(), "daemon exited after disconnect {round}");
    }
}

#[test]
fn null_disk_reads_zeroes_and_drops_writes() {
    let dir = disk_dir();
    let sk = sock(&dir);
    let _d = Daemon::start(
        &sk,
        &["--disk", "null:1G", "--num-queues", "2", "--poll-us", "0"],
    );
    let mut c = Client::connect(&sk, 2).unwrap();
    assert_eq!(c.capacity(), 1 << 30);
    fill_pattern(c.buf(0, MIB as usize), 1, 0);
    assert_eq!(c.write(0, 4096, 0, MIB as usize), 0);
    assert_eq!(c.write(1, (1 << 30) - 4096, 0, 4096), 0);
    c.buf(0, MIB as usize).fill(0x5a);
    assert_eq!(c.read(1, 4096, 0, MIB as usize), 0);
    assert!(
        c.buf(0, MIB as usize).iter().all(|&b| b == 0),
        "reads are zero"
    );
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.discard(0, 0, MIB), 0);
    assert_eq!(c.write_zeroes(1, 0, MIB, true), 0);
    assert!(c.read(0, 1 << 30, 0, 512) < 0, "still range-checked");
}

/// Writes a pattern, flushes and checks the image file holds it.
fn write_flush_and_check_file(cache: &[&str]) {
    let (dir, mut d) = image_daemon("8M", cache);
    let mut c = Client::connect(&sock(&dir), 1).unwrap();
    let len = 2 * MIB as usize;
    fill_pattern(c.buf(0, len), 42, MIB);
    let want = c.buf(0, len).to_vec();
    assert_eq!(c.write(0, MIB, 0, len), 0);
    assert_eq!(c.read(0, MIB, len, len), 0);
    assert!(c.buf(len, len) == want.as_slice());
    assert_eq!(c.flush(0), 0);
    let f = fs::File::open(img(&dir)).unwrap();
    let mut got = vec![0u8; len];
    f.read_exact_at(&mut got, MIB).unwrap();
    assert!(got == want, "image file differs ({cache:?})");
    drop(c);
    assert!(d.alive());
}

#[test]
fn cache_modes_write_through_to_the_image() {
    write_flush_and_check_file(&[]);
    write_flush_and_check_file(&["--cache", "none"]);
    write_flush_and_check_file(&["--cache", "writeback"]);
}

#[test]
fn block_device_with_4k_logical_blocks() {
    let dir = disk_dir();
    let image = img(&dir);
    let f = fs::File::create(&image).unwrap();
    f.set_len(32 * MIB).unwrap();
    drop(f);
    let lo = match LoopDevice::attach(&image, 4096) {
        Ok(lo) => lo,
        Err(why) => {
            println!("SKIP: block_device_with_4k_logical_blocks: {why}");
            return;
        }
    };
    let sk = sock(&dir);
    let mut d = Daemon::start(&sk, &["--disk", s(&lo.path), "--poll-us", "0"]);
    let mut c = Client::connect(&sk, 1).unwrap();
    assert_eq!(c.capacity(), 32 * MIB);
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 4096);

    // Aligned I/O works.
    let len = 4 * MIB as usize;
    fill_pattern(c.buf(0, len), 8, 4 * MIB);
    let want = c.buf(0, len).to_vec();
    assert_eq!(c.write(0, 4 * MIB, 0, len), 0);
    assert_eq!(c.read(0, 4 * MIB, len, len), 0);
    assert!(c.buf(len, len) == want.as_slice());
    assert_eq!(c.flush(0), 0);
    // Less than a logical block, or not on one, fails.
    assert!(c.write(0, 4096, 0, 512) < 0, "512-byte write on a 4K disk");
    assert!(c.read(0, 512, 0, 4096) < 0, "read at a 512-byte offset");
    assert!(c.discard(0, 512, 4096) < 0, "discard at a 512-byte offset");
    // The data is in the backing image (the loop device writes through).
    let f = fs::File::open(&image).unwrap();
    let mut got = vec![0u8; len];
    f.read_exact_at(&mut got, 4 * MIB).unwrap();
    assert!(got == want, "backing image differs");
    let full = allocated(&image);
    assert!(full >= 4 * MIB);

    // Discard on the device: the loop driver punches the backing file.
    assert_eq!(c.discard(0, 4 * MIB, MIB), 0);
    let after = allocated(&image);
    assert!(
        after <= full - MIB,
        "discard freed nothing: {full} -> {after}"
    );
    // Write-zeroes with and without unmap.
    assert_eq!(c.write_zeroes(0, 5 * MIB, MIB, false), 0);
    assert_eq!(c.write_zeroes(0, 6 * MIB, MIB, true), 0);
    c.buf(len, len).fill(0xaa);
    assert_eq!(c.read(0, 4 * MIB, len, len), 0);
    let got = c.buf(len, len).to_vec();
    let three = 3 * MIB as usize;
    assert!(got[MIB as usize..three].iter().all(|&b| b == 0), "zeroed");
    assert!(got[three..] == want[three..], "the rest is intact");
    drop(c);
    assert!(d.alive());
    drop(d);
    drop(lo);
}

#[test]
fn sigterm_with_io_in_flight_exits_cleanly() {
    let (dir, d) = image_daemon("64M", &[]);
    let sk = sock(&dir);
    let mut c = Client::connect(&sk, 1).unwrap();
    let len = MIB as usize;
    fill_pattern(c.buf(0, len), 11, 0);
    let want = c.buf(0, len).to_vec();
    assert_eq!(c.write(0, 0, 0, len), 0);
    // Fill the queue with large writes and signal while they run.
    {
        let mut qs = c.queue_refs();
        for i in 0..32u64 {
            qs[0].submit_write(MIB + i * MIB, MIB as usize, len, i as usize);
        }
        let _ = qs[0].q.do_io(&mut [], 0, None, None);
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let mut d = d;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "vublk did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::mem::forget(d);
    assert!(status.success(), "exit status {status}");
    assert!(!sk.exists(), "socket file left behind");
    drop(c);
    let f = fs::File::open(img(&dir)).unwrap();
    let mut got = vec![0u8; len];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == want,
        "data written before SIGTERM is not in the image"
    );
}

#[test]
fn sigint_while_idle_exits_cleanly() {
    let (dir, d) = image_daemon("1M", &[]);
    let sk = sock(&dir);
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(d.pid(), libc::SIGINT) };
    let mut d = d;
    let status = d.child.wait().unwrap();
    std::mem::forget(d);
    assert!(status.success(), "exit status {status}");
    assert!(!sk.exists(), "socket file left behind");
}

fn expect_startup_error(args: &[&str], needle: &str) {
    let out = run_vublk(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} started: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr:?}");
    assert!(
        lines[0].starts_with("vublk: error: "),
        "{args:?}: {stderr:?}"
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
}

#[test]
fn bad_configuration_is_refused_with_one_line() {
    let dir = disk_dir();
    let sk = dir.path().join("s");
    let sk = s(&sk);
    let new_img = dir.path().join("new.img");
    let new_img = s(&new_img);
    let missing = dir.path().join("missing.img");
    let missing = s(&missing);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--socket", sk, "--disk", new_img, "--size", "1000"],
            "multiple of 512",
        ),
        (&["--socket", sk, "--disk", "null:1000"], "multiple of 512"),
        (
            &["--socket", sk, "--disk", "null:1M", "--queue-size", "100"],
            "power of two",
        ),
        (
            &["--socket", sk, "--disk", "null:1M", "--queue-size", "2"],
            "queue-size",
        ),
        (
            &["--socket", sk, "--disk", "null:1M", "--num-queues", "0"],
            "num-queues",
        ),
        (&["--socket", sk, "--disk", missing], "does not exist"),
        (&["--socket", sk], "disk"),
        (&["--disk", "null:1M"], "socket"),
        (
            &[
                "--socket",
                sk,
                "--disk",
                "null:1M",
                "--serial",
                "123456789012345678901",
            ],
            "serial",
        ),
        (
            &["--socket", "/nonexistent/dir/s", "--disk", "null:1M"],
            "/nonexistent/dir",
        ),
        (&["--socket", sk, "--disk", "null:12Q"], "disk"),
        (
            &["--socket", sk, "--disk", "null:1M", "--queue-size", "abc"],
            "--queue-size",
        ),
        (&["--socket", sk, "--disk", "null:1M", "--bogus"], "--bogus"),
    ];
    for (args, needle) in cases {
        expect_startup_error(args, needle);
    }
    assert!(
        !Path::new(new_img).exists(),
        "no image created for a bad size"
    );
    assert!(!Path::new(sk).exists(), "no socket left behind");

    // A bad TOML file, an unknown key, a bad value in the file.
    let cfg = dir.path().join("vublk.toml");
    let c = s(&cfg);
    for (text, needle) in [
        ("socket = [unclosed\n", "invalid config file"),
        ("disk = \"null:1M\"\nsockett = \"x\"\n", "unknown field"),
        ("disk = \"null:1M\"\nqueue-size = 6\n", "power of two"),
    ] {
        fs::write(&cfg, text).unwrap();
        expect_startup_error(&["--socket", sk, "--config", c], needle);
    }
    expect_startup_error(&["--socket", sk, "--config", missing], "config file");
}

#[test]
fn socket_of_a_live_daemon_is_refused() {
    let dir = disk_dir();
    let sk = dir.path().join("s");
    let mut first = Daemon::start(&sk, &["--disk", "null:1M", "--poll-us", "0"]);
    expect_startup_error(&["--socket", s(&sk), "--disk", "null:2M"], "in use");
    // The first daemon still owns the socket and serves.
    assert!(first.alive());
    let c = Client::connect(&sk, 1).unwrap();
    assert_eq!(c.capacity(), MIB);
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = disk_dir();
    let sk = dir.path().join("s");
    drop(std::os::unix::net::UnixListener::bind(&sk).unwrap());
    assert!(sk.exists());
    let _d = Daemon::start(&sk, &["--disk", "null:1M", "--poll-us", "0"]);
    // The old file was there before the daemon bound its own: retry.
    let c = Client::connect_retry(&sk, 1);
    assert_eq!(c.capacity(), MIB);
}

#[test]
fn flags_override_the_config_file() {
    let dir = disk_dir();
    let sk = dir.path().join("s");
    let cfg = dir.path().join("vublk.toml");
    fs::write(
        &cfg,
        format!(
            "socket = \"{}\"\ndisk = \"null:2G\"\nnum-queues = 2\npoll-us = 0\n",
            sk.display()
        ),
    )
    .unwrap();
    let _d = Daemon::start(&sk, &["--config", s(&cfg), "--num-queues", "3"]);
    let c = Client::connect(&sk, 1).unwrap();
    assert_eq!(c.capacity(), 2 << 30, "size from the file");
    assert_eq!(c.blkio.get_i32("max-queues").unwrap(), 3, "the flag wins");
}
