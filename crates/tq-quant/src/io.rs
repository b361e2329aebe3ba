//! Saving and loading batches as safetensors.
//!
//! **Format (version 1).** A safetensors file whose `__metadata__` holds `format = "tq-batch"`,
//! `version = "1"`, `kind = "mse" | "prod" | "polar" | "kivi" | "gmse"` and `config` (the quantizer configuration as JSON:
//! dimension, bits, rotation, sketch, seed; matrices are regenerated from the seed, never stored).
//! Tensors, all row-major and little-endian:
//!
//! | tensor | dtype | shape | kind |
//! |---|---|---|---|
//! | `codes` | U8 | `[n, ceil(d·b'/8)]` packed LSB-first (`b' = b` for mse, `b - 1` for prod; absent when `b' = 0`) | both |
//! | `norms` | F32, or F16 when `config.scale_precision = "f16"` (mse) | `[n]` | both |
//! | `residual_norms` | F32 | `[n]` | prod |
//! | `signs` | U8 | `[n, ceil(d/8)]`, bit `j` = sign of `(S r)_j >= 0` | prod |
//! | `mean` | F32 | `[d]`, the calibrated mean of a centred quantizer (`config.centered`) | mse |
//!
//! `kind = "kivi"` (KIVI, [`crate::kivi`]) stores `codes` U8 `[n, ceil(d·b/8)]` (the quantized
//! rows), `scales` and `zeros` U16 `[groups, d]` (channel axis: one row per complete group of `G`
//! rows) or `[n, ceil(d/G)]` (token axis), f16 bit patterns, and `residual` F16 `[r, d]` (the
//! channel axis's incomplete newest group, `r < G`; `[0, d]` otherwise; an F32 residual, as
//! earlier builds wrote it, is read and rounded to f16).
//!
//! `kind = "gmse"` (group-centred TurboQuant_mse, [`crate::gmse`]) stores the centred rows' `codes`
//! U8 `[n, ceil(d·b/8)]` and `norms` F32 `[n]` (as mse), `means` U16 `[n / G, d]` (f16 channel
//! means of each group) and `residual` F16 `[r, d]` (`r < G`, F32 read as for kivi).
//!
//! `kind = "polar"` (PolarQuant, experimental) stores `codes` U8 `[n, code_bytes]` (angle codes,
//! level by level inside each block), `radii` U16 `[n, d / 2^L]` (f16 bit patterns of the unit
//! vector's block radii) and `norms` F32 `[n]`.
//!
//! `norms` holds the per-vector scale of the configuration's `ScaleMode` (the norm by default), at
//! the width of its `scale_precision` (absent from files written before f16 scales existed: f32).
//!
//! Rows are stored row-major (the interchange layout, readable from numpy); the in-memory 32-row
//! block layout is rebuilt on load. Loading validates everything before use: header and offsets
//! (by the safetensors crate), metadata keys, format version, configuration, tensor names, dtypes
//! and shapes against the configuration, row counts, unused padding bits, finite non-negative
//! norms and scales, finite zeros and means, and residual rows an f16 zero can hold. Any defect is
//! an [`Error`], never a panic.
//!
//! **Work before validation is bounded by the file's size.** Every tensor's dtype and shape is
//! checked against the configuration before the quantizer is built, so a header that asks for a
//! large dimension without the tensors to match is refused after reading the header alone
//! (microseconds). Only a file whose tensors agree with its header gets its quantizer built. A
//! consistent file, even one of zero rows, may still ask for a dense rotation or sketch: O(d³) time
//! and O(d²) memory with `d` capped by [`crate::config::MAX_DENSE_DIM`] (4096: 64 MB, about a
//! minute), built once per distinct `(kind, d, seed)` however many batches share it
//! (`tq_core::shared`); O(d log d) for Hadamard.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::{MseConfig, ProdConfig, ScalePrecision};
use crate::encoded::EncodedVectors;
use crate::gmse::{GroupMseBatch, GroupMseConfig, GroupMseQuantizer};
use crate::kivi::{KiviAxis, KiviBatch, KiviConfig, KiviQuantizer};
use crate::{
    AnyBatch, Error, MseBatch, MseQuantizer, PackedRows, PolarBatch, PolarConfig, PolarQuantizer,
    ProdBatch, ProdQuantizer, Result, RowScales,
};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "tq-batch";

fn bad(what: &'static str, detail: impl Into<String>) -> Error {
    Error::InvalidFormat {
        what,
        detail: detail.into(),
    }
}

