//! AES-256-XTS on x86_64 hardware: the AES-NI key schedule, a VAES + AVX-512 transform (16
//! blocks per iteration in four zmm registers) and an AES-NI transform (8 blocks in flight in
//! xmm registers). Both make one pass over the data unit: each block is loaded, XORed with its
//! tweak and the first round key, run through the rounds, XORed with its tweak again (folded
//! into the last round key) and stored. The tweaks are computed in vector registers as the
//! blocks go, never written out as a separate array and pass.
//!
//! Tweak arithmetic (IEEE 1619-2018 §5.2): tweaks are elements of GF(2^128) modulo
//! x^128 + x^7 + x^2 + x + 1, stored little-endian (bit 0 of byte 0 is the coefficient of x^0),
//! so a register lane holds the polynomial with bit *i* of the 128-bit lane as the coefficient
//! of x^i. The tweak of block *j* is T·α^j with α = x. Multiplying by x^k shifts the lane left
//! by *k* bits; the *k* bits that leave at the top, h(x), fold back as h(x)·(x^7 + x^2 + x + 1),
//! one carry-less multiply by 0x87, which for *k* ≤ 120 fits in the lane without a second
//! reduction.

use std::arch::x86_64::{
    __m128i, __m512i, _mm_add_epi64, _mm_aesdec_si128, _mm_aesdeclast_si128, _mm_aesenc_si128,
    _mm_aesenclast_si128, _mm_aesimc_si128, _mm_aeskeygenassist_si128, _mm_and_si128,
    _mm_loadu_si128, _mm_set_epi32, _mm_set_epi64x, _mm_setzero_si128, _mm_shuffle_epi32,
    _mm_slli_si128, _mm_srai_epi32, _mm_storeu_si128, _mm_xor_si128, _mm512_aesdec_epi128,
    _mm512_aesdeclast_epi128, _mm512_aesenc_epi128, _mm512_aesenclast_epi128,
    _mm512_broadcast_i32x4, _mm512_bslli_epi128, _mm512_bsrli_epi128, _mm512_clmulepi64_epi128,
    _mm512_loadu_si512, _mm512_mask_storeu_epi64, _mm512_maskz_loadu_epi64, _mm512_set_epi64,
    _mm512_set1_epi64, _mm512_setzero_si512, _mm512_sllv_epi64, _mm512_srlv_epi64,
    _mm512_storeu_si512, _mm512_sub_epi64, _mm512_ternarylogic_epi64, _mm512_xor_si512,
};

use zeroize::Zeroize;

/// AES-256 has 14 rounds: 15 round keys.
pub(crate) const ROUND_KEYS: usize = 15;

/// True when the CPU runs [`unit_vaes`]: VAES and VPCLMULQDQ on zmm registers (AVX-512F),
/// byte shifts of zmm lanes (AVX-512BW), AES-NI for the first tweak.
pub(super) fn vaes_supported() -> bool {
    std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
}

/// True when the CPU runs [`unit_aesni`] (and the key schedule): AES-NI.
pub(super) fn aesni_supported() -> bool {
    std::arch::is_x86_feature_detected!("aes")
}

/// The round keys of both halves of an XTS key, expanded with AES-NI, zeroized on drop.
#[derive(Clone)]
struct RoundKeys {
    /// Encryption round keys of the data key (K1).
    enc: [__m128i; ROUND_KEYS],
    /// Decryption round keys of the data key for the equivalent inverse cipher (FIPS 197
    /// §5.3.5, the order `aesdec` expects): `enc[14]`, `InvMixColumns(enc[13..=1])`, `enc[0]`.
    dec: [__m128i; ROUND_KEYS],
    /// Encryption round keys of the tweak key (K2).
    tweak: [__m128i; ROUND_KEYS],
}

impl Drop for RoundKeys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
        self.tweak.zeroize();
    }
}

/// The XTS transform on AES-NI hardware, with VAES + AVX-512 when `vaes` is set.
#[derive(Clone)]
pub(super) struct HwXts {
    keys: RoundKeys,
    /// Set only by [`HwXts::new`], and only when [`vaes_supported`] said so.
    vaes: bool,
}

