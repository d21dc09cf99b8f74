//! The managed process and its guest-RAM mapping.
//!
//! A `Target` holds a pidfd on the process (actions go through
//! `process_madvise` on it), its `/proc/PID/pagemap`, and a read-only,
//! never-touched mapping of the same memory file in this process, used only
//! for `mincore` (page-cache residency, swap-out included).

use crate::tier::maps::{self, MapEntry, MapsError, Selector};
use crate::tier::pages::BitSet;
use crate::tier::sys::{self, SharedMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

/// Errors about the target process.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A /proc file or a system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// The mapping could not be chosen.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The memory file behind the mapping could not be opened.
    #[error("cannot open the memory file of {region} in process {pid} (tried /proc/{pid}/map_files and /proc/{pid}/fd): {detail}")]
    NoMemFile {
        /// The process.
        pid: i32,
        /// The mapping.
        region: String,
        /// The last error.
        detail: String,
    },
    /// The process has exited.
    #[error("target process {0} exited")]
    Exited(i32),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TargetError {
    let what = what.into();
    move |source| TargetError::Io { what, source }
}

/// Pagemap bit: page present in RAM (mapped by this process).
pub const PM_PRESENT: u64 = 1 << 63;
/// Pagemap bit: page swapped (anonymous memory only).
pub const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap PFN mask (bits 0-54; zero without CAP_SYS_ADMIN).
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// The managed process and mapping.
#[derive(Debug)]
pub struct Target {
    pid: i32,
    pidfd: OwnedFd,
    region: MapEntry,
    pages: usize,
    page_size: usize,
    view: SharedMap,
    pagemap: File,
}

impl Target {
    /// Open process `pid` and the mapping chosen by `sel`.
    pub fn open(pid: i32, sel: &Selector) -> Result<Self, TargetError> {
        let pidfd = sys::pidfd_open(pid).map_err(io_err(format!("pidfd_open({pid})")))?;
        let maps_text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(io_err(format!("reading /proc/{pid}/maps")))?;
        let region = maps::select(&maps::parse_maps(&maps_text)?, sel)?;
        let page_size = sys::page_size();
        let pages = (region.len() as usize) / page_size;
        let file = open_mem_file(pid, &region)?;
        let view = SharedMap::new(file.as_fd(), pages * page_size, region.offset, false)
            .map_err(io_err("mapping the guest memory file for mincore"))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(io_err(format!("opening /proc/{pid}/pagemap")))?;
        Ok(Self {
            pid,
            pidfd,
            region,
            pages,
            page_size,
            view,
            pagemap,
        })
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pidfd.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The managed mapping.
    pub fn region(&self) -> &MapEntry {
        &self.region
    }

    /// Number of pages in the mapping.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Mapping size in bytes.
    pub fn bytes(&self) -> u64 {
        (self.pages * self.page_size) as u64
    }

    /// Address of page `i` in the target.
    pub fn addr(&self, i: usize) -> usize {
        self.region.start as usize + i * self.page_size
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        sys::fd_readable(self.pidfd.as_fd()).unwrap_or(true)
    }

    /// Fill `out` (one bit per page) with page-cache residency; returns the
    /// number of resident pages.
    pub fn residency(&self, out: &mut BitSet) -> Result<usize, TargetError> {
        const CHUNK: usize = 1 << 16;
        let mut vec = vec![0u8; CHUNK.min(self.pages)];
        let mut n = 0;
        let mut first = 0;
        while first < self.pages {
            let cnt = CHUNK.min(self.pages - first);
            self.view
                .mincore(first * self.page_size, &mut vec[..cnt])
                .map_err(io_err("mincore on the guest memory"))?;
            for (k, &v) in vec[..cnt].iter().enumerate() {
                let r = v & 1 != 0;
                out.set(first + k, r);
                n += r as usize;
            }
            first += cnt;
        }
        Ok(n)
    }

    /// Like [`Target::residency`], but pages the target maps (`present`)
    /// are resident by definition, so `mincore` (the costlier call on an
    /// unmapped file range) runs only on 2 MiB blocks with unmapped pages.
    pub fn residency_given(
        &self,
        present: &BitSet,
        out: &mut BitSet,
    ) -> Result<usize, TargetError> {
        const BLOCK: usize = 512;
        let mut vec = [0u8; BLOCK];
        let mut n = 0;
        let mut first = 0;
        while first < self.pages {
            let cnt = BLOCK.min(self.pages - first);
            if (first..first + cnt).all(|i| present.get(i)) {
                (first..first + cnt).for_each(|i| out.set(i, true));
                n += cnt;
            } else {
                self.view
                    .mincore(first * self.page_size, &mut vec[..cnt])
                    .map_err(io_err("mincore on the guest memory"))?;
                for (k, &v) in vec[..cnt].iter().enumerate() {
                    let r = v & 1 != 0 || present.get(first + k);
                    out.set(first + k, r);
                    n += r as usize;
                }
            }
            first += cnt;
        }
        Ok(n)
    }

    /// Read the pagemap entries of every page of the mapping into `out`.
    pub fn read_pagemap(&self, out: &mut Vec<u64>) -> Result<(), TargetError> {
        const CHUNK: usize = 1 << 15;
        out.clear();
        out.reserve(self.pages);
        let mut buf = vec![0u8; CHUNK * 8];
        let base = (self.region.start / self.page_size as u64) * 8;
        let mut first = 0;
        while first < self.pages {
            let cnt = CHUNK.min(self.pages - first);
            let b = &mut buf[..cnt * 8];
            self.pagemap
                .read_exact_at(b, base + first as u64 * 8)
                .map_err(|e| {
                    if self.exited() {
                        TargetError::Exited(self.pid)
                    } else {
                        TargetError::Io {
                            what: format!("reading /proc/{}/pagemap", self.pid),
                            source: e,
                        }
                    }
                })?;
            out.extend(b.chunks_exact(8).map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            }));
            first += cnt;
        }
        Ok(())
    }

    /// `process_madvise` on the given pages (ascending indices), coalesced
    /// into ranges and sent in batches. `stop` is checked between batches.
    /// Returns the number of bytes advised.
    pub fn advise_pages(
        &self,
        pages: &[usize],
        advice: i32,
        stop: &dyn Fn() -> bool,
    ) -> Result<u64, TargetError> {
        let ranges = coalesce(pages, self.page_size, self.region.start as usize);
        let mut done = 0u64;
        for batch in ranges.chunks(sys::IOV_MAX) {
            if stop() {
                break;
            }
            let n = sys::process_madvise(self.pidfd.as_fd(), batch, advice).map_err(|e| {
                if e.raw_os_error() == Some(libc::ESRCH) || self.exited() {
                    TargetError::Exited(self.pid)
                } else {
                    TargetError::Io {
                        what: format!("process_madvise(advice {advice}) on process {}", self.pid),
                        source: e,
                    }
                }
            })?;
            done += n as u64;
        }
        Ok(done)
    }

    /// Page out resident pages that the target does not map (so that
    /// `process_madvise` on it cannot reach them: pages only vublk touched,
    /// or prefetched ones) through this controller's own view of the file:
    /// map them (MADV_POPULATE_READ, no data copied), MADV_PAGEOUT, then
    /// MADV_DONTNEED whatever stayed, so that no page is left mapped here
    /// (which would make it shared and block the next pageout through the
    /// target). Returns the bytes advised.
    pub fn pageout_unmapped(
        &self,
        pages: &[usize],
        stop: &dyn Fn() -> bool,
    ) -> Result<u64, TargetError> {
        let mut done = 0u64;
        for (addr, len) in coalesce(pages, self.page_size, 0) {
            if stop() {
                break;
            }
            let r = self
                .view
                .madvise(addr, len, libc::MADV_POPULATE_READ)
                .and_then(|()| self.view.madvise(addr, len, libc::MADV_PAGEOUT));
            let cleanup = self.view.madvise(addr, len, libc::MADV_DONTNEED);
            r.and(cleanup)
                .map_err(io_err("paging out through the controller's own view"))?;
            done += len as u64;
        }
        Ok(done)
    }

    /// Resident set size of the process (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid)
    }
}

