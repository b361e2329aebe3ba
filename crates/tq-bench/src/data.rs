//! Vector sets: synthetic unit vectors and the readers for `.npy`, `.fvecs` and `.safetensors`.
//!
//! Every reader validates the file before allocating: the declared shape must account for the file's
//! exact length, the dtype must be little-endian f32, and every value must be finite. Errors name the
//! file and what is wrong with it.

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
        "npy" => parse_npy(&bytes),
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

/// Parses a NumPy `.npy` file holding a 2-D little-endian f32 array (C or Fortran order).
pub fn parse_npy(bytes: &[u8]) -> Result<Vectors> {
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
    ensure!(
        descr == "<f4" || descr == "=f4" || descr == "f4",
        "dtype '{descr}' is not supported (expected little-endian float32 '<f4')"
    );
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
        .and_then(|n| n.checked_mul(4))
        .context("shape overflows")?;
    ensure!(
        data.len() == want,
        "data has {} bytes but shape ({rows}, {dim}) needs {want}",
        data.len()
    );
    let mut values = le_f32(data);
    if fortran {
        let mut c = vec![0f32; values.len()];
        for j in 0..dim {
            for i in 0..rows {
                c[i * dim + j] = values[j * rows + i];
            }
        }
        values = c;
    }
    Ok(Vectors {
        rows,
        dim,
        data: values,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[f32]) -> Vec<u8> {
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
        out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    #[test]
    fn npy_c_and_fortran_order() {
        let c = parse_npy(&npy("<f4", false, "(2, 3)", &[1., 2., 3., 4., 5., 6.])).unwrap();
        assert_eq!(c.data, vec![1., 2., 3., 4., 5., 6.]);
        let f = parse_npy(&npy("<f4", true, "(2, 3)", &[1., 4., 2., 5., 3., 6.])).unwrap();
        assert_eq!(f.data, c.data);
        assert!(parse_npy(&npy("<f8", false, "(2, 3)", &[0.; 6])).is_err());
        assert!(parse_npy(&npy("<f4", false, "(7,)", &[0.; 7])).is_err());
        assert!(parse_npy(&npy("<f4", false, "(2, 4)", &[0.; 6])).is_err());
        assert!(parse_npy(b"\x93NUMPY\x01\x00\xff\xff{").is_err());
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
