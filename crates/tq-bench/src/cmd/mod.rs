//! The CLI's workloads, one module each: its `#[derive(Args)]` struct, its `run` returning a
//! [`Report`], and the report's table. What several workloads share lives here: the thread pool,
//! progress bars, the vector input loader, the KV configuration grid and [`Report`] itself.

pub mod attention;
pub mod kernels;
pub mod real_model;
pub mod search;
pub mod trace;
pub mod vectors;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tq_bench::data::{self, Vectors};
use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_kv::{
    HeadConfig, KeyStrategy, OutlierChoice, Precision, ScoreMode, ValueStrategy, WindowPrecision,
};
use tq_quant::{ScaleMode, ScalePrecision};

/// A workload's result: one JSON object (schema in docs/REPORT_SCHEMA.md) or a table.
pub trait Report: Serialize {
    /// Prints the human-readable table on stdout.
    fn print_table(&self);
}

/// Prints `report` as pretty JSON (`json`) or as its table.
///
/// # Errors
/// Serialization errors (not expected).
pub fn emit<R: Report>(report: &R, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        report.print_table();
    }
    Ok(())
}

/// Options every KV and kernel workload takes.
#[derive(Args, Clone)]
pub struct KvCommon {
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of the quantizers and of generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The ids of [`KvCacheArgs`]' grid options (every one but --config and --cache): the workloads
/// refuse them beside --config or --cache, where they would be ignored.
pub const CACHE_GRID_ARGS: [&str; 9] = [
    "value_bits",
    "pair",
    "key_strategy",
    "value_strategy",
    "group",
    "scale_precision",
    "sink",
    "window_precision",
    "center",
];

/// The KV cache options `trace` and `real-model` share (their defaults agree).
#[derive(Args, Clone)]
pub struct KvCacheArgs {
    /// Value precisions, same forms as --key-bits (each key precision is paired with each value
    /// precision, or with the one at the same position under --pair).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub value_bits: Vec<String>,
    /// Pair --key-bits and --value-bits by position (k1 with v1, k2 with v2, ...) instead of
    /// running every combination; the two lists must have the same length.
    #[arg(long)]
    pub pair: bool,
    /// Key quantizers, comma-separated: mse, prod, polar, kivi (per-channel groups of --group
    /// tokens, the newest incomplete group in f16), gmse (group-centred TurboQuant_mse: the
    /// per-channel means of each group of --group tokens removed, then mse).
    #[arg(long, value_delimiter = ',', default_value = "mse")]
    pub key_strategy: Vec<KeyStrategy>,
    /// Value quantizers, comma-separated: mse, polar, kivi (per-token groups of --group channels),
    /// gmse.
    #[arg(long, value_delimiter = ',', default_value = "mse")]
    pub value_strategy: Vec<ValueStrategy>,
    /// Group sizes of kivi and gmse, comma-separated (powers of two in 16..=128); crossed with
    /// the configurations that use them.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub group: Vec<usize>,
    /// Named configurations instead of the grid, comma-separated: recommended
    /// (tq_kv::HeadConfig::recommended, the documented default), paper (TurboQuant_mse 4-bit
    /// keys and values, nothing else) and compact (HeadConfig::compact: under 4 bits, calibrated
    /// key split); `recommended,paper` measures both in one run.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub config: Vec<NamedConfig>,
    /// One explicit configuration per occurrence, measured after the --config ones in the same
    /// run instead of the grid (rows that no grid crosses, side by side): comma-separated
    /// `name=value` pairs named as the grid options (key-bits, value-bits, key-strategy,
    /// value-strategy, group, scale, scale-precision, sink, window, window-precision, rotation),
    /// over `base=recommended|paper|compact` or, without one, TurboQuant_mse 4/4 with nothing
    /// else. Example: `--cache key-strategy=kivi,group=64,key-bits=3,value-bits=2,sink=4,window=8`.
    #[arg(long = "cache", value_name = "SPEC")]
    pub caches: Vec<String>,
    /// Stored widths of the per-vector scales of MSE keys and values, comma-separated: f32, f16
    /// (f16 halves the scale's share: 0.25 instead of 0.5 bits per coordinate at d = 64).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub scale_precision: Vec<ScalePrecision>,
    /// First tokens kept unquantized for good (the attention sink), comma-separated for several
    /// configurations; their rows count in the stored bits at --window-precision.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub sink: Vec<usize>,
    /// Stored widths of the sink and window rows, comma-separated: f32, f16 (f16 halves their
    /// share of the stored bits; crossed only with configurations that keep such rows).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub window_precision: Vec<WindowPrecision>,
    /// Centre MSE keys and values on per-head means (calibrated like --split auto).
    #[arg(long)]
    pub center: bool,
    /// Outlier channels for split precisions: auto (per-head RMS calibration: on the trace for
    /// `trace`, on a built-in text for `real-model`), none, or a list.
    #[arg(long, default_value = "auto")]
    pub split: OutlierChoice,
}

/// Where the vector workloads read their vectors.
#[derive(Args, Clone)]
pub struct InputArgs {
    /// The base vectors: `.npy` (2-D float32, C or Fortran order), `.fvecs`, or `.safetensors`
    /// (a 2-D F32 tensor named `vectors`).
    #[arg(long)]
    pub input: PathBuf,
    /// Query vectors (same formats). Without it, a seeded random sample of the input is held out.
    #[arg(long = "queries")]
    pub queries_file: Option<PathBuf>,
    /// Queries to use or hold out [default: min(1000, rows/10), or 100 with --quick].
    #[arg(long)]
    pub num_queries: Option<usize>,
    /// Use at most this many base vectors (the first ones).
    #[arg(long)]
    pub limit: Option<usize>,
}

/// The thread count (all cores by default) and a pool of that many workers.
///
/// # Errors
/// `--threads 0`; a pool that cannot start.
pub fn pool(threads: Option<usize>) -> Result<(usize, rayon::ThreadPool)> {
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

/// A progress bar on stderr over `steps`, hidden with `--json` or when stderr is not a terminal.
pub fn progress_bar(json: bool, steps: usize) -> ProgressBar {
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

/// The table label of a cache's unquantized rows: the window `W`, or `sS wW` with a sink of `S`
/// tokens, and ` f16` after it when those rows are stored in f16.
pub fn window_label(window: usize, sink: usize, precision: WindowPrecision) -> String {
    let base = if sink == 0 {
        window.to_string()
    } else {
        format!("s{sink} w{window}")
    };
    match precision {
        WindowPrecision::F16 if window + sink > 0 => format!("{base} f16"),
        _ => base,
    }
}

/// The table label of a cache's strategies: `keys/values`, KIVI with its group (`kivi32/mse`),
/// and ` f16` after it for f16 per-vector scales (shown where a stream is MSE, the kind that
/// stores them).
pub fn strategy_label(
    k: KeyStrategy,
    v: ValueStrategy,
    group: Option<usize>,
    scale_precision: Option<ScalePrecision>,
) -> String {
    let name = |n: &str| match (n, group) {
        ("kivi" | "gmse", Some(g)) => format!("{n}{g}"),
        _ => n.to_string(),
    };
    // Only MSE streams store the width-selectable scale.
    let mse = k == KeyStrategy::Mse || v == ValueStrategy::Mse;
    let half = match scale_precision {
        Some(ScalePrecision::F16) if mse => " f16",
        _ => "",
    };
    format!("{}/{}{half}", name(k.name()), name(v.name()))
}

/// A named cache configuration (`--config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NamedConfig {
    /// `HeadConfig::recommended`: the documented default.
    Recommended,
    /// `HeadConfig::paper`: TurboQuant_mse at 4 bits for keys and values.
    Paper,
    /// `HeadConfig::compact`: KIVI keys split 4/3 bits by calibrated channels, 3-bit values,
    /// under 4 bits per coordinate at 2 000 tokens.
    Compact,
}

impl NamedConfig {
    /// The name `--config` takes.
    pub fn name(self) -> &'static str {
        match self {
            NamedConfig::Recommended => "recommended",
            NamedConfig::Paper => "paper",
            NamedConfig::Compact => "compact",
        }
    }

    /// The configuration at head dimension `d`.
    pub fn head(self, d: usize) -> HeadConfig {
        match self {
            NamedConfig::Recommended => HeadConfig::recommended(d),
            NamedConfig::Paper => HeadConfig::paper(d),
            NamedConfig::Compact => HeadConfig::compact(d),
        }
    }
}

/// The grid of KV cache configurations a workload evaluates.
pub struct KvGrid<'a> {
    pub key_bits: &'a [String],
    pub value_bits: &'a [String],
    /// Key and value precisions paired by position instead of crossed.
    pub pair: bool,
    pub strategies: &'a [KeyStrategy],
    pub value_strategies: &'a [ValueStrategy],
    /// KIVI group sizes (crossed only with configurations that use KIVI).
    pub groups: &'a [usize],
    /// Named configurations replacing the whole grid (none: the grid).
    pub named: &'a [NamedConfig],
    /// Explicit configurations (`--cache` specs), measured after the named ones, also replacing
    /// the grid.
    pub caches: &'a [String],
    pub scales: &'a [ScaleMode],
    pub scale_precisions: &'a [ScalePrecision],
    pub sinks: &'a [usize],
    /// Stored widths of the sink and window rows (crossed only where a configuration has some).
    pub window_precisions: &'a [WindowPrecision],
    pub center: bool,
    pub windows: &'a [usize],
    pub rotations: &'a [RotationKind],
}

