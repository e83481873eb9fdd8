//! Tests of the compress bdev through its channels: conformance, space use, crash and
//! power-loss recovery, upgrades of version-1 volumes.

use super::format::SUPER_BYTES_V1;
use super::*;
use crate::bdev::{ChannelOps, IoCompletion, IoRequest, Wake};
use crate::buf::{AlignedBuf, SgList};
use crate::conformance;
use crate::testing::{Rng, file, malloc, write_alternate_blocks_from_two_channels};
use crate::types::IoType;

/// A block whose first `random` bytes are pseudo-random and the rest a repeated byte: about
/// `bs / random` to one compressible.
fn block(seed: u64, bs: usize, random: usize) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for _ in 0..4 {
        r.next();
    }
    let mut v: Vec<u8> = (0..bs).map(|_| r.next() as u8).collect();
    v[random..].fill(seed as u8 | 1);
    v
}

fn opts(size: u64) -> CompressOptions {
    CompressOptions::new(size)
}

fn file_base(path: &std::path::Path, blocks: u64) -> Arc<dyn Bdev> {
    file(path, BlockSize::B4096, blocks)
}

/// A base of 1024 blocks of 4 KiB, the options of a 4 MiB volume, and two versions of the
/// volume's first 4 blocks (each block about four to one compressible).
fn two_versions() -> (Arc<dyn Bdev>, CompressOptions, Vec<u8>, Vec<u8>) {
    let a: Vec<u8> = (0..4).flat_map(|b| block(b, 4096, 1024)).collect();
    let b: Vec<u8> = (0..4).flat_map(|x| block(x + 50, 4096, 1024)).collect();
    (malloc(BlockSize::B4096, 1024), opts(4 << 20), a, b)
}

fn describe_u64(c: &CompressBdev, key: &str) -> u64 {
    c.describe()[key].as_u64().unwrap()
}

#[test]
fn compress_passes_conformance_over_malloc() {
    conformance::run(
        &|| {
            Arc::new(
                CompressBdev::open("z", malloc(BlockSize::B4096, 2048), &opts(16 << 20)).unwrap(),
            )
        },
        false,
    );
    let mut o = opts(4 << 20);
    o.chunk_size = 4096;
    conformance::run(
        &|| Arc::new(CompressBdev::open("z", malloc(BlockSize::B512, 16384), &o).unwrap()),
        false,
    );
    #[cfg(feature = "zstd")]
    {
        let mut o = opts(8 << 20);
        o.algorithm = Algorithm::Zstd;
        o.chunk_size = 64 << 10;
        conformance::run(
            &|| Arc::new(CompressBdev::open("z", malloc(BlockSize::B4096, 4096), &o).unwrap()),
            false,
        );
    }
}

#[test]
fn zstd_is_refused_naming_algorithm_only_in_a_build_without_it() {
    let mut o = opts(4 << 20);
    o.algorithm = Algorithm::Zstd;
    let r = CompressBdev::open("z", malloc(BlockSize::B4096, 2048), &o);
    if cfg!(feature = "zstd") {
        assert!(r.is_ok(), "{:?}", r.err());
    } else {
        let e = r.err().expect("zstd refused");
        assert_eq!(e.field(), Some("algorithm"));
        assert!(e.to_string().contains("`zstd` feature"), "{e}");
    }
}

#[test]
fn compress_passes_conformance_over_file_with_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.img");
    let open = || -> Arc<dyn Bdev> {
        Arc::new(CompressBdev::open("z", file_base(&path, 1024), &opts(8 << 20)).unwrap())
    };
    conformance::run(&open, true);
    let z = CompressBdev::open("z", file_base(&path, 1024), &opts(8 << 20)).unwrap();
    z.check_consistency().unwrap();
}

