//! Fault-injection bdevs that stack on any bdev, for tests: `error` fails chosen operations,
//! `delay` holds completions back. Both show the stacked-bdev pattern: the channel owns its
//! base's channel, and per-request context lives in a [`Slots`] table sized at channel creation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::bdev::{Bdev, BdevInfo, Channel, ChannelOps, IoCompletion, IoRequest, Wake};
use crate::error::BdevError;
use crate::stacked::{Slots, follow_base_size};
use crate::types::{IoStatus, IoType};

/// Which requests an `error` bdev fails.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRule {
    /// Operations to fail (`read`, `write`, `flush`, `unmap`, `write_zeroes`).
    pub ops: Vec<String>,
    /// Status to fail them with (default `media_error`).
    #[serde(default = "default_error_status")]
    pub status: String,
    /// Fail only this many matching requests, then pass the rest (default: no limit).
    #[serde(default)]
    pub count: Option<u64>,
    /// Fail only every n-th matching request (default 1: every one).
    #[serde(default)]
    pub every: Option<u64>,
}

fn default_error_status() -> String {
    "media_error".into()
}

impl ErrorRule {
    /// Checks names and numbers; `field` prefixes error messages.
    pub fn validate(&self, field: &str) -> Result<(u8, IoStatus), BdevError> {
        let mut mask = 0u8;
        for (i, op) in self.ops.iter().enumerate() {
            let t = IoType::from_name(op).ok_or_else(|| {
                BdevError::invalid(
                    format!("{field}.ops[{i}]"),
                    format!("unknown operation '{op}' (read, write, flush, unmap, write_zeroes)"),
                )
            })?;
            mask |= 1 << t as u8;
        }
        let status = IoStatus::from_name(&self.status)
            .filter(|s| !s.is_ok())
            .ok_or_else(|| {
                BdevError::invalid(
                    format!("{field}.status"),
                    format!("'{}' is not an error status", self.status),
                )
            })?;
        if self.every == Some(0) {
            return Err(BdevError::invalid(
                format!("{field}.every"),
                "must be at least 1",
            ));
        }
        Ok((mask, status))
    }
}

#[derive(Default)]
struct ErrorState {
    mask: AtomicU8,
    status: AtomicU8,
    remaining: AtomicU64,
    every: AtomicU64,
    seen: AtomicU64,
    injected: AtomicU64,
}

/// `error`: passes requests to its base, failing those its rule matches.
pub struct ErrorBdev {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    state: Arc<ErrorState>,
    rule: std::sync::Mutex<Option<ErrorRule>>,
    /// The base's resize listener, removed on drop.
    subscription: u64,
}

impl Drop for ErrorBdev {
    fn drop(&mut self) {
        self.base.info().unsubscribe(self.subscription);
    }
}

impl ErrorBdev {
    /// Stacks an error bdev on `base`, with an optional rule armed from the start.
    pub fn new(
        name: &str,
        base: Arc<dyn Bdev>,
        rule: Option<ErrorRule>,
    ) -> Result<ErrorBdev, BdevError> {
        let g = base.info().geometry();
        let info = BdevInfo::builder(name, "error", g.block_size, g.block_count, g.caps)
            .buf_align(g.buf_align)
            .max_transfer_blocks(g.max_transfer_blocks)
            .max_segments(g.max_segments)
            .read_only(base.info().is_read_only())
            .build();
        let subscription = follow_base_size(&base, &info);
        let b = ErrorBdev {
            info,
            base,
            state: Arc::new(ErrorState::default()),
            rule: std::sync::Mutex::new(None),
            subscription,
        };
        b.inject(rule)?;
        Ok(b)
    }

    /// Arms a new rule (or clears it with `None`); takes effect on every channel at once.
    pub fn inject(&self, rule: Option<ErrorRule>) -> Result<(), BdevError> {
        let s = &self.state;
        match &rule {
            Some(r) => {
                let (mask, status) = r.validate("inject")?;
                s.mask.store(0, Ordering::SeqCst);
                s.status.store(status as u8, Ordering::SeqCst);
                s.remaining
                    .store(r.count.unwrap_or(u64::MAX), Ordering::SeqCst);
                s.every.store(r.every.unwrap_or(1), Ordering::SeqCst);
                s.seen.store(0, Ordering::SeqCst);
                s.mask.store(mask, Ordering::SeqCst);
            }
            None => s.mask.store(0, Ordering::SeqCst),
        }
        *self.rule.lock().expect("rule lock") = rule;
        Ok(())
    }

