//! TurboQuant_prod on the device: quantize (MSE codes, residual norms, QJL signs), dequantize and
//! upload for resident scoring.

use std::sync::Arc;

use tq_quant::{AnyQuantizer, PackedRows, ProdBatch, ProdQuantizer};

use crate::context::{GpuContext, Params, check_rows};
use crate::resident::ResidentBatch;
use crate::{Error, Result};

impl GpuContext {
    /// Quantizes `xs` with TurboQuant_prod (`bits >= 2`: the `(b-1)`-bit MSE stage, the residual
    /// norm and the QJL signs of the rotated-domain residual) into a [`ProdBatch`] equal to
    /// [`ProdBatch::extend`]'s up to ties (codes at boundaries; signs of projections within float
    /// rounding of zero, since the CPU projects with a matrix library in another order).
    ///
    /// # Errors
    /// As [`GpuContext::quantize_mse`]; 1-bit Prod is [`Error::Unsupported`].
    pub fn quantize_prod(&self, quantizer: &Arc<ProdQuantizer>, xs: &[f32]) -> Result<ProdBatch> {
        let mse = quantizer
            .mse()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let d = quantizer.dim();
        check_rows(xs, d)?;
        let qb = self.quant_buffers(mse, Some(quantizer))?;
        let mut table = mse.codebook().boundaries().to_vec();
        table.extend_from_slice(mse.codebook().centroids());
        let table = self.init(bytemuck::cast_slice(&table), wgpu::BufferUsages::STORAGE);
        let n = xs.len() / d;
        let (rb, sb) = (mse.row_bytes(), quantizer.sign_bytes());
        let chunk = self.chunk_rows((d * 4) as u64);
        let (mut codes, mut signs) = (PackedRows::new(rb), PackedRows::new(sb));
        codes.resize_rows(n);
        signs.resize_rows(n);
        let (mut norms, mut gammas) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let dummy = self.zeroed(4, wgpu::BufferUsages::STORAGE);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let x = self.init(
                bytemuck::cast_slice(&xs[start * d..(start + rows) * d]),
                wgpu::BufferUsages::STORAGE,
            );
            let blocks = rows.div_ceil(32);
            let (code_bytes, sign_bytes) = ((blocks * 32 * rb) as u64, (blocks * 32 * sb) as u64);
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
            let buf = self.zeroed(code_bytes + sign_bytes, usage);
            let scal = self.zeroed((2 * rows * 4) as u64, usage);
            let params = Params {
                rows: rows as u32,
                sign_word_off: (code_bytes / 4) as u32,
                ..qb.params
            };
            let (params, rotated) = self.pre_rotate(&qb, params, &x, rows)?;
            self.run(
                &self.quantize_prod,
                params,
                &qb,
                &table,
                &x,
                &buf,
                &scal,
                rotated.as_ref().unwrap_or(&dummy),
                (rows as u32, 1),
            )?;
            let bytes = self.read(&buf, code_bytes + sign_bytes)?;
            let (cb, sgb) = bytes.split_at(code_bytes as usize);
            codes.blocks_mut_from(start / 32)[..cb.len()].copy_from_slice(cb);
            signs.blocks_mut_from(start / 32)[..sgb.len()].copy_from_slice(sgb);
            let sc = self.read(&scal, (2 * rows * 4) as u64)?;
            let sc: &[f32] = bytemuck::cast_slice(&sc);
            norms.extend_from_slice(&sc[..rows]);
            gammas.extend_from_slice(&sc[rows..]);
        }
        Ok(ProdBatch::from_parts(
            quantizer.clone(),
            Some(codes),
            signs,
            norms,
            gammas,
        )?)
    }

    /// Decodes every row of a TurboQuant_prod batch on the GPU:
    /// `norm · Πᵀ(c[codes] + γ·sqrt(π/2)/m · Sᵀ signs)`.
    ///
    /// # Errors
    /// As [`GpuContext::quantize_prod`].
    pub fn dequantize_prod(&self, batch: &ProdBatch) -> Result<Vec<f32>> {
        let q = batch.quantizer();
        let mse = q
            .mse()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let codes = batch
            .codes()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let qb = self.quant_buffers(mse, Some(q))?;
        let d = q.dim();
        let table = self.init(
            bytemuck::cast_slice(mse.codebook().centroids()),
            wgpu::BufferUsages::STORAGE,
        );
        let chunks = self.chunks_of(
            codes,
            Some(batch.signs()),
            batch.norms(),
            Some(batch.residual_norms()),
            d * 4,
        )?;
        self.decode_chunks(&self.dequantize_prod, &qb, &table, &chunks, d, batch.len())
    }

    /// [`GpuContext::upload`] for a TurboQuant_prod batch (`bits >= 2`).
    ///
    /// # Errors
    /// As [`GpuContext::quantize_prod`].
    pub fn upload_prod<'a>(&'a self, batch: &ProdBatch) -> Result<ResidentBatch<'a>> {
        let q = batch.quantizer().clone();
        let mse = q
            .mse()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let qb = self.quant_buffers(mse, Some(&q))?;
        let codes = batch
            .codes()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let chunks = self.chunks_of(
            codes,
            Some(batch.signs()),
            batch.norms(),
            Some(batch.residual_norms()),
            4,
        )?;
        Ok(ResidentBatch {
            ctx: self,
            quantizer: AnyQuantizer::Prod(q),
            qb,
            chunks,
            len: batch.len(),
        })
    }
}
