//! The conformance suite every bdev runs, present and future (like SPDK's bdevio): one set of
//! checks, driven through the public [`Channel`] API only, chosen by the bdev's capabilities.
//!
//! A bdev's test calls [`run`] with a closure that opens it (and, for persistent bdevs, reopens
//! the same storage). Each check panics with a message naming the bdev and the case.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use crate::bdev::{Bdev, Channel, IoCompletion, IoRequest, Wake};
use crate::buf::{AlignedBuf, SgList};
use crate::reactor::{Poller, ReactorConfig, Reactors};
use crate::sync::SyncChannel;
use crate::types::{Caps, IoStatus, IoType, MAX_EXPORT_IO_BYTES, MAX_EXPORT_SEGMENTS};

/// Opens the bdev under test; called again to reopen it for the persistence check.
pub type Opener<'a> = &'a dyn Fn() -> Arc<dyn Bdev>;

/// Fills `buf` with a pattern that identifies `lba` and `generation` in every 8-byte word.
pub fn pattern(buf: &mut [u8], first_lba: u64, block_size: usize, generation: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let lba = first_lba + (i * 8 / block_size) as u64;
        let v = lba
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(generation << 32 | ((i * 8 % block_size) as u64));
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn patterned(first_lba: u64, blocks: u32, bs: usize, generation: u64) -> Vec<u8> {
    let mut v = vec![0u8; blocks as usize * bs];
    pattern(&mut v, first_lba, bs, generation);
    v
}

/// Runs every check that applies to the bdev's capabilities.
pub fn run(open: Opener<'_>, persistent_reopen: bool) {
    let bdev = open();
    let name = bdev.info().name().to_string();
    let caps = bdev.info().caps();
    check_geometry(&bdev);
    {
        let mut ch = SyncChannel::new(bdev.open_channel().expect("open channel"));
        if caps.contains(Caps::RETAINS_DATA) {
            check_read_after_write(&name, &mut ch);
            check_scatter_gather(&name, &mut ch);
        }
        check_large_io(&name, &mut ch, caps.contains(Caps::RETAINS_DATA));
        if caps.contains(Caps::UNMAP) {
            check_unmap(&name, &mut ch, caps);
        }
        if caps.contains(Caps::WRITE_ZEROES) {
            check_write_zeroes(&name, &mut ch, caps);
        }
        if caps.contains(Caps::FLUSH) {
            assert_eq!(ch.flush(), IoStatus::Success, "{name}: flush");
        }
        check_out_of_range(&name, &mut ch);
        check_malformed(&name, &mut ch);
        check_back_pressure(&name, ch.channel());
    }
    check_concurrent_reactors(&bdev, 2, 16);
    if persistent_reopen && caps.contains(Caps::PERSISTENT) {
        check_reopen(open, bdev);
    }
}

/// Geometry is consistent.
pub fn check_geometry(bdev: &Arc<dyn Bdev>) {
    let g = bdev.info().geometry();
    assert!(g.block_count > 0, "{}: empty bdev", bdev.info().name());
    assert!(g.max_transfer_blocks > 0 && g.max_segments > 0);
    assert!(g.buf_align.is_power_of_two());
}

/// Patterns written at the first, a middle and the last blocks read back identical.
pub fn check_read_after_write(name: &str, ch: &mut SyncChannel) {
    let bs = ch.block_size();
    let count = ch.channel().info().block_count();
    let runs: [(u64, u32); 4] = [
        (0, 1),
        (count / 2, 8.min(count as u32)),
        (count - 1, 1),
        (count.saturating_sub(3), 3.min(count as u32)),
    ];
    for (generation, &(lba, n)) in runs.iter().enumerate() {
        let data = patterned(lba, n, bs, generation as u64 + 1);
        assert_eq!(
            ch.write(lba, &data),
            IoStatus::Success,
            "{name}: write {lba}+{n}"
        );
        let (st, back) = ch.read(lba, n);
        assert_eq!(st, IoStatus::Success, "{name}: read {lba}+{n}");
        assert!(
            back == data,
            "{name}: read-after-write mismatch at {lba}+{n}"
        );
    }
    // Overwrite keeps neighbours intact.
    if count >= 3 {
        let a = patterned(0, 3, bs, 10);
        assert_eq!(ch.write(0, &a), IoStatus::Success);
        let b = patterned(1, 1, bs, 11);
        assert_eq!(ch.write(1, &b), IoStatus::Success);
        let (_, back) = ch.read(0, 3);
        assert!(
            back[..bs] == a[..bs],
            "{name}: block 0 disturbed by a write to block 1"
        );
        assert!(
            back[bs..2 * bs] == b[..],
            "{name}: overwrite of block 1 lost"
        );
        assert!(
            back[2 * bs..] == a[2 * bs..],
            "{name}: block 2 disturbed by a write to block 1"
        );
    }
}

/// Segment lengths for a request of `len` bytes: `segs` segments, sector multiples of uneven
/// lengths (not block multiples), as a guest's virtio-blk driver may send them.
fn uneven_segments(len: usize, segs: usize) -> Vec<usize> {
    let segs = segs.min(len / 512).max(1);
    let mut lens: Vec<usize> = (0..segs - 1).map(|i| 512 * (1 + i % 5)).collect();
    let used: usize = lens.iter().sum();
    if used >= len {
        return vec![len];
    }
    lens.push(len - used);
    lens
}

/// Reads and writes of every size a front may send, from one block up to the largest any
/// export advertises ([`MAX_EXPORT_IO_BYTES`]), across the bdev's own maximum transfer, with
/// scatter-gather lists of up to [`MAX_EXPORT_SEGMENTS`] uneven segments: the channel layer
/// splits what the bdev cannot take whole, and data round-trips through any segmentation.
pub fn check_large_io(name: &str, ch: &mut SyncChannel, retains_data: bool) {
    let bs = ch.block_size();
    let g = ch.channel().info().geometry();
    let count = g.block_count;
    let max_blocks = (MAX_EXPORT_IO_BYTES as usize / bs) as u64;
    let mut sizes = vec![1, 2, max_blocks / 2 + 1, max_blocks];
    let native = u64::from(g.max_transfer_blocks);
    if native < max_blocks {
        sizes.extend([native, native + 1, 2 * native + 3]);
    }
    sizes.retain(|&n| n >= 1 && n <= max_blocks);
    sizes.sort_unstable();
    sizes.dedup();
    for (generation, &n) in sizes.iter().enumerate() {
        let n = n.min(count) as u32;
        let lba = (count - u64::from(n)) / 3;
        let len = n as usize * bs;
        let data = patterned(lba, n, bs, 1000 + generation as u64);
        for segs in [1, MAX_EXPORT_SEGMENTS as usize] {
            let mut buf = AlignedBuf::new(len);
            buf.as_mut_slice().copy_from_slice(&data);
            let bufs = SgList::from_buf_split(buf, &uneven_segments(len, segs));
            let c = ch.run(IoRequest::write(lba, n, bufs, 0));
            assert_eq!(
                c.status,
                IoStatus::Success,
                "{name}: write of {n} blocks in {segs} segments"
            );
            let read_segs = if segs == 1 {
                MAX_EXPORT_SEGMENTS as usize
            } else {
                1
            };
            let bufs =
                SgList::from_buf_split(AlignedBuf::new(len), &uneven_segments(len, read_segs));
            let c = ch.run(IoRequest::read(lba, n, bufs, 0));
            assert_eq!(
                c.status,
                IoStatus::Success,
                "{name}: read of {n} blocks in {read_segs} segments"
            );
            if retains_data {
                let back = c.bufs.into_buf().expect("owned buffer");
                assert!(
                    back.as_slice()[..len] == data[..],
                    "{name}: {n}-block write in {segs} segments read back differently"
                );
            }
        }
    }
}

/// Requests whose buffers are split in odd segments (unaligned for O_DIRECT) work both ways.
pub fn check_scatter_gather(name: &str, ch: &mut SyncChannel) {
    let bs = ch.block_size();
    let n = 4u32.min(ch.channel().info().block_count() as u32);
    let len = n as usize * bs;
    let data = patterned(0, n, bs, 77);
    let mut buf = AlignedBuf::new(len);
    buf.as_mut_slice().copy_from_slice(&data);
    let split = [100, len / 2 - 100, len / 4, len - len / 2 - len / 4];
    let c = ch.run(IoRequest::write(
        0,
        n,
        SgList::from_buf_split(buf, &split),
        0,
    ));
    assert_eq!(c.status, IoStatus::Success, "{name}: scatter-gather write");
    let (st, back) = ch.read(0, n);
    assert_eq!(st, IoStatus::Success);
    assert!(back == data, "{name}: scatter-gather write mismatch");
    let c = ch.run(IoRequest::read(
        0,
        n,
        SgList::from_buf_split(AlignedBuf::new(len), &split),
        0,
    ));
    assert_eq!(c.status, IoStatus::Success, "{name}: scatter-gather read");
    assert!(
        c.bufs.into_buf().unwrap().as_slice() == &data[..],
        "{name}: scatter-gather read mismatch"
    );
}

/// Unmap succeeds; where the bdev says so, unmapped blocks read back as zeroes, and the blocks
/// around the range keep their data.
pub fn check_unmap(name: &str, ch: &mut SyncChannel, caps: Caps) {
    let bs = ch.block_size();
    let count = ch.channel().info().block_count();
    let n = 16u32.min(count as u32);
    if caps.contains(Caps::RETAINS_DATA) {
        assert_eq!(ch.write(0, &patterned(0, n, bs, 5)), IoStatus::Success);
    }
    let (lo, len) = if n >= 3 { (1, n - 2) } else { (0, n) };
    assert_eq!(ch.unmap(lo, len), IoStatus::Success, "{name}: unmap");
    if caps.contains(Caps::UNMAP_READS_ZEROES) {
        let (st, back) = ch.read(lo, len);
        assert_eq!(st, IoStatus::Success);
        assert!(
            back.iter().all(|&b| b == 0),
            "{name}: unmapped blocks are not zero"
        );
    }
    if caps.contains(Caps::RETAINS_DATA) && n >= 3 {
        let (_, first) = ch.read(0, 1);
        assert!(
            first == patterned(0, 1, bs, 5),
            "{name}: unmap disturbed block before the range"
        );
        let (_, last) = ch.read(u64::from(n - 1), 1);
        assert!(
            last == patterned(u64::from(n - 1), 1, bs, 5),
            "{name}: unmap disturbed block after the range"
        );
    }
    assert_eq!(
        ch.unmap(count - 1, 1),
        IoStatus::Success,
        "{name}: unmap last block"
    );
}

/// Write-zeroes zeroes exactly its range.
pub fn check_write_zeroes(name: &str, ch: &mut SyncChannel, caps: Caps) {
    let bs = ch.block_size();
    let count = ch.channel().info().block_count();
    let n = 8u32.min(count as u32);
    let at = count - u64::from(n);
    if caps.contains(Caps::RETAINS_DATA) {
        assert_eq!(ch.write(at, &patterned(at, n, bs, 9)), IoStatus::Success);
    }
    assert_eq!(
        ch.write_zeroes(at + 1, n - 1),
        IoStatus::Success,
        "{name}: write_zeroes"
    );
    if caps.contains(Caps::RETAINS_DATA) {
        let (st, back) = ch.read(at, n);
        assert_eq!(st, IoStatus::Success);
        assert!(
            back[..bs] == patterned(at, 1, bs, 9)[..],
            "{name}: write_zeroes spilled before its range"
        );
        assert!(
            back[bs..].iter().all(|&b| b == 0),
            "{name}: write_zeroes left data"
        );
    }
}

/// Requests beyond the end, or whose end overflows, fail with `InvalidRange`.
pub fn check_out_of_range(name: &str, ch: &mut SyncChannel) {
    let count = ch.channel().info().block_count();
    let bs = ch.block_size();
    let cases: [(IoType, u64, u32); 6] = [
        (IoType::Read, count, 1),
        (IoType::Read, count - 1, 2),
        (IoType::Write, count, 1),
        (IoType::Unmap, count - 1, 2),
        (IoType::WriteZeroes, u64::MAX, 1),
        (IoType::Read, u64::MAX - 1, 4),
    ];
    for (t, off, n) in cases {
        if !ch.channel().info().caps().contains(t.cap()) {
            continue;
        }
        let io = if t.has_data() {
            IoRequest {
                io_type: t,
                offset_blocks: off,
                num_blocks: n,
                bufs: SgList::from_buf(AlignedBuf::new(n as usize * bs)),
                tag: 0,
            }
        } else {
            IoRequest::no_data(t, off, n, 0)
        };
        let c = ch.run(io);
        assert_eq!(
            c.status,
            IoStatus::InvalidRange,
            "{name}: {t:?} at {off}+{n}"
        );
    }
}

/// Zero-length requests and buffers that do not match the block count fail with
/// `InvalidRequest`, and the bdev keeps working.
pub fn check_malformed(name: &str, ch: &mut SyncChannel) {
    let bs = ch.block_size();
    let cases = [
        IoRequest::read(0, 0, SgList::empty(), 0),
        IoRequest::read(0, 1, SgList::from_buf(AlignedBuf::new(bs - 1)), 0),
        IoRequest::write(0, 1, SgList::from_buf(AlignedBuf::new(bs + 512)), 0),
        IoRequest::read(0, 2, SgList::from_buf(AlignedBuf::new(bs)), 0),
        IoRequest::no_data(IoType::Unmap, 0, 0, 0),
        IoRequest {
            io_type: IoType::Flush,
            offset_blocks: 0,
            num_blocks: 0,
            bufs: SgList::from_buf(AlignedBuf::new(bs)),
            tag: 0,
        },
    ];
    for (i, io) in cases.into_iter().enumerate() {
        let t = io.io_type;
        if !ch.channel().info().caps().contains(t.cap()) {
            continue;
        }
        let c = ch.run(io);
        assert_eq!(
            c.status,
            IoStatus::InvalidRequest,
            "{name}: malformed case {i} ({t:?})"
        );
    }
    let (st, _) = ch.read(0, 1);
    assert_eq!(
        st,
        IoStatus::Success,
        "{name}: bdev broken after malformed requests"
    );
}

/// A full channel hands requests back instead of dropping them, and everything submitted
/// completes.
pub fn check_back_pressure(name: &str, ch: &mut Channel) {
    let bs = ch.info().block_size().bytes() as usize;
    let count = ch.info().block_count();
    let mut accepted = 0u64;
    let mut refused = None;
    for i in 0..ch.depth() as u64 + 1 {
        let io = IoRequest::read(i % count, 1, SgList::from_buf(AlignedBuf::new(bs)), i);
        match ch.submit(io) {
            Ok(()) => accepted += 1,
            Err(io) => {
                refused = Some(io.tag);
                break;
            }
        }
    }
    assert!(
        refused.is_some(),
        "{name}: channel accepted more than its depth"
    );
    let mut done = Vec::new();
    let mut idle = 0;
    while (done.len() as u64) < accepted {
        if ch.poll(&mut done) == 0 {
            idle += 1;
            assert!(idle < 100_000, "{name}: requests lost under back-pressure");
            if ch.wake() == Wake::Event
                && let Ok(r) = crate::uring::ThreadRing::current()
            {
                r.wait(Some(Duration::from_millis(1)));
            }
        }
    }
    assert!(
        done.iter().all(|c: &IoCompletion| c.status.is_ok()),
        "{name}: back-pressure reads failed"
    );
    assert_eq!(ch.in_flight(), 0);
}

/// A poller that writes then verifies a private region at a queue depth, on a reactor.
struct RegionJob {
    ch: Channel,
    first: u64,
    blocks: u64,
    qd: usize,
    next: u64,
    phase: u8,
    done: Vec<IoCompletion>,
    errors: Vec<String>,
    report: Option<mpsc::Sender<Vec<String>>>,
    bs: usize,
}

impl Poller for RegionJob {
    fn poll(&mut self) -> usize {
        if self.report.is_none() {
            return 0;
        }
        let mut work = 0;
        while self.ch.in_flight() < self.qd && self.next < self.blocks {
            let lba = self.first + self.next;
            let mut buf = AlignedBuf::new(self.bs);
            let io = if self.phase == 0 {
                pattern(buf.as_mut_slice(), lba, self.bs, 3);
                IoRequest::write(lba, 1, SgList::from_buf(buf), lba)
            } else {
                IoRequest::read(lba, 1, SgList::from_buf(buf), lba)
            };
            if self.ch.submit(io).is_err() {
                break;
            }
            self.next += 1;
            work += 1;
        }
        work += self.ch.poll(&mut self.done);
        for c in self.done.drain(..) {
            if !c.status.is_ok() {
                self.errors.push(format!("lba {}: {}", c.tag, c.status));
            } else if self.phase == 1 {
                let mut want = vec![0u8; self.bs];
                pattern(&mut want, c.tag, self.bs, 3);
                if c.bufs.buf().map(|b| b.as_slice()) != Some(&want[..]) {
                    self.errors.push(format!("lba {}: data mismatch", c.tag));
                }
            }
        }
        if self.next == self.blocks && self.ch.in_flight() == 0 {
            if self.phase == 0 {
                self.phase = 1;
                self.next = 0;
            } else if let Some(tx) = self.report.take() {
                let _ = tx.send(std::mem::take(&mut self.errors));
            }
        }
        work
    }

    fn wake(&self) -> Wake {
        self.ch.wake()
    }

    fn in_flight(&self) -> usize {
        self.ch.in_flight()
    }
}

/// Each of `reactors` reactors writes and verifies its own region at queue depth `qd`, all at
/// the same time.
pub fn check_concurrent_reactors(bdev: &Arc<dyn Bdev>, reactors: usize, qd: usize) {
    let name = bdev.info().name().to_string();
    if !bdev
        .info()
        .caps()
        .contains(Caps::RETAINS_DATA | Caps::WRITE)
    {
        return;
    }
    let r = Reactors::start(&ReactorConfig {
        cpus: vec![None; reactors],
        idle_poll: Duration::from_micros(50),
    })
    .expect("start reactors");
    let count = bdev.info().block_count();
    let per = (count / reactors as u64).min(256);
    assert!(per > 0, "{name}: too small for the concurrency check");
    let (tx, rx) = mpsc::channel();
    for (i, h) in r.handles().iter().enumerate() {
        let bdev = bdev.clone();
        let tx = tx.clone();
        let bs = bdev.info().block_size().bytes() as usize;
        h.send(move |core| {
            let ch = bdev.open_channel().expect("open channel on reactor");
            core.add_poller(Box::new(RegionJob {
                ch,
                first: i as u64 * per,
                blocks: per,
                qd,
                next: 0,
                phase: 0,
                done: Vec::new(),
                errors: Vec::new(),
                report: Some(tx),
                bs,
            }));
        });
    }
    for _ in 0..reactors {
        let errors = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{name}: concurrent job timed out"));
        assert!(
            errors.is_empty(),
            "{name}: concurrent job failed: {errors:?}"
        );
    }
    r.shutdown(Duration::from_secs(5));
}

/// Data written and flushed survives closing and reopening the bdev.
pub fn check_reopen(open: Opener<'_>, bdev: Arc<dyn Bdev>) {
    let name = bdev.info().name().to_string();
    let bs = bdev.info().block_size().bytes() as usize;
    let count = bdev.info().block_count();
    let at = count / 3;
    let data = patterned(at, 4.min(count as u32), bs, 42);
    {
        let mut ch = SyncChannel::new(bdev.open_channel().expect("open"));
        assert_eq!(ch.write(at, &data), IoStatus::Success);
        assert_eq!(ch.flush(), IoStatus::Success);
    }
    drop(bdev);
    let again = open();
    let mut ch = SyncChannel::new(again.open_channel().expect("reopen"));
    let (st, back) = ch.read(at, (data.len() / bs) as u32);
    assert_eq!(st, IoStatus::Success);
    assert!(back == data, "{name}: data lost across reopen");
}
