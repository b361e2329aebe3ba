//! The integer grids the scans take: `u8` look-up tables (float tables quantized with one shared
//! step), a codebook on an `i16` grid with a query (key dots, 5-8 bits) or a weight vector
//! (value sums, every width) on `i16` weights, and a 1-4-bit codebook on a `u8` grid with a
//! query on `i8` weights (key dots, 4 bits) or non-negative weights on `u8` (value sums, 1-4
//! bits).

/// `u8` look-up tables for the scans: `entries` bytes per table (16 for
/// [`scan_block`](super::scan_block) and [`scan_block_b3`](super::scan_block_b3), 32 for
/// [`scan_block_b5`](super::scan_block_b5)), table `n` at `entries·n..entries·(n+1)`.
#[derive(Debug, Clone, Default)]
pub struct QuantizedLut {
    /// The tables, one after another (16 or 32 bytes each).
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
        self.quantize_tables(tables, 16);
    }

    /// As [`QuantizedLut::quantize_from`] for tables of `entries` entries each (32 for the 5-bit
    /// scan): shared step `Δ = max_n (max T_n - min T_n) / 255`, per-table offsets `min T_n`,
    /// entries `(T - min T_n) / Δ` rounded to nearest (ties to even), the same bytes on every CPU.
    /// O(tables.len()).
    ///
    /// # Panics
    /// If `entries` is 0 or `tables.len()` is not a multiple of `entries`.
    pub fn quantize_tables(&mut self, tables: &[f32], entries: usize) {
        self.quantize_tables_to(tables, entries, 255);
    }

    /// [`QuantizedLut::quantize_tables`] on the coarser grid `0..=max` (`max + 1` levels):
    /// `Δ = max_n (max T_n - min T_n) / max`. The fused scan adds the look-ups of four steps as
    /// bytes when every entry is below 64, so `max` 63 trades table precision (four times the
    /// step) for a faster scan (`scan_blocks_scores_multi`). Quantize from the floats: re-rounding
    /// `u8` tables onto the coarser grid biased the sums (d = 128, 4 bits: a mean error per query
    /// one to two times the spread of the errors). O(tables.len()).
    ///
    /// # Panics
    /// If `entries` or `max` is 0, or `tables.len()` is not a multiple of `entries`.
    pub fn quantize_tables_to(&mut self, tables: &[f32], entries: usize, max: u8) {
        assert!(max > 0, "a table needs at least two levels");
        assert!(
            entries > 0 && tables.len().is_multiple_of(entries),
            "{} table entries are not whole {entries}-entry tables",
            tables.len()
        );
        // Compiled for the CPU's vector width: lane-wise compare-selects and float operations,
        // the same bytes on every CPU.
        crate::simd::arch().dispatch(QuantizeTables {
            tables,
            entries,
            max,
            lut: self,
        });
    }

    /// Converts a `u8` table sum to a score.
    #[inline]
    pub fn score(&self, sum: u32) -> f32 {
        self.offset + self.step * sum as f32
    }
}

/// The body of [`QuantizedLut::quantize_tables_to`] (arguments checked), compiled for the CPU's
/// vector width.
struct QuantizeTables<'a> {
    tables: &'a [f32],
    entries: usize,
    max: u8,
    lut: &'a mut QuantizedLut,
}

impl pulp::WithSimd for QuantizeTables<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Self {
            tables,
            entries,
            max,
            lut,
        } = self;
        // Each table's minimum and maximum (8 lanes of compare-selects, which vectorise; the
        // lane order does not change a minimum).
        let (mut lows, mut range) = (Vec::with_capacity(tables.len() / entries), 0.0f32);
        for t in tables.chunks_exact(entries) {
            let (mut lo, mut hi) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
            let mut chunks = t.chunks_exact(8);
            for c in &mut chunks {
                for k in 0..8 {
                    lo[k] = if c[k] < lo[k] { c[k] } else { lo[k] };
                    hi[k] = if c[k] > hi[k] { c[k] } else { hi[k] };
                }
            }
            for &v in chunks.remainder() {
                lo[0] = if v < lo[0] { v } else { lo[0] };
                hi[0] = if v > hi[0] { v } else { hi[0] };
            }
            let lo = lo.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = hi.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            range = range.max(hi - lo);
            lows.push(lo);
        }
        let top = f32::from(max);
        let step = if range > 0.0 { range / top } else { 1.0 };
        let inv = 1.0 / step;
        lut.tables.clear();
        lut.tables.resize(tables.len(), 0);
        let mut offset = 0.0f64;
        for ((t, out), &lo) in tables
            .chunks_exact(entries)
            .zip(lut.tables.chunks_exact_mut(entries))
            .zip(&lows)
        {
            offset += lo as f64;
            // Round to nearest (ties to even) by adding 1.5 · 2^23: the integer lands in the low
            // mantissa bits. `f32::round` is a libm call per entry on baseline x86-64 and float
            // to integer casts do not vectorise there; clamps, adds and bit casts do.
            for (o, &v) in out.iter_mut().zip(t) {
                let x = (v - lo) * inv;
                let x = if x > 0.0 { x } else { 0.0 };
                let x = if x < top { x } else { top };
                *o = ((x + 12_582_912.0).to_bits() & 0xFF) as u8;
            }
        }
        lut.offset = offset as f32;
        lut.step = step;
    }
}

