//! Request splitting for the [`Channel`](crate::bdev::Channel) layer, as SPDK's bdev layer does
//! it: a read or write larger than the bdev's maximum transfer, or with more segments than it
//! takes, is cut into child requests that each fit; the parent completes when its last child
//! does, with the first error any child reported.
//!
//! Nothing here allocates per request once warm: parent slots are sized to the channel's depth
//! when the channel opens, and the segment vectors of child requests are recycled through a
//! pool (a vector is allocated only the first time more children are in flight at once than
//! ever before on this channel). Children point into the parent's buffers, which stay in the
//! parent's slot until every child has completed, so no data is copied.
//!
//! Children are submitted in order while the bdev accepts them; a bdev that is full hands a
//! child back, the parent waits in a queue, and the layer submits the rest after completions.

use std::collections::VecDeque;

use crate::bdev::{ChannelOps, IoCompletion, IoRequest};
use crate::buf::{IoSeg, SgList};
use crate::types::IoStatus;

/// Tag bit that marks a child request; the rest of a child's tag is its parent's slot.
/// Submitters' own tags must leave it clear (the layer rejects those that do not).
pub const CHILD_TAG: u64 = 1 << 63;

/// A split request in progress.
struct Parent {
    /// The request as submitted: its tag, range and buffers (the children point into them).
    io: IoRequest,
    /// Blocks handed to children so far.
    issued_blocks: u32,
    /// Where the next child starts in the parent's segments: segment index and byte offset.
    seg: usize,
    seg_off: usize,
    /// Children submitted and not yet completed.
    outstanding: u32,
    /// The first error any child reported (or a shape the bdev cannot take).
    status: IoStatus,
    /// Whether the parent waits in the stalled queue (the bdev refused its next child).
    stalled: bool,
}

/// The splitting state of one channel.
pub(crate) struct Splitter {
    parents: Vec<Option<Parent>>,
    free: Vec<u32>,
    stalled: VecDeque<u32>,
    seg_pool: Vec<Vec<IoSeg>>,
    max_blocks: u32,
    max_segs: usize,
    shift: u32,
}

impl Splitter {
    /// A splitter for a channel of `depth` requests whose bdev takes at most `max_blocks` blocks
    /// of `1 << shift` bytes and `max_segs` segments per request.
    pub(crate) fn new(depth: usize, max_blocks: u32, max_segs: u32, shift: u32) -> Splitter {
        Splitter {
            parents: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            stalled: VecDeque::with_capacity(depth),
            seg_pool: Vec::new(),
            max_blocks: max_blocks.max(1),
            max_segs: (max_segs as usize).max(1),
            shift,
        }
    }

    /// Whether a validated data request must be split to reach the bdev.
    #[inline]
    pub(crate) fn needs_split(&self, io: &IoRequest) -> bool {
        io.io_type.has_data()
            && (io.num_blocks > self.max_blocks || io.bufs.segments().len() > self.max_segs)
    }

