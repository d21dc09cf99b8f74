//! In-flight I/O tracking (vhost-user INFLIGHT_SHMFD, split rings).
//!
//! The frontend keeps a shared memory region for us across our crashes.
//! Every request is marked in it before it is submitted and cleared after
//! its used-ring entry is written, so a restarted daemon knows which avail
//! entries were taken but never completed and resubmits them in the order
//! they were first fetched. Layout, per queue (vhost-user spec, "Inflight
//! I/O tracking"):
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("cannot create the in-flight region: {0}")]
    Create(io::Error),
    #[error("cannot map the in-flight region: {0}")]
    Map(io::Error),
    #[error("in-flight region of {size} bytes is too small for {queues} queues of {queue_size}")]
    TooSmall {
        size: u64,
        queues: u16,
        queue_size: u16,
    },
    #[error("in-flight region for queue size {0} is not usable")]
    BadQueueSize(u16),
}

/// Bytes one queue takes in the region (as libvhost-user sizes it, so a
/// region can move between backends).
pub fn queue_region_size(queue_size: u16) -> usize {
    let n = DESC * usize::from(queue_size);
    (n + 2).next_multiple_of(ALIGN).max(HEADER + n)
}

/// A shared mapping of the in-flight region.
pub struct InflightRegion {
    ptr: *mut u8,
    len: usize,
    file: File,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory; all access goes through
// atomics on properly aligned fields, and each queue's part is used by one
// worker thread at a time.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a fresh, zeroed region in a memfd.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<InflightRegion, InflightError> {
        if queue_size == 0 {
            return Err(InflightError::BadQueueSize(queue_size));
        }
        let len = queue_region_size(queue_size) * usize::from(num_queues.max(1));
        // SAFETY: memfd_create with a valid C string; we own the new fd.
        let fd = unsafe {
            libc::memfd_create(
                c"vublk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(InflightError::Create)?;
        let region = Self::map(file, len, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            if let Some(h) = region.header(q) {
                h.desc_num.store(queue_size, Ordering::Relaxed);
                h.version.store(VERSION, Ordering::Release);
            }
        }
        Ok(region)
    }

    /// SET_INFLIGHT_FD: the region the frontend kept for us.
    pub fn open(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let need = queue_region_size(queue_size) as u64 * u64::from(num_queues);
        if queue_size == 0 || mmap_size < need {
            return Err(InflightError::TooSmall {
                size: mmap_size,
                queues: num_queues,
                queue_size,
            });
        }
        let len = usize::try_from(mmap_size).map_err(|_| InflightError::TooSmall {
            size: mmap_size,
            queues: num_queues,
            queue_size,
        })?;
        Self::map(file, len, mmap_offset, num_queues, queue_size)
    }

    fn map(
        file: File,
        len: usize,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| InflightError::Map(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a new shared mapping of `len` bytes of our own fd; the
        // result is checked, and unmapped exactly once in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Map(io::Error::last_os_error()));
        }
        Ok(InflightRegion {
            ptr: ptr.cast(),
            len,
            file,
            num_queues,
            queue_size,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn header(&self, queue: u16) -> Option<&Header> {
        if queue >= self.num_queues {
            return None;
        }
        let off = queue_region_size(self.queue_size) * usize::from(queue);
        // SAFETY: `off + HEADER` is inside the mapping (checked at open), the
        // mapping is page-aligned and each queue part starts at a multiple of
        // 64, so the atomics are aligned; they live as long as `self`.
        Some(unsafe { &*(self.ptr.add(off) as *const Header) })
    }

    /// The part of the region that tracks queue `queue`.
    pub fn queue(self: &Arc<Self>, queue: u16) -> Option<InflightQueue> {
        self.header(queue)?;
        Some(InflightQueue {
            region: Arc::clone(self),
            queue,
            counter: 0,
        })
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[repr(C)]
struct Header {
    features: AtomicU64,
    version: AtomicU16,
    desc_num: AtomicU16,
    last_batch_head: AtomicU16,
    used_idx: AtomicU16,
}

#[repr(C)]
struct DescState {
    inflight: AtomicU8,
    padding: [u8; 5],
    next: AtomicU16,
    counter: AtomicU64,
}

/// What a restarted queue must do before it reads the avail ring.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, in the order they were first fetched.
    pub resubmit: Vec<u16>,
    /// Where to resume reading the avail ring.
    pub next_avail: u16,
}

/// One queue's in-flight tracking, owned by its worker.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    queue: u16,
    counter: u64,
}

impl InflightQueue {
    fn header(&self) -> &Header {
        // The index was checked when this handle was made.
        self.region
            .header(self.queue)
            .unwrap_or_else(|| unreachable!("queue index checked at creation"))
    }

    fn desc(&self, head: u16) -> Option<&DescState> {
        if head >= self.region.queue_size {
            return None;
        }
        let off = queue_region_size(self.region.queue_size) * usize::from(self.queue)
            + HEADER
            + DESC * usize::from(head);
        // SAFETY: `head < queue_size`, so the entry lies inside this queue's
        // part of the mapping; entries are 16-byte aligned.
        Some(unsafe { &*(self.region.ptr.add(off) as *const DescState) })
    }

    /// Reads what a previous daemon left behind. `used_idx` is the used
    /// index the guest sees now.
    pub fn recover(&mut self, used_idx: u16) -> Recovery {
        let h = self.header();
        if h.version.load(Ordering::Acquire) == 0 {
            // Never used: initialise it.
            h.desc_num.store(self.region.queue_size, Ordering::Relaxed);
            h.version.store(VERSION, Ordering::Release);
            h.used_idx.store(used_idx, Ordering::Release);
            return Recovery {
                resubmit: Vec::new(),
                next_avail: used_idx,
            };
        }
        // Died between writing the used ring and clearing the entry: that
        // request did complete.
        if h.used_idx.load(Ordering::Acquire) != used_idx {
            let last = h.last_batch_head.load(Ordering::Relaxed);
            if let Some(d) = self.desc(last) {
                d.inflight.store(0, Ordering::Relaxed);
            }
            fence(Ordering::SeqCst);
            self.header().used_idx.store(used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.region.queue_size)
            .filter_map(|i| {
                let d = self.desc(i)?;
                (d.inflight.load(Ordering::Acquire) == 1)
                    .then(|| (d.counter.load(Ordering::Relaxed), i))
            })
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |(c, _)| c + 1);
        Recovery {
            // Every avail entry taken is either used or still in flight.
            next_avail: used_idx.wrapping_add(pending.len() as u16),
            resubmit: pending.into_iter().map(|(_, head)| head).collect(),
        }
    }

    /// Marks `head` in flight; called before its I/O is submitted.
    pub fn mark(&mut self, head: u16) {
        let counter = self.counter;
        self.counter += 1;
        if let Some(d) = self.desc(head) {
            d.counter.store(counter, Ordering::Relaxed);
            d.inflight.store(1, Ordering::Release);
        }
    }

    /// Called before `head`'s used-ring entry is written.
    pub fn pre_complete(&self, head: u16) {
        self.header().last_batch_head.store(head, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// Called after the used ring (and its index) has been updated.
    pub fn complete(&self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc(head) {
            d.inflight.store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.header().used_idx.store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(r: &InflightRegion) -> Arc<InflightRegion> {
        let f = r.file().try_clone().unwrap();
        Arc::new(
            InflightRegion::open(f, r.len() as u64, 0, r.num_queues(), r.queue_size()).unwrap(),
        )
    }

    #[test]
    fn sizes_match_libvhost_user_for_powers_of_two() {
        assert_eq!(queue_region_size(128), 2048 + 64);
        assert_eq!(queue_region_size(4), 128);
        assert!(queue_region_size(3) >= HEADER + 3 * DESC);
    }

    #[test]
    fn crash_leaves_inflight_heads_to_resubmit_in_fetch_order() {
        let r = Arc::new(InflightRegion::create(2, 8).unwrap());
        let mut q = r.queue(1).unwrap();
        assert_eq!(q.recover(0).resubmit, Vec::<u16>::new());
        // Fetch 5, 2, 7, 0; complete 2 (used idx becomes 1).
        for h in [5, 2, 7, 0] {
            q.mark(h);
        }
        q.pre_complete(2);
        q.complete(2, 1);
        // "Crash": a new daemon maps the same memfd.
        let r2 = reopen(&r);
        let mut q2 = r2.queue(1).unwrap();
        let rec = q2.recover(1);
        assert_eq!(rec.resubmit, vec![5, 7, 0]);
        assert_eq!(rec.next_avail, 4);
        // Queue 0 is untouched.
        assert_eq!(r2.queue(0).unwrap().recover(9).resubmit, Vec::<u16>::new());
        // New requests are ordered after the recovered ones.
        q2.mark(3);
        let mut q3 = reopen(&r2).queue(1).unwrap();
        assert_eq!(q3.recover(1).resubmit, vec![5, 7, 0, 3]);
    }

    #[test]
    fn crash_after_used_ring_update_does_not_resubmit_that_head() {
        let r = Arc::new(InflightRegion::create(1, 8).unwrap());
        let mut q = r.queue(0).unwrap();
        q.recover(10);
        q.mark(4);
        q.mark(6);
        q.pre_complete(4);
        // The used index reached 11 in the ring, but the daemon died before
        // clearing head 4.
        let mut q2 = reopen(&r).queue(0).unwrap();
        let rec = q2.recover(11);
        assert_eq!(rec.resubmit, vec![6]);
        assert_eq!(rec.next_avail, 12);
    }

    #[test]
    fn small_or_bad_regions_are_refused() {
        let r = InflightRegion::create(1, 8).unwrap();
        let f = r.file().try_clone().unwrap();
        assert!(InflightRegion::open(f, 16, 0, 2, 8).is_err());
        assert!(r.header(1).is_none());
        assert!(Arc::new(r).queue(1).is_none());
        assert!(InflightRegion::create(1, 0).is_err());
    }
}
