//! The transform chain `crc -> compress -> crypt_xts -> file` as `[[bdev]]` declarations, top
//! first as an operator would read it: `tests/chain.rs` runs the conformance suite on it and
//! the fio engine's tests (`fio/tests/fio_engine.rs`) run fio verify jobs through it. The top is
//! `checked`.

/// The chain's declarations over a file at `image` (created, 16 MiB).
pub fn chain_toml(image: &std::path::Path) -> String {
    let key = "0f1e2d3c4b5a69788796a5b4c3d2e1f0".repeat(2)
        + &"00112233445566778899aabbccddeeff".repeat(2);
    format!(
        r#"
# Top first, as an operator would read it; the registry creates bases first.
[[bdev]]
kind = "crc"
name = "checked"
base = "packed"

[[bdev]]
kind = "compress"
name = "packed"
base = "secret"
size = "32MiB"          # logical, over a 16 MiB file
chunk_size = "16KiB"
algorithm = "lz4"
# crypt_xts on a new file reads encrypted zeroes, not zeroes: format what has no superblock.
format = "if_unformatted"

[[bdev]]
kind = "crypt_xts"
name = "secret"
base = "disk"
key_hex = "{key}"

[[bdev]]
kind = "file"
name = "disk"
path = "{path}"
size = "16MiB"
create = true
"#,
        path = image.display()
    )
}
