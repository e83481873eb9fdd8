use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::conformance;
use crate::file::FileBdev;
use crate::inject::{ErrorBdev, ErrorRule};
use crate::malloc::MallocBdev;
use crate::testing::{Rng, block_data, file_options};
use crate::types::IoStatus;

fn malloc(name: &str, blocks: u64) -> Arc<dyn Bdev> {
    Arc::new(MallocBdev::new(name, BlockSize::B4096, blocks, blocks).unwrap())
}

fn file(path: &std::path::Path, name: &str, blocks: u64) -> Arc<dyn Bdev> {
    let o = file_options(path, BlockSize::B4096, blocks * 4096);
    Arc::new(FileBdev::open(name, &o).unwrap())
}

/// A mirror (64 KiB regions) over file bdevs at `paths`, named `a`, `b`, ... in that order.
fn mirror_of_files(paths: &[&std::path::Path], blocks: u64) -> MirrorBdev {
    let kids = paths
        .iter()
        .zip(["a", "b", "c"])
        .map(|(p, n)| file(p, n, blocks))
        .collect();
    MirrorBdev::open("mir", kids, REGION, false).unwrap()
}

fn error_on(base: Arc<dyn Bdev>, name: &str) -> Arc<ErrorBdev> {
    Arc::new(ErrorBdev::new(name, base, None).unwrap())
}

fn fail_all(e: &ErrorBdev) {
    e.inject(Some(ErrorRule {
        ops: ["read", "write", "flush", "unmap", "write_zeroes"]
            .map(String::from)
            .to_vec(),
        status: "media_error".into(),
        count: None,
        every: None,
    }))
    .unwrap();
}

/// 64 KiB regions: 16 blocks of 4 KiB.
const REGION: u64 = 64 << 10;

