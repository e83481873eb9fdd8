//! Errors of the bdev control plane (creating, opening, resizing, deleting bdevs). The data path
//! never returns these: a request completes with an [`crate::IoStatus`].

use std::path::PathBuf;

/// A control-plane failure. Messages name the bdev or path involved; causes are in `source`.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// An operating system call on a backing file or device failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done (`open`, `set size of`, ...).
        op: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A setting is invalid; `field` is the setting's name.
    #[error("{field}: {reason}")]
    Invalid {
        /// The offending field (`size`, `block_size`, `base`, ...).
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The bdev does not support what was asked.
    #[error("unsupported: {what}")]
    Unsupported {
        /// The operation.
        what: String,
    },
    /// No bdev has this name.
    #[error("no bdev named '{0}'")]
    NotFound(String),
    /// A bdev with this name exists already.
    #[error("a bdev named '{0}' exists already")]
    Exists(String),
    /// The bdev is in use and cannot be deleted.
    #[error("bdev '{name}' is in use by {users}")]
    InUse {
        /// The bdev.
        name: String,
        /// Who uses it.
        users: String,
    },
    /// The kernel has no usable io_uring (too old, or disabled by `kernel.io_uring_disabled`).
    #[error("io_uring unavailable")]
    Uring(#[source] std::io::Error),
}

impl BdevError {
    /// An [`BdevError::Invalid`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> BdevError {
        BdevError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field this error is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            BdevError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}