/// Largest magnitude of an [`IntCodebook`] entry: values live on a 14-bit signed grid, so a
/// query's weights may sum (in magnitude) to [`INT_WEIGHT_BUDGET`] per [`INT_CHUNK`] coordinates
/// before an `i32` sum of products could overflow.
pub const INT_CODE_MAX: i32 = (1 << 13) - 1;

/// Coordinates whose products [`super::dot_blocks_scores_i16`] sums in `i32` before adding the
/// sum to the row's `f32` total: the overflow budget holds per chunk, so a query's weights keep
/// their precision at any dimension.
pub const INT_CHUNK: usize = 128;

/// Largest `Σ_j |w_j|` over one chunk of an [`IntQuery`]'s weights: `floor((2^31 - 1) / 2^13)`
/// (a grid value's magnitude is at most `INT_CODE_MAX + 1`, the mirror of `INT_CODE_MAX`), so
/// every partial sum `Σ_j w_j · m_j` of a chunk fits an `i32`.
pub const INT_WEIGHT_BUDGET: i64 = i32::MAX as i64 / (INT_CODE_MAX as i64 + 1);

/// A codebook of up to 256 values on an integer grid, for the integer dot products of 5-8-bit
/// codes ([`super::dot_blocks_scores_i16`]) and the integer weighted sums of codes of any width
/// ([`super::accumulate_blocks_i16`]): value `k` stands for `(values[k] + 1/2) · step`,
/// within `step / 2` of the float it was made from, with `step = max |c| / INT_CODE_MAX`, about
/// `2^-14` of the codebook's span, far below the spacing of a 256-entry Lloyd-Max codebook (so
/// the grid adds almost nothing to 8-bit quantization's own error). A codebook that is
/// antisymmetric bit for bit (`c[n - 1 - k] == -c[k]`, as every Lloyd-Max codebook here is) keeps
/// that symmetry exactly: `values[n - 1 - k] == !values[k]` (one's complement is negation on the
/// half-integer grid), which lets the 8-bit AVX-512 kernel look up half the table.
#[derive(Debug, Clone)]
pub struct IntCodebook {
    values: Vec<i16>,
    step: f32,
    /// Byte planes for the permute look-ups: `planes[p][k]` is byte `p` of `values[k]`, zero past
    /// the table's end.
    planes: [[u8; 256]; 2],
    /// `values[n - 1 - k] == !values[k]` for every `k` (and `n == 256`).
    folded: bool,
    /// `values` widened, for the AVX2 gathers.
    wide: Vec<i32>,
    /// Largest `|values[k]|`, which every kernel call's overflow check reads.
    max_abs: i64,
}

impl IntCodebook {
    /// The grid of `centroids` (1 to 256 finite floats). O(n).
    ///
    /// # Panics
    /// If `centroids` is empty, longer than 256 or holds a non-finite value.
    pub fn from_centroids(centroids: &[f32]) -> Self {
        let n = centroids.len();
        assert!(
            (1..=256).contains(&n),
            "a codebook of {n} values does not fit 8-bit codes"
        );
        assert!(
            centroids.iter().all(|c| c.is_finite()),
            "a codebook value is not finite"
        );
        let top = centroids.iter().fold(0.0f32, |m, c| m.max(c.abs()));
        let step = if top > 0.0 {
            top / INT_CODE_MAX as f32
        } else {
            1.0
        };
        // floor(c / step) puts c in [m·step, (m + 1)·step), so (m + 1/2)·step is within step/2
        // (the quotient in f64, where rounding cannot move it across an integer that matters).
        // |c / step| <= INT_CODE_MAX up to the f32 step's rounding: -top may land on -2^13.
        let grid = |c: f32| {
            let m = (f64::from(c) / f64::from(step)).floor();
            m.clamp(f64::from(-INT_CODE_MAX - 1), f64::from(INT_CODE_MAX)) as i16
        };
        let symmetric = (0..n).all(|k| centroids[n - 1 - k].to_bits() == (-centroids[k]).to_bits());
        let values: Vec<i16> = (0..n)
            .map(|k| {
                if symmetric && 2 * k >= n {
                    // The mirror: -(m + 1/2) = !m + 1/2, the same distance from -c as m from c.
                    !grid(centroids[n - 1 - k])
                } else {
                    grid(centroids[k])
                }
            })
            .collect();
        Self::from_values(values, step)
    }

