//! The vhost-user request handler of a virtio-blk device.
//!
//! We implement the `vhost` crate's backend trait ourselves instead of using
//! vhost-user-backend's daemon: its handler is private and refuses
//! GET/SET_INFLIGHT_FD, which crash recovery needs, and its vrings sit behind
//! a lock on the data path. Here each running queue is owned outright by its
//! worker thread; the control plane only starts and stops workers.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// vhost's (private) alias for a region base address.
type VhostUserMemoryRegionBase = u64;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use super::inflight::{InflightError, InflightRegion};
use crate::tier::release::drop_shared_view;
use crate::virtio::{self, blk_config};
use crate::worker::{CallFd, DiskContext, QueueSetup, WorkerHandle};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("vring index {0} out of range")]
    BadIndex(u32),
    #[error("queue size {0} is not a power of two in 1..={1}")]
    BadQueueSize(u32, u16),
    #[error("vring address {0:#x} is not in any memory region")]
    UnmappedAddress(u64),
    #[error("vring {0}: {1}")]
    InvalidRing(u16, String),
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
    #[error("cannot start queue thread: {0}")]
    Spawn(io::Error),
    #[error("config space write at offset {0} (+{1}) is not allowed")]
    ConfigWrite(u32, usize),
    #[error("config space read at offset {0} (+{1}) is out of range")]
    ConfigRead(u32, u32),
    #[error(transparent)]
    Inflight(#[from] InflightError),
}

impl From<BackendError> for VuError {
    fn from(e: BackendError) -> VuError {
        log::error!("{e}");
        match e {
            BackendError::Spawn(io) => VuError::ReqHandlerError(io),
            other => VuError::ReqHandlerError(io::Error::new(
                io::ErrorKind::InvalidInput,
                other.to_string(),
            )),
        }
    }
}

/// Maps one guest RAM region the frontend sent (SET_MEM_TABLE or
/// ADD_MEM_REGION) and records where it sits in the frontend's address space.
fn map_region(
    region: &VhostUserMemoryRegion,
    file: File,
) -> Result<(GuestRegionMmap, Mapping), BackendError> {
    let mmap = region
        .mmap_region(file)
        .map_err(|e| BackendError::Mmap(e.to_string()))?;
    let guest_region = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
        .ok_or_else(|| BackendError::Mmap("region wraps the address space".into()))?;
    let mapping = Mapping {
        vmm_addr: region.user_addr,
        size: region.memory_size,
        gpa: region.guest_phys_addr,
    };
    Ok((guest_region, mapping))
}

/// Drops our page-table entries for all of guest RAM (vublk-tier asks
/// before it pages memory out: the kernel skips pages that a second process
/// maps). The mapping is shared, so the data stays in the frontend's memory
/// and whatever we touch next simply faults back in; I/O in flight holds
/// its pages pinned and is unaffected. Returns the bytes released.
pub fn release_guest_memory(mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<u64> {
    let mem = mem.memory();
    let mut total = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live MAP_SHARED mapping of the frontend's
        // memory file, `len` bytes long, kept mapped by `mem`.
        unsafe { drop_shared_view(region.as_ptr(), len)? };
        total += len as u64;
    }
    Ok(total)
}

/// What QEMU's vhost-user frontend offers at most.
const MAX_MEM_SLOTS: u64 = 509;

/// vmm virtual address → guest physical address, per memory region.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

#[derive(Default)]
struct Vring {
    size: u16,
    /// Guest physical addresses of the descriptor table, avail and used rings.
    addrs: Option<(u64, u64, u64)>,
    next_avail: u16,
    kick: Option<File>,
    call: Arc<CallFd>,
    enabled: bool,
    worker: Option<WorkerHandle>,
}

pub struct BlkBackend {
    ctx: Arc<DiskContext>,
    num_queues: u16,
    max_queue_size: u16,
    acked_features: u64,
    acked_protocol: u64,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightRegion>>,
}

impl BlkBackend {
    pub fn new(ctx: Arc<DiskContext>, num_queues: u16, max_queue_size: u16) -> BlkBackend {
        BlkBackend {
            ctx,
            num_queues,
            max_queue_size,
            acked_features: 0,
            acked_protocol: 0,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
            vrings: (0..num_queues).map(|_| Vring::default()).collect(),
            inflight: None,
        }
    }