    /// Requests failed so far.
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::Relaxed)
    }
}

impl Bdev for ErrorBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth();
        let ops = ErrorChannel {
            base,
            state: self.state.clone(),
            failed: VecDeque::with_capacity(depth),
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn control(&self, op: &str, params: serde_json::Value) -> Result<serde_json::Value, BdevError> {
        match op {
            "error_inject" => {
                let rule: Option<ErrorRule> = if params.is_null() {
                    None
                } else {
                    Some(
                        serde_json::from_value(params)
                            .map_err(|e| BdevError::invalid("rule", e.to_string()))?,
                    )
                };
                self.inject(rule)?;
                Ok(self.describe())
            }
            _ => Err(BdevError::Unsupported {
                what: format!("'{op}' on an error bdev (it has: error_inject)"),
            }),
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "rule": *self.rule.lock().expect("rule lock"),
            "injected": self.injected(),
        })
    }
}

struct ErrorChannel {
    base: Channel,
    state: Arc<ErrorState>,
    failed: VecDeque<IoCompletion>,
}

impl ErrorChannel {
    fn should_fail(&self, t: IoType) -> Option<IoStatus> {
        let s = &*self.state;
        if s.mask.load(Ordering::Relaxed) & (1 << t as u8) == 0 {
            return None;
        }
        let every = s.every.load(Ordering::Relaxed).max(1);
        if !(s.seen.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(every) {
            return None;
        }
        s.remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
            .ok()?;
        s.injected.fetch_add(1, Ordering::Relaxed);
        let status = s.status.load(Ordering::Relaxed);
        Some(match status {
            1 => IoStatus::InvalidRange,
            2 => IoStatus::InvalidRequest,
            3 => IoStatus::Unsupported,
            5 => IoStatus::IntegrityError,
            6 => IoStatus::ReadOnly,
            7 => IoStatus::NoSpace,
            8 => IoStatus::Aborted,
            _ => IoStatus::MediaError,
        })
    }
}

impl ChannelOps for ErrorChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        if let Some(status) = self.should_fail(io.io_type) {
            self.failed.push_back(io.complete(status));
            return Ok(());
        }
        self.base.submit(io)
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let n = self.failed.len();
        done.extend(self.failed.drain(..));
        n + self.base.poll(done)
    }

    fn wake(&self) -> Wake {
        if self.failed.is_empty() {
            self.base.wake()
        } else {
            Wake::Immediate
        }
    }
}

/// Added latency of a `delay` bdev, per kind of operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delays {
    /// Added to reads.
    pub read: Duration,
    /// Added to writes.
    pub write: Duration,
    /// Added to flush, unmap and write-zeroes.
    pub other: Duration,
}

/// The longest delay `set_delays` accepts: one hour (long enough to hold requests in flight
/// for as long as a test needs, short of never).
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// `delay`: holds each completion of its base back by a time per operation kind, adjustable
/// while it runs ([`DelayBdev::set_delays`], the `delay_set` control).
pub struct DelayBdev {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    /// Microseconds per kind (read, write, other), shared with every channel.
    delays: Arc<[AtomicU64; 3]>,
    /// The base's resize listener, removed on drop.
    subscription: u64,
}

impl Drop for DelayBdev {
    fn drop(&mut self) {
        self.base.info().unsubscribe(self.subscription);
    }
}

impl DelayBdev {
    /// Stacks a delay bdev on `base`.
    pub fn new(name: &str, base: Arc<dyn Bdev>, delays: Delays) -> DelayBdev {
        let g = base.info().geometry();
        let info = BdevInfo::builder(name, "delay", g.block_size, g.block_count, g.caps)
            .buf_align(g.buf_align)
            .max_transfer_blocks(g.max_transfer_blocks)
            .max_segments(g.max_segments)
            .read_only(base.info().is_read_only())
            .build();
        let subscription = follow_base_size(&base, &info);
        let us = |d: Duration| AtomicU64::new(d.min(MAX_DELAY).as_micros() as u64);
        DelayBdev {
            info,
            base,
            delays: Arc::new([us(delays.read), us(delays.write), us(delays.other)]),
            subscription,
        }
    }