impl HwXts {
    /// The transform for data key `k1` and tweak key `k2`, with the VAES path when `vaes`.
    /// `None` when the CPU lacks AES-NI, or `vaes` is asked and the CPU lacks it.
    pub(super) fn new(k1: &[u8; 32], k2: &[u8; 32], vaes: bool) -> Option<HwXts> {
        if !aesni_supported() || (vaes && !vaes_supported()) {
            return None;
        }
        // SAFETY: `expand_keys` needs AES-NI (and SSE2, x86_64 baseline), checked just above.
        let keys = unsafe { expand_keys(k1, k2) };
        Some(HwXts { keys, vaes })
    }

    /// Whether this transform runs the VAES + AVX-512 path.
    pub(super) fn is_vaes(&self) -> bool {
        self.vaes
    }

    /// Encrypts (`ENCRYPT`) or decrypts one data unit in place: `unit` is a non-empty whole
    /// number of 16-byte blocks (checked by the caller; a partial last block would be left
    /// untouched).
    #[inline]
    pub(super) fn unit<const ENCRYPT: bool>(&self, iv: u64, unit: &mut [u8]) {
        let p = unit.as_mut_ptr();
        // SAFETY: `unit` is borrowed mutably, so `p` is valid for reads and writes of its
        // length and nothing else reaches it meanwhile; source and destination are the same.
        unsafe { self.raw::<ENCRYPT>(iv, p, p, unit.len()) }
    }

    /// Decrypts the data unit `src` into `dst`, which is reached only through raw stores (it
    /// may be memory another party can change at any moment; the result is then unspecified,
    /// but nothing here relies on it).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `src.len()` bytes and must not overlap `src`.
    #[inline]
    pub(super) unsafe fn decrypt_to(&self, iv: u64, src: &[u8], dst: *mut u8) {
        // SAFETY: `src` is valid for reads of its length; the caller guarantees `dst` for
        // writes of as many bytes, not overlapping `src`.
        unsafe { self.raw::<false>(iv, src.as_ptr(), dst, src.len()) }
    }

    /// # Safety
    /// `src` valid for reads and `dst` for writes of `len` bytes, the two either equal or not
    /// overlapping.
    #[inline]
    unsafe fn raw<const ENCRYPT: bool>(&self, iv: u64, src: *const u8, dst: *mut u8, len: usize) {
        debug_assert!(len.is_multiple_of(16));
        if self.vaes {
            // SAFETY: `vaes` is true only when `HwXts::new` saw `vaes_supported()`, i.e. every
            // feature `unit_vaes` enables is present on this CPU; the caller guarantees the
            // pointers.
            unsafe { unit_vaes::<ENCRYPT>(&self.keys, iv, src, dst, len) }
        } else {
            // SAFETY: an `HwXts` exists only when `HwXts::new` saw `aesni_supported()`, the
            // one feature `unit_aesni` enables; the caller guarantees the pointers.
            unsafe { unit_aesni::<ENCRYPT>(&self.keys, iv, src, dst, len) }
        }
    }
}

/// `a ^ (a << 32) ^ (a << 64) ^ (a << 96)`: the running XOR of the four words of the previous
/// round key in the AES key expansion (FIPS 197 §5.2).
#[inline]
#[target_feature(enable = "aes")]
fn prefix_xor(a: __m128i) -> __m128i {
    let mut t = _mm_slli_si128::<4>(a);
    let mut a = _mm_xor_si128(a, t);
    t = _mm_slli_si128::<4>(t);
    a = _mm_xor_si128(a, t);
    t = _mm_slli_si128::<4>(t);
    _mm_xor_si128(a, t)
}

/// One step of the AES-256 key expansion: from round keys `2i - 2` and `2i - 1` to round keys
/// `2i` and `2i + 1`, with `RCON` = Rcon[i].
#[inline]
#[target_feature(enable = "aes")]
fn expand_step<const RCON: i32>(a: __m128i, b: __m128i) -> (__m128i, __m128i) {
    // RotWord(SubWord(last word of b)) ^ Rcon, in all four words.
    let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<RCON>(b));
    let a = _mm_xor_si128(prefix_xor(a), t);
    // SubWord(last word of the new a), without rotation or Rcon.
    let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a));
    let b = _mm_xor_si128(prefix_xor(b), t);
    (a, b)
}

