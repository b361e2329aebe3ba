//! Multi-head caches with grouped-query attention, and a model cache of layers × kv heads.
//!
//! Layouts are head-major, as in the trace format: keys and values appended as
//! `[n_kv_heads, n_tokens, d]`, queries as `[n_q_heads, d]` (one decode step) or
//! `[n_q_heads, m, d]` (a block), outputs like the queries. Query head `h` reads kv head
//! `h / (n_q_heads / n_kv_heads)`; the queries of one group attend together and share one decode
//! of the value codes. KV heads run in parallel on the current rayon pool when there is enough
//! work ([`PARALLEL_MIN_WORK`] tokens × heads); with at least as many kv heads as threads each
//! head's scans then stay on its thread, else long caches also split their rows over the pool.

use rayon::prelude::*;

use crate::calibration::HeadCalibration;
use crate::error::check_len;
use crate::head::{HeadCache, HeadConfig};
use crate::{Error, Result};

/// Tokens × heads from which heads are processed in parallel.
pub const PARALLEL_MIN_WORK: usize = 1 << 14;

/// The most query (and so kv) heads a layer may have: far above any model's, and low enough that
/// `heads × head_dim` never overflows (a saved cache's header is refused above it).
pub const MAX_HEADS: usize = 1 << 16;

/// The caches of all kv heads of one layer.
#[derive(Debug, Clone)]
pub struct MultiHeadCache {
    n_q_heads: usize,
    heads: Vec<HeadCache>,
}

