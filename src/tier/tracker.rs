//! Access trackers: one trait, three implementations, automatic choice.
//!
//! A tracker turns one scan interval into per-page observations
//! ([`Access`]) for the pages the controller has not moved out (pages that
//! were moved out are followed by the controller itself: a moved-out page
//! the guest mapped again is a refault). Each tracker reports what it can
//! see through [`Capabilities`].

use crate::tier::page_idle::PageIdle;
use crate::tier::pages::{BitSet, PageTable};
use crate::tier::policy::TrackerChoice;
use crate::tier::probe::Probe;
use crate::tier::target::Target;
use crate::tier::wss::Wss;
use serde::{Deserialize, Serialize};

pub use crate::tier::pages::Access;

/// Errors of a tracker.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// A kernel interface failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The requested tracker cannot run here.
    #[error("tracker {name} unavailable: {reason}")]
    Unavailable {
        /// Tracker name.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// Text from /proc had an unexpected form.
    #[error("parsing {0}")]
    Parse(String),
}

/// What a tracker can observe and do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Tracker name.
    pub name: String,
    /// Gives per-page access information, so it can drive moves.
    pub per_page: bool,
    /// Sees read accesses (not only writes).
    pub sees_reads: bool,
    /// Measures by evicting pages (its sample refaults are its cost).
    pub evicts_to_measure: bool,
    /// Reports a working-set size.
    pub working_set: bool,
    /// Free text: how it works here, and its limits.
    pub detail: String,
}

/// Whether a tracker can run on this host for this target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Availability {
    /// Tracker name.
    pub name: String,
    /// Can run.
    pub available: bool,
    /// Why not, or how.
    pub reason: String,
}

/// Input of one scan.
pub struct ScanInput<'a> {
    /// The target.
    pub target: &'a Target,
    /// Its pagemap entries, one per page, read at the start of this scan.
    pub pagemap: &'a [u64],
    /// Page-cache residency, one bit per page, read at the start of this scan.
    pub resident: &'a BitSet,
    /// Per-page state to update (pages in `pages.out` must be left alone).
    pub pages: &'a mut PageTable,
}

/// Result of one scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Pages seen accessed.
    pub accessed: u64,
    /// Pages seen (or assumed) idle.
    pub idle: u64,
    /// Pages without information this scan.
    pub unknown: u64,
    /// Working-set estimate in bytes, when the tracker measures one.
    pub wss_bytes: Option<u64>,
}

impl ScanResult {
    /// Apply `a` to page `i` and count it.
    pub fn record(&mut self, pages: &mut PageTable, i: usize, a: Access) {
        pages.observe(i, a);
        match a {
            Access::Accessed => self.accessed += 1,
            Access::Idle => self.idle += 1,
            Access::Unknown => self.unknown += 1,
        }
    }
}

/// An access tracker.
pub trait Tracker: Send {
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// Observe the interval that just ended and prepare the next one.
    fn scan(&mut self, input: ScanInput<'_>) -> Result<ScanResult, TrackerError>;
}

/// Which trackers can run for process `pid` on this host.
pub fn availability(pid: i32) -> Vec<Availability> {
    let mk = |name: &str, r: Result<String, String>| Availability {
        name: name.to_string(),
        available: r.is_ok(),
        reason: r.unwrap_or_else(|e| e),
    };
    vec![
        mk("page-idle", PageIdle::check()),
        mk("probe", Probe::check()),
        mk("wss", Wss::check(pid)),
    ]
}

/// Build the tracker for `choice` (auto: the first available of page-idle,
/// probe, wss).
pub fn select(choice: TrackerChoice, target: &Target) -> Result<Box<dyn Tracker>, TrackerError> {
    let unavailable = |name, reason| TrackerError::Unavailable { name, reason };
    match choice {
        TrackerChoice::PageIdle => {
            PageIdle::check().map_err(|r| unavailable("page-idle", r))?;
            Ok(Box::new(PageIdle::new(target.pages())?))
        }
        TrackerChoice::Probe => {
            Probe::check().map_err(|r| unavailable("probe", r))?;
            Ok(Box::new(Probe::new()))
        }
        TrackerChoice::Wss => {
            Wss::check(target.pid()).map_err(|r| unavailable("wss", r))?;
            Ok(Box::new(Wss::for_target(target)))
        }
        TrackerChoice::Auto => {
            if PageIdle::check().is_ok() {
                return Ok(Box::new(PageIdle::new(target.pages())?));
            }
            if Probe::check().is_ok() {
                return Ok(Box::new(Probe::new()));
            }
            Wss::check(target.pid()).map_err(|r| unavailable("wss", r))?;
            Ok(Box::new(Wss::for_target(target)))
        }
    }
}
