//! The contract every packed batch meets: [`EncodedVectors`].
//!
//! A batch holds encoded rows of one quantizer and answers inner-product queries on the codes
//! without decoding rows to floats. Every kind ([`MseBatch`], [`ProdBatch`], [`PolarBatch`],
//! [`KiviBatch`], [`GroupMseBatch`]) implements it, and so does [`crate::AnyBatch`], the one enum over them that consumers (KV caches,
//! GPU kernels, benchmarks, saved files) hold when the kind is chosen at run time. A new quantizer
//! implements this trait, adds one variant to [`crate::AnyBatch`] / [`crate::AnyQuery`] /
//! [`crate::AnyQuantizer`] and one to [`crate::QuantizerKind`]; nothing outside tq-quant changes.
//!
//! The inherent methods of each batch stay (they take the concrete query type and need no trait in
//! scope); the trait's methods delegate to them.

use rayon::prelude::*;
use tq_core::prefetch::Ahead;
use tq_core::simd;

use crate::error::{check_batch, check_dim, check_len, check_range};
use crate::gmse::{GroupMseBatch, GroupMseQuery};
use crate::kivi::{KiviBatch, KiviQuery};
use crate::polar::PolarQuery;
use crate::score::Hit;
use crate::{MseBatch, MseQuery, PolarBatch, ProdBatch, ProdQuery, Result};

/// A growable batch of encoded vectors scored on its codes.
///
/// Every method that takes a query takes one prepared by [`EncodedVectors::encode_query`] on the
/// same batch (or a batch of the same quantizer). Row indices are `0..len()`.
pub trait EncodedVectors: Sync {
    /// A query prepared once against this batch's quantizer (rotation, projections, tables).
    type Query;

    /// Dimension of the encoded vectors.
    fn dim(&self) -> usize;

    /// Number of rows.
    fn len(&self) -> usize;

    /// `true` when the batch holds no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stored bytes per vector: codes and every per-vector scalar.
    fn bytes_per_vector(&self) -> usize;

    /// Bytes held in memory by the rows (with any block padding).
    fn memory_bytes(&self) -> usize;

    /// Exact bytes the rows store: codes and scalars, and rows kept unquantized at their stored
    /// width. `len · bytes_per_vector` unless a kind keeps some rows another way (KIVI's residual).
    fn stored_bytes(&self) -> usize {
        self.len() * self.bytes_per_vector()
    }

    /// The newest rows a kind keeps unquantized until their group fills (KIVI's residual): their
    /// decoded values change when it does. 0 for kinds that encode every row as it arrives.
    fn pending_len(&self) -> usize {
        0
    }

    /// Checks row-major vectors as [`EncodedVectors::extend`] would, without appending: callers
    /// that append to several batches check all of them first, so a bad row changes none.
    ///
    /// # Errors
    /// As [`EncodedVectors::extend`].
    fn check_rows(&self, xs: &[f32]) -> Result<()> {
        check_batch(xs, self.dim()).map(|_| ())
    }

    /// Encodes and appends row-major vectors (`n · dim` finite floats), in parallel.
    ///
    /// # Errors
    /// [`crate::Error::DimMismatch`], [`crate::Error::NonFinite`], for the grouped kinds (KIVI,
    /// gmse) [`crate::Error::ValueOutOfRange`], and for MSE [`crate::Error::ScaleOverflow`] (a
    /// row whose scale its width cannot hold); nothing is appended then.
    fn extend(&mut self, xs: &[f32]) -> Result<()>;

    /// Keeps the first `n` rows (no-op when `n >= len()`).
    fn truncate(&mut self, n: usize);

    /// Prepares a query (`dim` finite floats) for scoring against this batch.
    ///
    /// # Errors
    /// [`crate::Error::DimMismatch`], [`crate::Error::NonFinite`].
    fn encode_query(&self, q: &[f32]) -> Result<Self::Query>;

    /// Inner-product estimates for every row through the fastest tables (`out.len() == len()`).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` for `out`; [`crate::Error::ConfigMismatch`] for a query of another
    /// kind ([`crate::AnyBatch`]).
    fn score_into(&self, q: &Self::Query, out: &mut [f32]) -> Result<()>;

