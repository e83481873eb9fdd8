//! Completion status (NVMe Base 2.0 §4.2.3 "Status Field Definition", Figures 92–105).
//!
//! A [`Status`] is the Status Code Type (SCT) and Status Code (SC) of a completion plus its
//! More (M), Do Not Retry (DNR) and Command Retry Delay (CRD) bits. [`Status::to_cqe_status`]
//! packs it into the upper 15 bits of CQE DW3 with the phase tag in bit 0. Named statuses are
//! associated constants; the raw codes live in [`generic`], [`command_specific`], [`media`] and
//! [`path`]. [`to_nvme_status`] is the one place a bdev [`IoStatus`] becomes a wire status.

use std::fmt;

use ferroblk_bdev::{IoStatus, IoType};

/// Status Code Type (SCT, CQE DW3 bits 27:25; NVMe Base 2.0 Figure 93).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StatusCodeType {
    /// 0h: Generic Command Status.
    Generic = 0,
    /// 1h: Command Specific Status.
    CommandSpecific = 1,
    /// 2h: Media and Data Integrity Errors.
    MediaError = 2,
    /// 3h: Path Related Status.
    Path = 3,
    /// 4h–6h: reserved values, kept so any received status round-trips.
    Reserved4 = 4,
    /// 5h: reserved.
    Reserved5 = 5,
    /// 6h: reserved.
    Reserved6 = 6,
    /// 7h: Vendor Specific.
    VendorSpecific = 7,
}

impl StatusCodeType {
    /// The SCT of a 3-bit field value (upper bits ignored).
    pub const fn from_bits(v: u8) -> StatusCodeType {
        match v & 7 {
            0 => StatusCodeType::Generic,
            1 => StatusCodeType::CommandSpecific,
            2 => StatusCodeType::MediaError,
            3 => StatusCodeType::Path,
            4 => StatusCodeType::Reserved4,
            5 => StatusCodeType::Reserved5,
            6 => StatusCodeType::Reserved6,
            _ => StatusCodeType::VendorSpecific,
        }
    }
}

/// Generic Command Status codes (SCT 0h; NVMe Base 2.0 Figure 94).
pub mod generic {
    /// 00h Successful Completion.
    pub const SUCCESS: u8 = 0x00;
    /// 01h Invalid Command Opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// 02h Invalid Field in Command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// 03h Command ID Conflict.
    pub const COMMAND_ID_CONFLICT: u8 = 0x03;
    /// 04h Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// 05h Commands Aborted due to Power Loss Notification.
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    /// 06h Internal Error.
    pub const INTERNAL_ERROR: u8 = 0x06;
    /// 07h Command Abort Requested.
    pub const ABORT_REQUESTED: u8 = 0x07;
    /// 08h Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    /// 09h Command Aborted due to Failed Fused Command.
    pub const ABORTED_FAILED_FUSED: u8 = 0x09;
    /// 0Ah Command Aborted due to Missing Fused Command.
    pub const ABORTED_MISSING_FUSED: u8 = 0x0a;
    /// 0Bh Invalid Namespace or Format.
    pub const INVALID_NAMESPACE_OR_FORMAT: u8 = 0x0b;
    /// 0Ch Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0c;
    /// 0Dh Invalid SGL Segment Descriptor.
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: u8 = 0x0d;
    /// 0Eh Invalid Number of SGL Descriptors.
    pub const INVALID_NUMBER_OF_SGL_DESCRIPTORS: u8 = 0x0e;
    /// 0Fh Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0f;
    /// 10h Metadata SGL Length Invalid.
    pub const METADATA_SGL_LENGTH_INVALID: u8 = 0x10;
    /// 11h SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    /// 15h Operation Denied.
    pub const OPERATION_DENIED: u8 = 0x15;
    /// 16h SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: u8 = 0x16;
    /// 18h Host Identifier Inconsistent Format.
    pub const HOST_IDENTIFIER_INCONSISTENT_FORMAT: u8 = 0x18;
    /// 19h Keep Alive Timer Expired.
    pub const KEEP_ALIVE_TIMER_EXPIRED: u8 = 0x19;
    /// 1Ah Keep Alive Timeout Invalid.
    pub const KEEP_ALIVE_TIMEOUT_INVALID: u8 = 0x1a;
    /// 20h Namespace is Write Protected.
    pub const NAMESPACE_WRITE_PROTECTED: u8 = 0x20;
    /// 21h Command Interrupted.
    pub const COMMAND_INTERRUPTED: u8 = 0x21;
    /// 22h Transient Transport Error.
    pub const TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    /// 80h LBA Out of Range (NVM command set).
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// 81h Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    /// 82h Namespace Not Ready.
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
    /// 83h Reservation Conflict.
    pub const RESERVATION_CONFLICT: u8 = 0x83;
    /// 84h Format In Progress.
    pub const FORMAT_IN_PROGRESS: u8 = 0x84;
}

