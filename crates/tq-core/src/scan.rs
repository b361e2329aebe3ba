//! Look-up-table scanning of packed codes in blocks of 32 rows (the "fast scan" layout).
//!
//! A packed row of `row_bytes` bytes is a stream of `2 * row_bytes` nibbles (nibble `n` is bits
//! `4n..4n+4` of the LSB-first stream, see [`crate::bitpack`]). A **block** stores 32 rows with their
//! nibbles transposed: for each nibble position `n`, 16 bytes, where byte `i` holds nibble `n` of
//! row `i` in its low half and nibble `n` of row `i + 16` in its high half. A block therefore takes
//! exactly `32 * row_bytes` bytes: the layout is a permutation of the row-major bits, no padding
//! inside a block (a partially filled last block keeps zero rows).
//!
//! **Baked into stored data:** this permutation, which the batch containers of tq-quant keep in
//! memory and which the GPU kernels read.
//!
//! For bit widths that divide 4 (1, 2, 4) every nibble holds whole codes, so any additive per-row
//! score `Σ_j g_j(code_j)` is a sum of one 16-entry table per nibble position. [`scan_block`] sums
//! such tables quantized to `u8` for all 32 rows at once: with AVX2 one `vpshufb` performs 32
//! look-ups, accumulated in `u16` lanes and flushed to `u32` every 256 nibble pairs, so no sum can
//! overflow (`256 · 255 < 65536`). [`scan_block_scalar`] is the specification.
//!
//! [`QuantizedLut`] turns float tables into `u8` tables with one shared step `Δ` and a per-table
//! offset: `score ≈ offset + Δ · Σ u8`. Each entry is rounded to the nearest step, so the error of
//! one table is at most `Δ/2` and the error of a score over `P` tables has standard deviation
//! `Δ · sqrt(P / 12)` when the roundings are independent.

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

/// `u8` look-up tables for [`scan_block`]: `16 * positions` bytes, table `n` at `16n..16n+16`.
#[derive(Debug, Clone, Default)]
pub struct QuantizedLut {
    /// The tables, 16 bytes per nibble position.
    pub tables: Vec<u8>,
    /// Sum of the per-table minima: added to every score.
    pub offset: f32,
    /// The shared step `Δ`: one unit of the `u8` sum is worth `Δ`.
    pub step: f32,
}

impl QuantizedLut {
    /// Quantizes float tables (`16 * positions` values) to `u8` with a shared step
    /// `Δ = max_n (max T_n - min T_n) / 255` and per-table offsets `min T_n`. Reuses `self`'s
    /// allocation. O(positions · 16).
    ///
    /// # Panics
    /// If `tables.len()` is not a multiple of 16.
    pub fn quantize_from(&mut self, tables: &[f32]) {
        assert!(
            tables.len().is_multiple_of(16),
            "{} table entries are not whole 16-entry tables",
            tables.len()
        );
        let mut offset = 0.0f64;
        let mut range = 0.0f32;
        for t in tables.chunks_exact(16) {
            let (lo, hi) = t
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            range = range.max(hi - lo);
        }
        let step = if range > 0.0 { range / 255.0 } else { 1.0 };
        let inv = 1.0 / step;
        self.tables.clear();
        self.tables.reserve(tables.len());
        for t in tables.chunks_exact(16) {
            let lo = t.iter().copied().fold(f32::INFINITY, f32::min);
            offset += lo as f64;
            self.tables.extend(
                t.iter()
                    .map(|&v| ((v - lo) * inv).round().clamp(0.0, 255.0) as u8),
            );
        }
        self.offset = offset as f32;
        self.step = step;
    }

    /// Converts a `u8` table sum to a score.
    #[inline]
    pub fn score(&self, sum: u32) -> f32 {
        self.offset + self.step * sum as f32
    }
}

/// `out[r] = Σ_n tables[16n + nibble_n(row r)]` for the 32 rows of `block` (see the module docs).
/// `tables.len()` must be `16 * positions` with `positions = 2 * row_bytes`, i.e. equal to
/// `block.len()`. Runtime-dispatched: AVX2 when the CPU has it, else [`scan_block_scalar`].
///
/// # Panics
/// If `block.len()` is not a multiple of 32 or `tables.len() != block.len()`; the check runs
/// before any kernel reads memory.
#[inline]
pub fn scan_block(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
    check_nibble_scan(block.len(), tables.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX2 is present (checked at run time) and `check_nibble_scan` proved
            // `block.len() == tables.len()`, a multiple of 32: the kernel's only preconditions.
            unsafe { x86::scan_block_avx2(block, tables, out) };
            return;
        }
    }
    scan_block_scalar(block, tables, out)
}

