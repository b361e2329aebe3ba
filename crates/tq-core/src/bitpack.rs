//! Bit packing of b-bit codes, `b` in `1..=8`.
//!
//! **Layout (baked into stored codes and read by the GPU kernels):** code `i` of a row occupies
//! stream bits `i*b .. i*b + b`, least significant bit first, and stream bit `k` is bit `k % 8` of
//! byte `k / 8` (LSB-first in little-endian bytes, so reading the bytes as little-endian `u32` words
//! gives the same stream). A row of `n` codes takes `ceil(n*b/8)` bytes; unused high bits of the
//! last byte are zero. For `b` in {1, 2, 4} every nibble of a packed row holds whole codes, which is
//! what the look-up-table scan kernels in [`crate::scan`] rely on.

use crate::{Error, Result};

/// Number of bytes holding `n` codes of `bits` bits: `ceil(n * bits / 8)`.
#[inline]
pub const fn packed_len(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

fn check_bits(bits: u32) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::BitsOutOfRange { bits })
    }
}

/// Packs `codes` (each `< 2^bits`) into `out`, which must be exactly `packed_len(codes.len(), bits)`
/// bytes long. O(n).
///
/// # Errors
/// [`Error::BitsOutOfRange`], [`Error::LengthMismatch`] for a wrong `out` length, and
/// [`Error::CodeOutOfRange`] for a code that does not fit (nothing useful is left in `out` then).
pub fn pack(codes: &[u8], bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let expected = packed_len(codes.len(), bits);
    if out.len() != expected {
        return Err(Error::LengthMismatch {
            what: "packed codes",
            expected,
            got: out.len(),
        });
    }
    let max = ((1u32 << bits) - 1) as u8;
    if let Some((index, &code)) = codes.iter().enumerate().find(|&(_, &c)| c > max) {
        return Err(Error::CodeOutOfRange { index, code, bits });
    }
    pack_unchecked(codes, bits, out);
    Ok(())
}

/// [`pack`] without validation, for kernels whose codes are in range by construction.
/// Out-of-range codes are masked to `bits` bits; lengths are checked with `debug_assert!`.
pub fn pack_unchecked(codes: &[u8], bits: u32, out: &mut [u8]) {
    debug_assert!((1..=8).contains(&bits));
    debug_assert_eq!(out.len(), packed_len(codes.len(), bits));
    match bits {
        8 => out.copy_from_slice(codes),
        4 => pack_whole::<2, 4>(codes, out),
        2 => pack_whole::<4, 2>(codes, out),
        1 => pack_whole::<8, 1>(codes, out),
        3 => {
            // Eight codes fill exactly three bytes; the tail goes through the generic path.
            let full = codes.len() / 8;
            for (c, o) in codes.chunks_exact(8).zip(out.chunks_exact_mut(3)) {
                let mut w = 0u32;
                for (k, &v) in c.iter().enumerate() {
                    w |= ((v & 7) as u32) << (3 * k);
                }
                o.copy_from_slice(&w.to_le_bytes()[..3]);
            }
            pack_generic(&codes[8 * full..], 3, &mut out[3 * full..]);
        }
        _ => pack_generic(codes, bits, out),
    }
}

/// Bit-accumulator packing for any width (the reference layout).
fn pack_generic(codes: &[u8], bits: u32, out: &mut [u8]) {
    {
        {
            let mask = (1u64 << bits) - 1;
            let mut acc: u64 = 0;
            let mut nbits = 0u32;
            let mut pos = 0;
            for &c in codes {
                acc |= (c as u64 & mask) << nbits;
                nbits += bits;
                while nbits >= 8 {
                    out[pos] = acc as u8;
                    pos += 1;
                    acc >>= 8;
                    nbits -= 8;
                }
            }
            if nbits > 0 {
                out[pos] = acc as u8;
            }
        }
    }
}

/// Packing for widths that divide 8 (`PER = 8 / BITS` codes per byte): fixed-size chunks so the
/// loop vectorises; the tail byte is zero-padded.
#[inline(always)]
fn pack_whole<const PER: usize, const BITS: u32>(codes: &[u8], out: &mut [u8]) {
    let mask = ((1u32 << BITS) - 1) as u8;
    let mut chunks = codes.chunks_exact(PER);
    for (o, c) in out.iter_mut().zip(&mut chunks) {
        let mut byte = 0u8;
        for (k, &v) in c.iter().enumerate() {
            byte |= (v & mask) << (k as u32 * BITS);
        }
        *o = byte;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut byte = 0u8;
        for (k, &v) in rest.iter().enumerate() {
            byte |= (v & mask) << (k as u32 * BITS);
        }
        out[codes.len() / PER] = byte;
    }
}

/// Unpacks `out.len()` codes of `bits` bits from `packed`, which must be exactly
/// `packed_len(out.len(), bits)` bytes long. O(n).
///
/// # Errors
/// [`Error::BitsOutOfRange`] and [`Error::LengthMismatch`].
pub fn unpack(packed: &[u8], bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let expected = packed_len(out.len(), bits);
    if packed.len() != expected {
        return Err(Error::LengthMismatch {
            what: "packed codes",
            expected,
            got: packed.len(),
        });
    }
    unpack_unchecked(packed, bits, out);
    Ok(())
}

