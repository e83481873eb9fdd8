//! AES-256-GCM (NIST SP 800-38D) on x86_64 hardware, fused: one pass over the data, each
//! group of blocks CTR-encrypted and GHASHed (the ciphertext: the output when encrypting, the
//! input when decrypting) while in registers.
//!
//! - VAES + AVX-512: 16 blocks per iteration in four zmm registers; GHASH with VPCLMULQDQ on
//!   zmm against H^16..H^1, the 16 products summed unreduced and reduced once.
//! - AES-NI + PCLMULQDQ: 8 blocks per iteration in xmm registers, GHASH aggregated over 8
//!   blocks against H^8..H^1.
//!
//! The key schedule is the XTS engines' ([`expand_key`]).
//!
//! # GHASH arithmetic
//! GCM's field is GF(2^128) modulo P(x) = x^128 + x^7 + x^2 + x + 1, with the *first* bit of a
//! block (the top bit of byte 0) the coefficient of x^0. A block loaded into a register and
//! byte-reversed ([`bswap`]) holds the coefficient of x^i in bit 127 − i. Read in the other
//! variable y = 1/x, the same register is the polynomial y^127·φ(a) where φ maps the field
//! modulo P to the field modulo P*(y) = y^128 P(1/y) = y^128 + y^127 + y^126 + y^121 + 1, and a
//! carry-less multiply is a product of polynomials in y. So `clmul(R(a), K)` with
//! `K = y^128·φ(H^i)` is y^255·φ(a·H^i), and a Montgomery reduction (add the multiple of P*
//! that clears the low 128 bits, keep the high 128 bits: [`reduce`]) divides by y^128 and
//! leaves y^127·φ(a·H^i), the register form of a·H^i. The powers of H are kept in that
//! `K` form: `K_1` is R(H) shifted left by one bit (times y), reduced by P*, and
//! `K_{i+1} = gmul(K_i, K_1)` (the same Montgomery product). The reduction folds 64 bits at a
//! time with the low 128 bits of P*, `0xC2000000_00000000_00000000_00000001`: the `1` term
//! cancels the folded quadword, the rest is one carry-less multiply by `0xC2 << 56`.
//!
//! A sum of such products can be reduced once (the reduction is linear): the 8 or 16 products
//! of an iteration are added unreduced, and in zmm registers the four lanes' reductions are
//! added afterwards.

use std::arch::x86_64::{
    __m128i, __m512i, _mm_add_epi32, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_and_si128,
    _mm_clmulepi64_si128, _mm_loadu_si128, _mm_or_si128, _mm_set_epi8, _mm_set_epi32,
    _mm_set_epi64x, _mm_setzero_si128, _mm_shuffle_epi8, _mm_shuffle_epi32, _mm_slli_epi64,
    _mm_slli_si128, _mm_srai_epi32, _mm_srli_epi64, _mm_storeu_si128, _mm_xor_si128,
    _mm256_castsi256_si128, _mm256_extracti128_si256, _mm256_xor_si256, _mm512_add_epi32,
    _mm512_aesenc_epi128, _mm512_aesenclast_epi128, _mm512_broadcast_i32x4, _mm512_castsi512_si256,
    _mm512_clmulepi64_epi128, _mm512_extracti64x4_epi64, _mm512_loadu_si512,
    _mm512_mask_storeu_epi64, _mm512_maskz_loadu_epi64, _mm512_set_epi32, _mm512_setzero_si512,
    _mm512_shuffle_epi8, _mm512_shuffle_epi32, _mm512_storeu_si512, _mm512_ternarylogic_epi64,
    _mm512_xor_si512, _mm512_zextsi128_si512,
};

use zeroize::Zeroize;

use crate::xts::x86::{NI_BLOCKS, ROUND_KEYS, expand_key, in_step};

