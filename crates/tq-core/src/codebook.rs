//! Lloyd-Max codebooks for the coordinates of a randomly rotated unit vector.
//!
//! After a Haar rotation every coordinate `t` of a unit vector in `R^d` follows
//! `f(t) ∝ (1 - t²)^((d-3)/2)` on `[-1, 1]` (docs/DESIGN.md, Algorithms). The `b`-bit codebook is the Lloyd-Max
//! quantizer of that law: `2^b` centroids, each the conditional mean of its cell, with cell
//! boundaries at the midpoints between neighbouring centroids.
//!
//! **Numerics.** With `t = sin θ` the law becomes `∝ cos^(d-2) θ dθ` on `[-π/2, π/2]`, which is
//! smooth for every `d >= 2` (the `d = 2` arcsine singularity disappears). The mass, first and second
//! moments are tabulated as cumulative trapezoid sums on a uniform `θ` grid of
//! [`GRID_INTERVALS`] intervals covering `|θ| <= min(π/2, 12/sqrt(d))` (the neglected tail mass is
//! below `e^-70`), and read between nodes by linear interpolation. Lloyd iterations start from the
//! high-resolution optimum (centroid density `∝ f^(1/3)`) and run until no centroid moves by more
//! than `1e-12` (in units of `1/sqrt(d)`). All transcendental functions come from `libm`, so the
//! codebook (and therefore every code) is the same on every platform.
//!
//! **Baked into stored codes:** the centroid order (ascending, code 0 is the most negative), the
//! midpoint boundaries and the tie rule (a value exactly on a boundary takes the lower code).
//!
//! The unit-vector distortion `D_mse = E‖x - x̃‖²` of TurboQuant_mse is `d` times the per-coordinate
//! mean squared error of this quantizer ([`Codebook::distortion`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::{Error, Result};

/// Intervals of the θ grid used to tabulate the coordinate law.
pub const GRID_INTERVALS: usize = 1 << 14;
const MAX_ITERS: usize = 20_000;
const LLOYD_WARMUP: usize = 40;
const MAX_NEWTON: usize = 100;
/// Gauss-Legendre nodes and weights on [-1, 1] (8 points), for the final distortion integral.
const GL8: [(f64, f64); 8] = [
    (-0.960_289_856_497_536_3, 0.101_228_536_290_376_26),
    (-0.796_666_477_413_626_7, 0.222_381_034_453_374_47),
    (-0.525_532_409_916_329, 0.313_706_645_877_887_3),
    (-0.183_434_642_495_649_8, 0.362_683_783_378_362),
    (0.183_434_642_495_649_8, 0.362_683_783_378_362),
    (0.525_532_409_916_329, 0.313_706_645_877_887_3),
    (0.796_666_477_413_626_7, 0.222_381_034_453_374_47),
    (0.960_289_856_497_536_3, 0.101_228_536_290_376_26),
];

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The law is symmetric: keep the codebook exactly antisymmetric.
fn symmetrize(c: &mut [f64]) {
    let n = c.len();
    for i in 0..n / 2 {
        let v = 0.5 * (c[n - 1 - i] - c[i]);
        c[i] = -v;
        c[n - 1 - i] = v;
    }
}

/// Solves `(I - J) δ = r` for the tridiagonal Lloyd Jacobian `J` (Thomas algorithm).
fn solve_newton(jac: &[Vec<f64>; 3], r: &[f64]) -> Vec<f64> {
    let n = r.len();
    let (sub, main, sup) = (&jac[0], &jac[1], &jac[2]);
    let mut cp = vec![0.0; n];
    let mut dp = vec![0.0; n];
    for i in 0..n {
        let a = if i > 0 { -sub[i] } else { 0.0 };
        let b = 1.0 - main[i];
        let c = -sup[i];
        let denom = b - a * if i > 0 { cp[i - 1] } else { 0.0 };
        let denom = if denom.abs() < 1e-300 { 1e-300 } else { denom };
        cp[i] = c / denom;
        dp[i] = (r[i] - a * if i > 0 { dp[i - 1] } else { 0.0 }) / denom;
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = dp[i] - if i + 1 < n { cp[i] * x[i + 1] } else { 0.0 };
    }
    x
}

