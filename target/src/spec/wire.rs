//! Little-endian field access at explicit byte offsets, and the string conventions of the NVMe
//! data structures (NVMe Base 2.0 §1.5: ASCII strings are left-justified and padded with spaces;
//! NQNs are UTF-8, NUL-terminated and NUL-padded).
//!
//! Every structure in [`crate::spec`] is read and written through these helpers, so the byte
//! offsets in the code are the offsets of the spec's figures. Callers pass buffers whose length
//! they have already checked; an offset past the end is a programming error and panics.

/// Reads a `u16` at `off`.
#[inline]
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Reads a `u32` at `off`.
#[inline]
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads a `u64` at `off`.
#[inline]
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// Reads a 128-bit counter at `off` (SMART/Health log counters are 16 bytes).
#[inline]
pub fn get_u128(b: &[u8], off: usize) -> u128 {
    let mut v = [0u8; 16];
    v.copy_from_slice(&b[off..off + 16]);
    u128::from_le_bytes(v)
}

/// Writes a `u16` at `off`.
#[inline]
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes a `u32` at `off`.
#[inline]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a `u64` at `off`.
#[inline]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes a 128-bit counter at `off`.
#[inline]
pub fn put_u128(b: &mut [u8], off: usize, v: u128) {
    b[off..off + 16].copy_from_slice(&v.to_le_bytes());
}

/// Writes `s` into the `len`-byte field at `off`, truncated to fit, padded with `pad`.
pub fn put_str(b: &mut [u8], off: usize, len: usize, s: &str, pad: u8) {
    let field = &mut b[off..off + len];
    let n = s.len().min(len);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
    field[n..].fill(pad);
}

/// Writes an ASCII string field: left-justified, padded with spaces (NVMe Base §1.5).
pub fn put_ascii(b: &mut [u8], off: usize, len: usize, s: &str) {
    put_str(b, off, len, s, b' ');
}

/// Writes a NUL-padded field (NQNs). At most `len - 1` bytes are kept so the field is always
/// NUL-terminated.
pub fn put_nqn(b: &mut [u8], off: usize, len: usize, s: &str) {
    put_str(b, off, len, truncate_str(s, len - 1), 0);
}

/// Reads a padded string field, dropping trailing spaces and NULs (lossy for non-UTF-8 bytes).
pub fn get_str(b: &[u8], off: usize, len: usize) -> String {
    let field = &b[off..off + len];
    let end = field
        .iter()
        .rposition(|&c| c != b' ' && c != 0)
        .map_or(0, |i| i + 1);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Rounds `v` up to a multiple of `align` (a power of two or any non-zero value).
#[inline]
pub const fn align_up(v: usize, align: usize) -> usize {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_little_endian_at_their_offsets() {
        let mut b = [0u8; 32];
        put_u16(&mut b, 1, 0x0102);
        put_u32(&mut b, 3, 0x0304_0506);
        put_u64(&mut b, 7, 0x0708_090a_0b0c_0d0e);
        put_u128(&mut b, 15, 0x0f);
        assert_eq!(&b[1..3], &[0x02, 0x01]);
        assert_eq!(&b[3..7], &[0x06, 0x05, 0x04, 0x03]);
        assert_eq!(b[7], 0x0e);
        assert_eq!(b[14], 0x07);
        assert_eq!(b[15], 0x0f);
        assert_eq!(get_u16(&b, 1), 0x0102);
        assert_eq!(get_u32(&b, 3), 0x0304_0506);
        assert_eq!(get_u64(&b, 7), 0x0708_090a_0b0c_0d0e);
        assert_eq!(get_u128(&b, 15), 0x0f);
    }

    #[test]
    fn ascii_fields_pad_with_spaces_and_nqns_with_nul() {
        let mut b = [0xffu8; 12];
        put_ascii(&mut b, 0, 6, "abc");
        assert_eq!(&b[..6], b"abc   ");
        put_nqn(&mut b, 6, 6, "nqn.2014");
        assert_eq!(&b[6..12], b"nqn.2\0");
        assert_eq!(get_str(&b, 0, 6), "abc");
        assert_eq!(get_str(&b, 6, 6), "nqn.2");
    }

    #[test]
    fn truncation_keeps_utf8_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(align_up(76, 8), 80);
        assert_eq!(align_up(72, 4), 72);
    }
}
