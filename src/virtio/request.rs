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
    /// Keeps the mapping the pointers above point into alive.
    _mem: Arc<GuestMemoryMmap>,
}

impl Request {
    /// Writes the status byte; returns false when the chain had none (the
    /// request is completed with a used length of 0 then).
    pub fn set_status(&self, status: Status) -> bool {
        match &self.status {
            Some(StatusByte(p)) => {
                // SAFETY: `p` was produced by translating a guest address
                // through `self._mem` with a length of 1, and `self._mem` keeps
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
            // guest memory kept mapped by `self._mem`; `at + n <= data.len()`.
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
            // memory held alive by `self._mem`.
            unsafe { std::ptr::write_bytes(iov.iov_base as *mut u8, 0, iov.iov_len) };
        }
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
            _mem: Arc::clone(mem),
        };
        req.iovecs.clear();
        self.segs.clear();
        let walked = self.walk(mem, table, head, limits.max_descriptors);
        // A chain that could not be walked to its end (a loop, a bad link,
        // a readable piece after writable ones) has no known status byte:
        // the last writable byte seen so far may be the guest's data.
        if let Err(e) = walked {
            req.op = Err(e);
            return req;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const QSIZE: u16 = 16;
    const MEM: usize = 1 << 20;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x8_0000;
    const INDIRECT_TABLE: u64 = 0x9_0000;
    /// Past the end of guest memory.
    const OUTSIDE: u64 = 0x4000_0000;
    const DISK: u64 = 1 << 30;

    struct Env {
        mem: Arc<GuestMemoryMmap>,
        limits: Limits,
        parser: Parser,
    }

    impl Env {
        fn new() -> Env {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            Env {
                mem: Arc::new(mem),
                limits: Limits {
                    size: DISK,
                    logical_block: 512,
                    read_only: false,
                    max_descriptors: usize::from(QSIZE),
                },
                parser: Parser::default(),
            }
        }

        fn read_only() -> Env {
            let mut e = Env::new();
            e.limits.read_only = true;
            e
        }

        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        }

        /// A discard/write-zeroes segment right after the header.
        fn segment(&self, sector: u64, sectors: u32, flags: u32) {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&sectors.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            self.mem.write_slice(&s, GuestAddress(HDR + 16)).unwrap();
        }

        /// Stores raw descriptors (addr, len, flags, next) at table index 0..
        fn table(&self, descs: &[(u64, u32, u16, u16)]) {
            let q = MockSplitQueue::new(&*self.mem, QSIZE);
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                let d = SplitDescriptor::new(addr, len, flags, next);
                q.desc_table()
                    .store(i as u16, RawDescriptor::from(d))
                    .unwrap();
            }
        }

        /// Writes descriptors (addr, len, flags) linked 0 -> 1 -> ... at the
        /// start of an indirect table at `at`.
        fn write_linked(&self, at: u64, descs: &[(u64, u32, u16)]) {
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let last = i + 1 == descs.len();
                let flags = if last { flags } else { flags | NEXT };
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&addr.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&flags.to_le_bytes());
                b[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
                let a = GuestAddress(at + 16 * i as u64);
                self.mem.write_slice(&b, a).unwrap();
            }
        }

        /// Parses a chain of (addr, len, flags) linked in order from head 0.
        fn chain(&mut self, descs: &[(u64, u32, u16)]) -> Request {
            let linked: Vec<_> = descs
                .iter()
                .enumerate()
                .map(|(i, &(a, l, f))| {
                    let last = i + 1 == descs.len();
                    (a, l, if last { f } else { f | NEXT }, i as u16 + 1)
                })
                .collect();
            self.table(&linked);
            self.parse()
        }

        fn parse(&mut self) -> Request {
            let table = DescTable {
                addr: GuestAddress(0),
                size: QSIZE,
            };
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            self.parser
                .parse(table, 0, &self.mem, &self.limits, Vec::new())
        }

        fn status_byte(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn host(&self, gpa: u64) -> usize {
            self.mem.get_host_address(GuestAddress(gpa)).unwrap() as usize
        }

        /// Checks that the request failed with `err` and that completing it
        /// writes the matching status byte at STATUS.
        fn expect_err(&self, req: &Request, err: RequestError, status: Status) {
            assert_eq!(req.op, Err(err));
            assert_eq!(err.status(), status);
            assert!(req.iovecs.is_empty(), "a bad request has no data buffers");
            assert!(req.set_status(err.status()), "status byte located");
            assert_eq!(self.status_byte(), status as u8);
        }
    }

