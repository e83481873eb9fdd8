//! The cluster goes away under an `rbd` volume: its OSD is stopped and started again while
//! writes are in flight, or the whole cluster is stopped before the volume's first write. Each
//! test has its own cluster (they stop its daemons).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::testing::block_data;
use ferroblk_bdev::{AlignedBuf, Bdev, IoCompletion, IoRequest, IoStatus, IoType, SgList};
use ferroblk_rbd::RbdDecl;
use ferroblk_rbd::testing::TestCluster;

const BLOCKS: u64 = 512;
const QD: usize = 16;

fn open(c: &TestCluster, image: &str, op_timeout_secs: u64) -> ferroblk_rbd::RbdBdev {
    let d: RbdDecl = toml::from_str(&format!(
        "name = \"{image}\"\nimage = \"{image}\"\n{}create = true\nsize = {}\n\
         op_timeout_secs = {op_timeout_secs}\n",
        c.decl_fields(),
        BLOCKS * 4096
    ))
    .unwrap();
    d.open().unwrap()
}

/// Writes at queue depth [`QD`] until `until` returns true, then drains; returns the generation
/// of the last acknowledged write of each block (0: never written) and every failed status.
fn write_load(
    ch: &mut SyncChannel,
    acked: &mut [u8],
    mut until: impl FnMut(usize, usize) -> bool,
) -> Vec<IoStatus> {
    let mut rng = ferroblk_bdev::testing::Rng(7);
    let mut gen_of: HashMap<u64, (u64, u8)> = HashMap::new();
    let mut next_gen = vec![0u8; BLOCKS as usize];
    let mut busy = vec![false; BLOCKS as usize];
    let mut tag = 0u64;
    let mut failed = Vec::new();
    let mut done: Vec<IoCompletion> = Vec::new();
    let mut completed = 0usize;
    let mut stopping = false;
    loop {
        stopping = stopping || until(completed, ch.channel().in_flight());
        while !stopping && ch.channel().in_flight() < QD {
            let lba = rng.below(BLOCKS);
            if busy[lba as usize] {
                // One write per block in flight: the last acknowledged one is the one on disk.
                continue;
            }
            let g = next_gen[lba as usize].wrapping_add(1).max(1);
            next_gen[lba as usize] = g;
            let mut b = AlignedBuf::new(4096);
            b.as_mut_slice().copy_from_slice(&block_data(lba, 4096, g));
            tag += 1;
            gen_of.insert(tag, (lba, g));
            busy[lba as usize] = true;
            let io = IoRequest::write(lba, 1, SgList::from_buf(b), tag);
            assert!(ch.channel().submit(io).is_ok());
        }
        if stopping && ch.channel().in_flight() == 0 {
            return failed;
        }
        ch.poll_once(&mut done);
        for c in done.drain(..) {
            let (lba, g) = gen_of.remove(&c.tag).unwrap();
            busy[lba as usize] = false;
            completed += 1;
            if c.status == IoStatus::Success {
                acked[lba as usize] = g;
            } else {
                failed.push(c.status);
            }
        }
    }
}

fn verify(ch: &mut SyncChannel, acked: &[u8]) {
    for (lba, &g) in acked.iter().enumerate() {
        let (st, back) = ch.read(lba as u64, 1);
        assert_eq!(st, IoStatus::Success, "read {lba}");
        let want = if g == 0 {
            vec![0u8; 4096]
        } else {
            block_data(lba as u64, 4096, g)
        };
        assert!(
            back == want,
            "block {lba}: not the last acknowledged write (generation {g})"
        );
    }
}

#[test]
fn writes_stall_while_the_osd_restarts_then_complete_and_nothing_is_lost() {
    let c = TestCluster::start();
    let bdev = open(&c, "restart", 120);
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    let mut acked = vec![0u8; BLOCKS as usize];
    // Load before, during and after the OSD's absence.
    let t = Instant::now();
    let mut phase = 0;
    let mut at_stop = 0;
    let mut at_restart = 0;
    let mut in_flight_at_stop = 0;
    let failed = write_load(&mut ch, &mut acked, |completed, in_flight| {
        match phase {
            0 if t.elapsed() > Duration::from_secs(1) => {
                at_stop = completed;
                in_flight_at_stop = in_flight;
                // Stopping the OSD blocks this thread (a clean stop: memstore saves what it
                // holds); the writes in flight stay in flight.
                c.stop_osd();
                std::thread::sleep(Duration::from_secs(2));
                c.start_osd();
                phase = 1;
            }
            1 if completed > at_stop + 2000 => {
                at_restart = completed;
                phase = 2;
            }
            // A hang guard, not a measurement.
            1 if t.elapsed() > Duration::from_secs(300) => panic!("writes never resumed"),
            _ => {}
        }
        phase == 2
    });
    assert!(failed.is_empty(), "writes failed: {failed:?}");
    // Writes were in flight when the OSD went away; they completed (successfully) after.
    assert!(in_flight_at_stop > 0);
    assert!(at_stop > 0 && at_restart > at_stop);
    assert_eq!(ch.flush(), IoStatus::Success);
    verify(&mut ch, &acked);
    // And a fresh open of the image sees the same.
    drop(ch);
    drop(bdev);
    let again = open(&c, "restart", 120);
    verify(&mut SyncChannel::new(again.open_channel().unwrap()), &acked);
}

