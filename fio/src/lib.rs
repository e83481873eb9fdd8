//! # ferroblk-fio
//!
//! A fio external ioengine (`--ioengine=external:/path/libferroblk_fio.so`, as SPDK's fio
//! plugins are loaded) with one option, `ferroblk_mode`, choosing how fio reaches the volume:
//!
//! | mode | `--filename=` | path |
//! |---|---|---|
//! | `bdev` | a bdev name of `--ferroblk_config=FILE` | the chain built in-process ([`bdev`]) |
//! | `nvmf` | `trtype=tcp traddr=IP trsvcid=PORT subnqn=NQN ns=N` | ferroblk's NVMe/TCP initiator ([`nvmf`]) |
//! | `vhost` | the vhost-user socket path | libblkio's vhost-user-blk driver ([`vhost`]) |
//!
//! ## Architecture
//! - `src/shim.c` is the fio side: the `struct ioengine_ops` and the option table, compiled by
//!   the `cc` crate against the installed fio's own headers (`fio/fetch-headers.sh`; `build.rs`
//!   refuses other versions). It reads fio's structures (`thread_data`, `io_u`, `fio_file`) and
//!   calls the `ffio_*` functions below with plain values. A C shim rather than bindgen: fio's
//!   headers are large, full of inline functions and macros (`td_verror`, `for_each_file`) that
//!   bindgen does not translate, and the shim is the one place that knows their layout; the
//!   Rust side sees only integers, pointers and strings.
//! - Versions: the shim asserts `FIO_IOOPS_VERSION` at compile time; at load time (a constructor
//!   run by `dlopen`) it compares the running fio's `fio_version_string` with the headers' and,
//!   on a mismatch, prints what to rebuild and makes fio refuse the engine instead of reading a
//!   layout it does not have.
//! - [`Engine`] is one fio thread's state (`td->io_ops_data`): one [`Backend`] per file of the
//!   job, the completions gathered by `getevents` until `event` hands them out, and the io_u
//!   buffer memory. A backend is a bdev channel, an NVMe/TCP I/O queue or a libblkio queue,
//!   opened by and polled on the fio thread itself: no thread is added per I/O or per job.
//!   The engine has no `commit`: what `queue` accepted goes out when fio next asks for
//!   completions (`getevents`), all at once (one `writev` to an NVMe/TCP socket, one vhost-user
//!   kick), as SPDK's socket layer batches sends; fio then accounts the submission itself.
//! - Sizes: `get_file_size` (fio's main process, before the jobs start) probes each volume,
//!   checks fio's block sizes and alignments against the volume's block size, and reports the
//!   volume's size.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::time::{Duration, Instant};

pub mod bdev;
pub mod nvmf;
pub mod vhost;

/// Errors reported to fio (printed by the shim with `log_err`, then the job fails).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job option is missing or wrong.
    #[error("{0}")]
    Option(String),
    /// The volume cannot be reached or opened.
    #[error("{what}: {reason}")]
    Open {
        /// The volume (file name) or object.
        what: String,
        /// Why.
        reason: String,
    },
    /// The connection to the volume failed during the job.
    #[error("{0}")]
    Io(String),
}

/// How fio reaches the volume (`--ferroblk_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A bdev chain of a ferroblk configuration, built in this process.
    Bdev,
    /// An NVMe/TCP namespace through ferroblk's initiator.
    Nvmf,
    /// A vhost-user-blk back-end through libblkio.
    Vhost,
}

impl Mode {
    /// Parses `--ferroblk_mode`.
    pub fn parse(s: Option<&str>) -> Result<Mode, Error> {
        match s {
            Some("bdev") => Ok(Mode::Bdev),
            Some("nvmf") => Ok(Mode::Nvmf),
            Some("vhost") => Ok(Mode::Vhost),
            Some(other) => Err(Error::Option(format!(
                "ferroblk_mode={other} is not a mode: expected bdev, nvmf or vhost"
            ))),
            None => Err(Error::Option(
                "ferroblk_mode is not set: expected bdev, nvmf or vhost".into(),
            )),
        }
    }
}

