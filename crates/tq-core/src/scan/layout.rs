//! The 32-row block layout: writing and reading rows of packed codes (see the module docs of
//! `scan`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__m128i;

/// Rows per block.
pub const BLOCK: usize = 32;

/// Bytes of one block of rows of `row_bytes` bytes: `32 * row_bytes`.
#[inline]
pub const fn block_bytes(row_bytes: usize) -> usize {
    BLOCK * row_bytes
}

/// Writes row-major packed `row` (of `row_bytes` bytes) into slot `slot < 32` of `block`,
/// replacing what was there. O(row_bytes).
///
/// # Panics
/// If `slot >= 32` or `block.len() != 32 * row.len()`, before anything is written.
pub fn write_row(block: &mut [u8], slot: usize, row: &[u8]) {
    assert!(slot < BLOCK, "slot {slot} is not below {BLOCK}");
    check_block(block.len(), row.len());
    let (i, shift, keep) = if slot < 16 {
        (slot, 0, 0xF0u8)
    } else {
        (slot - 16, 4, 0x0Fu8)
    };
    for (k, &byte) in row.iter().enumerate() {
        let lo = byte & 0x0F;
        let hi = byte >> 4;
        let p0 = &mut block[(2 * k) * 16 + i];
        *p0 = (*p0 & keep) | (lo << shift);
        let p1 = &mut block[(2 * k + 1) * 16 + i];
        *p1 = (*p1 & keep) | (hi << shift);
    }
}

/// Writes `rows.len() / row_bytes <= 32` row-major packed rows into slots `0..` of `block`,
/// replacing the whole block (later slots become zero). Same result as [`write_row`] per row,
/// without read-modify-write. O(32 · row_bytes).
///
/// # Panics
/// If `row_bytes == 0`, `block.len() != 32 * row_bytes`, or `rows` is not a whole number of at
/// most 32 rows, before anything is written.
pub fn write_block(rows: &[u8], row_bytes: usize, block: &mut [u8]) {
    check_block(block.len(), row_bytes);
    assert!(
        row_bytes > 0 && rows.len().is_multiple_of(row_bytes) && rows.len() <= block.len(),
        "{} bytes are not whole rows of {row_bytes} bytes fitting one block",
        rows.len()
    );
    let count = rows.len() / row_bytes;
    let zero = vec![0u8; if count < BLOCK { row_bytes } else { 0 }];
    let row = |slot: usize| {
        if slot < count {
            &rows[slot * row_bytes..(slot + 1) * row_bytes]
        } else {
            &zero[..]
        }
    };
    for i in 0..16 {
        let (a, b) = (row(i), row(i + 16));
        for (k, (&x, &y)) in a.iter().zip(b).enumerate() {
            block[32 * k + i] = (x & 0x0F) | (y << 4);
            block[32 * k + 16 + i] = (x >> 4) | (y & 0xF0);
        }
    }
}

/// Writes up to 32 rows of 4-bit codes given one per byte (`codes` row-major, `n = codes.len() /
/// d` rows of `d` codes, each below 16) into a whole block, slots `n..32` zero: the block
/// [`write_block`] makes from the same rows packed LSB-first (nibble `j` holds code `j`), without
/// packing them first. A nibble position past `d` (odd `d`) is zero. On x86-64 whole blocks go 16
/// positions at a time through an SSE2 16 x 16 byte transpose; [`write_block_codes4_scalar`] is
/// the specification. O(32 · d).
///
/// # Panics
/// Before anything is written, unless `d >= 1`, `codes.len()` is a whole number of at most 32
/// rows of `d` and `block.len() == 32 · ceil(d / 2)`.
pub fn write_block_codes4(codes: &[u8], d: usize, block: &mut [u8]) {
    check_codes4(codes.len(), d, block.len());
    #[cfg(target_arch = "x86_64")]
    if codes.len() == BLOCK * d && !cfg!(miri) {
        // SSE2 is part of x86-64; the lengths were checked above.
        let done = transpose_codes4_sse2(codes, d, block);
        write_positions_scalar(codes, d, block, done);
        return;
    }
    write_positions_scalar(codes, d, block, 0);
}

/// Scalar twin of [`write_block_codes4`], the specification.
///
/// # Panics
/// As [`write_block_codes4`].
pub fn write_block_codes4_scalar(codes: &[u8], d: usize, block: &mut [u8]) {
    check_codes4(codes.len(), d, block.len());
    write_positions_scalar(codes, d, block, 0);
}

fn check_codes4(codes: usize, d: usize, block: usize) {
    assert!(
        d >= 1
            && codes.is_multiple_of(d)
            && codes <= BLOCK * d
            && block == block_bytes(d.div_ceil(2)),
        "{codes} codes are not whole rows of {d} fitting a block of {block} bytes"
    );
}

/// Nibble positions `from..` of a [`write_block_codes4`] block (checked lengths).
fn write_positions_scalar(codes: &[u8], d: usize, block: &mut [u8], from: usize) {
    let n = codes.len() / d;
    let code = |slot: usize, p: usize| {
        if slot < n && p < d {
            codes[slot * d + p] & 0x0F
        } else {
            0
        }
    };
    for p in from..2 * d.div_ceil(2) {
        for i in 0..16 {
            block[16 * p + i] = code(i, p) | (code(i + 16, p) << 4);
        }
    }
}

