use std::time::{Duration, Instant};

use ferroblk_bdev::conformance;
use ferroblk_bdev::file::{DirectMode, FileBdev, FileOptions};
use ferroblk_bdev::malloc::MallocBdev;
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{AlignedBuf, BlockSize};

use super::*;

pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    s.chunks_exact(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// The key of `testdata/xts_openssl.txt`: bytes 0x00..0x3f.
fn vector_key() -> Key {
    Key::from_bytes(&(0..64u8).collect::<Vec<_>>()).unwrap()
}

fn vector_plaintext(bs: usize, lba: u64) -> Vec<u8> {
    (0..bs)
        .map(|i| ((i as u64 * 31 + lba) % 256) as u8)
        .collect()
}

struct Vector {
    bs: usize,
    lba: u64,
    iv: u64,
    ct: Vec<u8>,
}

/// Vectors produced by OpenSSL (see the file's header for how), not by this code.
fn openssl_vectors() -> Vec<Vector> {
    include_str!("../testdata/xts_openssl.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Vector {
                bs: f[0].parse().unwrap(),
                lba: f[1].parse().unwrap(),
                iv: f[2].parse().unwrap(),
                ct: unhex(f[3]),
            }
        })
        .collect()
}

/// Every engine this CPU runs (an engine it cannot run is reported on stderr).
fn engines() -> Vec<Engine> {
    Engine::runnable("XTS", engine_supported)
}

/// xorshift64*: reproducible test data from a seed printed with each failure.
fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn rand_bytes(x: &mut u64, len: usize) -> Vec<u8> {
    (0..len).map(|_| next_rand(x) as u8).collect()
}

/// A random seed (never 0, which xorshift keeps at 0).
fn seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) | 1
}

#[test]
fn ieee1619_vector_10_aes256_512_byte_unit() {
    // IEEE 1619-2007 Annex B, vector 10: XTS-AES-256, data unit sequence number 0xff,
    // 512-byte data unit 00 01 .. ff 00 01 .. ff.
    let key = Key::from_hex(
        "2718281828459045235360287471352662497757247093699959574966967627\
         3141592653589793238462643383279502884197169399375105820974944592",
    )
    .unwrap();
    let expected = unhex(
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b\
         5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd\
         5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0\
         c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca\
         2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0\
         b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f\
         93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec\
         583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a\
         84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1\
         505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae\
         9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29\
         a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac\
         6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f\
         645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385\
         1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa\
         773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    );
    let plaintext: Vec<u8> = (0..512).map(|i| i as u8).collect();
    for e in engines() {
        let x = XtsCipher::with_engine(&key, e).unwrap();
        let mut buf = plaintext.clone();
        x.encrypt_unit(0xff, &mut buf);
        assert!(
            buf == expected,
            "{}: IEEE 1619 vector 10 ciphertext",
            e.name()
        );
        x.decrypt_unit(0xff, &mut buf);
        assert!(
            buf == plaintext,
            "{}: IEEE 1619 vector 10 round trip",
            e.name()
        );
    }
}

#[test]
fn every_engine_matches_openssl_aes_xts_plain64_vectors() {
    let vectors = openssl_vectors();
    assert_eq!(vectors.len(), 5);
    for e in engines() {
        let x = XtsCipher::with_engine(&vector_key(), e).unwrap();
        for v in &vectors {
            let shift = v.bs.trailing_zeros();
            assert_eq!(iv_of(v.lba, shift), v.iv, "IV convention at lba {}", v.lba);
            let pt = vector_plaintext(v.bs, v.lba);
            let mut buf = pt.clone();
            x.encrypt_unit(v.iv, &mut buf);
            let (n, bs, lba) = (e.name(), v.bs, v.lba);
            assert!(buf == v.ct, "{n}: bs {bs} lba {lba}: ciphertext differs");
            x.decrypt_unit(v.iv, &mut buf);
            assert!(buf == pt, "{n}: bs {bs} lba {lba}: round trip");
        }
    }
}

