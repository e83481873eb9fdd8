//! Online rebuild: brings a degraded child back (its dirty regions, or every region for a new
//! child or one that needs it whole) while I/O continues, on a control-plane thread of the
//! mirror's own.
//!
//! The child first takes writes (state `rebuilding`), then each region to copy is locked
//! exclusively (writes to it wait on their channel, none is lost or reordered: a write either
//! landed on the source before the copy, or reaches the child itself after), read from a
//! healthy child and written to the rebuilt one. Once every region is copied and the child
//! flushed, it is healthy, its superblock says so, and when no member misses anything the
//! bitmap is cleared, under the region locks, and written.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::bitmap::MAX_CHILDREN;
use super::{DEGRADED, HEALTHY, REBUILDING, Shared};
use crate::stacked::flush_if;
use crate::sync::SyncChannel;

/// Starts the rebuild thread if it is not running; it brings back every child marked wanted.
pub(crate) fn start(s: &Arc<Shared>) {
    let mut t = s.rebuild_thread.lock().expect("rebuild lock");
    if s.rebuild.active.load(Ordering::Acquire) {
        return;
    }
    if let Some(h) = t.take() {
        let _ = h.join();
    }
    // No progress of the last rebuild shows while this one picks its child.
    s.rebuild.done.store(0, Ordering::Release);
    s.rebuild.total.store(0, Ordering::Release);
    s.rebuild.active.store(true, Ordering::Release);
    let sh = s.clone();
    let name = format!("mirror-rebuild-{}", s.info.name());
    match std::thread::Builder::new()
        .name(name)
        .spawn(move || run(&sh))
    {
        Ok(h) => *t = Some(h),
        Err(e) => {
            s.rebuild.active.store(false, Ordering::Release);
            tracing::error!(bdev = %s.info.name(), error = %e, "mirror: cannot start the rebuild thread");
        }
    }
}

fn run(s: &Arc<Shared>) {
    loop {
        if s.stopping.load(Ordering::Acquire) {
            break;
        }
        let next = {
            let t = s.rebuild_thread.lock().expect("rebuild lock");
            let next = (0..MAX_CHILDREN).find(|&i| {
                s.rebuild.want[i].load(Ordering::Acquire) && s.child_state(i) == DEGRADED
            });
            if next.is_none() {
                // Decided under the lock `start` takes: a child wanted after this starts a new
                // thread.
                s.rebuild.active.store(false, Ordering::Release);
                drop(t);
                return;
            }
            next
        };
        let i = next.expect("a child to rebuild");
        s.rebuild.want[i].store(false, Ordering::Release);
        match rebuild_one(s, i) {
            Ok(copied) => {
                tracing::info!(bdev = %s.info.name(), child = i, regions = copied,
                    "mirror child rebuilt")
            }
            Err(e) => {
                tracing::warn!(bdev = %s.info.name(), child = i, error = %e,
                    "mirror rebuild stopped; the child stays degraded")
            }
        }
    }
    s.rebuild.active.store(false, Ordering::Release);
}

