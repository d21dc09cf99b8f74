//! The vublk side of the vublk-tier handshake: on request the daemon drops
//! its page-table entries for guest RAM (so the kernel can page the guest's
//! cold memory out) and keeps serving I/O.

mod common;

use common::*;
use vublk::tier::release::request_release;

/// Resident bytes of shared file pages (guest RAM is a memfd) in `pid`.
fn rss_shmem(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("RssShmem in /proc/PID/status")
}

#[test]
fn release_drops_the_daemons_view_of_guest_ram_and_io_goes_on() {
    let dir = disk_dir();
    let sock = dir.path().join("vublk.sock");
    let tier = dir.path().join("tier.sock");
    let image = dir.path().join("disk.img");
    let d = Daemon::start(
        &sock,
        &[
            "--disk",
            image.to_str().unwrap(),
            "--size",
            "64M",
            "--poll-us",
            "0",
            "--tier-socket",
            tier.to_str().unwrap(),
        ],
    );
    let mut c = Client::connect(&sock, 1).unwrap();
    // I/O into all of the 16 MiB buffer region maps it in the daemon too.
    for (i, off) in (0..REGION).step_by(1 << 20).enumerate() {
        fill_pattern(c.buf(off, 1 << 20), i as u64, off as u64);
        assert_eq!(c.write(0, off as u64, off, 1 << 20), 0);
        assert_eq!(c.read(0, off as u64, off, 1 << 20), 0);
    }
    let before = rss_shmem(d.pid());
    assert!(
        before >= REGION as u64,
        "daemon maps {before} bytes of guest RAM"
    );
    let released = request_release(&tier).expect("release");
    assert!(released >= REGION as u64, "released {released}");
    let after = rss_shmem(d.pid());
    println!(
        "daemon guest-RAM RSS {} KiB -> {} KiB",
        before / 1024,
        after / 1024
    );
    assert!(
        after + (REGION as u64) * 3 / 4 <= before,
        "{before} -> {after}"
    );
    // The data is still there and I/O goes on.
    let expect = c.buf(0, 1 << 20).to_vec();
    assert_eq!(c.read(0, 0, 1 << 20, 1 << 20), 0);
    assert!(c.buf(1 << 20, 1 << 20).to_vec() == expect);
    drop(c);
    assert!(d.terminate().success());
    assert!(!tier.exists(), "tier socket removed at exit");
}