/// The engine options of a job.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--ferroblk_mode`.
    pub mode: Mode,
    /// `--ferroblk_config` (bdev mode).
    pub config: Option<String>,
}

/// An operation fio asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read into the buffer.
    Read,
    /// Write the buffer.
    Write,
    /// Discard the range (trim / unmap / deallocate).
    Trim,
    /// Make written data durable (fsync, fdatasync).
    Flush,
}

/// What a volume tells fio before the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes: every offset and length must be a multiple.
    pub block_size: u64,
    /// Largest transfer of one request in bytes.
    pub max_transfer: u64,
}

/// What [`Backend::submit`] did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// In flight; its completion comes from [`Backend::poll`].
    Queued,
    /// The queue is full: fio retries after completions.
    Busy,
}

/// One volume as seen by one fio thread.
pub trait Backend {
    /// Starts `op` on `len` bytes at byte `offset` with fio's buffer `buf` (no copy where the
    /// path allows); `tag` comes back with its completion.
    ///
    /// # Safety
    /// For a read or write, `buf` is valid for reads and writes of `len` bytes and nothing else
    /// touches it until the request's completion has come out of [`Backend::poll`].
    unsafe fn submit(&mut self, op: Op, offset: u64, buf: *mut u8, len: usize, tag: u64) -> Submit;
    /// Appends finished requests as `(tag, errno)` (0: success); returns how many.
    fn poll(&mut self, out: &mut Vec<(u64, i32)>) -> Result<usize, Error>;
    /// The volume.
    fn volume(&self) -> Volume;
    /// Memory for fio's io_u buffers, when the path needs its own (vhost-user shares it with
    /// the back-end); `None`: ordinary page-aligned memory.
    fn alloc_io_memory(&mut self, len: usize) -> Result<Option<*mut u8>, Error> {
        let _ = len;
        Ok(None)
    }
}

/// Opens the backend of `file` for the calling fio thread.
fn open_backend(o: &Options, file: &str, depth: usize) -> Result<Box<dyn Backend>, Error> {
    match o.mode {
        Mode::Bdev => Ok(Box::new(bdev::BdevBackend::open(o, file, depth)?)),
        Mode::Nvmf => Ok(Box::new(nvmf::NvmfBackend::open(file, depth)?)),
        Mode::Vhost => Ok(Box::new(vhost::VhostBackend::open(file, depth)?)),
    }
}

/// fio's block size limits of a job, per direction (read, write, trim).
#[repr(C)]
pub struct Limits {
    /// Smallest block size.
    pub min_bs: [u64; 3],
    /// Largest block size.
    pub max_bs: [u64; 3],
    /// Offset alignment (`blockalign`).
    pub ba: [u64; 3],
}

/// Checks a job's block sizes against a volume.
pub fn check_limits(l: &Limits, v: &Volume, file: &str) -> Result<(), Error> {
    for (d, name) in ["read", "write", "trim"].iter().enumerate() {
        for (what, x) in [
            ("bs", l.min_bs[d]),
            ("bs", l.max_bs[d]),
            ("blockalign", l.ba[d]),
        ] {
            if x != 0 && !x.is_multiple_of(v.block_size) {
                return Err(Error::Option(format!(
                    "{file}: {what}={x} ({name}) is not a multiple of the volume's block size {}",
                    v.block_size
                )));
            }
        }
        if d < 2 && l.max_bs[d] > v.max_transfer {
            return Err(Error::Option(format!(
                "{file}: bs={} ({name}) is larger than the volume's largest transfer {}",
                l.max_bs[d], v.max_transfer
            )));
        }
    }
    Ok(())
}

/// Probes `file`: its size, checked against the job's block sizes.
pub fn probe(o: &Options, file: &str, use_thread: bool, l: &Limits) -> Result<Volume, Error> {
    let v = match o.mode {
        Mode::Bdev => {
            if !use_thread {
                return Err(Error::Option(
                    "ferroblk_mode=bdev needs --thread: the jobs share the process's bdev chain"
                        .into(),
                ));
            }
            bdev::probe(o, file)?
        }
        Mode::Nvmf => nvmf::probe(file)?,
        Mode::Vhost => vhost::probe(file)?,
    };
    check_limits(l, &v, file)?;
    Ok(v)
}

