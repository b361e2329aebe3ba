//! Query-side scoring machinery shared by the batches: nibble tables, block-parallel loops and
//! top-k selection.
//!
//! For bit widths 1, 2 and 4 a packed row is a sequence of nibbles that each hold `4 / b` whole
//! codes, so `⟨Π q, ỹ⟩ = Σ_n T_n[nibble_n]` with one 16-entry table per nibble position:
//! `T_n[v] = Σ_k q_{n·4/b + k} · c[(v >> k·b) & (2^b - 1)]` (coordinates past `d` contribute 0).
//! The fast path sums those tables quantized to `u8` ([`QuantizedLut`]) with the SIMD scan
//! kernel; the exact path sums the `f32` tables. Widths 3 and 5 take one table per coordinate
//! (16 and 32 entries). Widths 6-8 have no tables, and MSE codes take the same fast path at 5
//! bits (finer than the 32-entry `u8` tables): it puts the codebook and the
//! query on integer grids and sums `i16` products ([`tq_core::scan::dot_blocks_scores_i16`]);
//! the exact path decodes each row. At 4 bits, where the CPU runs them natively, MSE codes take
//! the byte dots instead of the `u8` tables (`BYTE_DOT_BITS`).

use rayon::prelude::*;
use tq_core::prefetch::Ahead;
use tq_core::scan::{BLOCK, QuantizedLut};

/// Rows from which scoring is split across the rayon pool.
pub const PARALLEL_MIN_ROWS: usize = 1 << 14;

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Row index in the batch.
    pub index: usize,
    /// Estimated inner product.
    pub score: f32,
}

/// How a width's rows are scanned with look-up tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum TableKind {
    /// Widths 1, 2, 4: one table per nibble covering `4 / b` codes.
    #[default]
    Nibble,
    /// Width 3: one table per coordinate, codes rebuilt from three nibbles per four coordinates.
    Code3,
    /// Width 5: one 32-entry table per coordinate, codes rebuilt from ten nibbles per eight
    /// coordinates.
    Code5,
}

/// The narrowest width whose fast path is the integer dots on the codebook's grid
/// ([`tq_core::scan::dot_blocks_scores_i16`]) rather than a `u8` table scan: at 6-8 bits tables
/// of 64-256 entries per coordinate do not fit a register look-up; at 5 bits the 32-entry `u8`
/// tables would, but their rounding is 0.43 of the quantization error where the grid's is under
/// 0.01 (the 5-bit `f32` tables stay the exact path).
pub(crate) const INT_DOT_MIN_BITS: u32 = 5;

/// The width whose fast path is the byte dots ([`tq_core::scan::dot_blocks_scores_u8`]) where
/// the CPU runs them natively: one code per nibble, so a nibble's grid value times one `i8`
/// weight is the whole product; the `u8` tables stay the fast path elsewhere. Against those
/// tables the byte grid rounds the query and the codebook separately on finer steps
/// (`max|q| / 127` and `max|c| / 127` against the tables' `max|q| · 2max|c| / 255`), and each
/// further query of a grouped head costs one `vpdpbusd` per 64 products, not a table look-up
/// per product.
pub(crate) const BYTE_DOT_BITS: u32 = 4;

/// The widest values summed on the byte grid ([`tq_core::scan::accumulate_blocks_u8`]) where
/// the CPU runs the byte sums: a 1-4-bit codebook's 2-16 centroids lie within half a step of
/// 255 steps across its span; wider codebooks' spacing is too fine for the 8-bit grid.
pub(crate) const BYTE_SUM_MAX_BITS: u32 = 4;

/// The table scheme for codes of `bits` bits, if any (widths 6-8 have none: their fast path is
/// the integer dots, [`INT_DOT_MIN_BITS`], as is 5 bits' for MSE codes).
#[inline]
pub(crate) fn table_kind(bits: u32) -> Option<TableKind> {
    match bits {
        1 | 2 | 4 => Some(TableKind::Nibble),
        3 => Some(TableKind::Code3),
        5 => Some(TableKind::Code5),
        _ => None,
    }
}

