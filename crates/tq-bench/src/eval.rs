//! The vector workloads' evaluation: quantize a base set at each bit width, measure distortion,
//! inner-product error, recall and throughput (docs/DESIGN.md, Metrics).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;
use ndarray::{ArrayView1, ArrayView2};
use rayon::prelude::*;
use serde::Serialize;
use tq_core::{Codebook, RotationKind};
use tq_quant::{EncodedVectors, QuantizerSpec, ScaleMode, SketchKind};

use tq_bench::data::Vectors;

/// Which quantizer a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizerKind {
    /// TurboQuant_mse.
    Mse,
    /// TurboQuant_prod.
    Prod,
    /// PolarQuant (experimental): level bits from --polar-levels, or `b, b/2, b/2, b/2` for
    /// each --bits value `b` (the paper's 4,2,2,2 at 4).
    Polar,
}

/// Settings shared by every bit width of one run.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub quantizer: QuantizerKind,
    pub rotation: RotationKind,
    pub sketch: SketchKind,
    pub seed: u64,
    /// Queries used for the inner-product error metrics (all queries are used for recall).
    pub ip_queries: usize,
    /// The per-vector scalar of MSE quantizers.
    pub scale: ScaleMode,
    /// The mean of the base vectors, when MSE quantizers are centred.
    pub mean: Option<Vec<f32>>,
    /// PolarQuant level bits (overrides the mapping from --bits).
    pub polar_levels: Option<Vec<u32>>,
    /// Quantize MSE batches with tq-gpu's kernels instead of the CPU path (`--backend wgpu`).
    pub gpu: Option<Arc<tq_gpu::GpuContext>>,
}

impl QuantizerKind {
    /// The tq-quant kind this choice builds.
    pub fn kind(self) -> tq_quant::QuantizerKind {
        match self {
            QuantizerKind::Mse => tq_quant::QuantizerKind::Mse,
            QuantizerKind::Prod => tq_quant::QuantizerKind::Prod,
            QuantizerKind::Polar => tq_quant::QuantizerKind::Polar,
        }
    }
}

impl EvalSettings {
    /// The quantizer of one bit width.
    pub fn spec(&self, dim: usize, bits: u32) -> QuantizerSpec {
        QuantizerSpec::new(self.quantizer.kind(), dim, bits, self.rotation, self.seed)
            .with_scale(self.scale)
            .with_sketch(self.sketch)
            .with_mean(self.mean.clone())
            .with_polar_levels(self.polar_levels.clone())
    }
}

/// Recall is measured for the true top-1 among the estimated top-k for these k.
pub const RECALL_K: [usize; 3] = [1, 4, 16];

/// Measured numbers for one bit width (the `results` entries of the JSON report).
#[derive(Debug, Clone, Serialize)]
pub struct BitsResult {
    pub bits: u32,
    /// Mean `‖x - x̃‖² / ‖x‖²` over base vectors with non-zero norm.
    pub d_mse: f64,
    /// MSE only: `D_mse` of the codebook for the exact coordinate law (Haar theory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d_mse_theory: Option<f64>,
    /// Mean of `estimate - ⟨q, x⟩` (exact-table path).
    pub ip_bias: f64,
    /// Root mean square of `estimate - ⟨q, x⟩`.
    pub ip_rmse: f64,
    /// `d · mean((estimate - ⟨q, x⟩)²)`.
    pub ip_mse_times_d: f64,
    /// Prod only: the paper's bound `(π/2)·D_mse(b-1)` on `ip_mse_times_d` for unit vectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_mse_times_d_bound: Option<f64>,
    /// RMS difference between the fast (u8 tables, byte or integer dots) and exact scores.
    pub fast_extra_rmse: f64,
    /// Fraction of queries whose true top-1 inner product is among the estimated top-k.
    pub recall_1_at_k: BTreeMap<String, f64>,
    /// Stored bytes per vector, codes and scalars.
    pub bytes_per_vector: usize,
    /// Stored bits per coordinate, scalars included.
    pub bits_per_coordinate: f64,
    /// Batch quantization throughput.
    pub quantize_vectors_per_s: f64,
    /// Scoring throughput of the fast path (query preparation included).
    pub score_keys_per_s: f64,
    /// Scoring throughput of the exact f32-table path.
    pub score_exact_keys_per_s: f64,
}

/// Ground truth computed once per data set: the true top-1 of every query and the exact inner
/// products of the first `ip_queries` queries with every base vector.
pub struct Truth {
    top1: Vec<usize>,
    ips: Vec<f32>,
    ip_queries: usize,
}

/// Exact float inner products `base · q` (a matrix-vector product).
fn exact_ips(base: &Vectors, q: &[f32]) -> Vec<f32> {
    let (Ok(b), q) = (
        ArrayView2::from_shape((base.rows, base.dim), &base.data[..]),
        ArrayView1::from(q),
    ) else {
        return Vec::new();
    };
    b.dot(&q).to_vec()
}

