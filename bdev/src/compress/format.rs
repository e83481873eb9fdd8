//! The on-disk format of a compress volume (see the module documentation of
//! [`super`]): the superblock and its [`CompressLayout`], chunk map entries and pages, and
//! map-update log records and blocks, with their encoders, decoders and validation. Pure
//! functions over byte slices, so that the format can be reviewed and fuzzed alone.

use crate::types::BlockSize;

/// Bytes of one chunk map entry.
pub const ENTRY_BYTES: usize = 16;

pub(super) const MAGIC: &[u8; 8] = b"FBLKCMP1";
/// Format version: 2 added the map-update log.
pub(super) const VERSION: u32 = 2;
/// Superblock bytes the CRC covers (the CRC follows them).
pub(super) const SUPER_BYTES: usize = 84;
/// Superblock bytes of version 1 (no log).
pub(super) const SUPER_BYTES_V1: usize = 68;
pub(super) const PAGE_MAGIC: &[u8; 4] = b"FBCM";
pub(super) const PAGE_HEADER: usize = 32;
pub(super) const LOG_MAGIC: &[u8; 4] = b"FBCL";
pub(super) const LOG_HEADER: usize = 32;
/// Bytes of one log record: chunk (8), sequence number (8), entry (16).
pub(super) const RECORD_BYTES: usize = 32;
/// Most blocks of the map-update log (4 MiB of 4 KiB blocks).
pub(super) const MAX_LOG_BLOCKS: u64 = 1024;

pub(super) const K_UNMAPPED: u8 = 0;
pub(super) const K_RAW: u8 = 1;
pub(super) const K_LZ4: u8 = 2;
pub(super) const K_ZSTD: u8 = 3;

/// One chunk map entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Entry {
    /// First base block of the run (0: unmapped).
    pub(super) block: u64,
    /// Stored bytes.
    pub(super) len: u32,
    pub(super) kind: u8,
    /// CRC32C of the stored bytes.
    pub(super) crc: u32,
}

impl Entry {
    pub(super) fn is_mapped(&self) -> bool {
        self.kind != K_UNMAPPED
    }

    pub(super) fn blocks(&self, shift: u32) -> u64 {
        u64::from(self.len).div_ceil(1 << shift)
    }

    pub(super) fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.block.to_le_bytes());
        out[6] = self.kind;
        out[7] = 0;
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.crc.to_le_bytes());
    }

    pub(super) fn decode(b: &[u8]) -> Entry {
        let mut block = [0u8; 8];
        block[..6].copy_from_slice(&b[..6]);
        Entry {
            block: u64::from_le_bytes(block),
            kind: b[6],
            len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        }
    }
}

/// Where things are on the base, in base blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressLayout {
    /// Block size of the base and of the compress bdev.
    pub block_size: BlockSize,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Logical chunks.
    pub chunks: u64,
    /// Entries per map page.
    pub entries_per_page: u64,
    /// First map block.
    pub map_start: u64,
    /// Map pages (each has two slots, so the map takes `2 * map_pages` blocks).
    pub map_pages: u64,
    /// First block of the data region.
    pub data_start: u64,
    /// Blocks of the data region.
    pub data_blocks: u64,
    /// First block of the map-update log (right after the data region).
    pub log_start: u64,
    /// Blocks of the map-update log.
    pub log_blocks: u64,
}

impl CompressLayout {
    /// The layout of `chunks` chunks of `chunk_size` on a base of `base_blocks` blocks, if the
    /// map fits with at least one chunk's worth of data blocks.
    pub fn new(
        bs: BlockSize,
        chunk_size: u32,
        chunks: u64,
        base_blocks: u64,
    ) -> Option<CompressLayout> {
        CompressLayout::with_log(bs, chunk_size, chunks, base_blocks, true)
    }

    /// The layout of [`CompressLayout::new`], or without a log (version 1) if `log` is false.
    fn with_log(
        bs: BlockSize,
        chunk_size: u32,
        chunks: u64,
        base_blocks: u64,
        log: bool,
    ) -> Option<CompressLayout> {
        let epp = (u64::from(bs.bytes()) - PAGE_HEADER as u64) / ENTRY_BYTES as u64;
        let map_pages = chunks.div_ceil(epp);
        let map_start = 1;
        let data_start = map_start + 2 * map_pages;
        let rest = base_blocks.checked_sub(data_start)?;
        let log_blocks = if log {
            (rest / 16).clamp(2, MAX_LOG_BLOCKS)
        } else {
            0
        };
        let data_blocks = rest.checked_sub(log_blocks)?;
        (data_blocks >= u64::from(chunk_size >> bs.shift())).then_some(CompressLayout {
            block_size: bs,
            chunk_size,
            chunks,
            entries_per_page: epp,
            map_start,
            map_pages,
            data_start,
            data_blocks,
            log_start: if log { data_start + data_blocks } else { 0 },
            log_blocks,
        })
    }

