//! The scan and accumulation kernels over the block layout, runtime-dispatched to their AVX2
//! bodies (`x86`), each with its scalar twin. Every public kernel checks the lengths it reads
//! through before dispatching.

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{
    BLOCK, ByteCodebook, ByteWeights, ChunkWeights, INT_CHUNK, IntCodebook, IntWeights,
    block_bytes, check_block, read_row,
};
use crate::prefetch::Ahead;

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
            unsafe { x86::scan_block_multi_avx2::<1>(block, [tables], std::array::from_mut(out)) };
            return;
        }
    }
    scan_block_scalar(block, tables, out)
}

/// [`scan_block`] for several queries at once: `outs[q][r] = Σ_n tables[q][16n + nibble_n(row r)]`.
/// The block is read and its nibbles split once per group of up to [`MULTI_QUERIES`] queries, so
/// each further query costs only its look-ups (the queries of a grouped-query head, or a batch of
/// search queries). Runtime-dispatched like [`scan_block`]. O(32 · positions · queries).
///
/// # Panics
/// If `outs.len() != tables.len()`, or any table slice fails [`scan_block`]'s check; the checks
/// run before any kernel reads memory.
pub fn scan_block_multi(block: &[u8], tables: &[&[u8]], outs: &mut [[u32; BLOCK]]) {
    assert_eq!(outs.len(), tables.len(), "one output per query's tables");
    for t in tables {
        check_nibble_scan(block.len(), t.len());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX2 is present (checked at run time) and every table slice was checked
            // to have `block.len()` bytes, a multiple of 32: the kernel's only preconditions.
            unsafe {
                in_groups!(
                    x86::scan_block_multi_avx2,
                    block,
                    tables,
                    outs,
                    MULTI_QUERIES
                )
            };
            return;
        }
    }
    for (t, o) in tables.iter().zip(outs.iter_mut()) {
        scan_block_scalar(block, t, o);
    }
}

/// Integer dot products of the 32 rows of `block` with signed 8-bit weights, one weight per
/// nibble position: `outs[q][r] = Σ_n weights[q][n] · nibble_n(row r)` (nibbles as unsigned
/// `0..16`). Each `weights[q]` holds `2 · row_bytes` entries (`block.len() / 16`). The linear
/// alternative to a table scan where every nibble is one uniform code (4-bit KIVI keys: weight
/// `n` is the query coordinate times the channel's scale, quantized to `i8`): no per-query
/// tables to build, and the block's nibbles are split once for all queries. With AVX2, pairs of
/// nibble positions go through `vpmaddubsw` (exact: a pair sums to at most `2 · 15 · 128`) into
/// `i16` lanes flushed to `i32` every 16 positions, so no sum overflows; with AVX-512 VNNI, four
/// positions per `vpdpbusd` straight into `i32` lanes (with VBMI too, each row's four nibbles
/// put side by side by one `vpermb` per 64-byte load); else
/// [`dot_nibbles_i8_scalar`] per query. Exact on every path (integer arithmetic).
/// O(32 · positions · queries).
///
/// # Panics
/// Before any memory is read, unless `block.len()` is a multiple of 32, `outs.len() ==
/// weights.len()` and every `weights[q].len() == block.len() / 16`.
pub fn dot_nibbles_i8(block: &[u8], weights: &[&[i8]], outs: &mut [[i32; BLOCK]]) {
    assert_eq!(outs.len(), weights.len(), "one output per weight vector");
    for w in weights {
        check_nibble_weights(block.len(), w.len());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512_vbmi() && has_avx512_vnni() {
            // SAFETY: AVX2 and AVX-512 F, BW, VBMI and VNNI are present (checked at run time);
            // the lengths as below.
            unsafe {
                in_groups!(
                    super::avx512::dot_nibbles_i8_vbmi,
                    block,
                    weights,
                    outs,
                    DOT_QUERIES
                )
            };
            return;
        }
        if has_avx512_vnni() {
            // SAFETY: AVX2 and AVX-512 F, VL and VNNI are present (checked at run time); the
            // lengths as below.
            unsafe {
                in_groups!(
                    super::avx512::dot_nibbles_i8_vnni,
                    block,
                    weights,
                    outs,
                    DOT_QUERIES
                )
            };
            return;
        }
        if has_avx2() {
            // SAFETY: AVX2 is present (checked at run time) and every weight slice was checked
            // to hold `block.len() / 16` entries of a block whose length is a multiple of 32: the
            // kernel's only preconditions.
            unsafe { in_groups!(x86::dot_nibbles_i8_avx2, block, weights, outs, DOT_QUERIES) };
            return;
        }
    }
    for (w, o) in weights.iter().zip(outs.iter_mut()) {
        dot_nibbles_i8_scalar(block, w, o);
    }
}

/// Queries [`dot_nibbles_i8`] handles per pass over a block (three: a grouped-query head of
/// SmolLM2's shape in one pass).
pub const DOT_QUERIES: usize = 3;

/// Scalar twin of [`dot_nibbles_i8`] for one weight vector, the specification.
///
/// # Panics
/// As [`dot_nibbles_i8`].
pub fn dot_nibbles_i8_scalar(block: &[u8], weights: &[i8], out: &mut [i32; BLOCK]) {
    check_nibble_weights(block.len(), weights.len());
    out.fill(0);
    for (bytes, &w) in block.chunks_exact(16).zip(weights) {
        let w = w as i32;
        for (i, &b) in bytes.iter().enumerate() {
            out[i] += w * (b & 0x0F) as i32;
            out[i + 16] += w * (b >> 4) as i32;
        }
    }
}

/// Panics unless `block_len` is a multiple of 32 and `weights_len` is one weight per nibble
/// position (`block_len / 16`).
#[inline]
fn check_nibble_weights(block_len: usize, weights_len: usize) {
    assert!(
        block_len.is_multiple_of(BLOCK) && weights_len == block_len / 16,
        "{weights_len} weights do not fit a block of {block_len} bytes"
    );
}

/// The map from a row's table sum to its score: `score = scale · (offset + step · sum) + bias`,
/// with `offset` and `step` those of the query's [`super::QuantizedLut`], `scale` the row's stored
/// scale (its norm) and `bias` a per-query constant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Added to `step · sum` (the tables' summed offsets).
    pub offset: f32,
    /// Value of one table unit.
    pub step: f32,
    /// Added after the row's scale.
    pub bias: f32,
}

/// Scores of consecutive blocks of nibble codes (rows of `row_bytes` bytes) against one query's
/// `u8` tables: `out[i] = scales[i] · (affine.offset + affine.step · sum_i) + affine.bias`, with
/// `sum_i` row `i`'s table sum as [`scan_block`] computes it. `out.len()` rows are scored (the
/// last block's empty slots are not written). With AVX2 and FMA the sums stay in registers and
/// are converted 8 rows at a time, so a block costs one call, not a scan plus a conversion pass;
/// else [`scan_blocks_scores_scalar`]. O(rows · row_bytes).
///
/// # Panics
/// Before any memory is read, unless `1 <= row_bytes <= 2^22` (so sums stay below 2^31),
/// `tables.len() == 32 · row_bytes`, `blocks.len() == out.len().div_ceil(32) · 32 · row_bytes`
/// and `scales.len() == out.len()`.
pub fn scan_blocks_scores(
    blocks: &[u8],
    row_bytes: usize,
    tables: &[u8],
    affine: Affine,
    scales: &[f32],
    out: &mut [f32],
) {
    fused_scores(blocks, row_bytes, tables, affine, scales, out, None)
}

/// [`scan_blocks_scores`] that also marks the rows scoring above a threshold: with
/// `marks = (above, masks)`, bit `r` of `masks[b]` is set iff `out[32b + r] > above` (a NaN
/// score is never marked). A top-k search passes its current threshold and walks only the marked
/// rows, so rows below it cost no comparison outside the kernel. O(rows · row_bytes).
///
/// # Panics
/// As [`scan_blocks_scores`], and unless `masks.len() == out.len().div_ceil(32)`.
pub fn scan_blocks_scores_above(
    blocks: &[u8],
    row_bytes: usize,
    tables: &[u8],
    affine: Affine,
    scales: &[f32],
    out: &mut [f32],
    marks: (f32, &mut [u32]),
) {
    assert_eq!(
        marks.1.len(),
        out.len().div_ceil(BLOCK),
        "one mask per block"
    );
    fused_scores(blocks, row_bytes, tables, affine, scales, out, Some(marks))
}

