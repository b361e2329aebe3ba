//! One quantized tensor stream (all keys or all values of a head): one or two channel parts, each
//! a TurboQuant batch of its own (docs/DESIGN.md, Algorithms: mixed precision).

use serde::{Deserialize, Serialize};
use tq_core::RotationKind;
use tq_core::prefetch::Ahead;
use tq_quant::{
    AnyBatch, AnyQuery, EncodedVectors, KiviAxis, QuantizerKind, QuantizerSpec, ScaleMode,
    ScalePrecision,
};

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
    /// KIVI keys: asymmetric uniform levels per channel over groups of `G` tokens (f16 scale and
    /// zero per channel and group), the newest incomplete group in f16 until it fills.
    Kivi,
    /// Group-centred TurboQuant_mse: each group of `G` tokens loses its per-channel means (f16),
    /// then TurboQuant_mse codes what is left; the newest incomplete group in f16 until it fills.
    Gmse,
}

impl KeyStrategy {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        self.quantizer_kind().name()
    }

    /// The tq-quant quantizer that stores keys of this strategy.
    pub fn quantizer_kind(self) -> QuantizerKind {
        match self {
            KeyStrategy::Mse => QuantizerKind::Mse,
            KeyStrategy::Prod => QuantizerKind::Prod,
            KeyStrategy::Polar => QuantizerKind::Polar,
            KeyStrategy::Kivi => QuantizerKind::Kivi,
            KeyStrategy::Gmse => QuantizerKind::Gmse,
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
            "kivi" => Ok(Self::Kivi),
            "gmse" => Ok(Self::Gmse),
            other => Err(format!(
                "unknown strategy '{other}' (expected mse, prod, polar, kivi or gmse)"
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
    /// KIVI values: asymmetric uniform levels per token over groups of `G` channels.
    Kivi,
    /// Group-centred TurboQuant_mse over groups of `G` tokens (as for keys).
    Gmse,
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
            ValueStrategy::Kivi => KeyStrategy::Kivi,
            ValueStrategy::Gmse => KeyStrategy::Gmse,
        }
    }
}

impl std::str::FromStr for ValueStrategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mse" => Ok(Self::Mse),
            "polar" => Ok(Self::Polar),
            "kivi" => Ok(Self::Kivi),
            "gmse" => Ok(Self::Gmse),
            "prod" => Err(
                "values cannot use prod: TurboQuant_prod makes scores unbiased, and values are \
                 summed, not scored (expected mse, polar, kivi or gmse)"
                    .into(),
            ),
            other => Err(format!(
                "unknown value strategy '{other}' (expected mse, polar, kivi or gmse)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
struct Part {
    /// Channels of this part, ascending; `None` means all channels in order.
    channels: Option<Vec<usize>>,
    batch: AnyBatch,
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

/// Everything that configures one stream (keys or values of a head).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamSpec<'a> {
    pub(crate) dim: usize,
    pub(crate) precision: Precision,
    pub(crate) strategy: KeyStrategy,
    pub(crate) scale: ScaleMode,
    pub(crate) scale_precision: ScalePrecision,
    pub(crate) rotation: RotationKind,
    pub(crate) seed: u64,
    /// KIVI's group size and axis (keys per channel, values per token).
    pub(crate) group: usize,
    pub(crate) axis: KiviAxis,
    /// Outlier channels of a split precision.
    pub(crate) outliers: Option<&'a [usize]>,
    /// The full-dimension mean of a centred stream.
    pub(crate) mean: Option<&'a [f32]>,
}

impl StreamSpec<'_> {
    /// One part over `channels` (all of them when `None`) at `bits`.
    fn part(&self, bits: u32, index: usize, channels: Option<Vec<usize>>) -> Result<Part> {
        let mean: Option<Vec<f32>> = self.mean.map(|m| match &channels {
            None => m.to_vec(),
            Some(ch) => ch.iter().map(|&c| m[c]).collect(),
        });
        if mean.is_some() && self.strategy != KeyStrategy::Mse {
            return Err(Error::InvalidChannels {
                reason: "centering applies to MSE keys and values only".into(),
            });
        }
        let dim = channels.as_ref().map_or(self.dim, Vec::len);
        let spec = QuantizerSpec::new(
            self.strategy.quantizer_kind(),
            dim,
            bits,
            self.rotation,
            part_seed(self.seed, index),
        )
        .with_scale(self.scale)
        .with_scale_precision(self.scale_precision)
        .with_mean(mean)
        .with_kivi(self.group, self.axis);
        Ok(Part {
            channels,
            batch: spec.build()?.new_batch(),
        })
    }
}

impl Store {
    /// A stream for `spec.dim`-dimensional rows. A split precision needs its outlier channels.
    pub(crate) fn new(spec: &StreamSpec<'_>) -> Result<Self> {
        let dim = spec.dim;
        if let Some(m) = spec.mean
            && m.len() != dim
        {
            return Err(Error::Shape {
                what: "mean",
                expected: dim,
                got: m.len(),
            });
        }
        spec.precision.validate(dim)?;
        let parts = match spec.precision {
            Precision::Uniform(bits) => vec![spec.part(bits, 0, None)?],
            Precision::Split {
                outlier_bits,
                outlier_channels,
                regular_bits,
            } => {
                let out = spec.outliers.ok_or_else(|| Error::InvalidChannels {
                    reason: "a split precision needs its outlier channels (calibrate or give them)"
                        .into(),
                })?;
                check_channels(out, dim, outlier_channels)?;
                let regular: Vec<usize> =
                    (0..dim).filter(|c| out.binary_search(c).is_err()).collect();
                vec![
                    spec.part(outlier_bits, 0, Some(out.to_vec()))?,
                    spec.part(regular_bits, 1, Some(regular))?,
                ]
            }
        };
        Ok(Self { dim, parts })
    }

    pub(crate) fn len(&self) -> usize {
        self.parts[0].batch.len()
    }

    /// Leading rows whose decoded values are final: all rows but those a part keeps pending
    /// (KIVI's residual, re-encoded when its group fills).
    pub(crate) fn settled_len(&self) -> usize {
        let pending = self.parts.iter().map(|p| p.batch.pending_len()).max();
        self.len() - pending.unwrap_or(0)
    }

    /// Exact bytes stored by every part (rows a part keeps unquantized at their stored width).
    pub(crate) fn stored_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.batch.stored_bytes()).sum()
    }

    /// The full-dimension mean of a centred stream (gathered back from its parts).
    pub(crate) fn mean(&self) -> Option<Vec<f32>> {
        let mut out = vec![0.0f32; self.dim];
        for p in &self.parts {
            let m = p.batch.mean()?;
            match &p.channels {
                None => out.copy_from_slice(m),
                Some(ch) => ch.iter().zip(m).for_each(|(&c, &v)| out[c] = v),
            }
        }
        Some(out)
    }

    /// Outlier channels of a split stream.
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

    /// Checks row-major rows as [`Store::extend`] would (every part), changing nothing.
    pub(crate) fn check_rows(&self, xs: &[f32]) -> Result<()> {
        for p in &self.parts {
            p.batch
                .check_rows(&Self::gather(&p.channels, xs, self.dim))?;
        }
        Ok(())
    }

    /// Appends row-major rows (trusted: finite, a multiple of `dim`).
    pub(crate) fn extend(&mut self, xs: &[f32]) -> Result<()> {
        for p in &mut self.parts {
            let sub = Self::gather(&p.channels, xs, self.dim);
            p.batch.extend(&sub)?;
        }
        Ok(())
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        for p in &mut self.parts {
            p.batch.truncate(n);
        }
    }

    /// Every part's rows ([`EncodedVectors::ahead`]), for a scan of another store of as many rows
    /// to ask for as it goes (the keys' scan asking for the values). O(parts).
    pub(crate) fn ahead(&self) -> Ahead<'_> {
        match &self.parts[..] {
            [one] => one.batch.ahead(),
            parts => parts
                .iter()
                .fold(Ahead::over(self.len()), |a, p| a.and(&p.batch.ahead())),
        }
    }

    /// Prepares a (trusted) query against every part.
    pub(crate) fn prepare(&self, q: &[f32]) -> Result<Vec<AnyQuery>> {
        self.parts
            .iter()
            .map(|p| {
                Ok(p.batch
                    .encode_query(&Self::gather(&p.channels, q, self.dim))?)
            })
            .collect()
    }

    /// `out[t] = ⟨q, k̃_t⟩` for every stored row, summed over the parts.
    pub(crate) fn scores(&self, queries: &[AnyQuery], out: &mut [f32], fast: bool) -> Result<()> {
        let mut tmp = if self.parts.len() > 1 {
            vec![0.0f32; out.len()]
        } else {
            Vec::new()
        };
        for (i, (p, q)) in self.parts.iter().zip(queries).enumerate() {
            let dst: &mut [f32] = if i == 0 { out } else { &mut tmp };
            if fast {
                p.batch.score_into(q, dst)?;
            } else {
                p.batch.score_exact_into(q, dst)?;
            }
            if i > 0 {
                for (o, t) in out.iter_mut().zip(&tmp) {
                    *o += t;
                }
            }
        }
        Ok(())
    }

    /// [`Store::scores`] for several prepared queries (`outs[i]` for `queries[i]`): each part
    /// scores all of them in one call, so kinds that share a pass over the codes between queries
    /// (MSE on the fast path: tables at 1, 2 and 4 bits or byte dots at 4, integer dots at 5-8)
    /// do. On the fast path the first part's scan asks for `ahead`'s rows as it walks its own
    /// ([`EncodedVectors::score_many_ahead`]); the exact path ignores it.
    pub(crate) fn scores_many(
        &self,
        queries: &[Vec<AnyQuery>],
        outs: &mut [&mut [f32]],
        fast: bool,
        ahead: Ahead<'_>,
    ) -> Result<()> {
        if !fast || queries.is_empty() {
            for (q, o) in queries.iter().zip(outs.iter_mut()) {
                self.scores(q, o, fast)?;
            }
            return Ok(());
        }
        let n = outs.first().map_or(0, |o| o.len());
        let mut tmp = if self.parts.len() > 1 {
            vec![vec![0.0f32; n]; queries.len()]
        } else {
            Vec::new()
        };
        for (i, p) in self.parts.iter().enumerate() {
            let qs: Vec<&AnyQuery> = queries.iter().map(|q| &q[i]).collect();
            if i == 0 {
                p.batch.score_many_ahead(&qs, outs, ahead)?;
            } else {
                let mut refs: Vec<&mut [f32]> = tmp.iter_mut().map(Vec::as_mut_slice).collect();
                p.batch.score_many_into(&qs, &mut refs)?;
                for (o, t) in outs.iter_mut().zip(&tmp) {
                    o.iter_mut().zip(t).for_each(|(o, t)| *o += t);
                }
            }
        }
        Ok(())
    }

    /// `outs[q] += Σ_t weights[q][t] · ṽ_t` for every weight vector, part by part (each part's
    /// batch sums its own rows: MSE in the rotated domain, one inverse rotation per vector; with
    /// `fast`, MSE and grouped-MSE parts on integer sums).
    pub(crate) fn weighted_sums_into(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
        fast: bool,
    ) -> Result<()> {
        for p in &self.parts {
            let k = p.batch.dim();
            let mut parts = vec![vec![0.0f32; k]; weights.len()];
            {
                let mut refs: Vec<&mut [f32]> = parts.iter_mut().map(Vec::as_mut_slice).collect();
                if fast {
                    p.batch.weighted_sums_fast_into(weights, &mut refs)?;
                } else {
                    p.batch.weighted_sums_into(weights, &mut refs)?;
                }
            }
            for (part, out) in parts.iter().zip(outs.iter_mut()) {
                match &p.channels {
                    None => out.iter_mut().zip(part).for_each(|(o, v)| *o += v),
                    Some(ch) => ch.iter().zip(part).for_each(|(&c, v)| out[c] += v),
                }
            }
        }
        Ok(())
    }

    /// Each part's batch as a saved tq-batch (safetensors bytes).
    pub(crate) fn to_blobs(&self) -> Result<Vec<Vec<u8>>> {
        self.parts
            .iter()
            .map(|p| Ok(p.batch.to_safetensors()?))
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
            let saved = AnyBatch::from_safetensors(blob)?;
            if !p.batch.quantizer().same_config(&saved.quantizer()) {
                return Err(bad(
                    "a stored part's quantizer differs from the cache configuration".into(),
                ));
            }
            let len = saved.len();
            if *rows.get_or_insert(len) != len {
                return Err(bad("parts hold different numbers of rows".into()));
            }
            p.batch = saved;
        }
        Ok(())
    }

    /// Decodes row `i` into `out` (`dim` values).
    pub(crate) fn reconstruct(&self, i: usize, out: &mut [f32]) -> Result<()> {
        for p in &self.parts {
            let mut part = vec![0.0f32; p.batch.dim()];
            p.batch.dequantize_row(i, &mut part)?;
            match &p.channels {
                None => out.copy_from_slice(&part),
                Some(ch) => ch.iter().zip(&part).for_each(|(&c, &v)| out[c] = v),
            }
        }
        Ok(())
    }
}
