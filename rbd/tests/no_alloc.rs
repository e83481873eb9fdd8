//! The `rbd` channel's hot path allocates nothing on the reactor's side: after warm-up,
//! submitting requests to librbd and taking their completions back makes no heap allocation on
//! the submitting thread (librbd's own completion objects are C++ allocations on its side).
//! Counted by `ferroblk_bdev::testing::CountingAlloc`, per thread.

use std::sync::Arc;

use ferroblk_bdev::Bdev;
use ferroblk_bdev::testing::{CountingAlloc, steady_state_allocations};
use ferroblk_rbd::RbdDecl;
use ferroblk_rbd::testing::TestCluster;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn hot_path_makes_no_heap_allocation() {
    let c = TestCluster::start();
    let d: RbdDecl = toml::from_str(&format!(
        "name = \"a\"\nimage = \"a\"\n{}create = true\nsize = \"4MiB\"\n",
        c.decl_fields()
    ))
    .unwrap();
    let bdev: Arc<dyn Bdev> = Arc::new(d.open().unwrap());
    assert_eq!(steady_state_allocations(&bdev, 32, 20), 0);
}
