//! The quantizer kinds chosen at run time: [`QuantizerKind`], [`QuantizerSpec`] (everything a
//! consumer chooses, built in one place), and the enums [`AnyQuantizer`], [`AnyBatch`] and
//! [`AnyQuery`] over the concrete kinds. The dispatch over kinds is written here once; every
//! consumer (tq-kv's streams, tq-gpu, tq-bench, saved files) holds these types.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tq_core::RotationKind;
use tq_core::prefetch::Ahead;

use crate::encoded::EncodedVectors;
use crate::gmse::{GroupMseBatch, GroupMseConfig, GroupMseQuantizer, GroupMseQuery};
use crate::kivi::{KiviAxis, KiviBatch, KiviConfig, KiviQuantizer, KiviQuery};
use crate::polar::PolarQuery;
use crate::score::Hit;
use crate::{
    Error, MseBatch, MseConfig, MseQuantizer, MseQuery, PolarBatch, PolarConfig, PolarQuantizer,
    ProdBatch, ProdConfig, ProdQuantizer, ProdQuery, Result, ScaleMode, ScalePrecision, SketchKind,
};

/// The quantizers a batch can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuantizerKind {
    /// `TurboQuant_mse`: lowest reconstruction error; inner products shrink slightly.
    #[default]
    Mse,
    /// `TurboQuant_prod`: unbiased inner products (`b - 1` MSE bits plus QJL signs).
    Prod,
    /// PolarQuant (experimental): level bits `b, b/2, b/2, b/2` for a width `b` unless given;
    /// the dimension must be a multiple of 16 (of `2^levels`).
    Polar,
    /// KIVI: asymmetric uniform levels with an f16 scale and zero per group of `G` (per channel
    /// over tokens for keys, per token over channels for values).
    Kivi,
    /// Group-centred TurboQuant_mse: each group of `G` rows loses its per-channel means (f16),
    /// then TurboQuant_mse codes what is left ([`crate::gmse`]).
    Gmse,
}

impl QuantizerKind {
    /// Lower-case name (`mse`, `prod`, `polar`, `kivi`, `gmse`): the `kind` of saved batches and
    /// of reports.
    pub fn name(self) -> &'static str {
        match self {
            QuantizerKind::Mse => "mse",
            QuantizerKind::Prod => "prod",
            QuantizerKind::Polar => "polar",
            QuantizerKind::Kivi => "kivi",
            QuantizerKind::Gmse => "gmse",
        }
    }
}

impl std::fmt::Display for QuantizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantizerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mse" => Ok(Self::Mse),
            "prod" => Ok(Self::Prod),
            "polar" => Ok(Self::Polar),
            "kivi" => Ok(Self::Kivi),
            "gmse" => Ok(Self::Gmse),
            other => Err(format!(
                "unknown quantizer '{other}' (expected mse, prod, polar, kivi or gmse)"
            )),
        }
    }
}

/// The default KIVI group size `G` (KIVI's own choice for keys; 16-128 in powers of two work).
pub const DEFAULT_KIVI_GROUP: usize = 32;

/// PolarQuant level bits for a nominal width `b`: `b, max(1, b/2), max(1, b/2), max(1, b/2)` (4
/// gives the paper's 4,2,2,2).
pub fn polar_levels_for(bits: u32) -> Vec<u32> {
    let rest = (bits / 2).max(1);
    vec![bits, rest, rest, rest]
}

/// Everything that chooses a quantizer at run time. Options that do not apply to the kind are
/// ignored (`scale` and `mean` apply to MSE, `scale` and `group` to gmse, `sketch` to Prod,
/// `polar_levels` to Polar, `group` and `axis` to KIVI), except `mean`, which is refused for other kinds (a centred Prod, Polar or
/// KIVI quantizer does not exist).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizerSpec {
    /// The kind.
    pub kind: QuantizerKind,
    /// Vector dimension.
    pub dim: usize,
    /// Bits per coordinate (for Polar, the level-1 width of [`polar_levels_for`]).
    pub bits: u32,
    /// The random rotation.
    pub rotation: RotationKind,
    /// Seed of every random choice.
    pub seed: u64,
    /// MSE and gmse: the per-vector scalar.
    pub scale: ScaleMode,
    /// MSE: the stored width of that scalar (the other kinds store their own scalars and ignore
    /// it).
    pub scale_precision: ScalePrecision,
    /// Prod: how the QJL matrix is drawn.
    pub sketch: SketchKind,
    /// MSE: a calibrated mean to centre on (`dim` finite values).
    pub mean: Option<Vec<f32>>,
    /// Polar: explicit level bits (overrides [`polar_levels_for`]).
    pub polar_levels: Option<Vec<u32>>,
    /// KIVI and gmse: the group size `G` (default 32).
    pub group: usize,
    /// KIVI: the grouping axis (default per channel, KIVI's keys).
    pub axis: KiviAxis,
}