    /// As [`EncodedVectors::score_into`] with exact `f32` tables (the same as the fast path for
    /// kinds without a faster one).
    ///
    /// # Errors
    /// As [`EncodedVectors::score_into`].
    fn score_exact_into(&self, q: &Self::Query, out: &mut [f32]) -> Result<()>;

    /// [`EncodedVectors::score_into`] for several queries (`outs[i]` for `qs[i]`); kinds that can
    /// score several queries per pass over the rows (MSE with 1-, 2-, 4- or 5-bit codes) do, with
    /// the same scores up to float rounding.
    ///
    /// # Errors
    /// As [`EncodedVectors::score_into`] for any pair; `Core(LengthMismatch)` when the two slices
    /// differ in length.
    fn score_many_into(&self, qs: &[&Self::Query], outs: &mut [&mut [f32]]) -> Result<()> {
        crate::error::check_len("score outputs", outs.len(), qs.len())?;
        qs.iter()
            .zip(outs.iter_mut())
            .try_for_each(|(q, o)| self.score_into(q, o))
    }

    /// [`EncodedVectors::score_many_into`] (the same scores) asking, as the rows are scanned, for
    /// the lines of `ahead`'s regions that the same rows cover: the decode attention of a KV cache
    /// scores its keys with the value rows' [`EncodedVectors::ahead`], so the values come in from
    /// memory with the keys instead of after the softmax. MSE batches scanned on this thread
    /// ask where their grouped scans run: 1-, 2- and 4-bit nibble tables (AVX2 bodies), 5-bit
    /// tables, 4-bit byte dots (AVX-512 VBMI and VNNI) and 5-8-bit integer dots, for one query
    /// or several; 3-bit tables, queries on different grids, scalar fallbacks, scans split over
    /// threads and the other kinds ignore it.
    ///
    /// # Errors
    /// As [`EncodedVectors::score_many_into`].
    fn score_many_ahead(
        &self,
        qs: &[&Self::Query],
        outs: &mut [&mut [f32]],
        ahead: Ahead<'_>,
    ) -> Result<()> {
        let _ = ahead;
        self.score_many_into(qs, outs)
    }

    /// The bytes that hold the rows (codes and per-row scales, in row order), for a scan over as
    /// many rows of another batch to ask for ([`EncodedVectors::score_many_ahead`]): MSE and KIVI
    /// batches name theirs, the other kinds name nothing. O(1).
    fn ahead(&self) -> Ahead<'_> {
        Ahead::NONE
    }

    /// The `k` rows with the largest estimated inner product, best first (ties by index).
    ///
    /// # Errors
    /// As [`EncodedVectors::score_into`].
    fn top_k(&self, q: &Self::Query, k: usize) -> Result<Vec<Hit>>;

    /// [`EncodedVectors::top_k`] for several queries, in order; kinds that can scan several
    /// queries per pass over the rows (MSE when every query has 1-, 2- or 4-bit tables) do.
    ///
    /// # Errors
    /// As [`EncodedVectors::top_k`] for any query.
    fn top_k_many(&self, qs: &[&Self::Query], k: usize) -> Result<Vec<Vec<Hit>>> {
        qs.iter().map(|q| self.top_k(q, k)).collect()
    }

    /// Decodes row `i` into `out` (`dim` floats).
    ///
    /// # Errors
    /// [`crate::Error::RowOutOfRange`], [`crate::Error::DimMismatch`].
    fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()>;

    /// Decodes every row (row-major `len · dim` floats), in parallel.
    fn dequantize_all(&self) -> Vec<f32> {
        let d = self.dim();
        let mut out = vec![0.0; self.len() * d];
        out.par_chunks_mut(d.max(1)).enumerate().for_each(|(i, o)| {
            // Every index is in range and every chunk has length `d`.
            let _ = self.dequantize_row(i, o);
        });
        out
    }

    /// `outs[j] = Σ_i weights[j][i] · x̃_i` for every weight vector (attention outputs over
    /// decoded values). The default decodes each row with a non-zero weight once; kinds with a
    /// faster route (MSE: the rotated domain, one inverse rotation per output) override it.
    ///
    /// # Errors
    /// `Core(LengthMismatch)` unless `weights.len() == outs.len()` and every weight vector has
    /// `len()` entries; [`crate::Error::DimMismatch`] unless every output has `dim` entries.
    fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        check_weighted(self.len(), self.dim(), weights, outs)?;
        outs.iter_mut().for_each(|o| o.fill(0.0));
        let mut row = vec![0.0f32; self.dim()];
        for i in 0..self.len() {
            if weights.iter().all(|w| w[i] == 0.0) {
                continue;
            }
            self.dequantize_row(i, &mut row)?;
            for (w, o) in weights.iter().zip(outs.iter_mut()) {
                simd::axpy(w[i], &row, o);
            }
        }
        Ok(())
    }

    /// [`EncodedVectors::weighted_sums_into`] on the fast path, where a kind has one (MSE and
    /// grouped MSE: integer sums on the codebook's grid, see
    /// [`crate::MseBatch::accumulate_rotated_fast_multi`]); the default is the exact route.
    ///
    /// # Errors
    /// As [`EncodedVectors::weighted_sums_into`].
    fn weighted_sums_fast_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        self.weighted_sums_into(weights, outs)
    }

    /// Serializes the batch as a saved tq-batch (safetensors; [`crate::io`]).
    ///
    /// # Errors
    /// [`crate::Error::InvalidFormat`] only if the safetensors writer rejects the tensors.
    fn to_safetensors(&self) -> Result<Vec<u8>>;
}