/// Per-coordinate tables for 3-bit codes: `16 · coords` floats, table `j` holds
/// `weights[j] · values[0..8]` and repeats entry 0 in its unused entries 8..16 (so they do not
/// widen the table's range); coordinates past `weights.len()` get all-zero tables.
pub(crate) fn code3_tables(weights: &[f32], values: &[f32], coords: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; 16 * coords];
    for (j, table) in t.chunks_exact_mut(16).enumerate() {
        if let Some(&w) = weights.get(j) {
            for (v, e) in table.iter_mut().enumerate() {
                *e = w * values[if v < 8 { v } else { 0 }];
            }
        }
    }
    t
}

/// Per-coordinate tables for 5-bit codes: `32 · coords` floats, table `j` holds
/// `weights[j] · values[0..32]`; coordinates past `weights.len()` get all-zero tables.
pub(crate) fn code5_tables(weights: &[f32], values: &[f32], coords: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; 32 * coords];
    for (table, &w) in t.chunks_exact_mut(32).zip(weights) {
        for (e, &v) in table.iter_mut().zip(values) {
            *e = w * v;
        }
    }
    t
}

/// Float nibble tables for `weights` (length `d`, zero-padded past `d`) and a codebook `values`
/// (`2^bits` entries) over `positions` nibbles.
pub(crate) fn nibble_tables(
    weights: &[f32],
    values: &[f32],
    bits: u32,
    positions: usize,
) -> Vec<f32> {
    let mut t = vec![0.0f32; 16 * positions];
    if bits == 4 {
        // One coordinate per nibble: the same sums (`0 + w · value`, so a zero product is +0)
        // as `general_nibble_tables`, in a loop that vectorizes.
        for (table, &w) in t.chunks_exact_mut(16).zip(weights) {
            for (e, &v) in table.iter_mut().zip(&values[..16]) {
                *e = 0.0 + w * v;
            }
        }
        return t;
    }
    general_nibble_tables(weights, values, bits, &mut t);
    t
}

/// [`nibble_tables`]' sums at any width (`4 / bits` coordinates per nibble) into `t` (zeroed,
/// 16 entries per nibble position).
fn general_nibble_tables(weights: &[f32], values: &[f32], bits: u32, t: &mut [f32]) {
    let per = (4 / bits) as usize;
    let mask = (1usize << bits) - 1;
    for (n, table) in t.chunks_exact_mut(16).enumerate() {
        for (v, e) in table.iter_mut().enumerate() {
            let mut s = 0.0f32;
            for k in 0..per {
                let j = n * per + k;
                if let Some(&w) = weights.get(j) {
                    s += w * values[(v >> (k * bits as usize)) & mask];
                }
            }
            *e = s;
        }
    }
}

/// The tables of a query: `f32` for the exact path and `u8` for the fast path, the latter
/// quantized on first use ([`Tables::fast`]): a top-k search scans its own 64-level tables
/// ([`Tables::for_search`]) and never needs them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tables {
    pub(crate) kind: TableKind,
    pub(crate) exact: Vec<f32>,
    fast: std::sync::OnceLock<QuantizedLut>,
}

/// Largest entry of the nibble tables (1, 2 and 4 bits) a top-k search scans its candidates
/// with: 64 levels, entries `0..=63` ([`QuantizedLut::quantize_tables_to`]). The fused kernel
/// then adds four steps' look-ups as bytes before accumulating them (1 000-query d = 50 search
/// on one thread, Zen 4: 97-98 ms against 105-106 ms with the 256-level tables). The coarser
/// grid's rounding is four times the `u8` tables' (at 4 bits about 0.8 of the quantization
/// error, where the `u8` tables add 0.19: `coarse_candidate_error_against_quantization`), but
/// only the choice of candidates sees it: they are re-scored with the exact tables, and the
/// exact top-k is found among them (`top_k_finds_the_exact_top_k_with_coarse_candidates`;
/// GloVe recall 1@1 and 1@10 unchanged in `scripts/bench_python.py`).
pub(crate) const SEARCH_MAX_ENTRY: u8 = 63;

