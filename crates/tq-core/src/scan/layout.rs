//! The 32-row block layout: writing and reading rows of packed codes (see the module docs of
//! `scan`).

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
