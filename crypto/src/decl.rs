//! The encryption kinds of bdev, [`CryptXtsKind`] (`kind = "crypt_xts"`) and [`CryptGcmKind`]
//! (`kind = "crypt_gcm"`): their declarations (one serde struct per kind, unknown fields
//! rejected) and constructors, which a program adds to its list of kinds with [`add_kinds`].
//!
//! ```toml
//! [[bdev]]
//! kind = "crypt_xts"
//! name = "secret"
//! base = "nvme0"
//! key_file = "/etc/ferroblk/keys/secret.key"   # or: key_hex = "<128 hex digits>"
//! ```
//!
//! `key_hex` is for the RPC; a config file should name a `key_file`. The hex is never printed
//! (`Debug` redacts it) and never serialized back (it serializes as `"<redacted>"`).

use std::path::PathBuf;
use std::sync::Arc;

use ferroblk_bdev::decl::{BaseRef, need_base, one_base};
use ferroblk_bdev::{Bdev, BdevError, BdevKind, Kinds};
use serde::{Deserialize, Serialize};

use crate::gcm::GcmBdev;
use crate::key::{AES256_KEY_LEN, Key, KeyHex, XTS_KEY_LEN};
use crate::xts::XtsBdev;

/// Where a declaration's key comes from.
fn load_key(key_file: &Option<PathBuf>, key_hex: &Option<KeyHex>) -> Result<Key, BdevError> {
    match (key_file, key_hex) {
        (Some(path), None) => {
            Key::from_file(path).map_err(|e| BdevError::invalid("key_file", e.to_string()))
        }
        (None, Some(hex)) => hex
            .key()
            .map_err(|e| BdevError::invalid("key_hex", e.to_string())),
        _ => Err(BdevError::invalid(
            "key_file",
            "give exactly one of key_file and key_hex",
        )),
    }
}

fn check_one_key(key_file: &Option<PathBuf>, key_hex: &Option<KeyHex>) -> Result<(), BdevError> {
    if key_file.is_some() == key_hex.is_some() {
        return Err(BdevError::invalid(
            "key_file",
            "give exactly one of key_file and key_hex",
        ));
    }
    Ok(())
}

/// The declaration of `kind = "crypt_xts"` (AES-256-XTS on `base`, dm-crypt `aes-xts-plain64`
/// compatible) and of `kind = "crypt_gcm"` (AES-256-GCM on `base`, formatted on first open of a
/// zeroed base): the same fields, a key of 64 bytes for XTS (data key, then tweak key) and 32
/// for GCM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptDecl {
    /// Unique name.
    pub name: String,
    /// The bdev it stacks on.
    pub base: String,
    /// File holding the key, as hex digits or raw bytes (mode 0600 or stricter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The key as hex digits (128 for XTS, 64 for GCM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hex: Option<KeyHex>,
}

/// `kind = "crypt_xts"`.
pub type XtsDecl = CryptDecl;
/// `kind = "crypt_gcm"`.
pub type GcmDecl = CryptDecl;

impl CryptDecl {
    /// Checks what needs no file or bdev: exactly one key source.
    pub fn validate(&self) -> Result<(), BdevError> {
        check_one_key(&self.key_file, &self.key_hex)
    }
}

/// Adds the encryption kinds, `crypt_xts` and `crypt_gcm`, to a program's list of kinds.
pub fn add_kinds(kinds: &mut Kinds) -> &mut Kinds {
    kinds.add::<CryptXtsKind>().add::<CryptGcmKind>()
}

/// Loads the key as opening would and checks its length: what `check-config` runs.
fn check_key(
    key_file: &Option<PathBuf>,
    key_hex: &Option<KeyHex>,
    need: usize,
) -> Result<(), BdevError> {
    let (field, key) = match (key_file, key_hex) {
        (Some(p), _) => ("key_file", Key::from_file(p)),
        (None, Some(h)) => ("key_hex", h.key()),
        (None, None) => return Ok(()), // validate() reported it.
    };
    match key {
        Ok(k) if k.len() == need => Ok(()),
        Ok(k) => Err(BdevError::invalid(
            field,
            format!("the key is {} bytes; this kind takes {need}", k.len()),
        )),
        Err(e) => Err(BdevError::invalid(field, e.to_string())),
    }
}