/// Command Specific Status codes (SCT 1h; NVMe Base 2.0 Figure 95, NVMe-oF 1.1 Figure 24 for
/// the Fabrics commands). The same value means different things for different commands (80h is
/// Connect Incompatible Format for Connect and Conflicting Attributes for Dataset Management).
pub mod command_specific {
    /// 00h Completion Queue Invalid.
    pub const COMPLETION_QUEUE_INVALID: u8 = 0x00;
    /// 01h Invalid Queue Identifier.
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    /// 02h Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    /// 03h Abort Command Limit Exceeded.
    pub const ABORT_COMMAND_LIMIT_EXCEEDED: u8 = 0x03;
    /// 05h Asynchronous Event Request Limit Exceeded.
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: u8 = 0x05;
    /// 09h Invalid Log Page.
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    /// 0Ah Invalid Format.
    pub const INVALID_FORMAT: u8 = 0x0a;
    /// 0Dh Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: u8 = 0x0d;
    /// 0Eh Feature Not Changeable.
    pub const FEATURE_NOT_CHANGEABLE: u8 = 0x0e;
    /// 0Fh Feature Not Namespace Specific.
    pub const FEATURE_NOT_NAMESPACE_SPECIFIC: u8 = 0x0f;
    /// 80h Conflicting Attributes (Dataset Management, Read, Write).
    pub const CONFLICTING_ATTRIBUTES: u8 = 0x80;
    /// 81h Invalid Protection Information.
    pub const INVALID_PROTECTION_INFORMATION: u8 = 0x81;
    /// 82h Attempted Write to Read Only Range.
    pub const WRITE_TO_READ_ONLY_RANGE: u8 = 0x82;
    /// 80h Connect Incompatible Format (Connect RECFMT not supported).
    pub const CONNECT_INCOMPATIBLE_FORMAT: u8 = 0x80;
    /// 81h Connect Controller Busy.
    pub const CONNECT_CONTROLLER_BUSY: u8 = 0x81;
    /// 82h Connect Invalid Parameters (the response's IATTR/IPO locate the parameter).
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    /// 83h Connect Restart Discovery.
    pub const CONNECT_RESTART_DISCOVERY: u8 = 0x83;
    /// 84h Connect Invalid Host (the host is not allowed to access the subsystem).
    pub const CONNECT_INVALID_HOST: u8 = 0x84;
    /// 85h Invalid Queue Type.
    pub const INVALID_QUEUE_TYPE: u8 = 0x85;
    /// 90h Discover Restart (the discovery log changed during a multi-part read).
    pub const DISCOVER_RESTART: u8 = 0x90;
    /// 91h Authentication Required.
    pub const AUTHENTICATION_REQUIRED: u8 = 0x91;
}

