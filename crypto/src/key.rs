//! Volume keys: loaded from a key file or from hex given over the RPC, zeroized on drop, never
//! printed.
//!
//! A [`Key`] holds 32 bytes (one AES-256 key: the GCM bdev) or 64 bytes (two AES-256 keys: the
//! XTS bdev). Its `Debug` prints `Key(<redacted>)`, it has no `Display`, and no error of this
//! module carries key material: hex errors name a position, never the character found there.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::{Zeroize, Zeroizing};

/// Bytes of one AES-256 key.
pub const AES256_KEY_LEN: usize = 32;
/// Bytes of an AES-256-XTS key (data key then tweak key).
pub const XTS_KEY_LEN: usize = 64;
/// Largest key file read: anything bigger is not a key (hex of 64 bytes plus whitespace fits).
const MAX_KEY_FILE: u64 = 1024;

/// A failure to load or use a key. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key has the wrong length for its use.
    #[error("the key is {got} bytes; {what} needs {need}")]
    Length {
        /// What the key is for (`AES-256-XTS`, ...).
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// Hex text that does not decode.
    #[error("the key is not valid hex: {reason}")]
    Hex {
        /// What is wrong (a position or a length, never the key's characters).
        reason: String,
    },
    /// The two halves of an XTS key are equal.
    #[error("the two halves of the AES-256-XTS key are equal; IEEE 1619 needs two different keys")]
    XtsHalvesEqual,
    /// A key file that others may read.
    #[error(
        "key file {path}: mode {mode:04o} lets group or others access it; make it 0600 or stricter"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file that is not a regular file, or is too large to be a key.
    #[error("key file {path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Reading a key file failed.
    #[error("key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The operating system gave no random bytes.
    #[error("no random bytes from the operating system: {0}")]
    Random(getrandom::Error),
}

/// Key material: 32 or 64 bytes, wiped from memory when dropped.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

fn check_len(len: usize) -> Result<(), KeyError> {
    if len == AES256_KEY_LEN || len == XTS_KEY_LEN {
        Ok(())
    } else {
        Err(KeyError::Length {
            what: "a volume key (AES-256-GCM: 32, AES-256-XTS: 64)",
            need: if len < AES256_KEY_LEN {
                AES256_KEY_LEN
            } else {
                XTS_KEY_LEN
            },
            got: len,
        })
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Key {
    /// A key from raw bytes (32 or 64).
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        check_len(bytes.len())?;
        Ok(Key {
            bytes: Zeroizing::new(bytes.to_vec()),
        })
    }

    /// A key from hex text (64 or 128 digits, either case; surrounding whitespace is ignored).
    pub fn from_hex(text: &str) -> Result<Key, KeyError> {
        Key::from_hex_bytes(text.as_bytes())
    }

    fn from_hex_bytes(text: &[u8]) -> Result<Key, KeyError> {
        let text = text.trim_ascii();
        if !text.len().is_multiple_of(2) {
            return Err(KeyError::Hex {
                reason: format!("{} digits is an odd number", text.len()),
            });
        }
        check_len(text.len() / 2).map_err(|_| KeyError::Hex {
            reason: format!(
                "{} digits; a key is 64 digits (AES-256-GCM) or 128 digits (AES-256-XTS)",
                text.len()
            ),
        })?;
        let mut bytes = Zeroizing::new(vec![0u8; text.len() / 2]);
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let (Some(hi), Some(lo)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                let at = if hex_value(pair[0]).is_none() {
                    2 * i
                } else {
                    2 * i + 1
                };
                return Err(KeyError::Hex {
                    reason: format!("the character at position {at} is not a hex digit"),
                });
            };
            bytes[i] = hi << 4 | lo;
        }
        Ok(Key { bytes })
    }

    /// A key read from a file holding either hex text (64 or 128 digits, surrounding whitespace
    /// ignored) or the raw key (exactly 32 or 64 bytes). The file must be a regular file that
    /// neither group nor others may access (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = File::open(path).map_err(io)?;
        // Checked on the open descriptor, so the file checked is the file read.
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(KeyError::BadFile {
                path: path.to_path_buf(),
                reason: "not a regular file",
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(KeyError::BadFile {
                path: path.to_path_buf(),
                reason: "too large to be a key",
            });
        }
        // Capacity for the whole file up front: the vector never reallocates (which would leave
        // a copy of the key in freed memory).
        let mut buf = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE as usize + 1));
        (&mut f)
            .take(MAX_KEY_FILE + 1)
            .read_to_end(&mut buf)
            .map_err(io)?;
        let text = buf.trim_ascii();
        if !text.is_empty() && text.iter().all(|&c| hex_value(c).is_some()) {
            Key::from_hex_bytes(text)
        } else {
            Key::from_bytes(&buf).map_err(|e| match e {
                KeyError::Length { got, .. } => KeyError::BadFile {
                    path: path.to_path_buf(),
                    reason: if got > XTS_KEY_LEN {
                        "neither hex text nor a raw key of 32 or 64 bytes"
                    } else {
                        "a raw key must be exactly 32 or 64 bytes"
                    },
                },
                e => e,
            })
        }
    }

    /// A fresh random key of `len` bytes (32 or 64) from the operating system.
    pub fn generate(len: usize) -> Result<Key, KeyError> {
        check_len(len)?;
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        getrandom::fill(&mut bytes).map_err(KeyError::Random)?;
        Ok(Key { bytes })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a key has 32 or 64 bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The key material, for the ciphers of this crate only.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.bytes
    }
}