fn wait_rebuilt(m: &MirrorBdev) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.rebuilding() {
        assert!(Instant::now() < deadline, "rebuild did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The data regions of every child, compared block by block.
fn assert_children_equal(m: &MirrorBdev) {
    let n = m.info().block_count();
    let kids = m.bases();
    let mut chans: Vec<SyncChannel> = kids
        .iter()
        .map(|k| SyncChannel::new(k.open_channel().unwrap()))
        .collect();
    let mut lba = 0;
    while lba < n {
        let k = (n - lba).min(64) as u32;
        let (st, first) = chans[0].read(lba, k);
        assert_eq!(st, IoStatus::Success);
        for (j, ch) in chans.iter_mut().enumerate().skip(1) {
            let (st, other) = ch.read(lba, k);
            assert_eq!(st, IoStatus::Success);
            assert!(
                first == other,
                "child {j} differs from child 0 at lba {lba}..+{k}"
            );
        }
        lba += u64::from(k);
    }
}

fn write_gen(ch: &mut SyncChannel, lba: u64, n: u64, generation: u8) {
    let data: Vec<u8> = (lba..lba + n)
        .flat_map(|l| block_data(l, 4096, generation))
        .collect();
    assert_eq!(ch.write(lba, &data), IoStatus::Success, "write at {lba}");
}

fn check_gen(ch: &mut SyncChannel, lba: u64, n: u64, expect: impl Fn(u64) -> u8) {
    let (st, got) = ch.read(lba, n as u32);
    assert_eq!(st, IoStatus::Success, "read at {lba}");
    for (i, b) in got.chunks(4096).enumerate() {
        let l = lba + i as u64;
        assert!(b == block_data(l, 4096, expect(l)), "lba {l}");
    }
}

#[test]
fn mirror_passes_conformance_over_malloc() {
    conformance::run(
        &|| {
            Arc::new(
                MirrorBdev::open(
                    "mir",
                    vec![malloc("a", 2048), malloc("b", 2048)],
                    REGION,
                    false,
                )
                .unwrap(),
            )
        },
        false,
    );
    conformance::run(
        &|| {
            Arc::new(
                MirrorBdev::open("mir", vec![malloc("a", 4096)], DEFAULT_REGION_SIZE, true)
                    .unwrap(),
            )
        },
        false,
    );
}

#[test]
fn mirror_passes_conformance_over_files_with_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let open = || -> Arc<dyn Bdev> { Arc::new(mirror_of_files(&[&pa, &pb], 4096)) };
    conformance::run(&open, true);
    let m = mirror_of_files(&[&pa, &pb], 4096);
    wait_rebuilt(&m);
    assert_children_equal(&m);
}

#[test]
fn a_child_failing_under_load_costs_the_caller_nothing_and_comes_back_equal() {
    let a = malloc("a", 4096);
    let eb = error_on(malloc("b", 4096), "eb");
    let m = Arc::new(
        MirrorBdev::open("mir", vec![a, eb.clone() as Arc<dyn Bdev>], REGION, true).unwrap(),
    );
    let n = m.info().block_count();
    let half = n / 2;
    // Two writers on their own channels (threads), each over its half, several passes;
    // child b starts failing everything in the middle of it.
    let passes = 6u8;
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut ch = SyncChannel::new(m.open_channel().unwrap());
                let mut rng = Rng(w + 7);
                for generation in 1..=passes {
                    let mut lba = w * half;
                    while lba < (w + 1) * half {
                        let k = (1 + rng.below(24)).min((w + 1) * half - lba);
                        write_gen(&mut ch, lba, k, generation);
                        check_gen(&mut ch, lba, k, |_| generation);
                        lba += k;
                    }
                }
            })
        })
        .collect();
    // About 2,000 writes in all: fail the child once a quarter of them went through.
    while eb.info().stats().ops[1] < 500 && !writers.iter().all(|w| w.is_finished()) {
        std::thread::yield_now();
    }
    fail_all(&eb);
    for w in writers {
        w.join().expect("writer saw an error");
    }
    assert!(eb.injected() > 0, "the child never failed");
    assert_eq!(m.child_states(), ["healthy", "degraded"]);
    assert_eq!(m.info().stats().errors, 0, "errors reached the caller");
    let mut ch = SyncChannel::new(m.open_channel().unwrap());
    check_gen(&mut ch, 0, 2 * half, |_| passes);
    let dirty = m.dirty_regions();
    assert!(dirty > 0 && dirty <= m.shared.layout.regions);
    assert_eq!(ch.flush(), IoStatus::Success);

    // The child returns: resynced from the dirty regions while a writer keeps going.
    eb.inject(None).unwrap();
    let copied_before = m.regions_copied();
    m.add_child(eb.clone()).unwrap();
    for lba in (0..n).step_by(97) {
        write_gen(&mut ch, lba, 1, 9);
    }
    wait_rebuilt(&m);
    assert_eq!(m.child_states(), ["healthy", "healthy"]);
    assert_eq!(
        m.dirty_regions(),
        0,
        "the bitmap is cleared after the rebuild"
    );
    // Writes sent before the rebuild began may add dirty regions: at most those they touch.
    let touched = (0..n)
        .step_by(97)
        .map(|l| l / (REGION / 4096))
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    assert!(m.regions_copied() - copied_before <= dirty + touched);
    check_gen(&mut ch, 0, n, |l| if l % 97 == 0 { 9 } else { passes });
    drop(ch);
    assert_children_equal(&m);
}

