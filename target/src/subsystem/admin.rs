//! Admin commands of a controller (NVMe Base 2.0 §5; NVMe-oF 1.1 §3.5 and §5 for the
//! discovery controller): Identify, Get Log Page, Set/Get Features, Keep Alive, Abort,
//! Asynchronous Event Request, and the Fabrics Property Get/Set that drive CC/CSTS.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferroblk_bdev::{Caps, MAX_EXPORT_IO_BYTES};

use super::{ANA_GROUPS, ANA_TRANSITION_TIME_S, Controller, MAX_IO_QUEUES, Target};
use crate::spec::Status;
use crate::spec::command::{AdminOpcode, GetLogPage, Identify, Sqe, cns};
use crate::spec::fabrics::{Cap, Cc, Csts, PropertyGet, PropertySet, Version, property, shst};
use crate::spec::features::{FeatureId, NumberOfQueues};
use crate::spec::identify::{
    IDENTIFY_LEN, IdentifyController, IdentifyNamespace, LbaFormat, NsIdDescriptor, anacap, cmic,
    cntrltype, dlfeat, lpa, nsfeat, oaes, oncs, sgls, vwc, write_active_ns_list,
};
use crate::spec::log::{
    ANA_LSP_RGO, LogPageId, SmartLog, ana_log_page, discovery_log_page, write_changed_ns_list,
};

/// Queue entries per I/O queue (CAP.MQES + 1).
pub const QUEUE_ENTRIES: u16 = 128;
/// In-capsule data an I/O queue accepts (IOCCSZ × 16 − 64).
pub const IN_CAPSULE_DATA: u32 = 8192;
/// MDTS: 2^MDTS × 4 KiB (CAP.MPSMIN) per command, the largest I/O every exported chain is
/// tested with ([`MAX_EXPORT_IO_BYTES`], 1 MiB); the bdev channel layer splits it for bdevs
/// that take less.
pub const MDTS: u8 = (MAX_EXPORT_IO_BYTES >> 12).trailing_zeros() as u8;
/// Most data bytes one command transfers (MDTS in units of CAP.MPSMIN, 4 KiB).
pub const MAX_TRANSFER: usize = 4096 << MDTS;
const _: () = assert!(MAX_TRANSFER as u64 == MAX_EXPORT_IO_BYTES);
/// Most outstanding Asynchronous Event Requests (AERL + 1).
pub const AER_SLOTS: usize = 4;
/// Version reported in VS and Identify Controller.
pub const VERSION: Version = Version::V1_3;

/// What an admin command produced.
pub enum AdminOutcome {
    /// Complete now with this status, DW0/DW1, and data for the host (C2H).
    Done {
        /// Status.
        status: Status,
        /// Completion DW0.
        dw0: u32,
        /// Completion DW1.
        dw1: u32,
        /// Data to transfer to the host.
        data: Option<Vec<u8>>,
    },
    /// An Asynchronous Event Request: held until an event occurs.
    Aer,
}

fn done(status: Status) -> AdminOutcome {
    AdminOutcome::Done {
        status,
        dw0: 0,
        dw1: 0,
        data: None,
    }
}

fn with_data(data: Vec<u8>) -> AdminOutcome {
    AdminOutcome::Done {
        status: Status::SUCCESS,
        dw0: 0,
        dw1: 0,
        data: Some(data),
    }
}

fn with_dw0(dw0: u32) -> AdminOutcome {
    AdminOutcome::Done {
        status: Status::SUCCESS,
        dw0,
        dw1: 0,
        data: None,
    }
}

/// The controller capabilities the target reports.
pub fn cap() -> Cap {
    Cap {
        mqes: QUEUE_ENTRIES - 1,
        cqr: true,
        ams: 0,
        to: 30,
        dstrd: 0,
        nssrs: false,
        css: crate::spec::fabrics::CAP_CSS_NVM,
        bps: false,
        mpsmin: 0,
        mpsmax: 0,
    }
}

