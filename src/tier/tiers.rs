//! Where cold pages go: swap (zram, zswap, any swap) through MADV_PAGEOUT,
//! or a slower NUMA node through `move_pages`; and the memory-pressure
//! signal (PSI) that pauses moving.

use crate::tier::policy::TierSpec;
use serde::{Deserialize, Serialize};
use std::io;

/// One line of /proc/swaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapDev {
    /// Device or file.
    pub name: String,
    /// Size in KiB.
    pub size_kb: u64,
    /// Used KiB.
    pub used_kb: u64,
    /// Priority.
    pub priority: i64,
}

/// Parse /proc/swaps.
pub fn parse_swaps(text: &str) -> Vec<SwapDev> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                return None;
            }
            Some(SwapDev {
                name: f[0].to_string(),
                size_kb: f[2].parse().ok()?,
                used_kb: f[3].parse().ok()?,
                priority: f[4].parse().ok()?,
            })
        })
        .collect()
}

/// Active swap devices.
pub fn swaps() -> io::Result<Vec<SwapDev>> {
    Ok(parse_swaps(&std::fs::read_to_string("/proc/swaps")?))
}

/// Whether zswap is enabled.
pub fn zswap_enabled() -> bool {
    std::fs::read_to_string("/sys/module/zswap/parameters/enabled")
        .map(|s| s.trim() == "Y" || s.trim() == "1")
        .unwrap_or(false)
}

/// A NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node number.
    pub id: u32,
    /// Has CPUs.
    pub has_cpus: bool,
}

/// Online NUMA nodes with memory.
pub fn numa_nodes() -> Vec<Node> {
    let list = std::fs::read_to_string("/sys/devices/system/node/has_memory").unwrap_or_default();
    parse_cpulist(&list)
        .into_iter()
        .map(|id| {
            let cpus =
                std::fs::read_to_string(format!("/sys/devices/system/node/node{id}/cpulist"))
                    .unwrap_or_default();
            Node {
                id,
                has_cpus: !parse_cpulist(&cpus).is_empty(),
            }
        })
        .collect()
}

/// Parse a kernel list such as `0-3,8,10-11`.
pub fn parse_cpulist(s: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    out.extend(a..=b.min(a.saturating_add(4096)));
                }
            }
            None => {
                if let Ok(v) = part.parse() {
                    out.push(v);
                }
            }
        }
    }
    out
}

/// A usable destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tier {
    /// MADV_PAGEOUT to swap (the kernel picks the device by priority).
    Pageout,
    /// move_pages to `node`; `fast` is where hot pages go back.
    Numa {
        /// Slow node.
        node: u32,
        /// Fast node (the first node with CPUs).
        fast: u32,
    },
}

/// One configured tier and whether it can be used now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStatus {
    /// The configured tier, e.g. `zram` or `numa:1`.
    pub tier: String,
    /// Usable now.
    pub available: bool,
    /// How, or why not.
    pub detail: String,
}

/// Host facts the resolution depends on (separate for tests).
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Active swaps.
    pub swaps: Vec<SwapDev>,
    /// zswap enabled.
    pub zswap: bool,
    /// NUMA nodes with memory.
    pub nodes: Vec<Node>,
}

impl HostFacts {
    /// Read them from /proc and /sys.
    pub fn read() -> Self {
        Self {
            swaps: swaps().unwrap_or_default(),
            zswap: zswap_enabled(),
            nodes: numa_nodes(),
        }
    }
}

