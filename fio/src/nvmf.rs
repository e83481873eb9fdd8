//! `ferroblk_mode=nvmf`: fio as an NVMe/TCP host through ferroblk's initiator
//! (`ferroblk_target::initiator`), against any NVMe/TCP controller.
//!
//! `--filename='trtype=tcp traddr=127.0.0.1 trsvcid=4420 subnqn=nqn.2024-01.io.ferroblk\:vol0
//! ns=1'` (fio splits file names at `:`, so the NQN's colons are escaped, as with SPDK's
//! plugin). Each fio thread connects its own controller (admin queue and keep-alive) and one
//! I/O queue of `iodepth` entries, submits without blocking and polls the queue's socket in
//! `getevents`. Reads and writes lend fio's io_u buffer to the queue as a one-segment list
//! (`IoQueue::submit_sg`): write data goes to the socket from it and read data lands in it,
//! with no copy; only a trim's range list uses the slot's own small buffer.

use std::net::{IpAddr, SocketAddr};

use ferroblk_bdev::{IoSeg, SgList};
use ferroblk_target::initiator::{
    Completion, ConnectOptions, Controller, IoCommand, IoQueue, IoQueueOptions, MAX_DEPTH,
};
use ferroblk_target::spec::command::DsmRange;

use crate::{Backend, Error, Op, Submit, Volume};

/// A parsed `--filename`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The controller's address (`traddr`, `trsvcid`).
    pub addr: SocketAddr,
    /// The subsystem (`subnqn`).
    pub subnqn: String,
    /// The namespace (`ns`); `None`: the first active one.
    pub nsid: Option<u32>,
}

/// Parses `trtype=tcp traddr=IP trsvcid=PORT subnqn=NQN [ns=N]`, naming the key that is wrong.
pub fn parse_target(s: &str) -> Result<Target, Error> {
    let bad = |m: String| Error::Option(format!("--filename='{s}': {m}"));
    let (mut trtype, mut traddr, mut port, mut subnqn, mut nsid) =
        (None, None, 4420u16, None, None);
    for kv in s.split_whitespace() {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
        // fio removes the backslash of `\:`; one left over (a job file quoting it twice) is too.
        let v = v.replace("\\:", ":");
        match k {
            "trtype" => trtype = Some(v),
            "traddr" => {
                traddr = Some(
                    v.parse::<IpAddr>()
                        .map_err(|_| bad(format!("traddr={v} is not an IP address")))?,
                )
            }
            "trsvcid" => {
                port = v
                    .parse()
                    .map_err(|_| bad(format!("trsvcid={v} is not a TCP port")))?
            }
            "subnqn" => subnqn = Some(v),
            "ns" => {
                nsid = Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|n| *n != 0 && *n != u32::MAX)
                        .ok_or_else(|| bad(format!("ns={v} is not a namespace ID")))?,
                )
            }
            other => {
                return Err(bad(format!(
                    "unknown key `{other}` (expected trtype, traddr, trsvcid, subnqn, ns)"
                )));
            }
        }
    }
    match trtype.as_deref() {
        Some("tcp") => {}
        Some(t) => return Err(bad(format!("trtype={t}: only tcp is supported"))),
        None => return Err(bad("trtype=tcp is missing".into())),
    }
    let traddr = traddr.ok_or_else(|| bad("traddr is missing".into()))?;
    let subnqn = subnqn.ok_or_else(|| bad("subnqn is missing".into()))?;
    Ok(Target {
        addr: SocketAddr::new(traddr, port),
        subnqn,
        nsid,
    })
}

/// A connected controller and the namespace the job drives.
struct Connected {
    ctrl: Controller,
    nsid: u32,
    volume: Volume,
}

