//! Command line and TOML configuration, merged (flags win) and validated once
//! at start-up into a [`Config`] that the rest of the daemon trusts.
//!
//! Every setting exists once, in [`Settings`], which is both the clap flag
//! set and the TOML schema, so the two cannot drift apart.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Largest queue the virtio spec allows for split rings.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// One thread per queue: more than this is a configuration mistake.
pub const MAX_NUM_QUEUES: u16 = 256;
/// virtio-blk GET_ID returns at most 20 bytes.
pub const SERIAL_MAX_LEN: usize = 20;
const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: io::Error },
    #[error("invalid config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("missing required setting `{0}` (flag --{0} or key `{0}` in the config file)")]
    Missing(&'static str),
    #[error("invalid {key} `{value}`: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("socket path {0} is in use by a running process")]
    SocketInUse(PathBuf),
    #[error("socket path {0} exists and is not a socket")]
    SocketNotSocket(PathBuf),
    #[error("cannot remove stale socket {path}: {source}")]
    SocketStale { path: PathBuf, source: io::Error },
    #[error("socket directory {0} does not exist")]
    SocketDir(PathBuf),
}

fn invalid(key: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: bypass the host page cache (the default).
    #[default]
    None,
    /// Buffered I/O through the host page cache.
    Writeback,
}

/// What happens to a request that still fails after `retry-timeout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Complete it with an I/O error.
    #[default]
    Error,
    /// Keep it (and its queue) suspended, retrying until storage recovers.
    Suspend,
}

/// The seccomp filter mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    Off,
    Log,
    #[default]
    Kill,
}

/// A number with an optional binary suffix (`512`, `4K`, `10M`, `1G`, `2T`),
/// from a flag or TOML (where a plain integer is also accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

/// A duration: plain seconds (`60`, `0.5`) or with a unit (`500ms`, `2m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secs(pub Duration);

/// Numbers in a TOML file may be written bare or as strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Int(u64),
    Float(f64),
    Text(String),
}

impl fmt::Display for NumOrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumOrText::Int(i) => write!(f, "{i}"),
            NumOrText::Float(x) => write!(f, "{x}"),
            NumOrText::Text(t) => f.write_str(t),
        }
    }
}

macro_rules! text_value {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = NumOrText::deserialize(d)?;
                v.to_string().parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
text_value!(Bytes);
text_value!(Secs);

impl FromStr for Bytes {
    type Err = String;
    fn from_str(text: &str) -> Result<Bytes, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{text}`: expected a number with an optional K/M/G/T suffix"))?;
        let shift = match suffix.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(format!("`{text}`: unknown size suffix")),
        };
        n.checked_mul(1u64 << shift)
            .map(Bytes)
            .ok_or_else(|| format!("`{text}`: too large"))
    }
}

impl FromStr for Secs {
    type Err = String;
    fn from_str(text: &str) -> Result<Secs, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{text}`: expected seconds, or a number with ms/s/m/h"))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "" | "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("`{text}`: unknown time unit")),
        };
        Duration::try_from_secs_f64(n * scale)
            .map(Secs)
            .map_err(|_| format!("`{text}`: out of range"))
    }
}

