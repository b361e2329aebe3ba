//! The `kernels` workload: each batch kernel timed alone on the CPU path and on the wgpu path
//! (device synchronisation, uploads and read-backs included), with vectors/s and GB/s.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tq_quant::{MseBatch, MseConfig, MseQuantizer, RotationKind};

/// Which implementation runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// tq-quant on the CPU (rayon threads, AVX2 where available).
    Cpu,
    /// tq-gpu's WGSL kernels through wgpu.
    Wgpu,
}

/// One timed kernel.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRow {
    /// cpu or wgpu.
    pub backend: Backend,
    /// quantize, dequantize or score.
    pub kernel: &'static str,
    /// Vectors processed per second (rows scored per second for `score`).
    pub vectors_per_s: f64,
    /// Bytes read and written by the kernel per second (inputs, codes, norms, outputs), GB/s.
    pub gb_per_s: f64,
    /// Best wall-clock seconds of the repetitions.
    pub seconds: f64,
}

fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Times quantize, dequantize and score (one query) for `n` random `d`-dim vectors at `bits`.
pub fn run(
    backends: &[Backend],
    n: usize,
    d: usize,
    bits: u32,
    seed: u64,
    reps: usize,
) -> Result<(Vec<KernelRow>, Option<String>)> {
    let q = Arc::new(MseQuantizer::new(MseConfig::new(
        d,
        bits,
        RotationKind::Hadamard,
        seed,
    ))?);
    let xs = crate::data::synthetic_base(n, d, seed).data;
    let query = crate::data::synthetic_queries(1, d, seed).data;
    let mut cpu = MseBatch::new(q.clone());
    cpu.extend(&xs)?;
    let (rb, f32_bytes) = (q.row_bytes() as f64, (d * 4) as f64);
    let traffic = |kernel: &str| -> f64 {
        n as f64
            * match kernel {
                "quantize" => f32_bytes + rb + 4.0,
                "dequantize" => rb + 4.0 + f32_bytes,
                _ => rb + 4.0 + 4.0,
            }
    };
    let mut rows = Vec::new();
    let mut adapter = None;
    let row = |backend, kernel: &'static str, s: f64| KernelRow {
        backend,
        kernel,
        vectors_per_s: n as f64 / s,
        gb_per_s: traffic(kernel) / s / 1e9,
        seconds: s,
    };
    for &b in backends {
        match b {
            Backend::Cpu => {
                let s = best_of(reps, || {
                    let mut batch = MseBatch::new(q.clone());
                    batch.extend(&xs)?;
                    Ok(())
                })?;
                rows.push(row(b, "quantize", s));
                let s = best_of(reps, || {
                    std::hint::black_box(cpu.dequantize_all());
                    Ok(())
                })?;
                rows.push(row(b, "dequantize", s));
                let prepared = q.prepare_query(&query)?;
                let mut out = vec![0.0f32; n];
                let s = best_of(reps, || Ok(cpu.score_exact_into(&prepared, &mut out)?))?;
                rows.push(row(b, "score", s));
            }
            Backend::Wgpu => {
                let gpu = tq_gpu::GpuContext::new()?;
                adapter = Some(gpu.adapter());
                let s = best_of(reps, || {
                    std::hint::black_box(gpu.quantize_mse(&q, &xs)?);
                    Ok(())
                })?;
                rows.push(row(b, "quantize", s));
                let s = best_of(reps, || {
                    std::hint::black_box(gpu.dequantize_mse(&cpu)?);
                    Ok(())
                })?;
                rows.push(row(b, "dequantize", s));
                let resident = gpu.upload(&cpu)?;
                let s = best_of(reps, || {
                    std::hint::black_box(resident.score(&query)?);
                    Ok(())
                })?;
                rows.push(row(b, "score", s));
            }
        }
    }
    Ok((rows, adapter))
}
