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
//! overflow (`256 · 255 < 65536`). [`scan_block_scalar`] is the specification. The `u16`
//! accumulation is faiss FastScan's: look-ups are added as whole words (wrapping) beside the sums
//! of their odd bytes, and the even-byte sums are recovered at the flush, so no per-step unpack is
//! needed. [`scan_block_multi`] scores several queries per pass over a block;
//! [`scan_blocks_scores`] / [`scan_blocks_scores_above`] fuse the scan of a run of blocks with the
//! conversion to scores (`scale · (offset + step · sum) + bias`) and, for a top-k search, the
//! marking of rows above the current threshold, so a block costs one call and no second pass.
//!
//! Widths 3 and 5 do not divide 4: their codes straddle nibbles, so their scans take one table
//! per coordinate (16 bytes at 3 bits, 32 at 5) and rebuild each code from the two nibbles it
//! spans ([`scan_block_b3`], [`scan_block_b5`]). Widths 6-8 have no table scan (tables of 64-256
//! entries do not fit a register look-up): [`dot_blocks_scores_i16`] sums integer products of
//! the codebook on a 14-bit grid ([`IntCodebook`]) and the query on `i16` weights ([`IntQuery`])
//! (at 5 bits too, where it rounds far less than `u8` tables), and [`dot_block_codes`] decodes
//! exact floats. Weighted sums of decoded rows (attention over values) run in floats
//! ([`accumulate_blocks_multi`], any width) or in integers on the same grid with `i16` weights
//! ([`accumulate_blocks_i16`], [`IntWeights`], any width); at 1-4 bits, non-negative weights on
//! `u8` against the codebook on a byte grid ([`ByteCodebook`], [`accumulate_blocks_u8`],
//! [`ByteWeights`]; with AVX-512 BW and VNNI, [`byte_sums_native`]).
//!
//! At 4 bits a nibble is one code, so a score is also `Σ_n w_n · c[nibble_n]`: [`ByteCodebook`]
//! puts the 16 centroids (2-16 of a 1-4-bit codebook) on a `u8` grid and the query on `i8`
//! weights ([`ByteQuery`]), and
//! [`dot_blocks_scores_u8`] sums their products exactly in `i32` (with AVX-512 VBMI and VNNI one
//! `vpdpbusd` per 64 products and query, the look-ups shared by the queries of a pass:
//! [`byte_dots_native`]). [`dot_nibbles_i8`] is the same sum with the nibbles themselves as the
//! values (KIVI's integer levels).
//!
//! [`QuantizedLut`] turns float tables into `u8` tables with one shared step `Δ` and a per-table
//! offset: `score ≈ offset + Δ · Σ u8`. Each entry is rounded to the nearest step, so the error of
//! one table is at most `Δ/2` and the error of a score over `P` tables has standard deviation
//! `Δ · sqrt(P / 12)` when the roundings are independent.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod kernels;
mod layout;
mod tables;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use kernels::*;
pub use layout::{
    BLOCK, block_bytes, read_row, write_block, write_block_codes4, write_block_codes4_scalar,
    write_row, write_rows,
};
pub use tables::{
    ByteCodebook, ByteQuery, ByteWeights, ChunkWeights, INT_CHUNK, INT_CODE_MAX, INT_WEIGHT_BUDGET,
    IntCodebook, IntQuery, IntWeights, QuantizedLut, nibble_weights_i8, nibble_weights_i8_groups,
};

#[cfg(test)]
use kernels::nibble;
use kernels::{code3, code5};
use layout::check_block;
