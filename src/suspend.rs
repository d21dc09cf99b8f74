//! I/O suspension: what to do with a request the backing storage failed.
//!
//! Errors in the configured list are not passed to the guest: the queue
//! thread keeps the request, retries it every `retry-interval`, holds the
//! queue's newer requests behind it (so a retry never reorders writes or
//! crosses a flush), and raises an alarm when it has been failing for
//! `alarm-after`. This module holds the policy and the alarm side effects
//! (log line, counters, operator command); the retry loop lives in the
//! worker.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{errno_name, OnTimeout, SuspendConfig};
use crate::stats::DiskStats;

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Complete the request with IOERR.
    Fail,
    /// Try again after the interval.
    Retry(Duration),
}

/// One failing request, as alarms report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlarmInfo {
    pub queue: u16,
    pub sector: u64,
    pub errno: i32,
    pub duration: Duration,
}

/// An alarm as the control socket reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ActiveAlarm {
    pub queue: u16,
    pub sector: u64,
    pub errno: i32,
    pub error: &'static str,
    /// How long the request has been failing.
    pub failing_s: f64,
}

/// The suspension policy and alarm state of one disk.
pub struct Suspension {
    disk: String,
    config: Mutex<Arc<SuspendConfig>>,
    stats: Arc<DiskStats>,
    /// Raised alarms and when they were raised.
    active: Mutex<Vec<(AlarmInfo, Instant)>>,
}

impl Suspension {
    pub fn new(disk: String, config: SuspendConfig, stats: Arc<DiskStats>) -> Suspension {
        Suspension {
            disk,
            config: Mutex::new(Arc::new(config)),
            stats,
            active: Mutex::new(Vec::new()),
        }
    }

    pub fn config(&self) -> Arc<SuspendConfig> {
        match self.config.lock() {
            Ok(c) => Arc::clone(&c),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Replaces the policy (SIGHUP); requests already retrying follow the
    /// new one from their next attempt.
    pub fn set_config(&self, config: SuspendConfig) {
        if let Ok(mut c) = self.config.lock() {
            *c = Arc::new(config);
        }
    }

    /// Decides after an attempt failed with `errno`, the request having
    /// failed for `failing_for` so far.
    pub fn verdict(&self, errno: i32, failing_for: Duration) -> Verdict {
        let c = self.config();
        if !c.errnos.contains(&errno) {
            return Verdict::Fail;
        }
        match c.retry_timeout {
            Some(t) if failing_for >= t && c.on_timeout == OnTimeout::Error => Verdict::Fail,
            _ => Verdict::Retry(c.retry_interval),
        }
    }

    /// True once a request failing this long must raise an alarm.
    pub fn alarm_due(&self, failing_for: Duration) -> bool {
        failing_for >= self.config().alarm_after
    }

    /// Storage keeps failing a request: tell the operator.
    pub fn raise(&self, info: &AlarmInfo) {
        log::error!(
            "ALARM disk {} queue {}: sector {} failing with {} ({}) for {:.1} s",
            self.disk,
            info.queue,
            info.sector,
            errno_name(info.errno),
            std::io::Error::from_raw_os_error(info.errno),
            info.duration.as_secs_f64(),
        );
        self.stats.alarms_raised.fetch_add(1, Ordering::Relaxed);
        self.stats.alarms_active.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut a) = self.active.lock() {
            a.push((info.clone(), Instant::now()));
        }
        self.run_command("raise", info);
    }

    /// The request behind an alarm completed (`recovered`) or was failed
    /// to the guest after the timeout.
    pub fn clear(&self, info: &AlarmInfo, recovered: bool) {
        let how = if recovered {
            "I/O recovered"
        } else {
            "request failed after retry-timeout"
        };
        log::warn!(
            "alarm cleared: disk {} queue {} sector {}: {how} after {:.1} s",
            self.disk,
            info.queue,
            info.sector,
            info.duration.as_secs_f64(),
        );
        self.stats.alarms_active.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut a) = self.active.lock() {
            if let Some(i) = a
                .iter()
                .position(|(x, _)| x.queue == info.queue && x.sector == info.sector)
            {
                a.swap_remove(i);
            }
        }
        self.run_command(if recovered { "clear" } else { "timeout" }, info);
    }

