//! A search index over a batch of any kind, shaped like faiss's: vectors are added, many queries
//! are searched at once (in parallel on the rayon pool), results come back as row-major
//! `distances` / `labels` arrays with faiss's conventions, and the index saves to and loads from a
//! tq-batch file that also names its metric.
//!
//! - [`Metric::InnerProduct`]: the estimated inner product, largest first (faiss `METRIC_INNER_PRODUCT`);
//! - [`Metric::L2`]: the estimated squared Euclidean distance `‖q‖² − 2⟨q, x̃⟩ + ‖x̃‖²`, smallest first
//!   (faiss `METRIC_L2`), with `‖x̃‖²` of each decoded row kept beside the codes (4 bytes per vector).
//!
//! Slots beyond the index's size (`k > ntotal`) hold label `-1` and distance `-f32::MAX` (inner
//! product) or `f32::MAX` (L2), as faiss fills them.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;

use crate::encoded::EncodedVectors;
use crate::{AnyBatch, AnyQuantizer, Error, Hit, Result, score};

/// Metadata key naming an index file's metric (absent from plain batch files).
pub const METRIC_KEY: &str = "index_metric";

/// How an index ranks rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Metric {
    /// Largest estimated inner product first.
    #[default]
    InnerProduct,
    /// Smallest estimated squared Euclidean distance first.
    L2,
}