#[test]
fn data_of_ratio_two_takes_half_the_space() {
    for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
        if algorithm == Algorithm::Zstd && !cfg!(feature = "zstd") {
            continue;
        }
        let mut o = opts(16 << 20);
        o.algorithm = algorithm;
        let z = CompressBdev::open("z", malloc(BlockSize::B4096, 4096), &o).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        let blocks = 2048u64;
        for lba in (0..blocks).step_by(16) {
            // Somewhat less than half random, so that a chunk fits in half its blocks.
            let data: Vec<u8> = (lba..lba + 16).flat_map(|b| block(b, 4096, 1900)).collect();
            assert_eq!(ch.write(lba, &data), IoStatus::Success);
        }
        let d = z.describe();
        let logical = d["logical_bytes_used"].as_u64().unwrap();
        let physical = d["physical_bytes_used"].as_u64().unwrap();
        let ratio = d["compression_ratio"].as_f64().unwrap();
        assert_eq!(logical, blocks * 4096);
        assert!(
            (1.9..=2.0).contains(&ratio),
            "{algorithm:?}: ratio {ratio} ({logical} -> {physical})"
        );
        assert_eq!(d["chunks_raw"], 0);
        for lba in (0..blocks).step_by(13) {
            assert_eq!(ch.read(lba, 1), (IoStatus::Success, block(lba, 4096, 1900)));
        }
        z.check_consistency().unwrap();
    }
}

#[test]
fn incompressible_chunks_are_raw_and_zero_chunks_take_no_space() {
    let z = CompressBdev::open("z", malloc(BlockSize::B4096, 1024), &opts(8 << 20)).unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    let random: Vec<u8> = (0..8).flat_map(|b| block(b + 1, 4096, 4096)).collect();
    assert_eq!(ch.write(0, &random), IoStatus::Success);
    assert_eq!(ch.write(8, &vec![0u8; 8 * 4096]), IoStatus::Success);
    let d = z.describe();
    assert_eq!(d["chunks_raw"], 2);
    assert_eq!(d["chunks_mapped"], 2);
    assert_eq!(d["physical_bytes_used"], 8 * 4096);
    assert_eq!(ch.read(0, 8), (IoStatus::Success, random));
    // A zero write over data unmaps it.
    assert_eq!(ch.write(4, &vec![0u8; 4 * 4096]), IoStatus::Success);
    assert_eq!(z.describe()["chunks_mapped"], 1);
    z.check_consistency().unwrap();
}

#[test]
fn unmap_and_overwrites_free_space_once_durable() {
    let z = CompressBdev::open("z", malloc(BlockSize::B4096, 1024), &opts(8 << 20)).unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    let data: Vec<u8> = (0..64).flat_map(|b| block(b, 4096, 4096)).collect();
    assert_eq!(ch.write(0, &data), IoStatus::Success);
    let free0 = describe_u64(&z, "physical_bytes_free");
    // Overwrite: the new runs take space, the old ones wait for a durable map.
    assert_eq!(ch.write(0, &data), IoStatus::Success);
    assert_eq!(describe_u64(&z, "physical_bytes_pending_free"), 64 * 4096);
    assert_eq!(describe_u64(&z, "physical_bytes_free"), free0 - 64 * 4096);
    z.check_consistency().unwrap();
    assert_eq!(ch.flush(), IoStatus::Success);
    assert_eq!(describe_u64(&z, "physical_bytes_pending_free"), 0);
    assert_eq!(describe_u64(&z, "physical_bytes_free"), free0);
    // Unmap half (and part of a chunk: read-modify-write), then flush.
    assert_eq!(ch.unmap(30, 34), IoStatus::Success);
    assert_eq!(ch.flush(), IoStatus::Success);
    assert_eq!(describe_u64(&z, "chunks_mapped"), 8);
    let (st, back) = ch.read(0, 64);
    assert_eq!(st, IoStatus::Success);
    assert!(back[..30 * 4096] == data[..30 * 4096]);
    assert!(back[30 * 4096..].iter().all(|&b| b == 0));
    let c = z.check_consistency().unwrap();
    assert_eq!(c.mapped_chunks, 8);
    assert_eq!(
        c.mapped_blocks,
        29 + 2,
        "7 raw chunks, and one with 2 blocks of data"
    );
}

