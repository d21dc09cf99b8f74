//! A zram swap device created through `/sys/class/zram-control`, removed on
//! drop (swapoff, then hot_remove), including when a panic unwinds. Used by
//! the tests and the benchmark, and by operators who want a compressed RAM
//! tier without setting one up by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The control directory.
pub const CONTROL: &str = "/sys/class/zram-control";

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum ZramError {
    /// zram-control is absent (no zram module) or not writable.
    #[error("zram unavailable: {0}")]
    Unavailable(String),
    /// A sysfs write or a command failed.
    #[error("{what}: {detail}")]
    Setup {
        /// Step.
        what: String,
        /// Cause.
        detail: String,
    },
}

/// A zram swap device; removed on drop.
#[derive(Debug)]
pub struct ZramSwap {
    id: u32,
    dev: PathBuf,
    swapped_on: bool,
    removed: bool,
}

fn run(cmd: &str, args: &[&str]) -> Result<(), ZramError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| ZramError::Setup {
            what: format!("running {cmd}"),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ZramError::Setup {
            what: format!("{cmd} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl ZramSwap {
    /// Whether zram devices can be created here (root and zram-control).
    pub fn check() -> Result<(), ZramError> {
        if crate::tier::sys::euid() != 0 {
            return Err(ZramError::Unavailable("not root".into()));
        }
        if !Path::new(CONTROL).join("hot_add").exists() {
            return Err(ZramError::Unavailable(format!(
                "{CONTROL}/hot_add absent (zram not loaded)"
            )));
        }
        Ok(())
    }

    /// Create a `size`-byte zram device and `swapon` it with `priority`.
    pub fn create(size: u64, priority: i32) -> Result<Self, ZramError> {
        Self::check()?;
        let id_text = std::fs::read_to_string(Path::new(CONTROL).join("hot_add"))
            .map_err(|e| ZramError::Unavailable(format!("{CONTROL}/hot_add: {e}")))?;
        let id: u32 = id_text.trim().parse().map_err(|_| ZramError::Setup {
            what: "hot_add".into(),
            detail: format!("unexpected answer {id_text:?}"),
        })?;
        // From here on, Drop removes the device whatever fails.
        let mut z = Self {
            id,
            dev: PathBuf::from(format!("/dev/zram{id}")),
            swapped_on: false,
            removed: false,
        };
        let sys = z.sysfs();
        // lz4 is faster than the default lzo-rle where the kernel has it.
        let _ = std::fs::write(sys.join("comp_algorithm"), "lz4");
        std::fs::write(sys.join("disksize"), size.to_string()).map_err(|e| ZramError::Setup {
            what: format!("{}/disksize", sys.display()),
            detail: e.to_string(),
        })?;
        let t0 = Instant::now();
        while !z.dev.exists() {
            if t0.elapsed() > Duration::from_secs(5) {
                return Err(ZramError::Setup {
                    what: z.dev.display().to_string(),
                    detail: "device node did not appear".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let dev = z.dev.display().to_string();
        run("mkswap", &[&dev])?;
        run("swapon", &["-p", &priority.to_string(), &dev])?;
        z.swapped_on = true;
        Ok(z)
    }

    /// The device node.
    pub fn device(&self) -> &Path {
        &self.dev
    }

    /// The sysfs directory.
    pub fn sysfs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}", self.id))
    }

    /// Uncompressed bytes stored (first field of mm_stat).
    pub fn stored_bytes(&self) -> u64 {
        std::fs::read_to_string(self.sysfs().join("mm_stat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    /// Remove the device now (also done by drop).
    pub fn remove(&mut self) -> Result<(), ZramError> {
        if self.removed {
            return Ok(());
        }
        let dev = self.dev.display().to_string();
        if self.swapped_on {
            run("swapoff", &[&dev])?;
            self.swapped_on = false;
        }
        let mut last = String::new();
        for _ in 0..50 {
            match std::fs::write(Path::new(CONTROL).join("hot_remove"), self.id.to_string()) {
                // ENODEV: gone already.
                Ok(()) => {
                    self.removed = true;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                    self.removed = true;
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(ZramError::Setup {
            what: format!("hot_remove zram{}", self.id),
            detail: last,
        })
    }
}

impl Drop for ZramSwap {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("vublk-tier: removing {}: {e}", self.dev.display());
        }
    }
}