/// The 15 encryption round keys of an AES-256 key (also the GCM engines' key schedule).
#[target_feature(enable = "aes")]
pub(crate) fn expand_key(key: &[u8; 32]) -> [__m128i; ROUND_KEYS] {
    // SAFETY: `key` is valid for reads of 32 bytes; `_mm_loadu_si128` has no alignment
    // requirement.
    let (a, b) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    let mut k = [_mm_setzero_si128(); ROUND_KEYS];
    k[0] = a;
    k[1] = b;
    let (a, b) = expand_step::<0x01>(a, b);
    k[2] = a;
    k[3] = b;
    let (a, b) = expand_step::<0x02>(a, b);
    k[4] = a;
    k[5] = b;
    let (a, b) = expand_step::<0x04>(a, b);
    k[6] = a;
    k[7] = b;
    let (a, b) = expand_step::<0x08>(a, b);
    k[8] = a;
    k[9] = b;
    let (a, b) = expand_step::<0x10>(a, b);
    k[10] = a;
    k[11] = b;
    let (a, b) = expand_step::<0x20>(a, b);
    k[12] = a;
    k[13] = b;
    // Round key 14 is the last: the second half of this step is not needed.
    let (a, _) = expand_step::<0x40>(a, b);
    k[14] = a;
    k
}

/// Encryption keys of `k1` and `k2`, decryption keys of `k1`.
#[target_feature(enable = "aes")]
fn expand_keys(k1: &[u8; 32], k2: &[u8; 32]) -> RoundKeys {
    let enc = expand_key(k1);
    let mut dec = [_mm_setzero_si128(); ROUND_KEYS];
    dec[0] = enc[ROUND_KEYS - 1];
    for i in 1..ROUND_KEYS - 1 {
        dec[i] = _mm_aesimc_si128(enc[ROUND_KEYS - 1 - i]);
    }
    dec[ROUND_KEYS - 1] = enc[0];
    RoundKeys {
        enc,
        dec,
        tweak: expand_key(k2),
    }
}

/// The first tweak of a unit: `iv` as a 128-bit little-endian integer, AES-encrypted with the
/// tweak key.
#[inline]
#[target_feature(enable = "aes")]
fn first_tweak(k: &[__m128i; ROUND_KEYS], iv: u64) -> __m128i {
    // The low quadword holds bytes 0..8: `iv` little-endian, then eight zero bytes.
    let mut x = _mm_xor_si128(_mm_set_epi64x(0, iv as i64), k[0]);
    for rk in &k[1..ROUND_KEYS - 1] {
        x = _mm_aesenc_si128(x, *rk);
    }
    _mm_aesenclast_si128(x, k[ROUND_KEYS - 1])
}

// ---------------------------------------------------------------------------------------------
// AES-NI: 8 blocks in flight in xmm registers.

/// Blocks the AES-NI path keeps in flight.
pub(crate) const NI_BLOCKS: usize = 8;

/// `t · α`: both 64-bit halves shift left by one; the bit leaving the low half enters the high
/// half, the bit leaving bit 127 folds back as 0x87. SSE2 only; `aes` is enabled because every
/// caller has it.
#[inline]
#[target_feature(enable = "aes")]
fn mul_alpha(t: __m128i) -> __m128i {
    // Dwords (3, 0, 1, 0) of t: their sign bits are bits 127 and 63 of t.
    let signs = _mm_srai_epi32::<31>(_mm_shuffle_epi32::<0x13>(t));
    let carry = _mm_and_si128(signs, _mm_set_epi32(0, 1, 0, 0x87));
    _mm_xor_si128(_mm_add_epi64(t, t), carry)
}

/// One middle round of encryption or (equivalent inverse cipher) decryption.
#[inline]
#[target_feature(enable = "aes")]
fn round<const ENCRYPT: bool>(x: __m128i, k: __m128i) -> __m128i {
    if ENCRYPT {
        _mm_aesenc_si128(x, k)
    } else {
        _mm_aesdec_si128(x, k)
    }
}

