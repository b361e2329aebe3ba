//! Software prefetch of a second stream in step with a scan: [`Ahead`].
//!
//! A decode step of attention reads two streams from memory, the key codes (scored first) and
//! the value codes (summed once the softmax is known). Read one after the other, the value pass
//! waits for its rows while the memory sat idle during the softmax. A key scan that carries an
//! [`Ahead`] naming the value rows' bytes asks for them as it goes, a few cache lines per block
//! of keys, so both streams come in from memory together and the value pass finds its rows in
//! the core's caches (in its second-level cache when one head's value rows fit there, else in
//! the caches behind it).

use std::marker::PhantomData;
use std::ops::Range;

/// Most regions one [`Ahead`] names.
pub const AHEAD_REGIONS: usize = 8;

/// Cache line size the hints step by.
const LINE: usize = 64;

/// One named region: start, length in bytes, and bytes per row in 32.32 fixed point
/// (`len · 2^32 / rows` for the rows it was spread over, so a walk maps rows to bytes by one
/// multiply and no division).
#[derive(Clone, Copy)]
struct Region {
    ptr: *const u8,
    len: usize,
    per_row: u128,
}

/// Byte regions to fetch toward the core (`prefetcht1`) in step with a walk over `rows` rows:
/// walking rows `a..b` asks for the cache lines holding each region's bytes `[a · len / rows,
/// b · len / rows)` (all of its last bytes once the walk reaches row `rows`). The regions are
/// other data laid out by row (codes in row order, one scale per row), so the lines asked for
/// are the ones their own walk over the same rows will read. A hint only: nothing is read or
/// written, no result depends on it, and on CPUs other than x86-64 (and under Miri) it does
/// nothing. [`Ahead::NONE`] names nothing. `Copy`: a fixed array of at most [`AHEAD_REGIONS`]
/// regions (about 300 bytes).
#[derive(Clone, Copy)]
pub struct Ahead<'a> {
    regions: [Region; AHEAD_REGIONS],
    n: usize,
    rows: usize,
    _bytes: PhantomData<&'a [u8]>,
}

// SAFETY: an `Ahead` never dereferences its pointers (they only feed prefetch hints, which do
// not access memory in the language's sense and cannot fault), so sharing or sending one across
// threads cannot race, whatever the regions hold.
unsafe impl Send for Ahead<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for Ahead<'_> {}

impl std::fmt::Debug for Ahead<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("regions", &self.n)
            .field("rows", &self.rows)
            .finish()
    }
}

impl Default for Ahead<'_> {
    fn default() -> Self {
        Self::NONE
    }
}

impl<'a> Ahead<'a> {
    /// Names nothing: walks ask for nothing.
    pub const NONE: Ahead<'static> = Ahead {
        regions: [Region {
            ptr: std::ptr::null(),
            len: 0,
            per_row: 0,
        }; AHEAD_REGIONS],
        n: 0,
        rows: 0,
        _bytes: PhantomData,
    };

    /// No regions yet, spread over `rows` rows.
    pub fn over(rows: usize) -> Self {
        Self {
            rows,
            ..Ahead::NONE
        }
    }

    /// Adds `data` (any values laid out by row: its bytes are spread evenly over the rows).
    /// Empty slices and regions past the [`AHEAD_REGIONS`]-th are left out (a hint, so nothing
    /// fails). O(1).
    pub fn with<T>(self, data: &'a [T]) -> Self {
        let len = std::mem::size_of_val(data);
        let per_row = ((len as u128) << 32) / self.rows.max(1) as u128;
        self.push(Region {
            ptr: data.as_ptr() as *const u8,
            len,
            per_row,
        })
    }

    /// Every region of `self` and then of `other` (up to [`AHEAD_REGIONS`]), each spread over
    /// the rows it was named for; walks count `self`'s rows, and a walk past `other`'s rows asks
    /// for none of its regions. O(regions).
    pub fn and(mut self, other: &Ahead<'a>) -> Self {
        for &r in &other.regions[..other.n] {
            self = self.push(r);
        }
        self
    }

    /// Adds `r` unless it is empty or the array is full.
    fn push(mut self, r: Region) -> Self {
        if r.len > 0 && self.n < AHEAD_REGIONS {
            self.regions[self.n] = r;
            self.n += 1;
        }
        self
    }

    /// `true` when walks ask for nothing.
    pub fn is_none(&self) -> bool {
        self.n == 0 || self.rows == 0
    }

    /// Asks for the lines of every region that rows `rows` (of the walk) cover; rows past the
    /// end ask for nothing. O(bytes of those rows / 64) hints.
    #[inline]
    pub fn rows(&self, rows: Range<usize>) {
        if cfg!(any(not(target_arch = "x86_64"), miri)) {
            return;
        }
        let Some((a, b)) = self.walk(rows) else {
            return;
        };
        for r in &self.regions[..self.n] {
            let (mut off, end) = self.span(r, a, b);
            while off < end {
                hint(r.ptr.wrapping_offset(off));
                off += LINE as isize;
            }
        }
    }

    /// The regions' rows a walk over `rows` covers, `None` when there are none.
    #[inline]
    fn walk(&self, rows: Range<usize>) -> Option<(usize, usize)> {
        let (a, b) = (rows.start.min(self.rows), rows.end.min(self.rows));
        (!self.is_none() && a < b).then_some((a, b))
    }

    /// The offsets from `r`'s start of the lines rows `a..b` (`a < b <= self.rows`) ask for:
    /// the 64-byte-aligned lines that start among their bytes, and for the rows from the
    /// region's first byte on the line holding that byte too (up to 63 bytes before the
    /// region). Consecutive walks so ask for each line holding a byte of the region exactly
    /// once.
    #[inline]
    fn span(&self, r: &Region, a: usize, b: usize) -> (isize, isize) {
        // Rows up to `self.rows` map at most to `len` (the fixed point rounds down); the walk's
        // last row takes the region to its end.
        let at = |row: usize| (((row as u128 * r.per_row) >> 32) as usize).min(r.len);
        let end = if b == self.rows { r.len } else { at(b) };
        let start = at(a);
        let into = (r.ptr as usize).wrapping_add(start) % LINE;
        // Both fit `isize`: they lie within (or one line before) an allocation.
        let first = if start == 0 {
            -(into as isize)
        } else {
            (start + (LINE - into) % LINE) as isize
        };
        (first, end as isize)
    }
}