/// The dispatch of [`scan_blocks_scores`] and [`scan_blocks_scores_above`]: one job.
fn fused_scores(
    blocks: &[u8],
    row_bytes: usize,
    tables: &[u8],
    affine: Affine,
    scales: &[f32],
    out: &mut [f32],
    marks: Option<(f32, &mut [u32])>,
) {
    let mut jobs = [ScoreJob {
        tables,
        affine,
        out,
        marks,
    }];
    scan_blocks_scores_multi(blocks, row_bytes, scales, &mut jobs, Ahead::NONE);
}

/// One query of [`scan_blocks_scores_multi`]: its `u8` tables, its [`Affine`], its output scores
/// and, optionally, its marks `(above, masks)` (see [`scan_blocks_scores_above`]).
#[derive(Debug)]
pub struct ScoreJob<'a> {
    /// The query's nibble tables (`32 · row_bytes` bytes).
    pub tables: &'a [u8],
    /// Sum to score.
    pub affine: Affine,
    /// One score per row.
    pub out: &'a mut [f32],
    /// Threshold and one mask per block, if the rows above it are to be marked.
    pub marks: Option<(f32, &'a mut [u32])>,
}

/// Queries [`scan_blocks_scores_multi`] scores per pass over a block on AVX2 (two measured
/// fastest per query: more queries' accumulators do not fit the sixteen AVX2 registers).
pub const FUSED_QUERIES: usize = 2;

/// Queries per pass where AVX-512 VL gives the same kernel 32 registers (`cargo bench -p tq-core
/// --bench kernels -- scores_queries` on Zen 4, d = 128, 8 192 rows: three queries in one pass
/// 41.4 us against 46.2 as two passes; four in one pass 59.8 against 58.0 as two).
pub const FUSED_QUERIES_WIDE: usize = 3;

