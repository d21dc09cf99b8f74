//! Live counters: per-queue operation counts, bytes, errors, retries,
//! throttled time and a latency histogram. Each queue's counters are written
//! by its own thread only (relaxed atomics, no contention) and read by the
//! control socket and metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: percentiles within ~9%.
const SUB: usize = 8;
const BUCKETS: usize = 64 * SUB;

/// A log-linear latency histogram in nanoseconds.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros() as usize; // ns in [2^exp, 2^(exp+1))
    let shift = exp - SUB.trailing_zeros() as usize;
    let sub = ((ns >> shift) as usize) & (SUB - 1);
    ((exp - SUB.trailing_zeros() as usize + 1) * SUB + sub).min(BUCKETS - 1)
}

/// The upper bound of a bucket, in nanoseconds.
fn bucket_high(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let exp = b / SUB - 1 + SUB.trailing_zeros() as usize;
    let sub = (b % SUB) as u64;
    let shift = exp - SUB.trailing_zeros() as usize;
    ((SUB as u64 + sub + 1) << shift).saturating_sub(1)
}

impl Histogram {
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Relaxed),
            count: self.count.load(Relaxed),
        }
    }
}

/// A copy of a histogram; two snapshots subtract to give an interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    buckets: Vec<u64>,
    pub sum_ns: u64,
    pub count: u64,
}

impl HistogramSnapshot {
    pub fn mean_ns(&self) -> u64 {
        self.sum_ns.checked_div(self.count).unwrap_or(0)
    }

    /// The latency below which `p` (0..=1) of the samples fall.
    pub fn percentile_ns(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((self.count as f64 * p).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return bucket_high(b);
            }
        }
        bucket_high(BUCKETS - 1)
    }

    /// Samples recorded since `earlier`.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .zip(earlier.buckets.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            count: self.count.saturating_sub(earlier.count),
        }
    }
}

/// Counters of one virtqueue.
#[derive(Default)]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub other: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Resubmissions of failed requests (I/O suspension).
    pub retries: AtomicU64,
    /// Total time requests spent waiting for QoS tokens.
    pub throttled_ns: AtomicU64,
    pub inflight: AtomicU64,
    pub latency: Histogram,
}

/// A point-in-time copy of one queue's counters (also what the control
/// socket sends and `vublk stat` reads back).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub queue: u16,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub other: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub retries: u64,
    pub throttled_ns: u64,
    /// Requests taken from the ring and not yet completed (queue depth).
    pub inflight: u64,
    pub latency_count: u64,
    pub latency_sum_ns: u64,
    pub latency_mean_ns: u64,
    pub latency_p50_ns: u64,
    pub latency_p99_ns: u64,
    pub latency_p999_ns: u64,
    #[serde(skip)]
    pub histogram: HistogramSnapshot,
}

impl QueueStats {
    pub fn snapshot(&self, queue: u16) -> QueueSnapshot {
        let h = self.latency.snapshot();
        QueueSnapshot {
            queue,
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            other: self.other.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            throttled_ns: self.throttled_ns.load(Relaxed),
            inflight: self.inflight.load(Relaxed),
            latency_count: h.count,
            latency_sum_ns: h.sum_ns,
            latency_mean_ns: h.mean_ns(),
            latency_p50_ns: h.percentile_ns(0.5),
            latency_p99_ns: h.percentile_ns(0.99),
            latency_p999_ns: h.percentile_ns(0.999),
            histogram: h,
        }
    }
}

/// Counters of one disk: its queues plus alarms.
pub struct DiskStats {
    queues: Vec<Arc<QueueStats>>,
    /// Alarms raised since start.
    pub alarms_raised: AtomicU64,
    /// Requests retrying for longer than `alarm-after` now.
    pub alarms_active: AtomicU64,
}

impl DiskStats {
    pub fn new(num_queues: u16) -> DiskStats {
        DiskStats {
            queues: (0..num_queues)
                .map(|_| Arc::new(QueueStats::default()))
                .collect(),
            alarms_raised: AtomicU64::new(0),
            alarms_active: AtomicU64::new(0),
        }
    }

    /// The counters of queue `index` (a fresh, detached set if out of range).
    pub fn queue(&self, index: u16) -> Arc<QueueStats> {
        self.queues
            .get(usize::from(index))
            .cloned()
            .unwrap_or_default()
    }

    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.snapshot(i as u16))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for ns in (0..5000u64).chain([1 << 20, 123_456_789, u64::MAX / 2]) {
            let b = bucket_of(ns);
            assert!(b >= last || ns > 5000, "bucket order at {ns}");
            last = b;
            assert!(
                bucket_high(b) >= ns,
                "{ns} above its bucket bound {}",
                bucket_high(b)
            );
            if b > 0 {
                assert!(bucket_high(b - 1) < ns, "{ns} belongs to an earlier bucket");
            }
        }
    }

    #[test]
    fn percentiles_are_close() {
        let h = Histogram::default();
        for ns in 1..=10_000u64 {
            h.record(ns * 100); // 100 ns .. 1 ms, uniform
        }
        let s = h.snapshot();
        assert_eq!(s.count, 10_000);
        assert_eq!(s.mean_ns(), 500_050);
        let p50 = s.percentile_ns(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.13, "p50 {p50}");
        let p99 = s.percentile_ns(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.13, "p99 {p99}");
        let later = {
            h.record(5);
            h.snapshot()
        };
        let d = later.since(&s);
        assert_eq!(d.count, 1);
        assert_eq!(d.percentile_ns(1.0), 5);
    }
}
