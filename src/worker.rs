//! The queue thread: one per virtqueue, each with its own io_uring.
//!
//! Loop: pop descriptor chains, parse them, queue one io_uring operation per
//! request, submit the batch, reap completions, write status bytes, add to
//! the used ring, signal the guest once per batch (honouring EVENT_IDX).
//! While busy it polls the avail ring with notifications off; after `poll`
//! of idleness it turns notifications back on, re-checks the ring (so no kick
//! is lost) and sleeps in io_uring_enter until a completion, a kick (an
//! eventfd read queued on the same ring) or a stop request arrives.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::engine::uring::{Uring, PUNCH_HOLE, ZERO_RANGE};
use crate::storage::{Disk, DiskKind};
use crate::vhost_user::inflight::InflightQueue;
use crate::virtio::request::{DescTable, Limits, Op, Parser, Request};
use crate::virtio::Status;

const KICK: u64 = u64::MAX;
const STOP: u64 = u64::MAX - 1;
const CANCEL: u64 = u64::MAX - 2;
/// Misaligned O_DIRECT requests go through a bounce buffer this big at most,
/// in chunks, so a guest cannot make us allocate without bound.
const BOUNCE_CHUNK: usize = 1 << 20;
const BOUNCE_ALIGN: usize = 4096;
/// Write-zeroes fallback: one writev of iovecs that all point at this buffer.
const ZERO_BUF: usize = 64 << 10;

/// Per-disk state shared by all queue threads.
pub struct DiskContext {
    pub disk: Arc<Disk>,
    /// Guest-visible write cache; when the guest turns it off every write is
    /// made durable before it completes (RWF_DSYNC).
    pub wce: AtomicBool,
    pub serial: [u8; 20],
    pub poll: Duration,
}

impl DiskContext {
    pub fn new(disk: Arc<Disk>, serial: &[u8], poll: Duration) -> DiskContext {
        let mut s = [0u8; 20];
        let n = serial.len().min(s.len());
        s[..n].copy_from_slice(&serial[..n]);
        DiskContext {
            disk,
            wce: AtomicBool::new(true),
            serial: s,
            poll,
        }
    }
}

/// The guest's call eventfd; the frontend may swap it while the queue runs
/// (QEMU does when it masks interrupts).
#[derive(Default)]
pub struct CallFd(Mutex<Option<File>>);

impl CallFd {
    pub fn set(&self, fd: Option<File>) {
        if let Ok(mut g) = self.0.lock() {
            *g = fd;
        }
    }

    fn signal(&self) {
        if let Ok(g) = self.0.lock() {
            if let Some(mut f) = g.as_ref() {
                // A full eventfd counter (EAGAIN) already means "signalled".
                let _ = f.write(&1u64.to_ne_bytes());
            }
        }
    }
}

/// What a queue thread needs from the control plane to start.
pub struct QueueSetup {
    pub index: u16,
    pub queue: Queue,
    pub kick: File,
    pub call: Arc<CallFd>,
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// In-flight tracking, when the frontend gave us a region for it.
    pub inflight: Option<InflightQueue>,
    /// Heads a previous daemon took but did not complete, in fetch order.
    pub resubmit: Vec<u16>,
}

/// A running queue thread.
pub struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<Queue>,
}

impl WorkerHandle {
    pub fn spawn(setup: QueueSetup, ctx: Arc<DiskContext>) -> io::Result<WorkerHandle> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let worker_stop = stop.try_clone()?;
        let name = format!("vublk-q{}", setup.index);
        let thread = thread::Builder::new().name(name).spawn(move || {
            let index = setup.index;
            match Worker::new(setup, ctx, worker_stop) {
                Ok(mut w) => {
                    if let Err(e) = w.run() {
                        log::error!("queue {index}: stopped on error: {e}");
                    }
                    w.queue
                }
                Err((e, queue)) => {
                    log::error!("queue {index}: cannot start: {e}");
                    queue
                }
            }
        })?;
        Ok(WorkerHandle { stop, thread })
    }

    /// Stops the thread after its in-flight requests complete; returns the
    /// queue so the control plane can report the ring position.
    pub fn stop(self) -> Option<Queue> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

enum ZeroStage {
    PunchHole,
    ZeroRange,
    WriteBuffer,
}

/// A request waiting for io_uring.
struct Slot {
    req: Request,
    op: Op,
    /// Bytes of a read or write already transferred (short I/O, bounce chunks).
    done: u64,
    bounce: Option<Bounce>,
    zero: ZeroStage,
}