/// The positions `0..16 ⌊d / 16⌋` of a whole block (`codes.len() == 32 d`, checked) by 16 x 16
/// byte transposes: rows `i` and `i + 16` of 16 positions are merged into one byte each (`lo |
/// hi << 4`, codes below 16 so the 16-bit shift cannot carry across bytes), then four rounds of
/// unpacks turn the 16 row vectors into 16 position vectors. Returns the first position not
/// written.
#[cfg(target_arch = "x86_64")]
fn transpose_codes4_sse2(codes: &[u8], d: usize, block: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let whole = d / 16 * 16;
    for p0 in (0..whole).step_by(16) {
        let v: [__m128i; 16] = std::array::from_fn(|i| {
            let (a, b) = (
                &codes[i * d + p0..][..16],
                &codes[(i + 16) * d + p0..][..16],
            );
            // SAFETY: SSE2 is baseline on x86-64; `a` and `b` hold 16 bytes each (sliced above).
            unsafe {
                let mask = _mm_set1_epi8(0x0F);
                let a = _mm_and_si128(_mm_loadu_si128(a.as_ptr().cast()), mask);
                let b = _mm_and_si128(_mm_loadu_si128(b.as_ptr().cast()), mask);
                _mm_or_si128(a, _mm_slli_epi16(b, 4))
            }
        });
        // SAFETY (every unpack below): SSE2 is baseline on x86-64; register operations only.
        let a = unpack_round(
            &v,
            1,
            |x, y| unsafe { _mm_unpacklo_epi8(x, y) },
            |x, y| unsafe { _mm_unpackhi_epi8(x, y) },
        );
        let b = unpack_round(
            &a,
            2,
            |x, y| unsafe { _mm_unpacklo_epi16(x, y) },
            |x, y| unsafe { _mm_unpackhi_epi16(x, y) },
        );
        let c = unpack_round(
            &b,
            4,
            |x, y| unsafe { _mm_unpacklo_epi32(x, y) },
            |x, y| unsafe { _mm_unpackhi_epi32(x, y) },
        );
        for j in 0..8 {
            let (x, y) = (c[j], c[j + 8]);
            // SAFETY: SSE2 is baseline on x86-64; register operations only.
            let halves = unsafe { [_mm_unpacklo_epi64(x, y), _mm_unpackhi_epi64(x, y)] };
            for (half, t) in halves.into_iter().enumerate() {
                let out = &mut block[16 * (p0 + 2 * j + half)..][..16];
                // SAFETY: `out` holds 16 bytes (sliced above).
                unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), t) };
            }
        }
    }
    whole
}

/// One interleave round of [`transpose_codes4_sse2`]: output `k` interleaves `v[i]` and
/// `v[i + span]` with `i = 2·span·⌊k / 2span⌋ + (k mod 2span) / 2`, the low halves (`lo`) for even
/// `k`, the high halves (`hi`) for odd `k`. Spans 1, 2 and 4 with byte, word and dword unpacks
/// are the transpose's first three rounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn unpack_round(
    v: &[__m128i; 16],
    span: usize,
    lo: impl Fn(__m128i, __m128i) -> __m128i,
    hi: impl Fn(__m128i, __m128i) -> __m128i,
) -> [__m128i; 16] {
    std::array::from_fn(|k| {
        let (q, r) = (k / (2 * span), k % (2 * span));
        let i = 2 * span * q + r / 2;
        if r % 2 == 0 {
            lo(v[i], v[i + span])
        } else {
            hi(v[i], v[i + span])
        }
    })
}

/// Writes `rows.len() / row_bytes` row-major packed rows into slots `first_slot..` of `block`:
/// a whole-block [`write_block`] from slot 0 (later slots become zero), per-row [`write_row`]s
/// otherwise (the other slots are kept).
///
/// # Panics
/// If `rows` is not whole rows of `row_bytes >= 1` bytes, if they reach past slot 31, or if the
/// block has the wrong size.
pub fn write_rows(rows: &[u8], row_bytes: usize, block: &mut [u8], first_slot: usize) {
    assert!(
        row_bytes > 0
            && rows.len().is_multiple_of(row_bytes)
            && first_slot + rows.len() / row_bytes <= BLOCK,
        "{} bytes are not whole rows of {row_bytes} bytes fitting slots {first_slot}..32",
        rows.len()
    );
    if first_slot == 0 {
        write_block(rows, row_bytes, block);
    } else {
        for (k, r) in rows.chunks_exact(row_bytes).enumerate() {
            write_row(block, first_slot + k, r);
        }
    }
}

/// Reads slot `slot < 32` of `block` back into row-major packed bytes `out`. O(row_bytes).
///
/// # Panics
/// If `slot >= 32` or `block.len() != 32 * out.len()`.
pub fn read_row(block: &[u8], slot: usize, out: &mut [u8]) {
    assert!(slot < BLOCK, "slot {slot} is not below {BLOCK}");
    check_block(block.len(), out.len());
    let (i, shift) = if slot < 16 { (slot, 0) } else { (slot - 16, 4) };
    for (k, o) in out.iter_mut().enumerate() {
        let lo = (block[(2 * k) * 16 + i] >> shift) & 0x0F;
        let hi = (block[(2 * k + 1) * 16 + i] >> shift) & 0x0F;
        *o = lo | (hi << 4);
    }
}

/// Panics unless a block of `len` bytes holds 32 rows of `row_bytes >= 1` bytes.
#[inline]
pub(super) fn check_block(len: usize, row_bytes: usize) {
    assert!(
        row_bytes > 0 && len == block_bytes(row_bytes),
        "a block of {len} bytes does not hold 32 rows of {row_bytes} bytes"
    );
}
