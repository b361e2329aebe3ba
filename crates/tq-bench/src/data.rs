//! Vector sets: synthetic unit vectors and the readers for `.npy`, `.fvecs` and `.safetensors`.
//!
//! Every reader validates the file before allocating: the declared shape must account for the file's
//! exact length and every value must be finite (a non-finite value is reported by row and column).
//! `.npy` arrays may be float32, float64 (numpy's default) or float16, little- or big-endian; other
//! dtypes are refused. Anything that is not float32 is converted on load and [`load`] prints a
//! one-line note saying so. Errors name the file and what is wrong with it.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use tq_core::{SeededRng, rng::stream};

/// A row-major matrix of `rows × dim` f32 vectors.
#[derive(Debug, Clone)]
pub struct Vectors {
    /// Number of vectors.
    pub rows: usize,
    /// Dimension.
    pub dim: usize,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl Vectors {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Vectors {
        let mut data = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            data.extend_from_slice(self.row(i));
        }
        Vectors {
            rows: idx.len(),
            dim: self.dim,
            data,
        }
    }
}

/// `n` Gaussian vectors normalised to unit length, from `seed` on stream `which`.
pub fn unit_vectors(n: usize, dim: usize, seed: u64, which: u64) -> Vectors {
    let mut r = SeededRng::new(seed, which);
    let mut data = Vec::with_capacity(n * dim);
    let mut x = vec![0f64; dim];
    for _ in 0..n {
        for v in x.iter_mut() {
            *v = r.gaussian();
        }
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        data.extend(x.iter().map(|v| (v / norm) as f32));
    }
    Vectors { rows: n, dim, data }
}

/// Synthetic base vectors.
pub fn synthetic_base(n: usize, dim: usize, seed: u64) -> Vectors {
    unit_vectors(n, dim, seed, stream::DATA)
}

/// Synthetic queries (independent of the base).
pub fn synthetic_queries(n: usize, dim: usize, seed: u64) -> Vectors {
    unit_vectors(n, dim, seed, stream::QUERIES)
}

/// Reads vectors from `.npy`, `.fvecs` or `.safetensors` (by extension).
pub fn load(path: &Path) -> Result<Vectors> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let v = match ext.as_str() {
        "npy" => parse_npy_noted(&bytes).map(|(v, note)| {
            if let Some(note) = note {
                eprintln!("note: {}: {note}", path.display());
            }
            v
        }),
        "fvecs" => parse_fvecs(&bytes),
        "safetensors" => parse_safetensors(&bytes),
        other => bail!("unsupported file type '.{other}' (expected .npy, .fvecs or .safetensors)"),
    }
    .with_context(|| format!("{}", path.display()))?;
    ensure!(v.rows > 0, "{}: no vectors", path.display());
    ensure!(
        v.dim >= 2,
        "{}: dimension {} is too small (need at least 2)",
        path.display(),
        v.dim
    );
    if let Some(i) = v.data.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: non-finite value {} at row {}, column {}",
            path.display(),
            v.data[i],
            i / v.dim,
            i % v.dim
        );
    }
    Ok(v)
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Parses a NumPy `.npy` file holding a 2-D float array (C or Fortran order) as f32. See
/// [`parse_npy_noted`] for the dtypes accepted.
///
/// # Errors
/// A bad magic, header, dtype or shape, or a data length that does not match the shape.
pub fn parse_npy(bytes: &[u8]) -> Result<Vectors> {
    parse_npy_noted(bytes).map(|(v, _)| v)
}

/// The element types a `.npy` file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NpyFloat {
    F16,
    F32,
    F64,
}