/// Per-coordinate mean squared error of the quantizer with centroids `c`, integrated directly
/// (composite 8-point Gauss-Legendre in θ on pieces no wider than a quarter of the law's width),
/// which avoids the cancellation of `E t² - Σ F²/M` at high bit widths.
fn per_coordinate_mse(law: &LawTable, dim: usize, c: &[f64]) -> f64 {
    let levels = c.len();
    let mut cuts = vec![0.0f64; levels + 1];
    Codebook::cell_edges(law, c, &mut cuts);
    let piece = 0.25 / (dim as f64).sqrt();
    let w = |th: f64| -> f64 {
        let cs = libm::cos(th);
        if dim == 2 {
            1.0
        } else if cs <= 0.0 {
            0.0
        } else {
            libm::exp((dim as f64 - 2.0) * libm::log(cs))
        }
    };
    let (mut err, mut mass) = (0.0, 0.0);
    for i in 0..levels {
        let (a, b) = (cuts[i], cuts[i + 1]);
        let pieces = (((b - a) / piece).ceil() as usize).max(1);
        let hp = (b - a) / pieces as f64;
        for p in 0..pieces {
            let mid = a + (p as f64 + 0.5) * hp;
            for &(x, wt) in &GL8 {
                let th = mid + 0.5 * hp * x;
                let dens = w(th) * wt * 0.5 * hp;
                let e = libm::sin(th) - c[i];
                err += e * e * dens;
                mass += dens;
            }
        }
    }
    err / mass
}

type CodebookCache = HashMap<(usize, u32), Arc<Codebook>>;

/// A Lloyd-Max codebook for dimension `dim` and `bits` bits per coordinate.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    dim: usize,
    bits: u32,
    centroids: Vec<f32>,
    boundaries: Vec<f32>,
    cells: BoundaryCells,
    centroids_f64: Vec<f64>,
    distortion: f64,
}

/// A uniform grid over the boundaries' span that answers "how many boundaries lie below `y`"
/// with one multiply, one table read and a short forward scan, instead of a binary search.
///
/// Cell `c` covers `[lo + c·w, lo + (c+1)·w)` with `w` at most the smallest gap between
/// neighbouring boundaries (down to 4096 cells), and stores how many boundaries lie below
/// `lo + c·w - w/2`: never more than the count of any value that maps to the cell (the half-cell
/// margin absorbs the rounding of the index computation), so the forward scan `while y > b[k]`
/// only ever moves up, ends at the exact count (ties take the lower code, NaN gives 0, as the
/// binary search); when the cells are no wider than the smallest gap it is two branch-free compares.
#[derive(Debug, Clone, PartialEq)]
struct BoundaryCells {
    lo: f32,
    inv_width: f32,
    start: Vec<u8>,
    /// The boundaries followed by two `+inf`, so two compares past any start stay in bounds.
    padded: Vec<f32>,
    /// True when the cells are no wider than the smallest gap: at most two boundaries can lie
    /// between a cell's start count and any value in it, and the count takes two branch-free
    /// compares.
    two_steps: bool,
}

impl BoundaryCells {
    /// Cells for ascending `boundaries` (at most 255: counts fit a byte). O(cells · boundaries)
    /// (at most about a million compares, once per codebook).
    fn new(boundaries: &[f32]) -> Self {
        debug_assert!(boundaries.len() <= 255 && boundaries.windows(2).all(|w| w[0] <= w[1]));
        let (lo, hi) = match (boundaries.first(), boundaries.last()) {
            (Some(&lo), Some(&hi)) if hi > lo => (lo, hi),
            _ => {
                return Self {
                    lo: boundaries.first().copied().unwrap_or(0.0),
                    inv_width: 0.0,
                    start: vec![0],
                    padded: boundaries.to_vec(),
                    two_steps: false,
                };
            }
        };
        let gap = boundaries
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(f32::INFINITY, f32::min);
        // `min` first: a zero gap (coinciding f32 boundaries) gives +inf, saturated here.
        let cells = (((hi - lo) / gap).ceil().min(4095.0) as usize + 1).max(1);
        let width = (hi - lo) / cells as f32;
        let start = (0..=cells)
            .map(|c| {
                let edge = lo + (c as f32 - 0.5) * width;
                boundaries.iter().take_while(|&&b| b < edge).count() as u8
            })
            .collect();
        let mut padded = boundaries.to_vec();
        padded.extend([f32::INFINITY; 2]);
        Self {
            lo,
            inv_width: 1.0 / width,
            start,
            padded,
            two_steps: width <= gap,
        }
    }