#[test]
fn every_engine_matches_openssl_on_odd_block_counts_and_ivs_near_the_top() {
    let key = Key::from_bytes(&(0..64u32).map(|i| (i * 7 + 3) as u8).collect::<Vec<_>>()).unwrap();
    let vectors: Vec<(usize, u64, Vec<u8>)> = include_str!("../testdata/xts_openssl_blocks.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), unhex(f[2]))
        })
        .collect();
    assert_eq!(vectors.len(), 7);
    for e in engines() {
        let x = XtsCipher::with_engine(&key, e).unwrap();
        for (blocks, iv, ct) in &vectors {
            let pt: Vec<u8> = (0..16 * blocks)
                .map(|i| ((i * 13 + blocks) % 256) as u8)
                .collect();
            let mut buf = pt.clone();
            x.encrypt_unit(*iv, &mut buf);
            let n = e.name();
            assert!(
                buf == *ct,
                "{n}: {blocks} blocks iv {iv}: ciphertext differs"
            );
            x.decrypt_unit(*iv, &mut buf);
            assert!(buf == pt, "{n}: {blocks} blocks iv {iv}: round trip");
        }
    }
}

/// Unit sizes of the cross-checks: every block count from 1 to 32 (16 to 512 bytes), odd
/// counts around the 8- and 16-block strides of the hardware engines, and 4096 bytes.
fn unit_sizes() -> Vec<usize> {
    let mut sizes: Vec<usize> = (1..=32).map(|b| 16 * b).collect();
    sizes.extend([47, 48, 49, 63, 64, 65, 127, 255, 256].map(|b| 16 * b));
    sizes
}

#[test]
fn every_engine_matches_the_portable_reference() {
    let seed = seed();
    let mut rng = seed;
    for _ in 0..3 {
        let key = Key::from_bytes(&rand_bytes(&mut rng, 64)).unwrap();
        let reference = XtsCipher::with_engine(&key, Engine::Portable).unwrap();
        let ivs = [
            0,
            1,
            next_rand(&mut rng),
            next_rand(&mut rng) >> 20,
            u64::MAX,
            u64::MAX - 1,
            u64::MAX - 8,
            u64::MAX - next_rand(&mut rng) % 4096,
            1 << 63,
            u64::from(u32::MAX),
        ];
        for e in engines() {
            let x = XtsCipher::with_engine(&key, e).unwrap();
            assert_eq!(x.engine(), e);
            for len in unit_sizes() {
                for iv in ivs {
                    let data = rand_bytes(&mut rng, len);
                    let (mut a, mut b) = (data.clone(), data.clone());
                    x.encrypt_unit(iv, &mut a);
                    reference.encrypt_unit(iv, &mut b);
                    let n = e.name();
                    assert!(a == b, "{n}: encrypt len {len} iv {iv} (seed {seed:#x})");
                    x.decrypt_unit(iv, &mut a);
                    assert!(
                        a == data,
                        "{n}: round trip len {len} iv {iv} (seed {seed:#x})"
                    );
                    // Decryption of data that was not encrypted here, against the reference.
                    let (mut a, mut b) = (data.clone(), data.clone());
                    x.decrypt_unit(iv, &mut a);
                    reference.decrypt_unit(iv, &mut b);
                    assert!(a == b, "{n}: decrypt len {len} iv {iv} (seed {seed:#x})");
                }
            }
        }
    }
}

#[test]
fn every_engine_writes_only_its_unit_at_any_alignment() {
    let seed = seed();
    let mut rng = seed;
    let key = Key::generate(64).unwrap();
    let reference = XtsCipher::with_engine(&key, Engine::Portable).unwrap();
    for e in engines() {
        let x = XtsCipher::with_engine(&key, e).unwrap();
        for len in unit_sizes() {
            for offset in [0, 1, 8, 63] {
                let iv = next_rand(&mut rng);
                let buf = rand_bytes(&mut rng, offset + len + 80);
                let mut expected = buf.clone();
                reference.encrypt_unit(iv, &mut expected[offset..offset + len]);
                let mut got = buf.clone();
                x.encrypt_unit(iv, &mut got[offset..offset + len]);
                let n = e.name();
                assert!(
                    got == expected,
                    "{n}: len {len} at offset {offset} (seed {seed:#x})"
                );
                x.decrypt_unit(iv, &mut got[offset..offset + len]);
                assert!(got == buf, "{n}: len {len} at offset {offset} round trip");
            }
        }
    }
}

