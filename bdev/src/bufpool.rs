//! One buffer pool per thread — per reactor — shared by every user on it: the NVMe-oF queues'
//! command buffers and the encryption channels' ciphertext buffers.
//!
//! Buffers come in power-of-two size classes from 4 KiB to 1 MiB ([`MAX_POOLED`]), 4096-byte
//! aligned. [`get`] takes one of the class that fits (allocating only while the pool is still
//! cold or a burst exceeds what it keeps); [`put`] keeps a buffer while its class holds less than
//! [`CLASS_BUDGET`] bytes and frees it otherwise, so a reactor keeps at most
//! `9 × CLASS_BUDGET` (72 MiB) however many connections or channels it serves. Everything here
//! is single-threaded: no lock, no atomic.

use std::cell::RefCell;

use crate::buf::AlignedBuf;

/// The smallest class (and the alignment of every pooled buffer).
pub const MIN_POOLED: usize = 4096;
/// The largest class; larger buffers are allocated and freed each time.
pub const MAX_POOLED: usize = 1 << 20;
/// Bytes a thread keeps per class.
pub const CLASS_BUDGET: usize = 8 << 20;

/// Number of size classes (4 KiB, 8 KiB, ... [`MAX_POOLED`]).
pub const CLASSES: usize = (MAX_POOLED / MIN_POOLED).trailing_zeros() as usize + 1;

thread_local! {
    static POOL: RefCell<[Vec<AlignedBuf>; CLASSES]> = RefCell::new(Default::default());
}

/// The class of a buffer of `len` bytes, if pooled (its size is `MIN_POOLED << class`). Other
/// pools of the same shape (the NVMe/RDMA transport's registered buffers) use it too.
pub fn class(len: usize) -> Option<usize> {
    (len <= MAX_POOLED)
        .then(|| (len.max(MIN_POOLED).next_power_of_two() / MIN_POOLED).trailing_zeros() as usize)
}

/// A buffer of at least `len` bytes, aligned to 4096: its class size (a power of two from 4 KiB)
/// up to [`MAX_POOLED`], exactly `len` above. Its contents are whatever its last user left.
pub fn get(len: usize) -> AlignedBuf {
    match class(len) {
        Some(c) => POOL
            .with(|p| p.borrow_mut()[c].pop())
            .unwrap_or_else(|| AlignedBuf::new(MIN_POOLED << c)),
        None => AlignedBuf::new(len),
    }
}

/// Gives a buffer back to the calling thread's pool (or frees it: not a class size, not
/// 4096-aligned, or its class is full).
pub fn put(buf: AlignedBuf) {
    let Some(c) = class(buf.len()) else { return };
    if buf.len() != MIN_POOLED << c || buf.align() != MIN_POOLED {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if (p[c].len() + 1) * buf.len() <= CLASS_BUDGET {
            p[c].push(buf);
        }
    });
}

/// Buffers the calling thread's pool holds, per class (smallest first).
pub fn held() -> [usize; CLASSES] {
    POOL.with(|p| std::array::from_fn(|c| p.borrow()[c].len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_class() {
        let b = get(5000);
        assert_eq!(b.len(), 8192);
        let p = b.as_slice().as_ptr();
        put(b);
        assert_eq!(held()[1], 1);
        let again = get(8192);
        assert_eq!(again.as_slice().as_ptr(), p, "the pooled buffer is reused");
        assert_eq!(get(1).len(), 4096);
        assert_eq!(get(MAX_POOLED).len(), MAX_POOLED);
        let big = get(MAX_POOLED + 1);
        assert_eq!(big.len(), MAX_POOLED + 1);
        put(big);
        put(AlignedBuf::new(12288));
        put(AlignedBuf::with_align(4096, 8192));
        assert_eq!(
            held().iter().sum::<usize>(),
            0,
            "odd sizes and alignments are freed"
        );
    }

    #[test]
    fn a_class_keeps_at_most_its_budget() {
        let n = CLASS_BUDGET / MAX_POOLED;
        let bufs: Vec<_> = (0..n + 5).map(|_| get(MAX_POOLED)).collect();
        bufs.into_iter().for_each(put);
        assert_eq!(held()[CLASSES - 1], n);
    }
}
