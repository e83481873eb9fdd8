//! The hot path allocates nothing: after warm-up, submitting and completing requests on a
//! channel (the shared layer, the base bdevs, a stacked bdev) makes no heap allocation on the
//! submitting thread. Counted by a global allocator wrapper, per thread.

use std::sync::Arc;

use ferroblk_bdev::compress::{CompressBdev, CompressOptions};
use ferroblk_bdev::crc::CrcBdev;
use ferroblk_bdev::file::{DirectMode, FileBdev, FileOptions};
use ferroblk_bdev::inject::{DelayBdev, Delays, ErrorBdev};
use ferroblk_bdev::malloc::{MallocBdev, NullBdev};
use ferroblk_bdev::mirror::MirrorBdev;
use ferroblk_bdev::testing::{CountingAlloc, allocations, steady_state_allocations};
use ferroblk_bdev::{Bdev, BlockSize};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn hot_path_makes_no_heap_allocation() {
    // The counter sees this thread's allocations.
    let a = allocations();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(allocations() > a && v.len() == 10);
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
        (
            "crc on malloc",
            Arc::new(CrcBdev::open("c", malloc.clone()).unwrap()),
        ),
        (
            "compress on malloc",
            Arc::new(
                CompressBdev::open(
                    "z",
                    Arc::new(MallocBdev::new("m2", BlockSize::B4096, 2048, 2048).unwrap()),
                    &CompressOptions::new(4 << 20),
                )
                .unwrap(),
            ),
        ),
        (
            "mirror over two malloc",
            Arc::new(
                MirrorBdev::open(
                    "mir",
                    vec![
                        Arc::new(MallocBdev::new("a", BlockSize::B4096, 1024, 1024).unwrap()),
                        Arc::new(MallocBdev::new("b", BlockSize::B4096, 1024, 1024).unwrap()),
                    ],
                    1 << 20,
                    true,
                )
                .unwrap(),
            ),
        ),
    ];
    for (name, bdev) in cases {
        let n = steady_state_allocations(&bdev, 32, 50);
        assert_eq!(n, 0, "{name}: {n} heap allocations in steady state");
    }
}
