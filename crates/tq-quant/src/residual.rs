//! The residual of the token-grouped quantizers (KIVI keys, gmse): the newest incomplete group of
//! fewer than `G` rows, held in f16 until the group fills and is quantized as one `G × d` block.
//!
//! **Why f16.** A residual row is stored at full model precision, and LLM K/V caches are f16 or
//! bf16 (KIVI keeps its residual in the model's f16). Holding it in f32 would double the
//! residual's share of the stored bits (`(G - 1) · 32 / T` bits per coordinate at its largest,
//! about one bit per coordinate at `G = 64` and `T = 2 048`) for no information the model had.
//!
//! **Determinism.** Each appended value is rounded to f16 on arrival and a filled group is
//! quantized from those rounded values, so the codes do not depend on how the rows arrived (one at
//! a time, in blocks, or restored from a file).

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use tq_core::half_simd;

use crate::{Error, Result};

/// Rows of one incomplete group, f16 bit patterns, row-major `d` wide (see the [module docs](self)).
#[derive(Debug, Clone)]
pub(crate) struct Residual {
    d: usize,
    group: usize,
    bits: Vec<u16>,
}

impl Residual {
    /// An empty residual for rows of `d` values and groups of `group` rows.
    pub(crate) fn new(d: usize, group: usize) -> Self {
        Self {
            d,
            group,
            bits: Vec::new(),
        }
    }

    /// A residual from stored f16 bit patterns (deserialization).
    ///
    /// # Errors
    /// [`Error::ConfigMismatch`] for values that are not whole rows, `G` rows or more, or an f16
    /// that is not finite.
    pub(crate) fn from_bits(d: usize, group: usize, bits: Vec<u16>) -> Result<Self> {
        if !bits.len().is_multiple_of(d) || bits.len() / d >= group {
            return Err(Error::ConfigMismatch(format!(
                "a residual of {} values is not fewer than {group} rows of {d}",
                bits.len()
            )));
        }
        if let Some(i) = bits
            .iter()
            .position(|&b| !f16::from_bits(b).to_f32().is_finite())
        {
            return Err(Error::ConfigMismatch(format!(
                "residual value {i} is not a finite f16"
            )));
        }
        Ok(Self { d, group, bits })
    }

    /// Rows held.
    pub(crate) fn rows(&self) -> usize {
        self.bits.len() / self.d
    }

    /// The f16 bit patterns, row-major.
    pub(crate) fn bits(&self) -> &[u16] {
        &self.bits
    }

    /// Stored bytes (2 per value).
    pub(crate) fn bytes(&self) -> usize {
        2 * self.bits.len()
    }

    /// Appends rows (whole rows of values f16 can hold: the caller checks), each value rounded to
    /// f16, and removes every group that fills: returned as f32, row-major, whole groups, oldest
    /// first (empty when none filled).
    pub(crate) fn push(&mut self, xs: &[f32]) -> Vec<f32> {
        let start = self.bits.len();
        self.bits.resize(start + xs.len(), 0);
        self.bits[start..]
            .reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(xs);
        let full = self.rows() / self.group;
        if full == 0 {
            return Vec::new();
        }
        let take = full * self.group * self.d;
        let mut done = vec![0.0f32; take];
        half_simd::widen(&self.bits[..take], &mut done);
        self.bits.drain(..take);
        done
    }

    /// Keeps the first `rows` rows.
    pub(crate) fn truncate(&mut self, rows: usize) {
        self.bits.truncate(rows * self.d);
    }

    /// Replaces the rows by `xs` (fewer than `G` whole rows of values f16 can hold), rounded.
    pub(crate) fn replace(&mut self, xs: &[f32]) {
        self.bits.clear();
        let rest = self.push(xs);
        debug_assert!(rest.is_empty());
    }

    /// Row `i < rows` as f32 into `out` (`d` values).
    pub(crate) fn row_into(&self, i: usize, out: &mut [f32]) {
        half_simd::widen(&self.bits[i * self.d..(i + 1) * self.d], out);
    }

    /// Every row as f32, row-major.
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.bits.len()];
        half_simd::widen(&self.bits, &mut out);
        out
    }

    /// `out[i] = ⟨q, row_i⟩` for every row (`out.len() == rows`).
    /// The rows are read as f16 and widened in registers ([`half_simd::dot`]).
    pub(crate) fn score_into(&self, q: &[f32], out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.rows());
        for (o, row) in out.iter_mut().zip(self.bits.chunks_exact(self.d)) {
            *o = half_simd::dot(q, row);
        }
    }

    /// `out += Σ_i w[i] · row_i` (`w.len() == rows`), the rows widened in registers
    /// ([`half_simd::axpy`]).
    pub(crate) fn add_weighted(&self, w: &[f32], out: &mut [f32]) {
        debug_assert_eq!(w.len(), self.rows());
        for (&wi, row) in w.iter().zip(self.bits.chunks_exact(self.d)) {
            if wi != 0.0 {
                half_simd::axpy(wi, row, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_fill_the_same_however_rows_arrive() {
        let (d, g) = (3, 4);
        let xs: Vec<f32> = (0..d * 11).map(|i| (i as f32 * 0.37).sin() * 3.1).collect();
        let mut whole = Residual::new(d, g);
        let a = whole.push(&xs);
        let mut one = Residual::new(d, g);
        let mut b = Vec::new();
        for row in xs.chunks(d) {
            b.extend(one.push(row));
        }
        assert_eq!(a, b);
        assert_eq!(a.len(), 2 * g * d);
        assert_eq!(whole.bits(), one.bits());
        assert_eq!(whole.rows(), 3);
        // Every value is its f16 rounding.
        for (x, y) in xs.iter().zip(&a) {
            assert_eq!(*y, f16::from_f32(*x).to_f32());
        }
        let mut row = vec![0.0; d];
        whole.row_into(2, &mut row);
        let want: Vec<f32> = xs[10 * d..11 * d]
            .iter()
            .map(|&x| f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(row, want);
    }

    #[test]
    fn stored_values_are_checked() {
        assert!(Residual::from_bits(2, 4, vec![0; 3]).is_err());
        assert!(Residual::from_bits(2, 4, vec![0; 8]).is_err());
        assert!(Residual::from_bits(2, 4, vec![0x7c00, 0]).is_err());
        assert_eq!(Residual::from_bits(2, 4, vec![0; 6]).unwrap().rows(), 3);
    }
}