#[test]
fn a_full_base_reports_no_space_and_recovers_after_overwrites() {
    // 8 MiB logical over 1 MiB of base: random data fills it.
    let z = CompressBdev::open("z", malloc(BlockSize::B4096, 256), &opts(8 << 20)).unwrap();
    let data_blocks = z.layout().data_blocks;
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    let mut lba = 0;
    let status = loop {
        let data: Vec<u8> = (lba..lba + 4)
            .flat_map(|b| block(b + 9, 4096, 4096))
            .collect();
        let st = ch.write(lba, &data);
        if !st.is_ok() {
            break st;
        }
        lba += 4;
    };
    assert_eq!(status, IoStatus::NoSpace);
    let reserve = z.shared.reserve_blocks;
    assert_eq!(
        lba,
        (data_blocks - reserve) / 4 * 4,
        "new chunks stop at the reserve"
    );
    // Overwriting in place works: the writes wait for checkpoints that free the old runs.
    for round in 0..3u64 {
        for at in (0..lba).step_by(4) {
            let data: Vec<u8> = (at..at + 4)
                .flat_map(|b| block(b + round * 1000, 4096, 4096))
                .collect();
            assert_eq!(
                ch.write(at, &data),
                IoStatus::Success,
                "round {round} at {at}"
            );
        }
    }
    assert!(describe_u64(&z, "checkpoints") > 0);
    z.check_consistency().unwrap();
    // Unmapping frees room for new chunks.
    assert_eq!(ch.unmap(0, 16), IoStatus::Success);
    let data: Vec<u8> = (0..8).flat_map(|b| block(b + 77, 4096, 4096)).collect();
    assert_eq!(ch.write(lba, &data), IoStatus::Success);
    assert_eq!(ch.read(lba, 8), (IoStatus::Success, data));
    z.check_consistency().unwrap();
}

#[test]
fn acknowledged_writes_survive_a_crash_without_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.img");
    let a: Vec<u8> = (0..8).flat_map(|b| block(b, 4096, 1024)).collect();
    let b: Vec<u8> = (0..8).flat_map(|x| block(x + 50, 4096, 1024)).collect();
    {
        let z = CompressBdev::open("z", file_base(&path, 512), &opts(4 << 20)).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.write(0, &a), IoStatus::Success);
        assert_eq!(ch.flush(), IoStatus::Success);
        assert_eq!(ch.write(0, &b), IoStatus::Success);
        // Closed without a flush and without the clean-close checkpoint: a crash.
        drop(ch);
        std::mem::forget(z);
    }
    // The file lock of the forgotten bdev is still held: copy the image.
    let copy = dir.path().join("copy.img");
    std::fs::copy(&path, &copy).unwrap();
    let reopen = || {
        let z = CompressBdev::open("z", file_base(&copy, 512), &opts(4 << 20)).unwrap();
        let ch = SyncChannel::new(z.open_channel().unwrap());
        (z, ch)
    };
    let (z, mut ch) = reopen();
    z.check_consistency().unwrap();
    // The unflushed write was acknowledged: its map update is in the log.
    assert_eq!(ch.read(0, 8), (IoStatus::Success, b.clone()));
    // A clean close persists.
    assert_eq!(ch.write(0, &a), IoStatus::Success);
    drop(ch);
    drop(z);
    let (z, mut ch) = reopen();
    assert_eq!(ch.read(0, 8), (IoStatus::Success, a));
    assert_eq!(ch.write(0, &b), IoStatus::Success);
    drop(ch);
    drop(z);
    let (z, mut ch) = reopen();
    assert_eq!(ch.read(0, 8), (IoStatus::Success, b));
    z.check_consistency().unwrap();
}

