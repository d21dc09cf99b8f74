//! vublk-tier costs: scan cost (ms per GiB of guest RAM per scan) of each
//! tracker available here, and move rates (GiB/s) of pageout to zram and of
//! faulting back. The "guest RAM" is a memfd mapped by this process, which is
//! its own target; the zram device is created here and removed afterwards.
//!
//! `cargo bench --bench tier` (root for zram, pagemap PFNs and page_idle);
//! `VUBLK_TIER_BENCH_MIB` sets the size (default 1024).

use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vublk::tier::maps::Selector;
use vublk::tier::page_idle::PageIdle;
use vublk::tier::pages::{BitSet, PageTable};
use vublk::tier::policy::{Bytes, Dur, Policy, TierSpec, TrackerChoice};
use vublk::tier::probe::Probe;
use vublk::tier::sys::{self, SharedMap};
use vublk::tier::target::Target;
use vublk::tier::tracker::{ScanInput, Tracker};
use vublk::tier::wss::Wss;
use vublk::tier::zram::ZramSwap;
use vublk::tier::{Controller, Options};

const SCANS: usize = 5;

fn fill(m: &SharedMap, seed: u64) {
    // Half of each page pseudo-random, half zero: about 2:1 for lz4.
    let ps = sys::page_size();
    let mut x = seed | 1;
    for p in 0..m.len() / ps {
        for w in 0..ps / 16 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let _ = m.write_u64(p * ps + w * 8, x);
        }
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Median of `SCANS` timings of `f`, in ms.
fn median_ms(mut f: impl FnMut()) -> f64 {
    f(); // warm-up (first scans only mark)
    let mut v: Vec<f64> = (0..SCANS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn tracker_scan_ms(t: &Target, tr: &mut dyn Tracker) -> f64 {
    let mut pm = Vec::new();
    let mut res = BitSet::new(t.pages());
    let mut pages = PageTable::new(t.pages());
    let mut present = BitSet::new(t.pages());
    median_ms(|| {
        t.read_pagemap(&mut pm).unwrap();
        for (i, e) in pm.iter().enumerate() {
            present.set(i, e & vublk::tier::target::PM_PRESENT != 0);
        }
        t.residency_given(&present, &mut res).unwrap();
        tr.scan(ScanInput {
            target: t,
            pagemap: &pm,
            resident: &res,
            pages: &mut pages,
        })
        .unwrap();
    })
}

fn main() {
    let mib: usize = std::env::var("VUBLK_TIER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let ps = sys::page_size();
    let f = sys::memfd_create("tier-bench-guest", size as u64).unwrap();
    let m = SharedMap::new(f.as_fd(), size, 0, true).unwrap();
    let t0 = Instant::now();
    fill(&m, 0x9e37_79b9_7f4a_7c15);
    println!(
        "tier bench: {mib} MiB memfd filled in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let me = std::process::id() as i32;
    let sel = Selector::Range(m.addr() as u64, (m.addr() + size) as u64);
    let target = Target::open(me, &sel).unwrap();
    let g = gib(size);

    // Scan cost of each tracker.
    println!("scan cost, median of {SCANS} scans (pagemap + mincore + tracker):");
    let base = median_ms(|| {
        let mut pm = Vec::new();
        let mut res = BitSet::new(target.pages());
        let mut present = BitSet::new(target.pages());
        target.read_pagemap(&mut pm).unwrap();
        for (i, e) in pm.iter().enumerate() {
            present.set(i, e & vublk::tier::target::PM_PRESENT != 0);
        }
        target.residency_given(&present, &mut res).unwrap();
    });
    println!("  pagemap+mincore    {:8.1} ms/GiB", base / g);
    let mut pm = Vec::new();
    let pm_ms = median_ms(|| target.read_pagemap(&mut pm).unwrap());
    let mut res = BitSet::new(target.pages());
    let mc_ms = median_ms(|| {
        target.residency(&mut res).unwrap();
    });
    let mut present = BitSet::new(target.pages());
    for (i, e) in pm.iter().enumerate() {
        present.set(i, e & vublk::tier::target::PM_PRESENT != 0);
    }
    let mg_ms = median_ms(|| {
        target.residency_given(&present, &mut res).unwrap();
    });
    println!(
        "    of which pagemap {:.1} ms/GiB, mincore {:.1} ms/GiB ({:.1} ms/GiB skipping mapped blocks)",
        pm_ms / g,
        mc_ms / g,
        mg_ms / g
    );
    match PageIdle::check() {
        Ok(_) => {
            let mut tr = PageIdle::new(target.pages()).unwrap();
            println!(
                "  page-idle          {:8.1} ms/GiB",
                tracker_scan_ms(&target, &mut tr) / g
            );
        }
        Err(e) => println!("  page-idle          unavailable: {e}"),
    }
    let mut probe = Probe::new();
    println!(
        "  probe              {:8.1} ms/GiB (tracking only; its evictions are moves)",
        tracker_scan_ms(&target, &mut probe) / g
    );
    match Wss::check(me) {
        Ok(_) => {
            let mut w = Wss::new(me, m.addr() as u64, (m.addr() + size) as u64);
            let ms = median_ms(|| {
                w.estimate().unwrap();
            });
            println!("  wss (clear_refs+smaps) {:4.1} ms/GiB", ms / g);
        }
        Err(e) => println!("  wss                unavailable: {e}"),
    }

    // Move rates.
    if let Err(e) = ZramSwap::check() {
        println!("move rate: SKIP ({e})");
        return;
    }
    let zram = ZramSwap::create((size as u64) * 2, 32767).unwrap();
    let pidfd = sys::pidfd_open(me).unwrap();
    let resident = |m: &SharedMap| {
        let mut v = vec![0u8; m.len() / ps];
        m.mincore(0, &mut v).unwrap();
        v.iter().filter(|b| *b & 1 != 0).count()
    };
    let t = Instant::now();
    let mut off = 0;
    let chunk = 64 << 20;
    while off < size {
        let len = chunk.min(size - off);
        sys::process_madvise(pidfd.as_fd(), &[(m.addr() + off, len)], libc::MADV_PAGEOUT).unwrap();
        off += len;
    }
    let out_s = t.elapsed().as_secs_f64();
    let left = resident(&m);
    let moved = size - left * ps;
    println!(
        "move rate: pageout to zram {:.2} GiB/s ({:.0} MiB in {:.2} s, {left} pages left; zram holds {:.0} MiB, compressed {:.0} MiB)",
        gib(moved) / out_s,
        moved as f64 / (1 << 20) as f64,
        out_s,
        zram.stored_bytes() as f64 / (1 << 20) as f64,
        compressed(&zram) as f64 / (1 << 20) as f64,
    );
    let t = Instant::now();
    let mut sum = 0u64;
    for p in 0..size / ps {
        sum = sum.wrapping_add(m.read_u64(p * ps).unwrap());
    }
    let in_s = t.elapsed().as_secs_f64();
    println!(
        "move rate: fault back from zram {:.2} GiB/s ({:.2} s; checksum {sum:x})",
        g / in_s,
        in_s
    );
    let t = Instant::now();
    sys::process_madvise(pidfd.as_fd(), &[(m.addr(), size)], libc::MADV_PAGEOUT).unwrap();
    let out2 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    sys::process_madvise(pidfd.as_fd(), &[(m.addr(), size)], libc::MADV_WILLNEED).unwrap();
    let wn = t.elapsed().as_secs_f64();
    let back = resident(&m) * ps;
    println!(
        "move rate: pageout again {:.2} GiB/s; MADV_WILLNEED brought back {:.0} MiB at {:.2} GiB/s",
        g / out2,
        back as f64 / (1 << 20) as f64,
        gib(back) / wn
    );

    // The whole controller with the probe: per-scan cost as it reports it.
    let policy = Policy {
        scan_interval: Dur(Duration::from_millis(100)),
        cold_age: 1,
        tracker: TrackerChoice::Probe,
        probe_sample: 1.0,
        max_move_rate: Bytes(64 << 30),
        refault_budget: Bytes(64 << 30),
        psi_limit: 0.0,
        tiers: vec![TierSpec::Zram],
        ..Policy::default()
    };
    let mut c = Controller::new(Options {
        pid: me,
        selector: sel,
        policy,
        status_path: None,
        vublk_sockets: vec![],
        max_scans: Some(3),
    })
    .unwrap();
    let st = c.run(&AtomicBool::new(false)).unwrap();
    println!(
        "controller (probe, wss every scan): last scan {:.1} ms/GiB, moved {:.0} MiB in {:.0} ms of moves ({:.2} GiB/s), scan cpu {:.0} ms, move cpu {:.0} ms",
        st.time.scan_ms_per_gib,
        st.bytes.moved_total as f64 / (1 << 20) as f64,
        st.time.move_ms_total,
        gib(st.bytes.moved_total as usize) / (st.time.move_ms_total / 1e3).max(1e-9),
        st.time.scan_cpu_ms_total,
        st.time.move_cpu_ms_total
    );
    drop(c);
    drop(m);
    drop(zram);
}

fn compressed(z: &ZramSwap) -> u64 {
    std::fs::read_to_string(z.sysfs().join("mm_stat"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
