use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::{AeadInPlace, Aes256Gcm, KeyInit};
use ferroblk_bdev::conformance;
use ferroblk_bdev::file::FileBdev;
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::testing::{
    assert_each_tampered_block_fails, assert_reads_around_tampering, block_data, file,
    file_options, fill, flip, malloc, tamper_sampled, write_alternate_blocks_from_two_channels,
};
use ferroblk_bdev::{BlockSize, IoRequest, IoStatus, IoType};

use super::*;

fn key() -> Key {
    Key::from_hex(&"6a09e667bb67ae853c6ef372a54ff53a".repeat(2)).unwrap()
}

#[test]
fn the_header_is_the_gcm_format() {
    let base = malloc(BlockSize::B4096, 256);
    let g = GcmBdev::open("g", base.clone(), key()).unwrap();
    let (_, h) = SyncChannel::new(base.open_channel().unwrap()).read(0, 1);
    assert_eq!(&h[0..8], b"FBLKGCM1");
    assert_eq!(h[8..12], 1u32.to_le_bytes());
    assert_eq!(h[12..16], 4096u32.to_le_bytes());
    let l = g.layout();
    assert_eq!((l.data_blocks, l.md_start, l.md_blocks), (253, 254, 2));
    assert_eq!(h[16..24], 253u64.to_le_bytes());
    assert_eq!(h[24..32], 254u64.to_le_bytes());
    let id: String = h[32..48].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(g.describe()["volume_id"], id);
    assert_eq!(h[92..96], crc32(&h[..92]).to_le_bytes());
    assert!(h[96..].iter().all(|&b| b == 0));
    // The key check value: 16 zero bytes under the key, the header up to the volume id as AAD.
    let mut ct: [u8; 16] = h[76..92].try_into().unwrap();
    Aes256Gcm::new(GenericArray::from_slice(key().expose()))
        .decrypt_in_place_detached(
            GenericArray::from_slice(&h[48..60]),
            &h[..48],
            &mut ct,
            GenericArray::from_slice(&h[60..76]),
        )
        .unwrap();
    assert_eq!(ct, [0u8; 16], "the key check value decrypts to zeroes");
}

#[test]
fn gcm_passes_conformance_over_malloc_4k_and_512() {
    conformance::run(
        &|| Arc::new(GcmBdev::open("g4k", malloc(BlockSize::B4096, 1100), key()).unwrap()),
        false,
    );
    conformance::run(
        &|| Arc::new(GcmBdev::open("g512", malloc(BlockSize::B512, 4400), key()).unwrap()),
        false,
    );
}

#[test]
fn gcm_passes_conformance_over_file_with_reopen() {
    let dir = tempfile::tempdir().unwrap();
    for (i, bs) in [BlockSize::B4096, BlockSize::B512].into_iter().enumerate() {
        let o = file_options(&dir.path().join(format!("g{i}.img")), bs, 4 << 20);
        conformance::run(
            &|| {
                let base: Arc<dyn Bdev> = Arc::new(FileBdev::open("f", &o).unwrap());
                Arc::new(GcmBdev::open("gf", base, key()).unwrap())
            },
            true,
        );
    }
}

