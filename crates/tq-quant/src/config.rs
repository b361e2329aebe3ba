//! Quantizer configurations: everything needed to rebuild a quantizer (matrices are regenerated
//! from the seed, never stored).

use serde::{Deserialize, Serialize};
use tq_core::RotationKind;

use crate::{Error, Result};

/// Largest dimension accepted for a dense Haar rotation or a dense QJL matrix (`d²` floats).
pub const MAX_DENSE_DIM: usize = 4096;
/// Largest dimension accepted at all.
pub const MAX_DIM: usize = 1 << 20;

/// How the QJL projection `S` is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SketchKind {
    /// i.i.d. standard Gaussian entries, as in the papers.
    #[default]
    Gaussian,
    /// Rows of independent Haar orthogonal `d × d` blocks scaled by `sqrt(d)`: still unbiased,
    /// lower variance.
    Orthogonal,
}

impl SketchKind {
    /// Lower-case name, as used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            SketchKind::Gaussian => "gaussian",
            SketchKind::Orthogonal => "orthogonal",
        }
    }
}

impl std::str::FromStr for SketchKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "gaussian" => Ok(Self::Gaussian),
            "orthogonal" => Ok(Self::Orthogonal),
            other => Err(format!(
                "unknown sketch '{other}' (expected gaussian or orthogonal)"
            )),
        }
    }
}

/// The scalar stored beside each vector's codes (no extra bits: it replaces the norm).
///
/// With `y = Π x/‖x‖` the rotated unit vector and `ỹ = c[codes]` its reconstruction, a row decodes
/// to `x̃ = s · Πᵀ ỹ` and scores as `s · ⟨Π q, ỹ⟩`:
/// - [`ScaleMode::Norm`]: `s = ‖x‖` (the paper).
/// - [`ScaleMode::LeastSquares`]: `s = ‖x‖ ⟨y, ỹ⟩ / ‖ỹ‖²`, the `s` minimising `‖x - s Πᵀỹ‖²`:
///   per vector, never a larger reconstruction error than `Norm`. Inner products keep a small
///   shrinkage towards 0 (`⟨x̃, x⟩ = ‖x‖² ⟨y,ỹ⟩²/‖ỹ‖² <= ‖x‖²`).
/// - [`ScaleMode::Unbiased`]: `s = ‖x‖ / ⟨y, ỹ⟩` (DRIVE / EDEN): the reconstruction's component
///   along `x` is exact, `⟨x̃, x⟩ = ‖x‖²`; by the symmetry of the random rotation `E⟨q, x̃⟩ = ⟨q, x⟩`.
///   The price is a larger reconstruction error than least squares.
///
/// Norm-scaled estimates are shrunk by about `1 - D_mse/2` (`2/π` at 1 bit). Measured on GloVe 6B
/// 50d, the two corrected scales lift recall 1@1 at 4 bits from 0.76 to 0.85-0.86 (docs/SCALES.md);
/// which of them has the smaller inner-product error depends on the data. Tests:
/// `crates/tq-quant/tests/scale.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleMode {
    /// The vector's norm.
    #[default]
    Norm,
    /// Unbiased inner products (EDEN's scale).
    Unbiased,
    /// Least-squares fit of the reconstruction.
    LeastSquares,
}

impl ScaleMode {
    /// Name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ScaleMode::Norm => "norm",
            ScaleMode::Unbiased => "unbiased",
            ScaleMode::LeastSquares => "least-squares",
        }
    }
}

impl std::str::FromStr for ScaleMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "norm" => Ok(Self::Norm),
            "unbiased" => Ok(Self::Unbiased),
            "least-squares" | "ls" => Ok(Self::LeastSquares),
            other => Err(format!(
                "unknown scale '{other}' (expected norm, unbiased or least-squares)"
            )),
        }
    }
}

/// The width of the stored per-vector scale.
///
/// [`ScalePrecision::F16`] halves the scale's share of the stored bits (16 instead of 32 bits per
/// vector: 0.25 instead of 0.5 bits per coordinate at `d = 64`). Its relative rounding error,
/// at most `2^-11`, is far below the codes' error at any width 1-8 (the 8-bit codes' RMS error is
/// about 1% of the norm). Scales are rounded to nearest; a scale above 65 504 (the largest f16) is
/// refused with [`Error::ScaleOverflow`](crate::Error::ScaleOverflow), never saturated, and scales
/// below 6.1e-5 keep f16's subnormal spacing (an absolute error under 3e-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScalePrecision {
    /// One f32 per vector (the paper's accounting: 32 bits per vector).
    #[default]
    F32,
    /// One f16 per vector.
    F16,
}

impl ScalePrecision {
    /// Name used on the command line and in reports (`f32`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            ScalePrecision::F32 => "f32",
            ScalePrecision::F16 => "f16",
        }
    }

    /// Stored bytes per scale.
    pub fn bytes(self) -> usize {
        match self {
            ScalePrecision::F32 => 4,
            ScalePrecision::F16 => 2,
        }
    }
}

