//! virtio-blk request parsing (virtio 1.2 §5.2.6): a pure function from a descriptor chain to
//! what the device does with it.
//!
//! [`parse_request`] reads the request header (and, for discard and write-zeroes, the one
//! range segment) from the chain's device-readable buffers and finds its data buffers and
//! status byte. It has no effect on the queue, the slot of the request or the bdev: it returns
//! the bdev request to submit, or the status to complete with at once, and leaves the data
//! segments in a caller-owned vector (recycled from request to request, so that parsing
//! allocates nothing). The poller ([`crate::queue::VqPoller`]) acts on the answer.

use std::sync::atomic::Ordering;

use ferroblk_bdev::{IoSeg, IoType, MAX_EXPORT_IO_BYTES};

use crate::queue::BlkParams;
use crate::spec::{
    ID_BYTES, S_IOERR, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
    WZ_FLAG_UNMAP,
};
use crate::virtq::Buf;

/// Bytes of the request header (`struct virtio_blk_req`: le32 type, le32 reserved, le64
/// sector; §5.2.6).
const HEADER_BYTES: usize = 16;
/// Bytes of one discard / write-zeroes range (`struct virtio_blk_discard_write_zeroes`: le64
/// sector, le32 num_sectors, le32 flags; §5.2.6).
const RANGE_BYTES: usize = 16;
/// The unit of virtio-blk sector numbers (§5.2.6: always 512 bytes).
const SECTOR_BYTES: u64 = 512;
/// The most sectors one discard or write-zeroes range may cover: the device's
/// `max_discard_sectors` and `max_write_zeroes_sectors` (1 GiB; §5.2.4).
pub const MAX_DISCARD_SECTORS: u32 = ((1u64 << 30) / SECTOR_BYTES) as u32;

/// A chain that breaks the ring protocol itself: the queue stops (the device needs a reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The last descriptor is not a device-writable buffer of at least one byte (or lies
    /// outside guest memory), so there is no place for the status (§5.2.6).
    #[error("has no writable status byte")]
    NoStatusByte,
}

/// What the device does with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Submit one bdev request. Its data (read and write only) are the segments
    /// [`parse_request`] left in `segs`; flush, discard and write-zeroes carry none.
    Submit {
        /// The bdev operation.
        io_type: IoType,
        /// First block.
        offset_blocks: u64,
        /// Blocks (0 for a flush).
        num_blocks: u32,
        /// Bytes the device writes into the chain when the request succeeds, the status byte
        /// included (the `len` of its used element, §2.7.8).
        written: u32,
    },
    /// `VIRTIO_BLK_T_GET_ID`: write the first `len` bytes of the serial number into the
    /// segments left in `segs` (see [`write_id`]), then complete with `VIRTIO_BLK_S_OK`.
    GetId {
        /// Bytes of the answer (1 to [`ID_BYTES`]).
        len: usize,
    },
    /// Complete at once with this status (`VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`).
    Complete(u8),
}

/// A chain parsed: where its status byte is and what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The status byte: the last byte of the chain, device-writable guest memory.
    pub status: *mut u8,
    /// What the device does.
    pub action: Action,
}

/// Parses the virtio-blk request in `chain` (its buffers as [`SplitQueue::read_chain`]
/// translated them) for a disk described by `params`.
///
/// The data segments of a read, write or GET_ID are left in `segs` (cleared first; its
/// capacity is reused). A request the device refuses (a malformed header, a misaligned or
/// overflowing range, too many segments, a readable buffer after a writable one, an unknown
/// type) is an [`Action::Complete`] with its status; only a chain without a status byte is an
/// error. Reads guest memory (the header and range segment, each copied once) and writes
/// nothing.
///
/// [`SplitQueue::read_chain`]: crate::virtq::SplitQueue::read_chain
#[inline]
pub fn parse_request(
    chain: &[Buf],
    params: &BlkParams,
    segs: &mut Vec<IoSeg>,
) -> Result<Parsed, ChainError> {
    let last = match chain.last() {
        Some(b) if b.write && b.len >= 1 && !b.host.is_null() => *b,
        _ => return Err(ChainError::NoStatusByte),
    };
    // SAFETY: `last.host..+len` is mapped (translation made it non-null); `len >= 1`.
    let status = unsafe { last.host.add(last.len as usize - 1) };
    // The status byte is written at completion: start owning its line now.
    crate::virtq::prefetch_write(status);
    segs.clear();
    let action = parse_action(chain, params, segs);
    Ok(Parsed { status, action })
}

