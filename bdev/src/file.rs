//! `file`: a bdev on a regular file or a block device (a local NVMe SSD is used through its block
//! device path), driven by the reactor's io_uring.
//!
//! - Reads and writes go to an `O_DIRECT` descriptor when the request's buffers and offset are
//!   aligned to what the device needs, and to a buffered descriptor otherwise (the kernel keeps
//!   the two coherent: direct I/O writes back and invalidates the page-cache range it touches).
//! - Flush is a real `fdatasync` (which also flushes the device's volatile cache).
//! - Unmap punches a hole (`FALLOC_FL_PUNCH_HOLE`); write-zeroes uses `FALLOC_FL_ZERO_RANGE`,
//!   falling back to punching a hole, then to writing zeroes, where the file system lacks it.
//! - Short transfers are continued until the whole request is done.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, types};

use crate::bdev::{Bdev, BdevInfo, Channel, ChannelOps, IoCompletion, IoRequest, Wake};
use crate::buf::{AlignedBuf, IoSeg};
use crate::error::BdevError;
use crate::types::{BlockSize, Caps, IoStatus, IoType};
use crate::uring::{RingClient, ThreadRing};

/// Requests a file channel keeps in flight.
pub const FILE_CHANNEL_DEPTH: usize = 256;
/// Most segments per request (the kernel's `IOV_MAX` is 1024).
const FILE_MAX_SEGMENTS: u32 = 256;
const ZERO_CHUNK: usize = 1 << 20;

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// When to use `O_DIRECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectMode {
    /// `O_DIRECT` for aligned requests where the file system supports it; buffered otherwise.
    #[default]
    Auto,
    /// `O_DIRECT` required: opening fails where it is not supported.
    Always,
    /// Always through the page cache.
    Never,
}

/// How to open a file bdev.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// Regular file or block device.
    pub path: PathBuf,
    /// Logical block size.
    pub block_size: BlockSize,
    /// Size in bytes: required to create a file; checked against an existing one.
    pub size: Option<u64>,
    /// Create the file (and its directory) if it is missing.
    pub create: bool,
    /// `O_DIRECT` policy.
    pub direct: DirectMode,
    /// Open read-only.
    pub read_only: bool,
}

struct FileShared {
    path: PathBuf,
    buffered: OwnedFd,
    direct: Option<OwnedFd>,
    dio_align: usize,
    block_device: bool,
}