    /// Whether any split request is in progress.
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.free.len() != self.parents.len()
    }

    /// Whether a split request waits for the bdev to take its next child.
    #[inline]
    pub(crate) fn has_stalled(&self) -> bool {
        !self.stalled.is_empty()
    }

    /// Takes a request that [`Splitter::needs_split`] and submits as many children as `ops`
    /// accepts. Returns the number of children submitted; a parent that is already finished (a
    /// shape no child can take) goes to `ready`.
    ///
    /// # Panics
    /// If no parent slot is free: the channel admits at most `depth` requests, so one always is.
    pub(crate) fn start(
        &mut self,
        io: IoRequest,
        ops: &mut dyn ChannelOps,
        ready: &mut VecDeque<IoCompletion>,
    ) -> usize {
        let slot = self.free.pop().expect("a parent slot per admitted request");
        self.parents[slot as usize] = Some(Parent {
            io,
            issued_blocks: 0,
            seg: 0,
            seg_off: 0,
            outstanding: 0,
            status: IoStatus::Success,
            stalled: false,
        });
        self.advance(slot, ops, ready)
    }

    /// Handles the completion of a child (a completion whose tag has [`CHILD_TAG`]): records its
    /// status, recycles its segment list, submits the parent's next children and completes the
    /// parent into `ready` when it is done. Returns the number of children submitted.
    pub(crate) fn child_done(
        &mut self,
        c: IoCompletion,
        ops: &mut dyn ChannelOps,
        ready: &mut VecDeque<IoCompletion>,
    ) -> usize {
        let slot = (c.tag & !CHILD_TAG) as u32;
        self.seg_pool.push(c.bufs.into_vec());
        let p = self.parents[slot as usize]
            .as_mut()
            .expect("a child completes into a live parent");
        p.outstanding -= 1;
        if !c.status.is_ok() && p.status.is_ok() {
            p.status = c.status;
        }
        if p.stalled {
            // Resumed from the stalled queue, in order.
            return 0;
        }
        self.advance(slot, ops, ready)
    }

    /// Submits the children of stalled parents, oldest first, until the bdev refuses one.
    /// Returns the number of children submitted.
    pub(crate) fn retry_stalled(
        &mut self,
        ops: &mut dyn ChannelOps,
        ready: &mut VecDeque<IoCompletion>,
    ) -> usize {
        let mut submitted = 0;
        while let Some(slot) = self.stalled.pop_front() {
            if let Some(p) = self.parents[slot as usize].as_mut() {
                p.stalled = false;
            }
            submitted += self.advance(slot, ops, ready);
            if self.parents[slot as usize]
                .as_ref()
                .is_some_and(|p| p.stalled)
            {
                // Refused again: it went back to the queue's tail; keep its turn.
                let back = self.stalled.pop_back();
                debug_assert_eq!(back, Some(slot));
                self.stalled.push_front(slot);
                break;
            }
        }
        submitted
    }

    /// Submits the next children of the parent in `slot` until it has no more or the bdev
    /// refuses one; completes the parent into `ready` once nothing is left in flight.
    fn advance(
        &mut self,
        slot: u32,
        ops: &mut dyn ChannelOps,
        ready: &mut VecDeque<IoCompletion>,
    ) -> usize {
        let mut submitted = 0;
        loop {
            let p = self.parents[slot as usize].as_mut().expect("live parent");
            if p.issued_blocks == p.io.num_blocks || !p.status.is_ok() {
                if p.outstanding == 0 {
                    let p = self.parents[slot as usize].take().expect("live parent");
                    self.free.push(slot);
                    ready.push_back(p.io.complete(p.status));
                }
                return submitted;
            }
            let left = u64::from(p.io.num_blocks - p.issued_blocks) << self.shift;
            let cap = left.min(u64::from(self.max_blocks) << self.shift);
            let all = p.io.bufs.segments();
            // How far the segments allowed reach, in whole blocks (a child carries whole blocks).
            let (mut reach, mut n, mut i, mut off) = (0u64, 0, p.seg, p.seg_off);
            while n < self.max_segs && reach < cap && i < all.len() {
                reach += ((all[i].len - off) as u64).min(cap - reach);
                n += 1;
                i += 1;
                off = 0;
            }
            let bytes = reach & !((1u64 << self.shift) - 1);
            if bytes == 0 {
                // Segments too short for even one block within the bdev's segment limit.
                p.status = IoStatus::InvalidRequest;
                continue;
            }
            let mut segs = self.seg_pool.pop().unwrap_or_default();
            let (mut i, mut off, mut put) = (p.seg, p.seg_off, 0u64);
            while put < bytes {
                let s = all[i];
                let take = ((s.len - off) as u64).min(bytes - put) as usize;
                segs.push(IoSeg {
                    // SAFETY: `off + take <= s.len`: the pointer stays inside the parent's
                    // segment.
                    base: unsafe { s.base.add(off) },
                    len: take,
                });
                put += take as u64;
                off += take;
                if off == s.len {
                    i += 1;
                    off = 0;
                }
            }
            let num_blocks = (bytes >> self.shift) as u32;
            let child = IoRequest {
                io_type: p.io.io_type,
                offset_blocks: p.io.offset_blocks + u64::from(p.issued_blocks),
                num_blocks,
                // SAFETY: the segments lie inside the parent's, which stay valid (owned by the
                // parent request, held in its slot) until this child and its siblings complete.
                bufs: unsafe { SgList::from_raw_vec(segs) },
                tag: CHILD_TAG | u64::from(slot),
            };
            match ops.submit(child) {
                Ok(()) => {
                    p.issued_blocks += num_blocks;
                    p.seg = i;
                    p.seg_off = off;
                    p.outstanding += 1;
                    submitted += 1;
                }
                Err(child) => {
                    self.seg_pool.push(child.bufs.into_vec());
                    p.stalled = true;
                    self.stalled.push_back(slot);
                    return submitted;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use super::CHILD_TAG;
    use crate::bdev::{BdevInfo, Channel, ChannelOps, IoCompletion, IoRequest, Wake};
    use crate::buf::{AlignedBuf, SgList};
    use crate::types::{BlockSize, Caps, IoStatus, IoType};

    const BS: usize = 4096;
    const MAX_BLOCKS: u32 = 8;
    const MAX_SEGS: u32 = 4;

    /// A RAM bdev that enforces its limits (a request past them fails the test), takes at most
    /// `capacity` requests at once, completes them one poll later, and fails any request that
    /// touches `bad_lba`.
    struct LimitedRam {
        mem: Vec<u8>,
        capacity: usize,
        queued: VecDeque<IoCompletion>,
        bad_lba: Option<u64>,
    }

    impl ChannelOps for LimitedRam {
        fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
            if self.queued.len() >= self.capacity {
                return Err(io);
            }
            assert!(io.num_blocks <= MAX_BLOCKS, "child over the max transfer");
            assert!(
                io.bufs.segments().len() <= MAX_SEGS as usize,
                "child over max segments"
            );
            assert_eq!(io.bufs.total_len(), io.num_blocks as usize * BS);
            let at = io.offset_blocks as usize * BS;
            let len = io.num_blocks as usize * BS;
            let bad = self.bad_lba.is_some_and(|b| {
                (io.offset_blocks..io.offset_blocks + u64::from(io.num_blocks)).contains(&b)
            });
            let mut io = io;
            let status = if bad {
                IoStatus::MediaError
            } else {
                match io.io_type {
                    IoType::Write => {
                        io.bufs.copy_to_slice(0, &mut self.mem[at..at + len]);
                    }
                    IoType::Read => {
                        io.bufs.copy_from_slice(0, &self.mem[at..at + len]);
                    }
                    _ => {}
                }
                IoStatus::Success
            };
            self.queued.push_back(io.complete(status));
            Ok(())
        }

        fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
            // One at a time: children of one parent complete across several polls.
            match self.queued.pop_front() {
                Some(c) => {
                    done.push(c);
                    1
                }
                None => 0,
            }
        }

        fn wake(&self) -> Wake {
            Wake::Immediate
        }
    }

    fn channel(blocks: u64, capacity: usize, bad_lba: Option<u64>, depth: usize) -> Channel {
        let info = BdevInfo::builder("ram", "test", BlockSize::B4096, blocks, Caps::ALL_IO)
            .max_transfer_blocks(MAX_BLOCKS)
            .max_segments(MAX_SEGS)
            .build();
        let ops = LimitedRam {
            mem: vec![0; blocks as usize * BS],
            capacity,
            queued: VecDeque::new(),
            bad_lba,
        };
        Channel::new(info, Box::new(ops), depth)
    }

    fn drain(ch: &mut Channel, want: usize) -> Vec<IoCompletion> {
        let mut done = Vec::new();
        for _ in 0..100_000 {
            if done.len() == want {
                break;
            }
            ch.poll(&mut done);
        }
        assert_eq!(done.len(), want, "completions missing");
        assert_eq!(ch.in_flight(), 0);
        done
    }

    /// Uneven segment lengths (not block multiples) summing to `blocks` blocks.
    fn odd_split(blocks: usize, segs: usize) -> Vec<usize> {
        let total = blocks * BS;
        let mut lens: Vec<usize> = (0..segs - 1).map(|i| 512 + (i * 1536) % 7000).collect();
        let used: usize = lens.iter().sum();
        assert!(used < total);
        lens.push(total - used);
        lens
    }

    #[test]
    fn large_requests_split_into_children_that_fit_and_round_trip() {
        let mut ch = channel(1024, 3, None, 4);
        let blocks = 256u32; // 1 MiB: 32 children by size alone
        let mut data = AlignedBuf::new(blocks as usize * BS);
        for (i, b) in data.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 7 + i / 4096) as u8;
        }
        let expect = data.as_slice().to_vec();
        let lens = odd_split(blocks as usize, 126);
        ch.submit(IoRequest::write(
            100,
            blocks,
            SgList::from_buf_split(data, &lens),
            7,
        ))
        .expect("accepted");
        let done = drain(&mut ch, 1);
        assert_eq!((done[0].tag, done[0].status), (7, IoStatus::Success));

        // Read back with a different segmentation, and as many single-block reads.
        let lens = odd_split(blocks as usize, 40);
        ch.submit(IoRequest::read(
            100,
            blocks,
            SgList::from_buf_split(AlignedBuf::new(blocks as usize * BS), &lens),
            8,
        ))
        .expect("accepted");
        let mut done = drain(&mut ch, 1);
        assert_eq!(done[0].status, IoStatus::Success);
        let c = done.pop().unwrap();
        let back = c.bufs.into_buf().unwrap();
        assert!(
            back.as_slice() == &expect[..],
            "split read differs from split write"
        );
        let stats = ch.info().stats();
        assert_eq!(
            stats.ops[IoType::Write as usize],
            1,
            "a split request counts once"
        );
        assert_eq!(stats.errors, 0);
    }

    #[test]
    fn many_split_requests_at_full_depth_all_complete() {
        let depth = 8;
        let mut ch = channel(4096, 2, None, depth);
        for r in 0..depth as u64 {
            let lens = odd_split(40, 11);
            let io = IoRequest::write(
                r * 64,
                40,
                SgList::from_buf_split(AlignedBuf::new(40 * BS), &lens),
                r,
            );
            ch.submit(io).expect("within depth");
        }
        let extra = IoRequest::read(0, 1, SgList::from_buf(AlignedBuf::new(BS)), 99);
        assert!(ch.submit(extra).is_err(), "depth holds for split requests");
        let mut done = drain(&mut ch, depth);
        done.sort_by_key(|c| c.tag);
        for (i, c) in done.iter().enumerate() {
            assert_eq!((c.tag, c.status), (i as u64, IoStatus::Success));
        }
    }

    #[test]
    fn first_child_error_fails_the_parent_only() {
        let mut ch = channel(1024, 4, Some(50), 4);
        let io = IoRequest::write(0, 100, SgList::from_buf(AlignedBuf::new(100 * BS)), 1);
        ch.submit(io).unwrap();
        let io = IoRequest::write(200, 100, SgList::from_buf(AlignedBuf::new(100 * BS)), 2);
        ch.submit(io).unwrap();
        let mut done = drain(&mut ch, 2);
        done.sort_by_key(|c| c.tag);
        assert_eq!(done[0].status, IoStatus::MediaError);
        assert_eq!(done[1].status, IoStatus::Success);
        assert_eq!(
            done[0].bufs.total_len(),
            100 * BS,
            "buffers come back whole"
        );
    }

    #[test]
    fn segments_too_small_for_a_block_fail_cleanly() {
        // 4 segments (the bdev's limit) of 512 bytes cannot hold one 4 KiB block.
        let mut ch = channel(64, 4, None, 4);
        let lens = vec![512; 16];
        let io = IoRequest::write(
            0,
            2,
            SgList::from_buf_split(AlignedBuf::new(2 * BS), &lens),
            3,
        );
        ch.submit(io).unwrap();
        let done = drain(&mut ch, 1);
        assert_eq!(done[0].status, IoStatus::InvalidRequest);
        let (st, _) = crate::sync::SyncChannel::new(ch).read(0, 1);
        assert_eq!(st, IoStatus::Success, "channel works after a refused shape");
    }

    #[test]
    fn submitter_tags_with_the_child_bit_are_refused() {
        let mut ch = channel(64, 4, None, 4);
        let io = IoRequest::read(0, 1, SgList::from_buf(AlignedBuf::new(BS)), CHILD_TAG | 5);
        ch.submit(io).unwrap();
        let done = drain(&mut ch, 1);
        assert_eq!(done[0].status, IoStatus::InvalidRequest);
        let _ = Arc::clone(ch.info());
    }

    #[test]
    fn one_request_in_sample_every_is_timed_into_the_histogram() {
        use crate::bdev::{LATENCY_BUCKETS, LATENCY_SAMPLE_EVERY, latency_bucket};
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(999), 0);
        assert_eq!(latency_bucket(1_000), 1);
        assert_eq!(latency_bucket(3_999), 2);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        let mut ch = channel(64, 4, None, 4);
        let n = 10 * LATENCY_SAMPLE_EVERY as usize;
        for i in 0..n {
            let io = IoRequest::read(i as u64 % 64, 1, SgList::from_buf(AlignedBuf::new(BS)), 1);
            ch.submit(io).unwrap();
            drain(&mut ch, 1);
        }
        let s = ch.info().stats();
        assert_eq!(s.latency.iter().sum::<u64>(), 10, "{:?}", s.latency);
    }
}
