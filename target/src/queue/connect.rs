//! Fabrics Connect (NVMe-oF 1.1 §3.3): an admin queue creates a controller (dynamic model), an
//! I/O queue joins one by CNTLID. Every refusal names the field, its value and why.

use std::sync::atomic::Ordering;

use super::{Bound, NvmeQueue, Transport};
use crate::spec::Status;
use crate::spec::command::Sqe;
use crate::spec::fabrics::{ConnectCommand, ConnectData, ConnectResponse};
use crate::subsystem::admin::QUEUE_ENTRIES;

/// Keep-alive timeout of a discovery controller whose host asked for none (ms; nvmet's
/// `NVMET_DISC_KATO_MS`).
pub(crate) const DISCOVERY_KATO_MS: u32 = 120_000;

impl NvmeQueue {
    /// Fabrics Connect (NVMe-oF 1.1 §3.3): an admin queue creates a controller (dynamic model),
    /// an I/O queue joins one by CNTLID. Every refusal is logged with the field, its value and
    /// why (rate-limited), so an operator sees why a host cannot attach.
    pub(super) fn connect<T: Transport>(&mut self, t: &mut T, i: usize, sqe: Sqe) {
        if self.bound.is_some() {
            // One controller binding per queue (NVMe-oF 1.1 §3.3): a second would leave the
            // first's controller behind in its subsystem.
            return self.complete_slot(t, i, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
        }
        let cmd = ConnectCommand::from_sqe(&sqe);
        let invalid = |ipo: u16, in_data: bool| {
            let c = ConnectResponse::InvalidParameters { in_data, ipo }.to_cqe(sqe.cid());
            (c.status, c.dw0)
        };
        let data = self.slots[i]
            .buf
            .as_ref()
            .map(|b| b.as_slice()[..ConnectData::LEN].to_vec());
        let Some(data) = data else {
            let r = (Status::DATA_SGL_LENGTH_INVALID, 0);
            return self.refuse_connect(t, i, r, "data", &"none", "Connect carries no data");
        };
        let cd = match ConnectData::parse(&data) {
            Ok(cd) => cd,
            Err(e) => {
                let off = e.ipo().unwrap_or(0);
                let field = if off == ConnectData::OFFSET_SUBNQN {
                    "SUBNQN"
                } else {
                    "HOSTNQN"
                };
                let raw = &data[off as usize..off as usize + 256];
                let raw = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                let value = String::from_utf8_lossy(raw);
                let r = invalid(off, true);
                return self.refuse_connect(t, i, r, field, &value, &e.to_string());
            }
        };
        if cmd.recfmt != 0 {
            let r = (Status::CONNECT_INCOMPATIBLE_FORMAT, 0);
            return self.refuse_connect(t, i, r, "RECFMT", &cmd.recfmt, "only format 0 exists");
        }
        let Some(subsys) = self.target.subsystem(&cd.subnqn) else {
            let r = invalid(ConnectData::OFFSET_SUBNQN, true);
            return self.refuse_connect(t, i, r, "SUBNQN", &cd.subnqn, "no such subsystem");
        };
        // SPDK's initiator without a configured host NQN sends an empty one: acceptable where
        // any host may connect, an invalid parameter where hosts are listed.
        if cd.hostnqn.is_empty() && !subsys.allows_any_host() {
            let r = invalid(ConnectData::OFFSET_HOSTNQN, true);
            let why = "empty host NQN; the subsystem admits listed hosts only";
            return self.refuse_connect(t, i, r, "HOSTNQN", &cd.hostnqn, why);
        }
        if !subsys.host_allowed(&cd.hostnqn) {
            let r = (Status::CONNECT_INVALID_HOST, 0);
            let why = format!("not on the allow-list of {}", cd.subnqn);
            return self.refuse_connect(t, i, r, "HOSTNQN", &cd.hostnqn, &why);
        }
        let entries = u32::from(cmd.sqsize) + 1;
        if cmd.sqsize == 0 || entries > u32::from(QUEUE_ENTRIES) {
            let r = invalid(ConnectCommand::OFFSET_SQSIZE, false);
            let why = format!("not in 1..={} (0's based)", QUEUE_ENTRIES - 1);
            return self.refuse_connect(t, i, r, "SQSIZE", &cmd.sqsize, &why);
        }
        self.sqsize = entries as u16;
        self.flow_control = cmd.cattr & crate::spec::fabrics::CATTR_DISABLE_SQ_FLOW_CONTROL == 0;
        let ctrl = if cmd.qid == 0 {
            // A discovery controller without keep-alive would hold its connection (and a
            // listener slot) forever: it gets nvmet's default instead (NVMe-oF 1.1 §3.3.2
            // lets a discovery controller pick its own).
            let kato = if subsys.discovery && cmd.kato == 0 {
                DISCOVERY_KATO_MS
            } else {
                cmd.kato
            };
            let port = self.port.clone();
            match subsys.create_controller(&cd.hostnqn, cd.hostid, kato, self.reactor.clone(), port)
            {
                Ok(c) => c,
                Err(e) => {
                    let r = (Status::CONNECT_CONTROLLER_BUSY, 0);
                    return self.refuse_connect(t, i, r, "QID", &cmd.qid, e);
                }
            }
        } else {
            let Some(c) = subsys.controller(cd.cntlid) else {
                let r = invalid(ConnectData::OFFSET_CNTLID, true);
                let why = "no such controller in the subsystem";
                return self.refuse_connect(t, i, r, "CNTLID", &cd.cntlid, why);
            };
            if c.hostnqn != cd.hostnqn {
                let r = invalid(ConnectData::OFFSET_HOSTNQN, true);
                let why = format!("controller {} belongs to host {:?}", c.cntlid, c.hostnqn);
                return self.refuse_connect(t, i, r, "HOSTNQN", &cd.hostnqn, &why);
            }
            if c.dead.load(Ordering::Acquire) {
                let r = invalid(ConnectData::OFFSET_CNTLID, true);
                let why = "the controller is being torn down";
                return self.refuse_connect(t, i, r, "CNTLID", &cd.cntlid, why);
            }
            if subsys.discovery || cmd.qid > c.io_queues.load(Ordering::Acquire) {
                let r = invalid(ConnectCommand::OFFSET_QID, false);
                let why = if subsys.discovery {
                    "a discovery controller has no I/O queues".to_owned()
                } else {
                    let n = c.io_queues.load(Ordering::Acquire);
                    format!("above the {n} I/O queues granted")
                };
                return self.refuse_connect(t, i, r, "QID", &cmd.qid, &why);
            }
            c
        };
        let cntlid = ctrl.cntlid;
        self.bound = Some(Bound {
            qid: cmd.qid,
            ctrl,
            ns: Vec::new(),
            ns_gen: 0,
        });
        // Serving the queue allocates nothing per command from here on.
        self.done.reserve(usize::from(QUEUE_ENTRIES));
        self.await_budget.reserve(usize::from(QUEUE_ENTRIES));
        t.connected();
        self.refresh_namespaces();
        tracing::info!(peer = %self.peer, subnqn = %cd.subnqn, host = %cd.hostnqn,
            qid = cmd.qid, cntlid, "NVMe queue connected");
        let c = ConnectResponse::Success { cntlid, authreq: 0 }.to_cqe(sqe.cid());
        self.complete_slot(t, i, c.status, c.dw0, 0);
    }

    /// Completes a refused Connect with `(status, dw0)` and logs why (rate-limited).
    fn refuse_connect<T: Transport>(
        &mut self,
        t: &mut T,
        i: usize,
        (status, dw0): (Status, u32),
        field: &str,
        value: &dyn std::fmt::Debug,
        why: &str,
    ) {
        t.connect_refused(field, value, why);
        self.complete_slot(t, i, status, dw0, 0);
    }
}