/// Every setting, as a flag and as a TOML key of the same name.
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// vhost-user unix socket to listen on.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Disk: a raw image file, a block device, or `null:SIZE`.
    #[arg(long)]
    pub disk: Option<String>,
    /// Size of the raw image to create when --disk does not exist (e.g. 10G).
    #[arg(long)]
    pub size: Option<Bytes>,
    /// Number of virtqueues (one polling thread each).
    #[arg(long)]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size the frontend may use (power of two).
    #[arg(long)]
    pub queue_size: Option<u16>,
    /// Serve the disk read-only.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub read_only: Option<bool>,
    /// Host cache mode: none (O_DIRECT) or writeback.
    #[arg(long, value_enum)]
    pub cache: Option<CacheMode>,
    /// Serial number returned for GET_ID (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// Microseconds a queue thread keeps polling after its last request
    /// before it sleeps on the kick eventfd.
    #[arg(long)]
    pub poll_us: Option<u64>,

    /// Local socket on which vublk-tier asks vublk to drop its mappings of
    /// guest RAM, so that cold pages can be swapped out.
    #[arg(long)]
    pub tier_socket: Option<PathBuf>,
    /// Control socket (newline-delimited JSON; stats, set-qos, alarms).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Prometheus metrics address (e.g. 127.0.0.1:9405).
    #[arg(long)]
    pub metrics: Option<String>,
    /// seccomp filter: off, log or kill.
    #[arg(long, value_enum)]
    pub seccomp: Option<SeccompMode>,
    /// Permissions of the vhost-user socket file, in octal (e.g. 0660).
    #[arg(long)]
    pub socket_mode: Option<String>,
    /// Group owning the vhost-user socket file.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// User to run as once the disk, io_uring and sockets are open.
    #[arg(long)]
    pub user: Option<String>,
    /// Group to run as once the disk, io_uring and sockets are open.
    #[arg(long)]
    pub group: Option<String>,

    /// Wait between retries of a failed request (I/O suspension).
    #[arg(long)]
    pub retry_interval: Option<Secs>,
    /// Give up retrying after this long (0 = retry forever).
    #[arg(long)]
    pub retry_timeout: Option<Secs>,
    /// Raise an alarm when a request has been retrying this long
    /// (default: retry-timeout, or 60 s when retrying forever).
    #[arg(long)]
    pub alarm_after: Option<Secs>,
    /// Command run (by /bin/sh) when an alarm is raised or cleared.
    #[arg(long)]
    pub alarm_command: Option<String>,
    /// After retry-timeout: fail the request (error) or keep it (suspend).
    #[arg(long, value_enum)]
    pub on_timeout: Option<OnTimeout>,
    /// Errors that suspend a request instead of failing it, comma-separated
    /// (e.g. EIO,ENOSPC); `none` disables I/O suspension.
    #[arg(long)]
    pub retry_errnos: Option<String>,

    /// IOPS limit, reads and writes together.
    #[arg(long)]
    pub qos_iops: Option<u64>,
    /// IOPS limit for reads.
    #[arg(long)]
    pub qos_iops_read: Option<u64>,
    /// IOPS limit for writes.
    #[arg(long)]
    pub qos_iops_write: Option<u64>,
    /// Bandwidth limit in bytes/s (e.g. 100M), reads and writes together.
    #[arg(long)]
    pub qos_bps: Option<Bytes>,
    /// Bandwidth limit for reads.
    #[arg(long)]
    pub qos_bps_read: Option<Bytes>,
    /// Bandwidth limit for writes.
    #[arg(long)]
    pub qos_bps_write: Option<Bytes>,
    /// Burst IOPS allowed above qos-iops for qos-iops-burst-length.
    #[arg(long)]
    pub qos_iops_burst: Option<u64>,
    #[arg(long)]
    pub qos_iops_read_burst: Option<u64>,
    #[arg(long)]
    pub qos_iops_write_burst: Option<u64>,
    /// Burst bandwidth allowed above qos-bps for qos-bps-burst-length.
    #[arg(long)]
    pub qos_bps_burst: Option<Bytes>,
    #[arg(long)]
    pub qos_bps_read_burst: Option<Bytes>,
    #[arg(long)]
    pub qos_bps_write_burst: Option<Bytes>,
    /// How long a burst may last (default 1 s).
    #[arg(long)]
    pub qos_iops_burst_length: Option<Secs>,
    #[arg(long)]
    pub qos_iops_read_burst_length: Option<Secs>,
    #[arg(long)]
    pub qos_iops_write_burst_length: Option<Secs>,
    #[arg(long)]
    pub qos_bps_burst_length: Option<Secs>,
    #[arg(long)]
    pub qos_bps_read_burst_length: Option<Secs>,
    #[arg(long)]
    pub qos_bps_write_burst_length: Option<Secs>,
    /// Requests larger than this count as several operations for IOPS limits.
    #[arg(long)]
    pub qos_iops_size: Option<Bytes>,
    /// Testing only: a file whose content (`OPS ERRNO`, e.g. `write EIO`)
    /// makes completed operations report that error.
    #[arg(long, hide = true)]
    pub fault_file: Option<PathBuf>,
}

