//! K/V traces in the safetensors format of docs/DESIGN.md (Trace format), and a synthetic trace
//! generator.
//!
//! Tensors (little-endian): `keys` and `values` F32 `[layers, kv_heads, tokens, head_dim]`,
//! `queries` F32 `[layers, q_heads, n_queries, head_dim]`, `query_positions` I64 `[n_queries]`
//! (the number of tokens each query attends to, `1..=tokens`). Metadata: `model`, `rope`
//! (`pre` | `post`), `source` (`synthetic` | `trace` | `real-model`). `q_heads` is a multiple of
//! `kv_heads`. Loading validates all of it and names the tensor at fault.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tq_core::SeededRng;

use crate::{Error, Result};

/// Trace metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceMeta {
    /// Model name (free text).
    pub model: String,
    /// Whether keys and queries were captured before (`pre`) or after (`post`) RoPE.
    pub rope: String,
    /// `synthetic`, `trace` or `real-model`.
    pub source: String,
}

/// A validated K/V trace.
#[derive(Debug, Clone, PartialEq)]
pub struct KvTrace {
    /// Layers.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// Cached tokens.
    pub tokens: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// `[layers, kv_heads, tokens, head_dim]`.
    pub keys: Vec<f32>,
    /// `[layers, kv_heads, tokens, head_dim]`.
    pub values: Vec<f32>,
    /// `[layers, q_heads, n_queries, head_dim]`.
    pub queries: Vec<f32>,
    /// Tokens each query attends to, `1..=tokens`.
    pub query_positions: Vec<usize>,
    /// Metadata.
    pub meta: TraceMeta,
}

