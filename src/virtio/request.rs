//! Turning an untrusted descriptor chain into a validated block request.
//!
//! The chain is treated as the spec frames it: a device-readable byte stream
//! (16-byte header, then data for writes) followed by a device-writable one
//! (data for reads, then the status byte). Descriptor boundaries do not
//! matter, so any framing a driver picks works. Every address is translated
//! and bounds-checked here; the engines only ever see host iovecs that lie
//! inside guest memory that the request keeps mapped.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Status, MAX_DISCARD_SECTORS, MAX_REQUEST_BYTES, MAX_WRITE_ZEROES_SECTORS};
use crate::storage::SECTOR_SIZE;

const HEADER_LEN: u64 = 16;
const DESC_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is malformed (bad next index or bad indirect table)")]
    MalformedChain,
    #[error("device-readable descriptor after a device-writable one")]
    WrongOrder,
    #[error("chain has {0} descriptors, more than the queue allows")]
    TooManyDescriptors(usize),
    #[error("descriptor address {0:#x} (+{1}) is outside guest memory")]
    BadAddress(u64, u64),
    #[error("request header is {0} bytes, expected 16")]
    ShortHeader(u64),
    #[error("no device-writable status byte")]
    NoStatus,
    #[error("request type {0} carries data in the wrong direction")]
    WrongDirection(u32),
    #[error("data length {0} is not a multiple of the {1}-byte block size")]
    Misaligned(u64, u32),
    #[error("sectors {0}+{1} bytes are past the end of the disk")]
    OutOfRange(u64, u64),
    #[error("request of {0} bytes is too large")]
    TooLarge(u64),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("{0} discard/write-zeroes segment bytes, expected exactly one 16-byte segment")]
    BadSegments(u64),
    #[error("unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
}

impl RequestError {
    pub fn status(&self) -> Status {
        match self {
            RequestError::UnsupportedFlags(_) | RequestError::UnsupportedType(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// What the disk looks like to the parser.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub size: u64,
    pub logical_block: u32,
    pub read_only: bool,
    pub max_descriptors: usize,
}

/// A validated operation. Offsets and lengths are in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    GetId { len: u64 },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// Where a queue's descriptor table is and how many entries it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescTable {
    pub addr: GuestAddress,
    pub size: u16,
}

/// A split-ring descriptor as the driver wrote it (little-endian).
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u32,
    next: u16,
}

fn read_desc(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    index: u16,
) -> Result<RawDesc, RequestError> {
    let addr = table
        .0
        .checked_add(u64::from(index) * DESC_LEN)
        .ok_or(RequestError::BadAddress(
            table.0,
            u64::from(index) * DESC_LEN,
        ))?;
    let mut b = [0u8; DESC_LEN as usize];
    mem.read_slice(&mut b, GuestAddress(addr))
        .map_err(|_| RequestError::BadAddress(addr, DESC_LEN))?;
    Ok(RawDesc {
        addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        flags: u32::from(u16::from_le_bytes([b[12], b[13]])),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

/// Where the status byte of a request lives in guest memory.
#[derive(Debug)]
pub struct StatusByte(*mut u8);

/// One piece of the chain, in chain order.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u64,
    writable: bool,
}

/// A parsed request. It holds the guest memory mapping its pointers point
/// into, so they stay valid for as long as the request lives, even if the
/// frontend replaces the memory table meanwhile.
pub struct Request {
    pub head: u16,
    pub op: Result<Op, RequestError>,
    /// Data buffers: the device-writable data for reads and GET_ID, the
    /// device-readable data for writes; empty otherwise.
    pub iovecs: Vec<libc::iovec>,
    status: Option<StatusByte>,
    mem: Arc<GuestMemoryMmap>,
}

impl Request {
    /// Writes the status byte; returns false when the chain had none (the
    /// request is completed with a used length of 0 then).
    pub fn set_status(&self, status: Status) -> bool {
        match &self.status {
            Some(StatusByte(p)) => {
                // SAFETY: `p` was produced by translating a guest address
                // through `self.mem` with a length of 1, and `self.mem` keeps
                // that mapping alive. Guest memory may change under us at any
                // time, hence the volatile write.
                unsafe { std::ptr::write_volatile(*p, status as u8) };
                true
            }
            None => false,
        }
    }

    /// Copies `data` into the request's data buffers starting `offset` bytes
    /// into them; returns the number of bytes copied.
    pub fn copy_to_guest(&self, offset: usize, data: &[u8]) -> usize {
        self.copy(offset, data.len(), |guest, at, n| {
            // SAFETY: `guest` points at `n` bytes of one iovec, which lies in
            // guest memory kept mapped by `self.mem`; `at + n <= data.len()`.
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), guest, n) }
        })
    }