    fn iov_total(req: &Request) -> usize {
        req.iovecs.iter().map(|v| v.iov_len).sum()
    }

    fn io(e: &Env, req: &Request, err: RequestError) {
        e.expect_err(req, err, Status::IoErr);
    }

    /// A chain that cannot be walked to its end has no known status byte:
    /// nothing may be written, not even into a writable piece seen so far.
    fn unwalkable(e: &Env, req: &Request, err: RequestError) {
        assert_eq!(req.op, Err(err));
        assert_eq!(err.status(), Status::IoErr);
        assert!(req.iovecs.is_empty());
        assert!(!req.set_status(err.status()), "{err}: status located");
        assert_eq!(e.status_byte(), 0xff);
    }

    #[test]
    fn read_is_parsed_into_guest_iovecs() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_IN, 8);
        let req = e.chain(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
        assert_eq!(
            req.op,
            Ok(Op::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(req.iovecs.len(), 1);
        assert_eq!(req.iovecs[0].iov_base as usize, e.host(DATA));
        assert_eq!(req.iovecs[0].iov_len, 4096);
        assert!(req.set_status(Status::Ok));
        assert_eq!(e.status_byte(), VIRTIO_BLK_S_OK as u8);
        // The request's copy helpers go to the right guest bytes.
        assert_eq!(req.copy_to_guest(100, &[7u8; 10]), 10);
        let mut back = [0u8; 12];
        e.mem
            .read_slice(&mut back, GuestAddress(DATA + 99))
            .unwrap();
        assert_eq!(back, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
        let mut out = [0u8; 3];
        assert_eq!(req.copy_from_guest(108, &mut out), 3);
        assert_eq!(out, [7, 7, 0]);
    }

    #[test]
    fn write_flush_and_get_id_are_parsed() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_OUT, 2);
        let req = e.chain(&[
            (HDR, 16, R),
            (DATA, 512, R),
            (DATA + 4096, 1024, R),
            (STATUS, 1, W),
        ]);
        assert_eq!(
            req.op,
            Ok(Op::Write {
                offset: 1024,
                len: 1536
            })
        );
        assert_eq!(req.iovecs.len(), 2);
        assert_eq!(req.iovecs[1].iov_base as usize, e.host(DATA + 4096));
        assert_eq!(iov_total(&req), 1536);

        e.header(VIRTIO_BLK_T_FLUSH, 0);
        let req = e.chain(&[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(req.op, Ok(Op::Flush));

        e.header(VIRTIO_BLK_T_GET_ID, 0);
        let req = e.chain(&[(HDR, 16, R), (DATA, 64, W), (STATUS, 1, W)]);
        assert_eq!(req.op, Ok(Op::GetId { len: 20 }), "capped at 20 bytes");
        assert_eq!(iov_total(&req), 20);
        let req = e.chain(&[(HDR, 16, R), (DATA, 8, W), (STATUS, 1, W)]);
        assert_eq!(req.op, Ok(Op::GetId { len: 8 }), "short buffer");
        assert_eq!(iov_total(&req), 8);
    }

    #[test]
    fn discard_and_write_zeroes_are_parsed() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_DISCARD, 0);
        e.segment(16, 8, 0);
        let req = e.chain(&[(HDR, 32, R), (STATUS, 1, W)]);
        assert_eq!(
            req.op,
            Ok(Op::Discard {
                offset: 8192,
                len: 4096
            })
        );
        assert!(req.iovecs.is_empty());

        e.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        e.segment(1, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let req = e.chain(&[(HDR, 16, R), (HDR + 16, 16, R), (STATUS, 1, W)]);
        assert_eq!(
            req.op,
            Ok(Op::WriteZeroes {
                offset: 512,
                len: 1536,
                unmap: true
            })
        );
        e.segment(1, 3, 0);
        let req = e.chain(&[(HDR, 32, R), (STATUS, 1, W)]);
        assert_eq!(
            req.op,
            Ok(Op::WriteZeroes {
                offset: 512,
                len: 1536,
                unmap: false
            })
        );
    }

    #[test]
    fn any_framing_works() {
        let mut e = Env::new();
        // Header split over two descriptors; data and status in one.
        e.header(VIRTIO_BLK_T_IN, 1);
        let req = e.chain(&[(HDR, 8, R), (HDR + 8, 8, R), (STATUS - 512, 513, W)]);
        assert_eq!(
            req.op,
            Ok(Op::Read {
                offset: 512,
                len: 512
            })
        );
        assert_eq!(req.iovecs.len(), 1);
        assert_eq!(req.iovecs[0].iov_base as usize, e.host(STATUS - 512));
        assert_eq!(req.iovecs[0].iov_len, 512);
        assert!(req.set_status(Status::Ok));
        assert_eq!(e.status_byte(), 0);

        // Header and write data in one descriptor, status on its own; and
        // the status byte split off the tail of a data descriptor.
        let data_at = HDR;
        e.header(VIRTIO_BLK_T_OUT, 4);
        let req = e.chain(&[(data_at, 16 + 1024, R), (STATUS, 1, W)]);
        assert_eq!(
            req.op,
            Ok(Op::Write {
                offset: 2048,
                len: 1024
            })
        );
        assert_eq!(req.iovecs[0].iov_base as usize, e.host(HDR + 16));

        // An indirect table holding the whole request.
        e.header(VIRTIO_BLK_T_IN, 0);
        e.write_linked(
            INDIRECT_TABLE,
            &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)],
        );
        e.table(&[(INDIRECT_TABLE, 48, INDIRECT, 0)]);
        let req = e.parse();
        assert_eq!(
            req.op,
            Ok(Op::Read {
                offset: 0,
                len: 1024
            })
        );
        assert!(req.set_status(Status::Ok));
        assert_eq!(e.status_byte(), 0);
    }

    #[test]
    fn malformed_chains() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_IN, 0);
        // next index out of range of the queue.
        e.table(&[(HDR, 16, R | NEXT, QSIZE), (STATUS, 1, W, 0)]);
        let req = e.parse();
        assert_eq!(req.op, Err(RequestError::MalformedChain));
        assert!(!req.set_status(Status::IoErr), "no status seen yet");

        // Out-of-range next after a writable descriptor: still no status.
        e.table(&[(HDR, 16, R | NEXT, 1), (STATUS, 1, W | NEXT, 500)]);
        let req = e.parse();
        unwalkable(&e, &req, RequestError::MalformedChain);

        let status = (STATUS, 1, W, 0);
        // Nested indirect table.
        e.write_linked(INDIRECT_TABLE, &[(INDIRECT_TABLE + 256, 32, INDIRECT)]);
        e.table(&[(HDR, 16, R | NEXT, 1), (INDIRECT_TABLE, 16, INDIRECT, 0)]);
        assert_eq!(e.parse().op, Err(RequestError::MalformedChain));
        // Indirect descriptor that also says NEXT.
        e.write_linked(INDIRECT_TABLE, &[(STATUS, 1, W)]);
        e.table(&[(INDIRECT_TABLE, 16, INDIRECT | NEXT, 1), status]);
        assert_eq!(e.parse().op, Err(RequestError::MalformedChain));
        // Indirect table of length 0, and not a multiple of 16.
        for len in [0, 24] {
            e.table(&[(INDIRECT_TABLE, len, INDIRECT, 0)]);
            assert_eq!(e.parse().op, Err(RequestError::MalformedChain), "{len}");
        }
        // Indirect table whose own next index runs off its end.
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&STATUS.to_le_bytes());
        raw[8..12].copy_from_slice(&1u32.to_le_bytes());
        raw[12..14].copy_from_slice(&(W | NEXT).to_le_bytes());
        raw[14..16].copy_from_slice(&5u16.to_le_bytes());
        e.mem
            .write_slice(&raw, GuestAddress(INDIRECT_TABLE))
            .unwrap();
        e.table(&[(INDIRECT_TABLE, 32, INDIRECT, 0)]);
        let req = e.parse();
        unwalkable(&e, &req, RequestError::MalformedChain);
    }

    #[test]
    fn loops_and_long_chains_are_too_many_descriptors() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ... never ends.
        e.table(&[(HDR, 16, R | NEXT, 1), (STATUS, 1, W | NEXT, 1)]);
        let req = e.parse();
        let n = usize::from(QSIZE) + 1;
        unwalkable(&e, &req, RequestError::TooManyDescriptors(n));
        e.table(&[(STATUS, 1, W | NEXT, 0)]);
        let req = e.parse();
        unwalkable(&e, &req, RequestError::TooManyDescriptors(n));

        // An indirect table with more entries than the queue holds.
        let mut descs = vec![(HDR, 16, R)];
        descs.extend((0..QSIZE).map(|_| (STATUS, 1, W)));
        e.write_linked(INDIRECT_TABLE, &descs);
        e.table(&[(INDIRECT_TABLE, 16 * descs.len() as u32, INDIRECT, 0)]);
        let req = e.parse();
        unwalkable(&e, &req, RequestError::TooManyDescriptors(n));
        // Cut short after data descriptors: their last byte is guest data,
        // not a status byte, and stays untouched.
        let mut descs = vec![(HDR, 16, R)];
        descs.extend((0..QSIZE).map(|i| (DATA + 512 * u64::from(i), 512, W)));
        descs.push((STATUS, 1, W));
        e.write_linked(INDIRECT_TABLE, &descs);
        e.table(&[(INDIRECT_TABLE, 16 * descs.len() as u32, INDIRECT, 0)]);
        let last = GuestAddress(DATA + 512 * u64::from(QSIZE) - 1);
        e.mem.write_obj(0xccu8, last).unwrap();
        let req = e.parse();
        unwalkable(&e, &req, RequestError::TooManyDescriptors(n));
        assert_eq!(e.mem.read_obj::<u8>(last).unwrap(), 0xcc);
        // Exactly the queue size is fine.
        let mut descs = vec![(HDR, 16, R)];
        descs.extend((2..QSIZE).map(|i| (DATA + 512 * u64::from(i), 512, W)));
        descs.push((STATUS, 1, W));
        e.write_linked(INDIRECT_TABLE, &descs);
        e.table(&[(INDIRECT_TABLE, 16 * descs.len() as u32, INDIRECT, 0)]);
        let req = e.parse();
        let len = 512 * u64::from(QSIZE - 2);
        assert_eq!(req.op, Ok(Op::Read { offset: 0, len }));
        assert_eq!(req.iovecs.len(), usize::from(QSIZE - 2));
    }

    #[test]
    fn wrong_order_and_direction() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_OUT, 0);
        // Status (writable) before the data (readable).
        let req = e.chain(&[(HDR, 16, R), (STATUS, 1, W), (DATA, 512, R)]);
        unwalkable(&e, &req, RequestError::WrongOrder);
        // Read with device-readable data.
        e.header(VIRTIO_BLK_T_IN, 0);
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        io(&e, &req, RequestError::WrongDirection(VIRTIO_BLK_T_IN));
        // Write with device-writable data.
        e.header(VIRTIO_BLK_T_OUT, 0);
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::WrongDirection(VIRTIO_BLK_T_OUT));
    }

    #[test]
    fn addresses_outside_guest_memory() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_IN, 0);
        let req = e.chain(&[(HDR, 16, R), (OUTSIDE, 512, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::BadAddress(OUTSIDE, 512));
        // Data running off the end of memory.
        let at = MEM as u64 - 256;
        let req = e.chain(&[(HDR, 16, R), (at, 512, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::BadAddress(at, 512));
        e.header(VIRTIO_BLK_T_OUT, 0);
        let req = e.chain(&[(HDR, 16, R), (OUTSIDE, 512, R), (STATUS, 1, W)]);
        io(&e, &req, RequestError::BadAddress(OUTSIDE, 512));
        // Header outside memory.
        let req = e.chain(&[(OUTSIDE, 16, R), (STATUS, 1, W)]);
        io(&e, &req, RequestError::BadAddress(OUTSIDE, 16));
        // Address + offset overflowing u64.
        let req = e.chain(&[(u64::MAX - 4, 16, R), (STATUS, 1, W)]);
        assert!(matches!(req.op, Err(RequestError::BadAddress(..))));
        assert!(req.iovecs.is_empty());
        // Status outside memory: nowhere to report, used length 0.
        e.header(VIRTIO_BLK_T_FLUSH, 0);
        let req = e.chain(&[(HDR, 16, R), (OUTSIDE, 1, W)]);
        assert_eq!(req.op, Err(RequestError::BadAddress(OUTSIDE, 1)));
        assert!(!req.set_status(Status::IoErr));
        // Indirect table outside memory.
        e.table(&[(OUTSIDE, 48, INDIRECT, 0)]);
        let req = e.parse();
        assert_eq!(req.op, Err(RequestError::BadAddress(OUTSIDE, 16)));
        assert!(!req.set_status(Status::IoErr));
        // The descriptor table itself outside memory.
        let table = DescTable {
            addr: GuestAddress(OUTSIDE),
            size: QSIZE,
        };
        let req = e.parser.parse(table, 3, &e.mem, &e.limits, Vec::new());
        assert_eq!(req.head, 3);
        assert_eq!(req.op, Err(RequestError::BadAddress(OUTSIDE + 48, 16)));
    }

    #[test]
    fn short_header_and_missing_status() {
        let mut e = Env::new();
        e.header(VIRTIO_BLK_T_IN, 0);
        let req = e.chain(&[(HDR, 15, R), (STATUS, 1, W)]);
        io(&e, &req, RequestError::ShortHeader(15));
        let req = e.chain(&[(STATUS, 1, W)]);
        io(&e, &req, RequestError::ShortHeader(0));
        // No writable descriptor at all.
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, R)]);
        assert_eq!(req.op, Err(RequestError::NoStatus));
        assert!(!req.set_status(Status::IoErr));
        assert_eq!(e.status_byte(), 0xff, "nothing written");
        // A zero-length status descriptor alone is no status either.
        let req = e.chain(&[(HDR, 16, R), (STATUS, 0, W)]);
        assert_eq!(req.op, Err(RequestError::NoStatus));
        assert!(!req.set_status(Status::IoErr));
        // After data, the status is the last writable byte: the data is then
        // one byte short of a whole sector.
        let req = e.chain(&[(HDR, 16, R), (STATUS - 511, 512, W), (DATA, 0, W)]);
        io(&e, &req, RequestError::Misaligned(511, 512));
    }

    #[test]
    fn ranges_lengths_and_alignment() {
        let mut e = Env::new();
        let last = DISK / 512;
        e.header(VIRTIO_BLK_T_IN, last);
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::OutOfRange(last, 512));
        e.header(VIRTIO_BLK_T_IN, last - 1);
        let req = e.chain(&[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::OutOfRange(last - 1, 1024));
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert!(req.op.is_ok(), "the last sector itself is fine");
        // sector * 512 overflows.
        e.header(VIRTIO_BLK_T_OUT, u64::MAX / 256);
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        io(&e, &req, RequestError::OutOfRange(u64::MAX / 256, 512));
        // Length not a multiple of 512.
        e.header(VIRTIO_BLK_T_IN, 0);
        let req = e.chain(&[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::Misaligned(100, 512));
        // Huge: 2 GiB in one descriptor (never touched: refused first).
        let req = e.chain(&[(HDR, 16, R), (DATA, 1 << 31, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::TooLarge(1 << 31));

        // 4 KiB logical blocks: sector and length must be whole blocks.
        e.limits.logical_block = 4096;
        e.header(VIRTIO_BLK_T_IN, 1);
        let req = e.chain(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::Misaligned(512, 4096));
        e.header(VIRTIO_BLK_T_IN, 8);
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        io(&e, &req, RequestError::Misaligned(512, 4096));
        e.header(VIRTIO_BLK_T_DISCARD, 0);
        e.segment(1, 8, 0);
        let req = e.chain(&[(HDR, 32, R), (STATUS, 1, W)]);
        io(&e, &req, RequestError::Misaligned(512, 4096));
        e.segment(8, 8, 0);
        let req = e.chain(&[(HDR, 32, R), (STATUS, 1, W)]);
        assert_eq!(
            req.op,
            Ok(Op::Discard {
                offset: 4096,
                len: 4096
            })
        );
    }

    #[test]
    fn discard_and_write_zeroes_errors() {
        let mut e = Env::new();
        let status = (STATUS, 1, W);
        e.header(VIRTIO_BLK_T_DISCARD, 0);
        e.segment(0, 8, 0);
        // Two segments, half a segment, none.
        for len in [48u32, 24, 16] {
            let req = e.chain(&[(HDR, len, R), status]);
            io(&e, &req, RequestError::BadSegments(u64::from(len) - 16));
        }
        // Discard takes no flags at all, UNMAP included.
        for flags in [VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, 2, 0x8000_0000] {
            e.segment(0, 8, flags);
            let req = e.chain(&[(HDR, 32, R), status]);
            e.expect_err(&req, RequestError::UnsupportedFlags(flags), Status::Unsupp);
        }
        // Write-zeroes takes UNMAP only.
        e.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        e.segment(0, 8, 2 | VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let req = e.chain(&[(HDR, 32, R), status]);
        e.expect_err(&req, RequestError::UnsupportedFlags(3), Status::Unsupp);
        // Too many sectors, and past the end.
        e.segment(0, MAX_WRITE_ZEROES_SECTORS + 1, 0);
        let req = e.chain(&[(HDR, 32, R), status]);
        let len = u64::from(MAX_WRITE_ZEROES_SECTORS + 1) * 512;
        io(&e, &req, RequestError::TooLarge(len));
        e.header(VIRTIO_BLK_T_DISCARD, 0);
        e.segment(0, MAX_DISCARD_SECTORS + 1, 0);
        let req = e.chain(&[(HDR, 32, R), status]);
        let len = u64::from(MAX_DISCARD_SECTORS + 1) * 512;
        io(&e, &req, RequestError::TooLarge(len));
        e.segment(DISK / 512 - 4, 8, 0);
        let req = e.chain(&[(HDR, 32, R), status]);
        io(&e, &req, RequestError::OutOfRange(DISK / 512 - 4, 4096));
    }

    #[test]
    fn read_only_disk_refuses_writes_only() {
        let mut e = Env::read_only();
        let status = (STATUS, 1, W);
        e.header(VIRTIO_BLK_T_OUT, 0);
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, R), status]);
        io(&e, &req, RequestError::ReadOnly);
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            e.header(kind, 0);
            e.segment(0, 8, 0);
            let req = e.chain(&[(HDR, 32, R), status]);
            io(&e, &req, RequestError::ReadOnly);
        }
        e.header(VIRTIO_BLK_T_IN, 0);
        let req = e.chain(&[(HDR, 16, R), (DATA, 512, W), status]);
        assert_eq!(
            req.op,
            Ok(Op::Read {
                offset: 0,
                len: 512
            })
        );
        e.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(e.chain(&[(HDR, 16, R), status]).op, Ok(Op::Flush));
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let mut e = Env::new();
        for kind in [99, 5, 10, VIRTIO_BLK_T_SECURE_ERASE, u32::MAX] {
            e.header(kind, 0);
            let req = e.chain(&[(HDR, 16, R), (STATUS, 1, W)]);
            e.expect_err(&req, RequestError::UnsupportedType(kind), Status::Unsupp);
        }
    }

    #[test]
    fn every_error_maps_to_its_status() {
        use RequestError::*;
        let cases = [
            (MalformedChain, Status::IoErr),
            (WrongOrder, Status::IoErr),
            (TooManyDescriptors(3), Status::IoErr),
            (BadAddress(1, 2), Status::IoErr),
            (ShortHeader(3), Status::IoErr),
            (NoStatus, Status::IoErr),
            (WrongDirection(0), Status::IoErr),
            (Misaligned(1, 512), Status::IoErr),
            (OutOfRange(1, 2), Status::IoErr),
            (TooLarge(1), Status::IoErr),
            (ReadOnly, Status::IoErr),
            (BadSegments(0), Status::IoErr),
            (UnsupportedFlags(1), Status::Unsupp),
            (UnsupportedType(9), Status::Unsupp),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err}");
            assert!(!err.to_string().is_empty());
        }
        assert_eq!(Status::Ok as u8, 0);
        assert_eq!(Status::IoErr as u8, 1);
        assert_eq!(Status::Unsupp as u8, 2);
    }
}