/// Every combination of the grid (keys x values x key strategy x scale x window x rotation; keys and
/// values zipped instead with `pair`), for head dimension `d`. Centring applies to all-MSE
/// configurations only.
pub fn kv_configs(g: &KvGrid<'_>, d: usize, seed: u64) -> Result<Vec<HeadConfig>> {
    if !g.named.is_empty() || !g.caches.is_empty() {
        let mut configs: Vec<HeadConfig> = g
            .named
            .iter()
            .map(|named| HeadConfig {
                seed,
                ..named.head(d)
            })
            .collect();
        for spec in g.caches {
            configs.push(HeadConfig {
                seed,
                ..cache_spec(spec, d)?
            });
        }
        return Ok(configs);
    }
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
        let (kp, vp) = (Precision::parse(kb, d)?, Precision::parse(vb, d)?);
        for &st in g.strategies {
            for &vs in g.value_strategies {
                let grouped = matches!(st, KeyStrategy::Kivi | KeyStrategy::Gmse)
                    || matches!(vs, ValueStrategy::Kivi | ValueStrategy::Gmse);
                let groups = if grouped { g.groups } else { &g.groups[..1] };
                for &group in groups {
                    // The scale width applies to MSE streams only: others take the first.
                    let mse = st == KeyStrategy::Mse || vs == ValueStrategy::Mse;
                    let widths = if mse {
                        g.scale_precisions
                    } else {
                        &g.scale_precisions[..1]
                    };
                    for (&scale, &scale_precision) in g
                        .scales
                        .iter()
                        .flat_map(|s| widths.iter().map(move |p| (s, p)))
                    {
                        for ((&window, &sink), &rotation) in g
                            .windows
                            .iter()
                            .flat_map(|w| g.sinks.iter().map(move |s| (w, s)))
                            .flat_map(|ws| g.rotations.iter().map(move |r| (ws, r)))
                        {
                            let plain = if window + sink > 0 {
                                g.window_precisions
                            } else {
                                &g.window_precisions[..1]
                            };
                            for &window_precision in plain {
                                configs.push(HeadConfig {
                                    key_strategy: st,
                                    value_strategy: vs,
                                    window,
                                    sink,
                                    rotation,
                                    seed,
                                    score_mode: ScoreMode::Fast,
                                    scale,
                                    scale_precision,
                                    group,
                                    center: g.center
                                        && st == KeyStrategy::Mse
                                        && vs == ValueStrategy::Mse,
                                    window_precision,
                                    ..HeadConfig::new(d, kp, vp)
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(configs)
}

/// The configuration a `--cache` spec names at head dimension `d` (see [`KvCacheArgs::caches`]):
/// `base` first wherever it appears, then every other pair in order.
///
/// # Errors
/// A pair without `=`, an unknown name, a name given twice, or a value its option refuses.
pub fn cache_spec(spec: &str, d: usize) -> Result<HeadConfig> {
    fn value<T: std::str::FromStr>(spec: &str, name: &str, v: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        v.parse::<T>()
            .map_err(|e| anyhow!("--cache {spec}: {name}={v}: {e}"))
    }
    let mut pairs = Vec::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (name, v) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("--cache {spec}: '{pair}' is not name=value"))?;
        ensure!(
            pairs.iter().all(|(n, _)| *n != name),
            "--cache {spec}: {name} given twice"
        );
        pairs.push((name, v));
    }
    let mut c = match pairs.iter().find(|(n, _)| *n == "base") {
        Some((_, v)) => <NamedConfig as clap::ValueEnum>::from_str(v, true)
            .map_err(|e| anyhow!("--cache {spec}: base={v}: {e}"))?
            .head(d),
        None => HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4)),
    };
    for (name, v) in pairs {
        match name {
            "base" => {}
            "key-bits" => c.key_precision = Precision::parse(v, d)?,
            "value-bits" => c.value_precision = Precision::parse(v, d)?,
            "key-strategy" => c.key_strategy = value(spec, name, v)?,
            "value-strategy" => c.value_strategy = value(spec, name, v)?,
            "group" => c.group = value(spec, name, v)?,
            "scale" => c.scale = value(spec, name, v)?,
            "scale-precision" => c.scale_precision = value(spec, name, v)?,
            "sink" => c.sink = value(spec, name, v)?,
            "window" => c.window = value(spec, name, v)?,
            "window-precision" => c.window_precision = value(spec, name, v)?,
            "rotation" => c.rotation = value(spec, name, v)?,
            other => bail!(
                "--cache {spec}: unknown name '{other}' (expected base, key-bits, value-bits, key-strategy, value-strategy, group, scale, scale-precision, sink, window, window-precision or rotation)"
            ),
        }
    }
    Ok(c)
}

/// Loads the base vectors (at most `--limit`) and the queries: the query file's first
/// `--num-queries`, or a seeded hold-out sample of the base.
pub fn load_base_and_queries(a: &InputArgs, quick: bool, seed: u64) -> Result<(Vectors, Vectors)> {
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

/// Mesa's Vulkan drivers (the software adapter lavapipe among them) print "error:
/// XDG_RUNTIME_DIR is invalid or not set" twice per process when the variable does not name a
/// directory. Point it at a private one (mode 0700 under the temporary directory) in that case.
pub fn ensure_runtime_dir() {
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
