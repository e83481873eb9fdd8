//! Every kind of bdev the daemon can declare, in one serde enum tagged by `kind`: the kinds of
//! `ferroblk-bdev` and those of the crates that add their own (encryption). The config file's
//! `[[bdev]]` tables and the `bdev_create` RPC parse this same type.

use std::sync::Arc;

use ferroblk_bdev::spec::{
    BdevDecl, CompressSpec, CrcSpec, DelaySpec, ErrorSpec, FileSpec, MallocSpec, NullSpec,
};
use ferroblk_bdev::{Bdev, BdevError, BdevSpec};
use ferroblk_crypto::spec::{GcmSpec, XtsSpec};
use serde::{Deserialize, Deserializer, Serialize};

/// One `[[bdev]]` declaration.
///
/// Deserialized by hand rather than as a serde internally tagged enum: serde buffers such an
/// enum's table and loses the path inside it, so `block_size = "4k"` could only be reported
/// against the whole `bdev[0]`. [`Decl::from_json`] reads `kind`, then the kind's fields with
/// their paths; a failure displays as `field.path: message` ([`DeclError`]), which
/// [`field_path`] splits back into the path of the field.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decl {
    /// RAM.
    Malloc(MallocSpec),
    /// Discards writes (benchmarks).
    Null(NullSpec),
    /// Regular file or block device.
    File(FileSpec),
    /// Fails chosen operations of its base.
    Error(ErrorSpec),
    /// Delays completions of its base.
    Delay(DelaySpec),
    /// A CRC32C per block of its base, verified on read.
    Crc(CrcSpec),
    /// Compresses chunks of a logical space into a smaller base.
    Compress(CompressSpec),
    /// AES-256-XTS encryption, dm-crypt `aes-xts-plain64` compatible.
    CryptXts(XtsSpec),
    /// AES-256-GCM authenticated encryption.
    CryptGcm(GcmSpec),
}

/// Every `kind` a declaration may name, as written in the configuration.
pub const KINDS: &[&str] = &[
    "malloc",
    "null",
    "file",
    "error",
    "delay",
    "crc",
    "compress",
    "crypt_xts",
    "crypt_gcm",
];

/// A declaration that failed to deserialize: the path of the field inside it, and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DeclError {
    /// Path of the field within the declaration (`block_size`, `kind`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
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
        fn spec<T: serde::de::DeserializeOwned>(
            v: serde_json::Map<String, serde_json::Value>,
        ) -> Result<T, DeclError> {
            serde_path_to_error::deserialize(serde_json::Value::Object(v)).map_err(|e| {
                let (field, message) =
                    field_path("", &e.path().to_string(), &e.inner().to_string());
                DeclError { field, message }
            })
        }
        let kinds = || {
            KINDS
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let serde_json::Value::Object(mut m) = v else {
            return Err(DeclError {
                field: ".".into(),
                message: format!("expected a table with a `kind`, found {v}"),
            });
        };
        let kind = match m.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            Some(other) => {
                return Err(DeclError {
                    field: "kind".into(),
                    message: format!("invalid type: {other}, expected one of {}", kinds()),
                });
            }
            None => {
                return Err(DeclError {
                    field: "kind".into(),
                    message: format!("missing field `kind` (one of {})", kinds()),
                });
            }
        };
        Ok(match kind.as_str() {
            "malloc" => Decl::Malloc(spec(m)?),
            "null" => Decl::Null(spec(m)?),
            "file" => Decl::File(spec(m)?),
            "error" => Decl::Error(spec(m)?),
            "delay" => Decl::Delay(spec(m)?),
            "crc" => Decl::Crc(spec(m)?),
            "compress" => Decl::Compress(spec(m)?),
            "crypt_xts" => Decl::CryptXts(spec(m)?),
            "crypt_gcm" => Decl::CryptGcm(spec(m)?),
            other => {
                return Err(DeclError {
                    field: "kind".into(),
                    message: format!("unknown kind `{other}`, expected one of {}", kinds()),
                });
            }
        })
    }

    /// The core kinds as the bdev crate's own declaration.
    fn core(&self) -> Option<BdevSpec> {
        Some(match self {
            Decl::Malloc(s) => BdevSpec::Malloc(s.clone()),
            Decl::Null(s) => BdevSpec::Null(s.clone()),
            Decl::File(s) => BdevSpec::File(s.clone()),
            Decl::Error(s) => BdevSpec::Error(s.clone()),
            Decl::Delay(s) => BdevSpec::Delay(s.clone()),
            Decl::Crc(s) => BdevSpec::Crc(s.clone()),
            Decl::Compress(s) => BdevSpec::Compress(s.clone()),
            _ => return None,
        })
    }
}

impl BdevDecl for Decl {
    fn name(&self) -> &str {
        match self {
            Decl::Malloc(s) => &s.name,
            Decl::Null(s) => &s.name,
            Decl::File(s) => &s.name,
            Decl::Error(s) => &s.name,
            Decl::Delay(s) => &s.name,
            Decl::Crc(s) => &s.name,
            Decl::Compress(s) => &s.name,
            Decl::CryptXts(s) => &s.name,
            Decl::CryptGcm(s) => &s.name,
        }
    }

