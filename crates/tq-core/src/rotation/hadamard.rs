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
    /// The rows to transform (as long as `rows`).
    pub(super) src: &'a [f32],
    /// Where the transformed rows are written.
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
            src,
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
                let range = done * d..(done + group) * d;
                // Read straight from the source: no copy of the input first.
                transpose_in(&src[range.clone()], d, &mut buf);
                lanes_rounds(&mut buf, &mut tmp, rounds, p, norm, inverse);
                transpose_out(&buf, d, &mut rows[range]);
                done += group;
            }
        }
        if done < n {
            let mut tmp = vec![0f32; d];
            rows[done * d..].copy_from_slice(&src[done * d..]);
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

/// What a pass multiplies its elements by after its last butterfly.
#[derive(Clone, Copy)]
pub(super) enum Post<'a> {
    None,
    /// The block normalisation `1/sqrt(p)`.
    Scale(f32),
    /// One ±1 (or folded-norm) sign per element: the inverse round's diagonal.
    Signs(&'a [f32]),
}

/// Normalised Walsh-Hadamard transform of transposed rows, in passes of up to three butterfly
/// stages (radix 8) held in registers: each pass loads `R` elements `h` apart, runs its stages
/// and stores them back, so `d = 128` takes three passes over the buffer instead of seven.
/// `pre` (the forward round's signs) is applied as the first pass loads and `post` as the last
/// pass stores. Every element still sees exactly the multiplications and additions of
/// [`block_pass`] (signs, stages `h = 1, 2, 4, ...`, normalisation), in the same order, so the
/// results are bit-identical to the row-wise path.
#[inline(always)]
fn lanes_pass(x: &mut [[f32; LANES]], pre: Option<&[f32]>, post: Post<'_>) {
    let n = x.len();
    let mut h = 1;
    let mut pre = pre;
    while h < n {
        let r = if 8 * h <= n {
            8
        } else if 4 * h <= n {
            4
        } else {
            2
        };
        let last = h * r == n;
        let post = if last { post } else { Post::None };
        #[cfg(target_arch = "x86_64")]
        {
            if super::x86::available() {
                // SAFETY: AVX is present (checked at run time); `n` is a multiple of `r·h` (both
                // powers of two, `r·h <= n`) and `pre` / the post signs, when given, hold one
                // sign per element of `x`: the preconditions of `radix_pass`.
                unsafe {
                    match r {
                        8 => super::x86::radix_pass::<8>(x, h, pre, post),
                        4 => super::x86::radix_pass::<4>(x, h, pre, post),
                        _ => super::x86::radix_pass::<2>(x, h, pre, post),
                    }
                }
                pre = None;
                h *= r;
                continue;
            }
        }
        match r {
            8 => radix_pass::<8>(x, h, pre, post),
            4 => radix_pass::<4>(x, h, pre, post),
            _ => radix_pass::<2>(x, h, pre, post),
        }
        pre = None;
        h *= r;
    }
}

/// Butterfly stages `h, 2h, .., (R/2)h` of a transposed block transform (see [`lanes_pass`]).
#[inline(always)]
fn radix_pass<const R: usize>(
    x: &mut [[f32; LANES]],
    h: usize,
    pre: Option<&[f32]>,
    post: Post<'_>,
) {
    for (b, blk) in x.chunks_exact_mut(R * h).enumerate() {
        let base = b * R * h;
        for i in 0..h {
            let mut v = [[0f32; LANES]; R];
            for (k, vk) in v.iter_mut().enumerate() {
                *vk = blk[i + k * h];
                if let Some(s) = pre {
                    let s = s[base + i + k * h];
                    for l in vk.iter_mut() {
                        *l *= s;
                    }
                }
            }
            let mut span = 1;
            while span < R {
                for k in 0..R {
                    if k & span == 0 {
                        let (a, c) = (v[k], v[k + span]);
                        for l in 0..LANES {
                            v[k][l] = a[l] + c[l];
                            v[k + span][l] = a[l] - c[l];
                        }
                    }
                }
                span *= 2;
            }
            for (k, vk) in v.iter_mut().enumerate() {
                match post {
                    Post::None => {}
                    Post::Scale(s) => vk.iter_mut().for_each(|l| *l *= s),
                    Post::Signs(s) => {
                        let s = s[base + i + k * h];
                        vk.iter_mut().for_each(|l| *l *= s);
                    }
                }
                blk[i + k * h] = *vk;
            }
        }
    }
}

/// All rounds on [`LANES`] transposed rows: element `j` holds coordinate `j` of every row.
/// With one block per round (`p == d`, no permutation, normalisation folded into the signs) the
/// signs ride on the first pass (forward) or the last (inverse).
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
    let post = norm.map_or(Post::None, Post::Scale);
    if inverse {
        for r in rounds.iter().rev() {
            if p == d && r.perm.is_empty() && norm.is_none() {
                lanes_pass(x, None, Post::Signs(&r.signs));
                continue;
            }
            if p < d {
                lanes_pass(&mut x[d - p..], None, post);
            }
            lanes_pass(&mut x[..p], None, post);
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
            if p == d && r.perm.is_empty() {
                lanes_pass(x, Some(&r.signs), post);
                continue;
            }
            lanes_signs(x, &r.signs);
            if !r.perm.is_empty() {
                tmp.copy_from_slice(x);
                for (o, &i) in x.iter_mut().zip(&r.perm) {
                    *o = tmp[i as usize];
                }
            }
            lanes_pass(&mut x[..p], None, post);
            if p < d {
                lanes_pass(&mut x[d - p..], None, post);
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