impl QuantizerSpec {
    /// A spec with the default scale (norm), sketch (Gaussian), no mean and default Polar levels.
    pub fn new(
        kind: QuantizerKind,
        dim: usize,
        bits: u32,
        rotation: RotationKind,
        seed: u64,
    ) -> Self {
        Self {
            kind,
            dim,
            bits,
            rotation,
            seed,
            scale: ScaleMode::default(),
            scale_precision: ScalePrecision::default(),
            sketch: SketchKind::default(),
            mean: None,
            polar_levels: None,
            group: DEFAULT_KIVI_GROUP,
            axis: KiviAxis::Channel,
        }
    }

    /// With this MSE scale.
    pub fn with_scale(mut self, scale: ScaleMode) -> Self {
        self.scale = scale;
        self
    }

    /// With this MSE scale width.
    pub fn with_scale_precision(mut self, precision: ScalePrecision) -> Self {
        self.scale_precision = precision;
        self
    }

    /// With this Prod sketch.
    pub fn with_sketch(mut self, sketch: SketchKind) -> Self {
        self.sketch = sketch;
        self
    }

    /// Centred on `mean` (MSE only).
    pub fn with_mean(mut self, mean: Option<Vec<f32>>) -> Self {
        self.mean = mean;
        self
    }

    /// With explicit Polar level bits.
    pub fn with_polar_levels(mut self, levels: Option<Vec<u32>>) -> Self {
        self.polar_levels = levels;
        self
    }

    /// With this group size (KIVI and gmse) and axis (KIVI).
    pub fn with_kivi(mut self, group: usize, axis: KiviAxis) -> Self {
        self.group = group;
        self.axis = axis;
        self
    }

    /// Builds the quantizer: O(d³) once per distinct dense `(d, seed)`, O(d log d) for Hadamard.
    ///
    /// # Errors
    /// The kind's configuration errors; [`Error::ConfigMismatch`] for a mean on a kind other than
    /// MSE.
    pub fn build(&self) -> Result<AnyQuantizer> {
        if self.mean.is_some() && self.kind != QuantizerKind::Mse {
            return Err(Error::ConfigMismatch(format!(
                "centring on a mean applies to mse quantizers, not {}",
                self.kind
            )));
        }
        Ok(match self.kind {
            QuantizerKind::Mse => {
                let cfg = MseConfig::new(self.dim, self.bits, self.rotation, self.seed)
                    .with_scale(self.scale)
                    .with_scale_precision(self.scale_precision);
                AnyQuantizer::Mse(Arc::new(match &self.mean {
                    Some(m) => MseQuantizer::with_mean(cfg, m.clone())?,
                    None => MseQuantizer::new(cfg)?,
                }))
            }
            QuantizerKind::Prod => AnyQuantizer::Prod(Arc::new(ProdQuantizer::new(ProdConfig {
                dim: self.dim,
                bits: self.bits,
                rotation: self.rotation,
                sketch: self.sketch,
                seed: self.seed,
            })?)),
            QuantizerKind::Polar => {
                let level_bits = self
                    .polar_levels
                    .clone()
                    .unwrap_or_else(|| polar_levels_for(self.bits));
                AnyQuantizer::Polar(Arc::new(PolarQuantizer::new(PolarConfig {
                    dim: self.dim,
                    level_bits,
                    rotation: self.rotation,
                    seed: self.seed,
                })?))
            }
            QuantizerKind::Kivi => AnyQuantizer::Kivi(Arc::new(KiviQuantizer::new(KiviConfig {
                dim: self.dim,
                bits: self.bits,
                group: self.group,
                axis: self.axis,
            })?)),
            QuantizerKind::Gmse => {
                AnyQuantizer::Gmse(Arc::new(GroupMseQuantizer::new(GroupMseConfig {
                    dim: self.dim,
                    bits: self.bits,
                    rotation: self.rotation,
                    seed: self.seed,
                    scale: self.scale,
                    group: self.group,
                })?))
            }
        })
    }
}

/// A shared quantizer of any kind.
#[derive(Debug, Clone)]
pub enum AnyQuantizer {
    /// `TurboQuant_mse`.
    Mse(Arc<MseQuantizer>),
    /// `TurboQuant_prod`.
    Prod(Arc<ProdQuantizer>),
    /// PolarQuant (experimental).
    Polar(Arc<PolarQuantizer>),
    /// KIVI.
    Kivi(Arc<KiviQuantizer>),
    /// Group-centred TurboQuant_mse.
    Gmse(Arc<GroupMseQuantizer>),
}

