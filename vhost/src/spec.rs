//! virtio constants this crate speaks (virtio 1.2), in one place: feature bits, the split
//! virtqueue's flags and limits, and the virtio-blk request types and status bytes. The
//! vhost-user protocol's own constants (message codes, protocol features) live in
//! [`crate::protocol`].

/// virtio feature bits (virtio 1.2 §5.2.3 for the `BLK_*` bits, §6 for the reserved ones).
#[allow(missing_docs)]
pub mod vf {
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    pub const BLK_RO: u64 = 1 << 5;
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    pub const BLK_FLUSH: u64 = 1 << 9;
    pub const BLK_TOPOLOGY: u64 = 1 << 10;
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    pub const BLK_MQ: u64 = 1 << 12;
    pub const BLK_DISCARD: u64 = 1 << 13;
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// `VIRTQ_DESC_F_NEXT` (virtio 1.2 §2.7.5).
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: device-writable (virtio 1.2 §2.7.5).
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT` (virtio 1.2 §2.7.5.3).
pub const DESC_F_INDIRECT: u16 = 4;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT` (virtio 1.2 §2.7.6).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest queue size (virtio 1.2 §2.7: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// `VIRTIO_BLK_T_IN` (virtio 1.2 §5.2.6).
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;
/// `VIRTIO_BLK_S_OK` (virtio 1.2 §5.2.6).
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` (virtio 1.2 §5.2.6).
pub const WZ_FLAG_UNMAP: u32 = 1;
/// Length of the `VIRTIO_BLK_T_GET_ID` answer (`VIRTIO_BLK_ID_BYTES`, virtio 1.2 §5.2.6).
pub const ID_BYTES: usize = 20;
