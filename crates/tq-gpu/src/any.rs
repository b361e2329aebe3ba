//! Batches of a kind chosen at run time ([`tq_quant::AnyQuantizer`], [`tq_quant::AnyBatch`]): the
//! kinds the kernels implement (MSE, Prod with `bits >= 2`) go to their pipelines, the others are
//! [`Error::Unsupported`].

use tq_quant::{AnyBatch, AnyQuantizer};

use crate::context::GpuContext;
use crate::resident::ResidentBatch;
use crate::{Error, Result};

fn unsupported(q: &AnyQuantizer) -> Error {
    Error::Unsupported(format!(
        "{} quantizers (the kernels run mse and prod)",
        q.kind()
    ))
}

impl GpuContext {
    /// Quantizes `xs` (row-major, `n · d` finite f32) with `quantizer` on the GPU: as
    /// [`GpuContext::quantize_mse`] or [`GpuContext::quantize_prod`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] for PolarQuant and configurations the kernels do not implement;
    /// tq-quant's input errors; device errors.
    pub fn quantize(&self, quantizer: &AnyQuantizer, xs: &[f32]) -> Result<AnyBatch> {
        match quantizer {
            AnyQuantizer::Mse(q) => Ok(self.quantize_mse(q, xs)?.into()),
            AnyQuantizer::Prod(q) => Ok(self.quantize_prod(q, xs)?.into()),
            other => Err(unsupported(other)),
        }
    }

    /// Decodes every row of `batch` on the GPU (row-major `n · d`): as
    /// [`GpuContext::dequantize_mse`] or [`GpuContext::dequantize_prod`].
    ///
    /// # Errors
    /// As [`GpuContext::quantize`].
    pub fn dequantize(&self, batch: &AnyBatch) -> Result<Vec<f32>> {
        match batch {
            AnyBatch::Mse(b) => self.dequantize_mse(b),
            AnyBatch::Prod(b) => self.dequantize_prod(b),
            other => Err(unsupported(&other.quantizer())),
        }
    }

    /// Uploads `batch` once for repeated scoring: as [`GpuContext::upload`] or
    /// [`GpuContext::upload_prod`].
    ///
    /// # Errors
    /// As [`GpuContext::quantize`].
    pub fn upload_batch<'a>(&'a self, batch: &AnyBatch) -> Result<ResidentBatch<'a>> {
        match batch {
            AnyBatch::Mse(b) => self.upload(b),
            AnyBatch::Prod(b) => self.upload_prod(b),
            other => Err(unsupported(&other.quantizer())),
        }
    }
}
