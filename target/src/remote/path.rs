//! The paths of an `nvmf` bdev: the state the control thread and the channels share, and the
//! control thread.
//!
//! Per path, [`PathShared`] holds whether the controller is up (and since when it is down),
//! its ANA state, a generation bumped at each reconnect, and behind a mutex (control plane
//! only: a channel takes it when it lacks a queue, never per request) the spare I/O queues
//! the control thread connected ahead and the queue identifiers still free.
//!
//! The control thread ([`start`]) owns the controllers (admin queues and their keep-alive).
//! Each controller that supports them keeps an Asynchronous Event Request outstanding (the
//! initiator's admin thread): a Namespace Attribute Changed event makes the control thread
//! read the Changed Namespace List and identify the namespace again (a resize of the remote
//! reaches the bdev's listeners), an ANA Change event makes it read the ANA log page again,
//! and a failed admin queue marks the path lost at once. The control thread wakes when
//! kicked (an event, or a channel that lost a queue or wants one) or every [`REFRESH`]: it
//! reconnects lost paths with back-off, keeps [`SPARES`] I/O queues ready per path (more
//! while channels wait), reads the ANA log page again of paths whose state is not usable,
//! and only for a controller without asynchronous events falls back to identifying the
//! namespace each time (liveness and resize by polling). When it declares a controller lost
//! it shuts down the sockets of that controller's I/O queues, so that a channel sleeping on
//! one (a remote that stopped answering closes nothing) wakes and moves its commands to
//! another path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferroblk_bdev::bdev::BdevInfo;

use crate::subsystem::Trtype;

use super::Policy;
use crate::initiator::{
    AbortToken, AdminEvent, ConnectOptions, Controller, Error as InitError, IoQueue, IoQueueOptions,
};
use crate::spec::command::async_event_notice;
use crate::spec::features::AsyncEventConfig;
use crate::spec::identify::cmic;
use crate::spec::log::{LogPageId, ana_state_of};

/// How often the control thread wakes without events (reconnects, unusable ANA states, and
/// for controllers without asynchronous events the namespace's size and liveness).
pub const REFRESH: Duration = Duration::from_secs(1);
/// I/O queues kept connected ahead per path, so a new channel starts without waiting.
pub const SPARES: usize = 1;
/// The back-off between reconnect attempts grows up to this many times `reconnect_delay`.
const MAX_BACKOFF_FACTOR: u32 = 8;

/// ANA states (NVMe Base 2.0 §8.1.3; [`crate::spec::log::ana_state`]) and their rank for path
/// choice.
pub mod ana {
    pub use crate::spec::log::ana_state::*;

