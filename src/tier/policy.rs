//! The tiering policy: a TOML file, its defaults and its validation.
//!
//! Every field is optional in the file; `Policy::default()` is what
//! `vublk-tier --pid PID` runs with. Sizes accept integers (bytes) or strings
//! with a binary unit (`"256MiB"`, `"4G"`); durations accept seconds (a
//! number) or strings with a unit (`"500ms"`, `"10s"`, `"2m"`).

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Errors loading or validating a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("parsing policy: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid policy: {0}")]
    Invalid(String),
}

/// Which access tracker to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerChoice {
    /// The best available: page_idle, else the eviction probe, else the
    /// working-set estimate (report only).
    #[default]
    Auto,
    /// Idle page tracking (`/sys/kernel/mm/page_idle/bitmap`).
    PageIdle,
    /// The eviction probe (page out a sample, count what faults back).
    Probe,
    /// clear_refs + smaps Referenced: a working-set size, no per-page data,
    /// so nothing is moved.
    Wss,
}

impl std::str::FromStr for TrackerChoice {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.replace('_', "-").as_str() {
            "auto" => Ok(Self::Auto),
            "page-idle" => Ok(Self::PageIdle),
            "probe" => Ok(Self::Probe),
            "wss" => Ok(Self::Wss),
            other => Err(PolicyError::Invalid(format!(
                "unknown tracker {other:?} (auto, page-idle, probe, wss)"
            ))),
        }
    }
}

/// A destination for cold pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TierSpec {
    /// Swap on a zram device (must be active in /proc/swaps).
    Zram,
    /// Swap with zswap enabled in front of it.
    Zswap,
    /// Any active swap device or file.
    Swap,
    /// A NUMA node; without `node`, the first memory-only node.
    Numa {
        /// The node number.
        #[serde(default)]
        node: Option<u32>,
    },
}

/// A size in bytes, written as an integer or as `"64MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "SizeRepr")]
pub struct Bytes(pub u64);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Int(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for Bytes {
    type Error = String;
    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Int(n) => Ok(Bytes(n)),
            SizeRepr::Text(t) => parse_size(&t).map(Bytes),
        }
    }
}

impl From<Bytes> for SizeRepr {
    fn from(b: Bytes) -> Self {
        SizeRepr::Text(format_size(b.0))
    }
}

/// A duration, written as seconds (number) or as `"500ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DurRepr", into = "DurRepr")]
pub struct Dur(pub Duration);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum DurRepr {
    Secs(f64),
    Text(String),
}

impl TryFrom<DurRepr> for Dur {
    type Error = String;
    fn try_from(r: DurRepr) -> Result<Self, String> {
        match r {
            DurRepr::Secs(s) => secs(s).map(Dur),
            DurRepr::Text(t) => parse_duration(&t).map(Dur),
        }
    }
}

impl From<Dur> for DurRepr {
    fn from(d: Dur) -> Self {
        let ms = d.0.as_millis();
        DurRepr::Text(if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        })
    }
}

fn secs(s: f64) -> Result<Duration, String> {
    if s.is_finite() && (0.0..1e9).contains(&s) {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(format!("bad duration {s}"))
    }
}

/// Parse `"256MiB"`, `"4G"`, `"4096"`, `"1.5GiB"` (units are binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("bad size unit in {s:?} (B, KiB, MiB, GiB, TiB)")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 / 2.0 {
        return Err(format!("size out of range: {s:?}"));
    }
    Ok(v as u64)
}

/// Format bytes with the largest binary unit that divides them.
pub fn format_size(b: u64) -> String {
    for (u, m) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if b >= m && b % m == 0 {
            return format!("{}{}", b / m, u);
        }
    }
    format!("{b}B")
}

/// Parse `"500ms"`, `"10s"`, `"2m"`, `"0.25"` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let f = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    secs(n * f)
}

/// The policy. See `examples/tier-policy.toml` for a commented file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Time between scans.
    pub scan_interval: Dur,
    /// Scans without an access after which a page is cold.
    pub cold_age: u8,
    /// Upper limit for the cold age when refaults raise it.
    pub max_cold_age: u8,
    /// Fraction of the moved-out pages of a 2 MiB block that must fault
    /// back within one scan for the whole block to count as hot again: its
    /// other pages are then brought back with MADV_WILLNEED (and, on a NUMA
    /// tier, moved back to the fast node).
    pub hot_threshold: f64,
    /// Most bytes moved per second (pageout, NUMA moves and probe samples).
    pub max_move_rate: Bytes,
    /// Never page out below this many resident bytes of guest RAM.
    pub resident_floor: Bytes,
    /// Keep at most this many bytes moved out (0: no cap).
    pub cold_cap: Bytes,
    /// Refaults per second tolerated; above it the cold age is raised by
    /// one each scan (up to `max_cold_age`), and it decays back when the
    /// refault rate stays under a quarter of the budget.
    pub refault_budget: Bytes,
    /// Skip moving while `/proc/pressure/memory` "some avg10" exceeds this
    /// percentage (0 disables the check).
    pub psi_limit: f64,
    /// Which tracker to use.
    pub tracker: TrackerChoice,
    /// Eviction probe: most of the mapping (fraction) paged out per scan.
    pub probe_sample: f64,
    /// Refresh the clear_refs+smaps working-set estimate every N scans
    /// (0: never). Not used with page_idle, which measures it exactly.
    pub wss_every: u32,
    /// Destinations in order; the k-th available tier takes pages of age
    /// at least `cold_age * (k + 1)`.
    pub tiers: Vec<TierSpec>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            scan_interval: Dur(Duration::from_secs(10)),
            cold_age: 12,
            max_cold_age: 96,
            hot_threshold: 0.5,
            max_move_rate: Bytes(256 << 20),
            resident_floor: Bytes(0),
            cold_cap: Bytes(0),
            refault_budget: Bytes(4 << 20),
            psi_limit: 20.0,
            tracker: TrackerChoice::Auto,
            probe_sample: 0.05,
            wss_every: 1,
            tiers: vec![TierSpec::Numa { node: None }, TierSpec::Swap],
        }
    }
}