/// Scalar twin of [`scan_block`], the specification.
///
/// # Panics
/// As [`scan_block`].
pub fn scan_block_scalar(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
    check_nibble_scan(block.len(), tables.len());
    out.fill(0);
    for (bytes, table) in block.chunks_exact(16).zip(tables.chunks_exact(16)) {
        for (i, &b) in bytes.iter().enumerate() {
            out[i] += table[(b & 0x0F) as usize] as u32;
            out[i + 16] += table[(b >> 4) as usize] as u32;
        }
    }
}

/// Float twin of [`scan_block_scalar`]: `out[r] = Σ_n tables[16n + nibble_n(row r)]` with `f32`
/// tables (the exact path used for reference scores and re-ranking). O(32 · positions).
///
/// # Panics
/// As [`scan_block`].
pub fn scan_block_f32(block: &[u8], tables: &[f32], out: &mut [f32; BLOCK]) {
    check_nibble_scan(block.len(), tables.len());
    out.fill(0.0);
    for (bytes, table) in block.chunks_exact(16).zip(tables.chunks_exact(16)) {
        for (i, &b) in bytes.iter().enumerate() {
            out[i] += table[(b & 0x0F) as usize];
            out[i + 16] += table[(b >> 4) as usize];
        }
    }
}

/// `Σ_n tables[16n + nibble_n(row)]` for one row-major packed row. O(row_bytes).
///
/// # Panics
/// If `tables.len() != 32 * row.len()`.
pub fn score_row_f32(row: &[u8], tables: &[f32]) -> f32 {
    assert_eq!(tables.len(), 32 * row.len(), "tables do not fit the row");
    let mut s = 0.0f32;
    for (k, &b) in row.iter().enumerate() {
        s += tables[32 * k + (b & 0x0F) as usize] + tables[32 * k + 16 + (b >> 4) as usize];
    }
    s
}

/// Nibble `pos` of row `slot` of a block.
#[inline(always)]
fn nibble(block: &[u8], pos: usize, slot: usize) -> u8 {
    let b = block[pos * 16 + (slot & 15)];
    if slot < 16 { b & 0x0F } else { b >> 4 }
}

/// The 3-bit code of coordinate `j` of row `slot`, read from the block's nibbles.
#[inline(always)]
fn code3(block: &[u8], j: usize, slot: usize) -> usize {
    let bit = 3 * j;
    let (pos, off) = (bit / 4, bit % 4);
    let mut v = (nibble(block, pos, slot) >> off) as usize;
    if off > 1 {
        v |= (nibble(block, pos + 1, slot) as usize) << (4 - off);
    }
    v & 7
}

/// Coordinates covered by 3-bit rows of `row_bytes` bytes (the scan reads `⌊8·row_bytes/3⌋`
/// codes; the padding codes past `d` are 0 and must have all-zero tables).
pub const fn coords3(row_bytes: usize) -> usize {
    8 * row_bytes / 3
}

/// 3-bit scan: `out[r] = Σ_j tables[16j + code_j(row r)]` with one 16-byte table per coordinate
/// (entries 8..16 unused). `tables.len()` must be `16 * coords3(row_bytes)`.
/// Four coordinates span exactly three nibbles; the AVX2 kernel rebuilds the four codes of 32 rows
/// from three nibble vectors with shifts and masks and looks them up with `vpshufb`.
///
/// # Panics
/// If `block.len()` is not a multiple of 32 or `tables.len() != 16 * coords3(block.len() / 32)`;
/// the check runs before any kernel reads memory.
pub fn scan_block_b3(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
    check_b3_scan(block.len(), tables.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX2 is present (checked at run time) and `check_b3_scan` proved that the
            // block holds `2 · row_bytes` nibble positions of 16 bytes and the tables
            // `coords3(row_bytes)` tables of 16 bytes: the kernel's only preconditions.
            unsafe { x86::scan_block_b3_avx2(block, tables, out) };
            return;
        }
    }
    scan_block_b3_scalar(block, tables, out)
}

/// Scalar twin of [`scan_block_b3`].
///
/// # Panics
/// As [`scan_block_b3`].
pub fn scan_block_b3_scalar(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
    check_b3_scan(block.len(), tables.len());
    let coords = tables.len() / 16;
    for (slot, o) in out.iter_mut().enumerate() {
        *o = (0..coords)
            .map(|j| tables[16 * j + code3(block, j, slot)] as u32)
            .sum();
    }
}

/// Float twin of [`scan_block_b3_scalar`] (the exact path).
///
/// # Panics
/// As [`scan_block_b3`].
pub fn scan_block_b3_f32(block: &[u8], tables: &[f32], out: &mut [f32; BLOCK]) {
    check_b3_scan(block.len(), tables.len());
    let coords = tables.len() / 16;
    for (slot, o) in out.iter_mut().enumerate() {
        *o = (0..coords)
            .map(|j| tables[16 * j + code3(block, j, slot)])
            .sum();
    }
}

