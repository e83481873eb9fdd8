//! The kinds of bdev the daemon accepts, listed once ([`kinds`]): those of `ferroblk-bdev`, the
//! encryption kinds of `ferroblk-crypto`, the remote `nvmf` kind of `ferroblk-target` and, with
//! the `rbd` cargo feature (it links librbd), `rbd` of `ferroblk-rbd`. The config file's
//! `[[bdev]]` tables, the
//! `bdev_create` RPC and the state file all parse a declaration through this list into a
//! [`Decl`]; a new kind implements `ferroblk_bdev::BdevKind` and is added here, nowhere else.

use std::ops::Deref;
use std::sync::OnceLock;

pub use ferroblk_bdev::decl::{DeclError, field_path};
use ferroblk_bdev::{BdevDecl, Kinds};
use serde::{Deserialize, Deserializer, Serialize};

/// Every kind a declaration may name: the bdev crate's, the encryption kinds, `nvmf`, then `rbd`.
pub fn kinds() -> &'static Kinds {
    static KINDS: OnceLock<Kinds> = OnceLock::new();
    KINDS.get_or_init(|| {
        let mut k = Kinds::core();
        ferroblk_crypto::decl::add_kinds(&mut k);
        ferroblk_target::remote::add_kinds(&mut k);
        #[cfg(feature = "rbd")]
        ferroblk_rbd::add_kinds(&mut k);
        k
    })
}

/// One `[[bdev]]` declaration, of any kind of [`kinds`].
///
/// Deserialized by hand rather than as a serde internally tagged enum: serde buffers such an
/// enum's table and loses the path inside it, so `block_size = "4k"` could only be reported
/// against the whole `bdev[0]`. [`Decl::from_json`] reads `kind`, then the kind's fields with
/// their paths; a failure displays as `field.path: message` ([`DeclError`]), which
/// [`field_path`] splits back into the path of the field.
#[derive(Clone, Debug, PartialEq)]
pub struct Decl(pub BdevDecl);

impl Deref for Decl {
    type Target = BdevDecl;
    fn deref(&self) -> &BdevDecl {
        &self.0
    }
}

impl AsRef<BdevDecl> for Decl {
    fn as_ref(&self) -> &BdevDecl {
        &self.0
    }
}

impl Serialize for Decl {
    /// As written, with `kind`; keys serialize as `"<redacted>"`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Decl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Decl, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Decl::from_json(v).map_err(serde::de::Error::custom)
    }
}

impl Decl {
    /// Deserializes one declaration from its JSON (or TOML, converted) form, naming the field
    /// that is wrong.
    pub fn from_json(v: serde_json::Value) -> Result<Decl, DeclError> {
        kinds().parse(v).map(Decl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_and_keys_are_redacted() {
        #[derive(Deserialize)]
        struct W {
            bdev: Vec<Decl>,
        }
        let hex = "11".repeat(32) + &"22".repeat(32);
        let w: W = toml::from_str(&format!(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"1MiB\"\n\
             [[bdev]]\nkind = \"crypt_xts\"\nname = \"x\"\nbase = \"m\"\nkey_hex = \"{hex}\"\n"
        ))
        .unwrap();
        assert_eq!(w.bdev[1].kind(), "crypt_xts");
        assert_eq!(w.bdev[1].bases(), ["m"]);
        let json = w.bdev[1].to_json().to_string();
        assert!(!json.contains(&hex[..16]), "{json}");
        let reg = ferroblk_bdev::BdevRegistry::new();
        reg.create_all(&w.bdev).unwrap();
        assert_eq!(reg.get("x").unwrap().info().kind(), "crypt_xts");
    }

    #[test]
    fn a_wrong_field_is_named_by_its_path() {
        let v =
            serde_json::json!({"kind": "malloc", "name": "m", "size": 8192, "block_size": "4k"});
        let e = Decl::from_json(v).unwrap_err();
        assert_eq!(e.field, "block_size");
        assert!(e.message.starts_with("invalid type: string \"4k\""), "{e}");
        let e = Decl::from_json(serde_json::json!({"kind": "floppy", "name": "m"})).unwrap_err();
        assert_eq!(e.field, "kind");
        assert!(e.message.contains("floppy"), "{e}");
        let e = Decl::from_json(serde_json::json!({"name": "m"})).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = Decl::from_json(serde_json::json!({"kind": "null", "size": 4096})).unwrap_err();
        assert_eq!(e.field, "name", "{e}");
        let e = Decl::from_json(serde_json::json!({"kind": "null", "name": "n", "sizee": 1}))
            .unwrap_err();
        assert_eq!(e.field, "sizee", "{e}");
    }

    #[test]
    fn the_kinds_are_listed_once_in_order() {
        let names: Vec<&str> = kinds().names().collect();
        let mut want = vec![
            "malloc",
            "null",
            "file",
            "error",
            "delay",
            "crc",
            "compress",
            "mirror",
            "crypt_xts",
            "crypt_gcm",
            "nvmf",
        ];
        if cfg!(feature = "rbd") {
            want.push("rbd");
        }
        assert_eq!(names, want);
        let e = Decl::from_json(serde_json::json!({"kind": "floppy"})).unwrap_err();
        let listed: Vec<String> = want.iter().map(|k| format!("`{k}`")).collect();
        assert!(
            e.message
                .ends_with(&format!("expected one of {}", listed.join(", "))),
            "{e}"
        );
    }

    #[test]
    fn crc_and_compress_are_declarable() {
        #[derive(Deserialize)]
        struct W {
            bdev: Vec<Decl>,
        }
        let w: W = toml::from_str(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"4MiB\"\n\
             [[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\nsize = \"16MiB\"\n\
             [[bdev]]\nkind = \"crc\"\nname = \"c\"\nbase = \"z\"\n",
        )
        .unwrap();
        assert_eq!(w.bdev[1].kind(), "compress");
        assert_eq!(w.bdev[2].kind(), "crc");
        assert_eq!(w.bdev[2].bases(), ["z"]);
        assert_eq!(w.bdev[1].to_json()["algorithm"], "lz4");
        let reg = ferroblk_bdev::BdevRegistry::new();
        reg.create_all(&w.bdev).unwrap();
        assert_eq!(reg.get("c").unwrap().info().kind(), "crc");
        assert_eq!(reg.get("z").unwrap().info().block_count(), 4096);
        let bad: W = toml::from_str(
            "[[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\nsize = 4096\n\
             chunk_size = 3000\n",
        )
        .unwrap();
        assert_eq!(
            bad.bdev[0].validate().unwrap_err().field(),
            Some("chunk_size")
        );
    }
}