impl AnyQuantizer {
    /// The kind.
    pub fn kind(&self) -> QuantizerKind {
        match self {
            AnyQuantizer::Mse(_) => QuantizerKind::Mse,
            AnyQuantizer::Prod(_) => QuantizerKind::Prod,
            AnyQuantizer::Polar(_) => QuantizerKind::Polar,
            AnyQuantizer::Kivi(_) => QuantizerKind::Kivi,
            AnyQuantizer::Gmse(_) => QuantizerKind::Gmse,
        }
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        match self {
            AnyQuantizer::Mse(q) => q.dim(),
            AnyQuantizer::Prod(q) => q.dim(),
            AnyQuantizer::Polar(q) => q.dim(),
            AnyQuantizer::Kivi(q) => q.dim(),
            AnyQuantizer::Gmse(q) => q.dim(),
        }
    }

    /// Stored bytes per vector (codes and scalars).
    pub fn bytes_per_vector(&self) -> usize {
        match self {
            AnyQuantizer::Mse(q) => q.bytes_per_vector(),
            AnyQuantizer::Prod(q) => q.bytes_per_vector(),
            AnyQuantizer::Polar(q) => q.bytes_per_vector(),
            AnyQuantizer::Kivi(q) => q.bytes_per_vector(),
            AnyQuantizer::Gmse(q) => q.bytes_per_vector(),
        }
    }

    /// The calibrated mean of a centred MSE quantizer.
    pub fn mean(&self) -> Option<&[f32]> {
        match self {
            AnyQuantizer::Mse(q) => q.mean(),
            _ => None,
        }
    }

    /// An empty batch of this quantizer.
    pub fn new_batch(&self) -> AnyBatch {
        match self {
            AnyQuantizer::Mse(q) => AnyBatch::Mse(MseBatch::new(q.clone())),
            AnyQuantizer::Prod(q) => AnyBatch::Prod(ProdBatch::new(q.clone())),
            AnyQuantizer::Polar(q) => AnyBatch::Polar(PolarBatch::new(q.clone())),
            AnyQuantizer::Kivi(q) => AnyBatch::Kivi(KiviBatch::new(q.clone())),
            AnyQuantizer::Gmse(q) => AnyBatch::Gmse(GroupMseBatch::new(q.clone())),
        }
    }

    /// Prepares a query (`dim` finite floats).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`].
    pub fn prepare_query(&self, q: &[f32]) -> Result<AnyQuery> {
        Ok(match self {
            AnyQuantizer::Mse(m) => AnyQuery::Mse(m.prepare_query(q)?),
            AnyQuantizer::Prod(m) => AnyQuery::Prod(m.prepare_query(q)?),
            AnyQuantizer::Polar(m) => AnyQuery::Polar(m.prepare_query(q)?),
            AnyQuantizer::Kivi(m) => AnyQuery::Kivi(m.prepare_query(q)?),
            AnyQuantizer::Gmse(m) => AnyQuery::Gmse(m.prepare_query(q)?),
        })
    }

    /// `true` when both are the same kind with equal configurations (so their codes are
    /// interchangeable; a centred MSE quantizer's mean is part of its batch's data).
    pub fn same_config(&self, other: &AnyQuantizer) -> bool {
        match (self, other) {
            (AnyQuantizer::Mse(a), AnyQuantizer::Mse(b)) => a.config() == b.config(),
            (AnyQuantizer::Prod(a), AnyQuantizer::Prod(b)) => a.config() == b.config(),
            (AnyQuantizer::Polar(a), AnyQuantizer::Polar(b)) => a.config() == b.config(),
            (AnyQuantizer::Kivi(a), AnyQuantizer::Kivi(b)) => a.config() == b.config(),
            (AnyQuantizer::Gmse(a), AnyQuantizer::Gmse(b)) => a.config() == b.config(),
            _ => false,
        }
    }
}

/// A query prepared against an [`AnyQuantizer`].
#[derive(Debug, Clone)]
pub enum AnyQuery {
    /// For an MSE batch.
    Mse(MseQuery),
    /// For a Prod batch.
    Prod(ProdQuery),
    /// For a Polar batch.
    Polar(PolarQuery),
    /// For a KIVI batch.
    Kivi(KiviQuery),
    /// For a gmse batch.
    Gmse(GroupMseQuery),
}