impl Tables {
    /// The tables a top-k candidate scan uses: nibble tables quantized from the exact ones with
    /// entries up to [`SEARCH_MAX_ENTRY`] (without the exact tables, which the re-scoring takes
    /// from the query), other kinds as they are. O(tables).
    pub(crate) fn for_search(&self) -> std::borrow::Cow<'_, Tables> {
        if self.kind == TableKind::Nibble {
            let mut fast = QuantizedLut::default();
            fast.quantize_tables_to(&self.exact, 16, SEARCH_MAX_ENTRY);
            std::borrow::Cow::Owned(Tables {
                kind: self.kind,
                exact: Vec::new(),
                fast: fast.into(),
            })
        } else {
            std::borrow::Cow::Borrowed(self)
        }
    }

    pub(crate) fn new(kind: TableKind, exact: Vec<f32>) -> Self {
        Self {
            kind,
            exact,
            fast: std::sync::OnceLock::new(),
        }
    }

    /// The `u8` tables of the fast path, quantized from the exact ones on the first call (any
    /// thread; the others wait for it). O(tables) once, then O(1).
    pub(crate) fn fast(&self) -> &QuantizedLut {
        self.fast.get_or_init(|| {
            let mut fast = QuantizedLut::default();
            let entries = if self.kind == TableKind::Code5 {
                32
            } else {
                16
            };
            fast.quantize_tables(&self.exact, entries);
            fast
        })
    }

    /// Builds the tables of `weights` (a rotated query) against codebook `values` for rows of
    /// `row_bytes` bytes of `bits`-bit codes; `None` for widths without a table scheme.
    pub(crate) fn for_codes(
        weights: &[f32],
        values: &[f32],
        bits: u32,
        row_bytes: usize,
    ) -> Option<Self> {
        Some(match table_kind(bits)? {
            TableKind::Nibble => Self::new(
                TableKind::Nibble,
                nibble_tables(weights, values, bits, 2 * row_bytes),
            ),
            TableKind::Code3 => Self::new(
                TableKind::Code3,
                code3_tables(weights, values, tq_core::scan::coords3(row_bytes)),
            ),
            TableKind::Code5 => Self::new(
                TableKind::Code5,
                code5_tables(weights, values, tq_core::scan::coords5(row_bytes)),
            ),
        })
    }

    /// Fast (u8) dots of the 32 rows of `block`.
    #[inline]
    pub(crate) fn block_fast(&self, block: &[u8], out: &mut [f32]) {
        let mut acc = [0u32; BLOCK];
        match self.kind {
            TableKind::Nibble => tq_core::scan::scan_block(block, &self.fast().tables, &mut acc),
            TableKind::Code3 => tq_core::scan::scan_block_b3(block, &self.fast().tables, &mut acc),
            TableKind::Code5 => tq_core::scan::scan_block_b5(block, &self.fast().tables, &mut acc),
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = self.fast().score(a);
        }
    }

    /// Fast scores `scales[i] · dot_i + bias` of consecutive rows: `blocks` holds the
    /// `out.len().div_ceil(32)` blocks of rows of `row_bytes` bytes, `scales` one scale per row.
    /// With `select = Some((above, masks))`, bit `r` of `masks[b]` is also set iff
    /// `out[32b + r] > above` (one mask per block). Nibble tables go through the fused kernel
    /// ([`tq_core::scan::scan_blocks_scores_above`]: scan, conversion and threshold in one call per
    /// run of blocks); 3- and 5-bit tables block by block.
    pub(crate) fn scores_fast(
        &self,
        blocks: &[u8],
        row_bytes: usize,
        scales: &[f32],
        bias: f32,
        out: &mut [f32],
        select: Option<(f32, &mut [u32])>,
    ) {
        if self.kind == TableKind::Nibble {
            let affine = tq_core::scan::Affine {
                offset: self.fast().offset,
                step: self.fast().step,
                bias,
            };
            let t = &self.fast().tables;
            match select {
                Some(marks) => tq_core::scan::scan_blocks_scores_above(
                    blocks, row_bytes, t, affine, scales, out, marks,
                ),
                None => {
                    tq_core::scan::scan_blocks_scores(blocks, row_bytes, t, affine, scales, out)
                }
            }
            return;
        }
        let bb = tq_core::scan::block_bytes(row_bytes);
        for ((block, o), sc) in blocks
            .chunks_exact(bb)
            .zip(out.chunks_mut(BLOCK))
            .zip(scales.chunks(BLOCK))
        {
            self.block_fast(block, o);
            for (v, &s) in o.iter_mut().zip(sc) {
                *v = *v * s + bias;
            }
        }
        if let Some((above, masks)) = select {
            tq_core::scan::mark_above(out, above, masks);
        }
    }

    /// [`Tables::scores_fast`] for several queries' tables over the same rows (`outs[i]` with
    /// `biases[i]`, no marks): nibble tables in pairs (threes with AVX-512 VL) through the fused
    /// kernel, 5-bit tables in groups of up to three through
    /// [`tq_core::scan::scan_block_b5_multi`] (each code rebuilt once per group), other mixes one
    /// query at a time. The nibble scans (on their AVX2 bodies) and the 5-bit scans ask for
    /// `ahead`'s lines of each block's rows as they walk them.
    pub(crate) fn scores_fast_many(
        tables: &[&Tables],
        blocks: &[u8],
        row_bytes: usize,
        scales: &[f32],
        biases: &[f32],
        outs: &mut [&mut [f32]],
        ahead: Ahead<'_>,
    ) {
        let all = |k: TableKind| tables.iter().all(|t| t.kind == k);
        if all(TableKind::Nibble) {
            let mut jobs: Vec<tq_core::scan::ScoreJob<'_>> = tables
                .iter()
                .zip(biases)
                .zip(outs.iter_mut())
                .map(|((t, &bias), o)| tq_core::scan::ScoreJob {
                    tables: &t.fast().tables,
                    affine: tq_core::scan::Affine {
                        offset: t.fast().offset,
                        step: t.fast().step,
                        bias,
                    },
                    out: o,
                    marks: None,
                })
                .collect();
            tq_core::scan::scan_blocks_scores_multi(blocks, row_bytes, scales, &mut jobs, ahead);
        } else if all(TableKind::Code5) {
            let refs: Vec<&[u8]> = tables.iter().map(|t| t.fast().tables.as_slice()).collect();
            let mut sums = vec![[0u32; BLOCK]; tables.len()];
            let bb = tq_core::scan::block_bytes(row_bytes);
            for (b, (block, sc)) in blocks
                .chunks_exact(bb)
                .zip(scales.chunks(BLOCK))
                .enumerate()
            {
                ahead.rows(b * BLOCK..(b + 1) * BLOCK);
                tq_core::scan::scan_block_b5_multi(block, &refs, &mut sums);
                for (((t, &bias), o), sum) in
                    tables.iter().zip(biases).zip(outs.iter_mut()).zip(&sums)
                {
                    let o = &mut o[b * BLOCK..b * BLOCK + sc.len()];
                    for ((v, &s), &a) in o.iter_mut().zip(sc).zip(sum) {
                        *v = t.fast().score(a) * s + bias;
                    }
                }
            }
        } else {
            for ((t, &bias), o) in tables.iter().zip(biases).zip(outs.iter_mut()) {
                t.scores_fast(blocks, row_bytes, scales, bias, o, None);
            }
        }
    }

    /// Exact (f32) dots of the 32 rows of `block`.
    #[inline]
    pub(crate) fn block_exact(&self, block: &[u8], out: &mut [f32]) {
        let mut acc = [0.0f32; BLOCK];
        match self.kind {
            TableKind::Nibble => tq_core::scan::scan_block_f32(block, &self.exact, &mut acc),
            TableKind::Code3 => tq_core::scan::scan_block_b3_f32(block, &self.exact, &mut acc),
            TableKind::Code5 => tq_core::scan::scan_block_b5_f32(block, &self.exact, &mut acc),
        }
        out.copy_from_slice(&acc[..out.len()]);
    }
}

