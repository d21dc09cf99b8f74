//! The live view of one disk that the control socket, the metrics exporter
//! and sd_notify STATUS= lines report: counters per queue, QoS limits,
//! alarms and whether a frontend is connected.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Limit, QosLimits};
use crate::stats::QueueSnapshot;
use crate::worker::DiskContext;

/// What the daemon is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Starting,
    /// Listening, no frontend.
    Listening,
    /// A frontend is connected.
    Serving,
    Stopping,
}

impl RunState {
    fn from_u8(v: u8) -> RunState {
        match v {
            1 => RunState::Listening,
            2 => RunState::Serving,
            3 => RunState::Stopping,
            _ => RunState::Starting,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            RunState::Starting => 0,
            RunState::Listening => 1,
            RunState::Serving => 2,
            RunState::Stopping => 3,
        }
    }
}

/// The disk as configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub path: String,
    pub size: u64,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub socket: PathBuf,
}

/// One queue's counters (cumulative since start) and, when the client asked
/// for it, the interval since its previous request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueReport {
    #[serde(flatten)]
    pub counters: QueueSnapshot,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Interval>,
}

impl std::ops::Deref for QueueReport {
    type Target = QueueSnapshot;
    fn deref(&self) -> &QueueSnapshot {
        &self.counters
    }
}

impl std::ops::DerefMut for QueueReport {
    fn deref_mut(&mut self) -> &mut QueueSnapshot {
        &mut self.counters
    }
}

/// Rates over the interval since the client's previous `stats` request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub seconds: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    /// Flushes, discards, write-zeroes and others per second.
    pub other_iops: f64,
    pub read_bps: f64,
    pub write_bps: f64,
    pub errors: u64,
    pub retries: u64,
    pub throttled_ms_per_s: f64,
    pub latency_mean_ns: u64,
    pub latency_p50_ns: u64,
    pub latency_p99_ns: u64,
    pub latency_p999_ns: u64,
}

impl QueueReport {
    fn from_snapshot(q: &QueueSnapshot, earlier: Option<(&QueueSnapshot, Duration)>) -> Self {
        let interval = earlier.map(|(e, dt)| {
            let secs = dt.as_secs_f64().max(1e-6);
            let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
            let h = q.histogram.since(&e.histogram);
            let others = |s: &QueueSnapshot| s.flushes + s.discards + s.write_zeroes + s.other;
            Interval {
                seconds: dt.as_secs_f64(),
                read_iops: rate(q.reads, e.reads),
                write_iops: rate(q.writes, e.writes),
                other_iops: rate(others(q), others(e)),
                read_bps: rate(q.bytes_read, e.bytes_read),
                write_bps: rate(q.bytes_written, e.bytes_written),
                errors: q.errors.saturating_sub(e.errors),
                retries: q.retries.saturating_sub(e.retries),
                throttled_ms_per_s: rate(q.throttled_ns, e.throttled_ns) / 1e6,
                latency_mean_ns: h.mean_ns(),
                latency_p50_ns: h.percentile_ns(0.5),
                latency_p99_ns: h.percentile_ns(0.99),
                latency_p999_ns: h.percentile_ns(0.999),
            }
        });
        QueueReport {
            counters: q.clone(),
            interval,
        }
    }
}

/// One request that storage keeps failing (I/O suspension).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlarmEntry {
    pub queue: u16,
    pub sector: u64,
    pub error: String,
    pub failing_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Alarms {
    /// Alarms raised since start.
    pub raised: u64,
    /// Alarms active now.
    pub active: u64,
    pub list: Vec<AlarmEntry>,
}

/// The answer to `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub state: RunState,
    pub disk: DiskInfo,
    pub queues: Vec<QueueReport>,
    pub alarms: Alarms,
    /// QoS limits as config keys (`qos-iops` ...); empty: unlimited.
    pub qos: BTreeMap<String, serde_json::Value>,
}

/// The live view, shared by the control, metrics and notify threads.
pub struct OpsState {
    pub ctx: Arc<DiskContext>,
    pub disk: DiskInfo,
    started: Instant,
    run_state: AtomicU8,
}