/// The last round.
#[inline]
#[target_feature(enable = "aes")]
fn last_round<const ENCRYPT: bool>(x: __m128i, k: __m128i) -> __m128i {
    if ENCRYPT {
        _mm_aesenclast_si128(x, k)
    } else {
        _mm_aesdeclast_si128(x, k)
    }
}

/// Makes every block's next round depend on this round of all blocks, so the compiler keeps
/// the rounds of the 8 blocks interleaved. Without it, LLVM (short of xmm registers without
/// AVX-512) schedules each block's 14 dependent rounds one after the other, and the
/// out-of-order window does not see far enough to keep the AES units busy: 4.7 instead of
/// 7.0 GB/s on 4 KiB units on Zen 4.
#[inline(always)]
pub(crate) fn in_step(x: &mut [__m128i; NI_BLOCKS]) {
    // SAFETY: the template is empty: the block reads no memory, writes none, and leaves the
    // eight registers it is given unchanged.
    unsafe {
        std::arch::asm!(
            "/* {0} {1} {2} {3} {4} {5} {6} {7} */",
            inout(xmm_reg) x[0],
            inout(xmm_reg) x[1],
            inout(xmm_reg) x[2],
            inout(xmm_reg) x[3],
            inout(xmm_reg) x[4],
            inout(xmm_reg) x[5],
            inout(xmm_reg) x[6],
            inout(xmm_reg) x[7],
            options(pure, nomem, nostack, preserves_flags)
        )
    }
}

/// XTS of the block at `src` into `dst` with tweak `t` (`k` holds the round keys for the
/// direction).
///
/// # Safety
/// `src` valid for reads and `dst` for writes of 16 bytes (no alignment requirement).
#[inline]
#[target_feature(enable = "aes")]
unsafe fn xts_block<const ENCRYPT: bool>(
    src: *const u8,
    dst: *mut u8,
    t: __m128i,
    k: &[__m128i; ROUND_KEYS],
) {
    // SAFETY: the caller guarantees `src` for reads of 16 bytes; no alignment requirement.
    let mut x = unsafe { _mm_loadu_si128(src.cast()) };
    x = _mm_xor_si128(_mm_xor_si128(x, t), k[0]);
    for rk in &k[1..ROUND_KEYS - 1] {
        x = round::<ENCRYPT>(x, *rk);
    }
    // The last round ends by XORing its key: XORing the tweak into that key applies the
    // tweak to the output.
    x = last_round::<ENCRYPT>(x, _mm_xor_si128(k[ROUND_KEYS - 1], t));
    // SAFETY: the caller guarantees `dst` for writes of 16 bytes; no alignment requirement.
    unsafe { _mm_storeu_si128(dst.cast(), x) }
}

/// The AES-NI transform of one unit of `len` bytes from `src` into `dst` (see [`HwXts::unit`]);
/// a partial last block is left alone.
///
/// # Safety
/// `src` valid for reads and `dst` for writes of `len` bytes, the two equal or not overlapping
/// (each block is loaded before it is stored).
#[target_feature(enable = "aes")]
unsafe fn unit_aesni<const ENCRYPT: bool>(
    keys: &RoundKeys,
    iv: u64,
    src: *const u8,
    dst: *mut u8,
    len: usize,
) {
    let k = if ENCRYPT { &keys.enc } else { &keys.dec };
    let mut t = first_tweak(&keys.tweak, iv);
    let chunk = NI_BLOCKS * 16;
    for at in (0..len / chunk).map(|c| c * chunk) {
        let mut tw = [t; NI_BLOCKS];
        for i in 1..NI_BLOCKS {
            tw[i] = mul_alpha(tw[i - 1]);
        }
        t = mul_alpha(tw[NI_BLOCKS - 1]);
        let mut x = [_mm_setzero_si128(); NI_BLOCKS];
        for (i, x) in x.iter_mut().enumerate() {
            // SAFETY: `at + 16 * i + 16 <= len`, inside `src` (valid for reads of `len`
            // bytes); no alignment requirement.
            let b = unsafe { _mm_loadu_si128(src.add(at + 16 * i).cast()) };
            *x = _mm_xor_si128(_mm_xor_si128(b, tw[i]), k[0]);
        }
        for rk in &k[1..ROUND_KEYS - 1] {
            for x in &mut x {
                *x = round::<ENCRYPT>(*x, *rk);
            }
            in_step(&mut x);
        }
        for (i, x) in x.iter().enumerate() {
            let y = last_round::<ENCRYPT>(*x, _mm_xor_si128(k[ROUND_KEYS - 1], tw[i]));
            // SAFETY: `at + 16 * i + 16 <= len`, inside `dst` (valid for writes of `len`
            // bytes); this chunk's blocks were all loaded above; no alignment requirement.
            unsafe { _mm_storeu_si128(dst.add(at + 16 * i).cast(), y) }
        }
    }
    // Fewer than NI_BLOCKS blocks left: one at a time.
    for at in (len / chunk * chunk..len / 16 * 16).step_by(16) {
        // SAFETY: `at + 16 <= len`, inside both buffers.
        unsafe { xts_block::<ENCRYPT>(src.add(at), dst.add(at), t, k) };
        t = mul_alpha(t);
    }
}