/// A bdev on a regular file or block device.
pub struct FileBdev {
    info: Arc<BdevInfo>,
    shared: Arc<FileShared>,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> BdevError {
    BdevError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn open(path: &Path, read_only: bool, flags: i32) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(path)
}

/// Takes a whole-file open-file-description lock on `f` (shared when read-only), without waiting.
fn ofd_lock(f: &File, read_only: bool) -> std::io::Result<()> {
    // SAFETY: `flock` is plain data; all-zero is a valid value (whole file from offset 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads one `flock` through a valid pointer, on a descriptor `f` owns.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl as *const libc::flock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// How long opening waits for an image's locks: a process killed with I/O in flight holds
/// them until the kernel has finished that I/O (milliseconds), and a restarted daemon should
/// wait for it rather than fail; a live owner keeps them and the open fails after this.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Tries `take` until it succeeds or [`LOCK_WAIT`] passes; the error of the last try.
fn retry_lock(mut take: impl FnMut() -> bool) -> Result<(), std::io::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        if take() {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if std::time::Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The size of an open regular file or block device, its logical sector size, and whether it
/// is a block device.
fn device_size(f: &File, path: &Path) -> Result<(u64, u64, bool), BdevError> {
    let meta = f.metadata().map_err(|e| io_err("stat", path, e))?;
    let block_device = meta.file_type().is_block_device();
    if block_device {
        let mut size: u64 = 0;
        let mut sector: libc::c_int = 0;
        // SAFETY: both ioctls write one integer of the given type through a valid pointer.
        let r = unsafe {
            libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64)
                | libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut sector as *mut libc::c_int)
        };
        if r != 0 {
            return Err(io_err(
                "query size of",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok((size, sector.max(512) as u64, true))
    } else if meta.file_type().is_file() {
        Ok((meta.len(), 512, false))
    } else {
        Err(BdevError::invalid(
            "path",
            format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ),
        ))
    }
}

/// The bdev's size in bytes from the declared `size` and what the file or device holds.
fn checked_size(
    o: &FileOptions,
    dev_size: u64,
    sector: u64,
    block_device: bool,
) -> Result<u64, BdevError> {
    let bs = u64::from(o.block_size.bytes());
    if bs < sector {
        return Err(BdevError::invalid(
            "block_size",
            format!("{bs} is smaller than the device's logical sector size {sector}"),
        ));
    }
    let size = match o.size {
        Some(size) if block_device && size > dev_size => {
            return Err(BdevError::invalid(
                "size",
                format!("{size} bytes is larger than the device ({dev_size} bytes)"),
            ));
        }
        Some(size) if !block_device && size != dev_size => {
            return Err(BdevError::invalid(
                "size",
                format!(
                    "{} is {dev_size} bytes but size = {size} (set size to the file's size, \
                     or leave it out to use the whole file)",
                    o.path.display()
                ),
            ));
        }
        Some(size) => size,
        None => dev_size - dev_size % bs,
    };
    if size < bs {
        return Err(BdevError::invalid(
            "size",
            format!("{} holds less than one block", o.path.display()),
        ));
    }
    Ok(size)
}

/// What opening checks before it creates the file: `size` against the block size, and a
/// missing file without `create` (or without a `size` to create it with).
fn check_declared(o: &FileOptions) -> Result<bool, BdevError> {
    let bs = u64::from(o.block_size.bytes());
    if let Some(size) = o.size
        && (size == 0 || size % bs != 0)
    {
        return Err(BdevError::invalid(
            "size",
            format!("{size} bytes is not a positive multiple of block_size {bs}"),
        ));
    }
    let exists = o.path.exists();
    if !exists {
        if !o.create {
            return Err(BdevError::invalid(
                "path",
                format!(
                    "{} does not exist (set create = true to create it)",
                    o.path.display()
                ),
            ));
        }
        if o.size.is_none() {
            return Err(BdevError::invalid("size", "required to create a file"));
        }
    }
    Ok(exists)
}

impl FileBdev {
    /// Runs every check [`FileBdev::open`] runs without creating, locking or changing
    /// anything: the declared size and block size, a missing file without `create`, the file
    /// type, access in the declared mode, and an existing file's size against `size`.
    pub fn check(o: &FileOptions) -> Result<(), BdevError> {
        if !check_declared(o)? {
            return Ok(());
        }
        let f = open(&o.path, o.read_only, 0).map_err(|e| io_err("open", &o.path, e))?;
        let (dev_size, sector, block_device) = device_size(&f, &o.path)?;
        checked_size(o, dev_size, sector, block_device).map(|_| ())
    }

    /// Opens (or creates) the file or device.
    pub fn open(name: &str, o: &FileOptions) -> Result<FileBdev, BdevError> {
        let bs = u64::from(o.block_size.bytes());
        if !check_declared(o)? {
            let Some(size) = o.size else {
                return Err(BdevError::invalid("size", "required to create a file"));
            };
            if let Some(dir) = o.path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))?;
            }
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&o.path)
                .map_err(|e| io_err("create", &o.path, e))?;
            f.set_len(size)
                .map_err(|e| io_err("set size of", &o.path, e))?;
            tracing::info!(path = %o.path.display(), size, "created backing file");
        }
        let buffered = open(&o.path, o.read_only, 0).map_err(|e| io_err("open", &o.path, e))?;
        // Two daemons (or two bdevs) writing one image corrupt it: take an exclusive advisory
        // lock, shared when read-only.
        let mode = if o.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        let fd = buffered.as_raw_fd();
        let try_flock = || {
            // SAFETY: flock on a descriptor this function owns.
            unsafe { libc::flock(fd, mode | libc::LOCK_NB) == 0 }
        };
        if let Err(e) = retry_lock(try_flock) {
            return Err(BdevError::invalid(
                "path",
                format!(
                    "{} is in use by another bdev or process ({e})",
                    o.path.display()
                ),
            ));
        }
        let (dev_size, sector, block_device) = device_size(&buffered, &o.path)?;
        let size = checked_size(o, dev_size, sector, block_device)?;
        let direct = match o.direct {
            DirectMode::Never => None,
            mode => match open(&o.path, o.read_only, libc::O_DIRECT) {
                Ok(f) => {
                    // The flock above belongs to the buffered descriptor only. A process killed
                    // with direct writes in flight closes its descriptors (releasing that lock)
                    // while io_uring still holds the direct one and completes those writes later:
                    // without a lock of its own, a new opener would see them land after it read
                    // the image. An OFD lock (independent of flock, released only when the last
                    // reference to this descriptor, an in-flight request's included, is gone)
                    // makes the new opener wait for them.
                    if let Err(e) = retry_lock(|| ofd_lock(&f, o.read_only).is_ok()) {
                        return Err(BdevError::invalid(
                            "path",
                            format!(
                                "{} is in use by another bdev or process ({e})",
                                o.path.display()
                            ),
                        ));
                    }
                    Some(OwnedFd::from(f))
                }
                Err(e) if mode == DirectMode::Always => {
                    return Err(io_err("open with O_DIRECT", &o.path, e));
                }
                Err(e) => {
                    tracing::info!(path = %o.path.display(), error = %e,
                        "O_DIRECT unavailable; using the page cache");
                    None
                }
            },
        };
        let dio_align = dio_alignment(&direct, sector as usize);
        let caps = Caps::ALL_IO
            | Caps::RETAINS_DATA
            | Caps::UNMAP_READS_ZEROES
            | Caps::PERSISTENT
            | Caps::VOLATILE_CACHE;
        let info = BdevInfo::builder(name, "file", o.block_size, size / bs, caps)
            .buf_align(dio_align as u32)
            .max_segments(FILE_MAX_SEGMENTS)
            .read_only(o.read_only)
            .build();
        Ok(FileBdev {
            info,
            shared: Arc::new(FileShared {
                path: o.path.clone(),
                buffered: OwnedFd::from(buffered),
                direct,
                dio_align,
                block_device,
            }),
        })
    }
}