/// Parses a NumPy `.npy` file holding a 2-D float array: `f4`, `f8` or `f2`, little-endian (`<`,
/// `=`, `|`) or big-endian (`>`), C or Fortran order. Returns the vectors as f32 and, when the file
/// was not little-endian float32, a one-line note naming the conversion. f64 values outside the
/// f32 range become infinite (and are then refused by [`load`] by row and column). O(file size).
///
/// # Errors
/// A bad magic, header, dtype or shape, or a data length that does not match the shape.
pub fn parse_npy_noted(bytes: &[u8]) -> Result<(Vectors, Option<String>)> {
    ensure!(
        bytes.len() >= 10 && &bytes[..6] == b"\x93NUMPY",
        "not a .npy file (bad magic)"
    );
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "truncated .npy header");
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => bail!("unsupported .npy version {v}"),
    };
    let header = bytes
        .get(start..start.saturating_add(hlen))
        .context("truncated .npy header")?;
    let header = std::str::from_utf8(header).context(".npy header is not text")?;
    let descr = dict_value(header, "descr").context(".npy header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let (big_endian, kind) = {
        let (order, ty) = match descr.as_bytes().first() {
            Some(b'<' | b'=' | b'|') => (false, &descr[1..]),
            Some(b'>') => (true, &descr[1..]),
            _ => (false, descr),
        };
        let kind = match ty {
            "f2" => NpyFloat::F16,
            "f4" => NpyFloat::F32,
            "f8" => NpyFloat::F64,
            _ => bail!(
                "dtype '{}' is not supported (expected float32 '<f4', float64 '<f8' or float16 '<f2')",
                descr.chars().take(32).collect::<String>()
            ),
        };
        (order, kind)
    };
    let width = match kind {
        NpyFloat::F16 => 2,
        NpyFloat::F32 => 4,
        NpyFloat::F64 => 8,
    };
    let fortran =
        dict_value(header, "fortran_order").context(".npy header has no 'fortran_order'")?;
    let fortran = match fortran.trim() {
        "True" => true,
        "False" => false,
        other => bail!("bad fortran_order '{other}'"),
    };
    let shape = dict_value(header, "shape").context(".npy header has no 'shape'")?;
    let dims: Vec<usize> = shape
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("bad shape entry '{s}'"))
        })
        .collect::<Result<_>>()?;
    ensure!(
        dims.len() == 2,
        "array has shape {dims:?}; expected a 2-D array (vectors × dim)"
    );
    let (rows, dim) = (dims[0], dims[1]);
    let data = &bytes[start + hlen..];
    let want = rows
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(width))
        .context("shape overflows")?;
    ensure!(
        data.len() == want,
        "data has {} bytes but shape ({rows}, {dim}) needs {want}",
        data.len()
    );
    let mut values: Vec<f32> = match (kind, big_endian) {
        (NpyFloat::F32, false) => le_f32(data),
        (NpyFloat::F32, true) => data
            .chunks_exact(4)
            .map(|b| f32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        (NpyFloat::F64, be) => data
            .chunks_exact(8)
            .map(|b| {
                let a = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
                (if be {
                    f64::from_be_bytes(a)
                } else {
                    f64::from_le_bytes(a)
                }) as f32
            })
            .collect(),
        (NpyFloat::F16, be) => data
            .chunks_exact(2)
            .map(|b| {
                let bits = if be {
                    u16::from_be_bytes([b[0], b[1]])
                } else {
                    u16::from_le_bytes([b[0], b[1]])
                };
                half::f16::from_bits(bits).to_f32()
            })
            .collect(),
    };
    let note = match (kind, big_endian) {
        (NpyFloat::F32, false) => None,
        (NpyFloat::F32, true) => Some("converted big-endian float32 to little-endian".to_string()),
        (k, be) => Some(format!(
            "converted {}{} to float32",
            if be { "big-endian " } else { "" },
            if k == NpyFloat::F16 {
                "float16"
            } else {
                "float64"
            }
        )),
    };
    if fortran {
        let mut c = vec![0f32; values.len()];
        for j in 0..dim {
            for i in 0..rows {
                c[i * dim + j] = values[j * rows + i];
            }
        }
        values = c;
    }
    Ok((
        Vectors {
            rows,
            dim,
            data: values,
        },
        note,
    ))
}

/// The raw text of `key`'s value in a Python dict literal (the `.npy` header).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let k1 = format!("'{key}'");
    let k2 = format!("\"{key}\"");
    let pos = header
        .find(&k1)
        .map(|p| p + k1.len())
        .or_else(|| header.find(&k2).map(|p| p + k2.len()))?;
    let rest = header[pos..].trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        let end = rest.find(')')?;
        Some(&rest[..=end])
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim())
    }
}

/// Parses `.fvecs`: each vector is a little-endian i32 dimension followed by that many f32.
pub fn parse_fvecs(bytes: &[u8]) -> Result<Vectors> {
    ensure!(bytes.len() >= 4, "empty .fvecs file");
    let dim = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    ensure!(dim > 0, "first vector declares dimension {dim}");
    let dim = dim as usize;
    let stride = 4 + 4 * dim;
    ensure!(
        bytes.len().is_multiple_of(stride),
        "file length {} is not a multiple of the record size {stride} (dimension {dim})",
        bytes.len()
    );
    let rows = bytes.len() / stride;
    let mut data = Vec::with_capacity(rows * dim);
    for (i, rec) in bytes.chunks_exact(stride).enumerate() {
        let d = i32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        ensure!(
            d as usize == dim && d > 0,
            "vector {i} declares dimension {d}, expected {dim}"
        );
        data.extend(le_f32(&rec[4..]));
    }
    Ok(Vectors { rows, dim, data })
}

