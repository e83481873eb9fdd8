//! ferroblk's AES-256-XTS volumes are standard dm-crypt `aes-xts-plain64`, in both directions,
//! checked against the Linux kernel's dm-crypt in a real guest (QEMU, software emulation).
//!
//! 1. Host, before the boot: a pseudo-random pattern is written at 8 MiB through an [`XtsBdev`]
//!    (4096-byte blocks) on a [`FileBdev`] of a 64 MiB image.
//! 2. `ferroblk serve` exports the *raw* image (no crypt bdev) over vhost-user-blk, so the guest
//!    sees the ciphertext as `/dev/vda`.
//! 3. Guest: `dmsetup create` with exactly the table line [`XtsBdev::dm_crypt_table`] prints;
//!    the host's region must decrypt to the host's plaintext (sha256 compared in the guest and
//!    again on the host). The guest then writes its own random pattern at 40 MiB through
//!    `/dev/mapper/fblk` and prints its sha256. Two negative controls show the check is
//!    sensitive to the convention: the same key with `iv_large_sectors`, and the key with its
//!    halves swapped, must both read garbage.
//! 4. Host, after the guest and the daemon are gone: the guest's region read through the
//!    [`XtsBdev`] must have the guest's sha256, the host's region must be intact, and neither
//!    plaintext may appear anywhere in the raw image (ciphertext at rest).
//!
//! One guest boot covers both directions.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use common::daemon::start_daemon;
use common::guest::{GuestTest, config_head};
use common::lab::vhost_user_blk_args;
use ferroblk_bdev::file::{DirectMode, FileBdev, FileOptions};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{Bdev, BlockSize, IoStatus};
use ferroblk_crypto::{Key, XtsBdev};

/// Size of the image.
const IMAGE_BYTES: u64 = 64 << 20;
/// Block size of the volume (and of the raw export the guest sees).
const BLOCK: u64 = 4096;
/// Where the host writes its plaintext (bytes into the volume).
const HOST_OFFSET: u64 = 8 << 20;
/// Where the guest writes its plaintext through dm-crypt.
const GUEST_OFFSET: u64 = 40 << 20;
/// Length of each region.
const REGION: usize = 8 << 20;
/// Seed of the host's pattern.
const SEED: u64 = 0x5eed_f3bb_c0de_0001;

/// The volume key: 32 bytes of data key, then 32 bytes of tweak key (dm-crypt's order).
const KEY_HEX: &str = "666cc74432a475f7954f924004e761afe8f581aae6754eb0f04e8a3229d297e1\
                       480a9bb4c07030d5b88a8f5c7db5b60abb387dc42986609e70b44369bd67bc8b";

/// splitmix64: a deterministic pseudo-random pattern.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// sha256 of `data` in lowercase hex (the host's `sha256sum`).
fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(data)
        .expect("data to sha256sum");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let sum = text.split_whitespace().next().unwrap().to_string();
    assert_eq!(sum.len(), 64, "{text}");
    sum
}

/// The image opened on the host as an XTS volume, driven synchronously from the test thread.
/// Fields drop in order: the channel (which holds the base channel) before the bdevs; the file
/// bdev's exclusive lock on the image goes with the last reference.
struct Volume {
    ch: SyncChannel,
    xts: XtsBdev,
    /// Bytes per request: the volume's largest transfer.
    chunk: usize,
}

impl Volume {
    fn open(img: &Path, create: bool) -> Volume {
        let o = FileOptions {
            path: img.to_path_buf(),
            block_size: BlockSize::B4096,
            size: Some(IMAGE_BYTES),
            create,
            direct: DirectMode::Auto,
            read_only: false,
        };
        let base: Arc<dyn Bdev> = Arc::new(FileBdev::open("img", &o).expect("open the image"));
        let xts = XtsBdev::new("vol", base, Key::from_hex(KEY_HEX).unwrap()).unwrap();
        let g = xts.info().geometry();
        assert_eq!(u64::from(g.block_size.bytes()), BLOCK);
        assert_eq!(g.block_size.to_bytes(g.block_count), IMAGE_BYTES);
        let chunk = (g.max_transfer_blocks.min(32) as usize) * BLOCK as usize;
        let ch = SyncChannel::new(xts.open_channel().unwrap());
        Volume { ch, xts, chunk }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, part) in data.chunks(self.chunk).enumerate() {
            let at = offset + (i * self.chunk) as u64;
            assert_eq!(
                self.ch.write(at / BLOCK, part),
                IoStatus::Success,
                "write at {at}"
            );
        }
        assert_eq!(self.ch.flush(), IoStatus::Success);
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let at = offset + out.len() as u64;
            let n = (len - out.len()).min(self.chunk);
            let (st, data) = self.ch.read(at / BLOCK, (n as u64 / BLOCK) as u32);
            assert_eq!(st, IoStatus::Success, "read at {at}");
            out.extend_from_slice(&data);
        }
        out
    }
}