/// Powers of H kept: one per block of a VAES iteration.
const POWERS: usize = 16;
/// The low 128 bits of P*(y) (see the module documentation).
const POLY_HI: u64 = 0xC200_0000_0000_0000;
/// Largest plaintext GCM allows: 2^32 − 2 blocks (SP 800-38D §5.2.1.1).
const MAX_DATA: u64 = (1 << 36) - 32;

/// True when the CPU runs the VAES engine: VAES and VPCLMULQDQ on zmm registers (AVX-512F),
/// byte shuffles of zmm lanes (AVX-512BW), AES-NI, PCLMULQDQ and SSSE3 for the rest.
pub(super) fn vaes_supported() -> bool {
    aesni_supported()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
}

/// True when the CPU runs the AES-NI engine (and the key setup): AES-NI, PCLMULQDQ, SSSE3.
pub(super) fn aesni_supported() -> bool {
    std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq")
        && std::arch::is_x86_feature_detected!("ssse3")
}

/// Round keys and hash-key powers, zeroized on drop.
#[derive(Clone)]
struct Keys {
    /// Encryption round keys.
    enc: [__m128i; ROUND_KEYS],
    /// `h[j]` is `K_{16 - j}` (H^(16 − j) in the form of the module documentation): highest
    /// power first, so the powers for the last `n` blocks of a group start at `h[16 - n]`.
    h: [__m128i; POWERS],
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.h.zeroize();
    }
}

/// AES-256-GCM on AES-NI hardware, with VAES + AVX-512 when `vaes` is set.
#[derive(Clone)]
pub(super) struct HwGcm {
    keys: Keys,
    /// Set only by [`HwGcm::new`], and only when [`vaes_supported`] said so.
    vaes: bool,
}

impl HwGcm {
    /// The cipher of `key`, with the VAES engine when `vaes`. `None` when the CPU lacks what
    /// the engine needs.
    pub(super) fn new(key: &[u8; 32], vaes: bool) -> Option<HwGcm> {
        if !aesni_supported() || (vaes && !vaes_supported()) {
            return None;
        }
        // SAFETY: `expand` needs AES-NI, PCLMULQDQ and SSSE3, checked just above.
        let keys = unsafe { expand(key) };
        Some(HwGcm { keys, vaes })
    }

    /// Whether this cipher runs the VAES + AVX-512 engine.
    pub(super) fn is_vaes(&self) -> bool {
        self.vaes
    }

    /// Encrypts `data` in place and returns the tag.
    ///
    /// # Panics
    /// If `data` is longer than GCM allows (2^36 − 32 bytes).
    pub(super) fn encrypt(&self, nonce: &[u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        self.seal::<true>(nonce, aad, data)
    }

    /// Decrypts `data` in place if `tag` is its tag; `false` otherwise, with `data` left as it
    /// was (the ciphertext): the one pass decrypts before the tag is known, so a failed check
    /// encrypts the data again.
    ///
    /// # Panics
    /// If `data` is longer than GCM allows (2^36 − 32 bytes).
    pub(super) fn decrypt(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        data: &mut [u8],
        tag: &[u8; 16],
    ) -> bool {
        let t = self.seal::<false>(nonce, aad, data);
        let mut diff = 0u8;
        for (a, b) in t.iter().zip(tag) {
            diff |= a ^ b;
        }
        // Every byte is compared whatever the others hold; `black_box` keeps the compiler from
        // turning the fold into an early exit.
        if std::hint::black_box(diff) == 0 {
            return true;
        }
        self.seal::<true>(nonce, aad, data);
        false
    }

    /// CTR-transforms `data` and returns the tag over the AAD and the ciphertext (`data`'s
    /// output when `ENCRYPT`, its input otherwise).
    #[inline]
    fn seal<const ENCRYPT: bool>(&self, nonce: &[u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        assert!(
            data.len() as u64 <= MAX_DATA,
            "GCM data is limited to 2^36 - 32 bytes"
        );
        let mut tag = [0u8; 16];
        if self.vaes {
            // SAFETY: `vaes` is true only when `HwGcm::new` saw `vaes_supported()`, i.e. every
            // feature `seal_vaes` enables is present on this CPU.
            unsafe { seal_vaes::<ENCRYPT>(&self.keys, nonce, aad, data, &mut tag) }
        } else {
            // SAFETY: an `HwGcm` exists only when `HwGcm::new` saw `aesni_supported()`, the
            // features `seal_aesni` enables.
            unsafe { seal_aesni::<ENCRYPT>(&self.keys, nonce, aad, data, &mut tag) }
        }
        tag
    }
}

// ---------------------------------------------------------------------------------------------
// xmm building blocks.

/// The byte-reversing shuffle of one 16-byte lane.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn bswap_mask() -> __m128i {
    _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
}

/// The 16 bytes of `x` in reverse order: a block to its GHASH register form and back.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn bswap(x: __m128i) -> __m128i {
    _mm_shuffle_epi8(x, bswap_mask())
}

