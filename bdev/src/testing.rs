//! Helpers for the tests of bdevs, in this crate and in others (feature `conformance`, like
//! [`crate::conformance`]): bases to stack on, data patterns, a small deterministic random
//! generator, tampering with a base behind a stacked bdev, and checks that several bdevs share.
//! Each helper panics with a message naming the case when something is wrong.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use crate::bdev::{Bdev, IoCompletion, IoRequest};
use crate::buf::{AlignedBuf, SgList};
use crate::file::{DirectMode, FileBdev, FileOptions};
use crate::malloc::MallocBdev;
use crate::mdregion::MdLayout;
use crate::sync::SyncChannel;
use crate::types::{BlockSize, IoStatus, IoType};
use crate::uring::ThreadRing;

/// A RAM bdev `"m"` of `blocks` blocks of `bs`.
pub fn malloc(bs: BlockSize, blocks: u64) -> Arc<dyn Bdev> {
    Arc::new(MallocBdev::new("m", bs, blocks, blocks).expect("malloc bdev"))
}

/// Options of a file bdev of `size` bytes of blocks of `bs` at `path`, created if missing.
pub fn file_options(path: &Path, bs: BlockSize, size: u64) -> FileOptions {
    FileOptions {
        path: path.to_path_buf(),
        block_size: bs,
        size: Some(size),
        create: true,
        direct: DirectMode::Auto,
        read_only: false,
    }
}

/// A file bdev `"f"` of `blocks` blocks of `bs` at `path`, created if missing.
pub fn file(path: &Path, bs: BlockSize, blocks: u64) -> Arc<dyn Bdev> {
    let o = file_options(path, bs, bs.to_bytes(blocks));
    Arc::new(FileBdev::open("f", &o).expect("file bdev"))
}

/// A xorshift generator: the same sequence for the same seed (which must not be zero).
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The contents of block `lba` in `generation`: [`crate::conformance::pattern`].
pub fn block_data(lba: u64, bs: usize, generation: u8) -> Vec<u8> {
    let mut v = vec![0u8; bs];
    crate::conformance::pattern(&mut v, lba, bs, u64::from(generation));
    v
}

/// Writes [`block_data`] of `generation` to blocks `0 .. blocks`, in 32-block requests.
pub fn fill(ch: &mut SyncChannel, blocks: u64, bs: usize, generation: u8) {
    let mut lba = 0;
    while lba < blocks {
        let n = (blocks - lba).min(32);
        let data: Vec<u8> = (lba..lba + n)
            .flat_map(|l| block_data(l, bs, generation))
            .collect();
        assert_eq!(ch.write(lba, &data), IoStatus::Success, "fill at {lba}");
        lba += n;
    }
}

/// Flips one bit of byte `offset` of block `lba`.
pub fn flip(raw: &mut SyncChannel, lba: u64, offset: usize) {
    let (st, mut b) = raw.read(lba, 1);
    assert_eq!(st, IoStatus::Success);
    b[offset] ^= 0x10;
    assert_eq!(raw.write(lba, &b), IoStatus::Success);
}

/// Tampers with a metadata-region bdev laid out as `l` through its base's channel `raw`: fills
/// every data block but the last 64 (which stay never written) through `ch` with [`fill`]'s
/// generation 1, then picks `count` distinct random blocks and flips one bit of each, in its
/// data or in its entry (each about half of the time). Returns the blocks picked, and the
/// blocks written (`0 .. written`).
pub fn tamper_sampled(
    ch: &mut SyncChannel,
    raw: &mut SyncChannel,
    l: &MdLayout,
    count: usize,
) -> (BTreeSet<u64>, u64) {
    let bs = ch.block_size();
    let written = l.data_blocks - 64;
    fill(ch, written, bs, 1);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut chosen = BTreeSet::new();
    while chosen.len() < count {
        chosen.insert(rng.below(l.data_blocks));
    }
    let mut in_data = 0;
    for &lba in &chosen {
        if rng.next() & 1 == 0 {
            flip(raw, l.data_start + lba, rng.below(bs as u64) as usize);
            in_data += 1;
        } else {
            let (md, off) = l.entry_of(lba);
            flip(
                raw,
                l.md_start + md,
                off + rng.below(l.entry_bytes as u64) as usize,
            );
        }
    }
    assert!(
        in_data > count / 5 && in_data < 4 * count / 5,
        "both kinds of tampering are exercised ({in_data} of {count} in data)"
    );
    (chosen, written)
}

/// After [`tamper_sampled`]: every tampered block fails its read and returns only zeroes.
pub fn assert_each_tampered_block_fails(ch: &mut SyncChannel, chosen: &BTreeSet<u64>) {
    let mut detected = 0;
    for &lba in chosen {
        let (st, data) = ch.read(lba, 1);
        if st == IoStatus::IntegrityError {
            detected += 1;
        }
        assert!(
            data.iter().all(|&x| x == 0),
            "lba {lba}: a failed read returned data"
        );
    }
    assert_eq!(
        detected,
        chosen.len(),
        "tampered blocks detected out of {}",
        chosen.len()
    );
}

