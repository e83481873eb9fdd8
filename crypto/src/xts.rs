//! `crypt_xts`: AES-256-XTS (IEEE 1619-2018), length-preserving, on-disk compatible with Linux
//! dm-crypt's `aes-xts-plain64`.
//!
//! # Convention
//! One XTS data unit per logical block of the bdev (512 or 4096 bytes). The tweak of a unit is
//! dm-crypt's `plain64` IV: the unit's **byte offset divided by 512**, as a 64-bit little-endian
//! integer zero-padded to 16 bytes and encrypted with the second half of the key. For a 4096-byte
//! block `n` the IV is `8 * n`; for a 512-byte block it is `n`. This is dm-crypt with
//! `sector_size:<block size>` and *without* `iv_large_sectors`, the convention cryptsetup also
//! uses for LUKS2 volumes with 4096-byte sectors. The 64-byte key is the data key
//! (bytes 0..32) followed by the tweak key (bytes 32..64), in dm-crypt's and OpenSSL's order.
//!
//! A ferroblk XTS volume of 4096-byte blocks on `/dev/nvme0n1` opens in the kernel with
//! (`<sectors>` is the device size in 512-byte sectors, `<hexkey>` the 128 hex digits of the key):
//!
//! ```text
//! dmsetup create fblk --table "0 <sectors> crypt aes-xts-plain64 <hexkey> 0 /dev/nvme0n1 0 1 sector_size:4096"
//! ```
//!
//! For 512-byte blocks drop the optional parameters: `... 0 /dev/nvme0n1 0`. (cryptsetup's
//! `--iv-large-sectors`, a plain-mode option, selects the other convention; do not use it.)
//!
//! # Data path
//! - Write: the caller's data is copied into a buffer of the channel's pool, encrypted there, and
//!   that buffer is written; the caller's buffer is never modified.
//! - Read: the base reads into a buffer of the channel's pool; when it completes, each unit is
//!   decrypted from there straight into the caller's buffer, with raw stores (a unit
//!   straddling two of the caller's segments is decrypted in the pool buffer and copied out).
//!   The caller's buffer may be guest memory the guest changes at any moment, so it is never
//!   seen as a Rust reference, and never holds ciphertext. A read or write finding no pool
//!   buffer is handed back (back-pressure).
//! - Write-zeroes: zeroes are encrypted into pool buffers and written (in chunks of
//!   [`MAX_TRANSFER_BYTES`]), so reads return zeroes.
//! - Unmap: passed through. An unmapped block reads back as the *decryption* of whatever the base
//!   returns (zeroes on most devices): random-looking data, not zeroes. So this bdev never
//!   claims `UNMAP_READS_ZEROES`.
//! - Flush: passed through.
//!
//! # Engines
//! [`XtsCipher`] picks, once when it is built, the fastest transform the CPU runs (the bdev's
//! `describe` reports it as `engine`):
//! - `vaes-avx512` (x86_64 with VAES, VPCLMULQDQ, AVX-512F/BW): 16 blocks per iteration in four
//!   zmm registers, tweaks stepped by α^16 in registers, XORs fused around the rounds; one pass
//!   over the unit (`x86.rs`).
//! - `aes-ni` (x86_64 with AES-NI): the same with 8 blocks in flight in xmm registers.
//! - `portable` (anything else): the `aes` crate's multi-block cipher, with the tweaks and XORs
//!   in separate passes. It is also the reference the other two are tested against.
//!
//! XTS has no integrity: a wrong key, or tampered ciphertext, decrypts to garbage without an
//! error. Use [`crate::gcm`] where that matters.

use std::collections::VecDeque;
use std::sync::Arc;

use aes::Aes256;
use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use ferroblk_bdev::stacked::{BaseQueue, Slots};
use ferroblk_bdev::{
    Bdev, BdevError, BdevInfo, Caps, Channel, ChannelOps, IoCompletion, IoRequest, IoStatus,
    IoType, SgList, Wake,
};

