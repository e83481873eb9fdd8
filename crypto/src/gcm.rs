//! `crypt_gcm`: AES-256-GCM authenticated encryption. Every block carries a fresh 96-bit nonce
//! and a 16-byte tag, kept in a metadata region at the end of the base; any change to a block's
//! ciphertext or metadata makes its read fail with [`IoStatus::IntegrityError`].
//!
//! # On-disk layout (base blocks of the GCM bdev's block size `bs`)
//! ```text
//! block 0                 header: magic, version, geometry, volume id, key check value, CRC-32
//! blocks 1 ..= D          data: block `lba` of the GCM bdev is base block `1 + lba`
//! blocks 1 + D ..         metadata: one 32-byte entry per data block, `bs / 32` per base block
//! ```
//! An entry is `nonce (12) | tag (16) | reserved (4, zero)`. `D` is the largest count for which
//! header, data and metadata fit the base; the GCM bdev exposes those `D` blocks (about 99.2% of
//! the base). The layout is fixed when the volume is formatted: the bdev does not follow base
//! resizes.
//!
//! # Cryptography
//! - Per block: `ciphertext, tag = AES-256-GCM(key, nonce, aad = lba (8 bytes LE) | volume id
//!   (16 bytes), plaintext)`. The LBA in the AAD detects ciphertext moved between blocks; the
//!   random volume id detects blocks moved between volumes that share a key.
//! - Nonces: each channel draws a random 32-bit prefix and a random 64-bit counter start when it
//!   opens and increments the counter per block written, so nonces never repeat within a channel
//!   and channels draw disjoint random ranges. The usual bound for random nonces applies: rotate
//!   the key well before 2^32 block writes per key (16 TiB of 4 KiB writes) for a collision
//!   probability below 2^-32.
//! - Key check: the header holds the GCM encryption of 16 zero bytes under the key, with the
//!   header fields as AAD. A CRC-32 over the header tells corruption from a wrong key; a key that
//!   fails the check fails [`GcmBdev::open`] with [`CryptoError::WrongKey`].
//! - A block never written has an all-zero entry and all-zero data and reads as zeroes. An
//!   all-zero entry beside non-zero data fails, so clearing an entry is detected too.
//! - Not detected, as with any per-block MAC without a tree: replaying an older (ciphertext,
//!   entry) pair of the *same* block, or rolling a block back to never-written (zero data and
//!   entry).
//!
//! # Formatting
//! [`GcmBdev::open`] formats a base whose block 0 is all zeroes: it zeroes the data and metadata
//! regions (the base's unmap where unmapped blocks read zeroes, which keeps sparse files sparse;
//! else its write-zeroes; else zero writes), then writes the header, flushing after each. On a
//! device without fast zeroing that takes as long as writing it once. A base whose block 0 is
//! neither zero nor a GCM header is refused, never formatted over.
//!
//! # Data path
//! - Read: the base reads the data straight into the caller's buffer while the channel reads
//!   the covering metadata blocks into a pool buffer; each block is then verified and decrypted
//!   in place. If any block fails, the whole caller buffer is zeroed and the read completes with
//!   `IntegrityError`: no unauthenticated byte is returned.
//! - Write: the metadata blocks are read, the caller's data is copied into a pool buffer and
//!   encrypted there (the caller's buffer is never modified), the entries are patched, then the
//!   data and the metadata blocks are written together. The request completes when both are.
//!   A crash between the two leaves the block failing its check (a torn write shows as
//!   `IntegrityError`, not as old or new data).
//! - Metadata blocks are shared by neighbouring data blocks, possibly written by channels on
//!   other reactors: each channel takes a lock per metadata block (striped, shared by all
//!   channels, never waited on while holding another) for the read-modify-write; readers take it
//!   shared, so a read never sees a half-updated block.
//! - Write-zeroes and unmap clear the entries (read-modify-write of the metadata) and zero the
//!   data range in the base (its write-zeroes, or its unmap where unmapped blocks read zeroes):
//!   the blocks read as never written, that is zeroes. Cheap (no data is encrypted), at the cost
//!   of showing an observer of the base which blocks are zero, as discards do on dm-crypt.
//! - Flush: passed through (a write completes only once its data and metadata both have).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::{AeadInPlace, Aes256Gcm, KeyInit};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::uring::ThreadRing;
use ferroblk_bdev::{
    AlignedBuf, Bdev, BdevError, BdevInfo, BlockSize, Caps, Channel, ChannelOps, IoCompletion,
    IoRequest, IoStatus, IoType, SgList, Wake,
};

use crate::common::{BufPool, MAX_TRANSFER_BYTES, SMALL_BUF, Slots, for_each_unit_mut};
use crate::error::CryptoError;
use crate::key::{AES256_KEY_LEN, Key, KeyError};

/// The `kind` name of this bdev.
pub const KIND: &str = "crypt_gcm";

