//! Idle page tracking: `/proc/PID/pagemap` gives the PFN of each page the
//! target maps, `/sys/kernel/mm/page_idle/bitmap` marks PFNs idle and tells,
//! one interval later, which stayed idle.
//!
//! The four points of the bitmap interface (see the guest kernel's README):
//! 1. a read or write moves at most 4096 bytes per call: every transfer here
//!    is a loop over at most 4096-byte, 8-byte aligned pieces;
//! 2. the last word, only partly below max_pfn, reads and writes 0 bytes:
//!    a short transfer ends that chunk, and pages whose word could not be
//!    read are reported `Unknown`, never idle;
//! 3. pages still in the per-CPU LRU-add batches cannot be marked: after
//!    marking, the words are read back; for a page whose bit did not stick,
//!    `/proc/kpageflags` says whether it is on the LRU (then it was touched
//!    again at once, and reads accessed next time, rightly) or not (the
//!    mark was refused: `Unknown` at the next scan, not a false access);
//! 4. clearing the Accessed bit does not flush the TLB, so a page reached
//!    through a cached translation can read idle although it is hot. After
//!    marking, the tracker runs briefly on every CPU it may use
//!    ([`sys::visit_cpus`]): a target thread resuming on such a CPU reloads
//!    CR3, which drops its stale translations where TLB entries are not
//!    PCID-tagged (TCG, older CPUs). Where they are, a real TLB's small
//!    reach limits the effect to tiny hot sets; a cold age of at least 2
//!    scans (default 12) makes one false idle reading harmless, and a page
//!    wrongly moved comes back as a refault that doubles its own cold age.

use crate::tier::pages::BitSet;
use crate::tier::sys;
use crate::tier::target::{PM_PFN_MASK, PM_PRESENT};
use crate::tier::tracker::{Access, Capabilities, ScanInput, ScanResult, Tracker, TrackerError};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

/// The bitmap file.
pub const BITMAP: &str = "/sys/kernel/mm/page_idle/bitmap";
/// Bytes per bitmap transfer (point 1).
const CHUNK_BYTES: usize = 4096;
const CHUNK_WORDS: usize = CHUNK_BYTES / 8;
const CHUNK_PFNS: u64 = (CHUNK_WORDS * 64) as u64;
/// Page flags, for KPF_LRU.
const KPAGEFLAGS: &str = "/proc/kpageflags";
const KPF_LRU: u64 = 1 << 5;
/// Most kpageflags lookups per scan; past it a mark that did not stick is
/// taken as a fresh access.
const MAX_FLAG_LOOKUPS: usize = 1 << 16;

/// The idle page tracker.
pub struct PageIdle {
    bitmap: File,
    kpageflags: Option<File>,
    marked: bool,
    unmarkable: BitSet,
    /// Words of the bitmap for the chunks holding our PFNs, keyed by chunk.
    words: Vec<u64>,
}

/// One read of the bitmap around a set of PFNs.
struct Window {
    first_chunk: u64,
    chunks: usize,
    /// Chunks that hold at least one of our PFNs.
    used: BitSet,
    /// Words per chunk that could be transferred (point 2).
    valid: Vec<usize>,
}

impl Window {
    fn covering(pfns: impl Iterator<Item = u64> + Clone) -> Option<Self> {
        let lo = pfns.clone().min()?;
        let hi = pfns.clone().max()?;
        let first_chunk = lo / CHUNK_PFNS;
        let chunks = (hi / CHUNK_PFNS - first_chunk + 1) as usize;
        let mut used = BitSet::new(chunks);
        for p in pfns {
            used.set((p / CHUNK_PFNS - first_chunk) as usize, true);
        }
        Some(Self {
            first_chunk,
            chunks,
            used,
            valid: vec![0; chunks],
        })
    }

    /// Word index (into the window buffer) and bit of `pfn`.
    fn locate(&self, pfn: u64) -> (usize, u32) {
        let w = (pfn - self.first_chunk * CHUNK_PFNS) / 64;
        (w as usize, (pfn % 64) as u32)
    }

    fn readable(&self, pfn: u64) -> bool {
        let (w, _) = self.locate(pfn);
        w % CHUNK_WORDS < self.valid.get(w / CHUNK_WORDS).copied().unwrap_or(0)
    }
}

