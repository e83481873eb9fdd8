//! Every kind of bdev the daemon can declare, in one serde enum tagged by `kind`: the kinds of
//! `ferroblk-bdev` and those of the crates that add their own (encryption). The config file's
//! `[[bdev]]` tables and the `bdev_create` RPC parse this same type.

use std::sync::Arc;

use ferroblk_bdev::spec::{
    BdevDecl, CompressSpec, CrcSpec, DelaySpec, ErrorSpec, FileSpec, MallocSpec, NullSpec,
};
use ferroblk_bdev::{Bdev, BdevError, BdevSpec};
use ferroblk_crypto::spec::{GcmSpec, XtsSpec};
use serde::{Deserialize, Serialize};

/// One `[[bdev]]` declaration.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

impl Decl {
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