#[test]
fn a_torn_map_page_falls_back_to_its_previous_version() {
    let (base, o, a, b) = two_versions();
    let z = CompressBdev::open("z", base.clone(), &o).unwrap();
    let l = z.layout();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(ch.write(0, &a), IoStatus::Success);
    assert_eq!(ch.flush(), IoStatus::Success); // page 0, seq 1, slot 1
    assert_eq!(ch.write(0, &b), IoStatus::Success);
    assert_eq!(ch.flush(), IoStatus::Success); // page 0, seq 2, slot 0
    drop(ch);
    drop(z);
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    let (_, mut page) = raw.read(l.page_block(0, 0), 1);
    assert_eq!(valid_page(&page, 0), Some(2));
    page[2000] ^= 0xff;
    assert_eq!(raw.write(l.page_block(0, 0), &page), IoStatus::Success);
    // The log would replay the updates of the torn version (a power loss tears only a page
    // whose updates are still logged): without it, the previous version is what is left.
    let zero = vec![0u8; l.log_blocks as usize * 4096];
    assert_eq!(raw.write(l.log_start, &zero), IoStatus::Success);
    let z = CompressBdev::open("z", base.clone(), &o).unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(ch.read(0, 4), (IoStatus::Success, a));
    z.check_consistency().unwrap();
    drop(ch);
    drop(z);
    // Both copies broken: refused.
    let (_, mut page) = raw.read(l.page_block(0, 1), 1);
    page[100] ^= 0xff;
    assert_eq!(raw.write(l.page_block(0, 1), &page), IoStatus::Success);
    let e = CompressBdev::open("z", base, &o).err().unwrap();
    assert!(e.to_string().contains("both copies"), "{e}");
}

#[test]
fn corrupted_chunks_fail_reads_with_integrity_errors() {
    let base = malloc(BlockSize::B4096, 1024);
    let z = CompressBdev::open("z", base.clone(), &opts(4 << 20)).unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    let a: Vec<u8> = (0..8).flat_map(|b| block(b, 4096, 1024)).collect();
    assert_eq!(ch.write(0, &a), IoStatus::Success);
    let run = z.shared.map().entries[1].block;
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    let (_, mut d) = raw.read(run, 1);
    d[10] ^= 1;
    assert_eq!(raw.write(run, &d), IoStatus::Success);
    let (st, back) = ch.read(4, 1);
    assert_eq!(st, IoStatus::IntegrityError);
    assert!(back.iter().all(|&x| x == 0));
    assert_eq!(ch.read(0, 4), (IoStatus::Success, a[..4 * 4096].to_vec()));
    assert_eq!(z.integrity_errors(), 1);
    // A partial write into the broken chunk fails too, and changes nothing.
    assert_eq!(ch.write(5, &a[..4096]), IoStatus::IntegrityError);
    // A whole-chunk write replaces it.
    assert_eq!(ch.write(4, &a[..4 * 4096]), IoStatus::Success);
    assert_eq!(ch.read(4, 4), (IoStatus::Success, a[..4 * 4096].to_vec()));
}

#[test]
fn reopening_with_another_geometry_is_refused_and_names_the_field() {
    let base = malloc(BlockSize::B4096, 1024);
    drop(CompressBdev::open("z", base.clone(), &opts(4 << 20)).unwrap());
    let e = CompressBdev::open("z", base.clone(), &opts(8 << 20))
        .err()
        .unwrap();
    assert_eq!(e.field(), Some("size"));
    let mut o = opts(4 << 20);
    o.chunk_size = 32 << 10;
    let e = CompressBdev::open("z", base.clone(), &o).err().unwrap();
    assert_eq!(e.field(), Some("chunk_size"));
    // Another algorithm is fine: chunks record theirs.
    #[cfg(feature = "zstd")]
    {
        let mut o = opts(4 << 20);
        o.algorithm = Algorithm::Zstd;
        drop(CompressBdev::open("z", base, &o).unwrap());
    }
    let mut raw = SyncChannel::new(malloc(BlockSize::B4096, 4).open_channel().unwrap());
    assert_eq!(raw.write(0, &[1u8; 4096]), IoStatus::Success);
}

