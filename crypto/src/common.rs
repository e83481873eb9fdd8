//! Plumbing shared by the XTS and GCM channels: the per-channel buffer pool, per-unit access to a
//! request's scatter-gather list, and size following. (The slot table, the base queue and the
//! GCM metadata region come from `ferroblk_bdev::stacked` and `ferroblk_bdev::mdregion`.)

use std::sync::{Arc, Weak};

use ferroblk_bdev::{AlignedBuf, Bdev, BdevEvent, BdevInfo, SgList};

/// Largest transfer of an encryption bdev, in bytes: one pool buffer holds a whole write.
pub const MAX_TRANSFER_BYTES: usize = 128 << 10;
/// Size of a small pool buffer (writes up to this size, GCM metadata of one request).
pub const SMALL_BUF: usize = 16 << 10;
/// Small buffers per channel.
pub const SMALL_BUFS: usize = 128;
/// Large buffers per channel (writes above [`SMALL_BUF`], XTS write-zeroes chunks, GCM
/// metadata of unmap chunks).
pub const LARGE_BUFS: usize = 16;

/// The buffers a channel encrypts into, allocated when the channel opens: [`SMALL_BUFS`]
/// buffers of [`SMALL_BUF`] bytes and [`LARGE_BUFS`] of [`MAX_TRANSFER_BYTES`].
pub struct BufPool {
    small: Vec<AlignedBuf>,
    large: Vec<AlignedBuf>,
}

impl BufPool {
    /// Allocates the pool; `align` is the base's buffer alignment.
    pub fn new(align: usize) -> BufPool {
        let align = align.max(4096);
        BufPool {
            small: (0..SMALL_BUFS)
                .map(|_| AlignedBuf::with_align(SMALL_BUF, align))
                .collect(),
            large: (0..LARGE_BUFS)
                .map(|_| AlignedBuf::with_align(MAX_TRANSFER_BYTES, align))
                .collect(),
        }
    }

    /// A buffer of at least `len` bytes (at most [`MAX_TRANSFER_BYTES`]), or `None` when every
    /// fitting buffer is in use.
    pub fn take(&mut self, len: usize) -> Option<AlignedBuf> {
        debug_assert!(len <= MAX_TRANSFER_BYTES);
        if len <= SMALL_BUF
            && let Some(b) = self.small.pop()
        {
            return Some(b);
        }
        self.large.pop()
    }

    /// A large buffer, or `None`.
    pub fn take_large(&mut self) -> Option<AlignedBuf> {
        self.large.pop()
    }

    /// Whether `take(len)` would succeed.
    pub fn can_take(&self, len: usize) -> bool {
        (len <= SMALL_BUF && !self.small.is_empty()) || !self.large.is_empty()
    }

    /// Gives a buffer back.
    pub fn put(&mut self, buf: AlignedBuf) {
        if buf.len() >= MAX_TRANSFER_BYTES {
            self.large.push(buf);
        } else {
            self.small.push(buf);
        }
    }
}

/// Calls `f(index, unit)` on each `unit`-byte unit of `bufs`, in order, with the unit as one
/// mutable slice: in place where the unit lies inside one segment, through `bounce` (copied in,
/// then back) where it straddles segments. Stops early when `f` returns false.
pub fn for_each_unit_mut(
    bufs: &mut SgList,
    unit: usize,
    bounce: &mut [u8],
    mut f: impl FnMut(usize, &mut [u8]) -> bool,
) {
    let mut index = 0;
    // Bytes at the start of the next segment that belong to a unit already handled (through the
    // bounce buffer) because it straddled the previous segment's end.
    let mut skip = 0usize;
    for k in 0..bufs.segments().len() {
        let seg = bufs.segments()[k];
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let mut pos = skip;
        skip = 0;
        while pos + unit <= seg.len {
            // SAFETY: `pos + unit <= seg.len`, and the list's constructors guarantee each segment
            // is valid for reads and writes of its length while the list lives; `bufs` is
            // borrowed mutably, so nothing else reaches this memory through the list, and the
            // slice is gone before the list is used again.
            let s = unsafe { std::slice::from_raw_parts_mut(seg.base.add(pos), unit) };
            if !f(index, s) {
                return;
            }
            index += 1;
            pos += unit;
        }
        if pos < seg.len {
            let b = &mut bounce[..unit];
            let got = bufs.copy_to_slice(index * unit, b);
            if got < unit {
                return; // a trailing partial unit: the layer never lets one through
            }
            let go_on = f(index, b);
            bufs.copy_from_slice(index * unit, b);
            if !go_on {
                return;
            }
            index += 1;
            skip = unit - (seg.len - pos);
        }
    }
}

