//! The virtio-blk device model: feature bits, the config space, and request
//! parsing. Nothing here does I/O.

pub mod blk_config;
#[doc(hidden)]
pub mod fuzz;
pub mod request;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest data transfer of one request we accept. Larger ones are refused
/// with IOERR rather than tying up a queue thread.
pub const MAX_REQUEST_BYTES: u64 = 1 << 30;
/// size_max: the largest single segment the guest may send. Linux's default
/// segment limit; it also keeps size_max * seg_max inside an i32, which
/// some frontends (libblkio) compute.
pub const SIZE_MAX: u32 = 64 << 10;
/// Largest discard in sectors: one fallocate covers it.
pub const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
/// Largest write-zeroes in sectors: the buffered fallback writes it from a
/// shared zero buffer in one writev (see `engine::uring`).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (64 << 20) / 512;

/// Virtio status byte values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = VIRTIO_BLK_S_OK as u8,
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Device feature bits offered to the driver.
pub fn device_features(read_only: bool, multi_queue: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    if multi_queue {
        f |= bit(VIRTIO_BLK_F_MQ);
    }
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    }
    f
}

pub fn has_event_idx(features: u64) -> bool {
    features & bit(VIRTIO_RING_F_EVENT_IDX) != 0
}