fn connect(file: &str) -> Result<Connected, Error> {
    let t = parse_target(file)?;
    let fail = |what: &str, e: ferroblk_target::initiator::Error| Error::Open {
        what: format!("{} {}", t.addr, t.subnqn),
        reason: format!("{what}: {e}"),
    };
    let ctrl = Controller::connect(&ConnectOptions::new(t.addr, t.subnqn.clone()))
        .map_err(|e| fail("connect", e))?;
    let nsid = match t.nsid {
        Some(n) => n,
        None => *ctrl
            .active_namespaces()
            .map_err(|e| fail("active namespaces", e))?
            .first()
            .ok_or_else(|| Error::Open {
                what: format!("{} {}", t.addr, t.subnqn),
                reason: "the subsystem has no namespace".into(),
            })?,
    };
    let ns = ctrl
        .namespace(nsid)
        .map_err(|e| fail(&format!("namespace {nsid}"), e))?;
    if ns.blocks == 0 {
        return Err(Error::Open {
            what: format!("{} {}", t.addr, t.subnqn),
            reason: format!("namespace {nsid} is not active"),
        });
    }
    let max_transfer = ctrl
        .max_data_transfer()
        .unwrap_or(ferroblk_bdev::MAX_EXPORT_IO_BYTES as usize)
        .min(ferroblk_bdev::MAX_EXPORT_IO_BYTES as usize) as u64;
    let volume = Volume {
        size: ns.blocks * u64::from(ns.block_size),
        block_size: u64::from(ns.block_size),
        max_transfer,
    };
    Ok(Connected { ctrl, nsid, volume })
}

/// The namespace named by `file` (fio's main process): connects, identifies, shuts down.
pub fn probe(file: &str) -> Result<Volume, Error> {
    let c = connect(file)?;
    let v = c.volume;
    let _ = c.ctrl.shutdown();
    Ok(v)
}

/// One fio thread's controller and I/O queue.
pub struct NvmfBackend {
    // Declared first: the queue closes before the controller shuts down (see `Drop`).
    queue: Option<IoQueue>,
    ctrl: Option<Controller>,
    nsid: u32,
    volume: Volume,
    shift: u32,
    /// Each slot's range-list buffer while it is free (taken by a trim, put back at its
    /// completion).
    bufs: Vec<Vec<u8>>,
    /// The fio tag of each slot's request in flight.
    pending: Vec<Option<u64>>,
    free: Vec<usize>,
    done: Vec<Completion>,
}

impl NvmfBackend {
    /// Connects a controller and one I/O queue of `depth` entries.
    pub fn open(file: &str, depth: usize) -> Result<NvmfBackend, Error> {
        let c = connect(file)?;
        let fail = |what: &str, e: ferroblk_target::initiator::Error| Error::Open {
            what: file.to_string(),
            reason: format!("{what}: {e}"),
        };
        let depth = depth
            .min(usize::from(c.ctrl.cap().mqes))
            .min(usize::from(MAX_DEPTH))
            .max(1);
        c.ctrl
            .set_number_of_queues(1)
            .map_err(|e| fail("set number of queues", e))?;
        let queue = c
            .ctrl
            .connect_io_queue(
                1,
                &IoQueueOptions {
                    depth: depth as u16,
                    max_data: c.volume.max_transfer as usize,
                    ..IoQueueOptions::default()
                },
            )
            .map_err(|e| fail("connect I/O queue 1", e))?;
        Ok(NvmfBackend {
            queue: Some(queue),
            ctrl: Some(c.ctrl),
            nsid: c.nsid,
            shift: c.volume.block_size.trailing_zeros(),
            volume: c.volume,
            bufs: (0..depth)
                .map(|_| Vec::with_capacity(DsmRange::LEN))
                .collect(),
            pending: vec![None; depth],
            free: (0..depth).rev().collect(),
            done: Vec::with_capacity(depth),
        })
    }
}

