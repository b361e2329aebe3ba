//! Python bindings: the `tq._tq` extension module behind the `tq` package (python/tq).
//!
//! A thin layer over tq-quant and tq-kv with no logic of its own: numpy arrays are checked for
//! dtype (float32 or float64), rank and layout (C or Fortran order) and handed to the Rust types
//! as row-major `f32` slices (C-ordered float32 without a copy); heavy calls release the GIL; Rust
//! errors become `ValueError` (bad input, bad files) or `OSError` (the file system), and a Rust
//! panic becomes pyo3's `PanicException`, never an abort.

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::prelude::*;
use numpy::{PyArray2, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArray};
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use tq_core::RotationKind;
use tq_kv::{HeadConfig, KeyStrategy, MultiHeadCache, Precision, ValueStrategy};
use tq_quant::{AnyBatch, AnyQuantizer, EncodedVectors, Metric, QuantizerKind, QuantizerSpec};

fn quant_err(e: tq_quant::Error) -> PyErr {
    match e {
        tq_quant::Error::Io {
            ref path,
            ref source,
        } => PyOSError::new_err(format!("{}: {source}", path.display())),
        other => PyValueError::new_err(other.to_string()),
    }
}

fn kv_err(e: tq_kv::Error) -> PyErr {
    match e {
        tq_kv::Error::Io {
            ref path,
            ref source,
        } => PyOSError::new_err(format!("{}: {source}", path.display())),
        other => PyValueError::new_err(other.to_string()),
    }
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// A float array's values in row-major order, borrowed from numpy when it is C-ordered float32.
struct Floats<'py> {
    shape: Vec<usize>,
    data: Data<'py>,
}

enum Data<'py> {
    Borrowed(PyReadonlyArrayDyn<'py, f32>),
    Owned(Vec<f32>),
}

impl<'py> Floats<'py> {
    /// Reads a float32 or float64 numpy array in C or Fortran order.
    ///
    /// # Errors
    /// `TypeError` for anything but a float32 / float64 numpy array; `ValueError` for an array
    /// that is neither C- nor Fortran-contiguous.
    fn extract(x: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let untyped = x.cast::<PyUntypedArray>().map_err(|_| {
            PyTypeError::new_err(format!(
                "{what}: expected a numpy array of float32 or float64, got {}",
                x.get_type()
                    .name()
                    .map_or_else(|_| "an unknown type".to_string(), |n| n.to_string())
            ))
        })?;
        let shape = untyped.shape().to_vec();
        let (c, f) = (untyped.is_c_contiguous(), untyped.is_fortran_contiguous());
        if !c && !f {
            return Err(PyValueError::new_err(format!(
                "{what}: the array is not contiguous (neither C nor Fortran order); pass \
                 numpy.ascontiguousarray(x)"
            )));
        }
        if let Ok(a) = x.cast::<PyArrayDyn<f32>>() {
            let ro = a.readonly();
            let data = if c {
                Data::Borrowed(ro)
            } else {
                Data::Owned(ro.as_array().iter().copied().collect())
            };
            return Ok(Self { shape, data });
        }
        if let Ok(a) = x.cast::<PyArrayDyn<f64>>() {
            let ro = a.readonly();
            // Values beyond f32's range become infinite and are refused as non-finite by the
            // Rust side, never silently clipped.
            let data = Data::Owned(ro.as_array().iter().map(|&v| v as f32).collect());
            return Ok(Self { shape, data });
        }
        Err(PyTypeError::new_err(format!(
            "{what}: expected float32 or float64, got dtype {}",
            untyped.dtype()
        )))
    }

    /// Reads a 2-D array of `dim` columns.
    fn rows(x: &Bound<'py, PyAny>, what: &str, dim: usize) -> PyResult<Self> {
        let a = Self::extract(x, what)?;
        if a.shape.len() != 2 || a.shape[1] != dim {
            return Err(PyValueError::new_err(format!(
                "{what}: expected shape (n, {dim}), got {:?}",
                a.shape
            )));
        }
        Ok(a)
    }

    fn n(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    fn slice(&self) -> PyResult<&[f32]> {
        match &self.data {
            Data::Borrowed(a) => a
                .as_slice()
                .map_err(|e| PyValueError::new_err(e.to_string())),
            Data::Owned(v) => Ok(v),
        }
    }
}

fn matrix<T: numpy::Element>(
    py: Python<'_>,
    rows: usize,
    cols: usize,
    data: Vec<T>,
) -> PyResult<Bound<'_, PyArray2<T>>> {
    Array2::from_shape_vec((rows, cols), data)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// faiss's `(D, I)`: float32 distances and int64 ids, `(nq, k)`.
type Neighbours<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i64>>);

