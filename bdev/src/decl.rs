//! Declarations of bdevs. A kind of bdev implements [`BdevKind`] once: its declaration's shape
//! (one serde struct, unknown fields rejected), its checks, its constructor and what the control
//! plane may change of it. [`Kinds`] is the list of kinds a program accepts: this crate's
//! ([`Kinds::core`]) and those other crates add ([`Kinds::add`]); it parses a `kind`-tagged
//! table into a [`BdevDecl`], the one type the config file, the RPC, the state file and the
//! [registry](crate::registry) share, so a field means the same thing everywhere.

use std::any::Any;
use std::fmt;
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

/// `kind = "malloc"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocDecl {
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
pub struct NullDecl {
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
pub struct FileDecl {
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

impl FileDecl {
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
pub struct ErrorDecl {
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
pub struct DelayDecl {
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
pub struct CrcDecl {
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
pub struct CompressDecl {
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

impl CompressDecl {
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

/// The block size of a declaration's `block_size` field (512 or 4096); errors name the field.
pub fn block_size(bytes: u32) -> Result<BlockSize, BdevError> {
    BlockSize::new(bytes).ok_or_else(|| {
        BdevError::invalid(
            "block_size",
            format!("{bytes} is not supported (512 or 4096)"),
        )
    })
}

/// The blocks of a declaration's `size` field, which must be a positive multiple of `bs`.
pub fn blocks(size: ByteSize, bs: BlockSize) -> Result<u64, BdevError> {
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

/// One kind of bdev, declared once: the shape of its declaration, its checks, its constructor
/// and what the control plane may change of it. [`Kinds`] lists the kinds a program accepts;
/// the config file, the RPC, the state file and the registry reach a kind only through it.
pub trait BdevKind: Send + Sync + 'static {
    /// The kind name, as `kind = "..."` writes it (`malloc`, `crypt_xts`, ...).
    const NAME: &'static str;
    /// The declaration's fields (besides `kind`); unknown fields should be rejected.
    type Config: Serialize
        + serde::de::DeserializeOwned
        + Clone
        + fmt::Debug
        + PartialEq
        + Send
        + Sync
        + 'static;

    /// The bdev's name.
    fn name(c: &Self::Config) -> &str;
    /// The bases it stacks on, for stacked kinds (one for most, several for `mirror`), each
    /// with the field that names it.
    fn bases(_c: &Self::Config) -> Vec<BaseRef<'_>> {
        Vec::new()
    }
    /// Checks the values that need no other bdev and no file (the name is checked apart);
    /// errors name the field.
    fn validate(_c: &Self::Config) -> Result<(), BdevError> {
        Ok(())
    }
    /// Runs the checks opening runs (files, keys) without creating or changing anything: what
    /// `check-config` runs after [`validate`](Self::validate).
    fn check(_c: &Self::Config) -> Result<(), BdevError> {
        Ok(())
    }
    /// Creates the bdev on `bases`, the already created bases of a stacked kind, in the order
    /// [`bases`](Self::bases) names them.
    fn build(c: &Self::Config, bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError>;
    /// Records that the bdev was resized to `bytes`, so that it is declared again at that size;
    /// kinds without a size ignore it.
    fn set_size(_c: &mut Self::Config, _bytes: u64) {}
    /// Records that the bases changed at run time (a mirror's children), so that it is declared
    /// again with them; kinds whose bases are fixed ignore it.
    fn set_bases(_c: &mut Self::Config, _bases: &[String]) {}
    /// The field of a secret given inline (`key_hex`) that this declaration carries, if any:
    /// it serializes redacted and is never saved in clear.
    fn inline_secret(_c: &Self::Config) -> Option<&'static str> {
        None
    }
    /// Whether `a` and `b` carry the same inline secret (compared in constant time).
    fn same_inline_secret(_a: &Self::Config, _b: &Self::Config) -> bool {
        false
    }
    /// Gives `to` the inline secret of `from` (a state file's declaration its key from the
    /// configuration's).
    fn copy_inline_secret(_from: &Self::Config, _to: &mut Self::Config) {}
}

/// A [`BdevKind`]'s declaration behind a vtable, so declarations of any kind share one type.
trait Declared: Send + Sync + fmt::Debug {
    fn kind(&self) -> &'static str;
    fn name(&self) -> &str;
    fn bases(&self) -> Vec<BaseRef<'_>>;
    fn validate(&self) -> Result<(), BdevError>;
    fn check(&self) -> Result<(), BdevError>;
    fn build(&self, bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError>;
    fn set_size(&mut self, bytes: u64);
    fn set_bases(&mut self, bases: &[String]);
    fn inline_secret(&self) -> Option<&'static str>;
    fn same_inline_secret(&self, other: &dyn Declared) -> bool;
    fn copy_inline_secret(&self, to: &mut dyn Declared);
    fn to_json(&self) -> serde_json::Value;
    fn clone_box(&self) -> Box<dyn Declared>;
    fn eq_dyn(&self, other: &dyn Declared) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The declaration of a bdev of kind `K`.
struct Typed<K: BdevKind>(K::Config);

impl<K: BdevKind> fmt::Debug for Typed<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple(K::NAME).field(&self.0).finish()
    }
}

impl<K: BdevKind> Declared for Typed<K> {
    fn kind(&self) -> &'static str {
        K::NAME
    }
    fn name(&self) -> &str {
        K::name(&self.0)
    }
    fn bases(&self) -> Vec<BaseRef<'_>> {
        K::bases(&self.0)
    }
    fn validate(&self) -> Result<(), BdevError> {
        K::validate(&self.0)
    }
    fn check(&self) -> Result<(), BdevError> {
        K::check(&self.0)
    }
    fn build(&self, bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        K::build(&self.0, bases)
    }
    fn set_size(&mut self, bytes: u64) {
        K::set_size(&mut self.0, bytes);
    }
    fn set_bases(&mut self, bases: &[String]) {
        K::set_bases(&mut self.0, bases);
    }
    fn inline_secret(&self) -> Option<&'static str> {
        K::inline_secret(&self.0)
    }
    fn same_inline_secret(&self, other: &dyn Declared) -> bool {
        other
            .as_any()
            .downcast_ref::<Typed<K>>()
            .is_some_and(|o| K::same_inline_secret(&self.0, &o.0))
    }
    fn copy_inline_secret(&self, to: &mut dyn Declared) {
        if let Some(t) = to.as_any_mut().downcast_mut::<Typed<K>>() {
            K::copy_inline_secret(&self.0, &mut t.0);
        }
    }
    fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("kind".into(), K::NAME.into());
        match serde_json::to_value(&self.0) {
            Ok(serde_json::Value::Object(fields)) => m.extend(fields),
            _ => return serde_json::Value::Null,
        }
        serde_json::Value::Object(m)
    }
    fn clone_box(&self) -> Box<dyn Declared> {
        Box::new(Typed::<K>(self.0.clone()))
    }
    fn eq_dyn(&self, other: &dyn Declared) -> bool {
        other
            .as_any()
            .downcast_ref::<Typed<K>>()
            .is_some_and(|o| o.0 == self.0)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The declaration of one bdev of any kind: what a `[[bdev]]` table of the configuration, the
/// `bdev_create` RPC and an entry of the state file hold. Made by [`Kinds::parse`] or
/// [`BdevDecl::new`]; serializes as the declaration is written (`kind` and the kind's fields),
/// with secrets redacted.
pub struct BdevDecl(Box<dyn Declared>);

impl BdevDecl {
    /// A declaration of kind `K`.
    pub fn new<K: BdevKind>(config: K::Config) -> BdevDecl {
        BdevDecl(Box::new(Typed::<K>(config)))
    }

    /// The kind name (`malloc`, `crypt_xts`, ...).
    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    /// The bdev's name.
    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// The names of the bases it stacks on (none for a base kind).
    pub fn bases(&self) -> Vec<&str> {
        self.0.bases().into_iter().map(|b| b.name).collect()
    }

    /// The bases it stacks on, each with the field that names it.
    pub fn base_refs(&self) -> Vec<BaseRef<'_>> {
        self.0.bases()
    }

    /// Whether it stacks on the bdev named `name`.
    pub fn stacks_on(&self, name: &str) -> bool {
        self.0.bases().iter().any(|b| b.name == name)
    }

    /// Checks what needs no other bdev (name, sizes, block sizes, rules); errors name the field.
    pub fn validate(&self) -> Result<(), BdevError> {
        validate_name(self.name())?;
        self.0.validate()
    }

    /// [`validate`](Self::validate), then every check opening runs without creating, locking
    /// or changing anything: what `check-config` runs.
    pub fn check(&self) -> Result<(), BdevError> {
        self.validate()?;
        self.0.check()
    }

    /// Creates the bdev on its (already created) bases, in the order [`bases`](Self::bases)
    /// names them.
    pub fn build(&self, bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        self.validate()?;
        self.0.build(bases)
    }

    /// Declares the bdev at its new size after a resize (kinds without a size ignore it).
    pub fn set_size(&mut self, bytes: u64) {
        self.0.set_size(bytes);
    }

    /// Declares the bdev with the bases it has now (kinds whose bases are fixed ignore it).
    pub fn set_bases(&mut self, bases: &[String]) {
        self.0.set_bases(bases);
    }

    /// The field of the secret given inline (`key_hex`) that it carries, if any.
    pub fn inline_secret(&self) -> Option<&'static str> {
        self.0.inline_secret()
    }

