//! Thread-per-core reactors.
//!
//! A reactor is a pinned thread that runs its pollers (a perf job, a virtqueue, an NVMe queue)
//! to completion, one after the other, forever. Work reaches it only as messages (closures) in
//! its inbox; nothing is shared mutably between reactors.
//!
//! Adaptive polling: while any poller did work in the last `idle_poll` interval the reactor spins.
//! After that it asks each poller what would wake it ([`Wake`]) and sleeps in `io_uring_enter`
//! on the thread's ring: a completion of in-flight file I/O, a write to the inbox eventfd (armed
//! as a multishot poll on the same ring), or the earliest timer. An idle daemon therefore costs
//! nothing, and a busy one makes no system call per I/O beyond the batched submit.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bdev::Wake;
use crate::error::BdevError;
use crate::uring::{FdWatch, ThreadRing};

/// Work a reactor runs on every turn of its loop.
pub trait Poller {
    /// Does whatever work is ready; returns how much (zero when idle).
    fn poll(&mut self) -> usize;

    /// What would wake the reactor for this poller when it reports no work.
    fn wake(&self) -> Wake {
        Wake::Event
    }

    /// Requests still in flight; a stopping reactor keeps polling until this reaches zero.
    fn in_flight(&self) -> usize {
        0
    }

    /// Asks the poller to start no new work (shutdown); it keeps completing what is in flight.
    fn stop(&mut self) {}

    /// Called just before the reactor sleeps: re-arm whatever notification the poller turned
    /// off while it was being polled (a virtqueue's kicks), then look once more. Returns true
    /// if work turned up, which cancels the sleep.
    fn prepare_sleep(&mut self) -> bool {
        false
    }

    /// Whether the poller has finished for good (a closed connection); the reactor then drops
    /// it.
    fn is_done(&self) -> bool {
        false
    }
}

/// Identifies a poller on its reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId(u64);

/// A message: a closure run on the reactor between two turns.
pub type Message = Box<dyn FnOnce(&mut ReactorCore) + Send>;

/// How to run the reactors.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// One entry per reactor: the CPU to pin it to, or `None` to let it float.
    pub cpus: Vec<Option<usize>>,
    /// How long a reactor keeps spinning after its last work before it sleeps.
    pub idle_poll: Duration,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            cpus: vec![None],
            idle_poll: Duration::from_micros(50),
        }
    }
}

/// Counters of one reactor, readable from any thread.
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Loop turns that did work.
    pub busy_turns: AtomicU64,
    /// Times the reactor went to sleep.
    pub sleeps: AtomicU64,
    /// Pollers registered now.
    pub pollers: AtomicU64,
    /// Nanoseconds spent in turns that did work. Like the two below, written by the reactor
    /// alone, at most once per loop turn (never per I/O): when it goes idle, wakes, or every
    /// [`BUSY_FLUSH_TURNS`] busy turns, so a reactor that never idles still shows its time.
    pub busy_ns: AtomicU64,
    /// Nanoseconds spent polling without work before going to sleep (`idle_poll`).
    pub idle_poll_ns: AtomicU64,
    /// Nanoseconds spent asleep, waiting for an event or a timer.
    pub sleep_ns: AtomicU64,
}

/// Busy turns between two updates of [`ReactorStats::busy_ns`] while a reactor never idles.
pub const BUSY_FLUSH_TURNS: u32 = 1024;

/// Adds the time since `*mark` to `counter` and moves `*mark` to `now`. Single writer: a load
/// and a store, no read-modify-write.
#[inline]
fn account(counter: &AtomicU64, mark: &mut Instant, now: Instant) {
    let ns = u64::try_from(now.saturating_duration_since(*mark).as_nanos()).unwrap_or(u64::MAX);
    counter.store(
        counter.load(Ordering::Relaxed).saturating_add(ns),
        Ordering::Relaxed,
    );
    *mark = now;
}

/// The state a reactor thread owns; messages get `&mut` access to it.
pub struct ReactorCore {
    id: usize,
    pollers: Vec<(PollerId, Box<dyn Poller>)>,
    next_poller: u64,
    stopping: bool,
    drain_deadline: Option<Instant>,
    stats: Arc<ReactorStats>,
}