    /// A codebook of the given grid values (at most 256, each within `±INT_CODE_MAX` but for
    /// `-INT_CODE_MAX - 1`) and step. O(n).
    ///
    /// # Panics
    /// If `values` is empty, longer than 256 or out of the grid, or `step` is not finite.
    pub fn from_values(values: Vec<i16>, step: f32) -> Self {
        let n = values.len();
        assert!(
            (1..=256).contains(&n),
            "a codebook of {n} values does not fit 8-bit codes"
        );
        assert!(
            values
                .iter()
                .all(|&v| (-INT_CODE_MAX - 1..=INT_CODE_MAX).contains(&i32::from(v))),
            "a codebook value is off the {}-bit grid",
            14
        );
        assert!(step.is_finite(), "the grid's step is not finite");
        let mut planes = [[0u8; 256]; 2];
        for (k, v) in values.iter().enumerate() {
            let [lo, hi] = v.to_le_bytes();
            planes[0][k] = lo;
            planes[1][k] = hi;
        }
        let folded = n == 256 && (0..n).all(|k| values[n - 1 - k] == !values[k]);
        let wide = values.iter().map(|&v| i32::from(v)).collect();
        let max_abs = values
            .iter()
            .map(|&v| i64::from(v).abs())
            .max()
            .unwrap_or(0);
        Self {
            values,
            step,
            planes,
            folded,
            wide,
            max_abs,
        }
    }

    /// The grid values.
    pub fn values(&self) -> &[i16] {
        &self.values
    }

    /// The value of one grid unit.
    pub fn step(&self) -> f32 {
        self.step
    }

    /// Largest `|values[k]|` (at most `INT_CODE_MAX + 1`), found once at construction.
    pub(super) fn max_abs(&self) -> i64 {
        self.max_abs
    }

    pub(super) fn planes(&self) -> &[[u8; 256]; 2] {
        &self.planes
    }

    pub(super) fn folded(&self) -> bool {
        self.folded
    }

    pub(super) fn wide(&self) -> &[i32] {
        &self.wide
    }

    /// A query `q` on this codebook's grid: `Σ_j q_j · c[k_j] ≈ affine.offset + affine.step ·
    /// Σ_j w_j · values[k_j]`. The weights share one step `s = max(max_c Σ_{j∈c} |q_j| / (B -
    /// |c|), max|q| / 32767)` over the chunks `c` of [`INT_CHUNK`] coordinates (`B` =
    /// [`INT_WEIGHT_BUDGET`]), so with rounding each chunk's `Σ|w| <= B` and every `|w| <=
    /// 32767`; each `w_j · s` is within `s / 2` of `q_j`. O(d).
    ///
    /// # Panics
    /// If `q` holds a non-finite value.
    pub fn quantize_query(&self, q: &[f32]) -> IntQuery {
        assert!(
            q.iter().all(|x| x.is_finite()),
            "a query value is not finite"
        );
        let per_chunk = q
            .chunks(INT_CHUNK)
            .map(|c| {
                let l1: f64 = c.iter().map(|&x| f64::from(x.abs())).sum();
                l1 / (INT_WEIGHT_BUDGET - c.len() as i64) as f64
            })
            .fold(0.0f64, f64::max);
        let top = q.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let s = per_chunk.max(f64::from(top) / 32767.0);
        let weights: Vec<i16> = if s > 0.0 {
            q.iter()
                .map(|&x| (f64::from(x) / s).round().clamp(-32767.0, 32767.0) as i16)
                .collect()
        } else {
            vec![0; q.len()]
        };
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let unit = (s * f64::from(self.step)) as f32;
        IntQuery {
            weights,
            offset: (0.5 * total as f64 * s * f64::from(self.step)) as f32,
            step: unit,
        }
    }

    /// A weight vector (e.g. a query's attention weights over the rows of a value batch) on
    /// `i16`, for [`super::accumulate_blocks_i16`]: row `i` weighs `x_i = weights[i] ·
    /// s_i` (`s_i = row_scales[i]`, e.g. the rows' norms, or 1; the product rounded to `f32`).
    /// Each chunk of [`INT_CHUNK`] rows has its own step `s = max(Σ_chunk |x_i| / (B - rows),
    /// max_chunk |x_i| / 32767)` (`B` = [`INT_WEIGHT_BUDGET`]; in `f64` for a chunk whose `f32`
    /// step would be subnormal), so with rounding a chunk's `Σ|w| <= B` (no `i32` sum of a chunk's
    /// products overflows) and every `|w| <= 32767`; each `w_i · s` is within about `s / 2` of
    /// `x_i` (plus `2^-23` of the chunk's largest), at least 11 bits of the chunk's largest
    /// weight. The same function of its inputs on every CPU (lane-wise float operations, folded
    /// in a fixed order). O(rows).
    ///
    /// `None` (callers then take the exact float path) when a product `x_i` is not finite, when
    /// the largest `|x_i|` of all rows is so small that a unit of its chunk's sums would not be a
    /// normal `f32`, or when a chunk's unit or offset overflows `f32` (grids with enormous steps).
    /// Chunks far below the largest weight may get subnormal units: their sums are then below
    /// `2^-126` and lose relative, not absolute, precision.
    ///
    /// # Panics
    /// If `row_scales` is shorter than `weights`.
    pub fn quantize_weights(
        &self,
        weights: &[f32],
        row_scales: Option<&[f32]>,
    ) -> Option<IntWeights> {
        let mut out = IntWeights::zeroed(weights.len(), row_scales);
        let op = QuantizeWeights {
            step: self.step,
            weights,
            row_scales,
            out: &mut out,
        };
        let top = crate::simd::arch().dispatch(op)?;
        let unit = f64::from(top) / 32767.0 * f64::from(self.step);
        if top > 0.0 && !(unit as f32).is_normal() {
            return None;
        }
        out.mark_active();
        Some(out)
    }
}

