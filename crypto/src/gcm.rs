//! `crypt_gcm`: AES-256-GCM authenticated encryption. Every block carries a fresh 96-bit nonce
//! and a 16-byte tag, kept in a metadata region at the end of the base; any change to a block's
//! ciphertext or metadata makes its read fail with
//! [`IoStatus::IntegrityError`](ferroblk_bdev::IoStatus::IntegrityError).
//!
//! Layout, formatting, locking and the metadata read-modify-write are those of every
//! metadata-region bdev, described in [`ferroblk_bdev::mdregion`]; what is particular to
//! `crypt_gcm` follows.
//!
//! # On-disk layout (base blocks of the GCM bdev's block size `bs`)
//! ```text
//! block 0                 header: magic, version, geometry, volume id, key check value, CRC-32
//! blocks 1 ..= D          data: block `lba` of the GCM bdev is base block `1 + lba`
//! blocks 1 + D ..         metadata: one 32-byte entry per data block, `bs / 32` per base block
//! ```
//! The header's own fields follow the common ones: volume id (16 bytes) | key check nonce (12) |
//! key check tag (16) | key check ciphertext (16), then the IEEE CRC-32 of those 92 bytes. An
//! entry is `nonce (12) | tag (16) | reserved (4, zero)`. The GCM bdev exposes about 99.2% of the
//! base.
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
//! # Engines
//! The AES-256-GCM itself is `GcmCipher`'s (`gcm/cipher.rs`), which picks once, when the
//! bdev opens, the fastest engine the CPU runs (`describe` reports it as `engine`):
//! `vaes-avx512` (VAES and VPCLMULQDQ on zmm registers, CTR and GHASH of 16 blocks per
//! iteration in one pass), `aes-ni` (AES-NI and PCLMULQDQ, 8 blocks per iteration) or
//! `portable` (the `aes-gcm` crate, the reference the others are tested against). All give the same ciphertext and tag
//! (NIST SP 800-38D), so volumes move freely between machines. A block that fails its check
//! keeps its ciphertext (the one-pass engines encrypt it back).
//!
//! # Formatting
//! [`GcmBdev::open`] formats a base whose block 0 is all zeroes, drawing the volume id and
//! writing the key check value (see [`ferroblk_bdev::mdregion`] for the rest). A base whose
//! block 0 is neither zero nor a GCM header is refused, never formatted over.
//!
//! # Data path
//! - Read: the base reads the data into a pool buffer while the channel reads the covering
//!   metadata blocks into another; every block is verified and decrypted in place in the pool
//!   buffer, and only once every tag has checked is the plaintext copied, once, into the
//!   caller's buffer. If any block fails, the whole caller buffer is zeroed and the read
//!   completes with `IntegrityError`: the caller's buffer (guest memory on the vhost path, which
//!   the guest can read at any moment) never holds unauthenticated plaintext, and the cipher
//!   never runs over it. A read finding no pool buffer is handed back (back-pressure), as a
//!   write is.
//! - Write: the metadata blocks are read, the caller's data is copied into a pool buffer and
//!   encrypted there (the caller's buffer is never modified), the entries are patched, then the
//!   data and the metadata blocks are written together. The request completes when both are.
//!   A crash between the two leaves the block failing its check (a torn write shows as
//!   `IntegrityError`, not as old or new data).
//! - Metadata blocks are shared by neighbouring data blocks, possibly written by channels on
//!   other reactors: each op takes a lock per metadata block (the metadata region's range locks,
//!   one per metadata block: striped, shared by all channels, never waited on while holding
//!   another) for its whole read-modify-write, data included; readers take it shared, so a read
//!   never sees a half-updated block.
//! - Write-zeroes and unmap clear the entries (read-modify-write of the metadata) and zero the
//!   data range in the base, as in every metadata-region bdev.
//! - Flush: passed through (a write completes only once its data and metadata both have).

use std::sync::Arc;

use ferroblk_bdev::integrity::IntegrityLog;
use ferroblk_bdev::mdregion::{
    self, EntryOps, MdChannel, MdFormat, MdLayout, MdRegion, OpKind, OpenError,
};
use ferroblk_bdev::stacked::Format;
use ferroblk_bdev::{AlignedBuf, Bdev, BdevError, BdevInfo, Channel, SgList};