fn config(dir: &Path) -> String {
    format!(
        r#"{head}
# The raw image: the guest sees the ciphertext and decrypts it with dm-crypt.
[[bdev]]
name = "raw"
kind = "file"
path = "{dir}/disk.img"
block_size = 4096
[[vhost]]
socket = "{dir}/vhost.sock"
bdev = "raw"
num_queues = 1
serial = "ferroblk-crypt-test"
"#,
        head = config_head(dir),
        dir = dir.display()
    )
}

const GUEST: &str = r#"
dev=/dev/vda
# The raw export: 4 KiB logical blocks, the image's size.
test "$(cat /sys/block/vda/queue/logical_block_size)" -eq 4096
test "$(cat /sys/block/vda/size)" -eq __SECTORS__
dmsetup targets | grep -q '^crypt' || modprobe -d /run/lab dm_crypt
dmsetup targets | grep '^crypt'

# Both regions as bytes, in MiB (dd's units below).
hmib=__HOST_MIB__
gmib=__GUEST_MIB__
rmib=__REGION_MIB__

# The table line exactly as XtsBdev::dm_crypt_table prints it.
dmsetup create fblk --table "__TABLE__"
dmsetup mknodes
test -b /dev/mapper/fblk
dmsetup status fblk
test "$(blockdev --getss /dev/mapper/fblk)" -eq 4096
test "$(blockdev --getsz /dev/mapper/fblk)" -eq __SECTORS__

# Host -> guest: the region the host wrote through XtsBdev decrypts to the host's plaintext.
got=$(dd if=/dev/mapper/fblk bs=1M skip=$hmib count=$rmib iflag=direct status=none | sha256sum | cut -d' ' -f1)
echo "GUEST-READ-SHA=$got"
test "$got" = __HOST_SHA__
# ... while the raw device holds something else (ciphertext).
raw=$(dd if=$dev bs=1M skip=$hmib count=$rmib iflag=direct status=none | sha256sum | cut -d' ' -f1)
test "$raw" != __HOST_SHA__

# Guest -> host: a fresh random pattern written through dm-crypt.
head -c ${rmib}M /dev/urandom > /tmp/guest.bin
dd if=/tmp/guest.bin of=/dev/mapper/fblk bs=1M seek=$gmib oflag=direct conv=fsync status=none
sync
dd if=/dev/mapper/fblk bs=1M skip=$gmib count=$rmib iflag=direct status=none | cmp - /tmp/guest.bin
echo "GUEST-WROTE-SHA=$(sha256sum < /tmp/guest.bin | cut -d' ' -f1)"
blockdev --flushbufs /dev/mapper/fblk
dmsetup remove fblk

# Negative controls: the other IV convention, and the key halves swapped, read garbage.
dmsetup create fblk-large --table "__TABLE_LARGE__"
dmsetup mknodes
bad=$(dd if=/dev/mapper/fblk-large bs=1M skip=$hmib count=$rmib iflag=direct status=none | sha256sum | cut -d' ' -f1)
test "$bad" != __HOST_SHA__
dmsetup remove fblk-large
dmsetup create fblk-swapped --table "__TABLE_SWAPPED__"
dmsetup mknodes
bad=$(dd if=/dev/mapper/fblk-swapped bs=1M skip=$hmib count=$rmib iflag=direct status=none | sha256sum | cut -d' ' -f1)
test "$bad" != __HOST_SHA__
dmsetup remove fblk-swapped
dmsetup ls
echo GUEST-ALL-OK
"#;

/// Every 16-byte block of `plain` (the plaintext's AES blocks).
fn aes_blocks(plain: &[u8]) -> impl Iterator<Item = u128> + '_ {
    plain
        .chunks_exact(16)
        .map(|b| u128::from_le_bytes(b.try_into().unwrap()))
}