    /// `#{ k : y > boundaries[k] }` (NaN gives 0). O(1) expected.
    #[inline]
    fn count(&self, boundaries: &[f32], y: f32) -> u8 {
        // `as usize` saturates: below `lo` (and NaN) gives cell 0, +inf the last cell.
        let cell = (((y - self.lo) * self.inv_width) as usize).min(self.start.len() - 1);
        let mut k = self.start[cell] as usize;
        if self.two_steps {
            // Values in a cell lie within 1.5 widths of its start edge, so past at most two
            // boundaries (gaps are at least one width); the padding answers false.
            k += (y > self.padded[k]) as usize;
            k += (y > self.padded[k]) as usize;
            return k as u8;
        }
        while k < boundaries.len() && y > boundaries[k] {
            k += 1;
        }
        k as u8
    }
}

/// Cumulative moments of the coordinate law on the θ grid.
struct LawTable {
    theta_max: f64,
    h: f64,
    mass: Vec<f64>,
    first: Vec<f64>,
    compand: Vec<f64>,
}

impl LawTable {
    fn new(dim: usize) -> Self {
        let d = dim as f64;
        let theta_max = (12.0 / d.sqrt()).min(std::f64::consts::FRAC_PI_2);
        let n = GRID_INTERVALS;
        let h = 2.0 * theta_max / n as f64;
        let node = |k: usize| -> (f64, f64, f64) {
            let th = -theta_max + k as f64 * h;
            let c = libm::cos(th).max(0.0);
            let s = libm::sin(th);
            // w = cos^(d-2) θ (the law in θ); g = f_t^(1/3) dt/dθ = cos^((d-3)/3) θ · cos θ.
            let (w, g) = if c <= 0.0 {
                (if dim == 2 { 1.0 } else { 0.0 }, 0.0)
            } else {
                let lc = libm::log(c);
                (
                    libm::exp((d - 2.0) * lc),
                    libm::exp(((d - 3.0) / 3.0 + 1.0) * lc),
                )
            };
            (w, s, g)
        };
        let mut mass = vec![0.0; n + 1];
        let mut first = vec![0.0; n + 1];
        let mut compand = vec![0.0; n + 1];
        let (mut w0, mut s0, mut g0) = node(0);
        for k in 1..=n {
            let (w1, s1, g1) = node(k);
            mass[k] = mass[k - 1] + 0.5 * h * (w0 + w1);
            first[k] = first[k - 1] + 0.5 * h * (w0 * s0 + w1 * s1);
            compand[k] = compand[k - 1] + 0.5 * h * (g0 + g1);
            (w0, s0, g0) = (w1, s1, g1);
        }
        Self {
            theta_max,
            h,
            mass,
            first,
            compand,
        }
    }

    /// Linear interpolation of a cumulative table at angle `th`.
    fn at(&self, table: &[f64], th: f64) -> f64 {
        let x = ((th + self.theta_max) / self.h).clamp(0.0, GRID_INTERVALS as f64);
        let k = (x.floor() as usize).min(GRID_INTERVALS - 1);
        let frac = x - k as f64;
        table[k] + frac * (table[k + 1] - table[k])
    }

    /// Angle at which the companding cumulative reaches fraction `p` of its total.
    fn compand_inverse(&self, p: f64) -> f64 {
        let target = p * self.compand[GRID_INTERVALS];
        let k = self
            .compand
            .partition_point(|&v| v < target)
            .clamp(1, GRID_INTERVALS);
        let (a, b) = (self.compand[k - 1], self.compand[k]);
        let frac = if b > a { (target - a) / (b - a) } else { 0.0 };
        -self.theta_max + (k as f64 - 1.0 + frac) * self.h
    }

