//! Prometheus text exposition (format 0.0.4) on `--metrics ADDR`, served by
//! a tiny HTTP/1.0 responder thread: one request per connection, `GET
//! /metrics` (or `/`), then close. A bare port binds loopback only.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::seccomp;
use super::state::{OpsState, Report, RunState};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("invalid metrics address `{0}` (expected PORT, :PORT, HOST:PORT or [V6]:PORT)")]
    Address(String),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Spawn(io::Error),
}

/// `9405` and `:9405` mean 127.0.0.1:9405; anything else is taken as given.
pub fn parse_addr(text: &str) -> Result<SocketAddr, MetricsError> {
    let t = text.trim();
    let port = t.strip_prefix(':').unwrap_or(t);
    if let Ok(port) = port.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    t.parse()
        .map_err(|_| MetricsError::Address(text.to_string()))
}

pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub fn bind(addr: &str) -> Result<MetricsServer, MetricsError> {
        let addr = parse_addr(addr)?;
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        if !addr.ip().is_loopback() {
            log::warn!("metrics are exposed beyond loopback on {addr}");
        }
        Ok(MetricsServer { listener })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn spawn(self, state: Arc<OpsState>) -> Result<(), MetricsError> {
        thread::Builder::new()
            .name("vublk-metrics".into())
            .spawn(move || {
                if let Err(e) = seccomp::enter(seccomp::ThreadKind::Control) {
                    log::error!("metrics thread: {e}");
                    return;
                }
                for stream in self.listener.incoming() {
                    match stream {
                        Ok(s) => {
                            if let Err(e) = respond(s, &state) {
                                log::debug!("metrics request: {e}");
                            }
                        }
                        Err(e) => log::debug!("metrics accept: {e}"),
                    }
                }
            })
            .map(|_| ())
            .map_err(MetricsError::Spawn)
    }
}

fn respond(mut s: TcpStream, state: &OpsState) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut chunk = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.windows(2).any(|w| w == b"\n\n") {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&chunk[..n]);
        if req.len() > 8192 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&req);
    let mut words = text.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => {
            let now = state.snapshot();
            let body = exposition(&state.report(&now, None), state);
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let mut out = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    s.write_all(out.as_bytes())
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP vublk_{name} {help}");
        let _ = writeln!(self.out, "# TYPE vublk_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "vublk_{name} {value}");
        } else {
            let _ = writeln!(self.out, "vublk_{name}{{{labels}}} {value}");
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A per-queue metric: name, type, help, value.
type Column = (
    &'static str,
    &'static str,
    &'static str,
    fn(&super::state::QueueReport) -> String,
);

/// The text exposition of a report.
pub fn exposition(r: &Report, state: &OpsState) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.head("info", "gauge", "Version and disk of this daemon.");
    f.sample(
        "info",
        &format!(
            "version=\"{}\",disk=\"{}\"",
            escape(&r.version),
            escape(&r.disk.path)
        ),
        1,
    );
    f.head("uptime_seconds", "gauge", "Seconds since start.");
    f.sample("uptime_seconds", "", format!("{:.3}", r.uptime_s));
    f.head(
        "frontend_connected",
        "gauge",
        "1 while a vhost-user frontend is connected.",
    );
    f.sample(
        "frontend_connected",
        "",
        u8::from(r.state == RunState::Serving),
    );
    f.head("disk_size_bytes", "gauge", "Size of the disk.");
    f.sample("disk_size_bytes", "", r.disk.size);

    f.head(
        "requests_total",
        "counter",
        "Requests completed, by queue and operation.",
    );
    for q in &r.queues {
        for (op, n) in [
            ("read", q.reads),
            ("write", q.writes),
            ("flush", q.flushes),
            ("discard", q.discards),
            ("write_zeroes", q.write_zeroes),
            ("other", q.other),
        ] {
            f.sample(
                "requests_total",
                &format!("queue=\"{}\",op=\"{op}\"", q.queue),
                n,
            );
        }
    }
    f.head(
        "bytes_total",
        "counter",
        "Bytes transferred, by queue and direction.",
    );
    for q in &r.queues {
        f.sample(
            "bytes_total",
            &format!("queue=\"{}\",dir=\"read\"", q.queue),
            q.bytes_read,
        );
        f.sample(
            "bytes_total",
            &format!("queue=\"{}\",dir=\"write\"", q.queue),
            q.bytes_written,
        );
    }
    let per_queue: [Column; 4] = [
        (
            "errors_total",
            "counter",
            "Requests completed with an error status.",
            |q| q.errors.to_string(),
        ),
        (
            "retries_total",
            "counter",
            "Resubmissions of failed requests (I/O suspension).",
            |q| q.retries.to_string(),
        ),
        (
            "throttled_seconds_total",
            "counter",
            "Time requests waited for QoS tokens.",
            |q| format!("{:.9}", q.throttled_ns as f64 / 1e9),
        ),
        (
            "inflight_requests",
            "gauge",
            "Requests submitted and not completed (queue depth).",
            |q| q.inflight.to_string(),
        ),
    ];
    for (name, kind, help, value) in per_queue {
        f.head(name, kind, help);
        for q in &r.queues {
            f.sample(name, &format!("queue=\"{}\"", q.queue), value(q));
        }
    }
    f.head(
        "request_latency_seconds",
        "summary",
        "Request latency from submission to completion.",
    );
    for q in &r.queues {
        for (quantile, ns) in [
            ("0.5", q.latency_p50_ns),
            ("0.99", q.latency_p99_ns),
            ("0.999", q.latency_p999_ns),
        ] {
            f.sample(
                "request_latency_seconds",
                &format!("queue=\"{}\",quantile=\"{quantile}\"", q.queue),
                format!("{:.9}", ns as f64 / 1e9),
            );
        }
        f.sample(
            "request_latency_seconds_sum",
            &format!("queue=\"{}\"", q.queue),
            format!("{:.9}", q.latency_sum_ns as f64 / 1e9),
        );
        f.sample(
            "request_latency_seconds_count",
            &format!("queue=\"{}\"", q.queue),
            q.latency_count,
        );
    }
    f.head(
        "alarms_raised_total",
        "counter",
        "I/O suspension alarms raised.",
    );
    f.sample("alarms_raised_total", "", r.alarms.raised);
    f.head(
        "alarms_active",
        "gauge",
        "Requests failing for longer than alarm-after now.",
    );
    f.sample(
        "alarms_active",
        "",
        state.ctx.stats.alarms_active.load(Ordering::Relaxed),
    );
    f.head(
        "qos_limit",
        "gauge",
        "QoS limits in force, by config key (absent: unlimited).",
    );
    for (key, v) in &r.qos {
        if let Some(n) = v.as_u64() {
            f.sample("qos_limit", &format!("key=\"{}\"", escape(key)), n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("9405").unwrap().to_string(), "127.0.0.1:9405");
        assert_eq!(parse_addr(":9405").unwrap().to_string(), "127.0.0.1:9405");
        assert_eq!(
            parse_addr("0.0.0.0:9405").unwrap().to_string(),
            "0.0.0.0:9405"
        );
        assert_eq!(parse_addr("[::1]:9405").unwrap().to_string(), "[::1]:9405");
        assert!(parse_addr("localhost").is_err());
    }
}
