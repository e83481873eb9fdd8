//! `ferroblk_mode=vhost`: fio as a vhost-user-blk front-end through libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate), against any back-end socket (ferroblk,
//! qemu-storage-daemon, SPDK).
//!
//! `--filename=/path/to/vhost.sock`. Each fio thread connects on its own, with one polled
//! virtqueue of at least `iodepth` requests. fio's io_u buffers are allocated by the engine
//! (`iomem_alloc`) in a libblkio memory region that the back-end maps (vhost-user shares guest
//! memory), so the back-end reads and writes fio's buffers directly: no copy. `getevents` polls
//! the used ring with `do_io` (no interrupt, no system call while the back-end keeps up).

use std::mem::MaybeUninit;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use crate::{Backend, Error, Op, Submit, Volume};

/// libblkio's driver for a vhost-user-blk back-end reached through a Unix socket.
const DRIVER: &str = "virtio-blk-vhost-user";

fn connect(socket: &str) -> Result<(Blkio, Volume), Error> {
    let fail = |what: &str, e: blkio::Error| Error::Open {
        what: format!("vhost-user socket {socket}"),
        reason: format!("{what}: {e}"),
    };
    if !std::path::Path::new(socket).exists() {
        return Err(Error::Open {
            what: format!("vhost-user socket {socket}"),
            reason: "no such file (is the back-end running?)".into(),
        });
    }
    let mut b = Blkio::new(DRIVER).map_err(|e| fail("libblkio", e))?;
    b.set_str("path", socket).map_err(|e| fail("set path", e))?;
    b.connect().map_err(|e| fail("connect", e))?;
    let size = b.get_u64("capacity").map_err(|e| fail("capacity", e))?;
    let block_size = b
        .get_i32("request-alignment")
        .map_err(|e| fail("request-alignment", e))? as u64;
    let max = b
        .get_i32("max-transfer")
        .map_err(|e| fail("max-transfer", e))?;
    let max_transfer = if max > 0 {
        max as u64
    } else {
        ferroblk_bdev::MAX_EXPORT_IO_BYTES
    };
    Ok((
        b,
        Volume {
            size,
            block_size: block_size.max(1),
            max_transfer,
        },
    ))
}

/// The back-end's volume (fio's main process): connects, reads the capacity, disconnects.
pub fn probe(socket: &str) -> Result<Volume, Error> {
    connect(socket).map(|(_, v)| v)
}

/// One fio thread's libblkio connection and queue.
pub struct VhostBackend {
    // Declared first: the queue goes before the instance that owns the connection.
    queue: Blkioq,
    region: Option<MemoryRegion>,
    b: Blkio,
    volume: Volume,
    depth: usize,
    in_flight: usize,
    completions: Vec<MaybeUninit<Completion>>,
}

impl VhostBackend {
    /// Connects to `socket` with one queue for `depth` requests.
    pub fn open(socket: &str, depth: usize) -> Result<VhostBackend, Error> {
        let (mut b, volume) = connect(socket)?;
        let fail = |what: &str, e: blkio::Error| Error::Open {
            what: format!("vhost-user socket {socket}"),
            reason: format!("{what}: {e}"),
        };
        b.set_i32("num-queues", 1)
            .map_err(|e| fail("set num-queues", e))?;
        // A split-ring request takes up to three descriptors (header, data, status).
        let queue_size = (depth * 3).next_power_of_two().clamp(256, 32768);
        b.set_i32("queue-size", queue_size as i32)
            .map_err(|e| fail("set queue-size", e))?;
        let queue = match b.start() {
            Ok(mut o) => o.queues.remove(0),
            Err(e) if e.errno() == blkio::Errno::ROFS => {
                return Err(Error::Open {
                    what: format!("vhost-user socket {socket}"),
                    reason: "the export is read-only (qemu-storage-daemon: writable=on)".into(),
                });
            }
            Err(e) => return Err(fail("start", e)),
        };
        Ok(VhostBackend {
            queue,
            region: None,
            b,
            volume,
            depth,
            in_flight: 0,
            completions: std::iter::repeat_with(MaybeUninit::uninit)
                .take(depth.max(1))
                .collect(),
        })
    }

    /// Submits what was queued (one kick) and takes what completed, without waiting.
    fn step(&mut self, out: &mut Vec<(u64, i32)>) -> Result<usize, Error> {
        let n = self
            .queue
            .do_io(&mut self.completions, 0, None, None)
            .map_err(|e| Error::Io(format!("vhost-user queue: {e}")))?;
        for c in &self.completions[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data as u64, -c.ret));
        }
        self.in_flight -= n;
        Ok(n)
    }
}

impl Backend for VhostBackend {
    unsafe fn submit(&mut self, op: Op, offset: u64, buf: *mut u8, len: usize, tag: u64) -> Submit {
        if self.in_flight >= self.depth {
            return Submit::Busy;
        }
        let q = &mut self.queue;
        let ud = tag as usize;
        match op {
            // `buf` lies in the mapped region (`alloc_io_memory`), which the back-end reads or
            // writes until the completion.
            Op::Read => q.read(offset, buf, len, ud, ReqFlags::empty()),
            Op::Write => q.write(offset, buf, len, ud, ReqFlags::empty()),
            Op::Trim => q.discard(offset, len as u64, ud, ReqFlags::empty()),
            Op::Flush => q.flush(ud, ReqFlags::empty()),
        }
        self.in_flight += 1;
        Submit::Queued
    }

    fn poll(&mut self, out: &mut Vec<(u64, i32)>) -> Result<usize, Error> {
        self.step(out)
    }

    fn volume(&self) -> Volume {
        self.volume
    }

    fn alloc_io_memory(&mut self, len: usize) -> Result<Option<*mut u8>, Error> {
        let fail = |what: &str, e: blkio::Error| Error::Io(format!("vhost-user {what}: {e}"));
        let align = (self
            .b
            .get_u64("mem-region-alignment")
            .map_err(|e| fail("mem-region-alignment", e))? as usize)
            .max(4096);
        let region = self
            .b
            .alloc_mem_region(len.div_ceil(align) * align)
            .map_err(|e| fail("alloc_mem_region", e))?;
        self.b
            .map_mem_region(&region)
            .map_err(|e| fail("map_mem_region", e))?;
        let p = region.addr as *mut u8;
        self.region = Some(region);
        Ok(Some(p))
    }
}

impl Drop for VhostBackend {
    fn drop(&mut self) {
        if let Some(r) = self.region.take() {
            self.b.unmap_mem_region(&r);
            self.b.free_mem_region(&r);
        }
    }
}
