//! Plumbing shared by the XTS and GCM channels: the per-channel buffer pool, per-unit access to a
//! request's scatter-gather list, and size following. (The slot table, the base queue and the
//! GCM metadata region come from `ferroblk_bdev::stacked` and `ferroblk_bdev::mdregion`.)

#[cfg(test)]
use ferroblk_bdev::Bdev;
use ferroblk_bdev::{AlignedBuf, IoSeg, SgList, bufpool};

/// Largest transfer of an encryption bdev, in bytes: one pool buffer holds a whole write.
pub const MAX_TRANSFER_BYTES: usize = 128 << 10;
/// Size of a small pool buffer (writes up to this size, GCM metadata of one request).
pub const SMALL_BUF: usize = 16 << 10;
/// Small buffers per channel.
pub const SMALL_BUFS: usize = 128;
/// Large buffers per channel (writes above [`SMALL_BUF`], XTS write-zeroes chunks, GCM
/// metadata of unmap chunks).
pub const LARGE_BUFS: usize = 16;

/// A channel's share of its reactor's buffer pool ([`ferroblk_bdev::bufpool`]): at most
/// [`SMALL_BUFS`] buffers of [`SMALL_BUF`] bytes and [`LARGE_BUFS`] of [`MAX_TRANSFER_BYTES`]
/// at a time. The bound is the channel's back-pressure (a request that finds no buffer waits);
/// the memory itself is the reactor's, kept for whichever channel or queue needs it next.
pub struct BufPool {
    small: usize,
    large: usize,
    align: usize,
}

impl BufPool {
    /// A full share; `align` is the base's buffer alignment.
    pub fn new(align: usize) -> BufPool {
        BufPool {
            small: SMALL_BUFS,
            large: LARGE_BUFS,
            align: align.max(4096),
        }
    }

    fn alloc(&self, len: usize) -> AlignedBuf {
        if self.align <= bufpool::MIN_POOLED {
            bufpool::get(len)
        } else {
            AlignedBuf::with_align(len, self.align)
        }
    }

    /// A buffer of at least `len` bytes (at most [`MAX_TRANSFER_BYTES`]), or `None` when the
    /// channel holds every fitting buffer of its share.
    pub fn take(&mut self, len: usize) -> Option<AlignedBuf> {
        debug_assert!(len <= MAX_TRANSFER_BYTES);
        if len <= SMALL_BUF && self.small > 0 {
            self.small -= 1;
            return Some(self.alloc(SMALL_BUF));
        }
        self.take_large()
    }

    /// A large buffer, or `None`.
    pub fn take_large(&mut self) -> Option<AlignedBuf> {
        (self.large > 0).then(|| {
            self.large -= 1;
            self.alloc(MAX_TRANSFER_BYTES)
        })
    }

    /// Whether `take(len)` would succeed.
    pub fn can_take(&self, len: usize) -> bool {
        (len <= SMALL_BUF && self.small > 0) || self.large > 0
    }

    /// Gives a buffer back.
    pub fn put(&mut self, buf: AlignedBuf) {
        if buf.len() >= MAX_TRANSFER_BYTES {
            self.large += 1;
        } else {
            self.small += 1;
        }
        bufpool::put(buf);
    }
}

/// A position in a scatter-gather list: segment `seg`, byte `off` of it.
#[derive(Clone, Copy)]
struct Cursor {
    seg: usize,
    off: usize,
}

/// Copies `dst.len()` bytes of `segs` from `c` on into `dst`, advancing `c`; false if the list
/// ends first. The segments are reached through raw pointers only: on the vhost path they are
/// guest memory the guest may change at any moment, never to be seen as a Rust reference.
fn gather(segs: &[IoSeg], c: &mut Cursor, dst: &mut [u8]) -> bool {
    let mut done = 0;
    while done < dst.len() {
        let Some(s) = segs.get(c.seg) else {
            return false;
        };
        let n = (s.len - c.off).min(dst.len() - done);
        // SAFETY: `c.off + n <= s.len`, and the list's constructors guarantee each segment is
        // valid for reads of its length while the list lives; `dst` is our own buffer, so the
        // two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(s.base.add(c.off), dst.as_mut_ptr().add(done), n) };
        done += n;
        c.off += n;
        if c.off == s.len {
            c.seg += 1;
            c.off = 0;
        }
    }
    true
}

/// Copies `src` into `segs` from `c` on (a range [`gather`] read before, so it fits).
fn scatter(segs: &[IoSeg], mut c: Cursor, src: &[u8]) {
    let mut done = 0;
    while done < src.len() {
        let s = segs[c.seg];
        let n = (s.len - c.off).min(src.len() - done);
        // SAFETY: `c.off + n <= s.len`, and the list's constructors guarantee each segment is
        // valid for writes of its length while the list lives (the list is borrowed mutably by
        // the caller); `src` is our own buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), s.base.add(c.off), n) };
        done += n;
        c.off += n;
        if c.off == s.len {
            c.seg += 1;
            c.off = 0;
        }
    }
}

/// Transforms each `unit`-byte unit of `bufs`, in order: the unit is copied once into `bounce`
/// (the channel's own buffer), `f(index, unit)` transforms it there, and when `f` returns true
/// the result is copied back once over the unit and the next unit follows. When `f` returns
/// false the unit in `bufs` is left untouched (it never holds what `f` made of it) and the walk
/// stops.
///
/// The caller's memory is never a `&[u8]`: on the vhost path it is guest memory that the guest
/// may change at any moment, so it is only read and written with raw copies. A trailing partial
/// unit (which the layers never let through) is left alone.
pub fn transform_units(
    bufs: &mut SgList,
    unit: usize,
    bounce: &mut [u8],
    mut f: impl FnMut(usize, &mut [u8]) -> bool,
) {
    let bounce = &mut bounce[..unit];
    let segs = bufs.segments();
    let mut c = Cursor { seg: 0, off: 0 };
    let mut index = 0;
    loop {
        let start = c;
        if !gather(segs, &mut c, bounce) {
            return;
        }
        if !f(index, bounce) {
            return;
        }
        scatter(segs, start, bounce);
        index += 1;
    }
}

/// Size following is the stacked bdevs' one listener, shared with the bdev crate.
pub use ferroblk_bdev::stacked::follow_base_size;

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
    fn a_refused_unit_is_left_untouched_and_ends_the_walk() {
        let unit = 512;
        // Unit 1 lies inside the first segment, unit 2 straddles the second and third.
        for refused in [1usize, 2] {
            let mut buf = AlignedBuf::new(4 * unit);
            for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
                *b = (i / unit) as u8;
            }
            let mut l = SgList::from_buf_split(buf, &[1024, 300, 212, 512]);
            let mut bounce = vec![0u8; unit];
            let mut seen = Vec::new();
            transform_units(&mut l, unit, &mut bounce, |i, u| {
                // What the transform made of the unit must never reach the caller's memory
                // when the unit is refused (a GCM block that fails its tag).
                u.fill(0xee);
                seen.push(i);
                i != refused
            });
            assert_eq!(seen, (0..=refused).collect::<Vec<_>>());
            let back = l.into_buf().unwrap();
            for (i, b) in back.as_slice().iter().enumerate() {
                let want = if i / unit < refused {
                    0xee
                } else {
                    (i / unit) as u8
                };
                assert_eq!(*b, want, "refused unit {refused}: byte {i}");
            }
        }
    }

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
        transform_units(&mut l, unit, &mut bounce, |i, u| {
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