/// A `prefetcht1` hint for the line holding `p` (which need not be dereferenceable).
#[inline(always)]
fn hint(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: a prefetch hint neither faults nor accesses memory in the language's sense, for
    // any address (SSE, part of x86-64).
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
    }
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines a walk over `rows` asks for, region by region, as absolute addresses (none at
    /// all when the walk covers no rows).
    fn lines(a: &Ahead<'_>, rows: Range<usize>) -> Vec<Vec<usize>> {
        let Some((lo, hi)) = a.walk(rows) else {
            return Vec::new();
        };
        a.regions[..a.n]
            .iter()
            .map(|r| {
                let (start, end) = a.span(r, lo, hi);
                (start..end)
                    .step_by(LINE)
                    .map(|off| (r.ptr as isize + off) as usize)
                    .collect()
            })
            .collect()
    }

    /// Walks over consecutive row ranges ask, region by region, for exactly the aligned lines
    /// that hold its bytes (every one once, none past its last byte's line), whatever the
    /// region's alignment and length against the row count, for walks of one row, of a block,
    /// and of all rows at once.
    #[test]
    fn consecutive_walks_cover_every_line_of_every_region() {
        let store = vec![0u8; 5000];
        for (offset, len, rows) in [(0, 1000, 33), (1, 1000, 33), (17, 4096, 100), (63, 65, 7)] {
            let codes = &store[offset..offset + len];
            let scales = vec![0.5f32; rows];
            let a = Ahead::over(rows).with(codes).with(&scales);
            let regions = [
                (codes.as_ptr() as usize, len),
                (scales.as_ptr() as usize, 4 * rows),
            ];
            for step in [1, 32, rows] {
                for (k, &(lo, bytes)) in regions.iter().enumerate() {
                    let want: Vec<usize> = (lo / LINE * LINE..lo + bytes).step_by(LINE).collect();
                    let got: Vec<usize> = (0..rows)
                        .step_by(step)
                        .flat_map(|s| lines(&a, s..s + step).swap_remove(k))
                        .collect();
                    assert_eq!(
                        got, want,
                        "offset {offset} len {len} step {step} region {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_walks_and_names_of_nothing() {
        let codes = vec![7u8; 1000];
        let a = Ahead::over(40).with(&codes);
        // Nothing for empty walks or walks past the end (hints only: these calls must not fail
        // either).
        for (b, r) in [(a, 3..3), (a, 40..45), (a, usize::MAX - 1..usize::MAX)] {
            assert!(lines(&b, r.clone()).is_empty());
            b.rows(r);
        }
        assert!(Ahead::NONE.is_none());
        assert!(Ahead::over(0).with(&codes).is_none());
        assert!(Ahead::over(10).with::<u8>(&[]).is_none());
        assert!(lines(&Ahead::NONE, 0..10).is_empty());
    }

    /// `and` keeps the other's regions spread over its own rows (a walk past them asks for them
    /// to their ends) and stops at the limit.
    #[test]
    fn joined_regions_keep_their_rows_and_the_limit() {
        let short = vec![1u8; 640];
        let long = vec![2u8; 6400];
        let a = Ahead::over(100)
            .with(&long)
            .and(&Ahead::over(10).with(&short));
        // Rows 0..5 are 320 bytes of either region from its first byte: five lines, six when
        // the region is not aligned.
        for (k, l) in lines(&a, 0..5).iter().enumerate() {
            assert!((5..=6).contains(&l.len()), "region {k}: {} lines", l.len());
        }
        let past = lines(&a, 20..21);
        assert!(
            past[1].is_empty(),
            "rows past the short region's ask for none of it"
        );
        assert!(!past[0].is_empty());
        let data = [1u16; 4];
        let mut b = Ahead::over(4);
        for _ in 0..AHEAD_REGIONS + 3 {
            b = b.with(&data);
        }
        assert_eq!(b.n, AHEAD_REGIONS);
        let c = Ahead::over(4).with(&data).and(&b);
        assert_eq!(c.n, AHEAD_REGIONS);
        assert_eq!(format!("{c:?}"), "Ahead { regions: 8, rows: 4 }");
    }
}