/// One fio thread's engine state (`td->io_ops_data`).
pub struct Engine {
    backends: Vec<Box<dyn Backend>>,
    /// Completions found by the last `getevents`, handed out by `event`.
    events: Vec<(u64, i32)>,
    /// Completions found beyond what `getevents` may return, kept for the next call.
    spare: Vec<(u64, i32)>,
    /// io_u memory when no backend provides its own.
    memory: Option<ferroblk_bdev::AlignedBuf>,
}

/// How [`Engine::submit`] went.
pub const FFIO_QUEUED: c_int = 0;
/// The queue is full.
pub const FFIO_BUSY: c_int = 1;
/// The request is malformed (misaligned, unknown file): fio completes it with EINVAL.
pub const FFIO_FAILED: c_int = 2;

impl Engine {
    /// Opens every file of a job on the calling thread.
    pub fn open(o: &Options, depth: usize, files: &[&str]) -> Result<Engine, Error> {
        if o.mode == Mode::Vhost && files.len() > 1 {
            // fio's io_u buffers are one region, shared with one back-end.
            return Err(Error::Option(format!(
                "ferroblk_mode=vhost takes one socket per job ({} given): run one job per socket",
                files.len()
            )));
        }
        let backends = files
            .iter()
            .map(|f| open_backend(o, f, depth))
            .collect::<Result<Vec<_>, _>>()?;
        let cap = depth.max(1) * files.len().max(1);
        Ok(Engine {
            backends,
            events: Vec::with_capacity(cap),
            spare: Vec::with_capacity(cap),
            memory: None,
        })
    }

    /// Submits one request of fio's.
    ///
    /// # Safety
    /// As for [`Backend::submit`].
    pub unsafe fn submit(
        &mut self,
        file: usize,
        op: Op,
        offset: u64,
        buf: *mut u8,
        len: u64,
        tag: u64,
    ) -> c_int {
        let Some(b) = self.backends.get_mut(file) else {
            return FFIO_FAILED;
        };
        let bs = b.volume().block_size;
        if op != Op::Flush && (!offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || len == 0) {
            return FFIO_FAILED;
        }
        // SAFETY: the caller's promise on `buf`, passed on.
        match unsafe { b.submit(op, offset, buf, len as usize, tag) } {
            Submit::Queued => FFIO_QUEUED,
            Submit::Busy => FFIO_BUSY,
        }
    }

