//! Thin wrappers over the system calls the tier controller needs.
//!
//! Every `unsafe` block of `vublk::tier` lives in this file, each in a small
//! function with its own `SAFETY:` argument. Callers get safe functions that
//! take Rust slices and owned file descriptors.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::Duration;

/// `move_pages` flag: move pages mapped only by this process.
pub const MPOL_MF_MOVE: i32 = 1 << 1;
/// `move_pages` flag: move pages even if they are mapped by other processes.
pub const MPOL_MF_MOVE_ALL: i32 = 1 << 2;

/// Most iovecs one `process_madvise` call takes (UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The base page size of this machine.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}

/// Effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// `pidfd_open(pid, 0)`: a stable handle on a process.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; on success the kernel returns a new
    // file descriptor that nothing else owns, which we wrap exactly once.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) })?;
    // SAFETY: `fd` is a fresh, valid descriptor owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `process_madvise(pidfd, ranges, advice)`: advise on address ranges of the
/// process behind `pidfd`. `ranges` are `(start, len)` pairs in the target's
/// address space; at most [`IOV_MAX`] of them. Returns the bytes advised.
pub fn process_madvise(
    pidfd: BorrowedFd<'_>,
    ranges: &[(usize, usize)],
    advice: i32,
) -> io::Result<usize> {
    if ranges.is_empty() {
        return Ok(0);
    }
    if ranges.len() > IOV_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than IOV_MAX ranges",
        ));
    }
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|&(start, len)| libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    // SAFETY: `iov` is a valid array of `iov.len()` iovecs that lives across
    // the call; the kernel only reads it. The addresses in it are interpreted
    // in the target's mm and never dereferenced in ours.
    let n = check(unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd.as_raw_fd(),
            iov.as_ptr(),
            iov.len(),
            advice,
            0u32,
        )
    })?;
    Ok(n as usize)
}

/// `move_pages(pid, ...)`: with `nodes` moves each page to its node, without
/// it queries the node of each page. `status` receives the node or `-errno`.
pub fn move_pages(
    pid: i32,
    addrs: &[usize],
    nodes: Option<&[i32]>,
    status: &mut [i32],
    flags: i32,
) -> io::Result<usize> {
    if status.len() != addrs.len() || nodes.is_some_and(|n| n.len() != addrs.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "move_pages: length mismatch",
        ));
    }
    let nodes_ptr = nodes.map_or(std::ptr::null(), |n| n.as_ptr());
    // SAFETY: `addrs`, `nodes` (or NULL) and `status` are valid for
    // `addrs.len()` elements during the call; the kernel reads the first two
    // and writes only `status`. The addresses belong to the target's mm.
    let n = check(unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            nodes_ptr,
            status.as_mut_ptr(),
            flags,
        )
    })?;
    Ok(n as usize)
}

/// CPU time (user + system) used so far by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a valid, writable rusage; getrusage fills it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage succeeded, so it initialised the struct (and it was
    // zeroed before, so every bit pattern is already a valid rusage).
    let ru = unsafe { ru.assume_init() };
    let tv =
        |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `memfd_create(name, MFD_CLOEXEC)` sized to `len` bytes.