macro_rules! merge_settings {
    ($flags:expr, $file:expr; $($f:ident),* $(,)?) => {
        Settings { $($f: $flags.$f.clone().or($file.$f)),* }
    };
}

impl Settings {
    /// Flags win over the file.
    fn over(&self, file: Settings) -> Settings {
        merge_settings!(self, file;
            socket, disk, size, num_queues, queue_size, read_only, cache, serial, poll_us,
            tier_socket, control, metrics, seccomp, socket_mode, socket_group, user, group,
            retry_interval, retry_timeout, alarm_after, alarm_command, on_timeout, retry_errnos,
            qos_iops, qos_iops_read, qos_iops_write, qos_bps, qos_bps_read, qos_bps_write,
            qos_iops_burst, qos_iops_read_burst, qos_iops_write_burst,
            qos_bps_burst, qos_bps_read_burst, qos_bps_write_burst,
            qos_iops_burst_length, qos_iops_read_burst_length, qos_iops_write_burst_length,
            qos_bps_burst_length, qos_bps_read_burst_length, qos_bps_write_burst_length,
            qos_iops_size, fault_file,
        )
    }
}

/// The `vublk` command line.
#[derive(Debug, Default, Parser)]
#[command(name = "vublk", version, about = "vhost-user-blk backend daemon")]
pub struct Args {
    /// TOML file with the same keys as the flags; flags win.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    /// Without a subcommand, vublk runs the daemon.
    #[command(subcommand)]
    pub command: Option<crate::ops::cli::Command>,
}

/// What the daemon serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSpec {
    /// A regular file or block device; `create_size` makes a sparse image
    /// when the file does not exist yet.
    Path {
        path: PathBuf,
        create_size: Option<u64>,
    },
    /// Reads return zeroes, writes are dropped: measures the data path alone.
    Null { size: u64 },
}

/// One rate limit: `rate` per second sustained, `burst` per second for at
/// most `burst_length`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limit {
    pub rate: u64,
    pub burst: Option<u64>,
    pub burst_length: Duration,
}

/// Per-disk QoS limits; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QosLimits {
    pub iops: Option<Limit>,
    pub iops_read: Option<Limit>,
    pub iops_write: Option<Limit>,
    pub bps: Option<Limit>,
    pub bps_read: Option<Limit>,
    pub bps_write: Option<Limit>,
    pub iops_size: Option<u64>,
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        [
            self.iops,
            self.iops_read,
            self.iops_write,
            self.bps,
            self.bps_read,
            self.bps_write,
        ]
        .iter()
        .all(Option::is_none)
    }
}

/// I/O suspension: which errors are retried, how and for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct SuspendConfig {
    /// Empty: suspension off, errors go to the guest at once.
    pub errnos: Vec<i32>,
    pub retry_interval: Duration,
    /// `None`: retry forever.
    pub retry_timeout: Option<Duration>,
    pub alarm_after: Duration,
    pub alarm_command: Option<String>,
    pub on_timeout: OnTimeout,
}

/// Operator-facing settings (control socket, sandbox, privileges).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpsConfig {
    pub tier_socket: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    pub seccomp: SeccompMode,
    pub socket_mode: Option<u32>,
    pub socket_group: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket: PathBuf,
    pub disk: DiskSpec,
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub cache: CacheMode,
    pub serial: Vec<u8>,
    pub poll: Duration,
    pub suspend: SuspendConfig,
    pub qos: QosLimits,
    pub ops: OpsConfig,
    /// The config file, re-read on SIGHUP.
    pub file: Option<PathBuf>,
    /// Testing only: see `storage::fault`.
    pub fault_file: Option<PathBuf>,
}

/// Errors retried by default: the ones storage recovers from (a full thin
/// pool, a path failover, a timeout), not the ones a retry cannot fix.
pub const DEFAULT_RETRY_ERRNOS: &str = "EIO,ENOSPC,ETIMEDOUT,EAGAIN,ENOLINK,EREMOTEIO,EDQUOT";