    /// Copies the request's data buffers, from `offset` bytes into them, into
    /// `buf`; returns the number of bytes copied.
    pub fn copy_from_guest(&self, offset: usize, buf: &mut [u8]) -> usize {
        let len = buf.len();
        self.copy(offset, len, |guest, at, n| {
            // SAFETY: as in `copy_to_guest`, with source and destination
            // swapped; `at + n <= buf.len()`.
            unsafe { std::ptr::copy_nonoverlapping(guest, buf[at..].as_mut_ptr(), n) }
        })
    }

    /// Walks the iovecs from stream byte `offset` for up to `len` bytes,
    /// calling `f(host pointer, position in the caller's buffer, length)`.
    fn copy(&self, offset: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> usize {
        let (mut pos, mut done) = (0usize, 0usize);
        for iov in &self.iovecs {
            if done == len {
                break;
            }
            let (lo, hi) = (pos, pos + iov.iov_len);
            pos = hi;
            if hi <= offset {
                continue;
            }
            let skip = offset.saturating_sub(lo);
            let n = (iov.iov_len - skip).min(len - done);
            f((iov.iov_base as *mut u8).wrapping_add(skip), done, n);
            done += n;
        }
        done
    }

    /// Fills the request's device-writable buffers with zeroes.
    pub fn zero_data(&self) {
        for iov in &self.iovecs {
            // SAFETY: as in `copy_to_guest`: the iovec lies inside mapped guest
            // memory held alive by `self.mem`.
            unsafe { std::ptr::write_bytes(iov.iov_base as *mut u8, 0, iov.iov_len) };
        }
    }

    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }
}

/// Reusable scratch space so that parsing does not allocate per request.
#[derive(Default)]
pub struct Parser {
    segs: Vec<Seg>,
}

impl Parser {
    /// Parses one chain. Never fails as a whole: a bad request comes back
    /// with `op` set to the error, and with the status byte if it has one.
    pub fn parse(
        &mut self,
        table: DescTable,
        head: u16,
        mem: &Arc<GuestMemoryMmap>,
        limits: &Limits,
        iovecs: Vec<libc::iovec>,
    ) -> Request {
        let mut req = Request {
            head,
            op: Err(RequestError::NoStatus),
            iovecs,
            status: None,
            mem: Arc::clone(mem),
        };
        req.iovecs.clear();
        self.segs.clear();
        let walked = self.walk(mem, table, head, limits.max_descriptors);
        // Locate the status byte first: even a bad request gets its error
        // status written when the chain has a place for it.
        let writable: u64 = self.stream_len(true);
        if writable > 0 {
            match self
                .locate(true, writable - 1)
                .and_then(|a| host_ptr(mem, a, 1))
            {
                Ok(p) => req.status = Some(StatusByte(p)),
                Err(e) => {
                    req.op = Err(e);
                    return req;
                }
            }
        }
        req.op = walked.and_then(|()| {
            if req.status.is_none() {
                return Err(RequestError::NoStatus);
            }
            self.validate(mem, limits, &mut req.iovecs)
        });
        if req.op.is_err() {
            req.iovecs.clear();
        }
        req
    }