pub fn memfd_create(name: &str, len: u64) -> io::Result<File> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in memfd name"))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by no one else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// A `MAP_SHARED` mapping of a file in this process, unmapped on drop.
///
/// The controller maps the guest's memfd read-only and never touches it: its
/// only use is `mincore`, which reads page-cache residency without creating
/// page-table entries, so the mapping does not make guest pages "shared".
#[derive(Debug)]
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; the raw
// pointer is only handed to the kernel (mincore, madvise) or to callers
// through `as_slice`-free accessors, so moving it across threads is sound.
unsafe impl Send for SharedMap {}
// SAFETY: `&SharedMap` only allows kernel calls (mincore, madvise) and
// volatile byte access through `read_u64`/`write_u64`, which are atomic with
// respect to memory safety for shared memory.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Map `len` bytes of `fd` at `offset`, shared; `writable` adds PROT_WRITE.
    pub fn new(fd: BorrowedFd<'_>, len: usize, offset: u64, writable: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a NULL hint lets the kernel choose a fresh range, so no
        // existing memory is replaced; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len, writable })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `new` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address in this process.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    fn check_range(&self, off: usize, len: usize) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside mapping",
            )),
        }
    }

    /// Page-cache residency of the pages at `[off, off + vec.len() pages)`;
    /// bit 0 of each byte is set for a resident page.
    pub fn mincore(&self, off: usize, vec: &mut [u8]) -> io::Result<()> {
        let ps = page_size();
        self.check_range(off, vec.len() * ps)?;
        if vec.is_empty() {
            return Ok(());
        }
        // SAFETY: the range lies inside our own mapping (checked above) and
        // `vec` has one writable byte per page of it.
        let rc = unsafe {
            libc::mincore(
                self.ptr.as_ptr().add(off).cast::<libc::c_void>(),
                vec.len() * ps,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `madvise` on a range of this mapping. On a shared file mapping
    /// MADV_DONTNEED only drops this process's page-table entries: the data
    /// stays in the file (the memfd), so this is safe for any advice the
    /// kernel accepts on shared mappings.
    pub fn madvise(&self, off: usize, len: usize, advice: i32) -> io::Result<()> {
        self.check_range(off, len)?;
        // SAFETY: the range lies inside our own MAP_SHARED mapping; advice
        // on a shared mapping never changes the file's contents.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(off).cast::<libc::c_void>(),
                len,
                advice,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read the 8-byte word at byte offset `off` (aligned to 8).
    pub fn read_u64(&self, off: usize) -> io::Result<u64> {
        self.check_range(off, 8)?;
        if off % 8 != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "unaligned"));
        }
        // SAFETY: in bounds and 8-byte aligned (the mapping is page
        // aligned); volatile because other processes write this memory.
        Ok(unsafe { self.ptr.as_ptr().add(off).cast::<u64>().read_volatile() })
    }

    /// Write the 8-byte word at byte offset `off` (aligned to 8); the mapping
    /// must have been created writable.
    pub fn write_u64(&self, off: usize, v: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only mapping",
            ));
        }
        self.check_range(off, 8)?;
        if off % 8 != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "unaligned"));
        }
        // SAFETY: in bounds, aligned and the mapping is writable (checked).
        unsafe { self.ptr.as_ptr().add(off).cast::<u64>().write_volatile(v) };
        Ok(())
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: we own exactly this mapping and nothing borrows it past
        // `self`'s lifetime.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), self.len);
        }
    }
}

/// Whether `fd` is readable now (for a pidfd: the process has exited).
pub fn fd_readable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0)
}

/// Drop this process's page-table entries for `[addr, addr + len)` with
/// MADV_DONTNEED. For a `MAP_SHARED` file mapping (guest RAM in a memfd)
/// the data stays in the file and the next access faults it back in; the
/// pages stop counting as mapped by this process, so the tier controller's
/// MADV_PAGEOUT can move them.
///
/// # Safety
/// The range must lie within `MAP_SHARED` file mappings of this process
/// (on a private or anonymous mapping MADV_DONTNEED discards the data, which
/// would change memory that Rust code may hold references to).
pub unsafe fn drop_shared_view(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is a shared file mapping, for
    // which MADV_DONTNEED only removes page-table entries.
    let rc = unsafe { libc::madvise(addr.cast::<libc::c_void>(), len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run the calling thread briefly on every CPU it may use, then restore its
/// affinity. Each visited CPU switches to this process's address space, so
/// a thread of another process that resumes there reloads CR3, which (where
/// the CPU or emulator does not tag TLB entries by PCID, as under TCG)
/// drops the TLB entries that would hide accesses from idle page tracking.
/// Returns the number of CPUs visited.
pub fn visit_cpus() -> io::Result<usize> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is a valid value.
    let mut all: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid, writable cpu_set_t of `size` bytes.
    if unsafe { libc::sched_getaffinity(0, size, &mut all) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, so the bit lies inside `all`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &all) })
        .collect();
    let mut visited = 0;
    for c in cpus {
        // SAFETY: as above, all zeroes is a valid cpu_set_t.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is below CPU_SETSIZE, so the bit lies inside `one`.
        unsafe { libc::CPU_SET(c, &mut one) };
        // SAFETY: `one` is a valid cpu_set_t of `size` bytes for the call.
        if unsafe { libc::sched_setaffinity(0, size, &one) } == 0 {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
            visited += 1;
        }
    }
    // SAFETY: `all` is the valid mask read above.
    if unsafe { libc::sched_setaffinity(0, size, &all) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(visited)
}
