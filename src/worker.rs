//! The queue thread: one per virtqueue, each with its own io_uring.
//!
//! Loop: pop descriptor chains, parse them, queue one io_uring operation per
//! request, submit the batch, reap completions, write status bytes, add to
//! the used ring, signal the guest once per batch (honouring EVENT_IDX).
//! While busy it polls the avail ring with notifications off; after `poll`
//! of idleness it turns notifications back on, re-checks the ring (so no kick
//! is lost) and sleeps in io_uring_enter until a completion, a kick (an
//! eventfd read queued on the same ring), a timer or a stop request arrives.
//!
//! Between parsing and submission a request may wait without spinning:
//! for QoS tokens (until its reserved start time) or behind a request that
//! storage failed and that is being retried (I/O suspension), so that a
//! retry never reorders writes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
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

use crate::config::Config;
use crate::engine::uring::{Uring, PUNCH_HOLE, ZERO_RANGE};
use crate::qos::{Dir, Qos};
use crate::stats::{DiskStats, QueueStats};
use crate::storage::fault::{self, FaultInjector};
use crate::storage::{Disk, DiskKind};
use crate::suspend::{AlarmInfo, Suspension, Verdict};
use crate::vhost_user::inflight::InflightQueue;
use crate::virtio::request::{DescTable, Limits, Op, Parser, Request};
use crate::virtio::Status;

const KICK: u64 = u64::MAX;
/// While idle, the queue loop reads the clock once in this many passes.
const CLOCK_EVERY: u32 = 16;
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
    pub stats: Arc<DiskStats>,
    pub qos: Qos,
    pub suspension: Suspension,
    pub faults: Arc<FaultInjector>,
}

