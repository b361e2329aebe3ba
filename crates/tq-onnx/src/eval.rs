//! Runs over a decoder: greedy or sampled generation, teacher-forced replays of a fixed token
//! sequence compared step by step with a reference run, and K/V trace dumps.

use std::time::Instant;

use serde::Serialize;
use tq_core::{SeededRng, rng::stream};
use tq_kv::{KvTrace, TraceMeta};

use crate::cache::{CacheSpec, Sequence};
use crate::metrics::{LogitComparison, argmax, top_k};
use crate::runner::{Attention, Decoder};
use crate::{Error, Result};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The largest logit.
    Greedy,
    /// Softmax at `temperature` over the `top_k` largest logits, drawn from a ChaCha stream of
    /// `seed` (the same seed gives the same tokens for the same logits).
    Sample {
        /// Temperature (> 0).
        temperature: f32,
        /// Candidates kept (≥ 1).
        top_k: usize,
        /// Seed of the draws.
        seed: u64,
    },
}

struct Sampler {
    mode: Sampling,
    rng: SeededRng,
}

impl Sampler {
    fn new(mode: Sampling) -> Result<Self> {
        let seed = match mode {
            Sampling::Greedy => 0,
            Sampling::Sample {
                temperature,
                top_k,
                seed,
            } => {
                if !(temperature > 0.0 && temperature.is_finite()) || top_k == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "sampling needs temperature > 0 and top_k >= 1 (got {temperature}, {top_k})"
                    )));
                }
                seed
            }
        };
        Ok(Self {
            mode,
            rng: SeededRng::new(seed, stream::DATA),
        })
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        match self.mode {
            Sampling::Greedy => argmax(logits) as u32,
            Sampling::Sample {
                temperature,
                top_k: k,
                ..
            } => {
                let cand = top_k(logits, k);
                let m = cand.first().map(|&i| logits[i]).unwrap_or(0.0) as f64;
                let w: Vec<f64> = cand
                    .iter()
                    .map(|&i| ((logits[i] as f64 - m) / temperature as f64).exp())
                    .collect();
                let mut u = self.rng.uniform() * w.iter().sum::<f64>();
                for (&i, &wi) in cand.iter().zip(&w) {
                    if u < wi {
                        return i as u32;
                    }
                    u -= wi;
                }
                cand.last().copied().unwrap_or(0) as u32
            }
        }
    }
}

/// Wall-clock time of a run's steps (model steps and cache updates, not the metrics).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Timing {
    /// Tokens of the first step.
    pub prefill_tokens: usize,
    /// Seconds of the first step.
    pub prefill_s: f64,
    /// One-token steps after it.
    pub decode_tokens: usize,
    /// Seconds of those steps.
    pub decode_s: f64,
}

impl Timing {
    /// Prefill tokens per second (0 when nothing was timed).
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_s)
    }

    /// Decode tokens per second (0 when nothing was timed).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Tokens of the first step (the prompt).
    pub prompt: Vec<u32>,
    /// Tokens chosen (generation) or given (replay) after the prompt, in order.
    pub tokens: Vec<u32>,
    /// Logits after each step, when kept: `logits[i]` predicted `tokens[i]`.
    pub logits: Vec<Vec<f32>>,
    /// Step timings.
    pub timing: Timing,
    /// Bytes the cache stores at the end.
    pub kv_bytes: usize,
    /// The same tokens' key-values in f16.
    pub f16_bytes: usize,
    /// Whether generation stopped at an end-of-sequence token (it is the last of `tokens`).
    pub stopped_at_eos: bool,
    /// Queries per layer and query head (`[q_heads][fed tokens][head_dim]`), when collected.
    pub queries: Option<Vec<Vec<f32>>>,
    /// Keys and values of every fed token, when collected.
    pub kv: Option<LayerKv>,
}

/// Keys and values of every layer, each `[kv_heads][tokens][head_dim]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerKv {
    /// Keys per layer.
    pub keys: Vec<Vec<f32>>,
    /// Values per layer.
    pub values: Vec<Vec<f32>>,
}

/// What a run keeps besides its tokens and timings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    /// Logits after every step.
    pub logits: bool,
    /// Queries and key-values, for a trace dump.
    pub trace: bool,
}

/// Where the tokens after the prompt come from.
enum Next<'a> {
    Choose {
        max_new: usize,
        sampler: Box<Sampler>,
        eos: &'a [u32],
    },
    Given(&'a [u32]),
}