#[test]
fn every_engine_refuses_units_that_are_not_whole_blocks() {
    let key = Key::generate(64).unwrap();
    for e in engines() {
        let x = XtsCipher::with_engine(&key, e).unwrap();
        for len in [0, 8, 17, 520] {
            let x = std::panic::AssertUnwindSafe(&x);
            let r = std::panic::catch_unwind(|| x.encrypt_unit(0, &mut vec![0; len]));
            assert!(r.is_err(), "{}: encrypt of {len} bytes", e.name());
            let r = std::panic::catch_unwind(|| x.decrypt_unit(0, &mut vec![0; len]));
            assert!(r.is_err(), "{}: decrypt of {len} bytes", e.name());
        }
    }
}

#[test]
fn new_runs_the_fastest_engine_the_cpu_has() {
    let x = XtsCipher::new(&Key::generate(64).unwrap()).unwrap();
    assert_eq!(x.engine(), Engine::fastest(engine_supported));
    assert!(engine_supported(x.engine()));
    let fastest = engines()[0];
    assert_eq!(x.engine(), fastest);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
        && std::arch::is_x86_feature_detected!("aes")
    {
        assert_eq!(x.engine(), Engine::Vaes);
    } else if std::arch::is_x86_feature_detected!("aes") {
        assert_eq!(x.engine(), Engine::AesNi);
    }
}

#[test]
fn wrong_key_lengths_and_equal_halves_are_refused_by_every_engine() {
    for e in engines() {
        let short = Key::from_hex(&"5f1d2a9c".repeat(8)).unwrap();
        assert!(matches!(
            XtsCipher::with_engine(&short, e),
            Err(KeyError::Length {
                need: 64,
                got: 32,
                ..
            })
        ));
        let same = Key::from_hex(&"ab".repeat(64)).unwrap();
        assert!(matches!(
            XtsCipher::with_engine(&same, e),
            Err(KeyError::XtsHalvesEqual)
        ));
    }
}

fn malloc(bs: BlockSize, blocks: u64) -> Arc<dyn Bdev> {
    Arc::new(MallocBdev::new("m", bs, blocks, blocks).unwrap())
}

#[test]
fn writes_through_the_bdev_leave_openssl_ciphertext_on_the_base() {
    for v in openssl_vectors().into_iter().filter(|v| v.lba < 1 << 20) {
        let bs = BlockSize::new(v.bs as u32).unwrap();
        let base = malloc(bs, v.lba + 4);
        let x = XtsBdev::new("x", base.clone(), vector_key()).unwrap();
        let mut ch = SyncChannel::new(x.open_channel().unwrap());
        assert_eq!(
            ch.write(v.lba, &vector_plaintext(v.bs, v.lba)),
            IoStatus::Success
        );
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        let (st, at_rest) = raw.read(v.lba, 1);
        assert_eq!(st, IoStatus::Success);
        assert!(
            at_rest == v.ct,
            "bs {} lba {}: base does not hold the dm-crypt ciphertext",
            v.bs,
            v.lba
        );
    }
}

#[test]
fn xts_passes_conformance_over_malloc_4k_and_512() {
    conformance::run(
        &|| {
            Arc::new(
                XtsBdev::new(
                    "x4k",
                    malloc(BlockSize::B4096, 1024),
                    Key::generate(64).unwrap(),
                )
                .unwrap(),
            )
        },
        false,
    );
    conformance::run(
        &|| {
            Arc::new(
                XtsBdev::new(
                    "x512",
                    malloc(BlockSize::B512, 4096),
                    Key::generate(64).unwrap(),
                )
                .unwrap(),
            )
        },
        false,
    );
}

