//! NVM I/O commands on bdev channels (NVM Command Set 1.0; SPDK's `ctrlr_bdev.c`, nvmet's
//! `io-cmd-bdev.c`): the checks made before any data moves, the mapping of Read, Write,
//! Compare, Flush, Write Zeroes and Dataset Management onto requests on this reactor's channel
//! of each namespace, and their completions.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferroblk_bdev::{Caps, IoCompletion, IoRequest, IoType, SgList};

use super::{NsChan, NvmeQueue, SlotState, Transport};
use crate::spec::command::{
    AdminOpcode, DatasetManagement, DsmRange, IoOpcode, ReadWrite, Sqe, WriteZeroes,
};
use crate::spec::fabrics::{ConnectData, FabricsType};
use crate::spec::{Status, to_nvme_status};
use crate::subsystem::admin::MAX_TRANSFER;

impl NvmeQueue {
    /// Length of host-to-controller data the command carries, if any.
    pub(super) fn data_in_len(&self, sqe: &Sqe) -> usize {
        let io = self.is_io_queue();
        if sqe.admin_opcode() == Some(AdminOpcode::Fabrics) {
            return if sqe.fabrics_type() == Some(FabricsType::Connect) {
                ConnectData::LEN
            } else {
                0
            };
        }
        if !io {
            return 0;
        }
        match sqe.io_opcode() {
            Some(IoOpcode::Write | IoOpcode::Compare) => {
                let rw = ReadWrite::from_sqe(sqe);
                let bs = self.block_size(rw.nsid).unwrap_or(512);
                rw.nlb as usize * bs
            }
            Some(IoOpcode::DatasetManagement) => DatasetManagement::from_sqe(sqe).data_len(),
            _ => 0,
        }
    }

    /// For an I/O command carrying data (Write, Compare, Dataset Management): the error it
    /// completes with if its namespace is not active or its LBA range does not fit in it (NVM
    /// Command Set 1.0 §3.3.3), so that no data is asked for (R2T) or kept for a command that
    /// cannot run.
    pub(super) fn check_before_data(&self, sqe: &Sqe) -> Option<Status> {
        let q = self.bound.as_ref().filter(|q| q.qid != 0)?;
        let opc = sqe.io_opcode();
        if !matches!(
            opc,
            Some(IoOpcode::Write | IoOpcode::Compare | IoOpcode::DatasetManagement)
        ) {
            return None;
        }
        let Some(n) =
            q.ns.get(sqe.nsid() as usize)
                .and_then(Option::as_ref)
                .filter(|n| !n.draining)
        else {
            return Some(Status::INVALID_NAMESPACE);
        };
        if let Some(st) = q.ctrl.ana_state(n.ns.anagrpid).io_status() {
            return Some(st);
        }
        if opc == Some(IoOpcode::DatasetManagement) {
            return None;
        }
        let rw = ReadWrite::from_sqe(sqe);
        let blocks = n.ns.bdev.info().block_count();
        match rw.slba.checked_add(u64::from(rw.nlb)) {
            Some(end) if end <= blocks => None,
            _ => Some(Status::LBA_OUT_OF_RANGE),
        }
    }

    fn block_size(&self, nsid: u32) -> Option<usize> {
        let q = self.bound.as_ref()?;
        let n = q.ns.get(nsid as usize)?.as_ref()?;
        Some(n.ns.bdev.info().block_size().bytes() as usize)
    }

    /// Opens this reactor's channels for the subsystem's namespaces (I/O queues only).
    pub(super) fn refresh_namespaces(&mut self) {
        let Some(q) = self.bound.as_mut() else { return };
        if q.qid == 0 {
            return;
        }
        let g = q.ctrl.subsystem.ns_generation();
        if g == q.ns_gen {
            return;
        }
        q.ns_gen = g;
        let list = q.ctrl.subsystem.namespaces();
        let max = list.iter().map(|n| n.nsid as usize).max().unwrap_or(0);
        if q.ns.len() <= max {
            q.ns.resize_with(max + 1, || None);
        }
        for (nsid, slot) in q.ns.iter_mut().enumerate() {
            let want = list.iter().find(|n| n.nsid as usize == nsid);
            let keep = match (slot.as_ref(), want) {
                (Some(have), Some(w)) => Arc::ptr_eq(&have.ns, w),
                (None, None) => true,
                _ => false,
            };
            if keep {
                continue;
            }
            // A removed namespace's channel stays until its requests complete, including those
            // waiting in the retry queue for room in it (they were accepted for this namespace
            // and must not reach a successor with the same nsid, or find no channel at all).
            let waiting = self.retry.iter().any(|(n, _)| *n as usize == nsid);
            if let Some(s) = slot.as_mut()
                && (waiting || s.ch.in_flight() > 0)
            {
                s.draining = true;
                q.ns_gen = 0;
                continue;
            }
            *slot = match want {
                Some(w) => match w.bdev.open_channel() {
                    Ok(ch) => Some(NsChan {
                        ns: w.clone(),
                        ch,
                        draining: false,
                    }),
                    Err(e) => {
                        tracing::error!(nsid, error = %e, "cannot open namespace channel");
                        None
                    }
                },
                None => None,
            };
        }
    }

