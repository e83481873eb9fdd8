//! Features (NVMe Base 2.0 §5.27.1 "Feature Values"; Set Features §5.27, Get Features §5.15).
//!
//! Set/Get Features carry the Feature Identifier in CDW10 bits 7:0 (plus SV bit 31 for Set,
//! SEL bits 10:8 for Get) and the value in CDW11 (and more dwords for some features). The
//! controller returns the current value of most features in completion DW0.

use super::command::{AdminOpcode, Sqe};

/// Feature Identifiers (NVMe Base 2.0 Figure 317).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FeatureId {
    /// 01h Arbitration.
    Arbitration = 0x01,
    /// 02h Power Management.
    PowerManagement = 0x02,
    /// 04h Temperature Threshold.
    TemperatureThreshold = 0x04,
    /// 05h Error Recovery.
    ErrorRecovery = 0x05,
    /// 06h Volatile Write Cache.
    VolatileWriteCache = 0x06,
    /// 07h Number of Queues.
    NumberOfQueues = 0x07,
    /// 08h Interrupt Coalescing (not used over fabrics).
    InterruptCoalescing = 0x08,
    /// 09h Interrupt Vector Configuration (not used over fabrics).
    InterruptVectorConfig = 0x09,
    /// 0Ah Write Atomicity Normal.
    WriteAtomicityNormal = 0x0a,
    /// 0Bh Asynchronous Event Configuration.
    AsyncEventConfig = 0x0b,
    /// 0Fh Keep Alive Timer.
    KeepAliveTimer = 0x0f,
    /// 10h Host Controlled Thermal Management.
    HostThermalManagement = 0x10,
    /// 80h Software Progress Marker.
    SoftwareProgressMarker = 0x80,
    /// 81h Host Identifier.
    HostIdentifier = 0x81,
    /// 82h Reservation Notification Mask.
    ReservationNotificationMask = 0x82,
    /// 83h Reservation Persistence.
    ReservationPersistence = 0x83,
}

impl FeatureId {
    /// The feature of a raw FID, or `None` for one this crate does not name.
    pub const fn from_u8(v: u8) -> Option<FeatureId> {
        use FeatureId::*;
        Some(match v {
            0x01 => Arbitration,
            0x02 => PowerManagement,
            0x04 => TemperatureThreshold,
            0x05 => ErrorRecovery,
            0x06 => VolatileWriteCache,
            0x07 => NumberOfQueues,
            0x08 => InterruptCoalescing,
            0x09 => InterruptVectorConfig,
            0x0a => WriteAtomicityNormal,
            0x0b => AsyncEventConfig,
            0x0f => KeepAliveTimer,
            0x10 => HostThermalManagement,
            0x80 => SoftwareProgressMarker,
            0x81 => HostIdentifier,
            0x82 => ReservationNotificationMask,
            0x83 => ReservationPersistence,
            _ => return None,
        })
    }
}

/// Select values of Get Features (SEL, CDW10 bits 10:8).
pub mod select {
    /// 000b Current.
    pub const CURRENT: u8 = 0;
    /// 001b Default.
    pub const DEFAULT: u8 = 1;
    /// 010b Saved.
    pub const SAVED: u8 = 2;
    /// 011b Supported capabilities.
    pub const SUPPORTED_CAPABILITIES: u8 = 3;
}

/// Set Features (admin 09h): CDW10 FID 7:0, SV 31; the value in CDW11 onwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetFeatures {
    /// Feature Identifier.
    pub fid: u8,
    /// Save: persist across power cycles (target features are not saveable).
    pub sv: bool,
    /// Namespace identifier, for namespace-specific features.
    pub nsid: u32,
    /// CDW11, the value of most features.
    pub cdw11: u32,
    /// CDW12.
    pub cdw12: u32,
}

impl SetFeatures {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> SetFeatures {
        let c10 = s.cdw10();
        SetFeatures {
            fid: c10 as u8,
            sv: c10 & (1 << 31) != 0,
            nsid: s.nsid(),
            cdw11: s.cdw11(),
            cdw12: s.cdw12(),
        }
    }

    /// Encodes into a command with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(AdminOpcode::SetFeatures as u8, cid);
        s.set_nsid(self.nsid);
        s.set_cdw(10, u32::from(self.fid) | u32::from(self.sv) << 31);
        s.set_cdw(11, self.cdw11);
        s.set_cdw(12, self.cdw12);
        s
    }
}

/// Get Features (admin 0Ah): CDW10 FID 7:0, SEL 10:8; CDW11 feature specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GetFeatures {
    /// Feature Identifier.
    pub fid: u8,
    /// Select ([`select`]).
    pub sel: u8,
    /// Namespace identifier.
    pub nsid: u32,
    /// CDW11.
    pub cdw11: u32,
}

impl GetFeatures {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> GetFeatures {
        let c10 = s.cdw10();
        GetFeatures {
            fid: c10 as u8,
            sel: ((c10 >> 8) & 7) as u8,
            nsid: s.nsid(),
            cdw11: s.cdw11(),
        }
    }

    /// Encodes into a command with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(AdminOpcode::GetFeatures as u8, cid);
        s.set_nsid(self.nsid);
        s.set_cdw(10, u32::from(self.fid) | u32::from(self.sel & 7) << 8);
        s.set_cdw(11, self.cdw11);
        s
    }
}

/// Number of Queues (FID 07h, NVMe Base 2.0 Figure 324): CDW11 NSQR 15:0 and NCQR 31:16, both
/// 0's based; completion DW0 NSQA/NCQA in the same layout. FFFFh is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NumberOfQueues {
    /// I/O submission queues, 0's based.
    pub nsq: u16,
    /// I/O completion queues, 0's based.
    pub ncq: u16,
}