fn u16_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The `norms` tensor of a batch's scales: F32, or F16 for [`ScalePrecision::F16`].
fn scales_tensor(s: &RowScales) -> (&'static str, Dtype, Vec<usize>, Vec<u8>) {
    let (dtype, bytes) = match s {
        RowScales::F32(v) => (Dtype::F32, f32_bytes(v)),
        RowScales::F16(v) => (Dtype::F16, u16_bytes(v)),
    };
    ("norms", dtype, vec![s.len()], bytes)
}

fn serialize(
    kind: &str,
    config_json: String,
    tensors: Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>,
) -> Result<Vec<u8>> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT_NAME.to_string());
    meta.insert("version".to_string(), FORMAT_VERSION.to_string());
    meta.insert("kind".to_string(), kind.to_string());
    meta.insert("config".to_string(), config_json);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, data) in &tensors {
        let view = TensorView::new(*dtype, shape.clone(), data)
            .map_err(|e| bad("tensor", e.to_string()))?;
        views.push((*name, view));
    }
    let bytes = safetensors::serialize(views, Some(meta.clone()))
        .map_err(|e| bad("header", e.to_string()))?;
    Ok(sorted_metadata(bytes, &meta))
}

/// The file with its `__metadata__` entries in key order, so the same batch always gives the same
/// bytes (the safetensors writer emits them in hash-map order, which changes from run to run).
/// The sorted object has the same length, so offsets and padding stay; if the header does not
/// start as the writer has always written it, the bytes are returned as they are (still valid).
fn sorted_metadata(mut bytes: Vec<u8>, meta: &HashMap<String, String>) -> Vec<u8> {
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let sorted: std::collections::BTreeMap<&String, &String> = meta.iter().collect();
    let Ok(json) = serde_json::to_vec(&sorted) else {
        return bytes;
    };
    let start = 8 + PREFIX.len();
    let end = start + json.len();
    if bytes.get(8..start) == Some(PREFIX)
        && bytes.get(start) == Some(&b'{')
        && bytes.get(end - 1) == Some(&b'}')
        && bytes.get(end) == Some(&b',')
    {
        bytes[start..end].copy_from_slice(&json);
    }
    bytes
}

impl MseBatch {
    /// Serializes the batch (format in the [module docs](crate::io)). O(n · row_bytes).
    ///
    /// # Errors
    /// [`Error::InvalidFormat`] only if the safetensors writer rejects the tensors (not expected).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let q = self.quantizer();
        let n = self.len();
        let config = serde_json::to_string(q.config()).map_err(|e| bad("config", e.to_string()))?;
        let mut tensors = vec![
            (
                "codes",
                Dtype::U8,
                vec![n, q.row_bytes()],
                self.codes().to_row_major(),
            ),
            scales_tensor(self.scales()),
        ];
        if let Some(m) = q.mean() {
            tensors.push(("mean", Dtype::F32, vec![m.len()], f32_bytes(m)));
        }
        serialize("mse", config, tensors)
    }
}

impl ProdBatch {
    /// Serializes the batch (format in the [module docs](crate::io)).
    ///
    /// # Errors
    /// [`Error::InvalidFormat`] only if the safetensors writer rejects the tensors (not expected).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let q = self.quantizer();
        let n = self.len();
        let config = serde_json::to_string(q.config()).map_err(|e| bad("config", e.to_string()))?;
        let mut tensors = Vec::new();
        if let Some(c) = self.codes() {
            tensors.push((
                "codes",
                Dtype::U8,
                vec![n, q.code_bytes()],
                c.to_row_major(),
            ));
        }
        tensors.push(("norms", Dtype::F32, vec![n], f32_bytes(self.norms())));
        tensors.push((
            "residual_norms",
            Dtype::F32,
            vec![n],
            f32_bytes(self.residual_norms()),
        ));
        tensors.push((
            "signs",
            Dtype::U8,
            vec![n, q.sign_bytes()],
            self.signs().to_row_major(),
        ));
        serialize("prod", config, tensors)
    }
}

