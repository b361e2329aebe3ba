//! `synthetic` and `vectors`: quantize random unit vectors or the user's own at each bit width
//! and report distortion, inner-product error, recall and throughput ([`crate::eval`]).

use std::path::PathBuf;

use anyhow::{Result, bail, ensure};
use clap::Args;
use serde::Serialize;
use tq_bench::{count, data};
use tq_core::RotationKind;
use tq_quant::{MseQuantizer, ScaleMode, SketchKind};

use super::{InputArgs, Report, load_base_and_queries, pool, progress_bar};
use crate::eval::{self, BitsResult, EvalSettings, QuantizerKind, Truth};
use crate::{kernels, plot};

/// `synthetic`'s options.
#[derive(Args)]
pub struct SyntheticArgs {
    /// Vector dimension.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Base vectors to quantize [default: 100000, or 10000 with --quick].
    #[arg(long)]
    pub vectors: Option<usize>,
    /// Queries [default: 1000, or 100 with --quick].
    #[arg(long)]
    pub queries: Option<usize>,
    #[command(flatten)]
    pub common: Common,
}

/// `vectors`' options.
#[derive(Args)]
pub struct VectorsArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub common: Common,
}

/// Runs `synthetic`.
///
/// # Errors
/// Bad options; quantizer errors.
pub fn synthetic(a: SyntheticArgs) -> Result<VectorReport> {
    let common = a.common;
    ensure!(a.dim >= 2, "--dim must be at least 2");
    let n = a
        .vectors
        .unwrap_or(if common.quick { 10_000 } else { 100_000 });
    let q = a.queries.unwrap_or(if common.quick { 100 } else { 1000 });
    ensure!(n > 0 && q > 0, "--vectors and --queries must be positive");
    let base = data::synthetic_base(n, a.dim, common.seed);
    let qs = data::synthetic_queries(q, a.dim, common.seed);
    execute("synthetic", "synthetic", None, None, base, qs, &common)
}

/// Runs `vectors`.
///
/// # Errors
/// Unreadable or invalid input files; bad options; quantizer errors.
pub fn vectors(a: VectorsArgs) -> Result<VectorReport> {
    let (input, common) = (a.input, a.common);
    let (base, qs) = load_base_and_queries(&input, common.quick, common.seed)?;
    let q = input.queries_file.as_ref().map(|p| p.display().to_string());
    execute(
        "vectors",
        "file",
        Some(input.input.display().to_string()),
        q,
        base,
        qs,
        &common,
    )
}

/// The options `synthetic` and `vectors` share.
#[derive(Args, Clone)]
pub struct Common {
    /// Bit widths to evaluate, comma-separated (1..=8).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub bits: Vec<u32>,
    /// mse (TurboQuant_mse), prod (TurboQuant_prod: unbiased inner products) or polar (PolarQuant, experimental).
    #[arg(long, value_enum, default_value_t = QuantizerKind::Mse)]
    pub quantizer: QuantizerKind,
    /// Random rotation: hadamard (O(d log d)) or haar (dense, O(d²)).
    #[arg(long, default_value = "hadamard")]
    pub rotation: RotationKind,
    /// Per-vector scalar stored beside MSE codes: norm (paper), unbiased (EDEN: exact component
    /// along x, unbiased inner products) or least-squares (best reconstruction).
    #[arg(long, default_value = "norm")]
    pub scale: ScaleMode,
    /// Centre MSE quantizers on the mean of the base vectors (stored once with the quantizer).
    #[arg(long)]
    pub center: bool,
    /// PolarQuant bits per level, level 1 first (e.g. 4,2,2,2); replaces the mapping from --bits.
    #[arg(long, value_delimiter = ',')]
    pub polar_levels: Option<Vec<u32>>,
    /// QJL matrix for --quantizer prod: gaussian (paper) or orthogonal (lower variance)
    /// [default: gaussian]. An error with any other quantizer.
    #[arg(long)]
    pub sketch: Option<SketchKind>,
    /// Seed of the quantizer and of synthetic data / query sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Worker threads for batch quantization and scoring [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Small sizes that finish in seconds.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where batches are quantized: cpu, or wgpu (tq-gpu's kernels: mse, and prod with b >= 2;
    /// d <= 1024). Metrics are computed on the CPU either way.
    #[arg(long, value_enum, default_value_t = kernels::Backend::Cpu)]
    pub backend: kernels::Backend,
    /// Also draw D_mse against bits (measured, the codebook's theory and the paper's bounds) and
    /// recall 1@k curves into this SVG file.
    #[arg(long, value_parser = plot::svg_path)]
    pub plot: Option<PathBuf>,
}

