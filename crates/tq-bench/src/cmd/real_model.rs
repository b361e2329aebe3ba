//! `real-model`: a decoder-only ONNX model decoded by tract with exact and quantized KV caches,
//! compared step by step or teacher-forced for perplexity ([`crate::real`]).

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::Serialize;
use tq_bench::count;
use tq_core::RotationKind;
use tq_quant::ScaleMode;

use super::{KvCacheArgs, KvCommon, KvGrid, NamedConfig, Report, kv_configs, pool, strategy_label};
use crate::real;

/// `real-model`'s options.
#[derive(Args)]
pub struct RealModelArgs {
    /// Bundle directory (scripts/setup-real-model.sh writes artifacts/smollm2-135m-instruct).
    #[arg(long, default_value = "artifacts/smollm2-135m-instruct")]
    pub model_dir: PathBuf,
    /// One prompt (wrapped in the model's chat template unless --raw).
    #[arg(long, conflicts_with_all = ["prompts", "text"])]
    pub prompt: Option<String>,
    /// A prompt suite: JSON lines with a "prompt" string (e.g. fixtures/prompts.jsonl).
    #[arg(long, conflicts_with = "text")]
    pub prompts: Option<PathBuf>,
    /// Teacher-forced perplexity of this text file instead of generation (one token per step,
    /// so every prediction sees a quantized past).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// With --text: use at most this many tokens.
    #[arg(long, default_value_t = 300)]
    pub max_tokens: usize,
    /// Feed prompts as they are, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, value_enum, default_value_t = real::Mode::Compare)]
    pub mode: real::Mode,
    /// Where attention runs [default: native where the bundle has native stages, else float].
    #[arg(long, value_enum)]
    pub attention: Option<AttentionArg>,
    /// Long-context workload, comma-separated lengths (e.g. 512,2048,4096,8192): each length of
    /// --text (default fixtures/jargon-chapters.txt, repeated as needed) is prefilled in chunks
    /// of --chunk tokens, then --max-new-tokens tokens (default 16) are decoded greedily. Prints
    /// decode and prefill tokens/s, cache bytes against f16, and each row's peak memory growth,
    /// for the exact cache (float and native attention) and each quantized configuration (on
    /// --attention's path). Each row runs in its own child process, so rows do not share memory.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "prompts", "dump_trace"])]
    pub context: Option<Vec<usize>>,
    /// Tokens per prefill step of --context.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Key precisions, comma-separated: integers, 2.5 / 3.5 (outlier splits) or OBxCOUNT+RB.
    /// Without --key-bits and --config the run measures the documented default cache
    /// (tq_kv::HeadConfig::recommended, docs/CHOOSING.md; the other grid options must then keep
    /// their defaults); with --key-bits, the grid they and the other options span.
    #[arg(long, value_delimiter = ',')]
    pub key_bits: Option<Vec<String>>,
    /// Set by the CLI when a grid option (one of [`GRID_ARGS`]) was given on the command line.
    #[arg(skip)]
    pub grid_given: bool,
    /// Per-vector scalars of MSE keys and values, comma-separated: norm, unbiased, least-squares.
    #[arg(long = "scale", value_delimiter = ',', default_value = "least-squares")]
    pub scales: Vec<ScaleMode>,
    /// Most recent tokens kept unquantized (at --window-precision), comma-separated for several
    /// configurations.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub window: Vec<usize>,
    /// Random rotations of the cache quantizers, comma-separated: hadamard, haar.
    #[arg(long, value_delimiter = ',', default_value = "hadamard")]
    pub rotation: Vec<RotationKind>,
    /// Tokens generated per prompt [default: 32, or 16 with --quick].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Size of the top-k overlap.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Sample at this temperature instead of greedy decoding (seeded by --seed).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// With --temperature: sample among this many most likely tokens.
    #[arg(long, default_value_t = 50)]
    pub sample_top_k: usize,
    /// Write the exact run's keys, values and queries (of the first prompt, or of --text) as a
    /// trace (docs/FORMATS.md) for `tq-bench trace --trace FILE`.
    #[arg(long)]
    pub dump_trace: Option<PathBuf>,
    /// 16 new tokens and the built-in default prompt.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub cache: KvCacheArgs,
    #[command(flatten)]
    pub common: KvCommon,
}

/// `real-model`'s JSON report.
#[derive(Serialize)]
pub struct RealReport {
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
    attention: &'static str,
    note: &'static str,
    results: Vec<real::Row>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    contexts: Vec<crate::context::ContextRow>,
}

