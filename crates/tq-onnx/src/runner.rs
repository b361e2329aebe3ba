//! The tract decoder: loads a bundle's graph, maps its inputs and outputs by name, checks them
//! against `config.json`, optimizes once with symbolic lengths (S new tokens, P past tokens) and
//! runs one step at a time with explicit past key-values.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use tq_kv::{HeadCalibration, HeadConfig, ModelCache, MultiHeadCache};

use crate::bundle::{Bundle, ModelConfig};
use crate::error::tract;
use crate::native::Stages;
use crate::{Error, Result};

/// What a graph input carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Ids,
    Mask,
    Positions,
    CachePos,
    CacheBranch,
    PastKey(usize),
    PastValue(usize),
}

/// Where the outputs are, by index in the graph's output list.
#[derive(Debug, Clone)]
struct Outputs {
    logits: usize,
    keys: Vec<usize>,
    values: Vec<usize>,
    /// `queries.<i>` outputs ([1, q_heads, S, head_dim], after RoPE) when the graph has them.
    queries: Option<Vec<usize>>,
}

/// Past or present key-values of every layer: `[1, kv_heads, tokens, head_dim]` f32 each.
#[derive(Debug, Clone)]
pub struct KvTensors {
    pub(crate) keys: Vec<TValue>,
    pub(crate) values: Vec<TValue>,
}

impl KvTensors {
    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.keys.first().map(|k| k.shape()[2]).unwrap_or(0)
    }

    /// `true` when no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `layer`'s keys as `[kv_heads, tokens, head_dim]` row-major f32.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a layer out of range; [`Error::Tract`] if the tensor is not
    /// plain f32.
    pub fn keys_of(&self, layer: usize) -> Result<&[f32]> {
        slice_of(self.keys.get(layer), layer)
    }

    /// Layer `layer`'s values; as [`KvTensors::keys_of`].
    ///
    /// # Errors
    /// As [`KvTensors::keys_of`].
    pub fn values_of(&self, layer: usize) -> Result<&[f32]> {
        slice_of(self.values.get(layer), layer)
    }
}

fn slice_of(t: Option<&TValue>, layer: usize) -> Result<&[f32]> {
    let t = t.ok_or_else(|| Error::InvalidArgument(format!("layer {layer} out of range")))?;
    plain_f32(t)
}

pub(crate) fn plain_f32(t: &Tensor) -> Result<&[f32]> {
    t.as_plain_ram()
        .ok_or_else(|| Error::Tract("tensor is not in plain memory".into()))?
        .as_slice::<f32>()
        .map_err(tract("reading an f32 tensor"))
}

/// One step's results.
#[derive(Debug)]
pub struct StepOutput {
    /// Logits of the last new token (`vocab` values).
    pub logits: Vec<f32>,
    /// Key-values of every token so far (past followed by the new tokens).
    pub present: KvTensors,
    /// Queries of the new tokens per layer (`[q_heads, S, head_dim]`), when the graph exposes them.
    pub queries: Option<Vec<Vec<f32>>>,
}

/// Where a decoder's attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// tract runs the whole graph, attention included, over a float past (decoded from the codes
    /// when the cache is quantized): any decoder-only ONNX export.
    Float,
    /// tract runs the model cut around attention (the bundle's `native/` stages) and tq-kv
    /// attends on its packed codes: no float past exists ([`crate::native`]).
    Native,
}

impl Attention {
    /// `"float"` or `"native"`.
    pub fn name(self) -> &'static str {
        match self {
            Attention::Float => "float",
            Attention::Native => "native",
        }
    }
}

/// The float graph and where its inputs and outputs are.
struct FloatGraph {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<Input>,
    outputs: Outputs,
}

/// A decoder-only model ready to run steps, with its attention on the float path or the native
/// one.
pub struct Decoder {
    bundle: Bundle,
    backend: Backend,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

enum Backend {
    Float(FloatGraph),
    Native(Stages),
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Decoder");
        d.field("bundle", &self.bundle)
            .field("attention", &self.attention());
        if let Backend::Float(g) = &self.backend {
            d.field("inputs", &g.inputs).field("outputs", &g.outputs);
        }
        d.finish_non_exhaustive()
    }
}