/// The low 128 bits of P* (see the module documentation).
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn poly() -> __m128i {
    _mm_set_epi64x(POLY_HI as i64, 1)
}

/// Montgomery reduction of the 256-bit product `hi · y^128 + mi · y^64 + lo`: the high 128
/// bits after adding the multiple of P* that clears the low 128.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn reduce(lo: __m128i, mi: __m128i, hi: __m128i) -> __m128i {
    // Fold lo's low quadword into bits 64..192 (its `1` term cancels it), lo's high quadword
    // moves to mi's low one.
    let t = _mm_clmulepi64_si128::<0x10>(lo, poly());
    let mi = _mm_xor_si128(_mm_xor_si128(mi, _mm_shuffle_epi32::<0x4e>(lo)), t);
    // Fold mi's low quadword into bits 128..256 the same way.
    let t = _mm_clmulepi64_si128::<0x10>(mi, poly());
    _mm_xor_si128(_mm_xor_si128(hi, _mm_shuffle_epi32::<0x4e>(mi)), t)
}

/// `a · b · y^-128` reduced: with `b = K_i`, the register form of a·H^i.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn gmul(a: __m128i, b: __m128i) -> __m128i {
    let lo = _mm_clmulepi64_si128::<0x00>(a, b);
    let hi = _mm_clmulepi64_si128::<0x11>(a, b);
    let mi = _mm_xor_si128(
        _mm_clmulepi64_si128::<0x01>(a, b),
        _mm_clmulepi64_si128::<0x10>(a, b),
    );
    reduce(lo, mi, hi)
}

/// AES-256 encryption of one block.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn aes_block(k: &[__m128i; ROUND_KEYS], x: __m128i) -> __m128i {
    let mut x = _mm_xor_si128(x, k[0]);
    for rk in &k[1..ROUND_KEYS - 1] {
        x = _mm_aesenc_si128(x, *rk);
    }
    _mm_aesenclast_si128(x, k[ROUND_KEYS - 1])
}

/// Round keys and `K_1..K_16` of `key`.
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn expand(key: &[u8; 32]) -> Keys {
    let enc = expand_key(key);
    let h = bswap(aes_block(&enc, _mm_setzero_si128()));
    // K_1 = R(H) · y: the register shifted left by one bit, bit 127 folded back with P*.
    let shifted = _mm_or_si128(
        _mm_slli_epi64::<1>(h),
        _mm_srli_epi64::<63>(_mm_slli_si128::<8>(h)),
    );
    let top = _mm_srai_epi32::<31>(_mm_shuffle_epi32::<0xff>(h));
    let k1 = _mm_xor_si128(shifted, _mm_and_si128(top, poly()));
    let mut p = [_mm_setzero_si128(); POWERS];
    p[POWERS - 1] = k1;
    for j in (0..POWERS - 1).rev() {
        p[j] = gmul(p[j + 1], k1);
    }
    Keys { enc, h: p }
}