/// `--context`: the exact cache on both paths (where the bundle has native stages) and each
/// configuration on `--attention`'s path.
fn run_context(a: &RealModelArgs, contexts: &[usize], grid: &KvGrid<'_>) -> Result<RealReport> {
    use tq_onnx::{Attention, Decoder};
    let c = &a.common;
    let has_native = Decoder::native_available(&a.model_dir);
    let float = Decoder::open_with(&a.model_dir, Attention::Float)?;
    let native = match a.attention {
        Some(AttentionArg::Float) => None,
        Some(AttentionArg::Native) => Some(Decoder::open_with(&a.model_dir, Attention::Native)?),
        None if has_native => Some(Decoder::open_with(&a.model_dir, Attention::Native)?),
        None => {
            if !c.json {
                eprintln!(
                    "note: {} has no native stages (native/stage0.onnx): every cache runs on the float path",
                    a.model_dir.display()
                );
            }
            None
        }
    };
    let d = float.head_dim();
    let configs: Vec<real::Config> = kv_configs(grid, d, c.seed)?
        .into_iter()
        .map(|head| real::Config {
            head,
            split: a.cache.split.clone(),
        })
        .collect();
    let path = a
        .text
        .clone()
        .unwrap_or_else(|| resolve_repo_path(std::path::Path::new("fixtures/jargon-chapters.txt")));
    let body = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let ids = float.bundle().encode(&body)?;
    let (_, pool) = pool(c.threads)?;
    let rows = pool.install(|| {
        crate::context::run(
            Some(&float),
            native.as_ref(),
            &ids,
            contexts,
            &configs,
            a.max_new_tokens.unwrap_or(16),
            a.chunk,
            c.json,
        )
    })?;
    let cfg = float.config();
    let on = if native.is_some() { "native" } else { "float" };
    Ok(RealReport {
        workload: "real-model",
        source: "real-model",
        model: cfg.name.clone(),
        model_dir: a.model_dir.display().to_string(),
        seed: c.seed,
        layers: float.layers(),
        kv_heads: float.kv_heads(),
        q_heads: cfg.q_heads,
        head_dim: d,
        mode: "context".into(),
        sampling: "greedy".into(),
        text: Some(path.display().to_string()),
        attention: on,
        note: "long context: exact caches on the float and native paths, quantized caches on the attention path named; RSS+ is each row's peak resident memory growth",
        results: Vec::new(),
        contexts: rows,
    })
}

/// `--attention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttentionArg {
    /// tract runs the model cut around attention (the bundle's native/ stages, written by
    /// scripts/export_llama_onnx.py) and tq-kv attends on the packed codes: no float past is
    /// kept, so a quantized cache saves memory.
    Native,
    /// tract runs the whole graph over a float past decoded from the codes (any decoder-only
    /// ONNX export; needed by --dump-trace).
    Float,
}

/// Opens the decoder with its attention where asked, or native where the bundle allows and
/// float otherwise (saying so).
fn open_decoder(
    dir: &std::path::Path,
    asked: Option<AttentionArg>,
    trace: bool,
    quiet: bool,
) -> Result<tq_onnx::Decoder> {
    use tq_onnx::{Attention, Decoder};
    let attention = match asked {
        Some(AttentionArg::Native) => {
            if trace {
                bail!("--dump-trace reads the float past: use --attention float");
            }
            Attention::Native
        }
        Some(AttentionArg::Float) => Attention::Float,
        None if trace => Attention::Float,
        None if Decoder::native_available(dir) => Attention::Native,
        None => {
            if !quiet {
                eprintln!(
                    "note: {} has no native stages (native/stage0.onnx): attention runs on the float path",
                    dir.display()
                );
            }
            Attention::Float
        }
    };
    Ok(Decoder::open_with(dir, attention)?)
}

/// A relative path (`--model-dir`, the default long-context text) that does not exist from the
/// working directory is looked up from the repository root as well, so the defaults
/// (`artifacts/smollm2-135m-instruct`, `fixtures/jargon-chapters.txt`) work from any folder of
/// the checkout this binary was built in.
fn resolve_repo_path(dir: &std::path::Path) -> PathBuf {
    if dir.is_relative() && !dir.exists() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let alt = root.join(dir);
        if alt.exists() {
            return alt;
        }
    }
    dir.to_path_buf()
}

/// The default prompt of `real-model`.
const DEFAULT_PROMPT: &str = "What is the capital of France?";

/// Why grid options and named configurations do not mix (the grid would be ignored).
pub const LISTED_NOT_GRID: &str = "--config and --cache name whole configurations: the grid options (--key-bits, --value-bits, --window, --scale, --sink, ...) do not apply to them (a --cache spec names its own settings)";

