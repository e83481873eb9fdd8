//! `mirror`: RAID-1 over any bdevs (its *children*).
//!
//! - Writes, unmaps and write-zeroes go to every child that takes writes (healthy, or being
//!   rebuilt) and complete once all of them have: successfully when at least one child did. A
//!   child that fails a request is marked degraded, and I/O continues on the others.
//! - Reads go to one healthy child: the one with the fewest requests on it from this channel,
//!   in turn among equals (so a deep queue uses every child, and a slower child gets fewer); a
//!   channel is as deep as its children together. A failed read is retried on another healthy
//!   child.
//! - Flush goes to every child that takes writes. A child that fails a flush may have lost
//!   writes it acknowledged, so it is marked for a full rebuild.
//! - A persistent dirty-region bitmap ([`bitmap`], on every child, after the data) records the
//!   regions a degraded child misses: a write that a child misses is acknowledged only once its
//!   regions are marked dirty, and the superblock recording that child as stale is written, on
//!   the children that take writes. A returning child (`mirror_add_child` with its name, or a
//!   restart that finds it stale) is then resynced from the dirty regions only; a new child, or
//!   one that failed a flush, is rebuilt whole ([`rebuild`]), online, while I/O continues.
//!
//! Shared state is atomics: child states, the bitmap, the region try-locks
//! ([`crate::stacked::LockTable`]) that keep a rebuild's copy of a region and writes to it
//! apart. Each channel opens a channel on every child; nothing is allocated per request.
//!
//! Limits: every child must open for the mirror to open (a child that cannot open is a
//! configuration error naming it); at most [`MAX_CHILDREN`] children; an unclean shutdown with
//! every child healthy does not resync (no write-intent logging on the healthy path: writes in
//! flight at a crash may differ between children, as on a single disk they may or may not have
//! landed).

pub mod bitmap;
mod channel;
pub mod rebuild;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use self::bitmap::{Bitmap, Layout, MAX_CHILDREN, MemberState, Superblock, random_id};
use crate::bdev::{Bdev, BdevInfo, Channel};
use crate::decl::{BaseRef, BdevKind, ByteSize};
use crate::error::BdevError;
use crate::stacked::{LockTable, flush_if};
use crate::sync::SyncChannel;
use crate::types::{BlockSize, Caps};

/// The kind name.
pub const KIND: &str = "mirror";
/// Default region of the dirty bitmap: 1 MiB.
pub const DEFAULT_REGION_SIZE: u64 = 1 << 20;

/// `kind = "mirror"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorDecl {
    /// Unique name.
    pub name: String,
    /// The bdevs it mirrors (1 to 8, each once, all of one size and block size).
    pub children: Vec<String>,
    /// Bytes of data one bit of the dirty bitmap covers: a power of two, at least one block
    /// (default 1 MiB).
    #[serde(default = "default_region_size")]
    pub region_size: ByteSize,
    /// On first format, take the children as equal (all new and zeroed) instead of copying the
    /// first child to the others (default false; mdadm's `--assume-clean`).
    #[serde(default)]
    pub assume_clean: bool,
}

fn default_region_size() -> ByteSize {
    ByteSize(DEFAULT_REGION_SIZE)
}

/// `kind = "mirror"`: RAID-1 over its children.
pub struct MirrorKind;

