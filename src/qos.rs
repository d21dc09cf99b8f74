//! Per-disk QoS: IOPS and bandwidth limits with bursts, shared by all the
//! queues of a disk.
//!
//! Each limit is a token bucket expressed as a GCRA ("virtual scheduling"):
//! a theoretical arrival time advances by cost/rate per request, and a
//! request may start once it is no more than the bucket's depth ahead of
//! now. Admission *reserves* a start time for each request as it arrives,
//! so queues are served in arrival order (fair across queues) and a queue
//! thread never spins: it arms a timer for the start time and keeps
//! accepting other requests meanwhile.
//!
//! A burst (QEMU's `*-max` / `*-max-length`) is a second bucket: the
//! sustained one gets a depth of (burst - rate) * length, so a burst can run
//! for `length` at the burst rate, and a burst-rate bucket with a small depth
//! caps the instantaneous rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Limit, QosLimits};

/// Depth of a bucket without a configured burst: 10 ms worth of the rate,
/// and at least one request, so that short jitter is absorbed but the
/// limit holds within 1% over a second.
const DEFAULT_DEPTH: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

#[derive(Debug)]
struct Gcra {
    /// Units (operations or bytes) per second.
    rate: f64,
    /// How far ahead of now the theoretical arrival time may run, in s.
    tolerance: f64,
    /// Theoretical arrival time, seconds since the limiter's epoch.
    tat: f64,
}

impl Gcra {
    fn new(rate: u64, depth_units: f64, now: f64) -> Gcra {
        let rate = rate.max(1) as f64;
        Gcra {
            rate,
            tolerance: depth_units.max(1.0) / rate,
            tat: now,
        }
    }

    fn earliest(&self) -> f64 {
        self.tat - self.tolerance
    }

    fn reserve(&mut self, start: f64, cost: f64) {
        self.tat = self.tat.max(start) + cost / self.rate;
    }
}

/// The bucket(s) of one limit.
#[derive(Debug)]
struct Bucket {
    sustained: Gcra,
    burst: Option<Gcra>,
}

impl Bucket {
    fn new(limit: &Limit, now: f64) -> Bucket {
        let rate = limit.rate as f64;
        match limit.burst {
            Some(burst) => {
                let depth = (burst as f64 - rate) * limit.burst_length.as_secs_f64();
                Bucket {
                    sustained: Gcra::new(limit.rate, depth, now),
                    burst: Some(Gcra::new(
                        burst,
                        burst as f64 * DEFAULT_DEPTH.as_secs_f64(),
                        now,
                    )),
                }
            }
            None => Bucket {
                sustained: Gcra::new(limit.rate, rate * DEFAULT_DEPTH.as_secs_f64(), now),
                burst: None,
            },
        }
    }

    fn gcras(&mut self) -> impl Iterator<Item = &mut Gcra> {
        std::iter::once(&mut self.sustained).chain(self.burst.as_mut())
    }
}

#[derive(Debug)]
struct Buckets {
    limits: QosLimits,
    iops: Option<Bucket>,
    iops_read: Option<Bucket>,
    iops_write: Option<Bucket>,
    bps: Option<Bucket>,
    bps_read: Option<Bucket>,
    bps_write: Option<Bucket>,
}

impl Buckets {
    fn new(limits: QosLimits, now: f64) -> Buckets {
        let b = |l: Option<Limit>| l.map(|l| Bucket::new(&l, now));
        Buckets {
            limits,
            iops: b(limits.iops),
            iops_read: b(limits.iops_read),
            iops_write: b(limits.iops_write),
            bps: b(limits.bps),
            bps_read: b(limits.bps_read),
            bps_write: b(limits.bps_write),
        }
    }
}

/// The limiter of one disk.
pub struct Qos {
    epoch: Instant,
    /// Lets unlimited disks skip the lock on the data path.
    active: AtomicBool,
    buckets: Mutex<Buckets>,
}

impl Qos {
    pub fn new(limits: QosLimits) -> Qos {
        Qos {
            epoch: Instant::now(),
            active: AtomicBool::new(!limits.is_unlimited()),
            buckets: Mutex::new(Buckets::new(limits, 0.0)),
        }
    }