impl PolarBatch {
    /// Serializes the batch (format in the [module docs](crate::io)).
    ///
    /// # Errors
    /// [`Error::InvalidFormat`] only if the safetensors writer rejects the tensors (not expected).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let q = self.quantizer();
        let n = self.len();
        let config = serde_json::to_string(q.config()).map_err(|e| bad("config", e.to_string()))?;
        let blocks = q.dim() / q.config().block();
        let radii: Vec<u8> = self.radii().iter().flat_map(|r| r.to_le_bytes()).collect();
        serialize(
            "polar",
            config,
            vec![
                (
                    "codes",
                    Dtype::U8,
                    vec![n, q.code_bytes()],
                    self.codes().to_vec(),
                ),
                ("radii", Dtype::U16, vec![n, blocks], radii),
                ("norms", Dtype::F32, vec![n], f32_bytes(self.norms())),
            ],
        )
    }
}

impl KiviBatch {
    /// Serializes the batch (format in the [module docs](crate::io)).
    ///
    /// # Errors
    /// [`Error::InvalidFormat`] only if the safetensors writer rejects the tensors (not expected).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let q = self.quantizer();
        let (n, d) = (self.quantized_len(), q.dim());
        let config = serde_json::to_string(q.config()).map_err(|e| bad("config", e.to_string()))?;
        let per = if q.config().axis == KiviAxis::Channel {
            d
        } else {
            q.config().token_groups()
        };
        let groups = self.scales().len() / per.max(1);
        serialize(
            "kivi",
            config,
            vec![
                (
                    "codes",
                    Dtype::U8,
                    vec![n, q.row_bytes()],
                    self.codes().to_row_major(),
                ),
                (
                    "scales",
                    Dtype::U16,
                    vec![groups, per],
                    u16_bytes(self.scales()),
                ),
                (
                    "zeros",
                    Dtype::U16,
                    vec![groups, per],
                    u16_bytes(self.zeros()),
                ),
                (
                    "residual",
                    Dtype::F16,
                    vec![self.residual_len(), d],
                    u16_bytes(self.residual()),
                ),
            ],
        )
    }
}

impl GroupMseBatch {
    /// Serializes the batch (format in the [module docs](crate::io)).
    ///
    /// # Errors
    /// [`Error::InvalidFormat`] only if the safetensors writer rejects the tensors (not expected).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let q = self.quantizer();
        let (n, d) = (self.quantized_len(), q.dim());
        let config = serde_json::to_string(q.config()).map_err(|e| bad("config", e.to_string()))?;
        serialize(
            "gmse",
            config,
            vec![
                (
                    "codes",
                    Dtype::U8,
                    vec![n, q.mse().row_bytes()],
                    self.centred().codes().to_row_major(),
                ),
                scales_tensor(self.centred().scales()),
                (
                    "means",
                    Dtype::U16,
                    vec![n / q.config().group, d],
                    u16_bytes(self.means()),
                ),
                (
                    "residual",
                    Dtype::F16,
                    vec![self.residual_len(), d],
                    u16_bytes(self.residual()),
                ),
            ],
        )
    }
}

/// The `residual` tensor of kinds that keep one: F16 `[r, d]` as bit patterns (values checked by
/// the batch), or F32 `[r, d]` as written before the residual was held in f16: finite values
/// within f16's range, rounded to f16.
fn read_residual(st: &SafeTensors<'_>, d: usize) -> Result<Vec<u16>> {
    let t = st
        .tensor("residual")
        .map_err(|_| bad("residual", "missing"))?;
    let r = match t.shape() {
        [r, c] if *c == d => *r,
        other => {
            return Err(bad(
                "residual",
                format!("shape {other:?}, expected [r, {d}]"),
            ));
        }
    };
    let bits: Vec<u16> = match t.dtype() {
        Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect(),
        Dtype::F32 => {
            let values: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if values
                .iter()
                .any(|v| !v.is_finite() || v.abs() > crate::kivi::MAX_ABS)
            {
                return Err(bad("residual", "a value f16 cannot hold"));
            }
            values
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect()
        }
        other => {
            return Err(bad("residual", format!("dtype {other:?}, expected F16")));
        }
    };
    if bits.len() != r * d {
        return Err(bad("residual", "not r x d values"));
    }
    Ok(bits)
}

/// A U16 tensor of exactly `shape`, as values.
fn read_u16(st: &SafeTensors<'_>, name: &'static str, shape: [usize; 2]) -> Result<Vec<u16>> {
    let t = tensor(st, name, Dtype::U16)?;
    if t.shape() != shape {
        return Err(bad(
            name,
            format!("shape {:?}, expected {shape:?}", t.shape()),
        ));
    }
    Ok(t.data()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect())
}