impl PageIdle {
    /// Whether the bitmap is usable here.
    pub fn check() -> Result<String, String> {
        if !std::path::Path::new(BITMAP).exists() {
            return Err(format!(
                "{BITMAP} is absent (kernel without CONFIG_IDLE_PAGE_TRACKING)"
            ));
        }
        if sys::euid() != 0 {
            return Err("needs root (pagemap PFNs and the bitmap)".into());
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(BITMAP)
            .map_err(|e| format!("{BITMAP}: {e}"))?;
        Ok(format!("{BITMAP} with pagemap PFNs"))
    }

    /// A tracker for a mapping of `pages` pages.
    pub fn new(pages: usize) -> Result<Self, TrackerError> {
        let bitmap = OpenOptions::new()
            .read(true)
            .write(true)
            .open(BITMAP)
            .map_err(|source| TrackerError::Io {
                what: format!("opening {BITMAP}"),
                source,
            })?;
        Ok(Self {
            bitmap,
            kpageflags: File::open(KPAGEFLAGS).ok(),
            marked: false,
            unmarkable: BitSet::new(pages),
            words: Vec::new(),
        })
    }

    /// Whether `pfn` is on an LRU list (true when unknown).
    fn on_lru(&self, pfn: u64) -> bool {
        let Some(f) = &self.kpageflags else {
            return true;
        };
        let mut b = [0u8; 8];
        match f.read_exact_at(&mut b, pfn * 8) {
            Ok(()) => u64::from_ne_bytes(b) & KPF_LRU != 0,
            Err(_) => true,
        }
    }

    /// Read every used chunk of `win` into `self.words`.
    fn read_window(&mut self, win: &mut Window) -> Result<(), TrackerError> {
        self.words.clear();
        self.words.resize(win.chunks * CHUNK_WORDS, 0);
        let mut buf = [0u8; CHUNK_BYTES];
        for c in win.used.ones() {
            let off = (win.first_chunk + c as u64) * CHUNK_BYTES as u64;
            let got = transfer_loop(|o, b| self.bitmap.read_at(b, off + o as u64), &mut buf)
                .map_err(|source| TrackerError::Io {
                    what: format!("reading {BITMAP}"),
                    source,
                })?;
            win.valid[c] = got / 8;
            for (k, w) in buf[..got].chunks_exact(8).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(w);
                self.words[c * CHUNK_WORDS + k] = u64::from_ne_bytes(a);
            }
        }
        Ok(())
    }

    /// Write `self.words` for every used chunk of `win` (sets idle flags).
    fn write_window(&mut self, win: &Window) -> Result<(), TrackerError> {
        let mut buf = [0u8; CHUNK_BYTES];
        for c in win.used.ones() {
            for (k, w) in self.words[c * CHUNK_WORDS..(c + 1) * CHUNK_WORDS]
                .iter()
                .enumerate()
            {
                buf[k * 8..k * 8 + 8].copy_from_slice(&w.to_ne_bytes());
            }
            let off = (win.first_chunk + c as u64) * CHUNK_BYTES as u64;
            transfer_loop(
                |o, b| self.bitmap.write_at(&b[..], off + o as u64),
                &mut buf,
            )
            .map_err(|source| TrackerError::Io {
                what: format!("writing {BITMAP}"),
                source,
            })?;
        }
        Ok(())
    }
}

/// Run `op(offset, rest)` until the buffer is done or it moves 0 bytes
/// (point 2). Returns the bytes moved (a multiple of 8).
fn transfer_loop(
    mut op: impl FnMut(usize, &mut [u8]) -> io::Result<usize>,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match op(done, &mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Past max_pfn the kernel may also answer EINVAL/ENXIO: stop.
            Err(e)
                if done > 0
                    || matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENXIO)) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done - done % 8)
}

fn present_pfn(e: u64) -> Option<u64> {
    let pfn = e & PM_PFN_MASK;
    (e & PM_PRESENT != 0 && pfn != 0).then_some(pfn)
}