/// VmRSS of process `pid` in bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Coalesce ascending page indices into `(address, length)` ranges.
pub fn coalesce(pages: &[usize], page_size: usize, base: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut prev: Option<usize> = None;
    for &p in pages {
        let addr = base + p * page_size;
        match (prev, out.last_mut()) {
            (Some(q), Some(last)) if q + 1 == p => last.1 += page_size,
            _ => out.push((addr, page_size)),
        }
        prev = Some(p);
    }
    out
}

/// Open the memory file behind `region` of process `pid`: first through
/// `/proc/PID/map_files/START-END` (needs CAP_SYS_ADMIN), then by scanning
/// `/proc/PID/fd` for a descriptor with the same inode.
fn open_mem_file(pid: i32, region: &MapEntry) -> Result<File, TargetError> {
    let mf = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        region.start, region.first_vma_end
    ));
    let mut last = match File::open(&mf) {
        Ok(f) => return Ok(f),
        Err(e) => format!("{}: {e}", mf.display()),
    };
    let dir = format!("/proc/{pid}/fd");
    match std::fs::read_dir(&dir) {
        Ok(rd) => {
            for ent in rd.flatten() {
                let p = ent.path();
                let Ok(md) = std::fs::metadata(&p) else {
                    continue;
                };
                if md.ino() == region.inode && md.file_type().is_file() {
                    match File::open(&p) {
                        Ok(f) => return Ok(f),
                        Err(e) => last = format!("{}: {e}", p.display()),
                    }
                }
            }
        }
        Err(e) => last = format!("{dir}: {e}"),
    }
    Err(TargetError::NoMemFile {
        pid,
        region: region.to_string(),
        detail: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_runs() {
        let r = coalesce(&[0, 1, 2, 5, 7, 8], 4096, 0x1000_0000);
        assert_eq!(
            r,
            vec![
                (0x1000_0000, 3 * 4096),
                (0x1000_0000 + 5 * 4096, 4096),
                (0x1000_0000 + 7 * 4096, 2 * 4096)
            ]
        );
        assert!(coalesce(&[], 4096, 0).is_empty());
    }

    #[test]
    fn opens_own_memfd_and_sees_residency() {
        // This process as its own target: a memfd mapped once, half touched.
        let ps = sys::page_size();
        let f = sys::memfd_create("tier-unit", (64 * ps) as u64).unwrap();
        let m = SharedMap::new(f.as_fd(), 64 * ps, 0, true).unwrap();
        for i in 0..32 {
            m.write_u64(i * ps, i as u64 + 1).unwrap();
        }
        let sel = Selector::Range(m.addr() as u64, (m.addr() + 64 * ps) as u64);
        let t = Target::open(std::process::id() as i32, &sel).unwrap();
        assert_eq!(t.pages(), 64);
        let mut res = BitSet::new(64);
        assert_eq!(t.residency(&mut res).unwrap(), 32);
        let mut present = BitSet::new(64);
        (0..32).for_each(|i| present.set(i, true));
        let mut res2 = BitSet::new(64);
        assert_eq!(t.residency_given(&present, &mut res2).unwrap(), 32);
        assert_eq!(res, res2);
        assert!(res.get(0) && res.get(31) && !res.get(32));
        let mut pm = Vec::new();
        t.read_pagemap(&mut pm).unwrap();
        assert_eq!(pm.len(), 64);
        assert!(pm[0] & PM_PRESENT != 0);
        assert!(pm[40] & PM_PRESENT == 0);
        assert!(!t.exited());
    }
}
