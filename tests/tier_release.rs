//! The shared-page handshake: MADV_PAGEOUT skips pages that a second
//! mapping (vublk's view of guest RAM) also maps, and moves them once the
//! release socket made the second mapping drop its page-table entries.
//!
//! This test process plays both parts: mapping A is the "guest" (the
//! controller's target), mapping B of the same memfd is "vublk", and the
//! release server's callback does MADV_DONTNEED on B.

use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use vublk::tier::maps::Selector;
use vublk::tier::policy::{Dur, Policy, TierSpec, TrackerChoice};
use vublk::tier::sys::{self, SharedMap};
use vublk::tier::zram::ZramSwap;
use vublk::tier::{request_release, spawn_release_server, Controller, Options};

const SIZE: usize = 16 << 20;

fn resident(m: &SharedMap) -> usize {
    let mut v = vec![0u8; m.len() / sys::page_size()];
    m.mincore(0, &mut v).unwrap();
    v.iter().filter(|b| *b & 1 != 0).count()
}

fn touch_all(m: &SharedMap) -> u64 {
    let ps = sys::page_size();
    (0..m.len() / ps)
        .map(|p| m.read_u64(p * ps).unwrap())
        .fold(0, u64::wrapping_add)
}

fn verify(m: &SharedMap) {
    let ps = sys::page_size();
    for p in 0..m.len() / ps {
        for w in [0, ps / 16, ps / 8 - 1] {
            assert_eq!(
                m.read_u64(p * ps + w * 8).unwrap(),
                (p * 1000 + w) as u64,
                "page {p} word {w}"
            );
        }
    }
}

fn pageout(pidfd: std::os::fd::BorrowedFd<'_>, m: &SharedMap) {
    sys::process_madvise(pidfd, &[(m.addr(), m.len())], libc::MADV_PAGEOUT).unwrap();
}

fn controller(a: &SharedMap, sockets: Vec<std::path::PathBuf>) -> vublk::tier::Status {
    let policy = Policy {
        scan_interval: Dur(Duration::from_millis(50)),
        cold_age: 1,
        tracker: TrackerChoice::Probe,
        probe_sample: 1.0,
        max_move_rate: vublk::tier::policy::Bytes(1 << 30),
        refault_budget: vublk::tier::policy::Bytes(1 << 30),
        psi_limit: 0.0,
        wss_every: 0,
        tiers: vec![TierSpec::Zram],
        ..Policy::default()
    };
    let mut c = Controller::new(Options {
        pid: std::process::id() as i32,
        selector: Selector::Range(a.addr() as u64, (a.addr() + a.len()) as u64),
        policy,
        status_path: None,
        vublk_sockets: sockets,
        max_scans: Some(3),
    })
    .unwrap();
    c.run(&AtomicBool::new(false)).unwrap()
}

#[test]
fn pageout_needs_vublk_to_release_its_view() {
    if sys::euid() != 0 {
        println!("SKIP pageout_needs_vublk_to_release_its_view: not root");
        return;
    }
    if let Err(e) = ZramSwap::check() {
        println!("SKIP pageout_needs_vublk_to_release_its_view: {e}");
        return;
    }
    let _zram = ZramSwap::create(128 << 20, 32767).unwrap();
    let ps = sys::page_size();
    let pages = SIZE / ps;
    let f = sys::memfd_create("tier-release-guest", SIZE as u64).unwrap();
    let a = SharedMap::new(f.as_fd(), SIZE, 0, true).unwrap();
    let b = Arc::new(SharedMap::new(f.as_fd(), SIZE, 0, true).unwrap());
    for p in 0..pages {
        for w in [0, ps / 16, ps / 8 - 1] {
            a.write_u64(p * ps + w * 8, (p * 1000 + w) as u64).unwrap();
        }
    }
    touch_all(&b);
    let pidfd = sys::pidfd_open(std::process::id() as i32).unwrap();

    // 1. B maps every page: pageout through A moves nothing.
    pageout(pidfd.as_fd(), &a);
    let r1 = resident(&a);
    assert!(
        r1 * 100 >= pages * 99,
        "pageout moved shared pages: {r1}/{pages} resident"
    );

    // 2. The release socket drops B's view; now pageout works.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vublk-tier.sock");
    let bv = b.clone();
    let mut srv = spawn_release_server(
        &sock,
        Arc::new(move || {
            bv.madvise(0, bv.len(), libc::MADV_DONTNEED)?;
            Ok(bv.len() as u64)
        }),
    )
    .unwrap();
    assert_eq!(request_release(&sock).unwrap(), SIZE as u64);
    pageout(pidfd.as_fd(), &a);
    let r2 = resident(&a);
    assert!(
        r2 * 100 <= pages,
        "after release {r2}/{pages} still resident"
    );
    verify(&a);
    verify(&b);
    println!("tier_release: pageout with B mapped left {r1}/{pages} resident, after release {r2}/{pages}");

    // 3. The controller counts what it could not move, and uses the socket.
    touch_all(&a);
    touch_all(&b);
    let st = controller(&a, vec![]);
    assert!(
        st.pages_skipped_total as usize >= pages * 99 / 100,
        "without the socket: {} skipped",
        st.pages_skipped_total
    );
    assert!(resident(&a) * 100 >= pages * 99);
    touch_all(&a);
    touch_all(&b);
    let st = controller(&a, vec![sock.clone()]);
    assert!(
        st.release.requests >= 1 && st.release.failures == 0,
        "{:?}",
        st.release
    );
    assert_eq!(st.pages_skipped_total, 0);
    assert!(
        resident(&a) * 100 <= pages,
        "with the socket: {} resident",
        resident(&a)
    );
    assert!(st.bytes.moved_total >= (SIZE as u64) * 99 / 100);
    verify(&a);
    println!(
        "tier_release: controller skipped 0 pages with the socket ({} releases), moved {} MiB",
        st.release.requests,
        st.bytes.moved_total >> 20
    );
    srv.shutdown();
    assert!(!sock.exists());
}
