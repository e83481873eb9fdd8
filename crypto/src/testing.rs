//! Helpers shared by the tests of the XTS and GCM bdevs: a base that records where its reads put
//! their data, and the checks built on it.

use std::sync::{Arc, Mutex};

use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{
    AlignedBuf, Bdev, BdevError, BdevInfo, Channel, ChannelOps, IoCompletion, IoRequest, IoStatus,
    IoType, SgList, Wake,
};

use crate::common::{LARGE_BUFS, MAX_TRANSFER_BYTES};

/// A bdev passing everything to its base, recording the memory ranges (start, length) of the
/// segments of every read it is given.
pub(crate) struct ReadSpy {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    reads: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl ReadSpy {
    /// A spy over `base`, with its geometry.
    pub(crate) fn new(base: Arc<dyn Bdev>) -> Arc<ReadSpy> {
        let g = base.info().geometry();
        let info = BdevInfo::builder("spy", "read_spy", g.block_size, g.block_count, g.caps)
            .buf_align(g.buf_align)
            .max_transfer_blocks(g.max_transfer_blocks)
            .max_segments(g.max_segments)
            .build();
        Arc::new(ReadSpy {
            info,
            base,
            reads: Arc::default(),
        })
    }

    /// Forgets the reads recorded so far.
    pub(crate) fn clear(&self) {
        self.reads.lock().unwrap().clear();
    }

    /// Whether a read recorded since [`ReadSpy::clear`] had a segment overlapping `buf`.
    pub(crate) fn read_into(&self, buf: &AlignedBuf) -> bool {
        let (start, end) = (buf.as_slice().as_ptr() as usize, buf.len());
        let end = start + end;
        self.reads
            .lock()
            .unwrap()
            .iter()
            .any(|&(s, len)| s < end && start < s + len)
    }
}

impl Bdev for ReadSpy {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth();
        let ops = SpyChannel {
            base,
            reads: self.reads.clone(),
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }
}

struct SpyChannel {
    base: Channel,
    reads: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl ChannelOps for SpyChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        if io.io_type == IoType::Read {
            let mut reads = self.reads.lock().unwrap();
            reads.extend(io.bufs.segments().iter().map(|s| (s.base as usize, s.len)));
        }
        self.base.submit(io)
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        self.base.poll(done)
    }

    fn wake(&self) -> Wake {
        self.base.wake()
    }
}

/// Writes `blocks` blocks of a pattern at `lba` through `ch`, reads them back into a caller's
/// buffer split into uneven segments, and checks the data and that no base read ever went into
/// the caller's memory (the cipher runs in the channel's own buffers, the caller's buffer gets
/// only the plaintext, copied once).
pub(crate) fn assert_reads_never_reach_the_callers_buffer(
    spy: &ReadSpy,
    ch: &mut SyncChannel,
    lba: u64,
    blocks: u32,
) {
    let bs = ch.block_size();
    let len = blocks as usize * bs;
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8 + 1).collect();
    let mut w = AlignedBuf::new(len);
    w.as_mut_slice().copy_from_slice(&data);
    let c = ch.run(IoRequest::write(lba, blocks, SgList::from_buf(w), 0));
    assert_eq!(c.status, IoStatus::Success);
    let caller = AlignedBuf::new(len);
    spy.clear();
    // Uneven segments, some units straddling two of them.
    let lens = [100, len / 2 - 100, 4, len / 2 - 4];
    let c = ch.run(IoRequest::read(
        lba,
        blocks,
        SgList::from_buf_split(caller, &lens),
        0,
    ));
    assert_eq!(c.status, IoStatus::Success);
    let back = c.bufs.into_buf().unwrap();
    assert!(back.as_slice() == &data[..], "the read returns the data");
    assert!(
        !spy.read_into(&back),
        "the base read into the caller's buffer"
    );
}

/// Submits, without polling, reads of [`MAX_TRANSFER_BYTES`] to a fresh channel of `bdev` until
/// one is handed back: that must be the one past [`LARGE_BUFS`] (each read holds a pool buffer
/// until it completes). Then completes them, and checks the channel takes as many again (the
/// buffers came back) and that every read returns what `expect(lba)` gives.
pub(crate) fn assert_reads_hold_pool_buffers(bdev: &dyn Bdev, expect: &dyn Fn(u64) -> Vec<u8>) {
    let bs = bdev.info().block_size().bytes() as usize;
    let blocks = (MAX_TRANSFER_BYTES / bs) as u32;
    let mut ch = bdev.open_channel().unwrap();
    let mut done = Vec::new();
    for round in 0..2 {
        let mut accepted = 0u64;
        loop {
            let lba = accepted * u64::from(blocks);
            let buf = AlignedBuf::new(MAX_TRANSFER_BYTES);
            let io = IoRequest::read(lba, blocks, SgList::from_buf(buf), lba);
            if ch.submit(io).is_err() {
                break;
            }
            accepted += 1;
            assert!(
                accepted <= LARGE_BUFS as u64,
                "round {round}: more reads than buffers"
            );
        }
        assert_eq!(accepted, LARGE_BUFS as u64, "round {round}: reads accepted");
        while done.len() < LARGE_BUFS {
            ch.poll(&mut done);
        }
        for c in done.drain(..) {
            assert_eq!(c.status, IoStatus::Success);
            let got = c.bufs.into_buf().unwrap();
            for (i, b) in got.as_slice().chunks_exact(bs).enumerate() {
                assert!(
                    b == &expect(c.tag + i as u64)[..],
                    "block {}",
                    c.tag + i as u64
                );
            }
        }
    }
}