fn load_gmse(st: &SafeTensors<'_>, config: &str) -> Result<AnyBatch> {
    let cfg: GroupMseConfig =
        serde_json::from_str(config).map_err(|e| bad("config", e.to_string()))?;
    cfg.validate()?;
    let d = cfg.dim;
    let norms = read_scales(st, ScalePrecision::F32)?;
    let n = norms.len();
    if !n.is_multiple_of(cfg.group) {
        return Err(bad(
            "norms",
            format!("{n} rows are not whole groups of {}", cfg.group),
        ));
    }
    let row_bytes = tq_core::bitpack::packed_len(d, cfg.bits);
    let codes = read_rows(st, "codes", n, row_bytes, d * cfg.bits as usize)?;
    let means = read_u16(st, "means", [n / cfg.group, d])?;
    let residual = read_residual(st, d)?;
    let q = Arc::new(GroupMseQuantizer::new(cfg)?);
    let inner = MseBatch::from_parts(q.mse().clone(), codes, norms)?;
    let b = GroupMseBatch::from_parts(q, inner, means, residual)
        .map_err(|e| bad("tensors", e.to_string()))?;
    Ok(AnyBatch::Gmse(b))
}

fn load_kivi(st: &SafeTensors<'_>, config: &str) -> Result<AnyBatch> {
    let cfg: KiviConfig = serde_json::from_str(config).map_err(|e| bad("config", e.to_string()))?;
    cfg.validate()?;
    let d = cfg.dim;
    let t = tensor(st, "codes", Dtype::U8)?;
    let n = match t.shape() {
        [n, _] => *n,
        other => {
            return Err(bad(
                "codes",
                format!("shape {other:?}, expected [n, row_bytes]"),
            ));
        }
    };
    let row_bytes = tq_core::bitpack::packed_len(d, cfg.bits);
    let codes = read_rows(st, "codes", n, row_bytes, d * cfg.bits as usize)?;
    let (groups, per) = match cfg.axis {
        KiviAxis::Channel => (n / cfg.group, d),
        KiviAxis::Token => (n, cfg.token_groups()),
    };
    let scales = read_u16(st, "scales", [groups, per])?;
    let zeros = read_u16(st, "zeros", [groups, per])?;
    let residual = read_residual(st, d)?;
    let q = Arc::new(KiviQuantizer::new(cfg)?);
    let b = KiviBatch::from_parts(q, codes, scales, zeros, residual)
        .map_err(|e| bad("tensors", e.to_string()))?;
    Ok(AnyBatch::Kivi(b))
}

fn load_polar(st: &SafeTensors<'_>, config: &str) -> Result<AnyBatch> {
    let cfg: PolarConfig =
        serde_json::from_str(config).map_err(|e| bad("config", e.to_string()))?;
    cfg.validate()?;
    let norms = read_f32(st, "norms", None)?;
    let n = norms.len();
    // Every shape is checked against the configuration before the quantizer (its rotation and
    // angle codebooks) is built.
    let blocks = cfg.dim / cfg.block();
    let code_bits = blocks * cfg.code_bits_per_block();
    let codes = read_rows(st, "codes", n, code_bits.div_ceil(8), code_bits)?.to_row_major();
    let radii = read_u16(st, "radii", [n, blocks])?;
    // Radii of a unit vector's blocks lie in [0, 1] (f16 rounding may reach exactly 1).
    if let Some(i) = radii.iter().position(|&r| {
        let v = half::f16::from_bits(r).to_f32();
        !(0.0..=1.0).contains(&v)
    }) {
        return Err(bad(
            "radii",
            format!("entry {i} is not a block radius in [0, 1]"),
        ));
    }
    let q = PolarQuantizer::new(cfg)?;
    Ok(AnyBatch::Polar(PolarBatch::from_parts(
        Arc::new(q),
        codes,
        radii,
        norms,
    )?))
}