/// The memory and offset alignment direct I/O needs, from `statx(STATX_DIOALIGN)` where the
/// kernel reports it.
fn dio_alignment(direct: &Option<OwnedFd>, sector: usize) -> usize {
    let Some(fd) = direct else { return sector };
    // SAFETY: statx on an open descriptor with an empty path writes only into `stx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the path is a valid C string.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        (stx.stx_dio_mem_align.max(stx.stx_dio_offset_align) as usize).max(sector)
    } else {
        4096.max(sector)
    }
}

impl Bdev for FileBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let ring = ThreadRing::current()?;
        let client = ring.register(FILE_CHANNEL_DEPTH * 2);
        let slots = (0..FILE_CHANNEL_DEPTH).map(|_| Slot::default()).collect();
        let ops = FileChannel {
            shared: self.shared.clone(),
            client,
            slots,
            free: (0..FILE_CHANNEL_DEPTH as u32).rev().collect(),
            shift: self.info.block_size().shift(),
            zeroes: None,
            outstanding: 0,
            overflow: Vec::with_capacity(FILE_CHANNEL_DEPTH * 2),
        };
        Ok(Channel::new(
            self.info.clone(),
            Box::new(ops),
            FILE_CHANNEL_DEPTH,
        ))
    }

    fn resize(&self, new_blocks: u64) -> Result<(), BdevError> {
        if self.shared.block_device {
            return Err(BdevError::Unsupported {
                what: "resize of a block device (its size is the device's)".into(),
            });
        }
        let old = self.info.block_count();
        if new_blocks < old {
            return Err(BdevError::invalid(
                "size",
                "shrinking a file bdev would discard data; only growing is supported",
            ));
        }
        let bytes = self.info.block_size().to_bytes(new_blocks);
        // SAFETY: ftruncate on a descriptor this bdev owns.
        if unsafe { libc::ftruncate(self.shared.buffered.as_raw_fd(), bytes as i64) } != 0 {
            return Err(io_err(
                "set size of",
                &self.shared.path,
                std::io::Error::last_os_error(),
            ));
        }
        self.info.set_block_count(new_blocks);
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.shared.path,
            "block_device": self.shared.block_device,
            "direct": self.shared.direct.is_some(),
            "dio_align": self.shared.dio_align,
        })
    }
}

/// Progress of a write-zeroes request through its fallbacks.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ZeroStage {
    #[default]
    ZeroRange,
    PunchHole,
    Write,
}

#[derive(Default)]
struct Slot {
    io: Option<IoRequest>,
    /// Bytes of the request done so far (short transfers continue from here).
    done: usize,
    /// Iovecs of a continued transfer (built only after a short transfer).
    iov: Vec<IoSeg>,
    stage: ZeroStage,
}

