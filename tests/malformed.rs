//! A hand-built vhost-user frontend (the `vhost` crate's frontend side) with
//! split rings written by hand over memfd-backed guest memory, to send the
//! daemon what no well-behaved driver would: bad descriptor chains, bad
//! requests and bad vhost-user messages. After each, the daemon must answer
//! the right status (or nothing), and keep serving.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use common::*;

const MEM: usize = 16 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const INDIRECT_TABLE: u64 = 0x3_0000;
const DATA: u64 = 0x10_0000;
/// Where `check_alive` does its I/O, away from what tests look at.
const ALIVE: u64 = 0x80_0000;
/// Past the end of guest memory.
const OUTSIDE: u64 = 0x4000_0000;
const DISK: u64 = 4 << 20;
const SERIAL: &str = "vublk-serial-0123";

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// What the status byte holds before the daemon writes it.
const UNTOUCHED: u8 = 0xee;

/// Guest memory in a memfd, so that the daemon can map it too.
struct GuestRam {
    mem: GuestMemoryMmap,
    file: File,
}

impl GuestRam {
    fn new() -> GuestRam {
        // SAFETY: a plain syscall with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vublk-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM as u64).unwrap();
        let region = FileOffset::new(file.try_clone().unwrap(), 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM, Some(region))])
            .unwrap();
        GuestRam { mem, file }
    }

    fn host(&self) -> u64 {
        self.mem.get_host_address(GuestAddress(0)).unwrap() as u64
    }
}

/// The result of one request as the driver sees it.
#[derive(Debug, PartialEq, Eq)]
struct Done {
    id: u32,
    len: u32,
    status: u8,
}

/// One connected frontend with queue 0 running.
struct Dev {
    fe: Frontend,
    ram: GuestRam,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    features: u64,
}

