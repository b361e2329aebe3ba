//! The `kernels` workload: each batch kernel timed alone on the CPU path and on the wgpu path
//! (device synchronisation, uploads and read-backs included), with vectors/s and GB/s.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tq_quant::{EncodedVectors, QuantizerKind, QuantizerSpec, RotationKind};

/// Which implementation runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// tq-quant on the CPU (rayon threads, AVX2 where available).
    Cpu,
    /// tq-gpu's WGSL kernels through wgpu.
    Wgpu,
}

/// The quantizers with batch kernels on both backends (PolarQuant has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelQuantizer {
    /// TurboQuant_mse.
    Mse,
    /// TurboQuant_prod (needs --bits >= 2 on the GPU).
    Prod,
}

impl KernelQuantizer {
    /// The tq-quant kind this choice builds.
    pub fn kind(self) -> QuantizerKind {
        match self {
            KernelQuantizer::Mse => QuantizerKind::Mse,
            KernelQuantizer::Prod => QuantizerKind::Prod,
        }
    }
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

/// Times quantize, dequantize and score (one query) for `n` random `d`-dim vectors at `bits`,
/// with the quantizer `kind` (the CPU's dequantize decodes rows in parallel for every kind).
///
/// `gpu` must be given when `backends` contains [`Backend::Wgpu`]; the caller creates (and drops)
/// it on its own thread, not on a worker of the rayon pool this runs in: Mesa's software Vulkan
/// keeps per-thread state that must not outlive the pool's threads. `progress` is told what
/// starts next (data, then each backend's kernels).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: Option<&tq_gpu::GpuContext>,
    backends: &[Backend],
    kind: QuantizerKind,
    n: usize,
    d: usize,
    bits: u32,
    seed: u64,
    reps: usize,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(Vec<KernelRow>, Option<String>)> {
    progress(&format!("generating and quantizing {n} vectors"));
    let xs = tq_bench::data::synthetic_base(n, d, seed).data;
    let query = tq_bench::data::synthetic_queries(1, d, seed).data;
    let q = QuantizerSpec::new(kind, d, bits, RotationKind::Hadamard, seed).build()?;
    // Stored bytes per row and f32 bytes per row.
    let (row, f32_bytes) = (q.bytes_per_vector() as f64, (d * 4) as f64);
    let traffic = |kernel: &str| -> f64 {
        n as f64
            * match kernel {
                "quantize" | "dequantize" => f32_bytes + row,
                _ => row + 4.0,
            }
    };
    let mut batch = q.new_batch();
    batch.extend(&xs)?;
    let mut rows = Vec::new();
    let mut adapter = None;
    let mk = |backend, kernel: &'static str, s: f64| KernelRow {
        backend,
        kernel,
        vectors_per_s: n as f64 / s,
        gb_per_s: traffic(kernel) / s / 1e9,
        seconds: s,
    };
    for &b in backends {
        progress(&format!(
            "{} kernels: quantize, dequantize, score ({reps} repetition{})",
            match b {
                Backend::Cpu => "cpu",
                Backend::Wgpu => "wgpu",
            },
            if reps == 1 { "" } else { "s" }
        ));
        let (tq, tdq, ts) = match b {
            Backend::Cpu => {
                let tq = best_of(reps, || Ok(q.new_batch().extend(&xs)?))?;
                let tdq = best_of(reps, || {
                    std::hint::black_box(batch.dequantize_all());
                    Ok(())
                })?;
                let prepared = batch.encode_query(&query)?;
                let mut out = vec![0.0f32; n];
                let ts = best_of(reps, || Ok(batch.score_exact_into(&prepared, &mut out)?))?;
                (tq, tdq, ts)
            }
            Backend::Wgpu => {
                let gpu =
                    gpu.ok_or_else(|| anyhow::anyhow!("the wgpu backend needs a GPU context"))?;
                adapter = Some(gpu.adapter());
                let tq = best_of(reps, || {
                    std::hint::black_box(gpu.quantize(&q, &xs)?);
                    Ok(())
                })?;
                let tdq = best_of(reps, || {
                    std::hint::black_box(gpu.dequantize(&batch)?);
                    Ok(())
                })?;
                let resident = gpu.upload_batch(&batch)?;
                let ts = best_of(reps, || {
                    std::hint::black_box(resident.score(&query)?);
                    Ok(())
                })?;
                (tq, tdq, ts)
            }
        };
        rows.push(mk(b, "quantize", tq));
        rows.push(mk(b, "dequantize", tdq));
        rows.push(mk(b, "score", ts));
    }
    Ok((rows, adapter))
}