/// Resolve the configured tiers against the host: the usable tiers in
/// order (consecutive swap kinds collapse into one pageout tier, since the
/// kernel picks the swap device) and a status line for each configured one.
pub fn resolve(specs: &[TierSpec], host: &HostFacts) -> (Vec<Tier>, Vec<TierStatus>) {
    let mut active = Vec::new();
    let mut status = Vec::new();
    let swap_names = host
        .swaps
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let fast = host
        .nodes
        .iter()
        .find(|n| n.has_cpus)
        .map(|n| n.id)
        .unwrap_or(0);
    for spec in specs {
        let (name, r): (String, Result<(Tier, String), String>) = match spec {
            TierSpec::Zram => {
                let z: Vec<&str> = host
                    .swaps
                    .iter()
                    .filter(|s| s.name.contains("/zram"))
                    .map(|s| s.name.as_str())
                    .collect();
                (
                    "zram".into(),
                    if z.is_empty() {
                        Err("no zram swap active".into())
                    } else {
                        Ok((Tier::Pageout, format!("pageout to {}", z.join(", "))))
                    },
                )
            }
            TierSpec::Zswap => (
                "zswap".into(),
                match (host.zswap, host.swaps.is_empty()) {
                    (false, _) => Err("zswap disabled".into()),
                    (true, true) => Err("zswap enabled but no swap behind it".into()),
                    (true, false) => Ok((
                        Tier::Pageout,
                        format!("pageout through zswap to {swap_names}"),
                    )),
                },
            ),
            TierSpec::Swap => (
                "swap".into(),
                if host.swaps.is_empty() {
                    Err("no swap active".into())
                } else {
                    Ok((Tier::Pageout, format!("pageout to {swap_names}")))
                },
            ),
            TierSpec::Numa { node } => {
                let ids = host
                    .nodes
                    .iter()
                    .map(|n| n.id.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let pick = match node {
                    Some(n) => host.nodes.iter().find(|x| x.id == *n && x.id != fast),
                    None => host.nodes.iter().find(|x| !x.has_cpus),
                };
                (
                    node.map_or("numa".into(), |n| format!("numa:{n}")),
                    match pick {
                        Some(n) if host.nodes.len() > 1 => Ok((
                            Tier::Numa { node: n.id, fast },
                            format!(
                                "move_pages to node {} (hot pages back to node {fast})",
                                n.id
                            ),
                        )),
                        _ => Err(format!("no slower NUMA node (nodes with memory: {ids})")),
                    },
                )
            }
        };
        match r {
            Ok((tier, detail)) => {
                let dup = tier == Tier::Pageout && active.last() == Some(&Tier::Pageout);
                if !dup && !active.contains(&tier) {
                    active.push(tier);
                }
                status.push(TierStatus {
                    tier: name,
                    available: true,
                    detail,
                });
            }
            Err(detail) => status.push(TierStatus {
                tier: name,
                available: false,
                detail,
            }),
        }
    }
    (active, status)
}

/// `some avg10` of /proc/pressure/memory, in percent.
pub fn psi_memory_some_avg10() -> Option<f64> {
    parse_psi(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
}

/// Parse the `some avg10=` value of a PSI file.
pub fn parse_psi(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(swaps: &[&str], zswap: bool, nodes: &[(u32, bool)]) -> HostFacts {
        HostFacts {
            swaps: swaps
                .iter()
                .map(|n| SwapDev {
                    name: n.to_string(),
                    size_kb: 1,
                    used_kb: 0,
                    priority: 1,
                })
                .collect(),
            zswap,
            nodes: nodes
                .iter()
                .map(|&(id, has_cpus)| Node { id, has_cpus })
                .collect(),
        }
    }

    #[test]
    fn parses_proc_swaps() {
        let s = parse_swaps(
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/zram1                              partition\t524284\t\t1024\t\t100\n",
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "/dev/zram1");
        assert_eq!(
            (s[0].size_kb, s[0].used_kb, s[0].priority),
            (524284, 1024, 100)
        );
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn resolves_tiers_in_order() {
        let specs = vec![
            TierSpec::Numa { node: None },
            TierSpec::Zram,
            TierSpec::Swap,
        ];
        // This machine: one node, no swap.
        let (a, s) = resolve(&specs, &host(&[], false, &[(0, true)]));
        assert!(a.is_empty());
        assert!(s.iter().all(|t| !t.available));
        assert!(s[0].detail.contains("no slower NUMA node"), "{s:?}");
        // zram active: zram and swap collapse into one pageout tier.
        let (a, s) = resolve(&specs, &host(&["/dev/zram1"], false, &[(0, true)]));
        assert_eq!(a, vec![Tier::Pageout]);
        assert!(s[1].available && s[2].available);
        // Two nodes, node 1 memory-only: NUMA first, then pageout.
        let (a, _) = resolve(
            &specs,
            &host(&["/swapfile"], false, &[(0, true), (1, false)]),
        );
        assert_eq!(a, vec![Tier::Numa { node: 1, fast: 0 }, Tier::Pageout]);
        // zram asked for but only a swap file: unavailable.
        let (a, s) = resolve(
            &[TierSpec::Zram],
            &host(&["/swapfile"], false, &[(0, true)]),
        );
        assert!(a.is_empty() && !s[0].available);
        let (a, _) = resolve(
            &[TierSpec::Zswap],
            &host(&["/swapfile"], true, &[(0, true)]),
        );
        assert_eq!(a, vec![Tier::Pageout]);
        let (a, _) = resolve(
            &[TierSpec::Numa { node: Some(0) }],
            &host(&[], false, &[(0, true), (1, true)]),
        );
        assert!(a.is_empty());
    }

    #[test]
    fn cpulist_and_psi() {
        assert_eq!(parse_cpulist("0-2,5\n"), vec![0, 1, 2, 5]);
        assert!(parse_cpulist("\n").is_empty());
        let t = "some avg10=1.50 avg60=0.00 avg300=0.00 total=10\nfull avg10=0.20 avg60=0.00 avg300=0.00 total=3\n";
        assert_eq!(parse_psi(t), Some(1.5));
        assert_eq!(parse_psi("garbage"), None);
    }
}
