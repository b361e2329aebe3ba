//! One quantized tensor stream (all keys or all values of a head): one or two channel parts, each
//! a TurboQuant batch of its own (docs/DESIGN.md, Algorithms: mixed precision).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tq_core::RotationKind;
use tq_quant::io::SavedBatch;
use tq_quant::{
    MseBatch, MseConfig, MseQuantizer, MseQuery, ProdBatch, ProdConfig, ProdQuantizer, ProdQuery,
    SketchKind,
};
use tq_quant::{PolarBatch, PolarConfig, PolarQuantizer, ScaleMode};

use crate::precision::{Precision, check_channels};
use crate::{Error, Result};

/// How keys are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyStrategy {
    /// TurboQuant_mse: lowest reconstruction error, inner products shrunk slightly.
    #[default]
    Mse,
    /// TurboQuant_prod: unbiased scores (`b - 1` MSE bits plus QJL signs), more variance.
    Prod,
    /// PolarQuant (experimental; keys or values): a uniform precision `b` uses 4 levels of
    /// `b, b/2, b/2, b/2` bits (the paper's 4,2,2,2 at 4); the head dimension must be a multiple of 16.
    Polar,
}

impl KeyStrategy {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            KeyStrategy::Mse => "mse",
            KeyStrategy::Prod => "prod",
            KeyStrategy::Polar => "polar",
        }
    }
}

impl std::str::FromStr for KeyStrategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mse" => Ok(Self::Mse),
            "prod" => Ok(Self::Prod),
            "polar" => Ok(Self::Polar),
            other => Err(format!(
                "unknown strategy '{other}' (expected mse, prod or polar)"
            )),
        }
    }
}

/// How values are quantized. Values are summed with attention weights, never scored, so the
/// unbiased-score TurboQuant_prod has no place here and cannot be named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ValueStrategy {
    /// TurboQuant_mse: lowest reconstruction error.
    #[default]
    Mse,
    /// PolarQuant (experimental); the head dimension must be a multiple of 16.
    Polar,
}

impl ValueStrategy {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        KeyStrategy::from(self).name()
    }
}

impl From<ValueStrategy> for KeyStrategy {
    fn from(v: ValueStrategy) -> Self {
        match v {
            ValueStrategy::Mse => KeyStrategy::Mse,
            ValueStrategy::Polar => KeyStrategy::Polar,
        }
    }
}