fn parse_layer(name: &str, prefix: &str, suffix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn classify_input(name: &str) -> Option<Input> {
    Some(match name {
        "input_ids" => Input::Ids,
        "attention_mask" => Input::Mask,
        "position_ids" => Input::Positions,
        "cache_position" => Input::CachePos,
        "use_cache_branch" => Input::CacheBranch,
        n => {
            if let Some(i) = parse_layer(n, "past_key_values.", ".key") {
                Input::PastKey(i)
            } else if let Some(i) = parse_layer(n, "past_key_values.", ".value") {
                Input::PastValue(i)
            } else {
                return None;
            }
        }
    })
}

/// Fills `slots[i]` from `(i, index)` pairs, requiring every layer exactly once.
fn per_layer(pairs: &[(usize, usize)], layers: usize, what: &str) -> Result<Vec<usize>> {
    let mut slots = vec![usize::MAX; layers];
    for &(layer, ix) in pairs {
        match slots.get_mut(layer) {
            Some(s) if *s == usize::MAX => *s = ix,
            _ => {
                return Err(Error::Unsupported(format!(
                    "{what}.{layer} is duplicated or beyond the {layers} layers"
                )));
            }
        }
    }
    if let Some(missing) = slots.iter().position(|&s| s == usize::MAX) {
        return Err(Error::Unsupported(format!(
            "the graph has no {what}.{missing}"
        )));
    }
    Ok(slots)
}

impl Decoder {
    /// Loads `bundle`'s graph with tract, maps its I/O, checks the KV inputs against the config
    /// (layers, kv heads, head dim, f32) and optimizes it once for any S and P.
    ///
    /// Required inputs: `input_ids` and `past_key_values.<i>.key|value` for every layer; optional:
    /// `attention_mask`, `position_ids`, `cache_position`, `use_cache_branch`. Required outputs:
    /// `logits` and `present.<i>.key|value`; optional `queries.<i>`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming the missing or unexpected input / output or the mismatching
    /// fact (encoder-decoder graphs fail here: they need encoder inputs); [`Error::Tract`] when
    /// tract cannot load or optimize the graph.
    pub fn load(bundle: Bundle) -> Result<Self> {
        let cfg = bundle.config.clone();
        let mut model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_path(&bundle.model_path)
            .map_err(tract("loading the ONNX graph"))?;
        let mut inputs = Vec::new();
        for (ix, outlet) in model
            .input_outlets()
            .map_err(tract("inputs"))?
            .iter()
            .enumerate()
        {
            let name = model.node(outlet.node).name.clone();
            let role = classify_input(&name).ok_or_else(|| {
                Error::Unsupported(format!(
                    "input #{ix} `{name}` is not a decoder input (expected input_ids, attention_mask, \
                     position_ids, cache_position, use_cache_branch, past_key_values.<i>.key|value)"
                ))
            })?;
            inputs.push(role);
        }
        if !inputs.contains(&Input::Ids) {
            return Err(Error::Unsupported(
                "the graph has no `input_ids` input".into(),
            ));
        }
        let past_keys: Vec<(usize, usize)> = inputs
            .iter()
            .enumerate()
            .filter_map(|(ix, r)| match r {
                Input::PastKey(l) => Some((*l, ix)),
                _ => None,
            })
            .collect();
        let layers = past_keys.len();
        if layers == 0 {
            return Err(Error::Unsupported(
                "the graph has no past_key_values.<i>.key inputs (export it with an explicit KV cache)"
                    .into(),
            ));
        }
        if layers != cfg.layers {
            return Err(Error::Unsupported(format!(
                "the graph has {layers} layers of past keys, config.json says {}",
                cfg.layers
            )));
        }
        let key_inputs = per_layer(&past_keys, layers, "past_key_values.<i>.key")?;
        let past_values: Vec<(usize, usize)> = inputs
            .iter()
            .enumerate()
            .filter_map(|(ix, r)| match r {
                Input::PastValue(l) => Some((*l, ix)),
                _ => None,
            })
            .collect();
        per_layer(&past_values, layers, "past_key_values.<i>.value")?;
        // The model's own facts for the cache: [batch, kv_heads, past, head_dim], f32.
        let fact = model
            .input_fact(key_inputs[0])
            .map_err(tract("past key fact"))?;
        if let Some(dt) = fact.datum_type.concretize()
            && dt != f32::datum_type()
        {
            return Err(Error::Unsupported(format!(
                "past key-values are {dt:?}; only f32 caches are supported"
            )));
        }
        let dims: Vec<Option<usize>> = fact
            .shape
            .dims()
            .map(|d| d.concretize().and_then(|d| d.as_i64()).map(|d| d as usize))
            .collect();
        if !fact.shape.is_open() && dims.len() != 4 {
            return Err(Error::Unsupported(format!(
                "past keys have rank {}, expected [batch, kv_heads, past, head_dim]",
                dims.len()
            )));
        }
        let (kv_heads, head_dim) = (cfg.kv_heads, cfg.head_dim);
        for (axis, want, what) in [(1, kv_heads, "kv heads"), (3, head_dim, "head dim")] {
            if let Some(Some(found)) = dims.get(axis)
                && *found != want
            {
                return Err(Error::Unsupported(format!(
                    "past keys have {found} {what} (axis {axis}), config.json says {want}"
                )));
            }
        }
        if let Some(Some(p)) = dims.get(2) {
            return Err(Error::Unsupported(format!(
                "the past sequence axis is fixed at {p}; it must be symbolic"
            )));
        }

        let mut names = Vec::new();
        for outlet in model.output_outlets().map_err(tract("outputs"))? {
            let name = model
                .outlet_label(*outlet)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(outlet.node).name.clone());
            names.push(name);
        }
        let outputs = Self::map_outputs(&names, layers)?;

        let s = model.symbols.sym("S");
        let p = model.symbols.sym("P");
        let one = 1usize.to_dim();
        for (ix, role) in inputs.iter().enumerate() {
            let fact = match role {
                Input::Ids | Input::Positions => {
                    InferenceFact::dt_shape(i64::datum_type(), tvec![one.clone(), s.to_dim()])
                }
                Input::Mask => InferenceFact::dt_shape(
                    i64::datum_type(),
                    tvec![one.clone(), s.to_dim() + p.to_dim()],
                ),
                Input::CachePos => InferenceFact::dt_shape(i64::datum_type(), tvec![s.to_dim()]),
                Input::CacheBranch => {
                    InferenceFact::dt_shape(bool::datum_type(), tvec![one.clone()])
                }
                Input::PastKey(_) | Input::PastValue(_) => InferenceFact::dt_shape(
                    f32::datum_type(),
                    tvec![
                        one.clone(),
                        kv_heads.to_dim(),
                        p.to_dim(),
                        head_dim.to_dim()
                    ],
                ),
            };
            model
                .set_input_fact(ix, fact)
                .map_err(tract("setting input facts"))?;
        }
        let plan = model
            .into_optimized()
            .map_err(tract("optimizing the graph"))?
            .into_runnable()
            .map_err(tract("planning the graph"))?;
        Ok(Self {
            bundle,
            backend: Backend::Float(FloatGraph {
                plan,
                inputs,
                outputs,
            }),
            layers,
            kv_heads,
            head_dim,
        })
    }

    /// Loads a bundle's native stages (`native/stage<i>.onnx`, written by the project's
    /// exporter; the whole graph is not loaded).
    ///
    /// # Errors
    /// [`Error::MissingFile`] naming the first missing stage; [`Error::Unsupported`] for a stage
    /// without the inputs / outputs it needs; [`Error::Tract`].
    pub fn load_native(bundle: Bundle) -> Result<Self> {
        let stages = Stages::load(&bundle)?;
        let c = &bundle.config;
        let (layers, kv_heads, head_dim) = (c.layers, c.kv_heads, c.head_dim);
        Ok(Self {
            bundle,
            backend: Backend::Native(stages),
            layers,
            kv_heads,
            head_dim,
        })
    }

    /// Opens the bundle in `dir` with its attention where asked.
    ///
    /// # Errors
    /// As [`Bundle::open`], [`Decoder::load`] and [`Decoder::load_native`].
    pub fn open_with(dir: impl AsRef<std::path::Path>, attention: Attention) -> Result<Self> {
        let bundle = Bundle::open(dir)?;
        match attention {
            Attention::Float => Self::load(bundle),
            Attention::Native => Self::load_native(bundle),
        }
    }

    /// Whether the bundle in `dir` has native stages (`native/stage0.onnx`).
    pub fn native_available(dir: impl AsRef<std::path::Path>) -> bool {
        crate::native::available(dir.as_ref())
    }

    /// Where this decoder's attention runs.
    pub fn attention(&self) -> Attention {
        match self.backend {
            Backend::Float(_) => Attention::Float,
            Backend::Native(_) => Attention::Native,
        }
    }

    /// One native step ([`crate::native`]): `ids` at positions `P..P+S` with `P = cache.len()`,
    /// the cache updated; the logits of the last new token.
    ///
    /// # Errors
    /// [`Error::Unsupported`] on a float decoder; as the native path's step otherwise.
    pub fn native_step(&self, ids: &[u32], cache: &mut ModelCache) -> Result<Vec<f32>> {
        match &self.backend {
            Backend::Native(stages) => stages.step(&self.bundle.config, ids, cache),
            Backend::Float(_) => Err(Error::Unsupported(
                "a native step needs a decoder opened with Attention::Native".into(),
            )),
        }
    }

    /// A cache for this model: `config` for every head, `calibration[layer][kv_head]` (or empty
    /// when nothing is split or centred).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a head dimension other than the model's, a calibration
    /// that does not cover every layer and kv head, or a missing one that `config` needs; cache
    /// construction errors.
    pub fn new_cache(
        &self,
        config: &HeadConfig,
        calibration: &[Vec<HeadCalibration>],
    ) -> Result<ModelCache> {
        let c = &self.bundle.config;
        if config.head_dim != c.head_dim {
            return Err(Error::InvalidArgument(format!(
                "cache head_dim {} differs from the model's {}",
                config.head_dim, c.head_dim
            )));
        }
        if !calibration.is_empty()
            && (calibration.len() != c.layers || calibration.iter().any(|l| l.len() != c.kv_heads))
        {
            return Err(Error::InvalidArgument(format!(
                "the calibration must cover {} layers x {} kv heads",
                c.layers, c.kv_heads
            )));
        }
        if calibration.is_empty() && HeadCalibration::needed(config) {
            return Err(Error::InvalidArgument(
                "split precisions and centring need a calibration (see `calibrate`)".into(),
            ));
        }
        let layers = (0..c.layers)
            .map(|l| {
                let cal = calibration.get(l).map(Vec::as_slice).unwrap_or(&[]);
                MultiHeadCache::new(c.q_heads, c.kv_heads, config, cal)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(ModelCache::from_layers(layers))
    }

    /// An exact cache for the native path: every token kept in f32 (the window holds them all),
    /// so attention is the float model's.
    ///
    /// # Errors
    /// As [`Decoder::new_cache`].
    pub fn exact_cache(&self) -> Result<ModelCache> {
        let mut config = HeadConfig::paper(self.head_dim);
        config.window = usize::MAX;
        self.new_cache(&config, &[])
    }

    fn map_outputs(names: &[String], layers: usize) -> Result<Outputs> {
        let logits = names
            .iter()
            .position(|n| n == "logits")
            .ok_or_else(|| Error::Unsupported("the graph has no `logits` output".into()))?;
        let pick = |prefix: &str, suffix: &str| -> Vec<(usize, usize)> {
            names
                .iter()
                .enumerate()
                .filter_map(|(ix, n)| parse_layer(n, prefix, suffix).map(|l| (l, ix)))
                .collect()
        };
        let keys = per_layer(&pick("present.", ".key"), layers, "present.<i>.key")?;
        let values = per_layer(&pick("present.", ".value"), layers, "present.<i>.value")?;
        let q = pick("queries.", "");
        let queries = if q.is_empty() {
            None
        } else {
            Some(per_layer(&q, layers, "queries.<i>")?)
        };
        Ok(Outputs {
            logits,
            keys,
            values,
            queries,
        })
    }

    /// Opens and loads a bundle directory in one call.
    ///
    /// # Errors
    /// As [`Bundle::open`] and [`Decoder::load`].
    pub fn open(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::load(Bundle::open(dir)?)
    }

    /// The bundle (tokenizer, config).
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.bundle.config
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// KV heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// `true` when the graph exposes its queries (`queries.<i>` outputs).
    pub fn has_queries(&self) -> bool {
        matches!(&self.backend, Backend::Float(g) if g.outputs.queries.is_some())
    }

    /// An empty cache (zero past tokens) for [`Decoder::step`].
    ///
    /// # Errors
    /// [`Error::Tract`] only if tract cannot allocate an empty tensor.
    pub fn empty_past(&self) -> Result<KvTensors> {
        let shape = [1, self.kv_heads, 0, self.head_dim];
        let empty = || -> Result<TValue> {
            Ok(Tensor::zero::<f32>(&shape)
                .map_err(tract("empty cache"))?
                .into_tvalue())
        };
        Ok(KvTensors {
            keys: (0..self.layers).map(|_| empty()).collect::<Result<_>>()?,
            values: (0..self.layers).map(|_| empty()).collect::<Result<_>>()?,
        })
    }

    /// Runs the graph on `ids` (S ≥ 1 new tokens at positions `P..P+S`, P = `past.len()`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no tokens, an id outside the vocabulary or a past of the
    /// wrong shape; [`Error::Tract`] when the run fails; [`Error::Unsupported`] for outputs of an
    /// unexpected shape.
    pub fn step(&self, ids: &[u32], past: &KvTensors) -> Result<StepOutput> {
        let Backend::Float(graph) = &self.backend else {
            return Err(Error::Unsupported(
                "a float step needs the whole graph: this decoder runs the native stages".into(),
            ));
        };
        let s = ids.len();
        if s == 0 {
            return Err(Error::InvalidArgument(
                "a step needs at least one token".into(),
            ));
        }
        let vocab = self.bundle.config.vocab;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let p = past.len();
        let want = [1, self.kv_heads, p, self.head_dim];
        if past.keys.len() != self.layers
            || past.values.len() != self.layers
            || past
                .keys
                .iter()
                .chain(&past.values)
                .any(|t| t.shape() != want)
        {
            return Err(Error::InvalidArgument(format!(
                "the past must hold {} layers of {want:?} keys and values",
                self.layers
            )));
        }
        let t = |r: TractResult<Tensor>| r.map_err(tract("building inputs"));
        let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let positions: Vec<i64> = (p..p + s).map(|i| i as i64).collect();
        let mut feed: TVec<TValue> = TVec::new();
        for role in &graph.inputs {
            let v = match role {
                Input::Ids => t(Tensor::from_shape(&[1, s], &ids64))?.into_tvalue(),
                Input::Positions => t(Tensor::from_shape(&[1, s], &positions))?.into_tvalue(),
                Input::CachePos => t(Tensor::from_shape(&[s], &positions))?.into_tvalue(),
                Input::Mask => {
                    t(Tensor::from_shape(&[1, p + s], &vec![1i64; p + s]))?.into_tvalue()
                }
                Input::CacheBranch => t(Tensor::from_shape(&[1], &[p > 0]))?.into_tvalue(),
                Input::PastKey(l) => past.keys[*l].clone(),
                Input::PastValue(l) => past.values[*l].clone(),
            };
            feed.push(v);
        }
        let mut out = graph.plan.run(feed).map_err(tract("running a step"))?;
        let logits_t = &out[graph.outputs.logits];
        let shape = logits_t.shape().to_vec();
        if shape.len() != 3 || shape[2] != vocab || (shape[1] != s && shape[1] != 1) {
            return Err(Error::Unsupported(format!(
                "logits have shape {shape:?}, expected [1, {s} or 1, {vocab}]"
            )));
        }
        let all = plain_f32(logits_t)?;
        let logits = all[all.len() - vocab..].to_vec();
        let take = |out: &mut TVec<TValue>, ix: usize| -> TValue {
            std::mem::replace(&mut out[ix], Tensor::default().into_tvalue())
        };
        let present = KvTensors {
            keys: graph
                .outputs
                .keys
                .iter()
                .map(|&ix| take(&mut out, ix))
                .collect(),
            values: graph
                .outputs
                .values
                .iter()
                .map(|&ix| take(&mut out, ix))
                .collect(),
        };
        let want = [1, self.kv_heads, p + s, self.head_dim];
        if let Some(bad) = present
            .keys
            .iter()
            .chain(&present.values)
            .find(|t| t.shape() != want)
        {
            return Err(Error::Unsupported(format!(
                "present key-values have shape {:?}, expected {want:?}",
                bad.shape()
            )));
        }
        let queries = match &graph.outputs.queries {
            None => None,
            Some(ixs) => Some(
                ixs.iter()
                    .map(|&ix| {
                        let q = &out[ix];
                        let n = self.bundle.config.q_heads * s * self.head_dim;
                        let sl = plain_f32(q)?;
                        if sl.len() != n {
                            return Err(Error::Unsupported(format!(
                                "queries have shape {:?}, expected [1, {}, {s}, {}]",
                                q.shape(),
                                self.bundle.config.q_heads,
                                self.head_dim
                            )));
                        }
                        Ok(sl.to_vec())
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        Ok(StepOutput {
            logits,
            present,
            queries,
        })
    }
}