fn frontend(sock: &Path) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A generous queue limit, so that the crate lets bad indices out.
        match Frontend::connect(sock, 64) {
            Ok(f) => return f,
            Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Dev {
    /// Negotiates everything the daemon offers (or all but `drop_features`)
    /// and starts queue 0 over fresh guest memory.
    fn connect(sock: &Path) -> Dev {
        Self::connect_with(sock, 0)
    }

    fn connect_with(sock: &Path, drop_features: u64) -> Dev {
        let mut fe = frontend(sock);
        let (features, ram) = Self::negotiate(&mut fe, drop_features);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let host = ram.host();
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Dev {
            fe,
            ram,
            kick,
            call,
            avail_idx: 0,
            used_seen: 0,
            features,
        }
    }

    /// Feature and protocol negotiation plus the memory table; errors come
    /// back as REPLY_ACK nacks.
    fn negotiate(fe: &mut Frontend, drop_features: u64) -> (u64, GuestRam) {
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap() & !drop_features;
        fe.set_features(features).unwrap();
        let offered = fe.get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        assert!(offered.contains(want), "protocol features {offered:?}");
        fe.set_protocol_features(want).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let ram = GuestRam::new();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: ram.host(),
            mmap_offset: 0,
            mmap_handle: ram.file.as_raw_fd(),
        }])
        .unwrap();
        (features, ram)
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.ram.mem
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem().write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem().read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.put(HDR, &h);
    }

    /// One discard/write-zeroes segment right after the header.
    fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.put(at, &s);
    }

    /// Writes raw descriptors (addr, len, flags, next) at `table` from 0.
    fn descs_at(&self, table: u64, descs: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            self.put(table + 16 * i as u64, &b);
        }
    }

    /// (addr, len, flags) linked 0 -> 1 -> ... in order.
    fn linked(descs: &[(u64, u32, u16)]) -> Vec<(u64, u32, u16, u16)> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let last = i + 1 == descs.len();
                (a, l, if last { f } else { f | NEXT }, i as u16 + 1)
            })
            .collect()
    }

    /// Makes `head` available and kicks, without waiting.
    fn offer(&mut self, head: u16) {
        self.put(STATUS, &[UNTOUCHED]);
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.put(slot, &head.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put(AVAIL + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Waits for the next used element.
    fn reap(&mut self) -> Done {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            fence(Ordering::SeqCst);
            let idx = u16::from_le_bytes(self.get(USED + 2, 2).try_into().unwrap());
            if idx != self.used_seen {
                assert_eq!(
                    idx,
                    self.used_seen.wrapping_add(1),
                    "one completion at a time"
                );
                break;
            }
            assert!(Instant::now() < deadline, "no completion");
            std::thread::sleep(Duration::from_micros(200));
        }
        let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        let e = self.get(at, 8);
        Done {
            id: u32::from_le_bytes(e[0..4].try_into().unwrap()),
            len: u32::from_le_bytes(e[4..8].try_into().unwrap()),
            status: self.get(STATUS, 1)[0],
        }
    }

    /// Submits the raw descriptor table entries with `head` and waits.
    fn raw(&mut self, descs: &[(u64, u32, u16, u16)], head: u16) -> Done {
        self.descs_at(DESC, descs);
        self.offer(head);
        self.reap()
    }

    /// Submits a chain linked in order from descriptor 0 and waits.
    fn chain(&mut self, descs: &[(u64, u32, u16)]) -> Done {
        self.raw(&Self::linked(descs), 0)
    }

    /// Expects a completion of head 0 with this status and used length.
    fn expect(&mut self, descs: &[(u64, u32, u16)], status: u8, used: u32, what: &str) {
        let d = self.chain(descs);
        assert_eq!(
            d,
            Done {
                id: 0,
                len: used,
                status
            },
            "{what}"
        );
        self.check_alive(what);
    }

    /// A good write and read-back on the same queue.
    fn check_alive(&mut self, after: &str) {
        let saved = self.get(HDR, 64);
        // Its own area, away from the sectors the tests check.
        let sector = 4096 + 8 * u64::from(self.avail_idx % 64);
        let mut data = vec![0u8; 4096];
        fill_pattern(&mut data, u64::from(self.avail_idx), sector * 512);
        self.put(ALIVE, &data);
        self.header(VIRTIO_BLK_T_OUT, sector);
        let d = self.chain(&[(HDR, 16, R), (ALIVE, 4096, R), (STATUS, 1, W)]);
        assert_eq!((d.status, d.len), (OK, 1), "write after {after}");
        self.put(ALIVE + 8192, &[0u8; 4096]);
        self.header(VIRTIO_BLK_T_IN, sector);
        let d = self.chain(&[(HDR, 16, R), (ALIVE + 8192, 4096, W), (STATUS, 1, W)]);
        assert_eq!((d.status, d.len), (OK, 4097), "read after {after}");
        assert!(self.get(ALIVE + 8192, 4096) == data, "data after {after}");
        self.put(HDR, &saved);
    }

    fn config(&mut self, offset: u32, len: u32) -> Vec<u8> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .fe
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
            .unwrap();
        payload
    }
}

