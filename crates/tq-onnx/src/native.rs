//! The native path: tract runs everything but attention, and tq-kv attends on its own cache, so
//! no float past exists.
//!
//! A bundle exported by `scripts/export_llama_onnx.py` carries, beside `model.onnx`, the same
//! model cut around each layer's attention (`native/stage0.onnx` .. `native/stage<L>.onnx`):
//! stage 0 embeds the tokens and gives layer 0's RoPE'd queries, keys and values; stage `i`
//! (`0 < i < L`) takes the hidden state and layer `i − 1`'s attention output and gives the next
//! hidden state and layer `i`'s q / k / v; stage `L` ends with the logits. A step runs the stages
//! in turn and, between them, appends the new keys and values to the layer's
//! [`MultiHeadCache`] and attends on it ([`MultiHeadCache::append_attend`]: grouped-query,
//! causal by position, every key/value strategy, the sink and window; the step's own tokens are
//! attended exactly, as the model's forward pass computes them, and quantized after).

use std::path::Path;
use std::sync::Arc;

use tq_kv::{ModelCache, MultiHeadCache};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::bundle::{Bundle, ModelConfig};
use crate::error::tract;
use crate::runner::plain_f32;
use crate::{Error, Result};

/// One stage graph and where its inputs and outputs are.
struct Stage {
    plan: Arc<TypedRunnableModel>,
    /// Input order: `input_ids` | `hidden`, `attention`, `position_ids` (as present).
    inputs: Vec<StageInput>,
    /// Output indices of `hidden_out`, `q`, `k`, `v` (stages before the last) or `logits`.
    outputs: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StageInput {
    Ids,
    Hidden,
    Attention,
    Positions,
}

/// A bundle's native stages (see the [module docs](self)), run by [`crate::Decoder`] when it is
/// opened with [`crate::Attention::Native`].
pub(crate) struct Stages {
    stages: Vec<Stage>,
}

/// The stage file of stage `i`.
fn stage_path(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join("native").join(format!("stage{i}.onnx"))
}

/// Whether the bundle in `dir` has native stages (`native/stage0.onnx`).
pub(crate) fn available(dir: &Path) -> bool {
    stage_path(dir, 0).is_file()
}

impl Stages {
    /// Loads the `L + 1` stages of an opened bundle.
    ///
    /// # Errors
    /// [`Error::MissingFile`] naming the first missing stage; [`Error::Unsupported`] for a stage
    /// without the inputs / outputs it needs; [`Error::Tract`] when tract cannot load or
    /// optimize a stage.
    pub(crate) fn load(bundle: &Bundle) -> Result<Self> {
        let layers = bundle.config.layers;
        let mut stages = Vec::with_capacity(layers + 1);
        for i in 0..=layers {
            let path = stage_path(&bundle.dir, i);
            if !path.is_file() {
                return Err(Error::MissingFile {
                    dir: bundle.dir.clone(),
                    what: "native stage",
                    tried: format!("native/stage{i}.onnx"),
                });
            }
            stages.push(Self::load_stage(&path, i, layers)?);
        }
        Ok(Self { stages })
    }