const ERRNO_NAMES: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("EAGAIN", libc::EAGAIN),
    ("ENOLINK", libc::ENOLINK),
    ("EREMOTEIO", libc::EREMOTEIO),
    ("EDQUOT", libc::EDQUOT),
    ("ENXIO", libc::ENXIO),
    ("ENODEV", libc::ENODEV),
    ("EBUSY", libc::EBUSY),
    ("ENOMEM", libc::ENOMEM),
    ("ECONNRESET", libc::ECONNRESET),
    ("EHOSTDOWN", libc::EHOSTDOWN),
    ("EHOSTUNREACH", libc::EHOSTUNREACH),
    ("ENOTCONN", libc::ENOTCONN),
    ("ESTALE", libc::ESTALE),
];

/// The errno of a name we know (`EIO`, case-insensitive).
pub fn errno_by_name(name: &str) -> Option<i32> {
    let name = name.trim().to_ascii_uppercase();
    ERRNO_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, e)| *e)
}

/// The name of an errno we know (for alarms and logs).
pub fn errno_name(errno: i32) -> &'static str {
    ERRNO_NAMES
        .iter()
        .find(|(_, e)| *e == errno)
        .map_or("E?", |(n, _)| n)
}

fn parse_errnos(text: &str) -> Result<Vec<i32>, ConfigError> {
    if text.trim().eq_ignore_ascii_case("none") || text.trim().is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|name| {
            errno_by_name(name).ok_or_else(|| {
                let known: Vec<&str> = ERRNO_NAMES.iter().map(|(n, _)| *n).collect();
                invalid(
                    "retry-errnos",
                    name.trim(),
                    format!("known: {}", known.join(",")),
                )
            })
        })
        .collect()
}

impl Config {
    pub const DEFAULT_QUEUE_SIZE: u16 = 256;
    pub const DEFAULT_POLL_US: u64 = 50;

    /// Merges the flags over the config file and validates the result.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        Self::load_with(args, None)
    }

    /// Socket activation: the vhost-user socket is the inherited listener
    /// bound at `listening`, whatever `socket` says, and is not refused for
    /// being in use (it is, by us).
    pub fn load_activated(args: &Args, listening: &Path) -> Result<Config, ConfigError> {
        Self::load_with(args, Some(listening))
    }

    fn load_with(args: &Args, listening: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => Settings::default(),
        };
        let s = args.settings.over(file);
        let config = Config {
            socket: match listening {
                Some(path) => path.to_owned(),
                None => s.socket.clone().ok_or(ConfigError::Missing("socket"))?,
            },
            disk: parse_disk(
                s.disk.as_deref().ok_or(ConfigError::Missing("disk"))?,
                s.size.map(|b| b.0),
            )?,
            num_queues: s.num_queues.unwrap_or(1),
            queue_size: s.queue_size.unwrap_or(Self::DEFAULT_QUEUE_SIZE),
            read_only: s.read_only.unwrap_or(false),
            cache: s.cache.unwrap_or_default(),
            serial: s
                .serial
                .clone()
                .unwrap_or_else(|| "vublk".to_string())
                .into_bytes(),
            poll: Duration::from_micros(s.poll_us.unwrap_or(Self::DEFAULT_POLL_US)),
            suspend: suspend_config(&s)?,
            qos: qos_limits(&s)?,
            ops: ops_config(&s)?,
            file: args.config.clone(),
            fault_file: s.fault_file.clone(),
        };
        config.validate(listening.is_none())?;
        Ok(config)
    }

    /// Re-reads the settings that may change while running (SIGHUP): QoS
    /// limits and I/O suspension. Flags given at start-up still win.
    pub fn reload(args: &Args) -> Result<(QosLimits, SuspendConfig), ConfigError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => Settings::default(),
        };
        let s = args.settings.over(file);
        Ok((qos_limits(&s)?, suspend_config(&s)?))
    }

    fn validate(&self, check_socket: bool) -> Result<(), ConfigError> {
        if self.num_queues == 0 || self.num_queues > MAX_NUM_QUEUES {
            return Err(invalid(
                "num-queues",
                self.num_queues,
                format!("must be 1..={MAX_NUM_QUEUES}"),
            ));
        }
        // seg_max is queue_size - 2, so the smallest useful queue holds 4.
        if !self.queue_size.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&self.queue_size) {
            return Err(invalid(
                "queue-size",
                self.queue_size,
                format!("must be a power of two in 4..={MAX_QUEUE_SIZE}"),
            ));
        }
        if self.serial.len() > SERIAL_MAX_LEN {
            return Err(invalid(
                "serial",
                String::from_utf8_lossy(&self.serial),
                format!("longer than {SERIAL_MAX_LEN} bytes"),
            ));
        }
        if self.poll > Duration::from_secs(1) {
            return Err(invalid("poll-us", self.poll.as_micros(), "at most 1000000"));
        }
        if let DiskSpec::Path { path, create_size } = &self.disk {
            if create_size.is_none() && !path.exists() {
                return Err(invalid(
                    "disk",
                    path.display(),
                    "does not exist (give --size to create a sparse image)",
                ));
            }
        }
        if check_socket {
            check_socket_path(&self.socket)?;
        }
        Ok(())
    }
}