/// Weighted sum of decoded rows: `acc[j] += Σ_i weights[i] · values[code_j(row i)]` for rows
/// `i < weights.len()` stored in `blocks` (`ceil(n/32)` blocks of `32 · row_bytes` bytes) and
/// `j < acc.len()` (the dimension; at most the codes per row). Blocks whose weights are all zero
/// are skipped. AVX2 for `bits <= 4`: each coordinate's 32 codes are cut out of one or two nibble
/// vectors with shifts, looked up with `vpermps` (two tables and a blend at 4 bits) and multiplied
/// into 8 rows per FMA, with the per-coordinate partial sums kept in 8-lane registers across blocks
/// and reduced once; wider codes and other CPUs use [`accumulate_block_scalar`]. O(n · dim).
///
/// # Panics
/// As [`accumulate_blocks_multi`].
pub fn accumulate_blocks(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    values: &[f32],
    weights: &[f32],
    acc: &mut [f32],
) {
    accumulate_blocks_multi(blocks, row_bytes, bits, values, &[weights], &mut [acc]);
}

/// [`accumulate_blocks`] for several weight vectors at once (e.g. the queries of one
/// grouped-query head): `accs[q][j] += Σ_i weights[q][i] · values[code_j(row i)]`. The codes are
/// decoded once per block and coordinate and used by every weight vector. All weight vectors have
/// the same length `n`; all accumulators the same length `dim`. O(n · dim · (1 + queries/8)).
///
/// # Panics
/// Before any memory is read, unless: `bits` is in `1..=8`, `row_bytes >= 1`, `values` holds at
/// least `2^bits` entries, there are as many accumulators as weight vectors, every weight vector
/// covers exactly the blocks (`blocks.len() == ceil(len / 32) · 32 · row_bytes`; rows past a
/// shorter vector's end weigh 0), and every accumulator has the same length
/// `dim <= 8 · row_bytes / bits` (the codes a row holds).
pub fn accumulate_blocks_multi(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    values: &[f32],
    weights: &[&[f32]],
    accs: &mut [&mut [f32]],
) {
    check_accumulate(blocks.len(), row_bytes, bits, values.len(), weights, accs);
    #[cfg(target_arch = "x86_64")]
    {
        if bits <= 4 && has_avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked at run time) and `check_accumulate`
            // proved every length the kernel reads through: each block has `2 · row_bytes`
            // nibble positions, each coordinate `j < dim` lies in them, each weight vector
            // covers the blocks, and `values` has `2^bits <= 16` entries.
            unsafe { x86::accumulate_blocks_avx2(blocks, row_bytes, bits, values, weights, accs) };
            return;
        }
    }
    for (w, acc) in weights.iter().zip(accs.iter_mut()) {
        for (block, w) in blocks
            .chunks_exact(block_bytes(row_bytes))
            .zip(w.chunks(BLOCK))
        {
            let mut w32 = [0.0f32; BLOCK];
            w32[..w.len()].copy_from_slice(w);
            if w32.iter().any(|&x| x != 0.0) {
                accumulate_block_scalar(block, bits, values, &w32, acc);
            }
        }
    }
}

/// Scalar twin of [`accumulate_blocks`] for one block (rows with weight 0 are skipped).
///
/// # Panics
/// If `bits` is not in `1..=8`, `block.len()` is not a positive multiple of 32, `values` has
/// fewer than `2^bits` entries, or `acc` is longer than the codes a row holds.
pub fn accumulate_block_scalar(
    block: &[u8],
    bits: u32,
    values: &[f32],
    weights: &[f32; BLOCK],
    acc: &mut [f32],
) {
    let row_bytes = block.len() / BLOCK;
    check_block(block.len(), row_bytes);
    check_codes(row_bytes, bits, values.len(), acc.len());
    let mut row = vec![0u8; row_bytes];
    // `8·row_bytes / bits` codes fill the row exactly (the last ones may be padding).
    let mut codes = vec![0u8; 8 * row_bytes / bits as usize];
    for (slot, &w) in weights.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        read_row(block, slot, &mut row);
        crate::bitpack::unpack_unchecked(&row, bits, &mut codes);
        for (a, &c) in acc.iter_mut().zip(&codes) {
            *a += w * values[c as usize];
        }
    }
}

/// Panics unless a block of `len` bytes holds 32 rows of `row_bytes >= 1` bytes.
#[inline]
fn check_block(len: usize, row_bytes: usize) {
    assert!(
        row_bytes > 0 && len == block_bytes(row_bytes),
        "a block of {len} bytes does not hold 32 rows of {row_bytes} bytes"
    );
}

/// Panics unless `block_len` is a multiple of 32 and `tables_len == block_len`.
#[inline]
fn check_nibble_scan(block_len: usize, tables_len: usize) {
    assert!(
        block_len.is_multiple_of(BLOCK) && tables_len == block_len,
        "{tables_len} table bytes do not fit a block of {block_len} bytes"
    );
}