impl Metric {
    /// `"ip"` or `"l2"`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::InnerProduct => "ip",
            Metric::L2 => "l2",
        }
    }

    /// The distance faiss reports for an empty result slot.
    pub fn empty_distance(self) -> f32 {
        match self {
            Metric::InnerProduct => -f32::MAX,
            Metric::L2 => f32::MAX,
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ip" | "inner_product" => Ok(Metric::InnerProduct),
            "l2" => Ok(Metric::L2),
            other => Err(Error::ConfigMismatch(format!(
                "unknown metric '{}' (expected ip or l2)",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// The results of searching `nq` queries for `k` neighbours each: row-major `nq · k` arrays, best
/// first within each row.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResults {
    /// Neighbours per query.
    pub k: usize,
    /// Estimated inner products or squared distances (see [`Metric`]).
    pub distances: Vec<f32>,
    /// Row indices, `-1` for empty slots.
    pub labels: Vec<i64>,
}

/// A growable, searchable batch of encoded vectors with a metric.
#[derive(Debug, Clone)]
pub struct Index {
    batch: AnyBatch,
    metric: Metric,
    /// `‖x̃_i‖²` of every decoded row (L2 only; empty for inner product).
    sq_norms: Vec<f32>,
}

impl Index {
    /// An empty index over `quantizer`'s codes.
    pub fn new(quantizer: &AnyQuantizer, metric: Metric) -> Self {
        Self {
            batch: quantizer.new_batch(),
            metric,
            sq_norms: Vec::new(),
        }
    }

    /// An index over an existing batch (its rows are the index's first rows). O(n · d) for L2
    /// (every row decoded once for its norm), O(1) for inner product.
    pub fn from_batch(batch: AnyBatch, metric: Metric) -> Self {
        let mut index = Self {
            batch,
            metric,
            sq_norms: Vec::new(),
        };
        index.refresh_norms(0);
        index
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The encoded rows.
    pub fn batch(&self) -> &AnyBatch {
        &self.batch
    }

    /// The encoded rows, consuming the index.
    pub fn into_batch(self) -> AnyBatch {
        self.batch
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.batch.dim()
    }

    /// Number of vectors (faiss's `ntotal`).
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// `true` when the index holds no vectors.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Bytes the index stores: the batch's codes and scalars, plus 4 per vector for L2.
    pub fn stored_bytes(&self) -> usize {
        self.batch.stored_bytes() + 4 * self.sq_norms.len()
    }

    /// Encodes and appends row-major vectors (`n · dim` finite floats), in parallel.
    ///
    /// # Errors
    /// As [`EncodedVectors::extend`]; nothing is appended then.
    pub fn add(&mut self, xs: &[f32]) -> Result<()> {
        // Rows a grouped kind still holds pending decode differently once their group fills.
        let first_changed = self.batch.len() - self.batch.pending_len();
        self.batch.extend(xs)?;
        self.refresh_norms(first_changed);
        Ok(())
    }

    /// Removes every vector (the quantizer stays).
    pub fn reset(&mut self) {
        self.batch.truncate(0);
        self.sq_norms.clear();
    }

    /// Recomputes `‖x̃_i‖²` for rows `from..` (L2 only).
    fn refresh_norms(&mut self, from: usize) {
        if self.metric != Metric::L2 {
            return;
        }
        let (n, d) = (self.batch.len(), self.batch.dim());
        let batch = &self.batch;
        let fresh: Vec<f32> = (from..n)
            .into_par_iter()
            .map_init(
                || vec![0.0f32; d],
                |row, i| match batch.dequantize_row(i, row) {
                    Ok(()) => row.iter().map(|v| v * v).sum(),
                    Err(_) => 0.0,
                },
            )
            .collect();
        self.sq_norms.truncate(from);
        self.sq_norms.extend(fresh);
    }

    fn check_queries(&self, queries: &[f32]) -> Result<usize> {
        let d = self.dim();
        if !queries.len().is_multiple_of(d) {
            return Err(Error::DimMismatch {
                expected: d,
                got: queries.len() % d,
            });
        }
        Ok(queries.len() / d)
    }

    /// The metric's value of every (query, row) pair: row-major `nq · len` (estimated inner
    /// products, or estimated squared distances for L2), queries in parallel. O(nq · len · d / 8)
    /// table look-ups for the fast kinds.
    ///
    /// # Errors
    /// [`Error::DimMismatch`] unless `queries.len()` is a multiple of the dimension;
    /// [`Error::NonFinite`] for a non-finite query value.
    pub fn scores(&self, queries: &[f32]) -> Result<Vec<f32>> {
        let nq = self.check_queries(queries)?;
        let n = self.len();
        let mut out = vec![0.0f32; nq * n];
        if n == 0 {
            return Ok(out);
        }
        let per_query = nq >= rayon::current_num_threads();
        out.par_chunks_mut(n)
            .zip(queries.par_chunks(self.dim()))
            .try_for_each(|(o, q)| {
                if per_query {
                    score::sequential(|| self.score_one(q, o))
                } else {
                    self.score_one(q, o)
                }
            })?;
        Ok(out)
    }

    /// Scores one query into `out` (`len` values) under the metric.
    fn score_one(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        let prepared = self.batch.encode_query(q)?;
        self.batch.score_into(&prepared, out)?;
        if self.metric == Metric::L2 {
            let qq: f32 = q.iter().map(|v| v * v).sum();
            for (o, &xx) in out.iter_mut().zip(&self.sq_norms) {
                *o = qq - 2.0 * *o + xx;
            }
        }
        Ok(())
    }

    /// The `k` best rows of every query (row-major `nq · k` results; see [`Metric`]), queries in
    /// parallel. Inner product: fast scores for every row, the best candidates re-scored with
    /// exact tables ([`EncodedVectors::top_k`]); L2: fast scores. O(nq · (len + k log k)).
    ///
    /// # Errors
    /// As [`Index::scores`].
    pub fn search(&self, queries: &[f32], k: usize) -> Result<SearchResults> {
        let nq = self.check_queries(queries)?;
        let mut distances = vec![self.metric.empty_distance(); nq * k];
        let mut labels = vec![-1i64; nq * k];
        if k == 0 {
            return Ok(SearchResults {
                k,
                distances,
                labels,
            });
        }
        let n = self.len();
        // With a query per thread or more, each task takes a group of queries and scans its rows
        // on its own thread (inner product: the group shares each pass over the codes where the
        // kind allows); with fewer, each query's rows are split across the pool.
        let per_query = nq >= rayon::current_num_threads();
        // Groups of up to `SEARCH_QUERIES`, in a task count that is a multiple of the threads
        // (so no thread is left a short last round) and sizes that differ by at most one.
        let group = if self.metric == Metric::InnerProduct {
            search_group_size(nq, rayon::current_num_threads())
        } else {
            1
        };
        let search_group = |scratch: &mut Vec<f32>, qs: &[f32]| -> Result<Vec<Vec<Hit>>> {
            match self.metric {
                Metric::InnerProduct => {
                    let prepared = qs
                        .chunks(self.dim())
                        .map(|q| self.batch.encode_query(q))
                        .collect::<Result<Vec<_>>>()?;
                    let refs: Vec<_> = prepared.iter().collect();
                    self.batch.top_k_many(&refs, k)
                }
                Metric::L2 => qs
                    .chunks(self.dim())
                    .map(|q| {
                        self.score_one(q, scratch)?;
                        scratch.iter_mut().for_each(|v| *v = -*v);
                        let mut hits = score::top_k_of(scratch, k);
                        hits.iter_mut().for_each(|h| h.score = -h.score);
                        Ok(hits)
                    })
                    .collect(),
            }
        };
        distances
            .par_chunks_mut(group * k)
            .zip(labels.par_chunks_mut(group * k))
            .zip(queries.par_chunks(group * self.dim()))
            .try_for_each_init(
                || vec![0.0f32; if self.metric == Metric::L2 { n } else { 0 }],
                |scratch, ((dist, lab), qs)| -> Result<()> {
                    let hits = if per_query {
                        score::sequential(|| search_group(scratch, qs))?
                    } else {
                        search_group(scratch, qs)?
                    };
                    for ((dist, lab), hits) in dist.chunks_mut(k).zip(lab.chunks_mut(k)).zip(hits) {
                        for ((d, l), h) in dist.iter_mut().zip(lab.iter_mut()).zip(hits) {
                            *d = h.score;
                            *l = h.index as i64;
                        }
                    }
                    Ok(())
                },
            )?;
        Ok(SearchResults {
            k,
            distances,
            labels,
        })
    }

    /// Serializes the index: its batch's tq-batch file ([`crate::io`]) with the metric in the
    /// metadata (key [`METRIC_KEY`]), so [`AnyBatch::from_safetensors`] also reads it.
    ///
    /// # Errors
    /// [`Error::InvalidFormat`] only if the safetensors writer rejects the tensors.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes = self.batch.to_safetensors()?;
        crate::io::with_metadata(&bytes, METRIC_KEY, self.metric.name())
    }

    /// Parses and validates a saved index.
    ///
    /// # Errors
    /// Those of [`AnyBatch::from_safetensors`], and [`Error::InvalidFormat`] for a file without
    /// a known metric (a plain batch file: load it with [`AnyBatch::load`]).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let metric =
            crate::io::metadata_value(bytes, METRIC_KEY)?.ok_or_else(|| Error::InvalidFormat {
                what: "__metadata__",
                detail: format!(
                    "no '{METRIC_KEY}': a batch file, not an index (load it as a batch)"
                ),
            })?;
        let metric: Metric = metric.parse().map_err(|_| Error::InvalidFormat {
            what: "__metadata__",
            detail: format!(
                "unknown {METRIC_KEY} '{}'",
                metric.chars().take(32).collect::<String>()
            ),
        })?;
        Ok(Self::from_batch(AnyBatch::from_safetensors(bytes)?, metric))
    }

    /// Writes the index to `path` crash-safely (as [`AnyBatch::save`]).
    ///
    /// # Errors
    /// [`Error::Io`]; `path` then keeps its old contents.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_file(path, &self.to_safetensors()?)
    }

    /// Reads and validates an index from `path`.
    ///
    /// # Errors
    /// [`Error::Io`] and those of [`Index::from_safetensors`].
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_safetensors(&crate::io::read_file(path)?)
    }
}

/// Queries per task of a many-query inner-product search on `threads` threads: tasks in a
/// multiple of `threads` (the fewest that keeps groups within [`crate::score::SEARCH_QUERIES`]),
/// the queries spread evenly over them, so the last round leaves no thread with a short task
/// while another has a full one (20 queries on 2 threads: 4 tasks of 5, not 8, 8 and 4).
fn search_group_size(nq: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let rounds = nq.div_ceil(threads * crate::score::SEARCH_QUERIES).max(1);
    nq.div_ceil(threads * rounds).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_groups_fill_every_thread_evenly() {
        assert_eq!(search_group_size(20, 2), 5);
        assert_eq!(search_group_size(1000, 2), 8);
        assert_eq!(search_group_size(136, 16), 5);
        assert_eq!(search_group_size(3, 2), 2);
        assert_eq!(search_group_size(1, 4), 1);
        assert_eq!(search_group_size(0, 2), 1);
        for threads in 1..=16 {
            for nq in 1..=300 {
                let g = search_group_size(nq, threads);
                let tasks = nq.div_ceil(g);
                assert!((1..=crate::score::SEARCH_QUERIES).contains(&g));
                // No more rounds of tasks than the fewest full-size groups would need.
                let rounds = tasks.div_ceil(threads);
                assert!(rounds <= nq.div_ceil(threads * crate::score::SEARCH_QUERIES).max(1));
            }
        }
    }
}