fn bad(tensor: &str, reason: impl Into<String>) -> Error {
    Error::Trace {
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

fn finite(name: &str, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(bad(
            name,
            format!("non-finite value {} at flat index {i}", v[i]),
        ));
    }
    Ok(())
}

impl KvTrace {
    /// Number of queries per query head.
    pub fn n_queries(&self) -> usize {
        self.query_positions.len()
    }

    /// Checks shapes, finiteness, positions and metadata.
    ///
    /// # Errors
    /// [`Error::Trace`] naming the tensor or key at fault.
    pub fn validate(&self) -> Result<()> {
        let (l, h, t, d, hq, n) = (
            self.layers,
            self.kv_heads,
            self.tokens,
            self.head_dim,
            self.q_heads,
            self.n_queries(),
        );
        if l == 0 || h == 0 || t == 0 || d < 2 || hq == 0 || n == 0 {
            return Err(bad(
                "keys",
                format!(
                    "empty or degenerate shape: layers {l}, kv heads {h}, tokens {t}, dim {d}, q heads {hq}, queries {n}"
                ),
            ));
        }
        if !hq.is_multiple_of(h) {
            return Err(bad(
                "queries",
                format!("{hq} query heads are not a multiple of {h} kv heads"),
            ));
        }
        for (name, v, want) in [
            ("keys", &self.keys, l * h * t * d),
            ("values", &self.values, l * h * t * d),
            ("queries", &self.queries, l * hq * n * d),
        ] {
            if v.len() != want {
                return Err(bad(name, format!("{} values, expected {want}", v.len())));
            }
            finite(name, v)?;
        }
        if let Some((i, &p)) = self
            .query_positions
            .iter()
            .enumerate()
            .find(|(_, p)| **p == 0 || **p > t)
        {
            return Err(bad(
                "query_positions",
                format!("query {i} attends to {p} tokens; expected 1..={t}"),
            ));
        }
        if !matches!(self.meta.rope.as_str(), "pre" | "post" | "unknown") {
            return Err(bad(
                "rope",
                format!("'{}' is not pre or post", self.meta.rope),
            ));
        }
        if !matches!(
            self.meta.source.as_str(),
            "synthetic" | "trace" | "real-model"
        ) {
            return Err(bad(
                "source",
                format!(
                    "'{}' is not synthetic, trace or real-model",
                    self.meta.source
                ),
            ));
        }
        Ok(())
    }

    /// Keys of kv head `h` in layer `layer`: `tokens × head_dim`.
    pub fn keys_of(&self, layer: usize, h: usize) -> &[f32] {
        let s = self.tokens * self.head_dim;
        let i = layer * self.kv_heads + h;
        &self.keys[i * s..(i + 1) * s]
    }

    /// Values of kv head `h` in layer `layer`: `tokens × head_dim`.
    pub fn values_of(&self, layer: usize, h: usize) -> &[f32] {
        let s = self.tokens * self.head_dim;
        let i = layer * self.kv_heads + h;
        &self.values[i * s..(i + 1) * s]
    }

    /// Queries of query head `h` in layer `layer`: `n_queries × head_dim`.
    pub fn queries_of(&self, layer: usize, h: usize) -> &[f32] {
        let s = self.n_queries() * self.head_dim;
        let i = layer * self.q_heads + h;
        &self.queries[i * s..(i + 1) * s]
    }

    /// Serializes to safetensors.
    ///
    /// # Errors
    /// [`Error::Trace`] if the trace does not validate.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let f = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (k, v, q) = (f(&self.keys), f(&self.values), f(&self.queries));
        let p: Vec<u8> = self
            .query_positions
            .iter()
            .flat_map(|&x| (x as i64).to_le_bytes())
            .collect();
        let kv_shape = vec![self.layers, self.kv_heads, self.tokens, self.head_dim];
        let views = [
            ("keys", Dtype::F32, kv_shape.clone(), &k),
            ("values", Dtype::F32, kv_shape, &v),
            (
                "queries",
                Dtype::F32,
                vec![self.layers, self.q_heads, self.n_queries(), self.head_dim],
                &q,
            ),
            ("query_positions", Dtype::I64, vec![self.n_queries()], &p),
        ];
        let mut tensors = Vec::new();
        for (name, dtype, shape, data) in views {
            tensors.push((
                name,
                TensorView::new(dtype, shape, data).map_err(|e| bad(name, e.to_string()))?,
            ));
        }
        let meta: HashMap<String, String> = [
            ("model", &self.meta.model),
            ("rope", &self.meta.rope),
            ("source", &self.meta.source),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.clone()))
        .collect();
        safetensors::serialize(tensors, Some(meta)).map_err(|e| bad("header", e.to_string()))
    }

    /// Parses and validates a trace.
    ///
    /// # Errors
    /// [`Error::Trace`] naming the tensor at fault.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad("header", crate::error::not_safetensors(bytes, &e)))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| bad("header", e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .unwrap_or_else(|| "unknown".to_string())
        };
        let tensor = |name: &str, dtype: Dtype, rank: usize| -> Result<(Vec<usize>, &[u8])> {
            let t = st.tensor(name).map_err(|_| bad(name, "missing"))?;
            if t.dtype() != dtype {
                return Err(bad(
                    name,
                    format!("dtype {:?}, expected {dtype:?}", t.dtype()),
                ));
            }
            if t.shape().len() != rank {
                return Err(bad(
                    name,
                    format!(
                        "shape {:?} has rank {}, expected {rank}",
                        t.shape(),
                        t.shape().len()
                    ),
                ));
            }
            Ok((t.shape().to_vec(), t.data()))
        };
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (ks, kb) = tensor("keys", Dtype::F32, 4)?;
        let (vs, vb) = tensor("values", Dtype::F32, 4)?;
        let (qs, qb) = tensor("queries", Dtype::F32, 4)?;
        let (ps, pb) = tensor("query_positions", Dtype::I64, 1)?;
        if vs != ks {
            return Err(bad(
                "values",
                format!("shape {vs:?} differs from keys {ks:?}"),
            ));
        }
        if qs[0] != ks[0] || qs[3] != ks[3] {
            return Err(bad(
                "queries",
                format!("shape {qs:?} does not match keys {ks:?} in layers or head_dim"),
            ));
        }
        if ps[0] != qs[2] {
            return Err(bad(
                "query_positions",
                format!("{} positions for {} queries", ps[0], qs[2]),
            ));
        }
        let mut positions = Vec::with_capacity(ps[0]);
        for (i, c) in pb.chunks_exact(8).enumerate() {
            let p = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            if p < 1 || p as u64 > ks[2] as u64 {
                return Err(bad(
                    "query_positions",
                    format!("query {i} attends to {p} tokens; expected 1..={}", ks[2]),
                ));
            }
            positions.push(p as usize);
        }
        let trace = KvTrace {
            layers: ks[0],
            kv_heads: ks[1],
            q_heads: qs[1],
            tokens: ks[2],
            head_dim: ks[3],
            keys: f32s(kb),
            values: f32s(vb),
            queries: f32s(qb),
            query_positions: positions,
            meta: TraceMeta {
                model: get("model"),
                rope: get("rope"),
                source: get("source"),
            },
        };
        trace.validate()?;
        Ok(trace)
    }

    /// Writes the trace to `path`.
    ///
    /// # Errors
    /// [`Error::Trace`], [`Error::Io`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_safetensors()?;
        crate::error::write_file(path, &bytes)
    }

    /// Reads and validates a trace.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Trace`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::error::read_file(path)?;
        Self::from_safetensors(&bytes)
    }
}

