//! Tests of [`GcmCipher`]'s engines: NIST vectors, equivalence with the `aes-gcm` crate, tamper
//! detection, and that an engine writes only its buffer.

use std::time::{Duration, Instant};

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::{AeadInPlace, Aes256Gcm, KeyInit};

use super::cipher::{Engine, GcmCipher, engine_supported};
use crate::xts::tests::unhex;

/// Every engine this CPU runs (an engine it cannot run is reported on stderr).
fn engines() -> Vec<Engine> {
    Engine::runnable("GCM", engine_supported)
}

/// xorshift64*: reproducible test data from a seed printed with each failure.
fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn rand_bytes(x: &mut u64, len: usize) -> Vec<u8> {
    (0..len).map(|_| (next_rand(x) >> 32) as u8).collect()
}

fn rand_array<const N: usize>(x: &mut u64) -> [u8; N] {
    rand_bytes(x, N).try_into().unwrap()
}

/// A random seed (never 0, which xorshift keeps at 0).
fn seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) | 1
}

/// Ciphertext and tag from the `aes-gcm` crate, the reference.
fn reference(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], plain: &[u8]) -> (Vec<u8>, [u8; 16]) {
    let mut ct = plain.to_vec();
    let tag = Aes256Gcm::new(GenericArray::from_slice(key))
        .encrypt_in_place_detached(GenericArray::from_slice(nonce), aad, &mut ct)
        .unwrap();
    (ct, tag.into())
}

struct Vector {
    name: &'static str,
    key: &'static str,
    iv: &'static str,
    aad: &'static str,
    pt: &'static str,
    ct: &'static str,
    tag: &'static str,
}

/// The AES-256 test cases with 96-bit IVs of McGrew and Viega, "The Galois/Counter Mode of
/// Operation (GCM)", appendix B (test cases 13 to 16; 17 and 18 use other IV lengths).
const NIST: [Vector; 4] = [
    Vector {
        name: "test case 13",
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        aad: "",
        pt: "",
        ct: "",
        tag: "530f8afbc74536b9a963b4f1c4cb738b",
    },
    Vector {
        name: "test case 14",
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        aad: "",
        pt: "00000000000000000000000000000000",
        ct: "cea7403d4d606b6e074ec5d3baf39d18",
        tag: "d0d1c8a799996bf0265b98b5d48ab919",
    },
    Vector {
        name: "test case 15",
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv: "cafebabefacedbaddecaf888",
        aad: "",
        pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
        ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
        tag: "b094dac5d93471bdec1a502270e3cc6c",
    },
    Vector {
        name: "test case 16",
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv: "cafebabefacedbaddecaf888",
        aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        tag: "76fc6ece0f4e1768cddf8853bb2d551b",
    },
];

#[test]
fn every_engine_matches_the_gcm_spec_aes256_test_cases() {
    for e in engines() {
        for v in &NIST {
            let key: [u8; 32] = unhex(v.key).try_into().unwrap();
            let nonce: [u8; 12] = unhex(v.iv).try_into().unwrap();
            let (aad, pt, ct) = (unhex(v.aad), unhex(v.pt), unhex(v.ct));
            let tag: [u8; 16] = unhex(v.tag).try_into().unwrap();
            let c = GcmCipher::with_engine(&key, e);
            let mut buf = pt.clone();
            assert_eq!(
                c.encrypt(&nonce, &aad, &mut buf),
                tag,
                "{} {}",
                e.name(),
                v.name
            );
            assert_eq!(buf, ct, "{} {}", e.name(), v.name);
            assert!(c.decrypt(&nonce, &aad, &mut buf, &tag), "{}", v.name);
            assert_eq!(buf, pt, "{} {}", e.name(), v.name);
        }
    }
}

/// 16..=4096 in steps of 16 (every block count up to 256, odd ones included), then some
/// lengths that are not whole blocks.
fn lengths() -> impl Iterator<Item = usize> {
    (16..=4096).step_by(16).chain([
        0, 1, 15, 17, 31, 33, 255, 257, 511, 513, 4095, 4097, 8191, 10000,
    ])
}