    fn load_stage(path: &Path, i: usize, layers: usize) -> Result<Stage> {
        let what = format!("native stage {i}");
        let bad = |m: String| Error::Unsupported(format!("{}: {m}", path.display()));
        let mut model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_path(path)
            .map_err(tract(&what))?;
        let s = model.symbols.sym("S");
        let one = 1usize.to_dim();
        let mut inputs = Vec::new();
        for (ix, outlet) in model
            .input_outlets()
            .map_err(tract(&what))?
            .to_vec()
            .iter()
            .enumerate()
        {
            let name = model.node(outlet.node).name.clone();
            let role = match name.as_str() {
                "input_ids" => StageInput::Ids,
                "hidden" => StageInput::Hidden,
                "attention" => StageInput::Attention,
                "position_ids" => StageInput::Positions,
                other => return Err(bad(format!("unexpected input `{other}`"))),
            };
            let fact = match role {
                StageInput::Ids | StageInput::Positions => {
                    InferenceFact::dt_shape(i64::datum_type(), tvec![one.clone(), s.to_dim()])
                }
                StageInput::Hidden | StageInput::Attention => {
                    let declared = model.input_fact(ix).map_err(tract(&what))?;
                    let width = declared
                        .shape
                        .dims()
                        .nth(2)
                        .and_then(|d| d.concretize())
                        .and_then(|d| d.as_i64())
                        .ok_or_else(|| bad(format!("input `{name}` has no fixed width")))?
                        as usize;
                    InferenceFact::dt_shape(
                        f32::datum_type(),
                        tvec![one.clone(), s.to_dim(), width.to_dim()],
                    )
                }
            };
            model.set_input_fact(ix, fact).map_err(tract(&what))?;
            inputs.push(role);
        }
        let want: &[StageInput] = if i == 0 {
            &[StageInput::Ids, StageInput::Positions]
        } else if i < layers {
            &[
                StageInput::Hidden,
                StageInput::Attention,
                StageInput::Positions,
            ]
        } else {
            &[StageInput::Hidden, StageInput::Attention]
        };
        let mut sorted = inputs.clone();
        sorted.sort_by_key(|r| *r as u8);
        let mut expected = want.to_vec();
        expected.sort_by_key(|r| *r as u8);
        if sorted != expected {
            return Err(bad(format!("inputs {inputs:?}, expected {want:?}")));
        }
        let names: Vec<String> = model
            .output_outlets()
            .map_err(tract(&what))?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let wanted: &[&str] = if i < layers {
            &["hidden_out", "q", "k", "v"]
        } else {
            &["logits"]
        };
        let outputs = wanted
            .iter()
            .map(|w| {
                names
                    .iter()
                    .position(|n| n == w)
                    .ok_or_else(|| bad(format!("no `{w}` output")))
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = model
            .into_optimized()
            .map_err(tract(&what))?
            .into_runnable()
            .map_err(tract(&what))?;
        Ok(Stage {
            plan,
            inputs,
            outputs,
        })
    }

    /// Runs `ids` (S ≥ 1 new tokens at positions `P..P+S`, `P = cache.len()`): every stage, and
    /// between stages the layer's keys and values appended to `cache` and attention on it (new
    /// token `s` sees tokens `0..=P+s`). Returns the logits of the last new token.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no tokens, an id outside the vocabulary or a cache of
    /// another shape; [`Error::Tract`] when a stage fails; [`Error::Unsupported`] for stage
    /// outputs of an unexpected shape; cache errors (the cache may then hold the step's tokens in
    /// some layers only: truncate it to `P` to retry).
    pub(crate) fn step(
        &self,
        c: &ModelConfig,
        ids: &[u32],
        cache: &mut ModelCache,
    ) -> Result<Vec<f32>> {
        let s = ids.len();
        if s == 0 {
            return Err(Error::InvalidArgument(
                "a step needs at least one token".into(),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab
            )));
        }
        if cache.n_layers() != c.layers
            || (0..c.layers).any(|l| {
                cache.layer(l).is_none_or(|m| {
                    m.n_q_heads() != c.q_heads
                        || m.n_kv_heads() != c.kv_heads
                        || m.head_dim() != c.head_dim
                })
            })
        {
            return Err(Error::InvalidArgument(format!(
                "the cache must have {} layers of {} query / {} kv heads of {}",
                c.layers, c.q_heads, c.kv_heads, c.head_dim
            )));
        }
        let p = cache.layer(0).map_or(0, MultiHeadCache::len);
        let t = |r: TractResult<Tensor>| r.map_err(tract("native inputs"));
        let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let positions: Vec<i64> = (p..p + s).map(|i| i as i64).collect();
        let ids_t = t(Tensor::from_shape(&[1, s], &ids64))?.into_tvalue();
        let pos_t = t(Tensor::from_shape(&[1, s], &positions))?.into_tvalue();
        let limits: Vec<usize> = (p + 1..=p + s).collect();
        let (hq, hkv, d) = (c.q_heads, c.kv_heads, c.head_dim);
        let mut hidden: Option<TValue> = None;
        let mut attention: Option<TValue> = None;
        let mut ctx = vec![0.0f32; hq * s * d];
        for (i, stage) in self.stages.iter().enumerate() {
            let mut feed: TVec<TValue> = TVec::new();
            for role in &stage.inputs {
                feed.push(match role {
                    StageInput::Ids => ids_t.clone(),
                    StageInput::Positions => pos_t.clone(),
                    StageInput::Hidden => hidden.take().ok_or_else(|| {
                        Error::Unsupported(format!("stage {i} needs a hidden state"))
                    })?,
                    StageInput::Attention => attention.take().ok_or_else(|| {
                        Error::Unsupported(format!("stage {i} needs an attention output"))
                    })?,
                });
            }
            let out = stage
                .plan
                .run(feed)
                .map_err(tract("running a native stage"))?;
            if i == c.layers {
                let logits = plain_f32(&out[stage.outputs[0]])?;
                if logits.len() != s * c.vocab {
                    return Err(Error::Unsupported(format!(
                        "logits have shape {:?}, expected [1, {s}, {}]",
                        out[stage.outputs[0]].shape(),
                        c.vocab
                    )));
                }
                return Ok(logits[(s - 1) * c.vocab..].to_vec());
            }
            let field = |k: usize, heads: usize| -> Result<&[f32]> {
                let v = plain_f32(&out[stage.outputs[k]])?;
                if v.len() != heads * s * d {
                    return Err(Error::Unsupported(format!(
                        "stage {i} output {k} has shape {:?}, expected [1, {heads}, {s}, {d}]",
                        out[stage.outputs[k]].shape()
                    )));
                }
                Ok(v)
            };
            let (q, k, v) = (field(1, hq)?, field(2, hkv)?, field(3, hkv)?);
            let layer = cache
                .layer_mut(i)
                .ok_or_else(|| Error::InvalidArgument(format!("layer {i}")))?;
            layer.append_attend(k, v, q, &limits, &mut ctx)?;
            // [heads, S, d] -> [1, S, heads·d]
            let mut merged = vec![0.0f32; s * hq * d];
            for h in 0..hq {
                for tok in 0..s {
                    merged[(tok * hq + h) * d..(tok * hq + h + 1) * d]
                        .copy_from_slice(&ctx[(h * s + tok) * d..(h * s + tok + 1) * d]);
                }
            }
            attention = Some(t(Tensor::from_shape(&[1, s, hq * d], &merged))?.into_tvalue());
            hidden = Some(out[stage.outputs[0]].clone());
        }
        Err(Error::Unsupported("the bundle has no final stage".into()))
    }
}