use crate::common::{BufPool, MAX_TRANSFER_BYTES, SMALL_BUF, transform_units};
use crate::error::CryptoError;
use crate::key::{AES256_KEY_LEN, Key, KeyError};

use cipher::GcmCipher;

/// The `kind` name of this bdev.
pub const KIND: &str = "crypt_gcm";
/// Bytes of one metadata entry.
pub const ENTRY_BYTES: usize = 32;

/// Where things are on the base, in base blocks.
pub type GcmLayout = MdLayout;

const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
/// Header bytes that are the key check's AAD (magic through volume id).
const HEADER_AAD: usize = 48;

/// The GCM volume format.
const FORMAT: MdFormat = MdFormat {
    kind: KIND,
    volume: "GCM volume",
    header: "GCM volume header",
    magic: b"FBLKGCM1",
    version: 1,
    // Common fields, volume id, key check nonce, tag and ciphertext.
    sum_at: 92,
    sum: crc32,
    entry_bytes: ENTRY_BYTES,
    // One lock per metadata block, held for the whole read-modify-write.
    range_bytes: None,
    max_transfer_bytes: MAX_TRANSFER_BYTES as u64,
};

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

fn random<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(KeyError::Random)?;
    Ok(b)
}

/// Per-bdev state shared by its channels, besides the [`MdRegion`].
struct GcmShared {
    cipher: GcmCipher,
    volume_id: [u8; 16],
    /// The bdev's name, for the log.
    name: String,
    /// Blocks that failed authentication: counted, and logged once per LBA.
    integrity: IntegrityLog,
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
    region: Arc<MdRegion>,
    shared: Arc<GcmShared>,
}

impl GcmBdev {
    /// Opens the AES-256-GCM volume on `base` with a 32-byte key, formatting the base first if
    /// its block 0 is all zeroes. Fails with [`CryptoError::WrongKey`] if the key is not the
    /// volume's.
    pub fn open(name: &str, base: Arc<dyn Bdev>, key: Key) -> Result<GcmBdev, CryptoError> {
        let base_name = base.info().name().to_string();
        let key_err = |source| CryptoError::Key {
            name: name.into(),
            source,
        };
        if key.len() != AES256_KEY_LEN {
            return Err(key_err(KeyError::Length {
                what: "AES-256-GCM",
                need: AES256_KEY_LEN,
                got: key.len(),
            }));
        }
        let cipher = GcmCipher::new(key.expose().try_into().expect("checked: 32 bytes"));
        drop(key);
        // The key check value: 16 zero bytes encrypted with the header up to the volume id as
        // AAD, after the volume id and the nonce.
        let init_header = |hb: &mut [u8]| {
            let volume_id: [u8; 16] = random().map_err(key_err)?;
            let nonce: [u8; NONCE_BYTES] = random().map_err(key_err)?;
            hb[32..48].copy_from_slice(&volume_id);
            hb[48..60].copy_from_slice(&nonce);
            let mut ct = [0u8; 16];
            let tag = cipher.encrypt(&nonce, &hb[..HEADER_AAD], &mut ct);
            hb[60..76].copy_from_slice(&tag);
            hb[76..92].copy_from_slice(&ct);
            Ok(())
        };
        let check_header = |b: &[u8]| {
            let mut ct: [u8; 16] = b[76..92].try_into().expect("16 bytes");
            let nonce: &[u8; NONCE_BYTES] = b[48..60].try_into().expect("12 bytes");
            let tag: &[u8; TAG_BYTES] = b[60..76].try_into().expect("16 bytes");
            let ok = cipher.decrypt(nonce, &b[..HEADER_AAD], &mut ct, tag);
            if !ok || ct != [0u8; 16] {
                return Err(CryptoError::WrongKey {
                    name: name.into(),
                    base: base_name.clone(),
                });
            }
            Ok(())
        };
        let v = mdregion::open(
            name,
            &base,
            Format::IfZero,
            &FORMAT,
            init_header,
            check_header,
        )
        .map_err(|e| match e {
            OpenError::Volume(reason) => CryptoError::Volume {
                name: name.into(),
                base: base_name.clone(),
                reason,
            },
            OpenError::BaseIo { what, status } => CryptoError::BaseIo {
                name: name.into(),
                base: base_name.clone(),
                what,
                status,
            },
            OpenError::Bdev(source) => CryptoError::Bdev {
                name: name.into(),
                source,
            },
            OpenError::Kind(e) => e,
        })?;
        Ok(GcmBdev {
            info: v.info,
            base,
            region: v.region,
            shared: Arc::new(GcmShared {
                cipher,
                volume_id: v.header[32..48].try_into().expect("16 bytes"),
                name: name.into(),
                integrity: IntegrityLog::new("AES-256-GCM authentication failed"),
            }),
        })
    }