/// Register form of the pre-counter block J0 = nonce ‖ 0x00000001: the 32-bit counter is the
/// low dword, so `_mm_add_epi32` steps it (mod 2^32, as GCM's inc32).
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn j0(nonce: &[u8; 12]) -> __m128i {
    let mut b = [0u8; 16];
    b[..12].copy_from_slice(nonce);
    b[15] = 1;
    // SAFETY: `b` is valid for reads of 16 bytes; no alignment requirement.
    bswap(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
}

/// `x` after GHASHing `bytes`, the last block zero-padded (the AAD).
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn ghash_padded(k1: __m128i, mut x: __m128i, bytes: &[u8]) -> __m128i {
    for c in bytes.chunks(16) {
        let mut b = [0u8; 16];
        b[..c.len()].copy_from_slice(c);
        // SAFETY: `b` is valid for reads of 16 bytes; no alignment requirement.
        let v = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
        x = gmul(_mm_xor_si128(x, bswap(v)), k1);
    }
    x
}

/// The blocks after the engine's groups, one at a time: `ctr` is the register form of the
/// first one's counter, `x` the GHASH state; a partial last block is zero-padded for GHASH.
/// Returns the GHASH state.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn tail<const ENCRYPT: bool>(
    keys: &Keys,
    mut ctr: __m128i,
    mut x: __m128i,
    rest: &mut [u8],
) -> __m128i {
    let k1 = keys.h[POWERS - 1];
    let one = _mm_set_epi32(0, 0, 0, 1);
    for c in rest.chunks_mut(16) {
        let mut b = [0u8; 16];
        b[..c.len()].copy_from_slice(c);
        // SAFETY: `b` is valid for reads of 16 bytes; no alignment requirement.
        let inp = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
        let out = _mm_xor_si128(inp, aes_block(&keys.enc, bswap(ctr)));
        ctr = _mm_add_epi32(ctr, one);
        // SAFETY: `b` is valid for writes of 16 bytes; no alignment requirement.
        unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), out) };
        c.copy_from_slice(&b[..c.len()]);
        let ct = if ENCRYPT {
            // The keystream past the end of a partial block is not ciphertext: pad with zeroes.
            b[c.len()..].fill(0);
            // SAFETY: as above.
            unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
        } else {
            inp
        };
        x = gmul(_mm_xor_si128(x, bswap(ct)), k1);
    }
    x
}

/// The tag: GHASH of the lengths block, then XOR with the encrypted J0, in byte order.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn finish(keys: &Keys, j0: __m128i, x: __m128i, aad_len: usize, len: usize, tag: &mut [u8; 16]) {
    let lengths = _mm_set_epi64x((aad_len as u64 * 8) as i64, (len as u64 * 8) as i64);
    let x = gmul(_mm_xor_si128(x, lengths), keys.h[POWERS - 1]);
    let t = _mm_xor_si128(aes_block(&keys.enc, bswap(j0)), bswap(x));
    // SAFETY: `tag` is valid for writes of 16 bytes; no alignment requirement.
    unsafe { _mm_storeu_si128(tag.as_mut_ptr().cast(), t) }
}

// ---------------------------------------------------------------------------------------------
// AES-NI + PCLMULQDQ: 8 blocks per iteration in xmm registers.