/// The JSON report (schema in docs/REPORT_SCHEMA.md).
#[derive(Serialize)]
pub struct VectorReport {
    workload: &'static str,
    source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queries_input: Option<String>,
    seed: u64,
    dim: usize,
    vectors: usize,
    queries: usize,
    quantizer: QuantizerKind,
    rotation: RotationKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    sketch: Option<SketchKind>,
    /// MSE only: the per-vector scalar.
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<ScaleMode>,
    /// MSE only: centred on the base mean.
    centered: bool,
    /// Where the batches were quantized (cpu or wgpu).
    backend: kernels::Backend,
    threads: usize,
    results: Vec<BitsResult>,
}

/// The `--plot` charts of `synthetic` / `vectors`: D_mse against bits with the codebook's theory
/// and the paper's bounds, and recall 1@k for each width.
fn vector_charts(report: &VectorReport) -> Vec<plot::Chart> {
    let bits: Vec<u32> = report.results.iter().map(|r| r.bits).collect();
    let (lo, hi) = plot::paper_bounds(&bits);
    let mut series = vec![plot::Series {
        name: format!("measured D_mse ({:?})", report.quantizer).to_lowercase(),
        points: report
            .results
            .iter()
            .map(|r| (r.bits as f64, r.d_mse))
            .collect(),
        dashed: false,
    }];
    let theory: Vec<(f64, f64)> = report
        .results
        .iter()
        .filter_map(|r| r.d_mse_theory.map(|t| (r.bits as f64, t)))
        .collect();
    if !theory.is_empty() {
        series.push(plot::Series {
            name: "Lloyd-Max codebook (theory)".into(),
            points: theory,
            dashed: true,
        });
    }
    series.extend([lo, hi]);
    let distortion = plot::Chart {
        title: format!("D_mse vs bits, {} (d = {})", report.workload, report.dim),
        x_label: "bits per coordinate".into(),
        y_label: "D_mse".into(),
        log_y: true,
        log_x: false,
        series,
    };
    let recall = plot::Chart {
        title: "recall of the true top-1 within the top-k".into(),
        x_label: "k".into(),
        y_label: "recall 1@k".into(),
        log_y: false,
        log_x: true,
        series: report
            .results
            .iter()
            .map(|r| {
                let mut pts: Vec<(f64, f64)> = r
                    .recall_1_at_k
                    .iter()
                    .filter_map(|(k, v)| k.parse::<f64>().ok().map(|k| (k, *v)))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                plot::Series {
                    name: count(r.bits as usize, "bit"),
                    points: pts,
                    dashed: false,
                }
            })
            .collect(),
    };
    vec![distortion, recall]
}