/// Media and Data Integrity Errors (SCT 2h; NVMe Base 2.0 Figure 101).
pub mod media {
    /// 80h Write Fault.
    pub const WRITE_FAULT: u8 = 0x80;
    /// 81h Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    /// 82h End-to-end Guard Check Error.
    pub const END_TO_END_GUARD_CHECK_ERROR: u8 = 0x82;
    /// 83h End-to-end Application Tag Check Error.
    pub const END_TO_END_APPLICATION_TAG_CHECK_ERROR: u8 = 0x83;
    /// 84h End-to-end Reference Tag Check Error.
    pub const END_TO_END_REFERENCE_TAG_CHECK_ERROR: u8 = 0x84;
    /// 85h Compare Failure.
    pub const COMPARE_FAILURE: u8 = 0x85;
    /// 86h Access Denied.
    pub const ACCESS_DENIED: u8 = 0x86;
    /// 87h Deallocated or Unwritten Logical Block.
    pub const DEALLOCATED_OR_UNWRITTEN_BLOCK: u8 = 0x87;
}

/// Path Related Status (SCT 3h; NVMe Base 2.0 Figure 102).
pub mod path {
    /// 00h Internal Path Error.
    pub const INTERNAL_PATH_ERROR: u8 = 0x00;
    /// 01h Asymmetric Access Persistent Loss.
    pub const ANA_PERSISTENT_LOSS: u8 = 0x01;
    /// 02h Asymmetric Access Inaccessible.
    pub const ANA_INACCESSIBLE: u8 = 0x02;
    /// 03h Asymmetric Access Transition.
    pub const ANA_TRANSITION: u8 = 0x03;
    /// 60h Controller Pathing Error.
    pub const CONTROLLER_PATHING_ERROR: u8 = 0x60;
    /// 70h Host Pathing Error.
    pub const HOST_PATHING_ERROR: u8 = 0x70;
    /// 71h Command Aborted By Host.
    pub const ABORTED_BY_HOST: u8 = 0x71;
}

/// The status of a completion, without its phase tag.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status Code Type.
    pub sct: StatusCodeType,
    /// Status Code, interpreted per `sct`.
    pub sc: u8,
    /// Command Retry Delay (CRD, 2 bits): which of the controller's CRDT values to wait.
    pub crd: u8,
    /// More (M): more status is in the Error Information log page.
    pub more: bool,
    /// Do Not Retry (DNR): the same command is expected to fail again.
    pub dnr: bool,
}