#[test]
fn xts_passes_conformance_over_file_with_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate(64).unwrap();
    for (i, bs) in [BlockSize::B4096, BlockSize::B512].into_iter().enumerate() {
        let o = FileOptions {
            path: dir.path().join(format!("x{i}.img")),
            block_size: bs,
            size: Some(4 << 20),
            create: true,
            direct: DirectMode::Auto,
            read_only: false,
        };
        conformance::run(
            &|| {
                let base: Arc<dyn Bdev> = Arc::new(FileBdev::open("f", &o).unwrap());
                Arc::new(XtsBdev::new("xf", base, key.clone()).unwrap())
            },
            true,
        );
    }
}

#[test]
fn ciphertext_at_rest_does_not_contain_the_plaintext() {
    let base = malloc(BlockSize::B4096, 64);
    let x = XtsBdev::new("x", base.clone(), Key::generate(64).unwrap()).unwrap();
    let mut ch = SyncChannel::new(x.open_channel().unwrap());
    // A highly repetitive plaintext: ECB-like leaks would show as repeated 16-byte blocks.
    let plain: Vec<u8> = b"ferroblk secret!"
        .iter()
        .copied()
        .cycle()
        .take(8 * 4096)
        .collect();
    assert_eq!(ch.write(8, &plain), IoStatus::Success);
    let (_, raw) = SyncChannel::new(base.open_channel().unwrap()).read(8, 8);
    for (i, blk) in raw.chunks_exact(16).enumerate() {
        assert_ne!(blk, b"ferroblk secret!", "plaintext at byte {}", i * 16);
    }
    let mut seen = std::collections::HashSet::new();
    for blk in raw.chunks_exact(16) {
        assert!(seen.insert(blk.to_vec()), "repeated ciphertext block");
    }
    let (_, back) = ch.read(8, 8);
    assert!(back == plain);
}

#[test]
fn callers_write_buffer_is_unchanged() {
    let x = XtsBdev::new(
        "x",
        malloc(BlockSize::B4096, 64),
        Key::generate(64).unwrap(),
    )
    .unwrap();
    let mut ch = SyncChannel::new(x.open_channel().unwrap());
    let data: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(&data);
    // Split in odd segments too, so the copy path with straddling blocks runs.
    let c = ch.run(IoRequest::write(
        5,
        3,
        SgList::from_buf_split(buf, &[100, 5000, 7188]),
        0,
    ));
    assert_eq!(c.status, IoStatus::Success);
    assert!(c.bufs.into_buf().unwrap().as_slice() == &data[..]);
    assert!(ch.read(5, 3).1 == data);
}

#[test]
fn write_zeroes_reads_zeroes_and_unmap_passes_through() {
    let base = malloc(BlockSize::B4096, 256);
    let x = XtsBdev::new("x", base.clone(), Key::generate(64).unwrap()).unwrap();
    assert!(!x.info().caps().contains(Caps::UNMAP_READS_ZEROES));
    let mut ch = SyncChannel::new(x.open_channel().unwrap());
    for lba in (0..256).step_by(32) {
        assert_eq!(ch.write(lba, &vec![0xee; 32 * 4096]), IoStatus::Success);
    }
    // Larger than one chunk and than the chunks one request keeps in flight.
    assert_eq!(ch.write_zeroes(1, 200), IoStatus::Success);
    let back: Vec<u8> = (0..256)
        .step_by(32)
        .flat_map(|lba| ch.read(lba, 32).1)
        .collect();
    assert!(back[..4096].iter().all(|&b| b == 0xee));
    assert!(back[4096..201 * 4096].iter().all(|&b| b == 0));
    assert!(back[201 * 4096..].iter().all(|&b| b == 0xee));
    // The zeroes were encrypted: the base holds no zero block there.
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    assert!(raw.read(1, 1).1.iter().any(|&b| b != 0));
    // Unmap reaches the base (malloc zeroes it); the XTS bdev decrypts those zeroes.
    assert_eq!(ch.unmap(210, 2), IoStatus::Success);
    assert!(raw.read(210, 2).1.iter().all(|&b| b == 0));
    assert!(ch.read(210, 1).1.iter().any(|&b| b != 0));
}