use crate::common::{BufPool, Engine, MAX_TRANSFER_BYTES, follow_base_size};
use crate::key::{Key, KeyError, XTS_KEY_LEN};

/// The `kind` name of this bdev.
pub const KIND: &str = "crypt_xts";

type Block = GenericArray<u8, U16>;

// The cast in `as_blocks` relies on this layout.
const _: () = assert!(
    std::mem::size_of::<Block>() == 16 && std::mem::align_of::<Block>() == 1,
    "an AES block is 16 bytes with alignment 1"
);

/// Blocks of a data unit whose tweaks are computed, applied and encrypted together by the
/// portable transform: 32 blocks (512 bytes) keep the tweaks in L1 while `encrypt_blocks`
/// pipelines 8 blocks at a time.
const BATCH: usize = 32;

/// Multiplies a tweak by the primitive element α of GF(2^128) (IEEE 1619 §5.2, little-endian
/// byte order: bit 127 shifts out and folds back as x^7 + x^2 + x + 1).
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((((t as i128) >> 127) as u128) & 0x87)
}

#[inline(always)]
fn xor_block(b: &mut [u8], t: u128) {
    let v = u128::from_le_bytes(b[..16].try_into().expect("16-byte block")) ^ t;
    b[..16].copy_from_slice(&v.to_le_bytes());
}

#[inline(always)]
fn as_blocks(bytes: &mut [u8]) -> &mut [Block] {
    debug_assert!(bytes.len().is_multiple_of(16));
    // SAFETY: `Block` (`GenericArray<u8, U16>`) is `repr(transparent)` over 16 bytes with
    // alignment 1 (asserted above), so `len / 16` blocks cover exactly the first `len / 16 * 16`
    // bytes of the slice; the result borrows `bytes` mutably for its whole life.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<Block>(), bytes.len() / 16) }
}

/// Whether this CPU runs the XTS `engine` (VAES: AES-NI, AVX-512 F/BW, VAES, VPCLMULQDQ;
/// AES-NI: AES-NI). [`XtsCipher::new`] takes the fastest ([`Engine::fastest`]); tests force each.
/// VAES and AES-NI keep the tweaks and XORs in registers, one pass over the unit; the portable
/// engine (the `aes` crate's multi-block cipher) makes separate passes.
pub(crate) fn engine_supported(engine: Engine) -> bool {
    match engine {
        #[cfg(target_arch = "x86_64")]
        Engine::Vaes => x86::vaes_supported(),
        #[cfg(target_arch = "x86_64")]
        Engine::AesNi => x86::aesni_supported(),
        #[cfg(not(target_arch = "x86_64"))]
        Engine::Vaes | Engine::AesNi => false,
        Engine::Portable => true,
    }
}

/// The engine of an [`XtsCipher`] with its key schedules (boxed: the schedules take 0.7 to
/// 2 KiB, and a cipher is moved and cloned into every channel).
#[derive(Clone)]
enum Imp {
    /// [`Engine::Vaes`] or [`Engine::AesNi`].
    #[cfg(target_arch = "x86_64")]
    Hw(Box<x86::HwXts>),
    /// [`Engine::Portable`].
    Portable(Box<Portable>),
}

/// The AES-256-XTS transform of one data unit at a time. The round keys are zeroized on drop.
#[derive(Clone)]
pub struct XtsCipher {
    imp: Imp,
}

impl XtsCipher {
    /// The cipher of a 64-byte key: data key, then tweak key. The halves must differ. It runs
    /// the fastest implementation this CPU supports (VAES + AVX-512, AES-NI, or portable).
    pub fn new(key: &Key) -> Result<XtsCipher, KeyError> {
        XtsCipher::with_engine(key, Engine::fastest(engine_supported))
    }

