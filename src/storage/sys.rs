//! Geometry queries: block device ioctls and statx. The only unsafe code of
//! the storage module lives here.

use std::fs::{File, Metadata};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

use super::{Geometry, SECTOR_SIZE};

// From <linux/fs.h>.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKIOMIN: libc::c_ulong = 0x1278;
const BLKIOOPT: libc::c_ulong = 0x1279;
const BLKALIGNOFF: libc::c_ulong = 0x127a;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn ioctl_int(file: &File, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these requests write one c_int through the pointer, which
    // points at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.max(0) as u32)
}

fn ioctl_u64(file: &File, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

pub(super) fn block_device_geometry(file: &File, direct: bool) -> io::Result<Geometry> {
    let logical = ioctl_int(file, BLKSSZGET)?.max(SECTOR_SIZE as u32);
    let physical = ioctl_int(file, BLKPBSZGET).unwrap_or(logical).max(logical);
    Ok(Geometry {
        size: ioctl_u64(file, BLKGETSIZE64)?,
        logical_block: logical,
        physical_block: physical,
        min_io: ioctl_int(file, BLKIOMIN).unwrap_or(0),
        opt_io: ioctl_int(file, BLKIOOPT).unwrap_or(0),
        alignment_offset: ioctl_int(file, BLKALIGNOFF).unwrap_or(0),
        // The DMA alignment of most devices is 512; be conservative.
        mem_align: if direct { logical } else { 1 },
    })
}

/// O_DIRECT alignment of a file as statx reports it (Linux 6.1+), if known.
fn dio_align(file: &File) -> Option<(u32, u32)> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    let empty = c"";
    // SAFETY: statx fills the struct it is given; the path is a valid empty
    // C string used with AT_EMPTY_PATH on our own open descriptor.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: statx returned success, so it initialised the struct (and it was
    // zeroed before, so any field it left alone is a valid zero).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align))
}

pub(super) fn file_geometry(file: &File, meta: &Metadata, direct: bool) -> io::Result<Geometry> {
    let (mem_align, logical) = if direct {
        // Without statx's answer assume the common 512-byte sectors.
        let (mem, off) = dio_align(file).unwrap_or((512, 512));
        (mem, off.max(SECTOR_SIZE as u32))
    } else {
        (1, SECTOR_SIZE as u32)
    };
    let blksize = u32::try_from(meta.blksize()).unwrap_or(4096);
    let physical = if blksize.is_power_of_two() {
        blksize.clamp(logical, 64 * 1024)
    } else {
        logical
    };
    Ok(Geometry {
        size: meta.len(),
        logical_block: logical,
        physical_block: physical,
        min_io: physical,
        opt_io: 0,
        alignment_offset: 0,
        mem_align,
    })
}
