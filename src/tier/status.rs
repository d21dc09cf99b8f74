//! The status view: a JSON file rewritten after every scan (atomically) and
//! read by `vublk-tier status`.

use crate::tier::pages::HistogramBucket;
use crate::tier::policy::Policy;
use crate::tier::tiers::TierStatus;
use crate::tier::tracker::{Availability, Capabilities};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors reading or writing the status file.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Bad JSON.
    #[error("{path}: not a vublk-tier status: {source}")]
    Json {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Default status file for a target pid.
pub fn default_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/run/vublk-tier/{pid}.json"))
}

/// Byte counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ByteStats {
    /// Size of the managed mapping.
    pub total: u64,
    /// Resident in RAM now (page cache, via mincore).
    pub resident: u64,
    /// Pages at or over the cold age, resident or not.
    pub cold: u64,
    /// Moved out by this controller and still out.
    pub moved_out: u64,
    /// Moved to a slower NUMA node and still there.
    pub on_slow_node: u64,
    /// Moved since start (pageout + NUMA).
    pub moved_total: u64,
    /// Faulted back by the guest since start.
    pub refaulted_total: u64,
    /// Brought back ahead of use with MADV_WILLNEED (hot blocks).
    pub prefetched_total: u64,
    /// Hinted with MADV_COLD because a floor or cap stopped moving.
    pub cold_hinted_total: u64,
    /// Working-set estimate of the last interval, when measured.
    pub working_set: Option<u64>,
    /// Resident set size of the target process.
    pub target_rss: Option<u64>,
}

/// Time and CPU counters, milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeStats {
    /// Wall time of the last scan (tracking only).
    pub last_scan_ms: f64,
    /// Wall time of the last move pass.
    pub last_move_ms: f64,
    /// Total scan wall time.
    pub scan_ms_total: f64,
    /// Total scan CPU time of this controller.
    pub scan_cpu_ms_total: f64,
    /// Total move wall time.
    pub move_ms_total: f64,
    /// Total move CPU time.
    pub move_cpu_ms_total: f64,
    /// Scan cost of the last scan per GiB of guest RAM.
    pub scan_ms_per_gib: f64,
}

/// The handshake with vublk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleaseStats {
    /// Sockets asked before each pageout pass.
    pub sockets: Vec<String>,
    /// Successful releases.
    pub requests: u64,
    /// Failed ones.
    pub failures: u64,
    /// Bytes the daemons reported released.
    pub released_bytes_total: u64,
    /// Last failure.
    pub last_error: Option<String>,
}

/// Everything `vublk-tier status` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Format version.
    pub version: u32,
    /// Controller pid.
    pub controller_pid: u32,
    /// Target pid.
    pub pid: i32,
    /// `starting`, `running`, `stopped`, `target-exited` or `failed`.
    pub state: String,
    /// Unix time of this status, ms.
    pub updated_unix_ms: u64,
    /// Unix time of the start, ms.
    pub started_unix_ms: u64,
    /// The mapping, as in /proc/PID/maps.
    pub mapping: String,
    /// The tracker in use and what it can do.
    pub tracker: Option<Capabilities>,
    /// All trackers and whether they can run here.
    pub trackers: Vec<Availability>,
    /// Configured tiers and whether they are usable.
    pub tiers: Vec<TierStatus>,
    /// The policy in force.
    pub policy: Policy,
    /// The cold age now (raised above the policy's by refaults).
    pub cold_age_now: u8,
    /// Scans done.
    pub scans: u64,
    /// Byte counters.
    pub bytes: ByteStats,
    /// Pages the last pageout pass could not move (still resident: mapped
    /// by another process, locked, or in use).
    pub pages_skipped_last: u64,
    /// Such pages since start.
    pub pages_skipped_total: u64,
    /// Refaults per second over the last interval, bytes.
    pub refault_rate_bytes_per_s: f64,
    /// Moves skipped because memory PSI was over the limit.
    pub psi_backoffs: u64,
    /// Last PSI memory some avg10.
    pub psi_some_avg10: Option<f64>,
    /// Time and CPU.
    pub time: TimeStats,
    /// Age histogram.
    pub age_histogram: Vec<HistogramBucket>,
    /// The vublk handshake.
    pub release: ReleaseStats,
    /// Last error (fatal when state is `failed`).
    pub last_error: Option<String>,
}

