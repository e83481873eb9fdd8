//! The `rbd` bdev against a real single-node Ceph cluster (one per test binary, see
//! `ferroblk_rbd::testing`): the conformance suite, data exchanged with the `rbd` CLI, resize,
//! and declarations the cluster refuses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::testing::block_data;
use ferroblk_bdev::{Bdev, BdevEvent, IoStatus, conformance};
use ferroblk_rbd::testing::{POOL, shared};
use ferroblk_rbd::{RbdBdev, RbdDecl};

/// A declaration of image `image` on the shared cluster, with `extra` TOML lines.
fn decl(image: &str, extra: &str) -> RbdDecl {
    let d: RbdDecl = toml::from_str(&format!(
        "name = \"{image}\"\nimage = \"{image}\"\n{}{extra}",
        shared().decl_fields()
    ))
    .unwrap();
    d.validate().unwrap();
    d
}

fn open(image: &str, extra: &str) -> RbdBdev {
    decl(image, extra).open().unwrap()
}

/// A fresh image name.
fn image(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The events `bdev` tells its listeners from now on.
fn events(bdev: &RbdBdev) -> Arc<std::sync::Mutex<Vec<BdevEvent>>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    bdev.info()
        .subscribe(move |ev| s2.lock().unwrap().push(*ev));
    seen
}

#[test]
fn rbd_passes_conformance_4k_and_512() {
    for (bs, img) in [(4096, image("conf4k")), (512, image("conf512"))] {
        let extra = format!("create = true\nsize = \"16MiB\"\nblock_size = {bs}\n");
        conformance::run(&|| Arc::new(open(&img, &extra)) as Arc<dyn Bdev>, true);
    }
}

#[test]
fn data_written_through_ferroblk_is_what_rbd_export_reads() {
    let c = shared();
    let img = image("export");
    let bdev = open(&img, "create = true\nsize = \"4MiB\"\n");
    let blocks = bdev.info().block_count();
    assert_eq!(blocks, 1024);
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    let mut want = vec![0u8; 4 << 20];
    for lba in (0..blocks).step_by(7) {
        let d = block_data(lba, 4096, 3);
        assert_eq!(ch.write(lba, &d), IoStatus::Success);
        want[lba as usize * 4096..][..4096].copy_from_slice(&d);
    }
    assert_eq!(ch.flush(), IoStatus::Success);
    let out = c.dir().join(format!("{img}.raw"));
    c.rbd_ok(&["export", &format!("{POOL}/{img}"), out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert!(got == want, "rbd export differs from what ferroblk wrote");
}

#[test]
fn an_image_filled_by_rbd_import_reads_back_through_ferroblk() {
    let c = shared();
    let img = image("import");
    let mut data = vec![0u8; 3 << 20];
    for (lba, b) in data.chunks_mut(4096).enumerate() {
        b.copy_from_slice(&block_data(lba as u64, 4096, 9));
    }
    let src = c.dir().join(format!("{img}.raw"));
    std::fs::write(&src, &data).unwrap();
    c.rbd_ok(&["import", src.to_str().unwrap(), &format!("{POOL}/{img}")]);
    std::fs::remove_file(&src).unwrap();
    let bdev = open(&img, "read_only = true\n");
    assert_eq!(bdev.info().block_count(), 768);
    assert!(bdev.info().is_read_only());
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    let (st, back) = ch.read(0, 768);
    assert_eq!(st, IoStatus::Success);
    assert!(
        back == data,
        "ferroblk reads differently from what rbd import wrote"
    );
    assert_eq!(ch.write(0, &data[..4096]), IoStatus::ReadOnly);
}

#[test]
fn resize_grows_the_image_and_tells_the_listeners() {
    let c = shared();
    let img = image("resize");
    let bdev = open(&img, "create = true\nsize = \"1MiB\"\n");
    let seen = events(&bdev);
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    assert_eq!(ch.read(256, 1).0, IoStatus::InvalidRange);
    bdev.resize(1024).unwrap();
    let d = block_data(1023, 4096, 5);
    assert_eq!(ch.write(1023, &d), IoStatus::Success);
    assert_eq!(ch.read(1023, 1), (IoStatus::Success, d));
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [BdevEvent::Resized {
            old_blocks: 256,
            new_blocks: 1024
        }]
    );
    let info = c.rbd_ok(&["info", "--format", "json", &format!("{POOL}/{img}")]);
    assert!(info.contains("\"size\":4194304"), "{info}");
    let e = bdev.resize(512).unwrap_err();
    assert_eq!(e.field(), Some("size"), "{e}");
    assert_eq!(bdev.info().block_count(), 1024);
}

#[test]
fn a_missing_pool_or_image_is_an_error_naming_the_field() {
    let img = image("missing");
    let e = decl(&img, "").open().err().unwrap();
    assert_eq!(e.field(), Some("image"), "{e}");
    assert!(e.to_string().contains("no such image"), "{e}");
    let mut d = decl(&img, "create = true\nsize = 4096\n");
    d.pool = "nopool".into();
    let e = d.open().err().unwrap();
    assert_eq!(e.field(), Some("pool"), "{e}");
    assert!(e.to_string().contains("no such pool"), "{e}");
    // An existing image smaller than declared.
    open(&img, "create = true\nsize = \"1MiB\"\n");
    let e = decl(&img, "size = \"2MiB\"\n").open().err().unwrap();
    assert_eq!(e.field(), Some("size"), "{e}");
}

#[test]
fn unreachable_monitors_fail_within_the_connect_timeout() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d: RbdDecl = toml::from_str(&format!(
        "name = \"u\"\nmon_host = \"v2:127.0.0.1:{port}\"\nauth = \"none\"\npool = \"{POOL}\"\n\
         image = \"u\"\nconnect_timeout_secs = 2\n"
    ))
    .unwrap();
    let e = d.open().err().unwrap();
    assert_eq!(e.field(), Some("mon_host"), "{e}");
    // librados gave up on the monitors after the declared timeout (ETIMEDOUT), not on another
    // error.
    assert!(
        e.to_string()
            .starts_with("mon_host: cannot connect to the cluster as client.admin within 2 s"),
        "{e}"
    );
}