thread_local! {
    /// Set while this thread runs one task of work already spread over the pool (one query of a
    /// many-query search): its row scans then stay on this thread.
    static SEQUENTIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's row scans kept sequential (no batch splits its rows over the
/// rayon pool inside `f`): for callers that already give the pool one task per query or per
/// batch (the kv heads of a multi-head cache), where splitting each task's rows again only adds
/// scheduling and gives up the scans that run on one thread (several queries per pass, the
/// value rows asked for while the keys are scanned). Results do not depend on it.
pub fn sequential<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SEQUENTIAL.set(self.0);
        }
    }
    let _restore = Restore(SEQUENTIAL.replace(true));
    f()
}

/// Whether a scan of `rows` rows should be split across the rayon pool: at least
/// [`PARALLEL_MIN_ROWS`] rows, more than one thread, and not inside [`sequential`].
pub(crate) fn split_rows(rows: usize) -> bool {
    rows >= PARALLEL_MIN_ROWS && rayon::current_num_threads() > 1 && !SEQUENTIAL.get()
}

/// Runs `f(block, out_chunk)` for every 32-row chunk of `out`, in parallel on the current rayon
/// pool when [`split_rows`] says so.
pub(crate) fn for_each_block<F>(out: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if split_rows(out.len()) {
        out.par_chunks_mut(BLOCK * 8)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (k, o) in chunk.chunks_mut(BLOCK).enumerate() {
                    f(c * 8 + k, o)
                }
            });
    } else {
        for (b, o) in out.chunks_mut(BLOCK).enumerate() {
            f(b, o)
        }
    }
}