#[test]
fn every_engine_matches_the_aes_gcm_crate_both_ways() {
    let s = seed();
    let mut r = s;
    for e in engines() {
        for len in lengths() {
            let key: [u8; 32] = rand_array(&mut r);
            let nonce: [u8; 12] = rand_array(&mut r);
            // The bdev's 24 bytes most often; else 0..=80 bytes.
            let aad_len = match next_rand(&mut r) % 4 {
                0 => (next_rand(&mut r) % 81) as usize,
                _ => 24,
            };
            let aad = rand_bytes(&mut r, aad_len);
            let plain = rand_bytes(&mut r, len);
            let (ct, tag) = reference(&key, &nonce, &aad, &plain);
            let c = GcmCipher::with_engine(&key, e);
            let what = format!("engine {} len {len} aad {aad_len} seed {s:#x}", e.name());
            let mut buf = plain.clone();
            assert_eq!(c.encrypt(&nonce, &aad, &mut buf), tag, "tag: {what}");
            assert!(buf == ct, "ciphertext: {what}");
            assert!(c.decrypt(&nonce, &aad, &mut buf, &tag), "decrypt: {what}");
            assert!(buf == plain, "plaintext: {what}");
        }
    }
}

#[test]
fn tampered_ciphertext_tag_or_aad_fails_on_every_engine_and_leaves_the_ciphertext() {
    let s = seed();
    let mut r = s;
    for e in engines() {
        for len in [16, 48, 496, 512, 4080, 4096, 100] {
            let key: [u8; 32] = rand_array(&mut r);
            let nonce: [u8; 12] = rand_array(&mut r);
            let aad = rand_bytes(&mut r, 24);
            let plain = rand_bytes(&mut r, len);
            let (ct, tag) = reference(&key, &nonce, &aad, &plain);
            let c = GcmCipher::with_engine(&key, e);
            let what = format!("engine {} len {len} seed {s:#x}", e.name());
            let bit = |r: &mut u64, n: usize| {
                let i = (next_rand(r) % (8 * n as u64)) as usize;
                (i / 8, 1u8 << (i % 8))
            };
            // Ciphertext.
            let mut bad = ct.clone();
            let (i, m) = bit(&mut r, len);
            bad[i] ^= m;
            let tampered = bad.clone();
            assert!(!c.decrypt(&nonce, &aad, &mut bad, &tag), "ct: {what}");
            assert!(bad == tampered, "ct: data changed on failure: {what}");
            // Tag.
            let mut bad_tag = tag;
            let (i, m) = bit(&mut r, 16);
            bad_tag[i] ^= m;
            let mut buf = ct.clone();
            assert!(!c.decrypt(&nonce, &aad, &mut buf, &bad_tag), "tag: {what}");
            assert!(buf == ct, "tag: data changed on failure: {what}");
            // AAD (the LBA and volume id), and the nonce.
            let mut bad_aad = aad.clone();
            let (i, m) = bit(&mut r, 24);
            bad_aad[i] ^= m;
            assert!(!c.decrypt(&nonce, &bad_aad, &mut buf, &tag), "aad: {what}");
            assert!(buf == ct, "aad: data changed on failure: {what}");
            let mut bad_nonce = nonce;
            bad_nonce[(next_rand(&mut r) % 12) as usize] ^= 1;
            assert!(
                !c.decrypt(&bad_nonce, &aad, &mut buf, &tag),
                "nonce: {what}"
            );
            assert!(buf == ct, "nonce: data changed on failure: {what}");
            // Untampered, it still decrypts.
            assert!(c.decrypt(&nonce, &aad, &mut buf, &tag), "{what}");
            assert!(buf == plain, "{what}");
        }
    }
}

