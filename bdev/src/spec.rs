//! Declarations of bdevs: one serde struct per kind, shared by the config file and the RPC, so
//! a field means the same thing everywhere. Unknown fields are rejected.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bdev::Bdev;
use crate::compress::{Algorithm, CompressBdev, CompressOptions, DEFAULT_CHUNK_SIZE};
use crate::crc::CrcBdev;
use crate::error::BdevError;
use crate::file::{DirectMode, FileBdev, FileOptions};
use crate::inject::{DelayBdev, Delays, ErrorBdev, ErrorRule};
use crate::malloc::{MallocBdev, NullBdev};
use crate::stacked::Format;
use crate::types::{BlockSize, parse_size};

/// A size in bytes, written as an integer or a string with a binary unit (`"1GiB"`, `"512K"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size in bytes: an integer or a string such as \"1GiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).ok_or_else(|| {
                    E::custom(format!(
                        "'{v}' is not a size (use bytes or a unit: B, KiB, MiB, GiB, TiB)"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

fn default_block_size() -> u32 {
    4096
}

/// Declaration of one bdev; `kind` selects the variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BdevSpec {
    /// A RAM bdev.
    Malloc(MallocSpec),
    /// A bdev that discards writes and returns reads untouched (benchmarks).
    Null(NullSpec),
    /// A regular file or block device.
    File(FileSpec),
    /// Fails chosen operations of its base.
    Error(ErrorSpec),
    /// Delays completions of its base.
    Delay(DelaySpec),
    /// A CRC32C per block of its base, verified on read.
    Crc(CrcSpec),
    /// Compresses chunks of a logical space into a smaller base.
    Compress(CompressSpec),
}

/// `kind = "malloc"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocSpec {
    /// Unique name.
    pub name: String,
    /// Size in bytes.
    pub size: ByteSize,
    /// 512 or 4096 (default 4096).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Largest size a resize may grow it to (default: 4 × size); only address space is reserved.
    #[serde(default)]
    pub max_size: Option<ByteSize>,
}

/// `kind = "null"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullSpec {
    /// Unique name.
    pub name: String,
    /// Size in bytes.
    pub size: ByteSize,
    /// 512 or 4096 (default 4096).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
}

/// `kind = "file"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Unique name.
    pub name: String,
    /// Regular file or block device; relative paths resolve against the working directory.
    pub path: std::path::PathBuf,
    /// Size in bytes: needed to create the file, checked against an existing one.
    #[serde(default)]
    pub size: Option<ByteSize>,
    /// 512 or 4096 (default 4096).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Create the file (and its directory) if missing (default false).
    #[serde(default)]
    pub create: bool,
    /// `auto` (default), `always` or `never`.
    #[serde(default)]
    pub direct: DirectMode,
    /// Open read-only (default false).
    #[serde(default)]
    pub read_only: bool,
}

impl FileSpec {
    fn options(&self) -> Result<FileOptions, BdevError> {
        Ok(FileOptions {
            path: self.path.clone(),
            block_size: block_size(self.block_size)?,
            size: self.size.map(|b| b.0),
            create: self.create,
            direct: self.direct,
            read_only: self.read_only,
        })
    }

    /// Runs every check opening runs (a missing file without `create`, the file type, access,
    /// an existing file's size against `size`) without creating, locking or changing anything:
    /// what `check-config` runs.
    pub fn check(&self) -> Result<(), BdevError> {
        FileBdev::check(&self.options()?)
    }
}

/// `kind = "error"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorSpec {
    /// Unique name.
    pub name: String,
    /// The bdev it stacks on.
    pub base: String,
    /// A rule armed from the start (default: none; arm one with `bdev_error_inject`).
    #[serde(default)]
    pub inject: Option<ErrorRule>,
}

/// `kind = "delay"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelaySpec {
    /// Unique name.
    pub name: String,
    /// The bdev it stacks on.
    pub base: String,
    /// Microseconds added to reads.
    #[serde(default)]
    pub read_us: u64,
    /// Microseconds added to writes.
    #[serde(default)]
    pub write_us: u64,
    /// Microseconds added to flush, unmap and write-zeroes.
    #[serde(default)]
    pub other_us: u64,
}