    /// Polls until at least `min` completions are ready (or `timeout` passes); keeps at most
    /// `max` for `event`.
    pub fn getevents(
        &mut self,
        min: usize,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, Error> {
        self.events.clear();
        let take = self.spare.len().min(max);
        self.events.extend(self.spare.drain(..take));
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut spins = 0u32;
        loop {
            if self.events.len() < max {
                for b in &mut self.backends {
                    b.poll(&mut self.events)?;
                }
            }
            if self.events.len() >= min.max(1) || (min == 0 && spins > 0) {
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            std::hint::spin_loop();
        }
        if self.events.len() > max {
            self.spare.extend(self.events.drain(max..));
        }
        Ok(self.events.len())
    }

    /// The `i`th completion of the last `getevents`: its tag and errno.
    pub fn event(&self, i: usize) -> (u64, i32) {
        self.events[i]
    }

    /// Memory for fio's io_u buffers.
    pub fn alloc_io_memory(&mut self, len: usize) -> Result<*mut u8, Error> {
        if let Some(b) = self.backends.first_mut()
            && let Some(p) = b.alloc_io_memory(len)?
        {
            return Ok(p);
        }
        let mut m = ferroblk_bdev::AlignedBuf::new(len);
        let p = m.as_mut_ptr();
        self.memory = Some(m);
        Ok(p)
    }
}

// ---- The C API the shim calls (src/shim.c). ----

/// Engine options as the shim passes them.
#[repr(C)]
pub struct FfioOpts {
    mode: *const c_char,
    config: *const c_char,
}

/// Reads a C string the shim passed (NULL: `None`).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string alive for `'a`.
unsafe fn cstr<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated, alive for 'a (the caller's promise).
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// # Safety
/// `o` points to a valid [`FfioOpts`] whose strings are NULL or NUL-terminated.
unsafe fn options(o: *const FfioOpts) -> Result<Options, Error> {
    // SAFETY: the caller's promise.
    let o = unsafe { &*o };
    // SAFETY: the caller's promise on the strings.
    let (mode, config) = unsafe { (cstr(o.mode), cstr(o.config)) };
    Ok(Options {
        mode: Mode::parse(mode)?,
        config: config.map(str::to_string),
    })
}

/// Writes `msg` NUL-terminated into the shim's buffer, truncated to fit.
///
/// # Safety
/// `err` is valid for writes of `len` bytes (`len` ≥ 1).
unsafe fn put_err(err: *mut c_char, len: usize, msg: &str) {
    if err.is_null() || len == 0 {
        return;
    }
    let n = msg.len().min(len - 1);
    // SAFETY: `n + 1 <= len` bytes written into `err`, valid for `len` (the caller's promise).
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// Probes one file (fio's `get_file_size`, in the main process): 0 and its size in `*size`, or
/// -1 with a message in `err`.
///
/// # Safety
/// Pointers as the shim passes them: valid options and limits, a NUL-terminated file name,
/// `size` writable, `err` writable for `errlen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_probe(
    o: *const FfioOpts,
    file: *const c_char,
    use_thread: c_int,
    limits: *const Limits,
    size: *mut u64,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: the caller's promises, passed on.
    let r = unsafe { options(o) }.and_then(|o| {
        // SAFETY: the caller's promise on `file`.
        let file = unsafe { cstr(file) }
            .ok_or_else(|| Error::Option("the file name is not UTF-8".into()))?;
        // SAFETY: the caller's promise on `limits`.
        probe(&o, file, use_thread != 0, unsafe { &*limits })
    });
    match r {
        Ok(v) => {
            // SAFETY: the caller's promise on `size`.
            unsafe { *size = v.size };
            0
        }
        Err(e) => {
            // SAFETY: the caller's promise on `err`.
            unsafe { put_err(err, errlen, &e.to_string()) };
            -1
        }
    }
}

/// Opens a job's files on the calling fio thread (`init`): the engine, or NULL with a message.
///
/// # Safety
/// Valid options, `names` an array of `nr_files` NUL-terminated strings, `err` writable for
/// `errlen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_open(
    o: *const FfioOpts,
    iodepth: u32,
    nr_files: u32,
    names: *const *const c_char,
    err: *mut c_char,
    errlen: usize,
) -> *mut c_void {
    // SAFETY: the caller's promises, passed on.
    let r = unsafe { options(o) }.and_then(|o| {
        let mut files = Vec::with_capacity(nr_files as usize);
        for i in 0..nr_files as usize {
            // SAFETY: `names` holds `nr_files` valid strings (the caller's promise).
            let f = unsafe { cstr(*names.add(i)) }
                .ok_or_else(|| Error::Option("a file name is not UTF-8".into()))?;
            files.push(f);
        }
        Engine::open(&o, iodepth.max(1) as usize, &files)
    });
    match r {
        Ok(e) => Box::into_raw(Box::new(e)).cast(),
        Err(e) => {
            // SAFETY: the caller's promise on `err`.
            unsafe { put_err(err, errlen, &e.to_string()) };
            std::ptr::null_mut()
        }
    }
}

/// Reborrows the engine the shim keeps in `td->io_ops_data`.
///
/// # Safety
/// `e` came from [`ffio_open`], was not closed, and is used by its one fio thread only.
unsafe fn engine<'a>(e: *mut c_void) -> &'a mut Engine {
    // SAFETY: the caller's promise.
    unsafe { &mut *e.cast::<Engine>() }
}