    /// Where the header, data and metadata are on the base.
    pub fn layout(&self) -> GcmLayout {
        self.region.layout()
    }

    /// Reads that failed authentication since the bdev was opened.
    pub fn integrity_errors(&self) -> u64 {
        self.shared.integrity.errors()
    }
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
        // An unmap piece's metadata fills at most one large pool buffer.
        let dealloc_md_blocks =
            ((MAX_TRANSFER_BYTES / bs) as u32).min(base.info().geometry().max_transfer_blocks);
        let entries = GcmEntries {
            cipher: self.shared.cipher.clone(),
            shared: self.shared.clone(),
            bs,
            nonce_prefix: prefix,
            nonce_counter: u64::from_le_bytes(start),
            pool: BufPool::new(self.base.info().geometry().buf_align as usize),
            bounce: vec![0u8; bs],
        };
        let ops = MdChannel::new(base, self.region.clone(), entries, depth, dealloc_md_blocks);
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn describe(&self) -> serde_json::Value {
        let l = self.region.layout();
        let id: String = self
            .shared
            .volume_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        serde_json::json!({
            "cipher": "aes-256-gcm",
            "engine": self.shared.cipher.engine().name(),
            "volume_id": id,
            "data_start": l.data_start,
            "data_blocks": l.data_blocks,
            "metadata_start": l.md_start,
            "metadata_blocks": l.md_blocks,
            "integrity_errors": self.integrity_errors(),
            "logged_lbas": self.shared.integrity.logged_lbas(),
        })
    }
}

/// What a GCM channel keeps for itself: its cipher, its nonce sequence and its buffer pool.
struct GcmEntries {
    cipher: GcmCipher,
    shared: Arc<GcmShared>,
    bs: usize,
    nonce_prefix: [u8; 4],
    nonce_counter: u64,
    pool: BufPool,
    bounce: Vec<u8>,
}

impl GcmEntries {
    fn next_nonce(&mut self) -> [u8; NONCE_BYTES] {
        let mut n = [0u8; NONCE_BYTES];
        n[..4].copy_from_slice(&self.nonce_prefix);
        n[4..].copy_from_slice(&self.nonce_counter.to_le_bytes());
        self.nonce_counter = self.nonce_counter.wrapping_add(1);
        n
    }
}

impl EntryOps for GcmEntries {
    const NAME: &'static str = "GCM";
    const WRITE_IN_PLACE: bool = false;

    fn take_bufs(
        &mut self,
        kind: OpKind,
        md_len: usize,
        data_len: usize,
    ) -> Option<(AlignedBuf, Option<AlignedBuf>)> {
        match kind {
            OpKind::Dealloc(_) => {
                debug_assert!(md_len <= MAX_TRANSFER_BYTES);
                Some((self.pool.take_large()?, None))
            }
            // A read gets a data buffer too: the base reads into it, blocks are checked and
            // decrypted there and copied to the caller once (`verify_own`).
            OpKind::Read | OpKind::Write => {
                debug_assert!(md_len <= SMALL_BUF);
                // The metadata buffer first: a small request's data may take the last small one.
                let md = self.pool.take(SMALL_BUF)?;
                match self.pool.take(data_len) {
                    Some(data) => Some((md, Some(data))),
                    None => {
                        self.pool.put(md);
                        None
                    }
                }
            }
        }
    }

    fn can_take_dealloc(&self) -> bool {
        self.pool.can_take(MAX_TRANSFER_BYTES)
    }

    fn put_buf(&mut self, buf: AlignedBuf) {
        self.pool.put(buf);
    }