#[test]
fn dm_crypt_in_a_linux_guest_opens_ferroblk_xts_volumes_and_back() {
    let started = Instant::now();
    let t = GuestTest::new(config);
    let dir = &t.dir;
    let img = dir.join("disk.img");

    // 1. The host writes its plaintext through the XTS volume, then lets go of the image.
    let host_plain = pattern(SEED, REGION);
    let host_sha = sha256(&host_plain);
    let table = {
        let mut vol = Volume::open(&img, true);
        vol.write(HOST_OFFSET, &host_plain);
        assert!(
            vol.read(HOST_OFFSET, REGION) == host_plain,
            "host read-back through XtsBdev"
        );
        vol.xts.dm_crypt_table()
    };
    assert_eq!(std::fs::metadata(&img).unwrap().len(), IMAGE_BYTES);
    let sectors = IMAGE_BYTES / 512;
    assert_eq!(
        table,
        format!("0 {sectors} crypt aes-xts-plain64 <hexkey> 0 <device> 0 1 sector_size:{BLOCK}"),
        "the documented dm-crypt convention"
    );
    let line = |key: &str| {
        table
            .replace("<hexkey>", key)
            .replace("<device>", "/dev/vda")
    };
    // Negative controls: the other IV convention (IV = index of the 4096-byte sector), and the
    // tweak key first.
    let large = line(KEY_HEX).replace(
        " 1 sector_size:4096",
        " 2 sector_size:4096 iv_large_sectors",
    );
    let swapped = line(&format!("{}{}", &KEY_HEX[64..], &KEY_HEX[..64]));

    // 2. The daemon exports the raw image.
    let mut daemon = start_daemon(dir);

    // 3. The guest: dm-crypt reads the host's data and writes its own.
    let script = GUEST
        .replace("__SECTORS__", &sectors.to_string())
        .replace("__HOST_MIB__", &(HOST_OFFSET >> 20).to_string())
        .replace("__GUEST_MIB__", &(GUEST_OFFSET >> 20).to_string())
        .replace("__REGION_MIB__", &(REGION >> 20).to_string())
        .replace("__HOST_SHA__", &host_sha)
        .replace("__TABLE_LARGE__", &large)
        .replace("__TABLE_SWAPPED__", &swapped)
        .replace("__TABLE__", &line(KEY_HEX));
    let args = vhost_user_blk_args("crypt0", &dir.join("vhost.sock"), 1);
    let out = t.run(&script, &args);
    let log = t.daemon_log();
    let marker = |name: &str| -> String {
        out.output
            .lines()
            .filter(|l| !l.contains("echo "))
            .find_map(|l| l.split(name).nth(1))
            .unwrap_or_else(|| panic!("guest printed {name}"))
            .trim()
            .to_string()
    };
    assert_eq!(marker("GUEST-READ-SHA="), host_sha, "host -> guest");
    let guest_sha = marker("GUEST-WROTE-SHA=");
    assert_eq!(guest_sha.len(), 64);
    assert!(daemon.stop(), "daemon exits cleanly on SIGTERM:\n{log}");

    // 4. The host reads what the guest wrote through dm-crypt.
    let (guest_plain, host_again) = {
        let mut vol = Volume::open(&img, false);
        (
            vol.read(GUEST_OFFSET, REGION),
            vol.read(HOST_OFFSET, REGION),
        )
    };
    assert_eq!(sha256(&guest_plain), guest_sha, "guest -> host");
    assert!(host_again == host_plain, "the host's region is intact");

    // Ciphertext at rest: no 16-byte block of either plaintext anywhere in the raw image
    // (both are random, so a plaintext block occurs in ciphertext with probability ~2^-100).
    let raw = std::fs::read(&img).unwrap();
    let at = |off: u64| &raw[off as usize..off as usize + REGION];
    assert!(at(HOST_OFFSET) != host_plain.as_slice());
    assert!(at(GUEST_OFFSET) != guest_plain.as_slice());
    assert!(at(HOST_OFFSET).iter().any(|&b| b != 0), "data was written");
    assert!(at(GUEST_OFFSET).iter().any(|&b| b != 0), "data was written");
    let plain: HashSet<u128> = aes_blocks(&host_plain)
        .chain(aes_blocks(&guest_plain))
        .filter(|&b| b != 0)
        .collect();
    assert!(
        plain.len() > 2 * REGION / 16 - 16,
        "the patterns are random"
    );
    if let Some(i) = aes_blocks(&raw).position(|b| plain.contains(&b)) {
        panic!("plaintext at byte {} of the raw image", i * 16);
    }
    eprintln!("crypt_guest: passed in {:.1?}", started.elapsed());
}