fn image_daemon(extra: &[&str]) -> (tempfile::TempDir, PathBuf, Daemon) {
    let dir = disk_dir();
    let sock = dir.path().join("s");
    let img = dir.path().join("d.img");
    let mut args = vec![
        "--disk",
        img.to_str().unwrap(),
        "--size",
        "4M",
        "--serial",
        SERIAL,
        "--poll-us",
        "0",
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start(&sock, &args);
    (dir, sock, d)
}

#[test]
fn malformed_chains_fail_alone() {
    let (_dir, sock, mut daemon) = image_daemon(&[]);
    let mut dev = Dev::connect(&sock);
    dev.check_alive("start");
    let st = (STATUS, 1, W);
    dev.header(VIRTIO_BLK_T_IN, 0);

    // Descriptor addresses outside guest memory.
    dev.expect(
        &[(HDR, 16, R), (OUTSIDE, 512, W), st],
        IOERR,
        1,
        "data outside",
    );
    let edge = MEM as u64 - 256;
    dev.expect(
        &[(HDR, 16, R), (edge, 512, W), st],
        IOERR,
        1,
        "data across the end",
    );
    dev.expect(&[(OUTSIDE, 16, R), st], IOERR, 1, "header outside");
    dev.expect(
        &[(HDR, 16, R), (DATA, 512, W), (OUTSIDE, 1, W)],
        UNTOUCHED,
        0,
        "status outside",
    );

    // A chain that loops: 0 -> 1 -> 0.
    // No status byte can be known in a chain without an end: used len 0.
    let d = dev.raw(&[(HDR, 16, R | NEXT, 1), (STATUS, 1, W | NEXT, 0)], 0);
    assert_eq!((d.status, d.len), (UNTOUCHED, 0), "loop");
    dev.check_alive("loop");
    let d = dev.raw(&[(STATUS, 1, W | NEXT, 0)], 0);
    assert_eq!((d.status, d.len), (UNTOUCHED, 0), "self loop");
    dev.check_alive("self loop");

    // next index out of range, before and after the status descriptor.
    let d = dev.raw(&[(HDR, 16, R | NEXT, QSIZE + 3)], 0);
    assert_eq!((d.status, d.len), (UNTOUCHED, 0), "next out of range");
    dev.check_alive("next out of range");
    let d = dev.raw(&[(HDR, 16, R | NEXT, 1), (STATUS, 1, W | NEXT, 9999)], 0);
    assert_eq!(
        (d.status, d.len),
        (UNTOUCHED, 0),
        "next out of range after status"
    );
    dev.check_alive("next out of range after status");

    // A chain longer than any queue may be (the daemon's largest queue,
    // 256, bounds indirect tables: seg_max follows it), through an
    // indirect table.
    let mut long = vec![(HDR, 16, R)];
    long.extend((0..256).map(|i| (DATA + 512 * i, 512, W)));
    long.push(st);
    dev.descs_at(INDIRECT_TABLE, &Dev::linked(&long));
    let n = long.len() as u32;
    // The last byte the walk saw is guest data, not a status byte.
    let last_data = DATA + 512 * 256 - 1;
    dev.put(last_data, &[0xcc]);
    let d = dev.raw(&[(INDIRECT_TABLE, 16 * n, INDIRECT, 0)], 0);
    assert_eq!(
        (d.status, d.len),
        (UNTOUCHED, 0),
        "chain longer than the queue"
    );
    assert_eq!(dev.get(last_data, 1), [0xcc], "status written into data");
    dev.check_alive("long chain");
    // 256 in all is fine: header, seg_max (254) data segments, status.
    long.truncate(255);
    long.push(st);
    dev.descs_at(INDIRECT_TABLE, &Dev::linked(&long));
    let d = dev.raw(&[(INDIRECT_TABLE, 16 * 256, INDIRECT, 0)], 0);
    assert_eq!(
        (d.status, d.len),
        (OK, 254 * 512 + 1),
        "256-descriptor chain"
    );

    // Indirect tables: outside memory, bad length, nested, chained on.
    for (what, table) in [
        ("indirect outside", vec![(OUTSIDE, 48, INDIRECT, 0)]),
        ("indirect len 24", vec![(INDIRECT_TABLE, 24, INDIRECT, 0)]),
        ("indirect len 0", vec![(INDIRECT_TABLE, 0, INDIRECT, 0)]),
        (
            "indirect + next",
            vec![(INDIRECT_TABLE, 48, INDIRECT | NEXT, 1), (STATUS, 1, W, 0)],
        ),
    ] {
        dev.descs_at(INDIRECT_TABLE, &Dev::linked(&[(HDR, 16, R), st]));
        let d = dev.raw(&table, 0);
        assert_eq!((d.status, d.len), (UNTOUCHED, 0), "{what}");
        dev.check_alive(what);
    }
    dev.descs_at(INDIRECT_TABLE, &[(INDIRECT_TABLE + 0x100, 32, INDIRECT, 0)]);
    let d = dev.raw(
        &[(HDR, 16, R | NEXT, 1), (INDIRECT_TABLE, 16, INDIRECT, 0)],
        0,
    );
    assert_eq!((d.status, d.len), (UNTOUCHED, 0), "nested indirect");
    dev.check_alive("nested indirect");

    // Readable after writable; short header; no status; empty status.
    dev.header(VIRTIO_BLK_T_OUT, 0);
    dev.expect(
        &[(HDR, 16, R), st, (DATA, 512, R)],
        UNTOUCHED,
        0,
        "readable after writable",
    );
    dev.header(VIRTIO_BLK_T_IN, 0);
    dev.expect(
        &[(HDR, 12, R), (DATA, 512, W), st],
        IOERR,
        1,
        "12-byte header",
    );
    dev.expect(&[st], IOERR, 1, "no header");
    dev.expect(
        &[(HDR, 16, R), (DATA, 512, R)],
        UNTOUCHED,
        0,
        "no writable status",
    );
    dev.expect(
        &[(HDR, 16, R), (STATUS, 0, W)],
        UNTOUCHED,
        0,
        "status of length 0",
    );
    // A zero-length status after data: the last data byte becomes the
    // status, and the data is one byte short of a sector.
    let d = dev.chain(&[(HDR, 16, R), (STATUS - 511, 512, W), (DATA, 0, W)]);
    assert_eq!(
        (d.status, d.len),
        (IOERR, 1),
        "status of length 0 after data"
    );
    dev.check_alive("status of length 0 after data");

    // A head index beyond the queue in the avail ring: the daemon cannot
    // even report it, but the next request still completes normally.
    dev.offer(QSIZE + 1);
    dev.header(VIRTIO_BLK_T_FLUSH, 0);
    dev.descs_at(DESC + 16 * 5, &[(HDR, 16, R | NEXT, 6), (STATUS, 1, W, 0)]);
    dev.offer(5);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        fence(Ordering::SeqCst);
        let idx = u16::from_le_bytes(dev.get(USED + 2, 2).try_into().unwrap());
        if idx != dev.used_seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "request after a bad head never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let d = dev.reap();
    assert_eq!(
        d,
        Done {
            id: 5,
            len: 1,
            status: OK
        },
        "after a bad head"
    );
    dev.check_alive("bad head");
    assert!(daemon.alive());
}

#[test]
fn bad_requests_get_ioerr_or_unsupp() {
    let (dir, sock, mut daemon) = image_daemon(&[]);
    let mut dev = Dev::connect(&sock);
    let st = (STATUS, 1, W);
    let last = DISK / 512;

    for (sector, len, what) in [
        (last, 512, "sector at the end"),
        (last - 1, 1024, "across the end"),
        (u64::MAX / 256, 512, "sector * 512 overflows"),
    ] {
        dev.header(VIRTIO_BLK_T_IN, sector);
        dev.expect(&[(HDR, 16, R), (DATA, len, W), st], IOERR, 1, what);
        dev.header(VIRTIO_BLK_T_OUT, sector);
        dev.expect(&[(HDR, 16, R), (DATA, len, R), st], IOERR, 1, what);
    }
    dev.header(VIRTIO_BLK_T_IN, 0);
    dev.expect(
        &[(HDR, 16, R), (DATA, 100, W), st],
        IOERR,
        1,
        "100-byte read",
    );
    dev.header(VIRTIO_BLK_T_OUT, 0);
    dev.expect(
        &[(HDR, 16, R), (DATA, 513, R), st],
        IOERR,
        1,
        "513-byte write",
    );
    dev.header(VIRTIO_BLK_T_IN, 0);
    dev.expect(
        &[(HDR, 16, R), (DATA, 1 << 31, W), st],
        IOERR,
        1,
        "2 GiB read",
    );
    dev.expect(
        &[(HDR, 16, R), (DATA, u32::MAX, W), st],
        IOERR,
        1,
        "4 GiB read",
    );
    dev.expect(
        &[(HDR, 16, R), (DATA, 512, R), st],
        IOERR,
        1,
        "read with out data",
    );
    dev.header(VIRTIO_BLK_T_OUT, 0);
    dev.expect(
        &[(HDR, 16, R), (DATA, 512, W), st],
        IOERR,
        1,
        "write with in data",
    );

    for kind in [5, 99, 0x8000_0000] {
        dev.header(kind, 0);
        dev.expect(&[(HDR, 16, R), st], UNSUPP, 1, "unknown type");
    }

    // Discard: the UNMAP flag and reserved flags are unsupported; one
    // segment only.
    dev.header(VIRTIO_BLK_T_DISCARD, 0);
    for flags in [1, 2, 0x100] {
        dev.segment(HDR + 16, 8, 8, flags);
        dev.expect(&[(HDR, 32, R), st], UNSUPP, 1, "discard flags");
    }
    dev.segment(HDR + 16, 8, 8, 0);
    dev.segment(HDR + 32, 64, 8, 0);
    dev.expect(&[(HDR, 48, R), st], IOERR, 1, "discard with 2 segments");
    dev.expect(&[(HDR, 24, R), st], IOERR, 1, "discard with half a segment");
    dev.expect(&[(HDR, 16, R), st], IOERR, 1, "discard without segment");
    dev.segment(HDR + 16, last - 4, 8, 0);
    dev.expect(&[(HDR, 32, R), st], IOERR, 1, "discard past the end");
    dev.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dev.segment(HDR + 16, 8, 8, 2);
    dev.expect(&[(HDR, 32, R), st], UNSUPP, 1, "write-zeroes reserved flag");
    dev.segment(HDR + 16, last, 1, 0);
    dev.expect(&[(HDR, 32, R), st], IOERR, 1, "write-zeroes past the end");
    // Empty ranges are no-ops, not errors.
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        dev.header(kind, 0);
        dev.segment(HDR + 16, 44, 0, 0);
        dev.expect(&[(HDR, 32, R), st], OK, 1, "empty discard/write-zeroes");
    }

    // Good ones in odd framings: segment in its own descriptor, header
    // split in two, data and status in one descriptor, all indirect.
    dev.put(DATA, &[0x5a; 4096]);
    dev.header(VIRTIO_BLK_T_OUT, 40);
    dev.expect(&[(HDR, 16, R), (DATA, 4096, R), st], OK, 1, "write 0x5a");
    dev.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dev.segment(DATA + 0x10000, 41, 2, 0);
    dev.expect(
        &[(HDR, 16, R), (DATA + 0x10000, 16, R), st],
        OK,
        1,
        "write-zeroes",
    );
    dev.header(VIRTIO_BLK_T_DISCARD, 0);
    dev.segment(HDR + 16, 44, 2, 0);
    dev.expect(&[(HDR, 32, R), st], OK, 1, "discard");
    dev.header(VIRTIO_BLK_T_IN, 40);
    dev.put(STATUS - 4096, &[0xff; 4096]);
    let d = dev.chain(&[(HDR, 8, R), (HDR + 8, 8, R), (STATUS - 4096, 4097, W)]);
    assert_eq!((d.status, d.len), (OK, 4097), "split header, data+status");
    let got = dev.get(STATUS - 4096, 4096);
    assert!(got[..512].iter().all(|&b| b == 0x5a), "sector 40 written");
    assert!(
        got[512..1536].iter().all(|&b| b == 0),
        "sectors 41-42 zeroed"
    );
    assert!(got[1536..2048].iter().all(|&b| b == 0x5a), "sector 43 kept");
    dev.header(VIRTIO_BLK_T_FLUSH, 0);
    dev.descs_at(INDIRECT_TABLE, &Dev::linked(&[(HDR, 16, R), st]));
    let d = dev.raw(&[(INDIRECT_TABLE, 32, INDIRECT, 0)], 0);
    assert_eq!((d.status, d.len), (OK, 1), "indirect flush");

    // The write went to the image file.
    drop(dev);
    let f = File::open(dir.path().join("d.img")).unwrap();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 43 * 512).unwrap();
    assert_eq!(b, [0x5a; 512]);
    f.read_exact_at(&mut b, 41 * 512).unwrap();
    assert_eq!(b, [0; 512]);
    assert!(daemon.alive());
}