#[test]
fn every_engine_writes_only_its_buffer_at_any_alignment() {
    let s = seed();
    let mut r = s;
    let key: [u8; 32] = rand_array(&mut r);
    let nonce: [u8; 12] = rand_array(&mut r);
    for e in engines() {
        let c = GcmCipher::with_engine(&key, e);
        for len in [16, 48, 208, 240, 496, 512, 4080, 4096, 100] {
            for off in [0, 1, 8, 15, 63] {
                let plain = rand_bytes(&mut r, len);
                let mut buf = vec![0xa5u8; off + len + 80];
                buf[off..off + len].copy_from_slice(&plain);
                let (ct, tag) = reference(&key, &nonce, b"aad", &plain);
                assert_eq!(c.encrypt(&nonce, b"aad", &mut buf[off..off + len]), tag);
                assert!(buf[off..off + len] == ct[..], "{} {len} {off}", e.name());
                assert!(buf[..off].iter().all(|&b| b == 0xa5), "{} {len}", e.name());
                assert!(buf[off + len..].iter().all(|&b| b == 0xa5), "{}", e.name());
                assert!(c.decrypt(&nonce, b"aad", &mut buf[off..off + len], &tag));
                assert!(buf[off..off + len] == plain[..], "{} {len} {off}", e.name());
                assert!(buf[off + len..].iter().all(|&b| b == 0xa5), "{}", e.name());
            }
        }
    }
}

#[test]
fn new_runs_the_fastest_engine_the_cpu_has() {
    let c = GcmCipher::new(&[7u8; 32]);
    assert_eq!(c.engine(), Engine::fastest(engine_supported));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
    {
        assert_eq!(c.engine(), Engine::Vaes);
    }
    for e in engines() {
        assert_eq!(GcmCipher::with_engine(&[7u8; 32], e).engine(), e);
    }
}

/// Best throughput of `c` on 4 KiB units with the bdev's 24-byte AAD over `runs` runs of
/// `run` each, in GB/s. Decryption alternates each unit between two states that both
/// authenticate: `C` (with its tag) and `P = C ^ keystream`, whose tag as a ciphertext is the
/// tag of encrypting `C`; so every decrypt succeeds and nothing else is timed.
fn unit_gbs(c: &GcmCipher, encrypt: bool, runs: u32, run: Duration) -> f64 {
    let mut buf = vec![0x5au8; 64 * 4096];
    let nonce = [3u8; 12];
    let aad = [9u8; 24];
    let mut tags = vec![[[0u8; 16]; 2]; 64];
    for (unit, t) in buf.chunks_exact_mut(4096).zip(&mut tags) {
        t[0] = c.encrypt(&nonce, &aad, unit);
        t[1] = c.encrypt(&nonce, &aad, &mut unit.to_vec());
    }
    let mut phase = 0;
    let mut best = 0f64;
    for _ in 0..runs {
        let t = Instant::now();
        let mut bytes = 0u64;
        while t.elapsed() < run {
            for (unit, tag) in buf.chunks_exact_mut(4096).zip(&tags) {
                if encrypt {
                    std::hint::black_box(c.encrypt(&nonce, &aad, unit));
                } else {
                    assert!(c.decrypt(&nonce, &aad, unit, &tag[phase]));
                }
                bytes += 4096;
            }
            phase ^= 1;
        }
        best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Throughput of the GCM cipher on 4 KiB units, single thread: the engine `new` picks, then
/// every other engine this CPU runs. Run with
/// `cargo test --release -p ferroblk-crypto -- --ignored --nocapture gcm_throughput`.
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn gcm_throughput_4k_units() {
    let key = [0x42u8; 32];
    let default = GcmCipher::new(&key).engine();
    let mut order = vec![default];
    order.extend(engines().into_iter().filter(|&e| e != default));
    for e in order {
        let c = GcmCipher::with_engine(&key, e);
        let enc = unit_gbs(&c, true, 5, Duration::from_millis(300));
        let dec = unit_gbs(&c, false, 5, Duration::from_millis(300));
        println!(
            "aes-256-gcm engine {}{}: 4096-byte units, encrypt {enc:.2} GB/s, decrypt {dec:.2} GB/s (best of 5 × 0.3 s)",
            e.name(),
            if e == default { " (default)" } else { "" },
        );
    }
}