/// `kind = "crc"`: a CRC32C per block of `base`, kept at its end (the crc bdev is about 0.1%
/// smaller); formatted on first open of a base whose block 0 is zero.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrcSpec {
    /// Unique name.
    pub name: String,
    /// The bdev it stacks on.
    pub base: String,
    /// `if_zero` (default): format only a base whose block 0 is zero; `if_unformatted`: also
    /// one whose block 0 has no crc magic (a base that does not read zeroes when new, such as
    /// `crypt_xts` on a new file).
    #[serde(default)]
    pub format: Format,
}

fn default_chunk_size() -> ByteSize {
    ByteSize(u64::from(DEFAULT_CHUNK_SIZE))
}

/// `kind = "compress"`: a logical space of `size` bytes whose chunks are compressed into
/// `base`; formatted on first open of a base whose block 0 is zero.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressSpec {
    /// Unique name.
    pub name: String,
    /// The bdev it stacks on.
    pub base: String,
    /// Logical size in bytes (a multiple of `chunk_size`; may exceed the base's).
    pub size: ByteSize,
    /// Unit of compression: a power of two from 4 KiB to 64 KiB (default 16 KiB).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: ByteSize,
    /// `lz4` (default) or `zstd`, for chunks written from now on.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// zstd level, 1-22 (default 3); only with `algorithm = "zstd"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd_level: Option<i32>,
    /// `if_zero` (default) or `if_unformatted`, as for `crc`.
    #[serde(default)]
    pub format: Format,
}

impl CompressSpec {
    /// The bdev's options; errors name the field.
    pub fn options(&self) -> Result<CompressOptions, BdevError> {
        let chunk_size = u32::try_from(self.chunk_size.0).map_err(|_| {
            BdevError::invalid("chunk_size", "is not a power of two from 4 KiB to 64 KiB")
        })?;
        if self.zstd_level.is_some() && self.algorithm != Algorithm::Zstd {
            return Err(BdevError::invalid(
                "zstd_level",
                "is only for algorithm = \"zstd\"",
            ));
        }
        let mut o = CompressOptions::new(self.size.0);
        o.chunk_size = chunk_size;
        o.algorithm = self.algorithm;
        if let Some(l) = self.zstd_level {
            o.zstd_level = l;
        }
        o.format = self.format;
        o.validate(None)?;
        Ok(o)
    }
}

fn block_size(bytes: u32) -> Result<BlockSize, BdevError> {
    BlockSize::new(bytes).ok_or_else(|| {
        BdevError::invalid(
            "block_size",
            format!("{bytes} is not supported (512 or 4096)"),
        )
    })
}

fn blocks(size: ByteSize, bs: BlockSize) -> Result<u64, BdevError> {
    let b = u64::from(bs.bytes());
    if size.0 == 0 || !size.0.is_multiple_of(b) {
        return Err(BdevError::invalid(
            "size",
            format!(
                "{} bytes is not a positive multiple of block_size {b}",
                size.0
            ),
        ));
    }
    Ok(size.0 / b)
}

/// A declaration of one bdev of any kind. The registry and the config loader need only this,
/// so crates that add kinds (encryption, ...) declare them with their own structs and the
/// daemon composes one enum over all of them.
pub trait BdevDecl: Send + Sync + std::fmt::Debug {
    /// The bdev's name.
    fn name(&self) -> &str;
    /// The kind name (`malloc`, `crypt_xts`, ...).
    fn kind(&self) -> &str;
    /// The base it stacks on, for stacked kinds.
    fn base(&self) -> Option<&str>;
    /// Checks what needs no other bdev; errors name the field.
    fn validate(&self) -> Result<(), BdevError>;
    /// Creates the bdev on its (already created) base.
    fn build(&self, base: Option<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError>;
    /// The declaration as JSON for `bdev_list`, with secrets redacted.
    fn to_json(&self) -> serde_json::Value;
}

impl BdevDecl for BdevSpec {
    fn name(&self) -> &str {
        BdevSpec::name(self)
    }
    fn kind(&self) -> &str {
        BdevSpec::kind(self)
    }
    fn base(&self) -> Option<&str> {
        BdevSpec::base(self)
    }
    fn validate(&self) -> Result<(), BdevError> {
        BdevSpec::validate(self)
    }
    fn build(&self, base: Option<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        BdevSpec::build(self, base)
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

impl<T: BdevDecl + ?Sized> BdevDecl for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn kind(&self) -> &str {
        (**self).kind()
    }
    fn base(&self) -> Option<&str> {
        (**self).base()
    }
    fn validate(&self) -> Result<(), BdevError> {
        (**self).validate()
    }
    fn build(&self, base: Option<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        (**self).build(base)
    }
    fn to_json(&self) -> serde_json::Value {
        (**self).to_json()
    }
}

/// Checks a bdev name: 1-64 characters of `A-Z a-z 0-9 - _ . :`.
pub fn validate_name(name: &str) -> Result<(), BdevError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(BdevError::invalid(
            "name",
            format!("'{name}' must be 1-64 characters of A-Z a-z 0-9 - _ . :"),
        ));
    }
    Ok(())
}