#[test]
fn get_id_returns_the_serial() {
    let (_dir, sock, _daemon) = image_daemon(&[]);
    let mut dev = Dev::connect(&sock);
    let st = (STATUS, 1, W);
    dev.header(VIRTIO_BLK_T_GET_ID, 0);
    let mut want = [0u8; 20];
    want[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    // Full 20-byte buffer: serial padded with zeroes.
    dev.put(DATA, &[0xff; 64]);
    dev.expect(&[(HDR, 16, R), (DATA, 20, W), st], OK, 21, "GET_ID");
    assert_eq!(dev.get(DATA, 20), want, "serial and padding");
    // Larger buffer: 20 bytes written, the rest left alone.
    dev.put(DATA, &[0xff; 64]);
    dev.expect(&[(HDR, 16, R), (DATA, 64, W), st], OK, 21, "GET_ID 64");
    assert_eq!(dev.get(DATA, 20), want);
    assert!(dev.get(DATA + 20, 44).iter().all(|&b| b == 0xff));
    // Short buffer: truncated.
    dev.put(DATA, &[0xff; 64]);
    dev.expect(&[(HDR, 16, R), (DATA, 8, W), st], OK, 9, "GET_ID short");
    assert_eq!(dev.get(DATA, 9), [&want[..8], &[0xff]].concat());
    // Split over two descriptors, status in the second.
    dev.put(DATA, &[0xff; 64]);
    let d = dev.chain(&[(HDR, 16, R), (DATA, 10, W), (DATA + 32, 10, W), st]);
    assert_eq!((d.status, d.len), (OK, 21));
    assert_eq!(dev.get(DATA, 10), want[..10]);
    assert_eq!(dev.get(DATA + 32, 10), want[10..]);
}

#[test]
fn read_only_disk_refuses_writes() {
    let (dir, sock, mut daemon) = image_daemon(&["--read-only"]);
    let before = fs::read(dir.path().join("d.img")).unwrap();
    let mut dev = Dev::connect(&sock);
    assert_ne!(dev.features & (1 << VIRTIO_BLK_F_RO), 0, "RO offered");
    let st = (STATUS, 1, W);
    dev.put(DATA, &[0x77; 4096]);
    dev.header(VIRTIO_BLK_T_OUT, 8);
    let d = dev.chain(&[(HDR, 16, R), (DATA, 4096, R), st]);
    assert_eq!((d.status, d.len), (IOERR, 1), "write");
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        dev.header(kind, 0);
        dev.segment(HDR + 16, 8, 8, 0);
        let d = dev.chain(&[(HDR, 32, R), st]);
        assert_eq!((d.status, d.len), (IOERR, 1), "type {kind}");
    }
    dev.header(VIRTIO_BLK_T_IN, 8);
    let d = dev.chain(&[(HDR, 16, R), (DATA, 4096, W), st]);
    assert_eq!((d.status, d.len), (OK, 4097), "read");
    assert!(dev.get(DATA, 4096).iter().all(|&b| b == 0));
    dev.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(dev.chain(&[(HDR, 16, R), st]).status, OK, "flush");
    drop(dev);
    assert!(fs::read(dir.path().join("d.img")).unwrap() == before);
    assert!(daemon.alive());
}

