//! `ferroblk_mode=bdev`: fio drives a bdev chain of a ferroblk configuration in this process.
//!
//! The chain is built once per process and configuration file, through the daemon's own
//! configuration parser and list of bdev kinds (`ferroblk::config`, `ferroblk::decl`), so every
//! kind the daemon accepts works here; fronts and reactors of the file are ignored. Each fio
//! thread opens its own [`Channel`] of the named bdev and polls it itself (it is the reactor of
//! that channel: a file bdev's io_uring is the thread's own). fio's io_u buffer is the request's
//! one segment; nothing is copied or allocated per I/O.

use std::path::Path;
use std::sync::{Arc, Mutex};

use ferroblk::config::Config;
use ferroblk_bdev::BdevRegistry;
use ferroblk_bdev::bdev::{Bdev, Channel, IoCompletion, IoRequest};
use ferroblk_bdev::buf::{IoSeg, SgList};
use ferroblk_bdev::types::{IoStatus, IoType, MAX_EXPORT_IO_BYTES};

use crate::{Backend, Error, Op, Options, Submit, Volume};

/// The chains built in this process, by configuration file (fio's jobs share them).
static CHAINS: Mutex<Vec<(String, Arc<BdevRegistry>)>> = Mutex::new(Vec::new());

/// The chain of `config`, built on first use.
fn chain(config: &str) -> Result<Arc<BdevRegistry>, Error> {
    let mut chains = CHAINS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, r)) = chains.iter().find(|(c, _)| c == config) {
        return Ok(r.clone());
    }
    let cfg = Config::load(Path::new(config)).map_err(|e| Error::Open {
        what: format!("ferroblk_config={config}"),
        reason: e.to_string(),
    })?;
    let registry = BdevRegistry::new();
    registry.create_all(&cfg.bdev).map_err(|e| Error::Open {
        what: format!("ferroblk_config={config}"),
        reason: format!("bdev[{}]: {}", e.index, e.error),
    })?;
    let r = Arc::new(registry);
    chains.push((config.to_string(), r.clone()));
    Ok(r)
}

/// The bdev `name` of the job's configuration.
fn find(o: &Options, name: &str) -> Result<Arc<dyn Bdev>, Error> {
    let config = o.config.as_deref().ok_or_else(|| {
        Error::Option(
            "ferroblk_mode=bdev needs --ferroblk_config=FILE (a ferroblk configuration \
             declaring the bdev named by --filename)"
                .into(),
        )
    })?;
    let r = chain(config)?;
    r.get(name).ok_or_else(|| {
        let mut names: Vec<String> = r
            .list()
            .iter()
            .map(|(b, _, _)| b.name().to_string())
            .collect();
        names.sort();
        Error::Open {
            what: format!("--filename={name}"),
            reason: format!(
                "no bdev of that name in {config} (it declares: {})",
                names.join(", ")
            ),
        }
    })
}

fn volume(b: &dyn Bdev) -> Volume {
    let g = b.info().geometry();
    let bs = u64::from(g.block_size.bytes());
    Volume {
        size: g.block_count * bs,
        block_size: bs,
        max_transfer: MAX_EXPORT_IO_BYTES,
    }
}

/// The volume `name` (fio's main process).
pub fn probe(o: &Options, name: &str) -> Result<Volume, Error> {
    Ok(volume(&*find(o, name)?))
}

/// The errno fio reports for a bdev status (this front's one mapping of [`IoStatus`]).
pub fn errno(s: IoStatus) -> i32 {
    match s {
        IoStatus::Success => 0,
        IoStatus::InvalidRange | IoStatus::InvalidRequest => libc::EINVAL,
        IoStatus::Unsupported => libc::EOPNOTSUPP,
        IoStatus::MediaError => libc::EIO,
        IoStatus::IntegrityError => libc::EILSEQ,
        IoStatus::ReadOnly => libc::EROFS,
        IoStatus::NoSpace => libc::ENOSPC,
        IoStatus::Aborted => libc::ECANCELED,
    }
}

/// One fio thread's channel of a bdev.
pub struct BdevBackend {
    // Declared before `_bdev`: the channel closes while the bdev is still held.
    ch: Channel,
    done: Vec<IoCompletion>,
    shift: u32,
    volume: Volume,
    _bdev: Arc<dyn Bdev>,
}

impl BdevBackend {
    /// Opens the calling thread's channel of bdev `name`.
    pub fn open(o: &Options, name: &str, depth: usize) -> Result<BdevBackend, Error> {
        let b = find(o, name)?;
        let ch = b.open_channel().map_err(|e| Error::Open {
            what: format!("--filename={name}"),
            reason: format!("open a channel: {e}"),
        })?;
        let volume = volume(&*b);
        Ok(BdevBackend {
            done: Vec::with_capacity(depth.max(ch.depth())),
            ch,
            shift: volume.block_size.trailing_zeros(),
            volume,
            _bdev: b,
        })
    }
}

impl Backend for BdevBackend {
    unsafe fn submit(&mut self, op: Op, offset: u64, buf: *mut u8, len: usize, tag: u64) -> Submit {
        let lba = offset >> self.shift;
        let blocks = (len >> self.shift) as u32;
        let io = match op {
            Op::Read | Op::Write => {
                // SAFETY: `buf` is fio's io_u buffer of `len` bytes, which fio leaves alone until
                // the io_u completes; the completion (holding the list) is dropped in `poll`
                // before the io_u is handed back to fio.
                let bufs = unsafe { SgList::from_raw(&[IoSeg { base: buf, len }]) };
                if op == Op::Read {
                    IoRequest::read(lba, blocks, bufs, tag)
                } else {
                    IoRequest::write(lba, blocks, bufs, tag)
                }
            }
            Op::Trim => IoRequest::no_data(IoType::Unmap, lba, blocks, tag),
            Op::Flush => IoRequest::no_data(IoType::Flush, 0, 0, tag),
        };
        match self.ch.submit(io) {
            Ok(()) => Submit::Queued,
            Err(_) => Submit::Busy,
        }
    }

    fn poll(&mut self, out: &mut Vec<(u64, i32)>) -> Result<usize, Error> {
        let n = self.ch.poll(&mut self.done);
        out.extend(self.done.drain(..).map(|c| (c.tag, errno(c.status))));
        Ok(n)
    }

    fn volume(&self) -> Volume {
        self.volume
    }
}