impl BdevKind for MirrorKind {
    const NAME: &'static str = KIND;
    type Config = MirrorDecl;
    fn name(c: &MirrorDecl) -> &str {
        &c.name
    }
    fn bases(c: &MirrorDecl) -> Vec<BaseRef<'_>> {
        c.children
            .iter()
            .enumerate()
            .map(|(i, n)| BaseRef {
                field: format!("children[{i}]"),
                name: n,
            })
            .collect()
    }
    fn validate(c: &MirrorDecl) -> Result<(), BdevError> {
        if c.children.is_empty() {
            return Err(BdevError::invalid(
                "children",
                "is empty: a mirror needs at least one child",
            ));
        }
        if c.children.len() > MAX_CHILDREN {
            return Err(BdevError::invalid(
                "children",
                format!("has {} entries; at most {MAX_CHILDREN}", c.children.len()),
            ));
        }
        for (i, n) in c.children.iter().enumerate() {
            if let Some(j) = c.children[..i].iter().position(|m| m == n) {
                return Err(BdevError::invalid(
                    format!("children[{i}]"),
                    format!("'{n}' is already children[{j}]: a child is used once"),
                ));
            }
            if n == &c.name {
                return Err(BdevError::invalid(
                    format!("children[{i}]"),
                    "a mirror cannot be its own child",
                ));
            }
        }
        let r = c.region_size.0;
        if !r.is_power_of_two() || r < 512 {
            return Err(BdevError::invalid(
                "region_size",
                format!("{r} is not a power of two of at least one block"),
            ));
        }
        Ok(())
    }
    fn build(c: &MirrorDecl, bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(MirrorBdev::open(
            &c.name,
            bases,
            c.region_size.0,
            c.assume_clean,
        )?))
    }
    fn set_bases(c: &mut MirrorDecl, bases: &[String]) {
        c.children = bases.to_vec();
    }
}

/// A child's state, as the data path sees it.
pub(crate) const EMPTY: u8 = 0;
pub(crate) const HEALTHY: u8 = 1;
pub(crate) const REBUILDING: u8 = 2;
pub(crate) const DEGRADED: u8 = 3;

fn state_name(s: u8) -> &'static str {
    match s {
        HEALTHY => "healthy",
        REBUILDING => "rebuilding",
        DEGRADED => "degraded",
        _ => "empty",
    }
}

/// Progress of the rebuild running now, if any.
#[derive(Default)]
pub(crate) struct RebuildProgress {
    pub(crate) active: AtomicBool,
    pub(crate) child: AtomicU8,
    pub(crate) done: AtomicU64,
    pub(crate) total: AtomicU64,
    /// Regions copied by every rebuild so far.
    pub(crate) copied: AtomicU64,
    pub(crate) rebuilds: AtomicU64,
    /// Degraded children to bring back (asked for over the RPC, or found stale at open).
    pub(crate) want: [AtomicBool; MAX_CHILDREN],
}

/// What every channel of a mirror shares.
pub(crate) struct Shared {
    pub(crate) info: Arc<BdevInfo>,
    pub(crate) layout: Layout,
    pub(crate) bs: BlockSize,
    pub(crate) mirror_id: u64,
    /// Child states, four bits per slot, in one word: the data path reads them with one load.
    pub(crate) states: AtomicU32,
    /// Whether a degraded child needs a full rebuild (else its dirty regions).
    pub(crate) full: [AtomicBool; MAX_CHILDREN],
    pub(crate) ids: [AtomicU64; MAX_CHILDREN],
    /// The children by slot; read by channels when `epoch` changes (control plane only).
    pub(crate) bdevs: Mutex<[Option<Arc<dyn Bdev>>; MAX_CHILDREN]>,
    pub(crate) epoch: AtomicU64,
    /// Regions that may differ between children.
    pub(crate) dirty: Bitmap,
    /// Of those, the ones written as dirty in the bitmap of every child taking writes.
    pub(crate) persisted: Bitmap,
    /// Bumped after every member state change the superblock records.
    pub(crate) sb_version: AtomicU64,
    /// The highest `sb_version` whose superblock is on every child taking writes.
    pub(crate) sb_persisted: AtomicU64,
    pub(crate) generation: AtomicU64,
    /// Held while the superblock and bitmap are written, so those writes never cross.
    pub(crate) md_lock: AtomicBool,
    /// Region locks: shared by writes, exclusive by a rebuild copying or clearing the region.
    pub(crate) regions: LockTable,
    pub(crate) rebuild: RebuildProgress,
    pub(crate) caps: Caps,
    pub(crate) max_transfer_blocks: u32,
    pub(crate) max_segments: u32,
    /// The rebuild thread, joined on drop.
    pub(crate) rebuild_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) stopping: AtomicBool,
}