struct FileChannel {
    shared: Arc<FileShared>,
    client: RingClient,
    slots: Vec<Slot>,
    free: Vec<u32>,
    shift: u32,
    zeroes: Option<AlignedBuf>,
    outstanding: usize,
    /// Completions beyond one poll's batch (sized for every SQE the channel can have out, so
    /// it never grows on the I/O path).
    overflow: Vec<(u32, i32)>,
}

impl FileChannel {
    /// Builds and queues the next SQE for `slot`. Returns false if the ring is full.
    fn issue(&mut self, slot: u32) -> bool {
        let s = &mut self.slots[slot as usize];
        let io = s.io.as_ref().expect("slot in use");
        let off = (io.offset_blocks << self.shift) + s.done as u64;
        let total = (u64::from(io.num_blocks) << self.shift) as usize;
        let buffered = types::Fd(self.shared.buffered.as_raw_fd());
        let sqe = match io.io_type {
            IoType::Read | IoType::Write => {
                let aligned = (off as usize).is_multiple_of(self.shared.dio_align)
                    && io.bufs.is_aligned(self.shared.dio_align);
                let fd = match &self.shared.direct {
                    Some(d) if aligned => types::Fd(d.as_raw_fd()),
                    _ => buffered,
                };
                let segs: &[IoSeg] = if s.done == 0 {
                    io.bufs.segments()
                } else {
                    s.iov.clear();
                    let mut skip = s.done;
                    for seg in io.bufs.segments() {
                        if skip >= seg.len {
                            skip -= seg.len;
                            continue;
                        }
                        s.iov.push(IoSeg {
                            // SAFETY: `skip < seg.len`, so the pointer stays in the segment.
                            base: unsafe { seg.base.add(skip) },
                            len: seg.len - skip,
                        });
                        skip = 0;
                    }
                    &s.iov
                };
                let read = io.io_type == IoType::Read;
                if segs.len() == 1 {
                    let (p, l) = (segs[0].base, segs[0].len as u32);
                    if read {
                        opcode::Read::new(fd, p, l).offset(off).build()
                    } else {
                        opcode::Write::new(fd, p, l).offset(off).build()
                    }
                } else {
                    let iov = segs.as_ptr().cast::<libc::iovec>();
                    let n = segs.len() as u32;
                    if read {
                        opcode::Readv::new(fd, iov, n).offset(off).build()
                    } else {
                        opcode::Writev::new(fd, iov, n).offset(off).build()
                    }
                }
            }
            IoType::Flush => opcode::Fsync::new(buffered)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoType::Unmap => opcode::Fallocate::new(buffered, total as u64)
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoType::WriteZeroes => match s.stage {
                ZeroStage::ZeroRange => opcode::Fallocate::new(buffered, total as u64)
                    .offset(off)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
                ZeroStage::PunchHole => opcode::Fallocate::new(buffered, total as u64)
                    .offset(off)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
                ZeroStage::Write => {
                    let z = self
                        .zeroes
                        .get_or_insert_with(|| AlignedBuf::new(ZERO_CHUNK));
                    let len = (total - s.done).min(ZERO_CHUNK) as u32;
                    opcode::Write::new(buffered, z.as_mut_ptr(), len)
                        .offset(off)
                        .build()
                }
            },
        };
        // SAFETY: the buffers and iovecs belong to the request kept in `self.slots[slot]`, whose
        // storage never moves (the Vec is never resized) and which is only released after this
        // SQE's completion; the zero buffer and descriptors live as long as the channel, which
        // waits for every outstanding SQE before it is dropped.
        unsafe { self.client.push(sqe, slot) }
    }