fn suspend_config(s: &Settings) -> Result<SuspendConfig, ConfigError> {
    let errnos = parse_errnos(s.retry_errnos.as_deref().unwrap_or(DEFAULT_RETRY_ERRNOS))?;
    let retry_interval = s.retry_interval.map_or(Duration::from_secs(1), |d| d.0);
    if retry_interval < Duration::from_millis(1) || retry_interval > Duration::from_secs(3600) {
        return Err(invalid(
            "retry-interval",
            format!("{retry_interval:?}"),
            "must be between 1ms and 1h",
        ));
    }
    let timeout = s.retry_timeout.map_or(Duration::from_secs(60), |d| d.0);
    let retry_timeout = (!timeout.is_zero()).then_some(timeout);
    let alarm_after = s
        .alarm_after
        .map(|d| d.0)
        .unwrap_or(retry_timeout.unwrap_or(Duration::from_secs(60)));
    Ok(SuspendConfig {
        errnos,
        retry_interval,
        retry_timeout,
        alarm_after,
        alarm_command: s.alarm_command.clone().filter(|c| !c.trim().is_empty()),
        on_timeout: s.on_timeout.unwrap_or_default(),
    })
}

fn limit(
    key: &'static str,
    rate: Option<u64>,
    burst: Option<u64>,
    length: Option<Secs>,
) -> Result<Option<Limit>, ConfigError> {
    let Some(rate) = rate.filter(|r| *r > 0) else {
        if burst.is_some() {
            return Err(invalid(key, "burst", "a burst needs a sustained limit too"));
        }
        return Ok(None);
    };
    if let Some(b) = burst {
        if b < rate {
            return Err(invalid(key, b, format!("burst is below the limit {rate}")));
        }
    }
    let burst_length = length.map_or(Duration::from_secs(1), |d| d.0);
    if burst_length.is_zero() {
        return Err(invalid(key, "0", "burst length must be positive"));
    }
    Ok(Some(Limit {
        rate,
        burst,
        burst_length,
    }))
}

fn qos_limits(s: &Settings) -> Result<QosLimits, ConfigError> {
    let bytes = |b: Option<Bytes>| b.map(|b| b.0);
    let iops_size = bytes(s.qos_iops_size).filter(|n| *n > 0);
    if let Some(n) = iops_size {
        if n % SECTOR_SIZE != 0 {
            return Err(invalid("qos-iops-size", n, "must be a multiple of 512"));
        }
    }
    Ok(QosLimits {
        iops: limit(
            "qos-iops",
            s.qos_iops,
            s.qos_iops_burst,
            s.qos_iops_burst_length,
        )?,
        iops_read: limit(
            "qos-iops-read",
            s.qos_iops_read,
            s.qos_iops_read_burst,
            s.qos_iops_read_burst_length,
        )?,
        iops_write: limit(
            "qos-iops-write",
            s.qos_iops_write,
            s.qos_iops_write_burst,
            s.qos_iops_write_burst_length,
        )?,
        bps: limit(
            "qos-bps",
            bytes(s.qos_bps),
            bytes(s.qos_bps_burst),
            s.qos_bps_burst_length,
        )?,
        bps_read: limit(
            "qos-bps-read",
            bytes(s.qos_bps_read),
            bytes(s.qos_bps_read_burst),
            s.qos_bps_read_burst_length,
        )?,
        bps_write: limit(
            "qos-bps-write",
            bytes(s.qos_bps_write),
            bytes(s.qos_bps_write_burst),
            s.qos_bps_write_burst_length,
        )?,
        iops_size,
    })
}