    /// Whether both carry the same inline secret (same kind, constant-time comparison).
    pub fn same_inline_secret(&self, other: &BdevDecl) -> bool {
        self.0.same_inline_secret(&*other.0)
    }

    /// Gives `to` this declaration's inline secret, if both are of the same kind.
    pub fn copy_inline_secret(&self, to: &mut BdevDecl) {
        self.0.copy_inline_secret(&mut *to.0);
    }

    /// The declaration as JSON, `kind` and the kind's fields, with secrets redacted (for `bdev_list`, the
    /// state file).
    pub fn to_json(&self) -> serde_json::Value {
        self.0.to_json()
    }

    /// The fields of a declaration of kind `K`.
    pub fn config<K: BdevKind>(&self) -> Option<&K::Config> {
        self.0.as_any().downcast_ref::<Typed<K>>().map(|t| &t.0)
    }
}

impl Clone for BdevDecl {
    fn clone(&self) -> BdevDecl {
        BdevDecl(self.0.clone_box())
    }
}

impl fmt::Debug for BdevDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq for BdevDecl {
    fn eq(&self, other: &BdevDecl) -> bool {
        self.0.eq_dyn(&*other.0)
    }
}

impl Serialize for BdevDecl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl AsRef<BdevDecl> for BdevDecl {
    fn as_ref(&self) -> &BdevDecl {
        self
    }
}

/// A declaration that failed to parse: the path of the field inside it, and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DeclError {
    /// Path of the field within the declaration (`block_size`, `kind`, `inject.ops[0]`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// One entry of [`Kinds`].
struct KindEntry {
    name: &'static str,
    parse: fn(serde_json::Value) -> Result<BdevDecl, DeclError>,
}

/// The kinds of bdev a program accepts, in one list: the only place a kind is named.
pub struct Kinds {
    entries: Vec<KindEntry>,
}

/// Parses the fields of a declaration of kind `K`, keeping the path of a wrong field.
fn parse_kind<K: BdevKind>(v: serde_json::Value) -> Result<BdevDecl, DeclError> {
    serde_path_to_error::deserialize::<_, K::Config>(v)
        .map(BdevDecl::new::<K>)
        .map_err(|e| {
            let (field, message) = field_path("", &e.path().to_string(), &e.inner().to_string());
            DeclError { field, message }
        })
}

impl Kinds {
    /// This crate's kinds: `malloc`, `null`, `file`, `error`, `delay`, `crc`, `compress`,
    /// `mirror`.
    pub fn core() -> Kinds {
        let mut k = Kinds {
            entries: Vec::new(),
        };
        k.add::<MallocKind>()
            .add::<NullKind>()
            .add::<FileKind>()
            .add::<ErrorKind>()
            .add::<DelayKind>()
            .add::<CrcKind>()
            .add::<CompressKind>()
            .add::<crate::mirror::MirrorKind>();
        k
    }