#[test]
fn channels_writing_parts_of_the_same_chunks_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = file_base(&dir.path().join("z.img"), 2048);
    for base in [malloc(BlockSize::B4096, 2048), file] {
        let z = CompressBdev::open("z", base, &opts(8 << 20)).unwrap();
        write_alternate_blocks_from_two_channels(&z, 1024, |lba| block(lba, 4096, 2048));
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.flush(), IoStatus::Success);
        z.check_consistency().unwrap();
    }
}

/// A disk with a volatile write cache, for power-loss tests: writes complete after a few
/// polls, land in the cache when they complete, and reach the durable image at a flush. A
/// crash image is the durable image plus a random subset of the blocks of cached and
/// in-flight writes (block-atomic writes, any order).
struct SimDisk {
    durable: Vec<u8>,
    cache: std::collections::BTreeMap<u64, Vec<u8>>,
    in_flight: std::collections::BTreeMap<u64, (u64, Vec<u8>)>,
    next: u64,
}

#[test]
fn a_full_log_checkpoints_and_a_crash_loses_no_acknowledged_write() {
    // 512 blocks: a log of 31 blocks, filled many times over by unflushed writes.
    let base = malloc(BlockSize::B4096, 512);
    let o = opts(2 << 20);
    let z = CompressBdev::open("z", base.clone(), &o).unwrap();
    let l = z.layout();
    assert_eq!(l.log_blocks, 31);
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    let mut want = vec![0u8; 512 * 4096];
    let mut rng = Rng(7);
    for i in 0..600u64 {
        let lba = rng.next() % 500;
        let n = 1 + rng.next() % 8;
        let data: Vec<u8> = (0..n).flat_map(|k| block(i << 8 | k, 4096, 1024)).collect();
        assert_eq!(ch.write(lba, &data), IoStatus::Success, "write {i}");
        want[lba as usize * 4096..][..data.len()].copy_from_slice(&data);
    }
    assert!(describe_u64(&z, "log_block_writes") > 2 * l.log_blocks);
    assert!(
        describe_u64(&z, "checkpoints") > 0,
        "the log asked for checkpoints"
    );
    // A crash: no flush, no clean-close checkpoint.
    drop(ch);
    std::mem::forget(z);
    let z = CompressBdev::open("z", base.clone(), &o).unwrap();
    z.check_consistency().unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(read_all(&mut ch, 512), want);
    // The replay was written to the map: the log is free and a second crash loses nothing.
    assert_eq!(ch.write(3, &block(99, 4096, 1024)), IoStatus::Success);
    want[3 * 4096..4 * 4096].copy_from_slice(&block(99, 4096, 1024));
    drop(ch);
    std::mem::forget(z);
    let z = CompressBdev::open("z", base, &o).unwrap();
    z.check_consistency().unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(read_all(&mut ch, 512), want);
}

/// Blocks `0 .. blocks`, read 256 at a time.
fn read_all(ch: &mut SyncChannel, blocks: u64) -> Vec<u8> {
    let mut all = Vec::new();
    for first in (0..blocks).step_by(256) {
        let (st, d) = ch.read(first, (blocks - first).min(256) as u32);
        assert_eq!(st, IoStatus::Success);
        all.extend(d);
    }
    all
}

#[test]
fn a_logged_update_whose_data_is_not_there_falls_back_to_the_previous_run() {
    let (base, o, a, b) = two_versions();
    let z = CompressBdev::open("z", base.clone(), &o).unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(ch.write(0, &a), IoStatus::Success);
    assert_eq!(ch.flush(), IoStatus::Success);
    assert_eq!(ch.write(0, &b), IoStatus::Success);
    let run = z.shared.map().entries[0];
    drop(ch);
    std::mem::forget(z);
    // A power loss that kept the log record but not the data of the second write.
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    let zero = vec![0u8; run.blocks(12) as usize * 4096];
    assert_eq!(raw.write(run.block, &zero), IoStatus::Success);
    let z = CompressBdev::open("z", base, &o).unwrap();
    z.check_consistency().unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(ch.read(0, 4), (IoStatus::Success, a));
    assert_eq!(z.integrity_errors(), 0);
}

