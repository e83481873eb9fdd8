//! Units, operations, statuses and geometry shared by every bdev and front.

use std::fmt;

/// Size of one logical block in bytes. Only 512 and 4096 are accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockSize(u32);

impl BlockSize {
    /// 512-byte logical blocks.
    pub const B512: BlockSize = BlockSize(512);
    /// 4096-byte logical blocks.
    pub const B4096: BlockSize = BlockSize(4096);

    /// Validates a block size: 512 or 4096 bytes.
    pub fn new(bytes: u32) -> Option<BlockSize> {
        match bytes {
            512 | 4096 => Some(BlockSize(bytes)),
            _ => None,
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u32 {
        self.0
    }

    /// log2 of the size, for shifts on the hot path.
    pub const fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// Bytes covered by `blocks` blocks.
    pub const fn to_bytes(self, blocks: u64) -> u64 {
        blocks << self.shift()
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The operation of an I/O request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoType {
    /// Read blocks into the request's buffers.
    Read = 0,
    /// Write the request's buffers to blocks.
    Write = 1,
    /// Make every completed write durable (NVMe Flush, virtio FLUSH).
    Flush = 2,
    /// Deallocate blocks (NVMe Dataset Management deallocate, virtio DISCARD).
    Unmap = 3,
    /// Set blocks to zero without a data buffer (NVMe Write Zeroes, virtio WRITE_ZEROES).
    WriteZeroes = 4,
}

impl IoType {
    /// Every I/O type, in discriminant order.
    pub const ALL: [IoType; 5] = [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::Unmap,
        IoType::WriteZeroes,
    ];

    /// Stable lowercase name used in configs, the RPC and stats.
    pub const fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    /// Parses [`IoType::name`].
    pub fn from_name(name: &str) -> Option<IoType> {
        IoType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the request carries a data buffer of `num_blocks` blocks.
    pub const fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }

    /// Whether the request addresses a block range (Flush does not).
    pub const fn has_range(self) -> bool {
        !matches!(self, IoType::Flush)
    }

    /// Whether the request modifies the medium.
    pub const fn is_write(self) -> bool {
        matches!(self, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
    }

    /// The capability bit a bdev must have to accept this type.
    pub const fn cap(self) -> Caps {
        match self {
            IoType::Read => Caps::READ,
            IoType::Write => Caps::WRITE,
            IoType::Flush => Caps::FLUSH,
            IoType::Unmap => Caps::UNMAP,
            IoType::WriteZeroes => Caps::WRITE_ZEROES,
        }
    }
}

/// The outcome of an I/O request. Each front maps it to its wire status in one place
/// (`to_nvme_status()` in the target, `to_virtio_status()` in vhost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoStatus {
    /// Completed as asked.
    Success = 0,
    /// The block range lies (partly) outside the bdev (NVMe: LBA Out of Range).
    InvalidRange = 1,
    /// The request is malformed: zero length, buffer length not matching the block count,
    /// misaligned or too many segments, transfer larger than the bdev allows.
    InvalidRequest = 2,
    /// The bdev does not support this I/O type.
    Unsupported = 3,
    /// The medium failed the operation (NVMe: Unrecovered Read Error / Write Fault).
    MediaError = 4,
    /// Data failed an integrity check (CRC, authentication tag).
    IntegrityError = 5,
    /// The bdev is read-only.
    ReadOnly = 6,
    /// The backing store has no space left for the write.
    NoSpace = 7,
    /// The request was cancelled (shutdown, removal of the bdev).
    Aborted = 8,
}

impl IoStatus {
    /// Every status, in discriminant order (`ALL[s as usize] == s`).
    pub const ALL: [IoStatus; 9] = [
        IoStatus::Success,
        IoStatus::InvalidRange,
        IoStatus::InvalidRequest,
        IoStatus::Unsupported,
        IoStatus::MediaError,
        IoStatus::IntegrityError,
        IoStatus::ReadOnly,
        IoStatus::NoSpace,
        IoStatus::Aborted,
    ];

    /// Whether the request succeeded.
    pub const fn is_ok(self) -> bool {
        matches!(self, IoStatus::Success)
    }

    /// Stable lowercase name used in configs, the RPC and logs.
    pub const fn name(self) -> &'static str {
        match self {
            IoStatus::Success => "success",
            IoStatus::InvalidRange => "invalid_range",
            IoStatus::InvalidRequest => "invalid_request",
            IoStatus::Unsupported => "unsupported",
            IoStatus::MediaError => "media_error",
            IoStatus::IntegrityError => "integrity_error",
            IoStatus::ReadOnly => "read_only",
            IoStatus::NoSpace => "no_space",
            IoStatus::Aborted => "aborted",
        }
    }

    /// Parses [`IoStatus::name`].
    pub fn from_name(name: &str) -> Option<IoStatus> {
        IoStatus::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Maps a positive errno from the kernel to a status.
    pub fn from_errno(errno: i32) -> IoStatus {
        match errno {
            libc::ENOSPC | libc::EDQUOT => IoStatus::NoSpace,
            libc::EROFS | libc::EPERM | libc::EACCES => IoStatus::ReadOnly,
            libc::EOPNOTSUPP | libc::ENOTTY => IoStatus::Unsupported,
            libc::EINVAL => IoStatus::InvalidRequest,
            libc::ECANCELED | libc::EINTR => IoStatus::Aborted,
            libc::EBADMSG => IoStatus::IntegrityError,
            _ => IoStatus::MediaError,
        }
    }
}

impl fmt::Display for IoStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Capability bits of a bdev: which I/O types it accepts and how it behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Caps(u32);

impl Caps {
    /// Accepts reads.
    pub const READ: Caps = Caps(1 << 0);
    /// Accepts writes.
    pub const WRITE: Caps = Caps(1 << 1);
    /// Accepts flushes.
    pub const FLUSH: Caps = Caps(1 << 2);
    /// Accepts unmap (deallocate).
    pub const UNMAP: Caps = Caps(1 << 3);
    /// Accepts write-zeroes.
    pub const WRITE_ZEROES: Caps = Caps(1 << 4);
    /// Reads return what was written (false for `null`).
    pub const RETAINS_DATA: Caps = Caps(1 << 5);
    /// Unmapped blocks read back as zeroes.
    pub const UNMAP_READS_ZEROES: Caps = Caps(1 << 6);
    /// Data survives closing and reopening the bdev (file, block device).
    pub const PERSISTENT: Caps = Caps(1 << 7);
    /// Completed writes may sit in a volatile cache until a flush (NVMe VWC).
    pub const VOLATILE_CACHE: Caps = Caps(1 << 8);
    /// Every I/O type.
    pub const ALL_IO: Caps = Caps(0b11111);

    /// No capability.
    pub const fn empty() -> Caps {
        Caps(0)
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    pub const fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }

    /// The bits of `self` not in `other`.
    pub const fn without(self, other: Caps) -> Caps {
        Caps(self.0 & !other.0)
    }

    /// The names of the set bits, for the RPC.
    pub fn names(self) -> Vec<&'static str> {
        const NAMES: [(Caps, &str); 9] = [
            (Caps::READ, "read"),
            (Caps::WRITE, "write"),
            (Caps::FLUSH, "flush"),
            (Caps::UNMAP, "unmap"),
            (Caps::WRITE_ZEROES, "write_zeroes"),
            (Caps::RETAINS_DATA, "retains_data"),
            (Caps::UNMAP_READS_ZEROES, "unmap_reads_zeroes"),
            (Caps::PERSISTENT, "persistent"),
            (Caps::VOLATILE_CACHE, "volatile_cache"),
        ];
        NAMES
            .iter()
            .filter(|(c, _)| self.contains(*c))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl std::ops::BitOr for Caps {
    type Output = Caps;
    fn bitor(self, rhs: Caps) -> Caps {
        self.union(rhs)
    }
}

/// The largest read or write an export lets a host send in one command: NVMe/TCP's MDTS and
/// virtio-blk's `seg_max` × `size_max` are derived from it. The [`crate::bdev::Channel`] layer
/// takes any size (it splits what a bdev cannot take whole), and the conformance suite runs
/// every bdev at this size.
pub const MAX_EXPORT_IO_BYTES: u64 = 1 << 20;

/// The most scatter-gather segments an export lets a host send in one command (virtio-blk's
/// `seg_max`: a 128-entry virtqueue less the request header and status descriptors).
pub const MAX_EXPORT_SEGMENTS: u32 = 126;

/// A bdev's shape at one moment. The block count can change (resize); the rest is fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size.
    pub block_size: BlockSize,
    /// Number of logical blocks.
    pub block_count: u64,
    /// Alignment in bytes that data buffers must have for the fastest path (O_DIRECT); buffers
    /// that are not aligned are still accepted.
    pub buf_align: u32,
    /// Largest transfer the bdev takes in one request, in blocks; the channel layer splits
    /// larger requests. Also the optimal I/O size an export advertises.
    pub max_transfer_blocks: u32,
    /// Most scatter-gather segments the bdev takes in one request; the channel layer splits
    /// requests with more.
    pub max_segments: u32,
    /// What the bdev accepts and how it behaves.
    pub caps: Caps,
}

impl Geometry {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.block_size.to_bytes(self.block_count)
    }
}

/// Parses sizes such as `4096`, `512B`, `64KiB`, `1GiB`, `2T` (binary multiples).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_accepts_only_512_and_4096() {
        assert_eq!(BlockSize::new(512), Some(BlockSize::B512));
        assert_eq!(BlockSize::new(4096).unwrap().shift(), 12);
        assert_eq!(BlockSize::new(1024), None);
        assert_eq!(BlockSize::new(0), None);
    }

    #[test]
    fn parse_size_units() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("64 KiB"), Some(64 << 10));
        assert_eq!(parse_size("2t"), Some(2 << 40));
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("GiB"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
    }

    #[test]
    fn names_round_trip() {
        for t in IoType::ALL {
            assert_eq!(IoType::from_name(t.name()), Some(t));
        }
        assert_eq!(
            IoStatus::from_name("media_error"),
            Some(IoStatus::MediaError)
        );
        assert_eq!(IoStatus::from_errno(libc::ENOSPC), IoStatus::NoSpace);
    }
}