    /// Adds kind `K` (a crate that defines kinds offers a function adding them).
    ///
    /// # Panics
    /// If a kind of that name is listed already: a program error.
    pub fn add<K: BdevKind>(&mut self) -> &mut Kinds {
        assert!(
            self.entries.iter().all(|e| e.name != K::NAME),
            "bdev kind {} listed twice",
            K::NAME
        );
        self.entries.push(KindEntry {
            name: K::NAME,
            parse: parse_kind::<K>,
        });
        self
    }

    /// Every kind name, in the order listed.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.entries.iter().map(|e| e.name)
    }

    /// Parses one declaration from its JSON (or TOML, converted) form: `kind`, then that kind's
    /// fields; an error names the field that is wrong.
    pub fn parse(&self, v: serde_json::Value) -> Result<BdevDecl, DeclError> {
        let kinds = || {
            self.names()
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
        match self.entries.iter().find(|e| e.name == kind) {
            Some(e) => (e.parse)(serde_json::Value::Object(m)),
            None => Err(DeclError {
                field: "kind".into(),
                message: format!("unknown kind `{kind}`, expected one of {}", kinds()),
            }),
        }
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

/// A base a declaration names: the field that names it (`base`, `children[1]`) and the bdev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRef<'a> {
    /// Path of the field naming it, for errors.
    pub field: String,
    /// The base bdev's name.
    pub name: &'a str,
}

/// The one base of a kind whose field `base` names it.
pub fn one_base(name: &str) -> Vec<BaseRef<'_>> {
    vec![BaseRef {
        field: "base".into(),
        name,
    }]
}

/// The one base of a stacked kind, which the registry creates first.
pub fn need_base(bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
    bases
        .into_iter()
        .next()
        .ok_or_else(|| BdevError::invalid("base", "the base bdev is missing"))
}

/// `kind = "malloc"`: a RAM bdev.
pub struct MallocKind;

impl BdevKind for MallocKind {
    const NAME: &'static str = "malloc";
    type Config = MallocDecl;
    fn name(c: &MallocDecl) -> &str {
        &c.name
    }
    fn validate(s: &MallocDecl) -> Result<(), BdevError> {
        let bs = block_size(s.block_size)?;
        blocks(s.size, bs)?;
        if let Some(m) = s.max_size {
            blocks(m, bs)
                .map_err(|_| BdevError::invalid("max_size", "must be a multiple of block_size"))?;
            if m < s.size {
                return Err(BdevError::invalid("max_size", "is smaller than size"));
            }
        }
        Ok(())
    }
    fn build(s: &MallocDecl, _base: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        let bs = block_size(s.block_size)?;
        let n = blocks(s.size, bs)?;
        let max = match s.max_size {
            Some(m) => blocks(m, bs)?,
            None => n.saturating_mul(4),
        };
        Ok(Arc::new(MallocBdev::new(&s.name, bs, n, max)?))
    }
    fn set_size(c: &mut MallocDecl, bytes: u64) {
        c.size = ByteSize(bytes);
    }
}

/// `kind = "null"`: discards writes and returns reads untouched (benchmarks).
pub struct NullKind;

impl BdevKind for NullKind {
    const NAME: &'static str = "null";
    type Config = NullDecl;
    fn name(c: &NullDecl) -> &str {
        &c.name
    }
    fn validate(s: &NullDecl) -> Result<(), BdevError> {
        blocks(s.size, block_size(s.block_size)?).map(drop)
    }
    fn build(s: &NullDecl, _base: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        let bs = block_size(s.block_size)?;
        Ok(Arc::new(NullBdev::new(&s.name, bs, blocks(s.size, bs)?)?))
    }
    fn set_size(c: &mut NullDecl, bytes: u64) {
        c.size = ByteSize(bytes);
    }
}

/// `kind = "file"`: a regular file or block device.
pub struct FileKind;

impl BdevKind for FileKind {
    const NAME: &'static str = "file";
    type Config = FileDecl;
    fn name(c: &FileDecl) -> &str {
        &c.name
    }
    fn validate(s: &FileDecl) -> Result<(), BdevError> {
        let bs = block_size(s.block_size)?;
        if let Some(size) = s.size {
            blocks(size, bs)?;
        }
        if s.path.as_os_str().is_empty() {
            return Err(BdevError::invalid("path", "is empty"));
        }
        Ok(())
    }
    fn check(s: &FileDecl) -> Result<(), BdevError> {
        s.check()
    }
    fn build(s: &FileDecl, _base: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(FileBdev::open(&s.name, &s.options()?)?))
    }
    fn set_size(c: &mut FileDecl, bytes: u64) {
        c.size = Some(ByteSize(bytes));
    }
}

/// `kind = "error"`: fails chosen operations of its base.
pub struct ErrorKind;

impl BdevKind for ErrorKind {
    const NAME: &'static str = "error";
    type Config = ErrorDecl;
    fn name(c: &ErrorDecl) -> &str {
        &c.name
    }
    fn bases(c: &ErrorDecl) -> Vec<BaseRef<'_>> {
        one_base(&c.base)
    }
    fn validate(s: &ErrorDecl) -> Result<(), BdevError> {
        match &s.inject {
            Some(r) => r.validate("inject").map(drop),
            None => Ok(()),
        }
    }
    fn build(s: &ErrorDecl, base: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(ErrorBdev::new(
            &s.name,
            need_base(base)?,
            s.inject.clone(),
        )?))
    }
}