#[test]
fn bad_keys_are_refused_without_showing_the_key() {
    let hex32 = "5f1d2a9c".repeat(8);
    let e = XtsBdev::new(
        "x",
        malloc(BlockSize::B4096, 8),
        Key::from_hex(&hex32).unwrap(),
    )
    .err()
    .unwrap();
    assert_eq!(e.field(), Some("key"));
    assert!(e.to_string().contains("64"), "{e}");
    assert!(!e.to_string().contains("5f1d2a9c"), "{e}");
    let same = Key::from_hex(&"ab".repeat(64)).unwrap();
    let e = XtsBdev::new("x", malloc(BlockSize::B4096, 8), same)
        .err()
        .unwrap();
    assert!(e.to_string().contains("equal"), "{e}");
}

#[test]
fn follows_base_resize_and_reports_the_dm_crypt_table() {
    let base: Arc<dyn Bdev> = Arc::new(MallocBdev::new("m", BlockSize::B4096, 16, 64).unwrap());
    let x = XtsBdev::new("x", base.clone(), Key::generate(64).unwrap()).unwrap();
    base.resize(32).unwrap();
    assert_eq!(x.info().block_count(), 32);
    assert_eq!(
        x.dm_crypt_table(),
        "0 256 crypt aes-xts-plain64 <hexkey> 0 <device> 0 1 sector_size:4096"
    );
}