/// The action of a chain whose status byte is in place (see [`parse_request`]).
fn parse_action(chain: &[Buf], params: &BlkParams, segs: &mut Vec<IoSeg>) -> Action {
    let n_read = chain.iter().take_while(|b| !b.write).count();
    if chain[n_read..].iter().any(|b| !b.write) {
        return Action::Complete(S_IOERR);
    }
    let mut hdr = [0u8; HEADER_BYTES];
    if !copy_readable(chain, 0, &mut hdr) {
        return Action::Complete(S_IOERR);
    }
    let rtype = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    // §5.2.6.2: a device offering VIRTIO_BLK_F_RO fails requests that would change the disk.
    // The feature bit is advice to the driver; this is the export's guarantee.
    if params.read_only && matches!(rtype, T_OUT | T_DISCARD | T_WRITE_ZEROES) {
        return Action::Complete(S_IOERR);
    }
    let shift = params.block_shift;
    let readable: u64 = chain[..n_read].iter().map(|b| u64::from(b.len)).sum();
    let to_blocks = |sector: u64, bytes: u64| -> Option<(u64, u32)> {
        let byte_off = sector.checked_mul(SECTOR_BYTES)?;
        let mask = (1u64 << shift) - 1;
        if byte_off & mask != 0 || bytes & mask != 0 || bytes == 0 {
            return None;
        }
        Some((byte_off >> shift, u32::try_from(bytes >> shift).ok()?))
    };
    match rtype {
        T_IN | T_OUT | T_GET_ID => {
            let write_data = rtype == T_OUT;
            // Data: readable bytes after the header (OUT), or writable bytes before the
            // status byte (IN, GET_ID).
            let mut skip = if write_data { HEADER_BYTES as u64 } else { 0 };
            let mut total = 0u64;
            let bufs: &[Buf] = if write_data {
                &chain[..n_read]
            } else {
                &chain[n_read..]
            };
            let nb = bufs.len();
            for (i, b) in bufs.iter().enumerate() {
                let mut len = u64::from(b.len);
                if !write_data && i == nb - 1 {
                    len -= 1; // the status byte
                }
                if skip >= len {
                    skip -= len;
                    continue;
                }
                // More segments than seg_max: refused before the list grows past it (a chain
                // of thousands of one-byte buffers must not make every slot's list that long).
                if b.host.is_null() || segs.len() == params.max_segments {
                    return Action::Complete(S_IOERR);
                }
                segs.push(IoSeg {
                    // SAFETY: `skip < len <= b.len`, inside the mapped buffer.
                    base: unsafe { b.host.add(skip as usize) },
                    len: (len - skip) as usize,
                });
                total += len - skip;
                skip = 0;
            }
            if rtype == T_GET_ID {
                let len = (total as usize).min(ID_BYTES);
                return if len > 0 {
                    Action::GetId { len }
                } else {
                    Action::Complete(S_IOERR)
                };
            }
            // More data than seg_max × size_max (the device's limit, MAX_EXPORT_IO_BYTES): one
            // request must not hold the reactor for a multi-gigabyte copy.
            if total > MAX_EXPORT_IO_BYTES {
                return Action::Complete(S_IOERR);
            }
            let Some((offset_blocks, num_blocks)) = to_blocks(sector, total) else {
                return Action::Complete(S_IOERR);
            };
            Action::Submit {
                io_type: if write_data {
                    IoType::Write
                } else {
                    IoType::Read
                },
                offset_blocks,
                num_blocks,
                written: if write_data { 1 } else { total as u32 + 1 },
            }
        }
        T_FLUSH => Action::Submit {
            io_type: IoType::Flush,
            offset_blocks: 0,
            num_blocks: 0,
            written: 1,
        },
        T_DISCARD | T_WRITE_ZEROES => {
            // One 16-byte segment {le64 sector, le32 num_sectors, le32 flags}; the device
            // advertises max_discard_seg = max_write_zeroes_seg = 1.
            if readable != (HEADER_BYTES + RANGE_BYTES) as u64 {
                return Action::Complete(S_IOERR);
            }
            let mut seg = [0u8; RANGE_BYTES];
            if !copy_readable(chain, HEADER_BYTES, &mut seg) {
                return Action::Complete(S_IOERR);
            }
            let s_sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let s_count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            if s_count > MAX_DISCARD_SECTORS {
                return Action::Complete(S_IOERR);
            }
            let io_type = if rtype == T_DISCARD {
                if flags != 0 {
                    return Action::Complete(S_UNSUPP);
                }
                IoType::Unmap
            } else {
                if flags & !WZ_FLAG_UNMAP != 0 {
                    return Action::Complete(S_UNSUPP);
                }
                if flags & WZ_FLAG_UNMAP != 0 && params.unmap_zeroes {
                    IoType::Unmap
                } else {
                    IoType::WriteZeroes
                }
            };
            let Some((offset_blocks, num_blocks)) =
                to_blocks(s_sector, u64::from(s_count) * SECTOR_BYTES)
            else {
                return Action::Complete(S_IOERR);
            };
            Action::Submit {
                io_type,
                offset_blocks,
                num_blocks,
                written: 1,
            }
        }
        _ => Action::Complete(S_UNSUPP),
    }
}