    fn submit(&mut self, nsid: u32, io: IoRequest) {
        let q = self.bound.as_mut().expect("I/O queue");
        let ch = &mut q.ns[nsid as usize].as_mut().expect("namespace checked").ch;
        if let Err(io) = ch.submit(io) {
            self.retry.push_back((nsid, io));
        }
    }

    /// Whether the host left the controller's volatile write cache on (Set Features VWC).
    fn write_cache_enabled(&self) -> bool {
        self.bound
            .as_ref()
            .is_none_or(|b| b.ctrl.vwc_enabled.load(Ordering::Relaxed))
    }

    pub(super) fn io_command<T: Transport>(&mut self, t: &mut T, i: usize, sqe: Sqe) {
        let nsid = sqe.nsid();
        let opc = sqe.io_opcode();
        if !matches!(
            opc,
            Some(
                IoOpcode::Read
                    | IoOpcode::Write
                    | IoOpcode::Flush
                    | IoOpcode::WriteZeroes
                    | IoOpcode::DatasetManagement
                    | IoOpcode::Compare
            )
        ) {
            return self.complete_slot(t, i, Status::INVALID_OPCODE, 0, 0);
        }
        let q = self.bound.as_ref().expect("I/O queue");
        let ns_ok = |n: u32| {
            q.ns.get(n as usize)
                .is_some_and(|x| x.as_ref().is_some_and(|c| !c.draining))
        };
        // The ANA state of the namespace's group on this controller's port (NVMe Base 2.0
        // §8.1.3): one atomic load.
        let ana_status = |n: u32| {
            let grp = q.ns[n as usize].as_ref().map_or(1, |c| c.ns.anagrpid);
            q.ctrl.ana_state(grp).io_status()
        };
        if opc == Some(IoOpcode::Flush) && nsid == 0xffff_ffff {
            // Flush every namespace reachable through this port.
            let all: Vec<u32> = (0..q.ns.len() as u32)
                .filter(|&n| ns_ok(n) && ana_status(n).is_none())
                .collect();
            if all.is_empty() {
                return self.complete_slot(t, i, Status::SUCCESS, 0, 0);
            }
            self.slots[i].pending = all.len() as u32;
            for n in all {
                self.submit(n, IoRequest::no_data(IoType::Flush, 0, 0, i as u64));
            }
            return;
        }
        if !ns_ok(nsid) {
            return self.complete_slot(t, i, Status::INVALID_NAMESPACE, 0, 0);
        }
        if let Some(st) = ana_status(nsid) {
            return self.complete_slot(t, i, st, 0, 0);
        }
        let bs = self.block_size(nsid).expect("namespace checked");
        let caps = q.ns[nsid as usize]
            .as_ref()
            .expect("checked")
            .ns
            .bdev
            .info()
            .caps();
        let tag = i as u64;
        match opc {
            Some(IoOpcode::Read | IoOpcode::Compare) => {
                let rw = ReadWrite::from_sqe(&sqe);
                let len = rw.nlb as usize * bs;
                if len > MAX_TRANSFER {
                    return self.complete_slot(t, i, Status::INVALID_FIELD, 0, 0);
                }
                if opc == Some(IoOpcode::Read) && self.sgl_len(&sqe) != len {
                    return self.complete_slot(t, i, Status::DATA_SGL_LENGTH_INVALID, 0, 0);
                }
                if opc == Some(IoOpcode::Compare) {
                    self.slots[i].compare = self.slots[i].buf.take();
                }
                let buf = t.data_buf(len);
                self.slots[i].len = len;
                self.slots[i].pending = 1;
                let io = IoRequest::read(rw.slba, rw.nlb, SgList::from_buf_prefix(buf, len), tag);
                self.submit(nsid, io);
            }
            Some(IoOpcode::Write) => {
                let rw = ReadWrite::from_sqe(&sqe);
                let len = self.slots[i].len;
                let Some(buf) = self.slots[i].buf.take() else {
                    return self.complete_slot(t, i, Status::DATA_TRANSFER_ERROR, 0, 0);
                };
                self.slots[i].pending = 1;
                // Force Unit Access: a flush follows once the write has completed, and the
                // command completes after the flush (submitted together, the flush could finish
                // first). With the volatile write cache turned off (Set Features VWC = 0), every
                // write is one.
                let write_through = !self.write_cache_enabled();
                self.slots[i].flush_nsid = (rw.fua || write_through).then_some(nsid);
                let io = IoRequest::write(rw.slba, rw.nlb, SgList::from_buf_prefix(buf, len), tag);
                self.submit(nsid, io);
            }
            Some(IoOpcode::Flush) => {
                self.slots[i].pending = 1;
                self.submit(nsid, IoRequest::no_data(IoType::Flush, 0, 0, tag));
            }
            Some(IoOpcode::WriteZeroes) => {
                let wz = WriteZeroes::from_sqe(&sqe);
                let t = if wz.deac && caps.contains(Caps::UNMAP_READS_ZEROES) {
                    IoType::Unmap
                } else {
                    IoType::WriteZeroes
                };
                self.slots[i].pending = 1;
                self.slots[i].flush_nsid = (wz.fua || !self.write_cache_enabled()).then_some(nsid);
                self.submit(nsid, IoRequest::no_data(t, wz.slba, wz.nlb, tag));
            }
            Some(IoOpcode::DatasetManagement) => {
                let dsm = DatasetManagement::from_sqe(&sqe);
                if !dsm.ad {
                    return self.complete_slot(t, i, Status::SUCCESS, 0, 0);
                }
                let Some(buf) = self.slots[i].buf.as_ref() else {
                    return self.complete_slot(t, i, Status::DATA_TRANSFER_ERROR, 0, 0);
                };
                let parsed: Option<Vec<(u64, u32)>> =
                    DsmRange::parse_list(buf.as_slice(), dsm.nr as usize)
                        .map(|it| it.filter(|r| r.nlb > 0).map(|r| (r.slba, r.nlb)).collect());
                let Some(ranges) = parsed else {
                    return self.complete_slot(t, i, Status::INVALID_FIELD, 0, 0);
                };
                if ranges.is_empty() {
                    return self.complete_slot(t, i, Status::SUCCESS, 0, 0);
                }
                self.slots[i].pending = ranges.len() as u32;
                for (slba, nlb) in ranges {
                    self.submit(nsid, IoRequest::no_data(IoType::Unmap, slba, nlb, tag));
                }
            }
            _ => self.complete_slot(t, i, Status::INVALID_OPCODE, 0, 0),
        }
    }

