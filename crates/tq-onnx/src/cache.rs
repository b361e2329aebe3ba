//! A decoding sequence with an exact or a TurboQuant-compressed KV cache.
//!
//! Exact: each step's `present` key-values are fed back as the next past. Quantized: after each
//! step only the new tokens' keys and values are quantized into a [`ModelCache`] (the cache holds
//! codes), and the rows that changed (the new tokens, tokens that left the full-precision window,
//! and KIVI key groups that filled: everything past [`tq_kv::HeadCache::settled_len`]) are
//! decoded from their codes into the float past fed to the next step. tract still
//! runs float attention over that past; what is quantized is the cache's storage and so its
//! information. On a native decoder ([`Attention::Native`]) the cache is all there is: each step
//! attends on it ([`crate::native`]), and an exact sequence keeps every token in f32.

use tq_kv::{HeadCalibration, HeadConfig, ModelCache, OutlierChoice};
use tract_onnx::prelude::*;

use crate::error::tract;
use crate::runner::{Attention, Decoder, KvTensors, StepOutput, plain_f32};
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
    let (d, t) = (decoder.head_dim(), ids.len());
    // Each layer's exact keys and values of `ids`, `[kv_heads, t, d]`.
    let layers: Vec<(Vec<f32>, Vec<f32>)> = match decoder.attention() {
        Attention::Float => {
            let out = decoder.step(ids, &decoder.empty_past()?)?;
            (0..decoder.layers())
                .map(|l| {
                    Ok((
                        out.present.keys_of(l)?.to_vec(),
                        out.present.values_of(l)?.to_vec(),
                    ))
                })
                .collect::<Result<_>>()?
        }
        Attention::Native => {
            let mut cache = decoder.exact_cache()?;
            decoder.native_step(ids, &mut cache)?;
            (0..decoder.layers())
                .map(|l| {
                    let layer = cache
                        .layer(l)
                        .ok_or_else(|| Error::InvalidArgument(format!("layer {l}")))?;
                    let (mut k, mut v) = (Vec::new(), Vec::new());
                    for h in 0..decoder.kv_heads() {
                        let head = layer
                            .head(h)
                            .ok_or_else(|| Error::InvalidArgument(format!("kv head {h}")))?;
                        k.extend(head.keys()?);
                        v.extend(head.values()?);
                    }
                    Ok((k, v))
                })
                .collect::<Result<_>>()?
        }
    };
    layers
        .iter()
        .map(|(k, v)| {
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
    /// The float path's past (stays empty on the native path).
    past: KvTensors,
    quant: Option<ModelCache>,
    len: usize,
}

impl<'a> Sequence<'a> {
    /// An empty sequence with the given cache.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the calibration does not cover every layer and kv head;
    /// cache construction errors (e.g. a head dimension the precision cannot split).
    pub fn new(decoder: &'a Decoder, spec: &CacheSpec) -> Result<Self> {
        let quant = match (spec, decoder.attention()) {
            (CacheSpec::Exact, Attention::Float) => None,
            (CacheSpec::Exact, Attention::Native) => Some(decoder.exact_cache()?),
            (
                CacheSpec::Quantized {
                    config,
                    calibration,
                },
                _,
            ) => Some(decoder.new_cache(config, calibration)?),
        };
        Ok(Self {
            decoder,
            past: decoder.empty_past()?,
            quant,
            len: 0,
        })
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` before the first step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float past the next step sees (decoded from codes when quantized); empty on the
    /// native path, which keeps none.
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

    /// Where this sequence's attention runs.
    pub fn attention(&self) -> Attention {
        self.decoder.attention()
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
        if self.decoder.attention() == Attention::Native {
            let cache = self
                .quant
                .as_mut()
                .ok_or_else(|| Error::InvalidArgument("a native sequence keeps a cache".into()))?;
            let logits = self.decoder.native_step(ids, cache)?;
            self.len += ids.len();
            return Ok(StepOutput {
                logits,
                present: self.past.clone(),
                queries: None,
            });
        }
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
        self.len = self.past.len();
        Ok(out)
    }
}
