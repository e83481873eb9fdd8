//! A live target on loopback for the integration tests (`mod common;` in `tests/*.rs`): one
//! reactor, one subsystem that admits any host, and a listener on an ephemeral port.

// Each test binary uses only part of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferroblk_bdev::reactor::{ReactorConfig, Reactors};
use ferroblk_bdev::{Bdev, BlockSize, malloc::MallocBdev};
use ferroblk_target::subsystem::{ListenerSpec, Subsystem, SubsystemSpec, Target};
use ferroblk_target::transport::tcp::listener::Listener;

/// The running target; dropping it stops the listener and the reactor.
pub struct Rig {
    /// The target, for more subsystems.
    pub target: Arc<Target>,
    /// The subsystem, for namespace changes during a test.
    pub subsystem: Arc<Subsystem>,
    /// Where the listener accepts connections.
    pub addr: SocketAddr,
    /// The listener, for its connection counts.
    pub listener: Listener,
    _reactors: Reactors,
}

impl Rig {
    /// The reactors' handles, for another listener on the same target.
    pub fn reactor_handles(&self) -> Vec<ferroblk_bdev::reactor::ReactorHandle> {
        self._reactors.handles().to_vec()
    }
}

/// One reactor and a target exporting `ns1` as namespace 1 of subsystem `nqn` (any host), no
/// listener.
pub fn target_on(nqn: &str, ns1: Arc<dyn Bdev>) -> (Reactors, Arc<Target>, Arc<Subsystem>) {
    let reactors = Reactors::start(&ReactorConfig {
        cpus: vec![None],
        idle_poll: Duration::from_micros(50),
    })
    .unwrap();
    let target = Arc::new(Target::new());
    let subsystem = target
        .add_subsystem(&SubsystemSpec {
            nqn: nqn.into(),
            serial: None,
            model: "t".into(),
            allow_any_host: true,
            hosts: vec![],
            namespace: vec![],
        })
        .unwrap();
    subsystem.add_namespace(1, ns1, None).unwrap();
    (reactors, target, subsystem)
}

/// Property Set of CC: EN = 1, IOSQES 6 (64-byte SQEs), IOCQES 4 (16-byte CQEs), as Linux
/// enables a controller.
pub fn cc_enable(cid: u16) -> ferroblk_target::spec::command::Sqe {
    ferroblk_target::spec::fabrics::PropertySet {
        attrib: 2,
        ofst: 0x14,
        value: 0x0046_0001,
    }
    .to_sqe(cid)
}

/// A 1 MiB malloc bdev with 4 KiB blocks.
pub fn malloc_1m() -> Arc<dyn Bdev> {
    Arc::new(MallocBdev::new("m", BlockSize::B4096, 256, 256).unwrap())
}

/// Starts a target exporting `ns1` as namespace 1 of subsystem `nqn`.
pub fn rig(nqn: &str, ns1: Arc<dyn Bdev>) -> Rig {
    rig_on(nqn, ns1, ListenerSpec::new("127.0.0.1", 0))
}

/// [`rig`] with the listener declared by `spec`.
pub fn rig_on(nqn: &str, ns1: Arc<dyn Bdev>, spec: ListenerSpec) -> Rig {
    let (reactors, target, subsystem) = target_on(nqn, ns1);
    let listener = Listener::start(spec, target.clone(), reactors.handles().to_vec()).unwrap();
    let addr = listener.local_addr();
    Rig {
        target,
        subsystem,
        addr,
        listener,
        _reactors: reactors,
    }
}