// ---------------------------------------------------------------------------------------------
// VAES + AVX-512: 16 blocks per iteration, 4 per zmm register.

/// zmm registers of blocks per iteration.
const REGS: usize = 4;
/// Blocks per iteration.
const VAES_BLOCKS: usize = 4 * REGS;

/// Every lane of `t` times x^c, where `c` holds each lane's shift count (0..=63) in both of its
/// quadwords.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_x_var(t: __m512i, c: __m512i) -> __m512i {
    let shifted = _mm512_sllv_epi64(t, c);
    // The bits that leave each quadword (a count of 64 gives 0: nothing leaves when c = 0).
    let out = _mm512_srlv_epi64(t, _mm512_sub_epi64(_mm512_set1_epi64(64), c));
    // Bits leaving the low quadword enter the high one; bits leaving bit 127 fold back ·0x87.
    let carry = _mm512_bslli_epi128::<8>(out);
    let fold = _mm512_clmulepi64_epi128::<0x01>(out, _mm512_set1_epi64(0x87));
    _mm512_ternarylogic_epi64::<0x96>(shifted, carry, fold)
}

/// Every lane of `t` times x^16 (= α^16): the tweak 16 blocks further along the data unit.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_x16(t: __m512i) -> __m512i {
    // The lane shifted left by two bytes; its top two bytes, moved to the bottom, · 0x87.
    let top = _mm512_bsrli_epi128::<14>(t);
    let fold = _mm512_clmulepi64_epi128::<0x00>(top, _mm512_set1_epi64(0x87));
    _mm512_xor_si512(_mm512_bslli_epi128::<2>(t), fold)
}

/// The tweaks of the first `VAES_BLOCKS` blocks of a unit whose first tweak is `t0`: register
/// `r` lane `l` holds t0·x^(4r + l).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn first_tweaks(t0: __m128i) -> [__m512i; REGS] {
    let t = _mm512_broadcast_i32x4(t0);
    let mut v = [_mm512_setzero_si512(); REGS];
    for (r, v) in v.iter_mut().enumerate() {
        let e = 4 * r as i64;
        // _mm512_set_epi64 takes the quadwords from the highest (lane 3, high half) down.
        let c = _mm512_set_epi64(e + 3, e + 3, e + 2, e + 2, e + 1, e + 1, e, e);
        *v = mul_x_var(t, c);
    }
    v
}

/// XTS of four registers of blocks with tweaks `t` (`k` holds the round keys for the
/// direction, broadcast to the four lanes).
#[inline]
#[target_feature(enable = "avx512f,vaes")]
fn xts_regs<const ENCRYPT: bool>(
    x: &mut [__m512i; REGS],
    t: &[__m512i; REGS],
    k: &[__m512i; ROUND_KEYS],
) {
    for (x, t) in x.iter_mut().zip(t) {
        *x = _mm512_ternarylogic_epi64::<0x96>(*x, *t, k[0]);
    }
    for rk in &k[1..ROUND_KEYS - 1] {
        for x in x.iter_mut() {
            *x = if ENCRYPT {
                _mm512_aesenc_epi128(*x, *rk)
            } else {
                _mm512_aesdec_epi128(*x, *rk)
            };
        }
    }
    // As in `xts_block`: the tweak XORed into the last round key is XORed into the output.
    for (x, t) in x.iter_mut().zip(t) {
        let kt = _mm512_xor_si512(k[ROUND_KEYS - 1], *t);
        *x = if ENCRYPT {
            _mm512_aesenclast_epi128(*x, kt)
        } else {
            _mm512_aesdeclast_epi128(*x, kt)
        };
    }
}