/// Searches `queries` in `index`, returning faiss's `(D, I)`.
fn search_arrays<'py>(
    py: Python<'py>,
    index: &tq_quant::Index,
    queries: &Bound<'py, PyAny>,
    k: usize,
) -> PyResult<Neighbours<'py>> {
    let q = Floats::rows(queries, "queries", index.dim())?;
    let s = q.slice()?;
    let res = py.detach(|| index.search(s, k)).map_err(quant_err)?;
    Ok((
        matrix(py, q.n(), k, res.distances)?,
        matrix(py, q.n(), k, res.labels)?,
    ))
}

/// A TurboQuant quantizer: `quantize(x)` encodes the rows of `x` into `Codes`.
///
/// `kind`: "mse" (TurboQuant_mse, lowest reconstruction error) or "prod" (TurboQuant_prod,
/// unbiased inner products), also "polar", "kivi", "gmse"; `rotation`: "hadamard" (fast) or
/// "haar" (dense); `scale`: the per-vector scalar of mse codes, "norm", "unbiased" or
/// "least-squares"; `seed` fixes every random choice (same seed, same codes on every platform).
#[pyclass(module = "tq", frozen)]
struct Quantizer {
    q: AnyQuantizer,
    bits: u32,
}

#[pymethods]
impl Quantizer {
    #[new]
    #[pyo3(signature = (dim, bits, kind = "mse", rotation = "hadamard", scale = "norm", seed = 0))]
    fn new(
        dim: usize,
        bits: u32,
        kind: &str,
        rotation: &str,
        scale: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let spec = QuantizerSpec::new(
            parse::<QuantizerKind>("kind", kind)?,
            dim,
            bits,
            parse::<RotationKind>("rotation", rotation)?,
            seed,
        )
        .with_scale(parse("scale", scale)?);
        Ok(Self {
            q: spec.build().map_err(quant_err)?,
            bits,
        })
    }

    /// Vector dimension.
    #[getter]
    fn dim(&self) -> usize {
        self.q.dim()
    }

    /// Bits per coordinate.
    #[getter]
    fn bits(&self) -> u32 {
        self.bits
    }

    /// The kind's name.
    #[getter]
    fn kind(&self) -> &'static str {
        self.q.kind().name()
    }

    /// Stored bytes per vector: codes and every per-vector scalar.
    #[getter]
    fn bytes_per_vector(&self) -> usize {
        self.q.bytes_per_vector()
    }

    /// Encodes the rows of `x` (float32 or float64, shape `(n, dim)`, finite) into `Codes`.
    fn quantize(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<Codes> {
        let rows = Floats::rows(x, "x", self.q.dim())?;
        let s = rows.slice()?;
        let mut batch = self.q.new_batch();
        py.detach(|| batch.extend(s)).map_err(quant_err)?;
        Ok(Codes::from_batch(batch))
    }

    fn __repr__(&self) -> String {
        format!(
            "Quantizer(dim={}, bits={}, kind='{}')",
            self.q.dim(),
            self.bits,
            self.kind()
        )
    }
}

/// Encoded vectors: scored and searched on their codes, decoded on demand, saved as a tq-batch
/// file that the Rust crates and `tq-bench` read.
#[pyclass(module = "tq", frozen)]
struct Codes {
    index: tq_quant::Index,
}

impl Codes {
    fn from_batch(batch: AnyBatch) -> Self {
        Self {
            index: tq_quant::Index::from_batch(batch, Metric::InnerProduct),
        }
    }
}

#[pymethods]
impl Codes {
    fn __len__(&self) -> usize {
        self.index.len()
    }

    /// Vector dimension.
    #[getter]
    fn dim(&self) -> usize {
        self.index.dim()
    }

