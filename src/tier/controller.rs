//! The control loop: every scan interval, observe, age, and move.
//!
//! One scan:
//! 1. read the target's pagemap (mapped pages) and the residency of the
//!    memory file (`mincore`);
//! 2. follow the pages this controller moved out: mapped again by the
//!    target means the guest faulted it back (a refault: hot, its own cold
//!    age doubles); resident but not mapped (readahead, vublk I/O) means
//!    back in without a refault; otherwise one scan older;
//! 3. let the tracker age every other page;
//! 4. adapt: refaults above the budget raise the cold age; a 2 MiB block
//!    whose moved-out pages come back in large part is hot again and the
//!    rest of it is prefetched with MADV_WILLNEED;
//! 5. move (unless stopping, or PSI says the host is under memory
//!    pressure): cold pages to the first tier, colder pages to the next, at
//!    most `max_move_rate`, never below the resident floor or above the cold
//!    cap; before a pageout pass, every vublk socket is asked to release its
//!    view of guest RAM; pages still resident after pageout are counted as
//!    skipped;
//! 6. write the status file.

use crate::tier::maps::Selector;
use crate::tier::pages::{Access, BitSet, PageTable};
use crate::tier::policy::{Policy, TrackerChoice};
use crate::tier::release;
use crate::tier::status::{ReleaseStats, Status, StatusError};
use crate::tier::sys;
use crate::tier::target::{Target, TargetError, PM_PFN_MASK, PM_PRESENT};
use crate::tier::tiers::{self, HostFacts, Tier, TierStatus};
use crate::tier::tracker::{self, ScanInput, Tracker, TrackerError};
use crate::tier::wss::Wss;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Pages per hot-block (2 MiB of 4 KiB pages).
const BLOCK_PAGES: usize = 512;
/// Fewest refaults in a block before it can count as hot.
const BLOCK_MIN_REFAULTS: usize = 8;
/// Largest batch for move_pages.
const MOVE_BATCH: usize = 4096;
/// Scans under a quarter of the refault budget before the cold age decays
/// by one toward the policy's value.
const CALM_SCANS: u32 = 10;

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// About the target.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// About the tracker.
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    /// Writing the status.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// Bad options.
    #[error("{0}")]
    Config(String),
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Target process.
    pub pid: i32,
    /// Which mapping.
    pub selector: Selector,
    /// The policy.
    pub policy: Policy,
    /// Status file (None: none written).
    pub status_path: Option<PathBuf>,
    /// vublk release sockets.
    pub vublk_sockets: Vec<PathBuf>,
    /// Stop after this many scans (tests, benchmarks).
    pub max_scans: Option<u64>,
}

/// What one move pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveReport {
    /// Pages paged out (verified not resident afterwards).
    pub paged_out: u64,
    /// Pages moved to a slower node.
    pub to_slow_node: u64,
    /// Pages moved back to the fast node.
    pub to_fast_node: u64,
    /// Pages still resident after pageout.
    pub skipped: u64,
    /// Pages hinted with MADV_COLD.
    pub cold_hinted: u64,
    /// Pages paged out and faulted back before the pass ended (hot).
    pub refaulted: u64,
    /// Of those, pages that had been moved and faulted back before.
    pub refaulted_again: u64,
}