    /// False when no limit is set: callers need not call `admit`.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.epoch).as_secs_f64()
    }

    /// Replaces the limits (SIGHUP, control socket). Buckets start afresh.
    pub fn set_limits(&self, limits: QosLimits) {
        let now = self.secs(Instant::now());
        if let Ok(mut b) = self.buckets.lock() {
            *b = Buckets::new(limits, now);
            self.active.store(!limits.is_unlimited(), Ordering::Relaxed);
        }
    }

    pub fn limits(&self) -> QosLimits {
        self.buckets.lock().map(|b| b.limits).unwrap_or_default()
    }

    /// Reserves tokens for a read or write of `bytes` arriving at `now`;
    /// returns when it may start (`now` if at once).
    pub fn admit(&self, dir: Dir, bytes: u64, now: Instant) -> Instant {
        let Ok(mut b) = self.buckets.lock() else {
            return now;
        };
        let t = self.secs(now);
        let ops = match b.limits.iops_size {
            Some(size) => bytes.div_ceil(size).max(1) as f64,
            None => 1.0,
        };
        let bytes = bytes as f64;
        let b = &mut *b;
        let (iops_dir, bps_dir) = match dir {
            Dir::Read => (&mut b.iops_read, &mut b.bps_read),
            Dir::Write => (&mut b.iops_write, &mut b.bps_write),
        };
        let mut charged: [(Option<&mut Bucket>, f64); 4] = [
            (b.iops.as_mut(), ops),
            (iops_dir.as_mut(), ops),
            (b.bps.as_mut(), bytes),
            (bps_dir.as_mut(), bytes),
        ];
        let mut start = t;
        for (bucket, _) in charged.iter_mut() {
            if let Some(bucket) = bucket {
                for g in bucket.gcras() {
                    start = start.max(g.earliest());
                }
            }
        }
        for (bucket, cost) in charged.iter_mut() {
            if let Some(bucket) = bucket {
                for g in bucket.gcras() {
                    g.reserve(start, *cost);
                }
            }
        }
        if start <= t {
            now
        } else {
            self.epoch + Duration::from_secs_f64(start)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: u64) -> Option<Limit> {
        Some(Limit {
            rate,
            burst: None,
            burst_length: Duration::from_secs(1),
        })
    }

    /// Simulates a client that always has work: each request starts at the
    /// time the limiter grants; counts grants within `span`.
    fn granted(q: &Qos, dir: Dir, bytes: u64, t0: Instant, span: Duration) -> u64 {
        let mut n = 0;
        let mut now = t0;
        loop {
            let start = q.admit(dir, bytes, now);
            if start >= t0 + span {
                return n;
            }
            n += 1;
            now = now.max(start);
        }
    }

    #[test]
    fn iops_limit_holds() {
        let q = Qos::new(QosLimits {
            iops: limit(1000),
            ..QosLimits::default()
        });
        let t0 = Instant::now();
        let n = granted(&q, Dir::Read, 4096, t0, Duration::from_secs(10));
        // 10 s at 1000/s plus the 10 ms bucket.
        assert!((10_000..=10_011).contains(&n), "{n}");
    }

    #[test]
    fn bandwidth_and_iops_size() {
        let q = Qos::new(QosLimits {
            bps_write: limit(10 << 20),
            ..QosLimits::default()
        });
        let t0 = Instant::now();
        let n = granted(&q, Dir::Write, 1 << 20, t0, Duration::from_secs(10));
        assert!((100..=101).contains(&n), "{n} MiB in 10 s at 10 MiB/s");
        // Reads are not limited by a write limit.
        let r = q.admit(Dir::Read, 1 << 30, t0);
        assert_eq!(r, t0);

        let q = Qos::new(QosLimits {
            iops: limit(100),
            iops_size: Some(64 << 10),
            ..QosLimits::default()
        });
        // A 1 MiB request costs 16 operations.
        let n = granted(
            &q,
            Dir::Read,
            1 << 20,
            Instant::now(),
            Duration::from_secs(16),
        );
        assert!((100..=101).contains(&n), "{n}");
    }

    #[test]
    fn burst_runs_for_its_length_then_ends() {
        let q = Qos::new(QosLimits {
            iops: Some(Limit {
                rate: 100,
                burst: Some(1000),
                burst_length: Duration::from_secs(2),
            }),
            ..QosLimits::default()
        });
        let t0 = Instant::now();
        let first = granted(&q, Dir::Read, 4096, t0, Duration::from_secs(2));
        // 2 s at the burst rate ~ 2000, within the bucket (900*2) + refill.
        assert!((1900..=2011).contains(&first), "burst {first}");
        let q2 = Qos::new(q.limits());
        let t1 = Instant::now();
        let total = granted(&q2, Dir::Read, 4096, t1, Duration::from_secs(12));
        // After the burst the rate falls back to 100/s:
        // bucket 1800 + 12 s * 100 = 3000 in total.
        assert!((2950..=3050).contains(&total), "total {total}");
    }

    #[test]
    fn set_limits_takes_effect() {
        let q = Qos::new(QosLimits {
            iops: limit(10),
            ..QosLimits::default()
        });
        q.set_limits(QosLimits {
            iops: limit(1000),
            ..QosLimits::default()
        });
        let n = granted(&q, Dir::Read, 512, Instant::now(), Duration::from_secs(1));
        assert!(n >= 1000, "{n}");
        assert_eq!(q.limits().iops.unwrap().rate, 1000);
    }
}
