//! A decoding sequence with an exact or a TurboQuant-compressed KV cache.
//!
//! Exact: each step's `present` key-values are fed back as the next past. Quantized: after each
//! step only the new tokens' keys and values are quantized into a [`ModelCache`] (the cache holds
//! codes), and the rows that changed (the new tokens, tokens that left the full-precision window,
//! and KIVI key groups that filled: everything past [`tq_kv::HeadCache::settled_len`]) are
//! decoded from their codes into the float past fed to the next step. tract still
//! runs float attention over that past; what is quantized is the cache's storage and so its
//! information.

use tq_kv::{HeadCalibration, HeadConfig, ModelCache, MultiHeadCache, OutlierChoice};
use tract_onnx::prelude::*;

use crate::error::tract;
use crate::runner::{Decoder, KvTensors, StepOutput, plain_f32};
use crate::{Error, Result};

/// How the KV cache is stored.
#[derive(Debug, Clone)]
pub enum CacheSpec {
    /// Float key-values as the model produces them.
    Exact,
    /// TurboQuant codes: `config` for every head, `calibration[layer][kv_head]` its outlier
    /// channels and means (empty when no precision is split and nothing is centred).
    Quantized {
        /// Per-head configuration.
        config: HeadConfig,
        /// Per-layer, per-kv-head calibration, or empty.
        calibration: Vec<Vec<HeadCalibration>>,
    },
}

/// Calibrates every layer's and kv head's outlier channels and means for `config` from the exact
/// key-values of `ids` (one prefill step); empty when `config` needs none
/// ([`HeadCalibration::needed`]).
///
/// # Errors
/// Step errors; [`Error::Kv`] when a channel list does not fit the head dimension or a split
/// precision meets [`OutlierChoice::None`].
pub fn calibrate(
    decoder: &Decoder,
    ids: &[u32],
    config: &HeadConfig,
    choice: &OutlierChoice,
) -> Result<Vec<Vec<HeadCalibration>>> {
    if !HeadCalibration::needed(config) {
        return Ok(Vec::new());
    }
    let out = decoder.step(ids, &decoder.empty_past()?)?;
    let (d, t) = (decoder.head_dim(), ids.len());
    (0..decoder.layers())
        .map(|l| {
            let (k, v) = (out.present.keys_of(l)?, out.present.values_of(l)?);
            (0..decoder.kv_heads())
                .map(|h| {
                    let r = h * t * d..(h + 1) * t * d;
                    Ok(HeadCalibration::from_samples(
                        config,
                        &k[r.clone()],
                        &v[r],
                        choice,
                    )?)
                })
                .collect()
        })
        .collect()
}

/// One sequence being decoded: its past and, when quantized, the code cache behind it.
#[derive(Debug)]
pub struct Sequence<'a> {
    decoder: &'a Decoder,
    past: KvTensors,
    quant: Option<ModelCache>,
}