    /// Log records per log block.
    pub fn records_per_log_block(&self) -> usize {
        (self.block_size.bytes() as usize - LOG_HEADER) / RECORD_BYTES
    }

    /// The base block of slot `slot` (0 or 1) of map page `page`.
    pub fn page_block(&self, page: u64, slot: u64) -> u64 {
        self.map_start + 2 * page + slot
    }

    /// The map page holding chunk `chunk`'s entry, and the entry's byte offset in it.
    pub fn entry_of(&self, chunk: u64) -> (u64, usize) {
        (
            chunk / self.entries_per_page,
            PAGE_HEADER + (chunk % self.entries_per_page) as usize * ENTRY_BYTES,
        )
    }

    pub(super) fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.block_size.bytes().to_le_bytes());
        out[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.chunks.to_le_bytes());
        out[32..40].copy_from_slice(&self.map_start.to_le_bytes());
        out[40..48].copy_from_slice(&self.map_pages.to_le_bytes());
        out[48..56].copy_from_slice(&self.data_start.to_le_bytes());
        out[56..64].copy_from_slice(&self.data_blocks.to_le_bytes());
        out[64..68].copy_from_slice(&(self.entries_per_page as u32).to_le_bytes());
        out[68..76].copy_from_slice(&self.log_start.to_le_bytes());
        out[76..84].copy_from_slice(&self.log_blocks.to_le_bytes());
        let crc = crate::checksum::crc32c(&out[..SUPER_BYTES]);
        out[SUPER_BYTES..SUPER_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a superblock: the layout, and whether it is of version 1 (no log; its layout
    /// has `log_blocks` 0 and a data region up to the end of the volume).
    pub(super) fn decode(b: &[u8]) -> Result<(CompressLayout, bool), String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..8] != MAGIC {
            return Err("block 0 is neither zero nor a compress superblock; \
                        refusing to format over existing data"
                .into());
        }
        let version = u32_at(8);
        let crc_at = match version {
            1 => SUPER_BYTES_V1,
            VERSION => SUPER_BYTES,
            _ => {
                return Err(format!(
                    "compress format version {version} is not supported (this build reads 1 \
                     and {VERSION})"
                ));
            }
        };
        if crate::checksum::crc32c(&b[..crc_at]) != u32_at(crc_at) {
            return Err("the compress superblock is corrupted (CRC mismatch)".into());
        }
        let bs = BlockSize::new(u32_at(12)).ok_or("the superblock has a bad block size")?;
        let mut l = CompressLayout {
            block_size: bs,
            chunk_size: u32_at(16),
            chunks: u64_at(24),
            map_start: u64_at(32),
            map_pages: u64_at(40),
            data_start: u64_at(48),
            data_blocks: u64_at(56),
            entries_per_page: u64::from(u32_at(64)),
            log_start: 0,
            log_blocks: 0,
        };
        let v1 = version == 1;
        if !v1 {
            l.log_start = u64_at(68);
            l.log_blocks = u64_at(76);
        }
        // Untrusted fields: their sum may overflow.
        let expect = l
            .data_start
            .checked_add(l.data_blocks)
            .and_then(|end| end.checked_add(l.log_blocks))
            .and_then(|base_blocks| {
                CompressLayout::with_log(bs, l.chunk_size, l.chunks, base_blocks, !v1)
            });
        if expect != Some(l) {
            return Err("the compress superblock has an inconsistent layout".into());
        }
        Ok((l, v1))
    }

    /// The version-1 layout of the same geometry: the data region runs to the end.
    #[cfg(test)]
    pub(super) fn without_log(mut self) -> CompressLayout {
        self.data_blocks += self.log_blocks;
        self.log_start = 0;
        self.log_blocks = 0;
        self
    }
}

/// Checks that a mapped entry is well formed and its run lies in the data region.
pub(super) fn check_entry(e: &Entry, l: &CompressLayout) -> Result<(), String> {
    let shift = l.block_size.shift();
    let ok_kind = match e.kind {
        K_RAW => e.len == l.chunk_size,
        K_LZ4 | K_ZSTD => e.len > 0 && e.len < l.chunk_size,
        _ => false,
    };
    if !ok_kind {
        return Err(format!("bad entry {e:?}"));
    }
    let n = e.blocks(shift);
    if e.block < l.data_start || e.block + n > l.data_start + l.data_blocks {
        return Err(format!("run {}+{n} lies outside the data region", e.block));
    }
    Ok(())
}

/// The CRC32C a map page or log block stores (bytes 4..8 of its header) and the CRC32C of the
/// block with that field zero: equal if the block is intact.
fn header_crcs(b: &[u8]) -> (u32, u32) {
    let stored = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    let mut crc = crate::checksum::crc32c(&b[..4]);
    crc = crate::checksum::crc32c_append(crc, &[0; 4]);
    crc = crate::checksum::crc32c_append(crc, &b[8..]);
    (stored, crc)
}