/// The ids of the grid options: given without --key-bits, or with --config or --cache, they are
/// an error rather than ignored.
pub const GRID_ARGS: [&[&str]; 2] = [&super::CACHE_GRID_ARGS, &["scales", "window", "rotation"]];

/// Runs `real-model`.
///
/// # Errors
/// A missing or invalid bundle; bad options; decoding and cache errors.
pub fn run(a: RealModelArgs) -> Result<RealReport> {
    let model_dir = resolve_repo_path(&a.model_dir);
    let a = RealModelArgs { model_dir, ..a };
    let c = &a.common;
    let default_cache = [NamedConfig::Recommended];
    let listed = !a.cache.caches.is_empty() || !a.cache.config.is_empty();
    ensure!(
        !(listed && (a.key_bits.is_some() || a.grid_given)),
        "{LISTED_NOT_GRID}"
    );
    let (key_bits, named): (&[String], &[NamedConfig]) = match &a.key_bits {
        Some(k) => (k, &[]),
        None if listed => (&[], &a.cache.config),
        None => {
            ensure!(
                !a.grid_given,
                "grid options (--value-bits, --window, --scale, --sink, ...) need --key-bits; without it the run measures the default cache (--config recommended)"
            );
            (&[], &default_cache)
        }
    };
    let grid = KvGrid {
        key_bits,
        value_bits: &a.cache.value_bits,
        pair: a.cache.pair,
        strategies: &a.cache.key_strategy,
        value_strategies: &a.cache.value_strategy,
        groups: &a.cache.group,
        named,
        caches: &a.cache.caches,
        scales: &a.scales,
        scale_precisions: &a.cache.scale_precision,
        sinks: &a.cache.sink,
        window_precisions: &a.cache.window_precision,
        center: a.cache.center,
        windows: &a.window,
        rotations: &a.rotation,
    };
    if !a.model_dir.is_dir() {
        bail!(
            "{}: no model bundle here (run scripts/setup-real-model.sh for SmolLM2-135M-Instruct, or pass --model-dir)",
            a.model_dir.display()
        );
    }
    if let Some(contexts) = &a.context {
        return run_context(&a, contexts, &grid);
    }
    let decoder = open_decoder(&a.model_dir, a.attention, a.dump_trace.is_some(), c.json)?;
    let d = decoder.head_dim();
    let configs: Vec<real::Config> = kv_configs(&grid, d, c.seed)?
        .into_iter()
        .map(|head| real::Config {
            head,
            split: a.cache.split.clone(),
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
        attention: decoder.attention().name(),
        contexts: Vec::new(),
        note: match decoder.attention() {
            tq_onnx::Attention::Native => {
                "native attention: tract runs the model around attention and tq-kv attends on the cache's packed codes; no float past is kept"
            }
            tq_onnx::Attention::Float => {
                "float attention: tract attends over a past decoded from the cache's codes; the cache's storage and information are quantized, the attention arithmetic is not"
            }
        },
        results: rows,
    };
    Ok(report)
}

impl Report for RealReport {
    fn print_table(&self) {
        println!(
            "real-model | {} | {} x {} kv / {} q heads, d = {} | {} | {}",
            self.model,
            count(self.layers, "layer"),
            self.kv_heads,
            self.q_heads,
            self.head_dim,
            self.mode,
            self.sampling
        );
        println!("note: {}", self.note);
        if self.contexts.is_empty() {
            print_real_table(&self.results);
        } else {
            crate::context::print(&self.contexts);
        }
    }
}

/// The real-model table: rows grouped by prompt (each group ends with the exact run's text),
/// then, over a prompt suite, one summary row per configuration.
fn print_real_table(rows: &[real::Row]) {
    let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    println!(
        "{:>8} {:>8} {:>15} {:>8} {:>6} {:>6} {:>6} {:>6} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "keys",
        "values",
        "k/v",
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
            "{:>8} {:>8} {:>15} {:>8} {:>6} {:>6} {:>6} {:>6} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
            r.key_precision.as_deref().unwrap_or("exact"),
            r.value_precision.as_deref().unwrap_or("exact"),
            match (r.key_strategy, r.value_strategy) {
                (Some(k), Some(v)) => strategy_label(k, v, r.group, r.scale_precision),
                _ => "-".into(),
            },
            r.rotation
                .map_or("-".to_string(), |k| format!("{k:?}").to_lowercase()),
            r.window.map_or("-".into(), |w| super::window_label(
                w,
                r.sink.unwrap_or(0),
                r.window_precision.unwrap_or_default()
            )),
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