impl BdevSpec {
    /// The bdev's name.
    pub fn name(&self) -> &str {
        match self {
            BdevSpec::Malloc(s) => &s.name,
            BdevSpec::Null(s) => &s.name,
            BdevSpec::File(s) => &s.name,
            BdevSpec::Error(s) => &s.name,
            BdevSpec::Delay(s) => &s.name,
            BdevSpec::Crc(s) => &s.name,
            BdevSpec::Compress(s) => &s.name,
        }
    }

    /// The kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            BdevSpec::Malloc(_) => "malloc",
            BdevSpec::Null(_) => "null",
            BdevSpec::File(_) => "file",
            BdevSpec::Error(_) => "error",
            BdevSpec::Delay(_) => "delay",
            BdevSpec::Crc(_) => crate::crc::KIND,
            BdevSpec::Compress(_) => crate::compress::KIND,
        }
    }

    /// The base it stacks on, for stacked kinds.
    pub fn base(&self) -> Option<&str> {
        match self {
            BdevSpec::Error(s) => Some(&s.base),
            BdevSpec::Delay(s) => Some(&s.base),
            BdevSpec::Crc(s) => Some(&s.base),
            BdevSpec::Compress(s) => Some(&s.base),
            _ => None,
        }
    }

    /// Checks the values that need no other bdev (names, sizes, block sizes, rules).
    pub fn validate(&self) -> Result<(), BdevError> {
        validate_name(self.name())?;
        match self {
            BdevSpec::Malloc(s) => {
                let bs = block_size(s.block_size)?;
                blocks(s.size, bs)?;
                if let Some(m) = s.max_size {
                    blocks(m, bs).map_err(|_| {
                        BdevError::invalid("max_size", "must be a multiple of block_size")
                    })?;
                    if m < s.size {
                        return Err(BdevError::invalid("max_size", "is smaller than size"));
                    }
                }
            }
            BdevSpec::Null(s) => {
                blocks(s.size, block_size(s.block_size)?)?;
            }
            BdevSpec::File(s) => {
                let bs = block_size(s.block_size)?;
                if let Some(size) = s.size {
                    blocks(size, bs)?;
                }
                if s.path.as_os_str().is_empty() {
                    return Err(BdevError::invalid("path", "is empty"));
                }
            }
            BdevSpec::Error(s) => {
                if let Some(r) = &s.inject {
                    r.validate("inject")?;
                }
            }
            BdevSpec::Delay(_) | BdevSpec::Crc(_) => {}
            BdevSpec::Compress(s) => {
                s.options()?;
            }
        }
        Ok(())
    }

    /// Creates the bdev; `base` is the already created base of a stacked kind.
    pub fn build(&self, base: Option<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        self.validate()?;
        let need_base = || {
            base.clone()
                .ok_or_else(|| BdevError::invalid("base", "the base bdev is missing"))
        };
        Ok(match self {
            BdevSpec::Malloc(s) => {
                let bs = block_size(s.block_size)?;
                let n = blocks(s.size, bs)?;
                let max = match s.max_size {
                    Some(m) => blocks(m, bs)?,
                    None => n.saturating_mul(4),
                };
                Arc::new(MallocBdev::new(&s.name, bs, n, max)?)
            }
            BdevSpec::Null(s) => {
                let bs = block_size(s.block_size)?;
                Arc::new(NullBdev::new(&s.name, bs, blocks(s.size, bs)?)?)
            }
            BdevSpec::File(s) => Arc::new(FileBdev::open(&s.name, &s.options()?)?),
            BdevSpec::Error(s) => {
                Arc::new(ErrorBdev::new(&s.name, need_base()?, s.inject.clone())?)
            }
            BdevSpec::Delay(s) => Arc::new(DelayBdev::new(
                &s.name,
                need_base()?,
                Delays {
                    read: Duration::from_micros(s.read_us),
                    write: Duration::from_micros(s.write_us),
                    other: Duration::from_micros(s.other_us),
                },
            )),
            BdevSpec::Crc(s) => Arc::new(CrcBdev::open_with(&s.name, need_base()?, s.format)?),
            BdevSpec::Compress(s) => {
                Arc::new(CompressBdev::open(&s.name, need_base()?, &s.options()?)?)
            }
        })
    }
}