    /// The quantizer kind's name.
    #[getter]
    fn kind(&self) -> &'static str {
        self.index.batch().kind().name()
    }

    /// Bytes the codes store (codes and every scalar).
    #[getter]
    fn nbytes(&self) -> usize {
        self.index.stored_bytes()
    }

    /// The decoded vectors, float32 `(n, dim)`.
    fn dequantize<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let batch = self.index.batch();
        let data = py.detach(|| batch.dequantize_all());
        matrix(py, batch.len(), batch.dim(), data)
    }

    /// Estimated inner products of every query with every vector: float32 `(nq, n)`.
    fn scores<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let q = Floats::rows(queries, "queries", self.index.dim())?;
        let s = q.slice()?;
        let out = py.detach(|| self.index.scores(s)).map_err(quant_err)?;
        matrix(py, q.n(), self.index.len(), out)
    }

    /// The `k` largest estimated inner products of every query: `(D, I)`, float32 and int64
    /// `(nq, k)`, best first; `I = -1` where `k > n`.
    fn top_k<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        k: usize,
    ) -> PyResult<Neighbours<'py>> {
        search_arrays(py, &self.index, queries, k)
    }

    /// Writes the codes to `path` (a tq-batch safetensors file), crash-safely.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.index.batch().save(&path))
            .map_err(quant_err)
    }

    fn __repr__(&self) -> String {
        format!(
            "Codes(n={}, dim={}, kind='{}', nbytes={})",
            self.index.len(),
            self.index.dim(),
            self.kind(),
            self.nbytes()
        )
    }
}

/// Reads codes saved by `Codes.save`, the Rust crates or `tq-bench` (validated before use).
#[pyfunction]
fn load(py: Python<'_>, path: PathBuf) -> PyResult<Codes> {
    let batch = py.detach(|| AnyBatch::load(&path)).map_err(quant_err)?;
    Ok(Codes::from_batch(batch))
}

/// A faiss-shaped index of TurboQuant codes: `add(x)`, `search(q, k) -> (D, I)`.
///
/// `metric`: "ip" (largest estimated inner product first) or "l2" (smallest estimated squared
/// distance first); other arguments as for `Quantizer`, except that `scale` defaults to
/// "unbiased" (inner products unbiased per vector: the better recall, as `tq-bench search`
/// defaults to). Queries are searched in parallel.
#[pyclass(module = "tq")]
struct Index {
    index: tq_quant::Index,
}

#[pymethods]
impl Index {
    #[new]
    #[pyo3(signature = (dim, bits, metric = "ip", kind = "mse", rotation = "hadamard", scale = "unbiased", seed = 0))]
    fn new(
        dim: usize,
        bits: u32,
        metric: &str,
        kind: &str,
        rotation: &str,
        scale: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let q = Quantizer::new(dim, bits, kind, rotation, scale, seed)?;
        Ok(Self {
            index: tq_quant::Index::new(&q.q, parse("metric", metric)?),
        })
    }

    /// Vector dimension (faiss's `d`).
    #[getter]
    fn d(&self) -> usize {
        self.index.dim()
    }

    /// Number of vectors held.
    #[getter]
    fn ntotal(&self) -> usize {
        self.index.len()
    }

    /// "ip" or "l2".
    #[getter]
    fn metric(&self) -> &'static str {
        self.index.metric().name()
    }

    /// Bytes the index stores (codes, scalars, and 4 per vector for l2).
    #[getter]
    fn nbytes(&self) -> usize {
        self.index.stored_bytes()
    }

    /// Encodes and appends the rows of `x` (float32 or float64 `(n, d)`, finite); their ids are
    /// `ntotal .. ntotal + n`.
    fn add(&mut self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<()> {
        let rows = Floats::rows(x, "x", self.index.dim())?;
        let s = rows.slice()?;
        let index = &mut self.index;
        py.detach(|| index.add(s)).map_err(quant_err)
    }

    /// The `k` nearest vectors of every query: `(D, I)`, float32 and int64 `(nq, k)`, best first
    /// (`I = -1`, `D = ∓FLT_MAX` in empty slots, as faiss).
    fn search<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: usize,
    ) -> PyResult<Neighbours<'py>> {
        search_arrays(py, &self.index, q, k)
    }

    /// Removes every vector.
    fn reset(&mut self) {
        self.index.reset();
    }

    /// Writes the index to `path` (a tq-batch file with its metric), crash-safely.
    fn write(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.index.save(&path)).map_err(quant_err)
    }

    fn __len__(&self) -> usize {
        self.index.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Index(d={}, ntotal={}, metric='{}', kind='{}')",
            self.index.dim(),
            self.index.len(),
            self.metric(),
            self.index.batch().kind().name()
        )
    }
}