/// Parses a safetensors file with a 2-D F32 tensor named `vectors`.
pub fn parse_safetensors(bytes: &[u8]) -> Result<Vectors> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("invalid safetensors: {e}"))?;
    let t = st
        .tensor("vectors")
        .map_err(|_| anyhow::anyhow!("no tensor named 'vectors'"))?;
    ensure!(
        t.dtype() == safetensors::Dtype::F32,
        "tensor 'vectors' has dtype {:?}, expected F32",
        t.dtype()
    );
    let [rows, dim] = t.shape() else {
        bail!(
            "tensor 'vectors' has shape {:?}, expected [n, dim]",
            t.shape()
        )
    };
    Ok(Vectors {
        rows: *rows,
        dim: *dim,
        data: le_f32(t.data()),
    })
}

/// A version-1 `.npy` file: the header dict with `descr`, `fortran_order` and `shape` (written as
/// given, e.g. `"(3, 4)"`), padded to 64 bytes as numpy does, then `data` as it is. For tests and
/// seed corpora; `data` must already be in `descr`'s byte layout. O(data).
pub fn npy_bytes(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[f32]) -> Vec<u8> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        npy_bytes(descr, fortran, shape, &bytes)
    }

    #[test]
    fn npy_c_and_fortran_order() {
        let c = parse_npy(&npy("<f4", false, "(2, 3)", &[1., 2., 3., 4., 5., 6.])).unwrap();
        assert_eq!(c.data, vec![1., 2., 3., 4., 5., 6.]);
        let f = parse_npy(&npy("<f4", true, "(2, 3)", &[1., 4., 2., 5., 3., 6.])).unwrap();
        assert_eq!(f.data, c.data);
        assert!(parse_npy(&npy("<i4", false, "(2, 3)", &[0.; 6])).is_err());
        assert!(parse_npy(&npy("<f4", false, "(7,)", &[0.; 7])).is_err());
        assert!(parse_npy(&npy("<f4", false, "(2, 4)", &[0.; 6])).is_err());
        assert!(parse_npy(b"\x93NUMPY\x01\x00\xff\xff{").is_err());
    }

    /// A C-order `.npy` file of `descr` whose data bytes are given as they are.
    fn npy_bytes_c(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        npy_bytes(descr, false, shape, data)
    }

    #[test]
    fn npy_float64_float16_and_big_endian_are_converted_with_a_note() {
        let want = [1.5f32, -2.0, 0.25, 3.0, 1e-3, -7.5];
        let f8le: Vec<u8> = want
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect();
        let f8be: Vec<u8> = want
            .iter()
            .flat_map(|&v| (v as f64).to_be_bytes())
            .collect();
        let f4be: Vec<u8> = want.iter().flat_map(|v| v.to_be_bytes()).collect();
        let f2le: Vec<u8> = want
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let f2be: Vec<u8> = want
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_be_bytes())
            .collect();
        for (descr, data, note) in [
            ("<f8", &f8le, "converted float64 to float32"),
            (">f8", &f8be, "converted big-endian float64 to float32"),
            (
                ">f4",
                &f4be,
                "converted big-endian float32 to little-endian",
            ),
            ("<f2", &f2le, "converted float16 to float32"),
            (">f2", &f2be, "converted big-endian float16 to float32"),
        ] {
            let (v, n) = parse_npy_noted(&npy_bytes_c(descr, "(2, 3)", data)).unwrap();
            assert_eq!((v.rows, v.dim), (2, 3), "{descr}");
            for (a, b) in v.data.iter().zip(want) {
                // f16 keeps 11 significant bits; the others are exact for these values.
                assert!((a - b).abs() <= b.abs() * 1e-3, "{descr}: {a} vs {b}");
            }
            assert_eq!(n.as_deref(), Some(note), "{descr}");
        }
        let (_, n) = parse_npy_noted(&npy("<f4", false, "(2, 3)", &want)).unwrap();
        assert_eq!(n, None);
        // Lengths are checked at the element width.
        assert!(parse_npy(&npy_bytes_c("<f8", "(2, 3)", &f8le[..40])).is_err());
    }

    #[test]
    fn fvecs_records() {
        let mut b = Vec::new();
        for row in [[1f32, 2.], [3., 4.]] {
            b.extend(2i32.to_le_bytes());
            b.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        }
        let v = parse_fvecs(&b).unwrap();
        assert_eq!((v.rows, v.dim), (2, 2));
        assert!(parse_fvecs(&b[..b.len() - 1]).is_err());
        b[12..16].copy_from_slice(&3i32.to_le_bytes());
        assert!(parse_fvecs(&b).is_err());
    }
}
