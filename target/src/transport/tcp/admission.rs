//! Admission of NVMe/TCP connections: who gets one of a listener's connection slots, how long a
//! connection may take to identify itself, and rate-limited accounting of those turned away.
//!
//! A connection is *unidentified* from accept until its ICReq (NVMe/TCP 1.0 §3.6.2.2) and its
//! Fabrics Connect (NVMe-oF 1.1 §3.3) have both succeeded; from then on it is *identified*.
//! Hosts that connect and send nothing must not lock well-formed hosts out, so:
//!
//! - each stage has a deadline ([`HandshakeLimits`]): a connection that has not sent its ICReq
//!   within `ic_timeout`, or its Connect within `connect_timeout` after that, is closed;
//! - at most `max_unidentified_per_peer` unidentified connections per peer address: more from
//!   that address are closed at accept;
//! - when the listener's connection cap is full, the oldest unidentified connection is evicted
//!   to make room (the oldest that has not sent ICReq first, then the oldest without Connect).
//!   An identified connection is never evicted for a newcomer; with no unidentified one left,
//!   the newcomer is refused.
//!
//! Refusals, evictions and timeouts are counted ([`AdmissionStats`]) and logged as one line of
//! counts per [`REPORT_INTERVAL`], never one line per connection. Refused Fabrics Connects are
//! logged one line each with their reason, at most [`CONNECT_LOG_BURST`] per interval.

use std::collections::VecDeque;
use std::net::{IpAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Interval of the rate-limited admission and Connect-refusal log lines.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Most refused-Connect lines logged per [`REPORT_INTERVAL`]; the rest are counted and the
/// count is logged with the next line.
pub const CONNECT_LOG_BURST: u32 = 20;

/// Deadlines and per-peer bound of the connection handshake, from the listener declaration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// From accept to ICReq.
    pub ic_timeout: Duration,
    /// From ICReq to a successful Fabrics Connect.
    pub connect_timeout: Duration,
    /// Most unidentified connections from one peer address.
    pub max_unidentified_per_peer: usize,
    /// Most connections the listener keeps open.
    pub max_connections: usize,
}

/// Counters of connections turned away, cumulative since the listener started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Closed at accept: the cap was full of identified connections, or the peer address had
    /// too many unidentified connections.
    pub refused: u64,
    /// Unidentified connections closed to make room for a newcomer.
    pub evicted: u64,
    /// Connections closed because ICReq or Connect did not arrive in time.
    pub timed_out: u64,
}

/// Shared by a listener's accept thread and its connections.
pub struct Admission {
    addr: std::net::SocketAddr,
    limits: HandshakeLimits,
    open: AtomicUsize,
    refused: AtomicU64,
    evicted: AtomicU64,
    timed_out: AtomicU64,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last admission report.
    last_report_ms: AtomicU64,
    /// Counts already reported: refused, evicted, timed out.
    reported: Mutex<[u64; 3]>,
    connect_log: LogLimiter,
}