#[test]
fn a_keyring_the_cluster_refuses_is_an_error_naming_the_keyring() {
    let c = shared();
    let keyring = c.dir().join("wrong.keyring");
    std::fs::write(
        &keyring,
        "[client.admin]\n\tkey = AQBXtm9lAAAAABAAvOb8zLZ6JGpGjFGrLDUabw==\n",
    )
    .unwrap();
    let d: RbdDecl = toml::from_str(&format!(
        "name = \"k\"\nmon_host = \"{}\"\nkeyring = \"{}\"\npool = \"{POOL}\"\nimage = \"k\"\n\
         connect_timeout_secs = 3\n",
        c.mon_host(),
        keyring.display()
    ))
    .unwrap();
    let e = d.open().err().unwrap();
    assert_eq!(e.field(), Some("keyring"), "{e}");
    assert!(e.to_string().contains("refused client.admin"), "{e}");
}

#[test]
fn images_of_one_cluster_share_its_connections() {
    let a = open(
        &image("share"),
        "create = true\nsize = 4096\nconnections = 2\n",
    );
    let b = open(
        &image("share"),
        "create = true\nsize = 4096\nconnections = 2\n",
    );
    assert!(Arc::ptr_eq(a.cluster(), b.cluster()));
    assert_eq!(a.cluster().connections(), 2);
    let other = open(&image("share"), "create = true\nsize = 4096\n");
    assert!(!Arc::ptr_eq(a.cluster(), other.cluster()));
    let mut ch = SyncChannel::new(b.open_channel().unwrap());
    assert_eq!(ch.write(0, &block_data(0, 4096, 1)), IoStatus::Success);
}

#[test]
fn an_image_grown_with_the_rbd_cli_grows_the_volume() {
    let c = shared();
    let img = image("grown");
    let bdev = open(&img, "create = true\nsize = \"1MiB\"\n");
    let seen = events(&bdev);
    c.rbd_ok(&["resize", "--size", "8M", &format!("{POOL}/{img}")]);
    // librbd tells the bdev from its header watch; wait for it (a hang guard, not a timing).
    let t = std::time::Instant::now();
    while bdev.info().block_count() != 2048 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "the volume did not follow the image's new size"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [BdevEvent::Resized {
            old_blocks: 256,
            new_blocks: 2048
        }]
    );
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    let d = block_data(2047, 4096, 8);
    assert_eq!(ch.write(2047, &d), IoStatus::Success);
    assert_eq!(ch.read(2047, 1), (IoStatus::Success, d));
}

#[test]
fn a_second_writer_on_an_image_in_use_is_refused_naming_the_image() {
    let img = image("inuse");
    let first = open(&img, "create = true\nsize = \"1MiB\"\n");
    let mut ch = SyncChannel::new(first.open_channel().unwrap());
    assert_eq!(ch.write(0, &block_data(0, 4096, 1)), IoStatus::Success);
    let e = decl(&img, "").open().err().unwrap();
    assert_eq!(e.field(), Some("image"), "{e}");
    assert!(
        e.to_string()
            .contains("another client holds its exclusive lock"),
        "{e}"
    );
    // A reader takes no lock, and the first volume keeps writing.
    let reader = open(&img, "read_only = true\n");
    let (st, back) = SyncChannel::new(reader.open_channel().unwrap()).read(0, 1);
    assert_eq!(st, IoStatus::Success);
    assert!(back == block_data(0, 4096, 1));
    assert_eq!(ch.write(1, &block_data(1, 4096, 1)), IoStatus::Success);
    // Closed, the image can be opened for writing again.
    drop(ch);
    drop(first);
    open(&img, "");
}
