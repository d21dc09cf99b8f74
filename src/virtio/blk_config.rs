//! The virtio-blk configuration space (struct virtio_blk_config), laid out
//! by hand in little-endian so no unsafe transmute is needed.

use super::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SIZE_MAX};
use crate::storage::{Geometry, SECTOR_SIZE};

/// Byte offset of `wce`, the only field the driver may write.
pub const WCE_OFFSET: usize = 32;
/// Size of the fields we define (up to `write_zeroes_may_unmap` and padding).
pub const CONFIG_LEN: usize = 60;
/// Frontends may read a larger struct (secure erase, zoned); we answer zeroes.
pub const CONFIG_SPACE_MAX: usize = 256;

/// Builds the config space for a disk with the given geometry.
pub fn build(geometry: &Geometry, num_queues: u16, queue_size: u16, wce: bool) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    let logical = geometry.logical_block;
    let physical_exp = (geometry.physical_block / logical).max(1).trailing_zeros() as u8;
    let lb_sectors = (logical as u64 / SECTOR_SIZE) as u32;
    put(0, &(geometry.size / SECTOR_SIZE).to_le_bytes()); // capacity
    put(8, &SIZE_MAX.to_le_bytes()); // size_max
    put(12, &(u32::from(queue_size) - 2).to_le_bytes()); // seg_max
                                                         // 16..20: geometry, not offered.
    put(20, &logical.to_le_bytes()); // blk_size
    put(24, &[physical_exp]); // physical_block_exp
    put(25, &[(geometry.alignment_offset / logical) as u8]); // alignment_offset
    put(26, &((geometry.min_io / logical) as u16).to_le_bytes()); // min_io_size
    put(28, &(geometry.opt_io / logical).to_le_bytes()); // opt_io_size
    put(WCE_OFFSET, &[u8::from(wce)]);
    put(34, &num_queues.to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &lb_sectors.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn layout_matches_the_spec() {
        let g = Geometry {
            size: 10 << 30,
            logical_block: 4096,
            physical_block: 16384,
            min_io: 8192,
            opt_io: 65536,
            alignment_offset: 0,
            mem_align: 512,
        };
        let c = build(&g, 4, 128, true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (10 << 30) / 512
        );
        assert_eq!(le32(&c, 12), 126, "seg_max = queue size - 2");
        assert_eq!(le32(&c, 20), 4096);
        assert_eq!(c[24], 2, "16 KiB physical = 4 KiB << 2");
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 2);
        assert_eq!(le32(&c, 28), 16);
        assert_eq!(c[WCE_OFFSET], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(le32(&c, 44), 8, "discard alignment in sectors");
        assert_eq!(c[56], 1);
    }
}