impl Truth {
    pub fn compute(base: &Vectors, queries: &Vectors, ip_queries: usize) -> Truth {
        let per_query: Vec<(usize, Vec<f32>)> = (0..queries.rows)
            .into_par_iter()
            .map(|i| {
                let ips = exact_ips(base, queries.row(i));
                let top = ips
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(j, _)| j);
                (top, if i < ip_queries { ips } else { Vec::new() })
            })
            .collect();
        let ip_queries = ip_queries.min(queries.rows);
        let mut ips = Vec::with_capacity(ip_queries * base.rows);
        let mut top1 = Vec::with_capacity(queries.rows);
        for (t, v) in per_query {
            top1.push(t);
            ips.extend(v);
        }
        Truth {
            top1,
            ips,
            ip_queries,
        }
    }
}

/// Evaluates one bit width.
pub fn eval_bits(
    s: &EvalSettings,
    base: &Vectors,
    queries: &Vectors,
    truth: &Truth,
    bits: u32,
    progress: &ProgressBar,
) -> Result<BitsResult> {
    let d = base.dim;
    let n = base.rows;
    let quantizer = s.spec(d, bits).build()?;
    let t = Instant::now();
    let batch = match &s.gpu {
        Some(gpu) => gpu.quantize(&quantizer, &base.data)?,
        None => {
            let mut b = quantizer.new_batch();
            b.extend(&base.data)?;
            b
        }
    };
    let quantize_vectors_per_s = n as f64 / t.elapsed().as_secs_f64();

    // Distortion over vectors with non-zero norm.
    let back = batch.dequantize_all();
    let (sum, count) = base
        .data
        .par_chunks(d)
        .zip(back.par_chunks(d))
        .map(|(x, y)| {
            let nx: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
            if nx == 0.0 {
                return (0.0, 0usize);
            }
            let e: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            (e / nx, 1)
        })
        .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let d_mse = if count > 0 { sum / count as f64 } else { 0.0 };

    // Inner-product error (exact path) and fast-path extra error, on the first ip_queries queries.
    let (mut e1, mut e2, mut fast2) = (0.0f64, 0.0f64, 0.0f64);
    let mut exact = vec![0.0f32; n];
    let mut fast = vec![0.0f32; n];
    let t = Instant::now();
    let mut exact_time = 0.0;
    for qi in 0..truth.ip_queries {
        let q = batch.encode_query(queries.row(qi))?;
        let te = Instant::now();
        batch.score_exact_into(&q, &mut exact)?;
        exact_time += te.elapsed().as_secs_f64();
        batch.score_into(&q, &mut fast)?;
        let tr = &truth.ips[qi * n..(qi + 1) * n];
        for ((&e, &f), &t) in exact.iter().zip(&fast).zip(tr) {
            let err = e as f64 - t as f64;
            e1 += err;
            e2 += err * err;
            fast2 += ((f - e) as f64).powi(2);
        }
        progress.inc(1);
    }
    let _ = t;
    let pairs = (truth.ip_queries * n).max(1) as f64;
    let score_exact_keys_per_s = (truth.ip_queries * n) as f64 / exact_time.max(1e-12);

    // Fast scoring throughput over all queries.
    let t = Instant::now();
    for qi in 0..queries.rows {
        let q = batch.encode_query(queries.row(qi))?;
        batch.score_into(&q, &mut fast)?;
    }
    let score_keys_per_s = (queries.rows * n) as f64 / t.elapsed().as_secs_f64();

    // Recall of the true top-1 within the estimated top-k.
    let kmax = *RECALL_K.iter().max().unwrap_or(&1);
    let mut found = [0usize; RECALL_K.len()];
    for qi in 0..queries.rows {
        let q = batch.encode_query(queries.row(qi))?;
        let hits = batch.top_k(&q, kmax)?;
        if let Some(pos) = hits.iter().position(|h| h.index == truth.top1[qi]) {
            for (f, &k) in found.iter_mut().zip(&RECALL_K) {
                if pos < k {
                    *f += 1;
                }
            }
        }
        progress.inc(1);
    }
    let recall_1_at_k = RECALL_K
        .iter()
        .zip(found)
        .map(|(k, f)| (k.to_string(), f as f64 / queries.rows.max(1) as f64))
        .collect();

    let (d_mse_theory, bound) = match s.quantizer {
        QuantizerKind::Mse => (Some(Codebook::get(d, bits)?.distortion()), None),
        QuantizerKind::Prod => {
            let prev = if bits > 1 {
                Codebook::get(d, bits - 1)?.distortion()
            } else {
                1.0
            };
            (None, Some(std::f64::consts::FRAC_PI_2 * prev))
        }
        QuantizerKind::Polar => (None, None),
    };
    let bpv = batch.bytes_per_vector();
    Ok(BitsResult {
        bits,
        d_mse,
        d_mse_theory,
        ip_bias: e1 / pairs,
        ip_rmse: (e2 / pairs).sqrt(),
        ip_mse_times_d: d as f64 * e2 / pairs,
        ip_mse_times_d_bound: bound,
        fast_extra_rmse: (fast2 / pairs).sqrt(),
        recall_1_at_k,
        bytes_per_vector: bpv,
        bits_per_coordinate: (8 * bpv) as f64 / d as f64,
        quantize_vectors_per_s,
        score_keys_per_s,
        score_exact_keys_per_s,
    })
}