/// Fabrics Property Get (NVMe-oF 1.1 §3.4): CAP, VS, CC, CSTS.
pub fn property_get(ctrl: &Controller, sqe: &Sqe) -> AdminOutcome {
    let p = PropertyGet::from_sqe(sqe);
    let v: u64 = match p.ofst {
        property::CAP => cap().to_u64(),
        property::VS => u64::from(VERSION.0),
        property::CC => u64::from(ctrl.cc.load(Ordering::Acquire)),
        property::CSTS => u64::from(ctrl.csts.load(Ordering::Acquire)),
        _ => return done(Status::INVALID_FIELD),
    };
    AdminOutcome::Done {
        status: Status::SUCCESS,
        dw0: v as u32,
        dw1: (v >> 32) as u32,
        data: None,
    }
}

/// Fabrics Property Set: CC (enable and shutdown handshakes, NVMe Base 2.0 §3.6).
pub fn property_set(ctrl: &Controller, sqe: &Sqe) -> AdminOutcome {
    let p = PropertySet::from_sqe(sqe);
    if p.ofst != property::CC {
        return done(Status::INVALID_FIELD);
    }
    let cc = Cc::from_u32(p.value as u32);
    let old = Cc::from_u32(ctrl.cc.load(Ordering::Acquire));
    ctrl.cc.store(cc.to_u32(), Ordering::Release);
    let mut csts = Csts::from_u32(ctrl.csts.load(Ordering::Acquire));
    if cc.en && !old.en {
        csts.rdy = true;
        csts.shst = shst::NORMAL;
    } else if !cc.en && old.en {
        csts.rdy = false;
    }
    if cc.shn != 0 {
        // Nothing is cached in the controller itself: shutdown completes at once.
        csts.shst = shst::COMPLETE;
    }
    ctrl.csts.store(csts.to_u32(), Ordering::Release);
    done(Status::SUCCESS)
}

fn identify_controller(ctrl: &Controller, target: &Target) -> Vec<u8> {
    let s = &ctrl.subsystem;
    let all_unmap = s
        .namespaces()
        .iter()
        .all(|n| n.bdev.info().caps().contains(Caps::UNMAP));
    let all_wz = s
        .namespaces()
        .iter()
        .all(|n| n.bdev.info().caps().contains(Caps::WRITE_ZEROES));
    let id = IdentifyController {
        vid: 0,
        ssvid: 0,
        sn: s.serial.clone(),
        mn: s.model.clone(),
        fr: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
        rab: 6,
        ieee: [0; 3],
        // A subsystem may be reached on several listeners (ports), and reports ANA
        // (NVMe Base 2.0 §8.1): Linux's nvme multipath uses ANA only with CMIC bit 3.
        cmic: if s.discovery {
            0
        } else {
            cmic::MULTI_PORT | cmic::MULTI_CONTROLLER | cmic::ANA_REPORTING
        },
        mdts: MDTS,
        cntlid: ctrl.cntlid,
        ver: VERSION,
        oaes: if s.discovery {
            oaes::DISCOVERY_LOG_CHANGE
        } else {
            oaes::NAMESPACE_ATTRIBUTE | oaes::ANA_CHANGE
        },
        cntrltype: if s.discovery {
            cntrltype::DISCOVERY
        } else {
            cntrltype::IO
        },
        acl: 3,
        aerl: (AER_SLOTS - 1) as u8,
        frmw: 1 << 1 | 1,
        lpa: lpa::EXTENDED_DATA,
        elpe: 0,
        kas: 1,
        anatt: if s.discovery {
            0
        } else {
            ANA_TRANSITION_TIME_S
        },
        anacap: if s.discovery {
            0
        } else {
            anacap::OPTIMIZED
                | anacap::NON_OPTIMIZED
                | anacap::INACCESSIBLE
                | anacap::PERSISTENT_LOSS
                | anacap::CHANGE
                | anacap::GRPID_NOT_CHANGED
        },
        anagrpmax: if s.discovery { 0 } else { ANA_GROUPS },
        nanagrpid: if s.discovery { 0 } else { ANA_GROUPS },
        // MNAN: Linux refuses an ANA-reporting controller whose MNAN is 0 or above NN.
        mnan: if s.discovery { 0 } else { super::MAX_NSID },
        sqes: 0x66,
        cqes: 0x44,
        maxcmd: QUEUE_ENTRIES,
        nn: if s.discovery { 0 } else { super::MAX_NSID },
        oncs: if s.discovery {
            0
        } else {
            oncs::COMPARE
                | if all_unmap {
                    oncs::DATASET_MANAGEMENT
                } else {
                    0
                }
                | if all_wz { oncs::WRITE_ZEROES } else { 0 }
        },
        // Always present (as nvmet and SPDK report it): a host reads this once, when it sets
        // the controller up, and a namespace with a volatile cache may be added after that
        // (a host told "no cache" would never flush it). Flush on a namespace without one
        // costs nothing.
        vwc: if s.discovery {
            vwc::FLUSH_BROADCAST_SUPPORTED
        } else {
            vwc::PRESENT | vwc::FLUSH_BROADCAST_SUPPORTED
        },
        // Both transports' descriptors: a controller lives on one association, whose queues
        // each take only their own transport's kind (NvmeQueue::with_keyed_sgl); Linux's
        // nvme-rdma refuses a controller without Keyed SGL Data Block support.
        sgls: sgls::SUPPORTED | sgls::KEYED_DATA_BLOCK | sgls::OFFSET | sgls::TRANSPORT_DATA_BLOCK,
        subnqn: s.nqn.clone(),
        ioccsz: (IN_CAPSULE_DATA + 64) / 16,
        iorcsz: 1,
        icdoff: 0,
        fcatt: 0,
        msdbd: 1,
        ofcs: 1,
        ..Default::default()
    };
    let _ = target;
    id.to_vec()
}