/// `sb` turned into the version-1 superblock of `l` (no log).
fn superblock_v1(l: &CompressLayout) -> Vec<u8> {
    let mut sb = vec![0u8; 4096];
    l.without_log().encode(&mut sb);
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[SUPER_BYTES_V1..].fill(0);
    let crc = crate::checksum::crc32c(&sb[..SUPER_BYTES_V1]);
    sb[SUPER_BYTES_V1..SUPER_BYTES_V1 + 4].copy_from_slice(&crc.to_le_bytes());
    sb
}

#[test]
fn a_version_1_volume_is_upgraded_in_place_or_refused_clearly() {
    let base = malloc(BlockSize::B4096, 1024);
    let o = opts(4 << 20);
    let a: Vec<u8> = (0..8).flat_map(|b| block(b, 4096, 1024)).collect();
    let z = CompressBdev::open("z", base.clone(), &o).unwrap();
    let l = z.layout();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(ch.write(0, &a), IoStatus::Success);
    drop(ch);
    drop(z); // a clean close: the map is in its pages
    let v1 = l.without_log();
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    let sb = superblock_v1(&l);
    assert_eq!(CompressLayout::decode(&sb), Ok((v1, true)));
    assert_eq!(raw.write(0, &sb), IoStatus::Success);
    let junk = vec![0x5a_u8; l.log_blocks as usize * 4096];
    assert_eq!(raw.write(l.log_start, &junk), IoStatus::Success);
    let z = CompressBdev::open("z", base.clone(), &o).unwrap();
    assert_eq!(z.layout(), l);
    z.check_consistency().unwrap();
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    assert_eq!(ch.read(0, 8), (IoStatus::Success, a.clone()));
    drop(ch);
    drop(z);
    assert_eq!(CompressLayout::decode(&raw.read(0, 1).1), Ok((l, false)));
    // A version-1 volume with a chunk where the log would go is refused, not damaged.
    let mut pages = load_pages(&mut raw, &v1).unwrap();
    let e = pages.entries[0];
    let tail = v1.data_start + v1.data_blocks - e.blocks(12);
    let (_, run) = raw.read(e.block, e.blocks(12) as u32);
    assert_eq!(raw.write(tail, &run), IoStatus::Success);
    pages.entries[0].block = tail;
    let seq = pages.seq[0] + 1;
    let mut page = vec![0u8; 4096];
    encode_page(&mut page, 0, seq, pages.covered[0], &pages.entries, &v1);
    assert_eq!(
        raw.write(v1.page_block(0, seq % 2), &page),
        IoStatus::Success
    );
    assert_eq!(raw.write(0, &sb), IoStatus::Success);
    let e = CompressBdev::open("z", base.clone(), &o).err().unwrap();
    assert!(e.to_string().contains("cannot upgrade"), "{e}");
    assert_eq!(raw.read(0, 1).1, sb, "the superblock is left alone");
}

struct SimBdev {
    info: Arc<BdevInfo>,
    disk: Arc<Mutex<SimDisk>>,
}

impl SimBdev {
    fn new(image: Vec<u8>) -> SimBdev {
        let caps = Caps::ALL_IO
            | Caps::RETAINS_DATA
            | Caps::UNMAP_READS_ZEROES
            | Caps::PERSISTENT
            | Caps::VOLATILE_CACHE;
        let blocks = (image.len() / 4096) as u64;
        SimBdev {
            info: BdevInfo::builder("sim", "sim", BlockSize::B4096, blocks, caps).build(),
            disk: Arc::new(Mutex::new(SimDisk {
                durable: image,
                cache: Default::default(),
                in_flight: Default::default(),
                next: 0,
            })),
        }
    }

    fn crash_image(&self, rng: &mut Rng) -> Vec<u8> {
        let d = self.disk.lock().unwrap();
        let mut img = d.durable.clone();
        let mut put = |b: u64, v: &[u8]| {
            if rng.next() & 1 == 0 {
                img[b as usize * 4096..][..4096].copy_from_slice(v);
            }
        };
        for (b, v) in &d.cache {
            put(*b, v);
        }
        for (lba, v) in d.in_flight.values() {
            for (i, x) in v.chunks(4096).enumerate() {
                put(lba + i as u64, x);
            }
        }
        img
    }
}

