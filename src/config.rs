//! Command line and TOML configuration, merged (flags win) and validated once
//! at start-up into a [`Config`] that the rest of the daemon trusts.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
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

/// The `vublk` flags. Every field is optional here so that a config file can
/// supply it; [`Config::load`] decides what is required.
#[derive(Debug, Default, Parser)]
#[command(name = "vublk", version, about = "vhost-user-blk backend daemon")]
pub struct Args {
    /// vhost-user unix socket to listen on.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Disk: a raw image file, a block device, or `null:SIZE`.
    #[arg(long)]
    pub disk: Option<String>,
    /// Size of the raw image to create when --disk does not exist (e.g. 10G).
    #[arg(long)]
    pub size: Option<String>,
    /// Number of virtqueues (one polling thread each).
    #[arg(long)]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size the frontend may use (power of two).
    #[arg(long)]
    pub queue_size: Option<u16>,
    /// Serve the disk read-only.
    #[arg(long)]
    pub read_only: bool,
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
    /// TOML file with the same keys as the flags; flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The TOML file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub disk: Option<String>,
    pub size: Option<SizeValue>,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub read_only: Option<bool>,
    pub cache: Option<CacheMode>,
    pub serial: Option<String>,
    pub poll_us: Option<u64>,
}

/// A size in TOML may be a number of bytes or a string with a suffix.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
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
}

impl Config {
    pub const DEFAULT_QUEUE_SIZE: u16 = 256;
    pub const DEFAULT_POLL_US: u64 = 50;

    /// Merges the flags over the config file and validates the result.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let size = match (&args.size, file.size) {
            (Some(s), _) => Some(parse_size("size", s)?),
            (None, Some(SizeValue::Bytes(b))) => Some(b),
            (None, Some(SizeValue::Text(s))) => Some(parse_size("size", &s)?),
            (None, None) => None,
        };
        let config = Config {
            socket: args
                .socket
                .clone()
                .or(file.socket)
                .ok_or(ConfigError::Missing("socket"))?,
            disk: parse_disk(
                args.disk
                    .as_deref()
                    .or(file.disk.as_deref())
                    .ok_or(ConfigError::Missing("disk"))?,
                size,
            )?,
            num_queues: args.num_queues.or(file.num_queues).unwrap_or(1),
            queue_size: args
                .queue_size
                .or(file.queue_size)
                .unwrap_or(Self::DEFAULT_QUEUE_SIZE),
            read_only: args.read_only || file.read_only.unwrap_or(false),
            cache: args.cache.or(file.cache).unwrap_or_default(),
            serial: args
                .serial
                .clone()
                .or(file.serial)
                .unwrap_or_else(|| "vublk".to_string())
                .into_bytes(),
            poll: Duration::from_micros(
                args.poll_us
                    .or(file.poll_us)
                    .unwrap_or(Self::DEFAULT_POLL_US),
            ),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
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
        check_socket_path(&self.socket)
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
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
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| {
        invalid(
            key,
            text,
            "expected a number with an optional K/M/G/T suffix",
        )
    })?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(invalid(key, text, "unknown size suffix")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| invalid(key, text, "too large"))
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
            socket: Some(socket.to_owned()),
            disk: Some(disk.to_string()),
            ..Args::default()
        }
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
    fn null_disk_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(&args(&dir.path().join("s"), "null:1G")).unwrap();
        assert_eq!(c.disk, DiskSpec::Null { size: 1 << 30 });
        assert_eq!(c.num_queues, 1);
        assert_eq!(c.queue_size, Config::DEFAULT_QUEUE_SIZE);
        assert_eq!(c.cache, CacheMode::None);
        assert!(!c.read_only);
    }

    #[test]
    fn bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let cases: Vec<(Args, &str)> = vec![
            (args(&sock, "null:1000"), "multiple of 512"),
            (
                Args {
                    queue_size: Some(100),
                    ..args(&sock, "null:1M")
                },
                "power of two",
            ),
            (
                Args {
                    num_queues: Some(0),
                    ..args(&sock, "null:1M")
                },
                "num-queues",
            ),
            (
                Args {
                    serial: Some("x".repeat(21)),
                    ..args(&sock, "null:1M")
                },
                "serial",
            ),
            (args(&sock, "/nonexistent/disk.img"), "does not exist"),
            (
                Args {
                    size: Some("1000".into()),
                    ..args(&sock, &dir.path().join("d.img").display().to_string())
                },
                "multiple of 512",
            ),
            (
                args(Path::new("/nonexistent/dir/s"), "null:1M"),
                "directory",
            ),
        ];
        for (a, needle) in cases {
            let err = Config::load(&a).unwrap_err().to_string();
            assert!(err.contains(needle), "`{err}` lacks `{needle}`");
        }
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
                 cache = \"writeback\"\nserial = \"file\"\npoll-us = 10\nread-only = true\n",
                dir.path().join("s").display()
            ),
        )
        .unwrap();
        let a = Args {
            config: Some(cfg.clone()),
            num_queues: Some(2),
            ..Args::default()
        };
        let c = Config::load(&a).unwrap();
        assert_eq!(c.num_queues, 2, "flag wins");
        assert_eq!(c.queue_size, 128);
        assert_eq!(c.cache, CacheMode::Writeback);
        assert_eq!(c.serial, b"file");
        assert_eq!(c.poll, Duration::from_micros(10));
        assert!(c.read_only);
        assert_eq!(c.disk, DiskSpec::Null { size: 2 << 30 });

        fs::write(&cfg, "socket = 3\n").unwrap();
        let err = Config::load(&a).unwrap_err().to_string();
        assert!(err.contains("invalid config file"), "{err}");
        fs::write(&cfg, "sockett = \"x\"\n").unwrap();
        let err = Config::load(&a).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