#[test]
fn exposes_the_data_region_and_reads_never_written_blocks_as_zeroes() {
    let g = GcmBdev::open("g", malloc(BlockSize::B4096, 1000), key()).unwrap();
    let l = g.layout();
    assert_eq!((l.data_start, l.entries_per_block), (1, 128));
    assert_eq!(g.info().block_count(), l.data_blocks);
    assert!(l.data_blocks >= 990 && l.base_blocks() <= 1000, "{l:?}");
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    let (st, data) = ch.read(l.data_blocks - 8, 8);
    assert_eq!(st, IoStatus::Success);
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn ciphertext_at_rest_does_not_contain_the_plaintext() {
    let base = malloc(BlockSize::B4096, 256);
    let g = GcmBdev::open("g", base.clone(), key()).unwrap();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    let plain: Vec<u8> = b"ferroblk secret!"
        .iter()
        .copied()
        .cycle()
        .take(4 * 4096)
        .collect();
    assert_eq!(ch.write(10, &plain), IoStatus::Success);
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    let (_, at_rest) = raw.read(0, 256);
    for (i, blk) in at_rest.chunks_exact(16).enumerate() {
        assert_ne!(
            blk,
            b"ferroblk secret!",
            "plaintext at base byte {}",
            i * 16
        );
    }
    // The same plaintext in two blocks gives different ciphertexts (fresh nonces).
    assert_eq!(ch.write(20, &plain[..4096]), IoStatus::Success);
    assert_eq!(ch.write(21, &plain[..4096]), IoStatus::Success);
    let (_, two) = raw.read(l_data(&g, 20), 2);
    assert_ne!(two[..4096], two[4096..]);
    assert!(ch.read(10, 4).1 == plain);
}

fn l_data(g: &GcmBdev, lba: u64) -> u64 {
    g.layout().data_start + lba
}

#[test]
fn tampering_with_100_random_blocks_is_always_detected() {
    let base = malloc(BlockSize::B4096, 2048);
    let g = GcmBdev::open("g", base.clone(), key()).unwrap();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    let (chosen, written) = tamper_sampled(&mut ch, &mut raw, &g.layout(), 100);
    assert_each_tampered_block_fails(&mut ch, &chosen);
    assert_eq!(g.integrity_errors(), 100);
    assert_reads_around_tampering(&mut ch, &chosen, written);
}

#[test]
fn moved_ciphertext_is_detected() {
    let base = malloc(BlockSize::B4096, 512);
    let g = GcmBdev::open("g", base.clone(), key()).unwrap();
    let l = g.layout();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    fill(&mut ch, 300, 4096, 1);
    // Copy block 5's ciphertext and entry over block 200 (another metadata block).
    let (_, data5) = raw.read(l.data_start + 5, 1);
    assert_eq!(raw.write(l.data_start + 200, &data5), IoStatus::Success);
    let (md5, off5) = l.entry_of(5);
    let (md200, off200) = l.entry_of(200);
    let (_, m5) = raw.read(l.md_start + md5, 1);
    let (_, mut m200) = raw.read(l.md_start + md200, 1);
    m200[off200..off200 + ENTRY_BYTES].copy_from_slice(&m5[off5..off5 + ENTRY_BYTES]);
    assert_eq!(raw.write(l.md_start + md200, &m200), IoStatus::Success);
    assert_eq!(ch.read(200, 1).0, IoStatus::IntegrityError);
    assert_eq!(ch.read(5, 1).0, IoStatus::Success);
}

#[test]
fn blocks_moved_between_volumes_with_the_same_key_are_detected() {
    let (a, b) = (malloc(BlockSize::B4096, 256), malloc(BlockSize::B4096, 256));
    let ga = GcmBdev::open("a", a.clone(), key()).unwrap();
    let gb = GcmBdev::open("b", b.clone(), key()).unwrap();
    let l = ga.layout();
    SyncChannel::new(ga.open_channel().unwrap()).write(3, &block_data(3, 4096, 1));
    let mut ra = SyncChannel::new(a.open_channel().unwrap());
    let mut rb = SyncChannel::new(b.open_channel().unwrap());
    for lba in [l.data_start + 3, l.md_start] {
        let (_, d) = ra.read(lba, 1);
        assert_eq!(rb.write(lba, &d), IoStatus::Success);
    }
    let mut chb = SyncChannel::new(gb.open_channel().unwrap());
    assert_eq!(chb.read(3, 1).0, IoStatus::IntegrityError);
}

#[test]
fn wrong_key_fails_at_open_without_showing_a_key() {
    let base = malloc(BlockSize::B4096, 128);
    let g = GcmBdev::open("g", base.clone(), key()).unwrap();
    SyncChannel::new(g.open_channel().unwrap()).write(0, &[9u8; 4096]);
    drop(g);
    let wrong_hex = "c0ffee00".repeat(8);
    let e = GcmBdev::open("g", base.clone(), Key::from_hex(&wrong_hex).unwrap())
        .err()
        .unwrap();
    assert!(matches!(e, CryptoError::WrongKey { .. }), "{e}");
    let msg = format!("{e} / {e:?}");
    assert!(msg.contains("wrong key"), "{msg}");
    assert!(
        !msg.contains("c0ffee00") && !msg.contains("6a09e667"),
        "{msg}"
    );
    let g = GcmBdev::open("g", base, key()).unwrap();
    let (st, data) = SyncChannel::new(g.open_channel().unwrap()).read(0, 1);
    assert_eq!(st, IoStatus::Success);
    assert!(data.iter().all(|&b| b == 9));
    let e = GcmBdev::open(
        "g",
        malloc(BlockSize::B4096, 128),
        Key::generate(64).unwrap(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, CryptoError::Key { .. }), "{e}");
}

#[test]
fn foreign_data_and_corrupted_headers_are_refused() {
    let base = malloc(BlockSize::B4096, 128);
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    assert_eq!(raw.write(0, &[0x55; 4096]), IoStatus::Success);
    let e = GcmBdev::open("g", base.clone(), key()).err().unwrap();
    assert!(e.to_string().contains("refusing to format"), "{e}");
    assert!(
        raw.read(0, 1).1.iter().all(|&b| b == 0x55),
        "base untouched"
    );

    let base = malloc(BlockSize::B4096, 128);
    drop(GcmBdev::open("g", base.clone(), key()).unwrap());
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    flip(&mut raw, 0, 20);
    let e = GcmBdev::open("g", base.clone(), key()).err().unwrap();
    assert!(e.to_string().contains("corrupted"), "{e}");
    assert_eq!(BdevError::from(e).field(), Some("base"));

    let tiny = malloc(BlockSize::B4096, 2);
    assert!(GcmBdev::open("g", tiny, key()).is_err());
}

#[test]
fn a_block_failing_its_tag_never_leaves_plaintext_in_the_callers_buffer() {
    let key_bytes: [u8; 32] = key().expose().try_into().unwrap();
    let bs = 4096;
    let plain: Vec<u8> = (0..2 * bs).map(|i| (i * 7 % 251) as u8 + 1).collect();
    // One buffer per block, and blocks straddling segments.
    let layouts: [&[usize]; 2] = [&[bs, bs], &[1000, 4096, 3096]];
    for e in crate::common::Engine::runnable("GCM", cipher::engine_supported) {
        let cipher = GcmCipher::with_engine(&key_bytes, e);
        let mut ch = GcmEntries {
            cipher: cipher.clone(),
            shared: Arc::new(GcmShared {
                cipher,
                volume_id: [7; 16],
                name: "g".into(),
                integrity: IntegrityLog::new("AES-256-GCM authentication failed"),
            }),
            bs,
            nonce_prefix: [1; 4],
            nonce_counter: 0,
            pool: BufPool::new(4096),
            bounce: vec![0u8; bs],
        };
        let mut src = AlignedBuf::new(2 * bs);
        src.as_mut_slice().copy_from_slice(&plain);
        let mut entries = [0u8; 2 * ENTRY_BYTES];
        let mut ct = vec![0u8; 2 * bs];
        ch.patch(0, 5, &SgList::from_buf(src), &mut entries, Some(&mut ct));
        for lens in layouts {
            let read_into = |ct: &[u8]| {
                let mut b = AlignedBuf::new(2 * bs);
                b.as_mut_slice().copy_from_slice(ct);
                SgList::from_buf_split(b, lens)
            };
            let mut good = read_into(&ct);
            assert!(ch.verify(5, &entries, &mut good), "{}", e.name());
            assert!(good.into_buf().unwrap().as_slice() == &plain[..]);
            // Block 1's tag is wrong: block 0 may be returned, block 1 must never have been
            // decrypted into the caller's buffer (it still holds the ciphertext).
            let mut bad_entries = entries;
            bad_entries[ENTRY_BYTES + NONCE_BYTES] ^= 1;
            let mut bad = read_into(&ct);
            assert!(!ch.verify(5, &bad_entries, &mut bad), "{}", e.name());
            let back = bad.into_buf().unwrap();
            assert!(
                back.as_slice()[bs..] != plain[bs..],
                "{} {lens:?}: unauthenticated plaintext reached the caller's buffer",
                e.name()
            );
            assert!(back.as_slice()[bs..] == ct[bs..], "{} {lens:?}", e.name());
        }
    }
}

/// Read-only pages holding `data`: any write into them faults.
struct ReadOnly {
    p: *mut u8,
    len: usize,
}

impl ReadOnly {
    fn new(data: &[u8]) -> ReadOnly {
        let len = data.len().div_ceil(4096) * 4096;
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        // SAFETY: `data.len() <= len` bytes of the mapping just made, which nothing else uses;
        // then the whole mapping is made read-only.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len());
            assert_eq!(libc::mprotect(p.cast(), len, libc::PROT_READ), 0);
        }
        ReadOnly { p, len }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, once.
        unsafe { libc::munmap(self.p.cast(), self.len) };
    }
}