    /// The cipher of `key` running `engine`.
    ///
    /// # Panics
    /// If this CPU does not support `engine` ([`Engine::is_supported`]).
    pub(crate) fn with_engine(key: &Key, engine: Engine) -> Result<XtsCipher, KeyError> {
        let k = key.expose();
        if k.len() != XTS_KEY_LEN {
            return Err(KeyError::Length {
                what: "AES-256-XTS",
                need: XTS_KEY_LEN,
                got: k.len(),
            });
        }
        let (k1, k2) = k.split_at(32);
        if k1 == k2 {
            return Err(KeyError::XtsHalvesEqual);
        }
        let (k1, k2): (&[u8; 32], &[u8; 32]) = (
            k1.try_into().expect("32-byte half"),
            k2.try_into().expect("32-byte half"),
        );
        let unsupported = || panic!("this CPU does not run the {} XTS engine", engine.name());
        let imp = match engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes | Engine::AesNi => Imp::Hw(Box::new(
                x86::HwXts::new(k1, k2, engine == Engine::Vaes).unwrap_or_else(unsupported),
            )),
            #[cfg(not(target_arch = "x86_64"))]
            Engine::Vaes | Engine::AesNi => unsupported(),
            Engine::Portable => Imp::Portable(Box::new(Portable::new(k1, k2))),
        };
        Ok(XtsCipher { imp })
    }

    /// The implementation this cipher runs.
    pub(crate) fn engine(&self) -> Engine {
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::Hw(hw) if hw.is_vaes() => Engine::Vaes,
            #[cfg(target_arch = "x86_64")]
            Imp::Hw(_) => Engine::AesNi,
            Imp::Portable(_) => Engine::Portable,
        }
    }

    /// Encrypts one data unit in place. `iv` is the unit's `plain64` IV; the unit is a whole
    /// number of 16-byte blocks (no ciphertext stealing: block sizes are 512 or 4096).
    ///
    /// # Panics
    /// If the unit is empty or not a multiple of 16 bytes.
    pub fn encrypt_unit(&self, iv: u64, unit: &mut [u8]) {
        self.unit::<true>(iv, unit);
    }

    /// Decrypts one data unit in place (same rules as [`XtsCipher::encrypt_unit`]).
    ///
    /// # Panics
    /// If the unit is empty or not a multiple of 16 bytes.
    pub fn decrypt_unit(&self, iv: u64, unit: &mut [u8]) {
        self.unit::<false>(iv, unit);
    }

    /// Decrypts the data unit `src` (same rules as [`XtsCipher::encrypt_unit`]) into `dst`,
    /// which is written only through raw stores, never seen as a Rust reference: it may be
    /// guest memory the guest changes at any moment (it then reads unspecified data, as from a
    /// disk it races with).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `src.len()` bytes and must not overlap `src`.
    ///
    /// # Panics
    /// If the unit is empty or not a multiple of 16 bytes.
    pub(crate) unsafe fn decrypt_unit_to(&self, iv: u64, src: &[u8], dst: *mut u8) {
        check_unit(src.len());
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller's guarantee on `dst`, passed on.
            Imp::Hw(hw) => unsafe { hw.decrypt_to(iv, src, dst) },
            // SAFETY: the caller's guarantee on `dst`, passed on.
            Imp::Portable(p) => unsafe { p.decrypt_to(iv, src, dst) },
        }
    }

    #[inline]
    fn unit<const ENCRYPT: bool>(&self, iv: u64, unit: &mut [u8]) {
        check_unit(unit.len());
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::Hw(hw) => hw.unit::<ENCRYPT>(iv, unit),
            Imp::Portable(p) => p.unit::<ENCRYPT>(iv, unit),
        }
    }
}

/// Panics unless `len` is a whole, non-zero number of AES blocks.
#[inline]
fn check_unit(len: usize) {
    assert!(
        len.is_multiple_of(16) && len != 0,
        "an XTS data unit is a whole number of AES blocks"
    );
}

