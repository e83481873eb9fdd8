//! Fuzz target bodies and corpus replay (not a public API).
//!
//! Each body is a normal function called by a cargo-fuzz target in `fuzz/` (nightly, libFuzzer)
//! and by a stable `#[test]` that replays the checked-in corpus `fuzz/corpus/<target>/`, so a
//! crash found once stays a regression test. A body must never panic or hang on any input; it
//! panics only when the code under test breaks a promise (an assertion of the body).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bdev::Bdev;
use crate::compress::{Algorithm, CompressBdev, CompressLayout, CompressOptions};
use crate::malloc::MallocBdev;
use crate::stacked::Format;
use crate::sync::SyncChannel;
use crate::types::{BlockSize, IoStatus};

/// The checked-in corpus directory of fuzz target `target` (`fuzz/corpus/<target>` of the
/// workspace).
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `body` on every seed and on every file of `target`'s corpus; a panic names the input.
/// With `FERROBLK_WRITE_SEEDS=1` in the environment, the seeds are first written to the corpus
/// as `seed-<n>` (how the checked-in seeds are made).
pub fn replay(target: &str, seeds: &[Vec<u8>], body: impl Fn(&[u8])) {
    let dir = corpus_dir(target);
    if std::env::var_os("FERROBLK_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("write a seed");
        }
    }
    for (i, s) in seeds.iter().enumerate() {
        run_named(&format!("seed {i}"), s, &body);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for f in files {
        let data = std::fs::read(&f).expect("read a corpus file");
        run_named(&f.display().to_string(), &data, &body);
    }
}

/// Panics so far on the threads that serve I/O in the background: reactors, vhost-user
/// control threads and NVMe/TCP accept threads. Such a panic would otherwise only close a
/// socket; libFuzzer aborts on any panic by itself, and the corpus tests compare this count
/// before and after each input. (Panics of the calling thread reach the caller anyway.)
pub fn background_panics() -> usize {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let t = std::thread::current();
            let name = t.name().unwrap_or("");
            if name.starts_with("reactor-")
                || name == "vhost-ctl"
                || name.starts_with("nvmf-accept-")
            {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
            prev(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

fn run_named(name: &str, data: &[u8], body: &impl Fn(&[u8])) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(data)));
    if let Err(e) = r {
        eprintln!("fuzz input {name} failed");
        std::panic::resume_unwind(e);
    }
}

// ------------------------------------------------------------------------------ compress_open

/// Block size of the fuzzed compress volume's base.
const CMP_BS: BlockSize = BlockSize::B512;
/// Blocks of the base (128 KiB).
const CMP_BASE_BLOCKS: u64 = 256;
/// Offset of the superblock CRC (after the 68 bytes it covers).
const SUPER_CRC_AT: usize = 68;

/// The options the first input byte selects: bit 0-1 chunk size (4, 8, 16, 4 KiB), bit 2 logical
/// size (16 or 40 chunks), bit 3 algorithm (zstd; LZ4 in a build without the `zstd` feature).
fn compress_options(cfg: u8) -> CompressOptions {
    let chunk_size = [4u32 << 10, 8 << 10, 16 << 10, 4 << 10][usize::from(cfg & 3)];
    let chunks = if cfg & 4 == 0 { 16 } else { 40 };
    CompressOptions {
        size: u64::from(chunk_size) * chunks,
        chunk_size,
        algorithm: if cfg & 8 == 0 || !cfg!(feature = "zstd") {
            Algorithm::Lz4
        } else {
            Algorithm::Zstd
        },
        zstd_level: 1,
        format: Format::IfZero,
    }
}

