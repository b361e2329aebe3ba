//! `tq-bench`: end-to-end workloads for the tq quantizers.
//!
//! `synthetic` quantizes random unit vectors; `vectors` quantizes the user's own vectors from
//! `.npy`, `.fvecs` or `.safetensors`. Both report, per bit width, distortion, inner-product error,
//! recall and throughput. `trace` replays the queries of a K/V trace against quantized caches and
//! reports attention quality; `attention` times decode-step attention against an f32 baseline.
//! Each prints a table or (with `--json`) one JSON object (schema in `docs/REPORT_SCHEMA.md`).

mod cmd;
mod context;
mod eval;
mod kernels;
mod kv;
mod plot;
mod real;
mod search;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cmd::{attention, emit, real_model, trace, vectors};

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
    Synthetic(vectors::SyntheticArgs),
    /// Your own vectors: `.npy` (2-D float32, C or Fortran order), `.fvecs`, or `.safetensors`
    /// (a 2-D F32 tensor named `vectors`). Norms are kept as they are.
    Vectors(vectors::VectorsArgs),
    /// Maximum-inner-product search on your vectors: recall 1@k and index time of TurboQuant
    /// (mse, prod) next to exact float search, uniform scalar quantization and k-means product
    /// quantization (256-entry tables) at the same bits, all on the same data in one run.
    Search(cmd::search::SearchArgs),
    /// Attention quality of quantized KV caches on a K/V trace (safetensors, docs/FORMATS.md):
    /// every query of every head attends to its prefix; reports output error, score error,
    /// top-1 / top-8 agreement and KL divergence per layer and overall, and memory vs f16.
    /// Without --trace, a built-in synthetic trace with outlier channels is used.
    Trace(trace::TraceArgs),
    /// A real decoder-only model (ONNX bundle: model.onnx, tokenizer.json, config.json) run by
    /// tract with its KV cache exact or stored as TurboQuant codes. Native attention (the default
    /// where the bundle has native/ stages): tract runs the model cut around attention and tq-kv
    /// attends on the packed codes, keeping no float past. Float attention (--attention float,
    /// or a bundle without stages): the float past fed back is decoded from the codes and tract
    /// attends over it.
    ///
    /// compare: the exact run generates; each configuration replays the exact tokens in
    /// lock-step (logit RMSE, top-1, top-k, KL, perplexity of the exact tokens) and generates on
    /// its own (token match, first divergence). --text: teacher-forced perplexity of a file.
    RealModel(real_model::RealModelArgs),
    /// Each batch kernel (quantize, dequantize, exact score of one query) timed alone on the CPU
    /// path and on the wgpu path (WGSL kernels of tq-gpu; uploads, read-backs and device
    /// synchronisation included), with vectors/s and GB/s moved. MSE, Hadamard rotation.
    Kernels(cmd::kernels::KernelsArgs),
    /// Decode-step attention time (one query per head over T cached tokens) on quantized caches
    /// against f32 and f16 baselines (SIMD dot products and axpy over contiguous K and V, f16
    /// widened in registers; same threads), timed in alternating rounds, medians reported.
    Attention(attention::AttentionArgs),
}

fn main() {
    cmd::ensure_runtime_dir();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // real-model measures the default cache unless a grid option was given on the command line
    // (a value equal to its default counts as given).
    // real-model and trace refuse grid options beside --config or --cache.
    let given = |sub: &clap::ArgMatches, ids: &[&[&str]]| {
        ids.iter()
            .flat_map(|list| list.iter())
            .any(|id| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    };
    match (&mut cli.command, matches.subcommand()) {
        (Command::RealModel(a), Some((_, sub))) => {
            a.grid_given = given(sub, &real_model::GRID_ARGS)
        }
        (Command::Trace(a), Some((_, sub))) => a.grid_given = given(sub, &trace::GRID_ARGS),
        _ => {}
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs the chosen workload and prints its report.
fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Synthetic(a) => {
            let json = a.common.json;
            emit(&vectors::synthetic(a)?, json)
        }
        Command::Vectors(a) => {
            let json = a.common.json;
            emit(&vectors::vectors(a)?, json)
        }
        Command::Search(a) => {
            let json = a.common.json;
            emit(&cmd::search::run(a)?, json)
        }
        Command::Trace(a) => {
            let json = a.common.json;
            emit(&trace::run(a)?, json)
        }
        Command::RealModel(a) => {
            let json = a.common.json;
            emit(&real_model::run(a)?, json)
        }
        Command::Kernels(a) => {
            let json = a.common.json;
            emit(&cmd::kernels::run(a)?, json)
        }
        Command::Attention(a) => {
            let json = a.json;
            emit(&attention::run(a)?, json)
        }
    }
}