/// `kind = "delay"`: delays completions of its base.
pub struct DelayKind;

impl BdevKind for DelayKind {
    const NAME: &'static str = "delay";
    type Config = DelayDecl;
    fn name(c: &DelayDecl) -> &str {
        &c.name
    }
    fn bases(c: &DelayDecl) -> Vec<BaseRef<'_>> {
        one_base(&c.base)
    }
    fn build(s: &DelayDecl, base: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(DelayBdev::new(
            &s.name,
            need_base(base)?,
            Delays {
                read: Duration::from_micros(s.read_us),
                write: Duration::from_micros(s.write_us),
                other: Duration::from_micros(s.other_us),
            },
        )))
    }
}

/// `kind = "crc"`: a CRC32C per block of its base, verified on read.
pub struct CrcKind;

impl BdevKind for CrcKind {
    const NAME: &'static str = crate::crc::KIND;
    type Config = CrcDecl;
    fn name(c: &CrcDecl) -> &str {
        &c.name
    }
    fn bases(c: &CrcDecl) -> Vec<BaseRef<'_>> {
        one_base(&c.base)
    }
    fn build(s: &CrcDecl, base: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(CrcBdev::open_with(
            &s.name,
            need_base(base)?,
            s.format,
        )?))
    }
}

/// `kind = "compress"`: compresses chunks of a logical space into a smaller base.
pub struct CompressKind;