/// Drives `prompt` then the next tokens through one sequence. `on_step(i, logits, token)` is
/// called after step `i` with the token that follows it.
fn drive(
    decoder: &Decoder,
    spec: &CacheSpec,
    prompt: &[u32],
    mut next: Next<'_>,
    keep: Keep,
    on_step: &mut dyn FnMut(usize, &[f32], u32),
) -> Result<Run> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let total = match &next {
        Next::Choose { max_new, .. } => *max_new,
        Next::Given(t) => t.len(),
    };
    if keep.trace && decoder.attention() == Attention::Native {
        return Err(Error::Unsupported(
            "trace dumps read the float past: open the decoder with float attention".into(),
        ));
    }
    let mut seq = Sequence::new(decoder, spec)?;
    let mut run = Run {
        prompt: prompt.to_vec(),
        tokens: Vec::with_capacity(total),
        logits: Vec::new(),
        timing: Timing::default(),
        kv_bytes: 0,
        f16_bytes: 0,
        stopped_at_eos: false,
        queries: None,
        kv: None,
    };
    let q_heads = decoder.config().q_heads;
    let d = decoder.head_dim();
    let mut queries: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); q_heads]; decoder.layers()];
    let mut feed: Vec<u32> = prompt.to_vec();
    for i in 0..total {
        let t0 = Instant::now();
        let out = seq.feed(&feed)?;
        let dt = t0.elapsed().as_secs_f64();
        if i == 0 {
            run.timing.prefill_tokens = feed.len();
            run.timing.prefill_s = dt;
        } else {
            run.timing.decode_tokens += 1;
            run.timing.decode_s += dt;
        }
        if keep.trace
            && let Some(q) = &out.queries
        {
            let s = feed.len();
            for (layer, lq) in queries.iter_mut().zip(q) {
                for (h, rows) in layer.iter_mut().enumerate() {
                    rows.extend_from_slice(&lq[h * s * d..(h + 1) * s * d]);
                }
            }
        }
        let token = match &mut next {
            Next::Given(t) => t[i],
            Next::Choose { sampler, .. } => sampler.pick(&out.logits),
        };
        on_step(i, &out.logits, token);
        if keep.logits {
            run.logits.push(out.logits);
        }
        run.tokens.push(token);
        if let Next::Choose { eos, .. } = &next
            && eos.contains(&token)
        {
            run.stopped_at_eos = true;
            break;
        }
        if i + 1 < total {
            feed.clear();
            feed.push(token);
        }
    }
    run.kv_bytes = seq.kv_bytes();
    run.f16_bytes = seq.f16_bytes();
    if keep.trace {
        let past = seq.past();
        let split = |x: &[f32]| -> Vec<f32> { x.to_vec() };
        let keys = (0..decoder.layers())
            .map(|l| past.keys_of(l).map(split))
            .collect::<Result<Vec<_>>>()?;
        let values = (0..decoder.layers())
            .map(|l| past.values_of(l).map(split))
            .collect::<Result<Vec<_>>>()?;
        run.kv = Some(LayerKv { keys, values });
        if decoder.has_queries() {
            run.queries = Some(queries.into_iter().map(|l| l.concat()).collect());
        }
    }
    Ok(run)
}

/// Generates up to `max_new` tokens after `prompt` (stopping at an end-of-sequence id of the
/// config). `progress` is called once per step.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty prompt or bad sampling parameters; step errors.
pub fn generate(
    decoder: &Decoder,
    spec: &CacheSpec,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    keep: Keep,
    progress: &mut dyn FnMut(),
) -> Result<Run> {
    let eos = decoder.config().eos_token_ids.clone();
    drive(
        decoder,
        spec,
        prompt,
        Next::Choose {
            max_new,
            sampler: Box::new(Sampler::new(sampling)?),
            eos: &eos,
        },
        keep,
        &mut |_, _, _| progress(),
    )
}

