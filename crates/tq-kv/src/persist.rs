//! Saving and loading whole caches (safetensors, format `tq-kv-cache` version 3).
//!
//! Version 2 added the sink (`head.sink`, `sink_keys` / `sink_values`) and f16 scales
//! (`head.scale_precision`); version 3 f16 sink and window rows (`head.window_precision`). This
//! build writes 3 and reads 1 to 3 (an older file has none of the later settings), so a build
//! that reads only older versions refuses a file whose settings it would drop.
//!
//! `__metadata__`: `format = "tq-kv-cache"`, `version = "3"`, `config` = JSON
//! `{"layers", "n_q_heads", "n_kv_heads", "head": HeadConfig, "outliers": [[HeadCalibration; kv heads]; layers]}`.
//! Per layer `l` and kv head `h`: `l{l}.h{h}.keys.p{p}` and `l{l}.h{h}.values.p{p}` (U8: each
//! channel part's batch as a saved tq-batch, see tq-quant's `io`), `l{l}.h{h}.window_keys` /
//! `window_values` (`[w, d]`, F32, or F16 when `head.window_precision` is `f16`), and with a sink
//! (`head.sink > 0`) `l{l}.h{h}.sink_keys` / `sink_values` (`[s, d]`, the same type; files written before sinks existed have none and load with none). Loading checks the header, rebuilds the configured cache,
//! requires every stored quantizer to equal the configured one, and checks row counts, window
//! shapes and finiteness; malformed bytes are an error, never a panic. Every tensor's shape is
//! checked against the header before any quantizer is built (see `check_shapes`), so the work done
//! before validation is proportional to the file's size; the quantizers of a consistent file share
//! their dense matrices across heads and layers (`tq_core::shared`).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::calibration::HeadCalibration;
use crate::head::{HeadCache, HeadConfig};
use crate::multi::{ModelCache, MultiHeadCache};
use crate::rows::{PlainRows, WindowPrecision};
use crate::{Error, Result};

/// The format version this build writes and reads.
pub const CACHE_FORMAT_VERSION: u32 = 3;
const FORMAT: &str = "tq-kv-cache";

#[derive(Serialize, Deserialize)]
struct CacheHeader {
    layers: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head: HeadConfig,
    outliers: Vec<Vec<HeadCalibration>>,
}

fn bad(tensor: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidCache {
        tensor: tensor.into(),
        reason: reason.into(),
    }
}