fn execute(
    workload: &'static str,
    source: &'static str,
    input: Option<String>,
    queries_input: Option<String>,
    base: data::Vectors,
    queries: data::Vectors,
    c: &Common,
) -> Result<VectorReport> {
    for &b in &c.bits {
        if !(1..=8).contains(&b) {
            bail!("--bits {b} is out of range (1..=8)");
        }
    }
    let (threads, pool) = pool(c.threads)?;
    ensure!(
        c.quantizer == QuantizerKind::Mse || (c.scale == ScaleMode::Norm && !c.center),
        "--scale and --center apply to --quantizer mse"
    );
    ensure!(
        c.polar_levels.is_none() || c.quantizer == QuantizerKind::Polar,
        "--polar-levels applies to --quantizer polar"
    );
    ensure!(
        c.sketch.is_none() || c.quantizer == QuantizerKind::Prod,
        "--sketch applies to --quantizer prod (the QJL matrix of TurboQuant_prod)"
    );
    let sketch = c.sketch.unwrap_or(SketchKind::Gaussian);
    // Explicit PolarQuant levels define a single configuration.
    let bit_list: Vec<u32> = match (&c.polar_levels, c.quantizer) {
        (Some(l), QuantizerKind::Polar) => vec![l.first().copied().unwrap_or(1)],
        _ => c.bits.clone(),
    };
    let mean = if c.center {
        Some(MseQuantizer::calibrate_mean(&base.data, base.dim)?)
    } else {
        None
    };
    let settings = EvalSettings {
        quantizer: c.quantizer,
        rotation: c.rotation,
        sketch,
        seed: c.seed,
        ip_queries: queries.rows.min(100),
        scale: c.scale,
        mean,
        polar_levels: c.polar_levels.clone(),
        gpu: match c.backend {
            kernels::Backend::Cpu => None,
            kernels::Backend::Wgpu => Some(std::sync::Arc::new(tq_gpu::GpuContext::new()?)),
        },
    };
    let progress = progress_bar(
        c.json,
        bit_list.len() * (queries.rows + settings.ip_queries),
    );
    let results = pool.install(|| -> Result<Vec<BitsResult>> {
        progress.set_message("exact search");
        let truth = Truth::compute(&base, &queries, settings.ip_queries);
        bit_list
            .iter()
            .map(|&b| {
                progress.set_message(count(b as usize, "bit"));
                eval::eval_bits(&settings, &base, &queries, &truth, b, &progress)
            })
            .collect()
    })?;
    progress.finish_and_clear();
    let report = VectorReport {
        workload,
        source,
        input,
        queries_input,
        seed: c.seed,
        dim: base.dim,
        vectors: base.rows,
        queries: queries.rows,
        quantizer: c.quantizer,
        rotation: c.rotation,
        sketch: (c.quantizer == QuantizerKind::Prod).then_some(sketch),
        scale: (c.quantizer == QuantizerKind::Mse).then_some(c.scale),
        centered: c.center,
        backend: c.backend,
        threads,
        results,
    };
    if let Some(path) = &c.plot {
        plot::write(path, &vector_charts(&report))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report)
}

impl Report for VectorReport {
    fn print_table(&self) {
        let r = self;
        println!(
            "{} | quantizer {:?}{}{}{} | rotation {} | d = {} | {} | {} | seed {} | {}",
            r.workload,
            r.quantizer,
            r.scale
                .map_or(String::new(), |s| format!(", scale {}", s.name())),
            if r.centered { ", centred" } else { "" },
            if r.backend == kernels::Backend::Wgpu {
                ", quantized on the GPU (wgpu)"
            } else {
                ""
            },
            r.rotation.name(),
            r.dim,
            count(r.vectors, "vector"),
            count(r.queries, "query"),
            r.seed,
            count(r.threads, "thread")
        );
        if let Some(i) = &r.input {
            println!("input: {i}");
        }
        println!(
            "{:>4} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>10} {:>11}",
            "bits",
            "d_mse",
            "theory",
            "ip_bias",
            "ip_rmse",
            "ip_mse*d",
            "bound",
            "R@1",
            "R@4",
            "R@16",
            "B/vec",
            "quant M/s",
            "score M/s"
        );
        for x in &r.results {
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.5}"));
            let rec = |k: &str| x.recall_1_at_k.get(k).copied().unwrap_or(0.0);
            println!(
                "{:>4} {:>9.5} {:>9} {:>10.2e} {:>9.5} {:>9.5} {:>9} {:>6.3} {:>6.3} {:>6.3} {:>6} {:>10.3} {:>11.1}",
                x.bits,
                x.d_mse,
                opt(x.d_mse_theory),
                x.ip_bias,
                x.ip_rmse,
                x.ip_mse_times_d,
                opt(x.ip_mse_times_d_bound),
                rec("1"),
                rec("4"),
                rec("16"),
                x.bytes_per_vector,
                x.quantize_vectors_per_s / 1e6,
                x.score_keys_per_s / 1e6
            );
        }
    }
}