impl std::str::FromStr for ScalePrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "32" => Ok(Self::F32),
            "f16" | "16" => Ok(Self::F16),
            other => Err(format!(
                "unknown scale precision '{other}' (expected f32 or f16)"
            )),
        }
    }
}

/// Configuration of a [`MseQuantizer`](crate::MseQuantizer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MseConfig {
    /// Vector dimension `d >= 2`.
    pub dim: usize,
    /// Bits per coordinate, `1..=8`.
    pub bits: u32,
    /// The random rotation.
    pub rotation: RotationKind,
    /// Seed of the rotation.
    pub seed: u64,
    /// The per-vector scalar stored beside the codes.
    #[serde(default)]
    pub scale: ScaleMode,
    /// Whether vectors are centred on a calibrated mean before quantization (the mean is stored
    /// with the quantizer; see [`MseQuantizer::with_mean`](crate::MseQuantizer::with_mean)).
    #[serde(default)]
    pub centered: bool,
    /// Width of the stored scale (files written before it existed hold f32 scales).
    #[serde(default)]
    pub scale_precision: ScalePrecision,
}

/// Configuration of a [`ProdQuantizer`](crate::ProdQuantizer): `bits - 1` bits of MSE codes plus
/// one QJL sign bit per coordinate (sketch size `m = d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProdConfig {
    /// Vector dimension `d >= 2`.
    pub dim: usize,
    /// Total bits per coordinate, `1..=8` (`1` is a pure QJL sketch of the vector).
    pub bits: u32,
    /// The random rotation.
    pub rotation: RotationKind,
    /// How the QJL matrix is drawn.
    pub sketch: SketchKind,
    /// Seed of the rotation and of the QJL matrix (independent streams).
    pub seed: u64,
}

/// Configuration of a stand-alone [`QjlSketch`](crate::QjlSketch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QjlConfig {
    /// Vector dimension `d >= 2`.
    pub dim: usize,
    /// Sketch size `m >= 1` (sign bits per vector).
    pub sketch_dim: usize,
    /// How `S` is drawn.
    pub sketch: SketchKind,
    /// Seed of `S`.
    pub seed: u64,
}

pub(crate) fn check_dim(dim: usize, dense: bool) -> Result<()> {
    if dim < 2 {
        return Err(tq_core::Error::DimTooSmall { dim, min: 2 }.into());
    }
    let (max, what) = if dense {
        (MAX_DENSE_DIM, "a dense rotation or sketch")
    } else {
        (MAX_DIM, "a quantizer")
    };
    if dim > max {
        return Err(Error::DimTooLarge { what, dim, max });
    }
    Ok(())
}

impl MseConfig {
    /// The paper's configuration: norm scale, no centering.
    pub fn new(dim: usize, bits: u32, rotation: RotationKind, seed: u64) -> Self {
        Self {
            dim,
            bits,
            rotation,
            seed,
            scale: ScaleMode::Norm,
            centered: false,
            scale_precision: ScalePrecision::F32,
        }
    }

    /// The same configuration with another scale.
    pub fn with_scale(self, scale: ScaleMode) -> Self {
        Self { scale, ..self }
    }

    /// The same configuration with another scale width.
    pub fn with_scale_precision(self, scale_precision: ScalePrecision) -> Self {
        Self {
            scale_precision,
            ..self
        }
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// [`Error::Core`] for `dim < 2`, [`Error::DimTooLarge`], [`Error::BitsOutOfRange`].
    pub fn validate(&self) -> Result<()> {
        check_dim(self.dim, self.rotation == RotationKind::Haar)?;
        if !(1..=8).contains(&self.bits) {
            return Err(Error::BitsOutOfRange {
                quantizer: "TurboQuant_mse",
                bits: self.bits,
                min: 1,
                max: 8,
            });
        }
        Ok(())
    }
}

impl ProdConfig {
    /// Validates the configuration.
    ///
    /// # Errors
    /// As [`MseConfig::validate`]; the dense QJL matrix limits `dim` to [`MAX_DENSE_DIM`].
    pub fn validate(&self) -> Result<()> {
        check_dim(self.dim, true)?;
        if !(1..=8).contains(&self.bits) {
            return Err(Error::BitsOutOfRange {
                quantizer: "TurboQuant_prod",
                bits: self.bits,
                min: 1,
                max: 8,
            });
        }
        Ok(())
    }
}

impl QjlConfig {
    /// Validates the configuration.
    ///
    /// # Errors
    /// [`Error::Core`] for `dim < 2`, [`Error::DimTooLarge`], [`Error::SketchSizeOutOfRange`] for
    /// `m` outside `1..=MAX_DENSE_DIM` (or `m·d` over `MAX_DENSE_DIM²`).
    pub fn validate(&self) -> Result<()> {
        check_dim(self.dim, true)?;
        let max = MAX_DENSE_DIM * MAX_DENSE_DIM / self.dim;
        if self.sketch_dim == 0 || self.sketch_dim > max.min(MAX_DIM) {
            return Err(Error::SketchSizeOutOfRange {
                m: self.sketch_dim,
                max: max.min(MAX_DIM),
            });
        }
        Ok(())
    }
}
