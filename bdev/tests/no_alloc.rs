//! The hot path allocates nothing: after warm-up, submitting and completing requests on a
//! channel (the shared layer, the base bdevs, a stacked bdev) makes no heap allocation on the
//! submitting thread. Counted by a global allocator wrapper, per thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use ferroblk_bdev::file::{DirectMode, FileBdev, FileOptions};
use ferroblk_bdev::inject::{DelayBdev, Delays, ErrorBdev};
use ferroblk_bdev::malloc::{MallocBdev, NullBdev};
use ferroblk_bdev::{AlignedBuf, Bdev, BlockSize, IoCompletion, IoRequest, IoType, SgList};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

/// Runs `rounds` rounds of `qd` requests (reads, writes, flushes mixed) with recycled buffers and
/// returns the allocations made after the first round.
fn steady_state_allocs(bdev: &Arc<dyn Bdev>, qd: usize, rounds: usize) -> u64 {
    let mut ch = bdev.open_channel().unwrap();
    let bs = bdev.info().block_size().bytes() as usize;
    let mut bufs: Vec<Option<AlignedBuf>> = (0..qd).map(|_| Some(AlignedBuf::new(bs))).collect();
    let mut done: Vec<IoCompletion> = Vec::with_capacity(qd);
    let mut before = 0;
    for round in 0..rounds {
        if round == 1 {
            before = allocs();
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
                let lba = (i * 7 + round) as u64 % bdev.info().block_count();
                IoRequest {
                    io_type: t,
                    offset_blocks: lba,
                    num_blocks: 1,
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
    allocs() - before
}

#[test]
fn hot_path_makes_no_heap_allocation() {
    // The counter sees this thread's allocations.
    let a = allocs();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(allocs() > a && v.len() == 10);
    let dir = tempfile::tempdir().unwrap();
    let file = |direct| -> Arc<dyn Bdev> {
        Arc::new(
            FileBdev::open(
                "f",
                &FileOptions {
                    path: dir.path().join(format!("{direct:?}.img")),
                    block_size: BlockSize::B4096,
                    size: Some(4 << 20),
                    create: true,
                    direct,
                    read_only: false,
                },
            )
            .unwrap(),
        )
    };
    let malloc: Arc<dyn Bdev> =
        Arc::new(MallocBdev::new("m", BlockSize::B4096, 1024, 1024).unwrap());
    let cases: Vec<(&str, Arc<dyn Bdev>)> = vec![
        (
            "null",
            Arc::new(NullBdev::new("n", BlockSize::B4096, 1024).unwrap()),
        ),
        ("malloc", malloc.clone()),
        ("file buffered", file(DirectMode::Never)),
        ("file direct", file(DirectMode::Auto)),
        (
            "error on malloc",
            Arc::new(ErrorBdev::new("e", malloc.clone(), None).unwrap()),
        ),
        (
            "delay on malloc",
            Arc::new(DelayBdev::new("d", malloc.clone(), Delays::default())),
        ),
    ];
    for (name, bdev) in cases {
        let n = steady_state_allocs(&bdev, 32, 50);
        assert_eq!(n, 0, "{name}: {n} heap allocations in steady state");
    }
}