/// Replays `tokens` after `prompt` with `spec`'s cache (teacher forcing: step i feeds
/// `tokens[i-1]`), comparing each step's logits with `reference[i]` (the exact run's logits for
/// the same inputs) and scoring `tokens[i]` as the target. `k` is the top-k overlap size.
///
/// # Errors
/// [`Error::InvalidArgument`] when `reference` does not hold one logit vector per token; step
/// errors.
pub fn replay(
    decoder: &Decoder,
    spec: &CacheSpec,
    prompt: &[u32],
    tokens: &[u32],
    reference: &[Vec<f32>],
    k: usize,
    progress: &mut dyn FnMut(),
) -> Result<(Run, LogitComparison)> {
    if reference.len() != tokens.len() {
        return Err(Error::InvalidArgument(format!(
            "{} reference logit vectors for {} tokens",
            reference.len(),
            tokens.len()
        )));
    }
    let mut cmp = LogitComparison::new(k);
    let run = drive(
        decoder,
        spec,
        prompt,
        Next::Given(tokens),
        Keep::default(),
        &mut |i, logits, token| {
            cmp.add(&reference[i], logits, Some(token));
            progress();
        },
    )?;
    Ok((run, cmp))
}

/// The exact run of a text, teacher-forced one token at a time (the first token is the prompt):
/// the reference for [`replay`] and the perplexity baseline.
///
/// # Errors
/// [`Error::InvalidArgument`] for fewer than two tokens; step errors.
pub fn teacher_forced(
    decoder: &Decoder,
    spec: &CacheSpec,
    ids: &[u32],
    keep: Keep,
    progress: &mut dyn FnMut(),
) -> Result<Run> {
    if ids.len() < 2 {
        return Err(Error::InvalidArgument(
            "teacher forcing needs at least two tokens".into(),
        ));
    }
    drive(
        decoder,
        spec,
        &ids[..1],
        Next::Given(&ids[1..]),
        keep,
        &mut |_, _, _| progress(),
    )
}

/// Token agreement of two generations: the fraction of positions (over the longer one) with the
/// same token, and the first position where they differ (`None` when identical).
pub fn token_match(a: &[u32], b: &[u32]) -> (f64, Option<usize>) {
    let n = a.len().max(b.len());
    if n == 0 {
        return (1.0, None);
    }
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    let first = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())));
    (same as f64 / n as f64, first)
}

/// Where a run's trace took its queries from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceQueries {
    /// The graph's `queries.<i>` outputs: the model's own queries.
    Model,
    /// The graph exposes no queries: each query head's queries are its kv head's keys (a proxy
    /// the caller must say it used).
    KeysAsProxy,
}

/// A run's K/V trace and where its queries came from.
#[derive(Debug, Clone)]
pub struct RunTrace {
    /// The trace.
    pub trace: KvTrace,
    /// The source of its queries.
    pub queries: TraceQueries,
}

/// The K/V trace (docs/DESIGN.md, Trace format) of a run made with [`Keep::trace`]: keys and values of every fed
/// token (after RoPE), the queries of every position when the graph exposes them (query `i`
/// attends to `i + 1` tokens), or [`TraceQueries::KeysAsProxy`] when it does not.
///
/// # Errors
/// [`Error::InvalidArgument`] when the run kept no trace; trace validation errors.
pub fn trace_of(decoder: &Decoder, run: &Run) -> Result<RunTrace> {
    let LayerKv { keys, values } = run
        .kv
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("the run did not keep its key-values".into()))?;
    let (layers, kv_heads, q_heads, d) = (
        decoder.layers(),
        decoder.kv_heads(),
        decoder.config().q_heads,
        decoder.head_dim(),
    );
    let tokens = keys.first().map(|k| k.len() / (kv_heads * d)).unwrap_or(0);
    let group = q_heads / kv_heads;
    let (queries, source) = match &run.queries {
        Some(q) => (q.concat(), TraceQueries::Model),
        None => {
            let mut q = Vec::with_capacity(layers * q_heads * tokens * d);
            for k in keys {
                for h in 0..q_heads {
                    let kv = h / group;
                    q.extend_from_slice(&k[kv * tokens * d..(kv + 1) * tokens * d]);
                }
            }
            (q, TraceQueries::KeysAsProxy)
        }
    };
    let trace = KvTrace {
        layers,
        kv_heads,
        q_heads,
        tokens,
        head_dim: d,
        keys: keys.concat(),
        values: values.concat(),
        queries,
        query_positions: (1..=tokens).collect(),
        meta: TraceMeta {
            model: decoder.config().name.clone(),
            rope: "post".into(),
            source: "real-model".into(),
        },
    };
    trace.validate()?;
    Ok(RunTrace {
        trace,
        queries: source,
    })
}