    fn on_completion<T: Transport>(&mut self, t: &mut T, c: IoCompletion, io_type_hint: IoType) {
        let i = c.tag as usize;
        let s = &mut self.slots[i];
        if s.state != SlotState::Exec {
            if let Some(b) = c.bufs.into_buf() {
                t.release_buf(b);
            }
            return;
        }
        s.pending -= 1;
        if !c.status.is_ok() && s.status.is_success() {
            s.status = to_nvme_status(c.status, io_type_hint);
        }
        if let Some(b) = c.bufs.into_buf() {
            s.buf = Some(b);
        }
        if s.pending > 0 {
            return;
        }
        if let Some(nsid) = s.flush_nsid.take()
            && s.status.is_success()
        {
            s.pending = 1;
            self.submit(nsid, IoRequest::no_data(IoType::Flush, 0, 0, i as u64));
            return;
        }
        let status = s.status;
        let opc = s.sqe.io_opcode();
        let cid = s.cid;
        if status.is_success() && opc == Some(IoOpcode::Read) {
            let len = s.len;
            let buf = s.buf.take().expect("read buffer");
            t.send_read_data(cid, buf, len);
        } else if status.is_success() && opc == Some(IoOpcode::Compare) {
            let len = s.len;
            let same = match (&s.buf, &s.compare) {
                (Some(a), Some(b)) => a.as_slice()[..len] == b.as_slice()[..len],
                _ => false,
            };
            if !same {
                return self.complete_slot(t, i, Status::COMPARE_FAILURE, 0, 0);
            }
        }
        self.complete_slot(t, i, status, 0, 0);
    }

    pub(super) fn reap<T: Transport>(&mut self, t: &mut T) -> usize {
        let mut n = 0;
        let Some(q) = self.bound.as_mut() else {
            return 0;
        };
        let mut done = std::mem::take(&mut self.done);
        for ns in q.ns.iter_mut().flatten() {
            n += ns.ch.poll(&mut done);
        }
        for c in done.drain(..) {
            let hint =
                self.slots[c.tag as usize]
                    .sqe
                    .io_opcode()
                    .map_or(IoType::Read, |o| match o {
                        IoOpcode::Write | IoOpcode::WriteZeroes | IoOpcode::DatasetManagement => {
                            IoType::Write
                        }
                        _ => IoType::Read,
                    });
            self.on_completion(t, c, hint);
        }
        self.done = done;
        n
    }

    /// Resubmits requests a full channel handed back, in order, until one is refused again.
    pub(super) fn resubmit(&mut self) -> usize {
        let mut work = 0;
        while let Some((nsid, io)) = self.retry.pop_front() {
            let q = self.bound.as_mut().expect("I/O queue");
            let ch = &mut q.ns[nsid as usize].as_mut().expect("namespace").ch;
            if let Err(io) = ch.submit(io) {
                self.retry.push_front((nsid, io));
                break;
            }
            work += 1;
        }
        work
    }
}
