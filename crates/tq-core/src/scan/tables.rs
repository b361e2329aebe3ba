//! `u8` look-up tables for the scans: float tables quantized with one shared step.

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
        self.tables.clear();
        self.tables.resize(tables.len(), 0);
        let mut offset = 0.0f64;
        for ((t, out), &lo) in tables
            .chunks_exact(entries)
            .zip(self.tables.chunks_exact_mut(entries))
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
        self.offset = offset as f32;
        self.step = step;
    }

    /// Converts a `u8` table sum to a score.
    #[inline]
    pub fn score(&self, sum: u32) -> f32 {
        self.offset + self.step * sum as f32
    }
}