const MAGIC: &[u8; 8] = b"FBLKGCM1";
const VERSION: u32 = 1;
/// Bytes of one metadata entry.
pub const ENTRY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
/// Bytes of the header that the CRC covers (the CRC follows them).
const HEADER_BYTES: usize = 92;
/// Header bytes that are the key check's AAD (magic through volume id).
const HEADER_AAD: usize = 48;
/// Metadata lock stripes shared by the channels of one bdev.
const LOCK_STRIPES: usize = 4096;
const WRITER: u32 = 1 << 31;
/// Unmap / write-zeroes chunks one request keeps in flight at most.
const DEALLOC_CHUNKS_IN_FLIGHT: u32 = 4;

/// Where things are on the base, in base blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcmLayout {
    /// First data block (block `lba` of the GCM bdev is base block `data_start + lba`).
    pub data_start: u64,
    /// Data blocks: the GCM bdev's size.
    pub data_blocks: u64,
    /// First metadata block.
    pub md_start: u64,
    /// Metadata blocks.
    pub md_blocks: u64,
    /// Entries per metadata block (`block size / ENTRY_BYTES`).
    pub entries_per_block: u64,
}

impl GcmLayout {
    /// The largest layout that fits `base_blocks` blocks of `bs`, if any data block fits.
    pub fn for_base(bs: BlockSize, base_blocks: u64) -> Option<GcmLayout> {
        let e = u64::from(bs.bytes()) / ENTRY_BYTES as u64;
        let avail = base_blocks.checked_sub(1)?;
        // The largest d with d + ceil(d / e) <= avail: start near avail * e / (e + 1), adjust.
        let mut d = (u128::from(avail) * u128::from(e) / (u128::from(e) + 1)) as u64;
        while d > 0 && d + d.div_ceil(e) > avail {
            d -= 1;
        }
        while d + 1 + (d + 1).div_ceil(e) <= avail {
            d += 1;
        }
        (d > 0).then(|| GcmLayout::with_data_blocks(bs, d))
    }

    fn with_data_blocks(bs: BlockSize, d: u64) -> GcmLayout {
        let e = u64::from(bs.bytes()) / ENTRY_BYTES as u64;
        GcmLayout {
            data_start: 1,
            data_blocks: d,
            md_start: 1 + d,
            md_blocks: d.div_ceil(e),
            entries_per_block: e,
        }
    }

    /// Base blocks the layout uses.
    pub fn base_blocks(&self) -> u64 {
        self.md_start + self.md_blocks
    }

    /// The metadata block (relative to `md_start`) and byte offset in it of block `lba`'s entry.
    pub fn entry_of(&self, lba: u64) -> (u64, usize) {
        (
            lba / self.entries_per_block,
            (lba % self.entries_per_block) as usize * ENTRY_BYTES,
        )
    }

    /// Metadata blocks (first, relative to `md_start`, and count) holding the entries of blocks
    /// `lba .. lba + n`.
    fn md_span(&self, lba: u64, n: u32) -> (u64, u32) {
        let first = lba / self.entries_per_block;
        let last = (lba + u64::from(n) - 1) / self.entries_per_block;
        (first, (last - first + 1) as u32)
    }
}

/// IEEE CRC-32 (as zlib), for the header only.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

struct Header {
    block_size: u32,
    data_blocks: u64,
    md_start: u64,
    volume_id: [u8; 16],
    kcv_nonce: [u8; NONCE_BYTES],
    kcv_tag: [u8; TAG_BYTES],
    kcv_ct: [u8; 16],
}

impl Header {
    fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.data_blocks.to_le_bytes());
        out[24..32].copy_from_slice(&self.md_start.to_le_bytes());
        out[32..48].copy_from_slice(&self.volume_id);
        out[48..60].copy_from_slice(&self.kcv_nonce);
        out[60..76].copy_from_slice(&self.kcv_tag);
        out[76..92].copy_from_slice(&self.kcv_ct);
        let crc = crc32(&out[..HEADER_BYTES]);
        out[92..96].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Result<Header, String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..8] != MAGIC {
            return Err("block 0 is neither zero nor an AES-256-GCM volume header; \
                        refusing to format over existing data"
                .into());
        }
        if crc32(&b[..HEADER_BYTES]) != u32_at(92) {
            return Err("the volume header is corrupted (CRC mismatch)".into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "volume format version {version} is not supported (this build reads {VERSION})"
            ));
        }
        let mut h = Header {
            block_size: u32_at(12),
            data_blocks: u64_at(16),
            md_start: u64_at(24),
            volume_id: [0; 16],
            kcv_nonce: [0; NONCE_BYTES],
            kcv_tag: [0; TAG_BYTES],
            kcv_ct: [0; 16],
        };
        h.volume_id.copy_from_slice(&b[32..48]);
        h.kcv_nonce.copy_from_slice(&b[48..60]);
        h.kcv_tag.copy_from_slice(&b[60..76]);
        h.kcv_ct.copy_from_slice(&b[76..92]);
        Ok(h)
    }
}

fn random<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(KeyError::Random)?;
    Ok(b)
}

/// Per-bdev state shared by its channels.
struct GcmShared {
    cipher: Aes256Gcm,
    volume_id: [u8; 16],
    layout: GcmLayout,
    /// Reader/writer locks on metadata blocks, by block number modulo `LOCK_STRIPES`.
    locks: Box<[AtomicU32]>,
    integrity_errors: AtomicU64,
    /// Base operation that zeroes a data range for an unmap.
    unmap_op: IoType,
    /// Base operation that zeroes a data range for a write-zeroes.
    zeroes_op: IoType,
}