impl Status {
    /// Write atomically to `path` (creating its directory).
    pub fn write(&self, path: &Path) -> Result<(), StatusError> {
        let err = |source| StatusError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(err)?;
            }
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|source| StatusError::Json {
            path: path.display().to_string(),
            source,
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.write_all(b"\n").map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Read a status file.
    pub fn read(path: &Path) -> Result<Self, StatusError> {
        let text = std::fs::read_to_string(path).map_err(|source| StatusError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| StatusError::Json {
            path: path.display().to_string(),
            source,
        })
    }

    /// A human-readable summary.
    pub fn render(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let b = &self.bytes;
        let mut s = String::new();
        let mut line = |t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(format!(
            "vublk-tier (pid {}) for process {}: {} after {} scans",
            self.controller_pid, self.pid, self.state, self.scans
        ));
        line(format!("mapping   {}", self.mapping));
        if let Some(t) = &self.tracker {
            line(format!("tracker   {} ({})", t.name, t.detail));
        }
        for t in &self.trackers {
            line(format!(
                "  {:<10} {:<4} {}",
                t.name,
                if t.available { "yes" } else { "no" },
                t.reason
            ));
        }
        line("tiers".into());
        for t in &self.tiers {
            line(format!(
                "  {:<10} {:<4} {}",
                t.tier,
                if t.available { "yes" } else { "no" },
                t.detail
            ));
        }
        line(format!(
            "policy    interval {:?}, cold age {} (now {}), max move rate {} MiB/s",
            self.policy.scan_interval.0,
            self.policy.cold_age,
            self.cold_age_now,
            mib(self.policy.max_move_rate.0)
        ));
        line(format!(
            "memory    total {:.1} MiB, resident {:.1} MiB, cold {:.1} MiB, moved out {:.1} MiB, on slow node {:.1} MiB",
            mib(b.total),
            mib(b.resident),
            mib(b.cold),
            mib(b.moved_out),
            mib(b.on_slow_node)
        ));
        line(format!(
            "totals    moved {:.1} MiB, refaulted {:.1} MiB ({:.1} KiB/s now), prefetched {:.1} MiB, cold-hinted {:.1} MiB",
            mib(b.moved_total),
            mib(b.refaulted_total),
            self.refault_rate_bytes_per_s / 1024.0,
            mib(b.prefetched_total),
            mib(b.cold_hinted_total)
        ));
        if let Some(w) = b.working_set {
            line(format!("wss       {:.1} MiB", mib(w)));
        }
        if let Some(r) = b.target_rss {
            line(format!("rss       {:.1} MiB (target process)", mib(r)));
        }
        line(format!(
            "skipped   {} pages last pass, {} total (still mapped elsewhere or busy)",
            self.pages_skipped_last, self.pages_skipped_total
        ));
        let t = &self.time;
        line(format!(
            "time      scan {:.1} ms ({:.1} ms/GiB), move {:.1} ms; cpu scan {:.0} ms, move {:.0} ms total",
            t.last_scan_ms, t.scan_ms_per_gib, t.last_move_ms, t.scan_cpu_ms_total, t.move_cpu_ms_total
        ));
        line(format!(
            "psi       some avg10 {} (limit {}), {} back-offs",
            self.psi_some_avg10
                .map_or("n/a".into(), |v| format!("{v:.2}")),
            self.policy.psi_limit,
            self.psi_backoffs
        ));
        if !self.release.sockets.is_empty() {
            let r = &self.release;
            line(format!(
                "vublk     {} releases ({:.1} MiB), {} failures{}",
                r.requests,
                mib(r.released_bytes_total),
                r.failures,
                r.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(", last: {e}"))
            ));
        }
        line("ages (scans)   resident pages   out pages".into());
        for h in &self.age_histogram {
            line(format!(
                "  {:<12} {:>14} {:>11}",
                h.ages, h.resident_pages, h.out_pages
            ));
        }
        if let Some(e) = &self.last_error {
            line(format!("error     {e}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_render() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/123.json");
        let s = Status {
            version: 1,
            pid: 123,
            state: "running".into(),
            scans: 7,
            bytes: ByteStats {
                total: 256 << 20,
                moved_out: 200 << 20,
                ..Default::default()
            },
            age_histogram: vec![HistogramBucket {
                ages: "0".into(),
                resident_pages: 5,
                out_pages: 1,
            }],
            ..Default::default()
        };
        s.write(&p).unwrap();
        let r = Status::read(&p).unwrap();
        assert_eq!(r, s);
        let text = r.render();
        assert!(
            text.contains("process 123: running after 7 scans"),
            "{text}"
        );
        assert!(text.contains("moved out 200.0 MiB"), "{text}");
        std::fs::write(&p, "{}").unwrap();
        assert!(Status::read(&p).is_err());
        assert_eq!(default_path(9), PathBuf::from("/run/vublk-tier/9.json"));
    }
}