/// Makes `info` follow `base`'s block count; returns the subscription to cancel on drop.
pub fn follow_base_size(base: &Arc<dyn Bdev>, info: &Arc<BdevInfo>) -> u64 {
    let weak: Weak<BdevInfo> = Arc::downgrade(info);
    base.info().subscribe(move |ev| {
        let BdevEvent::Resized { new_blocks, .. } = *ev;
        if let Some(info) = weak.upgrade() {
            info.set_block_count(new_blocks);
        }
    })
}

/// Drives `bdev` from one thread at queue depth `qd` with `blocks`-block requests of `io_type`
/// over its whole range for `secs` seconds; returns GB/s. For the benchmarks in tests.
/// A tier of cipher implementation: our one-pass VAES and AES-NI engines, or the portable
/// RustCrypto crate. Which tiers a CPU runs depends on the cipher's instruction needs: each
/// cipher module has an `engine_supported(Engine) -> bool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    /// VAES (+ VPCLMULQDQ) on AVX-512 zmm registers, x86_64: 16 blocks per iteration.
    Vaes,
    /// AES-NI (+ PCLMULQDQ where the cipher needs it) on xmm registers, x86_64: 8 blocks in
    /// flight.
    AesNi,
    /// The RustCrypto crate: any CPU, and the reference the other engines are tested against.
    Portable,
}

impl Engine {
    /// Every engine, fastest first.
    pub(crate) const ALL: [Engine; 3] = [Engine::Vaes, Engine::AesNi, Engine::Portable];

    /// The fastest engine `supported` accepts (the portable one runs anywhere).
    pub(crate) fn fastest(supported: fn(Engine) -> bool) -> Engine {
        Engine::ALL
            .into_iter()
            .find(|&e| supported(e))
            .unwrap_or(Engine::Portable)
    }

    /// Every engine `supported` accepts, fastest first; the others are reported on stderr as
    /// not tested by `cipher` (tests force each engine the CPU runs).
    #[cfg(test)]
    pub(crate) fn runnable(cipher: &str, supported: fn(Engine) -> bool) -> Vec<Engine> {
        Engine::ALL
            .into_iter()
            .filter(|&e| {
                let ok = supported(e);
                if !ok {
                    eprintln!(
                        "{cipher} engine {} not tested: this CPU does not run it",
                        e.name()
                    );
                }
                ok
            })
            .collect()
    }

    /// A short name for `describe`, benchmarks and messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Engine::Vaes => "vaes-avx512",
            Engine::AesNi => "aes-ni",
            Engine::Portable => "portable",
        }
    }
}

#[cfg(test)]
pub(crate) fn throughput(
    bdev: &dyn Bdev,
    io_type: ferroblk_bdev::IoType,
    blocks: u32,
    qd: usize,
    secs: f64,
) -> f64 {
    use ferroblk_bdev::IoRequest;
    let mut ch = bdev.open_channel().unwrap();
    let len = blocks as usize * bdev.info().block_size().bytes() as usize;
    let places = bdev.info().block_count() / u64::from(blocks);
    let mut free: Vec<AlignedBuf> = (0..qd).map(|_| AlignedBuf::new(len)).collect();
    let mut done = Vec::with_capacity(qd);
    let (start, mut bytes, mut next) = (std::time::Instant::now(), 0u64, 0u64);
    while start.elapsed().as_secs_f64() < secs {
        while let Some(buf) = free.pop() {
            let io = IoRequest {
                io_type,
                offset_blocks: (next % places) * u64::from(blocks),
                num_blocks: blocks,
                bufs: SgList::from_buf(buf),
                tag: 0,
            };
            next += 1;
            if let Err(io) = ch.submit(io) {
                free.push(io.bufs.into_buf().unwrap());
                break;
            }
        }
        ch.poll(&mut done);
        for c in done.drain(..) {
            assert!(c.status.is_ok(), "{}", c.status);
            bytes += len as u64;
            free.push(c.bufs.into_buf().unwrap());
        }
    }
    while ch.in_flight() > 0 {
        ch.poll(&mut done);
        done.clear();
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_in_place_and_straddling_are_all_visited_once() {
        let unit = 512;
        let mut buf = AlignedBuf::new(4 * unit);
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i / unit) as u8;
        }
        let mut l = SgList::from_buf_split(buf, &[100, 900, 24, 1024]);
        let mut bounce = vec![0u8; unit];
        let mut seen = Vec::new();
        for_each_unit_mut(&mut l, unit, &mut bounce, |i, u| {
            assert!(u.iter().all(|&b| b == i as u8), "unit {i} has wrong bytes");
            u.fill(0xa0 + i as u8);
            seen.push(i);
            true
        });
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3]);
        let back = l.into_buf().unwrap();
        for (i, b) in back.as_slice().iter().enumerate() {
            assert_eq!(*b, 0xa0 + (i / unit) as u8, "byte {i}");
        }
    }
}
