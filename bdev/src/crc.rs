//! `crc`: end-to-end data integrity on any base. Every logical block carries a CRC32C, kept in a
//! metadata region at the end of the base; computed on write, verified on read. A block whose
//! data or metadata changed behind the bdev's back fails its read with
//! [`IoStatus::IntegrityError`](crate::types::IoStatus::IntegrityError) (NVMe: End-to-end Guard
//! Check Error; virtio: IOERR).
//!
//! Layout, formatting, locking and the metadata read-modify-write are those of every
//! metadata-region bdev, described in [`crate::mdregion`]; what is particular to `crc` follows.
//!
//! # On-disk layout (base blocks of the bdev's block size `bs`)
//! ```text
//! block 0            header: magic "FBLKCRC1", version, block size, data blocks, metadata start,
//!                    CRC32C of the header
//! blocks 1 ..= D     data: block `lba` of the crc bdev is base block `1 + lba`
//! blocks 1 + D ..    metadata: one 4-byte little-endian entry per data block, `bs / 4` entries
//!                    per base block (1024 for 4 KiB blocks: 0.1% of the base)
//! ```
//! The header has no fields of its own: 4 zero bytes follow the common ones, and the CRC32C of
//! those 36 bytes ends it.
//!
//! # The entry convention
//! An entry is `CRC32C(block) XOR CRC32C(zero block)`. A zero block therefore has a zero entry,
//! so a never-written block (zero data, zero entry, as formatting leaves it), a zeroed one and
//! an unmapped one need no special case and no "written" bit: they verify like any other block
//! and read as zeroes. Non-zero data beside a zero entry fails, so clearing an entry is detected.
//!
//! What a per-block CRC does not detect: a block and its entry both rolled back to an older
//! consistent pair (a lost write of both), a write misdirected together with its entry, or a
//! deliberate forgery (CRC32C is not a MAC: use `crypt_gcm` for that).
//!
//! # Formatting
//! [`CrcBdev::open`] formats a base whose block 0 is all zeroes (see [`crate::mdregion`]). A base
//! whose block 0 is neither zero nor a crc header is refused, never formatted over, unless
//! [`Format::IfUnformatted`] says to format a block 0 without the magic (a base that does not
//! read zeroes when new).
//!
//! # Data path and concurrency
//! - Write: the CRCs are computed from the caller's buffer when the request arrives, and the
//!   data is written to the base from that buffer (no copy) as soon as the write holds its range
//!   locks, while its entries are patched in a read-modify-write of their metadata block(s). A
//!   caller that changes its buffer while its write is in flight gets integrity errors on those
//!   blocks.
//! - Read: the data goes straight into the caller's buffer while the covering metadata blocks
//!   are read into a channel buffer; then every block is verified.
//! - The CRCs are computed over a copy: each block of the caller's buffer (guest memory on the
//!   vhost path, which the guest may change at any moment) is copied once into a one-block
//!   channel buffer and summed there; the caller's memory is never seen as a `&[u8]`.
//! - Locks: *range locks* of 128 KiB of data, and *metadata block locks* held only for the
//!   read-modify-write (see [`crate::mdregion`] for who takes which, and why reads need no
//!   metadata lock). One metadata block covers 4 MiB of data (4 KiB blocks), so neighbouring
//!   writes from any channel serialize only that small step, not their data I/O.
//! - Each channel keeps, per op slot, one metadata buffer (sized for its largest request) and,
//!   per request slot, room for the CRCs of its largest write: no allocation per request.
//!
//! Mismatches are counted per bdev (`integrity_errors` in `describe()`, per failed block) and
//! logged at warn level once per LBA; the set of logged LBAs is bounded (4096), past which
//! failures are only counted ([`IntegrityLog`], shared with the other integrity-checking kinds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bdev::{Bdev, BdevInfo, Channel};
use crate::buf::{AlignedBuf, SgList};
use crate::error::BdevError;
use crate::integrity::IntegrityLog;
use crate::mdregion::{self, EntryOps, MdChannel, MdFormat, MdLayout, MdRegion, OpKind, OpenError};
pub use crate::stacked::Format;

/// The `kind` name of this bdev.
pub const KIND: &str = "crc";
/// Bytes of one metadata entry.
pub const ENTRY_BYTES: usize = 4;

/// Where things are on the base, in base blocks.
pub type CrcLayout = MdLayout;