/// Submits one io_u: [`FFIO_QUEUED`], [`FFIO_BUSY`] or [`FFIO_FAILED`].
///
/// # Safety
/// `e` as for [`engine`]; `buf` valid for `len` bytes until the io_u completes (fio's io_u
/// buffer, which fio does not touch while the io_u is in flight).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_queue(
    e: *mut c_void,
    file: u32,
    op: c_int,
    offset: u64,
    buf: *mut c_void,
    len: u64,
    io_u: *mut c_void,
) -> c_int {
    let op = match op {
        0 => Op::Read,
        1 => Op::Write,
        2 => Op::Trim,
        3 => Op::Flush,
        _ => return FFIO_FAILED,
    };
    // SAFETY: the caller's promises on `e` and on `buf` (fio's io_u buffer, left alone by fio
    // until the io_u comes back from `event`).
    unsafe { engine(e).submit(file as usize, op, offset, buf.cast(), len, io_u as u64) }
}

/// Polls completions (`getevents`): how many, or -1 with a message.
///
/// # Safety
/// As for [`engine`]; `err` writable for `errlen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_getevents(
    e: *mut c_void,
    min: u32,
    max: u32,
    timeout_ns: i64,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let timeout = u64::try_from(timeout_ns).ok().map(Duration::from_nanos);
    // SAFETY: the caller's promise.
    match unsafe { engine(e) }.getevents(min as usize, max as usize, timeout) {
        Ok(n) => n as c_int,
        Err(x) => {
            // SAFETY: the caller's promise on `err`.
            unsafe { put_err(err, errlen, &x.to_string()) };
            -1
        }
    }
}

/// The `i`th completion: its io_u, its errno in `*error`.
///
/// # Safety
/// As for [`engine`]; `i` below the last `getevents` count; `error` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_event(e: *mut c_void, i: c_int, error: *mut c_int) -> *mut c_void {
    // SAFETY: the caller's promise.
    let (tag, errno) = unsafe { engine(e) }.event(i as usize);
    // SAFETY: the caller's promise on `error`.
    unsafe { *error = errno };
    tag as *mut c_void
}

/// io_u buffer memory of `len` bytes, page-aligned (NULL with a message on failure).
///
/// # Safety
/// As for [`engine`]; `err` writable for `errlen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_iomem_alloc(
    e: *mut c_void,
    len: usize,
    err: *mut c_char,
    errlen: usize,
) -> *mut c_void {
    // SAFETY: the caller's promise.
    match unsafe { engine(e) }.alloc_io_memory(len) {
        Ok(p) => p.cast(),
        Err(x) => {
            // SAFETY: the caller's promise on `err`.
            unsafe { put_err(err, errlen, &x.to_string()) };
            std::ptr::null_mut()
        }
    }
}

/// Releases what [`ffio_iomem_alloc`] gave (kept until [`ffio_close`] when a backend owns it).
///
/// # Safety
/// As for [`engine`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_iomem_free(e: *mut c_void) {
    // SAFETY: the caller's promise.
    unsafe { engine(e) }.memory = None;
}

/// Closes a job's engine (`cleanup`): queues, channels and connections.
///
/// # Safety
/// `e` came from [`ffio_open`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffio_close(e: *mut c_void) {
    // SAFETY: the caller's promise: ours, from Box::into_raw, closed once.
    drop(unsafe { Box::from_raw(e.cast::<Engine>()) });
}

unsafe extern "C" {
    fn ffio_ops() -> *mut c_void;
}

/// fio's fallback entry point for external engines (`get_ioengine`): a Rust cdylib exports only
/// Rust's symbols, so the shim's `ioengine` table is handed out here.
///
/// # Safety
/// `out` is writable (fio's own call).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn get_ioengine(out: *mut *mut c_void) {
    // SAFETY: `ffio_ops` returns the address of the shim's static table; `out` is writable.
    unsafe { *out = ffio_ops() };
}
