//! `tq-bench`: end-to-end workloads for the tq quantizers.
//!
//! `synthetic` quantizes random unit vectors; `vectors` quantizes the user's own vectors from
//! `.npy`, `.fvecs` or `.safetensors`. Both report, per bit width, distortion, inner-product error,
//! recall and throughput. `trace` replays the queries of a K/V trace against quantized caches and
//! reports attention quality; `attention` times decode-step attention against an f32 baseline.
//! Each prints a table or (with `--json`) one JSON object (schema in `docs/REPORT_SCHEMA.md`).

use tq_bench::data;
mod eval;
mod kernels;
mod kv;
mod plot;
mod real;
mod search;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_kv::{
    HeadConfig, KeyStrategy, KvTrace, Precision, ScoreMode, SyntheticTrace, ValueStrategy,
};
use tq_quant::{MseQuantizer, ScaleMode, SketchKind};

use crate::eval::{BitsResult, EvalSettings, QuantizerKind, Truth};
use tq_bench::count;
use tq_bench::data::Vectors;
use tq_bench::lists::SplitChoice;

#[derive(Parser)]
#[command(
    name = "tq-bench",
    version,
    about = "TurboQuant workloads: quantize vectors, measure distortion, inner-product error, recall and speed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Random unit vectors in R^dim (Gaussian, normalised) with independent random queries.
    Synthetic {
        /// Vector dimension.
        #[arg(long, default_value_t = 128)]
        dim: usize,
        /// Base vectors to quantize [default: 100000, or 10000 with --quick].
        #[arg(long)]
        vectors: Option<usize>,
        /// Queries [default: 1000, or 100 with --quick].
        #[arg(long)]
        queries: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Your own vectors: `.npy` (2-D float32, C or Fortran order), `.fvecs`, or `.safetensors`
    /// (a 2-D F32 tensor named `vectors`). Norms are kept as they are.
    Vectors {
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Maximum-inner-product search on your vectors: recall 1@k and index time of TurboQuant
    /// (mse, prod) next to exact float search, uniform scalar quantization and k-means product
    /// quantization (256-entry tables) at the same bits, all on the same data in one run.
    Search {
        #[command(flatten)]
        input: InputArgs,
        /// Bits per coordinate, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        bits: Vec<u32>,
        /// Recall 1@k for these k.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
        k: Vec<usize>,
        /// Random rotation of TurboQuant.
        #[arg(long, default_value = "hadamard")]
        rotation: RotationKind,
        /// Per-vector scalar of TurboQuant_mse (docs/SCALES.md).
        #[arg(long, default_value = "unbiased")]
        scale: ScaleMode,
        /// Also draw recall 1@k against k for every method and width into this SVG file.
        #[arg(long, value_parser = plot::svg_path)]
        plot: Option<PathBuf>,
        #[command(flatten)]
        common: KvCommon,
    },
    /// Attention quality of quantized KV caches on a K/V trace (safetensors, docs/FORMATS.md):
    /// every query of every head attends to its prefix; reports output error, score error,
    /// top-1 / top-8 agreement and KL divergence per layer and overall, and memory vs f16.
    /// Without --trace, a built-in synthetic trace with outlier channels is used.
    Trace {
        /// The trace file; default: the synthetic outlier trace (2 layers, 2 kv / 4 q heads, 512 tokens, d = 128).
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Key precisions, comma-separated: integers, 2.5 / 3.5 (outlier splits) or OBxCOUNT+RB.
        #[arg(long, value_delimiter = ',', default_value = "4")]
        key_bits: Vec<String>,
        /// Value precisions, same forms (each key precision is paired with each value precision).
        #[arg(long, value_delimiter = ',', default_value = "4")]
        value_bits: Vec<String>,
        /// Key quantizers, comma-separated: mse, prod, polar.
        #[arg(long, value_delimiter = ',', default_value = "mse")]
        key_strategy: Vec<KeyStrategy>,
        /// Value quantizer: mse or polar.
        #[arg(long, default_value = "mse")]
        value_strategy: ValueStrategy,
        /// Per-vector scalars of MSE keys and values, comma-separated: norm, unbiased, least-squares.
        #[arg(long = "scale", value_delimiter = ',', default_value = "norm")]
        scales: Vec<ScaleMode>,
        /// Centre MSE keys and values on per-head means calibrated from the trace.
        #[arg(long)]
        center: bool,
        /// Without --trace: a small synthetic trace (1 layer, 2 kv / 4 q heads, 128 tokens, d = 64).
        #[arg(long)]
        quick: bool,
        /// Also write the evaluated trace to this file (safetensors trace format).
        #[arg(long)]
        save_trace: Option<PathBuf>,
        /// Outlier channels for split precisions: auto (per-head RMS calibration), none, or a list.
        #[arg(long, default_value = "auto")]
        split: SplitChoice,
        /// Most recent tokens kept in f32.
        #[arg(long, default_value_t = 0)]
        window: usize,
        #[command(flatten)]
        common: KvCommon,
    },
    /// A real decoder-only model (ONNX bundle: model.onnx, tokenizer.json, config.json) run by
    /// tract with its KV cache exact or stored as TurboQuant codes. Only the new tokens' keys and
    /// values are quantized each step; the float past fed back is decoded from the codes (tract
    /// runs float attention; the cache's storage and information are quantized).
    ///
    /// compare: the exact run generates; each configuration replays the exact tokens in
    /// lock-step (logit RMSE, top-1, top-k, KL, perplexity of the exact tokens) and generates on
    /// its own (token match, first divergence). --text: teacher-forced perplexity of a file.
    RealModel {
        /// Bundle directory (scripts/setup-real-model.sh writes artifacts/smollm2-135m-instruct).
        #[arg(long, default_value = "artifacts/smollm2-135m-instruct")]
        model_dir: PathBuf,
        /// One prompt (wrapped in the model's chat template unless --raw).
        #[arg(long, conflicts_with_all = ["prompts", "text"])]
        prompt: Option<String>,
        /// A prompt suite: JSON lines with a "prompt" string (e.g. fixtures/prompts.jsonl).
        #[arg(long, conflicts_with = "text")]
        prompts: Option<PathBuf>,
        /// Teacher-forced perplexity of this text file instead of generation (one token per step,
        /// so every prediction sees a quantized past).
        #[arg(long)]
        text: Option<PathBuf>,
        /// With --text: use at most this many tokens.
        #[arg(long, default_value_t = 300)]
        max_tokens: usize,
        /// Feed prompts as they are, without the chat template.
        #[arg(long)]
        raw: bool,
        #[arg(long, value_enum, default_value_t = real::Mode::Compare)]
        mode: real::Mode,
        /// Key precisions, comma-separated: integers, 2.5 / 3.5 (outlier splits) or OBxCOUNT+RB.
        /// The defaults (keys 5, values 4, least-squares scale, window 4) are the documented
        /// default configuration (tq_kv::HeadConfig::recommended, docs/CHOOSING.md).
        #[arg(long, value_delimiter = ',', default_value = "5")]
        key_bits: Vec<String>,
        /// Value precisions, same forms (each key precision is paired with each value precision,
        /// or with the one at the same position under --pair).
        #[arg(long, value_delimiter = ',', default_value = "4")]
        value_bits: Vec<String>,
        /// Pair --key-bits and --value-bits by position (k1 with v1, k2 with v2, ...) instead of
        /// running every combination; the two lists must have the same length.
        #[arg(long)]
        pair: bool,
        /// Key quantizers, comma-separated: mse, prod, polar.
        #[arg(long, value_delimiter = ',', default_value = "mse")]
        key_strategy: Vec<KeyStrategy>,
        /// Value quantizer: mse or polar.
        #[arg(long, default_value = "mse")]
        value_strategy: ValueStrategy,
        /// Per-vector scalars of MSE keys and values, comma-separated: norm, unbiased, least-squares.
        #[arg(long = "scale", value_delimiter = ',', default_value = "least-squares")]
        scales: Vec<ScaleMode>,
        /// Centre MSE keys and values on per-head means calibrated on a built-in text.
        #[arg(long)]
        center: bool,
        /// Outlier channels for split precisions: auto (per-head RMS on a built-in calibration
        /// text), none, or a list.
        #[arg(long, default_value = "auto")]
        split: SplitChoice,
        /// Most recent tokens kept in f32, comma-separated for several configurations.
        #[arg(long, value_delimiter = ',', default_value = "4")]
        window: Vec<usize>,
        /// Random rotations of the cache quantizers, comma-separated: hadamard, haar.
        #[arg(long, value_delimiter = ',', default_value = "hadamard")]
        rotation: Vec<RotationKind>,
        /// Tokens generated per prompt [default: 32, or 16 with --quick].
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Size of the top-k overlap.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Sample at this temperature instead of greedy decoding (seeded by --seed).
        #[arg(long)]
        temperature: Option<f32>,
        /// With --temperature: sample among this many most likely tokens.
        #[arg(long, default_value_t = 50)]
        sample_top_k: usize,
        /// Write the exact run's keys, values and queries (of the first prompt, or of --text) as a
        /// trace (docs/FORMATS.md) for `tq-bench trace --trace FILE`.
        #[arg(long)]
        dump_trace: Option<PathBuf>,
        /// 16 new tokens and the built-in default prompt.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        common: KvCommon,
    },
    /// Each batch kernel (quantize, dequantize, exact score of one query) timed alone on the CPU
    /// path and on the wgpu path (WGSL kernels of tq-gpu; uploads, read-backs and device
    /// synchronisation included), with vectors/s and GB/s moved. MSE, Hadamard rotation.
    Kernels {
        /// Implementations, comma-separated: cpu, wgpu.
        #[arg(long, value_delimiter = ',', default_value = "cpu,wgpu")]
        backend: Vec<kernels::Backend>,
        /// Vectors [default: 1000000, or 20000 with --quick].
        #[arg(long)]
        vectors: Option<usize>,
        /// Dimension (at most 1024 on the GPU path).
        #[arg(long, default_value_t = 128)]
        dim: usize,
        /// Bits per coordinate.
        #[arg(long, default_value_t = 4)]
        bits: u32,
        /// mse or prod (prod needs --bits >= 2 on the GPU).
        #[arg(long, value_enum, default_value_t = kernels::KernelQuantizer::Mse)]
        quantizer: kernels::KernelQuantizer,
        /// Repetitions; the best time is reported.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Small sizes that finish in seconds.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        common: KvCommon,
    },
    /// Decode-step attention time (one query per head over T cached tokens) on quantized caches
    /// against an f32 baseline (SIMD dot products and axpy over contiguous K and V, same threads).
    Attention {
        /// Cached tokens, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1024,8192,32768")]
        tokens: Vec<usize>,
        /// Head dimension.
        #[arg(long, default_value_t = 128)]
        dim: usize,
        /// Query heads.
        #[arg(long, default_value_t = 1)]
        heads: usize,
        /// KV heads (grouped-query attention when fewer than --heads) [default: --heads].
        #[arg(long)]
        kv_heads: Option<usize>,
        /// Key and value precisions, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
        bits: Vec<String>,
        /// Seconds spent timing each configuration.
        #[arg(long, default_value_t = 0.5)]
        budget: f64,
        #[command(flatten)]
        common: KvCommon,
    },
}

/// Where the vector workloads read their vectors.
#[derive(Args, Clone)]
struct InputArgs {
    /// The base vectors: `.npy` (2-D float32, C or Fortran order), `.fvecs`, or `.safetensors`
    /// (a 2-D F32 tensor named `vectors`).
    #[arg(long)]
    input: PathBuf,
    /// Query vectors (same formats). Without it, a seeded random sample of the input is held out.
    #[arg(long = "queries")]
    queries_file: Option<PathBuf>,
    /// Queries to use or hold out [default: min(1000, rows/10), or 100 with --quick].
    #[arg(long)]
    num_queries: Option<usize>,
    /// Use at most this many base vectors (the first ones).
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Args, Clone)]
struct KvCommon {
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the quantizers and of generated data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct Common {
    /// Bit widths to evaluate, comma-separated (1..=8).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    bits: Vec<u32>,
    /// mse (TurboQuant_mse), prod (TurboQuant_prod: unbiased inner products) or polar (PolarQuant, experimental).
    #[arg(long, value_enum, default_value_t = QuantizerKind::Mse)]
    quantizer: QuantizerKind,
    /// Random rotation: hadamard (O(d log d)) or haar (dense, O(d²)).
    #[arg(long, default_value = "hadamard")]
    rotation: RotationKind,
    /// Per-vector scalar stored beside MSE codes: norm (paper), unbiased (EDEN: exact component
    /// along x, unbiased inner products) or least-squares (best reconstruction).
    #[arg(long, default_value = "norm")]
    scale: ScaleMode,
    /// Centre MSE quantizers on the mean of the base vectors (stored once with the quantizer).
    #[arg(long)]
    center: bool,
    /// PolarQuant bits per level, level 1 first (e.g. 4,2,2,2); replaces the mapping from --bits.
    #[arg(long, value_delimiter = ',')]
    polar_levels: Option<Vec<u32>>,
    /// QJL matrix for --quantizer prod: gaussian (paper) or orthogonal (lower variance)
    /// [default: gaussian]. An error with any other quantizer.
    #[arg(long)]
    sketch: Option<SketchKind>,
    /// Seed of the quantizer and of synthetic data / query sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads for batch quantization and scoring [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Small sizes that finish in seconds.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Where batches are quantized: cpu, or wgpu (tq-gpu's kernels: mse, and prod with b >= 2;
    /// d <= 1024). Metrics are computed on the CPU either way.
    #[arg(long, value_enum, default_value_t = kernels::Backend::Cpu)]
    backend: kernels::Backend,
    /// Also draw D_mse against bits (measured, the codebook's theory and the paper's bounds) and
    /// recall 1@k curves into this SVG file.
    #[arg(long, value_parser = plot::svg_path)]
    plot: Option<PathBuf>,
}

/// The JSON report (schema in docs/REPORT_SCHEMA.md).
#[derive(Serialize)]
struct Report {
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

fn main() {
    ensure_runtime_dir();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Mesa's Vulkan drivers (the software adapter lavapipe among them) print "error:
/// XDG_RUNTIME_DIR is invalid or not set" twice per process when the variable does not name a
/// directory. Point it at a private one (mode 0700 under the temporary directory) in that case.
fn ensure_runtime_dir() {
    let set = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .is_some_and(|p| p.is_dir());
    if set {
        return;
    }
    let user = std::env::var("USER").unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("tq-runtime-{user}"));
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    let _ = builder.create(&dir);
    // Only a real directory (not a symlink) that no one else may enter is used.
    let private = std::fs::symlink_metadata(&dir).is_ok_and(|m| {
        #[cfg(unix)]
        let closed = std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077 == 0;
        #[cfg(not(unix))]
        let closed = true;
        m.is_dir() && closed
    });
    if private {
        // SAFETY: called first in `main`, before this process starts any other thread, so no
        // other thread can read the environment concurrently.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}

fn pool(threads: Option<usize>) -> Result<(usize, rayon::ThreadPool)> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ensure!(threads > 0, "--threads must be positive");
    Ok((
        threads,
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .context("cannot start the thread pool")?,
    ))
}

fn progress_bar(json: bool, steps: usize) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

#[derive(Serialize)]
struct TraceReport {
    workload: &'static str,
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<String>,
    model: String,
    seed: u64,
    layers: usize,
    kv_heads: usize,
    q_heads: usize,
    tokens: usize,
    head_dim: usize,
    queries: usize,
    threads: usize,
    results: Vec<kv::TraceRow>,
}

#[derive(Serialize)]
struct AttentionReport {
    workload: &'static str,
    source: &'static str,
    seed: u64,
    threads: usize,
    results: Vec<kv::AttentionRow>,
}

/// Where `trace` takes its trace from besides `--trace`, and where it saves it.
struct TraceSource {
    quick: bool,
    save: Option<PathBuf>,
}

/// The grid of KV cache configurations a workload evaluates.
struct KvGrid<'a> {
    key_bits: &'a [String],
    value_bits: &'a [String],
    /// Key and value precisions paired by position instead of crossed.
    pair: bool,
    strategies: &'a [KeyStrategy],
    value_strategy: ValueStrategy,
    scales: &'a [ScaleMode],
    center: bool,
    windows: &'a [usize],
    rotations: &'a [RotationKind],
}

/// Every combination of the grid (keys x values x key strategy x scale x window x rotation; keys and
/// values zipped instead with `pair`), for head dimension `d`. Centring applies to all-MSE
/// configurations only.
fn kv_configs(g: &KvGrid<'_>, d: usize, seed: u64) -> Result<Vec<HeadConfig>> {
    let widths: Vec<(&String, &String)> = if g.pair {
        ensure!(
            g.key_bits.len() == g.value_bits.len(),
            "--pair needs as many --value-bits as --key-bits ({} and {})",
            g.value_bits.len(),
            g.key_bits.len()
        );
        g.key_bits.iter().zip(g.value_bits).collect()
    } else {
        g.key_bits
            .iter()
            .flat_map(|k| g.value_bits.iter().map(move |v| (k, v)))
            .collect()
    };
    let mut configs = Vec::new();
    for (kb, vb) in widths {
        {
            for &st in g.strategies {
                for &scale in g.scales {
                    for (&window, &rotation) in g
                        .windows
                        .iter()
                        .flat_map(|w| g.rotations.iter().map(move |r| (w, r)))
                    {
                        let (kp, vp) = (Precision::parse(kb, d)?, Precision::parse(vb, d)?);
                        configs.push(HeadConfig {
                            key_strategy: st,
                            value_strategy: g.value_strategy,
                            window,
                            rotation,
                            seed,
                            score_mode: ScoreMode::Fast,
                            scale,
                            center: g.center
                                && st == KeyStrategy::Mse
                                && g.value_strategy == ValueStrategy::Mse,
                            ..HeadConfig::new(d, kp, vp)
                        });
                    }
                }
            }
        }
    }
    Ok(configs)
}

#[allow(clippy::too_many_arguments)]
fn run_trace(
    path: Option<PathBuf>,
    key_bits: &[String],
    value_bits: &[String],
    strategies: &[KeyStrategy],
    value_strategy: ValueStrategy,
    scales: &[ScaleMode],
    center: bool,
    source: TraceSource,
    split: &SplitChoice,
    window: usize,
    c: &KvCommon,
) -> Result<()> {
    let trace = match &path {
        Some(p) => KvTrace::load(p).with_context(|| p.display().to_string())?,
        None if source.quick => SyntheticTrace {
            layers: 1,
            tokens: 128,
            head_dim: 64,
            queries: 8,
            outlier_channels: 4,
            seed: c.seed,
            ..SyntheticTrace::default()
        }
        .generate()?,
        None => SyntheticTrace {
            seed: c.seed,
            ..SyntheticTrace::default()
        }
        .generate()?,
    };
    if let Some(out) = &source.save {
        trace.save(out)?;
    }
    let d = trace.head_dim;
    let configs = kv_configs(
        &KvGrid {
            key_bits,
            value_bits,
            pair: false,
            strategies,
            value_strategy,
            scales,
            center,
            windows: &[window],
            rotations: &[RotationKind::Hadamard],
        },
        d,
        c.seed,
    )?;
    let (threads, pool) = pool(c.threads)?;
    let pb = progress_bar(
        c.json,
        configs.len() * trace.layers * trace.q_heads * trace.n_queries(),
    );
    let results = pool.install(|| {
        configs
            .iter()
            .map(|cfg| kv::eval_trace(&trace, cfg, split, &pb))
            .collect::<Result<Vec<_>>>()
    })?;
    pb.finish_and_clear();
    let report = TraceReport {
        workload: "trace",
        source: trace.meta.source.clone(),
        input: path.map(|p| p.display().to_string()),
        model: trace.meta.model.clone(),
        seed: c.seed,
        layers: trace.layers,
        kv_heads: trace.kv_heads,
        q_heads: trace.q_heads,
        tokens: trace.tokens,
        head_dim: d,
        queries: trace.n_queries(),
        threads,
        results,
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "trace | {} ({}) | {} x {} kv / {} q heads | {} | d = {} | {} per head",
        report.model,
        report.source,
        count(report.layers, "layer"),
        report.kv_heads,
        report.q_heads,
        count(report.tokens, "token"),
        d,
        count(report.queries, "query")
    );
    println!(
        "{:>8} {:>8} {:>5} {:>13} {:>6} {:>10} {:>10} {:>8} {:>8} {:>10} {:>8}",
        "keys",
        "values",
        "kq",
        "scale",
        "window",
        "out_err",
        "score_rmse",
        "top1",
        "top8",
        "KL",
        "x f16"
    );
    for r in &report.results {
        println!(
            "{:>8} {:>8} {:>5} {:>13} {:>6} {:>10.5} {:>10.5} {:>8.3} {:>8.3} {:>10.2e} {:>8.2}",
            r.key_precision,
            r.value_precision,
            r.key_strategy.name(),
            r.scale.name(),
            r.window,
            r.overall.output_rel_error,
            r.overall.score_rmse,
            r.overall.top1_agreement,
            r.overall.topk_overlap,
            r.overall.kl_divergence,
            r.memory_ratio_vs_f16
        );
    }
    Ok(())
}

fn run_attention(
    tokens: &[usize],
    dim: usize,
    heads: usize,
    kv_heads: usize,
    bits: &[String],
    budget: f64,
    c: &KvCommon,
) -> Result<()> {
    ensure!(dim >= 2, "--dim must be at least 2");
    ensure!(
        budget > 0.0 && budget.is_finite(),
        "--budget must be positive"
    );
    let (threads, pool) = pool(c.threads)?;
    let precisions = bits
        .iter()
        .map(|b| Precision::parse(b, dim))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let pb = progress_bar(c.json, tokens.len() * precisions.len());
    let results = pool.install(|| -> Result<Vec<kv::AttentionRow>> {
        let mut rows = Vec::new();
        for &t in tokens {
            for &p in &precisions {
                pb.set_message(format!("T = {t}, {p} bits"));
                rows.push(kv::eval_attention(
                    t, dim, heads, kv_heads, p, c.seed, budget,
                )?);
                pb.inc(1);
            }
        }
        Ok(rows)
    })?;
    pb.finish_and_clear();
    let report = AttentionReport {
        workload: "attention",
        source: "synthetic",
        seed: c.seed,
        threads,
        results,
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "attention | decode step, one query per head | {}",
        count(threads, "thread")
    );
    println!(
        "{:>8} {:>5} {:>7} {:>5} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "tokens", "bits", "q/kv", "dim", "f32 us", "tq us", "speedup", "cache KiB", "x f16"
    );
    for r in &report.results {
        println!(
            "{:>8} {:>5} {:>7} {:>5} {:>12.1} {:>12.1} {:>8.2} {:>12.1} {:>8.2}",
            r.tokens,
            r.bits,
            format!("{}/{}", r.heads, r.kv_heads),
            r.dim,
            r.f32_seconds_per_query * 1e6,
            r.quantized_seconds_per_query * 1e6,
            r.speedup,
            r.cache_bytes as f64 / 1024.0,
            r.f16_bytes as f64 / r.cache_bytes as f64
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct SearchReport {
    workload: &'static str,
    source: &'static str,
    input: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    queries_input: Option<String>,
    dim: usize,
    vectors: usize,
    queries: usize,
    seed: u64,
    rotation: RotationKind,
    threads: usize,
    results: Vec<search::SearchRow>,
}

/// Loads the base vectors (at most `--limit`) and the queries: the query file's first
/// `--num-queries`, or a seeded hold-out sample of the base.
fn load_base_and_queries(a: &InputArgs, quick: bool, seed: u64) -> Result<(Vectors, Vectors)> {
    let (queries_file, num_queries, limit) = (&a.queries_file, a.num_queries, a.limit);
    let mut base = data::load(&a.input)?;
    if let Some(l) = limit {
        ensure!(l > 0, "--limit must be positive");
        base.rows = base.rows.min(l);
        base.data.truncate(base.rows * base.dim);
    }
    match queries_file {
        Some(path) => {
            let qs = data::load(path)?;
            ensure!(
                qs.dim == base.dim,
                "queries have dimension {} but the input has {}",
                qs.dim,
                base.dim
            );
            let qs = match num_queries {
                Some(0) => bail!("--num-queries must be positive"),
                Some(k) if k > qs.rows => bail!(
                    "--num-queries {k} is more than the {} vectors of {}",
                    qs.rows,
                    path.display()
                ),
                Some(k) => qs.select(&(0..k).collect::<Vec<_>>()),
                None => qs,
            };
            Ok((base, qs))
        }
        None => hold_out(base, num_queries, quick, seed),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_search(
    input: InputArgs,
    bits: Vec<u32>,
    k: Vec<usize>,
    rotation: RotationKind,
    scale: ScaleMode,
    plot_path: Option<PathBuf>,
    c: &KvCommon,
) -> Result<()> {
    for &b in &bits {
        ensure!((1..=8).contains(&b), "--bits {b} is out of range (1..=8)");
    }
    let (base, qs) = load_base_and_queries(&input, false, c.seed)?;
    let (threads, pool) = pool(c.threads)?;
    let settings = search::SearchSettings {
        bits,
        ks: k,
        rotation,
        scale,
        seed: c.seed,
    };
    let results = pool.install(|| search::run(&base, &qs, &settings))?;
    let report = SearchReport {
        workload: "search",
        source: "file",
        input: input.input.display().to_string(),
        queries_input: input.queries_file.as_ref().map(|p| p.display().to_string()),
        dim: base.dim,
        vectors: base.rows,
        queries: qs.rows,
        seed: c.seed,
        rotation,
        threads,
        results,
    };
    if let Some(path) = &plot_path {
        let series = report
            .results
            .iter()
            .map(|r| plot::Series {
                name: format!("{} ({} bits/vec)", r.method, r.bits_per_vector),
                points: settings
                    .ks
                    .iter()
                    .filter_map(|k| r.recall_1_at_k.get(&k.to_string()).map(|v| (*k as f64, *v)))
                    .collect(),
                dashed: r.method == "float",
            })
            .collect();
        let chart = plot::Chart {
            title: format!("recall 1@k, {} (d = {})", report.input, report.dim),
            x_label: "k".into(),
            y_label: "recall 1@k".into(),
            log_y: false,
            log_x: true,
            series,
        };
        plot::write(path, &[chart])?;
        eprintln!("wrote {}", path.display());
    }
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "search | {} | d = {} | {} | {} | {}",
        report.input,
        report.dim,
        count(report.vectors, "vector"),
        count(report.queries, "query"),
        count(threads, "thread")
    );
    let ks: Vec<String> = settings.ks.iter().map(|k| k.to_string()).collect();
    print!("{:<22} {:>4} {:>9}", "method", "bits", "bits/vec");
    for k in &ks {
        print!(" {:>6}", format!("R@{k}"));
    }
    println!(" {:>9} {:>9}", "index s", "search s");
    for r in &report.results {
        print!("{:<22} {:>4} {:>9.0}", r.method, r.bits, r.bits_per_vector);
        for k in &ks {
            print!(" {:>6.3}", r.recall_1_at_k.get(k).copied().unwrap_or(0.0));
        }
        println!(" {:>9.3} {:>9.3}", r.index_seconds, r.search_seconds);
    }
    Ok(())
}

/// The `real-model` command's arguments, gathered.
struct RealArgs {
    model_dir: PathBuf,
    prompt: Option<String>,
    prompts: Option<PathBuf>,
    text: Option<PathBuf>,
    max_tokens: usize,
    raw: bool,
    mode: real::Mode,
    split: SplitChoice,
    max_new_tokens: Option<usize>,
    top_k: usize,
    temperature: Option<f32>,
    sample_top_k: usize,
    dump_trace: Option<PathBuf>,
    quick: bool,
}

#[derive(Serialize)]
struct RealReport {
    workload: &'static str,
    source: &'static str,
    model: String,
    model_dir: String,
    seed: u64,
    layers: usize,
    kv_heads: usize,
    q_heads: usize,
    head_dim: usize,
    mode: String,
    sampling: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    note: &'static str,
    results: Vec<real::Row>,
}

/// A relative `--model-dir` that does not exist from the working directory is looked up from the
/// repository root as well, so the default (`artifacts/smollm2-135m-instruct`) works from any
/// folder of the checkout this binary was built in.
fn resolve_model_dir(dir: &std::path::Path) -> PathBuf {
    if dir.is_relative() && !dir.exists() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let alt = root.join(dir);
        if alt.is_dir() {
            return alt;
        }
    }
    dir.to_path_buf()
}

/// The default prompt of `real-model`.
const DEFAULT_PROMPT: &str = "What is the capital of France?";

fn run_real(a: RealArgs, grid: &KvGrid<'_>, c: &KvCommon) -> Result<()> {
    let model_dir = resolve_model_dir(&a.model_dir);
    let a = RealArgs { model_dir, ..a };
    if !a.model_dir.is_dir() {
        bail!(
            "{}: no model bundle here (run scripts/setup-real-model.sh for SmolLM2-135M-Instruct, or pass --model-dir)",
            a.model_dir.display()
        );
    }
    let decoder = tq_onnx::Decoder::open(&a.model_dir)?;
    let d = decoder.head_dim();
    let configs: Vec<real::Config> = kv_configs(grid, d, c.seed)?
        .into_iter()
        .map(|head| real::Config {
            head,
            split: a.split.clone(),
        })
        .collect();
    let sampling = match a.temperature {
        None => tq_onnx::Sampling::Greedy,
        Some(t) => tq_onnx::Sampling::Sample {
            temperature: t,
            top_k: a.sample_top_k,
            seed: c.seed,
        },
    };
    let max_new = a.max_new_tokens.unwrap_or(if a.quick { 16 } else { 32 });
    let (_, pool) = pool(c.threads)?;
    let (rows, text_label) = if let Some(path) = &a.text {
        let body = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut ids = decoder.bundle().encode(&body)?;
        ids.truncate(a.max_tokens);
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let rows = pool.install(|| {
            real::run_text(
                &decoder,
                &label,
                &ids,
                &configs,
                a.top_k,
                a.dump_trace.as_ref(),
                c.json,
            )
        })?;
        (rows, Some(path.display().to_string()))
    } else {
        let texts = match (&a.prompt, &a.prompts) {
            (Some(p), _) => vec![p.clone()],
            (None, Some(f)) => real::read_prompts(f)?,
            (None, None) => vec![DEFAULT_PROMPT.to_string()],
        };
        let prompts = texts
            .iter()
            .map(|t| {
                let full = if a.raw {
                    t.clone()
                } else {
                    decoder.bundle().chat_prompt(t)?
                };
                Ok(real::Prompt {
                    label: t.clone(),
                    ids: decoder.bundle().encode(&full)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = pool.install(|| {
            real::run_prompts(
                &decoder,
                &prompts,
                &configs,
                a.mode,
                max_new,
                sampling,
                a.top_k,
                a.dump_trace.as_ref(),
                c.json,
            )
        })?;
        (rows, None)
    };
    let cfg = decoder.config();
    let report = RealReport {
        workload: "real-model",
        source: "real-model",
        model: cfg.name.clone(),
        model_dir: a.model_dir.display().to_string(),
        seed: c.seed,
        layers: decoder.layers(),
        kv_heads: decoder.kv_heads(),
        q_heads: cfg.q_heads,
        head_dim: d,
        mode: if text_label.is_some() {
            "perplexity".into()
        } else {
            format!("{:?}", a.mode).to_lowercase()
        },
        sampling: match sampling {
            tq_onnx::Sampling::Greedy => "greedy".into(),
            tq_onnx::Sampling::Sample {
                temperature,
                top_k,
                seed,
            } => format!("temperature {temperature}, top-{top_k}, seed {seed}"),
        },
        text: text_label,
        note: "tract runs float attention over a past decoded from the cache's codes: the cache's storage and information are quantized, the attention arithmetic is not",
        results: rows,
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "real-model | {} | {} x {} kv / {} q heads, d = {} | {} | {}",
        report.model,
        count(report.layers, "layer"),
        report.kv_heads,
        report.q_heads,
        d,
        report.mode,
        report.sampling
    );
    println!("note: {}", report.note);
    print_real_table(&report.results);
    Ok(())
}

/// The real-model table: rows grouped by prompt (each group ends with the exact run's text),
/// then, over a prompt suite, one summary row per configuration.
fn print_real_table(rows: &[real::Row]) {
    let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    println!(
        "{:>8} {:>8} {:>5} {:>8} {:>6} {:>6} {:>6} {:>6} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "keys",
        "values",
        "kq",
        "rotation",
        "window",
        "bits",
        "top1",
        "top5",
        "KL",
        "ppl_ex",
        "ppl_q",
        "ppl x",
        "match",
        "tok/s",
        "q tok/s",
        "x f16"
    );
    let line = |r: &real::Row| {
        println!(
            "{:>8} {:>8} {:>5} {:>8} {:>6} {:>6} {:>6} {:>6} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
            r.key_precision.as_deref().unwrap_or("exact"),
            r.value_precision.as_deref().unwrap_or("exact"),
            r.key_strategy.map_or("-", |k| k.name()),
            r.rotation
                .map_or("-".to_string(), |k| format!("{k:?}").to_lowercase()),
            r.window.map_or("-".into(), |w| w.to_string()),
            f(r.bits_per_coordinate, 2),
            f(r.top1_agreement, 3),
            f(r.topk_overlap, 3),
            r.kl_divergence.map_or("-".into(), |v| format!("{v:.2e}")),
            f(r.perplexity_exact, 3),
            f(r.perplexity_quantized, 3),
            f(r.perplexity_ratio, 3),
            f(r.token_match_rate, 3),
            f(r.decode_tokens_per_s_exact, 1),
            f(r.decode_tokens_per_s_quantized, 1),
            f(r.kv_ratio_vs_f16, 2),
        );
    };
    let mut prompts = 0;
    for group in rows.chunk_by(|a, b| a.prompt == b.prompt) {
        prompts += 1;
        println!("-- {}", group[0].prompt);
        for r in group {
            line(r);
            if r.mode == "exact" || r.mode == "quantized" {
                println!("   text: {:?}", r.generated_text);
            }
            if let Some(t) = &r.generated_text_quantized {
                println!("   quantized text: {t:?}");
            }
        }
        if let Some(r) = group.iter().find(|r| r.mode == "compare") {
            println!("   exact text: {:?}", r.generated_text);
        }
    }
    let summary = real::suite_summary(rows);
    if prompts > 1 && !summary.is_empty() {
        println!("-- mean over {prompts} prompts (perplexity ratio: geometric mean)");
        for r in &summary {
            line(r);
        }
    }
}

#[derive(Serialize)]
struct KernelsReport {
    workload: &'static str,
    source: &'static str,
    seed: u64,
    vectors: usize,
    dim: usize,
    bits: u32,
    quantizer: kernels::KernelQuantizer,
    threads: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    adapter: Option<String>,
    results: Vec<kernels::KernelRow>,
}

#[allow(clippy::too_many_arguments)]
fn run_kernels(
    backends: &[kernels::Backend],
    quantizer: kernels::KernelQuantizer,
    vectors: Option<usize>,
    dim: usize,
    bits: u32,
    reps: usize,
    quick: bool,
    c: &KvCommon,
) -> Result<()> {
    ensure!(
        (1..=8).contains(&bits),
        "--bits {bits} is out of range (1..=8)"
    );
    ensure!(dim >= 2, "--dim must be at least 2");
    let (threads, pool) = pool(c.threads)?;
    let prod = quantizer == kernels::KernelQuantizer::Prod;
    let reps = if quick { 1 } else { reps };
    let say = |msg: &str| {
        if !c.json {
            eprintln!("kernels: {msg}");
        }
    };
    // The device is created and dropped on this thread, outside the pool (see kernels::run).
    let gpu = if backends.contains(&kernels::Backend::Wgpu) {
        say("opening the GPU adapter");
        Some(tq_gpu::GpuContext::new()?)
    } else {
        None
    };
    let software = gpu.as_ref().is_some_and(|g| g.is_software());
    if let Some(g) = gpu.as_ref().filter(|g| g.is_software()) {
        eprintln!(
            "warning: {} is a software adapter (the GPU emulated on the CPU): its timings say \
             nothing about a GPU{}",
            g.adapter(),
            if vectors.is_none() && !quick {
                "; --vectors defaults to 20000 on it"
            } else {
                ""
            }
        );
    }
    let n = vectors.unwrap_or(if quick || software { 20_000 } else { 1_000_000 });
    ensure!(n > 0, "--vectors must be positive");
    let (results, adapter) = pool.install(|| {
        kernels::run(
            gpu.as_ref(),
            backends,
            prod,
            n,
            dim,
            bits,
            c.seed,
            reps,
            &say,
        )
    })?;
    drop(pool);
    drop(gpu);
    let report = KernelsReport {
        workload: "kernels",
        source: "synthetic",
        seed: c.seed,
        vectors: n,
        dim,
        bits,
        quantizer,
        threads,
        adapter,
        results,
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "kernels | {} b = {bits}, Hadamard | d = {dim} | {} | {}{}",
        if report.quantizer == kernels::KernelQuantizer::Prod {
            "Prod"
        } else {
            "MSE"
        },
        count(n, "vector"),
        count(threads, "CPU thread"),
        report
            .adapter
            .as_ref()
            .map(|a| format!(" | GPU: {a}"))
            .unwrap_or_default()
    );
    println!(
        "{:>8} {:>11} {:>14} {:>9} {:>10}",
        "backend", "kernel", "vectors/s", "GB/s", "seconds"
    );
    for r in &report.results {
        println!(
            "{:>8} {:>11} {:>14.0} {:>9.2} {:>10.4}",
            format!("{:?}", r.backend).to_lowercase(),
            r.kernel,
            r.vectors_per_s,
            r.gb_per_s,
            r.seconds
        );
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Kernels {
            backend,
            vectors,
            dim,
            bits,
            quantizer,
            reps,
            quick,
            common,
        } => run_kernels(
            &backend, quantizer, vectors, dim, bits, reps, quick, &common,
        ),
        Command::RealModel {
            model_dir,
            prompt,
            prompts,
            text,
            max_tokens,
            raw,
            mode,
            key_bits,
            value_bits,
            pair,
            key_strategy,
            value_strategy,
            scales,
            center,
            split,
            window,
            rotation,
            max_new_tokens,
            top_k,
            temperature,
            sample_top_k,
            dump_trace,
            quick,
            common,
        } => run_real(
            RealArgs {
                model_dir,
                prompt,
                prompts,
                text,
                max_tokens,
                raw,
                mode,
                split,
                max_new_tokens,
                top_k,
                temperature,
                sample_top_k,
                dump_trace,
                quick,
            },
            &KvGrid {
                key_bits: &key_bits,
                value_bits: &value_bits,
                pair,
                strategies: &key_strategy,
                value_strategy,
                scales: &scales,
                center,
                windows: &window,
                rotations: &rotation,
            },
            &common,
        ),
        Command::Search {
            input,
            bits,
            k,
            rotation,
            scale,
            plot,
            common,
        } => run_search(input, bits, k, rotation, scale, plot, &common),
        Command::Trace {
            trace,
            key_bits,
            value_bits,
            key_strategy,
            value_strategy,
            scales,
            center,
            quick,
            save_trace,
            split,
            window,
            common,
        } => run_trace(
            trace,
            &key_bits,
            &value_bits,
            &key_strategy,
            value_strategy,
            &scales,
            center,
            TraceSource {
                quick,
                save: save_trace,
            },
            &split,
            window,
            &common,
        ),
        Command::Attention {
            tokens,
            dim,
            heads,
            kv_heads,
            bits,
            budget,
            common,
        } => run_attention(
            &tokens,
            dim,
            heads,
            kv_heads.unwrap_or(heads),
            &bits,
            budget,
            &common,
        ),
        Command::Synthetic {
            dim,
            vectors,
            queries,
            common,
        } => {
            ensure!(dim >= 2, "--dim must be at least 2");
            let n = vectors.unwrap_or(if common.quick { 10_000 } else { 100_000 });
            let q = queries.unwrap_or(if common.quick { 100 } else { 1000 });
            ensure!(n > 0 && q > 0, "--vectors and --queries must be positive");
            let base = data::synthetic_base(n, dim, common.seed);
            let qs = data::synthetic_queries(q, dim, common.seed);
            execute("synthetic", "synthetic", None, None, base, qs, &common)
        }
        Command::Vectors { input, common } => {
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
    }
}

/// Splits a seeded random sample of `k` rows off as queries.
fn hold_out(all: Vectors, k: Option<usize>, quick: bool, seed: u64) -> Result<(Vectors, Vectors)> {
    // At most half the input is held out, so the base keeps at least as many vectors as there
    // are queries (a 1-vector base makes every recall 1).
    let most = all.rows / 2;
    let k = match k {
        Some(0) => bail!("--num-queries must be positive"),
        Some(k) if k > most => bail!(
            "--num-queries {k} would hold out more than half of the {} input vectors \
             (at most {most}); give --queries FILE for a separate query set",
            all.rows
        ),
        Some(k) => k,
        None => (if quick { 100 } else { 1000.min(all.rows / 10) }).min(most),
    };
    ensure!(
        k > 0,
        "the input has {} vectors: too few to hold out queries (give --queries FILE)",
        all.rows
    );
    let mut r = SeededRng::new(seed, stream::QUERIES);
    let perm = r.permutation(all.rows);
    let mut is_query = vec![false; all.rows];
    let mut qidx: Vec<usize> = perm[..k].iter().map(|&i| i as usize).collect();
    qidx.sort_unstable();
    for &i in &qidx {
        is_query[i] = true;
    }
    let bidx: Vec<usize> = (0..all.rows).filter(|&i| !is_query[i]).collect();
    Ok((all.select(&bidx), all.select(&qidx)))
}

/// The `--plot` charts of `synthetic` / `vectors`: D_mse against bits with the codebook's theory
/// and the paper's bounds, and recall 1@k for each width.
fn vector_charts(report: &Report) -> Vec<plot::Chart> {
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
    base: Vectors,
    queries: Vectors,
    c: &Common,
) -> Result<()> {
    for &b in &c.bits {
        if !(1..=8).contains(&b) {
            bail!("--bits {b} is out of range (1..=8)");
        }
    }
    let threads = c
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ensure!(threads > 0, "--threads must be positive");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the thread pool")?;
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
    let show = !c.json && std::io::stderr().is_terminal();
    let progress = if show {
        let steps = bit_list.len() * (queries.rows + settings.ip_queries);
        let pb = ProgressBar::new(steps as u64);
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
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
    let report = Report {
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
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
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