    /// Encrypts the caller's data into the op's buffer with a fresh nonce per block, and
    /// records nonces and tags in the entries.
    fn patch(
        &mut self,
        _req: u32,
        lba: u64,
        caller: &SgList,
        entries: &mut [u8],
        data: Option<&mut [u8]>,
    ) {
        let data = data.expect("a GCM write has its own data buffer");
        caller.copy_to_slice(0, data);
        let units = data.chunks_exact_mut(self.bs);
        for (i, (unit, e)) in units.zip(entries.chunks_exact_mut(ENTRY_BYTES)).enumerate() {
            let nonce = self.next_nonce();
            let tag =
                self.cipher
                    .encrypt(&nonce, &aad(lba + i as u64, &self.shared.volume_id), unit);
            e[..NONCE_BYTES].copy_from_slice(&nonce);
            e[NONCE_BYTES..NONCE_BYTES + TAG_BYTES].copy_from_slice(&tag);
            e[NONCE_BYTES + TAG_BYTES..].fill(0);
        }
    }

    /// Verifies and decrypts blocks read into the caller's buffer, each copied once into the
    /// channel's one-block buffer and checked there, its plaintext copied back only once its
    /// tag has checked; stops at the first that fails, leaving that block's ciphertext in the
    /// caller's buffer. (The channel's reads have their own buffer and use
    /// [`EntryOps::verify_own`]; this is the check of a caller's buffer.)
    fn verify(&mut self, lba0: u64, entries: &[u8], bufs: &mut SgList) -> bool {
        let (cipher, volume_id) = (&self.cipher, &self.shared.volume_id);
        let mut ok = true;
        let mut unit_index = 0;
        transform_units(bufs, self.bs, &mut self.bounce, |i, unit| {
            unit_index = i;
            ok = open_block(cipher, volume_id, lba0 + i as u64, entry(entries, i), unit);
            ok
        });
        self.count_failure(lba0 + unit_index as u64, ok)
    }

    /// Verifies and decrypts, in place, blocks read into the op's own buffer (the channel's
    /// memory, never the caller's); stops at the first that fails. The channel copies the
    /// plaintext to the caller only when every block passed.
    fn verify_own(&mut self, lba0: u64, entries: &[u8], data: &mut [u8]) -> bool {
        let (cipher, volume_id) = (&self.cipher, &self.shared.volume_id);
        let failed = data
            .chunks_exact_mut(self.bs)
            .enumerate()
            .position(|(i, unit)| {
                !open_block(cipher, volume_id, lba0 + i as u64, entry(entries, i), unit)
            });
        self.count_failure(lba0 + failed.unwrap_or(0) as u64, failed.is_none())
    }
}

impl GcmEntries {
    /// Counts and logs a read whose block `lba` failed authentication; returns `ok`.
    fn count_failure(&self, lba: u64, ok: bool) -> bool {
        if !ok {
            // A security event: logged at warn level with the bdev and the failing block, once
            // per LBA and within a bound, so a tampered base cannot flood the log.
            self.shared.integrity.report(&self.shared.name, lba);
        }
        ok
    }
}

/// The metadata entry of block `i` of a request.
fn entry(entries: &[u8], i: usize) -> &[u8] {
    &entries[i * ENTRY_BYTES..][..ENTRY_BYTES]
}

/// Checks block `lba` (in `unit`, our own memory) against its entry `e` and decrypts it in
/// place; false if it fails. A never-written block (all-zero entry) must be all zeroes.
fn open_block(
    cipher: &GcmCipher,
    volume_id: &[u8; 16],
    lba: u64,
    e: &[u8],
    unit: &mut [u8],
) -> bool {
    if e.iter().all(|&b| b == 0) {
        unit.iter().all(|&b| b == 0)
    } else {
        e[NONCE_BYTES + TAG_BYTES..].iter().all(|&b| b == 0)
            && cipher.decrypt(
                e[..NONCE_BYTES].try_into().expect("12 bytes"),
                &aad(lba, volume_id),
                unit,
                e[NONCE_BYTES..NONCE_BYTES + TAG_BYTES]
                    .try_into()
                    .expect("16 bytes"),
            )
    }
}

mod cipher;
#[cfg(test)]
mod cipher_tests;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;