/// Lays the input out as the first blocks of a base and opens a compress volume on it.
///
/// Byte 0 chooses the options ([`compress_options`]); bit 4 recomputes the superblock CRC and
/// bit 5 the CRC of every map page slot that has the page magic, so that mutations reach the
/// checks behind the CRCs. The other bytes are the base's contents from block 0.
///
/// Opening must fail cleanly or give a volume that works: every logical block reads (as data
/// or an integrity error), writes read back, the map stays consistent, and the volume reopens
/// with the same contents after a flush.
pub fn compress_open(data: &[u8]) {
    let Some((&cfg, image)) = data.split_first() else {
        return;
    };
    let opts = compress_options(cfg);
    let bs = CMP_BS.bytes() as usize;
    let mut img = vec![0u8; CMP_BASE_BLOCKS as usize * bs];
    let n = image.len().min(img.len());
    img[..n].copy_from_slice(&image[..n]);
    if cfg & 0x10 != 0 && img.starts_with(b"FBLKCMP1") {
        let crc = crate::checksum::crc32c(&img[..SUPER_CRC_AT]);
        img[SUPER_CRC_AT..SUPER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    if cfg & 0x20 != 0
        && let Some(l) = CompressLayout::new(
            CMP_BS,
            opts.chunk_size,
            opts.size / u64::from(opts.chunk_size),
            CMP_BASE_BLOCKS,
        )
    {
        for b in l.map_start..l.data_start {
            let blk = &mut img[b as usize * bs..][..bs];
            if blk.starts_with(b"FBCM") {
                blk[4..8].fill(0);
                let crc = crate::checksum::crc32c(blk);
                blk[4..8].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
    let base: Arc<dyn Bdev> = Arc::new(
        MallocBdev::new("fuzz-base", CMP_BS, CMP_BASE_BLOCKS, CMP_BASE_BLOCKS)
            .expect("malloc base"),
    );
    {
        let mut ch = SyncChannel::new(base.open_channel().expect("base channel"));
        assert!(ch.write(0, &img).is_ok(), "writing the base image");
    }
    let Ok(vol) = CompressBdev::open("fuzz", base.clone(), &opts) else {
        return;
    };
    let logical = vol.info().geometry().block_count;
    let per_chunk = opts.chunk_size as usize / bs;
    // Read everything: each chunk reads as data or fails its integrity check, nothing else.
    let mut before = Vec::new();
    {
        let mut ch = SyncChannel::new(vol.open_channel().expect("compress channel"));
        for first in (0..logical).step_by(per_chunk) {
            let (st, d) = ch.read(first, per_chunk as u32);
            assert!(
                matches!(st, IoStatus::Success | IoStatus::IntegrityError),
                "reading chunk at block {first}: {st}"
            );
            before.push((st, d));
        }
        // Rewrite chunk 1 whole (compressible) and block 0 of chunk 2 (read-modify-write of a
        // chunk that may be corrupt), then flush.
        let pattern: Vec<u8> = (0..opts.chunk_size as usize)
            .map(|i| (i / 64) as u8 ^ cfg)
            .collect();
        let w1 = ch.write(per_chunk as u64, &pattern);
        let w2 = ch.write(2 * per_chunk as u64, &[0xa5; 512]);
        let fl = ch.flush();
        if w1.is_ok() {
            let (st, d) = ch.read(per_chunk as u64, per_chunk as u32);
            assert!(st.is_ok(), "reading back chunk 1: {st}");
            assert!(d == pattern, "chunk 1 reads back what was written");
            before[1] = (st, d);
        }
        if w2.is_ok() {
            let (st, d) = ch.read(2 * per_chunk as u64, 1);
            assert!(st.is_ok() && d == [0xa5; 512], "chunk 2 block 0 reads back");
            before[2] = ch.read(2 * per_chunk as u64, per_chunk as u32);
        }
        if !fl.is_ok() {
            return;
        }
    }
    vol.check_consistency()
        .unwrap_or_else(|e| panic!("map inconsistent after I/O: {e}"));
    drop(vol);
    // A flushed volume reopens with the same contents.
    let vol = CompressBdev::open("fuzz", base, &opts)
        .unwrap_or_else(|e| panic!("a flushed volume does not reopen: {e}"));
    let mut ch = SyncChannel::new(vol.open_channel().expect("compress channel"));
    for (k, first) in (0..logical).step_by(per_chunk).enumerate() {
        let got = ch.read(first, per_chunk as u32);
        assert!(
            got.0 == before[k].0 && (!got.0.is_ok() || got.1 == before[k].1),
            "chunk {k} reads differently after reopening"
        );
    }
}

/// Valid inputs for [`compress_open`]: blank bases (formatted on open) with each option, and
/// volumes written by the code itself (a superblock, map pages, compressed and raw chunks).
pub fn compress_open_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for cfg in [0x00u8, 0x05, 0x0a, 0x33] {
        seeds.push(vec![cfg]);
        let opts = compress_options(cfg);
        let base: Arc<dyn Bdev> = Arc::new(
            MallocBdev::new("seed-base", CMP_BS, CMP_BASE_BLOCKS, CMP_BASE_BLOCKS)
                .expect("malloc base"),
        );
        let vol = CompressBdev::open("seed", base.clone(), &opts).expect("format");
        {
            let mut ch = SyncChannel::new(vol.open_channel().expect("channel"));
            let per_chunk = opts.chunk_size as usize / 512;
            let text: Vec<u8> = b"ferroblk compress seed "
                .repeat(opts.chunk_size as usize / 23 + 1)[..opts.chunk_size as usize]
                .to_vec();
            assert!(ch.write(0, &text).is_ok());
            let noise: Vec<u8> = (0..opts.chunk_size)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            assert!(ch.write(3 * per_chunk as u64, &noise).is_ok());
            assert!(ch.flush().is_ok());
        }
        drop(vol);
        let mut ch = SyncChannel::new(base.open_channel().expect("channel"));
        // The superblock, the map and the first data blocks are enough to reach every check.
        let (st, img) = ch.read(0, 96);
        assert!(st.is_ok());
        let mut s = vec![cfg];
        s.extend_from_slice(&img);
        while s.last() == Some(&0) {
            s.pop();
        }
        seeds.push(s);
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_open_corpus_replays() {
        replay("compress_open", &compress_open_seeds(), compress_open);
    }
}