    fn kind(&self) -> &str {
        match self {
            Decl::CryptXts(_) => "crypt_xts",
            Decl::CryptGcm(_) => "crypt_gcm",
            core => match core.core() {
                Some(c) => c.kind(),
                None => "unknown",
            },
        }
    }

    fn base(&self) -> Option<&str> {
        match self {
            Decl::Error(s) => Some(&s.base),
            Decl::Delay(s) => Some(&s.base),
            Decl::Crc(s) => Some(&s.base),
            Decl::Compress(s) => Some(&s.base),
            Decl::CryptXts(s) => Some(&s.base),
            Decl::CryptGcm(s) => Some(&s.base),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), BdevError> {
        ferroblk_bdev::spec::validate_name(self.name())?;
        match self {
            Decl::CryptXts(s) => s.validate(),
            Decl::CryptGcm(s) => s.validate(),
            core => core.core().map_or(Ok(()), |c| c.validate()),
        }
    }

    fn build(&self, base: Option<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        self.validate()?;
        let need_base = || {
            base.clone()
                .ok_or_else(|| BdevError::invalid("base", "the base bdev is missing"))
        };
        match self {
            Decl::CryptXts(s) => s.build(need_base()?),
            Decl::CryptGcm(s) => s.build(need_base()?),
            core => core
                .core()
                .ok_or_else(|| BdevError::invalid("kind", "unknown kind"))?
                .build(base),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        // The crypto specs serialize their keys as "<redacted>".
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Turns a deserialization failure into the full path of the field it is about and a message
/// that does not repeat it. `prefix` is where the deserialized value sits (`bdev[0]`, or empty),
/// `path` what `serde_path_to_error` tracked below it (`.` for the value itself), `message` the
/// error's text. Three cases name the field only in the text, and are moved into the path: a
/// [`DeclError`] (`block_size: invalid type: ...`), `missing field `x``, `unknown field `x``.
pub fn field_path(prefix: &str, path: &str, message: &str) -> (String, String) {
    let join = |a: &str, b: &str| -> String {
        match (a, b) {
            ("", b) => b.to_string(),
            (a, "") => a.to_string(),
            (a, b) if b.starts_with('[') => format!("{a}{b}"),
            (a, b) => format!("{a}.{b}"),
        }
    };
    let mut full = join(prefix, if path == "." { "" } else { path });
    let mut message = message.to_string();
    // A declaration's own error: `field.path: message`, possibly nested.
    while let Some((head, rest)) = message.split_once(": ") {
        if !is_field_path(head) {
            break;
        }
        full = join(&full, head);
        message = rest.to_string();
    }
    for what in ["missing field `", "unknown field `"] {
        if let Some(rest) = message.strip_prefix(what)
            && let Some((name, _)) = rest.split_once('`')
            && full != name
            && !full.ends_with(&format!(".{name}"))
        {
            full = join(&full, name);
        }
    }
    (full, message)
}

/// `name`, `ops[0]`, `namespace[1].bdev`: a field path as [`field_path`] writes one.
fn is_field_path(s: &str) -> bool {
    let mut chars = s.chars().peekable();
    let mut want_ident = true;
    while let Some(c) = chars.next() {
        if want_ident {
            if !(c.is_ascii_alphabetic() || c == '_') {
                return false;
            }
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                chars.next();
            }
            want_ident = false;
        } else if c == '.' {
            want_ident = true;
        } else if c == '[' {
            let mut digits = 0;
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
                digits += 1;
            }
            if digits == 0 || chars.next() != Some(']') {
                return false;
            }
        } else {
            return false;
        }
    }
    !s.is_empty() && !want_ident
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
        assert_eq!(w.bdev[1].base(), Some("m"));
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
    fn field_paths_join_without_repeating() {
        assert_eq!(
            field_path(
                "bdev[0]",
                ".",
                "block_size: invalid type: string \"4k\", expected u32"
            ),
            (
                "bdev[0].block_size".into(),
                "invalid type: string \"4k\", expected u32".into()
            )
        );
        assert_eq!(
            field_path("", "rule", "missing field `ops`"),
            ("rule.ops".into(), "missing field `ops`".into())
        );
        assert_eq!(
            field_path(
                "",
                "rule.ops[0]",
                "invalid type: integer `1`, expected a string"
            ),
            (
                "rule.ops[0]".into(),
                "invalid type: integer `1`, expected a string".into()
            )
        );
        assert_eq!(
            field_path("", "sizee", "unknown field `sizee`, expected `name`"),
            (
                "sizee".into(),
                "unknown field `sizee`, expected `name`".into()
            )
        );
        // Ordinary messages with colons are left alone.
        assert_eq!(
            field_path("x", ".", "invalid type: map").1,
            "invalid type: map"
        );
        // Already the last segment: not appended twice; a longer name ending alike is not it.
        assert_eq!(
            field_path("", "reactors.bogus", "unknown field `bogus`").0,
            "reactors.bogus"
        );
        assert_eq!(
            field_path("", "x.abogus", "unknown field `bogus`").0,
            "x.abogus.bogus"
        );
        assert!(!is_field_path("invalid type"));
        assert!(is_field_path("namespace[1].bdev"));
        assert!(!is_field_path("a[]"));
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
        assert_eq!(w.bdev[2].base(), Some("z"));
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
