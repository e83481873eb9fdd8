//! Blocking I/O on a channel, for the control plane and tests (a shutdown flush, a metadata
//! read, the conformance suite). Never used on a reactor's hot path.

use std::time::{Duration, Instant};

use crate::bdev::{Channel, IoCompletion, IoRequest, Wake};
use crate::buf::{AlignedBuf, SgList};
use crate::types::{IoStatus, IoType};
use crate::uring::ThreadRing;

/// A channel driven synchronously by the calling thread.
pub struct SyncChannel {
    ch: Channel,
    done: Vec<IoCompletion>,
    next_tag: u64,
}

impl SyncChannel {
    /// Wraps a channel opened on this thread.
    pub fn new(ch: Channel) -> SyncChannel {
        SyncChannel {
            ch,
            done: Vec::new(),
            next_tag: 1,
        }
    }

    /// The wrapped channel.
    pub fn channel(&mut self) -> &mut Channel {
        &mut self.ch
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.ch.info().block_size().bytes() as usize
    }

    /// Polls once; sleeps briefly first if nothing is ready.
    pub fn poll_once(&mut self, out: &mut Vec<IoCompletion>) {
        if self.ch.poll(out) > 0 {
            return;
        }
        match self.ch.wake() {
            Wake::Immediate => {}
            Wake::At(t) => std::thread::sleep(t.saturating_duration_since(Instant::now())),
            Wake::Event => {
                if let Ok(r) = ThreadRing::current() {
                    r.wait(Some(Duration::from_millis(1)));
                }
            }
        }
        self.ch.poll(out);
    }

    /// Submits `io` (retrying while the channel is full) and waits for its completion.
    pub fn run(&mut self, mut io: IoRequest) -> IoCompletion {
        let tag = self.next_tag;
        self.next_tag += 1;
        io.tag = tag;
        let mut pending = Some(io);
        loop {
            if let Some(io) = pending.take()
                && let Err(io) = self.ch.submit(io)
            {
                pending = Some(io);
            }
            if let Some(i) = self.done.iter().position(|c| c.tag == tag) {
                return self.done.swap_remove(i);
            }
            let mut out = std::mem::take(&mut self.done);
            self.poll_once(&mut out);
            self.done = out;
        }
    }

    /// Reads `num_blocks` at `offset`; returns the status and the data.
    pub fn read(&mut self, offset: u64, num_blocks: u32) -> (IoStatus, Vec<u8>) {
        let len = num_blocks as usize * self.block_size();
        let c = self.run(IoRequest::read(
            offset,
            num_blocks,
            SgList::from_buf(AlignedBuf::new(len)),
            0,
        ));
        let data = c
            .bufs
            .into_buf()
            .map(|b| b.as_slice().to_vec())
            .unwrap_or_default();
        (c.status, data)
    }

    /// Writes `data` (a whole number of blocks) at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> IoStatus {
        let mut b = AlignedBuf::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        let n = (data.len() / self.block_size()) as u32;
        self.run(IoRequest::write(offset, n, SgList::from_buf(b), 0))
            .status
    }

    /// Flushes.
    pub fn flush(&mut self) -> IoStatus {
        self.run(IoRequest::no_data(IoType::Flush, 0, 0, 0)).status
    }

    /// Unmaps a range.
    pub fn unmap(&mut self, offset: u64, num_blocks: u32) -> IoStatus {
        self.run(IoRequest::no_data(IoType::Unmap, offset, num_blocks, 0))
            .status
    }

    /// Zeroes a range.
    pub fn write_zeroes(&mut self, offset: u64, num_blocks: u32) -> IoStatus {
        self.run(IoRequest::no_data(
            IoType::WriteZeroes,
            offset,
            num_blocks,
            0,
        ))
        .status
    }
}