/// Decodes one map page slot: `Some((seq, page bytes))` if it is valid (an all-zero block is a
/// valid empty page with sequence 0).
pub(super) fn valid_page(b: &[u8], page: u64) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    if &b[0..4] != PAGE_MAGIC {
        return None;
    }
    let (stored, crc) = header_crcs(b);
    let seq = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    // A sequence number that cannot be incremented is no version a checkpoint wrote.
    (crc == stored && index == page && seq > 0 && seq < u64::MAX).then_some(seq)
}

/// Encodes map page `page` with sequence `seq`, covering the log records up to `covered`, from
/// `entries` into `out` (one block).
pub(super) fn encode_page(
    out: &mut [u8],
    page: u64,
    seq: u64,
    covered: u64,
    entries: &[Entry],
    l: &CompressLayout,
) {
    out.fill(0);
    out[0..4].copy_from_slice(PAGE_MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&page.to_le_bytes());
    out[24..32].copy_from_slice(&covered.to_le_bytes());
    let first = (page * l.entries_per_page) as usize;
    let last = (first + l.entries_per_page as usize).min(entries.len());
    for (i, e) in entries[first..last].iter().enumerate() {
        e.encode(&mut out[PAGE_HEADER + i * ENTRY_BYTES..][..ENTRY_BYTES]);
    }
    let crc = crate::checksum::crc32c(out);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Checks an entry read from the volume: unmapped (all zero) or well formed.
pub(super) fn check_any_entry(e: &Entry, l: &CompressLayout) -> Result<(), String> {
    if e.is_mapped() {
        check_entry(e, l)
    } else if *e != Entry::default() {
        Err("unmapped entry with data".into())
    } else {
        Ok(())
    }
}

/// Whether a log block is valid (magic, CRC): its record count if so.
pub(super) fn valid_log_block(b: &[u8], per_block: usize) -> Option<usize> {
    if &b[0..4] != LOG_MAGIC {
        return None;
    }
    let (stored, crc) = header_crcs(b);
    let count = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
    (crc == stored && count <= per_block).then_some(count)
}

/// Encodes one log record.
pub(super) fn encode_record(out: &mut [u8], chunk: u64, seq: u64, e: &Entry) {
    out[0..8].copy_from_slice(&chunk.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    e.encode(&mut out[16..32]);
}

/// Seals a log block of `count` records (header and CRC).
pub(super) fn seal_log_block(out: &mut [u8], count: usize, pos: u64) {
    out[0..4].copy_from_slice(LOG_MAGIC);
    out[4..8].fill(0);
    out[8..12].copy_from_slice(&(count as u32).to_le_bytes());
    out[12..16].fill(0);
    out[16..24].copy_from_slice(&pos.to_le_bytes());
    out[24..32].fill(0);
    out[LOG_HEADER + count * RECORD_BYTES..].fill(0);
    let crc = crate::checksum::crc32c(out);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_pages_round_trip() {
        let e = Entry {
            block: 0x0012_3456_789a,
            len: 5000,
            kind: K_LZ4,
            crc: 0xdead_beef,
        };
        let mut b = [0u8; 16];
        e.encode(&mut b);
        assert_eq!(Entry::decode(&b), e);
        let l = CompressLayout::new(BlockSize::B4096, 16384, 1000, 10_000).unwrap();
        assert_eq!(l.entries_per_page, 254);
        assert_eq!(l.map_pages, 4);
        assert_eq!(l.data_start, 9);
        assert_eq!(l.log_blocks, (10_000 - 9) / 16);
        assert_eq!(l.log_start + l.log_blocks, 10_000);
        assert_eq!(l.data_start + l.data_blocks, l.log_start);
        let mut entries = vec![Entry::default(); 1000];
        entries[300] = e;
        let mut page = vec![0u8; 4096];
        encode_page(&mut page, 1, 7, 5, &entries, &l);
        assert_eq!(valid_page(&page, 1), Some(7));
        assert_eq!(valid_page(&page, 2), None, "misdirected");
        let (p, off) = l.entry_of(300);
        assert_eq!(p, 1);
        assert_eq!(Entry::decode(&page[off..off + 16]), e);
        page[100] ^= 1;
        assert_eq!(valid_page(&page, 1), None, "torn");
        assert_eq!(valid_page(&[0u8; 4096], 3), Some(0));
        let mut sb = vec![0u8; 4096];
        l.encode(&mut sb);
        assert_eq!(CompressLayout::decode(&sb), Ok((l, false)));
        let mut rec = [0u8; 4096];
        encode_record(&mut rec[LOG_HEADER..LOG_HEADER + RECORD_BYTES], 300, 9, &e);
        seal_log_block(&mut rec, 1, 0);
        assert_eq!(valid_log_block(&rec, l.records_per_log_block()), Some(1));
        rec[LOG_HEADER + 3] ^= 1;
        assert_eq!(
            valid_log_block(&rec, l.records_per_log_block()),
            None,
            "torn"
        );
    }
}