/// The body of [`IntCodebook::quantize_weights`], compiled for the CPU's vector width (plain
/// lane-wise float operations: the same results at any width). Returns the largest `|x_i|`, or
/// `None` for a non-finite product.
struct QuantizeWeights<'a> {
    step: f32,
    weights: &'a [f32],
    row_scales: Option<&'a [f32]>,
    out: &'a mut IntWeights,
}

impl pulp::WithSimd for QuantizeWeights<'_> {
    type Output = Option<f32>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Option<f32> {
        // Adding 1.5 · 2^23 (2^52 in f64) rounds a float of magnitude below 2^22 (2^51) to the
        // nearest integer, ties to even, in plain arithmetic.
        const ROUND32: f32 = 12_582_912.0;
        const ROUND64: f64 = 6_755_399_441_055_744.0;
        const ONES: [f32; INT_CHUNK] = [1.0; INT_CHUNK];
        let Self {
            step,
            weights,
            row_scales,
            out,
        } = self;
        // The 16 lanes folded pairwise in a fixed tree: the same result however the lanes were
        // computed.
        fn fold(l: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
            let a: [f32; 8] = std::array::from_fn(|i| f(l[i], l[i + 8]));
            let b: [f32; 4] = std::array::from_fn(|i| f(a[i], a[i + 4]));
            f(f(b[0], b[2]), f(b[1], b[3]))
        }
        let mut x = [0.0f32; INT_CHUNK];
        let mut top_all = 0.0f32;
        for (c, w) in weights.chunks(INT_CHUNK).enumerate() {
            let start = c * INT_CHUNK;
            let x = &mut x[..w.len()];
            let scales = row_scales.map_or(&ONES[..w.len()], |s| &s[start..start + w.len()]);
            // The products, their largest magnitude and their sum, in 16 lanes (lane `i` takes
            // rows `i mod 16`), in one pass.
            let (mut top, mut l1) = ([0.0f32; 16], [0.0f32; 16]);
            let mut xs = x.chunks_exact_mut(16);
            let (mut ws, mut ss) = (w.chunks_exact(16), scales.chunks_exact(16));
            for ((x, w), s) in (&mut xs).zip(&mut ws).zip(&mut ss) {
                for i in 0..16 {
                    x[i] = w[i] * s[i];
                    // A plain comparison (one `maxps`): NaN is caught by the sums below.
                    let a = x[i].abs();
                    top[i] = if a > top[i] { a } else { top[i] };
                    l1[i] += a;
                }
            }
            let tail = xs.into_remainder().iter_mut().zip(ws.remainder());
            for (i, ((x, &w), &s)) in tail.zip(ss.remainder()).enumerate() {
                *x = w * s;
                let a = x.abs();
                top[i] = if a > top[i] { a } else { top[i] };
                l1[i] += a;
            }
            let top = fold(top, |a, b| if b > a { b } else { a });
            let l1 = fold(l1, |a, b| a + b);
            // A NaN product makes its lane's sum NaN, an infinite one makes `top` infinite.
            if !top.is_finite() || !l1.is_finite() {
                return None;
            }
            top_all = top_all.max(top);
            let s = (l1 / (INT_WEIGHT_BUDGET - w.len() as i64) as f32).max(top / 32767.0);
            if s == 0.0 {
                out.chunks.push((0.0, 0.0));
                continue;
            }
            let ws = &mut out.weights[start..start + w.len()];
            // |x / s| <= 32767 and each chunk's Σ|x / s| <= B - rows, so the roundings (half a
            // unit each, plus the f32 divisions' and products' few 2^-24) keep |w| <= 32767 and
            // Σ|w| <= B; the clamp only guards the bound.
            let (total, unit) = if s.is_normal() {
                let inv = 1.0 / s;
                // `v · inv + 1.5 · 2^23` has the rounded integer in its low mantissa bits, above
                // the bits of 1.5 · 2^23 (0x4B40_0000): integer operations that vectorize.
                let mut total = 0i32;
                for (o, &v) in ws.iter_mut().zip(x.iter()) {
                    let q = (v * inv).clamp(-32767.0, 32767.0);
                    *o = ((q + ROUND32).to_bits() as i32).wrapping_sub(0x4B40_0000) as i16;
                    total += i32::from(*o);
                }
                (f64::from(total), f64::from(s * step))
            } else {
                // A chunk far below f32's normal range, where a subnormal step would keep too
                // few bits: its step and roundings in f64.
                let l1: f64 = x.iter().map(|&v| f64::from(v.abs())).sum();
                let s = (l1 / (INT_WEIGHT_BUDGET - w.len() as i64) as f64)
                    .max(f64::from(top) / 32767.0);
                let inv = 1.0 / s;
                for (o, &v) in ws.iter_mut().zip(x.iter()) {
                    let q = (f64::from(v) * inv).clamp(-32767.0, 32767.0);
                    *o = ((q + ROUND64) - ROUND64) as i32 as i16;
                }
                let total: i32 = ws.iter().map(|&w| i32::from(w)).sum();
                (f64::from(total), s * f64::from(step))
            };
            let (offset, unit) = ((0.5 * total * unit) as f32, unit as f32);
            if !offset.is_finite() || !unit.is_finite() {
                return None;
            }
            out.chunks.push((offset, unit));
        }
        Some(top_all)
    }
}

