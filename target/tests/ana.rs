//! Asymmetric Namespace Access (NVMe Base 2.0 §8.1) on a live target, seen through the
//! initiator library: one subsystem behind two listeners (ports) with different ANA states.
//! Identify reports ANA, the ANA log page gives each port's state, I/O on a port where the
//! group is inaccessible fails with the ANA path status, and a state change reaches the hosts
//! of that port as an ANA Change asynchronous event.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use ferroblk_target::initiator::{AdminEvent, ConnectOptions, Controller, IoQueueOptions};
use ferroblk_target::spec::Status;
use ferroblk_target::spec::command::{AsyncEvent, async_event_notice, async_event_type};
use ferroblk_target::spec::features::AsyncEventConfig;
use ferroblk_target::spec::identify::{anacap, cmic};
use ferroblk_target::spec::log::{ANA_LOG_HEADER_LEN, LogPageId, ana_state, ana_state_of};
use ferroblk_target::spec::status::path;
use ferroblk_target::subsystem::{ANA_GROUPS, AnaState, ListenerSpec};
use ferroblk_target::transport::tcp::listener::Listener;

const NQN: &str = "nqn.2026-12.io.ferroblk:ana";
/// How long a test waits for an event before it fails (never reached when events work).
const EVENT_WAIT: Duration = Duration::from_secs(20);

/// The rig's listener (optimized) and a second one declared non-optimized.
fn two_ports() -> (common::Rig, Listener) {
    let rig = common::rig(NQN, common::malloc_1m());
    let spec = ListenerSpec {
        ana_state: AnaState::NonOptimized,
        ..ListenerSpec::new("127.0.0.1", 0)
    };
    let second = Listener::start(spec, rig.target.clone(), rig.reactor_handles()).unwrap();
    (rig, second)
}

/// The target's port of listener `l`.
fn port_of(rig: &common::Rig, l: &Listener) -> std::sync::Arc<ferroblk_target::subsystem::Port> {
    let spec = ListenerSpec::new("127.0.0.1", l.local_addr().port());
    rig.target.port(&spec).unwrap()
}

fn ana_log(c: &Controller) -> Vec<u8> {
    c.get_log_page(LogPageId::AsymmetricNamespaceAccess as u8, 0, 0, 4096)
        .unwrap()
}

#[test]
fn identify_reports_ana_and_the_namespace_group() {
    let (rig, _second) = two_ports();
    let c = Controller::connect(&ConnectOptions::new(rig.addr, NQN)).unwrap();
    let id = c.identify();
    assert_ne!(id.cmic & cmic::ANA_REPORTING, 0, "CMIC bit 3");
    assert_ne!(id.cmic & cmic::MULTI_PORT, 0, "CMIC bit 0");
    assert!(id.anatt > 0, "ANATT");
    for bit in [
        anacap::OPTIMIZED,
        anacap::NON_OPTIMIZED,
        anacap::INACCESSIBLE,
        anacap::PERSISTENT_LOSS,
        anacap::CHANGE,
    ] {
        assert_ne!(id.anacap & bit, 0, "ANACAP {bit:#x}");
    }
    assert_eq!((id.anagrpmax, id.nanagrpid), (ANA_GROUPS, ANA_GROUPS));
    // Linux refuses ANA with MNAN 0 or above NN.
    assert!(
        id.mnan > 0 && id.mnan <= id.nn,
        "MNAN {} NN {}",
        id.mnan,
        id.nn
    );
    assert_ne!(id.oaes & (1 << 11), 0, "OAES ANA Change Notices");
    assert_eq!(c.identify_namespace(1).unwrap().anagrpid, 1, "ANAGRPID");
}

#[test]
fn ana_log_page_gives_each_ports_state() {
    let (rig, second) = two_ports();
    let a = Controller::connect(&ConnectOptions::new(rig.addr, NQN)).unwrap();
    let b = Controller::connect(&ConnectOptions::new(second.local_addr(), NQN)).unwrap();
    let (pa, pb) = (ana_log(&a), ana_log(&b));
    assert_eq!(ana_state_of(&pa, 1), Some(ana_state::OPTIMIZED));
    assert_eq!(ana_state_of(&pb, 1), Some(ana_state::NON_OPTIMIZED));
    assert_eq!(&pa[8..10], &[1, 0], "one group: the namespace's");
    assert_eq!(
        &pa[ANA_LOG_HEADER_LEN..ANA_LOG_HEADER_LEN + 4],
        &[1, 0, 0, 0]
    );
    // RGO (Log Specific Parameter bit 0): the descriptor without its NSID list.
    let sqe = ferroblk_target::spec::command::GetLogPage {
        lid: LogPageId::AsymmetricNamespaceAccess as u8,
        lsp: 1,
        rae: false,
        numd: 1024,
        lsi: 0,
        offset: 0,
        nsid: 0,
    }
    .to_sqe(0);
    let rgo = a
        .admin_command(
            sqe,
            ferroblk_target::initiator::Xfer::FromController,
            vec![0; 4096],
        )
        .unwrap()
        .buf;
    let d = ANA_LOG_HEADER_LEN;
    assert_eq!(&rgo[d + 4..d + 8], &[0, 0, 0, 0], "NNSID 0 with RGO");
    assert_eq!(rgo[d + 16], ana_state::OPTIMIZED);
}