/// The AES-NI engine (see [`HwGcm::seal`]).
#[target_feature(enable = "aes,pclmulqdq,ssse3")]
fn seal_aesni<const ENCRYPT: bool>(
    keys: &Keys,
    nonce: &[u8; 12],
    aad: &[u8],
    data: &mut [u8],
    tag: &mut [u8; 16],
) {
    let (k, h) = (&keys.enc, &keys.h);
    let j0 = j0(nonce);
    let one = _mm_set_epi32(0, 0, 0, 1);
    let mut ctr = _mm_add_epi32(j0, one);
    let mut x = ghash_padded(h[POWERS - 1], _mm_setzero_si128(), aad);
    let len = data.len();
    let (groups, rest) = data.as_chunks_mut::<{ NI_BLOCKS * 16 }>();
    for c in groups {
        let mut s = [_mm_setzero_si128(); NI_BLOCKS];
        for s in &mut s {
            *s = _mm_xor_si128(bswap(ctr), k[0]);
            ctr = _mm_add_epi32(ctr, one);
        }
        for rk in &k[1..ROUND_KEYS - 1] {
            for s in &mut s {
                *s = _mm_aesenc_si128(*s, *rk);
            }
            in_step(&mut s);
        }
        let (mut lo, mut mi, mut hi) = (
            _mm_setzero_si128(),
            _mm_setzero_si128(),
            _mm_setzero_si128(),
        );
        for (i, s) in s.iter().enumerate() {
            // SAFETY: `c` is valid for reads of `NI_BLOCKS * 16` bytes and `i < NI_BLOCKS`;
            // no alignment requirement.
            let inp = unsafe { _mm_loadu_si128(c.as_ptr().add(16 * i).cast()) };
            // The last round ends by XORing its key: XORing the data into it XORs the
            // keystream into the data.
            let out = _mm_aesenclast_si128(*s, _mm_xor_si128(k[ROUND_KEYS - 1], inp));
            // SAFETY: `c` is valid for writes of `NI_BLOCKS * 16` bytes and `i < NI_BLOCKS`;
            // no alignment requirement.
            unsafe { _mm_storeu_si128(c.as_mut_ptr().add(16 * i).cast(), out) };
            let mut b = bswap(if ENCRYPT { out } else { inp });
            if i == 0 {
                b = _mm_xor_si128(b, x);
            }
            // Block i of 8 is multiplied by H^(8 - i).
            let p = h[POWERS - NI_BLOCKS + i];
            lo = _mm_xor_si128(lo, _mm_clmulepi64_si128::<0x00>(b, p));
            hi = _mm_xor_si128(hi, _mm_clmulepi64_si128::<0x11>(b, p));
            mi = _mm_xor_si128(
                mi,
                _mm_xor_si128(
                    _mm_clmulepi64_si128::<0x01>(b, p),
                    _mm_clmulepi64_si128::<0x10>(b, p),
                ),
            );
        }
        x = reduce(lo, mi, hi);
    }
    let x = tail::<ENCRYPT>(keys, ctr, x, rest);
    finish(keys, j0, x, aad.len(), len, tag);
}

// ---------------------------------------------------------------------------------------------
// VAES + VPCLMULQDQ: 16 blocks per iteration, 4 per zmm register.

/// zmm registers of blocks per iteration.
const REGS: usize = 4;
/// Blocks per iteration.
const VAES_BLOCKS: usize = 4 * REGS;

/// The GHASH state after the blocks of `ct` (register form, lane by lane) multiplied by the
/// powers `p` (lane for lane), `x` added to the first block: the products summed unreduced,
/// reduced once in each lane, the four lanes added.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3,avx512f,avx512bw,vaes,vpclmulqdq")]
fn ghash_regs(x: __m128i, ct: &[__m512i; REGS], p: &[__m512i; REGS]) -> __m128i {
    let (mut lo, mut mi, mut hi) = (
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
    );
    for (r, (b, p)) in ct.iter().zip(p).enumerate() {
        let b = if r == 0 {
            _mm512_xor_si512(*b, _mm512_zextsi128_si512(x))
        } else {
            *b
        };
        lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128::<0x00>(b, *p));
        hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128::<0x11>(b, *p));
        mi = _mm512_ternarylogic_epi64::<0x96>(
            mi,
            _mm512_clmulepi64_epi128::<0x01>(b, *p),
            _mm512_clmulepi64_epi128::<0x10>(b, *p),
        );
    }
    // `reduce`, lane by lane.
    let poly = _mm512_broadcast_i32x4(poly());
    let t = _mm512_clmulepi64_epi128::<0x10>(lo, poly);
    let mi = _mm512_ternarylogic_epi64::<0x96>(mi, _mm512_shuffle_epi32::<0x4e>(lo), t);
    let t = _mm512_clmulepi64_epi128::<0x10>(mi, poly);
    let r = _mm512_ternarylogic_epi64::<0x96>(hi, _mm512_shuffle_epi32::<0x4e>(mi), t);
    let r = _mm256_xor_si256(_mm512_castsi512_si256(r), _mm512_extracti64x4_epi64::<1>(r));
    _mm_xor_si128(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
}