/// A 1-4-bit codebook on an unsigned 8-bit grid, for the byte dot products of 4-bit codes
/// ([`super::dot_blocks_scores_u8`]) and the byte sums of 1-4-bit values
/// ([`super::accumulate_blocks_u8`]): entry `k` stands for `(values[k] - 128) · step`, with
/// `step = max |c| / 127`, so every entry lies in `1..=255` and within `step / 2` of its
/// centroid (about `2^-8` of the codebook's span; a 16-entry Lloyd-Max codebook's spacing is
/// about 16 steps). One weight per nibble position times one entry fits the unsigned-by-signed
/// byte products of `vpdpbusd`.
#[derive(Debug, Clone, PartialEq)]
pub struct ByteCodebook {
    /// `2^bits` grid entries, then the grid's zero (128) up to 16.
    values: [u8; 16],
    step: f32,
    bits: u32,
}

/// A query on a [`ByteCodebook`]'s grid ([`ByteCodebook::quantize_query`]): one `i8` weight per
/// nibble position (zero past the query's coordinates) and the map from an integer sum `S = Σ_n
/// w_n · values[k_n]` to the dot, `offset + step · S` (as [`super::Affine`]'s `offset` and
/// `step`).
#[derive(Debug, Clone, Default)]
pub struct ByteQuery {
    /// One weight per nibble position.
    pub weights: Vec<i8>,
    /// `-128 · Σ_n w_n` units (the grid's zero point), as a float.
    pub offset: f32,
    /// The value of one unit of `S`.
    pub step: f32,
}

impl ByteCodebook {
    /// The grid of a `b`-bit codebook's `2^b` finite `centroids` (`b` in 1..=4: 2, 4, 8 or 16
    /// values). O(1).
    ///
    /// # Panics
    /// Unless `centroids` holds 2, 4, 8 or 16 values, all finite.
    pub fn from_centroids(centroids: &[f32]) -> Self {
        assert!(
            matches!(centroids.len(), 2 | 4 | 8 | 16) && centroids.iter().all(|c| c.is_finite()),
            "a 1-4-bit codebook takes 2, 4, 8 or 16 finite values, not {centroids:?}"
        );
        let top = centroids.iter().fold(0.0f32, |m, c| m.max(c.abs()));
        let step = if top > 0.0 { top / 127.0 } else { 1.0 };
        let values = std::array::from_fn(|k| {
            centroids.get(k).map_or(128, |&c| {
                let m = (f64::from(c) / f64::from(step)).round();
                (m.clamp(-127.0, 127.0) as i32 + 128) as u8
            })
        });
        Self {
            values,
            step,
            bits: centroids.len().trailing_zeros(),
        }
    }

    /// The grid values (zero point 128): `2^bits` entries, then 128 up to 16.
    pub fn values(&self) -> &[u8; 16] {
        &self.values
    }

    /// The codebook's width: 1 to 4 bits.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The value of one grid unit.
    pub fn step(&self) -> f32 {
        self.step
    }

    /// A query `q` (one value per coordinate, 4-bit codes: one coordinate per nibble position)
    /// on this grid for rows of `positions` nibbles: `Σ_j q_j · c[k_j] ≈ offset + step · Σ_n w_n
    /// · values[k_n]`. The weights share the step `s = max|q| / 127` (1 when `q` is zero), so
    /// each `w_j · s` is within `s / 2` of `q_j` (rounded to nearest, ties to even, on every CPU)
    /// and `|w_j| <= 127`; a row's sum is then exact
    /// in `i32` for up to 65 536 positions (`127 · 255` per position). O(positions).
    ///
    /// # Panics
    /// If `q` holds a non-finite value or more than `positions` values, or the codebook is not
    /// 4-bit.
    pub fn quantize_query(&self, q: &[f32], positions: usize) -> ByteQuery {
        assert_eq!(self.bits, 4, "byte queries score 4-bit codes");
        assert!(
            q.iter().all(|x| x.is_finite()) && q.len() <= positions,
            "a query of {} values for {positions} positions (or not finite)",
            q.len()
        );
        let top = q.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let s = if top > 0.0 {
            f64::from(top) / 127.0
        } else {
            1.0
        };
        // Adding 1.5 · 2^52 rounds to the nearest integer, ties to even, in plain arithmetic
        // (`f64::round` is a libm call per value without SSE4.1).
        const ROUND64: f64 = 6_755_399_441_055_744.0;
        let inv = 1.0 / s;
        let mut weights = vec![0i8; positions];
        for (w, &x) in weights.iter_mut().zip(q) {
            let v = (f64::from(x) * inv).clamp(-127.0, 127.0);
            *w = ((v + ROUND64) - ROUND64) as i8;
        }
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let unit = s * f64::from(self.step);
        ByteQuery {
            weights,
            offset: (-128.0 * total as f64 * unit) as f32,
            step: unit as f32,
        }
    }
}