/// Key hex as given in a declaration (`key_hex`): wiped on drop, redacted in `Debug`, and
/// serialized as `"<redacted>"` (a declaration written back out does not carry the key).
#[derive(Clone, Default)]
pub struct KeyHex(Zeroizing<String>);

impl KeyHex {
    /// Wraps hex text.
    pub fn new(hex: String) -> KeyHex {
        KeyHex(Zeroizing::new(hex))
    }

    /// Decodes it into a key.
    pub fn key(&self) -> Result<Key, KeyError> {
        Key::from_hex(&self.0)
    }
}

impl fmt::Debug for KeyHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHex(<redacted>)")
    }
}

impl PartialEq for KeyHex {
    /// Compares without an early exit on the first difference.
    fn eq(&self, other: &KeyHex) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl<'de> serde::Deserialize<'de> for KeyHex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyHex, D::Error> {
        let mut s = String::deserialize(d)?;
        let k = KeyHex::new(s.clone());
        s.zeroize();
        Ok(k)
    }
}

impl serde::Serialize for KeyHex {
    /// Serializes as `"<redacted>"`: key material never leaves through a serializer.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HEX64: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                         202122232425262728292a2b2c2d2e2f303132333435363738393A3B3C3D3E3F";

    fn write_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn debug_is_redacted() {
        let k = Key::from_hex(HEX64).unwrap();
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
        assert_eq!(
            format!("{:?}", KeyHex::new(HEX64.into())),
            "KeyHex(<redacted>)"
        );
        assert_eq!(
            serde_json::to_string(&KeyHex::new(HEX64.into())).unwrap(),
            "\"<redacted>\""
        );
    }

    #[test]
    fn hex_decodes_both_cases_and_trims_whitespace() {
        let k = Key::from_hex(&format!("  {HEX64}\n")).unwrap();
        assert_eq!(k.len(), 64);
        assert_eq!(k.expose()[0x3a], 0x3a);
        assert_eq!(Key::from_hex(&HEX64[..64]).unwrap().len(), 32);
    }

    #[test]
    fn hex_errors_name_positions_not_characters() {
        let mut bad = HEX64.to_string();
        bad.replace_range(7..8, "z");
        let e = Key::from_hex(&bad).unwrap_err().to_string();
        assert!(e.contains("position 7"), "{e}");
        assert!(!e.contains('z'), "{e}");
        assert!(!e.contains("0001020304"), "{e}");
        let e = Key::from_hex(&HEX64[..63]).unwrap_err().to_string();
        assert!(e.contains("odd"), "{e}");
        let e = Key::from_hex(&HEX64[..40]).unwrap_err().to_string();
        assert!(e.contains("40 digits"), "{e}");
    }

    #[test]
    fn key_file_hex_or_raw_with_strict_mode() {
        let dir = tempfile::tempdir().unwrap();
        let hex = write_file(dir.path(), "k.hex", format!("{HEX64}\n").as_bytes(), 0o600);
        assert_eq!(Key::from_file(&hex).unwrap().len(), 64);
        let raw: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(97) ^ 0xc3).collect();
        let rawp = write_file(dir.path(), "k.bin", &raw, 0o400);
        assert_eq!(Key::from_file(&rawp).unwrap().expose(), &raw[..]);
        let open = write_file(dir.path(), "k.open", HEX64.as_bytes(), 0o644);
        let e = Key::from_file(&open).unwrap_err();
        assert!(
            matches!(e, KeyError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("0644"), "{e}");
        assert!(!e.to_string().contains(&HEX64[..16]));
        let group = write_file(dir.path(), "k.grp", HEX64.as_bytes(), 0o640);
        assert!(matches!(
            Key::from_file(&group),
            Err(KeyError::Permissions { .. })
        ));
        let short = write_file(dir.path(), "k.short", &raw[..20], 0o600);
        let e = Key::from_file(&short).unwrap_err().to_string();
        assert!(e.contains("exactly 32 or 64"), "{e}");
        assert!(matches!(
            Key::from_file(dir.path()),
            Err(KeyError::BadFile { .. })
        ));
        assert!(matches!(
            Key::from_file(&dir.path().join("missing")),
            Err(KeyError::Io { .. })
        ));
    }

    #[test]
    fn generate_gives_distinct_keys() {
        let a = Key::generate(64).unwrap();
        let b = Key::generate(64).unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(Key::generate(16).is_err());
    }

    #[test]
    fn key_hex_compares_and_deserializes() {
        let a: KeyHex = serde_json::from_str(&format!("\"{HEX64}\"")).unwrap();
        assert_eq!(a, KeyHex::new(HEX64.into()));
        assert_ne!(a, KeyHex::new(HEX64[..64].into()));
        assert_eq!(a.key().unwrap().len(), 64);
    }
}
