//! Shared test helpers: the real `vublk` binary on a real unix socket, and a
//! real third-party vhost-user-blk frontend (libblkio) to drive it.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
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

    fn ptr(&self, off: usize) -> *mut u8 {
        (self.region.addr + off) as *mut u8
    }

    /// Waits for one completion on queue `q`; returns its result (0 or -errno).
    pub fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(30);
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "request timed out");
        // SAFETY: do_io initialised `n` completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].write(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.wait(q)
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