impl GcmShared {
    fn stripe(&self, md: u64) -> &AtomicU32 {
        &self.locks[(md % LOCK_STRIPES as u64) as usize]
    }

    fn try_lock_one(&self, md: u64, write: bool) -> bool {
        let l = self.stripe(md);
        if write {
            l.compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        } else {
            l.fetch_update(Ordering::Acquire, Ordering::Relaxed, |v| {
                (v & WRITER == 0).then_some(v + 1)
            })
            .is_ok()
        }
    }

    fn unlock_one(&self, md: u64, write: bool) {
        let l = self.stripe(md);
        if write {
            l.store(0, Ordering::Release);
        } else {
            l.fetch_sub(1, Ordering::Release);
        }
    }

    /// Takes the locks of metadata blocks `first .. first + count`, all or none.
    fn try_lock(&self, first: u64, count: u32, write: bool) -> bool {
        for i in 0..u64::from(count) {
            if !self.try_lock_one(first + i, write) {
                for j in 0..i {
                    self.unlock_one(first + j, write);
                }
                return false;
            }
        }
        true
    }

    fn unlock(&self, first: u64, count: u32, write: bool) {
        for i in 0..u64::from(count) {
            self.unlock_one(first + i, write);
        }
    }
}

fn aad(lba: u64, volume_id: &[u8; 16]) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[..8].copy_from_slice(&lba.to_le_bytes());
    a[8..].copy_from_slice(volume_id);
    a
}

/// An AES-256-GCM bdev stacked on any bdev; see the module documentation.
pub struct GcmBdev {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    shared: Arc<GcmShared>,
}

impl GcmBdev {
    /// Opens the AES-256-GCM volume on `base` with a 32-byte key, formatting the base first if
    /// its block 0 is all zeroes. Fails with [`CryptoError::WrongKey`] if the key is not the
    /// volume's.
    pub fn open(name: &str, base: Arc<dyn Bdev>, key: Key) -> Result<GcmBdev, CryptoError> {
        let base_name = base.info().name().to_string();
        let err_volume = |reason: String| CryptoError::Volume {
            name: name.into(),
            base: base_name.clone(),
            reason,
        };
        let err_io = |what: &'static str, status: IoStatus| CryptoError::BaseIo {
            name: name.into(),
            base: base_name.clone(),
            what,
            status,
        };
        if key.len() != AES256_KEY_LEN {
            return Err(CryptoError::Key {
                name: name.into(),
                source: KeyError::Length {
                    what: "AES-256-GCM",
                    need: AES256_KEY_LEN,
                    got: key.len(),
                },
            });
        }
        let cipher = Aes256Gcm::new(GenericArray::from_slice(key.expose()));
        drop(key);
        let g = base.info().geometry();
        let bs = g.block_size;
        // How to zero a data range of the base: unmap where unmapped blocks read zeroes (keeps
        // thin bases thin), else write-zeroes. Unmap prefers the first, write-zeroes the second.
        let unmap_zeroes = g.caps.contains(Caps::UNMAP | Caps::UNMAP_READS_ZEROES);
        let can_write_zeroes = g.caps.contains(Caps::WRITE_ZEROES);
        let unmap_op = match (unmap_zeroes, can_write_zeroes) {
            (true, _) => Some(IoType::Unmap),
            (false, true) => Some(IoType::WriteZeroes),
            _ => None,
        };
        let zeroes_op = if can_write_zeroes {
            Some(IoType::WriteZeroes)
        } else {
            unmap_op
        };
        if !g.caps.contains(Caps::READ | Caps::RETAINS_DATA) {
            return Err(err_volume(
                "the base does not keep data (a GCM volume needs a readable, retaining base)"
                    .into(),
            ));
        }
        let mut ch = SyncChannel::new(base.open_channel().map_err(|source| CryptoError::Bdev {
            name: name.into(),
            source,
        })?);
        let (st, block0) = ch.read(0, 1);
        if !st.is_ok() {
            return Err(err_io("reading the header", st));
        }
        let header = if block0.iter().all(|&b| b == 0) {
            let layout = GcmLayout::for_base(bs, g.block_count).ok_or_else(|| {
                err_volume(format!(
                    "{} blocks is too small for a GCM volume (header, data and metadata)",
                    g.block_count
                ))
            })?;
            if base.info().is_read_only() || !g.caps.contains(Caps::WRITE) {
                return Err(err_volume(
                    "block 0 is zero (no volume yet) and the base is read-only, so it cannot be \
                     formatted"
                        .into(),
                ));
            }
            let key_err = |source| CryptoError::Key {
                name: name.into(),
                source,
            };
            let mut h = Header {
                block_size: bs.bytes(),
                data_blocks: layout.data_blocks,
                md_start: layout.md_start,
                volume_id: random().map_err(key_err)?,
                kcv_nonce: random().map_err(key_err)?,
                kcv_tag: [0; TAG_BYTES],
                kcv_ct: [0; 16],
            };
            let mut hb = vec![0u8; bs.bytes() as usize];
            h.encode(&mut hb);
            let tag = cipher
                .encrypt_in_place_detached(
                    GenericArray::from_slice(&h.kcv_nonce),
                    &hb[..HEADER_AAD],
                    &mut h.kcv_ct,
                )
                .expect("16 bytes are within GCM's limits");
            h.kcv_tag.copy_from_slice(&tag);
            h.encode(&mut hb);
            // Data and metadata start out zero: every block reads as never written.
            zero_range(&mut ch, 1, layout.base_blocks() - 1, unmap_op)
                .map_err(|st| err_io("zeroing the data and metadata regions", st))?;
            if g.caps.contains(Caps::FLUSH) {
                let st = ch.flush();
                if !st.is_ok() {
                    return Err(err_io("flushing the zeroed regions", st));
                }
            }
            let st = ch.write(0, &hb);
            if !st.is_ok() {
                return Err(err_io("writing the header", st));
            }
            if g.caps.contains(Caps::FLUSH) {
                let st = ch.flush();
                if !st.is_ok() {
                    return Err(err_io("flushing the header", st));
                }
            }
            tracing::info!(bdev = %name, base = %base_name, data_blocks = layout.data_blocks,
                "formatted an AES-256-GCM volume");
            h
        } else {
            let h = Header::decode(&block0).map_err(err_volume)?;
            let mut ct = h.kcv_ct;
            let ok = cipher
                .decrypt_in_place_detached(
                    GenericArray::from_slice(&h.kcv_nonce),
                    &block0[..HEADER_AAD],
                    &mut ct,
                    GenericArray::from_slice(&h.kcv_tag),
                )
                .is_ok();
            if !ok || ct != [0u8; 16] {
                return Err(CryptoError::WrongKey {
                    name: name.into(),
                    base: base_name.clone(),
                });
            }
            h
        };
        if header.block_size != bs.bytes() {
            return Err(err_volume(format!(
                "the volume was formatted with {}-byte blocks but the base has {}-byte blocks",
                header.block_size,
                bs.bytes()
            )));
        }
        let layout = GcmLayout::with_data_blocks(bs, header.data_blocks);
        if header.data_blocks == 0 || header.md_start != layout.md_start {
            return Err(err_volume(
                "the volume header has an inconsistent layout".into(),
            ));
        }
        if layout.base_blocks() > g.block_count {
            return Err(err_volume(format!(
                "the volume needs {} blocks but the base has only {}",
                layout.base_blocks(),
                g.block_count
            )));
        }
        drop(ch);