    /// The preference of a state for I/O: lower is better; `None`: not usable.
    pub fn rank(state: u8) -> Option<u8> {
        match state {
            OPTIMIZED => Some(0),
            NON_OPTIMIZED => Some(1),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the control thread gives the channels of one path.
#[derive(Default)]
pub struct PathPool {
    /// Connected I/O queues no channel uses yet, with the generation they belong to.
    pub spares: Vec<(IoQueue, u64)>,
    /// Queue identifiers of the current controller not in use.
    pub free_qids: Vec<u16>,
    /// Channels waiting for a queue of this path.
    pub waiting: usize,
    /// The connections of the current controller's I/O queues (spare or in a channel), by
    /// queue identifier: ended when the controller is declared lost, so that a channel
    /// sleeping on a silent connection wakes and moves its commands. An entry leaves (under
    /// the lock) before its queue is closed, so every token here is of a live queue.
    sockets: Vec<(u16, AbortToken)>,
}

impl PathPool {
    /// Queue `qid` of the current controller is closed (by a channel, after this call):
    /// its identifier is free again.
    pub fn release(&mut self, qid: u16) {
        self.sockets.retain(|(q, _)| *q != qid);
        self.free_qids.push(qid);
    }

    /// Ends every connection of the current controller's I/O queues: their owners see the
    /// connection end and fail over.
    fn shut_down_sockets(&mut self) {
        for (_, token) in self.sockets.drain(..) {
            // SAFETY: entries leave `sockets` under this lock before their queue closes.
            unsafe { token.abort() };
        }
    }
}

/// One path's shared state.
pub struct PathShared {
    /// The transport.
    pub trtype: Trtype,
    /// The controller's address.
    pub addr: SocketAddr,
    /// Milliseconds since [`Shared::epoch`] at which the path went down; 0 while up.
    down_since_ms: AtomicU64,
    /// The ANA state of the namespace through this path ([`ana`]).
    ana: AtomicU8,
    /// Bumped each time the controller is (re)connected.
    generation: AtomicU64,
    /// Events the admin thread reported and the control thread has not handled
    /// ([`EVENT_NS_CHANGED`], [`EVENT_ANA_CHANGED`], [`EVENT_LOST`]).
    events: AtomicU8,
    /// Whether the current controller reports namespace changes by asynchronous events
    /// (otherwise the control thread polls Identify Namespace).
    async_events: AtomicBool,
    /// Asynchronous events received (for `bdev_list`).
    pub events_received: AtomicU64,
    /// Identify Namespace polls made for lack of asynchronous events (for `bdev_list`).
    pub identify_polls: AtomicU64,
    /// Spare queues and free queue identifiers.
    pub pool: Mutex<PathPool>,
}

impl PathShared {
    /// A path to `addr`, down until its controller is connected.
    pub fn new(trtype: Trtype, addr: SocketAddr) -> PathShared {
        PathShared {
            trtype,
            addr,
            down_since_ms: AtomicU64::new(1),
            ana: AtomicU8::new(ana::OPTIMIZED),
            generation: AtomicU64::new(0),
            events: AtomicU8::new(0),
            async_events: AtomicBool::new(false),
            events_received: AtomicU64::new(0),
            identify_polls: AtomicU64::new(0),
            pool: Mutex::new(PathPool::default()),
        }
    }

    /// Whether the controller is connected.
    pub fn is_up(&self) -> bool {
        self.down_since_ms.load(Ordering::Acquire) == 0
    }

    /// The ANA state.
    pub fn ana(&self) -> u8 {
        self.ana.load(Ordering::Relaxed)
    }

    /// Records the ANA state the controller reported (or implied by a command's status).
    pub fn set_ana(&self, state: u8) {
        self.ana.store(state, Ordering::Relaxed);
    }

    /// The controller's generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A Namespace Attribute Changed event arrived.
const EVENT_NS_CHANGED: u8 = 1 << 0;
/// An ANA Change event arrived.
const EVENT_ANA_CHANGED: u8 = 1 << 1;
/// The admin queue failed.
const EVENT_LOST: u8 = 1 << 2;

/// What the bdev, its channels and its control thread share.
pub struct Shared {
    /// The bdev's info.
    pub info: Arc<BdevInfo>,
    /// The remote namespace.
    pub nsid: u32,
    /// Path selection.
    pub policy: Policy,
    /// How long I/O waits while no path is usable.
    pub ctrl_loss_tmo: Duration,
    reconnect_delay: Duration,
    io_queues: u16,
    /// How each I/O queue is created.
    pub qopts: IoQueueOptions,
    opts: ConnectOptions,
    /// The paths, in declaration order.
    pub paths: Vec<PathShared>,
    /// Reference point of the paths' `down_since_ms`.
    pub epoch: Instant,
    /// The controllers, by path (the control thread connects them; `resize` reads them).
    ctrls: Mutex<Vec<Option<Arc<Controller>>>>,
    stop: AtomicBool,
    kicked: Mutex<bool>,
    wake: Condvar,
    /// Requests retried on another path after their path failed (for `bdev_list`).
    pub retried: AtomicU64,
    /// Requests failed after `ctrl_loss_tmo` with no usable path.
    pub failed_no_path: AtomicU64,
    /// Reconnects that succeeded.
    pub reconnects: AtomicUsize,
}

impl Shared {
    /// The shared state of a new bdev.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        info: Arc<BdevInfo>,
        nsid: u32,
        policy: Policy,
        ctrl_loss_tmo: Duration,
        reconnect_delay: Duration,
        io_queues: u16,
        qopts: IoQueueOptions,
        opts: ConnectOptions,
        paths: Vec<PathShared>,
    ) -> Shared {
        let n = paths.len();
        Shared {
            info,
            nsid,
            policy,
            ctrl_loss_tmo,
            reconnect_delay,
            io_queues,
            qopts,
            opts,
            paths,
            epoch: Instant::now(),
            ctrls: Mutex::new(vec![None; n]),
            stop: AtomicBool::new(false),
            kicked: Mutex::new(false),
            wake: Condvar::new(),
            retried: AtomicU64::new(0),
            failed_no_path: AtomicU64::new(0),
            reconnects: AtomicUsize::new(0),
        }
    }

    /// Milliseconds since [`Shared::epoch`], at least 1 (0 means "up").
    pub fn now_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// Whether every path has been down for at least `ctrl_loss_tmo`: held I/O fails.
    pub fn all_paths_lost(&self) -> bool {
        let now = self.now_ms();
        let tmo = self.ctrl_loss_tmo.as_millis() as u64;
        self.paths.iter().all(|p| {
            let d = p.down_since_ms.load(Ordering::Acquire);
            d != 0 && now.saturating_sub(d) >= tmo
        })
    }

    /// Wakes the control thread (a channel lost a queue or waits for one).
    pub fn kick(&self) {
        *lock(&self.kicked) = true;
        self.wake.notify_one();
    }

    /// Stops the control thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
    }

    /// Re-identifies the namespace through the first connected path: its size in blocks.
    pub fn identify_size(&self) -> Result<u64, InitError> {
        let ctrls: Vec<Arc<Controller>> = lock(&self.ctrls).iter().flatten().cloned().collect();
        let mut last = InitError::Disconnected;
        for c in ctrls {
            match c.namespace(self.nsid) {
                Ok(ns) => return Ok(ns.blocks),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Facts for `bdev_list`.
    pub fn describe(&self) -> serde_json::Value {
        let paths: Vec<serde_json::Value> = self
            .paths
            .iter()
            .map(|p| {
                serde_json::json!({
                    "trtype": p.trtype,
                    "addr": p.addr.to_string(),
                    "state": if p.is_up() { "up" } else { "down" },
                    "ana_state": p.ana(),
                    "spare_queues": lock(&p.pool).spares.len(),
                    "async_events": p.async_events.load(Ordering::Relaxed),
                    "events_received": p.events_received.load(Ordering::Relaxed),
                    "identify_polls": p.identify_polls.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "subnqn": self.opts.subnqn,
            "nsid": self.nsid,
            "hostnqn": self.opts.hostnqn,
            "policy": self.policy,
            "paths": paths,
            "retried": self.retried.load(Ordering::Relaxed),
            "failed_no_path": self.failed_no_path.load(Ordering::Relaxed),
            "reconnects": self.reconnects.load(Ordering::Relaxed),
        })
    }

    /// Marks path `i` down (keeps the first time it was seen down).
    fn set_down(&self, i: usize) {
        let p = &self.paths[i];
        if p.down_since_ms
            .compare_exchange(0, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(bdev = %self.info.name(), addr = %p.addr, "nvmf path down");
        }
    }

    /// Path `i` has a new controller `c`: queue identifiers start over, spares of the old
    /// one are dropped.
    fn set_up(&self, i: usize, c: Arc<Controller>, granted: u16) {
        let p = &self.paths[i];
        {
            let mut pool = lock(&p.pool);
            pool.spares.clear();
            pool.sockets.clear();
            pool.free_qids = (1..=granted).rev().collect();
            // Under the lock: a channel giving back a queue of the old controller (it checks
            // the generation under this lock) must not put its identifier in the new list.
            p.generation.fetch_add(1, Ordering::AcqRel);
        }
        lock(&self.ctrls)[i] = Some(c);
        p.down_since_ms.store(0, Ordering::Release);
    }
}

/// What the control thread keeps per path.
struct PathCtl {
    ctrl: Option<Arc<Controller>>,
    backoff: Duration,
    next_attempt: Instant,
}

/// Starts the control thread of a bdev whose paths' controllers were connected at creation
/// (`None` for those that did not answer).
pub fn start(
    shared: Arc<Shared>,
    ctrls: Vec<Option<Controller>>,
) -> std::io::Result<JoinHandle<()>> {
    let mut paths = Vec::with_capacity(ctrls.len());
    for (i, c) in ctrls.into_iter().enumerate() {
        let ctrl = c.and_then(|c| setup(&shared, i, c));
        paths.push(PathCtl {
            ctrl,
            backoff: shared.reconnect_delay,
            next_attempt: Instant::now() + shared.reconnect_delay,
        });
        refill(&shared, i, &mut paths[i]);
    }
    std::thread::Builder::new()
        .name(format!("nvmf-{}", shared.info.name()))
        .spawn(move || control(shared, paths))
}

/// Takes a freshly connected controller into service: Set Features Number of Queues,
/// asynchronous events, the ANA state, the path marked up. `None` (and the path stays down)
/// if the controller fails meanwhile.
fn setup(shared: &Arc<Shared>, i: usize, mut c: Controller) -> Option<Arc<Controller>> {
    let granted = match c.set_number_of_queues(shared.io_queues) {
        Ok((nsq, ncq)) => nsq.min(ncq).min(u32::from(shared.io_queues)) as u16,
        Err(e) => {
            tracing::warn!(bdev = %shared.info.name(), addr = %shared.paths[i].addr, error = %e, "nvmf: Set Features Number of Queues failed");
            return None;
        }
    };
    let path = &shared.paths[i];
    path.events.store(0, Ordering::Release);
    let weak = Arc::downgrade(shared);
    let wanted =
        AsyncEventConfig::NAMESPACE_ATTRIBUTE_NOTICES | AsyncEventConfig::ANA_CHANGE_NOTICES;
    let enabled = match c.enable_async_events(wanted, move |ev| on_admin_event(&weak, i, ev)) {
        Ok(mask) => mask & AsyncEventConfig::NAMESPACE_ATTRIBUTE_NOTICES != 0,
        Err(e) => {
            tracing::warn!(bdev = %shared.info.name(), addr = %path.addr, error = %e, "nvmf: asynchronous events not enabled; polling the namespace");
            if e.is_fatal() || !c.is_connected() {
                return None;
            }
            false
        }
    };
    path.async_events.store(enabled, Ordering::Release);
    refresh_ana(shared, i, &c);
    let c = Arc::new(c);
    shared.set_up(i, c.clone(), granted);
    Some(c)
}

/// Connects spare I/O queues of path `i` until [`SPARES`] (or as many as channels wait for)
/// are ready, or the queue identifiers run out.
fn refill(shared: &Shared, i: usize, p: &mut PathCtl) {
    let Some(c) = p.ctrl.clone() else { return };
    let path = &shared.paths[i];
    loop {
        let (qid, generation) = {
            let mut pool = lock(&path.pool);
            if pool.spares.len() >= SPARES.max(pool.waiting) {
                return;
            }
            let Some(qid) = pool.free_qids.pop() else {
                return;
            };
            (qid, path.generation())
        };
        match c.connect_io_queue(qid, &shared.qopts) {
            Ok(q) => {
                let mut pool = lock(&path.pool);
                if path.generation() == generation {
                    pool.sockets.push((qid, q.abort_token()));
                    pool.spares.push((q, generation));
                }
            }
            Err(e) => {
                tracing::warn!(bdev = %shared.info.name(), addr = %path.addr, qid, error = %e, "nvmf: connecting an I/O queue failed");
                if path.generation() == generation {
                    lock(&path.pool).free_qids.push(qid);
                }
                if e.is_fatal() && !c.is_connected() {
                    lost(shared, i, p);
                }
                return;
            }
        }
    }
}

/// Path `i`'s controller is gone: mark it down and schedule the first reconnect.
fn lost(shared: &Shared, i: usize, p: &mut PathCtl) {
    shared.set_down(i);
    lock(&shared.ctrls)[i] = None;
    {
        let mut pool = lock(&shared.paths[i].pool);
        pool.shut_down_sockets();
        pool.spares.clear();
    }
    p.ctrl = None;
    p.backoff = shared.reconnect_delay;
    p.next_attempt = Instant::now() + shared.reconnect_delay;
}

/// Runs on path `i`'s admin thread: records the event for the control thread and wakes it.
fn on_admin_event(shared: &Weak<Shared>, i: usize, ev: AdminEvent) {
    let Some(s) = shared.upgrade() else { return };
    let p = &s.paths[i];
    let bit = match ev {
        AdminEvent::Async(e) => {
            p.events_received.fetch_add(1, Ordering::Relaxed);
            match e.info {
                async_event_notice::NAMESPACE_ATTRIBUTE_CHANGED => EVENT_NS_CHANGED,
                async_event_notice::ANA_CHANGE => EVENT_ANA_CHANGED,
                _ => return,
            }
        }
        AdminEvent::Stopped => {
            // Back to polling the namespace for this controller.
            p.async_events.store(false, Ordering::Release);
            return;
        }
        AdminEvent::Lost => EVENT_LOST,
    };
    p.events.fetch_or(bit, Ordering::AcqRel);
    s.kick();
}

fn control(shared: Arc<Shared>, mut paths: Vec<PathCtl>) {
    let mut next_refresh = Instant::now() + REFRESH;
    loop {
        let now = Instant::now();
        let mut until = next_refresh;
        for p in &paths {
            if p.ctrl.is_none() {
                until = until.min(p.next_attempt);
            }
        }
        let kicked = {
            let mut k = lock(&shared.kicked);
            if !*k && until > now {
                k = shared
                    .wake
                    .wait_timeout(k, until - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::replace(&mut *k, false)
        };
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let refresh = Instant::now() >= next_refresh;
        if refresh {
            next_refresh = Instant::now() + REFRESH;
        }
        for (i, p) in paths.iter_mut().enumerate() {
            match p.ctrl.clone() {
                Some(c) => {
                    let path = &shared.paths[i];
                    let events = path.events.swap(0, Ordering::AcqRel);
                    let polled = !path.async_events.load(Ordering::Acquire);
                    if events & EVENT_ANA_CHANGED != 0
                        || (refresh && ana::rank(path.ana()).is_none())
                    {
                        refresh_ana(&shared, i, &c);
                    }
                    let alive = if events & EVENT_LOST != 0 {
                        false
                    } else if events & EVENT_NS_CHANGED != 0 {
                        namespace_changed(&shared, i, &c)
                    } else if refresh && polled {
                        path.identify_polls.fetch_add(1, Ordering::Relaxed);
                        check(&shared, i, &c)
                    } else if kicked {
                        c.keep_alive().is_ok()
                    } else {
                        c.is_connected()
                    };
                    if alive {
                        refill(&shared, i, p);
                    } else {
                        lost(&shared, i, p);
                    }
                }
                None if Instant::now() >= p.next_attempt => reconnect(&shared, i, p),
                None => {}
            }
        }
    }
    for p in &mut paths {
        p.ctrl = None;
    }
    lock(&shared.ctrls).iter_mut().for_each(|c| *c = None);
    for path in &shared.paths {
        lock(&path.pool).spares.clear();
    }
}

/// A Namespace Attribute Changed event: reads the Changed Namespace List (which clears the
/// event on the controller, NVMe Base 2.0 §5.27.1.5) and identifies the namespace again.
fn namespace_changed(shared: &Shared, i: usize, c: &Controller) -> bool {
    let lid = LogPageId::ChangedNamespaceList as u8;
    if let Err(e) = c.get_log_page(lid, 0, 0, CHANGED_NS_LIST_LEN) {
        tracing::debug!(bdev = %shared.info.name(), error = %e, "nvmf: Changed Namespace List");
    }
    check(shared, i, c)
}

/// Bytes of the Changed Namespace List log page.
const CHANGED_NS_LIST_LEN: usize = 4096;

/// Identify Namespace through a live controller: the liveness check, and the remote's size
/// reaching the bdev's listeners when it changed. `false` when the controller is gone.
fn check(shared: &Shared, i: usize, c: &Controller) -> bool {
    match c.namespace(shared.nsid) {
        Ok(ns) => {
            if !shared.paths[i].async_events.load(Ordering::Acquire) {
                refresh_ana(shared, i, c);
            }
            if ns.blocks != shared.info.block_count() {
                tracing::info!(bdev = %shared.info.name(), addr = %shared.paths[i].addr, blocks = ns.blocks, "nvmf: the remote namespace was resized");
                shared.info.set_block_count(ns.blocks);
            }
            true
        }
        Err(e) if e.is_fatal() || !c.is_connected() => {
            tracing::warn!(bdev = %shared.info.name(), addr = %shared.paths[i].addr, error = %e, "nvmf: controller lost");
            false
        }
        Err(e) => {
            // The namespace went away or the command failed: the path cannot serve it.
            tracing::warn!(bdev = %shared.info.name(), addr = %shared.paths[i].addr, error = %e, "nvmf: Identify Namespace failed");
            false
        }
    }
}

/// Reads the namespace's ANA state through path `i` from the ANA log page when the controller
/// reports ANA (Identify Controller CMIC bit 3); a controller that does not is optimized.
fn refresh_ana(shared: &Shared, i: usize, c: &Controller) {
    let id = c.identify();
    let state = if id.cmic & cmic::ANA_REPORTING != 0 {
        let lid = LogPageId::AsymmetricNamespaceAccess as u8;
        // The whole page (as Linux sizes it: the header, every group descriptor, every NSID),
        // within what one command carries.
        let len = (ANA_LOG_HEADER + ANA_GROUP_DESC * id.nanagrpid as usize + 4 * id.mnan as usize)
            .clamp(ANA_LOG_MIN, ANA_LOG_MAX);
        match c.get_log_page(lid, 0, 0, len) {
            Ok(page) => match ana_state_of(&page, shared.nsid) {
                Some(s) => s,
                None => {
                    // Not in the page (or past what was read): nothing learned, the state
                    // stays what it was rather than becoming optimized.
                    tracing::debug!(bdev = %shared.info.name(), nsid = shared.nsid,
                        "nvmf: namespace not in the ANA log page");
                    return;
                }
            },
            Err(e) => {
                tracing::debug!(bdev = %shared.info.name(), error = %e, "nvmf: ANA log page");
                return;
            }
        }
    } else {
        ana::OPTIMIZED
    };
    let path = &shared.paths[i];
    if path.ana() != state {
        tracing::info!(bdev = %shared.info.name(), addr = %path.addr, state, "nvmf: ANA state");
        path.set_ana(state);
    }
}

/// Bytes of the ANA log page's header and of one group descriptor without its NSIDs (NVMe
/// Base 2.0 §5.16.1.13).
const ANA_LOG_HEADER: usize = 16;
const ANA_GROUP_DESC: usize = 32;
/// Bounds of the ANA log page read: at least a page, at most what one admin command of the
/// initiator carries.
const ANA_LOG_MIN: usize = 4096;
const ANA_LOG_MAX: usize = 64 * 1024;

fn reconnect(shared: &Arc<Shared>, i: usize, p: &mut PathCtl) {
    let opts = ConnectOptions {
        trtype: shared.paths[i].trtype,
        addr: shared.paths[i].addr,
        ..shared.opts.clone()
    };
    let r = Controller::connect(&opts)
        .and_then(|c| c.namespace(shared.nsid).map(|_| c))
        .map(|c| setup(shared, i, c));
    match r {
        Ok(Some(c)) => {
            tracing::info!(bdev = %shared.info.name(), addr = %opts.addr, "nvmf path reconnected");
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
            p.ctrl = Some(c);
            p.backoff = shared.reconnect_delay;
            refill(shared, i, p);
        }
        Ok(None) | Err(_) => {
            if let Err(e) = r {
                tracing::debug!(bdev = %shared.info.name(), addr = %opts.addr, error = %e, "nvmf reconnect failed");
            }
            p.backoff = (p.backoff * 2).min(shared.reconnect_delay * MAX_BACKOFF_FACTOR);
            p.next_attempt = Instant::now() + p.backoff;
        }
    }
}