/// The transform in portable code: the `aes` crate's block cipher, tweaks and XORs in
/// separate passes over batches of [`BATCH`] blocks. The `aes` crate zeroizes its key
/// schedules on drop.
#[derive(Clone)]
struct Portable {
    data: Aes256,
    tweak: Aes256,
}

impl Portable {
    fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Portable {
        Portable {
            data: Aes256::new(GenericArray::from_slice(k1)),
            tweak: Aes256::new(GenericArray::from_slice(k2)),
        }
    }

    /// The first tweak of a unit: the `plain64` IV (64-bit little-endian, zero-padded)
    /// encrypted with the tweak key.
    #[inline]
    fn first_tweak(&self, iv: u64) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&iv.to_le_bytes());
        self.tweak
            .encrypt_block(GenericArray::from_mut_slice(&mut t));
        t
    }

    #[inline(always)]
    fn blocks<const ENCRYPT: bool>(&self, batch: &mut [u8]) {
        let blocks = as_blocks(batch);
        if ENCRYPT {
            self.data.encrypt_blocks(blocks);
        } else {
            self.data.decrypt_blocks(blocks);
        }
    }

    fn unit<const ENCRYPT: bool>(&self, iv: u64, unit: &mut [u8]) {
        let mut t = u128::from_le_bytes(self.first_tweak(iv));
        for batch in unit.chunks_mut(BATCH * 16) {
            self.batch::<ENCRYPT>(&mut t, batch);
        }
    }

    /// The transform of the next batch of a unit (at most [`BATCH`] blocks) in place; `t` is
    /// the tweak of its first block, and becomes that of the next batch's.
    #[inline(always)]
    fn batch<const ENCRYPT: bool>(&self, t: &mut u128, batch: &mut [u8]) {
        let mut tweaks = [0u128; BATCH];
        for (b, x) in batch.chunks_exact_mut(16).zip(tweaks.iter_mut()) {
            *x = *t;
            *t = mul_alpha(*t);
            xor_block(b, *x);
        }
        self.blocks::<ENCRYPT>(batch);
        for (b, x) in batch.chunks_exact_mut(16).zip(tweaks.iter()) {
            xor_block(b, *x);
        }
    }

    /// Decrypts `src` into `dst` a batch at a time through a stack buffer, each batch stored
    /// with one raw copy.
    ///
    /// # Safety
    /// As [`XtsCipher::decrypt_unit_to`].
    unsafe fn decrypt_to(&self, iv: u64, src: &[u8], dst: *mut u8) {
        let mut t = u128::from_le_bytes(self.first_tweak(iv));
        let mut buf = [0u8; BATCH * 16];
        for (i, s) in src.chunks(BATCH * 16).enumerate() {
            let batch = &mut buf[..s.len()];
            batch.copy_from_slice(s);
            self.batch::<false>(&mut t, batch);
            // SAFETY: `i * BATCH * 16 + s.len() <= src.len()`, which the caller guarantees
            // `dst` for; `buf` is on our stack, so the two do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(batch.as_ptr(), dst.add(i * BATCH * 16), s.len())
            };
        }
    }
}