#[test]
fn a_block_failing_its_tag_is_never_written_to_the_callers_buffer() {
    // The caller's buffer is read-only: decrypting a block whose tag fails into it, even
    // only until the tag check, would kill the test with SIGSEGV.
    let key_bytes: [u8; 32] = key().expose().try_into().unwrap();
    let bs = 4096;
    let plain = vec![0x5au8; bs];
    for e in crate::common::Engine::runnable("GCM", cipher::engine_supported) {
        let cipher = GcmCipher::with_engine(&key_bytes, e);
        let mut ch = GcmEntries {
            cipher: cipher.clone(),
            shared: Arc::new(GcmShared {
                cipher,
                volume_id: [7; 16],
                name: "g".into(),
                integrity: IntegrityLog::new("AES-256-GCM authentication failed"),
            }),
            bs,
            nonce_prefix: [1; 4],
            nonce_counter: 0,
            pool: BufPool::new(4096),
            bounce: vec![0u8; bs],
        };
        let mut src = AlignedBuf::new(bs);
        src.as_mut_slice().copy_from_slice(&plain);
        let mut entries = [0u8; ENTRY_BYTES];
        let mut ct = vec![0u8; bs];
        ch.patch(0, 9, &SgList::from_buf(src), &mut entries, Some(&mut ct));
        entries[NONCE_BYTES] ^= 1;
        let ro = ReadOnly::new(&ct);
        // SAFETY: the segment is mapped for `bs` bytes until `ro` drops, after the list. It is
        // not writable, against `from_raw`'s contract, which is exactly what this test checks:
        // a failed block is never written.
        let mut l = unsafe {
            SgList::from_raw(&[ferroblk_bdev::IoSeg {
                base: ro.p,
                len: bs,
            }])
        };
        assert!(!ch.verify(9, &entries, &mut l), "{}", e.name());
        drop(l);
        drop(ro);
    }
}

