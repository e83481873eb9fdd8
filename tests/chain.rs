//! A whole chain of transforms declared in TOML, `crc -> compress -> crypt_xts -> file`, parsed
//! through the daemon's own list of kinds (`src/decl.rs`, compiled in here as the fuzz target
//! does) and created with the bdev registry, then run through the shared conformance suite,
//! including a reopen from the same declarations.

use std::sync::Arc;

use ferroblk_bdev::conformance;
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{Bdev, BdevRegistry, IoStatus};
use serde::Deserialize;

/// The daemon's declarations: every kind, listed once.
#[path = "../src/decl.rs"]
#[allow(dead_code, unused_imports)]
mod decl;

/// The chain's declarations (shared with the fio engine's tests).
#[path = "common/chain.rs"]
mod chain_config;
use chain_config::chain_toml;

#[derive(Deserialize)]
struct Config {
    bdev: Vec<decl::Decl>,
}

/// Creates the chain from its declarations; returns the top.
fn create(toml_text: &str) -> Arc<dyn Bdev> {
    let cfg: Config = toml::from_str(toml_text).expect("the declarations parse");
    let kinds: Vec<&str> = cfg.bdev.iter().map(|d| d.kind()).collect();
    assert_eq!(kinds, ["crc", "compress", "crypt_xts", "file"]);
    let reg = BdevRegistry::new();
    reg.create_all(&cfg.bdev)
        .unwrap_or_else(|e| panic!("bdev[{}]: {}", e.index, e.error));
    let top = reg.get("checked").unwrap();
    let bases: Vec<String> =
        std::iter::successors(Some(top.clone()), |b| b.bases().first().cloned())
            .map(|b| b.info().kind().to_string())
            .collect();
    assert_eq!(bases, ["crc", "compress", "crypt_xts", "file"]);
    top
}

#[test]
fn crc_over_compress_over_xts_over_file_passes_conformance_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("chain.img");
    let text = chain_toml(&image);
    conformance::run(&|| create(&text), true);

    // Reopened: what the suite flushed is there, everything verifies, and the layers report.
    let top = create(&text);
    let mut ch = SyncChannel::new(top.open_channel().unwrap());
    let n = top.info().block_count();
    for lba in (0..n).step_by(256) {
        let k = 256.min(n - lba) as u32;
        assert_eq!(ch.read(lba, k).0, IoStatus::Success, "lba {lba}");
    }
    // Compressible data shrinks below the crypt layer, and the CRCs cover it end to end.
    let used = |top: &Arc<dyn Bdev>| {
        top.bases()[0].describe()["physical_bytes_used"]
            .as_u64()
            .unwrap()
    };
    let before = used(&top);
    let data: Vec<u8> = (0..64 * 4096)
        .map(|i| (i / 4096 % 7) as u8 * (i % 3 == 0) as u8)
        .collect();
    assert_eq!(ch.write(1024, &data), IoStatus::Success);
    assert_eq!(ch.flush(), IoStatus::Success);
    assert_eq!(ch.read(1024, 64), (IoStatus::Success, data));
    assert_eq!(top.describe()["integrity_errors"], 0);
    let grown = used(&top).saturating_sub(before);
    assert!(
        grown <= 64 * 4096 / 4,
        "256 KiB of 3:1 data took {grown} bytes"
    );
}