#[test]
fn a_restart_with_a_stale_child_resyncs_only_the_dirty_regions() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let blocks = 4096;
    {
        let eb = error_on(file(&pb, "b", blocks), "eb");
        let m = MirrorBdev::open(
            "mir",
            vec![file(&pa, "a", blocks), eb.clone() as Arc<dyn Bdev>],
            REGION,
            false,
        )
        .unwrap();
        wait_rebuilt(&m);
        let mut ch = SyncChannel::new(m.open_channel().unwrap());
        let n = m.info().block_count();
        crate::testing::fill(&mut ch, n, 4096, 1);
        assert_eq!(ch.flush(), IoStatus::Success);
        fail_all(&eb);
        // Three regions change while b is away: blocks in regions 2, 5 (two writes) and 40.
        let r = REGION / 4096;
        for lba in [2 * r + 3, 5 * r, 5 * r + 15, 40 * r + 1] {
            write_gen(&mut ch, lba, 1, 2);
        }
        assert_eq!(m.child_states(), ["healthy", "degraded"]);
        assert_eq!(m.dirty_regions(), 3);
        // No flush: the bitmap and superblock were written before those writes were acknowledged.
    }
    let m = mirror_of_files(&[&pa, &pb], blocks);
    wait_rebuilt(&m);
    assert_eq!(m.regions_copied(), 3, "only the dirty regions are copied");
    assert_eq!(m.child_states(), ["healthy", "healthy"]);
    assert_eq!(m.dirty_regions(), 0);
    assert_children_equal(&m);
    let r = REGION / 4096;
    let changed = [2 * r + 3, 5 * r, 5 * r + 15, 40 * r + 1];
    let mut ch = SyncChannel::new(m.open_channel().unwrap());
    let n = m.info().block_count();
    check_gen(&mut ch, 0, n, |l| if changed.contains(&l) { 2 } else { 1 });
    drop(ch);
    drop(m);
    // Opened again: nothing left to copy.
    let m = mirror_of_files(&[&pb, &pa], blocks);
    assert!(!m.rebuilding());
    assert_eq!(
        m.regions_copied(),
        0,
        "children given in another order are still known"
    );
}

#[test]
fn a_new_child_is_rebuilt_whole_and_a_child_can_be_removed() {
    let m = MirrorBdev::open("mir", vec![malloc("a", 1024)], REGION, false).unwrap();
    let mut ch = SyncChannel::new(m.open_channel().unwrap());
    let n = m.info().block_count();
    crate::testing::fill(&mut ch, n, 4096, 3);
    let e = m.add_child(malloc("b", 1024)).unwrap();
    assert_eq!(e["children"][1]["name"], "b");
    wait_rebuilt(&m);
    assert_eq!(m.regions_copied(), m.shared.layout.regions);
    assert_eq!(m.child_states(), ["healthy", "healthy"]);
    assert_children_equal(&m);
    // Reads use both children once both are healthy: the second one serves some.
    let b = m.bases()[1].clone();
    let before = b.info().stats().ops[0];
    check_gen(&mut ch, 0, 16, |_| 3);
    for lba in 0..16 {
        check_gen(&mut ch, lba, 1, |_| 3);
    }
    assert!(b.info().stats().ops[0] > before, "reads are balanced");
    assert_eq!(
        m.add_child(malloc("c", 2048)).unwrap_err().field(),
        Some("child")
    );
    assert!(m.add_child(b.clone()).is_err(), "b is already healthy");
    m.remove_child("a").unwrap();
    assert_eq!(m.children(), ["b"]);
    assert!(m.remove_child("b").is_err(), "the last healthy child stays");
    check_gen(&mut ch, 0, n, |_| 3);
}