/// Implements [`BdevKind`] for an encryption kind whose declaration has `name`, `base`,
/// `key_file` and `key_hex`; the two differ only in their name, key length and constructor.
macro_rules! crypt_kind {
    ($(#[$doc:meta])* $kind:ident, $name:expr, $key_len:expr, $open:expr) => {
        $(#[$doc])*
        pub struct $kind;

        impl BdevKind for $kind {
            const NAME: &'static str = $name;
            type Config = CryptDecl;
            fn name(c: &CryptDecl) -> &str {
                &c.name
            }
            fn bases(c: &CryptDecl) -> Vec<BaseRef<'_>> {
                one_base(&c.base)
            }
            fn validate(c: &CryptDecl) -> Result<(), BdevError> {
                c.validate()
            }
            fn check(c: &CryptDecl) -> Result<(), BdevError> {
                check_key(&c.key_file, &c.key_hex, $key_len)
            }
            fn build(
                c: &CryptDecl,
                base: Vec<Arc<dyn Bdev>>,
            ) -> Result<Arc<dyn Bdev>, BdevError> {
                let base = need_base(base)?;
                let key = load_key(&c.key_file, &c.key_hex)?;
                let open: fn(&str, Arc<dyn Bdev>, Key) -> Result<Arc<dyn Bdev>, BdevError> = $open;
                open(&c.name, base, key)
            }
            fn inline_secret(c: &CryptDecl) -> Option<&'static str> {
                c.key_hex.as_ref().map(|_| "key_hex")
            }
            fn same_inline_secret(a: &CryptDecl, b: &CryptDecl) -> bool {
                a.key_hex.is_some() && a.key_hex == b.key_hex
            }
            fn copy_inline_secret(from: &CryptDecl, to: &mut CryptDecl) {
                if from.key_hex.is_some() {
                    to.key_hex = from.key_hex.clone();
                }
            }
        }
    };
}

crypt_kind!(
    /// `kind = "crypt_xts"`: AES-256-XTS, dm-crypt `aes-xts-plain64` compatible.
    CryptXtsKind,
    crate::xts::KIND,
    XTS_KEY_LEN,
    |name, base, key| Ok(Arc::new(XtsBdev::new(name, base, key)?))
);
crypt_kind!(
    /// `kind = "crypt_gcm"`: AES-256-GCM authenticated encryption.
    CryptGcmKind,
    crate::gcm::KIND,
    AES256_KEY_LEN,
    |name, base, key| Ok(Arc::new(GcmBdev::open(name, base, key)?))
);

#[cfg(test)]
mod tests {
    use super::*;
    use ferroblk_bdev::BlockSize;
    use ferroblk_bdev::malloc::MallocBdev;

    const HEX128: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                          202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f";

    fn malloc() -> Arc<dyn Bdev> {
        Arc::new(MallocBdev::new("m", BlockSize::B4096, 256, 256).unwrap())
    }

    #[test]
    fn xts_spec_parses_builds_and_hides_the_key() {
        let s: XtsDecl = toml::from_str(&format!(
            "name = \"x\"\nbase = \"m\"\nkey_hex = \"{HEX128}\"\n"
        ))
        .unwrap();
        s.validate().unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(&HEX128[..32]), "{dbg}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains(&HEX128[..32]), "{json}");
        let b = CryptXtsKind::build(&s, vec![malloc()]).unwrap();
        assert_eq!(b.info().kind(), crate::xts::KIND);
    }

    #[test]
    fn unknown_fields_and_two_key_sources_are_refused() {
        let e = toml::from_str::<GcmDecl>("name = \"g\"\nbase = \"m\"\nkey = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let both: GcmDecl = toml::from_str(&format!(
            "name = \"g\"\nbase = \"m\"\nkey_file = \"/k\"\nkey_hex = \"{}\"\n",
            &HEX128[..64]
        ))
        .unwrap();
        assert_eq!(both.validate().unwrap_err().field(), Some("key_file"));
        let none: GcmDecl = toml::from_str("name = \"g\"\nbase = \"m\"\n").unwrap();
        assert!(none.validate().is_err());
    }

    #[test]
    fn bad_key_errors_name_the_field_without_the_key() {
        let s: GcmDecl = toml::from_str(&format!(
            "name = \"g\"\nbase = \"m\"\nkey_hex = \"{HEX128}\"\n"
        ))
        .unwrap();
        let e = CryptGcmKind::build(&s, vec![malloc()]).err().unwrap();
        assert_eq!(e.field(), Some("key"), "{e}");
        assert!(!e.to_string().contains(&HEX128[..16]), "{e}");
    }

    #[test]
    fn crypt_kinds_check_keys_and_keep_inline_ones_apart() {
        let mut kinds = Kinds::core();
        add_kinds(&mut kinds);
        let parse = |v| kinds.parse(v).unwrap();
        let gcm = parse(serde_json::json!({
            "kind": "crypt_gcm", "name": "g", "base": "m", "key_hex": &HEX128[..64]
        }));
        let xts = parse(serde_json::json!({
            "kind": "crypt_xts", "name": "g", "base": "m", "key_hex": &HEX128[..64]
        }));
        assert_eq!(gcm.inline_secret(), Some("key_hex"));
        assert!(gcm.same_inline_secret(&gcm.clone()));
        // Same text, other kind: not the same secret.
        assert!(!gcm.same_inline_secret(&xts));
        gcm.check().unwrap();
        // 32 bytes where XTS takes 64: check-config names the field.
        assert_eq!(xts.check().unwrap_err().field(), Some("key_hex"));
        assert!(!gcm.to_json().to_string().contains(&HEX128[..16]));
        // A saved declaration without its key takes it back from the configuration's.
        let mut saved = parse(serde_json::json!({
            "kind": "crypt_gcm", "name": "g", "base": "m", "key_file": "/k"
        }));
        assert_eq!(saved.inline_secret(), None);
        gcm.copy_inline_secret(&mut saved);
        assert!(saved.same_inline_secret(&gcm));
        let c = saved.config::<CryptGcmKind>().unwrap();
        assert!(c.key_hex.is_some());
    }
}