/// Checks every head's tensors against the header before any quantizer is built: the windows
/// are F32 `[w, head_dim]`, and the key and value parts are saved batches whose configured
/// dimensions add up to `head_dim`. Reads only tensor headers and the parts' JSON metadata, so a
/// header that promises more than the file holds is refused in time proportional to the file.
fn check_shapes(st: &SafeTensors<'_>, header: &CacheHeader) -> Result<()> {
    let d = header.head.head_dim;
    for l in 0..header.layers {
        for h in 0..header.n_kv_heads {
            let sinks: &[&str] = if header.head.sink > 0 {
                &["sink_keys", "sink_values"]
            } else {
                &[]
            };
            for t in ["sink_keys", "sink_values"] {
                if sinks.is_empty() && st.tensor(&format!("l{l}.h{h}.{t}")).is_ok() {
                    return Err(bad(
                        format!("l{l}.h{h}.{t}"),
                        "present in a cache configured without a sink",
                    ));
                }
            }
            let dtype = row_dtype(header.head.window_precision);
            for t in ["window_keys", "window_values"].iter().chain(sinks) {
                let name = format!("l{l}.h{h}.{t}");
                let tv = st.tensor(&name).map_err(|_| bad(name.clone(), "missing"))?;
                if tv.dtype() != dtype || tv.shape().len() != 2 || tv.shape()[1] != d {
                    return Err(bad(
                        name,
                        format!(
                            "expected {dtype:?} [w, {d}], found {:?} {:?}",
                            tv.dtype(),
                            tv.shape()
                        ),
                    ));
                }
            }
            for t in ["keys", "values"] {
                let mut dims = 0usize;
                let mut p = 0;
                while let Ok(tv) = st.tensor(&format!("l{l}.h{h}.{t}.p{p}")) {
                    dims = dims.saturating_add(part_dim(tv.data()).ok_or_else(|| {
                        bad(
                            format!("l{l}.h{h}.{t}.p{p}"),
                            "not a saved batch with a configured dimension",
                        )
                    })?);
                    p += 1;
                }
                if dims != d {
                    return Err(bad(
                        format!("l{l}.h{h}.{t}"),
                        format!("{p} parts of {dims} channels in all, expected {d}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The tensor type of the sink and window rows at a stored width.
fn row_dtype(width: WindowPrecision) -> Dtype {
    match width {
        WindowPrecision::F32 => Dtype::F32,
        WindowPrecision::F16 => Dtype::F16,
    }
}

/// The `dim` of a saved batch's configuration, read from its metadata alone.
fn part_dim(blob: &[u8]) -> Option<usize> {
    let (_, md) = SafeTensors::read_metadata(blob).ok()?;
    let config = md.metadata().as_ref()?.get("config")?;
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    usize::try_from(v.get("dim")?.as_u64()?).ok()
}

impl ModelCache {
    /// Serializes every layer and head (format in the [module docs](crate::persist)).
    ///
    /// # Errors
    /// Only if a part cannot be serialized (not expected).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let first = self
            .layer(0)
            .ok_or_else(|| bad("layers", "a model cache needs at least one layer"))?;
        let head0 = first.head(0).ok_or_else(|| bad("heads", "no kv head"))?;
        let header = CacheHeader {
            layers: self.n_layers(),
            n_q_heads: first.n_q_heads(),
            n_kv_heads: first.n_kv_heads(),
            head: head0.config().clone(),
            outliers: (0..self.n_layers())
                .map(|l| {
                    (0..first.n_kv_heads())
                        .map(|h| {
                            self.layer(l)
                                .and_then(|x| x.head(h))
                                .map(HeadCache::outliers)
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .collect(),
        };
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for l in 0..self.n_layers() {
            let layer = self
                .layer(l)
                .ok_or_else(|| bad("layers", "missing layer"))?;
            for h in 0..layer.n_kv_heads() {
                let head = layer.head(h).ok_or_else(|| bad("heads", "missing head"))?;
                let parts = head.parts()?;
                let (kb, vb, wk, wv, sk, sv) = (
                    parts.keys,
                    parts.values,
                    parts.window_keys,
                    parts.window_values,
                    parts.sink_keys,
                    parts.sink_values,
                );
                for (t, blobs) in [("keys", kb), ("values", vb)] {
                    for (p, blob) in blobs.into_iter().enumerate() {
                        owned.push((
                            format!("l{l}.h{h}.{t}.p{p}"),
                            Dtype::U8,
                            vec![blob.len()],
                            blob,
                        ));
                    }
                }
                let d = head.config().head_dim;
                let mut rows = vec![("window_keys", wk), ("window_values", wv)];
                if head.config().sink > 0 {
                    rows.extend([("sink_keys", sk), ("sink_values", sv)]);
                }
                let dtype = row_dtype(head.config().window_precision);
                for (t, w) in rows {
                    owned.push((
                        format!("l{l}.h{h}.{t}"),
                        dtype,
                        vec![w.len() / d, d],
                        w.to_le_bytes(),
                    ));
                }
            }
        }
        let mut views = Vec::with_capacity(owned.len());
        for (name, dtype, shape, data) in &owned {
            views.push((
                name.as_str(),
                TensorView::new(*dtype, shape.clone(), data)
                    .map_err(|e| bad(name.clone(), e.to_string()))?,
            ));
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("version".to_string(), CACHE_FORMAT_VERSION.to_string());
        meta.insert(
            "config".to_string(),
            serde_json::to_string(&header).map_err(|e| bad("config", e.to_string()))?,
        );
        safetensors::serialize(views, Some(meta)).map_err(|e| bad("header", e.to_string()))
    }

    /// Parses and validates a saved cache.
    ///
    /// # Errors
    /// [`Error::InvalidCache`] naming the tensor or key at fault, or the configuration / quantizer errors.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad("header", crate::error::not_safetensors(bytes, &e)))?;
        let (_, md) =
            SafeTensors::read_metadata(bytes).map_err(|e| bad("header", e.to_string()))?;
        let meta = md
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("__metadata__", "missing"))?;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad("__metadata__", format!("missing key '{k}'")))
        };
        if get("format")? != FORMAT {
            return Err(bad("__metadata__", "not a tq-kv-cache file"));
        }
        let version = get("version")?.parse::<u32>().ok();
        if !matches!(version, Some(v) if (1..=CACHE_FORMAT_VERSION).contains(&v)) {
            return Err(bad(
                "__metadata__",
                format!("unsupported version (this build reads 1 to {CACHE_FORMAT_VERSION})"),
            ));
        }
        let header: CacheHeader =
            serde_json::from_str(get("config")?).map_err(|e| bad("config", e.to_string()))?;
        // Every head stores at least four tensors: refuse headers that promise more heads than
        // the file holds before building any quantizer.
        let heads = header
            .layers
            .checked_mul(header.n_kv_heads)
            .ok_or_else(|| bad("config", "head count overflows"))?;
        if header.layers == 0 || heads == 0 || heads.saturating_mul(4) > st.names().len() {
            return Err(bad(
                "config",
                format!(
                    "{} layers x {} kv heads do not match the {} stored tensors",
                    header.layers,
                    header.n_kv_heads,
                    st.names().len()
                ),
            ));
        }
        if header.outliers.len() != header.layers
            || header.outliers.iter().any(|o| o.len() != header.n_kv_heads)
        {
            return Err(bad(
                "config",
                "outliers must list every kv head of every layer",
            ));
        }
        check_shapes(&st, &header)?;
        let mut layers = Vec::with_capacity(header.layers);
        for (l, outliers) in header.outliers.iter().enumerate() {
            let mut layer =
                MultiHeadCache::new(header.n_q_heads, header.n_kv_heads, &header.head, outliers)?;
            for h in 0..header.n_kv_heads {
                let blobs = |t: &str| -> Result<Vec<&[u8]>> {
                    let mut v = Vec::new();
                    while let Ok(tv) = st.tensor(&format!("l{l}.h{h}.{t}.p{}", v.len())) {
                        v.push(tv.data());
                    }
                    Ok(v)
                };
                let width = header.head.window_precision;
                let window = |t: &str| -> Result<PlainRows> {
                    // dtype and shape were checked by `check_shapes`.
                    let name = format!("l{l}.h{h}.{t}");
                    let tv = st.tensor(&name).map_err(|_| bad(name.clone(), "missing"))?;
                    PlainRows::from_le_bytes(width, tv.data())
                        .ok_or_else(|| bad(name, "non-finite value"))
                };
                let (kb, vb) = (blobs("keys")?, blobs("values")?);
                let (wk, wv) = (window("window_keys")?, window("window_values")?);
                let (sk, sv) = if header.head.sink > 0 {
                    (window("sink_keys")?, window("sink_values")?)
                } else {
                    (PlainRows::new(width), PlainRows::new(width))
                };
                let head = layer
                    .head_mut(h)
                    .ok_or_else(|| bad("heads", "missing head"))?;
                head.restore(&kb, &vb, (wk, wv), (sk, sv), &format!("l{l}.h{h}"))?;
            }
            if (0..header.n_kv_heads)
                .any(|h| layer.head(h).map(HeadCache::len) != layer.head(0).map(HeadCache::len))
            {
                return Err(bad(
                    format!("l{l}"),
                    "kv heads hold different numbers of tokens",
                ));
            }
            layers.push(layer);
        }
        Ok(ModelCache::from_layers(layers))
    }

    /// Writes the cache to `path`.
    ///
    /// # Errors
    /// [`Error::Io`] and serialization errors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_safetensors()?;
        crate::error::write_file(path, &bytes)
    }

    /// Reads and validates a cache from `path`.
    ///
    /// # Errors
    /// [`Error::Io`] and those of [`ModelCache::from_safetensors`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::error::read_file(path)?;
        Self::from_safetensors(&bytes)
    }
}
