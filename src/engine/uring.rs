//! One io_uring per queue thread: the disk registered as a fixed file, and
//! typed helpers that build submission entries for block operations.

use std::io;
use std::os::unix::io::RawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Index of the disk in the ring's fixed file table.
const DISK: types::Fixed = types::Fixed(0);

/// fallocate modes used for discard and write-zeroes.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

pub struct Uring {
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    has_disk: bool,
}

impl Uring {
    /// Creates a ring with room for `entries` in-flight operations and
    /// registers `disk` (if any) as fixed file 0 so submissions skip the
    /// per-I/O file table lookup.
    pub fn new(entries: u32, disk: Option<RawFd>) -> io::Result<Uring> {
        let entries = entries.next_power_of_two().clamp(8, 32768);
        let ring = IoUring::builder()
            // Completions are reaped by the same thread that submits.
            .setup_single_issuer()
            // No IPI per completion: the kernel queues completion work and
            // raises IORING_SQ_TASKRUN, and `submit` runs it (see there).
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(entries * 2)
            .build(entries)
            .or_else(|_| IoUring::builder().build(entries))?;
        if let Some(fd) = disk {
            ring.submitter().register_files(&[fd])?;
        }
        Ok(Uring {
            ring,
            has_disk: disk.is_some(),
        })
    }

    /// Queues one entry, submitting first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer and iovec array the entry points to must stay valid and
    /// unmoved until its completion has been reaped.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded to the caller.
            let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
            if pushed {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn disk(&self) -> io::Result<types::Fixed> {
        if self.has_disk {
            Ok(DISK)
        } else {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        }
    }

    /// # Safety
    /// `iovecs` and the memory they describe must stay valid until completion.
    pub unsafe fn readv(
        &mut self,
        data: u64,
        iovecs: &[libc::iovec],
        offset: u64,
    ) -> io::Result<()> {
        let e = opcode::Readv::new(self.disk()?, iovecs.as_ptr(), iovecs.len() as u32)
            .offset(offset)
            .build()
            .user_data(data);
        // SAFETY: forwarded to the caller.
        unsafe { self.push(e) }
    }

    /// # Safety
    /// `iovecs` and the memory they describe must stay valid until completion.
    pub unsafe fn writev(
        &mut self,
        data: u64,
        iovecs: &[libc::iovec],
        offset: u64,
        dsync: bool,
    ) -> io::Result<()> {
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let e = opcode::Writev::new(self.disk()?, iovecs.as_ptr(), iovecs.len() as u32)
            .offset(offset)
            .rw_flags(flags)
            .build()
            .user_data(data);
        // SAFETY: forwarded to the caller.
        unsafe { self.push(e) }
    }

    pub fn fdatasync(&mut self, data: u64) -> io::Result<()> {
        let e = opcode::Fsync::new(self.disk()?)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(data);
        // SAFETY: fsync points at no memory.
        unsafe { self.push(e) }
    }

    pub fn fallocate(&mut self, data: u64, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let e = opcode::Fallocate::new(self.disk()?, len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(data);
        // SAFETY: fallocate points at no memory.
        unsafe { self.push(e) }
    }

    /// Reads an eventfd's 8-byte counter; completes when it is signalled.
    ///
    /// # Safety
    /// `buf` must stay valid until completion.
    pub unsafe fn read_eventfd(&mut self, data: u64, fd: RawFd, buf: *mut u64) -> io::Result<()> {
        let e = opcode::Read::new(types::Fd(fd), buf.cast(), 8)
            .build()
            .user_data(data);
        // SAFETY: forwarded to the caller.
        unsafe { self.push(e) }
    }

    /// Asks the kernel to cancel the operation tagged `target`.
    pub fn cancel(&mut self, data: u64, target: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel::new(target).build().user_data(data);
        // SAFETY: a cancel points at no memory.
        unsafe { self.push(e) }
    }

    /// Submits queued entries without waiting, and runs the kernel's pending
    /// completion work so that its completions become visible. With
    /// COOP_TASKRUN, block I/O completions wait as task work until this
    /// thread enters the kernel: a queue thread that only spins on the rings
    /// would not see them until it gave up polling.
    pub fn submit(&mut self) -> io::Result<()> {
        let pending = {
            let sq = self.ring.submission();
            !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
        };
        if pending {
            // The io-uring crate adds GETEVENTS when TASKRUN is raised.
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Submits queued entries and sleeps until at least one completion, or
    /// until `timeout` has passed when one is given.
    pub fn submit_and_wait(&mut self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        let res = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves available completions into `out` as (user data, result).
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}