impl NumberOfQueues {
    /// Decodes CDW11 (requested) or DW0 (allocated).
    pub const fn from_dword(v: u32) -> NumberOfQueues {
        NumberOfQueues {
            nsq: v as u16,
            ncq: (v >> 16) as u16,
        }
    }

    /// The dword value.
    pub const fn to_dword(&self) -> u32 {
        self.nsq as u32 | (self.ncq as u32) << 16
    }

    /// `n` (at least 1) I/O submission and `n` I/O completion queues, as the target grants them.
    pub const fn both(n: u16) -> NumberOfQueues {
        NumberOfQueues {
            nsq: n - 1,
            ncq: n - 1,
        }
    }

    /// Whether a request is valid (neither count is FFFFh, i.e. 65536 queues).
    pub const fn is_valid_request(&self) -> bool {
        self.nsq != 0xffff && self.ncq != 0xffff
    }
}

/// Volatile Write Cache (FID 06h): CDW11 bit 0 WCE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VolatileWriteCache {
    /// Volatile Write Cache Enable.
    pub wce: bool,
}

impl VolatileWriteCache {
    /// Decodes CDW11.
    pub const fn from_dword(v: u32) -> VolatileWriteCache {
        VolatileWriteCache { wce: v & 1 != 0 }
    }

    /// The dword value.
    pub const fn to_dword(&self) -> u32 {
        self.wce as u32
    }
}

/// Keep Alive Timer (FID 0Fh): CDW11 KATO in milliseconds (the controller may round up to its
/// granularity, Identify Controller KAS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KeepAliveTimer {
    /// Keep Alive Timeout in milliseconds (0: disabled).
    pub kato_ms: u32,
}

impl KeepAliveTimer {
    /// Decodes CDW11.
    pub const fn from_dword(v: u32) -> KeepAliveTimer {
        KeepAliveTimer { kato_ms: v }
    }

    /// The dword value.
    pub const fn to_dword(&self) -> u32 {
        self.kato_ms
    }
}

/// Asynchronous Event Configuration (FID 0Bh, NVMe Base 2.0 Figure 329; bit 31 from NVMe-oF
/// 1.1): which events the controller reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AsyncEventConfig(pub u32);

impl AsyncEventConfig {
    /// Bits 7:0: SMART / Health critical warnings.
    pub const SMART_CRITICAL_WARNINGS: u32 = 0xff;
    /// Bit 8: Namespace Attribute Notices.
    pub const NAMESPACE_ATTRIBUTE_NOTICES: u32 = 1 << 8;
    /// Bit 9: Firmware Activation Notices.
    pub const FIRMWARE_ACTIVATION_NOTICES: u32 = 1 << 9;
    /// Bit 11: Asymmetric Namespace Access Change Notices.
    pub const ANA_CHANGE_NOTICES: u32 = 1 << 11;
    /// Bit 31: Discovery Log Page Change Notification.
    pub const DISCOVERY_LOG_CHANGE_NOTICES: u32 = 1 << 31;

    /// Whether every bit of `mask` is enabled.
    pub const fn enabled(&self, mask: u32) -> bool {
        self.0 & mask == mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_features_number_of_queues_round_trip() {
        let nq = NumberOfQueues { nsq: 7, ncq: 7 };
        let sf = SetFeatures {
            fid: FeatureId::NumberOfQueues as u8,
            sv: false,
            nsid: 0,
            cdw11: nq.to_dword(),
            cdw12: 0,
        };
        let s = sf.to_sqe(3);
        assert_eq!(s.opc(), 0x09);
        assert_eq!(s.cdw10(), 0x07);
        assert_eq!(s.cdw11(), 0x0007_0007);
        let back = SetFeatures::from_sqe(&s);
        assert_eq!(back, sf);
        assert_eq!(NumberOfQueues::from_dword(back.cdw11), nq);
        assert!(nq.is_valid_request());
        assert!(!NumberOfQueues::from_dword(0x0000_ffff).is_valid_request());
        // Eight queues of each kind are 7 and 7, 0's based.
        assert_eq!(NumberOfQueues::both(8).to_dword(), 0x0007_0007);
    }

    #[test]
    fn save_bit_and_select_field() {
        let mut s = SetFeatures {
            fid: FeatureId::KeepAliveTimer as u8,
            sv: true,
            cdw11: 5000,
            ..SetFeatures::default()
        }
        .to_sqe(1);
        assert_eq!(s.cdw10(), 0x8000_000f);
        assert_eq!(KeepAliveTimer::from_dword(s.cdw11()).kato_ms, 5000);
        s.set_cdw(10, 0x0000_0306);
        let g = GetFeatures::from_sqe(&s);
        assert_eq!(g.fid, FeatureId::VolatileWriteCache as u8);
        assert_eq!(g.sel, select::SUPPORTED_CAPABILITIES);
        assert_eq!(GetFeatures::from_sqe(&g.to_sqe(1)), g);
        assert!(VolatileWriteCache::from_dword(1).wce);
        assert!(
            AsyncEventConfig(0x8000_0100).enabled(AsyncEventConfig::DISCOVERY_LOG_CHANGE_NOTICES)
        );
        assert!(!AsyncEventConfig(0x100).enabled(AsyncEventConfig::ANA_CHANGE_NOTICES));
        assert_eq!(FeatureId::from_u8(0x0b), Some(FeatureId::AsyncEventConfig));
        assert_eq!(FeatureId::from_u8(0x03), None);
    }
}