/// Reads an index written by `Index.write` (validated before use).
#[pyfunction]
fn read_index(py: Python<'_>, path: PathBuf) -> PyResult<Index> {
    let index = py
        .detach(|| tq_quant::Index::load(&path))
        .map_err(quant_err)?;
    Ok(Index { index })
}

/// Benchmark support (scripts/bench_python.py): the seconds `index.search(q, k)` takes inside Rust,
/// best of `repeats` (the queries converted once, before timing; no numpy arrays built), to set
/// against the same call timed from Python.
#[pyfunction]
fn _search_seconds(
    py: Python<'_>,
    index: &Index,
    q: &Bound<'_, PyAny>,
    k: usize,
    repeats: usize,
) -> PyResult<f64> {
    let q = Floats::rows(q, "q", index.index.dim())?;
    let s = q.slice()?;
    py.detach(|| {
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let t = std::time::Instant::now();
            index.index.search(s, k)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    })
    .map_err(quant_err)
}

/// A quantized KV cache of one attention layer (grouped-query heads), attention computed on the
/// codes.
///
/// Defaults to the documented recommended configuration (4-bit KIVI keys in groups of 64 tokens,
/// 3-bit TurboQuant values with least-squares f16 scales, the first 4 and the 12 newest tokens
/// kept unquantized in float16); every argument given overrides one field of it.
/// `key_bits` / `value_bits` take an int or a precision string ("3.5", "4x32+3"; a split needs
/// calibrated channels and is refused here). With `kv_heads == 1` (the default) keys, values
/// and queries may be 2-D `(n, head_dim)`; otherwise keys and values are `(kv_heads, n, head_dim)`
/// and queries `(heads, m, head_dim)`.
#[pyclass(module = "tq")]
struct KVCache {
    cache: MultiHeadCache,
}

fn precision(what: &str, x: Option<&Bound<'_, PyAny>>, dim: usize) -> PyResult<Option<Precision>> {
    let Some(x) = x else { return Ok(None) };
    let spec = if let Ok(b) = x.extract::<u32>() {
        b.to_string()
    } else if let Ok(s) = x.extract::<String>() {
        s
    } else {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected an int or a precision string"
        )));
    };
    Precision::parse(&spec, dim).map(Some).map_err(kv_err)
}

impl KVCache {
    /// Reads an array of `heads` heads: `(heads, n, d)`, or `(n, d)` when `heads == 1`.
    fn heads_array<'py>(
        &self,
        x: &Bound<'py, PyAny>,
        what: &str,
        heads: usize,
    ) -> PyResult<Floats<'py>> {
        let d = self.cache.head_dim();
        let a = Floats::extract(x, what)?;
        let ok = match a.shape.as_slice() {
            [_, c] => heads == 1 && *c == d,
            [h, _, c] => *h == heads && *c == d,
            _ => false,
        };
        if !ok {
            let want = if heads == 1 {
                format!("(n, {d}) or (1, n, {d})")
            } else {
                format!("({heads}, n, {d})")
            };
            return Err(PyValueError::new_err(format!(
                "{what}: expected shape {want}, got {:?}",
                a.shape
            )));
        }
        Ok(a)
    }
}