    /// Handles one CQE; returns the finished request, if it finished.
    fn complete(&mut self, slot: u32, res: i32) -> Option<IoCompletion> {
        self.outstanding -= 1;
        let s = &mut self.slots[slot as usize];
        let io = s.io.as_ref().expect("completion for a free slot");
        let total = (u64::from(io.num_blocks) << self.shift) as usize;
        let status = match io.io_type {
            IoType::Read | IoType::Write | IoType::WriteZeroes
                if res > 0
                    && (io.io_type != IoType::WriteZeroes || s.stage == ZeroStage::Write) =>
            {
                s.done += res as usize;
                if s.done < total {
                    return self.resubmit(slot);
                }
                IoStatus::Success
            }
            IoType::Read | IoType::Write if res == 0 => IoStatus::MediaError,
            // A zeroing write that wrote nothing (fallocate's 0 is its success).
            IoType::WriteZeroes if res == 0 && s.stage == ZeroStage::Write => IoStatus::MediaError,
            IoType::WriteZeroes if res < 0 && s.stage != ZeroStage::Write => {
                let errno = -res;
                if matches!(errno, libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY) {
                    s.stage = if s.stage == ZeroStage::ZeroRange {
                        ZeroStage::PunchHole
                    } else {
                        ZeroStage::Write
                    };
                    return self.resubmit(slot);
                }
                IoStatus::from_errno(errno)
            }
            _ if res < 0 => IoStatus::from_errno(-res),
            _ => IoStatus::Success,
        };
        if status != IoStatus::Success {
            tracing::debug!(path = %self.shared.path.display(), errno = -res, %status, "file I/O failed");
        }
        let s = &mut self.slots[slot as usize];
        let io = s.io.take().expect("slot in use");
        s.done = 0;
        s.stage = ZeroStage::ZeroRange;
        self.free.push(slot);
        Some(io.complete(status))
    }

    fn resubmit(&mut self, slot: u32) -> Option<IoCompletion> {
        if self.issue(slot) {
            self.outstanding += 1;
            return None;
        }
        // The ring stayed full even after a flush: fail the request rather than lose it.
        let s = &mut self.slots[slot as usize];
        let io = s.io.take().expect("slot in use");
        s.done = 0;
        s.stage = ZeroStage::ZeroRange;
        self.free.push(slot);
        Some(io.complete(IoStatus::Aborted))
    }
}

impl ChannelOps for FileChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        let Some(slot) = self.free.pop() else {
            return Err(io);
        };
        self.slots[slot as usize].io = Some(io);
        if self.issue(slot) {
            self.outstanding += 1;
            Ok(())
        } else {
            self.free.push(slot);
            Err(self.slots[slot as usize].io.take().expect("just stored"))
        }
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let mut cqes: [(u32, i32); 64] = [(0, 0); 64];
        let mut total = 0;
        loop {
            // Gather a batch first: completing a CQE may push a continuation SQE.
            let mut n = 0;
            // `poll` drains everything routed to us (on a reactor, the reactor routed it this
            // turn); keep only what fits and re-queue nothing: the batch buffer is large enough
            // for the common case, the rest is handled inline.
            let mut overflow = std::mem::take(&mut self.overflow);
            overflow.clear();
            self.client.poll(|slot, res, _| {
                if n < cqes.len() {
                    cqes[n] = (slot, res);
                    n += 1;
                } else {
                    overflow.push((slot, res));
                }
            });
            if n == 0 {
                self.overflow = overflow;
                break;
            }
            for &(slot, res) in cqes[..n].iter().chain(overflow.iter()) {
                if let Some(c) = self.complete(slot, res) {
                    done.push(c);
                    total += 1;
                }
            }
            self.overflow = overflow;
        }
        total
    }

    fn wake(&self) -> Wake {
        if self.client.has_completions() {
            Wake::Immediate
        } else {
            Wake::Event
        }
    }
}

