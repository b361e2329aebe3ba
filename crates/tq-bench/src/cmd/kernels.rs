//! `kernels`: each batch kernel timed alone on the CPU and on the wgpu path ([`crate::kernels`]).

use anyhow::{Result, ensure};
use clap::Args;
use serde::Serialize;
use tq_bench::count;

use super::{KvCommon, Report, pool};
use crate::kernels;

/// `kernels`' options.
#[derive(Args)]
pub struct KernelsArgs {
    /// Implementations, comma-separated: cpu, wgpu.
    #[arg(long, value_delimiter = ',', default_value = "cpu,wgpu")]
    pub backend: Vec<kernels::Backend>,
    /// Vectors [default: 1000000, or 20000 with --quick].
    #[arg(long)]
    pub vectors: Option<usize>,
    /// Dimension (at most 1024 on the GPU path).
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Bits per coordinate.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// mse or prod (prod needs --bits >= 2 on the GPU).
    #[arg(long, value_enum, default_value_t = kernels::KernelQuantizer::Mse)]
    pub quantizer: kernels::KernelQuantizer,
    /// Repetitions; the best time is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Small sizes that finish in seconds.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub common: KvCommon,
}

/// `kernels`' JSON report.
#[derive(Serialize)]
pub struct KernelsReport {
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

/// Runs `kernels`.
///
/// # Errors
/// Bad options; no GPU adapter for `--backend wgpu`; device errors.
pub fn run(a: KernelsArgs) -> Result<KernelsReport> {
    let KernelsArgs {
        backend: backends,
        vectors,
        dim,
        bits,
        quantizer,
        reps,
        quick,
        common,
    } = a;
    let c = &common;
    ensure!(
        (1..=8).contains(&bits),
        "--bits {bits} is out of range (1..=8)"
    );
    ensure!(dim >= 2, "--dim must be at least 2");
    let (threads, pool) = pool(c.threads)?;
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
            &backends,
            quantizer.kind(),
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
    Ok(report)
}

impl Report for KernelsReport {
    fn print_table(&self) {
        println!(
            "kernels | {} b = {}, Hadamard | d = {} | {} | {}{}",
            if self.quantizer == kernels::KernelQuantizer::Prod {
                "Prod"
            } else {
                "MSE"
            },
            self.bits,
            self.dim,
            count(self.vectors, "vector"),
            count(self.threads, "CPU thread"),
            self.adapter
                .as_ref()
                .map(|a| format!(" | GPU: {a}"))
                .unwrap_or_default()
        );
        println!(
            "{:>8} {:>11} {:>14} {:>9} {:>10}",
            "backend", "kernel", "vectors/s", "GB/s", "seconds"
        );
        for r in &self.results {
            println!(
                "{:>8} {:>11} {:>14.0} {:>9.2} {:>10.4}",
                format!("{:?}", r.backend).to_lowercase(),
                r.kernel,
                r.vectors_per_s,
                r.gb_per_s,
                r.seconds
            );
        }
    }
}