impl Bdev for SimBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let ops = SimChannel {
            disk: self.disk.clone(),
            queue: VecDeque::new(),
            rng: Rng(0x1234_5678 ^ self.info.block_count()),
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), 256))
    }
}

struct SimChannel {
    disk: Arc<Mutex<SimDisk>>,
    queue: VecDeque<(u64, u64, IoRequest)>,
    rng: Rng,
}

impl ChannelOps for SimChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        let mut d = self.disk.lock().unwrap();
        let id = d.next;
        d.next += 1;
        match io.io_type {
            IoType::Write => {
                let mut v = vec![0u8; io.bufs.total_len()];
                io.bufs.copy_to_slice(0, &mut v);
                d.in_flight.insert(id, (io.offset_blocks, v));
            }
            IoType::Unmap | IoType::WriteZeroes => {
                let v = vec![0u8; io.num_blocks as usize * 4096];
                d.in_flight.insert(id, (io.offset_blocks, v));
            }
            IoType::Flush => {
                // Covers what completed before it.
                let cache = std::mem::take(&mut d.cache);
                for (b, v) in cache {
                    d.durable[b as usize * 4096..][..4096].copy_from_slice(&v);
                }
            }
            IoType::Read => {}
        }
        let delay = self.rng.next() % 4;
        self.queue.push_back((delay, id, io));
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let mut n = 0;
        let mut d = self.disk.lock().unwrap();
        for _ in 0..self.queue.len() {
            let (delay, id, mut io) = self.queue.pop_front().unwrap();
            if delay > 0 {
                self.queue.push_back((delay - 1, id, io));
                continue;
            }
            if let Some((lba, v)) = d.in_flight.remove(&id) {
                for (i, x) in v.chunks(4096).enumerate() {
                    d.cache.insert(lba + i as u64, x.to_vec());
                }
            }
            if io.io_type == IoType::Read {
                for i in 0..u64::from(io.num_blocks) {
                    let b = io.offset_blocks + i;
                    let v = match d.cache.get(&b) {
                        Some(v) => v.clone(),
                        None => d.durable[b as usize * 4096..][..4096].to_vec(),
                    };
                    io.bufs.copy_from_slice(i as usize * 4096, &v);
                }
            }
            done.push(io.complete(IoStatus::Success));
            n += 1;
        }
        n
    }

    fn wake(&self) -> Wake {
        if self.queue.is_empty() {
            Wake::Event
        } else {
            Wake::Immediate
        }
    }
}

/// What a crash image may hold, from the log: per block, the seeds it may have (0: zero).
fn allowed(events: &[(char, u64, u64, u64, u64)], blocks: u64) -> Vec<Vec<u64>> {
    // (W, id, lba, n, seed), (C, id, ..), (F, completions before the flush, ..)
    let mut completions = Vec::new();
    let mut durable_count = 0;
    for &(k, a, ..) in events {
        match k {
            'C' => completions.push(a),
            'F' => durable_count = a as usize,
            _ => {}
        }
    }
    let durable: std::collections::HashSet<u64> =
        completions[..durable_count].iter().copied().collect();
    let mut model = vec![vec![0u64]; blocks as usize];
    for &(k, id, lba, n, seed) in events {
        if k != 'W' {
            continue;
        }
        for b in lba..lba + n {
            let set = &mut model[b as usize];
            if durable.contains(&id) {
                *set = vec![seed];
            } else if !set.contains(&seed) {
                set.push(seed);
            }
        }
    }
    model
}