    /// Forgets the frontend: stops every queue (their in-flight I/O
    /// completes first) and drops the guest memory mapping.
    pub fn disconnect(&mut self) {
        self.reset_rings();
        self.acked_features = 0;
        self.acked_protocol = 0;
        self.mappings.clear();
        self.inflight = None;
        // Keep the same handle (the tier release server holds it), empty.
        let _ = self.replace_memory(GuestMemoryMmap::new());
        self.ctx.wce.store(true, Ordering::Relaxed);
    }

    /// A device reset: stops every queue and forgets the rings, but keeps
    /// what belongs to the connection (memory table, in-flight region,
    /// negotiated protocol features). QEMU resets the device when the guest
    /// driver changes (firmware, then Linux) and does not resend the memory
    /// table afterwards.
    fn reset_rings(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_vring(i);
        }
        self.vrings = (0..self.num_queues).map(|_| Vring::default()).collect();
        self.ctx.wce.store(true, Ordering::Relaxed);
    }

    /// The guest memory as the queues see it, for the tier handshake.
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.mem.clone()
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring, BackendError> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(BackendError::BadIndex(index))
    }

    fn protocol_features_negotiated(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn vmm_to_gpa(&self, vmm: u64) -> Result<u64, BackendError> {
        self.mappings
            .iter()
            .find(|m| vmm >= m.vmm_addr && vmm - m.vmm_addr < m.size)
            .map(|m| vmm - m.vmm_addr + m.gpa)
            .ok_or(BackendError::UnmappedAddress(vmm))
    }

    /// Starts the queue thread once the ring is fully described and enabled.
    fn maybe_start(&mut self, index: usize) -> Result<(), BackendError> {
        let event_idx = virtio::has_event_idx(self.acked_features);
        let mem = self.mem.clone();
        let ctx = Arc::clone(&self.ctx);
        let max = self.max_queue_size;
        let inflight = self.inflight.clone();
        let Some(v) = self.vrings.get_mut(index) else {
            return Err(BackendError::BadIndex(index as u32));
        };
        let (Some(kick), Some((desc, avail, used)), true, None) =
            (&v.kick, v.addrs, v.enabled, &v.worker)
        else {
            return Ok(());
        };
        let ring = |e: virtio_queue::Error| BackendError::InvalidRing(index as u16, e.to_string());
        let mut queue = Queue::new(max).map_err(ring)?;
        queue.try_set_size(v.size).map_err(ring)?;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .map_err(ring)?;
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .map_err(ring)?;
        queue
            .try_set_used_ring_address(GuestAddress(used))
            .map_err(ring)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        let guard = mem.memory();
        if !queue.is_valid(&*guard) {
            return Err(BackendError::InvalidRing(
                index as u16,
                "rings are not inside guest memory".into(),
            ));
        }
        queue.set_next_avail(v.next_avail);
        // The used index lives in guest memory; resume from it (after a
        // reconnect the frontend's notion of it is what the guest sees).
        let used_idx = queue.used_idx(&*guard, Ordering::Acquire).map_err(ring)?;
        queue.set_next_used(used_idx.0);
        drop(guard);
        // With in-flight tracking the region, not SET_VRING_BASE, says where
        // the previous daemon stopped (it may have crashed).
        let mut tracker = inflight.and_then(|r| r.queue(index as u16));
        let recovery = tracker.as_mut().map(|t| t.recover(used_idx.0));
        let resubmit = match recovery {
            Some(r) => {
                queue.set_next_avail(r.next_avail);
                r.resubmit
            }
            None => Vec::new(),
        };
        let kick = kick.try_clone().map_err(BackendError::Spawn)?;
        let setup = QueueSetup {
            index: index as u16,
            max_queue_size: max,
            queue,
            kick,
            call: Arc::clone(&v.call),
            mem,
            inflight: tracker,
            resubmit,
        };
        v.worker = Some(WorkerHandle::spawn(setup, ctx).map_err(BackendError::Spawn)?);
        log::debug!(
            "queue {index}: started (size {}, avail {})",
            v.size,
            v.next_avail
        );
        Ok(())
    }

    fn stop_vring(&mut self, index: usize) {
        if let Some(v) = self.vrings.get_mut(index) {
            if let Some(w) = v.worker.take() {
                if let Some(q) = w.stop() {
                    v.next_avail = q.next_avail();
                }
                log::debug!("queue {index}: stopped at avail {}", v.next_avail);
            }
        }
    }

    /// Running queues pick the new table up at their next batch; requests in
    /// flight keep the old one mapped until they complete.
    fn replace_memory(&mut self, mem: GuestMemoryMmap) -> VuResult<()> {
        self.mem
            .lock()
            .map_err(|_| VuError::BackendInternalError)?
            .replace(mem);
        Ok(())
    }

    fn unsupported<T>(what: &'static str) -> VuResult<T> {
        Err(VuError::InvalidOperation(what))
    }
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        log::debug!("reset owner");
        self.reset_rings();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        log::debug!("reset device");
        self.reset_rings();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(
            virtio::device_features(self.ctx.disk.read_only(), self.num_queues > 1)
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        )
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            log::error!("frontend acked features {features:#x} beyond the offered {offered:#x}");
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let (guest_region, mapping) = map_region(region, file)?;
            mappings.push(mapping);
            regions.push(guest_region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| BackendError::Mmap(e.to_string()))?;
        self.replace_memory(mem)?;
        self.mappings = mappings;
        log::debug!("memory table: {} regions", ctx.len());
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.max_queue_size;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(BackendError::BadQueueSize(num, max).into());
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let addrs = (
            self.vmm_to_gpa(descriptor)?,
            self.vmm_to_gpa(available)?,
            self.vmm_to_gpa(used)?,
        );
        self.vring(index)?.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.next_avail = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        self.stop_vring(index as usize);
        let v = self.vring(index)?;
        v.kick = None;
        v.call.set(None);
        v.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(v.next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let auto_enable = !self.protocol_features_negotiated();
        self.stop_vring(index as usize);
        let v = self.vring(u32::from(index))?;
        v.kick = fd;
        // Without VHOST_USER_F_PROTOCOL_FEATURES a ring starts on its kick fd.
        if auto_enable {
            v.enabled = true;
        }
        Ok(self.maybe_start(index as usize)?)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.call.set(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if enable {
            self.vring(index)?.enabled = true;
            Ok(self.maybe_start(index as usize)?)
        } else {
            self.vring(index)?;
            self.stop_vring(index as usize);
            self.vring(index)?.enabled = false;
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let end = offset as usize + size as usize;
        if end > blk_config::CONFIG_SPACE_MAX {
            return Err(BackendError::ConfigRead(offset, size).into());
        }
        let config = blk_config::build(
            self.ctx.disk.geometry(),
            self.num_queues,
            self.max_queue_size,
            self.ctx.wce.load(Ordering::Relaxed),
        );
        let mut out = vec![0u8; size as usize];
        for (i, b) in out.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
        Ok(out)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only the writeback field is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match (offset as usize, buf) {
            (blk_config::WCE_OFFSET, [wce]) => {
                self.ctx.wce.store(*wce != 0, Ordering::Relaxed);
                log::info!(
                    "guest set write cache {}",
                    if *wce != 0 { "on" } else { "off" }
                );
                Ok(())
            }
            _ => Err(BackendError::ConfigWrite(offset, buf.len()).into()),
        }
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Self::unsupported("gpu socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Self::unsupported("shared objects")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let region = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(BackendError::from)?;
        let file = region.file().try_clone().map_err(BackendError::Spawn)?;
        let reply = VhostUserInflight {
            mmap_size: region.len() as u64,
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        self.inflight = Some(Arc::new(region));
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::open(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(BackendError::from)?;
        log::debug!(
            "in-flight region: {} queues of {}",
            inflight.num_queues,
            inflight.queue_size
        );
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(BackendError::Mmap("too many memory regions".into()).into());
        }
        let (guest_region, mapping) = map_region(region, fd)?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(guest_region))
            .map_err(|e| BackendError::Mmap(e.to_string()))?;
        self.replace_memory(mem)?;
        let (gpa, size, vmm) = (region.guest_phys_addr, region.memory_size, region.user_addr);
        log::debug!("add memory region gpa {gpa:#x} size {size:#x} vmm {vmm:#x}");
        self.mappings.push(mapping);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _removed) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| BackendError::Mmap(e.to_string()))?;
        self.replace_memory(mem)?;
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        log::debug!("remove memory region gpa {gpa:#x} size {size:#x}");
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Self::unsupported("device state transfer")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Self::unsupported("device state transfer")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Self::unsupported("shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Self::unsupported("dirty logging")
    }
}