impl Shared {
    pub(crate) fn child_state(&self, i: usize) -> u8 {
        ((self.states.load(Ordering::Acquire) >> (4 * i)) & 0xF) as u8
    }

    /// Sets child `i`'s state.
    pub(crate) fn set_state(&self, i: usize, to: u8) {
        self.move_state(i, |_| true, to);
    }

    /// Moves child `i` to `to` if its state passes `from`; true if it did.
    pub(crate) fn move_state(&self, i: usize, from: impl Fn(u8) -> bool, to: u8) -> bool {
        self.states
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                from(((w >> (4 * i)) & 0xF) as u8)
                    .then_some(w & !(0xF << (4 * i)) | (u32::from(to) << (4 * i)))
            })
            .is_ok()
    }

    /// Children taking writes (healthy or being rebuilt), as a bit mask.
    pub(crate) fn writable(&self) -> u8 {
        self.mask(|s| s == HEALTHY || s == REBUILDING)
    }

    /// Children serving reads.
    pub(crate) fn readable(&self) -> u8 {
        self.mask(|s| s == HEALTHY)
    }

    /// Members that take no writes (degraded).
    pub(crate) fn degraded(&self) -> u8 {
        self.mask(|s| s == DEGRADED)
    }

    /// [`Shared::writable`] and [`Shared::degraded`] from one look at the states.
    #[inline]
    pub(crate) fn write_masks(&self) -> (u8, u8) {
        let w = self.states.load(Ordering::Acquire);
        let (mut writable, mut degraded) = (0, 0);
        for i in 0..MAX_CHILDREN {
            match ((w >> (4 * i)) & 0xF) as u8 {
                HEALTHY | REBUILDING => writable |= 1 << i,
                DEGRADED => degraded |= 1 << i,
                _ => {}
            }
        }
        (writable, degraded)
    }

    #[inline]
    fn mask(&self, f: impl Fn(u8) -> bool) -> u8 {
        let w = self.states.load(Ordering::Acquire);
        let mut m = 0;
        for i in 0..MAX_CHILDREN {
            if f(((w >> (4 * i)) & 0xF) as u8) {
                m |= 1 << i;
            }
        }
        m
    }

    /// Marks child `i` degraded after a failure (and, if `full`, for a full rebuild); true if
    /// this call changed its state.
    pub(crate) fn mark_failed(&self, i: usize, full: bool) -> bool {
        if full {
            self.full[i].store(true, Ordering::Release);
        }
        let changed = self.move_state(i, |s| s == HEALTHY || s == REBUILDING, DEGRADED);
        if changed || full {
            self.sb_version.fetch_add(1, Ordering::AcqRel);
        }
        if changed {
            tracing::warn!(bdev = %self.info.name(), child = i, full,
                "mirror child failed; marked degraded, I/O continues on the others");
        }
        changed
    }

    /// The superblock for the child in slot `self_slot` as the state is now.
    pub(crate) fn superblock(&self, self_slot: usize, generation: u64) -> Superblock {
        let mut ids = [0; MAX_CHILDREN];
        let mut states = [MemberState::InSync; MAX_CHILDREN];
        for i in 0..MAX_CHILDREN {
            ids[i] = self.ids[i].load(Ordering::Acquire);
            let s = self.child_state(i);
            states[i] = if s == HEALTHY || s == EMPTY {
                MemberState::InSync
            } else if self.full[i].load(Ordering::Acquire) {
                MemberState::Full
            } else {
                MemberState::Stale
            };
        }
        Superblock {
            block_size: self.bs.bytes(),
            data_blocks: self.layout.data_blocks,
            region_blocks: self.layout.region_blocks,
            mirror_id: self.mirror_id,
            generation,
            self_id: ids[self_slot],
            ids,
            states,
        }
    }

    pub(crate) fn try_md_lock(&self) -> bool {
        self.md_lock
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub(crate) fn md_unlock(&self) {
        self.md_lock.store(false, Ordering::Release);
    }

    /// Takes the metadata lock from the control plane, sleeping between tries.
    pub(crate) fn md_lock_blocking(&self) {
        while !self.try_md_lock() {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Writes the superblock (and, if `bitmap`, the whole bitmap) to every child taking writes,
    /// through `chans` (control plane; the caller holds the metadata lock). Children failing it
    /// are marked degraded; an error if none took it.
    pub(crate) fn write_metadata(
        &self,
        chans: &mut [Option<SyncChannel>],
        bitmap: bool,
    ) -> Result<(), String> {
        let bs = self.bs.bytes() as usize;
        let version = self.sb_version.load(Ordering::Acquire);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut bm = Vec::new();
        if bitmap {
            bm = vec![0u8; self.layout.bitmap_blocks as usize * bs];
            self.dirty.snapshot(self.bs, 0, &mut bm);
        }
        let mut ok = 0;
        for (i, ch) in chans.iter_mut().enumerate() {
            let Some(ch) = ch else { continue };
            if self.writable() & (1 << i) == 0 {
                continue;
            }
            let mut sb = vec![0u8; bs];
            self.superblock(i, generation).encode(&mut sb);
            let mut good = ch.write(self.layout.sb_block, &sb).is_ok();
            if good && bitmap {
                good = ch.write(self.layout.sb_block + 1, &bm).is_ok();
            }
            let caps = ch.channel().info().caps();
            good = good && flush_if(ch, caps).is_ok();
            if good {
                ok += 1;
            } else {
                self.mark_failed(i, false);
            }
        }
        if ok == 0 {
            return Err("no child took the mirror's metadata".into());
        }
        if bitmap {
            self.persisted.merge(self.bs, 0, &bm);
        }
        self.sb_persisted.fetch_max(version, Ordering::AcqRel);
        Ok(())
    }
}

/// A mirror over its children.
pub struct MirrorBdev {
    shared: Arc<Shared>,
}

impl Drop for MirrorBdev {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let t = self
            .shared
            .rebuild_thread
            .lock()
            .expect("rebuild lock")
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

fn read_superblock(
    ch: &mut SyncChannel,
    block: u64,
    field: &str,
) -> Result<Option<Superblock>, BdevError> {
    let (st, b) = ch.read(block, 1);
    if !st.is_ok() {
        return Err(BdevError::invalid(
            field,
            format!("reading the mirror superblock failed: {st}"),
        ));
    }
    Superblock::decode(&b).map_err(|e| BdevError::invalid(field, e))
}

impl MirrorBdev {
    /// Opens (formatting on first use) a mirror named `name` over `children`, with dirty
    /// regions of `region_size` bytes. Errors name the child at fault (`children[1]`).
    pub fn open(
        name: &str,
        children: Vec<Arc<dyn Bdev>>,
        region_size: u64,
        assume_clean: bool,
    ) -> Result<MirrorBdev, BdevError> {
        if children.is_empty() || children.len() > MAX_CHILDREN {
            return Err(BdevError::invalid(
                "children",
                format!("needs 1 to {MAX_CHILDREN} children"),
            ));
        }
        let g0 = children[0].info().geometry();
        let bs = g0.block_size;
        let mut caps = Caps::READ
            | Caps::WRITE
            | Caps::FLUSH
            | Caps::UNMAP
            | Caps::WRITE_ZEROES
            | Caps::RETAINS_DATA
            | Caps::UNMAP_READS_ZEROES
            | Caps::PERSISTENT;
        let mut max_transfer = u32::MAX;
        let mut max_segments = u32::MAX;
        let mut volatile = false;
        for (i, c) in children.iter().enumerate() {
            let g = c.info().geometry();
            let field = format!("children[{i}]");
            check_child(&field, c, bs, g0.block_count)?;
            for cap in [
                Caps::FLUSH,
                Caps::UNMAP,
                Caps::WRITE_ZEROES,
                Caps::UNMAP_READS_ZEROES,
                Caps::PERSISTENT,
            ] {
                if !g.caps.contains(cap) {
                    caps = caps.without(cap);
                }
            }
            volatile |= g.caps.contains(Caps::VOLATILE_CACHE);
            max_transfer = max_transfer.min(g.max_transfer_blocks);
            max_segments = max_segments.min(g.max_segments);
        }
        if volatile {
            caps = caps | Caps::VOLATILE_CACHE;
        }
        let region_blocks = (region_size >> bs.shift()).max(1);
        let layout = Layout::for_child(bs, region_blocks, g0.block_count).ok_or_else(|| {
            BdevError::invalid(
                "children[0]",
                format!(
                    "{} blocks is too small for a mirror (data, superblock and bitmap)",
                    g0.block_count
                ),
            )
        })?;
        // A request spans at most two regions: region locks stay few.
        let max_transfer = max_transfer.min(region_blocks as u32).max(1);

        // Read every child's superblock.
        let mut chans: Vec<Option<SyncChannel>> = Vec::with_capacity(children.len());
        let mut found = Vec::with_capacity(children.len());
        for (i, c) in children.iter().enumerate() {
            let field = format!("children[{i}]");
            let mut ch = SyncChannel::new(c.open_channel().map_err(|e| {
                BdevError::invalid(field.clone(), format!("opening a channel failed: {e}"))
            })?);
            let sb = read_superblock(&mut ch, layout.sb_block, &field)?;
            found.push(sb);
            chans.push(Some(ch));
        }
        // The newest superblock of this mirror is the authority.
        let authority = found
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|s| (i, s)))
            .max_by_key(|(_, s)| s.generation)
            .map(|(i, s)| (i, s.clone()));
        let info = BdevInfo::builder(name, KIND, bs, layout.data_blocks, caps)
            .buf_align(g0.buf_align)
            .max_transfer_blocks(max_transfer)
            .max_segments(max_segments)
            .build();
        let mirror_id = authority
            .as_ref()
            .map_or_else(random_id, |(_, s)| s.mirror_id);
        let shared = Arc::new(Shared {
            info,
            layout,
            bs,
            mirror_id,
            states: AtomicU32::new(0),
            full: std::array::from_fn(|_| AtomicBool::new(false)),
            ids: std::array::from_fn(|_| AtomicU64::new(0)),
            bdevs: Mutex::new(std::array::from_fn(|_| None)),
            epoch: AtomicU64::new(1),
            dirty: Bitmap::new(bs, layout.bitmap_blocks),
            persisted: Bitmap::new(bs, layout.bitmap_blocks),
            sb_version: AtomicU64::new(1),
            sb_persisted: AtomicU64::new(0),
            generation: AtomicU64::new(authority.as_ref().map_or(0, |(_, s)| s.generation)),
            md_lock: AtomicBool::new(false),
            regions: LockTable::new(),
            rebuild: RebuildProgress::default(),
            caps,
            max_transfer_blocks: max_transfer,
            max_segments,
            rebuild_thread: Mutex::new(None),
            stopping: AtomicBool::new(false),
        });
        let mut stale = Vec::new();
        match &authority {
            None => {
                // A new mirror: child 0 is the reference, the others copy it (or are taken as
                // equal with `assume_clean`).
                for (i, _) in children.iter().enumerate() {
                    shared.ids[i].store(random_id(), Ordering::Release);
                    let copy = i > 0 && !assume_clean;
                    shared.set_state(i, if copy { DEGRADED } else { HEALTHY });
                    if copy {
                        shared.full[i].store(true, Ordering::Release);
                        stale.push(i);
                    }
                }
                tracing::info!(bdev = %name, children = children.len(),
                    data_blocks = layout.data_blocks, "formatting a new mirror");
            }
            Some((a, sb)) => {
                let asb = sb;
                if asb.block_size != bs.bytes()
                    || asb.data_blocks != layout.data_blocks
                    || asb.region_blocks != layout.region_blocks
                {
                    return Err(BdevError::invalid(
                        format!("children[{a}]"),
                        format!(
                            "holds a mirror of {} blocks of {} bytes with {}-block regions; \
                             this declaration makes {} blocks of {} with {}-block regions",
                            asb.data_blocks,
                            asb.block_size,
                            asb.region_blocks,
                            layout.data_blocks,
                            bs.bytes(),
                            layout.region_blocks
                        ),
                    ));
                }
                // The authority's bitmap: the regions stale members miss.
                let ach = chans[*a].as_mut().expect("channel");
                let (st, bm) = ach.read(layout.sb_block + 1, layout.bitmap_blocks as u32);
                if !st.is_ok() {
                    return Err(BdevError::invalid(
                        format!("children[{a}]"),
                        format!("reading the mirror bitmap failed: {st}"),
                    ));
                }
                shared.dirty.merge(bs, 0, &bm);
                shared.persisted.merge(bs, 0, &bm);
                for (i, f) in found.iter().enumerate() {
                    let field = format!("children[{i}]");
                    let member = f.as_ref().and_then(|s| {
                        (s.mirror_id == asb.mirror_id)
                            .then(|| asb.ids.iter().position(|&id| id == s.self_id && id != 0))
                            .flatten()
                    });
                    if let Some(s) = f
                        && s.mirror_id != asb.mirror_id
                    {
                        return Err(BdevError::invalid(
                            field,
                            "holds another mirror's superblock; refusing to overwrite it",
                        ));
                    }
                    match member {
                        Some(slot) => {
                            shared.ids[i].store(asb.ids[slot], Ordering::Release);
                            match asb.states[slot] {
                                MemberState::InSync => shared.set_state(i, HEALTHY),
                                st => {
                                    shared.set_state(i, DEGRADED);
                                    shared.full[i]
                                        .store(st == MemberState::Full, Ordering::Release);
                                    stale.push(i);
                                }
                            }
                        }
                        None => {
                            // Not (or no longer) a member: a new child, rebuilt whole.
                            shared.ids[i].store(random_id(), Ordering::Release);
                            shared.set_state(i, DEGRADED);
                            shared.full[i].store(true, Ordering::Release);
                            stale.push(i);
                        }
                    }
                }
                if shared.readable() == 0 {
                    return Err(BdevError::invalid(
                        "children",
                        "no child is in sync (the children holding the newest data are missing)",
                    ));
                }
            }
        }
        {
            let mut b = shared.bdevs.lock().expect("bdevs lock");
            for (i, c) in children.into_iter().enumerate() {
                b[i] = Some(c);
            }
        }
        shared.md_lock_blocking();
        let r = shared.write_metadata(&mut chans, authority.is_none());
        shared.md_unlock();
        r.map_err(|e| BdevError::invalid("children", e))?;
        drop(chans);
        let m = MirrorBdev { shared };
        for &i in &stale {
            m.shared.rebuild.want[i].store(true, Ordering::Release);
        }
        if !stale.is_empty() {
            tracing::info!(bdev = %name, ?stale, dirty_regions = m.shared.dirty.count(),
                "mirror children to resync");
            rebuild::start(&m.shared);
        }
        Ok(m)
    }

    /// Regions marked dirty now.
    pub fn dirty_regions(&self) -> u64 {
        self.shared.dirty.count()
    }

    /// Regions copied by rebuilds since open.
    pub fn regions_copied(&self) -> u64 {
        self.shared.rebuild.copied.load(Ordering::Acquire)
    }

    /// Whether a rebuild is running or waiting to run.
    pub fn rebuilding(&self) -> bool {
        self.shared.rebuild.active.load(Ordering::Acquire)
            || (0..MAX_CHILDREN).any(|i| self.shared.child_state(i) == REBUILDING)
    }

    /// Child states by slot (`healthy`, `degraded`, `rebuilding`), for the occupied slots.
    pub fn child_states(&self) -> Vec<&'static str> {
        let bdevs = self.shared.bdevs.lock().expect("bdevs lock");
        (0..MAX_CHILDREN)
            .filter(|&i| bdevs[i].is_some())
            .map(|i| state_name(self.shared.child_state(i)))
            .collect()
    }

    /// Adds `child` (a new bdev, rebuilt whole), or takes back a degraded member of that name
    /// (resynced from the dirty regions, or whole if it needs it); the rebuild runs online.
    pub fn add_child(&self, child: Arc<dyn Bdev>) -> Result<serde_json::Value, BdevError> {
        let s = &self.shared;
        let mut bdevs = s.bdevs.lock().expect("bdevs lock");
        let name = child.info().name().to_string();
        if let Some(i) =
            (0..MAX_CHILDREN).find(|&i| bdevs[i].as_ref().is_some_and(|b| b.info().name() == name))
        {
            if s.child_state(i) != DEGRADED {
                return Err(BdevError::invalid(
                    "child",
                    format!(
                        "'{name}' is already a {} child",
                        state_name(s.child_state(i))
                    ),
                ));
            }
            drop(bdevs);
            s.rebuild.want[i].store(true, Ordering::Release);
            rebuild::start(s);
            return Ok(self.describe());
        }
        let i = (0..MAX_CHILDREN)
            .find(|&i| bdevs[i].is_none())
            .ok_or_else(|| {
                BdevError::invalid("child", format!("the mirror has {MAX_CHILDREN} children"))
            })?;
        check_child("child", &child, s.bs, self.child_blocks(&bdevs))?;
        let g = child.info().geometry();
        for cap in [Caps::FLUSH, Caps::UNMAP, Caps::WRITE_ZEROES] {
            if s.caps.contains(cap) && !g.caps.contains(cap) {
                return Err(BdevError::invalid(
                    "child",
                    format!("lacks {:?} that the mirror offers", cap.names()),
                ));
            }
        }
        if g.max_transfer_blocks < s.max_transfer_blocks || g.max_segments < s.max_segments {
            return Err(BdevError::invalid(
                "child",
                "takes smaller transfers than the mirror offers",
            ));
        }
        s.ids[i].store(random_id(), Ordering::Release);
        s.full[i].store(true, Ordering::Release);
        s.set_state(i, DEGRADED);
        bdevs[i] = Some(child);
        s.sb_version.fetch_add(1, Ordering::AcqRel);
        s.epoch.fetch_add(1, Ordering::AcqRel);
        drop(bdevs);
        tracing::info!(bdev = %s.info.name(), child = %name, slot = i, "mirror child added");
        s.rebuild.want[i].store(true, Ordering::Release);
        rebuild::start(s);
        Ok(self.describe())
    }

    fn child_blocks(&self, bdevs: &[Option<Arc<dyn Bdev>>; MAX_CHILDREN]) -> u64 {
        bdevs
            .iter()
            .flatten()
            .map(|b| b.info().block_count())
            .next()
            .unwrap_or(0)
    }

    /// Removes the child named `name`; refused for the last healthy child.
    pub fn remove_child(&self, name: &str) -> Result<serde_json::Value, BdevError> {
        let s = &self.shared;
        let mut bdevs = s.bdevs.lock().expect("bdevs lock");
        let i = (0..MAX_CHILDREN)
            .find(|&i| bdevs[i].as_ref().is_some_and(|b| b.info().name() == name))
            .ok_or_else(|| BdevError::invalid("child", format!("'{name}' is not a child")))?;
        if s.readable() & !(1 << i) == 0 {
            return Err(BdevError::invalid(
                "child",
                format!("'{name}' is the last healthy child"),
            ));
        }
        if s.rebuild.active.load(Ordering::Acquire)
            && usize::from(s.rebuild.child.load(Ordering::Acquire)) == i
        {
            return Err(BdevError::invalid(
                "child",
                format!("'{name}' is being rebuilt; wait for the rebuild to end"),
            ));
        }
        s.set_state(i, EMPTY);
        s.ids[i].store(0, Ordering::Release);
        s.full[i].store(false, Ordering::Release);
        bdevs[i] = None;
        s.sb_version.fetch_add(1, Ordering::AcqRel);
        s.epoch.fetch_add(1, Ordering::AcqRel);
        let rest: Vec<Arc<dyn Bdev>> = bdevs.iter().flatten().cloned().collect();
        drop(bdevs);
        // Record the removal on the remaining children.
        let mut chans: Vec<Option<SyncChannel>> = (0..MAX_CHILDREN).map(|_| None).collect();
        {
            let bdevs = s.bdevs.lock().expect("bdevs lock");
            for (j, b) in bdevs.iter().enumerate() {
                if let Some(b) = b {
                    chans[j] = Some(SyncChannel::new(b.open_channel()?));
                }
            }
        }
        drop(rest);
        s.md_lock_blocking();
        let r = s.write_metadata(&mut chans, false);
        s.md_unlock();
        r.map_err(|e| BdevError::invalid("child", e))?;
        tracing::info!(bdev = %s.info.name(), child = %name, "mirror child removed");
        Ok(self.describe())
    }

    /// The names of the children by slot order.
    pub fn children(&self) -> Vec<String> {
        self.shared
            .bdevs
            .lock()
            .expect("bdevs lock")
            .iter()
            .flatten()
            .map(|b| b.info().name().to_string())
            .collect()
    }
}