/// Writes `id` (the first bytes of the serial number, an [`Action::GetId`] answer) into the
/// device-writable segments `segs` of a GET_ID request, in order.
pub fn write_id(segs: &[IoSeg], id: &[u8]) {
    let mut left = id.len();
    let mut from = 0;
    for s in segs {
        let k = s.len.min(left);
        // SAFETY: `s` is a mapped, device-writable guest segment of `s.len` bytes (as
        // `parse_request` found it); `from + k <= id.len()`.
        unsafe { std::ptr::copy_nonoverlapping(id[from..].as_ptr(), s.base, k) };
        left -= k;
        from += k;
        if left == 0 {
            break;
        }
    }
}

/// Whether write-through applies to a write: the bdev has a volatile cache and the guest
/// turned its write cache off (CONFIG_WCE), so the write is flushed before it completes.
pub fn flush_after(io_type: IoType, params: &BlkParams) -> bool {
    io_type == IoType::Write && params.volatile_cache && !params.writeback.load(Ordering::Relaxed)
}

/// Copies `dst.len()` readable bytes of the chain starting at byte `off`; false if the
/// readable part is shorter or a buffer is outside guest memory.
fn copy_readable(chain: &[Buf], mut off: usize, dst: &mut [u8]) -> bool {
    // Fast path: the header (or segment) lies in the first buffer, as Linux lays it out.
    if let Some(b) = chain.first()
        && !b.write
        && !b.host.is_null()
        && dst.len() == 16
        && off + 16 <= b.len as usize
    {
        // SAFETY: `off + 16 <= b.len`, inside the mapped, readable guest buffer; an
        // unaligned read copies the bytes once.
        let v: [u8; 16] = unsafe { std::ptr::read_unaligned(b.host.add(off).cast()) };
        dst.copy_from_slice(&v);
        return true;
    }
    let mut done = 0;
    for b in chain.iter().take_while(|b| !b.write) {
        let len = b.len as usize;
        if off >= len {
            off -= len;
            continue;
        }
        if b.host.is_null() {
            return false;
        }
        let n = (len - off).min(dst.len() - done);
        // SAFETY: `b.host..+len` is mapped guest memory (checked non-null by translation);
        // `off + n <= len`.
        unsafe { std::ptr::copy(b.host.add(off), dst.as_mut_ptr().add(done), n) };
        done += n;
        off = 0;
        if done == dst.len() {
            return true;
        }
    }
    done == dst.len()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::virtq::testing::Driver;

    /// A 4 KiB-block disk with the serial `SER123`, at most 4 segments per request.
    fn params() -> BlkParams {
        let mut serial = [0u8; ID_BYTES];
        serial[..6].copy_from_slice(b"SER123");
        BlkParams {
            block_shift: 12,
            serial,
            max_segments: 4,
            unmap_zeroes: true,
            writeback: Arc::new(AtomicBool::new(true)),
            volatile_cache: true,
            read_only: false,
        }
    }

    /// Hand-built chains in the guest memory of a test driver.
    struct Chains {
        d: Driver,
    }

    impl Chains {
        fn new() -> Chains {
            Chains { d: Driver::new(16) }
        }

        /// A device-readable buffer holding `data`.
        fn readable(&mut self, data: &[u8]) -> Buf {
            let a = self.d.alloc(data.len() as u64);
            self.d.write(a, data);
            Buf {
                host: self.d.host(a, data.len() as u64),
                len: data.len() as u32,
                write: false,
            }
        }

        /// A device-writable buffer of `len` bytes filled with 0xEE.
        fn writable(&mut self, len: u32) -> Buf {
            let a = self.d.alloc(u64::from(len));
            self.d.write(a, &vec![0xEE; len as usize]);
            Buf {
                host: self.d.host(a, u64::from(len)),
                len,
                write: true,
            }
        }
    }

    /// A request header: type, reserved, sector.
    fn header(t: u32, sector: u64) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// A discard / write-zeroes range.
    fn range(sector: u64, sectors: u32, flags: u32) -> [u8; RANGE_BYTES] {
        let mut r = [0u8; RANGE_BYTES];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        r
    }

    /// The bytes of every buffer of `chain`.
    fn snapshot(chain: &[Buf]) -> Vec<Vec<u8>> {
        chain
            .iter()
            .map(|b| {
                if b.host.is_null() {
                    return Vec::new();
                }
                // SAFETY: every non-null buffer of these chains is mapped test memory of
                // `b.len` bytes.
                unsafe { std::slice::from_raw_parts(b.host, b.len as usize) }.to_vec()
            })
            .collect()
    }

    /// Parses `chain` and checks that parsing wrote nothing into guest memory.
    fn parse(chain: &[Buf], p: &BlkParams, segs: &mut Vec<IoSeg>) -> Result<Parsed, ChainError> {
        let before = snapshot(chain);
        let r = parse_request(chain, p, segs);
        assert_eq!(snapshot(chain), before, "parsing wrote into guest memory");
        r
    }

    fn action(chain: &[Buf], p: &BlkParams) -> Action {
        parse(chain, p, &mut Vec::new())
            .expect("a status byte")
            .action
    }

    #[test]
    fn a_read_over_two_buffers_submits_both_and_writes_their_length_plus_status() {
        let mut c = Chains::new();
        let p = params();
        let h = c.readable(&header(T_IN, 16));
        let (d0, d1, st) = (c.writable(4096), c.writable(4096), c.writable(1));
        let mut segs = Vec::with_capacity(8);
        let cap = segs.as_ptr();
        let r = parse(&[h, d0, d1, st], &p, &mut segs).unwrap();
        assert_eq!(r.status, st.host);
        assert_eq!(
            r.action,
            Action::Submit {
                io_type: IoType::Read,
                offset_blocks: 2,
                num_blocks: 2,
                written: 8193,
            }
        );
        let got: Vec<_> = segs.iter().map(|s| (s.base, s.len)).collect();
        assert_eq!(got, [(d0.host, 4096), (d1.host, 4096)]);
        assert_eq!(
            segs.as_ptr(),
            cap,
            "the segment vector is reused, not reallocated"
        );
    }

    #[test]
    fn a_write_finds_its_data_after_the_header_and_the_status_in_the_last_byte() {
        let mut c = Chains::new();
        let p = params();
        // Header and data in one buffer, as some drivers lay them out; the status byte is the
        // last of a two-byte buffer.
        let mut hd = header(T_OUT, 8).to_vec();
        hd.extend_from_slice(&[7; 4096]);
        let hd = c.readable(&hd);
        let st = c.writable(2);
        let mut segs = vec![
            IoSeg {
                base: std::ptr::null_mut(),
                len: 1,
            };
            3
        ];
        let r = parse(&[hd, st], &p, &mut segs).unwrap();
        // SAFETY: inside the two-byte buffer.
        assert_eq!(r.status, unsafe { st.host.add(1) });
        assert_eq!(
            r.action,
            Action::Submit {
                io_type: IoType::Write,
                offset_blocks: 1,
                num_blocks: 1,
                written: 1,
            }
        );
        assert_eq!(segs.len(), 1, "left-over segments are cleared");
        // SAFETY: inside the first buffer.
        assert_eq!(segs[0].base, unsafe { hd.host.add(HEADER_BYTES) });
        assert_eq!(segs[0].len, 4096);
    }

    #[test]
    fn flush_discard_and_write_zeroes_map_to_their_bdev_operations() {
        let mut c = Chains::new();
        let mut p = params();
        let st = c.writable(1);
        let h = c.readable(&header(T_FLUSH, 0));
        assert_eq!(
            action(&[h, st], &p),
            Action::Submit {
                io_type: IoType::Flush,
                offset_blocks: 0,
                num_blocks: 0,
                written: 1,
            }
        );
        let submit = |io_type, offset_blocks, num_blocks| Action::Submit {
            io_type,
            offset_blocks,
            num_blocks,
            written: 1,
        };
        for (t, flags, unmap_zeroes, want) in [
            (T_DISCARD, 0, true, submit(IoType::Unmap, 2, 3)),
            (T_DISCARD, 1, true, Action::Complete(S_UNSUPP)),
            (T_WRITE_ZEROES, 0, true, submit(IoType::WriteZeroes, 2, 3)),
            (
                T_WRITE_ZEROES,
                WZ_FLAG_UNMAP,
                true,
                submit(IoType::Unmap, 2, 3),
            ),
            (
                T_WRITE_ZEROES,
                WZ_FLAG_UNMAP,
                false,
                submit(IoType::WriteZeroes, 2, 3),
            ),
            (T_WRITE_ZEROES, 2, true, Action::Complete(S_UNSUPP)),
        ] {
            p.unmap_zeroes = unmap_zeroes;
            let h = c.readable(&header(t, 0));
            let r = c.readable(&range(16, 24, flags));
            assert_eq!(action(&[h, r, st], &p), want, "type {t} flags {flags}");
        }
        // The range in the header's buffer parses the same.
        let mut hr = header(T_DISCARD, 0).to_vec();
        hr.extend_from_slice(&range(16, 24, 0));
        let hr = c.readable(&hr);
        assert_eq!(action(&[hr, st], &p), submit(IoType::Unmap, 2, 3));
        // Two ranges (max_discard_seg is 1), a misaligned range, an empty one.
        let h = c.readable(&header(T_DISCARD, 0));
        let two = c.readable(&[range(16, 8, 0), range(32, 8, 0)].concat());
        assert_eq!(action(&[h, two, st], &p), Action::Complete(S_IOERR));
        let odd = c.readable(&range(17, 8, 0));
        assert_eq!(action(&[h, odd, st], &p), Action::Complete(S_IOERR));
        let empty = c.readable(&range(16, 0, 0));
        assert_eq!(action(&[h, empty, st], &p), Action::Complete(S_IOERR));
    }

    #[test]
    fn get_id_answers_at_most_twenty_bytes_of_the_serial() {
        let mut c = Chains::new();
        let p = params();
        let st = c.writable(1);
        let h = c.readable(&header(T_GET_ID, 0));
        let (a, b) = (c.writable(4), c.writable(64));
        let mut segs = Vec::new();
        let r = parse(&[h, a, b, st], &p, &mut segs).unwrap();
        assert_eq!(r.action, Action::GetId { len: ID_BYTES });
        write_id(&segs, &p.serial[..ID_BYTES]);
        let got = snapshot(&[a, b]);
        assert_eq!(got[0], b"SER1");
        assert_eq!(&got[1][..2], b"23");
        assert!(got[1][2..16].iter().all(|&x| x == 0), "zero padding");
        assert!(got[1][16..].iter().all(|&x| x == 0xEE), "past the answer");
        // A short buffer gets the first bytes; no buffer at all is an error.
        let short = c.writable(3);
        let r = parse(&[h, short, st], &p, &mut segs).unwrap();
        assert_eq!(r.action, Action::GetId { len: 3 });
        assert_eq!(action(&[h, st], &p), Action::Complete(S_IOERR));
    }

    #[test]
    fn malformed_requests_complete_with_an_error_status() {
        let mut c = Chains::new();
        let p = params();
        let st = c.writable(1);
        let data = c.writable(4096);
        let h_in = c.readable(&header(T_IN, 0));
        // An unknown type.
        let h = c.readable(&header(99, 0));
        assert_eq!(action(&[h, st], &p), Action::Complete(S_UNSUPP));
        // A header shorter than 16 bytes, split headers are fine.
        let short = c.readable(&header(T_IN, 0)[..8]);
        assert_eq!(action(&[short, data, st], &p), Action::Complete(S_IOERR));
        let (h0, h1) = (
            c.readable(&header(T_IN, 8)[..5]),
            c.readable(&header(T_IN, 8)[5..]),
        );
        assert!(matches!(
            action(&[h0, h1, data, st], &p),
            Action::Submit {
                io_type: IoType::Read,
                offset_blocks: 1,
                ..
            }
        ));
        // A readable buffer after a writable one.
        let r = c.readable(&[0; 512]);
        assert_eq!(action(&[h_in, data, r, st], &p), Action::Complete(S_IOERR));
        // A data buffer outside guest memory.
        let outside = Buf {
            host: std::ptr::null_mut(),
            len: 4096,
            write: true,
        };
        assert_eq!(action(&[h_in, outside, st], &p), Action::Complete(S_IOERR));
        // A sector not on a block boundary, a length not a block multiple, no data, a sector
        // number that overflows.
        let h = c.readable(&header(T_IN, 1));
        assert_eq!(action(&[h, data, st], &p), Action::Complete(S_IOERR));
        let half = c.writable(2048);
        assert_eq!(action(&[h_in, half, st], &p), Action::Complete(S_IOERR));
        assert_eq!(action(&[h_in, st], &p), Action::Complete(S_IOERR));
        let h = c.readable(&header(T_IN, u64::MAX - 7));
        assert_eq!(action(&[h, data, st], &p), Action::Complete(S_IOERR));
        // More segments than the disk advertises (4).
        let bufs: Vec<Buf> = (0..5).map(|_| c.writable(4096)).collect();
        let chain = [&[h_in][..], &bufs, &[st]].concat();
        assert_eq!(action(&chain, &p), Action::Complete(S_IOERR));
        assert!(matches!(
            action(&[&[h_in][..], &bufs[..4], &[st]].concat(), &p),
            Action::Submit { num_blocks: 4, .. }
        ));
        // Thousands of one-byte buffers: refused once seg_max is reached, and the segment
        // list never grows past it.
        let tiny = c.writable(1);
        let mut chain = vec![h_in];
        chain.extend(std::iter::repeat_n(tiny, 5000));
        chain.push(st);
        let mut segs = Vec::new();
        let r = parse(&chain, &p, &mut segs).unwrap();
        assert_eq!(r.action, Action::Complete(S_IOERR));
        assert!(segs.len() <= p.max_segments, "{} segments kept", segs.len());
    }

    #[test]
    fn a_request_larger_than_the_device_takes_is_refused() {
        let mut c = Chains::new();
        let mut p = params();
        p.max_segments = 8;
        let st = c.writable(1);
        let h_in = c.readable(&header(T_IN, 0));
        // One buffer of 1 MiB + 4 KiB: past seg_max × size_max (MAX_EXPORT_IO_BYTES).
        let big = c.writable((MAX_EXPORT_IO_BYTES + 4096) as u32);
        assert_eq!(action(&[h_in, big, st], &p), Action::Complete(S_IOERR));
        let just = Buf {
            len: MAX_EXPORT_IO_BYTES as u32,
            ..big
        };
        assert!(matches!(
            action(&[h_in, just, st], &p),
            Action::Submit {
                num_blocks: 256,
                ..
            }
        ));
        // A discard or write-zeroes range past max_discard_sectors.
        for t in [T_DISCARD, T_WRITE_ZEROES] {
            let mut req = header(t, 0).to_vec();
            req.extend_from_slice(&range(0, MAX_DISCARD_SECTORS + 8, 0));
            let hr = c.readable(&req);
            assert_eq!(action(&[hr, st], &p), Action::Complete(S_IOERR));
            let mut req = header(t, 0).to_vec();
            req.extend_from_slice(&range(0, MAX_DISCARD_SECTORS, 0));
            let hr = c.readable(&req);
            assert!(matches!(action(&[hr, st], &p), Action::Submit { .. }));
        }
    }

    #[test]
    fn a_read_only_export_fails_what_would_change_the_disk_whatever_the_driver_does() {
        let mut c = Chains::new();
        let mut p = params();
        p.read_only = true;
        let st = c.writable(1);
        let mut out = header(T_OUT, 0).to_vec();
        out.extend_from_slice(&[5; 4096]);
        let w = c.readable(&out);
        assert_eq!(action(&[w, st], &p), Action::Complete(S_IOERR));
        for t in [T_DISCARD, T_WRITE_ZEROES] {
            let mut req = header(t, 0).to_vec();
            req.extend_from_slice(&range(0, 8, 0));
            let hr = c.readable(&req);
            assert_eq!(action(&[hr, st], &p), Action::Complete(S_IOERR));
        }
        // Reads, flushes and GET_ID still work.
        let h_in = c.readable(&header(T_IN, 0));
        let d = c.writable(4096);
        assert!(matches!(
            action(&[h_in, d, st], &p),
            Action::Submit {
                io_type: IoType::Read,
                ..
            }
        ));
        let f = c.readable(&header(T_FLUSH, 0));
        assert!(matches!(
            action(&[f, st], &p),
            Action::Submit {
                io_type: IoType::Flush,
                ..
            }
        ));
        let id = c.readable(&header(T_GET_ID, 0));
        let idb = c.writable(ID_BYTES as u32 + 1);
        assert!(matches!(action(&[id, idb], &p), Action::GetId { .. }));
    }

    #[test]
    fn a_chain_without_a_writable_status_byte_is_a_driver_error() {
        let mut c = Chains::new();
        let p = params();
        let h = c.readable(&header(T_FLUSH, 0));
        let mut segs = Vec::new();
        assert_eq!(
            parse(&[], &p, &mut segs).unwrap_err(),
            ChainError::NoStatusByte
        );
        let r = c.readable(&[0]);
        assert_eq!(
            parse(&[h, r], &p, &mut segs).unwrap_err(),
            ChainError::NoStatusByte
        );
        let empty = c.writable(0);
        assert_eq!(
            parse(&[h, empty], &p, &mut segs).unwrap_err(),
            ChainError::NoStatusByte
        );
        let outside = Buf {
            host: std::ptr::null_mut(),
            len: 1,
            write: true,
        };
        assert_eq!(
            parse(&[h, outside], &p, &mut segs).unwrap_err(),
            ChainError::NoStatusByte
        );
    }

    #[test]
    fn only_a_write_in_write_through_mode_on_a_volatile_cache_is_flushed_after() {
        let mut p = params();
        assert!(!flush_after(IoType::Write, &p), "write-back");
        p.writeback.store(false, Ordering::Relaxed);
        assert!(flush_after(IoType::Write, &p));
        assert!(!flush_after(IoType::Read, &p));
        p.volatile_cache = false;
        assert!(!flush_after(IoType::Write, &p));
    }
}