/// Shape and structure of a synthetic trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticTrace {
    /// Layers.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Cached tokens.
    pub tokens: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Queries per query head.
    pub queries: usize,
    /// Large-magnitude key channels per head.
    pub outlier_channels: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for SyntheticTrace {
    fn default() -> Self {
        Self {
            layers: 2,
            kv_heads: 2,
            q_heads: 4,
            tokens: 512,
            head_dim: 128,
            queries: 16,
            outlier_channels: 8,
            seed: 0,
        }
    }
}

impl SyntheticTrace {
    /// Generates a trace whose keys look like a real model's: per head a few outlier channels with
    /// 8-15× the typical magnitude, a non-zero per-channel mean, and token norms spread by a
    /// log-normal factor (σ = 0.3). Values are Gaussian with a mild per-channel scale. Each query is
    /// a noisy copy of one earlier key (so attention is peaked, as in real decoding), at positions
    /// spread over the second half of the sequence.
    ///
    /// # Errors
    /// [`Error::Trace`] for degenerate shapes (validated like a loaded trace).
    pub fn generate(&self) -> Result<KvTrace> {
        let SyntheticTrace {
            layers,
            kv_heads,
            q_heads,
            tokens,
            head_dim: d,
            queries: nq,
            outlier_channels,
            seed,
        } = *self;
        if outlier_channels > d {
            return Err(bad(
                "keys",
                format!("{outlier_channels} outlier channels exceed dimension {d}"),
            ));
        }
        let mut r = SeededRng::new(seed, tq_core::rng::stream::DATA);
        let positions: Vec<usize> = (0..nq)
            .map(|i| {
                (tokens / 2 + (i + 1) * (tokens - tokens / 2) / nq.max(1)).clamp(1, tokens.max(1))
            })
            .collect();
        let mut keys = Vec::with_capacity(layers * kv_heads * tokens * d);
        let mut values = Vec::with_capacity(keys.capacity());
        let mut queries = vec![0.0f32; layers * q_heads * nq * d];
        for l in 0..layers {
            for h in 0..kv_heads {
                let mut scale = vec![1.0f32; d];
                for &c in r.permutation(d).iter().take(outlier_channels) {
                    scale[c as usize] = 8.0 + 7.0 * r.uniform() as f32;
                }
                let mean: Vec<f32> = (0..d).map(|_| 0.5 * r.gaussian() as f32).collect();
                let vscale: Vec<f32> = (0..d).map(|_| 0.5 + r.uniform() as f32).collect();
                let start = keys.len();
                for _ in 0..tokens {
                    let s = (0.3 * r.gaussian()).exp() as f32;
                    keys.extend((0..d).map(|j| s * scale[j] * r.gaussian() as f32 + mean[j]));
                    values.extend((0..d).map(|j| vscale[j] * r.gaussian() as f32));
                }
                let head_keys = keys[start..].to_vec();
                let group = q_heads / kv_heads.max(1);
                for g in 0..group {
                    let qh = h * group + g;
                    for (i, &p) in positions.iter().enumerate() {
                        let src = r.below(p as u64) as usize;
                        let k = &head_keys[src * d..(src + 1) * d];
                        let norm = k.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
                        let off = ((l * q_heads + qh) * nq + i) * d;
                        for j in 0..d {
                            queries[off + j] =
                                2.0 * (k[j] / norm + 0.3 * r.gaussian() as f32 / (d as f32).sqrt());
                        }
                    }
                }
            }
        }
        let trace = KvTrace {
            layers,
            kv_heads,
            q_heads,
            tokens,
            head_dim: d,
            keys,
            values,
            queries,
            query_positions: positions,
            meta: TraceMeta {
                model: "synthetic-outliers".into(),
                rope: "post".into(),
                source: "synthetic".into(),
            },
        };
        trace.validate()?;
        Ok(trace)
    }
}
