//! Fault injection for testing I/O suspension with errors that cannot be
//! caused for real on a test machine (ETIMEDOUT, ENOLINK, ...).
//!
//! Enabled only by the hidden `--fault-file PATH` flag: a watcher thread
//! reads the file every 50 ms. Its content is `OPS ERRNO` (e.g. `write EIO`,
//! `any ETIMEDOUT`) to make completed operations of that kind report the
//! error, or empty / missing to stop. The operation itself still happens,
//! so a retry after the fault is lifted is an ordinary idempotent redo.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::errno_by_name;

pub const READ: u8 = 1;
pub const WRITE: u8 = 2;
pub const FLUSH: u8 = 4;
pub const OTHER: u8 = 8;

#[derive(Default)]
pub struct FaultInjector {
    errno: AtomicI32,
    ops: AtomicU8,
}

impl FaultInjector {
    /// The errno to report for a completed operation of kind `op`, if any.
    pub fn fault(&self, op: u8) -> Option<i32> {
        if self.ops.load(Ordering::Relaxed) & op == 0 {
            return None;
        }
        Some(self.errno.load(Ordering::Relaxed)).filter(|e| *e != 0)
    }

    /// Applies a rule such as `write ENOSPC`; an empty rule clears faults.
    pub fn set_rule(&self, rule: &str) -> Result<(), String> {
        let mut words = rule.split_whitespace();
        let (ops, errno) = match (words.next(), words.next()) {
            (None, _) => (0, 0),
            (Some(ops), Some(name)) => {
                let mut mask = 0;
                for op in ops.split(',') {
                    mask |= match op {
                        "read" => READ,
                        "write" => WRITE,
                        "flush" => FLUSH,
                        "other" => OTHER,
                        "any" => READ | WRITE | FLUSH | OTHER,
                        _ => return Err(format!("unknown operation `{op}`")),
                    };
                }
                let errno = errno_by_name(name).ok_or(format!("unknown errno `{name}`"))?;
                (mask, errno)
            }
            (Some(_), None) => return Err(format!("`{rule}`: expected `OPS ERRNO`")),
        };
        self.errno.store(errno, Ordering::Relaxed);
        self.ops.store(ops, Ordering::Relaxed);
        Ok(())
    }

    /// Starts the thread that follows `path`.
    pub fn watch(self: &Arc<Self>, path: PathBuf) {
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("vublk-faults".into())
            .spawn(move || {
                let mut last = String::new();
                loop {
                    let rule = std::fs::read_to_string(&path).unwrap_or_default();
                    if rule != last {
                        match me.set_rule(rule.trim()) {
                            Ok(()) => log::warn!("fault injection: `{}`", rule.trim()),
                            Err(e) => log::error!("fault file {}: {e}", path.display()),
                        }
                        last = rule;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the fault injection thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let f = FaultInjector::default();
        assert_eq!(f.fault(WRITE), None);
        f.set_rule("write,flush ENOSPC").unwrap();
        assert_eq!(f.fault(WRITE), Some(libc::ENOSPC));
        assert_eq!(f.fault(FLUSH), Some(libc::ENOSPC));
        assert_eq!(f.fault(READ), None);
        f.set_rule("any ETIMEDOUT").unwrap();
        assert_eq!(f.fault(OTHER), Some(libc::ETIMEDOUT));
        f.set_rule("").unwrap();
        assert_eq!(f.fault(READ), None);
        assert!(f.set_rule("write").is_err());
        assert!(f.set_rule("scribble EIO").is_err());
        assert!(f.set_rule("read EWHAT").is_err());
    }
}