impl DiskContext {
    pub fn new(disk: Arc<Disk>, config: &Config) -> DiskContext {
        let mut serial = [0u8; 20];
        let n = config.serial.len().min(serial.len());
        serial[..n].copy_from_slice(&config.serial[..n]);
        let stats = Arc::new(DiskStats::new(config.num_queues));
        let name = disk.path().display().to_string();
        let faults = Arc::new(FaultInjector::default());
        if let Some(path) = &config.fault_file {
            faults.watch(path.clone());
        }
        DiskContext {
            disk,
            wce: AtomicBool::new(true),
            serial,
            poll: config.poll,
            qos: Qos::new(config.qos),
            suspension: Suspension::new(name, config.suspend.clone(), Arc::clone(&stats)),
            stats,
            faults,
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

/// Loop state that lives across passes.
struct Pace {
    last_work: Instant,
    was_stopping: bool,
    idle_passes: u32,
}

/// What the loop does after a pass.
enum Next {
    Again,
    Sleep,
    Exit,
}

/// What a queue thread needs from the control plane to start.
pub struct QueueSetup {
    pub index: u16,
    /// The configured largest queue size: seg_max is this minus 2.
    pub max_queue_size: u16,
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
            // Narrow the inherited listener filter to the queue workers' list.
            crate::ops::seccomp::enter_worker();
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

/// Where a request with a slot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// Waiting for its QoS start time.
    Throttled,
    /// Waiting behind a failing request of the same queue.
    Held,
    /// Submitted to io_uring.
    InFlight,
    /// Failed; waiting to be retried.
    RetryWait,
}

/// A request storage failed and that is being retried.
struct Failure {
    since: Instant,
    errno: i32,
    alarmed: bool,
}

/// A request between parsing and completion.
struct Slot {
    req: Request,
    op: Op,
    state: SlotState,
    arrived: Instant,
    /// Bytes of a read or write already transferred (short I/O, bounce chunks).
    done: u64,
    bounce: Option<Bounce>,
    zero: ZeroStage,
    failure: Option<Failure>,
}

impl Slot {
    fn sector(&self) -> u64 {
        match self.op {
            Op::Read { offset, .. }
            | Op::Write { offset, .. }
            | Op::Discard { offset, .. }
            | Op::WriteZeroes { offset, .. } => offset / 512,
            Op::Flush | Op::GetId { .. } => 0,
        }
    }

    /// The fault-injection class of the operation.
    fn fault_class(&self) -> u8 {
        match self.op {
            Op::Read { .. } => fault::READ,
            Op::Write { .. } => fault::WRITE,
            Op::Flush => fault::FLUSH,
            _ => fault::OTHER,
        }
    }
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
    /// The memory table last loaded from `mem`; replaced only when the
    /// frontend changes it, so an idle pass does not touch the shared
    /// reference count.
    mem_cache: Option<Arc<GuestMemoryMmap>>,
    ctx: Arc<DiskContext>,
    stop: EventFd,
    limits: Limits,
    table: DescTable,
    stats: Arc<QueueStats>,
    /// Time at the top of the current loop iteration (refreshed before use
    /// when `now_stale`, see `fresh_now`).
    now: Instant,
    now_stale: bool,
    /// Throttled and retrying requests, by the time they may go.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Requests waiting behind failing ones, in arrival order.
    held: VecDeque<usize>,
    /// Requests failing now; while non-zero new requests are held.
    failing: usize,
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
            mem_cache: None,
            mem: setup.mem,
            limits: Limits {
                size: geometry.size,
                logical_block: geometry.logical_block,
                read_only: ctx.disk.read_only(),
                // Indirect tables may hold seg_max + 2 descriptors, which
                // follows the largest queue we allow, not the one in use
                // (QEMU defaults to 128 while we advertise seg_max 254).
                max_descriptors: size.max(usize::from(setup.max_queue_size)),
            },
            table,
            stats: ctx.stats.queue(setup.index),
            now: Instant::now(),
            now_stale: false,
            timers: BinaryHeap::new(),
            held: VecDeque::new(),
            failing: 0,
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
            // What the ring says about notifications was written by whoever
            // ran the queue before (a daemon that was restarted while busy
            // leaves them suppressed): treat them as off, so the first idle
            // pass turns them on and re-checks the ring.
            notify_enabled: false,
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
        let mut pace = Pace {
            last_work: Instant::now(),
            was_stopping: false,
            idle_passes: 0,
        };
        loop {
            // Reading the clock costs as much as the rest of an idle pass:
            // while spinning with nothing to do, read it every few passes
            // only; requests and completions read it before they use it.
            if pace.idle_passes % CLOCK_EVERY == 0 || !self.timers.is_empty() {
                self.now = Instant::now();
                self.now_stale = false;
            } else {
                self.now_stale = true;
            }
            let mem = self.take_memory();
            let next = self.pass(&mem, &mut pace);
            self.mem_cache = Some(mem);
            match next? {
                Next::Again => continue,
                Next::Exit => break,
                Next::Sleep => {
                    // Until a completion, a kick, a stop or the next timer.
                    let timeout = self
                        .timers
                        .peek()
                        .map(|Reverse((t, _))| t.saturating_duration_since(Instant::now()));
                    self.ring.submit_and_wait(timeout)?;
                }
            }
        }
        self.cancel_kick()
    }

    /// One pass of the loop: timers, new requests, submission, completions,
    /// guest signal; then decides whether to poll again or sleep.
    fn pass(&mut self, mem: &Arc<GuestMemoryMmap>, pace: &mut Pace) -> io::Result<Next> {
        let mut progress = self.fire_timers(mem);
        if !self.stopping {
            progress |= self.pop_requests(mem);
        }
        self.ring.submit()?;
        progress |= self.reap(mem)?;
        if self.stopping && !pace.was_stopping {
            pace.was_stopping = true;
            self.abandon_waiting(mem);
        }
        self.signal_guest(mem);
        if self.stopping && self.inflight() == 0 {
            return Ok(Next::Exit);
        }
        if progress {
            pace.idle_passes = 0;
            pace.last_work = self.now;
            if self.notify_enabled {
                // Busy: the guest need not kick while we poll.
                let _ = self.queue.disable_notification(&**mem);
                self.notify_enabled = false;
            }
            return Ok(Next::Again);
        }
        if !self.stopping && self.now.duration_since(pace.last_work) < self.ctx.poll {
            pace.idle_passes = pace.idle_passes.wrapping_add(1);
            std::hint::spin_loop();
            return Ok(Next::Again);
        }
        if !self.stopping && !self.notify_enabled {
            self.notify_enabled = true;
            // Re-check after enabling: a request added before the guest saw
            // notifications on would otherwise wait for the next kick.
            match self.queue.enable_notification(&**mem) {
                Ok(true) => return Ok(Next::Again),
                Ok(false) => {}
                Err(e) => self
                    .bad_requests
                    .log(self.index, || format!("cannot enable notifications: {e}")),
            }
        }
        Ok(Next::Sleep)
    }

    /// The current memory table, moved out of the cache for one pass (put
    /// back after it): no shared reference count is touched unless the
    /// frontend changed the table.
    fn take_memory(&mut self) -> Arc<GuestMemoryMmap> {
        let guard = self.mem.memory();
        match self.mem_cache.take() {
            Some(m) if std::ptr::eq(&*guard, &*m) => m,
            _ => guard.into_inner(),
        }
    }

    /// Starts the throttled and retrying requests whose time has come.
    fn fire_timers(&mut self, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        while let Some(&Reverse((t, idx))) = self.timers.peek() {
            if t > self.now {
                break;
            }
            self.timers.pop();
            any = true;
            match self.slots[idx].as_ref().map(|s| s.state) {
                Some(SlotState::Throttled) => self.dispatch(idx, mem),
                Some(SlotState::RetryWait) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.submit_slot(idx, mem);
                }
                _ => {}
            }
        }
        any
    }

    /// On stop: requests not yet at the disk either go now (throttled ones:
    /// QoS does not matter any more) or, when they wait behind a failure, are
    /// left for the next daemon (with in-flight tracking, which resubmits
    /// them in order) or failed (without it, they would be lost).
    fn abandon_waiting(&mut self, mem: &GuestMemoryMmap) {
        self.timers.clear();
        self.held.clear();
        for idx in 0..self.slots.len() {
            let Some(state) = self.slots[idx].as_ref().map(|s| s.state) else {
                continue;
            };
            match state {
                SlotState::Throttled => self.dispatch(idx, mem),
                SlotState::Held | SlotState::RetryWait => {
                    if self.inflight.is_some() {
                        self.release_slot(idx);
                    } else {
                        self.finish(idx, Status::IoErr, mem);
                    }
                }
                SlotState::InFlight => {}
            }
        }
    }

    /// Cancels the pending kick read and waits for it, so the kernel no longer
    /// refers to `kick_buf` when the worker is dropped.
    fn cancel_kick(&mut self) -> io::Result<()> {
        if !self.kick_armed {
            return Ok(());
        }
        self.ring.cancel(CANCEL, KICK)?;
        while self.kick_armed {
            self.ring.submit_and_wait(None)?;
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
        // A completion signal may have been lost with a previous daemon:
        // one spurious interrupt is harmless, a lost one hangs the guest.
        self.call.signal();
        if log::log_enabled!(log::Level::Debug) {
            let mem = self.mem.memory();
            log::debug!(
                "queue {}: start at avail {} (guest avail {:?}, used {:?}), {} to resubmit",
                self.index,
                self.queue.next_avail(),
                self.queue.avail_idx(&*mem, Ordering::Acquire).map(|w| w.0),
                self.queue.used_idx(&*mem, Ordering::Acquire).map(|w| w.0),
                heads.len()
            );
        }
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

    /// Makes `now` current if the loop skipped reading the clock.
    fn fresh_now(&mut self) {
        if self.now_stale {
            self.now = Instant::now();
            self.now_stale = false;
        }
    }

    fn pop_requests(&mut self, mem: &Arc<GuestMemoryMmap>) -> bool {
        let mut any = false;
        // A slot per request: a guest that re-adds heads still in flight
        // waits until one completes.
        while !self.free.is_empty() {
            let Some(chain) = self.queue.pop_descriptor_chain(&**mem) else {
                break;
            };
            if !any {
                self.fresh_now();
            }
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
                self.stats.other.fetch_add(1, Ordering::Relaxed);
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return self.complete(req, e.status(), 1, mem);
            }
        };
        if let Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. } = op {
            // Nothing to do (fallocate refuses an empty range).
            self.stats.other.fetch_add(1, Ordering::Relaxed);
            return self.complete(req, Status::Ok, 1, mem);
        }
        if let Op::GetId { len } = op {
            // Needs no I/O.
            let serial = self.ctx.serial;
            let n = req.copy_to_guest(0, &serial[..len as usize]);
            self.stats.other.fetch_add(1, Ordering::Relaxed);
            return self.complete(req, Status::Ok, n as u32 + 1, mem);
        }
        let Some(idx) = self.free.pop() else {
            // Unreachable: requests are only popped with a free slot.
            return self.complete(req, Status::IoErr, 1, mem);
        };
        self.stats.inflight.fetch_add(1, Ordering::Relaxed);
        let mut slot = Slot {
            req,
            op,
            state: SlotState::Held,
            arrived: self.now,
            done: 0,
            bounce: None,
            zero: ZeroStage::ZeroRange,
            failure: None,
        };
        match op {
            Op::Read { len, .. } | Op::Write { len, .. } if self.needs_bounce(&slot.req) => {
                slot.bounce = Some(Bounce::new(len));
            }
            Op::WriteZeroes { unmap: true, .. } => slot.zero = ZeroStage::PunchHole,
            _ => {}
        }
        self.slots[idx] = Some(slot);
        if self.failing > 0 {
            self.held.push_back(idx);
        } else {
            self.admit(idx, mem);
        }
    }

    /// Takes QoS tokens for a request: it starts now or at its reserved time.
    fn admit(&mut self, idx: usize, mem: &GuestMemoryMmap) {
        let qos = &self.ctx.qos;
        let go_at = match self.slots[idx].as_ref().map(|s| s.op) {
            Some(Op::Read { len, .. }) if qos.is_active() => qos.admit(Dir::Read, len, self.now),
            Some(Op::Write { len, .. }) if qos.is_active() => qos.admit(Dir::Write, len, self.now),
            _ => self.now,
        };
        if go_at > self.now {
            let waited = go_at.duration_since(self.now).as_nanos() as u64;
            self.stats.throttled_ns.fetch_add(waited, Ordering::Relaxed);
            if let Some(slot) = self.slots[idx].as_mut() {
                slot.state = SlotState::Throttled;
            }
            self.timers.push(Reverse((go_at, idx)));
        } else {
            self.dispatch(idx, mem);
        }
    }

    /// Sends a request to the disk (the null disk completes it here).
    fn dispatch(&mut self, idx: usize, mem: &GuestMemoryMmap) {
        if self.ctx.disk.kind() == DiskKind::Null {
            if let Some(slot) = self.slots[idx].as_ref() {
                if matches!(slot.op, Op::Read { .. }) {
                    slot.req.zero_data();
                }
            }
            return self.finish(idx, Status::Ok, mem);
        }
        self.submit_slot(idx, mem);
    }

    /// Requests held behind failures go, in order, once none fails.
    fn release_held(&mut self, mem: &GuestMemoryMmap) {
        while self.failing == 0 {
            let Some(idx) = self.held.pop_front() else {
                break;
            };
            self.admit(idx, mem);
        }
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
        slot.state = SlotState::InFlight;
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
        self.fresh_now();
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

    fn on_complete(&mut self, idx: usize, mut res: i32, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        if res >= 0 {
            if let Some(errno) = self.ctx.faults.fault(slot.fault_class()) {
                res = -errno;
            }
        }
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
            return self.failed(idx, errno, mem);
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

    /// An attempt failed: retry it (I/O suspension) or fail the request.
    fn failed(&mut self, idx: usize, errno: i32, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let since = slot.failure.as_ref().map_or(self.now, |f| f.since);
        let failing_for = self.now.saturating_duration_since(since);
        let verdict = self.ctx.suspension.verdict(errno, failing_for);
        if self.stopping && matches!(verdict, Verdict::Retry(_)) {
            // No retries while stopping: the next daemon resubmits the
            // request from the in-flight region; without one it fails.
            if self.inflight.is_some() {
                self.release_slot(idx);
                return;
            }
            return self.finish(idx, Status::IoErr, mem);
        }
        let Verdict::Retry(interval) = verdict else {
            let (index, op) = (self.index, slot.op);
            self.io_errors.log(index, || {
                format!("{op:?} failed: {}", io::Error::from_raw_os_error(errno))
            });
            return self.finish(idx, Status::IoErr, mem);
        };
        if slot.failure.is_none() {
            self.failing += 1;
            let (index, op) = (self.index, slot.op);
            self.io_errors.log(index, || {
                format!(
                    "{op:?} failed: {}; suspending the queue and retrying",
                    io::Error::from_raw_os_error(errno)
                )
            });
        }
        let failure = slot.failure.get_or_insert(Failure {
            since,
            errno,
            alarmed: false,
        });
        failure.errno = errno;
        if !failure.alarmed && self.ctx.suspension.alarm_due(failing_for) {
            failure.alarmed = true;
            self.ctx.suspension.raise(&AlarmInfo {
                queue: self.index,
                sector: slot.sector(),
                errno,
                duration: failing_for,
            });
        }
        slot.state = SlotState::RetryWait;
        self.timers.push(Reverse((self.now + interval, idx)));
    }

    fn finish(&mut self, idx: usize, status: Status, mem: &GuestMemoryMmap) {
        let Some(slot) = self.release_slot(idx) else {
            return;
        };
        let s = &self.stats;
        let count = |c: &std::sync::atomic::AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        match slot.op {
            Op::Read { len, .. } => {
                count(&s.reads, 1);
                if status == Status::Ok {
                    count(&s.bytes_read, len);
                }
            }
            Op::Write { len, .. } => {
                count(&s.writes, 1);
                if status == Status::Ok {
                    count(&s.bytes_written, len);
                }
            }
            Op::Flush => {
                count(&s.flushes, 1);
            }
            Op::Discard { .. } => {
                count(&s.discards, 1);
            }
            Op::WriteZeroes { .. } => {
                count(&s.write_zeroes, 1);
            }
            Op::GetId { .. } => {
                count(&s.other, 1);
            }
        }
        if status != Status::Ok {
            count(&s.errors, 1);
        }
        s.latency
            .record(self.now.saturating_duration_since(slot.arrived).as_nanos() as u64);
        if let Some(f) = &slot.failure {
            let info = AlarmInfo {
                queue: self.index,
                sector: slot.sector(),
                errno: f.errno,
                duration: self.now.saturating_duration_since(f.since),
            };
            if status == Status::Ok {
                log::info!(
                    "queue {}: sector {} recovered after {:.1} s",
                    self.index,
                    info.sector,
                    info.duration.as_secs_f64()
                );
            }
            if f.alarmed {
                self.ctx.suspension.clear(&info, status == Status::Ok);
            }
        }
        let used = match (slot.op, status) {
            (Op::Read { len, .. }, Status::Ok) => len as u32 + 1,
            _ => 1,
        };
        self.complete(slot.req, status, used, mem);
        self.release_held(mem);
    }

    /// Frees a slot without completing its request (the caller does, or
    /// leaves it to the next daemon through the in-flight region).
    fn release_slot(&mut self, idx: usize) -> Option<Slot> {
        let slot = self.slots.get_mut(idx).and_then(Option::take)?;
        self.free.push(idx);
        self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        if slot.failure.is_some() {
            self.failing -= 1;
        }
        Some(slot)
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