impl Tracker for PageIdle {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "page-idle".into(),
            per_page: true,
            sees_reads: true,
            evicts_to_measure: false,
            working_set: true,
            detail: "pagemap PFNs + page_idle bitmap: per-page access bits, no page moved to \
                     measure; after marking it visits every CPU so stale TLB entries go"
                .into(),
        }
    }

    fn scan(&mut self, input: ScanInput<'_>) -> Result<ScanResult, TrackerError> {
        let ScanInput { pagemap, pages, .. } = input;
        let mut res = ScanResult::default();
        let pfns = pagemap.iter().filter_map(|&e| present_pfn(e));
        let mut win = Window::covering(pfns.clone());

        // 1. Read back the marks of the previous scan.
        if let Some(w) = win.as_mut() {
            if self.marked {
                self.read_window(w)?;
            }
        }
        let mut accessed = 0u64;
        for (i, &e) in pagemap.iter().enumerate() {
            if pages.out.get(i) {
                continue;
            }
            let a = match (present_pfn(e), win.as_ref()) {
                _ if !self.marked => Access::Unknown,
                (Some(_), _) if self.unmarkable.get(i) => Access::Unknown,
                (Some(pfn), Some(w)) if w.readable(pfn) => {
                    let (wi, bit) = w.locate(pfn);
                    if self.words[wi] & (1 << bit) != 0 {
                        Access::Idle
                    } else {
                        accessed += 1;
                        Access::Accessed
                    }
                }
                (Some(_), _) => Access::Unknown,
                // Not mapped by the target: it did not access the page.
                (None, _) => Access::Idle,
            };
            res.record(pages, i, a);
        }
        if self.marked {
            res.wss_bytes = Some(accessed * sys::page_size() as u64);
        }

        // 2. Mark every mapped page idle for the next interval.
        self.unmarkable.clear_all();
        let Some(mut w) = win else {
            self.marked = true;
            return Ok(res);
        };
        self.words.clear();
        self.words.resize(w.chunks * CHUNK_WORDS, 0);
        for pfn in pagemap.iter().filter_map(|&e| present_pfn(e)) {
            let (wi, bit) = w.locate(pfn);
            self.words[wi] |= 1 << bit;
        }
        self.write_window(&w)?;
        // Point 4: make the target's threads reload their address space.
        if let Err(e) = sys::visit_cpus() {
            log::debug!("visiting CPUs after marking: {e}");
        }

        // 3. Read back (point 3). A mark that did not stick means either
        //    that the page was touched again at once (the read-back clears
        //    the flag of a page whose PTE is young) or that it sits in an
        //    LRU-add batch; /proc/kpageflags (KPF_LRU) tells which.
        self.read_window(&mut w)?;
        let mut lookups = 0usize;
        for (i, &e) in pagemap.iter().enumerate() {
            if let Some(pfn) = present_pfn(e) {
                let (wi, bit) = w.locate(pfn);
                if !w.readable(pfn) {
                    self.unmarkable.set(i, true);
                    continue;
                }
                if self.words[wi] & (1 << bit) != 0 {
                    continue;
                }
                // Did not stick: touched again at once (on the LRU, so the
                // next read says "accessed" by itself), or not on the LRU
                // yet (the mark was refused: unknown next time).
                lookups += 1;
                if lookups <= MAX_FLAG_LOOKUPS && !self.on_lru(pfn) {
                    self.unmarkable.set(i, true);
                }
            }
        }
        self.marked = true;
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_loop_handles_short_and_zero() {
        // A source that gives 24 bytes per call, then 0 at 72 (max_pfn).
        let mut buf = [0u8; 4096];
        let n = transfer_loop(
            |o, b| Ok(if o >= 72 { 0 } else { 24.min(b.len()) }),
            &mut buf,
        )
        .unwrap();
        assert_eq!(n, 72);
        let n = transfer_loop(|_, b| Ok(b.len().min(4096)), &mut buf).unwrap();
        assert_eq!(n, 4096);
        let n = transfer_loop(
            |o, _| {
                if o == 0 {
                    Ok(16)
                } else {
                    Err(io::Error::from_raw_os_error(libc::EINVAL))
                }
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(n, 16);
        assert!(transfer_loop(
            |_, _| Err(io::Error::from_raw_os_error(libc::EIO)),
            &mut buf
        )
        .is_err());
    }

    #[test]
    fn window_locates_pfns() {
        let pfns = [5u64, 70_000, 32_768 * 3 + 130];
        let mut w = Window::covering(pfns.iter().copied()).unwrap();
        assert_eq!(w.first_chunk, 0);
        assert_eq!(w.chunks, 4);
        assert_eq!(w.used.ones().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(w.locate(5), (0, 5));
        assert_eq!(w.locate(32_768 * 3 + 130), (3 * 512 + 2, 2));
        assert!(!w.readable(5));
        w.valid = vec![512, 0, 512, 2];
        assert!(w.readable(5));
        assert!(w.readable(32_768 * 3 + 127));
        assert!(!w.readable(32_768 * 3 + 130));
        let w2 = Window::covering([40_000u64, 40_001].into_iter()).unwrap();
        assert_eq!((w2.first_chunk, w2.chunks), (1, 1));
        assert!(Window::covering(std::iter::empty()).is_none());
    }

    #[test]
    fn pfn_requires_present_and_nonzero() {
        assert_eq!(present_pfn(PM_PRESENT | 1234), Some(1234));
        assert_eq!(present_pfn(PM_PRESENT), None);
        assert_eq!(present_pfn(1234), None);
    }
}