/// CTR of four registers of blocks `inp` with counters `ctr` (register form): the output.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3,avx512f,avx512bw,vaes,vpclmulqdq")]
fn ctr_regs(
    k: &[__m512i; ROUND_KEYS],
    ctr: &[__m512i; REGS],
    inp: &[__m512i; REGS],
) -> [__m512i; REGS] {
    let bs = _mm512_broadcast_i32x4(bswap_mask());
    let mut s = [_mm512_setzero_si512(); REGS];
    for (s, c) in s.iter_mut().zip(ctr) {
        *s = _mm512_xor_si512(_mm512_shuffle_epi8(*c, bs), k[0]);
    }
    for rk in &k[1..ROUND_KEYS - 1] {
        for s in &mut s {
            *s = _mm512_aesenc_epi128(*s, *rk);
        }
    }
    for (s, i) in s.iter_mut().zip(inp) {
        // As in `seal_aesni`: the data XORed into the last round key.
        *s = _mm512_aesenclast_epi128(*s, _mm512_xor_si512(k[ROUND_KEYS - 1], *i));
    }
    s
}

/// The VAES engine (see [`HwGcm::seal`]).
#[target_feature(enable = "aes,pclmulqdq,ssse3,avx512f,avx512bw,vaes,vpclmulqdq")]
fn seal_vaes<const ENCRYPT: bool>(
    keys: &Keys,
    nonce: &[u8; 12],
    aad: &[u8],
    data: &mut [u8],
    tag: &mut [u8; 16],
) {
    let mut k = [_mm512_setzero_si512(); ROUND_KEYS];
    for (k, rk) in k.iter_mut().zip(&keys.enc) {
        *k = _mm512_broadcast_i32x4(*rk);
    }
    let bs = _mm512_broadcast_i32x4(bswap_mask());
    // Register r lane l holds K_{16 - 4r - l}, the power for block 4r + l of a group.
    let mut p = [_mm512_setzero_si512(); REGS];
    for (r, p) in p.iter_mut().enumerate() {
        // SAFETY: `keys.h` holds 16 blocks; register r reads blocks 4r..4r + 4, r < 4.
        *p = unsafe { _mm512_loadu_si512(keys.h.as_ptr().add(4 * r).cast()) };
    }
    let j0 = j0(nonce);
    // Register r lane l holds the counter of block 4r + l: J0 + 1 + 4r + l.
    let base = _mm512_broadcast_i32x4(j0);
    let mut ctr = [_mm512_setzero_si512(); REGS];
    for (r, c) in ctr.iter_mut().enumerate() {
        let e = 4 * r as i32 + 1;
        let step = _mm512_set_epi32(0, 0, 0, e + 3, 0, 0, 0, e + 2, 0, 0, 0, e + 1, 0, 0, 0, e);
        *c = _mm512_add_epi32(base, step);
    }
    let sixteen = _mm512_set_epi32(0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16);
    let mut x = ghash_padded(keys.h[POWERS - 1], _mm_setzero_si128(), aad);
    let len = data.len();
    let (groups, rest) = data.as_chunks_mut::<{ VAES_BLOCKS * 16 }>();
    // Encrypting, a group's GHASH needs its AES output: it is done in the next iteration,
    // beside that group's rounds (which do not depend on it), so the two overlap.
    let mut pending: Option<[__m512i; REGS]> = None;
    for c in groups {
        let mut inp = [_mm512_setzero_si512(); REGS];
        for (r, i) in inp.iter_mut().enumerate() {
            // SAFETY: `c` is valid for reads of `REGS * 64` bytes and `r < REGS`; no
            // alignment requirement.
            *i = unsafe { _mm512_loadu_si512(c.as_ptr().add(64 * r).cast()) };
        }
        let out = ctr_regs(&k, &ctr, &inp);
        for c in &mut ctr {
            *c = _mm512_add_epi32(*c, sixteen);
        }
        for (r, o) in out.iter().enumerate() {
            // SAFETY: `c` is valid for writes of `REGS * 64` bytes and `r < REGS`; no
            // alignment requirement.
            unsafe { _mm512_storeu_si512(c.as_mut_ptr().add(64 * r).cast(), *o) }
        }
        let mut ct = if ENCRYPT { out } else { inp };
        for b in &mut ct {
            *b = _mm512_shuffle_epi8(*b, bs);
        }
        if ENCRYPT {
            if let Some(prev) = pending.replace(ct) {
                x = ghash_regs(x, &prev, &p);
            }
        } else {
            x = ghash_regs(x, &ct, &p);
        }
    }
    if let Some(prev) = pending {
        x = ghash_regs(x, &prev, &p);
    }
    // Fewer than 16 whole blocks left: masked loads and stores touch only those (each mask bit
    // covers a quadword, two per block), and the powers H^n..H^1 are loaded from h[16 - n]
    // with the same masks, so lanes without a block multiply by zero.
    let blocks = rest.len() / 16;
    let (whole, partial) = rest.split_at_mut(16 * blocks);
    if blocks > 0 {
        let ptr = whole.as_mut_ptr();
        let mut masks = [0u8; REGS];
        let mut inp = [_mm512_setzero_si512(); REGS];
        let mut pw = [_mm512_setzero_si512(); REGS];
        for (r, ((i, m), pw)) in inp.iter_mut().zip(&mut masks).zip(&mut pw).enumerate() {
            let n = blocks.saturating_sub(4 * r).min(4);
            if n > 0 {
                *m = ((1u32 << (2 * n)) - 1) as u8;
                // SAFETY: `n > 0` means `4 * r < blocks`, so `ptr + 64 r` lies inside `whole`;
                // the mask reads only the first `16 n` bytes from there, which end at or
                // before `16 * blocks = whole.len()`. Masked-off quadwords are not accessed.
                *i = unsafe { _mm512_maskz_loadu_epi64(*m, ptr.add(64 * r).cast()) };
                // SAFETY: the lanes read are blocks `16 - blocks + 4r + l` of `keys.h` for
                // `4r + l < blocks`, all below 16; masked-off lanes are not accessed.
                *pw = unsafe {
                    _mm512_maskz_loadu_epi64(
                        *m,
                        keys.h.as_ptr().add(POWERS - blocks + 4 * r).cast(),
                    )
                };
            }
        }
        let out = ctr_regs(&k, &ctr, &inp);
        for (r, (o, m)) in out.iter().zip(&masks).enumerate() {
            if *m != 0 {
                // SAFETY: as for the load: the mask writes only the `16 n` bytes of this
                // register's blocks, all inside `whole`, which is borrowed mutably.
                unsafe { _mm512_mask_storeu_epi64(ptr.add(64 * r).cast(), *m, *o) }
            }
        }
        let mut ct = if ENCRYPT { out } else { inp };
        for b in &mut ct {
            *b = _mm512_shuffle_epi8(*b, bs);
        }
        x = ghash_regs(x, &ct, &pw);
    }
    let next = _mm_add_epi32(j0, _mm_set_epi32(0, 0, 0, 1 + (len / 16) as i32));
    let x = tail::<ENCRYPT>(keys, next, x, partial);
    finish(keys, j0, x, aad.len(), len, tag);
}