/// A problem found in a list of declarations: the index of the offending entry and the error.
#[derive(Debug)]
pub struct SpecError {
    /// Index into the list.
    pub index: usize,
    /// What is wrong; `field()` names the field.
    pub error: BdevError,
}

/// Checks a list of declarations as a whole (unique names, bases that exist, no cycles) and
/// returns the order to create them in: every base before the bdevs stacked on it.
/// `existing` names bdevs that exist already and may serve as bases.
pub fn creation_order<D: BdevDecl>(
    specs: &[D],
    existing: &dyn Fn(&str) -> bool,
) -> Result<Vec<usize>, SpecError> {
    let mut by_name = std::collections::HashMap::new();
    for (i, s) in specs.iter().enumerate() {
        s.validate()
            .map_err(|error| SpecError { index: i, error })?;
        if by_name.insert(s.name(), i).is_some() || existing(s.name()) {
            return Err(SpecError {
                index: i,
                error: BdevError::invalid("name", format!("'{}' is declared twice", s.name())),
            });
        }
    }
    for (i, s) in specs.iter().enumerate() {
        if let Some(b) = s.base()
            && !by_name.contains_key(b)
            && !existing(b)
        {
            return Err(SpecError {
                index: i,
                error: BdevError::invalid("base", format!("no bdev named '{b}'")),
            });
        }
    }
    // Depth-first topological sort; a grey node met again is a cycle.
    let mut state = vec![0u8; specs.len()];
    let mut order = Vec::with_capacity(specs.len());
    for start in 0..specs.len() {
        let mut path = Vec::new();
        let mut cur = start;
        loop {
            if state[cur] == 2 {
                break;
            }
            if state[cur] == 1 {
                let names: Vec<&str> = path.iter().map(|&i: &usize| specs[i].name()).collect();
                return Err(SpecError {
                    index: cur,
                    error: BdevError::invalid(
                        "base",
                        format!(
                            "stacking cycle: {} -> {}",
                            names.join(" -> "),
                            specs[cur].name()
                        ),
                    ),
                });
            }
            state[cur] = 1;
            path.push(cur);
            match specs[cur].base().and_then(|b| by_name.get(b)) {
                Some(&next) => cur = next,
                None => break,
            }
        }
        for &i in path.iter().rev() {
            if state[i] == 1 {
                state[i] = 2;
                order.push(i);
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(toml_text: &str) -> Vec<BdevSpec> {
        #[derive(Deserialize)]
        struct W {
            bdev: Vec<BdevSpec>,
        }
        toml::from_str::<W>(toml_text).unwrap().bdev
    }

    #[test]
    fn sizes_parse_from_numbers_and_strings() {
        let s = specs(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"1MiB\"\n\
             [[bdev]]\nkind = \"null\"\nname = \"n\"\nsize = 8192\nblock_size = 512\n",
        );
        assert_eq!(s[0].name(), "m");
        assert!(matches!(&s[0], BdevSpec::Malloc(m) if m.size == ByteSize(1 << 20)));
        assert!(matches!(&s[1], BdevSpec::Null(n) if n.block_size == 512));
    }

    #[test]
    fn order_puts_bases_first_and_finds_cycles() {
        let s = specs(
            "[[bdev]]\nkind = \"error\"\nname = \"e\"\nbase = \"d\"\n\
             [[bdev]]\nkind = \"delay\"\nname = \"d\"\nbase = \"m\"\n\
             [[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 4096\n",
        );
        let order = creation_order(&s, &|_| false).unwrap();
        let names: Vec<_> = order.iter().map(|&i| s[i].name()).collect();
        assert_eq!(names, ["m", "d", "e"]);

        let cyc = specs(
            "[[bdev]]\nkind = \"error\"\nname = \"a\"\nbase = \"b\"\n\
             [[bdev]]\nkind = \"delay\"\nname = \"b\"\nbase = \"a\"\n",
        );
        let e = creation_order(&cyc, &|_| false).unwrap_err();
        assert!(e.error.to_string().contains("cycle"), "{}", e.error);
    }

    #[test]
    fn crc_and_compress_parse_validate_and_build() {
        let s = specs(
            "[[bdev]]\nkind = \"crc\"\nname = \"c\"\nbase = \"z\"\n\
             [[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\nsize = \"8MiB\"\n\
             algorithm = \"zstd\"\nzstd_level = 5\nchunk_size = \"32KiB\"\n\
             [[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"4MiB\"\n",
        );
        let order = creation_order(&s, &|_| false).unwrap();
        let names: Vec<_> = order.iter().map(|&i| s[i].name()).collect();
        assert_eq!(names, ["m", "z", "c"]);
        let reg = crate::BdevRegistry::new();
        reg.create_all(&s).unwrap();
        let c = reg.get("c").unwrap();
        assert_eq!(c.info().kind(), "crc");
        assert_eq!(reg.get("z").unwrap().info().block_count(), 2048);
        assert_eq!(reg.get("z").unwrap().describe()["algorithm"], "zstd");
        let json = serde_json::to_value(&s[1]).unwrap();
        assert_eq!(json["kind"], "compress");
        assert_eq!(json["chunk_size"], 32768);
    }

    #[test]
    fn compress_values_name_their_field() {
        let bad = |extra: &str| {
            let s = specs(&format!(
                "[[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\n{extra}\n\
                 [[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"4MiB\"\n"
            ));
            creation_order(&s, &|_| false)
                .unwrap_err()
                .error
                .field()
                .map(str::to_string)
        };
        assert_eq!(bad("size = \"1000KiB\""), Some("size".into()));
        assert_eq!(
            bad("size = \"1MiB\"\nchunk_size = \"24KiB\""),
            Some("chunk_size".into())
        );
        assert_eq!(
            bad("size = \"1MiB\"\nchunk_size = \"128KiB\""),
            Some("chunk_size".into())
        );
        assert_eq!(
            bad("size = \"1MiB\"\nzstd_level = 3"),
            Some("zstd_level".into())
        );
        assert_eq!(
            bad("size = \"1MiB\"\nalgorithm = \"zstd\"\nzstd_level = 40"),
            Some("zstd_level".into())
        );
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct W {
            bdev: Vec<BdevSpec>,
        }
        let e = toml::from_str::<W>(
            "[[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\nsize = 4096\nlevel = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = toml::from_str::<W>(
            "[[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\nsize = 4096\nalgorithm = \"lzma\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lzma"), "{e}");
        let e =
            toml::from_str::<W>("[[bdev]]\nkind = \"crc\"\nname = \"c\"\nbase = \"m\"\nx = 1\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let s = specs("[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 1000\n");
        let e = creation_order(&s, &|_| false).unwrap_err();
        assert_eq!(e.error.field(), Some("size"));
        let s = specs("[[bdev]]\nkind = \"null\"\nname = \"n\"\nsize = 4096\nblock_size = 1024\n");
        assert_eq!(
            creation_order(&s, &|_| false).unwrap_err().error.field(),
            Some("block_size")
        );
        let s = specs("[[bdev]]\nkind = \"error\"\nname = \"e\"\nbase = \"nope\"\n");
        assert_eq!(
            creation_order(&s, &|_| false).unwrap_err().error.field(),
            Some("base")
        );
    }
}
