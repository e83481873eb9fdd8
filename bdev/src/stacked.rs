//! Plumbing shared by the stacked bdevs (`crc`, `compress`, `error`, `delay`, and the crypto
//! crate's `crypt_xts` and `crypt_gcm`): a slot table of per-request state, a listener that makes
//! a stacked bdev follow its base's size, striped try-locks shared by the channels
//! of one bdev, a base channel with a queue of refused requests, and the helpers that format a
//! base (when to format, how to zero it).
//!
//! Public so that other crates' stacked bdevs use it too. Nothing here allocates after it is
//! created: all of it is sized when a channel opens.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::bdev::{Bdev, BdevEvent, BdevInfo, Channel, IoCompletion, IoRequest, Wake};
use crate::sync::SyncChannel;
use crate::types::{Caps, IoStatus, IoType};
use crate::uring::ThreadRing;

/// Lock stripes per [`LockTable`].
pub const LOCK_STRIPES: usize = 4096;
const WRITER: u32 = 1 << 31;

/// A fixed-capacity table of per-request state, addressed by slot number; no allocation after
/// creation.
pub struct Slots<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Slots<T> {
    /// A table of `capacity` slots.
    pub fn new(capacity: usize) -> Slots<T> {
        Slots {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity as u32).rev().collect(),
        }
    }

    /// Stores `v`; its slot, or `v` back when the table is full.
    pub fn insert(&mut self, v: T) -> Result<u32, T> {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(v);
                Ok(i)
            }
            None => Err(v),
        }
    }

    /// Whether a slot is free.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether slot `i` holds a value.
    pub fn contains(&self, i: u32) -> bool {
        self.slots.get(i as usize).is_some_and(Option::is_some)
    }

    /// How many slots are free.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// The value in slot `i`.
    ///
    /// # Panics
    /// If the slot is free.
    pub fn get(&self, i: u32) -> &T {
        self.slots[i as usize].as_ref().expect("slot in use")
    }

    /// The value in slot `i`, mutably.
    ///
    /// # Panics
    /// If the slot is free.
    pub fn get_mut(&mut self, i: u32) -> &mut T {
        self.slots[i as usize].as_mut().expect("slot in use")
    }

    /// The values in use.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }

    /// Takes the value out of slot `i`, freeing the slot.
    ///
    /// # Panics
    /// If the slot is free.
    pub fn remove(&mut self, i: u32) -> T {
        let v = self.slots[i as usize].take().expect("slot in use");
        self.free.push(i);
        v
    }
}

/// Makes a stacked bdev's `info` follow `base`'s block count; returns the subscription, which
/// the stacked bdev cancels when it is dropped (or the base would keep its listener forever).
/// The listener holds `info` weakly: a resize after the stacked bdev is gone changes nothing.
pub fn follow_base_size(base: &Arc<dyn Bdev>, info: &Arc<BdevInfo>) -> u64 {
    let weak = Arc::downgrade(info);
    base.info().subscribe(move |ev| {
        let BdevEvent::Resized { new_blocks, .. } = *ev;
        if let Some(info) = weak.upgrade() {
            info.set_block_count(new_blocks);
        }
    })
}

/// Striped reader/writer try-locks shared by every channel of a bdev: key `k` is guarded by
/// stripe `k % LOCK_STRIPES`. Taken all-or-nothing and never waited on: a caller that misses one
/// retries later (on its channel's next poll), so no reactor ever blocks.
pub struct LockTable {
    words: Box<[AtomicU32]>,
}

impl Default for LockTable {
    fn default() -> LockTable {
        LockTable::new()
    }
}