#[test]
fn requests_fail_after_op_timeout_while_the_cluster_is_away_then_succeed_again() {
    let c = TestCluster::start();
    let bdev = open(&c, "away", 2);
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    let d = block_data(1, 4096, 1);
    assert_eq!(ch.write(1, &d), IoStatus::Success);
    c.stop_osd();
    // Neither hangs: each fails once op_timeout_secs passed.
    assert_eq!(ch.write(2, &block_data(2, 4096, 1)), IoStatus::MediaError);
    assert_eq!(ch.read(1, 1).0, IoStatus::MediaError);
    c.start_osd();
    let t = Instant::now();
    loop {
        let (st, back) = ch.read(1, 1);
        if st == IoStatus::Success {
            assert!(back == d);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the volume never recovered: {st:?}"
        );
    }
    assert_eq!(ch.write(3, &block_data(3, 4096, 1)), IoStatus::Success);
    assert_eq!(ch.flush(), IoStatus::Success);
}

#[test]
fn a_volume_whose_cluster_is_gone_still_closes() {
    let c = TestCluster::start();
    let bdev = open(&c, "gone", 2);
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    // A write takes the image's exclusive lock, which closing gives back to the cluster.
    assert_eq!(ch.write(0, &block_data(0, 4096, 1)), IoStatus::Success);
    drop(ch);
    c.kill();
    // Closing waits on the cluster at most op_timeout + connect_timeout, then leaves the close
    // to finish in the background: dropping returns (the test would hang otherwise).
    drop(bdev);
}

/// Runs one request on a volume of `c` and waits for its completion; after `guard` (a hang
/// guard, not a measurement: the rule is that such a request fails after `op_timeout_secs`)
/// brings the cluster back, so the request can finish and the test fail instead of hanging.
fn run_guarded(c: &TestCluster, ch: &mut SyncChannel, io: IoRequest, guard: Duration) -> IoStatus {
    let what = io.io_type;
    assert!(ch.channel().submit(io).is_ok());
    let t = Instant::now();
    let mut done = Vec::new();
    loop {
        ch.poll_once(&mut done);
        if let Some(done) = done.pop() {
            return done.status;
        }
        if t.elapsed() > guard {
            c.restore();
            panic!("a {what:?} to a cluster that is away hung for {guard:?}");
        }
    }
}

fn write_request(lba: u64, generation: u8) -> IoRequest {
    let mut b = AlignedBuf::new(4096);
    b.as_mut_slice()
        .copy_from_slice(&block_data(lba, 4096, generation));
    IoRequest::write(lba, 1, SgList::from_buf(b), lba)
}

#[test]
fn a_first_write_after_the_cluster_went_away_fails_after_op_timeout_then_the_volume_recovers() {
    let c = TestCluster::start();
    let op_timeout = 2;
    let bdev = open(&c, "first", op_timeout);
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    // Opened, read, never written: the volume's first write is yet to come.
    assert_eq!(ch.read(0, 1).0, IoStatus::Success);
    c.cut();
    // Long enough for librbd's watch on the image's header to fail (its connection to the OSD
    // closed, and no monitor says the OSD is down, so it keeps trying the OSD) and for its
    // re-watch loop to start: a request for the image's exclusive lock made then waits for the
    // watch, with no bound, so a write that still had to take the lock would hang until the
    // cluster returned (as it did before the volume took the lock at open).
    std::thread::sleep(Duration::from_secs(5 * op_timeout));
    let guard = Duration::from_secs(60);
    for lba in [1, 2] {
        assert_eq!(
            run_guarded(&c, &mut ch, write_request(lba, 1), guard),
            IoStatus::MediaError,
            "write {lba} while the cluster is away"
        );
    }
    // A flush does not hang either; with librbd's cache off every acknowledged write is in the
    // cluster already and none is in flight, so it has nothing to wait for.
    assert_eq!(
        run_guarded(
            &c,
            &mut ch,
            IoRequest::no_data(IoType::Flush, 0, 0, 0),
            guard
        ),
        IoStatus::Success,
        "a flush while the cluster is away"
    );
    c.restore();
    // The volume recovers: writes succeed again once librbd is back in touch.
    let t = Instant::now();
    while run_guarded(&c, &mut ch, write_request(1, 2), guard) != IoStatus::Success {
        assert!(t.elapsed() < guard, "the volume never recovered");
    }
    assert_eq!(ch.write(2, &block_data(2, 4096, 2)), IoStatus::Success);
    assert_eq!(ch.flush(), IoStatus::Success);
    for lba in [1, 2] {
        let (st, back) = ch.read(lba, 1);
        assert_eq!(st, IoStatus::Success);
        assert!(back == block_data(lba, 4096, 2), "block {lba}");
    }
    // The next owner of the image reads what was acknowledged. librbd updated its object map in
    // memory but not in the cluster when the first write failed, and would then never write it
    // again; the volume rebuilds it once the cluster is back (else a new owner, trusting the
    // map, would read zeros for objects written since).
    drop(ch);
    drop(bdev);
    let again = open(&c, "first", op_timeout);
    let mut ch = SyncChannel::new(again.open_channel().unwrap());
    for lba in [1, 2] {
        let (st, back) = ch.read(lba, 1);
        assert_eq!(st, IoStatus::Success);
        assert!(
            back == block_data(lba, 4096, 2),
            "block {lba} after a reopen"
        );
    }
}