/// [`scan_blocks_scores_above`] for several queries over the same rows: each block is read and its
/// nibbles split once per group of up to [`FUSED_QUERIES`] jobs ([`FUSED_QUERIES_WIDE`] with
/// AVX-512 VL), and every job gets its scores
/// (and marks, if asked) as if scanned alone. The first group asks for `ahead`'s lines of each
/// block's rows as it walks them (the scalar fallback does not). O(rows · row_bytes · jobs).
///
/// # Panics
/// Before any memory is read, unless every job fits [`scan_blocks_scores_above`]'s checks for
/// `out.len() == scales.len()` rows (marks: one mask per block).
pub fn scan_blocks_scores_multi(
    blocks: &[u8],
    row_bytes: usize,
    scales: &[f32],
    jobs: &mut [ScoreJob<'_>],
    ahead: Ahead<'_>,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
    let rows = scales.len();
    for job in jobs.iter() {
        check_blocks_scores(
            blocks.len(),
            row_bytes,
            job.tables.len(),
            rows,
            job.out.len(),
        );
        if let Some((_, m)) = &job.marks {
            assert_eq!(m.len(), rows.div_ceil(BLOCK), "one mask per block");
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            let bl = block_bytes(row_bytes);
            let wide = has_avx512_vl();
            let per_pass = if wide {
                FUSED_QUERIES_WIDE
            } else {
                FUSED_QUERIES
            };
            for (i, group) in jobs.chunks_mut(per_pass).enumerate() {
                let ahead = if i == 0 { ahead } else { Ahead::NONE };
                // Tables whose entries are all below 64 let four steps' look-ups add as bytes
                // first. The check stops at the first 128 bytes holding a larger entry, which for
                // `u8` tables on the full grid is almost always the first (a 64-level table is
                // read whole, once per call). Two steps for entries below 128 measured slower than none
                // (d = 50 search: 111 against 104 ms), so other tables take one step at a time.
                // SAFETY: AVX2 is present (checked at run time).
                let small = group
                    .iter()
                    .all(|j| unsafe { x86::entries_below_64(j.tables) });
                macro_rules! run {
                    ($g:literal) => {
                        // SAFETY: AVX2 and FMA are present, and AVX-512 F and VL where `wide`
                        // (both checked at run time), the checks above proved every job's length
                        // preconditions, and every entry is at most `255 / G` (below 64 with four
                        // steps, any with one).
                        unsafe {
                            match (wide, group.len()) {
                                (true, 3) => x86::scan_blocks_scores_vl::<3, $g>(
                                    blocks,
                                    bl,
                                    scales,
                                    first_n(group),
                                    ahead,
                                ),
                                (true, 2) => x86::scan_blocks_scores_vl::<2, $g>(
                                    blocks,
                                    bl,
                                    scales,
                                    first_n(group),
                                    ahead,
                                ),
                                (true, _) => x86::scan_blocks_scores_vl::<1, $g>(
                                    blocks,
                                    bl,
                                    scales,
                                    first_n(group),
                                    ahead,
                                ),
                                (false, 2) => x86::scan_blocks_scores_avx2::<2, $g>(
                                    blocks,
                                    bl,
                                    scales,
                                    first_n(group),
                                    ahead,
                                ),
                                (false, _) => x86::scan_blocks_scores_avx2::<1, $g>(
                                    blocks,
                                    bl,
                                    scales,
                                    first_n(group),
                                    ahead,
                                ),
                            }
                        }
                    };
                }
                if small { run!(4) } else { run!(1) }
            }
            return;
        }
    }
    for job in jobs.iter_mut() {
        scan_blocks_scores_scalar(blocks, row_bytes, job.tables, job.affine, scales, job.out);
        if let Some((above, masks)) = job.marks.as_mut() {
            mark_above(job.out, *above, masks);
        }
    }
}

/// Sets bit `r` of `masks[b]` iff `scores[32b + r] > above` (bits past the scores are clear);
/// the marks [`scan_blocks_scores_above`] makes, for scores computed elsewhere. O(rows).
///
/// # Panics
/// Unless `masks.len() == scores.len().div_ceil(32)`.
pub fn mark_above(scores: &[f32], above: f32, masks: &mut [u32]) {
    assert_eq!(
        masks.len(),
        scores.len().div_ceil(BLOCK),
        "one mask per block"
    );
    for (m, o) in masks.iter_mut().zip(scores.chunks(BLOCK)) {
        *m = o
            .iter()
            .enumerate()
            .fold(0, |m, (r, &v)| m | (u32::from(v > above) << r));
    }
}

/// Scalar twin of [`scan_blocks_scores`] (the AVX2 body fuses `offset + step · sum` and the scale
/// into two FMAs, so the two differ by rounding only).
///
/// # Panics
/// As [`scan_blocks_scores`].
pub fn scan_blocks_scores_scalar(
    blocks: &[u8],
    row_bytes: usize,
    tables: &[u8],
    affine: Affine,
    scales: &[f32],
    out: &mut [f32],
) {
    check_blocks_scores(
        blocks.len(),
        row_bytes,
        tables.len(),
        scales.len(),
        out.len(),
    );
    let mut sums = [0u32; BLOCK];
    for ((block, o), sc) in blocks
        .chunks_exact(block_bytes(row_bytes))
        .zip(out.chunks_mut(BLOCK))
        .zip(scales.chunks(BLOCK))
    {
        scan_block_scalar(block, tables, &mut sums);
        for ((o, &s), &sum) in o.iter_mut().zip(sc).zip(&sums) {
            *o = s * (affine.offset + affine.step * sum as f32) + affine.bias;
        }
    }
}

/// Panics unless the lengths fit [`scan_blocks_scores`].
fn check_blocks_scores(
    blocks_len: usize,
    row_bytes: usize,
    tables_len: usize,
    scales_len: usize,
    rows: usize,
) {
    assert!(
        (1..=1 << 22).contains(&row_bytes) && tables_len == block_bytes(row_bytes),
        "{tables_len} table bytes do not fit rows of {row_bytes} bytes"
    );
    assert!(
        Some(blocks_len) == rows.div_ceil(BLOCK).checked_mul(block_bytes(row_bytes))
            && scales_len == rows,
        "{blocks_len} block bytes and {scales_len} scales do not fit {rows} rows"
    );
}

/// Queries [`scan_block_multi`] scores per pass over a block (the AVX2 body keeps four `u16`
/// accumulators per query in registers; with three or four queries they spill and the pass is
/// slower per query than with two, `cargo bench -p tq-core -- scan_in_cache`).
pub const MULTI_QUERIES: usize = 2;

/// Runs the AVX2 kernel `$kernel::<Q>(block, [tables; Q], &mut [outs; Q])` over all of `tables`
/// and `outs` (equal lengths; any per-query table and output types) in groups of up to `$max`
/// (1 to 3) queries. Unsafe to expand: the caller proves the kernel's preconditions for every
/// table slice.
#[cfg(target_arch = "x86_64")]
macro_rules! in_groups {
    ($($kernel:ident)::+, $block:expr, $tables:expr, $outs:expr, $max:expr) => {{
        let (tables, outs) = ($tables, $outs);
        let mut q = 0;
        while q < tables.len() {
            let (t, o) = (&tables[q..], &mut outs[q..]);
            q += match t.len().min($max) {
                1 => {
                    $($kernel)::+::<1>($block, [t[0]], first_n(o));
                    1
                }
                2 => {
                    $($kernel)::+::<2>($block, [t[0], t[1]], first_n(o));
                    2
                }
                _ => {
                    $($kernel)::+::<3>($block, [t[0], t[1], t[2]], first_n(o));
                    3
                }
            };
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use in_groups;

/// The first `N` items as an array (the caller guarantees `items.len() >= N`).
#[cfg(target_arch = "x86_64")]
fn first_n<T, const N: usize>(items: &mut [T]) -> &mut [T; N] {
    match (&mut items[..N]).try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("the slice has exactly N elements"),
    }
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
pub(super) fn nibble(block: &[u8], pos: usize, slot: usize) -> u8 {
    let b = block[pos * 16 + (slot & 15)];
    if slot < 16 { b & 0x0F } else { b >> 4 }
}

/// The 3-bit code of coordinate `j` of row `slot`, read from the block's nibbles.
#[inline(always)]
pub(super) fn code3(block: &[u8], j: usize, slot: usize) -> usize {
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

/// The 5-bit code of coordinate `j` of row `slot`: bits `5j..5j+5` always span exactly two
/// nibbles (`⌊5j/4⌋` and the next).
#[inline(always)]
pub(super) fn code5(block: &[u8], j: usize, slot: usize) -> usize {
    let bit = 5 * j;
    let (pos, off) = (bit / 4, bit % 4);
    let lo = (nibble(block, pos, slot) >> off) as usize;
    let hi = (nibble(block, pos + 1, slot) as usize) << (4 - off);
    (lo | hi) & 31
}

/// Coordinates covered by 5-bit rows of `row_bytes` bytes (the scan reads `⌊8·row_bytes/5⌋`
/// codes; the padding codes past `d` are 0 and must have all-zero tables).
pub const fn coords5(row_bytes: usize) -> usize {
    8 * row_bytes / 5
}

/// 5-bit scan: `out[r] = Σ_j tables[32j + code_j(row r)]` with one 32-byte table per coordinate.
/// `tables.len()` must be `32 * coords5(row_bytes)`. Eight coordinates span exactly ten nibbles;
/// the AVX2 kernel rebuilds the eight codes of 32 rows from ten nibble vectors with shifts and
/// masks and looks each up in its table's two 16-byte halves with two `vpshufb` (the index is
/// biased so that each half zeroes the lanes that belong to the other). About 2.5x the work of
/// the 4-bit scan per coordinate.
///
/// # Panics
/// If `block.len()` is not a multiple of 32 or `tables.len() != 32 * coords5(block.len() / 32)`;
/// the check runs before any kernel reads memory.
pub fn scan_block_b5(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
    check_b5_scan(block.len(), tables.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX2 is present (checked at run time) and `check_b5_scan` proved that the
            // block holds `2 · row_bytes` nibble positions of 16 bytes and the tables
            // `coords5(row_bytes)` tables of 32 bytes: the kernel's only preconditions.
            unsafe { x86::scan_block_b5_avx2::<1>(block, [tables], std::array::from_mut(out)) };
            return;
        }
    }
    scan_block_b5_scalar(block, tables, out)
}

/// [`scan_block_b5`] for several queries at once: each code is rebuilt from its nibbles once per
/// group of up to three queries (a grouped-query head's) and looked up in every query's tables.
/// O(32 · coords · queries).
///
/// # Panics
/// If `outs.len() != tables.len()`, or any table slice fails [`scan_block_b5`]'s check; the
/// checks run before any kernel reads memory.
pub fn scan_block_b5_multi(block: &[u8], tables: &[&[u8]], outs: &mut [[u32; BLOCK]]) {
    assert_eq!(outs.len(), tables.len(), "one output per query's tables");
    for t in tables {
        check_b5_scan(block.len(), t.len());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX2 is present (checked at run time) and every table slice passed
            // `check_b5_scan` against this block: the kernel's only preconditions.
            unsafe { in_groups!(x86::scan_block_b5_avx2, block, tables, outs, 3) };
            return;
        }
    }
    for (t, o) in tables.iter().zip(outs.iter_mut()) {
        scan_block_b5_scalar(block, t, o);
    }
}

/// Scalar twin of [`scan_block_b5`].
///
/// # Panics
/// As [`scan_block_b5`].
pub fn scan_block_b5_scalar(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
    check_b5_scan(block.len(), tables.len());
    let coords = tables.len() / 32;
    for (slot, o) in out.iter_mut().enumerate() {
        *o = (0..coords)
            .map(|j| tables[32 * j + code5(block, j, slot)] as u32)
            .sum();
    }
}

/// Float twin of [`scan_block_b5_scalar`] (the exact path).
///
/// # Panics
/// As [`scan_block_b5`].
pub fn scan_block_b5_f32(block: &[u8], tables: &[f32], out: &mut [f32; BLOCK]) {
    check_b5_scan(block.len(), tables.len());
    let coords = tables.len() / 32;
    for (slot, o) in out.iter_mut().enumerate() {
        *o = (0..coords)
            .map(|j| tables[32 * j + code5(block, j, slot)])
            .sum();
    }
}

/// Weighted sum of decoded rows: `acc[j] += Σ_i weights[i] · values[code_j(row i)]` for rows
/// `i < weights.len()` stored in `blocks` (`ceil(n/32)` blocks of `32 · row_bytes` bytes) and
/// `j < acc.len()` (the dimension; at most the codes per row). Blocks whose weights are all zero
/// are skipped. AVX2: up to 3 bits each 8 rows' codes of a coordinate are shifted into their
/// lanes and looked up by one `vpermps` in an 8-entry table; at 4-5 bits a coordinate's 32 codes
/// are cut out of one to three nibble vectors with shifts, looked up as four `vpshufb` byte
/// planes of the value table (two per plane at 5 bits) and interleaved back into floats; at 6-8
/// bits they are decoded by four 8-lane gathers (with AVX-512 VBMI, 5-8 bits: two coordinates'
/// 64 codes per `vpermb` / `vpermi2b` of each byte plane, the same floats); then multiplied into 8
/// rows per FMA, with the per-coordinate partial sums kept in 8-lane registers across blocks and
/// reduced once; other CPUs use [`accumulate_block_scalar`]. O(n · dim).
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
    accumulate_blocks_multi(
        blocks,
        row_bytes,
        bits,
        values,
        None,
        &[weights],
        &mut [acc],
    );
}

/// [`accumulate_blocks`] for several weight vectors at once (e.g. the queries of one
/// grouped-query head): `accs[q][j] += Σ_i (weights[q][i] · s_i) · values[code_j(row i)]` with
/// `s_i = row_scales[i]` (e.g. the rows' norms), or 1 when `row_scales` is `None`; the product
/// `weights[q][i] · s_i` is rounded to `f32` before it is used, as if the caller had scaled the
/// weights. The codes are decoded once per block and coordinate and used by every weight vector.
/// All weight vectors have the same length `n`; all accumulators the same length `dim`.
/// O(n · dim · (1 + queries/8)).
///
/// # Panics
/// Before any memory is read, unless: `bits` is in `1..=8`, `row_bytes >= 1`, `values` holds at
/// least `2^bits` entries, there are as many accumulators as weight vectors, every weight vector
/// covers exactly the blocks (`blocks.len() == ceil(len / 32) · 32 · row_bytes`; rows past a
/// shorter vector's end weigh 0), `row_scales`, when given, is at least as long as every weight
/// vector, and every accumulator has the same length `dim <= 8 · row_bytes / bits` (the codes a
/// row holds).
pub fn accumulate_blocks_multi(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    values: &[f32],
    row_scales: Option<&[f32]>,
    weights: &[&[f32]],
    accs: &mut [&mut [f32]],
) {
    check_accumulate(blocks.len(), row_bytes, bits, values.len(), weights, accs);
    if let Some(s) = row_scales {
        for w in weights {
            assert!(
                s.len() >= w.len(),
                "{} row scales for {} weights",
                s.len(),
                w.len()
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked at run time) and `check_accumulate`
            // proved every length the kernel reads through: each block has `2 · row_bytes`
            // nibble positions, each coordinate `j < dim` lies in them, each weight vector
            // covers the blocks, and `values` has `2^bits` entries.
            unsafe {
                x86::accumulate_blocks_x86(
                    blocks,
                    row_bytes,
                    bits,
                    values,
                    row_scales,
                    weights,
                    accs,
                    has_avx512_vbmi(),
                )
            };
            return;
        }
    }
    for (w, acc) in weights.iter().zip(accs.iter_mut()) {
        for (bi, (block, w)) in blocks
            .chunks_exact(block_bytes(row_bytes))
            .zip(w.chunks(BLOCK))
            .enumerate()
        {
            let w32 = block_weights(w, row_scales.map(|s| &s[bi * BLOCK..]));
            if w32.iter().any(|&x| x != 0.0) {
                accumulate_block_scalar(block, bits, values, &w32, acc);
            }
        }
    }
}

/// Weighted sums of 1- to 8-bit codes on an integer grid (the fast path of attention over
/// values): for each weight vector `q` and coordinate `j < dim`, chunk by chunk of
/// [`INT_CHUNK`] rows, `S = Σ_{i in chunk} w_i · values[code_j(row i)]` exactly in `i32`
/// (`w` = `weights[q]`'s `i16` weights, `values` the codebook's grid), then `local_j = local_j +
/// (offset_c + step_c · S)` in `f32` from 0 (one rounding per operation, no fused multiply-add)
/// and finally `accs[q][j] += local_j`. Every path gives the same integers and the same bits.
///
/// 4 bits: with AVX-512 BW and VNNI, four coordinates' 32 codes per 64-byte load, the nibbles
/// split, each looked up in the grid's two byte planes by `vpshufb` and interleaved into `i16`
/// pairs of rows, one `vpdpwssd` per 8 rows and weight vector; with AVX2 two coordinates at a
/// time through `vpmaddwd`. 1-3 and 5-8 bits: with AVX-512 VBMI and VNNI and GFNI, four
/// coordinates' 128 codes cut out of the nibble layout by per-lane shifts (each coordinate's code
/// at its own bit offset in its 128-bit lane), both byte planes looked up by `vpermb` /
/// `vpermi2b` and the same `vpdpwssd` loop as at 4 bits; with AVX2 one coordinate's codes, looked
/// up by `pshufb` (1-3 and 5 bits) or gathered (6-8 bits). A grouped-query head's weight vectors
/// share each decode; other CPUs take [`accumulate_blocks_i16_scalar`] per vector. Blocks whose
/// weights are all zero are skipped. O(rows · dim · (1 + vectors / 4)).
///
/// # Panics
/// Before any memory is read, unless `1 <= bits <= 8`, `row_bytes >= 1`, `blocks` is a whole
/// number of blocks of `32 · row_bytes` bytes, the codebook has at least `2^bits` values, there
/// are as many accumulators as weight vectors, every weight vector covers exactly the blocks'
/// rows ([`IntWeights::padded_len`]) and every accumulator has the same length `dim <= 8 ·
/// row_bytes / bits` (the codes a row holds).
pub fn accumulate_blocks_i16(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    codebook: &IntCodebook,
    weights: &[&IntWeights],
    accs: &mut [&mut [f32]],
) {
    check_sums(
        blocks.len(),
        row_bytes,
        bits,
        codebook.values().len(),
        weights,
        accs,
    );
    #[cfg(target_arch = "x86_64")]
    {
        let codes = IntSumCodes { blocks, row_bytes };
        // SAFETY (each body): the CPU features each needs are checked at run time before it
        // is called; `check_sums` proved the lengths it reads through (and that every
        // code indexes the grid) and, with the weights' budget, that no sum overflows.
        let done = unsafe {
            match bits {
                1 => int_sums::<1>(codes, codebook, weights, accs),
                2 => int_sums::<2>(codes, codebook, weights, accs),
                3 => int_sums::<3>(codes, codebook, weights, accs),
                4 => int_sums::<4>(codes, codebook, weights, accs),
                5 => int_sums::<5>(codes, codebook, weights, accs),
                6 => int_sums::<6>(codes, codebook, weights, accs),
                7 => int_sums::<7>(codes, codebook, weights, accs),
                _ => int_sums::<8>(codes, codebook, weights, accs),
            }
        };
        if done {
            return;
        }
    }
    for (w, acc) in weights.iter().zip(accs.iter_mut()) {
        let values = codebook.values();
        chunk_sums_scalar(blocks, row_bytes, bits, |k| values[k].into(), w, acc);
    }
}

/// Runs an integer-sum body for `B`-bit codes over the weight vectors in groups of up to
/// [`INT_QUERIES`], with the body's extra arguments.
#[cfg(target_arch = "x86_64")]
macro_rules! int_groups {
    ($($kernel:ident)::+, $b:ident, $codes:expr, ($($extra:expr),*), $weights:expr, $accs:expr) => {{
        for (w, a) in $weights.chunks(INT_QUERIES).zip($accs.chunks_mut(INT_QUERIES)) {
            match w.len() {
                1 => $($kernel)::+::<$b, 1>($codes, $($extra,)* [w[0]], first_n(a)),
                2 => $($kernel)::+::<$b, 2>($codes, $($extra,)* [w[0], w[1]], first_n(a)),
                _ => $($kernel)::+::<$b, 3>($codes, $($extra,)* [w[0], w[1], w[2]], first_n(a)),
            }
        }
    }};
}

/// [`accumulate_blocks_i16`] at `B` bits on x86: `false` when the CPU has no body for it (4
/// bits: AVX-512 BW + VNNI or AVX2; other widths: AVX-512 VBMI + VNNI + GFNI or AVX2).
///
/// # Safety
/// The arguments passed `check_sums` for `B` bits.
#[cfg(target_arch = "x86_64")]
unsafe fn int_sums<const B: usize>(
    codes: IntSumCodes<'_>,
    codebook: &IntCodebook,
    weights: &[&IntWeights],
    accs: &mut [&mut [f32]],
) -> bool {
    use super::avx512::{accumulate_i16_vnni, accumulate_i16_wide_vnni};
    use x86::{accumulate_i16_avx2, accumulate_i16_wide_avx2};
    // SAFETY (each): the CPU features the body needs are checked first; the caller's contract.
    unsafe {
        if B == 4 && has_avx512_bw_vnni() {
            let planes = super::avx512::nibble_planes_512(codebook.planes());
            int_groups!(accumulate_i16_vnni, B, codes, (planes), weights, accs);
        } else if B != 4 && has_avx512_int() {
            let planes = super::avx512::IntPlanes::new(codebook, B as u32);
            int_groups!(accumulate_i16_wide_vnni, B, codes, (&planes), weights, accs);
        } else if B == 4 && has_avx2() {
            let planes = x86::nibble_planes_avx2(codebook.planes());
            int_groups!(accumulate_i16_avx2, B, codes, (planes), weights, accs);
        } else if has_avx2() {
            let halves = x86::plane_halves(codebook.planes(), B as u32);
            let wide = codebook.wide();
            int_groups!(
                accumulate_i16_wide_avx2,
                B,
                codes,
                (wide, halves),
                weights,
                accs
            );
        } else {
            return false;
        }
    }
    true
}

/// The codes an `accumulate_i16` or `accumulate_u8` body reads: whole blocks of
/// `row_bytes`-byte rows.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct IntSumCodes<'a> {
    pub(super) blocks: &'a [u8],
    pub(super) row_bytes: usize,
}

/// Scalar twin of [`accumulate_blocks_i16`] for one weight vector, the specification: each
/// chunk's sums row by row, in order.
///
/// # Panics
/// As [`accumulate_blocks_i16`].
pub fn accumulate_blocks_i16_scalar(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    codebook: &IntCodebook,
    weights: &IntWeights,
    acc: &mut [f32],
) {
    let grid = codebook.values().len();
    check_sums(
        blocks.len(),
        row_bytes,
        bits,
        grid,
        &[weights],
        &[&mut *acc],
    );
    let values = codebook.values();
    chunk_sums_scalar(blocks, row_bytes, bits, |k| values[k].into(), weights, acc);
}

/// The scalar sums of [`accumulate_blocks_i16`] and [`accumulate_blocks_u8`] for one weight
/// vector: each chunk's sums of `w_i · value(code)` row by row, in order, in `i32`, then
/// `offset + step · sum` added to the chunk's float locals.
fn chunk_sums_scalar<T: Copy + Into<i32>>(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    value: impl Fn(usize) -> i32,
    weights: &ChunkWeights<T>,
    acc: &mut [f32],
) {
    let blocks_per_chunk = INT_CHUNK / BLOCK;
    let blocks: Vec<&[u8]> = blocks.chunks_exact(block_bytes(row_bytes)).collect();
    let (mut local, mut sums) = (vec![0.0f32; acc.len()], vec![0i32; acc.len()]);
    let mut row = vec![0u8; row_bytes];
    let mut codes = vec![0u8; 8 * row_bytes / bits as usize];
    for (c, &(offset, step)) in weights.chunks.iter().enumerate() {
        let range = c * blocks_per_chunk..((c + 1) * blocks_per_chunk).min(blocks.len());
        sums.fill(0);
        for b in range.filter(|&b| weights.active[b]) {
            for slot in 0..BLOCK {
                let w: i32 = weights.weights[b * BLOCK + slot].into();
                read_row(blocks[b], slot, &mut row);
                crate::bitpack::unpack_unchecked(&row, bits, &mut codes);
                for (s, &code) in sums.iter_mut().zip(&codes) {
                    *s += w * value(code as usize);
                }
            }
        }
        for (l, &s) in local.iter_mut().zip(&sums) {
            *l += offset + step * s as f32;
        }
    }
    for (a, l) in acc.iter_mut().zip(&local) {
        *a += l;
    }
}

/// Panics unless the arguments fit [`accumulate_blocks_i16`] or [`accumulate_blocks_u8`]:
/// `bits` in 1-8 and a grid of `grid_len >= 2^bits` values, whole blocks of rows of
/// `row_bytes > 0` bytes, one accumulator per weight vector, all of one length `<= 8 · row_bytes
/// / bits`, each vector covering exactly the rows with their blocks and chunks.
fn check_sums<T>(
    blocks_len: usize,
    row_bytes: usize,
    bits: u32,
    grid_len: usize,
    weights: &[&ChunkWeights<T>],
    accs: &[&mut [f32]],
) {
    assert!(
        (1..=8).contains(&bits),
        "integer sums take 1- to 8-bit codes, not {bits}"
    );
    assert!(row_bytes > 0, "rows of 0 bytes hold no codes");
    let bb = block_bytes(row_bytes);
    assert!(
        blocks_len.is_multiple_of(bb),
        "{blocks_len} bytes are not whole blocks of {bb}"
    );
    let rows = blocks_len / bb * BLOCK;
    assert!(
        grid_len >= 1 << bits,
        "a grid of {grid_len} values for {bits}-bit codes"
    );
    assert_eq!(
        weights.len(),
        accs.len(),
        "one accumulator per weight vector"
    );
    let dim = accs.first().map_or(0, |a| a.len());
    assert!(
        dim <= 8 * row_bytes / bits as usize,
        "{dim} coordinates of {bits} bits in rows of {row_bytes} bytes"
    );
    for (w, a) in weights.iter().zip(accs) {
        assert!(
            w.weights.len() == rows
                && w.active.len() == rows / BLOCK
                && w.chunks.len() == rows.div_ceil(INT_CHUNK),
            "weights for {} rows over {rows} rows",
            w.weights.len()
        );
        assert_eq!(a.len(), dim, "accumulators of different lengths");
    }
}

/// Weighted sums of 1-4-bit rows (the codebook's width) on a byte grid, the fast path of
/// attention over 1-4-bit values where the CPU has AVX-512 BW and VNNI ([`byte_sums_native`]):
/// `accs[q][j] += Σ_c step_c · Σ_{i in chunk c} w_i · (values[code_j(row i)] − 128)` for each
/// weight vector `weights[q]` ([`ByteCodebook::quantize_weights`]: `u8` weights, one step per
/// [`INT_CHUNK`] rows). The body decodes each unit of four coordinates once per group of
/// [`INT_QUERIES`] weight vectors (4 bits: nibbles; 1-3 bits: the codes cut out of their
/// nibble positions by shifts and selects) and looks them up in the grid (`vpshufb`), then
/// adds its rows by one `vpdpbusd` per 16 rows, four coordinates and vector (half the
/// `vpdpwssd` of [`accumulate_blocks_i16`], on grid entries of 8 bits rather than 14); each
/// chunk's sums are exact in `i32`, converted and scaled as the scalar twin does, so the
/// results are its bits. Elsewhere the scalar twin runs. O(rows · dim · vectors).
///
/// # Panics
/// Unless `row_bytes > 0`, `blocks` is whole blocks, every weight vector covers exactly their
/// rows, the accumulators have one length `<= 8 · row_bytes / bits` (the codes a row holds)
/// and there is one accumulator per weight vector.
pub fn accumulate_blocks_u8(
    blocks: &[u8],
    row_bytes: usize,
    codebook: &ByteCodebook,
    weights: &[&ByteWeights],
    accs: &mut [&mut [f32]],
) {
    let bits = codebook.bits();
    check_sums(blocks.len(), row_bytes, bits, 16, weights, accs);
    #[cfg(target_arch = "x86_64")]
    if byte_sums_native() {
        use super::avx512::accumulate_u8_vnni;
        let codes = IntSumCodes { blocks, row_bytes };
        const B1: usize = 1;
        const B2: usize = 2;
        const B3: usize = 3;
        const B4: usize = 4;
        // SAFETY: AVX-512 F, BW and VNNI are present (checked above); `check_sums` proved
        // the lengths the body reads through; a chunk's sums stay below `128 · 255 · 128`.
        unsafe {
            let table = super::avx512::signed_grid_512(codebook.values());
            match bits {
                1 => int_groups!(accumulate_u8_vnni, B1, codes, (table), weights, accs),
                2 => int_groups!(accumulate_u8_vnni, B2, codes, (table), weights, accs),
                3 => int_groups!(accumulate_u8_vnni, B3, codes, (table), weights, accs),
                _ => int_groups!(accumulate_u8_vnni, B4, codes, (table), weights, accs),
            }
        }
        return;
    }
    for (w, acc) in weights.iter().zip(accs.iter_mut()) {
        accumulate_blocks_u8_scalar(blocks, row_bytes, codebook, w, acc);
    }
}

/// Whether [`accumulate_blocks_u8`] runs a SIMD body on this CPU (AVX2, FMA and AVX-512 F, VL,
/// BW and VNNI, not turned off by `TQ_NO_AVX512=1`); elsewhere callers should keep the `i16`
/// weights of [`accumulate_blocks_i16`], which have SIMD bodies for AVX2. The two paths round
/// differently, so a 1-4-bit fast weighted sum depends on which one the CPU takes (each is the
/// same on every CPU that takes it). O(1) after the first call.
pub fn byte_sums_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512_bw_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scalar twin of [`accumulate_blocks_u8`] for one weight vector, the specification: each
/// chunk's sums row by row, in order.
///
/// # Panics
/// As [`accumulate_blocks_u8`].
pub fn accumulate_blocks_u8_scalar(
    blocks: &[u8],
    row_bytes: usize,
    codebook: &ByteCodebook,
    weights: &ByteWeights,
    acc: &mut [f32],
) {
    let bits = codebook.bits();
    check_sums(blocks.len(), row_bytes, bits, 16, &[weights], &[&mut *acc]);
    let values = codebook.values();
    chunk_sums_scalar(
        blocks,
        row_bytes,
        bits,
        |k| i32::from(values[k]) - 128,
        weights,
        acc,
    );
}

/// Unit dots of the 32 rows of one block with a rotated query, exactly in f32:
/// `out[r] = Σ_j q[j] · values[code_j(row r)]` for `j < q.len()`, any width 1-8 (the exact path of
/// widths without look-up tables). AVX2 + FMA at 6-8 bits (each coordinate's 32 codes cut out of
/// the nibble layout and decoded by gathers, or with AVX-512 VBMI two coordinates at a time by
/// byte permutes: the same floats, the same sums), the row-by-row scalar decode otherwise.
/// O(32 · q.len()).
///
/// # Panics
/// Unless `bits` is in `1..=8`, `block.len()` is a positive multiple of 32, `values` holds at least
/// `2^bits` entries and `q.len() <= 8 · row_bytes / bits` (the codes a row holds).
pub fn dot_block_codes(block: &[u8], bits: u32, values: &[f32], q: &[f32], out: &mut [f32; BLOCK]) {
    let row_bytes = block.len() / BLOCK;
    check_block(block.len(), row_bytes);
    check_codes(row_bytes, bits, values.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    {
        if bits >= 6 && has_avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked at run time); the checks above proved
            // the block's size, that every coordinate of `q` lies in a row and that every code
            // indexes `values`.
            unsafe { x86::dot_block_wide_x86(block, bits, values, q, out, has_avx512_vbmi()) };
            return;
        }
    }
    dot_block_codes_scalar(block, bits, values, q, out);
}

/// Scores of consecutive blocks of `bits`-bit codes (`5 <= bits <= 8`, rows of `row_bytes`
/// bytes) against one query on an integer grid: `out[i] = scales[i] · (affine.offset +
/// affine.step · S_i) + affine.bias` with `S_i = Σ_j weights[j] · codebook.values()[code_j(row
/// i)]`, summed exactly in `i32` over each chunk of [`INT_CHUNK`] coordinates (the checks bound
/// it) and the chunks' sums added in `f32`, in order. The fast path of 5-8-bit keys, with
/// [`IntCodebook::quantize_query`]'s weights, offset and step. With AVX-512 VBMI and VNNI and
/// GFNI, four coordinates' 128 codes at a time are cut out by per-lane shifts, put in row-major
/// order, looked up in the grid's two byte planes by one `vpermb` / `vpermi2b` per plane (8 bits:
/// one per plane when the grid is antisymmetric, else two and a blend), interleaved into word
/// pairs of two coordinates per row and summed by `vpdpwssd`; with AVX2, a `pshufb` look-up (5
/// bits) or four gathers (6-8 bits) and multiplies per coordinate; else
/// [`dot_blocks_scores_i16_scalar`]. Every path computes the same integers and converts them
/// with the same float operations, so the scores are the same bits on every CPU. `out.len()`
/// rows are scored (the last block's empty slots are not written). O(rows · weights.len()).
///
/// # Panics
/// Before any memory is read, unless `5 <= bits <= 8`, `row_bytes >= 1`, `blocks.len() ==
/// out.len().div_ceil(32) · 32 · row_bytes`, `scales.len() == out.len()`, the codebook has at
/// least `2^bits` values, `weights.len() <= 8 · row_bytes / bits` and, over every chunk of
/// [`INT_CHUNK`] weights, `Σ_j |weights[j]| · max_k |values[k]| <= i32::MAX`.
#[allow(clippy::too_many_arguments)]
pub fn dot_blocks_scores_i16(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    codebook: &IntCodebook,
    weights: &[i16],
    affine: Affine,
    scales: &[f32],
    out: &mut [f32],
) {
    let mut jobs = [IntJob {
        weights,
        affine,
        out,
    }];
    dot_blocks_scores_i16_multi(
        blocks,
        row_bytes,
        bits,
        codebook,
        scales,
        &mut jobs,
        Ahead::NONE,
    );
}

/// One query of [`dot_blocks_scores_i16_multi`]: its weights on the codebook's grid, its
/// [`Affine`] and its output scores.
#[derive(Debug)]
pub struct IntJob<'a> {
    /// One weight per coordinate ([`super::IntQuery::weights`]).
    pub weights: &'a [i16],
    /// Sum to score.
    pub affine: Affine,
    /// One score per row.
    pub out: &'a mut [f32],
}