/// Panics unless `block_len` is a multiple of 32 and `tables_len` holds one 16-byte table per
/// 3-bit code of a row.
#[inline]
fn check_b3_scan(block_len: usize, tables_len: usize) {
    assert!(
        block_len.is_multiple_of(BLOCK) && tables_len == 16 * coords3(block_len / BLOCK),
        "{tables_len} table bytes do not fit the 3-bit codes of a block of {block_len} bytes"
    );
}

/// Panics unless `bits` is in `1..=8`, `values` holds `2^bits` entries and `dim` codes fit in a
/// row of `row_bytes` bytes.
#[inline]
fn check_codes(row_bytes: usize, bits: u32, values: usize, dim: usize) {
    assert!((1..=8).contains(&bits), "bit width {bits} is not in 1..=8");
    assert!(
        values >= 1 << bits,
        "{values} values cannot decode {bits}-bit codes"
    );
    assert!(
        dim <= 8 * row_bytes / bits as usize,
        "{dim} coordinates do not fit rows of {row_bytes} bytes at {bits} bits"
    );
}

/// The preconditions of [`accumulate_blocks_multi`].
fn check_accumulate(
    blocks: usize,
    row_bytes: usize,
    bits: u32,
    values: usize,
    weights: &[&[f32]],
    accs: &[&mut [f32]],
) {
    assert!(row_bytes > 0, "rows of 0 bytes hold no codes");
    assert_eq!(
        weights.len(),
        accs.len(),
        "one accumulator per weight vector"
    );
    for w in weights {
        assert_eq!(
            blocks,
            w.len().div_ceil(BLOCK) * block_bytes(row_bytes),
            "{} weights do not cover {blocks} bytes of blocks",
            w.len()
        );
    }
    let dim = accs.first().map_or(0, |a| a.len());
    assert!(
        accs.iter().all(|a| a.len() == dim),
        "accumulators of different lengths"
    );
    check_codes(row_bytes, bits, values, dim);
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        !cfg!(miri)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| !cfg!(miri) && std::arch::is_x86_feature_detected!("avx2"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// AVX2 body of `scan_block_b3`: groups of three nibble positions (four coordinates) per step,
    /// the remaining coordinates through the scalar decoder.
    ///
    /// # Safety
    /// The CPU supports AVX2; `block.len()` is a multiple of 32 (nibble positions of 16 bytes)
    /// and `tables.len() == 16 * coords3(block.len() / 32)`, so every 16-byte load of a nibble
    /// position `< 2 · row_bytes` and of a table `< coords` stays in its slice.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scan_block_b3_avx2(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
        out.fill(0);
        let coords = tables.len() / 16;
        let groups = coords / 4;
        let low = _mm256_set1_epi8(0x0F);
        let m1 = _mm256_set1_epi8(1);
        let m3 = _mm256_set1_epi8(3);
        let m7 = _mm256_set1_epi8(7);
        let zero = _mm256_setzero_si256();
        let mut g = 0;
        while g < groups {
            let chunk = (groups - g).min(64);
            let (mut lo, mut hi) = (zero, zero);
            for gg in g..g + chunk {
                // Nibbles of 32 rows: lane 0 rows 0..15, lane 1 rows 16..31.
                let mut e = [zero; 3];
                for (k, ek) in e.iter_mut().enumerate() {
                    // SAFETY: nibble position 3gg+k < 2·row_bytes, so 16 bytes are in the block.
                    let b = unsafe {
                        _mm_loadu_si128(block.as_ptr().add((3 * gg + k) * 16) as *const __m128i)
                    };
                    let l = _mm_and_si128(b, _mm256_castsi256_si128(low));
                    let h = _mm_and_si128(_mm_srli_epi16(b, 4), _mm256_castsi256_si128(low));
                    *ek = _mm256_inserti128_si256(_mm256_castsi128_si256(l), h, 1);
                }
                let c0 = _mm256_and_si256(e[0], m7);
                let c1 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(e[0], 3), m1),
                    _mm256_slli_epi16(_mm256_and_si256(e[1], m3), 1),
                );
                let c2 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(e[1], 2), m3),
                    _mm256_slli_epi16(_mm256_and_si256(e[2], m1), 2),
                );
                let c3 = _mm256_and_si256(_mm256_srli_epi16(e[2], 1), m7);
                for (k, c) in [c0, c1, c2, c3].into_iter().enumerate() {
                    // SAFETY: table 4gg+k < coords, 16 bytes each.
                    let t = unsafe {
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(
                            tables.as_ptr().add((4 * gg + k) * 16) as *const __m128i,
                        ))
                    };
                    let r = _mm256_shuffle_epi8(t, c);
                    lo = _mm256_add_epi16(lo, _mm256_unpacklo_epi8(r, zero));
                    hi = _mm256_add_epi16(hi, _mm256_unpackhi_epi8(r, zero));
                }
            }
            g += chunk;
            let mut a = [0u16; 16];
            let mut b = [0u16; 16];
            // SAFETY: 32-byte arrays.
            unsafe {
                _mm256_storeu_si256(a.as_mut_ptr() as *mut __m256i, lo);
                _mm256_storeu_si256(b.as_mut_ptr() as *mut __m256i, hi);
            }
            for j in 0..8 {
                out[j] += a[j] as u32;
                out[16 + j] += a[8 + j] as u32;
                out[8 + j] += b[j] as u32;
                out[24 + j] += b[8 + j] as u32;
            }
        }
        for j in 4 * groups..coords {
            for (slot, o) in out.iter_mut().enumerate() {
                *o += tables[16 * j + super::code3(block, j, slot)] as u32;
            }
        }
    }

    /// AVX2 body of `accumulate_blocks_multi`: per block and coordinate, the 32 codes are cut out
    /// of one or two nibble vectors, looked up once, and FMA'd into 8-lane partial sums of every
    /// weight vector; the partial sums are reduced once at the end.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `1 <= bits <= 4`; `row_bytes >= 1` and `blocks` is whole
    /// blocks of `32 · row_bytes` bytes; every weight vector covers exactly those blocks; every
    /// accumulator has the same length `dim <= 8 · row_bytes / bits`, so each coordinate's
    /// nibble positions lie inside its block; `values` has at least `2^bits` entries.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate_blocks_avx2(
        blocks: &[u8],
        row_bytes: usize,
        bits: u32,
        values: &[f32],
        weights: &[&[f32]],
        accs: &mut [&mut [f32]],
    ) {
        let b = bits as usize;
        let dim = accs.first().map_or(0, |a| a.len());
        let nq = weights.len();
        let mut table = [0f32; 16];
        table[..1 << bits].copy_from_slice(&values[..1 << bits]);
        // SAFETY: 16-entry table.
        let (c_lo, c_hi) = unsafe {
            (
                _mm256_loadu_ps(table.as_ptr()),
                _mm256_loadu_ps(table.as_ptr().add(8)),
            )
        };
        let low = _mm_set1_epi8(0x0F);
        let mask = _mm_set1_epi8(((1u32 << bits) - 1) as i8);
        // lanes[q * dim + j]: 8-lane partial sums of query q, coordinate j.
        let mut lanes = vec![_mm256_setzero_ps(); nq * dim];
        let mut w = vec![[_mm256_setzero_ps(); 4]; nq];
        let mut active = vec![false; nq];
        let bb = super::block_bytes(row_bytes);
        for (bi, block) in blocks.chunks_exact(bb).enumerate() {
            let mut any = false;
            for ((wq, act), src) in w.iter_mut().zip(active.iter_mut()).zip(weights) {
                let mut w32 = [0.0f32; BLOCK];
                let part = &src[bi * BLOCK..((bi + 1) * BLOCK).min(src.len())];
                w32[..part.len()].copy_from_slice(part);
                *act = w32.iter().any(|&x| x != 0.0);
                any |= *act;
                // SAFETY: `w32` has 32 entries.
                *wq = unsafe {
                    [
                        _mm256_loadu_ps(w32.as_ptr()),
                        _mm256_loadu_ps(w32.as_ptr().add(8)),
                        _mm256_loadu_ps(w32.as_ptr().add(16)),
                        _mm256_loadu_ps(w32.as_ptr().add(24)),
                    ]
                };
            }
            if !any {
                continue;
            }
            let nibbles = |pos: usize| -> (__m128i, __m128i) {
                // SAFETY: nibble position `pos < 2·row_bytes` has 16 bytes in the block.
                let v = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * pos) as *const __m128i) };
                (
                    _mm_and_si128(v, low),
                    _mm_and_si128(_mm_srli_epi16(v, 4), low),
                )
            };
            for j in 0..dim {
                let (pos, off) = (b * j / 4, b * j % 4);
                let shift = _mm_cvtsi32_si128(off as i32);
                let (mut lo, mut hi) = nibbles(pos);
                lo = _mm_srl_epi16(lo, shift);
                hi = _mm_srl_epi16(hi, shift);
                if off + b > 4 {
                    let back = _mm_cvtsi32_si128((4 - off) as i32);
                    let (lo2, hi2) = nibbles(pos + 1);
                    lo = _mm_or_si128(lo, _mm_sll_epi16(lo2, back));
                    hi = _mm_or_si128(hi, _mm_sll_epi16(hi2, back));
                }
                let (lo, hi) = (_mm_and_si128(lo, mask), _mm_and_si128(hi, mask));
                let groups = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                let mut v = [_mm256_setzero_ps(); 4];
                for (vg, g) in v.iter_mut().zip(groups) {
                    let idx = _mm256_cvtepu8_epi32(g);
                    *vg = if b == 4 {
                        let a_lo = _mm256_permutevar8x32_ps(c_lo, idx);
                        let a_hi = _mm256_permutevar8x32_ps(c_hi, idx);
                        _mm256_blendv_ps(
                            a_lo,
                            a_hi,
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)),
                        )
                    } else {
                        _mm256_permutevar8x32_ps(c_lo, idx)
                    };
                }
                for (q, wq) in w.iter().enumerate() {
                    if !active[q] {
                        continue;
                    }
                    let lane = &mut lanes[q * dim + j];
                    let mut s = *lane;
                    for (vg, wg) in v.iter().zip(wq) {
                        s = _mm256_fmadd_ps(*vg, *wg, s);
                    }
                    *lane = s;
                }
            }
        }
        for (q, acc) in accs.iter_mut().enumerate() {
            for (a, s) in acc.iter_mut().zip(&lanes[q * dim..(q + 1) * dim]) {
                let s = *s;
                let x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
                let x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
                *a += _mm_cvtss_f32(x);
            }
        }
    }

    /// AVX2 body of `scan_block`: two nibble positions (32 bytes of codes, two 16-byte tables) per
    /// step; `u16` accumulators flushed to `u32` every 256 steps.
    ///
    /// # Safety
    /// The CPU supports AVX2 and `tables.len() == block.len()`, a multiple of 32, so every
    /// 32-byte load at `s · 32` for `s < block.len() / 32` stays inside both slices.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scan_block_avx2(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
        out.fill(0);
        let steps = block.len() / 32;
        let mask = _mm256_set1_epi8(0x0F);
        let zero = _mm256_setzero_si256();
        let mut done = 0;
        while done < steps {
            let chunk = (steps - done).min(256);
            let (mut a0, mut a1, mut a2, mut a3) = (zero, zero, zero, zero);
            for s in done..done + chunk {
                // SAFETY: `s * 32 + 32 <= block.len() == tables.len()`; unaligned loads.
                let (x, t) = unsafe {
                    (
                        _mm256_loadu_si256(block.as_ptr().add(s * 32) as *const __m256i),
                        _mm256_loadu_si256(tables.as_ptr().add(s * 32) as *const __m256i),
                    )
                };
                let lo = _mm256_and_si256(x, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), mask);
                let rl = _mm256_shuffle_epi8(t, lo);
                let rh = _mm256_shuffle_epi8(t, hi);
                a0 = _mm256_add_epi16(a0, _mm256_unpacklo_epi8(rl, zero));
                a1 = _mm256_add_epi16(a1, _mm256_unpackhi_epi8(rl, zero));
                a2 = _mm256_add_epi16(a2, _mm256_unpacklo_epi8(rh, zero));
                a3 = _mm256_add_epi16(a3, _mm256_unpackhi_epi8(rh, zero));
            }
            done += chunk;
            // Lane 0 holds the even nibble position, lane 1 the odd one: add the two lanes.
            for (k, acc) in [a0, a1, a2, a3].into_iter().enumerate() {
                let mut lanes = [0u16; 16];
                // SAFETY: `lanes` is 32 bytes.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc) };
                for j in 0..8 {
                    out[k * 8 + j] += lanes[j] as u32 + lanes[j + 8] as u32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{SeededRng, stream};

    /// SIMD and scalar accumulation differ only by summation order: each coordinate sums 32 terms,
    /// so the difference is bounded by 32 · eps · Σ|w·c|.
    #[test]
    fn accumulate_parity_over_widths_and_dims() {
        let mut r = SeededRng::new(4, stream::DATA);
        // Miri interprets ~1000x slower: there, fewer widths and sizes still cover each path.
        let (widths, dims): (&[u32], &[usize]) = if cfg!(miri) {
            (&[1, 3, 4, 5], &[1, 7, 65])
        } else {
            (&[1, 2, 3, 4, 5, 6, 7, 8], &[1, 3, 7, 8, 64, 65, 128, 129])
        };
        for &bits in widths {
            for &d in dims {
                let row_bytes = crate::bitpack::packed_len(d, bits);
                let mut block = vec![0u8; block_bytes(row_bytes)];
                let mut rows = Vec::new();
                for slot in 0..BLOCK {
                    let codes: Vec<u8> =
                        (0..d).map(|_| (r.next_u64() % (1 << bits)) as u8).collect();
                    let mut packed = vec![0u8; row_bytes];
                    crate::bitpack::pack(&codes, bits, &mut packed).unwrap();
                    write_row(&mut block, slot, &packed);
                    rows.push(codes);
                }
                let values: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
                let mut weights = [0f32; BLOCK];
                for (i, w) in weights.iter_mut().enumerate() {
                    *w = if i % 5 == 4 { 0.0 } else { r.uniform() as f32 };
                }
                let (mut a, mut b) = (vec![0.5f32; d], vec![0.5f32; d]);
                accumulate_blocks(&block, row_bytes, bits, &values, &weights, &mut a);
                accumulate_block_scalar(&block, bits, &values, &weights, &mut b);
                for j in 0..d {
                    let want: f32 = 0.5
                        + rows
                            .iter()
                            .zip(&weights)
                            .map(|(c, w)| w * values[c[j] as usize])
                            .sum::<f32>();
                    let mag: f32 = rows
                        .iter()
                        .zip(&weights)
                        .map(|(c, w)| (w * values[c[j] as usize]).abs())
                        .sum::<f32>()
                        + 0.5;
                    let tol = 32.0 * f32::EPSILON * mag;
                    assert!(
                        (a[j] - want).abs() <= tol && (b[j] - want).abs() <= tol,
                        "bits={bits} d={d} j={j}"
                    );
                }
            }
        }
    }

    #[test]
    fn accumulate_multi_equals_one_at_a_time() {
        let mut r = SeededRng::new(12, stream::DATA);
        for bits in [2u32, 3, 4, 5] {
            let d = 40;
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let n: usize = 70;
            let blocks: Vec<u8> = (0..n.div_ceil(BLOCK) * block_bytes(row_bytes))
                .map(|_| r.next_u64() as u8)
                .collect();
            let values: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
            let ws: Vec<Vec<f32>> = (0..3)
                .map(|q| {
                    (0..n)
                        .map(|i| {
                            if q == 1 && i < 40 {
                                0.0
                            } else {
                                r.uniform() as f32
                            }
                        })
                        .collect()
                })
                .collect();
            let mut multi = vec![vec![0.0f32; d]; 3];
            {
                let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
                let mut ar: Vec<&mut [f32]> = multi.iter_mut().map(|a| a.as_mut_slice()).collect();
                accumulate_blocks_multi(&blocks, row_bytes, bits, &values, &wr, &mut ar);
            }
            for (w, m) in ws.iter().zip(&multi) {
                let mut one = vec![0.0f32; d];
                accumulate_blocks(&blocks, row_bytes, bits, &values, w, &mut one);
                assert_eq!(&one, m, "bits={bits}");
            }
        }
    }

    /// The `bits`-bit code of coordinate `j` of row `slot`, read from the block's nibbles (any width).
    /// The specification of the layout that the SIMD kernels decode; O(bits).
    fn code_at(block: &[u8], bits: u32, j: usize, slot: usize) -> usize {
        let start = bits as usize * j;
        let mut v = 0usize;
        let mut got = 0usize;
        let mut pos = start / 4;
        let mut off = start % 4;
        while got < bits as usize {
            v |= ((nibble(block, pos, slot) >> off) as usize) << got;
            got += 4 - off;
            off = 0;
            pos += 1;
        }
        v & ((1 << bits) - 1)
    }

    #[test]
    fn code_at_reads_the_packed_layout() {
        let mut r = SeededRng::new(8, stream::DATA);
        for bits in 1..=8u32 {
            let d = 37;
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let mut block = vec![0u8; block_bytes(row_bytes)];
            let codes: Vec<u8> = (0..d).map(|_| (r.next_u64() % (1 << bits)) as u8).collect();
            let mut packed = vec![0u8; row_bytes];
            crate::bitpack::pack(&codes, bits, &mut packed).unwrap();
            write_row(&mut block, 21, &packed);
            for (j, &c) in codes.iter().enumerate() {
                assert_eq!(code_at(&block, bits, j, 21), c as usize);
            }
        }
    }

    #[test]
    fn accumulate_blocks_equals_block_by_block() {
        let mut r = SeededRng::new(6, stream::DATA);
        for bits in [1u32, 2, 3, 4, 6] {
            let d = 100;
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let n: usize = 77;
            let blocks: Vec<u8> = (0..n.div_ceil(BLOCK) * block_bytes(row_bytes))
                .map(|_| r.next_u64() as u8)
                .collect();
            let values: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
            let weights: Vec<f32> = (0..n)
                .map(|i| if i < 32 { 0.0 } else { r.uniform() as f32 })
                .collect();
            let mut a = vec![0.0f32; d];
            accumulate_blocks(&blocks, row_bytes, bits, &values, &weights, &mut a);
            let mut b = vec![0.0f32; d];
            for (blk, w) in blocks
                .chunks_exact(block_bytes(row_bytes))
                .zip(weights.chunks(BLOCK))
            {
                let mut w32 = [0.0f32; BLOCK];
                w32[..w.len()].copy_from_slice(w);
                accumulate_block_scalar(blk, bits, &values, &w32, &mut b);
            }
            let mag: f32 = b.iter().map(|x| x.abs()).sum::<f32>() / d as f32 + 1.0;
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * mag, "bits={bits}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn scan_b3_parity_over_awkward_sizes() {
        let dims: &[usize] = if cfg!(miri) {
            &[1, 5, 17, 65]
        } else {
            &[1, 4, 5, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 129, 700]
        };
        for &d in dims {
            let row_bytes = crate::bitpack::packed_len(d, 3);
            let mut block = vec![0u8; block_bytes(row_bytes)];
            let mut rows = Vec::new();
            for slot in 0..BLOCK {
                let codes: Vec<u8> = random_bytes(d, 7 * d as u64 + slot as u64)
                    .iter()
                    .map(|c| c & 7)
                    .collect();
                let mut packed = vec![0u8; row_bytes];
                crate::bitpack::pack(&codes, 3, &mut packed).unwrap();
                write_row(&mut block, slot, &packed);
                rows.push(codes);
            }
            let coords = coords3(row_bytes);
            let mut tables = random_bytes(16 * coords, 99 + d as u64);
            for j in d..coords {
                tables[16 * j..16 * j + 16].fill(0);
            }
            let (mut a, mut b) = ([0u32; BLOCK], [0u32; BLOCK]);
            scan_block_b3(&block, &tables, &mut a);
            scan_block_b3_scalar(&block, &tables, &mut b);
            assert_eq!(a, b, "d={d}");
            for (slot, codes) in rows.iter().enumerate() {
                let want: u32 = codes
                    .iter()
                    .enumerate()
                    .map(|(j, &c)| tables[16 * j + c as usize] as u32)
                    .sum();
                assert_eq!(b[slot], want, "d={d} slot {slot}");
            }
        }
    }

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut r = SeededRng::new(seed, stream::DATA);
        (0..n).map(|_| r.next_u64() as u8).collect()
    }

    #[test]
    fn write_read_round_trip() {
        for row_bytes in [1usize, 3, 8, 64, 65] {
            let mut block = vec![0u8; block_bytes(row_bytes)];
            let rows: Vec<Vec<u8>> = (0..BLOCK)
                .map(|i| random_bytes(row_bytes, i as u64))
                .collect();
            for (i, r) in rows.iter().enumerate() {
                write_row(&mut block, i, r);
            }
            // overwrite one slot: neighbours stay intact
            write_row(&mut block, 5, &rows[5]);
            let mut whole = vec![0xAAu8; block_bytes(row_bytes)];
            write_block(&rows[..20].concat(), row_bytes, &mut whole);
            for (i, r) in rows.iter().enumerate().skip(20) {
                write_row(&mut whole, i, r);
            }
            assert_eq!(whole, block);
            let mut out = vec![0u8; row_bytes];
            for (i, r) in rows.iter().enumerate() {
                read_row(&block, i, &mut out);
                assert_eq!(&out, r);
            }
        }
    }

    #[test]
    fn scan_parity_over_awkward_sizes() {
        // row_bytes up to 300 exercises the u16 flush (positions/2 > 256).
        let sizes: &[usize] = if cfg!(miri) {
            &[1, 17, 300]
        } else {
            &[1, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 129, 300]
        };
        for &row_bytes in sizes {
            let block = random_bytes(block_bytes(row_bytes), row_bytes as u64);
            let tables = random_bytes(block.len(), 1000 + row_bytes as u64);
            let (mut a, mut b) = ([0u32; BLOCK], [0u32; BLOCK]);
            scan_block(&block, &tables, &mut a);
            scan_block_scalar(&block, &tables, &mut b);
            assert_eq!(a, b, "row_bytes={row_bytes}");
            // and against an independent read-back of every row
            let mut row = vec![0u8; row_bytes];
            for (slot, &got) in b.iter().enumerate() {
                read_row(&block, slot, &mut row);
                let want: u32 = (0..2 * row_bytes)
                    .map(|n| {
                        tables[16 * n + ((row[n / 2] >> (4 * (n % 2))) & 0x0F) as usize] as u32
                    })
                    .sum();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn quantized_lut_error_is_within_half_a_step_per_table() {
        let mut r = SeededRng::new(9, stream::DATA);
        let tables: Vec<f32> = (0..16 * 40).map(|_| r.gaussian() as f32).collect();
        let mut q = QuantizedLut::default();
        q.quantize_from(&tables);
        for n in 0..40 {
            let lo = tables[16 * n..16 * n + 16]
                .iter()
                .copied()
                .fold(f32::INFINITY, f32::min);
            for v in 0..16 {
                let back = lo + q.step * q.tables[16 * n + v] as f32;
                assert!((back - tables[16 * n + v]).abs() <= 0.5001 * q.step);
            }
        }
    }
}
