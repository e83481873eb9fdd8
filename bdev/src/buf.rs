//! Data buffers: aligned heap buffers and scatter-gather lists that a request owns until its
//! completion hands them back.
//!
//! A [`SgList`] is a list of raw memory segments (`iovec`-compatible, so it is passed to the
//! kernel as is) plus, optionally, the [`AlignedBuf`] that owns that memory. Requests move through
//! the bdev chain with their list; no layer copies the data unless it has to transform it.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// One memory segment, laid out as `struct iovec` so a list of them is handed to `readv`/`writev`
/// and io_uring without conversion.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoSeg {
    /// Start of the segment.
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// Segments held inside a [`SgList`] without a heap allocation.
pub const INLINE_SEGS: usize = 2;

/// A heap buffer with a chosen alignment (4096 by default, as O_DIRECT needs), zero-filled at
/// allocation.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: the buffer exclusively owns its allocation, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`, like a `Box<[u8]>`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to 4096.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf::with_align(len, 4096)
    }

    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    pub fn with_align(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align).expect("valid buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, align }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `len` bytes and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Start of the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The alignment it was allocated with.
    pub fn align(&self) -> usize {
        self.align
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), self.align).expect("valid layout");
        // SAFETY: allocated in `with_align` with this same layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

enum Segs {
    Inline { segs: [IoSeg; INLINE_SEGS], n: u8 },
    Heap(Vec<IoSeg>),
}

/// The data buffers of one request: raw segments, and the buffer that owns them when the list
/// was built from one. Moves with the request and comes back in its completion.
///
/// Up to [`INLINE_SEGS`] segments are stored inline; a longer list uses a `Vec` the caller can
/// recycle ([`SgList::from_raw_vec`] / [`SgList::into_vec`]) so the hot path never allocates.
pub struct SgList {
    segs: Segs,
    owner: Option<AlignedBuf>,
}

// SAFETY: the segments point either into `owner` (moved along with the list) or into memory that
// the unsafe constructors' callers promised stays valid and unaliased until the list is dropped or
// handed back; nothing in the list is tied to a thread.
unsafe impl Send for SgList {}

impl Default for SgList {
    fn default() -> SgList {
        SgList::empty()
    }
}

impl std::fmt::Debug for SgList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SgList")
            .field("segments", &self.segments().len())
            .field("bytes", &self.total_len())
            .finish()
    }
}

impl SgList {
    /// A list without data (flush, unmap, write-zeroes).
    pub const fn empty() -> SgList {
        SgList {
            segs: Segs::Inline {
                segs: [IoSeg {
                    base: std::ptr::null_mut(),
                    len: 0,
                }; INLINE_SEGS],
                n: 0,
            },
            owner: None,
        }
    }

    /// A one-segment list over an owned buffer; [`SgList::into_buf`] gives it back.
    pub fn from_buf(mut buf: AlignedBuf) -> SgList {
        let seg = IoSeg {
            base: buf.as_mut_ptr(),
            len: buf.len(),
        };
        let mut l = SgList::empty();
        l.push_inline(seg);
        l.owner = Some(buf);
        l
    }

    /// A one-segment list over the first `len` bytes of an owned buffer (a pooled buffer larger
    /// than the request); [`SgList::into_buf`] gives the whole buffer back.
    pub fn from_buf_prefix(mut buf: AlignedBuf, len: usize) -> SgList {
        assert!(len <= buf.len(), "prefix longer than the buffer");
        let seg = IoSeg {
            base: buf.as_mut_ptr(),
            len,
        };
        let mut l = SgList::empty();
        l.push_inline(seg);
        l.owner = Some(buf);
        l
    }

    /// A list over an owned buffer split into segments of the given lengths (the rest of the
    /// buffer, if any, is left out). For tests of scatter-gather paths; allocates only for more
    /// than [`INLINE_SEGS`] segments.
    pub fn from_buf_split(mut buf: AlignedBuf, lens: &[usize]) -> SgList {
        assert!(
            lens.iter().sum::<usize>() <= buf.len(),
            "split exceeds buffer"
        );
        let base = buf.as_mut_ptr();
        let mut l = SgList::empty();
        if lens.len() > INLINE_SEGS {
            l.segs = Segs::Heap(Vec::with_capacity(lens.len()));
        }
        let mut off = 0;
        for &len in lens {
            l.push_inline(IoSeg {
                // SAFETY: `off + len <= buf.len()` was asserted above.
                base: unsafe { base.add(off) },
                len,
            });
            off += len;
        }
        l.owner = Some(buf);
        l
    }

    /// A list over raw segments (guest memory, a front's buffer pool).
    ///
    /// # Safety
    /// Every segment must be valid for reads and writes of its length from now until the list is
    /// dropped or handed back in the request's completion, and must not be accessed through any
    /// other path meanwhile except as the caller's protocol allows (a guest racing with its own
    /// I/O gets unspecified data, as with a disk).
    pub unsafe fn from_raw(segs: &[IoSeg]) -> SgList {
        if segs.len() <= INLINE_SEGS {
            let mut l = SgList::empty();
            for s in segs {
                l.push_inline(*s);
            }
            l
        } else {
            SgList {
                segs: Segs::Heap(segs.to_vec()),
                owner: None,
            }
        }
    }