impl AnyQuery {
    fn kind(&self) -> QuantizerKind {
        match self {
            AnyQuery::Mse(_) => QuantizerKind::Mse,
            AnyQuery::Prod(_) => QuantizerKind::Prod,
            AnyQuery::Polar(_) => QuantizerKind::Polar,
            AnyQuery::Kivi(_) => QuantizerKind::Kivi,
            AnyQuery::Gmse(_) => QuantizerKind::Gmse,
        }
    }
}

/// A batch of any kind: what a saved tq-batch file holds ([`crate::io`]) and what consumers keep
/// when the kind is chosen at run time. Implements [`EncodedVectors`] by dispatch.
#[derive(Debug, Clone)]
pub enum AnyBatch {
    /// A `TurboQuant_mse` batch.
    Mse(MseBatch),
    /// A `TurboQuant_prod` batch.
    Prod(ProdBatch),
    /// A PolarQuant batch (experimental).
    Polar(PolarBatch),
    /// A KIVI batch.
    Kivi(KiviBatch),
    /// A group-centred TurboQuant_mse batch.
    Gmse(GroupMseBatch),
}

/// Applies `$body` to the batch inside any variant.
macro_rules! each {
    ($batch:expr, $b:ident => $body:expr) => {
        match $batch {
            AnyBatch::Mse($b) => $body,
            AnyBatch::Prod($b) => $body,
            AnyBatch::Polar($b) => $body,
            AnyBatch::Kivi($b) => $body,
            AnyBatch::Gmse($b) => $body,
        }
    };
}

/// Applies `$body` to a batch and a query of the same kind; a query of another kind is an error.
macro_rules! paired {
    ($batch:expr, $query:expr, ($b:ident, $q:ident) => $body:expr) => {
        match ($batch, $query) {
            (AnyBatch::Mse($b), AnyQuery::Mse($q)) => $body,
            (AnyBatch::Prod($b), AnyQuery::Prod($q)) => $body,
            (AnyBatch::Polar($b), AnyQuery::Polar($q)) => $body,
            (AnyBatch::Kivi($b), AnyQuery::Kivi($q)) => $body,
            (AnyBatch::Gmse($b), AnyQuery::Gmse($q)) => $body,
            (b, q) => Err(kind_mismatch(b.kind(), q.kind())),
        }
    };
}

/// The queries of `qs` that `pick` accepts (one kind), if it accepts every one.
fn queries_of<'a, T>(
    qs: &[&'a AnyQuery],
    pick: impl Fn(&'a AnyQuery) -> Option<&'a T>,
) -> Option<Vec<&'a T>> {
    qs.iter().map(|&q| pick(q)).collect()
}

/// The MSE query inside `q`.
fn as_mse(q: &AnyQuery) -> Option<&MseQuery> {
    match q {
        AnyQuery::Mse(q) => Some(q),
        _ => None,
    }
}

/// The KIVI query inside `q`.
fn as_kivi(q: &AnyQuery) -> Option<&KiviQuery> {
    match q {
        AnyQuery::Kivi(q) => Some(q),
        _ => None,
    }
}

fn kind_mismatch(batch: QuantizerKind, query: QuantizerKind) -> Error {
    Error::ConfigMismatch(format!(
        "a query prepared for a {query} batch was given to a {batch} batch"
    ))
}

impl AnyBatch {
    /// The kind.
    pub fn kind(&self) -> QuantizerKind {
        match self {
            AnyBatch::Mse(_) => QuantizerKind::Mse,
            AnyBatch::Prod(_) => QuantizerKind::Prod,
            AnyBatch::Polar(_) => QuantizerKind::Polar,
            AnyBatch::Kivi(_) => QuantizerKind::Kivi,
            AnyBatch::Gmse(_) => QuantizerKind::Gmse,
        }
    }

    /// The batch's quantizer (a shared handle).
    pub fn quantizer(&self) -> AnyQuantizer {
        match self {
            AnyBatch::Mse(b) => AnyQuantizer::Mse(b.quantizer().clone()),
            AnyBatch::Prod(b) => AnyQuantizer::Prod(b.quantizer().clone()),
            AnyBatch::Polar(b) => AnyQuantizer::Polar(b.quantizer().clone()),
            AnyBatch::Kivi(b) => AnyQuantizer::Kivi(b.quantizer().clone()),
            AnyBatch::Gmse(b) => AnyQuantizer::Gmse(b.quantizer().clone()),
        }
    }

    /// The calibrated mean of a centred MSE batch.
    pub fn mean(&self) -> Option<&[f32]> {
        match self {
            AnyBatch::Mse(b) => b.quantizer().mean(),
            _ => None,
        }
    }
}

