//! The free-space allocator of a compress volume's data region.

/// Free space of the data region: one bit per block, next-fit allocation of contiguous runs.
pub(super) struct Allocator {
    pub(super) bits: Vec<u64>,
    pub(super) blocks: u64,
    pub(super) used: u64,
    pub(super) cursor: u64,
}

impl Allocator {
    pub(super) fn new(blocks: u64) -> Allocator {
        Allocator {
            bits: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            used: 0,
            cursor: 0,
        }
    }

    pub(super) fn is_used(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Marks `first .. first + n` used; false (and no change) if any of them is used already.
    pub(super) fn mark(&mut self, first: u64, n: u64) -> bool {
        if (first..first + n).any(|b| self.is_used(b)) {
            return false;
        }
        for b in first..first + n {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        self.used += n;
        true
    }

    pub(super) fn free(&mut self, first: u64, n: u64) {
        for b in first..first + n {
            debug_assert!(self.is_used(b), "freeing free block {b}");
            self.bits[(b / 64) as usize] &= !(1 << (b % 64));
        }
        self.used -= n;
    }

    /// A run of `n` free blocks, marked used; next-fit from the last allocation.
    pub(super) fn alloc(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.blocks - self.used {
            return None;
        }
        let total = self.blocks;
        let mut pos = self.cursor.min(total);
        let (mut run_start, mut run_len) = (pos, 0u64);
        let mut scanned = 0u64;
        while scanned < total + n {
            if pos >= total {
                pos = 0;
                run_len = 0;
            }
            if run_len == 0
                && pos.is_multiple_of(64)
                && pos + 64 <= total
                && self.bits[(pos / 64) as usize] == !0
            {
                pos += 64;
                scanned += 64;
                continue;
            }
            if self.is_used(pos) {
                run_len = 0;
            } else {
                if run_len == 0 {
                    run_start = pos;
                }
                run_len += 1;
                if run_len == n {
                    let ok = self.mark(run_start, n);
                    debug_assert!(ok);
                    self.cursor = run_start + n;
                    return Some(run_start);
                }
            }
            pos += 1;
            scanned += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_finds_runs_and_wraps() {
        let mut a = Allocator::new(200);
        assert_eq!(a.alloc(10), Some(0));
        assert_eq!(a.alloc(60), Some(10));
        assert_eq!(a.alloc(100), Some(70));
        assert_eq!(a.alloc(40), None, "only 30 left");
        assert_eq!(a.alloc(30), Some(170));
        a.free(10, 60);
        assert_eq!(a.alloc(64), None, "no run of 64");
        assert_eq!(a.alloc(60), Some(10), "wraps to the freed run");
        assert_eq!(a.used, 200);
        assert!(!a.mark(5, 1));
    }
}