impl ByteCodebook {
    /// Non-negative weights (e.g. a query's softmax numerators over the rows of a 1-4-bit value
    /// batch) on `u8`, for [`super::accumulate_blocks_u8`]: row `i` weighs `x_i = weights[i] ·
    /// s_i` (`s_i = row_scales[i]`, e.g. the rows' norms, or 1; the product rounded to `f32`).
    /// Each chunk of [`INT_CHUNK`] rows has its own step `s = max_chunk x_i / 255`, so every
    /// `w_i · s` is within `s / 2` of `x_i` (rounded to nearest, ties to even, the same on every
    /// CPU): 8 bits of the chunk's largest weight. A chunk's sums are then exact in `i32` (`128
    /// · 255 · 127 < 2^23`). O(rows).
    ///
    /// `None` (callers then take the `i16` weights) when a product is negative (or -0), NaN or
    /// infinite, or when a chunk's step `s` or unit `s · step` would not be a normal `f32`
    /// (weights or grids of extreme range). A chunk of zero products adds nothing (no step).
    ///
    /// # Panics
    /// If `row_scales` is shorter than `weights`.
    pub fn quantize_weights(
        &self,
        weights: &[f32],
        row_scales: Option<&[f32]>,
    ) -> Option<ByteWeights> {
        let mut out = ByteWeights::zeroed(weights.len(), row_scales);
        quantize_bytes(weights, row_scales, &mut out)?;
        // A chunk with a step holds a weight of 255 (its largest product's); the others add
        // nothing.
        for chunk in out.chunks.iter_mut().filter(|c| c.1 > 0.0) {
            chunk.1 *= self.step;
            if !chunk.1.is_normal() {
                return None;
            }
        }
        out.mark_active();
        Some(out)
    }
}

/// Fills `out` (zeroed for `weights`, [`ChunkWeights::zeroed`]) with the `u8` weights and each
/// chunk's `(0, s)`: the 512-bit body where the CPU runs the byte sums, else [`QuantizeBytes`]
/// (the same bytes). `None` as [`QuantizeBytes`].
fn quantize_bytes(
    weights: &[f32],
    row_scales: Option<&[f32]>,
    out: &mut ByteWeights,
) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if super::byte_sums_native() {
        // SAFETY: AVX-512 F is present (one of the byte sums' features, checked at run time);
        // `zeroed` proved the scales cover the weights and padded `out.weights` past them.
        return unsafe { super::avx512::quantize_bytes_512(weights, row_scales, out) };
    }
    crate::simd::arch().dispatch(QuantizeBytes {
        weights,
        row_scales,
        out,
    })
}

/// The body of [`ByteCodebook::quantize_weights`], compiled for the CPU's vector width (plain
/// lane-wise float operations: the same results at any width). Leaves each chunk's step `s` in
/// its `(0, s)`; `None` for a negative (or -0), NaN or infinite product, or a chunk whose
/// largest product is below `255 · 2^-126` (a subnormal step).
pub(super) struct QuantizeBytes<'a> {
    pub(super) weights: &'a [f32],
    pub(super) row_scales: Option<&'a [f32]>,
    pub(super) out: &'a mut ByteWeights,
}