impl From<MseBatch> for AnyBatch {
    fn from(b: MseBatch) -> Self {
        AnyBatch::Mse(b)
    }
}

impl From<ProdBatch> for AnyBatch {
    fn from(b: ProdBatch) -> Self {
        AnyBatch::Prod(b)
    }
}

impl From<GroupMseBatch> for AnyBatch {
    fn from(b: GroupMseBatch) -> Self {
        AnyBatch::Gmse(b)
    }
}

impl From<KiviBatch> for AnyBatch {
    fn from(b: KiviBatch) -> Self {
        AnyBatch::Kivi(b)
    }
}

impl From<PolarBatch> for AnyBatch {
    fn from(b: PolarBatch) -> Self {
        AnyBatch::Polar(b)
    }
}

impl EncodedVectors for AnyBatch {
    type Query = AnyQuery;
    fn dim(&self) -> usize {
        each!(self, b => EncodedVectors::dim(b))
    }
    fn len(&self) -> usize {
        each!(self, b => b.len())
    }
    fn bytes_per_vector(&self) -> usize {
        each!(self, b => b.bytes_per_vector())
    }
    fn memory_bytes(&self) -> usize {
        each!(self, b => b.memory_bytes())
    }
    fn stored_bytes(&self) -> usize {
        each!(self, b => EncodedVectors::stored_bytes(b))
    }
    fn pending_len(&self) -> usize {
        each!(self, b => EncodedVectors::pending_len(b))
    }
    fn check_rows(&self, xs: &[f32]) -> Result<()> {
        each!(self, b => EncodedVectors::check_rows(b, xs))
    }
    fn extend(&mut self, xs: &[f32]) -> Result<()> {
        each!(self, b => b.extend(xs))
    }
    fn truncate(&mut self, n: usize) {
        each!(self, b => b.truncate(n))
    }
    fn encode_query(&self, q: &[f32]) -> Result<AnyQuery> {
        self.quantizer().prepare_query(q)
    }
    fn score_into(&self, q: &AnyQuery, out: &mut [f32]) -> Result<()> {
        paired!(self, q, (b, q) => EncodedVectors::score_into(b, q, out))
    }
    fn score_exact_into(&self, q: &AnyQuery, out: &mut [f32]) -> Result<()> {
        paired!(self, q, (b, q) => EncodedVectors::score_exact_into(b, q, out))
    }
    fn top_k(&self, q: &AnyQuery, k: usize) -> Result<Vec<Hit>> {
        paired!(self, q, (b, q) => EncodedVectors::top_k(b, q, k))
    }
    fn top_k_many(&self, qs: &[&AnyQuery], k: usize) -> Result<Vec<Vec<Hit>>> {
        if let (AnyBatch::Mse(b), Some(mse)) = (self, queries_of(qs, as_mse)) {
            return Ok(b.top_k_many(&mse, k));
        }
        qs.iter().map(|q| self.top_k(q, k)).collect()
    }
    fn score_many_into(&self, qs: &[&AnyQuery], outs: &mut [&mut [f32]]) -> Result<()> {
        self.score_many_ahead(qs, outs, Ahead::NONE)
    }
    fn score_many_ahead(
        &self,
        qs: &[&AnyQuery],
        outs: &mut [&mut [f32]],
        ahead: Ahead<'_>,
    ) -> Result<()> {
        if let (AnyBatch::Mse(b), Some(mse)) = (self, queries_of(qs, as_mse)) {
            return b.score_many_ahead(&mse, outs, ahead);
        }
        if let (AnyBatch::Kivi(b), Some(kivi)) = (self, queries_of(qs, as_kivi)) {
            return b.score_many_into(&kivi, outs);
        }
        crate::error::check_len("score outputs", outs.len(), qs.len())?;
        qs.iter()
            .zip(outs.iter_mut())
            .try_for_each(|(q, o)| self.score_into(q, o))
    }
    fn ahead(&self) -> Ahead<'_> {
        each!(self, b => EncodedVectors::ahead(b))
    }
    fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        each!(self, b => b.dequantize_row(i, out))
    }
    fn dequantize_all(&self) -> Vec<f32> {
        each!(self, b => EncodedVectors::dequantize_all(b))
    }
    fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        each!(self, b => EncodedVectors::weighted_sums_into(b, weights, outs))
    }
    fn weighted_sums_fast_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        each!(self, b => EncodedVectors::weighted_sums_fast_into(b, weights, outs))
    }
    fn to_safetensors(&self) -> Result<Vec<u8>> {
        each!(self, b => b.to_safetensors())
    }
}