/// The VAES + AVX-512 transform of one unit of `len` bytes from `src` into `dst` (see
/// [`HwXts::unit`]); a partial last block is left alone.
///
/// # Safety
/// `src` valid for reads and `dst` for writes of `len` bytes, the two equal or not overlapping
/// (each register of blocks is loaded before it is stored).
#[target_feature(enable = "aes,avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn unit_vaes<const ENCRYPT: bool>(
    keys: &RoundKeys,
    iv: u64,
    src: *const u8,
    dst: *mut u8,
    len: usize,
) {
    let rk = if ENCRYPT { &keys.enc } else { &keys.dec };
    let mut k = [_mm512_setzero_si512(); ROUND_KEYS];
    for (k, rk) in k.iter_mut().zip(rk) {
        *k = _mm512_broadcast_i32x4(*rk);
    }
    let mut t = first_tweaks(first_tweak(&keys.tweak, iv));
    let chunk = VAES_BLOCKS * 16;
    for at in (0..len / chunk).map(|c| c * chunk) {
        let mut x = [_mm512_setzero_si512(); REGS];
        for (r, x) in x.iter_mut().enumerate() {
            // SAFETY: `at + 64 * r + 64 <= len`, inside `src` (valid for reads of `len`
            // bytes); no alignment requirement.
            *x = unsafe { _mm512_loadu_si512(src.add(at + 64 * r).cast()) };
        }
        xts_regs::<ENCRYPT>(&mut x, &t, &k);
        for (r, x) in x.iter().enumerate() {
            // SAFETY: `at + 64 * r + 64 <= len`, inside `dst` (valid for writes of `len`
            // bytes); this chunk was loaded above; no alignment requirement.
            unsafe { _mm512_storeu_si512(dst.add(at + 64 * r).cast(), *x) }
        }
        for t in &mut t {
            *t = mul_x16(*t);
        }
    }
    let done = len / chunk * chunk;
    let blocks = (len - done) / 16;
    if blocks == 0 {
        return;
    }
    // Fewer than VAES_BLOCKS blocks left: `t` holds their tweaks. Masked loads and stores
    // touch only the blocks that exist; each mask bit covers a quadword, two per block.
    // SAFETY: `done <= len`: both stay inside (or one past) their buffers.
    let (src, dst) = unsafe { (src.add(done), dst.add(done)) };
    let mut masks = [0u8; REGS];
    let mut x = [_mm512_setzero_si512(); REGS];
    for (r, (x, m)) in x.iter_mut().zip(&mut masks).enumerate() {
        let n = blocks.saturating_sub(4 * r).min(4);
        if n > 0 {
            *m = ((1u32 << (2 * n)) - 1) as u8;
            // SAFETY: `n > 0` means `4 * r < blocks`, so `src + 64 r` lies inside the rest of
            // `src`; the mask reads only the first `16 n` bytes from there, which end at or
            // before `done + 16 * blocks <= len`. Masked-off quadwords are not accessed.
            *x = unsafe { _mm512_maskz_loadu_epi64(*m, src.add(64 * r).cast()) };
        }
    }
    xts_regs::<ENCRYPT>(&mut x, &t, &k);
    for (r, (x, m)) in x.iter().zip(&masks).enumerate() {
        if *m != 0 {
            // SAFETY: as for the load: the mask writes only the `16 n` bytes of this
            // register's blocks, all inside `dst`'s `len` bytes; every block was loaded above.
            unsafe { _mm512_mask_storeu_epi64(dst.add(64 * r).cast(), *m, *x) }
        }
    }
}