/// The shape checks of [`EncodedVectors::weighted_sums_into`].
pub(crate) fn check_weighted(
    len: usize,
    dim: usize,
    weights: &[&[f32]],
    outs: &[&mut [f32]],
) -> Result<()> {
    check_len("weight vectors", outs.len(), weights.len())?;
    for w in weights {
        check_len("weights", len, w.len())?;
    }
    for o in outs {
        check_dim(o, dim)?;
    }
    Ok(())
}

impl EncodedVectors for MseBatch {
    type Query = MseQuery;
    fn dim(&self) -> usize {
        self.quantizer().dim()
    }
    fn len(&self) -> usize {
        MseBatch::len(self)
    }
    fn bytes_per_vector(&self) -> usize {
        MseBatch::bytes_per_vector(self)
    }
    fn memory_bytes(&self) -> usize {
        MseBatch::memory_bytes(self)
    }
    fn check_rows(&self, xs: &[f32]) -> Result<()> {
        check_batch(xs, self.dim())?;
        self.quantizer().check_scales(xs)
    }
    fn extend(&mut self, xs: &[f32]) -> Result<()> {
        MseBatch::extend(self, xs)
    }
    fn truncate(&mut self, n: usize) {
        MseBatch::truncate(self, n)
    }
    fn encode_query(&self, q: &[f32]) -> Result<MseQuery> {
        self.quantizer().prepare_query(q)
    }
    fn score_into(&self, q: &MseQuery, out: &mut [f32]) -> Result<()> {
        MseBatch::score_into(self, q, out)
    }
    fn score_exact_into(&self, q: &MseQuery, out: &mut [f32]) -> Result<()> {
        MseBatch::score_exact_into(self, q, out)
    }
    fn top_k(&self, q: &MseQuery, k: usize) -> Result<Vec<Hit>> {
        Ok(MseBatch::top_k(self, q, k))
    }
    fn top_k_many(&self, qs: &[&MseQuery], k: usize) -> Result<Vec<Vec<Hit>>> {
        Ok(MseBatch::top_k_many(self, qs, k))
    }
    fn score_many_into(&self, qs: &[&MseQuery], outs: &mut [&mut [f32]]) -> Result<()> {
        MseBatch::score_many_into(self, qs, outs)
    }
    fn score_many_ahead(
        &self,
        qs: &[&MseQuery],
        outs: &mut [&mut [f32]],
        ahead: Ahead<'_>,
    ) -> Result<()> {
        MseBatch::score_many_ahead(self, qs, outs, ahead)
    }
    fn ahead(&self) -> Ahead<'_> {
        MseBatch::ahead(self)
    }
    fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        MseBatch::dequantize_row(self, i, out)
    }
    fn dequantize_all(&self) -> Vec<f32> {
        MseBatch::dequantize_all(self)
    }
    /// In the rotated domain: the codes are decoded once for all weight vectors, then one inverse
    /// rotation per output; a centred quantizer's mean is added once, weighted by `Σ w`.
    fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        self.weighted_sums_with(weights, outs, false)
    }
    /// Integer sums ([`MseBatch::accumulate_rotated_fast_multi`]).
    fn weighted_sums_fast_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        self.weighted_sums_with(weights, outs, true)
    }
    fn to_safetensors(&self) -> Result<Vec<u8>> {
        MseBatch::to_safetensors(self)
    }
}