fn identify_namespace(ns: &super::Namespace) -> Vec<u8> {
    let g = ns.bdev.info().geometry();
    let mut dl = 0;
    if g.caps.contains(Caps::UNMAP_READS_ZEROES) {
        dl |= dlfeat::READ_ZEROES | dlfeat::WRITE_ZEROES_DEALLOCATE;
    }
    // NOWS (0's based): the chain's own largest transfer, so hosts size their I/O to what the
    // chain takes whole (NVM Command Set §4.1.5.2: optimal write size). NPWG stays one block.
    let mdts_blocks = MAX_EXPORT_IO_BYTES >> g.block_size.shift();
    let nows = u64::from(g.max_transfer_blocks)
        .min(mdts_blocks)
        .clamp(1, 1 << 16)
        - 1;
    IdentifyNamespace {
        nsze: g.block_count,
        ncap: g.block_count,
        nuse: g.block_count,
        nsfeat: nsfeat::OPTIMAL_PERFORMANCE,
        nows: nows as u16,
        flbas: 0,
        nmic: 1,
        dlfeat: dl,
        anagrpid: ns.anagrpid,
        nsattr: u8::from(ns.bdev.info().is_read_only()),
        nguid: ns.nguid,
        lbaf: vec![LbaFormat::with_block_size(g.block_size.bytes())],
        ..Default::default()
    }
    .to_vec()
}

/// Bytes a Get Log Page returns (NVMe Base 2.0 §5.16), decided before anything is allocated so
/// that the host never chooses an allocation size: the NUMD length (in bytes, `numd_bytes`)
/// capped to the command's data buffer (`sgl_len`); `None` (Invalid Field in Command) when NUMD
/// asks for more than MDTS allows. Bytes past the end of the log read as zeroes.
pub fn log_page_transfer_len(numd_bytes: u64, sgl_len: u32) -> Option<usize> {
    if numd_bytes > MAX_TRANSFER as u64 {
        return None;
    }
    Some((numd_bytes as usize).min(sgl_len as usize))
}