#[test]
fn bad_declarations_name_their_field() {
    let kinds = crate::Kinds::core();
    let decl = |v: serde_json::Value| kinds.parse(v).unwrap();
    let e = decl(serde_json::json!({"kind": "mirror", "name": "m", "children": []}))
        .validate()
        .unwrap_err();
    assert_eq!(e.field(), Some("children"));
    let e = decl(serde_json::json!({"kind": "mirror", "name": "m", "children": ["a", "b", "a"]}))
        .validate()
        .unwrap_err();
    assert_eq!(e.field(), Some("children[2]"));
    assert!(e.to_string().contains("children[0]"), "{e}");
    let e = decl(
        serde_json::json!({"kind": "mirror", "name": "m", "children": ["a"], "region_size": 3000}),
    )
    .validate()
    .unwrap_err();
    assert_eq!(e.field(), Some("region_size"));
    let e = kinds
        .parse(serde_json::json!({"kind": "mirror", "name": "m", "children": ["a"], "base": "a"}))
        .unwrap_err();
    assert_eq!(e.field, "base");

    // Through the registry: a missing child, and one of another size.
    let reg = crate::BdevRegistry::new();
    let list = |extra: &str| {
        let t = format!(
            "[[bdev]]\nkind = \"malloc\"\nname = \"a\"\nsize = \"4MiB\"\n\
             [[bdev]]\nkind = \"malloc\"\nname = \"b\"\nsize = \"8MiB\"\n{extra}"
        );
        #[derive(serde::Deserialize)]
        struct W {
            bdev: Vec<serde_json::Value>,
        }
        toml::from_str::<W>(&t)
            .unwrap()
            .bdev
            .into_iter()
            .map(|v| kinds.parse(v).unwrap())
            .collect::<Vec<_>>()
    };
    let e = reg
        .create_all(&list(
            "[[bdev]]\nkind = \"mirror\"\nname = \"m\"\nchildren = [\"a\", \"zz\"]\n",
        ))
        .unwrap_err();
    assert_eq!(e.error.field(), Some("children[1]"));
    let e = reg
        .create_all(&list(
            "[[bdev]]\nkind = \"mirror\"\nname = \"m\"\nchildren = [\"a\", \"b\"]\n",
        ))
        .unwrap_err();
    assert_eq!(e.error.field(), Some("children[1]"), "{}", e.error);
    assert!(e.error.to_string().contains("one size"), "{}", e.error);
    // A mirror in a cycle.
    let e = reg
        .create_all(&list(
            "[[bdev]]\nkind = \"mirror\"\nname = \"m\"\nchildren = [\"a\", \"d\"]\n\
             [[bdev]]\nkind = \"delay\"\nname = \"d\"\nbase = \"m\"\n",
        ))
        .unwrap_err();
    assert!(e.error.to_string().contains("cycle"), "{}", e.error);
    // And a good one, whose users are its children's.
    reg.create_all(&list(
        "[[bdev]]\nkind = \"malloc\"\nname = \"c\"\nsize = \"4MiB\"\n\
         [[bdev]]\nkind = \"mirror\"\nname = \"m\"\nchildren = [\"a\", \"c\"]\nassume_clean = true\n",
    ))
    .unwrap();
    assert!(reg.delete("c").is_err(), "a child is in use");
    reg.remove_base("m", "c").unwrap();
    assert_eq!(reg.decl("m").unwrap().bases(), ["a"]);
    reg.add_base("m", "c").unwrap();
    assert_eq!(reg.decl("m").unwrap().bases(), ["a", "c"]);
    assert_eq!(
        reg.add_base("m", "m").unwrap_err().field(),
        Some("child"),
        "a mirror is not its own child"
    );
}

#[test]
fn large_unmaps_while_degraded_go_in_pieces_and_resync() {
    // One-block regions: an unmap of 1,000 blocks locks and marks 1,000 regions, in pieces,
    // across the boundary of two bitmap blocks (32,768 regions each).
    let blocks = 40_000;
    let eb = error_on(malloc("b", blocks), "eb");
    let m = MirrorBdev::open(
        "mir",
        vec![malloc("a", blocks), eb.clone() as Arc<dyn Bdev>],
        4096,
        true,
    )
    .unwrap();
    let mut ch = SyncChannel::new(m.open_channel().unwrap());
    write_gen(&mut ch, 32_000, 2_000, 1);
    fail_all(&eb);
    assert_eq!(ch.unmap(32_100, 1_000), IoStatus::Success);
    assert_eq!(ch.write_zeroes(33_500, 100), IoStatus::Success);
    write_gen(&mut ch, 32_050, 1, 2);
    assert_eq!(m.child_states(), ["healthy", "degraded"]);
    assert_eq!(m.dirty_regions(), 1_101);
    let expect = |l: u64| -> Option<u8> {
        match l {
            32_050 => Some(2),
            32_100..33_100 | 33_500..33_600 => None,
            _ => Some(1),
        }
    };
    let check = |ch: &mut SyncChannel| {
        let (st, got) = ch.read(32_000, 2_000);
        assert_eq!(st, IoStatus::Success);
        for (i, b) in got.chunks(4096).enumerate() {
            let l = 32_000 + i as u64;
            match expect(l) {
                Some(g) => assert!(b == block_data(l, 4096, g), "lba {l}"),
                None => assert!(b.iter().all(|&x| x == 0), "lba {l} reads zeroes"),
            }
        }
    };
    check(&mut ch);
    eb.inject(None).unwrap();
    m.add_child(eb.clone()).unwrap();
    wait_rebuilt(&m);
    assert_eq!(m.regions_copied(), 1_101);
    assert_eq!(m.child_states(), ["healthy", "healthy"]);
    check(&mut ch);
    drop(ch);
    assert_children_equal(&m);
}