/// Decrypts the units of `data` (`bs` bytes each, blocks `lba ..` of `1 << shift` bytes, read
/// into the channel's own buffer) into the caller's `bufs`. A unit lying inside one segment is
/// decrypted straight into it ([`XtsCipher::decrypt_unit_to`]); one straddling segments is
/// decrypted in `data` and copied out. The caller's memory is only ever written with raw stores.
fn decrypt_out(
    cipher: &XtsCipher,
    (lba, shift): (u64, u32),
    bs: usize,
    data: &mut [u8],
    bufs: &mut SgList,
) {
    let segs = bufs.segments();
    // The caller's position: segment `seg`, byte `off` of it.
    let (mut seg, mut off) = (0, 0);
    for (i, unit) in data.chunks_exact_mut(bs).enumerate() {
        let iv = iv_of(lba + i as u64, shift);
        while segs.get(seg).is_some_and(|s| off == s.len) {
            seg += 1;
            off = 0;
        }
        let Some(s) = segs.get(seg) else {
            return;
        };
        if s.len - off >= bs {
            // SAFETY: `off + bs <= s.len`, and the list's constructors guarantee the segment is
            // valid for writes of its length while the list lives (borrowed mutably here); it is
            // the caller's memory, not `data` (the channel's pool buffer).
            unsafe { cipher.decrypt_unit_to(iv, unit, s.base.add(off)) };
            off += bs;
            continue;
        }
        cipher.decrypt_unit(iv, unit);
        let mut done = 0;
        while done < bs {
            let Some(s) = segs.get(seg) else {
                unit.fill(0);
                return;
            };
            let n = (s.len - off).min(bs - done);
            // SAFETY: `off + n <= s.len`, a segment valid for writes of its length (as above);
            // `unit` is our buffer, `done + n <= bs` bytes of it.
            unsafe { std::ptr::copy_nonoverlapping(unit.as_ptr().add(done), s.base.add(off), n) };
            done += n;
            off += n;
            if off == s.len {
                seg += 1;
                off = 0;
            }
        }
        // This unit was decrypted in the pool buffer, which goes back to the reactor's pool
        // (other volumes and hosts take from it): no plaintext is left there.
        unit.fill(0);
    }
}

/// `plain64` IV of block `lba` for blocks of `1 << shift` bytes: the byte offset in 512-byte
/// sectors.
#[inline]
fn iv_of(lba: u64, shift: u32) -> u64 {
    lba << (shift - 9)
}

/// An AES-256-XTS bdev stacked on any bdev; same size and block size as its base. The module
/// documentation gives the dm-crypt convention and the `dmsetup` line that opens its base.
pub struct XtsBdev {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    cipher: Arc<XtsCipher>,
    listener: u64,
}

impl XtsBdev {
    /// Stacks an XTS bdev named `name` on `base` with a 64-byte key (data key, tweak key).
    pub fn new(name: &str, base: Arc<dyn Bdev>, key: Key) -> Result<XtsBdev, BdevError> {
        let cipher = XtsCipher::new(&key).map_err(|e| BdevError::invalid("key", e.to_string()))?;
        drop(key);
        let g = base.info().geometry();
        if !g.caps.contains(Caps::READ) {
            return Err(BdevError::invalid("base", "the base bdev cannot be read"));
        }
        let mut caps = g
            .caps
            .without(Caps::UNMAP_READS_ZEROES)
            .without(Caps::WRITE_ZEROES);
        if g.caps.contains(Caps::WRITE) {
            caps = caps | Caps::WRITE_ZEROES;
        }
        let max_transfer = g
            .max_transfer_blocks
            .min((MAX_TRANSFER_BYTES >> g.block_size.shift()) as u32);
        let info = BdevInfo::builder(name, KIND, g.block_size, g.block_count, caps)
            .buf_align(g.buf_align)
            .max_transfer_blocks(max_transfer)
            .max_segments(g.max_segments)
            .read_only(base.info().is_read_only())
            .build();
        let listener = follow_base_size(&base, &info);
        Ok(XtsBdev {
            info,
            base,
            cipher: Arc::new(cipher),
            listener,
        })
    }

    /// The dm-crypt table line that opens this volume's base in the kernel (with `<hexkey>` and
    /// `<device>` to fill in; see the module documentation).
    pub fn dm_crypt_table(&self) -> String {
        let bs = self.info.block_size().bytes();
        let sectors = self.info.block_size().to_bytes(self.info.block_count()) / 512;
        let opt = if bs == 512 {
            String::new()
        } else {
            format!(" 1 sector_size:{bs}")
        };
        format!("0 {sectors} crypt aes-xts-plain64 <hexkey> 0 <device> 0{opt}")
    }
}

impl Drop for XtsBdev {
    fn drop(&mut self) {
        self.base.info().unsubscribe(self.listener);
    }
}