impl Status {
    /// A status of type `sct` and code `sc`, without DNR/More/CRD.
    pub const fn new(sct: StatusCodeType, sc: u8) -> Status {
        Status {
            sct,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    /// A Generic Command Status.
    pub const fn generic(sc: u8) -> Status {
        Status::new(StatusCodeType::Generic, sc)
    }

    /// A Command Specific Status.
    pub const fn command_specific(sc: u8) -> Status {
        Status::new(StatusCodeType::CommandSpecific, sc)
    }

    /// A Media and Data Integrity Error.
    pub const fn media(sc: u8) -> Status {
        Status::new(StatusCodeType::MediaError, sc)
    }

    /// A Path Related Status.
    pub const fn path(sc: u8) -> Status {
        Status::new(StatusCodeType::Path, sc)
    }

    /// Successful Completion.
    pub const SUCCESS: Status = Status::generic(generic::SUCCESS);
    /// Invalid Command Opcode, do not retry.
    pub const INVALID_OPCODE: Status = Status::generic(generic::INVALID_OPCODE).with_dnr();
    /// Invalid Field in Command, do not retry.
    pub const INVALID_FIELD: Status = Status::generic(generic::INVALID_FIELD).with_dnr();
    /// Command ID Conflict, do not retry.
    pub const COMMAND_ID_CONFLICT: Status =
        Status::generic(generic::COMMAND_ID_CONFLICT).with_dnr();
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(generic::DATA_TRANSFER_ERROR);
    /// Internal Error.
    pub const INTERNAL_ERROR: Status = Status::generic(generic::INTERNAL_ERROR);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status::generic(generic::ABORT_REQUESTED);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::generic(generic::ABORTED_SQ_DELETION);
    /// Invalid Namespace or Format, do not retry.
    pub const INVALID_NAMESPACE: Status =
        Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT).with_dnr();
    /// Command Sequence Error, do not retry.
    pub const COMMAND_SEQUENCE_ERROR: Status =
        Status::generic(generic::COMMAND_SEQUENCE_ERROR).with_dnr();
    /// Data SGL Length Invalid, do not retry.
    pub const DATA_SGL_LENGTH_INVALID: Status =
        Status::generic(generic::DATA_SGL_LENGTH_INVALID).with_dnr();
    /// SGL Descriptor Type Invalid, do not retry.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status =
        Status::generic(generic::SGL_DESCRIPTOR_TYPE_INVALID).with_dnr();
    /// SGL Offset Invalid, do not retry.
    pub const SGL_OFFSET_INVALID: Status = Status::generic(generic::SGL_OFFSET_INVALID).with_dnr();
    /// Keep Alive Timeout Invalid, do not retry.
    pub const KEEP_ALIVE_TIMEOUT_INVALID: Status =
        Status::generic(generic::KEEP_ALIVE_TIMEOUT_INVALID).with_dnr();
    /// Namespace is Write Protected, do not retry.
    pub const NAMESPACE_WRITE_PROTECTED: Status =
        Status::generic(generic::NAMESPACE_WRITE_PROTECTED).with_dnr();
    /// Transient Transport Error (a data digest error, for example): retry may succeed.
    pub const TRANSIENT_TRANSPORT_ERROR: Status =
        Status::generic(generic::TRANSIENT_TRANSPORT_ERROR);
    /// LBA Out of Range, do not retry.
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(generic::LBA_OUT_OF_RANGE).with_dnr();
    /// Capacity Exceeded, do not retry.
    pub const CAPACITY_EXCEEDED: Status = Status::generic(generic::CAPACITY_EXCEEDED).with_dnr();
    /// Namespace Not Ready (retry may succeed).
    pub const NAMESPACE_NOT_READY: Status = Status::generic(generic::NAMESPACE_NOT_READY);
    /// Invalid Log Page, do not retry.
    pub const INVALID_LOG_PAGE: Status =
        Status::command_specific(command_specific::INVALID_LOG_PAGE).with_dnr();
    /// Invalid Queue Identifier, do not retry.
    pub const INVALID_QUEUE_IDENTIFIER: Status =
        Status::command_specific(command_specific::INVALID_QUEUE_IDENTIFIER).with_dnr();
    /// Invalid Queue Size, do not retry.
    pub const INVALID_QUEUE_SIZE: Status =
        Status::command_specific(command_specific::INVALID_QUEUE_SIZE).with_dnr();
    /// Asynchronous Event Request Limit Exceeded, do not retry.
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: Status =
        Status::command_specific(command_specific::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED).with_dnr();
    /// Feature Identifier Not Saveable, do not retry.
    pub const FEATURE_NOT_SAVEABLE: Status =
        Status::command_specific(command_specific::FEATURE_NOT_SAVEABLE).with_dnr();
    /// Feature Not Changeable, do not retry.
    pub const FEATURE_NOT_CHANGEABLE: Status =
        Status::command_specific(command_specific::FEATURE_NOT_CHANGEABLE).with_dnr();
    /// Connect Incompatible Format, do not retry.
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status =
        Status::command_specific(command_specific::CONNECT_INCOMPATIBLE_FORMAT).with_dnr();
    /// Connect Controller Busy.
    pub const CONNECT_CONTROLLER_BUSY: Status =
        Status::command_specific(command_specific::CONNECT_CONTROLLER_BUSY);
    /// Connect Invalid Parameters, do not retry.
    pub const CONNECT_INVALID_PARAMETERS: Status =
        Status::command_specific(command_specific::CONNECT_INVALID_PARAMETERS).with_dnr();
    /// Connect Invalid Host, do not retry.
    pub const CONNECT_INVALID_HOST: Status =
        Status::command_specific(command_specific::CONNECT_INVALID_HOST).with_dnr();
    /// Write Fault.
    pub const WRITE_FAULT: Status = Status::media(media::WRITE_FAULT);
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(media::UNRECOVERED_READ_ERROR);
    /// End-to-end Guard Check Error, do not retry.
    pub const END_TO_END_GUARD_CHECK_ERROR: Status =
        Status::media(media::END_TO_END_GUARD_CHECK_ERROR).with_dnr();
    /// Compare Failure, do not retry.
    pub const COMPARE_FAILURE: Status = Status::media(media::COMPARE_FAILURE).with_dnr();

    /// This status with Do Not Retry set.
    pub const fn with_dnr(self) -> Status {
        Status { dnr: true, ..self }
    }

    /// This status with More set (details in the Error Information log).
    pub const fn with_more(self) -> Status {
        Status { more: true, ..self }
    }

    /// Whether this is Successful Completion.
    pub const fn is_success(self) -> bool {
        matches!(self.sct, StatusCodeType::Generic) && self.sc == generic::SUCCESS
    }

    /// The 16-bit Status Field of CQE DW3 bits 31:16 (NVMe Base 2.0 Figure 92): phase tag in
    /// bit 0, SC in 8:1, SCT in 11:9, CRD in 13:12, M in 14, DNR in 15. Fabrics do not use the
    /// phase tag (NVMe-oF 1.1 §2.2: it is reserved), so a target passes `false`.
    pub const fn to_cqe_status(self, phase: bool) -> u16 {
        (phase as u16)
            | (self.sc as u16) << 1
            | ((self.sct as u16) & 7) << 9
            | ((self.crd as u16) & 3) << 12
            | (self.more as u16) << 14
            | (self.dnr as u16) << 15
    }

    /// Splits a Status Field into the status and the phase tag.
    pub const fn from_cqe_status(v: u16) -> (Status, bool) {
        (
            Status {
                sct: StatusCodeType::from_bits((v >> 9) as u8),
                sc: (v >> 1) as u8,
                crd: ((v >> 12) & 3) as u8,
                more: v & (1 << 14) != 0,
                dnr: v & (1 << 15) != 0,
            },
            v & 1 != 0,
        )
    }
}

impl Default for Status {
    fn default() -> Status {
        Status::SUCCESS
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status(sct={:?}, sc={:#04x}", self.sct, self.sc)?;
        if self.dnr {
            f.write_str(", dnr")?;
        }
        if self.more {
            f.write_str(", more")?;
        }
        if self.crd != 0 {
            write!(f, ", crd={}", self.crd)?;
        }
        f.write_str(")")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The wire status of a bdev completion for a command of type `io_type` (STYLE: errors map to
/// the wire in one place). A media error is a Write Fault for commands that modify the medium
/// and an Unrecovered Read Error otherwise.
pub fn to_nvme_status(status: IoStatus, io_type: IoType) -> Status {
    match status {
        IoStatus::Success => Status::SUCCESS,
        IoStatus::InvalidRange => Status::LBA_OUT_OF_RANGE,
        IoStatus::InvalidRequest => Status::INVALID_FIELD,
        IoStatus::Unsupported => Status::INVALID_OPCODE,
        IoStatus::MediaError if io_type.is_write() => Status::WRITE_FAULT,
        IoStatus::MediaError => Status::UNRECOVERED_READ_ERROR,
        IoStatus::IntegrityError => Status::END_TO_END_GUARD_CHECK_ERROR,
        IoStatus::ReadOnly => Status::NAMESPACE_WRITE_PROTECTED,
        IoStatus::NoSpace => Status::CAPACITY_EXCEEDED,
        IoStatus::Aborted => Status::ABORT_REQUESTED,
    }
}

/// The bdev status of a remote controller's completion (the `nvmf` bdev's view of the wire,
/// the inverse of [`to_nvme_status`] where one exists): range and field errors keep their
/// meaning, media and integrity errors theirs, aborts are [`IoStatus::Aborted`]; anything
/// else a remote can answer is a [`IoStatus::MediaError`] (the request failed, not the caller).
pub fn from_nvme_status(status: Status) -> IoStatus {
    use StatusCodeType as T;
    match (status.sct, status.sc) {
        (T::Generic, generic::SUCCESS) => IoStatus::Success,
        (T::Generic, generic::LBA_OUT_OF_RANGE) => IoStatus::InvalidRange,
        (T::Generic, generic::INVALID_FIELD | generic::DATA_SGL_LENGTH_INVALID) => {
            IoStatus::InvalidRequest
        }
        (T::Generic, generic::INVALID_OPCODE) => IoStatus::Unsupported,
        (T::Generic, generic::NAMESPACE_WRITE_PROTECTED) => IoStatus::ReadOnly,
        (T::Generic, generic::CAPACITY_EXCEEDED) => IoStatus::NoSpace,
        (
            T::Generic,
            generic::ABORT_REQUESTED | generic::ABORTED_SQ_DELETION | generic::ABORTED_POWER_LOSS,
        ) => IoStatus::Aborted,
        (
            T::MediaError,
            media::END_TO_END_GUARD_CHECK_ERROR
            | media::END_TO_END_APPLICATION_TAG_CHECK_ERROR
            | media::END_TO_END_REFERENCE_TAG_CHECK_ERROR,
        ) => IoStatus::IntegrityError,
        _ => IoStatus::MediaError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_statuses_map_back_to_bdev_statuses() {
        for s in IoStatus::ALL {
            for t in [IoType::Read, IoType::Write] {
                assert_eq!(from_nvme_status(to_nvme_status(s, t)), s, "{s:?} {t:?}");
            }
        }
        assert_eq!(
            from_nvme_status(Status::path(path::HOST_PATHING_ERROR)),
            IoStatus::MediaError
        );
    }

    #[test]
    fn status_field_bit_layout() {
        assert_eq!(Status::SUCCESS.to_cqe_status(false), 0);
        assert_eq!(Status::SUCCESS.to_cqe_status(true), 1);
        // Invalid Field (02h) with DNR: SC in bits 8:1, DNR in bit 15.
        assert_eq!(Status::INVALID_FIELD.to_cqe_status(false), 0x8004);
        // Connect Invalid Host: SCT 1 in bits 11:9, SC 84h.
        assert_eq!(
            Status::CONNECT_INVALID_HOST.to_cqe_status(false),
            0x8000 | 1 << 9 | 0x84 << 1
        );
        // Unrecovered Read Error: SCT 2, SC 81h, no DNR, with More.
        assert_eq!(
            Status::UNRECOVERED_READ_ERROR
                .with_more()
                .to_cqe_status(true),
            1 | 0x81 << 1 | 2 << 9 | 1 << 14
        );
        let crd = Status {
            crd: 2,
            ..Status::NAMESPACE_NOT_READY
        };
        assert_eq!(crd.to_cqe_status(false), 0x82 << 1 | 2 << 12);
    }

    #[test]
    fn status_field_round_trips_every_value() {
        for v in 0..=u16::MAX {
            let (s, p) = Status::from_cqe_status(v);
            assert_eq!(s.to_cqe_status(p), v);
        }
    }

    #[test]
    fn bdev_statuses_map_to_nvme() {
        assert!(to_nvme_status(IoStatus::Success, IoType::Read).is_success());
        assert_eq!(
            to_nvme_status(IoStatus::MediaError, IoType::Write),
            Status::WRITE_FAULT
        );
        assert_eq!(
            to_nvme_status(IoStatus::MediaError, IoType::Read),
            Status::UNRECOVERED_READ_ERROR
        );
        assert_eq!(
            to_nvme_status(IoStatus::InvalidRange, IoType::Read),
            Status::LBA_OUT_OF_RANGE
        );
        assert_eq!(
            to_nvme_status(IoStatus::IntegrityError, IoType::Read).sct,
            StatusCodeType::MediaError
        );
        assert!(to_nvme_status(IoStatus::ReadOnly, IoType::Write).dnr);
        assert!(!to_nvme_status(IoStatus::Aborted, IoType::Write).dnr);
    }
}