/// Checks a child's block size, size and capabilities; errors name `field`.
fn check_child(
    field: &str,
    c: &Arc<dyn Bdev>,
    bs: BlockSize,
    blocks: u64,
) -> Result<(), BdevError> {
    let g = c.info().geometry();
    if g.block_size != bs {
        return Err(BdevError::invalid(
            field,
            format!(
                "'{}' has {}-byte blocks; the first child has {bs}",
                c.info().name(),
                g.block_size
            ),
        ));
    }
    if g.block_count != blocks {
        return Err(BdevError::invalid(
            field,
            format!(
                "'{}' has {} blocks; the first child has {blocks} (children are one size)",
                c.info().name(),
                g.block_count
            ),
        ));
    }
    if !g
        .caps
        .contains(Caps::READ | Caps::WRITE | Caps::RETAINS_DATA)
        || c.info().is_read_only()
    {
        return Err(BdevError::invalid(
            field,
            format!(
                "'{}' must be readable and writable and keep data",
                c.info().name()
            ),
        ));
    }
    Ok(())
}

impl Bdev for MirrorBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.shared.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        channel::open(&self.shared)
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        self.shared
            .bdevs
            .lock()
            .expect("bdevs lock")
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    fn describe(&self) -> serde_json::Value {
        let s = &self.shared;
        let bdevs = s.bdevs.lock().expect("bdevs lock");
        let children: Vec<serde_json::Value> = (0..MAX_CHILDREN)
            .filter_map(|i| {
                bdevs[i].as_ref().map(|b| {
                    serde_json::json!({
                        "name": b.info().name(),
                        "state": state_name(s.child_state(i)),
                        "full_rebuild": s.child_state(i) != HEALTHY
                            && s.full[i].load(Ordering::Acquire),
                    })
                })
            })
            .collect();
        let r = &s.rebuild;
        let active = r.active.load(Ordering::Acquire);
        serde_json::json!({
            "children": children,
            "region_size": s.layout.region_blocks << s.bs.shift(),
            "regions": s.layout.regions,
            "dirty_regions": s.dirty.count(),
            "rebuild": if active {
                let c = usize::from(r.child.load(Ordering::Acquire));
                serde_json::json!({
                    "child": bdevs[c].as_ref().map(|b| b.info().name().to_string()),
                    "regions_done": r.done.load(Ordering::Acquire),
                    "regions_total": r.total.load(Ordering::Acquire),
                })
            } else {
                serde_json::Value::Null
            },
            "regions_copied": r.copied.load(Ordering::Acquire),
            "rebuilds_completed": r.rebuilds.load(Ordering::Acquire),
        })
    }

    fn add_base(&self, base: Arc<dyn Bdev>) -> Result<serde_json::Value, BdevError> {
        self.add_child(base)
    }

    fn remove_base(&self, name: &str) -> Result<serde_json::Value, BdevError> {
        self.remove_child(name)
    }
}
