//! Reporting blocks that fail an integrity check (the `crc` kind's CRC32C, `crypt_gcm`'s
//! authentication tag): every failure is counted, and each LBA is logged at warn level with the
//! bdev's name once, up to a bound, so a tampered or broken base is visible to an operator
//! without a flood of identical lines. Only the failure path takes the lock.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// LBAs whose integrity failure is logged (once each) per bdev; past that, failures are only
/// counted.
pub const LOGGED_LBAS: usize = 4096;

/// A bdev's integrity failures: a counter and the bounded set of LBAs already logged.
pub struct IntegrityLog {
    /// What failed, as the log line says it (`CRC32C mismatch`).
    what: &'static str,
    errors: AtomicU64,
    logged: Mutex<HashSet<u64>>,
}

impl IntegrityLog {
    /// A log of failures described as `what` (`CRC32C mismatch`, `AES-256-GCM authentication
    /// failed`).
    pub fn new(what: &'static str) -> IntegrityLog {
        IntegrityLog {
            what,
            errors: AtomicU64::new(0),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// Counts block `lba` of bdev `bdev` as failed, and logs it at warn level unless that LBA
    /// was logged before or [`LOGGED_LBAS`] LBAs were (the last one logged says so).
    pub fn report(&self, bdev: &str, lba: u64) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().expect("integrity log lock");
        if logged.len() >= LOGGED_LBAS || !logged.insert(lba) {
            return;
        }
        tracing::warn!(bdev = %bdev, lba, "{}: read refused", self.what);
        if logged.len() == LOGGED_LBAS {
            tracing::warn!(bdev = %bdev,
                "{LOGGED_LBAS} LBAs failed their integrity check; further failures are only counted");
        }
    }

    /// Blocks that failed, counted each time they are read.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Distinct LBAs logged so far.
    pub fn logged_lbas(&self) -> usize {
        self.logged.lock().map(|s| s.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_failure_and_logs_each_lba_once_within_the_bound() {
        let log = IntegrityLog::new("test mismatch");
        log.report("b", 7);
        log.report("b", 7);
        assert_eq!((log.errors(), log.logged_lbas()), (2, 1));
        for lba in 0..(LOGGED_LBAS as u64 + 10) {
            log.report("b", 1000 + lba);
        }
        assert_eq!(log.logged_lbas(), LOGGED_LBAS);
        assert_eq!(log.errors(), 2 + LOGGED_LBAS as u64 + 10);
    }
}