/// Queries [`dot_blocks_scores_i16_multi`] scores per pass over a block (a grouped-query head of
/// SmolLM2's shape in one pass).
pub const INT_QUERIES: usize = 3;

/// [`dot_blocks_scores_i16`] for several queries over the same rows: each block's codes are cut
/// out and looked up once per group of up to [`INT_QUERIES`] jobs (with AVX2, gathered once), and
/// every job gets the scores it would get alone (the same bits). The first group asks for
/// `ahead`'s lines of each block's rows as it walks them. O(rows · d · jobs).
///
/// # Panics
/// Before any memory is read, unless every job fits [`dot_blocks_scores_i16`]'s checks for
/// `scales.len()` rows and all jobs have the same number of weights.
pub fn dot_blocks_scores_i16_multi(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    codebook: &IntCodebook,
    scales: &[f32],
    jobs: &mut [IntJob<'_>],
    ahead: Ahead<'_>,
) {
    let dim = jobs.first().map_or(0, |j| j.weights.len());
    for job in jobs.iter() {
        assert_eq!(
            job.weights.len(),
            dim,
            "every job weights the same coordinates"
        );
        check_int_dots(
            blocks.len(),
            row_bytes,
            bits,
            codebook,
            job.weights,
            scales.len(),
            job.out.len(),
        );
    }
    for (i, group) in jobs.chunks_mut(INT_QUERIES).enumerate() {
        let ahead = if i == 0 { ahead } else { Ahead::NONE };
        match group.len() {
            1 => int_group::<1>(blocks, row_bytes, bits, codebook, scales, group, ahead),
            2 => int_group::<2>(blocks, row_bytes, bits, codebook, scales, group, ahead),
            _ => int_group::<3>(blocks, row_bytes, bits, codebook, scales, group, ahead),
        }
    }
}

/// [`dot_blocks_scores_i16_multi`] for one group of exactly `Q` checked jobs.
fn int_group<const Q: usize>(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    codebook: &IntCodebook,
    scales: &[f32],
    jobs: &mut [IntJob<'_>],
    ahead: Ahead<'_>,
) {
    let weights: [&[i16]; Q] = std::array::from_fn(|q| jobs[q].weights);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512_int() {
            // SAFETY: AVX2, AVX-512 F, BW, VBMI and VNNI, and GFNI are present (checked at run
            // time).
            let planes = unsafe { super::avx512::IntPlanes::new(codebook, bits) };
            int_blocks::<Q>(blocks, row_bytes, scales, jobs, ahead, |block, sums| {
                // SAFETY: the CPU features as above; the checks proved the block's size, that
                // every weight's coordinate lies in a row and that no partial sum overflows.
                unsafe { super::avx512::dot_block_i16_x86(block, bits, &planes, weights, sums) }
            });
            return;
        }
        if has_avx2_fma() {
            int_blocks::<Q>(blocks, row_bytes, scales, jobs, ahead, |block, sums| {
                // SAFETY: AVX2 is present (checked at run time); the checks as above, and every
                // code indexes the widened table (at least 2^bits entries).
                unsafe {
                    let (wide, planes) = (codebook.wide(), codebook.planes());
                    x86::dot_block_i16_avx2(block, bits, wide, planes, weights, sums)
                }
            });
            return;
        }
    }
    int_blocks::<Q>(blocks, row_bytes, scales, jobs, ahead, |block, sums| {
        for (w, s) in weights.iter().zip(sums.iter_mut()) {
            dot_block_i16_scalar(block, bits, codebook.values(), w, s);
        }
    });
}

/// Runs `body` (one block's sums for each of the `Q` jobs) over each block, asking for
/// `ahead`'s lines of its rows first, and converts every job's sums to its scores
/// ([`int_scores`]).
#[inline(always)]
fn int_blocks<const Q: usize>(
    blocks: &[u8],
    row_bytes: usize,
    scales: &[f32],
    jobs: &mut [IntJob<'_>],
    ahead: Ahead<'_>,
    mut body: impl FnMut(&[u8], &mut [[f32; BLOCK]; Q]),
) {
    let mut sums = [[0f32; BLOCK]; Q];
    for (b, (block, sc)) in blocks
        .chunks_exact(block_bytes(row_bytes))
        .zip(scales.chunks(BLOCK))
        .enumerate()
    {
        ahead.rows(BLOCK * b..BLOCK * (b + 1));
        body(block, &mut sums);
        for (job, s) in jobs.iter_mut().zip(&sums) {
            let o = &mut job.out[b * BLOCK..b * BLOCK + sc.len()];
            int_scores(s, job.affine, sc, o);
        }
    }
}

/// Scalar twin of [`dot_blocks_scores_i16`] (each row read out of the block, unpacked and
/// summed in order): the same integers, the same scores.
///
/// # Panics
/// As [`dot_blocks_scores_i16`].
#[allow(clippy::too_many_arguments)]
pub fn dot_blocks_scores_i16_scalar(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    codebook: &IntCodebook,
    weights: &[i16],
    affine: Affine,
    scales: &[f32],
    out: &mut [f32],
) {
    check_int_dots(
        blocks.len(),
        row_bytes,
        bits,
        codebook,
        weights,
        scales.len(),
        out.len(),
    );
    let mut jobs = [IntJob {
        weights,
        affine,
        out,
    }];
    int_blocks::<1>(
        blocks,
        row_bytes,
        scales,
        &mut jobs,
        Ahead::NONE,
        |block, sums| dot_block_i16_scalar(block, bits, codebook.values(), weights, &mut sums[0]),
    );
}

/// One block's sums, row by row (the specification of the SIMD bodies): each chunk of
/// [`INT_CHUNK`] coordinates summed in `i32`, the chunks' sums added in `f32` from 0, in order.
pub(super) fn dot_block_i16_scalar(
    block: &[u8],
    bits: u32,
    values: &[i16],
    weights: &[i16],
    out: &mut [f32; BLOCK],
) {
    let row_bytes = block.len() / BLOCK;
    let mut row = vec![0u8; row_bytes];
    let mut codes = vec![0u8; 8 * row_bytes / bits as usize];
    for (slot, o) in out.iter_mut().enumerate() {
        read_row(block, slot, &mut row);
        crate::bitpack::unpack_unchecked(&row, bits, &mut codes);
        *o =
            weights
                .chunks(INT_CHUNK)
                .zip(codes.chunks(INT_CHUNK))
                .fold(0.0f32, |total, (w, c)| {
                    let chunk: i32 = w
                        .iter()
                        .zip(c)
                        .map(|(&w, &c)| i32::from(w) * i32::from(values[c as usize]))
                        .sum();
                    total + chunk as f32
                });
    }
}

/// A block's scores from its sums: `scale · (offset + step · sum) + bias`, one rounding per
/// operation (no fused multiply-add), so every path's scores are the same bits.
#[inline]
fn int_scores(sums: &[f32; BLOCK], affine: Affine, scales: &[f32], out: &mut [f32]) {
    for ((o, &s), &sum) in out.iter_mut().zip(scales).zip(sums) {
        *o = s * (affine.offset + affine.step * sum) + affine.bias;
    }
}

/// One query of [`dot_blocks_scores_u8`]: its weights on the codebook's byte grid, its
/// [`Affine`] and its output scores.
#[derive(Debug)]
pub struct ByteJob<'a> {
    /// One weight per nibble position ([`super::ByteQuery::weights`]).
    pub weights: &'a [i8],
    /// Sum to score.
    pub affine: Affine,
    /// One score per row.
    pub out: &'a mut [f32],
}

/// Queries [`dot_blocks_scores_u8`] scores per pass over a block (a grouped-query head of
/// SmolLM2's shape in one pass).
pub const BYTE_QUERIES: usize = 3;

/// Whether [`dot_blocks_scores_u8`] runs a SIMD body on this CPU (AVX-512 F, BW, VBMI and VNNI,
/// not turned off by `TQ_NO_AVX512=1`); elsewhere it runs its scalar twin, and callers that
/// have another fast path (the `u8` table scan) should take it. O(1) after the first call.
pub fn byte_dots_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512_vbmi() && has_avx512_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scores of consecutive blocks of 4-bit codes (rows of `row_bytes` bytes, one code per nibble)
/// against several queries on a [`ByteCodebook`]'s grid: for job `q`, `out[i] = scales[i] ·
/// (offset + step · S_i) + bias` (its [`Affine`], one rounding per operation) with `S_i = Σ_n
/// w_n · values[code_n(row i)]`, exact in `i32`. `scales.len()` rows are scored (the last
/// block's empty slots are not written). With AVX-512 VBMI and VNNI ([`byte_dots_native`]) each
/// 64-byte load of four nibble positions is put in row order by one `vpermb`, each nibble looked
/// up in the grid by one more (the table repeats through 64 entries, so the bits above a nibble
/// need no mask), and one `vpdpbusd` per 16 rows and query adds four positions' products: the
/// look-ups are shared by up to [`BYTE_QUERIES`] queries per pass, each query adds one
/// instruction per 64 products. Else [`dot_blocks_scores_u8_scalar`] per job. Every path gives
/// the same bits. The first pass asks for `ahead`'s lines of each block's rows as it walks them
/// (the fallback does not). O(rows · row_bytes · jobs).
///
/// # Panics
/// Before any memory is read, for each job, unless the codebook is 4-bit, `1 <= row_bytes <=
/// 32 768` (so no sum overflows),
/// `blocks.len() == scales.len().div_ceil(32) · 32 · row_bytes`, and every job has `2 ·
/// row_bytes` weights and `scales.len()` outputs.
pub fn dot_blocks_scores_u8(
    blocks: &[u8],
    row_bytes: usize,
    codebook: &ByteCodebook,
    scales: &[f32],
    jobs: &mut [ByteJob<'_>],
    ahead: Ahead<'_>,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
    for job in jobs.iter() {
        check_byte_dots(
            blocks.len(),
            codebook.bits(),
            row_bytes,
            job.weights.len(),
            scales.len(),
            job.out.len(),
        );
    }
    #[cfg(target_arch = "x86_64")]
    {
        if byte_dots_native() {
            let bb = block_bytes(row_bytes);
            for (i, group) in jobs.chunks_mut(BYTE_QUERIES).enumerate() {
                let ahead = if i == 0 { ahead } else { Ahead::NONE };
                // SAFETY: AVX2 and AVX-512 F, BW, VBMI and VNNI are present (checked at run
                // time); the checks above proved the blocks' and every job's lengths.
                unsafe {
                    match group.len() {
                        1 => super::avx512::dot_blocks_u8_vbmi::<1>(
                            blocks,
                            bb,
                            codebook.values(),
                            scales,
                            first_n(group),
                            ahead,
                        ),
                        2 => super::avx512::dot_blocks_u8_vbmi::<2>(
                            blocks,
                            bb,
                            codebook.values(),
                            scales,
                            first_n(group),
                            ahead,
                        ),
                        _ => super::avx512::dot_blocks_u8_vbmi::<3>(
                            blocks,
                            bb,
                            codebook.values(),
                            scales,
                            first_n(group),
                            ahead,
                        ),
                    }
                }
            }
            return;
        }
    }
    for job in jobs.iter_mut() {
        dot_blocks_scores_u8_scalar(
            blocks,
            row_bytes,
            codebook,
            job.weights,
            job.affine,
            scales,
            job.out,
        );
    }
}

/// Scalar twin of [`dot_blocks_scores_u8`] for one query (each row's nibbles read in order,
/// summed in `i32`): the same integers, the same scores.
///
/// # Panics
/// As [`dot_blocks_scores_u8`].
pub fn dot_blocks_scores_u8_scalar(
    blocks: &[u8],
    row_bytes: usize,
    codebook: &ByteCodebook,
    weights: &[i8],
    affine: Affine,
    scales: &[f32],
    out: &mut [f32],
) {
    check_byte_dots(
        blocks.len(),
        codebook.bits(),
        row_bytes,
        weights.len(),
        scales.len(),
        out.len(),
    );
    let values = codebook.values();
    for ((block, sc), o) in blocks
        .chunks_exact(block_bytes(row_bytes))
        .zip(scales.chunks(BLOCK))
        .zip(out.chunks_mut(BLOCK))
    {
        let mut sums = [0i32; BLOCK];
        for (bytes, &w) in block.chunks_exact(16).zip(weights) {
            let w = i32::from(w);
            for (i, &b) in bytes.iter().enumerate() {
                sums[i] += w * i32::from(values[usize::from(b & 0x0F)]);
                sums[i + 16] += w * i32::from(values[usize::from(b >> 4)]);
            }
        }
        for ((o, &s), &sum) in o.iter_mut().zip(sc).zip(&sums) {
            *o = s * (affine.offset + affine.step * sum as f32) + affine.bias;
        }
    }
}

/// Panics unless the arguments fit [`dot_blocks_scores_u8`].
fn check_byte_dots(
    blocks_len: usize,
    bits: u32,
    row_bytes: usize,
    weights: usize,
    scales_len: usize,
    rows: usize,
) {
    assert_eq!(bits, 4, "byte dots score 4-bit codes");
    assert!(
        (1..=1 << 15).contains(&row_bytes),
        "byte dots take rows of 1 to 32 768 bytes, not {row_bytes}"
    );
    assert_eq!(weights, 2 * row_bytes, "one weight per nibble position");
    assert!(
        blocks_len == scales_len.div_ceil(BLOCK) * block_bytes(row_bytes) && scales_len == rows,
        "{blocks_len} block bytes, {scales_len} scales and {rows} outputs do not fit rows of {row_bytes} bytes"
    );
}

/// Panics unless the arguments fit [`dot_blocks_scores_i16`].
fn check_int_dots(
    blocks_len: usize,
    row_bytes: usize,
    bits: u32,
    codebook: &IntCodebook,
    weights: &[i16],
    scales_len: usize,
    rows: usize,
) {
    assert!(
        (5..=8).contains(&bits),
        "integer dots take 5- to 8-bit codes, not {bits}"
    );
    assert!(row_bytes > 0, "rows of 0 bytes hold no codes");
    check_codes(row_bytes, bits, codebook.values().len(), weights.len());
    assert!(
        blocks_len == rows.div_ceil(BLOCK) * block_bytes(row_bytes) && scales_len == rows,
        "{blocks_len} block bytes and {scales_len} scales do not fit {rows} rows of {row_bytes} bytes"
    );
    let l1 = weights
        .chunks(INT_CHUNK)
        .map(|c| c.iter().map(|&w| i64::from(w).abs()).sum::<i64>())
        .max()
        .unwrap_or(0);
    assert!(
        l1 * codebook.max_abs() <= i64::from(i32::MAX),
        "weights summing to {l1} in magnitude in one chunk could overflow an i32 dot"
    );
}

/// Scalar twin of [`dot_block_codes`]: each row read out of the block, unpacked and dotted in
/// order.
///
/// # Panics
/// As [`dot_block_codes`].
pub fn dot_block_codes_scalar(
    block: &[u8],
    bits: u32,
    values: &[f32],
    q: &[f32],
    out: &mut [f32; BLOCK],
) {
    let row_bytes = block.len() / BLOCK;
    check_block(block.len(), row_bytes);
    check_codes(row_bytes, bits, values.len(), q.len());
    let mut row = vec![0u8; row_bytes];
    let mut codes = vec![0u8; 8 * row_bytes / bits as usize];
    for (slot, o) in out.iter_mut().enumerate() {
        read_row(block, slot, &mut row);
        crate::bitpack::unpack_unchecked(&row, bits, &mut codes);
        *o = q
            .iter()
            .zip(&codes)
            .map(|(w, &c)| w * values[c as usize])
            .sum();
    }
}

/// One block's 32 weights: `w` (at most 32) times the matching leading `scales`, zero-padded.
#[inline(always)]
pub(super) fn block_weights(w: &[f32], scales: Option<&[f32]>) -> [f32; BLOCK] {
    let mut w32 = [0.0f32; BLOCK];
    w32[..w.len()].copy_from_slice(w);
    if let Some(s) = scales {
        for (x, &s) in w32.iter_mut().zip(&s[..w.len()]) {
            *x *= s;
        }
    }
    w32
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

/// Panics unless `block_len` is a multiple of 32 and `tables_len` holds one 32-byte table per
/// 5-bit code of a row.
#[inline]
fn check_b5_scan(block_len: usize, tables_len: usize) {
    assert!(
        block_len.is_multiple_of(BLOCK) && tables_len == 32 * coords5(block_len / BLOCK),
        "{tables_len} table bytes do not fit the 5-bit codes of a block of {block_len} bytes"
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

/// The instruction set the scan and accumulation kernels use on this CPU: `"avx2+fma"` on x86-64
/// CPUs with both (nibble tables up to 5 bits, gathers at 6-8), followed by `+avx512vl` where
/// AVX-512 F and VL give the fused score kernel 32 registers (three queries per pass),
/// `+avx512vbmi` where AVX-512 F, BW and VBMI decode 5-8-bit values and 6-8-bit exact key dots by
/// byte permutes, and `+avx512vnni` where AVX-512 F, VL and VNNI run the nibble dot products
/// (with VBMI, each row's nibbles gathered by one `vpermb` per four positions, and the byte dots
/// of 4-bit keys; with BW, the 4-bit integer value sums; with VBMI and GFNI too, the 5-8-bit integer key dots
/// and the other widths' integer value sums; all off with `TQ_NO_AVX512=1`); `"scalar"`
/// otherwise (the portable twins). O(1) after the first call.
pub fn kernel_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // VNNI is only used with VL (`has_avx512_vnni` checks both).
        return match (has_avx512_vl(), has_avx512_vbmi(), has_avx512_vnni()) {
            (true, true, true) => "avx2+fma+avx512vl+avx512vbmi+avx512vnni",
            (true, true, false) => "avx2+fma+avx512vl+avx512vbmi",
            (true, false, true) => "avx2+fma+avx512vl+avx512vnni",
            (true, false, false) => "avx2+fma+avx512vl",
            (false, true, _) => "avx2+fma+avx512vbmi",
            (false, false, _) => "avx2+fma",
        };
    }
    "scalar"
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

/// AVX-512 F, BW and VBMI beside AVX2 and FMA: 5-8-bit values and 6-8-bit exact key dots
/// decode through byte permutes. `TQ_NO_AVX512=1` in the environment turns every AVX-512 body
/// off (to compare the paths on one machine).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512_vbmi() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        avx512_allowed()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
    })
}

/// [`has_avx512_vbmi`] and [`has_avx512_vnni`], and GFNI: the integer key dots and the integer
/// value sums other than 4-bit look codes up by byte permutes, add by `vpdpwssd` and take the
/// 8-bit fold's sign mask and mirrored index from `vgf2p8affineqb` (every CPU with VBMI and VNNI
/// so far has GFNI).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512_int() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        has_avx512_vbmi() && has_avx512_vnni() && std::arch::is_x86_feature_detected!("gfni")
    })
}