impl Bdev for XtsBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth();
        let bs = self.info.block_size().bytes() as usize;
        let ops = XtsChannel {
            cipher: (*self.cipher).clone(),
            shift: self.info.block_size().shift(),
            bs,
            pool: BufPool::new(self.base.info().geometry().buf_align as usize),
            reqs: Slots::new(depth),
            waiting: VecDeque::with_capacity(depth),
            base: BaseQueue::new(base, depth),
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "cipher": "aes-xts-plain64",
            "key_bits": 512,
            "iv": "byte offset / 512 (dm-crypt sector_size without iv_large_sectors)",
            "dm_crypt_table": self.dm_crypt_table(),
            "engine": self.cipher.engine().name(),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Flush, unmap: one base request, passed through.
    Pass,
    /// Read: one base read into a pool buffer, decrypted there and copied to the caller.
    Read,
    /// Write: one base write from a pool buffer.
    Write,
    /// Write-zeroes: chunks of encrypted zeroes from pool buffers.
    Zeroes,
}

/// Write-zeroes chunks one request keeps in flight at most.
const ZERO_CHUNKS_IN_FLIGHT: u32 = 4;

struct Req {
    kind: Kind,
    /// The caller's request.
    io: IoRequest,
    /// Write-zeroes: blocks issued so far.
    next: u32,
    /// Base requests in flight.
    in_flight: u32,
    status: IoStatus,
}

struct XtsChannel {
    base: BaseQueue,
    cipher: XtsCipher,
    shift: u32,
    bs: usize,
    pool: BufPool,
    reqs: Slots<Req>,
    /// Write-zeroes requests with chunks still to issue, oldest first.
    waiting: VecDeque<u32>,
}

impl XtsChannel {
    /// Issues write-zeroes chunks of request `slot` while buffers last; true when it has nothing
    /// left to issue.
    fn pump_zeroes(&mut self, slot: u32) -> bool {
        let max_chunk = (MAX_TRANSFER_BYTES >> self.shift) as u32;
        loop {
            let base_full = self.base.is_full();
            let r = self.reqs.get_mut(slot);
            if r.next == r.io.num_blocks || !r.status.is_ok() {
                return true;
            }
            if r.in_flight >= ZERO_CHUNKS_IN_FLIGHT || base_full {
                return false;
            }
            let n = (r.io.num_blocks - r.next).min(max_chunk);
            let lba = r.io.offset_blocks + u64::from(r.next);
            let len = (n as usize) << self.shift;
            let Some(mut buf) = self.pool.take(len) else {
                return false;
            };
            r.next += n;
            r.in_flight += 1;
            let data = &mut buf.as_mut_slice()[..len];
            data.fill(0);
            for (i, unit) in data.chunks_exact_mut(self.bs).enumerate() {
                self.cipher
                    .encrypt_unit(iv_of(lba + i as u64, self.shift), unit);
            }
            let sub = IoRequest::write(lba, n, SgList::from_buf_prefix(buf, len), u64::from(slot));
            self.base.submit(sub);
        }
    }

    fn pump_waiting(&mut self) {
        while let Some(&slot) = self.waiting.front() {
            if !self.pump_zeroes(slot) {
                break;
            }
            self.waiting.pop_front();
        }
    }

    fn finish(&mut self, slot: u32, done: &mut Vec<IoCompletion>) {
        let r = self.reqs.remove(slot);
        done.push(r.io.complete(r.status));
    }
}