/// Channels on every child, by slot, opened on this thread.
fn open_all(s: &Shared) -> Result<Vec<Option<SyncChannel>>, String> {
    let bdevs = s.bdevs.lock().expect("bdevs lock").clone();
    bdevs
        .iter()
        .map(|b| {
            b.as_ref()
                .map(|b| b.open_channel().map(SyncChannel::new))
                .transpose()
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn lock_region(s: &Shared, r: u64) -> Result<(), String> {
    while !s.regions.try_lock(r, 1, true) {
        if s.stopping.load(Ordering::Acquire) {
            return Err("the mirror is closing".into());
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    Ok(())
}

/// Copies what child `i` misses; returns the regions copied.
fn rebuild_one(s: &Arc<Shared>, i: usize) -> Result<u64, String> {
    let mut chans = open_all(s)?;
    if chans[i].is_none() {
        return Err("the child was removed".into());
    }
    let full = s.full[i].load(Ordering::Acquire);
    let l = s.layout;
    let p = &s.rebuild;
    p.child.store(i as u8, Ordering::Release);
    p.done.store(0, Ordering::Release);
    p.total.store(
        if full { l.regions } else { s.dirty.count() },
        Ordering::Release,
    );
    if !s.move_state(i, |st| st == DEGRADED, REBUILDING) {
        return Err("the child is not degraded".into());
    }
    tracing::info!(bdev = %s.info.name(), child = i, full, regions = p.total.load(Ordering::Relaxed),
        "mirror rebuild started");
    let mut copied = 0;
    for r in 0..l.regions {
        if !full && !s.dirty.get(r) {
            continue;
        }
        if s.stopping.load(Ordering::Acquire) {
            return Err("the mirror is closing".into());
        }
        lock_region(s, r)?;
        let res = if full || s.dirty.get(r) {
            copy_region(s, &mut chans, i, r)
        } else {
            Ok(())
        };
        s.regions.unlock(r, 1, true);
        res?;
        copied += 1;
        p.done.fetch_add(1, Ordering::AcqRel);
        p.copied.fetch_add(1, Ordering::AcqRel);
        if s.child_state(i) != REBUILDING {
            return Err("the child failed during the rebuild".into());
        }
    }
    let ch = chans[i].as_mut().expect("target channel");
    let caps = ch.channel().info().caps();
    if flush_if(ch, caps).is_err() {
        s.mark_failed(i, true);
        return Err("flushing the rebuilt child failed".into());
    }
    s.md_lock_blocking();
    let done = s.move_state(i, |st| st == REBUILDING, HEALTHY);
    if done {
        s.full[i].store(false, Ordering::Release);
        s.sb_version.fetch_add(1, Ordering::AcqRel);
    }
    let r = s.write_metadata(&mut chans, false);
    if done && r.is_ok() {
        clear_bitmap(s, &mut chans)?;
    }
    s.md_unlock();
    r?;
    if !done {
        return Err("the child failed at the end of the rebuild".into());
    }
    p.rebuilds.fetch_add(1, Ordering::AcqRel);
    Ok(copied)
}

/// Copies region `r` from a healthy child to child `i` (the caller holds the region's lock).
fn copy_region(
    s: &Shared,
    chans: &mut [Option<SyncChannel>],
    i: usize,
    r: u64,
) -> Result<(), String> {
    let l = s.layout;
    let first = r * l.region_blocks;
    let n = (l.data_blocks - first).min(l.region_blocks) as u32;
    loop {
        let src = (0..MAX_CHILDREN)
            .find(|&j| j != i && s.readable() & (1 << j) != 0 && chans[j].is_some())
            .ok_or("no healthy child to copy from")?;
        let (st, data) = chans[src].as_mut().expect("source").read(first, n);
        if !st.is_ok() {
            s.mark_failed(src, false);
            continue;
        }
        let st = chans[i].as_mut().expect("target").write(first, &data);
        if !st.is_ok() {
            s.mark_failed(i, false);
            return Err(format!("writing region {r} failed: {st}"));
        }
        return Ok(());
    }
}

/// With every member healthy, clears the bitmap (each bit under its region's lock, stopping if
/// a member fails meanwhile) and writes it. The caller holds the metadata lock.
fn clear_bitmap(s: &Shared, chans: &mut [Option<SyncChannel>]) -> Result<(), String> {
    let all_healthy = |s: &Shared| {
        (0..MAX_CHILDREN).all(|j| {
            let st = s.child_state(j);
            st == HEALTHY || st == super::EMPTY
        })
    };
    for r in 0..s.layout.regions {
        if !s.dirty.get(r) {
            continue;
        }
        lock_region(s, r)?;
        let ok = all_healthy(s);
        if ok {
            s.dirty.clear(r);
            s.persisted.clear(r);
        }
        s.regions.unlock(r, 1, true);
        if !ok {
            break;
        }
    }
    s.write_metadata(chans, true)
}