impl ReactorCore {
    /// This reactor's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Adds a poller; it runs from the next turn on.
    pub fn add_poller(&mut self, p: Box<dyn Poller>) -> PollerId {
        self.next_poller += 1;
        let id = PollerId(self.next_poller);
        self.pollers.push((id, p));
        self.stats
            .pollers
            .store(self.pollers.len() as u64, Ordering::Relaxed);
        id
    }

    /// Removes a poller and hands it back.
    pub fn remove_poller(&mut self, id: PollerId) -> Option<Box<dyn Poller>> {
        let i = self.pollers.iter().position(|(pid, _)| *pid == id)?;
        let (_, p) = self.pollers.remove(i);
        self.stats
            .pollers
            .store(self.pollers.len() as u64, Ordering::Relaxed);
        Some(p)
    }

    /// Whether the reactor is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }
}

/// A handle to send work to one reactor; cloneable and `Send`.
#[derive(Clone)]
pub struct ReactorHandle {
    id: usize,
    cpu: Option<usize>,
    tx: mpsc::Sender<Message>,
    wake_fd: Arc<OwnedFd>,
    stats: Arc<ReactorStats>,
    alive: Arc<AtomicBool>,
}

impl ReactorHandle {
    /// The reactor's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The CPU it is pinned to.
    pub fn cpu(&self) -> Option<usize> {
        self.cpu
    }

    /// Its counters.
    pub fn stats(&self) -> &ReactorStats {
        &self.stats
    }

    /// Runs `f` on the reactor, without waiting. Returns false if the reactor has exited.
    pub fn send(&self, f: impl FnOnce(&mut ReactorCore) + Send + 'static) -> bool {
        if !self.alive.load(Ordering::Acquire) || self.tx.send(Box::new(f)).is_err() {
            return false;
        }
        crate::eventfd::signal(self.wake_fd.as_fd());
        true
    }

    /// Runs `f` on the reactor and waits for its result (control plane only).
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ReactorCore) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        if !self.send(move |core| {
            let _ = tx.send(f(core));
        }) {
            return None;
        }
        rx.recv().ok()
    }
}

/// The running reactors of a process.
pub struct Reactors {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Starts one pinned thread per entry of `cfg.cpus`.
    pub fn start(cfg: &ReactorConfig) -> Result<Reactors, BdevError> {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (id, cpu) in cfg.cpus.iter().copied().enumerate() {
            let wake_fd = Arc::new(crate::eventfd::new().map_err(BdevError::Uring)?);
            let (tx, rx) = mpsc::channel::<Message>();
            let stats = Arc::new(ReactorStats::default());
            let alive = Arc::new(AtomicBool::new(true));
            let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), BdevError>>(1);
            let t = {
                let wake_fd = wake_fd.clone();
                let stats = stats.clone();
                let alive = alive.clone();
                let idle_poll = cfg.idle_poll;
                std::thread::Builder::new()
                    .name(format!("reactor-{id}"))
                    .spawn(move || {
                        if let Some(c) = cpu
                            && let Err(e) = pin_to_cpu(c)
                        {
                            tracing::warn!(cpu = c, error = %e, "cannot pin reactor");
                        }
                        let ring = match ThreadRing::current() {
                            Ok(r) => r,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = ready_tx.send(Ok(()));
                        let core = ReactorCore {
                            id,
                            pollers: Vec::new(),
                            next_poller: 0,
                            stopping: false,
                            drain_deadline: None,
                            stats,
                        };
                        run(core, ring, rx, &wake_fd, idle_poll);
                        alive.store(false, Ordering::Release);
                    })
                    .map_err(|e| BdevError::Io {
                        op: "spawn reactor thread",
                        path: Default::default(),
                        source: e,
                    })?
            };
            ready_rx.recv().map_err(|_| {
                BdevError::Uring(std::io::Error::other("reactor thread died at start"))
            })??;
            handles.push(ReactorHandle {
                id,
                cpu,
                tx,
                wake_fd,
                stats,
                alive,
            });
            threads.push(t);
        }
        Ok(Reactors { handles, threads })
    }