impl Policy {
    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let p: Policy = toml::from_str(text)?;
        p.validate()?;
        Ok(p)
    }

    /// Read, parse and validate a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Check every field's range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |m: String| Err(PolicyError::Invalid(m));
        let iv = self.scan_interval.0;
        if iv < Duration::from_millis(10) || iv > Duration::from_secs(3600) {
            return bad(format!("scan_interval {iv:?} outside 10ms..1h"));
        }
        if self.cold_age == 0 || self.cold_age == u8::MAX {
            return bad(format!("cold_age {} outside 1..=254", self.cold_age));
        }
        if self.max_cold_age < self.cold_age {
            return bad(format!(
                "max_cold_age {} below cold_age {}",
                self.max_cold_age, self.cold_age
            ));
        }
        if !(self.hot_threshold > 0.0 && self.hot_threshold <= 1.0) {
            return bad(format!(
                "hot_threshold {} outside (0, 1]",
                self.hot_threshold
            ));
        }
        if !(self.probe_sample > 0.0 && self.probe_sample <= 1.0) {
            return bad(format!("probe_sample {} outside (0, 1]", self.probe_sample));
        }
        if !(0.0..=100.0).contains(&self.psi_limit) {
            return bad(format!("psi_limit {} outside 0..=100", self.psi_limit));
        }
        if self.max_move_rate.0 < 4096 {
            return bad("max_move_rate below one page per second".into());
        }
        if self.tiers.is_empty() {
            return bad("tiers is empty".into());
        }
        Ok(())
    }

    /// The cold age after `n` scans of over-budget refaults (saturating).
    pub fn raised_cold_age(&self, current: u8) -> u8 {
        current.saturating_add(1).min(self.max_cold_age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_empty_file_is_default() {
        Policy::default().validate().unwrap();
        assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
    }

    #[test]
    fn parses_a_full_file() {
        let p = Policy::from_toml(
            r#"
scan_interval = "500ms"
cold_age = 4
max_cold_age = 20
hot_threshold = 0.75
max_move_rate = "1GiB"
resident_floor = "64MiB"
cold_cap = 1073741824
refault_budget = "512KiB"
psi_limit = 5.5
tracker = "probe"
probe_sample = 0.25
wss_every = 0
[[tiers]]
kind = "numa"
node = 1
[[tiers]]
kind = "zram"
"#,
        )
        .unwrap();
        assert_eq!(p.scan_interval.0, Duration::from_millis(500));
        assert_eq!(p.cold_age, 4);
        assert_eq!(p.max_move_rate.0, 1 << 30);
        assert_eq!(p.resident_floor.0, 64 << 20);
        assert_eq!(p.cold_cap.0, 1 << 30);
        assert_eq!(p.refault_budget.0, 512 << 10);
        assert_eq!(p.tracker, TrackerChoice::Probe);
        assert_eq!(
            p.tiers,
            vec![TierSpec::Numa { node: Some(1) }, TierSpec::Zram]
        );
        // Round trip through TOML keeps every value.
        let text = toml::to_string(&p).unwrap();
        assert_eq!(Policy::from_toml(&text).unwrap(), p);
    }

    #[test]
    fn example_file_is_the_default_policy() {
        let p = Policy::from_toml(include_str!("../../examples/tier-policy.toml")).unwrap();
        assert_eq!(p, Policy::default());
    }

    #[test]
    fn numeric_interval_is_seconds() {
        let p = Policy::from_toml("scan_interval = 2.5").unwrap();
        assert_eq!(p.scan_interval.0, Duration::from_millis(2500));
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "cold_age = 0",
            "cold_age = 255",
            "cold_age = 10\nmax_cold_age = 5",
            "hot_threshold = 0.0",
            "hot_threshold = 1.5",
            "probe_sample = 0",
            "psi_limit = 101",
            "scan_interval = \"1ms\"",
            "scan_interval = \"2h\"",
            "max_move_rate = 1",
            "tiers = []",
            "max_move_rate = \"12 parsecs\"",
            "tracker = \"damon\"",
            "colde_age = 3",
            "[[tiers]]\nkind = \"tape\"",
        ] {
            assert!(Policy::from_toml(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("MiB").is_err());
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn cold_age_raise_saturates() {
        let p = Policy {
            cold_age: 3,
            max_cold_age: 5,
            ..Policy::default()
        };
        assert_eq!(p.raised_cold_age(3), 4);
        assert_eq!(p.raised_cold_age(5), 5);
        assert_eq!(
            "page_idle".parse::<TrackerChoice>().unwrap(),
            TrackerChoice::PageIdle
        );
    }
}
