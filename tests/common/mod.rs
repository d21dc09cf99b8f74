//! Shared test helpers: the real `vublk` binary on a real unix socket, and a
//! real third-party vhost-user-blk frontend (libblkio) to drive it.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A running `vublk` process; SIGTERM and reaped on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(socket: &Path, args: &[&str]) -> Daemon {
        Self::try_start(socket, args).expect("vublk did not start")
    }

    pub fn try_start(socket: &Path, args: &[&str]) -> Result<Daemon, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vublk"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("vublk exited early: {status}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("socket did not appear".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Daemon {
            child,
            socket: socket.to_owned(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let status = self.child.wait().expect("wait for vublk");
        std::mem::forget(self);
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libblkio virtio-blk-vhost-user frontend with one buffer region.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub blkio: Blkio,
}

pub const REGION: usize = 16 << 20;

impl Client {
    pub fn connect(socket: &Path, num_queues: i32) -> Result<Client, blkio::Error> {
        Self::connect_opts(socket, num_queues, false)
    }

    /// Connects with `read-only` set as given (libblkio refuses to start on
    /// a device that offers VIRTIO_BLK_F_RO unless it is set).
    pub fn connect_opts(
        socket: &Path,
        num_queues: i32,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let outcome = b.start()?;
        let region = b.alloc_mem_region(REGION)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            queues: outcome.queues,
            region,
            blkio: b,
        })
    }

    /// Connects, retrying while the daemon is still busy with the previous
    /// frontend (it serves one at a time).
    pub fn connect_retry(socket: &Path, num_queues: i32) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::connect(socket, num_queues) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cannot connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// Buffer at `off` bytes into the region.
    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= REGION);
        // SAFETY: the region is `REGION` bytes of our own mapping, alive while
        // `self` is.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    /// One queue with the region's base address, for use on its own thread.
    pub fn queue_refs(&mut self) -> Vec<Queue<'_>> {
        let base = self.region.addr;
        self.queues.iter_mut().map(|q| Queue { q, base }).collect()
    }

    fn queue(&mut self, q: usize) -> Queue<'_> {
        Queue {
            q: &mut self.queues[q],
            base: self.region.addr,
        }
    }

    /// Waits for one completion on queue `q`; returns its result (0 or -errno).
    pub fn wait(&mut self, q: usize) -> i32 {
        self.queue(q).wait()
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        self.queue(q).read(offset, buf_off, len)
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        self.queue(q).write(offset, buf_off, len)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queue(q).flush()
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queue(q).discard(offset, len)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        self.queue(q).write_zeroes(offset, len, unmap)
    }
}

/// One libblkio queue and the buffer region it uses (`Send`: one per thread).
pub struct Queue<'a> {
    pub q: &'a mut Blkioq,
    base: usize,
}

impl Queue<'_> {
    fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= REGION);
        (self.base + off) as *mut u8
    }

    /// Buffer at `off` bytes into the region. The caller keeps the ranges
    /// that threads use apart.
    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= REGION);
        // SAFETY: inside the client's mapped region; each thread uses its
        // own disjoint range of it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(off), len) }
    }

    /// Waits for one completion; returns its result (0 or -errno).
    pub fn wait(&mut self) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(30);
        let n = self
            .q
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "request timed out");
        // SAFETY: do_io initialised `n` completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    pub fn read(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.q.read(offset, p, len, 0, ReqFlags::empty());
        self.wait()
    }

    pub fn write(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.q.write(offset, p, len, 0, ReqFlags::empty());
        self.wait()
    }

    /// Queues a write without waiting for it.
    pub fn submit_write(&mut self, offset: u64, buf_off: usize, len: usize, tag: usize) {
        let p = self.ptr(buf_off);
        self.q.write(offset, p, len, tag, ReqFlags::empty());
    }

    pub fn flush(&mut self) -> i32 {
        self.q.flush(0, ReqFlags::empty());
        self.wait()
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        self.wait()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, 0, flags);
        self.wait()
    }
}

/// A deterministic pattern unique to (seed, offset) for write/verify.
pub fn fill_pattern(buf: &mut [u8], seed: u64, disk_offset: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let v = (disk_offset + 8 * i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(seed);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A scratch directory on a disk file system (the target directory), not on
/// /tmp, which may be tmpfs: discard tests need punch-hole and real blocks.
pub fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vublk-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create scratch dir")
}

/// Bytes the file system has allocated to `path` (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Runs `vublk` with `args` to completion (it must exit by itself within
/// 10 s) with logging off; returns its output.
pub fn run_vublk(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vublk"))
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vublk");
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vublk {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("vublk output")
}

/// A loop device over an image file; detached on drop, even after a panic.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `image` with the given logical sector size. `Err` says why
    /// it could not (no losetup, no permission, no loop support).
    pub fn attach(image: &Path, sector_size: u32) -> Result<LoopDevice, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off", "--sector-size"])
            .arg(sector_size.to_string())
            .arg(image)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !path.exists() {
            return Err(format!("losetup printed {}", path.display()));
        }
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