/// An aligned buffer for O_DIRECT requests whose guest buffers are not.
struct Bounce {
    buf: Vec<u8>,
    start: usize,
    iov: Vec<libc::iovec>,
    /// Length of the chunk in flight.
    chunk: usize,
}

impl Bounce {
    fn new(len: u64) -> Bounce {
        let size = (len as usize).min(BOUNCE_CHUNK);
        let buf = vec![0u8; size + BOUNCE_ALIGN];
        let start = buf.as_ptr().align_offset(BOUNCE_ALIGN);
        Bounce {
            buf,
            start,
            iov: Vec::with_capacity(1),
            chunk: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.buf.len() - BOUNCE_ALIGN
    }

    fn chunk_mut(&mut self, n: usize) -> &mut [u8] {
        &mut self.buf[self.start..self.start + n]
    }

    fn set_chunk(&mut self, n: usize) {
        self.chunk = n;
        let base = self.chunk_mut(n).as_mut_ptr();
        self.iov.clear();
        self.iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: n,
        });
    }
}

/// Logs at most one line a second per queue; counts the rest.
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn log(&mut self, queue: u16, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        let extra = if self.suppressed > 0 {
            format!(" ({} similar messages suppressed)", self.suppressed)
        } else {
            String::new()
        };
        log::warn!("queue {queue}: {}{extra}", msg());
        self.last = Some(now);
        self.suppressed = 0;
    }
}

struct Worker {
    // Declared first so that it is dropped first: the kernel must be done with
    // the eventfd buffers below before they are freed.
    ring: Uring,
    index: u16,
    queue: Queue,
    kick: File,
    call: Arc<CallFd>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ctx: Arc<DiskContext>,
    stop: EventFd,
    limits: Limits,
    table: DescTable,
    inflight: Option<InflightQueue>,
    resubmit: Vec<u16>,
    parser: Parser,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    iovec_pool: Vec<Vec<libc::iovec>>,
    completions: Vec<(u64, i32)>,
    kick_buf: Box<u64>,
    stop_buf: Box<u64>,
    kick_armed: bool,
    zeroes: Vec<u8>,
    stopping: bool,
    used_added: bool,
    notify_enabled: bool,
    bad_requests: RateLimit,
    io_errors: RateLimit,
}

impl Worker {
    fn new(
        setup: QueueSetup,
        ctx: Arc<DiskContext>,
        stop: EventFd,
    ) -> Result<Worker, (io::Error, Queue)> {
        let size = setup.queue.size().max(1) as usize;
        // One entry per request plus the two eventfd reads and a cancel.
        let ring = match Uring::new(size as u32 + 4, ctx.disk.raw_fd()) {
            Ok(r) => r,
            Err(e) => return Err((e, setup.queue)),
        };
        let geometry = *ctx.disk.geometry();
        let zeroes = vec![0u8; ZERO_BUF + BOUNCE_ALIGN];
        let table = DescTable {
            addr: GuestAddress(setup.queue.desc_table()),
            size: setup.queue.size(),
        };
        Ok(Worker {
            ring,
            index: setup.index,
            queue: setup.queue,
            kick: setup.kick,
            call: setup.call,
            mem: setup.mem,
            limits: Limits {
                size: geometry.size,
                logical_block: geometry.logical_block,
                read_only: ctx.disk.read_only(),
                max_descriptors: size,
            },
            table,
            inflight: setup.inflight,
            resubmit: setup.resubmit,
            ctx,
            stop,
            parser: Parser::default(),
            slots: (0..size).map(|_| None).collect(),
            free: (0..size).rev().collect(),
            iovec_pool: Vec::new(),
            completions: Vec::with_capacity(size * 2),
            kick_buf: Box::new(0),
            stop_buf: Box::new(0),
            kick_armed: false,
            zeroes,
            stopping: false,
            used_added: false,
            notify_enabled: true,
            bad_requests: RateLimit {
                last: None,
                suppressed: 0,
            },
            io_errors: RateLimit {
                last: None,
                suppressed: 0,
            },
        })
    }

    fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn arm_kick(&mut self) -> io::Result<()> {
        let buf: *mut u64 = &mut *self.kick_buf;
        // SAFETY: `kick_buf` is a heap box owned by this worker, which cancels
        // the read and waits for it before dropping the box (see `run`).
        unsafe { self.ring.read_eventfd(KICK, self.kick.as_raw_fd(), buf)? };
        self.kick_armed = true;
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        let stop_buf: *mut u64 = &mut *self.stop_buf;
        // SAFETY: as for the kick buffer; the stop read completes before the
        // loop ends (that is how the loop learns to end).
        unsafe {
            self.ring
                .read_eventfd(STOP, self.stop.as_raw_fd(), stop_buf)?
        };
        self.arm_kick()?;
        self.resubmit_recovered();
        let poll = self.ctx.poll;
        let mut last_work = Instant::now();
        loop {
            let mem = self.mem.memory().into_inner();
            let mut progress = false;
            if !self.stopping {
                progress |= self.pop_requests(&mem);
            }
            self.ring.submit()?;
            progress |= self.reap(&mem)?;
            self.signal_guest(&mem);
            if self.stopping && self.inflight() == 0 {
                break;
            }
            if progress {
                last_work = Instant::now();
                if self.notify_enabled {
                    // Busy: the guest need not kick while we poll.
                    let _ = self.queue.disable_notification(&*mem);
                    self.notify_enabled = false;
                }
                continue;
            }
            if !self.stopping && last_work.elapsed() < poll {
                std::hint::spin_loop();
                continue;
            }
            if !self.stopping && !self.notify_enabled {
                self.notify_enabled = true;
                // Re-check after enabling: a request added before the guest
                // saw notifications on would otherwise wait for the next kick.
                match self.queue.enable_notification(&*mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => self
                        .bad_requests
                        .log(self.index, || format!("cannot enable notifications: {e}")),
                }
            }
            self.ring.submit_and_wait()?;
        }
        self.cancel_kick()
    }

    /// Cancels the pending kick read and waits for it, so the kernel no longer
    /// refers to `kick_buf` when the worker is dropped.
    fn cancel_kick(&mut self) -> io::Result<()> {
        if !self.kick_armed {
            return Ok(());
        }
        self.ring.cancel(CANCEL, KICK)?;
        while self.kick_armed {
            self.ring.submit_and_wait()?;
            self.completions.clear();
            self.ring.reap(&mut self.completions);
            if self.completions.iter().any(|&(d, _)| d == KICK) {
                self.kick_armed = false;
            }
        }
        Ok(())
    }

    /// Restarts the requests a crashed daemon left in flight, in the order
    /// it fetched them, before anything new is read from the avail ring.
    fn resubmit_recovered(&mut self) {
        let heads = std::mem::take(&mut self.resubmit);
        if heads.is_empty() {
            return;
        }
        log::info!(
            "queue {}: resubmitting {} in-flight request(s)",
            self.index,
            heads.len()
        );
        let mem = self.mem.memory().into_inner();
        for head in heads {
            if self.free.is_empty() {
                break;
            }
            self.take(head, &mem);
        }
        // A completion signal may have been lost with the old daemon.
        self.call.signal();
    }