    /// Walks the chain from `head`, following NEXT links and at most one
    /// indirect table, and records its pieces in chain order.
    fn walk(
        &mut self,
        mem: &GuestMemoryMmap,
        table: DescTable,
        head: u16,
        max: usize,
    ) -> Result<(), RequestError> {
        let (mut addr, mut size, mut index) = (table.addr, table.size, head);
        let mut indirect = false;
        let mut seen_writable = false;
        loop {
            if index >= size {
                return Err(RequestError::MalformedChain);
            }
            let d = read_desc(mem, addr, index)?;
            if d.flags & VRING_DESC_F_INDIRECT != 0 {
                // One level only, never chained on, whole 16-byte entries.
                if indirect
                    || d.flags & VRING_DESC_F_NEXT != 0
                    || d.len == 0
                    || d.len % DESC_LEN as u32 != 0
                    || d.len / DESC_LEN as u32 > u32::from(u16::MAX)
                {
                    return Err(RequestError::MalformedChain);
                }
                (addr, size, index) = (GuestAddress(d.addr), (d.len / DESC_LEN as u32) as u16, 0);
                indirect = true;
                continue;
            }
            // A loop ends here too: it never stops adding pieces.
            if self.segs.len() >= max {
                return Err(RequestError::TooManyDescriptors(self.segs.len() + 1));
            }
            let writable = d.flags & VRING_DESC_F_WRITE != 0;
            if seen_writable && !writable {
                return Err(RequestError::WrongOrder);
            }
            seen_writable |= writable;
            self.segs.push(Seg {
                addr: GuestAddress(d.addr),
                len: u64::from(d.len),
                writable,
            });
            if d.flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = d.next;
        }
    }

    fn stream_len(&self, writable: bool) -> u64 {
        self.segs
            .iter()
            .filter(|s| s.writable == writable)
            .map(|s| s.len)
            .sum()
    }

    /// Guest address of byte `offset` of the readable or writable stream.
    fn locate(&self, writable: bool, mut offset: u64) -> Result<GuestAddress, RequestError> {
        for s in self.segs.iter().filter(|s| s.writable == writable) {
            if offset < s.len {
                return s
                    .addr
                    .0
                    .checked_add(offset)
                    .map(GuestAddress)
                    .ok_or(RequestError::BadAddress(s.addr.0, offset));
            }
            offset -= s.len;
        }
        Err(RequestError::BadAddress(0, offset))
    }

    /// Calls `f(addr, len)` for each piece of stream bytes [start, start+len).
    fn for_range(
        &self,
        writable: bool,
        start: u64,
        len: u64,
        mut f: impl FnMut(GuestAddress, u64) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let end = start + len;
        let mut pos = 0u64;
        for s in self.segs.iter().filter(|s| s.writable == writable) {
            let (lo, hi) = (pos.max(start), (pos + s.len).min(end));
            if lo < hi {
                let addr = s
                    .addr
                    .0
                    .checked_add(lo - pos)
                    .ok_or(RequestError::BadAddress(s.addr.0, lo - pos))?;
                f(GuestAddress(addr), hi - lo)?;
            }
            pos += s.len;
            if pos >= end {
                break;
            }
        }
        Ok(())
    }

    fn read_stream(
        &self,
        mem: &GuestMemoryMmap,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        self.for_range(false, start, buf.len() as u64, |addr, n| {
            let n = n as usize;
            mem.read_slice(&mut buf[done..done + n], addr)
                .map_err(|_| RequestError::BadAddress(addr.0, n as u64))?;
            done += n;
            Ok(())
        })
    }

    fn push_iovecs(
        &self,
        mem: &GuestMemoryMmap,
        writable: bool,
        start: u64,
        len: u64,
        out: &mut Vec<libc::iovec>,
    ) -> Result<(), RequestError> {
        self.for_range(writable, start, len, |addr, n| {
            let bad = || RequestError::BadAddress(addr.0, n);
            let n = usize::try_from(n).map_err(|_| bad())?;
            let mut covered = 0usize;
            for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
                let slice = slice.map_err(|_| bad())?;
                covered += slice.len();
                out.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
            if covered != n {
                return Err(bad());
            }
            Ok(())
        })
    }