impl Admission {
    /// Admission state of the listener bound to `addr`.
    pub fn new(addr: std::net::SocketAddr, limits: HandshakeLimits) -> Admission {
        Admission {
            addr,
            limits,
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            epoch: Instant::now(),
            last_report_ms: AtomicU64::new(0),
            reported: Mutex::new([0; 3]),
            connect_log: LogLimiter::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &HandshakeLimits {
        &self.limits
    }

    /// Connections holding a slot now (evicted ones release theirs at eviction).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Cumulative counters.
    pub fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            refused: self.refused.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Counts a connection that missed its ICReq or Connect deadline.
    pub fn note_timed_out(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
        self.report();
    }

    fn note_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.report();
    }

    fn note_evicted(&self) {
        self.evicted.fetch_add(1, Ordering::Relaxed);
        self.report();
    }

    /// Logs the counts gathered since the last report, if a [`REPORT_INTERVAL`] has passed
    /// since then and there is anything to say. Called on every count and periodically by the
    /// accept thread, so the tail of a burst is reported too.
    pub fn report(&self) {
        let now = self.now_ms();
        let last = self.last_report_ms.load(Ordering::Acquire);
        let interval = REPORT_INTERVAL.as_millis() as u64;
        if last != 0 && now < last + interval {
            return;
        }
        let s = self.stats();
        let mut reported = self.reported.lock().expect("admission report lock");
        let delta = [
            s.refused - reported[0],
            s.evicted - reported[1],
            s.timed_out - reported[2],
        ];
        if delta == [0; 3] {
            return;
        }
        if self
            .last_report_ms
            .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        *reported = [s.refused, s.evicted, s.timed_out];
        drop(reported);
        tracing::warn!(
            addr = %self.addr,
            refused = delta[0],
            evicted = delta[1],
            timed_out = delta[2],
            open = self.open(),
            "NVMe/TCP connections dropped before ICReq/Connect (refused at accept, evicted for \
             a newcomer, or past the handshake deadline)"
        );
    }

    /// Logs one refused Fabrics Connect: `field` and its `value`, and why. At most
    /// [`CONNECT_LOG_BURST`] lines per [`REPORT_INTERVAL`]; the number left out is logged
    /// with the next line.
    pub fn log_connect_refused(
        &self,
        peer: &str,
        field: &str,
        value: &dyn std::fmt::Debug,
        why: &str,
    ) {
        if let Some(suppressed) = self.connect_log.allow(self.now_ms()) {
            tracing::warn!(peer, field, value = ?value, reason = why, suppressed,
                "NVMe-oF Connect refused");
        }
    }
}

/// At most [`CONNECT_LOG_BURST`] events per [`REPORT_INTERVAL`] window.
struct LogLimiter {
    window_ms: AtomicU64,
    in_window: AtomicU32,
    suppressed: AtomicU64,
}

impl LogLimiter {
    fn new() -> LogLimiter {
        LogLimiter {
            window_ms: AtomicU64::new(0),
            in_window: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events left out before this one)` if this event may be logged.
    fn allow(&self, now_ms: u64) -> Option<u64> {
        let w = self.window_ms.load(Ordering::Acquire);
        if now_ms >= w + REPORT_INTERVAL.as_millis() as u64
            && self
                .window_ms
                .compare_exchange(w, now_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.in_window.store(0, Ordering::Release);
        }
        if self.in_window.fetch_add(1, Ordering::AcqRel) < CONNECT_LOG_BURST {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// How far a connection got in its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stage {
    /// Accepted; no ICReq yet.
    Accepted = 0,
    /// ICReq answered; no successful Connect yet.
    Initialized = 1,
    /// Connect succeeded: never evicted, no deadline.
    Identified = 2,
}

/// One admitted connection: its socket and its handshake stage, shared by the connection (which
/// owns it) and the accept thread (which may evict it while it is unidentified). Holds one of
/// the listener's slots until evicted or dropped.
pub struct Ticket {
    /// The connection's socket.
    pub sock: TcpStream,
    peer: IpAddr,
    stage: AtomicU8,
    evicted: AtomicBool,
    holds_slot: AtomicBool,
    admission: Arc<Admission>,
}

impl Ticket {
    /// The handshake stage reached.
    pub fn stage(&self) -> Stage {
        match self.stage.load(Ordering::Acquire) {
            0 => Stage::Accepted,
            1 => Stage::Initialized,
            _ => Stage::Identified,
        }
    }

    /// Records that the connection reached `s`.
    pub fn advance(&self, s: Stage) {
        self.stage.fetch_max(s as u8, Ordering::AcqRel);
    }

    /// Whether the accept thread evicted this connection.
    pub fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// The listener's admission state.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    fn release_slot(&self) {
        if self.holds_slot.swap(false, Ordering::AcqRel) {
            self.admission.open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Ends an unidentified connection for a newcomer: its slot is free at once; the shutdown
    /// wakes its poller, which sees end of stream and finishes.
    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.release_slot();
        // SAFETY: the socket is owned by this ticket, which the caller keeps alive for the
        // duration of the call, so the descriptor is open and is this connection's.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release_slot();
    }
}

/// The accept thread's view of the unidentified connections, oldest first. Owned by the accept
/// thread alone; connections report their progress through their [`Ticket`].
pub struct Gate {
    admission: Arc<Admission>,
    pending: VecDeque<Weak<Ticket>>,
}

impl Gate {
    /// A gate over `admission`.
    pub fn new(admission: Arc<Admission>) -> Gate {
        Gate {
            admission,
            pending: VecDeque::new(),
        }
    }

    /// Decides about a newly accepted socket from `peer`: a ticket holding a slot, or `None`
    /// (the socket is closed and counted as refused).
    pub fn admit(&mut self, sock: TcpStream, peer: IpAddr) -> Option<Arc<Ticket>> {
        let lim = *self.admission.limits();
        // Forget connections that finished or identified themselves, and count the peer's.
        let mut from_peer = 0;
        self.pending.retain(|w| match w.upgrade() {
            Some(t) if t.stage() != Stage::Identified && !t.evicted() => {
                from_peer += usize::from(t.peer == peer);
                true
            }
            _ => false,
        });
        if from_peer >= lim.max_unidentified_per_peer {
            self.admission.note_refused();
            return None;
        }
        if self.admission.open() >= lim.max_connections && !self.evict_one() {
            self.admission.note_refused();
            return None;
        }
        self.admission.open.fetch_add(1, Ordering::AcqRel);
        let t = Arc::new(Ticket {
            sock,
            peer,
            stage: AtomicU8::new(Stage::Accepted as u8),
            evicted: AtomicBool::new(false),
            holds_slot: AtomicBool::new(true),
            admission: self.admission.clone(),
        });
        self.pending.push_back(Arc::downgrade(&t));
        Some(t)
    }

    /// Evicts the oldest connection without ICReq, else the oldest without Connect.
    fn evict_one(&mut self) -> bool {
        for stage in [Stage::Accepted, Stage::Initialized] {
            let found = self.pending.iter().enumerate().find_map(|(i, w)| {
                let t = w.upgrade()?;
                (t.stage() == stage && !t.evicted()).then_some((i, t))
            });
            if let Some((i, t)) = found {
                self.pending.remove(i);
                t.evict();
                self.admission.note_evicted();
                return true;
            }
        }
        false
    }

    /// The admission state the gate decides with.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Unidentified connections tracked now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn limits(max_connections: usize, per_peer: usize) -> HandshakeLimits {
        HandshakeLimits {
            ic_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_unidentified_per_peer: per_peer,
            max_connections,
        }
    }

    /// A connected pair: the server side (for the gate) and the client side.
    fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (s, c)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn gate(max: usize, per_peer: usize) -> (Gate, Arc<Admission>) {
        let a = Arc::new(Admission::new(
            "127.0.0.1:4420".parse().unwrap(),
            limits(max, per_peer),
        ));
        (Gate::new(a.clone()), a)
    }

    #[test]
    fn a_full_cap_evicts_the_oldest_unidentified_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut g, a) = gate(3, 10);
        let mut clients = Vec::new();
        let mut tickets = Vec::new();
        for i in 0..3 {
            let (s, c) = pair(&l);
            clients.push(c);
            tickets.push(g.admit(s, ip(i)).expect("room"));
        }
        tickets[1].advance(Stage::Initialized);
        assert_eq!(a.open(), 3);
        // Full: the oldest that has not sent ICReq goes (0), not the older-by-stage 1.
        let (s, _c) = pair(&l);
        let t3 = g.admit(s, ip(9)).expect("evicts one");
        assert!(tickets[0].evicted() && !tickets[1].evicted() && !tickets[2].evicted());
        assert_eq!(a.open(), 3, "the evicted slot was handed over");
        // The evicted socket was shut down: its peer reads end of stream.
        use std::io::Read;
        let mut b = [0u8; 1];
        assert_eq!(clients[0].read(&mut b).unwrap(), 0);
        // Identified connections are never evicted: with 2 and 3 identified, 1 goes next, then
        // nobody.
        tickets[2].advance(Stage::Identified);
        t3.advance(Stage::Identified);
        let (s, _c4) = pair(&l);
        let t4 = g.admit(s, ip(9)).expect("evicts the initialized one");
        assert!(tickets[1].evicted());
        t4.advance(Stage::Identified);
        let (s, _c5) = pair(&l);
        assert!(
            g.admit(s, ip(9)).is_none(),
            "only identified connections left"
        );
        assert_eq!(
            a.stats(),
            AdmissionStats {
                refused: 1,
                evicted: 2,
                timed_out: 0
            }
        );
        drop(tickets);
        assert_eq!(a.open(), 2, "dropped tickets release their slots once");
    }

    #[test]
    fn one_peer_gets_a_bounded_number_of_unidentified_connections() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut g, a) = gate(100, 2);
        let mut keep = Vec::new();
        for _ in 0..2 {
            let (s, c) = pair(&l);
            keep.push((c, g.admit(s, ip(1)).expect("under the per-peer limit")));
        }
        let (s, _c) = pair(&l);
        assert!(g.admit(s, ip(1)).is_none(), "third from the same address");
        let (s, _c2) = pair(&l);
        assert!(
            g.admit(s, ip(2)).is_some(),
            "another address is not affected"
        );
        // Once identified, the peer's connections no longer count.
        keep[0].1.advance(Stage::Identified);
        let (s, _c3) = pair(&l);
        assert!(g.admit(s, ip(1)).is_some());
        assert_eq!(a.stats().refused, 1);
    }

    #[test]
    fn connect_refusal_lines_are_limited_per_interval() {
        let l = LogLimiter::new();
        let t0 = 1_000_000;
        let allowed = (0..100).filter(|_| l.allow(t0).is_some()).count();
        assert_eq!(allowed, CONNECT_LOG_BURST as usize);
        // The next window's first line carries the count left out.
        let next = t0 + REPORT_INTERVAL.as_millis() as u64;
        assert_eq!(l.allow(next), Some(100 - u64::from(CONNECT_LOG_BURST)));
        assert_eq!(l.allow(next), Some(0));
    }
}