    /// A list over raw segments held in a caller-recycled `Vec` (no allocation).
    ///
    /// # Safety
    /// As for [`SgList::from_raw`].
    pub unsafe fn from_raw_vec(segs: Vec<IoSeg>) -> SgList {
        SgList {
            segs: Segs::Heap(segs),
            owner: None,
        }
    }

    fn push_inline(&mut self, seg: IoSeg) {
        match &mut self.segs {
            Segs::Inline { segs, n } => {
                segs[*n as usize] = seg;
                *n += 1;
            }
            Segs::Heap(v) => v.push(seg),
        }
    }

    /// The segments.
    pub fn segments(&self) -> &[IoSeg] {
        match &self.segs {
            Segs::Inline { segs, n } => &segs[..*n as usize],
            Segs::Heap(v) => v,
        }
    }

    /// Total bytes over all segments.
    pub fn total_len(&self) -> usize {
        self.segments().iter().map(|s| s.len).sum()
    }

    /// Whether every segment's address and length are multiples of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        let mask = align - 1;
        self.segments()
            .iter()
            .all(|s| (s.base as usize) & mask == 0 && s.len & mask == 0)
    }

    /// Takes the owning buffer back (after the completion).
    pub fn into_buf(self) -> Option<AlignedBuf> {
        self.owner
    }

    /// The owning buffer, if the list was built from one.
    pub fn buf(&self) -> Option<&AlignedBuf> {
        self.owner.as_ref()
    }

    /// Takes the segment `Vec` back for reuse (empty for inline lists).
    pub fn into_vec(self) -> Vec<IoSeg> {
        match self.segs {
            Segs::Heap(mut v) => {
                v.clear();
                v
            }
            Segs::Inline { .. } => Vec::new(),
        }
    }

    /// Copies `src` into the list starting at byte `offset`; returns bytes copied.
    pub fn copy_from_slice(&mut self, offset: usize, src: &[u8]) -> usize {
        let mut skip = offset;
        let mut done = 0;
        for s in self.segments() {
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            let n = (s.len - skip).min(src.len() - done);
            // SAFETY: the constructors guarantee `s` is valid for writes of `s.len` bytes while
            // the list lives; `skip + n <= s.len` and `done + n <= src.len()`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), s.base.add(skip), n) };
            done += n;
            skip = 0;
            if done == src.len() {
                break;
            }
        }
        done
    }

    /// Copies from the list starting at byte `offset` into `dst`; returns bytes copied.
    pub fn copy_to_slice(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut skip = offset;
        let mut done = 0;
        for s in self.segments() {
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            let n = (s.len - skip).min(dst.len() - done);
            // SAFETY: the constructors guarantee `s` is valid for reads of `s.len` bytes while
            // the list lives; `skip + n <= s.len` and `done + n <= dst.len()`.
            unsafe {
                std::ptr::copy_nonoverlapping(s.base.add(skip), dst.as_mut_ptr().add(done), n)
            };
            done += n;
            skip = 0;
            if done == dst.len() {
                break;
            }
        }
        done
    }

    /// Copies the list's bytes to raw memory at `dst` (at most `len` bytes).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes.
    pub unsafe fn copy_to_raw(&self, dst: *mut u8, len: usize) {
        let mut done = 0;
        for s in self.segments() {
            let n = s.len.min(len - done);
            // SAFETY: the caller guarantees `dst..dst+len`; the list guarantees `s`.
            unsafe { std::ptr::copy(s.base, dst.add(done), n) };
            done += n;
            if done == len {
                break;
            }
        }
    }

    /// Copies raw memory at `src` (at most `len` bytes) into the list.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes.
    pub unsafe fn copy_from_raw(&mut self, src: *const u8, len: usize) {
        let mut done = 0;
        for s in self.segments() {
            let n = s.len.min(len - done);
            // SAFETY: the caller guarantees `src..src+len`; the list guarantees `s`.
            unsafe { std::ptr::copy(src.add(done), s.base, n) };
            done += n;
            if done == len {
                break;
            }
        }
    }

    /// Fills every segment with zeroes.
    pub fn fill_zero(&mut self) {
        for s in self.segments() {
            // SAFETY: the constructors guarantee `s` is valid for writes of `s.len` bytes.
            unsafe { std::ptr::write_bytes(s.base, 0, s.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.as_mut_ptr() as usize % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn copies_span_segments() {
        let buf = AlignedBuf::new(4096);
        let mut l = SgList::from_buf_split(buf, &[100, 1000, 2996]);
        assert_eq!(l.segments().len(), 3);
        assert_eq!(l.total_len(), 4096);
        let src: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        assert_eq!(l.copy_from_slice(0, &src), 4096);
        let mut back = vec![0u8; 4000];
        assert_eq!(l.copy_to_slice(96, &mut back), 4000);
        assert_eq!(&back[..], &src[96..4096]);
        assert!(!l.is_aligned(512));
        let buf = l.into_buf().unwrap();
        assert_eq!(buf.as_slice(), &src[..]);
    }

    #[test]
    fn long_lists_spill_to_a_vec() {
        let buf = AlignedBuf::new(16 * 512);
        let l = SgList::from_buf_split(buf, &[512; 16]);
        assert_eq!(l.segments().len(), 16);
        assert!(l.is_aligned(512));
    }
}
