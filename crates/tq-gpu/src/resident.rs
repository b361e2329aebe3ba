//! A batch kept on the device for repeated scoring and top-k.

use tq_quant::AnyQuantizer;

use crate::context::{Chunk, GpuContext, MAX_GROUPS, Params, QuantBuffers, check_rows};
use crate::{Error, Result};

/// A batch kept on the device for repeated scoring.
pub struct ResidentBatch<'a> {
    pub(crate) ctx: &'a GpuContext,
    /// The batch's quantizer (MSE or Prod: uploads of other kinds are refused).
    pub(crate) quantizer: AnyQuantizer,
    pub(crate) qb: QuantBuffers,
    pub(crate) chunks: Vec<Chunk>,
    pub(crate) len: usize,
}

impl std::fmt::Debug for ResidentBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentBatch")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl ResidentBatch<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Exact scores of every row for query `q`: `⟨q, x̃_i⟩` for MSE (as
    /// [`MseBatch::score_exact_into`]) or the unbiased Prod estimate (as
    /// [`ProdBatch::score_exact_into`]), up to float summation order.
    ///
    /// # Errors
    /// tq-quant's query errors; device errors.
    pub fn score(&self, q: &[f32]) -> Result<Vec<f32>> {
        let ctx = self.ctx;
        let (mse, sketch, pipeline) = match &self.quantizer {
            AnyQuantizer::Mse(m) => (m.as_ref(), None, &ctx.score),
            AnyQuantizer::Prod(p) => {
                let mse = p
                    .mse()
                    .ok_or_else(|| Error::Unsupported("1-bit Prod".into()))?;
                (
                    mse,
                    Some(p.prepare_query(q)?.projected().to_vec()),
                    &ctx.score_prod,
                )
            }
            other => return Err(Error::Unsupported(format!("{} batches", other.kind()))),
        };
        let prepared = mse.prepare_query(q)?;
        // A centred MSE quantizer adds <q, mean> to every score (zero otherwise and for Prod).
        let offset = match &self.quantizer {
            AnyQuantizer::Mse(_) => prepared.offset(),
            _ => 0.0,
        };
        let rotated = prepared.rotated().to_vec();
        let c = mse.codebook().centroids();
        let mut table: Vec<f32> = rotated
            .iter()
            .flat_map(|&r| c.iter().map(move |&cv| r * cv))
            .collect();
        if let Some(sq) = sketch {
            table.extend_from_slice(&sq);
        }
        let table = ctx.init(bytemuck::cast_slice(&table), wgpu::BufferUsages::STORAGE);
        let dummy = ctx.zeroed(4, wgpu::BufferUsages::STORAGE);
        let mut out = Vec::with_capacity(self.len);
        for ch in &self.chunks {
            let bytes = (ch.rows * 4) as u64;
            let res = ctx.zeroed(
                bytes,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            );
            let params = Params {
                rows: ch.rows as u32,
                sign_word_off: ch.sign_word_off,
                ..self.qb.params
            };
            let groups = (ch.rows as u32).div_ceil(64);
            let (gx, gy) = if groups > MAX_GROUPS {
                (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
            } else {
                (groups, 1)
            };
            ctx.run(
                pipeline,
                params,
                &self.qb,
                &table,
                &dummy,
                &ch.codes,
                &ch.norms,
                &res,
                (gx, gy),
            )?;
            let scores = ctx.read(&res, bytes)?;
            out.extend(
                bytemuck::cast_slice::<u8, f32>(&scores)
                    .iter()
                    .map(|s| s + offset),
            );
        }
        Ok(out)
    }

    /// Scores of every row for each of `queries` (row-major, `m · d`): one vector per query.
    /// The batch stays on the device; each query costs one table upload and one dispatch per
    /// chunk.
    ///
    /// # Errors
    /// [`tq_quant::Error::DimMismatch`] unless `queries` holds whole rows; as
    /// [`ResidentBatch::score`].
    pub fn score_many(&self, queries: &[f32]) -> Result<Vec<Vec<f32>>> {
        let d = self.dim();
        check_rows(queries, d)?;
        queries.chunks_exact(d).map(|q| self.score(q)).collect()
    }

    /// The `k` best rows for each of `queries` (row-major), best first.
    ///
    /// # Errors
    /// As [`ResidentBatch::score_many`].
    pub fn top_k_many(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let d = self.dim();
        check_rows(queries, d)?;
        queries.chunks_exact(d).map(|q| self.top_k(q, k)).collect()
    }

    fn dim(&self) -> usize {
        self.quantizer.dim()
    }

    /// The `k` best rows for `q` by GPU scores (ties by index), best first.
    ///
    /// # Errors
    /// As [`ResidentBatch::score`].
    pub fn top_k(&self, q: &[f32], k: usize) -> Result<Vec<(usize, f32)>> {
        let s = self.score(q)?;
        let mut idx: Vec<usize> = (0..s.len()).collect();
        let k = k.min(idx.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let cmp = |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        idx.sort_by(cmp);
        Ok(idx.into_iter().map(|i| (i, s[i])).collect())
    }
}