impl pulp::WithSimd for QuantizeBytes<'_> {
    type Output = Option<()>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Option<()> {
        // Adding 1.5 · 2^23 rounds a float of magnitude below 2^22 to the nearest integer, ties
        // to even, in plain arithmetic.
        const ROUND32: f32 = 12_582_912.0;
        const ONES: [f32; INT_CHUNK] = [1.0; INT_CHUNK];
        let Self {
            weights,
            row_scales,
            out,
        } = self;
        let mut x = [0.0f32; INT_CHUNK];
        // A partial last chunk is padded with zero weights (products 0: no effect below).
        let (mut w_pad, mut s_pad) = ([0.0f32; INT_CHUNK], [0.0f32; INT_CHUNK]);
        for (c, w) in weights.chunks(INT_CHUNK).enumerate() {
            let start = c * INT_CHUNK;
            let scales = row_scales.map_or(&ONES[..w.len()], |s| &s[start..start + w.len()]);
            let (wf, sf): (&[f32; INT_CHUNK], &[f32; INT_CHUNK]) =
                match (w.try_into(), scales.try_into()) {
                    (Ok(w), Ok(s)) => (w, s),
                    _ => {
                        w_pad[..w.len()].copy_from_slice(w);
                        w_pad[w.len()..].fill(0.0);
                        s_pad[..w.len()].copy_from_slice(scales);
                        (&w_pad, &s_pad)
                    }
                };
            // The products and the largest of their bit patterns, in 16 lanes of fixed bounds
            // (kept in registers), in one pass: non-negative floats order as their bits, and a
            // negative product (sign bit set; -0 too), NaN or infinity has bits above
            // `f32::MAX`'s, so one integer maximum finds the largest product and every product
            // the `i16` weights must take instead.
            let mut top = [0u32; 16];
            for k in 0..INT_CHUNK / 16 {
                for i in 0..16 {
                    let v = wf[16 * k + i] * sf[16 * k + i];
                    x[16 * k + i] = v;
                    top[i] = top[i].max(v.to_bits());
                }
            }
            let top = top.iter().fold(0, |a, &b| a.max(b));
            if top > f32::MAX.to_bits() {
                return None;
            }
            let top = f32::from_bits(top);
            let x = &x[..w.len()];
            if top == 0.0 {
                // All zero: nothing to add.
                out.chunks.push((0.0, 0.0));
                continue;
            }
            let s = top / 255.0;
            if !s.is_normal() {
                // Products below 255 · 2^-126: a subnormal step would keep too few bits.
                return None;
            }
            let inv = 1.0 / s;
            let ws = &mut out.weights[start..start + w.len()];
            for (o, &v) in ws.iter_mut().zip(x.iter()) {
                let q = (v * inv).min(255.0);
                *o = ((q + ROUND32).to_bits() as i32).wrapping_sub(0x4B40_0000) as u8;
            }
            out.chunks.push((0.0, s));
        }
        Some(())
    }
}

/// A weight vector on an integer grid, one [`INT_CHUNK`] of rows per scale: chunk `c` adds
/// `offset_c + step_c · S_j` to coordinate `j`'s sum, with `S_j = Σ_{i in c} w_i · g(code_j(row
/// i))` exact in `i32` (`g` the grid's value of a code). [`IntWeights`] and [`ByteWeights`].
#[derive(Debug, Clone, Default)]
pub struct ChunkWeights<T> {
    /// One weight per row, zero up to a whole number of blocks.
    pub(super) weights: Vec<T>,
    /// Per chunk: `(offset, step)`.
    pub(super) chunks: Vec<(f32, f32)>,
    /// Per block of 32 rows: some weight is not zero.
    pub(super) active: Vec<bool>,
}

/// `i16` weights on an [`IntCodebook`]'s grid ([`IntCodebook::quantize_weights`]); a chunk's
/// `offset` is `Σ w / 2` grid units (the half-integer grid's offset) as a float.
pub type IntWeights = ChunkWeights<i16>;

/// `u8` weights on a [`ByteCodebook`]'s signed grid (`values[k] − 128`;
/// [`ByteCodebook::quantize_weights`]); every chunk's `offset` is 0.
pub type ByteWeights = ChunkWeights<u8>;

impl<T: Copy + Default + PartialEq> ChunkWeights<T> {
    /// Zero weights for `n` rows, padded to whole blocks, with room for their chunks.
    ///
    /// # Panics
    /// If `row_scales` is shorter than `n`.
    pub(super) fn zeroed(n: usize, row_scales: Option<&[f32]>) -> Self {
        if let Some(s) = row_scales {
            assert!(s.len() >= n, "{} row scales for {n} weights", s.len());
        }
        Self {
            weights: vec![T::default(); n.div_ceil(super::BLOCK) * super::BLOCK],
            chunks: Vec::with_capacity(n.div_ceil(INT_CHUNK)),
            active: vec![false; n.div_ceil(super::BLOCK)],
        }
    }

    /// Marks the blocks that hold a weight other than zero.
    fn mark_active(&mut self) {
        for (a, w) in self
            .active
            .iter_mut()
            .zip(self.weights.chunks(super::BLOCK))
        {
            *a = w.iter().any(|&w| w != T::default());
        }
    }

    /// Rows covered (a whole number of blocks).
    pub fn padded_len(&self) -> usize {
        self.weights.len()
    }
}

/// A query on an [`IntCodebook`]'s grid ([`IntCodebook::quantize_query`]): its weights and the
/// map from an integer sum `S = Σ_j w_j · values[k_j]` to the dot, `offset + step · S` (as
/// [`super::Affine`]'s `offset` and `step`).
#[derive(Debug, Clone, Default)]
pub struct IntQuery {
    /// One weight per coordinate.
    pub weights: Vec<i16>,
    /// `Σ_j w_j / 2` grid units (the half-integer grid's offset), as a float.
    pub offset: f32,
    /// The value of one unit of `S`.
    pub step: f32,
}