fn ops_config(s: &Settings) -> Result<OpsConfig, ConfigError> {
    let socket_mode = s
        .socket_mode
        .as_deref()
        .map(|m| {
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| invalid("socket-mode", m, "expected octal permissions like 0660"))
        })
        .transpose()?;
    Ok(OpsConfig {
        tier_socket: s.tier_socket.clone(),
        control: s.control.clone(),
        metrics: s.metrics.clone(),
        seccomp: s.seccomp.unwrap_or_default(),
        socket_mode,
        socket_group: s.socket_group.clone(),
        user: s.user.clone(),
        group: s.group.clone(),
    })
}

fn read_file_config(path: &Path) -> Result<Settings, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        message: e.message().to_string(),
    })
}

/// Parses `4096`, `512K`, `10M`, `1G`, `2T` (binary multiples, optional `iB`/`B`).
pub fn parse_size(key: &'static str, text: &str) -> Result<u64, ConfigError> {
    text.parse::<Bytes>()
        .map(|b| b.0)
        .map_err(|reason| invalid(key, text, reason))
}

fn check_disk_size(size: u64, text: &str) -> Result<u64, ConfigError> {
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(invalid(
            "size",
            text,
            "must be a non-zero multiple of 512 bytes",
        ));
    }
    Ok(size)
}

fn parse_disk(text: &str, size: Option<u64>) -> Result<DiskSpec, ConfigError> {
    if let Some(rest) = text.strip_prefix("null:") {
        let size = parse_size("disk", rest)?;
        return Ok(DiskSpec::Null {
            size: check_disk_size(size, text)?,
        });
    }
    if text.is_empty() {
        return Err(invalid("disk", text, "empty path"));
    }
    let create_size = size
        .map(|s| check_disk_size(s, &s.to_string()))
        .transpose()?;
    Ok(DiskSpec::Path {
        path: PathBuf::from(text),
        create_size,
    })
}