/// [`unpack`] without validation (lengths are checked with `debug_assert!`).
pub fn unpack_unchecked(packed: &[u8], bits: u32, out: &mut [u8]) {
    debug_assert!((1..=8).contains(&bits));
    debug_assert_eq!(packed.len(), packed_len(out.len(), bits));
    match bits {
        8 => out.copy_from_slice(packed),
        4 => {
            for (pair, &b) in out.chunks_mut(2).zip(packed) {
                pair[0] = b & 0x0f;
                if let Some(h) = pair.get_mut(1) {
                    *h = b >> 4;
                }
            }
        }
        _ => {
            let mask = (1u64 << bits) - 1;
            let mut acc: u64 = 0;
            let mut nbits = 0u32;
            let mut bytes = packed.iter();
            for o in out.iter_mut() {
                while nbits < bits {
                    acc |= (*bytes.next().unwrap_or(&0) as u64) << nbits;
                    nbits += 8;
                }
                *o = (acc & mask) as u8;
                acc >>= bits;
                nbits -= bits;
            }
        }
    }
}

/// Writes the low `bits` bits of `code` LSB-first at stream bit `*pos` and advances `*pos` (the
/// module's bit order; the bytes start zeroed). For streams whose widths vary code by code.
///
/// # Panics
/// If the stream ends before `*pos + bits`.
pub fn write_bits(out: &mut [u8], pos: &mut usize, code: u8, bits: u32) {
    for i in 0..bits as usize {
        if (code >> i) & 1 == 1 {
            let p = *pos + i;
            out[p / 8] |= 1 << (p % 8);
        }
    }
    *pos += bits as usize;
}

/// Reads codes of varying widths back from a stream written by [`write_bits`].
#[derive(Debug)]
pub struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    /// A reader at stream bit 0.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }
    /// The next `bits` bits (`<= 8`) as a code.
    ///
    /// # Panics
    /// If the stream ends before them.
    pub fn read(&mut self, bits: u32) -> u8 {
        let mut v = 0u8;
        for i in 0..bits as usize {
            let p = self.pos + i;
            v |= ((self.bytes[p / 8] >> (p % 8)) & 1) << i;
        }
        self.pos += bits as usize;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Codes of varying widths written one by one read back in order, and a stream of one width
    /// is exactly what [`pack`] writes.
    #[test]
    fn varying_widths_round_trip_in_the_pack_layout() {
        let widths = [3u32, 1, 8, 2, 5, 4, 7, 6];
        let codes: Vec<u8> = widths
            .iter()
            .map(|&b| ((1u16 << b) - 2) as u8 | 1)
            .collect();
        let total: usize = widths.iter().map(|&b| b as usize).sum();
        let mut out = vec![0u8; total.div_ceil(8)];
        let mut pos = 0;
        for (&c, &b) in codes.iter().zip(&widths) {
            write_bits(&mut out, &mut pos, c, b);
        }
        assert_eq!(pos, total);
        let mut r = BitReader::new(&out);
        for (&c, &b) in codes.iter().zip(&widths) {
            assert_eq!(r.read(b), c & ((1u16 << b) - 1) as u8);
        }
        let same: Vec<u8> = (0..10).map(|i| i % 8).collect();
        let mut streamed = vec![0u8; 4];
        let mut pos = 0;
        for &c in &same {
            write_bits(&mut streamed, &mut pos, c, 3);
        }
        let mut packed = vec![0u8; 4];
        pack(&same, 3, &mut packed).unwrap();
        assert_eq!(streamed, packed);
    }

    /// The bit order is part of the stored format: re-derive it for one example per width.
    #[test]
    fn layout_is_lsb_first() {
        let mut out = [0u8; 2];
        pack(&[1, 2, 3, 0, 1, 2, 3, 1], 2, &mut out).unwrap();
        assert_eq!(out, [0b00_11_10_01, 0b01_11_10_01]);
        let mut out = [0u8; 2];
        pack(&[5, 7, 1], 3, &mut out).unwrap();
        // stream: 101 111 100 -> byte0 bits0..7 = 1,0,1,1,1,1,1,0 ; byte1 bit0 = 0
        assert_eq!(out, [0b0111_1101, 0b0000_0000]);
        let mut out = [0u8; 1];
        pack(&[0xA, 0x3], 4, &mut out).unwrap();
        assert_eq!(out, [0x3A]);
    }

    #[test]
    fn errors_are_typed() {
        let mut out = [0u8; 1];
        assert_eq!(
            pack(&[4], 2, &mut out),
            Err(Error::CodeOutOfRange {
                index: 0,
                code: 4,
                bits: 2
            })
        );
        assert!(matches!(
            pack(&[1, 1], 0, &mut out),
            Err(Error::BitsOutOfRange { bits: 0 })
        ));
        assert!(matches!(
            pack(&[1; 9], 1, &mut out),
            Err(Error::LengthMismatch { .. })
        ));
        let mut codes = [0u8; 3];
        assert!(matches!(
            unpack(&[0], 4, &mut codes),
            Err(Error::LengthMismatch { .. })
        ));
    }

    proptest! {
        #[test]
        fn round_trip(bits in 1u32..=8, raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let codes: Vec<u8> = raw.iter().map(|c| (*c as u32 & ((1 << bits) - 1)) as u8).collect();
            let mut packed = vec![0u8; packed_len(codes.len(), bits)];
            pack(&codes, bits, &mut packed).unwrap();
            let mut back = vec![0u8; codes.len()];
            unpack(&packed, bits, &mut back).unwrap();
            prop_assert_eq!(&back, &codes);
            // unused high bits of the last byte are zero
            let used = codes.len() * bits as usize;
            if !used.is_multiple_of(8) {
                let last = *packed.last().unwrap();
                prop_assert_eq!(last >> (used % 8), 0);
            }
        }
    }
}