        let mut caps = Caps::READ | Caps::RETAINS_DATA;
        for c in [
            Caps::WRITE,
            Caps::FLUSH,
            Caps::PERSISTENT,
            Caps::VOLATILE_CACHE,
        ] {
            if g.caps.contains(c) {
                caps = caps | c;
            }
        }
        if g.caps.contains(Caps::WRITE) && unmap_op.is_some() {
            caps = caps | Caps::WRITE_ZEROES | Caps::UNMAP | Caps::UNMAP_READS_ZEROES;
        }
        let max_transfer = g
            .max_transfer_blocks
            .min((MAX_TRANSFER_BYTES >> bs.shift()) as u32);
        let info = BdevInfo::builder(name, KIND, bs, layout.data_blocks, caps)
            .buf_align(g.buf_align)
            .max_transfer_blocks(max_transfer)
            .max_segments(g.max_segments)
            .read_only(base.info().is_read_only())
            .build();
        Ok(GcmBdev {
            info,
            base,
            shared: Arc::new(GcmShared {
                cipher,
                volume_id: header.volume_id,
                layout,
                locks: (0..LOCK_STRIPES).map(|_| AtomicU32::new(0)).collect(),
                integrity_errors: AtomicU64::new(0),
                unmap_op: unmap_op.unwrap_or(IoType::WriteZeroes),
                zeroes_op: zeroes_op.unwrap_or(IoType::WriteZeroes),
            }),
        })
    }

    /// Where the header, data and metadata are on the base.
    pub fn layout(&self) -> GcmLayout {
        self.shared.layout
    }

    /// Reads that failed authentication since the bdev was opened.
    pub fn integrity_errors(&self) -> u64 {
        self.shared.integrity_errors.load(Ordering::Relaxed)
    }
}

/// Zeroes base blocks `first .. first + count` with `op` (unmap or write-zeroes) where the base
/// has one, else by writing zero buffers.
fn zero_range(
    ch: &mut SyncChannel,
    first: u64,
    count: u64,
    op: Option<IoType>,
) -> Result<(), IoStatus> {
    let info = ch.channel().info().clone();
    let bs = info.block_size();
    let step = match op {
        Some(_) => u64::from(u32::MAX),
        None => u64::from(info.geometry().max_transfer_blocks).min((1 << 20) >> bs.shift()),
    };
    let zeroes = match op {
        Some(_) => Vec::new(),
        None => vec![0u8; bs.to_bytes(step) as usize],
    };
    let mut at = first;
    while at < first + count {
        let n = (first + count - at).min(step);
        let st = match op {
            Some(IoType::Unmap) => ch.unmap(at, n as u32),
            Some(_) => ch.write_zeroes(at, n as u32),
            None => ch.write(at, &zeroes[..bs.to_bytes(n) as usize]),
        };
        if !st.is_ok() {
            return Err(st);
        }
        at += n;
    }
    Ok(())
}