#[test]
fn power_loss_at_random_points_keeps_flushed_writes() {
    let logical_blocks = 512u64;
    let sim = SimBdev::new(vec![0u8; 512 * 4096]);
    let sim = Arc::new(sim);
    let z = CompressBdev::open("z", sim.clone(), &opts(logical_blocks * 4096)).unwrap();
    let mut ch = z.open_channel().unwrap();
    let mut rng = Rng(0xfeed_beef);
    let mut events: Vec<(char, u64, u64, u64, u64)> = Vec::new();
    let mut in_flight: Vec<(u64, u64, u64)> = Vec::new();
    let mut flush: Option<u64> = None;
    let (mut next_id, mut completed, mut crashes, mut step) = (0u64, 0u64, 0u32, 0u64);
    let mut done = Vec::new();
    const FLUSH: u64 = 1 << 62;
    while crashes < 200 {
        step += 1;
        while in_flight.len() < 8 {
            let lba = rng.next() % logical_blocks;
            let n = (1 + rng.next() % 12).min(logical_blocks - lba);
            if in_flight
                .iter()
                .any(|&(_, l, k)| lba < l + k && l < lba + n)
            {
                break;
            }
            let id = next_id;
            next_id += 1;
            let (io, seed) = match rng.next() % 10 {
                0 => (IoRequest::no_data(IoType::Unmap, lba, n as u32, id), 0),
                _ => {
                    let seed = rng.next() | 1;
                    let random = [4096, 1900, 200][(seed % 3) as usize];
                    let mut data = AlignedBuf::new(n as usize * 4096);
                    for (i, b) in data.as_mut_slice().chunks_mut(4096).enumerate() {
                        b.copy_from_slice(&block(seed ^ (lba + i as u64), 4096, random));
                    }
                    (
                        IoRequest::write(lba, n as u32, SgList::from_buf(data), id),
                        seed,
                    )
                }
            };
            events.push(('W', id, lba, n, seed));
            ch.submit(io).unwrap();
            in_flight.push((id, lba, n));
        }
        if flush.is_none() && rng.next().is_multiple_of(6) {
            ch.submit(IoRequest::no_data(IoType::Flush, 0, 0, FLUSH))
                .unwrap();
            flush = Some(completed);
        }
        ch.poll(&mut done);
        for c in done.drain(..) {
            assert_eq!(c.status, IoStatus::Success);
            if c.tag == FLUSH {
                events.push(('F', flush.take().unwrap(), 0, 0, 0));
            } else {
                in_flight.retain(|&(id, _, _)| id != c.tag);
                events.push(('C', c.tag, 0, 0, 0));
                completed += 1;
            }
        }
        if step % 3 != 0 {
            continue;
        }
        // Power loss now: reopen a crash image and check it.
        crashes += 1;
        let img = sim.crash_image(&mut rng);
        let z2 = CompressBdev::open(
            "z2",
            Arc::new(SimBdev::new(img)),
            &opts(logical_blocks * 4096),
        )
        .unwrap_or_else(|e| panic!("crash {crashes}: {e}"));
        z2.check_consistency()
            .unwrap_or_else(|e| panic!("crash {crashes}: {e}"));
        let model = allowed(&events, logical_blocks);
        let mut r = SyncChannel::new(z2.open_channel().unwrap());
        let mut data = Vec::new();
        for half in 0..2 {
            let (st, d) = r.read(half * logical_blocks / 2, logical_blocks as u32 / 2);
            assert_eq!(st, IoStatus::Success, "crash {crashes}");
            data.extend(d);
        }
        for (lba, got) in data.chunks(4096).enumerate() {
            let ok = model[lba].iter().any(|&seed| {
                if seed == 0 {
                    return got.iter().all(|&x| x == 0);
                }
                let random = [4096, 1900, 200][(seed % 3) as usize];
                got == block(seed ^ lba as u64, 4096, random)
            });
            assert!(
                ok,
                "crash {crashes}: block {lba} holds none of {:x?}",
                model[lba]
            );
        }
        drop(r);
        std::mem::forget(z2); // no clean-close checkpoint on a crash image
    }
    // Flushes made checkpoints (each write now also waits for its log record, so fewer
    // requests and flushes complete per step than before the log).
    assert!(
        z.describe()["checkpoints"].as_u64().unwrap() > 30,
        "{}",
        z.describe()
    );
}
