//! [`RowScales`]: the per-row scales of a batch, stored at the width its configuration names
//! ([`ScalePrecision`]). The kernels read scales as `f32`: an f32 batch lends its slice, an f16
//! batch converts the rows asked for (F16C where the CPU has it, [`tq_core::half_simd::widen`]).

use std::borrow::Cow;
use std::ops::Range;

use half::f16;

use crate::config::ScalePrecision;
use crate::{Error, Result};

/// One scale per row, at f32 or f16 width.
#[derive(Debug, Clone, PartialEq)]
pub enum RowScales {
    /// f32 scales.
    F32(Vec<f32>),
    /// f16 scales (raw bits).
    F16(Vec<u16>),
}

impl RowScales {
    /// No rows, at width `precision`.
    pub fn new(precision: ScalePrecision) -> Self {
        match precision {
            ScalePrecision::F32 => Self::F32(Vec::new()),
            ScalePrecision::F16 => Self::F16(Vec::new()),
        }
    }

    /// Scales given as f32, stored at width `precision`: f16 rounds each to nearest (ties to even).
    ///
    /// # Errors
    /// [`Error::ScaleOverflow`] for a scale f16 cannot hold (above 65 504 after rounding) or a
    /// non-finite scale.
    pub fn from_f32(precision: ScalePrecision, scales: &[f32]) -> Result<Self> {
        let mut s = Self::new(precision);
        s.extend_from_f32(scales)?;
        Ok(s)
    }

    /// Appends scales given as f32 (rounded as in [`RowScales::from_f32`]); nothing is appended
    /// on error. O(n).
    ///
    /// # Errors
    /// As [`RowScales::from_f32`].
    pub fn extend_from_f32(&mut self, scales: &[f32]) -> Result<()> {
        let max = match self {
            Self::F32(_) => f32::MAX,
            Self::F16(_) => f16::MAX.to_f32(),
        };
        let overflow = |row: usize, scale: f32| Error::ScaleOverflow { row, scale, max };
        if let Some(row) = scales.iter().position(|s| !s.is_finite()) {
            return Err(overflow(row, scales[row]));
        }
        match self {
            Self::F32(v) => v.extend_from_slice(scales),
            Self::F16(v) => {
                let start = v.len();
                v.extend(scales.iter().map(|&s| f16::from_f32(s).to_bits()));
                if let Some(row) = v[start..]
                    .iter()
                    .position(|&h| f16::from_bits(h).is_infinite())
                {
                    v.truncate(start);
                    return Err(overflow(row, scales[row]));
                }
            }
        }
        Ok(())
    }

    /// The stored width.
    pub fn precision(&self) -> ScalePrecision {
        match self {
            Self::F32(_) => ScalePrecision::F32,
            Self::F16(_) => ScalePrecision::F16,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i`'s scale.
    ///
    /// # Panics
    /// When `i >= len` (an internal index; public callers check rows first).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => f16::from_bits(v[i]).to_f32(),
        }
    }

    /// Rows `rows` as f32: borrowed at f32 width, converted at f16 width. O(rows) for f16.
    ///
    /// # Panics
    /// When `rows` is out of bounds (an internal range).
    pub fn f32_range(&self, rows: Range<usize>) -> Cow<'_, [f32]> {
        match self {
            Self::F32(v) => Cow::Borrowed(&v[rows]),
            Self::F16(v) => {
                let bits = &v[rows];
                let mut out = vec![0.0f32; bits.len()];
                tq_core::half_simd::widen(bits, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Every row as f32 ([`RowScales::f32_range`] over all rows).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        self.f32_range(0..self.len())
    }

    /// Bytes held: 4 or 2 per row.
    pub fn memory_bytes(&self) -> usize {
        self.len() * self.precision().bytes()
    }

    /// Keeps the first `n` rows (no-op when `n >= len`).
    pub fn truncate(&mut self, n: usize) {
        match self {
            Self::F32(v) => v.truncate(n),
            Self::F16(v) => v.truncate(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounds_to_nearest_and_refuses_overflow() {
        let mut s = RowScales::new(ScalePrecision::F16);
        s.extend_from_f32(&[1.0, 0.1, 65504.0, 65519.0]).unwrap();
        assert_eq!(s.get(0), 1.0);
        assert_eq!(s.get(1), f16::from_f32(0.1).to_f32());
        assert!((s.get(1) - 0.1).abs() <= 0.1 * 2f32.powi(-11));
        assert_eq!(s.get(3), 65504.0);
        let e = s.extend_from_f32(&[2.0, 65520.0]).unwrap_err();
        assert!(matches!(e, Error::ScaleOverflow { row: 1, .. }), "{e}");
        assert_eq!(s.len(), 4, "a refused append adds nothing");
        assert!(s.extend_from_f32(&[f32::NAN]).is_err());
        assert_eq!(s.memory_bytes(), 8);
        assert_eq!(&*s.f32_range(1..3), &[s.get(1), s.get(2)]);
    }

    #[test]
    fn f32_lends_its_rows() {
        let s = RowScales::from_f32(ScalePrecision::F32, &[1.5, 2.5, 3.5]).unwrap();
        assert!(matches!(s.f32_range(1..3), Cow::Borrowed(&[2.5, 3.5])));
        assert_eq!(s.memory_bytes(), 12);
        assert!(RowScales::from_f32(ScalePrecision::F32, &[f32::INFINITY]).is_err());
    }
}
