//! `vublk stat` and `vublk top`: clients of a running daemon's control
//! socket. `stat` prints one snapshot (counters since start); `top`
//! redraws a per-queue table every second, like iostat, with plain ANSI
//! escapes (clear screen, home).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Args, Secs, Settings};

use super::state::{QueueReport, Report};

/// Subcommands of `vublk` (without one, vublk runs the daemon).
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Print one snapshot of a running daemon's counters.
    Stat(StatArgs),
    /// Show live per-queue IOPS, throughput, latency and queue depth.
    Top(TopArgs),
    /// Write the man pages and shell completions into DIR (packaging).
    #[command(hide = true)]
    GenAssets {
        /// Output directory (created).
        dir: PathBuf,
    },
}

#[derive(Clone, Debug, Default, clap::Args)]
pub struct StatArgs {
    /// The daemon's control socket (default: `control` in --config).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, clap::Args)]
pub struct TopArgs {
    /// The daemon's control socket (default: `control` in --config).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Seconds between updates.
    #[arg(long, default_value = "1")]
    pub interval: Secs,
    /// Stop after this many updates (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no control socket: give --control PATH, or --config FILE with a `control` key")]
    NoControl,
    #[error("cannot read {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("cannot talk to the daemon on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the daemon closed the control connection")]
    Closed,
    #[error("unexpected answer from the daemon: {0}")]
    Answer(String),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Assets(#[from] super::assets::AssetError),
}

/// Runs a subcommand.
pub fn run(command: &Command, args: &Args) -> Result<(), CliError> {
    let stdout = io::stdout();
    match command {
        Command::Stat(a) => {
            let mut c = Client::connect(&control_path(a.control.as_deref(), args)?)?;
            let (raw, report) = c.stats()?;
            let mut out = stdout.lock();
            let text = if a.json {
                format!("{raw}\n")
            } else {
                render_stat(&report)
            };
            out.write_all(text.as_bytes()).map_err(|e| c.io(e))
        }
        Command::Top(a) => {
            let mut c = Client::connect(&control_path(a.control.as_deref(), args)?)?;
            // The first answer only sets the daemon's interval baseline.
            c.stats()?;
            let mut n = 0u64;
            loop {
                std::thread::sleep(a.interval.0);
                let (_, report) = c.stats()?;
                let mut out = stdout.lock();
                let frame = format!("\x1b[H\x1b[2J{}", render_top(&report, a.interval.0));
                out.write_all(frame.as_bytes())
                    .and_then(|_| out.flush())
                    .map_err(|e| c.io(e))?;
                n += 1;
                if a.count.is_some_and(|max| n >= max) {
                    return Ok(());
                }
            }
        }
        Command::GenAssets { dir } => {
            for path in super::assets::generate(dir)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

/// `--control`, else the `control` key of the `--config` file.
fn control_path(flag: Option<&Path>, args: &Args) -> Result<PathBuf, CliError> {
    if let Some(p) = flag {
        return Ok(p.to_owned());
    }
    let Some(file) = &args.config else {
        return Err(CliError::NoControl);
    };
    let err = |message: String| CliError::Config {
        path: file.clone(),
        message,
    };
    let text = std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
    let s: Settings = toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
    s.control.ok_or(CliError::NoControl)
}

/// One control socket connection.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, CliError> {
        let io = |source| CliError::Io {
            path: path.to_owned(),
            source,
        };
        let writer = UnixStream::connect(path).map_err(io)?;
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let reader = BufReader::new(writer.try_clone().map_err(io)?);
        Ok(Client {
            path: path.to_owned(),
            reader,
            writer,
        })
    }

    fn io(&self, source: io::Error) -> CliError {
        CliError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends one request line; returns the answer (refusals are errors).
    pub fn request(&mut self, request: &serde_json::Value) -> Result<serde_json::Value, CliError> {
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(CliError::Closed);
        }
        let v: serde_json::Value =
            serde_json::from_str(&answer).map_err(|e| CliError::Answer(e.to_string()))?;
        if v.get("ok") != Some(&serde_json::Value::Bool(true)) {
            let msg = v
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given");
            return Err(CliError::Refused(msg.to_string()));
        }
        Ok(v)
    }

    /// The `stats` answer, raw and parsed.
    pub fn stats(&mut self) -> Result<(serde_json::Value, Report), CliError> {
        let v = self.request(&serde_json::json!({"cmd": "stats"}))?;
        let r = serde_json::from_value(v.clone()).map_err(|e| CliError::Answer(e.to_string()))?;
        Ok((v, r))
    }
}

/// 1234 ns → "1.2us"; aligned for tables.
pub fn fmt_ns(ns: u64) -> String {
    let n = ns as f64;
    if ns == 0 {
        "-".into()
    } else if n < 1e3 {
        format!("{ns}ns")
    } else if n < 1e6 {
        format!("{:.1}us", n / 1e3)
    } else if n < 1e9 {
        format!("{:.1}ms", n / 1e6)
    } else {
        format!("{:.2}s", n / 1e9)
    }
}

fn fmt_mib(bytes: f64) -> String {
    format!("{:.1}", bytes / (1 << 20) as f64)
}

fn fmt_uptime(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn header(r: &Report) -> String {
    let state = match r.state {
        super::RunState::Starting => "starting",
        super::RunState::Listening => "waiting for a frontend",
        super::RunState::Serving => "serving a frontend",
        super::RunState::Stopping => "stopping",
    };
    let qos = if r.qos.is_empty() {
        "unlimited".to_string()
    } else {
        r.qos
            .iter()
            .map(|(k, v)| format!("{}={}", k.trim_start_matches("qos-"), v))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!(
        "vublk {} pid {}, up {}, {state}\ndisk {} ({} MiB, {}, {} queue(s)); QoS: {qos}\n",
        r.version,
        r.pid,
        fmt_uptime(r.uptime_s),
        r.disk.path,
        r.disk.size >> 20,
        if r.disk.read_only {
            "read-only"
        } else {
            "read-write"
        },
        r.disk.num_queues,
    );
    if r.alarms.active == 0 {
        s += &format!("alarms: none active, {} raised\n", r.alarms.raised);
    } else {
        s += &format!(
            "\x1b[1mALARMS: {} active\x1b[0m, {} raised\n",
            r.alarms.active, r.alarms.raised
        );
        for a in &r.alarms.list {
            s += &format!(
                "  queue {} sector {}: {} for {:.0} s\n",
                a.queue, a.sector, a.error, a.failing_s
            );
        }
    }
    s
}

fn sum(queues: &[QueueReport]) -> QueueReport {
    let mut t = QueueReport::default();
    for q in queues {
        t.reads += q.reads;
        t.writes += q.writes;
        t.flushes += q.flushes;
        t.discards += q.discards + q.write_zeroes + q.other;
        t.bytes_read += q.bytes_read;
        t.bytes_written += q.bytes_written;
        t.errors += q.errors;
        t.retries += q.retries;
        t.throttled_ns += q.throttled_ns;
        t.inflight += q.inflight;
        t.latency_count += q.latency_count;
        t.latency_sum_ns += q.latency_sum_ns;
    }
    t.latency_mean_ns = t.latency_sum_ns.checked_div(t.latency_count).unwrap_or(0);
    t
}

/// `vublk stat`: counters since start, one line per queue and a total.
pub fn render_stat(r: &Report) -> String {
    let mut s = header(r);
    s += &format!(
        "{:>5} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>7} {:>7} {:>9} {:>5} {:>8} {:>8} {:>8} {:>8}\n",
        "queue", "reads", "writes", "flushes", "other", "read MiB", "write MiB", "errors",
        "retries", "thr ms", "qd", "mean", "p50", "p99", "p99.9"
    );
    let line = |name: String, q: &QueueReport, pct: bool| {
        format!(
            "{:>5} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>7} {:>7} {:>9} {:>5} {:>8} {:>8} {:>8} {:>8}\n",
            name,
            q.reads,
            q.writes,
            q.flushes,
            q.discards + q.write_zeroes + q.other,
            fmt_mib(q.bytes_read as f64),
            fmt_mib(q.bytes_written as f64),
            q.errors,
            q.retries,
            q.throttled_ns / 1_000_000,
            q.inflight,
            fmt_ns(q.latency_mean_ns),
            if pct { fmt_ns(q.latency_p50_ns) } else { "".into() },
            if pct { fmt_ns(q.latency_p99_ns) } else { "".into() },
            if pct { fmt_ns(q.latency_p999_ns) } else { "".into() },
        )
    };
    for q in &r.queues {
        s += &line(q.queue.to_string(), q, true);
    }
    if r.queues.len() > 1 {
        s += line("total".into(), &sum(&r.queues), false).trim_end();
        s += "\n";
    }
    s
}

/// `vublk top`: rates over the last interval, one line per queue.
pub fn render_top(r: &Report, every: Duration) -> String {
    let mut s = format!("vublk top, every {:.1} s\n", every.as_secs_f64());
    s += &header(r);
    s += "\n";
    s += &format!(
        "\x1b[7m{:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6} {:>6} {:>8}\x1b[0m\n",
        "queue", "r/s", "w/s", "other/s", "rMB/s", "wMB/s", "mean", "p50", "p99", "qd", "errs",
        "retry", "thr ms/s"
    );
    let mut tot = [0f64; 5];
    let mut tot_qd = 0;
    for q in &r.queues {
        let Some(i) = &q.interval else {
            continue;
        };
        s += &format!(
            "{:>5} {:>9.0} {:>9.0} {:>8.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6} {:>6} {:>8.1}\n",
            q.queue,
            i.read_iops,
            i.write_iops,
            i.other_iops,
            fmt_mib(i.read_bps),
            fmt_mib(i.write_bps),
            fmt_ns(i.latency_mean_ns),
            fmt_ns(i.latency_p50_ns),
            fmt_ns(i.latency_p99_ns),
            q.inflight,
            i.errors,
            i.retries,
            i.throttled_ms_per_s,
        );
        for (t, v) in tot.iter_mut().zip([
            i.read_iops,
            i.write_iops,
            i.other_iops,
            i.read_bps,
            i.write_bps,
        ]) {
            *t += v;
        }
        tot_qd += q.inflight;
    }
    if r.queues.len() > 1 {
        s += &format!(
            "{:>5} {:>9.0} {:>9.0} {:>8.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5}\n",
            "total",
            tot[0],
            tot[1],
            tot[2],
            fmt_mib(tot[3]),
            fmt_mib(tot[4]),
            "",
            "",
            "",
            tot_qd
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_format() {
        assert_eq!(fmt_ns(0), "-");
        assert_eq!(fmt_ns(800), "800ns");
        assert_eq!(fmt_ns(12_345), "12.3us");
        assert_eq!(fmt_ns(2_500_000), "2.5ms");
        assert_eq!(fmt_ns(3_000_000_000), "3.00s");
        assert_eq!(fmt_uptime(75.0), "1m15s");
        assert_eq!(fmt_uptime(7300.0), "2h01m");
    }
}