    fn theta_of(&self, t: f64) -> f64 {
        libm::asin(t.clamp(-1.0, 1.0)).clamp(-self.theta_max, self.theta_max)
    }
}

impl Codebook {
    /// The cached codebook for `(dim, bits)`, built on first use (a few milliseconds).
    ///
    /// # Errors
    /// [`Error::DimTooSmall`] for `dim < 2`, [`Error::BitsOutOfRange`] for `bits` outside `1..=8`.
    pub fn get(dim: usize, bits: u32) -> Result<Arc<Codebook>> {
        static CACHE: OnceLock<Mutex<CodebookCache>> = OnceLock::new();
        Self::validate(dim, bits)?;
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(cb) = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(dim, bits))
        {
            return Ok(Arc::clone(cb));
        }
        let cb = Arc::new(Self::build(dim, bits)?);
        let mut guard = cache.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Arc::clone(guard.entry((dim, bits)).or_insert(cb)))
    }

    fn validate(dim: usize, bits: u32) -> Result<()> {
        if dim < 2 {
            return Err(Error::DimTooSmall { dim, min: 2 });
        }
        if !(1..=8).contains(&bits) {
            return Err(Error::BitsOutOfRange { bits });
        }
        Ok(())
    }

    /// Builds the codebook without the cache. Prefer [`Codebook::get`].
    ///
    /// # Errors
    /// As [`Codebook::get`].
    pub fn build(dim: usize, bits: u32) -> Result<Codebook> {
        Self::validate(dim, bits)?;
        let law = LawTable::new(dim);
        let levels = 1usize << bits;
        let mut c: Vec<f64> = (0..levels)
            .map(|i| libm::sin(law.compand_inverse((i as f64 + 0.5) / levels as f64)))
            .collect();
        let tol = 1e-12 / (dim as f64).sqrt();
        // Plain Lloyd iterations to get close, then Newton steps on the fixed point `c = T(c)` of the
        // Lloyd map, whose Jacobian is tridiagonal (each centroid depends on its two boundaries).
        for it in 0..MAX_ITERS {
            let (next, _) = Self::lloyd_map(&law, dim, &c, false);
            let moved = max_diff(&c, &next);
            c = next;
            if moved < tol || (it >= LLOYD_WARMUP && levels > 2) {
                break;
            }
        }
        if levels > 2 {
            for _ in 0..MAX_NEWTON {
                let (t, jac) = Self::lloyd_map(&law, dim, &c, true);
                let residual: Vec<f64> = t.iter().zip(&c).map(|(a, b)| a - b).collect();
                let mut step = solve_newton(&jac, &residual);
                // Damp until the centroids stay strictly increasing.
                let mut trial: Vec<f64> = c.iter().zip(&step).map(|(a, s)| a + s).collect();
                let mut halvings = 0;
                while !trial.windows(2).all(|w| w[0] < w[1]) && halvings < 30 {
                    step.iter_mut().for_each(|s| *s *= 0.5);
                    trial = c.iter().zip(&step).map(|(a, s)| a + s).collect();
                    halvings += 1;
                }
                symmetrize(&mut trial);
                let moved = max_diff(&c, &trial);
                c = trial;
                if moved < tol {
                    break;
                }
            }
        }
        let distortion = dim as f64 * per_coordinate_mse(&law, dim, &c);
        let boundaries: Vec<f32> = c.windows(2).map(|w| (0.5 * (w[0] + w[1])) as f32).collect();
        let cells = BoundaryCells::new(&boundaries);
        Ok(Codebook {
            dim,
            bits,
            centroids: c.iter().map(|&v| v as f32).collect(),
            boundaries,
            cells,
            centroids_f64: c,
            distortion,
        })
    }

    fn cell_edges(law: &LawTable, c: &[f64], cuts: &mut [f64]) {
        let levels = c.len();
        cuts[0] = -law.theta_max;
        cuts[levels] = law.theta_max;
        for i in 1..levels {
            cuts[i] = law.theta_of(0.5 * (c[i - 1] + c[i]));
        }
    }

    /// One Lloyd step `T(c)` (conditional means of the cells cut at the midpoints) and, if asked,
    /// the three diagonals of `∂T/∂c` (sub, main, super).
    fn lloyd_map(
        law: &LawTable,
        dim: usize,
        c: &[f64],
        jacobian: bool,
    ) -> (Vec<f64>, [Vec<f64>; 3]) {
        let levels = c.len();
        let mut cuts = vec![0.0f64; levels + 1];
        Self::cell_edges(law, c, &mut cuts);
        let total = law.mass[GRID_INTERVALS];
        let mut t = c.to_vec();
        let mut jac = [vec![0.0; levels], vec![0.0; levels], vec![0.0; levels]];
        // Density of the law in t at the angle θ (same normalisation as the tables).
        let dens = |th: f64| libm::exp((dim as f64 - 3.0) * libm::log(libm::cos(th).max(1e-300)));
        for i in 0..levels {
            let m = law.at(&law.mass, cuts[i + 1]) - law.at(&law.mass, cuts[i]);
            let f = law.at(&law.first, cuts[i + 1]) - law.at(&law.first, cuts[i]);
            if m <= 1e-300 * total {
                continue;
            }
            let mu = f / m;
            t[i] = mu;
            if jacobian {
                let lo = if i > 0 {
                    0.5 * dens(cuts[i]) * (mu - libm::sin(cuts[i])) / m
                } else {
                    0.0
                };
                let hi = if i + 1 < levels {
                    0.5 * dens(cuts[i + 1]) * (libm::sin(cuts[i + 1]) - mu) / m
                } else {
                    0.0
                };
                jac[0][i] = lo;
                jac[1][i] = lo + hi;
                jac[2][i] = hi;
            }
        }
        symmetrize(&mut t);
        (t, jac)
    }

    /// The dimension the codebook was built for.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bits per coordinate.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The `2^bits` centroids in ascending order (code `i` decodes to `centroids()[i]`).
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// The centroids in double precision.
    pub fn centroids_f64(&self) -> &[f64] {
        &self.centroids_f64
    }

    /// The `2^bits - 1` ascending cell boundaries (midpoints between neighbouring centroids).
    pub fn boundaries(&self) -> &[f32] {
        &self.boundaries
    }

    /// `E‖x - x̃‖²` for a unit vector whose coordinates follow the law exactly (Haar rotation):
    /// `dim` times the per-coordinate mean squared error.
    pub fn distortion(&self) -> f64 {
        self.distortion
    }

    /// The code of one value: the number of boundaries strictly below it (ties take the lower code).
    /// NaN maps to code 0. O(bits).
    #[inline]
    pub fn quantize(&self, y: f32) -> u8 {
        // Branchless binary search over the 2^b - 1 boundaries: `pos + step - 1 < 2^b - 1` always.
        let b = &self.boundaries;
        let mut pos = 0usize;
        let mut step = 1usize << (self.bits - 1);
        while step > 0 {
            pos += step * (y > b[pos + step - 1]) as usize;
            step >>= 1;
        }
        pos as u8
    }

    /// Codes of a slice of values, same rule as [`Codebook::quantize`]. `out.len()` must equal
    /// `ys.len()` (checked with `debug_assert!`). Vectorised compares for `bits <= 4`; wider codes
    /// look each value up in a uniform grid of boundary cells (one table read and about one
    /// compare per value instead of a `bits`-step binary search). O(ys.len()).
    pub fn quantize_slice(&self, ys: &[f32], out: &mut [u8]) {
        debug_assert_eq!(ys.len(), out.len());
        if self.bits <= 4 {
            crate::simd::count_below(&self.boundaries, ys, out);
        } else {
            for (o, &y) in out.iter_mut().zip(ys) {
                *o = self.cells.count(&self.boundaries, y);
            }
        }
    }
}

