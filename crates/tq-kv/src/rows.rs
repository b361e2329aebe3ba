//! The tokens a head keeps unquantized (the attention sink and the recent window), stored as
//! rows of f32 or f16 values.

use std::borrow::Cow;

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The largest magnitude an f16 row value holds (the largest finite f16).
pub const F16_MAX: f32 = 65504.0;

/// Stored width of the tokens a cache keeps unquantized (the sink and the window).
///
/// [`WindowPrecision::F16`] halves their share of the stored bits. A value is rounded to the
/// nearest f16 (relative error at most `2^-11`, far below any code's error); a value beyond
/// ±65 504 is refused ([`tq_quant::Error::ValueOutOfRange`]), never saturated. Caches saved
/// before the setting existed hold f32 rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WindowPrecision {
    /// f32 rows (the model's own values, exactly).
    #[default]
    F32,
    /// f16 rows.
    F16,
}

impl WindowPrecision {
    /// Name used on the command line and in reports (`f32`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            WindowPrecision::F32 => "f32",
            WindowPrecision::F16 => "f16",
        }
    }

    /// Stored bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            WindowPrecision::F32 => 4,
            WindowPrecision::F16 => 2,
        }
    }

    /// Refuses values this width cannot hold: with f16, the first value beyond ±65 504 as
    /// [`tq_quant::Error::ValueOutOfRange`] (flat index within `xs`). O(n).
    ///
    /// # Errors
    /// As above; f32 accepts every (finite) value.
    pub fn check(self, xs: &[f32]) -> Result<()> {
        if self == WindowPrecision::F32 {
            return Ok(());
        }
        match xs.iter().enumerate().find(|(_, v)| v.abs() > F16_MAX) {
            Some((index, &value)) => Err(Error::Quant(tq_quant::Error::ValueOutOfRange {
                index,
                value,
                max: F16_MAX,
            })),
            None => Ok(()),
        }
    }
}

impl std::str::FromStr for WindowPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "32" => Ok(Self::F32),
            "f16" | "16" => Ok(Self::F16),
            other => Err(format!(
                "unknown window precision '{other}' (expected f32 or f16)"
            )),
        }
    }
}

/// Row-major rows of unquantized values at a [`WindowPrecision`]. Values are trusted here (the
/// cache checks them with [`WindowPrecision::check`] before anything changes).
#[derive(Debug, Clone)]
pub(crate) enum PlainRows {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl PlainRows {
    /// Empty rows of the given width.
    pub(crate) fn new(precision: WindowPrecision) -> Self {
        match precision {
            WindowPrecision::F32 => PlainRows::F32(Vec::new()),
            WindowPrecision::F16 => PlainRows::F16(Vec::new()),
        }
    }

    /// Stored values (rows times `d`).
    pub(crate) fn len(&self) -> usize {
        match self {
            PlainRows::F32(v) => v.len(),
            PlainRows::F16(v) => v.len(),
        }
    }

    /// Whether no value is stored.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stored bytes.
    pub(crate) fn stored_bytes(&self) -> usize {
        match self {
            PlainRows::F32(v) => 4 * v.len(),
            PlainRows::F16(v) => 2 * v.len(),
        }
    }

    /// Appends values (f16: rounded to nearest; the caller checked the range). O(n).
    pub(crate) fn extend(&mut self, xs: &[f32]) {
        match self {
            PlainRows::F32(v) => v.extend_from_slice(xs),
            PlainRows::F16(v) => {
                let at = v.len();
                v.resize(at + xs.len(), f16::ZERO);
                v[at..].convert_from_f32_slice(xs);
            }
        }
    }

    /// Drops the first `n` values.
    pub(crate) fn drain_front(&mut self, n: usize) {
        match self {
            PlainRows::F32(v) => drop(v.drain(..n)),
            PlainRows::F16(v) => drop(v.drain(..n)),
        }
    }

    /// Keeps the first `n` values.
    pub(crate) fn truncate(&mut self, n: usize) {
        match self {
            PlainRows::F32(v) => v.truncate(n),
            PlainRows::F16(v) => v.truncate(n),
        }
    }

    /// The values as f32: borrowed for f32 rows, widened (exactly) for f16 rows, eight per
    /// instruction where the CPU has F16C, AVX2 and FMA (`half_simd::widen`). O(n) for f16.
    pub(crate) fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            PlainRows::F32(v) => Cow::Borrowed(v),
            PlainRows::F16(v) => {
                let mut out = vec![0.0f32; v.len()];
                tq_core::half_simd::widen(v.reinterpret_cast(), &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// The stored bytes, little-endian (for saving).
    pub(crate) fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            PlainRows::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            PlainRows::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Rows read back from little-endian bytes of the given width (a saved cache's tensor data).
    /// `None` unless the bytes are whole values and every value is finite.
    pub(crate) fn from_le_bytes(precision: WindowPrecision, bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(precision.bytes()) {
            return None;
        }
        let rows = match precision {
            WindowPrecision::F32 => PlainRows::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            WindowPrecision::F16 => PlainRows::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        };
        rows.to_f32().iter().all(|x| x.is_finite()).then_some(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 rows widen to exactly each value's f32 (signed zeros, subnormals, the largest finite
    /// values, every binade), at lengths that leave partial vectors.
    #[test]
    fn f16_rows_widen_exactly() {
        for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 200] {
            // Signed zeros, the smallest and largest subnormals, the smallest normals, the
            // largest finite values, then a spread over every binade and both signs.
            let edges = [
                0x0000u16, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x8400, 0x7BFF, 0xFBFF,
            ];
            let bits: Vec<u16> = (0..n as u32)
                .map(|i| match edges.get(i as usize) {
                    Some(&e) => e,
                    None => (i.wrapping_mul(40_503) % 0x7C00) as u16 | (((i & 1) as u16) << 15),
                })
                .collect();
            let v: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b)).collect();
            let want: Vec<u32> = v.iter().map(|x| x.to_f32().to_bits()).collect();
            let got: Vec<u32> = PlainRows::F16(v)
                .to_f32()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(got, want, "{n} values");
        }
    }
}