impl Backend for NvmfBackend {
    unsafe fn submit(&mut self, op: Op, offset: u64, buf: *mut u8, len: usize, tag: u64) -> Submit {
        let Some(slot) = self.free.pop() else {
            return Submit::Busy;
        };
        let slba = offset >> self.shift;
        let nlb = (len >> self.shift) as u32;
        let nsid = self.nsid;
        let q = self.queue.as_mut().expect("open until dropped");
        let r = match op {
            Op::Read | Op::Write => {
                let cmd = if op == Op::Read {
                    IoCommand::Read { nsid, slba, nlb }
                } else {
                    IoCommand::Write {
                        nsid,
                        slba,
                        nlb,
                        fua: false,
                    }
                };
                // SAFETY: `buf` is fio's io_u buffer of `len` bytes (this function's contract),
                // untouched by fio until the completion comes out of `poll`.
                let sg = unsafe { SgList::from_raw(&[IoSeg { base: buf, len }]) };
                q.submit_sg(cmd, sg, slot as u64).map_err(|_| Vec::new())
            }
            Op::Trim => {
                let mut b = std::mem::take(&mut self.bufs[slot]);
                b.clear();
                b.resize(DsmRange::LEN, 0);
                DsmRange {
                    cattr: 0,
                    nlb,
                    slba,
                }
                .write_to(&mut b);
                q.submit(IoCommand::Deallocate { nsid, nr: 1 }, b, slot as u64)
                    .map_err(|r| r.buf)
            }
            Op::Flush => q
                .submit(IoCommand::Flush { nsid }, Vec::new(), slot as u64)
                .map_err(|r| r.buf),
        };
        match r {
            Ok(()) => {
                self.pending[slot] = Some(tag);
                Submit::Queued
            }
            Err(b) => {
                if op == Op::Trim {
                    self.bufs[slot] = b;
                }
                self.free.push(slot);
                Submit::Busy
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<(u64, i32)>) -> Result<usize, Error> {
        let q = self.queue.as_mut().expect("open until dropped");
        let r = q.poll(&mut self.done);
        let mut n = 0;
        for c in self.done.drain(..) {
            let slot = c.tag as usize;
            let Some(tag) = self.pending.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let errno = if c.status().is_success() {
                0
            } else {
                libc::EIO
            };
            if c.buf.capacity() > 0 {
                // A trim's range list comes back for the slot's next trim.
                self.bufs[slot] = c.buf;
            }
            self.free.push(slot);
            out.push((tag, errno));
            n += 1;
        }
        match r {
            Ok(_) => Ok(n),
            // Every command in flight came back above with Host Pathing Error; fio sees them
            // fail, then this.
            Err(e) if n > 0 => {
                let _ = e;
                Ok(n)
            }
            Err(e) => Err(Error::Io(format!("NVMe/TCP I/O queue: {e}"))),
        }
    }

    fn volume(&self) -> Volume {
        self.volume
    }
}

impl Drop for NvmfBackend {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            let _ = q.disconnect();
        }
        if let Some(c) = self.ctrl.take() {
            let _ = c.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_parses_with_escaped_colons() {
        let t = parse_target(
            "trtype=tcp traddr=127.0.0.1 trsvcid=4421 subnqn=nqn.2024-01.io.ferroblk\\:vol0 ns=2",
        )
        .unwrap();
        assert_eq!(t.addr, "127.0.0.1:4421".parse().unwrap());
        assert_eq!(t.subnqn, "nqn.2024-01.io.ferroblk:vol0");
        assert_eq!(t.nsid, Some(2));
    }

    #[test]
    fn a_bad_target_names_its_key() {
        for (s, want) in [
            ("trtype=rdma traddr=127.0.0.1 subnqn=x", "trtype=rdma"),
            ("traddr=127.0.0.1 subnqn=x", "trtype=tcp is missing"),
            ("trtype=tcp traddr=localhost subnqn=x", "traddr=localhost"),
            (
                "trtype=tcp traddr=127.0.0.1 trsvcid=x subnqn=x",
                "trsvcid=x",
            ),
            ("trtype=tcp traddr=127.0.0.1", "subnqn is missing"),
            ("trtype=tcp traddr=127.0.0.1 subnqn=x ns=0", "ns=0"),
            (
                "trtype=tcp traddr=127.0.0.1 subnqn=x port=1",
                "unknown key `port`",
            ),
            ("/dev/nvme0n1", "not key=value"),
        ] {
            let e = parse_target(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
