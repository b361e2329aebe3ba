//! The randomized Hadamard rotation's rounds and their application to rows: a row-wise path and a
//! transposed path that runs every butterfly across [`LANES`] rows at once (bit-identical).

use crate::simd;

#[derive(Debug, Clone)]
pub(super) struct Round {
    pub(super) signs: Vec<f32>,
    /// `perm[i]` is the source index of output `i`; empty when `d` is a power of two.
    pub(super) perm: Vec<u32>,
}

pub(super) struct HadamardOp<'a> {
    pub(super) rows: &'a mut [f32],
    pub(super) rounds: &'a [Round],
    pub(super) d: usize,
    pub(super) p: usize,
    pub(super) norm: Option<f32>,
    pub(super) inverse: bool,
}

impl pulp::WithSimd for HadamardOp<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let HadamardOp {
            rows,
            rounds,
            d,
            p,
            norm,
            inverse,
        } = self;
        let n = rows.len() / d;
        let mut done = 0;
        if n >= 2 {
            let mut buf = vec![[0f32; LANES]; d];
            let mut tmp = vec![[0f32; LANES]; d];
            while done < n {
                let group = (n - done).min(LANES);
                let chunk = &mut rows[done * d..(done + group) * d];
                transpose_in(chunk, d, &mut buf);
                lanes_rounds(&mut buf, &mut tmp, rounds, p, norm, inverse);
                transpose_out(&buf, d, chunk);
                done += group;
            }
        }
        if done < n {
            let mut tmp = vec![0f32; d];
            for x in rows[done * d..].chunks_exact_mut(d) {
                row_rounds(x, &mut tmp, rounds, p, norm, inverse);
            }
        }
    }
}

/// Rows transformed together by the transposed Hadamard path.
pub const LANES: usize = 8;

/// Rows `chunk` (`group <= 8` rows of `d`) into lanes: `buf[j][l] = row_l[j]`.
#[inline(always)]
fn transpose_in(chunk: &[f32], d: usize, buf: &mut [[f32; LANES]]) {
    let group = chunk.len() / d;
    #[cfg(target_arch = "x86_64")]
    {
        if group == LANES && chunk.len() == LANES * d && buf.len() == d && super::x86::available() {
            // SAFETY: AVX is present (checked at run time), `chunk` is exactly 8 rows of `d` and
            // `buf` has `d` lanes: the preconditions of `rows_to_lanes`.
            unsafe { super::x86::rows_to_lanes(chunk, d, buf) };
            return;
        }
    }
    for (l, row) in chunk.chunks_exact(d).enumerate() {
        for (b, &v) in buf.iter_mut().zip(row) {
            b[l] = v;
        }
    }
}

/// Lanes back into rows: `row_l[j] = buf[j][l]` for the `chunk.len() / d` rows of `chunk`.
#[inline(always)]
fn transpose_out(buf: &[[f32; LANES]], d: usize, chunk: &mut [f32]) {
    let group = chunk.len() / d;
    #[cfg(target_arch = "x86_64")]
    {
        if group == LANES && chunk.len() == LANES * d && buf.len() == d && super::x86::available() {
            // SAFETY: AVX is present (checked at run time), `chunk` is exactly 8 rows of `d` and
            // `buf` has `d` lanes: the preconditions of `lanes_to_rows`.
            unsafe { super::x86::lanes_to_rows(buf, d, chunk) };
            return;
        }
    }
    for (l, row) in chunk.chunks_exact_mut(d).enumerate() {
        for (v, b) in row.iter_mut().zip(buf) {
            *v = b[l];
        }
    }
}

/// One forward or inverse round on one row.
#[inline(always)]
fn row_step(x: &mut [f32], tmp: &mut [f32], r: &Round, p: usize, norm: Option<f32>, forward: bool) {
    let d = x.len();
    if forward {
        for (v, s) in x.iter_mut().zip(&r.signs) {
            *v *= *s;
        }
        if !r.perm.is_empty() {
            tmp.copy_from_slice(x);
            for (o, &i) in x.iter_mut().zip(&r.perm) {
                *o = tmp[i as usize];
            }
        }
        block_pass(&mut x[..p], norm);
        if p < d {
            block_pass(&mut x[d - p..], norm);
        }
    } else {
        if p < d {
            block_pass(&mut x[d - p..], norm);
        }
        block_pass(&mut x[..p], norm);
        if !r.perm.is_empty() {
            tmp.copy_from_slice(x);
            for (&v, &i) in tmp.iter().zip(&r.perm) {
                x[i as usize] = v;
            }
        }
        for (v, s) in x.iter_mut().zip(&r.signs) {
            *v *= *s;
        }
    }
}