/// Rounds the weights `q_c · s_c` to `i8` with the shared step `max_c |q_c s_c| / 127` (ties to
/// even, the same bytes on every CPU) into `out` (entries past `q.len()` zero) and returns the
/// step (1 when every weight is zero): the weights of [`super::dot_nibbles_i8`] for a query whose
/// coordinates are scaled per channel (KIVI's 4-bit keys: `s_c` the channel's scale in a group).
/// A weight's error is at most half a step, so a row's score moves by at most `step / 2 · Σ_c
/// code_c`. Runtime-dispatched (plain lane-wise float operations and a maximum, so every vector
/// width gives the same bytes for finite `q` and `scales`; a NaN may leave another byte on the
/// lane-wise body than on the 512-bit one). O(d).
///
/// # Panics
/// Unless `q.len() == scales.len() <= out.len()`.
pub fn nibble_weights_i8(q: &[f32], scales: &[f32], out: &mut [i8]) -> f32 {
    assert!(
        q.len() == scales.len() && q.len() <= out.len(),
        "{} query values, {} scales and {} weights",
        q.len(),
        scales.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if q.len().is_multiple_of(16) && super::avx512f_native() {
        let mut step = [0.0f32];
        // SAFETY: AVX-512 F is present (checked at run time); the lengths were checked above
        // (one group of `out.len()` weights), whole registers just now.
        unsafe { super::avx512::query_nibble_weights_groups_512(q, scales, out, &mut step) };
        return step[0];
    }
    crate::simd::arch().dispatch(NibbleWeights { q, scales, out })
}

/// [`nibble_weights_i8`] for one query against the scales of several groups (KIVI's channel
/// groups of a batch): group `g`'s weights from `scales[g·d..(g+1)·d]` (`d = q.len()`) into
/// `out[g·p..(g+1)·p]` (`p = out.len() / groups`) and its step into `steps[g]`, for `groups =
/// steps.len()`: each group's bytes and step are [`nibble_weights_i8`]'s. With AVX-512 F and
/// `d` a multiple of 16 the groups go phase by phase (every group's largest product, then
/// every step, then every rounding), so their short dependent chains overlap instead of
/// running one after another. O(groups · d).
///
/// # Panics
/// Unless `scales.len() == groups · d`, `out.len()` is a multiple of `groups` with `p >= d`
/// (any `out` and `scales` when `groups == 0`).
pub fn nibble_weights_i8_groups(q: &[f32], scales: &[f32], out: &mut [i8], steps: &mut [f32]) {
    let (d, groups) = (q.len(), steps.len());
    if groups == 0 {
        return;
    }
    let p = out.len() / groups;
    assert!(
        scales.len() == groups * d && out.len() == groups * p && p >= d,
        "{d} query values, {} scales and {} weights for {groups} groups",
        scales.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && super::avx512f_native() {
        // SAFETY: AVX-512 F is present (checked at run time); the lengths were checked above,
        // whole registers just now.
        unsafe { super::avx512::query_nibble_weights_groups_512(q, scales, out, steps) };
        return;
    }
    for (g, step) in steps.iter_mut().enumerate() {
        *step = nibble_weights_i8(q, &scales[g * d..(g + 1) * d], &mut out[g * p..(g + 1) * p]);
    }
}

/// The lane-wise body of [`nibble_weights_i8`].
pub(super) struct NibbleWeights<'a> {
    pub(super) q: &'a [f32],
    pub(super) scales: &'a [f32],
    pub(super) out: &'a mut [i8],
}

impl pulp::WithSimd for NibbleWeights<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> f32 {
        let Self { q, scales, out } = self;
        // The largest |q_c s_c| in 8 lanes of compare-selects, which vectorise (a fold of
        // `f32::max` is one serial chain); the order does not change a maximum.
        let mut lanes = [0.0f32; 8];
        let (qs, ss) = (q.chunks_exact(8), scales.chunks_exact(8));
        let (q_rest, s_rest) = (qs.remainder(), ss.remainder());
        for (qc, sc) in qs.zip(ss) {
            for k in 0..8 {
                let w = (qc[k] * sc[k]).abs();
                lanes[k] = if w > lanes[k] { w } else { lanes[k] };
            }
        }
        for (a, b) in q_rest.iter().zip(s_rest) {
            let w = (a * b).abs();
            lanes[0] = if w > lanes[0] { w } else { lanes[0] };
        }
        let maxw = lanes.iter().fold(0.0f32, |m, &w| if w > m { w } else { m });
        let step = if maxw > 0.0 { maxw / 127.0 } else { 1.0 };
        let inv = 1.0 / step;
        let (head, tail) = out.split_at_mut(q.len());
        tail.fill(0);
        for ((o, a), b) in head.iter_mut().zip(q).zip(scales) {
            // Round to nearest by adding 1.5 · 2^23 (the integer lands in the low mantissa
            // bits, two's complement in the low byte); the clamp keeps `maxw · inv` rounding
            // inside i8.
            let x = (a * b * inv).clamp(-127.0, 127.0);
            *o = ((x + 12_582_912.0).to_bits() & 0xFF) as u8 as i8;
        }
        step
    }
}