impl std::str::FromStr for ValueStrategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mse" => Ok(Self::Mse),
            "polar" => Ok(Self::Polar),
            "prod" => Err(
                "values cannot use prod: TurboQuant_prod makes scores unbiased, and values are \
                 summed, not scored (expected mse or polar)"
                    .into(),
            ),
            other => Err(format!(
                "unknown value strategy '{other}' (expected mse or polar)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
enum PartBatch {
    Mse(MseBatch),
    Prod(ProdBatch),
    Polar(PolarBatch),
}

/// A query prepared against one part.
#[derive(Debug, Clone)]
pub(crate) enum PartQuery {
    Mse(MseQuery),
    Prod(ProdQuery),
    Polar(Vec<f32>),
}

#[derive(Debug, Clone)]
struct Part {
    /// Channels of this part, ascending; `None` means all channels in order.
    channels: Option<Vec<usize>>,
    batch: PartBatch,
}

/// Quantized rows of one tensor stream.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    dim: usize,
    parts: Vec<Part>,
}

/// Seeds of the parts of one stream: distinct and fixed, so that a stored cache regenerates them.
fn part_seed(seed: u64, part: usize) -> u64 {
    seed.wrapping_add((part as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[allow(clippy::too_many_arguments)]
fn make_part(
    dim: usize,
    bits: u32,
    strategy: KeyStrategy,
    scale: ScaleMode,
    rotation: RotationKind,
    seed: u64,
    channels: Option<Vec<usize>>,
    mean: Option<&[f32]>,
) -> Result<Part> {
    let mean: Option<Vec<f32>> = mean.map(|m| match &channels {
        None => m.to_vec(),
        Some(ch) => ch.iter().map(|&c| m[c]).collect(),
    });
    if mean.is_some() && strategy != KeyStrategy::Mse {
        return Err(Error::InvalidChannels {
            reason: "centering applies to MSE keys only".into(),
        });
    }
    let batch = match strategy {
        KeyStrategy::Mse => {
            let cfg = MseConfig::new(dim, bits, rotation, seed).with_scale(scale);
            let q = match mean {
                Some(m) => MseQuantizer::with_mean(cfg, m)?,
                None => MseQuantizer::new(cfg)?,
            };
            PartBatch::Mse(MseBatch::new(Arc::new(q)))
        }
        KeyStrategy::Prod => {
            let cfg = ProdConfig {
                dim,
                bits,
                rotation,
                sketch: SketchKind::Gaussian,
                seed,
            };
            PartBatch::Prod(ProdBatch::new(Arc::new(ProdQuantizer::new(cfg)?)))
        }
        KeyStrategy::Polar => {
            let rest = (bits / 2).max(1);
            let cfg = PolarConfig {
                dim,
                level_bits: vec![bits, rest, rest, rest],
                rotation,
                seed,
            };
            PartBatch::Polar(PolarBatch::new(Arc::new(PolarQuantizer::new(cfg)?)))
        }
    };
    Ok(Part { channels, batch })
}

impl Store {
    /// A stream for `dim`-dimensional rows. A split precision needs its outlier channels.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dim: usize,
        precision: Precision,
        strategy: KeyStrategy,
        scale: ScaleMode,
        outliers: Option<&[usize]>,
        mean: Option<&[f32]>,
        rotation: RotationKind,
        seed: u64,
    ) -> Result<Self> {
        if let Some(m) = mean
            && m.len() != dim
        {
            return Err(Error::Shape {
                what: "mean",
                expected: dim,
                got: m.len(),
            });
        }
        precision.validate(dim)?;
        let parts = match precision {
            Precision::Uniform(bits) => vec![make_part(
                dim,
                bits,
                strategy,
                scale,
                rotation,
                part_seed(seed, 0),
                None,
                mean,
            )?],
            Precision::Split {
                outlier_bits,
                outlier_channels,
                regular_bits,
            } => {
                let out = outliers.ok_or_else(|| Error::InvalidChannels {
                    reason: "a split precision needs its outlier channels (calibrate or give them)"
                        .into(),
                })?;
                check_channels(out, dim, outlier_channels)?;
                let regular: Vec<usize> =
                    (0..dim).filter(|c| out.binary_search(c).is_err()).collect();
                vec![
                    make_part(
                        out.len(),
                        outlier_bits,
                        strategy,
                        scale,
                        rotation,
                        part_seed(seed, 0),
                        Some(out.to_vec()),
                        mean,
                    )?,
                    make_part(
                        regular.len(),
                        regular_bits,
                        strategy,
                        scale,
                        rotation,
                        part_seed(seed, 1),
                        Some(regular),
                        mean,
                    )?,
                ]
            }
        };
        Ok(Self { dim, parts })
    }

    pub(crate) fn len(&self) -> usize {
        match &self.parts[0].batch {
            PartBatch::Mse(b) => b.len(),
            PartBatch::Prod(b) => b.len(),
            PartBatch::Polar(b) => b.len(),
        }
    }

    /// Exact stored bytes per row (codes and scalars of every part).
    pub(crate) fn bytes_per_vector(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match &p.batch {
                PartBatch::Mse(b) => b.bytes_per_vector(),
                PartBatch::Prod(b) => b.bytes_per_vector(),
                PartBatch::Polar(b) => b.bytes_per_vector(),
            })
            .sum()
    }

    /// Outlier channels of a split stream.
    /// The full-dimension mean of a centred stream (gathered back from its parts).
    pub(crate) fn mean(&self) -> Option<Vec<f32>> {
        let mut out = vec![0.0f32; self.dim];
        for p in &self.parts {
            let PartBatch::Mse(b) = &p.batch else {
                return None;
            };
            let m = b.quantizer().mean()?;
            match &p.channels {
                None => out.copy_from_slice(m),
                Some(ch) => ch.iter().zip(m).for_each(|(&c, &v)| out[c] = v),
            }
        }
        Some(out)
    }

    pub(crate) fn outliers(&self) -> Option<&[usize]> {
        if self.parts.len() > 1 {
            self.parts[0].channels.as_deref()
        } else {
            None
        }
    }

    fn gather<'a>(
        channels: &Option<Vec<usize>>,
        xs: &'a [f32],
        dim: usize,
    ) -> std::borrow::Cow<'a, [f32]> {
        match channels {
            None => std::borrow::Cow::Borrowed(xs),
            Some(ch) => {
                let mut out = Vec::with_capacity(xs.len() / dim * ch.len());
                for row in xs.chunks_exact(dim) {
                    out.extend(ch.iter().map(|&c| row[c]));
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }

    /// Appends row-major rows (trusted: finite, a multiple of `dim`).
    pub(crate) fn extend(&mut self, xs: &[f32]) -> Result<()> {
        for p in &mut self.parts {
            let sub = Self::gather(&p.channels, xs, self.dim);
            match &mut p.batch {
                PartBatch::Mse(b) => b.extend(&sub)?,
                PartBatch::Prod(b) => b.extend(&sub)?,
                PartBatch::Polar(b) => b.extend(&sub)?,
            }
        }
        Ok(())
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        for p in &mut self.parts {
            match &mut p.batch {
                PartBatch::Mse(b) => b.truncate(n),
                PartBatch::Prod(b) => b.truncate(n),
                PartBatch::Polar(b) => b.truncate(n),
            }
        }
    }

    /// Prepares a (trusted) query against every part.
    pub(crate) fn prepare(&self, q: &[f32]) -> Result<Vec<PartQuery>> {
        self.parts
            .iter()
            .map(|p| {
                let sub = Self::gather(&p.channels, q, self.dim);
                Ok(match &p.batch {
                    PartBatch::Mse(b) => PartQuery::Mse(b.quantizer().prepare_query(&sub)?),
                    PartBatch::Prod(b) => PartQuery::Prod(b.quantizer().prepare_query(&sub)?),
                    PartBatch::Polar(_) => PartQuery::Polar(sub.into_owned()),
                })
            })
            .collect()
    }

    /// `out[t] = ⟨q, k̃_t⟩` for every stored row, summed over the parts.
    pub(crate) fn scores(&self, queries: &[PartQuery], out: &mut [f32], fast: bool) -> Result<()> {
        let mut tmp = if self.parts.len() > 1 {
            vec![0.0f32; out.len()]
        } else {
            Vec::new()
        };
        for (i, (p, q)) in self.parts.iter().zip(queries).enumerate() {
            let dst: &mut [f32] = if i == 0 { out } else { &mut tmp };
            match (&p.batch, q, fast) {
                (PartBatch::Mse(b), PartQuery::Mse(q), true) => b.score_into(q, dst)?,
                (PartBatch::Mse(b), PartQuery::Mse(q), false) => b.score_exact_into(q, dst)?,
                (PartBatch::Prod(b), PartQuery::Prod(q), true) => b.score_into(q, dst)?,
                (PartBatch::Prod(b), PartQuery::Prod(q), false) => b.score_exact_into(q, dst)?,
                (PartBatch::Polar(b), PartQuery::Polar(q), _) => b.score_into(q, dst)?,
                _ => unreachable!("queries are prepared against the same parts"),
            }
            if i > 0 {
                for (o, t) in out.iter_mut().zip(&tmp) {
                    *o += t;
                }
            }
        }
        Ok(())
    }

    /// `outs[q] += Σ_t weights[q][t] · ṽ_t` for every weight vector (MSE parts, rotated domain, the
    /// codes decoded once for all vectors, one inverse rotation per vector and part).
    pub(crate) fn weighted_sums_into(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        for p in &self.parts {
            let scatter = |out: &mut [f32], part: &[f32]| match &p.channels {
                None => out.iter_mut().zip(part).for_each(|(o, v)| *o += v),
                Some(ch) => ch.iter().zip(part).for_each(|(&c, v)| out[c] += v),
            };
            let b = match &p.batch {
                PartBatch::Mse(b) => b,
                PartBatch::Polar(b) => {
                    let mut part = vec![0.0f32; b.quantizer().dim()];
                    for (w, out) in weights.iter().zip(outs.iter_mut()) {
                        b.weighted_sum(w, &mut part)?;
                        scatter(out, &part);
                    }
                    continue;
                }
                PartBatch::Prod(_) => {
                    return Err(Error::InvalidPrecision {
                        spec: "prod".into(),
                        reason: "values cannot use TurboQuant_prod".into(),
                    });
                }
            };
            let k = b.quantizer().dim();
            let mut rot = vec![vec![0.0f32; k]; weights.len()];
            {
                let mut refs: Vec<&mut [f32]> = rot.iter_mut().map(Vec::as_mut_slice).collect();
                b.accumulate_rotated_multi(weights, &mut refs)?;
            }
            let mut part = vec![0.0f32; k];
            for ((r, out), w) in rot.iter().zip(outs.iter_mut()).zip(weights) {
                b.quantizer()
                    .rotation()
                    .apply_inverse_unchecked(r, &mut part);
                // A centred part's rows are x̃ + mean: add the mean once, weighted by Σ w.
                if let Some(m) = b.quantizer().mean() {
                    let total: f32 = w.iter().sum();
                    part.iter_mut().zip(m).for_each(|(p, &v)| *p += total * v);
                }
                scatter(out, &part);
            }
        }
        Ok(())
    }

    /// Each part's batch as a saved tq-batch (safetensors bytes).
    pub(crate) fn to_blobs(&self) -> Result<Vec<Vec<u8>>> {
        self.parts
            .iter()
            .map(|p| {
                Ok(match &p.batch {
                    PartBatch::Mse(b) => b.to_safetensors()?,
                    PartBatch::Prod(b) => b.to_safetensors()?,
                    PartBatch::Polar(b) => b.to_safetensors()?,
                })
            })
            .collect()
    }

    /// Fills this (empty, freshly configured) stream from saved part batches, which must carry
    /// exactly the configurations this stream was built with and equal row counts.
    pub(crate) fn restore(&mut self, blobs: &[&[u8]], what: &str) -> Result<()> {
        let bad = |reason: String| Error::InvalidCache {
            tensor: what.to_string(),
            reason,
        };
        if blobs.len() != self.parts.len() {
            return Err(bad(format!(
                "{} parts stored, {} expected",
                blobs.len(),
                self.parts.len()
            )));
        }
        let mut rows = None;
        for (p, blob) in self.parts.iter_mut().zip(blobs) {
            let saved = SavedBatch::from_safetensors(blob)?;
            let (len, ok) = match (&p.batch, &saved) {
                (PartBatch::Mse(want), SavedBatch::Mse(got)) => (
                    got.len(),
                    want.quantizer().config() == got.quantizer().config(),
                ),
                (PartBatch::Prod(want), SavedBatch::Prod(got)) => (
                    got.len(),
                    want.quantizer().config() == got.quantizer().config(),
                ),
                (PartBatch::Polar(want), SavedBatch::Polar(got)) => (
                    got.len(),
                    want.quantizer().config() == got.quantizer().config(),
                ),
                _ => (0, false),
            };
            if !ok {
                return Err(bad(
                    "a stored part's quantizer differs from the cache configuration".into(),
                ));
            }
            if *rows.get_or_insert(len) != len {
                return Err(bad("parts hold different numbers of rows".into()));
            }
            p.batch = match saved {
                SavedBatch::Mse(b) => PartBatch::Mse(b),
                SavedBatch::Prod(b) => PartBatch::Prod(b),
                SavedBatch::Polar(b) => PartBatch::Polar(b),
            };
        }
        Ok(())
    }

    /// Decodes row `i` into `out` (`dim` values).
    pub(crate) fn reconstruct(&self, i: usize, out: &mut [f32]) -> Result<()> {
        for p in &self.parts {
            let k = match &p.channels {
                None => self.dim,
                Some(ch) => ch.len(),
            };
            let mut part = vec![0.0f32; k];
            match &p.batch {
                PartBatch::Mse(b) => b.dequantize_row(i, &mut part)?,
                PartBatch::Prod(b) => b.dequantize_row(i, &mut part)?,
                PartBatch::Polar(b) => b.dequantize_row(i, &mut part)?,
            }
            match &p.channels {
                None => out.copy_from_slice(&part),
                Some(ch) => ch.iter().zip(&part).for_each(|(&c, &v)| out[c] = v),
            }
        }
        Ok(())
    }
}