#[test]
fn a_tampered_read_returns_no_plaintext() {
    let base = malloc(BlockSize::B4096, 64);
    let g = GcmBdev::open("g", base.clone(), key()).unwrap();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    let mut raw = SyncChannel::new(base.open_channel().unwrap());
    let data: Vec<u8> = (0..2 * 4096).map(|i| (i * 13 % 251) as u8 + 1).collect();
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(&data);
    assert_eq!(
        ch.run(IoRequest::write(3, 2, SgList::from_buf(buf), 0))
            .status,
        IoStatus::Success
    );
    flip(&mut raw, l_data(&g, 4), 100);
    let c = ch.run(IoRequest::read(
        3,
        2,
        SgList::from_buf(AlignedBuf::new(data.len())),
        0,
    ));
    assert_eq!(c.status, IoStatus::IntegrityError);
    let back = c.bufs.into_buf().unwrap();
    assert!(
        back.as_slice().iter().all(|&b| b == 0),
        "a failed read is zeroed"
    );
}

/// Log lines captured by a test subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_tampered_read_is_logged_with_the_bdev_and_lba_once() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let g = tracing::subscriber::with_default(subscriber, || {
        let base = malloc(BlockSize::B4096, 64);
        let g = GcmBdev::open("vault", base.clone(), key()).unwrap();
        let mut ch = SyncChannel::new(g.open_channel().unwrap());
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        let mut buf = AlignedBuf::new(3 * 4096);
        buf.as_mut_slice().fill(0x5a);
        let w = ch.run(IoRequest::write(10, 3, SgList::from_buf(buf), 0));
        assert_eq!(w.status, IoStatus::Success);
        flip(&mut raw, l_data(&g, 11), 7);
        for _ in 0..2 {
            let c = ch.run(IoRequest::read(
                10,
                3,
                SgList::from_buf(AlignedBuf::new(3 * 4096)),
                0,
            ));
            assert_eq!(c.status, IoStatus::IntegrityError);
        }
        g
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let warns: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warns.len(), 1, "logged once per LBA: {text}");
    assert!(warns[0].contains("bdev=vault"), "{text}");
    assert!(
        warns[0].contains("lba=11"),
        "the failing block, not the request's first: {text}"
    );
    assert!(
        warns[0].contains("AES-256-GCM authentication failed"),
        "{text}"
    );
    assert_eq!(g.integrity_errors(), 2, "every failure is counted");
}

