//! The eviction probe, for kernels without idle page tracking.
//!
//! Without page_idle nothing tells userspace which mapped pages the guest
//! touched. The probe therefore treats every page it has not seen touched as
//! aging (`Idle` each scan); once a page reaches its cold age the controller
//! pages it out, at most `probe_sample` of the mapping per scan and within
//! the move rate. A page the guest touches again faults back in: the
//! controller sees it mapped again (pagemap present bit; residency via
//! `mincore`) and counts it as hot, resets its age and doubles its personal
//! cold age (the refault streak), so a hot page is probed again only after
//! 2, 4, 8, ... times the cold age, at most every 255 scans. The probe's cost
//! is those refaults, and it is reported as the refault rate.

use crate::tier::tiers;
use crate::tier::tracker::{Access, Capabilities, ScanInput, ScanResult, Tracker, TrackerError};

/// The eviction probe tracker.
#[derive(Debug, Default)]
pub struct Probe;

impl Probe {
    /// Needs an active swap device to evict into.
    pub fn check() -> Result<String, String> {
        match tiers::swaps() {
            Ok(s) if !s.is_empty() => {
                Ok(format!(
                "evicts samples into swap ({}) and watches refaults through pagemap and mincore",
                s.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
            }
            Ok(_) => Err("no active swap to evict samples into".into()),
            Err(e) => Err(format!("reading /proc/swaps: {e}")),
        }
    }

    /// A new probe.
    pub fn new() -> Self {
        Self
    }
}

impl Tracker for Probe {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "probe".into(),
            per_page: true,
            sees_reads: true,
            evicts_to_measure: true,
            working_set: false,
            detail: "pages out a sample each scan (probe_sample) and counts as hot what the guest \
                     faults back; hot pages are re-probed after exponentially longer ages"
                .into(),
        }
    }

    fn scan(&mut self, input: ScanInput<'_>) -> Result<ScanResult, TrackerError> {
        let mut res = ScanResult::default();
        for i in 0..input.pages.len() {
            if !input.pages.out.get(i) {
                res.record(input.pages, i, Access::Idle);
            }
        }
        Ok(res)
    }
}