/// Refuses a socket path that a live daemon listens on; removes a stale one.
fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(ConfigError::SocketDir(dir.to_owned()));
        }
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ConfigError::SocketStale {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ConfigError::SocketNotSocket(path.to_owned()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ConfigError::SocketInUse(path.to_owned()));
    }
    fs::remove_file(path).map_err(|source| ConfigError::SocketStale {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn args(socket: &Path, disk: &str) -> Args {
        Args {
            config: None,
            command: None,
            settings: Settings {
                socket: Some(socket.to_owned()),
                disk: Some(disk.to_string()),
                ..Settings::default()
            },
        }
    }

    fn with(socket: &Path, disk: &str, f: impl FnOnce(&mut Settings)) -> Args {
        let mut a = args(socket, disk);
        f(&mut a.settings);
        a
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("size", "4096").unwrap(), 4096);
        assert_eq!(parse_size("size", "512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("size", "10M").unwrap(), 10 << 20);
        assert_eq!(parse_size("size", "1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("size", "2t").unwrap(), 2 << 40);
        assert!(parse_size("size", "12X").is_err());
        assert!(parse_size("size", "G").is_err());
        assert!(parse_size("size", "99999999999T").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        let s = |t: &str| t.parse::<Secs>().map(|s| s.0);
        assert_eq!(s("60").unwrap(), Duration::from_secs(60));
        assert_eq!(s("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(s("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(s("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(s("1h").unwrap(), Duration::from_secs(3600));
        assert!(s("5 fortnights").is_err());
        assert!(s("-1").is_err());
        assert!(s("").is_err());
    }

    #[test]
    fn null_disk_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(&args(&dir.path().join("s"), "null:1G")).unwrap();
        assert_eq!(c.disk, DiskSpec::Null { size: 1 << 30 });
        assert_eq!(c.num_queues, 1);
        assert_eq!(c.queue_size, Config::DEFAULT_QUEUE_SIZE);
        assert_eq!(c.cache, CacheMode::None);
        assert!(!c.read_only);
        assert!(c.qos.is_unlimited());
        assert_eq!(c.suspend.retry_interval, Duration::from_secs(1));
        assert_eq!(c.suspend.retry_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.suspend.alarm_after, Duration::from_secs(60));
        assert!(c.suspend.errnos.contains(&libc::ENOSPC));
        assert!(!c.suspend.errnos.contains(&libc::EINVAL));
        assert_eq!(c.ops.seccomp, SeccompMode::Kill);
    }

    #[test]
    fn bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let img = dir.path().join("d.img").display().to_string();
        let cases: Vec<(Args, &str)> = vec![
            (args(&sock, "null:1000"), "multiple of 512"),
            (
                with(&sock, "null:1M", |s| s.queue_size = Some(100)),
                "power of two",
            ),
            (
                with(&sock, "null:1M", |s| s.num_queues = Some(0)),
                "num-queues",
            ),
            (
                with(&sock, "null:1M", |s| s.serial = Some("x".repeat(21))),
                "serial",
            ),
            (args(&sock, "/nonexistent/disk.img"), "does not exist"),
            (
                with(&sock, &img, |s| s.size = Some(Bytes(1000))),
                "multiple of 512",
            ),
            (
                args(Path::new("/nonexistent/dir/s"), "null:1M"),
                "directory",
            ),
            (
                with(&sock, "null:1M", |s| s.retry_errnos = Some("EFOO".into())),
                "retry-errnos",
            ),
            (
                with(&sock, "null:1M", |s| {
                    s.retry_interval = Some(Secs(Duration::ZERO))
                }),
                "retry-interval",
            ),
            (
                with(&sock, "null:1M", |s| s.qos_iops_burst = Some(10)),
                "sustained",
            ),
            (
                with(&sock, "null:1M", |s| {
                    s.qos_iops = Some(100);
                    s.qos_iops_burst = Some(50)
                }),
                "below",
            ),
            (
                with(&sock, "null:1M", |s| s.socket_mode = Some("999".into())),
                "socket-mode",
            ),
            (
                with(&sock, "null:1M", |s| s.qos_iops_size = Some(Bytes(1000))),
                "iops-size",
            ),
        ];
        for (a, needle) in cases {
            let err = Config::load(&a).unwrap_err().to_string();
            assert!(err.contains(needle), "`{err}` lacks `{needle}`");
        }
    }

    #[test]
    fn suspension_and_qos_settings() {
        let dir = tempfile::tempdir().unwrap();
        let a = with(&dir.path().join("s"), "null:1M", |s| {
            s.retry_errnos = Some("eio, ENOSPC".into());
            s.retry_timeout = Some(Secs(Duration::ZERO));
            s.on_timeout = Some(OnTimeout::Suspend);
            s.qos_iops = Some(1000);
            s.qos_iops_burst = Some(5000);
            s.qos_iops_burst_length = Some(Secs(Duration::from_secs(10)));
            s.qos_bps_write = Some(Bytes(100 << 20));
            s.qos_iops_size = Some(Bytes(64 << 10));
        });
        let c = Config::load(&a).unwrap();
        assert_eq!(c.suspend.errnos, vec![libc::EIO, libc::ENOSPC]);
        assert_eq!(c.suspend.retry_timeout, None, "0 = retry forever");
        assert_eq!(c.suspend.alarm_after, Duration::from_secs(60));
        assert_eq!(c.suspend.on_timeout, OnTimeout::Suspend);
        let iops = c.qos.iops.unwrap();
        assert_eq!((iops.rate, iops.burst), (1000, Some(5000)));
        assert_eq!(iops.burst_length, Duration::from_secs(10));
        assert_eq!(c.qos.bps_write.unwrap().rate, 100 << 20);
        assert_eq!(
            c.qos.bps_write.unwrap().burst_length,
            Duration::from_secs(1)
        );
        assert_eq!(c.qos.iops_size, Some(64 << 10));
        assert!(c.qos.bps.is_none());
        let off = with(&dir.path().join("s"), "null:1M", |s| {
            s.retry_errnos = Some("none".into())
        });
        assert!(Config::load(&off).unwrap().suspend.errnos.is_empty());
    }

    #[test]
    fn live_socket_is_refused_and_stale_one_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("live");
        let listener = UnixListener::bind(&sock).unwrap();
        let err = Config::load(&args(&sock, "null:1M")).unwrap_err();
        assert!(matches!(err, ConfigError::SocketInUse(_)), "{err}");
        drop(listener);
        // The file stays behind after the listener is gone: stale.
        assert!(sock.exists());
        Config::load(&args(&sock, "null:1M")).unwrap();
        assert!(!sock.exists());

        let plain = dir.path().join("plain");
        fs::write(&plain, b"x").unwrap();
        let err = Config::load(&args(&plain, "null:1M")).unwrap_err();
        assert!(matches!(err, ConfigError::SocketNotSocket(_)), "{err}");
    }

    #[test]
    fn file_config_and_flags_merge() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("vublk.toml");
        fs::write(
            &cfg,
            format!(
                "socket = \"{}\"\ndisk = \"null:2G\"\nnum-queues = 4\nqueue-size = 128\n\
                 cache = \"writeback\"\nserial = \"file\"\npoll-us = 10\nread-only = true\n\
                 retry-interval = \"500ms\"\nretry-timeout = 30\nqos-bps = \"1G\"\n\
                 qos-iops = 5000\n",
                dir.path().join("s").display()
            ),
        )
        .unwrap();
        let mut a = Args {
            config: Some(cfg.clone()),
            ..Args::default()
        };
        a.settings.num_queues = Some(2);
        let c = Config::load(&a).unwrap();
        assert_eq!(c.num_queues, 2, "flag wins");
        assert_eq!(c.queue_size, 128);
        assert_eq!(c.cache, CacheMode::Writeback);
        assert_eq!(c.serial, b"file");
        assert_eq!(c.poll, Duration::from_micros(10));
        assert!(c.read_only);
        assert_eq!(c.disk, DiskSpec::Null { size: 2 << 30 });
        assert_eq!(c.suspend.retry_interval, Duration::from_millis(500));
        assert_eq!(c.suspend.retry_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.qos.bps.unwrap().rate, 1 << 30);
        assert_eq!(c.qos.iops.unwrap().rate, 5000);

        // SIGHUP: a changed file changes the live settings.
        fs::write(
            &cfg,
            "disk = \"null:2G\"\nqos-iops = 100\nretry-interval = 2\n",
        )
        .unwrap();
        let (qos, suspend) = Config::reload(&a).unwrap();
        assert_eq!(qos.iops.unwrap().rate, 100);
        assert!(qos.bps.is_none());
        assert_eq!(suspend.retry_interval, Duration::from_secs(2));

        fs::write(&cfg, "socket = 3\n").unwrap();
        let err = Config::load(&a).unwrap_err().to_string();
        assert!(err.contains("invalid config file"), "{err}");
        fs::write(&cfg, "sockett = \"x\"\n").unwrap();
        let err = Config::load(&a).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn flags_parse() {
        let a = Args::try_parse_from([
            "vublk",
            "--socket",
            "/tmp/s",
            "--disk",
            "null:1G",
            "--read-only",
            "--qos-bps",
            "100M",
            "--retry-timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(a.settings.read_only, Some(true));
        assert_eq!(a.settings.qos_bps, Some(Bytes(100 << 20)));
        assert_eq!(
            a.settings.retry_timeout,
            Some(Secs(Duration::from_secs(120)))
        );
        assert!(Args::try_parse_from(["vublk", "--qos-bps", "fast"]).is_err());
    }
}