/// The crc volume format.
const FORMAT: MdFormat = MdFormat {
    kind: KIND,
    volume: "crc volume",
    header: "crc header",
    magic: b"FBLKCRC1",
    version: 1,
    // The header CRC covers the common fields and 4 zero bytes.
    sum_at: 36,
    sum: crate::checksum::crc32c,
    entry_bytes: ENTRY_BYTES,
    range_bytes: Some(128 << 10),
    max_transfer_bytes: 1 << 20,
};
/// Most requests a crc channel keeps in flight.
const MAX_DEPTH: usize = 256;

/// Per-bdev state shared by the channels, besides the [`MdRegion`].
struct CrcShared {
    /// `CRC32C` of a zero block: entries are `CRC32C(block) ^ zero_crc`.
    zero_crc: u32,
    /// Blocks that failed their check: counted, and logged once per LBA.
    integrity: IntegrityLog,
    failed_reads: AtomicU64,
}

/// Computes the CRC32C of each `bs`-byte block of `bufs`, in order, calling `f(index, crc)`.
/// Each block is copied once into `block` (the channel's own buffer, `bs` bytes) and summed
/// there: on the vhost path the segments are guest memory the guest may change at any moment,
/// so they are read only with raw copies, never seen as a `&[u8]`. A trailing partial block
/// (which the layer never lets through) is not summed.
fn for_each_block_crc(bufs: &SgList, block: &mut [u8], mut f: impl FnMut(usize, u32)) {
    let bs = block.len();
    let (mut index, mut fill) = (0usize, 0usize);
    for s in bufs.segments() {
        let mut off = 0;
        while off < s.len {
            let n = (bs - fill).min(s.len - off);
            // SAFETY: `off + n <= s.len`, and the list's constructors guarantee every segment is
            // valid for reads of its length while the list lives (`bufs` is borrowed for the
            // whole loop); `fill + n <= bs`, inside `block`, our own buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(s.base.add(off), block.as_mut_ptr().add(fill), n)
            };
            off += n;
            fill += n;
            if fill == bs {
                f(index, crate::checksum::crc32c(block));
                index += 1;
                fill = 0;
            }
        }
    }
}

/// A CRC32C integrity bdev stacked on any bdev; see the module documentation.
pub struct CrcBdev {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    region: Arc<MdRegion>,
    shared: Arc<CrcShared>,
}

impl CrcBdev {
    /// Opens the crc volume on `base`, formatting the base first if its block 0 is all zeroes.
    pub fn open(name: &str, base: Arc<dyn Bdev>) -> Result<CrcBdev, BdevError> {
        CrcBdev::open_with(name, base, Format::IfZero)
    }

    /// Opens the crc volume on `base`, formatting the base first as `format` says.
    pub fn open_with(
        name: &str,
        base: Arc<dyn Bdev>,
        format: Format,
    ) -> Result<CrcBdev, BdevError> {
        let no_fields = |_: &[u8]| Ok::<(), std::convert::Infallible>(());
        let v = mdregion::open(name, &base, format, &FORMAT, |_| Ok(()), no_fields).map_err(
            |e| match e {
                OpenError::Bdev(e) => e,
                e => BdevError::invalid("base", format!("{}: {e}", base.info().name())),
            },
        )?;
        let bs = v.info.block_size().bytes() as usize;
        Ok(CrcBdev {
            info: v.info,
            base,
            region: v.region,
            shared: Arc::new(CrcShared {
                zero_crc: crate::checksum::crc32c(&vec![0u8; bs]),
                integrity: IntegrityLog::new("CRC32C mismatch"),
                failed_reads: AtomicU64::new(0),
            }),
        })
    }

    /// Where the header, data and metadata are on the base.
    pub fn layout(&self) -> CrcLayout {
        self.region.layout()
    }

    /// Blocks that failed their CRC check since the bdev was opened.
    pub fn integrity_errors(&self) -> u64 {
        self.shared.integrity.errors()
    }
}

