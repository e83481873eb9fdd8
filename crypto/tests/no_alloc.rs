//! The encryption bdevs' hot path allocates nothing: after warm-up, submitting and completing
//! requests on a `crypt_xts` or `crypt_gcm` channel makes no heap allocation on the submitting
//! thread (their buffers come from the pool allocated when the channel opens). Counted by
//! `ferroblk_bdev::testing::CountingAlloc`, per thread.

use std::sync::Arc;

use ferroblk_bdev::testing::{
    CountingAlloc, malloc, steady_state_allocations, steady_state_allocations_sized,
};
use ferroblk_bdev::{Bdev, BlockSize};
use ferroblk_crypto::{GcmBdev, Key, XtsBdev};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn hot_path_makes_no_heap_allocation() {
    let cases: Vec<(&str, Arc<dyn Bdev>)> = vec![
        (
            "crypt_xts on malloc",
            Arc::new(
                XtsBdev::new(
                    "x",
                    malloc(BlockSize::B4096, 1024),
                    Key::generate(64).unwrap(),
                )
                .unwrap(),
            ),
        ),
        (
            "crypt_gcm on malloc",
            Arc::new(
                GcmBdev::open(
                    "g",
                    malloc(BlockSize::B4096, 1024),
                    Key::generate(32).unwrap(),
                )
                .unwrap(),
            ),
        ),
    ];
    for (name, bdev) in cases {
        let n = steady_state_allocations(&bdev, 32, 50);
        assert_eq!(n, 0, "{name}: {n} heap allocations in steady state");
        // 1 MiB requests, split by the channel layer into the bdev's maximum transfer.
        let n = steady_state_allocations_sized(&bdev, 8, 50, 256);
        assert_eq!(
            n, 0,
            "{name}: {n} heap allocations in steady state, split requests"
        );
    }
}
