//! Errors of the encryption bdevs' control plane (creating and opening them). The data path never
//! returns these: a request completes with an [`IoStatus`]. No message carries key material.

use ferroblk_bdev::{BdevError, IoStatus};

use crate::key::KeyError;

/// Why an encryption bdev could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key is unusable (length, hex, key file).
    #[error("bdev '{name}': bad key")]
    Key {
        /// The bdev being created.
        name: String,
        /// What is wrong with the key.
        #[source]
        source: KeyError,
    },
    /// The key is not the one the volume was formatted with.
    #[error(
        "bdev '{name}': wrong key: it does not open the AES-256-GCM volume on base '{base}' \
         (its key check value does not verify)"
    )]
    WrongKey {
        /// The bdev being created.
        name: String,
        /// Its base.
        base: String,
    },
    /// The base holds something that is not a usable volume of this kind.
    #[error("bdev '{name}': base '{base}': {reason}")]
    Volume {
        /// The bdev being created.
        name: String,
        /// Its base.
        base: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the base while opening or formatting failed.
    #[error("bdev '{name}': {what} on base '{base}' failed: {status}")]
    BaseIo {
        /// The bdev being created.
        name: String,
        /// Its base.
        base: String,
        /// What was being done.
        what: &'static str,
        /// The base's status.
        status: IoStatus,
    },
    /// The base bdev refused a control-plane operation (opening a channel, ...).
    #[error("bdev '{name}': base bdev")]
    Bdev {
        /// The bdev being created.
        name: String,
        /// The cause.
        #[source]
        source: BdevError,
    },
}

impl CryptoError {
    /// The declaration field this error is about (`key`, `base`), for config and RPC errors.
    pub fn field(&self) -> &'static str {
        match self {
            CryptoError::Key { .. } | CryptoError::WrongKey { .. } => "key",
            _ => "base",
        }
    }
}

impl From<CryptoError> for BdevError {
    /// The control-plane error of the bdev layer (what `BdevDecl::build` and the registry
    /// return), naming the field at fault.
    fn from(e: CryptoError) -> BdevError {
        match e {
            CryptoError::Bdev { source, .. } => source,
            e => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                BdevError::invalid(e.field(), msg)
            }
        }
    }
}