impl Bdev for CrcBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth().min(MAX_DEPTH);
        let bs = self.info.block_size().bytes() as usize;
        let layout = self.region.layout();
        let max_transfer = u64::from(self.info.geometry().max_transfer_blocks);
        // Metadata blocks one read or write spans at most; unmap pieces use the same buffers.
        let md_buf_blocks = (max_transfer.div_ceil(layout.entries_per_block) + 1).max(2);
        let op_slots = mdregion::op_slots(depth);
        let align = (self.base.info().geometry().buf_align as usize).max(4096);
        let entries = CrcEntries {
            shared: self.shared.clone(),
            name: self.info.name().to_string(),
            crcs: (0..depth)
                .map(|_| vec![0u32; max_transfer as usize])
                .collect(),
            md_bufs: (0..op_slots)
                .map(|_| AlignedBuf::with_align(md_buf_blocks as usize * bs, align))
                .collect(),
            block: vec![0u8; bs],
        };
        let ops = MdChannel::new(
            base,
            self.region.clone(),
            entries,
            depth,
            md_buf_blocks as u32,
        );
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn describe(&self) -> serde_json::Value {
        let l = self.region.layout();
        serde_json::json!({
            "checksum": "crc32c",
            "data_start": l.data_start,
            "data_blocks": l.data_blocks,
            "metadata_start": l.md_start,
            "metadata_blocks": l.md_blocks,
            "integrity_errors": self.integrity_errors(),
            "failed_reads": self.shared.failed_reads.load(Ordering::Relaxed),
            "logged_lbas": self.shared.integrity.logged_lbas(),
        })
    }
}

/// What a crc channel keeps for itself: the CRCs of its writes and its metadata buffers.
struct CrcEntries {
    shared: Arc<CrcShared>,
    name: String,
    /// Per request slot: the CRCs of a write's blocks, computed when it arrives.
    crcs: Vec<Vec<u32>>,
    /// Free metadata buffers, one per op slot, so an op always finds one.
    md_bufs: Vec<AlignedBuf>,
    /// One block: each block of a caller's buffer is copied here once and summed.
    block: Vec<u8>,
}

impl EntryOps for CrcEntries {
    const NAME: &'static str = "crc";
    const WRITE_IN_PLACE: bool = true;

    fn take_bufs(
        &mut self,
        _kind: OpKind,
        md_len: usize,
        _data_len: usize,
    ) -> Option<(AlignedBuf, Option<AlignedBuf>)> {
        let b = self.md_bufs.pop()?;
        debug_assert!(b.len() >= md_len);
        Some((b, None))
    }

    fn can_take_dealloc(&self) -> bool {
        !self.md_bufs.is_empty()
    }

    fn put_buf(&mut self, buf: AlignedBuf) {
        self.md_bufs.push(buf);
    }

    fn prepare_write(&mut self, req: u32, bufs: &SgList) {
        let crcs = &mut self.crcs[req as usize];
        for_each_block_crc(bufs, &mut self.block, |i, crc| crcs[i] = crc);
    }

    fn patch(
        &mut self,
        req: u32,
        _lba: u64,
        _caller: &SgList,
        entries: &mut [u8],
        _data: Option<&mut [u8]>,
    ) {
        let zero_crc = self.shared.zero_crc;
        for (e, crc) in entries
            .chunks_exact_mut(ENTRY_BYTES)
            .zip(&self.crcs[req as usize])
        {
            e.copy_from_slice(&(crc ^ zero_crc).to_le_bytes());
        }
    }