    fn validate(
        &self,
        mem: &GuestMemoryMmap,
        limits: &Limits,
        iovecs: &mut Vec<libc::iovec>,
    ) -> Result<Op, RequestError> {
        let readable = self.stream_len(false);
        if readable < HEADER_LEN {
            return Err(RequestError::ShortHeader(readable));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        self.read_stream(mem, 0, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let out_len = readable - HEADER_LEN;
        let in_len = self.stream_len(true) - 1;
        let writes = |op| {
            if limits.read_only {
                Err(RequestError::ReadOnly)
            } else {
                Ok(op)
            }
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    return Err(RequestError::WrongDirection(kind));
                }
                let offset = check_range(sector, in_len, limits)?;
                self.push_iovecs(mem, true, 0, in_len, iovecs)?;
                Ok(Op::Read {
                    offset,
                    len: in_len,
                })
            }
            VIRTIO_BLK_T_OUT => {
                if in_len != 0 {
                    return Err(RequestError::WrongDirection(kind));
                }
                let offset = check_range(sector, out_len, limits)?;
                let op = writes(Op::Write {
                    offset,
                    len: out_len,
                })?;
                self.push_iovecs(mem, false, HEADER_LEN, out_len, iovecs)?;
                Ok(op)
            }
            VIRTIO_BLK_T_FLUSH => Ok(Op::Flush),
            VIRTIO_BLK_T_GET_ID => {
                let len = in_len.min(u64::from(VIRTIO_BLK_ID_BYTES));
                self.push_iovecs(mem, true, 0, len, iovecs)?;
                Ok(Op::GetId { len })
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if out_len != SEGMENT_LEN {
                    return Err(RequestError::BadSegments(out_len));
                }
                let mut seg = [0u8; SEGMENT_LEN as usize];
                self.read_stream(mem, HEADER_LEN, &mut seg)?;
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                let discard = kind == VIRTIO_BLK_T_DISCARD;
                // Discard takes no flags; write-zeroes takes UNMAP only.
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::UnsupportedFlags(flags));
                }
                let max = if discard {
                    MAX_DISCARD_SECTORS
                } else {
                    MAX_WRITE_ZEROES_SECTORS
                };
                let len = u64::from(sectors) * SECTOR_SIZE;
                if sectors > max {
                    return Err(RequestError::TooLarge(len));
                }
                let offset = check_range(sector, len, limits)?;
                if offset % u64::from(limits.logical_block) != 0 {
                    return Err(RequestError::Misaligned(offset, limits.logical_block));
                }
                writes(if discard {
                    Op::Discard { offset, len }
                } else {
                    Op::WriteZeroes {
                        offset,
                        len,
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    }
                })
            }
            other => Err(RequestError::UnsupportedType(other)),
        }
    }
}

/// Checks that `len` bytes at `sector` lie inside the disk and are whole
/// logical blocks; returns the byte offset.
fn check_range(sector: u64, len: u64, limits: &Limits) -> Result<u64, RequestError> {
    let block = u64::from(limits.logical_block);
    if len % block != 0 {
        return Err(RequestError::Misaligned(len, limits.logical_block));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::OutOfRange(sector, len))?;
    if offset % block != 0 {
        return Err(RequestError::Misaligned(offset, limits.logical_block));
    }
    match offset.checked_add(len) {
        Some(end) if end <= limits.size => Ok(offset),
        _ => Err(RequestError::OutOfRange(sector, len)),
    }
}

fn host_ptr(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> Result<*mut u8, RequestError> {
    let slice = mem
        .get_slice(addr, len)
        .map_err(|_| RequestError::BadAddress(addr.0, len as u64))?;
    Ok(slice.ptr_guard_mut().as_ptr())
}