#[test]
fn callers_write_buffer_is_unchanged() {
    let g = GcmBdev::open("g", malloc(BlockSize::B512, 512), key()).unwrap();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    let data: Vec<u8> = (0..8 * 512).map(|i| (i * 13 % 253) as u8).collect();
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(&data);
    let c = ch.run(IoRequest::write(
        30,
        8,
        SgList::from_buf_split(buf, &[700, 3000, 396]),
        0,
    ));
    assert_eq!(c.status, IoStatus::Success);
    assert!(c.bufs.into_buf().unwrap().as_slice() == &data[..]);
    // And a read into odd segments decrypts across them.
    let c = ch.run(IoRequest::read(
        30,
        8,
        SgList::from_buf_split(AlignedBuf::new(data.len()), &[1000, 96, 3000]),
        0,
    ));
    assert_eq!(c.status, IoStatus::Success);
    assert!(c.bufs.into_buf().unwrap().as_slice() == &data[..]);
}

#[test]
fn unmap_and_write_zeroes_read_as_zeroes_and_keep_neighbours() {
    let g = GcmBdev::open("g", malloc(BlockSize::B512, 8192), key()).unwrap();
    let n = g.info().block_count();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    fill(&mut ch, n, 512, 2);
    // Ranges that start and end inside metadata blocks, and one spanning many chunks.
    assert_eq!(ch.unmap(7, 50), IoStatus::Success);
    assert_eq!(ch.write_zeroes(100, 7000), IoStatus::Success);
    for (lba, zero) in [
        (6, false),
        (7, true),
        (56, true),
        (57, false),
        (99, false),
        (100, true),
        (7099, true),
        (7100, false),
    ] {
        let (st, d) = ch.read(lba, 1);
        assert_eq!(st, IoStatus::Success, "lba {lba}");
        if zero {
            assert!(d.iter().all(|&b| b == 0), "lba {lba} not zero");
        } else {
            assert!(d == block_data(lba, 512, 2), "lba {lba} disturbed");
        }
    }
    // Zeroed blocks take new writes again.
    assert_eq!(ch.write(8, &block_data(8, 512, 3)), IoStatus::Success);
    assert!(ch.read(8, 1).1 == block_data(8, 512, 3));
}