/// Rows per task of [`for_each_chunk`]: 8 blocks.
pub(crate) const CHUNK_ROWS: usize = 8 * BLOCK;

/// Queries a many-query top-k scans together: each chunk of rows is handed to the fused kernel
/// with all their jobs, which scans it once per pair ([`tq_core::scan::FUSED_QUERIES`]; per three
/// with AVX-512 VL, [`tq_core::scan::FUSED_QUERIES_WIDE`]) while the
/// chunk's codes stay in the first two cache levels, so the codes stream from memory once per
/// group rather than once per pair.
pub(crate) const SEARCH_QUERIES: usize = 8;

/// Most rows a top-k scan hands the fused kernel per call (its threshold is refreshed between
/// calls): each call also reads the query's tables once to pick the kernel's look-up grouping,
/// which at 256 rows cost about 3% of a d = 50 search, at 1 024 rows under 1%.
pub(crate) const SEARCH_CHUNK_ROWS: usize = 32 * BLOCK;

/// The `(start, rows)` chunks a top-k scan of `len` rows keeping `c` candidates walks: the first
/// fills the selection (`2c` rows rounded up to whole blocks, at most [`SEARCH_CHUNK_ROWS`]: for
/// `c > 512` the threshold appears a few chunks later), so a threshold exists after it; the next
/// ones double up to [`SEARCH_CHUNK_ROWS`], so the early, fast-rising threshold is refreshed
/// often and stale marks stay few. Every start is a multiple of 32.
pub(crate) fn search_chunks(len: usize, c: usize) -> impl Iterator<Item = (usize, usize)> {
    let first = (2 * c).div_ceil(BLOCK).clamp(1, SEARCH_CHUNK_ROWS / BLOCK) * BLOCK;
    let mut next = (0usize, first);
    std::iter::from_fn(move || {
        let (start, want) = next;
        if start >= len {
            return None;
        }
        let rows = want.min(len - start);
        next = (start + rows, (2 * want).min(SEARCH_CHUNK_ROWS));
        Some((start, rows))
    })
}

/// Runs `f(first_row, out_chunk)` for every [`CHUNK_ROWS`]-row chunk of `out` (the last may be
/// shorter), in parallel on the current rayon pool when [`split_rows`] says so.
pub(crate) fn for_each_chunk<F>(out: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if split_rows(out.len()) {
        out.par_chunks_mut(CHUNK_ROWS)
            .enumerate()
            .for_each(|(c, chunk)| f(c * CHUNK_ROWS, chunk));
    } else {
        for (c, chunk) in out.chunks_mut(CHUNK_ROWS).enumerate() {
            f(c * CHUNK_ROWS, chunk)
        }
    }
}