    /// Alarms raised and not yet cleared.
    pub fn active(&self) -> Vec<ActiveAlarm> {
        self.active
            .lock()
            .map(|a| {
                a.iter()
                    .map(|(x, raised)| ActiveAlarm {
                        queue: x.queue,
                        sector: x.sector,
                        errno: x.errno,
                        error: errno_name(x.errno),
                        failing_s: (x.duration + raised.elapsed()).as_secs_f64(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn run_command(&self, event: &str, info: &AlarmInfo) {
        let Some(cmd) = self.config().alarm_command.clone() else {
            return;
        };
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&cmd)
            .env("VUBLK_EVENT", event)
            .env("VUBLK_DISK", &self.disk)
            .env("VUBLK_QUEUE", info.queue.to_string())
            .env("VUBLK_SECTOR", info.sector.to_string())
            .env("VUBLK_ERRNO", info.errno.to_string())
            .env("VUBLK_ERROR", errno_name(info.errno))
            .env(
                "VUBLK_DURATION_S",
                format!("{:.3}", info.duration.as_secs_f64()),
            )
            .stdin(Stdio::null());
        // From a thread outside the seccomp sandbox (a command would inherit
        // the queue thread's filter), which also reaps it.
        if let Err(e) = crate::ops::seccomp::spawn_detached(command) {
            log::error!("cannot run alarm command `{cmd}`: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(timeout: Option<u64>, on_timeout: OnTimeout) -> SuspendConfig {
        SuspendConfig {
            errnos: vec![libc::EIO, libc::ENOSPC],
            retry_interval: Duration::from_millis(100),
            retry_timeout: timeout.map(Duration::from_secs),
            alarm_after: Duration::from_secs(2),
            alarm_command: None,
            on_timeout,
        }
    }

    #[test]
    fn verdicts_follow_the_policy() {
        let stats = Arc::new(DiskStats::new(1));
        let s = Suspension::new("d".into(), config(Some(5), OnTimeout::Error), stats);
        let retry = Verdict::Retry(Duration::from_millis(100));
        assert_eq!(s.verdict(libc::EIO, Duration::ZERO), retry);
        assert_eq!(s.verdict(libc::EINVAL, Duration::ZERO), Verdict::Fail);
        assert_eq!(
            s.verdict(libc::ENOSPC, Duration::from_secs(5)),
            Verdict::Fail
        );
        s.set_config(config(Some(5), OnTimeout::Suspend));
        assert_eq!(s.verdict(libc::ENOSPC, Duration::from_secs(500)), retry);
        s.set_config(config(None, OnTimeout::Error));
        assert_eq!(s.verdict(libc::EIO, Duration::from_secs(5000)), retry);
        assert!(!s.alarm_due(Duration::from_secs(1)));
        assert!(s.alarm_due(Duration::from_secs(2)));
    }

    #[test]
    fn alarms_count_and_run_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("alarm.log");
        let stats = Arc::new(DiskStats::new(1));
        let mut c = config(None, OnTimeout::Error);
        c.alarm_command = Some(format!(
            "echo \"$VUBLK_EVENT $VUBLK_DISK $VUBLK_QUEUE $VUBLK_SECTOR $VUBLK_ERROR\" >> {}",
            out.display()
        ));
        let s = Suspension::new("disk0".into(), c, Arc::clone(&stats));
        let info = AlarmInfo {
            queue: 1,
            sector: 2048,
            errno: libc::ENOSPC,
            duration: Duration::from_secs(3),
        };
        s.raise(&info);
        assert_eq!(stats.alarms_active.load(Ordering::Relaxed), 1);
        assert_eq!(s.active().len(), 1);
        assert_eq!(s.active()[0].error, "ENOSPC");
        s.clear(&info, true);
        assert_eq!(stats.alarms_active.load(Ordering::Relaxed), 0);
        assert_eq!(stats.alarms_raised.load(Ordering::Relaxed), 1);
        assert!(s.active().is_empty());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.lines().count() == 2 {
                let mut lines: Vec<&str> = text.lines().collect();
                lines.sort();
                assert_eq!(
                    lines,
                    ["clear disk0 1 2048 ENOSPC", "raise disk0 1 2048 ENOSPC"]
                );
                break;
            }
            assert!(Instant::now() < deadline, "alarm command output: {text:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
