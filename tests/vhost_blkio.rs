//! Every virtio-blk operation through libblkio's `virtio-blk-vhost-user` driver (a real
//! vhost-user front-end) against ferroblk's own export: read, write, flush, discard,
//! write-zeroes, on two queues at once, plus export add/remove over the RPC, a read-only
//! export, and a second front-end waiting while the first is connected.

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const BIN: &str = env!("CARGO_BIN_EXE_ferroblk");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill with a valid pid and signal has no memory effects.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> Daemon {
    let cfg = format!(
        r#"
[reactors]
count = 2
[rpc]
socket = "{d}/rpc.sock"
[[bdev]]
name = "disk"
kind = "file"
path = "{d}/disk.img"
size = "64MiB"
create = true
[[bdev]]
name = "ram"
kind = "malloc"
size = "16MiB"
[[vhost]]
socket = "{d}/disk.sock"
bdev = "disk"
num_queues = 2
"#,
        d = dir.display()
    );
    std::fs::write(dir.join("f.toml"), cfg).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.join("f.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !dir.join("disk.sock").exists() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

fn rpc(dir: &Path, method: &str, params: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(dir.join("rpc.sock"))
        .arg(method)
        .arg(params)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

struct Dev {
    b: Blkio,
    queues: Vec<Blkioq>,
    mem: *mut u8,
    len: usize,
}

fn open(sock: &Path, nq: i32, read_only: bool) -> Dev {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    if read_only {
        b.set_bool("read-only", true).unwrap();
    }
    b.connect().unwrap();
    b.set_i32("num-queues", nq).unwrap();
    let queues = b.start().unwrap().queues;
    let len = 1 << 20;
    let region = b.alloc_mem_region(len).unwrap();
    b.map_mem_region(&region).unwrap();
    Dev {
        mem: region.addr as *mut u8,
        len,
        b,
        queues,
    }
}

impl Dev {
    fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapped region; tests use disjoint ranges per request.
        unsafe { std::slice::from_raw_parts_mut(self.mem.add(off), len) }
    }

    /// Runs the queued requests of queue `q` to completion; returns their results.
    fn wait(&mut self, q: usize, n: usize) -> Vec<i32> {
        let mut c: Vec<MaybeUninit<Completion>> = std::iter::repeat_with(MaybeUninit::uninit)
            .take(n)
            .collect();
        let mut got = Vec::new();
        let t = Instant::now();
        while got.len() < n {
            let k = self.queues[q].do_io(&mut c, 1, None, None).unwrap();
            for x in &c[..k] {
                // SAFETY: do_io initialised the first `k` entries.
                got.push(unsafe { x.assume_init_ref() }.ret);
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "requests did not complete"
            );
        }
        got
    }
}

#[test]
fn every_virtio_blk_operation_through_libblkio() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _d = start(dir);
    let mut dev = open(&dir.join("disk.sock"), 2, false);
    assert_eq!(dev.b.get_u64("capacity").unwrap(), 64 << 20);
    assert_eq!(dev.b.get_i32("request-alignment").unwrap(), 4096);

    // Writes on both queues at once, then reads back crosswise.
    for (i, v) in dev.buf(0, 65536).chunks_mut(4096).enumerate() {
        v.fill(i as u8 + 1);
    }
    let base = dev.mem;
    for q in 0..2 {
        for k in 0..8usize {
            let slot = q * 8 + k;
            // SAFETY: 4 KiB inside the mapped region, one per request.
            let p = unsafe { base.add(slot * 4096) };
            dev.queues[q].write((slot * 4096) as u64, p, 4096, slot, ReqFlags::empty());
        }
    }
    assert!(dev.wait(0, 8).iter().all(|&r| r == 0));
    assert!(dev.wait(1, 8).iter().all(|&r| r == 0));
    dev.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(dev.wait(0, 1), [0]);
    // SAFETY: a 64 KiB read into the second half of the region.
    let rp = unsafe { base.add(512 << 10) };
    dev.queues[1].read(0, rp, 65536, 0, ReqFlags::empty());
    assert_eq!(dev.wait(1, 1), [0]);
    for (i, v) in dev.buf(512 << 10, 65536).chunks(4096).enumerate() {
        assert!(
            v.iter().all(|&x| x == i as u8 + 1),
            "block {i} read back wrong"
        );
    }
    // The backing file holds the data.
    let f = std::fs::read(dir.join("disk.img")).unwrap();
    assert!(f[4096..8192].iter().all(|&x| x == 2));

    // Discard and write-zeroes read back as zeroes; the neighbours stay.
    dev.queues[0].discard(4096, 8192, 0, ReqFlags::empty());
    dev.queues[0].write_zeroes(16384, 4096, 1, ReqFlags::empty());
    assert_eq!(dev.wait(0, 2), [0, 0]);
    dev.queues[0].read(0, rp, 65536, 0, ReqFlags::empty());
    assert_eq!(dev.wait(0, 1), [0]);
    let back = dev.buf(512 << 10, 65536);
    assert!(back[..4096].iter().all(|&x| x == 1));
    assert!(
        back[4096..12288].iter().all(|&x| x == 0),
        "discarded blocks read as zeroes"
    );
    assert!(back[12288..16384].iter().all(|&x| x == 4));
    assert!(back[16384..20480].iter().all(|&x| x == 0), "write-zeroes");
    assert!(back[20480..24576].iter().all(|&x| x == 6));

    // Beyond the end and misaligned: an error, and the device keeps working.
    dev.queues[0].read(64 << 20, rp, 4096, 0, ReqFlags::empty());
    assert_ne!(dev.wait(0, 1)[0], 0);
    dev.queues[0].read(0, rp, 4096, 0, ReqFlags::empty());
    assert_eq!(dev.wait(0, 1), [0]);

    // A second front-end waits in the backlog while the first is connected (one at a time).
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&rpc(dir, "vhost_list", "{}").1).unwrap()[0]["connected"],
        true
    );
    drop(dev);

    // Exports come and go over the RPC; a read-only export refuses writes.
    let ro = dir.join("ram.sock");
    let (ok, out) = rpc(
        dir,
        "vhost_add",
        &format!(
            r#"{{"socket": "{}", "bdev": "ram", "read_only": true}}"#,
            ro.display()
        ),
    );
    assert!(ok, "{out}");
    let (ok, out) = rpc(
        dir,
        "vhost_add",
        &format!(r#"{{"socket": "{}", "bdev": "ram"}}"#, ro.display()),
    );
    assert!(!ok && out.contains("exists"), "{out}");
    let (ok, out) = rpc(dir, "bdev_delete", r#"{"name": "ram"}"#);
    assert!(
        !ok && out.contains("vhost"),
        "an exported bdev cannot be deleted: {out}"
    );
    let mut r = open(&ro, 1, true);
    assert!(r.b.get_bool("read-only").unwrap());
    let p = r.mem;
    r.queues[0].read(0, p, 4096, 0, ReqFlags::empty());
    assert_eq!(r.wait(0, 1), [0]);
    drop(r);
    let (ok, out) = rpc(
        dir,
        "vhost_remove",
        &format!(r#"{{"socket": "{}"}}"#, ro.display()),
    );
    assert!(ok, "{out}");
    assert!(!ro.exists(), "socket removed with the export");
    let (ok, out) = rpc(dir, "bdev_delete", r#"{"name": "ram"}"#);
    assert!(ok, "released after the export is removed: {out}");
}