    fn verify(&mut self, lba: u64, entries: &[u8], bufs: &mut SgList) -> bool {
        let zero_crc = self.shared.zero_crc;
        let mut bad = 0u32;
        let (shared, name) = (&self.shared, &self.name);
        for_each_block_crc(bufs, &mut self.block, |i, crc| {
            let e = &entries[i * ENTRY_BYTES..][..ENTRY_BYTES];
            let want = u32::from_le_bytes(e.try_into().expect("4 bytes"));
            if crc ^ zero_crc != want {
                bad += 1;
                shared.integrity.report(name, lba + i as u64);
            }
        });
        if bad > 0 {
            self.shared.failed_reads.fetch_add(1, Ordering::Relaxed);
        }
        bad == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::IoRequest;
    use crate::conformance;
    use crate::sync::SyncChannel;
    use crate::testing::{
        Rng, assert_each_tampered_block_fails, assert_reads_around_tampering, block_data, file,
        fill, flip, malloc, tamper_sampled, write_alternate_blocks_from_two_channels,
    };
    use crate::types::{BlockSize, IoStatus};

    #[test]
    fn block_crcs_are_summed_from_one_copy_across_any_segments() {
        let bs = 512;
        let mut buf = AlignedBuf::new(4 * bs + 100);
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 31 % 253) as u8;
        }
        let want: Vec<u32> = buf.as_slice()[..4 * bs]
            .chunks_exact(bs)
            .map(crate::checksum::crc32c)
            .collect();
        // Blocks inside one segment, straddling two and three, an empty segment, and a trailing
        // partial block (not summed).
        let l = SgList::from_buf_split(buf, &[512, 100, 0, 300, 50, 1062, 124]);
        let mut block = vec![0u8; bs];
        let mut got = Vec::new();
        for_each_block_crc(&l, &mut block, |i, crc| {
            assert_eq!(i, got.len());
            got.push(crc);
        });
        assert_eq!(got, want);
    }

    #[test]
    fn crc_passes_conformance_over_malloc_4k_and_512() {
        conformance::run(
            &|| Arc::new(CrcBdev::open("c", malloc(BlockSize::B4096, 2048)).unwrap()),
            false,
        );
        conformance::run(
            &|| Arc::new(CrcBdev::open("c", malloc(BlockSize::B512, 4096)).unwrap()),
            false,
        );
    }

    #[test]
    fn crc_passes_conformance_over_file_with_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.img");
        let open = || -> Arc<dyn Bdev> {
            Arc::new(CrcBdev::open("c", file(&path, BlockSize::B4096, 1024)).unwrap())
        };
        conformance::run(&open, true);
        // Reopened once more: everything the suite left verifies.
        let c = open();
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        let n = c.info().block_count();
        let mut lba = 0;
        while lba < n {
            let k = (n - lba).min(64) as u32;
            assert_eq!(ch.read(lba, k).0, IoStatus::Success, "lba {lba}");
            lba += u64::from(k);
        }
    }

    #[test]
    fn exposes_the_data_region_and_reads_never_written_blocks_as_zeroes() {
        let base = malloc(BlockSize::B4096, 4096);
        let c = CrcBdev::open("c", base).unwrap();
        let l = c.layout();
        assert_eq!(c.info().block_count(), l.data_blocks);
        assert_eq!(l.data_blocks, 4091, "4096 - header - 4 metadata blocks");
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        let (st, d) = ch.read(l.data_blocks - 8, 8);
        assert_eq!(st, IoStatus::Success);
        assert!(d.iter().all(|&b| b == 0));
        assert_eq!(c.integrity_errors(), 0);
    }

    #[test]
    fn the_header_is_the_crc_format() {
        let base = malloc(BlockSize::B4096, 256);
        drop(CrcBdev::open("c", base.clone()).unwrap());
        let (_, h) = SyncChannel::new(base.open_channel().unwrap()).read(0, 1);
        let mut want = vec![0u8; 4096];
        want[0..8].copy_from_slice(b"FBLKCRC1");
        want[8..12].copy_from_slice(&1u32.to_le_bytes());
        want[12..16].copy_from_slice(&4096u32.to_le_bytes());
        want[16..24].copy_from_slice(&254u64.to_le_bytes());
        want[24..32].copy_from_slice(&255u64.to_le_bytes());
        let crc = crate::checksum::crc32c(&want[..36]);
        want[36..40].copy_from_slice(&crc.to_le_bytes());
        assert!(h == want, "header {:02x?}", &h[..40]);
    }

    #[test]
    fn flipping_data_or_metadata_of_sampled_blocks_is_always_detected() {
        for bs in [BlockSize::B4096, BlockSize::B512] {
            let base = malloc(bs, 4096);
            let c = CrcBdev::open("c", base.clone()).unwrap();
            let b = bs.bytes() as usize;
            let mut ch = SyncChannel::new(c.open_channel().unwrap());
            let mut raw = SyncChannel::new(base.open_channel().unwrap());
            let (chosen, written) = tamper_sampled(&mut ch, &mut raw, &c.layout(), 200);
            assert_each_tampered_block_fails(&mut ch, &chosen);
            assert_eq!(c.integrity_errors(), 200);
            let d = c.describe();
            assert_eq!(d["integrity_errors"], 200);
            assert_eq!(d["failed_reads"], 200);
            assert_eq!(d["logged_lbas"], 200);
            // Read again: counted again, not logged again.
            assert_eq!(
                ch.read(*chosen.first().unwrap(), 1).0,
                IoStatus::IntegrityError
            );
            assert_eq!(c.describe()["logged_lbas"], 200);
            assert_eq!(c.integrity_errors(), 201);
            let t = assert_reads_around_tampering(&mut ch, &chosen, written);
            // Rewriting a flipped block heals it.
            assert_eq!(ch.write(t, &block_data(t, b, 2)), IoStatus::Success);
            assert_eq!(ch.read(t, 1), (IoStatus::Success, block_data(t, b, 2)));
        }
    }

    #[test]
    fn foreign_data_and_corrupted_headers_are_refused() {
        let base = malloc(BlockSize::B4096, 256);
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        assert_eq!(raw.write(0, &[7u8; 4096]), IoStatus::Success);
        let e = CrcBdev::open("c", base.clone()).err().unwrap();
        assert_eq!(e.field(), Some("base"));
        assert!(e.to_string().contains("refusing"), "{e}");
        assert_eq!(raw.write(0, &[0u8; 4096]), IoStatus::Success);
        drop(CrcBdev::open("c", base.clone()).unwrap());
        flip(&mut raw, 0, 20);
        let e = CrcBdev::open("c", base.clone()).err().unwrap();
        assert!(e.to_string().contains("corrupted"), "{e}");
        // `if_unformatted` formats a block 0 without the magic, never a damaged header.
        let e = CrcBdev::open_with("c", base.clone(), Format::IfUnformatted)
            .err()
            .unwrap();
        assert!(e.to_string().contains("corrupted"), "{e}");
        assert_eq!(raw.write(0, &[7u8; 4096]), IoStatus::Success);
        assert_eq!(raw.write(9, &[7u8; 4096]), IoStatus::Success);
        let c = CrcBdev::open_with("c", base.clone(), Format::IfUnformatted).unwrap();
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        assert_eq!(
            ch.read(8, 1),
            (IoStatus::Success, vec![0u8; 4096]),
            "data zeroed"
        );
        drop(ch);
        drop(c);
        drop(CrcBdev::open("c", base).unwrap());
    }

    #[test]
    fn unmap_and_write_zeroes_read_as_zeroes_and_keep_neighbours() {
        let base = malloc(BlockSize::B4096, 8192);
        let c = CrcBdev::open("c", base).unwrap();
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        let n = c.info().block_count();
        fill(&mut ch, n, 4096, 3);
        // Ranges crossing metadata blocks and several unmap pieces.
        assert_eq!(ch.unmap(1000, 3000), IoStatus::Success);
        assert_eq!(ch.write_zeroes(5000, 2100), IoStatus::Success);
        for lba in (0..n)
            .step_by(7)
            .chain([999, 1000, 3999, 4000, 4999, 5000, 7099, 7100])
        {
            let (st, d) = ch.read(lba, 1);
            assert_eq!(st, IoStatus::Success, "lba {lba}");
            let zero = (1000..4000).contains(&lba) || (5000..7100).contains(&lba);
            if zero {
                assert!(d.iter().all(|&x| x == 0), "lba {lba}");
            } else {
                assert!(d == block_data(lba, 4096, 3), "lba {lba}");
            }
        }
        assert_eq!(c.integrity_errors(), 0);
    }

    #[test]
    fn channels_writing_blocks_that_share_metadata_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.img");
        for base in [
            malloc(BlockSize::B4096, 1200),
            file(&path, BlockSize::B4096, 1200),
        ] {
            let c = CrcBdev::open("c", base).unwrap();
            write_alternate_blocks_from_two_channels(&c, 1024, |lba| block_data(lba, 4096, 4));
        }
    }

    #[test]
    fn reads_racing_writes_of_the_same_blocks_never_fail() {
        let c = CrcBdev::open("c", malloc(BlockSize::B4096, 512)).unwrap();
        let mut w = c.open_channel().unwrap();
        let mut r = c.open_channel().unwrap();
        let mut done = Vec::new();
        let mut rng = Rng(99);
        for round in 0..2000u64 {
            let lba = rng.below(64);
            let mut b = AlignedBuf::new(8192);
            b.as_mut_slice()[..4096].copy_from_slice(&block_data(lba, 4096, round as u8));
            b.as_mut_slice()[4096..].copy_from_slice(&block_data(lba + 1, 4096, round as u8));
            let write = IoRequest::write(lba, 2, SgList::from_buf(b), 0);
            let read = IoRequest::read(
                lba + rng.below(2),
                2,
                SgList::from_buf(AlignedBuf::new(8192)),
                1,
            );
            if round % 2 == 0 {
                w.submit(write).unwrap();
                r.submit(read).unwrap();
            } else {
                r.submit(read).unwrap();
                w.submit(write).unwrap();
            }
            while w.in_flight() + r.in_flight() > 0 {
                w.poll(&mut done);
                r.poll(&mut done);
            }
            for c in done.drain(..) {
                assert_eq!(c.status, IoStatus::Success, "round {round} tag {}", c.tag);
            }
        }
        assert_eq!(c.integrity_errors(), 0);
    }
}