#[test]
fn a_child_failing_a_flush_is_rebuilt_whole() {
    let eb = error_on(malloc("b", 1024), "eb");
    let m = MirrorBdev::open(
        "mir",
        vec![malloc("a", 1024), eb.clone() as Arc<dyn Bdev>],
        REGION,
        true,
    )
    .unwrap();
    let mut ch = SyncChannel::new(m.open_channel().unwrap());
    write_gen(&mut ch, 0, 8, 1);
    eb.inject(Some(ErrorRule {
        ops: vec!["flush".into()],
        status: "media_error".into(),
        count: Some(1),
        every: None,
    }))
    .unwrap();
    assert_eq!(ch.flush(), IoStatus::Success, "the other child flushed");
    assert_eq!(m.child_states(), ["healthy", "degraded"]);
    assert_eq!(m.describe()["children"][1]["full_rebuild"], true);
    // It may have lost writes it had acknowledged: every region is copied, not just dirty ones.
    assert_eq!(m.dirty_regions(), 0);
    m.add_child(eb.clone()).unwrap();
    wait_rebuilt(&m);
    assert_eq!(m.regions_copied(), m.shared.layout.regions);
    drop(ch);
    assert_children_equal(&m);
}

/// A bdev over `base` whose channels take at most `depth` requests (a device's queue limit).
struct Shallow {
    base: Arc<dyn Bdev>,
    depth: usize,
}

struct ShallowChannel(Channel);

impl crate::bdev::ChannelOps for ShallowChannel {
    fn submit(&mut self, io: crate::bdev::IoRequest) -> Result<(), crate::bdev::IoRequest> {
        self.0.submit(io)
    }
    fn poll(&mut self, done: &mut Vec<crate::bdev::IoCompletion>) -> usize {
        self.0.poll(done)
    }
    fn wake(&self) -> crate::bdev::Wake {
        self.0.wake()
    }
}

impl Bdev for Shallow {
    fn info(&self) -> &Arc<BdevInfo> {
        self.base.info()
    }
    fn open_channel(&self) -> Result<Channel, BdevError> {
        let ch = ShallowChannel(self.base.open_channel()?);
        Ok(Channel::new(
            self.base.info().clone(),
            Box::new(ch),
            self.depth,
        ))
    }
}

#[test]
fn a_channel_is_as_deep_as_its_children_together_and_reads_fill_each() {
    use crate::inject::{DelayBdev, Delays};
    // Children that take 8 requests at once and hold reads for a while, so that every read
    // submitted stays in flight.
    let slow = |name: &str| -> (Arc<dyn Bdev>, Arc<dyn Bdev>) {
        let d = Delays {
            read: Duration::from_millis(20),
            ..Delays::default()
        };
        let m = malloc(&format!("m{name}"), 4096);
        let base = Arc::new(DelayBdev::new(name, m.clone(), d));
        (Arc::new(Shallow { base, depth: 8 }), m)
    };
    let ((a, ma), (b, mb)) = (slow("a"), slow("b"));
    let m = MirrorBdev::open("mir", vec![a, b], REGION, true).unwrap();
    let mut ch = m.open_channel().unwrap();
    assert_eq!(ch.depth(), 16, "the children's depths together");
    let reads = || [ma.info().stats().ops[0], mb.info().stats().ops[0]];
    let before = reads();
    for i in 0..16 {
        let bufs = crate::buf::SgList::from_buf(crate::buf::AlignedBuf::new(4096));
        let io = crate::bdev::IoRequest::read(i, 1, bufs, i);
        assert!(ch.submit(io).is_ok(), "read {i} of 16 taken");
    }
    // The least loaded child takes each read: both are filled, none waits.
    let now = reads();
    assert_eq!(
        [now[0] - before[0], now[1] - before[1]],
        [8, 8],
        "reads spread over both children"
    );
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.len() < 16 {
        assert!(Instant::now() < deadline, "{} of 16 reads done", done.len());
        if ch.poll(&mut done) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(done.iter().all(|c| c.status.is_ok()));
}