impl LockTable {
    /// A table of [`LOCK_STRIPES`] unlocked stripes.
    pub fn new() -> LockTable {
        LockTable {
            words: (0..LOCK_STRIPES).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn word(&self, key: u64) -> &AtomicU32 {
        &self.words[(key % LOCK_STRIPES as u64) as usize]
    }

    fn try_lock_one(&self, key: u64, write: bool) -> bool {
        let l = self.word(key);
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

    fn unlock_one(&self, key: u64, write: bool) {
        let l = self.word(key);
        if write {
            l.store(0, Ordering::Release);
        } else {
            l.fetch_sub(1, Ordering::Release);
        }
    }

    /// Takes the locks of keys `first .. first + count` (exclusive if `write`, else shared), all
    /// or none. `count` must be below [`LOCK_STRIPES`], so that no two keys of one call share a
    /// stripe.
    pub fn try_lock(&self, first: u64, count: u64, write: bool) -> bool {
        debug_assert!(count < LOCK_STRIPES as u64);
        for i in 0..count {
            if !self.try_lock_one(first + i, write) {
                for j in 0..i {
                    self.unlock_one(first + j, write);
                }
                return false;
            }
        }
        true
    }

    /// Releases what [`LockTable::try_lock`] took.
    pub fn unlock(&self, first: u64, count: u64, write: bool) {
        for i in 0..count {
            self.unlock_one(first + i, write);
        }
    }
}

/// A stacked channel's base channel, with the queue of base requests the base refused after
/// their own request was accepted (they are submitted again, in order, on the next poll).
pub struct BaseQueue {
    channel: Channel,
    retry: VecDeque<IoRequest>,
    scratch: Vec<IoCompletion>,
}

impl BaseQueue {
    /// Wraps `channel`; `capacity` bounds the base requests in flight or queued at once (the
    /// queues are sized for it, so they never grow on the data path).
    pub fn new(channel: Channel, capacity: usize) -> BaseQueue {
        BaseQueue {
            channel,
            retry: VecDeque::with_capacity(capacity),
            scratch: Vec::with_capacity(capacity),
        }
    }

    /// The base channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Whether the base has as many requests in flight as its depth.
    pub fn is_full(&self) -> bool {
        self.channel.in_flight() >= self.channel.depth()
    }

    /// Requests on the base: in flight, or refused and queued here.
    pub fn load(&self) -> usize {
        self.channel.in_flight() + self.retry.len()
    }

    /// Submits `io` to the base, or queues it behind the requests already refused.
    pub fn submit(&mut self, io: IoRequest) {
        if !self.retry.is_empty() {
            self.retry.push_back(io);
        } else if let Err(io) = self.channel.submit(io) {
            self.retry.push_back(io);
        }
    }

    /// Submits the queued requests again (in order, until the base refuses one), then polls the
    /// base. Returns the completions in a vector to give back with [`BaseQueue::recycle`] once
    /// they are handled, so that it keeps its capacity.
    pub fn poll(&mut self) -> Vec<IoCompletion> {
        while let Some(io) = self.retry.pop_front() {
            if let Err(io) = self.channel.submit(io) {
                self.retry.push_front(io);
                break;
            }
        }
        let mut completions = std::mem::take(&mut self.scratch);
        self.channel.poll(&mut completions);
        completions
    }

    /// Takes back the (drained) vector [`BaseQueue::poll`] returned.
    pub fn recycle(&mut self, completions: Vec<IoCompletion>) {
        debug_assert!(completions.is_empty());
        self.scratch = completions;
    }

    /// What wakes the reactor for the base: at once while refused requests wait and the base
    /// has room for them, else the base's own wake.
    pub fn wake(&self) -> Wake {
        if !self.retry.is_empty() && !self.is_full() {
            Wake::Immediate
        } else {
            self.channel.wake()
        }
    }

    /// For a channel being dropped: forgets the refused requests (never submitted) and waits, up
    /// to `timeout`, for the base requests in flight, discarding their completions. True when
    /// none is left in flight (their buffers are back, and so is whatever they were writing).
    pub fn drain(&mut self, timeout: Duration) -> bool {
        self.retry.clear();
        let deadline = Instant::now() + timeout;
        let mut discard = Vec::new();
        while self.channel.in_flight() > 0 && Instant::now() < deadline {
            if self.channel.poll(&mut discard) == 0 {
                idle_wait(self.channel.wake());
            }
            discard.clear();
        }
        self.channel.in_flight() == 0
    }
}

/// Waits as `wake` says, for a channel being drained outside a reactor: until its time, or up
/// to 1 ms for an event on this thread's ring, or not at all.
pub fn idle_wait(wake: Wake) {
    match wake {
        Wake::At(t) => std::thread::sleep(t.saturating_duration_since(Instant::now())),
        Wake::Event => {
            if let Ok(r) = ThreadRing::current() {
                r.wait(Some(Duration::from_millis(1)));
            }
        }
        Wake::Immediate => {}
    }
}

/// When opening a stacked volume formats its base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Only a base whose block 0 is all zeroes (a new disk or file); anything else that is not
    /// a volume of this kind is refused.
    #[default]
    IfZero,
    /// Also a base whose block 0 does not start with this kind's magic: needed on bases that
    /// do not read zeroes when new, such as `crypt_xts` on a new file. A block 0 with the magic
    /// but a bad checksum is still refused, never formatted over.
    IfUnformatted,
}

impl Format {
    /// Whether a base whose block 0 is `block0` is to be formatted for a kind with `magic`.
    pub fn wants(self, block0: &[u8], magic: &[u8]) -> bool {
        block0.iter().all(|&b| b == 0)
            || (self == Format::IfUnformatted && !block0.starts_with(magic))
    }
}

/// Zeroes base blocks `first .. first + count` with `op` (unmap or write-zeroes) where the base
/// has one, else by writing zero buffers. For formatting, on the control plane.
pub fn zero_range(
    ch: &mut SyncChannel,
    first: u64,
    count: u64,
    op: Option<IoType>,
) -> Result<(), IoStatus> {
    let info = ch.channel().info().clone();
    let bs = info.block_size();
    let step = match op {
        Some(_) => u64::from(u32::MAX).min(u64::from(info.geometry().max_transfer_blocks)),
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

/// How a stacked bdev zeroes a range of a base with `caps`: (for unmap, for write-zeroes), or
/// `None` when the base cannot zero without data buffers. Unmap prefers the base's unmap where
/// unmapped blocks read zeroes (keeps thin bases thin), else its write-zeroes; write-zeroes
/// prefers the base's write-zeroes, else such an unmap.
pub fn zeroing_ops(caps: Caps) -> (Option<IoType>, Option<IoType>) {
    let unmap_zeroes = caps.contains(Caps::UNMAP | Caps::UNMAP_READS_ZEROES);
    let can_write_zeroes = caps.contains(Caps::WRITE_ZEROES);
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
    (unmap_op, zeroes_op)
}

/// Flushes the base through `ch` if it has a flush.
pub fn flush_if(ch: &mut SyncChannel, caps: Caps) -> Result<(), IoStatus> {
    if caps.contains(Caps::FLUSH) {
        let st = ch.flush();
        if !st.is_ok() {
            return Err(st);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_reuse_freed_entries() {
        let mut s = Slots::new(2);
        let a = s.insert(1).unwrap();
        let b = s.insert(2).unwrap();
        assert_eq!(s.insert(3), Err(3));
        assert_eq!(s.free_slots(), 0);
        *s.get_mut(a) += 10;
        assert_eq!(s.remove(a), 11);
        assert!(s.has_room() && !s.contains(a) && s.contains(b));
        assert_eq!(s.remove(b), 2);
    }

    #[test]
    fn lock_table_is_all_or_nothing_and_readers_share() {
        let t = LockTable::new();
        assert!(t.try_lock(10, 3, false));
        assert!(t.try_lock(11, 1, false), "readers share");
        assert!(!t.try_lock(8, 3, true), "a writer waits for the readers");
        // The failed attempt released the keys it had taken (8, 9).
        assert!(t.try_lock(8, 2, true));
        t.unlock(8, 2, true);
        t.unlock(10, 3, false);
        t.unlock(11, 1, false);
        assert!(
            t.try_lock(8 + LOCK_STRIPES as u64, 5, true),
            "stripes are modulo"
        );
        assert!(!t.try_lock(10, 1, false), "a reader waits for the writer");
    }
}
