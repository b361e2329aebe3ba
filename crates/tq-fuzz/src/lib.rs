//! Fuzz targets for every parser of bytes from outside the process, and a stable mutation driver.
//!
//! Each [`Target`] feeds arbitrary bytes to one parser (`.npy`, `.fvecs`, vector safetensors,
//! saved batches of every kind, saved KV caches, K/V traces, decoder `config.json`, the CLI's
//! comma lists) and, when the bytes parse, uses the result a little (decode a row, attend a
//! query), so a panic anywhere on that path is a finding. The contract under test: every input
//! gives `Ok` or a typed `Err`, never a panic.
//!
//! Two engines drive the same targets:
//! - the coverage-guided libFuzzer through cargo-fuzz (`fuzz/`, nightly toolchain), run by
//!   `cargo xtask release-check` where it is installed;
//! - [`fuzz`], a seeded mutation loop on the stable toolchain (bit flips, byte and integer
//!   substitutions, splices, truncations, number swaps inside JSON headers) over the seed corpus
//!   in `fixtures/fuzz/<target>/`, run briefly by the test command and for a set time by the
//!   `tq-fuzz` binary.
//!
//! Inputs that once crashed a target are kept in the corpus as regression tests.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tq_core::SeededRng;

pub mod corpus;

/// One fuzz target: a name (also its corpus folder) and the function that consumes bytes.
#[derive(Clone, Copy)]
pub struct Target {
    /// Name, as given to `tq-fuzz --target` and `cargo fuzz run`.
    pub name: &'static str,
    /// What it parses.
    pub about: &'static str,
    /// Consumes one input; returns whether it parsed (a panic is a finding).
    pub run: fn(&[u8]) -> bool,
}

/// Every target, in a fixed order.
pub const TARGETS: &[Target] = &[
    Target {
        name: "npy",
        about: ".npy vector files (tq-bench)",
        run: npy,
    },
    Target {
        name: "fvecs",
        about: ".fvecs vector files (tq-bench)",
        run: fvecs,
    },
    Target {
        name: "vectors-safetensors",
        about: "safetensors vector files (tq-bench)",
        run: vectors_safetensors,
    },
    Target {
        name: "batch",
        about: "saved batches: mse, centred mse, prod, polar (tq-quant)",
        run: batch,
    },
    Target {
        name: "kv-cache",
        about: "saved KV caches (tq-kv)",
        run: kv_cache,
    },
    Target {
        name: "kv-trace",
        about: "K/V traces (tq-kv)",
        run: kv_trace,
    },
    Target {
        name: "bundle-config",
        about: "decoder bundle config.json (tq-onnx)",
        run: bundle_config,
    },
    Target {
        name: "cli-lists",
        about: "the CLI's comma lists and channel choices (tq-bench)",
        run: cli_lists,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Inputs longer than this are cut before a target sees them (keeps each execution fast; every
/// format here has a meaningful prefix of this size).
pub const MAX_INPUT: usize = 1 << 16;

fn npy(data: &[u8]) -> bool {
    tq_bench::data::parse_npy_noted(data).is_ok()
}

fn fvecs(data: &[u8]) -> bool {
    tq_bench::data::parse_fvecs(data).is_ok()
}

fn vectors_safetensors(data: &[u8]) -> bool {
    tq_bench::data::parse_safetensors(data).is_ok()
}

fn batch(data: &[u8]) -> bool {
    use tq_quant::{AnyBatch, EncodedVectors};
    let Ok(b) = AnyBatch::from_safetensors(data) else {
        return false;
    };
    // Use what was validated: decode the first row, score a query.
    if !b.is_empty() {
        let mut out = vec![0.0; b.dim()];
        let _ = b.dequantize_row(0, &mut out);
        if let Ok(q) = b.encode_query(&out) {
            let mut scores = vec![0.0; b.len()];
            let _ = b.score_into(&q, &mut scores);
        }
    }
    let _ = b.to_safetensors();
    true
}

fn kv_cache(data: &[u8]) -> bool {
    let Ok(m) = tq_kv::ModelCache::from_safetensors(data) else {
        return false;
    };
    // Attend one query per head of the first layer over everything restored (when the query
    // block is of a size worth allocating: the header may ask for up to 65536 heads).
    if let Some(layer) = m.layer(0)
        && let Some(head) = layer.head(0)
        && let Some(n) = layer
            .n_q_heads()
            .checked_mul(head.config().head_dim)
            .filter(|&n| n <= 1 << 20)
    {
        let q = vec![0.5f32; n];
        let mut out = vec![0.0; n];
        let _ = layer.attend(&q, &mut out);
    }
    true
}

fn kv_trace(data: &[u8]) -> bool {
    tq_kv::KvTrace::from_safetensors(data).is_ok()
}

fn bundle_config(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    tq_onnx::bundle::ModelConfig::parse(&text, Path::new("config.json")).is_ok()
}

fn cli_lists(data: &[u8]) -> bool {
    tq_bench::lists::parse_every_list(&String::from_utf8_lossy(data)) > 0
}

/// What one run of [`fuzz`] did.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Inputs executed (seeds included).
    pub executions: u64,
    /// Inputs that parsed.
    pub parsed: u64,
    /// Wall time.
    pub seconds: f64,
    /// Inputs that panicked, as saved to the crash folder.
    pub crashes: Vec<PathBuf>,
}

/// When a [`fuzz`] run stops.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// After this many mutated inputs.
    Runs(u64),
    /// After this much time.
    Time(Duration),
}

/// Runs `target` on every seed, then on mutated seeds until `budget` is spent. A panicking input
/// is written to `crash_dir/<target>/crash-<hash>` and counted; the loop goes on. Deterministic for
/// a given seed and run count.
///
/// # Errors
/// Only if a crashing input cannot be written.
pub fn fuzz(
    target: &Target,
    seeds: &[Vec<u8>],
    budget: Budget,
    seed: u64,
    crash_dir: &Path,
) -> std::io::Result<Stats> {
    quiet_panics();
    let start = Instant::now();
    let mut stats = Stats::default();
    let mut rng = SeededRng::new(seed, 0x6675_7a7a);
    let empty = vec![Vec::new()];
    let pool: &[Vec<u8>] = if seeds.is_empty() { &empty } else { seeds };
    let exec = |input: &[u8], stats: &mut Stats| -> std::io::Result<()> {
        let input = &input[..input.len().min(MAX_INPUT)];
        stats.executions += 1;
        EXPECTING.with(|e| e.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
        EXPECTING.with(|e| e.set(false));
        match r {
            Ok(true) => stats.parsed += 1,
            Ok(false) => {}
            Err(_) => stats
                .crashes
                .push(save_crash(crash_dir, target.name, input)?),
        }
        Ok(())
    };
    for s in pool {
        exec(s, &mut stats)?;
    }
    let mut done = 0u64;
    loop {
        match budget {
            Budget::Runs(n) if done >= n => break,
            Budget::Time(t) if start.elapsed() >= t => break,
            _ => {}
        }
        let base = &pool[rng.below(pool.len() as u64) as usize];
        let input = mutate(&mut rng, base, pool);
        exec(&input, &mut stats)?;
        done += 1;
    }
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

thread_local! {
    static EXPECTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keeps the panic hook quiet inside target runs (a crash is reported by [`fuzz`]); panics
/// elsewhere still print.
fn quiet_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !EXPECTING.with(|e| e.get()) {
                default(info)
            }
        }));
    });
}