#[test]
fn config_space_and_features() {
    let (_dir, sock, _daemon) = image_daemon(&["--num-queues", "3", "--queue-size", "64"]);
    let mut dev = Dev::connect(&sock);
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_RING_F_EVENT_IDX,
        32, // VERSION_1
    ] {
        assert_ne!(dev.features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(dev.features & (1 << VIRTIO_BLK_F_RO), 0, "not read-only");
    let c = dev.config(0, 60);
    let le32 = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), DISK / 512);
    assert_eq!(le32(12), 62, "seg_max = queue size - 2");
    assert!(le32(20) >= 512 && le32(20).is_power_of_two(), "blk_size");
    assert_eq!(c[32], 1, "write cache on");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3, "num_queues");
    assert_eq!(le32(40), 1, "max_discard_seg");
    assert_eq!(dev.fe.get_queue_num().unwrap(), 3);
    // A read of just the capacity's high half.
    assert_eq!(dev.config(4, 4), [0; 4]);
}

#[test]
fn event_idx_signals_completions() {
    let (_dir, sock, _daemon) = image_daemon(&[]);
    let mut dev = Dev::connect(&sock);
    assert_ne!(dev.features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    let used_event = AVAIL + 4 + 2 * u64::from(QSIZE);
    dev.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = (STATUS, 1, W);
    for _ in 0..5 {
        // Ask for an interrupt at the next completion.
        let _ = dev.call.read();
        dev.put(used_event, &dev.used_seen.to_le_bytes());
        assert_eq!(dev.chain(&[(HDR, 16, R), st]).status, OK);
        wait_readable(&dev.call, "call eventfd after a completion");
    }
    // Ask for one only after ten more: none comes for the next one.
    let _ = dev.call.read();
    dev.put(used_event, &dev.used_seen.wrapping_add(10).to_le_bytes());
    assert_eq!(dev.chain(&[(HDR, 16, R), st]).status, OK);
    std::thread::sleep(Duration::from_millis(50));
    assert!(dev.call.read().is_err(), "signalled against used_event");

    // Without EVENT_IDX every batch signals.
    drop(dev);
    let mut dev = Dev::connect_with(&sock, 1 << VIRTIO_RING_F_EVENT_IDX);
    dev.header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..3 {
        let _ = dev.call.read();
        assert_eq!(dev.chain(&[(HDR, 16, R), st]).status, OK);
        wait_readable(&dev.call, "call eventfd without EVENT_IDX");
    }
}

/// Runs `f` on its own thread; fails the test if it takes longer than 5 s
/// (a daemon that stops answering would otherwise hang the test forever).
fn within_5s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what}: no answer within 5 s"))
}