impl MultiHeadCache {
    /// `n_kv_heads` heads with the same configuration; `outliers` gives each kv head's outlier
    /// channels (one entry per head) or is empty when no precision is split.
    ///
    /// # Errors
    /// [`Error::HeadCounts`] unless `n_q_heads` is a positive multiple of `n_kv_heads` and at most
    /// [`MAX_HEADS`];
    /// [`Error::InvalidChannels`] for a wrong number of outlier entries; head construction errors.
    pub fn new(
        n_q_heads: usize,
        n_kv_heads: usize,
        config: &HeadConfig,
        outliers: &[HeadCalibration],
    ) -> Result<Self> {
        if n_kv_heads == 0
            || n_q_heads == 0
            || !n_q_heads.is_multiple_of(n_kv_heads)
            || n_q_heads > MAX_HEADS
        {
            return Err(Error::HeadCounts {
                n_q_heads,
                n_kv_heads,
            });
        }
        if !outliers.is_empty() && outliers.len() != n_kv_heads {
            return Err(Error::InvalidChannels {
                reason: format!(
                    "{} outlier entries for {n_kv_heads} kv heads",
                    outliers.len()
                ),
            });
        }
        let none = HeadCalibration::default();
        let heads = (0..n_kv_heads)
            .map(|h| HeadCache::new(config.clone(), outliers.get(h).unwrap_or(&none)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { n_q_heads, heads })
    }

    /// Query heads.
    pub fn n_q_heads(&self) -> usize {
        self.n_q_heads
    }

    /// KV heads.
    pub fn n_kv_heads(&self) -> usize {
        self.heads.len()
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.heads[0].config().head_dim
    }

    /// KV head `h`.
    pub fn head(&self, h: usize) -> Option<&HeadCache> {
        self.heads.get(h)
    }

    /// KV head `h`, mutable (crate-internal: restoring saved caches).
    pub(crate) fn head_mut(&mut self, h: usize) -> Option<&mut HeadCache> {
        self.heads.get_mut(h)
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.heads[0].len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Exact bytes held by all heads.
    pub fn memory_bytes(&self) -> usize {
        self.heads.iter().map(HeadCache::memory_bytes).sum()
    }

    /// Bytes of the same tokens as f16.
    pub fn f16_bytes(&self) -> usize {
        self.heads.iter().map(HeadCache::f16_bytes).sum()
    }

    fn parallel(&self, tokens: usize) -> bool {
        tokens * self.heads.len() >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1
    }

    /// Appends `n` tokens: `keys` and `values` are `[n_kv_heads, n, d]`.
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::NonFinite`]; on error no head has changed.
    pub fn append(&mut self, keys: &[f32], values: &[f32]) -> Result<()> {
        let per = keys.len() / self.heads.len();
        let d = self.head_dim();
        if !keys.len().is_multiple_of(self.heads.len() * d) {
            return Err(Error::Shape {
                what: "keys",
                expected: keys.len() / (self.heads.len() * d) * self.heads.len() * d,
                got: keys.len(),
            });
        }
        check_len("values", values.len(), keys.len())?;
        if keys.is_empty() {
            return Ok(());
        }
        crate::error::check_finite("keys", keys)?;
        crate::error::check_finite("values", values)?;
        // Every head accepts its rows before any head changes, so a refused append leaves the
        // heads in step.
        for ((h, k), v) in self
            .heads
            .iter()
            .zip(keys.chunks_exact(per))
            .zip(values.chunks_exact(per))
        {
            h.check_append(k, v)?;
        }
        let par = self.parallel(per / d);
        let jobs = self
            .heads
            .iter_mut()
            .zip(keys.chunks_exact(per))
            .zip(values.chunks_exact(per));
        if par {
            jobs.collect::<Vec<_>>()
                .into_par_iter()
                .try_for_each(|((h, k), v)| h.append(k, v))
        } else {
            jobs.into_iter().try_for_each(|((h, k), v)| h.append(k, v))
        }
    }

    /// One decode step: `queries` `[n_q_heads, d]` attend to every token; `out` like `queries`.
    ///
    /// # Errors
    /// [`Error::Shape`], [`Error::NonFinite`].
    pub fn attend(&self, queries: &[f32], out: &mut [f32]) -> Result<()> {
        let len = self.len();
        self.attend_block(queries, &[len.max(1)], out)
            .or_else(|e| match e {
                Error::PositionOutOfRange { .. } if len == 0 => {
                    out.fill(0.0);
                    Ok(())
                }
                e => Err(e),
            })
    }

    /// Checks a block of `limits.len()` queries per query head and its output; returns the
    /// values per query head (`limits.len() · d`).
    fn check_block(&self, queries: &[f32], limits: &[usize], out: &[f32]) -> Result<usize> {
        let per = limits.len() * self.head_dim();
        let want = self.n_q_heads.checked_mul(per).ok_or(Error::Shape {
            what: "queries",
            expected: usize::MAX,
            got: queries.len(),
        })?;
        check_len("queries", queries.len(), want)?;
        check_len("output", out.len(), queries.len())?;
        Ok(per)
    }

    /// A block of `m = limits.len()` queries per head (`[n_q_heads, m, d]`), query `i` attending to
    /// the first `limits[i]` tokens; `out` like `queries`.
    ///
    /// # Errors
    /// [`Error::Shape`], [`Error::NonFinite`], [`Error::PositionOutOfRange`].
    pub fn attend_block(&self, queries: &[f32], limits: &[usize], out: &mut [f32]) -> Result<()> {
        let per = self.check_block(queries, limits, out)?;
        // The query heads of one kv head are consecutive, so a group's queries are one contiguous
        // run: they attend together and share one decode of the value codes.
        let group = self.n_q_heads / self.heads.len();
        let limits_rep: Vec<usize> = (0..group).flat_map(|_| limits.iter().copied()).collect();
        let jobs = queries
            .chunks_exact(group * per)
            .zip(out.chunks_exact_mut(group * per))
            .enumerate();
        let par = self.parallel(self.len() * limits.len() * group);
        let limits_rep = &limits_rep;
        run_heads(
            jobs.map(|(h, (q, o))| move || self.heads[h].attend_block(q, limits_rep, o)),
            par,
            self.heads.len(),
        )
    }

    /// One decoder step: appends `n` tokens (`keys`, `values` `[n_kv_heads, n, d]`) and computes
    /// the attention of `m = limits.len()` queries per head (`[n_q_heads, m, d]`, query `i` over
    /// the first `limits[i]` tokens counting the new ones) with the new tokens still exact, then
    /// quantizes what leaves each head's window ([`HeadCache::append_attend`]); `out` like
    /// `queries`. Heads in parallel for long contexts.
    ///
    /// # Errors
    /// [`Error::Shape`], [`Error::NonFinite`], [`Error::PositionOutOfRange`] and the heads'
    /// append errors; nothing changes when the tokens, queries or limits are refused.
    pub fn append_attend(
        &mut self,
        keys: &[f32],
        values: &[f32],
        queries: &[f32],
        limits: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        let d = self.head_dim();
        let kv = self.heads.len();
        if !keys.len().is_multiple_of(kv * d) {
            return Err(Error::Shape {
                what: "keys",
                expected: keys.len() / (kv * d) * kv * d,
                got: keys.len(),
            });
        }
        check_len("values", values.len(), keys.len())?;
        let per_kv = keys.len() / kv;
        let per_q = self.check_block(queries, limits, out)?;
        crate::error::check_finite("queries", queries)?;
        let len = self.len() + per_kv / d;
        if let Some(&limit) = limits.iter().find(|&&l| l == 0 || l > len) {
            return Err(Error::PositionOutOfRange { limit, len });
        }
        for (h, head) in self.heads.iter().enumerate() {
            let r = h * per_kv..(h + 1) * per_kv;
            head.check_append(&keys[r.clone()], &values[r])?;
        }
        let group = self.n_q_heads / kv;
        let limits_rep: Vec<usize> = (0..group).flat_map(|_| limits.iter().copied()).collect();
        let par = self.parallel(len * limits.len() * group);
        let limits_rep = &limits_rep;
        // One job per kv head: its new rows, its group's queries and outputs.
        let jobs = self
            .heads
            .iter_mut()
            .enumerate()
            .zip(
                queries
                    .chunks_exact(group * per_q)
                    .zip(out.chunks_exact_mut(group * per_q)),
            )
            .map(|((h, head), (q, o))| {
                let r = h * per_kv..(h + 1) * per_kv;
                let (k, v) = (&keys[r.clone()], &values[r]);
                move || head.append_attend(k, v, q, limits_rep, o)
            });
        run_heads(jobs, par, kv)
    }

    /// Keeps the first `n` tokens in every head.
    pub fn truncate(&mut self, n: usize) {
        self.heads.iter_mut().for_each(|h| h.truncate(n));
    }
}

/// Runs one job per kv head (`heads` of them), in parallel on the rayon pool when `par`. With at
/// least as many kv heads as threads each head's scans stay on its thread
/// ([`tq_quant::score::sequential`]): they keep their grouped passes and the value rows asked
/// for while the keys are scanned, instead of splitting their rows over the pool again.
fn run_heads<J>(jobs: impl Iterator<Item = J>, par: bool, heads: usize) -> Result<()>
where
    J: FnOnce() -> Result<()> + Send,
{
    if !par {
        return jobs.into_iter().try_for_each(|job| job());
    }
    let own = heads >= rayon::current_num_threads();
    jobs.collect::<Vec<_>>()
        .into_par_iter()
        .try_for_each(|job| {
            if own {
                tq_quant::score::sequential(job)
            } else {
                job()
            }
        })
}

/// The caches of every layer of a model.
#[derive(Debug, Clone)]
pub struct ModelCache {
    layers: Vec<MultiHeadCache>,
}

impl ModelCache {
    /// `n_layers` layers of `n_kv_heads` heads (no split precision; use
    /// [`ModelCache::from_layers`] with per-head outliers for splits).
    ///
    /// # Errors
    /// As [`MultiHeadCache::new`].
    pub fn new(
        n_layers: usize,
        n_q_heads: usize,
        n_kv_heads: usize,
        config: &HeadConfig,
    ) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|_| MultiHeadCache::new(n_q_heads, n_kv_heads, config, &[]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// A model cache from prepared layers.
    pub fn from_layers(layers: Vec<MultiHeadCache>) -> Self {
        Self { layers }
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i`.
    pub fn layer(&self, i: usize) -> Option<&MultiHeadCache> {
        self.layers.get(i)
    }

    /// Layer `i`, mutable.
    pub fn layer_mut(&mut self, i: usize) -> Option<&mut MultiHeadCache> {
        self.layers.get_mut(i)
    }

    /// Exact bytes held by all layers.
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(MultiHeadCache::memory_bytes).sum()
    }

    /// Bytes of the same tokens as f16.
    pub fn f16_bytes(&self) -> usize {
        self.layers.iter().map(MultiHeadCache::f16_bytes).sum()
    }

    /// Keeps the first `n` tokens everywhere.
    pub fn truncate(&mut self, n: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(n));
    }
}