impl EncodedVectors for ProdBatch {
    type Query = ProdQuery;
    fn dim(&self) -> usize {
        self.quantizer().dim()
    }
    fn len(&self) -> usize {
        ProdBatch::len(self)
    }
    fn bytes_per_vector(&self) -> usize {
        ProdBatch::bytes_per_vector(self)
    }
    fn memory_bytes(&self) -> usize {
        ProdBatch::memory_bytes(self)
    }
    fn extend(&mut self, xs: &[f32]) -> Result<()> {
        ProdBatch::extend(self, xs)
    }
    fn truncate(&mut self, n: usize) {
        ProdBatch::truncate(self, n)
    }
    fn encode_query(&self, q: &[f32]) -> Result<ProdQuery> {
        self.quantizer().prepare_query(q)
    }
    fn score_into(&self, q: &ProdQuery, out: &mut [f32]) -> Result<()> {
        ProdBatch::score_into(self, q, out)
    }
    fn score_exact_into(&self, q: &ProdQuery, out: &mut [f32]) -> Result<()> {
        ProdBatch::score_exact_into(self, q, out)
    }
    fn top_k(&self, q: &ProdQuery, k: usize) -> Result<Vec<Hit>> {
        Ok(ProdBatch::top_k(self, q, k))
    }
    fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        ProdBatch::dequantize_row(self, i, out)
    }
    fn to_safetensors(&self) -> Result<Vec<u8>> {
        ProdBatch::to_safetensors(self)
    }
}

impl EncodedVectors for PolarBatch {
    type Query = PolarQuery;
    fn dim(&self) -> usize {
        self.quantizer().dim()
    }
    fn len(&self) -> usize {
        PolarBatch::len(self)
    }
    fn bytes_per_vector(&self) -> usize {
        PolarBatch::bytes_per_vector(self)
    }
    fn memory_bytes(&self) -> usize {
        PolarBatch::memory_bytes(self)
    }
    fn extend(&mut self, xs: &[f32]) -> Result<()> {
        PolarBatch::extend(self, xs)
    }
    fn truncate(&mut self, n: usize) {
        PolarBatch::truncate(self, n)
    }
    fn encode_query(&self, q: &[f32]) -> Result<PolarQuery> {
        self.quantizer().prepare_query(q)
    }
    fn score_into(&self, q: &PolarQuery, out: &mut [f32]) -> Result<()> {
        self.score_query_into(q, out)
    }
    fn score_exact_into(&self, q: &PolarQuery, out: &mut [f32]) -> Result<()> {
        self.score_query_into(q, out)
    }
    fn top_k(&self, q: &PolarQuery, k: usize) -> Result<Vec<Hit>> {
        self.top_k_query(q, k)
    }
    fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        PolarBatch::dequantize_row(self, i, out)
    }
    fn dequantize_all(&self) -> Vec<f32> {
        PolarBatch::dequantize_all(self)
    }
    /// One pass over the rows per weight vector, decoding in the rotated domain; one inverse
    /// rotation per output.
    fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        check_weighted(self.len(), self.dim(), weights, outs)?;
        for (w, out) in weights.iter().zip(outs.iter_mut()) {
            self.weighted_sum(w, out)?;
        }
        Ok(())
    }
    fn to_safetensors(&self) -> Result<Vec<u8>> {
        PolarBatch::to_safetensors(self)
    }
}

