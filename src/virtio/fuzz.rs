//! A harness that parses a request out of arbitrary bytes, for the fuzz
//! target in `fuzz/` and for the randomized test below: whatever the guest
//! writes, parsing must not panic and must stay inside guest memory.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::request::{DescTable, Limits, Op, Parser};
use super::Status;

/// Two guest RAM regions with a hole between them, so that buffers can
/// straddle region boundaries and fall into the hole.
const REGION: usize = 32 << 10;
const SECOND: u64 = 64 << 10;
const QUEUE_SIZE: u16 = 16;

/// Lays `data` out as guest memory (descriptor table at address 0), parses
/// the chain at a head chosen by the first byte, and exercises the result.
pub fn parse_arbitrary(data: &[u8]) -> Option<Op> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(SECOND), REGION),
    ])
    .ok()?;
    let (a, b) = data.split_at(data.len().min(REGION));
    use vm_memory::Bytes;
    mem.write_slice(a, GuestAddress(0)).ok()?;
    mem.write_slice(&b[..b.len().min(REGION)], GuestAddress(SECOND))
        .ok()?;
    let mem = Arc::new(mem);
    let flags = data.get(1).copied().unwrap_or(0);
    let limits = Limits {
        size: 1 << (20 + (flags & 7)),
        logical_block: if flags & 8 != 0 { 4096 } else { 512 },
        read_only: flags & 16 != 0,
        max_descriptors: usize::from(QUEUE_SIZE),
    };
    let table = DescTable {
        addr: GuestAddress(0),
        size: QUEUE_SIZE,
    };
    let head = u16::from(data.first().copied().unwrap_or(0)) % QUEUE_SIZE;
    let mut parser = Parser::default();
    let req = parser.parse(table, head, &mem, &limits, Vec::new());
    let total: usize = req.iovecs.iter().map(|v| v.iov_len).sum();
    match req.op {
        Ok(op) => {
            // Data buffers are usable end to end.
            let mut buf = vec![0u8; total.min(1 << 20)];
            assert_eq!(req.copy_from_guest(0, &mut buf), buf.len());
            assert_eq!(req.copy_to_guest(0, &buf), buf.len());
            req.set_status(Status::Ok);
            Some(op)
        }
        Err(e) => {
            assert!(req.iovecs.is_empty(), "a bad request keeps no buffers");
            req.set_status(e.status());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small xorshift generator: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Plausible-looking chains (addresses near memory, small lengths,
    /// random flags and links) reach deep into the parser.
    #[test]
    fn random_chains_never_panic() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut ok = 0;
        for _ in 0..8_000 {
            let mut data = vec![0u8; 2 * REGION];
            for b in data.iter_mut().step_by(7) {
                *b = rng.next() as u8;
            }
            for i in 0..usize::from(QUEUE_SIZE) {
                let r = rng.next();
                let addr = match r % 4 {
                    0 => r >> 40 & 0x7fff,
                    1 => SECOND + (r >> 40 & 0x7fff),
                    2 => REGION as u64 - 8,
                    _ => r >> 20,
                };
                let len = (rng.next() % 9000) as u32;
                let flags = (rng.next() % 8) as u16;
                let next = (rng.next() % 20) as u16;
                let d = &mut data[i * 16..i * 16 + 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&next.to_le_bytes());
            }
            // Now and then a well-formed read of sector 0 at the head.
            if rng.next() % 4 == 0 {
                data[0] = 0;
                let chain: [(u64, u32, u16, u16); 3] =
                    [(0x1000, 16, 1, 1), (0x2000, 512, 3, 2), (0x3000, 1, 2, 0)];
                for (i, (addr, len, flags, next)) in chain.iter().enumerate() {
                    let d = &mut data[i * 16..i * 16 + 16];
                    d[0..8].copy_from_slice(&addr.to_le_bytes());
                    d[8..12].copy_from_slice(&len.to_le_bytes());
                    d[12..14].copy_from_slice(&flags.to_le_bytes());
                    d[14..16].copy_from_slice(&next.to_le_bytes());
                }
                data[0x1000..0x1010].fill(0);
            }
            if parse_arbitrary(&data).is_some() {
                ok += 1;
            }
        }
        println!("{ok} of 8000 random chains were valid requests");
        assert!(
            ok > 400,
            "only {ok} valid requests: the generator is too random"
        );
    }
}