impl OpsState {
    pub fn new(config: &Config, ctx: Arc<DiskContext>) -> OpsState {
        let disk = DiskInfo {
            path: ctx.disk.path().display().to_string(),
            size: ctx.disk.size(),
            read_only: ctx.disk.read_only(),
            num_queues: config.num_queues,
            queue_size: config.queue_size,
            socket: config.socket.clone(),
        };
        OpsState {
            ctx,
            disk,
            started: Instant::now(),
            run_state: AtomicU8::new(RunState::Starting.as_u8()),
        }
    }

    pub fn run_state(&self) -> RunState {
        RunState::from_u8(self.run_state.load(Ordering::Relaxed))
    }

    pub fn set_run_state(&self, s: RunState) {
        self.run_state.store(s.as_u8(), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        self.ctx.stats.snapshot()
    }

    pub fn alarms(&self) -> Alarms {
        let stats = &self.ctx.stats;
        Alarms {
            raised: stats.alarms_raised.load(Ordering::Relaxed),
            active: stats.alarms_active.load(Ordering::Relaxed),
            list: self
                .ctx
                .suspension
                .active()
                .into_iter()
                .map(|a| AlarmEntry {
                    queue: a.queue,
                    sector: a.sector,
                    error: a.error.to_string(),
                    failing_s: a.failing_s,
                })
                .collect(),
        }
    }

    pub fn qos_limits(&self) -> QosLimits {
        self.ctx.qos.limits()
    }

    pub fn set_qos_limits(&self, limits: QosLimits) {
        self.ctx.qos.set_limits(limits);
    }

    /// A report; `earlier` (a previous snapshot and when it was taken) adds
    /// interval rates.
    pub fn report(
        &self,
        now: &[QueueSnapshot],
        earlier: Option<(&[QueueSnapshot], Instant)>,
    ) -> Report {
        let queues = now
            .iter()
            .map(|q| {
                let before = earlier.and_then(|(e, at)| {
                    e.iter()
                        .find(|x| x.queue == q.queue)
                        .map(|x| (x, at.elapsed()))
                });
                QueueReport::from_snapshot(q, before)
            })
            .collect();
        Report {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            state: self.run_state(),
            disk: self.disk.clone(),
            queues,
            alarms: self.alarms(),
            qos: qos_to_keys(&self.qos_limits()),
        }
    }

    /// One line for systemd's STATUS=.
    pub fn status_line(&self) -> String {
        let state = match self.run_state() {
            RunState::Starting => "starting".to_string(),
            RunState::Listening => "waiting for a frontend".to_string(),
            RunState::Serving => "serving a frontend".to_string(),
            RunState::Stopping => "stopping".to_string(),
        };
        let stats = &self.ctx.stats;
        let active = stats.alarms_active.load(Ordering::Relaxed);
        let alarms = if active == 0 {
            "no alarms".to_string()
        } else {
            let first = self
                .ctx
                .suspension
                .active()
                .into_iter()
                .next()
                .map(|a| {
                    format!(
                        " (queue {} sector {} {} for {:.0} s)",
                        a.queue, a.sector, a.error, a.failing_s
                    )
                })
                .unwrap_or_default();
            format!("ALARM: {active} request(s) failing{first}")
        };
        format!("{}: {state}; {alarms}", self.disk.path)
    }
}

/// QoS limits as the config keys that set them, so `set-qos` takes back
/// what `stats` shows.
pub fn qos_to_keys(q: &QosLimits) -> BTreeMap<String, serde_json::Value> {
    let mut m = BTreeMap::new();
    let mut put = |name: &str, l: &Option<Limit>| {
        if let Some(l) = l {
            m.insert(format!("qos-{name}"), l.rate.into());
            if let Some(b) = l.burst {
                m.insert(format!("qos-{name}-burst"), b.into());
                m.insert(
                    format!("qos-{name}-burst-length"),
                    format!("{}ms", l.burst_length.as_millis()).into(),
                );
            }
        }
    };
    put("iops", &q.iops);
    put("iops-read", &q.iops_read);
    put("iops-write", &q.iops_write);
    put("bps", &q.bps);
    put("bps-read", &q.bps_read);
    put("bps-write", &q.bps_write);
    if let Some(n) = q.iops_size {
        m.insert("qos-iops-size".into(), n.into());
    }
    m
}