    /// The reactors' handles, by index.
    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are no reactors.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops every reactor: pollers stop taking new work, in-flight requests complete (up to
    /// `drain` long), pollers are dropped, threads exit.
    pub fn shutdown(self, drain: Duration) {
        for h in &self.handles {
            h.send(move |core| {
                core.stopping = true;
                core.drain_deadline = Some(Instant::now() + drain);
                for (_, p) in core.pollers.iter_mut() {
                    p.stop();
                }
            });
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `set` is a zeroed, properly sized cpu_set_t on the stack and `cpu` is below
    // CPU_SETSIZE; CPU_SET and sched_setaffinity read and write only it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn run(
    mut core: ReactorCore,
    ring: ThreadRing,
    rx: mpsc::Receiver<Message>,
    wake_fd: &OwnedFd,
    idle_poll: Duration,
) {
    // The reactor is the one reaper of its thread's ring: once per turn, below.
    ring.set_driven();
    let inbox = match FdWatch::new(wake_fd.as_fd(), libc::POLLIN as u32) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(reactor = core.id, error = %e, "cannot watch the reactor inbox");
            return;
        }
    };
    let mut idle_since: Option<Instant> = None;
    let stats = core.stats.clone();
    // Start of the period (busy or idle polling) not yet added to the time counters.
    let mut mark = Instant::now();
    let mut busy_turns_unaccounted = 0u32;
    loop {
        let mut work = 0usize;
        // Route every completion (socket and eventfd readiness, file I/O) to its owner; the
        // pollers below only take theirs.
        ring.reap();
        inbox.take();
        while let Ok(m) = rx.try_recv() {
            m(&mut core);
            work += 1;
        }
        let mut any_done = false;
        for (_, p) in core.pollers.iter_mut() {
            work += p.poll();
            any_done |= p.is_done();
        }
        if any_done {
            core.pollers.retain(|(_, p)| !p.is_done());
            stats
                .pollers
                .store(core.pollers.len() as u64, Ordering::Relaxed);
        }
        ring.flush();
        if core.stopping {
            let busy = core.pollers.iter().any(|(_, p)| p.in_flight() > 0);
            let late = core.drain_deadline.is_some_and(|d| Instant::now() >= d);
            if !busy || late {
                if busy {
                    tracing::warn!(reactor = core.id, "shutdown drain timed out");
                }
                break;
            }
        }
        if work > 0 || ring.routed_pending() > 0 {
            if idle_since.take().is_some() {
                // Idle polling ends here: work came before the reactor slept.
                account(&stats.idle_poll_ns, &mut mark, Instant::now());
                busy_turns_unaccounted = 0;
            } else {
                busy_turns_unaccounted += 1;
                if busy_turns_unaccounted >= BUSY_FLUSH_TURNS {
                    account(&stats.busy_ns, &mut mark, Instant::now());
                    busy_turns_unaccounted = 0;
                }
            }
            stats.busy_turns.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let now = Instant::now();
        if idle_since.is_none() {
            // A busy period (or the turn after a wake-up) ends here.
            account(&stats.busy_ns, &mut mark, now);
            busy_turns_unaccounted = 0;
        }
        let since = *idle_since.get_or_insert(now);
        if now.duration_since(since) < idle_poll {
            std::hint::spin_loop();
            continue;
        }
        let mut wake = Wake::Event;
        for (_, p) in core.pollers.iter() {
            wake = wake.min(p.wake());
        }
        let timeout = match wake {
            Wake::Immediate => continue,
            Wake::Event => None,
            Wake::At(t) => Some(t.saturating_duration_since(now)),
        };
        let mut late_work = false;
        for (_, p) in core.pollers.iter_mut() {
            late_work |= p.prepare_sleep();
        }
        if late_work {
            idle_since = None;
            account(&stats.idle_poll_ns, &mut mark, now);
            continue;
        }
        stats.sleeps.fetch_add(1, Ordering::Relaxed);
        crate::eventfd::drain(wake_fd.as_fd());
        // A message sent after the drain above writes the eventfd again, which completes the
        // armed poll and wakes the wait; one sent before it is still in `rx`.
        if let Ok(m) = rx.try_recv() {
            idle_since = None;
            account(&stats.idle_poll_ns, &mut mark, now);
            m(&mut core);
            continue;
        }
        account(&stats.idle_poll_ns, &mut mark, Instant::now());
        ring.wait(timeout);
        account(&stats.sleep_ns, &mut mark, Instant::now());
        idle_since = None;
    }
    // The last period: the drain is busy time.
    account(&stats.busy_ns, &mut mark, Instant::now());
    // Dropping the pollers closes their channels while the ring still exists.
    core.pollers.clear();
    drop(inbox);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn call_runs_on_the_reactor_thread() {
        let r = Reactors::start(&ReactorConfig {
            cpus: vec![None, None],
            idle_poll: Duration::from_micros(50),
        })
        .unwrap();
        for h in r.handles() {
            let name = h
                .call(|_| std::thread::current().name().unwrap().to_string())
                .unwrap();
            assert_eq!(name, format!("reactor-{}", h.id()));
        }
        r.shutdown(Duration::from_secs(1));
    }

    struct Counter(Arc<AtomicUsize>, usize);
    impl Poller for Counter {
        fn poll(&mut self) -> usize {
            if self.1 > 0 {
                self.1 -= 1;
                self.0.fetch_add(1, Ordering::Relaxed);
                1
            } else {
                0
            }
        }
        fn in_flight(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn shutdown_drains_in_flight_pollers_and_idle_reactor_sleeps() {
        let r = Reactors::start(&ReactorConfig::default()).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        r.handles()[0].call(move |core| core.add_poller(Box::new(Counter(n2, 1000))));
        // Once the poller is done the reactor is idle and goes to sleep (waited for, not
        // timed: on a loaded machine the reactor thread may get little CPU).
        let t = std::time::Instant::now();
        while r.handles()[0].stats().sleeps.load(Ordering::Relaxed) == 0
            && t.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let sleeps = r.handles()[0].stats().sleeps.load(Ordering::Relaxed);
        assert!(sleeps >= 1, "an idle reactor goes to sleep");
        // Still answers messages after sleeping.
        assert_eq!(r.handles()[0].call(|c| c.id()), Some(0));
        r.shutdown(Duration::from_secs(1));
        assert_eq!(n.load(Ordering::Relaxed), 1000);
    }

    /// Works on every turn until `stop` is set, then finishes.
    struct Spinner(Arc<AtomicBool>);
    impl Poller for Spinner {
        fn poll(&mut self) -> usize {
            usize::from(!self.0.load(Ordering::Relaxed))
        }
        fn is_done(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn busy_idle_and_sleep_time_are_counted_even_while_never_idle() {
        let r = Reactors::start(&ReactorConfig::default()).unwrap();
        let h = r.handles()[0].clone();
        let stats = || {
            let s = h.stats();
            (
                s.busy_ns.load(Ordering::Relaxed),
                s.idle_poll_ns.load(Ordering::Relaxed),
                s.sleep_ns.load(Ordering::Relaxed),
                s.busy_turns.load(Ordering::Relaxed),
            )
        };
        wait_for("the first sleep", || {
            h.stats().sleeps.load(Ordering::Relaxed) >= 1
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (busy0, _, _, turns0) = stats();
        h.send(move |core| {
            core.add_poller(Box::new(Spinner(stop2)));
        });
        // The reactor never idles now; its busy time must still move.
        let flushes = u64::from(BUSY_FLUSH_TURNS) * 3;
        wait_for("busy turns", || stats().3 >= turns0 + flushes);
        let (busy1, _, _, _) = stats();
        assert!(
            busy1 > busy0,
            "busy time counted while busy: {busy0} -> {busy1}"
        );
        stop.store(true, Ordering::Relaxed);
        let sleeps = h.stats().sleeps.load(Ordering::Relaxed);
        wait_for("a sleep after the work", || {
            h.stats().sleeps.load(Ordering::Relaxed) > sleeps
        });
        // The sleep time is added on waking: wake it with messages (one may arrive just
        // before the wait and find the reactor still awake).
        let (_, idle_before, sleep_before, _) = stats();
        wait_for("sleep time counted on waking", || {
            assert_eq!(h.call(|c| c.id()), Some(0));
            stats().2 > sleep_before
        });
        let (busy2, idle2, _, _) = stats();
        assert!(busy2 >= busy1);
        assert!(idle2 > 0, "idle polling before the sleep is counted");
        assert!(idle2 >= idle_before);
        r.shutdown(Duration::from_secs(1));
    }
}