impl AnyBatch {
    /// Parses and validates a saved batch (see the [module docs](crate::io)).
    ///
    /// # Errors
    /// [`Error::InvalidFormat`] naming the part at fault, [`Error::UnsupportedVersion`], or a
    /// configuration error.
    pub fn from_safetensors(bytes: &[u8]) -> Result<AnyBatch> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad("header", e.to_string()))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| bad("header", e.to_string()))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("__metadata__", "missing"))?;
        let get = |k: &'static str| {
            meta.get(k)
                .ok_or_else(|| bad("__metadata__", format!("missing key '{k}'")))
        };
        if get("format")? != FORMAT_NAME {
            return Err(bad(
                "__metadata__",
                format!("format is '{}', expected '{FORMAT_NAME}'", get("format")?),
            ));
        }
        let version = get("version")?;
        if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
            return Err(Error::UnsupportedVersion {
                found: version.chars().take(32).collect(),
                supported: FORMAT_VERSION,
            });
        }
        let config = get("config")?;
        let names: Vec<&str> = st.names();
        let kind = get("kind")?.as_str();
        let allowed: &[&str] = match kind {
            "mse" => &["codes", "norms", "mean"],
            "prod" => &["codes", "norms", "residual_norms", "signs"],
            "polar" => &["codes", "radii", "norms"],
            "kivi" => &["codes", "scales", "zeros", "residual"],
            "gmse" => &["codes", "norms", "means", "residual"],
            other => {
                return Err(bad(
                    "__metadata__",
                    format!(
                        "unknown kind '{}'",
                        other.chars().take(32).collect::<String>()
                    ),
                ));
            }
        };
        if let Some(extra) = names.iter().find(|n| !allowed.contains(n)) {
            return Err(bad(
                "tensors",
                format!(
                    "unexpected tensor '{}'",
                    extra.chars().take(64).collect::<String>()
                ),
            ));
        }
        match kind {
            "polar" => load_polar(&st, config),
            "kivi" => load_kivi(&st, config),
            "gmse" => load_gmse(&st, config),
            "mse" => {
                let cfg: MseConfig =
                    serde_json::from_str(config).map_err(|e| bad("config", e.to_string()))?;
                cfg.validate()?;
                // Shapes are checked against the configuration before the quantizer is built.
                let norms = read_scales(&st, cfg.scale_precision)?;
                let n = norms.len();
                let row_bytes = tq_core::bitpack::packed_len(cfg.dim, cfg.bits);
                let codes = read_rows(&st, "codes", n, row_bytes, cfg.dim * cfg.bits as usize)?;
                let q = if cfg.centered {
                    let t = tensor(&st, "mean", Dtype::F32)?;
                    if t.shape() != [cfg.dim] {
                        return Err(bad(
                            "mean",
                            format!("shape {:?}, expected [{}]", t.shape(), cfg.dim),
                        ));
                    }
                    let mean: Vec<f32> = t
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    if mean.iter().any(|v| !v.is_finite()) {
                        return Err(bad("mean", "non-finite value"));
                    }
                    Arc::new(MseQuantizer::with_mean(cfg, mean)?)
                } else {
                    if names.contains(&"mean") {
                        return Err(bad("mean", "present for a batch that is not centred"));
                    }
                    Arc::new(MseQuantizer::new(cfg)?)
                };
                Ok(AnyBatch::Mse(MseBatch::from_parts(q, codes, norms)?))
            }
            _ => {
                let cfg: ProdConfig =
                    serde_json::from_str(config).map_err(|e| bad("config", e.to_string()))?;
                cfg.validate()?;
                let norms = read_f32(&st, "norms", None)?;
                let n = norms.len();
                let residual_norms = read_f32(&st, "residual_norms", Some(n))?;
                let code_bits = cfg.dim * (cfg.bits as usize - 1);
                let codes = if cfg.bits > 1 {
                    Some(read_rows(
                        &st,
                        "codes",
                        n,
                        code_bits.div_ceil(8),
                        code_bits,
                    )?)
                } else {
                    if names.contains(&"codes") {
                        return Err(bad(
                            "codes",
                            "present for a 1-bit prod batch, which has no MSE codes",
                        ));
                    }
                    None
                };
                let signs = read_rows(&st, "signs", n, cfg.dim.div_ceil(8), cfg.dim)?;
                let q = Arc::new(ProdQuantizer::new(cfg)?);
                Ok(AnyBatch::Prod(ProdBatch::from_parts(
                    q,
                    codes,
                    signs,
                    norms,
                    residual_norms,
                )?))
            }
        }
    }

    /// Writes the batch to `path` crash-safely: a temporary file in the same directory, synced
    /// and renamed over `path`, so a crash leaves the old file or the new one, never a torn one.
    ///
    /// # Errors
    /// [`Error::Io`]; `path` then keeps its old contents.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_file(path, &self.to_safetensors()?)
    }

    /// Reads and validates a batch from `path`.
    ///
    /// # Errors
    /// [`Error::Io`] and those of [`AnyBatch::from_safetensors`].
    pub fn load(path: &Path) -> Result<AnyBatch> {
        Self::from_safetensors(&read_file(path)?)
    }
}