impl BdevKind for CompressKind {
    const NAME: &'static str = crate::compress::KIND;
    type Config = CompressDecl;
    fn name(c: &CompressDecl) -> &str {
        &c.name
    }
    fn bases(c: &CompressDecl) -> Vec<BaseRef<'_>> {
        one_base(&c.base)
    }
    fn validate(s: &CompressDecl) -> Result<(), BdevError> {
        s.options().map(drop)
    }
    fn build(s: &CompressDecl, base: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(CompressBdev::open(
            &s.name,
            need_base(base)?,
            &s.options()?,
        )?))
    }
    fn set_size(c: &mut CompressDecl, bytes: u64) {
        c.size = ByteSize(bytes);
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

/// A problem found in a list of declarations: the index of the offending entry and the error.
#[derive(Debug)]
pub struct DeclListError {
    /// Index into the list.
    pub index: usize,
    /// What is wrong; `field()` names the field.
    pub error: BdevError,
}

/// Checks a list of declarations as a whole (unique names, bases that exist, no cycles) and
/// returns the order to create them in: every base before the bdevs stacked on it.
/// `existing` names bdevs that exist already and may serve as bases.
pub fn creation_order<D: AsRef<BdevDecl>>(
    decls: &[D],
    existing: &dyn Fn(&str) -> bool,
) -> Result<Vec<usize>, DeclListError> {
    let decls: Vec<&BdevDecl> = decls.iter().map(AsRef::as_ref).collect();
    let mut by_name = std::collections::HashMap::new();
    for (i, s) in decls.iter().enumerate() {
        s.validate()
            .map_err(|error| DeclListError { index: i, error })?;
        if by_name.insert(s.name(), i).is_some() || existing(s.name()) {
            return Err(DeclListError {
                index: i,
                error: BdevError::invalid("name", format!("'{}' is declared twice", s.name())),
            });
        }
    }
    for (i, s) in decls.iter().enumerate() {
        for b in s.base_refs() {
            if !by_name.contains_key(b.name) && !existing(b.name) {
                return Err(DeclListError {
                    index: i,
                    error: BdevError::invalid(b.field, format!("no bdev named '{}'", b.name)),
                });
            }
        }
    }
    // Depth-first topological sort over every base; a grey node met again is a cycle.
    let mut state = vec![0u8; decls.len()];
    let mut order = Vec::with_capacity(decls.len());
    for start in 0..decls.len() {
        if state[start] != 0 {
            continue;
        }
        // (declaration, index of its next base to visit); the stack is the grey path.
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = 1;
        while let Some(&mut (cur, ref mut next)) = stack.last_mut() {
            let refs = decls[cur].base_refs();
            let Some(b) = refs.get(*next) else {
                state[cur] = 2;
                order.push(cur);
                stack.pop();
                continue;
            };
            *next += 1;
            let Some(&dep) = by_name.get(b.name) else {
                continue;
            };
            match state[dep] {
                0 => {
                    state[dep] = 1;
                    stack.push((dep, 0));
                }
                1 => {
                    let from = stack.iter().position(|&(i, _)| i == dep).unwrap_or(0);
                    let names: Vec<&str> = stack[from..]
                        .iter()
                        .map(|&(i, _)| decls[i].name())
                        .collect();
                    return Err(DeclListError {
                        index: cur,
                        error: BdevError::invalid(
                            b.field.clone(),
                            format!(
                                "stacking cycle: {} -> {}",
                                names.join(" -> "),
                                decls[dep].name()
                            ),
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[[bdev]]` tables of `toml_text`, parsed by kind.
    fn parse(toml_text: &str) -> Result<Vec<BdevDecl>, DeclError> {
        #[derive(Deserialize)]
        struct W {
            bdev: Vec<serde_json::Value>,
        }
        let kinds = Kinds::core();
        toml::from_str::<W>(toml_text)
            .unwrap()
            .bdev
            .into_iter()
            .map(|v| kinds.parse(v))
            .collect()
    }

    fn specs(toml_text: &str) -> Vec<BdevDecl> {
        parse(toml_text).unwrap()
    }

    #[test]
    fn sizes_parse_from_numbers_and_strings() {
        let s = specs(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"1MiB\"\n\
             [[bdev]]\nkind = \"null\"\nname = \"n\"\nsize = 8192\nblock_size = 512\n",
        );
        assert_eq!(s[0].name(), "m");
        assert_eq!(
            s[0].config::<MallocKind>().map(|m| m.size),
            Some(ByteSize(1 << 20))
        );
        assert_eq!(s[1].config::<NullKind>().map(|n| n.block_size), Some(512));
        assert!(s[1].config::<MallocKind>().is_none());
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
        let json = s[1].to_json();
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
        let e = parse(
            "[[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\nsize = 4096\nlevel = 1\n",
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.field, "level");
        let e = parse(
            "[[bdev]]\nkind = \"compress\"\nname = \"z\"\nbase = \"m\"\nsize = 4096\nalgorithm = \"lzma\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("lzma"), "{e}");
        assert_eq!(e.field, "algorithm");
        let e = parse("[[bdev]]\nkind = \"crc\"\nname = \"c\"\nbase = \"m\"\nx = 1\n").unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
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

    #[test]
    fn a_declaration_keeps_its_kind_through_the_erasure() {
        let s = specs(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 8192\n\
             [[bdev]]\nkind = \"null\"\nname = \"m\"\nsize = 8192\n\
             [[bdev]]\nkind = \"delay\"\nname = \"d\"\nbase = \"m\"\n",
        );
        // Same fields, other kind: not the same declaration.
        assert_ne!(s[0], s[1]);
        assert_eq!(s[0], s[0].clone());
        assert_eq!(s[0].to_json()["kind"], "malloc");
        assert_eq!(s[1].to_json()["kind"], "null");
        assert_eq!((s[2].kind(), s[2].bases()), ("delay", vec!["m"]));
        // A resize is declared by the kinds with a size, ignored by the others.
        let mut m = s[0].clone();
        m.set_size(16384);
        assert_eq!(m.to_json()["size"], 16384);
        assert_ne!(m, s[0]);
        let mut d = s[2].clone();
        d.set_size(16384);
        assert_eq!(d, s[2]);
        assert_eq!(s[0].inline_secret(), None);
        assert!(!s[0].same_inline_secret(&s[0]));
        // An invalid name is refused before the kind's own checks.
        let bad = BdevDecl::new::<NullKind>(NullDecl {
            name: "a b".into(),
            size: ByteSize(4096),
            block_size: 4096,
        });
        assert_eq!(bad.validate().unwrap_err().field(), Some("name"));
        assert_eq!(bad.check().unwrap_err().field(), Some("name"));
    }

    #[test]
    fn unknown_or_missing_kinds_are_named() {
        let kinds = Kinds::core();
        let e = kinds
            .parse(serde_json::json!({"kind": "crypt_xts"}))
            .unwrap_err();
        assert_eq!(e.field, "kind");
        assert!(
            e.message
                .starts_with("unknown kind `crypt_xts`, expected one of `malloc`"),
            "{e}"
        );
        let e = kinds.parse(serde_json::json!({"kind": 3})).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = kinds.parse(serde_json::json!([1])).unwrap_err();
        assert_eq!(e.field, ".");
        let e = kinds
            .parse(serde_json::json!({"kind": "error", "name": "e", "base": "m", "inject": {"ops": [1]}}))
            .unwrap_err();
        assert_eq!(e.field, "inject.ops[0]", "{e}");
    }

    #[test]
    #[should_panic(expected = "listed twice")]
    fn a_kind_cannot_be_listed_twice() {
        Kinds::core().add::<CrcKind>();
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
}