/// The controller.
pub struct Controller {
    opts: Options,
    target: Target,
    tracker: Box<dyn Tracker>,
    pages: PageTable,
    resident: BitSet,
    present: BitSet,
    on_slow: BitSet,
    pagemap: Vec<u64>,
    cold_age: u8,
    calm: u32,
    /// Refaults seen during the previous move pass (counted in this rate).
    carried_refaults: u64,
    cursor: usize,
    last_move: Option<Instant>,
    last_scan: Option<Instant>,
    wss: Option<Wss>,
    tiers: Vec<Tier>,
    status: Status,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Controller {
    /// Open the target and choose the tracker.
    pub fn new(opts: Options) -> Result<Self, ControllerError> {
        opts.policy
            .validate()
            .map_err(|e| ControllerError::Config(e.to_string()))?;
        let target = Target::open(opts.pid, &opts.selector)?;
        let tracker = tracker::select(opts.policy.tracker, &target)?;
        let caps = tracker.capabilities();
        let n = target.pages();
        let wss =
            (!caps.working_set && opts.policy.wss_every > 0).then(|| Wss::for_target(&target));
        let status = Status {
            version: 1,
            controller_pid: std::process::id(),
            pid: opts.pid,
            state: "starting".into(),
            started_unix_ms: unix_ms(SystemTime::now()),
            mapping: target.region().to_string(),
            tracker: Some(caps),
            trackers: tracker::availability(opts.pid),
            policy: opts.policy.clone(),
            cold_age_now: opts.policy.cold_age,
            release: ReleaseStats {
                sockets: opts
                    .vublk_sockets
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut c = Self {
            cold_age: opts.policy.cold_age,
            opts,
            target,
            tracker,
            pages: PageTable::new(n),
            resident: BitSet::new(n),
            present: BitSet::new(n),
            on_slow: BitSet::new(n),
            pagemap: Vec::new(),
            calm: 0,
            carried_refaults: 0,
            cursor: 0,
            last_move: None,
            last_scan: None,
            wss,
            tiers: Vec::new(),
            status,
        };
        c.refresh_tiers();
        c.status.bytes.total = c.target.bytes();
        Ok(c)
    }

    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Per-page state.
    pub fn pages(&self) -> &PageTable {
        &self.pages
    }

    /// The status as of the last scan.
    pub fn status(&self) -> &Status {
        &self.status
    }

    fn refresh_tiers(&mut self) {
        let (active, st): (Vec<Tier>, Vec<TierStatus>) =
            tiers::resolve(&self.opts.policy.tiers, &HostFacts::read());
        self.tiers = active;
        self.status.tiers = st;
    }

    fn interval(&self) -> Duration {
        self.opts.policy.scan_interval.0
    }

    /// Run until `stop` is set, the target exits or `max_scans` is reached.
    /// The final status is written with state `stopped` or `target-exited`.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<Status, ControllerError> {
        let stopping = || stop.load(Ordering::SeqCst);
        let result = loop {
            if stopping() {
                break Ok("stopped");
            }
            let t0 = Instant::now();
            match self.scan_once(&stopping) {
                Ok(()) => {}
                Err(ControllerError::Target(TargetError::Exited(_))) => break Ok("target-exited"),
                Err(e) => break Err(e),
            }
            self.status.state = "running".into();
            self.write_status()?;
            if self.opts.max_scans.is_some_and(|m| self.status.scans >= m) {
                break Ok("stopped");
            }
            let next = t0 + self.interval();
            while !stopping() && Instant::now() < next {
                std::thread::sleep(
                    (next - Instant::now().min(next)).min(Duration::from_millis(20)),
                );
            }
        };
        match result {
            Ok(state) => {
                self.status.state = state.into();
                self.write_status()?;
                Ok(self.status.clone())
            }
            Err(e) => {
                self.status.state = "failed".into();
                self.status.last_error = Some(e.to_string());
                let _ = self.write_status();
                Err(e)
            }
        }
    }

    fn write_status(&mut self) -> Result<(), ControllerError> {
        self.status.updated_unix_ms = unix_ms(SystemTime::now());
        if let Some(p) = &self.opts.status_path {
            self.status.write(p)?;
        }
        Ok(())
    }

    fn read_state(&mut self) -> Result<usize, ControllerError> {
        if self.target.exited() {
            return Err(TargetError::Exited(self.target.pid()).into());
        }
        self.target.read_pagemap(&mut self.pagemap)?;
        for (i, &e) in self.pagemap.iter().enumerate() {
            self.present.set(i, e & PM_PRESENT != 0);
        }
        Ok(self
            .target
            .residency_given(&self.present, &mut self.resident)?)
    }

    /// One scan and move pass.
    pub fn scan_once(&mut self, stop: &dyn Fn() -> bool) -> Result<(), ControllerError> {
        let t0 = Instant::now();
        let c0 = sys::thread_cpu_time();
        let dt = self
            .last_scan
            .map_or(self.interval(), |t| t.elapsed())
            .max(Duration::from_millis(1));
        self.last_scan = Some(t0);
        self.read_state()?;

        // 2. Pages we moved out.
        // The probe's first eviction of a page is a measurement: its
        // refault is the probe's cost, not a policy mistake, and does not
        // count against the refault budget.
        let probing = self.tracker.capabilities().evicts_to_measure;
        let mut refaults: Vec<usize> = Vec::new();
        let mut budgeted = 0u64;
        let out: Vec<usize> = self.pages.out.ones().collect();
        for i in out {
            if self.present.get(i) {
                budgeted += (!probing || self.pages.streak(i) > 0) as u64;
                self.pages.refault(i);
                refaults.push(i);
            } else if self.resident.get(i) {
                self.pages.back_in(i);
            } else {
                self.pages.observe(i, Access::Idle);
            }
        }

        // 3. The tracker. An automatic choice that fell back to the
        //    report-only estimate (no swap at start) is made again once a
        //    swap tier appears.
        if self.opts.policy.tracker == TrackerChoice::Auto && !self.tracker.capabilities().per_page
        {
            if let Ok(t) = tracker::select(TrackerChoice::Auto, &self.target) {
                if t.capabilities().per_page {
                    log::info!("switching to tracker {}", t.capabilities().name);
                    self.status.tracker = Some(t.capabilities());
                    self.status.trackers = tracker::availability(self.opts.pid);
                    self.wss = (!t.capabilities().working_set && self.opts.policy.wss_every > 0)
                        .then(|| Wss::for_target(&self.target));
                    self.tracker = t;
                }
            }
        }
        let r = self.tracker.scan(ScanInput {
            target: &self.target,
            pagemap: &self.pagemap,
            resident: &self.resident,
            pages: &mut self.pages,
        })?;
        let mut wss = r.wss_bytes;
        let every = self.opts.policy.wss_every as u64;
        if let Some(w) = self.wss.as_mut() {
            if every > 0 && self.status.scans % every == 0 {
                match w.estimate() {
                    Ok(v) => wss = v.or(self.status.bytes.working_set),
                    Err(e) => log::warn!("working-set estimate: {e}"),
                }
            } else {
                wss = self.status.bytes.working_set;
            }
        }
        let scan_time = t0.elapsed();
        let scan_cpu = sys::thread_cpu_time().saturating_sub(c0);

        // 4. Adapt.
        let ps = self.target.page_size() as u64;
        let refault_rate = (refaults.len() as u64 * ps) as f64 / dt.as_secs_f64();
        let budget_rate = ((budgeted + self.carried_refaults) * ps) as f64 / dt.as_secs_f64();
        self.adapt_cold_age(budget_rate);
        let prefetched = self.prefetch_hot_blocks(&refaults, stop)?;

        // 5. Move.
        let m0 = Instant::now();
        let mc0 = sys::thread_cpu_time();
        self.refresh_tiers();
        let mv = self.move_pass(stop)?;
        let move_time = m0.elapsed();
        let move_cpu = sys::thread_cpu_time().saturating_sub(mc0);
        self.carried_refaults = if probing {
            mv.refaulted_again
        } else {
            mv.refaulted
        };

        // 6. Status.
        let st = &mut self.status;
        st.scans += 1;
        st.cold_age_now = self.cold_age;
        st.refault_rate_bytes_per_s = refault_rate;
        st.pages_skipped_last = mv.skipped;
        st.pages_skipped_total += mv.skipped;
        let b = &mut st.bytes;
        b.refaulted_total += (refaults.len() as u64 + mv.refaulted) * ps;
        b.prefetched_total += prefetched * ps;
        b.moved_total += (mv.paged_out + mv.to_slow_node) * ps;
        b.cold_hinted_total += mv.cold_hinted * ps;
        b.working_set = wss;
        b.target_rss = self.target.rss_bytes();
        b.moved_out = self.pages.out.count() as u64 * ps;
        b.on_slow_node = self.on_slow.count() as u64 * ps;
        let mut resident = 0u64;
        let mut cold = 0u64;
        for i in 0..self.pages.len() {
            resident += self.resident.get(i) as u64;
            cold += (self.pages.age(i) >= self.cold_age) as u64;
        }
        b.resident = resident * ps;
        b.cold = cold * ps;
        let t = &mut st.time;
        t.last_scan_ms = ms(scan_time);
        t.last_move_ms = ms(move_time);
        t.scan_ms_total += ms(scan_time);
        t.scan_cpu_ms_total += ms(scan_cpu);
        t.move_ms_total += ms(move_time);
        t.move_cpu_ms_total += ms(move_cpu);
        let gib = self.target.bytes() as f64 / (1u64 << 30) as f64;
        t.scan_ms_per_gib = if gib > 0.0 { ms(scan_time) / gib } else { 0.0 };
        st.age_histogram = self.pages.histogram(&self.resident);
        log::debug!(
            "scan {}: accessed {} idle {} unknown {}, refaults {}, moved {} skipped {}, resident {} MiB",
            st.scans,
            r.accessed,
            r.idle,
            r.unknown,
            refaults.len(),
            mv.paged_out + mv.to_slow_node,
            mv.skipped,
            b.resident >> 20
        );
        Ok(())
    }

    fn adapt_cold_age(&mut self, refault_rate: f64) {
        let budget = self.opts.policy.refault_budget.0 as f64;
        if refault_rate > budget {
            let n = self.opts.policy.raised_cold_age(self.cold_age);
            if n != self.cold_age {
                log::info!(
                    "refaults {:.0} KiB/s over the budget {:.0} KiB/s: cold age {} -> {n}",
                    refault_rate / 1024.0,
                    budget / 1024.0,
                    self.cold_age
                );
            }
            self.cold_age = n;
            self.calm = 0;
        } else if refault_rate < budget / 4.0 {
            self.calm += 1;
            if self.calm >= CALM_SCANS && self.cold_age > self.opts.policy.cold_age {
                self.cold_age -= 1;
                self.calm = 0;
            }
        }
    }

    /// A block of 2 MiB whose moved-out pages mostly faulted back is hot:
    /// bring the rest of it back with MADV_WILLNEED (and promote its pages
    /// on a slower node). Returns the pages prefetched.
    fn prefetch_hot_blocks(
        &mut self,
        refaults: &[usize],
        stop: &dyn Fn() -> bool,
    ) -> Result<u64, ControllerError> {
        let mut per_block: std::collections::BTreeMap<usize, usize> = Default::default();
        for &i in refaults {
            *per_block.entry(i / BLOCK_PAGES).or_default() += 1;
        }
        let mut fetch = Vec::new();
        for (blk, n) in per_block {
            let lo = blk * BLOCK_PAGES;
            let hi = (lo + BLOCK_PAGES).min(self.pages.len());
            let still_out: Vec<usize> = (lo..hi).filter(|&i| self.pages.out.get(i)).collect();
            if is_hot_block(n, still_out.len(), self.opts.policy.hot_threshold) {
                fetch.extend(still_out);
            }
        }
        if fetch.is_empty() {
            return Ok(0);
        }
        self.target
            .advise_pages(&fetch, libc::MADV_WILLNEED, stop)?;
        for &i in &fetch {
            self.pages.back_in(i);
            self.pages.observe(i, Access::Accessed);
        }
        Ok(fetch.len() as u64)
    }

    /// Pick up to `limit` pages from the cursor on, round robin, for which
    /// `want` holds.
    fn pick(&self, limit: usize, want: impl Fn(usize) -> bool) -> Vec<usize> {
        let n = self.pages.len();
        let mut v = Vec::new();
        if n == 0 || limit == 0 {
            return v;
        }
        for k in 0..n {
            let i = (self.cursor + k) % n;
            if want(i) {
                v.push(i);
                if v.len() >= limit {
                    break;
                }
            }
        }
        v.sort_unstable();
        v
    }

    fn move_pass(&mut self, stop: &dyn Fn() -> bool) -> Result<MoveReport, ControllerError> {
        let mut rep = MoveReport::default();
        let caps = self.tracker.capabilities();
        if !caps.per_page || self.tiers.is_empty() || stop() {
            return Ok(rep);
        }
        let p = &self.opts.policy;
        let psi = tiers::psi_memory_some_avg10();
        self.status.psi_some_avg10 = psi;
        if p.psi_limit > 0.0 && psi.is_some_and(|v| v > p.psi_limit) {
            self.status.psi_backoffs += 1;
            return Ok(rep);
        }
        let ps = self.target.page_size() as u64;
        let now = Instant::now();
        let dt = self
            .last_move
            .map_or(self.interval(), |t| now - t)
            .min(self.interval() * 2);
        self.last_move = Some(now);
        let mut budget = (p.max_move_rate.0 as f64 * dt.as_secs_f64()) as u64 / ps;
        if caps.evicts_to_measure {
            budget = budget.min((p.probe_sample * self.pages.len() as f64).ceil() as u64);
        }
        let resident = self.resident.count() as u64;
        let floor_room = resident.saturating_sub(p.resident_floor.0 / ps);
        let cap_room = if p.cold_cap.0 == 0 {
            u64::MAX
        } else {
            (p.cold_cap.0 / ps)
                .saturating_sub(self.pages.out.count() as u64 + self.on_slow.count() as u64)
        };
        let limit = budget.min(floor_room).min(cap_room) as usize;

        // Promotion: pages on a slow node seen accessed go back.
        let tiers = self.tiers.clone();
        if let Some(&Tier::Numa { fast, .. }) =
            tiers.iter().find(|t| matches!(t, Tier::Numa { .. }))
        {
            if caps.per_page && !caps.evicts_to_measure {
                let hot = self.pick(usize::MAX, |i| {
                    self.on_slow.get(i) && self.pages.age(i) == 0
                });
                rep.to_fast_node += self.numa_move(&hot, fast, false)?;
            }
        }

        let mut left = limit;
        for (k, tier) in tiers.iter().enumerate() {
            if left == 0 || stop() {
                break;
            }
            let base = ((self.cold_age as u32) * (k as u32 + 1)).min(u8::MAX as u32) as u8;
            match *tier {
                Tier::Numa { node, .. } => {
                    let cand = self.pick(left, |i| {
                        self.resident.get(i)
                            && !self.pages.out.get(i)
                            && !self.on_slow.get(i)
                            && self.pages.is_cold(i, base)
                    });
                    let moved = self.numa_move(&cand, node, true)?;
                    rep.to_slow_node += moved;
                    left = left.saturating_sub(moved as usize);
                    if let Some(&l) = cand.last() {
                        self.cursor = l + 1;
                    }
                }
                Tier::Pageout => {
                    let cand = self.pick(left, |i| {
                        self.resident.get(i)
                            && !self.pages.out.get(i)
                            && self.pages.is_cold(i, base)
                    });
                    if cand.is_empty() {
                        continue;
                    }
                    self.release_vublk();
                    let before: Vec<u64> = cand
                        .iter()
                        .map(|&i| self.pagemap[i] & PM_PFN_MASK)
                        .collect();
                    // Pages the target maps go through its pidfd; resident
                    // pages it does not map (only vublk touched them, or they
                    // were prefetched) through our own view.
                    let (mapped, unmapped): (Vec<usize>, Vec<usize>) =
                        cand.iter().partition(|&&i| self.present.get(i));
                    self.target
                        .advise_pages(&mapped, libc::MADV_PAGEOUT, stop)?;
                    self.target.pageout_unmapped(&unmapped, stop)?;
                    self.target.residency(&mut self.resident)?;
                    self.target.read_pagemap(&mut self.pagemap)?;
                    for (&i, &pfn0) in cand.iter().zip(&before) {
                        let pfn1 = self.pagemap[i] & PM_PFN_MASK;
                        if !self.resident.get(i) {
                            self.pages.mark_out(i);
                            self.on_slow.set(i, false);
                            rep.paged_out += 1;
                        } else if pfn0 != 0 && pfn1 != 0 && pfn0 != pfn1 {
                            // Moved, and faulted back already (a new page).
                            rep.refaulted_again += (self.pages.streak(i) > 0) as u64;
                            self.pages.refault(i);
                            self.on_slow.set(i, false);
                            rep.paged_out += 1;
                            rep.refaulted += 1;
                        } else {
                            // Still the same page: the kernel did not move it
                            // (mapped by another process, locked, or busy).
                            rep.skipped += 1;
                        }
                    }
                    left = left.saturating_sub(cand.len());
                    if let Some(&l) = cand.last() {
                        self.cursor = l + 1;
                    }
                }
            }
        }

        // A floor or cap stopped us: hint the remaining cold pages so that
        // the kernel's own reclaim takes them first under pressure.
        if (limit as u64) < budget && left == 0 && !stop() {
            let base = self.cold_age;
            let cand = self.pick((budget - limit as u64) as usize, |i| {
                self.resident.get(i) && !self.pages.out.get(i) && self.pages.is_cold(i, base)
            });
            if !cand.is_empty() {
                self.target.advise_pages(&cand, libc::MADV_COLD, stop)?;
                rep.cold_hinted = cand.len() as u64;
            }
        }
        Ok(rep)
    }

    /// Ask every vublk to drop its view of guest RAM.
    fn release_vublk(&mut self) {
        for s in &self.opts.vublk_sockets {
            match release::request_release(s) {
                Ok(n) => {
                    self.status.release.requests += 1;
                    self.status.release.released_bytes_total += n;
                }
                Err(e) => {
                    log::warn!("vublk release: {e}");
                    self.status.release.failures += 1;
                    self.status.release.last_error = Some(e.to_string());
                }
            }
        }
    }

    /// move_pages of `pages` to `node`; returns pages now on `node`.
    fn numa_move(
        &mut self,
        pages: &[usize],
        node: u32,
        to_slow: bool,
    ) -> Result<u64, ControllerError> {
        let mut moved = 0;
        for batch in pages.chunks(MOVE_BATCH) {
            let addrs: Vec<usize> = batch.iter().map(|&i| self.target.addr(i)).collect();
            let nodes = vec![node as i32; batch.len()];
            let mut status = vec![0i32; batch.len()];
            sys::move_pages(
                self.target.pid(),
                &addrs,
                Some(&nodes),
                &mut status,
                sys::MPOL_MF_MOVE_ALL,
            )
            .map_err(|source| TargetError::Io {
                what: format!("move_pages to node {node}"),
                source,
            })?;
            for (&i, &s) in batch.iter().zip(&status) {
                if s == node as i32 {
                    self.on_slow.set(i, to_slow);
                    moved += 1;
                }
            }
        }
        Ok(moved)
    }
}

/// Whether a block with `refaulted` pages back this scan and `still_out`
/// pages still out is hot under `threshold`.
pub fn is_hot_block(refaulted: usize, still_out: usize, threshold: f64) -> bool {
    still_out > 0
        && refaulted >= BLOCK_MIN_REFAULTS
        && refaulted as f64 >= threshold * (refaulted + still_out) as f64
}

/// Run a controller with `opts` until `stop` (convenience for tests).
pub fn run(opts: Options, stop: &AtomicBool) -> Result<Status, ControllerError> {
    Controller::new(opts)?.run(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_block_rule() {
        assert!(!is_hot_block(100, 0, 0.5), "nothing left to fetch");
        assert!(!is_hot_block(4, 1, 0.5), "too few refaults");
        assert!(is_hot_block(300, 200, 0.5));
        assert!(!is_hot_block(102, 408, 0.5), "20% of a block is not hot");
        assert!(is_hot_block(102, 408, 0.2));
    }
}