fn wait_readable(fd: &EventFd, what: &str) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(n, 1, "{what}: not signalled");
}

/// Runs `bad` on a fresh connection; the daemon must nack or drop it, and
/// then serve the next frontend normally.
fn then_serves_next(sock: &Path, daemon: &mut Daemon, what: &str) {
    assert!(daemon.alive(), "daemon died after {what}");
    let mut c = Client::connect_retry(sock, 1);
    fill_pattern(c.buf(0, 4096), 1, 0);
    assert_eq!(c.write(0, 0, 0, 4096), 0, "after {what}");
    assert_eq!(c.read(0, 0, 4096, 4096), 0, "after {what}");
    assert!(c.buf(0, 4096).to_vec() == c.buf(4096, 4096));
}

#[test]
fn bad_vhost_user_messages_drop_only_that_connection() {
    let (_dir, sock, mut daemon) = image_daemon(&[]);
    let setup = |sock: &Path| {
        let mut fe = frontend(sock);
        let (_, ram) = Dev::negotiate(&mut fe, 0);
        (fe, ram)
    };

    let (fe, _ram) = setup(&sock);
    assert!(fe.set_vring_num(5, 16).is_err(), "vring index out of range");
    drop(fe);
    then_serves_next(&sock, &mut daemon, "bad vring index");

    for num in [100, 512, 0] {
        let (fe, _ram) = setup(&sock);
        assert!(fe.set_vring_num(0, num).is_err(), "SET_VRING_NUM {num}");
        drop(fe);
        then_serves_next(&sock, &mut daemon, "bad vring size");
    }

    let (fe, ram) = setup(&sock);
    fe.set_vring_num(0, QSIZE).unwrap();
    let cfg = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: 0x1000, // not in any region
        used_ring_addr: ram.host() + USED,
        avail_ring_addr: ram.host() + AVAIL,
        log_addr: None,
    };
    assert!(fe.set_vring_addr(0, &cfg).is_err(), "unmapped ring");
    drop(fe);
    then_serves_next(&sock, &mut daemon, "unmapped ring address");

    let (fe, _ram) = setup(&sock);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(fe.set_vring_kick(40, &kick).is_err(), "kick for vring 40");
    drop(fe);
    then_serves_next(&sock, &mut daemon, "bad kick index");

    // Garbage on the socket, short and long.
    for garbage in [&b"\x01"[..], &[0xa5; 4096][..], b"GET / HTTP/1.1\r\n\r\n"] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(garbage).unwrap();
        drop(s);
        then_serves_next(&sock, &mut daemon, "garbage");
    }
    // A header announcing a huge body, then nothing.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
    hdr.extend_from_slice(&1u32.to_le_bytes());
    hdr.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
    s.write_all(&hdr).unwrap();
    drop(s);
    then_serves_next(&sock, &mut daemon, "huge size");
}

#[test]
fn a_waiting_frontend_does_not_stall_the_current_one() {
    let (_dir, sock, mut daemon) = image_daemon(&[]);
    for round in 0..3 {
        let first = Frontend::connect(&sock, 1).unwrap();
        first.set_owner().unwrap();
        first.get_features().unwrap();
        // A second frontend connects while the first is being served: it
        // waits in the listen backlog. The first must still get answers.
        let waiting = UnixStream::connect(&sock).unwrap();
        let first = within_5s("current frontend with one waiting", move || {
            first.get_features().unwrap();
            first
        });
        // And once the first leaves, the waiting one is served.
        drop(first);
        within_5s("waiting frontend after the first left", move || {
            Frontend::from_stream(waiting, 1).get_features().unwrap()
        });
        assert!(daemon.alive(), "round {round}");
    }
    then_serves_next(&sock, &mut daemon, "two frontends");
}