/// Best throughput of `x` on 4 KiB units over `runs` runs of `run` each, in GB/s.
fn unit_gbs(x: &XtsCipher, encrypt: bool, runs: u32, run: Duration) -> f64 {
    let mut buf = vec![0x5au8; 64 * 4096];
    let mut best = 0f64;
    let mut iv = 0u64;
    for _ in 0..runs {
        let t = Instant::now();
        let mut bytes = 0u64;
        while t.elapsed() < run {
            for unit in buf.chunks_exact_mut(4096) {
                if encrypt {
                    x.encrypt_unit(iv, unit);
                } else {
                    x.decrypt_unit(iv, unit);
                }
                iv += 8;
                bytes += 4096;
            }
        }
        best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Throughput of the XTS transform on 4 KiB units, single thread: the engine `new` picks, then
/// (shorter) every other engine this CPU runs. Run with
/// `cargo test --release -p ferroblk-crypto -- --ignored --nocapture xts_throughput`.
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn xts_throughput_4k_units() {
    let key = Key::generate(64).unwrap();
    let x = XtsCipher::new(&key).unwrap();
    let engine = x.engine().name();
    for (name, enc) in [("encrypt", true), ("decrypt", false)] {
        let best = unit_gbs(&x, enc, 5, Duration::from_millis(400));
        println!(
            "aes-256-xts {name} 4096-byte units: {best:.2} GB/s (best of 5 × 0.4 s, engine {engine})"
        );
    }
    for e in engines().into_iter().filter(|&e| e != x.engine()) {
        let x = XtsCipher::with_engine(&key, e).unwrap();
        for (name, enc) in [("encrypt", true), ("decrypt", false)] {
            let best = unit_gbs(&x, enc, 3, Duration::from_millis(200));
            println!(
                "  engine {}: {name} {best:.2} GB/s (best of 3 × 0.2 s)",
                e.name()
            );
        }
    }
}

/// End-to-end throughput of the XTS bdev over a RAM base (copy + encrypt for writes, decrypt in
/// place for reads), one thread. Run like `xts_throughput_4k_units`.
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn xts_bdev_throughput_over_malloc() {
    let x = XtsBdev::new(
        "x",
        malloc(BlockSize::B4096, 16384),
        Key::generate(64).unwrap(),
    )
    .unwrap();
    for (blocks, qd) in [(1u32, 32usize), (32, 8)] {
        for t in [IoType::Write, IoType::Read] {
            let gbs = crate::common::throughput(&x, t, blocks, qd, 1.0);
            println!(
                "crypt_xts over malloc: {} KiB {} qd {qd}: {gbs:.2} GB/s",
                blocks * 4,
                t.name()
            );
        }
    }
}

#[test]
fn reads_decrypt_in_the_channels_buffer_never_in_the_callers() {
    for bs in [BlockSize::B4096, BlockSize::B512] {
        let spy = crate::testing::ReadSpy::new(malloc(bs, 1024));
        let x = XtsBdev::new("x", spy.clone(), vector_key()).unwrap();
        let mut ch = SyncChannel::new(x.open_channel().unwrap());
        // One block, and a whole MAX_TRANSFER_BYTES request.
        for blocks in [1, (MAX_TRANSFER_BYTES / bs.bytes() as usize) as u32] {
            crate::testing::assert_reads_never_reach_the_callers_buffer(&spy, &mut ch, 3, blocks);
        }
    }
}

#[test]
fn a_read_finding_no_pool_buffer_is_handed_back_and_buffers_come_back() {
    let x = XtsBdev::new("x", malloc(BlockSize::B4096, 1024), vector_key()).unwrap();
    let mut ch = SyncChannel::new(x.open_channel().unwrap());
    ferroblk_bdev::testing::fill(&mut ch, 1024, 4096, 1);
    drop(ch);
    crate::testing::assert_reads_hold_pool_buffers(&x, &|lba| {
        ferroblk_bdev::testing::block_data(lba, 4096, 1)
    });
}

#[test]
fn every_engine_decrypts_out_of_place_as_the_reference_writing_only_its_unit() {
    let seed = seed();
    let mut rng = seed;
    let key = Key::from_bytes(&rand_bytes(&mut rng, 64)).unwrap();
    let reference = XtsCipher::with_engine(&key, Engine::Portable).unwrap();
    for e in engines() {
        let x = XtsCipher::with_engine(&key, e).unwrap();
        let n = e.name();
        for len in unit_sizes() {
            for offset in [0, 1, 8, 63] {
                let iv = next_rand(&mut rng);
                let src = rand_bytes(&mut rng, len);
                let mut expected = src.clone();
                reference.decrypt_unit(iv, &mut expected);
                let around = rand_bytes(&mut rng, offset + len + 80);
                let mut dst = around.clone();
                // SAFETY: `dst` has `offset + len` bytes and more; it does not overlap `src`.
                unsafe { x.decrypt_unit_to(iv, &src, dst.as_mut_ptr().add(offset)) };
                assert!(
                    dst[offset..offset + len] == expected[..],
                    "{n}: len {len} to offset {offset} (seed {seed:#x})"
                );
                assert!(
                    dst[..offset] == around[..offset],
                    "{n}: wrote before the unit"
                );
                assert!(
                    dst[offset + len..] == around[offset + len..],
                    "{n}: wrote past the unit"
                );
            }
        }
    }
}

#[test]
fn decrypt_out_fills_segments_of_any_shape_as_the_reference() {
    let seed = seed();
    let mut rng = seed;
    let key = Key::from_bytes(&rand_bytes(&mut rng, 64)).unwrap();
    let reference = XtsCipher::with_engine(&key, Engine::Portable).unwrap();
    let (bs, units, lba) = (512usize, 8usize, 77u64);
    // Units inside one segment, straddling two or three, and empty segments between.
    let shapes: [&[usize]; 4] = [
        &[4096],
        &[512, 0, 1024, 2560],
        &[100, 700, 16, 0, 300, 2980],
        &[1, 511, 513, 1535, 8, 1528],
    ];
    for e in engines() {
        let x = XtsCipher::with_engine(&key, e).unwrap();
        for lens in shapes {
            let ct = rand_bytes(&mut rng, bs * units);
            let mut expected = ct.clone();
            for (i, u) in expected.chunks_exact_mut(bs).enumerate() {
                reference.decrypt_unit(iv_of(lba + i as u64, 9), u);
            }
            let mut data = ct.clone();
            let mut bufs = SgList::from_buf_split(AlignedBuf::new(bs * units), lens);
            decrypt_out(&x, (lba, 9), bs, &mut data, &mut bufs);
            let got = bufs.into_buf().unwrap();
            assert!(
                got.as_slice() == &expected[..],
                "{} {lens:?} (seed {seed:#x})",
                e.name()
            );
        }
    }
}