    /// Parses and starts the chain at `head`, tracking it as in flight.
    fn take(&mut self, head: u16, mem: &Arc<GuestMemoryMmap>) {
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.mark(head);
        }
        let iovecs = self.iovec_pool.pop().unwrap_or_default();
        let req = self
            .parser
            .parse(self.table, head, mem, &self.limits, iovecs);
        self.start(req, mem);
    }

    fn pop_requests(&mut self, mem: &Arc<GuestMemoryMmap>) -> bool {
        let mut any = false;
        // A slot per request: a guest that re-adds heads still in flight
        // waits until one completes.
        while !self.free.is_empty() {
            let Some(chain) = self.queue.pop_descriptor_chain(&**mem) else {
                break;
            };
            any = true;
            self.take(chain.head_index(), mem);
        }
        any
    }

    fn start(&mut self, req: Request, mem: &GuestMemoryMmap) {
        let op = match req.op {
            Ok(op) => op,
            Err(e) => {
                let head = req.head;
                self.bad_requests
                    .log(self.index, || format!("bad request (head {head}): {e}"));
                return self.complete(req, e.status(), 1, mem);
            }
        };
        // Requests that need no I/O complete here.
        match op {
            Op::GetId { len } => {
                let serial = self.ctx.serial;
                let n = req.copy_to_guest(0, &serial[..len as usize]);
                return self.complete(req, Status::Ok, n as u32 + 1, mem);
            }
            _ if self.ctx.disk.kind() == DiskKind::Null => {
                let used = match op {
                    Op::Read { len, .. } => {
                        req.zero_data();
                        len as u32 + 1
                    }
                    _ => 1,
                };
                return self.complete(req, Status::Ok, used, mem);
            }
            _ => {}
        }
        let Some(idx) = self.free.pop() else {
            // Unreachable: pop_requests only pops with a free slot.
            return self.complete(req, Status::IoErr, 1, mem);
        };
        let mut slot = Slot {
            req,
            op,
            done: 0,
            bounce: None,
            zero: ZeroStage::ZeroRange,
        };
        match op {
            Op::Read { len, .. } | Op::Write { len, .. } if self.needs_bounce(&slot.req) => {
                slot.bounce = Some(Bounce::new(len));
            }
            Op::WriteZeroes { unmap: true, .. } => slot.zero = ZeroStage::PunchHole,
            _ => {}
        }
        self.slots[idx] = Some(slot);
        self.submit_slot(idx, mem);
    }

    /// O_DIRECT needs every buffer aligned; guests usually comply.
    fn needs_bounce(&self, req: &Request) -> bool {
        let align = self.ctx.disk.geometry().mem_align as usize;
        self.ctx.disk.direct()
            && align > 1
            && req
                .iovecs
                .iter()
                .any(|v| (v.iov_base as usize) % align != 0 || v.iov_len % align != 0)
    }

    /// Queues the next io_uring operation of a slot; completes the request
    /// with IOERR if the ring refuses it.
    fn submit_slot(&mut self, idx: usize, mem: &GuestMemoryMmap) {
        if let Err(e) = self.try_submit(idx) {
            self.io_errors
                .log(self.index, || format!("cannot submit I/O: {e}"));
            self.finish(idx, Status::IoErr, mem);
        }
    }

    fn try_submit(&mut self, idx: usize) -> io::Result<()> {
        let dsync = !self.ctx.wce.load(Ordering::Relaxed);
        let data = idx as u64;
        let zero_ptr = {
            let start = self.zeroes.as_ptr().align_offset(BOUNCE_ALIGN);
            self.zeroes[start..].as_mut_ptr()
        };
        let Some(slot) = self.slots[idx].as_mut() else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let ring = &mut self.ring;
        match slot.op {
            Op::Read { offset, len } | Op::Write { offset, len } => {
                let write = matches!(slot.op, Op::Write { .. });
                let pos = offset + slot.done;
                let iov: &[libc::iovec] = match slot.bounce.as_mut() {
                    Some(b) => {
                        let n = ((len - slot.done) as usize).min(b.capacity());
                        if write {
                            let done = slot.done as usize;
                            let chunk = b.chunk_mut(n);
                            slot.req.copy_from_guest(done, chunk);
                        }
                        b.set_chunk(n);
                        &b.iov
                    }
                    None => &slot.req.iovecs,
                };
                // SAFETY: the iovecs live in the slot (guest memory held by
                // the request's mapping, or the slot's bounce buffer), and the
                // slot is not touched until this operation completes.
                unsafe {
                    if write {
                        ring.writev(data, iov, pos, dsync)
                    } else {
                        ring.readv(data, iov, pos)
                    }
                }
            }
            Op::Flush => ring.fdatasync(data),
            Op::Discard { offset, len } => ring.fallocate(data, PUNCH_HOLE, offset, len),
            Op::WriteZeroes { offset, len, .. } => match slot.zero {
                ZeroStage::PunchHole => ring.fallocate(data, PUNCH_HOLE, offset, len),
                ZeroStage::ZeroRange => ring.fallocate(data, ZERO_RANGE, offset, len),
                ZeroStage::WriteBuffer => {
                    let iov = &mut slot.req.iovecs;
                    if slot.done == 0 {
                        iov.clear();
                        let mut left = len as usize;
                        while left > 0 {
                            let n = left.min(ZERO_BUF);
                            iov.push(libc::iovec {
                                iov_base: zero_ptr.cast(),
                                iov_len: n,
                            });
                            left -= n;
                        }
                    }
                    // SAFETY: the iovecs point at `self.zeroes`, which lives
                    // as long as the worker, and are kept in the slot.
                    unsafe { ring.writev(data, iov, offset + slot.done, dsync) }
                }
            },
            Op::GetId { .. } => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn reap(&mut self, mem: &GuestMemoryMmap) -> io::Result<bool> {
        self.completions.clear();
        self.ring.reap(&mut self.completions);
        if self.completions.is_empty() {
            return Ok(false);
        }
        let completions = std::mem::take(&mut self.completions);
        for &(data, res) in &completions {
            match data {
                KICK => {
                    self.kick_armed = false;
                    if res < 0 && res != -libc::ECANCELED {
                        log::error!(
                            "queue {}: kick eventfd read failed: {}",
                            self.index,
                            io::Error::from_raw_os_error(-res)
                        );
                    } else if !self.stopping {
                        self.arm_kick()?;
                    }
                }
                STOP => self.stopping = true,
                CANCEL => {}
                idx => self.on_complete(idx as usize, res, mem),
            }
        }
        self.completions = completions;
        Ok(true)
    }

    fn on_complete(&mut self, idx: usize, res: i32, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        if res < 0 {
            let errno = -res;
            match (&slot.op, &slot.zero) {
                // Discard is a hint: a file system or device without it is fine.
                (Op::Discard { .. }, _) if errno == libc::EOPNOTSUPP => {
                    return self.finish(idx, Status::Ok, mem);
                }
                // Fall back from unmapping to zeroing to writing zeroes.
                (Op::WriteZeroes { .. }, ZeroStage::PunchHole)
                    if errno == libc::EOPNOTSUPP || errno == libc::EINVAL =>
                {
                    slot.zero = ZeroStage::ZeroRange;
                    return self.submit_slot(idx, mem);
                }
                (Op::WriteZeroes { .. }, ZeroStage::ZeroRange)
                    if errno == libc::EOPNOTSUPP || errno == libc::EINVAL =>
                {
                    slot.zero = ZeroStage::WriteBuffer;
                    return self.submit_slot(idx, mem);
                }
                // O_DIRECT refused buffers we thought aligned: bounce them.
                (Op::Read { len, .. } | Op::Write { len, .. }, _)
                    if errno == libc::EINVAL && slot.bounce.is_none() && slot.done == 0 =>
                {
                    slot.bounce = Some(Bounce::new(*len));
                    return self.submit_slot(idx, mem);
                }
                _ => {}
            }
            let (index, op) = (self.index, slot.op);
            self.io_errors.log(index, || {
                format!("{op:?} failed: {}", io::Error::from_raw_os_error(errno))
            });
            return self.finish(idx, Status::IoErr, mem);
        }
        let n = res as u64;
        let total = match (slot.op, &slot.zero) {
            (Op::Read { len, .. } | Op::Write { len, .. }, _) => len,
            (Op::WriteZeroes { len, .. }, ZeroStage::WriteBuffer) => len,
            _ => return self.finish(idx, Status::Ok, mem),
        };
        if let (Op::Read { .. }, Some(b)) = (slot.op, slot.bounce.as_mut()) {
            let chunk = b.chunk.min(n as usize);
            let done = slot.done as usize;
            let data = &b.buf[b.start..b.start + chunk];
            slot.req.copy_to_guest(done, data);
        }
        slot.done += n;
        if slot.done >= total {
            return self.finish(idx, Status::Ok, mem);
        }
        if n == 0 {
            let op = slot.op;
            self.io_errors
                .log(self.index, || format!("{op:?}: no progress (end of file?)"));
            return self.finish(idx, Status::IoErr, mem);
        }
        // Short transfer: continue where it stopped.
        if slot.bounce.is_none() {
            advance(&mut slot.req.iovecs, n as usize);
        }
        self.submit_slot(idx, mem);
    }

    fn finish(&mut self, idx: usize, status: Status, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
            return;
        };
        self.free.push(idx);
        let used = match (slot.op, status) {
            (Op::Read { len, .. }, Status::Ok) => len as u32 + 1,
            _ => 1,
        };
        self.complete(slot.req, status, used, mem);
    }

    fn complete(&mut self, mut req: Request, status: Status, used: u32, mem: &GuestMemoryMmap) {
        let used = if req.set_status(status) { used } else { 0 };
        let head = req.head;
        if let Some(inflight) = &self.inflight {
            inflight.pre_complete(head);
        }
        if let Err(e) = self.queue.add_used(mem, head, used) {
            self.bad_requests.log(self.index, || {
                format!("cannot add head {head} to the used ring: {e}")
            });
        }
        if let Some(inflight) = &self.inflight {
            inflight.complete(head, self.queue.next_used());
        }
        self.used_added = true;
        let mut iovecs = std::mem::take(&mut req.iovecs);
        iovecs.clear();
        self.iovec_pool.push(iovecs);
    }

    fn signal_guest(&mut self, mem: &GuestMemoryMmap) {
        if !self.used_added {
            return;
        }
        self.used_added = false;
        // On error (a used ring outside memory) signalling is the safe choice.
        if self.queue.needs_notification(mem).unwrap_or(true) {
            self.call.signal();
        }
    }
}

/// Drops the first `n` bytes from an iovec list (after a short transfer).
fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for v in iovecs.iter_mut() {
        if n < v.iov_len {
            v.iov_base = (v.iov_base as *mut u8).wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        drop += 1;
    }
    iovecs.drain(..drop);
}