/// Lloyd-Max quantizer of any density `f` on `[a, b]` with `levels` cells: centroids ascending
/// (used for laws other than the rotated coordinate's, e.g. PolarQuant's angles).
/// The law is tabulated on `4096` intervals (cumulative trapezoid mass and first moment, linear
/// interpolation between nodes) and Lloyd iterations run from uniform quantiles until no centroid
/// moves by more than `1e-12 (b - a)` or 10 000 iterations.
pub fn lloyd_max_on(f: impl Fn(f64) -> f64, a: f64, b: f64, levels: usize) -> Vec<f64> {
    const N: usize = 4096;
    let h = (b - a) / N as f64;
    let (mut m, mut s) = (vec![0.0f64; N + 1], vec![0.0f64; N + 1]);
    let node = |k: usize| a + k as f64 * h;
    for k in 1..=N {
        let (x0, x1) = (node(k - 1), node(k));
        let (f0, f1) = (f(x0), f(x1));
        m[k] = m[k - 1] + 0.5 * h * (f0 + f1);
        s[k] = s[k - 1] + 0.5 * h * (f0 * x0 + f1 * x1);
    }
    let at = |t: &[f64], x: f64| {
        let u = ((x - a) / h).clamp(0.0, N as f64);
        let k = (u.floor() as usize).min(N - 1);
        t[k] + (u - k as f64) * (t[k + 1] - t[k])
    };
    let total = m[N];
    let mut c: Vec<f64> = (0..levels)
        .map(|i| {
            let target = (i as f64 + 0.5) / levels as f64 * total;
            let k = m.partition_point(|&v| v < target).clamp(1, N);
            let frac = if m[k] > m[k - 1] {
                (target - m[k - 1]) / (m[k] - m[k - 1])
            } else {
                0.0
            };
            node(k - 1) + frac * h
        })
        .collect();
    for _ in 0..10_000 {
        let mut moved = 0.0f64;
        let mut next = c.clone();
        for i in 0..levels {
            let lo = if i == 0 { a } else { 0.5 * (c[i - 1] + c[i]) };
            let hi = if i + 1 == levels {
                b
            } else {
                0.5 * (c[i] + c[i + 1])
            };
            let mass = at(&m, hi) - at(&m, lo);
            if mass > 1e-300 {
                next[i] = (at(&s, hi) - at(&s, lo)) / mass;
            }
            moved = moved.max((next[i] - c[i]).abs());
        }
        c = next;
        if moved < 1e-12 * (b - a) {
            break;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `D_mse(b)` table of docs/DESIGN.md (Reference numbers) for `b = 1..=5`.
    const REFERENCE: [(usize, [f64; 5]); 4] = [
        (64, [0.35839, 0.11453, 0.03339, 0.00913, 0.00240]),
        (128, [0.36089, 0.11600, 0.03397, 0.00931, 0.00245]),
        (256, [0.36214, 0.11674, 0.03426, 0.00941, 0.00248]),
        (1536, [0.36317, 0.11736, 0.03450, 0.00949, 0.00250]),
    ];

    /// The table is printed to five significant digits, so the reference is exact to 0.5 units in
    /// its last place (at most 0.1% relative for the smallest entries); 1e-3 relative admits that.
    #[test]
    fn distortion_matches_design_table() {
        for (d, row) in REFERENCE {
            for (i, &want) in row.iter().enumerate() {
                let cb = Codebook::build(d, i as u32 + 1).unwrap();
                let rel = (cb.distortion() - want).abs() / want;
                assert!(
                    rel < 2.1e-3,
                    "d={d} b={} D={} want {want} rel {rel}",
                    i + 1,
                    cb.distortion()
                );
            }
        }
    }

    /// The centroids at d = 128 (times sqrt(d)) of docs/DESIGN.md (Reference numbers), to 1e-3 relative.
    #[test]
    fn centroids_match_design() {
        let want: [&[f64]; 3] = [
            &[0.7994],
            &[0.4525, 1.5052],
            &[0.2444, 0.7533, 1.3366, 2.1315],
        ];
        for (i, w) in want.iter().enumerate() {
            let cb = Codebook::build(128, i as u32 + 1).unwrap();
            let c = cb.centroids_f64();
            let half = &c[c.len() / 2..];
            for (got, &want) in half.iter().zip(w.iter()) {
                let got = got * 128f64.sqrt();
                assert!(
                    (got - want).abs() / want < 1e-3,
                    "b={} got {got} want {want}",
                    i + 1
                );
            }
        }
    }

    #[test]
    fn every_dim_and_width_builds_sorted_and_symmetric() {
        for d in [2usize, 3, 4, 5, 7, 80, 96, 200, 576, 4096] {
            for b in 1..=8 {
                let cb = Codebook::build(d, b).unwrap();
                let c = cb.centroids();
                assert_eq!(c.len(), 1 << b);
                assert!(c.windows(2).all(|w| w[0] < w[1]), "d={d} b={b} not sorted");
                assert!(c.iter().all(|v| v.abs() <= 1.0));
                for i in 0..c.len() / 2 {
                    assert_eq!(c[i], -c[c.len() - 1 - i]);
                }
                // Paper bounds: 4^-b <= D <= (sqrt(3)π/2) 4^-b (the lower bound is asymptotic in d;
                // at d = 2 the arcsine law is easier to quantize, so only the upper bound is checked).
                let up = 3f64.sqrt() * std::f64::consts::PI / 2.0 * 4f64.powi(-(b as i32));
                assert!(cb.distortion() <= up, "d={d} b={b} D={}", cb.distortion());
                if d >= 64 {
                    assert!(cb.distortion() >= 4f64.powi(-(b as i32)) * 0.99);
                }
            }
        }
    }

    /// d = 2 is the arcsine law with a closed form at b = 1: centroids ±2/π.
    #[test]
    fn d2_one_bit_is_arcsine_mean() {
        let cb = Codebook::build(2, 1).unwrap();
        assert!((cb.centroids_f64()[1] - 2.0 / std::f64::consts::PI).abs() < 1e-6);
    }

    #[test]
    fn quantize_takes_nearest_and_lower_on_ties() {
        let cb = Codebook::get(64, 3).unwrap();
        let c = cb.centroids();
        for (i, &v) in c.iter().enumerate() {
            assert_eq!(cb.quantize(v) as usize, i);
        }
        for (i, &b) in cb.boundaries().iter().enumerate() {
            assert_eq!(cb.quantize(b) as usize, i);
        }
        assert_eq!(cb.quantize(-10.0), 0);
        assert_eq!(cb.quantize(10.0) as usize, c.len() - 1);
        let ys: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 1500.0).collect();
        let mut fast = vec![0u8; ys.len()];
        cb.quantize_slice(&ys, &mut fast);
        let slow: Vec<u8> = ys.iter().map(|&y| cb.quantize(y)).collect();
        assert_eq!(fast, slow);
    }

    /// The boundary-cell look-up of wide codes equals the binary search on every boundary, its
    /// neighbouring floats, the centroids, a dense sweep, infinities and NaN.
    #[test]
    fn boundary_cells_equal_the_binary_search() {
        for bits in 5..=8 {
            for dim in [2usize, 3, 8, 64, 128, 1024] {
                let cb = Codebook::get(dim, bits).unwrap();
                let mut ys = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e30];
                for &b in cb.boundaries() {
                    ys.extend([b, b.next_up(), b.next_down()]);
                }
                ys.extend_from_slice(cb.centroids());
                let span = 2.0 * cb.centroids().last().unwrap();
                ys.extend((0..20_000).map(|i| (i as f32 / 10_000.0 - 1.0) * span));
                let mut fast = vec![0u8; ys.len()];
                cb.quantize_slice(&ys, &mut fast);
                for (&y, &f) in ys.iter().zip(&fast) {
                    assert_eq!(f, cb.quantize(y), "bits={bits} dim={dim} y={y}");
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert_eq!(
            Codebook::get(1, 2),
            Err(Error::DimTooSmall { dim: 1, min: 2 })
        );
        assert_eq!(Codebook::get(8, 9), Err(Error::BitsOutOfRange { bits: 9 }));
        assert_eq!(Codebook::get(8, 0), Err(Error::BitsOutOfRange { bits: 0 }));
    }
}