/// Runs one admin command of controller `ctrl`. `data` is the command's host-to-controller
/// data (Set Features payloads), if any.
pub fn execute(ctrl: &Arc<Controller>, target: &Target, sqe: &Sqe) -> AdminOutcome {
    let s = &ctrl.subsystem;
    // Keep Alive and any admin command restart the keep-alive timer.
    ctrl.keep_alive();
    let Some(opc) = sqe.admin_opcode() else {
        return done(Status::INVALID_OPCODE);
    };
    match opc {
        AdminOpcode::KeepAlive => done(Status::SUCCESS),
        AdminOpcode::Identify => {
            let id = Identify::from_sqe(sqe);
            match id.cns {
                cns::CONTROLLER => with_data(identify_controller(ctrl, target)),
                _ if s.discovery => done(Status::INVALID_FIELD),
                cns::NAMESPACE => match s.namespace(id.nsid) {
                    Some(ns) => with_data(identify_namespace(&ns)),
                    // An inactive NSID in range: a zero-filled structure (NVMe Base §5.17.2.1).
                    None if id.nsid >= 1 && id.nsid <= super::MAX_NSID => {
                        with_data(vec![0; IDENTIFY_LEN])
                    }
                    None => done(Status::INVALID_NAMESPACE),
                },
                cns::ACTIVE_NAMESPACE_LIST => {
                    if id.nsid >= 0xffff_fffe {
                        return done(Status::INVALID_NAMESPACE);
                    }
                    let ids: Vec<u32> = s.namespaces().iter().map(|n| n.nsid).collect();
                    let mut out = vec![0u8; IDENTIFY_LEN];
                    write_active_ns_list(&ids, id.nsid, &mut out);
                    with_data(out)
                }
                cns::NAMESPACE_ID_DESCRIPTORS => match s.namespace(id.nsid) {
                    Some(ns) => {
                        let mut out = vec![0u8; IDENTIFY_LEN];
                        NsIdDescriptor::write_list(
                            &[
                                NsIdDescriptor::Nguid(ns.nguid),
                                NsIdDescriptor::Uuid(ns.uuid),
                                NsIdDescriptor::Csi(0),
                            ],
                            &mut out,
                        );
                        with_data(out)
                    }
                    None => done(Status::INVALID_NAMESPACE),
                },
                // I/O Command Set specific Identify Controller for the NVM set: no limits.
                cns::CSI_CONTROLLER if id.csi == 0 => with_data(vec![0; IDENTIFY_LEN]),
                _ => done(Status::INVALID_FIELD),
            }
        }
        AdminOpcode::GetLogPage => {
            let g = GetLogPage::from_sqe(sqe);
            let page: Vec<u8> = match LogPageId::from_u8(g.lid) {
                Some(LogPageId::Discovery) if s.discovery => {
                    discovery_log_page(target.genctr(), &target.discovery_entries(&ctrl.hostnqn))
                }
                Some(LogPageId::ErrorInformation) => vec![0; 64],
                Some(LogPageId::SmartHealth) if !s.discovery => {
                    let mut v = vec![0u8; 512];
                    let (mut rd, mut wr, mut rc, mut wc) = (0u128, 0u128, 0u128, 0u128);
                    for ns in s.namespaces() {
                        let st = ns.bdev.info().stats();
                        rd += u128::from(st.bytes[0]);
                        wr += u128::from(st.bytes[1]);
                        rc += u128::from(st.ops[0]);
                        wc += u128::from(st.ops[1]);
                    }
                    SmartLog {
                        composite_temperature: 300,
                        available_spare: 100,
                        available_spare_threshold: 10,
                        data_units_read: rd.div_ceil(512_000),
                        data_units_written: wr.div_ceil(512_000),
                        host_read_commands: rc,
                        host_write_commands: wc,
                        ..Default::default()
                    }
                    .write_to(&mut v);
                    v
                }
                Some(LogPageId::AsymmetricNamespaceAccess) if !s.discovery => {
                    let port = ctrl.port.as_deref();
                    let chgcnt = port.map_or(0, super::Port::change_count);
                    ana_log_page(chgcnt, &s.ana_groups(port), g.lsp & ANA_LSP_RGO != 0)
                }
                Some(LogPageId::ChangedNamespaceList) if !s.discovery => {
                    let mut v = vec![0u8; 4096];
                    write_changed_ns_list(&ctrl.take_changed_ns(), &mut v);
                    v
                }
                _ => return done(Status::INVALID_LOG_PAGE),
            };
            let Some(len) = log_page_transfer_len(g.len_bytes(), sqe.sgl1().length) else {
                return done(Status::INVALID_FIELD);
            };
            let off = g.offset as usize;
            if off > page.len() || !off.is_multiple_of(4) {
                return done(Status::INVALID_FIELD);
            }
            let mut out = vec![0u8; len];
            let n = (page.len() - off).min(len);
            out[..n].copy_from_slice(&page[off..off + n]);
            with_data(out)
        }
        AdminOpcode::SetFeatures => {
            let fid = (sqe.cdw10() & 0xff) as u8;
            let v = sqe.cdw11();
            match FeatureId::from_u8(fid) {
                Some(FeatureId::NumberOfQueues) if !s.discovery => {
                    let req = NumberOfQueues::from_dword(v);
                    if !req.is_valid_request() {
                        return done(Status::INVALID_FIELD);
                    }
                    let n = (req.nsq.max(req.ncq) + 1).min(MAX_IO_QUEUES);
                    ctrl.io_queues.store(n, Ordering::Release);
                    with_dw0(NumberOfQueues::both(n).to_dword())
                }
                Some(FeatureId::AsyncEventConfig) => {
                    ctrl.aen_config.store(v, Ordering::Release);
                    done(Status::SUCCESS)
                }
                Some(FeatureId::KeepAliveTimer) => {
                    ctrl.kato_ms.store(v, Ordering::Release);
                    done(Status::SUCCESS)
                }
                Some(FeatureId::VolatileWriteCache) if !s.discovery => {
                    ctrl.vwc_enabled.store(v & 1 != 0, Ordering::Release);
                    done(Status::SUCCESS)
                }
                Some(FeatureId::HostIdentifier) => done(Status::COMMAND_SEQUENCE_ERROR),
                _ => done(Status::INVALID_FIELD),
            }
        }
        AdminOpcode::GetFeatures => {
            let fid = (sqe.cdw10() & 0xff) as u8;
            match FeatureId::from_u8(fid) {
                Some(FeatureId::NumberOfQueues) if !s.discovery => with_dw0(
                    NumberOfQueues::both(ctrl.io_queues.load(Ordering::Acquire)).to_dword(),
                ),
                Some(FeatureId::AsyncEventConfig) => {
                    with_dw0(ctrl.aen_config.load(Ordering::Acquire))
                }
                Some(FeatureId::KeepAliveTimer) => with_dw0(ctrl.kato_ms.load(Ordering::Acquire)),
                Some(FeatureId::VolatileWriteCache) if !s.discovery => {
                    with_dw0(u32::from(ctrl.vwc_enabled.load(Ordering::Acquire)))
                }
                Some(FeatureId::HostIdentifier) => {
                    let mut v = vec![0u8; 16];
                    v.copy_from_slice(&ctrl.hostid);
                    with_data(v)
                }
                _ => done(Status::INVALID_FIELD),
            }
        }
        AdminOpcode::AsyncEventRequest => AdminOutcome::Aer,
        // Abort: the command may have completed already; report "not aborted" (DW0 bit 0).
        AdminOpcode::Abort => with_dw0(1),
        _ => done(Status::INVALID_OPCODE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_page_length_is_capped_before_allocation() {
        // NUMD 0 on the wire is 2^32 dwords: 16 GiB, far beyond MDTS.
        assert_eq!(log_page_transfer_len(1 << 34, u32::MAX), None);
        assert_eq!(
            log_page_transfer_len(MAX_TRANSFER as u64 + 4, u32::MAX),
            None
        );
        assert_eq!(
            log_page_transfer_len(MAX_TRANSFER as u64, u32::MAX),
            Some(MAX_TRANSFER)
        );
        // The host's buffer bounds the transfer.
        assert_eq!(log_page_transfer_len(4096, 512), Some(512));
        assert_eq!(log_page_transfer_len(512, 4096), Some(512));
        assert_eq!(log_page_transfer_len(512, 0), Some(0));
    }
}
