//! TurboQuant_mse on the device: quantize, dequantize and upload for resident scoring.

use std::sync::Arc;

use tq_quant::{AnyQuantizer, MseBatch, MseQuantizer, PackedRows, RowScales};

use crate::Result;
use crate::context::{GpuContext, Params, check_rows};
use crate::resident::ResidentBatch;

impl GpuContext {
    /// Quantizes `xs` (row-major, `n · d` finite f32) on the GPU into a batch of `quantizer`
    /// (same codes, layout and norms as [`MseBatch::extend`], up to boundary ties).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for configurations the kernels do not implement; tq-quant's input
    /// errors; device errors.
    pub fn quantize_mse(&self, quantizer: &Arc<MseQuantizer>, xs: &[f32]) -> Result<MseBatch> {
        let d = quantizer.dim();
        check_rows(xs, d)?;
        let qb = self.quant_buffers(quantizer, None)?;
        // Boundaries, then centroids (for the least-squares and unbiased scales).
        let mut table = quantizer.codebook().boundaries().to_vec();
        table.extend_from_slice(quantizer.codebook().centroids());
        let table = self.init(bytemuck::cast_slice(&table), wgpu::BufferUsages::STORAGE);
        let n = xs.len() / d;
        let rb = quantizer.row_bytes();
        let chunk = self.chunk_rows((d * 4) as u64);
        let mut packed = PackedRows::new(rb);
        packed.resize_rows(n);
        let mut norms = Vec::with_capacity(n);
        let dummy = self.zeroed(4, wgpu::BufferUsages::STORAGE);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let x = self.init(
                bytemuck::cast_slice(&xs[start * d..(start + rows) * d]),
                wgpu::BufferUsages::STORAGE,
            );
            let blocks = rows.div_ceil(32);
            let code_bytes = (blocks * 32 * rb) as u64;
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
            let codes = self.zeroed(code_bytes, usage);
            let norm_buf = self.zeroed((rows * 4) as u64, usage);
            let params = Params {
                rows: rows as u32,
                ..qb.params
            };
            let (params, rotated) = self.pre_rotate(&qb, params, &x, rows)?;
            self.run(
                &self.quantize,
                params,
                &qb,
                &table,
                &x,
                &codes,
                &norm_buf,
                rotated.as_ref().unwrap_or(&dummy),
                (rows as u32, 1),
            )?;
            let bytes = self.read(&codes, code_bytes)?;
            let first_block = start / 32;
            packed.blocks_mut_from(first_block)[..bytes.len()].copy_from_slice(&bytes);
            let nb = self.read(&norm_buf, (rows * 4) as u64)?;
            norms.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&nb));
        }
        // f16 scales are rounded here, as the CPU rounds them (an overflow is the same error).
        let scales = RowScales::from_f32(quantizer.config().scale_precision, &norms)?;
        Ok(MseBatch::from_parts(quantizer.clone(), packed, scales)?)
    }

    /// Decodes every row of `batch` on the GPU: `norm · Πᵀ c[codes]` (row-major `n · d`).
    ///
    /// # Errors
    /// As [`GpuContext::quantize_mse`].
    pub fn dequantize_mse(&self, batch: &MseBatch) -> Result<Vec<f32>> {
        let q = batch.quantizer();
        let qb = self.quant_buffers(q, None)?;
        let table = self.init(
            bytemuck::cast_slice(q.codebook().centroids()),
            wgpu::BufferUsages::STORAGE,
        );
        let chunks = self.chunks_of(batch.codes(), None, &batch.norms(), None, q.dim() * 4)?;
        self.decode_chunks(&self.dequantize, &qb, &table, &chunks, q.dim(), batch.len())
    }

    /// Uploads `batch` once; the returned handle scores queries against it without re-uploading.
    ///
    /// # Errors
    /// As [`GpuContext::quantize_mse`].
    pub fn upload<'a>(&'a self, batch: &MseBatch) -> Result<ResidentBatch<'a>> {
        let q = batch.quantizer().clone();
        let qb = self.quant_buffers(&q, None)?;
        let chunks = self.chunks_of(batch.codes(), None, &batch.norms(), None, 4)?;
        Ok(ResidentBatch {
            ctx: self,
            quantizer: AnyQuantizer::Mse(q),
            qb,
            chunks,
            len: batch.len(),
        })
    }
}
