//! `u8` look-up tables for the nibble scan: float tables quantized with one shared step.

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
