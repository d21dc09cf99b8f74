//! Working-set estimate from `clear_refs` and `smaps` Referenced.
//!
//! Writing `1` to `/proc/PID/clear_refs` clears the Accessed bits of all the
//! process's pages; one interval later, the `Referenced:` lines of
//! `/proc/PID/smaps` for the guest-RAM mapping sum the bytes touched since.
//! It gives one number per mapping, not per page, so as a tracker it drives
//! no moves; the controller also uses it beside the probe for the report.
//! It must not run together with page_idle (clearing Accessed bits between
//! a mark and its read-back would hide accesses), and it never does.

use crate::tier::target::Target;
use crate::tier::tracker::{Access, Capabilities, ScanInput, ScanResult, Tracker, TrackerError};

/// The working-set estimator.
#[derive(Debug)]
pub struct Wss {
    pid: i32,
    start: u64,
    end: u64,
    armed: bool,
}

impl Wss {
    /// Whether clear_refs of `pid` can be written.
    pub fn check(pid: i32) -> Result<String, String> {
        let p = format!("/proc/{pid}/clear_refs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map(|_| "clear_refs + smaps Referenced, per mapping".to_string())
            .map_err(|e| format!("{p}: {e}"))
    }

    /// An estimator for the target's mapping.
    pub fn for_target(t: &Target) -> Self {
        Self::new(t.pid(), t.region().start, t.region().end)
    }

    /// An estimator for `[start, end)` of process `pid`.
    pub fn new(pid: i32, start: u64, end: u64) -> Self {
        Self {
            pid,
            start,
            end,
            armed: false,
        }
    }

    /// The bytes referenced since the previous call (None on the first),
    /// then clear the Accessed bits for the next interval.
    pub fn estimate(&mut self) -> Result<Option<u64>, TrackerError> {
        let r = if self.armed {
            let p = format!("/proc/{}/smaps", self.pid);
            let text = std::fs::read_to_string(&p)
                .map_err(|source| TrackerError::Io { what: p, source })?;
            Some(referenced_in(&text, self.start, self.end)?)
        } else {
            None
        };
        let p = format!("/proc/{}/clear_refs", self.pid);
        std::fs::write(&p, "1").map_err(|source| TrackerError::Io { what: p, source })?;
        self.armed = true;
        Ok(r)
    }
}

/// Sum `Referenced:` (bytes) over the smaps entries inside `[start, end)`.
pub fn referenced_in(smaps: &str, start: u64, end: u64) -> Result<u64, TrackerError> {
    let mut inside = false;
    let mut total = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = a >= start && b <= end;
                continue;
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix("Referenced:") {
                let kb: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .map_err(|_| TrackerError::Parse(format!("smaps line {line:?}")))?;
                total += kb * 1024;
            }
        }
    }
    Ok(total)
}

impl Tracker for Wss {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "wss".into(),
            per_page: false,
            sees_reads: true,
            evicts_to_measure: false,
            working_set: true,
            detail:
                "clear_refs + smaps Referenced: working-set bytes of the mapping per interval; \
                     no per-page ages, so it reports and moves nothing"
                    .into(),
        }
    }

    fn scan(&mut self, input: ScanInput<'_>) -> Result<ScanResult, TrackerError> {
        let mut res = ScanResult::default();
        for i in 0..input.pages.len() {
            if !input.pages.out.get(i) {
                res.record(input.pages, i, Access::Unknown);
            }
        }
        res.wss_bytes = self.estimate()?;
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0010000000 rw-s 00000000 00:01 4242 /memfd:pc.ram (deleted)
Size:             262144 kB
Referenced:        1024 kB
Anonymous:             0 kB
7f0010000000-7f0040000000 rw-s 10000000 00:01 4242 /memfd:pc.ram (deleted)
Size:             786432 kB
Referenced:          12 kB
7f0050000000-7f0060000000 rw-p 00000000 00:00 0
Referenced:       99999 kB
VmFlags: rd wr sh mr mw me ms sd
";

    #[test]
    fn sums_referenced_inside_range() {
        let r = referenced_in(SMAPS, 0x7f0000000000, 0x7f0040000000).unwrap();
        assert_eq!(r, (1024 + 12) * 1024);
        assert_eq!(
            referenced_in(SMAPS, 0x7f0010000000, 0x7f0040000000).unwrap(),
            12 * 1024
        );
        assert_eq!(referenced_in(SMAPS, 0, 1).unwrap(), 0);
        assert!(referenced_in("1000-2000 rw-s 0 0:0 0\nReferenced: lots kB\n", 0, 0x3000).is_err());
    }
}