    /// The delays now.
    pub fn delays(&self) -> Delays {
        let us = |k: usize| Duration::from_micros(self.delays[k].load(Ordering::Relaxed));
        Delays {
            read: us(0),
            write: us(1),
            other: us(2),
        }
    }

    /// Changes the delays of completions that arrive from the base from now on (those held
    /// already keep their release time). Each kind's completions leave in arrival order, so
    /// after a decrease a new completion may wait behind one held longer: completions are
    /// never early, only late.
    pub fn set_delays(&self, d: Delays) -> Result<(), BdevError> {
        for (field, v) in [
            ("read_us", d.read),
            ("write_us", d.write),
            ("other_us", d.other),
        ] {
            if v > MAX_DELAY {
                return Err(BdevError::invalid(
                    field,
                    format!("{} µs is more than one hour", v.as_micros()),
                ));
            }
        }
        for (k, v) in [d.read, d.write, d.other].into_iter().enumerate() {
            self.delays[k].store(v.as_micros() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Parameters of the `delay_set` control: the kinds given change, the others keep their delay.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DelaySet {
    #[serde(default)]
    read_us: Option<u64>,
    #[serde(default)]
    write_us: Option<u64>,
    #[serde(default)]
    other_us: Option<u64>,
}

impl Bdev for DelayBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth();
        let ops = DelayChannel {
            base,
            ctx: Slots::new(depth),
            held: [
                VecDeque::with_capacity(depth),
                VecDeque::with_capacity(depth),
                VecDeque::with_capacity(depth),
            ],
            delays: self.delays.clone(),
            scratch: Vec::with_capacity(depth),
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn control(&self, op: &str, params: serde_json::Value) -> Result<serde_json::Value, BdevError> {
        match op {
            "delay_set" => {
                let p: DelaySet = serde_json::from_value(params)
                    .map_err(|e| BdevError::invalid("delays", e.to_string()))?;
                let mut d = self.delays();
                let us = |v: Option<u64>, old: Duration| v.map_or(old, Duration::from_micros);
                d.read = us(p.read_us, d.read);
                d.write = us(p.write_us, d.write);
                d.other = us(p.other_us, d.other);
                self.set_delays(d)?;
                tracing::info!(bdev = %self.info.name(), read_us = d.read.as_micros() as u64,
                    write_us = d.write.as_micros() as u64,
                    other_us = d.other.as_micros() as u64, "delays changed");
                Ok(self.describe())
            }
            _ => Err(BdevError::Unsupported {
                what: format!("'{op}' on a delay bdev (it has: delay_set)"),
            }),
        }
    }

    fn describe(&self) -> serde_json::Value {
        let d = self.delays();
        serde_json::json!({
            "read_us": d.read.as_micros() as u64,
            "write_us": d.write.as_micros() as u64,
            "other_us": d.other.as_micros() as u64,
        })
    }
}

struct DelayChannel {
    base: Channel,
    /// Per request: the submitter's tag and the queue (0 read, 1 write, 2 other) it waits in.
    ctx: Slots<(u64, usize)>,
    /// Completions waiting for their release time; FIFO per kind, so each queue is sorted.
    held: [VecDeque<(Instant, IoCompletion)>; 3],
    /// Microseconds per kind, read at each completion (one relaxed load).
    delays: Arc<[AtomicU64; 3]>,
    scratch: Vec<IoCompletion>,
}

impl ChannelOps for DelayChannel {
    fn submit(&mut self, mut io: IoRequest) -> Result<(), IoRequest> {
        let kind = match io.io_type {
            IoType::Read => 0,
            IoType::Write => 1,
            _ => 2,
        };
        let Ok(slot) = self.ctx.insert((io.tag, kind)) else {
            return Err(io);
        };
        io.tag = u64::from(slot);
        self.base.submit(io).map_err(|mut io| {
            let (tag, _) = self.ctx.remove(slot);
            io.tag = tag;
            io
        })
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        self.base.poll(&mut self.scratch);
        let now = Instant::now();
        for mut c in self.scratch.drain(..) {
            let (tag, kind) = self.ctx.remove(c.tag as u32);
            c.tag = tag;
            let delay = Duration::from_micros(self.delays[kind].load(Ordering::Relaxed));
            self.held[kind].push_back((now + delay, c));
        }
        let mut n = 0;
        for q in self.held.iter_mut() {
            while q.front().is_some_and(|(t, _)| *t <= now) {
                done.push(q.pop_front().expect("front exists").1);
                n += 1;
            }
        }
        n
    }

    fn wake(&self) -> Wake {
        let mut w = self.base.wake();
        for q in &self.held {
            if let Some((t, _)) = q.front() {
                w = w.min(Wake::At(*t));
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::malloc::MallocBdev;
    use crate::sync::SyncChannel;
    use crate::types::BlockSize;

    fn malloc() -> Arc<dyn Bdev> {
        Arc::new(MallocBdev::new("m", BlockSize::B4096, 1024, 2048).unwrap())
    }

    #[test]
    fn error_and_delay_pass_conformance_when_not_injecting() {
        conformance::run(
            &|| Arc::new(ErrorBdev::new("e", malloc(), None).unwrap()),
            false,
        );
        let d = Delays {
            read: Duration::from_micros(200),
            write: Duration::from_micros(100),
            other: Duration::from_micros(50),
        };
        conformance::run(&|| Arc::new(DelayBdev::new("d", malloc(), d)), false);
        // And stacked on each other.
        conformance::run(
            &|| {
                let e: Arc<dyn Bdev> = Arc::new(ErrorBdev::new("e", malloc(), None).unwrap());
                Arc::new(DelayBdev::new("de", e, d))
            },
            false,
        );
    }

    #[test]
    fn error_fails_chosen_ops_count_times() {
        let rule = ErrorRule {
            ops: vec!["write".into()],
            status: "media_error".into(),
            count: Some(2),
            every: None,
        };
        let e = ErrorBdev::new("e", malloc(), Some(rule)).unwrap();
        let mut ch = SyncChannel::new(e.open_channel().unwrap());
        assert_eq!(ch.read(0, 1).0, IoStatus::Success);
        assert_eq!(ch.write(0, &[1; 4096]), IoStatus::MediaError);
        assert_eq!(ch.write(0, &[1; 4096]), IoStatus::MediaError);
        assert_eq!(ch.write(0, &[1; 4096]), IoStatus::Success);
        assert_eq!(e.injected(), 2);
        assert_eq!(e.info().stats().errors, 2);
        e.inject(Some(ErrorRule {
            ops: vec!["read".into(), "flush".into()],
            status: "integrity_error".into(),
            count: None,
            every: Some(2),
        }))
        .unwrap();
        assert_eq!(ch.read(0, 1).0, IoStatus::Success);
        assert_eq!(ch.flush(), IoStatus::IntegrityError);
        e.inject(None).unwrap();
        assert_eq!(ch.flush(), IoStatus::Success);
    }

    #[test]
    fn errors_are_counted_by_status_including_rejected_requests() {
        let rule = ErrorRule {
            ops: vec!["write".into()],
            status: "media_error".into(),
            count: Some(2),
            every: None,
        };
        let e = ErrorBdev::new("e", malloc(), Some(rule)).unwrap();
        let mut ch = SyncChannel::new(e.open_channel().unwrap());
        assert_eq!(ch.write(0, &[1; 4096]), IoStatus::MediaError);
        assert_eq!(ch.write(0, &[1; 4096]), IoStatus::MediaError);
        assert_eq!(ch.read(0, 1).0, IoStatus::Success);
        // Rejected by the channel layer before the bdev sees it.
        let blocks = e.info().geometry().block_count;
        assert_eq!(ch.read(blocks, 1).0, IoStatus::InvalidRange);
        e.inject(Some(ErrorRule {
            ops: vec!["read".into()],
            status: "integrity_error".into(),
            count: Some(1),
            every: None,
        }))
        .unwrap();
        assert_eq!(ch.read(0, 1).0, IoStatus::IntegrityError);
        drop(ch);
        // Totals survive the channel's close.
        let s = e.info().stats();
        let by = |st: IoStatus| s.errors_by_status[st as usize];
        assert_eq!(by(IoStatus::MediaError), 2);
        assert_eq!(by(IoStatus::InvalidRange), 1);
        assert_eq!(by(IoStatus::IntegrityError), 1);
        assert_eq!(by(IoStatus::Success), 0);
        assert_eq!(s.errors, 4);
        assert_eq!(s.rejected, 1);
        for (i, st) in IoStatus::ALL.iter().enumerate() {
            assert_eq!(*st as usize, i, "ALL is in discriminant order");
        }
    }

    #[test]
    fn error_rule_names_bad_fields() {
        let bad = ErrorRule {
            ops: vec!["read".into(), "trim".into()],
            status: "media_error".into(),
            count: None,
            every: None,
        };
        let e = ErrorBdev::new("e", malloc(), Some(bad)).err().unwrap();
        assert_eq!(e.field(), Some("inject.ops[1]"));
        let bad = ErrorRule {
            ops: vec![],
            status: "success".into(),
            count: None,
            every: None,
        };
        assert_eq!(bad.validate("x").unwrap_err().field(), Some("x.status"));
    }

    #[test]
    fn delay_holds_completions() {
        let d = DelayBdev::new(
            "d",
            malloc(),
            Delays {
                read: Duration::from_millis(20),
                ..Default::default()
            },
        );
        let mut ch = SyncChannel::new(d.open_channel().unwrap());
        let t = std::time::Instant::now();
        assert_eq!(ch.read(0, 1).0, IoStatus::Success);
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn delay_set_changes_the_delays_of_open_channels() {
        let d = DelayBdev::new("d", malloc(), Delays::default());
        let mut ch = SyncChannel::new(d.open_channel().unwrap());
        assert_eq!(ch.write(0, &[1; 4096]), IoStatus::Success);
        let r = d
            .control("delay_set", serde_json::json!({"write_us": 30_000}))
            .unwrap();
        assert_eq!(r["write_us"], 30_000);
        assert_eq!(r["read_us"], 0, "kinds not given keep their delay");
        let t = std::time::Instant::now();
        assert_eq!(ch.write(0, &[2; 4096]), IoStatus::Success);
        assert!(t.elapsed() >= Duration::from_millis(30));
        let e = d
            .control(
                "delay_set",
                serde_json::json!({"write_us": 3_600_000_001u64}),
            )
            .unwrap_err();
        assert_eq!(e.field(), Some("write_us"));
        let e = d
            .control("delay_set", serde_json::json!({"writes_us": 1}))
            .unwrap_err();
        assert_eq!(e.field(), Some("delays"));
        assert!(matches!(
            d.control("error_inject", serde_json::Value::Null),
            Err(BdevError::Unsupported { .. })
        ));
        assert_eq!(d.delays().write, Duration::from_millis(30));
    }

    #[test]
    fn stacked_bdevs_follow_their_base_size() {
        let m = malloc();
        let e = ErrorBdev::new("e", m.clone(), None).unwrap();
        m.resize(2048).unwrap();
        assert_eq!(e.info().block_count(), 2048);
    }

    #[test]
    fn dropped_stacked_bdevs_stop_following_their_base() {
        let m = malloc();
        let e = ErrorBdev::new("e", m.clone(), None).unwrap();
        let d = DelayBdev::new("d", m.clone(), Delays::default());
        // Something (a channel, a front) may hold a stacked bdev's info past the bdev itself.
        let (ei, di) = (e.info().clone(), d.info().clone());
        let before = ei.block_count();
        drop(e);
        drop(d);
        // With the listeners still registered, this resize would reach both infos.
        m.resize(before * 2).unwrap();
        assert_eq!(
            ei.block_count(),
            before,
            "error bdev's listener outlived it"
        );
        assert_eq!(
            di.block_count(),
            before,
            "delay bdev's listener outlived it"
        );
    }
}