impl EncodedVectors for KiviBatch {
    type Query = KiviQuery;
    fn dim(&self) -> usize {
        self.quantizer().dim()
    }
    fn len(&self) -> usize {
        KiviBatch::len(self)
    }
    fn bytes_per_vector(&self) -> usize {
        KiviBatch::bytes_per_vector(self)
    }
    fn memory_bytes(&self) -> usize {
        KiviBatch::memory_bytes(self)
    }
    fn stored_bytes(&self) -> usize {
        KiviBatch::stored_bytes(self)
    }
    fn pending_len(&self) -> usize {
        self.residual_len()
    }
    fn check_rows(&self, xs: &[f32]) -> Result<()> {
        check_batch(xs, self.dim())?;
        check_range(xs, crate::kivi::MAX_ABS)
    }
    fn extend(&mut self, xs: &[f32]) -> Result<()> {
        KiviBatch::extend(self, xs)
    }
    fn truncate(&mut self, n: usize) {
        KiviBatch::truncate(self, n)
    }
    fn encode_query(&self, q: &[f32]) -> Result<KiviQuery> {
        self.quantizer().prepare_query(q)
    }
    fn score_into(&self, q: &KiviQuery, out: &mut [f32]) -> Result<()> {
        KiviBatch::score_into(self, q, out)
    }
    fn score_exact_into(&self, q: &KiviQuery, out: &mut [f32]) -> Result<()> {
        KiviBatch::score_exact_into(self, q, out)
    }
    fn ahead(&self) -> Ahead<'_> {
        KiviBatch::ahead(self)
    }
    fn top_k(&self, q: &KiviQuery, k: usize) -> Result<Vec<Hit>> {
        KiviBatch::top_k(self, q, k)
    }
    fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        KiviBatch::dequantize_row(self, i, out)
    }
    fn dequantize_all(&self) -> Vec<f32> {
        KiviBatch::dequantize_all(self)
    }
    fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        KiviBatch::weighted_sums_into(self, weights, outs)
    }
    fn to_safetensors(&self) -> Result<Vec<u8>> {
        KiviBatch::to_safetensors(self)
    }
}

impl EncodedVectors for GroupMseBatch {
    type Query = GroupMseQuery;
    fn dim(&self) -> usize {
        self.quantizer().dim()
    }
    fn len(&self) -> usize {
        GroupMseBatch::len(self)
    }
    fn bytes_per_vector(&self) -> usize {
        GroupMseBatch::bytes_per_vector(self)
    }
    fn memory_bytes(&self) -> usize {
        GroupMseBatch::memory_bytes(self)
    }
    fn stored_bytes(&self) -> usize {
        GroupMseBatch::stored_bytes(self)
    }
    fn pending_len(&self) -> usize {
        self.residual_len()
    }
    fn check_rows(&self, xs: &[f32]) -> Result<()> {
        check_batch(xs, self.dim())?;
        check_range(xs, crate::kivi::MAX_ABS)
    }
    fn extend(&mut self, xs: &[f32]) -> Result<()> {
        GroupMseBatch::extend(self, xs)
    }
    fn truncate(&mut self, n: usize) {
        GroupMseBatch::truncate(self, n)
    }
    fn encode_query(&self, q: &[f32]) -> Result<GroupMseQuery> {
        self.quantizer().prepare_query(q)
    }
    fn score_into(&self, q: &GroupMseQuery, out: &mut [f32]) -> Result<()> {
        GroupMseBatch::score_into(self, q, out)
    }
    fn score_exact_into(&self, q: &GroupMseQuery, out: &mut [f32]) -> Result<()> {
        GroupMseBatch::score_exact_into(self, q, out)
    }
    fn top_k(&self, q: &GroupMseQuery, k: usize) -> Result<Vec<Hit>> {
        GroupMseBatch::top_k(self, q, k)
    }
    fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        GroupMseBatch::dequantize_row(self, i, out)
    }
    fn dequantize_all(&self) -> Vec<f32> {
        GroupMseBatch::dequantize_all(self)
    }
    fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        GroupMseBatch::weighted_sums_into(self, weights, outs)
    }
    fn weighted_sums_fast_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        GroupMseBatch::weighted_sums_fast_into(self, weights, outs)
    }
    fn to_safetensors(&self) -> Result<Vec<u8>> {
        GroupMseBatch::to_safetensors(self)
    }
}