/// Two channels write neighbouring blocks that share metadata blocks, all at once: the
/// read-modify-writes of the shared metadata must not lose each other's entries.
#[test]
fn channels_writing_blocks_that_share_metadata_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.img");
    for base in [
        malloc(BlockSize::B4096, 600),
        file(&path, BlockSize::B4096, 600),
    ] {
        let g = GcmBdev::open("g", base, key()).unwrap();
        write_alternate_blocks_from_two_channels(&g, 512, |lba| block_data(lba, 4096, 4));
    }
}

/// End-to-end throughput of the GCM bdev over a RAM base, one thread. Run with
/// `cargo test --release -p ferroblk-crypto -- --ignored --nocapture gcm_bdev_throughput`.
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn gcm_bdev_throughput_over_malloc() {
    let g = GcmBdev::open("g", malloc(BlockSize::B4096, 16640), key()).unwrap();
    for (blocks, qd) in [(1u32, 32usize), (32, 8)] {
        for t in [IoType::Write, IoType::Read] {
            let gbs = crate::common::throughput(&g, t, blocks, qd, 1.0);
            println!(
                "crypt_gcm over malloc: {} KiB {} qd {qd}: {gbs:.2} GB/s",
                blocks * 4,
                t.name()
            );
        }
    }
}

#[test]
fn reads_are_verified_in_the_channels_buffer_never_in_the_callers() {
    for bs in [BlockSize::B4096, BlockSize::B512] {
        let spy = crate::testing::ReadSpy::new(malloc(bs, 1100));
        let g = GcmBdev::open("g", spy.clone(), key()).unwrap();
        let mut ch = SyncChannel::new(g.open_channel().unwrap());
        // One block, and a whole MAX_TRANSFER_BYTES request.
        for blocks in [1, (MAX_TRANSFER_BYTES / bs.bytes() as usize) as u32] {
            crate::testing::assert_reads_never_reach_the_callers_buffer(&spy, &mut ch, 3, blocks);
        }
    }
}

#[test]
fn a_read_finding_no_pool_buffer_is_handed_back_and_buffers_come_back() {
    let g = GcmBdev::open("g", malloc(BlockSize::B4096, 1100), key()).unwrap();
    let blocks = g.info().block_count();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    fill(&mut ch, blocks, 4096, 1);
    drop(ch);
    crate::testing::assert_reads_hold_pool_buffers(&g, &|lba| block_data(lba, 4096, 1));
}

#[test]
fn a_read_leaves_no_plaintext_in_the_reactors_buffer_pool() {
    let g = GcmBdev::open("g", malloc(BlockSize::B4096, 256), key()).unwrap();
    let mut ch = SyncChannel::new(g.open_channel().unwrap());
    let plain: Vec<u8> = b"secret-tenant-data-"
        .iter()
        .copied()
        .cycle()
        .take(8192)
        .collect();
    assert_eq!(ch.write(0, &plain), IoStatus::Success);
    let (st, back) = ch.read(0, 2);
    assert_eq!(st, IoStatus::Success);
    assert_eq!(back, plain);
    // Every buffer the pool of this thread holds now (the read's among them; the pool hands
    // out the last returned first) is free of the plaintext.
    let mut held = Vec::new();
    for class in 0..=8 {
        for _ in 0..8 {
            let b = ferroblk_bdev::bufpool::get(4096 << class);
            assert!(
                !b.as_slice()
                    .windows(19)
                    .any(|w| w == b"secret-tenant-data-"),
                "plaintext left in a pooled buffer of {} bytes",
                b.len()
            );
            held.push(b);
        }
    }
}