impl<'a> Sequence<'a> {
    /// An empty sequence with the given cache.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the calibration does not cover every layer and kv head;
    /// cache construction errors (e.g. a head dimension the precision cannot split).
    pub fn new(decoder: &'a Decoder, spec: &CacheSpec) -> Result<Self> {
        let quant = match spec {
            CacheSpec::Exact => None,
            CacheSpec::Quantized {
                config,
                calibration,
            } => {
                if config.head_dim != decoder.head_dim() {
                    return Err(Error::InvalidArgument(format!(
                        "cache head_dim {} differs from the model's {}",
                        config.head_dim,
                        decoder.head_dim()
                    )));
                }
                let (layers, kv) = (decoder.layers(), decoder.kv_heads());
                if !calibration.is_empty()
                    && (calibration.len() != layers || calibration.iter().any(|c| c.len() != kv))
                {
                    return Err(Error::InvalidArgument(format!(
                        "the calibration must cover {layers} layers x {kv} kv heads"
                    )));
                }
                if calibration.is_empty() && HeadCalibration::needed(config) {
                    return Err(Error::InvalidArgument(
                        "split precisions and centring need a calibration (see `calibrate`)".into(),
                    ));
                }
                let q_heads = decoder.config().q_heads;
                let layers = (0..layers)
                    .map(|l| {
                        let cal: &[HeadCalibration] =
                            calibration.get(l).map(Vec::as_slice).unwrap_or(&[]);
                        MultiHeadCache::new(q_heads, kv, config, cal)
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Some(ModelCache::from_layers(layers))
            }
        };
        Ok(Self {
            decoder,
            past: decoder.empty_past()?,
            quant,
        })
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.past.len()
    }

    /// `true` before the first step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float past the next step sees (decoded from codes when quantized).
    pub fn past(&self) -> &KvTensors {
        &self.past
    }

    /// The code cache behind a quantized sequence (`None` when exact).
    pub fn cache(&self) -> Option<&ModelCache> {
        self.quant.as_ref()
    }

    /// Bytes the cache stores: codes and scalars when quantized, f32 key-values when exact.
    pub fn kv_bytes(&self) -> usize {
        match &self.quant {
            Some(c) => c.memory_bytes(),
            None => self.f16_bytes() * 2,
        }
    }

    /// Bytes of the same key-values in f16 (the usual storage of an unquantized cache).
    pub fn f16_bytes(&self) -> usize {
        2 * 2
            * self.decoder.layers()
            * self.decoder.kv_heads()
            * self.len()
            * self.decoder.head_dim()
    }

    /// Runs one step on `ids` and updates the cache; returns the step's logits (of the last new
    /// token) and queries.
    ///
    /// # Errors
    /// As [`Decoder::step`]; cache errors.
    pub fn feed(&mut self, ids: &[u32]) -> Result<StepOutput> {
        let mut out = self.decoder.step(ids, &self.past)?;
        if let Some(cache) = &mut self.quant {
            let (d, kv) = (self.decoder.head_dim(), self.decoder.kv_heads());
            let (p, s) = (self.past.len(), ids.len());
            let total = p + s;
            for l in 0..self.decoder.layers() {
                let layer = cache
                    .layer_mut(l)
                    .ok_or_else(|| Error::InvalidArgument(format!("layer {l}")))?;
                let starts: Vec<usize> = (0..kv)
                    .map(|h| layer.head(h).map(|c| c.settled_len()).unwrap_or(0))
                    .collect();
                let new = |t: &Tensor| -> Result<Vec<f32>> {
                    let all = plain_f32(t)?;
                    Ok((0..kv)
                        .flat_map(|h| {
                            all[(h * total + p) * d..(h + 1) * total * d]
                                .iter()
                                .copied()
                        })
                        .collect())
                };
                let (nk, nv) = (new(&out.present.keys[l])?, new(&out.present.values[l])?);
                layer.append(&nk, &nv)?;
                // Write the decoded rows that changed back into the float past.
                for (tensor, is_key) in [
                    (&mut out.present.keys[l], true),
                    (&mut out.present.values[l], false),
                ] {
                    let mut owned =
                        std::mem::replace(tensor, Tensor::default().into_tvalue()).into_tensor();
                    {
                        let mut view = owned.try_as_plain_ram_mut().map_err(tract("cache rows"))?;
                        let rows = view.as_slice_mut::<f32>().map_err(tract("cache rows"))?;
                        for (h, &start) in starts.iter().enumerate() {
                            let head = layer
                                .head(h)
                                .ok_or_else(|| Error::InvalidArgument(format!("kv head {h}")))?;
                            let decoded = if is_key {
                                head.keys_from(start)?
                            } else {
                                head.values_from(start)?
                            };
                            let at = (h * total + start) * d;
                            rows[at..at + decoded.len()].copy_from_slice(&decoded);
                        }
                    }
                    *tensor = owned.into_tvalue();
                }
            }
        }
        self.past = out.present.clone();
        Ok(out)
    }
}