/// All rounds on one row (see [`Rotation::hadamard_rows`]).
#[inline(always)]
fn row_rounds(
    x: &mut [f32],
    tmp: &mut [f32],
    rounds: &[Round],
    p: usize,
    norm: Option<f32>,
    inverse: bool,
) {
    if inverse {
        for r in rounds.iter().rev() {
            row_step(x, tmp, r, p, norm, false);
        }
    } else {
        for r in rounds {
            row_step(x, tmp, r, p, norm, true);
        }
    }
}

#[inline(always)]
fn lanes_signs(x: &mut [[f32; LANES]], signs: &[f32]) {
    for (v, &s) in x.iter_mut().zip(signs) {
        for l in v.iter_mut() {
            *l *= s;
        }
    }
}

/// Normalised Walsh-Hadamard transform of transposed rows. Two butterfly stages are fused per
/// pass (radix 4) to halve the memory traffic; every element still sees exactly the additions of
/// [`block_pass`], in the same order, so the results are bit-identical.
#[inline(always)]
fn lanes_pass(x: &mut [[f32; LANES]], norm: Option<f32>) {
    let n = x.len();
    // Flat views: element j's lanes are floats 8j..8j+8, so a block of h elements is one
    // contiguous run of 8h floats and every butterfly is a plain element-wise loop.
    let flat = x.as_flattened_mut();
    let mut h = 1;
    while 4 * h <= n {
        let w = h * LANES;
        for blk in flat.chunks_exact_mut(4 * w) {
            let (ab, ce) = blk.split_at_mut(2 * w);
            let (a, b) = ab.split_at_mut(w);
            let (c, e) = ce.split_at_mut(w);
            for i in 0..w {
                let (s0, d0) = (a[i] + b[i], a[i] - b[i]);
                let (s1, d1) = (c[i] + e[i], c[i] - e[i]);
                a[i] = s0 + s1;
                c[i] = s0 - s1;
                b[i] = d0 + d1;
                e[i] = d0 - d1;
            }
        }
        h *= 4;
    }
    if h < n {
        let w = h * LANES;
        for blk in flat.chunks_exact_mut(2 * w) {
            let (a, b) = blk.split_at_mut(w);
            for i in 0..w {
                let (s, t) = (a[i] + b[i], a[i] - b[i]);
                a[i] = s;
                b[i] = t;
            }
        }
    }
    if let Some(norm) = norm {
        for v in flat.iter_mut() {
            *v *= norm;
        }
    }
}

/// All rounds on [`LANES`] transposed rows: element `j` holds coordinate `j` of every row.
#[inline(always)]
fn lanes_rounds(
    x: &mut [[f32; LANES]],
    tmp: &mut [[f32; LANES]],
    rounds: &[Round],
    p: usize,
    norm: Option<f32>,
    inverse: bool,
) {
    let d = x.len();
    if inverse {
        for r in rounds.iter().rev() {
            if p < d {
                lanes_pass(&mut x[d - p..], norm);
            }
            lanes_pass(&mut x[..p], norm);
            if !r.perm.is_empty() {
                tmp.copy_from_slice(x);
                for (v, &i) in tmp.iter().zip(&r.perm) {
                    x[i as usize] = *v;
                }
            }
            lanes_signs(x, &r.signs);
        }
    } else {
        for r in rounds {
            lanes_signs(x, &r.signs);
            if !r.perm.is_empty() {
                tmp.copy_from_slice(x);
                for (o, &i) in x.iter_mut().zip(&r.perm) {
                    *o = tmp[i as usize];
                }
            }
            lanes_pass(&mut x[..p], norm);
            if p < d {
                lanes_pass(&mut x[d - p..], norm);
            }
        }
    }
}

/// Normalised Walsh-Hadamard transform of one power-of-two block (inlined into the dispatch).
#[inline(always)]
fn block_pass(x: &mut [f32], norm: Option<f32>) {
    simd::fwht_inline(x);
    if let Some(norm) = norm {
        for v in x.iter_mut() {
            *v *= norm;
        }
    }
}