fn save_crash(dir: &Path, target: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    // FNV-1a: a stable name, so the same crash is written once.
    let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("crash-{h:016x}"));
    std::fs::write(&path, input)?;
    Ok(path)
}

/// Integers worth trying where a format stores lengths, offsets, counts and shapes.
const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    7,
    64,
    255,
    4096,
    65_535,
    1 << 31,
    u32::MAX as u64,
    1 << 62,
    u64::MAX,
];

/// Decimal numbers worth trying inside JSON headers (shapes, offsets, dims, bits).
const NUMBERS: [&str; 12] = [
    "0",
    "1",
    "2",
    "3",
    "9",
    "17",
    "4096",
    "65537",
    "4294967296",
    "18446744073709551615",
    "-1",
    "1e300",
];

/// One to four random edits of `base` (see the module docs for the kinds).
fn mutate(rng: &mut SeededRng, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut x = base.to_vec();
    let edits = 1 + rng.below(4);
    for _ in 0..edits {
        let len = x.len() as u64;
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len) as usize;
                x[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len) as usize;
                x[i] = [0, 0xFF, 0x7F, 0x80, b'0', b'"', b',', b'}'][rng.below(8) as usize];
            }
            2 if len >= 8 => {
                let i = rng.below(len - 7) as usize;
                let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                if rng.below(2) == 0 {
                    x[i..i + 8].copy_from_slice(&v.to_le_bytes());
                } else {
                    x[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                }
            }
            3 if len > 0 => x.truncate(rng.below(len) as usize),
            4 if len > 0 => {
                let a = rng.below(len) as usize;
                let b = (a + 1 + rng.below(64) as usize).min(x.len());
                x.drain(a..b);
            }
            5 if len > 0 => {
                let a = rng.below(len) as usize;
                let b = (a + 1 + rng.below(64) as usize).min(x.len());
                let chunk = x[a..b].to_vec();
                let at = rng.below(len + 1) as usize;
                x.splice(at..at, chunk);
            }
            6 => {
                let other = &pool[rng.below(pool.len() as u64) as usize];
                if !other.is_empty() {
                    let cut = rng.below(x.len() as u64 + 1) as usize;
                    let from = rng.below(other.len() as u64) as usize;
                    x.truncate(cut);
                    x.extend_from_slice(&other[from..]);
                }
            }
            7 => swap_number(rng, &mut x),
            _ => {
                let at = rng.below(len + 1) as usize;
                let n = 1 + rng.below(16) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                x.splice(at..at, bytes);
            }
        }
    }
    x
}

/// Replaces one run of ASCII digits with an interesting number (JSON headers hold the shapes).
fn swap_number(rng: &mut SeededRng, x: &mut Vec<u8>) {
    let runs: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < x.len() && v.len() < 256 {
            if x[i].is_ascii_digit() {
                let s = i;
                while i < x.len() && x[i].is_ascii_digit() {
                    i += 1;
                }
                v.push((s, i));
            } else {
                i += 1;
            }
        }
        v
    };
    if runs.is_empty() {
        return;
    }
    let (a, b) = runs[rng.below(runs.len() as u64) as usize];
    let n = NUMBERS[rng.below(NUMBERS.len() as u64) as usize];
    x.splice(a..b, n.bytes());
}

/// Reads every file of `dir` (sorted by name); a missing folder is an empty corpus.
///
/// # Errors
/// A folder or file that exists but cannot be read.
pub fn read_corpus(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut paths = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    paths.retain(|p| p.is_file());
    paths.sort();
    paths.iter().map(std::fs::read).collect()
}
