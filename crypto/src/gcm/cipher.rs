//! [`GcmCipher`]: AES-256-GCM of one buffer at a time (a logical block, or the header's key
//! check value), with the engine picked once when the cipher is built, as
//! [`XtsCipher`](crate::XtsCipher) does:
//! - `vaes-avx512` (x86_64 with VAES, VPCLMULQDQ, AVX-512F/BW): CTR on 16 blocks per iteration
//!   in zmm registers, GHASH of the same blocks with VPCLMULQDQ against H^16..H^1 and one
//!   reduction per 16 blocks; one pass over the data (`x86.rs`).
//! - `aes-ni` (x86_64 with AES-NI, PCLMULQDQ, SSSE3): the same with 8 blocks in xmm registers.
//! - `portable` (anything else): the `aes-gcm` crate, also the reference the others are tested
//!   against.
//!
//! All three give the same ciphertext and tag (NIST SP 800-38D), so the engine is not part of
//! the volume format.

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::{AeadInPlace, Aes256Gcm, KeyInit};

pub(crate) use crate::common::Engine;

#[cfg(target_arch = "x86_64")]
use super::x86;

/// Whether this CPU runs the GCM `engine` (VAES: AES-NI, PCLMULQDQ, SSSE3, AVX-512 F/BW, VAES,
/// VPCLMULQDQ; AES-NI: AES-NI, PCLMULQDQ, SSSE3). [`GcmCipher::new`] takes the fastest
/// ([`Engine::fastest`]); tests force each.
pub(crate) fn engine_supported(engine: Engine) -> bool {
    match engine {
        #[cfg(target_arch = "x86_64")]
        Engine::Vaes => x86::vaes_supported(),
        #[cfg(target_arch = "x86_64")]
        Engine::AesNi => x86::aesni_supported(),
        #[cfg(not(target_arch = "x86_64"))]
        Engine::Vaes | Engine::AesNi => false,
        Engine::Portable => true,
    }
}

/// The engine of a [`GcmCipher`] with its key material (boxed: a cipher is cloned into every
/// channel).
#[derive(Clone)]
enum Imp {
    /// [`Engine::Vaes`] or [`Engine::AesNi`]: round keys and H^1..H^16, zeroized on drop.
    #[cfg(target_arch = "x86_64")]
    Hw(Box<x86::HwGcm>),
    /// [`Engine::Portable`].
    Portable(Box<Aes256Gcm>),
}

/// AES-256-GCM with 96-bit nonces and 16-byte tags, in place, tag detached.
#[derive(Clone)]
pub(crate) struct GcmCipher {
    imp: Imp,
}

impl GcmCipher {
    /// The cipher of a 32-byte key, running the fastest engine this CPU supports.
    pub(crate) fn new(key: &[u8; 32]) -> GcmCipher {
        GcmCipher::with_engine(key, Engine::fastest(engine_supported))
    }

    /// The cipher of `key` running `engine`.
    ///
    /// # Panics
    /// If this CPU does not support `engine` ([`Engine::is_supported`]).
    pub(crate) fn with_engine(key: &[u8; 32], engine: Engine) -> GcmCipher {
        let unsupported = || panic!("this CPU does not run the {} GCM engine", engine.name());
        let imp = match engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes | Engine::AesNi => Imp::Hw(Box::new(
                x86::HwGcm::new(key, engine == Engine::Vaes).unwrap_or_else(unsupported),
            )),
            #[cfg(not(target_arch = "x86_64"))]
            Engine::Vaes | Engine::AesNi => unsupported(),
            Engine::Portable => {
                Imp::Portable(Box::new(Aes256Gcm::new(GenericArray::from_slice(key))))
            }
        };
        GcmCipher { imp }
    }

    /// The implementation this cipher runs.
    pub(crate) fn engine(&self) -> Engine {
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::Hw(hw) if hw.is_vaes() => Engine::Vaes,
            #[cfg(target_arch = "x86_64")]
            Imp::Hw(_) => Engine::AesNi,
            Imp::Portable(_) => Engine::Portable,
        }
    }

    /// Encrypts `data` in place under `nonce` with associated data `aad`; returns the tag.
    ///
    /// # Panics
    /// If `data` is longer than GCM allows (2^36 − 32 bytes).
    pub(crate) fn encrypt(&self, nonce: &[u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::Hw(hw) => hw.encrypt(nonce, aad, data),
            Imp::Portable(c) => c
                .encrypt_in_place_detached(GenericArray::from_slice(nonce), aad, data)
                .expect("data within GCM's limits")
                .into(),
        }
    }

    /// Decrypts `data` in place if `tag` authenticates it with `nonce` and `aad`. On `false`
    /// `data` holds the ciphertext it held before: no unauthenticated plaintext is left.
    ///
    /// # Panics
    /// If `data` is longer than GCM allows (2^36 − 32 bytes).
    #[must_use]
    pub(crate) fn decrypt(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        data: &mut [u8],
        tag: &[u8; 16],
    ) -> bool {
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::Hw(hw) => hw.decrypt(nonce, aad, data, tag),
            Imp::Portable(c) => c
                .decrypt_in_place_detached(
                    GenericArray::from_slice(nonce),
                    aad,
                    data,
                    GenericArray::from_slice(tag),
                )
                .is_ok(),
        }
    }
}