/// AVX-512 F, VL and VNNI beside AVX2 and FMA: the nibble dot products (KIVI keys) use
/// `vpdpbusd`, and with VBMI the 5-8-bit integer key dots `vpdpwssd`. Off with `TQ_NO_AVX512=1`, as [`has_avx512_vbmi`].
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512_vnni() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        avx512_allowed()
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

/// AVX-512 F and VL beside AVX2 and FMA: the 256-bit kernels compiled with them get 32 registers.
/// Off with `TQ_NO_AVX512=1`, as [`has_avx512_vbmi`].
#[cfg(target_arch = "x86_64")]
fn has_avx512_vl() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| avx512_allowed() && std::arch::is_x86_feature_detected!("avx512vl"))
}

/// [`has_avx512_vnni`] and AVX-512 BW: the 4-bit integer value sums (byte shuffles and masked
/// byte loads on 512-bit registers, `vpdpwssd`) and the byte sums (`vpdpbusd`).
#[cfg(target_arch = "x86_64")]
fn has_avx512_bw_vnni() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| has_avx512_vnni() && std::arch::is_x86_feature_detected!("avx512bw"))
}

/// AVX-512 F beside AVX2 and FMA, not turned off by `TQ_NO_AVX512=1`: the float kernels with a
/// 512-bit body (the softmax numerators, [`crate::simd::exp_affine_sum`], and KIVI's query
/// weights, [`nibble_weights_i8`] and [`nibble_weights_i8_groups`]) take it. O(1) after the
/// first call.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512f_native() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(avx512_allowed)
}

/// AVX2, FMA and AVX-512 F present, and `TQ_NO_AVX512` unset (or empty or `0`).
#[cfg(target_arch = "x86_64")]
fn avx512_allowed() -> bool {
    has_avx2_fma()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::env::var_os("TQ_NO_AVX512").is_none_or(|v| v.is_empty() || v == "0")
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| !cfg!(miri) && std::arch::is_x86_feature_detected!("avx2"))
}