impl Bdev for GcmBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth();
        let bs = self.info.block_size().bytes() as usize;
        let prefix: [u8; 4] = random().map_err(|e| BdevError::Io {
            op: "draw a nonce prefix for",
            path: self.info.name().into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let start: [u8; 8] = random().map_err(|e| BdevError::Io {
            op: "draw a nonce counter for",
            path: self.info.name().into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let base_max_md = base.info().geometry().max_transfer_blocks;
        let ops = GcmChannel {
            cipher: self.shared.cipher.clone(),
            shared: self.shared.clone(),
            shift: self.info.block_size().shift(),
            bs,
            nonce_prefix: prefix,
            nonce_counter: u64::from_le_bytes(start),
            pool: BufPool::new(self.base.info().geometry().buf_align as usize),
            dealloc_md_blocks: ((MAX_TRANSFER_BYTES / bs) as u32).min(base_max_md),
            reqs: Slots::new(depth),
            chunks: Slots::new(depth),
            waiting: VecDeque::with_capacity(depth),
            lock_wait: VecDeque::with_capacity(depth),
            retry: VecDeque::with_capacity(2 * depth),
            scratch: Vec::with_capacity(depth),
            bounce: vec![0u8; bs],
            base,
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn describe(&self) -> serde_json::Value {
        let l = self.shared.layout;
        let id: String = self
            .shared
            .volume_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        serde_json::json!({
            "cipher": "aes-256-gcm",
            "volume_id": id,
            "data_start": l.data_start,
            "data_blocks": l.data_blocks,
            "metadata_start": l.md_start,
            "metadata_blocks": l.md_blocks,
            "integrity_errors": self.integrity_errors(),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReqKind {
    Flush,
    Read,
    Write,
    /// Write-zeroes or unmap: clear entries, zero the data range with this base operation.
    Dealloc(IoType),
}

struct Req {
    kind: ReqKind,
    /// The caller's request. A read's buffers travel in the base data read meanwhile.
    io: IoRequest,
    /// Dealloc: blocks handed to chunks so far.
    next: u32,
    /// Chunks (or, for flush, base requests) in flight.
    in_flight: u32,
    status: IoStatus,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkKind {
    Read,
    Write,
    Dealloc(IoType),
}

/// A range of blocks processed as one unit: it holds the locks of its metadata blocks, a
/// metadata buffer, and for writes a data buffer.
struct Chunk {
    req: u32,
    kind: ChunkKind,
    lba: u64,
    n: u32,
    md_first: u64,
    md_count: u32,
    md: Option<AlignedBuf>,
    data: Option<AlignedBuf>,
    /// Base requests in flight.
    pending: u8,
    /// Whether it holds its metadata locks.
    locked: bool,
    status: IoStatus,
}

impl Chunk {
    fn writes(&self) -> bool {
        self.kind != ChunkKind::Read
    }
}

// The low byte of a base request's tag says what it is; the rest is the chunk (or request) slot.
const SUB_DATA_READ: u64 = 1;
const SUB_MD_READ: u64 = 2;
const SUB_DATA_WRITE: u64 = 3;
const SUB_MD_WRITE: u64 = 4;
const SUB_DEALLOC: u64 = 5;
const SUB_FLUSH: u64 = 6;

fn sub_tag(slot: u32, sub: u64) -> u64 {
    u64::from(slot) << 8 | sub
}

struct GcmChannel {
    base: Channel,
    cipher: Aes256Gcm,
    shared: Arc<GcmShared>,
    shift: u32,
    bs: usize,
    nonce_prefix: [u8; 4],
    nonce_counter: u64,
    pool: BufPool,
    /// Most metadata blocks one unmap chunk covers.
    dealloc_md_blocks: u32,
    reqs: Slots<Req>,
    chunks: Slots<Chunk>,
    /// Dealloc requests with chunks still to create, oldest first.
    waiting: VecDeque<u32>,
    /// Chunks waiting for their metadata locks.
    lock_wait: VecDeque<u32>,
    /// Base requests the base refused after their request was accepted, to submit again.
    retry: VecDeque<IoRequest>,
    scratch: Vec<IoCompletion>,
    bounce: Vec<u8>,
}

impl GcmChannel {
    fn base_full(&self) -> bool {
        self.base.in_flight() >= self.base.depth()
    }

    fn submit_base(&mut self, io: IoRequest) {
        if !self.retry.is_empty() {
            self.retry.push_back(io);
        } else if let Err(io) = self.base.submit(io) {
            self.retry.push_back(io);
        }
    }

    fn md_io(&self, c: &mut Chunk, slot: u32, read: bool) -> IoRequest {
        let md = c.md.take().expect("metadata buffer");
        let len = c.md_count as usize * self.bs;
        let lba = self.shared.layout.md_start + c.md_first;
        let bufs = SgList::from_buf_split(md, &[len]);
        if read {
            IoRequest::read(lba, c.md_count, bufs, sub_tag(slot, SUB_MD_READ))
        } else {
            IoRequest::write(lba, c.md_count, bufs, sub_tag(slot, SUB_MD_WRITE))
        }
    }

    /// Takes the chunk's locks and issues its first base requests; false if a lock is busy.
    fn try_start(&mut self, slot: u32) -> bool {
        let (md_first, md_count, write) = {
            let c = self.chunks.get(slot);
            (c.md_first, c.md_count, c.writes())
        };
        if !self.shared.try_lock(md_first, md_count, write) {
            return false;
        }
        let mut c = std::mem::replace(self.chunks.get_mut(slot), placeholder());
        let md_read = self.md_io(&mut c, slot, true);
        let data_start = self.shared.layout.data_start;
        let mut second = None;
        match c.kind {
            ChunkKind::Read => {
                let r = self.reqs.get_mut(c.req);
                second = Some(IoRequest::read(
                    data_start + c.lba,
                    c.n,
                    std::mem::take(&mut r.io.bufs),
                    sub_tag(slot, SUB_DATA_READ),
                ));
            }
            ChunkKind::Write => {}
            ChunkKind::Dealloc(op) => {
                second = Some(IoRequest::no_data(
                    op,
                    data_start + c.lba,
                    c.n,
                    sub_tag(slot, SUB_DEALLOC),
                ));
            }
        }
        c.pending = 1 + u8::from(second.is_some());
        c.locked = true;
        *self.chunks.get_mut(slot) = c;
        if let Some(s) = second {
            self.submit_base(s);
        }
        self.submit_base(md_read);
        true
    }

    fn start_or_wait(&mut self, slot: u32) {
        if !self.try_start(slot) {
            self.lock_wait.push_back(slot);
        }
    }

    /// Creates chunks of dealloc request `slot` while resources last; true when it has nothing
    /// left to create.
    fn pump_dealloc(&mut self, slot: u32) -> bool {
        let layout = self.shared.layout;
        loop {
            let r = self.reqs.get(slot);
            let ReqKind::Dealloc(op) = r.kind else {
                return true;
            };
            if r.next == r.io.num_blocks || !r.status.is_ok() {
                return true;
            }
            if r.in_flight >= DEALLOC_CHUNKS_IN_FLIGHT
                || self.base_full()
                || !self.chunks.has_room()
            {
                return false;
            }
            let lba = r.io.offset_blocks + u64::from(r.next);
            let md_first = lba / layout.entries_per_block;
            let end = (md_first + u64::from(self.dealloc_md_blocks)) * layout.entries_per_block;
            let n = (r.io.num_blocks - r.next).min((end - lba).min(u64::from(u32::MAX)) as u32);
            let Some(md) = self.pool.take_large() else {
                return false;
            };
            let (md_first, md_count) = layout.md_span(lba, n);
            let r = self.reqs.get_mut(slot);
            r.next += n;
            r.in_flight += 1;
            let c = self
                .chunks
                .insert(Chunk {
                    req: slot,
                    kind: ChunkKind::Dealloc(op),
                    lba,
                    n,
                    md_first,
                    md_count,
                    md: Some(md),
                    data: None,
                    pending: 0,
                    locked: false,
                    status: IoStatus::Success,
                })
                .map_err(|_| ())
                .expect("room checked");
            self.start_or_wait(c);
        }
    }

    fn pump_waiting(&mut self) {
        while let Some(&slot) = self.waiting.front() {
            if !self.pump_dealloc(slot) {
                break;
            }
            self.waiting.pop_front();
        }
    }

    fn next_nonce(&mut self) -> [u8; NONCE_BYTES] {
        let mut n = [0u8; NONCE_BYTES];
        n[..4].copy_from_slice(&self.nonce_prefix);
        n[4..].copy_from_slice(&self.nonce_counter.to_le_bytes());
        self.nonce_counter = self.nonce_counter.wrapping_add(1);
        n
    }

    /// After the metadata read of a write chunk: encrypt the caller's data into the chunk's
    /// buffer, patch the entries, issue the data and metadata writes.
    fn write_phase(&mut self, slot: u32) {
        let mut c = std::mem::replace(self.chunks.get_mut(slot), placeholder());
        let layout = self.shared.layout;
        let base_entry = (c.lba - c.md_first * layout.entries_per_block) as usize;
        let len = (c.n as usize) << self.shift;
        let mut md = c.md.take().expect("metadata buffer");
        match c.kind {
            ChunkKind::Write => {
                let mut data = c.data.take().expect("data buffer");
                let d = &mut data.as_mut_slice()[..len];
                self.reqs.get(c.req).io.bufs.copy_to_slice(0, d);
                for (i, unit) in d.chunks_exact_mut(self.bs).enumerate() {
                    let lba = c.lba + i as u64;
                    let nonce = self.next_nonce();
                    let tag = self
                        .cipher
                        .encrypt_in_place_detached(
                            GenericArray::from_slice(&nonce),
                            &aad(lba, &self.shared.volume_id),
                            unit,
                        )
                        .expect("a block is within GCM's limits");
                    let e = &mut md.as_mut_slice()[(base_entry + i) * ENTRY_BYTES..][..ENTRY_BYTES];
                    e[..NONCE_BYTES].copy_from_slice(&nonce);
                    e[NONCE_BYTES..NONCE_BYTES + TAG_BYTES].copy_from_slice(&tag);
                    e[NONCE_BYTES + TAG_BYTES..].fill(0);
                }
                let data_io = IoRequest::write(
                    layout.data_start + c.lba,
                    c.n,
                    SgList::from_buf_split(data, &[len]),
                    sub_tag(slot, SUB_DATA_WRITE),
                );
                c.md = Some(md);
                let md_io = self.md_io(&mut c, slot, false);
                c.pending += 2;
                *self.chunks.get_mut(slot) = c;
                self.submit_base(data_io);
                self.submit_base(md_io);
            }
            ChunkKind::Dealloc(_) => {
                md.as_mut_slice()[base_entry * ENTRY_BYTES..][..c.n as usize * ENTRY_BYTES].fill(0);
                c.md = Some(md);
                let md_io = self.md_io(&mut c, slot, false);
                c.pending += 1;
                *self.chunks.get_mut(slot) = c;
                self.submit_base(md_io);
            }
            ChunkKind::Read => unreachable!("reads have no write phase"),
        }
    }

    /// Verifies and decrypts a finished read chunk into the caller's buffer; false if any block
    /// fails (the buffer is then zeroed).
    fn verify(&mut self, slot: u32) -> bool {
        let c = self.chunks.get(slot);
        let layout = self.shared.layout;
        let base_entry = (c.lba - c.md_first * layout.entries_per_block) as usize;
        let md = c.md.as_ref().expect("metadata buffer");
        let (lba0, req) = (c.lba, c.req);
        let (cipher, volume_id) = (&self.cipher, &self.shared.volume_id);
        let bufs = &mut self.reqs.get_mut(req).io.bufs;
        let mut ok = true;
        for_each_unit_mut(bufs, self.bs, &mut self.bounce, |i, unit| {
            let e = &md.as_slice()[(base_entry + i) * ENTRY_BYTES..][..ENTRY_BYTES];
            ok = if e.iter().all(|&b| b == 0) {
                unit.iter().all(|&b| b == 0)
            } else {
                e[NONCE_BYTES + TAG_BYTES..].iter().all(|&b| b == 0)
                    && cipher
                        .decrypt_in_place_detached(
                            GenericArray::from_slice(&e[..NONCE_BYTES]),
                            &aad(lba0 + i as u64, volume_id),
                            unit,
                            GenericArray::from_slice(&e[NONCE_BYTES..NONCE_BYTES + TAG_BYTES]),
                        )
                        .is_ok()
            };
            ok
        });
        if !ok {
            bufs.fill_zero();
            self.shared.integrity_errors.fetch_add(1, Ordering::Relaxed);
            // At debug level: a tampered or broken base must not flood the log.
            tracing::debug!(
                lba = lba0,
                "AES-256-GCM authentication failed; read refused"
            );
        }
        ok
    }

    /// A chunk whose base requests are all done: release it, and finish its request if that
    /// was the last chunk.
    fn finish_chunk(&mut self, slot: u32, done: &mut Vec<IoCompletion>) {
        let status = self.chunks.get(slot).status;
        let kind = self.chunks.get(slot).kind;
        let mut status = status;
        if kind == ChunkKind::Read {
            if status.is_ok() {
                if !self.verify(slot) {
                    status = IoStatus::IntegrityError;
                }
            } else {
                let req = self.chunks.get(slot).req;
                self.reqs.get_mut(req).io.bufs.fill_zero();
            }
        }
        let c = self.chunks.remove(slot);
        self.shared.unlock(c.md_first, c.md_count, c.writes());
        for b in [c.md, c.data].into_iter().flatten() {
            self.pool.put(b);
        }
        let r = self.reqs.get_mut(c.req);
        r.in_flight -= 1;
        if !status.is_ok() && r.status.is_ok() {
            r.status = status;
        }
        let finished = match r.kind {
            ReqKind::Dealloc(_) => {
                r.in_flight == 0 && (r.next == r.io.num_blocks || !r.status.is_ok())
            }
            _ => true,
        };
        if finished {
            self.waiting.retain(|&s| s != c.req);
            let r = self.reqs.remove(c.req);
            done.push(r.io.complete(r.status));
        }
    }

    fn complete_sub(&mut self, c: IoCompletion, done: &mut Vec<IoCompletion>) {
        let slot = (c.tag >> 8) as u32;
        let sub = c.tag & 0xff;
        if sub == SUB_FLUSH {
            let r = self.reqs.remove(slot);
            done.push(r.io.complete(c.status));
            return;
        }
        let ch = self.chunks.get_mut(slot);
        ch.pending -= 1;
        if !c.status.is_ok() && ch.status.is_ok() {
            ch.status = c.status;
        }
        match sub {
            SUB_DATA_READ => {
                let req = ch.req;
                self.reqs.get_mut(req).io.bufs = c.bufs;
            }
            SUB_MD_READ => {
                ch.md = c.bufs.into_buf();
                if ch.writes() && ch.status.is_ok() {
                    self.write_phase(slot);
                }
            }
            SUB_DATA_WRITE => ch.data = c.bufs.into_buf(),
            SUB_MD_WRITE => ch.md = c.bufs.into_buf(),
            _ => {}
        }
        if self.chunks.get(slot).pending == 0 {
            self.finish_chunk(slot, done);
        }
    }
}

fn placeholder() -> Chunk {
    Chunk {
        req: 0,
        kind: ChunkKind::Read,
        lba: 0,
        n: 0,
        md_first: 0,
        md_count: 0,
        md: None,
        data: None,
        pending: 0,
        locked: false,
        status: IoStatus::Success,
    }
}

impl Drop for GcmChannel {
    /// Waits for the base requests still in flight (their buffers and the metadata blocks they
    /// write are this channel's), then releases the metadata locks its chunks hold, so that a
    /// channel closed mid-request never blocks the other channels.
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut discard = Vec::new();
        while self.base.in_flight() > 0 && Instant::now() < deadline {
            if self.base.poll(&mut discard) == 0 {
                match self.base.wake() {
                    Wake::At(t) => std::thread::sleep(t.saturating_duration_since(Instant::now())),
                    Wake::Event => {
                        if let Ok(r) = ThreadRing::current() {
                            r.wait(Some(Duration::from_millis(1)));
                        }
                    }
                    Wake::Immediate => {}
                }
            }
            discard.clear();
        }
        if self.base.in_flight() > 0 {
            tracing::error!("GCM channel closed with base I/O still in flight; keeping its locks");
            return;
        }
        for c in self.chunks.iter() {
            if c.locked {
                self.shared.unlock(c.md_first, c.md_count, c.writes());
            }
        }
    }
}

impl ChannelOps for GcmChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        if self.base_full() || !self.reqs.has_room() {
            return Err(io);
        }
        let layout = self.shared.layout;
        match io.io_type {
            IoType::Flush => {
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: ReqKind::Flush,
                        io,
                        next: 0,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                self.submit_base(IoRequest::no_data(
                    IoType::Flush,
                    0,
                    0,
                    sub_tag(slot, SUB_FLUSH),
                ));
            }
            IoType::Read | IoType::Write => {
                let write = io.io_type == IoType::Write;
                let len = (io.num_blocks as usize) << self.shift;
                let (md_first, md_count) = layout.md_span(io.offset_blocks, io.num_blocks);
                debug_assert!(md_count as usize * self.bs <= SMALL_BUF);
                if !self.chunks.has_room()
                    || !self.pool.can_take(SMALL_BUF)
                    || (write && !self.pool.can_take(len))
                {
                    return Err(io);
                }
                // The metadata buffer first: a small write's data may take the last small one.
                let md = self.pool.take(SMALL_BUF);
                let data = if write {
                    match self.pool.take(len) {
                        Some(d) => Some(d),
                        None => {
                            self.pool.put(md.expect("checked"));
                            return Err(io);
                        }
                    }
                } else {
                    None
                };
                let (lba, n) = (io.offset_blocks, io.num_blocks);
                let req = self
                    .reqs
                    .insert(Req {
                        kind: if write { ReqKind::Write } else { ReqKind::Read },
                        io,
                        next: n,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                let c = self
                    .chunks
                    .insert(Chunk {
                        req,
                        kind: if write {
                            ChunkKind::Write
                        } else {
                            ChunkKind::Read
                        },
                        lba,
                        n,
                        md_first,
                        md_count,
                        md,
                        data,
                        pending: 0,
                        locked: false,
                        status: IoStatus::Success,
                    })
                    .map_err(|_| ())
                    .expect("room checked");
                self.start_or_wait(c);
            }
            IoType::WriteZeroes | IoType::Unmap => {
                let op = if io.io_type == IoType::Unmap {
                    self.shared.unmap_op
                } else {
                    self.shared.zeroes_op
                };
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: ReqKind::Dealloc(op),
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
        while let Some(io) = self.retry.pop_front() {
            if let Err(io) = self.base.submit(io) {
                self.retry.push_front(io);
                break;
            }
        }
        for _ in 0..self.lock_wait.len() {
            let slot = self.lock_wait.pop_front().expect("counted");
            if !self.try_start(slot) {
                self.lock_wait.push_back(slot);
            }
        }
        let mut completions = std::mem::take(&mut self.scratch);
        self.base.poll(&mut completions);
        for c in completions.drain(..) {
            self.complete_sub(c, done);
        }
        self.scratch = completions;
        self.pump_waiting();
        done.len() - start
    }

    fn wake(&self) -> Wake {
        let front_can_issue = self.waiting.front().is_some_and(|&s| {
            self.reqs.get(s).in_flight < DEALLOC_CHUNKS_IN_FLIGHT
                && !self.base_full()
                && self.pool.can_take(MAX_TRANSFER_BYTES)
        });
        if front_can_issue
            || !self.lock_wait.is_empty()
            || (!self.retry.is_empty() && !self.base_full())
        {
            Wake::Immediate
        } else {
            self.base.wake()
        }
    }
}

#[cfg(test)]
mod tests;