impl ChannelOps for XtsChannel {
    fn submit(&mut self, mut io: IoRequest) -> Result<(), IoRequest> {
        if self.base.is_full() || !self.reqs.has_room() {
            return Err(io);
        }
        match io.io_type {
            IoType::Flush | IoType::Unmap => {
                let sub = IoRequest {
                    io_type: io.io_type,
                    offset_blocks: io.offset_blocks,
                    num_blocks: io.num_blocks,
                    bufs: std::mem::take(&mut io.bufs),
                    tag: 0,
                };
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: Kind::Pass,
                        io,
                        next: 0,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                self.base.submit(IoRequest {
                    tag: u64::from(slot),
                    ..sub
                });
            }
            IoType::Read => {
                let len = (io.num_blocks as usize) << self.shift;
                let Some(buf) = self.pool.take(len) else {
                    return Err(io);
                };
                let (lba, n) = (io.offset_blocks, io.num_blocks);
                let slot = match self.reqs.insert(Req {
                    kind: Kind::Read,
                    io,
                    next: 0,
                    in_flight: 1,
                    status: IoStatus::Success,
                }) {
                    Ok(slot) => slot,
                    Err(r) => {
                        self.pool.put(buf);
                        return Err(r.io);
                    }
                };
                let sub =
                    IoRequest::read(lba, n, SgList::from_buf_prefix(buf, len), u64::from(slot));
                self.base.submit(sub);
            }
            IoType::Write => {
                let len = (io.num_blocks as usize) << self.shift;
                let Some(mut buf) = self.pool.take(len) else {
                    return Err(io);
                };
                let data = &mut buf.as_mut_slice()[..len];
                io.bufs.copy_to_slice(0, data);
                for (i, unit) in data.chunks_exact_mut(self.bs).enumerate() {
                    self.cipher
                        .encrypt_unit(iv_of(io.offset_blocks + i as u64, self.shift), unit);
                }
                let (lba, n) = (io.offset_blocks, io.num_blocks);
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: Kind::Write,
                        io,
                        next: 0,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                let sub =
                    IoRequest::write(lba, n, SgList::from_buf_prefix(buf, len), u64::from(slot));
                self.base.submit(sub);
            }
            IoType::WriteZeroes => {
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: Kind::Zeroes,
                        io,
                        next: 0,
                        in_flight: 0,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                self.waiting.push_back(slot);
                self.pump_waiting();
            }
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let start = done.len();
        let mut completions = self.base.poll();
        for c in completions.drain(..) {
            let slot = c.tag as u32;
            let r = self.reqs.get_mut(slot);
            match r.kind {
                Kind::Pass => {
                    r.io.bufs = c.bufs;
                    r.status = c.status;
                    self.finish(slot, done);
                }
                Kind::Read => {
                    r.status = c.status;
                    let mut buf = c.bufs.into_buf().expect("a read's pool buffer comes back");
                    if c.status.is_ok() {
                        let len = (r.io.num_blocks as usize) << self.shift;
                        let data = &mut buf.as_mut_slice()[..len];
                        let at = (r.io.offset_blocks, self.shift);
                        decrypt_out(&self.cipher, at, self.bs, data, &mut r.io.bufs);
                    }
                    self.pool.put(buf);
                    self.finish(slot, done);
                }
                Kind::Write => {
                    r.status = c.status;
                    if let Some(b) = c.bufs.into_buf() {
                        self.pool.put(b);
                    }
                    self.finish(slot, done);
                }
                Kind::Zeroes => {
                    r.in_flight -= 1;
                    if !c.status.is_ok() && r.status.is_ok() {
                        r.status = c.status;
                    }
                    let finished =
                        r.in_flight == 0 && (r.next == r.io.num_blocks || !r.status.is_ok());
                    if let Some(b) = c.bufs.into_buf() {
                        self.pool.put(b);
                    }
                    if finished {
                        self.waiting.retain(|&s| s != slot);
                        self.finish(slot, done);
                    }
                }
            }
        }
        self.base.recycle(completions);
        self.pump_waiting();
        done.len() - start
    }

    fn wake(&self) -> Wake {
        let front_can_issue = self.waiting.front().is_some_and(|&s| {
            self.reqs.get(s).in_flight < ZERO_CHUNKS_IN_FLIGHT
                && !self.base.is_full()
                && self.pool.can_take(MAX_TRANSFER_BYTES)
        });
        if front_can_issue {
            Wake::Immediate
        } else {
            self.base.wake()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