#[pymethods]
impl KVCache {
    #[new]
    #[pyo3(signature = (head_dim, key_bits = None, value_bits = None, *, heads = 1, kv_heads = None,
        window = None, sink = None, key_strategy = None, value_strategy = None, group = None,
        scale = None, scale_precision = None, window_precision = None, rotation = None,
        seed = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        head_dim: usize,
        key_bits: Option<&Bound<'_, PyAny>>,
        value_bits: Option<&Bound<'_, PyAny>>,
        heads: usize,
        kv_heads: Option<usize>,
        window: Option<usize>,
        sink: Option<usize>,
        key_strategy: Option<&str>,
        value_strategy: Option<&str>,
        group: Option<usize>,
        scale: Option<&str>,
        scale_precision: Option<&str>,
        window_precision: Option<&str>,
        rotation: Option<&str>,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let mut cfg = HeadConfig::recommended(head_dim);
        if let Some(p) = precision("key_bits", key_bits, head_dim)? {
            cfg.key_precision = p;
        }
        if let Some(p) = precision("value_bits", value_bits, head_dim)? {
            cfg.value_precision = p;
        }
        if let Some(w) = window {
            cfg.window = w;
        }
        if let Some(s) = sink {
            cfg.sink = s;
        }
        if let Some(s) = key_strategy {
            cfg.key_strategy = parse::<KeyStrategy>("key_strategy", s)?;
        }
        if let Some(s) = value_strategy {
            cfg.value_strategy = parse::<ValueStrategy>("value_strategy", s)?;
        }
        if let Some(g) = group {
            cfg.group = g;
        }
        if let Some(s) = scale {
            cfg.scale = parse("scale", s)?;
        }
        if let Some(s) = scale_precision {
            cfg.scale_precision = parse("scale_precision", s)?;
        }
        if let Some(s) = window_precision {
            cfg.window_precision = parse("window_precision", s)?;
        }
        if let Some(r) = rotation {
            cfg.rotation = parse("rotation", r)?;
        }
        if let Some(s) = seed {
            cfg.seed = s;
        }
        let cache =
            MultiHeadCache::new(heads, kv_heads.unwrap_or(heads), &cfg, &[]).map_err(kv_err)?;
        Ok(Self { cache })
    }

    /// Tokens held.
    fn __len__(&self) -> usize {
        self.cache.len()
    }

    /// Head dimension.
    #[getter]
    fn head_dim(&self) -> usize {
        self.cache.head_dim()
    }

    /// Query heads.
    #[getter]
    fn heads(&self) -> usize {
        self.cache.n_q_heads()
    }

    /// Key/value heads.
    #[getter]
    fn kv_heads(&self) -> usize {
        self.cache.n_kv_heads()
    }

    /// Bytes the cache stores: codes, every scale and zero, and unquantized tokens at their width.
    #[getter]
    fn nbytes(&self) -> usize {
        self.cache.memory_bytes()
    }

    /// Bytes the same tokens take as float16.
    #[getter]
    fn f16_nbytes(&self) -> usize {
        self.cache.f16_bytes()
    }

    /// Appends `n` tokens' keys and values (see the class docs for shapes).
    fn append(
        &mut self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let h = self.cache.n_kv_heads();
        let k = self.heads_array(keys, "keys", h)?;
        let v = self.heads_array(values, "values", h)?;
        if k.shape != v.shape {
            return Err(PyValueError::new_err(format!(
                "keys {:?} and values {:?} differ in shape",
                k.shape, v.shape
            )));
        }
        let (ks, vs) = (k.slice()?, v.slice()?);
        let cache = &mut self.cache;
        py.detach(|| cache.append(ks, vs)).map_err(kv_err)
    }

    /// Attention `softmax(q Kᵀ / sqrt(d)) V` of `m` queries per query head over the cached tokens,
    /// on the codes. `limits` (optional, `m` ints in `1..=len`): query `i` attends to the first
    /// `limits[i]` tokens (causal masking); by default every query sees every token. Returns
    /// float32 in the queries' shape.
    #[pyo3(signature = (queries, limits = None))]
    fn attend<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        limits: Option<Vec<usize>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let q = self.heads_array(queries, "queries", self.cache.n_q_heads())?;
        let m = q.shape[q.shape.len() - 2];
        let limits = limits.unwrap_or_else(|| vec![self.cache.len(); m]);
        if limits.len() != m {
            return Err(PyValueError::new_err(format!(
                "limits: {} entries for {m} queries",
                limits.len()
            )));
        }
        let s = q.slice()?;
        let mut out = vec![0.0f32; s.len()];
        let cache = &self.cache;
        py.detach(|| cache.attend_block(s, &limits, &mut out))
            .map_err(kv_err)?;
        numpy::ndarray::ArrayD::from_shape_vec(q.shape.clone(), out)
            .map(|a| a.into_pyarray(py))
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Keeps the first `n` tokens (no-op when `n >= len`).
    fn truncate(&mut self, n: usize) {
        self.cache.truncate(n);
    }

    fn __repr__(&self) -> String {
        format!(
            "KVCache(head_dim={}, heads={}, kv_heads={}, len={}, nbytes={})",
            self.cache.head_dim(),
            self.cache.n_q_heads(),
            self.cache.n_kv_heads(),
            self.cache.len(),
            self.cache.memory_bytes()
        )
    }
}

/// The extension module.
#[pymodule]
fn _tq(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // "debug" for `maturin develop` without --release: benchmarks refuse to time it.
    m.add(
        "_build_profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    m.add_class::<Quantizer>()?;
    m.add_class::<Codes>()?;
    m.add_class::<Index>()?;
    m.add_class::<KVCache>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(read_index, m)?)?;
    m.add_function(wrap_pyfunction!(_search_seconds, m)?)?;
    Ok(())
}
