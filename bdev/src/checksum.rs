//! CRC32C (Castagnoli, the iSCSI / NVMe-TCP digest polynomial 0x1EDC6F41, reflected), used by
//! the `crc` and `compress` bdevs and by the NVMe/TCP header and data digests.
//!
//! One place for it so every user gets the fastest path the CPU has: the `crc-fast` crate folds
//! with carry-less multiplies (VPCLMULQDQ on AVX-512 machines, PCLMULQDQ otherwise, chosen at
//! run time), about 2–3× the SSE4.2 `crc32` instruction loop of the `crc32c` crate on 4 KiB
//! blocks here (see BENCHMARKS.md).

use crc_fast::{CrcAlgorithm, Digest};

/// The CRC32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// Continues a CRC32C: `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    if data.is_empty() {
        return crc;
    }
    // The register holds the complement of a finished CRC (init and xorout are both !0).
    let mut d = Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        // RFC 3720 (iSCSI) appendix B.4 and the CRC catalogue's check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
        assert_eq!(crc32c(&[]), 0);
    }

    #[test]
    fn append_equals_whole_at_every_split() {
        let data: Vec<u8> = (0..9000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        for len in [0, 1, 15, 16, 63, 64, 255, 512, 4096, 9000] {
            let whole = crc32c(&data[..len]);
            for split in [0, 1, len / 3, len / 2, len.saturating_sub(1), len].map(|s| s.min(len)) {
                let (a, b) = data[..len].split_at(split);
                assert_eq!(
                    crc32c_append(crc32c(a), b),
                    whole,
                    "len {len} split {split}"
                );
            }
            assert_eq!(crc32c_append(0, &data[..len]), whole);
        }
    }
}