impl Drop for FileChannel {
    fn drop(&mut self) {
        // The kernel may still use the requests' buffers: wait for every outstanding SQE.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.outstanding > 0 && std::time::Instant::now() < deadline {
            self.client
                .ring()
                .wait(Some(std::time::Duration::from_millis(10)));
            let mut finished = Vec::new();
            self.client.take(|slot, res, _| finished.push((slot, res)));
            for (slot, res) in finished {
                self.outstanding -= 1;
                let _ = res;
                self.slots[slot as usize].io = None;
            }
        }
        if self.outstanding > 0 {
            // Leak the slots rather than free memory the kernel may still write.
            tracing::error!(path = %self.shared.path.display(), "file channel dropped with I/O stuck in the kernel");
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(self.zeroes.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::sync::SyncChannel;

    #[test]
    fn check_runs_the_open_checks_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/img");
        let mut o = opts(&path, BlockSize::B4096, DirectMode::Never);
        // Missing with create: fine, and nothing is created.
        FileBdev::check(&o).unwrap();
        assert!(!path.exists() && !path.parent().unwrap().exists());
        o.create = false;
        assert_eq!(FileBdev::check(&o).unwrap_err().field(), Some("path"));
        o.create = true;
        drop(FileBdev::open("f", &o).unwrap());
        FileBdev::check(&o).unwrap();
        // The file grew (as after an online resize): a size that disagrees is refused the same
        // way open refuses it, and the file is left as it was.
        o.size = Some(8 << 20);
        let e = FileBdev::check(&o).unwrap_err();
        assert_eq!(e.field(), Some("size"), "{e}");
        assert!(FileBdev::open("f", &o).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        o.size = None;
        FileBdev::check(&o).unwrap();
    }

    fn opts(path: &Path, bs: BlockSize, direct: DirectMode) -> FileOptions {
        FileOptions {
            path: path.to_path_buf(),
            block_size: bs,
            size: Some(4 << 20),
            create: true,
            direct,
            read_only: false,
        }
    }

    #[test]
    fn file_passes_conformance_in_every_io_mode() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (bs, direct)) in [
            (BlockSize::B4096, DirectMode::Auto),
            (BlockSize::B512, DirectMode::Auto),
            (BlockSize::B4096, DirectMode::Never),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("sub/f{i}.img"));
            let o = opts(&path, bs, direct);
            conformance::run(&|| Arc::new(FileBdev::open("f", &o).unwrap()), true);
        }
    }

    #[test]
    fn existing_file_of_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let e = FileBdev::open("f", &opts(&path, BlockSize::B4096, DirectMode::Auto))
            .err()
            .unwrap();
        assert_eq!(e.field(), Some("size"));
        let mut o = opts(&path, BlockSize::B4096, DirectMode::Auto);
        o.size = None;
        let f = FileBdev::open("f", &o).unwrap();
        assert_eq!(f.info().block_count(), 2);
    }

    #[test]
    fn an_image_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        let first = FileBdev::open("a", &opts(&path, BlockSize::B4096, DirectMode::Auto)).unwrap();
        let e = FileBdev::open("b", &opts(&path, BlockSize::B4096, DirectMode::Auto))
            .err()
            .unwrap();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(first);
        assert!(FileBdev::open("b", &opts(&path, BlockSize::B4096, DirectMode::Auto)).is_ok());
    }

    #[test]
    fn missing_file_without_create_is_refused() {
        let mut o = opts(
            Path::new("/nonexistent/x.img"),
            BlockSize::B4096,
            DirectMode::Auto,
        );
        o.create = false;
        assert_eq!(FileBdev::open("f", &o).err().unwrap().field(), Some("path"));
    }

    #[test]
    fn read_only_file_rejects_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        drop(FileBdev::open("f", &opts(&path, BlockSize::B4096, DirectMode::Auto)).unwrap());
        let mut o = opts(&path, BlockSize::B4096, DirectMode::Auto);
        o.read_only = true;
        let f = FileBdev::open("f", &o).unwrap();
        let mut ch = SyncChannel::new(f.open_channel().unwrap());
        assert_eq!(ch.write(0, &[1u8; 4096]), IoStatus::ReadOnly);
        assert_eq!(ch.read(0, 1).0, IoStatus::Success);
    }

    #[test]
    fn resize_grows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        let f = FileBdev::open("f", &opts(&path, BlockSize::B4096, DirectMode::Auto)).unwrap();
        f.resize(2048).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);
        assert!(f.resize(16).is_err());
        let mut ch = SyncChannel::new(f.open_channel().unwrap());
        assert_eq!(ch.write(2047, &[7u8; 4096]), IoStatus::Success);
    }

    #[test]
    fn block_device_through_a_loop_device() {
        // A loop device stands in for a local NVMe SSD: same block-device path, ioctls and
        // O_DIRECT rules. Needs root and the loop driver; says so and returns where missing.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("loop.img");
        std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
            _ => {
                eprintln!("skipped: no loop device available here (needs root and losetup)");
                return;
            }
        };
        let o = FileOptions {
            path: dev.clone().into(),
            block_size: BlockSize::B4096,
            size: None,
            create: false,
            direct: DirectMode::Auto,
            read_only: false,
        };
        let result = std::panic::catch_unwind(|| {
            conformance::run(&|| Arc::new(FileBdev::open("blk", &o).unwrap()), true);
            let b = FileBdev::open("blk", &o).unwrap();
            assert_eq!(b.info().block_count(), 2048);
            assert!(b.describe()["block_device"].as_bool().unwrap());
            assert!(b.resize(4096).is_err());
        });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        result.unwrap();
    }
}