/// Writes `bytes` to `path` crash-safely (temporary file, sync, rename).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    tq_core::fsio::write_atomic(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the whole file at `path`.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The value of metadata key `key` in a safetensors file (`None` when absent).
///
/// # Errors
/// [`Error::InvalidFormat`] for a malformed header.
pub(crate) fn metadata_value(bytes: &[u8], key: &str) -> Result<Option<String>> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| bad("header", e.to_string()))?;
    Ok(header.metadata().as_ref().and_then(|m| m.get(key).cloned()))
}

/// The same safetensors file with metadata `key = value` added (or replaced). O(file size).
///
/// # Errors
/// [`Error::InvalidFormat`] for a malformed file.
pub(crate) fn with_metadata(bytes: &[u8], key: &str, value: &str) -> Result<Vec<u8>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad("header", e.to_string()))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| bad("header", e.to_string()))?;
    let mut meta = header.metadata().clone().unwrap_or_default();
    meta.insert(key.to_string(), value.to_string());
    let out = safetensors::serialize(st.tensors(), Some(meta.clone()))
        .map_err(|e| bad("header", e.to_string()))?;
    Ok(sorted_metadata(out, &meta))
}

fn tensor<'a>(st: &SafeTensors<'a>, name: &'static str, dtype: Dtype) -> Result<TensorView<'a>> {
    let t = st.tensor(name).map_err(|_| bad(name, "missing"))?;
    if t.dtype() != dtype {
        return Err(bad(
            name,
            format!("dtype {:?}, expected {dtype:?}", t.dtype()),
        ));
    }
    Ok(t)
}

/// The `norms` tensor of an mse or gmse batch at width `precision` (F32 or F16), every scale a
/// finite non-negative value.
fn read_scales(st: &SafeTensors<'_>, precision: ScalePrecision) -> Result<RowScales> {
    if precision == ScalePrecision::F32 {
        return Ok(RowScales::F32(read_f32(st, "norms", None)?));
    }
    let t = tensor(st, "norms", Dtype::F16)?;
    if t.shape().len() != 1 {
        return Err(bad("norms", format!("shape {:?}, expected [n]", t.shape())));
    }
    let v: Vec<u16> = t
        .data()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    if v.len() != t.shape()[0] {
        return Err(bad("norms", "data length does not match the shape"));
    }
    if let Some(i) = v.iter().position(|&h| {
        let x = half::f16::from_bits(h).to_f32();
        !x.is_finite() || x < 0.0
    }) {
        return Err(bad(
            "norms",
            format!("entry {i} is not a finite non-negative f16 scale"),
        ));
    }
    Ok(RowScales::F16(v))
}

/// A 1-D F32 tensor of finite non-negative values (of length `n` when given).
fn read_f32(st: &SafeTensors<'_>, name: &'static str, n: Option<usize>) -> Result<Vec<f32>> {
    let t = tensor(st, name, Dtype::F32)?;
    let len = match t.shape() {
        [len] => *len,
        other => return Err(bad(name, format!("shape {other:?}, expected [n]"))),
    };
    if let Some(n) = n
        && len != n
    {
        return Err(bad(name, format!("{len} rows, expected {n}")));
    }
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if v.len() != len {
        return Err(bad(name, "data length does not match the shape"));
    }
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite() || **x < 0.0)
    {
        return Err(bad(
            name,
            format!("value {x} at row {i} is not a finite non-negative norm"),
        ));
    }
    Ok(v)
}

/// A 2-D U8 tensor `[n, row_bytes]` whose bits past `used_bits` in each row are zero.
fn read_rows(
    st: &SafeTensors<'_>,
    name: &'static str,
    n: usize,
    row_bytes: usize,
    used_bits: usize,
) -> Result<PackedRows> {
    let t = tensor(st, name, Dtype::U8)?;
    if t.shape() != [n, row_bytes] {
        return Err(bad(
            name,
            format!("shape {:?}, expected [{n}, {row_bytes}]", t.shape()),
        ));
    }
    let data = t.data();
    if data.len() != n * row_bytes {
        return Err(bad(name, "data length does not match the shape"));
    }
    let spare = row_bytes * 8 - used_bits;
    if spare > 0 {
        let mask = !(0xFFu8 >> spare);
        if let Some(i) = data
            .chunks_exact(row_bytes)
            .position(|r| r[row_bytes - 1] & mask != 0)
        {
            return Err(bad(
                name,
                format!("row {i} has bits set past the last code"),
            ));
        }
    }
    Ok(PackedRows::from_row_major(row_bytes, data))
}