/// A streaming selection of the `c` best (score, row) pairs: larger score first, then lower row.
/// Rows arrive in ascending order, in chunks; a buffer of at most `2c` candidates sits above a
/// rising threshold (the `c`-th best so far) and is cut back to the best `c` whenever it fills, so
/// most rows cost one comparison and nothing of the batch's size is allocated. O(n) overall.
pub(crate) struct Candidates {
    c: usize,
    buf: Vec<(f32, usize)>,
    threshold: f32,
    full: bool,
}

/// Best first: larger score, then lower index.
fn best_first(a: &(f32, usize), b: &(f32, usize)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl Candidates {
    /// Keeps the best `c`.
    pub(crate) fn new(c: usize) -> Self {
        Self {
            c,
            buf: Vec::with_capacity(2 * c),
            threshold: f32::NEG_INFINITY,
            full: false,
        }
    }

    /// Offers rows `start..start + chunk.len()` with these scores (chunks in ascending order).
    pub(crate) fn push(&mut self, start: usize, chunk: &[f32]) {
        if self.c == 0 {
            return;
        }
        // Once the threshold has risen, most rows lie at or below it: each run of 16 rows is
        // tested with one comparison per row and no early exit (so it vectorizes), and only runs
        // holding a candidate are walked row by row. Scores are finite; a NaN never passes `>`.
        for (r, run) in chunk.chunks(16).enumerate() {
            let t = self.threshold;
            if self.full && !run.iter().fold(false, |any, &v| any | (v > t)) {
                continue;
            }
            for (j, &s) in run.iter().enumerate() {
                self.offer(s, start + 16 * r + j);
            }
        }
    }

    /// The score a row must exceed to be kept: the `c`-th best so far once `2c` rows were
    /// offered, `-inf` before.
    pub(crate) fn threshold(&self) -> f32 {
        if self.full {
            self.threshold
        } else {
            f32::NEG_INFINITY
        }
    }

    /// Offers the marked rows of `start..start + chunk.len()`: bit `r` of `masks[b]` marks row
    /// `32b + r` of the chunk. Rows not marked must score at most [`Candidates::threshold`] as it
    /// was when the marks were made (the threshold only rises, so they could not be kept).
    pub(crate) fn push_marked(&mut self, start: usize, chunk: &[f32], masks: &[u32]) {
        if self.c == 0 {
            return;
        }
        for (b, &m) in masks.iter().enumerate() {
            let mut m = m;
            while m != 0 {
                let j = BLOCK * b + m.trailing_zeros() as usize;
                m &= m - 1;
                self.offer(chunk[j], start + j);
            }
        }
    }

    /// Offers one row.
    #[inline]
    fn offer(&mut self, s: f32, row: usize) {
        // A row equal to the threshold comes after the rows that set it: it ranks below them.
        if self.full && s <= self.threshold {
            return;
        }
        self.buf.push((s, row));
        if self.buf.len() == 2 * self.c {
            self.buf.select_nth_unstable_by(self.c - 1, best_first);
            self.buf.truncate(self.c);
            self.threshold = self.buf[self.c - 1].0;
            self.full = true;
        }
    }

    /// The best `min(c, rows offered)` (score, row) pairs, unordered.
    pub(crate) fn finish(mut self) -> Vec<(f32, usize)> {
        if self.buf.len() > self.c {
            self.buf.select_nth_unstable_by(self.c - 1, best_first);
            self.buf.truncate(self.c);
        }
        self.buf
    }
}

/// Indices of the `c` largest `scores` (unordered; among equal scores the lower indices). O(n).
pub(crate) fn top_candidates(scores: &[f32], c: usize) -> Vec<usize> {
    let mut cand = Candidates::new(c);
    for (i, chunk) in scores.chunks(BLOCK).enumerate() {
        cand.push(i * BLOCK, chunk);
    }
    cand.finish().into_iter().map(|(_, i)| i).collect()
}

/// Sorts hits by descending score (ties by ascending index) and keeps `k`.
pub(crate) fn finish_hits(mut hits: Vec<Hit>, k: usize) -> Vec<Hit> {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    hits.truncate(k);
    hits
}

/// The `k` best of `scores` as hits, best first (ties by index). O(n + k log k).
pub(crate) fn top_k_of(scores: &[f32], k: usize) -> Vec<Hit> {
    let idx = top_candidates(scores, k);
    finish_hits(
        idx.into_iter()
            .map(|i| Hit {
                index: i,
                score: scores[i],
            })
            .collect(),
        k,
    )
}

/// Candidates re-ranked exactly for a fast top-k: enough that the candidate tables' rounding
/// (nibble tables quantized to 64 levels, [`SEARCH_MAX_ENTRY`]: about 0.8 of the quantization
/// error at 4 bits; `u8` tables elsewhere, under 0.2) does not push an exact top-k row out of the
/// candidate set in practice (tested: `top_k_finds_the_exact_top_k_with_coarse_candidates`).
pub(crate) fn rerank_candidates(k: usize) -> usize {
    (4 * k).max(k + 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 4-bit tables (one coordinate per nibble) equal the general loop's bit for bit: +0 for
    /// a zero or -0 weight and for positions past the weights.
    #[test]
    fn four_bit_nibble_tables_follow_the_general_sums() {
        let values: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 0.37).collect();
        let weights = [0.5f32, -1.25, 0.0, -0.0, 3.0e-3, 7.0];
        let t = nibble_tables(&weights, &values, 4, 8);
        let mut want = vec![0.0f32; 8 * 16];
        general_nibble_tables(&weights, &values, 4, &mut want);
        assert_eq!(t.len(), want.len());
        for (i, (&e, &w)) in t.iter().zip(&want).enumerate() {
            assert_eq!(
                e.to_bits(),
                w.to_bits(),
                "position {}, entry {}",
                i / 16,
                i % 16
            );
        }
        assert!(
            t[3 * 16..4 * 16].iter().all(|&e| e.to_bits() == 0),
            "-0 weight gives +0"
        );
        assert_ne!(t[16], 0.0, "a live position has entries");
    }

    /// The search chunks tile `0..len` in order from 32-aligned starts: the first fills the
    /// selection (whole blocks, at least one), then sizes double up to the cap.
    #[test]
    fn search_chunks_tile_the_rows_and_grow_to_the_cap() {
        for (len, c) in [
            (0usize, 42usize),
            (1, 42),
            (100, 42),
            (100_000, 42),
            (5000, 0),
            (7, 600),
        ] {
            let mut at = 0;
            let mut want = (2 * c).div_ceil(BLOCK).clamp(1, SEARCH_CHUNK_ROWS / BLOCK) * BLOCK;
            for (i, (start, rows)) in search_chunks(len, c).enumerate() {
                assert_eq!(start, at, "len {len} c {c}");
                assert!(start.is_multiple_of(BLOCK) && rows > 0);
                assert_eq!(rows, want.min(len - start), "len {len} c {c} chunk {i}");
                at += rows;
                want = (2 * want).min(SEARCH_CHUNK_ROWS);
            }
            assert_eq!(at, len);
        }
    }

    /// The streaming selection returns exactly the `c` best by (score descending, index
    /// ascending), ties and repeated values included, for every `c` from 0 past `n`.
    #[test]
    fn top_candidates_match_a_full_sort() {
        let mut state = 12345u64;
        for n in [0usize, 1, 2, 7, 64, 1000] {
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Few distinct values: many ties.
                    ((state >> 33) % 17) as f32 - 8.0
                })
                .collect();
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            for c in [0usize, 1, 3, 10, 50, n, n + 5] {
                let mut got = top_candidates(&scores, c);
                got.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                assert_eq!(got, sorted[..c.min(n)].to_vec(), "n = {n}, c = {c}");
            }
        }
    }
}