/// After [`tamper_sampled`]: a multi-block read over a tampered block fails whole and returns
/// nothing, and untouched written blocks still read back. Returns that tampered block.
pub fn assert_reads_around_tampering(
    ch: &mut SyncChannel,
    chosen: &BTreeSet<u64>,
    written: u64,
) -> u64 {
    let bs = ch.block_size();
    let &t = chosen.iter().find(|&&x| x > 4 && x < written).unwrap();
    let (st, data) = ch.read(t - 2, 4);
    assert_eq!(st, IoStatus::IntegrityError, "a read over tampered {t}");
    assert!(data.iter().all(|&x| x == 0));
    for lba in (0..written).filter(|x| !chosen.contains(x)).step_by(37) {
        let (st, data) = ch.read(lba, 1);
        assert_eq!(st, IoStatus::Success, "lba {lba}");
        assert!(data == block_data(lba, bs, 1), "lba {lba}");
    }
    t
}

/// Two channels of `bdev` write blocks `0 .. blocks` (of 4 KiB) at once, one the even blocks and
/// the other the odd ones, each as many at a time as its channel takes, so that neighbouring
/// blocks are written concurrently from both; block `lba` gets `data(lba)`. Then every block
/// must read back.
pub fn write_alternate_blocks_from_two_channels(
    bdev: &dyn Bdev,
    blocks: u64,
    data: impl Fn(u64) -> Vec<u8>,
) {
    let mut chans = [bdev.open_channel().unwrap(), bdev.open_channel().unwrap()];
    let mut next = [0u64, 1u64];
    let mut done = Vec::new();
    let mut finished = 0;
    while finished < blocks {
        for (i, ch) in chans.iter_mut().enumerate() {
            while next[i] < blocks {
                let lba = next[i];
                let mut b = AlignedBuf::new(4096);
                b.as_mut_slice().copy_from_slice(&data(lba));
                match ch.submit(IoRequest::write(lba, 1, SgList::from_buf(b), lba)) {
                    Ok(()) => next[i] += 2,
                    Err(_) => break,
                }
            }
            ch.poll(&mut done);
        }
        for c in done.drain(..) {
            assert_eq!(c.status, IoStatus::Success, "write of {}", c.tag);
            finished += 1;
        }
        if let Ok(r) = ThreadRing::current() {
            r.flush();
        }
    }
    drop(chans);
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    for lba in 0..blocks {
        let (st, d) = ch.read(lba, 1);
        assert_eq!(st, IoStatus::Success, "lba {lba}");
        assert!(d == data(lba), "lba {lba}");
    }
}

/// A global allocator that counts, per thread, the allocations of the thread (and forwards
/// everything to the system allocator): a test binary that checks the hot path allocates
/// nothing declares `#[global_allocator] static A: CountingAlloc = CountingAlloc;` and reads
/// [`allocations`].
pub struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// `GlobalAlloc` contract; the wrapper only bumps a thread-local counter, which allocates nothing
// (`try_with` also copes with the thread's locals being gone).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(p, l, n) }
    }
}

/// Allocations this thread has made through [`CountingAlloc`] (zero where it is not the global
/// allocator).
pub fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

/// Runs `rounds` rounds of `qd` one-block requests (reads, writes, flushes mixed) on a channel
/// of `bdev`, recycling the buffers, and returns the [`allocations`] made after the first round.
pub fn steady_state_allocations(bdev: &Arc<dyn Bdev>, qd: usize, rounds: usize) -> u64 {
    steady_state_allocations_sized(bdev, qd, rounds, 1)
}

/// As [`steady_state_allocations`], with reads and writes of `blocks` blocks each (past the
/// bdev's maximum transfer, this counts what splitting allocates).
pub fn steady_state_allocations_sized(
    bdev: &Arc<dyn Bdev>,
    qd: usize,
    rounds: usize,
    blocks: u32,
) -> u64 {
    let mut ch = bdev.open_channel().unwrap();
    let bs = bdev.info().block_size().bytes() as usize;
    let len = bs * blocks as usize;
    let mut bufs: Vec<Option<AlignedBuf>> = (0..qd).map(|_| Some(AlignedBuf::new(len))).collect();
    let mut done: Vec<IoCompletion> = Vec::with_capacity(qd);
    let mut before = 0;
    for round in 0..rounds {
        if round == 1 {
            before = allocations();
        }
        for (i, slot) in bufs.iter_mut().enumerate() {
            let t = match i % 3 {
                0 => IoType::Read,
                1 => IoType::Write,
                _ => IoType::Flush,
            };
            let io = if t == IoType::Flush {
                IoRequest::no_data(t, 0, 0, i as u64)
            } else {
                let b = SgList::from_buf(slot.take().unwrap());
                let count = bdev.info().block_count() - u64::from(blocks) + 1;
                let lba = (i * 7 + round) as u64 % count;
                IoRequest {
                    io_type: t,
                    offset_blocks: lba,
                    num_blocks: blocks,
                    bufs: b,
                    tag: i as u64,
                }
            };
            if ch.submit(io).is_err() {
                panic!("channel refused a request within its depth");
            }
        }
        while ch.in_flight() > 0 {
            if ch.poll(&mut done) == 0 {
                std::thread::yield_now();
            }
            for c in done.drain(..) {
                assert!(c.status.is_ok(), "{:?}", c.status);
                if let Some(b) = c.bufs.into_buf() {
                    bufs[c.tag as usize] = Some(b);
                }
            }
        }
    }
    allocations() - before
}