#[test]
fn io_on_an_inaccessible_port_fails_with_the_ana_status() {
    let (rig, second) = two_ports();
    let a = Controller::connect(&ConnectOptions::new(rig.addr, NQN)).unwrap();
    let b = Controller::connect(&ConnectOptions::new(second.local_addr(), NQN)).unwrap();
    let o = IoQueueOptions {
        depth: 32,
        ..IoQueueOptions::default()
    };
    let mut qa = a.connect_io_queue(1, &o).unwrap();
    let mut qb = b.connect_io_queue(1, &o).unwrap();
    let port_b = port_of(&rig, &second);
    let cases = [
        (AnaState::Inaccessible, path::ANA_INACCESSIBLE),
        (AnaState::PersistentLoss, path::ANA_PERSISTENT_LOSS),
        (AnaState::Change, path::ANA_TRANSITION),
    ];
    for (state, sc) in cases {
        rig.target.set_ana_state(&port_b, None, state).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = qb.read(1, 0, 1, &mut buf).unwrap_err();
        assert_eq!(e.status(), Some(Status::path(sc)), "{state:?}: read");
        let mut w = vec![7u8; 4096];
        let e = qb.write(1, 0, 1, &mut w).unwrap_err();
        assert_eq!(e.status(), Some(Status::path(sc)), "{state:?}: write");
        // The other port is untouched.
        qa.write(1, 0, 1, &mut w).unwrap();
    }
    rig.target
        .set_ana_state(&port_b, Some(1), AnaState::Optimized)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    qb.read(1, 0, 1, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7), "written through port A");
}

#[test]
fn ana_state_change_sends_an_ana_change_event_to_that_ports_hosts() {
    let (rig, second) = two_ports();
    // No keep-alive: its commands would also collect an event left unread, so without them
    // an event the admin thread misses is never reported and the test fails.
    let opts = ConnectOptions {
        kato: Duration::ZERO,
        ..ConnectOptions::new(second.local_addr(), NQN)
    };
    let mut b = Controller::connect(&opts).unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let enabled = b
        .enable_async_events(AsyncEventConfig::ANA_CHANGE_NOTICES, move |e| {
            let _ = tx.lock().unwrap().send(e);
        })
        .unwrap();
    assert_eq!(enabled, AsyncEventConfig::ANA_CHANGE_NOTICES);
    let port_b = port_of(&rig, &second);
    let before = ana_log(&b);
    rig.target
        .set_ana_state(&port_b, Some(1), AnaState::Inaccessible)
        .unwrap();
    let ev = rx.recv_timeout(EVENT_WAIT).expect("an ANA Change event");
    assert_eq!(
        ev,
        AdminEvent::Async(AsyncEvent {
            event_type: async_event_type::NOTICE,
            info: async_event_notice::ANA_CHANGE,
            log_page: LogPageId::AsymmetricNamespaceAccess as u8,
        })
    );
    let after = ana_log(&b);
    assert_eq!(ana_state_of(&after, 1), Some(ana_state::INACCESSIBLE));
    let chgcnt = |p: &[u8]| u64::from_le_bytes(p[..8].try_into().unwrap());
    assert!(chgcnt(&after) > chgcnt(&before), "Change Count moved");
    // The Asynchronous Event Request is held again: the next change is reported too.
    rig.target
        .set_ana_state(&port_b, None, AnaState::Optimized)
        .unwrap();
    assert!(matches!(
        rx.recv_timeout(EVENT_WAIT),
        Ok(AdminEvent::Async(AsyncEvent {
            info: async_event_notice::ANA_CHANGE,
            ..
        }))
    ));
    assert_eq!(ana_state_of(&ana_log(&b), 1), Some(ana_state::OPTIMIZED));
}

#[test]
fn listener_declarations_check_ana_groups() {
    let mut l = ListenerSpec::new("127.0.0.1", 4420);
    l.set_ana_state(Some(3), AnaState::Inaccessible);
    assert_eq!(l.ana_state_of(3), AnaState::Inaccessible);
    assert_eq!(l.ana_state_of(1), AnaState::Optimized);
    assert!(l.validate().is_ok());
    l.ana_group[0].anagrpid = ANA_GROUPS + 1;
    assert_eq!(l.validate().unwrap_err().0, "ana_group[0].anagrpid");
    l.set_ana_state(None, AnaState::NonOptimized);
    assert!(l.ana_group.is_empty());
    assert_eq!(l.ana_state_of(5), AnaState::NonOptimized);
}
